//! Loading and draining the collector's eBPF programs.
//!
//! # What runs in the kernel, and why this way
//!
//! * **TCP** — tracepoint `sock/inet_sock_set_state` (no kprobes on our kernels,
//!   and fentry/fexit are refused on the VMs we run on; a tracepoint is also a
//!   published format we can check at load time). `CLOSE → SYN_SENT` runs in the
//!   connecting process: the kernel records pid (tgid), comm, cgroup id and time
//!   per socket. The Connect event itself is written at the socket's next
//!   transition (`→ ESTABLISHED`, or `→ CLOSE` for a refused attempt) because the
//!   kernel only picks the local port *after* entering SYN_SENT, and a Connect
//!   with port 0 could not be matched with its Close. Established and Close of
//!   that socket carry the same owner. `SYN_RECV → ESTABLISHED` is the accept
//!   side, in softirq: pid and comm are unknown (0 / empty), but the cgroup is the
//!   *socket's* (an accepted socket inherits the listener's cgroup, i.e. the
//!   server's), read from `sk->sk_cgrp_data`. `→ CLOSE` carries
//!   `tcp_sock.bytes_acked` / `bytes_received` (which include the SYN and FIN,
//!   so up to 2 more than the payload) and `segs_in + segs_out` as packets.
//! * **UDP and DNS** — cgroup_skb ingress + egress attached at the cgroup v2 root.
//!   Chosen over the alternatives because:
//!   - it sees every datagram of every socket on the node, in every network
//!     namespace (cgroup membership does not depend on the netns), with the
//!     per-datagram peer address — unconnected `sendto`/`recvfrom` sockets, i.e.
//!     most UDP servers and many resolvers, have no peer in the socket itself;
//!   - it gives exact byte counts and runs in the sender's process context on
//!     egress (pid/comm of the sender);
//!   - cgroup sock_addr `sendmsg4/6`/`recvmsg4/6` only fire for *unconnected*
//!     sockets and carry no length (no byte counts), `connect4/6` misses `sendto`;
//!   - tc would need an attachment per interface per namespace, following
//!     interface churn, and misses loopback and host processes.
//!
//!   The same netns filter as TCP applies in the kernel: the program takes the
//!   socket from `skb->sk` and reads `sk->__sk_common.skc_net.net->ns.inum` with
//!   BTF offsets, exactly like the tracepoint does with `skaddr`.
//!   Counters are aggregated per (netns, 5-tuple) in an LRU hash; the first
//!   datagram of a tuple is reported at once as Connect (egress) or Accept
//!   (ingress) and later counters as Traffic, drained by [`Datapath::drain`] at
//!   most every [`DatapathOptions::udp_sweep_interval`]. Not covered: UDP behind
//!   IPv6 extension headers and non-first IPv4 fragments (no UDP header).
//!   DNS: datagrams *from* port 53 received by a workload are copied (≤ 512
//!   bytes) to a second ring buffer and parsed here with `simple-dns`; DNS over
//!   TCP is not captured.
//! * **HTTP request lines** — the same ingress program reads the first four
//!   payload bytes of every TCP segment a socket receives; a segment starting like
//!   one of seven HTTP methods has its first 256 bytes copied, with its addresses,
//!   to a third ring buffer (only for observed namespaces: the filter runs after the
//!   4-byte match, so other segments never pay for it). [`http`] parses the request
//!   line strictly; the aggregator counts (method, path) per flow and, at close,
//!   calls an accepted connection that received payload but no request line
//!   *opaque* (TLS, other protocols). Segments are looked at one by one, not
//!   reassembled: a request line is expected at the start of a segment, which is
//!   where HTTP/1.x clients put it (the first segment of a connection and of each
//!   request on a keep-alive connection). Pipelined requests after the first in one
//!   segment are not counted. Off with [`DatapathOptions::http`] = false (the
//!   branch is then pruned at load).
//! * **Delivery** — ring buffers submitted with `BPF_RB_NO_WAKEUP` (a per-event
//!   wakeup costs 10× more, EBPF.md); the caller polls [`Datapath::drain`] on a
//!   short timer. Reservation failures are counted per CPU in the kernel and
//!   exposed by [`Datapath::ringbuf_dropped`].
//! * **Kernel layouts** — tracepoint field offsets are checked against the
//!   kernel's format file; struct offsets (`sock`, `net`, `tcp_sock`, `cgroup`)
//!   come from BTF (see [`btf`]). Nothing kernel-specific is compiled in.
//!
//! Nothing is pinned: the collector re-seeds pre-existing connections from
//! sock_diag on start (see `seed`), so a restart loses no state worth a pin, and
//! dropping [`Datapath`] detaches everything.

pub mod btf;
pub mod decode;
pub mod dns;
pub mod http;
pub mod tracefs;
pub mod udp;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramError, TestRun, TestRunOptions, TracePoint,
};
use aya::{Ebpf, EbpfError, EbpfLoader};
use bulkhead_abi::collector::{
    self as abi, CollectorConfig, KernelOffsets, NETNS_MODE_ALL, NETNS_MODE_EXCEPT, NETNS_MODE_ONLY, UdpFlowKey,
    UdpFlowValue,
};
use bulkhead_model::DnsAnswer;

use self::decode::BootClock;
use self::udp::UdpSweeper;
use crate::event::{HttpRequest, SockEvent};

/// The eBPF object built by `collector/build.rs`.
fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-collector-ebpf"))
}

/// Which network namespaces are observed. Applied in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetnsFilter {
    #[default]
    All,
    /// Only these namespace inodes.
    Only(BTreeSet<u64>),
    /// Every namespace except these inodes.
    Except(BTreeSet<u64>),
}

/// How to load the datapath. The defaults work on a laptop and on our VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Size of the socket-event ring buffer; a power of two, at least one page.
    pub ringbuf_bytes: u32,
    /// Size of the DNS ring buffer; a power of two, at least one page.
    pub dns_ringbuf_bytes: u32,
    /// Size of the HTTP request-line ring buffer; a power of two, at least one page.
    pub http_ringbuf_bytes: u32,
    /// Capture HTTP request lines (method and path, never headers or bodies) of
    /// ingress TCP segments. Needs the cgroup_skb programs (`udp`).
    pub http: bool,
    /// Capacity of the kernel's UDP aggregate (LRU: the least recently active
    /// flows are evicted first when it is full).
    pub udp_flow_entries: u32,
    /// How often the UDP aggregate is read. Each read walks the whole map, so it
    /// runs on a slower cadence than the ring-buffer poll.
    pub udp_sweep_interval: Duration,
    /// A UDP flow without datagrams for this long is reported one last time and
    /// removed from the kernel map.
    pub udp_idle_timeout: Duration,
    /// Attach the UDP/DNS cgroup_skb programs (TCP works without them).
    pub udp: bool,
    /// cgroup v2 directory the cgroup_skb programs attach to. `None`: the root of
    /// the mounted cgroup2 hierarchy (mounting one under `/run/bulkhead/cgroup2`
    /// if none is mounted).
    pub cgroup_root: Option<PathBuf>,
    /// Kernel BTF to resolve struct offsets from.
    pub btf_path: PathBuf,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            ringbuf_bytes: abi::DEFAULT_FLOW_EVENTS_BYTES,
            dns_ringbuf_bytes: abi::DEFAULT_DNS_EVENTS_BYTES,
            http_ringbuf_bytes: abi::DEFAULT_HTTP_EVENTS_BYTES,
            http: true,
            udp_flow_entries: abi::DEFAULT_UDP_FLOWS,
            udp_sweep_interval: Duration::from_secs(1),
            udp_idle_timeout: Duration::from_secs(60),
            udp: true,
            cgroup_root: None,
            btf_path: PathBuf::from("/sys/kernel/btf/vmlinux"),
        }
    }
}

/// Everything that can go wrong loading or driving the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("option {option} = {value} is invalid: {reason}")]
    InvalidOption { option: &'static str, value: u64, reason: &'static str },
    #[error("checking the sock/inet_sock_set_state tracepoint format")]
    TracepointFormat(#[from] tracefs::FormatError),
    #[error("resolving kernel struct offsets from BTF")]
    Btf(#[from] btf::BtfError),
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
    #[error("cgroup v2 root {path}: {source}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("netns filter lists {len} namespaces, the kernel map holds at most {max}")]
    FilterTooLarge { len: usize, max: u32 },
}

impl DatapathError {
    fn program(name: &'static str) -> impl FnOnce(ProgramError) -> Self {
        move |source| Self::Program { name, source: Box::new(source) }
    }

    fn map(name: &'static str) -> impl FnOnce(MapError) -> Self {
        move |source| Self::Map { name, source: Box::new(source) }
    }
}

/// Kernel- and user-side counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatapathCounters {
    /// Socket events lost because the ring buffer was full.
    pub flow_events_lost: u64,
    /// DNS messages lost because their ring buffer was full.
    pub dns_events_lost: u64,
    /// HTTP request lines lost because their ring buffer was full.
    pub http_events_lost: u64,
    /// HTTP request lines parsed and handed on.
    pub http_requests: u64,
    /// Copied segment starts that were not a request line we accept (see [`http`]).
    pub http_unparsed: u64,
    /// Kernel memory reads that failed (fields reported as 0).
    pub kernel_read_failures: u64,
    /// UDP aggregates that could not be created.
    pub udp_insert_failures: u64,
    /// Ring-buffer records user space could not decode.
    pub decode_errors: u64,
}

/// The loaded and attached programs plus the maps user space reads.
/// Dropping it detaches everything.
pub struct Datapath {
    /// Owns the programs and their links: dropping it detaches them.
    ebpf: Ebpf,
    flow_events: RingBuf<MapData>,
    dns_events: Option<RingBuf<MapData>>,
    http_events: Option<RingBuf<MapData>>,
    counters: PerCpuArray<MapData, u64>,
    config: Array<MapData, CollectorConfig>,
    netns_filter: HashMap<MapData, u64, u8>,
    udp_flows: Option<HashMap<MapData, UdpFlowKey, UdpFlowValue>>,
    udp: UdpSweeper,
    udp_sweep_interval: Duration,
    last_udp_sweep: Instant,
    filter: NetnsFilter,
    decode_errors: u64,
    http_requests: u64,
    http_unparsed: u64,
    /// Last value read from the kernel, returned if a later read fails.
    last_dropped: Cell<u64>,
    cgroup_root: Option<PathBuf>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("filter", &self.filter)
            .field("cgroup_root", &self.cgroup_root)
            .field("udp_tracked", &self.udp.tracked())
            .finish_non_exhaustive()
    }
}

// The agent may move the datapath into its own task or thread.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<Datapath>();
};

// === impl Datapath ===

impl Datapath {
    /// Checks the kernel, resolves offsets, loads every program and attaches it.
    /// The filter starts as [`NetnsFilter::All`].
    pub fn load(opts: &DatapathOptions) -> Result<Self, DatapathError> {
        check_ringbuf_size("ringbuf_bytes", opts.ringbuf_bytes)?;
        check_ringbuf_size("dns_ringbuf_bytes", opts.dns_ringbuf_bytes)?;
        check_ringbuf_size("http_ringbuf_bytes", opts.http_ringbuf_bytes)?;
        if opts.udp_flow_entries == 0 {
            return Err(DatapathError::InvalidOption {
                option: "udp_flow_entries",
                value: 0,
                reason: "must be at least 1",
            });
        }
        bump_memlock_rlimit();

        let tracefs = tracefs::tracefs_root()?;
        tracefs::check_inet_sock_set_state(&tracefs)?;
        let offsets: KernelOffsets = btf::kernel_offsets(&opts.btf_path)?;
        tracing::debug!(?offsets, "Resolved kernel offsets from BTF.");

        let mut ebpf = EbpfLoader::new()
            .override_global(abi::KERNEL_OFFSETS_GLOBAL, &offsets, true)
            .override_global(abi::CAPTURE_HTTP_GLOBAL, &u32::from(opts.http && opts.udp), true)
            .map_max_entries(abi::FLOW_EVENTS, opts.ringbuf_bytes)
            .map_max_entries(abi::DNS_EVENTS, opts.dns_ringbuf_bytes)
            .map_max_entries(abi::HTTP_EVENTS, opts.http_ringbuf_bytes)
            .map_max_entries(abi::UDP_FLOWS, opts.udp_flow_entries)
            .load(object())
            .map_err(|e| DatapathError::Load(Box::new(e)))?;

        let mut config: Array<MapData, CollectorConfig> =
            Array::try_from(take_map(&mut ebpf, abi::CONFIG)?).map_err(DatapathError::map(abi::CONFIG))?;
        config
            .set(0, CollectorConfig { netns_mode: NETNS_MODE_ALL, _pad: [0; 4] }, 0)
            .map_err(DatapathError::map(abi::CONFIG))?;
        let netns_filter = HashMap::try_from(take_map(&mut ebpf, abi::NETNS_FILTER)?)
            .map_err(DatapathError::map(abi::NETNS_FILTER))?;
        let counters =
            PerCpuArray::try_from(take_map(&mut ebpf, abi::COUNTERS)?).map_err(DatapathError::map(abi::COUNTERS))?;
        let flow_events =
            RingBuf::try_from(take_map(&mut ebpf, abi::FLOW_EVENTS)?).map_err(DatapathError::map(abi::FLOW_EVENTS))?;

        {
            let name = abi::PROG_SOCK_STATE;
            let prog: &mut TracePoint = program(&mut ebpf, name)?.try_into().map_err(DatapathError::program(name))?;
            prog.load().map_err(DatapathError::program(name))?;
            prog.attach("sock", "inet_sock_set_state").map_err(DatapathError::program(name))?;
        }

        let http_events = if opts.udp && opts.http {
            Some(
                RingBuf::try_from(take_map(&mut ebpf, abi::HTTP_EVENTS)?)
                    .map_err(DatapathError::map(abi::HTTP_EVENTS))?,
            )
        } else {
            None
        };
        let (dns_events, udp_flows, cgroup_root) = if opts.udp {
            let root = cgroup_root(opts.cgroup_root.as_deref())?;
            let cgroup = File::open(&root).map_err(|source| DatapathError::Cgroup { path: root.clone(), source })?;
            for (name, attach) in [
                (abi::PROG_SKB_INGRESS, CgroupSkbAttachType::Ingress),
                (abi::PROG_SKB_EGRESS, CgroupSkbAttachType::Egress),
            ] {
                let prog: &mut CgroupSkb =
                    program(&mut ebpf, name)?.try_into().map_err(DatapathError::program(name))?;
                prog.load().map_err(DatapathError::program(name))?;
                // `Single` is the only mode accepted here (EBPF.md); with bpf_link
                // attachment other programs (the enforcer's) still stack.
                prog.attach(&cgroup, attach, CgroupAttachMode::Single).map_err(DatapathError::program(name))?;
            }
            let dns = RingBuf::try_from(take_map(&mut ebpf, abi::DNS_EVENTS)?)
                .map_err(DatapathError::map(abi::DNS_EVENTS))?;
            let udp =
                HashMap::try_from(take_map(&mut ebpf, abi::UDP_FLOWS)?).map_err(DatapathError::map(abi::UDP_FLOWS))?;
            (Some(dns), Some(udp), Some(root))
        } else {
            (None, None, None)
        };

        tracing::info!(
            flags = offsets.flags,
            cgroup_root = ?cgroup_root,
            http = http_events.is_some(),
            ringbuf_bytes = opts.ringbuf_bytes,
            "Loaded the collector datapath."
        );
        Ok(Self {
            ebpf,
            flow_events,
            dns_events,
            http_events,
            counters,
            config,
            netns_filter,
            udp_flows,
            udp: UdpSweeper::new(opts.udp_idle_timeout),
            udp_sweep_interval: opts.udp_sweep_interval,
            last_udp_sweep: Instant::now(),
            filter: NetnsFilter::All,
            decode_errors: 0,
            http_requests: 0,
            http_unparsed: 0,
            last_dropped: Cell::new(0),
            cgroup_root,
        })
    }

    /// Replaces the network-namespace filter in the kernel.
    ///
    /// Transitions never hide a namespace that both the old and the new filter
    /// observe: within a mode, additions/removals are ordered so the intermediate
    /// state observes old ∪ new; across modes the filter passes through `All`.
    /// Erring towards reporting too much for a moment is the safe side for a
    /// monitoring tool.
    pub fn set_netns_filter(&mut self, f: &NetnsFilter) -> Result<(), DatapathError> {
        let empty = BTreeSet::new();
        let (mode, want) = match f {
            NetnsFilter::All => (NETNS_MODE_ALL, &empty),
            NetnsFilter::Only(s) => (NETNS_MODE_ONLY, s),
            NetnsFilter::Except(s) => (NETNS_MODE_EXCEPT, s),
        };
        if want.len() > abi::NETNS_FILTER_MAX as usize {
            return Err(DatapathError::FilterTooLarge { len: want.len(), max: abi::NETNS_FILTER_MAX });
        }
        let (old_mode, have) = match &self.filter {
            NetnsFilter::All => (NETNS_MODE_ALL, empty.clone()),
            NetnsFilter::Only(s) => (NETNS_MODE_ONLY, s.clone()),
            NetnsFilter::Except(s) => (NETNS_MODE_EXCEPT, s.clone()),
        };
        if old_mode != mode && old_mode != NETNS_MODE_ALL {
            self.set_mode(NETNS_MODE_ALL)?;
        }
        let additions: Vec<u64> = want.difference(&have).copied().collect();
        let removals: Vec<u64> = have.difference(want).copied().collect();
        // Only: add first (observe old ∪ new); Except: remove first (exclude old ∩ new).
        if mode == NETNS_MODE_EXCEPT {
            self.remove_netns(&removals)?;
            self.add_netns(&additions)?;
        } else {
            self.add_netns(&additions)?;
            self.remove_netns(&removals)?;
        }
        self.set_mode(mode)?;
        self.filter = f.clone();
        tracing::info!(mode, namespaces = want.len(), "Set the network-namespace filter.");
        Ok(())
    }

    fn set_mode(&mut self, mode: u32) -> Result<(), DatapathError> {
        self.config
            .set(0, CollectorConfig { netns_mode: mode, _pad: [0; 4] }, 0)
            .map_err(DatapathError::map(abi::CONFIG))
    }

    fn add_netns(&mut self, inos: &[u64]) -> Result<(), DatapathError> {
        for ino in inos {
            self.netns_filter.insert(ino, 1, 0).map_err(DatapathError::map(abi::NETNS_FILTER))?;
        }
        Ok(())
    }

    fn remove_netns(&mut self, inos: &[u64]) -> Result<(), DatapathError> {
        for ino in inos {
            match self.netns_filter.remove(ino) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(abi::NETNS_FILTER)(e)),
            }
        }
        Ok(())
    }

    /// Non-blocking: appends everything currently queued in the kernel.
    ///
    /// Socket events, DNS answers and HTTP requests come from the ring buffers on
    /// every call; UDP Traffic events from the kernel aggregate at most every
    /// [`DatapathOptions::udp_sweep_interval`].
    ///
    /// The socket ring is read before the HTTP ring: a request line is copied before
    /// its connection can close, so every request of a connection whose Close is in
    /// `events` is in `http` by the time this returns. Feed `http` to the aggregator
    /// first (see `Aggregator::record_http`).
    pub fn drain(
        &mut self,
        events: &mut Vec<SockEvent>,
        dns: &mut Vec<DnsAnswer>,
        http: &mut Vec<HttpRequest>,
    ) -> Result<(), DatapathError> {
        let clock = BootClock::sample();
        let started_ns = BootClock::boot_now_ns();
        while let Some(item) = self.flow_events.next() {
            match decode::sock_event(&item, &clock) {
                Ok(ev) => events.push(ev),
                Err(err) => {
                    self.decode_errors += 1;
                    tracing::trace!(error = %err, "Skipping an undecodable socket event.");
                }
            }
        }
        if let Some(ring) = self.dns_events.as_mut() {
            while let Some(item) = ring.next() {
                match decode::dns_record(&item, &clock) {
                    Ok(rec) => dns.extend(dns::parse_answers(&rec.payload, rec.netns_ino, rec.unix_ms)),
                    Err(err) => {
                        self.decode_errors += 1;
                        tracing::trace!(error = %err, "Skipping an undecodable DNS record.");
                    }
                }
            }
        }
        if let Some(ring) = self.http_events.as_mut() {
            while let Some(item) = ring.next() {
                let rec = match decode::http_record(&item, &clock) {
                    Ok(rec) => rec,
                    Err(err) => {
                        self.decode_errors += 1;
                        tracing::trace!(error = %err, "Skipping an undecodable HTTP record.");
                        continue;
                    }
                };
                match http::parse_request_line(rec.payload()) {
                    Ok(line) => {
                        self.http_requests += 1;
                        http.push(HttpRequest {
                            netns_ino: rec.netns_ino,
                            local: rec.local,
                            remote: rec.remote,
                            cgroup_id: rec.cgroup_id,
                            method: line.method,
                            path: line.path.into(),
                            unix_ms: rec.unix_ms,
                        });
                    }
                    Err(err) => {
                        self.http_unparsed += 1;
                        tracing::trace!(error = %err, local = %rec.local, "Ignoring a segment that is not an HTTP/1.x request line.");
                    }
                }
            }
        }
        if self.last_udp_sweep.elapsed() >= self.udp_sweep_interval {
            self.last_udp_sweep = Instant::now();
            self.sweep_udp(events, started_ns, &clock)?;
        }
        Ok(())
    }

    fn sweep_udp(
        &mut self,
        events: &mut Vec<SockEvent>,
        started_ns: u64,
        clock: &BootClock,
    ) -> Result<(), DatapathError> {
        let Some(map) = self.udp_flows.as_mut() else { return Ok(()) };
        let mut snapshot = Vec::new();
        for entry in map.iter() {
            match entry {
                Ok(kv) => snapshot.push(kv),
                // An entry deleted while we walk (LRU eviction): skip it.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(abi::UDP_FLOWS)(e)),
            }
        }
        let result = self.udp.sweep(snapshot, BootClock::boot_now_ns(), started_ns, clock);
        events.extend(result.events);
        for key in &result.expired {
            match map.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(abi::UDP_FLOWS)(e)),
            }
        }
        Ok(())
    }

    /// Cumulative kernel-side loss: events, DNS messages and HTTP request lines that
    /// did not fit in their ring buffers.
    pub fn ringbuf_dropped(&self) -> u64 {
        let c = self.counters();
        let dropped = c.flow_events_lost + c.dns_events_lost + c.http_events_lost;
        // Counters only grow; a failed read returns the last good value.
        let dropped = dropped.max(self.last_dropped.get());
        self.last_dropped.set(dropped);
        dropped
    }

    /// Every counter, for metrics.
    pub fn counters(&self) -> DatapathCounters {
        let read = |index: u32| -> u64 {
            match self.counters.get(&index, 0) {
                Ok(values) => values.iter().copied().fold(0u64, u64::wrapping_add),
                Err(err) => {
                    tracing::debug!(error = %err, index, "Could not read a datapath counter.");
                    0
                }
            }
        };
        DatapathCounters {
            flow_events_lost: read(abi::COUNTER_FLOW_LOST),
            dns_events_lost: read(abi::COUNTER_DNS_LOST),
            http_events_lost: read(abi::COUNTER_HTTP_LOST),
            http_requests: self.http_requests,
            http_unparsed: self.http_unparsed,
            kernel_read_failures: read(abi::COUNTER_READ_FAILED),
            udp_insert_failures: read(abi::COUNTER_UDP_INSERT_FAILED),
            decode_errors: self.decode_errors,
        }
    }

    /// The filter currently installed.
    pub fn netns_filter(&self) -> &NetnsFilter {
        &self.filter
    }

    /// The cgroup v2 directory the UDP programs are attached to, if attached.
    pub fn cgroup_root(&self) -> Option<&Path> {
        self.cgroup_root.as_deref()
    }

    /// Runs the loaded cgroup_skb ingress program `repeat` times on one synthetic packet
    /// in the kernel (`BPF_PROG_TEST_RUN`) and returns the kernel's mean time per run.
    /// `frame` is an Ethernet frame (the kernel strips the header; the program sees the
    /// IP packet, as on a real socket, with a dummy socket of this netns attached). What
    /// the program emits lands in the ring buffers like real traffic: drain between
    /// large runs. This is how the benchmark measures the per-packet cost of a code
    /// path without a network's noise.
    pub fn test_run_ingress(&self, frame: &[u8], repeat: u32) -> Result<Duration, DatapathError> {
        let name = abi::PROG_SKB_INGRESS;
        let prog: &CgroupSkb = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(DatapathError::program(name))?;
        let opts = TestRunOptions { data_in: Some(frame), repeat, ..TestRunOptions::default() };
        let result = prog.test_run(opts).map_err(DatapathError::program(name))?;
        Ok(result.duration)
    }

    /// Names of the loaded programs (for diagnostics).
    pub fn loaded_programs(&self) -> Vec<String> {
        self.ebpf.programs().map(|(name, _)| name.to_owned()).collect()
    }
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DatapathError> {
    ebpf.take_map(name).ok_or(DatapathError::MissingMap { name })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut aya::programs::Program, DatapathError> {
    ebpf.program_mut(name).ok_or(DatapathError::MissingProgram { name })
}

fn check_ringbuf_size(option: &'static str, bytes: u32) -> Result<(), DatapathError> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    if !bytes.is_power_of_two() || bytes < page {
        return Err(DatapathError::InvalidOption {
            option,
            value: u64::from(bytes),
            reason: "ring buffers must be a power of two and at least one page",
        });
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Raising it needs
/// CAP_SYS_RESOURCE, which our VMs do not grant; newer kernels charge memcg
/// instead, so failure is only worth a debug line.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: `rlim` is a valid rlimit for the duration of the call.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "Could not raise RLIMIT_MEMLOCK; continuing.");
    }
}

/// Where to attach the cgroup_skb programs: the explicit path, else the root of
/// the mounted cgroup2 hierarchy (`/sys/fs/cgroup/unified` in hybrid mode,
/// `/sys/fs/cgroup` in unified mode), else a cgroup2 we mount ourselves. It stays
/// mounted: the attachment outlives the mount anyway and others may use it.
fn cgroup_root(explicit: Option<&Path>) -> Result<PathBuf, DatapathError> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(mount) = crate::endpoints::cgroup2_mount() {
        return Ok(mount);
    }
    let target = PathBuf::from("/run/bulkhead/cgroup2");
    std::fs::create_dir_all(&target).map_err(|source| DatapathError::Cgroup { path: target.clone(), source })?;
    nix::mount::mount(Some("cgroup2"), &target, Some("cgroup2"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|errno| DatapathError::Cgroup { path: target.clone(), source: errno.into() })?;
    tracing::info!(path = %target.display(), "Mounted a cgroup2 hierarchy for the UDP programs.");
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ringbuf_sizes_are_checked() {
        assert!(check_ringbuf_size("x", 1 << 20).is_ok());
        assert!(matches!(check_ringbuf_size("x", 3 << 12), Err(DatapathError::InvalidOption { .. })));
        assert!(matches!(check_ringbuf_size("x", 1024), Err(DatapathError::InvalidOption { .. })));
    }

    #[test]
    fn default_options_are_valid() {
        let o = DatapathOptions::default();
        assert!(check_ringbuf_size("ringbuf_bytes", o.ringbuf_bytes).is_ok());
        assert!(check_ringbuf_size("dns_ringbuf_bytes", o.dns_ringbuf_bytes).is_ok());
        assert!(check_ringbuf_size("http_ringbuf_bytes", o.http_ringbuf_bytes).is_ok());
    }
}
