//! What enforcers report back — per-node status (desired / applied / rejected versions),
//! verdict events and rule-hit counters — checked identically on SQLite (a temp file)
//! and PostgreSQL (a throwaway database). Same fixture as `tests/store.rs` and
//! `tests/store_policy.rs` (`tests/common`): each case is an async fn over a
//! [`Fixture`], `store_cases!` generates one test per backend, and the PostgreSQL tests
//! fail, not skip, without `BULKHEAD_TEST_POSTGRES_URL`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_learner::store::{
    AckOutcome, EnforcerRow, MAX_ERROR_CHARS, MAX_VERDICT_PAGE, RuleHitRow, RuleHits, RuleRef, Store, StoreError,
    VerdictCount, VerdictEventRecord, VerdictEventRow, VerdictQuery,
};
use bulkhead_model::{Direction, HttpRequestLine, Identity, Protocol, Verdict};
use common::{Fixture, store_cases};
use sqlx::{Connection, PgConnection, SqliteConnection};

store_cases!(
    hello_ack_and_desired_lifecycle,
    rejected_ack_keeps_the_applied_version,
    status_refuses_bad_input,
    verdict_events_filter_page_count_and_prune,
    rule_hits_accumulate_across_batches_and_nodes,
    hostile_strings_are_data,
    http_request_lines_are_stored_verbatim,
    large_event_batch_in_one_call,
    loss_counters_keep_the_newest_report,
);

// === builders ===

const NASTY: [&str; 6] = [
    "'); DROP TABLE enforcers;--",
    "x'); DROP TABLE verdict_events;--",
    "\" OR 1=1 --",
    "it's \"quoted\" `twice`",
    "back\\slash $1 ? ?1 :name @p %_",
    "ünïcödé 🚀 \u{202e}rtl",
];

fn rule(proposal_id: i64, direction: Direction, rule_index: u32) -> RuleRef {
    RuleRef { proposal_id, direction, rule_index }
}

/// An event of `local` at `at` (src 10.0.0.<local % 250>, dst port 80/TCP, version 7).
fn event(at: i64, local: u32, verdict: Verdict, rule: Option<RuleRef>) -> VerdictEventRow {
    VerdictEventRow {
        at_unix_ms: at,
        local: Identity(local),
        peer: Identity(2),
        direction: Direction::Ingress,
        verdict,
        src_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, (local % 250) as u8)),
        dst_addr: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
        dst_port: 80,
        protocol: Protocol::Tcp,
        policy_version: 7,
        rule,
        http: None,
    }
}

/// The request line of an HTTP verdict.
fn http(method: &str, path: &str, truncated: bool) -> Option<HttpRequestLine> {
    Some(HttpRequestLine { method: method.into(), path: path.into(), truncated })
}

/// A path as hostile as an enforcer passes on: visible ASCII, no spaces.
const HOSTILE_PATH: &str = "/';DROP%20TABLE%20verdict_events;--<script>alert(1)</script>\"\\x00$1?1:name";

async fn enforcer(store: &Store, node: &str) -> EnforcerRow {
    let all = store.enforcers().await.expect("enforcers");
    all.into_iter().find(|e| e.node_id == node).unwrap_or_else(|| panic!("no enforcer row for {node:?}"))
}

/// Every event matching `q`, newest first, read page by page with `page` per page.
async fn all_events(store: &Store, q: &VerdictQuery, page: u32) -> Vec<VerdictEventRecord> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let got = store
            .verdict_events(&VerdictQuery { limit: page, before_id: before, ..q.clone() })
            .await
            .expect("verdict events");
        let Some(last) = got.last() else { break };
        before = Some(last.id);
        out.extend(got);
    }
    out
}

// === enforcer status ===

async fn hello_ack_and_desired_lifecycle(f: &Fixture) {
    let s = &f.store;
    // The learner decides before the node ever connects.
    s.set_desired_version("node-a", 1, 100).await.expect("desired");
    let e = enforcer(s, "node-a").await;
    assert_eq!((e.desired_version, e.desired_unix_ms), (Some(1), Some(100)));
    assert_eq!((e.applied_version, e.last_seen_unix_ms, e.boot_id.as_deref()), (None, None, None));
    assert!(!e.in_sync());

    // A fresh node: nothing applied.
    s.enforcer_hello("node-a", "boot-1", "0.1.0", None, 200).await.expect("hello");
    let e = enforcer(s, "node-a").await;
    assert_eq!((e.boot_id.as_deref(), e.agent_version.as_deref()), (Some("boot-1"), Some("0.1.0")));
    assert_eq!((e.applied_version, e.applied_unix_ms, e.last_seen_unix_ms), (None, None, Some(200)));
    assert_eq!(e.desired_version, Some(1), "hello keeps what the learner wants");

    s.enforcer_ack("node-a", 1, AckOutcome::Applied, 300).await.expect("ack");
    let e = enforcer(s, "node-a").await;
    assert_eq!((e.applied_version, e.applied_unix_ms, e.last_seen_unix_ms), (Some(1), Some(300), Some(300)));
    assert!(e.in_sync());

    // Re-acking the same version (a resync) keeps the time it was applied.
    s.enforcer_ack("node-a", 1, AckOutcome::Applied, 400).await.expect("re-ack");
    let e = enforcer(s, "node-a").await;
    assert_eq!((e.applied_version, e.applied_unix_ms, e.last_seen_unix_ms), (Some(1), Some(300), Some(400)));

    // Restart with pinned maps: the hello names the version, its time stays.
    s.enforcer_hello("node-a", "boot-2", "0.1.1", Some(1), 500).await.expect("hello after restart");
    let e = enforcer(s, "node-a").await;
    assert_eq!((e.boot_id.as_deref(), e.agent_version.as_deref()), (Some("boot-2"), Some("0.1.1")));
    assert_eq!((e.applied_version, e.applied_unix_ms), (Some(1), Some(300)));

    // A late message never moves last_seen back.
    s.enforcer_ack("node-a", 1, AckOutcome::Applied, 450).await.expect("late ack");
    assert_eq!(enforcer(s, "node-a").await.last_seen_unix_ms, Some(500));

    s.set_desired_version("node-a", 2, 600).await.expect("desired 2");
    assert!(!enforcer(s, "node-a").await.in_sync());
    s.enforcer_ack("node-a", 2, AckOutcome::Applied, 700).await.expect("ack 2");
    let e = enforcer(s, "node-a").await;
    assert_eq!((e.applied_version, e.applied_unix_ms, e.desired_unix_ms), (Some(2), Some(700), Some(600)));
    assert!(e.in_sync());

    // Rebooted without its pins: the node enforces nothing, and the row says so.
    s.enforcer_hello("node-a", "boot-3", "0.1.1", None, 800).await.expect("hello without pins");
    let e = enforcer(s, "node-a").await;
    assert_eq!((e.applied_version, e.applied_unix_ms, e.desired_version), (None, None, Some(2)));

    // An ack from a node that never said hello creates its row; rows sort by node id.
    s.enforcer_ack("node-0", 5, AckOutcome::Applied, 900).await.expect("ack first");
    let all = s.enforcers().await.expect("enforcers");
    assert_eq!(all.iter().map(|e| e.node_id.as_str()).collect::<Vec<_>>(), ["node-0", "node-a"]);
    assert_eq!((all[0].applied_version, all[0].boot_id.as_deref()), (Some(5), None));

    // Survives a restart of the learner.
    let reopened = f.reopen().await;
    assert_eq!(reopened.enforcers().await.expect("enforcers after reopen"), all);
    reopened.close().await;
}

/// Loss is cumulative on the node: each report's values replace the last, saturating
/// at i64::MAX, and a report before any Hello still creates the row.
async fn loss_counters_keep_the_newest_report(f: &Fixture) {
    let s = &f.store;
    let loss = |r, q, c| bulkhead_model::EnforcerLoss { ringbuf_dropped: r, queue_dropped: q, conntrack_full: c };
    s.enforcer_loss("early", &loss(1, 2, 3), 5).await.expect("report before hello");
    let e = enforcer(s, "early").await;
    assert_eq!((e.loss, e.last_report_unix_ms, e.applied_version), (loss(1, 2, 3), Some(5), None));

    s.enforcer_hello("n", "b", "v", Some(4), 10).await.expect("hello");
    assert_eq!(enforcer(s, "n").await.loss, loss(0, 0, 0), "nothing lost before a report");
    s.enforcer_loss("n", &loss(7, 0, 1), 20).await.expect("report");
    s.enforcer_loss("n", &loss(9, u64::MAX, 1), 30).await.expect("report");
    let e = enforcer(s, "n").await;
    assert_eq!(e.loss, loss(9, i64::MAX as u64, 1));
    assert_eq!((e.last_report_unix_ms, e.last_seen_unix_ms, e.applied_version), (Some(30), Some(30), Some(4)));
    assert!(s.enforcer_loss(" ", &loss(0, 0, 0), 1).await.is_err(), "a blank node id is refused");
}

async fn rejected_ack_keeps_the_applied_version(f: &Fixture) {
    let s = &f.store;
    s.enforcer_hello("n", "b", "v", None, 1).await.expect("hello");
    s.enforcer_ack("n", 6, AckOutcome::Applied, 10).await.expect("applied 6");
    s.set_desired_version("n", 7, 15).await.expect("desired 7");
    let rejected = AckOutcome::Rejected { error: "snapshot names unknown identity 999".into() };
    s.enforcer_ack("n", 7, rejected, 20).await.expect("rejected 7");
    let e = enforcer(s, "n").await;
    assert_eq!((e.applied_version, e.applied_unix_ms), (Some(6), Some(10)), "still enforcing 6");
    assert_eq!(e.rejected_version, Some(7));
    assert_eq!(e.last_error.as_deref(), Some("snapshot names unknown identity 999"));
    assert_eq!(e.last_seen_unix_ms, Some(20));

    // Re-acking the old version (reconnect) does not hide the refusal of the newer one.
    s.enforcer_ack("n", 6, AckOutcome::Applied, 30).await.expect("re-ack 6");
    let e = enforcer(s, "n").await;
    assert_eq!((e.applied_version, e.rejected_version), (Some(6), Some(7)));
    assert!(e.last_error.is_some());
    // Neither does a hello.
    s.enforcer_hello("n", "b2", "v", Some(6), 35).await.expect("hello");
    assert_eq!(enforcer(s, "n").await.rejected_version, Some(7));

    // A newer refusal replaces the older one.
    s.enforcer_ack("n", 8, AckOutcome::Rejected { error: "too big".into() }, 40).await.expect("rejected 8");
    let e = enforcer(s, "n").await;
    assert_eq!((e.applied_version, e.rejected_version, e.last_error.as_deref()), (Some(6), Some(8), Some("too big")));

    // Applying a version at least as new as the refused one clears it.
    s.enforcer_ack("n", 8, AckOutcome::Applied, 50).await.expect("applied 8");
    let e = enforcer(s, "n").await;
    assert_eq!((e.applied_version, e.applied_unix_ms), (Some(8), Some(50)));
    assert_eq!((e.rejected_version, e.last_error), (None, None));

    // Error texts are bounded.
    let huge = "x".repeat(MAX_ERROR_CHARS * 3);
    s.enforcer_ack("n", 9, AckOutcome::Rejected { error: huge }, 60).await.expect("huge error");
    let e = enforcer(s, "n").await;
    assert_eq!(e.last_error.map(|t| t.len()), Some(MAX_ERROR_CHARS));
    assert_eq!(e.applied_version, Some(8));
}

async fn status_refuses_bad_input(f: &Fixture) {
    let s = &f.store;
    let too_big = i64::MAX as u64 + 1;
    for r in [
        s.set_desired_version("n", too_big, 1).await,
        s.enforcer_ack("n", too_big, AckOutcome::Applied, 1).await,
        s.enforcer_hello("n", "b", "v", Some(u64::MAX), 1).await,
    ] {
        assert!(matches!(r, Err(StoreError::OutOfRange { .. })), "{r:?}");
    }
    for r in [
        s.set_desired_version(" ", 1, 1).await,
        s.enforcer_ack("", 1, AckOutcome::Applied, 1).await,
        s.enforcer_hello("\t", "b", "v", None, 1).await,
        s.add_rule_hits("", &[]).await,
    ] {
        assert!(matches!(r, Err(StoreError::MissingField { field: "node_id" })), "{r:?}");
    }
    let mut e = event(1, 300, Verdict::Audit, None);
    e.policy_version = u64::MAX;
    let r = s.insert_verdict_events("n", &[event(1, 300, Verdict::Audit, None), e], 1).await;
    assert!(matches!(r, Err(StoreError::OutOfRange { field: "policy_version", .. })), "{r:?}");
    // Nothing was written: no status row, no event of the refused batch.
    assert!(s.enforcers().await.expect("enforcers").is_empty());
    assert!(s.verdict_events(&VerdictQuery::default()).await.expect("events").is_empty());
    // The largest storable version round-trips exactly.
    s.set_desired_version("n", i64::MAX as u64, 1).await.expect("max version");
    assert_eq!(enforcer(s, "n").await.desired_version, Some(i64::MAX as u64));
}

// === verdict events ===

async fn verdict_events_filter_page_count_and_prune(f: &Fixture) {
    let s = &f.store;
    let r1 = rule(11, Direction::Ingress, 0);
    let r2 = rule(11, Direction::Egress, u32::MAX);
    let mut v6 = event(1_500, 301, Verdict::Denied, Some(r2));
    v6.src_addr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1));
    v6.dst_addr = "::ffff:10.0.0.9".parse().expect("mapped address");
    v6.direction = Direction::Egress;
    v6.protocol = Protocol::Udp;
    v6.dst_port = 53;
    v6.policy_version = i64::MAX as u64;
    let l7 =
        VerdictEventRow { http: http("PUT", "/v1/exhaust-port", false), ..event(1_100, 300, Verdict::Audit, Some(r1)) };
    let batch_a = vec![
        event(1_000, 300, Verdict::Audit, None),
        l7,
        event(1_200, 300, Verdict::Denied, None),
        event(1_300, 300, Verdict::Forwarded, Some(r1)),
        v6.clone(),
    ];
    let batch_b = vec![event(2_000, 300, Verdict::Audit, None), event(2_100, 302, Verdict::Audit, None)];
    assert_eq!(s.insert_verdict_events("node-a", &batch_a, 10_000).await.expect("batch a"), 5);
    assert_eq!(s.insert_verdict_events("node-b", &batch_b, 20_000).await.expect("batch b"), 2);
    assert_eq!(s.insert_verdict_events("node-b", &[], 20_000).await.expect("empty batch"), 0);

    // Newest first by id; every field round-trips, node and receive time attached.
    let all = all_events(s, &VerdictQuery::default(), 1000).await;
    assert_eq!(all.len(), 7);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let stored: Vec<VerdictEventRow> = all.iter().rev().map(|r| r.event.clone()).collect();
    let expected: Vec<VerdictEventRow> = batch_a.iter().chain(&batch_b).cloned().collect();
    assert_eq!(stored, expected);
    assert_eq!((all[0].node_id.as_str(), all[0].received_unix_ms), ("node-b", 20_000));
    assert_eq!((all[6].node_id.as_str(), all[6].received_unix_ms), ("node-a", 10_000));

    // Pages of 2 (and of 1) see the same events, none twice.
    assert_eq!(all_events(s, &VerdictQuery::default(), 2).await, all);
    assert_eq!(all_events(s, &VerdictQuery::default(), 1).await, all);

    // Filters, alone and combined.
    let count = |q: VerdictQuery| async move { all_events(s, &q, 3).await };
    let q = VerdictQuery::default();
    assert_eq!(count(VerdictQuery { identity: Some(Identity(300)), ..q.clone() }).await.len(), 5);
    assert_eq!(count(VerdictQuery { verdict: Some(Verdict::Audit), ..q.clone() }).await.len(), 4);
    assert_eq!(count(VerdictQuery { node_id: Some("node-b".into()), ..q.clone() }).await.len(), 2);
    assert_eq!(count(VerdictQuery { node_id: Some("node-c".into()), ..q.clone() }).await.len(), 0);
    let window = count(VerdictQuery { since_unix_ms: Some(1_100), until_unix_ms: Some(1_500), ..q.clone() }).await;
    assert_eq!(window.iter().map(|r| r.event.at_unix_ms).collect::<Vec<_>>(), [1_500, 1_300, 1_200, 1_100]);
    let combined = count(VerdictQuery {
        identity: Some(Identity(300)),
        verdict: Some(Verdict::Audit),
        node_id: Some("node-a".into()),
        since_unix_ms: Some(1_050),
        ..q.clone()
    })
    .await;
    assert_eq!(combined.len(), 1);
    assert_eq!(combined[0].event.rule, Some(r1));
    assert_eq!(combined[0].event.http, http("PUT", "/v1/exhaust-port", false));
    // A page never exceeds the cap, whatever was asked.
    let capped = s.verdict_events(&VerdictQuery { limit: u32::MAX, ..q.clone() }).await.expect("capped");
    assert!(capped.len() <= MAX_VERDICT_PAGE as usize && capped.len() == 7);

    // Counts per local identity: audit and denied only, forwarded ignored.
    let counts = s.verdict_counts(0).await.expect("counts");
    assert_eq!(
        counts,
        [
            VerdictCount { identity: Identity(300), audit: 3, denied: 1, last_unix_ms: 2_000 },
            VerdictCount { identity: Identity(301), audit: 0, denied: 1, last_unix_ms: 1_500 },
            VerdictCount { identity: Identity(302), audit: 1, denied: 0, last_unix_ms: 2_100 },
        ]
    );
    let recent = s.verdict_counts(1_150).await.expect("recent counts");
    assert_eq!(recent[0], VerdictCount { identity: Identity(300), audit: 1, denied: 1, last_unix_ms: 2_000 });
    assert!(s.verdict_counts(3_000).await.expect("no counts").is_empty());

    // Prune by event time; ids are never reused afterwards.
    let max_id = all[0].id;
    assert_eq!(s.prune_verdict_events(1_250).await.expect("prune"), 3);
    let left = all_events(s, &VerdictQuery::default(), 1000).await;
    assert!(left.iter().all(|r| r.event.at_unix_ms >= 1_250) && left.len() == 4);
    assert_eq!(s.prune_verdict_events(1_250).await.expect("prune again"), 0);
    s.insert_verdict_events("node-a", &[event(3_000, 300, Verdict::Audit, None)], 30_000).await.expect("insert");
    let newest = s.verdict_events(&VerdictQuery { limit: 1, ..q.clone() }).await.expect("newest");
    assert!(newest[0].id > max_id);
}

// === rule hits ===

async fn rule_hits_accumulate_across_batches_and_nodes(f: &Fixture) {
    let s = &f.store;
    let (a, b, c) = (rule(5, Direction::Ingress, 0), rule(5, Direction::Ingress, 1), rule(5, Direction::Egress, 0));
    let other = rule(6, Direction::Ingress, 0);
    let hits = |rule, hits, last| RuleHits { rule, hits, last_hit_unix_ms: last };
    s.add_rule_hits("node-a", &[hits(a, 3, 100), hits(b, 1, 50), hits(a, 2, 90), hits(other, 9, 1)])
        .await
        .expect("first report");
    s.add_rule_hits("node-a", &[hits(a, 10, 80), hits(c, 4, 200)]).await.expect("second report");
    s.add_rule_hits("node-b", &[hits(a, 7, 300)]).await.expect("other node");
    s.add_rule_hits("node-b", &[]).await.expect("empty report");

    let row = |rule, node: &str, hits, last| RuleHitRow { rule, node_id: node.into(), hits, last_hit_unix_ms: last };
    let expected = vec![
        // Egress sorts before ingress (wire codes 1, 2), then index, then node.
        row(c, "node-a", 4, 200),
        row(a, "node-a", 15, 100),
        row(a, "node-b", 7, 300),
        row(b, "node-a", 1, 50),
    ];
    assert_eq!(s.rule_hits(5).await.expect("hits of 5"), expected);
    assert_eq!(s.rule_hits(6).await.expect("hits of 6"), [row(other, "node-a", 9, 1)]);
    assert!(s.rule_hits(7).await.expect("hits of 7").is_empty(), "unused rules have no row");

    // Counters saturate instead of failing the report.
    s.add_rule_hits("node-a", &[hits(other, u64::MAX, 2)]).await.expect("huge");
    s.add_rule_hits("node-a", &[hits(other, u64::MAX, 3)]).await.expect("huge again");
    assert_eq!(s.rule_hits(6).await.expect("hits of 6"), [row(other, "node-a", i64::MAX as u64, 3)]);

    // Concurrent reports of overlapping rules from several nodes all count.
    let mut tasks = Vec::new();
    for n in 0..4 {
        let store = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let batch = [hits(b, 1, i), hits(a, 1, i), hits(c, 1, i)];
                store.add_rule_hits(&format!("node-{}", n % 2), &batch).await.expect("concurrent report");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let total: BTreeMap<RuleRef, u64> =
        s.rule_hits(5).await.expect("hits").into_iter().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.rule).or_default() += r.hits;
            m
        });
    assert_eq!(total[&a], 15 + 7 + 40);
    assert_eq!(total[&b], 1 + 40);
    assert_eq!(total[&c], 4 + 40);
}

// === hostile input ===

async fn hostile_strings_are_data(f: &Fixture) {
    let s = &f.store;
    for (i, nasty) in NASTY.iter().enumerate() {
        let v = i as u64 + 1;
        s.set_desired_version(nasty, v + 1, 1).await.expect("desired");
        s.enforcer_hello(nasty, nasty, nasty, Some(v), 2).await.expect("hello");
        let error = format!("{nasty}\0{nasty}");
        s.enforcer_ack(nasty, v + 1, AckOutcome::Rejected { error }, 3).await.expect("rejected");
        s.insert_verdict_events(nasty, &[event(i as i64, 300, Verdict::Denied, None)], 4).await.expect("events");
        s.add_rule_hits(nasty, &[RuleHits { rule: rule(1, Direction::Ingress, 0), hits: 1, last_hit_unix_ms: 5 }])
            .await
            .expect("hits");
    }
    let rows = s.enforcers().await.expect("enforcers");
    assert_eq!(rows.len(), NASTY.len(), "one row per hostile node id");
    for (i, nasty) in NASTY.iter().enumerate() {
        let e = enforcer(s, nasty).await;
        let v = i as u64 + 1;
        assert_eq!((e.boot_id.as_deref(), e.agent_version.as_deref()), (Some(*nasty), Some(*nasty)));
        assert_eq!((e.applied_version, e.desired_version, e.rejected_version), (Some(v), Some(v + 1), Some(v + 1)));
        // NUL cannot be stored in PostgreSQL text; both backends replace it alike.
        assert_eq!(e.last_error, Some(format!("{nasty}\u{FFFD}{nasty}")));
        let q = VerdictQuery { node_id: Some((*nasty).into()), ..VerdictQuery::default() };
        let events = s.verdict_events(&q).await.expect("events by node");
        assert_eq!(events.len(), 1, "{nasty:?}");
        assert_eq!((events[0].node_id.as_str(), events[0].event.at_unix_ms), (*nasty, i as i64));
    }
    let hits = s.rule_hits(1).await.expect("hits");
    assert_eq!(hits.iter().map(|h| h.node_id.as_str()).collect::<BTreeSet<_>>(), NASTY.iter().copied().collect());
    // A NUL in a node id is stored the same way on both backends.
    s.set_desired_version("a\0b", 1, 1).await.expect("NUL node");
    assert_eq!(enforcer(s, "a\u{FFFD}b").await.desired_version, Some(1));
}

/// The request line of an HTTP verdict is attacker-chosen text: stored as is on both
/// backends (bound, never spliced), read back exactly, L4 events keep none, and what an
/// enforcer could not have sent is refused whole.
async fn http_request_lines_are_stored_verbatim(f: &Fixture) {
    let s = &f.store;
    let r = Some(rule(4, Direction::Ingress, 0));
    // As long as a path gets: every byte the kernel reads escaped.
    let longest = format!("/{}end", "\\xff".repeat(129));
    assert_eq!(longest.len(), 4 * bulkhead_model::MAX_HTTP_LINE_PATH_BYTES);
    let events = vec![
        VerdictEventRow { http: http("PUT", "/v1/exhaust-port", false), ..event(1, 300, Verdict::Denied, r) },
        VerdictEventRow { http: http("GET", HOSTILE_PATH, true), ..event(2, 300, Verdict::Audit, r) },
        // The segment did not start with a request line.
        VerdictEventRow { http: http("", "", true), ..event(3, 300, Verdict::Denied, r) },
        VerdictEventRow { http: http("OPTIONS", &longest, true), ..event(4, 300, Verdict::Denied, r) },
        event(5, 300, Verdict::Denied, None),
    ];
    assert_eq!(s.insert_verdict_events("node-a", &events, 10).await.expect("events"), 5);
    let stored: Vec<VerdictEventRow> =
        all_events(s, &VerdictQuery::default(), 2).await.into_iter().rev().map(|r| r.event).collect();
    assert_eq!(stored, events);
    assert_eq!(stored[4].http, None, "an L4 verdict has no request line");

    // What an enforcer cannot send is refused, the whole batch with it.
    for bad in [
        http("GET", "/a b", false),
        http("GET", "/\u{e9}", false),
        http("get", "/", false),
        http("GET", &"/".repeat(521), true),
        http("AAAAAAAAAAAAAAAAA", "/", false),
    ] {
        let e = VerdictEventRow { http: bad.clone(), ..event(6, 300, Verdict::Denied, r) };
        let r = s.insert_verdict_events("node-a", &[event(6, 300, Verdict::Denied, None), e], 11).await;
        assert!(matches!(r, Err(StoreError::InvalidHttpLine { .. })), "{bad:?}: {r:?}");
    }
    assert_eq!(all_events(s, &VerdictQuery::default(), 100).await.len(), 5, "nothing of a refused batch");

    // Behind the store's back: a half request line does not fit the table, and a line no
    // enforcer could have sent is reported, not handed to the pages.
    let half = f.raw_sql("UPDATE verdict_events SET http_path = NULL WHERE at_unix_ms = 1").await;
    assert!(half.is_err(), "the schema keeps a request line whole");
    f.raw_sql("UPDATE verdict_events SET http_path = '/a b' WHERE at_unix_ms = 1").await.expect("raw update");
    let r = s.verdict_events(&VerdictQuery::default()).await;
    assert!(
        matches!(&r, Err(StoreError::InvalidStoredValue { table: "verdict_events", column: "http_path", .. })),
        "{r:?}"
    );
}

// === volume ===

async fn large_event_batch_in_one_call(f: &Fixture) {
    let s = &f.store;
    const N: usize = 10_000;
    let events: Vec<VerdictEventRow> = (0..N)
        .map(|i| {
            let verdict = if i % 3 == 0 { Verdict::Denied } else { Verdict::Audit };
            let rule = (i % 2 == 0).then(|| rule(i as i64, Direction::Ingress, i as u32));
            // Every fourth an HTTP verdict: request lines in every chunk of the insert.
            let http = (i % 4 == 0).then(|| HttpRequestLine {
                method: "GET".into(),
                path: format!("/items/{i}"),
                truncated: i % 8 == 0,
            });
            VerdictEventRow { http, ..event(i as i64, 256 + (i % 10) as u32, verdict, rule) }
        })
        .collect();
    assert_eq!(s.insert_verdict_events("big", &events, 1).await.expect("10k events"), N as u64);

    let counts = s.verdict_counts(0).await.expect("counts");
    assert_eq!(counts.len(), 10);
    let (audit, denied): (u64, u64) = counts.iter().fold((0, 0), |(a, d), c| (a + c.audit, d + c.denied));
    assert_eq!((audit, denied), ((N - N.div_ceil(3)) as u64, N.div_ceil(3) as u64));

    let page = s.verdict_events(&VerdictQuery { limit: MAX_VERDICT_PAGE, ..VerdictQuery::default() }).await;
    let page = page.expect("one full page");
    assert_eq!(page.len(), N);
    let stored: Vec<VerdictEventRow> = page.into_iter().rev().map(|r| r.event).collect();
    assert_eq!(stored, events, "stored in order, every field intact");

    let of_one = all_events(s, &VerdictQuery { identity: Some(Identity(259)), ..VerdictQuery::default() }, 333).await;
    assert_eq!(of_one.len(), N / 10);
    assert!(of_one.iter().all(|r| r.event.local == Identity(259)));
    assert_eq!(s.prune_verdict_events(i64::MAX).await.expect("prune all"), N as u64);
}

// === schema lockstep (both backends at once) ===

/// Tables migration 0003 creates; its indexes are compared too (the other schema test,
/// in `tests/store_policy.rs`, compares every table's columns but no indexes).
const ENFORCEMENT_TABLES: [&str; 3] = ["enforcers", "verdict_events", "rule_hits"];

/// Per table: columns with nullability, and secondary indexes with their columns.
type TableShape = (BTreeSet<(String, bool)>, BTreeMap<String, Vec<String>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_0003_builds_the_same_tables_and_indexes_on_both_backends() {
    let sqlite = Fixture::sqlite().await;
    let postgres = Fixture::postgres().await;

    let mut lite: BTreeMap<String, TableShape> = BTreeMap::new();
    let mut conn = SqliteConnection::connect(&sqlite.url).await.expect("sqlite");
    for t in ENFORCEMENT_TABLES {
        let cols: Vec<(String, i64, i64)> = sqlx::query_as("SELECT name, \"notnull\", pk FROM pragma_table_info($1)")
            .bind(t)
            .fetch_all(&mut conn)
            .await
            .expect("sqlite columns");
        // SQLite reports INTEGER PRIMARY KEY columns as nullable; they are not.
        let cols = cols.into_iter().map(|(c, not_null, pk)| (c, not_null == 0 && pk == 0)).collect();
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = $1 AND sql IS NOT NULL",
        )
        .bind(t)
        .fetch_all(&mut conn)
        .await
        .expect("sqlite indexes");
        let mut indexes = BTreeMap::new();
        for name in names {
            let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_index_info($1) ORDER BY seqno")
                .bind(&name)
                .fetch_all(&mut conn)
                .await
                .expect("sqlite index columns");
            indexes.insert(name, cols);
        }
        lite.insert(t.to_owned(), (cols, indexes));
    }
    conn.close().await.expect("close");

    let mut pg: BTreeMap<String, TableShape> = BTreeMap::new();
    let mut conn = PgConnection::connect(&postgres.url).await.expect("postgres");
    for t in ENFORCEMENT_TABLES {
        let cols: Vec<(String, bool)> = sqlx::query_as(
            "SELECT column_name::text, is_nullable = 'YES' FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1",
        )
        .bind(t)
        .fetch_all(&mut conn)
        .await
        .expect("postgres columns");
        // Secondary indexes only: the primary key's is implicit on SQLite.
        let idx: Vec<(String, String)> = sqlx::query_as(
            "SELECT ic.relname::text, a.attname::text FROM pg_index i \
             JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_class tc ON tc.oid = i.indrelid \
             JOIN pg_attribute a ON a.attrelid = ic.oid \
             WHERE tc.relname = $1 AND NOT i.indisprimary ORDER BY ic.relname, a.attnum",
        )
        .bind(t)
        .fetch_all(&mut conn)
        .await
        .expect("postgres indexes");
        let mut indexes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, col) in idx {
            indexes.entry(name).or_default().push(col);
        }
        pg.insert(t.to_owned(), (cols.into_iter().collect(), indexes));
    }
    conn.close().await.expect("close");

    assert_eq!(lite, pg);
    for t in ENFORCEMENT_TABLES {
        assert!(!lite[t].0.is_empty(), "{t} missing");
    }
    for index in ["verdict_events_local", "verdict_events_at"] {
        assert!(lite["verdict_events"].1.contains_key(index), "the identity and time indexes: {index} missing");
    }
    sqlite.store.close().await;
    postgres.store.close().await;
}
