//! The collector's kernel datapath: observes TCP connections, UDP flows and DNS
//! answers of every workload on the node and hands them to user space without
//! ever changing a verdict.
//!
//! * TCP: the `sock/inet_sock_set_state` tracepoint. Its record layout is
//!   published in a format file user space checks before loading; it fires for
//!   IPv4 and IPv6 alike and — for the client's `CLOSE → SYN_SENT` — in the
//!   connecting process's context, so pid, comm and cgroup are the real owner's.
//!   The owner is remembered per socket in `SOCK_OWNER_V1` so the later softirq
//!   transitions carry it too (and the Connect event waits for the local port).
//! * UDP + DNS: cgroup_skb ingress/egress at the cgroup v2 root. See the user-space
//!   `datapath` module doc for why this hook and not sock_addr or tc.
//! * HTTP request lines: the same ingress program looks at the first four payload
//!   bytes of every TCP segment; one that starts like an HTTP method has its first
//!   `HTTP_PAYLOAD_MAX` bytes copied to `HTTP_EVENTS_V1` for user space to parse.
//!
//! Kernel struct fields (netns inode, TCP byte counters, a socket's cgroup) are
//! read with `bpf_probe_read_kernel` at offsets user space resolved from BTF and
//! writes into the read-only global `BH_KOFFSETS`: Rust eBPF has no CO-RE, so no
//! offset of a kernel struct is compiled in here.
#![no_std]
#![no_main]
// Inline asm for the BPF atomic add: core's AtomicU64::fetch_add is not offered
// on the bpf target. Unstable, enabled by RUSTC_BOOTSTRAP=1 in collector/build.rs
// exactly like aya-ebpf enables it for itself.
#![feature(asm_experimental_arch)]

use core::{arch::asm, ffi::c_void};

use aya_ebpf::{
    EbpfContext,
    bindings::{__sk_buff, BPF_NOEXIST, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_get_socket_cookie, bpf_ktime_get_boot_ns, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    },
    macros::{cgroup_skb, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SkBuffContext, TracePointContext},
};
use bulkhead_abi::collector::{
    AF_INET, AF_INET6, COMM_LEN, COUNTER_COUNT, COUNTER_DNS_LOST, COUNTER_FLOW_LOST, COUNTER_HTTP_LOST,
    COUNTER_READ_FAILED, COUNTER_UDP_INSERT_FAILED, CollectorConfig, DEFAULT_DNS_EVENTS_BYTES,
    DEFAULT_FLOW_EVENTS_BYTES, DEFAULT_HTTP_EVENTS_BYTES, DEFAULT_SOCK_OWNER, DEFAULT_UDP_FLOWS, DNS_PAYLOAD_MAX,
    DnsEventRaw, HTTP_METHOD_PREFIXES, HTTP_PAYLOAD_MAX, HttpEventRaw, IPPROTO_TCP, IPPROTO_TCP_U8, IPPROTO_UDP,
    InetSockSetStateArgs, KIND_ACCEPT, KIND_CLOSE, KIND_CONNECT, KIND_ESTABLISHED, KernelOffsets, NETNS_FILTER_MAX,
    NETNS_MODE_EXCEPT, NETNS_MODE_ONLY, OFFSETS_HAVE_NETNS, OFFSETS_HAVE_SOCK_CGROUP, OFFSETS_HAVE_TCP_BYTES,
    OFFSETS_HAVE_TCP_SEGS, SockEventRaw, SockOwner, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT,
    UdpFlowKey, UdpFlowValue,
};

/// cgroup_skb verdict "let the packet through". The collector only observes, so
/// this is the only verdict its programs compute.
const ALLOW: i32 = 1;
/// Verdict when a program fails: fail-open. Dropping is the enforcer's job, never
/// the collector's; a collector bug must not cut a workload off.
const FAIL_ACTION: i32 = ALLOW;

/// Kernel offsets from BTF; user space overrides this before load
/// (`EbpfLoader::override_global`), so the verifier sees them as constants.
#[unsafe(no_mangle)]
static BH_KOFFSETS: KernelOffsets = KernelOffsets::ZERO;

/// 1: copy HTTP request lines (`CAPTURE_HTTP_GLOBAL`). Overridden before load, so
/// with capture off the verifier sees a constant and prunes the branch.
#[unsafe(no_mangle)]
static BH_CAPTURE_HTTP: u32 = 0;

#[map]
static FLOW_EVENTS_V1: RingBuf = RingBuf::with_byte_size(DEFAULT_FLOW_EVENTS_BYTES, 0);
#[map]
static DNS_EVENTS_V1: RingBuf = RingBuf::with_byte_size(DEFAULT_DNS_EVENTS_BYTES, 0);
#[map]
static HTTP_EVENTS_V1: RingBuf = RingBuf::with_byte_size(DEFAULT_HTTP_EVENTS_BYTES, 0);
#[map]
static NETNS_FILTER_V1: HashMap<u64, u8> = HashMap::with_max_entries(NETNS_FILTER_MAX, 0);
#[map]
static CONFIG_V1: Array<CollectorConfig> = Array::with_max_entries(1, 0);
#[map]
static COUNTERS_V1: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
static UDP_FLOWS_V1: LruHashMap<UdpFlowKey, UdpFlowValue> = LruHashMap::with_max_entries(DEFAULT_UDP_FLOWS, 0);
#[map]
static SOCK_OWNER_V1: LruHashMap<u64, SockOwner> = LruHashMap::with_max_entries(DEFAULT_SOCK_OWNER, 0);

/// Reads one field of `BH_KOFFSETS`. Volatile so the compiler cannot fold the
/// all-zero initializer into the code: the real value only exists at load time.
macro_rules! koff {
    ($field:ident) => {
        // SAFETY: plain read of a static.
        unsafe { core::ptr::read_volatile(&raw const BH_KOFFSETS.$field) }
    };
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS_V1.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// Reads a `T` from kernel memory at `base + off`.
#[inline(always)]
fn read_kernel<T>(base: u64, off: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel((base + u64::from(off)) as *const T) }
}

/// Network-namespace inode of a socket: `sk->__sk_common.skc_net.net->ns.inum`.
#[inline(always)]
fn sock_netns(sk: u64) -> Result<u64, i32> {
    if koff!(flags) & OFFSETS_HAVE_NETNS == 0 {
        return Ok(0);
    }
    let net: u64 = read_kernel(sk, koff!(sk_net))?;
    if net == 0 {
        return Err(-1);
    }
    let inum: u32 = read_kernel(net, koff!(net_ns_inum))?;
    Ok(u64::from(inum))
}

/// cgroup v2 id of the cgroup a socket was created in:
/// `sk->sk_cgrp_data.cgroup->kn->id`. Used on the accept side, where the current
/// task is whoever ran the softirq; an accepted socket inherits the listener's
/// cgroup, which is the server's.
#[inline(always)]
fn sock_cgroup_id(sk: u64) -> u64 {
    if koff!(flags) & OFFSETS_HAVE_SOCK_CGROUP == 0 {
        return 0;
    }
    let Ok(cgrp) = read_kernel::<u64>(sk, koff!(sk_cgroup)) else {
        count(COUNTER_READ_FAILED);
        return 0;
    };
    if cgrp == 0 {
        return 0;
    }
    let Ok(kn) = read_kernel::<u64>(cgrp, koff!(cgroup_kn)) else {
        count(COUNTER_READ_FAILED);
        return 0;
    };
    if kn == 0 {
        return 0;
    }
    read_kernel::<u64>(kn, koff!(kn_id)).unwrap_or_else(|_| {
        count(COUNTER_READ_FAILED);
        0
    })
}

/// The kernel-side network-namespace filter: the tracepoint and the root
/// cgroup_skb programs see every namespace, so events of unobserved namespaces
/// are dropped here rather than copied to user space.
#[inline(always)]
fn netns_observed(ino: u64) -> bool {
    let mode = match CONFIG_V1.get(0) {
        Some(c) => c.netns_mode,
        None => return true,
    };
    if mode == NETNS_MODE_ONLY {
        // SAFETY: the value is not kept past this expression.
        return unsafe { NETNS_FILTER_V1.get(ino) }.is_some();
    }
    if mode == NETNS_MODE_EXCEPT {
        // SAFETY: as above.
        return unsafe { NETNS_FILTER_V1.get(ino) }.is_none();
    }
    true
}

#[inline(always)]
fn current_comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

// === TCP: sock/inet_sock_set_state ===
//
// Transitions and what they report:
//   CLOSE → SYN_SENT        connect() in process context: remember the owner
//                           (pid, comm, cgroup, time). No event yet: the kernel
//                           picks the local port only *after* this transition.
//   SYN_SENT → ESTABLISHED  Connect (owner, time of the SYN) + Established.
//   SYN_SENT → CLOSE        Connect + Close: a refused or timed-out attempt.
//   SYN_RECV → ESTABLISHED  Accept (softirq: no pid/comm; the socket's cgroup).
//   * → CLOSE               Close with the final byte/segment counters.

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        count(COUNTER_READ_FAILED);
    }
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // One read of the whole record (offsets verified by user space at load).
    // SAFETY: the tracepoint record is at least this large (checked via the format file).
    let args: InetSockSetStateArgs = unsafe { ctx.read_at(0)? };
    if args.protocol != IPPROTO_TCP {
        return Ok(());
    }
    let (old, new) = (args.oldstate, args.newstate);
    let interesting = (old == TCP_CLOSE && new == TCP_SYN_SENT)
        || (new == TCP_ESTABLISHED && (old == TCP_SYN_SENT || old == TCP_SYN_RECV))
        // LISTEN → CLOSE is a listener going away, not a connection.
        || (new == TCP_CLOSE && old != TCP_LISTEN && old != TCP_CLOSE);
    if !interesting {
        return Ok(());
    }
    let sk = args.skaddr;
    let netns = sock_netns(sk)?;
    if !netns_observed(netns) {
        if new == TCP_CLOSE {
            // The filter may have changed since connect: forget the owner anyway.
            let _ = SOCK_OWNER_V1.remove(sk);
        }
        return Ok(());
    }

    if old == TCP_CLOSE && new == TCP_SYN_SENT {
        let owner = SockOwner {
            ts_ns: now_ns(),
            // SAFETY: helper without arguments.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            _pad: [0; 4],
            comm: current_comm(),
        };
        let _ = SOCK_OWNER_V1.insert(sk, owner, 0);
        return Ok(());
    }

    // Whatever connect recorded, copied out before any map update can move it.
    // SAFETY: the value is copied immediately.
    let owner: Option<SockOwner> = unsafe { SOCK_OWNER_V1.get(sk) }.copied();
    let now = now_ns();
    if old == TCP_SYN_SENT {
        let connect_ts = match &owner {
            Some(o) => o.ts_ns,
            None => now,
        };
        emit_tcp(&args, netns, KIND_CONNECT, connect_ts, owner.as_ref());
    }
    if new == TCP_ESTABLISHED {
        let kind = if old == TCP_SYN_SENT { KIND_ESTABLISHED } else { KIND_ACCEPT };
        emit_tcp(&args, netns, kind, now, owner.as_ref());
    } else {
        let _ = SOCK_OWNER_V1.remove(sk);
        emit_tcp(&args, netns, KIND_CLOSE, now, owner.as_ref());
    }
    Ok(())
}

/// Writes one TCP event. `owner` is what connect recorded (client side only);
/// without it pid/comm stay 0 and the cgroup is the socket's own.
#[inline(always)]
fn emit_tcp(args: &InetSockSetStateArgs, netns: u64, kind: u8, ts_ns: u64, owner: Option<&SockOwner>) {
    let sk = args.skaddr;
    let Some(mut entry) = FLOW_EVENTS_V1.reserve::<SockEventRaw>(0) else {
        count(COUNTER_FLOW_LOST);
        return;
    };
    let ev = entry.write(SockEventRaw::ZERO);
    ev.ts_ns = ts_ns;
    ev.sock = sk;
    ev.netns_ino = netns;
    ev.sport = args.sport;
    ev.dport = args.dport;
    ev.family = args.family;
    ev.protocol = IPPROTO_TCP as u8;
    ev.kind = kind;
    if args.family == AF_INET6 {
        ev.saddr = args.saddr_v6;
        ev.daddr = args.daddr_v6;
    } else {
        ev.saddr[..4].copy_from_slice(&args.saddr);
        ev.daddr[..4].copy_from_slice(&args.daddr);
    }
    match owner {
        Some(o) => {
            ev.cgroup_id = o.cgroup_id;
            ev.pid = o.pid;
            ev.comm = o.comm;
        }
        None => ev.cgroup_id = sock_cgroup_id(sk),
    }
    if kind == KIND_CLOSE {
        if koff!(flags) & OFFSETS_HAVE_TCP_BYTES != 0 {
            ev.bytes_sent = read_kernel(sk, koff!(tcp_bytes_acked)).unwrap_or(0);
            ev.bytes_received = read_kernel(sk, koff!(tcp_bytes_received)).unwrap_or(0);
        }
        if koff!(flags) & OFFSETS_HAVE_TCP_SEGS != 0 {
            let segs_in: u32 = read_kernel(sk, koff!(tcp_segs_in)).unwrap_or(0);
            let segs_out: u32 = read_kernel(sk, koff!(tcp_segs_out)).unwrap_or(0);
            ev.packets = u64::from(segs_in) + u64::from(segs_out);
        }
    }
    entry.submit(BPF_RB_NO_WAKEUP.into());
}

// === UDP + DNS: cgroup_skb at the cgroup v2 root ===

#[cgroup_skb(ingress)]
pub fn udp_ingress(ctx: SkBuffContext) -> i32 {
    match try_udp(&ctx, false) {
        Ok(()) => ALLOW,
        Err(_) => {
            count(COUNTER_READ_FAILED);
            FAIL_ACTION
        }
    }
}

#[cgroup_skb(egress)]
pub fn udp_egress(ctx: SkBuffContext) -> i32 {
    match try_udp(&ctx, true) {
        Ok(()) => ALLOW,
        Err(_) => {
            count(COUNTER_READ_FAILED);
            FAIL_ACTION
        }
    }
}

/// Turns a pointer the verifier tracks as a socket into a plain number, so it can
/// be offset and handed to `bpf_probe_read_kernel` like the tracepoint's `skaddr`.
/// The verifier forbids arithmetic on socket pointers; copying the value through
/// the stack with a probe read yields a scalar (privileged programs may do this).
#[inline(always)]
fn sock_addr_of(sk: *mut aya_ebpf::bindings::bpf_sock) -> u64 {
    let ptr = sk as u64;
    // SAFETY: reads 8 bytes of our own stack.
    unsafe { bpf_probe_read_kernel(&raw const ptr) }.unwrap_or(0)
}

/// Observes one packet. Only ever observes: the verdict is always [`ALLOW`].
fn try_udp(ctx: &SkBuffContext, egress: bool) -> Result<(), i32> {
    let skb: *mut __sk_buff = ctx.skb.skb;
    // Packets start at the IP header in cgroup_skb programs.
    let first: u8 = ctx.load(0).map_err(|e| e as i32)?;
    let mut key =
        UdpFlowKey { netns_ino: 0, laddr: [0; 16], raddr: [0; 16], lport: 0, rport: 0, family: 0, _pad: [0; 2] };
    let (src, dst, l4): ([u8; 16], [u8; 16], usize) = match first >> 4 {
        4 => {
            // Fragment field, TTL and protocol in one load.
            let w: [u8; 4] = ctx.load(6).map_err(|e| e as i32)?;
            let proto = w[3];
            // Only the first fragment carries the UDP / TCP header.
            let first_fragment = u16::from_be_bytes([w[0], w[1]]) & 0x1fff == 0;
            if proto != IPPROTO_UDP {
                if proto == IPPROTO_TCP_U8 && !egress && first_fragment {
                    return http_request(ctx, AF_INET, usize::from(first & 0x0f) * 4);
                }
                return Ok(());
            }
            if !first_fragment {
                return Ok(());
            }
            let s: [u8; 4] = ctx.load(12).map_err(|e| e as i32)?;
            let d: [u8; 4] = ctx.load(16).map_err(|e| e as i32)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src[..4].copy_from_slice(&s);
            dst[..4].copy_from_slice(&d);
            key.family = AF_INET;
            (src, dst, usize::from(first & 0x0f) * 4)
        }
        6 => {
            // Extension headers are not walked: a UDP datagram behind one is not
            // counted (rare for workload traffic; documented in user space).
            let next: u8 = ctx.load(6).map_err(|e| e as i32)?;
            if next != IPPROTO_UDP {
                if next == IPPROTO_TCP_U8 && !egress {
                    return http_request(ctx, AF_INET6, 40);
                }
                return Ok(());
            }
            key.family = AF_INET6;
            (ctx.load(8).map_err(|e| e as i32)?, ctx.load(24).map_err(|e| e as i32)?, 40)
        }
        _ => return Ok(()),
    };
    let ports: [u8; 4] = ctx.load(l4).map_err(|e| e as i32)?;
    let udp_len: [u8; 2] = ctx.load(l4 + 4).map_err(|e| e as i32)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    let payload = u64::from(u16::from_be_bytes(udp_len).saturating_sub(8));

    // SAFETY: reading the context's socket field; the verifier checks the access.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(());
    }
    let netns = sock_netns(sock_addr_of(sk))?;
    if !netns_observed(netns) {
        return Ok(());
    }
    key.netns_ino = netns;
    if egress {
        (key.laddr, key.raddr, key.lport, key.rport) = (src, dst, sport, dport);
    } else {
        (key.laddr, key.raddr, key.lport, key.rport) = (dst, src, dport, sport);
    }

    let now = now_ns();
    match UDP_FLOWS_V1.get_ptr_mut(key) {
        Some(v) => add_counters(v, egress, payload, now),
        None => new_flow(ctx, &key, egress, payload, now),
    }

    if !egress && sport == 53 {
        dns_answer(ctx, &key, l4 + 8, now);
    }
    Ok(())
}

/// `*p += v` as one BPF atomic instruction (`BPF_ATOMIC | BPF_ADD`): several CPUs
/// may count into the same flow at once.
#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    // SAFETY: the caller passes a valid, 8-byte aligned pointer into a map value.
    unsafe { asm!("lock *(u64 *)({p} + 0) += {v}", p = in(reg) p, v = in(reg) v, options(nostack)) };
}

#[inline(always)]
fn add_counters(v: *mut UdpFlowValue, egress: bool, payload: u64, now: u64) {
    // SAFETY: `v` points into a map value that lives while the program runs; the
    // counters are only ever added to atomically, by every CPU. `last_ns` is a
    // plain store: any recent value will do.
    unsafe {
        if egress {
            atomic_add(&raw mut (*v).bytes_sent, payload);
            atomic_add(&raw mut (*v).packets_sent, 1);
        } else {
            atomic_add(&raw mut (*v).bytes_received, payload);
            atomic_add(&raw mut (*v).packets_received, 1);
        }
        (*v).last_ns = now;
    }
}

/// First datagram of a 5-tuple: create the aggregate and tell user space
/// (Connect on egress, Accept on ingress). The event carries no bytes; all
/// bytes, including this datagram's, are reported from the aggregate so nothing
/// is counted twice.
#[inline(always)]
fn new_flow(ctx: &SkBuffContext, key: &UdpFlowKey, egress: bool, payload: u64, now: u64) {
    // SAFETY: helpers taking the program's own context.
    let (cookie, cgroup_id) = unsafe { (bpf_get_socket_cookie(ctx.as_ptr()), bpf_skb_cgroup_id(ctx.skb.skb)) };
    let (pid, comm) =
        if egress { ((bpf_get_current_pid_tgid() >> 32) as u32, current_comm()) } else { (0, [0; COMM_LEN]) };
    let value = UdpFlowValue {
        first_ns: now,
        last_ns: now,
        bytes_sent: if egress { payload } else { 0 },
        bytes_received: if egress { 0 } else { payload },
        packets_sent: u64::from(egress),
        packets_received: u64::from(!egress),
        cgroup_id,
        sock: cookie,
        pid,
        _pad: [0; 4],
        comm,
    };
    if UDP_FLOWS_V1.insert(key, value, BPF_NOEXIST.into()).is_err() {
        // Another CPU created it first: count into its entry instead.
        match UDP_FLOWS_V1.get_ptr_mut(key) {
            Some(v) => add_counters(v, egress, payload, now),
            None => count(COUNTER_UDP_INSERT_FAILED),
        }
        return;
    }
    let Some(mut entry) = FLOW_EVENTS_V1.reserve::<SockEventRaw>(0) else {
        count(COUNTER_FLOW_LOST);
        return;
    };
    let ev = entry.write(SockEventRaw::ZERO);
    ev.ts_ns = now;
    ev.sock = cookie;
    ev.netns_ino = key.netns_ino;
    ev.cgroup_id = cgroup_id;
    ev.saddr = key.laddr;
    ev.daddr = key.raddr;
    ev.pid = pid;
    ev.sport = key.lport;
    ev.dport = key.rport;
    ev.family = key.family;
    ev.protocol = IPPROTO_UDP;
    ev.kind = if egress { KIND_CONNECT } else { KIND_ACCEPT };
    ev.comm = comm;
    entry.submit(BPF_RB_NO_WAKEUP.into());
}

/// Copies a DNS message (UDP from port 53) for user space to parse. Bounded to
/// `DNS_PAYLOAD_MAX` bytes; user space never trusts `payload_len` blindly either.
#[inline(always)]
fn dns_answer(ctx: &SkBuffContext, key: &UdpFlowKey, offset: usize, now: u64) {
    let skb_len = ctx.len() as usize;
    if skb_len <= offset {
        return;
    }
    let mut len = skb_len - offset;
    if len > DNS_PAYLOAD_MAX {
        len = DNS_PAYLOAD_MAX;
    }
    let Some(mut entry) = DNS_EVENTS_V1.reserve::<DnsEventRaw>(0) else {
        count(COUNTER_DNS_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved record of the right size; every header
    // field is written before submit; the payload is only read up to payload_len.
    unsafe {
        (*ev).ts_ns = now;
        (*ev).netns_ino = key.netns_ino;
        (*ev).cgroup_id = bpf_skb_cgroup_id(ctx.skb.skb);
        (*ev).sock = bpf_get_socket_cookie(ctx.as_ptr());
        (*ev).saddr = key.raddr;
        (*ev).daddr = key.laddr;
        (*ev).family = key.family;
        (*ev).dport = key.lport;
        (*ev)._pad = [0; 2];
        // The verifier needs a length it can prove is in [1, DNS_PAYLOAD_MAX].
        // `len` is in that range already, but LLVM drops checks it can prove
        // redundant and the verifier cannot follow its reasoning; black_box hides
        // the value so the mask below survives and gives the verifier its bounds.
        const _: () = assert!(DNS_PAYLOAD_MAX.is_power_of_two());
        let n = (core::hint::black_box((len as u32).wrapping_sub(1)) & (DNS_PAYLOAD_MAX as u32 - 1)) + 1;
        let ret = bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            offset as u32,
            (&raw mut (*ev).payload).cast::<c_void>(),
            n,
        );
        if ret != 0 {
            entry.discard(0);
            count(COUNTER_READ_FAILED);
            return;
        }
        (*ev).payload_len = n as u16;
    }
    entry.submit(BPF_RB_NO_WAKEUP.into());
}

// === HTTP request lines: cgroup_skb ingress, TCP ===

/// Reads `N` bytes at `offset` of the packet: straight from the linear data when they
/// lie within it (a bounds check the verifier follows, a few ns), else through
/// `bpf_skb_load_bytes` (tens of ns). Offsets past 255 always take the helper: the
/// in-place read needs a small bound the verifier can track the pointer with.
#[inline(always)]
fn peek<const N: usize>(ctx: &SkBuffContext, offset: usize) -> Result<[u8; N], i32> {
    if offset > 0xff {
        return ctx.load(offset).map_err(|e| e as i32);
    }
    // SAFETY: reading the context's data pointers; the verifier checks the access.
    let (data, end) = unsafe { ((*ctx.skb.skb).data as usize, (*ctx.skb.skb).data_end as usize) };
    let at = data + (offset & 0xff);
    // The verifier only learns a readable range from `ptr + N > data_end` with the
    // constant on the pointer; LLVM would rewrite `at + N <= end` into `at < end`
    // (range 0). black_box keeps the sum as written.
    if core::hint::black_box(at + N) <= end {
        // SAFETY: `at..at + N` lies within the packet's linear data (checked above).
        return Ok(unsafe { core::ptr::read_unaligned(at as *const [u8; N]) });
    }
    ctx.load(offset).map_err(|e| e as i32)
}

/// Copies the start of an ingress TCP segment that begins like an HTTP request line.
///
/// Cost for every other TCP segment: the data-offset byte, the payload's first four
/// bytes (both read in place from the packet's linear data when there) and seven
/// compares; a segment without payload stops after the first read. Only a match pays
/// for the namespace filter, the addresses and the copy. The copy is the start of the
/// segment, not a reassembled stream: user space parses the request line from it and
/// ignores (and counts) anything it cannot. The caller has checked it is a first
/// fragment.
#[inline(always)]
fn http_request(ctx: &SkBuffContext, family: u16, l4: usize) -> Result<(), i32> {
    // SAFETY: plain read of a static (volatile: the value only exists at load time).
    if unsafe { core::ptr::read_volatile(&raw const BH_CAPTURE_HTTP) } == 0 {
        return Ok(());
    }
    let [doff] = peek::<1>(ctx, l4 + 12)?;
    let payload = l4 + usize::from(doff >> 4) * 4;
    let skb_len = ctx.len() as usize;
    // "GET /" is the shortest start worth copying.
    if skb_len < payload + 5 {
        return Ok(());
    }
    let head = u32::from_be_bytes(peek::<4>(ctx, payload)?);
    let mut hit = false;
    for p in HTTP_METHOD_PREFIXES {
        hit |= head == p;
    }
    if !hit {
        return Ok(());
    }

    // SAFETY: reading the context's socket field; the verifier checks the access.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return Ok(());
    }
    let netns = sock_netns(sock_addr_of(sk))?;
    if !netns_observed(netns) {
        return Ok(());
    }
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    if family == AF_INET {
        let s: [u8; 4] = ctx.load(12).map_err(|e| e as i32)?;
        let d: [u8; 4] = ctx.load(16).map_err(|e| e as i32)?;
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
    } else {
        saddr = ctx.load(8).map_err(|e| e as i32)?;
        daddr = ctx.load(24).map_err(|e| e as i32)?;
    }
    let ports: [u8; 4] = ctx.load(l4).map_err(|e| e as i32)?;
    let len = skb_len - payload;

    let Some(mut entry) = HTTP_EVENTS_V1.reserve::<HttpEventRaw>(0) else {
        count(COUNTER_HTTP_LOST);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved record of the right size; every header field
    // is written before submit; the payload is only read up to payload_len.
    unsafe {
        (*ev).ts_ns = now_ns();
        (*ev).netns_ino = netns;
        (*ev).cgroup_id = bpf_skb_cgroup_id(ctx.skb.skb);
        (*ev).sock = bpf_get_socket_cookie(ctx.as_ptr());
        (*ev).saddr = saddr;
        (*ev).daddr = daddr;
        (*ev).family = family;
        (*ev).sport = u16::from_be_bytes([ports[0], ports[1]]);
        (*ev).dport = u16::from_be_bytes([ports[2], ports[3]]);
        // As in `dns_answer`: clamp, then hide the value from LLVM so the mask that
        // gives the verifier its bounds ([1, HTTP_PAYLOAD_MAX]) is not folded away.
        let len = if len > HTTP_PAYLOAD_MAX { HTTP_PAYLOAD_MAX } else { len };
        const _: () = assert!(HTTP_PAYLOAD_MAX.is_power_of_two());
        let n = (core::hint::black_box((len as u32).wrapping_sub(1)) & (HTTP_PAYLOAD_MAX as u32 - 1)) + 1;
        let ret = bpf_skb_load_bytes(
            ctx.skb.skb as *const c_void,
            payload as u32,
            (&raw mut (*ev).payload).cast::<c_void>(),
            n,
        );
        if ret != 0 {
            entry.discard(0);
            count(COUNTER_READ_FAILED);
            return Ok(());
        }
        (*ev).payload_len = n as u16;
    }
    entry.submit(BPF_RB_NO_WAKEUP.into());
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: eBPF programs cannot unwind; the verifier rejects any reachable path here.
    unsafe { core::hint::unreachable_unchecked() }
}

/// GPL-compatible licence string: `bpf_probe_read_kernel` and the ring-buffer
/// helpers are GPL-only. "Dual MIT/GPL" is what aya-template uses.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
