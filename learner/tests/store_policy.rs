//! Proposals, decisions, the audit log, rollout modes, imported cluster policies and the
//! replay feeds, checked identically on SQLite (a temp file) and PostgreSQL (a throwaway
//! database from `bulkhead_testkit::postgres`). Same fixture as `tests/store.rs`
//! (`tests/common`): each case is an async fn over a [`Fixture`], `store_cases!`
//! generates one test per backend, and the PostgreSQL tests fail, not skip, without
//! `BULKHEAD_TEST_POSTGRES_URL`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use bulkhead_learner::store::{
    AuditEntry, AuditQuery, AuditRow, Backend, ChainBreak, ClusterPolicyImport, ClusterPolicyRow, Decision,
    ExternalPeerRow, FlowQuery, LEARNER_ACTOR, ProposalQuery, ProposalRecord, Store, StoreError, actions,
};
use bulkhead_model::{
    Convergence, Direction, Evidence, Flow, HygieneFlag, Identity, LabelSelector, Level, Lint, LintCode, Peer, Policy,
    PortRange, Proposal, ProposalStatus, ProposedRule, Protocol, ReservedIdentity, RolloutMode, Rule, Severity,
    Verdict, Window,
};
use common::{Fixture, all_flows, batch, labels, resolved, store_cases};
use sqlx::{Connection, PgConnection, SqliteConnection};

store_cases!(
    versions_are_numbered_per_target_and_supersede_pending_ones,
    identical_reput_refreshes_evidence_without_a_new_version,
    decisions_follow_the_lifecycle,
    concurrent_decisions_have_exactly_one_winner,
    concurrent_puts_number_versions_without_gaps,
    deploy_supersedes_the_previous_deployment,
    active_policies_are_deployed_and_approved_versions,
    proposal_listing_filters_and_pages,
    audit_chain_verifies_and_the_database_refuses_edits,
    audit_tampering_is_evident,
    concurrent_appends_form_one_chain,
    audit_queries_filter_and_page,
    rollout_modes_are_audited,
    cluster_policies_are_replaced_per_source,
    flow_queries_stop_at_until,
    until_matches_a_model_across_block_steps,
    external_peers_aggregate_world_traffic,
    hostile_strings_are_data,
);

// === builders ===

const NASTY: [&str; 6] = [
    "'); DROP TABLE audit_log;--",
    "x'); DROP TABLE proposals;--",
    "\" OR 1=1 --",
    "it's \"quoted\" `twice`",
    "back\\slash $1 ? ?1 :name @p %_",
    "ünïcödé 🚀 \u{202e}rtl",
];

async fn workload(store: &Store, app: &str) -> Identity {
    store.ensure_identity(&labels(&[("app", app)])).await.expect("identity")
}

fn rule_from(app: &str, port: u16) -> Rule {
    Rule {
        peer: Peer::Workloads { selector: LabelSelector::with_labels([("app", app)]) },
        ports: vec![PortRange::single(Protocol::Tcp, port)],
        http: vec![],
    }
}

/// A proposal for `target` allowing ingress from `app=client` on `ports`; `seen` is
/// evidence only (counters and times), which must not change the proposal's content.
fn proposal(target: Identity, ports: &[u16], seen: u64) -> Proposal {
    let rules: Vec<ProposedRule> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| ProposedRule {
            id: format!("ingress-{i}"),
            direction: Direction::Ingress,
            rule: rule_from("client", *port),
            evidence: Evidence {
                edges: vec![],
                peers: vec![Identity(300)],
                addresses: vec![],
                connections: seen,
                bytes: seen * 100,
                first_seen_unix_ms: 1,
                last_seen_unix_ms: seen as i64,
                http: vec![],
            },
            flags: vec![],
            included: true,
            widens: vec![],
            widens_total: 0,
        })
        .collect();
    Proposal {
        target,
        workload: format!("workload-{}", target.0),
        level: Level::Exact,
        window: Window { from_unix_ms: 0, to_unix_ms: seen as i64 },
        policy: Policy {
            name: format!("bulkhead-{}", target.0),
            namespace: Some("default".into()),
            selector: LabelSelector::with_labels([("app", "server")]),
            ingress: Some(rules.iter().map(|r| r.rule.clone()).collect()),
            egress: None,
        },
        rules,
        widening_total: seen % 3,
        convergence: Convergence { converged: seen > 10, last_new_edge_unix_ms: Some(1), quiet_period_ms: 60_000 },
        lints: vec![],
        removals: vec![],
    }
}

/// Adds a rule held back by a hygiene flag (not part of the policy until confirmed).
fn with_flagged(mut p: Proposal, port: u16) -> Proposal {
    p.rules.push(ProposedRule {
        id: format!("ingress-{}", p.rules.len()),
        direction: Direction::Ingress,
        rule: rule_from("scanner", port),
        evidence: Evidence::default(),
        flags: vec![HygieneFlag::PortScan],
        included: false,
        widens: vec![],
        widens_total: 0,
    });
    p.lints.push(Lint {
        code: LintCode::RulesNeedConfirmation,
        severity: Severity::Warning,
        message: "confirm".into(),
    });
    p
}

async fn put(f: &Fixture, p: &Proposal, now: i64) -> ProposalRecord {
    f.store.put_proposal(p, now).await.expect("put proposal")
}

async fn approve(f: &Fixture, id: i64, policy: &Policy, now: i64) -> ProposalRecord {
    let d = Decision::Approve { policy: policy.clone() };
    f.store.decide_proposal(id, d, "alice", Some("looks right"), now).await.expect("approve")
}

async fn audit(f: &Fixture, q: AuditQuery) -> Vec<AuditRow> {
    f.store.audit(&q).await.expect("audit")
}

async fn audit_actions(f: &Fixture) -> Vec<(String, String)> {
    let rows = audit(f, AuditQuery { limit: 1000, ..AuditQuery::default() }).await;
    rows.into_iter().rev().map(|r| (r.action, r.subject)).collect()
}

fn entry(at: i64, actor: &str, action: &str, subject: &str) -> AuditEntry {
    AuditEntry {
        at_unix_ms: at,
        actor: actor.into(),
        action: action.into(),
        subject: subject.into(),
        detail: serde_json::json!({ "n": at }),
    }
}

#[expect(clippy::too_many_arguments, reason = "a flow has that many facts")]
fn flow(
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    protocol: Protocol,
    direction: Direction,
    c: u64,
    first: i64,
    last: i64,
) -> Flow {
    Flow {
        src_addr: src,
        src_port: 0,
        dst_addr: dst,
        dst_port: port,
        protocol,
        direction,
        netns_ino: 4026531840,
        cgroup_id: 77,
        pid: 1,
        comm: "app".into(),
        connections: c,
        bytes_sent: c * 10,
        bytes_received: c * 100,
        packets: c,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: first,
        last_seen_unix_ms: last,
        http: Default::default(),
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

// === proposals ===

async fn versions_are_numbered_per_target_and_supersede_pending_ones(f: &Fixture) {
    let (t, other) = (workload(&f.store, "server").await, workload(&f.store, "other").await);
    let v1 = put(f, &proposal(t, &[80], 1), 1_000).await;
    assert_eq!((v1.summary.version, v1.summary.status), (1, ProposalStatus::Proposed));
    assert_eq!((v1.summary.target, v1.summary.created_unix_ms), (t, 1_000));
    assert_eq!((v1.summary.ingress_rules, v1.summary.egress_rules, v1.summary.flagged_rules), (1, 0, 0));
    assert_eq!(v1.summary.digest.len(), 64);
    assert_eq!(v1.proposal, proposal(t, &[80], 1), "the proposal round-trips");

    let v2 = put(f, &with_flagged(proposal(t, &[80, 443], 1), 22), 2_000).await;
    assert_eq!((v2.summary.version, v2.summary.status), (2, ProposalStatus::Proposed));
    assert_eq!((v2.summary.ingress_rules, v2.summary.flagged_rules, v2.summary.lints), (3, 1, 1));
    assert_ne!(v2.summary.digest, v1.summary.digest);
    let v1_now = f.store.proposal(v1.summary.id).await.expect("read").expect("v1 exists");
    assert_eq!(v1_now.summary.status, ProposalStatus::Superseded);
    assert_eq!(v1_now.summary.superseded_by, Some(v2.summary.id));

    let v3 = put(f, &proposal(t, &[443], 1), 3_000).await;
    assert_eq!(v3.summary.version, 3);
    // Another target numbers its own versions.
    let o1 = put(f, &proposal(other, &[80], 1), 3_500).await;
    assert_eq!(o1.summary.version, 1);

    let versions = f.store.proposal_versions(t).await.expect("versions");
    let got: Vec<(u32, ProposalStatus, Option<i64>)> =
        versions.iter().map(|s| (s.version, s.status, s.superseded_by)).collect();
    assert_eq!(
        got,
        vec![
            (3, ProposalStatus::Proposed, None),
            (2, ProposalStatus::Superseded, Some(v3.summary.id)),
            (1, ProposalStatus::Superseded, Some(v2.summary.id)),
        ]
    );
    assert!(f.store.proposal(i64::MAX).await.expect("read missing").is_none());

    // Every new version is audited by the learner, in order.
    let rows = audit(f, AuditQuery { action_prefix: Some("proposal.".into()), ..AuditQuery::default() }).await;
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.action == actions::PROPOSAL_PROPOSED && r.actor == LEARNER_ACTOR));
    assert_eq!(rows[1].subject, format!("proposal:{}", v3.summary.id));
    assert_eq!(rows[1].detail["version"], 3);
    assert_eq!(rows[1].detail["superseded"], serde_json::json!([v2.summary.id]));

    // A target that was never allocated is refused as such.
    let e = f.store.put_proposal(&proposal(Identity(999_999), &[80], 1), 1).await.expect_err("unknown target");
    assert!(matches!(e, StoreError::UnknownIdentity { identity: 999_999 }), "{e:?}");
}

async fn identical_reput_refreshes_evidence_without_a_new_version(f: &Fixture) {
    let t = workload(&f.store, "server").await;
    let first = put(f, &proposal(t, &[80, 443], 1), 1_000).await;
    // Same content, fresh evidence (counters, times, convergence, widening).
    let fresh = proposal(t, &[443, 80], 50);
    let again = put(f, &fresh, 5_000).await;
    assert_eq!(again.summary.id, first.summary.id);
    assert_eq!(again.summary.version, 1);
    assert_eq!((again.summary.created_unix_ms, again.summary.refreshed_unix_ms), (1_000, 5_000));
    assert_eq!(again.summary.digest, first.summary.digest);
    assert!(again.summary.converged && !first.summary.converged);
    assert_eq!(again.summary.widening_total, 50 % 3);
    assert_eq!(again.proposal.rules[0].evidence.connections, 50, "the stored JSON has the fresh evidence");
    assert_eq!(f.store.proposal_versions(t).await.expect("versions").len(), 1);
    assert_eq!(audit_actions(f).await.len(), 1, "a refresh is not a new proposal");

    // Once decided, the same content is not asked again…
    let approved = approve(f, first.summary.id, &first.proposal.policy, 6_000).await;
    let kept = put(f, &proposal(t, &[80, 443], 99), 7_000).await;
    assert_eq!(kept.summary.id, first.summary.id);
    assert_eq!(kept.summary.status, ProposalStatus::Approved);
    assert_eq!(kept, approved, "a decided version is never rewritten");
    // …but new content is a new version, leaving the approval alone.
    let v2 = put(f, &proposal(t, &[80], 99), 8_000).await;
    assert_eq!((v2.summary.version, v2.summary.status), (2, ProposalStatus::Proposed));
    let v1 = f.store.proposal(first.summary.id).await.expect("read").expect("v1");
    assert_eq!(v1.summary.status, ProposalStatus::Approved);
    // A rejected content is not re-proposed either.
    f.store.decide_proposal(v2.summary.id, Decision::Reject, "bob", Some("no"), 9_000).await.expect("reject");
    let kept = put(f, &proposal(t, &[80], 1), 10_000).await;
    assert_eq!((kept.summary.id, kept.summary.status), (v2.summary.id, ProposalStatus::Rejected));
    assert_eq!(f.store.proposal_versions(t).await.expect("versions").len(), 2);
}

async fn decisions_follow_the_lifecycle(f: &Fixture) {
    let t = workload(&f.store, "server").await;
    let v1 = put(f, &with_flagged(proposal(t, &[80, 443], 1), 22), 1_000).await;
    let id = v1.summary.id;

    // Rejecting needs a comment; nothing changes when refused.
    for comment in [None, Some(""), Some("   ")] {
        let e = f.store.decide_proposal(id, Decision::Reject, "bob", comment, 2_000).await.expect_err("no comment");
        assert!(matches!(e, StoreError::CommentRequired { id: i } if i == id), "{e:?}");
    }
    let e = f
        .store
        .decide_proposal(id, Decision::Approve { policy: v1.proposal.policy.clone() }, " ", None, 2_000)
        .await
        .expect_err("blank actor");
    assert!(matches!(e, StoreError::MissingField { field: "actor" }), "{e:?}");
    let e = f.store.mark_deployed(id, "carol", 2_000).await.expect_err("deploy before approval");
    assert!(
        matches!(e, StoreError::InvalidTransition { from: ProposalStatus::Proposed, to: ProposalStatus::Deployed, .. }),
        "{e:?}"
    );
    assert_eq!(f.store.proposal(id).await.expect("read").expect("v1").summary.status, ProposalStatus::Proposed);

    // Approve with the flagged rule confirmed and the 443 rule dropped.
    let mut policy = v1.proposal.policy.clone();
    policy.ingress = Some(vec![rule_from("client", 80), rule_from("scanner", 22)]);
    let approved = f
        .store
        .decide_proposal(id, Decision::Approve { policy: policy.clone() }, "alice", None, 3_000)
        .await
        .expect("approve");
    let s = &approved.summary;
    assert_eq!(s.status, ProposalStatus::Approved);
    assert_eq!((s.reviewer.as_deref(), s.decided_unix_ms, s.comment.as_deref()), (Some("alice"), Some(3_000), None));
    assert_eq!(approved.approved_policy.as_ref(), Some(&policy));
    assert_ne!(approved.approved_policy.as_ref(), Some(&approved.proposal.policy), "approval may differ");

    // Decided once: a second decision of either kind is a conflict.
    let e = approve_err(f, id, &policy).await;
    assert!(
        matches!(e, StoreError::InvalidTransition { from: ProposalStatus::Approved, to: ProposalStatus::Approved, .. }),
        "{e:?}"
    );
    let e = f.store.decide_proposal(id, Decision::Reject, "bob", Some("late"), 4_000).await.expect_err("late");
    assert!(
        matches!(e, StoreError::InvalidTransition { from: ProposalStatus::Approved, to: ProposalStatus::Rejected, .. }),
        "{e:?}"
    );
    let e = approve_err(f, i64::MAX, &policy).await;
    assert!(matches!(e, StoreError::ProposalNotFound { id: i64::MAX }), "{e:?}");

    // The decision is audited in the same transaction, with what the approval changed.
    let rows = audit(f, AuditQuery { subject: Some(format!("proposal:{id}")), ..AuditQuery::default() }).await;
    let (decision, proposed) = (&rows[0], &rows[1]);
    assert_eq!(proposed.action, actions::PROPOSAL_PROPOSED);
    assert_eq!((decision.action.as_str(), decision.actor.as_str()), (actions::PROPOSAL_APPROVE, "alice"));
    assert_eq!(decision.at_unix_ms, 3_000);
    let d = &decision.detail;
    assert_eq!((d["version"].as_u64(), d["confirmed_flagged"].as_u64()), (Some(1), Some(1)));
    assert_eq!((d["dropped"].as_u64(), d["added"].as_u64(), d["ingress_rules"].as_u64()), (Some(1), Some(0), Some(2)));

    // A newer version can be rejected with a reason; a superseded one cannot be decided.
    let v2 = put(f, &proposal(t, &[8080], 1), 5_000).await;
    let v3 = put(f, &proposal(t, &[9090], 1), 5_500).await;
    let e = f.store.decide_proposal(v2.summary.id, Decision::Reject, "bob", Some("x"), 6_000).await.expect_err("old");
    assert!(matches!(e, StoreError::InvalidTransition { from: ProposalStatus::Superseded, .. }), "{e:?}");
    let rejected = f
        .store
        .decide_proposal(v3.summary.id, Decision::Reject, "bob", Some("  too wide  "), 6_000)
        .await
        .expect("reject");
    assert_eq!(rejected.summary.status, ProposalStatus::Rejected);
    assert_eq!(rejected.summary.comment.as_deref(), Some("too wide"));
    assert_eq!(rejected.approved_policy, None);
    let last = &f.store.audit(&AuditQuery { limit: 1, ..AuditQuery::default() }).await.expect("audit")[0];
    assert_eq!((last.action.as_str(), last.detail["comment"].as_str()), (actions::PROPOSAL_REJECT, Some("too wide")));

    // Approving a newer version supersedes the approved, not yet deployed one.
    let v4 = put(f, &proposal(t, &[7070], 1), 7_000).await;
    approve(f, v4.summary.id, &v4.proposal.policy, 8_000).await;
    let v1 = f.store.proposal(id).await.expect("read").expect("v1");
    assert_eq!((v1.summary.status, v1.summary.superseded_by), (ProposalStatus::Superseded, Some(v4.summary.id)));
    assert_eq!(v1.approved_policy, Some(policy), "what was approved stays on record");
}

async fn approve_err(f: &Fixture, id: i64, policy: &Policy) -> StoreError {
    let d = Decision::Approve { policy: policy.clone() };
    f.store.decide_proposal(id, d, "mallory", None, 9_999).await.expect_err("approve must fail")
}

async fn concurrent_decisions_have_exactly_one_winner(f: &Fixture) {
    let t = workload(&f.store, "server").await;
    let v1 = put(f, &proposal(t, &[80], 1), 1_000).await;
    let id = v1.summary.id;
    let policy = Arc::new(v1.proposal.policy.clone());
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (store, policy) = (f.store.clone(), policy.clone());
            tokio::spawn(async move {
                let actor = format!("analyst-{i}");
                if i % 2 == 0 {
                    let d = Decision::Approve { policy: (*policy).clone() };
                    store.decide_proposal(id, d, &actor, None, 2_000 + i).await
                } else {
                    store.decide_proposal(id, Decision::Reject, &actor, Some("no"), 2_000 + i).await
                }
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => winners.push(r),
            Err(StoreError::InvalidTransition { id: i, from, .. }) => {
                assert_eq!(i, id);
                assert!(matches!(from, ProposalStatus::Approved | ProposalStatus::Rejected));
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one decision wins");
    let stored = f.store.proposal(id).await.expect("read").expect("v1");
    assert_eq!(stored.summary.status, winners[0].summary.status);
    assert_eq!(stored.summary.reviewer, winners[0].summary.reviewer);
    let decisions: Vec<_> =
        audit_actions(f).await.into_iter().filter(|(a, _)| a != actions::PROPOSAL_PROPOSED).collect();
    assert_eq!(decisions.len(), 1, "and only the winner is audited: {decisions:?}");
    assert_eq!(f.store.verify_audit_chain().await.expect("chain"), 2);
}

async fn concurrent_puts_number_versions_without_gaps(f: &Fixture) {
    let t = workload(&f.store, "server").await;
    let tasks: Vec<_> = (0..6u16)
        .map(|i| {
            let store = f.store.clone();
            tokio::spawn(async move { store.put_proposal(&proposal(t, &[1000 + i], 1), 1_000).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("put");
    }
    let versions = f.store.proposal_versions(t).await.expect("versions");
    let numbers: Vec<u32> = versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, vec![6, 5, 4, 3, 2, 1]);
    let pending: Vec<_> = versions.iter().filter(|v| v.status == ProposalStatus::Proposed).collect();
    assert_eq!(pending.len(), 1, "only the newest stays pending");
    assert_eq!(pending[0].version, 6);
    assert_eq!(f.store.verify_audit_chain().await.expect("chain"), 6);
}

async fn deploy_supersedes_the_previous_deployment(f: &Fixture) {
    let t = workload(&f.store, "server").await;
    let v1 = put(f, &proposal(t, &[80], 1), 1_000).await;
    approve(f, v1.summary.id, &v1.proposal.policy, 2_000).await;
    let d1 = f.store.mark_deployed(v1.summary.id, "carol", 3_000).await.expect("deploy v1");
    assert_eq!((d1.summary.status, d1.summary.deployed_unix_ms), (ProposalStatus::Deployed, Some(3_000)));
    let e = f.store.mark_deployed(v1.summary.id, "carol", 3_500).await.expect_err("deploy twice");
    assert!(matches!(e, StoreError::InvalidTransition { from: ProposalStatus::Deployed, .. }), "{e:?}");

    let v2 = put(f, &proposal(t, &[80, 443], 1), 4_000).await;
    approve(f, v2.summary.id, &v2.proposal.policy, 5_000).await;
    // Approving v2 leaves the deployed v1 in force until v2 is deployed.
    let v1_now = f.store.proposal(v1.summary.id).await.expect("read").expect("v1");
    assert_eq!(v1_now.summary.status, ProposalStatus::Deployed);
    f.store.mark_deployed(v2.summary.id, "carol", 6_000).await.expect("deploy v2");
    let v1_now = f.store.proposal(v1.summary.id).await.expect("read").expect("v1");
    assert_eq!(
        (v1_now.summary.status, v1_now.summary.superseded_by),
        (ProposalStatus::Superseded, Some(v2.summary.id))
    );

    let deploys = audit(f, AuditQuery { action_prefix: Some("proposal.deploy".into()), ..AuditQuery::default() }).await;
    assert_eq!(deploys.len(), 2);
    assert_eq!(deploys[0].actor, "carol");
    assert_eq!(deploys[0].detail["superseded"], serde_json::json!([v1.summary.id]));
    let e = f.store.mark_deployed(v2.summary.id, "", 7_000).await.expect_err("blank actor");
    assert!(matches!(e, StoreError::MissingField { field: "actor" }), "{e:?}");
}

async fn active_policies_are_deployed_and_approved_versions(f: &Fixture) {
    let (a, b, c, d) = (
        workload(&f.store, "a").await,
        workload(&f.store, "b").await,
        workload(&f.store, "c").await,
        workload(&f.store, "d").await,
    );
    // a: v1 deployed, v2 approved (the next deployment), v3 pending.
    let a1 = put(f, &proposal(a, &[80], 1), 1).await;
    approve(f, a1.summary.id, &a1.proposal.policy, 2).await;
    f.store.mark_deployed(a1.summary.id, "carol", 3).await.expect("deploy");
    let a2 = put(f, &proposal(a, &[81], 1), 4).await;
    let mut a2_policy = a2.proposal.policy.clone();
    a2_policy.egress = Some(vec![]);
    approve(f, a2.summary.id, &a2_policy, 5).await;
    put(f, &proposal(a, &[82], 1), 6).await;
    // b: approved only. c: pending only. d: rejected.
    let b1 = put(f, &proposal(b, &[80], 1), 7).await;
    approve(f, b1.summary.id, &b1.proposal.policy, 8).await;
    put(f, &proposal(c, &[80], 1), 9).await;
    let d1 = put(f, &proposal(d, &[80], 1), 10).await;
    f.store.decide_proposal(d1.summary.id, Decision::Reject, "bob", Some("no"), 11).await.expect("reject");

    let active = f.store.active_policies().await.expect("active");
    let got: Vec<(Identity, u32, ProposalStatus)> = active.iter().map(|p| (p.target, p.version, p.status)).collect();
    assert_eq!(
        got,
        vec![(a, 1, ProposalStatus::Deployed), (a, 2, ProposalStatus::Approved), (b, 1, ProposalStatus::Approved)]
    );
    assert_eq!(active[1].policy, a2_policy, "the approved policy, not the proposed one");
    assert_eq!(active[0].proposal_id, a1.summary.id);
}

async fn proposal_listing_filters_and_pages(f: &Fixture) {
    let (a, b) = (workload(&f.store, "a").await, workload(&f.store, "b").await);
    let mut ids = Vec::new();
    for i in 0..5u16 {
        ids.push(put(f, &proposal(a, &[100 + i], 1), i64::from(i)).await.summary.id);
        ids.push(put(f, &proposal(b, &[100 + i], 1), i64::from(i)).await.summary.id);
    }
    let all = f.store.proposals(&ProposalQuery::default()).await.expect("all");
    assert_eq!(all.iter().map(|s| s.id).collect::<Vec<_>>(), ids.iter().rev().copied().collect::<Vec<_>>());
    let pending = ProposalQuery { status: Some(ProposalStatus::Proposed), ..ProposalQuery::default() };
    let pending = f.store.proposals(&pending).await.expect("pending");
    assert_eq!(pending.iter().map(|s| s.target).collect::<BTreeSet<_>>(), BTreeSet::from([a, b]));
    assert_eq!(pending.len(), 2);
    let of_a = ProposalQuery { target: Some(a), status: Some(ProposalStatus::Superseded), ..ProposalQuery::default() };
    assert_eq!(f.store.proposals(&of_a).await.expect("superseded of a").len(), 4);

    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = ProposalQuery { limit: 3, before_id: before, ..ProposalQuery::default() };
        let page = f.store.proposals(&page).await.expect("page");
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        seen.extend(page.iter().map(|s| s.id));
    }
    assert_eq!(seen, all.iter().map(|s| s.id).collect::<Vec<_>>());
}

// === audit ===

async fn audit_chain_verifies_and_the_database_refuses_edits(f: &Fixture) {
    assert_eq!(f.store.verify_audit_chain().await.expect("empty chain"), 0);
    let mut rows = Vec::new();
    for (i, actor) in NASTY.iter().enumerate() {
        let row = f.store.append_audit(&entry(i as i64, actor, "test.append", actor)).await.expect("append");
        rows.push(row);
    }
    assert_eq!(rows[0].prev_hash, "0".repeat(64), "the first entry links to the empty chain");
    assert!(rows.windows(2).all(|w| w[1].prev_hash == w[0].hash && w[1].id > w[0].id));
    assert_eq!(f.store.verify_audit_chain().await.expect("chain"), NASTY.len() as u64);

    for (sql, what) in [
        ("UPDATE audit_log SET actor = 'mallory'", "update"),
        ("DELETE FROM audit_log", "delete"),
        ("DELETE FROM audit_log WHERE id = (SELECT max(id) FROM audit_log)", "delete last"),
        ("DELETE FROM audit_head", "delete head"),
    ] {
        let e = f.raw_sql(sql).await.expect_err(what);
        let msg = e.to_string();
        assert!(msg.contains("append-only") || msg.contains("cannot be deleted"), "{what}: {msg}");
    }
    if f.store.backend() == Backend::Postgres {
        let e = f.raw_sql("TRUNCATE audit_log").await.expect_err("truncate");
        assert!(e.to_string().contains("append-only"), "{e}");
    }
    // Still all there, still sound; and the store keeps appending after the refusals.
    assert_eq!(f.store.verify_audit_chain().await.expect("chain"), NASTY.len() as u64);
    f.store.append_audit(&entry(99, "alice", "test.append", "s")).await.expect("append");
    assert_eq!(f.store.verify_audit_chain().await.expect("chain"), NASTY.len() as u64 + 1);

    for (e, field) in
        [(entry(1, "", "a", "s"), "actor"), (entry(1, "x", " ", "s"), "action"), (entry(1, "x", "a", ""), "subject")]
    {
        let err = f.store.append_audit(&e).await.expect_err("blank field");
        assert!(matches!(err, StoreError::MissingField { field: got } if got == field), "{err:?}");
    }
}

async fn audit_tampering_is_evident(f: &Fixture) {
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(f.store.append_audit(&entry(i, "alice", "test.append", "s")).await.expect("append").id);
    }
    // Someone with the schema owner's rights switches the guard off and edits a row.
    let (disable, edit): (&str, &str) = match f.store.backend() {
        Backend::Sqlite => ("DROP TRIGGER audit_log_no_update", "UPDATE audit_log SET actor = 'mallory' WHERE id = 2"),
        Backend::Postgres => (
            "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete",
            "UPDATE audit_log SET actor = 'mallory' WHERE id = 2",
        ),
    };
    f.raw_sql(disable).await.expect("disable the trigger");
    assert_eq!(ids[1], 2, "fresh database: ids start at 1");
    assert_eq!(f.raw_sql(edit).await.expect("edit"), 1);
    let e = f.store.verify_audit_chain().await.expect_err("edited entry");
    assert!(matches!(e, StoreError::AuditChainBroken { id: 2, kind: ChainBreak::Hash }), "{e:?}");
}

async fn concurrent_appends_form_one_chain(f: &Fixture) {
    let t = workload(&f.store, "server").await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let store = f.store.clone();
            tokio::spawn(async move {
                for j in 0..5 {
                    let e = entry(i * 10 + j, &format!("actor-{i}"), "test.concurrent", "s");
                    store.append_audit(&e).await.expect("append");
                }
                // Audited writes of other kinds interleave with plain appends.
                let mode = if i % 2 == 0 { RolloutMode::Monitor } else { RolloutMode::Enforce };
                store.set_rollout_mode(t, mode, &format!("actor-{i}"), "race", i).await.expect("rollout");
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(f.store.verify_audit_chain().await.expect("one chain"), 12 * 6);
    let rows = audit(f, AuditQuery { limit: 1000, ..AuditQuery::default() }).await;
    let hashes: BTreeSet<&str> = rows.iter().map(|r| r.hash.as_str()).collect();
    let prevs: BTreeSet<&str> = rows.iter().map(|r| r.prev_hash.as_str()).collect();
    assert_eq!((hashes.len(), prevs.len()), (72, 72), "no fork: every entry has its own predecessor");
}

async fn audit_queries_filter_and_page(f: &Fixture) {
    for i in 0..20i64 {
        let actor = if i % 2 == 0 { "alice" } else { "bob" };
        let action = if i % 4 == 0 { "rollout.mode" } else { "proposal.approve" };
        f.store.append_audit(&entry(i * 100, actor, action, &format!("subject-{}", i % 5))).await.expect("append");
    }
    let q = |q: AuditQuery| {
        let store = f.store.clone();
        async move { store.audit(&AuditQuery { limit: 1000, ..q }).await.expect("audit") }
    };
    let all = q(AuditQuery::default()).await;
    assert_eq!(all.len(), 20);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(q(AuditQuery { actor: Some("alice".into()), ..AuditQuery::default() }).await.len(), 10);
    assert_eq!(q(AuditQuery { action_prefix: Some("rollout.".into()), ..AuditQuery::default() }).await.len(), 5);
    assert_eq!(q(AuditQuery { action_prefix: Some("ROLLOUT.".into()), ..AuditQuery::default() }).await.len(), 0);
    assert_eq!(q(AuditQuery { action_prefix: Some("%".into()), ..AuditQuery::default() }).await.len(), 0);
    assert_eq!(q(AuditQuery { action_prefix: Some(String::new()), ..AuditQuery::default() }).await.len(), 20);
    assert_eq!(q(AuditQuery { subject: Some("subject-3".into()), ..AuditQuery::default() }).await.len(), 4);
    let window = AuditQuery { since_unix_ms: Some(500), until_unix_ms: Some(900), ..AuditQuery::default() };
    assert_eq!(q(window).await.iter().map(|r| r.at_unix_ms).collect::<Vec<_>>(), vec![900, 800, 700, 600, 500]);
    let both = AuditQuery {
        actor: Some("bob".into()),
        action_prefix: Some("proposal.".into()),
        subject: Some("subject-1".into()),
        ..AuditQuery::default()
    };
    assert_eq!(q(both).await.iter().map(|r| r.at_unix_ms).collect::<Vec<_>>(), vec![1100, 100]);

    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = audit(f, AuditQuery { limit: 7, before_id: before, ..AuditQuery::default() }).await;
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        seen.extend(page.iter().map(|r| r.id));
    }
    assert_eq!(seen, all.iter().map(|r| r.id).collect::<Vec<_>>());
}

// === rollout ===

async fn rollout_modes_are_audited(f: &Fixture) {
    let (a, b) = (workload(&f.store, "a").await, workload(&f.store, "b").await);
    assert!(f.store.rollout_modes().await.expect("modes").is_empty(), "absent = learn");

    let r = f.store.set_rollout_mode(a, RolloutMode::Monitor, "alice", "gate passed", 1_000).await.expect("monitor");
    assert_eq!((r.target, r.mode, r.mode_since_unix_ms, r.changed_unix_ms), (a, RolloutMode::Monitor, 1_000, 1_000));
    assert_eq!((r.changed_by.as_str(), r.reason.as_str()), ("alice", "gate passed"));
    // Re-confirming keeps the time the target entered the mode.
    let r = f.store.set_rollout_mode(a, RolloutMode::Monitor, "bob", "still fine", 2_000).await.expect("again");
    assert_eq!((r.mode_since_unix_ms, r.changed_unix_ms, r.changed_by.as_str()), (1_000, 2_000, "bob"));
    let r = f.store.set_rollout_mode(a, RolloutMode::Enforce, "carol", "", 3_000).await.expect("enforce");
    assert_eq!((r.mode, r.mode_since_unix_ms), (RolloutMode::Enforce, 3_000));
    f.store.set_rollout_mode(b, RolloutMode::Learn, "dave", "back to learning", 4_000).await.expect("learn");

    let modes = f.store.rollout_modes().await.expect("modes");
    let got: Vec<(Identity, RolloutMode)> = modes.iter().map(|r| (r.target, r.mode)).collect();
    assert_eq!(got, vec![(a, RolloutMode::Enforce), (b, RolloutMode::Learn)]);

    let rows =
        audit(f, AuditQuery { action_prefix: Some(actions::ROLLOUT_MODE.into()), ..AuditQuery::default() }).await;
    let got: Vec<(&str, &str, serde_json::Value, serde_json::Value)> = rows
        .iter()
        .rev()
        .map(|r| (r.actor.as_str(), r.subject.as_str(), r.detail["from"].clone(), r.detail["to"].clone()))
        .collect();
    let subject_a = format!("identity:{}", a.0);
    let subject_b = format!("identity:{}", b.0);
    assert_eq!(
        got,
        vec![
            ("alice", subject_a.as_str(), "learn".into(), "monitor".into()),
            ("bob", subject_a.as_str(), "monitor".into(), "monitor".into()),
            ("carol", subject_a.as_str(), "monitor".into(), "enforce".into()),
            ("dave", subject_b.as_str(), "learn".into(), "learn".into()),
        ]
    );
    assert_eq!(rows[3].detail["reason"], "gate passed");

    let e = f.store.set_rollout_mode(Identity(424_242), RolloutMode::Monitor, "x", "", 1).await.expect_err("unknown");
    assert!(matches!(e, StoreError::UnknownIdentity { identity: 424_242 }), "{e:?}");
    let e = f.store.set_rollout_mode(a, RolloutMode::Learn, "  ", "", 1).await.expect_err("blank actor");
    assert!(matches!(e, StoreError::MissingField { field: "actor" }), "{e:?}");
    assert_eq!(f.store.verify_audit_chain().await.expect("chain"), 4, "refused calls leave no trace");
}

// === cluster policies ===

fn cluster_policy(namespace: &str, name: &str, rv: &str) -> ClusterPolicyRow {
    ClusterPolicyRow {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{namespace}-{name}"),
        resource_version: rv.into(),
        policy: Policy {
            name: name.into(),
            namespace: Some(namespace.into()),
            selector: LabelSelector::with_labels([("app", name)]),
            ingress: Some(vec![Rule::l4(Peer::Entity { entity: ReservedIdentity::Host }, vec![])]),
            egress: None,
        },
        raw: serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": { "namespace": namespace, "name": name, "resourceVersion": rv },
        }),
    }
}

async fn cluster_policies_are_replaced_per_source(f: &Fixture) {
    let (a, b, c) =
        (cluster_policy("shop", "web", "1"), cluster_policy("shop", "db", "7"), cluster_policy("ops", "x", "3"));
    let counts = f.store.replace_cluster_policies("prod", vec![a.clone(), b.clone()], 1_000).await.expect("first");
    assert_eq!(counts, ClusterPolicyImport { added: 2, updated: 0, removed: 0, unchanged: 0 });
    let staging = cluster_policy("shop", "web", "99");
    f.store.replace_cluster_policies("staging", [staging.clone()], 1_000).await.expect("other source");

    // Same set again: nothing changed, nothing audited.
    let counts = f.store.replace_cluster_policies("prod", &[b.clone(), a.clone()], 2_000).await.expect("same");
    assert_eq!(counts, ClusterPolicyImport { unchanged: 2, ..ClusterPolicyImport::default() });

    let b2 = cluster_policy("shop", "db", "8");
    let counts = f.store.replace_cluster_policies("prod", vec![b2.clone(), c.clone()], 3_000).await.expect("change");
    assert_eq!(counts, ClusterPolicyImport { added: 1, updated: 1, removed: 1, unchanged: 0 });
    let mut expected = vec![c.clone(), b2.clone(), staging.clone()];
    expected.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
    assert_eq!(f.store.cluster_policies().await.expect("read"), expected, "staging untouched");

    let e = f.store.replace_cluster_policies("prod", vec![c.clone(), c.clone()], 4_000).await.expect_err("dup");
    assert!(matches!(&e, StoreError::DuplicateClusterPolicy { namespace, name } if namespace == "ops" && name == "x"));
    let e = f.store.replace_cluster_policies("", vec![c.clone()], 4_000).await.expect_err("blank source");
    assert!(matches!(e, StoreError::MissingField { field: "source" }), "{e:?}");
    assert_eq!(f.store.cluster_policies().await.expect("read").len(), 3, "refused imports change nothing");

    let counts = f.store.replace_cluster_policies("prod", Vec::<ClusterPolicyRow>::new(), 5_000).await.expect("empty");
    assert_eq!(counts.removed, 2);
    assert_eq!(f.store.cluster_policies().await.expect("read"), vec![staging]);

    let imports: Vec<(String, String)> = audit_actions(f).await;
    let expected: Vec<(String, String)> = ["prod", "staging", "prod", "prod"]
        .iter()
        .map(|s| (actions::CLUSTER_POLICIES_IMPORT.to_owned(), format!("cluster-policies:{s}")))
        .collect();
    assert_eq!(imports, expected);
}

// === replay feeds ===

async fn flow_queries_stop_at_until(f: &Fixture) {
    let (a, b, c) = (workload(&f.store, "a").await, workload(&f.store, "b").await, workload(&f.store, "c").await);
    // Five batches (five flow_blocks on SQLite) of two flows each; flow k began at k*100.
    for seq in 0..5u64 {
        let flows = (0..2)
            .map(|i| {
                let k = seq as i64 * 2 + i;
                let dst = if k % 2 == 0 { b } else { c };
                resolved(
                    flow(
                        v4(10, 0, 0, 1),
                        v4(10, 0, 0, 2),
                        80,
                        Protocol::Tcp,
                        Direction::Egress,
                        1,
                        k * 100,
                        k * 100 + 50,
                    ),
                    a,
                    dst,
                )
            })
            .collect();
        f.store.ingest(&batch("node-1", seq, flows)).await.expect("ingest");
    }
    let firsts = |q: FlowQuery| {
        let store = f.store.clone();
        async move {
            let rows = store.flows(&q).await.expect("flows");
            rows.iter().map(|r| r.flow.first_seen_unix_ms).collect::<Vec<_>>()
        }
    };
    assert_eq!(
        firsts(FlowQuery { until_unix_ms: Some(450), ..FlowQuery::default() }).await,
        vec![400, 300, 200, 100, 0]
    );
    assert_eq!(firsts(FlowQuery { until_unix_ms: Some(400), ..FlowQuery::default() }).await.len(), 5, "inclusive");
    let window = FlowQuery { since_unix_ms: Some(200), until_unix_ms: Some(450), ..FlowQuery::default() };
    assert_eq!(firsts(window).await, vec![400, 300, 200], "flows overlapping [since, until]");
    let of_c = FlowQuery { identity: Some(c), until_unix_ms: Some(750), ..FlowQuery::default() };
    assert_eq!(firsts(of_c).await, vec![700, 500, 300, 100]);
    assert_eq!(firsts(FlowQuery { until_unix_ms: Some(-1), ..FlowQuery::default() }).await, Vec::<i64>::new());
    assert_eq!(firsts(FlowQuery::default()).await.len(), 10, "no until: everything");

    // Paging within an until filter walks past blocks that hold nothing old enough.
    let mut got = Vec::new();
    let mut before = None;
    loop {
        let q = FlowQuery { until_unix_ms: Some(250), limit: 1, before_id: before, ..FlowQuery::default() };
        let page = f.store.flows(&q).await.expect("page");
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        got.extend(page.iter().map(|r| r.flow.first_seen_unix_ms));
    }
    assert_eq!(got, vec![200, 100, 0]);
}

/// `until` with every other filter and several page sizes gives what a plain filter
/// over all flows gives, across more batches than SQLite reads per block step (64) and
/// with first_seen not growing with the id.
async fn until_matches_a_model_across_block_steps(f: &Fixture) {
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(workload(&f.store, &format!("m{i}")).await);
    }
    let (src, dst) = (v4(10, 0, 0, 1), v4(10, 0, 0, 2));
    for k in 0..150u64 {
        let flows = (0..(1 + k % 3))
            .map(|j| {
                let first = ((k * 37 + j * 11) % 150) as i64 * 10;
                let f = flow(src, dst, 80, Protocol::Tcp, Direction::Egress, 1, first, first + 25);
                resolved(f, ids[(k % 4) as usize], ids[((k / 4 + j) % 4) as usize])
            })
            .collect();
        f.store.ingest(&batch(&format!("node-{}", k % 2), k, flows)).await.expect("ingest");
    }
    let all = all_flows(&f.store).await;
    assert_eq!(all.len(), 300);
    for identity in [None, Some(ids[1])] {
        for since in [None, Some(400i64)] {
            for until in [Some(0i64), Some(333), Some(1200)] {
                let expected: Vec<i64> = all
                    .iter()
                    .filter(|r| identity.is_none_or(|i| r.src_identity == i || r.dst_identity == i))
                    .filter(|r| since.is_none_or(|s| r.flow.last_seen_unix_ms >= s))
                    .filter(|r| until.is_none_or(|u| r.flow.first_seen_unix_ms <= u))
                    .map(|r| r.id)
                    .collect();
                for page in [1u32, 7, 1000] {
                    let mut got = Vec::new();
                    let mut before = None;
                    loop {
                        let q = FlowQuery {
                            identity,
                            since_unix_ms: since,
                            until_unix_ms: until,
                            limit: page,
                            before_id: before,
                            ..FlowQuery::default()
                        };
                        let rows = f.store.flows(&q).await.expect("flows");
                        let Some(last) = rows.last() else { break };
                        before = Some(last.id);
                        got.extend(rows.iter().map(|r| r.id));
                    }
                    assert_eq!(got, expected, "{identity:?} {since:?} {until:?} page {page}");
                }
            }
        }
    }
}

async fn external_peers_aggregate_world_traffic(f: &Fixture) {
    let (a, b) = (workload(&f.store, "a").await, workload(&f.store, "b").await);
    let world = Identity::WORLD;
    let (local_a, local_b) = (v4(10, 0, 0, 1), v4(10, 0, 0, 2));
    let (cdn, dns, scanner) = (v4(1, 1, 1, 1), v4(8, 8, 8, 8), v4(203, 0, 113, 9));
    let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    let tcp = Protocol::Tcp;
    use Direction::{Egress, Ingress};
    let first = vec![
        resolved(flow(local_a, cdn, 443, tcp, Egress, 2, 100, 200), a, world),
        resolved(flow(local_a, dns, 53, Protocol::Udp, Egress, 1, 150, 150), a, world),
        resolved(flow(scanner, local_b, 80, tcp, Ingress, 4, 500, 600), world, b),
        // Not external: both ends known, or both ends world.
        resolved(flow(local_a, local_b, 80, tcp, Egress, 9, 100, 900), a, b),
        resolved(flow(cdn, dns, 80, tcp, Egress, 9, 100, 900), world, world),
    ];
    f.store.ingest(&batch("node-1", 1, first)).await.expect("ingest");
    let mut huge = flow(local_a, v4(9, 9, 9, 9), 443, tcp, Egress, 1, 700, 700);
    (huge.connections, huge.bytes_sent, huge.bytes_received) = (u64::MAX, u64::MAX, u64::MAX);
    let second = vec![
        // Same group as the first cdn flow, from another node and batch.
        resolved(flow(local_a, cdn, 443, tcp, Egress, 3, 300, 400), a, world),
        resolved(flow(local_b, v6, 443, tcp, Egress, 1, 800, 800), b, world),
        resolved(huge.clone(), a, world),
        resolved(huge, a, world),
    ];
    f.store.ingest(&batch("node-2", 1, second)).await.expect("ingest");

    let peer = |local, direction, addr, dst_port, protocol, c: u64, bytes: u64, first, last| ExternalPeerRow {
        local,
        direction,
        addr,
        dst_port,
        protocol,
        connections: c,
        bytes,
        first_seen_unix_ms: first,
        last_seen_unix_ms: last,
    };
    let all = f.store.external_peers(i64::MIN, i64::MAX).await.expect("peers");
    let max = i64::MAX as u64;
    assert_eq!(
        all,
        vec![
            peer(a, Egress, cdn, 443, tcp, 5, 5 * 110, 100, 400),
            peer(a, Egress, dns, 53, Protocol::Udp, 1, 110, 150, 150),
            peer(a, Egress, v4(9, 9, 9, 9), 443, tcp, max, max, 700, 700),
            peer(b, Egress, v6, 443, tcp, 1, 110, 800, 800),
            peer(b, Ingress, scanner, 80, tcp, 4, 440, 500, 600),
        ]
    );
    // A window keeps the flows overlapping it.
    let window = f.store.external_peers(350, 450).await.expect("window");
    assert_eq!(window, vec![peer(a, Egress, cdn, 443, tcp, 3, 330, 300, 400)]);
    assert!(f.store.external_peers(10_000, 20_000).await.expect("later").is_empty());
}

// === hostile input ===

async fn hostile_strings_are_data(f: &Fixture) {
    let mut ids = Vec::new();
    for (i, nasty) in NASTY.iter().enumerate() {
        let t = f.store.ensure_identity(&labels(&[("app", nasty), ("i", &i.to_string())])).await.expect("identity");
        let mut p = proposal(t, &[80], 1);
        p.workload = (*nasty).to_owned();
        p.policy.selector = LabelSelector::with_labels([("app", *nasty)]);
        p.rules[0].rule = rule_from(nasty, 80);
        p.policy.ingress = Some(vec![p.rules[0].rule.clone()]);
        let stored = put(f, &p, 1_000).await;
        assert_eq!(stored.proposal, p);
        assert_eq!(stored.summary.workload, *nasty);
        let decided = f
            .store
            .decide_proposal(stored.summary.id, Decision::Reject, nasty, Some(nasty), 2_000)
            .await
            .expect("reject with a hostile actor and comment");
        assert_eq!(
            (decided.summary.reviewer.as_deref(), decided.summary.comment.as_deref()),
            (Some(*nasty), Some(*nasty))
        );
        let r = f.store.set_rollout_mode(t, RolloutMode::Monitor, nasty, nasty, 3_000).await.expect("rollout");
        assert_eq!((r.changed_by.as_str(), r.reason.as_str()), (*nasty, *nasty));
        ids.push(stored.summary.id);
    }
    let rows: Vec<ClusterPolicyRow> = NASTY.iter().map(|n| cluster_policy(n, n, n)).collect();
    f.store.replace_cluster_policies(NASTY[0], &rows, 4_000).await.expect("import");
    let mut stored = f.store.cluster_policies().await.expect("cluster policies");
    stored.sort_by(|x, y| x.name.cmp(&y.name));
    let mut expected = rows;
    expected.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(stored, expected);

    // Every table is still there and every value came back as it went in.
    for (nasty, id) in NASTY.iter().zip(&ids) {
        let by_actor = audit(f, AuditQuery { actor: Some((*nasty).to_owned()), ..AuditQuery::default() }).await;
        let actions: BTreeSet<&str> = by_actor.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(actions, BTreeSet::from([actions::PROPOSAL_REJECT, actions::ROLLOUT_MODE]), "{nasty}");
        let rejected = by_actor.iter().find(|r| r.action == actions::PROPOSAL_REJECT).expect("reject entry");
        assert_eq!(rejected.detail["comment"].as_str(), Some(*nasty));
        assert_eq!(rejected.subject, format!("proposal:{id}"));
    }
    let subject = NASTY[1];
    f.store
        .append_audit(&AuditEntry {
            at_unix_ms: 5_000,
            actor: NASTY[2].into(),
            action: "test.nasty".into(),
            subject: subject.into(),
            detail: serde_json::json!({ "value": NASTY[0], "nested": { "k": NASTY[5] } }),
        })
        .await
        .expect("append");
    let found = audit(f, AuditQuery { subject: Some(subject.into()), ..AuditQuery::default() }).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].detail["nested"]["k"], NASTY[5]);
    let entries = f.store.verify_audit_chain().await.expect("chain");
    let proposals = f.store.proposals(&ProposalQuery::default()).await.expect("proposals table is still there");
    assert_eq!(proposals.len(), NASTY.len());
    assert_eq!(entries, (NASTY.len() * 3 + 2) as u64);
}

// === schema lockstep (both backends at once) ===

/// Tables and columns as the database reports them: name → [(column, nullable)].
type Schema = BTreeMap<String, BTreeSet<(String, bool)>>;

/// Tables one backend has by design: SQLite's per-batch flow facts (migration 0001)
/// and bookkeeping tables of SQLite and sqlx.
const BACKEND_ONLY_TABLES: [&str; 3] = ["flow_blocks", "sqlite_sequence", "_sqlx_migrations"];

/// Same tables, same columns, same nullability on both backends (0001's documented
/// flows difference aside). The lockstep test in `tests/store.rs` only compares file
/// names; this compares what the migrations built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_build_the_same_schema_on_both_backends() {
    let sqlite = Fixture::sqlite().await;
    let postgres = Fixture::postgres().await;

    let mut conn = SqliteConnection::connect(&sqlite.url).await.expect("sqlite");
    let tables: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .fetch_all(&mut conn)
        .await
        .expect("sqlite tables");
    let mut lite = Schema::new();
    for t in tables.into_iter().filter(|t| !BACKEND_ONLY_TABLES.contains(&t.as_str())) {
        let cols: Vec<(String, i64, i64)> = sqlx::query_as("SELECT name, \"notnull\", pk FROM pragma_table_info($1)")
            .bind(&t)
            .fetch_all(&mut conn)
            .await
            .expect("sqlite columns");
        // SQLite reports INTEGER PRIMARY KEY columns as nullable; they are not.
        lite.insert(t, cols.into_iter().map(|(c, not_null, pk)| (c, not_null == 0 && pk == 0)).collect());
    }
    conn.close().await.expect("close");

    let mut conn = PgConnection::connect(&postgres.url).await.expect("postgres");
    let cols: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, is_nullable = 'YES' FROM information_schema.columns \
         WHERE table_schema = 'public'",
    )
    .fetch_all(&mut conn)
    .await
    .expect("postgres columns");
    conn.close().await.expect("close");
    let mut pg = Schema::new();
    for (t, c, nullable) in cols {
        if BACKEND_ONLY_TABLES.contains(&t.as_str()) {
            continue;
        }
        // PostgreSQL keeps each flow's batch facts on the row (see migration 0001).
        if t == "flows" && (c == "node_id" || c == "received_unix_ms") {
            continue;
        }
        pg.entry(t).or_default().insert((c, nullable));
    }
    assert_eq!(lite, pg);
    for t in ["proposals", "audit_log", "audit_head", "rollout_modes", "cluster_policies"] {
        assert!(lite.contains_key(t), "{t} missing");
    }
    sqlite.store.close().await;
    postgres.store.close().await;
}
