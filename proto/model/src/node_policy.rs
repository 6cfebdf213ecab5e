//! What one node's enforcer needs: a versioned, self-contained [`NodePolicy`] compiled
//! by the learner from the approved policy set (DESIGN.md §4 "Distribution", §5).
//!
//! Everything is expanded already, because the enforcer's datapath only does exact
//! lookups whose cost must not grow with the number of rules:
//! * [`NodePolicy::ipcache`] maps prefixes to identities (an LPM trie; longest prefix
//!   wins, an address in no prefix is [`Identity::WORLD`]). CIDR, CIDR-group and FQDN
//!   peers get node-policy-local identities from [`LOCAL_IDENTITY_FIRST`] upwards so
//!   the trie can tell them apart; a rule naming a CIDR also names the identities of
//!   the prefixes nested inside it.
//! * [`NodePolicy::rules`] are allow entries keyed by (local identity, direction, peer,
//!   port, protocol), selectors already expanded over the known identities. The
//!   lookup order is [`NodePolicy::PROBE_ORDER`]; [`NodePolicyIndex::decide`] is the
//!   reference implementation the datapath must agree with.
//! * [`NodePolicy::endpoints`] lists the node's workloads in monitor or enforce with
//!   the directions some policy covers (default deny applies only there).
//! * [`NodePolicy::rule_refs`] names the approved rule behind each `rule_id`, so a
//!   verdict or a hit counter points at something an analyst reviewed.
//!
//! [`NodePolicy::validate`] is what an enforcer runs before applying a snapshot: a
//! snapshot that fails it is rejected whole and the applied policy stays.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Direction, HttpRule, HttpRuleError, Identity, Protocol, ReservedIdentity, RolloutMode};

/// First node-policy-local identity (Cilium's local CIDR identity range starts here
/// too). The learner allocates label-set identities upwards from 256; it would need
/// sixteen million of them to collide.
pub const LOCAL_IDENTITY_FIRST: u32 = 1 << 24;

/// Most ipcache entries one snapshot may carry (the enforcer's LPM trie capacity).
pub const MAX_IPCACHE_ENTRIES: usize = 1 << 18;
/// Most endpoints (managed workloads) on one node.
pub const MAX_ENDPOINTS: usize = 1 << 14;
/// Most cgroups one endpoint may list.
pub const MAX_CGROUPS_PER_ENDPOINT: usize = 1024;
/// Most rule entries in one snapshot (the `POLICY` hash capacity; the benchmark runs
/// 100k).
pub const MAX_RULES: usize = 1 << 20;
/// Most HTTP rules on one entry (a workload's API surface, not a URL list).
pub const MAX_HTTP_RULES_PER_ENTRY: usize = 1024;
/// Most rule references in one snapshot.
pub const MAX_RULE_REFS: usize = 1 << 18;
/// Longest cgroup path (`PATH_MAX`).
pub const MAX_CGROUP_PATH_LEN: usize = 4096;
/// Longest network namespace or policy name.
pub const MAX_NAME_LEN: usize = 255;

/// One node's compiled policy. Plain data; see the module docs for the semantics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicy {
    /// Increases with every change for this node; enforcers refuse older versions.
    pub version: u64,
    /// Prefix → identity, sorted by prefix, one entry per prefix.
    pub ipcache: Vec<IpcacheEntry>,
    /// The node's workloads in monitor or enforce, sorted by identity then netns.
    pub endpoints: Vec<PolicyEndpoint>,
    /// Allow entries, sorted by key, each key once.
    pub rules: Vec<NodeRule>,
    /// What each `rule_id` used in `rules` stands for, sorted by id.
    pub rule_refs: Vec<RuleRef>,
}

/// One ipcache entry: addresses in `prefix` (and in no longer prefix) are `identity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IpcacheEntry {
    /// Canonical: no host bits set.
    pub prefix: IpNet,
    pub identity: Identity,
}

/// A cgroup v2 the enforcer attaches to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointCgroup {
    pub cgroup_id: u64,
    /// Relative to the cgroup v2 root, starting with `/` (for attaching by path after
    /// a restart, when ids may have been reused).
    pub path: String,
}

/// One managed workload on the node, in monitor or enforce.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PolicyEndpoint {
    pub identity: Identity,
    /// The workload's network namespace (tc on its veth), when it has its own.
    pub netns_ino: Option<u64>,
    pub netns_name: Option<String>,
    /// Its cgroups (cgroup_skb), sorted by id.
    pub cgroups: Vec<EndpointCgroup>,
    /// Monitor (audit) or enforce (drop); learn-mode workloads are not listed.
    pub mode: RolloutMode,
    /// Some policy selecting the workload covers ingress: default deny applies there.
    pub ingress_covered: bool,
    /// Some policy selecting the workload covers egress.
    pub egress_covered: bool,
}

impl PolicyEndpoint {
    pub fn covered(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.ingress_covered,
            Direction::Egress => self.egress_covered,
        }
    }
}

/// The lookup key of one allow entry. `None` is the wildcard ("any").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleKey {
    /// The workload on this node the entry applies to.
    pub local: Identity,
    pub direction: Direction,
    /// The other side (`None`: any peer).
    pub peer: Option<Identity>,
    /// The server port (`None`: any port). Never `Some(0)`.
    pub port: Option<u16>,
    /// `None`: any protocol (then `port` is `None` too).
    pub protocol: Option<Protocol>,
}

/// One allow entry and the approved rule it comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeRule {
    pub key: RuleKey,
    /// Names the rule in verdicts and hit counters; see [`NodePolicy::rule_refs`].
    /// Several entries share one id (a selector expands to many peers). Never 0:
    /// verdict reports use 0 for "default deny".
    pub rule_id: u32,
    /// Empty: the entry allows the connection (L4). Otherwise the connection is
    /// allowed, but each HTTP request on it must match one of these (L7; ingress TCP
    /// entries only — the enforcer reads request lines arriving at the server). This
    /// is already the union over every approved rule that allows the key *and* every
    /// wildcard entry that covers it (the compiler resolves it), because the datapath
    /// stops at the first entry its probes find. Sorted, deduplicated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRule>,
}

impl NodeRule {
    /// An L4 entry.
    pub fn l4(key: RuleKey, rule_id: u32) -> NodeRule {
        NodeRule { key, rule_id, http: Vec::new() }
    }
}

/// The approved rule behind a `rule_id`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RuleRef {
    pub rule_id: u32,
    /// The proposal version whose (approved) policy holds the rule.
    pub proposal_id: i64,
    pub policy_name: String,
    pub direction: Direction,
    /// Index into the policy's rule list for `direction`.
    pub rule_index: u32,
}

/// Why a [`NodePolicy`] was refused. Fields name the offending entry by index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodePolicyError {
    #[error("version must be at least 1")]
    ZeroVersion,
    #[error("{field} has {len} entries, at most {max} allowed")]
    TooMany { field: &'static str, len: usize, max: usize },
    #[error("{field} is {len} bytes long, at most {max} allowed")]
    TooLong { field: String, len: usize, max: usize },
    #[error("ipcache[{index}]: prefix {prefix} has host bits set (expected {canonical})")]
    NonCanonicalPrefix { index: usize, prefix: IpNet, canonical: IpNet },
    #[error("ipcache[{index}]: prefix {prefix} is listed twice (identities {first} and {second})")]
    ConflictingPrefix { index: usize, prefix: IpNet, first: Identity, second: Identity },
    #[error("{field}: identity 0 is not an identity")]
    ZeroIdentity { field: String },
    #[error("{field}: identity {identity} is not in the ipcache, the endpoints or the reserved set")]
    UnknownIdentity { field: String, identity: Identity },
    #[error("endpoints[{index}]: has neither a cgroup nor a network namespace")]
    EmptyEndpoint { index: usize },
    #[error("endpoints[{index}]: mode learn is not enforced; leave the workload out instead")]
    LearnEndpoint { index: usize },
    #[error("endpoints[{index}]: cgroup {cgroup_id} is also listed by endpoints[{first}]")]
    DuplicateCgroup { index: usize, cgroup_id: u64, first: usize },
    #[error("endpoints[{index}]: netns {netns_ino} is also listed by endpoints[{first}]")]
    DuplicateNetns { index: usize, netns_ino: u64, first: usize },
    #[error("endpoints[{index}]: cgroups[{cgroup}] path {path:?} must start with '/'")]
    RelativeCgroupPath { index: usize, cgroup: usize, path: String },
    #[error("endpoints[{index}]: identity {identity} is also given coverage by endpoints[{first}] differently")]
    InconsistentCoverage { index: usize, identity: Identity, first: usize },
    #[error("rules[{index}]: local identity {identity} has no endpoint on this node")]
    NoSuchEndpoint { index: usize, identity: Identity },
    #[error("rules[{index}]: port 0 is not a port (use any)")]
    ZeroPort { index: usize },
    #[error("rules[{index}]: a port needs a protocol")]
    PortWithoutProtocol { index: usize },
    #[error("rules[{index}]: rule_id 0 is reserved for default deny")]
    ZeroRuleId { index: usize },
    #[error("rules[{index}]: rule_id {rule_id} has no rule_refs entry")]
    UnknownRuleId { index: usize, rule_id: u32 },
    #[error("rules[{index}]: same key as rules[{first}]")]
    DuplicateRule { index: usize, first: usize },
    #[error("rule_refs[{index}]: rule_id {rule_id} is listed twice")]
    DuplicateRuleRef { index: usize, rule_id: u32 },
    #[error("rules[{index}]: HTTP rules need an ingress TCP entry (they judge requests arriving at the server)")]
    HttpNotIngressTcp { index: usize },
    #[error("rules[{index}].http[{rule}]: {error}")]
    InvalidHttpRule { index: usize, rule: usize, error: HttpRuleError },
}

/// How one direction of a new connection decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum RuleVerdict {
    /// The local workload is not managed here, or no policy covers the direction.
    NotCovered,
    /// An allow entry matched.
    Allowed { rule_id: u32 },
    /// Covered and nothing matched: audit (monitor) or drop (enforce).
    DefaultDeny,
}

impl RuleVerdict {
    pub fn allows(self) -> bool {
        !matches!(self, RuleVerdict::DefaultDeny)
    }
}

/// A wildcard probe: which key fields are replaced by "any".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub any_peer: bool,
    pub any_port: bool,
    pub any_protocol: bool,
}

impl NodePolicy {
    /// The order in which the datapath probes the rule hash after the ipcache gave the
    /// peer identity: exact, then any port, then any port and protocol — first with the
    /// peer, then with any peer. Allow entries are a union, so the order only decides
    /// which `rule_id` a verdict names, never whether it allows; six probes whatever
    /// the number of rules.
    pub const PROBE_ORDER: [Probe; 6] = [
        Probe { any_peer: false, any_port: false, any_protocol: false },
        Probe { any_peer: false, any_port: true, any_protocol: false },
        Probe { any_peer: false, any_port: true, any_protocol: true },
        Probe { any_peer: true, any_port: false, any_protocol: false },
        Probe { any_peer: true, any_port: true, any_protocol: false },
        Probe { any_peer: true, any_port: true, any_protocol: true },
    ];

    /// Checks everything an enforcer relies on; see [`NodePolicyError`] and the `MAX_*`
    /// limits of this module.
    pub fn validate(&self) -> Result<(), NodePolicyError> {
        if self.version == 0 {
            return Err(NodePolicyError::ZeroVersion);
        }
        too_many("ipcache", self.ipcache.len(), MAX_IPCACHE_ENTRIES)?;
        too_many("endpoints", self.endpoints.len(), MAX_ENDPOINTS)?;
        too_many("rules", self.rules.len(), MAX_RULES)?;
        too_many("rule_refs", self.rule_refs.len(), MAX_RULE_REFS)?;

        let mut known: BTreeSet<Identity> = ReservedIdentity::ALL.into_iter().map(Identity::from).collect();
        let mut prefixes: BTreeMap<IpNet, Identity> = BTreeMap::new();
        for (index, e) in self.ipcache.iter().enumerate() {
            let canonical = e.prefix.trunc();
            if canonical != e.prefix {
                return Err(NodePolicyError::NonCanonicalPrefix { index, prefix: e.prefix, canonical });
            }
            if e.identity.0 == 0 {
                return Err(NodePolicyError::ZeroIdentity { field: format!("ipcache[{index}]") });
            }
            if let Some(first) = prefixes.insert(e.prefix, e.identity) {
                return Err(NodePolicyError::ConflictingPrefix { index, prefix: e.prefix, first, second: e.identity });
            }
            known.insert(e.identity);
        }

        let mut cgroups: BTreeMap<u64, usize> = BTreeMap::new();
        let mut netns: BTreeMap<u64, usize> = BTreeMap::new();
        let mut coverage: BTreeMap<Identity, (usize, bool, bool)> = BTreeMap::new();
        for (index, e) in self.endpoints.iter().enumerate() {
            if e.identity.0 == 0 {
                return Err(NodePolicyError::ZeroIdentity { field: format!("endpoints[{index}]") });
            }
            if e.mode == RolloutMode::Learn {
                return Err(NodePolicyError::LearnEndpoint { index });
            }
            if e.cgroups.is_empty() && e.netns_ino.is_none() {
                return Err(NodePolicyError::EmptyEndpoint { index });
            }
            too_many("endpoints[].cgroups", e.cgroups.len(), MAX_CGROUPS_PER_ENDPOINT)?;
            if let Some(name) = &e.netns_name {
                too_long(format!("endpoints[{index}].netns_name"), name, MAX_NAME_LEN)?;
            }
            if let Some(ino) = e.netns_ino
                && let Some(first) = netns.insert(ino, index)
            {
                return Err(NodePolicyError::DuplicateNetns { index, netns_ino: ino, first });
            }
            for (cgroup, c) in e.cgroups.iter().enumerate() {
                too_long(format!("endpoints[{index}].cgroups[{cgroup}].path"), &c.path, MAX_CGROUP_PATH_LEN)?;
                if !c.path.starts_with('/') {
                    return Err(NodePolicyError::RelativeCgroupPath { index, cgroup, path: c.path.clone() });
                }
                if let Some(first) = cgroups.insert(c.cgroup_id, index) {
                    return Err(NodePolicyError::DuplicateCgroup { index, cgroup_id: c.cgroup_id, first });
                }
            }
            let slot = coverage.entry(e.identity).or_insert((index, e.ingress_covered, e.egress_covered));
            if (slot.1, slot.2) != (e.ingress_covered, e.egress_covered) {
                return Err(NodePolicyError::InconsistentCoverage { index, identity: e.identity, first: slot.0 });
            }
            known.insert(e.identity);
        }

        let mut ref_ids: BTreeSet<u32> = BTreeSet::new();
        for (index, r) in self.rule_refs.iter().enumerate() {
            too_long(format!("rule_refs[{index}].policy_name"), &r.policy_name, MAX_NAME_LEN)?;
            if !ref_ids.insert(r.rule_id) {
                return Err(NodePolicyError::DuplicateRuleRef { index, rule_id: r.rule_id });
            }
        }

        let mut keys: BTreeMap<RuleKey, usize> = BTreeMap::new();
        for (index, r) in self.rules.iter().enumerate() {
            let k = &r.key;
            if !coverage.contains_key(&k.local) {
                return Err(NodePolicyError::NoSuchEndpoint { index, identity: k.local });
            }
            if let Some(peer) = k.peer {
                if peer.0 == 0 {
                    return Err(NodePolicyError::ZeroIdentity { field: format!("rules[{index}].peer") });
                }
                if !known.contains(&peer) {
                    return Err(NodePolicyError::UnknownIdentity {
                        field: format!("rules[{index}].peer"),
                        identity: peer,
                    });
                }
            }
            if k.port == Some(0) {
                return Err(NodePolicyError::ZeroPort { index });
            }
            if k.port.is_some() && k.protocol.is_none() {
                return Err(NodePolicyError::PortWithoutProtocol { index });
            }
            if r.rule_id == 0 {
                return Err(NodePolicyError::ZeroRuleId { index });
            }
            if !ref_ids.contains(&r.rule_id) {
                return Err(NodePolicyError::UnknownRuleId { index, rule_id: r.rule_id });
            }
            if !r.http.is_empty() {
                if k.direction != Direction::Ingress || k.protocol.is_some_and(|p| p != Protocol::Tcp) {
                    return Err(NodePolicyError::HttpNotIngressTcp { index });
                }
                too_many("rules[].http", r.http.len(), MAX_HTTP_RULES_PER_ENTRY)?;
                for (rule, h) in r.http.iter().enumerate() {
                    h.validate().map_err(|error| NodePolicyError::InvalidHttpRule { index, rule, error })?;
                }
            }
            if let Some(first) = keys.insert(*k, index) {
                return Err(NodePolicyError::DuplicateRule { index, first });
            }
        }
        Ok(())
    }

    /// Lookup structures for [`NodePolicyIndex::decide`] (tests, the enforcer's
    /// user-space reference, the learner's "what would this node do?").
    pub fn index(&self) -> NodePolicyIndex<'_> {
        NodePolicyIndex {
            policy: self,
            prefixes: self.ipcache.iter().map(|e| (e.prefix, e.identity)).collect(),
            endpoints: self.endpoints.iter().map(|e| (e.identity, e)).collect(),
            rules: self.rules.iter().map(|r| (r.key, r.rule_id)).collect(),
        }
    }

    /// The same content with another version: what "did the policy change?" compares.
    pub fn content_eq(&self, other: &NodePolicy) -> bool {
        self.ipcache == other.ipcache
            && self.endpoints == other.endpoints
            && self.rules == other.rules
            && self.rule_refs == other.rule_refs
    }
}

fn too_many(field: &'static str, len: usize, max: usize) -> Result<(), NodePolicyError> {
    if len > max { Err(NodePolicyError::TooMany { field, len, max }) } else { Ok(()) }
}

fn too_long(field: String, s: &str, max: usize) -> Result<(), NodePolicyError> {
    if s.len() > max { Err(NodePolicyError::TooLong { field, len: s.len(), max }) } else { Ok(()) }
}

/// A [`NodePolicy`] with its lookups built: the reference semantics of the datapath.
#[derive(Debug)]
pub struct NodePolicyIndex<'a> {
    policy: &'a NodePolicy,
    prefixes: BTreeMap<IpNet, Identity>,
    endpoints: BTreeMap<Identity, &'a PolicyEndpoint>,
    rules: BTreeMap<RuleKey, u32>,
}

impl NodePolicyIndex<'_> {
    pub fn policy(&self) -> &NodePolicy {
        self.policy
    }

    /// The identity of `addr`: the longest ipcache prefix containing it, else world.
    pub fn identity_of(&self, addr: IpAddr) -> Identity {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (0..=max)
            .rev()
            .find_map(|len| {
                let net = IpNet::new(addr, len).ok()?.trunc();
                self.prefixes.get(&net).copied()
            })
            .unwrap_or(Identity::WORLD)
    }

    /// How direction `direction` of a new connection of the local workload `local`
    /// with `peer` on `port`/`protocol` decides, probing in [`NodePolicy::PROBE_ORDER`].
    pub fn decide(
        &self,
        local: Identity,
        direction: Direction,
        peer: Identity,
        port: u16,
        protocol: Protocol,
    ) -> RuleVerdict {
        let Some(ep) = self.endpoints.get(&local) else { return RuleVerdict::NotCovered };
        if !ep.covered(direction) {
            return RuleVerdict::NotCovered;
        }
        for probe in NodePolicy::PROBE_ORDER {
            let key = RuleKey {
                local,
                direction,
                peer: (!probe.any_peer).then_some(peer),
                port: (!probe.any_port).then_some(port),
                protocol: (!probe.any_protocol).then_some(protocol),
            };
            if let Some(rule_id) = self.rules.get(&key) {
                return RuleVerdict::Allowed { rule_id: *rule_id };
            }
        }
        RuleVerdict::DefaultDeny
    }
}

// === what enforcers send back ===

/// An enforcer introducing itself on a `PolicyStream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcerHello {
    pub node_id: String,
    pub boot_id: String,
    pub agent_version: String,
    /// Version it enforces now (its pinned maps survive restarts); 0 = none.
    pub applied_version: u64,
}

/// Whether an enforcer applied a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAckStatus {
    Applied,
    /// Invalid or older than applied; the previous policy stays in force.
    Rejected,
}

/// An enforcer's answer to one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyAck {
    pub version: u64,
    pub status: PolicyAckStatus,
    /// Why it was rejected.
    pub error: Option<String>,
}

/// One audit or deny (or sampled allow) decision of an enforcer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictEvent {
    pub time_unix_ms: i64,
    pub cgroup_id: u64,
    pub netns_ino: u64,
    pub local_identity: Identity,
    pub peer_identity: Identity,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub peer_addr: IpAddr,
    pub peer_port: u16,
    pub protocol: Protocol,
    pub direction: Direction,
    pub verdict: crate::Verdict,
    /// The deciding rule; `None` = default deny of the covered direction. On an
    /// audit or denied event it is an L7 rule that allowed the connection but none of
    /// whose HTTP rules matched a request on it (allow rules never deny otherwise).
    pub rule_id: Option<u32>,
    /// Further events of the same kind the kernel's rate limit folded into this one.
    pub suppressed: u64,
    /// For an HTTP verdict (an L7 rule's connection carried a request none of its HTTP
    /// rules matched): the request line as the kernel read it, so an analyst sees
    /// *what* was refused, not just that something was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRequestLine>,
}

/// The request line of an HTTP verdict, as the enforcer's kernel program read it from
/// the segment. Attacker-controlled bytes: kept to visible ASCII (others escaped) and
/// bounded, so every consumer can print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRequestLine {
    /// Upper-case token; empty when the segment did not start with a request line
    /// (judged as a request matching nothing, e.g. a first request split across
    /// segments).
    pub method: String,
    /// Without the query string; visible ASCII, other bytes escaped as `\xNN`.
    pub path: String,
    /// The path went on past what the kernel reads ([`MAX_HTTP_LINE_PATH_BYTES`]).
    pub truncated: bool,
}

/// Path bytes an enforcer reads of a request line: the model's 128-byte path limit
/// plus what tells an exact path from a longer one.
pub const MAX_HTTP_LINE_PATH_BYTES: usize = 130;

impl HttpRequestLine {
    /// From the kernel's bytes: `method` up to its first 0; `path` up to a 0 (the
    /// end of the path) or 0xff (the segment or the read ended first: truncated).
    pub fn from_kernel(method: &[u8], path: &[u8]) -> Self {
        let method: String = method
            .iter()
            .take_while(|&&b| b != 0)
            .take(crate::MAX_HTTP_METHOD_LEN)
            .filter(|b| b.is_ascii_uppercase())
            .map(|&b| char::from(b))
            .collect();
        let end = path.iter().position(|&b| b == 0 || b == 0xff);
        let truncated = end.is_none_or(|i| path[i] == 0xff);
        let bytes = &path[..end.unwrap_or(path.len()).min(MAX_HTTP_LINE_PATH_BYTES)];
        Self { method, path: escape_path(bytes), truncated }
    }

    /// Checks what came over the wire against what [`Self::from_kernel`] makes.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.method.len() > crate::MAX_HTTP_METHOD_LEN || !self.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("method must be at most 16 upper-case letters");
        }
        if self.path.len() > 4 * MAX_HTTP_LINE_PATH_BYTES || !self.path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("path must be at most 520 bytes of visible ASCII");
        }
        Ok(())
    }
}

/// How every surface (CLI tables, pages) writes it: `PUT /v1/exhaust-port`, `(not a
/// request line)` when the segment did not start with one, and a `…` suffix when the
/// path went on past what the kernel reads. Plain text: whoever prints it escapes it
/// for its medium (the path is attacker-chosen).
impl std::fmt::Display for HttpRequestLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.method.is_empty() {
            return f.write_str("(not a request line)");
        }
        let more = if self.truncated { "…" } else { "" };
        write!(f, "{} {}{more}", self.method, self.path)
    }
}

/// Visible ASCII as is (a backslash doubled, so an escape is unambiguous), anything
/// else as `\xNN`.
fn escape_path(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            0x21..=0x7e => out.push(char::from(b)),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// Hits of one rule under a policy version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounter {
    pub rule_id: u32,
    /// Since the enforcer's previous report (a delta the learner adds up).
    pub hits: u64,
    pub last_hit_unix_ms: i64,
}

/// What an enforcer lost, cumulative for its boot. Loss is reported, never silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcerLoss {
    pub ringbuf_dropped: u64,
    pub queue_dropped: u64,
    pub conntrack_full: u64,
}

/// Verdicts and counters since the enforcer's previous report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictReport {
    /// The version whose rule ids `events` and `rule_counters` use.
    pub policy_version: u64,
    pub events: Vec<VerdictEvent>,
    pub rule_counters: Vec<RuleCounter>,
    pub loss: EnforcerLoss,
    /// When the enforcer sent it (its clock; 0 = unknown): the learner's clock-skew
    /// measurement.
    pub sent_unix_ms: i64,
}

/// One message of an enforcer on its `PolicyStream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EnforcerMessage {
    Hello(EnforcerHello),
    Ack(PolicyAck),
    Report(VerdictReport),
}

impl fmt::Display for RuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peer = self.peer.map_or_else(|| "any".to_owned(), |p| p.to_string());
        let port = self.port.map_or_else(|| "any".to_owned(), |p| p.to_string());
        let proto = self.protocol.map_or("any", Protocol::as_str);
        write!(f, "{} {} {peer} {port}/{proto}", self.local, self.direction.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NodePolicy {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        NodePolicy {
            version: 1,
            ipcache: vec![
                IpcacheEntry { prefix: net("10.0.0.0/8"), identity: Identity(LOCAL_IDENTITY_FIRST) },
                IpcacheEntry { prefix: net("10.0.0.1/32"), identity: Identity(256) },
                IpcacheEntry { prefix: net("10.0.0.2/32"), identity: Identity(257) },
            ],
            endpoints: vec![PolicyEndpoint {
                identity: Identity(257),
                netns_ino: Some(4026532000),
                netns_name: Some("bh-deathstar".into()),
                cgroups: vec![EndpointCgroup { cgroup_id: 77, path: "/bulkhead/deathstar".into() }],
                mode: RolloutMode::Enforce,
                ingress_covered: true,
                egress_covered: false,
            }],
            rules: vec![NodeRule {
                key: RuleKey {
                    local: Identity(257),
                    direction: Direction::Ingress,
                    peer: Some(Identity(256)),
                    port: Some(80),
                    protocol: Some(Protocol::Tcp),
                },
                rule_id: 1,
                http: Vec::new(),
            }],
            rule_refs: vec![RuleRef {
                rule_id: 1,
                proposal_id: 9,
                policy_name: "bulkhead-deathstar".into(),
                direction: Direction::Ingress,
                rule_index: 0,
            }],
        }
    }

    #[test]
    fn sample_is_valid_and_decides() {
        let p = sample();
        p.validate().expect("valid");
        let ix = p.index();
        let tie = ix.identity_of("10.0.0.1".parse().expect("ip"));
        assert_eq!(tie, Identity(256));
        assert_eq!(ix.identity_of("10.9.9.9".parse().expect("ip")), Identity(LOCAL_IDENTITY_FIRST));
        assert_eq!(ix.identity_of("192.0.2.1".parse().expect("ip")), Identity::WORLD);
        let ds = Identity(257);
        assert_eq!(ix.decide(ds, Direction::Ingress, tie, 80, Protocol::Tcp), RuleVerdict::Allowed { rule_id: 1 });
        assert_eq!(ix.decide(ds, Direction::Ingress, tie, 81, Protocol::Tcp), RuleVerdict::DefaultDeny);
        assert_eq!(ix.decide(ds, Direction::Egress, tie, 81, Protocol::Tcp), RuleVerdict::NotCovered);
        assert_eq!(ix.decide(tie, Direction::Ingress, ds, 80, Protocol::Tcp), RuleVerdict::NotCovered);
    }

    #[test]
    fn wildcards_are_probed() {
        let mut p = sample();
        p.rules[0].key.peer = None;
        p.rules[0].key.port = None;
        let ix = p.index();
        assert_eq!(
            ix.decide(Identity(257), Direction::Ingress, Identity::WORLD, 443, Protocol::Tcp),
            RuleVerdict::Allowed { rule_id: 1 }
        );
        assert_eq!(
            ix.decide(Identity(257), Direction::Ingress, Identity::WORLD, 443, Protocol::Udp),
            RuleVerdict::DefaultDeny
        );
    }

    #[test]
    fn each_defect_is_named() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        type Case = (&'static str, fn(&mut NodePolicy), NodePolicyError);
        let cases: Vec<Case> = vec![
            ("zero version", |p| p.version = 0, NodePolicyError::ZeroVersion),
            (
                "unknown peer",
                |p| p.rules[0].key.peer = Some(Identity(999)),
                NodePolicyError::UnknownIdentity { field: "rules[0].peer".into(), identity: Identity(999) },
            ),
            (
                "rule without endpoint",
                |p| p.rules[0].key.local = Identity(256),
                NodePolicyError::NoSuchEndpoint { index: 0, identity: Identity(256) },
            ),
            (
                "duplicate rule",
                |p| {
                    let r = p.rules[0].clone();
                    p.rules.push(r);
                },
                NodePolicyError::DuplicateRule { index: 1, first: 0 },
            ),
            ("port 0", |p| p.rules[0].key.port = Some(0), NodePolicyError::ZeroPort { index: 0 }),
            (
                "port without protocol",
                |p| p.rules[0].key.protocol = None,
                NodePolicyError::PortWithoutProtocol { index: 0 },
            ),
            ("rule id 0", |p| p.rules[0].rule_id = 0, NodePolicyError::ZeroRuleId { index: 0 }),
            (
                "unreferenced rule id",
                |p| p.rules[0].rule_id = 5,
                NodePolicyError::UnknownRuleId { index: 0, rule_id: 5 },
            ),
            (
                "learn endpoint",
                |p| p.endpoints[0].mode = RolloutMode::Learn,
                NodePolicyError::LearnEndpoint { index: 0 },
            ),
            (
                "empty endpoint",
                |p| {
                    p.endpoints[0].cgroups.clear();
                    p.endpoints[0].netns_ino = None;
                },
                NodePolicyError::EmptyEndpoint { index: 0 },
            ),
            (
                "duplicate rule ref",
                |p| {
                    let r = p.rule_refs[0].clone();
                    p.rule_refs.push(r);
                },
                NodePolicyError::DuplicateRuleRef { index: 1, rule_id: 1 },
            ),
        ];
        for (what, mutate, want) in cases {
            let mut p = sample();
            mutate(&mut p);
            assert_eq!(p.validate(), Err(want), "{what}");
        }

        let mut p = sample();
        p.ipcache.push(IpcacheEntry { prefix: net("10.0.0.1/32"), identity: Identity(300) });
        assert_eq!(
            p.validate(),
            Err(NodePolicyError::ConflictingPrefix {
                index: 3,
                prefix: net("10.0.0.1/32"),
                first: Identity(256),
                second: Identity(300)
            })
        );
        let mut p = sample();
        p.ipcache[0].prefix = net("10.1.2.3/8");
        assert!(matches!(p.validate(), Err(NodePolicyError::NonCanonicalPrefix { index: 0, .. })));
        let mut p = sample();
        p.rules = vec![p.rules[0].clone(); MAX_RULES + 1];
        assert_eq!(p.validate(), Err(NodePolicyError::TooMany { field: "rules", len: MAX_RULES + 1, max: MAX_RULES }));
    }

    #[test]
    fn round_trips_through_json() {
        let p = sample();
        let json = serde_json::to_string(&p).expect("serializes");
        let back: NodePolicy = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, p);
    }
}
