//! `GET /api/v1/explain` and `bulkhead explain` on the reference scenario (DESIGN.md
//! §9), on SQLite and PostgreSQL: tiefighter lands on deathstar (L7: only
//! `POST /v1/request-landing`), deathstar's proposal is approved and rolled out
//! learn → monitor → enforce, and at each step explain must say what the enforcer does
//! with xwing's and tiefighter's connections and why — plus stale enforcers, reported
//! verdict events, a pending proposal that would change the answer, hostile label
//! values, and every kind of bad input answered 400 / 404, never 500.
//! The PostgreSQL case needs `BULKHEAD_TEST_POSTGRES_URL` and fails without it.

use std::net::IpAddr;
use std::process::Output;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_learner::auth::Role;
use bulkhead_learner::grpc::ingest::unix_ms;
use bulkhead_learner::store::{AckOutcome, IngestBatch, ResolvedEndpoint, ResolvedFlow, Store, VerdictEventRow};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Direction, EndpointFact, Flow, FlowHttp, HttpRequestCount, Identity, InterfaceAddress, Labels, Protocol, Verdict,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A label value that is markup, and one that is SQL: both are plain data everywhere.
const SCRIPT: &str = "<script>alert(1)</script>";
const SQL: &str = "'; DROP TABLE flows; --";

struct Scenario {
    store: Store,
    deathstar: Identity,
    tiefighter: Identity,
    xwing: Identity,
    hostile: Identity,
    seq: u64,
    /// API tokens: vera views, carol is an analyst, alice approves.
    tokens: std::collections::HashMap<&'static str, String>,
    _dir: Option<tempfile::TempDir>,
    _pg: Option<bulkhead_testkit::postgres::PgTestDb>,
}

fn labels(ns: &str, pairs: &[(&str, &str)]) -> Labels {
    Labels::new([(NAMESPACE_KEY, ns)].into_iter().chain(pairs.iter().copied())).expect("labels")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A flow `src` → `dst`:80 as `direction`'s side reported it.
fn flow(src: &str, dst: &str, direction: Direction, at: i64, requests: &[(&str, &str, u64)]) -> Flow {
    Flow {
        src_addr: ip(src),
        src_port: 0,
        dst_addr: ip(dst),
        dst_port: 80,
        protocol: Protocol::Tcp,
        direction,
        netns_ino: 2,
        cgroup_id: 0,
        pid: 7,
        comm: "curl".into(),
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

fn endpoint(ino: u64, name: &str, addr: &str, identity: Identity) -> ResolvedEndpoint {
    ResolvedEndpoint {
        fact: EndpointFact {
            netns_ino: ino,
            netns_name: Some(format!("bh-x-{name}")),
            addresses: vec![InterfaceAddress { interface: "eth0".into(), addr: ip(addr), prefix_len: 24 }],
            cgroups: vec![],
            host: false,
        },
        identity,
        workload: Some(name.to_owned()),
    }
}

/// `uri` with a query string, every value percent-encoded.
fn uri(path: &str, query: &[(&str, &str)]) -> String {
    format!("{path}?{}", serde_urlencoded::to_string(query).expect("query"))
}

impl Scenario {
    async fn new(store: Store) -> Self {
        let deathstar = store.ensure_identity(&labels("default", &[("org", "empire"), ("class", "deathstar")])).await;
        let tiefighter = store.ensure_identity(&labels("default", &[("org", "empire"), ("class", "tiefighter")])).await;
        let xwing = store.ensure_identity(&labels("default", &[("org", "alliance"), ("class", "xwing")])).await;
        let hostile = store.ensure_identity(&labels("default", &[("org", SQL), ("class", SCRIPT)])).await;
        let shop_web = store.ensure_identity(&labels("shop", &[("app", "web")])).await;
        let blog_web = store.ensure_identity(&labels("blog", &[("app", "web")])).await;
        let [deathstar, tiefighter, xwing, hostile, shop_web, blog_web] =
            [deathstar, tiefighter, xwing, hostile, shop_web, blog_web].map(|r| r.expect("identity"));
        store.register_agent("node-1", 1).await.expect("agent");
        let mut tokens = std::collections::HashMap::new();
        for (name, role) in [("vera", Role::Viewer), ("carol", Role::Analyst), ("alice", Role::Approver)] {
            let (t, _) = store.create_token_user(name, role, "cli", "test", 1).await.expect("token user");
            tokens.insert(name, t.expose().to_owned());
        }
        let mut s = Self { store, deathstar, tiefighter, xwing, hostile, seq: 0, tokens, _dir: None, _pg: None };
        // node-1's endpoint snapshot: every workload runs there.
        let endpoints = vec![
            endpoint(10, "deathstar", "10.202.0.10", deathstar),
            endpoint(11, "tiefighter", "10.202.0.11", tiefighter),
            endpoint(12, "xwing", "10.202.0.12", xwing),
            endpoint(13, "hostile", "10.202.0.13", hostile),
            endpoint(20, "web", "10.202.0.20", shop_web),
            endpoint(21, "web", "10.202.0.21", blog_web),
        ];
        s.ingest(vec![], Some(endpoints)).await;
        s
    }

    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&format!("sqlite://{}", dir.path().join("x.db").display())).await.expect("store");
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

    async fn ingest(&mut self, flows: Vec<ResolvedFlow>, endpoints: Option<Vec<ResolvedEndpoint>>) {
        self.seq += 1;
        let batch = IngestBatch {
            node_id: "node-1".into(),
            boot_id: "boot".into(),
            seq: self.seq,
            received_unix_ms: unix_ms(),
            flows,
            endpoints,
            dns_answers: vec![],
            loss: Default::default(),
        };
        self.store.ingest(&batch).await.expect("ingest");
    }

    async fn record(&mut self, src: Identity, dst: Identity, f: Flow) {
        self.ingest(vec![ResolvedFlow { flow: f, src_identity: src, dst_identity: dst }], None).await;
    }

    async fn call(&self, method: &str, uri: &str, user: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(u) = user {
            req = req.header("authorization", format!("Bearer {}", self.tokens[u]));
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = router(AppState::for_store(self.store.clone())).oneshot(req).await.expect("response");
        let status = resp.status();
        let json = resp.headers().get("content-type").is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert!(json || status == StatusCode::UNAUTHORIZED, "{uri}: {status} answered without JSON");
        (status, value)
    }

    /// Explains as vera, the viewer (the least role that may).
    async fn explain(&self, query: &[(&str, &str)]) -> (StatusCode, Value) {
        self.call("GET", &uri("/api/v1/explain", query), Some("vera"), None).await
    }

    /// Explains a connection to port 80 that must be answered.
    async fn tuple(&self, from: &str, to: &str, extra: &[(&str, &str)]) -> Value {
        let mut q = vec![("from", from), ("to", to), ("port", "80")];
        q.extend_from_slice(extra);
        let (status, v) = self.explain(&q).await;
        assert_eq!(status, StatusCode::OK, "{from} → {to} {extra:?}: {v}");
        v
    }

    async fn set_mode(&self, target: Identity, mode: &str, user: &str) {
        let body = json!({"target": target.0, "mode": mode, "reason": "test"});
        let (status, v) = self.call("POST", "/api/v1/rollout", Some(user), Some(body)).await;
        assert_eq!(status, StatusCode::OK, "rollout {mode}: {v}");
    }

    /// Learning, then deathstar's proposal approved (tiefighter's stays pending).
    /// Returns deathstar's proposal id.
    async fn learn_and_approve(&mut self) -> i64 {
        let now = unix_ms();
        for at in [now - 2 * 3_600_000, now - 3_600_000] {
            let f = flow("10.202.0.11", "10.202.0.10", Direction::Ingress, at, &[("POST", "/v1/request-landing", 5)]);
            self.record(self.tiefighter, self.deathstar, f).await;
            let f = flow("10.202.0.11", "10.202.0.10", Direction::Egress, at, &[]);
            self.record(self.tiefighter, self.deathstar, f).await;
        }
        let (status, list) = self.call("POST", "/api/v1/proposals/synthesize", Some("carol"), Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        let id_of = |target: Identity| {
            list.as_array().and_then(|l| l.iter().find(|p| p["target"] == target.0)).and_then(|p| p["id"].as_i64())
        };
        let ds = id_of(self.deathstar).unwrap_or_else(|| panic!("a proposal for deathstar: {list}"));
        assert!(id_of(self.tiefighter).is_some(), "a proposal for tiefighter: {list}");
        let uri = format!("/api/v1/proposals/{ds}/approve");
        let (status, v) = self.call("POST", &uri, Some("alice"), Some(json!({"comment": "landing only"}))).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        ds
    }
}

fn side<'a>(v: &'a Value, dir: &str) -> &'a Value {
    &v[dir]
}

fn notes(v: &Value) -> String {
    v["notes"].to_string()
}

async fn journey(mut s: Scenario) {
    let ds = s.learn_and_approve().await;

    // --- not covered: nobody's policy is about tiefighter → xwing; tiefighter's pending
    // proposal (egress to deathstar only) would make it a default deny.
    let v = s.tuple("tiefighter", "default/xwing", &[]).await;
    assert_eq!(v["source"]["identity"], s.tiefighter.0, "{v}");
    assert_eq!(v["destination"]["identity"], s.xwing.0, "{v}");
    assert_eq!(v["source"]["resolved_by"], "workload name \"tiefighter\"");
    assert_eq!(v["destination"]["nodes"], json!(["node-1"]), "{v}");
    assert_eq!(side(&v, "egress")["decision"]["result"], "not_covered", "{v}");
    assert_eq!(side(&v, "ingress")["decision"]["result"], "not_covered", "{v}");
    assert_eq!(v["verdict"], "pass");
    assert_eq!(v["allowed_by_policy"], true);
    let pending = v["pending"].as_array().expect("pending");
    assert_eq!(pending.len(), 1, "{v}");
    assert_eq!(pending[0]["proposal"]["target"], s.tiefighter.0, "{v}");
    assert_eq!(pending[0]["proposal"]["status"], "proposed");
    assert_eq!(pending[0]["egress"]["result"], "default_deny", "{v}");
    assert_eq!(pending[0]["verdict"], "pass", "tiefighter is in learn mode: {v}");

    // --- learn: deathstar's approved policy would deny xwing, but it is not installed.
    let v = s.tuple("xwing", "deathstar", &[]).await;
    let ingress = side(&v, "ingress");
    assert_eq!(ingress["decision"]["result"], "default_deny", "{v}");
    assert_eq!(ingress["decision"]["policies"][0]["proposal_id"], ds, "{v}");
    assert_eq!(ingress["policies"][0]["status"], "approved", "{v}");
    assert_eq!(ingress["mode"], "learn");
    assert_eq!(ingress["verdict"], "pass", "{v}");
    assert!(ingress["reason"].as_str().is_some_and(|r| r.contains("learn mode")), "{v}");
    assert_eq!(v["allowed_by_policy"], false);
    assert_eq!(v["verdict"], "pass");
    assert_eq!(v["enforcers"][0]["state"], "not_connected", "no enforcer said hello yet: {v}");

    // --- monitor: xwing is audited; tiefighter lands by the L7 rule.
    s.set_mode(s.deathstar, "monitor", "carol").await;
    let v = s.tuple("10.202.0.12", "deathstar", &[]).await;
    assert_eq!(v["source"]["identity"], s.xwing.0, "{v}");
    let how = v["source"]["resolved_by"].as_str().unwrap_or_default();
    assert!(how.contains("10.202.0.12") && how.contains("bh-x-xwing") && how.contains("node-1"), "{v}");
    assert_eq!(side(&v, "ingress")["verdict"], "audit", "{v}");
    assert_eq!(v["verdict"], "audit");
    assert!(v["summary"].as_str().is_some_and(|s| s.starts_with("audit — ingress of deathstar")), "{v}");

    let v = s.tuple("tiefighter", "deathstar", &[]).await;
    let ingress = side(&v, "ingress");
    assert_eq!(ingress["decision"]["result"], "allowed", "{v}");
    let rule = &ingress["decision"]["rule"];
    assert_eq!(rule["direction"], "ingress");
    assert_eq!(rule["index"], 0);
    assert!(rule["peer"].as_str().is_some_and(|p| p.contains("class=tiefighter")), "{v}");
    assert_eq!(rule["ports"], json!(["80/tcp"]));
    assert_eq!(rule["http"], json!(["POST /v1/request-landing"]), "the L7 rule is shown: {v}");
    assert_eq!(v["verdict"], "pass");
    let put = [("method", "PUT"), ("path", "/v1/exhaust-port")];
    let v = s.tuple("tiefighter", "deathstar", &put).await;
    assert_eq!(side(&v, "ingress")["decision"]["result"], "request_denied", "{v}");
    assert_eq!(v["verdict"], "audit", "{v}");

    // --- enforce: xwing is dropped; tiefighter still lands, its PUT is dropped.
    s.set_mode(s.deathstar, "enforce", "alice").await;
    let v = s.tuple("xwing", "deathstar", &[]).await;
    assert_eq!(side(&v, "ingress")["verdict"], "drop", "{v}");
    assert_eq!(side(&v, "egress")["decision"]["result"], "not_covered", "{v}");
    assert_eq!(v["verdict"], "drop");
    let v = s.tuple("tiefighter", "deathstar", &[("method", "POST"), ("path", "/v1/request-landing")]).await;
    assert_eq!(v["verdict"], "pass", "{v}");
    let v = s.tuple("tiefighter", "deathstar", &put).await;
    assert_eq!(v["verdict"], "drop", "{v}");
    // An outside address: world has no side of its own; deathstar's ingress drops it.
    let v = s.tuple("203.0.113.9", "deathstar", &[]).await;
    assert_eq!(v["source"]["identity"], Identity::WORLD.0, "{v}");
    assert_eq!(v["source"]["kind"], "reserved");
    assert_eq!(side(&v, "egress")["decision"]["result"], "not_managed", "{v}");
    assert_eq!(v["verdict"], "drop");

    // --- a stale enforcer is named; once it applies the version, it is in sync.
    let now = unix_ms();
    s.store.enforcer_hello("node-1", "boot", "0.1.0", Some(1), now).await.expect("hello");
    s.store.set_desired_version("node-1", 2, now).await.expect("desired");
    let v = s.tuple("xwing", "deathstar", &[]).await;
    let e = &v["enforcers"][0];
    assert_eq!(e["node_id"], "node-1");
    assert_eq!(e["directions"], json!(["egress", "ingress"]), "both ends run on node-1: {v}");
    assert_eq!(
        (e["state"].as_str(), e["applied_version"].as_u64(), e["desired_version"].as_u64()),
        (Some("stale"), Some(1), Some(2))
    );
    assert!(notes(&v).contains("stale"), "{v}");
    s.store.enforcer_ack("node-1", 2, AckOutcome::Applied, now).await.expect("ack");
    let v = s.tuple("xwing", "deathstar", &[]).await;
    assert_eq!(v["enforcers"][0]["state"], "in_sync", "{v}");
    assert!(!notes(&v).contains("stale"), "{v}");

    // --- the events the enforcer reported for this tuple, and only those.
    let event = |at: i64, peer: Identity, port: u16, verdict: Verdict| VerdictEventRow {
        at_unix_ms: at,
        local: s.deathstar,
        peer,
        direction: Direction::Ingress,
        verdict,
        src_addr: ip("10.202.0.12"),
        dst_addr: ip("10.202.0.10"),
        dst_port: port,
        protocol: Protocol::Tcp,
        policy_version: 2,
        rule: None,
        http: None,
    };
    let events = [
        event(now - 5_000, s.xwing, 80, Verdict::Denied),
        event(now - 4_000, s.xwing, 443, Verdict::Denied),
        event(now - 3_000, s.tiefighter, 80, Verdict::Forwarded),
    ];
    s.store.insert_verdict_events("node-1", &events, now).await.expect("events");
    let v = s.tuple("xwing", "deathstar", &[]).await;
    let listed = v["events"].as_array().expect("events");
    assert_eq!(listed.len(), 1, "{v}");
    assert_eq!(listed[0]["verdict"], "denied");
    assert_eq!(listed[0]["dst_port"], 80);
    assert_eq!(listed[0]["reason"], "default deny of the covered ingress");
    let before = (now - 60_000 - 10_000).to_string();
    let v = s.tuple("xwing", "deathstar", &[("at_ms", &before)]).await;
    assert_eq!(v["events"], json!([]), "events after `at` are not shown: {v}");

    // --- a recorded flow by its id: its ends as ingest resolved them.
    let attack = now - 10 * 60_000;
    s.record(s.xwing, s.deathstar, flow("10.202.0.12", "10.202.0.10", Direction::Egress, attack, &[])).await;
    let (status, flows) = s.call("GET", "/api/v1/flows?limit=1", Some("vera"), None).await;
    assert_eq!(status, StatusCode::OK);
    let id = flows[0]["id"].as_i64().expect("flow id");
    let (status, v) = s.explain(&[("flow", &id.to_string())]).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["flow"]["id"], id);
    assert_eq!(v["flow"]["node_id"], "node-1");
    assert_eq!(v["source"]["identity"], s.xwing.0);
    assert_eq!(v["source"]["address"], "10.202.0.12");
    assert!(v["source"]["resolved_by"].as_str().is_some_and(|r| r.starts_with(&format!("flow {id}: the local side"))));
    assert!(v["destination"]["resolved_by"].as_str().is_some_and(|r| r.contains("peer address 10.202.0.10")));
    assert_eq!(v["at_unix_ms"], attack + 1_000, "at defaults to the flow's last sighting");
    assert_eq!(v["verdict"], "drop");
    assert!(notes(&v).contains("entered enforce mode"), "the mode changed after the flow: {v}");

    // --- hostile label values are data: found by name and address, returned verbatim.
    for from in [SCRIPT, "default/<script>alert(1)</script>", "10.202.0.13"] {
        let v = s.tuple(from, "deathstar", &[]).await;
        assert_eq!(v["source"]["identity"], s.hostile.0, "{from}: {v}");
        assert_eq!(v["source"]["labels"]["class"], SCRIPT);
        assert_eq!(v["source"]["labels"]["org"], SQL);
        assert_eq!(v["verdict"], "drop", "{v}");
    }
    let (status, v) = s.explain(&[("from", SQL), ("to", "deathstar"), ("port", "80")]).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("DROP TABLE")), "{v}");
    let (status, flows) = s.call("GET", "/api/v1/flows?limit=1", Some("vera"), None).await;
    assert_eq!((status, flows[0]["id"].as_i64()), (StatusCode::OK, Some(id)), "flows are still there");

    // --- names: ambiguous and qualified.
    let (status, v) = s.explain(&[("from", "web"), ("to", "deathstar"), ("port", "80")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let msg = v["error"].as_str().unwrap_or_default();
    assert!(msg.contains("ambiguous") && msg.contains("shop/web") && msg.contains("blog/web"), "{v}");
    let v = s.tuple("shop/web", "deathstar", &[]).await;
    assert_eq!(v["source"]["namespace"], "shop");
    let v = s.tuple(&s.xwing.0.to_string(), "reserved:world", &[]).await;
    assert_eq!(v["source"]["identity"], s.xwing.0);
    assert_eq!(v["destination"]["identity"], Identity::WORLD.0);

    // --- bad input: 400 or 404 with a message, never 500.
    // (query, status, what the error says)
    type Case<'a> = (&'a [(&'a str, &'a str)], StatusCode, &'a str);
    let bad: &[Case] = &[
        (&[("flow", "999999999")], StatusCode::NOT_FOUND, "does not exist"),
        (&[("flow", "abc")], StatusCode::BAD_REQUEST, "flow id"),
        (&[("flow", "0")], StatusCode::BAD_REQUEST, "flow id"),
        (&[("flow", "-3")], StatusCode::BAD_REQUEST, "flow id"),
        (&[("flow", "9223372036854775807")], StatusCode::NOT_FOUND, "does not exist"),
        (&[("flow", "1"), ("from", "xwing")], StatusCode::BAD_REQUEST, "not both"),
        (&[], StatusCode::BAD_REQUEST, "flow id"),
        (&[("from", "xwing"), ("to", "deathstar")], StatusCode::BAD_REQUEST, "port is required"),
        (&[("from", "xwing"), ("to", "deathstar"), ("port", "0")], StatusCode::BAD_REQUEST, "port"),
        (&[("from", "xwing"), ("to", "deathstar"), ("port", "70000")], StatusCode::BAD_REQUEST, "port"),
        (&[("from", "xwing"), ("to", "deathstar"), ("port", "http")], StatusCode::BAD_REQUEST, "port"),
        (
            &[("from", "xwing"), ("to", "deathstar"), ("port", "80"), ("proto", "icmp")],
            StatusCode::BAD_REQUEST,
            "proto",
        ),
        (&[("from", "nobody"), ("to", "deathstar"), ("port", "80")], StatusCode::NOT_FOUND, "nobody"),
        (&[("from", "xwing"), ("to", "99999"), ("port", "80")], StatusCode::NOT_FOUND, "99999"),
        (&[("from", "127.0.0.1"), ("to", "deathstar"), ("port", "80")], StatusCode::BAD_REQUEST, "every network"),
        (&[("from", "xwing"), ("to", "deathstar"), ("port", "80"), ("method", "PUT")], StatusCode::BAD_REQUEST, "both"),
        (
            &[("from", "xwing"), ("to", "deathstar"), ("port", "80"), ("method", "put"), ("path", "/")],
            StatusCode::BAD_REQUEST,
            "method",
        ),
        (
            &[
                ("from", "xwing"),
                ("to", "deathstar"),
                ("port", "53"),
                ("proto", "udp"),
                ("method", "GET"),
                ("path", "/"),
            ],
            StatusCode::BAD_REQUEST,
            "TCP",
        ),
        (
            &[("from", "xwing"), ("to", "deathstar"), ("port", "80"), ("at_ms", "noon")],
            StatusCode::BAD_REQUEST,
            "at_ms",
        ),
        (&[("from", "xwing"), ("to", "deathstar"), ("port", "80"), ("at_ms", "-5")], StatusCode::BAD_REQUEST, "at_ms"),
    ];
    for (query, want, says) in bad {
        let (status, v) = s.explain(query).await;
        assert_eq!(status, *want, "{query:?}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains(says)), "{query:?} should say {says:?}: {v}");
    }
    let (status, _) = s.call("GET", "/api/v1/explain?flow=1", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "explain needs a login");
}

#[tokio::test]
async fn explain_on_sqlite() {
    journey(Scenario::sqlite().await).await;
}

#[tokio::test]
async fn explain_on_postgres() {
    journey(Scenario::postgres().await).await;
}

// === the CLI ===

async fn bulkhead(url: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead"));
    cmd.arg("--server").arg(url).args(args);
    cmd.env_remove("BULKHEAD_TOKEN_FILE").env("HOME", "/nonexistent").env("BULKHEAD_TOKEN", token);
    cmd.output().await.expect("run bulkhead")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The real binary against a served learner: human and JSON answers, and errors that
/// exit non-zero with the API's message.
#[tokio::test]
async fn cli_explains_flows_and_tuples() {
    let mut s = Scenario::sqlite().await;
    s.learn_and_approve().await;
    s.set_mode(s.deathstar, "monitor", "carol").await;
    s.set_mode(s.deathstar, "enforce", "alice").await;
    let now = unix_ms();
    s.store.enforcer_hello("node-1", "boot", "0.1.0", Some(1), now).await.expect("hello");
    s.store.set_desired_version("node-1", 2, now).await.expect("desired");
    s.record(s.xwing, s.deathstar, flow("10.202.0.12", "10.202.0.10", Direction::Egress, now - 60_000, &[])).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = router(AppState::for_store(s.store.clone()));
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    let token = s.tokens["vera"].clone();

    // `bulkhead flows` shows the ids explain takes.
    let out = bulkhead(&url, &token, &["flows", "--limit", "1"]).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success() && stdout.starts_with("ID "), "{out:?}");
    let id = stdout.lines().nth(1).and_then(|l| l.split_whitespace().next()).expect("a flow row").to_owned();

    let out = bulkhead(&url, &token, &["explain", &id]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for says in [
        &format!("Flow {id}: 10.202.0.12 → 10.202.0.10:80/tcp"),
        "Source: xwing",
        "Destination: deathstar",
        "Ingress of deathstar (mode enforce): default deny → DROP",
        "Verdict: DROP — ingress of deathstar",
        "STALE",
        "stale: it enforces version 1 while the learner wants version 2",
    ] {
        assert!(stdout.contains(says), "missing {says:?} in:\n{stdout}");
    }

    let out = bulkhead(&url, &token, &["--json", "explain", &id]).await;
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(v["verdict"], "drop");
    assert_eq!(v["flow"]["id"].to_string(), id);

    let tuple = ["explain", "--from", "tiefighter", "--to", "deathstar", "--port", "80"];
    let out = bulkhead(&url, &token, &tuple).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("L7 (HTTP):   POST /v1/request-landing"), "{stdout}");
    assert!(stdout.contains("Verdict: PASS"), "{stdout}");
    let put = [&tuple[..], &["--method", "PUT", "--path", "/v1/exhaust-port", "--at", "5m"]].concat();
    let out = bulkhead(&url, &token, &put).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("request denied → DROP") && stdout.contains("HTTP request: PUT /v1/exhaust-port"),
        "{stdout}"
    );

    // Errors: the API's status and message, non-zero exit.
    let errors: &[(&[&str], &str)] = &[
        (&["explain", "999999999"], "404"),
        (&["explain", "--from", "xwing", "--to", "deathstar", "--port", "0"], "port must be"),
        (&["explain", "--from", "nobody", "--to", "deathstar", "--port", "80"], "names no known workload"),
        (&["explain", "--from", "web", "--to", "deathstar", "--port", "80"], "ambiguous"),
        (&["explain", "--from", "xwing", "--to", "deathstar", "--port", "80", "--at", "noon"], "--at"),
        (&["explain", "--from", "xwing", "--to", "deathstar"], "--port"),
        (&["explain"], "required"),
    ];
    for (args, says) in errors {
        let out = bulkhead(&url, &token, args).await;
        let (_, stderr) = text(&out);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(says), "{args:?} should say {says:?}: {stderr}");
    }
    serving.abort();
}
