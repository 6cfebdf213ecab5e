//! Enforcer datapath benchmark (root, issue 4 "Numbers"): TCP request/response rate
//! (RR: persistent connections, 1-byte ping-pong) and new-connection rate (CRR:
//! connect, one 1-byte request/response, close) between two network namespaces,
//! measured in the same run for
//! * no filter,
//! * iptables (legacy and nf_tables backends) with N non-matching rules on the
//!   server's INPUT path (`-s <other address> -p tcp --dport 9000 -j DROP`),
//! * nftables with the same N addresses as one set lookup (`ip saddr @blocked drop`),
//! * Bulkhead in enforce mode with N policy entries (the allowing entries for the
//!   traffic plus entries for 10,000 other identities and other ports), the client's
//!   and the server's cgroups both managed with both directions covered.
//!
//! The client and the server are this binary re-run as worker processes
//! (`BH_ENFORCE_BENCH_WORKER`), each started inside its network namespace and its
//! cgroup from its first instruction: cgroup_skb judges a packet by the cgroup of
//! the process that created the socket. The client is driven over stdin/stdout.
//!
//! Hygiene on two shared, noisy cores: every configuration is measured in several
//! short rounds of [`ROUND`], the configurations interleaved round-robin (the start
//! rotates each cycle); tables give the median and the range. Bulkhead's policy is
//! applied through the library (validate, render, diff, then the map ops through
//! `Datapath`) every time a Bulkhead configuration starts, and those applies are
//! timed. For the other configurations the programs are detached (link pins
//! removed), so "no filter" means no program at all.
//!
//! Everything created (namespaces, cgroups, bpffs pins, iptables/nft rules) has a
//! unique per-run name and is removed on drop, also when the benchmark panics.
//!
//! Run: `cargo bench -p bulkhead-enforcer --bench enforce` (as root). Writes the
//! `## Enforcer datapath` section of BENCHMARKS.md.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bulkhead_abi::enforcer as abi;
use bulkhead_enforcer::datapath::EgressCheck;
use bulkhead_model::{Direction, Identity, IpcacheEntry, NodePolicy, NodeRule, RolloutMode};
use bulkhead_testkit::benchmarks::{load_average, machine};
use bulkhead_testkit::{require_root, unique_suffix};
use common::{
    ApplyTimes, CLIENT_ID, Enforcer, Load, ProfileRow, SERVER_ID, Sides, Testbed, Worker, bench_cpu, connect_load, k,
    median, median_duration, ms, persistent_load, range, run_worker, serve, tcp_key, two_workload_policy,
};
use ipnet::IpNet;

const RR_PORT: u16 = 9000;
const CRR_PORT: u16 = 9001;
/// One measurement (RR or CRR) of one configuration.
const ROUND: Duration = Duration::from_secs(2);
/// Rounds per configuration.
const CYCLES: usize = 5;
/// Set to run one short cycle (a smoke test of the benchmark itself; BENCHMARKS.md
/// is not written).
const QUICK_ENV: &str = "BH_ENFORCE_BENCH_QUICK";
/// Set: only the profile rounds (program run time), for trying a datapath change.
const PROFILE_ONLY_ENV: &str = "BH_ENFORCE_BENCH_PROFILE_ONLY";
/// Extra applies of the 100k policy over itself, for the steady-state apply time.
const APPLY_REPEATS: usize = 5;
/// Persistent connections of the RR load, one client thread each.
const RR_CONNS: usize = 2;
/// Client threads of the CRR load (and server accept threads).
const CRR_THREADS: usize = 4;
/// Addresses of "other" workloads: iptables sources, nft set elements, ipcache entries.
const OTHER_ADDRS: usize = 10_000;
/// Identity of other address `k` is `OTHER_ID_FIRST + k`.
const OTHER_ID_FIRST: u32 = 20_000;

fn main() {
    if run_worker(server_worker, client_worker) {
        return;
    }
    // `cargo bench` passes --bench; nothing else to parse.
    require_root();
    let started = Instant::now();
    let load_at_start = load_average();
    let quick = std::env::var_os(QUICK_ENV).is_some();
    let profile_only = std::env::var_os(PROFILE_ONLY_ENV).is_some();
    let (cycles, round) = if profile_only {
        (0, ROUND)
    } else if quick {
        (1, Duration::from_millis(300))
    } else {
        (CYCLES, ROUND)
    };

    // Declared in reverse drop order: the enforcer's handles and the workers go first,
    // then the firewall rules, then the test bed (cgroups, pins, namespaces).
    let bed = Testbed::new("bench");
    let mut firewall = Firewall::new(bed.server_host().netns.name());
    let (server, mut client) = bed.workers();
    let sides = bed.sides();
    let mut enforcer = Enforcer::new(bed.datapath_options());

    // Warm-up, then cycles of every configuration.
    let rr_dst = bed.server_addr(RR_PORT);
    let crr_dst = bed.server_addr(CRR_PORT);
    client.run("rr", rr_dst, RR_CONNS, Duration::from_millis(500));
    client.run("crr", crr_dst, CRR_THREADS, Duration::from_millis(500));
    // Steady state for the per-connection LRU maps (the programs judge nothing yet).
    enforcer.attach(EgressCheck::Connect);
    let filled = enforcer.fill_lru_maps();
    println!("[{:>5.1}s] filled the LRU maps with {filled} entries", started.elapsed().as_secs_f64());
    enforcer.detach();

    let configs = Filter::ALL;
    let mut results: BTreeMap<Filter, Samples> = BTreeMap::new();
    // Keyed by (entries after, entries before).
    let mut applies: BTreeMap<(usize, usize), Vec<ApplyTimes>> = BTreeMap::new();
    let mut current = Filter::None;
    println!(
        "enforce bench: {} configurations × {cycles} cycles × (RR + CRR) of {:.1} s",
        configs.len(),
        round.as_secs_f64()
    );
    for cycle in 0..cycles {
        for i in 0..configs.len() {
            let filter = configs[(i + cycle) % configs.len()];
            let switch_started = Instant::now();
            if let Some(times) = switch(&mut firewall, &mut enforcer, &sides, current, filter) {
                applies.entry((times.rules, times.from)).or_default().push(times);
            }
            current = filter;
            let switch_took = switch_started.elapsed();
            let before = enforcer.counters();
            let rr = client.run("rr", rr_dst, RR_CONNS, round);
            let crr = client.run("crr", crr_dst, CRR_THREADS, round);
            let check = enforcer.counters().zip(before).map(|(after, before)| Judged {
                allowed: after.allowed - before.allowed,
                denied: after.denied - before.denied,
                unmanaged: after.unmanaged - before.unmanaged,
                ct_hits: after.ct_hits - before.ct_hits,
                fast_path: after.fast_path - before.fast_path,
                connections: crr.done + RR_CONNS as u64,
            });
            println!(
                "[{:>5.1}s] cycle {}/{cycles} {:<18} RR {:>7.0}/s  CRR {:>6.0}/s  errors {}  (switch {:.2}s{})",
                started.elapsed().as_secs_f64(),
                cycle + 1,
                filter.label(),
                rr.rate(),
                crr.rate(),
                rr.errors + crr.errors,
                switch_took.as_secs_f64(),
                check
                    .map(|j| format!(
                        ", judged: {} allowed / {} denied / {} unmanaged / {} ct hits / {} fast path",
                        j.allowed, j.denied, j.unmanaged, j.ct_hits, j.fast_path
                    ))
                    .unwrap_or_default()
            );
            let s = results.entry(filter).or_default();
            s.rr.push(rr.rate());
            s.crr.push(crr.rate());
            s.errors += rr.errors + crr.errors;
            if let Some(j) = check {
                s.judged.push(j);
            }
        }
    }

    // Where Bulkhead's time goes: the programs' own run time (BPF_ENABLE_STATS,
    // held only for this phase), and the instance's kernel memory at 100k rules.
    println!("[{:>5.1}s] profiling the programs (bpf stats on)", started.elapsed().as_secs_f64());
    let mut profiles = Vec::new();
    for filter in
        [Filter::BulkheadIdle, Filter::Bulkhead(1_000), Filter::Bulkhead(100_000), Filter::BulkheadPacket(100_000)]
    {
        if let Some(times) = switch(&mut firewall, &mut enforcer, &sides, current, filter) {
            applies.entry((times.rules, times.from)).or_default().push(times);
        }
        current = filter;
        profiles.push(profile(&enforcer, filter, &mut client, rr_dst, crr_dst, round));
    }
    // Steady state: a new version of the same 100k policy replaces the applied one.
    for _ in 0..APPLY_REPEATS {
        let version = enforcer.next_version();
        let times = enforcer.apply(&node_policy(100_000, &sides, version));
        applies.entry((times.rules, times.from)).or_default().push(times);
    }
    let memory = enforcer.memory();
    switch(&mut firewall, &mut enforcer, &sides, current, Filter::None);
    drop(client);
    drop(server);

    if profile_only {
        for p in &profiles {
            for row in &p.rows {
                println!(
                    "{:<40} {} {:>6.0}/s {:>5.1} runs {:>5.0} ns/run {:>6.2} µs/transaction (ingress {:.2}, egress {:.2})",
                    p.filter.label(),
                    row.kind,
                    row.load.rate(),
                    row.runs() as f64 / row.transactions(),
                    row.ns_per_run(),
                    row.per_transaction().0 / 1000.0,
                    row.ingress.0 as f64 / row.transactions() / 1000.0,
                    row.egress.0 as f64 / row.transactions() / 1000.0,
                );
            }
        }
        return;
    }
    let md = report(&results, &applies, &profiles, &memory, &machine(&load_at_start, started.elapsed()));
    println!("\n{md}");
    if quick {
        println!("{QUICK_ENV} set: BENCHMARKS.md left alone");
        return;
    }
    match bulkhead_testkit::benchmarks::write_section("Enforcer datapath", &md) {
        Ok(path) => println!("wrote ## Enforcer datapath to {}", path.display()),
        Err(e) => panic!("could not update BENCHMARKS.md: {e}"),
    }
}

// === configurations ===

/// What sits in the path of the benchmark's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Filter {
    None,
    /// iptables-legacy, N rules in the server's INPUT path.
    IptLegacy(usize),
    /// iptables with the nf_tables backend (Debian's default `iptables`), N rules.
    IptNft(usize),
    /// nftables, N addresses in one set, one rule.
    NftSet(usize),
    /// Bulkhead's programs attached, the workloads not managed: the hook's own cost
    /// plus one endpoint lookup per packet.
    BulkheadIdle,
    /// Bulkhead enforce mode, N policy entries, egress judged at connect (the default).
    Bulkhead(usize),
    /// The same with egress judged per packet (`EgressCheck::Packet`).
    BulkheadPacket(usize),
}

impl Filter {
    const ALL: [Filter; 11] = [
        Filter::None,
        Filter::IptLegacy(1_000),
        Filter::IptLegacy(10_000),
        Filter::IptNft(10_000),
        Filter::NftSet(1_000),
        Filter::NftSet(10_000),
        Filter::BulkheadIdle,
        Filter::Bulkhead(1_000),
        Filter::Bulkhead(10_000),
        Filter::Bulkhead(100_000),
        Filter::BulkheadPacket(100_000),
    ];

    fn label(self) -> String {
        match self {
            Filter::None => "no filter".to_owned(),
            Filter::IptLegacy(n) => format!("iptables-legacy {}", k(n)),
            Filter::IptNft(n) => format!("iptables-nft {}", k(n)),
            Filter::NftSet(n) => format!("nft set {}", k(n)),
            Filter::BulkheadIdle => "bulkhead unmanaged".to_owned(),
            Filter::Bulkhead(n) => format!("bulkhead {}", k(n)),
            Filter::BulkheadPacket(n) => format!("bulkhead per-packet egress {}", k(n)),
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Filter::None => "no filter",
            Filter::IptLegacy(_) => "iptables (legacy), N rules in INPUT",
            Filter::IptNft(_) => "iptables (nf_tables backend), N rules in INPUT",
            Filter::NftSet(_) => "nftables, one rule, set of N addresses",
            Filter::BulkheadIdle => "Bulkhead attached, workloads not managed",
            Filter::Bulkhead(_) => "Bulkhead enforce, N policy entries",
            Filter::BulkheadPacket(_) => "Bulkhead enforce, N policy entries, egress judged per packet",
        }
    }

    fn rules(self) -> Option<usize> {
        match self {
            Filter::None | Filter::BulkheadIdle => None,
            Filter::IptLegacy(n)
            | Filter::IptNft(n)
            | Filter::NftSet(n)
            | Filter::Bulkhead(n)
            | Filter::BulkheadPacket(n) => Some(n),
        }
    }
}

/// Other address `k`: `10.100.0.0 + k`, never one of the benchmark's hosts.
fn other_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + k as u32)
}

/// Tears down `from` and sets up `to`; returns the apply timing when Bulkhead's
/// policy was applied.
fn switch(fw: &mut Firewall, enforcer: &mut Enforcer, sides: &Sides, from: Filter, to: Filter) -> Option<ApplyTimes> {
    match from {
        Filter::None | Filter::BulkheadIdle | Filter::Bulkhead(_) | Filter::BulkheadPacket(_) => {}
        Filter::IptLegacy(_) => fw.flush_iptables("iptables-legacy-restore"),
        Filter::IptNft(_) => fw.flush_iptables("iptables-nft-restore"),
        Filter::NftSet(_) => fw.delete_nft_table(),
    }
    // `attach` replaces the programs when the egress check changes.
    let attached = |f: Filter| matches!(f, Filter::Bulkhead(_) | Filter::BulkheadPacket(_) | Filter::BulkheadIdle);
    if attached(from) && !attached(to) {
        enforcer.detach();
    }
    match to {
        Filter::None => None,
        Filter::IptLegacy(n) => {
            fw.load_iptables("iptables-legacy-restore", "iptables-legacy", n);
            None
        }
        Filter::IptNft(n) => {
            fw.load_iptables("iptables-nft-restore", "iptables-nft", n);
            None
        }
        Filter::NftSet(n) => {
            fw.load_nft_set(n);
            None
        }
        Filter::BulkheadIdle => {
            enforcer.attach(EgressCheck::Connect);
            enforcer.unmanage(sides);
            None
        }
        Filter::Bulkhead(n) => {
            enforcer.attach(EgressCheck::Connect);
            let version = enforcer.next_version();
            Some(enforcer.apply(&node_policy(n, sides, version)))
        }
        Filter::BulkheadPacket(n) => {
            enforcer.attach(EgressCheck::Packet);
            let version = enforcer.next_version();
            Some(enforcer.apply(&node_policy(n, sides, version)))
        }
    }
}

// === iptables / nftables ===

/// The iptables chain and nft table of this run in the server's namespace, removed
/// on drop (the namespace's deletion would remove them too).
struct Firewall {
    netns: String,
    chain: String,
    table: String,
    nft_loaded: bool,
}

impl Firewall {
    fn new(netns: &str) -> Firewall {
        let suffix = unique_suffix();
        Firewall {
            netns: netns.to_owned(),
            chain: format!("BH-BENCH-{suffix}"),
            table: format!("bh_bench_{suffix}"),
            nft_loaded: false,
        }
    }

    /// Runs `cmd args` in the server's namespace with `input` on stdin.
    fn exec(&self, cmd: &str, args: &[&str], input: &str) -> Result<(), String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns, cmd])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {cmd}: {e} (apt-get install iptables nftables)"))?;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).map_err(|e| format!("{cmd} stdin: {e}"))?;
        drop(stdin);
        let out = child.wait_with_output().map_err(|e| format!("{cmd}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{cmd} {args:?} failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    fn load_iptables(&self, restore: &str, list: &str, n: usize) {
        let mut rules = format!("*filter\n:INPUT ACCEPT [0:0]\n:{0} - [0:0]\n-A INPUT -j {0}\n", self.chain);
        for a in 0..n {
            rules.push_str(&format!("-A {} -s {}/32 -p tcp --dport {RR_PORT} -j DROP\n", self.chain, other_addr(a)));
        }
        rules.push_str("COMMIT\n");
        self.exec(restore, &[], &rules).unwrap_or_else(|e| panic!("{e}"));
        // The rules are really there (and really in the path: INPUT jumps to them).
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, list, "-S", &self.chain])
            .output()
            .unwrap_or_else(|e| panic!("{list}: {e}"));
        let listed = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).count();
        assert_eq!(listed, n, "{list} lists {listed} rules in {}, loaded {n}", self.chain);
    }

    /// Restoring an empty filter table flushes it and deletes our chain.
    fn flush_iptables(&self, restore: &str) {
        self.exec(restore, &[], "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n").unwrap_or_else(|e| panic!("{e}"));
    }

    fn load_nft_set(&mut self, n: usize) {
        let elements: Vec<String> = (0..n).map(|a| other_addr(a).to_string()).collect();
        let ruleset = format!(
            "table inet {} {{\n  set blocked {{\n    type ipv4_addr\n    elements = {{ {} }}\n  }}\n  \
             chain input {{\n    type filter hook input priority filter; policy accept;\n    \
             ip saddr @blocked drop\n  }}\n}}\n",
            self.table,
            elements.join(", ")
        );
        self.exec("nft", &["-f", "-"], &ruleset).unwrap_or_else(|e| panic!("{e}"));
        self.nft_loaded = true;
    }

    fn delete_nft_table(&mut self) {
        self.exec("nft", &["delete", "table", "inet", &self.table], "").unwrap_or_else(|e| panic!("{e}"));
        self.nft_loaded = false;
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        // Never panic here: this often runs while the benchmark unwinds.
        for restore in ["iptables-legacy-restore", "iptables-nft-restore"] {
            if let Err(e) = self.exec(restore, &[], "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n") {
                eprintln!("cleanup: {e}");
            }
        }
        if self.nft_loaded
            && let Err(e) = self.exec("nft", &["delete", "table", "inet", &self.table], "")
        {
            eprintln!("cleanup: {e}");
        }
    }
}

// === Bulkhead ===

/// The node policy with `n` entries: client egress and server ingress to both
/// benchmark ports, plus `n - 4` entries of the two workloads with the 10,000 other
/// identities on ports 1–5 (every other one ingress of the server, egress of the
/// client); every other identity in the ipcache.
fn node_policy(n: usize, sides: &Sides, version: u64) -> NodePolicy {
    assert!(n >= 4, "the traffic needs 4 entries");
    let (c, s) = (CLIENT_ID, SERVER_ID);
    let mut rules = vec![
        NodeRule::l4(tcp_key(c, Direction::Egress, s, RR_PORT), 1),
        NodeRule::l4(tcp_key(c, Direction::Egress, s, CRR_PORT), 2),
        NodeRule::l4(tcp_key(s, Direction::Ingress, c, RR_PORT), 3),
        NodeRule::l4(tcp_key(s, Direction::Ingress, c, CRR_PORT), 4),
    ];
    for j in 0..n - 4 {
        let (local, direction) = if j % 2 == 0 { (s, Direction::Ingress) } else { (c, Direction::Egress) };
        let peer = Identity(other_id((j / 2) % OTHER_ADDRS));
        let port = 1 + ((j / 2) / OTHER_ADDRS) as u16;
        // A selector of one approved rule expands to 50 entries of one direction.
        let rule_id = 100 + (j % 2) as u32 + 2 * (j / 100) as u32;
        rules.push(NodeRule::l4(tcp_key(local, direction, peer, port), rule_id));
    }
    let others = (0..OTHER_ADDRS).map(|a| IpcacheEntry {
        prefix: IpNet::new(IpAddr::V4(other_addr(a)), 32).expect("/32"),
        identity: Identity(other_id(a)),
    });
    two_workload_policy(sides, version, RolloutMode::Enforce, others, rules)
}

fn other_id(a: usize) -> u32 {
    OTHER_ID_FIRST + a as u32
}

/// What the programs judged during one configuration's rounds.
#[derive(Debug, Clone, Copy)]
struct Judged {
    allowed: u64,
    denied: u64,
    /// Packets of unmanaged sockets.
    unmanaged: u64,
    /// Packets passed by a conntrack entry.
    ct_hits: u64,
    /// Packets passed by the verdict cached on their socket.
    fast_path: u64,
    /// New connections the load opened (CRR connections + RR connections).
    connections: u64,
}

/// One RR and one CRR round with BPF run-time statistics enabled.
fn profile(
    enforcer: &Enforcer,
    filter: Filter,
    client: &mut Worker,
    rr_dst: SocketAddr,
    crr_dst: SocketAddr,
    round: Duration,
) -> Profile {
    let rows = enforcer.profile_loads(client, &[("rr", rr_dst, RR_CONNS), ("crr", crr_dst, CRR_THREADS)], round);
    println!("  profile {}: {rows:?}", filter.label());
    Profile { filter, rows }
}

#[derive(Debug)]
struct Profile {
    filter: Filter,
    rows: Vec<ProfileRow>,
}

/// Echo servers: RR on [`RR_PORT`] (1-byte ping-pong until the client closes), CRR on
/// [`CRR_PORT`] (read 1 byte, write it back, close).
fn server_worker() {
    fn echo_all(mut s: TcpStream) {
        let _ = s.set_nodelay(true);
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).is_ok() {
            if s.write_all(&b).is_err() {
                break;
            }
        }
    }
    fn echo_one(mut s: TcpStream) {
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() {
            let _ = s.write_all(&b);
        }
    }
    serve((RR_PORT, echo_all), (CRR_PORT, CRR_THREADS, echo_one));
}

/// The load generator: `rr|crr ADDR N MS` → `done elapsed_ns errors`.
fn client_worker() {
    common::client(&[("rr", rr_load), ("crr", crr_load)], |_| None);
}

/// One byte there and back.
fn ping(s: &mut TcpStream, _: &mut Vec<u8>) -> std::io::Result<()> {
    let mut b = [1u8; 1];
    s.write_all(&b)?;
    s.read_exact(&mut b)
}

/// `conns` persistent connections, each ping-ponging one byte for `dur`.
fn rr_load(dst: SocketAddr, conns: usize, dur: Duration) -> Load {
    persistent_load(dst, conns, dur, ping)
}

/// `threads` loops of connect, 1-byte request, 1-byte reply, close, for `dur`.
fn crr_load(dst: SocketAddr, threads: usize, dur: Duration) -> Load {
    connect_load(dst, threads, dur, ping)
}

// === report ===

#[derive(Debug, Default)]
struct Samples {
    rr: Vec<f64>,
    crr: Vec<f64>,
    errors: u64,
    judged: Vec<Judged>,
}

fn report(
    results: &BTreeMap<Filter, Samples>,
    applies: &BTreeMap<(usize, usize), Vec<ApplyTimes>>,
    profiles: &[Profile],
    memory: &[(String, u32, u64)],
    machine: &str,
) -> String {
    let base = &results[&Filter::None];
    let (base_rr, base_crr) = (median(&base.rr), median(&base.crr));
    let ratio = |f: Filter| {
        let s = &results[&f];
        (median(&s.rr) / base_rr, median(&s.crr) / base_crr)
    };

    let mut md = String::new();
    md.push_str("Command: `cargo bench -p bulkhead-enforcer --bench enforce` (root).\n");
    md.push_str(&format!("{machine}\n\n"));
    md.push_str(&format!(
        "Two network namespaces over a veth bridge; client and server are processes in their own cgroups, both \
         pinned to CPU {} (cross-CPU wakeups made RR bimodal in this VM; pinned, a round measures the CPU cost \
         per transaction of the whole path, which is what a filter adds to). \
         RR: {RR_CONNS} persistent connections ping-ponging 1 byte (transactions/s). CRR: {CRR_THREADS} threads doing \
         connect, 1-byte request, 1-byte reply, close (connections/s). {CYCLES} rounds of {:.0} s per configuration \
         and load, configurations interleaved round-robin; median (min–max); ratios are medians over the no-filter \
         median. iptables/nftables rules sit in the server namespace's INPUT path, ahead of the accepted traffic: \
         `-s 10.100.x.y/32 -p tcp --dport {RR_PORT} -j DROP` (never matching) in a chain INPUT jumps to, without an \
         \"accept established\" shortcut; nft: one rule `ip saddr @blocked drop` over a set of the same addresses. \
         Bulkhead: both cgroups managed in enforce mode with ingress and egress covered; egress judged at \
         `connect()` (the default: cgroup_skb on both workloads' ingress, cgroup connect4/6 and sendmsg4/6) or, \
         in the rows that say so, per packet (cgroup_skb on both workloads' egress and ingress); N entries in the \
         policy hash = the 4 allowing the traffic + N−4 for the two workloads with 10,000 other identities (all \
         10,000 in the ipcache) on other ports; default map sizes, and the LRU maps (conntrack, decisions) filled \
         to capacity before the first round, as on a node that has run for a while (an insert then evicts). \
         For the other rows the programs are detached.\n\n",
        bench_cpu(),
        ROUND.as_secs_f64()
    ));
    md.push_str("| filter | N | RR trans/s | RR vs none | CRR conn/s | CRR vs none | errors |\n");
    md.push_str("|---|---|---|---|---|---|---|\n");
    for (f, s) in results {
        let (rr_lo, rr_hi) = range(&s.rr);
        let (crr_lo, crr_hi) = range(&s.crr);
        let (r_rr, r_crr) = ratio(*f);
        md.push_str(&format!(
            "| {} | {} | {:.0} ({:.0}–{:.0}) | {r_rr:.2}× | {:.0} ({:.0}–{:.0}) | {r_crr:.2}× | {} |\n",
            f.kind(),
            f.rules().map_or("–".to_owned(), k),
            median(&s.rr),
            rr_lo,
            rr_hi,
            median(&s.crr),
            crr_lo,
            crr_hi,
            s.errors
        ));
    }

    // Goals of issue 4.
    let (bh_rr, bh_crr) = ratio(Filter::Bulkhead(100_000));
    let (ipt_rr, ipt_crr) = ratio(Filter::IptLegacy(10_000));
    let (iptn_rr, iptn_crr) = ratio(Filter::IptNft(10_000));
    let meets = bh_rr >= 0.95 && bh_crr >= 0.95;
    md.push_str(&format!(
        "\nGoal \"Bulkhead at 100k rules ≥ 0.95× no filter\": RR {bh_rr:.2}×, CRR {bh_crr:.2}× — **{}**. \
         Goal \"ahead of iptables at 10k rules by a wide margin\": iptables-legacy 10k RR {ipt_rr:.2}× / CRR \
         {ipt_crr:.2}×, iptables-nft 10k RR {iptn_rr:.2}× / CRR {iptn_crr:.2}× — **{}**.\n",
        if meets { "met" } else { "missed on this run" },
        if bh_rr > 1.5 * ipt_rr.max(iptn_rr) && bh_crr > 1.5 * ipt_crr.max(iptn_crr) {
            "met"
        } else {
            "not by a wide margin on this run"
        }
    ));
    let judged: Vec<String> = results
        .iter()
        .filter(|(f, _)| matches!(f, Filter::Bulkhead(_) | Filter::BulkheadPacket(_) | Filter::BulkheadIdle))
        .map(|(f, s)| {
            let (a, d, u, c) = s.judged.iter().fold((0, 0, 0, 0), |(a, d, u, c), j| {
                (a + j.allowed, d + j.denied, u + j.unmanaged, c + j.connections)
            });
            let (ct, fast) = s.judged.iter().fold((0, 0), |(ct, fast), j| (ct + j.ct_hits, fast + j.fast_path));
            format!(
                "{}: {a} allowed for {c} connections, {d} denied, {u} unmanaged packets, {ct} conntrack hits, \
                 {fast} fast-path passes",
                f.label()
            )
        })
        .collect();
    md.push_str(&format!(
        "Check that Bulkhead really judged the traffic (kernel counters during its rounds; expected 2 allowed \
         verdicts per new connection, client egress (at `connect()`, or its SYN) + server ingress (its SYN); every \
         later packet a fast-path pass (egress at connect: judged on a cached decision; per packet: the verdict \
         its socket carries) or a conntrack hit): {}.\n",
        judged.join("; ")
    ));

    md.push_str(
        "\nPolicy apply through the library: `NodePolicy::validate`, `render`, `diff`, then the `MapOp`s one at a \
         time through `Datapath::apply` — `WriteGeneration` (writes the whole new generation; it walks the map \
         for leftovers under its number only when the datapath cannot know there are none, which it does after \
         creating the map or reading it back as the map owner does on start-up), `Activate`, \
         `DeleteGenerationKeys` of the old one (by the keys of the previous `MapState`, no walk), and under \
         \"other\" the ipcache and endpoint writes (the 10,002 prefixes on the first apply; the bridge/settle \
         writes of the double-buffered maps around a flip). Timed each time a Bulkhead configuration started, by \
         the number of entries before and after: each op costs one syscall per entry it writes or deletes. Median \
         over the samples, in ms:\n\n",
    );
    md.push_str(
        "| N before → after | samples | validate | render | diff | write generation | activate | delete old | other \
         | render…delete total |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for ((n, from), v) in applies {
        let m = |f: fn(&ApplyTimes) -> Duration| ms(median_duration(v.iter().map(f)));
        md.push_str(&format!(
            "| {} → {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            k(*from),
            k(*n),
            v.len(),
            m(|t| t.validate),
            m(|t| t.render),
            m(|t| t.diff),
            m(|t| t.write),
            m(|t| t.activate),
            m(|t| t.delete),
            m(|t| t.other),
            m(ApplyTimes::total),
        ));
    }

    let total: u64 = memory.iter().map(|(_, _, b)| b).sum();
    md.push_str(&format!(
        "\nKernel map memory of the instance (`memlock` in /proc/self/fdinfo of each pinned map; preallocated, so \
         the same at 1k and 100k entries): **{:.1} MiB** in all — ",
        total as f64 / (1 << 20) as f64
    ));
    let parts: Vec<String> = memory
        .iter()
        .map(|(name, max, b)| {
            let mib = *b as f64 / (1 << 20) as f64;
            if name == abi::VERDICT_EVENTS {
                format!("{name} {mib:.1} MiB (ring of {max} bytes)")
            } else {
                format!("{name} {mib:.1} MiB ({max} entries)")
            }
        })
        .collect();
    md.push_str(&parts.join(", "));
    md.push_str(".\n");

    // The steady-state 100k apply.
    if let Some(v) = applies.get(&(100_000, 100_000)) {
        let m = |f: fn(&ApplyTimes) -> Duration| ms(median_duration(v.iter().map(f)));
        md.push_str(&format!(
            "\nApplying 100k entries over an applied 100k policy takes **{} ms** (render…delete; validate adds {} ms). \
             Deleting the old generation ({} ms) and writing the new one ({} ms) are one syscall per entry each \
             (before the old generation was deleted by the keys of the previous `MapState`, and leftovers looked \
             for only when there may be some, both walked the whole policy hash first: 636 ms in all). Batched map ops \
             (`BPF_MAP_UPDATE_BATCH` / `DELETE_BATCH`) would cut the rest.\n",
            m(ApplyTimes::total),
            m(|t| t.validate),
            m(|t| t.delete),
            m(|t| t.write),
        ));
    }

    md.push_str(
        "\nWhere Bulkhead's time goes: one more RR and CRR round per configuration with BPF run-time statistics \
         on (`BPF_ENABLE_STATS`, only for this phase; it adds two clock reads per run), summed over the \
         instance's programs (ingress; egress = the connect/sendmsg programs, or the cgroup_skb egress program). \
         \"unmanaged\" is the floor every run pays once the programs are attached: the hook, the cgroup id, the \
         configuration and one `ENDPOINTS_V2` lookup. Managed with egress judged at connect, an arriving TCP \
         segment adds a header parse and one `DECISIONS_V1` lookup (policy decisions by peer address and server \
         port, made once per class of connection and generation: no per-connection record); `connect()` adds the \
         same lookup. Per packet, a segment of an established connection whose socket carries its verdict \
         (`SOCK_VERDICT_V1`) adds one `bpf_sk_storage_get`; any other packet parses, looks up conntrack, and a \
         connection's first packet on each side reads the ipcache, probes the policy hash, inserts a conntrack \
         entry or creates a socket verdict:\n\n",
    );
    md.push_str("| configuration | load | rate /s | program runs per transaction | ns per run | program µs per transaction | program CPU (% of one core) |\n");
    md.push_str("|---|---|---|---|---|---|---|\n");
    for p in profiles {
        for row in &p.rows {
            let us_per = row.per_transaction().0 / 1000.0;
            // Program CPU per second of load, as a share of one core.
            let share = us_per * row.load.rate() / 1e6;
            md.push_str(&format!(
                "| {} | {} | {:.0} | {:.1} | {:.0} | {:.2} | {:.1} % |\n",
                p.filter.label(),
                row.kind.to_uppercase(),
                row.load.rate(),
                row.runs() as f64 / row.transactions(),
                row.ns_per_run(),
                us_per,
                share * 100.0
            ));
        }
    }
    md.push_str(&analysis(results, profiles, base_rr, base_crr));
    md
}

/// What the numbers say: the cost of the rule count, of each way of judging
/// egress, and the new-connection budget in CPU time per connection (the load
/// runs pinned to one core, so the no-filter rate is the inverse of what one
/// connection costs, and a ratio r means 1/r − 1 of that on top). The
/// programs' own run time (the profile rounds) is the part no rate noise blurs.
fn analysis(results: &BTreeMap<Filter, Samples>, profiles: &[Profile], base_rr: f64, base_crr: f64) -> String {
    let row = |f: Filter, kind: &str| {
        profiles.iter().filter(|p| p.filter == f).flat_map(|p| p.rows.iter()).find(|r| r.kind == kind)
    };
    let ns_per_run = |f: Filter, kind: &str| row(f, kind).map_or(f64::NAN, ProfileRow::ns_per_run);
    let us_per = |f: Filter, kind: &str| row(f, kind).map_or(f64::NAN, |r| r.per_transaction().0 / 1000.0);
    let runs_per = |f: Filter, kind: &str| row(f, kind).map_or(f64::NAN, |r| r.runs() as f64 / r.transactions());
    let ratio = |f: Filter| {
        results.get(&f).map_or((f64::NAN, f64::NAN), |s| (median(&s.rr) / base_rr, median(&s.crr) / base_crr))
    };
    let (bh_rr, bh_crr) = ratio(Filter::Bulkhead(100_000));
    let (pk_rr, pk_crr) = ratio(Filter::BulkheadPacket(100_000));
    let (nft_rr, nft_crr) = ratio(Filter::NftSet(10_000));
    let (idle_rr, idle_crr) = ratio(Filter::BulkheadIdle);
    let small = ns_per_run(Filter::Bulkhead(1_000), "rr");
    let large = ns_per_run(Filter::Bulkhead(100_000), "rr");
    let per_conn = 1e6 / base_crr;
    let budget = per_conn * (1.0 / 0.95 - 1.0);
    let connect_us = us_per(Filter::Bulkhead(100_000), "crr");
    let packet_us = us_per(Filter::BulkheadPacket(100_000), "crr");
    let idle_us = us_per(Filter::BulkheadIdle, "crr");
    let added = |f: Filter| results.get(&f).map_or(f64::NAN, |s| per_conn * (base_crr / median(&s.crr) - 1.0));
    format!(
        "\n**Reading.** The number of rules costs nothing measurable: a program run takes {small:.0} ns at 1k \
         entries and {large:.0} ns at 100k (RR), and the 1k/10k/100k rows agree within their ranges — the policy \
         hash is probed only when a decision is made. The cost is per program run, and judging egress at \
         `connect()` halves the runs: a short connection runs the programs {:.0} times (the ingress program on \
         each arriving packet of both sides, `connect()` once) instead of {:.0} (every packet on the sender's \
         egress and the receiver's ingress), a persistent connection's request and reply {:.0} instead of {:.0}. \
         Nor does it record anything per TCP connection: an arriving segment is judged against the active policy \
         through one `DECISIONS_V1` lookup (peer address, server port → the policy's decision), so revoking a rule \
         still stops established connections at their next arriving segment. Per packet, each new connection \
         inserts a conntrack entry and creates two socket verdicts; with the LRU maps full (as in steady state) \
         an insert that evicts costs about 1.2 µs of program time on this VM, more than everything else a short \
         connection runs. Program time per short connection at 100k entries: **{connect_us:.1} µs** with egress \
         judged at connect against {packet_us:.1} µs per packet (the floor with nothing managed: {idle_us:.1} µs). \
         Rates at 100k: {bh_rr:.2}× (RR) / {bh_crr:.2}× (CRR) at connect, {pk_rr:.2}× / {pk_crr:.2}× per packet; \
         attached with nothing managed {idle_rr:.2}× / {idle_crr:.2}×; the nftables set (one lookup on the \
         server's INPUT only) {nft_rr:.2}× / {nft_crr:.2}× at 10k.\n\n\
         **What bounds CRR.** One short connection costs {per_conn:.1} µs of CPU without a filter (the load is \
         pinned to one core), so 0.95× allows {budget:.1} µs more per connection. Egress judged at connect, a \
         connection costs {:.1} µs more in this run, {connect_us:.1} µs of it the programs' own run time \
         ({:.0}% of the budget); per packet, {:.1} µs more, {packet_us:.1} µs of it program time ({:.1}× the \
         budget). What the programs' run time does not cover is the kernel's cost of entering them (11 hook \
         runs per connection at connect; the unmanaged row, {:.2}× with {idle_us:.1} µs of program time, shows \
         how much merely attaching costs) and this VM's noise: between rounds the rates of this shared 2-core VM \
         move by several percent, more than the difference between the rows near 1.00×; the program times are \
         the steady measure. This VM runs the AMD \
         SRSO \"Safe RET\" mitigation (/sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow), which makes \
         every call and return dearer, helpers and the hook's own included.\n",
        runs_per(Filter::Bulkhead(100_000), "crr"),
        runs_per(Filter::BulkheadPacket(100_000), "crr"),
        runs_per(Filter::Bulkhead(100_000), "rr"),
        runs_per(Filter::BulkheadPacket(100_000), "rr"),
        added(Filter::Bulkhead(100_000)),
        100.0 * connect_us / budget,
        added(Filter::BulkheadPacket(100_000)),
        packet_us / budget,
        idle_crr,
    )
}
