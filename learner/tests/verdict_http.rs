//! The request line of an HTTP verdict, end to end on both backends: a fake enforcer
//! reports over the real PolicyStream (in-process tonic server) what its kernel read of
//! requests an L7 rule refused; the learner records it, and it comes back from
//! `/api/v1/verdicts`, from `bulkhead verdicts` and `bulkhead explain` (the real binary
//! over real HTTP) and on the workload page — verbatim, and inert as HTML. L4 verdicts
//! come back without one.
//!
//! The PostgreSQL cases need `BULKHEAD_TEST_POSTGRES_URL` (`eval "$(cargo xtask env)"`)
//! and fail, not skip, without it.

mod common;

use std::process::Output;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_learner::auth::Role;
use bulkhead_learner::distribute::{Distributor, Recorder};
use bulkhead_learner::grpc::ingest::{Enrollment, unix_ms};
use bulkhead_learner::identity::inventory::Inventory;
use bulkhead_learner::store::{Decision, IngestBatch, Store, VerdictQuery};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::node_policy::{VerdictEvent, VerdictReport};
use bulkhead_model::{
    Direction, EnforcerHello, EnforcerMessage, HttpRequestLine, HttpRule, Identity, LabelSelector, Labels, NodePolicy,
    Peer, PolicyAck, PolicyAckStatus, PortRange, Proposal, Protocol, RolloutMode, Rule, Verdict,
};
use bulkhead_proto::v1::policy_stream_client::PolicyStreamClient;
use bulkhead_testkit::assert_eventually_async;
use common::{Fixture, deathstar_proposal, endpoint, serve_policy_stream, store_cases};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tower::ServiceExt;

store_cases!(http_verdicts_show_what_was_refused);

const TIMEOUT: Duration = Duration::from_secs(20);
const NODE: &str = "node-a";
/// As hostile as a path an enforcer passes on gets (visible ASCII, no spaces): SQL and
/// HTML that must stay data.
const HOSTILE_PATH: &str = "/';DROP%20TABLE%20verdict_events;--<script>alert(1)</script>";

fn labels(class: &str, org: &str) -> Labels {
    Labels::new([(NAMESPACE_KEY, "default"), ("org", org), ("class", class)]).expect("labels")
}

/// deathstar accepts the empire on 80/TCP for `POST /v1/request-landing` only.
fn l7_proposal(target: Identity) -> Proposal {
    let rule = Rule {
        peer: Peer::Workloads { selector: LabelSelector::with_labels([("org", "empire")]) },
        ports: vec![PortRange::single(Protocol::Tcp, 80)],
        http: vec![HttpRule::exact("POST", "/v1/request-landing")],
    };
    deathstar_proposal(target, Some("default"), rule)
}

/// How askama writes text into HTML.
fn html_escaped(s: &str) -> String {
    s.replace('&', "&#38;").replace('<', "&#60;").replace('>', "&#62;").replace('"', "&#34;").replace('\'', "&#39;")
}

async fn bulkhead(url: &str, token: &str, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    cmd.arg("--server").arg(url).args(args);
    cmd.env_remove("BULKHEAD_TOKEN_FILE").env("HOME", "/nonexistent").env("BULKHEAD_TOKEN", token);
    let out: Output = cmd.output().await.expect("run bulkhead");
    assert!(out.status.success(), "bulkhead {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn get(store: &Store, token: &str, uri: &str) -> String {
    let req = Request::get(uri).header("authorization", format!("Bearer {token}")).body(Body::empty()).expect("req");
    let resp = router(AppState::for_store(store.clone())).oneshot(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK, "{uri}");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

async fn http_verdicts_show_what_was_refused(f: &Fixture) {
    let store = &f.store;
    let now = unix_ms();
    let deathstar = store.ensure_identity(&labels("deathstar", "empire")).await.expect("id");
    let tiefighter = store.ensure_identity(&labels("tiefighter", "empire")).await.expect("id");
    let xwing = store.ensure_identity(&labels("xwing", "alliance")).await.expect("id");
    let batch = IngestBatch {
        node_id: NODE.into(),
        boot_id: "boot-1".into(),
        seq: 1,
        received_unix_ms: now - 60_000,
        flows: vec![],
        endpoints: Some(vec![endpoint(deathstar, 11, "10.202.0.10"), endpoint(tiefighter, 12, "10.202.0.11")]),
        dns_answers: vec![],
        loss: Default::default(),
    };
    store.ingest(&batch).await.expect("endpoints");
    let p = l7_proposal(deathstar);
    let record = store.put_proposal(&p, now - 50_000).await.expect("put");
    let approve = Decision::Approve { policy: p.policy.clone() };
    store.decide_proposal(record.summary.id, approve, "alice", None, now - 40_000).await.expect("approve");
    store.set_rollout_mode(deathstar, RolloutMode::Monitor, "alice", "try L7", now - 30_000).await.expect("monitor");

    // An enforcer connects, applies the compiled policy and reports.
    let distributor = Distributor::new();
    distributor.recompile(store, &Inventory::default(), None, now - 20_000).await.expect("recompiles");
    let recorder = Recorder { store: store.clone(), distributor: distributor.clone(), enrollment: Enrollment::Open };
    let url = serve_policy_stream(distributor, Some(recorder)).await;
    let mut client = PolicyStreamClient::connect(url).await.expect("connects");
    let (tx, rx) = mpsc::channel(8);
    let hello = EnforcerHello {
        node_id: NODE.into(),
        boot_id: "boot-e".into(),
        agent_version: "test".into(),
        applied_version: 0,
    };
    tx.send((&EnforcerMessage::Hello(hello)).into()).await.expect("hello");
    let mut updates = client.subscribe(ReceiverStream::new(rx)).await.expect("subscribes").into_inner();
    let snap = NodePolicy::try_from(updates.message().await.expect("ok").expect("snapshot")).expect("valid");
    let ack = EnforcerMessage::Ack(PolicyAck { version: snap.version, status: PolicyAckStatus::Applied, error: None });
    tx.send((&ack).into()).await.expect("ack");
    let rule_id = snap.rules.iter().find(|r| !r.http.is_empty()).expect("the L7 rule is distributed").rule_id;

    let event = |at: i64, peer: Identity, peer_addr: &str, rule_id, http| VerdictEvent {
        time_unix_ms: at,
        cgroup_id: 11,
        netns_ino: 11,
        local_identity: deathstar,
        peer_identity: peer,
        local_addr: "10.202.0.10".parse().expect("ip"),
        local_port: 80,
        peer_addr: peer_addr.parse().expect("ip"),
        peer_port: 40_000,
        protocol: Protocol::Tcp,
        direction: Direction::Ingress,
        verdict: Verdict::Audit,
        rule_id,
        suppressed: 0,
        http,
    };
    let line = |method: &str, path: &str, truncated| {
        Some(HttpRequestLine { method: method.into(), path: path.into(), truncated })
    };
    let events = vec![
        event(now - 5_000, tiefighter, "10.202.0.11", Some(rule_id), line("PUT", "/v1/exhaust-port", false)),
        event(now - 4_000, tiefighter, "10.202.0.11", Some(rule_id), line("GET", HOSTILE_PATH, true)),
        // The segment did not start with a request line.
        event(now - 3_000, tiefighter, "10.202.0.11", Some(rule_id), line("", "", true)),
        // xwing is not allowed at all: an L4 default deny, no request line.
        event(now - 2_000, xwing, "10.202.0.12", None, None),
    ];
    let report = EnforcerMessage::Report(VerdictReport {
        policy_version: snap.version,
        events,
        rule_counters: vec![],
        loss: Default::default(),
        sent_unix_ms: 0,
    });
    tx.send((&report).into()).await.expect("report");
    let q = VerdictQuery { identity: Some(deathstar), ..VerdictQuery::default() };
    assert_eventually_async!(
        TIMEOUT,
        async || store.verdict_events(&q).await.is_ok_and(|v| v.len() == 4),
        "the report's events are stored"
    );

    // The store: each event with its request line, the L4 one without.
    let stored = store.verdict_events(&q).await.expect("events");
    let by_time = |at: i64| &stored.iter().find(|r| r.event.at_unix_ms == at).expect("event").event;
    assert_eq!(by_time(now - 5_000).http, line("PUT", "/v1/exhaust-port", false));
    assert_eq!(by_time(now - 4_000).http, line("GET", HOSTILE_PATH, true));
    assert_eq!(by_time(now - 3_000).http, line("", "", true));
    assert_eq!(by_time(now - 2_000).http, None);
    assert!(by_time(now - 5_000).rule.is_some(), "the HTTP verdict names the L7 rule");

    let (token, _) = store.create_token_user("ana", Role::Viewer, "test", "root", now).await.expect("token");
    let token = token.expose().to_owned();

    // The API: `http` on HTTP verdicts, absent on L4 ones.
    let body = get(store, &token, &format!("/api/v1/verdicts?identity={}&limit=10", deathstar.0)).await;
    let rows: Value = serde_json::from_str(&body).expect("json");
    let rows = rows.as_array().expect("an array");
    let at = |t: i64| rows.iter().find(|r| r["at_unix_ms"] == t).unwrap_or_else(|| panic!("{t} in {body}"));
    assert_eq!(
        at(now - 5_000)["http"],
        serde_json::json!({"method": "PUT", "path": "/v1/exhaust-port", "truncated": false})
    );
    assert_eq!(at(now - 4_000)["http"]["path"], HOSTILE_PATH);
    assert_eq!(at(now - 4_000)["http"]["truncated"], true);
    assert_eq!(at(now - 3_000)["http"]["method"], "");
    assert!(at(now - 2_000).get("http").is_none(), "an L4 verdict has no request line: {body}");

    // The CLI, over real HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let api = format!("http://{}", listener.local_addr().expect("addr"));
    let app = router(AppState::for_store(store.clone()));
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    let text = bulkhead(&api, &token, &["verdicts", "--identity", &deathstar.0.to_string()]).await;
    let header = text.lines().next().unwrap_or_default();
    assert!(header.contains("REQUEST"), "{text}");
    let row = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no row with {needle:?}:\n{text}"))
            .to_owned()
    };
    assert!(row("PUT /v1/exhaust-port").contains("HTTP request not in proposal"), "{text}");
    assert!(row(HOSTILE_PATH).contains(&format!("GET {HOSTILE_PATH}…")), "truncated paths end in …: {text}");
    assert!(row("(not a request line)").contains("HTTP request not in proposal"), "{text}");
    let l4 = row("default deny");
    assert!(l4.contains("10.202.0.12") && !l4.contains("GET") && !l4.contains("PUT"), "{l4}");

    let text = bulkhead(&api, &token, &["explain", "--from", "tiefighter", "--to", "deathstar", "--port", "80"]).await;
    let events = text.split("Recent verdict events").nth(1).unwrap_or_else(|| panic!("an events section: {text}"));
    assert!(events.contains("REQUEST") && events.contains("PUT /v1/exhaust-port"), "{text}");
    assert!(events.contains("(not a request line)") && events.contains(&format!("GET {HOSTILE_PATH}…")), "{text}");
    let json =
        bulkhead(&api, &token, &["--json", "explain", "--from", "tiefighter", "--to", "deathstar", "--port", "80"])
            .await;
    let v: Value = serde_json::from_str(&json).expect("explain json");
    assert!(v["events"].as_array().is_some_and(|e| e.iter().any(|e| e["http"]["path"] == "/v1/exhaust-port")), "{v}");
    serving.abort();

    // The workload page: the request line is shown, the hostile one only escaped.
    let page = get(store, &token, &format!("/workloads/{}", deathstar.0)).await;
    let events = page.split("id=\"events\"").nth(1).and_then(|s| s.split("</section>").next()).expect("events card");
    assert!(events.contains("<th>Request</th>") && events.contains("PUT /v1/exhaust-port"), "{events}");
    assert!(events.contains("(not a request line)"), "{events}");
    assert!(events.contains(&html_escaped(&format!("GET {HOSTILE_PATH}…"))), "{events}");
    assert!(!page.contains("<script>alert(1)"), "the path is never markup");
    assert_eq!(store.verdict_events(&q).await.expect("the table is still there").len(), 4);
}
