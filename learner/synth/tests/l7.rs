//! HTTP (L7) synthesis: which ingress ports are narrowed to HTTP rules, with what
//! evidence, and what keeps a port L4 (said in a lint). Includes the reference
//! scenario's L7 step (DESIGN.md §9): tiefighter only ever lands.

mod common;

use std::collections::BTreeMap;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Edge, EdgeHttp, HttpPath, HttpRule, Identity, LabelSelector, Level, LintCode, Peer, Policy, PortRange, Proposal,
    Protocol, Rule, Severity,
};
use bulkhead_synth::{ActivePolicy, Connection, Evaluator, IdentityInfo, Input, Options, diff, synthesize};
use common::*;

fn propose(ids: &[IdentityInfo], edges: &[Edge], http: &[EdgeHttp], opts: &Options) -> Vec<Proposal> {
    synthesize(&Input { identities: ids, edges, http, ..Default::default() }, opts)
}

fn target(ps: &[Proposal], id: u32) -> &Proposal {
    ps.iter().find(|p| p.target == Identity(id)).expect("a proposal for the target")
}

fn http_rules(p: &Proposal) -> Vec<(Vec<PortRange>, Vec<String>)> {
    p.policy
        .ingress
        .iter()
        .flatten()
        .map(|r| (r.ports.clone(), r.http.iter().map(ToString::to_string).collect()))
        .collect()
}

fn l7_lints(p: &Proposal) -> Vec<&str> {
    p.lints.iter().filter(|l| l.code == LintCode::HttpNotNarrowed).map(|l| l.message.as_str()).collect()
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

const TCP80: PortRange = PortRange { protocol: Protocol::Tcp, first: 80, last: 80 };

#[test]
fn reference_scenario_allows_empire_ships_to_land_and_nothing_else() {
    let r = reference();
    let ps = propose(&r.identities, &r.edges, &reference_http(), &options(Level::Labels));
    let ds = target(&ps, DEATHSTAR);
    let ingress = ds.policy.ingress.as_ref().expect("ingress covered");
    assert_eq!(ingress.len(), 1, "{ingress:#?}");
    let want = LabelSelector::with_labels([(NAMESPACE_KEY, "default"), ("org", "empire")]);
    assert_eq!(ingress[0].peer, Peer::Workloads { selector: want });
    assert_eq!(ingress[0].ports, vec![TCP80]);
    assert_eq!(ingress[0].http, vec![HttpRule::exact("POST", "/v1/request-landing")]);

    let rule = &ds.rules[0];
    assert_eq!(rule.evidence.http.len(), 1);
    let ev = &rule.evidence.http[0];
    assert_eq!((ev.requests, ev.paths, ev.generalized), (42, 1, false));
    assert_eq!((ev.first_seen_unix_ms, ev.last_seen_unix_ms), (NOW - 10 * HOUR, NOW - HOUR));
    assert!(l7_lints(ds).is_empty(), "{:?}", ds.lints);

    // Replay: landing passes, the exhaust port does not, xwing never connects.
    let fqdn = BTreeMap::new();
    let alone = [ds.policy.clone()];
    let eval = Evaluator::new(&alone, &r.identities, &fqdn);
    assert!(eval.decide_request(&conn(TIEFIGHTER, DEATHSTAR, 80), "POST", "/v1/request-landing").allowed());
    assert!(!eval.decide_request(&conn(TIEFIGHTER, DEATHSTAR, 80), "PUT", "/v1/exhaust-port").allowed());
    assert!(!eval.decide(&conn(XWING, DEATHSTAR, 80)).allowed());

    // The diff against the L4 proposal of the same window shows the narrowing.
    let l4 = propose(&r.identities, &r.edges, &[], &options(Level::Labels));
    let text = diff(Some(&target(&l4, DEATHSTAR).policy), &ds.policy).to_text();
    assert!(text.contains("on 80/tcp: any request -> only HTTP POST /v1/request-landing"), "{text}");
}

#[test]
fn opaque_overflow_and_silent_peers_keep_the_port_l4_with_a_lint() {
    let r = reference();
    let landing = reference_http();
    let mut opaque = landing.clone();
    (opaque[0].opaque_connections, opaque[0].opaque_last_seen_unix_ms) = (2, Some(NOW - 2 * HOUR));
    let mut old_opaque = opaque.clone();
    old_opaque[0].opaque_last_seen_unix_ms = Some(NOW - 48 * HOUR);
    let mut overflow = landing.clone();
    (overflow[0].overflow_requests, overflow[0].overflow_last_seen_unix_ms) = (9, Some(NOW - 3 * HOUR));
    // At the labels level xwing joins tiefighter's rule (org differs: it does not), so
    // use a second empire ship whose connections carried no request.
    let mut ids = r.identities.clone();
    ids.push(workload(
        300,
        "default/interceptor",
        &[(NAMESPACE_KEY, "default"), ("org", "empire"), ("class", "interceptor")],
    ));
    let edges = vec![edge(TIEFIGHTER, DEATHSTAR, 80, 42), edge(300, DEATHSTAR, 80, 3)];

    /// Name, edges, HTTP facts, the expected lint (`None`: no lint).
    type Case<'a> = (&'a str, &'a [Edge], &'a [EdgeHttp], Option<&'a str>);
    let table: [Case<'_>; 5] = [
        ("opaque", &r.edges, &opaque, Some("2 connection(s) carried payload that was not a plaintext HTTP request")),
        ("opaque before the window", &r.edges, &old_opaque, None),
        ("overflow", &r.edges, &overflow, Some("9 request(s) were counted without their path")),
        ("silent peer", &edges, &landing, Some("1 of the peers' connections showed no HTTP request")),
        ("no http data", &r.edges, &[], None),
    ];
    for (name, edges, http, lint) in table {
        let ps = propose(&ids, edges, http, &options(Level::Labels));
        let ds = target(&ps, DEATHSTAR);
        let rules = http_rules(ds);
        match lint {
            Some(want) => {
                assert_eq!(rules, vec![(vec![TCP80], vec![])], "{name}: stays L4");
                let lints = l7_lints(ds);
                assert_eq!(lints.len(), 1, "{name}: {:?}", ds.lints);
                assert!(lints[0].contains(want) && lints[0].contains("on 80/tcp stays L4"), "{name}: {}", lints[0]);
                assert!(ds.lints.iter().any(|l| l.code == LintCode::HttpNotNarrowed && l.severity == Severity::Info));
            }
            None if http.is_empty() => {
                assert_eq!(rules, vec![(vec![TCP80], vec![])], "{name}");
                assert!(l7_lints(ds).is_empty(), "{name}: nothing HTTP seen, nothing to say");
            }
            None => assert_eq!(rules, vec![(vec![TCP80], vec!["POST /v1/request-landing".to_owned()])], "{name}"),
        }
    }
}

#[test]
fn many_paths_under_one_parent_become_a_prefix_and_too_many_rules_stay_l4() {
    let r = reference();
    let ships: Vec<String> = (0..12).map(|i| format!("/v1/ships/{i}")).collect();
    let mut reqs: Vec<(&str, &str, u64)> = ships.iter().map(|p| ("GET", p.as_str(), 2)).collect();
    reqs.push(("POST", "/v1/request-landing", 5));
    let http = vec![http(TIEFIGHTER, DEATHSTAR, 80, &reqs)];
    let ps = propose(&r.identities, &r.edges, &http, &options(Level::Exact));
    let ds = target(&ps, DEATHSTAR);
    assert_eq!(
        http_rules(ds),
        vec![(vec![TCP80], vec!["GET /v1/ships/*".to_owned(), "POST /v1/request-landing".to_owned()])]
    );
    let ev = &ds.rules[0].evidence.http;
    assert_eq!(ev[0].rule.path, HttpPath::Prefix("/v1/ships/".into()));
    assert_eq!((ev[0].requests, ev[0].paths, ev[0].generalized), (24, 12, true));
    assert_eq!((ev[1].requests, ev[1].paths, ev[1].generalized), (5, 1, false));

    // The same paths with a higher threshold stay exact; with fewer rules allowed, L4.
    let exact = Options { http_prefix_after: 20, ..options(Level::Exact) };
    let ps = propose(&r.identities, &r.edges, &http, &exact);
    assert_eq!(http_rules(target(&ps, DEATHSTAR))[0].1.len(), 13);
    let few = Options { http_prefix_after: 20, http_max_rules: 10, ..options(Level::Exact) };
    let ps = propose(&r.identities, &r.edges, &http, &few);
    let ds = target(&ps, DEATHSTAR);
    assert_eq!(http_rules(ds), vec![(vec![TCP80], vec![])]);
    assert!(
        l7_lints(ds)[0].contains("need 13 HTTP rules even as prefixes, more than the 10 allowed"),
        "{:?}",
        ds.lints
    );
    // Switched off: plain L4, no lint.
    let off = Options { http_rules: false, ..options(Level::Exact) };
    let ps = propose(&r.identities, &r.edges, &http, &off);
    assert_eq!(http_rules(target(&ps, DEATHSTAR)), vec![(vec![TCP80], vec![])]);
    assert!(l7_lints(target(&ps, DEATHSTAR)).is_empty());
}

#[test]
fn a_rule_over_several_ports_is_split_by_what_each_port_carried() {
    let r = reference();
    // tiefighter uses 80 (HTTP), 8080 (TLS: opaque) and 5432 (nothing captured).
    let edges = vec![
        edge(TIEFIGHTER, DEATHSTAR, 80, 42),
        edge(TIEFIGHTER, DEATHSTAR, 8080, 7),
        edge(TIEFIGHTER, DEATHSTAR, 5432, 3),
    ];
    let mut tls = http(TIEFIGHTER, DEATHSTAR, 8080, &[]);
    (tls.opaque_connections, tls.opaque_last_seen_unix_ms) = (7, Some(NOW - HOUR));
    let facts = vec![reference_http().remove(0), tls];
    let ps = propose(&r.identities, &edges, &facts, &options(Level::Exact));
    let ds = target(&ps, DEATHSTAR);
    let mut rules = http_rules(ds);
    rules.sort();
    assert_eq!(
        rules,
        vec![
            (vec![PortRange::single(Protocol::Tcp, 80)], vec!["POST /v1/request-landing".to_owned()]),
            (vec![PortRange::single(Protocol::Tcp, 5432), PortRange::single(Protocol::Tcp, 8080)], vec![]),
        ]
    );
    // Each part carries the evidence of its own edges.
    let l7 = ds.rules.iter().find(|r| r.rule.is_l7()).expect("the HTTP rule");
    assert_eq!((l7.evidence.connections, l7.evidence.edges.len()), (42, 1));
    let l4 = ds.rules.iter().find(|r| !r.rule.is_l7()).expect("the L4 rule");
    assert_eq!((l4.evidence.connections, l4.evidence.edges.len()), (10, 2));
    assert!(l7_lints(ds).is_empty(), "8080 carried TLS only, no HTTP to speak of: {:?}", ds.lints);
    // Every observed connection is still allowed.
    let fqdn = BTreeMap::new();
    let alone = [ds.policy.clone()];
    let eval = Evaluator::new(&alone, &r.identities, &fqdn);
    for port in [80, 8080, 5432] {
        assert!(eval.decide(&conn(TIEFIGHTER, DEATHSTAR, port)).allowed(), "{port}");
    }
}

#[test]
fn drift_adds_new_requests_to_an_active_l7_policy() {
    let r = reference();
    let ps = propose(&r.identities, &r.edges, &reference_http(), &options(Level::Exact));
    let approved: Policy = target(&ps, DEATHSTAR).policy.clone();
    let active = vec![ActivePolicy { target: Identity(DEATHSTAR), policy: approved.clone() }];

    // Same traffic: the active rule is carried over with its evidence, nothing new.
    let again = synthesize(
        &Input {
            identities: &r.identities,
            edges: &r.edges,
            http: &reference_http(),
            active: &active,
            ..Default::default()
        },
        &options(Level::Exact),
    );
    let ds = target(&again, DEATHSTAR);
    assert!(diff(Some(&approved), &ds.policy).is_empty(), "{}", diff(Some(&approved), &ds.policy).to_text());
    assert_eq!(ds.rules[0].evidence.http[0].requests, 42, "the carried-over rule has its evidence");

    // tiefighter starts asking for its status too: the new request is added.
    let more = vec![http(TIEFIGHTER, DEATHSTAR, 80, &[("POST", "/v1/request-landing", 42), ("GET", "/v1/status", 3)])];
    let drifted = synthesize(
        &Input { identities: &r.identities, edges: &r.edges, http: &more, active: &active, ..Default::default() },
        &options(Level::Exact),
    );
    let ds = target(&drifted, DEATHSTAR);
    let fqdn = BTreeMap::new();
    let alone = [ds.policy.clone()];
    let eval = Evaluator::new(&alone, &r.identities, &fqdn);
    assert!(eval.decide_request(&conn(TIEFIGHTER, DEATHSTAR, 80), "GET", "/v1/status").allowed());
    assert!(eval.decide_request(&conn(TIEFIGHTER, DEATHSTAR, 80), "POST", "/v1/request-landing").allowed());
    assert!(!eval.decide_request(&conn(TIEFIGHTER, DEATHSTAR, 80), "PUT", "/v1/exhaust-port").allowed());
    let text = diff(Some(&approved), &ds.policy).to_text();
    assert!(text.contains("GET /v1/status"), "{text}");

    // An active L4 rule already allows every request: nothing narrows it silently.
    let l4 = Policy {
        ingress: Some(vec![Rule::l4(approved.ingress.as_ref().expect("ingress")[0].peer.clone(), vec![TCP80])]),
        ..approved.clone()
    };
    let active = vec![ActivePolicy { target: Identity(DEATHSTAR), policy: l4.clone() }];
    let kept = synthesize(
        &Input {
            identities: &r.identities,
            edges: &r.edges,
            http: &reference_http(),
            active: &active,
            ..Default::default()
        },
        &options(Level::Exact),
    );
    assert!(diff(Some(&l4), &target(&kept, DEATHSTAR).policy).is_empty());
}
