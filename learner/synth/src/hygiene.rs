//! Learning hygiene: traffic that may be an attack in progress is never learned
//! silently. Whatever matches here becomes a rule held back for an analyst.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Cloud instance-metadata endpoints: AWS/GCP/Azure/OpenStack (169.254.169.254),
/// AWS over IPv6 (fd00:ec2::254), Alibaba (100.100.100.200). Reaching them from a
/// workload is how stolen pods turn into stolen cloud credentials.
pub const METADATA_ADDRESSES: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
];

pub fn is_metadata(addr: IpAddr) -> bool {
    METADATA_ADDRESSES.contains(&addr)
}

/// A peer touching this many distinct ports of one workload looks like a vertical scan.
pub fn is_scan(distinct_ports: usize, threshold: usize) -> bool {
    threshold > 0 && distinct_ports >= threshold
}
