//! `/api/v1` for policy learning: proposals (list, show, synthesize, diff, approve,
//! reject), replay ("simulate"), export, the audit log and imported cluster policies.
//!
//! Each handler names its least role (see [`super::auth`]); decisions are recorded
//! under the authenticated caller's name.

use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use bulkhead_model::{Identity, ProposalStatus};
use serde::Deserialize;

use super::AppState;
use super::api::ApiError;
use super::auth::{Analyst, Approver, Viewer};
use crate::grpc::ingest::unix_ms;
use crate::policy::replay::ReplayRequest;
use crate::policy::review::{Against, Approval};
use crate::policy::rollout::RolloutRequest;
use crate::policy::{ExportRequest, PolicyError, SynthesisRequest};
use crate::store::{AuditQuery, MAX_AUDIT_PAGE, MAX_PROPOSAL_PAGE, ProposalQuery};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/proposals", get(list))
        .route("/proposals/synthesize", post(synthesize))
        .route("/proposals/{id}", get(show))
        .route("/proposals/{id}/diff", get(diff))
        .route("/proposals/{id}/approve", post(approve))
        .route("/proposals/{id}/reject", post(reject))
        .route("/simulate", post(simulate))
        .route("/export", get(export))
        .route("/audit", get(audit))
        .route("/cluster-policies", get(cluster_policies))
        .route("/rollout", get(rollout_states).post(set_rollout))
        .route("/enforcers", get(enforcers))
        .route("/verdicts", get(verdicts))
}

impl From<PolicyError> for ApiError {
    fn from(err: PolicyError) -> Self {
        match err {
            PolicyError::Store(e) => e.into(),
            PolicyError::NoSuchProposal { .. } => ApiError::NotFound(err.to_string()),
            PolicyError::Gate { .. } => ApiError::Conflict(err.to_string()),
            PolicyError::Forbidden { .. } => ApiError::Forbidden(err.to_string()),
            PolicyError::Approve(_) | PolicyError::InvalidRequest { .. } => ApiError::BadRequest(err.to_string()),
            PolicyError::Task { .. } => {
                tracing::error!(error = %err, "Policy task failed.");
                ApiError::Unavailable
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    pub status: Option<String>,
    pub target: Option<u32>,
    pub limit: Option<u32>,
    pub before_id: Option<i64>,
}

async fn list(
    _: Viewer,
    State(s): State<AppState>,
    Query(p): Query<ListParams>,
) -> Result<impl IntoResponse, ApiError> {
    let status = p.status.as_deref().map(str::parse::<ProposalStatus>).transpose().map_err(ApiError::BadRequest)?;
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PROPOSAL_PAGE {
        return Err(ApiError::BadRequest(format!("limit must be 1..={MAX_PROPOSAL_PAGE}")));
    }
    let q = ProposalQuery { status, target: p.target.map(Identity), limit, before_id: p.before_id };
    Ok(Json(s.store.proposals(&q).await?))
}

async fn synthesize(
    _: Analyst,
    State(s): State<AppState>,
    Json(req): Json<SynthesisRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.synthesize(&req, unix_ms()).await?))
}

async fn show(_: Viewer, State(s): State<AppState>, Path(id): Path<i64>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.view(id).await?))
}

#[derive(Debug, Deserialize)]
pub struct DiffParams {
    /// `active` (default), `previous`, or a version number.
    pub against: Option<String>,
}

async fn diff(
    _: Viewer,
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Query(p): Query<DiffParams>,
) -> Result<impl IntoResponse, ApiError> {
    let against = match p.against.as_deref().unwrap_or("active") {
        "active" | "deployed" => Against::Active,
        "previous" => Against::Previous,
        v => Against::Version(v.parse().map_err(|_| {
            ApiError::BadRequest(format!("against must be active, previous or a version number, not {v:?}"))
        })?),
    };
    Ok(Json(s.policy.diff(id, against).await?))
}

async fn approve(
    actor: Approver,
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Json(a): Json<Approval>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.approve(id, &a, actor.actor(), unix_ms()).await?))
}

#[derive(Debug, Deserialize)]
pub struct Rejection {
    pub comment: String,
}

async fn reject(
    actor: Analyst,
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Json(r): Json<Rejection>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.reject(id, &r.comment, actor.actor(), unix_ms()).await?))
}

async fn simulate(
    _: Analyst,
    State(s): State<AppState>,
    Json(req): Json<ReplayRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.replay(&req).await?))
}

async fn export(
    _: Viewer,
    State(s): State<AppState>,
    Query(req): Query<ExportRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.export(&req).await?))
}

#[derive(Debug, Deserialize)]
pub struct AuditParams {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub subject: Option<String>,
    pub limit: Option<u32>,
    pub before_id: Option<i64>,
}

async fn audit(
    _: Viewer,
    State(s): State<AppState>,
    Query(p): Query<AuditParams>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_AUDIT_PAGE {
        return Err(ApiError::BadRequest(format!("limit must be 1..={MAX_AUDIT_PAGE}")));
    }
    let q = AuditQuery {
        since_unix_ms: p.since_ms,
        until_unix_ms: p.until_ms,
        actor: p.actor,
        action_prefix: p.action,
        subject: p.subject,
        limit,
        before_id: p.before_id,
    };
    Ok(Json(s.store.audit(&q).await?))
}

async fn cluster_policies(_: Viewer, State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.store.cluster_policies().await?))
}

async fn rollout_states(_: Viewer, State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.rollout_states().await?))
}

async fn set_rollout(
    actor: Analyst,
    State(s): State<AppState>,
    Json(req): Json<RolloutRequest>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.policy.set_rollout(&req, actor.role, actor.actor(), unix_ms()).await?))
}

/// Per node: the policy version the learner wants there and the one it applied.
async fn enforcers(_: Viewer, State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.store.enforcers().await?))
}

#[derive(Debug, Deserialize)]
pub struct VerdictParams {
    pub identity: Option<u32>,
    /// `audit`, `denied` or `forwarded`.
    pub verdict: Option<String>,
    pub node: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: Option<u32>,
    pub before_id: Option<i64>,
}

/// Recent audit and deny events, newest first.
async fn verdicts(
    _: Viewer,
    State(s): State<AppState>,
    Query(p): Query<VerdictParams>,
) -> Result<impl IntoResponse, ApiError> {
    let verdict = match p.verdict.as_deref() {
        None => None,
        Some("audit") => Some(bulkhead_model::Verdict::Audit),
        Some("denied") => Some(bulkhead_model::Verdict::Denied),
        Some("forwarded") => Some(bulkhead_model::Verdict::Forwarded),
        Some(v) => return Err(ApiError::BadRequest(format!("verdict must be audit, denied or forwarded, not {v:?}"))),
    };
    let limit = p.limit.unwrap_or(100);
    if limit == 0 || limit > crate::store::MAX_VERDICT_PAGE {
        return Err(ApiError::BadRequest(format!("limit must be 1..={}", crate::store::MAX_VERDICT_PAGE)));
    }
    let q = crate::store::VerdictQuery {
        since_unix_ms: p.since_ms,
        until_unix_ms: None,
        identity: p.identity.map(Identity),
        verdict,
        node_id: p.node,
        limit,
        before_id: p.before_id,
    };
    Ok(Json(s.store.verdict_events(&q).await?))
}
