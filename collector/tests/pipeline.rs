//! End to end, as root: three workloads in network namespaces on a private bridge,
//! labelled by an inventory; the real `bulkhead-collector` binary (real eBPF) streams
//! to an in-process learner; real TCP and UDP traffic; the store must hold exactly the
//! expected edges — on SQLite and on PostgreSQL. A second test kills the learner while
//! the collector streams and checks that no connection is lost or counted twice.
//! DNS answers a workload receives arrive in the learner's store too.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::server::{self, Running, ServerConfig};
use bulkhead_learner::store::{EdgeQuery, Store};
use bulkhead_model::{Edge, Identity, Labels, Protocol};
use bulkhead_testkit::netns::{ChildGuard, TestNet, require_root};
use bulkhead_testkit::{assert_eventually_async, dns};

const WAIT: Duration = Duration::from_secs(60);
const TCP_PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const UDP_PORT: u16 = 5353;

/// The workloads: hosts[0] client, hosts[1] web server, hosts[2] UDP service.
fn inventory(net: &TestNet) -> String {
    let workloads = [
        ("client", r#"{app: client, tier: "front'end <b>"}"#),
        ("web", "{app: web}"),
        ("metrics", r#"{app: metrics, note: "x'); DROP TABLE edges;--"}"#),
    ];
    let mut s = String::from("workloads:\n");
    for (host, (name, labels)) in net.hosts().iter().zip(workloads) {
        s.push_str(&format!(
            "  - name: {name}\n    namespace: e2e\n    labels: {labels}\n    match: {{netns: [{}]}}\n",
            host.netns.name()
        ));
    }
    s
}

/// The last lines of the collector's log, for failure messages.
fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("collector.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

struct Learner {
    cfg: ServerConfig,
    running: Option<Running>,
}

impl Learner {
    async fn start(db_url: String, dir: &Path, net: &TestNet) -> Learner {
        let inv = dir.join("inventory.yaml");
        std::fs::write(&inv, inventory(net)).expect("write inventory");
        let cfg = ServerConfig {
            db_url,
            grpc_listen: "127.0.0.1:0".parse().expect("addr"),
            http_listen: "127.0.0.1:0".parse().expect("addr"),
            inventory: Some(inv),
            enrollment: Enrollment::Open,
            max_batch_bytes: 4 << 20,
            flow_retention: Duration::from_secs(3600),
            policy: Default::default(),
            auth: Default::default(),
            tls: None,
        };
        let running = server::start(cfg.clone()).await.expect("learner starts");
        // Restarts must come back on the same port so the collector finds them.
        let cfg = ServerConfig { grpc_listen: running.grpc_addr, http_listen: running.http_addr, ..cfg };
        Learner { cfg, running: Some(running) }
    }

    fn store(&self) -> Store {
        self.running.as_ref().expect("learner running").store.clone()
    }

    fn url(&self) -> String {
        format!("http://{}", self.cfg.grpc_listen)
    }

    fn kill(&mut self) {
        if let Some(r) = self.running.take() {
            r.abort();
        }
    }

    async fn restart(&mut self) {
        self.kill();
        // The aborted listener may take a moment to release the port.
        for _ in 0..100 {
            match server::start(self.cfg.clone()).await {
                Ok(r) => {
                    self.running = Some(r);
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!("learner did not restart on {}", self.cfg.grpc_listen);
    }
}

fn start_collector(learner_url: &str, dir: &Path, net: &TestNet) -> ChildGuard {
    let names: Vec<&str> = net.hosts().iter().map(|h| h.netns.name()).collect();
    let log = std::fs::File::create(dir.join("collector.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead-collector"))
        .args(["--learner", learner_url, "--node-id", "node-e2e", "--insecure-grpc"])
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .args(["--flush-interval", "200ms", "--endpoint-interval", "1s", "--metrics-listen", "127.0.0.1:0"])
        .arg("--netns")
        .arg(names.join(","))
        .env("BULKHEAD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn bulkhead-collector");
    ChildGuard::new(child)
}

/// A TCP server in `host` answering each connection with one line.
fn serve_tcp(net: &TestNet, host: usize, stop: Arc<AtomicBool>) {
    let listener = net.hosts()[host].netns.run(|| TcpListener::bind(("0.0.0.0", TCP_PORT)).expect("bind tcp"));
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(b"ok\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
}

/// `n` TCP connections from `from` to `to`, each a request and a response.
fn tcp_connections(net: &TestNet, from: usize, to: usize, n: usize) {
    let dst = SocketAddr::new(IpAddr::V4(net.hosts()[to].ipv4), TCP_PORT);
    net.hosts()[from].netns.run(move || {
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("tcp connect");
            s.write_all(b"hello\n").expect("write");
            let mut buf = [0u8; 3];
            s.read_exact(&mut buf).expect("read answer");
        }
    });
}

/// A minimal HTTP/1.1 server in `host`: reads a request (headers only) and answers 200.
fn serve_http(net: &TestNet, host: usize, stop: Arc<AtomicBool>) {
    let listener = net.hosts()[host].netns.run(|| TcpListener::bind(("0.0.0.0", HTTP_PORT)).expect("bind http"));
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
}

/// `n` HTTP requests (one per connection) from `from` to `to`.
fn http_requests(net: &TestNet, from: usize, to: usize, n: usize) {
    let dst = SocketAddr::new(IpAddr::V4(net.hosts()[to].ipv4), HTTP_PORT);
    net.hosts()[from].netns.run(move || {
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("http connect");
            s.write_all(b"POST /v1/request-landing HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n")
                .expect("write request");
            let mut answer = Vec::new();
            s.read_to_end(&mut answer).expect("read answer");
            assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
        }
    });
}

/// `sockets` UDP sockets from `from`, each sending three datagrams to `to`.
fn udp_flows(net: &TestNet, from: usize, to: usize, sockets: usize) -> UdpSocket {
    let server = net.hosts()[to].netns.run(|| UdpSocket::bind(("0.0.0.0", UDP_PORT)).expect("bind udp"));
    let dst = SocketAddr::new(IpAddr::V4(net.hosts()[to].ipv4), UDP_PORT);
    net.hosts()[from].netns.run(move || {
        for _ in 0..sockets {
            let s = UdpSocket::bind("0.0.0.0:0").expect("udp socket");
            for _ in 0..3 {
                s.send_to(b"metric:1|c", dst).expect("send");
            }
        }
    });
    server
}

const DNS_ANSWERS: dns::Answers =
    dns::Answers { v4: Ipv4Addr::new(10, 99, 0, 7), ttl_a: 321, v6: Ipv6Addr::LOCALHOST, ttl_aaaa: 1 };

/// `from` resolves `name` through a DNS server in `to`.
fn resolve_through(net: &TestNet, from: usize, to: usize, name: &'static str) {
    let server = SocketAddr::new(IpAddr::V4(net.hosts()[to].ipv4), 53);
    let sock = net.hosts()[to].netns.run(move || UdpSocket::bind(server).expect("bind :53"));
    let responder = dns::responder(sock, 1, DNS_ANSWERS);
    let answers = net.hosts()[from].netns.run(move || {
        let c = UdpSocket::bind("0.0.0.0:0").expect("bind");
        dns::query(&c, server, name, dns::QueryType::A)
    });
    assert_eq!(answers, 1);
    responder.join().expect("responder");
}

fn spooled_batches(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(".pb")).count())
        .unwrap_or(usize::MAX)
}

async fn identity_of(store: &Store, app: &str) -> Option<Identity> {
    store.identities().await.ok()?.into_iter().find(|i| i.labels.get("app") == Some(app)).map(|i| i.id)
}

async fn edge(store: &Store, src: &str, dst: &str, port: u16, proto: Protocol) -> Option<Edge> {
    let (s, d) = (identity_of(store, src).await?, identity_of(store, dst).await?);
    store
        .edges(&EdgeQuery::default())
        .await
        .ok()?
        .into_iter()
        .map(|r| r.edge)
        .find(|e| e.key.src == s && e.key.dst == d && e.key.dst_port == port && e.key.protocol == proto)
}

async fn wait_for_endpoints(store: &Store, net: &TestNet) {
    let want: Vec<u64> = net.hosts().iter().map(|h| h.netns.ino()).collect();
    assert_eventually_async!(
        WAIT,
        async || {
            let eps = store.endpoints().await.unwrap_or_default();
            want.iter().all(|ino| eps.iter().any(|e| e.fact.netns_ino == *ino))
        },
        "collector reported the test namespaces as endpoints"
    );
}

async fn learns_exact_edges(db_url: String) {
    require_root();
    let net = TestNet::new(3);
    let dir = tempfile::tempdir().expect("tempdir");
    let learner = Learner::start(db_url, dir.path(), &net).await;
    let _collector = start_collector(&learner.url(), dir.path(), &net);
    let store = learner.store();
    wait_for_endpoints(&store, &net).await;

    let stop = Arc::new(AtomicBool::new(false));
    serve_tcp(&net, 1, stop.clone());
    serve_http(&net, 1, stop.clone());
    tcp_connections(&net, 0, 1, 5);
    http_requests(&net, 0, 1, 3);
    let _udp_server = udp_flows(&net, 0, 2, 2);
    resolve_through(&net, 0, 2, "db.e2e.test");

    assert_eventually_async!(
        WAIT,
        async || edge(&store, "client", "web", TCP_PORT, Protocol::Tcp).await.is_some_and(|e| e.connections == 5),
        "client→web:8080/tcp with 5 connections; have {:?}\ncollector log:\n{}",
        edge(&store, "client", "web", TCP_PORT, Protocol::Tcp).await,
        log_tail(dir.path())
    );
    assert_eventually_async!(
        WAIT,
        async || edge(&store, "client", "metrics", UDP_PORT, Protocol::Udp).await.is_some_and(|e| e.connections == 2),
        "client→metrics:5353/udp with 2 flows; have {:?}",
        edge(&store, "client", "metrics", UDP_PORT, Protocol::Udp).await
    );
    let client_ns = net.hosts()[0].netns.ino();
    assert_eventually_async!(
        WAIT,
        async || store.dns_answers(0).await.unwrap_or_default().iter().any(|d| {
            d.name == "db.e2e.test"
                && d.addr == IpAddr::from(DNS_ANSWERS.v4)
                && d.ttl_seconds == 321
                && d.netns_ino == client_ns
        }),
        "the client's DNS answer is stored; have {:?}",
        store.dns_answers(0).await
    );
    // L7: the HTTP port's requests, by method and path; the line protocol on 8080 is
    // not HTTP, so its connections are opaque (they keep that edge at L4).
    let http_facts = async || {
        let (c, w) = (identity_of(&store, "client").await?, identity_of(&store, "web").await?);
        let all = store.edge_http(0).await.ok()?;
        let on = |port: u16| all.iter().find(|h| h.key.src == c && h.key.dst == w && h.key.dst_port == port).cloned();
        Some((on(HTTP_PORT), on(TCP_PORT)))
    };
    assert_eventually_async!(
        WAIT,
        async || http_facts().await.is_some_and(|(http, line)| {
            http.is_some_and(|h| {
                h.opaque_connections == 0
                    && h.requests.len() == 1
                    && h.requests[0].method == "POST"
                    && h.requests[0].path == "/v1/request-landing"
                    && h.requests[0].requests == 3
            }) && line.is_some_and(|l| l.requests.is_empty() && l.opaque_connections == 5)
        }),
        "client→web:{HTTP_PORT} carried 3 POST /v1/request-landing, :{TCP_PORT} 5 opaque connections; have {:?}",
        http_facts().await
    );
    stop.store(true, Ordering::Relaxed);

    // Exactly these edges among the three workloads: nothing invented, nothing reversed.
    let ids: Vec<Identity> =
        [identity_of(&store, "client").await, identity_of(&store, "web").await, identity_of(&store, "metrics").await]
            .into_iter()
            .map(|i| i.expect("identity allocated"))
            .collect();
    let mut among: Vec<(u32, u32, u16, Protocol)> = store
        .edges(&EdgeQuery::default())
        .await
        .expect("edges")
        .into_iter()
        .map(|r| r.edge.key)
        .filter(|k| ids.contains(&k.src) && ids.contains(&k.dst))
        .map(|k| (k.src.0, k.dst.0, k.dst_port, k.protocol))
        .collect();
    among.sort();
    let mut want = vec![
        (ids[0].0, ids[1].0, TCP_PORT, Protocol::Tcp),
        (ids[0].0, ids[1].0, HTTP_PORT, Protocol::Tcp),
        (ids[0].0, ids[2].0, 53, Protocol::Udp),
        (ids[0].0, ids[2].0, UDP_PORT, Protocol::Udp),
    ];
    want.sort();
    assert_eq!(among, want);

    // Hostile label values survive the trip through the store unchanged.
    let metrics = store.identities().await.expect("identities").into_iter().find(|i| i.id == ids[2]).expect("row");
    assert_eq!(metrics.labels.get("note"), Some("x'); DROP TABLE edges;--"));
    let client: Labels =
        store.identities().await.expect("identities").into_iter().find(|i| i.id == ids[0]).expect("row").labels;
    assert_eq!(client.get("tier"), Some("front'end <b>"));
    assert_eq!(client.namespace(), Some("e2e"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learns_exact_edges_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("learner.db").display());
    learns_exact_edges(url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learns_exact_edges_on_postgres() {
    let db = bulkhead_testkit::postgres::fresh_database().await;
    learns_exact_edges(db.url().to_owned()).await;
}

/// Kill the learner twice while connections keep coming: every connection is counted
/// exactly once in the end (spool + dedupe), and the collector reports no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learner_restart_mid_stream_loses_and_duplicates_nothing() {
    require_root();
    let net = TestNet::new(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("learner.db").display());
    let mut learner = Learner::start(url, dir.path(), &net).await;
    let _collector = start_collector(&learner.url(), dir.path(), &net);
    wait_for_endpoints(&learner.store(), &net).await;

    let stop = Arc::new(AtomicBool::new(false));
    serve_tcp(&net, 1, stop.clone());
    const ROUNDS: usize = 6;
    const PER_ROUND: usize = 40;
    for round in 0..ROUNDS {
        tcp_connections(&net, 0, 1, PER_ROUND);
        match round {
            1 => learner.kill(),
            2 => learner.restart().await,
            3 => learner.restart().await, // a second crash while the spool drains
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if learner.running.is_none() {
        learner.restart().await;
    }
    let store = learner.store();
    let total = (ROUNDS * PER_ROUND) as u64;
    assert_eventually_async!(
        WAIT,
        async || edge(&store, "client", "web", TCP_PORT, Protocol::Tcp).await.is_some_and(|e| e.connections >= total),
        "all {total} connections arrive; have {:?}\ncollector log:\n{}",
        edge(&store, "client", "web", TCP_PORT, Protocol::Tcp).await,
        log_tail(dir.path())
    );
    // Once the collector's spool is empty every batch has been acked: any resend has
    // landed, so the count is final.
    let spool = dir.path().join("spool");
    assert_eventually_async!(
        WAIT,
        async || spooled_batches(&spool) == 0,
        "spool drains: {} left",
        spooled_batches(&spool)
    );
    let e = edge(&store, "client", "web", TCP_PORT, Protocol::Tcp).await.expect("edge");
    assert_eq!(e.connections, total, "each connection counted exactly once");
    let agents = store.agents().await.expect("agents");
    let agent = agents.iter().find(|a| a.node_id == "node-e2e").expect("agent row");
    assert_eq!(agent.loss, Default::default(), "collector reported no loss");
    stop.store(true, Ordering::Relaxed);
}
