//! The learner's Prometheus metrics, from the real binary: `--metrics-listen` serves
//! `/metrics` on a listener of its own, and the counters move when a collector streams
//! batches, an enforcer connects, applies and reports, and the UI is asked. The UI
//! port does not serve them.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bulkhead_model::{EnforcerHello, EnforcerMessage, Identity, PolicyAck, PolicyAckStatus, Protocol, Verdict};
use bulkhead_proto::v1::{
    self, flow_ingest_client::FlowIngestClient, ingest_response, policy_stream_client::PolicyStreamClient,
};
use bulkhead_testkit::assert_eventually_async;
use common::{wire_batch, wire_hello};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

const TIMEOUT: Duration = Duration::from_secs(20);
const NODE: &str = "node-1";

/// A running `bulkhead-learner` (killed on drop) and the addresses it bound.
struct Learner {
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
    grpc: SocketAddr,
    http: SocketAddr,
    metrics: SocketAddr,
}

/// Starts the binary on port 0 everywhere and reads the bound addresses from its JSON
/// log; the rest of the log is drained (and echoed for a failing test's output).
async fn start() -> Learner {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-learner"))
        .arg(format!("--db=sqlite://{}", dir.path().join("learner.db").display()))
        .args(["--grpc-listen=127.0.0.1:0", "--http-listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0"])
        .args(["--insecure-grpc", "--log-format=json", "--synthesize-every-minutes=0"])
        .env("BULKHEAD_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starts bulkhead-learner");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let addr = |v: &serde_json::Value, field: &str| -> SocketAddr {
        v["fields"][field].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{field} in {v}"))
    };
    let (mut grpc, mut http, mut metrics) = (None, None, None);
    let found = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.expect("reads the log") {
            eprintln!("{line}");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            match v["fields"]["message"].as_str() {
                Some("Learner serving.") => {
                    grpc = Some(addr(&v, "grpc_addr"));
                    http = Some(addr(&v, "http_addr"));
                }
                Some("Serving metrics.") => metrics = Some(addr(&v, "addr")),
                _ => {}
            }
            if grpc.is_some() && metrics.is_some() {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "the learner logs its listeners (and keeps running)");
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
        }
    });
    let (grpc, http, metrics) = (grpc.expect("grpc"), http.expect("http"), metrics.expect("metrics"));
    Learner { _child: child, _dir: dir, grpc, http, metrics }
}

async fn scrape(addr: SocketAddr) -> String {
    let resp = reqwest::get(format!("http://{addr}/metrics")).await.expect("scrapes");
    assert!(resp.status().is_success(), "{}", resp.status());
    resp.text().await.expect("body")
}

/// The value of the sample `series` (name with labels, as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the scraped `series` has the value `want`.
async fn wait_for(l: &Learner, series: &str, want: f64) {
    let mut last = String::new();
    assert_eventually_async!(
        TIMEOUT,
        async || {
            last = scrape(l.metrics).await;
            sample(&last, series) == Some(want)
        },
        "{series} == {want}"
    );
}

#[tokio::test]
async fn metrics_move_with_ingest_enforcers_and_the_ui() {
    let l = start().await;
    let first = scrape(l.metrics).await;
    for help in ["ingest_batches", "enforcers_out_of_sync", "report_backlog_dropped", "store_errors"] {
        assert!(first.contains(&format!("# HELP bulkhead_learner_{help} ")), "{help}: {first}");
    }

    // A collector: one stored batch, its resend, and one naming another node.
    let mut client = FlowIngestClient::connect(format!("http://{}", l.grpc)).await.expect("connects");
    let (tx, rx) = mpsc::channel(8);
    tx.send(wire_hello(NODE, "boot-a")).await.expect("hello");
    let mut acks = client.ingest(ReceiverStream::new(rx)).await.expect("admitted").into_inner();
    assert!(matches!(acks.next().await, Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Welcome(_)) }))));
    wait_for(&l, "bulkhead_learner_collector_streams", 1.0).await;
    for (request, want) in [
        (wire_batch(NODE, "boot-a", 1), v1::AckStatus::Stored),
        (wire_batch(NODE, "boot-a", 1), v1::AckStatus::Duplicate),
        (wire_batch("node-2", "boot-a", 2), v1::AckStatus::Rejected),
    ] {
        tx.send(request).await.expect("batch");
        match acks.next().await {
            Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Ack(a)) })) => {
                assert_eq!(a.status, want as i32, "{a:?}")
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let text = scrape(l.metrics).await;
    for outcome in ["stored", "duplicate", "rejected"] {
        let series = format!("bulkhead_learner_ingest_batches_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&text, &series), Some(1.0), "{series}: {text}");
    }
    assert_eq!(sample(&text, "bulkhead_learner_ingest_flows_stored_total"), Some(1.0), "{text}");
    drop((tx, acks));
    wait_for(&l, "bulkhead_learner_collector_streams", 0.0).await;

    // An enforcer: out of sync until it acks its snapshot, then it reports an event.
    let mut client = PolicyStreamClient::connect(format!("http://{}", l.grpc)).await.expect("connects");
    let (tx, rx) = mpsc::channel(8);
    let hello = EnforcerHello {
        node_id: NODE.into(),
        boot_id: "boot-e".into(),
        agent_version: "test".into(),
        applied_version: 0,
    };
    tx.send((&EnforcerMessage::Hello(hello)).into()).await.expect("hello");
    let mut updates = client.subscribe(ReceiverStream::new(rx)).await.expect("subscribes").into_inner();
    wait_for(&l, "bulkhead_learner_enforcer_streams", 1.0).await;
    // The first snapshot comes after the learner's first compilation.
    let snapshot = updates.message().await.expect("stream ok").expect("a snapshot");
    let version = bulkhead_model::NodePolicy::try_from(snapshot).expect("valid snapshot").version;
    let text = scrape(l.metrics).await;
    assert!(sample(&text, "bulkhead_learner_policy_compiles_total").is_some_and(|n| n >= 1.0), "{text}");
    assert!(
        sample(&text, "bulkhead_learner_policy_compile_last_success_timestamp_seconds").is_some_and(|t| t > 0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "bulkhead_learner_enforcer_nodes_connected"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "bulkhead_learner_enforcers_out_of_sync"), Some(1.0), "not applied yet: {text}");
    let ack = EnforcerMessage::Ack(PolicyAck { version, status: PolicyAckStatus::Applied, error: None });
    tx.send((&ack).into()).await.expect("ack");
    wait_for(&l, "bulkhead_learner_enforcers_out_of_sync", 0.0).await;
    let event = bulkhead_model::node_policy::VerdictEvent {
        time_unix_ms: bulkhead_learner::grpc::ingest::unix_ms(),
        cgroup_id: 0,
        netns_ino: 11,
        local_identity: Identity::WORLD,
        peer_identity: Identity::WORLD,
        local_addr: "10.202.0.10".parse().expect("ip"),
        local_port: 80,
        peer_addr: "10.202.0.12".parse().expect("ip"),
        peer_port: 40000,
        protocol: Protocol::Tcp,
        direction: bulkhead_model::Direction::Ingress,
        verdict: Verdict::Audit,
        rule_id: None,
        suppressed: 0,
        http: None,
    };
    let report = EnforcerMessage::Report(bulkhead_model::node_policy::VerdictReport {
        policy_version: version,
        events: vec![event],
        rule_counters: vec![],
        loss: Default::default(),
        sent_unix_ms: 0,
    });
    tx.send((&report).into()).await.expect("report");
    wait_for(&l, "bulkhead_learner_verdict_events_recorded_total", 1.0).await;
    drop((tx, updates));
    wait_for(&l, "bulkhead_learner_enforcer_streams", 0.0).await;
    wait_for(&l, "bulkhead_learner_enforcer_nodes_connected", 0.0).await;

    // The UI port: counted by route and status class, and no metrics there.
    let ui = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let health = ui.get(format!("http://{}/healthz", l.http)).send().await.expect("healthz");
    assert!(health.status().is_success());
    let api = ui.get(format!("http://{}/api/v1/proposals", l.http)).send().await.expect("api");
    assert_eq!(api.status(), reqwest::StatusCode::UNAUTHORIZED);
    let on_ui = ui.get(format!("http://{}/metrics", l.http)).send().await.expect("ui /metrics");
    assert!(!on_ui.status().is_success(), "the UI port must not serve metrics: {}", on_ui.status());
    let body = on_ui.text().await.expect("body");
    assert!(!body.contains("bulkhead_learner_"), "{body}");
    let text = scrape(l.metrics).await;
    let http = |class: &str, status: &str| {
        sample(&text, &format!("bulkhead_learner_http_requests_total{{class=\"{class}\",status=\"{status}\"}}"))
    };
    assert_eq!(http("health", "2xx"), Some(1.0), "{text}");
    assert_eq!(http("api", "4xx"), Some(1.0), "{text}");
    assert!(http("page", "2xx").is_none(), "/metrics on the UI port is not a success: {text}");
    assert!(!text.contains("/api/v1/proposals"), "no raw paths in labels: {text}");
}
