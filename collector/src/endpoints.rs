//! Endpoint facts: network namespaces, their addresses and cgroups.
//!
//! The learner builds its ipcache (address → identity) and its cgroup → workload
//! map from these, so the scan must find *every* namespace on the node: named ones
//! (`ip netns add`, bind-mounted under `/var/run/netns`) and anonymous ones that
//! only exist because a process lives in them (containers, pods). Namespaces are
//! identified by their nsfs inode — the same number the eBPF programs report.
//!
//! Interface addresses are read *inside* each namespace (glibc `getifaddrs`, which
//! dumps RTM_GETLINK/RTM_GETADDR over rtnetlink) on a short-lived thread that
//! `setns`es into it: network-namespace membership is per thread, so the caller's
//! thread (and the tokio runtime around it) never changes namespace.
//!
//! Loopback addresses and link-local addresses are left out: every namespace has
//! the same ones, so they cannot tell the learner who a peer is.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use bulkhead_model::{CgroupFact, EndpointFact, InterfaceAddress};
use nix::net::if_::InterfaceFlags;

const NAMED_NETNS_DIR: &str = "/var/run/netns";
/// `PF_KTHREAD` in `/proc/PID/stat`'s flags: kernel threads have no workload.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Why a scan failed as a whole. Namespaces that vanish mid-scan (their last
/// process exited) are skipped, not errors.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    EnterNetns {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listing interface addresses in network namespace {netns_ino}: {source}")]
    Interfaces {
        netns_ino: u64,
        #[source]
        source: io::Error,
    },
    #[error("the thread working inside network namespace {path} panicked")]
    ThreadPanicked { path: PathBuf },
}

impl EndpointError {
    /// The namespace went away between listing and entering it: its process
    /// exited (`ENOENT`/`ESRCH` under `/proc`) or its bind mount was removed (the
    /// leftover file is not a namespace: `EINVAL` from setns). Not an error for a
    /// scan of a node where workloads come and go.
    pub(crate) fn is_vanished(&self) -> bool {
        match self {
            EndpointError::EnterNetns { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || matches!(source.raw_os_error(), Some(libc::ESRCH | libc::EINVAL | libc::ENOENT))
            }
            _ => false,
        }
    }
}

/// A way into one network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NetnsHandle {
    pub ino: u64,
    /// A file to `open` + `setns` (a named netns or `/proc/PID/ns/net`).
    pub path: PathBuf,
    pub name: Option<String>,
}

/// One process, as far as endpoints care.
#[derive(Debug, Clone)]
struct Process {
    pid: u32,
    netns_ino: u64,
    cgroup_path: Option<String>,
    comm: String,
}

/// Inode of the node's initial network namespace (the one PID 1 lives in).
/// Falls back to our own namespace, then to 0, if `/proc` is unreadable.
pub fn host_netns_ino() -> u64 {
    ["/proc/1/ns/net", "/proc/self/ns/net"].iter().find_map(|p| std::fs::metadata(p).ok().map(|m| m.ino())).unwrap_or(0)
}

/// Every network namespace on the node with its addresses and cgroups, sorted by
/// inode (so two scans of an unchanged node compare equal).
pub fn scan() -> Result<Vec<EndpointFact>, EndpointError> {
    let host = host_netns_ino();
    let processes = processes()?;
    let handles = netns_handles_from(&processes)?;
    let cgroup_root = cgroup2_mount();

    // netns → cgroup path → comms
    let mut cgroups: BTreeMap<u64, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for p in &processes {
        if let Some(path) = &p.cgroup_path {
            cgroups.entry(p.netns_ino).or_default().entry(path.clone()).or_default().insert(p.comm.clone());
        }
    }

    let mut facts = Vec::with_capacity(handles.len());
    for handle in handles.values() {
        let addresses = match in_netns(&handle.path, interface_addresses) {
            Ok(Ok(addresses)) => addresses,
            Ok(Err(source)) => return Err(EndpointError::Interfaces { netns_ino: handle.ino, source }),
            // Its last process exited, or `ip netns del` ran, while we scanned.
            Err(err) if err.is_vanished() => {
                tracing::debug!(netns = handle.ino, path = %handle.path.display(), "Network namespace vanished during the scan.");
                continue;
            }
            Err(err) => return Err(err),
        };
        let cgroups = cgroups
            .remove(&handle.ino)
            .unwrap_or_default()
            .into_iter()
            .map(|(path, comms)| CgroupFact {
                cgroup_id: cgroup_root.as_deref().map_or(0, |root| cgroup_id(root, &path)),
                path,
                comms: comms.into_iter().collect(),
            })
            .collect();
        facts.push(EndpointFact {
            netns_ino: handle.ino,
            netns_name: handle.name.clone(),
            addresses,
            cgroups,
            host: handle.ino == host,
        });
    }
    Ok(facts)
}

/// Every network namespace we can enter, by inode. Named namespaces win over
/// `/proc/PID/ns/net` because their path cannot disappear with a process.
pub(crate) fn netns_handles() -> Result<BTreeMap<u64, NetnsHandle>, EndpointError> {
    netns_handles_from(&processes()?)
}

fn netns_handles_from(processes: &[Process]) -> Result<BTreeMap<u64, NetnsHandle>, EndpointError> {
    let mut handles = BTreeMap::new();
    for p in processes {
        handles.entry(p.netns_ino).or_insert_with(|| NetnsHandle {
            ino: p.netns_ino,
            path: PathBuf::from(format!("/proc/{}/ns/net", p.pid)),
            name: None,
        });
    }
    // A named netns is a bind mount of an nsfs inode: same device as ours. A file
    // left behind without its mount is skipped.
    let nsfs_dev = std::fs::metadata("/proc/self/ns/net").map(|m| m.dev()).ok();
    match std::fs::read_dir(NAMED_NETNS_DIR) {
        Ok(dir) => {
            for entry in dir.flatten() {
                let path = entry.path();
                let Ok(meta) = std::fs::metadata(&path) else { continue };
                if Some(meta.dev()) != nsfs_dev {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                handles.insert(meta.ino(), NetnsHandle { ino: meta.ino(), path, name: Some(name) });
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(EndpointError::Read { path: NAMED_NETNS_DIR.into(), source }),
    }
    Ok(handles)
}

/// Every user-space process with its netns, cgroup v2 path and comm. Processes
/// that exit while we read them are skipped.
fn processes() -> Result<Vec<Process>, EndpointError> {
    let dir = std::fs::read_dir("/proc").map_err(|source| EndpointError::Read { path: "/proc".into(), source })?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let base = entry.path();
        if is_kernel_thread(&base) {
            continue;
        }
        let Ok(ns) = std::fs::metadata(base.join("ns/net")) else { continue };
        let comm = std::fs::read_to_string(base.join("comm")).map(|c| c.trim_end().to_owned()).unwrap_or_default();
        let cgroup_path = std::fs::read_to_string(base.join("cgroup")).ok().and_then(|c| parse_cgroup_v2(&c));
        out.push(Process { pid, netns_ino: ns.ino(), cgroup_path, comm });
    }
    Ok(out)
}

fn is_kernel_thread(proc_dir: &Path) -> bool {
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else { return false };
    // The comm field may contain spaces and parens: fields start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return false };
    // After ')': state ppid pgrp session tty_nr tpgid flags → flags is the 7th.
    rest.split_whitespace().nth(6).and_then(|f| f.parse::<u64>().ok()).is_some_and(|flags| flags & PF_KTHREAD != 0)
}

/// The path from the `0::PATH` line of `/proc/PID/cgroup` (cgroup v2).
pub(crate) fn parse_cgroup_v2(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().to_owned()).filter(|p| p.starts_with('/'))
}

/// cgroup id = inode of the cgroup's directory in the cgroup2 mount (what
/// `bpf_get_current_cgroup_id` returns). 0 if it has gone away.
fn cgroup_id(root: &Path, path: &str) -> u64 {
    std::fs::metadata(root.join(path.trim_start_matches('/'))).map(|m| m.ino()).unwrap_or(0)
}

/// The mount point of the cgroup v2 hierarchy's root, if mounted
/// (`/sys/fs/cgroup/unified` in hybrid mode, `/sys/fs/cgroup` in unified mode).
pub(crate) fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_mount(&text)
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // id parent major:minor root mount-point options [optional…] - fstype source super-options
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let mut fields = pre.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        // Only a mount of the hierarchy's root: a bind mount of a sub-cgroup would
        // attach our programs to a subtree.
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(digits) = bytes.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `f` on a fresh thread inside the network namespace at `path`.
///
/// The namespace file is opened on the caller's thread, so a vanished namespace
/// is reported before any thread is spawned.
pub(crate) fn in_netns<T, F>(path: &Path, f: F) -> Result<T, EndpointError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let enter_err = |source: io::Error| EndpointError::EnterNetns { path: path.to_owned(), source };
    let file = File::open(path).map_err(enter_err)?;
    let handle = std::thread::Builder::new()
        .name("bh-netns".into())
        .spawn(move || -> Result<T, io::Error> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            Ok(f())
        })
        .map_err(enter_err)?;
    match handle.join() {
        Ok(result) => result.map_err(enter_err),
        Err(_) => Err(EndpointError::ThreadPanicked { path: path.to_owned() }),
    }
}

/// Addresses of the current thread's network namespace.
fn interface_addresses() -> Result<Vec<InterfaceAddress>, io::Error> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK) {
            continue;
        }
        let (Some(address), Some(netmask)) = (ifa.address, ifa.netmask) else { continue };
        let (addr, prefix_len) = if let (Some(a), Some(m)) = (address.as_sockaddr_in(), netmask.as_sockaddr_in()) {
            (IpAddr::V4(a.ip()), m.ip().to_bits().count_ones() as u8)
        } else if let (Some(a), Some(m)) = (address.as_sockaddr_in6(), netmask.as_sockaddr_in6()) {
            (IpAddr::V6(a.ip()), m.ip().to_bits().count_ones() as u8)
        } else {
            continue;
        };
        if is_link_local(addr) {
            continue;
        }
        out.push(InterfaceAddress { interface: ifa.interface_name, addr, prefix_len });
    }
    out.sort_by(|a, b| (&a.interface, a.addr).cmp(&(&b.interface, b.addr)));
    out.dedup();
    Ok(out)
}

fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_v2_line() {
        let text = "12:pids:/user.slice\n1:name=systemd:/init.scope\n0::/system.slice/ssh.service\n";
        assert_eq!(parse_cgroup_v2(text).as_deref(), Some("/system.slice/ssh.service"));
        assert_eq!(parse_cgroup_v2("3:cpu:/\n"), None);
        assert_eq!(parse_cgroup_v2("0::\n"), None);
    }

    #[test]
    fn cgroup2_mount_from_mountinfo() {
        let mi = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
41 30 0:35 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
42 30 0:36 /sub /mnt/bind rw - cgroup2 cgroup2 rw
";
        assert_eq!(parse_cgroup2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let only_sub = "42 30 0:36 /sub /mnt/bind rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(only_sub), None);
        let escaped = "41 30 0:35 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(escaped), Some(PathBuf::from("/mnt/with space")));
        assert_eq!(parse_cgroup2_mount("garbage\n\n - \n"), None);
    }

    #[test]
    fn kernel_thread_flag() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("stat"), "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0").expect("write");
        assert!(is_kernel_thread(dir.path()));
        std::fs::write(dir.path().join("stat"), "77 (my (odd) name) S 1 77 77 0 -1 4194560 0").expect("write");
        assert!(!is_kernel_thread(dir.path()));
    }

    #[test]
    fn link_local() {
        assert!(is_link_local("fe80::1".parse().expect("ip")));
        assert!(is_link_local("169.254.1.1".parse().expect("ip")));
        assert!(!is_link_local("fd00::1".parse().expect("ip")));
        assert!(!is_link_local("10.0.0.1".parse().expect("ip")));
    }
}
