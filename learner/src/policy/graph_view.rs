//! The service graph as analysts see it (`/api/v1/graph`, the `/graph` page): nodes,
//! edges between them, and the colour of each edge. Pure: the store folds edges into
//! buckets (`store::graph`), this module decides what each bucket means and how the
//! buckets become the edges that are drawn.
//!
//! An edge's **verdict class**, most severe first:
//! * `denied` — enforcers reported drops for it in the range (or, with no events, a
//!   policy in force on an *enforcing* workload does not allow it: it would be dropped);
//! * `audit` — enforcers reported would-deny events (monitor mode), or a policy of a
//!   workload that does not enforce yet does not allow it (would be denied once
//!   enforced; `basis: policy` tells the two apart);
//! * `nopolicy` — no active policy covers either end in the direction that matters;
//! * `allowed` — an approved or deployed policy rule allows it.
//!
//! An edge drawn between two groups (namespaces, or a workload and a namespace) folds
//! many edges; it takes the most severe class among them and says how many of its
//! port buckets are in each class.
//!
//! Whether the policy set allows an edge is decided here from label selectors, per
//! (source, destination, port, protocol). [`CoverageCache`] remembers those decisions
//! for as long as everything they depend on (the policies in force, the identities,
//! which workloads enforce) is *equal* to what they were computed from, compared value
//! by value on every use, so an approval or a rollout change is seen by the very next
//! request (by key, and by position in the last edge list folded whole, which the next
//! fold of that list reads without a hash lookup). [`fold_edges`] then folds a range's
//! edges into per-port buckets between groups in one pass.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bulkhead_model::{Direction, Edge, EdgeKey, Identity, Labels, Policy, ProposalStatus, Protocol, RolloutMode};
use bulkhead_synth::{Connection, Evaluator, IdentityInfo, SideVerdict};
use serde::Serialize;

/// Most nodes drawn; past it the graph falls back to a table.
pub const MAX_NODES: usize = 2_000;
/// Most edges drawn; past it the graph falls back to a table.
pub const MAX_EDGES: usize = 10_000;
/// Edges listed (largest first) when the graph is too large to draw.
pub const TRUNCATED_EDGES: usize = 500;
/// Ports named on an edge (the busiest); the rest are counted.
pub const TOP_PORTS: usize = 4;

// === verdict classes ===

/// How an edge is drawn. Ordered by severity (`max` is the worst).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictClass {
    Allowed,
    #[serde(rename = "nopolicy")]
    NoPolicy,
    Audit,
    Denied,
}

impl VerdictClass {
    pub const ALL: [VerdictClass; 4] =
        [VerdictClass::Allowed, VerdictClass::Audit, VerdictClass::Denied, VerdictClass::NoPolicy];

    pub fn as_str(self) -> &'static str {
        match self {
            VerdictClass::Allowed => "allowed",
            VerdictClass::NoPolicy => "nopolicy",
            VerdictClass::Audit => "audit",
            VerdictClass::Denied => "denied",
        }
    }

    /// What the class means, for legends and tooltips.
    pub fn describe(self) -> &'static str {
        match self {
            VerdictClass::Allowed => "allowed by an approved or deployed policy",
            VerdictClass::NoPolicy => "no policy covers it",
            VerdictClass::Audit => "would be denied (monitor: audit events, or predicted from the policy)",
            VerdictClass::Denied => "denied by an enforcer (or predicted: the policy is enforced)",
        }
    }
}

impl fmt::Display for VerdictClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the active policy set says about one connection tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// No policy selecting either end covers the direction that matters.
    NotCovered,
    /// A covering side's rule allows it, and no covering side denies it.
    Allowed,
    /// A side is covered and none of its rules allows it; `enforced`: that side's
    /// workload is in enforce mode (the traffic is dropped, not just reported).
    DefaultDeny { enforced: bool },
}

impl Coverage {
    fn rank(self) -> u8 {
        match self {
            Coverage::Allowed => 0,
            Coverage::NotCovered => 1,
            Coverage::DefaultDeny { enforced: false } => 2,
            Coverage::DefaultDeny { enforced: true } => 3,
        }
    }

    /// The less permissive of two (a bucket folding several edges is as bad as its worst).
    pub fn worst(self, other: Coverage) -> Coverage {
        if other.rank() > self.rank() { other } else { self }
    }
}

/// Audit and deny events enforcers reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Observed {
    pub audit: u64,
    pub denied: u64,
}

impl Observed {
    pub fn add(&mut self, other: Observed) {
        self.audit = self.audit.saturating_add(other.audit);
        self.denied = self.denied.saturating_add(other.denied);
    }
}

/// Where a class came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Basis {
    /// No policy, no events.
    None,
    /// The active policy set (allowed, or predicted would-deny).
    Policy,
    /// Enforcers' verdict events.
    Events,
}

/// The class of one connection tuple (or bucket) from what enforcers reported and what
/// the policy set says. Events win: they are what happened.
pub fn classify(observed: Observed, coverage: Coverage) -> (VerdictClass, Basis) {
    if observed.denied > 0 {
        return (VerdictClass::Denied, Basis::Events);
    }
    if observed.audit > 0 {
        return (VerdictClass::Audit, Basis::Events);
    }
    match coverage {
        Coverage::Allowed => (VerdictClass::Allowed, Basis::Policy),
        Coverage::DefaultDeny { enforced: true } => (VerdictClass::Denied, Basis::Policy),
        Coverage::DefaultDeny { enforced: false } => (VerdictClass::Audit, Basis::Policy),
        Coverage::NotCovered => (VerdictClass::NoPolicy, Basis::None),
    }
}

/// What the policy set of `ev` says about `c`. `enforcing(id)`: whether that workload is
/// in enforce mode.
///
/// Without addresses (graph edges only know the `world` identity, not which outside
/// address), a side that allows *some* outside addresses on the port through a CIDR,
/// CIDR-group or DNS rule counts as allowing the edge: the edge stands for all of them.
pub fn coverage(
    ev: &Evaluator<'_>,
    c: &Connection,
    external_peer: bool,
    enforcing: impl Fn(Identity) -> bool,
) -> Coverage {
    let d = ev.decide(c);
    let sides = [
        (&d.egress, c.src, Direction::Egress, c.dst_addr.is_none()),
        (&d.ingress, c.dst, Direction::Ingress, c.src_addr.is_none()),
    ];
    let mut denied: Option<bool> = None;
    let mut allowed = false;
    for (verdict, local, dir, no_addr) in sides {
        match verdict {
            SideVerdict::NotCovered => {}
            SideVerdict::Allowed { .. } => allowed = true,
            SideVerdict::DefaultDeny { .. } => {
                if external_peer && no_addr && external_rule_allows(ev, local, dir, c.protocol, c.dst_port) {
                    allowed = true;
                } else {
                    denied = Some(denied.unwrap_or(false) || enforcing(local));
                }
            }
        }
    }
    match (denied, allowed) {
        (Some(enforced), _) => Coverage::DefaultDeny { enforced },
        (None, true) => Coverage::Allowed,
        (None, false) => Coverage::NotCovered,
    }
}

/// Whether a policy selecting `local` has a `dir` rule towards outside addresses (CIDR,
/// CIDR group, DNS name, world) that allows the port.
fn external_rule_allows(ev: &Evaluator<'_>, local: Identity, dir: Direction, protocol: Protocol, port: u16) -> bool {
    let policies = ev.policies();
    ev.selecting(local)
        .iter()
        .filter_map(|&n| policies.get(n))
        .filter_map(|p| p.rules(dir))
        .flatten()
        .any(|r| r.peer.is_external() && r.allows_port(protocol, port))
}

// === remembered coverage ===

/// Decisions kept at most (edges plus verdict-event tuples); past it the cache starts
/// over rather than grow without bound.
const MAX_CACHED_DECISIONS: usize = 4_000_000;

/// What [`coverage`] read besides the connection: the policies in force, every
/// identity's facts (labels, kind, name: CIDR-group peers match by name), and the
/// workloads that enforce.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CoverageInputs {
    policies: Vec<Policy>,
    identities: Vec<IdentityInfo>,
    enforcing: Vec<Identity>,
}

/// Coverage decisions for one set of inputs.
#[derive(Debug)]
pub struct CoverageGeneration {
    inputs: CoverageInputs,
    decided: RwLock<HashMap<EdgeKey, Coverage>>,
    /// The last list folded by position (see [`CoverageGeneration::with`]): its name
    /// and a decision per position.
    by_position: Mutex<Option<(u64, Vec<Option<Coverage>>)>>,
}

/// Asks about one edge: its key, and its position in the list being folded (`None`: not
/// from that list).
pub type CoverageLookup<'a> = dyn FnMut(Option<usize>, &EdgeKey) -> Coverage + 'a;

/// Coverage decisions shared by requests (see the module docs). Holds one generation:
/// the inputs of the newest request that asked.
#[derive(Debug, Default)]
pub struct CoverageCache {
    current: Mutex<Option<Arc<CoverageGeneration>>>,
}

impl CoverageCache {
    /// The generation for exactly these inputs (`enforcing` in any order): the kept one
    /// when every input is equal, else a new, empty one that replaces it.
    pub fn generation(
        &self,
        policies: &[Policy],
        identities: &[IdentityInfo],
        enforcing: impl IntoIterator<Item = Identity>,
    ) -> Arc<CoverageGeneration> {
        let mut enforcing: Vec<Identity> = enforcing.into_iter().collect();
        enforcing.sort_unstable();
        enforcing.dedup();
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(g) = current.as_ref()
            && g.inputs.policies == policies
            && g.inputs.identities == identities
            && g.inputs.enforcing == enforcing
        {
            return g.clone();
        }
        let g = Arc::new(CoverageGeneration {
            inputs: CoverageInputs { policies: policies.to_vec(), identities: identities.to_vec(), enforcing },
            decided: RwLock::new(HashMap::new()),
            by_position: Mutex::new(None),
        });
        *current = Some(g.clone());
        g
    }
}

impl CoverageGeneration {
    /// Runs `f` with a lookup that answers from the remembered decisions and asks
    /// `decide` for the others (remembered when `f` returns). `decide` must be the
    /// decision for this generation's inputs.
    ///
    /// `list` names the edge list whose positions `f` passes: a name under which every
    /// position always holds the same edge key (the list may grow at the end). Its
    /// decisions are then remembered by position too, so the next fold of that list
    /// finds each by index instead of a hash lookup (at 100k edges the lookups were most
    /// of a fold's time). Without a name, positions are ignored. Only the last named
    /// list is kept; concurrent folds of it each start from what was kept.
    pub fn with<R>(
        &self,
        list: Option<u64>,
        decide: impl Fn(&EdgeKey) -> Coverage,
        f: impl FnOnce(&mut CoverageLookup<'_>) -> R,
    ) -> R {
        let mut slots = match list {
            Some(name) => match self.by_position.lock().unwrap_or_else(PoisonError::into_inner).take() {
                Some((kept, slots)) if kept == name => slots,
                _ => Vec::new(),
            },
            None => Vec::new(),
        };
        let mut new: Vec<(EdgeKey, Coverage)> = Vec::new();
        let out = {
            let known = self.decided.read().unwrap_or_else(PoisonError::into_inner);
            let mut lookup = |at: Option<usize>, k: &EdgeKey| {
                let at = at.filter(|_| list.is_some());
                if let Some(c) = at.and_then(|i| slots.get(i).copied().flatten()) {
                    return c;
                }
                let c = match known.get(k) {
                    Some(c) => *c,
                    None => {
                        let c = decide(k);
                        new.push((*k, c));
                        c
                    }
                };
                if let Some(i) = at {
                    if slots.len() <= i {
                        slots.resize(i + 1, None);
                    }
                    slots[i] = Some(c);
                }
                c
            };
            f(&mut lookup)
        };
        if let Some(name) = list {
            *self.by_position.lock().unwrap_or_else(PoisonError::into_inner) = Some((name, slots));
        }
        if !new.is_empty() {
            let mut decided = self.decided.write().unwrap_or_else(PoisonError::into_inner);
            if decided.len() + new.len() > MAX_CACHED_DECISIONS {
                decided.clear();
            }
            decided.extend(new);
        }
        out
    }
}

// === folding edges into groups ===

/// One identity's place in a grouping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// The caller's group number (an index into its own node list).
    pub group: u32,
    /// Edges *from* it need a policy decision (a policy covers its egress).
    pub decide_src: bool,
    /// Edges *to* it need a policy decision (a policy covers its ingress).
    pub decide_dst: bool,
    /// Scoped folds keep only edges with an in-scope member on either end.
    pub in_scope: bool,
}

/// Identities' places in a grouping. Looked up twice per edge, so by index where
/// identity numbers are dense (allocated ones count up from 256), hashed above that.
#[derive(Debug, Clone, Default)]
pub struct Members {
    dense: Vec<Option<Member>>,
    sparse: HashMap<Identity, Member>,
}

/// Identity numbers below this are looked up by index (at most 16 MiB of slots).
const DENSE_IDENTITIES: u32 = 1 << 20;

impl Members {
    pub fn insert(&mut self, id: Identity, m: Member) {
        if id.0 < DENSE_IDENTITIES {
            let i = id.0 as usize;
            if self.dense.len() <= i {
                self.dense.resize(i + 1, None);
            }
            self.dense[i] = Some(m);
        } else {
            self.sparse.insert(id, m);
        }
    }

    pub fn get(&self, id: Identity) -> Option<Member> {
        match self.dense.get(id.0 as usize) {
            Some(m) => *m,
            None if id.0 < DENSE_IDENTITIES => None,
            None => self.sparse.get(&id).copied(),
        }
    }

    /// Every member, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Identity, Member)> + '_ {
        let dense = self.dense.iter().enumerate().filter_map(|(i, m)| m.map(|m| (Identity(i as u32), m)));
        dense.chain(self.sparse.iter().map(|(id, m)| (*id, *m)))
    }
}

/// A port bucket between two groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub src_group: u32,
    pub dst_group: u32,
    pub protocol: Protocol,
    pub dst_port: u16,
}

/// Per bucket: its traffic and the least permissive coverage among its edges.
pub type Buckets = HashMap<BucketKey, (Traffic, Coverage)>;

/// How many drawn edges and nodes a grouping of a range's edges makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupedSize {
    /// Distinct (source group, destination group) pairs with an edge.
    pub pairs: u64,
    /// Distinct groups on either end of those.
    pub groups: u64,
}

/// Whether `e` is part of the grouping: both ends are members and, `scoped`, one of
/// them is in scope. Returns the two members.
fn members_of(e: &Edge, members: &Members, scoped: bool) -> Option<(Member, Member)> {
    let s = members.get(e.key.src)?;
    let d = members.get(e.key.dst)?;
    (!scoped || s.in_scope || d.in_scope).then_some((s, d))
}

/// Measures the grouping of `edges` without folding it (sorts instead of hashing: at
/// the workload level every edge is its own pair).
pub fn grouped_size(edges: &[Edge], members: &Members, scoped: bool) -> GroupedSize {
    let mut pairs: Vec<u64> = edges
        .iter()
        .filter_map(|e| members_of(e, members, scoped))
        .map(|(s, d)| (u64::from(s.group) << 32) | u64::from(d.group))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut groups: Vec<u32> = pairs.iter().flat_map(|&p| [(p >> 32) as u32, p as u32]).collect();
    groups.sort_unstable();
    groups.dedup();
    GroupedSize { pairs: pairs.len() as u64, groups: groups.len() as u64 }
}

/// Folds `edges` into buckets between the groups of `members` (edges with an identity
/// the grouping does not list are left out). `coverage` is asked (with the edge's
/// position in `edges`) only for edges with an end whose direction a policy covers (see
/// [`Member`]); every other edge is [`Coverage::NotCovered`]. Counters add up
/// saturating at i64::MAX, like stored ones.
pub fn fold_edges(edges: &[Edge], members: &Members, scoped: bool, coverage: &mut CoverageLookup<'_>) -> Buckets {
    const CAP: u64 = i64::MAX as u64;
    let mut buckets = Buckets::new();
    for (i, e) in edges.iter().enumerate() {
        let Some((s, d)) = members_of(e, members, scoped) else { continue };
        let c = if s.decide_src || d.decide_dst { coverage(Some(i), &e.key) } else { Coverage::NotCovered };
        let key =
            BucketKey { src_group: s.group, dst_group: d.group, protocol: e.key.protocol, dst_port: e.key.dst_port };
        let (t, worst) = buckets.entry(key).or_insert((
            Traffic {
                edges: 0,
                connections: 0,
                bytes: 0,
                first_seen_unix_ms: e.first_seen_unix_ms,
                last_seen_unix_ms: e.last_seen_unix_ms,
            },
            c,
        ));
        t.edges += 1;
        t.connections = t.connections.saturating_add(e.connections).min(CAP);
        t.bytes = t.bytes.saturating_add(e.bytes).min(CAP);
        t.first_seen_unix_ms = t.first_seen_unix_ms.min(e.first_seen_unix_ms);
        t.last_seen_unix_ms = t.last_seen_unix_ms.max(e.last_seen_unix_ms);
        *worst = worst.worst(c);
    }
    buckets
}

/// The `keep` busiest edges of the grouping (most connections, then most recent, then
/// by key): what a graph too large to draw lists instead.
pub fn top_edges(edges: &[Edge], members: &Members, scoped: bool, keep: usize) -> Vec<Edge> {
    let order = |a: &Edge, b: &Edge| {
        b.connections
            .cmp(&a.connections)
            .then(b.last_seen_unix_ms.cmp(&a.last_seen_unix_ms))
            .then(a.key.src.cmp(&b.key.src))
            .then(a.key.dst.cmp(&b.key.dst))
            .then(a.key.dst_port.cmp(&b.key.dst_port))
            .then(a.key.protocol.number().cmp(&b.key.protocol.number()))
    };
    let mut top: Vec<&Edge> = edges.iter().filter(|e| members_of(e, members, scoped).is_some()).collect();
    if top.len() > keep && keep > 0 {
        top.select_nth_unstable_by(keep - 1, |a, b| order(a, b));
    }
    top.truncate(keep);
    top.sort_by(|a, b| order(a, b));
    top.into_iter().cloned().collect()
}

// === levels and node keys ===

/// How far the graph is zoomed in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GraphLevel {
    /// Namespaces (and the reserved identities) as nodes.
    #[default]
    Namespace,
    /// Workloads grouped by namespace; with a namespace: its workloads and the outside
    /// aggregated per namespace.
    Workload,
    /// One workload's endpoints (pods, containers, hosts) and its peers, from flows.
    Endpoint,
}

impl GraphLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            GraphLevel::Namespace => "namespace",
            GraphLevel::Workload => "workload",
            GraphLevel::Endpoint => "endpoint",
        }
    }
}

impl FromStr for GraphLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "namespace" => Ok(GraphLevel::Namespace),
            "workload" => Ok(GraphLevel::Workload),
            "endpoint" => Ok(GraphLevel::Endpoint),
            other => Err(format!("level must be namespace, workload or endpoint, not {other:?}")),
        }
    }
}

/// What a node stands for; its `id()` is the node id the page and tests see.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKey {
    /// A namespace (its workloads folded together), or a compound parent.
    Namespace(String),
    /// Managed workloads without a namespace label, folded together.
    NoNamespace,
    /// One identity: a workload, a reserved entity, a CIDR group.
    Identity(Identity),
    /// One endpoint of a workload: (node, network namespace inode).
    Endpoint { node: String, netns_ino: u64 },
    /// One outside address, or an address no endpoint snapshot names.
    Address(IpAddr),
}

impl NodeKey {
    /// The node id. Names in it are free text (namespaces, node names), so `%` and `>`
    /// are escaped: no node id contains `>`, which keeps edge ids (`<src>-><dst>`)
    /// unambiguous and distinct from every node id — Cytoscape refuses duplicate ids,
    /// and a crafted namespace name must not be able to break the graph.
    pub fn id(&self) -> String {
        match self {
            NodeKey::Namespace(ns) => format!("ns:{}", escape_id(ns)),
            NodeKey::NoNamespace => "ns-none".to_owned(),
            NodeKey::Identity(id) => format!("id:{}", id.0),
            NodeKey::Endpoint { node, netns_ino } => format!("ep:{}/{netns_ino}", escape_id(node)),
            NodeKey::Address(a) => format!("addr:{a}"),
        }
    }
}

fn escape_id(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['%', '>']) { s.replace('%', "%25").replace('>', "%3E").into() } else { s.into() }
}

/// The node an identity folds into at the namespace level: its namespace; reserved and
/// outside identities (and CIDR groups, `external`) stand alone.
pub fn namespace_key(id: Identity, labels: &Labels, external: bool) -> NodeKey {
    if id.is_reserved() || external {
        return NodeKey::Identity(id);
    }
    match labels.namespace() {
        Some(ns) => NodeKey::Namespace(ns.to_owned()),
        None => NodeKey::NoNamespace,
    }
}

/// A readable name for an identity: the first known of a given name (endpoint snapshot,
/// proposal), the namespace and app label, a reserved entity's name, the number.
pub fn identity_name(id: Identity, labels: &Labels, given: Option<&str>) -> String {
    if let Some(r) = id.reserved() {
        return r.name().to_owned();
    }
    if let Some(n) = given.filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    labels.workload_name().unwrap_or_else(|| format!("identity-{}", id.0))
}

// === the drawn graph ===

/// What kind of thing a node is (the page styles and explains each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Namespace,
    Workload,
    Endpoint,
    /// A reserved identity (host, world, …).
    Reserved,
    /// A CIDR group or an outside address.
    External,
}

/// A policy version a node links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    pub proposal_id: i64,
    pub version: u32,
    pub status: ProposalStatus,
}

/// Where clicking "drill down" on a node goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drill {
    pub level: GraphLevel,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<u32>,
}

/// A drawn node. Text fields come from labels and names (attacker-controlled): the
/// page shows them as text only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphNode {
    pub id: String,
    pub label: String,
    pub kind: NodeKind,
    /// Compound parent (a namespace, or the workload of an endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<RolloutMode>,
    /// Workloads folded into a namespace node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workloads: Option<u64>,
    /// The approved or deployed policy in force (newest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
    /// The newest proposal version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proposal: Option<PolicyRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drill: Option<Drill>,
    /// The flows page filtered to this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows_href: Option<String>,
    /// Endpoint nodes: their addresses and the node (host) they run on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl GraphNode {
    /// A node with only its identity fields set.
    pub fn new(key: &NodeKey, label: impl Into<String>, kind: NodeKind) -> Self {
        GraphNode {
            id: key.id(),
            label: label.into(),
            kind,
            parent: None,
            identity: None,
            namespace: None,
            labels: BTreeMap::new(),
            mode: None,
            workloads: None,
            policy: None,
            proposal: None,
            drill: None,
            flows_href: None,
            addresses: Vec::new(),
            host: None,
        }
    }
}

/// One port bucket of a drawn edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PortStat {
    pub port: u16,
    pub protocol: Protocol,
    pub connections: u64,
    pub verdict: VerdictClass,
}

/// Per class, how many port buckets of an edge are in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    pub allowed: u64,
    pub audit: u64,
    pub denied: u64,
    pub nopolicy: u64,
}

impl ClassCounts {
    fn add(&mut self, c: VerdictClass) {
        match c {
            VerdictClass::Allowed => self.allowed += 1,
            VerdictClass::Audit => self.audit += 1,
            VerdictClass::Denied => self.denied += 1,
            VerdictClass::NoPolicy => self.nopolicy += 1,
        }
    }
}

/// A drawn edge: everything between two nodes, over all ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GraphEdge {
    pub id: String,
    pub source: String,
    pub target: String,
    pub verdict: VerdictClass,
    pub basis: Basis,
    /// The busiest ports (at most [`TOP_PORTS`]), each with its own class.
    pub ports: Vec<PortStat>,
    /// Distinct (port, protocol) pairs in all.
    pub port_count: u64,
    /// The edge label: the busiest ports, "+N" for the rest.
    pub label: String,
    pub connections: u64,
    pub bytes: u64,
    /// Edges of the service graph folded into this one.
    pub edges: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seen_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<i64>,
    #[serde(skip_serializing_if = "is_zero")]
    pub audit_events: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub denied_events: u64,
    /// Port buckets per class, when there is more than one bucket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classes: Option<ClassCounts>,
    /// The flows page for this edge, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows_href: Option<String>,
    /// Node labels, for server-rendered tables (the JSON names nodes by id only).
    #[serde(skip)]
    pub source_label: String,
    #[serde(skip)]
    pub target_label: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One bucket as it accumulates.
#[derive(Debug, Clone, Default)]
struct Bucket {
    edges: u64,
    connections: u64,
    bytes: u64,
    first: Option<i64>,
    last: Option<i64>,
    coverage: Option<Coverage>,
    observed: Observed,
}

/// Traffic of one bucket of edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traffic {
    pub edges: u64,
    pub connections: u64,
    pub bytes: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// Collects nodes and port buckets, then folds them into drawn edges.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    nodes: Vec<(GraphNode, bool)>,
    index: HashMap<String, usize>,
    buckets: BTreeMap<(usize, usize, Protocol, u16), Bucket>,
    /// Per (source, target) node pair: the flows link of the drawn edge.
    links: HashMap<(usize, usize), String>,
}

impl GraphBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `node` (or finds the node with its id, keeping the first); `keep`: draw it
    /// even without edges. Returns its index.
    pub fn node(&mut self, node: GraphNode, keep: bool) -> usize {
        if let Some(&n) = self.index.get(&node.id) {
            self.nodes[n].1 |= keep;
            return n;
        }
        let n = self.nodes.len();
        self.index.insert(node.id.clone(), n);
        self.nodes.push((node, keep));
        n
    }

    /// Draws node `n` even without edges.
    pub fn keep(&mut self, n: usize) {
        if let Some(node) = self.nodes.get_mut(n) {
            node.1 = true;
        }
    }

    /// The index of the node with this id.
    pub fn find(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Adds traffic between two nodes on a port, with what the policy says about it
    /// (`None`: the policy was not asked, i.e. nothing covers it).
    pub fn traffic(&mut self, src: usize, dst: usize, protocol: Protocol, port: u16, t: Traffic, c: Option<Coverage>) {
        let b = self.buckets.entry((src, dst, protocol, port)).or_default();
        b.edges = b.edges.saturating_add(t.edges);
        b.connections = b.connections.saturating_add(t.connections);
        b.bytes = b.bytes.saturating_add(t.bytes);
        b.first = Some(b.first.map_or(t.first_seen_unix_ms, |f| f.min(t.first_seen_unix_ms)));
        b.last = Some(b.last.map_or(t.last_seen_unix_ms, |l| l.max(t.last_seen_unix_ms)));
        let c = c.unwrap_or(Coverage::NotCovered);
        b.coverage = Some(b.coverage.map_or(c, |old| old.worst(c)));
    }

    /// Adds verdict events between two nodes on a port (creating the bucket if the
    /// range recorded no traffic for it: a dropped connection may leave no edge).
    pub fn events(&mut self, src: usize, dst: usize, protocol: Protocol, port: u16, o: Observed, c: Option<Coverage>) {
        let b = self.buckets.entry((src, dst, protocol, port)).or_default();
        b.observed.add(o);
        if let Some(c) = c {
            b.coverage = Some(b.coverage.map_or(c, |old| old.worst(c)));
        }
    }

    /// The flows page link of the edge between two nodes (`/flows?…`); a single-port
    /// edge gets its port and protocol appended.
    pub fn link(&mut self, src: usize, dst: usize, href: String) {
        self.links.entry((src, dst)).or_insert(href);
    }

    /// Folds the buckets into drawn edges (busiest first) and returns them with the nodes
    /// that are kept or have an edge (and their parents), in insertion order.
    pub fn finish(self) -> (Vec<GraphNode>, Vec<GraphEdge>) {
        type PortBuckets = Vec<(Protocol, u16, Bucket)>;
        let mut by_pair: BTreeMap<(usize, usize), PortBuckets> = BTreeMap::new();
        for ((s, d, proto, port), b) in self.buckets {
            by_pair.entry((s, d)).or_default().push((proto, port, b));
        }
        let mut used: HashSet<usize> = self.nodes.iter().enumerate().filter(|(_, n)| n.1).map(|(i, _)| i).collect();
        let mut edges = Vec::with_capacity(by_pair.len());
        for ((s, d), buckets) in by_pair {
            used.insert(s);
            used.insert(d);
            let (src, dst) = (&self.nodes[s].0, &self.nodes[d].0);
            let mut e = GraphEdge {
                id: format!("{}->{}", src.id, dst.id),
                source: src.id.clone(),
                target: dst.id.clone(),
                verdict: VerdictClass::Allowed,
                basis: Basis::None,
                ports: Vec::new(),
                port_count: buckets.len() as u64,
                label: String::new(),
                connections: 0,
                bytes: 0,
                edges: 0,
                first_seen_ms: None,
                last_seen_ms: None,
                audit_events: 0,
                denied_events: 0,
                classes: None,
                flows_href: self.links.get(&(s, d)).cloned(),
                source_label: src.label.clone(),
                target_label: dst.label.clone(),
            };
            let mut ports = Vec::with_capacity(buckets.len());
            let mut classes = ClassCounts::default();
            let mut first_class = true;
            for (protocol, port, b) in buckets {
                let (class, basis) = classify(b.observed, b.coverage.unwrap_or(Coverage::NotCovered));
                classes.add(class);
                if first_class || (class, basis) > (e.verdict, e.basis) {
                    e.verdict = class;
                    e.basis = basis;
                    first_class = false;
                }
                e.connections = e.connections.saturating_add(b.connections);
                e.bytes = e.bytes.saturating_add(b.bytes);
                e.edges = e.edges.saturating_add(b.edges);
                e.audit_events = e.audit_events.saturating_add(b.observed.audit);
                e.denied_events = e.denied_events.saturating_add(b.observed.denied);
                e.first_seen_ms = min_opt(e.first_seen_ms, b.first);
                e.last_seen_ms = max_opt(e.last_seen_ms, b.last);
                ports.push(PortStat { port, protocol, connections: b.connections, verdict: class });
            }
            ports.sort_by(|a, b| {
                b.connections.cmp(&a.connections).then(b.verdict.cmp(&a.verdict)).then(a.port.cmp(&b.port))
            });
            e.classes = (e.port_count > 1).then_some(classes);
            // A single-port edge links to exactly its flows.
            if let (Some(href), [only]) = (e.flows_href.as_mut(), ports.as_slice()) {
                href.push_str(&format!("&port={}&proto={}", only.port, only.protocol.as_str()));
            }
            ports.truncate(TOP_PORTS);
            e.label = port_label(&ports, e.port_count);
            e.ports = ports;
            edges.push(e);
        }
        // Parents of drawn nodes are drawn (compound nodes must exist).
        let parents: Vec<usize> = used
            .iter()
            .filter_map(|&i| self.nodes[i].0.parent.as_ref())
            .filter_map(|p| self.index.get(p).copied())
            .collect();
        used.extend(parents);
        edges.sort_by(|a, b| b.connections.cmp(&a.connections).then_with(|| a.id.cmp(&b.id)));
        let nodes = self.nodes.into_iter().enumerate().filter(|(i, _)| used.contains(i)).map(|(_, n)| n.0).collect();
        (nodes, edges)
    }
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// "80/tcp, 443/tcp +3".
pub fn port_label(top: &[PortStat], total: u64) -> String {
    let mut s: Vec<String> = top.iter().map(|p| format!("{}/{}", p.port, p.protocol.as_str())).collect();
    let rest = total.saturating_sub(top.len() as u64);
    if rest > 0 {
        s.push(format!("+{rest}"));
    }
    s.join(", ")
}

/// Keeps the `keep` busiest edges (they come busiest first from
/// [`GraphBuilder::finish`]) and the nodes they need (ends and their parents).
pub fn truncate(nodes: Vec<GraphNode>, mut edges: Vec<GraphEdge>, keep: usize) -> (Vec<GraphNode>, Vec<GraphEdge>) {
    edges.truncate(keep);
    let mut needed: HashSet<&str> = edges.iter().flat_map(|e| [e.source.as_str(), e.target.as_str()]).collect();
    let parents: Vec<String> =
        nodes.iter().filter(|n| needed.contains(n.id.as_str())).filter_map(|n| n.parent.clone()).collect();
    needed.extend(parents.iter().map(String::as_str));
    let nodes = nodes.iter().filter(|n| needed.contains(n.id.as_str())).cloned().collect();
    (nodes, edges)
}

/// Limits the answer is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    pub max_nodes: usize,
    pub max_edges: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_nodes: MAX_NODES, max_edges: MAX_EDGES }
    }
}

/// Sizes before truncation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub nodes: u64,
    pub edges: u64,
}

/// The whole answer of `/api/v1/graph`.
#[derive(Debug, Clone, Serialize)]
pub struct GraphView {
    pub level: GraphLevel,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<u32>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// `edges`: counters are the edges' totals, edges shown when active in the range;
    /// `flows`: counted from the flows recorded in the range (retention window only).
    pub source: &'static str,
    /// Too large to draw: `edges` holds the busiest ones, the page shows a table.
    pub truncated: bool,
    pub limits: Limits,
    pub totals: Totals,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap as Map;

    use std::cell::Cell;

    use bulkhead_model::{LabelSelector, Peer, Policy, PortRange, Rule};
    use bulkhead_synth::IdentityInfo;

    use super::*;

    const NONE: Observed = Observed { audit: 0, denied: 0 };

    #[test]
    fn classes_follow_events_then_policy() {
        let audit = Observed { audit: 3, denied: 0 };
        let denied = Observed { audit: 1, denied: 2 };
        let cases = [
            (NONE, Coverage::NotCovered, VerdictClass::NoPolicy, Basis::None),
            (NONE, Coverage::Allowed, VerdictClass::Allowed, Basis::Policy),
            (NONE, Coverage::DefaultDeny { enforced: false }, VerdictClass::Audit, Basis::Policy),
            (NONE, Coverage::DefaultDeny { enforced: true }, VerdictClass::Denied, Basis::Policy),
            (audit, Coverage::NotCovered, VerdictClass::Audit, Basis::Events),
            (audit, Coverage::Allowed, VerdictClass::Audit, Basis::Events),
            (denied, Coverage::Allowed, VerdictClass::Denied, Basis::Events),
            (denied, Coverage::DefaultDeny { enforced: false }, VerdictClass::Denied, Basis::Events),
        ];
        for (o, c, class, basis) in cases {
            assert_eq!(classify(o, c), (class, basis), "{o:?} {c:?}");
        }
        assert!(VerdictClass::Denied > VerdictClass::Audit);
        assert!(VerdictClass::Audit > VerdictClass::NoPolicy);
        assert!(VerdictClass::NoPolicy > VerdictClass::Allowed);
        assert_eq!(serde_json::to_value(VerdictClass::NoPolicy).expect("json"), "nopolicy");
    }

    #[test]
    fn the_worst_coverage_wins_a_bucket() {
        let deny = Coverage::DefaultDeny { enforced: false };
        assert_eq!(Coverage::Allowed.worst(Coverage::NotCovered), Coverage::NotCovered);
        assert_eq!(Coverage::NotCovered.worst(deny), deny);
        assert_eq!(deny.worst(Coverage::Allowed), deny);
        assert_eq!(deny.worst(Coverage::DefaultDeny { enforced: true }), Coverage::DefaultDeny { enforced: true });
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        Labels::new(pairs.iter().copied()).expect("labels")
    }

    fn conn(src: u32, dst: u32, port: u16) -> Connection {
        Connection {
            src: Identity(src),
            dst: Identity(dst),
            src_addr: None,
            dst_addr: None,
            dst_port: port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn coverage_from_the_policy_set() {
        let ids = vec![
            IdentityInfo::workload(Identity(256), "tiefighter", labels(&[("class", "tiefighter")])),
            IdentityInfo::workload(Identity(257), "deathstar", labels(&[("class", "deathstar")])),
            IdentityInfo::workload(Identity(258), "xwing", labels(&[("class", "xwing")])),
        ];
        let policies = vec![
            Policy {
                name: "deathstar".into(),
                namespace: None,
                selector: LabelSelector::with_labels([("class", "deathstar")]),
                ingress: Some(vec![Rule {
                    peer: Peer::Workloads { selector: LabelSelector::with_labels([("class", "tiefighter")]) },
                    ports: vec![PortRange::single(Protocol::Tcp, 80)],
                    http: vec![],
                }]),
                egress: None,
            },
            Policy {
                name: "xwing".into(),
                namespace: None,
                selector: LabelSelector::with_labels([("class", "xwing")]),
                ingress: None,
                egress: Some(vec![Rule {
                    peer: Peer::Cidr { cidr: "203.0.113.0/24".parse().expect("net"), except: vec![] },
                    ports: vec![PortRange::single(Protocol::Tcp, 443)],
                    http: vec![],
                }]),
            },
        ];
        let fqdn = Map::new();
        let ev = Evaluator::new(&policies, &ids, &fqdn);
        let monitor = |_: Identity| false;
        assert_eq!(coverage(&ev, &conn(256, 257, 80), false, monitor), Coverage::Allowed);
        assert_eq!(coverage(&ev, &conn(256, 257, 81), false, monitor), Coverage::DefaultDeny { enforced: false });
        assert_eq!(
            coverage(&ev, &conn(258, 257, 80), false, |id| id == Identity(257)),
            Coverage::DefaultDeny { enforced: true },
            "the denying side enforces"
        );
        assert_eq!(
            coverage(&ev, &conn(258, 257, 80), false, |id| id == Identity(258)),
            Coverage::DefaultDeny { enforced: true },
            "xwing's egress denies too (no rule to deathstar), and xwing enforces"
        );
        assert_eq!(coverage(&ev, &conn(256, 258, 22), false, monitor), Coverage::NotCovered);
        // Egress to world without an address: the CIDR rule allows some outside addresses.
        assert_eq!(coverage(&ev, &conn(258, Identity::WORLD.0, 443), true, monitor), Coverage::Allowed);
        assert_eq!(
            coverage(&ev, &conn(258, Identity::WORLD.0, 80), true, monitor),
            Coverage::DefaultDeny { enforced: false }
        );
        // With an address the rule decides exactly.
        let mut outside = conn(258, Identity::WORLD.0, 443);
        outside.dst_addr = Some("198.51.100.1".parse().expect("ip"));
        assert_eq!(coverage(&ev, &outside, true, monitor), Coverage::DefaultDeny { enforced: false });
        outside.dst_addr = Some("203.0.113.9".parse().expect("ip"));
        assert_eq!(coverage(&ev, &outside, true, monitor), Coverage::Allowed);
    }

    #[test]
    fn node_keys_and_names() {
        let web = labels(&[("io.kubernetes.pod.namespace", "shop"), ("app", "web")]);
        assert_eq!(namespace_key(Identity(300), &web, false), NodeKey::Namespace("shop".into()));
        assert_eq!(namespace_key(Identity(300), &labels(&[("app", "x")]), false), NodeKey::NoNamespace);
        assert_eq!(namespace_key(Identity::WORLD, &Labels::default(), false), NodeKey::Identity(Identity::WORLD));
        assert_eq!(namespace_key(Identity(301), &web, true), NodeKey::Identity(Identity(301)));
        assert_eq!(NodeKey::Namespace("a b".into()).id(), "ns:a b");
        assert_eq!(NodeKey::Identity(Identity(7)).id(), "id:7");
        assert_eq!(NodeKey::Endpoint { node: "n1".into(), netns_ino: 42 }.id(), "ep:n1/42");
        // Crafted names cannot forge edge ids or collide with them.
        assert_eq!(NodeKey::Namespace("a->ns:b".into()).id(), "ns:a-%3Ens:b");
        assert_eq!(NodeKey::Namespace("50%".into()).id(), "ns:50%25");
        assert_eq!(NodeKey::Endpoint { node: "x>y".into(), netns_ino: 1 }.id(), "ep:x%3Ey/1");
        assert_eq!(identity_name(Identity(300), &web, None), "shop/web");
        assert_eq!(identity_name(Identity(300), &web, Some("web-7d9")), "web-7d9");
        assert_eq!(identity_name(Identity::WORLD, &web, Some("x")), "world");
        assert_eq!(identity_name(Identity(999), &Labels::default(), None), "identity-999");
        assert_eq!("endpoint".parse::<GraphLevel>(), Ok(GraphLevel::Endpoint));
        assert!("pods".parse::<GraphLevel>().is_err());
    }

    fn traffic(connections: u64, at: i64) -> Traffic {
        Traffic { edges: 1, connections, bytes: connections * 10, first_seen_unix_ms: at, last_seen_unix_ms: at + 5 }
    }

    #[test]
    fn buckets_fold_into_edges_with_the_worst_class() {
        let mut b = GraphBuilder::new();
        let ns = b.node(GraphNode::new(&NodeKey::Namespace("a".into()), "a", NodeKind::Namespace), true);
        let mut w = GraphNode::new(&NodeKey::Identity(Identity(300)), "a/web", NodeKind::Workload);
        w.parent = Some("ns:a".into());
        let web = b.node(w, false);
        let db = b.node(GraphNode::new(&NodeKey::Namespace("b".into()), "b", NodeKind::Namespace), false);
        let idle = b.node(GraphNode::new(&NodeKey::Namespace("idle".into()), "idle", NodeKind::Namespace), false);
        assert_eq!(b.node(GraphNode::new(&NodeKey::Namespace("a".into()), "dup", NodeKind::Namespace), false), ns);
        b.traffic(web, db, Protocol::Tcp, 5432, traffic(100, 10), Some(Coverage::Allowed));
        b.traffic(web, db, Protocol::Tcp, 5432, traffic(1, 5), None);
        b.traffic(web, db, Protocol::Tcp, 6379, traffic(50, 20), Some(Coverage::Allowed));
        b.traffic(web, db, Protocol::Udp, 53, traffic(7, 30), Some(Coverage::Allowed));
        b.events(web, db, Protocol::Tcp, 6379, Observed { audit: 4, denied: 0 }, None);
        b.events(db, web, Protocol::Tcp, 22, Observed { audit: 0, denied: 1 }, None);
        b.link(web, db, "/flows?workload=300".into());
        b.link(db, web, "/flows?workload=301".into());
        let (nodes, edges) = b.finish();
        let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(ids, ["ns:a", "id:300", "ns:b"], "idle namespace dropped, the parent kept");
        assert_eq!(edges.len(), 2);
        let e = &edges[0];
        assert_eq!((e.source.as_str(), e.target.as_str()), ("id:300", "ns:b"));
        assert_eq!(e.verdict, VerdictClass::Audit, "one port has audit events");
        assert_eq!(e.basis, Basis::Events);
        assert_eq!(e.connections, 158);
        assert_eq!(e.edges, 4);
        assert_eq!(e.port_count, 3);
        assert_eq!(e.classes, Some(ClassCounts { allowed: 1, audit: 1, denied: 0, nopolicy: 1 }));
        assert_eq!(e.label, "5432/tcp, 6379/tcp, 53/udp");
        assert_eq!(e.ports[0].verdict, VerdictClass::NoPolicy, "5432 mixes an uncovered edge in");
        assert_eq!((e.first_seen_ms, e.last_seen_ms), (Some(5), Some(35)));
        assert_eq!(e.audit_events, 4);
        assert_eq!(e.flows_href.as_deref(), Some("/flows?workload=300"));
        let back = &edges[1];
        assert_eq!(back.verdict, VerdictClass::Denied);
        assert_eq!(back.connections, 0, "events without recorded traffic still draw an edge");
        assert_eq!(back.classes, None, "one port: no per-class counts");
        let json = serde_json::to_value(back).expect("json");
        assert!(json.get("audit_events").is_none() && json.get("source_label").is_none(), "{json}");
        assert_eq!(back.id, "ns:b->id:300");
        assert_eq!(back.flows_href.as_deref(), Some("/flows?workload=301&port=22&proto=tcp"));
        let _ = idle;
    }

    #[test]
    fn labels_count_the_ports_not_shown() {
        let p = |port| PortStat { port, protocol: Protocol::Tcp, connections: 1, verdict: VerdictClass::Allowed };
        assert_eq!(port_label(&[p(80), p(443)], 2), "80/tcp, 443/tcp");
        assert_eq!(port_label(&[p(80)], 6), "80/tcp, +5");
        assert_eq!(port_label(&[], 0), "");
    }

    #[test]
    fn truncation_keeps_the_busiest_edges_and_their_nodes() {
        let mut b = GraphBuilder::new();
        let mut n = Vec::new();
        for i in 0..5u32 {
            let mut node = GraphNode::new(&NodeKey::Identity(Identity(300 + i)), format!("w{i}"), NodeKind::Workload);
            node.parent = Some("ns:p".into());
            n.push(b.node(node, true));
        }
        b.node(GraphNode::new(&NodeKey::Namespace("p".into()), "p", NodeKind::Namespace), false);
        for i in 0..4 {
            b.traffic(n[i], n[i + 1], Protocol::Tcp, 80, traffic(10 * (i as u64 + 1), 0), None);
        }
        let (nodes, edges) = b.finish();
        assert_eq!((nodes.len(), edges.len()), (6, 4));
        let (nodes, edges) = truncate(nodes, edges, 2);
        let e: Vec<&str> = edges.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(e, ["id:303->id:304", "id:302->id:303"]);
        let mut ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["id:302", "id:303", "id:304", "ns:p"]);
    }

    fn key(src: u32, dst: u32, port: u16) -> EdgeKey {
        EdgeKey { src: Identity(src), dst: Identity(dst), dst_port: port, protocol: Protocol::Tcp }
    }

    fn edge(src: u32, dst: u32, port: u16, connections: u64, last: i64) -> Edge {
        Edge {
            key: key(src, dst, port),
            first_seen_unix_ms: last - 10,
            last_seen_unix_ms: last,
            connections,
            bytes: connections.saturating_mul(100),
        }
    }

    fn member(group: u32, decide_src: bool, decide_dst: bool, in_scope: bool) -> Member {
        Member { group, decide_src, decide_dst, in_scope }
    }

    #[test]
    fn coverage_is_remembered_only_for_equal_inputs() {
        let ids = vec![IdentityInfo::workload(Identity(256), "a", labels(&[("app", "a")]))];
        let policy = Policy {
            name: "a".into(),
            namespace: None,
            selector: LabelSelector::with_labels([("app", "a")]),
            ingress: Some(vec![]),
            egress: None,
        };
        let cache = CoverageCache::default();
        let asked = Cell::new(0);
        let decide = |_: &EdgeKey| {
            asked.set(asked.get() + 1);
            Coverage::Allowed
        };
        let g = cache.generation(std::slice::from_ref(&policy), &ids, [Identity(256)]);
        let first = g.with(None, decide, |c| (c(None, &key(2, 256, 80)), c(None, &key(2, 256, 80))));
        assert_eq!(first, (Coverage::Allowed, Coverage::Allowed));
        assert_eq!(asked.get(), 2, "not remembered before the lookup returns");
        g.with(None, decide, |c| c(None, &key(2, 256, 80)));
        assert_eq!(asked.get(), 2, "remembered afterwards");
        let same = cache.generation(std::slice::from_ref(&policy), &ids, [Identity(256), Identity(256)]);
        assert!(Arc::ptr_eq(&g, &same), "equal inputs keep the generation");
        same.with(None, decide, |c| c(None, &key(2, 256, 80)));
        assert_eq!(asked.get(), 2);
        // Any input that differs starts over: an approval, a mode change, a new identity.
        let mut approved = policy.clone();
        approved.ingress =
            Some(vec![Rule::l4(Peer::Entity { entity: bulkhead_model::ReservedIdentity::World }, vec![])]);
        let mut more = ids.clone();
        more.push(IdentityInfo::workload(Identity(257), "b", labels(&[("app", "b")])));
        for g2 in [
            cache.generation(std::slice::from_ref(&approved), &ids, [Identity(256)]),
            cache.generation(std::slice::from_ref(&policy), &ids, []),
            cache.generation(std::slice::from_ref(&policy), &more, [Identity(256)]),
        ] {
            assert!(!Arc::ptr_eq(&g, &g2));
            let before = asked.get();
            g2.with(None, decide, |c| c(None, &key(2, 256, 80)));
            assert_eq!(asked.get(), before + 1, "decided again");
        }
    }

    #[test]
    fn decisions_are_found_by_position_in_the_named_list() {
        let cache = CoverageCache::default();
        let g = cache.generation(&[], &[], []);
        let asked = Cell::new(0);
        let decide = |k: &EdgeKey| {
            asked.set(asked.get() + 1);
            if k.dst_port == 80 { Coverage::Allowed } else { Coverage::NotCovered }
        };
        let fold = |name: Option<u64>, keys: &[EdgeKey]| {
            g.with(name, decide, |c| keys.iter().enumerate().map(|(i, k)| c(Some(i), k)).collect::<Vec<_>>())
        };
        let list = [key(1, 2, 80), key(1, 2, 81)];
        assert_eq!(fold(Some(1), &list), [Coverage::Allowed, Coverage::NotCovered]);
        assert_eq!(asked.get(), 2);
        // The list grew at the end: only the new edge is decided.
        let grown = [key(1, 2, 80), key(1, 2, 81), key(1, 3, 80)];
        assert_eq!(fold(Some(1), &grown), [Coverage::Allowed, Coverage::NotCovered, Coverage::Allowed]);
        assert_eq!(asked.get(), 3);
        // By position in list 1: its position 0 answers, whatever key comes with it (a
        // list name promises each position keeps its key).
        assert_eq!(g.with(Some(1), decide, |c| c(Some(0), &key(9, 9, 81))), Coverage::Allowed);
        assert_eq!(asked.get(), 3);
        // Another list, or none: positions mean nothing, the key decides.
        assert_eq!(g.with(Some(2), decide, |c| c(Some(0), &key(9, 9, 81))), Coverage::NotCovered);
        assert_eq!(g.with(None, decide, |c| c(Some(1), &key(9, 9, 80))), Coverage::Allowed);
        assert_eq!(asked.get(), 5);
        // Only the last named list is kept: list 1 is found by key again.
        assert_eq!(g.with(Some(1), decide, |c| c(Some(0), &key(9, 9, 81))), Coverage::NotCovered);
        assert_eq!(asked.get(), 5, "by the remembered key");
        // A generation with other inputs starts over.
        let g2 = cache.generation(&[], &[], [Identity(256)]);
        assert!(!Arc::ptr_eq(&g, &g2));
        assert_eq!(g2.with(Some(1), decide, |c| c(Some(0), &key(1, 2, 81))), Coverage::NotCovered);
        assert_eq!(asked.get(), 6);
    }

    #[test]
    fn members_are_found_dense_and_sparse() {
        let mut m = Members::default();
        m.insert(Identity(2), member(0, false, false, false));
        m.insert(Identity(300), member(1, true, false, false));
        m.insert(Identity(DENSE_IDENTITIES + 5), member(2, false, true, true));
        assert_eq!(m.get(Identity(300)), Some(member(1, true, false, false)));
        assert_eq!(m.get(Identity(DENSE_IDENTITIES + 5)), Some(member(2, false, true, true)));
        assert_eq!(m.get(Identity(299)), None);
        assert_eq!(m.get(Identity(100_000)), None, "past the dense slots, below the limit");
        assert_eq!(m.get(Identity(DENSE_IDENTITIES + 6)), None);
        let mut all: Vec<u32> = m.iter().map(|(id, _)| id.0).collect();
        all.sort_unstable();
        assert_eq!(all, [2, 300, DENSE_IDENTITIES + 5]);
    }

    #[test]
    fn edges_fold_into_group_buckets() {
        let mut m = Members::default();
        // Group 0: 256 and 257 (a policy covers 257's ingress); group 1: 258; group 2: world.
        m.insert(Identity(256), member(0, false, false, true));
        m.insert(Identity(257), member(0, false, true, false));
        m.insert(Identity(258), member(1, false, false, false));
        m.insert(Identity::WORLD, member(2, false, false, false));
        let edges = vec![
            edge(258, 256, 80, 5, 100),
            edge(258, 257, 80, 7, 300),
            edge(258, 257, 81, i64::MAX as u64, 50),
            edge(258, 256, 81, 10, 60),
            edge(2, 258, 443, 1, 10),
            edge(999, 256, 80, 1, 10),
        ];
        let asked = Cell::new(Vec::new());
        let mut coverage = |_: Option<usize>, k: &EdgeKey| {
            let mut a = asked.take();
            a.push(*k);
            asked.set(a);
            if k.dst_port == 80 { Coverage::Allowed } else { Coverage::DefaultDeny { enforced: false } }
        };
        let b = fold_edges(&edges, &m, false, &mut coverage);
        assert_eq!(asked.take(), [key(258, 257, 80), key(258, 257, 81)], "only covered edges are decided");
        let k = |s, d, port| BucketKey { src_group: s, dst_group: d, protocol: Protocol::Tcp, dst_port: port };
        assert_eq!(b.len(), 3, "999 is not in the grouping: {b:?}");
        let (t, c) = b[&k(1, 0, 80)];
        assert_eq!((t.edges, t.connections, t.bytes), (2, 12, 1200));
        assert_eq!((t.first_seen_unix_ms, t.last_seen_unix_ms), (90, 300));
        assert_eq!(c, Coverage::NotCovered, "an uncovered edge makes the bucket uncovered");
        let (t, c) = b[&k(1, 0, 81)];
        assert_eq!((t.edges, t.connections), (2, i64::MAX as u64), "sums saturate like stored counters");
        assert_eq!(c, Coverage::DefaultDeny { enforced: false }, "the worst wins");
        assert_eq!(b[&k(2, 1, 443)].1, Coverage::NotCovered);
        assert_eq!(grouped_size(&edges, &m, false), GroupedSize { pairs: 2, groups: 3 });
        // Scoped: only edges with an in-scope end (256).
        let scoped = fold_edges(&edges, &m, true, &mut |_, _| Coverage::Allowed);
        assert_eq!(scoped.len(), 2);
        assert_eq!(scoped[&k(1, 0, 80)].0.edges, 1);
        assert_eq!(grouped_size(&edges, &m, true), GroupedSize { pairs: 1, groups: 2 });
        assert_eq!(grouped_size(&[], &m, false), GroupedSize::default());
    }

    #[test]
    fn the_busiest_edges_come_first() {
        let mut m = Members::default();
        for id in [256, 257, 258] {
            m.insert(Identity(id), member(id - 256, false, false, false));
        }
        let edges = vec![
            edge(256, 257, 80, 5, 100),
            edge(256, 258, 80, 9, 100),
            edge(257, 258, 80, 5, 200),
            edge(256, 257, 22, 5, 100),
            edge(999, 257, 80, 1_000, 100),
            edge(258, 256, 80, 1, 100),
        ];
        let top = top_edges(&edges, &m, false, 4);
        let keys: Vec<EdgeKey> = top.iter().map(|e| e.key).collect();
        assert_eq!(
            keys,
            [key(256, 258, 80), key(257, 258, 80), key(256, 257, 22), key(256, 257, 80)],
            "connections, then the most recent, then the key; unknown identities left out"
        );
        assert_eq!(top_edges(&edges, &m, false, 100).len(), 5);
        assert!(top_edges(&edges, &m, false, 0).is_empty());
    }
}
