//! Compilation: table cases for the reference scenario and the tricky peers, and the
//! property that compiled rules decide like the evaluator analysts reviewed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use bulkhead_model::HttpRule;
use bulkhead_model::node_policy::LOCAL_IDENTITY_FIRST;
use bulkhead_model::{
    CgroupFact, Direction, EndpointFact, Identity, InterfaceAddress, LabelSelector, Labels, NodePolicy, Peer, Policy,
    PortRange, Protocol, ReservedIdentity, RolloutMode, Rule, RuleVerdict,
};
use bulkhead_synth::{Connection, Evaluator, IdentityInfo, IdentityKind};
use ipnet::IpNet;
use proptest::prelude::*;

use super::compile::{CompileInput, SourcePolicy, compile};
use crate::store::EndpointRow;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("net")
}

fn workload(id: u32, pairs: &[(&str, &str)]) -> IdentityInfo {
    IdentityInfo::workload(Identity(id), format!("w{id}"), Labels::new(pairs.iter().copied()).expect("labels"))
}

fn group(id: u32, name: &str, cidrs: &[&str]) -> IdentityInfo {
    IdentityInfo {
        id: Identity(id),
        name: name.into(),
        labels: Labels::new([("bulkhead.io/cidr-group", name)]).expect("labels"),
        kind: IdentityKind::CidrGroup { cidrs: cidrs.iter().map(|c| net(c)).collect() },
        kubernetes: false,
        service_backend: false,
    }
}

fn endpoint(node: &str, id: Identity, ino: u64, addrs: &[IpAddr], host: bool) -> EndpointRow {
    EndpointRow {
        node_id: node.into(),
        fact: EndpointFact {
            netns_ino: ino,
            netns_name: Some(format!("ns{ino}")),
            addresses: addrs
                .iter()
                .map(|a| InterfaceAddress { interface: "eth0".into(), addr: *a, prefix_len: 24 })
                .collect(),
            cgroups: vec![CgroupFact { cgroup_id: ino * 10, path: format!("/bulkhead/{ino}"), comms: vec![] }],
            host,
        },
        identity: id,
        workload: None,
        updated_unix_ms: 0,
    }
}

fn rule(peer: Peer, ports: Vec<PortRange>) -> Rule {
    Rule::l4(peer, ports)
}

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector::with_labels(pairs.iter().copied())
}

/// The reference scenario: deathstar admits empire ships on 80/tcp.
struct Scenario {
    identities: Vec<IdentityInfo>,
    endpoints: Vec<EndpointRow>,
    policies: Vec<SourcePolicy>,
    modes: BTreeMap<Identity, RolloutMode>,
}

const DEATHSTAR: Identity = Identity(256);
const TIEFIGHTER: Identity = Identity(257);
const XWING: Identity = Identity(258);

fn scenario() -> Scenario {
    let identities = vec![
        workload(256, &[("org", "empire"), ("class", "deathstar")]),
        workload(257, &[("org", "empire"), ("class", "tiefighter")]),
        workload(258, &[("org", "alliance"), ("class", "xwing")]),
    ];
    let endpoints = vec![
        endpoint("node-a", DEATHSTAR, 1, &[ip("10.202.0.10")], false),
        endpoint("node-a", TIEFIGHTER, 2, &[ip("10.202.0.11")], false),
        endpoint("node-b", XWING, 3, &[ip("10.202.0.12")], false),
        endpoint("node-a", Identity::HOST, 4, &[ip("192.168.1.1")], true),
        endpoint("node-b", Identity::HOST, 5, &[ip("192.168.1.2")], true),
    ];
    let policies = vec![SourcePolicy {
        proposal_id: 7,
        policy: Policy {
            name: "bulkhead-deathstar".into(),
            namespace: None,
            selector: sel(&[("class", "deathstar")]),
            ingress: Some(vec![rule(
                Peer::Workloads { selector: sel(&[("org", "empire")]) },
                vec![PortRange::single(Protocol::Tcp, 80)],
            )]),
            egress: None,
        },
    }];
    let modes = BTreeMap::from([(DEATHSTAR, RolloutMode::Enforce), (XWING, RolloutMode::Learn)]);
    Scenario { identities, endpoints, policies, modes }
}

fn compile_scenario(s: &Scenario, fqdn: &BTreeMap<String, Vec<IpAddr>>) -> BTreeMap<String, NodePolicy> {
    compile(&CompileInput {
        version: 3,
        policies: &s.policies,
        identities: &s.identities,
        modes: &s.modes,
        endpoints: &s.endpoints,
        prefixes: &[],
        fqdn,
    })
    .expect("compiles")
}

/// A workload that is a bare network namespace whose processes sit in the host's
/// root cgroup (the demo host's layout) must be judged by tc on its namespace, not by
/// cgroup_skb on a cgroup every other process shares.
#[test]
fn a_cgroup_shared_with_another_endpoint_identifies_neither() {
    let mut s = scenario();
    let root = CgroupFact { cgroup_id: 1, path: "/".into(), comms: vec![] };
    for e in s.endpoints.iter_mut().filter(|e| e.node_id == "node-a") {
        e.fact.cgroups.push(root.clone());
    }
    let nodes = compile_scenario(&s, &BTreeMap::new());
    let ep = &nodes["node-a"].endpoints[0];
    assert_eq!(ep.identity, DEATHSTAR);
    assert_eq!(
        ep.cgroups.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
        ["/bulkhead/1"],
        "the shared root cgroup is dropped, deathstar's own stays"
    );

    // Only the shared one: no cgroup left, so the enforcer attaches tc in its namespace.
    for e in s.endpoints.iter_mut().filter(|e| e.node_id == "node-a") {
        e.fact.cgroups = vec![root.clone()];
    }
    let nodes = compile_scenario(&s, &BTreeMap::new());
    let ep = &nodes["node-a"].endpoints[0];
    assert!(ep.cgroups.is_empty(), "{:?}", ep.cgroups);
    assert_eq!((ep.netns_ino, ep.netns_name.as_deref()), (Some(1), Some("ns1")));
}

#[test]
fn reference_scenario_compiles_to_one_rule() {
    let s = scenario();
    let nodes = compile_scenario(&s, &BTreeMap::new());
    assert_eq!(nodes.keys().collect::<Vec<_>>(), ["node-a", "node-b"]);
    let a = &nodes["node-a"];
    assert_eq!(a.version, 3);
    assert_eq!(a.endpoints.len(), 1, "only deathstar is in monitor/enforce");
    let ep = &a.endpoints[0];
    assert_eq!(
        (ep.identity, ep.mode, ep.ingress_covered, ep.egress_covered),
        (DEATHSTAR, RolloutMode::Enforce, true, false)
    );
    assert_eq!(ep.cgroups[0].path, "/bulkhead/1");
    assert_eq!(a.rules.len(), 2, "deathstar admits both empire ships (itself included): {:?}", a.rules);
    assert_eq!(a.rule_refs.len(), 1);
    assert_eq!((a.rule_refs[0].proposal_id, a.rule_refs[0].rule_index), (7, 0));

    let ix = a.index();
    let tie = ix.identity_of(ip("10.202.0.11"));
    let xwing = ix.identity_of(ip("10.202.0.12"));
    assert_eq!((tie, xwing), (TIEFIGHTER, XWING), "peers on other nodes are in the ipcache");
    assert!(matches!(ix.decide(DEATHSTAR, Direction::Ingress, tie, 80, Protocol::Tcp), RuleVerdict::Allowed { .. }));
    assert_eq!(ix.decide(DEATHSTAR, Direction::Ingress, xwing, 80, Protocol::Tcp), RuleVerdict::DefaultDeny);
    assert_eq!(ix.decide(DEATHSTAR, Direction::Egress, xwing, 80, Protocol::Tcp), RuleVerdict::NotCovered);
    assert_eq!(ix.identity_of(ip("192.168.1.1")), Identity::HOST);
    assert_eq!(ix.identity_of(ip("192.168.1.2")), Identity::from(ReservedIdentity::RemoteNode));

    let b = &nodes["node-b"];
    assert!(b.endpoints.is_empty() && b.rules.is_empty(), "xwing is in learn: nothing to enforce on node-b");
}

#[test]
fn output_is_deterministic() {
    let s = scenario();
    let first = compile_scenario(&s, &BTreeMap::new());
    let mut shuffled = scenario();
    shuffled.endpoints.reverse();
    shuffled.identities.reverse();
    assert_eq!(compile_scenario(&shuffled, &BTreeMap::new()), first);
}

#[test]
fn cidr_rules_name_nested_prefixes_and_skip_excepts() {
    let mut s = scenario();
    s.identities.push(group(400, "partner", &["203.0.113.64/26"]));
    s.policies[0].policy.egress = Some(vec![
        rule(
            Peer::Cidr { cidr: net("203.0.113.0/24"), except: vec![net("203.0.113.128/25")] },
            vec![PortRange::single(Protocol::Tcp, 443)],
        ),
        rule(Peer::Fqdn { name: "api.example.com".into(), addresses: vec![] }, vec![]),
    ]);
    let fqdn = BTreeMap::from([("api.example.com".to_owned(), vec![ip("192.0.2.9")])]);
    let nodes = compile_scenario(&s, &fqdn);
    let a = &nodes["node-a"];
    let ix = a.index();
    let in_cidr = ix.identity_of(ip("203.0.113.5"));
    let in_group = ix.identity_of(ip("203.0.113.70"));
    let in_except = ix.identity_of(ip("203.0.113.200"));
    let api = ix.identity_of(ip("192.0.2.9"));
    for id in [in_cidr, in_group, in_except, api] {
        assert!(id.0 >= LOCAL_IDENTITY_FIRST, "external prefixes get local identities: {id}");
    }
    let decide = |peer, port, proto| ix.decide(DEATHSTAR, Direction::Egress, peer, port, proto).allows();
    assert!(decide(in_cidr, 443, Protocol::Tcp));
    assert!(decide(in_group, 443, Protocol::Tcp), "the group's prefix is nested in the CIDR");
    assert!(!decide(in_except, 443, Protocol::Tcp));
    assert!(!decide(in_cidr, 80, Protocol::Tcp));
    assert!(decide(api, 53, Protocol::Udp), "FQDN rule without ports allows every port");
    assert!(!decide(Identity::WORLD, 443, Protocol::Tcp));
    assert!(!decide(TIEFIGHTER, 443, Protocol::Tcp));
}

#[test]
fn oversized_port_ranges_are_refused() {
    let mut s = scenario();
    // Every port but 0 to several hundred peers exceeds the rule capacity.
    for i in 0..20u32 {
        s.identities.push(workload(300 + i, &[("org", "empire"), ("n", "x")]));
        s.endpoints.push(endpoint(
            "node-b",
            Identity(300 + i),
            100 + u64::from(i),
            &[ip(&format!("10.9.0.{i}"))],
            false,
        ));
    }
    s.policies[0].policy.ingress = Some(vec![rule(
        Peer::Workloads { selector: sel(&[("org", "empire")]) },
        vec![PortRange { protocol: Protocol::Tcp, first: 1, last: 65534 }],
    )]);
    let err = compile(&CompileInput {
        version: 1,
        policies: &s.policies,
        identities: &s.identities,
        modes: &s.modes,
        endpoints: &s.endpoints,
        prefixes: &[],
        fqdn: &BTreeMap::new(),
    })
    .expect_err("too many entries");
    assert!(matches!(err, super::CompileError::TooManyRules { .. }), "{err}");
}

// === property: compiled rules decide like the evaluator ===

const NODES: [&str; 2] = ["n0", "n1"];
const APPS: [&str; 4] = ["a", "b", "c", "d"];
const ORGS: [&str; 2] = ["x", "y"];
const EXTERNAL: [&str; 11] = [
    "172.20.1.1",
    "172.20.5.5",
    "198.51.100.5",
    "198.51.100.200",
    "203.0.113.70",
    "203.0.113.5",
    "203.0.113.66",
    "192.0.2.9",
    "8.8.8.8",
    "10.0.0.200",
    "2001:db8::1",
];
const CIDRS: [&str; 9] = [
    "203.0.113.0/24",
    "203.0.113.64/27",
    "10.0.0.0/8",
    "0.0.0.0/0",
    "198.51.100.0/25",
    "2001:db8::/32",
    "::/0",
    "172.20.1.0/24",
    "172.16.0.0/12",
];
const EXCEPTS: [&str; 3] = ["203.0.113.64/28", "203.0.113.5/32", "10.0.0.0/16"];

/// The world the property runs in: workloads 256.. with one endpoint each, a host
/// namespace per node, an unmanaged namespace, two CIDR groups, and an inventory
/// workload known only by its CIDR (with a third group nested inside it).
struct World {
    identities: Vec<IdentityInfo>,
    endpoints: Vec<EndpointRow>,
    prefixes: Vec<(IpNet, Identity)>,
    fqdn: BTreeMap<String, Vec<IpAddr>>,
}

const LEGACY: Identity = Identity(900);

fn world(labels: &[(usize, usize)]) -> World {
    let mut identities: Vec<IdentityInfo> = labels
        .iter()
        .enumerate()
        .map(|(i, &(app, org))| workload(256 + i as u32, &[("app", APPS[app]), ("org", ORGS[org])]))
        .collect();
    identities.push(group(1000, "corp", &["198.51.100.0/24"]));
    identities.push(group(1001, "partner", &["203.0.113.64/26"]));
    identities.push(group(1002, "lab", &["172.20.5.0/24"]));
    identities.push(workload(LEGACY.0, &[("app", "d"), ("org", "y")]));
    let prefixes = vec![(net("172.20.0.0/16"), LEGACY)];
    let mut endpoints: Vec<EndpointRow> = (0..labels.len())
        .map(|i| {
            let addr = ip(&format!("10.0.{i}.1"));
            endpoint(NODES[i % 2], Identity(256 + i as u32), 100 + i as u64, &[addr], false)
        })
        .collect();
    endpoints.push(endpoint("n0", Identity::HOST, 1, &[ip("10.255.0.1")], true));
    endpoints.push(endpoint("n1", Identity::HOST, 2, &[ip("10.255.0.2")], true));
    endpoints.push(endpoint("n1", Identity::UNMANAGED, 3, &[ip("10.254.0.1")], false));
    let fqdn = BTreeMap::from([("api.example.com".to_owned(), vec![ip("192.0.2.9"), ip("8.8.8.8")])]);
    World { identities, endpoints, prefixes, fqdn }
}

/// The resolver's answer for `addr` seen from `node` (written apart from the compiler).
fn resolve(w: &World, node: &str, addr: IpAddr) -> Identity {
    for e in &w.endpoints {
        if e.fact.addresses.iter().any(|a| a.addr == addr) {
            if e.fact.host {
                return if e.node_id == node { Identity::HOST } else { Identity::from(ReservedIdentity::RemoteNode) };
            }
            return e.identity;
        }
    }
    // The inventory: its workloads' and groups' CIDRs, longest first.
    let groups = w.identities.iter().filter_map(|i| match &i.kind {
        IdentityKind::CidrGroup { cidrs } => {
            cidrs.iter().filter(|c| c.contains(&addr)).map(|c| (c.prefix_len(), i.id)).max()
        }
        IdentityKind::Workload => None,
    });
    let workloads = w.prefixes.iter().filter(|(p, _)| p.contains(&addr)).map(|(p, id)| (p.prefix_len(), *id));
    groups.chain(workloads).max().map_or(Identity::WORLD, |(_, id)| id)
}

fn arb_selector() -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        Just(LabelSelector::default()),
        (0..APPS.len()).prop_map(|a| sel(&[("app", APPS[a])])),
        (0..ORGS.len()).prop_map(|o| sel(&[("org", ORGS[o])])),
        (0..APPS.len(), 0..ORGS.len()).prop_map(|(a, o)| sel(&[("app", APPS[a]), ("org", ORGS[o])])),
    ]
}

fn arb_peer() -> impl Strategy<Value = Peer> {
    let entity = prop_oneof![
        Just(ReservedIdentity::World),
        Just(ReservedIdentity::Host),
        Just(ReservedIdentity::Unmanaged),
        Just(ReservedIdentity::RemoteNode),
    ];
    prop_oneof![
        3 => arb_selector().prop_map(|selector| Peer::Workloads { selector }),
        1 => entity.prop_map(|entity| Peer::Entity { entity }),
        2 => (0..CIDRS.len(), proptest::sample::subsequence(EXCEPTS.to_vec(), 0..=2))
            .prop_map(|(c, ex)| Peer::Cidr { cidr: net(CIDRS[c]), except: ex.iter().map(|e| net(e)).collect() }),
        1 => (prop_oneof![Just("corp"), Just("partner"), Just("nobody")], proptest::sample::subsequence(CIDRS.to_vec(), 0..=1))
            .prop_map(|(name, cidrs)| Peer::CidrGroup { name: name.into(), cidrs: cidrs.iter().map(|c| net(c)).collect() }),
        1 => (prop_oneof![Just("api.example.com"), Just("other.example.com")], proptest::sample::subsequence(EXTERNAL.to_vec(), 0..=2))
            .prop_map(|(name, addrs)| Peer::Fqdn { name: name.into(), addresses: addrs.iter().map(|a| ip(a)).collect() }),
    ]
}

fn arb_ports() -> impl Strategy<Value = Vec<PortRange>> {
    prop_oneof![
        Just(vec![]),
        Just(vec![PortRange::single(Protocol::Tcp, 80)]),
        Just(vec![PortRange::single(Protocol::Udp, 53), PortRange::single(Protocol::Tcp, 443)]),
        Just(vec![PortRange { protocol: Protocol::Tcp, first: 8000, last: 8002 }]),
        Just(vec![PortRange::all(Protocol::Udp)]),
    ]
}

fn arb_rules() -> impl Strategy<Value = Option<Vec<Rule>>> {
    proptest::option::of(proptest::collection::vec(
        (arb_peer(), arb_ports()).prop_map(|(peer, ports)| Rule::l4(peer, ports)),
        0..3,
    ))
}

fn arb_policies() -> impl Strategy<Value = Vec<SourcePolicy>> {
    proptest::collection::vec((arb_selector(), arb_rules(), arb_rules()), 0..4).prop_map(|ps| {
        ps.into_iter()
            .enumerate()
            .map(|(i, (selector, ingress, egress))| SourcePolicy {
                proposal_id: i as i64 + 1,
                policy: Policy { name: format!("p{i}"), namespace: None, selector, ingress, egress },
            })
            .collect()
    })
}

/// One end of a connection: a workload (by index) or an address outside.
#[derive(Debug, Clone, Copy)]
enum End {
    Workload(usize),
    Address(&'static str),
}

fn arb_end(workloads: usize) -> impl Strategy<Value = End> {
    prop_oneof![
        2 => (0..workloads).prop_map(End::Workload),
        1 => proptest::sample::select(EXTERNAL.to_vec()).prop_map(End::Address),
        1 => proptest::sample::select(vec!["10.255.0.1", "10.255.0.2", "10.254.0.1"]).prop_map(End::Address),
    ]
}

/// Workload labels (app, org indexes), a policy set, connections (src, dst, port, protocol).
type Case = (Vec<(usize, usize)>, Vec<SourcePolicy>, Vec<(End, End, u16, Protocol)>);

fn arb_case() -> impl Strategy<Value = Case> {
    proptest::collection::vec((0..APPS.len(), 0..ORGS.len()), 1..6).prop_flat_map(|labels| {
        let n = labels.len();
        let port = proptest::sample::select(vec![53u16, 80, 443, 8001, 9999]);
        let proto = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)];
        let conns = proptest::collection::vec((arb_end(n), arb_end(n), port, proto), 1..24);
        (Just(labels), arb_policies(), conns)
    })
}

fn end_addr(end: End) -> IpAddr {
    match end {
        End::Workload(i) => ip(&format!("10.0.{i}.1")),
        End::Address(a) => ip(a),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn compiled_rules_decide_like_the_evaluator((labels, policies, conns) in arb_case()) {
        let w = world(&labels);
        let modes: BTreeMap<Identity, RolloutMode> =
            (0..labels.len()).map(|i| (Identity(256 + i as u32), RolloutMode::Enforce)).collect();
        let nodes = compile(&CompileInput {
            version: 1,
            policies: &policies,
            identities: &w.identities,
            modes: &modes,
            endpoints: &w.endpoints,
            prefixes: &w.prefixes,
            fqdn: &w.fqdn,
        })
        .expect("compiles");
        let plain: Vec<Policy> = policies.iter().map(|p| p.policy.clone()).collect();
        let ev = Evaluator::new(&plain, &w.identities, &w.fqdn);
        let indexes: BTreeMap<&str, _> = nodes.iter().map(|(n, p)| (n.as_str(), p.index())).collect();

        for (src, dst, port, protocol) in conns {
            let (src_addr, dst_addr) = (end_addr(src), end_addr(dst));
            // The initiator's egress, decided on its node.
            if let End::Workload(i) = src {
                let node = NODES[i % 2];
                let local = Identity(256 + i as u32);
                let peer_truth = resolve(&w, node, dst_addr);
                let want = ev.decide(&Connection {
                    src: local, dst: peer_truth, src_addr: Some(src_addr), dst_addr: Some(dst_addr), dst_port: port, protocol,
                }).egress.allows();
                let ix = &indexes[node];
                let got = ix.decide(local, Direction::Egress, ix.identity_of(dst_addr), port, protocol);
                prop_assert_eq!(got.allows(), want, "egress {:?} -> {} {}/{:?}: {:?}", src, dst_addr, port, protocol, got);
            }
            // The responder's ingress, decided on its node.
            if let End::Workload(i) = dst {
                let node = NODES[i % 2];
                let local = Identity(256 + i as u32);
                let peer_truth = resolve(&w, node, src_addr);
                let want = ev.decide(&Connection {
                    src: peer_truth, dst: local, src_addr: Some(src_addr), dst_addr: Some(dst_addr), dst_port: port, protocol,
                }).ingress.allows();
                let ix = &indexes[node];
                let got = ix.decide(local, Direction::Ingress, ix.identity_of(src_addr), port, protocol);
                prop_assert_eq!(got.allows(), want, "ingress {} -> {:?} {}/{:?}: {:?}", src_addr, dst, port, protocol, got);
            }
        }
    }
}

// === L7 (HTTP) entries ===

fn landing() -> HttpRule {
    HttpRule::exact("POST", "/v1/request-landing")
}

fn l7_rule(peer: Peer, port: u16, http: Vec<HttpRule>) -> Rule {
    Rule { http, ..rule(peer, vec![PortRange::single(Protocol::Tcp, port)]) }
}

fn http_of(p: &NodePolicy, local: Identity, peer: Identity, port: Option<u16>) -> Option<Vec<HttpRule>> {
    p.rules
        .iter()
        .find(|r| r.key.local == local && r.key.peer == Some(peer) && r.key.port == port)
        .map(|r| r.http.clone())
}

#[test]
fn an_http_rule_narrows_its_ingress_tcp_entries() {
    let mut s = scenario();
    s.policies[0].policy.ingress =
        Some(vec![l7_rule(Peer::Workloads { selector: sel(&[("org", "empire")]) }, 80, vec![landing()])]);
    let nodes = compile_scenario(&s, &BTreeMap::new());
    let a = &nodes["node-a"];
    a.validate().expect("valid");
    assert_eq!(http_of(a, DEATHSTAR, TIEFIGHTER, Some(80)), Some(vec![landing()]));
}

#[test]
fn l4_wins_and_http_rules_add_up_on_a_shared_entry() {
    let mut s = scenario();
    let empire = || Peer::Workloads { selector: sel(&[("org", "empire")]) };
    let tiefighter = || Peer::Workloads { selector: sel(&[("class", "tiefighter")]) };
    let exhaust = HttpRule::exact("GET", "/v1/status");
    // Two L7 rules for one entry: their requests add up.
    s.policies[0].policy.ingress =
        Some(vec![l7_rule(empire(), 80, vec![landing()]), l7_rule(tiefighter(), 80, vec![exhaust.clone()])]);
    let nodes = compile_scenario(&s, &BTreeMap::new());
    let mut both = vec![landing(), exhaust.clone()];
    both.sort();
    assert_eq!(http_of(&nodes["node-a"], DEATHSTAR, TIEFIGHTER, Some(80)), Some(both));
    // Deathstar itself is empire too, but only the first rule names it.
    assert_eq!(http_of(&nodes["node-a"], DEATHSTAR, DEATHSTAR, Some(80)), Some(vec![landing()]));

    // An L4 rule for the same entry: the connection is allowed whole.
    s.policies[0].policy.ingress = Some(vec![
        l7_rule(empire(), 80, vec![landing()]),
        rule(tiefighter(), vec![PortRange::single(Protocol::Tcp, 80)]),
    ]);
    let nodes = compile_scenario(&s, &BTreeMap::new());
    assert_eq!(http_of(&nodes["node-a"], DEATHSTAR, TIEFIGHTER, Some(80)), Some(vec![]));

    // A wider L4 entry (any port) covers the L7 one: the datapath would find the
    // narrower entry first, so it must carry the union.
    s.policies[0].policy.ingress = Some(vec![l7_rule(empire(), 80, vec![landing()]), rule(tiefighter(), vec![])]);
    let nodes = compile_scenario(&s, &BTreeMap::new());
    assert_eq!(http_of(&nodes["node-a"], DEATHSTAR, TIEFIGHTER, Some(80)), Some(vec![]));
    assert_eq!(http_of(&nodes["node-a"], DEATHSTAR, DEATHSTAR, Some(80)), Some(vec![landing()]));
}

#[test]
fn http_rules_outside_ingress_tcp_are_enforced_at_l4() {
    let mut s = scenario();
    s.modes.insert(TIEFIGHTER, RolloutMode::Enforce);
    s.policies.push(SourcePolicy {
        proposal_id: 8,
        policy: Policy {
            name: "bulkhead-tiefighter".into(),
            namespace: None,
            selector: sel(&[("class", "tiefighter")]),
            ingress: None,
            egress: Some(vec![l7_rule(
                Peer::Workloads { selector: sel(&[("class", "deathstar")]) },
                80,
                vec![landing()],
            )]),
        },
    });
    let nodes = compile_scenario(&s, &BTreeMap::new());
    let a = &nodes["node-a"];
    a.validate().expect("valid");
    assert_eq!(http_of(a, TIEFIGHTER, DEATHSTAR, Some(80)), Some(vec![]), "egress: L4");
}
