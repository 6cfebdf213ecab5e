//! Agents' clock skew as the learner measured it (`grpc::clock`), kept per node so
//! operators see which node's clock is off (agents / enforcers lists, overview).

use super::{Inner, Store, StoreError, enforcement};

/// Which of a node's agents the measurement is about: each has its own stream, and a
/// node's two agents read the same clock, but the rows are the agents'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockOf {
    Collector,
    Enforcer,
}

const COLLECTOR: &str = "UPDATE agents SET clock_skew_ms = $2 WHERE node_id = $1";
const ENFORCER: &str = "UPDATE enforcers SET clock_skew_ms = $2 WHERE node_id = $1";

impl Store {
    /// Stores the newest skew measured for `node_id`'s agent (`learner − node`, ms).
    /// A node without a row yet (it said hello moments ago on another learner
    /// replica) is left alone: the next measurement lands.
    pub async fn record_clock_skew(&self, of: ClockOf, node_id: &str, skew_ms: i64) -> Result<(), StoreError> {
        let node = enforcement::node(node_id)?;
        let sql = match of {
            ClockOf::Collector => COLLECTOR,
            ClockOf::Enforcer => ENFORCER,
        };
        let done = match &self.inner {
            Inner::Sqlite(s) => sqlx::query(sql).bind(node).bind(skew_ms).execute(&s.writer).await.map(|_| ()),
            Inner::Postgres(s) => sqlx::query(sql).bind(node).bind(skew_ms).execute(&s.pool).await.map(|_| ()),
        };
        done.map_err(StoreError::db("record_clock_skew"))
    }
}
