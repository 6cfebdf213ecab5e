//! Rollout: moving workloads learn → monitor → enforce, one workload or a namespace at
//! a time, with the gate shown before and checked on every change.
//!
//! Gates checked here (refused with a reason): monitor and enforce need an approved or
//! deployed policy for the workload; enforce needs the workload to have been in
//! monitor first (unless forced) — would-deny traffic must have had a chance to show
//! up as audit events. The gate also reports the learning window's convergence and
//! how long the workload has been in its mode, and the audit / deny events enforcers
//! reported for it in the last 24 hours.

use std::collections::BTreeMap;

use bulkhead_model::{Identity, RolloutMode};
use serde::{Deserialize, Serialize};

use super::{PolicyError, PolicyService};
use crate::auth::Role;
use crate::store::{ProposalQuery, RolloutRow};

/// The least role that may make this change to workloads now in `current` modes:
/// whatever starts or stops dropping traffic (into or out of enforce), or skips the
/// monitor gate, is an approver's decision; learn ↔ monitor changes nothing on the
/// wire and is an analyst's.
pub fn role_needed(req: &RolloutRequest, current: impl IntoIterator<Item = RolloutMode>) -> Role {
    let touches_enforce =
        req.mode == RolloutMode::Enforce || req.force || current.into_iter().any(|m| m == RolloutMode::Enforce);
    if touches_enforce { Role::Approver } else { Role::Analyst }
}

/// A change request: one workload or every workload of a namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutRequest {
    pub target: Option<Identity>,
    pub namespace: Option<String>,
    pub mode: RolloutMode,
    #[serde(default)]
    pub reason: String,
    /// Skip the "monitor before enforce" gate (recorded in the audit reason).
    #[serde(default)]
    pub force: bool,
}

/// One workload's rollout state and gate.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutState {
    pub target: Identity,
    pub workload: String,
    pub namespace: Option<String>,
    pub mode: RolloutMode,
    pub mode_since_unix_ms: Option<i64>,
    pub changed_by: Option<String>,
    /// An approved or deployed policy exists (needed for monitor and enforce).
    pub has_policy: bool,
    /// Id of the newest proposal, and whether its learning window converged.
    pub latest_proposal: Option<i64>,
    pub converged: Option<bool>,
    /// Would-deny (monitor) and denied (enforce) events enforcers reported in the last
    /// [`GATE_WINDOW_MS`]: what promotion to enforce would break, and what enforcing
    /// is blocking.
    pub audit_events: u64,
    pub denied_events: u64,
}

/// How far back the gate counts verdict events.
pub const GATE_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// What a change did, per workload.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutChange {
    pub target: Identity,
    pub from: RolloutMode,
    pub to: RolloutMode,
    pub row: RolloutRow,
}

impl PolicyService {
    /// Rollout state of every workload that has a proposal or a mode.
    pub async fn rollout_states(&self) -> Result<Vec<RolloutState>, PolicyError> {
        let modes: BTreeMap<Identity, RolloutRow> =
            self.store.rollout_modes().await?.into_iter().map(|r| (r.target, r)).collect();
        let active: std::collections::BTreeSet<Identity> =
            self.store.active_policies().await?.into_iter().map(|a| a.target).collect();
        let q = ProposalQuery { limit: crate::store::MAX_PROPOSAL_PAGE, ..Default::default() };
        // Newest first: the first summary per target is its latest proposal.
        let mut latest: BTreeMap<Identity, (i64, bool, String)> = BTreeMap::new();
        for s in self.store.proposals(&q).await? {
            latest.entry(s.target).or_insert((s.id, s.converged, s.workload));
        }
        let labels: BTreeMap<Identity, bulkhead_model::Labels> =
            self.store.identities().await?.into_iter().map(|r| (r.id, r.labels)).collect();
        let since = crate::grpc::ingest::unix_ms() - GATE_WINDOW_MS;
        let counts: BTreeMap<Identity, (u64, u64)> =
            self.store.verdict_counts(since).await?.into_iter().map(|c| (c.identity, (c.audit, c.denied))).collect();
        let mut targets: std::collections::BTreeSet<Identity> = modes.keys().copied().collect();
        targets.extend(latest.keys().copied());
        Ok(targets
            .into_iter()
            .map(|t| {
                let row = modes.get(&t);
                let l = latest.get(&t);
                RolloutState {
                    target: t,
                    workload: l.map_or_else(|| format!("identity-{}", t.0), |l| l.2.clone()),
                    namespace: labels.get(&t).and_then(|l| l.namespace()).map(str::to_owned),
                    mode: row.map_or(RolloutMode::Learn, |r| r.mode),
                    mode_since_unix_ms: row.map(|r| r.mode_since_unix_ms),
                    changed_by: row.map(|r| r.changed_by.clone()),
                    has_policy: active.contains(&t),
                    latest_proposal: l.map(|l| l.0),
                    converged: l.map(|l| l.1),
                    audit_events: counts.get(&t).map_or(0, |c| c.0),
                    denied_events: counts.get(&t).map_or(0, |c| c.1),
                }
            })
            .collect())
    }

    /// Sets the mode of one workload or a namespace's workloads; every gate is checked
    /// for every workload before anything changes (all or nothing).
    /// `role` is the caller's: see [`role_needed`].
    pub async fn set_rollout(
        &self,
        req: &RolloutRequest,
        role: Role,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<RolloutChange>, PolicyError> {
        let states = self.rollout_states().await?;
        let chosen: Vec<&RolloutState> = match (&req.target, &req.namespace) {
            (Some(t), None) => states.iter().filter(|s| s.target == *t).collect(),
            (None, Some(ns)) => states.iter().filter(|s| s.namespace.as_deref() == Some(ns.as_str())).collect(),
            _ => {
                return Err(PolicyError::InvalidRequest { reason: "give exactly one of target and namespace".into() });
            }
        };
        if chosen.is_empty() {
            return Err(PolicyError::InvalidRequest {
                reason: "no workload with a proposal matches; synthesize proposals first".into(),
            });
        }
        let needed = role_needed(req, chosen.iter().map(|s| s.mode));
        if !role.allows(needed) {
            return Err(PolicyError::Forbidden { needed });
        }
        for s in &chosen {
            if req.mode != RolloutMode::Learn && !s.has_policy {
                return Err(PolicyError::Gate {
                    target: s.target,
                    reason: format!("{} has no approved policy: approve a proposal first", s.workload),
                });
            }
            if req.mode == RolloutMode::Enforce && s.mode == RolloutMode::Learn && !req.force {
                return Err(PolicyError::Gate {
                    target: s.target,
                    reason: format!(
                        "{} is in learn mode: put it in monitor first so would-deny traffic shows up as audit \
                         events (or force)",
                        s.workload
                    ),
                });
            }
        }
        let reason = if req.force { format!("{} (forced)", req.reason) } else { req.reason.clone() };
        let mut out = Vec::with_capacity(chosen.len());
        for s in chosen {
            let row = self.store.set_rollout_mode(s.target, req.mode, actor, &reason, now_ms).await?;
            out.push(RolloutChange { target: s.target, from: s.mode, to: req.mode, row });
        }
        self.changed();
        Ok(out)
    }
}
