//! Socket events as user space sees them, decoded from the kernel's ring buffer by
//! `datapath`. Aggregation works on these, so it is testable without a kernel.

use std::fmt;
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
    pub comm: Comm,
    /// Kernel socket address or cookie, used to tie connect/established/close together.
    pub sock: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets: u64,
    /// Wall-clock Unix milliseconds (converted from the kernel's monotonic clock).
    pub unix_ms: i64,
}

/// An HTTP/1.x request method the kernel copies request lines for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
}

impl HttpMethod {
    pub const ALL: [HttpMethod; 7] = [
        HttpMethod::Get,
        HttpMethod::Head,
        HttpMethod::Post,
        HttpMethod::Put,
        HttpMethod::Delete,
        HttpMethod::Patch,
        HttpMethod::Options,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Options => "OPTIONS",
        }
    }

    /// The method whose token is exactly `token`.
    pub fn from_token(token: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str().as_bytes() == token)
    }
}

impl fmt::Display for HttpMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One HTTP request line a local workload received: the server side of a TCP
/// connection. `local` is the server's address, `remote` the client's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub netns_ino: u64,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// cgroup v2 id of the receiving socket.
    pub cgroup_id: u64,
    pub method: HttpMethod,
    /// The request target's path, without the query string; a valid rule path
    /// (`bulkhead_model::policy::validate_path`).
    pub path: Box<str>,
    pub unix_ms: i64,
}

/// A process name as the kernel keeps it: at most 16 bytes (`TASK_COMM_LEN`). A
/// fixed-size `Copy` value so that aggregating millions of events allocates nothing.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Comm {
    len: u8,
    bytes: [u8; Comm::MAX],
}

impl Comm {
    pub const MAX: usize = 16;

    /// From text; truncated to 16 bytes on a character boundary.
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(Self::MAX);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; Self::MAX];
        bytes[..end].copy_from_slice(&s.as_bytes()[..end]);
        Self { len: end as u8, bytes }
    }

    /// From the kernel's NUL-padded buffer; invalid UTF-8 is replaced, as names are
    /// whatever a process set with prctl.
    pub fn from_kernel(raw: &[u8]) -> Self {
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        match std::str::from_utf8(&raw[..end]) {
            Ok(s) => Self::new(s),
            Err(_) => Self::new(&String::from_utf8_lossy(&raw[..end])),
        }
    }

    pub fn as_str(&self) -> &str {
        // Built from a &str cut on a char boundary, so always valid.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Comm {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_is_bounded_and_valid() {
        assert_eq!(Comm::new("curl"), "curl");
        assert_eq!(Comm::new("a-very-long-process-name"), "a-very-long-proc");
        // 15 ASCII bytes + a 2-byte character: cut before the character.
        assert_eq!(Comm::new("123456789012345é").as_str(), "123456789012345");
        assert_eq!(Comm::from_kernel(b"nginx\0\0\0junk"), "nginx");
        assert_eq!(Comm::from_kernel(&[0xff, b'a', 0]).as_str(), "\u{fffd}a");
        assert!(Comm::from_kernel(&[0; 16]).is_empty());
    }
}
