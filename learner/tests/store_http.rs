//! The store's HTTP (L7) facts per edge (migration 0009), checked identically on SQLite
//! and PostgreSQL: what ingest keeps of the flows' request counts, opaque connections
//! and overflow, the per-edge bound on distinct paths, and that paths are data.
//! Run with the PostgreSQL URL `cargo xtask env` exports; the postgres cases fail
//! without it.

mod common;

use bulkhead_learner::store::{IngestOutcome, Store};
use bulkhead_model::{
    Direction, EdgeHttp, EdgeHttpRequest, Flow, FlowHttp, HttpRequestCount, Identity, MAX_HTTP_PATHS_PER_EDGE,
    Protocol, Verdict,
};
use common::{Fixture, batch, labels, resolved, store_cases};

store_cases!(
    requests_accumulate_per_edge_and_method_and_path,
    only_flows_with_l7_data_create_rows,
    hostile_paths_are_stored_verbatim,
    distinct_paths_are_bounded_per_edge_and_the_rest_is_overflow,
    duplicate_batches_add_nothing,
    concurrent_ingests_keep_the_bound_and_every_request,
);

/// An ingress TCP flow to :`port` seen over [`first`, `last`] with these L7 facts.
fn flow(port: u16, first: i64, last: i64, http: FlowHttp) -> Flow {
    Flow {
        src_addr: "10.0.0.1".parse().expect("ip"),
        src_port: 0,
        dst_addr: "10.0.0.2".parse().expect("ip"),
        dst_port: port,
        protocol: Protocol::Tcp,
        direction: Direction::Ingress,
        netns_ino: 4026531840,
        cgroup_id: 1,
        pid: 0,
        comm: String::new(),
        connections: 1,
        bytes_sent: 10,
        bytes_received: 100,
        packets: 4,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: first,
        last_seen_unix_ms: last,
        http,
    }
}

fn requests(pairs: &[(&str, &str, u64)]) -> FlowHttp {
    FlowHttp {
        requests: pairs
            .iter()
            .map(|(m, p, n)| HttpRequestCount { method: (*m).into(), path: (*p).into(), requests: *n })
            .collect(),
        ..FlowHttp::default()
    }
}

async fn pair(store: &Store) -> (Identity, Identity) {
    let tie = store.ensure_identity(&labels(&[("class", "tiefighter")])).await.expect("identity");
    let ds = store.ensure_identity(&labels(&[("class", "deathstar")])).await.expect("identity");
    (tie, ds)
}

async fn stored(store: &Store, flows: Vec<Flow>, seq: u64, src: Identity, dst: Identity) {
    let b = batch("node-1", seq, flows.into_iter().map(|f| resolved(f, src, dst)).collect());
    let out = store.ingest(&b).await.expect("ingest");
    assert!(matches!(out, IngestOutcome::Stored { .. }), "{out:?}");
}

async fn only(store: &Store, since: i64) -> EdgeHttp {
    let mut all = store.edge_http(since).await.expect("edge_http");
    assert_eq!(all.len(), 1, "{all:#?}");
    all.remove(0)
}

fn req(method: &str, path: &str, requests: u64, first: i64, last: i64) -> EdgeHttpRequest {
    EdgeHttpRequest {
        method: method.into(),
        path: path.into(),
        requests,
        first_seen_unix_ms: first,
        last_seen_unix_ms: last,
    }
}

// === cases ===

async fn requests_accumulate_per_edge_and_method_and_path(f: &Fixture) {
    let (tie, ds) = pair(&f.store).await;
    // Two flows of one batch on the same edge fold together (different cgroups, say).
    let a = flow(80, 1_000, 2_000, requests(&[("POST", "/v1/request-landing", 3)]));
    let b = flow(80, 1_500, 2_500, requests(&[("POST", "/v1/request-landing", 1), ("GET", "/health", 2)]));
    stored(&f.store, vec![a, b], 1, tie, ds).await;
    let later = FlowHttp { opaque_connections: 2, ..requests(&[("POST", "/v1/request-landing", 5)]) };
    stored(&f.store, vec![flow(80, 9_000, 9_500, later)], 2, tie, ds).await;

    let e = only(&f.store, 0).await;
    assert_eq!((e.key.src, e.key.dst, e.key.dst_port, e.key.protocol), (tie, ds, 80, Protocol::Tcp));
    assert_eq!(
        e.requests,
        vec![req("GET", "/health", 2, 1_500, 2_500), req("POST", "/v1/request-landing", 9, 1_000, 9_500)]
    );
    assert_eq!((e.opaque_connections, e.opaque_last_seen_unix_ms), (2, Some(9_500)));
    assert_eq!((e.overflow_requests, e.overflow_last_seen_unix_ms), (0, None));

    // `since` drops pairs not seen since; the edge's counts stay (they carry their own time).
    let e = only(&f.store, 3_000).await;
    assert_eq!(e.requests, vec![req("POST", "/v1/request-landing", 9, 1_000, 9_500)]);
    assert_eq!(e.opaque_connections, 2);

    // A reopened store (a learner restart) reads the same.
    let again = f.reopen().await;
    assert_eq!(again.edge_http(0).await.expect("edge_http")[0].requests.len(), 2);
    again.close().await;
}

async fn only_flows_with_l7_data_create_rows(f: &Fixture) {
    let (tie, ds) = pair(&f.store).await;
    let mut egress = flow(80, 1, 2, FlowHttp::default());
    egress.direction = Direction::Egress;
    stored(&f.store, vec![egress, flow(5432, 1, 2, FlowHttp::default())], 1, tie, ds).await;
    assert!(f.store.edge_http(0).await.expect("edge_http").is_empty());
    // Opaque connections alone are a fact worth keeping.
    stored(&f.store, vec![flow(443, 1, 2, FlowHttp { opaque_connections: 1, ..FlowHttp::default() })], 2, tie, ds)
        .await;
    let e = only(&f.store, 0).await;
    assert_eq!((e.key.dst_port, e.opaque_connections, e.requests.len()), (443, 1, 0));
}

async fn hostile_paths_are_stored_verbatim(f: &Fixture) {
    let (tie, ds) = pair(&f.store).await;
    // Valid rule paths (visible ASCII) that are hostile as SQL or markup.
    let nasty = [
        "/x');DELETE/**/FROM/**/edges;--",
        "/\"OR\"1\"=\"1",
        "/$1/:name/@p/&x=;",
        "/%27%3B%00/\\x00",
        "/<script>alert(1)</script>",
        "/a'||(SELECT/**/1)||'",
    ];
    let pairs: Vec<(&str, &str, u64)> = nasty.iter().map(|p| ("GET", *p, 1)).collect();
    stored(&f.store, vec![flow(80, 1, 2, requests(&pairs))], 1, tie, ds).await;
    let e = only(&f.store, 0).await;
    let mut want: Vec<&str> = nasty.to_vec();
    want.sort_unstable();
    assert_eq!(e.requests.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), want);
    // Nothing else was touched.
    assert_eq!(f.store.edges(&Default::default()).await.expect("edges").len(), 1);
}

async fn distinct_paths_are_bounded_per_edge_and_the_rest_is_overflow(f: &Fixture) {
    let (tie, ds) = pair(&f.store).await;
    // Four batches of 64 new paths each (the collector's per-flow maximum), plus what the
    // collector itself could not itemize.
    let mut sent = 0u64;
    for seq in 1..=4u64 {
        let pairs: Vec<(String, u64)> = (0..64).map(|i| (format!("/items/{seq}/{i}"), 1 + i % 3)).collect();
        sent += pairs.iter().map(|(_, n)| n).sum::<u64>();
        let refs: Vec<(&str, &str, u64)> = pairs.iter().map(|(p, n)| ("GET", p.as_str(), *n)).collect();
        let at = seq as i64 * 1_000;
        let http = FlowHttp { overflow_requests: 1, ..requests(&refs) };
        sent += 1;
        stored(&f.store, vec![flow(80, at, at + 10, http)], seq, tie, ds).await;
    }
    let e = only(&f.store, 0).await;
    assert_eq!(e.requests.len(), MAX_HTTP_PATHS_PER_EDGE);
    let kept: u64 = e.requests.iter().map(|r| r.requests).sum();
    assert_eq!(kept + e.overflow_requests, sent, "every request is either itemized or overflow");
    assert!(e.overflow_requests > 4, "the per-edge bound added overflow: {}", e.overflow_requests);
    assert_eq!(e.overflow_last_seen_unix_ms, Some(4_010));
    // The most requested of the last batch's new paths were the ones kept.
    let last_batch: Vec<&EdgeHttpRequest> = e.requests.iter().filter(|r| r.path.starts_with("/items/4/")).collect();
    assert!(!last_batch.is_empty() && last_batch.iter().all(|r| r.requests == 3), "{last_batch:?}");
    // Known paths keep counting past the bound.
    stored(&f.store, vec![flow(80, 9_000, 9_000, requests(&[("GET", "/items/1/0", 10)]))], 5, tie, ds).await;
    let e = only(&f.store, 0).await;
    assert_eq!(e.requests.iter().find(|r| r.path == "/items/1/0").expect("kept").requests, 11);
}

async fn duplicate_batches_add_nothing(f: &Fixture) {
    let (tie, ds) = pair(&f.store).await;
    let b = batch(
        "node-1",
        1,
        vec![resolved(flow(80, 1, 2, FlowHttp { opaque_connections: 1, ..requests(&[("GET", "/", 4)]) }), tie, ds)],
    );
    assert!(matches!(f.store.ingest(&b).await.expect("ingest"), IngestOutcome::Stored { .. }));
    assert_eq!(f.store.ingest(&b).await.expect("again"), IngestOutcome::Duplicate);
    let e = only(&f.store, 0).await;
    assert_eq!((e.requests[0].requests, e.opaque_connections), (4, 1));
}

async fn concurrent_ingests_keep_the_bound_and_every_request(f: &Fixture) {
    let (tie, ds) = pair(&f.store).await;
    const TASKS: u64 = 4;
    const BATCHES: u64 = 3;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let store = f.store.clone();
        handles.push(tokio::spawn(async move {
            for seq in 1..=BATCHES {
                let paths: Vec<String> = (0..30).map(|i| format!("/t{t}/b{seq}/{i}")).collect();
                let mut refs: Vec<(&str, &str, u64)> = paths.iter().map(|p| ("GET", p.as_str(), 1)).collect();
                refs.push(("GET", "/shared", 1));
                let b = bulkhead_learner::store::IngestBatch {
                    node_id: format!("node-{t}"),
                    ..batch("x", seq, vec![resolved(flow(80, 1, 2, requests(&refs)), tie, ds)])
                };
                assert!(matches!(store.ingest(&b).await.expect("ingest"), IngestOutcome::Stored { .. }));
            }
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    let e = only(&f.store, 0).await;
    // 4 × 3 × 31 requests over 361 distinct paths: exactly the bound kept, none lost.
    assert_eq!(e.requests.len(), MAX_HTTP_PATHS_PER_EDGE);
    let kept: u64 = e.requests.iter().map(|r| r.requests).sum();
    assert_eq!(kept + e.overflow_requests, TASKS * BATCHES * 31);
    assert_eq!(e.requests.iter().find(|r| r.path == "/shared").expect("shared path").requests, TASKS * BATCHES);
}
