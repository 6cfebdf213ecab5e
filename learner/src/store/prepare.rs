//! Backend-independent preparation of a batch: values converted to what the schema
//! stores, flows folded into edges, snapshots and DNS answers deduplicated. Everything
//! here is pure so both backends write exactly the same rows.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use bulkhead_model::{Direction, EdgeKey, Protocol, Verdict};

use super::{IngestBatch, StoreError};

/// u64 counters are stored saturated: a counter beyond i64::MAX is already meaningless
/// and must not make a batch unstorable (the agent would retry it forever).
pub(crate) fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// u64 kernel ids (netns inode, cgroup id) are stored bit-for-bit so they round-trip.
pub(crate) fn bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

/// Inverse of [`bits`].
pub(crate) fn unbits(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// Free text bound for a TEXT column. PostgreSQL cannot store NUL in text, and these
/// strings come from workloads (a process name, a DNS answer from any server): one NUL
/// must not make a batch unstorable, or its agent would resend it forever. Replaced
/// identically on both backends so they store the same rows.
pub(crate) fn text(s: &str) -> String {
    if s.contains('\0') { s.replace('\0', "\u{FFFD}") } else { s.to_owned() }
}

/// A flow address as stored: its octets in network order, 4 (IPv4) or 16 (IPv6) of
/// them. An IPv4-mapped IPv6 address stays 16 bytes, so every address round-trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AddrBytes {
    len: u8,
    octets: [u8; 16],
}

impl AddrBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.octets[..usize::from(self.len)]
    }
}

impl From<IpAddr> for AddrBytes {
    fn from(a: IpAddr) -> Self {
        let mut octets = [0; 16];
        match a {
            IpAddr::V4(v4) => {
                octets[..4].copy_from_slice(&v4.octets());
                AddrBytes { len: 4, octets }
            }
            IpAddr::V6(v6) => AddrBytes { len: 16, octets: v6.octets() },
        }
    }
}

/// Inverse of [`AddrBytes`]'s encoding.
pub(crate) fn addr_from_db(table: &'static str, column: &'static str, b: &[u8]) -> Result<IpAddr, StoreError> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(b) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(StoreError::InvalidStoredValue { table, column, value: format!("{} address bytes", b.len()) })
    }
}

/// Per-edge totals of one batch, split by the side that observed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EdgeAgg {
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub connections_egress: u64,
    pub bytes_egress: u64,
    pub connections_ingress: u64,
    pub bytes_ingress: u64,
}

impl EdgeAgg {
    /// Stored form of the counters, saturated.
    pub fn counters(&self) -> [i64; 4] {
        [sat(self.connections_egress), sat(self.bytes_egress), sat(self.connections_ingress), sat(self.bytes_ingress)]
    }
}

/// The flows of a batch as columns (struct of arrays): SQLite binds them row by row,
/// PostgreSQL binds each column as one array for `UNNEST`.
#[derive(Debug, Default)]
pub(crate) struct FlowColumns {
    pub src_identity: Vec<i64>,
    pub dst_identity: Vec<i64>,
    pub src_addr: Vec<AddrBytes>,
    pub src_port: Vec<i32>,
    pub dst_addr: Vec<AddrBytes>,
    pub dst_port: Vec<i32>,
    pub protocol: Vec<i32>,
    pub direction: Vec<i16>,
    pub netns_ino: Vec<i64>,
    pub cgroup_id: Vec<i64>,
    pub pid: Vec<i64>,
    /// Shared per distinct name: binding an `Arc<str>` copies no text.
    pub comm: Vec<Arc<str>>,
    pub connections: Vec<i64>,
    pub bytes_sent: Vec<i64>,
    pub bytes_received: Vec<i64>,
    pub packets: Vec<i64>,
    pub verdict: Vec<i16>,
    pub first_seen_unix_ms: Vec<i64>,
    pub last_seen_unix_ms: Vec<i64>,
}

impl FlowColumns {
    pub fn len(&self) -> usize {
        self.src_identity.len()
    }
}

/// The L7 observations of one edge in a batch: what its ingress flows carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EdgeHttpAgg {
    /// (method, path) → (requests, first seen, last seen).
    pub requests: BTreeMap<(String, String), (u64, i64, i64)>,
    pub opaque_connections: u64,
    pub opaque_last_seen_unix_ms: Option<i64>,
    pub overflow_requests: u64,
    pub overflow_last_seen_unix_ms: Option<i64>,
}

/// One endpoint row, JSON columns already encoded.
#[derive(Debug)]
pub(crate) struct EndpointValues {
    pub netns_ino: i64,
    pub netns_name: Option<String>,
    pub host: bool,
    pub identity: i64,
    pub workload: Option<String>,
    pub addresses: String,
    pub cgroups: String,
}

/// One distinct DNS answer of the batch.
#[derive(Debug)]
pub(crate) struct DnsValues {
    pub netns_ino: i64,
    pub name: String,
    pub addr: String,
    pub ttl_seconds: i64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// A batch ready to be written.
#[derive(Debug)]
pub(crate) struct PreparedBatch<'a> {
    pub node_id: &'a str,
    pub boot_id: &'a str,
    pub seq: i64,
    pub received_unix_ms: i64,
    pub flows: FlowColumns,
    /// Sorted by key: every transaction upserts edges in the same order, so two
    /// concurrent PostgreSQL ingests touching the same edges cannot deadlock.
    pub edges: Vec<(EdgeKey, EdgeAgg)>,
    /// Edges whose ingress flows carried L7 observations, sorted by key (the same
    /// lock order as `edges`).
    pub http: Vec<(EdgeKey, EdgeHttpAgg)>,
    pub endpoints: Option<Vec<EndpointValues>>,
    pub dns: Vec<DnsValues>,
    /// ringbuf, queue, spool batches, spool flows, rejected.
    pub loss: [i64; 5],
}

impl<'a> PreparedBatch<'a> {
    pub fn new(batch: &'a IngestBatch) -> Result<Self, StoreError> {
        let seq = i64::try_from(batch.seq).map_err(|_| StoreError::OutOfRange { field: "seq", value: batch.seq })?;
        let n = batch.flows.len();
        let mut flows = FlowColumns {
            src_identity: Vec::with_capacity(n),
            dst_identity: Vec::with_capacity(n),
            src_addr: Vec::with_capacity(n),
            src_port: Vec::with_capacity(n),
            dst_addr: Vec::with_capacity(n),
            dst_port: Vec::with_capacity(n),
            protocol: Vec::with_capacity(n),
            direction: Vec::with_capacity(n),
            netns_ino: Vec::with_capacity(n),
            cgroup_id: Vec::with_capacity(n),
            pid: Vec::with_capacity(n),
            comm: Vec::with_capacity(n),
            connections: Vec::with_capacity(n),
            bytes_sent: Vec::with_capacity(n),
            bytes_received: Vec::with_capacity(n),
            packets: Vec::with_capacity(n),
            verdict: Vec::with_capacity(n),
            first_seen_unix_ms: Vec::with_capacity(n),
            last_seen_unix_ms: Vec::with_capacity(n),
        };
        let mut edges: BTreeMap<EdgeKey, EdgeAgg> = BTreeMap::new();
        let mut http: BTreeMap<EdgeKey, EdgeHttpAgg> = BTreeMap::new();
        let mut comms: HashMap<&str, Arc<str>> = HashMap::new();
        for rf in &batch.flows {
            let f = &rf.flow;
            flows.src_identity.push(i64::from(rf.src_identity.0));
            flows.dst_identity.push(i64::from(rf.dst_identity.0));
            flows.src_addr.push(AddrBytes::from(f.src_addr));
            flows.src_port.push(i32::from(f.src_port));
            flows.dst_addr.push(AddrBytes::from(f.dst_addr));
            flows.dst_port.push(i32::from(f.dst_port));
            flows.protocol.push(i32::from(f.protocol.number()));
            flows.direction.push(direction_code(f.direction));
            flows.netns_ino.push(bits(f.netns_ino));
            flows.cgroup_id.push(bits(f.cgroup_id));
            flows.pid.push(i64::from(f.pid));
            flows.comm.push(match comms.get(f.comm.as_str()) {
                Some(c) => c.clone(),
                None => {
                    let c: Arc<str> = Arc::from(text(&f.comm));
                    comms.insert(f.comm.as_str(), c.clone());
                    c
                }
            });
            flows.connections.push(sat(f.connections));
            flows.bytes_sent.push(sat(f.bytes_sent));
            flows.bytes_received.push(sat(f.bytes_received));
            flows.packets.push(sat(f.packets));
            flows.verdict.push(verdict_code(f.verdict));
            flows.first_seen_unix_ms.push(f.first_seen_unix_ms);
            flows.last_seen_unix_ms.push(f.last_seen_unix_ms);

            let key =
                EdgeKey { src: rf.src_identity, dst: rf.dst_identity, dst_port: f.dst_port, protocol: f.protocol };
            if !f.http.is_empty() {
                let h = http.entry(key).or_default();
                for r in &f.http.requests {
                    let e = h.requests.entry((r.method.clone(), r.path.clone())).or_insert((
                        0,
                        f.first_seen_unix_ms,
                        f.last_seen_unix_ms,
                    ));
                    e.0 = e.0.saturating_add(r.requests);
                    e.1 = e.1.min(f.first_seen_unix_ms);
                    e.2 = e.2.max(f.last_seen_unix_ms);
                }
                if f.http.opaque_connections > 0 {
                    h.opaque_connections = h.opaque_connections.saturating_add(f.http.opaque_connections);
                    h.opaque_last_seen_unix_ms = h.opaque_last_seen_unix_ms.max(Some(f.last_seen_unix_ms));
                }
                if f.http.overflow_requests > 0 {
                    h.overflow_requests = h.overflow_requests.saturating_add(f.http.overflow_requests);
                    h.overflow_last_seen_unix_ms = h.overflow_last_seen_unix_ms.max(Some(f.last_seen_unix_ms));
                }
            }
            // Both ends of a connection count the same bytes (sent + received), so the
            // two sides' byte totals are comparable and max() is meaningful.
            let bytes = f.bytes_sent.saturating_add(f.bytes_received);
            let (ce, be, ci, bi) = match f.direction {
                Direction::Egress => (f.connections, bytes, 0, 0),
                Direction::Ingress => (0, 0, f.connections, bytes),
            };
            match edges.entry(key) {
                Entry::Vacant(v) => {
                    v.insert(EdgeAgg {
                        first_seen_unix_ms: f.first_seen_unix_ms,
                        last_seen_unix_ms: f.last_seen_unix_ms,
                        connections_egress: ce,
                        bytes_egress: be,
                        connections_ingress: ci,
                        bytes_ingress: bi,
                    });
                }
                Entry::Occupied(mut o) => {
                    let a = o.get_mut();
                    a.first_seen_unix_ms = a.first_seen_unix_ms.min(f.first_seen_unix_ms);
                    a.last_seen_unix_ms = a.last_seen_unix_ms.max(f.last_seen_unix_ms);
                    a.connections_egress = a.connections_egress.saturating_add(ce);
                    a.bytes_egress = a.bytes_egress.saturating_add(be);
                    a.connections_ingress = a.connections_ingress.saturating_add(ci);
                    a.bytes_ingress = a.bytes_ingress.saturating_add(bi);
                }
            }
        }

        let endpoints =
            match &batch.endpoints {
                None => None,
                Some(eps) => {
                    // One row per netns: a snapshot naming a namespace twice is a collector
                    // bug, and refusing the batch would make the agent resend it forever,
                    // so the last entry wins.
                    let mut by_netns: BTreeMap<u64, EndpointValues> = BTreeMap::new();
                    for ep in eps {
                        let f = &ep.fact;
                        let addresses = serde_json::to_string(&f.addresses).map_err(|source| {
                            StoreError::CorruptJson { table: "endpoints", column: "addresses", source }
                        })?;
                        let cgroups = serde_json::to_string(&f.cgroups).map_err(|source| StoreError::CorruptJson {
                            table: "endpoints",
                            column: "cgroups",
                            source,
                        })?;
                        by_netns.insert(
                            f.netns_ino,
                            EndpointValues {
                                netns_ino: bits(f.netns_ino),
                                netns_name: f.netns_name.as_deref().map(text),
                                host: f.host,
                                identity: i64::from(ep.identity.0),
                                workload: ep.workload.as_deref().map(text),
                                addresses,
                                cgroups,
                            },
                        );
                    }
                    Some(by_netns.into_values().collect())
                }
            };

        // One row per (netns, name, addr): an upsert may not touch a row twice in one
        // PostgreSQL statement. Keep the latest answer's TTL.
        let mut dns: BTreeMap<(u64, String, std::net::IpAddr), DnsValues> = BTreeMap::new();
        for a in &batch.dns_answers {
            let name = text(&a.name);
            match dns.entry((a.netns_ino, name.clone(), a.addr)) {
                Entry::Vacant(v) => {
                    v.insert(DnsValues {
                        netns_ino: bits(a.netns_ino),
                        name,
                        addr: a.addr.to_string(),
                        ttl_seconds: i64::from(a.ttl_seconds),
                        first_seen_unix_ms: a.seen_unix_ms,
                        last_seen_unix_ms: a.seen_unix_ms,
                    });
                }
                Entry::Occupied(mut o) => {
                    let d = o.get_mut();
                    if a.seen_unix_ms >= d.last_seen_unix_ms {
                        d.ttl_seconds = i64::from(a.ttl_seconds);
                        d.last_seen_unix_ms = a.seen_unix_ms;
                    }
                    d.first_seen_unix_ms = d.first_seen_unix_ms.min(a.seen_unix_ms);
                }
            }
        }

        let l = &batch.loss;
        Ok(PreparedBatch {
            node_id: &batch.node_id,
            boot_id: &batch.boot_id,
            seq,
            received_unix_ms: batch.received_unix_ms,
            flows,
            edges: edges.into_iter().collect(),
            http: http.into_iter().collect(),
            endpoints,
            dns: dns.into_values().collect(),
            loss: [
                sat(l.ringbuf_dropped),
                sat(l.queue_dropped),
                sat(l.spool_evicted_batches),
                sat(l.spool_evicted_flows),
                sat(l.rejected_batches),
            ],
        })
    }
}

/// Stored code of a flow's direction: the wire's (`bulkhead.v1.Direction`) numbers.
pub(crate) fn direction_code(d: Direction) -> i16 {
    match d {
        Direction::Egress => 1,
        Direction::Ingress => 2,
    }
}

/// Inverse of [`direction_code`].
pub(crate) fn direction_from_db(v: i16) -> Result<Direction, StoreError> {
    match v {
        1 => Ok(Direction::Egress),
        2 => Ok(Direction::Ingress),
        _ => Err(StoreError::InvalidStoredValue { table: "flows", column: "direction", value: v.to_string() }),
    }
}

/// Stored code of a flow's verdict: the wire's (`bulkhead.v1.Verdict`) numbers.
pub(crate) fn verdict_code(v: Verdict) -> i16 {
    match v {
        Verdict::Forwarded => 1,
        Verdict::Audit => 2,
        Verdict::Denied => 3,
    }
}

/// Inverse of [`verdict_code`].
pub(crate) fn verdict_from_db(v: i16) -> Result<Verdict, StoreError> {
    match v {
        1 => Ok(Verdict::Forwarded),
        2 => Ok(Verdict::Audit),
        3 => Ok(Verdict::Denied),
        _ => Err(StoreError::InvalidStoredValue { table: "flows", column: "verdict", value: v.to_string() }),
    }
}

/// The protocol stored in an edge or flow row.
pub(crate) fn protocol_from_db(table: &'static str, v: i32) -> Result<Protocol, StoreError> {
    u8::try_from(v).ok().and_then(Protocol::from_number).ok_or(StoreError::InvalidStoredValue {
        table,
        column: "protocol",
        value: v.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for a in ["10.1.2.3", "0.0.0.0", "255.255.255.255", "::", "fe80::1:2:3:4", "::ffff:10.1.2.3", "::1"] {
            let a: IpAddr = a.parse().expect("address");
            let b = AddrBytes::from(a);
            assert_eq!(b.as_slice().len(), if a.is_ipv4() { 4 } else { 16 });
            assert_eq!(addr_from_db("flows", "src_addr", b.as_slice()).expect("decodes"), a);
        }
        assert!(addr_from_db("flows", "src_addr", &[1, 2, 3]).is_err());
    }

    #[test]
    fn codes_round_trip() {
        for d in [Direction::Egress, Direction::Ingress] {
            assert_eq!(direction_from_db(direction_code(d)).expect("direction"), d);
        }
        for v in [Verdict::Forwarded, Verdict::Audit, Verdict::Denied] {
            assert_eq!(verdict_from_db(verdict_code(v)).expect("verdict"), v);
        }
        assert!(direction_from_db(0).is_err() && verdict_from_db(4).is_err());
    }

    #[test]
    fn kernel_ids_round_trip_bit_for_bit() {
        for v in [0, 1, u64::MAX, 1 << 63, 4026531840] {
            assert_eq!(unbits(bits(v)), v);
        }
        assert_eq!(sat(u64::MAX), i64::MAX);
    }
}
