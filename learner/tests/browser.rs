//! Browser journeys in headless Chromium (STYLE.md "Tests": browser): a real learner
//! started in-process on 127.0.0.1:0 over a temp SQLite store, seeded with a small
//! scenario, then `ui/tests/browser/journeys.mjs` (playwright-core driving Debian's
//! chromium) walks the UI as a user would. Screenshots of every step, the script's
//! output and `report.json` are kept in `target/browser-artifacts/<test>/`.
//!
//! Needs `BULKHEAD_BROWSER_DIR` (playwright-core's install) and `BULKHEAD_CHROMIUM`,
//! which `cargo xtask test` sets; by hand: `eval "$(cargo xtask browser-setup)"`. Without
//! them the test fails — it never skips.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulkhead_learner::auth::{self, Role};
use bulkhead_learner::grpc::ingest::{Enrollment, unix_ms};
use bulkhead_learner::identity::inventory::Inventory;
use bulkhead_learner::policy::{PolicyService, SynthesisRequest};
use bulkhead_learner::server::{self, Running, ServerConfig};
use bulkhead_learner::store::{IngestBatch, ResolvedFlow, Store};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Direction, Flow, Identity, Labels, Protocol, Verdict};

const BROWSER_DIR_ENV: &str = "BULKHEAD_BROWSER_DIR";
const CHROMIUM_ENV: &str = "BULKHEAD_CHROMIUM";

/// A label value that must render inert on every page: should it ever be parsed as
/// HTML, the handler or the script would set `window.__xss` (and the CSP would report).
const XSS_LABEL: &str = r#"<img src=x onerror="window.__xss=1"><script>window.__xss=1</script>"#;

/// The journeys' own overall limit; the test kills the script a little after it.
const JOURNEYS_TIMEOUT: Duration = Duration::from_secs(120);

/// The admin the journeys log in as, with a one-time password.
const ADMIN: &str = "admin";

/// The browser tooling from the environment; panics with instructions without it.
fn tooling() -> (PathBuf, PathBuf) {
    let get = |name: &str| match std::env::var_os(name).filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => panic!(
            "{name} is not set: the browser tests need playwright-core ({BROWSER_DIR_ENV}) and Debian's chromium \
             ({CHROMIUM_ENV}). Run them through `cargo xtask test`, or by hand: \
             `eval \"$(cargo xtask browser-setup)\" && cargo test -p bulkhead-learner --test browser`"
        ),
    };
    let (dir, chromium) = (get(BROWSER_DIR_ENV), get(CHROMIUM_ENV));
    assert!(
        dir.join("node_modules/playwright-core/package.json").is_file(),
        "{BROWSER_DIR_ENV}={} holds no node_modules/playwright-core; run `cargo xtask browser-setup`",
        dir.display()
    );
    assert!(
        chromium.is_file(),
        "{CHROMIUM_ENV}={} does not exist; run `cargo xtask browser-setup`",
        chromium.display()
    );
    (dir, chromium)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the learner crate sits in the workspace").to_path_buf()
}

/// `target/browser-artifacts/<test>/`, emptied.
fn artifacts_dir(test: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let dir = target.join("browser-artifacts").join(test);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing old artifacts {}: {e}", dir.display()),
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", dir.display()));
    dir
}

async fn learner(dir: &tempfile::TempDir) -> Running {
    server::start(ServerConfig {
        db_url: format!("sqlite://{}", dir.path().join("learner.db").display()),
        grpc_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        inventory: None,
        enrollment: Enrollment::Open,
        max_batch_bytes: 4 << 20,
        flow_retention: Duration::from_secs(24 * 3600),
        policy: Default::default(),
        // Secure cookies stay on: Debian's chromium (156) keeps `Secure` cookies set
        // over plain http://127.0.0.1 (a potentially trustworthy origin), checked with
        // a bare HTTP server and in this journey (it logs `secure=true`), so the test
        // runs with the production default.
        auth: Default::default(),
        tls: None,
    })
    .await
    .expect("learner starts")
}

fn labels(class: &str, org: &str, extra: &[(&str, &str)]) -> Labels {
    let base = [(NAMESPACE_KEY, "default"), ("org", org), ("class", class)];
    Labels::new(base.iter().chain(extra).copied()).expect("labels")
}

fn flow(src: &str, dst: &str, port: u16, at: i64) -> Flow {
    Flow {
        src_addr: src.parse::<IpAddr>().expect("ip"),
        src_port: 0,
        dst_addr: dst.parse::<IpAddr>().expect("ip"),
        dst_port: port,
        protocol: Protocol::Tcp,
        direction: Direction::Egress,
        netns_ino: 1,
        cgroup_id: 0,
        pid: 7,
        comm: "curl".into(),
        connections: 3,
        bytes_sent: 10,
        bytes_received: 20,
        packets: 3,
        verdict: Verdict::Forwarded,
        first_seen_unix_ms: at,
        last_seen_unix_ms: at + 1_000,
        http: Default::default(),
    }
}

/// The reference scenario (DESIGN.md §9): tiefighter lands on deathstar, xwing (whose
/// labels carry [`XSS_LABEL`]) attacks it; proposals synthesized from that traffic.
async fn seed(store: &Store) {
    let deathstar = store.ensure_identity(&labels("deathstar", "empire", &[])).await.expect("identity");
    let tiefighter = store.ensure_identity(&labels("tiefighter", "empire", &[])).await.expect("identity");
    let xwing = store.ensure_identity(&labels("xwing", "alliance", &[("note", XSS_LABEL)])).await.expect("identity");
    store.register_agent("node-1", 1).await.expect("agent");
    let now = unix_ms();
    // Learning: tiefighter lands; proposals are synthesized from that window. Then
    // xwing attacks — after the window, as in the reference scenario, so the approved
    // policy leaves it out and monitor mode shows its traffic as would-be-denied.
    let learned: [(Identity, Identity, Flow); 2] = [
        (tiefighter, deathstar, flow("10.202.0.11", "10.202.0.10", 80, now - 2 * 3_600_000)),
        (tiefighter, deathstar, flow("10.202.0.11", "10.202.0.10", 80, now - 3_600_000)),
    ];
    let attack = (xwing, deathstar, flow("10.202.0.12", "10.202.0.10", 80, now - 10 * 60_000));
    for (seq, (src, dst, f)) in learned.into_iter().enumerate() {
        ingest(store, seq as u64 + 1, src, dst, f).await;
    }
    let policy = PolicyService::new(store.clone(), Arc::new(Inventory::default()), Default::default());
    let proposals = policy.synthesize(&SynthesisRequest::default(), now - 30 * 60_000).await.expect("synthesize");
    ingest(store, 3, attack.0, attack.1, attack.2).await;
    assert!(proposals.iter().any(|p| p.target == deathstar), "a proposal for deathstar: {proposals:?}");
}

async fn ingest(store: &Store, seq: u64, src: Identity, dst: Identity, f: Flow) {
    let batch = IngestBatch {
        node_id: "node-1".into(),
        boot_id: "boot".into(),
        seq,
        received_unix_ms: f.last_seen_unix_ms,
        flows: vec![ResolvedFlow { flow: f, src_identity: src, dst_identity: dst }],
        endpoints: None,
        dns_answers: vec![],
        loss: Default::default(),
    };
    store.ingest(&batch).await.expect("ingest");
}

/// Runs `journeys.mjs` to the end (or kills it, chromium included, past the timeout),
/// its output going to `output.log` in `artifacts` so that a killed run still leaves it;
/// returns the exit status (None when killed), the output and how long it took.
async fn run_journeys(base_url: &str, password: &str, artifacts: &Path) -> (Option<i32>, String, Duration) {
    let (browser_dir, chromium) = tooling();
    let script = workspace_root().join("ui/tests/browser/journeys.mjs");
    let log_path = artifacts.join("output.log");
    let log = std::fs::File::create(&log_path).unwrap_or_else(|e| panic!("creating {}: {e}", log_path.display()));
    let log_err = log.try_clone().expect("cloning the log handle");
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(&script)
        .current_dir(&browser_dir)
        .env(BROWSER_DIR_ENV, &browser_dir)
        .env(CHROMIUM_ENV, &chromium)
        .env("NODE_PATH", browser_dir.join("node_modules"))
        .env("BULKHEAD_BASE_URL", base_url)
        .env("BULKHEAD_USERNAME", ADMIN)
        .env("BULKHEAD_PASSWORD", password)
        .env("BULKHEAD_ARTIFACTS", artifacts)
        .env("BULKHEAD_TIMEOUT_MS", JOURNEYS_TIMEOUT.as_millis().to_string())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group, so that a timeout also ends chromium's processes.
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child =
        cmd.spawn().unwrap_or_else(|e| panic!("cannot start `node {}` (is Node.js installed?): {e}", script.display()));
    let pgid = child.id().expect("a running child has a pid");
    let limit = JOURNEYS_TIMEOUT + Duration::from_secs(20);
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.expect("waiting for node").code(),
        Err(_) => {
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
            let _ = child.kill().await;
            None
        }
    };
    let took = started.elapsed();
    let mut output = std::fs::read_to_string(&log_path).unwrap_or_default();
    if status.is_none() {
        output.push_str(&format!("\n(killed by the test after {limit:?})\n"));
    }
    (status, output, took)
}

/// Every step's screenshot named in `report.json` exists and is a non-empty PNG.
fn assert_screenshots(artifacts: &Path, output: &str) -> usize {
    let report = std::fs::read(artifacts.join("report.json")).unwrap_or_else(|e| panic!("report.json: {e}\n{output}"));
    let report: serde_json::Value = serde_json::from_slice(&report).expect("report.json is JSON");
    let journeys = report["journeys"].as_array().expect("report.journeys");
    assert!(!journeys.is_empty(), "no journey ran:\n{output}");
    let mut n = 0;
    for step in journeys.iter().flat_map(|j| j["steps"].as_array().into_iter().flatten()) {
        let name = step["screenshot"].as_str().expect("step.screenshot");
        let path = artifacts.join(name);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("screenshot {} of step {}: {e}", path.display(), step["name"]));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 1_000,
            "{} is not a PNG screenshot",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "no screenshots in {}", artifacts.display());
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_journeys() {
    tooling();
    let artifacts = artifacts_dir("ui_journeys");
    let dir = tempfile::tempdir().expect("tempdir");
    let running = learner(&dir).await;
    seed(&running.store).await;
    let otp = auth::one_time_password().expect("one-time password");
    let hash = auth::hash_password(&otp).expect("hash");
    running.store.create_user(ADMIN, Role::Admin, &hash, true, "test", unix_ms()).await.expect("admin");

    let base_url = format!("http://{}", running.http_addr);
    let (status, output, took) = run_journeys(&base_url, &otp, &artifacts).await;
    println!("{output}");
    assert_eq!(
        status,
        Some(0),
        "journeys.mjs failed ({status:?}) after {took:?}; screenshots in {}:\n{output}",
        artifacts.display()
    );
    let shots = assert_screenshots(&artifacts, &output);
    println!("browser journeys passed in {took:.1?}; {shots} screenshots in {}", artifacts.display());
}
