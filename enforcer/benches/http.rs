//! L7 enforcement cost benchmark (root, issue 6 "Numbers"): what judging every HTTP
//! request line in the kernel costs per request, against L4-only enforcement of the
//! same traffic. Real HTTP/1.1 between two network namespaces — `POST
//! /v1/request-landing` with a few headers and a small JSON body, answered by a small
//! `200` — measured in the same run as
//! * keep-alive request rate (persistent connections, one request in flight each),
//! * new-connection request rate (connect, one request with `Connection: close`,
//!   response, close),
//!
//! for
//! * no filter (programs detached),
//! * Bulkhead enforce with L4 rules allowing the server's ports,
//! * Bulkhead enforce with the server's ingress entries narrowed to the one exact
//!   `POST /v1/request-landing` (every request line judged in the kernel),
//! * the same with 1,000 HTTP rules in the entries' set (exact paths and prefixes,
//!   many sharing a long prefix with the requested path), to show the cost does not
//!   grow with the number of HTTP rules.
//!
//! The harness is shared with `enforce.rs` (`common/`): client and server are this binary re-run
//! as worker processes in their own network namespaces and cgroups, pinned to one CPU;
//! configurations are interleaved round-robin in short rounds; the policy is applied
//! through the library (validate, render, diff, `Datapath::apply`). Then a phase with
//! BPF run-time statistics on gives the programs' own ns per run and per request, and
//! a check phase proves from the kernel's counters that requests were judged: in
//! monitor mode with a rule set the request does not match, every request must be
//! audited exactly once, and in enforce mode a `PUT /v1/exhaust-port` must be dropped.
//!
//! Run: `cargo bench -p bulkhead-enforcer --bench http` (as root). Writes the
//! `## L7 enforcement cost` section of BENCHMARKS.md.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bulkhead_enforcer::datapath::DatapathCounters;
use bulkhead_enforcer::datapath::EgressCheck;
use bulkhead_model::{Direction, HttpRule, NodePolicy, NodeRule, RolloutMode};
use bulkhead_testkit::benchmarks::{load_average, machine};
use bulkhead_testkit::require_root;
use common::{
    CLIENT_ID, Enforcer, IO_TIMEOUT, Load, ProfileRow, SERVER_ID, Sides, Testbed, Worker, bench_cpu, connect_load,
    median, persistent_load, range, run_worker, serve, tcp_key, two_workload_policy,
};

/// Keep-alive connections are served here (a thread per connection).
const KEEPALIVE_PORT: u16 = 8080;
/// One request per connection is served here (a pool of accepting threads).
const NEWCONN_PORT: u16 = 8081;
/// One measurement (one load) of one configuration.
const ROUND: Duration = Duration::from_secs(2);
/// Rounds per configuration and load.
const CYCLES: usize = 5;
/// Set to run one short cycle (a smoke test of the benchmark itself; BENCHMARKS.md
/// is not written).
const QUICK_ENV: &str = "BH_HTTP_BENCH_QUICK";
/// Persistent connections of the keep-alive load, one client thread each.
const KEEPALIVE_CONNS: usize = 2;
/// Client threads of the new-connection load (and server accept threads).
const NEWCONN_THREADS: usize = 4;
/// HTTP rules of the large set.
const MANY_HTTP_RULES: usize = 1_000;
/// Rule ids of the server's two ingress entries (the ones narrowed to HTTP rules).
const RULE_SERVER_KEEPALIVE: u32 = 3;
const RULE_SERVER_NEWCONN: u32 = 4;

const METHOD: &str = "POST";
const PATH: &str = "/v1/request-landing";
const BODY: &str = "{\"ship\":\"tie-fighter\",\"bay\":3}\n";
/// What the enforce check sends: not in any rule set of the benchmark.
const DENIED_METHOD: &str = "PUT";
const DENIED_PATH: &str = "/v1/exhaust-port";

fn main() {
    if run_worker(server_worker, client_worker) {
        return;
    }
    require_root();
    let started = Instant::now();
    let load_at_start = load_average();
    let quick = std::env::var_os(QUICK_ENV).is_some();
    let (cycles, round) = if quick { (1, Duration::from_millis(300)) } else { (CYCLES, ROUND) };

    // Declared in reverse drop order: the enforcer's handles and the workers go first,
    // then the test bed (cgroups, pins, namespaces).
    let bed = Testbed::new("bench-http");
    let (server, mut client) = bed.workers();
    let sides = bed.sides();
    let mut enforcer = Enforcer::new(bed.datapath_options());
    let keepalive = bed.server_addr(KEEPALIVE_PORT);
    let newconn = bed.server_addr(NEWCONN_PORT);
    let loads = [("keepalive", keepalive, KEEPALIVE_CONNS), ("newconn", newconn, NEWCONN_THREADS)];

    // Warm-up (and a check that the server answers what the loads send).
    for (kind, dst, n) in loads {
        let warm = client.run(kind, dst, n, Duration::from_millis(500));
        assert!(warm.done > 0 && warm.errors == 0, "warm-up {kind}: {warm:?}");
    }

    let mut results: BTreeMap<Filter, Samples> = BTreeMap::new();
    let mut current = Filter::None;
    println!(
        "http bench: {} configurations × {cycles} cycles × 2 loads of {:.1} s",
        Filter::ALL.len(),
        round.as_secs_f64()
    );
    for cycle in 0..cycles {
        for i in 0..Filter::ALL.len() {
            let filter = Filter::ALL[(i + cycle) % Filter::ALL.len()];
            switch(&mut enforcer, &sides, current, filter, RolloutMode::Enforce);
            current = filter;
            let before = Snapshot::take(&enforcer);
            let ka = client.run("keepalive", keepalive, KEEPALIVE_CONNS, round);
            let nc = client.run("newconn", newconn, NEWCONN_THREADS, round);
            let judged = judged(&before, &Snapshot::take(&enforcer));
            println!(
                "[{:>5.1}s] cycle {}/{cycles} {:<14} keep-alive {:>6.0}/s  new-conn {:>6.0}/s  errors {}{}",
                started.elapsed().as_secs_f64(),
                cycle + 1,
                filter.label(),
                ka.rate(),
                nc.rate(),
                ka.errors + nc.errors,
                judged.as_ref().map(|j| format!("  ({})", j.describe())).unwrap_or_default()
            );
            let s = results.entry(filter).or_default();
            s.keepalive.push(ka.rate());
            s.newconn.push(nc.rate());
            s.errors += ka.errors + nc.errors;
            s.requests += ka.done + nc.done;
            s.connections += nc.done + KEEPALIVE_CONNS as u64;
            if let Some(j) = judged {
                s.judged.add(&j);
            }
        }
    }

    // The programs' own time per run and per request (BPF_ENABLE_STATS on).
    println!("[{:>5.1}s] profiling the programs (bpf stats on)", started.elapsed().as_secs_f64());
    let mut profiles = Vec::new();
    for filter in [Filter::L4, Filter::L7(1), Filter::L7(MANY_HTTP_RULES)] {
        switch(&mut enforcer, &sides, current, filter, RolloutMode::Enforce);
        current = filter;
        let rows = enforcer.profile_loads(&mut client, &loads, round);
        println!("  profile {}: {rows:?}", filter.label());
        profiles.push((filter, rows));
    }

    // Proof that requests were judged, from the kernel's counters.
    println!("[{:>5.1}s] checking that every request is judged", started.elapsed().as_secs_f64());
    let check = judged_check(&mut enforcer, &sides, &mut client, keepalive, newconn);
    println!("  {check:?}");
    switch(&mut enforcer, &sides, Filter::L7(1), Filter::None, RolloutMode::Enforce);
    drop(client);
    drop(server);

    let md = report(&results, &profiles, &check, &machine(&load_at_start, started.elapsed()));
    println!("\n{md}");
    assert!(check.passed(), "the check of judged requests failed: {check:?}");
    if quick {
        println!("{QUICK_ENV} set: BENCHMARKS.md left alone");
        return;
    }
    match bulkhead_testkit::benchmarks::write_section("L7 enforcement cost", &md) {
        Ok(path) => println!("wrote ## L7 enforcement cost to {}", path.display()),
        Err(e) => panic!("could not update BENCHMARKS.md: {e}"),
    }
}

// === configurations ===

/// What sits in the path of the benchmark's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Filter {
    /// Programs detached.
    None,
    /// Bulkhead, L4 entries allowing the server's ports.
    L4,
    /// Bulkhead, the server's ingress entries narrowed to N HTTP rules (the
    /// requested method + path among them).
    L7(usize),
}

impl Filter {
    const ALL: [Filter; 4] = [Filter::None, Filter::L4, Filter::L7(1), Filter::L7(MANY_HTTP_RULES)];

    fn label(self) -> String {
        match self {
            Filter::None => "no filter".to_owned(),
            Filter::L4 => "bulkhead L4".to_owned(),
            Filter::L7(n) => format!("bulkhead L7 {n}"),
        }
    }

    fn describe(self) -> String {
        match self {
            Filter::None => "no filter (programs detached)".to_owned(),
            Filter::L4 => "Bulkhead enforce, L4 rule for the port".to_owned(),
            Filter::L7(1) => format!("Bulkhead enforce, L7 rule `{METHOD} {PATH}` (exact)"),
            Filter::L7(n) => format!("Bulkhead enforce, L7, {n} HTTP rules in the set"),
        }
    }
}

/// Tears down `from` and sets up `to` (server endpoint in `mode`).
fn switch(enforcer: &mut Enforcer, sides: &Sides, from: Filter, to: Filter, mode: RolloutMode) {
    match to {
        Filter::None => {
            if from != Filter::None {
                enforcer.detach();
            }
        }
        Filter::L4 | Filter::L7(_) => {
            enforcer.attach(EgressCheck::default());
            let version = enforcer.next_version();
            enforcer.apply(&http_policy(sides, version, &http_rules(to), mode));
        }
    }
}

/// The HTTP rules the server's ingress entries carry under `filter`.
fn http_rules(filter: Filter) -> Vec<HttpRule> {
    match filter {
        Filter::None | Filter::L4 => Vec::new(),
        Filter::L7(n) => many_http_rules(n),
    }
}

/// `n` HTTP rules with `POST /v1/request-landing` (exact) among them. The others are
/// half exact paths, half prefixes, over four methods; most share a long prefix with
/// the requested path (`/v1/request-landing/…`, `/v1/request-…`), so the trie's walk
/// for the request passes many branch points.
fn many_http_rules(n: usize) -> Vec<HttpRule> {
    const METHODS: [&str; 4] = ["GET", "POST", "PUT", "DELETE"];
    let mut rules = vec![HttpRule::exact(METHOD, PATH)];
    for i in 0..n.saturating_sub(1) {
        let method = METHODS[i % METHODS.len()];
        let rule = match i % 4 {
            0 => HttpRule::exact(method, format!("{PATH}/{i}")),
            1 => HttpRule::prefix(method, format!("{PATH}/bay-{i}/")),
            2 => HttpRule::exact(method, format!("/v1/request-{i}")),
            _ => HttpRule::prefix(method, format!("/api/v{}/svc-{i}/", i % 7)),
        };
        rules.push(rule);
    }
    rules.sort();
    rules.dedup();
    assert_eq!(rules.len(), n, "HTTP rules must be distinct");
    rules
}

/// Client egress to both server ports (L4) and server ingress from the client on both
/// ports, narrowed to `http` when not empty; the server in `server_mode`.
fn http_policy(sides: &Sides, version: u64, http: &[HttpRule], server_mode: RolloutMode) -> NodePolicy {
    let (c, s) = (CLIENT_ID, SERVER_ID);
    let narrowed = |key, rule_id| NodeRule { key, rule_id, http: http.to_vec() };
    let rules = vec![
        NodeRule::l4(tcp_key(c, Direction::Egress, s, KEEPALIVE_PORT), 1),
        NodeRule::l4(tcp_key(c, Direction::Egress, s, NEWCONN_PORT), 2),
        narrowed(tcp_key(s, Direction::Ingress, c, KEEPALIVE_PORT), RULE_SERVER_KEEPALIVE),
        narrowed(tcp_key(s, Direction::Ingress, c, NEWCONN_PORT), RULE_SERVER_NEWCONN),
    ];
    two_workload_policy(sides, version, server_mode, [], rules)
}

// === where the time goes ===

// === what the kernel counted ===

/// Kernel counters and the server entries' rule hits at one moment.
struct Snapshot {
    counters: DatapathCounters,
    /// Hits of the server's two ingress entries (one per new connection each side
    /// judged there).
    server_rule_hits: u64,
}

impl Snapshot {
    fn take(enforcer: &Enforcer) -> Option<Snapshot> {
        let counters = enforcer.counters()?;
        let hits = enforcer.rule_use().unwrap_or_default();
        let server_rule_hits =
            [RULE_SERVER_KEEPALIVE, RULE_SERVER_NEWCONN].iter().filter_map(|id| hits.get(id)).map(|u| u.hits).sum();
        Some(Snapshot { counters, server_rule_hits })
    }
}

/// What the programs counted between two snapshots (`None` while detached).
fn judged(before: &Option<Snapshot>, after: &Option<Snapshot>) -> Option<Judged> {
    let (a, b) = (after.as_ref()?, before.as_ref()?);
    Some(Judged {
        allowed: a.counters.allowed - b.counters.allowed,
        audit: a.counters.audit - b.counters.audit,
        denied: a.counters.denied - b.counters.denied,
        ct_hits: a.counters.ct_hits - b.counters.ct_hits,
        fast_path: a.counters.fast_path - b.counters.fast_path,
        server_rule_hits: a.server_rule_hits - b.server_rule_hits,
    })
}

/// What the programs counted during some rounds.
#[derive(Debug, Clone, Copy, Default)]
struct Judged {
    allowed: u64,
    audit: u64,
    denied: u64,
    ct_hits: u64,
    fast_path: u64,
    server_rule_hits: u64,
}

impl Judged {
    fn add(&mut self, o: &Judged) {
        self.allowed += o.allowed;
        self.audit += o.audit;
        self.denied += o.denied;
        self.ct_hits += o.ct_hits;
        self.fast_path += o.fast_path;
        self.server_rule_hits += o.server_rule_hits;
    }

    fn describe(&self) -> String {
        format!(
            "{} allowed, {} audited, {} denied, {} conntrack hits, {} fast-path passes, {} server rule hits",
            self.allowed, self.audit, self.denied, self.ct_hits, self.fast_path, self.server_rule_hits
        )
    }
}

/// The check phase: monitor mode with a rule set the request is not in (every
/// request must be audited exactly once: judged, not waved through), then enforce
/// with the exact rule (the benchmark's request passes, a `PUT /v1/exhaust-port` on a
/// fresh connection is dropped).
#[derive(Debug)]
struct Check {
    /// (load kind, requests completed, requests audited, errors) in monitor mode.
    monitor: Vec<(&'static str, u64, u64, u64)>,
    /// The benchmark's request answered in enforce mode (L7 exact).
    allowed_answered: bool,
    /// The PUT answered in enforce mode (must not be).
    denied_answered: bool,
    /// Kernel drop count of the PUT check.
    denied_counted: u64,
}

impl Check {
    fn passed(&self) -> bool {
        self.monitor.iter().all(|&(_, done, audited, errors)| done > 0 && done == audited && errors == 0)
            && self.allowed_answered
            && !self.denied_answered
            && self.denied_counted >= 1
    }
}

fn judged_check(
    enforcer: &mut Enforcer,
    sides: &Sides,
    client: &mut Worker,
    keepalive: SocketAddr,
    newconn: SocketAddr,
) -> Check {
    // The server's entries allow only a GET elsewhere: the benchmark's POST matches
    // nothing, so monitor mode audits (and passes) each one.
    let monitor_rules = vec![HttpRule::prefix("GET", "/status/")];
    enforcer.attach(EgressCheck::default());
    let version = enforcer.next_version();
    enforcer.apply(&http_policy(sides, version, &monitor_rules, RolloutMode::Monitor));
    let mut monitor = Vec::new();
    for (kind, dst, n) in [("keepalive", keepalive, KEEPALIVE_CONNS), ("newconn", newconn, NEWCONN_THREADS)] {
        let before = Snapshot::take(enforcer);
        let load = client.run(kind, dst, n, Duration::from_millis(500));
        let j = judged(&before, &Snapshot::take(enforcer)).expect("attached");
        monitor.push((kind, load.done, j.audit, load.errors));
    }
    switch(enforcer, sides, Filter::L4, Filter::L7(1), RolloutMode::Enforce);
    let allowed_answered = client.ask(&format!("once {newconn} {METHOD} {PATH}")) == "answered";
    let before = Snapshot::take(enforcer);
    let denied_answered = client.ask(&format!("once {newconn} {DENIED_METHOD} {DENIED_PATH}")) == "answered";
    let denied_counted = judged(&before, &Snapshot::take(enforcer)).map_or(0, |j| j.denied);
    Check { monitor, allowed_answered, denied_answered, denied_counted }
}

// === HTTP ===

/// One HTTP request as the client sends it (one write, so one segment).
fn request(method: &str, path: &str, close: bool) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: deathstar.empire.svc\r\nUser-Agent: bulkhead-bench/1\r\n\
         Accept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{BODY}",
        BODY.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes()
}

/// The server's answer: 200 for the landing request, 404 for anything else.
fn response(ok: bool, close: bool) -> &'static [u8] {
    match (ok, close) {
        (true, false) => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nlanded\r\n",
        (true, true) => {
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 8\r\nConnection: close\r\n\r\nlanded\r\n"
        }
        (false, false) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        (false, true) => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    }
}

/// One parsed message head: the start line and whether the sender closes after it.
struct Head {
    start: String,
    close: bool,
}

/// Reads one HTTP/1.1 message (head, then `Content-Length` bytes of body) from `s`;
/// bytes after it stay in `buf`. `Ok(None)`: the peer closed before a new message.
fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<Head>> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let start = lines.next().unwrap_or_default().to_owned();
    let (mut length, mut close) = (0usize, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = value.parse().map_err(|_| std::io::Error::other("bad Content-Length"))?;
        } else if name == "connection" {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..head_end + length);
    Ok(Some(Head { start, close }))
}

/// Serves requests on one connection until the client closes it or asks to.
fn serve_connection(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let landing = format!("{METHOD} {PATH} ");
    let mut buf = Vec::with_capacity(4096);
    while let Ok(Some(req)) = read_message(&mut s, &mut buf) {
        if s.write_all(response(req.start.starts_with(&landing), req.close)).is_err() || req.close {
            break;
        }
    }
}

/// One request/response on `s`; `Ok(true)` for a 200.
fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<bool> {
    s.write_all(req)?;
    match read_message(s, buf)? {
        Some(resp) => Ok(resp.start.starts_with("HTTP/1.1 200 ")),
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

// === workers ===

/// HTTP servers: keep-alive on [`KEEPALIVE_PORT`], one request per connection on
/// [`NEWCONN_PORT`].
fn server_worker() {
    serve((KEEPALIVE_PORT, serve_connection), (NEWCONN_PORT, NEWCONN_THREADS, serve_connection));
}

/// The load generator: `keepalive|newconn ADDR N MS` → `done elapsed_ns errors`;
/// `once ADDR METHOD PATH` (a fresh connection, one request) → `answered` or `no answer`.
fn client_worker() {
    common::client(&[("keepalive", keepalive_load), ("newconn", newconn_load)], |words| {
        let ["once", dst, method, path] = words[..] else { return None };
        let dst: SocketAddr = dst.parse().expect("address");
        let answered = TcpStream::connect_timeout(&dst, IO_TIMEOUT).and_then(|mut s| {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            exchange(&mut s, &request(method, path, true), &mut Vec::new())
        });
        Some(if answered.is_ok() { "answered" } else { "no answer" }.to_owned())
    });
}

/// `conns` persistent connections, each sending the landing request and reading the
/// answer (a 200) in a loop for `dur`.
fn keepalive_load(dst: SocketAddr, conns: usize, dur: Duration) -> Load {
    let req = request(METHOD, PATH, false);
    persistent_load(dst, conns, dur, |s, buf| landed(exchange(s, &req, buf)))
}

/// `threads` loops of connect, one landing request with `Connection: close`, the
/// answer (a 200), close, for `dur`.
fn newconn_load(dst: SocketAddr, threads: usize, dur: Duration) -> Load {
    let req = request(METHOD, PATH, true);
    connect_load(dst, threads, dur, |s, buf| {
        s.set_nodelay(true)?;
        landed(exchange(s, &req, buf))
    })
}

/// An exchange's outcome as a load counts it: anything but a 200 is an error.
fn landed(answer: std::io::Result<bool>) -> std::io::Result<()> {
    match answer? {
        true => Ok(()),
        false => Err(std::io::Error::other("the landing request was not answered 200")),
    }
}

// === report ===

#[derive(Debug, Default)]
struct Samples {
    keepalive: Vec<f64>,
    newconn: Vec<f64>,
    errors: u64,
    /// Requests completed (both loads), and connections opened.
    requests: u64,
    connections: u64,
    judged: Judged,
}

type ProfileRows = Vec<ProfileRow>;

fn report(
    results: &BTreeMap<Filter, Samples>,
    profiles: &[(Filter, ProfileRows)],
    check: &Check,
    machine: &str,
) -> String {
    let base = &results[&Filter::None];
    let (base_ka, base_nc) = (median(&base.keepalive), median(&base.newconn));
    let mut md = String::new();
    md.push_str("Command: `cargo bench -p bulkhead-enforcer --bench http` (root).\n");
    md.push_str(&format!("{machine}\n\n"));
    md.push_str(&format!(
        "The harness of \"Enforcer datapath\" (two network namespaces over a veth bridge, client and server \
         processes in their own cgroups, both pinned to CPU {}, both managed in enforce mode with ingress and \
         egress covered, cgroup_skb), with real HTTP/1.1: `{METHOD} {PATH} HTTP/1.1` with five headers and a \
         {}-byte JSON body in one segment ({} bytes), answered `200 OK` with an 8-byte body. Keep-alive: \
         {KEEPALIVE_CONNS} persistent connections, one request in flight each (requests/s). New connection: \
         {NEWCONN_THREADS} threads doing connect, one request with `Connection: close`, response, close \
         (requests/s = connections/s). {CYCLES} rounds of {:.0} s per configuration and load, configurations \
         interleaved round-robin; median (min–max); ratios are medians over the no-filter median. L4: the \
         server's ingress entries allow the client on the ports. L7: the same entries carry HTTP rules, so each \
         request line arriving at the server is judged in the kernel (method and path looked up in \
         `HTTP_RULES_V1`); the large set holds {MANY_HTTP_RULES} rules (GET/POST/PUT/DELETE, half exact paths, half \
         prefixes, half of them sharing `{PATH}` or `/v1/request-` with the request).\n\n",
        bench_cpu(),
        BODY.len(),
        request(METHOD, PATH, false).len(),
        ROUND.as_secs_f64()
    ));
    md.push_str("| configuration | keep-alive req/s | vs none | new-connection req/s | vs none | errors |\n");
    md.push_str("|---|---|---|---|---|---|\n");
    for (f, s) in results {
        let (ka_lo, ka_hi) = range(&s.keepalive);
        let (nc_lo, nc_hi) = range(&s.newconn);
        md.push_str(&format!(
            "| {} | {:.0} ({:.0}–{:.0}) | {:.2}× | {:.0} ({:.0}–{:.0}) | {:.2}× | {} |\n",
            f.describe(),
            median(&s.keepalive),
            ka_lo,
            ka_hi,
            median(&s.keepalive) / base_ka,
            median(&s.newconn),
            nc_lo,
            nc_hi,
            median(&s.newconn) / base_nc,
            s.errors
        ));
    }

    let counted: Vec<String> = results
        .iter()
        .filter(|(f, _)| **f != Filter::None)
        .map(|(f, s)| {
            format!("{}: {} requests on {} connections — {}", f.label(), s.requests, s.connections, s.judged.describe())
        })
        .collect();
    md.push_str(&format!(
        "\nKernel counters during the timed rounds (the server's entries count a hit per new connection; an L7 \
         connection is never cached on its socket, so every server-side packet of it is a conntrack hit and \
         every request line arriving on it is judged): {}.\n",
        counted.join("; ")
    ));
    let monitor: Vec<String> = check
        .monitor
        .iter()
        .map(|(kind, done, audited, errors)| format!("{kind}: {done} requests, {audited} audited, {errors} errors"))
        .collect();
    md.push_str(&format!(
        "Check that each request is judged: with the server in monitor mode and a rule set the request is not \
         in (`GET /status/` prefix), every request must be audited exactly once — {}; in enforce mode with the \
         exact rule, `{METHOD} {PATH}` on a fresh connection was {}, `{DENIED_METHOD} {DENIED_PATH}` was {} \
         ({} segments dropped, counting retransmissions) — **{}**.\n",
        monitor.join("; "),
        if check.allowed_answered { "answered" } else { "NOT answered" },
        if check.denied_answered { "ANSWERED" } else { "dropped" },
        check.denied_counted,
        if check.passed() { "passed" } else { "FAILED" }
    ));

    md.push_str(
        "\nWhere the time goes: one more round per configuration and load with BPF run-time statistics on \
         (`BPF_ENABLE_STATS`, this phase only; it adds two clock reads per run), for the two cgroup_skb programs: \
         `enforce_ingress` runs for what the client and the server receive, `enforce_egress` for what they send. \
         In ns of program time per request; the last column is L7 minus L4 for the same load:\n\n",
    );
    md.push_str(
        "| configuration | load | req/s | program runs per request | ns per run | per request: both programs | \
         ingress | egress | L7 − L4 per request (ingress / egress) |\n",
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let l4 = profiles.iter().find(|(f, _)| *f == Filter::L4).map(|(_, rows)| rows);
    for (f, rows) in profiles {
        for row in rows {
            let (all, ing, eg) = row.per_transaction();
            let delta = match (f, l4.and_then(|l4| l4.iter().find(|r| r.kind == row.kind))) {
                (Filter::L7(_), Some(base)) => {
                    let (b_all, b_ing, b_eg) = base.per_transaction();
                    format!("{:+.0} ({:+.0} / {:+.0})", all - b_all, ing - b_ing, eg - b_eg)
                }
                _ => "–".to_owned(),
            };
            md.push_str(&format!(
                "| {} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {delta} |\n",
                f.label(),
                if row.kind == "keepalive" { "keep-alive" } else { "new connection" },
                row.load.rate(),
                row.runs() as f64 / row.transactions(),
                row.ns_per_run(),
                all,
                ing,
                eg,
            ));
        }
    }
    md.push_str(&analysis(results, profiles, base_ka, base_nc));
    md
}

/// What the numbers say.
fn analysis(
    results: &BTreeMap<Filter, Samples>,
    profiles: &[(Filter, ProfileRows)],
    base_ka: f64,
    base_nc: f64,
) -> String {
    let ratio = |f: Filter| {
        results.get(&f).map_or((f64::NAN, f64::NAN), |s| (median(&s.keepalive) / base_ka, median(&s.newconn) / base_nc))
    };
    // Program ns per request (both, ingress, egress).
    let ns = |f: Filter, kind: &str| {
        profiles
            .iter()
            .filter(|(p, _)| *p == f)
            .flat_map(|(_, rows)| rows.iter())
            .find(|r| r.kind == kind)
            .map_or((f64::NAN, f64::NAN, f64::NAN), ProfileRow::per_transaction)
    };
    let (l4_ka, l4_nc) = ratio(Filter::L4);
    let (l7_ka, l7_nc) = ratio(Filter::L7(1));
    let (many_ka, many_nc) = ratio(Filter::L7(MANY_HTTP_RULES));
    let (l4, l7, many) =
        (ns(Filter::L4, "keepalive"), ns(Filter::L7(1), "keepalive"), ns(Filter::L7(MANY_HTTP_RULES), "keepalive"));
    let (d_all, d_in, d_out) = (l7.0 - l4.0, l7.1 - l4.1, l7.2 - l4.2);
    let d_nc = ns(Filter::L7(1), "newconn").0 - ns(Filter::L4, "newconn").0;
    let d_many = many.0 - l7.0;
    // Both workers share one CPU: 1 / rate is the whole CPU time of one request.
    let request_ns = 1e9 / base_ka;
    format!(
        "\n**Reading.** Judging every request line in the kernel costs {d_all:.0} ns of program time per \
         keep-alive request over L4 ({:.1} % of the {:.1} µs of CPU one request takes on the pinned core with no \
         filter), and {d_nc:.0} ns per new-connection request, where the connection's own set-up dominates. The \
         split by program says where: an L7 connection is kept out of the socket fast path, so the server's \
         packets of it take the conntrack path in both directions — the response (egress) costs {d_out:+.0} ns \
         for that alone — while the request (ingress) costs {d_in:+.0} ns: the conntrack path plus the check \
         itself (the method and up to 130 path bytes read from the segment and copied into a 152-byte trie key, \
         one LPM lookup; a second, \"any method\", only when the first misses) — about {:.0} ns for the check if \
         the conntrack path costs the same in both directions (not split further here). {MANY_HTTP_RULES} HTTP \
         rules instead of one change the program time per keep-alive request by {d_many:+.0} ns: the lookup \
         walks the trie's nodes along the key, not the rules. Measured rates (medians of interleaved rounds on a shared machine; a few percent is within their \
         spread): keep-alive L4 {l4_ka:.2}×, L7 {l7_ka:.2}×, L7 with {MANY_HTTP_RULES} rules {many_ka:.2}× of no \
         filter; new connections L4 {l4_nc:.2}×, L7 {l7_nc:.2}×, {MANY_HTTP_RULES} rules {many_nc:.2}×.\n",
        100.0 * d_all / request_ns,
        request_ns / 1000.0,
        d_in - d_out,
    )
}
