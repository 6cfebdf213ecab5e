//! A real Kubernetes API server for tests: etcd and kube-apiserver v1.20.2 (built from
//! Debian's source by `cargo xtask setup`, see `shared/K8S.md`) on random loopback
//! ports, in a private directory under the temp dir, with a throwaway CA and serving
//! certificate, a static token file and RBAC on.
//!
//! Two users: [`ADMIN_USER`] (group `system:masters`, may do anything) and
//! [`RESTRICTED_USER`] (no RBAC bindings: every list is forbidden until a test grants
//! something), for RBAC-denial tests.
//!
//! There is no kubelet and no controller: pods stay `Pending` unless a test patches
//! their status ([`KubeApiServer::set_pod_ips`]), and a deleted namespace stays
//! `Terminating` — so tests use a fresh namespace each ([`KubeApiServer::create_namespace`]).
//!
//! The binaries come from [`APISERVER_ENV`] (required: `cargo xtask test` and
//! `eval "$(cargo xtask env)"` set it) and [`ETCD_ENV`] (default `etcd` on `PATH`, Debian's
//! `etcd-server`). Without them [`KubeApiServer::start`] panics with what to do: a
//! Kubernetes test never skips and passes.
//!
//! Dropping the fixture kills both processes and removes the directory, also when the
//! test panics. Processes are started under `setpriv --pdeathsig KILL`, so even a test
//! binary killed outright takes them along; directories of dead test processes are
//! removed by the next start.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::netns::{suffix_pid, unique_suffix};

/// Environment variable naming the kube-apiserver binary.
pub const APISERVER_ENV: &str = "BULKHEAD_KUBE_APISERVER";
/// Environment variable naming the etcd binary (default: `etcd` on `PATH`).
pub const ETCD_ENV: &str = "BULKHEAD_ETCD";
/// Where `cargo xtask setup` caches the API server it builds.
pub const CACHED_APISERVER: &str = ".cache/bulkhead/kube-apiserver-1.20.2";
/// The all-powerful test user (group `system:masters`).
pub const ADMIN_USER: &str = "bulkhead-admin";
/// A user without any RBAC binding.
pub const RESTRICTED_USER: &str = "bulkhead-restricted";
/// Prefix of the per-run directories (`<temp>/bh-kube-<suffix>`).
pub const DIR_PREFIX: &str = "bh-kube-";

/// How long the API server may take to become ready (≈5 s idle, 10–15 s on a busy
/// 2-core machine; generous for parallel test binaries).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Attempts with fresh ports when a port picked as free was taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// A running etcd + kube-apiserver pair. See the module docs.
pub struct KubeApiServer {
    dir: PathBuf,
    apiserver_bin: PathBuf,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    apiserver_args: Vec<String>,
    port: u16,
    admin_token: String,
    restricted_token: String,
    kubeconfig: PathBuf,
    restricted_kubeconfig: PathBuf,
    config: kube::Config,
    restricted_config: kube::Config,
}

impl std::fmt::Debug for KubeApiServer {
    // Tokens stay out of test output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApiServer").field("dir", &self.dir).field("port", &self.port).finish_non_exhaustive()
    }
}

/// The kube-apiserver binary from [`APISERVER_ENV`]; panics with instructions when it
/// is not set or not runnable.
pub fn require_apiserver() -> PathBuf {
    let cached = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(CACHED_APISERVER));
    let hint = match cached.filter(|p| p.exists()) {
        Some(p) => format!("(a cached build exists: export {APISERVER_ENV}={})", p.display()),
        None => "(no cached build in ~/.cache/bulkhead yet)".to_owned(),
    };
    let bin = match std::env::var_os(APISERVER_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => panic!(
            "{APISERVER_ENV} is not set: the Kubernetes tests need a real kube-apiserver. Run them with \
             `cargo xtask test`, or `eval \"$(cargo xtask env)\"` first, which build it once from Debian's \
             source (shared/K8S.md) and export {APISERVER_ENV} {hint}. These tests fail rather than skip."
        ),
    };
    version_of(&bin).unwrap_or_else(|e| {
        panic!("{APISERVER_ENV}={} cannot run ({e}); rebuild it with `cargo xtask setup` {hint}", bin.display())
    });
    bin
}

/// The etcd binary from [`ETCD_ENV`] or `PATH`; panics with instructions when missing.
pub fn require_etcd() -> PathBuf {
    let bin = std::env::var_os(ETCD_ENV).filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or("etcd".into());
    version_of(&bin).unwrap_or_else(|e| {
        panic!(
            "etcd ({}) cannot run ({e}): install Debian's etcd-server (`apt-get install etcd-server`, which \
             `cargo xtask setup` does) or set {ETCD_ENV}. The Kubernetes tests fail rather than skip.",
            bin.display()
        )
    });
    bin
}

fn version_of(bin: &Path) -> Result<String, String> {
    let out = Command::new(bin).arg("--version").stdin(Stdio::null()).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("`{} --version` exited with {}", bin.display(), out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
}

fn random_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` says ok.
    ///
    /// Panics (with the processes' log tails) if they do not come up.
    pub async fn start() -> KubeApiServer {
        let apiserver_bin = require_apiserver();
        let etcd_bin = require_etcd();
        remove_stale_dirs();
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&apiserver_bin, &etcd_bin).await {
                Ok(server) => return server,
                // Dropping the failed attempt already cleaned up after it.
                Err(e) => last_error = e,
            }
        }
        panic!("the test API server did not start in {START_ATTEMPTS} attempts; last failure:\n{last_error}");
    }

    async fn try_start(apiserver_bin: &Path, etcd_bin: &Path) -> Result<KubeApiServer, String> {
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", unique_suffix()));
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).map_err(|e| format!("mkdir {}: {e}", certs.display()))?;
        write_certs(&certs);
        let admin_token = random_token();
        let restricted_token = random_token();
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n\
                 {restricted_token},{RESTRICTED_USER},{RESTRICTED_USER}\n"
            ),
        )
        .map_err(|e| format!("writing tokens: {e}"))?;

        let (etcd_port, peer_port, port) = (free_port(), free_port(), free_port());
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = write_kubeconfig(&dir, "admin", &url, &certs.join("ca.crt"), ADMIN_USER, &admin_token);
        let restricted_kubeconfig =
            write_kubeconfig(&dir, "restricted", &url, &certs.join("ca.crt"), RESTRICTED_USER, &restricted_token);
        let config = load_config(&kubeconfig).await;
        let restricted_config = load_config(&restricted_kubeconfig).await;
        let d = |p: &str| dir.join(p).display().to_string();
        let apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            // v1.20 also serves plain HTTP on 8080 unless told not to.
            "--insecure-port=0".into(),
            format!("--cert-dir={}", d("certs")),
            format!("--tls-cert-file={}", d("certs/server.crt")),
            format!("--tls-private-key-file={}", d("certs/server.key")),
            format!("--client-ca-file={}", d("certs/ca.crt")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d("certs/sa.pub")),
            format!("--service-account-signing-key-file={}", d("certs/sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
        ];
        let mut server = KubeApiServer {
            dir,
            apiserver_bin: apiserver_bin.to_owned(),
            etcd: None,
            apiserver: None,
            apiserver_args,
            port,
            admin_token,
            restricted_token,
            kubeconfig,
            restricted_kubeconfig,
            config,
            restricted_config,
        };
        let etcd_args = vec![
            "--name".to_owned(),
            "t".into(),
            "--data-dir".into(),
            server.dir.join("etcd").display().to_string(),
            "--listen-client-urls".into(),
            format!("http://127.0.0.1:{etcd_port}"),
            "--advertise-client-urls".into(),
            format!("http://127.0.0.1:{etcd_port}"),
            "--listen-peer-urls".into(),
            format!("http://127.0.0.1:{peer_port}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://127.0.0.1:{peer_port}"),
            "--initial-cluster".into(),
            format!("t=http://127.0.0.1:{peer_port}"),
        ];
        server.etcd = Some(server.spawn("etcd", etcd_bin, &etcd_args)?);
        server.start_apiserver_process()?;
        server.wait_ready().await?;
        Ok(server)
    }

    /// Starts `bin` with its output in `<dir>/<name>.log`, dying with this process.
    fn spawn(&self, name: &str, bin: &Path, args: &[String]) -> Result<Child, String> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let err = log.try_clone().map_err(|e| format!("dup log: {e}"))?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {} (via setpriv from util-linux): {e}", bin.display()))?;
        let _ = std::fs::write(self.dir.join(format!("{name}.pid")), child.id().to_string());
        Ok(child)
    }

    fn start_apiserver_process(&mut self) -> Result<(), String> {
        let bin = self.apiserver_bin.clone();
        let args = self.apiserver_args.clone();
        self.apiserver = Some(self.spawn("apiserver", &bin, &args)?);
        Ok(())
    }

    /// Polls `/readyz` until it answers `ok`; fails early when a process exits.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = self.client();
        let start = Instant::now();
        let mut interval = Duration::from_millis(20);
        loop {
            let mut exited = None;
            for (name, child) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)] {
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    exited = Some(format!("{name} exited with {status}"));
                }
            }
            if let Some(exited) = exited {
                return Err(format!("{exited}\n{}", self.logs()));
            }
            let req = http::Request::get("/readyz").body(Vec::new()).map_err(|e| e.to_string())?;
            let last = match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "kube-apiserver not ready after {READY_TIMEOUT:?} (last answer: {last})\n{}",
                    self.logs()
                ));
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(250));
        }
    }

    /// The last lines of both processes' logs, for failure messages.
    pub fn logs(&self) -> String {
        ["etcd", "apiserver"]
            .iter()
            .map(|n| format!("--- {n}.log (tail) ---\n{}", tail(&self.dir.join(format!("{n}.log")), 4000)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The API server's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// A client acting as [`ADMIN_USER`].
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone()).unwrap_or_else(|e| panic!("building the admin client: {e}"))
    }

    /// A client acting as [`RESTRICTED_USER`].
    pub fn restricted_client(&self) -> Client {
        Client::try_from(self.restricted_config.clone())
            .unwrap_or_else(|e| panic!("building the restricted client: {e}"))
    }

    /// A kubeconfig file for [`ADMIN_USER`].
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kubeconfig file for [`RESTRICTED_USER`].
    pub fn restricted_kubeconfig_path(&self) -> &Path {
        &self.restricted_kubeconfig
    }

    /// Writes a kubeconfig for [`ADMIN_USER`] that reaches the server at `server_url`
    /// (e.g. through a [`TcpProxy`]; the serving certificate is valid for any
    /// `127.0.0.1` port). `name` must be unique within this server.
    pub fn kubeconfig_via(&self, name: &str, server_url: &str) -> PathBuf {
        write_kubeconfig(&self.dir, name, server_url, &self.dir.join("certs/ca.crt"), ADMIN_USER, &self.admin_token)
    }

    /// The bearer token of [`RESTRICTED_USER`].
    pub fn restricted_token(&self) -> &str {
        &self.restricted_token
    }

    /// Kills kube-apiserver (etcd keeps the data). Clients see connection errors.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts kube-apiserver again on the same port and waits until it is ready. Its
    /// watch cache starts afresh, so watches resumed from an older resourceVersion get
    /// 410 Gone — the situation a real API server restart or upgrade creates.
    pub async fn start_apiserver(&mut self) {
        assert!(self.apiserver.is_none(), "kube-apiserver is already running");
        let ready = match self.start_apiserver_process() {
            Ok(()) => self.wait_ready().await,
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            panic!("restarting kube-apiserver failed: {e}");
        }
    }

    /// [`Self::stop_apiserver`] then [`Self::start_apiserver`].
    pub async fn restart_apiserver(&mut self) {
        self.stop_apiserver();
        self.start_apiserver().await;
    }

    // === objects ===

    /// Creates a namespace with a unique name `bh-<prefix>-<suffix>` and these labels.
    pub async fn create_namespace(&self, prefix: &str, labels: &[(&str, &str)]) -> String {
        let name = format!("bh-{prefix}-{}", unique_suffix());
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
            .unwrap_or_else(|e| panic!("namespace {name}: {e}"));
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        name
    }

    /// Creates a pod (one `pause` container; nothing runs it) from a JSON object whose
    /// `metadata.name` and `metadata.namespace` are set; missing `spec` is filled in.
    pub async fn create_pod(&self, mut pod: serde_json::Value) -> Pod {
        if pod.get("spec").is_none() {
            pod["spec"] = json!({"containers": [{"name": "main", "image": "registry.invalid/pause:3"}]});
        }
        let pod: Pod = serde_json::from_value(pod).unwrap_or_else(|e| panic!("invalid pod: {e}"));
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| panic!("pod without namespace"));
        Api::<Pod>::namespaced(self.client(), &ns)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("creating pod {ns}/{:?}: {e}", pod.metadata.name))
    }

    /// Sets a pod's `status.podIP(s)` and phase `Running`, as the kubelet would.
    pub async fn set_pod_ips(&self, namespace: &str, name: &str, ips: &[&str]) -> Pod {
        let pod_ips: Vec<serde_json::Value> = ips.iter().map(|ip| json!({"ip": ip})).collect();
        let patch = json!({"status": {"phase": "Running", "podIP": ips.first(), "podIPs": pod_ips}});
        Api::<Pod>::namespaced(self.client(), namespace)
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("patching status of pod {namespace}/{name}: {e}"))
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("testkit: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// CA, serving certificate (127.0.0.1, localhost) and service-account key pair.
fn write_certs(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let fail = |what: &str, e: rcgen::Error| -> ! { panic!("generating the test {what}: {e}") };
    let ca_key = KeyPair::generate().unwrap_or_else(|e| fail("CA key", e));
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail("CA", e));
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bulkhead test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).unwrap_or_else(|e| fail("CA certificate", e));
    let issuer = Issuer::new(ca, ca_key);

    let server_key = KeyPair::generate().unwrap_or_else(|e| fail("server key", e));
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap_or_else(|e| fail("server certificate", e));
    server.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    let server_cert = server.signed_by(&server_key, &issuer).unwrap_or_else(|e| fail("server certificate", e));

    let sa_key = KeyPair::generate().unwrap_or_else(|e| fail("service account key", e));
    for (name, pem) in [
        ("ca.crt", ca_cert.pem()),
        ("server.crt", server_cert.pem()),
        ("server.key", server_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap_or_else(|e| panic!("writing {name}: {e}"));
    }
}

/// Writes `<dir>/<name>.kubeconfig` (JSON, which is YAML) and returns its path.
fn write_kubeconfig(dir: &Path, name: &str, server: &str, ca: &Path, user: &str, token: &str) -> PathBuf {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "bulkhead-test", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "bulkhead-test", "context": {"cluster": "bulkhead-test", "user": user, "namespace": "default"}}],
        "current-context": "bulkhead-test",
    });
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(&path, config.to_string()).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

async fn load_config(path: &Path) -> kube::Config {
    let kubeconfig = Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// The last `max` bytes of a file (lossy UTF-8).
fn tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else { return format!("({} missing)", path.display()) };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// Removes run directories of test processes that are gone, killing their servers
/// if they still run (recognised by the directory in their command line, so a reused
/// pid is never hit).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(DIR_PREFIX).and_then(suffix_pid) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = entry.path();
        for proc_name in ["apiserver", "etcd"] {
            let Some(child) = std::fs::read_to_string(dir.join(format!("{proc_name}.pid")))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), nix::sys::signal::Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

// === a proxy that can cut connections ===

/// A loopback TCP proxy in front of an address that can cut every connection and
/// refuse new ones, then let them through again: how tests take a client's watches
/// down while the API server goes on changing.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    cuts: watch::Sender<u64>,
    /// Connections being forwarded now.
    live: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

/// Counts a forwarded connection while it lives.
struct LiveGuard(Arc<AtomicUsize>);

impl LiveGuard {
    fn new(live: &Arc<AtomicUsize>) -> LiveGuard {
        live.fetch_add(1, Ordering::SeqCst);
        LiveGuard(live.clone())
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TcpProxy {
    /// Listens on a random loopback port, forwarding to `target`.
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap_or_else(|e| panic!("binding the proxy: {e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("proxy address: {e}"));
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let live = Arc::new(AtomicUsize::new(0));
        let (accept_open, accept_cuts, accept_live) = (open.clone(), cuts.clone(), live.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accept_open.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let mut cut = accept_cuts.subscribe();
                let guard = LiveGuard::new(&accept_live);
                tokio::spawn(async move {
                    let _guard = guard;
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpProxy { addr, open, cuts, live, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://<addr>`, for a kubeconfig.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Closes every open connection and refuses new ones until [`Self::restore`];
    /// returns once the open connections are closed, so nothing passes afterwards.
    pub async fn cut(&self) {
        self.close();
        let closed = crate::eventually::eventually_async(Duration::from_secs(10), async || {
            self.live.load(Ordering::SeqCst) == 0
        })
        .await;
        if let Err(e) = closed {
            panic!("proxy connections did not close: {e}");
        }
    }

    fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.close();
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_enforces_rbac_and_cleans_up() {
        let server = KubeApiServer::start().await;
        let version = server.client().apiserver_version().await.expect("version");
        assert_eq!(version.git_version, "v1.20.2");
        let ns = server.create_namespace("kit", &[("k", "v")]).await;
        server.create_pod(json!({"metadata": {"name": "p", "namespace": ns}})).await;
        let pod = server.set_pod_ips(&ns, "p", &["10.1.2.3", "fd00::3"]).await;
        let ips: Vec<String> =
            pod.status.and_then(|s| s.pod_ips).unwrap_or_default().into_iter().map(|p| p.ip).collect();
        assert_eq!(ips, ["10.1.2.3", "fd00::3"]);
        let denied = Api::<Pod>::all(server.restricted_client()).list(&Default::default()).await.expect_err("RBAC");
        assert!(matches!(&denied, kube::Error::Api(s) if s.code == 403), "{denied}");

        // The kubeconfig files work on their own.
        let config = load_config(server.kubeconfig_path()).await;
        let client = Client::try_from(config).expect("client");
        Api::<Namespace>::all(client).get(&ns).await.expect("namespace via kubeconfig");

        let dir = server.dir.clone();
        let pids: Vec<u32> =
            [&server.etcd, &server.apiserver].iter().filter_map(|c| c.as_ref().map(Child::id)).collect();
        drop(server);
        assert!(!dir.exists(), "{} left behind", dir.display());
        for pid in pids {
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "process {pid} left running");
        }
    }

    #[tokio::test]
    async fn the_proxy_cuts_and_restores() {
        let target = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let target_addr = target.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = target.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let proxy = TcpProxy::start(target_addr).await;
        let echo = |mut s: TcpStream| async move {
            use tokio::io::AsyncReadExt;
            s.write_all(b"ping").await.ok()?;
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).await.ok()?;
            Some((s, buf))
        };
        let (mut open, buf) = echo(TcpStream::connect(proxy.addr()).await.expect("connect")).await.expect("echo");
        assert_eq!(&buf, b"ping");
        proxy.cut().await;
        let mut byte = [0u8; 1];
        use tokio::io::AsyncReadExt;
        assert_eq!(open.read(&mut byte).await.unwrap_or(0), 0, "the open connection was closed");
        assert!(echo(TcpStream::connect(proxy.addr()).await.expect("connect")).await.is_none(), "refused while cut");
        proxy.restore();
        assert!(echo(TcpStream::connect(proxy.addr()).await.expect("connect")).await.is_some(), "works again");
    }
}
