//! What synthesis is given: the identities, the service graph, external observations,
//! DNS answers, the edges' HTTP facts, the currently active policies, and the knobs
//! ([`Options`]).

use std::net::IpAddr;

use bulkhead_model::{Direction, Edge, EdgeHttp, Identity, Labels, Level, Policy, Protocol, Window};
use ipnet::IpNet;

/// What kind of thing an allocated identity stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityKind {
    /// A managed workload (pod, container, netns, host service).
    Workload,
    /// A named external CIDR group from the inventory.
    CidrGroup { cidrs: Vec<IpNet> },
}

/// One allocated identity (reserved identities are implied by their number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityInfo {
    pub id: Identity,
    /// Human name (inventory workload, Kubernetes owner); used for policy names.
    pub name: String,
    pub labels: Labels,
    pub kind: IdentityKind,
    /// Described by Kubernetes (a pod): enables kubelet / API-server lints.
    pub kubernetes: bool,
    /// Selected by a Kubernetes Service: reachable through ingress controllers.
    pub service_backend: bool,
}

impl IdentityInfo {
    /// A workload identity (convenience for tests and callers).
    pub fn workload(id: Identity, name: impl Into<String>, labels: Labels) -> Self {
        Self { id, name: name.into(), labels, kind: IdentityKind::Workload, kubernetes: false, service_backend: false }
    }
}

/// Traffic between a workload and an address outside every known endpoint (the
/// reserved `world` identity), aggregated per remote address and port. Edges only know
/// "world"; this is what lets synthesis name CIDRs and DNS names instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalObservation {
    /// The workload on our side.
    pub local: Identity,
    /// Egress: `local` connected out to `addr`; ingress: `addr` connected to `local`.
    pub direction: Direction,
    pub addr: IpAddr,
    /// The server port (`local`'s port for ingress, `addr`'s for egress).
    pub port: u16,
    pub protocol: Protocol,
    pub connections: u64,
    pub bytes: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// One DNS answer a workload received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsObservation {
    /// The identity that asked, when known (answers are captured per network namespace).
    pub client: Option<Identity>,
    pub name: String,
    pub addr: IpAddr,
    pub ttl_seconds: u32,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

impl DnsObservation {
    /// Until when the answer may be used: its last sighting plus its TTL plus `grace`.
    pub fn valid_until(&self, grace_ms: i64) -> i64 {
        self.last_seen_unix_ms.saturating_add(i64::from(self.ttl_seconds) * 1000).saturating_add(grace_ms)
    }
}

/// A policy currently approved or deployed for a target (drift and first-seen checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivePolicy {
    pub target: Identity,
    pub policy: Policy,
}

/// Everything synthesis reads. Borrowed: callers keep ownership of large inputs.
#[derive(Debug, Clone, Copy, Default)]
pub struct Input<'a> {
    pub identities: &'a [IdentityInfo],
    pub edges: &'a [Edge],
    pub external: &'a [ExternalObservation],
    pub dns: &'a [DnsObservation],
    pub active: &'a [ActivePolicy],
    /// What edges carried at L7 (at most one entry per edge key).
    pub http: &'a [EdgeHttp],
}

/// How external addresses are grouped into CIDRs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CidrOptions {
    /// Prefix length IPv4 addresses are grouped by.
    pub prefix_v4: u8,
    /// Prefix length IPv6 addresses are grouped by.
    pub prefix_v6: u8,
    /// A prefix is proposed only when at least this many observed addresses share it;
    /// fewer stay single-address CIDRs. 0 or 1 would aggregate every address, so
    /// values below 2 are treated as 2.
    pub min_addresses: usize,
}

impl Default for CidrOptions {
    fn default() -> Self {
        Self { prefix_v4: 24, prefix_v6: 64, min_addresses: 3 }
    }
}

/// Synthesis knobs. `Default` is what the learner uses unless told otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub level: Level,
    /// Edges and observations last seen inside the window are evidence; `to` is "now".
    pub window: Window,
    /// Converged = no new edge for the target during this long before `window.to`.
    pub quiet_period_ms: i64,
    /// Propose ingress rules (covering ingress = default deny for the rest).
    pub cover_ingress: bool,
    /// Propose egress rules.
    pub cover_egress: bool,
    pub cidr: CidrOptions,
    /// How long after its TTL a DNS answer still names an address.
    pub dns_grace_ms: i64,
    /// A peer touching at least this many distinct ports of one workload is a
    /// suspected port scan.
    pub scan_min_ports: usize,
    /// Deployed rules unused for this long are suggested for removal.
    pub unused_after_ms: i64,
    /// At most this many widened pairs are listed per rule (all are counted).
    pub max_widening_examples: usize,
    /// Only synthesize for these targets (`None` = every workload).
    pub targets: Option<Vec<Identity>>,
    /// Worker threads (0 = one per CPU). Targets are independent, so the work splits
    /// without changing the result.
    pub threads: usize,
    /// Narrow ingress ports to HTTP rules where every connection was plaintext HTTP
    /// (see [`crate::l7`]).
    pub http_rules: bool,
    /// More than this many distinct paths of one method under one parent path become
    /// one prefix rule.
    pub http_prefix_after: usize,
    /// A port needing more HTTP rules than this (after prefixes) stays L4.
    pub http_max_rules: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            level: Level::Exact,
            window: Window { from_unix_ms: 0, to_unix_ms: 0 },
            quiet_period_ms: 60 * 60 * 1000,
            cover_ingress: true,
            cover_egress: true,
            cidr: CidrOptions::default(),
            dns_grace_ms: 5 * 60 * 1000,
            scan_min_ports: 16,
            unused_after_ms: 14 * 24 * 3600 * 1000,
            max_widening_examples: 20,
            targets: None,
            threads: 0,
            http_rules: true,
            http_prefix_after: 8,
            http_max_rules: 32,
        }
    }
}
