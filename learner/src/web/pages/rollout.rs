//! `/rollout`: every workload's mode (learn → monitor → enforce) with its gate — audit
//! and deny events in the last 24 hours, convergence, whether a policy is in force, how
//! long it has been in its mode — and which enforcers applied which policy version; per
//! namespace, the same at a glance. Promote / demote forms post to `/rollout`
//! (`target` or `namespace`, `mode`, `reason`, `force`), which calls
//! [`crate::policy::PolicyService::set_rollout`] with the caller's role: it refuses a
//! closed gate (409) or a change into or out of enforce by a non-approver (403), and
//! the page says why. Only the modes the caller may choose are offered.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use askama::Template;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use bulkhead_model::{Identity, RolloutMode};
use serde::Deserialize;

use super::graph::{fmt_duration, fmt_opt_time, query};
use super::{Chrome, render_status};
use crate::auth::Role;
use crate::grpc::ingest::unix_ms;
use crate::policy::PolicyError;
use crate::policy::rollout::{GATE_WINDOW_MS, RolloutRequest, RolloutState, role_needed};
use crate::store::EnforcerRow;
use crate::web::AppState;
use crate::web::auth::{Analyst, Caller, Viewer, redirect_see_other};

/// Longest reason accepted, in characters.
const MAX_REASON_CHARS: usize = 1_000;

fn mode_of(s: &str) -> Option<RolloutMode> {
    match s {
        "learn" => Some(RolloutMode::Learn),
        "monitor" => Some(RolloutMode::Monitor),
        "enforce" => Some(RolloutMode::Enforce),
        _ => None,
    }
}

const MODES: [RolloutMode; 3] = [RolloutMode::Learn, RolloutMode::Monitor, RolloutMode::Enforce];

/// The modes `role` may move workloads now in `current` modes to (nothing if it may not
/// change them at all).
fn allowed_modes(role: Role, current: &[RolloutMode]) -> Vec<&'static str> {
    if !role.allows(Role::Analyst) {
        return Vec::new();
    }
    MODES
        .iter()
        .filter(|m| {
            let req = RolloutRequest { target: None, namespace: None, mode: **m, reason: String::new(), force: false };
            role.allows(role_needed(&req, current.iter().copied()))
        })
        .map(|m| m.as_str())
        .collect()
}

#[derive(Debug, Clone)]
struct EnforcerLine {
    node: String,
    applied: String,
    desired: String,
    in_sync: bool,
    rejected: Option<String>,
}

#[derive(Debug, Clone)]
struct WorkloadLine {
    target: u32,
    workload: String,
    mode: &'static str,
    in_mode: String,
    changed_by: String,
    has_policy: bool,
    latest_proposal: Option<i64>,
    converged: &'static str,
    audit_events: u64,
    denied_events: u64,
    /// What the next step needs, in words.
    gate: String,
    gate_open: bool,
    enforcers: Vec<EnforcerLine>,
    modes: Vec<&'static str>,
}

#[derive(Debug, Clone)]
struct NamespaceGroup {
    name: String,
    /// Has a namespace label (so a namespace-wide change is possible).
    real: bool,
    counts: String,
    modes: Vec<&'static str>,
    workloads: Vec<WorkloadLine>,
}

#[derive(Debug, Clone)]
struct NodeLine {
    node: String,
    agent: String,
    desired: String,
    applied: String,
    in_sync: bool,
    rejected: Option<String>,
    last_seen: String,
    lost: u64,
}

#[derive(Template)]
#[template(path = "rollout.html")]
struct RolloutPage {
    chrome: Chrome,
    gate_hours: i64,
    groups: Vec<NamespaceGroup>,
    nodes: Vec<NodeLine>,
    notice: Option<String>,
    alert: Option<String>,
    can_force: bool,
    reason_value: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RolloutParams {
    /// After a change: how many workloads went to which mode.
    changed: Option<u32>,
    mode: Option<String>,
}

fn version(v: Option<u64>) -> String {
    v.map_or_else(|| "none".to_owned(), |v| format!("v{v}"))
}

fn gate(s: &RolloutState, now: i64) -> (String, bool) {
    match s.mode {
        RolloutMode::Learn if !s.has_policy => ("monitor needs an approved policy first".into(), false),
        RolloutMode::Learn => ("ready for monitor".into(), true),
        RolloutMode::Monitor => {
            let mut blockers = Vec::new();
            if s.audit_events > 0 {
                blockers.push(format!("{} would-deny events in the last 24 h", s.audit_events));
            }
            if s.converged == Some(false) {
                blockers.push("the learning window has not converged".to_owned());
            }
            let age = s.mode_since_unix_ms.map(|t| now - t).unwrap_or(0);
            if blockers.is_empty() {
                (format!("ready for enforce (in monitor for {})", fmt_duration(age)), true)
            } else {
                (format!("check before enforcing: {}", blockers.join("; ")), false)
            }
        }
        RolloutMode::Enforce if s.denied_events > 0 => {
            (format!("enforcing; {} denied connections in the last 24 h", s.denied_events), true)
        }
        RolloutMode::Enforce => ("enforcing".into(), true),
    }
}

async fn rollout_page(
    state: &AppState,
    caller: &Caller,
    notice: Option<String>,
    alert: Option<String>,
    reason_value: String,
    status: StatusCode,
) -> Response {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        tracing::error!(error = %e, "Reading {what} for the rollout page failed.");
        super::error::page(StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable; try again")
    };
    let states = match state.policy.rollout_states().await {
        Ok(s) => s,
        Err(e) => return unavailable("rollout states", &e),
    };
    let enforcers = match state.store.enforcers().await {
        Ok(e) => e,
        Err(e) => return unavailable("enforcers", &e),
    };
    let endpoints = match state.store.endpoints().await {
        Ok(e) => e,
        Err(e) => return unavailable("endpoints", &e),
    };
    let now = unix_ms();
    let by_node: HashMap<&str, &EnforcerRow> = enforcers.iter().map(|e| (e.node_id.as_str(), e)).collect();
    let mut nodes_of: HashMap<Identity, BTreeSet<&str>> = HashMap::new();
    for e in &endpoints {
        nodes_of.entry(e.identity).or_default().insert(e.node_id.as_str());
    }
    let mut groups: BTreeMap<(bool, String), Vec<&RolloutState>> = BTreeMap::new();
    for s in &states {
        let key = match &s.namespace {
            Some(ns) => (false, ns.clone()),
            None => (true, "(no namespace)".to_owned()),
        };
        groups.entry(key).or_default().push(s);
    }
    let groups = groups
        .into_iter()
        .map(|((none, name), members)| {
            let modes: Vec<RolloutMode> = members.iter().map(|s| s.mode).collect();
            let count = |m: RolloutMode| modes.iter().filter(|x| **x == m).count();
            let counts = format!(
                "{} learn, {} monitor, {} enforce",
                count(RolloutMode::Learn),
                count(RolloutMode::Monitor),
                count(RolloutMode::Enforce)
            );
            let workloads = members
                .iter()
                .map(|s| {
                    let (gate, gate_open) = gate(s, now);
                    let enforcers = nodes_of
                        .get(&s.target)
                        .into_iter()
                        .flatten()
                        .map(|node| match by_node.get(node) {
                            Some(e) => EnforcerLine {
                                node: (*node).to_owned(),
                                applied: version(e.applied_version),
                                desired: version(e.desired_version),
                                in_sync: e.in_sync(),
                                rejected: e
                                    .rejected_version
                                    .map(|v| format!("v{v} rejected: {}", e.last_error.as_deref().unwrap_or(""))),
                            },
                            None => EnforcerLine {
                                node: (*node).to_owned(),
                                applied: "no enforcer".into(),
                                desired: "–".into(),
                                in_sync: false,
                                rejected: None,
                            },
                        })
                        .collect();
                    WorkloadLine {
                        target: s.target.0,
                        workload: s.workload.clone(),
                        mode: s.mode.as_str(),
                        in_mode: s.mode_since_unix_ms.map_or_else(|| "never set".to_owned(), |t| fmt_duration(now - t)),
                        changed_by: s.changed_by.clone().unwrap_or_default(),
                        has_policy: s.has_policy,
                        latest_proposal: s.latest_proposal,
                        converged: match s.converged {
                            Some(true) => "yes",
                            Some(false) => "no",
                            None => "–",
                        },
                        audit_events: s.audit_events,
                        denied_events: s.denied_events,
                        gate,
                        gate_open,
                        enforcers,
                        modes: allowed_modes(caller.role, &[s.mode]),
                    }
                })
                .collect();
            NamespaceGroup {
                real: !none,
                modes: if none { Vec::new() } else { allowed_modes(caller.role, &modes) },
                name,
                counts,
                workloads,
            }
        })
        .collect();
    let nodes = enforcers
        .iter()
        .map(|e| NodeLine {
            node: e.node_id.clone(),
            agent: e.agent_version.clone().unwrap_or_else(|| "–".into()),
            desired: version(e.desired_version),
            applied: version(e.applied_version),
            in_sync: e.in_sync(),
            rejected: e.rejected_version.map(|v| format!("v{v}: {}", e.last_error.as_deref().unwrap_or(""))),
            last_seen: fmt_opt_time(e.last_seen_unix_ms),
            lost: e.loss.ringbuf_dropped.saturating_add(e.loss.queue_dropped),
        })
        .collect();
    let page = RolloutPage {
        chrome: Chrome::new(caller, "/rollout"),
        gate_hours: GATE_WINDOW_MS / 3_600_000,
        groups,
        nodes,
        notice,
        alert,
        can_force: caller.may(Role::Approver),
        reason_value,
    };
    render_status(status, &page)
}

/// GET /rollout.
pub async fn page(caller: Viewer, State(state): State<AppState>, Query(q): Query<RolloutParams>) -> Response {
    let notice = match (q.changed, q.mode.as_deref().and_then(mode_of)) {
        (Some(n), Some(m)) => Some(format!("Set {n} workload(s) to {}.", m.as_str())),
        _ => None,
    };
    rollout_page(&state, &caller, notice, None, String::new(), StatusCode::OK).await
}

/// POST /rollout (analysts and up; entering or leaving enforce needs an approver, which
/// `set_rollout` checks). Fields: `target` (identity) or `namespace`, `mode`, `reason`,
/// `force` (approvers: skip the monitor gate).
pub async fn submit(caller: Analyst, State(state): State<AppState>, body: Bytes) -> Response {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let field = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.trim()).filter(|v| !v.is_empty());
    let reason: String = field("reason").unwrap_or_default().chars().take(MAX_REASON_CHARS).collect();
    let bad = StatusCode::BAD_REQUEST;
    let Some(mode) = field("mode").and_then(mode_of) else {
        let msg = Some("Choose a mode: learn, monitor or enforce.".to_owned());
        return rollout_page(&state, &caller, None, msg, reason, bad).await;
    };
    let target = match field("target").map(str::parse::<u32>) {
        None => None,
        Some(Ok(t)) => Some(Identity(t)),
        Some(Err(_)) => {
            let msg = Some("The workload is not an identity number.".to_owned());
            return rollout_page(&state, &caller, None, msg, reason, bad).await;
        }
    };
    let namespace = field("namespace").map(str::to_owned);
    if target.is_some() == namespace.is_some() {
        let msg = Some("Change one workload or one namespace.".to_owned());
        return rollout_page(&state, &caller, None, msg, reason, bad).await;
    }
    let force = field("force").is_some();
    let req = RolloutRequest { target, namespace, mode, reason: reason.clone(), force };
    match state.policy.set_rollout(&req, caller.role, caller.actor(), unix_ms()).await {
        Ok(changes) => {
            let to = format!("/rollout?{}", query(&[("changed", &changes.len().to_string()), ("mode", mode.as_str())]));
            redirect_see_other(&to)
        }
        Err(e) => {
            let (status, msg) = match &e {
                PolicyError::Forbidden { needed } => (
                    StatusCode::FORBIDDEN,
                    format!("Moving workloads into or out of enforce needs the {} role.", needed.as_str()),
                ),
                PolicyError::Gate { reason, .. } => (StatusCode::CONFLICT, format!("Gate not met: {reason}.")),
                PolicyError::InvalidRequest { reason } => (StatusCode::BAD_REQUEST, reason.clone()),
                other => {
                    tracing::error!(error = %other, "Changing a rollout mode failed.");
                    (StatusCode::SERVICE_UNAVAILABLE, "The store is unavailable; nothing was changed.".to_owned())
                }
            };
            rollout_page(&state, &caller, None, Some(msg), reason, status).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_offered_follow_the_role() {
        use RolloutMode::*;
        assert!(allowed_modes(Role::Viewer, &[Learn]).is_empty());
        assert_eq!(allowed_modes(Role::Analyst, &[Learn]), ["learn", "monitor"]);
        assert!(allowed_modes(Role::Analyst, &[Enforce]).is_empty(), "leaving enforce is an approver's call");
        assert_eq!(allowed_modes(Role::Analyst, &[Learn, Enforce]), Vec::<&str>::new());
        assert_eq!(allowed_modes(Role::Approver, &[Monitor]), ["learn", "monitor", "enforce"]);
        assert_eq!(mode_of("monitor"), Some(Monitor));
        assert_eq!(mode_of("Monitor"), None);
    }
}
