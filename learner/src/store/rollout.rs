//! Rollout modes per target identity (learn → monitor → enforce, DESIGN.md §2).
//!
//! No row means `learn`: a workload nobody decided about is only observed. Every
//! explicit set is a row write and an audit entry (`rollout.mode`, detail `from`,
//! `to`, `reason`), also when it re-confirms the current mode; the time the target
//! *entered* its mode is kept apart (`mode_since_unix_ms`) because promotion gates
//! measure how long a workload has been in monitor, not when someone last clicked.

use bulkhead_model::{Identity, RolloutMode};
use serde::Serialize;

use super::StoreError;
use super::audit::require;
use super::decode;
use super::prepare::text;

/// A target's rollout mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRow {
    pub target: Identity,
    pub mode: RolloutMode,
    /// When the target entered `mode`.
    pub mode_since_unix_ms: i64,
    /// The last explicit set: when, by whom, why.
    pub changed_unix_ms: i64,
    pub changed_by: String,
    pub reason: String,
}

/// A rollout-mode change checked and converted to what `rollout_modes` stores.
#[derive(Debug)]
pub(crate) struct PreparedRollout {
    pub target: Identity,
    pub mode: RolloutMode,
    pub actor: String,
    pub reason: String,
}

impl PreparedRollout {
    pub fn new(target: Identity, mode: RolloutMode, actor: &str, reason: &str) -> Result<Self, StoreError> {
        require("actor", actor)?;
        Ok(Self { target, mode, actor: text(actor), reason: text(reason) })
    }
}

pub(crate) fn mode_from_db(s: &str) -> Result<RolloutMode, StoreError> {
    match s {
        "learn" => Ok(RolloutMode::Learn),
        "monitor" => Ok(RolloutMode::Monitor),
        "enforce" => Ok(RolloutMode::Enforce),
        other => Err(StoreError::InvalidStoredValue { table: "rollout_modes", column: "mode", value: other.into() }),
    }
}

/// The mode a target leaves, and since when it is in `to` afterwards: re-confirming the
/// current mode keeps its start time. No row is learn, entered now.
pub(crate) fn transition(
    current: Option<&RawRollout>,
    to: RolloutMode,
    now_ms: i64,
) -> Result<(RolloutMode, i64), StoreError> {
    let Some(c) = current else { return Ok((RolloutMode::Learn, now_ms)) };
    let from = mode_from_db(&c.mode)?;
    Ok((from, if from == to { c.mode_since_unix_ms } else { now_ms }))
}

/// Detail of `rollout.mode`.
pub(crate) fn detail(from: RolloutMode, to: RolloutMode, reason: &str) -> serde_json::Value {
    serde_json::json!({ "from": from, "to": to, "reason": reason })
}

/// Audit subject naming a target identity.
pub(crate) fn subject(target: Identity) -> String {
    format!("identity:{}", target.0)
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawRollout {
    pub target_identity: i64,
    pub mode: String,
    pub mode_since_unix_ms: i64,
    pub changed_unix_ms: i64,
    pub changed_by: String,
    pub reason: String,
}

impl TryFrom<RawRollout> for RolloutRow {
    type Error = StoreError;
    fn try_from(r: RawRollout) -> Result<Self, StoreError> {
        Ok(RolloutRow {
            target: decode::identity("rollout_modes", "target_identity", r.target_identity)?,
            mode: mode_from_db(&r.mode)?,
            mode_since_unix_ms: r.mode_since_unix_ms,
            changed_unix_ms: r.changed_unix_ms,
            changed_by: r.changed_by,
            reason: r.reason,
        })
    }
}

// === statements (both backends) ===

pub(crate) const SELECT_ONE: &str = "SELECT target_identity, mode, mode_since_unix_ms, changed_unix_ms, \
     changed_by, reason FROM rollout_modes WHERE target_identity = $1";

pub(crate) const SELECT_ALL: &str = "SELECT target_identity, mode, mode_since_unix_ms, changed_unix_ms, \
     changed_by, reason FROM rollout_modes ORDER BY target_identity";

pub(crate) const UPSERT: &str = "INSERT INTO rollout_modes (target_identity, mode, mode_since_unix_ms, \
     changed_unix_ms, changed_by, reason) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (target_identity) DO UPDATE SET mode = excluded.mode, \
     mode_since_unix_ms = excluded.mode_since_unix_ms, changed_unix_ms = excluded.changed_unix_ms, \
     changed_by = excluded.changed_by, reason = excluded.reason \
     RETURNING target_identity, mode, mode_since_unix_ms, changed_unix_ms, changed_by, reason";
