//! The tc variant of the datapath, for workloads that are bare network
//! namespaces (`ip netns add x` plus a veth; their processes may live in any
//! cgroup, so cgroup_skb cannot tell them apart).
//!
//! # Shape
//!
//! * The same verdict code as the cgroup_skb programs, compiled as two sched_cls
//!   programs (`enforce_tc_in`, `enforce_tc_out`), attached with TCX links on
//!   every non-loopback interface **inside** the workload's namespace: tc ingress
//!   there is the workload's ingress, exactly as with cgroup_skb, and it works
//!   for any link type (a veth whose peer is in another namespace, macvlan,
//!   ipvlan, an L3 device).
//! * They share every map with the cgroup_skb programs (the instance's pins), so
//!   one [`MapState`](crate::MapState) drives both kinds of workload. A namespace
//!   is keyed in `ENDPOINTS_V2` by [`abi::tc_endpoint_key`]`(netns cookie)`
//!   ([`ResolvedNetns::endpoint_key`]), which can never equal a cgroup id.
//! * **One program copy per namespace**: the key is baked into the copy's
//!   read-only data at load time (`TC_ENDPOINT_KEY`). The obvious alternative,
//!   `bpf_get_netns_cookie(skb)` in the program, does not work: for tc it
//!   returns the namespace of the packet's *socket*, and an arriving packet has
//!   none yet, so every namespace's ingress would report the initial namespace
//!   (kernel commit eb62f49de7ec, "bpf: add get_netns_cookie helper to tc
//!   programs"). Keying by ifindex does not work either: ifindexes are unique
//!   per namespace only (every `eth0` may be 2). The copy costs one verifier
//!   run per namespace, not per packet; per packet nothing changes.
//! * Links are pinned as `<pin dir>/tc_<cookie>_<ifindex>_{in,out}` (decimal),
//!   so they survive this process like the cgroup links. **Adoption** is
//!   hitless and never runs two copies: [`Datapath::attach_netns`] on a
//!   namespace whose links are pinned loads a fresh copy and swaps it into the
//!   existing link (`BPF_LINK_UPDATE`), the link itself never goes away.
//! * Verdicts pass as `TC_ACT_UNSPEC` (TCX "next"), so other programs on the
//!   interface still see allowed packets; drops are `TC_ACT_SHOT`. Our links are
//!   placed first, so a program that ends the chain early cannot bypass us.
//! * Without TCX (kernels before 6.6) the programs are attached through a clsact
//!   qdisc with netlink, at a fixed priority and handle (replaced in place by a
//!   later process). Such filters cannot be pinned; the program is pinned as
//!   `tcnl_<cookie>_<ifindex>_{in,out}` to record the attachment.
//!
//! # Limits
//!
//! * Interfaces added to a namespace after [`Datapath::attach_netns`] are not
//!   judged until it (or [`Datapath::sync_netns`]) runs again; the owner should
//!   re-sync on every policy change and periodically.
//! * tc sees IPv4 fragments before reassembly: a datagram is judged by its first
//!   fragment, later fragments pass (without the first they never reassemble).
//! * A workload that is both a managed cgroup and a managed namespace would be
//!   judged twice; the renderer gives tc keys only to endpoints without cgroups.
//! * Removing a namespace's endpoint entry is what stops enforcing it (its
//!   programs then pass everything as unmanaged); detaching is cleanup. Netlink
//!   filters of a namespace that is gone vanish with its interfaces; those of a
//!   namespace that still exists but left the policy stay attached (and inert)
//!   until [`Datapath::detach_netns`] is given the namespace.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfError, EbpfLoader};
use bulkhead_abi::enforcer as abi;
use nix::sched::{CloneFlags, setns};

use super::{Datapath, DatapathError, Direction, error_chain, object, pin_link_replacing};

/// Where `ip netns add` bind-mounts named namespaces (`/var/run` links here).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// `SO_NETNS_COOKIE` (Linux 5.14; asm-generic value, also x86, arm, riscv, mips).
/// Not exported by the libc crate for these targets.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The loopback interface's index in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

/// Priority of our filters when attached with netlink (no TCX): lowest number =
/// runs first, so nothing before us can end the chain.
const NETLINK_PRIORITY: u16 = 1;
/// Handle of our filters when attached with netlink; fixed so a later process
/// can replace them in place.
const NETLINK_HANDLE: TcHandle = TcHandle::new(0, 0xb1);

/// Prefix of TCX link pins; `tc_<cookie>_<ifindex>_{in,out}`.
const PIN_PREFIX_TCX: &str = "tc_";
/// Prefix of the program pins recording netlink attachments.
const PIN_PREFIX_NETLINK: &str = "tcnl_";

/// Everything that can go wrong resolving namespaces and attaching tc programs.
#[derive(Debug, thiserror::Error)]
pub enum TcError {
    #[error("network namespace name {name:?} is invalid: {reason}")]
    InvalidNetnsName { name: String, reason: &'static str },
    #[error("network namespace {path}: {source}")]
    NetnsOpen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network namespace {path} has inode {found}, the policy expects {expected} (it was replaced)")]
    NetnsMismatch { path: PathBuf, expected: u64, found: u64 },
    #[error("no network namespace with inode {ino} under {dir}")]
    NetnsNotFound { ino: u64, dir: &'static str },
    #[error("network namespace {path} has cookie {found}, expected {expected} (it was replaced)")]
    CookieMismatch { path: PathBuf, expected: u64, found: u64 },
    #[error("entering network namespace {path}: {source}")]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("listing the interfaces of network namespace {path}: {source}")]
    Interfaces {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working inside network namespace {path} panicked")]
    NetnsThread { path: PathBuf },
    #[error("loading the tc programs (verifier or pinned maps)")]
    Load(#[source] Box<EbpfError>),
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("attaching {name} to {ifname} in {path}: TCX failed ({tcx}), netlink failed ({netlink})")]
    Attach { name: &'static str, ifname: String, path: PathBuf, tcx: String, netlink: String },
    #[error("pin {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error(transparent)]
    Datapath(Box<DatapathError>),
}

impl From<DatapathError> for TcError {
    fn from(e: DatapathError) -> Self {
        TcError::Datapath(Box::new(e))
    }
}

/// A non-loopback interface of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NetnsInterface {
    pub ifindex: u32,
    pub name: String,
}

/// A workload's network namespace, found and looked into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedNetns {
    /// The nsfs file it was reached through (`/run/netns/NAME` or a path).
    pub path: PathBuf,
    /// Its inode (what `NodePolicy` endpoints carry as `netns_ino`).
    pub ino: u64,
    /// Its cookie: unique for the boot, never reused.
    pub cookie: u64,
    /// Its interfaces except loopback, by index.
    pub interfaces: Vec<NetnsInterface>,
}

impl ResolvedNetns {
    /// The namespace's key in `ENDPOINTS_V2` (what the tc programs judge as).
    pub fn endpoint_key(&self) -> u64 {
        abi::tc_endpoint_key(self.cookie)
    }
}

/// How a program is attached to one interface direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TcAttachKind {
    /// A pinned TCX link.
    Tcx,
    /// A clsact filter added with netlink (no TCX in this kernel).
    Netlink,
}

/// One attachment as recorded in the pin directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcAttachment {
    pub cookie: u64,
    pub ifindex: u32,
    pub direction: Direction,
    pub kind: TcAttachKind,
}

impl TcAttachment {
    fn pin_name(&self) -> String {
        let prefix = match self.kind {
            TcAttachKind::Tcx => PIN_PREFIX_TCX,
            TcAttachKind::Netlink => PIN_PREFIX_NETLINK,
        };
        let dir = match self.direction {
            Direction::Ingress => "in",
            Direction::Egress => "out",
        };
        format!("{prefix}{}_{}_{dir}", self.cookie, self.ifindex)
    }

    /// The attachment a pin name records, if it is one of ours.
    fn parse_pin_name(name: &str) -> Option<TcAttachment> {
        let (kind, rest) = if let Some(rest) = name.strip_prefix(PIN_PREFIX_NETLINK) {
            (TcAttachKind::Netlink, rest)
        } else {
            (TcAttachKind::Tcx, name.strip_prefix(PIN_PREFIX_TCX)?)
        };
        let mut parts = rest.split('_');
        let cookie = parts.next()?.parse().ok()?;
        let ifindex = parts.next()?.parse().ok()?;
        let direction = match parts.next()? {
            "in" => Direction::Ingress,
            "out" => Direction::Egress,
            _ => return None,
        };
        parts.next().is_none().then_some(TcAttachment { cookie, ifindex, direction, kind })
    }
}

/// What [`Datapath::sync_netns`] did.
#[derive(Debug, Default)]
pub struct TcSyncReport {
    /// Cookies of the namespaces whose programs are attached now.
    pub attached: Vec<u64>,
    /// Namespaces that could not be attached (their workloads are not judged).
    pub failed: Vec<(PathBuf, TcError)>,
    /// Attachments removed (namespaces gone or no longer wanted, interfaces gone).
    pub detached: usize,
}

// === resolving ===

/// The nsfs path of a policy's `netns_name`: a name under [`NETNS_RUN_DIR`], or
/// an absolute path (`/proc/PID/ns/net`, a container runtime's bind mount).
pub fn netns_path(name: &str) -> Result<PathBuf, TcError> {
    let invalid = |reason| TcError::InvalidNetnsName { name: name.to_owned(), reason };
    if name.starts_with('/') {
        if name.split('/').any(|c| c == "..") {
            return Err(invalid("a path must not contain '..'"));
        }
        return Ok(PathBuf::from(name));
    }
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(invalid("a name under /run/netns: non-empty, no '/', not '.' or '..'"));
    }
    Ok(Path::new(NETNS_RUN_DIR).join(name))
}

/// Finds a namespace by name (see [`netns_path`]) or, without a name, by inode
/// among the named ones; checks the inode when both are given; reads its cookie
/// and interfaces from inside it.
pub fn resolve_netns(name: Option<&str>, expected_ino: Option<u64>) -> Result<ResolvedNetns, TcError> {
    let path = match (name, expected_ino) {
        (Some(name), _) => netns_path(name)?,
        (None, Some(ino)) => find_netns_by_ino(ino)?,
        (None, None) => {
            return Err(TcError::InvalidNetnsName { name: String::new(), reason: "neither a name nor an inode" });
        }
    };
    let file = File::open(&path).map_err(|source| TcError::NetnsOpen { path: path.clone(), source })?;
    let ino = file.metadata().map_err(|source| TcError::NetnsOpen { path: path.clone(), source })?.ino();
    if let Some(expected) = expected_ino.filter(|e| *e != 0)
        && expected != ino
    {
        return Err(TcError::NetnsMismatch { path, expected, found: ino });
    }
    let (cookie, interfaces) = in_netns(&path, &file, || Ok((netns_cookie(&path)?, interfaces(&path)?)))?;
    Ok(ResolvedNetns { path, ino, cookie, interfaces })
}

fn find_netns_by_ino(ino: u64) -> Result<PathBuf, TcError> {
    let not_found = || TcError::NetnsNotFound { ino, dir: NETNS_RUN_DIR };
    let entries = std::fs::read_dir(NETNS_RUN_DIR).map_err(|_| not_found())?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == ino))
        .ok_or_else(not_found)
}

/// Runs `f` on a new thread inside the namespace `file` (the caller's thread
/// never changes namespace: setns(2) is per thread).
fn in_netns<R: Send>(path: &Path, file: &File, f: impl FnOnce() -> Result<R, TcError> + Send) -> Result<R, TcError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("bulkhead-netns".into())
            .spawn_scoped(scope, || {
                setns(file, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| TcError::Setns { path: path.to_owned(), source })?;
                f()
            })
            .map_err(|source| TcError::NetnsOpen { path: path.to_owned(), source })?;
        handle.join().unwrap_or_else(|_| Err(TcError::NetnsThread { path: path.to_owned() }))
    })
}

/// The cookie of the calling thread's namespace.
fn netns_cookie(path: &Path) -> Result<u64, TcError> {
    let err = |source| TcError::Cookie { path: path.to_owned(), source };
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let ret = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &raw mut len)
    };
    if ret != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// The calling thread's namespace's interfaces, loopback excluded.
fn interfaces(path: &Path) -> Result<Vec<NetnsInterface>, TcError> {
    let all = nix::net::if_::if_nameindex().map_err(|source| TcError::Interfaces { path: path.to_owned(), source })?;
    let mut out: Vec<NetnsInterface> = all
        .iter()
        .filter(|i| i.index() != LOOPBACK_IFINDEX)
        .map(|i| NetnsInterface { ifindex: i.index(), name: i.name().to_string_lossy().into_owned() })
        .collect();
    out.sort();
    Ok(out)
}

// === impl Datapath (tc) ===

impl Datapath {
    /// Attaches (or, when pinned by an earlier process, hitlessly replaces) the
    /// tc programs on every interface of `netns`, judging its packets as
    /// [`ResolvedNetns::endpoint_key`], and removes pins of its interfaces that
    /// are gone. The namespace is re-checked by cookie, so a name reused by a
    /// new namespace since resolving is refused. TCX, falling back to netlink
    /// when the kernel refuses TCX.
    pub fn attach_netns(&mut self, netns: &ResolvedNetns) -> Result<Vec<TcAttachment>, TcError> {
        self.attach_netns_with(netns, TcAttachKind::Tcx)
    }

    /// [`Datapath::attach_netns`] with the attachment kind to try first:
    /// [`TcAttachKind::Netlink`] skips TCX (for tooling that only knows
    /// `tc filter show`, and to exercise the pre-6.6 path on newer kernels).
    pub fn attach_netns_with(
        &mut self,
        netns: &ResolvedNetns,
        prefer: TcAttachKind,
    ) -> Result<Vec<TcAttachment>, TcError> {
        let file = File::open(&netns.path).map_err(|source| TcError::NetnsOpen { path: netns.path.clone(), source })?;
        let pin_dir = self.pin_dir().to_owned();
        let key = netns.endpoint_key();
        // Netlink filters of an earlier attachment, to remove where TCX takes over
        // (two copies would judge, and report, every packet twice).
        let netlink_before: BTreeSet<(u32, Direction)> = self
            .tc_attachments()?
            .into_iter()
            .filter(|a| a.cookie == netns.cookie && a.kind == TcAttachKind::Netlink)
            .map(|a| (a.ifindex, a.direction))
            .collect();
        let attached = in_netns(&netns.path, &file, || {
            let cookie = netns_cookie(&netns.path)?;
            if cookie != netns.cookie {
                return Err(TcError::CookieMismatch {
                    path: netns.path.clone(),
                    expected: netns.cookie,
                    found: cookie,
                });
            }
            // Interfaces as they are now, not as they were when resolved.
            let ifaces = interfaces(&netns.path)?;
            let mut ebpf = load_tc_copy(&pin_dir, key)?;
            let mut attached = Vec::new();
            for (name, direction, attach_type) in [
                (abi::PROG_TC_INGRESS, Direction::Ingress, TcAttachType::Ingress),
                (abi::PROG_TC_EGRESS, Direction::Egress, TcAttachType::Egress),
            ] {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or(TcError::MissingProgram { name })?
                    .try_into()
                    .map_err(|e| TcError::Program { name, source: Box::new(e) })?;
                super::load_retrying(|| prog.load()).map_err(|e| TcError::Program { name, source: Box::new(e) })?;
                for iface in &ifaces {
                    let kind = attach_one(prog, name, &pin_dir, netns, iface, (direction, attach_type), prefer)?;
                    if kind == TcAttachKind::Tcx && netlink_before.contains(&(iface.ifindex, direction)) {
                        detach_netlink(&iface.name, attach_type);
                    }
                    attached.push(TcAttachment { cookie: netns.cookie, ifindex: iface.ifindex, direction, kind });
                }
            }
            Ok(attached)
        })?;
        // Pins of this namespace's interfaces that are gone (their links were
        // detached by the kernel with the interface).
        let live: BTreeSet<(u32, Direction, TcAttachKind)> =
            attached.iter().map(|a| (a.ifindex, a.direction, a.kind)).collect();
        for stale in self.tc_attachments()? {
            if stale.cookie == netns.cookie && !live.contains(&(stale.ifindex, stale.direction, stale.kind)) {
                remove_pin(&pin_dir.join(stale.pin_name()))?;
            }
        }
        tracing::info!(
            netns = %netns.path.display(),
            cookie = netns.cookie,
            attachments = attached.len(),
            "Attached the tc enforcer."
        );
        Ok(attached)
    }

    /// Detaches everything of the namespace with `cookie` that is pinned here.
    /// TCX links go with their pins. Netlink filters are removed too when
    /// `netns` (the same namespace) is given and still exists; otherwise only
    /// their records go (see the module docs). Returns the attachments removed.
    pub fn detach_netns(&mut self, cookie: u64, netns: Option<&ResolvedNetns>) -> Result<usize, TcError> {
        let pin_dir = self.pin_dir().to_owned();
        let mine: Vec<TcAttachment> = self.tc_attachments()?.into_iter().filter(|a| a.cookie == cookie).collect();
        if let Some(ns) = netns.filter(|ns| ns.cookie == cookie)
            && mine.iter().any(|a| a.kind == TcAttachKind::Netlink)
            && let Ok(file) = File::open(&ns.path)
        {
            let netlink: Vec<&TcAttachment> = mine.iter().filter(|a| a.kind == TcAttachKind::Netlink).collect();
            let detached = in_netns(&ns.path, &file, || {
                if netns_cookie(&ns.path)? != cookie {
                    return Ok(());
                }
                let names: BTreeMap<u32, String> =
                    interfaces(&ns.path)?.into_iter().map(|i| (i.ifindex, i.name)).collect();
                for a in &netlink {
                    let Some(ifname) = names.get(&a.ifindex) else { continue };
                    let attach_type =
                        if a.direction == Direction::Ingress { TcAttachType::Ingress } else { TcAttachType::Egress };
                    detach_netlink(ifname, attach_type);
                }
                Ok(())
            });
            if let Err(e) = detached {
                tracing::debug!(error = %error_chain(&e), cookie, "Could not remove netlink tc filters.");
            }
        }
        for a in &mine {
            remove_pin(&pin_dir.join(a.pin_name()))?;
        }
        if !mine.is_empty() {
            tracing::info!(cookie, attachments = mine.len(), "Detached the tc enforcer.");
        }
        Ok(mine.len())
    }

    /// Makes the tc attachments match `wanted`: attaches (or refreshes) each
    /// namespace, then detaches every pinned namespace not among them (gone or
    /// no longer in the policy). One namespace failing does not stop the others.
    pub fn sync_netns(&mut self, wanted: &[ResolvedNetns]) -> Result<TcSyncReport, TcError> {
        let mut report = TcSyncReport::default();
        for ns in wanted {
            match self.attach_netns(ns) {
                Ok(_) => report.attached.push(ns.cookie),
                Err(e) => {
                    tracing::warn!(netns = %ns.path.display(), error = %error_chain(&e), "Could not attach the tc enforcer.");
                    report.failed.push((ns.path.clone(), e));
                }
            }
        }
        let keep: BTreeSet<u64> = wanted.iter().map(|ns| ns.cookie).collect();
        let stale: BTreeSet<u64> =
            self.tc_attachments()?.into_iter().map(|a| a.cookie).filter(|c| !keep.contains(c)).collect();
        for cookie in stale {
            report.detached += self.detach_netns(cookie, None)?;
        }
        Ok(report)
    }

    /// The tc attachments pinned in this instance's directory.
    pub fn tc_attachments(&self) -> Result<Vec<TcAttachment>, TcError> {
        let dir = self.pin_dir();
        let entries =
            std::fs::read_dir(dir).map_err(|e| TcError::Pin { path: dir.to_owned(), reason: e.to_string() })?;
        let mut out: Vec<TcAttachment> = entries
            .filter_map(Result::ok)
            .filter_map(|e| TcAttachment::parse_pin_name(&e.file_name().to_string_lossy()))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// One copy of the object whose tc programs judge as `key`, sharing the
/// instance's pinned maps. Only the tc programs of it are ever loaded.
fn load_tc_copy(pin_dir: &Path, key: u64) -> Result<Ebpf, TcError> {
    let paths: Vec<(&'static str, PathBuf)> = abi::MAP_NAMES.iter().map(|n| (*n, pin_dir.join(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        // The maps exist: `Datapath::load` created or adopted them.
        loader.map_pin_path(name, path.as_path());
    }
    loader.override_global(abi::TC_ENDPOINT_KEY_GLOBAL, &key, true);
    loader.load(object()).map_err(|e| TcError::Load(Box::new(e)))
}

/// Attaches `prog` to one interface direction, from inside the namespace.
fn attach_one(
    prog: &mut SchedClassifier,
    name: &'static str,
    pin_dir: &Path,
    netns: &ResolvedNetns,
    iface: &NetnsInterface,
    (direction, attach_type): (Direction, TcAttachType),
    prefer: TcAttachKind,
) -> Result<TcAttachKind, TcError> {
    let tcx = TcAttachment { cookie: netns.cookie, ifindex: iface.ifindex, direction, kind: TcAttachKind::Tcx };
    let pin = pin_dir.join(tcx.pin_name());
    let program_err = |e: ProgramError| TcError::Program { name, source: Box::new(e) };

    // An earlier process's link: swap our copy in, the link stays attached.
    if prefer == TcAttachKind::Tcx && pin.exists() {
        match replace_in_pinned_link(prog, &pin) {
            Ok(()) => return Ok(TcAttachKind::Tcx),
            Err(reason) => {
                // Detached (its interface was replaced) or not a TCX link: a new one.
                tracing::debug!(pin = %pin.display(), reason, "Replacing a stale tc link pin.");
            }
        }
    }
    let tcx_err = match prefer {
        TcAttachKind::Netlink => "not tried (netlink preferred)".to_owned(),
        TcAttachKind::Tcx => {
            match prog.attach_with_options(&iface.name, attach_type, TcAttachOptions::TcxOrder(LinkOrder::first())) {
                Ok(id) => {
                    let link: FdLink = prog.take_link(id).map_err(program_err)?.try_into().map_err(
                        |e: aya::programs::links::LinkError| TcError::Pin { path: pin.clone(), reason: e.to_string() },
                    )?;
                    pin_link_replacing(link, pin_dir, &tcx.pin_name())?;
                    return Ok(TcAttachKind::Tcx);
                }
                Err(e) => error_chain(&e),
            }
        }
    };
    attach_netlink(prog, name, pin_dir, &tcx, iface, attach_type).map_err(|netlink| TcError::Attach {
        name,
        ifname: iface.name.clone(),
        path: netns.path.clone(),
        tcx: tcx_err,
        netlink,
    })?;
    Ok(TcAttachKind::Netlink)
}

/// `BPF_LINK_UPDATE` of the pinned link to `prog`. `Err` says why not.
fn replace_in_pinned_link(prog: &mut SchedClassifier, pin: &Path) -> Result<(), String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| error_chain(&e))?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| error_chain(&e))?;
    let id = prog.attach_to_link(link).map_err(|e| error_chain(&e))?;
    // The pin holds the link; our fd may go.
    let link = prog.take_link(id).map_err(|e| error_chain(&e))?;
    let _fd: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| error_chain(&e))?;
    Ok(())
}

/// The pre-TCX path: a clsact filter at our fixed priority and handle,
/// replacing an earlier process's in place. `Err` says why it failed.
fn attach_netlink(
    prog: &mut SchedClassifier,
    name: &str,
    pin_dir: &Path,
    tcx: &TcAttachment,
    iface: &NetnsInterface,
    attach_type: TcAttachType,
) -> Result<(), String> {
    match aya::programs::tc::qdisc_add_clsact(&iface.name) {
        Ok(()) => {}
        // Already there (ours from before, or someone else's): fine.
        Err(aya::programs::tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(format!("adding clsact: {}", error_chain(&e))),
    }
    let options = || NlOptions { priority: NETLINK_PRIORITY, handle: NETLINK_HANDLE, classid: None };
    let id = match prog.attach_with_options(&iface.name, attach_type, TcAttachOptions::Netlink(options())) {
        Ok(id) => id,
        Err(_) => {
            let existing =
                SchedClassifierLink::attached(&iface.name, attach_type, NETLINK_PRIORITY, NETLINK_HANDLE, None)
                    .map_err(|e| e.to_string())?;
            prog.attach_to_link(existing).map_err(|e| error_chain(&e))?
        }
    };
    let link = prog.take_link(id).map_err(|e| error_chain(&e))?;
    // Dropping a netlink link detaches the filter; it must outlive us.
    std::mem::forget(link);
    let record = TcAttachment { kind: TcAttachKind::Netlink, ..tcx.clone() };
    let path = pin_dir.join(record.pin_name());
    let _ = std::fs::remove_file(&path);
    prog.pin(&path).map_err(|e| format!("recording {name} at {}: {}", path.display(), error_chain(&e)))?;
    Ok(())
}

/// Removes our netlink filter from one interface direction of the calling
/// thread's namespace, if there is one.
fn detach_netlink(ifname: &str, attach_type: TcAttachType) {
    if let Ok(link) = SchedClassifierLink::attached(ifname, attach_type, NETLINK_PRIORITY, NETLINK_HANDLE, None) {
        // Dropping a netlink link detaches the filter.
        drop(link);
    }
}

fn remove_pin(path: &Path) -> Result<(), TcError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(TcError::Pin { path: path.to_owned(), reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_and_reject_others() {
        for a in [
            TcAttachment { cookie: 4097, ifindex: 2, direction: Direction::Ingress, kind: TcAttachKind::Tcx },
            TcAttachment {
                cookie: u64::MAX >> 1,
                ifindex: 77,
                direction: Direction::Egress,
                kind: TcAttachKind::Netlink,
            },
        ] {
            let name = a.pin_name();
            assert!(!name.contains('.'), "bpffs refuses dots: {name}");
            assert_eq!(TcAttachment::parse_pin_name(&name), Some(a), "{name}");
        }
        for other in ["link_ingress", "tc_1_2", "tc_1_2_up", "tc_x_2_in", "tc_1_2_in_new", abi::POLICY] {
            assert_eq!(TcAttachment::parse_pin_name(other), None, "{other}");
        }
    }

    #[test]
    fn netns_names_become_paths_or_are_refused() {
        assert_eq!(netns_path("web").expect("name"), Path::new("/run/netns/web"));
        assert_eq!(netns_path("/proc/1/ns/net").expect("path"), Path::new("/proc/1/ns/net"));
        for bad in ["", ".", "..", "a/b", "/run/netns/../x", "a\0b"] {
            assert!(matches!(netns_path(bad), Err(TcError::InvalidNetnsName { .. })), "{bad:?}");
        }
        assert!(matches!(resolve_netns(None, None), Err(TcError::InvalidNetnsName { .. })));
    }

    #[test]
    fn endpoint_keys_never_look_like_cgroups() {
        let ns = ResolvedNetns { path: "/x".into(), ino: 1, cookie: 4096, interfaces: vec![] };
        assert!(abi::is_tc_endpoint_key(ns.endpoint_key()));
        assert_eq!(ns.endpoint_key() & !abi::TC_KEY_FLAG, 4096);
    }
}
