//! The enforcer's kernel datapath: identity-based verdicts for the packets of
//! managed workloads. Two kinds of workload share every map and every line of
//! the decision code below:
//!
//! * **cgroups**: cgroup_skb ingress/egress on a cgroup v2 directory (every
//!   descendant cgroup inherits them); the endpoint key is the cgroup id of the
//!   packet's socket (`bpf_skb_cgroup_id`: the cgroup the socket was created in,
//!   also on ingress in softirq, unlike the current task's);
//! * **network namespaces**: sched_cls (tc) ingress/egress on the workload's
//!   interfaces *inside* its namespace, so tc ingress is the workload's ingress
//!   as with cgroup_skb; the endpoint key is the [`TC_ENDPOINT_KEY`] user space
//!   baked into this copy of the programs (one copy per namespace, see
//!   `bulkhead_abi::enforcer::TC_ENDPOINT_KEY_GLOBAL` for why).
//!
//! The two differ only in where the key comes from, where the IP header starts
//! (cgroup_skb: at offset 0; tc: after the link-layer header, read relative to
//! the kernel's network-header offset so Ethernet and L3 devices both work) and
//! how a verdict is spelled ([`PacketSource`]).
//!
//! Per packet, in a constant number of map lookups whatever the number of
//! rules (the contract and the lookup order are documented in
//! `bulkhead_abi::enforcer`):
//!
//! 0. the configuration: the active generation, whose parity picks the slot of
//!    every endpoint and ipcache value below (read first, so one packet never
//!    mixes two generations' endpoints, prefixes and rules);
//! 1. endpoint by key — unmanaged (no entry, or absent in this generation's
//!    slot) or `learn`: pass;
//! 2. IPv4/IPv6 + TCP/UDP parsing; anything else passes (ICMP, ARP, neighbour
//!    discovery, IPv6 behind extension headers, non-first IPv4 fragments seen by
//!    tc before reassembly — documented in user space);
//! 3. conntrack (local-oriented 5-tuple): a known connection passes if its
//!    verdict was made under the active generation;
//! 4. otherwise a new connection: ipcache → peer identity, then up to six policy
//!    probes (exact port → any port of the protocol → any port and protocol; then
//!    the same for any peer). Allowed connections enter conntrack, so replies
//!    pass (NetworkPolicy semantics); would-deny connections of monitor-mode
//!    endpoints pass, enter conntrack as audit (one event per connection) and are
//!    reported; in enforce mode they are dropped and reported.
#![no_std]
#![no_main]
// Map keys go by reference: by value, every call site copies its key onto the
// 512-byte stack, which the connect-time programs have little of to spare.
#![expect(clippy::needless_borrows_for_generic_args, reason = "see above")]

use aya_ebpf::{
    bindings::{
        BPF_RB_NO_WAKEUP, BPF_SK_STORAGE_GET_F_CREATE, BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT, TC_ACT_SHOT,
        TC_ACT_UNSPEC, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock,
    },
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_current_cgroup_id, bpf_ktime_get_boot_ns, bpf_sk_fullsock, bpf_sk_storage_get, bpf_skb_cgroup_id,
        bpf_skb_load_bytes, bpf_skb_load_bytes_relative, bpf_skb_pull_data,
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, classifier, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, ProgramArray, RingBuf, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext, SockContext, TcContext},
};
use bulkhead_abi::enforcer::{
    ACTION_ALLOW, AF_INET, AF_INET6, COUNTER_ALLOWED, COUNTER_AUDIT, COUNTER_COUNT, COUNTER_CT_HIT,
    COUNTER_CT_INSERT_FAILED, COUNTER_DENIED, COUNTER_EVENTS_LIMITED, COUNTER_EVENTS_LOST, COUNTER_FAIL,
    COUNTER_FAST_PATH, COUNTER_OTHER_PROTO, COUNTER_UNMANAGED, CtKey, CtValue, DEFAULT_CONNTRACK_ENTRIES,
    DEFAULT_DECISIONS, DEFAULT_ENDPOINTS, DEFAULT_HTTP_RULES, DEFAULT_IPCACHE_ENTRIES, DEFAULT_POLICY_ENTRIES,
    DEFAULT_RULE_STATS, DEFAULT_VERDICT_EVENTS_BYTES, DIR_EGRESS, DIR_INGRESS, DecisionKey, DecisionValue,
    EP_EGRESS_COVERED, EP_INGRESS_COVERED, EndpointKey, EndpointSlot, EndpointValue, EnforcerConfig, FAIL_CLOSED,
    FAIL_OPEN, HTTP_KEY_DATA, HTTP_KEY_METHOD, HTTP_KEY_PATH, HTTP_METHOD_BYTES, HTTP_PATH_BYTES,
    HTTP_STATE_DENIED_REPORTED, HTTP_STATE_REQUEST_SEEN, HttpKeyData, HttpVerdictEvent, IDENTITY_ANY, IDENTITY_WORLD,
    IN_CONN_TAIL_SLOTS, IPPROTO_TCP, IPPROTO_UDP, IpcacheValue, MODE_ENFORCE, MODE_MONITOR, PolicyKey, PolicyValue,
    REASON_DEFAULT_DENY, REASON_HTTP, REASON_NOT_COVERED, REASON_RULE, RateState, RuleStats, SockVerdict, TAIL_L7,
    TAIL_UDP, VERDICT_ALLOWED, VERDICT_AUDIT, VERDICT_DENIED, VerdictEvent, v4_mapped,
};

/// Verdict of the shared decision code: let the packet through. Equal to the
/// cgroup_skb return value; the tc programs translate it ([`tc_verdict`]).
const PASS: i32 = 1;
/// Verdict of the shared decision code: drop the packet (with cgroup_skb the
/// sender sees EPERM on egress).
const DROP: i32 = 0;

/// tc "no objection": continue with the next program on the interface (TCX
/// `TCX_NEXT`, cls_bpf's "no match"), and pass the packet when there is none.
/// Not `TC_ACT_OK`, which would end the chain and keep other programs on the
/// same interface (another agent's, a CNI's) from seeing allowed packets.
const TC_PASS: i32 = TC_ACT_UNSPEC;
/// tc: drop the packet.
const TC_DROP: i32 = TC_ACT_SHOT;

/// ETH_P_IP / ETH_P_IPV6 as `__sk_buff::protocol` holds them (network order in
/// the low 16 bits).
const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86ddu16.to_be() as u32;

/// The endpoint key the tc programs judge packets as: `tc_endpoint_key(netns
/// cookie)` of the namespace this copy is attached in, written by user space at
/// load time (`TC_ENDPOINT_KEY_GLOBAL`). 0 (never a key) in a copy loaded
/// without it: its packets are unmanaged and pass.
#[unsafe(no_mangle)]
static TC_ENDPOINT_KEY: u64 = 0;

/// `SOCK_RAW` as `bpf_sock.type`.
const SOCK_RAW: u32 = 3;
/// TCP header flags (byte 13).
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// What happens to a packet of a monitor-mode endpoint when state that must
/// exist is missing (the config entry is unreadable, the packet cannot be
/// parsed) and the configured choice cannot be read either: fail-open. Monitor
/// mode promises never to drop (DESIGN.md §5).
const FAIL_ACTION_MONITOR: i32 = PASS;
/// The same for enforce-mode endpoints: fail-closed. An enforced workload must
/// not become reachable because the enforcer's state broke (DESIGN.md §5).
const FAIL_ACTION_ENFORCE: i32 = DROP;

/// Conntrack's `last_ns` is refreshed by a hit only once it is older than this.
const CT_TOUCH_NS: u64 = 1_000_000_000;

#[map]
static IPCACHE_V2: LpmTrie<[u8; 16], IpcacheValue> = LpmTrie::with_max_entries(DEFAULT_IPCACHE_ENTRIES, 0);
#[map]
static POLICY_V1: HashMap<PolicyKey, PolicyValue> = HashMap::with_max_entries(DEFAULT_POLICY_ENTRIES, 0);
#[map]
static ENDPOINTS_V2: HashMap<EndpointKey, EndpointValue> = HashMap::with_max_entries(DEFAULT_ENDPOINTS, 0);
#[map]
static CONNTRACK_V1: LruHashMap<CtKey, CtValue> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_ENTRIES, 0);
#[map]
static VERDICTS_V1: RingBuf = RingBuf::with_byte_size(DEFAULT_VERDICT_EVENTS_BYTES, 0);
#[map]
static ENF_COUNTERS_V2: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
static ENF_CONFIG_V1: Array<EnforcerConfig> = Array::with_max_entries(1, 0);
#[map]
static EVENT_RATE_V1: PerCpuArray<RateState> = PerCpuArray::with_max_entries(1, 0);
/// The programs [`enforce_in_conn`] tail-calls: [`TAIL_UDP`], [`TAIL_L7`].
#[map]
static IN_CONN_TAILS: ProgramArray = ProgramArray::with_max_entries(IN_CONN_TAIL_SLOTS, 0);
/// The decision [`enforce_in_conn`] hands to [`enforce_in_l7`] (per CPU).
#[map]
static L7_ARGS: PerCpuArray<L7Args> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct L7Args {
    rule_id: u32,
    peer_identity: u32,
    http_set: u16,
    _pad: u16,
}

#[map]
static DECISIONS_V1: LruHashMap<DecisionKey, DecisionValue> = LruHashMap::with_max_entries(DEFAULT_DECISIONS, 0);
#[map]
static RULE_STATS_V1: LruPerCpuHashMap<u32, RuleStats> = LruPerCpuHashMap::with_max_entries(DEFAULT_RULE_STATS, 0);
#[map]
static HTTP_RULES_V1: LpmTrie<HttpKeyData, u32> = LpmTrie::with_max_entries(DEFAULT_HTTP_RULES, 0);
/// Per-CPU scratch for [`http_check`]: the request line's first bytes and the
/// lookup key are too big for the 512-byte stack.
#[map]
static HTTP_SCRATCH: PerCpuArray<HttpScratch> = PerCpuArray::with_max_entries(1, 0);

/// Bytes of a segment [`http_check`] reads: a 16-byte method, a space, a 128-byte
/// path and its terminator. [`HTTP_RAW`] is the power of two the verifier-friendly
/// length mask needs.
const HTTP_READ: usize = HTTP_METHOD_BYTES + 1 + HTTP_PATH_BYTES;
const HTTP_RAW: usize = 256;
const _: () = assert!(HTTP_READ <= HTTP_RAW && HTTP_RAW.is_power_of_two());

#[repr(C)]
struct HttpScratch {
    raw: [u8; HTTP_RAW],
    key: Key<HttpKeyData>,
    /// The method of the request line last judged (the key's method is cleared
    /// for the "any method" lookup), for its event; all zero when there was none.
    method: [u8; HTTP_METHOD_BYTES],
    /// 1 when `key` holds the path of the request line last judged.
    path_read: u8,
}

/// `bulkhead_abi::enforcer::SOCK_VERDICT`: socket storage needs BTF for its key
/// and value, hence a BTF map next to the legacy ones.
#[btf_map]
static SOCK_VERDICT_V1: SkStorage<SockVerdict> = SkStorage::new();

/// Ingress of cgroup workloads whose egress is judged per packet by
/// [`enforce_egress`].
#[cgroup_skb(ingress)]
pub fn enforce_ingress(ctx: SkBuffContext) -> i32 {
    verdict(try_enforce(&CgroupPacket(&ctx), DIR_INGRESS))
}

#[cgroup_skb(egress)]
pub fn enforce_egress(ctx: SkBuffContext) -> i32 {
    verdict(try_enforce(&CgroupPacket(&ctx), DIR_EGRESS))
}

/// Ingress of cgroup workloads whose egress is judged at `connect()` and
/// `sendmsg()` (the sock_addr programs below, with [`enforce_sock_create`]):
/// a separate program, not a run-time switch, because one program holding both
/// ways of finding a connection's verdict exceeds the 512-byte stack.
#[cgroup_skb(ingress)]
pub fn enforce_in_conn(ctx: SkBuffContext) -> i32 {
    verdict(try_ingress_at_connect(&CgroupPacket(&ctx)))
}

#[classifier]
pub fn enforce_tc_in(ctx: TcContext) -> i32 {
    tc_verdict(verdict(try_enforce(&TcPacket(&ctx), DIR_INGRESS)))
}

#[classifier]
pub fn enforce_tc_out(ctx: TcContext) -> i32 {
    tc_verdict(verdict(try_enforce(&TcPacket(&ctx), DIR_EGRESS)))
}

/// Egress of a TCP connection or a connected UDP socket, judged once at
/// `connect()`: 0 makes it fail with EPERM.
#[cgroup_sock_addr(connect4)]
pub fn enforce_connect4(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, false, false))
}

#[cgroup_sock_addr(connect6)]
pub fn enforce_connect6(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, true, false))
}

/// Egress of an unconnected UDP socket, judged per datagram sent to an address
/// (conntrack makes that one policy decision per flow).
#[cgroup_sock_addr(sendmsg4)]
pub fn enforce_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, false, true))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn enforce_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict(try_sock_addr(&ctx, true, true))
}

/// Refuses raw IP sockets to enforce-mode workloads whose egress is covered
/// when egress is judged at connect: a raw socket (or any socket with
/// `IP_HDRINCL`) sends TCP and UDP that no `connect()` or `sendmsg()` hook
/// ever sees. Monitor mode counts them as audits and lets them be.
#[cgroup_sock(sock_create)]
pub fn enforce_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the context's socket; `type` is readable in sock_create programs.
    let ty = unsafe { core::ptr::read_volatile(&raw const (*ctx.sock).type_) };
    if ty != SOCK_RAW {
        return PASS;
    }
    // SAFETY: helper without arguments (sockets are created in process context).
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let Managed::Yes(_, ep) = managed(cgroup_id) else { return PASS };
    if !covers(&ep, DIR_EGRESS) {
        return PASS;
    }
    if ep.mode == MODE_MONITOR {
        count(COUNTER_AUDIT);
        return PASS;
    }
    count(COUNTER_DENIED);
    DROP
}

#[inline(always)]
fn tc_verdict(v: i32) -> i32 {
    if v == DROP { TC_DROP } else { TC_PASS }
}

/// What differs between the program types: where the endpoint key comes from
/// and how the IP header is read. Everything else is [`try_enforce`].
trait PacketSource {
    /// The key of the workload the packet belongs to in `ENDPOINTS_V2`.
    fn endpoint_key(&self) -> u64;
    /// Whether the packet is IPv4 or IPv6 at all (cheap; before any load).
    fn is_ip(&self) -> bool;
    /// Reads a `T` at `offset` bytes from the start of the IP header.
    fn load<T>(&self, offset: usize) -> Result<T, i64>;
    /// The packet's socket (`skb->sk`, possibly a request or time-wait socket),
    /// if its verdict may be cached; null otherwise.
    fn socket(&self) -> *mut bpf_sock;
    /// Copies `len` bytes at `offset` from the start of the IP header to `dst`;
    /// 0 on success.
    fn load_bytes(&self, offset: usize, dst: *mut u8, len: u32) -> i64;
}

/// A cgroup_skb packet: starts at the IP header, belongs to a socket's cgroup.
struct CgroupPacket<'a>(&'a SkBuffContext);

impl PacketSource for CgroupPacket<'_> {
    #[inline(always)]
    fn endpoint_key(&self) -> u64 {
        // SAFETY: helper taking the program's own skb.
        unsafe { bpf_skb_cgroup_id(self.0.skb.skb) }
    }

    #[inline(always)]
    fn is_ip(&self) -> bool {
        // cgroup_skb only runs for IP packets; the version nibble decides.
        true
    }

    /// Direct packet access where the bytes are in the linear area (always so
    /// for the IP and TCP/UDP headers the stack built or pulled; readable by
    /// privileged cgroup_skb programs), `bpf_skb_load_bytes` otherwise: one bounds
    /// check instead of a helper call per field.
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, i64> {
        // SAFETY: context fields the verifier rewrites into the packet bounds.
        let (start, end) = unsafe {
            let skb = self.0.skb.skb;
            ((*skb).data as usize, (*skb).data_end as usize)
        };
        if start + offset + size_of::<T>() <= end {
            // SAFETY: within [data, data_end), which the verifier checks too.
            return Ok(unsafe { ((start + offset) as *const T).read_unaligned() });
        }
        self.0.load(offset)
    }

    #[inline(always)]
    fn socket(&self) -> *mut bpf_sock {
        // SAFETY: `sk` is a context field the verifier rewrites into a checked
        // load (a `sock_common` pointer or null).
        unsafe { core::ptr::read_volatile(&raw const (*self.0.skb.skb).__bindgen_anon_2.sk) }
    }

    #[inline(always)]
    fn load_bytes(&self, offset: usize, dst: *mut u8, len: u32) -> i64 {
        // SAFETY: the helper writes at most `len` bytes to `dst`, which the caller
        // sized; cgroup_skb packets start at the IP header.
        unsafe { bpf_skb_load_bytes(self.0.skb.skb as *const _, offset as u32, dst as *mut _, len) }
    }
}

/// A tc packet: starts at the link-layer header (Ethernet on a veth, nothing on
/// an L3 device), belongs to the namespace this copy of the program serves.
struct TcPacket<'a>(&'a TcContext);

impl PacketSource for TcPacket<'_> {
    #[inline(always)]
    fn endpoint_key(&self) -> u64 {
        // SAFETY: a plain u64 in .rodata; the volatile read keeps the compiler
        // from folding the 0 it was compiled with (user space rewrites it).
        unsafe { core::ptr::read_volatile(&raw const TC_ENDPOINT_KEY) }
    }

    #[inline(always)]
    fn is_ip(&self) -> bool {
        let proto = self.0.skb.protocol();
        proto == ETH_P_IP_BE || proto == ETH_P_IPV6_BE
    }

    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, i64> {
        let mut v = core::mem::MaybeUninit::<T>::uninit();
        // SAFETY: the helper writes exactly size_of::<T>() bytes into `v` or
        // fails; `v` is only read after success. Relative to the network header
        // the kernel recorded, so the link-layer header length never matters.
        let ret = unsafe {
            bpf_skb_load_bytes_relative(
                self.0.skb.skb as *const _,
                offset as u32,
                v.as_mut_ptr() as *mut _,
                size_of::<T>() as u32,
                BPF_HDR_START_NET,
            )
        };
        if ret == 0 {
            // SAFETY: initialised by the successful helper call.
            Ok(unsafe { v.assume_init() })
        } else {
            Err(ret)
        }
    }

    #[inline(always)]
    fn socket(&self) -> *mut bpf_sock {
        // tc ingress runs before the socket lookup (no socket yet), and egress
        // is judged as before: no socket cache for namespace workloads.
        core::ptr::null_mut()
    }

    /// Relative to the network header, which reads the linear area only; a payload
    /// in page fragments (common on veth) is pulled in first — only for the
    /// request lines of L7 connections, never on the per-packet path.
    #[inline(always)]
    fn load_bytes(&self, offset: usize, dst: *mut u8, len: u32) -> i64 {
        let skb = self.0.skb.skb;
        // SAFETY: as for cgroup_skb; the helpers take the program's own skb, and no
        // packet pointer is held across the pull.
        unsafe {
            let ret =
                bpf_skb_load_bytes_relative(skb as *const _, offset as u32, dst as *mut _, len, BPF_HDR_START_NET);
            if ret == 0 {
                return 0;
            }
            // Length 0 would only make the linear part writable; the whole packet
            // (from the link-layer header) is what must become linear.
            if bpf_skb_pull_data(skb, self.0.skb.len()) != 0 {
                return ret;
            }
            bpf_skb_load_bytes_relative(skb as *const _, offset as u32, dst as *mut _, len, BPF_HDR_START_NET)
        }
    }
}

/// `Err` carries the fail action already chosen for the endpoint's mode. The
/// result is re-derived from constants: the verifier insists on a return value
/// it can prove to be 0 or 1, and a value passed through `Result` loses that.
#[inline(always)]
fn verdict(result: Result<i32, i32>) -> i32 {
    let v = match result {
        Ok(v) => v,
        Err(v) => {
            count(COUNTER_FAIL);
            if v == DROP {
                count(COUNTER_DENIED);
            }
            v
        }
    };
    if v == DROP { DROP } else { PASS }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = ENF_COUNTERS_V2.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The fail action of an endpoint in `mode`, from the config if readable.
#[inline(always)]
fn fail_action(mode: u8, cfg: Option<&EnforcerConfig>) -> i32 {
    let (choice, fallback) = if mode == MODE_ENFORCE {
        (cfg.map(|c| c.fail_enforce), FAIL_ACTION_ENFORCE)
    } else {
        (cfg.map(|c| c.fail_monitor), FAIL_ACTION_MONITOR)
    };
    match choice {
        Some(FAIL_CLOSED) => DROP,
        Some(FAIL_OPEN) => PASS,
        _ => fallback,
    }
}

/// The parts of a packet a verdict depends on, oriented local/remote.
struct Packet {
    family: u16,
    protocol: u8,
    local_addr: [u8; 16],
    remote_addr: [u8; 16],
    local_port: u16,
    remote_port: u16,
    /// Offset of the TCP/UDP header from the start of the IP header.
    l4: usize,
}

/// Parses IPv4/IPv6 + TCP/UDP. `Ok(None)`: another protocol (passes).
#[inline(always)]
fn parse<P: PacketSource>(ctx: &P, dir: u8) -> Result<Option<Packet>, i64> {
    if !ctx.is_ip() {
        return Ok(None);
    }
    // Offsets below are from the start of the IP header. Two bytes, not one:
    // a one-byte bounds check at offset 0 compiles to `data < data_end`, from
    // which the verifier learns no packet range.
    let [first, _]: [u8; 2] = ctx.load(0)?;
    let (family, protocol, src, dst, l4) = match first >> 4 {
        4 => {
            let protocol: u8 = ctx.load(9)?;
            if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
                return Ok(None);
            }
            let frag: [u8; 2] = ctx.load(6)?;
            // Non-first fragments carry no ports. cgroup_skb sees datagrams before
            // fragmentation (egress) and after reassembly (ingress), so there this
            // is defensive only; tc sees the fragments themselves and judges a
            // datagram by its first one (without which the rest never reassembles).
            if u16::from_be_bytes(frag) & 0x1fff != 0 {
                return Ok(None);
            }
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return Err(-1);
            }
            let s: [u8; 4] = ctx.load(12)?;
            let d: [u8; 4] = ctx.load(16)?;
            (AF_INET, protocol, v4_mapped(s), v4_mapped(d), ihl)
        }
        6 => {
            let protocol: u8 = ctx.load(6)?;
            if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
                return Ok(None);
            }
            let s: [u8; 16] = ctx.load(8)?;
            let d: [u8; 16] = ctx.load(24)?;
            (AF_INET6, protocol, s, d, 40)
        }
        _ => return Ok(None),
    };
    let ports: [u8; 4] = ctx.load(l4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    Ok(Some(if dir == DIR_EGRESS {
        Packet { family, protocol, local_addr: src, remote_addr: dst, local_port: sport, remote_port: dport, l4 }
    } else {
        Packet { family, protocol, local_addr: dst, remote_addr: src, local_port: dport, remote_port: sport, l4 }
    }))
}

/// What decided a new connection.
#[derive(Clone, Copy)]
struct Decision {
    verdict: u8,
    reason: u8,
    rule_id: u32,
    peer_identity: u32,
    /// The allowing entry's HTTP rule set (0: L4).
    http_set: u16,
    /// Made just now rather than found in `DECISIONS_V1` ([`judge`]).
    fresh: bool,
}

impl Decision {
    /// A direction the endpoint's policy does not cover: allowed, by no rule.
    const NOT_COVERED: Decision = Decision {
        verdict: VERDICT_ALLOWED,
        reason: REASON_NOT_COVERED,
        rule_id: 0,
        peer_identity: 0,
        http_set: 0,
        fresh: false,
    };
}

/// Whether `ep`'s policy covers connections opened in direction `dir` (default
/// deny applies only to covered directions).
#[inline(always)]
fn covers(ep: &EndpointSlot, dir: u8) -> bool {
    let flag = if dir == DIR_INGRESS { EP_INGRESS_COVERED } else { EP_EGRESS_COVERED };
    ep.flags & flag != 0
}

/// Whether a conntrack entry's verdict, made under `generation`, still passes
/// its connection's packets: made under the active generation, and allowed, or
/// audited while the endpoint is still in monitor mode.
#[inline(always)]
fn ct_holds(generation: u32, verdict: u8, active_generation: u32, mode: u8) -> bool {
    generation == active_generation
        && (verdict == VERDICT_ALLOWED || (verdict == VERDICT_AUDIT && mode == MODE_MONITOR))
}

/// Whether and how an endpoint is judged: the prologue every program shares.
enum Managed {
    /// No entry, absent in the active generation's slot, or `learn`: pass.
    No,
    /// Managed, but the configuration is unreadable: the mode's fail action.
    Fail(i32),
    Yes(EnforcerConfig, EndpointSlot),
}

/// The active configuration and `endpoint_key`'s slot in it.
#[inline(always)]
fn managed(endpoint_key: u64) -> Managed {
    // The generation first: it names the slot of every value read below. An
    // unreadable config (the array always has its one entry, so never in
    // practice) reads slot 0 to learn the mode whose fail action applies.
    let cfg = ENF_CONFIG_V1.get(0).copied();
    let odd = match &cfg {
        Some(c) => c.active_generation & 1 != 0,
        None => false,
    };
    // SAFETY: the slot is copied at once.
    let ep: EndpointSlot = match unsafe { ENDPOINTS_V2.get(EndpointKey { cgroup_id: endpoint_key }) } {
        Some(v) => endpoint_slot(v, odd),
        None => {
            count(COUNTER_UNMANAGED);
            return Managed::No;
        }
    };
    // Also an absent slot (mode 0): not managed in this generation.
    if ep.mode != MODE_MONITOR && ep.mode != MODE_ENFORCE {
        count(COUNTER_UNMANAGED);
        return Managed::No;
    }
    match cfg {
        Some(cfg) => Managed::Yes(cfg, ep),
        None => Managed::Fail(fail_action(ep.mode, None)),
    }
}

/// `sk`'s TCP state (`TCP_ESTABLISHED` for a connected UDP socket, `TCP_CLOSE`
/// for an unconnected one); a `sock_common` field, so any socket pointer will do.
#[inline(always)]
fn sock_state(sk: *mut bpf_sock) -> u32 {
    // SAFETY: `sk` is a non-null socket pointer the caller checked.
    unsafe { core::ptr::read_volatile(&raw const (*sk).state) }
}

/// The verdict for one packet of the workload `ctx` belongs to, the same for
/// every program type, egress judged per packet (see [`try_ingress_at_connect`]
/// for the ingress of workloads whose egress is judged at `connect()`).
#[inline(always)]
fn try_enforce<P: PacketSource>(ctx: &P, dir: u8) -> Result<i32, i32> {
    // A cgroup id or a tc endpoint key; named after the ABI field it fills.
    let cgroup_id = ctx.endpoint_key();
    let (cfg, ep) = match managed(cgroup_id) {
        Managed::No => return Ok(PASS),
        Managed::Fail(action) => return Err(action),
        Managed::Yes(cfg, ep) => (cfg, ep),
    };
    // The fast path: an established TCP connection whose verdict is cached on
    // its socket and still holds passes without parsing or conntrack.
    let sk = ctx.socket();
    let cached = sock_verdict(sk);
    if !cached.is_null() && sock_verdict_holds(cached, sk, cgroup_id, &ep, &cfg) {
        count(COUNTER_FAST_PATH);
        return Ok(PASS);
    }
    let pkt = match parse(ctx, dir) {
        Ok(Some(pkt)) => pkt,
        Ok(None) => {
            count(COUNTER_OTHER_PROTO);
            return Ok(PASS);
        }
        Err(_) => return Err(fail_action(ep.mode, Some(&cfg))),
    };

    let key = CtKey {
        cgroup_id,
        local_addr: pkt.local_addr,
        remote_addr: pkt.remote_addr,
        local_port: pkt.local_port,
        remote_port: pkt.remote_port,
        protocol: pkt.protocol,
        _pad: [0; 3],
    };
    let now = now_ns();
    let generation = cfg.active_generation;
    let mut origin = dir;
    let mut created_ns = now;
    if let Some(ct) = CONNTRACK_V1.get_ptr_mut(key) {
        // SAFETY: `ct` points into a map value that lives while the program runs;
        // concurrent updates of `last_ns` by other CPUs are benign.
        let (ct_gen, ct_verdict, ct_origin, ct_created) =
            unsafe { ((*ct).generation, (*ct).verdict, (*ct).origin, (*ct).created_ns) };
        if ct_holds(ct_gen, ct_verdict, generation, ep.mode) {
            // Written at most every CT_TOUCH_NS: a shared cache line written by
            // every packet on every CPU costs more than the freshness is worth.
            // SAFETY: as above.
            unsafe {
                if now.wrapping_sub((*ct).last_ns) > CT_TOUCH_NS {
                    (*ct).last_ns = now;
                }
            }
            count(COUNTER_CT_HIT);
            // (The conntrack entry does not keep the peer's identity.)
            // SAFETY: as above.
            let http_set = unsafe { (*ct).http_set };
            if http_set == 0 || ct_verdict != VERDICT_ALLOWED {
                let known = Decision {
                    verdict: ct_verdict,
                    reason: 0,
                    rule_id: 0,
                    peer_identity: 0,
                    http_set: 0,
                    fresh: false,
                };
                remember(sk, &pkt, cgroup_id, &ep, &cfg, &known, ct_origin);
                return Ok(PASS);
            }
            // An L7 connection: never cached on its socket (every request is
            // judged here); requests arrive at the server.
            if dir != DIR_INGRESS || ct_origin != DIR_INGRESS || pkt.protocol != IPPROTO_TCP {
                return Ok(PASS);
            }
            return l7_request(ctx, &pkt, ct, &cfg, &ep, cgroup_id, now);
        }
        // Made under another generation, or audited and now enforced: judge the
        // connection again, in the direction it was opened.
        origin = ct_origin;
        created_ns = ct_created;
    } else if !cached.is_null() && sock_verdict_is_this_connection(cached, sk, cgroup_id) {
        // An established connection whose conntrack entry was evicted while its
        // packets took the fast path: its socket still knows the direction.
        // SAFETY: a checked socket-storage value.
        origin = unsafe { (*cached).origin };
    }

    let d = decide(&ep, &pkt, origin, generation);
    if d.verdict == VERDICT_ALLOWED {
        count(COUNTER_ALLOWED);
        if d.rule_id != 0 {
            rule_hit(d.rule_id, now);
        }
        // A connection whose verdict now sits on its own TCP socket needs no
        // conntrack entry: that socket carries every later packet and reply (an
        // LRU insert, and later an eviction, saved per connection). Listeners,
        // request sockets, UDP and tc (no socket) are tracked as before.
        // An L7 connection stays in conntrack (its requests are judged there).
        if d.http_set != 0 || !remember(sk, &pkt, cgroup_id, &ep, &cfg, &d, origin) {
            track(&key, created_ns, now, generation, &d, origin);
        }
        return Ok(PASS);
    }
    if ep.mode == MODE_MONITOR {
        count(COUNTER_AUDIT);
        let audit = Decision { verdict: VERDICT_AUDIT, ..d };
        report(&cfg, &ep, &pkt, cgroup_id, dir, &audit, now);
        if !remember(sk, &pkt, cgroup_id, &ep, &cfg, &audit, origin) {
            track(&key, created_ns, now, generation, &audit, origin);
        }
        return Ok(PASS);
    }
    // Enforce: forget an entry that no longer holds (audited, or older policy),
    // and the socket's copy of it.
    let _ = CONNTRACK_V1.remove(key);
    if !cached.is_null() {
        // SAFETY: a checked socket-storage value.
        unsafe { (*cached).verdict = 0 };
    }
    count(COUNTER_DENIED);
    let denied = Decision { verdict: VERDICT_DENIED, ..d };
    report(&cfg, &ep, &pkt, cgroup_id, dir, &denied, now);
    Ok(DROP)
}

/// One segment arriving at the server of an L7 connection (allowed with an HTTP
/// rule set, tracked in conntrack as `ct`): its request line, if it starts one,
/// is judged against the set; a denied request is dropped (enforce) or audited
/// (monitor), reported once per request.
#[inline(always)]
fn l7_request<P: PacketSource>(
    ctx: &P,
    pkt: &Packet,
    ct: *mut CtValue,
    cfg: &EnforcerConfig,
    ep: &EndpointSlot,
    cgroup_id: u64,
    now: u64,
) -> Result<i32, i32> {
    let generation = cfg.active_generation;
    // SAFETY (every access to `ct`): a conntrack value that lives while the
    // program runs.
    let (http_set, http_state, ct_rule) = unsafe { ((*ct).http_set, (*ct).http_state, (*ct).rule_id) };
    let seen = http_state & HTTP_STATE_REQUEST_SEEN != 0;
    match http_check(ctx, pkt, generation, http_set, seen) {
        HttpVerdict::NoRequest => Ok(PASS),
        HttpVerdict::Allowed => {
            unsafe { (*ct).http_state = http_state | HTTP_STATE_REQUEST_SEEN };
            Ok(PASS)
        }
        HttpVerdict::Denied => {
            let enforce = ep.mode != MODE_MONITOR;
            if enforce && http_state & HTTP_STATE_DENIED_REPORTED != 0 {
                // The refused request again (a retransmission): nothing
                // past it can arrive on this connection.
                count(COUNTER_DENIED);
                return Ok(DROP);
            }
            let d = Decision {
                verdict: if enforce { VERDICT_DENIED } else { VERDICT_AUDIT },
                reason: REASON_HTTP,
                rule_id: ct_rule,
                peer_identity: peer_identity_of(pkt, generation),
                http_set,
                fresh: false,
            };
            report_http(cfg, ep, pkt, cgroup_id, DIR_INGRESS, &d, now);
            if enforce {
                count(COUNTER_DENIED);
                unsafe { (*ct).http_state = http_state | HTTP_STATE_DENIED_REPORTED };
                Ok(DROP)
            } else {
                count(COUNTER_AUDIT);
                // Judged: later segments are its body.
                unsafe { (*ct).http_state = http_state | HTTP_STATE_REQUEST_SEEN };
                Ok(PASS)
            }
        }
    }
}

/// The ingress of a cgroup workload whose egress is judged at `connect()` and
/// `sendmsg()`: every arriving packet is judged against the active policy, with
/// no per-connection record on the TCP path (an LRU insert per connection costs
/// more than everything else a short connection runs here).
///
/// * TCP: a SYN opens an inbound connection and is judged in the ingress
///   direction; a SYN-ACK answers this socket's `connect()` and is judged in the
///   egress direction. Any other segment belongs to an established connection,
///   which passes while the policy allows it in either direction (the likelier
///   one, the lower port being the server's, first): a segment that is not a
///   SYN cannot open a connection, so this only decides whether an existing one
///   may go on, and a flip or a mode switch that revokes it drops its next
///   arriving segment. Decisions come from [`DECISIONS_V1`], so an established
///   connection's segment costs one parse and one hash lookup.
/// * UDP has no handshake to tell a reply from a new flow: conntrack as with
///   per-packet egress (keyed without the local address, see [`try_sock_addr`]).
///   A datagram for a connected socket can only come from its peer: a reply,
///   judged in the egress direction.
/// * Would-deny connections of monitor-mode workloads enter conntrack as audit
///   on their first arriving packet (one event per connection; a SYN-ACK's was
///   reported by the connect program). L7 connections (an allowing entry with an
///   HTTP rule set) are tracked so their requests are judged ([`l7_request`]).
#[inline(always)]
fn try_ingress_at_connect(ctx: &CgroupPacket) -> Result<i32, i32> {
    let cgroup_id = ctx.endpoint_key();
    let (cfg, ep) = match managed(cgroup_id) {
        Managed::No => return Ok(PASS),
        Managed::Fail(action) => return Err(action),
        Managed::Yes(cfg, ep) => (cfg, ep),
    };
    let pkt = match parse(ctx, DIR_INGRESS) {
        Ok(Some(pkt)) => pkt,
        Ok(None) => {
            count(COUNTER_OTHER_PROTO);
            return Ok(PASS);
        }
        Err(_) => return Err(fail_action(ep.mode, Some(&cfg))),
    };
    if pkt.protocol == IPPROTO_UDP {
        return Err(tail_call(ctx, TAIL_UDP, ep.mode, &cfg));
    }
    // Two bytes, not one: see `parse` on one-byte bounds checks.
    let Ok([_, flags]) = ctx.load::<[u8; 2]>(pkt.l4 + 12) else { return Err(fail_action(ep.mode, Some(&cfg))) };
    let opening = flags & TCP_SYN != 0 && flags & TCP_ACK == 0;
    let answering = flags & TCP_SYN != 0 && flags & TCP_ACK != 0;
    let first = if opening {
        DIR_INGRESS
    } else if answering || pkt.local_port > pkt.remote_port {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    };
    let (d, origin) = judge_either(&ep, &cfg, &pkt, first, !opening && !answering);
    let generation = cfg.active_generation;
    if d.verdict == VERDICT_ALLOWED {
        if d.http_set != 0 && origin == DIR_INGRESS {
            // An L7 connection: its requests are judged against the rule set.
            let now = now_ns();
            if opening {
                count(COUNTER_ALLOWED);
                if d.rule_id != 0 {
                    rule_hit(d.rule_id, now);
                }
                track(&ct_key(cgroup_id, &pkt), now, now, generation, &d, origin);
                return Ok(PASS);
            }
            if let Some(args) = L7_ARGS.get_ptr_mut(0) {
                // SAFETY: this CPU's value; the tail call below reads it on this CPU.
                unsafe {
                    *args = L7Args { rule_id: d.rule_id, peer_identity: d.peer_identity, http_set: d.http_set, _pad: 0 }
                };
            }
            return Err(tail_call(ctx, TAIL_L7, ep.mode, &cfg));
        }
        if opening {
            count(COUNTER_ALLOWED);
        } else {
            count(COUNTER_FAST_PATH);
        }
        // A new connection, or an established one judged afresh (a flip): the
        // rule carries it, so it is not "unused".
        if (opening || d.fresh) && d.rule_id != 0 {
            rule_hit(d.rule_id, now_ns());
        }
        return Ok(PASS);
    }
    let now = now_ns();
    if ep.mode == MODE_MONITOR {
        // One audit per connection: its first arriving packet records it.
        let key = ct_key(cgroup_id, &pkt);
        if let Some(ct) = CONNTRACK_V1.get_ptr(&key) {
            // SAFETY: a map value, read at once.
            if unsafe { (*ct).generation == generation && (*ct).verdict == VERDICT_AUDIT } {
                count(COUNTER_CT_HIT);
                return Ok(PASS);
            }
        }
        count(COUNTER_AUDIT);
        let audit = Decision { verdict: VERDICT_AUDIT, ..d };
        if !answering {
            report(&cfg, &ep, &pkt, cgroup_id, origin, &audit, now);
        }
        track(&key, now, now, generation, &audit, origin);
        return Ok(PASS);
    }
    // An audit recorded in monitor mode no longer holds: a switch back judges
    // and reports the connection again.
    let _ = CONNTRACK_V1.remove(&ct_key(cgroup_id, &pkt));
    count(COUNTER_DENIED);
    let denied = Decision { verdict: VERDICT_DENIED, ..d };
    report(&cfg, &ep, &pkt, cgroup_id, origin, &denied, now);
    Ok(DROP)
}

/// The conntrack key of `pkt` (local-oriented 5-tuple) for endpoint `cgroup_id`.
#[inline(always)]
fn ct_key(cgroup_id: u64, pkt: &Packet) -> CtKey {
    CtKey {
        cgroup_id,
        local_addr: pkt.local_addr,
        remote_addr: pkt.remote_addr,
        local_port: pkt.local_port,
        remote_port: pkt.remote_port,
        protocol: pkt.protocol,
        _pad: [0; 3],
    }
}

/// A segment of an established L7 connection (allowed by an entry with an HTTP
/// rule set) arriving at its server, egress judged at connect, tail-called from
/// [`enforce_in_conn`] (its own stack): its request is judged on the
/// connection's conntrack entry (tracked afresh when evicted or made under
/// another generation).
#[cgroup_skb(ingress)]
pub fn enforce_in_l7(ctx: SkBuffContext) -> i32 {
    let ctx = &CgroupPacket(&ctx);
    let (cgroup_id, cfg, ep, pkt) = match tail_start(ctx) {
        Ok(start) => start,
        Err(v) => return v,
    };
    let (cfg, ep, pkt) = (&cfg, &ep, &pkt);
    // The caller's decision, handed over on this CPU (a tail call runs on the
    // caller's CPU, with nothing in between): judging again here would cost the
    // verifier a second policy walk next to the request matching.
    let Some(args) = L7_ARGS.get(0) else { return verdict(Err(fail_action(ep.mode, Some(cfg)))) };
    let d = Decision {
        verdict: VERDICT_ALLOWED,
        reason: REASON_RULE,
        rule_id: args.rule_id,
        peer_identity: args.peer_identity,
        http_set: args.http_set,
        fresh: false,
    };
    if d.http_set == 0 {
        return verdict(Err(fail_action(ep.mode, Some(cfg))));
    }
    let d = &d;
    let key = ct_key(cgroup_id, pkt);
    let generation = cfg.active_generation;
    let now = now_ns();
    let current = match CONNTRACK_V1.get_ptr(&key) {
        // SAFETY: a map value, read at once.
        Some(ct) => unsafe { (*ct).generation == generation && (*ct).http_set == d.http_set },
        None => false,
    };
    if !current {
        // Evicted, or made under another generation: tracked afresh, and this
        // program runs again on the segment (a tail call to itself) to judge it
        // on the new entry. One path into the request matching instead of two:
        // the verifier walks it once (484k instructions instead of 952k of its
        // 1M limit, and 0.6 s of load time instead of 1 s).
        track(&key, now, now, generation, d, DIR_INGRESS);
        return verdict(Err(tail_call(ctx, TAIL_L7, ep.mode, cfg)));
    }
    let Some(ct) = CONNTRACK_V1.get_ptr_mut(&key) else { return verdict(Err(fail_action(ep.mode, Some(cfg)))) };
    count(COUNTER_CT_HIT);
    verdict(l7_request(ctx, pkt, ct, cfg, ep, cgroup_id, now))
}

/// [`try_ingress_at_connect`] for UDP, tail-called (its own 512-byte stack:
/// the TCP path uses most of one): conntrack by flow.
#[cgroup_skb(ingress)]
pub fn enforce_in_udp(ctx: SkBuffContext) -> i32 {
    let ctx = &CgroupPacket(&ctx);
    match tail_start(ctx) {
        Ok((cgroup_id, cfg, ep, pkt)) => verdict(udp_flow_at_connect(ctx, &pkt, cgroup_id, &cfg, &ep)),
        Err(v) => v,
    }
}

/// What a tail-called program starts from, found again from the packet (a tail
/// call hands over nothing but the context): the endpoint key, the active
/// configuration, the endpoint's slot and the parsed packet. `Err` carries the
/// packet's verdict when it is not judged (unmanaged, not TCP/UDP) or cannot be.
#[inline(always)]
fn tail_start(ctx: &CgroupPacket) -> Result<(u64, EnforcerConfig, EndpointSlot, Packet), i32> {
    let cgroup_id = ctx.endpoint_key();
    let (cfg, ep) = match managed(cgroup_id) {
        Managed::No => return Err(PASS),
        Managed::Fail(action) => return Err(verdict(Err(action))),
        Managed::Yes(cfg, ep) => (cfg, ep),
    };
    match parse(ctx, DIR_INGRESS) {
        Ok(Some(pkt)) => Ok((cgroup_id, cfg, ep, pkt)),
        Ok(None) => Err(PASS),
        Err(_) => Err(verdict(Err(fail_action(ep.mode, Some(&cfg))))),
    }
}

/// Tail-calls program `index` of [`IN_CONN_TAILS`] with the packet; returns
/// only when that fails (no program there: an enforcer that did not finish
/// loading), with the fail action of `mode`.
#[inline(always)]
fn tail_call(ctx: &CgroupPacket, index: u32, mode: u8, cfg: &EnforcerConfig) -> i32 {
    // SAFETY: a tail call with the program's own context; on success it does not return.
    unsafe { IN_CONN_TAILS.tail_call(ctx.0, index) };
    fail_action(mode, Some(cfg))
}

#[inline(always)]
fn udp_flow_at_connect(
    ctx: &CgroupPacket,
    pkt: &Packet,
    cgroup_id: u64,
    cfg: &EnforcerConfig,
    ep: &EndpointSlot,
) -> Result<i32, i32> {
    // Without the local address, as `sendmsg()` keys its flows (see `try_sock_addr`).
    let key = CtKey { local_addr: [0; 16], ..ct_key(cgroup_id, pkt) };
    let generation = cfg.active_generation;
    let now = now_ns();
    let mut created_ns = now;
    let sk = ctx.socket();
    // A connected socket receives from its peer only: replies to what it sends.
    let mut origin = if !sk.is_null() && sock_state(sk) == BPF_TCP_ESTABLISHED { DIR_EGRESS } else { DIR_INGRESS };
    if let Some(ct) = CONNTRACK_V1.get_ptr_mut(key) {
        // SAFETY: a map value that lives while the program runs.
        let (g, v, o, c) = unsafe { ((*ct).generation, (*ct).verdict, (*ct).origin, (*ct).created_ns) };
        if ct_holds(g, v, generation, ep.mode) {
            // SAFETY: as above; concurrent updates of `last_ns` are benign.
            unsafe {
                if now.wrapping_sub((*ct).last_ns) > CT_TOUCH_NS {
                    (*ct).last_ns = now;
                }
            }
            count(COUNTER_CT_HIT);
            return Ok(PASS);
        }
        origin = o;
        created_ns = c;
    }
    let d = judge(ep, cfg, pkt, origin);
    match admit(cfg, ep, pkt, cgroup_id, origin, &d, now) {
        Some(kept) => {
            track(&key, created_ns, now, generation, &kept, origin);
            Ok(PASS)
        }
        None => {
            let _ = CONNTRACK_V1.remove(key);
            Ok(DROP)
        }
    }
}

/// The verdict to keep for a new connection or flow that `d` allows or, in
/// monitor mode, would deny: counted (and the rule's hit), or audited and
/// reported. `None` when it is denied (enforce mode): counted and reported.
#[inline(always)]
fn admit(
    cfg: &EnforcerConfig,
    ep: &EndpointSlot,
    pkt: &Packet,
    cgroup_id: u64,
    origin: u8,
    d: &Decision,
    now: u64,
) -> Option<Decision> {
    if d.verdict == VERDICT_ALLOWED {
        count(COUNTER_ALLOWED);
        if d.rule_id != 0 {
            rule_hit(d.rule_id, now);
        }
        return Some(*d);
    }
    if ep.mode == MODE_MONITOR {
        count(COUNTER_AUDIT);
        let audit = Decision { verdict: VERDICT_AUDIT, ..*d };
        report(cfg, ep, pkt, cgroup_id, origin, &audit, now);
        return Some(audit);
    }
    count(COUNTER_DENIED);
    report(cfg, ep, pkt, cgroup_id, origin, &Decision { verdict: VERDICT_DENIED, ..*d }, now);
    None
}

/// [`judge`] in direction `first`, and when that denies and `either` is set, in
/// the other one: the allowing decision and its direction, else `first`'s. A
/// loop with one call site: two would inline `judge` twice, beyond the stack
/// (bpf-linker inlines across `#[inline(never)]`).
#[inline(always)]
fn judge_either(ep: &EndpointSlot, cfg: &EnforcerConfig, pkt: &Packet, first: u8, either: bool) -> (Decision, u8) {
    let tries = core::hint::black_box(if either { 2u32 } else { 1 });
    let mut dir = first;
    let mut denied: Option<Decision> = None;
    let mut i = 0u32;
    while i < tries {
        let d = judge(ep, cfg, pkt, dir);
        if d.verdict == VERDICT_ALLOWED {
            return (d, dir);
        }
        if denied.is_none() {
            denied = Some(d);
        }
        dir = if dir == DIR_INGRESS { DIR_EGRESS } else { DIR_INGRESS };
        i += 1;
    }
    // `tries` is at least 1, so `denied` is set; the default only satisfies the types.
    let d = denied.unwrap_or(Decision {
        verdict: VERDICT_DENIED,
        reason: REASON_DEFAULT_DENY,
        rule_id: 0,
        peer_identity: 0,
        http_set: 0,
        fresh: false,
    });
    (d, first)
}

/// The decision for a connection of `pkt`'s peer opened in direction `dir`, from
/// [`DECISIONS_V1`] when it was made before under the same generation and epoch,
/// else made ([`decide`]) and kept there. Keyed by the peer's address, not its
/// identity: a hit costs no ipcache walk (the ipcache changes with the
/// generation, like the rules; in-place changes bump the epoch).
#[inline(always)]
fn judge(ep: &EndpointSlot, cfg: &EnforcerConfig, pkt: &Packet, dir: u8) -> Decision {
    if !covers(ep, dir) {
        return Decision::NOT_COVERED;
    }
    let key = DecisionKey {
        generation: cfg.active_generation,
        local_identity: ep.identity,
        remote_addr: pkt.remote_addr,
        port: if dir == DIR_EGRESS { pkt.remote_port } else { pkt.local_port },
        epoch: cfg.sock_epoch,
        protocol: pkt.protocol,
        direction: dir,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied at once.
    if let Some(v) = unsafe { DECISIONS_V1.get(&key) } {
        return Decision {
            verdict: v.verdict,
            reason: v.reason,
            rule_id: v.rule_id,
            peer_identity: v.peer_identity,
            http_set: v.http_set,
            fresh: false,
        };
    }
    let mut d = decide(ep, pkt, dir, cfg.active_generation);
    d.fresh = true;
    let value = DecisionValue {
        rule_id: d.rule_id,
        peer_identity: d.peer_identity,
        http_set: d.http_set,
        verdict: d.verdict,
        reason: d.reason,
        _pad: [0; 4],
    };
    let _ = DECISIONS_V1.insert(&key, &value, 0);
    d
}

/// Egress judged at `connect()` (`sendmsg = false`) or at an unconnected UDP
/// socket's `sendmsg()` to an address, before anything is sent: the same
/// decision as a first egress packet's, made once per connection (per flow for
/// UDP, through conntrack). A UDP socket that connects to, or sends to, a peer
/// whose flow came in first is answering it: the flow's verdict stands.
#[inline(always)]
fn try_sock_addr(ctx: &SockAddrContext, v6: bool, sendmsg: bool) -> Result<i32, i32> {
    use core::ptr::read_volatile as rd;
    // The caller's cgroup: sockets are connected in process context, and almost
    // always by a task of the cgroup they were created in.
    // SAFETY: helper without arguments.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let (cfg, ep) = match managed(cgroup_id) {
        Managed::No => return Ok(PASS),
        Managed::Fail(action) => return Err(action),
        Managed::Yes(cfg, ep) => (cfg, ep),
    };
    let a = ctx.sock_addr;
    // SAFETY (every read of `a` and `sk` below): context fields this attach
    // type may read, one at a time (the verifier checks each access).
    let protocol = unsafe { rd(&raw const (*a).protocol) };
    if protocol != u32::from(IPPROTO_TCP) && protocol != u32::from(IPPROTO_UDP) {
        count(COUNTER_OTHER_PROTO);
        return Ok(PASS);
    }
    let protocol = protocol as u8;
    // The IPv4 programs may only read `user_ip4`, the IPv6 ones `user_ip6` (an
    // IPv4 peer of an IPv6 socket arrives v4-mapped, as the ipcache keys it).
    let (family, remote_addr) = if v6 {
        let w = unsafe {
            [
                rd(&raw const (*a).user_ip6[0]),
                rd(&raw const (*a).user_ip6[1]),
                rd(&raw const (*a).user_ip6[2]),
                rd(&raw const (*a).user_ip6[3]),
            ]
        };
        let mut addr = [0u8; 16];
        for (i, word) in w.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        (AF_INET6, addr)
    } else {
        (AF_INET, v4_mapped(unsafe { rd(&raw const (*a).user_ip4) }.to_ne_bytes()))
    };
    // Network order in the low 16 bits.
    let remote_port = u16::from_be((unsafe { rd(&raw const (*a).user_port) } & 0xffff) as u16);
    let sk = unsafe { rd(&raw const (*a).__bindgen_anon_1.sk) };
    // Host order; 0 while unbound (a TCP or UDP socket connecting for the first
    // time; `sendmsg()` binds before it is judged).
    let local_port = if sk.is_null() { 0 } else { (unsafe { rd(&raw const (*sk).src_port) }) as u16 };
    let pkt = Packet { family, protocol, local_addr: [0; 16], remote_addr, local_port, remote_port, l4: 0 };
    let key = ct_key(cgroup_id, &pkt);
    let now = now_ns();
    let generation = cfg.active_generation;
    let mut origin = DIR_EGRESS;
    let mut created_ns = now;
    if protocol == IPPROTO_UDP
        && local_port != 0
        && let Some(ct) = CONNTRACK_V1.get_ptr(key)
    {
        // SAFETY: a map value, copied at once.
        let (g, v, o, c) = unsafe { ((*ct).generation, (*ct).verdict, (*ct).origin, (*ct).created_ns) };
        if ct_holds(g, v, generation, ep.mode) {
            count(COUNTER_CT_HIT);
            return Ok(PASS);
        }
        origin = o;
        created_ns = c;
    }
    let d = judge(&ep, &cfg, &pkt, origin);
    // An unconnected socket's flow is tracked, so the datagrams coming back find
    // it; a connected socket's replies are judged on arrival (see
    // `enforce_in_udp`), and TCP's by their flags.
    match admit(&cfg, &ep, &pkt, cgroup_id, origin, &d, now) {
        Some(kept) => {
            if sendmsg {
                track(&key, created_ns, now, generation, &kept, origin);
            }
            Ok(PASS)
        }
        None => {
            if sendmsg {
                let _ = CONNTRACK_V1.remove(key);
            }
            Ok(DROP)
        }
    }
}

/// The verdict cached on `sk` (any socket, `sock_common`, or null), or null.
/// The helper itself answers null for anything but a full socket, and only TCP
/// full sockets ever get an entry ([`remember`]), so no `bpf_sk_fullsock` and
/// no protocol check are needed here: one helper call per packet.
#[inline(always)]
fn sock_verdict(sk: *mut bpf_sock) -> *mut SockVerdict {
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: `sk` is a checked socket pointer; without F_CREATE the helper only looks up.
    let v = unsafe { bpf_sk_storage_get(&raw const SOCK_VERDICT_V1 as *mut _, sk as *mut _, core::ptr::null_mut(), 0) };
    v as *mut SockVerdict
}

/// Whether the verdict `c` cached on `sk` passes this packet: every condition
/// of [`SockVerdict`]'s contract.
#[inline(always)]
fn sock_verdict_holds(
    c: *const SockVerdict,
    sk: *mut bpf_sock,
    cgroup_id: u64,
    ep: &EndpointSlot,
    cfg: &EnforcerConfig,
) -> bool {
    // SAFETY: a checked socket-storage value of this map, alive while the
    // program runs.
    let c = unsafe { &*c };
    if c.generation != cfg.active_generation || c.epoch != cfg.sock_epoch || c.local_identity != ep.identity {
        return false;
    }
    if !(c.verdict == VERDICT_ALLOWED || (c.verdict == VERDICT_AUDIT && ep.mode == MODE_MONITOR)) {
        return false;
    }
    sock_verdict_is_this_connection(c, sk, cgroup_id)
}

/// Whether `c` was written for the connection `sk` carries now (same endpoint,
/// same peer and ports), whatever its generation or verdict.
#[inline(always)]
fn sock_verdict_is_this_connection(c: *const SockVerdict, sk: *mut bpf_sock, cgroup_id: u64) -> bool {
    // SAFETY: as in `sock_verdict_holds`; `sk` is the non-null socket `c` came from.
    let c = unsafe { &*c };
    if c.endpoint_key != cgroup_id {
        return false;
    }
    let t = sock_tuple(sk);
    c.src_port == t.src_port
        && c.dst_port == t.dst_port
        && c.dst_ip4 == t.dst_ip4
        && c.dst_ip6[0] == t.dst_ip6[0]
        && c.dst_ip6[1] == t.dst_ip6[1]
        && c.dst_ip6[2] == t.dst_ip6[2]
        && c.dst_ip6[3] == t.dst_ip6[3]
}

/// The peer-identifying fields of a socket, as [`SockVerdict`] stores them.
struct SockTuple {
    family: u32,
    state: u32,
    dst_ip6: [u32; 4],
    dst_ip4: u32,
    src_port: u32,
    dst_port: u32,
}

/// Reads `sk`'s tuple one 4-byte field at a time: the verifier only accepts
/// loads of single `bpf_sock` fields, and volatile reads keep the compiler from
/// merging neighbours into one wider load. Every field read is one of
/// `sock_common`'s, so any socket pointer will do.
#[inline(always)]
fn sock_tuple(sk: *mut bpf_sock) -> SockTuple {
    use core::ptr::read_volatile as rd;
    // SAFETY: `sk` is a full socket the caller checked for null.
    unsafe {
        SockTuple {
            family: rd(&raw const (*sk).family),
            state: rd(&raw const (*sk).state),
            dst_ip6: [
                rd(&raw const (*sk).dst_ip6[0]),
                rd(&raw const (*sk).dst_ip6[1]),
                rd(&raw const (*sk).dst_ip6[2]),
                rd(&raw const (*sk).dst_ip6[3]),
            ],
            dst_ip4: rd(&raw const (*sk).dst_ip4),
            src_port: rd(&raw const (*sk).src_port),
            dst_port: u32::from(rd(&raw const (*sk).dst_port)),
        }
    }
}

/// Caches `d`'s verdict (allowed or audit, just decided or found in conntrack
/// under the active generation) on `sk` when it is an established TCP full socket
/// carrying this very connection, or a client's socket opening it; whether it did.
#[inline(always)]
fn remember(
    sk_common: *mut bpf_sock,
    pkt: &Packet,
    cgroup_id: u64,
    ep: &EndpointSlot,
    cfg: &EnforcerConfig,
    d: &Decision,
    origin: u8,
) -> bool {
    if sk_common.is_null() {
        return false;
    }
    // The cheap checks first: state and ports are `sock_common` fields.
    let t = sock_tuple(sk_common);
    // Only a connection with one peer: established, or a client's connection
    // being opened (its peer is fixed by connect(), and caching at the SYN lets
    // the rest of the handshake take the fast path). Never a listener (the
    // SYNs of many peers arrive on it) nor a request or time-wait socket (not
    // full sockets: no storage).
    if t.state != BPF_TCP_ESTABLISHED && t.state != BPF_TCP_SYN_SENT {
        return false;
    }
    // The socket's tuple must be the packet's (always so for an established
    // socket; checked so a mismatch can never cache a verdict for another peer).
    if t.src_port != u32::from(pkt.local_port) || u16::from_be(t.dst_port as u16) != pkt.remote_port {
        return false;
    }
    let r = pkt.remote_addr;
    let word = |i: usize| u32::from_ne_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
    let same_addr = if t.family == u32::from(AF_INET) {
        t.dst_ip4 == word(12)
    } else {
        t.dst_ip6[0] == word(0) && t.dst_ip6[1] == word(4) && t.dst_ip6[2] == word(8) && t.dst_ip6[3] == word(12)
    };
    if !same_addr {
        return false;
    }
    // SAFETY: the helper takes any socket pointer and answers null or a full socket.
    let sk = unsafe { bpf_sk_fullsock(sk_common) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a full socket, checked for null (one field load).
    if unsafe { core::ptr::read_volatile(&raw const (*sk).protocol) } != u32::from(IPPROTO_TCP) {
        return false;
    }
    let value = SockVerdict {
        endpoint_key: cgroup_id,
        dst_ip6: t.dst_ip6,
        dst_ip4: t.dst_ip4,
        src_port: t.src_port,
        dst_port: t.dst_port,
        generation: cfg.active_generation,
        local_identity: ep.identity,
        peer_identity: d.peer_identity,
        epoch: cfg.sock_epoch,
        verdict: d.verdict,
        origin,
        _pad: [0; 4],
    };
    // SAFETY: `sk` as above; with F_CREATE the helper creates a zeroed value
    // (or returns the existing one), which is overwritten at once.
    unsafe {
        let p = bpf_sk_storage_get(
            &raw const SOCK_VERDICT_V1 as *mut _,
            sk as *mut _,
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        ) as *mut SockVerdict;
        if p.is_null() {
            return false;
        }
        *p = value;
    }
    true
}

/// The slot of `generation`'s parity (`bulkhead_abi::enforcer::slot_of`), without
/// an index the verifier would have to bound.
#[inline(always)]
fn endpoint_slot(v: &EndpointValue, odd: bool) -> EndpointSlot {
    if odd { v.slot[1] } else { v.slot[0] }
}

/// The verdict for a new connection opened in direction `origin`.
#[inline(always)]
fn decide(ep: &EndpointSlot, pkt: &Packet, origin: u8, generation: u32) -> Decision {
    if !covers(ep, origin) {
        return Decision::NOT_COVERED;
    }
    let peer = peer_identity_of(pkt, generation);
    // The server's port: the remote one for connections we opened.
    let port = if origin == DIR_EGRESS { pkt.remote_port } else { pkt.local_port };
    match lookup_policy(generation, ep.identity, peer, port, pkt.protocol, origin) {
        Some(rule) if rule.action == ACTION_ALLOW => Decision {
            verdict: VERDICT_ALLOWED,
            reason: REASON_RULE,
            rule_id: rule.rule_id,
            peer_identity: peer,
            http_set: rule.http_set,
            fresh: false,
        },
        Some(rule) => Decision {
            verdict: VERDICT_DENIED,
            reason: REASON_RULE,
            rule_id: rule.rule_id,
            peer_identity: peer,
            http_set: 0,
            fresh: false,
        },
        None => Decision {
            verdict: VERDICT_DENIED,
            reason: REASON_DEFAULT_DENY,
            rule_id: 0,
            peer_identity: peer,
            http_set: 0,
            fresh: false,
        },
    }
}

/// Sets the first [`HTTP_READ`] bytes (rounded up to words) of `raw` to 0xff.
#[inline(always)]
fn fill_ff(raw: &mut [u8; HTTP_RAW]) {
    let words = raw.as_mut_ptr() as *mut u64;
    for i in 0..HTTP_READ.div_ceil(8) {
        // SAFETY: within `raw` (HTTP_READ <= HTTP_RAW); unaligned stores are fine.
        unsafe { words.add(i).write_unaligned(u64::MAX) };
    }
}

/// Loads `want` (1..=HTTP_RAW, and at most what the packet has there) bytes at
/// `offset` into `raw`, with a length the verifier can bound.
#[inline(always)]
fn load_masked<P: PacketSource>(ctx: &P, offset: usize, raw: &mut [u8; HTTP_RAW], want: usize) -> Result<(), ()> {
    if want == 0 {
        return Ok(());
    }
    let n = (core::hint::black_box((want as u32).wrapping_sub(1)) & (HTTP_RAW as u32 - 1)) + 1;
    if ctx.load_bytes(offset, raw.as_mut_ptr(), n) == 0 { Ok(()) } else { Err(()) }
}

/// The remote address's identity under `generation` (its ipcache slot), else world.
#[inline(always)]
fn peer_identity_of(pkt: &Packet, generation: u32) -> u32 {
    match IPCACHE_V2.get(Key::new(128, pkt.remote_addr)) {
        Some(v) if generation & 1 != 0 => v.identity[1],
        Some(v) => v.identity[0],
        None => IDENTITY_WORLD,
    }
}

/// What [`http_check`] found in a segment.
enum HttpVerdict {
    /// No payload, or a continuation of an already judged request.
    NoRequest,
    Allowed,
    Denied,
}

/// What a segment [`http_check`] could not read a request line from counts as: a
/// continuation once a request was judged, else a request that matches nothing.
#[inline(always)]
fn unjudged(seen: bool) -> HttpVerdict {
    if seen { HttpVerdict::NoRequest } else { HttpVerdict::Denied }
}

/// Judges the request line a TCP segment arriving at an L7 server starts with,
/// against HTTP rule set `set` of `generation`: two LPM lookups (the method, then
/// "any method"), each finding exact paths, path prefixes and "any path" at once.
///
/// A segment that does not start with `METHOD SP` is a continuation (a body, or the
/// rest of a request) once a request on the connection was judged (`seen`); before
/// that it is judged as a request matching nothing, so a first request line split
/// across segments cannot slip past. A path cut off by the segment's end (or longer
/// than 129 bytes) never matches an exact path: its key is padded with 0xff, which
/// no rule byte equals, while its prefix can still match a prefix rule.
#[inline(always)]
#[expect(
    clippy::needless_range_loop,
    reason = "index loops over constants: the verifier walks each iteration with a known offset into the map value"
)]
fn http_check<P: PacketSource>(ctx: &P, pkt: &Packet, generation: u32, set: u16, seen: bool) -> HttpVerdict {
    let Some(sc) = HTTP_SCRATCH.get_ptr_mut(0) else { return unjudged(seen) };
    // What an event reports unless a method and path are read below.
    // SAFETY: `sc` points at this CPU's scratch value, alive while the program runs.
    unsafe {
        (*sc).method = [0; HTTP_METHOD_BYTES];
        (*sc).path_read = 0;
    }
    // Data offset and IP total length: where the payload starts and how long it is.
    // Two bytes, not one: see `parse` on one-byte bounds checks.
    let Ok([doff, _]) = ctx.load::<[u8; 2]>(pkt.l4 + 12) else { return unjudged(seen) };
    let payload = pkt.l4 + usize::from(doff >> 4) * 4;
    let total = if pkt.family == AF_INET {
        match ctx.load::<[u8; 2]>(2) {
            Ok(b) => usize::from(u16::from_be_bytes(b)),
            Err(_) => return unjudged(seen),
        }
    } else {
        match ctx.load::<[u8; 2]>(4) {
            Ok(b) => 40 + usize::from(u16::from_be_bytes(b)),
            Err(_) => return unjudged(seen),
        }
    };
    if total <= payload {
        // A bare ACK (or FIN): nothing to judge, whatever came before.
        return HttpVerdict::NoRequest;
    }
    let avail = total - payload;
    // SAFETY: `sc` points at this CPU's scratch value, alive while the program runs.
    let method = unsafe { &mut (*sc).method };
    // SAFETY: as above.
    let key = unsafe { &mut (*sc).key };
    // SAFETY: as above.
    let raw = unsafe { &mut (*sc).raw };
    // The method: upper-case letters up to the first space, in the first 17 bytes.
    // Bytes past the segment read as 0xff (never a letter, a space or a '?').
    fill_ff(raw);
    let want = if avail < HTTP_METHOD_BYTES + 1 { avail } else { HTTP_METHOD_BYTES + 1 };
    if load_masked(ctx, payload, raw, want).is_err() {
        return unjudged(seen);
    }
    let mut mlen = 0usize;
    let mut found = false;
    for i in 0..=HTTP_METHOD_BYTES {
        let c = raw[i];
        if c == b' ' {
            mlen = i;
            found = true;
            break;
        }
        if !c.is_ascii_uppercase() {
            break;
        }
    }
    if !found || mlen == 0 {
        return unjudged(seen);
    }
    key.prefix_len = (HTTP_KEY_DATA * 8) as u32;
    key.data[..4].copy_from_slice(&generation.to_ne_bytes());
    key.data[4..6].copy_from_slice(&set.to_ne_bytes());
    for j in 0..HTTP_METHOD_BYTES {
        let b = if j < mlen { raw[j] } else { 0 };
        key.data[HTTP_KEY_METHOD + j] = b;
        method[j] = b;
    }
    // The path, read afresh from just after the space, so the loop below indexes
    // constants only (the verifier then walks it once, not once per method length).
    let path_at = payload + mlen + 1;
    fill_ff(raw);
    if avail > mlen + 1 {
        let left = avail - (mlen + 1);
        let want = if left < HTTP_PATH_BYTES { left } else { HTTP_PATH_BYTES };
        if load_masked(ctx, path_at, raw, want).is_err() {
            return unjudged(seen);
        }
    }
    // Up to a space or '?' (which becomes the 0 terminator, zeros after it); a path
    // cut off by the segment keeps its 0xff padding, so it matches no exact path.
    let mut terminated = false;
    for j in 0..HTTP_PATH_BYTES {
        let c = raw[j];
        let b = if terminated {
            0
        } else if c == b' ' || c == b'?' {
            terminated = true;
            0
        } else {
            c
        };
        key.data[HTTP_KEY_PATH + j] = b;
    }
    // SAFETY: as above.
    unsafe { (*sc).path_read = 1 };
    if HTTP_RULES_V1.get(&*key).is_some() {
        return HttpVerdict::Allowed;
    }
    for j in 0..HTTP_METHOD_BYTES {
        key.data[HTTP_KEY_METHOD + j] = 0;
    }
    if HTTP_RULES_V1.get(&*key).is_some() {
        return HttpVerdict::Allowed;
    }
    HttpVerdict::Denied
}

/// The six wildcard probes of `bulkhead_abi::enforcer::POLICY_PROBES`, in order.
/// Separate early returns: the verifier rejects OR-ed map-value pointers.
#[inline(always)]
fn lookup_policy(generation: u32, local: u32, peer: u32, port: u16, protocol: u8, dir: u8) -> Option<PolicyValue> {
    let mut key = PolicyKey { generation, local_identity: local, peer_identity: peer, port, protocol, direction: dir };
    // SAFETY (every lookup below): the value is copied at once.
    if let Some(v) = unsafe { POLICY_V1.get(key) } {
        return Some(*v);
    }
    key.port = 0;
    if let Some(v) = unsafe { POLICY_V1.get(key) } {
        return Some(*v);
    }
    key.protocol = 0;
    if let Some(v) = unsafe { POLICY_V1.get(key) } {
        return Some(*v);
    }
    key.peer_identity = IDENTITY_ANY;
    key.port = port;
    key.protocol = protocol;
    if let Some(v) = unsafe { POLICY_V1.get(key) } {
        return Some(*v);
    }
    key.port = 0;
    if let Some(v) = unsafe { POLICY_V1.get(key) } {
        return Some(*v);
    }
    key.protocol = 0;
    if let Some(v) = unsafe { POLICY_V1.get(key) } {
        return Some(*v);
    }
    None
}

/// Records a connection so its other packets (and replies) skip the policy.
#[inline(always)]
fn track(key: &CtKey, created_ns: u64, now: u64, generation: u32, d: &Decision, origin: u8) {
    let value = CtValue {
        created_ns,
        last_ns: now,
        generation,
        rule_id: d.rule_id,
        verdict: d.verdict,
        origin,
        http_set: d.http_set,
        http_state: 0,
        _pad: [0; 3],
    };
    if CONNTRACK_V1.insert(key, value, 0).is_err() {
        count(COUNTER_CT_INSERT_FAILED);
    }
}

#[inline(always)]
fn rule_hit(rule_id: u32, now: u64) {
    if let Some(s) = RULE_STATS_V1.get_ptr_mut(rule_id) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe {
            (*s).hits += 1;
            (*s).last_hit_ns = now;
        }
        return;
    }
    let _ = RULE_STATS_V1.insert(rule_id, RuleStats { hits: 1, last_hit_ns: now }, 0);
}

/// Per-CPU GCRA token bucket: `event_rate` per second, `event_burst` back to back.
#[inline(always)]
fn take_event_token(cfg: &EnforcerConfig, now: u64) -> bool {
    if cfg.event_rate == 0 {
        return false;
    }
    let Some(state) = EVENT_RATE_V1.get_ptr_mut(0) else { return false };
    let interval = 1_000_000_000u64 / u64::from(cfg.event_rate);
    let burst = if cfg.event_burst == 0 { 1 } else { u64::from(cfg.event_burst) };
    // SAFETY: per-CPU value, only this CPU touches it while the program runs.
    let tat = unsafe { (*state).tat_ns };
    let next = if tat > now { tat } else { now } + interval;
    if next - now > burst * interval {
        return false;
    }
    // SAFETY: as above.
    unsafe { (*state).tat_ns = next };
    true
}

/// Writes one verdict event (rate-limited, without waking user space).
#[inline(always)]
fn report(cfg: &EnforcerConfig, ep: &EndpointSlot, pkt: &Packet, cgroup_id: u64, dir: u8, d: &Decision, now: u64) {
    if !take_event_token(cfg, now) {
        count(COUNTER_EVENTS_LIMITED);
        return;
    }
    let Some(mut entry) = VERDICTS_V1.reserve::<VerdictEvent>(0) else {
        count(COUNTER_EVENTS_LOST);
        return;
    };
    // SAFETY: the reserved record, written in full before it is submitted.
    unsafe { write_event(entry.as_mut_ptr(), cfg, ep, pkt, cgroup_id, dir, d, now) };
    entry.submit(BPF_RB_NO_WAKEUP.into());
}

/// Writes the fields of a verdict event into `out` (reserved ring-buffer
/// memory) one by one: a `VerdictEvent` built on the stack first would cost its
/// 96 bytes of the 512 in every program that reports.
///
/// # Safety
/// `out` must point at writable memory for one `VerdictEvent`.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "the fields of one event; inlined")]
unsafe fn write_event(
    out: *mut VerdictEvent,
    cfg: &EnforcerConfig,
    ep: &EndpointSlot,
    pkt: &Packet,
    cgroup_id: u64,
    dir: u8,
    d: &Decision,
    now: u64,
) {
    // SAFETY: the caller's contract.
    unsafe {
        (*out).ts_ns = now;
        (*out).cgroup_id = cgroup_id;
        (*out).local_addr = pkt.local_addr;
        (*out).remote_addr = pkt.remote_addr;
        (*out).local_identity = ep.identity;
        (*out).peer_identity = d.peer_identity;
        (*out).rule_id = d.rule_id;
        (*out).generation = cfg.active_generation;
        (*out).local_port = pkt.local_port;
        (*out).remote_port = pkt.remote_port;
        (*out).family = pkt.family;
        (*out).protocol = pkt.protocol;
        (*out).direction = dir;
        (*out).verdict = d.verdict;
        (*out).reason = d.reason;
        (*out).mode = ep.mode;
        (*out)._pad = [0; 5];
    }
}

/// Writes one HTTP verdict event: [`report`]'s fields and the request line
/// [`http_check`] left in the scratch (rate-limited, without waking user space).
#[inline(always)]
fn report_http(cfg: &EnforcerConfig, ep: &EndpointSlot, pkt: &Packet, cgroup_id: u64, dir: u8, d: &Decision, now: u64) {
    if !take_event_token(cfg, now) {
        count(COUNTER_EVENTS_LIMITED);
        return;
    }
    let Some(sc) = HTTP_SCRATCH.get_ptr(0) else { return };
    let Some(mut entry) = VERDICTS_V1.reserve::<HttpVerdictEvent>(0) else {
        count(COUNTER_EVENTS_LOST);
        return;
    };
    let out = entry.as_mut_ptr();
    // SAFETY: `out` is the reserved record (written in full below before submit);
    // `sc` is this CPU's scratch value, alive while the program runs.
    unsafe {
        write_event(&raw mut (*out).event, cfg, ep, pkt, cgroup_id, dir, d, now);
        (*out).method = (*sc).method;
        let read = (*sc).path_read != 0;
        for j in 0..HTTP_PATH_BYTES {
            (*out).path[j] = if read { (*sc).key.data[HTTP_KEY_PATH + j] } else { 0xff };
        }
        (*out)._pad = [0; 6];
    }
    entry.submit(BPF_RB_NO_WAKEUP.into());
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot unwind; the verifier rejects any reachable path here.
    unsafe { core::hint::unreachable_unchecked() }
}

/// GPL-compatible licence string: the ring-buffer helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
