//! Conversions between the domain types and the `bulkhead.v1` wire types. Inbound
//! conversions validate everything (wire messages come from the network); outbound
//! ones cannot fail. Wire messages are destructured exhaustively so a new proto field
//! is a compile error here until it is handled.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_proto::v1;

use crate::{
    CgroupFact, Direction, DnsAnswer, EndpointFact, Flow, FlowBatch, InterfaceAddress, LossCounters, Protocol, Verdict,
};

/// Longest node or boot id accepted.
pub const MAX_ID_LEN: usize = 253;
/// Longest process name accepted (the kernel's is 16 bytes; leave room).
pub const MAX_COMM_LEN: usize = 64;
/// Longest DNS name (RFC 1035).
pub const MAX_DNS_NAME_LEN: usize = 253;

/// Why a wire message was refused. Each names the field and, for lists, the index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBatch {
    #[error("node_id is empty")]
    EmptyNodeId,
    #[error("boot_id is empty")]
    EmptyBootId,
    #[error("{field} is {len} bytes long, at most {max} allowed")]
    TooLong { field: &'static str, len: usize, max: usize },
    #[error("seq must be at least 1")]
    ZeroSeq,
    #[error("flows[{index}]: {source}")]
    Flow { index: usize, source: InvalidFlow },
    #[error("endpoints[{index}]: {reason}")]
    Endpoint { index: usize, reason: String },
    #[error("dns_answers[{index}]: {reason}")]
    Dns { index: usize, reason: String },
}

/// Why one wire flow was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFlow {
    #[error("{field} has {len} bytes; an address has 4 or 16")]
    AddrLen { field: &'static str, len: usize },
    #[error("{field} {value} is not a port (0-65535)")]
    Port { field: &'static str, value: u32 },
    #[error("protocol {value} is not supported (tcp=6, udp=17)")]
    Protocol { value: i32 },
    #[error("direction {value} is not egress (1) or ingress (2)")]
    Direction { value: i32 },
    #[error("verdict {value} is not forwarded, audit or denied")]
    Verdict { value: i32 },
    #[error("comm is {len} bytes long, at most {max} allowed")]
    CommTooLong { len: usize, max: usize },
    #[error("last_seen ({last}) is before first_seen ({first})")]
    TimeOrder { first: i64, last: i64 },
}

/// Decodes an address of 4 or 16 bytes.
pub fn addr_from_bytes(field: &'static str, b: &[u8]) -> Result<IpAddr, InvalidFlow> {
    match b.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        len => Err(InvalidFlow::AddrLen { field, len }),
    }
}

/// Encodes an address as 4 or 16 bytes.
pub fn addr_to_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn port(field: &'static str, value: u32) -> Result<u16, InvalidFlow> {
    u16::try_from(value).map_err(|_| InvalidFlow::Port { field, value })
}

fn bounded(field: &'static str, s: &str, max: usize) -> Result<(), InvalidBatch> {
    if s.len() > max { Err(InvalidBatch::TooLong { field, len: s.len(), max }) } else { Ok(()) }
}

// === impl Flow ===

impl TryFrom<v1::Flow> for Flow {
    type Error = InvalidFlow;

    fn try_from(w: v1::Flow) -> Result<Self, Self::Error> {
        let v1::Flow {
            src_addr,
            src_port,
            dst_addr,
            dst_port,
            protocol,
            direction,
            netns_ino,
            cgroup_id,
            pid,
            comm,
            connections,
            bytes_sent,
            bytes_received,
            packets,
            verdict,
            first_seen_unix_ms,
            last_seen_unix_ms,
        } = w;
        let protocol = match v1::Protocol::try_from(protocol) {
            Ok(v1::Protocol::Tcp) => Protocol::Tcp,
            Ok(v1::Protocol::Udp) => Protocol::Udp,
            _ => return Err(InvalidFlow::Protocol { value: protocol }),
        };
        let direction = match v1::Direction::try_from(direction) {
            Ok(v1::Direction::Egress) => Direction::Egress,
            Ok(v1::Direction::Ingress) => Direction::Ingress,
            _ => return Err(InvalidFlow::Direction { value: direction }),
        };
        let verdict = match v1::Verdict::try_from(verdict) {
            Ok(v1::Verdict::Forwarded) => Verdict::Forwarded,
            Ok(v1::Verdict::Audit) => Verdict::Audit,
            Ok(v1::Verdict::Denied) => Verdict::Denied,
            _ => return Err(InvalidFlow::Verdict { value: verdict }),
        };
        if comm.len() > MAX_COMM_LEN {
            return Err(InvalidFlow::CommTooLong { len: comm.len(), max: MAX_COMM_LEN });
        }
        if last_seen_unix_ms < first_seen_unix_ms {
            return Err(InvalidFlow::TimeOrder { first: first_seen_unix_ms, last: last_seen_unix_ms });
        }
        Ok(Flow {
            src_addr: addr_from_bytes("src_addr", &src_addr)?,
            src_port: port("src_port", src_port)?,
            dst_addr: addr_from_bytes("dst_addr", &dst_addr)?,
            dst_port: port("dst_port", dst_port)?,
            protocol,
            direction,
            netns_ino,
            cgroup_id,
            pid,
            comm,
            connections,
            bytes_sent,
            bytes_received,
            packets,
            verdict,
            first_seen_unix_ms,
            last_seen_unix_ms,
        })
    }
}

impl From<&Flow> for v1::Flow {
    fn from(f: &Flow) -> Self {
        v1::Flow {
            src_addr: addr_to_bytes(f.src_addr),
            src_port: f.src_port.into(),
            dst_addr: addr_to_bytes(f.dst_addr),
            dst_port: f.dst_port.into(),
            protocol: match f.protocol {
                Protocol::Tcp => v1::Protocol::Tcp,
                Protocol::Udp => v1::Protocol::Udp,
            } as i32,
            direction: match f.direction {
                Direction::Egress => v1::Direction::Egress,
                Direction::Ingress => v1::Direction::Ingress,
            } as i32,
            netns_ino: f.netns_ino,
            cgroup_id: f.cgroup_id,
            pid: f.pid,
            comm: f.comm.clone(),
            connections: f.connections,
            bytes_sent: f.bytes_sent,
            bytes_received: f.bytes_received,
            packets: f.packets,
            verdict: match f.verdict {
                Verdict::Forwarded => v1::Verdict::Forwarded,
                Verdict::Audit => v1::Verdict::Audit,
                Verdict::Denied => v1::Verdict::Denied,
            } as i32,
            first_seen_unix_ms: f.first_seen_unix_ms,
            last_seen_unix_ms: f.last_seen_unix_ms,
        }
    }
}

// === impl EndpointFact ===

impl TryFrom<v1::EndpointFact> for EndpointFact {
    type Error = String;

    fn try_from(w: v1::EndpointFact) -> Result<Self, Self::Error> {
        let v1::EndpointFact { netns_ino, netns_name, addresses, cgroups, host } = w;
        if netns_name.len() > 255 {
            return Err(format!("netns_name is {} bytes long, at most 255 allowed", netns_name.len()));
        }
        let addresses = addresses
            .into_iter()
            .enumerate()
            .map(|(i, a)| {
                let v1::InterfaceAddress { interface, addr, prefix_len } = a;
                let addr = addr_from_bytes("addr", &addr).map_err(|e| format!("addresses[{i}]: {e}"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix_len = u8::try_from(prefix_len)
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| format!("addresses[{i}]: prefix_len {prefix_len} exceeds {max}"))?;
                if interface.len() > 64 {
                    return Err(format!("addresses[{i}]: interface name too long"));
                }
                Ok(InterfaceAddress { interface, addr, prefix_len })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let cgroups = cgroups
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let v1::CgroupFact { cgroup_id, path, comms } = c;
                if path.len() > 4096 || !path.starts_with('/') {
                    return Err(format!("cgroups[{i}]: path must start with '/' and be at most 4096 bytes"));
                }
                if comms.iter().any(|c| c.len() > MAX_COMM_LEN) {
                    return Err(format!("cgroups[{i}]: a comm is longer than {MAX_COMM_LEN} bytes"));
                }
                Ok(CgroupFact { cgroup_id, path, comms })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(EndpointFact {
            netns_ino,
            netns_name: (!netns_name.is_empty()).then_some(netns_name),
            addresses,
            cgroups,
            host,
        })
    }
}

impl From<&EndpointFact> for v1::EndpointFact {
    fn from(e: &EndpointFact) -> Self {
        v1::EndpointFact {
            netns_ino: e.netns_ino,
            netns_name: e.netns_name.clone().unwrap_or_default(),
            addresses: e
                .addresses
                .iter()
                .map(|a| v1::InterfaceAddress {
                    interface: a.interface.clone(),
                    addr: addr_to_bytes(a.addr),
                    prefix_len: a.prefix_len.into(),
                })
                .collect(),
            cgroups: e
                .cgroups
                .iter()
                .map(|c| v1::CgroupFact { cgroup_id: c.cgroup_id, path: c.path.clone(), comms: c.comms.clone() })
                .collect(),
            host: e.host,
        }
    }
}

// === impl DnsAnswer ===

impl TryFrom<v1::DnsAnswer> for DnsAnswer {
    type Error = String;

    fn try_from(w: v1::DnsAnswer) -> Result<Self, Self::Error> {
        let v1::DnsAnswer { netns_ino, name, addr, ttl_seconds, seen_unix_ms } = w;
        if name.is_empty() || name.len() > MAX_DNS_NAME_LEN {
            return Err(format!("name must be 1 to {MAX_DNS_NAME_LEN} bytes, got {}", name.len()));
        }
        Ok(DnsAnswer {
            netns_ino,
            name,
            addr: addr_from_bytes("addr", &addr).map_err(|e| e.to_string())?,
            ttl_seconds,
            seen_unix_ms,
        })
    }
}

impl From<&DnsAnswer> for v1::DnsAnswer {
    fn from(d: &DnsAnswer) -> Self {
        v1::DnsAnswer {
            netns_ino: d.netns_ino,
            name: d.name.clone(),
            addr: addr_to_bytes(d.addr),
            ttl_seconds: d.ttl_seconds,
            seen_unix_ms: d.seen_unix_ms,
        }
    }
}

// === impl LossCounters ===

impl From<v1::LossCounters> for LossCounters {
    fn from(w: v1::LossCounters) -> Self {
        let v1::LossCounters {
            ringbuf_dropped,
            queue_dropped,
            spool_evicted_batches,
            spool_evicted_flows,
            rejected_batches,
        } = w;
        LossCounters { ringbuf_dropped, queue_dropped, spool_evicted_batches, spool_evicted_flows, rejected_batches }
    }
}

impl From<LossCounters> for v1::LossCounters {
    fn from(l: LossCounters) -> Self {
        v1::LossCounters {
            ringbuf_dropped: l.ringbuf_dropped,
            queue_dropped: l.queue_dropped,
            spool_evicted_batches: l.spool_evicted_batches,
            spool_evicted_flows: l.spool_evicted_flows,
            rejected_batches: l.rejected_batches,
        }
    }
}

// === impl FlowBatch ===

impl TryFrom<v1::FlowBatch> for FlowBatch {
    type Error = InvalidBatch;

    fn try_from(w: v1::FlowBatch) -> Result<Self, Self::Error> {
        let v1::FlowBatch {
            node_id,
            boot_id,
            seq,
            created_unix_ms,
            flows,
            endpoints,
            dns_answers,
            loss,
            endpoints_snapshot,
        } = w;
        if node_id.is_empty() {
            return Err(InvalidBatch::EmptyNodeId);
        }
        if boot_id.is_empty() {
            return Err(InvalidBatch::EmptyBootId);
        }
        bounded("node_id", &node_id, MAX_ID_LEN)?;
        bounded("boot_id", &boot_id, MAX_ID_LEN)?;
        if seq == 0 {
            return Err(InvalidBatch::ZeroSeq);
        }
        let flows = flows
            .into_iter()
            .enumerate()
            .map(|(index, f)| Flow::try_from(f).map_err(|source| InvalidBatch::Flow { index, source }))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoints = endpoints
            .into_iter()
            .enumerate()
            .map(|(index, e)| EndpointFact::try_from(e).map_err(|reason| InvalidBatch::Endpoint { index, reason }))
            .collect::<Result<Vec<_>, _>>()?;
        let dns_answers = dns_answers
            .into_iter()
            .enumerate()
            .map(|(index, d)| DnsAnswer::try_from(d).map_err(|reason| InvalidBatch::Dns { index, reason }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(FlowBatch {
            node_id,
            boot_id,
            seq,
            created_unix_ms,
            flows,
            endpoints: (endpoints_snapshot || !endpoints.is_empty()).then_some(endpoints),
            dns_answers,
            loss: loss.map(LossCounters::from).unwrap_or_default(),
        })
    }
}

impl From<&FlowBatch> for v1::FlowBatch {
    fn from(b: &FlowBatch) -> Self {
        v1::FlowBatch {
            node_id: b.node_id.clone(),
            boot_id: b.boot_id.clone(),
            seq: b.seq,
            created_unix_ms: b.created_unix_ms,
            flows: b.flows.iter().map(v1::Flow::from).collect(),
            endpoints: b.endpoints.iter().flatten().map(v1::EndpointFact::from).collect(),
            dns_answers: b.dns_answers.iter().map(v1::DnsAnswer::from).collect(),
            loss: Some(b.loss.into()),
            endpoints_snapshot: b.endpoints.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire_flow() -> v1::Flow {
        v1::Flow {
            src_addr: vec![10, 0, 0, 1],
            src_port: 0,
            dst_addr: vec![10, 0, 0, 2],
            dst_port: 80,
            protocol: v1::Protocol::Tcp as i32,
            direction: v1::Direction::Egress as i32,
            connections: 1,
            verdict: v1::Verdict::Forwarded as i32,
            first_seen_unix_ms: 5,
            last_seen_unix_ms: 6,
            ..Default::default()
        }
    }

    fn wire_batch(flows: Vec<v1::Flow>) -> v1::FlowBatch {
        v1::FlowBatch { node_id: "n".into(), boot_id: "b".into(), seq: 1, flows, ..Default::default() }
    }

    #[test]
    fn valid_batch_round_trips() {
        let b = FlowBatch::try_from(wire_batch(vec![wire_flow()])).expect("valid");
        assert_eq!(b.flows[0].dst_port, 80);
        let again = FlowBatch::try_from(v1::FlowBatch::from(&b)).expect("valid");
        assert_eq!(again, b);
    }

    #[test]
    fn each_invalid_field_is_named() {
        let cases: Vec<(v1::Flow, &str)> = vec![
            (v1::Flow { src_addr: vec![1, 2, 3], ..wire_flow() }, "flows[0]: src_addr has 3 bytes"),
            (v1::Flow { dst_port: 70000, ..wire_flow() }, "flows[0]: dst_port 70000 is not a port"),
            (v1::Flow { protocol: 1, ..wire_flow() }, "flows[0]: protocol 1 is not supported"),
            (v1::Flow { direction: 0, ..wire_flow() }, "flows[0]: direction 0"),
            (v1::Flow { verdict: 9, ..wire_flow() }, "flows[0]: verdict 9"),
            (v1::Flow { comm: "x".repeat(100), ..wire_flow() }, "flows[0]: comm is 100 bytes"),
            (v1::Flow { first_seen_unix_ms: 9, ..wire_flow() }, "flows[0]: last_seen (6) is before"),
        ];
        for (flow, want) in cases {
            let err = FlowBatch::try_from(wire_batch(vec![flow])).expect_err("must be rejected").to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
    }

    #[test]
    fn batch_header_is_checked() {
        let b = v1::FlowBatch { node_id: String::new(), ..wire_batch(vec![]) };
        assert_eq!(FlowBatch::try_from(b), Err(InvalidBatch::EmptyNodeId));
        let b = v1::FlowBatch { seq: 0, ..wire_batch(vec![]) };
        assert_eq!(FlowBatch::try_from(b), Err(InvalidBatch::ZeroSeq));
        let b = v1::FlowBatch { boot_id: "b".repeat(300), ..wire_batch(vec![]) };
        assert!(matches!(FlowBatch::try_from(b), Err(InvalidBatch::TooLong { field: "boot_id", .. })));
    }
}
