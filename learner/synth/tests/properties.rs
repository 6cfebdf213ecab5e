//! Property tests over generated scenarios (hundreds of workloads, random labels and
//! edges): the promises of the crate docs, checked with the policy evaluator.

mod common;

use std::collections::{BTreeMap, HashSet};

use bulkhead_model::{Direction, Identity, Level, PortRange, Proposal, Protocol, WidenedPair};
use bulkhead_synth::{Connection, Evaluator, Input, SideVerdict, approved_policy, synthesize};
use common::*;
use proptest::prelude::*;

const PORTS: [u16; 4] = [80, 443, 5432, 9090];

/// Every proposal approved with all its flagged rules confirmed.
fn confirmed_set(ps: &[Proposal]) -> Vec<bulkhead_model::Policy> {
    ps.iter()
        .map(|p| {
            let flagged: Vec<String> = p.rules.iter().filter(|r| !r.flags.is_empty()).map(|r| r.id.clone()).collect();
            approved_policy(p, &flagged, &[]).expect("confirming every flagged rule is a valid approval")
        })
        .collect()
}

fn level_strategy() -> impl Strategy<Value = Level> {
    prop_oneof![Just(Level::Exact), Just(Level::Labels), Just(Level::Namespace)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn observed_edges_are_allowed_and_unobserved_ones_are_listed(
        seed in any::<u64>(),
        workloads in 60usize..160,
        edge_factor in 2usize..6,
        level in level_strategy(),
    ) {
        let g = generated(seed, workloads, workloads * edge_factor, &PORTS);
        let input = Input { identities: &g.identities, edges: &g.edges, external: &g.external, ..Default::default() };
        let ps = synthesize(&input, &options(level));
        prop_assert_eq!(ps.len(), g.identities.len(), "one proposal per workload");
        let set = confirmed_set(&ps);
        let fqdn = BTreeMap::new();
        let ev = Evaluator::new(&set, &g.identities, &fqdn);

        // 1. Everything observed passes (flagged rules confirmed).
        for e in &g.edges {
            let world = e.key.src == Identity::WORLD || e.key.dst == Identity::WORLD;
            let addrs: Vec<_> = if world {
                g.external.iter().filter(|x| x.local == e.key.src && x.port == e.key.dst_port).map(|x| Some(x.addr)).collect()
            } else {
                vec![None]
            };
            for addr in addrs {
                let c = Connection { src: e.key.src, dst: e.key.dst, src_addr: None, dst_addr: addr, dst_port: e.key.dst_port, protocol: e.key.protocol };
                let d = ev.decide(&c);
                prop_assert!(d.allowed(), "observed {:?} at {:?} denied: {:?}", e.key, addr, d);
            }
        }

        // 2. Nothing unobserved between known workloads passes unless listed as widening
        //    by the rules that allow it, on both sides.
        let observed: HashSet<(Identity, Identity, u16)> = g.edges.iter().map(|e| (e.key.src, e.key.dst, e.key.dst_port)).collect();
        let by_target: BTreeMap<Identity, &Proposal> = ps.iter().map(|p| (p.target, p)).collect();
        let mut unobserved_allowed = 0u64;
        for a in &g.identities {
            for b in &g.identities {
                for port in PORTS {
                    if observed.contains(&(a.id, b.id, port)) {
                        continue;
                    }
                    let c = Connection { src: a.id, dst: b.id, src_addr: None, dst_addr: None, dst_port: port, protocol: Protocol::Tcp };
                    let d = ev.decide(&c);
                    if !d.allowed() {
                        continue;
                    }
                    unobserved_allowed += 1;
                    prop_assert!(level != Level::Exact, "exact level allowed unobserved {:?} -> {:?}:{}", a.id, b.id, port);
                    for (side, dir, local, peer) in [(&d.ingress, Direction::Ingress, b.id, a.id), (&d.egress, Direction::Egress, a.id, b.id)] {
                        let SideVerdict::Allowed { policy, rule } = side else {
                            return Err(TestCaseError::fail(format!("every workload is covered both ways: {side:?}")));
                        };
                        let p = by_target[&local];
                        prop_assert_eq!(&set[*policy].name, &p.policy.name);
                        let r = &set[*policy].rules(dir).expect("covered")[*rule];
                        let proposed = p.rules.iter().find(|x| x.direction == dir && &x.rule == r).expect("rule comes from the proposal");
                        let pair = WidenedPair { peer, port: PortRange::single(Protocol::Tcp, port) };
                        prop_assert!(proposed.widens.contains(&pair), "{:?} allows unlisted {:?} (level {})", proposed.id, pair, level);
                    }
                }
            }
        }
        if level == Level::Exact {
            prop_assert!(ps.iter().all(|p| p.widening_total == 0));
        }
        if level == Level::Namespace {
            // Namespace-wide peers over 4 namespaces always open something: the widening
            // checks above did run.
            prop_assert!(unobserved_allowed > 0);
        }
    }

    #[test]
    fn every_observed_http_request_is_allowed(
        seed in any::<u64>(),
        level in level_strategy(),
        prefix_after in 1usize..6,
    ) {
        let g = generated(seed, 80, 320, &PORTS);
        // HTTP facts on most port-80 edges: paths from a small tree (so prefixes form),
        // some edges also opaque (those ports must stay L4).
        let mut rng = common::Rng::new(seed ^ 0x7);
        let methods = ["GET", "POST", "PUT"];
        let mut facts = Vec::new();
        let mut observed = Vec::new();
        for e in g.edges.iter().filter(|e| e.key.dst_port == 80 && e.key.src != Identity::WORLD) {
            if rng.below(5) == 0 {
                continue;
            }
            let n = 1 + rng.below(6);
            let reqs: Vec<(String, String, u64)> = (0..n)
                .map(|_| {
                    let m = methods[rng.below(3) as usize].to_owned();
                    let p = format!("/v{}/{}/{}", rng.below(2), ["a", "b", "c"][rng.below(3) as usize], rng.below(12));
                    (m, p, 1 + rng.below(9))
                })
                .collect();
            let refs: Vec<(&str, &str, u64)> = reqs.iter().map(|(m, p, n)| (m.as_str(), p.as_str(), *n)).collect();
            let mut h = http(e.key.src.0, e.key.dst.0, 80, &refs);
            h.key = e.key;
            if rng.below(6) == 0 {
                (h.opaque_connections, h.opaque_last_seen_unix_ms) = (1, Some(e.last_seen_unix_ms));
            }
            observed.extend(reqs.into_iter().map(|(m, p, _)| (e.key, m, p)));
            facts.push(h);
        }
        let opts = bulkhead_synth::Options { http_prefix_after: prefix_after, ..options(level) };
        let input = Input { identities: &g.identities, edges: &g.edges, external: &g.external, http: &facts, ..Default::default() };
        let ps = synthesize(&input, &opts);
        let set = confirmed_set(&ps);
        let fqdn = BTreeMap::new();
        let ev = Evaluator::new(&set, &g.identities, &fqdn);
        for (key, m, p) in &observed {
            let c = Connection { src: key.src, dst: key.dst, src_addr: None, dst_addr: None, dst_port: key.dst_port, protocol: key.protocol };
            let d = ev.decide_request(&c, m, p);
            prop_assert!(d.allowed(), "observed {m} {p} on {key:?} denied: {d:?}");
        }
        // Some port did get narrowed, or the property checked little.
        prop_assert!(facts.is_empty() || set.iter().flat_map(|p| p.ingress.iter().flatten()).any(|r| r.is_l7()));
    }

    #[test]
    fn output_is_deterministic_and_independent_of_input_order(seed in any::<u64>(), level in level_strategy()) {
        let g = generated(seed, 120, 500, &PORTS);
        let opts = options(level);
        let a = synthesize(&Input { identities: &g.identities, edges: &g.edges, external: &g.external, ..Default::default() }, &opts);
        let mut ids = g.identities.clone();
        let mut edges = g.edges.clone();
        let mut ext = g.external.clone();
        let mut rng = common::Rng::new(seed ^ 0xABCD);
        shuffle(&mut ids, &mut rng);
        shuffle(&mut edges, &mut rng);
        shuffle(&mut ext, &mut rng);
        let b = synthesize(&Input { identities: &ids, edges: &edges, external: &ext, ..Default::default() }, &opts);
        prop_assert_eq!(serde_json::to_string(&a).expect("json"), serde_json::to_string(&b).expect("json"));
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut common::Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}
