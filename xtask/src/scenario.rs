//! The reference scenario (DESIGN.md §9), end to end on this host: the README's demo
//! (`cargo xtask demo`) and the e2e test (`xtask/tests/scenario.rs`) run this same code.
//!
//! Three workloads as network namespaces on a private bridge — `deathstar` (an HTTP
//! server on :80 with `POST /v1/request-landing` and `PUT /v1/exhaust-port`, and a UDP
//! log sink on :514), `tiefighter` (org=empire) and `xwing` (org=alliance) — labelled
//! by an inventory file. The real binaries run: learner (SQLite), collector and
//! enforcer. Then the story of the seeds: learn while the tie fighter lands → a
//! proposal for deathstar → approve → monitor (xwing still lands, and shows up as an
//! *audit* verdict) → enforce (xwing is dropped, the tie fighter still lands).
//!
//! Every step checks what it claims and fails with the logs' location when it does not
//! hold, so the demo cannot quietly show a broken pipeline and the test asserts the
//! story, not just exit codes. What it measured comes back as a [`Report`].
//!
//! Everything it creates (namespaces, the enforcer's cgroup and bpffs pins, processes)
//! carries the run's names from [`Names`] and is removed when the [`Scenario`] is
//! dropped — also when a step fails.

use std::fmt::Write as _;
use std::io::BufRead;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{setup, util};

/// The private subnet of the bridge. It lives in the scenario's own namespaces only, so
/// concurrent runs may use the same addresses.
const SUBNET: &str = "10.202.0";

/// (workload, last octet, labels)
pub const WORKLOADS: [(&str, u8, &str); 3] = [
    ("deathstar", 10, "{org: empire, class: deathstar}"),
    ("tiefighter", 11, "{org: empire, class: tiefighter}"),
    ("xwing", 12, "{org: alliance, class: xwing}"),
];

/// The node name of the scenario's collector and enforcer (and of their certificate).
pub(crate) const NODE: &str = "scenario-node";

/// How long a ship waits for the deathstar when its attempt is expected to be dropped.
const DROPPED_TIMEOUT_SECS: &str = "2";

/// Names of one run's kernel objects.
#[derive(Debug, Clone)]
pub struct Names {
    /// Workload namespaces are `<prefix>-<workload>-<suffix>`, the bridge's namespace
    /// `<prefix>-sw-<suffix>` (or without `-<suffix>` when it is empty).
    pub prefix: String,
    pub suffix: String,
    /// The enforcer's pin directory under `/sys/fs/bpf/bulkhead/`.
    pub enforcer_instance: String,
}

impl Names {
    /// The demo's fixed names (`bh-demo-deathstar`, …).
    pub fn demo() -> Names {
        Names { prefix: "bh-demo".into(), suffix: String::new(), enforcer_instance: "demo".into() }
    }

    fn join(&self, middle: &str) -> String {
        if self.suffix.is_empty() {
            format!("{}-{middle}", self.prefix)
        } else {
            format!("{}-{middle}-{}", self.prefix, self.suffix)
        }
    }

    pub fn netns(&self, workload: &str) -> String {
        self.join(workload)
    }

    fn switch(&self) -> String {
        self.join("sw")
    }

    /// The cgroup the enforcer's cgroup_skb programs attach to: the scenario's
    /// workloads are namespaces (judged by tc), so the enforcer gets an empty cgroup of
    /// its own rather than the host's root.
    fn cgroup(&self, cgroup2_root: &Path) -> PathBuf {
        cgroup2_root.join(self.join("enforcer"))
    }

    fn pins(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf/bulkhead").join(&self.enforcer_instance)
    }
}

/// Local ports of the learner and the agents' metrics.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub collector_metrics: SocketAddr,
    pub enforcer_metrics: SocketAddr,
}

impl Ports {
    /// The demo's fixed ports (the README names them).
    pub fn demo() -> Ports {
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Ports { grpc: at(7400), http: at(7480), collector_metrics: at(7401), enforcer_metrics: at(7402) }
    }

    /// Four ports that were free a moment ago (tests run beside other learners).
    pub fn free() -> Result<Ports> {
        let listeners: Vec<TcpListener> =
            (0..4).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
        let addrs: Vec<SocketAddr> = listeners.iter().map(TcpListener::local_addr).collect::<std::io::Result<_>>()?;
        Ok(Ports { grpc: addrs[0], http: addrs[1], collector_metrics: addrs[2], enforcer_metrics: addrs[3] })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory with `bulkhead-learner`, `bulkhead-collector`, `bulkhead-enforcer` and
    /// `bulkhead`.
    pub bins: PathBuf,
    /// Logs, database, inventory, token; emptied first.
    pub dir: PathBuf,
    pub names: Names,
    pub ports: Ports,
    /// How many times the tie fighter lands while Bulkhead learns.
    pub landings: u32,
    /// Stop after learning (the proposal exists) and leave the rest to a person in the
    /// UI; returns when Enter is pressed.
    pub pause_after_learning: bool,
    /// After the automatic run, keep everything running until Enter is pressed.
    pub keep: bool,
    /// What the fault tests change about the pipeline (`faults.rs`); default: nothing.
    pub overrides: Overrides,
}

/// Departures from the default pipeline, for the fault tests.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// The learner's database instead of the run's SQLite file (e.g. a PostgreSQL one).
    pub db_url: Option<String>,
    /// The collector's spool directory (e.g. on a small tmpfs) instead of `<dir>/spool`.
    pub spool_dir: Option<PathBuf>,
    /// Extra environment of the collector and the enforcer (e.g. libfaketime's, to put
    /// the node's clock off).
    pub agent_env: Vec<(String, String)>,
}

/// What one run measured and saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// From the tie fighter's first landing to a stored proposal for deathstar that the
    /// API would let an approver approve.
    pub first_connection_to_proposal: Duration,
    /// The proposal's id and its rules as `bulkhead proposals show` prints them.
    pub proposal_id: i64,
    pub proposal_text: String,
    /// Answers the ships got in each phase.
    pub monitor_xwing: String,
    pub enforce_tiefighter: String,
    pub enforce_xwing: String,
    /// Audit verdicts reported for xwing → deathstar while in monitor mode.
    pub audit_events: usize,
    /// L7: what the tie fighter's `PUT /v1/exhaust-port` got in monitor and in
    /// enforce mode, and the HTTP verdicts reported for it.
    pub monitor_exhaust: String,
    pub enforce_exhaust: String,
    pub http_audit_events: usize,
    pub http_denied_events: usize,
    /// Denied verdicts reported for xwing → deathstar while in enforce mode.
    pub denied_events: usize,
    /// Whether the run stopped after learning.
    pub paused: bool,
}

/// Runs the whole scenario; everything is torn down before it returns.
pub fn run(opts: &Options) -> Result<Report> {
    let mut sc = Scenario::start(opts)?;
    let report = sc.play(opts);
    if report.is_err() {
        println!("[scenario] failed; logs are in {}", opts.dir.display());
    }
    drop(sc);
    report
}

/// One running scenario: its processes and kernel objects, removed on drop.
pub(crate) struct Scenario {
    names: Names,
    children: Vec<(String, Child)>,
    /// How each process was started, so a fault test can start it again.
    recipes: Vec<(String, Recipe)>,
    overrides: Overrides,
    dir: PathBuf,
    bins: PathBuf,
    ports: Ports,
    token_file: PathBuf,
    admin_password: String,
    /// The enforcer's own (empty) cgroup.
    cgroup: PathBuf,
}

/// A process's command line and environment additions.
#[derive(Debug, Clone)]
struct Recipe {
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
}

impl Recipe {
    fn of(cmd: &Command) -> Recipe {
        Recipe {
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            env: cmd.get_envs().filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned()))).collect(),
        }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
            println!("[scenario] stopped {name}");
        }
        remove_namespaces(&self.names);
        // The enforcer's pins hold its programs in the kernel after it exits (that is
        // what keeps enforcement across restarts); the run's own instance goes.
        let _ = std::fs::remove_dir_all(self.names.pins());
        let _ = std::fs::remove_dir(&self.cgroup);
        println!(
            "[scenario] removed its namespaces, cgroup and pins; logs and database stay in {}",
            self.dir.display()
        );
    }
}

pub fn step(what: &str) {
    println!("\n[scenario] ── {what}");
}

fn say(what: impl std::fmt::Display) {
    println!("[scenario]   {what}");
}

impl Scenario {
    pub(crate) fn start(opts: &Options) -> Result<Scenario> {
        for bin in ["bulkhead-learner", "bulkhead-collector", "bulkhead-enforcer", "bulkhead"] {
            let path = opts.bins.join(bin);
            if !path.is_file() {
                bail!("{} is missing: build the binaries first (`cargo build --bins`)", path.display());
            }
        }
        for addr in [opts.ports.grpc, opts.ports.http, opts.ports.collector_metrics, opts.ports.enforcer_metrics] {
            if TcpStream::connect(addr).is_ok() {
                bail!("{addr} is already in use: stop whatever listens there (an earlier demo or learner?)");
            }
        }
        let _ = std::fs::remove_dir_all(&opts.dir);
        std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;

        step("creating the workloads as network namespaces on a private bridge");
        remove_namespaces(&opts.names);
        let _ = std::fs::remove_dir_all(opts.names.pins());
        let cgroup2 =
            setup::cgroup2_mounts()?.into_iter().next().context("no cgroup2 mount (`cargo xtask setup` makes one)")?;
        let sc = Scenario {
            names: opts.names.clone(),
            children: Vec::new(),
            recipes: Vec::new(),
            overrides: opts.overrides.clone(),
            dir: opts.dir.clone(),
            bins: opts.bins.clone(),
            ports: opts.ports,
            token_file: opts.dir.join("token"),
            admin_password: String::new(),
            cgroup: opts.names.cgroup(&cgroup2),
        };
        create_network(&opts.names)?;
        std::fs::create_dir_all(&sc.cgroup).with_context(|| format!("creating cgroup {}", sc.cgroup.display()))?;
        Ok(sc)
    }

    fn play(&mut self, opts: &Options) -> Result<Report> {
        let mut report = Report::default();
        self.start_pipeline()?;
        self.start_deathstar()?;

        step(&format!("learning: tiefighter requests landing {} times (POST /v1/request-landing)", opts.landings));
        let learning_started = Instant::now();
        for _ in 0..opts.landings {
            let answer = self.ship("tiefighter", "POST", "/v1/request-landing", None)?;
            say(format!("tiefighter: {answer}"));
            expect_landed("tiefighter while learning", &answer)?;
        }
        self.wait_for_landings(opts.landings)?;
        step("the learned service graph (`bulkhead graph`)");
        print!("{}", self.cli(&["graph"])?);

        step("synthesizing proposals (`bulkhead proposals synthesize`)");
        let deathstar = self.identity_of("deathstar")?;
        let proposal = self.proposal_for(deathstar)?;
        report.first_connection_to_proposal = learning_started.elapsed();
        report.proposal_id = proposal;
        report.proposal_text = self.cli(&["proposals", "show", &proposal.to_string()])?;
        say(format!(
            "proposal {proposal} for deathstar (identity {deathstar}), {:.1} s after the first landing:",
            report.first_connection_to_proposal.as_secs_f64()
        ));
        print!("{}", report.proposal_text);
        self.check_proposal(proposal)?;

        if opts.pause_after_learning {
            report.paused = true;
            self.hand_over(proposal, deathstar);
            return Ok(report);
        }

        step(&format!("approving proposal {proposal} (`bulkhead proposals approve`)"));
        print!(
            "{}",
            self.cli(&["proposals", "approve", &proposal.to_string(), "--comment", "scenario: landing only"])?
        );

        step("monitor: deathstar's policy is installed in audit mode (`bulkhead rollout set --mode monitor`)");
        self.rollout(deathstar, "monitor", "scenario")?;
        report.monitor_xwing = self.ship("xwing", "POST", "/v1/request-landing", None)?;
        say(format!("xwing: {}", report.monitor_xwing));
        expect_landed("xwing in monitor mode (nothing is dropped)", &report.monitor_xwing)?;
        report.audit_events =
            self.wait_verdicts(deathstar, "xwing", "audit", None, "xwing's landing reported as audit")?;
        // L7: the tie fighter may land, not fire at the exhaust port.
        report.monitor_exhaust = self.ship("tiefighter", "PUT", "/v1/exhaust-port", None)?;
        say(format!("tiefighter PUT /v1/exhaust-port: {}", report.monitor_exhaust));
        if !report.monitor_exhaust.starts_with("HTTP 503") {
            bail!("monitor mode must let the request through: {}", report.monitor_exhaust);
        }
        report.http_audit_events =
            self.wait_verdicts(deathstar, "tiefighter", "audit", Some(EXHAUST), "the PUT reported as audit")?;
        print!("{}", self.cli(&["verdicts", "--identity", &deathstar.to_string(), "--verdict", "audit"])?);

        step("enforce: would-deny traffic is now dropped (`bulkhead rollout set --mode enforce`)");
        self.rollout(deathstar, "enforce", "scenario: monitor showed only xwing")?;
        report.enforce_tiefighter = self.ship("tiefighter", "POST", "/v1/request-landing", None)?;
        say(format!("tiefighter: {}", report.enforce_tiefighter));
        expect_landed("tiefighter in enforce mode", &report.enforce_tiefighter)?;
        report.enforce_xwing = self.ship("xwing", "POST", "/v1/request-landing", Some(DROPPED_TIMEOUT_SECS))?;
        say(format!("xwing: {}", report.enforce_xwing));
        if !report.enforce_xwing.starts_with("request failed") {
            bail!("xwing reached the deathstar in enforce mode: {}", report.enforce_xwing);
        }
        report.denied_events =
            self.wait_verdicts(deathstar, "xwing", "denied", None, "xwing's attempt reported as denied")?;
        report.enforce_exhaust = self.ship("tiefighter", "PUT", "/v1/exhaust-port", Some(DROPPED_TIMEOUT_SECS))?;
        say(format!("tiefighter PUT /v1/exhaust-port: {}", report.enforce_exhaust));
        if !report.enforce_exhaust.starts_with("request failed") {
            bail!("the exhaust port was hit in enforce mode: {}", report.enforce_exhaust);
        }
        let landed = self.ship("tiefighter", "POST", "/v1/request-landing", None)?;
        expect_landed("tiefighter after its PUT was dropped", &landed)?;
        report.http_denied_events =
            self.wait_verdicts(deathstar, "tiefighter", "denied", Some(EXHAUST), "the PUT reported as denied")?;
        print!("{}", self.cli(&["verdicts", "--identity", &deathstar.to_string(), "--verdict", "denied"])?);

        step("the audit log (`bulkhead audit`)");
        print!("{}", self.cli(&["audit"])?);
        // Counted again at the end: TCP kept retransmitting the dropped PUT meanwhile,
        // and one refused request is still one event.
        report.http_denied_events =
            self.wait_verdicts(deathstar, "tiefighter", "denied", Some(EXHAUST), "the PUT reported as denied")?;
        if opts.keep {
            self.hand_over(proposal, deathstar);
        }
        Ok(report)
    }

    pub(crate) fn ports(&self) -> Ports {
        self.ports
    }

    /// The log file of a process the scenario started.
    pub(crate) fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }

    fn log(&self, name: &str) -> Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(name))
            .with_context(|| format!("opening {name}"))
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<()> {
        self.recipes.retain(|(n, _)| n != name);
        self.recipes.push((name.to_owned(), Recipe::of(cmd)));
        let log = self.log(&format!("{name}.log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating a log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// `kill -9` of one of the scenario's processes (a crash: no shutdown path runs).
    pub(crate) fn kill(&mut self, name: &str) -> Result<()> {
        let pos =
            self.children.iter().position(|(n, _)| n == name).with_context(|| format!("{name} is not running"))?;
        let (_, mut child) = self.children.remove(pos);
        child.kill().with_context(|| format!("killing {name}"))?;
        child.wait().with_context(|| format!("reaping {name}"))?;
        say(format!("killed {name} (SIGKILL)"));
        Ok(())
    }

    /// Starts a killed process again, exactly as it was started the first time.
    pub(crate) fn restart(&mut self, name: &str) -> Result<()> {
        let recipe = self.recipes.iter().find(|(n, _)| n == name).map(|(_, r)| r.clone());
        let recipe = recipe.with_context(|| format!("{name} was never started"))?;
        self.spawn(name, &mut recipe.command())?;
        say(format!("restarted {name}"));
        Ok(())
    }

    /// Fails when a process the scenario started has exited: a dead agent would
    /// otherwise only show up as a timeout much later.
    pub(crate) fn check_alive(&mut self) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().context("polling a child")? {
                bail!("{name} exited ({status}); see {}", self.dir.join(format!("{name}.log")).display());
            }
        }
        Ok(())
    }

    fn db_url(&self) -> String {
        match &self.overrides.db_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.dir.join("learner.db").display()),
        }
    }

    pub(crate) fn start_pipeline(&mut self) -> Result<()> {
        step("starting the learner (SQLite), the collector and the enforcer (eBPF)");
        let inventory = self.dir.join("inventory.yaml");
        std::fs::write(&inventory, inventory_yaml(&self.names)).context("writing the inventory")?;
        say(format!("inventory: {}", inventory.display()));
        // There is no default account: an admin (one-time password, changed at first
        // login) for the UI and a token user for the scenario's own CLI calls.
        let db = self.db_url();
        let learner_bin = self.bin("bulkhead-learner");
        let learner_cli = |args: &[&str]| -> Result<String> {
            util::capture(Command::new(&learner_bin).args(["--db", &db]).args(args))
        };
        self.admin_password = learner_cli(&["user", "add", "admin", "--role", "admin"])?.trim().to_owned();
        learner_cli(&["user", "add", "scenario-cli", "--role", "approver"])?;
        let token = learner_cli(&["user", "token", "scenario-cli", "--token-name", "scenario"])?;
        std::fs::write(&self.token_file, token.trim()).context("writing the scenario's API token")?;

        // mTLS between the agents and the learner, as in production: a CA, the
        // learner's certificate for the address the agents dial, one node certificate.
        let certs = self.dir.join("certs");
        let certs_arg = certs.to_string_lossy().into_owned();
        let grpc_ip = self.ports.grpc.ip().to_string();
        for args in [
            vec!["certs", "ca", "--dir", &certs_arg],
            vec!["certs", "learner", "--dir", &certs_arg, "--san", &grpc_ip, "--san", "localhost"],
            vec!["certs", "node", "--dir", &certs_arg, NODE],
        ] {
            util::capture(Command::new(self.bin("bulkhead")).args(&args))?;
        }
        say(format!("mTLS: CA, learner and node certificates in {certs_arg} (`bulkhead certs`)"));

        let (grpc, http) = (self.ports.grpc.to_string(), self.ports.http.to_string());
        let mut learner = Command::new(self.bin("bulkhead-learner"));
        learner
            .args(["--db", &db, "--grpc-listen", &grpc, "--http-listen", &http])
            .arg("--inventory")
            .arg(&inventory)
            .arg("--tls-cert")
            .arg(certs.join("learner.crt"))
            .arg("--tls-key")
            .arg(certs.join("learner.key"))
            .arg("--tls-client-ca")
            .arg(certs.join("ca.crt"));
        self.spawn("learner", &mut learner)?;
        let http_addr = self.ports.http;
        self.wait_for(Duration::from_secs(30), "the learner's API", |_| TcpStream::connect(http_addr).is_ok())?;

        let learner_url = format!("https://{grpc}");
        let agent_tls = |cmd: &mut Command| {
            cmd.arg("--tls-cert")
                .arg(certs.join(format!("node-{NODE}.crt")))
                .arg("--tls-key")
                .arg(certs.join(format!("node-{NODE}.key")))
                .arg("--tls-ca")
                .arg(certs.join("ca.crt"));
        };
        let names: Vec<String> = WORKLOADS.iter().map(|(w, _, _)| self.names.netns(w)).collect();
        let mut collector = Command::new(self.bin("bulkhead-collector"));
        collector
            .args(["--learner", &learner_url, "--node-id", NODE])
            .args(["--metrics-listen", &self.ports.collector_metrics.to_string()])
            .arg("--spool-dir")
            .arg(self.overrides.spool_dir.clone().unwrap_or_else(|| self.dir.join("spool")))
            .args(["--flush-interval", "500ms", "--endpoint-interval", "1s", "--netns", &names.join(",")]);
        agent_tls(&mut collector);
        collector.envs(self.overrides.agent_env.iter().map(|(k, v)| (k, v)));
        self.spawn("collector", &mut collector)?;

        let mut enforcer = Command::new(self.bin("bulkhead-enforcer"));
        enforcer
            .args(["--learner", &learner_url, "--node-id", NODE])
            .args(["--instance", &self.names.enforcer_instance])
            .arg("--cgroup")
            .arg(&self.cgroup)
            .arg("--state-dir")
            .arg(self.dir.join("enforcer-state"))
            .args(["--metrics-listen", &self.ports.enforcer_metrics.to_string(), "--report-interval", "500ms"]);
        agent_tls(&mut enforcer);
        enforcer.envs(self.overrides.agent_env.iter().map(|(k, v)| (k, v)));
        self.spawn("enforcer", &mut enforcer)?;

        self.wait_for(Duration::from_secs(60), "the collector's first endpoint report", |sc| {
            sc.cli(&["endpoints"]).map(|out| names.iter().all(|n| out.contains(n.as_str()))).unwrap_or(false)
        })?;
        self.wait_for(Duration::from_secs(60), "the enforcer's first policy ack", |sc| {
            sc.cli_json(&["enforcers"])
                .map(|v| v.as_array().is_some_and(|rows| rows.iter().any(|r| r["node_id"] == NODE)))
                .unwrap_or(false)
        })?;
        say(format!(
            "collector metrics http://{}/metrics, enforcer metrics http://{}/metrics",
            self.ports.collector_metrics, self.ports.enforcer_metrics
        ));
        say(format!(
            "UI: http://{}/ — log in as admin with the one-time password {} (you choose a new one)",
            self.ports.http, self.admin_password
        ));
        Ok(())
    }

    pub(crate) fn start_deathstar(&mut self) -> Result<()> {
        step("deathstar opens its HTTP port 80 and UDP log sink 514");
        let server = self.dir.join("deathstar.py");
        std::fs::write(&server, DEATHSTAR_PY).context("writing the deathstar server")?;
        std::fs::write(self.dir.join("ship.py"), SHIP_PY).context("writing the ship client")?;
        let mut cmd = self.netns_cmd("deathstar", "python3");
        cmd.arg(&server);
        self.spawn("deathstar", &mut cmd)?;
        // Readiness is the listening socket, not a connection: a probe connection would
        // be traffic the learner learns (and the proposal would allow it).
        self.wait_for(Duration::from_secs(15), "deathstar listening on :80", |sc| {
            sc.netns_cmd("deathstar", "ss")
                .args(["-Hltn", "sport = :80"])
                .output()
                .is_ok_and(|o| o.status.success() && !o.stdout.trim_ascii().is_empty())
        })
    }

    /// One HTTP request from a ship to the deathstar (then a UDP log line); its answer
    /// or `request failed: …`.
    pub(crate) fn ship(&self, workload: &str, method: &str, path: &str, timeout_secs: Option<&str>) -> Result<String> {
        let out = util::capture(self.netns_cmd(workload, "python3").arg(self.dir.join("ship.py")).args([
            &deathstar_addr(),
            method,
            path,
            timeout_secs.unwrap_or("5"),
        ]))?;
        Ok(out.trim().to_owned())
    }

    pub(crate) fn wait_for_landings(&mut self, landings: u32) -> Result<()> {
        step("waiting for the learner to see every landing");
        self.wait_for(Duration::from_secs(60), "the tiefighter → deathstar:80 edge", |sc| {
            sc.cli_json(&["graph"]).ok().and_then(|v| v.as_array().cloned()).is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["dst_port"] == 80
                        && e["src_labels"]["class"] == "tiefighter"
                        && e["connections"].as_u64().is_some_and(|c| c >= u64::from(landings))
                })
            })
        })
    }

    pub(crate) fn identity_of(&self, class: &str) -> Result<i64> {
        let ids = self.cli_json(&["identities"])?;
        ids.as_array()
            .into_iter()
            .flatten()
            .find(|r| r["labels"]["class"] == class)
            .and_then(|r| r["id"].as_i64())
            .with_context(|| format!("no identity with class={class} in {ids}"))
    }

    /// Synthesizes and returns the id of deathstar's newest proposal.
    pub(crate) fn proposal_for(&self, deathstar: i64) -> Result<i64> {
        print!("{}", self.cli(&["proposals", "synthesize"])?);
        let list = self.cli_json(&["proposals", "list", "--status", "proposed", "--target", &deathstar.to_string()])?;
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["id"].as_i64())
            .max()
            .with_context(|| format!("no proposal for deathstar: {list}"))
    }

    /// The proposal must let the tie fighter land and nothing else in: the story
    /// depends on it, so a synthesis regression fails here, named.
    pub(crate) fn check_proposal(&self, proposal: i64) -> Result<()> {
        let p = self.cli_json(&["proposals", "show", &proposal.to_string()])?;
        let ingress = p["proposal"]["policy"]["ingress"]
            .as_array()
            .with_context(|| format!("proposal without ingress rules: {p}"))?;
        let text = ingress.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
        if !text.contains("tiefighter") || text.contains("xwing") || text.contains("alliance") {
            bail!("deathstar's proposal should admit the tie fighter only; its ingress rules are:\n{text}");
        }
        // L7: port 80 is narrowed to the one request the tie fighter made.
        let landing = ingress.iter().any(|r| {
            r["ports"].as_array().is_some_and(|p| p.iter().any(|p| p["first"] == 80))
                && r["http"].as_array().is_some_and(|h| {
                    h.len() == 1
                        && h[0]["method"] == "POST"
                        && h[0]["path"]["match"] == "exact"
                        && h[0]["path"]["value"] == "/v1/request-landing"
                })
        });
        if !landing {
            bail!("deathstar's port 80 should be narrowed to POST /v1/request-landing; its ingress rules are:\n{text}");
        }
        Ok(())
    }

    /// `bulkhead rollout set` for deathstar, then waits until its enforcer applied it.
    pub(crate) fn rollout(&mut self, deathstar: i64, mode: &str, reason: &str) -> Result<()> {
        let before = self.enforcer_versions()?.0;
        let target = deathstar.to_string();
        print!("{}", self.cli(&["rollout", "set", "--target", &target, "--mode", mode, "--reason", reason])?);
        self.wait_applied(before, mode)
    }

    /// The policy version the learner wants on the scenario's node and the one its
    /// enforcer acked.
    pub(crate) fn enforcer_versions(&self) -> Result<(Option<u64>, Option<u64>)> {
        let rows = self.cli_json(&["enforcers"])?;
        let row = rows.as_array().into_iter().flatten().find(|r| r["node_id"] == NODE);
        Ok(row.map_or((None, None), |r| (r["desired_version"].as_u64(), r["applied_version"].as_u64())))
    }

    /// Waits until the enforcer applied a policy version newer than `before` (the one
    /// wanted before a rollout change) and the learner shows deathstar in `mode`.
    pub(crate) fn wait_applied(&mut self, before: Option<u64>, mode: &str) -> Result<()> {
        self.wait_for(Duration::from_secs(30), &format!("the enforcer to apply deathstar's {mode} policy"), |sc| {
            sc.enforcer_versions().is_ok_and(|(desired, applied)| desired > before && applied == desired)
        })?;
        let rows = self.cli_json(&["rollout", "list"])?;
        let shown = rows
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["workload"].as_str().is_some_and(|w| w.contains("deathstar")))
            .and_then(|r| r["mode"].as_str().map(str::to_owned));
        if shown.as_deref() != Some(mode) {
            bail!("the learner shows deathstar in {shown:?}, expected {mode}: {rows}");
        }
        print!("{}", self.cli(&["enforcers"])?);
        Ok(())
    }

    /// Waits for verdict events of `verdict` against deathstar from the workload of
    /// class `peer` — L4 ones (default deny) or, with `http`, ones naming the allow
    /// rule and the request line `http` (`METHOD /path`); their count.
    pub(crate) fn wait_verdicts(
        &mut self,
        deathstar: i64,
        peer: &str,
        verdict: &str,
        http: Option<&str>,
        what: &str,
    ) -> Result<usize> {
        let peer = self.identity_of(peer)?;
        let mut seen = 0;
        self.wait_for(Duration::from_secs(30), what, |sc| {
            let Ok(v) = sc.cli_json(&["verdicts", "--identity", &deathstar.to_string(), "--verdict", verdict]) else {
                return false;
            };
            // An HTTP verdict names the allowing rule and the request as the kernel read it.
            let request = |e: &Value| {
                let line = &e["http"];
                line.is_object().then(|| {
                    format!("{} {}", line["method"].as_str().unwrap_or("?"), line["path"].as_str().unwrap_or("?"))
                })
            };
            let matching = |e: &&Value| {
                e["peer"].as_i64() == Some(peer)
                    && match http {
                        None => e["rule"].is_null() && e["http"].is_null(),
                        Some(line) => !e["rule"].is_null() && request(e).as_deref() == Some(line),
                    }
            };
            seen = v.as_array().into_iter().flatten().filter(matching).count();
            seen > 0
        })?;
        Ok(seen)
    }

    fn hand_over(&self, proposal: i64, deathstar: i64) {
        let mut s = String::new();
        let _ = writeln!(s, "\n[scenario] learning is done; continue in the UI at http://{}/", self.ports.http);
        let _ = writeln!(s, "[scenario]   log in as admin with the one-time password {}", self.admin_password);
        let _ = writeln!(s, "[scenario]   Proposals → #{proposal} (deathstar): review the evidence and approve");
        let _ = writeln!(s, "[scenario]   Rollout → deathstar (identity {deathstar}): monitor, then enforce");
        let _ = writeln!(
            s,
            "[scenario]   ships: ip netns exec {} python3 {} {} POST /v1/request-landing",
            self.names.netns("xwing"),
            self.dir.join("ship.py").display(),
            deathstar_addr()
        );
        let _ = writeln!(
            s,
            "[scenario]   CLI:   {} --server http://{} --token-file {} rollout list",
            self.bin("bulkhead").display(),
            self.ports.http,
            self.token_file.display()
        );
        let _ = write!(s, "[scenario] press Enter to stop everything.");
        println!("{s}");
        let _ = std::io::stdin().lock().lines().next();
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        util::capture(
            Command::new(self.bin("bulkhead"))
                .args(["--server", &format!("http://{}", self.ports.http)])
                .arg("--token-file")
                .arg(&self.token_file)
                .args(args),
        )
    }

    pub(crate) fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.cli(&all)?;
        serde_json::from_str(&out).with_context(|| format!("`bulkhead {}` printed no JSON: {out}", args.join(" ")))
    }

    /// A command run inside a workload's namespace.
    fn netns_cmd(&self, workload: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names.netns(workload), program]);
        c
    }

    pub(crate) fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&mut Self) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            self.check_alive()?;
            if ready(self) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("timed out after {timeout:?} waiting for {what}; see the logs in {}", self.dir.display())
    }
}

fn expect_landed(who: &str, answer: &str) -> Result<()> {
    if answer != "Ship landed" {
        bail!("{who} should have landed, got: {answer}");
    }
    Ok(())
}

fn deathstar_addr() -> String {
    format!("{SUBNET}.10")
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
fn create_network(names: &Names) -> Result<()> {
    let switch = names.switch();
    ip(&["netns", "add", &switch])?;
    ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &switch, "link", "set", "br0", "up"])?;
    for (w, octet, _) in WORKLOADS {
        let name = names.netns(w);
        let port = format!("p-{w}");
        ip(&["netns", "add", &name])?;
        ip(&["-n", &switch, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &name])?;
        ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &name, "addr", "add", &format!("{SUBNET}.{octet}/24"), "dev", "eth0"])?;
        ip(&["-n", &name, "link", "set", "eth0", "up"])?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        say(format!("{name}: {SUBNET}.{octet}"));
    }
    Ok(())
}

fn remove_namespaces(names: &Names) {
    for name in WORKLOADS.iter().map(|(w, _, _)| names.netns(w)).chain([names.switch()]) {
        if Path::new("/var/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

fn inventory_yaml(names: &Names) -> String {
    let mut s = String::from("# Generated by the reference scenario (xtask/src/scenario.rs).\nworkloads:\n");
    for (w, _, labels) in WORKLOADS {
        let _ = write!(
            s,
            "  - name: {w}\n    namespace: galaxy\n    labels: {labels}\n    match:\n      netns: [{}]\n",
            names.netns(w)
        );
    }
    s
}

/// The tie fighter's forbidden request, as verdict events name it.
const EXHAUST: &str = "PUT /v1/exhaust-port";

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
import socket, sys, urllib.error, urllib.request
host, method, path, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
req = urllib.request.Request(f"http://{host}{path}", method=method, data=b"" if method != "GET" else None)
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        print(r.read().decode().strip())
except urllib.error.HTTPError as e:
    print(f"HTTP {e.code}: {e.read().decode().strip()}")
except Exception as e:
    print(f"request failed: {e}")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(f"{method} {path}".encode(), (host, 514))
"#;
