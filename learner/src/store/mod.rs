//! The service-graph store (sqlx: SQLite or PostgreSQL). All SQL lives here.
//!
//! One [`Store`] wraps the pool(s) of one backend. SQLite is the embedded default (a
//! single file, WAL, one writer; see `sqlite`); PostgreSQL serves larger or replicated
//! deployments (see `postgres`). Both run the same numbered migrations from
//! `migrations/sqlite` and `migrations/postgres`, and the same test suite
//! (`tests/store.rs`) runs against each.
//!
//! What the store guarantees:
//! - **At-least-once delivery becomes exactly-once storage.** A batch is stored in one
//!   transaction together with its `(node_id, boot_id, seq)` record; a resent batch is
//!   reported as [`IngestOutcome::Duplicate`] and changes nothing.
//! - **Edges never double count.** One connection may be reported by both of its ends
//!   (the client's collector as egress, the server's as ingress, possibly the same
//!   collector when both live on one node). Edge counters are kept per observation side
//!   and an edge's `connections`/`bytes` are the larger side, not the sum. Taking the
//!   max gives the right number when one side or both observe the connection, and a
//!   lower bound (never an overcount) when the two sides' observation windows differ.
//! - **Identities are stable.** A label set gets one number forever, also across
//!   restarts and concurrent allocators; numbers are never reused.
//! - **Attacker-controlled strings are data.** Label values, comms, DNS names and node
//!   ids are always bound parameters; SQL text is built only from constants.

mod decode;
mod error;
mod postgres;
mod prepare;
mod queries;
mod sqlite;
mod sqlite_ingest;
mod types;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bulkhead_model::{DnsAnswer, Identity, Labels};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use error::StoreError;
pub use types::{
    AgentRow, EdgeQuery, EdgeRow, EndpointRow, FlowQuery, FlowRow, IdentityRow, IngestBatch, IngestOutcome,
    MAX_FLOW_PAGE, ResolvedEndpoint, ResolvedFlow,
};

use decode::RawIdentity;
use postgres::PgStore;
use prepare::PreparedBatch;
use sqlite::SqliteStore;

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Handle to the learner's store; cheap to clone (the pools are reference counted).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Runs the same call on whichever backend the store wraps.
macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match &$self.inner {
            Inner::Sqlite($s) => $call,
            Inner::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens (creating if needed) and migrates the store named by `url`:
    /// `sqlite:///abs/path.db`, `sqlite://relative.db`, `sqlite::memory:` (tests) or
    /// `postgres://user:password@host/db`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let inner = if url.starts_with("sqlite:") {
            Inner::Sqlite(SqliteStore::open(url).await?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Inner::Postgres(PgStore::open(url).await?)
        } else {
            // Only the scheme: the rest of the URL may carry a password.
            let scheme = url.split_once(':').map_or("", |(s, _)| s).chars().take(32).collect();
            return Err(StoreError::UnsupportedUrl { scheme });
        };
        let store = Store { inner };
        tracing::info!(backend = ?store.backend(), "Opened the store.");
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres(_) => Backend::Postgres,
        }
    }

    /// Closes the pools, waiting for in-flight statements (and SQLite's final
    /// `PRAGMA optimize`). Clones of this store fail afterwards.
    pub async fn close(&self) {
        dispatch!(self, s => s.close().await)
    }

    // === identities ===

    /// The identity of a label set, allocated on first use.
    ///
    /// Stable across restarts; concurrent callers with the same labels get the same id;
    /// allocated ids start at [`Identity::FIRST_ALLOCATED`]. Reserved identities are
    /// seeded by the first migration with labels `{"reserved:<name>": ""}`, so asking
    /// for those labels returns the reserved number.
    pub async fn ensure_identity(&self, labels: &Labels) -> Result<Identity, StoreError> {
        let canonical = labels.canonical();
        let digest: [u8; 32] = Sha256::digest(canonical.as_bytes()).into();
        let now = unix_ms_now();
        dispatch!(self, s => s.ensure_identity(&digest, &canonical, now).await)
    }

    /// Every identity, reserved ones included, by number.
    pub async fn identities(&self) -> Result<Vec<IdentityRow>, StoreError> {
        dispatch!(self, s => s.identities().await)
    }

    // === agents ===

    /// Administrator pre-registration of a node. Idempotent; keeps the first time.
    pub async fn register_agent(&self, node_id: &str, now_ms: i64) -> Result<(), StoreError> {
        dispatch!(self, s => s.register_agent(node_id, now_ms).await)
    }

    /// Whether the node was pre-registered or has been seen (Hello or batch).
    pub async fn agent_known(&self, node_id: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.agent_known(node_id).await)
    }

    /// Records an agent's Hello: its current boot and version, seen now. Creates the
    /// agent if needed; callers that require pre-registration check
    /// [`Store::agent_known`] first.
    pub async fn touch_agent(
        &self,
        node_id: &str,
        boot_id: &str,
        agent_version: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        dispatch!(self, s => s.touch_agent(node_id, boot_id, agent_version, now_ms).await)
    }

    /// Every known agent with its current boot's loss counters.
    pub async fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        dispatch!(self, s => s.agents().await)
    }

    /// Highest seq stored for `(node, boot)`; 0 if none. Agents use it after a
    /// reconnect to drop spooled batches the learner already has.
    pub async fn stored_through_seq(&self, node_id: &str, boot_id: &str) -> Result<u64, StoreError> {
        let seq = dispatch!(self, s => s.stored_through_seq(node_id, boot_id).await)?;
        let seq = seq.unwrap_or(0);
        u64::try_from(seq).map_err(|_| StoreError::InvalidStoredValue {
            table: "agent_boots",
            column: "stored_through_seq",
            value: seq.to_string(),
        })
    }

    // === ingest ===

    /// Stores one batch in one transaction: dedupe on `(node_id, boot_id, seq)`
    /// ([`IngestOutcome::Duplicate`], nothing written), else insert its flows, upsert
    /// the edges they imply (aggregated in memory first: a 1000-flow batch typically
    /// touches a few edges), replace the node's endpoints if the batch has a snapshot,
    /// record DNS answers and the boot's loss counters.
    pub async fn ingest(&self, batch: &IngestBatch) -> Result<IngestOutcome, StoreError> {
        let started = Instant::now();
        let prepared = PreparedBatch::new(batch)?;
        let outcome = dispatch!(self, s => s.ingest(&prepared).await)?;
        tracing::debug!(
            node = %batch.node_id,
            boot = %batch.boot_id,
            seq = batch.seq,
            ?outcome,
            elapsed_us = started.elapsed().as_micros() as u64,
            "Ingested batch."
        );
        Ok(outcome)
    }

    // === reads ===

    /// Service-graph edges with their endpoints' labels, most recently seen first.
    pub async fn edges(&self, q: &EdgeQuery) -> Result<Vec<EdgeRow>, StoreError> {
        dispatch!(self, s => s.edges(q).await)
    }

    /// Recorded flows, newest first; page with [`FlowQuery::before_id`].
    pub async fn flows(&self, q: &FlowQuery) -> Result<Vec<FlowRow>, StoreError> {
        dispatch!(self, s => s.flows(q).await)
    }

    /// The latest endpoint snapshot of every node.
    pub async fn endpoints(&self) -> Result<Vec<EndpointRow>, StoreError> {
        dispatch!(self, s => s.endpoints().await)
    }

    /// Distinct DNS answers seen at or after `since_unix_ms` (latest sighting and TTL).
    pub async fn dns_answers(&self, since_unix_ms: i64) -> Result<Vec<DnsAnswer>, StoreError> {
        dispatch!(self, s => s.dns_answers(since_unix_ms).await)
    }

    // === retention ===

    /// Deletes recorded flows last seen before `older_than_unix_ms`; returns how many.
    /// Edges are the long-term memory and are kept. Deletes in chunks so concurrent
    /// ingest is never stalled for long.
    pub async fn prune_flows(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        let n = dispatch!(self, s => s.prune_flows(older_than_unix_ms).await)?;
        tracing::info!(deleted = n, older_than_unix_ms, "Pruned flows.");
        Ok(n)
    }

    /// Deletes DNS answers last seen before `older_than_unix_ms`; returns how many.
    pub async fn prune_dns_answers(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_dns_answers(older_than_unix_ms).await)
    }

    /// Deletes dedupe records of batches received before `older_than_unix_ms`; returns
    /// how many. Each boot remembers the highest pruned seq, and any batch at or below
    /// it is still reported as a duplicate, so pruning never lets a late resend in.
    pub async fn prune_batch_records(&self, older_than_unix_ms: i64) -> Result<u64, StoreError> {
        dispatch!(self, s => s.prune_batch_records(older_than_unix_ms).await)
    }
}

/// An identity row found by digest, after checking it really holds these labels.
fn checked_identity(row: RawIdentity, canonical: &str) -> Result<Identity, StoreError> {
    if row.labels != canonical {
        return Err(StoreError::DigestCollision { identity: row.id });
    }
    decode::identity("identities", "id", row.id)
}

fn unix_ms_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}
