//! Root tests of the `bulkhead-enforcer` agent: the real binary, connected to the
//! learner's real side of `PolicyStream` (`Distributor` + `PolicyStreamService` +
//! `Recorder` into a SQLite store), enforcing with real programs on real packets
//! between workloads that are processes in their own network namespaces and
//! cgroups (see `common`).
//!
//! Covered here (issue 4): snapshots applied and acked, enforcement and monitor
//! verdicts reported into the store with rule hit counters; connections allowed
//! by both versions never fail while versions flip; `kill -9` in enforce mode
//! keeps enforcing and a new process adopts the pins and keeps acking; invalid
//! snapshots (unknown identities, conflicting prefixes, absurd sizes, duplicate
//! rules, an older version) are rejected with the reason while the applied policy
//! stays in force.
//!
//! Every namespace, cgroup, pin directory and process is per run and removed on
//! drop, also when a test panics.
//!
//! Run: `cargo test -p bulkhead-enforcer --test agent` as root.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead_enforcer::datapath::DEFAULT_BPFFS_ROOT;
use bulkhead_learner::distribute::{Distributor, PolicyStreamService, Recorder};
use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::server::{self, ServerConfig};
use bulkhead_learner::store::{Store, VerdictQuery};
use bulkhead_model::{
    Direction, EndpointCgroup, Identity, IpcacheEntry, NodePolicy, NodePolicyDelta, NodeRule, PolicyAckStatus,
    PolicyEndpoint, PolicyUpdate, Protocol, RolloutMode, RuleKey, RuleRef, Verdict,
};
use bulkhead_proto::v1::enforcer_message::Msg;
use bulkhead_proto::v1::{self, policy_stream_server::PolicyStream, policy_stream_server::PolicyStreamServer};
use bulkhead_testkit::cgroup::TestCgroup;
use bulkhead_testkit::netns::{ChildGuard, TestNet};
use bulkhead_testkit::{assert_eventually, require_root, unique_suffix};
use common::{Agent, FAIL_TIMEOUT_MS, OK_TIMEOUT_MS, Pins, SubCgroup, spawn_workload};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt as _};

const WAIT: Duration = Duration::from_secs(15);

const ID_A: Identity = Identity(1001);
const ID_B: Identity = Identity(1002);
const ID_C: Identity = Identity(1003);
const HTTP: u16 = 80;
const UDP_PORT: u16 = 5353;
const PROPOSAL_B: i64 = 7;

#[test]
#[ignore = "workload process of the other tests, started by them with --ignored"]
fn helper_agent() {
    common::workload_main();
}

// === the learner side ===

/// The learner's PolicyStream service over a real store, on 127.0.0.1.
struct Learner {
    rt: tokio::runtime::Runtime,
    distributor: Distributor,
    store: Store,
    url: String,
    _dir: tempfile::TempDir,
}

impl Learner {
    fn start() -> Learner {
        Learner::start_at("127.0.0.1:0")
    }

    /// On a given address (a restart comes back where the enforcer looks).
    fn start_at(listen: &str) -> Learner {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("learner.db").display());
        let distributor = Distributor::new();
        let (store, url) = rt.block_on(async {
            let store = Store::open(&url).await.expect("store");
            let recorder =
                Recorder { store: store.clone(), distributor: distributor.clone(), enrollment: Enrollment::Open };
            let service = PolicyStreamServer::new(PolicyStreamService {
                distributor: distributor.clone(),
                recorder: Some(recorder),
            });
            (store, serve_at(listen, service).await)
        });
        Learner { rt, distributor, store, url, _dir: dir }
    }

    /// Publishes `policy` for `node`; returns the version the learner gave it.
    /// Versions are Unix milliseconds, as the learner's.
    fn publish(&self, node: &str, mut policy: NodePolicy) -> u64 {
        policy.version =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
        self.distributor.publish(BTreeMap::from([(node.to_owned(), policy)]));
        self.distributor.current(node).expect("published").version
    }

    fn applied(&self, node: &str) -> Option<u64> {
        self.distributor.status().get(node).and_then(|s| s.applied_version)
    }

    fn wait_applied(&self, node: &str, version: u64) {
        assert_eventually!(
            WAIT,
            || self.applied(node) == Some(version),
            "node {node} to apply version {version}; status {:?}",
            self.distributor.status().get(node)
        );
    }

    fn last_ack(&self, node: &str) -> Option<bulkhead_model::PolicyAck> {
        self.distributor.status().get(node).and_then(|s| s.last_ack.clone())
    }

    fn events(&self, node: &str, verdict: Verdict) -> Vec<bulkhead_learner::store::VerdictEventRecord> {
        let q = VerdictQuery {
            node_id: Some(node.to_owned()),
            verdict: Some(verdict),
            limit: 1000,
            ..VerdictQuery::default()
        };
        self.rt.block_on(self.store.verdict_events(&q)).expect("verdict events")
    }
}

async fn serve<S>(service: PolicyStreamServer<S>) -> String
where
    S: PolicyStream,
{
    serve_at("127.0.0.1:0", service).await
}

async fn serve_at<S>(listen: &str, service: PolicyStreamServer<S>) -> String
where
    S: PolicyStream,
{
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .expect("server runs");
    });
    format!("http://{addr}")
}

// === the enforcer process ===

/// A running `bulkhead-enforcer`; killed with SIGKILL on drop (its pins stay:
/// `Pins` removes them).
struct Enforcer {
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl Enforcer {
    fn start(w: &World, learner_url: &str) -> Enforcer {
        Enforcer::start_with(w, learner_url, "32768")
    }

    /// With a policy map of `policy_entries` (two generations live in it).
    fn start_with(w: &World, learner_url: &str, policy_entries: &str) -> Enforcer {
        let log = w.state.path().join(format!("enforcer-{}.log", unique_suffix()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_bulkhead-enforcer"))
            .args(["--learner", learner_url, "--node-id", &w.node, "--instance", &w.pins.instance, "--insecure-grpc"])
            .arg("--cgroup")
            .arg(w.parent.path())
            .arg("--state-dir")
            .arg(w.state.path())
            .args(["--policy-entries", policy_entries, "--report-interval", "100ms", "--max-backoff", "500ms"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("BULKHEAD_LOG", "info,bulkhead_enforcer=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start bulkhead-enforcer");
        Enforcer { child: Some(ChildGuard::new(child)), log }
    }

    /// `kill -9`.
    fn kill(&mut self) {
        if let Some(guard) = self.child.take() {
            let mut child: Child = guard.into_inner();
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` of the running process (its address is in the log).
    fn metrics(&self) -> String {
        let log = self.log();
        let addr = log
            .lines()
            .find(|l| l.contains("Serving metrics."))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{log}"))
            .to_owned();
        let mut stream = std::net::TcpStream::connect(&addr).expect("metrics endpoint");
        use std::io::{Read as _, Write as _};
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
        let mut body = String::new();
        stream.read_to_string(&mut body).expect("response");
        body
    }
}

impl Drop for Enforcer {
    fn drop(&mut self) {
        self.kill();
    }
}

// === the workloads ===

/// Workloads A, B, C (hosts 0, 1, 2) in cgroups below the cgroup the enforcer
/// attaches to. B serves TCP 80 and UDP 5353 on IPv4 and IPv6; A serves TCP 80.
struct World {
    // Drop order: processes, cgroups, pins, parent cgroup, net.
    agents: Vec<Agent>,
    cgroups: Vec<SubCgroup>,
    pins: Pins,
    parent: TestCgroup,
    net: TestNet,
    state: tempfile::TempDir,
    node: String,
}

impl World {
    fn new() -> World {
        require_root();
        let suffix = unique_suffix();
        let net = TestNet::new(3);
        let parent = TestCgroup::new();
        let mut w = World {
            agents: Vec::new(),
            cgroups: Vec::new(),
            pins: Pins { instance: format!("test-{suffix}") },
            parent,
            net,
            state: tempfile::tempdir().expect("tempdir"),
            node: format!("node-{suffix}"),
        };
        for (i, name) in ["A", "B", "C"].into_iter().enumerate() {
            let cg = SubCgroup::new(w.parent.path(), &name.to_lowercase());
            let agent = spawn_workload(name, &w.net.hosts()[i].netns, &cg);
            w.cgroups.push(cg);
            w.agents.push(agent);
        }
        for (agent, host) in [(1, 1), (0, 0)] {
            for addr in [w.v4(host, HTTP), w.v6(host, HTTP)] {
                w.agents[agent].listen("tcp", addr);
                w.agents[agent].listen("udp", SocketAddr::new(addr.ip(), UDP_PORT));
            }
        }
        w
    }

    fn v4(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.hosts()[i].ipv4.into(), port)
    }

    fn v6(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.hosts()[i].ipv6.into(), port)
    }

    fn agent(&mut self, i: usize) -> &mut Agent {
        &mut self.agents[i]
    }

    /// "A → B:80/TCP and A → B:5353/UDP", as A's egress and B's ingress rules,
    /// both directions of A and B covered, plus `extra` rules; C unmanaged.
    fn policy(&self, mode: RolloutMode, extra: &[(RuleKey, u32)]) -> NodePolicy {
        let ids = [ID_A, ID_B, ID_C];
        let mut ipcache = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let h = &self.net.hosts()[i];
            ipcache.push(IpcacheEntry { prefix: format!("{}/32", h.ipv4).parse().expect("net"), identity: *id });
            ipcache.push(IpcacheEntry { prefix: format!("{}/128", h.ipv6).parse().expect("net"), identity: *id });
        }
        let endpoint = |i: usize, identity| PolicyEndpoint {
            identity,
            netns_ino: Some(self.net.hosts()[i].netns.ino()),
            netns_name: Some(self.net.hosts()[i].netns.name().to_owned()),
            cgroups: vec![EndpointCgroup { cgroup_id: self.cgroups[i].id(), path: format!("/test/{i}") }],
            mode,
            ingress_covered: true,
            egress_covered: true,
        };
        let key = |local, direction, peer, port, protocol| RuleKey {
            local,
            direction,
            peer: Some(peer),
            port: Some(port),
            protocol: Some(protocol),
        };
        let mut rules = vec![
            (key(ID_A, Direction::Egress, ID_B, HTTP, Protocol::Tcp), 1),
            (key(ID_B, Direction::Ingress, ID_A, HTTP, Protocol::Tcp), 2),
            (key(ID_A, Direction::Egress, ID_B, UDP_PORT, Protocol::Udp), 3),
            (key(ID_B, Direction::Ingress, ID_A, UDP_PORT, Protocol::Udp), 4),
        ];
        rules.extend_from_slice(extra);
        let rule_refs = rules
            .iter()
            .map(|(k, id)| RuleRef {
                rule_id: *id,
                proposal_id: if k.local == ID_B { PROPOSAL_B } else { PROPOSAL_B + 1 },
                policy_name: format!("bulkhead-{}", k.local),
                direction: k.direction,
                rule_index: *id,
            })
            .collect();
        NodePolicy {
            version: 1,
            ipcache,
            endpoints: vec![endpoint(0, ID_A), endpoint(1, ID_B)],
            rules: rules.into_iter().map(|(key, rule_id)| NodeRule::l4(key, rule_id)).collect(),
            rule_refs,
        }
    }

    /// A and B enforce exactly "A → B" (v4 and v6, TCP and UDP).
    fn assert_enforced(&mut self) {
        let (a, b, c) = (0, 1, 2);
        for (b80, b53, a80) in [
            (self.v4(b, HTTP), self.v4(b, UDP_PORT), self.v4(a, HTTP)),
            (self.v6(b, HTTP), self.v6(b, UDP_PORT), self.v6(a, HTTP)),
        ] {
            self.agent(a).tcp_ok(b80);
            self.agent(a).udp(b53, OK_TIMEOUT_MS).unwrap_or_else(|e| panic!("A → {b53}/udp must succeed: {e}"));
            self.agent(c).tcp_fails(b80);
            assert!(self.agent(c).udp(b53, FAIL_TIMEOUT_MS).is_err(), "C → {b53}/udp must fail");
            self.agent(b).tcp_fails(a80);
        }
    }
}

fn c_to_b_http(w: &World) -> (RuleKey, u32) {
    let _ = w;
    (
        RuleKey {
            local: ID_B,
            direction: Direction::Ingress,
            peer: Some(ID_C),
            port: Some(HTTP),
            protocol: Some(Protocol::Tcp),
        },
        10,
    )
}

// === tests ===

#[test]
fn snapshots_are_applied_acked_enforced_and_reported() {
    let mut w = World::new();
    let learner = Learner::start();
    let v1 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &[]));
    let enforcer = Enforcer::start(&w, &learner.url);
    learner.wait_applied(&w.node, v1);
    w.assert_enforced();

    // Denies reach the store, named by workload, with the default-deny reason.
    let b_v4 = w.net.hosts()[1].ipv4;
    let c_v4 = w.net.hosts()[2].ipv4;
    assert_eventually!(
        WAIT,
        || learner.events(&w.node, Verdict::Denied).iter().any(|e| {
            e.event.local == ID_B
                && e.event.peer == ID_C
                && e.event.dst_addr == std::net::IpAddr::from(b_v4)
                && e.event.src_addr == std::net::IpAddr::from(c_v4)
                && e.event.dst_port == HTTP
                && e.event.rule.is_none()
                && e.event.policy_version == v1
        }),
        "C → B denied event in the store; enforcer log:\n{}",
        enforcer.log()
    );
    // Rule hit counters reach the store under the approved rule they stand for.
    assert_eventually!(
        WAIT,
        || learner
            .rt
            .block_on(learner.store.rule_hits(PROPOSAL_B))
            .expect("rule hits")
            .iter()
            .any(|h| h.node_id == w.node && h.hits >= 2 && h.last_hit_unix_ms > 0),
        "hits of B's ingress rules; enforcer log:\n{}",
        enforcer.log()
    );

    // Monitor: C → B passes and is reported as audit, once per connection.
    let v2 = learner.publish(&w.node, w.policy(RolloutMode::Monitor, &[]));
    learner.wait_applied(&w.node, v2);
    let b80 = w.v4(1, HTTP);
    for _ in 0..3 {
        w.agent(2).tcp_ok(b80);
    }
    let node = w.node.clone();
    let audits = |learner: &Learner| {
        learner
            .events(&node, Verdict::Audit)
            .into_iter()
            .filter(|e| {
                e.event.local == ID_B
                    && e.event.peer == ID_C
                    && e.event.protocol == Protocol::Tcp
                    && e.event.policy_version == v2
            })
            .count()
    };
    assert_eventually!(WAIT, || audits(&learner) >= 3, "3 audit events; log:\n{}", enforcer.log());
    // UDP likewise: a datagram and its reply are one flow, one audit event.
    let b53 = w.v4(1, UDP_PORT);
    w.agent(2).udp(b53, OK_TIMEOUT_MS).unwrap_or_else(|e| panic!("C → B/udp passes in monitor: {e}"));
    let udp_audits = |learner: &Learner| {
        learner
            .events(&node, Verdict::Audit)
            .into_iter()
            .filter(|e| e.event.local == ID_B && e.event.protocol == Protocol::Udp && e.event.dst_port == UDP_PORT)
            .count()
    };
    assert_eventually!(WAIT, || udp_audits(&learner) == 1, "one UDP audit event; log:\n{}", enforcer.log());
    // Allowing C → B in a new version: the audit stops, traffic keeps flowing.
    let extra = [c_to_b_http(&w)];
    let v3 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &extra));
    learner.wait_applied(&w.node, v3);
    w.agent(2).tcp_ok(b80);
    assert_eq!(audits(&learner), 3, "exactly one audit event per connection attempt");

    // The store knows which version the node runs.
    let rows = learner.rt.block_on(learner.store.enforcers()).expect("enforcers");
    let row = rows.iter().find(|r| r.node_id == w.node).expect("enforcer row");
    assert_eq!(row.applied_version, Some(v3));
    // The operator's view: Prometheus metrics agree.
    assert_eventually!(
        WAIT,
        || {
            let m = enforcer.metrics();
            m.contains(&format!("bulkhead_enforcer_applied_version {v3}"))
                && m.contains("bulkhead_enforcer_learner_connected 1")
                && m.contains("bulkhead_enforcer_events_lost_total 0")
                && m.lines().any(|l| {
                    l.strip_prefix("bulkhead_enforcer_verdicts_denied_total ")
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v > 0)
                })
        },
        "metrics show the applied version and the denials:\n{}",
        enforcer.metrics()
    );
    // Its reports arrive with its loss counters: nothing lost here.
    assert!(row.last_report_unix_ms.is_some(), "{row:?}");
    assert_eq!(row.loss, bulkhead_model::EnforcerLoss::default(), "{row:?}");
}

#[test]
fn connections_allowed_by_both_versions_never_fail_while_versions_flip() {
    let mut w = World::new();
    let learner = Learner::start();
    let v = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &[]));
    let enforcer = Enforcer::start(&w, &learner.url);
    learner.wait_applied(&w.node, v);

    const FLIPS: usize = 20;
    let b80 = w.v4(1, HTTP);
    let with_c = w.policy(RolloutMode::Enforce, &[c_to_b_http(&w)]);
    let without_c = w.policy(RolloutMode::Enforce, &[]);
    let node = w.node.clone();
    let mut a = w.agents.remove(0);
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    let (a, outcome) = std::thread::scope(|s| {
        // A connects back to back, in rounds of 50 ms, until every flip is acked.
        let (stop, rounds) = (&stop, &rounds);
        let client = s.spawn(move || {
            let mut total = 0u64;
            while !stop.load(Ordering::SeqCst) {
                match a.ask_value(&format!("loop tcp {b80} 50")) {
                    Ok(n) => total += n.parse::<u64>().expect("count"),
                    Err(e) => return (a, Err(format!("after {total} good connections: {e}"))),
                }
                rounds.fetch_add(1, Ordering::SeqCst);
            }
            (a, Ok(total))
        });
        // Every flip lands while the client is connecting: the next flip waits
        // for a whole round that started after this one was acked.
        for i in 0..FLIPS {
            let seen = rounds.load(Ordering::SeqCst);
            assert_eventually!(WAIT, || rounds.load(Ordering::SeqCst) >= seen + 2 || client.is_finished());
            let p = if i % 2 == 0 { with_c.clone() } else { without_c.clone() };
            let v = learner.publish(&node, p);
            learner.wait_applied(&node, v);
        }
        stop.store(true, Ordering::SeqCst);
        client.join().expect("client thread")
    });
    w.agents.insert(0, a);
    let total = outcome
        .unwrap_or_else(|e| panic!("A → B:80 must never fail while versions flip: {e}\nlog:\n{}", enforcer.log()));
    assert!(rounds.load(Ordering::SeqCst) >= 2 * FLIPS as u64, "every flip had connections around it");
    assert!(total >= 100, "the client made only {total} connections");
    // After the first snapshot, versions travelled as deltas.
    assert!(enforcer.log().contains("kind=delta"), "deltas were used:\n{}", enforcer.log());
    // The last version (FLIPS even → without C) is what the kernel enforces.
    w.agent(2).tcp_fails(b80);
    w.agent(0).tcp_ok(b80);
}

#[test]
fn kill_9_keeps_enforcing_and_a_new_process_adopts_the_pins() {
    let mut w = World::new();
    let learner = Learner::start();
    let v1 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &[]));
    let mut first = Enforcer::start(&w, &learner.url);
    learner.wait_applied(&w.node, v1);
    w.assert_enforced();

    first.kill();
    assert_eventually!(
        WAIT,
        || learner.distributor.status().get(&w.node).is_some_and(|s| !s.connected),
        "the learner notices the enforcer is gone"
    );
    // Nobody in user space: the pinned programs and maps keep enforcing.
    w.assert_enforced();

    // A new process says it already runs v1 (from the pins), so nothing is re-applied.
    let boot_before = learner.distributor.status().get(&w.node).and_then(|s| s.boot_id.clone());
    let second = Enforcer::start(&w, &learner.url);
    assert_eventually!(
        WAIT,
        || learner.distributor.status().get(&w.node).is_some_and(|s| s.connected && s.boot_id != boot_before),
        "the new enforcer connects; log:\n{}",
        second.log()
    );
    assert_eq!(learner.applied(&w.node), Some(v1), "Hello names the version the pins enforce");
    assert!(second.log().contains("adopted=true"), "the new process adopts the pins:\n{}", second.log());
    w.assert_enforced();

    // Acks continue: a new version is applied by the new process.
    let v2 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &[c_to_b_http(&w)]));
    learner.wait_applied(&w.node, v2);
    let b80 = w.v4(1, HTTP);
    w.agent(2).tcp_ok(b80);
}

#[test]
fn bad_snapshots_are_rejected_and_the_applied_policy_stays() {
    let mut w = World::new();
    let learner = Learner::start();
    let good = w.policy(RolloutMode::Enforce, &[]);
    let v1 = learner.publish(&w.node, good.clone());
    let mut enforcer = Enforcer::start(&w, &learner.url);
    learner.wait_applied(&w.node, v1);

    let mut unknown_identity = good.clone();
    unknown_identity.rules[1].key.peer = Some(Identity(9999));
    let mut conflicting_prefix = good.clone();
    let mut dup = conflicting_prefix.ipcache[0];
    dup.identity = ID_C;
    conflicting_prefix.ipcache.push(dup);
    let mut duplicate_rule = good.clone();
    let mut again = duplicate_rule.rules[0].clone();
    again.rule_id = 11;
    duplicate_rule.rules.push(again);
    duplicate_rule.rule_refs.push(RuleRef { rule_id: 11, ..duplicate_rule.rule_refs[0].clone() });
    let mut absurd = good.clone();
    absurd.ipcache = (0..(bulkhead_model::node_policy::MAX_IPCACHE_ENTRIES as u32 + 1))
        .map(|i| IpcacheEntry {
            prefix: std::net::Ipv4Addr::from(0x0a00_0000 + i)
                .to_string()
                .parse::<std::net::IpAddr>()
                .expect("ip")
                .into(),
            identity: ID_C,
        })
        .collect();

    for (what, policy, expected) in [
        ("unknown identity", unknown_identity, "identity 9999 is not in the ipcache"),
        ("conflicting prefix", conflicting_prefix, "is listed twice"),
        ("duplicate rule", duplicate_rule, "same key as rules[0]"),
        ("absurd size", absurd, "ipcache has 262145 entries, at most 262144 allowed"),
    ] {
        let v = learner.publish(&w.node, policy);
        assert_eventually!(
            WAIT,
            || learner.last_ack(&w.node).is_some_and(|a| a.version == v),
            "an ack for the {what} snapshot v{v}; log:\n{}",
            enforcer.log()
        );
        let ack = learner.last_ack(&w.node).expect("ack");
        assert_eq!(ack.status, PolicyAckStatus::Rejected, "{what}: {ack:?}");
        let error = ack.error.unwrap_or_default();
        assert!(error.contains(expected), "{what}: the error must say why: {error:?}");
        assert_eq!(learner.applied(&w.node), Some(v1), "{what}: still on v{v1}");
        w.assert_enforced();
    }

    // A version older than the applied one (a learner whose clock went back and
    // that does not re-stamp): refused, policy kept. Served by a scripted learner.
    enforcer.kill();
    // Then a delta from a version this enforcer never held: not the policy's
    // fault, so no rejection — it reconnects to get a snapshot.
    let stray = NodePolicyDelta { base_version: v1 + 1_000, version: v1 + 2_000, ..NodePolicyDelta::default() };
    let scripted = Scripted::new(vec![
        v1::PolicyUpdate::from(&NodePolicy { version: v1 - 1, ..good.clone() }),
        v1::PolicyUpdate::from(&PolicyUpdate::Delta(stray)),
    ]);
    let url = learner.rt.block_on(serve(PolicyStreamServer::new(scripted.clone())));
    let enforcer = Enforcer::start(&w, &url);
    let mut messages = Vec::new();
    learner.rt.block_on(async {
        tokio::time::timeout(WAIT, async {
            // Hello, the ack of the old snapshot, then the Hello of the reconnect.
            while messages.iter().filter(|m: &&v1::EnforcerMessage| matches!(m.msg, Some(Msg::Hello(_)))).count() < 2 {
                messages.push(scripted.next_message().await);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no reconnect after the stray delta: {messages:?}\nlog:\n{}", enforcer.log()))
    });
    let acks: Vec<&v1::PolicyAck> =
        messages.iter().filter_map(|m| if let Some(Msg::Ack(a)) = &m.msg { Some(a) } else { None }).collect();
    assert_eq!(acks.len(), 1, "only the old snapshot is answered: {messages:?}");
    assert_eq!(acks[0].version, v1 - 1);
    assert_eq!(acks[0].status, v1::PolicyAckStatus::Rejected as i32);
    assert!(acks[0].error.contains("older than the applied version"), "{:?}", acks[0]);
    // The reconnect says it still runs v1.
    let hello = messages.iter().rev().find_map(|m| if let Some(Msg::Hello(h)) = &m.msg { Some(h) } else { None });
    assert_eq!(hello.map(|h| h.applied_version), Some(v1));
    w.assert_enforced();
}

// === a scripted learner, for what the real one never sends ===

/// Sends a fixed list of updates on every stream and hands the enforcer's
/// messages to the test.
#[derive(Clone)]
struct Scripted {
    updates: Vec<v1::PolicyUpdate>,
    tx: tokio::sync::mpsc::UnboundedSender<v1::EnforcerMessage>,
    rx: Arc<Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<v1::EnforcerMessage>>>>,
}

impl Scripted {
    fn new(updates: Vec<v1::PolicyUpdate>) -> Scripted {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Scripted { updates, tx, rx: Arc::new(Mutex::new(Some(rx))) }
    }

    async fn next_message(&self) -> v1::EnforcerMessage {
        let mut rx = self.rx.lock().expect("lock").take().expect("one reader");
        let msg = rx.recv().await.expect("scripted server alive");
        *self.rx.lock().expect("lock") = Some(rx);
        msg
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<v1::PolicyUpdate, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl PolicyStream for Scripted {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: tonic::Request<tonic::Streaming<v1::EnforcerMessage>>,
    ) -> Result<tonic::Response<UpdateStream>, tonic::Status> {
        let mut inbound = request.into_inner();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if tx.send(m).is_err() {
                    break;
                }
            }
        });
        let updates = tokio_stream::iter(self.updates.clone().into_iter().map(Ok)).chain(tokio_stream::pending());
        Ok(tonic::Response::new(Box::pin(updates)))
    }
}

/// `kill -9` while a large version is being written: the kernel keeps enforcing one
/// whole version (never a mix, never nothing), and the next process reads the maps
/// back, drops what the dead one half-wrote and converges on the learner's version.
#[test]
fn kill_9_in_the_middle_of_an_apply_leaves_one_whole_version_and_recovers() {
    let mut w = World::new();
    let learner = Learner::start();
    let v1 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &[]));
    const BIG: &str = "131072";
    let mut first = Enforcer::start_with(&w, &learner.url, BIG);
    learner.wait_applied(&w.node, v1);

    // v2: C → B:80 allowed too, plus 60,000 filler rules so writing it takes a while.
    let mut extra = vec![c_to_b_http(&w)];
    for (i, port) in (2_000..62_000u16).enumerate() {
        let key = RuleKey {
            local: ID_B,
            direction: Direction::Ingress,
            peer: Some(ID_A),
            port: Some(port),
            protocol: Some(Protocol::Tcp),
        };
        extra.push((key, 100 + i as u32));
    }
    let v2 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &extra));
    assert_eventually!(
        WAIT,
        || first.log().contains(&format!("Writing the maps. version={v2}")),
        "the enforcer starts writing v{v2}; log:\n{}",
        first.log()
    );
    first.kill();

    // Whichever version the kernel holds, it holds all of it.
    let (a, b, c) = (0, 1, 2);
    let (b80, a80) = (w.v4(b, HTTP), w.v4(a, HTTP));
    w.agent(a).tcp_ok(b80);
    w.agent(b).tcp_fails(a80);
    let c_passed = w.agent(c).tcp(b80, FAIL_TIMEOUT_MS).is_ok();
    let port_20000 = SocketAddr::new(b80.ip(), 20_000);
    // (port 20000 is one of the filler rules)
    // v2's filler rules exist exactly when v2's C → B rule does (nobody listens on
    // 20000: allowed = refused at once; denied = timeout when B's ingress drops the
    // SYN, or EPERM from connect() when A's egress is judged there).
    let filler = match w.agent(a).tcp(port_20000, FAIL_TIMEOUT_MS) {
        Err(e) => !(e.contains("timed out") || e.contains("not permitted")),
        Ok(()) => true,
    };
    assert_eq!(c_passed, filler, "one whole version: C → B:80 {c_passed}, filler rules {filler}");

    let second = Enforcer::start_with(&w, &learner.url, BIG);
    learner.wait_applied(&w.node, v2);
    eprintln!(
        "killed with v2 {}; the next process found {}",
        if c_passed { "active" } else { "not active" },
        if second.log().contains("Deleted an inactive policy generation") {
            "a half-written generation"
        } else {
            "no leftovers"
        }
    );
    w.agent(c).tcp_ok(b80);
    w.agent(a).tcp_ok(b80);
    w.agent(b).tcp_fails(a80);
    drop(second);
}

/// The learner goes away and comes back (new process, new versions, same content):
/// the kernel keeps enforcing meanwhile, the enforcer reconnects, and the learner's
/// first snapshot is recorded as applied without rewriting the maps.
#[test]
fn a_restarted_learner_resyncs_without_rewriting_the_maps() {
    let mut w = World::new();
    let learner = Learner::start();
    let v1 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &[]));
    let enforcer = Enforcer::start(&w, &learner.url);
    learner.wait_applied(&w.node, v1);
    let listen = learner.url.trim_start_matches("http://").to_owned();
    drop(learner);
    w.assert_enforced();

    let learner = Learner::start_at(&listen);
    let v2 = learner.publish(&w.node, w.policy(RolloutMode::Enforce, &[]));
    assert!(v2 > v1);
    learner.wait_applied(&w.node, v2);
    assert!(enforcer.log().contains("unchanged content"), "no map writes for the same content:\n{}", enforcer.log());
    w.assert_enforced();
}

/// A workload that is only a network namespace (its processes in no managed cgroup)
/// is enforced by the tc programs the agent attaches inside that namespace. Once it
/// leaves the policy, its programs are detached.
#[test]
fn a_network_namespace_workload_is_enforced_through_tc() {
    let mut w = World::new();
    let learner = Learner::start();
    let mut policy = w.policy(RolloutMode::Enforce, &[]);
    policy.endpoints[1].cgroups.clear();
    let v = learner.publish(&w.node, policy);
    let enforcer = Enforcer::start(&w, &learner.url);
    learner.wait_applied(&w.node, v);
    w.assert_enforced();
    assert_eventually!(
        WAIT,
        || learner.events(&w.node, Verdict::Denied).iter().any(|e| e.event.local == ID_B && e.event.peer == ID_C),
        "C → B denied by the tc programs, reported; log:\n{}",
        enforcer.log()
    );
    let pins = || -> Vec<String> {
        std::fs::read_dir(std::path::Path::new(DEFAULT_BPFFS_ROOT).join(&w.pins.instance))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned())).collect())
            .unwrap_or_default()
    };
    assert!(pins().iter().any(|p| p.starts_with("tc")), "tc links pinned: {:?}", pins());

    // B leaves the policy: its namespace's programs go, and C reaches B again.
    let mut without_b = w.policy(RolloutMode::Enforce, &[]);
    without_b.endpoints.truncate(1);
    without_b.rules.retain(|r| r.key.local != ID_B);
    let v2 = learner.publish(&w.node, without_b);
    learner.wait_applied(&w.node, v2);
    assert!(!pins().iter().any(|p| p.starts_with("tc")), "tc links detached: {:?}", pins());
    let b80 = w.v4(1, HTTP);
    w.agent(2).tcp_ok(b80);
}

// === end to end through the learner ===

/// The whole control loop with the real learner server: what the node's collector
/// reports (endpoints with their cgroups, A's flows to B) goes in over FlowIngest;
/// synthesis proposes, an analyst approves over the API and rolls B out to monitor
/// and then enforce; the enforcer binary receives the compiled policy, C's
/// connections to B are audited, then dropped, A's keep working, and the API shows
/// the applied version and the audit and deny events of B. Back to monitor
/// restores C's traffic. (The collector producing those reports from real sockets
/// is `collector/tests/pipeline.rs`; all three binaries together are issue 6's
/// reference scenario.)
#[test]
fn learner_to_enforcer_end_to_end_through_review_and_rollout() {
    let mut w = World::new();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let inventory = dir.path().join("inventory.yaml");
    let mut yaml = String::from("workloads:\n");
    for (i, app) in ["a", "b", "c"].into_iter().enumerate() {
        yaml.push_str(&format!(
            "  - name: {app}\n    namespace: e2e\n    labels: {{app: {app}}}\n    match: {{netns: [{}]}}\n",
            w.net.hosts()[i].netns.name()
        ));
    }
    std::fs::write(&inventory, yaml).expect("inventory");
    let cfg = ServerConfig {
        db_url: format!("sqlite://{}", dir.path().join("learner.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: Some(inventory),
        enrollment: Enrollment::Open,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: None,
    };
    let running = rt.block_on(server::start(cfg)).expect("learner starts");
    let grpc = format!("http://{}", running.grpc_addr);
    let (token, _) = rt
        .block_on(running.store.create_token_user("alice", bulkhead_learner::auth::Role::Approver, "test", "test", 1))
        .expect("token user");
    let api = Api {
        rt: &rt,
        base: format!("http://{}/api/v1", running.http_addr),
        http: reqwest::Client::new(),
        token: token.expose().to_owned(),
    };

    // What the node's collector reports: the three workloads and A's traffic to B.
    rt.block_on(report_as_collector(&grpc, &w));
    let (status, proposals) = api.call("POST", "/proposals/synthesize", serde_json::json!({}));
    assert_eq!(status, 200, "{proposals}");
    let b = proposals
        .as_array()
        .and_then(|l| l.iter().find(|p| p["workload"] == "b"))
        .unwrap_or_else(|| panic!("a proposal for b: {proposals}"))
        .clone();
    let (id, b_identity) = (b["id"].as_i64().expect("id"), b["target"].as_u64().expect("target"));
    let (status, body) =
        api.call("POST", &format!("/proposals/{id}/approve"), serde_json::json!({"comment": "A only"}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = api.call("POST", "/rollout", serde_json::json!({"target": b_identity, "mode": "monitor"}));
    assert_eq!(status, 200, "{body}");

    let enforcer = Enforcer::start(&w, &grpc);
    let monitored = api.wait_in_sync(&w.node, 0, &enforcer);
    let (a, c) = (0, 2);
    let b80 = w.v4(1, HTTP);
    w.agent(c).tcp_ok(b80);
    api.wait_event(&w.node, "audit", b_identity, &enforcer);

    let (status, body) = api.call("POST", "/rollout", serde_json::json!({"target": b_identity, "mode": "enforce"}));
    assert_eq!(status, 200, "{body}");
    let enforced = api.wait_in_sync(&w.node, monitored, &enforcer);
    w.agent(c).tcp_fails(b80);
    w.agent(a).tcp_ok(b80);
    let b53 = w.v4(1, UDP_PORT);
    assert!(w.agent(c).udp(b53, FAIL_TIMEOUT_MS).is_err(), "C → B/udp dropped");
    api.wait_event(&w.node, "denied", b_identity, &enforcer);
    // Each approved rule shows its use: A's connections hit B's ingress rule on this node.
    assert_eventually!(
        WAIT,
        || {
            let (_, view) = api.call("GET", &format!("/proposals/{id}"), serde_json::Value::Null);
            view["rule_hits"].as_array().is_some_and(|h| {
                h.iter().any(|h| {
                    h["node_id"] == w.node.as_str()
                        && h["rule"]["proposal_id"] == id
                        && h["rule"]["direction"] == "ingress"
                        && h["hits"].as_u64().is_some_and(|n| n >= 1)
                        && h["last_hit_unix_ms"].as_i64().is_some_and(|t| t > 0)
                })
            })
        },
        "hits of B's ingress rule on the proposal; log:\n{}",
        enforcer.log()
    );

    // Demoting restores C's traffic (audited again).
    let (status, body) = api.call("POST", "/rollout", serde_json::json!({"target": b_identity, "mode": "monitor"}));
    assert_eq!(status, 200, "{body}");
    api.wait_in_sync(&w.node, enforced, &enforcer);
    w.agent(c).tcp_ok(b80);
    running.abort();
}

/// The learner's HTTP API, as the CLI and UI use it.
struct Api<'a> {
    rt: &'a tokio::runtime::Runtime,
    base: String,
    http: reqwest::Client,
    /// alice's (an approver's) API token.
    token: String,
}

impl Api<'_> {
    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.rt.block_on(async {
            let url = format!("{}{path}", self.base);
            let req = match method {
                "GET" => self.http.get(url),
                _ => self.http.post(url).json(&body),
            };
            let resp = req.bearer_auth(&self.token).send().await.expect("API reachable");
            let status = resp.status().as_u16();
            (status, resp.json().await.unwrap_or(serde_json::Value::Null))
        })
    }

    /// Waits until the node applied a version newer than `after` that is the one the
    /// learner wants there; returns it.
    fn wait_in_sync(&self, node: &str, after: u64, enforcer: &Enforcer) -> u64 {
        let mut last = serde_json::Value::Null;
        let synced = bulkhead_testkit::eventually::eventually_some(WAIT, || {
            let (_, rows) = self.call("GET", "/enforcers", serde_json::Value::Null);
            last = rows.clone();
            let row = rows.as_array()?.iter().find(|r| r["node_id"] == node)?.clone();
            let desired = row["desired_version"].as_u64()?;
            (desired > after && row["applied_version"].as_u64() == Some(desired)).then_some(desired)
        });
        synced.unwrap_or_else(|_| panic!("node {node} in sync; enforcers: {last}\nlog:\n{}", enforcer.log()))
    }

    fn wait_event(&self, node: &str, verdict: &str, identity: u64, enforcer: &Enforcer) {
        let path = format!("/verdicts?node={node}&verdict={verdict}&identity={identity}");
        assert_eventually!(
            WAIT,
            || {
                let (_, events) = self.call("GET", &path, serde_json::Value::Null);
                events.as_array().is_some_and(|e| e.iter().any(|e| e["dst_port"] == HTTP))
            },
            "a {verdict} event for B:80 in the API; log:\n{}",
            enforcer.log()
        );
    }
}

/// One batch as the collector on `w.node` would send it: every workload's namespace,
/// addresses and cgroup, and A's connections to B (TCP 80, UDP 5353) seen from both ends.
async fn report_as_collector(url: &str, w: &World) {
    use bulkhead_model::{CgroupFact, EndpointFact, Flow, FlowBatch, InterfaceAddress, LossCounters};
    use bulkhead_proto::v1::{flow_ingest_client::FlowIngestClient, ingest_request, ingest_response};
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let endpoints = (0..3)
        .map(|i| {
            let h = &w.net.hosts()[i];
            EndpointFact {
                netns_ino: h.netns.ino(),
                netns_name: Some(h.netns.name().to_owned()),
                addresses: vec![
                    InterfaceAddress { interface: h.ifname.into(), addr: h.ipv4.into(), prefix_len: 24 },
                    InterfaceAddress { interface: h.ifname.into(), addr: h.ipv6.into(), prefix_len: 64 },
                ],
                cgroups: vec![CgroupFact {
                    cgroup_id: w.cgroups[i].id(),
                    path: format!("/bulkhead-test/{i}"),
                    comms: vec!["agent".into()],
                }],
                host: false,
            }
        })
        .collect();
    let flow = |local: usize, direction, port, protocol| {
        let (a, b) = (&w.net.hosts()[0], &w.net.hosts()[1]);
        Flow {
            src_addr: a.ipv4.into(),
            src_port: 0,
            dst_addr: b.ipv4.into(),
            dst_port: port,
            protocol,
            direction,
            netns_ino: w.net.hosts()[local].netns.ino(),
            cgroup_id: w.cgroups[local].id(),
            pid: 1,
            comm: "agent".into(),
            connections: 5,
            bytes_sent: 100,
            bytes_received: 100,
            packets: 10,
            verdict: Verdict::Forwarded,
            first_seen_unix_ms: now - 60_000,
            last_seen_unix_ms: now - 1_000,
            http: Default::default(),
        }
    };
    let batch = FlowBatch {
        node_id: w.node.clone(),
        boot_id: "collector-boot".into(),
        seq: 1,
        created_unix_ms: now,
        flows: vec![
            flow(0, Direction::Egress, HTTP, Protocol::Tcp),
            flow(1, Direction::Ingress, HTTP, Protocol::Tcp),
            flow(0, Direction::Egress, UDP_PORT, Protocol::Udp),
            flow(1, Direction::Ingress, UDP_PORT, Protocol::Udp),
        ],
        endpoints: Some(endpoints),
        dns_answers: Vec::new(),
        loss: LossCounters::default(),
        sent_unix_ms: now,
    };
    let mut client = FlowIngestClient::connect(url.to_owned()).await.expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = v1::Hello { node_id: w.node.clone(), boot_id: "collector-boot".into(), agent_version: "test".into() };
    tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Hello(hello)) }).await.expect("hello");
    tx.send(v1::IngestRequest { msg: Some(ingest_request::Msg::Batch((&batch).into())) }).await.expect("batch");
    let mut responses =
        client.ingest(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("ingest").into_inner();
    loop {
        match responses.message().await.expect("stream ok").expect("a response") {
            v1::IngestResponse { msg: Some(ingest_response::Msg::Ack(a)) } => {
                assert_eq!(a.status, v1::AckStatus::Stored as i32, "{a:?}");
                break;
            }
            _ => continue,
        }
    }
}
