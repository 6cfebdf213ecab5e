//! Learner store benchmark: flow ingest throughput and edge-query latency on SQLite and
//! PostgreSQL.
//!
//! `cargo bench -p bulkhead-learner --bench store`
//!
//! Needs `BULKHEAD_TEST_POSTGRES_URL` (as for the store tests): without it the bench
//! fails before measuring anything, so a SQLite-only table is never mistaken for the
//! whole picture. Prints the numbers and replaces the `## Learner store` section of
//! BENCHMARKS.md at the workspace root.
//!
//! The machine this runs on is shared, so every ingest figure is measured several times
//! ([`INGEST_RUNS`] runs of [`INGEST_TIME`]) and reported as the median with the range,
//! next to flows per CPU-second of this process (what a core of ingest buys, whatever
//! else the machine is doing).
//!
//! `cargo bench -p bulkhead-learner --bench store -- sqlite-ingest` (or
//! `postgres-ingest`) measures only that backend's ingest, for quick iteration; it prints
//! and leaves BENCHMARKS.md alone.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bulkhead_learner::store::{Backend, EdgeQuery, FlowQuery, IngestBatch, IngestOutcome, ResolvedFlow, Store};
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
/// How long each ingest run lasts.
const INGEST_TIME: Duration = Duration::from_secs(2);
/// Runs per ingest measurement; the median is reported, with the range.
const INGEST_RUNS: usize = 5;
/// Concurrent writers (one agent stream each) in the concurrent measurement.
const WRITERS: usize = 4;
/// Edges in the graph for the query measurements (on top of the ingest workload's).
const QUERY_EDGES: usize = 100_000;
/// Identities the query graph's edges run between.
const QUERY_IDENTITIES: usize = 1_000;
const QUERIES: usize = 2_000;
/// Recent-flow page queries of each kind.
const FLOW_QUERIES: usize = 500;

/// What to run: everything (and write BENCHMARKS.md), or one backend's ingest only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    IngestOnly(Backend),
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; the only other argument understood is a mode.
    let mode = match std::env::args().skip(1).find(|a| !a.starts_with('-')).as_deref() {
        None => Mode::Full,
        Some("sqlite-ingest") => Mode::IngestOnly(Backend::Sqlite),
        Some("postgres-ingest") => Mode::IngestOnly(Backend::Postgres),
        Some(other) => {
            eprintln!("unknown argument {other:?}: expected sqlite-ingest, postgres-ingest or nothing");
            return ExitCode::FAILURE;
        }
    };
    if mode != Mode::IngestOnly(Backend::Sqlite) && std::env::var(URL_ENV).map(|v| v.trim().is_empty()).unwrap_or(true)
    {
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
    rt.block_on(run(mode))
}

async fn run(mode: Mode) -> ExitCode {
    let mut results = Vec::new();

    if matches!(mode, Mode::Full | Mode::IngestOnly(Backend::Sqlite)) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let sqlite = Store::open(&url).await.expect("open sqlite store");
        results.push(bench_backend(&sqlite, mode).await);
        sqlite.close().await;
    }

    if matches!(mode, Mode::Full | Mode::IngestOnly(Backend::Postgres)) {
        let pg_db = bulkhead_testkit::postgres::fresh_database().await;
        let pg = Store::open(pg_db.url()).await.expect("open postgres store");
        results.push(bench_backend(&pg, mode).await);
        pg.close().await;
        drop(pg_db);
    }

    if mode != Mode::Full {
        return ExitCode::SUCCESS;
    }

    let section = render(&results);
    println!("\n{section}");
    match bulkhead_testkit::benchmarks::write_section("Learner store", &section) {
        Ok(path) => {
            println!("Wrote the `## Learner store` section of {}.", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("could not update BENCHMARKS.md: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug)]
struct Results {
    backend: Backend,
    ingest_one: Spread,
    ingest_per_cpu: Option<Spread>,
    ingest_many: Spread,
    batch_p50_ms: f64,
    batch_p99_ms: f64,
    edges_total: usize,
    by_identity: (u64, u64, usize),
    recent: (u64, u64),
    full_scan_ms: (f64, f64),
    /// (query, p50 µs, p99 µs) of recent-flow pages.
    flow_queries: Vec<(&'static str, u64, u64)>,
}

async fn bench_backend(store: &Store, mode: Mode) -> Results {
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
    let mut one = Vec::with_capacity(INGEST_RUNS);
    let mut per_cpu = Vec::with_capacity(INGEST_RUNS);
    let mut lat = hist();
    let mut seq = 0;
    warm_up(store, "bench-one", &templates).await;
    for _ in 0..INGEST_RUNS {
        let cpu_before = process_cpu_seconds();
        let run = ingest_for(store, "bench-one", &mut seq, &templates, INGEST_TIME).await;
        if let (Some(a), Some(b)) = (cpu_before, process_cpu_seconds())
            && b > a
        {
            per_cpu.push(run.flows as f64 / (b - a));
        }
        one.push(run.flows_per_s);
        lat.add(&run.latency_us).expect("same histogram bounds");
    }
    let (ingest_one, per_cpu) = (Spread::of(one), (per_cpu.len() == INGEST_RUNS).then(|| Spread::of(per_cpu)));
    let (batch_p50_ms, batch_p99_ms) = (ms(lat.value_at_quantile(0.5)), ms(lat.value_at_quantile(0.99)));
    println!(
        "ingest, 1 writer: {ingest_one} flows/s (batch p50 {batch_p50_ms:.2} ms, p99 {batch_p99_ms:.2} ms; \
         {} flows per CPU-second)",
        per_cpu.map_or("?".into(), |v| v.to_string())
    );

    // Several writers at once (agents stream concurrently; SQLite still has one writer).
    let mut many = Vec::with_capacity(INGEST_RUNS);
    let mut seqs = [0u64; WRITERS];
    for w in 0..WRITERS {
        warm_up(store, &format!("bench-many-{w}"), &templates).await;
    }
    for _ in 0..INGEST_RUNS {
        let mut tasks = Vec::new();
        for (w, seq) in seqs.iter().enumerate() {
            let (store, templates, mut seq) = (store.clone(), templates.clone(), *seq);
            tasks.push(tokio::spawn(async move {
                let run = ingest_for(&store, &format!("bench-many-{w}"), &mut seq, &templates, INGEST_TIME).await;
                (run.flows_per_s, seq)
            }));
        }
        let mut total = 0.0;
        for (t, seq) in tasks.into_iter().zip(seqs.iter_mut()) {
            let (rate, next) = t.await.expect("writer task");
            total += rate;
            *seq = next;
        }
        many.push(total);
    }
    let ingest_many = Spread::of(many);
    println!("ingest, {WRITERS} writers: {ingest_many} flows/s");

    if mode != Mode::Full {
        return Results {
            backend,
            ingest_one,
            ingest_per_cpu: per_cpu,
            ingest_many,
            batch_p50_ms,
            batch_p99_ms,
            edges_total: 0,
            by_identity: (0, 0, 0),
            recent: (0, 0),
            full_scan_ms: (0.0, 0.0),
            flow_queries: Vec::new(),
        };
    }

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

    // --- recent-flow pages over everything ingested above ---
    let mut flow_queries = Vec::new();
    let kinds: [(&'static str, MakeFlowQuery); 5] = [
        ("newest 100", |_, _| FlowQuery { limit: 100, ..FlowQuery::default() }),
        ("identity, 100", |rng, ids| FlowQuery {
            identity: Some(ids[rng.below(ids.len())]),
            limit: 100,
            ..FlowQuery::default()
        }),
        ("node, 100", |rng, _| FlowQuery {
            node_id: Some(format!("bench-many-{}", rng.below(WRITERS))),
            limit: 100,
            ..FlowQuery::default()
        }),
        ("dst_port, 100", |_, _| FlowQuery { dst_port: Some(5432), limit: 100, ..FlowQuery::default() }),
        ("newest 10000", |_, _| FlowQuery { limit: 10_000, ..FlowQuery::default() }),
    ];
    for (name, make) in kinds {
        let mut h = hist();
        let n = if name.ends_with("10000") { FLOW_QUERIES / 10 } else { FLOW_QUERIES };
        for _ in 0..n {
            let q = make(&mut rng, &ids);
            let t = Instant::now();
            let rows = store.flows(&q).await.expect("flows");
            h.saturating_record(t.elapsed().as_micros() as u64);
            assert_eq!(rows.len(), q.limit as usize, "{name}: the store holds more than a page");
        }
        println!("flows({name}): p50 {} µs, p99 {} µs", h.value_at_quantile(0.5), h.value_at_quantile(0.99));
        flow_queries.push((name, h.value_at_quantile(0.5), h.value_at_quantile(0.99)));
    }

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
        flow_queries,
    }
}

/// Builds one recent-flow query from the workload's identities.
type MakeFlowQuery = fn(&mut Rng, &[Identity]) -> FlowQuery;

/// Median and range of repeated measurements.
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(mut v: Vec<f64>) -> Spread {
        assert!(!v.is_empty(), "no measurements");
        v.sort_by(f64::total_cmp);
        Spread { median: v[v.len() / 2], min: v[0], max: v[v.len() - 1] }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} ({:.0}–{:.0})", self.median, self.min, self.max)
    }
}

/// One timed ingest run.
struct IngestRun {
    flows_per_s: f64,
    flows: u64,
    /// Per-batch latency, µs.
    latency_us: Histogram<u64>,
}

/// Prepared statements and page cache; not timed.
async fn warm_up(store: &Store, node: &str, templates: &[Vec<ResolvedFlow>]) {
    for (seq, t) in templates.iter().enumerate().take(8) {
        store.ingest(&batch(node, 1_000_000_000 + seq as u64, t.clone())).await.expect("warm-up");
    }
}

/// Ingests copies of `templates` as consecutive batches of one node (continuing after
/// `seq`) for `time`.
async fn ingest_for(
    store: &Store,
    node: &str,
    seq: &mut u64,
    templates: &[Vec<ResolvedFlow>],
    time: Duration,
) -> IngestRun {
    let mut h = hist();
    let mut batches = Vec::with_capacity(templates.len());
    let mut flows = 0u64;
    let started = Instant::now();
    while started.elapsed() < time {
        if batches.is_empty() {
            // Clone outside the timed calls (a gRPC handler owns its batch anyway).
            batches = templates.iter().map(|t| batch(node, 0, t.clone())).collect();
        }
        let Some(mut b) = batches.pop() else { continue };
        *seq += 1;
        b.seq = *seq;
        let t = Instant::now();
        match store.ingest(&b).await.expect("ingest") {
            IngestOutcome::Stored { flows: n, .. } => flows += n,
            IngestOutcome::Duplicate => panic!("unexpected duplicate"),
        }
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    // Wall time of the whole loop, batch copies included: conservative.
    IngestRun { flows_per_s: flows as f64 / started.elapsed().as_secs_f64(), flows, latency_us: h }
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
        http: Default::default(),
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
         egress / 40 % ingress, 5 DNS answers per batch), one transaction each; \
         each ingest figure is the median (and range) of {INGEST_RUNS} runs of {}s. Queries: a graph of {QUERY_EDGES} more edges between {QUERY_IDENTITIES} identities; {QUERIES} queries each. \
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
            "| {:?} | {} flows/s | {} | {} flows/s | {:.1} / {:.1} ms | {} | {} / {} µs ({} rows) | {} / {} µs | {:.0} / {:.0} ms |",
            r.backend,
            r.ingest_one,
            r.ingest_per_cpu.map_or("n/a".into(), |v| v.to_string()),
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
    let _ = writeln!(
        s,
        "\nRecent-flow pages (`Store::flows`, newest first) over everything ingested above, p50 / p99 \
         ({FLOW_QUERIES} queries each, {} for the 10,000-row page):\n",
        FLOW_QUERIES / 10
    );
    let names: Vec<&str> = results.first().map(|r| r.flow_queries.iter().map(|q| q.0).collect()).unwrap_or_default();
    let _ = writeln!(s, "| backend | {} |", names.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(names.len()));
    for r in results {
        let cells: Vec<String> = r.flow_queries.iter().map(|(_, p50, p99)| format!("{p50} / {p99} µs")).collect();
        let _ = writeln!(s, "| {:?} | {} |", r.backend, cells.join(" | "));
    }
    s
}
