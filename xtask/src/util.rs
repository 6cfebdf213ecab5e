//! Small helpers: running commands with a printed command line, the repository root,
//! root checks, cache locations.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The workspace root (the directory above `xtask/`).
pub fn repo_root() -> Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().context("xtask's manifest dir has no parent")?;
    Ok(root.to_path_buf())
}

/// `$XDG_CACHE_HOME/bulkhead` or `$HOME/.cache/bulkhead`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("bulkhead"));
    }
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache").join("bulkhead"))
}

/// Fails unless the process runs as root (uid 0).
pub fn require_root(what: &str) -> Result<()> {
    let uid = std::fs::metadata("/proc/self").context("stat /proc/self")?.uid();
    if uid != 0 {
        bail!(
            "`cargo xtask {what}` must run as root (uid {uid} now): it installs packages, mounts bpffs and runs \
             the privileged eBPF/netns/cgroup tests, which fail rather than skip without root"
        );
    }
    Ok(())
}

/// The cargo binary that runs us (`$CARGO`), or `cargo` from `PATH`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// A printable command line.
pub fn show(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            s.push_str(&format!("{}={} ", k.to_string_lossy(), shell_word(v)));
        }
    }
    s.push_str(&shell_word(cmd.get_program()));
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_word(arg));
    }
    s
}

fn shell_word(w: &OsStr) -> String {
    let w = w.to_string_lossy();
    if !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        w.into_owned()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}

/// Runs a command with inherited stdout/stderr (stdin closed) and fails on a non-zero
/// exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    if PROGRESS_TO_STDERR.load(Ordering::Relaxed) {
        cmd.stdout(std::io::stderr());
    }
    let status = cmd.stdin(Stdio::null()).status().with_context(|| format!("cannot start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs a command, capturing its output, and fails (quoting stderr) on a non-zero exit.
/// Returns stdout.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!("`{}` failed ({}): {}", show(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim_end());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", show(cmd)))
}

/// Runs a command with captured output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{}`", show(cmd)))
}

/// `1m02s`, `12.3s`.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 { format!("{secs:.1}s") } else { format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60) }
}

/// When set, progress (step lines and child commands' stdout) goes to stderr, keeping
/// stdout for machine-readable output (`cargo xtask env`).
pub static PROGRESS_TO_STDERR: AtomicBool = AtomicBool::new(false);

/// Prints a step header: `[setup] message`.
#[macro_export]
macro_rules! step {
    ($cmd:literal, $($arg:tt)+) => {
        if $crate::util::PROGRESS_TO_STDERR.load(::std::sync::atomic::Ordering::Relaxed) {
            eprintln!("[{}] {}", $cmd, format_args!($($arg)+))
        } else {
            println!("[{}] {}", $cmd, format_args!($($arg)+))
        }
    };
}

/// `n` random bytes from the kernel as lowercase hex.
pub fn random_hex(n: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).context("reading /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
