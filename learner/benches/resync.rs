//! Learner restart → enforcer resync (issue 6 "Numbers"): how long after the learner
//! process is killed (SIGKILL) and started again until every one of 100 enforcers is
//! back on the policy stream, has received its node's current policy and acked it.
//!
//! What runs:
//! * the real learner binary (`target/release/bulkhead-learner`, built first),
//!   SQLite in a temp dir, mTLS for the agents' gRPC (a CA, the learner's certificate
//!   for 127.0.0.1 and one node certificate per enforcer, as `bulkhead certs` makes them);
//! * a store seeded through the library before the first start: 100 nodes with 3
//!   workloads each (endpoints as collectors report them: netns, address, cgroup), one
//!   approved policy per workload (ingress from its namespace on 8000/tcp, ingress from
//!   one neighbour on 8080/tcp narrowed to two HTTP rules, egress to its namespace on
//!   8000/tcp), every workload in enforce mode — so every node's compiled `NodePolicy`
//!   has 3 endpoints, ~180 rule entries and the 300 workloads' addresses;
//! * 100 simulated enforcers in this process: real tonic `PolicyStream` clients over
//!   mTLS, each with its own node certificate and node id. Each one behaves as
//!   `enforcer/src/agent.rs` does (which is part of the enforcer binary, not its
//!   library, so it is mimicked here rather than called): Hello with the version it
//!   enforces, every update applied as `MapOwner::apply` decides (an older version is
//!   refused, the same version is "already applied", a delta without its base ends the
//!   stream for a snapshot) and acked; after the stream ends it sleeps its backoff and
//!   reconnects — 100 ms at first, doubled after each failed attempt up to 5 s (the
//!   agent's `--max-backoff` default), back to 100 ms once a stream is open; no jitter,
//!   as in the agent. No kernel maps: applying is recording what was applied.
//!
//! Each trial kills the learner, waits `downtime`, starts it again and times, from the
//! new process' spawn: its gRPC port accepting connections; each enforcer's new stream;
//! each one's ack of a policy with its node's content (the learner re-stamps versions
//! after a restart, so "current" is the content every node had before the kill — the
//! store did not change); the learner's own view (`GET /api/v1/enforcers`: every node's
//! applied version = desired version). Recorded throughout: any update whose version is
//! below what the enforcer had applied, and any policy received after the first sync
//! whose content differs from the node's (it would change what the node enforces while
//! nothing was changed) — either fails the bench, which then leaves BENCHMARKS.md
//! alone; and the enforcers whose stream was open before the new process' first
//! compile (they are sent nothing until it, and keep what they enforce).
//!
//! Run: `cargo bench -p bulkhead-learner --bench resync`. Writes the
//! `## Learner restart → enforcer resync` section of BENCHMARKS.md.
//! `BH_RESYNC_BENCH_QUICK=1`: four short trials, BENCHMARKS.md left alone;
//! `BH_RESYNC_BENCH_LOG=path` keeps the learner's log.

#[path = "../tests/pki/mod.rs"]
mod pki;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bulkhead_learner::auth::Role;
use bulkhead_learner::store::{Decision, IngestBatch, ResolvedEndpoint, Store};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    CgroupFact, Convergence, Direction, EndpointFact, EnforcerHello, EnforcerMessage, Evidence, HttpEvidence, HttpRule,
    Identity, InterfaceAddress, LabelSelector, Labels, Level, LossCounters, NodePolicy, Peer, Policy, PolicyAck,
    PolicyAckStatus, PolicyUpdate, PortRange, Proposal, ProposedRule, Protocol, RolloutMode, Rule, Window,
};
use bulkhead_proto::tls::{AgentTransport, ServerTlsFiles};
use bulkhead_proto::v1::{self, policy_stream_client::PolicyStreamClient};
use bulkhead_testkit::assert_eventually_async;
use bulkhead_testkit::benchmarks::{load_average, machine};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use pki::Pki;

const SECTION: &str = "Learner restart → enforcer resync";
const QUICK_ENV: &str = "BH_RESYNC_BENCH_QUICK";
/// A path to copy the learner's log (all its runs) to at the end.
const KEEP_LOG_ENV: &str = "BH_RESYNC_BENCH_LOG";
const NODES: usize = 100;
const WORKLOADS_PER_NODE: usize = 3;
const NAMESPACES: usize = 10;
/// The enforcer agent's reconnect backoff: first delay and cap (`--max-backoff`).
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a resynchronizing enforcer waits for the learner to close its side.
const RESYNC_CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Largest snapshot an enforcer accepts (the agent's limit).
const MAX_SNAPSHOT_BYTES: usize = 256 << 20;
/// Give up on a trial after this long.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(60);
/// An enforcer's reconnect attempts after its stream broke come at these times (the
/// sums of its backoff sleeps): 0.1, 0.3, 0.7, 1.5, 3.1 s, … — all 100 at once.
const FOURTH_ATTEMPT: Duration = Duration::from_millis(1500);
/// Trials: how long the learner stays down, repetitions.
const TRIALS: [(Downtime, usize); 3] =
    [(Downtime::Fixed(Duration::ZERO), 7), (Downtime::AtAttempt, 5), (Downtime::Fixed(Duration::from_secs(10)), 3)];
const QUICK_TRIALS: [(Downtime, usize); 3] =
    [(Downtime::Fixed(Duration::ZERO), 1), (Downtime::AtAttempt, 2), (Downtime::Fixed(Duration::from_secs(2)), 1)];

/// How long the learner stays down in a trial.
#[derive(Debug, Clone, Copy)]
enum Downtime {
    Fixed(Duration),
    /// Restarted so that it starts listening just as the enforcers' fourth reconnect
    /// attempt comes ([`FOURTH_ATTEMPT`] minus its start-up time so far): the whole
    /// herd reaches the new process within its first milliseconds, while it may
    /// still be compiling its first node policies.
    AtAttempt,
}

impl Downtime {
    fn label(self) -> String {
        match self {
            Downtime::Fixed(d) => format!("{:.0} s", d.as_secs_f64()),
            Downtime::AtAttempt => format!(
                "{:.1} s − start-up (listening as the enforcers' 4th attempt comes)",
                FOURTH_ATTEMPT.as_secs_f64()
            ),
        }
    }

    /// The downtime, given the start-up times (spawn → listening) seen so far.
    fn duration(self, startups: &[Duration]) -> Duration {
        match self {
            Downtime::Fixed(d) => d,
            Downtime::AtAttempt => {
                let mut s = startups.to_vec();
                s.sort();
                FOURTH_ATTEMPT.saturating_sub(s.get(s.len() / 2).copied().unwrap_or_default())
            }
        }
    }
}

fn main() {
    let quick = std::env::var_os(QUICK_ENV).is_some();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let (md, violations) = rt.block_on(run(if quick { &QUICK_TRIALS } else { &TRIALS }));
    println!("\n{md}");
    // A regression check as much as a measurement: the section is not written then.
    assert!(violations.is_empty(), "{}", violations.join("; "));
    if quick {
        println!("{QUICK_ENV} set: BENCHMARKS.md left alone");
        return;
    }
    match bulkhead_testkit::benchmarks::write_section(SECTION, &md) {
        Ok(path) => println!("wrote ## {SECTION} to {}", path.display()),
        Err(e) => panic!("could not update BENCHMARKS.md: {e}"),
    }
}

/// The section, and what went wrong (updates below an applied version, or another
/// node's content sent to an enforcer).
async fn run(trials: &[(Downtime, usize)]) -> (String, Vec<String>) {
    let binary = build_learner();
    let started = Instant::now();
    let load_at_start = load_average();
    let dir = tempfile::tempdir().expect("temp dir");
    let db_url = format!("sqlite://{}", dir.path().join("learner.db").display());
    let pki = Pki::new();
    let grpc = free_port();
    let http = free_port();
    let url = format!("https://{grpc}");

    let seed_started = Instant::now();
    let token = seed(&db_url).await;
    println!("seeded {NODES} nodes in {:.1} s", seed_started.elapsed().as_secs_f64());

    let cmd = LearnerCmd { binary, db_url, grpc, http, tls: pki.server_files(), log: dir.path().join("learner.log") };
    let mut learner = cmd.start();
    let first_listening = wait_port(grpc, TRIAL_TIMEOUT).duration_since(learner.spawned);
    let api = Api { http: reqwest::Client::new(), base: format!("http://{http}/api/v1"), token };

    let clients: Vec<Arc<Client>> = (0..NODES).map(|n| Arc::new(Client::new(node_name(n)))).collect();
    let mut tasks = Vec::new();
    for c in &clients {
        let transport = pki.node(&c.node).transport(&url).expect("agent transport");
        tasks.push(tokio::spawn(run_client(c.clone(), url.clone(), transport)));
    }

    // First sync: every node gets its (non-trivial) policy; that content is what each
    // node must be back on after every restart.
    let first = Instant::now();
    assert_eventually_async!(
        TRIAL_TIMEOUT,
        async || clients.iter().all(|c| c.lock().applied.as_ref().is_some_and(|p| !p.endpoints.is_empty())),
        "every enforcer's first sync"
    );
    println!("first sync of {NODES} enforcers in {:.2} s", first.elapsed().as_secs_f64());
    let mut sizes = Vec::new();
    for c in &clients {
        let mut s = c.lock();
        let p = s.applied.clone().expect("applied");
        sizes.push((p.endpoints.len(), p.rules.len(), p.ipcache.len()));
        s.expected = Some(p);
    }
    api.wait_in_sync(&clients, TRIAL_TIMEOUT).await;

    let mut results: Vec<Trial> = Vec::new();
    let mut startups = vec![first_listening];
    for &(downtime, reps) in trials {
        for rep in 0..reps {
            let d = downtime.duration(&startups);
            let t = trial(&cmd, &mut learner, &clients, &api, d, downtime.label()).await;
            startups.push(t.listening);
            println!(
                "[{:>5.1}s] downtime {:>5.3} s, trial {}/{reps}: listening {:.0} ms, all reconnected {:.0} ms, all \
                 synced {:.0} ms (median enforcer {:.0} ms), learner sees all in sync {:.0} ms; lower versions {}, \
                 other content {}; {} admitted before the first compile (longest wait {:.0} ms)",
                started.elapsed().as_secs_f64(),
                d.as_secs_f64(),
                rep + 1,
                ms(t.listening),
                ms(t.all_reconnected),
                ms(t.all_synced),
                ms(t.median_synced),
                ms(t.learner_in_sync),
                t.lower_versions,
                t.other_content.len(),
                t.before_compile,
                ms(t.longest_wait),
            );
            if let Some(o) = t.other_content.first() {
                println!("    e.g. {o:?}");
            }
            results.push(t);
        }
    }
    for t in tasks {
        t.abort();
    }
    learner.kill();
    let log = std::fs::read_to_string(&cmd.log).unwrap_or_default();
    if let Some(keep) = std::env::var_os(KEEP_LOG_ENV) {
        std::fs::write(&keep, &log).unwrap_or_else(|e| panic!("writing {}: {e}", Path::new(&keep).display()));
    }
    report(&results, &sizes, &clients, &log, &machine(&load_at_start, started.elapsed()))
}

// === one trial ===

/// A policy an enforcer was sent with other content than its node's.
#[derive(Debug)]
struct OtherContent {
    node: String,
    version: u64,
    endpoints: usize,
    rules: usize,
    /// When it arrived, after the learner's spawn.
    after_spawn: Duration,
    /// How long until the node's own policy was applied and acked again.
    replaced_after: Option<Duration>,
}

/// What one kill/restart took, measured from the new process' spawn.
#[derive(Debug)]
struct Trial {
    /// Which kind of downtime ([`Downtime::label`]) and how long it was.
    label: String,
    downtime: Duration,
    /// Until its gRPC port accepted a TCP connection.
    listening: Duration,
    /// Until the last enforcer's stream was open again.
    all_reconnected: Duration,
    /// Until the last enforcer acked a policy with its node's content.
    all_synced: Duration,
    /// The median enforcer's sync time.
    median_synced: Duration,
    /// Until `GET /api/v1/enforcers` showed every node applied = desired.
    learner_in_sync: Duration,
    /// The learner process' CPU time (user + system) from its spawn until then.
    learner_cpu: Duration,
    /// Reconnect attempts (connect or subscribe) that failed, over all enforcers.
    failed_attempts: u64,
    /// Updates offered below the version an enforcer had applied.
    lower_versions: u64,
    /// (node, version, endpoints, rules) of policies received with other content.
    other_content: Vec<OtherContent>,
    /// Enforcers the new process admitted before its first compile (its log), and the
    /// longest any of them waited on that stream for a policy, keeping the one it held.
    before_compile: usize,
    longest_wait: Duration,
}

async fn trial(
    cmd: &LearnerCmd,
    learner: &mut Learner,
    clients: &[Arc<Client>],
    api: &Api,
    downtime: Duration,
    label: String,
) -> Trial {
    let before: Vec<(u64, u64, u64, usize)> = clients
        .iter()
        .map(|c| {
            let s = c.lock();
            (s.failed_attempts, s.lower_versions, s.applied.as_ref().map_or(0, |p| p.version), s.other_content.len())
        })
        .collect();
    learner.kill();
    let killed = Instant::now();
    tokio::time::sleep(downtime).await;
    *learner = cmd.start();
    let spawned = learner.spawned;
    let grpc = cmd.grpc;
    let listening = tokio::task::spawn_blocking(move || wait_port(grpc, TRIAL_TIMEOUT))
        .await
        .expect("join")
        .duration_since(spawned);

    // Synced: a stream opened after the kill, and an ack of the node's content on it.
    assert_eventually_async!(
        TRIAL_TIMEOUT,
        async || clients.iter().all(|c| c.lock().synced_since(killed).is_some()),
        "every enforcer resynced"
    );
    let mut reconnected = Vec::new();
    let mut synced = Vec::new();
    for c in clients {
        let s = c.lock();
        reconnected
            .push(s.connected.iter().find(|t| **t > killed).map_or(Duration::MAX, |t| t.duration_since(spawned)));
        synced.push(s.synced_since(killed).map_or(Duration::MAX, |t| t.duration_since(spawned)));
    }
    api.wait_in_sync(clients, TRIAL_TIMEOUT).await;
    let learner_in_sync = spawned.elapsed();
    let learner_cpu = learner.cpu_time();
    synced.sort();
    // Enforcers the new process admitted before its first compile, and how long each
    // waited on its stream for a policy.
    let early = admitted_before_compile(&learner.log(&cmd.log));
    let waits: Vec<Duration> = clients
        .iter()
        .filter(|c| early.contains(&c.node))
        .filter_map(|c| {
            let s = c.lock();
            s.first_updates.iter().find(|(opened, _)| *opened > killed).map(|(opened, at)| at.duration_since(*opened))
        })
        .collect();
    let mut other_content = Vec::new();
    let (mut failed, mut lower) = (0, 0);
    for (c, (f0, l0, applied_before, o0)) in clients.iter().zip(&before) {
        let s = c.lock();
        failed += s.failed_attempts - f0;
        lower += s.lower_versions - l0;
        other_content.extend(s.other_content[*o0..].iter().map(|&(at, version, endpoints, rules)| OtherContent {
            node: c.node.clone(),
            version,
            endpoints,
            rules,
            after_spawn: at.saturating_duration_since(spawned),
            // Until the node's own content was acked again.
            replaced_after: s.synced.iter().find(|(t, _)| *t > at).map(|(t, _)| t.duration_since(at)),
        }));
        let now = s.applied.as_ref().map_or(0, |p| p.version);
        assert!(now >= *applied_before, "{}: applied version went back from {applied_before} to {now}", c.node);
    }
    Trial {
        label,
        downtime,
        listening,
        all_reconnected: reconnected.iter().copied().max().unwrap_or_default(),
        all_synced: synced.last().copied().unwrap_or_default(),
        median_synced: synced[synced.len() / 2],
        learner_in_sync,
        learner_cpu,
        failed_attempts: failed,
        lower_versions: lower,
        other_content,
        before_compile: early.len(),
        longest_wait: waits.iter().copied().max().unwrap_or_default(),
    }
}

/// The nodes whose enforcer a learner process admitted before its first compile: in
/// its log, the "Enforcer connected." lines before the first "Recompiled node policies.".
fn admitted_before_compile(log: &str) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    for line in log.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match entry["fields"]["message"].as_str() {
            Some("Recompiled node policies.") => break,
            Some("Enforcer connected.") => nodes.extend(entry["fields"]["node"].as_str().map(str::to_owned)),
            _ => {}
        }
    }
    nodes
}

// === the simulated enforcers ===

/// One simulated enforcer: its node id and what it did, shared with the bench.
struct Client {
    node: String,
    state: Mutex<ClientState>,
}

#[derive(Default)]
struct ClientState {
    /// What the enforcer enforces (the kernel's copy would survive its stream).
    applied: Option<Arc<NodePolicy>>,
    /// The node's content after the first sync.
    expected: Option<Arc<NodePolicy>>,
    /// When each stream opened.
    connected: Vec<Instant>,
    /// (stream opened, first update received on it), per stream that got one.
    first_updates: Vec<(Instant, Instant)>,
    /// When each applied ack of the expected content was sent, with the time the
    /// stream it went on opened.
    synced: Vec<(Instant, Instant)>,
    /// Attempts that opened no stream (connect or subscribe failed).
    failed_attempts: u64,
    /// Why the last stream or attempt ended.
    last_error: Option<String>,
    /// Updates whose version was below the applied one (refused).
    lower_versions: u64,
    /// (version, endpoints, rules) of policies received after the first sync whose
    /// content was not the node's.
    other_content: Vec<(Instant, u64, usize, usize)>,
}

impl ClientState {
    /// When the first ack of the node's content on a stream opened after `since` went out.
    fn synced_since(&self, since: Instant) -> Option<Instant> {
        self.synced.iter().find(|(_, stream)| *stream > since).map(|(at, _)| *at)
    }
}

impl Client {
    fn new(node: String) -> Client {
        Client { node, state: Mutex::new(ClientState::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides an update as the enforcer's map owner does and says what to answer.
    fn apply(&self, update: v1::PolicyUpdate, stream_opened: Instant) -> Answer {
        let version = match &update.update {
            Some(v1::policy_update::Update::Snapshot(s)) => s.version,
            Some(v1::policy_update::Update::Delta(d)) => d.version,
            None => 0,
        };
        let rejected =
            |error: String| Answer::Ack(PolicyAck { version, status: PolicyAckStatus::Rejected, error: Some(error) });
        let update = match PolicyUpdate::try_from(update) {
            Ok(u) => u,
            Err(e) => return rejected(e.to_string()),
        };
        let mut s = self.lock();
        let policy = match update {
            PolicyUpdate::Snapshot(p) => p,
            PolicyUpdate::Delta(d) => match s.applied.as_ref().filter(|p| p.version == d.base_version) {
                Some(base) => match d.apply(base) {
                    Ok(p) => p,
                    Err(e) => return rejected(e.to_string()),
                },
                None => return Answer::Resync,
            },
        };
        if let Some(expected) = &s.expected
            && !policy.content_eq(expected)
        {
            s.other_content.push((Instant::now(), policy.version, policy.endpoints.len(), policy.rules.len()));
        }
        let applied = s.applied.as_ref().map_or(0, |p| p.version);
        if policy.version < applied {
            s.lower_versions += 1;
            return rejected(format!("version {} is older than the applied {applied}", policy.version));
        }
        if policy.version > applied {
            if let Err(e) = policy.validate() {
                return rejected(e.to_string());
            }
            s.applied = Some(Arc::new(policy));
        }
        let current = s.applied.clone().expect("applied");
        if s.expected.as_ref().is_some_and(|e| current.content_eq(e)) {
            s.synced.push((Instant::now(), stream_opened));
        }
        Answer::Ack(PolicyAck { version, status: PolicyAckStatus::Applied, error: None })
    }
}

enum Answer {
    Ack(PolicyAck),
    /// A delta without its base: reconnect for a snapshot.
    Resync,
}

/// The agent's `stream_forever`: stream, and after it ends sleep the backoff (doubled
/// after each failed attempt, up to [`MAX_BACKOFF`]; reset when a stream opens).
async fn run_client(client: Arc<Client>, url: String, transport: AgentTransport) {
    let boot_id = format!("bench-{}-{}", client.node, std::process::id());
    let mut backoff = INITIAL_BACKOFF;
    loop {
        if let Err(e) = stream_once(&client, &url, &transport, &boot_id, &mut backoff).await {
            client.lock().last_error = Some(e);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn stream_once(
    client: &Client,
    url: &str,
    transport: &AgentTransport,
    boot_id: &str,
    backoff: &mut Duration,
) -> Result<(), String> {
    let failed = |e: String| {
        client.lock().failed_attempts += 1;
        e
    };
    let channel = transport.connect(url).await.map_err(|e| failed(e.to_string()))?;
    let mut grpc = PolicyStreamClient::new(channel).max_decoding_message_size(MAX_SNAPSHOT_BYTES);
    let applied_version = client.lock().applied.as_ref().map_or(0, |p| p.version);
    let (tx, rx) = mpsc::channel::<v1::EnforcerMessage>(64);
    let hello = EnforcerMessage::Hello(EnforcerHello {
        node_id: client.node.clone(),
        boot_id: boot_id.to_owned(),
        agent_version: "resync-bench".to_owned(),
        applied_version,
    });
    tx.send((&hello).into()).await.map_err(|e| failed(e.to_string()))?;
    let mut inbound = grpc.subscribe(ReceiverStream::new(rx)).await.map_err(|e| failed(e.to_string()))?.into_inner();
    *backoff = INITIAL_BACKOFF;
    let opened = Instant::now();
    client.lock().connected.push(opened);
    let mut first = true;
    while let Some(update) = inbound.message().await.map_err(|e| e.to_string())? {
        if std::mem::take(&mut first) {
            client.lock().first_updates.push((opened, Instant::now()));
        }
        match client.apply(update, opened) {
            Answer::Ack(ack) => tx.send((&EnforcerMessage::Ack(ack)).into()).await.map_err(|e| e.to_string())?,
            Answer::Resync => {
                drop(tx);
                let _ = tokio::time::timeout(RESYNC_CLOSE_WAIT, async {
                    while let Ok(Some(_)) = inbound.message().await {}
                })
                .await;
                return Ok(());
            }
        }
    }
    Ok(())
}

// === the learner process ===

/// How the learner is started (the same every time).
struct LearnerCmd {
    binary: PathBuf,
    db_url: String,
    grpc: SocketAddr,
    http: SocketAddr,
    tls: ServerTlsFiles,
    /// Appended to by every run.
    log: PathBuf,
}

impl LearnerCmd {
    fn start(&self) -> Learner {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("learner log");
        let log_from = log.metadata().expect("learner log").len();
        let spawned = Instant::now();
        let child = Command::new(&self.binary)
            .arg("--db")
            .arg(&self.db_url)
            .arg("--grpc-listen")
            .arg(self.grpc.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string())
            .args(["--synthesize-every-minutes", "0"])
            .arg("--tls-cert")
            .arg(&self.tls.cert)
            .arg("--tls-key")
            .arg(&self.tls.key)
            .arg("--tls-client-ca")
            .arg(&self.tls.client_ca)
            // JSON: the bench reads what the learner did and in which order.
            .args(["--log-format", "json"])
            .env("BULKHEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        Learner { child: Some(child), spawned, log_from }
    }
}

/// The learner binary, running; killed (SIGKILL) on drop.
struct Learner {
    child: Option<Child>,
    spawned: Instant,
    /// Where this process' part of the shared log starts.
    log_from: u64,
}

impl Learner {
    /// What this process logged so far (JSON lines).
    fn log(&self, path: &Path) -> String {
        let log = std::fs::read(path).unwrap_or_default();
        String::from_utf8_lossy(log.get(self.log_from as usize..).unwrap_or_default()).into_owned()
    }

    /// User + system CPU time so far (`/proc/<pid>/stat`, clock ticks of 10 ms).
    fn cpu_time(&self) -> Duration {
        let Some(c) = &self.child else { return Duration::ZERO };
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.id())).unwrap_or_default();
        // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
        Duration::from_millis(f.iter().sum::<u64>() * 10)
    }

    /// SIGKILL, and reaped.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Learner {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `addr` accepts a TCP connection; returns when it did.
fn wait_port(addr: SocketAddr, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the learner did not listen on {addr}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Builds the learner binary (a no-op when it is fresh) next to this bench's target
/// directory, so a stale binary is never measured.
fn build_learner() -> PathBuf {
    let exe = std::env::current_exe().expect("bench path");
    // target/<profile>/deps/resync-… → target/<profile>/bulkhead-learner
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "bulkhead-learner", "--bin", "bulkhead-learner"])
        .env("CARGO_TARGET_DIR", profile_dir.parent().expect("target"))
        .status()
        .unwrap_or_else(|e| panic!("running {cargo}: {e}"));
    assert!(status.success(), "building bulkhead-learner failed");
    let binary = profile_dir.join("bulkhead-learner");
    assert!(binary.exists(), "{} missing after the build", binary.display());
    binary
}

// === the learner's API ===

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// Waits until the learner's store says every node applied the version it wants
    /// there, and that version is the one the node's enforcer last acked.
    async fn wait_in_sync(&self, clients: &[Arc<Client>], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        loop {
            if let Ok(resp) = self.http.get(format!("{}/enforcers", self.base)).bearer_auth(&self.token).send().await
                && let Ok(rows) = resp.json::<serde_json::Value>().await
            {
                let by_node: BTreeMap<&str, &serde_json::Value> =
                    rows.as_array().into_iter().flatten().filter_map(|r| Some((r["node_id"].as_str()?, r))).collect();
                let all = clients.iter().all(|c| {
                    let acked = c.lock().applied.as_ref().map(|p| p.version);
                    by_node.get(c.node.as_str()).is_some_and(|r| {
                        let desired = r["desired_version"].as_u64();
                        desired.is_some() && r["applied_version"].as_u64() == desired && desired == acked
                    })
                });
                if all {
                    return;
                }
                last = rows;
            }
            assert!(Instant::now() < deadline, "the learner never showed every node in sync: {last}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// === the store ===

fn node_name(n: usize) -> String {
    format!("node-{n:03}")
}

fn workload_addr(w: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 60, (w / 250) as u8, (w % 250) as u8 + 1)
}

/// Seeds the store: identities, every node's endpoints, an approved policy per
/// workload, every workload in enforce mode, and a viewer's API token (returned).
async fn seed(db_url: &str) -> String {
    let now = now_ms();
    let store = Store::open(db_url).await.expect("open store");
    let workloads = NODES * WORKLOADS_PER_NODE;
    let app = |w: usize| format!("svc-{w:03}");
    let ns = |w: usize| format!("ns-{}", w % NAMESPACES);
    let mut ids = Vec::with_capacity(workloads);
    for w in 0..workloads {
        let labels = Labels::new([("app".to_owned(), app(w)), (NAMESPACE_KEY.to_owned(), ns(w))]).expect("labels");
        ids.push(store.ensure_identity(&labels).await.expect("identity"));
    }
    for n in 0..NODES {
        let node = node_name(n);
        store.register_agent(&node, now).await.expect("agent");
        let endpoints = (n * WORKLOADS_PER_NODE..(n + 1) * WORKLOADS_PER_NODE)
            .map(|w| ResolvedEndpoint {
                fact: EndpointFact {
                    netns_ino: 4_026_540_000 + w as u64,
                    netns_name: Some(format!("bh-{}", app(w))),
                    addresses: vec![InterfaceAddress {
                        interface: "eth0".into(),
                        addr: IpAddr::V4(workload_addr(w)),
                        prefix_len: 16,
                    }],
                    cgroups: vec![CgroupFact {
                        cgroup_id: 50_000 + w as u64,
                        path: format!("/bulkhead/{}", app(w)),
                        comms: vec!["server".into()],
                    }],
                    host: false,
                },
                identity: ids[w],
                workload: Some(app(w)),
            })
            .collect();
        let batch = IngestBatch {
            node_id: node,
            boot_id: "collector".into(),
            seq: 1,
            received_unix_ms: now,
            flows: vec![],
            endpoints: Some(endpoints),
            dns_answers: vec![],
            loss: LossCounters::default(),
        };
        store.ingest(&batch).await.expect("ingest endpoints");
    }
    for (w, &id) in ids.iter().enumerate() {
        let p = proposal(id, &app(w), &ns(w), &app((w + 1) % workloads), now);
        let rec = store.put_proposal(&p, now).await.expect("proposal");
        let policy = rec.proposal.policy.clone();
        store.decide_proposal(rec.summary.id, Decision::Approve { policy }, "bench", None, now).await.expect("approve");
        store.set_rollout_mode(id, RolloutMode::Enforce, "bench", "resync bench", now).await.expect("rollout");
    }
    let (token, _) = store.create_token_user("bench", Role::Viewer, "bench", "bench", now).await.expect("token");
    let token = token.expose().to_owned();
    store.close().await;
    token
}

/// Workload `app`'s policy: ingress from its namespace on 8000/tcp, ingress from
/// `neighbour` on 8080/tcp for `POST /v1/request-landing` and `GET /status/…` only,
/// egress to its namespace on 8000/tcp.
fn proposal(target: Identity, app: &str, ns: &str, neighbour: &str, now: i64) -> Proposal {
    let namespace = Peer::Workloads { selector: LabelSelector::with_labels([(NAMESPACE_KEY, ns)]) };
    let http = vec![HttpRule::prefix("GET", "/status/"), HttpRule::exact("POST", "/v1/request-landing")];
    let from_ns = Rule::l4(namespace.clone(), vec![PortRange::single(Protocol::Tcp, 8000)]);
    let from_neighbour = Rule {
        peer: Peer::Workloads { selector: LabelSelector::with_labels([("app", neighbour), (NAMESPACE_KEY, ns)]) },
        ports: vec![PortRange::single(Protocol::Tcp, 8080)],
        http: http.clone(),
    };
    let to_ns = Rule::l4(namespace, vec![PortRange::single(Protocol::Tcp, 8000)]);
    let evidence = |http: &[HttpRule]| Evidence {
        connections: 1,
        first_seen_unix_ms: now,
        last_seen_unix_ms: now,
        http: http
            .iter()
            .map(|rule| HttpEvidence {
                rule: rule.clone(),
                requests: 1,
                first_seen_unix_ms: now,
                last_seen_unix_ms: now,
                paths: 1,
                generalized: false,
            })
            .collect(),
        ..Evidence::default()
    };
    let proposed = |id: &str, direction, rule: &Rule| ProposedRule {
        id: id.into(),
        direction,
        rule: rule.clone(),
        evidence: evidence(&rule.http),
        flags: vec![],
        included: true,
        widens: vec![],
        widens_total: 0,
    };
    Proposal {
        target,
        workload: app.into(),
        level: Level::Exact,
        window: Window { from_unix_ms: now - 3_600_000, to_unix_ms: now },
        policy: Policy {
            name: app.into(),
            namespace: Some(ns.into()),
            selector: LabelSelector::with_labels([("app", app), (NAMESPACE_KEY, ns)]),
            ingress: Some(vec![from_ns.clone(), from_neighbour.clone()]),
            egress: Some(vec![to_ns.clone()]),
        },
        rules: vec![
            proposed("ingress-0", Direction::Ingress, &from_ns),
            proposed("ingress-1", Direction::Ingress, &from_neighbour),
            proposed("egress-0", Direction::Egress, &to_ns),
        ],
        widening_total: 0,
        convergence: Convergence { converged: true, last_new_edge_unix_ms: Some(now), quiet_period_ms: 60_000 },
        lints: vec![],
        removals: vec![],
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

// === report ===

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median_max(v: &[Duration]) -> (Duration, Duration) {
    let mut s = v.to_vec();
    s.sort();
    (s.get(s.len() / 2).copied().unwrap_or_default(), s.last().copied().unwrap_or_default())
}

fn report(
    results: &[Trial],
    sizes: &[(usize, usize, usize)],
    clients: &[Arc<Client>],
    log: &str,
    machine: &str,
) -> (String, Vec<String>) {
    let mut md = String::new();
    md.push_str(
        "Command: `cargo bench -p bulkhead-learner --bench resync` (builds and runs the release learner binary).\n",
    );
    md.push_str(&format!("{machine}\n\n"));
    let range = |f: fn(&(usize, usize, usize)) -> usize| {
        let v: Vec<usize> = sizes.iter().map(f).collect();
        (v.iter().copied().min().unwrap_or(0), v.iter().copied().max().unwrap_or(0))
    };
    let (e_lo, e_hi) = range(|s| s.0);
    let (r_lo, r_hi) = range(|s| s.1);
    let (i_lo, i_hi) = range(|s| s.2);
    md.push_str(&format!(
        "The real learner binary (SQLite in a temp dir, mTLS for the agents) and {NODES} simulated enforcers in \
         the bench process: tonic `PolicyStream` clients over mTLS, one node certificate and node id each, that \
         behave like the enforcer agent (Hello with the applied version; updates applied as the map owner decides \
         — older refused, same version \"already applied\"; acked; after a stream ends, reconnect after a backoff \
         of 100 ms doubled per failed attempt up to 5 s, reset once a stream opens, no jitter). The store holds \
         {NODES} nodes × {WORKLOADS_PER_NODE} workloads with endpoints, one approved policy per workload (ingress \
         from its namespace on 8000/tcp, ingress from one neighbour on 8080/tcp narrowed to two HTTP rules, egress \
         to its namespace), all in enforce: each node's compiled policy has {e_lo}–{e_hi} endpoints, {r_lo}–{r_hi} \
         rule entries and {i_lo}–{i_hi} ipcache entries. A trial kills the learner (SIGKILL), waits the downtime, \
         starts it again and times from the new process' spawn: its gRPC port accepting; the last enforcer's \
         stream open again; the last enforcer's ack of its node's policy (the learner re-stamps versions after a \
         restart; the content must be what the node had); the learner's own view, `GET /api/v1/enforcers` \
         showing every node's applied version = desired version = the one its enforcer acked. Median and max \
         over the trials, in ms:\n\n"
    ));
    md.push_str(
        "| learner down | downtime (median) | trials | gRPC listening | all reconnected | all synced (acked) | median enforcer synced | \
         learner shows all in sync | learner CPU until then | failed reconnect attempts per trial | \
         enforcers admitted before the first compile (longest wait for a policy) |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut labels: Vec<&str> = results.iter().map(|t| t.label.as_str()).collect();
    labels.dedup();
    for label in labels {
        let ts: Vec<&Trial> = results.iter().filter(|t| t.label == label).collect();
        let col = |f: fn(&Trial) -> Duration| {
            let (m, x) = median_max(&ts.iter().map(|t| f(t)).collect::<Vec<_>>());
            format!("{:.0} / {:.0}", ms(m), ms(x))
        };
        let failed: Vec<u64> = ts.iter().map(|t| t.failed_attempts).collect();
        let early: Vec<usize> = ts.iter().map(|t| t.before_compile).collect();
        md.push_str(&format!(
            "| {label} | {:.3} s | {} | {} | {} | {} | {} | {} | {} | {}–{} | {}–{} ({:.0} ms) |\n",
            median_max(&ts.iter().map(|t| t.downtime).collect::<Vec<_>>()).0.as_secs_f64(),
            ts.len(),
            col(|t| t.listening),
            col(|t| t.all_reconnected),
            col(|t| t.all_synced),
            col(|t| t.median_synced),
            col(|t| t.learner_in_sync),
            col(|t| t.learner_cpu),
            failed.iter().min().unwrap_or(&0),
            failed.iter().max().unwrap_or(&0),
            early.iter().min().unwrap_or(&0),
            early.iter().max().unwrap_or(&0),
            ms(ts.iter().map(|t| t.longest_wait).max().unwrap_or_default()),
        ));
    }
    let lower: u64 = results.iter().map(|t| t.lower_versions).sum();
    let lower_total: u64 = clients.iter().map(|c| c.lock().lower_versions).sum();
    let other: Vec<&OtherContent> = results.iter().flat_map(|t| t.other_content.iter()).collect();
    md.push_str(&format!(
        "\nVersions: over all trials, {} updates were offered below the version an enforcer had applied ({} over \
         the whole run) — **{}**. ",
        lower,
        lower_total,
        if lower_total == 0 { "never, as required" } else { "VIOLATION" }
    ));
    let early_trials = results.iter().filter(|t| t.before_compile > 0).count();
    let early: usize = results.iter().map(|t| t.before_compile).sum();
    let longest_wait = results.iter().map(|t| t.longest_wait).max().unwrap_or_default();
    let early_text = format!(
        "In {early_trials} of {} trials the new process admitted enforcers before its first compile ({early} in \
         all; from its log: \"Enforcer connected.\" before the first \"Recompiled node policies.\"). It sent \
         them nothing until that compile — they kept enforcing what they held — and then their node's policy, \
         at most {:.0} ms after their stream opened.",
        results.len(),
        ms(longest_wait)
    );
    if other.is_empty() {
        md.push_str(&format!(
            "Content: no enforcer was sent a policy other than its node's after a restart — **never, as \
             required**. {early_text} (This check found that a restarted learner used to answer such an \
             enforcer with an empty policy, unmanaging the node's workloads until the compile; fixed by \
             `State::compiled` in `learner/src/distribute/stream.rs`.)\n"
        ));
    } else {
        let empty = other.iter().filter(|o| o.endpoints == 0 && o.rules == 0).count();
        let trials_hit = results.iter().filter(|t| !t.other_content.is_empty()).count();
        let arrived_max = other.iter().map(|o| o.after_spawn).max().unwrap_or_default();
        let window_max = other.iter().filter_map(|o| o.replaced_after).max().unwrap_or_default();
        let example = other
            .first()
            .map(|o| format!("{} got v{} with {} endpoints and {} rules", o.node, o.version, o.endpoints, o.rules))
            .unwrap_or_default();
        md.push_str(&format!(
            "**Content: VIOLATION — in {trials_hit} of {} trials, {} times an enforcer was sent a policy other \
             than its node's, {empty} of them empty** (e.g. {example}), arriving up to {:.0} ms after the spawn \
             and replaced by the node's own policy within {:.0} ms at most. A restarted learner must send an \
             enforcer nothing until its first compile (`State::compiled` in \
             `learner/src/distribute/stream.rs`). {early_text}\n",
            results.len(),
            other.len(),
            ms(arrived_max),
            ms(window_max),
        ));
    }
    let refused = log.lines().filter(|l| l.contains("Refused") || l.contains("refused")).count();
    md.push_str(&format!("Learner log lines mentioning a refusal over the run: {refused}.\n"));
    md.push_str(&reading(results));
    let mut violations = Vec::new();
    if lower_total > 0 {
        violations.push(format!("{lower_total} updates were offered below the version an enforcer had applied"));
    }
    if !other.is_empty() {
        violations.push(format!("{} times an enforcer was sent a policy other than its node's", other.len()));
    }
    (md, violations)
}

/// What the numbers say.
fn reading(results: &[Trial]) -> String {
    let group = |label: &str| -> Vec<&Trial> { results.iter().filter(|t| t.label == label).collect() };
    let med = |ts: &[&Trial], f: fn(&Trial) -> Duration| ms(median_max(&ts.iter().map(|t| f(t)).collect::<Vec<_>>()).0);
    let max = |ts: &[&Trial], f: fn(&Trial) -> Duration| ms(median_max(&ts.iter().map(|t| f(t)).collect::<Vec<_>>()).1);
    let now = group(&Downtime::Fixed(Duration::ZERO).label());
    let at = group(&Downtime::AtAttempt.label());
    let longest = results.iter().map(|t| t.downtime).max().unwrap_or_default();
    let long = group(&Downtime::Fixed(longest).label());
    // The agents' attempt times after a break: sums of the doubling, capped backoff.
    let mut attempts = Vec::new();
    let (mut at_time, mut backoff) = (Duration::ZERO, INITIAL_BACKOFF);
    while at_time <= longest + MAX_BACKOFF && attempts.len() < 12 {
        at_time += backoff;
        attempts.push(format!("{:.1}", at_time.as_secs_f64()));
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    let lag = |ts: &[&Trial]| {
        let v: Vec<Duration> = ts.iter().map(|t| t.learner_in_sync.saturating_sub(t.all_synced)).collect();
        ms(median_max(&v).0)
    };
    if now.is_empty() || at.is_empty() || long.is_empty() {
        return String::new();
    }
    format!(
        "\n**Reading.** Restarted at once, the learner listens {:.0} ms after its spawn and all {NODES} enforcers \
         are back on their node's policy {:.0} ms after it (median; max {:.0} ms): their first reconnect attempt \
         comes 100 ms after their streams broke, then {NODES} mTLS handshakes and Hellos (each recorded in the \
         store before its stream answers) open the last stream at {:.0} ms, and the policy follows at once. The \
         learner's own view lags its enforcers by {:.0} ms (median): each ack is a store write and marks the \
         node's proposals deployed. After a longer outage the backoff decides: the attempts come {} s after the \
         break, so down {:.0} s the enforcers came back at their next attempt, all synced {:.0} ms after the \
         spawn (median; max {:.0} ms) — after a long outage up to the 5 s cap plus the above. The agent's backoff \
         has no jitter, so every enforcer that lost the learner at the same moment retries in the same \
         millisecond: started to listen as such an attempt comes, the learner had all {NODES} synced {:.0} ms \
         after its spawn (median; max {:.0} ms{missed}); the herd's handshakes arrive while it is compiling its \
         first node policies (in {herd_early} of {} such trials it admitted enforcers before that compile), \
         and the policies go out once it has. From its spawn until the last node showed in sync the learner used {:.0} ms of CPU (median, \
         immediate restart: start-up, the first compile of {NODES} node policies, {NODES} handshakes, Hellos and \
         acks).\n",
        med(&now, |t| t.listening),
        med(&now, |t| t.all_synced),
        max(&now, |t| t.all_synced),
        med(&now, |t| t.all_reconnected),
        lag(&now),
        attempts.join(", "),
        longest.as_secs_f64(),
        med(&long, |t| t.all_synced),
        max(&long, |t| t.all_synced),
        med(&at, |t| t.all_synced),
        max(&at, |t| t.all_synced),
        at.len(),
        med(&now, |t| t.learner_cpu),
        herd_early = at.iter().filter(|t| t.before_compile > 0).count(),
        // Synced later than one backoff step after the spawn: that trial's learner
        // listened just after an attempt, and the enforcers came at the next.
        missed = if max(&at, |t| t.all_synced) > ms(FOURTH_ATTEMPT / 2) {
            ", when it listened just after the attempt and they came at the next"
        } else {
            ""
        },
    )
}
