//! What enforcers report back (DESIGN.md §4–5, issue 4): which policy version each node
//! applied, the verdict events they send (rate-limited audit / deny events), and how
//! often each rule decided a connection, so unused rules can be found.
//!
//! Types, pure preparation and the statements both backends share; the batch inserts
//! differ per backend (`sqlite_policy`: multi-row VALUES in chunks, `postgres_policy`:
//! one UNNEST statement) and the rest runs through `policy_sql`.
//!
//! Conventions, as for flows: times are Unix ms; direction and verdict are stored as the
//! bulkhead.v1 wire numbers; versions and proposal ids are stored exactly (a version
//! above `i64::MAX` is refused, never saturated, because a wrong version is worse than
//! none); hit counters saturate at `i64::MAX`. Verdict-event addresses are text
//! (`IpAddr` Display): events are rate-limited, so the compact form flows use buys
//! nothing here, and text is what an analyst greps for in a SQL shell. The request line
//! of an HTTP verdict is three nullable columns (method, path, truncated: all NULL for
//! an L4 verdict), not JSON, for the same reason.

use std::collections::BTreeMap;
use std::net::IpAddr;

use bulkhead_model::{Direction, EnforcerLoss, HttpRequestLine, Identity, Protocol, Verdict};
use serde::Serialize;

use super::StoreError;
use super::audit::require;
use super::decode;
use super::prepare::{direction_code, direction_from_db, protocol_from_db, sat, text, verdict_code, verdict_from_db};

/// Largest page [`Store::verdict_events`](super::Store::verdict_events) returns.
pub const MAX_VERDICT_PAGE: u32 = 10_000;

/// Longest stored error text of a rejected ack, in characters. The text comes from the
/// enforcer (and may quote the snapshot it refused); the UI needs its gist, not megabytes.
pub const MAX_ERROR_CHARS: usize = 4_096;

// === enforcer status ===

/// How an enforcer answered a policy version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum AckOutcome {
    /// The version is installed (atomically: the node now enforces exactly it).
    Applied,
    /// The version was refused; the node keeps enforcing its previous one.
    Rejected { error: String },
}

/// One node's enforcer as the learner knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnforcerRow {
    pub node_id: String,
    /// Boot and version of the last Hello; `None` if the node never said hello.
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    /// The version the learner wants on the node, and since when.
    pub desired_version: Option<u64>,
    pub desired_unix_ms: Option<i64>,
    /// The version the node last said it enforces (Hello or Applied ack); `None` when it
    /// has none (never applied, or reported a fresh start without pinned maps).
    pub applied_version: Option<u64>,
    /// When `applied_version` became what it is.
    pub applied_unix_ms: Option<i64>,
    /// The newest refusal not yet overtaken by an applied version: which version and why.
    /// Kept apart from the error text so the UI can say "v7 rejected, still on v6".
    pub rejected_version: Option<u64>,
    pub last_error: Option<String>,
    /// Last Hello or ack; `None` if the learner only set a desired version so far.
    pub last_seen_unix_ms: Option<i64>,
    /// The node's loss counters as of its last verdict report (cumulative).
    pub loss: EnforcerLoss,
    /// Last verdict report; `None` before the first.
    pub last_report_unix_ms: Option<i64>,
    /// The node's clock skew as last measured (`learner − node`, ms); `None` = not yet.
    pub clock_skew_ms: Option<i64>,
}

impl EnforcerRow {
    /// True when the node enforces what the learner wants.
    pub fn in_sync(&self) -> bool {
        self.desired_version.is_some() && self.desired_version == self.applied_version
    }
}

/// A version as stored: exactly, or [`StoreError::OutOfRange`].
pub(crate) fn version(field: &'static str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::OutOfRange { field, value: v })
}

/// A node id as stored: non-blank (a row nobody can attribute is worthless), NUL-free.
pub(crate) fn node(node_id: &str) -> Result<String, StoreError> {
    require("node_id", node_id)?;
    Ok(text(node_id))
}

/// An enforcer's error text as stored: NUL-free, at most [`MAX_ERROR_CHARS`] characters.
pub(crate) fn error_text(error: &str) -> String {
    match error.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => text(&error[..cut]),
        None => text(error),
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawEnforcer {
    pub node_id: String,
    pub boot_id: Option<String>,
    pub agent_version: Option<String>,
    pub desired_version: Option<i64>,
    pub desired_unix_ms: Option<i64>,
    pub applied_version: Option<i64>,
    pub applied_unix_ms: Option<i64>,
    pub rejected_version: Option<i64>,
    pub last_error: Option<String>,
    pub last_seen_unix_ms: Option<i64>,
    pub ringbuf_dropped: i64,
    pub queue_dropped: i64,
    pub conntrack_full: i64,
    pub last_report_unix_ms: Option<i64>,
    pub clock_skew_ms: Option<i64>,
}

impl TryFrom<RawEnforcer> for EnforcerRow {
    type Error = StoreError;
    fn try_from(r: RawEnforcer) -> Result<Self, StoreError> {
        let v = |column, v: Option<i64>| v.map(|v| decode::counter("enforcers", column, v)).transpose();
        Ok(EnforcerRow {
            node_id: r.node_id,
            boot_id: r.boot_id,
            agent_version: r.agent_version,
            desired_version: v("desired_version", r.desired_version)?,
            desired_unix_ms: r.desired_unix_ms,
            applied_version: v("applied_version", r.applied_version)?,
            applied_unix_ms: r.applied_unix_ms,
            rejected_version: v("rejected_version", r.rejected_version)?,
            last_error: r.last_error,
            last_seen_unix_ms: r.last_seen_unix_ms,
            loss: EnforcerLoss {
                ringbuf_dropped: decode::counter("enforcers", "ringbuf_dropped", r.ringbuf_dropped)?,
                queue_dropped: decode::counter("enforcers", "queue_dropped", r.queue_dropped)?,
                conntrack_full: decode::counter("enforcers", "conntrack_full", r.conntrack_full)?,
            },
            last_report_unix_ms: r.last_report_unix_ms,
            clock_skew_ms: r.clock_skew_ms,
        })
    }
}

// === verdict events ===

/// The rule that decided a connection: rule `rule_index` of `direction` in proposal
/// version `proposal_id` (the version whose approved policy was distributed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RuleRef {
    pub proposal_id: i64,
    pub direction: Direction,
    pub rule_index: u32,
}

/// One verdict an enforcer reported about a connection of `local` (the workload on the
/// node) with `peer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerdictEventRow {
    pub at_unix_ms: i64,
    pub local: Identity,
    pub peer: Identity,
    pub direction: Direction,
    /// `audit` (monitor mode: would have been denied) or `denied`; `forwarded` when an
    /// enforcer forwards allow events too.
    pub verdict: Verdict,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    pub protocol: Protocol,
    /// The policy version the node enforced when it decided.
    pub policy_version: u64,
    /// The deciding rule; `None` = default deny of a covered direction.
    pub rule: Option<RuleRef>,
    /// For an HTTP verdict (the rule is an L7 rule and the request matched none of its
    /// HTTP rules): the request line the enforcer read. `None` for an L4 verdict.
    /// Attacker-chosen text: bounded visible ASCII (see [`HttpRequestLine::validate`]),
    /// to be escaped wherever it is shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRequestLine>,
}

/// A stored verdict event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerdictEventRecord {
    /// Monotonic, never reused; the keyset pagination key.
    pub id: i64,
    pub node_id: String,
    /// When the learner stored it (the event's own time is `event.at_unix_ms`, the
    /// node's clock).
    pub received_unix_ms: i64,
    #[serde(flatten)]
    pub event: VerdictEventRow,
}

/// Verdict-event filter, newest first, paged by id. `Default` = the newest 100 events.
#[derive(Debug, Clone, Serialize)]
pub struct VerdictQuery {
    /// Only events at or after this time (`at_unix_ms >= since`).
    pub since_unix_ms: Option<i64>,
    /// Only events at or before this time.
    pub until_unix_ms: Option<i64>,
    /// Only events of this local workload identity.
    pub identity: Option<Identity>,
    pub verdict: Option<Verdict>,
    /// Only events reported by this node.
    pub node_id: Option<String>,
    /// Page size; capped at [`MAX_VERDICT_PAGE`].
    pub limit: u32,
    /// Keyset pagination: only events with `id < before_id` (the last id of the
    /// previous page). Stable while new events arrive, unlike OFFSET.
    pub before_id: Option<i64>,
}

impl Default for VerdictQuery {
    fn default() -> Self {
        Self {
            since_unix_ms: None,
            until_unix_ms: None,
            identity: None,
            verdict: None,
            node_id: None,
            limit: 100,
            before_id: None,
        }
    }
}

/// Audit and deny events of one local identity in a window: the rollout gate's "audit
/// events in the last N hours".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VerdictCount {
    pub identity: Identity,
    pub audit: u64,
    pub denied: u64,
    /// The newest audit or deny event counted.
    pub last_unix_ms: i64,
}

/// A batch of events as columns (struct of arrays): SQLite binds them row by row,
/// PostgreSQL binds each column as one array for `UNNEST`.
#[derive(Debug, Default)]
pub(crate) struct EventColumns {
    pub at_unix_ms: Vec<i64>,
    pub local_identity: Vec<i64>,
    pub peer_identity: Vec<i64>,
    pub direction: Vec<i16>,
    pub verdict: Vec<i16>,
    pub src_addr: Vec<String>,
    pub dst_addr: Vec<String>,
    pub dst_port: Vec<i32>,
    pub protocol: Vec<i32>,
    pub policy_version: Vec<i64>,
    pub rule_proposal_id: Vec<Option<i64>>,
    pub rule_direction: Vec<Option<i16>>,
    pub rule_index: Vec<Option<i64>>,
    pub http_method: Vec<Option<String>>,
    pub http_path: Vec<Option<String>>,
    pub http_truncated: Vec<Option<bool>>,
}

impl EventColumns {
    /// Converts `events` to stored values; refuses the whole batch (nothing is written)
    /// if a policy version does not fit or a request line is not what an enforcer can
    /// send ([`HttpRequestLine::validate`], which the wire decode already applied: this
    /// guards the table's promise to every reader, whoever calls the store).
    pub fn new(events: &[VerdictEventRow]) -> Result<Self, StoreError> {
        let n = events.len();
        let mut c = EventColumns {
            at_unix_ms: Vec::with_capacity(n),
            local_identity: Vec::with_capacity(n),
            peer_identity: Vec::with_capacity(n),
            direction: Vec::with_capacity(n),
            verdict: Vec::with_capacity(n),
            src_addr: Vec::with_capacity(n),
            dst_addr: Vec::with_capacity(n),
            dst_port: Vec::with_capacity(n),
            protocol: Vec::with_capacity(n),
            policy_version: Vec::with_capacity(n),
            rule_proposal_id: Vec::with_capacity(n),
            rule_direction: Vec::with_capacity(n),
            rule_index: Vec::with_capacity(n),
            http_method: Vec::with_capacity(n),
            http_path: Vec::with_capacity(n),
            http_truncated: Vec::with_capacity(n),
        };
        for e in events {
            c.at_unix_ms.push(e.at_unix_ms);
            c.local_identity.push(i64::from(e.local.0));
            c.peer_identity.push(i64::from(e.peer.0));
            c.direction.push(direction_code(e.direction));
            c.verdict.push(verdict_code(e.verdict));
            c.src_addr.push(e.src_addr.to_string());
            c.dst_addr.push(e.dst_addr.to_string());
            c.dst_port.push(i32::from(e.dst_port));
            c.protocol.push(i32::from(e.protocol.number()));
            c.policy_version.push(version("policy_version", e.policy_version)?);
            c.rule_proposal_id.push(e.rule.map(|r| r.proposal_id));
            c.rule_direction.push(e.rule.map(|r| direction_code(r.direction)));
            c.rule_index.push(e.rule.map(|r| i64::from(r.rule_index)));
            if let Some(h) = &e.http {
                h.validate().map_err(|reason| StoreError::InvalidHttpLine { reason })?;
            }
            c.http_method.push(e.http.as_ref().map(|h| h.method.clone()));
            c.http_path.push(e.http.as_ref().map(|h| h.path.clone()));
            c.http_truncated.push(e.http.as_ref().map(|h| h.truncated));
        }
        Ok(c)
    }

    pub fn len(&self) -> usize {
        self.at_unix_ms.len()
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawVerdictEvent {
    pub id: i64,
    pub node_id: String,
    pub received_unix_ms: i64,
    pub at_unix_ms: i64,
    pub local_identity: i64,
    pub peer_identity: i64,
    pub direction: i16,
    pub verdict: i16,
    pub src_addr: String,
    pub dst_addr: String,
    pub dst_port: i32,
    pub protocol: i32,
    pub policy_version: i64,
    pub rule_proposal_id: Option<i64>,
    pub rule_direction: Option<i16>,
    pub rule_index: Option<i64>,
    pub http_method: Option<String>,
    pub http_path: Option<String>,
    pub http_truncated: Option<bool>,
}

const EVENTS: &str = "verdict_events";

fn invalid(column: &'static str, value: impl ToString) -> StoreError {
    StoreError::InvalidStoredValue { table: EVENTS, column, value: value.to_string() }
}

/// [`direction_from_db`], naming this module's table and column when it fails.
fn stored_direction(table: &'static str, column: &'static str, v: i16) -> Result<Direction, StoreError> {
    direction_from_db(v).map_err(|_| StoreError::InvalidStoredValue { table, column, value: v.to_string() })
}

fn stored_addr(column: &'static str, v: &str) -> Result<IpAddr, StoreError> {
    v.parse().map_err(|_| invalid(column, v))
}

fn rule_ref(proposal_id: i64, direction: i16, rule_index: i64) -> Result<RuleRef, StoreError> {
    Ok(RuleRef {
        proposal_id,
        direction: stored_direction(EVENTS, "rule_direction", direction)?,
        rule_index: u32::try_from(rule_index).map_err(|_| invalid("rule_index", rule_index))?,
    })
}

impl TryFrom<RawVerdictEvent> for VerdictEventRecord {
    type Error = StoreError;
    fn try_from(r: RawVerdictEvent) -> Result<Self, StoreError> {
        let rule = match (r.rule_proposal_id, r.rule_direction, r.rule_index) {
            (None, None, None) => None,
            (Some(p), Some(d), Some(i)) => Some(rule_ref(p, d, i)?),
            // The migration's CHECK makes this impossible; say so if it happens anyway.
            _ => return Err(invalid("rule_proposal_id", "partial rule reference")),
        };
        let http = match (r.http_method, r.http_path, r.http_truncated) {
            (None, None, None) => None,
            (Some(method), Some(path), Some(truncated)) => {
                let line = HttpRequestLine { method, path, truncated };
                // Readers print it as is: hold the stored text to what ingest admits.
                if let Err(reason) = line.validate() {
                    return Err(invalid("http_path", format!("{reason}: {:?} {:?}", line.method, line.path)));
                }
                Some(line)
            }
            _ => return Err(invalid("http_method", "partial request line")),
        };
        Ok(VerdictEventRecord {
            id: r.id,
            node_id: r.node_id,
            received_unix_ms: r.received_unix_ms,
            event: VerdictEventRow {
                at_unix_ms: r.at_unix_ms,
                local: decode::identity(EVENTS, "local_identity", r.local_identity)?,
                peer: decode::identity(EVENTS, "peer_identity", r.peer_identity)?,
                direction: stored_direction(EVENTS, "direction", r.direction)?,
                verdict: verdict_from_db(r.verdict).map_err(|_| invalid("verdict", r.verdict))?,
                src_addr: stored_addr("src_addr", &r.src_addr)?,
                dst_addr: stored_addr("dst_addr", &r.dst_addr)?,
                dst_port: decode::port(EVENTS, "dst_port", r.dst_port)?,
                protocol: protocol_from_db(EVENTS, r.protocol)?,
                policy_version: decode::counter(EVENTS, "policy_version", r.policy_version)?,
                rule,
                http,
            },
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawVerdictCount {
    pub local_identity: i64,
    pub audit: i64,
    pub denied: i64,
    pub last_unix_ms: i64,
}

impl TryFrom<RawVerdictCount> for VerdictCount {
    type Error = StoreError;
    fn try_from(r: RawVerdictCount) -> Result<Self, StoreError> {
        Ok(VerdictCount {
            identity: decode::identity(EVENTS, "local_identity", r.local_identity)?,
            audit: decode::counter(EVENTS, "verdict", r.audit)?,
            denied: decode::counter(EVENTS, "verdict", r.denied)?,
            last_unix_ms: r.last_unix_ms,
        })
    }
}

// === rule hits ===

/// Connections one rule decided on a node since its previous report (a delta: the
/// store adds it to what it has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RuleHits {
    pub rule: RuleRef,
    pub hits: u64,
    pub last_hit_unix_ms: i64,
}

/// A rule's accumulated use on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleHitRow {
    pub rule: RuleRef,
    pub node_id: String,
    pub hits: u64,
    pub last_hit_unix_ms: i64,
}

/// A report's hits as stored, one row per rule (a PostgreSQL upsert may not touch a row
/// twice in one statement, so repeats are folded here: hits add, last hit is the max)
/// and sorted by rule, so concurrent reports lock rows in the same order and cannot
/// deadlock each other.
#[derive(Debug, Default)]
pub(crate) struct HitColumns {
    pub proposal_id: Vec<i64>,
    pub direction: Vec<i16>,
    pub rule_index: Vec<i64>,
    pub hits: Vec<i64>,
    pub last_hit_unix_ms: Vec<i64>,
}

impl HitColumns {
    pub fn new(hits: &[RuleHits]) -> Self {
        let mut folded: BTreeMap<RuleRef, (u64, i64)> = BTreeMap::new();
        for h in hits {
            let e = folded.entry(h.rule).or_insert((0, h.last_hit_unix_ms));
            e.0 = e.0.saturating_add(h.hits);
            e.1 = e.1.max(h.last_hit_unix_ms);
        }
        let mut c = HitColumns::default();
        for (rule, (hits, last)) in folded {
            c.proposal_id.push(rule.proposal_id);
            c.direction.push(direction_code(rule.direction));
            c.rule_index.push(i64::from(rule.rule_index));
            c.hits.push(sat(hits));
            c.last_hit_unix_ms.push(last);
        }
        c
    }

    pub fn len(&self) -> usize {
        self.proposal_id.len()
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawRuleHit {
    pub proposal_id: i64,
    pub direction: i16,
    pub rule_index: i64,
    pub node_id: String,
    pub hits: i64,
    pub last_hit_unix_ms: i64,
}

impl TryFrom<RawRuleHit> for RuleHitRow {
    type Error = StoreError;
    fn try_from(r: RawRuleHit) -> Result<Self, StoreError> {
        Ok(RuleHitRow {
            rule: RuleRef {
                proposal_id: r.proposal_id,
                direction: stored_direction("rule_hits", "direction", r.direction)?,
                rule_index: u32::try_from(r.rule_index).map_err(|_| StoreError::InvalidStoredValue {
                    table: "rule_hits",
                    column: "rule_index",
                    value: r.rule_index.to_string(),
                })?,
            },
            node_id: r.node_id,
            hits: decode::counter("rule_hits", "hits", r.hits)?,
            last_hit_unix_ms: r.last_hit_unix_ms,
        })
    }
}

// === statements (both backends) ===
//
// Written in the dialect both share: CASE instead of GREATEST/LEAST (PostgreSQL) or
// two-argument min/max (SQLite). In an upsert's SET, `enforcers.x` is the row before
// the update on both backends.

/// The newer of the stored and the new `last_seen_unix_ms` (a NULL stored value loses).
/// A macro, not a const, so `concat!` can splice it into the statements below.
macro_rules! last_seen {
    () => {
        "last_seen_unix_ms = CASE WHEN enforcers.last_seen_unix_ms > excluded.last_seen_unix_ms \
         THEN enforcers.last_seen_unix_ms ELSE excluded.last_seen_unix_ms END"
    };
}

/// `$4` applied version, `$5` `now` if `$4` is set (else NULL): the node's word replaces
/// the applied version, also by "none" (a node that lost its pinned maps enforces
/// nothing, and the UI must not claim otherwise); the time moves only with the version.
pub(crate) const HELLO: &str = concat!(
    "INSERT INTO enforcers (node_id, boot_id, agent_version, applied_version, applied_unix_ms, \
     last_seen_unix_ms) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (node_id) DO UPDATE SET boot_id = excluded.boot_id, agent_version = excluded.agent_version, \
     applied_unix_ms = CASE WHEN enforcers.applied_version = excluded.applied_version \
        THEN enforcers.applied_unix_ms ELSE excluded.applied_unix_ms END, \
     applied_version = excluded.applied_version, ",
    last_seen!()
);

/// An applied ack: the version is what the node enforces. A pending refusal is cleared
/// only by a version at least as new as the refused one: re-acking the old version
/// after a reconnect does not make the refusal go away.
pub(crate) const ACK_APPLIED: &str = concat!(
    "INSERT INTO enforcers (node_id, applied_version, applied_unix_ms, last_seen_unix_ms) \
     VALUES ($1, $2, $3, $3) \
     ON CONFLICT (node_id) DO UPDATE SET \
     applied_unix_ms = CASE WHEN enforcers.applied_version = excluded.applied_version \
        THEN enforcers.applied_unix_ms ELSE excluded.applied_unix_ms END, \
     applied_version = excluded.applied_version, \
     last_error = CASE WHEN enforcers.rejected_version > excluded.applied_version \
        THEN enforcers.last_error ELSE NULL END, \
     rejected_version = CASE WHEN enforcers.rejected_version > excluded.applied_version \
        THEN enforcers.rejected_version ELSE NULL END, ",
    last_seen!()
);

/// A rejected ack: the applied version stays; the refusal is recorded.
pub(crate) const ACK_REJECTED: &str = concat!(
    "INSERT INTO enforcers (node_id, rejected_version, last_error, last_seen_unix_ms) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (node_id) DO UPDATE SET rejected_version = excluded.rejected_version, \
     last_error = excluded.last_error, ",
    last_seen!()
);

pub(crate) const SET_DESIRED: &str = "INSERT INTO enforcers (node_id, desired_version, desired_unix_ms) \
     VALUES ($1, $2, $3) ON CONFLICT (node_id) DO UPDATE SET desired_version = excluded.desired_version, \
     desired_unix_ms = excluded.desired_unix_ms";

pub(crate) const SELECT_ENFORCERS: &str = "SELECT node_id, boot_id, agent_version, desired_version, \
     desired_unix_ms, applied_version, applied_unix_ms, rejected_version, last_error, last_seen_unix_ms, \
     ringbuf_dropped, queue_dropped, conntrack_full, last_report_unix_ms, clock_skew_ms \
     FROM enforcers ORDER BY node_id";

/// A verdict report's loss counters: the newest values replace the old (they are
/// cumulative on the node). Creates the row if a report comes before any Hello.
pub(crate) const REPORT_LOSS: &str = "INSERT INTO enforcers (node_id, ringbuf_dropped, queue_dropped, \
     conntrack_full, last_report_unix_ms, last_seen_unix_ms) VALUES ($1, $2, $3, $4, $5, $5) \
     ON CONFLICT (node_id) DO UPDATE SET ringbuf_dropped = excluded.ringbuf_dropped, \
     queue_dropped = excluded.queue_dropped, conntrack_full = excluded.conntrack_full, \
     last_report_unix_ms = excluded.last_report_unix_ms, last_seen_unix_ms = excluded.last_seen_unix_ms";

/// Stored columns of `verdict_events` except `id`, in insert order.
pub(crate) const EVENT_COLUMNS: &str = "node_id, received_unix_ms, at_unix_ms, local_identity, peer_identity, \
     direction, verdict, src_addr, dst_addr, dst_port, protocol, policy_version, rule_proposal_id, \
     rule_direction, rule_index, http_method, http_path, http_truncated";

/// Per local identity: audit and deny events at or after `$1`. The unary plus on the
/// grouped column is deliberate: without it SQLite prefers walking the identity index in
/// GROUP BY order over the whole table (measured: even after ANALYZE), while the time
/// window is the selective part; with it, the covering index on `at_unix_ms` is read for
/// the window only. PostgreSQL plans by its statistics either way.
pub(crate) const SELECT_COUNTS: &str = "SELECT +local_identity AS local_identity, \
     COUNT(CASE WHEN verdict = 2 THEN 1 END) AS audit, COUNT(CASE WHEN verdict = 3 THEN 1 END) AS denied, \
     MAX(at_unix_ms) AS last_unix_ms FROM verdict_events WHERE at_unix_ms >= $1 AND verdict IN (2, 3) \
     GROUP BY 1 ORDER BY 1";

/// One chunk of pruning; repeated until a chunk deletes fewer rows, so concurrent
/// inserts are never held up for long.
pub(crate) const PRUNE_EVENTS_CHUNK: &str = "DELETE FROM verdict_events WHERE id IN \
     (SELECT id FROM verdict_events WHERE at_unix_ms < $1 LIMIT $2)";

pub(crate) const PRUNE_CHUNK: i64 = 10_000;

/// The saturating sum and the later time, for a rule-hit upsert: appended to each
/// backend's INSERT (a macro so PostgreSQL's constant statement can `concat!` it).
macro_rules! accumulate_hits {
    () => {
        " ON CONFLICT (proposal_id, direction, rule_index, node_id) DO UPDATE SET \
         hits = CASE WHEN rule_hits.hits > 9223372036854775807 - excluded.hits THEN 9223372036854775807 \
            ELSE rule_hits.hits + excluded.hits END, \
         last_hit_unix_ms = CASE WHEN rule_hits.last_hit_unix_ms > excluded.last_hit_unix_ms \
            THEN rule_hits.last_hit_unix_ms ELSE excluded.last_hit_unix_ms END"
    };
}
pub(crate) use accumulate_hits;

pub(crate) const ACCUMULATE_HITS: &str = accumulate_hits!();

pub(crate) const SELECT_RULE_HITS: &str = "SELECT proposal_id, direction, rule_index, node_id, hits, \
     last_hit_unix_ms FROM rule_hits WHERE proposal_id = $1 ORDER BY direction, rule_index, node_id";

/// A verdict-event listing, newest first; every value is bound.
pub(crate) fn list<DB>(q: &VerdictQuery) -> sqlx::QueryBuilder<DB>
where
    DB: sqlx::Database,
    for<'a> i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    for<'a> String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut b = sqlx::QueryBuilder::new(format!("SELECT id, {EVENT_COLUMNS} FROM verdict_events WHERE TRUE"));
    if let Some(since) = q.since_unix_ms {
        b.push(" AND at_unix_ms >= ").push_bind(since);
    }
    if let Some(until) = q.until_unix_ms {
        b.push(" AND at_unix_ms <= ").push_bind(until);
    }
    if let Some(identity) = q.identity {
        b.push(" AND local_identity = ").push_bind(i64::from(identity.0));
    }
    if let Some(verdict) = q.verdict {
        b.push(" AND verdict = ").push_bind(i64::from(verdict_code(verdict)));
    }
    if let Some(node) = &q.node_id {
        b.push(" AND node_id = ").push_bind(text(node));
    }
    if let Some(before) = q.before_id {
        b.push(" AND id < ").push_bind(before);
    }
    b.push(" ORDER BY id DESC LIMIT ").push_bind(i64::from(q.limit.min(MAX_VERDICT_PAGE)));
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(proposal_id: i64, rule_index: u32) -> RuleRef {
        RuleRef { proposal_id, direction: Direction::Ingress, rule_index }
    }

    #[test]
    fn hits_fold_per_rule_sorted_and_saturating() {
        let c = HitColumns::new(&[
            RuleHits { rule: rule(2, 0), hits: 5, last_hit_unix_ms: 10 },
            RuleHits { rule: rule(1, 3), hits: u64::MAX, last_hit_unix_ms: 7 },
            RuleHits { rule: rule(2, 0), hits: 1, last_hit_unix_ms: 4 },
            RuleHits { rule: rule(1, 3), hits: 1, last_hit_unix_ms: 9 },
        ]);
        assert_eq!(c.proposal_id, [1, 2]);
        assert_eq!(c.rule_index, [3, 0]);
        assert_eq!(c.hits, [i64::MAX, 6]);
        assert_eq!(c.last_hit_unix_ms, [9, 10]);
    }

    #[test]
    fn versions_round_trip_exactly_or_are_refused() {
        assert_eq!(version("v", i64::MAX as u64).expect("fits"), i64::MAX);
        assert!(matches!(version("v", u64::MAX), Err(StoreError::OutOfRange { field: "v", .. })));
    }

    #[test]
    fn error_text_is_bounded_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_CHARS + 10);
        assert_eq!(error_text(&long).chars().count(), MAX_ERROR_CHARS);
        assert_eq!(error_text("a\0b"), "a\u{FFFD}b");
        assert!(node("  ").is_err());
    }
}
