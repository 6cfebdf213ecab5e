//! Turning kernel records into [`SockEvent`]s. Pure functions: testable without a
//! kernel, and the only place that knows the record layouts on the user side.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bulkhead_abi::collector::{
    AF_INET, AF_INET6, COMM_LEN, DNS_PAYLOAD_MAX, DnsEventRaw, HTTP_PAYLOAD_MAX, HttpEventRaw, KIND_ACCEPT, KIND_CLOSE,
    KIND_CONNECT, KIND_ESTABLISHED, SockEventRaw, UdpFlowKey, UdpFlowValue,
};
use bulkhead_model::Protocol;

use crate::event::{Comm, SockEvent, SockEventKind};

/// Converts the kernel's `CLOCK_BOOTTIME` to wall-clock Unix milliseconds.
///
/// The offset is re-read on every drain (two `clock_gettime` calls), so NTP steps
/// of the wall clock show up within one poll interval instead of skewing every
/// timestamp for the collector's lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootClock {
    /// Unix ns minus boot ns at the moment of sampling.
    offset_ns: i128,
}

impl BootClock {
    pub fn sample() -> Self {
        let boot = clock_ns(libc::CLOCK_BOOTTIME);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self { offset_ns: real - boot }
    }

    /// For tests: a clock whose boot time 0 is `unix_ms`.
    pub fn with_offset_ms(unix_ms: i64) -> Self {
        Self { offset_ns: i128::from(unix_ms) * 1_000_000 }
    }

    pub fn unix_ms(&self, boot_ns: u64) -> i64 {
        let ms = (i128::from(boot_ns) + self.offset_ns).div_euclid(1_000_000);
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// The current `CLOCK_BOOTTIME` in ns, the clock the programs stamp with.
    pub fn boot_now_ns() -> u64 {
        u64::try_from(clock_ns(libc::CLOCK_BOOTTIME)).unwrap_or(0)
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; both clocks exist on every Linux
    // the collector supports, and failure leaves `ts` zeroed.
    let _ = unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// A kernel record that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {len} bytes, expected at least {expected}")]
    ShortRecord { len: usize, expected: usize },
    #[error("unknown event kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("unknown protocol {protocol}")]
    UnknownProtocol { protocol: u8 },
    #[error("unknown address family {family}")]
    UnknownFamily { family: u16 },
    #[error("payload length {len} exceeds {max}")]
    PayloadTooLong { len: usize, max: usize },
}

/// Copies a `T` out of a ring-buffer record (records are only 8-byte aligned and
/// may be longer than `T`).
fn read_record<T: Copy>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::ShortRecord { len: bytes.len(), expected: size_of::<T>() });
    }
    // SAFETY: length checked above; the ABI types are repr(C) plain data for which
    // every bit pattern is valid; read_unaligned makes no alignment assumption.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn sock_event(bytes: &[u8], clock: &BootClock) -> Result<SockEvent, DecodeError> {
    let raw: SockEventRaw = read_record(bytes)?;
    let kind = match raw.kind {
        KIND_CONNECT => SockEventKind::Connect,
        KIND_ESTABLISHED => SockEventKind::Established,
        KIND_ACCEPT => SockEventKind::Accept,
        KIND_CLOSE => SockEventKind::Close,
        kind => return Err(DecodeError::UnknownKind { kind }),
    };
    let protocol =
        Protocol::from_number(raw.protocol).ok_or(DecodeError::UnknownProtocol { protocol: raw.protocol })?;
    Ok(SockEvent {
        kind,
        protocol,
        local: SocketAddr::new(addr(raw.family, &raw.saddr)?, raw.sport),
        remote: SocketAddr::new(addr(raw.family, &raw.daddr)?, raw.dport),
        netns_ino: raw.netns_ino,
        cgroup_id: raw.cgroup_id,
        pid: raw.pid,
        comm: comm(&raw.comm),
        sock: raw.sock,
        bytes_sent: raw.bytes_sent,
        bytes_received: raw.bytes_received,
        packets: raw.packets,
        unix_ms: clock.unix_ms(raw.ts_ns),
    })
}

/// A DNS record's header fields and its (bounded) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    pub netns_ino: u64,
    pub unix_ms: i64,
    pub payload: Vec<u8>,
}

pub fn dns_record(bytes: &[u8], clock: &BootClock) -> Result<DnsRecord, DecodeError> {
    // The payload array is fixed-size: copy the header, then only `payload_len` bytes.
    let raw: DnsEventRaw = read_record(bytes)?;
    let len = usize::from(raw.payload_len);
    if len > DNS_PAYLOAD_MAX {
        return Err(DecodeError::PayloadTooLong { len, max: DNS_PAYLOAD_MAX });
    }
    Ok(DnsRecord { netns_ino: raw.netns_ino, unix_ms: clock.unix_ms(raw.ts_ns), payload: raw.payload[..len].to_vec() })
}

/// An HTTP record's header fields and the copied segment start (not yet parsed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRecord {
    pub netns_ino: u64,
    pub cgroup_id: u64,
    /// The server's side (the packet's destination).
    pub local: SocketAddr,
    /// The client's side (the packet's source).
    pub remote: SocketAddr,
    pub unix_ms: i64,
    payload_len: usize,
    payload: [u8; HTTP_PAYLOAD_MAX],
}

impl HttpRecord {
    /// The copied bytes, at most `HTTP_PAYLOAD_MAX`.
    pub fn payload(&self) -> &[u8] {
        &self.payload[..self.payload_len]
    }
}

pub fn http_record(bytes: &[u8], clock: &BootClock) -> Result<HttpRecord, DecodeError> {
    let raw: HttpEventRaw = read_record(bytes)?;
    let len = usize::from(raw.payload_len);
    if len > HTTP_PAYLOAD_MAX {
        return Err(DecodeError::PayloadTooLong { len, max: HTTP_PAYLOAD_MAX });
    }
    Ok(HttpRecord {
        netns_ino: raw.netns_ino,
        cgroup_id: raw.cgroup_id,
        local: SocketAddr::new(addr(raw.family, &raw.daddr)?, raw.dport),
        remote: SocketAddr::new(addr(raw.family, &raw.saddr)?, raw.sport),
        unix_ms: clock.unix_ms(raw.ts_ns),
        payload_len: len,
        payload: raw.payload,
    })
}

/// A UDP aggregate's counters since the last report, as a Traffic event.
pub fn udp_traffic(
    key: &UdpFlowKey,
    value: &UdpFlowValue,
    delta: (u64, u64, u64),
    clock: &BootClock,
) -> Result<SockEvent, DecodeError> {
    let (bytes_sent, bytes_received, packets) = delta;
    Ok(SockEvent {
        kind: SockEventKind::Traffic,
        protocol: Protocol::Udp,
        local: SocketAddr::new(addr(key.family, &key.laddr)?, key.lport),
        remote: SocketAddr::new(addr(key.family, &key.raddr)?, key.rport),
        netns_ino: key.netns_ino,
        cgroup_id: value.cgroup_id,
        pid: value.pid,
        comm: comm(&value.comm),
        sock: value.sock,
        bytes_sent,
        bytes_received,
        packets,
        unix_ms: clock.unix_ms(value.last_ns),
    })
}

/// IPv4 in the first four bytes for AF_INET; IPv4-mapped IPv6 (dual-stack
/// sockets talking IPv4) is folded to IPv4 so one peer has one address.
fn addr(family: u16, bytes: &[u8; 16]) -> Result<IpAddr, DecodeError> {
    match family {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes)).to_canonical()),
        family => Err(DecodeError::UnknownFamily { family }),
    }
}

fn comm(bytes: &[u8; COMM_LEN]) -> Comm {
    Comm::from_kernel(bytes)
}

#[cfg(test)]
mod tests {
    use bulkhead_abi::collector::IPPROTO_TCP;

    use super::*;

    fn as_bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over repr(C) plain data without padding.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_a_tcp_connect() {
        let mut raw = SockEventRaw::ZERO;
        raw.kind = KIND_CONNECT;
        raw.protocol = IPPROTO_TCP as u8;
        raw.family = AF_INET;
        raw.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        raw.sport = 40000;
        raw.dport = 80;
        raw.pid = 77;
        raw.comm[..4].copy_from_slice(b"curl");
        raw.ts_ns = 2_500_000;
        raw.netns_ino = 4026531840;
        let ev = sock_event(&as_bytes(&raw), &BootClock::with_offset_ms(1_000)).expect("decode");
        assert_eq!(ev.kind, SockEventKind::Connect);
        assert_eq!(ev.protocol, Protocol::Tcp);
        assert_eq!(ev.local, "10.0.0.1:40000".parse().expect("addr"));
        assert_eq!(ev.remote, "10.0.0.2:80".parse().expect("addr"));
        assert_eq!((ev.pid, ev.comm.as_str(), ev.netns_ino), (77, "curl", 4026531840));
        assert_eq!(ev.unix_ms, 1_002);
    }

    #[test]
    fn v4_mapped_v6_folds_to_v4() {
        let mut raw = SockEventRaw::ZERO;
        raw.kind = KIND_ACCEPT;
        raw.protocol = IPPROTO_TCP as u8;
        raw.family = AF_INET6;
        raw.saddr = Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped().octets();
        raw.daddr = "fd00::2".parse::<Ipv6Addr>().expect("v6").octets();
        let ev = sock_event(&as_bytes(&raw), &BootClock::with_offset_ms(0)).expect("decode");
        assert_eq!(ev.local.ip(), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(ev.remote.ip(), "fd00::2".parse::<IpAddr>().expect("v6"));
    }

    #[test]
    fn rejects_bad_records() {
        let mut raw = SockEventRaw::ZERO;
        assert!(matches!(
            sock_event(&as_bytes(&raw)[..10], &BootClock::with_offset_ms(0)),
            Err(DecodeError::ShortRecord { .. })
        ));
        raw.kind = 99;
        assert_eq!(
            sock_event(&as_bytes(&raw), &BootClock::with_offset_ms(0)),
            Err(DecodeError::UnknownKind { kind: 99 })
        );
        raw.kind = KIND_CLOSE;
        raw.protocol = 1;
        assert!(matches!(
            sock_event(&as_bytes(&raw), &BootClock::with_offset_ms(0)),
            Err(DecodeError::UnknownProtocol { .. })
        ));
        raw.protocol = IPPROTO_TCP as u8;
        raw.family = 1;
        assert!(matches!(
            sock_event(&as_bytes(&raw), &BootClock::with_offset_ms(0)),
            Err(DecodeError::UnknownFamily { .. })
        ));
    }

    #[test]
    fn dns_record_respects_payload_len() {
        let mut raw = DnsEventRaw {
            ts_ns: 0,
            netns_ino: 5,
            cgroup_id: 0,
            sock: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            family: AF_INET,
            dport: 5353,
            payload_len: 3,
            _pad: [0; 2],
            payload: [0xaa; DNS_PAYLOAD_MAX],
        };
        let rec = dns_record(&as_bytes(&raw), &BootClock::with_offset_ms(0)).expect("decode");
        assert_eq!(rec.payload, vec![0xaa; 3]);
        raw.payload_len = 600;
        assert!(matches!(
            dns_record(&as_bytes(&raw), &BootClock::with_offset_ms(0)),
            Err(DecodeError::PayloadTooLong { .. })
        ));
    }

    #[test]
    fn http_record_names_the_server_side_local() {
        let mut raw = HttpEventRaw {
            ts_ns: 3_000_000,
            netns_ino: 9,
            cgroup_id: 42,
            sock: 1,
            saddr: [0; 16],
            daddr: [0; 16],
            family: AF_INET,
            sport: 40001,
            dport: 80,
            payload_len: 5,
            payload: [b'x'; HTTP_PAYLOAD_MAX],
        };
        raw.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        raw.payload[..5].copy_from_slice(b"GET /");
        let rec = http_record(&as_bytes(&raw), &BootClock::with_offset_ms(0)).expect("decode");
        assert_eq!(rec.local, "10.0.0.2:80".parse().expect("addr"));
        assert_eq!(rec.remote, "10.0.0.1:40001".parse().expect("addr"));
        assert_eq!((rec.netns_ino, rec.cgroup_id, rec.unix_ms, rec.payload()), (9, 42, 3, &b"GET /"[..]));
        raw.payload_len = HTTP_PAYLOAD_MAX as u16 + 1;
        assert!(matches!(
            http_record(&as_bytes(&raw), &BootClock::with_offset_ms(0)),
            Err(DecodeError::PayloadTooLong { .. })
        ));
        assert!(matches!(
            http_record(&as_bytes(&raw)[..40], &BootClock::with_offset_ms(0)),
            Err(DecodeError::ShortRecord { .. })
        ));
    }

    #[test]
    fn clock_converts_boot_ns() {
        let c = BootClock::with_offset_ms(1_700_000_000_000);
        assert_eq!(c.unix_ms(1_999_999), 1_700_000_000_001);
        let live = BootClock::sample();
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after epoch").as_millis() as i64;
        assert!((live.unix_ms(BootClock::boot_now_ns()) - now_ms).abs() < 1_000);
    }
}
