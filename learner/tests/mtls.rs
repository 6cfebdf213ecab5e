//! mTLS between agents and the learner, over real TLS on 127.0.0.1: an in-process
//! learner that requires client certificates, clients built with the agents' own
//! transport code (`bulkhead_proto::tls`). A node certificate streams flows and
//! receives policy as its node; no certificate, another CA's, an expired one, and a
//! certificate for node X claiming node Y are each refused — at the client, and in
//! the learner's log (captured here) with the peer's address. Plus `bulkhead certs`
//! (the real binary) and the learner binary's refusal to serve plaintext unasked.

mod pki;

mod common;

use std::error::Error as _;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bulkhead_learner::certs::{Ca, Validity};
use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::server::{self, Running, ServerConfig};
use bulkhead_learner::store::FlowQuery;
use bulkhead_model::{EnforcerHello, EnforcerMessage, PolicyUpdate};
use bulkhead_proto::tls::{AgentTlsArgs, AgentTransport, ServerTlsFiles, node_identity, server_config};
use bulkhead_proto::v1::{
    self, flow_ingest_client::FlowIngestClient, ingest_response, policy_stream_client::PolicyStreamClient,
};
use bulkhead_testkit::assert_eventually_async;
use bulkhead_testkit::error_chain as chain;
use common::{wire_batch, wire_hello};
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::extensions::GeneralName;

use pki::Pki;

const TIMEOUT: Duration = Duration::from_secs(20);

// === fixtures ===

/// A learner that requires client certificates from `pki`'s CA.
async fn mtls_learner(pki: &Pki, enrollment: Enrollment) -> Running {
    let tls = server_config(&pki.server_files()).expect("server TLS config");
    server::start(ServerConfig {
        db_url: format!("sqlite://{}", pki.path("learner.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: None,
        enrollment,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: Some(tls),
    })
    .await
    .expect("learner starts")
}

fn url(r: &Running) -> String {
    format!("https://{}", r.grpc_addr)
}

/// The learner's log, captured for the current thread (tokio tests run on one).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }

    /// A line holding every one of `parts`.
    fn line_with(&self, parts: &[&str]) -> Option<String> {
        self.text().lines().find(|l| parts.iter().all(|p| l.contains(p))).map(str::to_owned)
    }

    async fn wait_for(&self, parts: &[&str]) -> String {
        assert_eventually_async!(
            TIMEOUT,
            async || self.line_with(parts).is_some(),
            "the learner logs a line with {parts:?}; log:\n{}",
            self.text()
        );
        self.line_with(parts).expect("just seen")
    }
}

/// How an attempt to stream ended.
#[derive(Debug)]
enum Outcome {
    /// The stream was admitted: Hello answered.
    Admitted,
    /// The connection failed (TLS refused before any request).
    ConnectFailed(String),
    /// The request failed with this status (its causes appended).
    Refused(Code, String),
}

async fn connect(transport: &AgentTransport, url: &str) -> Result<Channel, String> {
    transport.connect(url).await.map_err(|e| chain(&e))
}

fn refused(status: tonic::Status) -> Outcome {
    Outcome::Refused(
        status.code(),
        format!("{}{}", status.message(), status.source().map(|s| format!(": {}", chain(s))).unwrap_or_default()),
    )
}

/// A FlowIngest stream on `channel` claiming `node`: the Hello, then (when admitted)
/// one batch naming `batch_node`, whose ack status is returned.
async fn ingest(channel: Result<Channel, String>, node: &str, batch_node: &str) -> (Outcome, Option<v1::AckStatus>) {
    let channel = match channel {
        Ok(c) => c,
        Err(e) => return (Outcome::ConnectFailed(e), None),
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(wire_hello(node, "boot-1")).await.expect("queue hello");
    let mut responses = match FlowIngestClient::new(channel).ingest(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (refused(status), None),
    };
    match responses.next().await {
        Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Welcome(_)) })) => {}
        Some(Err(status)) => return (refused(status), None),
        other => panic!("expected a Welcome, got {other:?}"),
    }
    tx.send(wire_batch(batch_node, "boot-1", 1)).await.expect("queue batch");
    let ack = match responses.next().await {
        Some(Ok(v1::IngestResponse { msg: Some(ingest_response::Msg::Ack(a)) })) => a,
        other => panic!("expected an ack, got {other:?}"),
    };
    (Outcome::Admitted, Some(v1::AckStatus::try_from(ack.status).expect("known ack status")))
}

/// A PolicyStream claiming `node`; admitted means a first snapshot arrived.
async fn subscribe(channel: Result<Channel, String>, node: &str) -> Outcome {
    let channel = match channel {
        Ok(c) => c,
        Err(e) => return Outcome::ConnectFailed(e),
    };
    let (tx, rx) = mpsc::channel(4);
    let hello = EnforcerMessage::Hello(EnforcerHello {
        node_id: node.into(),
        boot_id: "boot-1".into(),
        agent_version: "test".into(),
        applied_version: 0,
    });
    tx.send((&hello).into()).await.expect("queue hello");
    let mut updates = match PolicyStreamClient::new(channel).subscribe(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return refused(status),
    };
    match updates.message().await {
        Ok(Some(update)) => {
            let update = PolicyUpdate::try_from(update).expect("a valid update");
            assert!(matches!(update, PolicyUpdate::Snapshot(_)), "a stream starts with a snapshot: {update:?}");
            Outcome::Admitted
        }
        Ok(None) => panic!("the policy stream ended without a snapshot"),
        Err(status) => refused(status),
    }
}

// === admitted ===

#[tokio::test]
async fn a_node_certificate_streams_flows_and_policy_as_its_node() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let r = mtls_learner(&pki, Enrollment::Open).await;
    let transport = pki.node("node-a").transport(&url(&r)).expect("agent transport");

    let (outcome, ack) = ingest(connect(&transport, &url(&r)).await, "node-a", "node-a").await;
    assert!(matches!(outcome, Outcome::Admitted), "{outcome:?}");
    assert_eq!(ack, Some(v1::AckStatus::Stored));
    let q = FlowQuery {
        since_unix_ms: None,
        until_unix_ms: None,
        node_id: Some("node-a".into()),
        identity: None,
        dst_port: None,
        limit: 10,
        before_id: None,
    };
    let flows = r.store.flows(&q).await.expect("flows");
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].node_id.as_str(), flows[0].flow.connections), ("node-a", 3));

    let outcome = subscribe(connect(&transport, &url(&r)).await, "node-a").await;
    assert!(matches!(outcome, Outcome::Admitted), "{outcome:?}");
    assert!(logs.line_with(&["Refused"]).is_none(), "nothing refused:\n{}", logs.text());
    r.abort();
}

// === refused after the handshake: the claim ===

#[tokio::test]
async fn a_certificate_for_one_node_cannot_speak_for_another() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let r = mtls_learner(&pki, Enrollment::Open).await;
    let transport = pki.node("node-x").transport(&url(&r)).expect("agent transport");

    let (outcome, _) = ingest(connect(&transport, &url(&r)).await, "node-y", "node-y").await;
    let Outcome::Refused(Code::PermissionDenied, msg) = &outcome else { panic!("flow ingest: {outcome:?}") };
    assert!(msg.contains("\"node-x\"") && msg.contains("\"node-y\""), "{msg}");
    let line = logs.wait_for(&["Refused an agent stream", "claimed=node-y", "certificate=node-x", "flow ingest"]).await;
    assert!(line.contains("WARN") && line.contains("peer=127.0.0.1:"), "{line}");

    let outcome = subscribe(connect(&transport, &url(&r)).await, "node-y").await;
    assert!(matches!(outcome, Outcome::Refused(Code::PermissionDenied, _)), "policy stream: {outcome:?}");
    logs.wait_for(&[
        "Refused an agent stream",
        "claimed=node-y",
        "certificate=node-x",
        "policy stream",
        "peer=127.0.0.1:",
    ])
    .await;

    // Nothing was recorded for the claimed node; a batch naming another node on an
    // admitted stream is rejected as before.
    let agents = r.store.agents().await.expect("agents");
    assert!(agents.iter().all(|a| a.node_id != "node-y"), "{agents:?}");
    let (outcome, ack) = ingest(connect(&transport, &url(&r)).await, "node-x", "node-y").await;
    assert!(matches!(outcome, Outcome::Admitted), "{outcome:?}");
    assert_eq!(ack, Some(v1::AckStatus::Rejected));
    r.abort();
}

#[tokio::test]
async fn closed_enrollment_still_applies_to_certified_nodes() {
    let (_logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let r = mtls_learner(&pki, Enrollment::Closed).await;
    let transport = pki.node("node-c").transport(&url(&r)).expect("agent transport");
    let (outcome, _) = ingest(connect(&transport, &url(&r)).await, "node-c", "node-c").await;
    let Outcome::Refused(Code::PermissionDenied, msg) = &outcome else { panic!("{outcome:?}") };
    assert!(msg.contains("not registered"), "{msg}");

    r.store.register_agent("node-c", 1).await.expect("register");
    let (outcome, ack) = ingest(connect(&transport, &url(&r)).await, "node-c", "node-c").await;
    assert!(matches!(outcome, Outcome::Admitted) && ack == Some(v1::AckStatus::Stored), "{outcome:?} {ack:?}");
    r.abort();
}

// === refused in the handshake ===

/// What a client may see when the learner refuses its certificate. In TLS 1.3 the
/// client's side of the handshake is over before the server has checked the client
/// certificate, so the client usually reads the learner's alert, but may instead find
/// the connection already closed while it writes; the precise reason is the learner's
/// to log.
const CONNECTION_BROKEN: [&str; 4] = ["broken pipe", "connection reset", "operation was canceled", "connection closed"];

fn refused_in_handshake(outcome: &Outcome, alert: &str) -> Result<(), String> {
    let text = match outcome {
        Outcome::ConnectFailed(e) | Outcome::Refused(Code::Unavailable | Code::Unknown | Code::Cancelled, e) => e,
        other => return Err(format!("expected a refused handshake, got {other:?}")),
    };
    if text.contains(alert) || CONNECTION_BROKEN.iter().any(|b| text.contains(b)) {
        Ok(())
    } else {
        Err(format!("the client's error names neither the alert {alert:?} nor a closed connection: {text}"))
    }
}

/// The client sees its connection or its first request fail (see
/// [`refused_in_handshake`]); the learner logs the refusal with the peer's address
/// and the reason.
async fn assert_handshake_refused(logs: &Logs, r: &Running, transport: &AgentTransport, alert: &str, reason: &str) {
    for stream in ["flow ingest", "policy stream"] {
        let outcome = match stream {
            "flow ingest" => ingest(connect(transport, &url(r)).await, "node-a", "node-a").await.0,
            _ => subscribe(connect(transport, &url(r)).await, "node-a").await,
        };
        refused_in_handshake(&outcome, alert).unwrap_or_else(|e| panic!("{stream} ({reason}): {e}"));
    }
    let line = logs.wait_for(&["Refused a gRPC connection: TLS handshake failed.", reason]).await;
    assert!(line.contains("WARN") && line.contains("peer=127.0.0.1:"), "{line}");
}

#[tokio::test]
async fn a_client_without_certificate_is_refused_and_logged() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let r = mtls_learner(&pki, Enrollment::Open).await;
    let ca = std::fs::read(pki.path("ca.crt")).expect("read CA");
    let no_cert = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    for stream in ["flow ingest", "policy stream"] {
        let channel = match Endpoint::from_shared(url(&r)).expect("url").tls_config(no_cert.clone()) {
            Ok(e) => e.connect().await.map_err(|e| chain(&e)),
            Err(e) => panic!("tls config: {e}"),
        };
        let outcome = match stream {
            "flow ingest" => ingest(channel, "node-a", "node-a").await.0,
            _ => subscribe(channel, "node-a").await,
        };
        refused_in_handshake(&outcome, "CertificateRequired").unwrap_or_else(|e| panic!("{stream}: {e}"));
    }
    let line = logs.wait_for(&["Refused a gRPC connection: TLS handshake failed.", "peer sent no certificates"]).await;
    assert!(line.contains("WARN") && line.contains("peer=127.0.0.1:"), "{line}");
    r.abort();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_and_logged() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let r = mtls_learner(&pki, Enrollment::Open).await;
    // The same name as ours, as two runs of `bulkhead certs ca` would give.
    let other_ca = Ca::generate("Test CA", Validity::days_from_now(30)).expect("other CA");
    let foreign = other_ca.node("node-a", Validity::days_from_now(1)).expect("cert");
    let transport = pki.agent_args("foreign", &foreign).transport(&url(&r)).expect("agent transport");
    assert_handshake_refused(&logs, &r, &transport, "UnknownCA", "UnknownIssuer").await;
    r.abort();
}

#[tokio::test]
async fn an_expired_certificate_is_refused_and_logged() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let r = mtls_learner(&pki, Enrollment::Open).await;
    let now = SystemTime::now();
    let past = Validity { not_before: now - Duration::from_secs(7200), not_after: now - Duration::from_secs(3600) };
    let expired = pki.ca.node("node-a", past).expect("cert");
    let transport = pki.agent_args("expired", &expired).transport(&url(&r)).expect("agent transport");
    assert!(matches!(transport, AgentTransport::Tls { currently_valid: false, .. }));
    assert_handshake_refused(&logs, &r, &transport, "CertificateExpired", "certificate expired").await;

    // The learner goes on serving good nodes.
    let good = pki.node("node-a").transport(&url(&r)).expect("agent transport");
    let (outcome, _) = ingest(connect(&good, &url(&r)).await, "node-a", "node-a").await;
    assert!(matches!(outcome, Outcome::Admitted), "{outcome:?}");
    r.abort();
}

#[tokio::test]
async fn plaintext_against_the_tls_port_is_refused_and_logged() {
    let (logs, _guard) = Logs::capture();
    let pki = Pki::new();
    let r = mtls_learner(&pki, Enrollment::Open).await;
    let plain = format!("http://{}", r.grpc_addr);
    let (outcome, _) = ingest(connect(&AgentTransport::Insecure, &plain).await, "node-a", "node-a").await;
    assert!(!matches!(outcome, Outcome::Admitted), "{outcome:?}");
    let line = logs.wait_for(&["Refused a gRPC connection: TLS handshake failed."]).await;
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    r.abort();
}

// === the binaries ===

fn run(bin: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin).args(args).output().unwrap_or_else(|e| panic!("run {bin}: {e}"))
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test]
async fn bulkhead_certs_mints_files_an_mtls_learner_and_agent_accept() {
    let (_logs, _guard) = Logs::capture();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("pki");
    let d = dir.to_str().expect("utf-8 path");
    let cli = env!("CARGO_BIN_EXE_bulkhead");

    let out = run(cli, &["certs", "ca", "--dir", d]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(cli, &["certs", "learner", "--dir", d, "--san", "learner.bulkhead.svc", "--san", "127.0.0.1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(cli, &["certs", "node", "--dir", d, "node-1", "node-2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("PRIVATE KEY"), "keys are never printed: {}", text(&out));
    assert!(text(&out).contains("SHA-256 fingerprint"), "{}", text(&out));

    let mode = |name: &str| std::fs::metadata(dir.join(name)).expect(name).permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o700);
    for (name, want) in [
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("learner.crt", 0o644),
        ("learner.key", 0o600),
        ("node-node-1.crt", 0o644),
        ("node-node-1.key", 0o600),
        ("node-node-2.crt", 0o644),
        ("node-node-2.key", 0o600),
    ] {
        assert_eq!(mode(name), want, "{name}");
    }

    // The SANs parse: the learner's names, the node's identity.
    let pem = std::fs::read(dir.join("learner.crt")).expect("read");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    let x509 = pem.parse_x509().expect("X.509");
    let sans: Vec<String> = x509
        .subject_alternative_name()
        .expect("unique")
        .expect("SAN")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress([a, b, c, d]) => format!("IP:{}", std::net::Ipv4Addr::new(*a, *b, *c, *d)),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["DNS:learner.bulkhead.svc", "IP:127.0.0.1"]);
    let pem = std::fs::read(dir.join("node-node-2.crt")).expect("read");
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("PEM");
    assert_eq!(node_identity(&pem.contents.clone().into()).expect("node identity"), "node-2");

    // Existing files are kept unless --force.
    let before = std::fs::read(dir.join("ca.key")).expect("read");
    let out = run(cli, &["certs", "ca", "--dir", d]);
    assert!(!out.status.success(), "overwrote the CA: {}", text(&out));
    assert!(text(&out).contains("--force"), "{}", text(&out));
    assert_eq!(std::fs::read(dir.join("ca.key")).expect("read"), before);
    let out = run(cli, &["certs", "node", "--dir", d, "node-2", "node-3"]);
    assert!(!out.status.success() && !dir.join("node-node-3.crt").exists(), "{}", text(&out));
    let out = run(cli, &["certs", "node", "--dir", d, "--force", "node-2"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(cli, &["certs", "node", "--dir", d, "bad/name"]);
    assert!(!out.status.success() && text(&out).contains("not usable"), "{}", text(&out));

    // And they work: the learner serves with them, a node connects with its pair.
    let tls = server_config(&ServerTlsFiles {
        cert: dir.join("learner.crt"),
        key: dir.join("learner.key"),
        client_ca: dir.join("ca.crt"),
    })
    .expect("server TLS config from the CLI's files");
    let r = server::start(ServerConfig {
        db_url: format!("sqlite://{}", tmp.path().join("learner.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: None,
        enrollment: Enrollment::Open,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: Some(tls),
    })
    .await
    .expect("learner starts");
    let args = AgentTlsArgs {
        tls_cert: Some(dir.join("node-node-1.crt")),
        tls_key: Some(dir.join("node-node-1.key")),
        tls_ca: Some(dir.join("ca.crt")),
        insecure_grpc: false,
    };
    let transport = args.transport(&url(&r)).expect("agent transport");
    assert_eq!(transport.node_id(None).expect("node"), Some("node-1".to_owned()));
    let (outcome, ack) = ingest(connect(&transport, &url(&r)).await, "node-1", "node-1").await;
    assert!(matches!(outcome, Outcome::Admitted) && ack == Some(v1::AckStatus::Stored), "{outcome:?}");
    r.abort();
}

#[test]
fn the_learner_refuses_to_serve_plaintext_unless_asked() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = format!("sqlite://{}", tmp.path().join("learner.db").display());
    let learner = env!("CARGO_BIN_EXE_bulkhead-learner");
    let base = ["--db", &db, "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];

    let out = run(learner, &base);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("refusing to serve agents' gRPC in plaintext"), "{}", text(&out));
    assert!(text(&out).contains("--insecure-grpc"), "{}", text(&out));

    let partial = [&base[..], &["--tls-cert", "/nonexistent.crt"]].concat();
    let out = run(learner, &partial);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("missing --tls-key, --tls-client-ca"), "{}", text(&out));

    let both =
        [&base[..], &["--insecure-grpc", "--tls-cert", "/x", "--tls-key", "/y", "--tls-client-ca", "/z"]].concat();
    let out = run(learner, &both);
    assert!(!out.status.success() && text(&out).contains("exclude each other"), "{}", text(&out));

    let missing = [&base[..], &["--tls-cert", "/nonexistent.crt", "--tls-key", "/y", "--tls-client-ca", "/z"]].concat();
    let out = run(learner, &missing);
    assert!(!out.status.success() && text(&out).contains("/nonexistent.crt"), "{}", text(&out));
}
