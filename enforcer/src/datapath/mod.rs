//! Loading, pinning and driving the enforcer's eBPF programs.
//!
//! # Shape
//!
//! * Cgroup programs attached with bpf_link to one cgroup v2 directory; every
//!   cgroup below it inherits them. A packet (or a `connect()`) is judged only when
//!   its cgroup id is in `ENDPOINTS_V2`, so attaching at a parent (or the root) and
//!   listing workloads there is enough. Which programs depends on where egress is
//!   judged ([`EgressCheck`]): at `connect()`/`sendmsg()` (`enforce_in_conn` on
//!   ingress, `enforce_connect4/6`, `enforce_sendmsg4/6`, `enforce_sock_create`;
//!   the default) or per packet (`enforce_ingress`, `enforce_egress`).
//! * Every map is pinned under `<bpffs root>/<instance>/<MAP_NAME>` and the links
//!   under `<bpffs root>/<instance>/link_*`. Pins keep the programs
//!   attached and the maps alive when this process dies: the last policy keeps
//!   being enforced with no agent running (DESIGN.md §5).
//! * **Adoption**: [`Datapath::load`] reuses maps already pinned for the instance
//!   (after checking their key and value sizes against this build's ABI), attaches
//!   the freshly loaded programs next to the old ones (cgroup links stack; both
//!   read the same maps, so they agree), then renames the new link pins over the
//!   old ones, which detaches the old programs. There is no moment without a
//!   program attached, and an upgrade replaces the code hitlessly. Pins of an
//!   earlier layout of a map (`ENDPOINTS_V1`, `IPCACHE_V1`) are migrated: their
//!   entries are copied into the new map before the new programs attach, and the
//!   old pins are removed once those programs replaced the old ones.
//! * **Atomic policy versions**: [`Datapath::write_generation`] fills generation
//!   N+1 of `POLICY_V1` while packets are judged by N, [`Datapath::activate`]
//!   flips `ENF_CONFIG_V1.active_generation` in one map update, and
//!   [`Datapath::delete_generation`] removes N afterwards. `ENDPOINTS_V2` and
//!   `IPCACHE_V2` hold one slot per generation parity, so endpoints and prefixes
//!   flip with the rules: [`crate::render::diff`] writes N+1's view into the other
//!   slot before the flip ([`crate::render::MapOp::BridgeEndpoint`],
//!   [`crate::render::MapOp::BridgeIpcache`]) and [`Datapath::apply`] applies it.
//!   The direct setters ([`Datapath::set_endpoint`], [`Datapath::set_ipcache`], …)
//!   write both slots: an immediate change. Conntrack entries remember their
//!   generation, so a flip re-judges established connections too.
//! * **Egress at connect**: a connection's egress is judged once, before the
//!   socket sends anything; nothing is recorded per TCP connection. The ingress
//!   program judges every arriving segment against the active policy (a SYN as
//!   inbound, a SYN-ACK as the answer to a `connect()`, any other segment in
//!   either direction) through `DECISIONS_V1`, policy decisions by peer address
//!   and server port: an LRU insert per connection would cost more than the rest
//!   of a short connection's program time together (measured ~1.2 µs with the
//!   LRU full), a decision is inserted once per class of connection. A flip or
//!   a mode switch that revokes a connection drops its next arriving segment.
//! * **Fast path** (per-packet egress): the cgroup_skb programs copy an established TCP connection's
//!   verdict onto its socket (`SOCK_VERDICT_V1`, socket storage, not pinned);
//!   its further packets pass on one `bpf_sk_storage_get` while the copy holds
//!   (same generation, endpoint identity, mode for audits, peer, and
//!   [`EnforcerConfig::sock_epoch`], which [`Datapath::flush_conntrack`] bumps).
//!   See `bulkhead_abi::enforcer::SockVerdict`.
//! * **Apply cost**: the old generation is deleted by the keys the diff knows
//!   ([`crate::render::MapOp::DeleteGenerationKeys`]), and a generation is
//!   written without first walking the policy map for leftovers when this
//!   handle knows there are none (the map was created by it, or read back by
//!   [`Datapath::read_state`] since).
//! * **Events**: `VERDICTS_V1` is written with `BPF_RB_NO_WAKEUP` (a wakeup per
//!   event costs 10×, EBPF.md); the owner calls [`Datapath::drain_events`] every
//!   [`EVENT_POLL_INTERVAL`]. Losses (ring full) and rate-limited events are
//!   counted per CPU ([`DatapathCounters`]).
//!
//! Workloads that are bare network namespaces get the same programs as tc
//! (sched_cls) on their interfaces, sharing every map: see the `tc` module
//! ([`Datapath::attach_netns`], [`Datapath::sync_netns`]).
//!
//! Not covered yet (issue 4 continues): walking IPv6 extension headers (TCP/UDP behind
//! one passes like any non-TCP/UDP packet); port ranges in rules.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfError, EbpfLoader};
use bulkhead_abi::enforcer::{
    self as abi, CtKey, CtValue, EndpointKey, EndpointSlot, EndpointValue, EnforcerConfig, IpcacheValue, PolicyKey,
    PolicyValue, RateState, RuleStats, VerdictEvent,
};
use bulkhead_model::HttpRequestLine;
use ipnet::IpNet;

mod apply;
pub use apply::{ApplyError, KernelState};
mod tc;
pub use tc::{
    NETNS_RUN_DIR, NetnsInterface, ResolvedNetns, TcAttachKind, TcAttachment, TcError, TcSyncReport, netns_path,
    resolve_netns,
};

/// The eBPF object built by `enforcer/build.rs`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-enforcer-ebpf"))
}

/// Where instances pin their maps and links by default.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/bulkhead";
/// How often the owner should drain the verdict ring buffer.
pub const EVENT_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// `ENDPOINTS` before its values were double-buffered: [`EndpointSlot`] values.
const LEGACY_ENDPOINTS: &str = "ENDPOINTS_V1";
/// `IPCACHE` before its values were double-buffered: an identity and 4 bytes of padding.
const LEGACY_IPCACHE: &str = "IPCACHE_V1";
/// The counters before the fast-path counter (10 slots, not 11). Not migrated: the
/// numbers are statistics, and exporters treat a smaller reading as a restart.
const LEGACY_COUNTERS: &str = "ENF_COUNTERS_V1";

const LINK_INGRESS: &str = "link_ingress";
const LINK_EGRESS: &str = "link_egress";
/// The links of the programs that judge egress at `connect()`/`sendmsg()`
/// ([`EgressCheck::Connect`]): program name, attach kind, link pin.
const CONNECT_LINKS: [(&str, ProgKind, &str); 5] = [
    (abi::PROG_CONNECT4, ProgKind::SockAddr, "link_connect4"),
    (abi::PROG_CONNECT6, ProgKind::SockAddr, "link_connect6"),
    (abi::PROG_SENDMSG4, ProgKind::SockAddr, "link_sendmsg4"),
    (abi::PROG_SENDMSG6, ProgKind::SockAddr, "link_sendmsg6"),
    (abi::PROG_SOCK_CREATE, ProgKind::Sock, "link_sock_create"),
];

/// How a cgroup program attaches (the aya type it is loaded as).
#[derive(Debug, Clone, Copy)]
enum ProgKind {
    SkbIngress,
    SkbEgress,
    SockAddr,
    Sock,
}

/// Where the egress of cgroup workloads is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EgressCheck {
    /// Once per connection, at `connect()` (TCP, connected UDP) and at an
    /// unconnected UDP socket's `sendmsg()` to an address (once per flow through
    /// conntrack); raw IP sockets are refused to enforce-mode workloads whose
    /// egress is covered. Denied: the call fails with EPERM before anything is
    /// sent. Only arriving packets run a per-packet program, which halves the
    /// program runs of a short connection. A connection the policy revokes has
    /// its arriving packets dropped from the flip on; what it sends is not
    /// judged again (TCP stalls within a window; a connected UDP socket keeps
    /// sending until it is closed).
    #[default]
    Connect,
    /// Every egress packet, by the cgroup_skb egress program: a revoked
    /// connection cannot send another packet, and raw sockets are judged like
    /// any other. The stricter choice, at twice the program runs per packet.
    Packet,
}

impl EgressCheck {
    /// This way's cgroup programs: name, attach kind, link pin. Both ways' ingress
    /// programs share [`LINK_INGRESS`], so one replaces the other in place.
    fn programs(self) -> Vec<(&'static str, ProgKind, &'static str)> {
        match self {
            EgressCheck::Packet => vec![
                (abi::PROG_INGRESS, ProgKind::SkbIngress, LINK_INGRESS),
                (abi::PROG_EGRESS, ProgKind::SkbEgress, LINK_EGRESS),
            ],
            EgressCheck::Connect => {
                let mut programs = vec![(abi::PROG_INGRESS_AT_CONNECT, ProgKind::SkbIngress, LINK_INGRESS)];
                programs.extend(CONNECT_LINKS);
                programs
            }
        }
    }

    fn other(self) -> EgressCheck {
        match self {
            EgressCheck::Connect => EgressCheck::Packet,
            EgressCheck::Packet => EgressCheck::Connect,
        }
    }
}

impl std::str::FromStr for EgressCheck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "connect" => Ok(EgressCheck::Connect),
            "packet" => Ok(EgressCheck::Packet),
            other => Err(format!("unknown egress check {other:?} (expected \"connect\" or \"packet\")")),
        }
    }
}

/// How to load the datapath. The defaults work on a laptop and on our VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Name of this enforcer's pin directory under `bpffs_root`. One instance
    /// enforces on one cgroup; tests use unique names.
    pub instance: String,
    /// bpffs directory holding the instances.
    pub bpffs_root: PathBuf,
    /// cgroup v2 directory the programs attach to (the workloads' cgroups or a
    /// parent of them).
    pub cgroup: PathBuf,
    /// Capacity of the ipcache (prefixes). Only used when the map is created.
    pub ipcache_entries: u32,
    /// Capacity of the policy map (both generations together).
    pub policy_entries: u32,
    /// Capacity of the conntrack LRU.
    pub conntrack_entries: u32,
    /// Size of the verdict ring buffer; a power of two, at least one page.
    pub events_bytes: u32,
    /// Where egress is judged: see [`EgressCheck`].
    pub egress: EgressCheck,
}

impl DatapathOptions {
    /// Options for `instance` attached at `cgroup`, everything else default.
    pub fn new(instance: impl Into<String>, cgroup: impl Into<PathBuf>) -> Self {
        Self {
            instance: instance.into(),
            bpffs_root: PathBuf::from(DEFAULT_BPFFS_ROOT),
            cgroup: cgroup.into(),
            ipcache_entries: abi::DEFAULT_IPCACHE_ENTRIES,
            policy_entries: abi::DEFAULT_POLICY_ENTRIES,
            conntrack_entries: abi::DEFAULT_CONNTRACK_ENTRIES,
            events_bytes: abi::DEFAULT_VERDICT_EVENTS_BYTES,
            egress: EgressCheck::default(),
        }
    }

    /// `<bpffs_root>/<instance>`.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs_root.join(&self.instance)
    }
}

/// Everything that can go wrong loading or driving the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("option {option} = {value:?} is invalid: {reason}")]
    InvalidOption { option: &'static str, value: String, reason: &'static str },
    #[error("pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this build expects {expected:?} \
         (an incompatible ABI: bump the map's version suffix or remove the pin)"
    )]
    IncompatiblePin { path: PathBuf, found: (u32, u32), expected: (u32, u32) },
    #[error("loading the eBPF object (verifier or map creation)")]
    Load(#[source] Box<EbpfError>),
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("the eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("pinning link {path}: {reason}")]
    PinLink { path: PathBuf, reason: String },
    #[error("{path} is not a cgroup v2 directory{hint}")]
    NotCgroup2 { path: PathBuf, hint: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("identity 0 is the wildcard and cannot be assigned to {what}")]
    ZeroIdentity { what: &'static str },
    #[error("generation {generation} is invalid: {reason}")]
    InvalidGeneration { generation: u32, reason: &'static str },
}

impl DatapathError {
    fn program(name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Program { name, source: Box::new(source) }
    }

    fn map(name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map { name, source: Box::new(source) }
    }
}

/// A rollout mode as the kernel sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Learn,
    Monitor,
    Enforce,
}

impl Mode {
    fn to_abi(self) -> u8 {
        match self {
            Mode::Learn => abi::MODE_LEARN,
            Mode::Monitor => abi::MODE_MONITOR,
            Mode::Enforce => abi::MODE_ENFORCE,
        }
    }

    fn from_abi(v: u8) -> Mode {
        match v {
            abi::MODE_MONITOR => Mode::Monitor,
            abi::MODE_ENFORCE => Mode::Enforce,
            _ => Mode::Learn,
        }
    }
}

/// Direction of a connection or packet, seen from the local workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn to_abi(self) -> u8 {
        match self {
            Direction::Ingress => abi::DIR_INGRESS,
            Direction::Egress => abi::DIR_EGRESS,
        }
    }
}

/// A managed workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub identity: u32,
    pub mode: Mode,
    /// Unmatched ingress is denied (a policy selects this workload for ingress).
    pub ingress_covered: bool,
    /// Unmatched egress is denied.
    pub egress_covered: bool,
}

/// One rule as the kernel stores it (without the generation). Wildcards: `peer`
/// [`abi::IDENTITY_ANY`], `port` 0, `protocol` 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelRule {
    pub local_identity: u32,
    pub peer_identity: u32,
    pub port: u16,
    pub protocol: u8,
    pub direction: Direction,
    pub rule_id: u32,
    pub allow: bool,
}

/// A verdict the kernel reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerdictRecord {
    /// `CLOCK_BOOTTIME` ns.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub local_identity: u32,
    pub peer_identity: u32,
    /// The deciding rule, 0 for default deny.
    pub rule_id: u32,
    pub generation: u32,
    pub protocol: u8,
    pub direction: Direction,
    /// `abi::VERDICT_*`.
    pub verdict: u8,
    /// `abi::REASON_*`.
    pub reason: u8,
    pub mode: Mode,
    /// An HTTP verdict's request line (from an [`abi::HttpVerdictEvent`] record).
    pub http: Option<HttpRequestLine>,
}

/// Kernel counters summed over CPUs, plus user-side decode errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatapathCounters {
    pub allowed: u64,
    pub audit: u64,
    pub denied: u64,
    pub ct_hits: u64,
    pub unmanaged: u64,
    pub other_proto: u64,
    pub events_lost: u64,
    pub events_rate_limited: u64,
    pub fail_actions: u64,
    pub ct_insert_failed: u64,
    /// Packets passed by the verdict cached on their TCP socket (the fast path;
    /// not also counted in `ct_hits`).
    pub fast_path: u64,
    pub decode_errors: u64,
}

/// Use of one rule, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleUse {
    pub hits: u64,
    /// `CLOCK_BOOTTIME` ns of the latest hit.
    pub last_hit_ns: u64,
}

/// The loaded, attached and pinned programs plus typed handles on their maps.
///
/// Dropping it closes our handles only: the pins keep the programs attached and
/// the policy enforced. [`remove_instance`] tears an instance down.
pub struct Datapath {
    /// Owns the loaded programs (the pinned links keep them attached).
    _ebpf: Ebpf,
    pin_dir: PathBuf,
    adopted: bool,
    ipcache: LpmTrie<MapData, [u8; 16], IpcacheValue>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    config: Array<MapData, EnforcerConfig>,
    counters: PerCpuArray<MapData, u64>,
    rule_stats: PerCpuHashMap<MapData, u32, RuleStats>,
    http: LpmTrie<MapData, abi::HttpKeyData, u32>,
    events: RingBuf<MapData>,
    decode_errors: u64,
    /// Every generation `POLICY_V1` may hold entries of, when this process knows
    /// it: the map was created by this process (empty) or walked by
    /// [`Datapath::read_state`] since, and every write and delete went through
    /// this handle. `None` when unknown (adopted pins, not read back yet):
    /// writing a generation then first walks the map for leftovers under its
    /// number (an interrupted earlier attempt's), which otherwise is skipped.
    /// Assumes one writer per instance (the map owner).
    policy_generations: Option<BTreeSet<u32>>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("adopted", &self.adopted)
            .finish_non_exhaustive()
    }
}

// The agent moves the datapath into the one task that owns the maps.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Datapath>();
};

/// (key size, value size) each pinned map must have.
fn expected_sizes(name: &str) -> (u32, u32) {
    fn sz<T>() -> u32 {
        size_of::<T>() as u32
    }
    match name {
        abi::IPCACHE => (sz::<abi::IpcacheKey>(), sz::<IpcacheValue>()),
        abi::POLICY => (sz::<PolicyKey>(), sz::<PolicyValue>()),
        abi::ENDPOINTS => (sz::<EndpointKey>(), sz::<EndpointValue>()),
        abi::CONNTRACK => (sz::<CtKey>(), sz::<CtValue>()),
        abi::COUNTERS => (4, 8),
        abi::CONFIG => (4, sz::<EnforcerConfig>()),
        abi::EVENT_RATE => (4, sz::<RateState>()),
        abi::RULE_STATS => (4, sz::<RuleStats>()),
        abi::HTTP_RULES => (4 + sz::<abi::HttpKeyData>(), 4),
        abi::DECISIONS => (sz::<abi::DecisionKey>(), sz::<abi::DecisionValue>()),
        abi::IN_CONN_TAILS => (4, 4),
        // Ring buffers have neither.
        _ => (0, 0),
    }
}

// === impl Datapath ===

impl Datapath {
    /// Loads the programs, creates or adopts the instance's pinned maps, attaches
    /// to `opts.cgroup` and pins the links (replacing an earlier process's).
    pub fn load(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        check_options(opts)?;
        bump_memlock_rlimit();
        let pin_dir = opts.pin_dir();
        std::fs::create_dir_all(&pin_dir).map_err(|source| DatapathError::PinDir { path: pin_dir.clone(), source })?;

        // Maps of an earlier layout are migrated into new ones, never into adopted ones.
        let migrate_endpoints = !pin_dir.join(abi::ENDPOINTS).exists();
        // A policy map created now is empty: no generation has entries.
        let policy_generations = (!pin_dir.join(abi::POLICY).exists()).then(BTreeSet::new);
        let migrate_ipcache = !pin_dir.join(abi::IPCACHE).exists();
        // Adopt pinned maps only if they fit this build's ABI.
        let mut adopted = false;
        for name in abi::MAP_NAMES {
            let path = pin_dir.join(name);
            if !path.exists() {
                continue;
            }
            adopted = true;
            let info = MapInfo::from_pin(&path).map_err(DatapathError::map(name))?;
            let found = (info.key_size(), info.value_size());
            let expected = expected_sizes(name);
            if found != expected {
                return Err(DatapathError::IncompatiblePin { path, found, expected });
            }
        }

        let paths: Vec<(&'static str, PathBuf)> = abi::MAP_NAMES.iter().map(|n| (*n, pin_dir.join(n))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }

        let mut ebpf = loader
            .map_max_entries(abi::IPCACHE, opts.ipcache_entries)
            .map_max_entries(abi::POLICY, opts.policy_entries)
            .map_max_entries(abi::CONNTRACK, opts.conntrack_entries)
            .map_max_entries(abi::VERDICT_EVENTS, opts.events_bytes)
            .load(object())
            .map_err(|e| DatapathError::Load(Box::new(e)))?;

        let mut config: Array<MapData, EnforcerConfig> =
            Array::try_from(take_map(&mut ebpf, abi::CONFIG)?).map_err(DatapathError::map(abi::CONFIG))?;
        let current = config.get(&0, 0).map_err(DatapathError::map(abi::CONFIG))?;
        // A fresh array reads as zeros: no fail choice set means never configured.
        if current.fail_monitor == 0 {
            config.set(0, EnforcerConfig::DEFAULT, 0).map_err(DatapathError::map(abi::CONFIG))?;
        }

        let mut ipcache =
            LpmTrie::try_from(take_map(&mut ebpf, abi::IPCACHE)?).map_err(DatapathError::map(abi::IPCACHE))?;
        let mut endpoints =
            HashMap::try_from(take_map(&mut ebpf, abi::ENDPOINTS)?).map_err(DatapathError::map(abi::ENDPOINTS))?;
        // Before the new programs attach: they must enforce the old entries from
        // their first packet.
        if migrate_endpoints {
            migrate_legacy_endpoints(&pin_dir, &mut endpoints)?;
        }
        if migrate_ipcache {
            migrate_legacy_ipcache(&pin_dir, &mut ipcache)?;
        }

        require_cgroup2(&opts.cgroup)?;
        let cgroup =
            File::open(&opts.cgroup).map_err(|source| DatapathError::Cgroup { path: opts.cgroup.clone(), source })?;
        if opts.egress == EgressCheck::Connect {
            // The ingress program's tail calls first: it must find them from its
            // first packet.
            load_tail_calls(&mut ebpf)?;
        }
        for (name, kind, pin) in opts.egress.programs() {
            let link = attach_cgroup_program(&mut ebpf, name, kind, &cgroup)?;
            pin_link_replacing(link, &pin_dir, pin)?;
        }
        // Then the other way's programs go (an earlier process checked egress the
        // other way): until now they judged alongside the new ones.
        for (_, _, pin) in opts.egress.other().programs().into_iter().filter(|(_, _, pin)| *pin != LINK_INGRESS) {
            match std::fs::remove_file(pin_dir.join(pin)) {
                Ok(()) => {
                    tracing::info!(link = pin, egress = ?opts.egress, "Detached the programs of the other egress check.")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::PinDir { path: pin_dir.join(pin), source }),
            }
        }
        // The old programs are detached: nothing of ours reads the old maps any more.
        for name in [LEGACY_ENDPOINTS, LEGACY_IPCACHE, LEGACY_COUNTERS] {
            match std::fs::remove_file(pin_dir.join(name)) {
                Ok(()) => tracing::info!(map = name, "Removed the pin of a map of an earlier layout."),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::PinDir { path: pin_dir.join(name), source }),
            }
        }

        let policy = HashMap::try_from(take_map(&mut ebpf, abi::POLICY)?).map_err(DatapathError::map(abi::POLICY))?;
        let conntrack =
            HashMap::try_from(take_map(&mut ebpf, abi::CONNTRACK)?).map_err(DatapathError::map(abi::CONNTRACK))?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, abi::COUNTERS)?).map_err(DatapathError::map(abi::COUNTERS))?;
        let rule_stats = PerCpuHashMap::try_from(take_map(&mut ebpf, abi::RULE_STATS)?)
            .map_err(DatapathError::map(abi::RULE_STATS))?;
        let events = RingBuf::try_from(take_map(&mut ebpf, abi::VERDICT_EVENTS)?)
            .map_err(DatapathError::map(abi::VERDICT_EVENTS))?;
        let http =
            LpmTrie::try_from(take_map(&mut ebpf, abi::HTTP_RULES)?).map_err(DatapathError::map(abi::HTTP_RULES))?;

        tracing::info!(
            pin_dir = %pin_dir.display(),
            cgroup = %opts.cgroup.display(),
            adopted,
            "Loaded the enforcer datapath."
        );
        Ok(Self {
            _ebpf: ebpf,
            pin_dir,
            adopted,
            ipcache,
            policy,
            endpoints,
            conntrack,
            config,
            counters,
            rule_stats,
            http,
            events,
            decode_errors: 0,
            policy_generations,
        })
    }

    /// Whether [`Datapath::load`] found and reused an earlier process's maps.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The instance's pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    // --- endpoints ---

    /// Manages the workload whose sockets live in cgroup `cgroup_id` (or updates
    /// it) in every generation: both slots, an immediate change.
    pub fn set_endpoint(&mut self, cgroup_id: u64, ep: Endpoint) -> Result<(), DatapathError> {
        if ep.identity == abi::IDENTITY_ANY {
            return Err(DatapathError::ZeroIdentity { what: "an endpoint" });
        }
        let flags = if ep.ingress_covered { abi::EP_INGRESS_COVERED } else { 0 }
            | if ep.egress_covered { abi::EP_EGRESS_COVERED } else { 0 };
        let slot = EndpointSlot { identity: ep.identity, mode: ep.mode.to_abi(), flags, _pad: [0; 2] };
        self.endpoints
            .insert(EndpointKey { cgroup_id }, EndpointValue::both(slot), 0)
            .map_err(DatapathError::map(abi::ENDPOINTS))
    }

    /// Changes only the mode of a managed workload (as the active generation
    /// sees it; both slots). One map update: the next packet sees the new mode.
    pub fn set_mode(&mut self, cgroup_id: u64, mode: Mode) -> Result<(), DatapathError> {
        let key = EndpointKey { cgroup_id };
        let value = self.endpoints.get(&key, 0).map_err(DatapathError::map(abi::ENDPOINTS))?;
        let mut slot = value.slot[abi::slot_of(self.active_generation()?)];
        if !slot.is_present() {
            return Err(DatapathError::map(abi::ENDPOINTS)(MapError::KeyNotFound));
        }
        slot.mode = mode.to_abi();
        self.endpoints.insert(key, EndpointValue::both(slot), 0).map_err(DatapathError::map(abi::ENDPOINTS))
    }

    /// The workload's entry as the active generation sees it, if managed.
    pub fn endpoint(&self, cgroup_id: u64) -> Result<Option<Endpoint>, DatapathError> {
        let value = match self.endpoints.get(&EndpointKey { cgroup_id }, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(DatapathError::map(abi::ENDPOINTS)(e)),
        };
        let v = value.slot[abi::slot_of(self.active_generation()?)];
        Ok(v.is_present().then(|| Endpoint {
            identity: v.identity,
            mode: Mode::from_abi(v.mode),
            ingress_covered: v.flags & abi::EP_INGRESS_COVERED != 0,
            egress_covered: v.flags & abi::EP_EGRESS_COVERED != 0,
        }))
    }

    /// Stops managing a workload (its packets pass unjudged).
    pub fn remove_endpoint(&mut self, cgroup_id: u64) -> Result<(), DatapathError> {
        ignore_missing(self.endpoints.remove(&EndpointKey { cgroup_id }), abi::ENDPOINTS)
    }

    // --- ipcache ---

    /// Maps every address in `net` to `identity` (longest prefix wins) in every
    /// generation: both slots, an immediate change.
    pub fn set_ipcache(&mut self, net: IpNet, identity: u32) -> Result<(), DatapathError> {
        if identity == abi::IDENTITY_ANY {
            return Err(DatapathError::ZeroIdentity { what: "an ipcache prefix" });
        }
        self.ipcache
            .insert(&ipcache_key(net), IpcacheValue::both(identity), 0)
            .map_err(DatapathError::map(abi::IPCACHE))
    }

    /// Forgets a prefix (its addresses fall back to shorter prefixes or world).
    pub fn remove_ipcache(&mut self, net: IpNet) -> Result<(), DatapathError> {
        ignore_missing(self.ipcache.remove(&ipcache_key(net)), abi::IPCACHE)
    }

    // --- policy generations ---

    /// The generation packets are judged by now.
    pub fn active_generation(&self) -> Result<u32, DatapathError> {
        Ok(self.config()?.active_generation)
    }

    /// Writes `rules` as generation `generation` (not yet active). Refuses the
    /// active generation: writing it would change the policy entry by entry.
    pub fn write_generation(&mut self, generation: u32, rules: &[KernelRule]) -> Result<(), DatapathError> {
        if generation == self.active_generation()? {
            return Err(DatapathError::InvalidGeneration { generation, reason: "it is the active generation" });
        }
        self.note_policy_generation(generation);
        for r in rules {
            if r.local_identity == abi::IDENTITY_ANY {
                return Err(DatapathError::ZeroIdentity { what: "a rule's local workload" });
            }
            let key = PolicyKey {
                generation,
                local_identity: r.local_identity,
                peer_identity: r.peer_identity,
                port: r.port,
                protocol: r.protocol,
                direction: r.direction.to_abi(),
            };
            let action = if r.allow { abi::ACTION_ALLOW } else { abi::ACTION_DENY };
            let value = PolicyValue { rule_id: r.rule_id, action, _pad: 0, http_set: 0 };
            self.policy.insert(key, value, 0).map_err(DatapathError::map(abi::POLICY))?;
        }
        Ok(())
    }

    /// Makes `generation` the one packets are judged by: one map update.
    pub fn activate(&mut self, generation: u32) -> Result<(), DatapathError> {
        let mut cfg = self.config()?;
        cfg.active_generation = generation;
        self.set_config(cfg)
    }

    /// Deletes every policy entry of `generation`. Refuses the active one.
    pub fn delete_generation(&mut self, generation: u32) -> Result<usize, DatapathError> {
        if generation == self.active_generation()? {
            return Err(DatapathError::InvalidGeneration { generation, reason: "it is the active generation" });
        }
        let keys: Vec<PolicyKey> = self
            .policy
            .keys()
            .filter_map(|k| match k {
                Ok(k) => Some(Ok(k)),
                // Deleted while we walked.
                Err(MapError::KeyNotFound) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(abi::POLICY))?;
        let mut removed = 0;
        for key in keys.iter().filter(|k| k.generation == generation) {
            if remove_counted(self.policy.remove(key), abi::POLICY)? {
                removed += 1;
            }
        }
        // The generation's HTTP rule entries go with it.
        let http: Vec<aya::maps::lpm_trie::Key<abi::HttpKeyData>> = self
            .http
            .keys()
            .filter_map(|k| match k {
                Ok(k) => Some(Ok(k)),
                Err(MapError::KeyNotFound) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .map_err(DatapathError::map(abi::HTTP_RULES))?;
        for key in http {
            let entry = crate::render::HttpEntry { prefixlen: key.prefix_len(), data: key.data() };
            if entry.generation() == generation {
                ignore_missing(self.http.remove(&key), abi::HTTP_RULES)?;
            }
        }
        if let Some(known) = &mut self.policy_generations {
            known.remove(&generation);
        }
        Ok(removed)
    }

    /// Deletes `keys` (entries of the inactive `generation`; missing ones are
    /// fine) without walking the map: the cheap [`Datapath::delete_generation`]
    /// when the caller knows every key the generation has, as
    /// [`crate::render::diff`] does (its `from` state is what the kernel holds).
    /// Refuses the active generation and keys of another generation.
    pub fn delete_generation_keys(&mut self, generation: u32, keys: &[PolicyKey]) -> Result<usize, DatapathError> {
        if generation == self.active_generation()? {
            return Err(DatapathError::InvalidGeneration { generation, reason: "it is the active generation" });
        }
        if keys.iter().any(|k| k.generation != generation) {
            return Err(DatapathError::InvalidGeneration { generation, reason: "a key of another generation" });
        }
        let mut removed = 0;
        for key in keys {
            if remove_counted(self.policy.remove(key), abi::POLICY)? {
                removed += 1;
            }
        }
        if let Some(known) = &mut self.policy_generations {
            known.remove(&generation);
        }
        Ok(removed)
    }

    /// Makes sure no entry of the inactive `generation` is left before it is
    /// written: walks the map only when this process cannot know (see
    /// `policy_generations`).
    fn clear_generation(&mut self, generation: u32) -> Result<(), DatapathError> {
        let clean = self.policy_generations.as_ref().is_some_and(|known| !known.contains(&generation));
        if !clean {
            self.delete_generation(generation)?;
        }
        Ok(())
    }

    /// Records that `generation` may have entries from now on (before writing them).
    fn note_policy_generation(&mut self, generation: u32) {
        if let Some(known) = &mut self.policy_generations {
            known.insert(generation);
        }
    }

    /// Replaces the whole policy atomically: writes the next generation, flips,
    /// deletes the previous one. Returns the new generation.
    pub fn replace_policy(&mut self, rules: &[KernelRule]) -> Result<u32, DatapathError> {
        let old = self.active_generation()?;
        let new = old.wrapping_add(1);
        // Leftovers of an interrupted earlier attempt must not leak into `new`.
        self.clear_generation(new)?;
        self.write_generation(new, rules)?;
        self.activate(new)?;
        let removed = self.delete_generation(old)?;
        tracing::info!(generation = new, rules = rules.len(), removed, "Applied policy.");
        Ok(new)
    }

    // --- config ---

    pub fn config(&self) -> Result<EnforcerConfig, DatapathError> {
        self.config.get(&0, 0).map_err(DatapathError::map(abi::CONFIG))
    }

    pub fn set_config(&mut self, cfg: EnforcerConfig) -> Result<(), DatapathError> {
        self.config.set(0, cfg, 0).map_err(DatapathError::map(abi::CONFIG))
    }

    // --- conntrack ---

    /// Number of conntrack entries (walks the map: diagnostics and tests only).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(Result::is_ok).count()
    }

    /// Forgets every tracked connection: each is judged again on its next packet.
    /// The verdicts cached on sockets (`SOCK_VERDICT_V1`, out of user space's
    /// reach) and the decisions of `DECISIONS_V1` are invalidated first by
    /// bumping [`EnforcerConfig::sock_epoch`]. Needed after changing rules or
    /// prefixes in place (the direct setters, or a diff under one generation);
    /// a generation flip re-judges everything by itself.
    pub fn flush_conntrack(&mut self) -> Result<(), DatapathError> {
        let mut cfg = self.config()?;
        cfg.sock_epoch = cfg.sock_epoch.wrapping_add(1);
        self.set_config(cfg)?;
        let keys: Vec<CtKey> = self.conntrack.keys().filter_map(Result::ok).collect();
        for key in &keys {
            ignore_missing(self.conntrack.remove(key), abi::CONNTRACK)?;
        }
        Ok(())
    }

    // --- events and counters ---

    /// Non-blocking: appends every verdict event queued in the kernel.
    pub fn drain_events(&mut self, out: &mut Vec<VerdictRecord>) {
        while let Some(item) = self.events.next() {
            match decode_verdict(&item) {
                Some(rec) => out.push(rec),
                None => {
                    self.decode_errors += 1;
                    tracing::trace!(len = item.len(), "Skipping an undecodable verdict event.");
                }
            }
        }
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> DatapathCounters {
        let read = |index: u32| -> u64 {
            match self.counters.get(&index, 0) {
                Ok(values) => values.iter().copied().fold(0u64, u64::wrapping_add),
                Err(err) => {
                    tracing::debug!(error = %err, index, "Could not read an enforcer counter.");
                    0
                }
            }
        };
        DatapathCounters {
            allowed: read(abi::COUNTER_ALLOWED),
            audit: read(abi::COUNTER_AUDIT),
            denied: read(abi::COUNTER_DENIED),
            ct_hits: read(abi::COUNTER_CT_HIT),
            unmanaged: read(abi::COUNTER_UNMANAGED),
            other_proto: read(abi::COUNTER_OTHER_PROTO),
            events_lost: read(abi::COUNTER_EVENTS_LOST),
            events_rate_limited: read(abi::COUNTER_EVENTS_LIMITED),
            fail_actions: read(abi::COUNTER_FAIL),
            ct_insert_failed: read(abi::COUNTER_CT_INSERT_FAILED),
            fast_path: read(abi::COUNTER_FAST_PATH),
            decode_errors: self.decode_errors,
        }
    }

    /// Hit counts and last-hit times per rule id, summed over CPUs.
    pub fn rule_use(&self) -> BTreeMap<u32, RuleUse> {
        let mut out = BTreeMap::new();
        for entry in self.rule_stats.iter() {
            let Ok((rule, per_cpu)) = entry else { continue };
            let mut u = RuleUse::default();
            for s in per_cpu.iter() {
                u.hits = u.hits.wrapping_add(s.hits);
                u.last_hit_ns = u.last_hit_ns.max(s.last_hit_ns);
            }
            out.insert(rule, u);
        }
        out
    }
}

/// Unpins everything of an instance: detaches its programs and frees its maps
/// once no process holds them, and the pin root once it is empty. Missing pins are fine.
pub fn remove_instance(bpffs_root: &Path, instance: &str) -> io::Result<()> {
    let dir = bpffs_root.join(instance);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // The pin root goes with its last instance (it only fails while others remain):
    // a removed enforcer leaves nothing behind in bpffs.
    let _ = std::fs::remove_dir(bpffs_root);
    Ok(())
}

/// Opens the pin `dir/name` of a map of an earlier layout if there is one with
/// the sizes that layout had; `None` when there is none (or another map is
/// pinned there, which is left alone).
fn legacy_map(dir: &Path, name: &'static str, sizes: (u32, u32)) -> Result<Option<aya::maps::Map>, DatapathError> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).map_err(DatapathError::map(name))?;
    let info = data.info().map_err(DatapathError::map(name))?;
    if (info.key_size(), info.value_size()) != sizes {
        tracing::warn!(path = %path.display(), "Not migrating a pinned map of unexpected sizes.");
        return Ok(None);
    }
    aya::maps::Map::from_map_data(data).map(Some).map_err(DatapathError::map(name))
}

/// Copies `ENDPOINTS_V1` entries into `ENDPOINTS_V2`, settled (both slots).
fn migrate_legacy_endpoints(
    dir: &Path,
    endpoints: &mut HashMap<MapData, EndpointKey, EndpointValue>,
) -> Result<(), DatapathError> {
    let Some(map) = legacy_map(dir, LEGACY_ENDPOINTS, (8, 8))? else { return Ok(()) };
    let old: HashMap<MapData, EndpointKey, [u8; 8]> =
        HashMap::try_from(map).map_err(DatapathError::map(LEGACY_ENDPOINTS))?;
    let mut copied = 0;
    for entry in old.iter() {
        let (key, v) = match entry {
            Ok(kv) => kv,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(DatapathError::map(LEGACY_ENDPOINTS)(e)),
        };
        // The V1 value was an EndpointSlot: identity, mode, flags, padding.
        let slot = EndpointSlot {
            identity: u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
            mode: v[4],
            flags: v[5],
            _pad: [0; 2],
        };
        endpoints.insert(key, EndpointValue::both(slot), 0).map_err(DatapathError::map(abi::ENDPOINTS))?;
        copied += 1;
    }
    tracing::info!(from = LEGACY_ENDPOINTS, to = abi::ENDPOINTS, entries = copied, "Migrated a pinned map.");
    Ok(())
}

/// Copies `IPCACHE_V1` entries into `IPCACHE_V2`, settled (both slots).
fn migrate_legacy_ipcache(
    dir: &Path,
    ipcache: &mut LpmTrie<MapData, [u8; 16], IpcacheValue>,
) -> Result<(), DatapathError> {
    let Some(map) = legacy_map(dir, LEGACY_IPCACHE, (size_of::<abi::IpcacheKey>() as u32, 8))? else {
        return Ok(());
    };
    let old: LpmTrie<MapData, [u8; 16], [u8; 8]> =
        LpmTrie::try_from(map).map_err(DatapathError::map(LEGACY_IPCACHE))?;
    let mut copied = 0;
    for entry in old.iter() {
        let (key, v) = match entry {
            Ok(kv) => kv,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(DatapathError::map(LEGACY_IPCACHE)(e)),
        };
        // The V1 value was an identity followed by padding.
        let identity = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
        ipcache.insert(&key, IpcacheValue::both(identity), 0).map_err(DatapathError::map(abi::IPCACHE))?;
        copied += 1;
    }
    tracing::info!(from = LEGACY_IPCACHE, to = abi::IPCACHE, entries = copied, "Migrated a pinned map.");
    Ok(())
}

/// Runs `load` (a program's `BPF_PROG_LOAD`) again, up to 4 more times, while it
/// fails with EAGAIN: the verifier gives up with EAGAIN when a signal reaches the
/// loading thread during a long verification (the L7 programs take a good part
/// of a second), and libbpf retries the same way.
pub(crate) fn load_retrying(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let mut retries = 0;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && retries < 4 =>
            {
                retries += 1;
                tracing::debug!(retries, "The verifier was interrupted; loading the program again.");
            }
            other => return other,
        }
    }
}

/// Loads the programs the connect-time ingress program tail-calls and puts them
/// in its program array (pinned, so they stay when this process goes; an
/// adopted array gets this build's programs).
fn load_tail_calls(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let mut fds = Vec::new();
    for (index, name) in [(abi::TAIL_UDP, abi::PROG_INGRESS_UDP), (abi::TAIL_L7, abi::PROG_INGRESS_L7)] {
        let prog: &mut CgroupSkb = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(DatapathError::program(name))?;
        load_retrying(|| prog.load()).map_err(DatapathError::program(name))?;
        let fd = prog
            .fd()
            .map_err(DatapathError::program(name))?
            .try_clone()
            .map_err(|e| DatapathError::program(name)(ProgramError::IOError(e)))?;
        fds.push((index, fd));
    }
    let mut tails: ProgramArray<&mut MapData> = ProgramArray::try_from(
        ebpf.map_mut(abi::IN_CONN_TAILS).ok_or(DatapathError::MissingMap { name: abi::IN_CONN_TAILS })?,
    )
    .map_err(DatapathError::map(abi::IN_CONN_TAILS))?;
    for (index, fd) in &fds {
        tails.set(*index, fd, 0).map_err(DatapathError::map(abi::IN_CONN_TAILS))?;
    }
    Ok(())
}

/// Loads program `name` of `kind` and attaches it to `cgroup` with a bpf_link.
fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: ProgKind,
    cgroup: &File,
) -> Result<FdLink, DatapathError> {
    let prog = ebpf.program_mut(name).ok_or(DatapathError::MissingProgram { name })?;
    let not_fd_link = |e: aya::programs::links::LinkError| DatapathError::PinLink {
        path: PathBuf::from(name),
        reason: e.to_string(),
    };
    // `Single` is the only mode accepted here (EBPF.md); bpf_link attachments
    // stack anyway (the collector's, an older enforcer's).
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match kind {
        ProgKind::SkbIngress | ProgKind::SkbEgress => {
            let prog: &mut CgroupSkb = prog.try_into().map_err(DatapathError::program(name))?;
            load_retrying(|| prog.load()).map_err(DatapathError::program(name))?;
            let attach = if matches!(kind, ProgKind::SkbIngress) {
                CgroupSkbAttachType::Ingress
            } else {
                CgroupSkbAttachType::Egress
            };
            let id = prog.attach(cgroup, attach, mode).map_err(DatapathError::program(name))?;
            prog.take_link(id).map_err(DatapathError::program(name))?.try_into().map_err(not_fd_link)?
        }
        ProgKind::SockAddr => {
            let prog: &mut CgroupSockAddr = prog.try_into().map_err(DatapathError::program(name))?;
            load_retrying(|| prog.load()).map_err(DatapathError::program(name))?;
            let id = prog.attach(cgroup, mode).map_err(DatapathError::program(name))?;
            prog.take_link(id).map_err(DatapathError::program(name))?.try_into().map_err(not_fd_link)?
        }
        ProgKind::Sock => {
            let prog: &mut CgroupSock = prog.try_into().map_err(DatapathError::program(name))?;
            load_retrying(|| prog.load()).map_err(DatapathError::program(name))?;
            let id = prog.attach(cgroup, mode).map_err(DatapathError::program(name))?;
            prog.take_link(id).map_err(DatapathError::program(name))?.try_into().map_err(not_fd_link)?
        }
    };
    Ok(link)
}

/// Pins `link` as `dir/name`, replacing an existing pin in one rename: the old
/// link (an earlier process's) is detached only after the new one is attached.
fn pin_link_replacing(link: FdLink, dir: &Path, name: &str) -> Result<(), DatapathError> {
    // bpffs refuses names with a dot (reserved for the kernel's own files).
    let tmp = dir.join(format!("{name}_new"));
    let path = dir.join(name);
    let _ = std::fs::remove_file(&tmp);
    let pinned: PinnedLink =
        link.pin(&tmp).map_err(|e| DatapathError::PinLink { path: tmp.clone(), reason: error_chain(&e) })?;
    std::fs::rename(&tmp, &path).map_err(|e| DatapathError::PinLink { path: path.clone(), reason: e.to_string() })?;
    // Our fd goes; the pin keeps the link (and the program) attached.
    drop(pinned);
    Ok(())
}

/// An error and its sources on one line (aya's pin errors hide the errno in
/// their source).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// Whether a map error says the key was not there. aya 0.14 reports a missing
/// key on delete (`BPF_MAP_DELETE_ELEM` → ENOENT) as a `SyscallError`, not as
/// `KeyNotFound` (which only its lookups return).
fn is_missing(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A delete whose key may already be gone: missing is fine.
fn ignore_missing(result: Result<(), MapError>, map: &'static str) -> Result<(), DatapathError> {
    remove_counted(result, map).map(|_| ())
}

/// A delete whose key may already be gone: `Ok(true)` if it removed one.
fn remove_counted(result: Result<(), MapError>, map: &'static str) -> Result<bool, DatapathError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if is_missing(&e) => Ok(false),
        Err(e) => Err(DatapathError::map(map)(e)),
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::MissingMap { name })
}

fn check_options(opts: &DatapathOptions) -> Result<(), DatapathError> {
    let name = &opts.instance;
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(DatapathError::InvalidOption {
            option: "instance",
            value: name.clone(),
            reason: "1-64 characters of [A-Za-z0-9_-]",
        });
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if !opts.events_bytes.is_power_of_two() || opts.events_bytes < page {
        return Err(DatapathError::InvalidOption {
            option: "events_bytes",
            value: opts.events_bytes.to_string(),
            reason: "ring buffers must be a power of two and at least one page",
        });
    }
    for (option, v) in [
        ("ipcache_entries", opts.ipcache_entries),
        ("policy_entries", opts.policy_entries),
        ("conntrack_entries", opts.conntrack_entries),
    ] {
        if v == 0 {
            return Err(DatapathError::InvalidOption { option, value: v.to_string(), reason: "must be at least 1" });
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; raising it needs
/// CAP_SYS_RESOURCE, which our VMs do not grant (EBPF.md). Non-fatal.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: `rlim` is a valid rlimit for the duration of the call.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "Could not raise RLIMIT_MEMLOCK; continuing.");
    }
}

/// The LPM key of a prefix: IPv4 as v4-mapped IPv6 with the prefix length + 96.
pub fn ipcache_key(net: IpNet) -> LpmKey<[u8; 16]> {
    let net = net.trunc();
    match net {
        IpNet::V4(n) => LpmKey::new(u32::from(n.prefix_len()) + 96, abi::v4_mapped(n.addr().octets())),
        IpNet::V6(n) => LpmKey::new(u32::from(n.prefix_len()), n.addr().octets()),
    }
}

/// A 16-byte address from the kernel: v4-mapped addresses become IPv4.
fn ip_from_abi(b: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Decodes one ring-buffer record; `None` when it is too short or malformed.
pub fn decode_verdict(bytes: &[u8]) -> Option<VerdictRecord> {
    if bytes.len() < size_of::<VerdictEvent>() {
        return None;
    }
    // SAFETY: the length is checked above; VerdictEvent is plain old data and
    // read_unaligned copes with the ring buffer's 8-byte alignment either way.
    let ev: VerdictEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<VerdictEvent>()) };
    let direction = match ev.direction {
        abi::DIR_INGRESS => Direction::Ingress,
        abi::DIR_EGRESS => Direction::Egress,
        _ => return None,
    };
    let (local, remote) = match ev.family {
        abi::AF_INET | abi::AF_INET6 => (ip_from_abi(ev.local_addr), ip_from_abi(ev.remote_addr)),
        _ => return None,
    };
    Some(VerdictRecord {
        ts_ns: ev.ts_ns,
        cgroup_id: ev.cgroup_id,
        local: SocketAddr::new(local, ev.local_port),
        remote: SocketAddr::new(remote, ev.remote_port),
        local_identity: ev.local_identity,
        peer_identity: ev.peer_identity,
        rule_id: ev.rule_id,
        generation: ev.generation,
        protocol: ev.protocol,
        direction,
        verdict: ev.verdict,
        reason: ev.reason,
        mode: Mode::from_abi(ev.mode),
        http: decode_http_line(bytes, ev.reason),
    })
}

/// The request line of an HTTP verdict record; `None` for other records (and for an
/// HTTP one written by programs older than [`abi::HttpVerdictEvent`]).
fn decode_http_line(bytes: &[u8], reason: u8) -> Option<HttpRequestLine> {
    if reason != abi::REASON_HTTP || bytes.len() < size_of::<abi::HttpVerdictEvent>() {
        return None;
    }
    // SAFETY: the length is checked above; HttpVerdictEvent is plain old data.
    let ev: abi::HttpVerdictEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    Some(HttpRequestLine::from_kernel(&ev.method, &ev.path))
}

/// An address as the programs see it, for tests and diagnostics.
pub fn abi_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => abi::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// cgroup_skb programs attach to cgroup v2 directories only; on a hybrid host
/// `/sys/fs/cgroup` is a tmpfs of v1 controllers and the kernel's answer would be a bare
/// EBADF. Says so, naming where cgroup2 is mounted.
fn require_cgroup2(path: &Path) -> Result<(), DatapathError> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    let fs = statfs(path).map_err(|e| DatapathError::Cgroup { path: path.to_owned(), source: e.into() })?;
    if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
        return Ok(());
    }
    let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right.starts_with("cgroup2 ").then(|| left.split(' ').nth(4).map(str::to_owned))?
        })
        .collect();
    let hint = if mounts.is_empty() {
        "; no cgroup2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)".to_owned()
    } else {
        format!("; cgroup2 is mounted at {} (pass it with --cgroup)", mounts.join(", "))
    };
    Err(DatapathError::NotCgroup2 { path: path.to_owned(), hint })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ipv4_prefixes_are_v4_mapped() {
        let k = ipcache_key("10.1.2.3/24".parse().expect("net"));
        assert_eq!(k.prefix_len(), 120);
        assert_eq!(k.data(), abi::v4_mapped([10, 1, 2, 0]));
        let k = ipcache_key("fd00::1/64".parse().expect("net"));
        assert_eq!(k.prefix_len(), 64);
        assert_eq!(ip_from_abi(abi_addr(Ipv4Addr::new(1, 2, 3, 4).into())), IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(ip_from_abi(abi_addr(Ipv6Addr::LOCALHOST.into())), IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    #[test]
    fn verdicts_decode_and_reject_garbage() {
        let ev = VerdictEvent {
            ts_ns: 5,
            cgroup_id: 7,
            local_addr: abi::v4_mapped([10, 0, 0, 2]),
            remote_addr: abi::v4_mapped([10, 0, 0, 3]),
            local_identity: 256,
            peer_identity: 2,
            rule_id: 0,
            generation: 4,
            local_port: 80,
            remote_port: 40000,
            family: abi::AF_INET,
            protocol: abi::IPPROTO_TCP,
            direction: abi::DIR_INGRESS,
            verdict: abi::VERDICT_AUDIT,
            reason: abi::REASON_DEFAULT_DENY,
            mode: abi::MODE_MONITOR,
            _pad: [0; 5],
        };
        // SAFETY: VerdictEvent is repr(C) plain old data without padding.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const ev).cast::<u8>(), size_of::<VerdictEvent>()) }.to_vec();
        let rec = decode_verdict(&bytes).expect("decodes");
        assert_eq!(rec.local, "10.0.0.2:80".parse().expect("addr"));
        assert_eq!(rec.remote, "10.0.0.3:40000".parse().expect("addr"));
        assert_eq!((rec.direction, rec.mode, rec.generation), (Direction::Ingress, Mode::Monitor, 4));
        assert!(decode_verdict(&bytes[..10]).is_none());
        let mut bad = bytes.clone();
        bad[std::mem::offset_of!(VerdictEvent, direction)] = 9;
        assert!(decode_verdict(&bad).is_none());
        assert_eq!(rec.http, None, "an L4 record has no request line");

        // An HTTP verdict: the longer record carries the request line.
        let mut path = [0xffu8; abi::HTTP_PATH_BYTES];
        path[..17].copy_from_slice(b"/v1/exhaust-port\0");
        let mut method = [0u8; abi::HTTP_METHOD_BYTES];
        method[..3].copy_from_slice(b"PUT");
        let http = abi::HttpVerdictEvent {
            event: VerdictEvent { reason: abi::REASON_HTTP, verdict: abi::VERDICT_DENIED, rule_id: 3, ..ev },
            method,
            path,
            _pad: [0; 6],
        };
        // SAFETY: HttpVerdictEvent is repr(C) plain old data without padding.
        let bytes =
            unsafe { std::slice::from_raw_parts((&raw const http).cast::<u8>(), size_of::<abi::HttpVerdictEvent>()) }
                .to_vec();
        let rec = decode_verdict(&bytes).expect("decodes");
        let line = rec.http.expect("an HTTP record has its request line");
        assert_eq!((line.method.as_str(), line.path.as_str(), line.truncated), ("PUT", "/v1/exhaust-port", false));
        // Its head alone (an older program's record) is still a verdict, without it.
        let head = decode_verdict(&bytes[..size_of::<VerdictEvent>()]).expect("decodes");
        assert_eq!((head.rule_id, head.http), (3, None));
    }

    #[test]
    fn options_are_checked() {
        let mut o = DatapathOptions::new("ok-1", "/sys/fs/cgroup");
        assert!(check_options(&o).is_ok());
        o.instance = "../etc".into();
        assert!(matches!(check_options(&o), Err(DatapathError::InvalidOption { option: "instance", .. })));
        o.instance = "x".into();
        o.events_bytes = 3 << 12;
        assert!(matches!(check_options(&o), Err(DatapathError::InvalidOption { option: "events_bytes", .. })));
    }

    #[test]
    fn a_missing_key_is_missing_however_aya_reports_it() {
        let syscall = |errno| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: io::Error::from_raw_os_error(errno),
            })
        };
        // aya 0.14: lookups say KeyNotFound, deletes ENOENT.
        assert!(is_missing(&MapError::KeyNotFound));
        assert!(is_missing(&syscall(libc::ENOENT)));
        assert!(!is_missing(&syscall(libc::EPERM)));
        assert!(ignore_missing(Err(syscall(libc::ENOENT)), abi::POLICY).is_ok());
        assert!(matches!(remove_counted(Err(syscall(libc::ENOENT)), abi::POLICY), Ok(false)));
        assert!(matches!(remove_counted(Ok(()), abi::POLICY), Ok(true)));
        assert!(matches!(ignore_missing(Err(syscall(libc::E2BIG)), abi::POLICY), Err(DatapathError::Map { .. })));
    }

    #[test]
    fn expected_sizes_cover_every_map() {
        for name in abi::MAP_NAMES {
            let (k, v) = expected_sizes(name);
            assert_eq!(k == 0 && v == 0, name == abi::VERDICT_EVENTS, "{name}");
        }
    }
}
