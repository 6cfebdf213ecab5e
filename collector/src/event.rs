//! Socket events as user space sees them, decoded from the kernel's ring buffer by
//! `datapath`. Aggregation works on these, so it is testable without a kernel.

use std::net::SocketAddr;

use bulkhead_model::Protocol;

/// What happened to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SockEventKind {
    /// A local process started a connection (TCP SYN_SENT) or sent a first datagram.
    Connect,
    /// A connection the local side started was established.
    Established,
    /// The local side accepted a connection (TCP SYN_RECV → ESTABLISHED) or received a
    /// first datagram on a socket it did not start from.
    Accept,
    /// A connection closed; carries the final byte counters.
    Close,
    /// Counters for a flow already reported by Connect/Accept (UDP in particular):
    /// adds bytes/packets, not a new connection.
    Traffic,
    /// A pre-existing connection found in the socket table at start-up.
    SeedEgress,
    SeedIngress,
}

/// One socket event. `local` is the observed workload's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SockEvent {
    pub kind: SockEventKind,
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Network namespace inode of the socket.
    pub netns_ino: u64,
    /// cgroup v2 id of the process in whose context the event ran (0 when unknown,
    /// e.g. softirq context on the accept side).
    pub cgroup_id: u64,
    pub pid: u32,
    pub comm: String,
    /// Kernel socket address or cookie, used to tie connect/established/close together.
    pub sock: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets: u64,
    /// Wall-clock Unix milliseconds (converted from the kernel's monotonic clock).
    pub unix_ms: i64,
}
