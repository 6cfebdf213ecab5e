//! The pure parts of explain: how a side's policy decision becomes an enforcer verdict
//! in each rollout mode, and how an enforcer's reported versions read.

use bulkhead_model::{
    Direction, Identity, LabelSelector, Labels, Peer, Policy, PortRange, ProposalStatus, Protocol, RolloutMode, Rule,
};

use super::*;

fn party(mode: Option<RolloutMode>, nodes: &[&str]) -> Party {
    Party {
        identity: Identity(300),
        name: "deathstar".into(),
        namespace: None,
        labels: Labels::new([("class", "deathstar")]).expect("labels"),
        kind: if mode.is_some() { PartyKind::Workload } else { PartyKind::Reserved },
        resolved_by: String::new(),
        address: None,
        nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        mode,
    }
}

fn set() -> PolicySet {
    let policy = Policy {
        name: "deathstar".into(),
        namespace: None,
        selector: LabelSelector::with_labels([("class", "deathstar")]),
        ingress: Some(vec![Rule::l4(
            Peer::Workloads { selector: LabelSelector::with_labels([("class", "tiefighter")]) },
            vec![PortRange::single(Protocol::Tcp, 80)],
        )]),
        egress: None,
    };
    let r = PolicyRef {
        proposal_id: 7,
        target: Identity(300),
        version: 1,
        status: ProposalStatus::Approved,
        name: "deathstar".into(),
    };
    PolicySet { refs: vec![r], policies: vec![policy] }
}

#[test]
fn a_default_deny_is_judged_by_the_mode() {
    let set = set();
    let deny = SideDecision::DefaultDeny { policies: set.refs.clone() };
    let table = [
        (Some(RolloutMode::Learn), &["node-1"][..], EnforcerVerdict::Pass, "learn mode"),
        (Some(RolloutMode::Monitor), &["node-1"][..], EnforcerVerdict::Audit, "monitor mode"),
        (Some(RolloutMode::Enforce), &["node-1"][..], EnforcerVerdict::Drop, "enforce mode"),
        (Some(RolloutMode::Enforce), &[][..], EnforcerVerdict::Pass, "no node reports an endpoint"),
    ];
    for (mode, nodes, want, says) in table {
        let local = party(mode, nodes);
        let other = party(None, &[]);
        let parties = Parties { source: &other, destination: &local, port: 80 };
        let s = side(&set, Direction::Ingress, &local, deny.clone(), &parties, false);
        assert_eq!(s.verdict, want, "{mode:?} {nodes:?}: {}", s.reason);
        assert!(s.reason.contains(says) && s.reason.contains("default deny"), "{}", s.reason);
        assert_eq!(s.policies, set.refs, "the selecting policy is listed");
    }
}

#[test]
fn allowed_and_uncovered_sides_pass_in_every_mode() {
    let set = set();
    let allowed = SideDecision::Allowed { policy: set.refs[0].clone(), rule: set.rule(0, Direction::Ingress, 0) };
    for mode in [RolloutMode::Learn, RolloutMode::Monitor, RolloutMode::Enforce] {
        let local = party(Some(mode), &["node-1"]);
        let parties = Parties { source: &local, destination: &local, port: 80 };
        for d in [allowed.clone(), SideDecision::NotCovered] {
            let s = side(&set, Direction::Ingress, &local, d, &parties, false);
            assert_eq!(s.verdict, EnforcerVerdict::Pass, "{mode:?}: {}", s.reason);
        }
    }
    let rule = set.rule(0, Direction::Ingress, 0);
    assert_eq!(rule.peer, "workloads {class=tiefighter}");
    assert_eq!(rule.ports, vec!["80/tcp".to_owned()]);
}

#[test]
fn the_worse_side_decides_and_egress_is_named_first() {
    assert!(EnforcerVerdict::Drop > EnforcerVerdict::Audit && EnforcerVerdict::Audit > EnforcerVerdict::Pass);
    let set = set();
    let local = party(Some(RolloutMode::Enforce), &["node-1"]);
    let parties = Parties { source: &local, destination: &local, port: 80 };
    let deny = SideDecision::DefaultDeny { policies: set.refs.clone() };
    let e = side(&set, Direction::Egress, &local, SideDecision::NotCovered, &parties, false);
    let i = side(&set, Direction::Ingress, &local, deny, &parties, false);
    let s = summary(e.verdict.max(i.verdict), &e, &i);
    assert!(s.starts_with("drop — ingress of deathstar"), "{s}");
}

fn row(desired: Option<u64>, applied: Option<u64>, rejected: Option<u64>, report: Option<i64>) -> EnforcerRow {
    EnforcerRow {
        node_id: "node-1".into(),
        boot_id: Some("b".into()),
        agent_version: Some("0.1.0".into()),
        desired_version: desired,
        desired_unix_ms: Some(1),
        applied_version: applied,
        applied_unix_ms: Some(1),
        rejected_version: rejected,
        last_error: rejected.map(|_| "unknown identity 999".into()),
        last_seen_unix_ms: Some(1),
        loss: Default::default(),
        last_report_unix_ms: report,
        clock_skew_ms: None,
    }
}

#[test]
fn enforcer_states_say_what_the_node_enforces() {
    let now = 10 * SILENT_AFTER_MS;
    let d = vec![Direction::Ingress];
    let e = node_enforcer("node-1", d.clone(), None, now);
    assert_eq!(e.state, EnforcerState::NotConnected);
    let e = node_enforcer("node-1", d.clone(), Some(&row(Some(5), Some(5), None, Some(now))), now);
    assert_eq!((e.state, e.silent), (EnforcerState::InSync, false));
    let e = node_enforcer("node-1", d.clone(), Some(&row(Some(6), Some(5), None, Some(now))), now);
    assert_eq!(e.state, EnforcerState::Stale);
    assert!(e.message.contains("stale") && e.message.contains("version 5") && e.message.contains("version 6"));
    let e = node_enforcer("node-1", d.clone(), Some(&row(Some(6), Some(5), Some(6), Some(now))), now);
    assert_eq!(e.state, EnforcerState::Rejected);
    assert!(e.message.contains("unknown identity 999"), "{}", e.message);
    let e = node_enforcer("node-1", d.clone(), Some(&row(None, None, None, None)), now);
    assert_eq!(e.state, EnforcerState::NoPolicy);
    let e = node_enforcer("node-1", d, Some(&row(Some(5), Some(5), None, Some(0))), now);
    assert!(e.silent && e.message.contains("No verdict report"), "{}", e.message);
}

#[test]
fn times_in_notes_read_as_utc() {
    assert_eq!(utc(0), "1970-01-01T00:00:00Z");
    assert_eq!(utc(1_748_779_200_999), "2025-06-01T12:00:00Z");
    assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
    assert_eq!(utc(-1_000), "1969-12-31T23:59:59Z");
}
