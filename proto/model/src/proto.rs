//! Conversions between the domain types and the `bulkhead.v1` wire types. Inbound
//! conversions validate everything (wire messages come from the network); outbound
//! ones cannot fail. Wire messages are destructured exhaustively so a new proto field
//! is a compile error here until it is handled.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_proto::v1;

use ipnet::IpNet;

use crate::policy::{HttpRuleError, validate_method, validate_path};
use crate::{
    CgroupFact, Direction, DnsAnswer, EndpointCgroup, EndpointFact, EnforcerHello, EnforcerLoss, EnforcerMessage, Flow,
    FlowBatch, FlowHttp, HttpRequestCount, HttpRequestLine, Identity, InterfaceAddress, IpcacheEntry, LossCounters,
    MAX_HTTP_PER_FLOW, NodePolicy, NodePolicyDelta, NodeRule, PolicyAck, PolicyAckStatus, PolicyEndpoint, PolicyUpdate,
    Protocol, RolloutMode, RuleCounter, RuleKey, RuleRef, Verdict, VerdictEvent, VerdictReport,
};
use crate::{HttpPath, HttpRule};

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
    #[error("HTTP data on an {direction} {protocol} flow; only ingress TCP flows carry it")]
    HttpNotIngressTcp { direction: &'static str, protocol: &'static str },
    #[error("http lists {len} entries, at most {max} allowed")]
    TooManyHttp { len: usize, max: usize },
    #[error("http[{index}]: {source}")]
    HttpRequest { index: usize, source: HttpRuleError },
    #[error("http[{index}]: requests is 0")]
    HttpZeroRequests { index: usize },
    #[error("http[{index}]: {method} {path} is listed twice")]
    HttpDuplicate { index: usize, method: String, path: String },
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
            http,
            opaque_connections,
            http_overflow_requests,
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
        let http = decode_http(direction, protocol, http, opaque_connections, http_overflow_requests)?;
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
            http,
        })
    }
}

/// Validates a flow's L7 part: only ingress TCP flows carry one; every entry names a
/// method and path a rule could be written for (so whatever is stored can become a
/// policy), at most [`MAX_HTTP_PER_FLOW`] distinct entries with a non-zero count.
fn decode_http(
    direction: Direction,
    protocol: Protocol,
    wire: Vec<v1::HttpRequestCount>,
    opaque_connections: u64,
    overflow_requests: u64,
) -> Result<FlowHttp, InvalidFlow> {
    let http = FlowHttp { requests: Vec::new(), overflow_requests, opaque_connections };
    if wire.is_empty() && http.is_empty() {
        return Ok(http);
    }
    if direction != Direction::Ingress || protocol != Protocol::Tcp {
        return Err(InvalidFlow::HttpNotIngressTcp { direction: direction.as_str(), protocol: protocol.as_str() });
    }
    if wire.len() > MAX_HTTP_PER_FLOW {
        return Err(InvalidFlow::TooManyHttp { len: wire.len(), max: MAX_HTTP_PER_FLOW });
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut requests = Vec::with_capacity(wire.len());
    for (index, r) in wire.into_iter().enumerate() {
        let v1::HttpRequestCount { method, path, requests: n } = r;
        validate_method(&method).map_err(|source| InvalidFlow::HttpRequest { index, source })?;
        validate_path(&path).map_err(|source| InvalidFlow::HttpRequest { index, source })?;
        if n == 0 {
            return Err(InvalidFlow::HttpZeroRequests { index });
        }
        if !seen.insert((method.clone(), path.clone())) {
            return Err(InvalidFlow::HttpDuplicate { index, method, path });
        }
        requests.push(HttpRequestCount { method, path, requests: n });
    }
    requests.sort();
    Ok(FlowHttp { requests, ..http })
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
            http: f
                .http
                .requests
                .iter()
                .map(|r| v1::HttpRequestCount { method: r.method.clone(), path: r.path.clone(), requests: r.requests })
                .collect(),
            opaque_connections: f.http.opaque_connections,
            http_overflow_requests: f.http.overflow_requests,
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
            sent_unix_ms,
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
            sent_unix_ms,
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
            sent_unix_ms: b.sent_unix_ms,
        }
    }
}

// === impl NodePolicy (policy.proto) ===

/// Longest policy name, netns name, agent version or error text accepted from the wire.
pub const MAX_POLICY_TEXT_LEN: usize = 4096;

/// Why a wire `NodePolicy` (or a `PolicyUpdate`) was refused. `field` is the path of
/// the offending field, with list indexes (`rules[3].protocol`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidNodePolicy {
    #[error("{field}: {source}")]
    Addr { field: String, source: InvalidFlow },
    #[error("{field}: prefix_len {value} exceeds {max}")]
    PrefixLen { field: String, value: u32, max: u8 },
    #[error("{field}: {value} is not a valid {what}")]
    Enum { field: String, what: &'static str, value: i32 },
    #[error("{field}: {value} is out of range (at most {max})")]
    OutOfRange { field: String, value: u64, max: u64 },
    #[error("{field}: identity 0 is not an identity")]
    ZeroIdentity { field: String },
    #[error("{field} is {len} bytes long, at most {max} allowed")]
    TooLong { field: String, len: usize, max: usize },
    #[error("{field} has {len} entries, at most {max} allowed")]
    TooMany { field: String, len: usize, max: usize },
    #[error("{field} is missing")]
    Missing { field: String },
    #[error("{field}: {reason}")]
    Text { field: String, reason: &'static str },
    #[error("{field}: {source}")]
    Http { field: String, source: crate::HttpRuleError },
    /// Decoded, but not a policy an enforcer can apply.
    #[error(transparent)]
    Invalid(#[from] crate::NodePolicyError),
}

fn np_identity(field: impl FnOnce() -> String, value: u32) -> Result<Identity, InvalidNodePolicy> {
    if value == 0 { Err(InvalidNodePolicy::ZeroIdentity { field: field() }) } else { Ok(Identity(value)) }
}

fn np_direction(field: impl FnOnce() -> String, value: i32) -> Result<Direction, InvalidNodePolicy> {
    match v1::Direction::try_from(value) {
        Ok(v1::Direction::Egress) => Ok(Direction::Egress),
        Ok(v1::Direction::Ingress) => Ok(Direction::Ingress),
        _ => Err(InvalidNodePolicy::Enum { field: field(), what: "direction", value }),
    }
}

fn direction_to_wire(d: Direction) -> i32 {
    (match d {
        Direction::Egress => v1::Direction::Egress,
        Direction::Ingress => v1::Direction::Ingress,
    }) as i32
}

fn protocol_to_wire(p: Option<Protocol>) -> i32 {
    (match p {
        None => v1::Protocol::Unspecified,
        Some(Protocol::Tcp) => v1::Protocol::Tcp,
        Some(Protocol::Udp) => v1::Protocol::Udp,
    }) as i32
}

fn np_text(field: impl FnOnce() -> String, s: &str, max: usize) -> Result<(), InvalidNodePolicy> {
    if s.len() > max { Err(InvalidNodePolicy::TooLong { field: field(), len: s.len(), max }) } else { Ok(()) }
}

fn np_count(field: &str, len: usize, max: usize) -> Result<(), InvalidNodePolicy> {
    if len > max { Err(InvalidNodePolicy::TooMany { field: field.to_owned(), len, max }) } else { Ok(()) }
}

/// Decodes a prefix (address bytes + length).
fn np_prefix(field: impl Fn() -> String, addr: &[u8], prefix_len: u32) -> Result<IpNet, InvalidNodePolicy> {
    let a = addr_from_bytes("addr", addr).map_err(|source| InvalidNodePolicy::Addr { field: field(), source })?;
    let max: u8 = if a.is_ipv4() { 32 } else { 128 };
    u8::try_from(prefix_len).ok().and_then(|len| IpNet::new(a, len).ok()).ok_or(InvalidNodePolicy::PrefixLen {
        field: field(),
        value: prefix_len,
        max,
    })
}

impl TryFrom<v1::NodePolicy> for NodePolicy {
    type Error = InvalidNodePolicy;

    /// Decodes and then [`NodePolicy::validate`]s: what comes out can be applied.
    fn try_from(w: v1::NodePolicy) -> Result<Self, Self::Error> {
        use crate::node_policy::{MAX_ENDPOINTS, MAX_IPCACHE_ENTRIES, MAX_RULE_REFS, MAX_RULES};
        let v1::NodePolicy { version, ipcache, endpoints, rules, rule_refs } = w;
        // Sizes first: nothing below allocates per entry for a hostile message.
        np_count("ipcache", ipcache.len(), MAX_IPCACHE_ENTRIES)?;
        np_count("endpoints", endpoints.len(), MAX_ENDPOINTS)?;
        np_count("rules", rules.len(), MAX_RULES)?;
        np_count("rule_refs", rule_refs.len(), MAX_RULE_REFS)?;
        let policy = NodePolicy {
            version,
            ipcache: decode_all("ipcache", ipcache, decode_ipcache_entry)?,
            endpoints: decode_all("endpoints", endpoints, decode_endpoint)?,
            rules: decode_all("rules", rules, decode_rule)?,
            rule_refs: decode_all("rule_refs", rule_refs, decode_rule_ref)?,
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// Decodes every element of a repeated field, naming the element in errors.
fn decode_all<W, T>(
    field: &str,
    items: Vec<W>,
    decode: impl Fn(&str, W) -> Result<T, InvalidNodePolicy>,
) -> Result<Vec<T>, InvalidNodePolicy> {
    items.into_iter().enumerate().map(|(i, w)| decode(&format!("{field}[{i}]"), w)).collect()
}

fn decode_ipcache_entry(field: &str, e: v1::IpcacheEntry) -> Result<IpcacheEntry, InvalidNodePolicy> {
    let v1::IpcacheEntry { addr, prefix_len, identity } = e;
    Ok(IpcacheEntry {
        prefix: np_prefix(|| field.to_owned(), &addr, prefix_len)?,
        identity: np_identity(|| format!("{field}.identity"), identity)?,
    })
}

fn decode_endpoint(field: &str, e: v1::PolicyEndpoint) -> Result<PolicyEndpoint, InvalidNodePolicy> {
    let v1::PolicyEndpoint { identity, netns_ino, netns_name, cgroups, mode, ingress_covered, egress_covered } = e;
    let mode = match v1::RolloutMode::try_from(mode) {
        Ok(v1::RolloutMode::Learn) => RolloutMode::Learn,
        Ok(v1::RolloutMode::Monitor) => RolloutMode::Monitor,
        Ok(v1::RolloutMode::Enforce) => RolloutMode::Enforce,
        _ => return Err(InvalidNodePolicy::Enum { field: format!("{field}.mode"), what: "rollout mode", value: mode }),
    };
    np_text(|| format!("{field}.netns_name"), &netns_name, crate::node_policy::MAX_NAME_LEN)?;
    np_count("endpoints[].cgroups", cgroups.len(), crate::node_policy::MAX_CGROUPS_PER_ENDPOINT)?;
    let cgroups = cgroups
        .into_iter()
        .enumerate()
        .map(|(c, g)| {
            let v1::EndpointCgroup { cgroup_id, path } = g;
            np_text(|| format!("{field}.cgroups[{c}].path"), &path, crate::node_policy::MAX_CGROUP_PATH_LEN)?;
            Ok(EndpointCgroup { cgroup_id, path })
        })
        .collect::<Result<Vec<_>, InvalidNodePolicy>>()?;
    Ok(PolicyEndpoint {
        identity: np_identity(|| format!("{field}.identity"), identity)?,
        netns_ino: (netns_ino != 0).then_some(netns_ino),
        netns_name: (!netns_name.is_empty()).then_some(netns_name),
        cgroups,
        mode,
        ingress_covered,
        egress_covered,
    })
}

fn decode_rule(field: &str, r: v1::NodeRule) -> Result<NodeRule, InvalidNodePolicy> {
    let v1::NodeRule { rule_id, local_identity, direction, peer_identity, port, protocol, http } = r;
    np_count(&format!("{field}.http"), http.len(), crate::node_policy::MAX_HTTP_RULES_PER_ENTRY)?;
    let http = http
        .into_iter()
        .enumerate()
        .map(|(i, h)| decode_http_rule(&format!("{field}.http[{i}]"), h))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match v1::Protocol::try_from(protocol) {
        Ok(v1::Protocol::Unspecified) => None,
        Ok(v1::Protocol::Tcp) => Some(Protocol::Tcp),
        Ok(v1::Protocol::Udp) => Some(Protocol::Udp),
        Err(_) => {
            return Err(InvalidNodePolicy::Enum {
                field: format!("{field}.protocol"),
                what: "protocol",
                value: protocol,
            });
        }
    };
    let port = u16::try_from(port).map_err(|_| InvalidNodePolicy::OutOfRange {
        field: format!("{field}.port"),
        value: port.into(),
        max: u16::MAX.into(),
    })?;
    Ok(NodeRule {
        key: RuleKey {
            local: np_identity(|| format!("{field}.local_identity"), local_identity)?,
            direction: np_direction(|| format!("{field}.direction"), direction)?,
            peer: (peer_identity != 0).then_some(Identity(peer_identity)),
            port: (port != 0).then_some(port),
            protocol,
        },
        rule_id,
        http,
    })
}

fn decode_http_rule(field: &str, h: v1::NodeHttpRule) -> Result<HttpRule, InvalidNodePolicy> {
    let v1::NodeHttpRule { method, path_match, path } = h;
    np_text(|| format!("{field}.method"), &method, crate::MAX_HTTP_METHOD_LEN)?;
    np_text(|| format!("{field}.path"), &path, crate::MAX_HTTP_PATH_LEN)?;
    let path = match v1::HttpPathMatch::try_from(path_match) {
        Ok(v1::HttpPathMatch::Any) if path.is_empty() => HttpPath::Any,
        Ok(v1::HttpPathMatch::Exact) => HttpPath::Exact(path),
        Ok(v1::HttpPathMatch::Prefix) => HttpPath::Prefix(path),
        _ => {
            return Err(InvalidNodePolicy::Enum {
                field: format!("{field}.path_match"),
                what: "HTTP path match (ANY without a path, EXACT or PREFIX)",
                value: path_match,
            });
        }
    };
    let rule = HttpRule { method: (!method.is_empty()).then_some(method), path };
    rule.validate().map_err(|source| InvalidNodePolicy::Http { field: field.to_owned(), source })?;
    Ok(rule)
}

fn encode_http_rule(h: &HttpRule) -> v1::NodeHttpRule {
    let (path_match, path) = match &h.path {
        HttpPath::Any => (v1::HttpPathMatch::Any, String::new()),
        HttpPath::Exact(p) => (v1::HttpPathMatch::Exact, p.clone()),
        HttpPath::Prefix(p) => (v1::HttpPathMatch::Prefix, p.clone()),
    };
    v1::NodeHttpRule { method: h.method.clone().unwrap_or_default(), path_match: path_match as i32, path }
}

fn decode_rule_ref(field: &str, r: v1::RuleRef) -> Result<RuleRef, InvalidNodePolicy> {
    let v1::RuleRef { rule_id, proposal_id, policy_name, direction, rule_index } = r;
    np_text(|| format!("{field}.policy_name"), &policy_name, crate::node_policy::MAX_NAME_LEN)?;
    Ok(RuleRef {
        rule_id,
        proposal_id,
        policy_name,
        direction: np_direction(|| format!("{field}.direction"), direction)?,
        rule_index,
    })
}

fn encode_ipcache_entry(e: &IpcacheEntry) -> v1::IpcacheEntry {
    v1::IpcacheEntry {
        addr: addr_to_bytes(e.prefix.addr()),
        prefix_len: e.prefix.prefix_len().into(),
        identity: e.identity.0,
    }
}

fn encode_endpoint(e: &PolicyEndpoint) -> v1::PolicyEndpoint {
    v1::PolicyEndpoint {
        identity: e.identity.0,
        netns_ino: e.netns_ino.unwrap_or(0),
        netns_name: e.netns_name.clone().unwrap_or_default(),
        cgroups: e
            .cgroups
            .iter()
            .map(|c| v1::EndpointCgroup { cgroup_id: c.cgroup_id, path: c.path.clone() })
            .collect(),
        mode: match e.mode {
            RolloutMode::Learn => v1::RolloutMode::Learn,
            RolloutMode::Monitor => v1::RolloutMode::Monitor,
            RolloutMode::Enforce => v1::RolloutMode::Enforce,
        } as i32,
        ingress_covered: e.ingress_covered,
        egress_covered: e.egress_covered,
    }
}

fn encode_rule(r: &NodeRule) -> v1::NodeRule {
    v1::NodeRule {
        rule_id: r.rule_id,
        local_identity: r.key.local.0,
        direction: direction_to_wire(r.key.direction),
        peer_identity: r.key.peer.map_or(0, |i| i.0),
        port: r.key.port.map_or(0, u32::from),
        protocol: protocol_to_wire(r.key.protocol),
        http: r.http.iter().map(encode_http_rule).collect(),
    }
}

fn encode_rule_ref(r: &RuleRef) -> v1::RuleRef {
    v1::RuleRef {
        rule_id: r.rule_id,
        proposal_id: r.proposal_id,
        policy_name: r.policy_name.clone(),
        direction: direction_to_wire(r.direction),
        rule_index: r.rule_index,
    }
}

impl From<&NodePolicy> for v1::NodePolicy {
    fn from(p: &NodePolicy) -> Self {
        v1::NodePolicy {
            version: p.version,
            ipcache: p.ipcache.iter().map(encode_ipcache_entry).collect(),
            endpoints: p.endpoints.iter().map(encode_endpoint).collect(),
            rules: p.rules.iter().map(encode_rule).collect(),
            rule_refs: p.rule_refs.iter().map(encode_rule_ref).collect(),
        }
    }
}

// === impl NodePolicyDelta ===

impl TryFrom<v1::NodePolicyDelta> for NodePolicyDelta {
    type Error = InvalidNodePolicy;

    /// Decodes each entry like a snapshot's; whether the result is a valid policy is
    /// known only once applied ([`NodePolicyDelta::apply`] validates).
    fn try_from(w: v1::NodePolicyDelta) -> Result<Self, Self::Error> {
        use crate::node_policy::{MAX_ENDPOINTS, MAX_IPCACHE_ENTRIES, MAX_RULE_REFS, MAX_RULES};
        let v1::NodePolicyDelta {
            base_version,
            version,
            ipcache_upsert,
            ipcache_remove,
            endpoints_changed,
            endpoints,
            rules_upsert,
            rules_remove,
            rule_refs_upsert,
            rule_refs_remove,
        } = w;
        np_count("ipcache_upsert", ipcache_upsert.len(), MAX_IPCACHE_ENTRIES)?;
        np_count("ipcache_remove", ipcache_remove.len(), MAX_IPCACHE_ENTRIES)?;
        np_count("endpoints", endpoints.len(), MAX_ENDPOINTS)?;
        np_count("rules_upsert", rules_upsert.len(), MAX_RULES)?;
        np_count("rules_remove", rules_remove.len(), MAX_RULES)?;
        np_count("rule_refs_upsert", rule_refs_upsert.len(), MAX_RULE_REFS)?;
        np_count("rule_refs_remove", rule_refs_remove.len(), MAX_RULE_REFS)?;
        Ok(NodePolicyDelta {
            base_version,
            version,
            ipcache_upsert: decode_all("ipcache_upsert", ipcache_upsert, decode_ipcache_entry)?,
            ipcache_remove: decode_all(
                "ipcache_remove",
                ipcache_remove,
                |f, e| Ok(decode_ipcache_entry(f, e)?.prefix),
            )?,
            endpoints: if endpoints_changed {
                Some(decode_all("endpoints", endpoints, decode_endpoint)?)
            } else {
                None
            },
            rules_upsert: decode_all("rules_upsert", rules_upsert, decode_rule)?,
            rules_remove: decode_all("rules_remove", rules_remove, |f, r| Ok(decode_rule(f, r)?.key))?,
            rule_refs_upsert: decode_all("rule_refs_upsert", rule_refs_upsert, decode_rule_ref)?,
            rule_refs_remove,
        })
    }
}

impl From<&NodePolicyDelta> for v1::NodePolicyDelta {
    fn from(d: &NodePolicyDelta) -> Self {
        // Removals name their key; the identity / rule id slots are filler (1: 0
        // would not decode as an identity).
        v1::NodePolicyDelta {
            base_version: d.base_version,
            version: d.version,
            ipcache_upsert: d.ipcache_upsert.iter().map(encode_ipcache_entry).collect(),
            ipcache_remove: d
                .ipcache_remove
                .iter()
                .map(|p| encode_ipcache_entry(&IpcacheEntry { prefix: *p, identity: Identity(1) }))
                .collect(),
            endpoints_changed: d.endpoints.is_some(),
            endpoints: d.endpoints.iter().flatten().map(encode_endpoint).collect(),
            rules_upsert: d.rules_upsert.iter().map(encode_rule).collect(),
            rules_remove: d.rules_remove.iter().map(|k| encode_rule(&NodeRule::l4(*k, 0))).collect(),
            rule_refs_upsert: d.rule_refs_upsert.iter().map(encode_rule_ref).collect(),
            rule_refs_remove: d.rule_refs_remove.clone(),
        }
    }
}

// === impl PolicyUpdate ===

impl TryFrom<v1::PolicyUpdate> for PolicyUpdate {
    type Error = InvalidNodePolicy;

    fn try_from(w: v1::PolicyUpdate) -> Result<Self, Self::Error> {
        let v1::PolicyUpdate { update } = w;
        match update {
            Some(v1::policy_update::Update::Snapshot(s)) => Ok(PolicyUpdate::Snapshot(NodePolicy::try_from(s)?)),
            Some(v1::policy_update::Update::Delta(d)) => Ok(PolicyUpdate::Delta(NodePolicyDelta::try_from(d)?)),
            None => Err(InvalidNodePolicy::Missing { field: "update".into() }),
        }
    }
}

impl From<&PolicyUpdate> for v1::PolicyUpdate {
    fn from(u: &PolicyUpdate) -> Self {
        let update = match u {
            PolicyUpdate::Snapshot(p) => v1::policy_update::Update::Snapshot(p.into()),
            PolicyUpdate::Delta(d) => v1::policy_update::Update::Delta(d.into()),
        };
        v1::PolicyUpdate { update: Some(update) }
    }
}

/// A snapshot out of a `PolicyUpdate`; a delta is refused (callers that can apply
/// deltas decode a [`PolicyUpdate`]).
impl TryFrom<v1::PolicyUpdate> for NodePolicy {
    type Error = InvalidNodePolicy;

    fn try_from(w: v1::PolicyUpdate) -> Result<Self, Self::Error> {
        match PolicyUpdate::try_from(w)? {
            PolicyUpdate::Snapshot(p) => Ok(p),
            PolicyUpdate::Delta(_) => Err(InvalidNodePolicy::Missing { field: "update.snapshot".into() }),
        }
    }
}

impl From<&NodePolicy> for v1::PolicyUpdate {
    fn from(p: &NodePolicy) -> Self {
        v1::PolicyUpdate { update: Some(v1::policy_update::Update::Snapshot(p.into())) }
    }
}

// === impl EnforcerMessage ===

/// Most events one verdict report may carry.
pub const MAX_VERDICT_EVENTS: usize = 65_536;
/// Most rule counters one verdict report may carry.
pub const MAX_RULE_COUNTERS: usize = crate::node_policy::MAX_RULE_REFS;

impl TryFrom<v1::EnforcerMessage> for EnforcerMessage {
    type Error = InvalidNodePolicy;

    fn try_from(w: v1::EnforcerMessage) -> Result<Self, Self::Error> {
        use v1::enforcer_message::Msg;
        let v1::EnforcerMessage { msg } = w;
        match msg {
            None => Err(InvalidNodePolicy::Missing { field: "msg".into() }),
            Some(Msg::Hello(h)) => {
                let v1::EnforcerHello { node_id, boot_id, agent_version, applied_version } = h;
                if node_id.is_empty() {
                    return Err(InvalidNodePolicy::Missing { field: "hello.node_id".into() });
                }
                if boot_id.is_empty() {
                    return Err(InvalidNodePolicy::Missing { field: "hello.boot_id".into() });
                }
                np_text(|| "hello.node_id".into(), &node_id, MAX_ID_LEN)?;
                np_text(|| "hello.boot_id".into(), &boot_id, MAX_ID_LEN)?;
                np_text(|| "hello.agent_version".into(), &agent_version, MAX_ID_LEN)?;
                Ok(EnforcerMessage::Hello(EnforcerHello { node_id, boot_id, agent_version, applied_version }))
            }
            Some(Msg::Ack(a)) => {
                let v1::PolicyAck { version, status, error } = a;
                let status = match v1::PolicyAckStatus::try_from(status) {
                    Ok(v1::PolicyAckStatus::Applied) => PolicyAckStatus::Applied,
                    Ok(v1::PolicyAckStatus::Rejected) => PolicyAckStatus::Rejected,
                    _ => {
                        return Err(InvalidNodePolicy::Enum {
                            field: "ack.status".into(),
                            what: "ack status",
                            value: status,
                        });
                    }
                };
                np_text(|| "ack.error".into(), &error, MAX_POLICY_TEXT_LEN)?;
                Ok(EnforcerMessage::Ack(PolicyAck { version, status, error: (!error.is_empty()).then_some(error) }))
            }
            Some(Msg::Report(r)) => Ok(EnforcerMessage::Report(VerdictReport::try_from(r)?)),
        }
    }
}

impl From<&EnforcerMessage> for v1::EnforcerMessage {
    fn from(m: &EnforcerMessage) -> Self {
        use v1::enforcer_message::Msg;
        let msg = match m {
            EnforcerMessage::Hello(h) => Msg::Hello(v1::EnforcerHello {
                node_id: h.node_id.clone(),
                boot_id: h.boot_id.clone(),
                agent_version: h.agent_version.clone(),
                applied_version: h.applied_version,
            }),
            EnforcerMessage::Ack(a) => Msg::Ack(v1::PolicyAck {
                version: a.version,
                status: match a.status {
                    PolicyAckStatus::Applied => v1::PolicyAckStatus::Applied,
                    PolicyAckStatus::Rejected => v1::PolicyAckStatus::Rejected,
                } as i32,
                error: a.error.clone().unwrap_or_default(),
            }),
            EnforcerMessage::Report(r) => Msg::Report(r.into()),
        };
        v1::EnforcerMessage { msg: Some(msg) }
    }
}

impl TryFrom<v1::VerdictReport> for VerdictReport {
    type Error = InvalidNodePolicy;

    fn try_from(w: v1::VerdictReport) -> Result<Self, Self::Error> {
        let v1::VerdictReport { policy_version, events, rule_counters, loss, sent_unix_ms } = w;
        np_count("report.events", events.len(), MAX_VERDICT_EVENTS)?;
        np_count("report.rule_counters", rule_counters.len(), MAX_RULE_COUNTERS)?;
        let events = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                let v1::VerdictEvent {
                    time_unix_ms,
                    cgroup_id,
                    netns_ino,
                    local_identity,
                    peer_identity,
                    local_addr,
                    local_port,
                    peer_addr,
                    peer_port,
                    protocol,
                    direction,
                    verdict,
                    rule_id,
                    suppressed,
                    http,
                } = e;
                let field = |name: &str| format!("report.events[{i}].{name}");
                let addr = |name: &'static str, b: &[u8]| {
                    addr_from_bytes(name, b).map_err(|source| InvalidNodePolicy::Addr { field: field(name), source })
                };
                let port = |name: &'static str, v: u32| {
                    u16::try_from(v).map_err(|_| InvalidNodePolicy::OutOfRange {
                        field: field(name),
                        value: v.into(),
                        max: u16::MAX.into(),
                    })
                };
                let protocol = match v1::Protocol::try_from(protocol) {
                    Ok(v1::Protocol::Tcp) => Protocol::Tcp,
                    Ok(v1::Protocol::Udp) => Protocol::Udp,
                    _ => {
                        return Err(InvalidNodePolicy::Enum {
                            field: field("protocol"),
                            what: "protocol",
                            value: protocol,
                        });
                    }
                };
                let verdict = match v1::Verdict::try_from(verdict) {
                    Ok(v1::Verdict::Forwarded) => Verdict::Forwarded,
                    Ok(v1::Verdict::Audit) => Verdict::Audit,
                    Ok(v1::Verdict::Denied) => Verdict::Denied,
                    _ => {
                        return Err(InvalidNodePolicy::Enum {
                            field: field("verdict"),
                            what: "verdict",
                            value: verdict,
                        });
                    }
                };
                Ok(VerdictEvent {
                    time_unix_ms,
                    cgroup_id,
                    netns_ino,
                    local_identity: np_identity(|| field("local_identity"), local_identity)?,
                    peer_identity: np_identity(|| field("peer_identity"), peer_identity)?,
                    local_addr: addr("local_addr", &local_addr)?,
                    local_port: port("local_port", local_port)?,
                    peer_addr: addr("peer_addr", &peer_addr)?,
                    peer_port: port("peer_port", peer_port)?,
                    protocol,
                    direction: np_direction(|| field("direction"), direction)?,
                    verdict,
                    rule_id: (rule_id != 0).then_some(rule_id),
                    suppressed,
                    http: http
                        .map(|h| {
                            let v1::HttpRequestLine { method, path, truncated } = h;
                            let line = HttpRequestLine { method, path, truncated };
                            line.validate()
                                .map(|()| line)
                                .map_err(|reason| InvalidNodePolicy::Text { field: field("http"), reason })
                        })
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>, InvalidNodePolicy>>()?;
        let rule_counters = rule_counters
            .into_iter()
            .map(|c| {
                let v1::RuleCounter { rule_id, hits, last_hit_unix_ms } = c;
                RuleCounter { rule_id, hits, last_hit_unix_ms }
            })
            .collect();
        let loss = loss
            .map(|l| {
                let v1::EnforcerLoss { ringbuf_dropped, queue_dropped, conntrack_full } = l;
                EnforcerLoss { ringbuf_dropped, queue_dropped, conntrack_full }
            })
            .unwrap_or_default();
        Ok(VerdictReport { policy_version, events, rule_counters, loss, sent_unix_ms })
    }
}

impl From<&VerdictReport> for v1::VerdictReport {
    fn from(r: &VerdictReport) -> Self {
        v1::VerdictReport {
            policy_version: r.policy_version,
            events: r
                .events
                .iter()
                .map(|e| v1::VerdictEvent {
                    time_unix_ms: e.time_unix_ms,
                    cgroup_id: e.cgroup_id,
                    netns_ino: e.netns_ino,
                    local_identity: e.local_identity.0,
                    peer_identity: e.peer_identity.0,
                    local_addr: addr_to_bytes(e.local_addr),
                    local_port: e.local_port.into(),
                    peer_addr: addr_to_bytes(e.peer_addr),
                    peer_port: e.peer_port.into(),
                    protocol: protocol_to_wire(Some(e.protocol)),
                    direction: direction_to_wire(e.direction),
                    verdict: match e.verdict {
                        Verdict::Forwarded => v1::Verdict::Forwarded,
                        Verdict::Audit => v1::Verdict::Audit,
                        Verdict::Denied => v1::Verdict::Denied,
                    } as i32,
                    rule_id: e.rule_id.unwrap_or(0),
                    suppressed: e.suppressed,
                    http: e.http.as_ref().map(|h| v1::HttpRequestLine {
                        method: h.method.clone(),
                        path: h.path.clone(),
                        truncated: h.truncated,
                    }),
                })
                .collect(),
            rule_counters: r
                .rule_counters
                .iter()
                .map(|c| v1::RuleCounter { rule_id: c.rule_id, hits: c.hits, last_hit_unix_ms: c.last_hit_unix_ms })
                .collect(),
            loss: Some(v1::EnforcerLoss {
                ringbuf_dropped: r.loss.ringbuf_dropped,
                queue_dropped: r.loss.queue_dropped,
                conntrack_full: r.loss.conntrack_full,
            }),
            sent_unix_ms: r.sent_unix_ms,
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

    fn http_flow(http: Vec<v1::HttpRequestCount>) -> v1::Flow {
        v1::Flow { direction: v1::Direction::Ingress as i32, http, ..wire_flow() }
    }

    fn req(method: &str, path: &str, requests: u64) -> v1::HttpRequestCount {
        v1::HttpRequestCount { method: method.into(), path: path.into(), requests }
    }

    #[test]
    fn http_counts_round_trip_sorted() {
        let wire = v1::Flow {
            opaque_connections: 2,
            http_overflow_requests: 5,
            ..http_flow(vec![req("PUT", "/v1/exhaust-port", 1), req("POST", "/v1/request-landing", 7)])
        };
        let b = FlowBatch::try_from(wire_batch(vec![wire])).expect("valid");
        let h = &b.flows[0].http;
        assert_eq!(
            h.requests[0],
            HttpRequestCount { method: "POST".into(), path: "/v1/request-landing".into(), requests: 7 }
        );
        assert_eq!((h.opaque_connections, h.overflow_requests, h.total_requests()), (2, 5, 13));
        let again = FlowBatch::try_from(v1::FlowBatch::from(&b)).expect("valid");
        assert_eq!(again, b);
    }

    #[test]
    fn malformed_http_is_refused_with_the_field_named() {
        let too_many: Vec<_> = (0..=MAX_HTTP_PER_FLOW).map(|i| req("GET", &format!("/{i}"), 1)).collect();
        let cases: Vec<(v1::Flow, &str)> = vec![
            (http_flow(vec![req("get", "/", 1)]), "flows[0]: http[0]: HTTP method \"get\""),
            (
                http_flow(vec![req("GET", "/ok", 1), req("GET", "x", 1)]),
                "flows[0]: http[1]: HTTP path \"x\" must start",
            ),
            (http_flow(vec![req("GET", "/a'; DROP TABLE edges;--", 1)]), "flows[0]: http[0]: HTTP path"),
            (
                http_flow(vec![req("GET", &format!("/{}", "a".repeat(200)), 1)]),
                "flows[0]: http[0]: HTTP path is 201 bytes",
            ),
            (http_flow(vec![req("GET", "/\u{0}", 1)]), "flows[0]: http[0]: HTTP path"),
            (http_flow(vec![req("GET", "/", 0)]), "flows[0]: http[0]: requests is 0"),
            (http_flow(vec![req("GET", "/", 1), req("GET", "/", 2)]), "flows[0]: http[1]: GET / is listed twice"),
            (http_flow(too_many), "flows[0]: http lists 65 entries"),
            (v1::Flow { http: vec![req("GET", "/", 1)], ..wire_flow() }, "flows[0]: HTTP data on an egress tcp flow"),
            (
                v1::Flow { protocol: v1::Protocol::Udp as i32, opaque_connections: 1, ..http_flow(vec![]) },
                "flows[0]: HTTP data on an ingress udp flow",
            ),
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

#[cfg(test)]
mod node_policy_tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    fn arb_policy() -> impl Strategy<Value = NodePolicy> {
        let ipcache = proptest::collection::btree_map(
            (any::<u32>(), 0u8..=32)
                .prop_map(|(a, len)| IpNet::new(Ipv4Addr::from(a).into(), len).expect("len").trunc()),
            1u32..2000,
            0..8,
        );
        let endpoints = proptest::collection::vec(
            (
                any::<bool>(),
                0usize..3,
                prop_oneof![Just(RolloutMode::Monitor), Just(RolloutMode::Enforce)],
                any::<(bool, bool)>(),
            ),
            1..4,
        );
        (1u64..u64::MAX, ipcache, endpoints)
            .prop_flat_map(|(version, ipcache, eps)| {
                let endpoints: Vec<PolicyEndpoint> = eps
                    .iter()
                    .enumerate()
                    .map(|(i, &(netns, cgroups, mode, (ing, eg)))| PolicyEndpoint {
                        identity: Identity(256 + i as u32),
                        netns_ino: (netns || cgroups == 0).then_some(1000 + i as u64),
                        netns_name: netns.then(|| format!("ns{i}")),
                        cgroups: (0..cgroups)
                            .map(|j| EndpointCgroup { cgroup_id: (10 * i + j) as u64, path: format!("/w{i}/{j}") })
                            .collect(),
                        mode,
                        ingress_covered: ing,
                        egress_covered: eg,
                    })
                    .collect();
                let mut peers: Vec<Option<Identity>> = ipcache.values().map(|id| Some(Identity(*id))).collect();
                peers.extend([None, Some(Identity::WORLD), Some(Identity(256))]);
                let n = endpoints.len() as u32;
                let key = (
                    0..n,
                    any::<bool>(),
                    proptest::sample::select(peers),
                    prop_oneof![
                        (1u16.., prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)])
                            .prop_map(|(p, pr)| (Some(p), Some(pr))),
                        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)].prop_map(|pr| (None, Some(pr))),
                        Just((None, None)),
                    ],
                )
                    .prop_map(|(local, ingress, peer, (port, protocol))| {
                        let direction = if ingress { Direction::Ingress } else { Direction::Egress };
                        RuleKey { local: Identity(256 + local), direction, peer, port, protocol }
                    });
                let ipcache: Vec<IpcacheEntry> =
                    ipcache.into_iter().map(|(prefix, id)| IpcacheEntry { prefix, identity: Identity(id) }).collect();
                (Just(version), Just(ipcache), Just(endpoints), proptest::collection::btree_map(key, 1u32..4, 0..16))
            })
            .prop_map(|(version, ipcache, endpoints, rules)| NodePolicy {
                version,
                ipcache,
                endpoints,
                rules: rules.into_iter().map(|(key, rule_id)| NodeRule::l4(key, rule_id)).collect(),
                rule_refs: (1..4)
                    .map(|id| RuleRef {
                        rule_id: id,
                        proposal_id: i64::from(id) * 10,
                        policy_name: format!("p{id}"),
                        direction: Direction::Ingress,
                        rule_index: id - 1,
                    })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn node_policy_round_trips(p in arb_policy()) {
            prop_assert_eq!(p.validate(), Ok(()));
            let wire = v1::PolicyUpdate::from(&p);
            prop_assert_eq!(NodePolicy::try_from(wire), Ok(p));
        }
    }

    fn event() -> VerdictEvent {
        VerdictEvent {
            time_unix_ms: 5,
            cgroup_id: 7,
            netns_ino: 9,
            local_identity: Identity(256),
            peer_identity: Identity::WORLD,
            local_addr: "10.0.0.1".parse().expect("ip"),
            local_port: 80,
            peer_addr: "2001:db8::1".parse().expect("ip"),
            peer_port: 40000,
            protocol: Protocol::Tcp,
            direction: Direction::Ingress,
            verdict: Verdict::Audit,
            rule_id: None,
            suppressed: 3,
            http: None,
        }
    }

    #[test]
    fn enforcer_messages_round_trip() {
        let msgs = [
            EnforcerMessage::Hello(EnforcerHello {
                node_id: "n".into(),
                boot_id: "b".into(),
                agent_version: "0.1.0".into(),
                applied_version: 4,
            }),
            EnforcerMessage::Ack(PolicyAck {
                version: 4,
                status: PolicyAckStatus::Rejected,
                error: Some("bad".into()),
            }),
            EnforcerMessage::Report(VerdictReport {
                policy_version: 4,
                events: vec![
                    event(),
                    VerdictEvent { rule_id: Some(2), verdict: Verdict::Forwarded, ..event() },
                    VerdictEvent {
                        rule_id: Some(3),
                        verdict: Verdict::Denied,
                        http: Some(HttpRequestLine {
                            method: "PUT".into(),
                            path: "/v1/exhaust-port".into(),
                            truncated: false,
                        }),
                        ..event()
                    },
                ],
                rule_counters: vec![RuleCounter { rule_id: 2, hits: 10, last_hit_unix_ms: 99 }],
                loss: EnforcerLoss { ringbuf_dropped: 1, queue_dropped: 2, conntrack_full: 3 },
                sent_unix_ms: 1_700_000_000_000,
            }),
        ];
        for m in msgs {
            assert_eq!(EnforcerMessage::try_from(v1::EnforcerMessage::from(&m)), Ok(m));
        }
    }

    /// The request line of an HTTP verdict is attacker-controlled text: what the
    /// kernel read becomes printable and bounded, and the wire refuses anything else.
    #[test]
    fn http_request_lines_are_printable_and_bounded() {
        let pad = |b: &[u8], fill: u8| {
            let mut v = b.to_vec();
            v.resize(crate::MAX_HTTP_LINE_PATH_BYTES, fill);
            v
        };
        let line = HttpRequestLine::from_kernel(b"PUT\0\0\0", &pad(b"/v1/exhaust-port", 0));
        assert_eq!(line, HttpRequestLine { method: "PUT".into(), path: "/v1/exhaust-port".into(), truncated: false });
        // Cut off by the segment's end (0xff padding), with hostile bytes escaped.
        let line = HttpRequestLine::from_kernel(b"GET", &pad(b"/a<script>\\\x01\xc3", 0xff));
        assert_eq!(line.path, "/a<script>\\\\\\x01\\xc3");
        assert!(line.truncated);
        assert_eq!(line.validate(), Ok(()));
        // Longer than the kernel reads: no terminator at all.
        let line = HttpRequestLine::from_kernel(b"GET", &pad(&[b'a'; 200], 0));
        assert!(line.truncated && line.path.len() == crate::MAX_HTTP_LINE_PATH_BYTES);
        // Not a request line: no method.
        let none = HttpRequestLine::from_kernel(&[0; 16], &pad(b"", 0xff));
        assert_eq!((none.method.as_str(), none.to_string().as_str()), ("", "(not a request line)"));
        assert_eq!(HttpRequestLine::from_kernel(b"GET", &pad(b"/aaaa", 0xff)).to_string(), "GET /aaaa…");
        assert_eq!(
            HttpRequestLine::from_kernel(b"PUT", &pad(b"/v1/exhaust-port", 0)).to_string(),
            "PUT /v1/exhaust-port"
        );

        let report = |http: v1::HttpRequestLine| v1::VerdictReport {
            events: vec![v1::VerdictEvent {
                http: Some(http),
                ..v1::VerdictReport::from(&VerdictReport { events: vec![event()], ..Default::default() }).events[0]
                    .clone()
            }],
            ..Default::default()
        };
        for (method, path) in [("put", "/x"), ("GET", "/a b"), ("GET", "/\u{e9}"), ("AAAAAAAAAAAAAAAAA", "/")] {
            let err = VerdictReport::try_from(report(v1::HttpRequestLine {
                method: method.into(),
                path: path.into(),
                truncated: false,
            }));
            assert!(
                matches!(&err, Err(InvalidNodePolicy::Text { field, .. }) if field == "report.events[0].http"),
                "{method} {path}: {err:?}"
            );
        }
        let long = v1::HttpRequestLine { method: "GET".into(), path: "/".repeat(521), truncated: true };
        assert!(VerdictReport::try_from(report(long)).is_err());
    }

    #[test]
    fn invalid_fields_are_named() {
        let valid = v1::NodePolicy {
            version: 1,
            ipcache: vec![v1::IpcacheEntry { addr: vec![10, 0, 0, 0], prefix_len: 8, identity: 300 }],
            ..Default::default()
        };
        assert_eq!(NodePolicy::try_from(valid.clone()).map(|p| p.ipcache.len()), Ok(1));
        let cases: Vec<(v1::NodePolicy, &str)> = vec![
            (
                v1::NodePolicy {
                    ipcache: vec![v1::IpcacheEntry { addr: vec![10, 0, 0], prefix_len: 8, identity: 300 }],
                    ..valid.clone()
                },
                "ipcache[0]: addr has 3 bytes",
            ),
            (
                v1::NodePolicy {
                    ipcache: vec![v1::IpcacheEntry { addr: vec![10, 0, 0, 0], prefix_len: 33, identity: 300 }],
                    ..valid.clone()
                },
                "ipcache[0]: prefix_len 33 exceeds 32",
            ),
            (
                v1::NodePolicy {
                    ipcache: vec![v1::IpcacheEntry { addr: vec![10, 0, 0, 0], prefix_len: 8, identity: 0 }],
                    ..valid.clone()
                },
                "ipcache[0].identity: identity 0",
            ),
            (
                v1::NodePolicy {
                    rules: vec![v1::NodeRule {
                        rule_id: 1,
                        local_identity: 256,
                        direction: 2,
                        protocol: 99,
                        ..Default::default()
                    }],
                    ..valid.clone()
                },
                "rules[0].protocol: 99 is not a valid protocol",
            ),
            (
                v1::NodePolicy {
                    rules: vec![v1::NodeRule { rule_id: 1, local_identity: 256, direction: 0, ..Default::default() }],
                    ..valid.clone()
                },
                "rules[0].direction: 0 is not a valid direction",
            ),
            (
                v1::NodePolicy {
                    endpoints: vec![v1::PolicyEndpoint { identity: 256, netns_ino: 5, mode: 7, ..Default::default() }],
                    ..valid.clone()
                },
                "endpoints[0].mode: 7 is not a valid rollout mode",
            ),
            (
                v1::NodePolicy {
                    rules: vec![v1::NodeRule { rule_id: 1, local_identity: 256, direction: 2, ..Default::default() }],
                    ..valid.clone()
                },
                "rules[0]: local identity 256 has no endpoint",
            ),
            (v1::NodePolicy { version: 0, ..valid.clone() }, "version must be at least 1"),
        ];
        for (wire, want) in cases {
            let err = NodePolicy::try_from(wire).expect_err("must be rejected").to_string();
            assert!(err.starts_with(want), "{err:?} should start with {want:?}");
        }
        let empty = v1::PolicyUpdate { update: None };
        assert_eq!(NodePolicy::try_from(empty), Err(InvalidNodePolicy::Missing { field: "update".into() }));
    }

    #[test]
    fn deltas_round_trip_and_name_bad_fields() {
        let delta = NodePolicyDelta {
            base_version: 4,
            version: 5,
            ipcache_upsert: vec![IpcacheEntry { prefix: "10.1.0.0/16".parse().expect("net"), identity: Identity(300) }],
            ipcache_remove: vec!["2001:db8::/64".parse().expect("net")],
            endpoints: Some(Vec::new()),
            rules_upsert: vec![NodeRule {
                key: RuleKey {
                    local: Identity(300),
                    direction: Direction::Egress,
                    peer: None,
                    port: Some(53),
                    protocol: Some(Protocol::Udp),
                },
                rule_id: 7,
                http: Vec::new(),
            }],
            rules_remove: vec![RuleKey {
                local: Identity(300),
                direction: Direction::Ingress,
                peer: Some(Identity(301)),
                port: None,
                protocol: None,
            }],
            rule_refs_upsert: Vec::new(),
            rule_refs_remove: vec![6],
        };
        for update in [
            PolicyUpdate::Delta(delta.clone()),
            PolicyUpdate::Delta(NodePolicyDelta { endpoints: None, ..delta.clone() }),
        ] {
            assert_eq!(PolicyUpdate::try_from(v1::PolicyUpdate::from(&update)), Ok(update));
        }
        let mut wire = v1::NodePolicyDelta::from(&delta);
        wire.rules_upsert[0].port = 70_000;
        let err = NodePolicyDelta::try_from(wire).expect_err("port out of range").to_string();
        assert!(err.starts_with("rules_upsert[0].port"), "{err}");
        // A snapshot-only reader refuses a delta instead of misreading it.
        let as_snapshot = NodePolicy::try_from(v1::PolicyUpdate::from(&PolicyUpdate::Delta(delta)));
        assert!(as_snapshot.is_err());
    }
}
