//! Harness shared by the enforcer benchmarks (`enforce.rs`, `http.rs`): the test bed
//! (two hosts over a veth bridge, a cgroup per worker, the datapath instance's pins:
//! [`Testbed`]), the datapath driven through the library ([`Enforcer`]), worker
//! processes started in their own cgroup and network namespace and driven over
//! stdin/stdout ([`Worker`], [`run_worker`]), the load generators' skeletons
//! ([`persistent_load`], [`connect_load`]), the benchmark's two-workload node policy,
//! cleanup guards, CPU pinning and the small statistics helpers of the reports.

// Not `expect`: each bench compiles its own copy and uses a different part of it.
#![allow(dead_code, reason = "each benchmark uses a different part")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read as _, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aya::maps::MapInfo;
use aya::programs::loaded_programs;
use bulkhead_abi::enforcer as abi;
use bulkhead_enforcer::datapath::{
    DEFAULT_BPFFS_ROOT, Datapath, DatapathCounters, DatapathOptions, EgressCheck, RuleUse, remove_instance,
};
use bulkhead_enforcer::{MapOp, MapState, diff, render};
use bulkhead_model::{
    Direction, EndpointCgroup, Identity, IpcacheEntry, NodePolicy, NodeRule, PolicyEndpoint, Protocol, RolloutMode,
    RuleKey, RuleRef,
};
use bulkhead_testkit::cgroup::{SubCgroup, TestCgroup};
pub use bulkhead_testkit::error_chain as chain;
use bulkhead_testkit::netns::{ChildGuard, TestHost, TestNet};
use bulkhead_testkit::unique_suffix;
use ipnet::IpNet;

/// Set (to the role) in a worker process: the bench binary re-run as client or server.
pub const WORKER_ENV: &str = "BH_ENFORCE_BENCH_WORKER";
/// Every answer of a worker starts with this.
pub const REPLY: &str = "BHB ";

/// Link pins of a datapath instance (`enforcer/src/datapath/mod.rs`); removing them
/// detaches its programs while its maps stay pinned.
/// Connect and read timeout of the load generators and the servers: a dropped packet
/// is an error, not a hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Identities of the client and the server workload.
pub const CLIENT_ID: Identity = Identity(1000);
pub const SERVER_ID: Identity = Identity(1001);

/// `n` as `1k`, `10k`, … when a whole number of thousands.
pub fn k(n: usize) -> String {
    if n >= 1000 && n.is_multiple_of(1000) { format!("{}k", n / 1000) } else { n.to_string() }
}

/// One benchmark workload: its address and its cgroup.
pub struct Side {
    pub ip: Ipv4Addr,
    pub cgroup_id: u64,
    /// Relative to the cgroup2 root, starting with `/`.
    pub cgroup_path: String,
}

/// The client and the server workload.
pub struct Sides {
    pub client: Side,
    pub server: Side,
}

/// What a benchmark runs in: two hosts (network namespaces over a veth bridge), the
/// client's and the server's cgroups below a parent cgroup the datapath instance is
/// attached to, and the instance's bpffs pins. Everything has a unique per-run name
/// and goes on drop, also when the benchmark panics. Fields drop in declaration
/// order: the worker cgroups (their processes must be gone by then — declare the
/// [`Worker`]s after the test bed), the pins (the programs detach, the maps go), the
/// parent cgroup, the namespaces.
pub struct Testbed {
    server_cg: SubCgroup,
    client_cg: SubCgroup,
    _pins: Pins,
    parent: TestCgroup,
    net: TestNet,
    instance: String,
}

impl Testbed {
    /// `name` prefixes the datapath instance's pin directory.
    pub fn new(name: &str) -> Testbed {
        let net = TestNet::new(2);
        let parent = TestCgroup::new();
        let instance = format!("{name}-{}", unique_suffix());
        let pins = Pins { instance: instance.clone() };
        let client_cg = SubCgroup::new(parent.path(), "client");
        let server_cg = SubCgroup::new(parent.path(), "server");
        // Hundreds of thousands of connections from one address to two ports would run
        // the client out of ports held in TIME_WAIT: reuse them and widen the range (both
        // per network namespace: only the client's namespace changes).
        net.hosts()[0].netns.run(|| {
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").expect("tcp_tw_reuse");
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").expect("port range");
        });
        Testbed { server_cg, client_cg, _pins: pins, parent, net, instance }
    }

    pub fn client_host(&self) -> &TestHost {
        &self.net.hosts()[0]
    }

    pub fn server_host(&self) -> &TestHost {
        &self.net.hosts()[1]
    }

    /// The server's address on `port`.
    pub fn server_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.server_host().ipv4.into(), port)
    }

    /// How to load this bed's datapath instance (attached to the parent cgroup).
    pub fn datapath_options(&self) -> DatapathOptions {
        DatapathOptions::new(self.instance.clone(), self.parent.path())
    }

    pub fn sides(&self) -> Sides {
        let side =
            |host: &TestHost, cg: &SubCgroup| Side { ip: host.ipv4, cgroup_id: cg.id(), cgroup_path: cg.rel_path() };
        Sides { client: side(self.client_host(), &self.client_cg), server: side(self.server_host(), &self.server_cg) }
    }

    /// Starts this benchmark binary again as the server, then as the client worker,
    /// each in its namespace and cgroup, and waits until both are ready. Returns
    /// (server, client).
    pub fn workers(&self) -> (Worker, Worker) {
        let exe = std::env::current_exe().expect("bench binary");
        let mut server = Worker::spawn("server", &self.server_cg, &self.server_host().netns, &exe);
        server.expect_ready();
        let mut client = Worker::spawn("client", &self.client_cg, &self.client_host().netns, &exe);
        client.expect_ready();
        (server, client)
    }
}

/// A TCP rule key of the benchmark's policies.
pub fn tcp_key(local: Identity, direction: Direction, peer: Identity, port: u16) -> RuleKey {
    RuleKey { local, direction, peer: Some(peer), port: Some(port), protocol: Some(Protocol::Tcp) }
}

/// A node policy over the two workloads: both managed with both directions covered,
/// the client ([`CLIENT_ID`]) in enforce and the server ([`SERVER_ID`]) in
/// `server_mode`; the ipcache maps both hosts' addresses and `other_ipcache`; the
/// `rules` with one rule reference per rule id — everything a real snapshot has.
pub fn two_workload_policy(
    sides: &Sides,
    version: u64,
    server_mode: RolloutMode,
    other_ipcache: impl IntoIterator<Item = IpcacheEntry>,
    mut rules: Vec<NodeRule>,
) -> NodePolicy {
    let host = |ip: Ipv4Addr| IpNet::new(IpAddr::V4(ip), 32).expect("/32");
    let mut ipcache = vec![
        IpcacheEntry { prefix: host(sides.client.ip), identity: CLIENT_ID },
        IpcacheEntry { prefix: host(sides.server.ip), identity: SERVER_ID },
    ];
    ipcache.extend(other_ipcache);
    ipcache.sort();
    let endpoint = |identity, side: &Side, mode| PolicyEndpoint {
        identity,
        netns_ino: None,
        netns_name: None,
        cgroups: vec![EndpointCgroup { cgroup_id: side.cgroup_id, path: side.cgroup_path.clone() }],
        mode,
        ingress_covered: true,
        egress_covered: true,
    };
    let endpoints =
        vec![endpoint(CLIENT_ID, &sides.client, RolloutMode::Enforce), endpoint(SERVER_ID, &sides.server, server_mode)];
    rules.sort();
    let mut ids: BTreeMap<u32, Direction> = BTreeMap::new();
    for r in &rules {
        ids.insert(r.rule_id, r.key.direction);
    }
    let rule_refs = ids
        .into_iter()
        .map(|(rule_id, direction)| RuleRef {
            rule_id,
            proposal_id: 1,
            policy_name: "bench".to_owned(),
            direction,
            rule_index: rule_id,
        })
        .collect();
    NodePolicy { version, ipcache, endpoints, rules, rule_refs }
}

/// One timed policy apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyTimes {
    pub rules: usize,
    /// Policy entries applied before.
    pub from: usize,
    pub validate: Duration,
    pub render: Duration,
    pub diff: Duration,
    pub write: Duration,
    pub activate: Duration,
    pub delete: Duration,
    /// ipcache and endpoint ops: upserts on the first apply, and the bridge/settle
    /// writes of the double-buffered maps around a flip.
    pub other: Duration,
}

impl ApplyTimes {
    /// render + diff + write generation + activate + delete old (+ ipcache/endpoints).
    pub fn total(&self) -> Duration {
        self.render + self.diff + self.write + self.activate + self.delete + self.other
    }
}

/// A map op's name for messages.
pub fn op_name(op: &MapOp) -> String {
    format!("{op:?}").chars().take_while(|c| c.is_alphanumeric()).collect()
}

/// The datapath instance, attached while a Bulkhead configuration runs.
pub struct Enforcer {
    opts: DatapathOptions,
    dp: Option<Datapath>,
    /// What the maps hold (the last applied render).
    state: MapState,
    version: u64,
    /// Kernel counters when the programs were detached: they must not move until
    /// the programs are attached again.
    detached_at: Option<DatapathCounters>,
}

impl Enforcer {
    pub fn new(opts: DatapathOptions) -> Enforcer {
        Enforcer { opts, dp: None, state: MapState::default(), version: 0, detached_at: None }
    }

    pub fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    /// Loads (first time) or adopts the pinned maps and attaches the programs
    /// that judge egress `egress` (replacing the other way's when attached).
    pub fn attach(&mut self, egress: EgressCheck) {
        if self.dp.is_some() && self.opts.egress == egress {
            return;
        }
        self.detach();
        self.opts.egress = egress;
        let mut dp = Datapath::load(&self.opts).unwrap_or_else(|e| panic!("loading the datapath: {}", chain(&e)));
        // What the map owner does on start-up (untimed): read the maps back, so
        // the datapath knows which policy generations have entries.
        let back = dp.read_state().unwrap_or_else(|e| panic!("reading the maps back: {}", chain(&e)));
        assert!(back.stale_generations.is_empty(), "{:?}", back.stale_generations);
        if let Some(before) = self.detached_at.take() {
            let now = dp.counters();
            assert_eq!(
                (now.allowed, now.ct_hits, now.unmanaged, now.denied),
                (before.allowed, before.ct_hits, before.unmanaged, before.denied),
                "the programs judged packets while detached"
            );
        }
        self.dp = Some(dp);
    }

    /// Stops managing both workloads (the programs stay attached). The next apply
    /// manages them again: they leave the applied state too.
    pub fn unmanage(&mut self, sides: &Sides) {
        let dp = self.dp.as_mut().expect("datapath attached");
        for side in [&sides.client, &sides.server] {
            // Also when the endpoint is absent (aya 0.14's ENOENT counts as missing).
            dp.remove_endpoint(side.cgroup_id).expect("remove endpoint");
            self.state.endpoints.remove(&abi::EndpointKey { cgroup_id: side.cgroup_id });
        }
    }

    /// Fills the LRU maps (`CONNTRACK_V1`, `DECISIONS_V1`) to capacity with entries of no workload, as on a node that has
    /// run for a while: every insert then evicts, which is what an insert costs
    /// in steady state (an LRU with free slots left is cheaper, and would flatter
    /// the first minutes of a run). Returns the entries written.
    pub fn fill_lru_maps(&self) -> usize {
        use aya::maps::{HashMap as BpfHashMap, MapData};
        let dir = self.opts.pin_dir();
        let mut written = 0;
        let ct = MapData::from_pin(dir.join(abi::CONNTRACK)).expect("conntrack pin");
        let cap = ct.info().expect("conntrack info").max_entries();
        let mut ct: BpfHashMap<MapData, abi::CtKey, abi::CtValue> =
            BpfHashMap::try_from(aya::maps::Map::LruHashMap(ct)).expect("conntrack map");
        for i in 0..cap {
            let key = abi::CtKey {
                cgroup_id: u64::MAX - 1,
                local_addr: [0; 16],
                remote_addr: [0; 16],
                local_port: (i & 0xffff) as u16,
                remote_port: (i >> 16) as u16,
                protocol: abi::IPPROTO_TCP,
                _pad: [0; 3],
            };
            ct.insert(key, abi::CtValue::default(), 0).expect("filling conntrack");
            written += 1;
        }
        let decisions = MapData::from_pin(dir.join(abi::DECISIONS)).expect("decisions pin");
        let cap = decisions.info().expect("decisions info").max_entries();
        let mut decisions: BpfHashMap<MapData, abi::DecisionKey, abi::DecisionValue> =
            BpfHashMap::try_from(aya::maps::Map::LruHashMap(decisions)).expect("decisions map");
        for i in 0..cap {
            // Generation u32::MAX is never active in a run.
            let key = abi::DecisionKey { generation: u32::MAX, local_identity: i, ..abi::DecisionKey::default() };
            decisions.insert(key, abi::DecisionValue::default(), 0).expect("filling decisions");
            written += 1;
        }
        written
    }

    /// Detaches the programs (the maps stay pinned and keep the policy).
    pub fn detach(&mut self) {
        let Some(dp) = self.dp.take() else { return };
        let links = std::fs::read_dir(dp.pin_dir()).expect("pin dir").filter_map(Result::ok).map(|e| e.path());
        for path in links.filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_"))) {
            std::fs::remove_file(&path).unwrap_or_else(|e| panic!("unpinning {}: {e}", path.display()));
        }
        // Runs that started before the links went may still be finishing.
        std::thread::sleep(Duration::from_millis(50));
        self.detached_at = Some(dp.counters());
    }

    pub fn counters(&self) -> Option<DatapathCounters> {
        self.dp.as_ref().map(Datapath::counters)
    }

    /// Hits per rule id, while attached.
    pub fn rule_use(&self) -> Option<BTreeMap<u32, RuleUse>> {
        self.dp.as_ref().map(Datapath::rule_use)
    }

    /// Validate, render, diff, and the ops applied through `Datapath`, each timed.
    pub fn apply(&mut self, policy: &NodePolicy) -> ApplyTimes {
        let mut t = ApplyTimes { rules: policy.rules.len(), from: self.state.policy.len(), ..ApplyTimes::default() };
        let clock = Instant::now();
        policy.validate().unwrap_or_else(|e| panic!("invalid benchmark policy: {e}"));
        t.validate = clock.elapsed();
        let dp = self.dp.as_mut().expect("datapath attached");
        let generation = dp.active_generation().expect("active generation").wrapping_add(1);
        let clock = Instant::now();
        let next = render(policy, generation).unwrap_or_else(|e| panic!("render: {e}"));
        t.render = clock.elapsed();
        let clock = Instant::now();
        let ops = diff(&self.state, &next);
        t.diff = clock.elapsed();
        for op in &ops {
            // One op at a time through `Datapath::apply`, to time each kind.
            let clock = Instant::now();
            dp.apply(std::slice::from_ref(op)).unwrap_or_else(|e| panic!("applying {}: {}", op_name(op), chain(&e)));
            let took = clock.elapsed();
            match op {
                MapOp::WriteGeneration { .. } => t.write += took,
                MapOp::Activate { .. } => t.activate += took,
                MapOp::DeleteGeneration { .. } | MapOp::DeleteGenerationKeys { .. } => t.delete += took,
                _ => t.other += took,
            }
        }
        self.state = next;
        t
    }

    /// ids of this instance's programs: those using its policy map.
    pub fn program_ids(&self) -> Vec<u32> {
        let policy = MapInfo::from_pin(self.opts.pin_dir().join(abi::POLICY)).expect("policy map info").id();
        loaded_programs()
            .filter_map(Result::ok)
            .filter(|p| p.map_ids().ok().flatten().is_some_and(|ids| ids.contains(&policy)))
            .map(|p| p.id())
            .collect()
    }

    /// Runs each of `loads` (kind, destination, connections or threads) once for
    /// `round` on `client` with BPF run-time statistics enabled (`BPF_ENABLE_STATS`,
    /// held only for these rounds), reading the run time and count of the instance's
    /// two programs around each.
    pub fn profile_loads(
        &self,
        client: &mut Worker,
        loads: &[(&'static str, SocketAddr, usize)],
        round: Duration,
    ) -> Vec<ProfileRow> {
        assert!(self.dp.is_some(), "profiling needs the programs attached");
        let ids = self.program_ids();
        assert!(ids.len() >= 2, "expected the instance's programs, found {ids:?}");
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
        // (run time ns, runs) of the ingress program and of the egress ones (the
        // cgroup_skb egress program, or the connect/sendmsg programs), summed.
        let read = || -> BTreeMap<String, (u64, u64)> {
            let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for p in loaded_programs().filter_map(Result::ok).filter(|p| ids.contains(&p.id())) {
                let side = if p.name_as_str().unwrap_or_default().starts_with("enforce_in") {
                    "enforce_ingress"
                } else {
                    "enforce_egress"
                };
                let sum = sums.entry(side.to_owned()).or_default();
                sum.0 += p.run_time().as_nanos() as u64;
                sum.1 += p.run_count();
            }
            sums
        };
        let mut rows = Vec::new();
        for &(kind, dst, conns) in loads {
            let before = read();
            let load = client.run(kind, dst, conns, round);
            let after = read();
            assert!(after.contains_key("enforce_ingress"), "{after:?}");
            let delta = |name: &str| {
                let (a, b) = (after[name], before.get(name).copied().unwrap_or_default());
                (a.0 - b.0, a.1 - b.1)
            };
            rows.push(ProfileRow { kind, load, ingress: delta("enforce_ingress"), egress: delta("enforce_egress") });
        }
        drop(stats);
        rows
    }

    /// (map name, max entries, memlock bytes) of every map of the instance.
    pub fn memory(&self) -> Vec<(String, u32, u64)> {
        abi::MAP_NAMES
            .iter()
            .map(|name| {
                let info = MapInfo::from_pin(self.opts.pin_dir().join(name)).expect("map info");
                let fd = info.fd().expect("map fd");
                let fdinfo =
                    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd())).expect("fdinfo");
                let memlock = fdinfo
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                ((*name).to_owned(), info.max_entries(), memlock)
            })
            .collect()
    }
}

// === fixtures ===

/// Removes the instance's pins on drop, so its programs detach and maps go.
pub struct Pins {
    pub instance: String,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = remove_instance(Path::new(DEFAULT_BPFFS_ROOT), &self.instance) {
            eprintln!("cleanup: removing pins of {}: {e}", self.instance);
        }
    }
}

// === workers ===

/// The bench's handle on a worker process.
pub struct Worker {
    name: &'static str,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _child: ChildGuard,
}

/// One load round as the client measured it.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub done: u64,
    pub elapsed: Duration,
    pub errors: u64,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }
}

/// One load with BPF run-time statistics on, split by program.
#[derive(Debug)]
pub struct ProfileRow {
    pub kind: &'static str,
    pub load: Load,
    /// (run time ns, runs) of `enforce_ingress` (what the client and the server receive).
    pub ingress: (u64, u64),
    /// (run time ns, runs) of `enforce_egress` (what they send).
    pub egress: (u64, u64),
}

impl ProfileRow {
    /// Transactions (requests) of the load, at least 1.
    pub fn transactions(&self) -> f64 {
        self.load.done.max(1) as f64
    }

    /// Program runs, both programs.
    pub fn runs(&self) -> u64 {
        self.ingress.1 + self.egress.1
    }

    /// Program run time in ns, both programs.
    pub fn ns(&self) -> u64 {
        self.ingress.0 + self.egress.0
    }

    pub fn ns_per_run(&self) -> f64 {
        self.ns() as f64 / self.runs().max(1) as f64
    }

    /// Program ns per transaction: both programs, ingress, egress.
    pub fn per_transaction(&self) -> (f64, f64, f64) {
        let n = self.transactions();
        (self.ns() as f64 / n, self.ingress.0 as f64 / n, self.egress.0 as f64 / n)
    }
}

impl Worker {
    pub fn spawn(name: &'static str, cg: &SubCgroup, netns: &bulkhead_testkit::netns::Netns, exe: &Path) -> Worker {
        let mut cmd = cg.command(exe);
        cmd.env(WORKER_ENV, name).stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = netns.spawn(&mut cmd);
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Worker { name, stdin, stdout, _child: child }
    }

    pub fn answer(&mut self) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap_or_else(|e| panic!("worker {}: read: {e}", self.name));
            assert!(n > 0, "worker {} exited", self.name);
            if let Some(answer) = line.trim_end().strip_prefix(REPLY) {
                return answer.to_owned();
            }
        }
    }

    /// Sends one command line, returns the worker's answer to it.
    pub fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap_or_else(|e| panic!("worker {}: write: {e}", self.name));
        self.answer()
    }

    pub fn expect_ready(&mut self) {
        let a = self.answer();
        assert_eq!(a, "ready", "worker {}", self.name);
    }

    /// `kind` is `rr` or `crr`; `conns` connections or threads for `dur`.
    pub fn run(&mut self, kind: &str, dst: SocketAddr, conns: usize, dur: Duration) -> Load {
        let a = self.ask(&format!("{kind} {dst} {conns} {}", dur.as_millis()));
        let f: Vec<u64> = a.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        let [done, elapsed_ns, errors] = f[..] else { panic!("worker {}: bad answer {a:?}", self.name) };
        Load { done, elapsed: Duration::from_nanos(elapsed_ns), errors }
    }
}

// === inside the workers ===

/// Runs this process as a worker when it was started as one ([`WORKER_ENV`] set to
/// `server` or `client`): pinned to [`bench_cpu`], it runs `server` or `client` and
/// returns true (the benchmark's `main` then returns). False in the benchmark itself.
pub fn run_worker(server: fn(), client: fn()) -> bool {
    let Ok(role) = std::env::var(WORKER_ENV) else { return false };
    pin_to_bench_cpu();
    match role.as_str() {
        "server" => server(),
        "client" => client(),
        other => panic!("unknown worker role {other:?}"),
    }
    true
}

/// The server worker: persistent connections on `persistent.0`, each served by a
/// thread of its own running `persistent.1` until the client closes it; one exchange
/// per connection on `once.0`, `once.1` threads accepting and each running `once.2`
/// inline (with a read timeout of [`IO_TIMEOUT`]). Answers `ready`, then serves until
/// its stdin closes.
pub fn serve(persistent: (u16, fn(TcpStream)), once: (u16, usize, fn(TcpStream))) {
    let (port, handler) = persistent;
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind the persistent port");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(s) = conn else { continue };
            std::thread::spawn(move || handler(s));
        }
    });
    let (port, threads, handler) = once;
    let listener = TcpListener::bind(("0.0.0.0", port)).expect("bind the one-exchange port");
    for _ in 0..threads {
        let l = listener.try_clone().expect("clone listener");
        std::thread::spawn(move || {
            loop {
                if let Ok((s, _)) = l.accept() {
                    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                    handler(s);
                }
            }
        });
    }
    println!("{REPLY}ready");
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}

/// A load generator: (destination, connections or threads, duration) → what it did.
pub type LoadFn = fn(SocketAddr, usize, Duration) -> Load;

/// The client worker: answers `ready`, then each stdin line `KIND ADDR N MS` runs the
/// load named KIND in `loads` against ADDR with N connections or threads for MS
/// milliseconds and answers `done elapsed_ns errors` ([`Worker::run`]). Any other line
/// goes to `other` (as words), which answers it or returns `None` for a bad command.
pub fn client(loads: &[(&str, LoadFn)], other: fn(&[&str]) -> Option<String>) {
    println!("{REPLY}ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<&str> = line.split_whitespace().collect();
        let load = match w[..] {
            [kind, dst, n, ms] => loads.iter().find(|(k, _)| *k == kind).map(|(_, load)| {
                let dst: SocketAddr = dst.parse().expect("address");
                load(dst, n.parse().expect("count"), Duration::from_millis(ms.parse().expect("ms")))
            }),
            _ => None,
        };
        let answer = match load {
            Some(l) => format!("{} {} {}", l.done, l.elapsed.as_nanos(), l.errors),
            None => other(&w).unwrap_or_else(|| panic!("bad command {line:?}")),
        };
        println!("{REPLY}{answer}");
    }
}

/// `conns` persistent connections (`TCP_NODELAY`, read timeout [`IO_TIMEOUT`]), one
/// client thread each running `exchange` on its connection in a loop for `dur`. An
/// exchange that fails counts as an error and ends its connection's loop; a
/// connection that could not be opened counts as one.
pub fn persistent_load(
    dst: SocketAddr,
    conns: usize,
    dur: Duration,
    exchange: impl Fn(&mut TcpStream, &mut Vec<u8>) -> std::io::Result<()> + Sync,
) -> Load {
    let errors = AtomicU64::new(0);
    let mut streams = Vec::new();
    for _ in 0..conns {
        match TcpStream::connect_timeout(&dst, IO_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                streams.push(s);
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for s in streams.iter_mut() {
            let (done, errors, exchange) = (&done, &errors, &exchange);
            scope.spawn(move || {
                let mut buf = Vec::with_capacity(4096);
                let mut n = 0u64;
                while start.elapsed() < dur {
                    if exchange(s, &mut buf).is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    Load { done: done.into_inner(), elapsed: start.elapsed(), errors: errors.into_inner() }
}

/// `threads` loops of connect, `exchange` on the new connection (read timeout
/// [`IO_TIMEOUT`]), close, for `dur`; a failed connect or exchange counts as an error.
pub fn connect_load(
    dst: SocketAddr,
    threads: usize,
    dur: Duration,
    exchange: impl Fn(&mut TcpStream, &mut Vec<u8>) -> std::io::Result<()> + Sync,
) -> Load {
    let (done, errors) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let (done, errors, exchange) = (&done, &errors, &exchange);
            scope.spawn(move || {
                let mut buf = Vec::with_capacity(4096);
                while start.elapsed() < dur {
                    buf.clear();
                    let ok = TcpStream::connect_timeout(&dst, IO_TIMEOUT).and_then(|mut s| {
                        s.set_read_timeout(Some(IO_TIMEOUT))?;
                        exchange(&mut s, &mut buf)
                    });
                    match ok {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            });
        }
    });
    Load { done: done.into_inner(), elapsed: start.elapsed(), errors: errors.into_inner() }
}

/// The CPU both workers run on: the last one.
pub fn bench_cpu() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from) - 1
}

/// Pins this process (and the threads it starts later) to [`bench_cpu`]. With the
/// client on one vCPU and the server on the other, every RR transaction costs two
/// cross-CPU wakeups (IPIs, VM exits here) and the rate jumped between ~48k and
/// ~90k/s with the scheduler's placement; on one CPU each transaction's whole path
/// (both processes, both stacks, veth and bridge softirqs) runs there, so the rate
/// measures CPU cost per transaction, which is what a filter adds to.
pub fn pin_to_bench_cpu() {
    let mut set = nix::sched::CpuSet::new();
    set.set(bench_cpu()).expect("cpu index");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

pub fn range(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

pub fn median_duration(v: impl Iterator<Item = Duration>) -> Duration {
    let mut s: Vec<Duration> = v.collect();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}
