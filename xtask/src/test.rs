//! `cargo xtask test` / `ci` / `env`: set-up, PostgreSQL, then fmt, clippy (host and
//! eBPF) and `cargo test`, stopping at the first failing step. Ends with the plain line
//! `N passed, N failed` computed from cargo test's `test result:` lines.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::postgres;
use crate::setup;
use crate::step;
use crate::util::{capture, cargo, fmt_duration, output, repo_root, require_root, show};

/// Options of `cargo xtask test`.
#[derive(Debug, Default, Args)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and both clippy runs (quicker local iterations).
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for `cargo test`, after `--` (e.g. `-- -p bulkhead-testkit`).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// `cargo xtask ci`: the `test` pipeline, plus a few facts about the machine in the log.
pub fn run_ci() -> Result<ExitCode> {
    step!("ci", "CI={}", std::env::var("CI").unwrap_or_default());
    for cmd in [&["uname", "-r"][..], &["rustc", "-V"], &["cargo", "-V"]] {
        if let Ok(out) = output(Command::new(cmd[0]).args(&cmd[1..]).current_dir(repo_root()?)) {
            step!("ci", "{}: {}", cmd.join(" "), String::from_utf8_lossy(&out.stdout).trim());
        }
    }
    run(&TestArgs::default())
}

/// `cargo xtask env`: set-up and PostgreSQL, then `export` lines on stdout; all progress
/// goes to stderr so that `eval "$(cargo xtask env)"` works.
pub fn print_env() -> Result<ExitCode> {
    crate::util::PROGRESS_TO_STDERR.store(true, std::sync::atomic::Ordering::Relaxed);
    require_root("env")?;
    let setup = setup::ensure_all()?;
    let url = postgres::prepare()?;
    let path = setup.path_env()?;
    println!("export PATH='{}'", path.to_string_lossy().replace('\'', r"'\''"));
    println!("export {}='{url}'", postgres::URL_ENV);
    println!(
        "export {}='{}'",
        crate::kube::APISERVER_ENV,
        setup.kube_apiserver.to_string_lossy().replace('\'', r"'\''")
    );
    crate::browser::print_env(&setup.browser);
    Ok(ExitCode::SUCCESS)
}

/// One timed step.
#[derive(Debug)]
struct Timing {
    name: &'static str,
    took: Duration,
}

/// `cargo xtask test`.
pub fn run(args: &TestArgs) -> Result<ExitCode> {
    let start = Instant::now();
    let mut timings = Vec::new();
    let mut timed = |name: &'static str, started: Instant| timings.push(Timing { name, took: started.elapsed() });

    require_root("test")?;
    let t = Instant::now();
    let setup = setup::ensure_all()?;
    timed("setup", t);

    let t = Instant::now();
    cleanup_stale_fixtures()?;
    let url = postgres::prepare()?;
    timed("fixtures+postgres", t);

    let env = TestEnv {
        path: setup.path_env()?,
        postgres_url: url,
        kube_apiserver: setup.kube_apiserver.clone(),
        browser: setup.browser.clone(),
        root: repo_root()?,
    };

    report_free_disk(&env.root);

    if args.no_lint {
        step!("test", "skipping fmt and clippy (--no-lint)");
    } else {
        let t = Instant::now();
        let mut fmt = cargo();
        fmt.args(["fmt", "--all", "--", "--check"]);
        if !std::io::stdout().is_terminal() {
            // rustfmt colours its diff even into a CI log file.
            fmt.args(["--color", "never"]);
        }
        if let Err(e) = env.run_step(&mut fmt) {
            return failed(&format!("{e:#} — run `cargo fmt --all`"), start);
        }
        timed("fmt", t);

        let t = Instant::now();
        if let Err(e) = env.run_step(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"])) {
            return failed(&format!("{e:#}"), start);
        }
        timed("clippy", t);

        let t = Instant::now();
        let ebpf = ebpf_crates(&env.root)?;
        if ebpf.is_empty() {
            step!("test", "WARNING: no workspace member named *-ebpf found; nothing to lint for the bpf target");
        }
        for krate in &ebpf {
            let mut cmd = cargo();
            cmd.env("RUSTC_BOOTSTRAP", "1")
                .args(["clippy", "-p", krate, "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"]);
            if let Err(e) = env.run_step(&mut cmd) {
                return failed(&format!("{e:#}"), start);
            }
        }
        timed("clippy-ebpf", t);
    }

    // The end-to-end scenario test (xtask/tests/scenario.rs) runs the agents' and the
    // learner's real binaries from the target directory; build them first so it never
    // runs stale ones (cargo test alone only builds binaries of packages it tests, and
    // a nested cargo inside a test would wait on this run's build lock).
    let t = Instant::now();
    let mut build = cargo();
    build.args(["build", "--bins", "-p", "bulkhead-collector", "-p", "bulkhead-enforcer", "-p", "bulkhead-learner"]);
    if let Err(e) = env.run_step(&mut build) {
        return failed(&format!("{e:#}"), start);
    }
    timed("build-bins", t);

    let t = Instant::now();
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast"]).args(&args.cargo_test_args);
    let outcome = env.run_tests(&mut cmd)?;
    timed("test", t);
    remove_empty_pin_root(Path::new(BPFFS_ROOT));

    let report: Vec<String> = timings.iter().map(|t| format!("{} {}", t.name, fmt_duration(t.took))).collect();
    step!("test", "timings: {}", report.join(", "));
    step!("test", "total {}", fmt_duration(start.elapsed()));
    let (passed, mut failed, ignored) = (outcome.counts.passed, outcome.counts.failed, outcome.counts.ignored);
    if !outcome.success {
        // A test binary that crashed, or a build error, leaves no `N failed` behind:
        // count it so the closing line never reads "0 failed" for a failed run.
        let unexplained = outcome.failed_binaries.saturating_sub(outcome.counts.failed_results);
        let extra = if failed == 0 { unexplained.max(1) } else { unexplained };
        if extra > 0 {
            step!("test", "cargo test failed outside a test's own result: counting {extra} more failure(s), see above");
            failed += extra as u64;
        }
    }
    if outcome.counts.results == 0 && outcome.success {
        step!("test", "WARNING: cargo test ran no test binary");
    }
    if ignored > 0 {
        println!("{passed} passed, {failed} failed, {ignored} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    Ok(if outcome.success && failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Prints why we stopped and returns failure.
fn failed(why: &str, start: Instant) -> Result<ExitCode> {
    step!("test", "FAILED after {}: {why}", fmt_duration(start.elapsed()));
    Ok(ExitCode::FAILURE)
}

/// The environment every cargo step runs in.
#[derive(Debug)]
struct TestEnv {
    /// `PATH` with bpf-linker in front.
    path: OsString,
    /// For the store tests.
    postgres_url: String,
    /// For the Kubernetes tests.
    kube_apiserver: PathBuf,
    /// For the browser tests.
    browser: crate::browser::Browser,
    root: PathBuf,
}

impl TestEnv {
    fn prepare<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.current_dir(&self.root)
            .env("PATH", &self.path)
            .env(postgres::URL_ENV, &self.postgres_url)
            .env(crate::kube::APISERVER_ENV, &self.kube_apiserver)
            .env(crate::browser::BROWSER_DIR_ENV, &self.browser.dir)
            .env(crate::browser::CHROMIUM_ENV, &self.browser.chromium)
            .stdin(Stdio::null());
        if std::env::var_os("CI").is_some() {
            // A clean clone builds once: incremental state would only double the
            // target directory's size on a disk that has run out before.
            cmd.env("CARGO_INCREMENTAL", "0");
        }
        cmd
    }

    /// Prints and runs a step with inherited output; fails on a non-zero exit.
    fn run_step(&self, cmd: &mut Command) -> Result<()> {
        self.prepare(cmd);
        let shown = show_without_secrets(cmd);
        step!("test", "{shown}");
        let status = cmd.status().with_context(|| format!("cannot start `{shown}`"))?;
        if !status.success() {
            bail!("`{shown}` failed ({status})");
        }
        Ok(())
    }

    /// Runs `cargo test`, echoing its output while counting results.
    fn run_tests(&self, cmd: &mut Command) -> Result<TestOutcome> {
        self.prepare(cmd).stdout(Stdio::piped()).stderr(Stdio::piped());
        let shown = show_without_secrets(cmd);
        step!("test", "{shown}");
        let mut child = cmd.spawn().with_context(|| format!("cannot start `{shown}`"))?;
        let stdout = child.stdout.take().context("cargo test stdout")?;
        let stderr = child.stderr.take().context("cargo test stderr")?;
        let (counts, failed_binaries) = std::thread::scope(|s| {
            let err = s.spawn(|| tee(stderr, std::io::stderr(), count_failed_binary));
            let mut counts = Counts::default();
            let out = tee(stdout, std::io::stdout(), |line| counts.add_line(line));
            let failed_binaries = err.join().unwrap_or(Ok(0));
            out.map(|_| ()).and(failed_binaries.map(|n| (counts, n)))
        })
        .context("reading cargo test's output")?;
        let status = child.wait().context("waiting for cargo test")?;
        Ok(TestOutcome { success: status.success(), counts, failed_binaries })
    }
}

/// The command line with the database password hidden.
fn show_without_secrets(cmd: &Command) -> String {
    let mut s = show(cmd);
    for (k, v) in cmd.get_envs() {
        if k == postgres::URL_ENV
            && let Some(v) = v
        {
            s = s.replace(&*v.to_string_lossy(), "<url>");
        }
    }
    s
}

/// Copies `input` to `output` line by line (as it arrives), calling `on_line` for each;
/// returns how many lines `on_line` counted.
fn tee(input: impl Read, mut output: impl Write, mut on_line: impl FnMut(&str) -> usize) -> std::io::Result<usize> {
    let mut reader = BufReader::new(input);
    let mut line = Vec::new();
    let mut counted = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(counted);
        }
        output.write_all(&line)?;
        output.flush()?;
        counted += on_line(&String::from_utf8_lossy(&line));
    }
}

/// 1 for cargo's "a test binary failed" lines (`error: test failed, to rerun pass …`,
/// also for doctests and for binaries killed by a signal).
fn count_failed_binary(line: &str) -> usize {
    usize::from(line.starts_with("error: test failed") || line.starts_with("error: doctest failed"))
}

#[derive(Debug)]
struct TestOutcome {
    success: bool,
    counts: Counts,
    /// How many test binaries cargo reported as failed.
    failed_binaries: usize,
}

/// Totals over every `test result:` line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// `test result:` lines seen.
    results: usize,
    /// … of which said FAILED.
    failed_results: usize,
}

impl Counts {
    /// Adds `test result: ok. 18 passed; 0 failed; 3 ignored; 0 measured; …`; returns 1
    /// if the line was such a line.
    fn add_line(&mut self, line: &str) -> usize {
        let Some(rest) = line.trim().strip_prefix("test result: ") else { return 0 };
        let Some((verdict, fields)) = rest.split_once(". ") else { return 0 };
        for field in fields.split(';') {
            let mut words = field.split_whitespace();
            let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) else {
                continue;
            };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
        self.results += 1;
        if verdict != "ok" {
            self.failed_results += 1;
        }
        1
    }
}

/// Workspace members whose package name ends in `-ebpf`.
fn ebpf_crates(root: &Path) -> Result<Vec<String>> {
    let json = capture(cargo().current_dir(root).args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let meta: Value = serde_json::from_str(&json).context("parsing `cargo metadata`")?;
    let mut names: Vec<String> = meta
        .get("packages")
        .and_then(Value::as_array)
        .context("`cargo metadata` has no packages")?
        .iter()
        .filter_map(|p| p.get("name").and_then(Value::as_str))
        .filter(|n| n.ends_with("-ebpf"))
        .map(str::to_owned)
        .collect();
    names.sort();
    Ok(names)
}

// === stale fixtures ===

/// The pid in a testkit name suffix (`bh-<prefix>-<suffix>`, suffix = 5 base-36 digits
/// of pid, counter, 2 random digits); mirrors `bulkhead_testkit::netns::suffix_pid`.
fn fixture_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("bh-")?;
    suffix_pid(rest.rsplit('-').next()?)
}

/// Where the enforcer's datapath tests pin their instances
/// (`bulkhead_enforcer::datapath::DEFAULT_BPFFS_ROOT`).
const BPFFS_ROOT: &str = "/sys/fs/bpf/bulkhead";

/// The pid in the name of a datapath test's pin directory: `test-<suffix>`, the suffix
/// a testkit `unique_suffix()` (enforcer/tests/datapath.rs).
fn bpffs_instance_pid(name: &str) -> Option<u32> {
    suffix_pid(name.strip_prefix("test-")?)
}

/// The pid in a testkit `unique_suffix()`; mirrors `bulkhead_testkit::netns::suffix_pid`.
fn suffix_pid(suffix: &str) -> Option<u32> {
    if suffix.len() < 8 || !suffix.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()) {
        return None;
    }
    u32::from_str_radix(&suffix[..5], 36).ok()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes testkit namespaces, cgroups and bpffs pins left behind by test processes that
/// are gone (killed, aborted): they would otherwise pile up across runs (pinned links
/// keep programs attached, pinned maps keep their memory). Fixtures of processes still
/// running (another engineer's tests) are left alone.
/// The whole build needs several GiB under `target/`; printing what is free up front
/// makes a later "No space left on device" from rustc self-explanatory.
fn report_free_disk(root: &Path) {
    const NEEDED_GIB: u64 = 12;
    let out = Command::new("df").args(["--output=avail", "-B1"]).arg(root).output();
    let avail = out
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().nth(1).and_then(|l| l.trim().parse::<u64>().ok()));
    match avail {
        Some(bytes) => {
            let gib = bytes / (1 << 30);
            step!("test", "disk: {gib} GiB free under {}", root.display());
            if gib < NEEDED_GIB {
                step!(
                    "test",
                    "WARNING: a full build and test run needs about {NEEDED_GIB} GiB; it may fail with ENOSPC"
                );
            }
        }
        None => step!("test", "disk: could not read free space under {}", root.display()),
    }
}

fn cleanup_stale_fixtures() -> Result<()> {
    let mut removed = 0;
    let list = capture(Command::new("ip").args(["netns", "list"]))?;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if let Some(pid) = fixture_pid(name)
            && !process_alive(pid)
        {
            let out = output(Command::new("ip").args(["netns", "del", name]))?;
            if out.status.success() {
                removed += 1;
            } else {
                step!("test", "could not remove stale netns {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
        }
    }
    for root in setup::cgroup2_mounts()? {
        let Ok(entries) = std::fs::read_dir(&root) else { continue };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = fixture_pid(&name)
                && !process_alive(pid)
                && std::fs::read_to_string(entry.path().join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
                && std::fs::remove_dir(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed += cleanup_stale_pins(Path::new(BPFFS_ROOT));
    remove_empty_pin_root(Path::new(BPFFS_ROOT));
    if removed > 0 {
        step!("test", "removed {removed} stale test namespaces/cgroups/bpffs pins of earlier runs");
    }
    Ok(())
}

/// Removes the tests' bpffs root once every test is done, if nothing is left in it:
/// each test removes its own instance, but none may remove the shared parent (another
/// test running in parallel may be creating its instance under it). Anything still in
/// it (a default instance, another run's pins) keeps it.
fn remove_empty_pin_root(root: &Path) {
    match std::fs::remove_dir(root) {
        Ok(()) => step!("test", "removed the empty bpffs root {}", root.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
            let left: Vec<String> = std::fs::read_dir(root)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                .unwrap_or_default();
            step!("test", "bpffs root {} kept: it holds {}", root.display(), left.join(", "));
        }
        Err(e) => step!("test", "could not remove the bpffs root {}: {e}", root.display()),
    }
}

/// Unpins (recursively) every `test-<suffix>` instance under `root` whose process is
/// gone; returns how many were removed. A missing root is nothing to clean.
fn cleanup_stale_pins(root: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else { return 0 };
    let mut removed = 0;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = bpffs_instance_pid(&name) else { continue };
        if process_alive(pid) {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => step!("test", "could not remove stale bpffs pins {}: {e}", entry.path().display()),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_test_result_lines() {
        let mut c = Counts::default();
        assert_eq!(
            c.add_line(
                "test result: ok. 18 passed; 0 failed; 3 ignored; 0 measured; 0 filtered out; finished in 0.22s\n"
            ),
            1
        );
        assert_eq!(
            c.add_line(
                "test result: FAILED. 17 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.00s"
            ),
            1
        );
        assert_eq!(c.add_line("test foo ... ok"), 0);
        assert_eq!(c.add_line("running 3 tests"), 0);
        assert_eq!(c, Counts { passed: 35, failed: 2, ignored: 3, results: 2, failed_results: 1 });
    }

    #[test]
    fn counts_failed_binaries() {
        assert_eq!(count_failed_binary("error: test failed, to rerun pass `-p x --lib`\n"), 1);
        assert_eq!(count_failed_binary("error: doctest failed, to rerun pass `-p x --doc`"), 1);
        assert_eq!(count_failed_binary("error: could not compile `x`"), 0);
    }

    #[test]
    fn tee_copies_everything() {
        let mut out = Vec::new();
        let n = tee(&b"a\nerror: test failed\nb"[..], &mut out, count_failed_binary).expect("tee");
        assert_eq!(n, 1);
        assert_eq!(out, b"a\nerror: test failed\nb");
    }

    #[test]
    fn fixture_pids() {
        assert_eq!(fixture_pid("bh-h0-2hwcg0ab"), Some(4_194_304));
        assert_eq!(fixture_pid("bh-sw-000rs1xy"), Some(27 * 36 + 28));
        assert_eq!(fixture_pid("bh-00ab1c2d3"), Some(u32::from_str_radix("00ab1", 36).expect("base36")));
        assert_eq!(fixture_pid("other-00ab1c2d3"), None);
        assert_eq!(fixture_pid("bh-x-short"), None);
    }

    #[test]
    fn bpffs_instance_pids() {
        assert_eq!(bpffs_instance_pid("test-2hwcg0ab"), Some(4_194_304));
        assert_eq!(bpffs_instance_pid("test-000rs1xy"), Some(27 * 36 + 28));
        // Production instances and other names are never touched.
        assert_eq!(bpffs_instance_pid("default"), None);
        assert_eq!(bpffs_instance_pid("node-000rs1xy"), None);
        assert_eq!(bpffs_instance_pid("test-short"), None);
        assert_eq!(bpffs_instance_pid("test-000RS1XY"), None);
        assert_eq!(bpffs_instance_pid("test-"), None);
    }

    #[test]
    fn stale_pins_of_dead_processes_are_removed() {
        let dir = std::env::temp_dir().join(format!("bulkhead-xtask-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("mkdir");
        struct Cleanup<'a>(&'a Path);
        impl Drop for Cleanup<'_> {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(self.0);
            }
        }
        let root = Cleanup(&dir);
        // pid 4_194_304 is above the kernel's PID_MAX_LIMIT: never alive.
        let dead = root.0.join("test-2hwcg0ab");
        std::fs::create_dir_all(dead.join("sub")).expect("mkdir");
        std::fs::write(dead.join("POLICY_V1"), b"").expect("pin");
        let alive = root.0.join(format!("test-{}", base36_suffix(std::process::id())));
        std::fs::create_dir(&alive).expect("mkdir");
        let other = root.0.join("default");
        std::fs::create_dir(&other).expect("mkdir");
        assert_eq!(cleanup_stale_pins(root.0), 1);
        assert!(!dead.exists() && alive.exists() && other.exists());
        assert_eq!(cleanup_stale_pins(&root.0.join("missing")), 0);

        // The root goes only once nothing is left in it.
        remove_empty_pin_root(root.0);
        assert!(root.0.exists(), "a root holding instances was removed");
        for left in [&alive, &other] {
            std::fs::remove_dir(left).expect("rmdir");
        }
        remove_empty_pin_root(root.0);
        assert!(!root.0.exists(), "the empty root was kept");
        remove_empty_pin_root(root.0);
    }

    /// A `unique_suffix()`-shaped name part for `pid`.
    fn base36_suffix(mut pid: u32) -> String {
        let mut digits = [b'0'; 5];
        for d in digits.iter_mut().rev() {
            *d = b"0123456789abcdefghijklmnopqrstuvwxyz"[(pid % 36) as usize];
            pid /= 36;
        }
        format!("{}0ab", String::from_utf8_lossy(&digits))
    }

    #[test]
    fn secrets_are_hidden() {
        let mut cmd = Command::new("cargo");
        cmd.env(postgres::URL_ENV, "postgres://u:secret@127.0.0.1:5432/postgres").arg("test");
        let shown = show_without_secrets(&cmd);
        assert!(!shown.contains("secret"), "{shown}");
    }
}
