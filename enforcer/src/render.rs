//! The enforcer's pure core (STYLE.md "pure up to the syscall"): [`render`] turns a
//! [`NodePolicy`] into the exact entries the kernel maps must hold ([`MapState`]),
//! and [`diff`] turns two such states into the ordered [`MapOp`]s that take the
//! maps from one to the other without any packet seeing half a policy. The one task
//! that owns the maps applies the ops; nothing here touches the kernel.
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

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use bulkhead_abi::enforcer::{self as abi, EndpointKey, EndpointValue, IpcacheKey, PolicyKey, PolicyValue};
use bulkhead_model::{Direction, Identity, NodePolicy, Protocol, RolloutMode};
use ipnet::{IpNet, Ipv6Net};

/// How many entries the kernel maps hold; [`render_with`] refuses more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// `IPCACHE_V1` prefixes.
    pub ipcache: usize,
    /// `ENDPOINTS_V1` entries (one per cgroup or network-namespace workload).
    pub endpoints: usize,
    /// `POLICY_V1` entries of one generation: the map holds two while a new one is
    /// written, so this is half the map's capacity.
    pub policy_per_generation: usize,
}

impl Capacity {
    /// The ABI's default map sizes.
    pub const DEFAULT: Self = Self {
        ipcache: abi::DEFAULT_IPCACHE_ENTRIES as usize,
        endpoints: abi::DEFAULT_ENDPOINTS as usize,
        policy_per_generation: (abi::DEFAULT_POLICY_ENTRIES / 2) as usize,
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

/// `::ffff:0:0/96`, where the kernel keeps IPv4.
const V4_MAPPED: IpcachePrefix = IpcachePrefix { prefixlen: 96, addr: abi::v4_mapped([0; 4]) };

/// Everything the kernel maps should hold for one policy (conntrack, counters and
/// events are the kernel's own and not modelled).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapState {
    /// The generation `policy` is written under, and the active one once applied.
    pub generation: u32,
    /// `IPCACHE_V1`.
    pub ipcache: BTreeMap<IpcachePrefix, u32>,
    /// `ENDPOINTS_V1`.
    pub endpoints: BTreeMap<EndpointKey, EndpointValue>,
    /// `POLICY_V1` entries of `generation` (every key has `generation` in it).
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
}

/// One step of taking the maps from one [`MapState`] to another, in [`diff`] order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    /// Insert or overwrite an ipcache prefix.
    UpsertIpcache { prefix: IpcachePrefix, identity: u32 },
    /// Insert or overwrite an endpoint.
    UpsertEndpoint { key: EndpointKey, value: EndpointValue },
    /// Write every entry of a generation that is not active yet.
    WriteGeneration { generation: u32, entries: Vec<(PolicyKey, PolicyValue)> },
    /// Flip `ENF_CONFIG_V1.active_generation` (one map update).
    Activate { generation: u32 },
    /// Delete every entry of an inactive generation.
    DeleteGeneration { generation: u32 },
    /// Insert or overwrite one entry of the *active* generation. Only emitted when
    /// both states share a generation and their policies still differ (not atomic:
    /// render a changed policy under a new generation instead).
    UpsertPolicy { key: PolicyKey, value: PolicyValue },
    /// Delete one entry of the active generation (see [`MapOp::UpsertPolicy`]).
    DeletePolicy { key: PolicyKey },
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
        let value = EndpointValue { identity: e.identity.0, mode, flags, _pad: [0; 2] };
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
        let value = PolicyValue { rule_id: r.rule_id, action: abi::ACTION_ALLOW, _pad: [0; 3] };
        if let Some(first) = state.policy.insert(key, value)
            && first != value
        {
            return Err(RenderError::ConflictingRule { index });
        }
    }
    too_many(abi::POLICY, state.policy.len(), capacity.policy_per_generation)?;
    Ok(state)
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
/// applied: ipcache and endpoint upserts, then (when the generation changes) the
/// whole new generation, its activation and the deletion of the old one, then
/// endpoint and ipcache deletes. New prefixes and workloads exist before a policy
/// naming them is active; old ones go only after it no longer is.
///
/// Render the target under a generation other than the applied one (the map
/// owner's `active + 1`): only then is the policy change atomic. With equal
/// generations a changed policy is patched entry by entry ([`MapOp::UpsertPolicy`],
/// [`MapOp::DeletePolicy`]), which keeps `diff` total but not atomic.
pub fn diff(from: &MapState, to: &MapState) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (prefix, identity) in &to.ipcache {
        if from.ipcache.get(prefix) != Some(identity) {
            ops.push(MapOp::UpsertIpcache { prefix: *prefix, identity: *identity });
        }
    }
    for (key, value) in &to.endpoints {
        if from.endpoints.get(key) != Some(value) {
            ops.push(MapOp::UpsertEndpoint { key: *key, value: *value });
        }
    }
    if from.generation != to.generation {
        let entries = to.policy.iter().map(|(k, v)| (*k, *v)).collect();
        ops.push(MapOp::WriteGeneration { generation: to.generation, entries });
        ops.push(MapOp::Activate { generation: to.generation });
        ops.push(MapOp::DeleteGeneration { generation: from.generation });
    } else {
        for (key, value) in &to.policy {
            if from.policy.get(key) != Some(value) {
                ops.push(MapOp::UpsertPolicy { key: *key, value: *value });
            }
        }
        for key in from.policy.keys().filter(|k| !to.policy.contains_key(k)) {
            ops.push(MapOp::DeletePolicy { key: *key });
        }
    }
    for key in from.endpoints.keys().filter(|k| !to.endpoints.contains_key(k)) {
        ops.push(MapOp::DeleteEndpoint { key: *key });
    }
    for prefix in from.ipcache.keys().filter(|p| !to.ipcache.contains_key(p)) {
        ops.push(MapOp::DeleteIpcache { prefix: *prefix });
    }
    ops
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use bulkhead_model::node_policy::LOCAL_IDENTITY_FIRST;
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

    /// LPM over the ipcache; a miss is world.
    fn kernel_identity(state: &MapState, ip: IpAddr) -> u32 {
        let addr = kernel_addr(ip);
        state
            .ipcache
            .iter()
            .filter(|(p, _)| p.contains(&addr))
            .max_by_key(|(p, _)| p.prefixlen)
            .map_or(abi::IDENTITY_WORLD, |(_, id)| *id)
    }

    /// ENDPOINTS by cgroup, coverage flags, then POLICY_PROBES under the active
    /// generation.
    fn kernel_decide(
        state: &MapState,
        cgroup_id: u64,
        direction: Direction,
        peer: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> RuleVerdict {
        let Some(ep) = state.endpoints.get(&EndpointKey { cgroup_id }) else { return RuleVerdict::NotCovered };
        let bit = match direction {
            Direction::Ingress => abi::EP_INGRESS_COVERED,
            Direction::Egress => abi::EP_EGRESS_COVERED,
        };
        if ep.mode == abi::MODE_LEARN || ep.mode == 0 || ep.flags & bit == 0 {
            return RuleVerdict::NotCovered;
        }
        let peer_identity = kernel_identity(state, peer);
        for (with_peer, with_port, with_proto) in abi::POLICY_PROBES {
            let key = PolicyKey {
                generation: state.generation,
                local_identity: ep.identity,
                peer_identity: if with_peer { peer_identity } else { abi::IDENTITY_ANY },
                port: if with_port { port } else { 0 },
                protocol: if with_proto { protocol.number() } else { 0 },
                direction: direction_to_abi(direction),
            };
            if let Some(v) = state.policy.get(&key) {
                assert_eq!(v.action, abi::ACTION_ALLOW);
                return RuleVerdict::Allowed { rule_id: v.rule_id };
            }
        }
        RuleVerdict::DefaultDeny
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
        let ep = EndpointValue { identity: 257, mode: abi::MODE_ENFORCE, flags: abi::EP_INGRESS_COVERED, _pad: [0; 2] };
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
        assert_eq!(s.policy.get(&exact), Some(&PolicyValue { rule_id: 1, action: abi::ACTION_ALLOW, _pad: [0; 3] }));
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
                    let mut r = p.rules[0];
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
        let cap = Capacity { ipcache: 3, endpoints: 2, policy_per_generation: 2 };
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
        let want =
            EndpointValue { identity: 256, mode: abi::MODE_MONITOR, flags: abi::EP_EGRESS_COVERED, _pad: [0; 2] };
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
                MapOp::UpsertIpcache { .. } => "upsert-ipcache",
                MapOp::UpsertEndpoint { .. } => "upsert-endpoint",
                MapOp::WriteGeneration { generation: 2, .. } => "write-2",
                MapOp::Activate { generation: 2 } => "activate-2",
                MapOp::DeleteGeneration { generation: 1 } => "delete-1",
                MapOp::DeleteEndpoint { .. } => "delete-endpoint",
                MapOp::DeleteIpcache { .. } => "delete-ipcache",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "upsert-ipcache",
                "upsert-endpoint",
                "write-2",
                "activate-2",
                "delete-1",
                "delete-endpoint",
                "delete-ipcache"
            ]
        );
        assert!(diff(&b, &b).is_empty(), "no change, no ops");
        let same_gen = render(&sample(), 2).expect("renders");
        assert!(
            diff(&same_gen, &b).iter().any(|op| matches!(op, MapOp::DeletePolicy { .. })),
            "a changed policy under one generation is patched entry by entry"
        );
    }

    /// The kernel maps as [`MapOp`]s change them: `POLICY_V1` holds every generation
    /// written and not yet deleted; packets see only the active one.
    #[derive(Debug)]
    struct KernelMaps {
        active: u32,
        ipcache: BTreeMap<IpcachePrefix, u32>,
        endpoints: BTreeMap<EndpointKey, EndpointValue>,
        policy: BTreeMap<PolicyKey, PolicyValue>,
    }

    impl KernelMaps {
        fn new(s: &MapState) -> Self {
            Self {
                active: s.generation,
                ipcache: s.ipcache.clone(),
                endpoints: s.endpoints.clone(),
                policy: s.policy.clone(),
            }
        }

        fn apply(&mut self, op: &MapOp) {
            match op {
                MapOp::UpsertIpcache { prefix, identity } => {
                    self.ipcache.insert(*prefix, *identity);
                }
                MapOp::DeleteIpcache { prefix } => {
                    self.ipcache.remove(prefix);
                }
                MapOp::UpsertEndpoint { key, value } => {
                    self.endpoints.insert(*key, *value);
                }
                MapOp::DeleteEndpoint { key } => {
                    self.endpoints.remove(key);
                }
                MapOp::WriteGeneration { generation, entries } => {
                    assert_ne!(*generation, self.active, "writing the active generation");
                    for (k, v) in entries {
                        assert_eq!(k.generation, *generation);
                        self.policy.insert(*k, *v);
                    }
                }
                MapOp::Activate { generation } => self.active = *generation,
                MapOp::DeleteGeneration { generation } => {
                    assert_ne!(*generation, self.active, "deleting the active generation");
                    self.policy.retain(|k, _| k.generation != *generation);
                }
                MapOp::UpsertPolicy { key, value } => {
                    self.policy.insert(*key, *value);
                }
                MapOp::DeletePolicy { key } => {
                    self.policy.remove(key);
                }
            }
        }

        /// What packets see.
        fn active_policy(&self) -> BTreeMap<PolicyKey, PolicyValue> {
            self.policy.iter().filter(|(k, _)| k.generation == self.active).map(|(k, v)| (*k, *v)).collect()
        }

        fn state(&self) -> MapState {
            MapState {
                generation: self.active,
                ipcache: self.ipcache.clone(),
                endpoints: self.endpoints.clone(),
                policy: self.active_policy(),
            }
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
                    p.rules.push(NodeRule { key, rule_id });
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
            a in arb_policy(),
            b in arb_policy(),
            gen_a in any::<u32>(),
            next in any::<bool>(),
        ) {
            let cap = Capacity::DEFAULT;
            let from = render_resolved(&a, gen_a, &cap, &resolve_all(&a)).expect("renders");
            let gen_b = if next { gen_a.wrapping_add(1) } else { gen_a };
            let to = render_resolved(&b, gen_b, &cap, &resolve_all(&b)).expect("renders");
            let ops = diff(&from, &to);
            let mut kernel = KernelMaps::new(&from);
            for op in &ops {
                kernel.apply(op);
                if gen_a != gen_b {
                    // No packet ever sees half a policy.
                    let seen = kernel.active_policy();
                    prop_assert!(seen == from.policy || seen == to.policy, "half a policy after {:?}", op);
                }
            }
            prop_assert_eq!(kernel.state(), to.clone());
            prop_assert_eq!(kernel.policy.len(), to.policy.len(), "no generation left behind");
            // Ordering: upserts before the flip, deletes after it.
            if let Some(flip) = ops.iter().position(|op| matches!(op, MapOp::Activate { .. })) {
                for (i, op) in ops.iter().enumerate() {
                    match op {
                        MapOp::UpsertIpcache { .. } | MapOp::UpsertEndpoint { .. } | MapOp::WriteGeneration { .. } => {
                            prop_assert!(i < flip)
                        }
                        MapOp::DeleteGeneration { .. } | MapOp::DeleteEndpoint { .. } | MapOp::DeleteIpcache { .. } => {
                            prop_assert!(i > flip)
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}
