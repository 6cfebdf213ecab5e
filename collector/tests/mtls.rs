//! The real `bulkhead-collector` binary against an in-process learner that requires
//! client certificates: with its node certificate (no `--node-id`: the certificate
//! names the node) its flows and endpoints arrive under that node (root: real eBPF,
//! two workloads in network namespaces). Without TLS files and without
//! `--insecure-grpc`, or with a `--node-id` its certificate contradicts, it refuses
//! to start and says why (no root needed: this is checked before eBPF is loaded).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bulkhead_learner::certs::{self, Ca, Validity};
use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::server::{self, Running, ServerConfig};
use bulkhead_learner::store::FlowQuery;
use bulkhead_proto::tls::{ServerTlsFiles, server_config};
use bulkhead_testkit::assert_eventually_async;
use bulkhead_testkit::netns::{ChildGuard, TestNet, require_root};

const WAIT: Duration = Duration::from_secs(60);
const NODE: &str = "node-mtls";
const PORT: u16 = 8081;

/// CA, learner certificate for 127.0.0.1 and the node's certificate, in `dir`.
fn mint(dir: &Path) -> PathBuf {
    let ca = Ca::generate("Test CA", Validity::days_from_now(1)).expect("CA");
    let learner = ca.learner(&["127.0.0.1".to_owned()], Validity::days_from_now(1)).expect("learner cert");
    let node = ca.node(NODE, Validity::days_from_now(1)).expect("node cert");
    let (node_crt, node_key) = certs::node_files(NODE);
    let files = [
        certs::OutputFile { name: "ca.crt".into(), contents: &ca.minted().cert_pem, secret: false },
        certs::OutputFile { name: "learner.crt".into(), contents: &learner.cert_pem, secret: false },
        certs::OutputFile { name: "learner.key".into(), contents: learner.key_pem(), secret: true },
        certs::OutputFile { name: node_crt, contents: &node.cert_pem, secret: false },
        certs::OutputFile { name: node_key, contents: node.key_pem(), secret: true },
    ];
    let pki = dir.join("pki");
    certs::write_files(&pki, &files, false).expect("write certificates");
    pki
}

async fn mtls_learner(dir: &Path, pki: &Path, inventory: Option<PathBuf>) -> Running {
    let tls = server_config(&ServerTlsFiles {
        cert: pki.join("learner.crt"),
        key: pki.join("learner.key"),
        client_ca: pki.join("ca.crt"),
    })
    .expect("server TLS config");
    server::start(ServerConfig {
        db_url: format!("sqlite://{}", dir.join("learner.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory,
        enrollment: Enrollment::Open,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: Some(tls),
    })
    .await
    .expect("learner starts")
}

fn tls_args(pki: &Path) -> Vec<String> {
    let (crt, key) = certs::node_files(NODE);
    let path = |name: &str| pki.join(name).to_string_lossy().into_owned();
    vec!["--tls-cert".into(), path(&crt), "--tls-key".into(), path(&key), "--tls-ca".into(), path("ca.crt")]
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("collector.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn collector_streams_over_mtls_as_the_node_its_certificate_names() {
    require_root();
    let net = TestNet::new(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = mint(dir.path());
    let inventory = dir.path().join("inventory.yaml");
    let mut inv = String::from("workloads:\n");
    for (host, app) in net.hosts().iter().zip(["client", "web"]) {
        inv.push_str(&format!(
            "  - name: {app}\n    labels: {{app: {app}}}\n    match: {{netns: [{}]}}\n",
            host.netns.name()
        ));
    }
    std::fs::write(&inventory, inv).expect("inventory");
    let learner = mtls_learner(dir.path(), &pki, Some(inventory)).await;

    let names: Vec<&str> = net.hosts().iter().map(|h| h.netns.name()).collect();
    let log = std::fs::File::create(dir.path().join("collector.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead-collector"))
        .args(["--learner", &format!("https://{}", learner.grpc_addr)])
        .args(tls_args(&pki))
        .arg("--spool-dir")
        .arg(dir.path().join("spool"))
        .args(["--flush-interval", "200ms", "--endpoint-interval", "1s", "--metrics-listen", "127.0.0.1:0"])
        .arg("--netns")
        .arg(names.join(","))
        .env("BULKHEAD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn bulkhead-collector");
    let _collector = ChildGuard::new(child);

    // A few connections from one workload to the other.
    let listener = net.hosts()[1].netns.run(|| TcpListener::bind(("0.0.0.0", PORT)).expect("bind"));
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_server = stop.clone();
    std::thread::spawn(move || {
        while !stop_server.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let mut buf = [0u8; 6];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(b"ok\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    let store = learner.store.clone();
    let want: Vec<u64> = net.hosts().iter().map(|h| h.netns.ino()).collect();
    assert_eventually_async!(
        WAIT,
        async || {
            let eps = store.endpoints().await.unwrap_or_default();
            want.iter().all(|ino| eps.iter().any(|e| e.node_id == NODE && e.fact.netns_ino == *ino))
        },
        "the collector's endpoints arrive under {NODE}; collector log:\n{}",
        log_tail(dir.path())
    );
    let dst = SocketAddr::new(IpAddr::V4(net.hosts()[1].ipv4), PORT);
    net.hosts()[0].netns.run(move || {
        for _ in 0..3 {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("tcp connect");
            s.write_all(b"hello\n").expect("write");
            let mut buf = [0u8; 3];
            s.read_exact(&mut buf).expect("read answer");
        }
    });
    let query = FlowQuery {
        since_unix_ms: None,
        until_unix_ms: None,
        node_id: Some(NODE.into()),
        identity: None,
        dst_port: Some(PORT),
        limit: 100,
        before_id: None,
    };
    assert_eventually_async!(
        WAIT,
        async || store.flows(&query).await.unwrap_or_default().iter().map(|f| f.flow.connections).sum::<u64>() >= 3,
        "3 connections to :{PORT} stored under {NODE}; collector log:\n{}",
        log_tail(dir.path())
    );
    stop.store(true, Ordering::Relaxed);
    let agents = store.agents().await.expect("agents");
    assert_eq!(agents.iter().map(|a| a.node_id.as_str()).collect::<Vec<_>>(), [NODE]);
    let log = std::fs::read_to_string(dir.path().join("collector.log")).expect("log");
    assert!(log.contains("Using mTLS with the learner.") && log.contains(NODE), "{log}");
    learner.abort();
}

fn collector(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-collector"))
        .args(args)
        .env("BULKHEAD_LOG", "info")
        .output()
        .expect("run bulkhead-collector");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn collector_refuses_plaintext_unasked_and_a_node_id_its_certificate_contradicts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = mint(dir.path());
    let spool = ["--spool-dir".to_owned(), dir.path().join("spool").to_string_lossy().into_owned()];

    let (ok, out) = collector(&[&spool[..], &["--learner".into(), "http://127.0.0.1:1".into()]].concat());
    assert!(!ok && out.contains("refusing to talk to the learner in plaintext"), "{out}");

    let (ok, out) =
        collector(&[&spool[..], &["--insecure-grpc".into(), "--learner".into(), "https://x:1".into()]].concat());
    assert!(!ok && out.contains("must start with http://"), "{out}");

    let mut args = [&spool[..], &["--learner".into(), "https://127.0.0.1:1".into()], &tls_args(&pki)[..]].concat();
    args.extend(["--node-id".into(), "someone-else".into()]);
    let (ok, out) = collector(&args);
    assert!(!ok && out.contains("\"someone-else\"") && out.contains(NODE), "{out}");

    let mut args = [&spool[..], &["--learner".into(), "https://127.0.0.1:1".into()], &tls_args(&pki)[..]].concat();
    args.push("--insecure-grpc".into());
    let (ok, out) = collector(&args);
    assert!(!ok && out.contains("exclude each other"), "{out}");
}
