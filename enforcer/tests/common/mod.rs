//! What the enforcer's root tests share: workloads as processes (the test binary
//! re-run as a workload, started inside its network namespace and cgroup from its
//! first instruction, so every socket it creates belongs to the workload's cgroup),
//! driven over stdin/stdout; child cgroups and bpffs pins removed on drop.
//!
//! Each test binary declares the workload entry point itself:
//! `#[test] #[ignore] fn helper_agent() { common::workload_main() }`.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use bulkhead_enforcer::datapath::{DEFAULT_BPFFS_ROOT, remove_instance};
pub use bulkhead_testkit::cgroup::SubCgroup;
use bulkhead_testkit::netns::{ChildGuard, Netns};

/// A connection that must succeed gets this long.
pub const OK_TIMEOUT_MS: u64 = 3000;
/// A connection that must fail is given up after this long (a dropped SYN is
/// retransmitted only after 1 s, so one attempt is one SYN).
pub const FAIL_TIMEOUT_MS: u64 = 400;

/// Starts a workload process named `name` in `netns` and `cgroup`.
pub fn spawn_workload(name: &'static str, netns: &Netns, cgroup: &SubCgroup) -> Agent {
    let exe = std::env::current_exe().expect("test binary");
    let mut cmd = cgroup.command(&exe);
    cmd.args(["--exact", "helper_agent", "--ignored", "--nocapture", "--test-threads=1"])
        .env(AGENT_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = netns.spawn(&mut cmd);
    let stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    Agent { name, stdin, stdout, _child: child }
}

// === the workload process ===

const AGENT_ENV: &str = "BH_ENFORCER_AGENT";
const AGENT_PREFIX: &str = "BHA ";

/// Not a test: the body of a workload process (see the module doc). Commands on
/// stdin, one per line; every answer is one line starting with `BHA `:
/// `listen tcp|udp ADDR`, `connect tcp|udp ADDR TIMEOUT_MS` → `ok` / `err …`.
pub fn workload_main() {
    assert!(std::env::var_os(AGENT_ENV).is_some(), "run by the datapath tests only");
    let stdin = std::io::stdin();
    // Connections kept open by `open`, used by `send`.
    let mut held: Vec<TcpStream> = Vec::new();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["open", addr] => match addr.parse::<SocketAddr>() {
                Ok(addr) => match TcpStream::connect_timeout(&addr, Duration::from_millis(OK_TIMEOUT_MS)) {
                    Ok(s) => {
                        held.push(s);
                        "ok".to_owned()
                    }
                    Err(e) => format!("err {e}"),
                },
                Err(e) => format!("err {e}"),
            },
            ["send", idx, ms] => match (idx.parse::<usize>().ok().and_then(|i| held.get_mut(i)), ms.parse::<u64>()) {
                (Some(s), Ok(ms)) => match echo(s, Duration::from_millis(ms)) {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("err {e}"),
                },
                _ => "err bad arguments".to_owned(),
            },
            ["http", addr, ms, segments @ ..] => agent_http(addr, ms, segments),
            ["loop", "tcp", addr, ms] => agent_loop_tcp(addr, ms),
            ["listen", "tcp", addr] => agent_listen_tcp(addr),
            ["listen", "udp", addr] => agent_listen_udp(addr),
            ["connect", "tcp", addr, ms] => agent_connect_tcp(addr, ms),
            ["connect", "udp", addr, ms] => agent_udp(addr, ms, false),
            ["connected", "udp", addr, ms] => agent_udp(addr, ms, true),
            ["raw"] => agent_raw(),
            _ => format!("err unknown command {line:?}"),
        };
        println!("{AGENT_PREFIX}{answer}");
    }
}

fn agent_listen_tcp(addr: &str) -> String {
    let listener = match addr
        .parse::<SocketAddr>()
        .map_err(|e| e.to_string())
        .and_then(|a| TcpListener::bind(a).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => return format!("err {e}"),
    };
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    "ok".to_owned()
}

fn agent_listen_udp(addr: &str) -> String {
    let sock = match addr
        .parse::<SocketAddr>()
        .map_err(|e| e.to_string())
        .and_then(|a| UdpSocket::bind(a).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => return format!("err {e}"),
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    "ok".to_owned()
}

fn agent_connect_tcp(addr: &str, ms: &str) -> String {
    let (Ok(addr), Ok(ms)) = (addr.parse::<SocketAddr>(), ms.parse::<u64>()) else {
        return "err bad arguments".to_owned();
    };
    let timeout = Duration::from_millis(ms);
    let result = TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| echo(&mut s, timeout));
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("err {e}"),
    }
}

/// Sends `segments` as separate TCP segments (Nagle off, a pause between them) on one
/// connection and waits for all of it to come back from the echo server: `_` is a
/// space and `~` a CRLF, so a request line fits in one word. For L7 tests.
fn agent_http(addr: &str, ms: &str, segments: &[&str]) -> String {
    let (Ok(addr), Ok(ms)) = (addr.parse::<SocketAddr>(), ms.parse::<u64>()) else {
        return "err bad arguments".to_owned();
    };
    let timeout = Duration::from_millis(ms);
    let result = (|| -> std::io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        for (i, seg) in segments.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
            let bytes = seg.replace('_', " ").replace('~', "\r\n").into_bytes();
            s.write_all(&bytes)?;
            let mut back = vec![0u8; bytes.len()];
            s.read_exact(&mut back)?;
            if back != bytes {
                return Err(std::io::Error::other("wrong echo"));
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("err {e}"),
    }
}

/// Sends `ping` and waits for it to come back.
fn echo(s: &mut TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    if &buf != b"ping" {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}

/// Connects (and echoes once) back to back for `ms`; `ok N` when all N
/// connections worked, else how many failed and the first error.
fn agent_loop_tcp(addr: &str, ms: &str) -> String {
    let (Ok(addr), Ok(ms)) = (addr.parse::<SocketAddr>(), ms.parse::<u64>()) else {
        return "err bad arguments".to_owned();
    };
    let timeout = Duration::from_millis(OK_TIMEOUT_MS);
    let deadline = Instant::now() + Duration::from_millis(ms);
    let (mut total, mut failed, mut first) = (0u64, 0u64, None);
    while Instant::now() < deadline {
        total += 1;
        if let Err(e) = TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| echo(&mut s, timeout)) {
            failed += 1;
            first.get_or_insert(e.to_string());
        }
    }
    match first {
        None => format!("ok {total}"),
        Some(e) => format!("err {failed} of {total} connections failed, first: {e}"),
    }
}

/// A UDP socket that sends to `addr` and waits for the echo: with `sendto()`, or
/// (`connected`) after `connect()`, with `send()`.
fn agent_udp(addr: &str, ms: &str, connected: bool) -> String {
    let (Ok(addr), Ok(ms)) = (addr.parse::<SocketAddr>(), ms.parse::<u64>()) else {
        return "err bad arguments".to_owned();
    };
    let result = (|| -> std::io::Result<()> {
        let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_millis(ms)))?;
        if connected {
            s.connect(addr)?;
            s.send(b"ping")?;
        } else {
            s.send_to(b"ping", addr)?;
        }
        let mut buf = [0u8; 16];
        let (n, _) = s.recv_from(&mut buf)?;
        if &buf[..n] != b"ping" {
            return Err(std::io::Error::other("wrong echo"));
        }
        Ok(())
    })();
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("err {e}"),
    }
}

/// Creates (and closes) a raw IPv4 UDP socket: "ok", or "err <errno text>".
fn agent_raw() -> String {
    // SAFETY: plain socket(2); the descriptor is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
    if fd < 0 {
        return format!("err {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours and open.
    unsafe { libc::close(fd) };
    "ok".to_owned()
}

/// The test's handle on one agent process.
pub struct Agent {
    pub name: &'static str,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _child: ChildGuard,
}

impl Agent {
    pub fn ask(&mut self, command: &str) -> Result<(), String> {
        self.ask_value(command).map(|_| ())
    }

    /// Like [`Agent::ask`], with what follows `ok ` in the answer.
    pub fn ask_value(&mut self, command: &str) -> Result<String, String> {
        writeln!(self.stdin, "{command}").unwrap_or_else(|e| panic!("agent {}: write {command:?}: {e}", self.name));
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap_or_else(|e| panic!("agent {}: read: {e}", self.name));
            assert!(n > 0, "agent {} exited while answering {command:?}", self.name);
            // libtest prints its own progress around ours, on the same line too
            // (`test helper_agent ... BHA ok`).
            if let Some((_, answer)) = line.trim_end().split_once(AGENT_PREFIX) {
                return match answer.strip_prefix("ok") {
                    Some(rest) if rest.is_empty() || rest.starts_with(' ') => Ok(rest.trim().to_owned()),
                    _ => Err(answer.to_owned()),
                };
            }
        }
    }

    pub fn listen(&mut self, proto: &str, addr: SocketAddr) {
        self.ask(&format!("listen {proto} {addr}"))
            .unwrap_or_else(|e| panic!("agent {}: listen {addr}: {e}", self.name));
    }

    pub fn tcp(&mut self, to: SocketAddr, timeout_ms: u64) -> Result<(), String> {
        self.ask(&format!("connect tcp {to} {timeout_ms}"))
    }

    pub fn udp(&mut self, to: SocketAddr, timeout_ms: u64) -> Result<(), String> {
        self.ask(&format!("connect udp {to} {timeout_ms}"))
    }

    pub fn tcp_ok(&mut self, to: SocketAddr) {
        if let Err(e) = self.tcp(to, OK_TIMEOUT_MS) {
            panic!("{} → {to}/tcp must succeed: {e}", self.name);
        }
    }

    /// `agent_http`: segments on one connection, each echoed back in time.
    pub fn http(&mut self, to: SocketAddr, timeout_ms: u64, segments: &[&str]) -> Result<(), String> {
        self.ask(&format!("http {to} {timeout_ms} {}", segments.join(" ")))
    }

    pub fn tcp_fails(&mut self, to: SocketAddr) {
        assert!(self.tcp(to, FAIL_TIMEOUT_MS).is_err(), "{} → {to}/tcp must fail", self.name);
    }
}

// === fixtures ===

/// Removes an instance's pins on drop, so its programs detach and maps go.
pub struct Pins {
    pub instance: String,
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = remove_instance(Path::new(DEFAULT_BPFFS_ROOT), &self.instance) {
            eprintln!("removing pins of {}: {e}", self.instance);
        }
    }
}
