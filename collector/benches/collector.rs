//! Collector benchmark (root): new TCP connections between two network namespaces,
//! measured in the same run
//! * without the collector (baseline connection rate),
//! * with the collector at the fastest rate this machine generates (overhead ratio and
//!   whether a single event was lost),
//! * with the collector at fixed 1k and 10k connections/s (its CPU use, from
//!   /proc/PID/stat, and loss).
//!
//! Loss is checked end to end: every connection the load generator completed must be
//! counted on the learner's edge and the kernel ring-buffer drop counter must stay 0.
//!
//! Run: `cargo bench -p bulkhead-collector --bench collector` (as root). Writes the
//! `## Collector` section of BENCHMARKS.md.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bulkhead_learner::grpc::ingest::Enrollment;
use bulkhead_learner::server::{self, Running, ServerConfig};
use bulkhead_learner::store::{EdgeQuery, Store};
use bulkhead_model::Protocol;
use bulkhead_testkit::netns::{ChildGuard, TestNet, require_root};

const PORT: u16 = 9000;
const PHASE: Duration = Duration::from_secs(5);
const CLIENT_THREADS: usize = 4;

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    require_root();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let net = TestNet::new(2);
    let stop = Arc::new(AtomicBool::new(false));
    serve(&net, stop.clone());
    let dst = SocketAddr::new(IpAddr::V4(net.hosts()[1].ipv4), PORT);
    // Hundreds of thousands of connections from one address to one port would run
    // the client out of ports held in TIME_WAIT and measure that instead of the
    // collector: reuse them (safe with timestamps) and widen the range. Both sysctls are
    // per network namespace, so only the test's client namespace changes.
    net.hosts()[0].netns.run(|| {
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1").expect("tcp_tw_reuse");
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535").expect("port range");
    });

    // Warm-up, then the baseline without any collector.
    load(&net, dst, None, Duration::from_secs(1));
    let base_before = load(&net, dst, None, PHASE);
    println!("baseline before (no collector): {:.0} conn/s", base_before.rate());

    let dir = tempfile::tempdir().expect("tempdir");
    let (learner, collector, metrics_addr) = rt.block_on(start_pipeline(&net, dir.path()));
    let store = learner.store.clone();
    let pid = collector.id();
    let mut rows = Vec::new();
    let mut generated_total = 0u64;

    let max = measured(&net, dst, None, pid, &rt, &store, &metrics_addr, &mut generated_total);
    println!(
        "with collector, max rate: {:.0} conn/s, CPU {:.1}% of one core, lost {}",
        max.load.rate(),
        max.cpu_pct,
        max.lost
    );
    rows.push(("max", max));
    for target in [1_000.0, 10_000.0] {
        let m = measured(&net, dst, Some(target), pid, &rt, &store, &metrics_addr, &mut generated_total);
        println!(
            "with collector at {target:.0}/s: achieved {:.0} conn/s, CPU {:.2}% of one core, lost {}",
            m.load.rate(),
            m.cpu_pct,
            m.lost
        );
        rows.push(if target < 5_000.0 { ("1k", m) } else { ("10k", m) });
    }
    drop(collector);
    learner.abort();
    // The same machine drifts by ±20% between runs: measure the baseline on both sides
    // of the collector phases and compare with their mean.
    let base_after = load(&net, dst, None, PHASE);
    println!("baseline after (no collector): {:.0} conn/s", base_after.rate());
    stop.store(true, Ordering::Relaxed);
    let base = Load { done: base_before.done + base_after.done, elapsed: base_before.elapsed + base_after.elapsed };

    let mut md = String::new();
    md.push_str("Command: `cargo bench -p bulkhead-collector --bench collector` (root; two network namespaces over a veth bridge; ");
    md.push_str(&format!(
        "{CLIENT_THREADS} client threads doing connect/1-byte request/1-byte reply/close; {}s per phase).\n\n",
        PHASE.as_secs()
    ));
    md.push_str("| phase | target conn/s | achieved conn/s | vs. no collector | collector CPU (% of one core) | events lost |\n");
    md.push_str("|---|---|---|---|---|---|\n");
    md.push_str(&format!(
        "| no collector (before / after) | max | {:.0} / {:.0} | 1.00× (mean) | – | – |\n",
        base_before.rate(),
        base_after.rate()
    ));
    for (name, m) in &rows {
        let target = match *name {
            "max" => "max".to_owned(),
            n => n.to_owned(),
        };
        // A ratio only means something for the unpaced phase.
        let ratio =
            if *name == "max" { format!("{:.2}×", m.load.rate() / base.rate()) } else { "– (paced)".to_owned() };
        md.push_str(&format!(
            "| collector | {target} | {:.0} | {ratio} | {:.2} | {} |\n",
            m.load.rate(),
            m.cpu_pct,
            m.lost
        ));
    }
    md.push_str(
        "\nLost = connections completed by the load generator minus connections counted on the learner's edge, ",
    );
    md.push_str("plus kernel ring-buffer drops; it must be 0.\n");
    match bulkhead_testkit::benchmarks::write_section("Collector", &md) {
        Ok(path) => println!("wrote ## Collector to {}", path.display()),
        Err(e) => panic!("could not update BENCHMARKS.md: {e}"),
    }
    let lost: u64 = rows.iter().map(|(_, m)| m.lost).sum();
    assert_eq!(lost, 0, "the collector lost events");
}

struct Load {
    done: u64,
    elapsed: Duration,
}

impl Load {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }
}

struct Measured {
    load: Load,
    cpu_pct: f64,
    lost: u64,
}

#[expect(clippy::too_many_arguments, reason = "a benchmark step with its whole context")]
fn measured(
    net: &TestNet,
    dst: SocketAddr,
    target: Option<f64>,
    pid: u32,
    rt: &tokio::runtime::Runtime,
    store: &Store,
    metrics_addr: &str,
    generated_total: &mut u64,
) -> Measured {
    let cpu0 = cpu_ticks(pid);
    let load = load(net, dst, target, PHASE);
    let cpu1 = cpu_ticks(pid);
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let cpu_pct = (cpu1 - cpu0) as f64 / ticks_per_s / load.elapsed.as_secs_f64() * 100.0;
    *generated_total += load.done;
    let want = *generated_total;
    // Wait (bounded) until the learner has every connection, then read the loss.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut counted = 0;
    while Instant::now() < deadline {
        counted = rt.block_on(edge_connections(store));
        if counted >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let dropped = metric(metrics_addr, "bulkhead_collector_ringbuf_dropped_total");
    let lost = want.saturating_sub(counted) + dropped;
    Measured { load, cpu_pct, lost }
}

async fn start_pipeline(net: &TestNet, dir: &Path) -> (Running, ChildGuard, String) {
    let inv = dir.join("inventory.yaml");
    std::fs::write(
        &inv,
        format!(
            "workloads:\n  - {{name: client, labels: {{app: client}}, match: {{netns: [{}]}}}}\n  - {{name: server, labels: {{app: server}}, match: {{netns: [{}]}}}}\n",
            net.hosts()[0].netns.name(),
            net.hosts()[1].netns.name()
        ),
    )
    .expect("inventory");
    let running = server::start(ServerConfig {
        db_url: format!("sqlite://{}", dir.join("bench.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: Some(inv),
        enrollment: Enrollment::Open,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(3600),
        policy: Default::default(),
        auth: Default::default(),
        tls: None,
    })
    .await
    .expect("learner");
    let metrics_port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let names = format!("{},{}", net.hosts()[0].netns.name(), net.hosts()[1].netns.name());
    let child = Command::new(env!("CARGO_BIN_EXE_bulkhead-collector"))
        .args(["--learner", &format!("http://{}", running.grpc_addr), "--node-id", "bench", "--insecure-grpc"])
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .args(["--metrics-listen", &metrics_addr, "--netns", &names])
        .env("BULKHEAD_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("collector");
    let store = running.store.clone();
    // Ready when the learner has the namespaces as endpoints.
    let want = [net.hosts()[0].netns.ino(), net.hosts()[1].netns.ino()];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let eps = store.endpoints().await.unwrap_or_default();
        if want.iter().all(|i| eps.iter().any(|e| e.fact.netns_ino == *i)) {
            break;
        }
        assert!(Instant::now() < deadline, "collector did not report endpoints in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (running, ChildGuard::new(child), metrics_addr)
}

async fn edge_connections(store: &Store) -> u64 {
    store
        .edges(&EdgeQuery::default())
        .await
        .unwrap_or_default()
        .iter()
        .filter(|e| e.edge.key.dst_port == PORT && e.edge.key.protocol == Protocol::Tcp)
        .map(|e| e.edge.connections)
        .sum()
}

fn serve(net: &TestNet, stop: Arc<AtomicBool>) {
    let listener = net.hosts()[1].netns.run(|| TcpListener::bind(("0.0.0.0", PORT)).expect("bind"));
    for _ in 0..2 {
        let l = listener.try_clone().expect("clone listener");
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok((mut s, _)) = l.accept() {
                    let mut b = [0u8; 1];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(&b);
                    }
                }
            }
        });
    }
}

/// Connect/request/reply/close loops from host 0; `target` paces to a total rate.
fn load(net: &TestNet, dst: SocketAddr, target: Option<f64>, dur: Duration) -> Load {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..CLIENT_THREADS {
            let done = done.clone();
            scope.spawn(|| {
                net.hosts()[0].netns.run(move || {
                    let per_thread = target.map(|t| t / CLIENT_THREADS as f64);
                    let mut n = 0u64;
                    while start.elapsed() < dur {
                        if let Some(rate) = per_thread {
                            let due = start + Duration::from_secs_f64(n as f64 / rate);
                            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                                std::thread::sleep(wait);
                            }
                        }
                        if let Ok(mut s) = TcpStream::connect(dst) {
                            let mut b = [1u8; 1];
                            if s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        n += 1;
                    }
                })
            });
        }
    });
    Load { done: done.load(Ordering::Relaxed), elapsed: start.elapsed() }
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised comm: state is 3rd, utime 14th, stime 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn metric(addr: &str, name: &str) -> u64 {
    let Ok(mut s) = TcpStream::connect(addr) else { return 0 };
    let _ = s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes());
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
