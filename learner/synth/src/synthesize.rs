//! From the service graph to one [`Proposal`] per workload.
//!
//! For a target workload and each covered direction:
//! 1. the edges (and external observations) seen in the window are split into workload
//!    peers, reserved entities, inventory CIDR groups and external addresses;
//! 2. hygiene holds back what looks hostile (scans, metadata access) as flagged rules;
//! 3. peers become rules at the requested [`Level`](bulkhead_model::Level), externals
//!    become FQDN / CIDR rules, entities stay entities;
//! 4. with an active policy: its rules are carried over (drift adds, it never silently
//!    removes), unused ones are suggested for removal, and new external egress is
//!    flagged;
//! 5. ingress ports where every connection was plaintext HTTP are narrowed to the
//!    observed requests ([`crate::l7`]);
//! 6. every rule gets its evidence and what it widens; the proposal its lints and
//!    convergence.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use bulkhead_model::{
    Convergence, Direction, Edge, EdgeHttp, EdgeKey, HttpEvidence, HygieneFlag, Identity, Lint, LintCode, Peer, Policy,
    PortRange, Proposal, ProposedRule, Protocol, RemovalSuggestion, ReservedIdentity, Rule, Severity, WidenedPair,
};

use crate::evaluate::Evaluator;
use crate::evidence::Agg;
use crate::external::{DnsIndex, external_rules};
use crate::hygiene;
use crate::index::LabelIndex;
use crate::input::{ExternalObservation, IdentityInfo, IdentityKind, Input, Options};
use crate::l7;
use crate::lint;
use crate::naming::policy_name;
use crate::peers::{GroupedRule, PeerPorts, workload_rules};

/// Synthesizes a proposal for every workload identity (or `opts.targets`), sorted by
/// target. Pure and deterministic: the same input gives the same output.
pub fn synthesize(input: &Input<'_>, opts: &Options) -> Vec<Proposal> {
    let index = LabelIndex::new(input.identities);
    let active: Vec<Policy> = input.active.iter().map(|a| a.policy.clone()).collect();
    let active_by_target: HashMap<Identity, usize> =
        input.active.iter().enumerate().map(|(n, a)| (a.target, n)).collect();
    let fqdn_seen: BTreeMap<String, Vec<IpAddr>> = {
        let mut m: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
        for d in input.dns {
            m.entry(d.name.clone()).or_default().insert(d.addr);
        }
        m.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
    };
    let evaluator = Evaluator::new(&active, input.identities, &fqdn_seen);
    let mut edges_by_local: HashMap<Identity, Vec<(Direction, &Edge)>> = HashMap::new();
    for e in input.edges {
        edges_by_local.entry(e.key.src).or_default().push((Direction::Egress, e));
        edges_by_local.entry(e.key.dst).or_default().push((Direction::Ingress, e));
    }
    let w = opts.window;
    let mut external_by_local: HashMap<Identity, Vec<&ExternalObservation>> = HashMap::new();
    for x in
        input.external.iter().filter(|x| x.last_seen_unix_ms >= w.from_unix_ms && x.first_seen_unix_ms <= w.to_unix_ms)
    {
        external_by_local.entry(x.local).or_default().push(x);
    }
    let ctx = Ctx {
        opts,
        http: input.http.iter().map(|h| (h.key, h)).collect(),
        edges_by_key: input.edges.iter().map(|e| (e.key, e)).collect(),
        index: &index,
        evaluator: &evaluator,
        dns: DnsIndex::new(input.dns, opts.dns_grace_ms),
        edges_by_local,
        external_by_local,
        active_by_target,
        lint: lint::Population::new(&index, input.edges, opts),
        dns_clients: input.dns.iter().filter_map(|d| d.client).collect(),
    };
    let wanted: Option<HashSet<Identity>> = opts.targets.as_ref().map(|t| t.iter().copied().collect());
    let targets: Vec<&IdentityInfo> =
        index.workloads().iter().copied().filter(|t| wanted.as_ref().is_none_or(|w| w.contains(&t.id))).collect();
    // Targets are independent: split them over threads, keep the order.
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let chunk = targets.len().div_ceil(threads.max(1)).max(64);
    let mut proposals: Vec<Proposal> = std::thread::scope(|scope| {
        let ctx = &ctx;
        let handles: Vec<_> = targets
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(|t| ctx.propose(t)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    dedupe_names(&mut proposals);
    proposals
}

/// Two workloads whose names sanitize alike in one namespace get `-<identity>` suffixes,
/// so exported objects never overwrite each other.
fn dedupe_names(proposals: &mut [Proposal]) {
    let mut count: HashMap<(Option<String>, String), usize> = HashMap::new();
    for p in proposals.iter() {
        *count.entry((p.policy.namespace.clone(), p.policy.name.clone())).or_default() += 1;
    }
    for p in proposals.iter_mut() {
        if count[&(p.policy.namespace.clone(), p.policy.name.clone())] > 1 {
            p.policy.name = format!("{}-{}", p.policy.name, p.target.0);
        }
    }
}

struct Ctx<'a> {
    opts: &'a Options,
    http: HashMap<EdgeKey, &'a EdgeHttp>,
    edges_by_key: HashMap<EdgeKey, &'a Edge>,
    index: &'a LabelIndex<'a>,
    /// Over the active policies (index = position in `Input::active`).
    evaluator: &'a Evaluator<'a>,
    dns: DnsIndex<'a>,
    edges_by_local: HashMap<Identity, Vec<(Direction, &'a Edge)>>,
    external_by_local: HashMap<Identity, Vec<&'a ExternalObservation>>,
    active_by_target: HashMap<Identity, usize>,
    lint: lint::Population<'a>,
    dns_clients: HashSet<Identity>,
}

/// A rule being assembled for a proposal.
#[derive(Debug)]
struct Candidate {
    direction: Direction,
    rule: Rule,
    agg: Agg,
    flags: BTreeSet<HygieneFlag>,
    /// Evidence of `rule.http`, in the same (sorted) order.
    http: Vec<HttpEvidence>,
}

/// Everything observed for one target in one direction.
#[derive(Debug, Default)]
struct Observed {
    workloads: BTreeMap<Identity, PeerPorts>,
    entities: BTreeMap<ReservedIdentity, PeerPorts>,
    groups: BTreeMap<Identity, PeerPorts>,
    external: BTreeMap<IpAddr, PeerPorts>,
    /// `world` edges by port (their keys are the external rules' covered edges).
    world_edges: BTreeMap<PortRange, Vec<(EdgeKey, Agg)>>,
    /// (peer, port) pairs seen — what "widening" is measured against.
    pairs: HashSet<(Identity, PortRange)>,
}

impl Observed {
    fn is_empty(&self) -> bool {
        self.pairs.is_empty() && self.external.is_empty()
    }
}

impl Ctx<'_> {
    fn in_window(&self, e: &Edge) -> bool {
        e.last_seen_unix_ms >= self.opts.window.from_unix_ms && e.first_seen_unix_ms <= self.opts.window.to_unix_ms
    }

    fn propose(&self, t: &IdentityInfo) -> Proposal {
        let opts = self.opts;
        let active = self.active_by_target.get(&t.id).map(|&n| (n, &self.evaluator.policies()[n]));
        let mut candidates = Vec::new();
        let mut observed_any = false;
        let mut pairs_by_dir: HashMap<Direction, HashSet<(Identity, PortRange)>> = HashMap::new();
        let mut l7_lints = Vec::new();
        for (dir, covered) in [(Direction::Ingress, opts.cover_ingress), (Direction::Egress, opts.cover_egress)] {
            if !covered {
                continue;
            }
            let obs = self.observe(t.id, dir);
            observed_any |= !obs.is_empty();
            let mut fresh = self.direction_candidates(t, dir, &obs);
            if dir == Direction::Ingress && opts.http_rules {
                fresh = self.narrow_http(fresh, &mut l7_lints);
            }
            if let Some((n, policy)) = active {
                self.merge_active(t.id, dir, n, policy, &mut fresh);
            }
            candidates.extend(fresh);
            pairs_by_dir.insert(dir, obs.pairs);
        }

        let mut rules: Vec<ProposedRule> = Vec::new();
        candidates.sort_by(|a, b| {
            (a.direction, !a.flags.is_empty(), &a.rule).cmp(&(b.direction, !b.flags.is_empty(), &b.rule))
        });
        let mut counters: HashMap<Direction, usize> = HashMap::new();
        for c in candidates {
            let n = counters.entry(c.direction).or_default();
            let id = format!("{}-{n}", c.direction.as_str());
            *n += 1;
            let (widens, widens_total) = match pairs_by_dir.get(&c.direction) {
                Some(pairs) => self.widening(&c.rule, pairs),
                None => (Vec::new(), 0),
            };
            let mut evidence = c.agg.finish();
            evidence.http = c.http;
            rules.push(ProposedRule {
                id,
                direction: c.direction,
                included: c.flags.is_empty(),
                flags: c.flags.into_iter().collect(),
                rule: c.rule,
                evidence,
                widens,
                widens_total,
            });
        }

        let namespace = t.labels.namespace().map(str::to_owned);
        let pick = |d: Direction, covered: bool| {
            covered.then(|| rules.iter().filter(|r| r.direction == d && r.included).map(|r| r.rule.clone()).collect())
        };
        let mut policy = Policy {
            name: policy_name(&t.name),
            namespace,
            selector: self
                .index
                .exact_selector_of(t.id)
                .cloned()
                .unwrap_or_else(|| self.index.exact_selector(&t.labels)),
            ingress: pick(Direction::Ingress, opts.cover_ingress),
            egress: pick(Direction::Egress, opts.cover_egress),
        };
        policy.normalize();

        let removals = active.map(|(_, p)| self.removals(t.id, p)).unwrap_or_default();
        let convergence = self.convergence(t.id);
        let mut lints = self.lint.lints(t, &policy, &rules, observed_any, self.dns_clients.contains(&t.id));
        lints.extend(l7_lints);
        Proposal {
            target: t.id,
            workload: t.name.clone(),
            level: opts.level,
            window: opts.window,
            widening_total: rules.iter().filter(|r| r.included).map(|r| r.widens_total).sum(),
            policy,
            rules,
            convergence,
            lints,
            removals,
        }
    }

    /// Splits the target's window traffic in `dir` by kind of peer.
    fn observe(&self, t: Identity, dir: Direction) -> Observed {
        let mut obs = Observed::default();
        for (d, e) in self.edges_by_local.get(&t).into_iter().flatten() {
            if *d != dir || !self.in_window(e) {
                continue;
            }
            let peer = if dir == Direction::Egress { e.key.dst } else { e.key.src };
            let port = PortRange::single(e.key.protocol, e.key.dst_port);
            if peer == Identity::WORLD {
                let mut agg = Agg::default();
                agg.add(e.connections, e.bytes, e.first_seen_unix_ms, e.last_seen_unix_ms);
                agg.edges.push(e.key);
                agg.peers.push(peer);
                obs.world_edges.entry(port).or_default().push((e.key, agg));
                continue;
            }
            let slot = match (peer.reserved(), self.index.get(peer).map(|i| &i.kind)) {
                (Some(r), _) => obs.entities.entry(r).or_default(),
                (None, Some(IdentityKind::Workload)) => obs.workloads.entry(peer).or_default(),
                (None, Some(IdentityKind::CidrGroup { .. })) => obs.groups.entry(peer).or_default(),
                // An identity synthesis was not told about cannot be named safely; it
                // stays unallowed and so shows up in replay as would-deny.
                (None, None) => continue,
            };
            obs.pairs.insert((peer, port));
            // Straight into the slot: one allocation per list, not a temporary merged in.
            let agg = slot.entry(port).or_default();
            agg.add(e.connections, e.bytes, e.first_seen_unix_ms, e.last_seen_unix_ms);
            agg.edges.push(e.key);
            agg.peers.push(peer);
        }
        for x in self.external_by_local.get(&t).into_iter().flatten() {
            if x.direction != dir {
                continue;
            }
            let port = PortRange::single(x.protocol, x.port);
            let mut agg = Agg::default();
            agg.add(x.connections, x.bytes, x.first_seen_unix_ms, x.last_seen_unix_ms);
            agg.peers.push(Identity::WORLD);
            agg.addresses.push(x.addr);
            for (key, _) in obs.world_edges.get(&port).into_iter().flatten() {
                agg.edges.push(*key);
            }
            obs.external.entry(x.addr).or_default().entry(port).or_default().merge(&agg);
        }
        obs
    }

    fn direction_candidates(&self, t: &IdentityInfo, dir: Direction, obs: &Observed) -> Vec<Candidate> {
        let opts = self.opts;
        let mut out = Vec::new();
        let plain = |g: GroupedRule, flags: BTreeSet<HygieneFlag>| Candidate {
            direction: dir,
            rule: g.rule,
            agg: g.agg,
            flags,
            http: Vec::new(),
        };

        // Workload peers: scans are held back per peer, the rest generalized.
        let (scans, normal): (BTreeMap<_, _>, BTreeMap<_, _>) = obs
            .workloads
            .iter()
            .map(|(k, v)| (*k, v))
            .partition(|(_, ports)| hygiene::is_scan(ports.len(), opts.scan_min_ports));
        for g in workload_rules(self.index, opts.level, &normal) {
            out.push(plain(g, BTreeSet::new()));
        }
        for g in workload_rules(self.index, bulkhead_model::Level::Exact, &scans) {
            out.push(plain(g, BTreeSet::from([HygieneFlag::PortScan])));
        }
        for (entity, ports) in &obs.entities {
            let flags = if hygiene::is_scan(ports.len(), opts.scan_min_ports) {
                BTreeSet::from([HygieneFlag::PortScan])
            } else {
                BTreeSet::new()
            };
            out.push(plain(grouped(Peer::Entity { entity: *entity }, ports), flags));
        }
        for (id, ports) in &obs.groups {
            let Some(IdentityInfo { name, kind: IdentityKind::CidrGroup { cidrs }, .. }) = self.index.get(*id) else {
                continue;
            };
            let peer = Peer::CidrGroup { name: name.clone(), cidrs: cidrs.clone() };
            out.push(plain(grouped(peer, ports), BTreeSet::new()));
        }

        // External addresses: metadata and scanning addresses alone and flagged; the
        // rest named (egress: DNS) or aggregated.
        let mut normal: BTreeMap<IpAddr, PeerPorts> = BTreeMap::new();
        for (addr, ports) in &obs.external {
            let mut flags = BTreeSet::new();
            if dir == Direction::Egress && hygiene::is_metadata(*addr) {
                flags.insert(HygieneFlag::CloudMetadata);
            }
            if hygiene::is_scan(ports.len(), opts.scan_min_ports) {
                flags.insert(HygieneFlag::PortScan);
            }
            if flags.is_empty() {
                normal.insert(*addr, ports.clone());
            } else {
                let single = BTreeMap::from([(*addr, ports.clone())]);
                for g in external_rules(&single, &BTreeMap::new(), |_| Vec::new(), &opts.cidr) {
                    out.push(plain(g, flags.clone()));
                }
            }
        }
        let names: BTreeMap<IpAddr, &str> = if dir == Direction::Egress {
            normal
                .iter()
                .filter_map(|(addr, ports)| {
                    let first = ports.values().filter_map(|a| a.first_seen_unix_ms).min()?;
                    let last = ports.values().filter_map(|a| a.last_seen_unix_ms).max()?;
                    Some((*addr, self.dns.name_for(t.id, *addr, first, last)?))
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        let now = opts.window.to_unix_ms;
        for g in external_rules(&normal, &names, |name| self.dns.current_addresses(t.id, name, now), &opts.cidr) {
            out.push(plain(g, BTreeSet::new()));
        }
        // `world` edges whose addresses are no longer on record (flows expire, edges
        // don't): all that can be said is "world" on those ports.
        let covered_ports: BTreeSet<PortRange> = obs.external.values().flat_map(|p| p.keys().copied()).collect();
        let mut world = PeerPorts::new();
        for (port, edges) in &obs.world_edges {
            if !covered_ports.contains(port) {
                for (_, agg) in edges {
                    world.entry(*port).or_default().merge(agg);
                }
            }
        }
        if !world.is_empty() {
            out.push(plain(grouped(Peer::Entity { entity: ReservedIdentity::World }, &world), BTreeSet::new()));
        }
        // First-seen external egress needs a human: flag what no active policy allowed.
        if dir == Direction::Egress {
            let active = self.active_by_target.get(&t.id).copied();
            for c in out.iter_mut().filter(|c| c.flags.is_empty() && is_new_external(&c.rule.peer)) {
                if !active.is_some_and(|n| self.active_allows_all(n, dir, c)) {
                    c.flags.insert(HygieneFlag::NewExternalEgress);
                }
            }
        }
        out
    }

    /// Whether active policy `n` already allows every observation behind `c`: each
    /// peer, address and port, and at L7 each of its HTTP rules (an L4 candidate needs
    /// an L4 active rule; an HTTP rule needs an active rule that is L4 or covers it).
    fn active_allows_all(&self, n: usize, dir: Direction, c: &Candidate) -> bool {
        let Some(rules) = self.evaluator.policies()[n].rules(dir) else { return true };
        let addrs: Vec<Option<IpAddr>> =
            if c.agg.addresses.is_empty() { vec![None] } else { c.agg.addresses.iter().map(|a| Some(*a)).collect() };
        let peers = &c.agg.peers;
        c.rule.ports.iter().all(|port| {
            peers.iter().all(|peer| {
                addrs.iter().all(|addr| {
                    let allowing = |r: &&Rule| self.evaluator.rule_allows(r, *peer, *addr, port.protocol, port.first);
                    if c.rule.http.is_empty() {
                        return rules.iter().filter(allowing).any(|r| r.http.is_empty());
                    }
                    // Each HTTP rule may be covered by a different active rule.
                    c.rule.http.iter().all(|h| {
                        rules.iter().filter(allowing).any(|r| r.http.is_empty() || r.http.iter().any(|a| a.covers(h)))
                    })
                })
            })
        })
    }

    /// Narrows ingress candidates to HTTP rules port by port ([`l7::narrow`]). A
    /// candidate whose ports decide differently is split: each narrowed port becomes a
    /// rule of its own (with its own requests), the rest stays one L4 rule. Only
    /// workload and in-cluster entity peers: their evidence is per edge, which is what
    /// the HTTP facts are kept by.
    fn narrow_http(&self, candidates: Vec<Candidate>, lints: &mut Vec<Lint>) -> Vec<Candidate> {
        let mut out = Vec::with_capacity(candidates.len());
        for mut c in candidates {
            let eligible = match &c.rule.peer {
                Peer::Workloads { .. } => true,
                Peer::Entity { entity } => *entity != ReservedIdentity::World,
                _ => false,
            };
            if !eligible || !c.rule.http.is_empty() {
                out.push(c);
                continue;
            }
            let mut narrowed: Vec<(PortRange, Vec<HttpEvidence>)> = Vec::new();
            for port in c.rule.ports.iter().filter(|p| p.protocol == Protocol::Tcp && p.is_single()) {
                let edges: Vec<(EdgeKey, Option<&EdgeHttp>)> = c
                    .agg
                    .edges
                    .iter()
                    .filter(|k| k.protocol == port.protocol && k.dst_port == port.first)
                    .map(|k| (*k, self.http.get(k).copied()))
                    .collect();
                match l7::narrow(&edges, self.opts.window, self.opts) {
                    l7::Outcome::NoData => {}
                    l7::Outcome::Narrow(ev) => narrowed.push((*port, ev)),
                    l7::Outcome::Stays(reason) => lints.push(Lint {
                        code: LintCode::HttpNotNarrowed,
                        severity: Severity::Info,
                        message: format!(
                            "Ingress from {} on {port} stays L4 (any request) although HTTP was seen: {}.",
                            c.rule.peer,
                            reason.describe()
                        ),
                    }),
                }
            }
            if narrowed.is_empty() {
                out.push(c);
                continue;
            }
            if narrowed.len() == 1 && c.rule.ports.len() == 1 {
                let (_, ev) = narrowed.remove(0);
                c.rule.http = ev.iter().map(|e| e.rule.clone()).collect();
                c.http = ev;
                out.push(c);
                continue;
            }
            let split: HashSet<PortRange> = narrowed.iter().map(|(p, _)| *p).collect();
            let on = |k: &EdgeKey, p: &PortRange| k.protocol == p.protocol && k.dst_port == p.first;
            for (port, ev) in narrowed {
                out.push(Candidate {
                    direction: c.direction,
                    rule: Rule {
                        peer: c.rule.peer.clone(),
                        ports: vec![port],
                        http: ev.iter().map(|e| e.rule.clone()).collect(),
                    },
                    agg: self.agg_of(&c.agg, |k| on(k, &port)),
                    flags: c.flags.clone(),
                    http: ev,
                });
            }
            let rest: Vec<PortRange> = c.rule.ports.iter().filter(|p| !split.contains(p)).copied().collect();
            if !rest.is_empty() {
                let agg = self.agg_of(&c.agg, |k| !split.iter().any(|p| on(k, p)));
                out.push(Candidate { rule: Rule::l4(c.rule.peer.clone(), rest), agg, ..c });
            }
        }
        out
    }

    /// Evidence for the HTTP rules of an existing (active) rule: the window's requests
    /// on the edges in `agg` that each of them matches.
    fn http_evidence(&self, rule: &Rule, agg: &Agg) -> Vec<HttpEvidence> {
        let w = self.opts.window;
        rule.http
            .iter()
            .map(|h| {
                let mut ev = HttpEvidence {
                    rule: h.clone(),
                    requests: 0,
                    first_seen_unix_ms: 0,
                    last_seen_unix_ms: 0,
                    paths: 0,
                    generalized: !matches!(h.path, bulkhead_model::HttpPath::Exact(_)),
                };
                let seen = agg.edges.iter().filter_map(|k| self.http.get(k)).flat_map(|e| &e.requests);
                let in_window = |r: &&bulkhead_model::EdgeHttpRequest| {
                    r.last_seen_unix_ms >= w.from_unix_ms && r.first_seen_unix_ms <= w.to_unix_ms
                };
                let mut paths = BTreeSet::new();
                for r in seen.filter(in_window).filter(|r| h.matches(&r.method, &r.path)) {
                    let first = if paths.is_empty() { r.first_seen_unix_ms } else { ev.first_seen_unix_ms };
                    ev.first_seen_unix_ms = first.min(r.first_seen_unix_ms);
                    ev.last_seen_unix_ms = ev.last_seen_unix_ms.max(r.last_seen_unix_ms);
                    ev.requests = ev.requests.saturating_add(r.requests);
                    paths.insert((&r.method, &r.path));
                }
                ev.paths = paths.len() as u64;
                ev
            })
            .collect()
    }

    /// The evidence of the ingress edges in `agg` that `keep` selects, rebuilt from the
    /// edges themselves.
    fn agg_of(&self, agg: &Agg, keep: impl Fn(&EdgeKey) -> bool) -> Agg {
        let mut out = Agg::default();
        for k in agg.edges.iter().filter(|k| keep(k)) {
            if let Some(e) = self.edges_by_key.get(k) {
                out.add(e.connections, e.bytes, e.first_seen_unix_ms, e.last_seen_unix_ms);
                out.edges.push(*k);
                out.peers.push(k.src);
            }
        }
        out
    }

    /// Drift: rules of the active policy stay (with evidence), new candidates that the
    /// active policy already allows are dropped, so the diff shows only what is new.
    fn merge_active(&self, t: Identity, dir: Direction, n: usize, policy: &Policy, fresh: &mut Vec<Candidate>) {
        let Some(active_rules) = policy.rules(dir) else { return };
        fresh.retain(|c| !c.flags.is_empty() || !self.active_allows_all(n, dir, c));
        for rule in active_rules {
            let mut agg = Agg::default();
            for (d, e) in self.edges_by_local.get(&t).into_iter().flatten() {
                let peer = if dir == Direction::Egress { e.key.dst } else { e.key.src };
                if *d == dir
                    && self.in_window(e)
                    && self.evaluator.rule_allows(rule, peer, None, e.key.protocol, e.key.dst_port)
                {
                    agg.add(e.connections, e.bytes, e.first_seen_unix_ms, e.last_seen_unix_ms);
                    agg.edges.push(e.key);
                    agg.peers.push(peer);
                }
            }
            for x in self.external_by_local.get(&t).into_iter().flatten().filter(|x| x.direction == dir) {
                if self.evaluator.rule_allows(rule, Identity::WORLD, Some(x.addr), x.protocol, x.port) {
                    agg.add(x.connections, x.bytes, x.first_seen_unix_ms, x.last_seen_unix_ms);
                    agg.addresses.push(x.addr);
                    agg.peers.push(Identity::WORLD);
                }
            }
            let http = self.http_evidence(rule, &agg);
            fresh.push(Candidate { direction: dir, rule: rule.clone(), agg, flags: BTreeSet::new(), http });
        }
    }

    /// Active rules nothing used for `unused_after_ms` (any time on record, not just
    /// the window).
    fn removals(&self, t: Identity, policy: &Policy) -> Vec<RemovalSuggestion> {
        let now = self.opts.window.to_unix_ms;
        let mut out = Vec::new();
        for dir in [Direction::Ingress, Direction::Egress] {
            for rule in policy.rules(dir).into_iter().flatten() {
                let mut last: Option<i64> = None;
                for (d, e) in self.edges_by_local.get(&t).into_iter().flatten() {
                    let peer = if dir == Direction::Egress { e.key.dst } else { e.key.src };
                    if *d == dir && self.evaluator.rule_allows(rule, peer, None, e.key.protocol, e.key.dst_port) {
                        last = last.max(Some(e.last_seen_unix_ms));
                    }
                }
                for x in self.external_by_local.get(&t).into_iter().flatten().filter(|x| x.direction == dir) {
                    if self.evaluator.rule_allows(rule, Identity::WORLD, Some(x.addr), x.protocol, x.port) {
                        last = last.max(Some(x.last_seen_unix_ms));
                    }
                }
                if last.is_none_or(|l| now.saturating_sub(l) >= self.opts.unused_after_ms) {
                    out.push(RemovalSuggestion { direction: dir, rule: rule.clone(), last_used_unix_ms: last });
                }
            }
        }
        out
    }

    /// (peer, port) pairs among known workloads that `rule` allows but nobody used.
    fn widening(&self, rule: &Rule, observed: &HashSet<(Identity, PortRange)>) -> (Vec<WidenedPair>, u64) {
        let Peer::Workloads { selector } = &rule.peer else { return (Vec::new(), 0) };
        let mut examples = Vec::new();
        let mut total = 0u64;
        self.index.for_each_selected(selector, |w| {
            for port in &rule.ports {
                if !observed.contains(&(w.id, *port)) {
                    total += 1;
                    if examples.len() < self.opts.max_widening_examples {
                        examples.push(WidenedPair { peer: w.id, port: *port });
                    }
                }
            }
        });
        (examples, total)
    }

    fn convergence(&self, t: Identity) -> Convergence {
        let w = self.opts.window;
        let last_new = self
            .edges_by_local
            .get(&t)
            .into_iter()
            .flatten()
            .map(|(_, e)| e.first_seen_unix_ms)
            .filter(|f| *f <= w.to_unix_ms)
            .max();
        let since = last_new.unwrap_or(w.from_unix_ms);
        Convergence {
            converged: w.to_unix_ms.saturating_sub(since) >= self.opts.quiet_period_ms,
            last_new_edge_unix_ms: last_new,
            quiet_period_ms: self.opts.quiet_period_ms,
        }
    }
}

/// External peers an analyst must confirm the first time. Inventory CIDR groups are
/// exempt: an operator named them on purpose.
fn is_new_external(peer: &Peer) -> bool {
    matches!(peer, Peer::Cidr { .. } | Peer::Fqdn { .. } | Peer::Entity { entity: ReservedIdentity::World })
}

fn grouped(peer: Peer, ports: &PeerPorts) -> GroupedRule {
    let mut agg = Agg::default();
    for a in ports.values() {
        agg.merge(a);
    }
    GroupedRule { rule: Rule::l4(peer, ports.keys().copied().collect()), agg }
}
