//! UI server-time benchmark: the overview, flows page and graph data over a SQLite store
//! holding 100,000 edges and 1,000,000 flows, through the real router (session lookup,
//! CSRF-free GETs, rendering, JSON) — and the graph page's weight.
//!
//! `cargo bench -p bulkhead-learner --bench ui`
//!
//! The graph data is measured four ways: warm (the learner's in-memory edge mirror and
//! policy decisions are reused and nothing was ingested since the last request), after
//! an ingested 1000-flow batch before each request (the mirror reads what changed), with
//! every edge read again (a flow the mirror never saw pruned before each request; the
//! decisions reused), and cold (a new learner state per request: every edge read, every
//! decision made).
//!
//! Prints p50 / p99 / max per route (hdrhistogram, whole response read) and replaces the
//! `## Web UI` section of BENCHMARKS.md. `BH_UI_BENCH_QUICK=1` seeds a tenth of the data
//! and measures fewer requests (a smoke run; BENCHMARKS.md is left alone).
//!
//! For iterating on one route: `BH_UI_BENCH_DB=/path/ui.db` keeps the seeded store there
//! and reuses it on the next run (seeding takes most of a run), and
//! `BH_UI_BENCH_ONLY=graph` measures only the routes whose request contains that text.
//! Either leaves BENCHMARKS.md alone. `BH_UI_BENCH_DUMP=dir` writes each route's last
//! body there (to compare answers before and after a change).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use bulkhead_learner::auth::{self, Role};
use bulkhead_learner::store::{Decision, EdgeMirror, GraphEdgeQuery, IngestBatch, ResolvedFlow, Store};
use bulkhead_learner::web::{AppState, router};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Convergence, Direction, Evidence, Flow, Identity, LabelSelector, Labels, Level, LossCounters, Peer, Policy,
    PortRange, Proposal, ProposedRule, Protocol, Rule, Verdict, Window,
};
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use tower::ServiceExt;

const COMMAND: &str = "cargo bench -p bulkhead-learner --bench ui";
/// Goal from the issue: every measured route's p99 under this.
const GOAL_P99_MS: f64 = 100.0;

struct Scale {
    workloads: usize,
    namespaces: usize,
    edges: usize,
    flows: usize,
    requests: usize,
}

const FULL: Scale = Scale { workloads: 1_000, namespaces: 20, edges: 100_000, flows: 1_000_000, requests: 300 };
const QUICK: Scale = Scale { workloads: 200, namespaces: 10, edges: 10_000, flows: 100_000, requests: 30 };
const BATCH_FLOWS: usize = 1_000;

/// How a route's requests are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Back to back through one router (one learner state).
    Warm,
    /// One 1000-flow batch (1000 existing edges) ingested before each request, untimed.
    AfterBatch,
    /// Before each request (untimed), a one-flow batch of an old flow ingested and pruned
    /// at once: the mirror finds a flow it never saw gone and reads every edge again (as
    /// when it is too many flows behind); policy decisions are reused.
    Reread,
    /// Each request through a new router with a new learner state.
    Cold,
}

fn main() -> std::process::ExitCode {
    let quick = std::env::var_os("BH_UI_BENCH_QUICK").is_some();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(run(if quick { QUICK } else { FULL }, quick))
}

async fn run(scale: Scale, quick: bool) -> std::process::ExitCode {
    let dir = tempfile::tempdir().expect("temp dir");
    let kept = std::env::var_os("BH_UI_BENCH_DB").map(std::path::PathBuf::from);
    let only = std::env::var("BH_UI_BENCH_ONLY").ok().filter(|s| !s.is_empty());
    let dump = std::env::var_os("BH_UI_BENCH_DUMP").map(std::path::PathBuf::from);
    let path = kept.clone().unwrap_or_else(|| dir.path().join("ui.db"));
    let reuse = path.exists();
    let store = Store::open(&format!("sqlite://{}", path.display())).await.expect("store");
    let now = bulkhead_learner::grpc::ingest::unix_ms();

    let t = Instant::now();
    let ids = workload_ids(&store, &scale).await;
    if reuse {
        println!("reusing the store in {}", path.display());
    } else {
        seed(&store, &scale, &ids, now).await;
    }
    let seed_secs = t.elapsed().as_secs_f64();
    let edges = store.edges(&Default::default()).await.map(|e| e.len()).unwrap_or(0);
    println!("{edges} edges, {} flows ready in {seed_secs:.1} s", scale.flows);

    let hash = auth::hash_password("benchmark password 1").expect("hash");
    // Unique per run: a reused store keeps the users of earlier runs.
    let user = store.create_user(&format!("bench-{now}"), Role::Admin, &hash, false, "bench", now).await.expect("user");
    let session = store.create_session(user.id, 3_600_000, now).await.expect("session");
    let cookie = format!("bulkhead_session={}", session.token.expose());
    let app = router(AppState::for_store(store.clone()));

    let ns = "ns-3";
    let mid_id = scale.flows as i64 / 2;
    let namespaces = "/api/v1/graph?level=namespace";
    let routes: Vec<(&str, String, Mode)> = vec![
        ("overview `/`", "/".into(), Mode::Warm),
        ("flows page, newest", "/flows".into(), Mode::Warm),
        ("flows page, namespace + port filter", format!("/flows?ns={ns}&port=8001"), Mode::Warm),
        ("flows page, deep keyset page", format!("/flows?before={mid_id}"), Mode::Warm),
        ("graph data, namespaces", namespaces.into(), Mode::Warm),
        ("graph data, one namespace's workloads", format!("/api/v1/graph?level=workload&namespace={ns}"), Mode::Warm),
        ("graph data, all workloads (truncated to the busiest)", "/api/v1/graph?level=workload".into(), Mode::Warm),
        ("graph data, namespaces, after each ingested batch", namespaces.into(), Mode::AfterBatch),
        (
            "graph data, all workloads, after each ingested batch",
            "/api/v1/graph?level=workload".into(),
            Mode::AfterBatch,
        ),
        ("graph data, namespaces, every edge read again", namespaces.into(), Mode::Reread),
        ("graph data, namespaces, cold (new learner state)", namespaces.into(), Mode::Cold),
        ("proposals queue", "/proposals".into(), Mode::Warm),
        ("graph page HTML", "/graph".into(), Mode::Warm),
    ];
    // Live batches: a boot of their own per run (a reused store keeps earlier ones).
    let mut live_seq = 0;
    let mut rows = Vec::new();
    for (name, uri, mode) in routes.iter().filter(|(_, uri, _)| only.as_ref().is_none_or(|o| uri.contains(o.as_str())))
    {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
        let mut bytes = 0;
        let mut status = StatusCode::OK;
        for i in 0..scale.requests + 5 {
            let app = match mode {
                Mode::Cold => router(AppState::for_store(store.clone())),
                Mode::Warm | Mode::AfterBatch | Mode::Reread => app.clone(),
            };
            let boot = format!("bench-live-{now}");
            match mode {
                Mode::AfterBatch => {
                    live_seq += 1;
                    let batch = flow_batch(&ids, &scale, &boot, live_seq, live_seq as usize, now);
                    store.ingest(&batch).await.expect("ingest");
                }
                Mode::Reread => {
                    // Seen in 1970: older than anything seeded, so the prune takes it alone.
                    live_seq += 1;
                    let mut batch = flow_batch(&ids, &scale, &boot, live_seq, 0, 1_000);
                    batch.flows.truncate(1);
                    store.ingest(&batch).await.expect("ingest");
                    assert_eq!(store.prune_flows(2_000).await.expect("prune"), 1);
                }
                Mode::Warm | Mode::Cold => {}
            }
            let req = Request::get(uri.as_str()).header("cookie", &cookie).body(Body::empty()).expect("request");
            let t = Instant::now();
            let resp = app.oneshot(req).await.expect("response");
            status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let us = t.elapsed().as_micros() as u64;
            bytes = body.len();
            if i >= 5 {
                h.record(us.max(1)).expect("record");
            }
            if let Some(dir) = dump.as_ref().filter(|_| i == scale.requests + 4) {
                let mut file: String = uri.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
                if *mode != Mode::Warm {
                    file.push_str(&format!("_{mode:?}").to_lowercase());
                }
                std::fs::write(dir.join(file), &body).expect("dump");
            }
        }
        print!(".");
        let _ = std::io::stdout().flush();
        rows.push((
            *name,
            uri.clone(),
            status,
            bytes,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.max()),
        ));
    }
    println!();

    let phases = edge_read_phases(&store, &ids, &scale, &format!("bench-phases-{now}"), now).await;
    let weight = page_weight(&app, &cookie).await;
    let section = render(&scale, edges, seed_secs, &rows, &phases, &weight);
    println!("\n{section}");
    let failed: Vec<_> = rows.iter().filter(|r| r.2 != StatusCode::OK).map(|r| format!("{} → {}", r.1, r.2)).collect();
    if !failed.is_empty() {
        eprintln!("routes that did not answer 200: {failed:?}");
        return std::process::ExitCode::FAILURE;
    }
    if quick || kept.is_some() || only.is_some() {
        println!("(quick, reused or filtered run: BENCHMARKS.md left alone)");
        return std::process::ExitCode::SUCCESS;
    }
    match bulkhead_testkit::benchmarks::write_section("Web UI", &section) {
        Ok(p) => {
            println!("Wrote the `## Web UI` section of {}.", p.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("could not update BENCHMARKS.md: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The workloads' identities (allocated on first use, found again in a reused store).
async fn workload_ids(store: &Store, scale: &Scale) -> Vec<Identity> {
    let mut ids = Vec::with_capacity(scale.workloads);
    for i in 0..scale.workloads {
        let labels = Labels::new([
            ("app".to_owned(), format!("svc-{i}")),
            ("io.kubernetes.pod.namespace".to_owned(), format!("ns-{}", i % scale.namespaces)),
        ])
        .expect("labels");
        ids.push(store.ensure_identity(&labels).await.expect("identity"));
    }
    ids
}

/// Batch `b` of a boot: 1000 flows seen at `seen` on edges `b * 1000 …` (wrapping), where
/// edge `i` goes from workload `i % W` to `(i % W + 1 + i / W) % W` on one of five ports
/// (all distinct).
fn flow_batch(ids: &[Identity], scale: &Scale, boot: &str, seq: u64, b: usize, seen: i64) -> IngestBatch {
    let w = scale.workloads;
    let edge = |i: usize| {
        let src = i % w;
        let k = i / w;
        (ids[src], ids[(src + 1 + k) % w], 8000 + (k % 5) as u16)
    };
    let flows = (0..BATCH_FLOWS)
        .map(|f| {
            let (src, dst, port) = edge((b * BATCH_FLOWS + f) % scale.edges);
            ResolvedFlow { flow: flow(port, seen, f), src_identity: src, dst_identity: dst }
        })
        .collect();
    IngestBatch {
        node_id: "bench-node".into(),
        boot_id: boot.into(),
        seq,
        received_unix_ms: seen,
        flows,
        endpoints: None,
        dns_answers: vec![],
        loss: LossCounters::default(),
    }
}

/// `scale.edges` edges between the workloads (see [`flow_batch`]) and `flows` flow rows
/// spread evenly over the edges and over the last six hours.
async fn seed(store: &Store, scale: &Scale, ids: &[Identity], now: i64) {
    store.register_agent("bench-node", now).await.expect("agent");
    let batches = scale.flows / BATCH_FLOWS;
    let span_ms = 6 * 3_600_000_i64;
    for b in 0..batches {
        let seen = now - span_ms + (b as i64 * span_ms) / batches as i64;
        store.ingest(&flow_batch(ids, scale, "bench", b as u64 + 1, b, seen)).await.expect("ingest");
        if b % 100 == 0 {
            print!("\rseeding flows: {}/{}", b * BATCH_FLOWS, scale.flows);
            let _ = std::io::stdout().flush();
        }
    }
    println!();
    // Half the workloads are under an approved policy (ingress from their namespace on
    // one port), so the graph classifies edges against policies, as in real use.
    for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
        let ns = format!("ns-{}", i % scale.namespaces);
        let app = format!("svc-{i}");
        let p = policy_proposal(*id, &ns, &app, now);
        let rec = store.put_proposal(&p, now).await.expect("proposal");
        let policy = rec.proposal.policy.clone();
        store.decide_proposal(rec.summary.id, Decision::Approve { policy }, "bench", None, now).await.expect("approve");
    }
}

/// An approved-to-be proposal for `target`: ingress from its own namespace on 8000/tcp.
fn policy_proposal(target: Identity, ns: &str, app: &str, now: i64) -> Proposal {
    let rule = Rule {
        peer: Peer::Workloads { selector: LabelSelector::with_labels([(NAMESPACE_KEY, ns)]) },
        ports: vec![PortRange::single(Protocol::Tcp, 8000)],
        http: vec![],
    };
    Proposal {
        target,
        workload: app.into(),
        level: Level::Exact,
        window: Window { from_unix_ms: now - 6 * 3_600_000, to_unix_ms: now },
        policy: Policy {
            name: app.into(),
            namespace: Some(ns.into()),
            selector: LabelSelector::with_labels([("app", app), (NAMESPACE_KEY, ns)]),
            ingress: Some(vec![rule.clone()]),
            egress: None,
        },
        rules: vec![ProposedRule {
            id: "ingress-0".into(),
            direction: Direction::Ingress,
            rule,
            evidence: Evidence {
                connections: 1,
                first_seen_unix_ms: now,
                last_seen_unix_ms: now,
                ..Evidence::default()
            },
            flags: vec![],
            included: true,
            widens: vec![],
            widens_total: 0,
        }],
        widening_total: 0,
        convergence: Convergence { converged: true, last_new_edge_unix_ms: Some(now), quiet_period_ms: 60_000 },
        lints: vec![],
        removals: vec![],
    }
}

fn flow(port: u16, seen: i64, i: usize) -> Flow {
    Flow {
        src_addr: IpAddr::V4(Ipv4Addr::new(10, 1, (i / 250) as u8, (i % 250) as u8 + 1)),
        src_port: 0,
        dst_addr: IpAddr::V4(Ipv4Addr::new(10, 2, (i / 250) as u8, (i % 250) as u8 + 1)),
        dst_port: port,
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
        netns_ino: 4_026_531_840 + (i % 500) as u64,
        cgroup_id: 10_000 + (i % 1000) as u64,
        pid: 100 + i as u32,
        comm: "curl".into(),
        connections: 1 + (i % 7) as u64,
        bytes_sent: 1_000,
        bytes_received: 10_000,
        packets: 20,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: seen - 1_000,
        last_seen_unix_ms: seen,
        http: Default::default(),
    }
}

/// The graph page and every `/static/…` asset it references: raw and gzip bytes.
struct Weight {
    files: Vec<(String, usize, usize)>,
}

async fn page_weight(app: &axum::Router, cookie: &str) -> Weight {
    let get = |uri: String, gzip: bool| {
        let mut b = Request::get(uri).header("cookie", cookie);
        if gzip {
            b = b.header("accept-encoding", "gzip");
        }
        b.body(Body::empty()).expect("request")
    };
    let fetch = |uri: String| async move {
        let raw = app.clone().oneshot(get(uri.clone(), false)).await.expect("response");
        let raw = raw.into_body().collect().await.expect("body").to_bytes();
        let gz = app.clone().oneshot(get(uri, true)).await.expect("response");
        let gz = gz.into_body().collect().await.expect("body").to_bytes();
        (raw, gz.len())
    };
    let (html, html_gz) = fetch("/graph".into()).await;
    let html_text = String::from_utf8_lossy(&html).into_owned();
    let mut files = vec![("/graph (HTML)".to_owned(), html.len(), html_gz)];
    for attr in ["src=\"", "href=\""] {
        for part in html_text.split(attr).skip(1) {
            let Some(path) = part.split('"').next() else { continue };
            if !path.starts_with("/static/") || files.iter().any(|f| f.0 == path) {
                continue;
            }
            let (raw, gz) = fetch(path.to_owned()).await;
            files.push((path.to_owned(), raw.len(), gz));
        }
    }
    Weight { files }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1_000.0
}

type Row<'a> = (&'a str, String, StatusCode, usize, f64, f64, f64);

/// The store's part of a graph answer alone (no context, fold or JSON), median ms.
struct Phases {
    /// Every edge read from the table (a new mirror each time).
    full_read: f64,
    /// A current mirror catching up on one ingested batch.
    catch_up: f64,
}

/// Times [`Phases`], 21 times each.
async fn edge_read_phases(store: &Store, ids: &[Identity], scale: &Scale, boot: &str, now: i64) -> Phases {
    const RUNS: usize = 21;
    let all = GraphEdgeQuery::default();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut full = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        store.graph_edges(&all, &EdgeMirror::default()).await.expect("edges");
        full.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mirror = EdgeMirror::default();
    store.graph_edges(&all, &mirror).await.expect("edges");
    let mut caught = Vec::with_capacity(RUNS);
    for seq in 1..=RUNS as u64 {
        store.ingest(&flow_batch(ids, scale, boot, seq, seq as usize * 7, now)).await.expect("ingest");
        let t = Instant::now();
        store.graph_edges(&all, &mirror).await.expect("edges");
        caught.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Phases { full_read: median(full), catch_up: median(caught) }
}

fn render(scale: &Scale, edges: usize, seed_secs: f64, rows: &[Row<'_>], phases: &Phases, weight: &Weight) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    let mut s = String::new();
    let _ = writeln!(s, "Command: `{COMMAND}` (release build).");
    let _ = writeln!(
        s,
        "Machine: {cpu}, {} cores, shared (load average at the end: {load}); SQLite in a temp file.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let _ = writeln!(
        s,
        "Store: {} workloads in {} namespaces, {edges} edges, {} flows over the last 6 h (seeded through \
         `Store::ingest` in {seed_secs:.0} s); half the workloads under an approved policy. Each route is requested {} times (after 5 warm-ups) through the \
         whole router as a logged-in admin (session lookup included); the time is until the last body byte. \
         Goal: p99 < {GOAL_P99_MS:.0} ms.\n",
        scale.workloads, scale.namespaces, scale.flows, scale.requests
    );
    let _ = writeln!(
        s,
        "Graph data and caching: the learner keeps the SQLite store's edges in memory and brings them up to \
         date before each graph request from the flows written since (`store::graph`), and keeps policy \
         decisions per edge while the policies, identities and modes are unchanged. The plain graph rows are \
         requested back to back with nothing ingested in between, so each finds no new flows (one probe) and \
         reuses every decision. \"After each ingested batch\" ingests one {BATCH_FLOWS}-flow batch \
         ({BATCH_FLOWS} existing edges changed; not timed) before every request, so each request reads those \
         edges again. \"Every edge read again\" ingests a one-flow batch of an old flow and prunes it before \
         every request (not timed): the mirror finds a flow it never saw gone and reads the whole edge table, as \
         it also does when more flows were written since its last read than reading every edge costs (a \
         quarter of the edge count, at least 4096: here {behind} flows, ~{behind_min:.0} minutes of this \
         store's flow rate); the decisions are reused. \"Cold\" serves every request from a new learner state: the whole edge table \
         is read and every edge's coverage decided, as on a learner's first graph request. The context \
         (identities, endpoints, modes, policies, proposals) is read from the store on every request in all \
         modes.\n",
        behind = (edges / 4).max(4_096),
        behind_min = (edges / 4).max(4_096) as f64 / (scale.flows as f64 / 360.0),
    );
    let _ = writeln!(s, "| route | request | body | p50 | p99 | max | p99 < {GOAL_P99_MS:.0} ms |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (name, uri, _, bytes, p50, p99, max) in rows {
        let ok = if *p99 < GOAL_P99_MS { "yes" } else { "**no**" };
        let _ =
            writeln!(s, "| {name} | `{uri}` | {} KiB | {p50:.1} ms | {p99:.1} ms | {max:.1} ms | {ok} |", bytes / 1024);
    }
    let graph: Vec<&Row<'_>> = rows.iter().filter(|r| r.1.starts_with("/api/v1/graph")).collect();
    let missed: Vec<String> = graph
        .iter()
        .filter(|r| r.5 >= GOAL_P99_MS)
        .map(|r| format!("{} (p99 {:.1} ms, {:.1} ms over)", r.0, r.5, r.5 - GOAL_P99_MS))
        .collect();
    let p50 = |name: &str| graph.iter().find(|r| r.0 == name).map_or(f64::NAN, |r| r.4);
    let warm = p50("graph data, namespaces");
    let _ = writeln!(
        s,
        "\n**Reading.** {} With the mirror current, a graph answer is the context read (beside a one-statement \
         probe for new flows), one pass folding the {edges} edges into groups (policy decisions found by the \
         edge's position in the mirror) and the JSON: {warm:.1} ms at p50 for namespaces. Catching the mirror \
         up on one {BATCH_FLOWS}-flow batch takes {:.1} ms (median, the store call alone); reading every edge \
         from the table takes {:.1} ms (the database builds them as two JSON texts at once, one per core), \
         which is what every graph request paid before the mirror and what the \"every edge read again\" row \
         ({:.1} ms at p50) and the cold one ({:.1} ms) pay. Between those two, the difference is deciding \
         every edge's coverage anew (cold) against finding the kept decisions by key (the new set has no \
         positions remembered yet).",
        if missed.is_empty() {
            "Every graph row meets the goal.".to_owned()
        } else {
            format!("Missing the goal: {}.", missed.join("; "))
        },
        phases.catch_up,
        phases.full_read,
        p50("graph data, namespaces, every edge read again"),
        p50("graph data, namespaces, cold (new learner state)"),
    );
    let (raw, gz): (usize, usize) = weight.files.iter().fold((0, 0), |(r, g), f| (r + f.1, g + f.2));
    let _ = writeln!(s, "\nGraph page weight (everything the browser loads before fetching graph data):\n");
    let _ = writeln!(s, "| file | bytes | gzip |");
    let _ = writeln!(s, "|---|---|---|");
    for (name, r, g) in &weight.files {
        let _ = writeln!(s, "| `{name}` | {} KiB | {} KiB |", r / 1024, g / 1024);
    }
    let _ = writeln!(s, "| **total** | **{} KiB** | **{} KiB** |", raw / 1024, gz / 1024);
    s
}
