//! The enforcer's kernel ↔ user-space contract (DESIGN.md §5).
//!
//! Per packet of a managed workload the cgroup_skb programs look up, in a fixed
//! order and a constant number of steps (cost never grows with the rule count):
//!
//! 0. [`CONFIG`] → the active generation, whose parity ([`slot_of`]) picks the
//!    slot of every endpoint and ipcache value read below.
//! 1. [`ENDPOINTS`] by the endpoint key → identity, rollout mode, covered
//!    directions. No entry, an absent slot (mode 0) or mode `learn`: allowed,
//!    nothing else happens. The
//!    cgroup_skb programs key by the socket's cgroup id; the tc programs, which
//!    judge workloads that are bare network namespaces, by
//!    [`tc_endpoint_key`]`(netns cookie)` (see [`TC_KEY_FLAG`]).
//!    Everything after this step is the same code for both, except that only
//!    packets with a socket (cgroup_skb) look at [`SOCK_VERDICT`] next: the
//!    verdict of an established TCP connection copied there passes the packet
//!    at once while it holds (see [`SockVerdict`]: it never passes a packet
//!    step 2 would not). Counted as [`COUNTER_FAST_PATH`].
//!    When egress is judged at `connect()` ([`PROG_INGRESS_AT_CONNECT`]), the
//!    ingress program keeps no per-connection record for TCP: it judges every
//!    arriving segment (a SYN as inbound, a SYN-ACK as the answer to a
//!    `connect()`, any other segment in either direction) through [`DECISIONS`],
//!    whose hit replaces steps 3 and 4.
//! 2. [`CONNTRACK`] by the local-oriented 5-tuple: a packet of a known connection
//!    (either direction) passes without a policy lookup, as long as the entry was
//!    made under the active policy generation (a flip re-evaluates the connection
//!    on its next packet, so a revoked rule also stops established connections).
//! 3. [`IPCACHE`] (LPM trie, IPv4 as v4-mapped IPv6) → the peer's identity in
//!    the active slot; a miss is [`IDENTITY_WORLD`].
//! 4. [`POLICY`] probed with [`POLICY_PROBES`] wildcards under the active
//!    generation from [`CONFIG`].
//!
//! A policy version is applied atomically: one map update of
//! [`EnforcerConfig::active_generation`] switches every map at once.
//!
//! * [`POLICY`] is versioned by key ([`PolicyKey::generation`]): user space writes
//!   every entry of generation N+1, flips, then deletes generation N.
//! * [`ENDPOINTS`] and [`IPCACHE`] are double-buffered in their values: each holds
//!   two slots, one per generation parity ([`slot_of`]). Before the flip user
//!   space writes, for every key that changes, the old generation's view into
//!   the old slot (unchanged) and the new generation's into the other ("bridge"
//!   entries: an endpoint slot may be absent, a prefix slot holds what the other
//!   generation's longest-prefix match answers for it, since an LPM trie cannot
//!   fall through to a shorter prefix); after the flip it settles them (both
//!   slots equal) or deletes the keys the new generation does not have. Keys that
//!   do not change keep equal slots and are not written at all.
//!
//! No packet sees half a policy: a packet reads the configuration first and then
//! only entries of the generation it found there.
//!
//! Verdicts other than plain "allowed by a rule" are reported as [`VerdictEvent`]s
//! through the [`VERDICT_EVENTS`] ring buffer (submitted without wakeup,
//! rate-limited per CPU by a token bucket) and every decision is counted in
//! [`COUNTERS`].

// === Map names (≤ 15 characters: the kernel truncates at 16 with the NUL) ===

/// LPM trie [`IpcacheKey`] → [`IpcacheValue`].
/// V2: two identities per prefix (double-buffered, see the module doc).
pub const IPCACHE: &str = "IPCACHE_V2";
/// Hash [`PolicyKey`] → [`PolicyValue`].
pub const POLICY: &str = "POLICY_V1";
/// Hash [`EndpointKey`] → [`EndpointValue`]: the managed workloads of this node.
/// V2: two [`EndpointSlot`]s per key (double-buffered, see the module doc).
pub const ENDPOINTS: &str = "ENDPOINTS_V2";
/// LRU hash [`CtKey`] → [`CtValue`].
pub const CONNTRACK: &str = "CONNTRACK_V1";
/// Ring buffer of [`VerdictEvent`].
pub const VERDICT_EVENTS: &str = "VERDICTS_V1";
/// Per-CPU array of u64 counters, indexed by the `COUNTER_*` constants.
pub const COUNTERS: &str = "ENF_COUNTERS_V2";
/// Array[1] of [`EnforcerConfig`].
pub const CONFIG: &str = "ENF_CONFIG_V1";
/// Per-CPU array[1] of [`RateState`]: the verdict-event token bucket.
pub const EVENT_RATE: &str = "EVENT_RATE_V1";
/// LRU per-CPU hash: rule id (u32) → [`RuleStats`]; user space sums the CPUs.
pub const RULE_STATS: &str = "RULE_STATS_V1";

/// LPM trie over [`HttpKeyData`] → u32 (1): the HTTP requests L7 entries allow,
/// per generation and HTTP rule set ([`PolicyValue::http_set`]).
pub const HTTP_RULES: &str = "HTTP_RULES_V1";

/// Socket storage (`BPF_MAP_TYPE_SK_STORAGE`) → [`SockVerdict`]: the verdict
/// of an established TCP connection cached on its socket. A BTF map, never
/// pinned: each loaded copy of the programs has its own (an empty cache only
/// costs one slow-path packet per connection), and not in [`MAP_NAMES`].
pub const SOCK_VERDICT: &str = "SOCK_VERDICT_V1";

/// LRU hash [`DecisionKey`] → [`DecisionValue`]: policy decisions of the
/// ingress program of workloads whose egress is judged at `connect()`
/// ([`PROG_INGRESS_AT_CONNECT`]) and of the connect/sendmsg programs, by
/// generation, local identity, peer address, server port, protocol and
/// direction. Inserted once per such class of connection, never per connection.
pub const DECISIONS: &str = "DECISIONS_V1";

/// Program array of the programs the ingress program of workloads whose egress
/// is judged at `connect()` tail-calls ([`PROG_INGRESS_UDP`] at [`TAIL_UDP`],
/// [`PROG_INGRESS_L7`] at [`TAIL_L7`]): each gets a stack of its own, which the
/// three paths together would not fit in. Pinned like every map: the kernel
/// empties a program array when the last user-space reference goes.
pub const IN_CONN_TAILS: &str = "IN_CONN_TAILS";
pub const IN_CONN_TAIL_SLOTS: u32 = 2;
pub const TAIL_UDP: u32 = 0;
pub const TAIL_L7: u32 = 1;

/// Every map name, for pinning and cleanup code that must know them all.
pub const MAP_NAMES: [&str; 12] = [
    IPCACHE,
    POLICY,
    ENDPOINTS,
    CONNTRACK,
    VERDICT_EVENTS,
    COUNTERS,
    CONFIG,
    EVENT_RATE,
    RULE_STATS,
    HTTP_RULES,
    DECISIONS,
    IN_CONN_TAILS,
];
const _: () = {
    let mut i = 0;
    while i < MAP_NAMES.len() {
        assert!(MAP_NAMES[i].len() <= 15);
        i += 1;
    }
};

// === Program names (the Rust function names in enforcer/ebpf) ===

/// cgroup_skb ingress: the workload is a cgroup v2 directory.
pub const PROG_INGRESS: &str = "enforce_ingress";
/// cgroup_skb egress: egress judged per packet.
pub const PROG_EGRESS: &str = "enforce_egress";
/// cgroup_skb ingress of workloads whose egress is judged at `connect()` and
/// `sendmsg()` (the `PROG_CONNECT*`/`PROG_SENDMSG*` programs, with
/// [`PROG_SOCK_CREATE`]); attached instead of [`PROG_INGRESS`] + [`PROG_EGRESS`].
/// It judges TCP per segment through [`DECISIONS`] rather than recording connections.
pub const PROG_INGRESS_AT_CONNECT: &str = "enforce_in_conn";
/// Tail-called by [`PROG_INGRESS_AT_CONNECT`] for UDP datagrams.
pub const PROG_INGRESS_UDP: &str = "enforce_in_udp";
/// Tail-called by [`PROG_INGRESS_AT_CONNECT`] for segments of L7 connections.
pub const PROG_INGRESS_L7: &str = "enforce_in_l7";
/// sched_cls on the ingress of a workload's interface, inside its network
/// namespace (what arrives there is the workload's ingress).
pub const PROG_TC_INGRESS: &str = "enforce_tc_in";
/// sched_cls on the egress of a workload's interface, inside its namespace.
pub const PROG_TC_EGRESS: &str = "enforce_tc_out";
/// cgroup sock_addr `connect4`: egress judged once per connection (TCP, and UDP
/// sockets that connect), when egress is checked at connect.
pub const PROG_CONNECT4: &str = "enforce_connect4";
/// cgroup sock_addr `connect6`.
pub const PROG_CONNECT6: &str = "enforce_connect6";
/// cgroup sock_addr `sendmsg4`: each datagram an unconnected UDP socket sends to
/// an address (judged by conntrack, so once per flow).
pub const PROG_SENDMSG4: &str = "enforce_sendmsg4";
/// cgroup sock_addr `sendmsg6`.
pub const PROG_SENDMSG6: &str = "enforce_sendmsg6";
/// cgroup sock `sock_create`: refuses raw IP sockets of enforce-mode workloads
/// whose egress is covered, when egress is checked at connect (a raw socket
/// sends without `connect()`/`sendmsg()` to an address ever being judged).
pub const PROG_SOCK_CREATE: &str = "enforce_sock_create";

// === Endpoint keys of network-namespace workloads ===

/// Set in every tc endpoint key, never in a cgroup id, so one `ENDPOINTS` map
/// (and one conntrack, one event stream) serves both kinds of workload.
/// Cgroup ids are kernfs node ids: the inode number in the low 32 bits and a
/// generation that would need 2^31 wrap-arounds of 32-bit inode numbers to
/// reach bit 63.
pub const TC_KEY_FLAG: u64 = 1 << 63;

/// The [`EndpointKey`] of a workload that is a network namespace: its netns
/// cookie (`SO_NETNS_COOKIE`, unique for the boot and never reused, unlike
/// nsfs inode numbers) with [`TC_KEY_FLAG`] set.
pub const fn tc_endpoint_key(netns_cookie: u64) -> u64 {
    netns_cookie | TC_KEY_FLAG
}

/// Whether an endpoint key (also `CtKey::cgroup_id`, `VerdictEvent::cgroup_id`)
/// names a network-namespace workload rather than a cgroup.
pub const fn is_tc_endpoint_key(key: u64) -> bool {
    key & TC_KEY_FLAG != 0
}

/// The read-only global (a `u64` in `.rodata`) holding the endpoint key the tc
/// programs judge packets as. User space loads one copy of the tc programs
/// per network namespace with this set (`EbpfLoader::override_global`): a sched_cls
/// program has no way to learn which namespace a packet is in on ingress
/// (`bpf_get_netns_cookie(skb)` reports the *socket's* namespace, and an
/// arriving packet has no socket yet, so it reports the initial namespace).
pub const TC_ENDPOINT_KEY_GLOBAL: &str = "TC_ENDPOINT_KEY";

// === Default capacities (user space may override with `map_max_entries`) ===

pub const DEFAULT_IPCACHE_ENTRIES: u32 = 1 << 20;
/// Decisions by peer address and server port: one per class of connection, so a
/// node's working set fits many times over; an evicted one is made again.
pub const DEFAULT_DECISIONS: u32 = 1 << 16;
/// Two generations of up to 512k rules each.
pub const DEFAULT_POLICY_ENTRIES: u32 = 1 << 20;
pub const DEFAULT_ENDPOINTS: u32 = 4096;
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 18;
pub const DEFAULT_VERDICT_EVENTS_BYTES: u32 = 1 << 20;
pub const DEFAULT_RULE_STATS: u32 = 1 << 16;
/// Verdict events each CPU may emit per second once its burst is spent.
pub const DEFAULT_EVENT_RATE: u32 = 1000;
/// Verdict events each CPU may emit back to back.
pub const DEFAULT_EVENT_BURST: u32 = 200;

// === Reserved identities (bulkhead-model's numbering) ===

/// Wildcard in [`PolicyKey::peer_identity`]; never a real identity.
pub const IDENTITY_ANY: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
/// Any address outside every ipcache prefix.
pub const IDENTITY_WORLD: u32 = 2;

// === Rollout modes (EndpointValue::mode; never reuse a value) ===

/// No verdicts: every packet passes, nothing is reported. Also what 0 means.
pub const MODE_LEARN: u8 = 1;
/// Verdicts computed; would-deny connections pass and are reported as audit.
pub const MODE_MONITOR: u8 = 2;
/// Verdicts computed; denied connections are dropped and reported.
pub const MODE_ENFORCE: u8 = 3;

// === Endpoint flags ===

/// A policy selects this workload for ingress: unmatched ingress is denied.
pub const EP_INGRESS_COVERED: u8 = 1 << 0;
/// A policy selects this workload for egress: unmatched egress is denied.
pub const EP_EGRESS_COVERED: u8 = 1 << 1;

// === Directions (PolicyKey::direction, VerdictEvent::direction) ===

pub const DIR_INGRESS: u8 = 1;
pub const DIR_EGRESS: u8 = 2;

// === Policy actions (PolicyValue::action) ===

pub const ACTION_ALLOW: u8 = 1;
/// An explicit deny rule (wins when it is the first probe that matches).
pub const ACTION_DENY: u8 = 2;

// === Verdicts ===

pub const VERDICT_ALLOWED: u8 = 1;
/// Would have been denied; passed because the endpoint is in monitor mode.
pub const VERDICT_AUDIT: u8 = 2;
pub const VERDICT_DENIED: u8 = 3;

// === Verdict reasons ===

/// `rule_id` names the rule that decided.
pub const REASON_RULE: u8 = 1;
/// No rule matched in a covered direction.
pub const REASON_DEFAULT_DENY: u8 = 2;
/// The direction is not covered by any policy: allowed without a lookup.
pub const REASON_NOT_COVERED: u8 = 3;
/// A lookup that must succeed failed; the mode's fail action decided.
pub const REASON_FAIL: u8 = 4;
/// An HTTP request on a connection that an L7 entry allows matched none of the
/// entry's HTTP rules (`rule_id` names the connection's rule).
pub const REASON_HTTP: u8 = 5;

// === Fail actions (EnforcerConfig::fail_*) ===

/// Pass the packet when state is missing.
pub const FAIL_OPEN: u8 = 1;
/// Drop the packet when state is missing.
pub const FAIL_CLOSED: u8 = 2;

// === Counters (indices into COUNTERS) ===

/// New connections allowed by a rule or because the direction is not covered.
pub const COUNTER_ALLOWED: u32 = 0;
/// New connections that would have been denied, passed in monitor mode.
pub const COUNTER_AUDIT: u32 = 1;
/// Packets dropped in enforce mode (including fail-closed drops).
pub const COUNTER_DENIED: u32 = 2;
/// Packets passed by a conntrack entry.
pub const COUNTER_CT_HIT: u32 = 3;
/// Packets of unmanaged or learn-mode workloads (passed, nothing looked up).
pub const COUNTER_UNMANAGED: u32 = 4;
/// Packets of managed workloads that are neither TCP nor UDP (passed).
pub const COUNTER_OTHER_PROTO: u32 = 5;
/// Verdict events lost because the ring buffer was full.
pub const COUNTER_EVENTS_LOST: u32 = 6;
/// Verdict events suppressed by the rate limit.
pub const COUNTER_EVENTS_LIMITED: u32 = 7;
/// The fail action decided (a lookup that must succeed failed, or the packet
/// could not be parsed).
pub const COUNTER_FAIL: u32 = 8;
/// A conntrack insert failed (the connection is re-evaluated on its next packet).
pub const COUNTER_CT_INSERT_FAILED: u32 = 9;
/// Packets of established TCP connections passed by their socket's cached
/// verdict ([`SockVerdict`]) without parsing or a conntrack lookup.
pub const COUNTER_FAST_PATH: u32 = 10;
pub const COUNTER_COUNT: u32 = 11;

// === Kernel constants ===

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Key of the ipcache LPM trie: the kernel wants the prefix length first.
/// IPv4 prefixes are stored as v4-mapped IPv6 (`::ffff:a.b.c.d`, prefix length
/// plus 96) so one trie serves both families. Same layout as
/// `aya::maps::lpm_trie::Key<[u8; 16]>`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpcacheKey {
    /// Significant leading bits of `addr` (0..=128).
    pub prefixlen: u32,
    /// Network order: IPv6, or IPv4 mapped into `::ffff:0:0/96`.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<IpcacheKey>() == 20);

/// The 16-byte address the programs look up for an IPv4 address (network order).
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// Which of the two slots of an [`EndpointValue`] or [`IpcacheValue`] packets
/// judged under `generation` read: its parity. Consecutive generations use
/// different slots; user space must never flip between two generations of the
/// same parity (it could not bridge them).
pub const fn slot_of(generation: u32) -> usize {
    (generation & 1) as usize
}

/// An ipcache prefix's identity per generation parity ([`slot_of`]). Both slots
/// are equal except while a new generation is being applied.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IpcacheValue {
    /// Indexed by [`slot_of`]`(active generation)`.
    pub identity: [u32; 2],
}
const _: () = assert!(size_of::<IpcacheValue>() == 8);

impl IpcacheValue {
    /// The same identity for both generations (a settled entry).
    pub const fn both(identity: u32) -> Self {
        Self { identity: [identity, identity] }
    }
}

/// One allow (or deny) rule between two identities, in one generation.
/// Wildcards are 0; the probe order is [`POLICY_PROBES`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyKey {
    /// The generation this entry belongs to (double buffering).
    pub generation: u32,
    /// The selected (local) workload's identity.
    pub local_identity: u32,
    /// The peer's identity, or [`IDENTITY_ANY`].
    pub peer_identity: u32,
    /// Destination port of the connection (the server's), host order; 0 = any.
    pub port: u16,
    /// `IPPROTO_TCP` / `IPPROTO_UDP`; 0 = any.
    pub protocol: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`]: the direction of the connection's
    /// first packet as seen by the local workload.
    pub direction: u8,
}
const _: () = assert!(size_of::<PolicyKey>() == 16);

/// Wildcard probes, in order, as (specific peer, specific port, specific
/// protocol): the first entry found decides. Six lookups at most per new
/// connection, whatever the number of rules.
pub const POLICY_PROBES: [(bool, bool, bool); 6] = [
    (true, true, true),
    (true, false, true),
    (true, false, false),
    (false, true, true),
    (false, false, true),
    (false, false, false),
];

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PolicyValue {
    /// The rule's id, reported in verdicts and rule statistics (never 0).
    pub rule_id: u32,
    /// [`ACTION_ALLOW`] or [`ACTION_DENY`].
    pub action: u8,
    pub _pad: u8,
    /// 0: the entry allows the connection (L4). Otherwise the connection is
    /// allowed and every HTTP request arriving on it must match an entry of this
    /// set in [`HTTP_RULES`] (L7; ingress TCP entries only). Numbered per
    /// generation by user space. In what used to be padding, so the map layout
    /// (and pins of earlier builds) stays compatible: old entries read as L4.
    pub http_set: u16,
}
const _: () = assert!(size_of::<PolicyValue>() == 8);

/// A managed workload: the cgroup v2 id of its sockets (the cgroup directory's
/// inode, what `bpf_skb_cgroup_id` returns), or for a workload that is a bare
/// network namespace its [`tc_endpoint_key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EndpointKey {
    /// A cgroup id, or a [`tc_endpoint_key`] (bit 63 set). The name predates
    /// the tc programs and is kept so existing code and pins stay valid.
    pub cgroup_id: u64,
}
const _: () = assert!(size_of::<EndpointKey>() == 8);

/// A managed workload as one generation sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EndpointSlot {
    pub identity: u32,
    /// One of the `MODE_*` constants; 0 ([`EndpointSlot::ABSENT`]) means the
    /// workload is not managed in this generation (exactly as without an entry),
    /// and behaves as learn.
    pub mode: u8,
    /// `EP_*_COVERED` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<EndpointSlot>() == 8);

impl EndpointSlot {
    /// Not managed in this slot's generation.
    pub const ABSENT: Self = Self { identity: 0, mode: 0, flags: 0, _pad: [0; 2] };

    /// Whether the slot manages the workload at all (mode 0 does not).
    pub const fn is_present(&self) -> bool {
        self.mode != 0
    }
}

/// The value of [`ENDPOINTS`]: the workload per generation parity ([`slot_of`]).
/// Both slots are equal except while a new generation is being applied.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EndpointValue {
    /// Indexed by [`slot_of`]`(active generation)`.
    pub slot: [EndpointSlot; 2],
}
const _: () = assert!(size_of::<EndpointValue>() == 16);

impl EndpointValue {
    /// The same workload for both generations (a settled entry).
    pub const fn both(slot: EndpointSlot) -> Self {
        Self { slot: [slot, slot] }
    }
}

/// A connection as seen by one local workload: oriented local/remote, so a
/// packet and its reply find the same entry. The endpoint key keeps two managed
/// workloads on one node from sharing an entry (each side is judged by its own
/// policy). IPv4 addresses are v4-mapped like the ipcache.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    /// The workload's [`EndpointKey`] (cgroup id or [`tc_endpoint_key`]).
    pub cgroup_id: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<CtKey>() == 48);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    /// `CLOCK_BOOTTIME` ns of the first packet.
    pub created_ns: u64,
    /// `CLOCK_BOOTTIME` ns of the latest packet.
    pub last_ns: u64,
    /// Policy generation the verdict was made under; any other generation
    /// re-evaluates the connection.
    pub generation: u32,
    /// The deciding rule (0 when none).
    pub rule_id: u32,
    /// [`VERDICT_ALLOWED`] or [`VERDICT_AUDIT`] (denied connections get no entry).
    pub verdict: u8,
    /// Direction of the connection's first packet ([`DIR_INGRESS`] / [`DIR_EGRESS`]).
    pub origin: u8,
    /// [`PolicyValue::http_set`] of the entry that allowed it: its requests are
    /// checked against [`HTTP_RULES`] (0: L4, nothing to check). In former padding.
    pub http_set: u16,
    /// [`HTTP_STATE_REQUEST_SEEN`] once a request on it was judged.
    pub http_state: u8,
    pub _pad: [u8; 3],
}

/// [`CtValue::http_state`]: the connection's first request line was judged; later
/// payload that does not start a request is its body or a later request's
/// continuation. Before it, payload that is not a whole request line is judged as a
/// request that matches nothing (a split first request line cannot slip through).
pub const HTTP_STATE_REQUEST_SEEN: u8 = 1;
/// [`CtValue::http_state`]: an enforce-mode endpoint dropped a request on it and
/// reported it. TCP cannot deliver anything past the dropped segment, so every
/// later denial on the connection is that request again (a retransmission): it is
/// dropped without another event — one event per refused request, not per try.
pub const HTTP_STATE_DENIED_REPORTED: u8 = 2;
const _: () = assert!(size_of::<CtValue>() == 32);

/// [`DECISIONS`] key. The peer's address, not its identity: a hit skips the
/// ipcache walk. Valid for its generation and [`EnforcerConfig::sock_epoch`]
/// only (the ipcache and the rules change with the generation; user space bumps
/// the epoch after changing them in place), so a flip or a flush makes every
/// decision again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecisionKey {
    pub generation: u32,
    pub local_identity: u32,
    /// v4-mapped for IPv4, like the ipcache.
    pub remote_addr: [u8; 16],
    /// The server's port, host order: the local one for [`DIR_INGRESS`], the
    /// remote one for [`DIR_EGRESS`].
    pub port: u16,
    pub epoch: u16,
    pub protocol: u8,
    /// [`DIR_INGRESS`] or [`DIR_EGRESS`]: the direction the connection was opened in.
    pub direction: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<DecisionKey>() == 32);

/// [`DECISIONS`] value: what [`POLICY`] decided for a [`DecisionKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DecisionValue {
    /// The deciding rule (0 when none).
    pub rule_id: u32,
    pub peer_identity: u32,
    /// [`PolicyValue::http_set`] of the allowing entry (0: L4).
    pub http_set: u16,
    /// [`VERDICT_ALLOWED`] or [`VERDICT_DENIED`].
    pub verdict: u8,
    /// `REASON_*`.
    pub reason: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<DecisionValue>() == 16);

/// The verdict of an established TCP connection, cached on its socket
/// ([`SOCK_VERDICT`]) so the connection's further packets skip parsing and
/// conntrack (the per-packet fast path). It passes a packet only when the
/// conntrack entry it was copied from (or made with) would pass it too; it is
/// also checked against more than that entry:
///
/// * `generation` is the active one and `epoch` is [`EnforcerConfig::sock_epoch`]
///   (a flip or a conntrack flush re-judges the connection);
/// * the endpoint key is the packet's and that endpoint's active slot still has
///   `local_identity` (any other change goes through the slow path);
/// * the verdict is [`VERDICT_ALLOWED`], or [`VERDICT_AUDIT`] while the endpoint
///   is in monitor mode;
/// * the socket is still connected to the same peer: the tuple fields are
///   copied from the socket (`struct bpf_sock`) when the entry is written and
///   compared on every use, so a socket disconnected and connected elsewhere
///   (or listening) is judged again.
///
/// Only TCP full sockets in `ESTABLISHED` or `SYN_SENT` (a client's socket
/// once connect() fixed its peer) are written: never a listener (which sees the
/// SYNs of many peers), never UDP (one socket may talk to many peers); request
/// and time-wait sockets are not full sockets and have no storage. An
/// enforce-mode drop clears `verdict`. Kernel-private: user space never reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockVerdict {
    /// The [`EndpointKey`] the verdict was made for.
    pub endpoint_key: u64,
    /// `bpf_sock.dst_ip6` (network order) when written.
    pub dst_ip6: [u32; 4],
    /// `bpf_sock.dst_ip4` (network order) when written.
    pub dst_ip4: u32,
    /// `bpf_sock.src_port` (host order) when written.
    pub src_port: u32,
    /// `bpf_sock.dst_port` (network order) when written.
    pub dst_port: u32,
    /// The generation the verdict was made under (or found valid under).
    pub generation: u32,
    /// The endpoint's identity in that generation.
    pub local_identity: u32,
    /// The peer's identity, for diagnostics (0 when copied from a conntrack
    /// entry, which does not keep it); never checked: the ipcache changes only
    /// with the generation.
    pub peer_identity: u32,
    /// [`EnforcerConfig::sock_epoch`] when written.
    pub epoch: u16,
    /// [`VERDICT_ALLOWED`] or [`VERDICT_AUDIT`]; 0 = none (written when an
    /// enforce-mode endpoint drops the connection, so a switch back to monitor
    /// judges and reports it again, as it would without the cache).
    pub verdict: u8,
    /// Direction of the connection's first packet, as in [`CtValue::origin`]: a
    /// connection is re-judged in that direction even when its conntrack entry
    /// was evicted meanwhile (fast-path packets never touch it).
    pub origin: u8,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<SockVerdict>() == 56);

/// One audit or deny decision (or a fail action) as written into [`VERDICT_EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerdictEvent {
    /// `CLOCK_BOOTTIME` nanoseconds.
    pub ts_ns: u64,
    /// The workload's [`EndpointKey`] (cgroup id or [`tc_endpoint_key`]).
    pub cgroup_id: u64,
    /// v4-mapped for IPv4.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_identity: u32,
    pub peer_identity: u32,
    /// The deciding rule, 0 for default deny / not covered / fail.
    pub rule_id: u32,
    pub generation: u32,
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub family: u16,
    pub protocol: u8,
    /// Direction of this packet.
    pub direction: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `REASON_*`.
    pub reason: u8,
    /// The endpoint's mode when it was decided.
    pub mode: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<VerdictEvent>() == 80);

/// An HTTP verdict ([`REASON_HTTP`]): the [`VerdictEvent`] followed by the request
/// line the program read, so an analyst sees what was refused. A longer record in
/// the same ring buffer: a reader that knows only [`VerdictEvent`] reads its head.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpVerdictEvent {
    pub event: VerdictEvent,
    /// Zero-padded; all zero when the segment did not start with `METHOD SP` (it
    /// was judged as a request matching nothing).
    pub method: [u8; HTTP_METHOD_BYTES],
    /// As in an [`HTTP_RULES`] key: the path up to a 0 (space or `?` ended it), or
    /// 0xff from where the segment or the read ended.
    pub path: [u8; HTTP_PATH_BYTES],
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<HttpVerdictEvent>() == 232);

/// Run-time settings, one entry in [`CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnforcerConfig {
    /// The policy generation packets are judged by.
    pub active_generation: u32,
    /// Verdict events per second per CPU after the burst; 0 turns events off.
    pub event_rate: u32,
    /// Verdict events per CPU back to back.
    pub event_burst: u32,
    /// [`FAIL_OPEN`] / [`FAIL_CLOSED`] for monitor-mode endpoints.
    pub fail_monitor: u8,
    /// [`FAIL_OPEN`] / [`FAIL_CLOSED`] for enforce-mode endpoints.
    pub fail_enforce: u8,
    /// Socket verdicts ([`SockVerdict`]) hold only while this is unchanged:
    /// user space bumps it when it flushes conntrack, so every connection is
    /// judged again (0 in configurations written before it existed).
    pub sock_epoch: u16,
}
const _: () = assert!(size_of::<EnforcerConfig>() == 16);

impl EnforcerConfig {
    /// DESIGN.md §5 defaults: fail-open in monitor, fail-closed in enforce.
    pub const DEFAULT: Self = Self {
        active_generation: 0,
        event_rate: DEFAULT_EVENT_RATE,
        event_burst: DEFAULT_EVENT_BURST,
        fail_monitor: FAIL_OPEN,
        fail_enforce: FAIL_CLOSED,
        sock_epoch: 0,
    };
}

impl Default for EnforcerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

// === HTTP (L7) request matching ===

/// Bytes of an [`HTTP_RULES`] key after its prefix length: generation (4, native
/// order), HTTP rule set (2, native order), method (16, zero-padded; all zero =
/// any method), path ([`HTTP_PATH_BYTES`]). One LPM trie gives exact paths (the
/// path bytes and a 0 terminator are in the prefix), path prefixes (only the
/// prefix bytes are) and any path (no path byte is), longest match first.
pub const HTTP_KEY_DATA: usize = 152;
/// Offset of the method in [`HttpKeyData`].
pub const HTTP_KEY_METHOD: usize = 6;
/// Longest method token the datapath recognises (the model's limit).
pub const HTTP_METHOD_BYTES: usize = 16;
/// Offset of the path in [`HttpKeyData`].
pub const HTTP_KEY_PATH: usize = HTTP_KEY_METHOD + HTTP_METHOD_BYTES;
/// Path bytes in a key: 128 path bytes (the model's `MAX_HTTP_PATH_LEN`) and the
/// terminator of an exact path.
pub const HTTP_PATH_BYTES: usize = HTTP_KEY_DATA - HTTP_KEY_PATH;
const _: () = assert!(HTTP_PATH_BYTES == 130);
/// Capacity of [`HTTP_RULES`] (both generations while one is written).
pub const DEFAULT_HTTP_RULES: u32 = 1 << 16;

/// The data of an [`HTTP_RULES`] key (the LPM trie key is its prefix length in
/// bits followed by this).
pub type HttpKeyData = [u8; HTTP_KEY_DATA];

/// How an HTTP rule's path matches, for [`http_key`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpKeyPath<'a> {
    Any,
    Exact(&'a [u8]),
    Prefix(&'a [u8]),
}

/// The LPM key (prefix length in bits, data) of one HTTP rule: `method` empty for
/// any method. `None` when the method or path is longer than a key holds.
pub fn http_key(generation: u32, set: u16, method: &[u8], path: HttpKeyPath<'_>) -> Option<(u32, HttpKeyData)> {
    if method.len() > HTTP_METHOD_BYTES {
        return None;
    }
    let mut data = [0u8; HTTP_KEY_DATA];
    data[..4].copy_from_slice(&generation.to_ne_bytes());
    data[4..6].copy_from_slice(&set.to_ne_bytes());
    data[HTTP_KEY_METHOD..HTTP_KEY_METHOD + method.len()].copy_from_slice(method);
    let path_len = match path {
        HttpKeyPath::Any => 0,
        // The terminator (0) is already there.
        HttpKeyPath::Exact(p) if p.len() < HTTP_PATH_BYTES => p.len() + 1,
        HttpKeyPath::Prefix(p) if p.len() <= HTTP_PATH_BYTES => p.len(),
        _ => return None,
    };
    if let HttpKeyPath::Exact(p) | HttpKeyPath::Prefix(p) = path {
        data[HTTP_KEY_PATH..HTTP_KEY_PATH + p.len()].copy_from_slice(p);
    }
    Some((((HTTP_KEY_PATH + path_len) * 8) as u32, data))
}

/// Per-CPU token bucket as a GCRA: the next event is allowed once
/// `now >= tat_ns - burst * interval`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RateState {
    /// Theoretical arrival time of the next event, `CLOCK_BOOTTIME` ns.
    pub tat_ns: u64,
}
const _: () = assert!(size_of::<RateState>() == 8);

/// Per-rule use, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct RuleStats {
    /// Connections the rule decided.
    pub hits: u64,
    /// `CLOCK_BOOTTIME` ns of the latest hit.
    pub last_hit_ns: u64,
}
const _: () = assert!(size_of::<RuleStats>() == 16);
const _: () = assert!(is_tc_endpoint_key(tc_endpoint_key(1)) && !is_tc_endpoint_key(u32::MAX as u64));
const _: () = assert!(slot_of(0) != slot_of(1) && slot_of(u32::MAX) != slot_of(u32::MAX.wrapping_add(1)));
