//! Network namespace fixtures: [`Netns`] (one named namespace) and [`TestNet`] (N
//! "hosts" on a private Linux bridge, each with IPv4 and IPv6 addresses).
//!
//! Everything here is created with iproute2 (`ip netns add`, `ip -n NAME …`) and removed
//! on drop, including when the test panics. Nothing is changed in the initial network
//! namespace except adding and removing the fixtures' own namespaces. Names carry
//! [`unique_suffix`], so tests may run in parallel and in several processes at once.
//!
//! These fixtures need root: call [`require_root`] (the constructors do) so a privileged
//! test run without it fails loudly instead of passing silently.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// Prefix of every namespace, interface and cgroup name the testkit creates.
pub const NAME_PREFIX: &str = "bh";

/// Panics with a clear message unless the process runs as root (uid 0).
///
/// Privileged tests call this first: without root they must fail, never skip.
pub fn require_root() {
    let euid = nix::unistd::geteuid();
    assert!(
        euid.is_root(),
        "this test needs root (network namespaces, cgroups, eBPF) but runs as uid {euid}; \
         run it as root, e.g. via `cargo xtask test` — privileged tests fail rather than skip"
    );
}

/// A short name fragment that is unique per process and call: `[0-9a-z]{8,}`.
///
/// Layout: the pid in 5 base-36 digits (Linux pids are < 2^22 < 36^5), a base-36 call
/// counter, and 2 random base-36 digits that tell apart leftovers from an earlier
/// process that had the same pid. Typically 8 characters, so `bh<suffix>xx` still fits
/// the 15-character interface name limit. The pid comes first so that tooling (`cargo
/// xtask test`) can recognise fixtures whose process is gone; see [`suffix_pid`].
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let pid = u64::from(std::process::id());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = u64::from(uuid::Uuid::new_v4().as_u128() as u16) % (36 * 36);
    format!("{}{}{}", base36(pid, 5), base36(count, 1), base36(random, 2))
}

/// The pid encoded in a [`unique_suffix`], if `suffix` looks like one.
pub fn suffix_pid(suffix: &str) -> Option<u32> {
    if suffix.len() < 8 || !suffix.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        return None;
    }
    u32::from_str_radix(&suffix[..5], 36).ok()
}

/// `n` in base 36 (lowercase), left-padded with zeros to at least `width` digits.
fn base36(mut n: u64, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    while out.len() < width {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

/// Runs `ip ARGS…` and panics with the command and its stderr when it fails.
pub(crate) fn ip(args: &[&str]) -> String {
    run_checked(Command::new("ip").args(args))
}

/// Runs a command to completion and panics (with the command line and stderr) unless it
/// exits with status 0. Returns stdout.
pub(crate) fn run_checked(cmd: &mut Command) -> String {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("failed to start {}: {e} (is iproute2 installed? `cargo xtask setup`)", show(cmd)));
    assert!(
        output.status.success(),
        "{} failed with {}:\n{}",
        show(cmd),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim_end()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A command line for messages.
fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    format!("`{s}`")
}

// === impl Netns ===

/// A named network namespace (`ip netns add bh-<prefix>-<suffix>`), deleted on drop.
///
/// Code runs inside it with [`Netns::run`] (a fresh thread, so the caller's thread never
/// switches namespace), [`Netns::exec`] (`ip netns exec`) or [`Netns::spawn`].
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates `bh-<prefix>-<suffix>` with a fresh [`unique_suffix`]; its loopback stays
    /// down until you bring it up (see [`Netns::set_loopback_up`]).
    ///
    /// Panics without root or when `ip netns add` fails.
    pub fn new(prefix: &str) -> Netns {
        Netns::create(&format!("{NAME_PREFIX}-{prefix}-{}", unique_suffix()))
    }

    /// Creates a namespace with exactly this name. The caller guarantees uniqueness.
    pub(crate) fn create(name: &str) -> Netns {
        require_root();
        assert!(
            !name.is_empty() && name.len() <= 200 && !name.contains('/') && name != "." && name != "..",
            "invalid network namespace name {name:?}"
        );
        ip(&["netns", "add", name]);
        Netns { name: name.to_owned(), path: Path::new(NETNS_RUN_DIR).join(name) }
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted nsfs file: `/var/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode number (what `/proc/PID/ns/net` links to, and what eBPF
    /// programs see as the netns cookie's inode).
    pub fn ino(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display())).ino()
    }

    /// Brings `lo` up.
    pub fn set_loopback_up(&self) {
        ip(&["-n", &self.name, "link", "set", "lo", "up"]);
    }

    /// Runs `f` on a new thread that has `setns(2)`'d into this namespace and returns its
    /// result; a panic in `f` is resumed on the caller's thread. The caller's thread never
    /// changes namespace.
    ///
    /// Sockets created inside `f` belong to this namespace and keep working after `f`
    /// returns. Threads and processes started from inside `f` (e.g. a tokio runtime built
    /// there, or `Command::spawn`) inherit the namespace.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(&self.path).unwrap_or_else(|e| panic!("open {}: {e}", self.path.display()));
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, move || {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns into {}: {e}", self.path.display()));
                    drop(file);
                    f()
                })
                .expect("spawning a thread for Netns::run");
            match handle.join() {
                Ok(r) => r,
                Err(payload) => std::panic::resume_unwind(payload),
            }
        })
    }

    /// Runs `ip netns exec NAME ARGS…` to completion and returns its output (whatever its
    /// exit status; see [`Netns::exec_ok`]). Panics only if `ip` cannot be started.
    ///
    /// Note: `ip netns exec` remounts `/sys` for the command, so bpffs is not visible
    /// inside; use [`Netns::spawn`] for programs that need `/sys/fs/bpf`.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args).stdin(Stdio::null());
        cmd.output().unwrap_or_else(|e| panic!("failed to start {}: {e}", show(&cmd)))
    }

    /// Like [`Netns::exec`] but panics (with stderr) unless the command succeeds; returns
    /// stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        run_checked(Command::new("ip").args(["netns", "exec", &self.name]).args(args))
    }

    /// Spawns `cmd` inside this namespace and returns a guard that kills and reaps it on
    /// drop.
    ///
    /// The child is forked from a thread that has `setns`'d into the namespace (see
    /// [`Netns::run`]), so unlike `ip netns exec` it keeps the host's `/sys` mounts
    /// (bpffs stays visible) and everything set on `cmd` (env, cwd, stdio) applies.
    pub fn spawn(&self, cmd: &mut Command) -> ChildGuard {
        let shown = show(cmd);
        let child = self.run(|| cmd.spawn()).unwrap_or_else(|e| panic!("spawn {shown} in {}: {e}", self.name));
        ChildGuard::new(child)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panic here: this often runs while a failing test unwinds.
        match Command::new("ip").args(["netns", "del", &self.name]).stdin(Stdio::null()).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "testkit: `ip netns del {}` failed with {}: {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            ),
            Err(e) => eprintln!("testkit: cannot run `ip netns del {}`: {e}", self.name),
        }
    }
}

// === impl ChildGuard ===

/// A child process that is killed (SIGKILL) and reaped when the guard is dropped.
///
/// Derefs to [`Child`], so `stdin`, `stdout`, `id()`, `try_wait()` … are at hand.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Wraps an already spawned child.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// Gives up the guard: the child is no longer killed on drop.
    pub fn into_inner(mut self) -> Child {
        self.child.take().expect("ChildGuard holds a child until dropped")
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        self.child.as_ref().expect("ChildGuard holds a child until dropped")
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("ChildGuard holds a child until dropped")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it has already exited (and maybe been reaped): nothing to do.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// === impl TestNet ===

/// IPv4 subnet of every [`TestNet`]: host `i` (0-based) gets `10.201.0.(i+1)/24`.
pub const TESTNET_IPV4_PREFIX: [u8; 3] = [10, 201, 0];
/// IPv6 ULA prefix of every [`TestNet`]: host `i` gets `fd00:b1::(i+1)/64`.
pub const TESTNET_IPV6_PREFIX: [u16; 2] = [0xfd00, 0xb1];
/// The interface name of each host's link to the switch, inside the host's namespace.
pub const TESTNET_IFNAME: &str = "eth0";
/// The bridge's name inside the switch namespace.
pub const TESTNET_BRIDGE: &str = "br0";

/// How long [`TestNet::new`] waits for links to come up before panicking.
const TESTNET_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// N test "hosts" on one L2 segment, each in its own network namespace.
///
/// A private switch namespace (`bh-sw-<suffix>`) holds a Linux bridge `br0`; host `i`
/// lives in `bh-h<i>-<suffix>` with `lo` up and `eth0` (a veth whose peer `p<i>` is a
/// bridge port), addressed `10.201.0.(i+1)/24` and `fd00:b1::(i+1)/64` (DAD disabled,
/// so addresses are usable at once). Every TestNet uses the same addresses: they are
/// private to its namespaces, so parallel TestNets never see each other.
///
/// Dropping it deletes the namespaces, which deletes the veths and the bridge.
#[derive(Debug)]
pub struct TestNet {
    // Hosts first: fields drop in declaration order.
    hosts: Vec<TestHost>,
    switch: Netns,
}

/// One host of a [`TestNet`].
#[derive(Debug)]
pub struct TestHost {
    /// The host's namespace; run code there with [`Netns::run`].
    pub netns: Netns,
    /// Its address on the test subnet (`10.201.0.0/24`).
    pub ipv4: Ipv4Addr,
    /// Its address on the test ULA subnet (`fd00:b1::/64`).
    pub ipv6: Ipv6Addr,
    /// The host's interface on the segment (always [`TESTNET_IFNAME`]).
    pub ifname: &'static str,
    /// The bridge port (in the switch namespace) the host is plugged into: `p<i>`.
    pub bridge_port: String,
}

impl TestNet {
    /// Builds `n` hosts (1 ≤ n ≤ 250) and waits until their links are up and addresses
    /// usable. Panics (with the failing `ip` command's stderr) on any error, cleaning up
    /// whatever it already created.
    pub fn new(n: usize) -> TestNet {
        require_root();
        assert!((1..=250).contains(&n), "TestNet::new({n}): need between 1 and 250 hosts");
        let suffix = unique_suffix();
        let switch = Netns::create(&format!("{NAME_PREFIX}-sw-{suffix}"));
        let sw = switch.name().to_owned();
        switch.set_loopback_up();
        // No STP (ports forward at once) and no multicast snooping (IPv6 neighbour
        // discovery is plain flooding, no MLD querier needed).
        ip(&["-n", &sw, "link", "add", TESTNET_BRIDGE, "type", "bridge", "stp_state", "0", "mcast_snooping", "0"]);
        ip(&["-n", &sw, "link", "set", TESTNET_BRIDGE, "up"]);

        let mut net = TestNet { hosts: Vec::with_capacity(n), switch };
        for i in 0..n {
            let netns = Netns::create(&format!("{NAME_PREFIX}-h{i}-{suffix}"));
            let num = u8::try_from(i + 1).expect("at most 250 hosts");
            let [a, b, c] = TESTNET_IPV4_PREFIX;
            let [p0, p1] = TESTNET_IPV6_PREFIX;
            let host = TestHost {
                ipv4: Ipv4Addr::new(a, b, c, num),
                ipv6: Ipv6Addr::new(p0, p1, 0, 0, 0, 0, 0, u16::from(num)),
                ifname: TESTNET_IFNAME,
                bridge_port: format!("p{i}"),
                netns,
            };
            // Pushed before configuring so that a panic below still cleans it up.
            net.hosts.push(host);
            let host = net.hosts.last().expect("just pushed");
            let h = host.netns.name();
            ip(&["-n", &sw, "link", "add", &host.bridge_port, "type", "veth", "peer", "name", host.ifname, "netns", h]);
            ip(&["-n", &sw, "link", "set", &host.bridge_port, "master", TESTNET_BRIDGE, "up"]);
            // DAD off before the link comes up, so the link-local address is not
            // tentative either.
            host.netns.run(|| {
                for path in [
                    format!("/proc/sys/net/ipv6/conf/{}/accept_dad", host.ifname),
                    format!("/proc/sys/net/ipv6/conf/{}/dad_transmits", host.ifname),
                ] {
                    std::fs::write(&path, "0").unwrap_or_else(|e| panic!("write 0 to {path} in {h}: {e}"));
                }
            });
            host.netns.set_loopback_up();
            ip(&["-n", h, "link", "set", host.ifname, "up"]);
            ip(&["-n", h, "addr", "add", &format!("{}/24", host.ipv4), "dev", host.ifname]);
            ip(&["-n", h, "addr", "add", &format!("{}/64", host.ipv6), "dev", host.ifname, "nodad"]);
        }
        net.wait_ready();
        net
    }

    /// The hosts, in address order (`hosts()[0]` is `.1`).
    pub fn hosts(&self) -> &[TestHost] {
        &self.hosts
    }

    /// The switch namespace holding the bridge (for captures or tc on the ports).
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Polls until every host link is up, every bridge port forwards and no address is
    /// tentative.
    fn wait_ready(&self) {
        let start = Instant::now();
        let mut delay = Duration::from_millis(1);
        loop {
            let pending = self.not_ready();
            let Some(what) = pending else { return };
            if start.elapsed() >= TESTNET_READY_TIMEOUT {
                panic!("TestNet not ready after {:?}: {what}", start.elapsed());
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(20));
        }
    }

    /// What is not ready yet, if anything.
    fn not_ready(&self) -> Option<String> {
        let sw = self.switch.name();
        for host in &self.hosts {
            let h = host.netns.name();
            let link = ip(&["-n", h, "-o", "link", "show", "dev", host.ifname]);
            if !link.contains("state UP") || !link.contains("LOWER_UP") {
                return Some(format!("{h}: {}", link.trim()));
            }
            let port = ip(&["-n", sw, "-d", "-o", "link", "show", "dev", &host.bridge_port]);
            if !port.contains("state forwarding") {
                return Some(format!("{sw}: port {} not forwarding", host.bridge_port));
            }
            let addrs = ip(&["-n", h, "-o", "addr", "show", "dev", host.ifname]);
            let v4 = format!("inet {}/24", host.ipv4);
            let v6 = format!("inet6 {}/64", host.ipv6);
            if !addrs.contains(&v4) || !addrs.contains(&v6) || addrs.contains("tentative") {
                return Some(format!("{h}: addresses not usable yet: {}", addrs.trim()));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};

    use super::*;

    #[test]
    fn suffixes_are_short_unique_and_carry_the_pid() {
        let suffixes: Vec<String> = (0..2000).map(|_| unique_suffix()).collect();
        let mut sorted = suffixes.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), suffixes.len(), "duplicate suffixes");
        for s in &suffixes[..100] {
            assert!(s.len() <= 10, "{s} too long");
            assert!(s.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()), "{s}");
            assert_eq!(suffix_pid(s), Some(std::process::id()), "{s}");
        }
        assert!(format!("{NAME_PREFIX}{}xx", suffixes[0]).len() <= 15);
    }

    #[test]
    fn base36_pads_and_encodes() {
        assert_eq!(base36(0, 5), "00000");
        assert_eq!(base36(35, 1), "z");
        assert_eq!(base36(36, 1), "10");
        assert_eq!(base36(4_194_304, 5), "2hwcg");
        assert_eq!(suffix_pid("2hwcg0ab"), Some(4_194_304));
        assert_eq!(suffix_pid("short"), None);
        assert_eq!(suffix_pid("2FZYO0AB"), None);
    }

    #[test]
    fn netns_is_created_entered_and_removed() {
        require_root();
        let ns = Netns::new("tk");
        let (name, path) = (ns.name().to_owned(), ns.path().to_owned());
        assert!(name.starts_with("bh-tk-"), "{name}");
        assert_eq!(path, Path::new("/var/run/netns").join(&name));
        assert!(path.exists());
        let own_ino = std::fs::metadata("/proc/self/ns/net").expect("stat own netns").ino();
        assert_ne!(ns.ino(), own_ino);

        // `run` sees the namespace; the caller's thread stays where it was.
        let inside = ns.run(|| std::fs::metadata("/proc/thread-self/ns/net").expect("stat").ino());
        assert_eq!(inside, ns.ino());
        assert_eq!(std::fs::metadata("/proc/thread-self/ns/net").expect("stat").ino(), own_ino);

        // Only `lo` exists, and it is down until asked.
        let links = ns.exec_ok(&["ip", "-o", "link", "show"]);
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:") && links.contains("state DOWN"), "{links}");
        ns.set_loopback_up();
        assert!(ns.exec_ok(&["ip", "-o", "link", "show", "lo"]).contains("UP"));

        let failed = ns.exec(&["false"]);
        assert!(!failed.status.success());

        drop(ns);
        assert!(!path.exists(), "{} survived drop", path.display());
        let list = ip(&["netns", "list"]);
        assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(name.as_str())), "{list}");
    }

    #[test]
    fn netns_is_removed_when_the_test_panics() {
        require_root();
        let mut path = None;
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ns = Netns::new("panic");
            path = Some(ns.path().to_owned());
            ns.run(|| panic!("boom inside the namespace"));
        }));
        let payload = res.expect_err("the panic inside run reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom inside the namespace"));
        let path = path.expect("namespace was created");
        assert!(!path.exists(), "{} survived a panic", path.display());
    }

    #[test]
    fn spawn_runs_inside_and_kills_on_drop() {
        require_root();
        let ns = Netns::new("spawn");
        let mut child = ns.spawn(Command::new("sleep").arg("60"));
        let pid = child.id();
        let child_ns = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("stat child netns").ino();
        assert_eq!(child_ns, ns.ino());
        assert!(child.try_wait().expect("try_wait").is_none());
        // /sys is not remounted as with `ip netns exec`, so bpffs stays visible: the
        // child sees the very same /sys mount as we do.
        let sys_mount_id = |mountinfo: &str| {
            mountinfo
                .lines()
                .find(|l| l.split(' ').nth(4) == Some("/sys"))
                .and_then(|l| l.split(' ').next())
                .map(str::to_owned)
        };
        let out = ns.spawn(Command::new("cat").arg("/proc/self/mountinfo").stdout(Stdio::piped())).into_inner();
        let out = out.wait_with_output().expect("wait for cat");
        let ours = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
        assert!(sys_mount_id(&ours).is_some(), "no /sys mount?");
        assert_eq!(sys_mount_id(&String::from_utf8_lossy(&out.stdout)), sys_mount_id(&ours));
        let via_ip = ns.exec_ok(&["cat", "/proc/self/mountinfo"]);
        assert_ne!(sys_mount_id(&via_ip), sys_mount_id(&ours), "ip netns exec remounts /sys");
        drop(child);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains("(sleep)")),
            "sleep {pid} survived its guard"
        );
    }

    /// Accepts one connection on `listener` in `server`'s namespace, connects to it from
    /// `client`'s, and checks the peer address the server saw.
    fn tcp_roundtrip(client: &TestHost, server: &TestHost, server_ip: IpAddr, client_ip: IpAddr) {
        let listener = server.netns.run(|| TcpListener::bind(SocketAddr::new(server_ip, 0)).expect("bind"));
        let addr = listener.local_addr().expect("local_addr");
        std::thread::scope(|scope| {
            let accepted = scope.spawn(|| {
                let (mut stream, peer) = listener.accept().expect("accept");
                let mut buf = [0; 4];
                stream.read_exact(&mut buf).expect("read");
                stream.write_all(b"pong").expect("write");
                (peer.ip(), buf)
            });
            let mut stream = client
                .netns
                .run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
                .unwrap_or_else(|e| panic!("connect {addr} from {}: {e}", client.netns.name()));
            stream.write_all(b"ping").expect("write");
            let mut buf = [0; 4];
            stream.read_exact(&mut buf).expect("read");
            assert_eq!(&buf, b"pong");
            let (peer, got) = accepted.join().expect("server thread");
            assert_eq!(&got, b"ping");
            assert_eq!(peer, client_ip);
        });
    }

    #[test]
    fn testnet_hosts_talk_over_ipv4_and_ipv6_and_vanish_on_drop() {
        require_root();
        let net = TestNet::new(3);
        let hosts = net.hosts();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[0].ipv4, Ipv4Addr::new(10, 201, 0, 1));
        assert_eq!(hosts[2].ipv6, "fd00:b1::3".parse::<Ipv6Addr>().expect("literal"));
        let names: Vec<String> =
            hosts.iter().map(|h| h.netns.name().to_owned()).chain([net.switch().name().to_owned()]).collect();

        for (a, b) in [(0, 1), (1, 2), (2, 0)] {
            let (client, server) = (&hosts[a], &hosts[b]);
            tcp_roundtrip(client, server, server.ipv4.into(), client.ipv4.into());
            tcp_roundtrip(client, server, server.ipv6.into(), client.ipv6.into());
        }
        // Loopback works inside a host.
        tcp_roundtrip(&hosts[0], &hosts[0], Ipv4Addr::LOCALHOST.into(), Ipv4Addr::LOCALHOST.into());

        // The initial namespace has no route to the test subnet: nothing leaked there.
        let routes = ip(&["route", "show", "10.201.0.0/24"]);
        assert!(routes.trim().is_empty(), "test subnet routed in the initial netns: {routes}");

        drop(net);
        let list = ip(&["netns", "list"]);
        for name in names {
            assert!(!Path::new(NETNS_RUN_DIR).join(&name).exists(), "{name} survived drop");
            assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(name.as_str())), "{list}");
        }
    }

    #[test]
    fn testnets_in_parallel_are_isolated() {
        require_root();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| TestNet::new(2));
            let b = s.spawn(|| TestNet::new(2));
            (a.join().expect("net a"), b.join().expect("net b"))
        });
        // Same addresses, different segments: a listener in `a` is not reachable from `b`.
        let listener = a.hosts()[1].netns.run(|| TcpListener::bind((a.hosts()[1].ipv4, 0)).expect("bind"));
        let port = listener.local_addr().expect("addr").port();
        let b_host = &b.hosts()[0];
        let res = b_host.netns.run(|| {
            TcpStream::connect_timeout(&SocketAddr::new(a.hosts()[1].ipv4.into(), port), Duration::from_millis(300))
        });
        assert!(res.is_err(), "connected across TestNets");
        tcp_roundtrip(&b.hosts()[0], &b.hosts()[1], b.hosts()[1].ipv4.into(), b.hosts()[0].ipv4.into());
    }
}
