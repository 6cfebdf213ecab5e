//! Root tests of the collector's kernel datapath: the real eBPF object, loaded
//! into this kernel, observing real packets between network namespaces these
//! tests create (`ip netns` + a veth pair per test, unique names, removed on drop
//! even when a test panics). No traffic ever leaves those namespaces.
//!
//! Run: `cargo test -p bulkhead-collector --test datapath` as root. Without root
//! every test fails loudly — a privileged test never passes by skipping.
//!
//! Each test loads its own `Datapath` with a filter naming only its own
//! namespaces, so tests running in parallel (the tracepoint and the root
//! cgroup_skb programs are node-global) never see each other's traffic.

use bulkhead_testkit::dns::Answers;
use bulkhead_testkit::error_chain;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bulkhead_collector::aggregate::Aggregator;
use bulkhead_collector::datapath::{Datapath, DatapathOptions, NetnsFilter};
use bulkhead_collector::endpoints;
use bulkhead_collector::event::{HttpMethod, HttpRequest, SockEvent, SockEventKind};
use bulkhead_collector::seed;
use bulkhead_model::{Direction, DnsAnswer, Protocol};

const WAIT: Duration = Duration::from_secs(15);

// === fixtures ===

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the datapath tests load eBPF programs and create network namespaces: run them as root"
    );
}

static NEXT_PAIR: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces joined by a veth pair, with IPv4 and IPv6 addresses.
/// Dropping it deletes both namespaces (and with them the veth pair).
struct NetnsPair {
    a: String,
    b: String,
    ino_a: u64,
    ino_b: u64,
    veth_a: String,
    v4_a: Ipv4Addr,
    v4_b: Ipv4Addr,
    v6_a: Ipv6Addr,
    v6_b: Ipv6Addr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip(8)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NetnsPair {
    fn new() -> Self {
        let n = NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
        assert!(n < 250, "too many pairs for the address plan");
        // ≤ 15 characters for interface names: "bv" + ≤ 5 pid digits + ≤ 3 + "a".
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let mut pair = NetnsPair {
            a: format!("bhdp-{id}-a"),
            b: format!("bhdp-{id}-b"),
            ino_a: 0,
            ino_b: 0,
            veth_a: format!("bv{id}a"),
            v4_a: Ipv4Addr::new(10, 201, n as u8, 1),
            v4_b: Ipv4Addr::new(10, 201, n as u8, 2),
            v6_a: format!("fd00:bd:{n:x}::1").parse().expect("v6"),
            v6_b: format!("fd00:bd:{n:x}::2").parse().expect("v6"),
        };
        let veth_b = format!("bv{id}b");
        // From here on Drop cleans up whatever was created, also on panic.
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        ip(&["link", "add", &pair.veth_a, "netns", &pair.a, "type", "veth", "peer", "name", &veth_b, "netns", &pair.b]);
        for (ns, dev, v4, v6) in
            [(&pair.a, &pair.veth_a, pair.v4_a, pair.v6_a), (&pair.b, &veth_b, pair.v4_b, pair.v6_b)]
        {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            // nodad: the address is usable at once instead of after duplicate detection.
            ip(&["-n", ns, "-6", "addr", "add", &format!("{v6}/64"), "dev", dev, "nodad"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair.ino_a = netns_ino(&pair.a);
        pair.ino_b = netns_ino(&pair.b);
        pair
    }

    fn inos(&self) -> BTreeSet<u64> {
        BTreeSet::from([self.ino_a, self.ino_b])
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            // Best effort: a namespace that was never created fails quietly.
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

fn netns_ino(name: &str) -> u64 {
    std::fs::metadata(netns_path(name)).expect("netns file").ino()
}

/// Runs `f` on a new thread named `thread` (its comm) inside network namespace
/// `ns`. Sockets created there stay in that namespace wherever they are used.
fn in_ns<T: Send + 'static>(ns: &str, thread: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(netns_path(ns)).expect("open netns");
    let handle = std::thread::Builder::new()
        .name(thread.to_owned())
        .spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .expect("spawn");
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A child process killed and reaped on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Mount point of the cgroup v2 hierarchy's root.
fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mountinfo
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mut f = pre.split_whitespace();
            let root = f.nth(3)?;
            let point = f.next()?;
            (post.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(point))
        })
        .expect("a cgroup2 mount")
}

/// The cgroup v2 id of this test process: inode of its cgroup directory.
fn own_cgroup_id() -> u64 {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").expect("cgroup");
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2 line").trim().to_owned();
    std::fs::metadata(cgroup2_mount().join(path.trim_start_matches('/'))).expect("own cgroup dir").ino()
}

/// A cgroup v2 directory of our own, removed on drop (after its processes exit).
struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    fn new() -> Self {
        let n = NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
        let path = cgroup2_mount().join(format!("bhdp-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).expect("create test cgroup");
        CgroupGuard { path }
    }

    fn id(&self) -> u64 {
        std::fs::metadata(&self.path).expect("cgroup dir").ino()
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.path.join("cgroup.procs"), pid.to_string()).expect("move into test cgroup");
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        // Its processes are gone by now (guards of children are declared after it).
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn own_comm() -> String {
    std::fs::read_to_string("/proc/self/comm").expect("comm").trim_end().to_owned()
}

/// A loaded datapath plus everything it has produced so far.
struct Observer {
    dp: Datapath,
    events: Vec<SockEvent>,
    dns: Vec<DnsAnswer>,
    http: Vec<HttpRequest>,
}

impl Observer {
    fn load(filter: NetnsFilter) -> Self {
        let opts = DatapathOptions { udp_sweep_interval: Duration::from_millis(50), ..Default::default() };
        let mut dp = match Datapath::load(&opts) {
            Ok(dp) => dp,
            Err(err) => panic!("Datapath::load: {}", error_chain(&err)),
        };
        dp.set_netns_filter(&filter).expect("set filter");
        // A new datapath observes every namespace until its filter is set (by design:
        // too much for a moment rather than too little). Whatever other processes on
        // the host did in that moment is not this test's traffic: drop it.
        let (mut events, mut dns, mut http) = (Vec::new(), Vec::new(), Vec::new());
        dp.drain(&mut events, &mut dns, &mut http).expect("drain");
        Observer { dp, events: Vec::new(), dns: Vec::new(), http: Vec::new() }
    }

    /// Drains every 10 ms until `pred` holds; panics with what was seen after [`WAIT`].
    fn wait_until(&mut self, what: &str, pred: impl Fn(&Observer) -> bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.dp.drain(&mut self.events, &mut self.dns, &mut self.http).expect("drain");
            if pred(self) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}\nevents:\n{}\ndns: {:#?}\nhttp: {:#?}\ncounters: {:?}",
                    self.events.iter().map(|e| format!("  {e:?}")).collect::<Vec<_>>().join("\n"),
                    self.dns,
                    self.http,
                    self.dp.counters()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn find(&self, pred: impl Fn(&SockEvent) -> bool) -> Option<&SockEvent> {
        self.events.iter().find(|e| pred(e))
    }

    /// Sum of (bytes_sent, bytes_received, packets) over Traffic events of one flow.
    fn traffic(&self, netns: u64, local: SocketAddr, remote: SocketAddr) -> (u64, u64, u64) {
        self.events
            .iter()
            .filter(|e| {
                e.kind == SockEventKind::Traffic && e.netns_ino == netns && e.local == local && e.remote == remote
            })
            .fold((0, 0, 0), |(s, r, p), e| (s + e.bytes_sent, r + e.bytes_received, p + e.packets))
    }
}

fn is(e: &SockEvent, kind: SockEventKind, netns: u64, local: SocketAddr, remote: SocketAddr) -> bool {
    e.kind == kind && e.netns_ino == netns && e.local == local && e.remote == remote
}

/// One TCP exchange: the client (thread "bh-client" in `a`) sends 1000 bytes,
/// the server in `b` answers 300, both close. Returns the client's local address.
fn tcp_exchange(pair: &NetnsPair, server: SocketAddr) -> SocketAddr {
    let listener = in_ns(&pair.b, "bh-server", move || TcpListener::bind(server).expect("bind"));
    let server_thread = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 1000];
        conn.read_exact(&mut buf).expect("read request");
        conn.write_all(&[7u8; 300]).expect("write reply");
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).expect("read to eof");
    });
    let local = in_ns(&pair.a, "bh-client", move || {
        let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
        c.write_all(&[1u8; 1000]).expect("write request");
        let mut reply = [0u8; 300];
        c.read_exact(&mut reply).expect("read reply");
        c.local_addr().expect("local addr")
    });
    server_thread.join().expect("server thread");
    local
}

/// One exchange where the client (in `a`) sends `request` and half-closes, the server
/// (in `b`) reads to the end, answers with a few bytes and closes. Returns the
/// client's local address.
fn tcp_send(pair: &NetnsPair, server: SocketAddr, request: Vec<u8>) -> SocketAddr {
    let listener = in_ns(&pair.b, "bh-server", move || TcpListener::bind(server).expect("bind"));
    let server_thread = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read request");
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").expect("write reply");
    });
    let local = in_ns(&pair.a, "bh-client", move || {
        let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
        c.write_all(&request).expect("write request");
        c.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).expect("read reply");
        c.local_addr().expect("local addr")
    });
    server_thread.join().expect("server thread");
    local
}

// === tests ===

#[test]
fn tcp_connect_and_accept_are_reported_v4_and_v6() {
    require_root();
    let pair = NetnsPair::new();
    let mut obs = Observer::load(NetnsFilter::Only(pair.inos()));
    let pid = std::process::id();
    let cgroup = own_cgroup_id();

    for server in [SocketAddr::new(pair.v4_b.into(), 8080), SocketAddr::new(pair.v6_b.into(), 8080)] {
        let client = tcp_exchange(&pair, server);
        let (a, b) = (pair.ino_a, pair.ino_b);
        obs.wait_until(&format!("connect, accept and both closes of {client} → {server}"), |o| {
            o.find(|e| is(e, SockEventKind::Connect, a, client, server)).is_some()
                && o.find(|e| is(e, SockEventKind::Established, a, client, server)).is_some()
                && o.find(|e| is(e, SockEventKind::Accept, b, server, client)).is_some()
                && o.find(|e| is(e, SockEventKind::Close, a, client, server)).is_some()
                && o.find(|e| is(e, SockEventKind::Close, b, server, client)).is_some()
        });

        let connect = obs.find(|e| is(e, SockEventKind::Connect, a, client, server)).expect("connect");
        assert_eq!(connect.protocol, Protocol::Tcp);
        assert_eq!(connect.pid, pid, "connect carries the client's tgid");
        assert_eq!(connect.comm, "bh-client", "connect carries the connecting thread's comm");
        assert_eq!(connect.cgroup_id, cgroup, "connect carries the client's cgroup");
        assert!(connect.unix_ms > 1_600_000_000_000, "wall-clock time, got {}", connect.unix_ms);

        let accept = obs.find(|e| is(e, SockEventKind::Accept, b, server, client)).expect("accept");
        assert_eq!((accept.pid, accept.comm.as_str()), (0, ""), "no pid/comm in softirq");
        assert_eq!(accept.cgroup_id, cgroup, "accept carries the listening socket's cgroup");

        // bytes_acked/bytes_received count the SYN and FIN too: allow 2 bytes of slack.
        let close = obs.find(|e| is(e, SockEventKind::Close, a, client, server)).expect("client close");
        assert!((1000..=1002).contains(&close.bytes_sent), "client sent {}", close.bytes_sent);
        assert!((300..=302).contains(&close.bytes_received), "client received {}", close.bytes_received);
        assert!(close.packets > 0);
        assert_eq!(close.pid, pid, "close carries the owner recorded at connect");
        let close = obs.find(|e| is(e, SockEventKind::Close, b, server, client)).expect("server close");
        assert!((300..=302).contains(&close.bytes_sent), "server sent {}", close.bytes_sent);
        assert!((1000..=1002).contains(&close.bytes_received), "server received {}", close.bytes_received);
    }
    assert!(
        obs.events.iter().all(|e| pair.inos().contains(&e.netns_ino)),
        "the Only filter admitted another namespace"
    );
    assert_eq!(obs.dp.ringbuf_dropped(), 0);
}

/// Environment variable that turns the test binary into the client process of
/// [`tcp_connect_carries_the_clients_cgroup_and_accept_the_servers`].
const HELPER_ENV: &str = "BHDP_HELPER_CONNECT";

/// Not a test: the body of the client *process* spawned by
/// `tcp_connect_carries_the_clients_cgroup_and_accept_the_servers` (a separate
/// process so it can live in its own cgroup without moving the test runner).
/// Waits for a line on stdin (sent once it has been moved into its cgroup),
/// connects, sends 10 bytes, prints its local address and exits.
#[test]
#[ignore = "helper process for another test, run by it with --ignored"]
fn helper_client_process() {
    let target: SocketAddr =
        std::env::var(HELPER_ENV).expect("run by its parent test only").parse().expect("target address");
    let mut go = String::new();
    std::io::stdin().read_line(&mut go).expect("go signal");
    let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect");
    c.write_all(&[3u8; 10]).expect("write");
    println!("BHDP_LOCAL={}", c.local_addr().expect("local"));
}

#[test]
fn tcp_connect_carries_the_clients_cgroup_and_accept_the_servers() {
    require_root();
    let pair = NetnsPair::new();
    let cgroup = CgroupGuard::new();
    let mut obs = Observer::load(NetnsFilter::Only(pair.inos()));
    let server = SocketAddr::new(pair.v4_b.into(), 8081);
    let listener = in_ns(&pair.b, "bh-server", move || TcpListener::bind(server).expect("bind"));
    let server_thread = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).expect("read to eof");
    });

    let exe = std::env::current_exe().expect("test binary");
    let mut child = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", &pair.a])
            .arg(exe)
            .args(["--exact", "helper_client_process", "--ignored", "--nocapture", "--test-threads=1"])
            .env(HELPER_ENV, server.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the client process"),
    );
    let child_pid = child.0.id();
    cgroup.add(child_pid);
    child.0.stdin.take().expect("stdin").write_all(b"go\n").expect("signal the client");
    let mut out = String::new();
    child.0.stdout.take().expect("stdout").read_to_string(&mut out).expect("client output");
    assert!(child.0.wait().expect("client exit").success(), "client process failed: {out}");
    server_thread.join().expect("server thread");
    // libtest prints its own progress around ours: find the marker anywhere.
    let client: SocketAddr = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("BHDP_LOCAL="))
        .unwrap_or_else(|| panic!("client printed no address: {out}"))
        .parse()
        .expect("client address");

    let (a, b) = (pair.ino_a, pair.ino_b);
    obs.wait_until("connect and accept", |o| {
        o.find(|e| is(e, SockEventKind::Connect, a, client, server)).is_some()
            && o.find(|e| is(e, SockEventKind::Accept, b, server, client)).is_some()
    });
    let connect = obs.find(|e| is(e, SockEventKind::Connect, a, client, server)).expect("connect");
    assert_eq!(connect.pid, child_pid, "the client process's pid");
    assert_eq!(connect.cgroup_id, cgroup.id(), "the client's own cgroup, not the runner's");
    let accept = obs.find(|e| is(e, SockEventKind::Accept, b, server, client)).expect("accept");
    assert_eq!(accept.cgroup_id, own_cgroup_id(), "the listener's (the server's) cgroup");
    assert_ne!(cgroup.id(), own_cgroup_id());
    drop(child);
}

#[test]
fn excluded_netns_is_not_reported() {
    require_root();
    let excluded = NetnsPair::new();
    let control = NetnsPair::new();
    let mut obs = Observer::load(NetnsFilter::Except(excluded.inos()));

    let round = |obs: &mut Observer, port: u16| {
        // Excluded traffic first, then the control: once the control is seen, the
        // excluded events (if any had passed the filter) would have been drained too.
        let _ = tcp_exchange(&excluded, SocketAddr::new(excluded.v4_b.into(), port));
        udp_exchange(&excluded, SocketAddr::new(excluded.v4_b.into(), port), 1, 10);
        let client = tcp_exchange(&control, SocketAddr::new(control.v4_b.into(), port));
        let (_, c_udp) = udp_exchange(&control, SocketAddr::new(control.v4_b.into(), port), 1, 10);
        let server = SocketAddr::new(control.v4_b.into(), port);
        let c = control.ino_a;
        obs.wait_until("the control namespace's TCP close and UDP traffic", |o| {
            o.find(|e| is(e, SockEventKind::Close, c, client, server)).is_some() && o.traffic(c, c_udp, server).0 > 0
        });
        let leaked: Vec<&SockEvent> = obs.events.iter().filter(|e| excluded.inos().contains(&e.netns_ino)).collect();
        assert!(leaked.is_empty(), "events from an excluded namespace: {leaked:#?}");
    };
    round(&mut obs, 9001);

    // Switching modes keeps excluding: Only(control) must not admit `excluded`.
    obs.dp.set_netns_filter(&NetnsFilter::Only(control.inos())).expect("switch filter");
    round(&mut obs, 9002);

    // And with the filter lifted, the same traffic is reported.
    obs.dp.set_netns_filter(&NetnsFilter::All).expect("lift filter");
    let server = SocketAddr::new(excluded.v4_b.into(), 9003);
    let client = tcp_exchange(&excluded, server);
    let a = excluded.ino_a;
    obs.wait_until("the formerly excluded connection", |o| {
        o.find(|e| is(e, SockEventKind::Connect, a, client, server)).is_some()
    });
}

/// The client (thread "bh-udp" in `a`) sends `count` datagrams of `size` bytes to
/// `server` in `b`; the server answers one datagram of 50 bytes. Returns
/// (client local address, the server's view of the client).
fn udp_exchange(pair: &NetnsPair, server: SocketAddr, count: usize, size: usize) -> (SocketAddr, SocketAddr) {
    let sock = in_ns(&pair.b, "bh-udp-srv", move || UdpSocket::bind(server).expect("bind udp"));
    sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let srv = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut peer = None;
        for _ in 0..count {
            let (_, from) = sock.recv_from(&mut buf).expect("server recv");
            peer = Some(from);
        }
        let peer = peer.expect("at least one datagram");
        sock.send_to(&[9u8; 50], peer).expect("server reply");
        peer
    });
    let unspecified: SocketAddr =
        if server.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
    let local = in_ns(&pair.a, "bh-udp", move || {
        let c = UdpSocket::bind(unspecified).expect("bind client");
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        c.connect(server).expect("connect udp");
        for _ in 0..count {
            c.send(&vec![1u8; size]).expect("send");
        }
        let mut buf = [0u8; 100];
        let n = c.recv(&mut buf).expect("client recv");
        assert_eq!(n, 50);
        c.local_addr().expect("local")
    });
    let peer = srv.join().expect("udp server");
    (local, peer)
}

#[test]
fn udp_flows_are_reported_with_bytes_v4_and_v6() {
    require_root();
    let pair = NetnsPair::new();
    let mut obs = Observer::load(NetnsFilter::Only(pair.inos()));
    let pid = std::process::id();
    let cgroup = own_cgroup_id();

    for server in [SocketAddr::new(pair.v4_b.into(), 5300), SocketAddr::new(pair.v6_b.into(), 5300)] {
        let (client, seen_by_server) = udp_exchange(&pair, server, 3, 100);
        // The client bound a wildcard; the flow is keyed by the address used.
        let client = SocketAddr::new(seen_by_server.ip(), client.port());
        let (a, b) = (pair.ino_a, pair.ino_b);
        obs.wait_until(&format!("UDP {client} → {server} on both sides with all bytes"), |o| {
            o.find(|e| is(e, SockEventKind::Connect, a, client, server)).is_some()
                && o.find(|e| is(e, SockEventKind::Accept, b, server, client)).is_some()
                && o.traffic(a, client, server) == (300, 50, 4)
                && o.traffic(b, server, client) == (50, 300, 4)
        });
        let connect = obs.find(|e| is(e, SockEventKind::Connect, a, client, server)).expect("connect");
        assert_eq!(connect.protocol, Protocol::Udp);
        assert_eq!((connect.pid, connect.comm.as_str()), (pid, "bh-udp"), "egress runs in the sender's context");
        assert_eq!(connect.cgroup_id, cgroup);
        assert_eq!((connect.bytes_sent, connect.bytes_received), (0, 0), "bytes come only as Traffic");
        let accept = obs.find(|e| is(e, SockEventKind::Accept, b, server, client)).expect("accept");
        assert_eq!(accept.cgroup_id, cgroup, "the receiving socket's cgroup");
    }
}

const ANSWERS: Answers = Answers {
    v4: Ipv4Addr::new(10, 99, 0, 7),
    ttl_a: 321,
    v6: Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 7),
    ttl_aaaa: 123,
};

/// A DNS responder in `b` answering with [`ANSWERS`].
fn dns_responder(pair: &NetnsPair, addr: SocketAddr, queries: usize) -> std::thread::JoinHandle<()> {
    let sock = in_ns(&pair.b, "bh-dns", move || UdpSocket::bind(addr).expect("bind :53"));
    bulkhead_testkit::dns::responder(sock, queries, ANSWERS)
}

fn dns_query(pair: &NetnsPair, server: SocketAddr, name: &'static str, qtype: simple_dns::TYPE) {
    let unspecified: SocketAddr =
        if server.is_ipv4() { "0.0.0.0:0".parse().expect("addr") } else { "[::]:0".parse().expect("addr") };
    in_ns(&pair.a, "bh-resolver", move || {
        let c = UdpSocket::bind(unspecified).expect("bind");
        assert_eq!(bulkhead_testkit::dns::query(&c, server, name, qtype), 1);
    });
}

#[test]
fn dns_answers_are_captured_v4_and_v6() {
    require_root();
    let pair = NetnsPair::new();
    let mut obs = Observer::load(NetnsFilter::Only(pair.inos()));

    let v4_server = SocketAddr::new(pair.v4_b.into(), 53);
    let responder = dns_responder(&pair, v4_server, 1);
    dns_query(&pair, v4_server, "Deathstar.Empire.test", simple_dns::TYPE::A);
    responder.join().expect("responder");

    let v6_server = SocketAddr::new(pair.v6_b.into(), 53);
    let responder = dns_responder(&pair, v6_server, 1);
    dns_query(&pair, v6_server, "tiefighter.empire.test", simple_dns::TYPE::AAAA);
    responder.join().expect("responder");

    let a = pair.ino_a;
    obs.wait_until("both DNS answers", |o| o.dns.len() >= 2);
    let want_v4 = DnsAnswer {
        netns_ino: a,
        name: "deathstar.empire.test".into(),
        addr: IpAddr::V4(Ipv4Addr::new(10, 99, 0, 7)),
        ttl_seconds: 321,
        seen_unix_ms: 0,
    };
    let want_v6 = DnsAnswer {
        netns_ino: a,
        name: "tiefighter.empire.test".into(),
        addr: "fd00:99::7".parse().expect("v6"),
        ttl_seconds: 123,
        seen_unix_ms: 0,
    };
    for want in [want_v4, want_v6] {
        let got = obs
            .dns
            .iter()
            .find(|d| d.name == want.name)
            .unwrap_or_else(|| panic!("no answer for {}: {:#?}", want.name, obs.dns));
        assert_eq!(DnsAnswer { seen_unix_ms: 0, ..got.clone() }, want);
        assert!(got.seen_unix_ms > 1_600_000_000_000);
    }
    // Only answers received by a workload count: the responder's side saw queries
    // (to port 53), which are not answers.
    assert!(obs.dns.iter().all(|d| d.netns_ino == a), "{:#?}", obs.dns);
}

#[test]
fn seed_finds_connections_that_predate_the_datapath() {
    require_root();
    let pair = NetnsPair::new();
    let mut open = Vec::new();
    let mut expected = Vec::new();
    for server in [SocketAddr::new(pair.v4_b.into(), 8443), SocketAddr::new(pair.v6_b.into(), 8443)] {
        let listener = in_ns(&pair.b, "bh-server", move || TcpListener::bind(server).expect("bind"));
        let client = in_ns(&pair.a, "bh-client", move || TcpStream::connect(server).expect("connect"));
        let (accepted, _) = listener.accept().expect("accept");
        expected.push((client.local_addr().expect("local"), server));
        open.push((listener, client, accepted));
    }

    // Loaded after the connections exist: the tracepoint never saw them.
    let _obs = Observer::load(NetnsFilter::Only(pair.inos()));

    let facts: Vec<_> =
        endpoints::scan().expect("scan").into_iter().filter(|f| pair.inos().contains(&f.netns_ino)).collect();
    assert_eq!(facts.len(), 2, "both test namespaces are scanned: {facts:#?}");
    let events = seed::seed(&facts).expect("seed");
    let (pid, comm, cgroup) = (std::process::id(), own_comm(), own_cgroup_id());
    for (client, server) in expected {
        let egress = events
            .iter()
            .find(|e| is(e, SockEventKind::SeedEgress, pair.ino_a, client, server))
            .unwrap_or_else(|| panic!("no SeedEgress {client} → {server}: {events:#?}"));
        assert_eq!((egress.pid, egress.comm.as_str(), egress.cgroup_id), (pid, comm.as_str(), cgroup));
        assert_eq!(egress.protocol, Protocol::Tcp);
        let ingress = events
            .iter()
            .find(|e| is(e, SockEventKind::SeedIngress, pair.ino_b, server, client))
            .unwrap_or_else(|| panic!("no SeedIngress {server} ← {client}: {events:#?}"));
        assert_eq!(ingress.cgroup_id, cgroup);
    }
    assert_eq!(events.len(), 4, "exactly the two connections, seen from both ends: {events:#?}");
    drop(open);
}

#[test]
fn endpoints_scan_lists_test_namespaces_with_addresses_and_cgroups() {
    require_root();
    let pair = NetnsPair::new();
    // A process living in namespace a (named netns exec: same pid as `sleep`).
    let child = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", &pair.a, "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep"),
    );
    let child_ns = PathBuf::from(format!("/proc/{}/ns/net", child.0.id()));
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(format!("/proc/{}/comm", child.0.id()))
        .map(|c| c.trim_end() != "sleep")
        .unwrap_or(true)
        || std::fs::metadata(&child_ns).map(|m| m.ino()).ok() != Some(pair.ino_a)
    {
        assert!(Instant::now() < deadline, "the child never entered {}", pair.a);
        std::thread::sleep(Duration::from_millis(10));
    }

    let facts = endpoints::scan().expect("scan");
    let host: Vec<_> = facts.iter().filter(|f| f.host).collect();
    assert_eq!(host.len(), 1, "exactly one host namespace");
    assert_eq!(host[0].netns_ino, endpoints::host_netns_ino());

    let a = facts.iter().find(|f| f.netns_ino == pair.ino_a).expect("netns a listed");
    assert_eq!(a.netns_name.as_deref(), Some(pair.a.as_str()));
    assert!(!a.host);
    let addrs: Vec<(String, IpAddr, u8)> =
        a.addresses.iter().map(|x| (x.interface.clone(), x.addr, x.prefix_len)).collect();
    assert!(addrs.contains(&(pair.veth_a.clone(), pair.v4_a.into(), 24)), "{addrs:?}");
    assert!(addrs.contains(&(pair.veth_a.clone(), pair.v6_a.into(), 64)), "{addrs:?}");
    assert!(addrs.iter().all(|(_, ip, _)| !ip.is_loopback()), "loopback is left out: {addrs:?}");
    let sleeper = a.cgroups.iter().find(|c| c.comms.iter().any(|comm| comm == "sleep")).expect("the sleeper's cgroup");
    assert_eq!(sleeper.cgroup_id, own_cgroup_id(), "the child inherited our cgroup");
    assert!(sleeper.path.starts_with('/'));

    let b = facts.iter().find(|f| f.netns_ino == pair.ino_b).expect("netns b listed");
    assert!(b.addresses.iter().any(|x| x.addr == IpAddr::V4(pair.v4_b)));
    assert!(b.cgroups.is_empty(), "no process lives in b: {:?}", b.cgroups);
    drop(child);
}

#[test]
fn http_request_lines_are_captured_and_other_payloads_are_opaque() {
    require_root();
    let pair = NetnsPair::new();
    let mut obs = Observer::load(NetnsFilter::Only(pair.inos()));
    let b = pair.ino_b;
    let http_v4 = SocketAddr::new(pair.v4_b.into(), 80);
    let http_v6 = SocketAddr::new(pair.v6_b.into(), 80);
    let tls = SocketAddr::new(pair.v4_b.into(), 443);
    let bad_version = SocketAddr::new(pair.v4_b.into(), 8080);
    let silent = SocketAddr::new(pair.v4_b.into(), 8081);

    let landing = b"POST /v1/request-landing HTTP/1.1\r\nHost: deathstar\r\nContent-Length: 2\r\n\r\nok".to_vec();
    let c4 = tcp_send(&pair, http_v4, landing);
    let c6 = tcp_send(&pair, http_v6, b"GET /v1/ships?class=tie HTTP/1.1\r\nHost: deathstar\r\n\r\n".to_vec());
    // A TLS ClientHello: record type 0x16, version 3.1.
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    hello.resize(517, 0xab);
    let ct = tcp_send(&pair, tls, hello);
    let cb = tcp_send(&pair, bad_version, b"GET /x HTTP/9.9\r\n\r\n".to_vec());
    let cs = tcp_send(&pair, silent, Vec::new());

    let closes = [(http_v4, c4), (http_v6, c6), (tls, ct), (bad_version, cb), (silent, cs)];
    obs.wait_until("both requests and every server-side close", |o| {
        o.http.len() >= 2 && closes.iter().all(|(s, c)| o.find(|e| is(e, SockEventKind::Close, b, *s, *c)).is_some())
    });

    let r = obs.http.iter().find(|r| r.remote == c4).expect("the v4 request");
    assert_eq!((r.method, &*r.path, r.local, r.netns_ino), (HttpMethod::Post, "/v1/request-landing", http_v4, b));
    assert_eq!(r.cgroup_id, own_cgroup_id(), "the receiving socket's cgroup");
    assert!(r.unix_ms > 1_600_000_000_000, "wall-clock time, got {}", r.unix_ms);
    let r = obs.http.iter().find(|r| r.remote == c6).expect("the v6 request");
    assert_eq!((r.method, &*r.path, r.local), (HttpMethod::Get, "/v1/ships", http_v6), "no query string");
    assert_eq!(obs.http.len(), 2, "neither the TLS hello, the bad version nor the silent connection is a request");
    let counters = obs.dp.counters();
    assert_eq!((counters.http_requests, counters.http_unparsed), (2, 1), "{counters:?}");
    assert_eq!(obs.dp.ringbuf_dropped(), 0);

    // Through the aggregator as the agent feeds it (requests first): the server's
    // flows carry the requests, and the connections with payload but no request line
    // are opaque. The silent one received a FIN only: not opaque.
    let mut agg = Aggregator::new(Default::default());
    for r in &obs.http {
        agg.record_http(r);
    }
    for e in &obs.events {
        agg.record(e);
    }
    let flows = agg.flush();
    let server_flow = |at: SocketAddr| {
        flows
            .iter()
            .find(|f| {
                f.direction == Direction::Ingress
                    && f.netns_ino == b
                    && f.dst_addr == at.ip()
                    && f.dst_port == at.port()
            })
            .unwrap_or_else(|| panic!("no ingress flow to {at}: {flows:#?}"))
    };
    let f = server_flow(http_v4);
    let got: Vec<_> = f.http.requests.iter().map(|r| (r.method.as_str(), r.path.as_str(), r.requests)).collect();
    assert_eq!(got, vec![("POST", "/v1/request-landing", 1)]);
    assert_eq!((f.connections, f.http.opaque_connections), (1, 0));
    assert_eq!(server_flow(http_v6).http.requests[0].path, "/v1/ships");
    for at in [tls, bad_version] {
        let f = server_flow(at);
        assert!(f.http.requests.is_empty(), "{f:?}");
        assert_eq!((f.connections, f.http.opaque_connections), (1, 1), "{at}: {f:?}");
    }
    let f = server_flow(silent);
    assert_eq!((f.connections, f.http.opaque_connections), (1, 0), "{f:?}");
    // The clients' egress flows never carry HTTP data.
    assert!(flows.iter().filter(|f| f.direction == Direction::Egress).all(|f| f.http.is_empty()));
}
