//! Policy learning through the real `/api/v1` router, on SQLite and PostgreSQL: the
//! reference scenario (DESIGN.md §9) recorded as flows → synthesize → review → replay
//! ("what would this block?") → export, with the audit trail and bad input.

use std::net::IpAddr;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_learner::auth::Role;
use bulkhead_learner::grpc::ingest::unix_ms;
use bulkhead_learner::store::{IngestBatch, ResolvedFlow, Store};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Direction, Flow, Identity, Labels, Protocol, Verdict};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Scenario {
    store: Store,
    deathstar: Identity,
    tiefighter: Identity,
    xwing: Identity,
    seq: u64,
    /// API tokens by username: alice and bob approve, carol is an analyst.
    tokens: std::collections::HashMap<&'static str, String>,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<bulkhead_testkit::postgres::PgTestDb>,
}

fn labels(class: &str, org: &str) -> Labels {
    Labels::new([(NAMESPACE_KEY, "default"), ("org", org), ("class", class)]).expect("labels")
}

fn flow(src: &str, dst: &str, port: u16, at: i64) -> Flow {
    Flow {
        src_addr: src.parse::<IpAddr>().expect("ip"),
        src_port: 0,
        dst_addr: dst.parse::<IpAddr>().expect("ip"),
        dst_port: port,
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
        netns_ino: 1,
        cgroup_id: 0,
        pid: 7,
        comm: "curl".into(),
        connections: 3,
        bytes_sent: 10,
        bytes_received: 20,
        packets: 3,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: at,
        last_seen_unix_ms: at + 1_000,
        http: Default::default(),
    }
}

impl Scenario {
    async fn new(store: Store) -> Self {
        let deathstar = store.ensure_identity(&labels("deathstar", "empire")).await.expect("identity");
        let tiefighter = store.ensure_identity(&labels("tiefighter", "empire")).await.expect("identity");
        let xwing = store.ensure_identity(&labels("xwing", "alliance")).await.expect("identity");
        store.register_agent("node-1", 1).await.expect("agent");
        let mut tokens = std::collections::HashMap::new();
        for (name, role) in [("alice", Role::Approver), ("bob", Role::Approver), ("carol", Role::Analyst)] {
            let (t, _) = store.create_token_user(name, role, "cli", "test", 1).await.expect("token user");
            tokens.insert(name, t.expose().to_owned());
        }
        Self { store, deathstar, tiefighter, xwing, seq: 0, tokens, _dir: None, _pg: None }
    }

    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite://{}", dir.path().join("p.db").display())).await.expect("store");
        let mut s = Self::new(store).await;
        s._dir = Some(dir);
        s
    }

    async fn postgres() -> Self {
        let db = bulkhead_testkit::postgres::fresh_database().await;
        let store = Store::open(db.url()).await.expect("store");
        let mut s = Self::new(store).await;
        s._pg = Some(db);
        s
    }

    async fn record(&mut self, src: Identity, dst: Identity, f: Flow) {
        self.seq += 1;
        let batch = IngestBatch {
            node_id: "node-1".into(),
            boot_id: "boot".into(),
            seq: self.seq,
            received_unix_ms: f.last_seen_unix_ms,
            flows: vec![ResolvedFlow { flow: f, src_identity: src, dst_identity: dst }],
            endpoints: None,
            dns_answers: vec![],
            loss: Default::default(),
        };
        self.store.ingest(&batch).await.expect("ingest");
    }

    /// Calls the API as `user` (default: carol, the analyst).
    async fn call(&self, method: &str, uri: &str, user: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let token = &self.tokens[user.unwrap_or("carol")];
        let req = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {token}"));
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = router(AppState::for_store(self.store.clone())).oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

async fn reference_journey(mut s: Scenario) {
    let now = unix_ms();
    // Learning: tiefighter lands, twice, in the last two hours.
    for at in [now - 2 * 3_600_000, now - 3_600_000] {
        s.record(s.tiefighter, s.deathstar, flow("10.202.0.11", "10.202.0.10", 80, at)).await;
    }
    let (status, list) = s.call("POST", "/api/v1/proposals/synthesize", None, Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ds = list
        .as_array()
        .and_then(|l| l.iter().find(|p| p["target"] == s.deathstar.0))
        .unwrap_or_else(|| panic!("a proposal for deathstar: {list}"))
        .clone();
    let id = ds["id"].as_i64().expect("id");
    assert_eq!(ds["version"], 1);
    assert_eq!(ds["status"], "proposed");
    assert!(list.as_array().is_some_and(|l| l.iter().all(|p| p["target"] != s.xwing.0)), "xwing never talked");

    // A NetworkPolicy already in the cluster for deathstar is shown next to the proposal.
    let existing = bulkhead_model::Policy {
        name: "allow-landing".into(),
        namespace: Some("default".into()),
        selector: bulkhead_model::LabelSelector::with_labels([("class", "deathstar")]),
        ingress: Some(vec![]),
        egress: None,
    };
    let row = bulkhead_learner::store::ClusterPolicyRow {
        namespace: "default".into(),
        name: "allow-landing".into(),
        uid: "u-1".into(),
        resource_version: "1".into(),
        policy: existing,
        raw: json!({"kind": "NetworkPolicy"}),
    };
    s.store.replace_cluster_policies("kubernetes", vec![row], now).await.expect("import");
    let (status, full) = s.call("GET", &format!("/api/v1/proposals/{id}"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(full["cluster_policies"][0]["name"], "allow-landing", "{full}");
    let ingress = &full["proposal"]["policy"]["ingress"];
    assert_eq!(ingress.as_array().map(Vec::len), Some(1), "{full}");
    assert_eq!(ingress[0]["peer"]["selector"]["match_labels"]["class"], "tiefighter");
    assert_eq!(ingress[0]["ports"][0], json!({"protocol": "tcp", "first": 80, "last": 80}));
    assert_eq!(full["proposal"]["rules"][0]["evidence"]["connections"], 6);
    assert_eq!(full["proposal"]["widening_total"], 0);

    // Re-synthesizing the same traffic changes nothing: no version 2.
    let (_, again) = s.call("POST", "/api/v1/proposals/synthesize", None, Some(json!({}))).await;
    let again_ds = again.as_array().and_then(|l| l.iter().find(|p| p["target"] == s.deathstar.0)).expect("ds");
    assert_eq!(again_ds["id"].as_i64(), Some(id));

    // Later xwing tries to attack; replay shows it as would-deny, tiefighter passes.
    let attack = now - 10 * 60_000;
    s.record(s.xwing, s.deathstar, flow("10.202.0.12", "10.202.0.10", 80, attack)).await;
    s.record(s.tiefighter, s.deathstar, flow("10.202.0.11", "10.202.0.10", 80, attack + 1_000)).await;
    let req = json!({"proposal_id": id, "from_unix_ms": attack - 60_000, "to_unix_ms": now + 60_000});
    let (status, replay) = s.call("POST", "/api/v1/simulate", None, Some(req)).await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["flows_evaluated"], 2, "{replay}");
    assert_eq!(replay["would_deny_total"], 1, "{replay}");
    let denied = &replay["would_deny"][0];
    assert_eq!(denied["src"], s.xwing.0);
    assert_eq!(denied["dst_port"], 80);
    let policy_name = full["proposal"]["policy"]["name"].as_str().expect("name");
    let reason = denied["reasons"][0].as_str().unwrap_or_default();
    assert!(reason.starts_with("ingress of ") && reason.ends_with(policy_name), "{replay}");

    // Review: approving needs an approver (the analyst is refused, and the proposal
    // stays pending); approve once; a second decision conflicts.
    let (status, _) = s.call("POST", &format!("/api/v1/proposals/{id}/approve"), None, Some(json!({}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let uri = format!("/api/v1/proposals/{id}/approve");
    let (status, rec) = s.call("POST", &uri, Some("alice"), Some(json!({"comment": "landing only"}))).await;
    assert_eq!(status, StatusCode::OK, "{rec}");
    assert_eq!(rec["status"], "approved");
    assert_eq!(rec["reviewer"], "alice");
    let (status, body) = s.call("POST", &uri, Some("bob"), Some(json!({}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = s.call("POST", "/api/v1/proposals/999999/approve", Some("bob"), Some(json!({}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Rollout gates: enforce straight from learn is refused, monitor is fine, then
    // enforce; every change is audited.
    let t = s.deathstar.0;
    let (status, body) =
        s.call("POST", "/api/v1/rollout", Some("alice"), Some(json!({"target": t, "mode": "enforce"}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    for mode in ["monitor", "enforce"] {
        let (status, body) =
            s.call("POST", "/api/v1/rollout", Some("alice"), Some(json!({"target": t, "mode": mode}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body[0]["to"], mode);
    }
    let (_, states) = s.call("GET", "/api/v1/rollout", None, None).await;
    let ds = states.as_array().and_then(|a| a.iter().find(|r| r["target"] == t)).expect("deathstar state");
    assert_eq!((ds["mode"].as_str(), ds["has_policy"].as_bool()), (Some("enforce"), Some(true)), "{states}");
    let (status, _) = s.call("POST", "/api/v1/rollout", None, Some(json!({"target": t, "mode": "learn"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "leaving enforce is an approver's decision");

    // The whole (approved) policy set replays the same way.
    let req = json!({"from_unix_ms": attack - 60_000, "to_unix_ms": now + 60_000});
    let (_, replay) = s.call("POST", "/api/v1/simulate", None, Some(req)).await;
    assert_eq!(replay["would_deny_total"], 1, "{replay}");

    // Diff against nothing deployed: everything is added.
    let (status, d) = s.call("GET", &format!("/api/v1/proposals/{id}/diff"), None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(d["text"].as_str().is_some_and(|t| t.contains("+ ingress from workloads")), "{d}");

    // Export both formats.
    let (status, np) = s.call("GET", "/api/v1/export?format=networkpolicy&namespace=default", None, None).await;
    assert_eq!(status, StatusCode::OK, "{np}");
    let yaml = np["yaml"].as_str().expect("yaml");
    assert!(yaml.contains("kind: NetworkPolicy") && yaml.contains(&format!("name: {policy_name}")), "{yaml}");
    assert!(yaml.contains("port: 80"), "{yaml}");
    let (_, cnp) = s.call("GET", "/api/v1/export?format=cilium", None, None).await;
    assert!(cnp["yaml"].as_str().is_some_and(|y| y.contains("kind: CiliumNetworkPolicy")), "{cnp}");
    let (status, _) = s.call("GET", "/api/v1/export?format=iptables", None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The audit log names the decision and who made it.
    let (status, audit) = s.call("GET", "/api/v1/audit?action=proposal.", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let entries = audit.as_array().expect("array");
    assert!(entries.iter().any(|e| e["action"] == "proposal.approve" && e["actor"] == "alice"), "{audit}");
    assert!(entries.iter().any(|e| e["action"] == "proposal.proposed"), "{audit}");
    let (_, audit) = s.call("GET", "/api/v1/audit?action=rollout.", None, None).await;
    assert_eq!(audit.as_array().map(Vec::len), Some(2), "monitor and enforce: {audit}");

    // New traffic after approval: xwing's attempt is now an edge too; the next
    // synthesis is a new version whose diff against the approved one adds xwing.
    let (_, list) = s.call("POST", "/api/v1/proposals/synthesize", None, Some(json!({}))).await;
    let v2 = list.as_array().and_then(|l| l.iter().find(|p| p["target"] == s.deathstar.0)).expect("v2").clone();
    assert_eq!(v2["version"], 2, "{list}");
    let (_, d) = s.call("GET", &format!("/api/v1/proposals/{}/diff", v2["id"]), None, None).await;
    assert!(d["text"].as_str().is_some_and(|t| t.contains("class=xwing")), "{d}");
    assert_eq!(d["against"][0].as_i64(), Some(id), "{d}");

    // Rejecting needs a comment.
    let uri = format!("/api/v1/proposals/{}/reject", v2["id"]);
    let (status, body) = s.call("POST", &uri, Some("alice"), Some(json!({"comment": "  "}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = s.call("POST", &uri, Some("alice"), Some(json!({"comment": "xwing is hostile"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "rejected");
}

#[tokio::test]
async fn reference_scenario_on_sqlite() {
    reference_journey(Scenario::sqlite().await).await;
}

#[tokio::test]
async fn reference_scenario_on_postgres() {
    reference_journey(Scenario::postgres().await).await;
}

#[tokio::test]
async fn labels_invalid_for_kubernetes_are_reported_by_export() {
    let mut s = Scenario::sqlite().await;
    let evil = Labels::new([(NAMESPACE_KEY, "default"), ("app", "<script>alert(1)</script>")]).expect("labels");
    let evil = s.store.ensure_identity(&evil).await.expect("identity");
    let now = unix_ms();
    s.record(evil, s.deathstar, flow("10.202.0.13", "10.202.0.10", 80, now - 60_000)).await;
    let (_, list) = s.call("POST", "/api/v1/proposals/synthesize", None, Some(json!({}))).await;
    let id = list.as_array().and_then(|l| l.iter().find(|p| p["target"] == s.deathstar.0)).expect("ds")["id"].clone();
    let (status, out) = s.call("GET", &format!("/api/v1/export?proposal={id}"), None, None).await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let errors = out["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 1, "{out}");
    assert!(errors[0].as_str().is_some_and(|e| e.contains("<script>") && e.contains("label value")), "{out}");
    assert_eq!(out["yaml"], "", "nothing half-exported");
    // Bad requests are 400 with a reason, never 500.
    for (method, uri, body) in [
        ("POST", "/api/v1/simulate", json!({"from_unix_ms": 10, "to_unix_ms": 5})),
        ("POST", "/api/v1/proposals/synthesize", json!({"window_ms": -1})),
        ("POST", "/api/v1/proposals/synthesize", json!({"level": "everything"})),
    ] {
        let (status, body) = s.call(method, uri, None, Some(body)).await;
        assert!(status.is_client_error(), "{uri}: {status} {body}");
    }
    let (status, _) = s.call("GET", "/api/v1/proposals?status=maybe", None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = s.call("GET", "/api/v1/proposals/1/diff?against=yesterday", None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
