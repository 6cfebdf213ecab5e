//! External peers of managed workloads, aggregated from recorded flows: synthesis turns
//! them into CIDR and FQDN rules, replay checks them against a policy set.
//!
//! The service graph stops at the reserved `world` identity (every outside address is
//! one peer there), so the addresses come from the flows table, within its retention
//! window. A flow is external when exactly one end is `world`: egress when the local
//! workload initiated (`dst_identity` = world, the address is `dst_addr`), ingress when
//! the outside did (`src_identity` = world, the address is `src_addr`).

use std::net::IpAddr;

use bulkhead_model::{Direction, Identity, Protocol};
use serde::Serialize;

use super::StoreError;
use super::decode::{self, counter, port};
use super::prepare::{addr_from_db, protocol_from_db};

/// Traffic between one local identity and one outside address on one port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ExternalPeerRow {
    pub local: Identity,
    pub direction: Direction,
    pub addr: IpAddr,
    /// The destination port: the outside service's (egress) or the local one (ingress).
    pub dst_port: u16,
    pub protocol: Protocol,
    pub connections: u64,
    /// Both directions of the connections' payload.
    pub bytes: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// One group as the database returns it. Counters are summed as their high and low 32
/// bits separately: a stored counter may be saturated at i64::MAX, and a plain SUM of two
/// of those overflows (an error on both backends) — split, each sum has room for 2^31
/// rows, and the halves are recombined here, saturating.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawExternalPeer {
    pub direction: i64,
    pub local_identity: i64,
    pub addr: Vec<u8>,
    pub dst_port: i32,
    pub protocol: i32,
    pub connections_hi: i64,
    pub connections_lo: i64,
    pub sent_hi: i64,
    pub sent_lo: i64,
    pub received_hi: i64,
    pub received_lo: i64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// `hi * 2^32 + lo`, saturated at i64::MAX like every stored counter.
fn recombine(column: &'static str, hi: i64, lo: i64) -> Result<u64, StoreError> {
    let (hi, lo) = (counter(T, column, hi)?, counter(T, column, lo)?);
    let v = (u128::from(hi) << 32) + u128::from(lo);
    Ok(u64::try_from(v.min(i64::MAX as u128)).unwrap_or(i64::MAX as u64))
}

const T: &str = "flows";

impl TryFrom<RawExternalPeer> for ExternalPeerRow {
    type Error = StoreError;
    fn try_from(r: RawExternalPeer) -> Result<Self, StoreError> {
        let sent = recombine("bytes_sent", r.sent_hi, r.sent_lo)?;
        let received = recombine("bytes_received", r.received_hi, r.received_lo)?;
        Ok(ExternalPeerRow {
            local: decode::identity(T, "local identity", r.local_identity)?,
            direction: match r.direction {
                1 => Direction::Egress,
                2 => Direction::Ingress,
                other => {
                    return Err(StoreError::InvalidStoredValue {
                        table: T,
                        column: "direction",
                        value: other.to_string(),
                    });
                }
            },
            addr: addr_from_db(T, "peer address", &r.addr)?,
            dst_port: port(T, "dst_port", r.dst_port)?,
            protocol: protocol_from_db(T, r.protocol)?,
            connections: recombine("connections", r.connections_hi, r.connections_lo)?,
            bytes: sent.saturating_add(received).min(i64::MAX as u64),
            first_seen_unix_ms: r.first_seen_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
        })
    }
}

/// The aggregate over flows `f` (`$1` = the world identity), both backends; each backend
/// supplies its FROM and WHERE (`$2` since, `$3` until).
macro_rules! external_select {
    () => {
        "SELECT CAST(CASE WHEN f.dst_identity = $1 THEN 1 ELSE 2 END AS BIGINT) AS direction, \
         CASE WHEN f.dst_identity = $1 THEN f.src_identity ELSE f.dst_identity END AS local_identity, \
         CASE WHEN f.dst_identity = $1 THEN f.dst_addr ELSE f.src_addr END AS addr, \
         f.dst_port, f.protocol, \
         CAST(sum(f.connections >> 32) AS BIGINT) AS connections_hi, \
         CAST(sum(f.connections & 4294967295) AS BIGINT) AS connections_lo, \
         CAST(sum(f.bytes_sent >> 32) AS BIGINT) AS sent_hi, \
         CAST(sum(f.bytes_sent & 4294967295) AS BIGINT) AS sent_lo, \
         CAST(sum(f.bytes_received >> 32) AS BIGINT) AS received_hi, \
         CAST(sum(f.bytes_received & 4294967295) AS BIGINT) AS received_lo, \
         min(f.first_seen_unix_ms) AS first_seen_unix_ms, max(f.last_seen_unix_ms) AS last_seen_unix_ms "
    };
}

/// Exactly one end is world, and the flow overlaps `[since, until]`.
macro_rules! external_filter {
    () => {
        "(f.src_identity = $1 OR f.dst_identity = $1) AND f.src_identity <> f.dst_identity \
         AND f.last_seen_unix_ms >= $2 AND f.first_seen_unix_ms <= $3 \
         GROUP BY 1, 2, 3, 4, 5"
    };
}

/// PostgreSQL: the two per-identity flow indexes find world's flows (a bitmap OR).
pub(crate) const SELECT_POSTGRES: &str = concat!(external_select!(), "FROM flows f WHERE ", external_filter!());

/// SQLite has no per-flow identity index (see migration 0001): walk the batches whose
/// `flow_blocks` row mentions world (`$4` = `,2,`) and saw something since `since`, and
/// range-scan their flows by rowid. CROSS JOIN pins that loop order.
pub(crate) const SELECT_SQLITE: &str = concat!(
    external_select!(),
    "FROM flow_blocks b CROSS JOIN flows f \
     WHERE instr(b.identities, $4) > 0 AND b.max_last_seen_unix_ms >= $2 \
     AND f.id BETWEEN b.first_flow_id AND b.last_flow_id AND ",
    external_filter!()
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recombine_saturates() {
        assert_eq!(recombine("c", 0, 7).expect("small"), 7);
        assert_eq!(recombine("c", 1, 1).expect("carry"), (1 << 32) + 1);
        assert_eq!(recombine("c", i64::MAX, i64::MAX).expect("huge"), i64::MAX as u64);
    }
}
