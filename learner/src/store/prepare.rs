//! Backend-independent preparation of a batch: values converted to what the schema
//! stores, flows folded into edges, snapshots and DNS answers deduplicated. Everything
//! here is pure so both backends write exactly the same rows.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use bulkhead_model::{Direction, EdgeKey, Protocol};

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
    pub src_addr: Vec<String>,
    pub src_port: Vec<i32>,
    pub dst_addr: Vec<String>,
    pub dst_port: Vec<i32>,
    pub protocol: Vec<i32>,
    pub direction: Vec<&'static str>,
    pub netns_ino: Vec<i64>,
    pub cgroup_id: Vec<i64>,
    pub pid: Vec<i64>,
    pub comm: Vec<String>,
    pub connections: Vec<i64>,
    pub bytes_sent: Vec<i64>,
    pub bytes_received: Vec<i64>,
    pub packets: Vec<i64>,
    pub verdict: Vec<&'static str>,
    pub first_seen_unix_ms: Vec<i64>,
    pub last_seen_unix_ms: Vec<i64>,
}

impl FlowColumns {
    pub fn len(&self) -> usize {
        self.src_identity.len()
    }
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
        for rf in &batch.flows {
            let f = &rf.flow;
            flows.src_identity.push(i64::from(rf.src_identity.0));
            flows.dst_identity.push(i64::from(rf.dst_identity.0));
            flows.src_addr.push(f.src_addr.to_string());
            flows.src_port.push(i32::from(f.src_port));
            flows.dst_addr.push(f.dst_addr.to_string());
            flows.dst_port.push(i32::from(f.dst_port));
            flows.protocol.push(i32::from(f.protocol.number()));
            flows.direction.push(f.direction.as_str());
            flows.netns_ino.push(bits(f.netns_ino));
            flows.cgroup_id.push(bits(f.cgroup_id));
            flows.pid.push(i64::from(f.pid));
            flows.comm.push(text(&f.comm));
            flows.connections.push(sat(f.connections));
            flows.bytes_sent.push(sat(f.bytes_sent));
            flows.bytes_received.push(sat(f.bytes_received));
            flows.packets.push(sat(f.packets));
            flows.verdict.push(f.verdict.as_str());
            flows.first_seen_unix_ms.push(f.first_seen_unix_ms);
            flows.last_seen_unix_ms.push(f.last_seen_unix_ms);

            let key =
                EdgeKey { src: rf.src_identity, dst: rf.dst_identity, dst_port: f.dst_port, protocol: f.protocol };
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

/// Splits `n` rows into chunks of at most `max` rows whose sizes come from a small
/// fixed set (`max`, then powers of two), so the multi-row INSERT statements built for
/// them repeat and stay in the driver's prepared-statement cache.
pub(crate) fn chunk_sizes(mut n: usize, max: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let max = max.max(1);
    while n >= max {
        out.push(max);
        n -= max;
    }
    while n > 0 {
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        out.push(p);
        n -= p;
    }
    out
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
    fn chunks_cover_everything_with_few_distinct_sizes() {
        for n in 0..3000 {
            let c = chunk_sizes(n, 512);
            assert_eq!(c.iter().sum::<usize>(), n);
            assert!(c.iter().all(|s| *s <= 512 && (*s == 512 || s.is_power_of_two())));
        }
        assert_eq!(chunk_sizes(1000, 512), vec![512, 256, 128, 64, 32, 8]);
        assert!(chunk_sizes(0, 512).is_empty());
    }

    #[test]
    fn kernel_ids_round_trip_bit_for_bit() {
        for v in [0, 1, u64::MAX, 1 << 63, 4026531840] {
            assert_eq!(unbits(bits(v)), v);
        }
        assert_eq!(sat(u64::MAX), i64::MAX);
    }
}
