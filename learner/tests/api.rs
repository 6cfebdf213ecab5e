//! `/api/v1` handlers through the real router (`oneshot`), over a SQLite store that
//! holds one ingested batch.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_learner::auth::Role;
use bulkhead_learner::store::{IngestBatch, ResolvedFlow, Store};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::{Direction, Flow, Identity, Labels, Protocol, Verdict};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The seeded store and a viewer's API token for it.
struct Api {
    store: Store,
    token: String,
}

async fn seeded() -> (Api, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&format!("sqlite://{}", dir.path().join("api.db").display())).await.expect("store");
    let a = store.ensure_identity(&Labels::new([("app", "a<script>alert(1)</script>")]).expect("labels")).await;
    let b = store.ensure_identity(&Labels::new([("app", "b")]).expect("labels")).await;
    let (a, b) = (a.expect("identity"), b.expect("identity"));
    let flow = Flow {
        src_addr: "10.0.0.1".parse().expect("ip"),
        src_port: 0,
        dst_addr: "10.0.0.2".parse().expect("ip"),
        dst_port: 80,
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
        netns_ino: 1,
        cgroup_id: 0,
        pid: 7,
        comm: "curl".into(),
        connections: 2,
        bytes_sent: 10,
        bytes_received: 20,
        packets: 3,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: 1_000,
        last_seen_unix_ms: 2_000,
        http: Default::default(),
    };
    store.register_agent("n1", 1).await.expect("agent");
    let batch = IngestBatch {
        node_id: "n1".into(),
        boot_id: "b".into(),
        seq: 1,
        received_unix_ms: 3_000,
        flows: vec![ResolvedFlow { flow, src_identity: a, dst_identity: b }],
        endpoints: None,
        dns_answers: vec![bulkhead_model::DnsAnswer {
            netns_ino: 1,
            name: "api.example.com".into(),
            addr: "192.0.2.10".parse().expect("ip"),
            ttl_seconds: 300,
            seen_unix_ms: 2_500,
        }],
        loss: Default::default(),
    };
    store.ingest(&batch).await.expect("ingest");
    let (token, _) = store.create_token_user("viewer", Role::Viewer, "api-test", "test", 1).await.expect("token");
    (Api { store, token: token.expose().to_owned() }, dir)
}

async fn get(api: &Api, uri: &str) -> (StatusCode, serde_json::Value) {
    let req = Request::get(uri).header("authorization", format!("Bearer {}", api.token));
    let resp = router(AppState::for_store(api.store.clone()))
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn edges_and_flows_are_served_as_json() {
    let (api, _d) = seeded().await;
    let (status, edges) = get(&api, "/api/v1/edges").await;
    assert_eq!(status, StatusCode::OK);
    let e = &edges[0];
    assert_eq!(e["dst_port"], 80);
    assert_eq!(e["protocol"], "tcp");
    assert_eq!(e["connections"], 2);
    assert_eq!(e["connections_egress"], 2);
    // JSON carries label values verbatim; escaping is the renderer's job.
    assert_eq!(e["src_labels"]["app"], "a<script>alert(1)</script>");

    let (status, flows) = get(&api, "/api/v1/flows?limit=10&port=80").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(flows.as_array().map(Vec::len), Some(1));
    assert_eq!(flows[0]["flow"]["comm"], "curl");
    let (_, none) = get(&api, "/api/v1/flows?port=81").await;
    assert_eq!(none.as_array().map(Vec::len), Some(0));
}

#[tokio::test]
async fn identities_include_reserved_ones() {
    let (api, _d) = seeded().await;
    let (status, ids) = get(&api, "/api/v1/identities").await;
    assert_eq!(status, StatusCode::OK);
    let ids = ids.as_array().expect("array");
    assert!(ids.iter().any(|i| i["id"] == Identity::WORLD.0), "{ids:?}");
    assert!(ids.iter().any(|i| i["labels"]["app"] == "b"));
    let (status, agents) = get(&api, "/api/v1/agents").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agents[0]["node_id"], "n1");
}

#[tokio::test]
async fn bad_parameters_are_400_with_a_reason() {
    let (api, _d) = seeded().await;
    for uri in ["/api/v1/flows?limit=0", "/api/v1/flows?limit=99999999", "/api/v1/edges?limit=0"] {
        let (status, body) = get(&api, uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(body["error"].as_str().is_some_and(|m| m.contains("limit")), "{uri}: {body}");
    }
    let (status, _) = get(&api, "/api/v1/flows?port=notaport").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = get(&api, "/api/v1/edges?identity=-1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn dns_answers_are_served() {
    let (api, _d) = seeded().await;
    let (status, dns) = get(&api, "/api/v1/dns").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(dns[0]["name"], "api.example.com");
    assert_eq!(dns[0]["addr"], "192.0.2.10");
    assert_eq!(dns[0]["ttl_seconds"], 300);
    let (_, none) = get(&api, "/api/v1/dns?since_ms=9999999999999").await;
    assert_eq!(none.as_array().map(Vec::len), Some(0));
}
