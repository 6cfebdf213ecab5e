//! `cargo xtask demo`: the whole pipeline on this host.
//!
//! Three workloads of the reference scenario (DESIGN.md §9) as network namespaces on a
//! private bridge — `deathstar` (an HTTP server on :80 with `POST /v1/request-landing`
//! and `PUT /v1/exhaust-port`, plus a UDP log sink on :514), `tiefighter` and `xwing` —
//! labelled by an inventory file; the learner on SQLite; the collector; tie fighters
//! landing over real HTTP. Then it prints the learned service graph and recent flows
//! with the `bulkhead` CLI.
//!
//! Everything it creates is named `bh-demo-*` and removed at the end (and at the start,
//! in case an earlier run was killed). `--keep` leaves the pipeline running until Enter
//! is pressed, to explore with `bulkhead graph` / `bulkhead flows`.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::setup;
use crate::util::{self, cargo, repo_root};

const SWITCH: &str = "bh-demo-switch";
const SUBNET: &str = "10.202.0";
const GRPC: &str = "127.0.0.1:7400";
const HTTP: &str = "127.0.0.1:7480";

/// (workload, last octet, labels)
const WORKLOADS: [(&str, u8, &str); 3] = [
    ("deathstar", 10, "{org: empire, class: deathstar}"),
    ("tiefighter", 11, "{org: empire, class: tiefighter}"),
    ("xwing", 12, "{org: alliance, class: xwing}"),
];

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep everything running until Enter is pressed.
    #[arg(long)]
    keep: bool,
    /// How many times the tie fighter lands.
    #[arg(long, default_value_t = 5)]
    landings: u32,
}

/// Processes and namespaces of one demo run; dropped = torn down.
struct Demo {
    children: Vec<(String, Child)>,
    dir: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        for (name, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
            println!("[demo] stopped {name}");
        }
        remove_namespaces();
        println!("[demo] removed the demo namespaces; logs and database stay in {}", self.dir.display());
    }
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let setup = setup::ensure_all()?;
    let path = setup.path_env()?;
    let root = repo_root()?;

    step("building release binaries (first build takes a few minutes)");
    util::run(cargo().current_dir(&root).env("PATH", &path).args([
        "build",
        "--release",
        "-p",
        "bulkhead-collector",
        "-p",
        "bulkhead-learner",
    ]))?;
    let target = target_dir(&root);
    let bin = |name: &str| target.join("release").join(name);

    let dir = target.join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for port in [GRPC, HTTP] {
        if std::net::TcpStream::connect(port).is_ok() {
            bail!("{port} is already in use: stop whatever listens there (an earlier demo or learner?)");
        }
    }

    step("creating the workloads as network namespaces on a private bridge");
    remove_namespaces();
    let mut demo = Demo { children: Vec::new(), dir: dir.clone() };
    create_network()?;

    let inventory = dir.join("inventory.yaml");
    std::fs::write(&inventory, inventory_yaml()).context("writing the inventory")?;
    println!("[demo] inventory: {}", inventory.display());

    step("starting the learner (SQLite) and the collector (eBPF)");
    let db = format!("sqlite://{}", dir.join("learner.db").display());
    // There is no default account: the demo makes an admin (one-time password, to be
    // changed at first login) for the UI and a token user for its own CLI calls.
    let learner_cli = |args: &[&str]| -> Result<String> {
        util::capture(Command::new(bin("bulkhead-learner")).args(["--db", &db]).args(args))
    };
    let admin_password = learner_cli(&["user", "add", "admin", "--role", "admin"])?;
    learner_cli(&["user", "add", "demo-cli", "--role", "approver"])?;
    let token = learner_cli(&["user", "token", "demo-cli", "--token-name", "demo"])?;
    let token_file = dir.join("token");
    std::fs::write(&token_file, token.trim()).context("writing the demo's API token")?;
    let learner = Command::new(bin("bulkhead-learner"))
        .args(["--db", &db, "--grpc-listen", GRPC, "--http-listen", HTTP])
        .arg("--inventory")
        .arg(&inventory)
        .stdout(log(&dir, "learner.log")?)
        .stderr(log(&dir, "learner.log")?)
        .spawn()
        .context("starting bulkhead-learner")?;
    demo.children.push(("learner".into(), learner));
    wait_for(Duration::from_secs(30), "the learner's API", || std::net::TcpStream::connect(HTTP).is_ok())?;
    let names: Vec<String> = WORKLOADS.iter().map(|(w, _, _)| ns(w)).collect();
    let collector = Command::new(bin("bulkhead-collector"))
        .args(["--learner", &format!("http://{GRPC}"), "--node-id", "demo-node", "--metrics-listen", "127.0.0.1:7401"])
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .args(["--flush-interval", "500ms", "--netns", &names.join(",")])
        .stdout(log(&dir, "collector.log")?)
        .stderr(log(&dir, "collector.log")?)
        .spawn()
        .context("starting bulkhead-collector")?;
    demo.children.push(("collector".into(), collector));
    let cli = |args: &[&str]| -> Result<String> {
        util::capture(
            Command::new(bin("bulkhead"))
                .args(["--server", &format!("http://{HTTP}")])
                .arg("--token-file")
                .arg(&token_file)
                .args(args),
        )
    };
    wait_for(Duration::from_secs(60), "the collector's first report", || {
        cli(&["endpoints"]).map(|out| names.iter().all(|n| out.contains(n.as_str()))).unwrap_or(false)
    })?;
    println!("[demo] collector connected; metrics on http://127.0.0.1:7401/metrics");
    println!(
        "[demo] UI: http://{HTTP}/ — log in as admin with the one-time password {} (you choose a new one)",
        admin_password.trim()
    );

    step("deathstar opens its HTTP port 80 and UDP log sink 514");
    let server = dir.join("deathstar.py");
    std::fs::write(&server, DEATHSTAR_PY).context("writing the deathstar server")?;
    let deathstar = netns_cmd("deathstar", "python3")
        .arg(&server)
        .stdout(log(&dir, "deathstar.log")?)
        .stderr(log(&dir, "deathstar.log")?)
        .spawn()
        .context("starting the deathstar server")?;
    demo.children.push(("deathstar".into(), deathstar));
    let ds = format!("{SUBNET}.10");
    wait_for(Duration::from_secs(15), "deathstar:80", || {
        netns_cmd("tiefighter", "python3")
            .args(["-c", &format!("import socket; socket.create_connection(('{ds}', 80), 1).close()")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })?;

    step(&format!("tiefighter requests landing {} times (POST /v1/request-landing)", args.landings));
    let client = dir.join("ship.py");
    std::fs::write(&client, SHIP_PY).context("writing the ship client")?;
    for _ in 0..args.landings {
        let out =
            util::capture(netns_cmd("tiefighter", "python3").arg(&client).args([&ds, "POST", "/v1/request-landing"]))?;
        println!("[demo]   tiefighter: {}", out.trim());
    }

    step("waiting for the learner to see every landing");
    let wanted = args.landings;
    // Landing probes (the readiness check above) count as connections too.
    wait_for(Duration::from_secs(60), "the tiefighter → deathstar:80 edge", || {
        cli(&["graph", "--json"])
            .ok()
            .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["dst_port"] == 80
                        && e["src_labels"]["class"] == "tiefighter"
                        && e["connections"].as_u64().is_some_and(|c| c >= u64::from(wanted))
                })
            })
    })?;

    step("the learned service graph (`bulkhead graph`)");
    print!("{}", cli(&["graph"])?);
    step("recent flows (`bulkhead flows --limit 8`)");
    print!("{}", cli(&["flows", "--limit", "8"])?);
    step("identities (`bulkhead identities`)");
    print!("{}", cli(&["identities"])?);

    if args.keep {
        println!(
            "\n[demo] still running: open http://{HTTP}/, or try `target/release/bulkhead --token-file {} graph`, or\n\
             [demo]   ip netns exec {} python3 {} {ds} POST /v1/request-landing\n\
             [demo] press Enter to stop.",
            token_file.display(),
            ns("xwing"),
            client.display()
        );
        let _ = std::io::stdin().lock().lines().next();
    }
    drop(demo);
    Ok(())
}

fn step(what: &str) {
    println!("\n[demo] ── {what}");
}

fn ns(workload: &str) -> String {
    format!("bh-demo-{workload}")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"))
}

fn log(dir: &Path, name: &str) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(name))
        .with_context(|| format!("opening {name}"))
}

/// A command run inside a workload's namespace. `ip netns exec` is fine for the
/// workloads themselves (they need no bpffs); agents run in the host namespace.
fn netns_cmd(workload: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns(workload), program]);
    c
}

fn wait_for(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out after {timeout:?} waiting for {what}; see the logs in target/demo/")
}

fn ip(args: &[&str]) -> Result<()> {
    let mut c = Command::new("ip");
    c.args(args).stdout(Stdio::null());
    let out = util::output(&mut c)?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The bridge lives in its own namespace, so nothing touches the host's network.
fn create_network() -> Result<()> {
    ip(&["netns", "add", SWITCH])?;
    ip(&["-n", SWITCH, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", SWITCH, "link", "set", "br0", "up"])?;
    for (w, octet, _) in WORKLOADS {
        let name = ns(w);
        let port = format!("p-{w}");
        ip(&["netns", "add", &name])?;
        ip(&["-n", SWITCH, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &name])?;
        ip(&["-n", SWITCH, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &name, "addr", "add", &format!("{SUBNET}.{octet}/24"), "dev", "eth0"])?;
        ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        println!("[demo]   {name}: {SUBNET}.{octet}");
    }
    Ok(())
}

fn remove_namespaces() {
    for name in WORKLOADS.iter().map(|(w, _, _)| ns(w)).chain([SWITCH.to_owned()]) {
        if Path::new("/var/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn inventory_yaml() -> String {
    let mut s = String::from("# Generated by `cargo xtask demo`: the reference scenario's workloads.\nworkloads:\n");
    for (w, _, labels) in WORKLOADS {
        s.push_str(&format!(
            "  - name: {w}\n    namespace: galaxy\n    labels: {labels}\n    match:\n      netns: [{}]\n",
            ns(w)
        ));
    }
    s
}

const DEATHSTAR_PY: &str = r#"# The deathstar: lands ships, and explodes when its exhaust port is hit.
import http.server, socketserver, threading

class Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body.encode())
    def do_POST(self):
        if self.path == "/v1/request-landing":
            self._answer(200, "Ship landed\n")
        else:
            self._answer(404, "Not found\n")
    def do_PUT(self):
        if self.path == "/v1/exhaust-port":
            self._answer(503, "Panic: deathstar exploded\n")
        else:
            self._answer(404, "Not found\n")
    def log_message(self, fmt, *args):
        print(fmt % args, flush=True)

def udp_sink():
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 514))
    while True:
        s.recvfrom(2048)

threading.Thread(target=udp_sink, daemon=True).start()
socketserver.ThreadingTCPServer.allow_reuse_address = True
with socketserver.ThreadingTCPServer(("0.0.0.0", 80), Handler) as httpd:
    httpd.serve_forever()
"#;

const SHIP_PY: &str = r#"# A ship: one HTTP request to the deathstar, then a UDP log line.
import socket, sys, urllib.request
host, method, path = sys.argv[1], sys.argv[2], sys.argv[3]
req = urllib.request.Request(f"http://{host}{path}", method=method, data=b"" if method != "GET" else None)
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.read().decode().strip())
except Exception as e:
    print(f"request failed: {e}")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(f"{method} {path}".encode(), (host, 514))
"#;
