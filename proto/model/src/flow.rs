//! Flows: what a collector observed, aggregated over one flush interval.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::EndpointFact;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp = 6,
    Udp = 17,
}

impl Protocol {
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Direction relative to the local workload that reported the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The local workload initiated.
    Egress,
    /// The local workload accepted.
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Forwarded,
    Audit,
    Denied,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forwarded => "forwarded",
            Verdict::Audit => "audit",
            Verdict::Denied => "denied",
        }
    }
}

/// One aggregated flow. `src` initiated, `dst` responded; an ephemeral `src_port` is 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub src_addr: IpAddr,
    pub src_port: u16,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    pub protocol: Protocol,
    pub direction: Direction,
    pub netns_ino: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: String,
    pub connections: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets: u64,
    pub verdict: Verdict,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    /// What the flow's connections carried at L7 (ingress TCP flows only).
    #[serde(default, skip_serializing_if = "FlowHttp::is_empty")]
    pub http: FlowHttp,
}

/// Most distinct (method, path) pairs one flow itemizes; further requests are counted
/// in [`FlowHttp::overflow_requests`].
pub const MAX_HTTP_PER_FLOW: usize = 64;

/// How many requests of one method and path a flow carried.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HttpRequestCount {
    /// Upper-case token (`GET`, `POST`, …).
    pub method: String,
    /// The request target's path: starts with `/`, never the query string.
    pub path: String,
    pub requests: u64,
}

/// The L7 view of an ingress TCP flow, as the collector saw the request lines its
/// connections received. Synthesis narrows a rule to HTTP only where every connection
/// was plaintext HTTP and every path is known: `opaque_connections` and
/// `overflow_requests` are what says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowHttp {
    /// Distinct (method, path) pairs with their counts, sorted, at most
    /// [`MAX_HTTP_PER_FLOW`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<HttpRequestCount>,
    /// Requests not itemized because the flow already listed [`MAX_HTTP_PER_FLOW`] pairs.
    #[serde(default)]
    pub overflow_requests: u64,
    /// Accepted connections that carried payload but never an HTTP request line (TLS,
    /// other protocols, a request line too long or malformed to parse).
    #[serde(default)]
    pub opaque_connections: u64,
}

impl FlowHttp {
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty() && self.overflow_requests == 0 && self.opaque_connections == 0
    }

    /// Total requests seen, itemized or not.
    pub fn total_requests(&self) -> u64 {
        self.requests.iter().fold(self.overflow_requests, |n, r| n.saturating_add(r.requests))
    }
}

impl Flow {
    /// Address of the workload that reported the flow.
    pub fn local_addr(&self) -> IpAddr {
        match self.direction {
            Direction::Egress => self.src_addr,
            Direction::Ingress => self.dst_addr,
        }
    }

    /// Address of the other side.
    pub fn peer_addr(&self) -> IpAddr {
        match self.direction {
            Direction::Egress => self.dst_addr,
            Direction::Ingress => self.src_addr,
        }
    }
}

/// A DNS answer a workload received: `name` resolved to `addr` for `ttl_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsAnswer {
    pub netns_ino: u64,
    pub name: String,
    pub addr: IpAddr,
    pub ttl_seconds: u32,
    pub seen_unix_ms: i64,
}

/// Cumulative loss counters of one agent boot. Loss is reported, never silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossCounters {
    pub ringbuf_dropped: u64,
    pub queue_dropped: u64,
    pub spool_evicted_batches: u64,
    pub spool_evicted_flows: u64,
    pub rejected_batches: u64,
}

/// One delivery unit from an agent; `(node_id, boot_id, seq)` is its dedupe key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowBatch {
    pub node_id: String,
    pub boot_id: String,
    pub seq: u64,
    pub created_unix_ms: i64,
    /// When the agent sent it (agent clock; 0 = unknown): the learner's clock-skew
    /// measurement.
    pub sent_unix_ms: i64,
    pub flows: Vec<Flow>,
    /// `Some` when the batch carries a full endpoint snapshot of the node.
    pub endpoints: Option<Vec<EndpointFact>>,
    pub dns_answers: Vec<DnsAnswer>,
    pub loss: LossCounters,
}
