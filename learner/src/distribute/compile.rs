//! Compiling the approved policy set into one [`NodePolicy`] per node. Pure: no I/O,
//! no clock, deterministic (sorted inputs, `BTreeMap`s) — equal inputs give equal
//! snapshots, so "did a node's policy change?" is a comparison.
//!
//! The compiled entries must decide exactly like [`bulkhead_synth::Evaluator`] (the
//! semantics analysts reviewed), given that the enforcer only knows a peer by the
//! identity its ipcache yields for the peer's address. The construction:
//! * every prefix that an identity source knows (endpoint addresses, the sources'
//!   extra prefixes, CIDR groups) or that a rule names (CIDRs and their excepts,
//!   CIDR-group prefixes, FQDN addresses) is an *atom*; the addresses an LPM lookup
//!   resolves to an atom are the atom's prefix minus the longer atoms inside it;
//! * an atom's *base* identity is what the resolver says about its addresses (the
//!   identity of the longest known prefix containing it, else world);
//! * atoms of managed workloads and reserved entities keep their identity: peers of
//!   that kind are matched by identity only. External atoms (world, CIDR groups) get a
//!   node-policy-local identity each, because whether a CIDR / FQDN rule matches
//!   depends on the address: since every prefix a rule names is itself an atom, an
//!   atom lies either wholly inside or wholly outside it, so "rule matches atom" is
//!   well defined — and a rule naming a CIDR names the atoms nested inside it.
//!
//! Rules are expanded from selectors over the atoms, ports over ranges; an entry two
//! rules produce is kept once with the lower `rule_id` (verdicts name that one).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use bulkhead_model::node_policy::LOCAL_IDENTITY_FIRST;
use bulkhead_model::{
    Direction, EndpointCgroup, HttpRule, Identity, IpcacheEntry, NodePolicy, NodePolicyError, NodeRule, Peer, Policy,
    PolicyEndpoint, Protocol, ReservedIdentity, RolloutMode, Rule, RuleKey, RuleRef,
};
use bulkhead_synth::{IdentityInfo, IdentityKind};
use ipnet::IpNet;

use crate::store::EndpointRow;

/// A policy of the active set with the proposal version it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourcePolicy {
    pub proposal_id: i64,
    pub policy: Policy,
}

/// Everything compilation reads. Borrowed; callers keep ownership.
#[derive(Debug, Clone, Copy)]
pub struct CompileInput<'a> {
    /// Version stamped on every node's snapshot.
    pub version: u64,
    /// The active policy set (per target the newest approved or deployed policy).
    pub policies: &'a [SourcePolicy],
    /// Allocated identities with labels and kind (CIDR groups carry their prefixes).
    pub identities: &'a [IdentityInfo],
    /// Explicit rollout modes; absent = learn.
    pub modes: &'a BTreeMap<Identity, RolloutMode>,
    /// Every node's endpoints (the store's latest snapshots).
    pub endpoints: &'a [EndpointRow],
    /// Prefixes identity sources know beyond the endpoints (inventory workloads'
    /// addresses and CIDRs, pod IPs), lower priority than endpoint addresses.
    pub prefixes: &'a [(IpNet, Identity)],
    /// DNS name → addresses it resolved to (still valid), for FQDN peers.
    pub fqdn: &'a BTreeMap<String, Vec<IpAddr>>,
}

/// Why compilation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("node {node}: more than {max} rule entries after expanding selectors and port ranges")]
    TooManyRules { node: String, max: usize },
    #[error("node {node}: more than {max} local identities")]
    TooManyLocalIdentities { node: String, max: usize },
    #[error("node {node}: compiled policy is invalid: {source}")]
    Invalid { node: String, source: NodePolicyError },
}

/// One atom: a prefix (or none, for identities the datapath knows without an address)
/// with the identity it gets in the ipcache and its base identity.
#[derive(Debug, Clone, Copy)]
struct Atom {
    prefix: Option<IpNet>,
    id: Identity,
    base: Identity,
    external: bool,
}

/// Where a rule comes from: (policy position, direction, rule index).
type RuleSource = (usize, Direction, usize);

/// Compiles the policy set for every node that has endpoints. Nodes without managed
/// workloads in monitor or enforce get an empty policy (nothing to attach to).
pub fn compile(input: &CompileInput<'_>) -> Result<BTreeMap<String, NodePolicy>, CompileError> {
    let infos: BTreeMap<Identity, &IdentityInfo> = input.identities.iter().map(|i| (i.id, i)).collect();

    // Policies in a fixed order; rule ids follow it so one approved rule has the same
    // id on every node.
    let mut order: Vec<usize> = (0..input.policies.len()).collect();
    order.sort_by(|&a, &b| {
        let (pa, pb) = (&input.policies[a], &input.policies[b]);
        (pa.proposal_id, &pa.policy.name).cmp(&(pb.proposal_id, &pb.policy.name))
    });
    let mut rule_ids: BTreeMap<RuleSource, u32> = BTreeMap::new();
    let mut refs: BTreeMap<u32, RuleRef> = BTreeMap::new();
    for &pi in &order {
        let sp = &input.policies[pi];
        for direction in [Direction::Ingress, Direction::Egress] {
            for (ri, _) in sp.policy.rules(direction).unwrap_or_default().iter().enumerate() {
                let id = u32::try_from(refs.len() + 1).unwrap_or(u32::MAX);
                rule_ids.insert((pi, direction, ri), id);
                refs.insert(
                    id,
                    RuleRef {
                        rule_id: id,
                        proposal_id: sp.proposal_id,
                        policy_name: sp.policy.name.clone(),
                        direction,
                        rule_index: u32::try_from(ri).unwrap_or(u32::MAX),
                    },
                );
            }
        }
    }

    // Prefixes the rules name: atoms on every node.
    let mut rule_prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for sp in input.policies {
        for direction in [Direction::Ingress, Direction::Egress] {
            for rule in sp.policy.rules(direction).unwrap_or_default() {
                match &rule.peer {
                    Peer::Cidr { cidr, except } => {
                        rule_prefixes.insert(cidr.trunc());
                        rule_prefixes.extend(except.iter().map(IpNet::trunc));
                    }
                    Peer::CidrGroup { cidrs, .. } => rule_prefixes.extend(cidrs.iter().map(IpNet::trunc)),
                    Peer::Fqdn { name, addresses } => {
                        let resolved = input.fqdn.get(name).into_iter().flatten();
                        rule_prefixes.extend(addresses.iter().chain(resolved).map(|a| IpNet::from(*a)));
                    }
                    Peer::Workloads { .. } | Peer::Entity { .. } => {}
                }
            }
        }
    }

    let nodes: BTreeSet<&str> = input.endpoints.iter().map(|e| e.node_id.as_str()).collect();
    let mut out = BTreeMap::new();
    for node in nodes {
        let policy = compile_node(input, node, &infos, &order, &rule_ids, &refs, &rule_prefixes)?;
        policy.validate().map_err(|source| CompileError::Invalid { node: node.to_owned(), source })?;
        out.insert(node.to_owned(), policy);
    }
    Ok(out)
}

fn is_group(infos: &BTreeMap<Identity, &IdentityInfo>, id: Identity) -> bool {
    infos.get(&id).is_some_and(|i| matches!(i.kind, IdentityKind::CidrGroup { .. }))
}

/// Whether `id` is a managed workload policies can select.
fn selectable<'a>(infos: &BTreeMap<Identity, &'a IdentityInfo>, id: Identity) -> Option<&'a IdentityInfo> {
    infos.get(&id).copied().filter(|i| i.kind == IdentityKind::Workload && !id.is_reserved())
}

fn routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local() && !v6.is_unspecified(),
    }
}

/// The prefixes identity sources know, as `node` sees them: its own endpoints first
/// (managed before unmanaged, then by inode — the resolver's order), then other
/// nodes' by name, where a node's own namespace is `host` and another's `remote-node`;
/// then the extra prefixes, then CIDR groups.
fn known_prefixes(
    input: &CompileInput<'_>,
    node: &str,
    infos: &BTreeMap<Identity, &IdentityInfo>,
) -> BTreeMap<IpNet, Identity> {
    let mut rows: Vec<&EndpointRow> = input.endpoints.iter().collect();
    rows.sort_by_key(|e| (e.node_id != node, e.node_id.as_str(), e.identity.is_reserved(), e.fact.netns_ino));
    let mut known: BTreeMap<IpNet, Identity> = BTreeMap::new();
    for e in rows {
        let id = match (e.fact.host, e.node_id == node) {
            (true, true) => Identity::HOST,
            (true, false) => Identity::from(ReservedIdentity::RemoteNode),
            (false, _) => e.identity,
        };
        for a in e.fact.addresses.iter().filter(|a| routable(a.addr)) {
            known.entry(IpNet::from(a.addr)).or_insert(id);
        }
    }
    let mut extra: Vec<(IpNet, Identity)> = input.prefixes.iter().map(|(p, id)| (p.trunc(), *id)).collect();
    extra.sort();
    for (p, id) in extra {
        known.entry(p).or_insert(id);
    }
    for info in infos.values() {
        if let IdentityKind::CidrGroup { cidrs } = &info.kind {
            for c in cidrs {
                known.entry(c.trunc()).or_insert(info.id);
            }
        }
    }
    known
}

/// The value of the longest key of `map` containing `net` (itself included).
fn longest_containing(map: &BTreeMap<IpNet, Identity>, net: IpNet) -> Option<Identity> {
    (0..=net.prefix_len()).rev().find_map(|len| {
        let candidate = IpNet::new(net.network(), len).ok()?.trunc();
        map.get(&candidate).copied()
    })
}

fn atoms(
    input: &CompileInput<'_>,
    node: &str,
    infos: &BTreeMap<Identity, &IdentityInfo>,
    rule_prefixes: &BTreeSet<IpNet>,
) -> Result<Vec<Atom>, CompileError> {
    let known = known_prefixes(input, node, infos);
    let external = |id: Identity| id == Identity::WORLD || is_group(infos, id);
    let all: BTreeSet<IpNet> = known.keys().copied().chain(rule_prefixes.iter().copied()).collect();
    let mut out = Vec::with_capacity(all.len() + ReservedIdentity::ALL.len());
    let mut next_local = LOCAL_IDENTITY_FIRST;
    for prefix in all {
        let base = longest_containing(&known, prefix).unwrap_or(Identity::WORLD);
        if external(base) {
            let id = Identity(next_local);
            next_local = next_local.checked_add(1).ok_or_else(|| CompileError::TooManyLocalIdentities {
                node: node.to_owned(),
                max: u32::MAX as usize,
            })?;
            out.push(Atom { prefix: Some(prefix), id, base, external: true });
        } else if known.contains_key(&prefix) {
            out.push(Atom { prefix: Some(prefix), id: base, base, external: false });
        }
        // A rule prefix inside a managed workload's prefix resolves like its ancestor
        // (same identity, never external): no entry needed.
    }
    // Identities the datapath may know without an address (world: in no prefix).
    for r in ReservedIdentity::ALL {
        let id = Identity::from(r);
        out.push(Atom { prefix: None, id, base: id, external: external(id) });
    }
    Ok(out)
}

/// Whether every address LPM resolves to `atom` is one of `peer` (module docs).
fn peer_matches(
    peer: &Peer,
    atom: &Atom,
    infos: &BTreeMap<Identity, &IdentityInfo>,
    fqdn: &BTreeMap<String, Vec<IpAddr>>,
) -> bool {
    let inside = |outer: &IpNet| atom.prefix.is_some_and(|p| outer.trunc().contains(&p));
    match peer {
        Peer::Workloads { selector } => selectable(infos, atom.base).is_some_and(|i| selector.matches(&i.labels)),
        Peer::Entity { entity: ReservedIdentity::World } => atom.external,
        Peer::Entity { entity } => atom.base == Identity::from(*entity),
        Peer::Cidr { cidr, except } => atom.external && inside(cidr) && !except.iter().any(inside),
        Peer::CidrGroup { name, cidrs } => {
            infos.get(&atom.base).is_some_and(|i| matches!(i.kind, IdentityKind::CidrGroup { .. }) && &i.name == name)
                || (atom.external && cidrs.iter().any(inside))
        }
        Peer::Fqdn { name, addresses } => {
            atom.external
                && atom.prefix.is_some_and(|p| {
                    p.prefix_len() == p.max_prefix_len() && {
                        let a = p.addr();
                        addresses.contains(&a) || fqdn.get(name).is_some_and(|s| s.contains(&a))
                    }
                })
        }
    }
}

/// (port, protocol) entries of a rule: empty = any protocol and port; a full range =
/// any port of the protocol; otherwise each port (0 is not connectable).
fn port_entries(rule: &Rule) -> Vec<(Option<u16>, Option<bulkhead_model::Protocol>)> {
    if rule.ports.is_empty() {
        return vec![(None, None)];
    }
    let mut out = Vec::new();
    for r in &rule.ports {
        if r.first == 0 && r.last == u16::MAX {
            out.push((None, Some(r.protocol)));
        } else {
            out.extend((r.first.max(1)..=r.last).map(|p| (Some(p), Some(r.protocol))));
        }
    }
    out
}

fn compile_node(
    input: &CompileInput<'_>,
    node: &str,
    infos: &BTreeMap<Identity, &IdentityInfo>,
    order: &[usize],
    rule_ids: &BTreeMap<RuleSource, u32>,
    refs: &BTreeMap<u32, RuleRef>,
    rule_prefixes: &BTreeSet<IpNet>,
) -> Result<NodePolicy, CompileError> {
    // Which policies select each enforced identity on this node (sorted by `order`).
    let mut selecting: BTreeMap<Identity, Vec<usize>> = BTreeMap::new();
    let mut rows: Vec<&EndpointRow> = input.endpoints.iter().filter(|e| e.node_id == node && !e.fact.host).collect();
    rows.sort_by_key(|e| (e.identity, e.fact.netns_ino));
    let mode_of = |id: Identity| input.modes.get(&id).copied().unwrap_or(RolloutMode::Learn);
    rows.retain(|e| mode_of(e.identity) != RolloutMode::Learn);
    for e in &rows {
        selecting.entry(e.identity).or_insert_with(|| match selectable(infos, e.identity) {
            Some(info) => {
                order.iter().copied().filter(|&pi| input.policies[pi].policy.selector.matches(&info.labels)).collect()
            }
            None => Vec::new(),
        });
    }
    if rows.is_empty() {
        return Ok(NodePolicy { version: input.version, ..NodePolicy::default() });
    }

    let covered = |id: Identity, direction: Direction| {
        selecting.get(&id).into_iter().flatten().any(|&pi| input.policies[pi].policy.rules(direction).is_some())
    };
    // A cgroup identifies an endpoint only when it holds that endpoint's processes
    // alone. One reported by several endpoints of the node — the host's root cgroup on
    // a machine whose workloads are bare network namespaces, or a stale report — is
    // nobody's: judging it by cgroup_skb would judge everything in it as this workload
    // (or, attached below it, nothing at all). Such endpoints are judged by tc on their
    // namespace's interfaces instead.
    let mut cgroup_users: BTreeMap<u64, usize> = BTreeMap::new();
    for e in input.endpoints.iter().filter(|e| e.node_id == node) {
        let ids: BTreeSet<u64> = e.fact.cgroups.iter().map(|c| c.cgroup_id).collect();
        for id in ids {
            *cgroup_users.entry(id).or_default() += 1;
        }
    }
    let mut endpoints = Vec::with_capacity(rows.len());
    for e in &rows {
        let mut cgroups: Vec<EndpointCgroup> = e
            .fact
            .cgroups
            .iter()
            .filter(|c| c.path.starts_with('/') && cgroup_users.get(&c.cgroup_id) == Some(&1))
            .map(|c| EndpointCgroup { cgroup_id: c.cgroup_id, path: c.path.clone() })
            .collect();
        cgroups.sort();
        cgroups.dedup();
        endpoints.push(PolicyEndpoint {
            identity: e.identity,
            netns_ino: Some(e.fact.netns_ino),
            netns_name: e.fact.netns_name.clone(),
            cgroups,
            mode: mode_of(e.identity),
            ingress_covered: covered(e.identity, Direction::Ingress),
            egress_covered: covered(e.identity, Direction::Egress),
        });
    }

    let atoms = atoms(input, node, infos, rule_prefixes)?;
    let ipcache: Vec<IpcacheEntry> =
        atoms.iter().filter_map(|a| Some(IpcacheEntry { prefix: a.prefix?, identity: a.id })).collect();

    // Rule entries, lowest rule id first so a shared key keeps the lower id. Each key
    // also collects the HTTP rules it allows: `None` once any rule allows it at L4.
    let mut peers_of: BTreeMap<RuleSource, Vec<Identity>> = BTreeMap::new();
    let mut keys: BTreeMap<RuleKey, (u32, Option<BTreeSet<HttpRule>>)> = BTreeMap::new();
    for (&local, policies) in &selecting {
        for &pi in policies {
            let policy = &input.policies[pi].policy;
            for direction in [Direction::Ingress, Direction::Egress] {
                for (ri, rule) in policy.rules(direction).unwrap_or_default().iter().enumerate() {
                    let source = (pi, direction, ri);
                    let Some(&rule_id) = rule_ids.get(&source) else { continue };
                    let peers = peers_of.entry(source).or_insert_with(|| {
                        let set: BTreeSet<Identity> = atoms
                            .iter()
                            .filter(|a| peer_matches(&rule.peer, a, infos, input.fqdn))
                            .map(|a| a.id)
                            .collect();
                        set.into_iter().collect()
                    });
                    for &peer in peers.iter() {
                        for (port, protocol) in port_entries(rule) {
                            let key = RuleKey { local, direction, peer: Some(peer), port, protocol };
                            let http = l7_part(rule, &key);
                            match keys.entry(key) {
                                std::collections::btree_map::Entry::Vacant(v) => {
                                    v.insert((rule_id, http));
                                }
                                std::collections::btree_map::Entry::Occupied(mut o) => {
                                    let slot = &mut o.get_mut().1;
                                    *slot = union_l7(slot.take(), http);
                                }
                            }
                            if keys.len() > bulkhead_model::node_policy::MAX_RULES {
                                return Err(CompileError::TooManyRules {
                                    node: node.to_owned(),
                                    max: bulkhead_model::node_policy::MAX_RULES,
                                });
                            }
                        }
                    }
                }
            }
        }
    }
    let rules = resolve_l7(keys);
    let used: BTreeSet<u32> = rules.iter().map(|r| r.rule_id).collect();
    Ok(NodePolicy {
        version: input.version,
        ipcache,
        endpoints,
        rules,
        rule_refs: used.iter().filter_map(|id| refs.get(id).cloned()).collect(),
    })
}

/// The HTTP rules `rule` narrows `key` to, `None` for L4. The datapath reads request
/// lines arriving at a server, so only ingress TCP entries can be narrowed; an L7 rule
/// on anything else (egress, UDP, any protocol) is enforced at L4 — wider than
/// written, never narrower, and the proposal's lints say so.
fn l7_part(rule: &Rule, key: &RuleKey) -> Option<BTreeSet<HttpRule>> {
    let l7_key = key.direction == Direction::Ingress && key.protocol == Some(Protocol::Tcp);
    (rule.is_l7() && l7_key).then(|| rule.http.iter().cloned().collect())
}

/// Union of what two rules allow on one key: L4 wins, HTTP rules add up.
fn union_l7(a: Option<BTreeSet<HttpRule>>, b: Option<BTreeSet<HttpRule>>) -> Option<BTreeSet<HttpRule>> {
    let (mut a, b) = (a?, b?);
    a.extend(b);
    Some(a)
}

/// The final entries. The datapath stops at the first entry its probes find (exact
/// port before any port, …), so an L7 entry must already carry everything a wider
/// entry for the same connection allows: it becomes L4 when a covering entry is L4,
/// and takes the covering entries' HTTP rules otherwise (NetworkPolicy's union).
fn resolve_l7(keys: BTreeMap<RuleKey, (u32, Option<BTreeSet<HttpRule>>)>) -> Vec<NodeRule> {
    let covering = |k: RuleKey| {
        NodePolicy::PROBE_ORDER.into_iter().filter_map(move |probe| {
            let wider = RuleKey {
                local: k.local,
                direction: k.direction,
                peer: if probe.any_peer { None } else { k.peer },
                port: if probe.any_port { None } else { k.port },
                protocol: if probe.any_protocol { None } else { k.protocol },
            };
            (wider != k).then_some(wider)
        })
    };
    keys.iter()
        .map(|(key, (rule_id, http))| {
            let mut http = http.clone();
            for wider in covering(*key) {
                if let Some((_, other)) = keys.get(&wider) {
                    http = union_l7(http, other.clone());
                }
            }
            NodeRule { key: *key, rule_id: *rule_id, http: http.map(|h| h.into_iter().collect()).unwrap_or_default() }
        })
        .collect()
}
