//! Seeding connections that predate the collector from the kernel socket tables.
//!
//! The tracepoint only sees state *changes*, so a connection established before
//! the collector loaded would stay invisible until it closes — long-lived
//! connections (databases, message buses) are exactly the edges a policy must not
//! miss. At start-up we therefore dump every established TCP socket of each
//! observed network namespace with netlink `sock_diag` (inside the namespace, on a
//! dedicated thread: sock_diag answers for the caller's namespace only).
//!
//! Direction is inferred: if a listener in the same namespace owns the local port
//! (bound to that address or a wildcard), the local side accepted the connection
//! (SeedIngress); otherwise it connected out (SeedEgress).
//!
//! Seeded events carry no byte counts: the kernel's Close event later reports the
//! connection's lifetime totals, so counting bytes here would count them twice.
//! pid and comm come from the process holding the socket's inode (a walk of
//! `/proc/*/fd`); the cgroup id from the `INET_DIAG_CGROUP_ID` attribute.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use bulkhead_model::{EndpointFact, Protocol};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as _};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

use crate::endpoints::{self, EndpointError};
use crate::event::{Comm, SockEvent, SockEventKind};

/// `INET_DIAG_CGROUP_ID` (include/uapi/linux/inet_diag.h), not decoded by the crate.
const INET_DIAG_CGROUP_ID: u16 = 21;
const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("finding network namespaces to seed")]
    Namespaces(#[source] EndpointError),
    #[error("network namespace {netns_ino}: {source}")]
    Enter {
        netns_ino: u64,
        #[source]
        source: EndpointError,
    },
    #[error("sock_diag in network namespace {netns_ino}: {source}")]
    Netlink {
        netns_ino: u64,
        #[source]
        source: io::Error,
    },
    #[error("sock_diag in network namespace {netns_ino} answered with error {code}")]
    Kernel { netns_ino: u64, code: i32 },
    #[error("sock_diag in network namespace {netns_ino}: undecodable answer: {reason}")]
    Decode { netns_ino: u64, reason: String },
}

/// One socket from the dump.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiagSocket {
    state: u8,
    local: SocketAddr,
    remote: SocketAddr,
    inode: u32,
    cookie: u64,
    cgroup_id: u64,
}

/// Why one namespace's dump failed, before the netns inode is attached.
#[derive(Debug)]
enum DumpError {
    Io(io::Error),
    Kernel(i32),
    Decode(String),
}

/// Established TCP connections of `netns` that exist right now.
///
/// A namespace that disappeared since `netns` was scanned is skipped.
pub fn seed(netns: &[EndpointFact]) -> Result<Vec<SockEvent>, SeedError> {
    if netns.is_empty() {
        return Ok(Vec::new());
    }
    let handles = endpoints::netns_handles().map_err(SeedError::Namespaces)?;
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let mut owners: Option<HashMap<u32, (u32, String)>> = None;
    let mut out = Vec::new();
    for fact in netns {
        let netns_ino = fact.netns_ino;
        let Some(handle) = handles.get(&netns_ino) else {
            tracing::debug!(netns = netns_ino, "Network namespace gone before seeding.");
            continue;
        };
        let sockets = match endpoints::in_netns(&handle.path, dump_tcp) {
            Ok(Ok(sockets)) => sockets,
            Ok(Err(DumpError::Io(source))) => return Err(SeedError::Netlink { netns_ino, source }),
            Ok(Err(DumpError::Kernel(code))) => return Err(SeedError::Kernel { netns_ino, code }),
            Ok(Err(DumpError::Decode(reason))) => return Err(SeedError::Decode { netns_ino, reason }),
            Err(err) if err.is_vanished() => {
                tracing::debug!(netns = netns_ino, "Network namespace vanished before seeding.");
                continue;
            }
            Err(source) => return Err(SeedError::Enter { netns_ino, source }),
        };
        let established: Vec<&DiagSocket> = sockets.iter().filter(|s| s.state == TCP_ESTABLISHED).collect();
        if established.is_empty() {
            continue;
        }
        let owners = owners.get_or_insert_with(socket_owners);
        let listeners: Vec<SocketAddr> = sockets.iter().filter(|s| s.state == TCP_LISTEN).map(|s| s.local).collect();
        for s in established {
            let kind =
                if has_listener(&listeners, s.local) { SockEventKind::SeedIngress } else { SockEventKind::SeedEgress };
            let (pid, comm) = owners.get(&s.inode).cloned().unwrap_or_default();
            out.push(SockEvent {
                kind,
                protocol: Protocol::Tcp,
                local: canonical(s.local),
                remote: canonical(s.remote),
                netns_ino,
                cgroup_id: s.cgroup_id,
                pid,
                comm: Comm::new(&comm),
                sock: s.cookie,
                bytes_sent: 0,
                bytes_received: 0,
                packets: 0,
                unix_ms,
            });
        }
    }
    Ok(out)
}

/// A listener owns `local` if it is bound to the same port on the same address
/// or on a wildcard address (of either family: a `[::]` listener accepts IPv4 too
/// unless v6only, which we do not distinguish).
fn has_listener(listeners: &[SocketAddr], local: SocketAddr) -> bool {
    let local_ip = local.ip().to_canonical();
    listeners.iter().any(|l| l.port() == local.port() && (l.ip().is_unspecified() || l.ip().to_canonical() == local_ip))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Dumps listening and established TCP sockets (IPv4 and IPv6) of the calling
/// thread's network namespace.
fn dump_tcp() -> Result<Vec<DiagSocket>, DumpError> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG).map_err(DumpError::Io)?;
    socket.bind_auto().map_err(DumpError::Io)?;
    socket.connect(&NetlinkAddr::new(0, 0)).map_err(DumpError::Io)?;
    let mut out = Vec::new();
    for (family, socket_id) in [(AF_INET, SocketId::new_v4()), (AF_INET6, SocketId::new_v6())] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::ESTABLISHED | StateFlags::LISTEN,
                socket_id,
            })
            .into(),
        );
        request.finalize();
        let mut buf = vec![0u8; request.buffer_len()];
        request.serialize(&mut buf);
        socket.send(&buf, 0).map_err(DumpError::Io)?;
        receive_dump(&socket, &mut out)?;
    }
    Ok(out)
}

fn receive_dump(socket: &Socket, out: &mut Vec<DiagSocket>) -> Result<(), DumpError> {
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(DumpError::Io)?;
        if datagram.is_empty() {
            return Err(DumpError::Decode("empty netlink datagram".into()));
        }
        let mut offset = 0;
        while offset < datagram.len() {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&datagram[offset..])
                .map_err(|e| DumpError::Decode(e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(DumpError::Kernel(e.code.map_or(0, |c| c.get())));
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                    out.push(diag_socket(&resp));
                }
                _ => {}
            }
            if len == 0 {
                return Err(DumpError::Decode("netlink message of length 0".into()));
            }
            // Netlink messages are 4-byte aligned within a datagram.
            offset += (len + 3) & !3;
        }
    }
}

fn diag_socket(resp: &InetResponse) -> DiagSocket {
    let h = &resp.header;
    let id = &h.socket_id;
    let mut cgroup_id = 0;
    for nla in resp.nlas.iter() {
        if let Nla::Other(other) = nla
            && other.kind() == INET_DIAG_CGROUP_ID
            && other.value_len() == 8
        {
            let mut value = [0u8; 8];
            other.emit_value(&mut value);
            cgroup_id = u64::from_ne_bytes(value);
        }
    }
    DiagSocket {
        state: h.state,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: SocketAddr::new(id.destination_address, id.destination_port),
        inode: h.inode,
        cookie: u64::from_ne_bytes(id.cookie),
        cgroup_id,
    }
}

/// socket inode → (pid, comm) of a process holding it, from `/proc/*/fd`.
/// Processes we cannot read (exited, or not ours to read) are skipped.
fn socket_owners() -> HashMap<u32, (u32, String)> {
    let mut owners = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return owners };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let mut comm: Option<String> = None;
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else { continue };
            let Some(inode) = parse_socket_link(&target.to_string_lossy()) else { continue };
            let comm = comm.get_or_insert_with(|| {
                std::fs::read_to_string(entry.path().join("comm")).map(|c| c.trim_end().to_owned()).unwrap_or_default()
            });
            owners.entry(inode).or_insert_with(|| (pid, comm.clone()));
        }
    }
    owners
}

/// `socket:[12345]` → 12345.
fn parse_socket_link(target: &str) -> Option<u32> {
    target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_classification() {
        let any4: SocketAddr = "0.0.0.0:80".parse().expect("addr");
        let any6: SocketAddr = "[::]:443".parse().expect("addr");
        let bound: SocketAddr = "10.0.0.1:8080".parse().expect("addr");
        let listeners = [any4, any6, bound];
        assert!(has_listener(&listeners, "10.9.9.9:80".parse().expect("addr")));
        assert!(has_listener(&listeners, "[::ffff:10.0.0.5]:443".parse().expect("addr")));
        assert!(has_listener(&listeners, "10.0.0.1:8080".parse().expect("addr")));
        assert!(!has_listener(&listeners, "10.0.0.2:8080".parse().expect("addr")));
        assert!(!has_listener(&listeners, "10.0.0.1:40000".parse().expect("addr")));
    }

    #[test]
    fn socket_links() {
        assert_eq!(parse_socket_link("socket:[4242]"), Some(4242));
        assert_eq!(parse_socket_link("pipe:[1]"), None);
        assert_eq!(parse_socket_link("socket:[x]"), None);
        assert_eq!(parse_socket_link("/dev/null"), None);
    }

    #[test]
    fn canonical_folds_mapped_addresses() {
        let a: SocketAddr = "[::ffff:192.0.2.1]:5".parse().expect("addr");
        assert_eq!(canonical(a), "192.0.2.1:5".parse::<SocketAddr>().expect("addr"));
    }
}
