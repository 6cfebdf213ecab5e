//! Endpoint facts: what a node reports about the sandboxes running on it, so the
//! learner can map addresses and cgroups to workloads.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One network namespace on a node with its addresses and cgroups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointFact {
    pub netns_ino: u64,
    /// Name under `/var/run/netns`, if the namespace has one.
    pub netns_name: Option<String>,
    pub addresses: Vec<InterfaceAddress>,
    pub cgroups: Vec<CgroupFact>,
    /// The node's initial network namespace.
    pub host: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceAddress {
    pub interface: String,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupFact {
    pub cgroup_id: u64,
    /// Path relative to the cgroup v2 root, starting with `/`.
    pub path: String,
    pub comms: Vec<String>,
}
