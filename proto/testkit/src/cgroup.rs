//! cgroup v2 fixtures: [`TestCgroup`], a uniquely named cgroup directory that is removed
//! on drop, for attaching `cgroup_skb` / `sock_addr` programs and for putting test
//! processes under them.
//!
//! The cgroup2 hierarchy is found in `/proc/self/mountinfo` (on these machines, hybrid
//! mode: `/sys/fs/cgroup/unified`). When no cgroup2 is mounted anywhere, one is mounted
//! on [`FALLBACK_CGROUP2_MOUNT`] (the same place `cargo xtask setup` uses).

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::netns::{NAME_PREFIX, require_root, unique_suffix};

/// Where a cgroup2 hierarchy is mounted when the machine has none mounted.
pub const FALLBACK_CGROUP2_MOUNT: &str = "/run/bulkhead/cgroup2";

/// How long drop waits for the cgroup to empty (exiting processes) before giving up.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(5);

/// The mount point of the cgroup2 hierarchy, mounting one if there is none.
///
/// Panics without root or when nothing can be mounted.
pub fn cgroup2_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(path) = find_cgroup2_mount() {
            return path;
        }
        require_root();
        let target = Path::new(FALLBACK_CGROUP2_MOUNT);
        std::fs::create_dir_all(target).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", target.display()));
        let mounted =
            nix::mount::mount(Some("cgroup2"), target, Some("cgroup2"), nix::mount::MsFlags::empty(), None::<&str>);
        // Another process may have mounted it concurrently: look again before failing.
        match (mounted, find_cgroup2_mount()) {
            (_, Some(path)) => path,
            (Err(e), None) => {
                panic!("no cgroup2 mounted and `mount -t cgroup2 cgroup2 {}` failed: {e}", target.display())
            }
            (Ok(()), None) => panic!("mounted cgroup2 on {} but it is not in /proc/self/mountinfo", target.display()),
        }
    })
}

/// The first cgroup2 mount point in `/proc/self/mountinfo`, preferring the usual places.
fn find_cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mounts: Vec<PathBuf> = info.lines().filter_map(parse_cgroup2_mountinfo_line).collect();
    for preferred in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if let Some(p) = mounts.iter().find(|p| p.as_os_str() == preferred) {
            return Some(p.clone());
        }
    }
    mounts.into_iter().next()
}

/// The mount point of one mountinfo line if its filesystem is cgroup2 and it shows the
/// hierarchy's root.
///
/// Format (proc(5)): `id parent maj:min root mountpoint options [optional…] - fstype
/// source superoptions`; paths escape space, tab, newline and backslash as `\ooo`.
fn parse_cgroup2_mountinfo_line(line: &str) -> Option<PathBuf> {
    let (left, right) = line.split_once(" - ")?;
    if right.split(' ').next()? != "cgroup2" {
        return None;
    }
    let mut fields = left.split(' ');
    let root = fields.nth(3)?;
    let mount_point = fields.next()?;
    (root == "/").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
}

/// Undoes mountinfo's octal escapes (`\040` → space).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = s.get(i + 1..i + 4).filter(|o| o.bytes().all(|b| (b'0'..=b'7').contains(&b)));
        if bytes[i] == b'\\'
            && let Some(octal) = octal
            && let Ok(b) = u8::from_str_radix(octal, 8)
        {
            out.push(b);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// === impl TestCgroup ===

/// A cgroup v2 directory `<cgroup2 root>/bh-<suffix>`, removed on drop (remaining
/// processes are first moved to the parent cgroup).
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates a fresh, empty cgroup. Panics without root.
    pub fn new() -> TestCgroup {
        require_root();
        let path = cgroup2_root().join(format!("{NAME_PREFIX}-{}", unique_suffix()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        TestCgroup { path }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id: the directory's inode number, which is what
    /// `bpf_get_current_cgroup_id()` returns for processes in this cgroup.
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display())).ino()
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    ///
    /// Never pass the test process's own pid: it would move the whole test harness.
    pub fn add_pid(&self, pid: u32) {
        let procs = self.path.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("move pid {pid} into {}: {e}", self.path.display()));
    }

    /// The pids currently in this cgroup.
    pub fn pids(&self) -> Vec<u32> {
        read_pids(&self.path.join("cgroup.procs"))
    }

    /// A command that runs `program` inside this cgroup from its first instruction: it
    /// starts `sh`, which moves itself into the cgroup and then `exec`s `program`, so
    /// there is no window in which the program runs outside. Add arguments with
    /// `.arg(…)`; combine with [`Netns::spawn`](crate::netns::Netns::spawn) to also place
    /// it in a network namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(r#"echo $$ > "$0" && exec "$@""#).arg(self.path.join("cgroup.procs")).arg(program);
        cmd
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        TestCgroup::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Never panic here: this often runs while a failing test unwinds.
        let parent_procs = self.path.parent().map(|p| p.join("cgroup.procs"));
        let start = Instant::now();
        loop {
            if let Some(parent_procs) = &parent_procs {
                for pid in self.pids() {
                    // ESRCH: it exited meanwhile. Anything else shows up in rmdir below.
                    let _ = std::fs::write(parent_procs, pid.to_string());
                }
            }
            match std::fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(e) if start.elapsed() < RMDIR_TIMEOUT => {
                    // EBUSY while exiting tasks leave the cgroup.
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => {
                    eprintln!("testkit: rmdir {} failed after {:?}: {e}", self.path.display(), start.elapsed());
                    return;
                }
            }
        }
    }
}

/// Parses a `cgroup.procs` file; an unreadable file reads as empty.
fn read_pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let unified = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(parse_cgroup2_mountinfo_line(unified), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let v1 = "33 31 0:30 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu";
        assert_eq!(parse_cgroup2_mountinfo_line(v1), None);
        let nested = "50 31 0:38 /sub /mnt/cg rw - cgroup2 cgroup2 rw";
        assert_eq!(parse_cgroup2_mountinfo_line(nested), None);
        let spaced = r"51 31 0:38 / /mnt/my\040cg rw shared:1 master:2 - cgroup2 none rw";
        assert_eq!(parse_cgroup2_mountinfo_line(spaced), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn unescapes_only_valid_octal() {
        assert_eq!(unescape_mountinfo(r"a\040b\134c"), r"a b\c");
        assert_eq!(unescape_mountinfo(r"trailing\04"), r"trailing\04");
        assert_eq!(unescape_mountinfo(r"x\9zz"), r"x\9zz");
    }

    #[test]
    fn cgroup_holds_a_process_and_is_removed_on_drop() {
        require_root();
        let cg = TestCgroup::new();
        let path = cg.path().to_owned();
        assert!(path.is_dir());
        assert_eq!(cg.id(), std::fs::metadata(&path).expect("stat").ino());
        assert!(cg.pids().is_empty());

        let mut sleeper = crate::netns::ChildGuard::new(Command::new("sleep").arg("60").spawn().expect("spawn sleep"));
        cg.add_pid(sleeper.id());
        assert_eq!(cg.pids(), vec![sleeper.id()]);
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", sleeper.id())).expect("read /proc/PID/cgroup");
        let name = path.file_name().expect("has a name").to_string_lossy().into_owned();
        assert!(own.lines().any(|l| l.starts_with("0::") && l.ends_with(&name)), "{own}");

        // Drop with the process still inside: it moves to the parent, the dir goes.
        drop(cg);
        assert!(!path.exists(), "{} still exists", path.display());
        assert!(sleeper.try_wait().expect("try_wait").is_none(), "the process must survive the cgroup");
    }

    #[test]
    fn command_starts_inside_the_cgroup() {
        require_root();
        let cg = TestCgroup::new();
        let out = cg.command("cat").arg("/proc/self/cgroup").output().expect("run cat");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let name = cg.path().file_name().expect("has a name").to_string_lossy().into_owned();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.lines().any(|l| l.starts_with("0::") && l.ends_with(&name)), "{text}");
    }

    #[test]
    fn ids_are_distinct() {
        require_root();
        let (a, b) = (TestCgroup::new(), TestCgroup::new());
        assert_ne!(a.id(), b.id());
        assert_ne!(a.path(), b.path());
    }
}

// === impl SubCgroup ===

/// A cgroup created below another one (typically a [`TestCgroup`]), removed on drop
/// once its processes are gone: a workload's own cgroup under the one a test attaches
/// its programs to.
#[derive(Debug)]
pub struct SubCgroup {
    path: PathBuf,
}

impl SubCgroup {
    /// Creates `<parent>/<name>`. Panics if it cannot.
    pub fn new(parent: &Path, name: &str) -> SubCgroup {
        let path = parent.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        SubCgroup { path }
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id (the directory's inode number, as for [`TestCgroup::id`]).
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap_or_else(|e| panic!("stat {}: {e}", self.path.display())).ino()
    }

    /// The path below the cgroup2 root, as `/proc/<pid>/cgroup` shows it.
    pub fn rel_path(&self) -> String {
        let rel = self.path.strip_prefix(cgroup2_root()).expect("below the cgroup2 root");
        format!("/{}", rel.display())
    }

    /// `program` started inside this cgroup (see [`TestCgroup::command`]).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(r#"echo $$ > "$0" && exec "$@""#).arg(self.path.join("cgroup.procs")).arg(program);
        cmd
    }
}

impl Drop for SubCgroup {
    /// Retries for a while: the cgroup stays busy until its last process has been
    /// reaped, which may be just after the test dropped its child handles.
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = std::fs::remove_dir(&self.path) {
            if e.kind() == std::io::ErrorKind::NotFound || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
