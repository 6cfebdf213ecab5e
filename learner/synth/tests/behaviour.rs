//! Table-style tests of each synthesis rule: hygiene, external peers, drift, lints,
//! approval and convergence.

mod common;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Direction, HygieneFlag, Identity, Level, LintCode, Peer, PortRange, Proposal, Protocol, ReservedIdentity, Severity,
};
use bulkhead_synth::{
    ActivePolicy, ApproveError, DnsObservation, ExternalObservation, IdentityInfo, Input, approved_policy, diff,
    synthesize,
};
use common::*;

const WEB: u32 = 256;
const DB: u32 = 257;

fn two() -> Vec<IdentityInfo> {
    vec![
        workload(WEB, "shop/web", &[(NAMESPACE_KEY, "shop"), ("app", "web")]),
        workload(DB, "shop/db", &[(NAMESPACE_KEY, "shop"), ("app", "db")]),
    ]
}

fn run(ids: &[IdentityInfo], edges: &[bulkhead_model::Edge], external: &[ExternalObservation]) -> Vec<Proposal> {
    synthesize(&Input { identities: ids, edges, external, ..Default::default() }, &options(Level::Exact))
}

fn target(ps: &[Proposal], id: u32) -> &Proposal {
    ps.iter().find(|p| p.target == Identity(id)).expect("proposal")
}

fn codes(p: &Proposal) -> Vec<LintCode> {
    p.lints.iter().map(|l| l.code).collect()
}

#[test]
fn port_scans_are_held_back_not_learned() {
    let ids = two();
    let mut edges: Vec<_> = (1..=20).map(|port| edge(WEB, DB, port, 1)).collect();
    edges.push(edge(WEB, DB, 5432, 100));
    let ps = run(&ids, &edges, &[]);
    let db = target(&ps, DB);
    let flagged: Vec<_> = db.rules.iter().filter(|r| r.flags.contains(&HygieneFlag::PortScan)).collect();
    assert_eq!(flagged.len(), 1, "{:#?}", db.rules);
    assert!(!flagged[0].included);
    assert_eq!(db.policy.ingress, Some(vec![]), "nothing from the scanner is in the policy until confirmed");
    assert!(codes(db).contains(&LintCode::RulesNeedConfirmation));
    // Approval must decide the flagged rule explicitly.
    assert!(matches!(approved_policy(db, &[], &[]), Err(ApproveError::Undecided { .. })));
    let dropped = approved_policy(db, &[], std::slice::from_ref(&flagged[0].id)).expect("drop is a decision");
    assert_eq!(dropped.ingress, Some(vec![]));
    let confirmed = approved_policy(db, std::slice::from_ref(&flagged[0].id), &[]).expect("confirm");
    assert_eq!(confirmed.ingress.as_ref().map(Vec::len), Some(1));
    assert!(matches!(approved_policy(db, &["ingress-99".into()], &[]), Err(ApproveError::UnknownRule { .. })));
}

#[test]
fn metadata_and_first_seen_external_egress_need_confirmation() {
    let ids = two();
    let edges = vec![edge(WEB, 2, 80, 3), edge(WEB, 2, 443, 3)];
    let ext = vec![egress_to(WEB, "169.254.169.254", 80), egress_to(WEB, "203.0.113.10", 443)];
    let ps = run(&ids, &edges, &ext);
    let web = target(&ps, WEB);
    let meta = web.rules.iter().find(|r| r.flags.contains(&HygieneFlag::CloudMetadata)).expect("metadata flagged");
    assert_eq!(meta.rule.peer, Peer::Cidr { cidr: "169.254.169.254/32".parse().expect("net"), except: vec![] });
    let new = web.rules.iter().find(|r| r.flags.contains(&HygieneFlag::NewExternalEgress)).expect("new egress flagged");
    assert_eq!(new.evidence.addresses, vec!["203.0.113.10".parse::<std::net::IpAddr>().expect("ip")]);
    assert_eq!(web.policy.egress, Some(vec![]));

    // Once an approved policy allows that egress, it is no longer new.
    let approved =
        approved_policy(web, std::slice::from_ref(&new.id), std::slice::from_ref(&meta.id)).expect("approve");
    let active = [ActivePolicy { target: Identity(WEB), policy: approved }];
    let ps = synthesize(
        &Input { identities: &ids, edges: &edges, external: &ext, active: &active, ..Default::default() },
        &options(Level::Exact),
    );
    let web = target(&ps, WEB);
    assert!(!web.rules.iter().any(|r| r.flags.contains(&HygieneFlag::NewExternalEgress)), "{:#?}", web.rules);
    assert!(web.rules.iter().any(|r| r.flags.contains(&HygieneFlag::CloudMetadata)), "metadata stays flagged");
}

#[test]
fn fqdn_groups_replace_stale_addresses() {
    let ids = two();
    let edges = vec![edge(WEB, 2, 443, 6)];
    // The name moved: .1 was used six hours ago, .2 during the last hour.
    let at = |addr: &str, from: i64, to: i64| ExternalObservation {
        first_seen_unix_ms: from,
        last_seen_unix_ms: to,
        ..egress_to(WEB, addr, 443)
    };
    let ext = vec![at("192.0.2.1", NOW - 6 * HOUR, NOW - 6 * HOUR + 60_000), at("192.0.2.2", NOW - HOUR, NOW - 60_000)];
    let answer = |addr: &str, seen: i64| DnsObservation {
        client: Some(Identity(WEB)),
        name: "api.payments.example".into(),
        addr: addr.parse().expect("ip"),
        ttl_seconds: 300,
        first_seen_unix_ms: seen,
        last_seen_unix_ms: seen,
    };
    // Each answer seen just before its use; .1's is long expired by now.
    let dns = vec![answer("192.0.2.1", NOW - 6 * HOUR), answer("192.0.2.2", NOW - HOUR)];
    let ps = synthesize(
        &Input { identities: &ids, edges: &edges, external: &ext, dns: &dns, ..Default::default() },
        &options(Level::Exact),
    );
    let web = target(&ps, WEB);
    let fq: Vec<_> = web.rules.iter().filter(|r| matches!(r.rule.peer, Peer::Fqdn { .. })).collect();
    assert_eq!(fq.len(), 1, "{:#?}", web.rules);
    let Peer::Fqdn { name, addresses } = &fq[0].rule.peer else { unreachable!() };
    assert_eq!(name, "api.payments.example");
    assert_eq!(addresses, &vec!["192.0.2.2".parse::<std::net::IpAddr>().expect("ip")], "stale address aged out");
    assert_eq!(fq[0].evidence.addresses.len(), 2, "both observed addresses are evidence");
    assert!(codes(web).contains(&LintCode::FqdnWithoutDns));
}

#[test]
fn cidrs_only_for_shared_prefixes_and_world_when_addresses_expired() {
    let ids = two();
    let edges = vec![edge(WEB, 2, 443, 6), edge(2, DB, 5432, 1)];
    let ext: Vec<_> =
        ["198.51.100.7", "198.51.100.8", "198.51.100.9", "192.0.2.50"].iter().map(|a| egress_to(WEB, a, 443)).collect();
    let ps = run(&ids, &edges, &ext);
    let peers: Vec<String> = target(&ps, WEB).rules.iter().map(|r| r.rule.peer.to_string()).collect();
    assert!(peers.contains(&"cidr 198.51.100.0/24".to_owned()), "{peers:?}");
    assert!(peers.contains(&"cidr 192.0.2.50/32".to_owned()), "{peers:?}");
    // db's ingress from world has no recorded addresses left: entity world, linted.
    let db = target(&ps, DB);
    let ingress = db.policy.ingress.as_ref().expect("covered");
    assert_eq!(ingress[0].peer, Peer::Entity { entity: ReservedIdentity::World });
    assert!(codes(db).contains(&LintCode::WorldAllowed));
}

#[test]
fn drift_keeps_deployed_rules_adds_new_and_suggests_unused_removals() {
    let ids = vec![
        workload(WEB, "shop/web", &[(NAMESPACE_KEY, "shop"), ("app", "web")]),
        workload(DB, "shop/db", &[(NAMESPACE_KEY, "shop"), ("app", "db")]),
        workload(258, "shop/cache", &[(NAMESPACE_KEY, "shop"), ("app", "cache")]),
        workload(259, "shop/old", &[(NAMESPACE_KEY, "shop"), ("app", "old")]),
    ];
    let first = run(&ids, &[edge(WEB, DB, 5432, 10), edge(259, DB, 5432, 1)], &[]);
    let deployed = target(&first, DB).policy.clone();
    // Later: web still uses db, cache appears, old is gone for a month.
    let mut old = edge(259, DB, 5432, 1);
    old.first_seen_unix_ms = NOW - 40 * 24 * HOUR;
    old.last_seen_unix_ms = NOW - 30 * 24 * HOUR;
    let edges = vec![edge(WEB, DB, 5432, 10), edge(258, DB, 6379, 4), old];
    let active = [ActivePolicy { target: Identity(DB), policy: deployed.clone() }];
    let ps = synthesize(
        &Input { identities: &ids, edges: &edges, active: &active, ..Default::default() },
        &options(Level::Exact),
    );
    let db = target(&ps, DB);
    let d = diff(Some(&deployed), &db.policy);
    assert_eq!(d.ingress.added.len(), 1, "{}", d.to_text());
    assert_eq!(d.ingress.added[0].ports, vec![PortRange::single(Protocol::Tcp, 6379)]);
    assert!(d.ingress.removed.is_empty(), "drift never removes silently: {}", d.to_text());
    assert_eq!(db.removals.len(), 1, "{:#?}", db.removals);
    assert_eq!(db.removals[0].direction, Direction::Ingress);
    assert_eq!(db.removals[0].last_used_unix_ms, Some(NOW - 30 * 24 * HOUR));
}

#[test]
fn pitfalls_are_linted_when_missing_and_learned_when_observed() {
    let mut web = workload(WEB, "shop/web", &[(NAMESPACE_KEY, "shop"), ("app", "web")]);
    web.kubernetes = true;
    web.service_backend = true;
    let ids = vec![
        web,
        workload(260, "monitoring/prometheus", &[(NAMESPACE_KEY, "monitoring"), ("app", "prometheus")]),
        workload(261, "ingress/nginx", &[(NAMESPACE_KEY, "ingress"), ("app.kubernetes.io/name", "ingress-nginx")]),
        workload(DB, "shop/db", &[(NAMESPACE_KEY, "shop"), ("app", "db")]),
    ];
    // Prometheus scrapes db, not web; nobody probes web from the host.
    let edges = vec![edge(260, DB, 9090, 10), edge(WEB, DB, 5432, 3)];
    let ps = run(&ids, &edges, &[]);
    let p = target(&ps, WEB);
    let c = codes(p);
    for want in [
        LintCode::HostProbesMissing,
        LintCode::ScraperMissing,
        LintCode::IngressControllerMissing,
        LintCode::DnsEgressMissing,
        LintCode::ApiServerMissing,
    ] {
        assert!(c.contains(&want), "{want:?} missing from {:#?}", p.lints);
    }
    assert!(p.lints.iter().any(|l| l.code == LintCode::DnsEgressMissing && l.severity == Severity::Info));

    // Observed host probes, DNS and API server access are simply rules.
    let edges = vec![edge(1, WEB, 8080, 100), edge(WEB, 7, 443, 2), edge(WEB, DB, 53, 9), edge(261, WEB, 8080, 7)];
    let ps = run(&ids, &edges, &[]);
    let c = codes(target(&ps, WEB));
    for gone in [
        LintCode::HostProbesMissing,
        LintCode::DnsEgressMissing,
        LintCode::ApiServerMissing,
        LintCode::IngressControllerMissing,
    ] {
        assert!(!c.contains(&gone), "{gone:?} should not fire: {c:?}");
    }
}

#[test]
fn idle_workloads_get_deny_all_with_a_lint_and_convergence_follows_new_edges() {
    let ids = two();
    let mut fresh = edge(WEB, DB, 5432, 1);
    fresh.first_seen_unix_ms = NOW - 10 * 60 * 1000;
    let ps = run(&ids, &[fresh], &[]);
    let db = target(&ps, DB);
    assert!(!db.convergence.converged, "an edge appeared 10 minutes ago");
    assert_eq!(db.convergence.last_new_edge_unix_ms, Some(NOW - 10 * 60 * 1000));
    let ps = run(&ids, &[], &[]);
    let web = target(&ps, WEB);
    assert!(codes(web).contains(&LintCode::NoTraffic));
    assert_eq!((web.policy.ingress.clone(), web.policy.egress.clone()), (Some(vec![]), Some(vec![])));
}

#[test]
fn targets_with_superset_labels_are_not_selected_by_each_other() {
    let ids = vec![
        workload(WEB, "shop/web", &[(NAMESPACE_KEY, "shop"), ("app", "web")]),
        workload(DB, "shop/web", &[(NAMESPACE_KEY, "shop"), ("app", "web"), ("track", "canary")]),
    ];
    let ps = run(&ids, &[], &[]);
    let a = target(&ps, WEB);
    let b = target(&ps, DB);
    assert!(!a.policy.selector.matches(&ids[1].labels), "web's policy must not select the canary");
    assert!(b.policy.selector.matches(&ids[1].labels));
    assert_ne!(a.policy.name, b.policy.name, "same workload name, distinct object names");
}
