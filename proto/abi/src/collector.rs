//! The collector's kernel ↔ user-space contract.
//!
//! Data flow: the `sock/inet_sock_set_state` tracepoint (TCP) and the cgroup_skb
//! programs (UDP) write [`SockEventRaw`] records into [`FLOW_EVENTS`]; the
//! cgroup_skb ingress program copies DNS answers into [`DNS_EVENTS`] as
//! [`DnsEventRaw`]; the same program copies the start of every ingress TCP segment
//! that begins like an HTTP/1.x request line into [`HTTP_EVENTS`] as
//! [`HttpEventRaw`]; UDP byte counters are aggregated per 5-tuple in [`UDP_FLOWS`]
//! and drained by user space. Every ring-buffer reservation that fails is counted
//! in [`COUNTERS`] so loss is reported, never silent.

// === Map names (≤ 15 characters: the kernel truncates at 16 with the NUL) ===

/// Ring buffer of [`SockEventRaw`].
pub const FLOW_EVENTS: &str = "FLOW_EVENTS_V1";
/// Ring buffer of [`DnsEventRaw`].
pub const DNS_EVENTS: &str = "DNS_EVENTS_V1";
/// Ring buffer of [`HttpEventRaw`].
pub const HTTP_EVENTS: &str = "HTTP_EVENTS_V1";
/// Hash: network-namespace inode (u64) → u8 (1). Meaning set by [`CollectorConfig::netns_mode`].
pub const NETNS_FILTER: &str = "NETNS_FILTER_V1";
/// Array[1] of [`CollectorConfig`]: settings user space may change at run time.
pub const CONFIG: &str = "CONFIG_V1";
/// Per-CPU array of u64 counters, indexed by the `COUNTER_*` constants.
pub const COUNTERS: &str = "COUNTERS_V1";
/// LRU hash [`UdpFlowKey`] → [`UdpFlowValue`].
pub const UDP_FLOWS: &str = "UDP_FLOWS_V1";
/// LRU hash: kernel socket address (u64) → [`SockOwner`] recorded at TCP connect.
pub const SOCK_OWNER: &str = "SOCK_OWNER_V1";
/// Name of the read-only global holding [`KernelOffsets`] (set with
/// `EbpfLoader::override_global` before load, so the verifier sees constants).
pub const KERNEL_OFFSETS_GLOBAL: &str = "BH_KOFFSETS";
/// Name of the read-only global (u32) that turns HTTP request capture on (1) or off
/// (0). Set before load like [`KERNEL_OFFSETS_GLOBAL`]: with capture off the verifier
/// prunes the whole branch, so it costs nothing per packet.
pub const CAPTURE_HTTP_GLOBAL: &str = "BH_CAPTURE_HTTP";

/// Every map name, for tests and for pinning/cleanup code that must know them all.
pub const MAP_NAMES: [&str; 8] =
    [FLOW_EVENTS, DNS_EVENTS, HTTP_EVENTS, NETNS_FILTER, CONFIG, COUNTERS, UDP_FLOWS, SOCK_OWNER];
const _: () = {
    let mut i = 0;
    while i < MAP_NAMES.len() {
        assert!(MAP_NAMES[i].len() <= 15);
        i += 1;
    }
};

// === Program names (the Rust function names in collector/ebpf) ===

pub const PROG_SOCK_STATE: &str = "inet_sock_set_state";
pub const PROG_SKB_INGRESS: &str = "udp_ingress";
pub const PROG_SKB_EGRESS: &str = "udp_egress";

// === Default capacities (user space may override with `map_max_entries`) ===

pub const DEFAULT_FLOW_EVENTS_BYTES: u32 = 8 << 20;
pub const DEFAULT_DNS_EVENTS_BYTES: u32 = 1 << 18;
/// 4 MiB: about 12k request records, i.e. 1.2 s of 10k requests/s between two polls.
pub const DEFAULT_HTTP_EVENTS_BYTES: u32 = 1 << 22;
pub const DEFAULT_UDP_FLOWS: u32 = 16384;
pub const DEFAULT_SOCK_OWNER: u32 = 16384;
pub const NETNS_FILTER_MAX: u32 = 4096;

// === Counters (indices into COUNTERS) ===

/// `FLOW_EVENTS` reservation failed (ring buffer full): an event was lost.
pub const COUNTER_FLOW_LOST: u32 = 0;
/// `DNS_EVENTS` reservation failed: a DNS answer was lost.
pub const COUNTER_DNS_LOST: u32 = 1;
/// A kernel memory read (BTF-resolved offset) failed; the event was sent with zeros
/// in the affected fields.
pub const COUNTER_READ_FAILED: u32 = 2;
/// Inserting into `UDP_FLOWS` failed for a reason other than a racing insert.
pub const COUNTER_UDP_INSERT_FAILED: u32 = 3;
/// `HTTP_EVENTS` reservation failed: an HTTP request line was lost.
pub const COUNTER_HTTP_LOST: u32 = 4;
pub const COUNTER_COUNT: u32 = 5;

// === Event kinds (never reuse a value) ===

pub const KIND_CONNECT: u8 = 1;
pub const KIND_ESTABLISHED: u8 = 2;
pub const KIND_ACCEPT: u8 = 3;
pub const KIND_CLOSE: u8 = 4;

// === Netns filter modes (CollectorConfig::netns_mode) ===

/// Every namespace is observed; `NETNS_FILTER` is ignored.
pub const NETNS_MODE_ALL: u32 = 0;
/// Only namespaces listed in `NETNS_FILTER` are observed.
pub const NETNS_MODE_ONLY: u32 = 1;
/// Every namespace except those listed in `NETNS_FILTER` is observed.
pub const NETNS_MODE_EXCEPT: u32 = 2;

// === Kernel constants the programs compare against ===

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// IPPROTO_TCP as it appears in an IP header's protocol / next-header byte.
pub const IPPROTO_TCP_U8: u8 = 6;
pub const TCP_ESTABLISHED: i32 = 1;
pub const TCP_SYN_SENT: i32 = 2;
pub const TCP_SYN_RECV: i32 = 3;
pub const TCP_CLOSE: i32 = 7;
pub const TCP_LISTEN: i32 = 10;
/// Bytes of DNS payload copied to user space (classic DNS-over-UDP limit without
/// EDNS0; larger answers are truncated and parsed as far as they go).
pub const DNS_PAYLOAD_MAX: usize = 512;
/// Bytes of an HTTP request's first segment copied to user space: the request line
/// of a path at the 128-byte limit rules can express, with the method, a query
/// string of about 100 bytes and ` HTTP/1.1\r\n`. A power of two, so the kernel can
/// bound the copy with a mask the verifier follows.
pub const HTTP_PAYLOAD_MAX: usize = 256;
pub const COMM_LEN: usize = 16;

/// The first four bytes of every request line the kernel copies, as big-endian u32s:
/// `GET `, `PUT `, `POST`, `HEAD`, `DELE`(TE), `PATC`(H), `OPTI`(ONS). One 4-byte load
/// and these compares decide for every other segment; user space parses the rest.
pub const HTTP_METHOD_PREFIXES: [u32; 7] = [
    u32::from_be_bytes(*b"GET "),
    u32::from_be_bytes(*b"PUT "),
    u32::from_be_bytes(*b"POST"),
    u32::from_be_bytes(*b"HEAD"),
    u32::from_be_bytes(*b"DELE"),
    u32::from_be_bytes(*b"PATC"),
    u32::from_be_bytes(*b"OPTI"),
];

/// One socket event as the kernel writes it into `FLOW_EVENTS`.
///
/// `saddr`/`sport` are always the local (observed) side. IPv4 addresses occupy the
/// first four bytes of the 16-byte fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockEventRaw {
    /// `CLOCK_BOOTTIME` nanoseconds (`bpf_ktime_get_boot_ns`).
    pub ts_ns: u64,
    /// Kernel socket address (TCP) or socket cookie (UDP): ties the events of one
    /// connection together.
    pub sock: u64,
    pub netns_ino: u64,
    pub cgroup_id: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Thread-group id (the user-space "pid"); 0 when unknown.
    pub pid: u32,
    /// Host byte order.
    pub sport: u16,
    /// Host byte order.
    pub dport: u16,
    pub family: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    /// One of the `KIND_*` constants.
    pub kind: u8,
    pub _pad: [u8; 4],
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<SockEventRaw>() == 120);

impl SockEventRaw {
    pub const ZERO: Self = Self {
        ts_ns: 0,
        sock: 0,
        netns_ino: 0,
        cgroup_id: 0,
        bytes_sent: 0,
        bytes_received: 0,
        packets: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        pid: 0,
        sport: 0,
        dport: 0,
        family: 0,
        protocol: 0,
        kind: 0,
        _pad: [0; 4],
        comm: [0; COMM_LEN],
    };
}

/// A DNS message received by a workload over UDP from port 53.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEventRaw {
    pub ts_ns: u64,
    pub netns_ino: u64,
    pub cgroup_id: u64,
    /// Socket cookie of the receiving socket.
    pub sock: u64,
    /// The resolver's address (packet source).
    pub saddr: [u8; 16],
    /// The workload's address (packet destination).
    pub daddr: [u8; 16],
    pub family: u16,
    /// Host byte order.
    pub dport: u16,
    /// Bytes valid in `payload` (≤ DNS_PAYLOAD_MAX).
    pub payload_len: u16,
    pub _pad: [u8; 2],
    pub payload: [u8; DNS_PAYLOAD_MAX],
}
const _: () = assert!(size_of::<DnsEventRaw>() == 32 + 32 + 8 + DNS_PAYLOAD_MAX);

/// The start of an ingress TCP segment that begins with an HTTP method
/// ([`HTTP_METHOD_PREFIXES`]), received by a socket of an observed namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpEventRaw {
    pub ts_ns: u64,
    pub netns_ino: u64,
    /// cgroup v2 id of the receiving socket (the server's).
    pub cgroup_id: u64,
    /// Socket cookie of the receiving socket. Not used to match connections: a
    /// request carried by the handshake's final ACK is filtered with the listener.
    pub sock: u64,
    /// The client's address (packet source).
    pub saddr: [u8; 16],
    /// The server's address (packet destination).
    pub daddr: [u8; 16],
    pub family: u16,
    /// Host byte order: the client's port.
    pub sport: u16,
    /// Host byte order: the server's port.
    pub dport: u16,
    /// Bytes valid in `payload` (≤ HTTP_PAYLOAD_MAX).
    pub payload_len: u16,
    pub payload: [u8; HTTP_PAYLOAD_MAX],
}
const _: () = assert!(size_of::<HttpEventRaw>() == 32 + 32 + 8 + HTTP_PAYLOAD_MAX);

/// Aggregation key of one UDP flow as seen by one local socket's namespace.
/// IPv4 addresses occupy the first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UdpFlowKey {
    pub netns_ino: u64,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    /// Host byte order.
    pub lport: u16,
    /// Host byte order.
    pub rport: u16,
    pub family: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<UdpFlowKey>() == 48);

/// Cumulative counters of one UDP flow. The kernel only ever adds; user space
/// computes deltas between drains and deletes idle entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFlowValue {
    pub first_ns: u64,
    pub last_ns: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// cgroup id of the local socket.
    pub cgroup_id: u64,
    /// Socket cookie of the local socket that created the entry.
    pub sock: u64,
    /// Sender's tgid when the entry was created on egress (process context); else 0.
    pub pid: u32,
    pub _pad: [u8; 4],
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<UdpFlowValue>() == 88);

/// Who started a TCP connection, and when, recorded in process context at
/// `CLOSE → SYN_SENT` so the later (softirq) transitions of the same socket can
/// carry it. The Connect event itself is only written at the next transition,
/// when the kernel has picked the local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOwner {
    /// `CLOCK_BOOTTIME` of the connect.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub _pad: [u8; 4],
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<SockOwner>() == 40);

/// Kernel struct offsets resolved from `/sys/kernel/btf/vmlinux` at load time.
/// Pointer offsets are from the start of `struct sock` (== `struct tcp_sock`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelOffsets {
    /// `sock.__sk_common.skc_net.net` (a `struct net *`).
    pub sk_net: u32,
    /// `net.ns.inum` (u32).
    pub net_ns_inum: u32,
    /// `tcp_sock.bytes_acked` (u64).
    pub tcp_bytes_acked: u32,
    /// `tcp_sock.bytes_received` (u64).
    pub tcp_bytes_received: u32,
    /// `tcp_sock.segs_in` (u32).
    pub tcp_segs_in: u32,
    /// `tcp_sock.segs_out` (u32).
    pub tcp_segs_out: u32,
    /// `sock.sk_cgrp_data.cgroup` (a `struct cgroup *`).
    pub sk_cgroup: u32,
    /// `cgroup.kn` (a `struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (u64; equals the cgroup directory's inode).
    pub kn_id: u32,
    /// `OFFSETS_HAVE_*` bits: which optional offsets are valid.
    pub flags: u32,
}
const _: () = assert!(size_of::<KernelOffsets>() == 40);

impl KernelOffsets {
    /// All offsets unknown: what the object file carries until user space overrides it.
    pub const ZERO: Self = Self {
        sk_net: 0,
        net_ns_inum: 0,
        tcp_bytes_acked: 0,
        tcp_bytes_received: 0,
        tcp_segs_in: 0,
        tcp_segs_out: 0,
        sk_cgroup: 0,
        cgroup_kn: 0,
        kn_id: 0,
        flags: 0,
    };
}

/// `tcp_bytes_acked`/`tcp_bytes_received` are valid.
pub const OFFSETS_HAVE_TCP_BYTES: u32 = 1 << 0;
/// `tcp_segs_in`/`tcp_segs_out` are valid.
pub const OFFSETS_HAVE_TCP_SEGS: u32 = 1 << 1;
/// `sk_cgroup`/`cgroup_kn`/`kn_id` are valid.
pub const OFFSETS_HAVE_SOCK_CGROUP: u32 = 1 << 2;
/// `sk_net`/`net_ns_inum` are valid. Without them the programs report netns 0 and
/// the filter cannot work, so user space refuses to load instead.
pub const OFFSETS_HAVE_NETNS: u32 = 1 << 3;

/// Run-time settings, one entry in `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CollectorConfig {
    /// One of the `NETNS_MODE_*` constants.
    pub netns_mode: u32,
    pub _pad: [u8; 4],
}
const _: () = assert!(size_of::<CollectorConfig>() == 8);

/// Layout of the `sock/inet_sock_set_state` tracepoint record. User space checks
/// every field against `/sys/kernel/tracing/events/sock/inet_sock_set_state/format`
/// before loading (see [`INET_SOCK_SET_STATE_FIELDS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InetSockSetStateArgs {
    pub common: u64,
    pub skaddr: u64,
    pub oldstate: i32,
    pub newstate: i32,
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub protocol: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub saddr_v6: [u8; 16],
    pub daddr_v6: [u8; 16],
}
const _: () = assert!(size_of::<InetSockSetStateArgs>() == 72);

/// (name, offset, size) of every tracepoint field the program reads.
pub const INET_SOCK_SET_STATE_FIELDS: [(&str, usize, usize); 11] = [
    ("skaddr", 8, 8),
    ("oldstate", 16, 4),
    ("newstate", 20, 4),
    ("sport", 24, 2),
    ("dport", 26, 2),
    ("family", 28, 2),
    ("protocol", 30, 2),
    ("saddr", 32, 4),
    ("daddr", 36, 4),
    ("saddr_v6", 40, 16),
    ("daddr_v6", 56, 16),
];

const _: () = {
    use core::mem::offset_of;
    // The struct must agree with INET_SOCK_SET_STATE_FIELDS, which user space
    // checks against the running kernel's format file.
    assert!(offset_of!(InetSockSetStateArgs, skaddr) == INET_SOCK_SET_STATE_FIELDS[0].1);
    assert!(offset_of!(InetSockSetStateArgs, oldstate) == INET_SOCK_SET_STATE_FIELDS[1].1);
    assert!(offset_of!(InetSockSetStateArgs, newstate) == INET_SOCK_SET_STATE_FIELDS[2].1);
    assert!(offset_of!(InetSockSetStateArgs, sport) == INET_SOCK_SET_STATE_FIELDS[3].1);
    assert!(offset_of!(InetSockSetStateArgs, dport) == INET_SOCK_SET_STATE_FIELDS[4].1);
    assert!(offset_of!(InetSockSetStateArgs, family) == INET_SOCK_SET_STATE_FIELDS[5].1);
    assert!(offset_of!(InetSockSetStateArgs, protocol) == INET_SOCK_SET_STATE_FIELDS[6].1);
    assert!(offset_of!(InetSockSetStateArgs, saddr) == INET_SOCK_SET_STATE_FIELDS[7].1);
    assert!(offset_of!(InetSockSetStateArgs, daddr) == INET_SOCK_SET_STATE_FIELDS[8].1);
    assert!(offset_of!(InetSockSetStateArgs, saddr_v6) == INET_SOCK_SET_STATE_FIELDS[9].1);
    assert!(offset_of!(InetSockSetStateArgs, daddr_v6) == INET_SOCK_SET_STATE_FIELDS[10].1);
};
