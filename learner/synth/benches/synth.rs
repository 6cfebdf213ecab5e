//! Synthesis time and peak memory for 1k, 10k and 50k workloads with 10× edges.
//! Goal (issue 3): 10k workloads / 100k edges in under 1 s on this machine.
//!
//! `cargo bench -p bulkhead-synth --bench synth` prints the table and writes the
//! `## Policy synthesis` section of BENCHMARKS.md. Peak memory is measured with a
//! counting global allocator: bytes allocated at the peak of one `synthesize` call
//! beyond what was live before it (the input itself is not counted).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Direction, Edge, EdgeKey, Identity, Labels, Level, Protocol, Window};
use bulkhead_synth::{ExternalObservation, IdentityInfo, Input, Options, synthesize};

struct Counting;

/// Counting is switched on only for the memory run: two threads bumping one shared
/// counter per allocation would slow down the timed runs.
static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only adds relaxed counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && COUNTING.load(Ordering::Relaxed) {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        if COUNTING.load(Ordering::Relaxed) {
            // Frees of blocks allocated before counting started may take LIVE below
            // its baseline; wrapping arithmetic keeps the difference right.
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NOW: i64 = 1_800_000_000_000;
const HOUR: i64 = 3_600_000;
const PORTS: [u16; 12] = [80, 443, 8080, 8443, 5432, 3306, 6379, 9090, 9092, 27017, 11211, 2379];

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
}

struct Scenario {
    identities: Vec<IdentityInfo>,
    edges: Vec<Edge>,
    external: Vec<ExternalObservation>,
}

/// A cluster-shaped graph: 50 workloads per namespace, teams across namespaces, each
/// workload calling ~10 others (80 % in its own namespace) on common service ports,
/// host probes for everyone, 10 % with external egress.
fn scenario(workloads: usize, edges: usize) -> Scenario {
    let mut rng = Rng(0x5EED_0000 + workloads as u64);
    let namespaces = (workloads / 50).max(1);
    let teams = (workloads / 200).max(1);
    let identities: Vec<IdentityInfo> = (0..workloads)
        .map(|i| {
            let ns = format!("ns{}", i % namespaces);
            let team = format!("team{}", rng.below(teams as u64));
            let tier = ["web", "api", "db", "cache"][rng.below(4) as usize];
            let app = format!("app{i}");
            let labels = Labels::new([(NAMESPACE_KEY, ns.as_str()), ("app", &app), ("tier", tier), ("team", &team)])
                .expect("labels");
            IdentityInfo::workload(Identity(Identity::FIRST_ALLOCATED + i as u32), format!("{ns}/{app}"), labels)
        })
        .collect();
    let mut keys = BTreeSet::new();
    let mut out = Vec::with_capacity(edges + workloads * 2);
    let edge = |src: Identity, dst: Identity, port: u16, rng: &mut Rng| Edge {
        key: EdgeKey { src, dst, dst_port: port, protocol: Protocol::Tcp },
        first_seen_unix_ms: NOW - 20 * HOUR + rng.below(10) as i64 * HOUR,
        last_seen_unix_ms: NOW - rng.below(5) as i64 * HOUR,
        connections: 1 + rng.below(1000),
        bytes: rng.below(1 << 30),
    };
    while keys.len() < edges {
        let src = rng.below(workloads as u64) as usize;
        let dst = if rng.below(5) < 4 {
            let base = src % namespaces;
            let k = rng.below((workloads / namespaces) as u64) as usize;
            (base + k * namespaces).min(workloads - 1)
        } else {
            rng.below(workloads as u64) as usize
        };
        let port = PORTS[rng.below(PORTS.len() as u64) as usize];
        let e = edge(identities[src].id, identities[dst].id, port, &mut rng);
        if keys.insert(e.key) {
            out.push(e);
        }
    }
    let mut external = Vec::new();
    for (n, w) in identities.iter().enumerate() {
        out.push(edge(Identity::HOST, w.id, 8080, &mut rng));
        if n % 10 == 0 {
            out.push(edge(w.id, Identity::WORLD, 443, &mut rng));
            external.push(ExternalObservation {
                local: w.id,
                direction: Direction::Egress,
                addr: IpAddr::V4(Ipv4Addr::new(198, 51, (n % 7) as u8, (n % 250) as u8 + 1)),
                port: 443,
                protocol: Protocol::Tcp,
                connections: 10,
                bytes: 1000,
                first_seen_unix_ms: NOW - 10 * HOUR,
                last_seen_unix_ms: NOW - HOUR,
            });
        }
    }
    Scenario { identities, edges: out, external }
}

struct Row {
    workloads: usize,
    edges: usize,
    level: Level,
    runs: Vec<Duration>,
    peak_bytes: usize,
    rules: usize,
}

fn measure(s: &Scenario, level: Level, runs: usize) -> (Vec<Duration>, usize, usize) {
    let opts =
        Options { level, window: Window { from_unix_ms: NOW - 24 * HOUR, to_unix_ms: NOW }, ..Options::default() };
    let input = Input { identities: &s.identities, edges: &s.edges, external: &s.external, ..Default::default() };
    let mut times = Vec::new();
    let mut rules = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let out = synthesize(&input, &opts);
        times.push(t.elapsed());
        rules = out.iter().map(|p| p.rules.len()).sum();
        drop(std::hint::black_box(out));
    }
    // One more run, counted, for the peak.
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let out = synthesize(&input, &opts);
    let peak = PEAK.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::Relaxed);
    drop(std::hint::black_box(out));
    times.sort();
    (times, peak, rules)
}

fn main() {
    // `-- <workloads> <level>`: one case, no BENCHMARKS.md (for profiling).
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    if let [n, level] = &args[..] {
        let n: usize = n.parse().expect("workloads");
        let level: Level = level.parse().expect("level");
        let s = scenario(n, n * 10);
        let cpu = cpu_ms();
        let (runs, peak, rules) = measure(&s, level, 3);
        let cpu = (cpu_ms() - cpu) / 4;
        println!(
            "{n} workloads, level {level}: median {:?}, {cpu} ms CPU per run, peak {} MiB, {rules} rules",
            runs[1],
            peak >> 20
        );
        return;
    }
    let mut rows = Vec::new();
    for (workloads, runs, levels) in [
        (1_000, 5, &[Level::Exact, Level::Labels, Level::Namespace][..]),
        (10_000, 3, &[Level::Exact, Level::Labels, Level::Namespace][..]),
        (50_000, 1, &[Level::Exact, Level::Labels][..]),
    ] {
        let edges = workloads * 10;
        eprintln!("generating {workloads} workloads / {edges} edges …");
        let s = scenario(workloads, edges);
        for &level in levels {
            eprintln!("  synthesizing at level {level} ({runs} run(s)) …");
            let (runs, peak_bytes, rules) = measure(&s, level, runs);
            eprintln!("    median {:?}, peak {} MiB", runs[runs.len() / 2], peak_bytes >> 20);
            rows.push(Row { workloads, edges: s.edges.len(), level, runs, peak_bytes, rules });
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let mut body = String::new();
    body.push_str("Command: `cargo bench -p bulkhead-synth --bench synth` (release build; targets split over one worker thread per core, here 2).\n");
    body.push_str(&format!(
        "Machine: 2 cores, shared with other builds (load average at the end: {}).\n\n",
        load.join(" ")
    ));
    body.push_str(
        "Cluster-shaped graphs: 50 workloads per namespace, 4 labels each, ~10 service edges per workload \
         (80 % within the namespace) on 12 common ports, plus a host probe per workload and external egress for \
         10 %. Time is one `synthesize` call for every workload (median, range over runs); peak memory is the most \
         heap it held beyond its input (counting allocator).\n\n",
    );
    body.push_str("| workloads | edges | level | time (median, range) | peak memory | rules proposed |\n");
    body.push_str("|---|---|---|---|---|---|\n");
    for r in &rows {
        let med = r.runs[r.runs.len() / 2];
        let range = format!("{:.0}–{:.0} ms", ms(r.runs[0]), ms(r.runs[r.runs.len() - 1]));
        body.push_str(&format!(
            "| {} | {} | {} | {:.0} ms ({range}) | {:.0} MiB | {} |\n",
            r.workloads,
            r.edges,
            r.level,
            ms(med),
            r.peak_bytes as f64 / (1 << 20) as f64,
            r.rules
        ));
    }
    if let Some(goal) = rows.iter().find(|r| r.workloads == 10_000 && r.level == Level::Exact) {
        let med = ms(goal.runs[goal.runs.len() / 2]);
        body.push_str(&format!(
            "\nGoal 10k workloads / 100k edges < 1 s (level exact): {:.0} ms — {}.\n",
            med,
            if med < 1000.0 { "met" } else { "NOT met" }
        ));
    }
    println!("\n{body}");
    match bulkhead_testkit::benchmarks::write_section("Policy synthesis", &body) {
        Ok(path) => println!("wrote ## Policy synthesis to {}", path.display()),
        Err(e) => panic!("could not update BENCHMARKS.md: {e}"),
    }
}

/// This process's user + system CPU time (both threads), from /proc.
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (field(11) + field(12)) * 10
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
