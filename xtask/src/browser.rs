//! Browser-test tooling: Debian's `chromium` (an apt package of `setup.rs`) driven by
//! `playwright-core` from npm. `learner/tests/browser.rs` runs
//! `ui/tests/browser/journeys.mjs` with Node.js and finds both through
//! [`BROWSER_DIR_ENV`] and [`CHROMIUM_ENV`].
//!
//! The npm dependencies are pinned in `ui/tests/browser/package.json` and
//! `package-lock.json` (in the repository) and installed with `npm ci` into
//! `~/.cache/bulkhead/browser/<hash of both files>/node_modules`, only when that
//! directory is missing, so the repository never gets a `node_modules`. Only
//! `playwright-core` (the driver, no browsers) is used, with `--ignore-scripts` and
//! `PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1`: Playwright's own browser builds are never
//! downloaded; the tests launch `/usr/bin/chromium`.
//!
//! Node.js: whatever `node` is on `PATH` (Node 20 from nodesource on these machines).
//! When there is none, Debian's `nodejs` and `npm` are installed; Debian 12's Node 18
//! is older than playwright-core's `engines` (≥ 20), which is reported as a warning.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::step;
use crate::util::{cache_dir, capture, fmt_duration, repo_root, run};

/// Environment variable naming the directory whose `node_modules` holds
/// playwright-core (what `learner/tests/browser.rs` reads).
pub const BROWSER_DIR_ENV: &str = "BULKHEAD_BROWSER_DIR";
/// Environment variable naming the chromium binary the tests launch.
pub const CHROMIUM_ENV: &str = "BULKHEAD_CHROMIUM";
/// Debian's chromium (package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The npm project of the browser tests, relative to the repository root.
pub const PACKAGE_DIR: &str = "ui/tests/browser";
/// The oldest Node.js major playwright-core's `engines` accepts.
const MIN_NODE_MAJOR: u32 = 20;

/// Where the browser tests find their tools.
#[derive(Debug, Clone)]
pub struct Browser {
    /// Parent of the installed `node_modules` ([`BROWSER_DIR_ENV`]).
    pub dir: PathBuf,
    /// The chromium binary ([`CHROMIUM_ENV`]).
    pub chromium: PathBuf,
}

/// Makes sure Node.js, chromium and the pinned npm dependencies are there (after the
/// apt step of set-up, which installs chromium).
pub fn ensure() -> Result<Browser> {
    ensure_node()?;
    let chromium = PathBuf::from(CHROMIUM);
    let version = capture(Command::new(&chromium).arg("--version"))
        .with_context(|| format!("{CHROMIUM} does not run (apt package `chromium`)"))?;
    step!("setup", "chromium: {} ({CHROMIUM})", version.trim());
    let dir = ensure_node_modules()?;
    Ok(Browser { dir, chromium })
}

// === Node.js ===

/// `node --version` as a major number, or `None` when there is no `node`.
fn node_major() -> Result<Option<u32>> {
    let Ok(out) = Command::new("node").arg("--version").output() else { return Ok(None) };
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let major = parse_node_major(&text).with_context(|| format!("cannot read `node --version`: {text:?}"))?;
    Ok(Some(major))
}

/// `v20.20.2` → 20.
fn parse_node_major(version: &str) -> Option<u32> {
    version.trim().strip_prefix('v')?.split('.').next()?.parse().ok()
}

fn has_npm() -> bool {
    Command::new("npm").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn ensure_node() -> Result<()> {
    let mut major = node_major()?;
    if major.is_none() {
        step!("setup", "node: missing; installing Debian's nodejs and npm");
        crate::setup::apt_install(&["nodejs", "npm"])?;
        major = node_major()?;
    } else if !has_npm() {
        // nodesource's nodejs ships npm; Debian's does not.
        step!("setup", "npm: missing; installing Debian's npm");
        crate::setup::apt_install(&["npm"])?;
    }
    let Some(major) = major else { bail!("`node` is still not on PATH after installing nodejs") };
    if !has_npm() {
        bail!("`npm` is not on PATH");
    }
    if major < MIN_NODE_MAJOR {
        step!(
            "setup",
            "WARNING: node {major} is older than playwright-core's engines (>= {MIN_NODE_MAJOR}); install Node.js \
             {MIN_NODE_MAJOR} (nodesource) if the browser tests fail"
        );
    } else {
        step!("setup", "node: v{major} present");
    }
    Ok(())
}

// === npm dependencies ===

/// FNV-1a 64 over the files' bytes: a cache key, not a security measure (`npm ci`
/// checks every package's integrity against the lock).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate the files so that moving bytes between them changes the key.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Every `node_modules/…` package of a lock file (v2/v3) with its version.
fn locked_packages(lock: &Value) -> Result<Vec<(String, String)>> {
    let packages = lock.get("packages").and_then(Value::as_object).context("package-lock.json has no `packages`")?;
    packages
        .iter()
        .filter(|(path, _)| path.starts_with("node_modules/"))
        .map(|(path, meta)| {
            let version =
                meta.get("version").and_then(Value::as_str).with_context(|| format!("{path} has no version"))?;
            Ok((path.clone(), version.to_owned()))
        })
        .collect()
}

/// Why `dir` does not hold exactly the locked packages, if it does not.
fn install_problem(dir: &Path, locked: &[(String, String)]) -> Option<String> {
    for (path, want) in locked {
        let manifest = dir.join(path).join("package.json");
        let Ok(text) = std::fs::read_to_string(&manifest) else { return Some(format!("{path} missing")) };
        let have = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("version").and_then(Value::as_str).map(str::to_owned));
        if have.as_deref() != Some(want.as_str()) {
            return Some(format!("{path} is {have:?}, locked {want}"));
        }
    }
    None
}

/// Installs the locked packages into the cache when they are not there; returns the
/// directory holding `node_modules`.
fn ensure_node_modules() -> Result<PathBuf> {
    let src = repo_root()?.join(PACKAGE_DIR);
    let read = |name: &str| {
        let p = src.join(name);
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let (manifest, lock_bytes) = (read("package.json")?, read("package-lock.json")?);
    let lock: Value = serde_json::from_slice(&lock_bytes).context("parsing package-lock.json")?;
    let locked = locked_packages(&lock)?;
    let pinned: Vec<String> =
        locked.iter().map(|(p, v)| format!("{}@{v}", p.trim_start_matches("node_modules/"))).collect();
    let pinned = pinned.join(", ");

    let root = cache_dir()?.join("browser");
    let dir = root.join(format!("{:016x}", fnv1a(&[&manifest, &lock_bytes])));
    let Some(problem) = install_problem(&dir, &locked) else {
        step!("setup", "browser npm packages: present ({pinned}; {})", dir.display());
        return Ok(dir);
    };
    step!("setup", "browser npm packages ({pinned}): {problem}; installing into {}…", dir.display());
    let start = Instant::now();

    // Install next to the final place, then rename: an interrupted install never
    // looks finished, and two concurrent set-ups do not write into one tree.
    let tmp = root.join(format!(".install-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("mkdir -p {}", tmp.display()))?;
    std::fs::write(tmp.join("package.json"), &manifest).context("copying package.json")?;
    std::fs::write(tmp.join("package-lock.json"), &lock_bytes).context("copying package-lock.json")?;
    run(Command::new("npm").current_dir(&tmp).env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1").args([
        "ci",
        "--ignore-scripts",
        "--no-audit",
        "--no-fund",
        "--loglevel=error",
    ]))
    .context("npm ci for the browser tests")?;
    if let Some(problem) = install_problem(&tmp, &locked) {
        bail!("`npm ci` in {} finished but {problem}", tmp.display());
    }
    if dir.exists() {
        // A stale or partial tree from an older layout, or a concurrent set-up won.
        if install_problem(&dir, &locked).is_none() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
            return Ok(dir);
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    step!("setup", "browser npm packages: installed in {}", fmt_duration(start.elapsed()));
    Ok(dir)
}

/// `cargo xtask browser-setup`: the apt packages (incl. chromium), Node.js and the npm
/// packages only, then the `export` lines for running the browser test by hand:
/// `eval "$(cargo xtask browser-setup)"`.
pub fn setup_and_print_env() -> Result<()> {
    crate::util::PROGRESS_TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
    crate::util::require_root("browser-setup")?;
    crate::setup::apt_packages()?;
    let browser = ensure()?;
    print_env(&browser);
    Ok(())
}

/// `export` lines for [`BROWSER_DIR_ENV`] and [`CHROMIUM_ENV`].
pub fn print_env(browser: &Browser) {
    let quote = |p: &Path| p.to_string_lossy().replace('\'', r"'\''");
    println!("export {BROWSER_DIR_ENV}='{}'", quote(&browser.dir));
    println!("export {CHROMIUM_ENV}='{}'", quote(&browser.chromium));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_major_from_version() {
        assert_eq!(parse_node_major("v20.20.2\n"), Some(20));
        assert_eq!(parse_node_major("v18.19.0"), Some(18));
        assert_eq!(parse_node_major("20.1.0"), None);
    }

    #[test]
    fn cache_key_depends_on_every_file() {
        let a = fnv1a(&[b"{}", b"lock"]);
        assert_eq!(a, fnv1a(&[b"{}", b"lock"]));
        assert_ne!(a, fnv1a(&[b"{}", b"lock2"]));
        assert_ne!(a, fnv1a(&[b"{}l", b"ock"]));
    }

    #[test]
    fn lock_packages_and_install_check() {
        let lock = serde_json::json!({"packages": {
            "": {"name": "x"},
            "node_modules/playwright-core": {"version": "1.2.3"},
        }});
        let locked = locked_packages(&lock).expect("packages");
        assert_eq!(locked, vec![("node_modules/playwright-core".to_owned(), "1.2.3".to_owned())]);

        let dir = std::env::temp_dir().join(format!("xtask-browser-{}", std::process::id()));
        assert!(install_problem(&dir, &locked).is_some_and(|p| p.contains("missing")));
        let pkg = dir.join("node_modules/playwright-core");
        std::fs::create_dir_all(&pkg).expect("mkdir");
        std::fs::write(pkg.join("package.json"), r#"{"version": "1.2.2"}"#).expect("write");
        assert!(install_problem(&dir, &locked).is_some_and(|p| p.contains("1.2.2")));
        std::fs::write(pkg.join("package.json"), r#"{"version": "1.2.3"}"#).expect("write");
        assert_eq!(install_problem(&dir, &locked), None);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn the_repository_lock_pins_playwright_core_only() {
        let path = repo_root().expect("root").join(PACKAGE_DIR).join("package-lock.json");
        let lock: Value = serde_json::from_slice(&std::fs::read(&path).expect("lock")).expect("json");
        let names: Vec<String> = locked_packages(&lock).expect("packages").into_iter().map(|(p, _)| p).collect();
        // The full `playwright` package would bring a browser downloader along.
        assert_eq!(names, vec!["node_modules/playwright-core".to_owned()]);
    }
}
