//! The reference scenario (DESIGN.md §9) as data.

mod common;

use std::collections::BTreeMap;

use bulkhead_model::{Identity, LabelSelector, Level, Peer, PortRange, Proposal, Protocol};
use bulkhead_synth::{Connection, Evaluator, Input, SideVerdict, synthesize};
use common::*;

fn propose(level: Level) -> Vec<Proposal> {
    let r = reference();
    synthesize(&Input { identities: &r.identities, edges: &r.edges, ..Default::default() }, &options(level))
}

fn for_target(ps: &[Proposal], id: u32) -> &Proposal {
    ps.iter().find(|p| p.target == Identity(id)).expect("a proposal for every workload")
}

fn attempt(src: u32) -> Connection {
    Connection {
        src: Identity(src),
        dst: Identity(DEATHSTAR),
        src_addr: None,
        dst_addr: None,
        dst_port: 80,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn exact_level_allows_tiefighter_to_80_tcp_and_nothing_else() {
    let ps = propose(Level::Exact);
    let ds = for_target(&ps, DEATHSTAR);
    let ingress = ds.policy.ingress.as_ref().expect("ingress covered");
    assert_eq!(ingress.len(), 1, "{ingress:?}");
    assert_eq!(ingress[0].ports, vec![PortRange::single(Protocol::Tcp, 80)]);
    let Peer::Workloads { selector } = &ingress[0].peer else {
        panic!("workload peer expected: {:?}", ingress[0].peer)
    };
    assert_eq!(selector.match_labels.get("class").map(String::as_str), Some("tiefighter"));
    assert_eq!(ds.policy.egress, Some(vec![]), "deathstar never connected out: egress deny-all");
    assert_eq!(ds.widening_total, 0);
    let rule = &ds.rules[0];
    assert_eq!(rule.evidence.connections, 42);
    assert_eq!(rule.evidence.peers, vec![Identity(TIEFIGHTER)]);
    assert_eq!(rule.evidence.edges.len(), 1);
    assert!(ds.convergence.converged, "last new edge 10 h ago, quiet period 1 h");
    assert_eq!(ds.policy.name, "bulkhead-deathstar");
    assert_eq!(ds.policy.namespace.as_deref(), Some("default"));
}

#[test]
fn labels_level_allows_the_empire_and_lists_what_it_widens() {
    let ps = propose(Level::Labels);
    let ds = for_target(&ps, DEATHSTAR);
    let ingress = ds.policy.ingress.as_ref().expect("ingress covered");
    assert_eq!(ingress.len(), 1);
    let want = LabelSelector::with_labels([("io.kubernetes.pod.namespace", "default"), ("org", "empire")]);
    assert_eq!(ingress[0].peer, Peer::Workloads { selector: want });
    // org=empire also selects deathstar itself, which never connected to itself.
    let rule = &ds.rules[0];
    assert_eq!(rule.widens_total, 1);
    assert_eq!(rule.widens[0].peer, Identity(DEATHSTAR));
    assert_eq!(ds.widening_total, 1);
}

#[test]
fn replay_shows_xwing_as_would_deny() {
    for level in [Level::Exact, Level::Labels, Level::Namespace] {
        let ps = propose(level);
        let r = reference();
        let fqdn = BTreeMap::new();
        // The deathstar proposal alone …
        let alone = [for_target(&ps, DEATHSTAR).policy.clone()];
        let ev = Evaluator::new(&alone, &r.identities, &fqdn);
        assert!(ev.decide(&attempt(TIEFIGHTER)).allowed(), "{level}: tiefighter lands");
        let xwing = ev.decide(&attempt(XWING));
        if level == Level::Namespace {
            // The namespace level opens deathstar to all of `default` — xwing included;
            // the proposal must say so.
            assert!(xwing.allowed());
            let rule = &for_target(&ps, DEATHSTAR).rules[0];
            assert!(rule.widens.iter().any(|w| w.peer == Identity(XWING)), "{level}: widening lists xwing");
            continue;
        }
        assert!(!xwing.allowed(), "{level}: xwing must be denied");
        assert_eq!(xwing.ingress, SideVerdict::DefaultDeny { policies: vec![0] });
        // … and the whole set (xwing's own egress is covered and empty too).
        let all: Vec<_> = ps.iter().map(|p| p.policy.clone()).collect();
        let ev = Evaluator::new(&all, &r.identities, &fqdn);
        assert!(ev.decide(&attempt(TIEFIGHTER)).allowed());
        let d = ev.decide(&attempt(XWING));
        assert!(!d.egress.allows() && !d.ingress.allows(), "{d:?}");
    }
}
