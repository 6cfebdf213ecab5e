//! Kubernetes test tooling (shared/K8S.md): no registry ships a kube-apiserver binary
//! and there is no container engine, so `setup` builds the real kube-apiserver v1.20.2
//! from Debian's own source package, once per machine, and caches it as
//! `~/.cache/bulkhead/kube-apiserver-1.20.2`; etcd comes from Debian's `etcd-server`.
//! Exported YAML is validated offline with PyPI's `kubernetes-validate` in a venv at
//! `~/.cache/bulkhead/venv`.
//!
//! The build:
//! 1. fetch the source package `kubernetes` with `apt-get source --download-only`
//!    through a private deb-src list made from the machine's own Debian mirror (passed
//!    with `-o Dir::Etc::SourceList=…` and private list/cache directories), so the
//!    system's apt configuration and state are never touched;
//! 2. unpack the upstream tarball and replace the vendored
//!    `github.com/modern-go/reflect2` with Debian's copy (the vendored 1.0.1 crashes on
//!    the first request when built with Go ≥ 1.18);
//! 3. `make WHAT=cmd/kube-apiserver` offline (`GOPROXY=off`, no cgo), copy the binary
//!    into the cache and delete the 2 GB tree.
//!
//! It takes 4–9 minutes on 2 cores, so [`start_apiserver_build`] runs it on a thread
//! while the rest of set-up goes on, printing progress every 30 s; it is skipped when
//! the cached binary's `--version` already says v1.20.2.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::step;
use crate::util::{cache_dir, capture, fmt_duration, output, run};

/// Debian packages for the Kubernetes tests and the API server build, with why.
pub const APT_PACKAGES: &[(&str, &str)] = &[
    ("etcd-server", "the Kubernetes tests' etcd"),
    ("golang-go", "building kube-apiserver from Debian's source"),
    ("golang-github-modern-go-reflect2-dev", "the reflect2 that works with Go >= 1.18 (kube-apiserver build)"),
    ("rsync", "the kube-apiserver build scripts"),
    ("jq", "the kube-apiserver build scripts"),
    ("dpkg-dev", "`apt-get source` (dpkg-source)"),
    ("python3-venv", "the venv for kubernetes-validate"),
];

/// The version built, as `kube-apiserver --version` prints it.
pub const KUBE_VERSION: &str = "v1.20.2";
/// Environment variable through which the tests find the binary
/// (`bulkhead_testkit::kube::APISERVER_ENV`).
pub const APISERVER_ENV: &str = "BULKHEAD_KUBE_APISERVER";
/// The kubernetes-validate release the export tests expect (schemas 1.25–1.37).
pub const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Where the built binary is cached.
pub fn apiserver_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join("kube-apiserver-1.20.2"))
}

/// Where the venv lives.
pub fn venv_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join("venv"))
}

/// `Kubernetes v1.20.2` from `--version`, or why not.
fn apiserver_problem(bin: &Path) -> Option<String> {
    match output(Command::new(bin).arg("--version")) {
        Ok(o) if o.status.success() => {
            let v = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            (v != format!("Kubernetes {KUBE_VERSION}")).then(|| format!("found `{v}`, want {KUBE_VERSION}"))
        }
        Ok(o) => Some(format!("`--version` failed ({})", o.status)),
        Err(_) => Some("not built yet".to_owned()),
    }
}

/// A kube-apiserver that is cached already or being built on a thread.
#[derive(Debug)]
pub struct ApiserverBuild {
    path: PathBuf,
    build: Option<JoinHandle<Result<()>>>,
}

impl ApiserverBuild {
    /// Waits for the build (if any) and returns the binary's path.
    pub fn finish(self) -> Result<PathBuf> {
        if let Some(handle) = self.build {
            match handle.join() {
                Ok(result) => result.context("building kube-apiserver (shared/K8S.md recipe)")?,
                Err(_) => bail!("the kube-apiserver build thread panicked"),
            }
        }
        Ok(self.path)
    }
}

/// Starts building kube-apiserver on a thread unless the cached one is right. Needs the
/// apt packages of [`APT_PACKAGES`] installed.
pub fn start_apiserver_build() -> Result<ApiserverBuild> {
    let path = apiserver_path()?;
    let Some(problem) = apiserver_problem(&path) else {
        step!("setup", "kube-apiserver {KUBE_VERSION}: present ({})", path.display());
        return Ok(ApiserverBuild { path, build: None });
    };
    let work = cache_dir()?.join("kube-apiserver-build");
    std::fs::create_dir_all(&work).with_context(|| format!("mkdir -p {}", work.display()))?;
    let log = work.join("build.log");
    step!(
        "setup",
        "kube-apiserver {KUBE_VERSION}: {problem}; building from Debian's source in the background (4–9 min, log: {})",
        log.display()
    );
    let dest = path.clone();
    let build = std::thread::Builder::new()
        .name("kube-apiserver-build".into())
        .spawn(move || {
            let start = Instant::now();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let progress_log = log.clone();
            let progress = std::thread::spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    done_rx.recv_timeout(Duration::from_secs(30))
                {
                    let last = last_line(&progress_log).unwrap_or_default();
                    step!("setup", "kube-apiserver: still building, {} so far: {last}", fmt_duration(start.elapsed()));
                }
            });
            let result = build_apiserver(&work, &log, &dest);
            let _ = done_tx.send(());
            let _ = progress.join();
            match &result {
                Ok(()) => step!("setup", "kube-apiserver {KUBE_VERSION}: built in {}", fmt_duration(start.elapsed())),
                Err(e) => step!("setup", "kube-apiserver: build FAILED after {}: {e:#}", fmt_duration(start.elapsed())),
            }
            result
        })
        .context("starting the kube-apiserver build thread")?;
    Ok(ApiserverBuild { path, build: Some(build) })
}

/// The last non-empty line of a file, shortened.
fn last_line(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(4096)..]).into_owned();
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?.trim().to_owned();
    Some(line.chars().take(120).collect())
}

/// Runs `cmd` with stdout and stderr appended to `log`; fails naming the log.
fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let shown = crate::util::show(cmd);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("{}", log.display()))?;
    writeln!(file, "+ {shown}")?;
    let err = file.try_clone()?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .status()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("`{shown}` failed ({status}); end of {}:\n{}", log.display(), tail.join("\n"));
    }
    Ok(())
}

fn build_apiserver(work: &Path, log: &Path, dest: &Path) -> Result<()> {
    std::fs::write(log, "").with_context(|| format!("truncating {}", log.display()))?;
    let tarball = fetch_source(work, log)?;
    let tree_root = work.join("tree");
    if tree_root.exists() {
        std::fs::remove_dir_all(&tree_root).with_context(|| format!("removing {}", tree_root.display()))?;
    }
    std::fs::create_dir_all(&tree_root)?;
    run_logged(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&tree_root), log)?;
    let tree = std::fs::read_dir(&tree_root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join("Makefile").exists())
        .with_context(|| format!("no source tree with a Makefile under {}", tree_root.display()))?;

    // The vendored reflect2 1.0.1 crashes at run time with Go >= 1.18.
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    let debian = Path::new("/usr/share/gocode/src/github.com/modern-go/reflect2");
    if !debian.exists() {
        bail!("{} is missing: apt-get install golang-github-modern-go-reflect2-dev", debian.display());
    }
    std::fs::remove_dir_all(&vendored).with_context(|| format!("removing {}", vendored.display()))?;
    run_logged(Command::new("cp").arg("-r").arg(debian).arg(&vendored), log)?;

    run_logged(
        Command::new("make")
            .current_dir(&tree)
            .env("KUBE_GIT_VERSION", KUBE_VERSION)
            .env("KUBE_GIT_TREE_STATE", "clean")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0")
            .arg("WHAT=cmd/kube-apiserver"),
        log,
    )?;
    let built = tree.join("_output/bin/kube-apiserver");
    let tmp = dest.with_extension("tmp");
    std::fs::copy(&built, &tmp).with_context(|| format!("copying {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    if let Some(problem) = apiserver_problem(dest) {
        bail!("built {} but it is not usable: {problem}", dest.display());
    }
    // The tree is ~2 GB; the downloaded source stays for a rebuild.
    std::fs::remove_dir_all(&tree_root).with_context(|| format!("removing {}", tree_root.display()))?;
    Ok(())
}

/// Downloads the `kubernetes` source package (unless already there); returns the
/// upstream tarball.
fn fetch_source(work: &Path, log: &Path) -> Result<PathBuf> {
    let src = work.join("src");
    std::fs::create_dir_all(&src)?;
    if let Some(t) = find_orig_tarball(&src)? {
        return Ok(t);
    }
    let codename = os_codename()?;
    let mut lines = Vec::new();
    for path in apt_source_files() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let entries =
            if path.extension().is_some_and(|e| e == "sources") { parse_deb822(&text) } else { parse_one_line(&text) };
        lines.extend(entries.iter().filter_map(|e| e.deb_src_line(&codename)));
    }
    lines.dedup();
    let Some(line) = lines.first() else {
        bail!(
            "no Debian mirror with `{codename} main` in the apt sources (/etc/apt/sources.list, \
             /etc/apt/sources.list.d/); cannot fetch the kubernetes source package"
        );
    };
    let list = work.join("deb-src.list");
    std::fs::write(&list, format!("{line}\n"))?;
    let (lists, cache) = (work.join("lists"), work.join("apt-cache"));
    std::fs::create_dir_all(lists.join("partial"))?;
    std::fs::create_dir_all(cache.join("archives/partial"))?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(&src)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("-q")
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", list.display()))
            .args(["-o", "Dir::Etc::SourceParts=/nonexistent"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", lists.display()))
            .arg("-o")
            .arg(format!("Dir::Cache={}", cache.display()))
            // We are root; the _apt sandbox user cannot write the private directories.
            .args(["-o", "APT::Sandbox::User=root"])
            .args(args);
        cmd
    };
    step!("setup", "kube-apiserver: fetching the kubernetes source package ({line})");
    run_logged(&mut apt(&["update"]), log)?;
    run_logged(&mut apt(&["source", "--download-only", "kubernetes"]), log)?;
    find_orig_tarball(&src)?
        .with_context(|| format!("apt-get source left no kubernetes_*.orig.tar.gz in {}", src.display()))
}

/// `kubernetes_<version>.orig.tar.gz` in `dir`, checked to be 1.20.2.
fn find_orig_tarball(dir: &Path) -> Result<Option<PathBuf>> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("kubernetes_") && n.ends_with(".orig.tar.gz"))
        })
        .collect();
    found.sort();
    let Some(t) = found.pop() else { return Ok(None) };
    let name = t.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if !name.contains("1.20.2") {
        bail!(
            "the distribution's kubernetes source is {name}, not 1.20.2 (bookworm ships 1.20.5+really1.20.2); \
             the recipe in shared/K8S.md needs updating for this release"
        );
    }
    Ok(Some(t))
}

fn os_codename() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
        .context("no VERSION_CODENAME in /etc/os-release")
}

/// The files apt reads its sources from (only `.list` and `.sources` count).
fn apt_source_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    files
}

/// One `deb` source: mirror, suites, components, keyring.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AptSource {
    uri: String,
    suites: Vec<String>,
    components: Vec<String>,
    signed_by: Option<String>,
}

impl AptSource {
    /// `deb-src [signed-by=…] URI <codename> main` if this source carries the
    /// release's main suite.
    fn deb_src_line(&self, codename: &str) -> Option<String> {
        if !self.suites.iter().any(|s| s == codename) || !self.components.iter().any(|c| c == "main") {
            return None;
        }
        let opts = self.signed_by.as_ref().map(|k| format!("[signed-by={k}] ")).unwrap_or_default();
        Some(format!("deb-src {opts}{} {codename} main", self.uri))
    }
}

/// deb822 `.sources` stanzas of type `deb` that are not disabled.
fn parse_deb822(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                // Continuation (an inline key); belongs to the previous field.
                if let Some(last) = fields.last_mut() {
                    last.1.push('\n');
                    last.1.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        let words = |k: &str| get(k).map(|v| v.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
        let types: Vec<String> = words("types");
        if !types.iter().any(|t| t == "deb") || get("enabled").is_some_and(|e| e.eq_ignore_ascii_case("no")) {
            continue;
        }
        // Only a keyring path can be passed on (an inline key spans several lines).
        let signed_by = get("signed-by").filter(|v| v.starts_with('/') && !v.contains('\n')).map(str::to_owned);
        for uri in words("uris") {
            out.push(AptSource {
                uri,
                suites: words("suites"),
                components: words("components"),
                signed_by: signed_by.clone(),
            });
        }
    }
    out
}

/// One-line `deb [options] URI suite component…` entries.
fn parse_one_line(text: &str) -> Vec<AptSource> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let rest = line.strip_prefix("deb ")?.trim();
            let (options, rest) = match rest.strip_prefix('[') {
                Some(r) => r.split_once(']')?,
                None => ("", rest),
            };
            let signed_by = options
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .filter(|k| k.starts_with('/'))
                .map(str::to_owned);
            let mut words = rest.split_whitespace();
            let uri = words.next()?.to_owned();
            let suite = words.next()?.to_owned();
            Some(AptSource { uri, suites: vec![suite], components: words.map(str::to_owned).collect(), signed_by })
        })
        .collect()
}

// === kubernetes-validate ===

/// Makes sure `~/.cache/bulkhead/venv` has kubernetes-validate at the pinned version.
pub fn ensure_venv() -> Result<PathBuf> {
    let venv = venv_path()?;
    let python = venv.join("bin/python");
    let installed = || {
        capture(
            Command::new(&python)
                .args(["-c", "import importlib.metadata as m; print(m.version('kubernetes-validate'))"]),
        )
        .map(|v| v.trim().to_owned())
        .ok()
    };
    if installed().as_deref() == Some(KUBERNETES_VALIDATE_VERSION) {
        step!("setup", "kubernetes-validate {KUBERNETES_VALIDATE_VERSION}: present ({})", venv.display());
        return Ok(venv);
    }
    step!("setup", "kubernetes-validate {KUBERNETES_VALIDATE_VERSION}: installing into {} (~30 s)…", venv.display());
    if !python.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context("creating the Python venv")?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--disable-pip-version-check", "-q"])
        .arg(format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}")))
    .context("installing kubernetes-validate from PyPI")?;
    match installed() {
        Some(v) if v == KUBERNETES_VALIDATE_VERSION => Ok(venv),
        other => bail!(
            "kubernetes-validate is {other:?} in {} after installing; want {KUBERNETES_VALIDATE_VERSION}",
            venv.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources_give_a_deb_src_line() {
        let text = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n\
                    URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\
                    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
                    Components: main\n\n\
                    Types: deb\nURIs: http://disabled.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n";
        let lines: Vec<String> = parse_deb822(text).iter().filter_map(|s| s.deb_src_line("bookworm")).collect();
        assert_eq!(
            lines,
            [
                "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main"
            ]
        );
    }

    #[test]
    fn inline_keys_are_not_passed_on() {
        let text = "Types: deb deb-src\nURIs: http://m/debian\nSuites: bookworm\nComponents: main contrib\n\
                    Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n xyz\n";
        let s = parse_deb822(text);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].signed_by, None);
        assert_eq!(s[0].deb_src_line("bookworm").as_deref(), Some("deb-src http://m/debian bookworm main"));
    }

    #[test]
    fn one_line_sources_give_a_deb_src_line() {
        let text = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main contrib\n\
                    deb-src http://m/debian bookworm main\ndeb http://m/debian bookworm-updates main\n\
                    deb https://packages.example/apt stable main\n";
        let lines: Vec<String> = parse_one_line(text).iter().filter_map(|s| s.deb_src_line("bookworm")).collect();
        assert_eq!(lines, ["deb-src [signed-by=/k.gpg] http://m/debian bookworm main"]);
    }

    #[test]
    fn only_1_20_2_tarballs_are_accepted() {
        let dir = std::env::temp_dir().join(format!("xtask-kube-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        assert!(find_orig_tarball(&dir).expect("empty dir").is_none());
        std::fs::write(dir.join("kubernetes_1.20.5+really1.20.2.orig.tar.gz"), b"").expect("write");
        assert!(find_orig_tarball(&dir).expect("found").is_some());
        std::fs::remove_file(dir.join("kubernetes_1.20.5+really1.20.2.orig.tar.gz")).expect("rm");
        std::fs::write(dir.join("kubernetes_1.31.0.orig.tar.gz"), b"").expect("write");
        let err = find_orig_tarball(&dir).expect_err("wrong version").to_string();
        assert!(err.contains("not 1.20.2"), "{err}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
