//! The enforcer's pure core (STYLE.md "pure up to the syscall"): [`render`] turns a
//! [`NodePolicy`] into the exact entries the kernel maps must hold ([`MapState`]),
//! and [`diff`] turns two such states into the ordered [`MapOp`]s that take the
//! maps from one to the other without any packet seeing half a policy. The one task
//! that owns the maps applies the ops; nothing here touches the kernel.
//!
//! Every map switches with the policy generation: rules are keyed by it, and
//! endpoints and ipcache prefixes hold one slot per generation parity, so
//! [`diff`] writes the next generation's view of them beside the current one
//! before the flip and settles them after it (see [`diff`] and `abi::slot_of`).
//!
//! Agreement with [`NodePolicyIndex::decide`](bulkhead_model::node_policy::NodePolicyIndex::decide)
//! is what the tests below check with a pure model of the kernel lookup.
//!
//! Workloads come in two kinds that share every map: cgroups (keyed by cgroup id)
//! and bare network namespaces (endpoints without cgroups, judged by the tc
//! programs and keyed by `tc_endpoint_key(netns cookie)`). A namespace's key is a
//! fact of the running kernel, so the caller resolves it
//! (`datapath::resolve_netns`) and hands it to [`render_resolved`]; rendering
//! stays pure.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use bulkhead_abi::enforcer::{
    self as abi, EndpointKey, EndpointSlot, EndpointValue, IpcacheKey, IpcacheValue, PolicyKey, PolicyValue,
};
use bulkhead_model::{Direction, HttpPath, HttpRule, Identity, NodePolicy, Protocol, RolloutMode};
use ipnet::{IpNet, Ipv6Net};

/// How many entries the kernel maps hold; [`render_with`] refuses more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// `IPCACHE_V2` prefixes.
    pub ipcache: usize,
    /// `ENDPOINTS_V2` entries (one per cgroup or network-namespace workload).
    pub endpoints: usize,
    /// `POLICY_V1` entries of one generation: the map holds two while a new one is
    /// written, so this is half the map's capacity.
    pub policy_per_generation: usize,
    /// `HTTP_RULES_V1` entries of one generation (half the map, as for rules).
    pub http_per_generation: usize,
}

impl Capacity {
    /// The ABI's default map sizes.
    pub const DEFAULT: Self = Self {
        ipcache: abi::DEFAULT_IPCACHE_ENTRIES as usize,
        endpoints: abi::DEFAULT_ENDPOINTS as usize,
        policy_per_generation: (abi::DEFAULT_POLICY_ENTRIES / 2) as usize,
        http_per_generation: (abi::DEFAULT_HTTP_RULES / 2) as usize,
    };
}

impl Default for Capacity {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// An ipcache key as the kernel stores it: IPv4 as v4-mapped IPv6 with the prefix
/// length + 96 (`IpcacheKey` without the `Ord` it lacks). Always canonical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpcachePrefix {
    /// Significant leading bits of `addr` (0..=128).
    pub prefixlen: u32,
    /// Network order, host bits zero.
    pub addr: [u8; 16],
}

impl IpcachePrefix {
    /// The kernel key of a canonical prefix.
    pub fn new(net: IpNet) -> Self {
        let net = net.trunc();
        match net {
            IpNet::V4(n) => Self { prefixlen: u32::from(n.prefix_len()) + 96, addr: abi::v4_mapped(n.addr().octets()) },
            IpNet::V6(n) => Self { prefixlen: u32::from(n.prefix_len()), addr: n.addr().octets() },
        }
    }

    /// The ABI key.
    pub fn key(&self) -> IpcacheKey {
        IpcacheKey { prefixlen: self.prefixlen, addr: self.addr }
    }

    /// The prefix as an [`IpNet`] (IPv4 when it lies in the v4-mapped range).
    pub fn net(&self) -> IpNet {
        let v6 = Ipv6Addr::from(self.addr);
        match v6.to_ipv4_mapped() {
            Some(v4) if self.prefixlen >= 96 => {
                IpNet::new(IpAddr::V4(v4), (self.prefixlen - 96) as u8).unwrap_or(IpNet::V6(Ipv6Net::default()))
            }
            _ => IpNet::new(IpAddr::V6(v6), self.prefixlen as u8).unwrap_or(IpNet::V6(Ipv6Net::default())),
        }
    }

    /// Whether `addr` (a 16-byte kernel address) lies in this prefix.
    pub fn contains(&self, addr: &[u8; 16]) -> bool {
        let bits = self.prefixlen.min(128);
        let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
        u128::from_be_bytes(*addr) & mask == u128::from_be_bytes(self.addr) & mask
    }
}

impl fmt::Display for IpcachePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.net().fmt(f)
    }
}

/// One `HTTP_RULES_V1` key: its prefix length in bits and its data, which carries
/// the generation and the HTTP rule set ([`abi::http_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HttpEntry {
    pub prefixlen: u32,
    pub data: abi::HttpKeyData,
}

impl HttpEntry {
    /// The generation the entry belongs to.
    pub fn generation(&self) -> u32 {
        u32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

/// `::ffff:0:0/96`, where the kernel keeps IPv4.
const V4_MAPPED: IpcachePrefix = IpcachePrefix { prefixlen: 96, addr: abi::v4_mapped([0; 4]) };

/// Everything the kernel maps should hold for one policy (conntrack, counters and
/// events are the kernel's own and not modelled), as packets judged under
/// `generation` see it.
///
/// `ENDPOINTS_V2` and `IPCACHE_V2` hold two slots per key, one per generation
/// parity (`abi::slot_of`); `ipcache` and `endpoints` are the slot of
/// `generation`. A rendered state is *settled*: both slots of every key are
/// equal. One read back from the kernel ([`crate::datapath::Datapath::read_state`])
/// after an apply that stopped half-way may not be: `unsettled` names those keys,
/// and [`diff`] rewrites or deletes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// The generation `policy` is written under, and the active one once applied.
    pub generation: u32,
    /// `IPCACHE_V2`, `generation`'s slot of every prefix.
    pub ipcache: BTreeMap<IpcachePrefix, u32>,
    /// `ENDPOINTS_V2`, `generation`'s slot of every key that is present in it.
    pub endpoints: BTreeMap<EndpointKey, EndpointSlot>,
    /// `POLICY_V1` entries of `generation` (every key has `generation` in it).
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// `HTTP_RULES_V1` entries of `generation`: the requests of the L7 entries'
    /// HTTP rule sets ([`PolicyValue::http_set`]).
    pub http: BTreeSet<HttpEntry>,
    /// Kernel entries whose two slots differ (or whose slot of `generation` is
    /// absent); empty in a rendered state.
    pub unsettled: Unsettled,
}

/// Keys of the double-buffered maps whose two slots are not both `generation`'s
/// view (see [`MapState`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unsettled {
    /// `ENDPOINTS_V2` keys: the other slot differs, or this generation's is absent
    /// (then the key is not in [`MapState::endpoints`]).
    pub endpoints: BTreeSet<EndpointKey>,
    /// `IPCACHE_V2` prefixes whose other slot differs (each is in [`MapState::ipcache`]).
    pub ipcache: BTreeSet<IpcachePrefix>,
}

impl Unsettled {
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.ipcache.is_empty()
    }
}

/// One step of taking the maps from one [`MapState`] to another, in [`diff`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or overwrite an ipcache prefix, the same identity in both slots
    /// (settled: every generation sees it).
    UpsertIpcache { prefix: IpcachePrefix, identity: u32 },
    /// Insert or overwrite an endpoint, the same in both slots (settled).
    UpsertEndpoint { key: EndpointKey, value: EndpointSlot },
    /// Before a flip: an ipcache prefix with each generation's answer in its slot
    /// (`value.identity[slot_of(g)]`): for a prefix that generation does not
    /// have, what its longest-prefix match answers for the prefix.
    BridgeIpcache { prefix: IpcachePrefix, value: IpcacheValue },
    /// Before a flip: an endpoint with each generation's view in its slot (an
    /// absent slot for a generation that does not manage it).
    BridgeEndpoint { key: EndpointKey, value: EndpointValue },
    /// Write every entry of a generation that is not active yet.
    WriteGeneration { generation: u32, entries: Vec<(PolicyKey, PolicyValue)> },
    /// Flip `ENF_CONFIG_V1.active_generation` (one map update).
    Activate { generation: u32 },
    /// Delete every entry of an inactive generation (walks the whole policy map:
    /// for generations whose keys are unknown, such as leftovers of an earlier
    /// process that `read_state` reports).
    DeleteGeneration { generation: u32 },
    /// Delete the entries of an inactive generation by key, without walking the
    /// map: `keys` are all of its entries ([`diff`] takes them from its `from`
    /// state, which is what the kernel holds), each with `generation` in it.
    DeleteGenerationKeys { generation: u32, keys: Vec<PolicyKey> },
    /// Insert or overwrite one entry of the *active* generation. Only emitted when
    /// both states share a generation and their policies still differ (not atomic:
    /// render a changed policy under a new generation instead).
    UpsertPolicy { key: PolicyKey, value: PolicyValue },
    /// Delete one entry of the active generation (see [`MapOp::UpsertPolicy`]).
    DeletePolicy { key: PolicyKey },
    /// Insert HTTP rule entries (of a generation not active yet, or — patching in
    /// place — of a set no active rule entry names yet).
    WriteHttp { entries: Vec<HttpEntry> },
    /// Delete HTTP rule entries (of an inactive generation, or of sets no rule
    /// entry names any more).
    DeleteHttp { entries: Vec<HttpEntry> },
    /// Stop managing a cgroup.
    DeleteEndpoint { key: EndpointKey },
    /// Forget an ipcache prefix.
    DeleteIpcache { prefix: IpcachePrefix },
}

/// What a [`NodePolicy`] holds that the kernel maps cannot represent faithfully.
/// Fields name the offending entry by its index in the policy. Port ranges cannot
/// occur: [`bulkhead_model::RuleKey`] has single ports only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("{field}[{index}]: identity 0 is the kernel's wildcard")]
    ZeroIdentity { field: &'static str, index: usize },
    #[error("ipcache[{index}]: prefix {prefix} has host bits set")]
    NonCanonicalPrefix { index: usize, prefix: IpNet },
    #[error("ipcache[{index}]: IPv6 prefix {prefix} overlaps ::ffff:0:0/96, where the kernel keeps IPv4 addresses")]
    V4MappedOverlap { index: usize, prefix: IpNet },
    #[error("ipcache[{index}]: prefix {prefix} already maps to identity {first}, not {second}")]
    ConflictingPrefix { index: usize, prefix: IpNet, first: u32, second: u32 },
    #[error("endpoints[{index}]: mode {mode:?} is not enforced; leave the workload out")]
    UnsupportedMode { index: usize, mode: RolloutMode },
    #[error("endpoints[{index}]: has no cgroup and its network namespace was not resolved on this node")]
    NoCgroup { index: usize },
    #[error("endpoints[{index}]: key {key:#x} resolved for netns {netns_ino} is not a tc endpoint key")]
    NotATcKey { index: usize, netns_ino: u64, key: u64 },
    #[error("endpoints[{index}]: netns {netns_ino} resolved to key {key:#x}, which another endpoint already has")]
    ConflictingNetns { index: usize, netns_ino: u64, key: u64 },
    #[error("endpoints[{index}]: cgroup {cgroup_id} is already listed with another entry")]
    ConflictingCgroup { index: usize, cgroup_id: u64 },
    #[error("endpoints[{index}]: identity {identity} is already listed with other covered directions")]
    InconsistentCoverage { index: usize, identity: u32 },
    #[error("rules[{index}]: port 0 is the kernel's wildcard")]
    ZeroPort { index: usize },
    #[error("rules[{index}]: a port with any protocol is never probed")]
    PortWithoutProtocol { index: usize },
    #[error("rules[{index}]: rule_id 0 is reserved for default deny")]
    ZeroRuleId { index: usize },
    #[error("rules[{index}]: same kernel key as an earlier rule with another rule_id")]
    ConflictingRule { index: usize },
    #[error("{map} needs {len} entries, its capacity is {capacity}")]
    TooMany { map: &'static str, len: usize, capacity: usize },
    #[error("rules[{index}].http[{rule}]: method or path longer than the datapath matches")]
    HttpRuleTooLong { index: usize, rule: usize },
    #[error("rules[{index}]: HTTP rules on an entry that is not ingress TCP")]
    HttpNotIngressTcp { index: usize },
}

/// [`render_with`] for the ABI's default capacities.
pub fn render(policy: &NodePolicy, generation: u32) -> Result<MapState, RenderError> {
    render_with(policy, generation, &Capacity::DEFAULT)
}

/// The entries the kernel maps must hold to enforce `policy` with its rules under
/// `generation`, or why they cannot. Workloads without cgroups are refused
/// ([`RenderError::NoCgroup`]); see [`render_resolved`] for them.
pub fn render_with(policy: &NodePolicy, generation: u32, capacity: &Capacity) -> Result<MapState, RenderError> {
    render_resolved(policy, generation, capacity, &BTreeMap::new())
}

/// [`render_with`] that also renders workloads which are bare network
/// namespaces: `netns_keys` maps an endpoint's `netns_ino` to the endpoint key
/// its namespace resolved to on this node (`abi::tc_endpoint_key(cookie)`, see
/// `datapath::ResolvedNetns::endpoint_key`).
///
/// Only endpoints without cgroups use it: one with cgroups is judged by the
/// cgroup_skb programs, and a tc entry as well would judge (and report) each of
/// its packets twice. An endpoint without cgroups whose namespace is missing
/// from `netns_keys` is [`RenderError::NoCgroup`].
pub fn render_resolved(
    policy: &NodePolicy,
    generation: u32,
    capacity: &Capacity,
    netns_keys: &BTreeMap<u64, u64>,
) -> Result<MapState, RenderError> {
    let mut state = MapState { generation, ..MapState::default() };

    for (index, e) in policy.ipcache.iter().enumerate() {
        if e.identity.0 == abi::IDENTITY_ANY {
            return Err(RenderError::ZeroIdentity { field: "ipcache", index });
        }
        if e.prefix.trunc() != e.prefix {
            return Err(RenderError::NonCanonicalPrefix { index, prefix: e.prefix });
        }
        let prefix = IpcachePrefix::new(e.prefix);
        if e.prefix.addr().is_ipv6() && overlaps(&prefix, &V4_MAPPED) {
            return Err(RenderError::V4MappedOverlap { index, prefix: e.prefix });
        }
        if let Some(first) = state.ipcache.insert(prefix, e.identity.0)
            && first != e.identity.0
        {
            return Err(RenderError::ConflictingPrefix { index, prefix: e.prefix, first, second: e.identity.0 });
        }
    }
    too_many(abi::IPCACHE, state.ipcache.len(), capacity.ipcache)?;

    let mut coverage: BTreeMap<u32, u8> = BTreeMap::new();
    for (index, e) in policy.endpoints.iter().enumerate() {
        if e.identity.0 == abi::IDENTITY_ANY {
            return Err(RenderError::ZeroIdentity { field: "endpoints", index });
        }
        let mode = match e.mode {
            RolloutMode::Monitor => abi::MODE_MONITOR,
            RolloutMode::Enforce => abi::MODE_ENFORCE,
            RolloutMode::Learn => return Err(RenderError::UnsupportedMode { index, mode: e.mode }),
        };
        let netns_key = if e.cgroups.is_empty() {
            let Some((netns_ino, key)) = e.netns_ino.and_then(|ino| netns_keys.get(&ino).map(|k| (ino, *k))) else {
                return Err(RenderError::NoCgroup { index });
            };
            if !abi::is_tc_endpoint_key(key) {
                return Err(RenderError::NotATcKey { index, netns_ino, key });
            }
            Some((netns_ino, key))
        } else {
            None
        };
        let flags = if e.ingress_covered { abi::EP_INGRESS_COVERED } else { 0 }
            | if e.egress_covered { abi::EP_EGRESS_COVERED } else { 0 };
        if *coverage.entry(e.identity.0).or_insert(flags) != flags {
            return Err(RenderError::InconsistentCoverage { index, identity: e.identity.0 });
        }
        let value = EndpointSlot { identity: e.identity.0, mode, flags, _pad: [0; 2] };
        if let Some((netns_ino, key)) = netns_key
            && state.endpoints.insert(EndpointKey { cgroup_id: key }, value).is_some()
        {
            return Err(RenderError::ConflictingNetns { index, netns_ino, key });
        }
        for c in &e.cgroups {
            if let Some(first) = state.endpoints.insert(EndpointKey { cgroup_id: c.cgroup_id }, value)
                && first != value
            {
                return Err(RenderError::ConflictingCgroup { index, cgroup_id: c.cgroup_id });
            }
        }
    }
    too_many(abi::ENDPOINTS, state.endpoints.len(), capacity.endpoints)?;

    // Identical HTTP rule lists share one set (numbered from 1 per generation).
    let mut sets: BTreeMap<&Vec<HttpRule>, usize> = BTreeMap::new();
    for (index, r) in policy.rules.iter().enumerate() {
        let k = &r.key;
        if k.local.0 == abi::IDENTITY_ANY {
            return Err(RenderError::ZeroIdentity { field: "rules.local", index });
        }
        if k.peer.is_some_and(|p| p.0 == abi::IDENTITY_ANY) {
            return Err(RenderError::ZeroIdentity { field: "rules.peer", index });
        }
        if k.port == Some(0) {
            return Err(RenderError::ZeroPort { index });
        }
        if k.port.is_some() && k.protocol.is_none() {
            return Err(RenderError::PortWithoutProtocol { index });
        }
        if r.rule_id == 0 {
            return Err(RenderError::ZeroRuleId { index });
        }
        let key = policy_key(generation, k.local, k.direction, k.peer, k.port, k.protocol);
        let http_set = if r.http.is_empty() {
            0
        } else {
            if k.direction != Direction::Ingress || k.protocol.is_some_and(|p| p != Protocol::Tcp) {
                return Err(RenderError::HttpNotIngressTcp { index });
            }
            let next = sets.len() + 1;
            let set = *sets.entry(&r.http).or_insert(next);
            let set = u16::try_from(set).map_err(|_| RenderError::TooMany {
                map: "HTTP rule sets",
                len: set,
                capacity: usize::from(u16::MAX),
            })?;
            for (rule, h) in r.http.iter().enumerate() {
                let entry = http_entry(generation, set, h).ok_or(RenderError::HttpRuleTooLong { index, rule })?;
                state.http.insert(entry);
            }
            set
        };
        let value = PolicyValue { rule_id: r.rule_id, action: abi::ACTION_ALLOW, _pad: 0, http_set };
        if let Some(first) = state.policy.insert(key, value)
            && first != value
        {
            return Err(RenderError::ConflictingRule { index });
        }
    }
    too_many(abi::POLICY, state.policy.len(), capacity.policy_per_generation)?;
    too_many(abi::HTTP_RULES, state.http.len(), capacity.http_per_generation)?;
    Ok(state)
}

/// The `HTTP_RULES_V1` entry of one HTTP rule of set `set`.
fn http_entry(generation: u32, set: u16, rule: &HttpRule) -> Option<HttpEntry> {
    let method = rule.method.as_deref().unwrap_or("").as_bytes();
    let path = match &rule.path {
        HttpPath::Any => abi::HttpKeyPath::Any,
        HttpPath::Exact(p) => abi::HttpKeyPath::Exact(p.as_bytes()),
        HttpPath::Prefix(p) => abi::HttpKeyPath::Prefix(p.as_bytes()),
    };
    let (prefixlen, data) = abi::http_key(generation, set, method, path)?;
    Some(HttpEntry { prefixlen, data })
}

/// The network namespaces whose keys [`render_resolved`] needs: (`netns_name`,
/// `netns_ino`) of every endpoint without cgroups, in policy order. The caller
/// resolves each (`datapath::resolve_netns(name, Some(ino))`), attaches the tc
/// programs there and passes `ino → ResolvedNetns::endpoint_key()`.
pub fn netns_workloads(policy: &NodePolicy) -> Vec<(Option<&str>, u64)> {
    policy
        .endpoints
        .iter()
        .filter(|e| e.cgroups.is_empty())
        .filter_map(|e| e.netns_ino.map(|ino| (e.netns_name.as_deref(), ino)))
        .collect()
}

/// The `POLICY_V1` key of a (possibly wildcarded) rule key; `None` is the wildcard 0.
pub fn policy_key(
    generation: u32,
    local: Identity,
    direction: Direction,
    peer: Option<Identity>,
    port: Option<u16>,
    protocol: Option<Protocol>,
) -> PolicyKey {
    PolicyKey {
        generation,
        local_identity: local.0,
        peer_identity: peer.map_or(abi::IDENTITY_ANY, |p| p.0),
        port: port.unwrap_or(0),
        protocol: protocol.map_or(0, Protocol::number),
        direction: direction_to_abi(direction),
    }
}

/// [`abi::DIR_INGRESS`] / [`abi::DIR_EGRESS`].
pub fn direction_to_abi(direction: Direction) -> u8 {
    match direction {
        Direction::Ingress => abi::DIR_INGRESS,
        Direction::Egress => abi::DIR_EGRESS,
    }
}

fn overlaps(a: &IpcachePrefix, b: &IpcachePrefix) -> bool {
    a.contains(&b.addr) || b.contains(&a.addr)
}

fn too_many(map: &'static str, len: usize, capacity: usize) -> Result<(), RenderError> {
    if len > capacity { Err(RenderError::TooMany { map, len, capacity }) } else { Ok(()) }
}

/// The ops that take the maps from `from` to `to`, in the order they must be
/// applied, such that no packet sees half a policy.
///
/// Render the target under the generation after the applied one (the map
/// owner's `active + 1`; any generation of the other parity, `abi::slot_of`).
/// Then:
///
/// 1. **bridge**: every endpoint and prefix that differs between the two states
///    (or is unsettled in `from`) is written with `from`'s view in `from`'s slot
///    and `to`'s in the other ([`MapOp::BridgeEndpoint`], [`MapOp::BridgeIpcache`]).
///    A slot for a state without the key is absent (endpoints) or holds that
///    state's longest-prefix-match answer for the prefix (ipcache: a trie cannot
///    fall through to a shorter prefix, so the entry must answer as if it were
///    not there). Packets still read `from`'s slot: nothing changes for them;
/// 2. the whole new generation of rules ([`MapOp::WriteGeneration`]);
/// 3. the flip ([`MapOp::Activate`]): from here packets read `to`'s slots and rules;
/// 4. the old generation's rules go, by the keys `from` lists
///    ([`MapOp::DeleteGenerationKeys`]: no walk of the policy map);
/// 5. bridged keys `to` has are settled (both slots `to`'s:
///    [`MapOp::UpsertEndpoint`], [`MapOp::UpsertIpcache`]), the others deleted
///    ([`MapOp::DeleteEndpoint`], [`MapOp::DeleteIpcache`]).
///
/// Keys equal and settled in both states are not written, so the cost follows
/// the size of the change. Every op boundary leaves the kernel deciding exactly
/// as `from` (before the flip) or as `to` (from the flip on).
///
/// With equal generations, or two of the same parity (which share a slot and
/// cannot be bridged), the maps are patched in place instead: settled upserts,
/// then the rules (a whole generation, or entry by entry with
/// [`MapOp::UpsertPolicy`] / [`MapOp::DeletePolicy`] under one generation), then
/// deletes. That keeps `diff` total, but it is not atomic.
///
/// `to` is taken as settled (its `unsettled` is ignored): after the ops the
/// kernel holds exactly `to` with every key settled.
pub fn diff(from: &MapState, to: &MapState) -> Vec<MapOp> {
    if from.generation != to.generation && abi::slot_of(from.generation) != abi::slot_of(to.generation) {
        return diff_flip(from, to);
    }
    let mut ops = Vec::new();
    for (prefix, identity) in &to.ipcache {
        if from.ipcache.get(prefix) != Some(identity) || from.unsettled.ipcache.contains(prefix) {
            ops.push(MapOp::UpsertIpcache { prefix: *prefix, identity: *identity });
        }
    }
    for (key, value) in &to.endpoints {
        if from.endpoints.get(key) != Some(value) || from.unsettled.endpoints.contains(key) {
            ops.push(MapOp::UpsertEndpoint { key: *key, value: *value });
        }
    }
    if from.generation != to.generation {
        push_generation_flip(&mut ops, from, to);
    } else {
        // New HTTP entries before the rule entries that name their sets, removed
        // ones after the rule entries stopped naming them.
        let added: Vec<HttpEntry> = to.http.difference(&from.http).copied().collect();
        if !added.is_empty() {
            ops.push(MapOp::WriteHttp { entries: added });
        }
        for (key, value) in &to.policy {
            if from.policy.get(key) != Some(value) {
                ops.push(MapOp::UpsertPolicy { key: *key, value: *value });
            }
        }
        for key in from.policy.keys().filter(|k| !to.policy.contains_key(k)) {
            ops.push(MapOp::DeletePolicy { key: *key });
        }
        let removed: Vec<HttpEntry> = from.http.difference(&to.http).copied().collect();
        if !removed.is_empty() {
            ops.push(MapOp::DeleteHttp { entries: removed });
        }
    }
    let old_endpoints: BTreeSet<&EndpointKey> = from.endpoints.keys().chain(&from.unsettled.endpoints).collect();
    for key in old_endpoints.into_iter().filter(|k| !to.endpoints.contains_key(k)) {
        ops.push(MapOp::DeleteEndpoint { key: *key });
    }
    let old_prefixes: BTreeSet<&IpcachePrefix> = from.ipcache.keys().chain(&from.unsettled.ipcache).collect();
    for prefix in old_prefixes.into_iter().filter(|p| !to.ipcache.contains_key(p)) {
        ops.push(MapOp::DeleteIpcache { prefix: *prefix });
    }
    ops
}

/// [`diff`] between generations of different parity: bridge, flip, settle.
fn diff_flip(from: &MapState, to: &MapState) -> Vec<MapOp> {
    let (old, new) = (abi::slot_of(from.generation), abi::slot_of(to.generation));
    let mut ops = Vec::new();
    // After the flip: settled upserts first, then deletes (either order is exact).
    let mut settle = Vec::new();
    let mut delete = Vec::new();

    let keys: BTreeSet<&EndpointKey> =
        from.endpoints.keys().chain(to.endpoints.keys()).chain(&from.unsettled.endpoints).collect();
    for key in keys {
        let before = from.endpoints.get(key).copied();
        let after = to.endpoints.get(key).copied();
        if before == after && !from.unsettled.endpoints.contains(key) {
            continue;
        }
        let mut value = EndpointValue::default();
        value.slot[old] = before.unwrap_or(EndpointSlot::ABSENT);
        value.slot[new] = after.unwrap_or(EndpointSlot::ABSENT);
        ops.push(MapOp::BridgeEndpoint { key: *key, value });
        match after {
            Some(value) => settle.push(MapOp::UpsertEndpoint { key: *key, value }),
            None => delete.push(MapOp::DeleteEndpoint { key: *key }),
        }
    }

    let (old_lpm, new_lpm) = (Lpm::new(&from.ipcache), Lpm::new(&to.ipcache));
    let mut delete_prefixes = Vec::new();
    let prefixes: BTreeSet<&IpcachePrefix> =
        from.ipcache.keys().chain(to.ipcache.keys()).chain(&from.unsettled.ipcache).collect();
    for prefix in prefixes {
        let before = from.ipcache.get(prefix).copied();
        let after = to.ipcache.get(prefix).copied();
        if before == after && !from.unsettled.ipcache.contains(prefix) {
            continue;
        }
        let mut value = IpcacheValue::default();
        value.identity[old] = before.unwrap_or_else(|| old_lpm.covering(prefix));
        value.identity[new] = after.unwrap_or_else(|| new_lpm.covering(prefix));
        ops.push(MapOp::BridgeIpcache { prefix: *prefix, value });
        match after {
            Some(identity) => settle.push(MapOp::UpsertIpcache { prefix: *prefix, identity }),
            None => delete_prefixes.push(MapOp::DeleteIpcache { prefix: *prefix }),
        }
    }

    push_generation_flip(&mut ops, from, to);
    ops.extend(settle);
    ops.extend(delete);
    ops.extend(delete_prefixes);
    ops
}

/// Write `to`'s rules as a new generation, flip to it, delete `from`'s by key
/// (`from` is what the kernel holds, so its keys are all of them).
fn push_generation_flip(ops: &mut Vec<MapOp>, from: &MapState, to: &MapState) {
    let entries = to.policy.iter().map(|(k, v)| (*k, *v)).collect();
    ops.push(MapOp::WriteGeneration { generation: to.generation, entries });
    if !to.http.is_empty() {
        ops.push(MapOp::WriteHttp { entries: to.http.iter().copied().collect() });
    }
    ops.push(MapOp::Activate { generation: to.generation });
    let keys = from.policy.keys().copied().collect();
    ops.push(MapOp::DeleteGenerationKeys { generation: from.generation, keys });
    if !from.http.is_empty() {
        ops.push(MapOp::DeleteHttp { entries: from.http.iter().copied().collect() });
    }
}

/// Longest-prefix match over one state's ipcache, as the kernel's trie answers.
struct Lpm<'a> {
    ipcache: &'a BTreeMap<IpcachePrefix, u32>,
    /// The prefix lengths present, so a query probes only those.
    lengths: BTreeSet<u32>,
}

impl<'a> Lpm<'a> {
    fn new(ipcache: &'a BTreeMap<IpcachePrefix, u32>) -> Self {
        Self { ipcache, lengths: ipcache.keys().map(|p| p.prefixlen).collect() }
    }

    /// The identity of the longest prefix containing all of `prefix` (itself
    /// included), or world: what addresses in `prefix` resolve to when the trie
    /// has no longer prefix for them.
    fn covering(&self, prefix: &IpcachePrefix) -> u32 {
        let addr = u128::from_be_bytes(prefix.addr);
        for &len in self.lengths.range(..=prefix.prefixlen).rev() {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - len.min(128)) };
            let key = IpcachePrefix { prefixlen: len, addr: (addr & mask).to_be_bytes() };
            if let Some(identity) = self.ipcache.get(&key) {
                return *identity;
            }
        }
        abi::IDENTITY_WORLD
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use bulkhead_model::node_policy::{LOCAL_IDENTITY_FIRST, NodePolicyIndex};
    use bulkhead_model::{EndpointCgroup, IpcacheEntry, NodeRule, PolicyEndpoint, RuleKey, RuleRef, RuleVerdict};
    use proptest::prelude::*;

    use super::*;

    // --- a pure model of the kernel programs' lookups over a MapState ---

    fn kernel_addr(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => abi::v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// LPM over a settled state's ipcache; a miss is world.
    fn kernel_identity(state: &MapState, ip: IpAddr) -> u32 {
        KernelMaps::new(state).identity(ip)
    }

    /// What the programs decide over a settled state's maps ([`KernelMaps::decide`]).
    fn kernel_decide(
        state: &MapState,
        cgroup_id: u64,
        direction: Direction,
        peer: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> RuleVerdict {
        KernelMaps::new(state).decide(cgroup_id, direction, peer, port, protocol)
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn sample() -> NodePolicy {
        NodePolicy {
            version: 1,
            ipcache: vec![
                IpcacheEntry { prefix: net("10.0.0.0/8"), identity: Identity(LOCAL_IDENTITY_FIRST) },
                IpcacheEntry { prefix: net("10.0.0.1/32"), identity: Identity(256) },
                IpcacheEntry { prefix: net("fd00::/64"), identity: Identity(258) },
            ],
            endpoints: vec![PolicyEndpoint {
                identity: Identity(257),
                netns_ino: None,
                netns_name: None,
                cgroups: vec![
                    EndpointCgroup { cgroup_id: 77, path: "/a".into() },
                    EndpointCgroup { cgroup_id: 78, path: "/b".into() },
                ],
                mode: RolloutMode::Enforce,
                ingress_covered: true,
                egress_covered: false,
            }],
            rules: vec![
                NodeRule {
                    key: RuleKey {
                        local: Identity(257),
                        direction: Direction::Ingress,
                        peer: Some(Identity(256)),
                        port: Some(80),
                        protocol: Some(Protocol::Tcp),
                    },
                    rule_id: 1,
                    http: Vec::new(),
                },
                NodeRule {
                    key: RuleKey {
                        local: Identity(257),
                        direction: Direction::Ingress,
                        peer: None,
                        port: None,
                        protocol: Some(Protocol::Udp),
                    },
                    rule_id: 2,
                    http: Vec::new(),
                },
            ],
            rule_refs: vec![],
        }
    }

    #[test]
    fn renders_every_map() {
        let s = render(&sample(), 7).expect("renders");
        assert_eq!(s.generation, 7);
        let v4 = IpcachePrefix::new(net("10.0.0.0/8"));
        assert_eq!((v4.prefixlen, v4.addr), (104, abi::v4_mapped([10, 0, 0, 0])));
        assert_eq!(v4.to_string(), "10.0.0.0/8");
        assert_eq!(IpcachePrefix::new(net("fd00::/64")).net(), net("fd00::/64"));
        assert_eq!(v4.key(), IpcacheKey { prefixlen: 104, addr: abi::v4_mapped([10, 0, 0, 0]) });
        assert_eq!(s.ipcache.get(&v4), Some(&LOCAL_IDENTITY_FIRST));
        assert_eq!(s.ipcache.get(&IpcachePrefix::new(net("fd00::/64"))), Some(&258));
        let ep = EndpointSlot { identity: 257, mode: abi::MODE_ENFORCE, flags: abi::EP_INGRESS_COVERED, _pad: [0; 2] };
        assert_eq!(s.endpoints.len(), 2);
        assert_eq!(s.endpoints.get(&EndpointKey { cgroup_id: 78 }), Some(&ep));
        let exact = PolicyKey {
            generation: 7,
            local_identity: 257,
            peer_identity: 256,
            port: 80,
            protocol: abi::IPPROTO_TCP,
            direction: abi::DIR_INGRESS,
        };
        let any = PolicyKey { peer_identity: 0, port: 0, protocol: abi::IPPROTO_UDP, ..exact };
        assert_eq!(
            s.policy.get(&exact),
            Some(&PolicyValue { rule_id: 1, action: abi::ACTION_ALLOW, _pad: 0, http_set: 0 })
        );
        assert_eq!(s.policy.get(&any).map(|v| v.rule_id), Some(2));
        assert_eq!(s.policy.len(), 2);

        let a = "10.0.0.1".parse().expect("ip");
        assert_eq!(
            kernel_decide(&s, 77, Direction::Ingress, a, 80, Protocol::Tcp),
            RuleVerdict::Allowed { rule_id: 1 }
        );
        assert_eq!(kernel_decide(&s, 78, Direction::Ingress, a, 81, Protocol::Tcp), RuleVerdict::DefaultDeny);
        assert_eq!(kernel_decide(&s, 78, Direction::Ingress, a, 9, Protocol::Udp), RuleVerdict::Allowed { rule_id: 2 });
        assert_eq!(kernel_decide(&s, 78, Direction::Egress, a, 81, Protocol::Tcp), RuleVerdict::NotCovered);
        assert_eq!(kernel_decide(&s, 79, Direction::Ingress, a, 81, Protocol::Tcp), RuleVerdict::NotCovered);
    }

    #[test]
    fn each_unrepresentable_thing_is_named() {
        type Case = (&'static str, fn(&mut NodePolicy), RenderError);
        let cases: Vec<Case> = vec![
            (
                "zero ipcache identity",
                |p| p.ipcache[1].identity = Identity(0),
                RenderError::ZeroIdentity { field: "ipcache", index: 1 },
            ),
            (
                "non-canonical prefix",
                |p| p.ipcache[0].prefix = net("10.1.0.0/8"),
                RenderError::NonCanonicalPrefix { index: 0, prefix: net("10.1.0.0/8") },
            ),
            (
                "v6 default route",
                |p| p.ipcache[2].prefix = net("::/0"),
                RenderError::V4MappedOverlap { index: 2, prefix: net("::/0") },
            ),
            (
                "v4-mapped v6 prefix",
                |p| p.ipcache[2].prefix = net("::ffff:10.0.0.0/104"),
                RenderError::V4MappedOverlap { index: 2, prefix: net("::ffff:10.0.0.0/104") },
            ),
            (
                "same prefix twice",
                |p| p.ipcache[2] = IpcacheEntry { prefix: net("10.0.0.1/32"), identity: Identity(300) },
                RenderError::ConflictingPrefix { index: 2, prefix: net("10.0.0.1/32"), first: 256, second: 300 },
            ),
            (
                "learn endpoint",
                |p| p.endpoints[0].mode = RolloutMode::Learn,
                RenderError::UnsupportedMode { index: 0, mode: RolloutMode::Learn },
            ),
            ("netns-only endpoint", |p| p.endpoints[0].cgroups.clear(), RenderError::NoCgroup { index: 0 }),
            (
                "zero endpoint identity",
                |p| p.endpoints[0].identity = Identity(0),
                RenderError::ZeroIdentity { field: "endpoints", index: 0 },
            ),
            (
                "cgroup of two workloads",
                |p| {
                    let mut e = p.endpoints[0].clone();
                    e.identity = Identity(300);
                    p.endpoints.push(e);
                },
                RenderError::ConflictingCgroup { index: 1, cgroup_id: 77 },
            ),
            (
                "coverage differs per cgroup",
                |p| {
                    let mut e = p.endpoints[0].clone();
                    e.cgroups = vec![EndpointCgroup { cgroup_id: 99, path: "/c".into() }];
                    e.egress_covered = true;
                    p.endpoints.push(e);
                },
                RenderError::InconsistentCoverage { index: 1, identity: 257 },
            ),
            (
                "zero peer",
                |p| p.rules[0].key.peer = Some(Identity(0)),
                RenderError::ZeroIdentity { field: "rules.peer", index: 0 },
            ),
            (
                "zero local",
                |p| p.rules[1].key.local = Identity(0),
                RenderError::ZeroIdentity { field: "rules.local", index: 1 },
            ),
            ("port 0", |p| p.rules[0].key.port = Some(0), RenderError::ZeroPort { index: 0 }),
            ("port, any protocol", |p| p.rules[0].key.protocol = None, RenderError::PortWithoutProtocol { index: 0 }),
            ("rule id 0", |p| p.rules[1].rule_id = 0, RenderError::ZeroRuleId { index: 1 }),
            (
                "same key, other rule",
                |p| {
                    let mut r = p.rules[0].clone();
                    r.rule_id = 5;
                    p.rules.push(r);
                },
                RenderError::ConflictingRule { index: 2 },
            ),
        ];
        for (what, mutate, want) in cases {
            let mut p = sample();
            mutate(&mut p);
            assert_eq!(render(&p, 1), Err(want), "{what}");
        }
    }

    #[test]
    fn capacities_are_enforced() {
        let p = sample();
        let cap = Capacity { ipcache: 3, endpoints: 2, policy_per_generation: 2, http_per_generation: 2 };
        assert!(render_with(&p, 1, &cap).is_ok());
        for (cap, map, len) in [
            (Capacity { ipcache: 2, ..cap }, abi::IPCACHE, 3),
            (Capacity { endpoints: 1, ..cap }, abi::ENDPOINTS, 2),
            (Capacity { policy_per_generation: 1, ..cap }, abi::POLICY, 2),
        ] {
            let capacity = len - 1;
            assert_eq!(render_with(&p, 1, &cap), Err(RenderError::TooMany { map, len, capacity }));
        }
        assert_eq!(Capacity::default().policy_per_generation * 2, abi::DEFAULT_POLICY_ENTRIES as usize);
    }

    /// A fake netns cookie per inode, as `resolve_netns` would find on a node.
    fn netns_key(ino: u64) -> u64 {
        abi::tc_endpoint_key(ino * 7 + 1)
    }

    /// Every namespace of the policy resolved (also those of endpoints with
    /// cgroups, which must not get a tc entry).
    fn resolve_all(p: &NodePolicy) -> BTreeMap<u64, u64> {
        p.endpoints.iter().filter_map(|e| e.netns_ino).map(|ino| (ino, netns_key(ino))).collect()
    }

    #[test]
    fn netns_only_workloads_render_under_their_tc_key() {
        let mut p = sample();
        p.endpoints[0].netns_ino = Some(41);
        p.endpoints.push(PolicyEndpoint {
            identity: Identity(256),
            netns_ino: Some(42),
            netns_name: Some("web".into()),
            cgroups: vec![],
            mode: RolloutMode::Monitor,
            ingress_covered: false,
            egress_covered: true,
        });
        let cap = Capacity::DEFAULT;
        let keys = resolve_all(&p);

        // Unresolved: refused as before, with or without the resolver's input.
        assert_eq!(render(&p, 3), Err(RenderError::NoCgroup { index: 1 }));
        let only_other = BTreeMap::from([(41, netns_key(41))]);
        assert_eq!(render_resolved(&p, 3, &cap, &only_other), Err(RenderError::NoCgroup { index: 1 }));

        assert_eq!(netns_workloads(&p), vec![(Some("web"), 42)], "only endpoints without cgroups need tc");
        let s = render_resolved(&p, 3, &cap, &keys).expect("renders");
        let tc = EndpointKey { cgroup_id: netns_key(42) };
        let want = EndpointSlot { identity: 256, mode: abi::MODE_MONITOR, flags: abi::EP_EGRESS_COVERED, _pad: [0; 2] };
        assert_eq!(s.endpoints.get(&tc), Some(&want));
        // The endpoint with cgroups keeps only its cgroup entries (no double judging).
        assert_eq!(s.endpoints.len(), 3, "{:?}", s.endpoints);
        assert!(!s.endpoints.contains_key(&EndpointKey { cgroup_id: netns_key(41) }));
        // Same policy entries as a cgroup workload would get.
        assert_eq!(s.policy, render(&sample(), 3).expect("renders").policy);
        let b = "10.0.0.1".parse().expect("ip");
        assert_eq!(kernel_decide(&s, netns_key(42), Direction::Egress, b, 80, Protocol::Tcp), RuleVerdict::DefaultDeny);
        assert_eq!(kernel_decide(&s, netns_key(42), Direction::Ingress, b, 80, Protocol::Tcp), RuleVerdict::NotCovered);

        // A key that could be a cgroup id, or one shared by two namespaces.
        let plain = BTreeMap::from([(42, 77)]);
        assert_eq!(
            render_resolved(&p, 3, &cap, &plain),
            Err(RenderError::NotATcKey { index: 1, netns_ino: 42, key: 77 })
        );
        let mut twice = p.clone();
        let mut e = twice.endpoints[1].clone();
        e.identity = Identity(258);
        e.netns_ino = Some(43);
        twice.endpoints.push(e);
        let shared = BTreeMap::from([(42, netns_key(42)), (43, netns_key(42))]);
        assert_eq!(
            render_resolved(&twice, 3, &cap, &shared),
            Err(RenderError::ConflictingNetns { index: 2, netns_ino: 43, key: netns_key(42) })
        );
        // Namespaces count against the endpoint capacity like cgroups.
        let small = Capacity { endpoints: 2, ..cap };
        assert_eq!(
            render_resolved(&p, 3, &small, &keys),
            Err(RenderError::TooMany { map: abi::ENDPOINTS, len: 3, capacity: 2 })
        );
    }

    fn with_http(mut p: NodePolicy, rules: Vec<HttpRule>) -> NodePolicy {
        p.rules[0].http = rules;
        p
    }

    #[test]
    fn http_rules_render_as_lpm_entries_of_the_generation() {
        let landing = HttpRule::exact("POST", "/v1/request-landing");
        let status = HttpRule { method: None, path: HttpPath::Prefix("/status/".into()) };
        let p = with_http(sample(), vec![landing.clone(), status]);
        let s = render(&p, 7).expect("renders");
        let entry = s.policy.values().find(|v| v.rule_id == 1).expect("rule 1");
        assert_eq!(entry.http_set, 1);
        assert!(s.policy.values().filter(|v| v.rule_id != 1).all(|v| v.http_set == 0));
        let exact = abi::http_key(7, 1, b"POST", abi::HttpKeyPath::Exact(b"/v1/request-landing")).expect("key");
        let prefix = abi::http_key(7, 1, b"", abi::HttpKeyPath::Prefix(b"/status/")).expect("key");
        let want: BTreeSet<HttpEntry> =
            [exact, prefix].into_iter().map(|(prefixlen, data)| HttpEntry { prefixlen, data }).collect();
        assert_eq!(s.http, want);
        assert!(s.http.iter().all(|e| e.generation() == 7));
        // The exact path's terminator is part of the prefix, the prefix's is not.
        assert_eq!(exact.0, ((abi::HTTP_KEY_PATH + "/v1/request-landing".len() + 1) * 8) as u32);
        assert_eq!(prefix.0, ((abi::HTTP_KEY_PATH + "/status/".len()) * 8) as u32);

        // An HTTP rule on an entry the datapath cannot judge requests on is refused.
        let mut bad = with_http(sample(), vec![landing]);
        bad.rules[0].key.direction = Direction::Egress;
        assert_eq!(render(&bad, 1), Err(RenderError::HttpNotIngressTcp { index: 0 }));
    }

    #[test]
    fn http_entries_flip_with_their_generation() {
        let landing = HttpRule::exact("POST", "/v1/request-landing");
        let from = render(&with_http(sample(), vec![landing.clone()]), 1).expect("from");
        let to = render(&with_http(sample(), vec![HttpRule::exact("PUT", "/v1/exhaust-port")]), 2).expect("to");
        let ops = diff(&from, &to);
        let pos = |f: &dyn Fn(&MapOp) -> bool| ops.iter().position(f).expect("op present");
        let write = pos(&|o| matches!(o, MapOp::WriteHttp { entries } if entries.iter().all(|e| e.generation() == 2)));
        let activate = pos(&|o| matches!(o, MapOp::Activate { generation: 2 }));
        let delete =
            pos(&|o| matches!(o, MapOp::DeleteHttp { entries } if entries.iter().all(|e| e.generation() == 1)));
        assert!(write < activate && activate < delete, "{ops:?}");

        // Patching in place (same generation): new entries before the rules, stale after.
        let same = render(&with_http(sample(), vec![landing, HttpRule::exact("GET", "/")]), 1).expect("same");
        let ops = diff(&from, &same);
        assert!(matches!(ops.first(), Some(MapOp::WriteHttp { entries }) if entries.len() == 1), "{ops:?}");
        assert!(!ops.iter().any(|o| matches!(o, MapOp::DeleteHttp { .. })), "{ops:?}");
        assert!(diff(&same, &same).is_empty());
    }

    #[test]
    fn diff_orders_generation_flip() {
        let a = render(&sample(), 1).expect("renders");
        let mut p = sample();
        p.ipcache.remove(1);
        p.ipcache.push(IpcacheEntry { prefix: net("192.0.2.0/24"), identity: Identity(259) });
        p.endpoints[0].cgroups.remove(0);
        p.endpoints[0].mode = RolloutMode::Monitor;
        p.rules.remove(0);
        let b = render(&p, 2).expect("renders");
        let ops = diff(&a, &b);
        let kinds: Vec<&str> = ops
            .iter()
            .map(|op| match op {
                MapOp::BridgeIpcache { .. } => "bridge-ipcache",
                MapOp::BridgeEndpoint { .. } => "bridge-endpoint",
                MapOp::UpsertIpcache { .. } => "settle-ipcache",
                MapOp::UpsertEndpoint { .. } => "settle-endpoint",
                MapOp::WriteGeneration { generation: 2, .. } => "write-2",
                MapOp::Activate { generation: 2 } => "activate-2",
                MapOp::DeleteGenerationKeys { generation: 1, keys } if keys.len() == a.policy.len() => "delete-1",
                MapOp::DeleteEndpoint { .. } => "delete-endpoint",
                MapOp::DeleteIpcache { .. } => "delete-ipcache",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "bridge-endpoint",
                "bridge-endpoint",
                "bridge-ipcache",
                "bridge-ipcache",
                "write-2",
                "activate-2",
                "delete-1",
                "settle-endpoint",
                "settle-ipcache",
                "delete-endpoint",
                "delete-ipcache"
            ]
        );
        // Cgroup 77 leaves (absent in generation 2's slot), 78 turns to monitor.
        let (old, new) = (abi::slot_of(1), abi::slot_of(2));
        let enforce = a.endpoints[&EndpointKey { cgroup_id: 78 }];
        let monitor = EndpointSlot { mode: abi::MODE_MONITOR, ..enforce };
        let mut gone = EndpointValue::default();
        gone.slot[old] = enforce;
        let mut switched = EndpointValue::both(enforce);
        switched.slot[new] = monitor;
        assert_eq!(ops[0], MapOp::BridgeEndpoint { key: EndpointKey { cgroup_id: 77 }, value: gone });
        assert_eq!(ops[1], MapOp::BridgeEndpoint { key: EndpointKey { cgroup_id: 78 }, value: switched });
        // 10.0.0.1/32 leaves: generation 2 answers 10.0.0.0/8's identity for it;
        // 192.0.2.0/24 arrives: generation 1 answers world for it.
        let mut leaving = IpcacheValue::both(256);
        leaving.identity[new] = LOCAL_IDENTITY_FIRST;
        let mut arriving = IpcacheValue::both(259);
        arriving.identity[old] = abi::IDENTITY_WORLD;
        // (Prefixes are ordered by length first.)
        assert_eq!(ops[2], MapOp::BridgeIpcache { prefix: IpcachePrefix::new(net("192.0.2.0/24")), value: arriving });
        assert_eq!(ops[3], MapOp::BridgeIpcache { prefix: IpcachePrefix::new(net("10.0.0.1/32")), value: leaving });

        assert!(diff(&b, &b).is_empty(), "no change, no ops");
        let same_gen = render(&sample(), 2).expect("renders");
        assert!(
            diff(&same_gen, &b).iter().any(|op| matches!(op, MapOp::DeletePolicy { .. })),
            "a changed policy under one generation is patched entry by entry"
        );
        // Same parity: cannot be bridged, so patched in place (never bridges).
        let same_parity = diff(&a, &render(&p, 3).expect("renders"));
        assert!(same_parity.iter().all(|op| !matches!(op, MapOp::BridgeEndpoint { .. } | MapOp::BridgeIpcache { .. })));
        assert!(same_parity.contains(&MapOp::Activate { generation: 3 }));
    }

    /// The kernel maps as [`MapOp`]s change them, slot by slot: `POLICY_V1` holds
    /// every generation written and not yet deleted; packets see only the active
    /// one, and the active generation's slot of every endpoint and prefix.
    #[derive(Debug, Clone)]
    struct KernelMaps {
        active: u32,
        ipcache: BTreeMap<IpcachePrefix, IpcacheValue>,
        endpoints: BTreeMap<EndpointKey, EndpointValue>,
        policy: BTreeMap<PolicyKey, PolicyValue>,
        http: BTreeSet<HttpEntry>,
    }

    impl KernelMaps {
        /// The maps holding a settled state.
        fn new(s: &MapState) -> Self {
            assert!(s.unsettled.is_empty(), "only settled states are loaded directly");
            Self {
                active: s.generation,
                ipcache: s.ipcache.iter().map(|(p, id)| (*p, IpcacheValue::both(*id))).collect(),
                endpoints: s.endpoints.iter().map(|(k, v)| (*k, EndpointValue::both(*v))).collect(),
                policy: s.policy.clone(),
                http: s.http.clone(),
            }
        }

        fn apply(&mut self, op: &MapOp) {
            match op {
                MapOp::UpsertIpcache { prefix, identity } => {
                    self.ipcache.insert(*prefix, IpcacheValue::both(*identity));
                }
                MapOp::BridgeIpcache { prefix, value } => {
                    self.ipcache.insert(*prefix, *value);
                }
                MapOp::DeleteIpcache { prefix } => {
                    self.ipcache.remove(prefix);
                }
                MapOp::UpsertEndpoint { key, value } => {
                    self.endpoints.insert(*key, EndpointValue::both(*value));
                }
                MapOp::BridgeEndpoint { key, value } => {
                    self.endpoints.insert(*key, *value);
                }
                MapOp::DeleteEndpoint { key } => {
                    self.endpoints.remove(key);
                }
                MapOp::WriteGeneration { generation, entries } => {
                    assert_ne!(*generation, self.active, "writing the active generation");
                    // The datapath skips its walk for leftovers when it knows there
                    // are none: diffs must never write over leftovers.
                    assert!(
                        self.policy.keys().all(|k| k.generation != *generation),
                        "leftovers under generation {generation}"
                    );
                    for (k, v) in entries {
                        assert_eq!(k.generation, *generation);
                        self.policy.insert(*k, *v);
                    }
                }
                MapOp::Activate { generation } => self.active = *generation,
                MapOp::DeleteGeneration { generation } => {
                    assert_ne!(*generation, self.active, "deleting the active generation");
                    self.policy.retain(|k, _| k.generation != *generation);
                    self.http.retain(|e| e.generation() != *generation);
                }
                MapOp::DeleteGenerationKeys { generation, keys } => {
                    assert_ne!(*generation, self.active, "deleting the active generation");
                    for k in keys {
                        assert_eq!(k.generation, *generation);
                        self.policy.remove(k);
                    }
                }
                MapOp::UpsertPolicy { key, value } => {
                    self.policy.insert(*key, *value);
                }
                MapOp::DeletePolicy { key } => {
                    self.policy.remove(key);
                }
                MapOp::WriteHttp { entries } => self.http.extend(entries.iter().copied()),
                MapOp::DeleteHttp { entries } => {
                    for e in entries {
                        self.http.remove(e);
                    }
                }
            }
        }

        /// What packets see.
        fn active_policy(&self) -> BTreeMap<PolicyKey, PolicyValue> {
            self.policy.iter().filter(|(k, _)| k.generation == self.active).map(|(k, v)| (*k, *v)).collect()
        }

        /// What `Datapath::read_state` reads back.
        fn state(&self) -> MapState {
            let slot = abi::slot_of(self.active);
            let mut state = MapState {
                generation: self.active,
                policy: self.active_policy(),
                http: self.http.iter().filter(|e| e.generation() == self.active).copied().collect(),
                ..MapState::default()
            };
            for (prefix, v) in &self.ipcache {
                state.ipcache.insert(*prefix, v.identity[slot]);
                if v.identity[0] != v.identity[1] {
                    state.unsettled.ipcache.insert(*prefix);
                }
            }
            for (key, v) in &self.endpoints {
                if v.slot[slot].is_present() {
                    state.endpoints.insert(*key, v.slot[slot]);
                }
                if !v.slot[slot].is_present() || v.slot[0] != v.slot[1] {
                    state.unsettled.endpoints.insert(*key);
                }
            }
            state
        }

        /// The trie's longest match (over every key, whatever its slots), then
        /// the active generation's slot; a miss is world.
        fn identity(&self, ip: IpAddr) -> u32 {
            let addr = kernel_addr(ip);
            self.ipcache
                .iter()
                .filter(|(p, _)| p.contains(&addr))
                .max_by_key(|(p, _)| p.prefixlen)
                .map_or(abi::IDENTITY_WORLD, |(_, v)| v.identity[abi::slot_of(self.active)])
        }

        /// The programs' decision: the active generation (read first), ENDPOINTS
        /// by key and its slot, coverage flags, the ipcache slot, then
        /// POLICY_PROBES under the active generation.
        fn decide(
            &self,
            cgroup_id: u64,
            direction: Direction,
            peer: IpAddr,
            port: u16,
            protocol: Protocol,
        ) -> RuleVerdict {
            let generation = self.active;
            let Some(value) = self.endpoints.get(&EndpointKey { cgroup_id }) else { return RuleVerdict::NotCovered };
            let ep = value.slot[abi::slot_of(generation)];
            let bit = match direction {
                Direction::Ingress => abi::EP_INGRESS_COVERED,
                Direction::Egress => abi::EP_EGRESS_COVERED,
            };
            if ep.mode != abi::MODE_MONITOR && ep.mode != abi::MODE_ENFORCE || ep.flags & bit == 0 {
                return RuleVerdict::NotCovered;
            }
            let peer_identity = self.identity(peer);
            for (with_peer, with_port, with_proto) in abi::POLICY_PROBES {
                let key = PolicyKey {
                    generation,
                    local_identity: ep.identity,
                    peer_identity: if with_peer { peer_identity } else { abi::IDENTITY_ANY },
                    port: if with_port { port } else { 0 },
                    protocol: if with_proto { protocol.number() } else { 0 },
                    direction: direction_to_abi(direction),
                };
                if let Some(v) = self.policy.get(&key) {
                    assert_eq!(v.action, abi::ACTION_ALLOW);
                    return RuleVerdict::Allowed { rule_id: v.rule_id };
                }
            }
            RuleVerdict::DefaultDeny
        }

        /// The mode packets of `cgroup_id` are judged in (0: unmanaged).
        fn mode(&self, cgroup_id: u64) -> u8 {
            self.endpoints.get(&EndpointKey { cgroup_id }).map_or(0, |v| v.slot[abi::slot_of(self.active)].mode)
        }
    }

    // --- property tests ---

    const LOCALS: [u32; 4] = [256, 257, 258, 259];
    const PORTS: [u16; 3] = [53, 80, 443];

    fn identity_pool() -> Vec<u32> {
        let mut v = vec![abi::IDENTITY_HOST, abi::IDENTITY_WORLD, 3];
        v.extend(LOCALS);
        v.extend([LOCAL_IDENTITY_FIRST, LOCAL_IDENTITY_FIRST + 1]);
        v
    }

    fn arb_prefix() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (0u8..4, 0u8..4, prop::sample::select(vec![8u8, 16, 24, 30, 32])).prop_map(|(b, c, len)| IpNet::new(
                IpAddr::from([10, 0, b, c]),
                len
            )
            .expect("len")
            .trunc()),
            (0u16..4, prop::sample::select(vec![16u8, 64, 120, 128])).prop_map(|(h, len)| IpNet::new(
                IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, h]),
                len
            )
            .expect("len")
            .trunc()),
        ]
    }

    fn arb_policy() -> impl Strategy<Value = NodePolicy> {
        let ipcache = prop::collection::btree_map(arb_prefix(), prop::sample::select(identity_pool()), 0..8);
        // Per local identity: managed?, mode, ingress covered, egress covered,
        // cgroups (0: a bare network namespace), has a netns too.
        let endpoints = prop::collection::vec(
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>(), 0usize..3, any::<bool>()),
            4,
        );
        let rule = (
            prop::sample::select(LOCALS.to_vec()),
            any::<bool>(),
            prop::option::of(prop::sample::select(identity_pool())),
            prop::option::of(prop::sample::select(PORTS.to_vec())),
            prop::option::of(prop::sample::select(vec![Protocol::Tcp, Protocol::Udp])),
            1u32..5,
        );
        (ipcache, endpoints, prop::collection::vec(rule, 0..24)).prop_map(|(ipcache, eps, rules)| {
            let mut p = NodePolicy { version: 1, ..NodePolicy::default() };
            p.ipcache =
                ipcache.into_iter().map(|(prefix, id)| IpcacheEntry { prefix, identity: Identity(id) }).collect();
            let mut cgroup_id = 100;
            for (local, (managed, enforce, ingress, egress, n, netns)) in LOCALS.iter().zip(eps) {
                if !managed {
                    continue;
                }
                let netns_ino = (n == 0 || netns).then_some(NETNS_INO_BASE + u64::from(*local));
                let cgroups = (0..n)
                    .map(|_| {
                        cgroup_id += 1;
                        EndpointCgroup { cgroup_id, path: format!("/w/{cgroup_id}") }
                    })
                    .collect();
                p.endpoints.push(PolicyEndpoint {
                    identity: Identity(*local),
                    netns_ino,
                    netns_name: netns_ino.map(|ino| format!("ns{ino}")),
                    cgroups,
                    mode: if enforce { RolloutMode::Enforce } else { RolloutMode::Monitor },
                    ingress_covered: ingress,
                    egress_covered: egress,
                });
            }
            let managed: BTreeSet<u32> = p.endpoints.iter().map(|e| e.identity.0).collect();
            let mut known: BTreeSet<u32> = managed.clone();
            known.extend([1, 2, 3, 6, 7]);
            known.extend(p.ipcache.iter().map(|e| e.identity.0));
            let mut seen = BTreeSet::new();
            for (local, ingress, peer, port, protocol, rule_id) in rules {
                let peer = peer.filter(|id| known.contains(id));
                let protocol = if port.is_some() { protocol.or(Some(Protocol::Tcp)) } else { protocol };
                let direction = if ingress { Direction::Ingress } else { Direction::Egress };
                let key = RuleKey { local: Identity(local), direction, peer: peer.map(Identity), port, protocol };
                if managed.contains(&local) && seen.insert(key) {
                    p.rules.push(NodeRule::l4(key, rule_id));
                }
            }
            p.rules.sort();
            p.rule_refs = (1..5)
                .map(|rule_id| RuleRef {
                    rule_id,
                    proposal_id: 1,
                    policy_name: "p".into(),
                    direction: Direction::Ingress,
                    rule_index: 0,
                })
                .collect();
            p
        })
    }

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u8..5, 0u8..5).prop_map(|(b, c)| IpAddr::from([10, 0, b, c])),
            Just(IpAddr::from([192, 0, 2, 1])),
            (0u16..5, 0u16..3).prop_map(|(h, m)| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, m, h])),
            (0u16..5).prop_map(|h| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, h])),
            Just(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])),
        ]
    }

    /// Inodes of the generated namespaces: `NETNS_INO_BASE + local identity`.
    const NETNS_INO_BASE: u64 = 9000;

    /// An endpoint key: a cgroup id (some unmanaged) or a namespace's tc key (one
    /// of an identity that may be unmanaged or have cgroups instead).
    fn arb_endpoint_key() -> impl Strategy<Value = u64> {
        prop_oneof![
            100u64..110,
            prop::sample::select(LOCALS.to_vec()).prop_map(|l| netns_key(NETNS_INO_BASE + u64::from(l)))
        ]
    }

    fn arb_connection() -> impl Strategy<Value = (u64, bool, IpAddr, u16, bool)> {
        (arb_endpoint_key(), any::<bool>(), arb_addr(), prop::sample::select(vec![53u16, 80, 443, 8080]), any::<bool>())
    }

    proptest! {
        #[test]
        fn kernel_model_agrees_with_decide(
            policy in arb_policy(),
            generation in any::<u32>(),
            connections in prop::collection::vec(arb_connection(), 1..32),
        ) {
            policy.validate().expect("the generator builds valid policies");
            let state = render_resolved(&policy, generation, &Capacity::DEFAULT, &resolve_all(&policy))
                .expect("valid policies render");
            let index = policy.index();
            // A workload's key: its cgroups, or its namespace when it has none.
            let by_cgroup: BTreeMap<u64, Identity> = policy
                .endpoints
                .iter()
                .flat_map(|e| {
                    let tc = e.netns_ino.filter(|_| e.cgroups.is_empty()).map(|ino| (netns_key(ino), e.identity));
                    e.cgroups.iter().map(move |c| (c.cgroup_id, e.identity)).chain(tc)
                })
                .collect();
            if policy.endpoints.iter().any(|e| e.cgroups.is_empty()) {
                prop_assert!(render(&policy, generation).is_err(), "netns-only workloads need resolved keys");
            }
            for (cgroup_id, ingress, addr, port, tcp) in connections {
                let direction = if ingress { Direction::Ingress } else { Direction::Egress };
                let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
                prop_assert_eq!(kernel_identity(&state, addr), index.identity_of(addr).0, "identity of {}", addr);
                let want = match by_cgroup.get(&cgroup_id) {
                    Some(local) => index.decide(*local, direction, index.identity_of(addr), port, protocol),
                    None => RuleVerdict::NotCovered,
                };
                let got = kernel_decide(&state, cgroup_id, direction, addr, port, protocol);
                prop_assert_eq!(got, want, "cgroup {} {:?} {} {}/{:?}", cgroup_id, direction, addr, port, protocol);
            }
        }

        #[test]
        fn applying_the_diff_yields_the_target(
            (a, b) in arb_policy_pair(),
            gen_a in any::<u32>(),
            step in prop::sample::select(vec![0u32, 1, 2]),
        ) {
            let cap = Capacity::DEFAULT;
            let from = render_resolved(&a, gen_a, &cap, &resolve_all(&a)).expect("renders");
            // The next generation, the same one, or one of the same parity (not atomic).
            let gen_b = gen_a.wrapping_add(step);
            let to = render_resolved(&b, gen_b, &cap, &resolve_all(&b)).expect("renders");
            let ops = diff(&from, &to);
            let mut kernel = KernelMaps::new(&from);
            for op in &ops {
                kernel.apply(op);
                if step == 1 {
                    // No packet ever sees half a set of rules.
                    let seen = kernel.active_policy();
                    prop_assert!(seen == from.policy || seen == to.policy, "half a policy after {:?}", op);
                }
            }
            prop_assert_eq!(kernel.state(), to.clone());
            prop_assert_eq!(kernel.policy.len(), to.policy.len(), "no generation left behind");
            if step == 1 {
                // Ordering: bridges before the flip, settling and deletes after it.
                let flip = ops.iter().position(|op| matches!(op, MapOp::Activate { .. })).expect("a flip");
                for (i, op) in ops.iter().enumerate() {
                    match op {
                        MapOp::BridgeIpcache { .. }
                        | MapOp::BridgeEndpoint { .. }
                        | MapOp::WriteGeneration { .. }
                        | MapOp::WriteHttp { .. } => prop_assert!(i < flip),
                        MapOp::DeleteGeneration { .. }
                        | MapOp::DeleteGenerationKeys { .. }
                        | MapOp::UpsertIpcache { .. }
                        | MapOp::UpsertEndpoint { .. }
                        | MapOp::DeleteEndpoint { .. }
                        | MapOp::DeleteIpcache { .. }
                        | MapOp::DeleteHttp { .. } => prop_assert!(i > flip),
                        MapOp::Activate { .. } => {}
                        MapOp::UpsertPolicy { .. } | MapOp::DeletePolicy { .. } => prop_assert!(false, "{:?}", op),
                    }
                }
            }
        }

        /// The promise, packet by packet: at every op boundary of a diff
        /// to the next generation, every packet is decided exactly as the old
        /// policy decides it (before the flip) or as the new one (from the flip
        /// on), in the mode that policy gives its endpoint. Endpoints come, go,
        /// move between identities, switch mode and coverage; prefixes come, go,
        /// are re-mapped and nest.
        #[test]
        fn every_packet_sees_one_whole_policy(
            (a, b) in arb_policy_pair(),
            gen_a in any::<u32>(),
            connections in prop::collection::vec(arb_connection(), 1..48),
        ) {
            let cap = Capacity::DEFAULT;
            let from = render_resolved(&a, gen_a, &cap, &resolve_all(&a)).expect("renders");
            let to = render_resolved(&b, gen_a.wrapping_add(1), &cap, &resolve_all(&b)).expect("renders");
            let (old, new) = (Expected::new(&a), Expected::new(&b));
            let mut kernel = KernelMaps::new(&from);
            check_connections(&kernel, &old, &connections, "before")?;
            let mut flipped = false;
            for op in diff(&from, &to) {
                kernel.apply(&op);
                flipped |= matches!(op, MapOp::Activate { .. });
                let want = if flipped { &new } else { &old };
                check_connections(&kernel, want, &connections, &format!("after {op:?}"))?;
            }
            prop_assert!(flipped);
            prop_assert_eq!(kernel.state(), to);
        }

        /// An apply that stopped at any op (the process was killed, a map write
        /// failed) leaves unsettled entries; what the kernel holds is read back
        /// and the next diff from it is again atomic and exact. Without the flip
        /// the owner first restores the applied state (same generation).
        #[test]
        fn an_interrupted_apply_is_repaired(
            (a, b) in arb_policy_pair(),
            c in arb_policy(),
            gen_a in any::<u32>(),
            cut in any::<prop::sample::Index>(),
            connections in prop::collection::vec(arb_connection(), 1..32),
        ) {
            let cap = Capacity::DEFAULT;
            let from = render_resolved(&a, gen_a, &cap, &resolve_all(&a)).expect("renders");
            let to = render_resolved(&b, gen_a.wrapping_add(1), &cap, &resolve_all(&b)).expect("renders");
            let ops = diff(&from, &to);
            let mut kernel = KernelMaps::new(&from);
            for op in &ops[..cut.index(ops.len() + 1)] {
                kernel.apply(op);
            }
            let mut now = kernel.state();
            let mut policy = &b;
            if now.generation == from.generation {
                // The owner's recover: back to the applied state, entry by entry.
                policy = &a;
                for op in diff(&now, &from) {
                    kernel.apply(&op);
                }
                now = kernel.state();
                prop_assert_eq!(&now, &from);
            }
            // Rules of inactive generations (read_state's stale generations) are
            // deleted by the owner.
            let active = kernel.active;
            kernel.policy.retain(|k, _| k.generation == active);
            let next = render_resolved(&c, now.generation.wrapping_add(1), &cap, &resolve_all(&c)).expect("renders");
            let (old, new) = (Expected::new(policy), Expected::new(&c));
            check_connections(&kernel, &old, &connections, "read back")?;
            let mut flipped = false;
            for op in diff(&now, &next) {
                kernel.apply(&op);
                flipped |= matches!(op, MapOp::Activate { .. });
                let want = if flipped { &new } else { &old };
                check_connections(&kernel, want, &connections, &format!("after {op:?}"))?;
            }
            prop_assert_eq!(kernel.state(), next.clone());
            prop_assert_eq!(kernel.policy.len(), next.policy.len(), "no generation left behind");
        }
    }

    /// What a policy says packets of each endpoint key get.
    struct Expected<'a> {
        index: NodePolicyIndex<'a>,
        /// A workload's key (its cgroups, or its namespace when it has none) →
        /// identity and `MODE_*`.
        by_key: BTreeMap<u64, (Identity, u8)>,
    }

    impl<'a> Expected<'a> {
        fn new(policy: &'a NodePolicy) -> Self {
            let mode = |m: RolloutMode| if m == RolloutMode::Enforce { abi::MODE_ENFORCE } else { abi::MODE_MONITOR };
            let by_key = policy
                .endpoints
                .iter()
                .flat_map(|e| {
                    let v = (e.identity, mode(e.mode));
                    let tc = e.netns_ino.filter(|_| e.cgroups.is_empty()).map(|ino| (netns_key(ino), v));
                    e.cgroups.iter().map(move |c| (c.cgroup_id, v)).chain(tc)
                })
                .collect();
            Self { index: policy.index(), by_key }
        }
    }

    fn check_connections(
        kernel: &KernelMaps,
        want: &Expected<'_>,
        connections: &[(u64, bool, IpAddr, u16, bool)],
        when: &str,
    ) -> Result<(), TestCaseError> {
        for &(key, ingress, addr, port, tcp) in connections {
            let direction = if ingress { Direction::Ingress } else { Direction::Egress };
            let protocol = if tcp { Protocol::Tcp } else { Protocol::Udp };
            let peer = want.index.identity_of(addr);
            let (verdict, mode) = match want.by_key.get(&key) {
                Some((local, mode)) => (want.index.decide(*local, direction, peer, port, protocol), *mode),
                None => (RuleVerdict::NotCovered, 0),
            };
            prop_assert_eq!(kernel.mode(key), mode, "mode of {:#x} {}", key, when);
            prop_assert_eq!(kernel.identity(addr), peer.0, "identity of {} {}", addr, when);
            let got = kernel.decide(key, direction, addr, port, protocol);
            prop_assert_eq!(got, verdict, "{:#x} {:?} {} {}/{:?} {}", key, direction, addr, port, protocol, when);
        }
        Ok(())
    }

    /// A policy and its successor: unrelated, or [`mix`]ed from it (small changes
    /// of every kind, the common case).
    fn arb_policy_pair() -> impl Strategy<Value = (NodePolicy, NodePolicy)> {
        prop_oneof![
            (arb_policy(), arb_policy()),
            (arb_policy(), arb_policy(), prop::collection::vec(any::<u8>(), 32)).prop_map(|(a, b, picks)| {
                let m = mix(&a, &b, &picks);
                (a, m)
            }),
        ]
    }

    /// `a` changed a little, as `picks` say: endpoints kept, switched between
    /// monitor and enforce, changed coverage or dropped, some of `b`'s added;
    /// prefixes kept, re-mapped or dropped, some of `b`'s added (nested ones
    /// among them); rules of both kept where still valid.
    fn mix(a: &NodePolicy, b: &NodePolicy, picks: &[u8]) -> NodePolicy {
        let mut pick = picks.iter().copied().cycle();
        let mut next = move || pick.next().unwrap_or(0);
        let mut p = NodePolicy { version: a.version + 1, ..a.clone() };
        p.endpoints = a
            .endpoints
            .iter()
            .filter_map(|e| {
                let mut e = e.clone();
                match next() % 5 {
                    0 => {}
                    1 => {
                        e.mode =
                            if e.mode == RolloutMode::Enforce { RolloutMode::Monitor } else { RolloutMode::Enforce }
                    }
                    2 => e.ingress_covered = !e.ingress_covered,
                    3 => e.egress_covered = !e.egress_covered,
                    _ => return None,
                }
                Some(e)
            })
            .collect();
        for e in &b.endpoints {
            let taken = p.endpoints.iter().any(|x| {
                x.identity == e.identity
                    || x.cgroups.iter().any(|c| e.cgroups.iter().any(|d| d.cgroup_id == c.cgroup_id))
            });
            if !taken && next() % 2 == 0 {
                p.endpoints.push(e.clone());
            }
        }
        let pool = identity_pool();
        p.ipcache = a
            .ipcache
            .iter()
            .filter_map(|e| match next() % 4 {
                0 | 1 => Some(*e),
                2 => Some(IpcacheEntry { identity: Identity(pool[usize::from(next()) % pool.len()]), ..*e }),
                _ => None,
            })
            .collect();
        for e in &b.ipcache {
            if !p.ipcache.iter().any(|x| x.prefix == e.prefix) && next() % 2 == 0 {
                p.ipcache.push(*e);
            }
        }
        let managed: BTreeSet<Identity> = p.endpoints.iter().map(|e| e.identity).collect();
        let mut known: BTreeSet<u32> = managed.iter().map(|i| i.0).collect();
        known.extend([1, 2, 3, 6, 7]);
        known.extend(p.ipcache.iter().map(|e| e.identity.0));
        let mut seen = BTreeSet::new();
        p.rules = a
            .rules
            .iter()
            .chain(&b.rules)
            .filter(|r| managed.contains(&r.key.local) && r.key.peer.is_none_or(|id| known.contains(&id.0)))
            .filter(|r| seen.insert(r.key))
            .cloned()
            .collect();
        p.rules.sort();
        p.validate().expect("mixing keeps policies valid");
        p
    }
}
