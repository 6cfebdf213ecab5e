//! Learner store benchmark: flow ingest throughput and edge-query latency on SQLite and
//! PostgreSQL.
//!
//! `cargo bench -p bulkhead-learner --bench store`
//!
//! Needs `BULKHEAD_TEST_POSTGRES_URL` (as for the store tests): without it the bench
//! fails before measuring anything, so a SQLite-only table is never mistaken for the
//! whole picture. Prints the numbers and replaces the `## Learner store` section of
//! BENCHMARKS.md at the workspace root.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_learner::store::{Backend, EdgeQuery, IngestBatch, IngestOutcome, ResolvedFlow, Store};
use bulkhead_model::{Direction, DnsAnswer, Flow, Identity, Labels, LossCounters, Protocol, Verdict};
use hdrhistogram::Histogram;

const URL_ENV: &str = bulkhead_testkit::postgres::URL_ENV;
const COMMAND: &str = "cargo bench -p bulkhead-learner --bench store";

/// Flows per ingested batch (a collector flush).
const BATCH_FLOWS: usize = 1_000;
/// Distinct edges the ingest workload spreads its flows over.
const INGEST_EDGES: usize = 1_000;
/// Workloads (identities) of the ingest workload.
const WORKLOADS: usize = 200;
/// How long each ingest measurement runs.
const INGEST_TIME: Duration = Duration::from_secs(4);
/// Concurrent writers (one agent stream each) in the concurrent measurement.
const WRITERS: usize = 4;
/// Edges in the graph for the query measurements (on top of the ingest workload's).
const QUERY_EDGES: usize = 100_000;
/// Identities the query graph's edges run between.
const QUERY_IDENTITIES: usize = 1_000;
const QUERIES: usize = 2_000;

fn main() -> ExitCode {
    if std::env::var(URL_ENV).map(|v| v.trim().is_empty()).unwrap_or(true) {
        eprintln!("\n==================================================================");
        eprintln!("  {URL_ENV} is NOT SET: the PostgreSQL half of this benchmark");
        eprintln!("  cannot run, so nothing is measured and BENCHMARKS.md is untouched.");
        eprintln!("  Start PostgreSQL and export an admin URL (role with CREATEDB),");
        eprintln!("  e.g. via `cargo xtask test`'s setup, then run `{COMMAND}`.");
        eprintln!("==================================================================\n");
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run())
}

async fn run() -> ExitCode {
    let mut results = Vec::new();

    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let sqlite = Store::open(&url).await.expect("open sqlite store");
    results.push(bench_backend(&sqlite).await);
    sqlite.close().await;

    let pg_db = bulkhead_testkit::postgres::fresh_database().await;
    let pg = Store::open(pg_db.url()).await.expect("open postgres store");
    results.push(bench_backend(&pg).await);
    pg.close().await;
    drop(pg_db);

    let section = render(&results);
    println!("\n{section}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../BENCHMARKS.md");
    match write_section(&path, &section) {
        Ok(()) => {
            println!("Wrote the `## Learner store` section of {}.", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("could not update {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
struct Results {
    backend: Backend,
    ingest_one: f64,
    ingest_per_cpu: Option<f64>,
    ingest_many: f64,
    batch_p50_ms: f64,
    batch_p99_ms: f64,
    edges_total: usize,
    by_identity: (u64, u64, usize),
    recent: (u64, u64),
    full_scan_ms: (f64, f64),
}

async fn bench_backend(store: &Store) -> Results {
    let backend = store.backend();
    println!("== {backend:?} ==");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // --- ingest workload ---
    let mut ids = Vec::with_capacity(WORKLOADS);
    for i in 0..WORKLOADS {
        ids.push(store.ensure_identity(&workload_labels("ingest", i)).await.expect("identity"));
    }
    let edges: Vec<(Identity, Identity, u16)> = (0..INGEST_EDGES)
        .map(|_| {
            let src = ids[rng.below(ids.len())];
            let dst = ids[rng.below(ids.len())];
            (src, dst, [80, 443, 5432, 6379, 8080, 9090, 53][rng.below(7)])
        })
        .collect();
    let templates: Vec<Vec<ResolvedFlow>> = (0..32).map(|_| make_flows(&mut rng, &edges)).collect();

    // One writer.
    let cpu_before = process_cpu_seconds();
    let (ingest_one, lat, flows_one) = ingest_for(store, "bench-one", &templates, INGEST_TIME).await;
    let per_cpu = match (cpu_before, process_cpu_seconds()) {
        (Some(a), Some(b)) if b > a => Some(flows_one as f64 / (b - a)),
        _ => None,
    };
    let (batch_p50_ms, batch_p99_ms) = (ms(lat.value_at_quantile(0.5)), ms(lat.value_at_quantile(0.99)));
    println!(
        "ingest, 1 writer: {ingest_one:.0} flows/s (batch p50 {batch_p50_ms:.2} ms, p99 {batch_p99_ms:.2} ms; \
         {} flows per CPU-second)",
        per_cpu.map_or("?".into(), |v| format!("{v:.0}"))
    );

    // Several writers at once (agents stream concurrently; SQLite still has one writer).
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (store, templates) = (store.clone(), templates.clone());
        tasks.push(tokio::spawn(async move {
            ingest_for(&store, &format!("bench-many-{w}"), &templates, INGEST_TIME).await.0
        }));
    }
    let mut ingest_many = 0.0;
    for t in tasks {
        ingest_many += t.await.expect("writer task");
    }
    println!("ingest, {WRITERS} writers: {ingest_many:.0} flows/s");

    // --- query graph: 100k more edges between 1,000 identities ---
    let mut qids = Vec::with_capacity(QUERY_IDENTITIES);
    for i in 0..QUERY_IDENTITIES {
        qids.push(store.ensure_identity(&workload_labels("graph", i)).await.expect("identity"));
    }
    let started = Instant::now();
    for (seq, chunk) in (0..QUERY_EDGES).collect::<Vec<_>>().chunks(BATCH_FLOWS).enumerate() {
        let flows = chunk
            .iter()
            .map(|&k| {
                // (src, port) is unique per k, so every flow is a new edge; each identity
                // is the source of 100 edges and the destination of about 100.
                let src = qids[k % QUERY_IDENTITIES];
                let dst = qids[(k / QUERY_IDENTITIES * 7 + k * 13) % QUERY_IDENTITIES];
                let port = 1_000 + (k / QUERY_IDENTITIES) as u16;
                let seen = 1_000_000 + k as i64;
                ResolvedFlow {
                    flow: flow(&mut rng, port, Direction::Egress, seen),
                    src_identity: src,
                    dst_identity: dst,
                }
            })
            .collect();
        let b = batch("bench-graph", seq as u64 + 1, flows);
        store.ingest(&b).await.expect("graph ingest");
    }
    let edges_total = store.edges(&EdgeQuery::default()).await.expect("all edges").len();
    println!("built the query graph in {:.1} s: {edges_total} edges", started.elapsed().as_secs_f64());

    let mut h = hist();
    let mut rows = 0;
    for _ in 0..QUERIES {
        let q = EdgeQuery { identity: Some(qids[rng.below(qids.len())]), ..EdgeQuery::default() };
        let t = Instant::now();
        rows += store.edges(&q).await.expect("edges by identity").len();
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    let by_identity = (h.value_at_quantile(0.5), h.value_at_quantile(0.99), rows / QUERIES);
    println!("edges(identity): p50 {} µs, p99 {} µs, {} rows each", by_identity.0, by_identity.1, by_identity.2);

    let mut h = hist();
    for _ in 0..QUERIES {
        let since = 1_000_000 + rng.below(QUERY_EDGES) as i64;
        let q = EdgeQuery { since_unix_ms: Some(since), limit: Some(100), ..EdgeQuery::default() };
        let t = Instant::now();
        store.edges(&q).await.expect("recent edges");
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    let recent = (h.value_at_quantile(0.5), h.value_at_quantile(0.99));
    println!("edges(since, limit 100): p50 {} µs, p99 {} µs", recent.0, recent.1);

    let mut h = hist();
    for _ in 0..10 {
        let t = Instant::now();
        store.edges(&EdgeQuery::default()).await.expect("all edges");
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    let full_scan_ms = (ms(h.value_at_quantile(0.5)), ms(h.max()));
    println!("edges(all {edges_total}): p50 {:.0} ms, max {:.0} ms", full_scan_ms.0, full_scan_ms.1);

    Results {
        backend,
        ingest_one,
        ingest_per_cpu: per_cpu,
        ingest_many,
        batch_p50_ms,
        batch_p99_ms,
        edges_total,
        by_identity,
        recent,
        full_scan_ms,
    }
}

/// Ingests copies of `templates` as consecutive batches of one node for `time`;
/// returns flows/s, the per-batch latency histogram (µs) and the flows stored.
async fn ingest_for(
    store: &Store,
    node: &str,
    templates: &[Vec<ResolvedFlow>],
    time: Duration,
) -> (f64, Histogram<u64>, u64) {
    let mut h = hist();
    // Warm-up: prepared statements, page cache.
    for seq in 0..3u64 {
        store.ingest(&batch(node, 1_000_000 + seq, templates[0].clone())).await.expect("warm-up");
    }
    let mut batches = Vec::with_capacity(templates.len());
    let (mut flows, mut seq) = (0u64, 0u64);
    let started = Instant::now();
    while started.elapsed() < time {
        if batches.is_empty() {
            // Clone outside the timed call (a gRPC handler owns its batch anyway).
            batches = templates.iter().map(|t| batch(node, 0, t.clone())).collect();
        }
        let Some(mut b) = batches.pop() else { continue };
        seq += 1;
        b.seq = seq;
        let t = Instant::now();
        match store.ingest(&b).await.expect("ingest") {
            IngestOutcome::Stored { flows: n, .. } => flows += n,
            IngestOutcome::Duplicate => panic!("unexpected duplicate"),
        }
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    (flows as f64 / started.elapsed().as_secs_f64(), h, flows)
}

/// User + system CPU time of this process (all threads: the benchmark, tokio, the
/// SQLite worker threads), from /proc/self/stat in clock ticks of 1/100 s (Linux's
/// USER_HZ). The machine is shared, so flows per CPU-second is the steadier number.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn make_flows(rng: &mut Rng, edges: &[(Identity, Identity, u16)]) -> Vec<ResolvedFlow> {
    (0..BATCH_FLOWS)
        .map(|_| {
            // Skewed like real traffic: a few hot edges, a long tail.
            let i = if rng.below(4) == 0 { rng.below(edges.len()) } else { rng.below(edges.len() / 20 + 1) };
            let (src, dst, port) = edges[i];
            let dir = if rng.below(10) < 6 { Direction::Egress } else { Direction::Ingress };
            ResolvedFlow { flow: flow(rng, port, dir, 1_700_000_000_000), src_identity: src, dst_identity: dst }
        })
        .collect()
}

fn flow(rng: &mut Rng, port: u16, direction: Direction, seen: i64) -> Flow {
    let comm = ["nginx", "curl", "python3", "java", "postgres", "envoy"][rng.below(6)];
    let addr = |rng: &mut Rng| {
        IpAddr::V4(Ipv4Addr::new(10, rng.below(4) as u8, rng.below(256) as u8, 1 + rng.below(250) as u8))
    };
    Flow {
        src_addr: addr(rng),
        src_port: 0,
        dst_addr: addr(rng),
        dst_port: port,
        protocol: if port == 53 { Protocol::Udp } else { Protocol::Tcp },
        direction,
        netns_ino: 4_026_531_840 + rng.below(500) as u64,
        cgroup_id: 10_000 + rng.below(5_000) as u64,
        pid: 1 + rng.below(60_000) as u32,
        comm: comm.into(),
        connections: 1 + rng.below(20) as u64,
        bytes_sent: rng.below(1 << 20) as u64,
        bytes_received: rng.below(1 << 22) as u64,
        packets: 1 + rng.below(4_000) as u64,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: seen - rng.below(5_000) as i64,
        last_seen_unix_ms: seen,
    }
}

fn batch(node: &str, seq: u64, flows: Vec<ResolvedFlow>) -> IngestBatch {
    let dns_answers = (0..5u8)
        .map(|i| DnsAnswer {
            netns_ino: 4_026_531_840,
            name: format!("svc-{i}.default.svc.cluster.local"),
            addr: IpAddr::V4(Ipv4Addr::new(10, 96, 0, i)),
            ttl_seconds: 30,
            seen_unix_ms: 1_700_000_000_000,
        })
        .collect();
    IngestBatch {
        node_id: node.into(),
        boot_id: "bench-boot".into(),
        seq,
        received_unix_ms: 1_700_000_000_000,
        flows,
        endpoints: None,
        dns_answers,
        loss: LossCounters::default(),
    }
}

fn workload_labels(kind: &str, i: usize) -> Labels {
    Labels::new([
        ("app".to_owned(), format!("{kind}-{i}")),
        ("io.kubernetes.pod.namespace".to_owned(), format!("ns-{}", i % 10)),
        ("team".to_owned(), "bench".to_owned()),
    ])
    .expect("valid labels")
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1_000.0
}

/// xorshift64*: deterministic workload without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

fn render(results: &[Results]) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut s = String::new();
    let _ = writeln!(s, "## Learner store\n");
    let _ = writeln!(s, "Command: `{COMMAND}` (release build; needs `{URL_ENV}`, as the store tests do).");
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    let _ = writeln!(
        s,
        "Machine: {cpu}, {cores} cores, shared with other builds (load average at the end: {load}); SQLite in a \
         temp file (WAL, synchronous=NORMAL), local PostgreSQL 15.\n"
    );
    let _ = writeln!(
        s,
        "Ingest: batches of {BATCH_FLOWS} flows over ~{INGEST_EDGES} edges between {WORKLOADS} workloads (skewed, 60 % \
         egress / 40 % ingress, 5 DNS answers per batch), one transaction each, {}s per measurement. \
         Queries: a graph of {QUERY_EDGES} more edges between {QUERY_IDENTITIES} identities; {QUERIES} queries each. \
         Flows per CPU-second counts this process's CPU time only (for PostgreSQL the server's is not included); on \
         a shared machine it is the steadier capacity figure for SQLite.\n",
        INGEST_TIME.as_secs()
    );
    let _ = writeln!(
        s,
        "| backend | ingest, 1 writer | flows per CPU-second (1 writer) | ingest, {WRITERS} writers | batch latency p50 / p99 | edges total | \
         edges(identity) p50 / p99 | edges(since, limit 100) p50 / p99 | all edges p50 / max |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in results {
        let _ = writeln!(
            s,
            "| {:?} | {:.0} flows/s | {} | {:.0} flows/s | {:.1} / {:.1} ms | {} | {} / {} µs ({} rows) | {} / {} µs | {:.0} / {:.0} ms |",
            r.backend,
            r.ingest_one,
            r.ingest_per_cpu.map_or("n/a".into(), |v| format!("{v:.0}")),
            r.ingest_many,
            r.batch_p50_ms,
            r.batch_p99_ms,
            r.edges_total,
            r.by_identity.0,
            r.by_identity.1,
            r.by_identity.2,
            r.recent.0,
            r.recent.1,
            r.full_scan_ms.0,
            r.full_scan_ms.1,
        );
    }
    s
}

/// Replaces (or appends) the `## Learner store` section, leaving other sections alone.
fn write_section(path: &Path, section: &str) -> std::io::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "# Benchmarks\n".to_owned(),
        Err(e) => return Err(e),
    };
    let lines: Vec<&str> = old.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == "## Learner store");
    let mut out: Vec<String> = Vec::new();
    match start {
        Some(start) => {
            let end =
                lines[start + 1..].iter().position(|l| l.starts_with("## ")).map_or(lines.len(), |i| start + 1 + i);
            out.extend(lines[..start].iter().map(|l| l.to_string()));
            out.extend(section.trim_end().lines().map(str::to_owned));
            if end < lines.len() {
                out.push(String::new());
            }
            out.extend(lines[end..].iter().map(|l| l.to_string()));
        }
        None => {
            out.extend(lines.iter().map(|l| l.to_string()));
            if out.last().is_some_and(|l| !l.is_empty()) {
                out.push(String::new());
            }
            out.extend(section.trim_end().lines().map(str::to_owned));
        }
    }
    std::fs::write(path, out.join("\n") + "\n")
}
