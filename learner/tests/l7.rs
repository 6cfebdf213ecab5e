//! L7 (HTTP) learning through the learner, on SQLite and PostgreSQL: flows carrying
//! request counts are ingested, synthesis proposes HTTP rules for deathstar (the
//! reference scenario, DESIGN.md §9: tiefighter only ever lands), the proposal page
//! shows them with their evidence (escaped), replay calls a request outside them a
//! would-deny, and both exports carry them as far as their format can.
//! The PostgreSQL case needs `BULKHEAD_TEST_POSTGRES_URL` and fails without it.

use std::net::IpAddr;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_learner::auth::{self, Role};
use bulkhead_learner::grpc::ingest::unix_ms;
use bulkhead_learner::store::{IngestBatch, ResolvedFlow, Store};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Direction, Flow, FlowHttp, HttpRequestCount, Identity, Labels, Protocol, Verdict};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A path an attacker chose, to check the page escapes it.
const HOSTILE_PATH: &str = "/v1/<b>bold</b>&\"x\"";

struct Scenario {
    store: Store,
    deathstar: Identity,
    tiefighter: Identity,
    seq: u64,
    token: String,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<bulkhead_testkit::postgres::PgTestDb>,
}

fn labels(class: &str, org: &str) -> Labels {
    Labels::new([(NAMESPACE_KEY, "default"), ("org", org), ("class", class)]).expect("labels")
}

/// deathstar's (the server's) view of tiefighter's connections to :80.
fn ingress(at: i64, requests: &[(&str, &str, u64)]) -> Flow {
    Flow {
        src_addr: "10.202.0.11".parse::<IpAddr>().expect("ip"),
        src_port: 0,
        dst_addr: "10.202.0.10".parse::<IpAddr>().expect("ip"),
        dst_port: 80,
        protocol: Protocol::Tcp,
        direction: Direction::Ingress,
        netns_ino: 2,
        cgroup_id: 0,
        pid: 0,
        comm: String::new(),
        connections: 3,
        bytes_sent: 300,
        bytes_received: 600,
        packets: 12,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: at,
        last_seen_unix_ms: at + 1_000,
        http: FlowHttp {
            requests: requests
                .iter()
                .map(|(m, p, n)| HttpRequestCount { method: (*m).into(), path: (*p).into(), requests: *n })
                .collect(),
            ..FlowHttp::default()
        },
    }
}

impl Scenario {
    async fn new(store: Store) -> Self {
        let deathstar = store.ensure_identity(&labels("deathstar", "empire")).await.expect("identity");
        let tiefighter = store.ensure_identity(&labels("tiefighter", "empire")).await.expect("identity");
        store.ensure_identity(&labels("xwing", "alliance")).await.expect("identity");
        let (t, _) = store.create_token_user("carol", Role::Analyst, "cli", "test", 1).await.expect("token");
        let token = t.expose().to_owned();
        Self { store, deathstar, tiefighter, seq: 0, token, _dir: None, _pg: None }
    }

    async fn record(&mut self, f: Flow) {
        self.seq += 1;
        let batch = IngestBatch {
            node_id: "node-1".into(),
            boot_id: "boot".into(),
            seq: self.seq,
            received_unix_ms: f.last_seen_unix_ms,
            flows: vec![ResolvedFlow { flow: f, src_identity: self.tiefighter, dst_identity: self.deathstar }],
            endpoints: None,
            dns_answers: vec![],
            loss: Default::default(),
        };
        self.store.ingest(&batch).await.expect("ingest");
    }

    async fn api(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        let req = Request::builder().method(method).uri(uri).header("authorization", format!("Bearer {}", self.token));
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

    async fn page(&self, uri: &str) -> (StatusCode, String) {
        let hash = auth::hash_password("correct horse battery staple").expect("hash");
        let user = self.store.create_user("vera", Role::Viewer, &hash, false, "test", 1).await.expect("user");
        let s = self.store.create_session(user.id, 3_600_000, unix_ms()).await.expect("session");
        let req = Request::get(uri)
            .header("cookie", format!("bulkhead_session={}", s.token.expose()))
            .body(Body::empty())
            .expect("request");
        let resp = router(AppState::for_store(self.store.clone())).oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }
}

async fn journey(mut s: Scenario) {
    let now = unix_ms();
    // Learning: tiefighter lands, again and again; once it also asked for a path only
    // an attacker would choose.
    for at in [now - 2 * 3_600_000, now - 3_600_000] {
        s.record(ingress(at, &[("POST", "/v1/request-landing", 5), ("GET", HOSTILE_PATH, 1)])).await;
    }
    let (status, list) = s.api("POST", "/api/v1/proposals/synthesize", Some(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let id = list
        .as_array()
        .and_then(|l| l.iter().find(|p| p["target"] == s.deathstar.0))
        .and_then(|p| p["id"].as_i64())
        .unwrap_or_else(|| panic!("a proposal for deathstar: {list}"));
    let (_, full) = s.api("GET", &format!("/api/v1/proposals/{id}"), None).await;
    let ingress_rules = &full["proposal"]["policy"]["ingress"];
    assert_eq!(ingress_rules.as_array().map(Vec::len), Some(1), "{full}");
    assert_eq!(
        ingress_rules[0]["http"],
        json!([
            {"method": "GET", "path": {"match": "exact", "value": HOSTILE_PATH}},
            {"method": "POST", "path": {"match": "exact", "value": "/v1/request-landing"}},
        ]),
        "{full}"
    );
    let evidence = &full["proposal"]["rules"][0]["evidence"]["http"];
    assert_eq!(evidence[1]["requests"], 10, "{evidence}");

    // The proposal page lists the HTTP rules with their evidence, escaped.
    let (status, html) = s.page(&format!("/proposals/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(html.contains("HTTP only") && html.contains("/v1/request-landing"), "{html}");
    assert!(html.contains("<td class=\"num\">10</td>"), "landing's request count: {html}");
    assert!(!html.contains("<b>bold</b>"), "the path is data, never markup");
    assert!(html.contains("/v1/&#60;b&#62;bold&#60;/b&#62;&#38;&#34;x&#34;"), "escaped as askama does: {html}");

    // Later tiefighter tries the exhaust port: the connection is allowed, the request is not.
    let attack = now - 10 * 60_000;
    s.record(ingress(attack, &[("PUT", "/v1/exhaust-port", 1), ("POST", "/v1/request-landing", 1)])).await;
    let req = json!({"proposal_id": id, "from_unix_ms": attack - 60_000, "to_unix_ms": now + 60_000});
    let (status, replay) = s.api("POST", "/api/v1/simulate", Some(req)).await;
    assert_eq!(status, StatusCode::OK, "{replay}");
    assert_eq!(replay["would_deny_total"], 1, "{replay}");
    let denied = &replay["would_deny"][0];
    assert_eq!(denied["requests"], json!([{"method": "PUT", "path": "/v1/exhaust-port", "requests": 1}]), "{replay}");
    let reason = denied["reasons"][0].as_str().unwrap_or_default();
    assert!(reason.starts_with("PUT /v1/exhaust-port: ingress of ") && reason.ends_with("(HTTP rules)"), "{replay}");

    // Exports: Cilium keeps the HTTP rules, NetworkPolicy says it cannot.
    let (status, cnp) = s.api("GET", &format!("/api/v1/export?format=cilium&proposal={id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{cnp}");
    let yaml = cnp["yaml"].as_str().expect("yaml");
    assert!(yaml.contains("method: POST") && yaml.contains(r"path: /v1/request-landing(\?.*)?"), "{yaml}");
    let (_, np) = s.api("GET", &format!("/api/v1/export?format=networkpolicy&proposal={id}"), None).await;
    let yaml = np["yaml"].as_str().expect("yaml");
    assert!(yaml.contains("bulkhead.io/http-rules-not-exported"), "{yaml}");
    assert!(np.to_string().contains("cannot express HTTP (L7) rules"), "{np}");
}

#[tokio::test]
async fn l7_journey_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&format!("sqlite://{}", dir.path().join("l7.db").display())).await.expect("store");
    let mut s = Scenario::new(store).await;
    s._dir = Some(dir);
    journey(s).await;
}

#[tokio::test]
async fn l7_journey_on_postgres() {
    let db = bulkhead_testkit::postgres::fresh_database().await;
    let store = Store::open(db.url()).await.expect("store");
    let mut s = Scenario::new(store).await;
    s._pg = Some(db);
    journey(s).await;
}
