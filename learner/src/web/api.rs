//! `/api/v1` JSON endpoints over the store. No SQL here: handlers parse the query,
//! call one store method and serialise its rows.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bulkhead_model::Identity;
use serde::Deserialize;

use super::AppState;
use super::auth::Viewer;
use crate::store::{EdgeQuery, FlowQuery, StoreError};

/// Largest page the API serves.
pub const MAX_LIMIT: u32 = 10_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/edges", get(edges))
        .route("/flows", get(flows))
        .route("/identities", get(identities))
        .route("/endpoints", get(endpoints))
        .route("/agents", get(agents))
        .route("/dns", get(dns))
}

/// API errors: a status and a message safe to show; internals go to the log.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    NotFound(String),
    /// The caller's role is too weak for this particular change.
    Forbidden(String),
    /// The request conflicts with the current state (e.g. deciding a decided proposal).
    Conflict(String),
    Unavailable,
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            // Conditions the caller can act on: said as they are.
            StoreError::ProposalNotFound { .. } | StoreError::UnknownIdentity { .. } => {
                ApiError::NotFound(err.to_string())
            }
            StoreError::InvalidTransition { .. } => ApiError::Conflict(err.to_string()),
            StoreError::CommentRequired { .. } | StoreError::MissingField { .. } => {
                ApiError::BadRequest(err.to_string())
            }
            _ => {
                tracing::error!(error = %err, "Store query failed.");
                ApiError::Unavailable
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, msg) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "the store is unavailable".to_owned()),
        };
        (status, Json(serde_json::json!({ "error": msg }))).into_response()
    }
}

#[derive(Debug, Deserialize)]
pub struct EdgeParams {
    pub since_ms: Option<i64>,
    pub identity: Option<u32>,
    pub limit: Option<u32>,
}

async fn edges(
    _: Viewer,
    State(s): State<AppState>,
    Query(p): Query<EdgeParams>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = check_limit(p.limit)?;
    let q = EdgeQuery { since_unix_ms: p.since_ms, identity: p.identity.map(Identity), limit };
    Ok(Json(s.store.edges(&q).await?))
}

#[derive(Debug, Deserialize)]
pub struct FlowParams {
    pub since_ms: Option<i64>,
    pub node: Option<String>,
    pub identity: Option<u32>,
    pub port: Option<u16>,
    pub limit: Option<u32>,
    /// Keyset pagination: only flows with a smaller id.
    pub before: Option<i64>,
}

async fn flows(
    _: Viewer,
    State(s): State<AppState>,
    Query(p): Query<FlowParams>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = check_limit(p.limit)?.unwrap_or(100);
    let q = FlowQuery {
        since_unix_ms: p.since_ms,
        until_unix_ms: None,
        node_id: p.node,
        identity: p.identity.map(Identity),
        dst_port: p.port,
        limit,
        before_id: p.before,
    };
    Ok(Json(s.store.flows(&q).await?))
}

async fn identities(_: Viewer, State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.store.identities().await?))
}

async fn endpoints(_: Viewer, State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.store.endpoints().await?))
}

async fn agents(_: Viewer, State(s): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.store.agents().await?))
}

#[derive(Debug, Deserialize)]
pub struct DnsParams {
    /// Only answers seen since this time (Unix ms); default: all retained.
    pub since_ms: Option<i64>,
}

/// DNS answers workloads received (name → address, TTL): the raw material for FQDN
/// egress rules.
async fn dns(_: Viewer, State(s): State<AppState>, Query(p): Query<DnsParams>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.store.dns_answers(p.since_ms.unwrap_or(0)).await?))
}

fn check_limit(limit: Option<u32>) -> Result<Option<u32>, ApiError> {
    match limit {
        Some(0) => Err(ApiError::BadRequest("limit must be at least 1".into())),
        Some(n) if n > MAX_LIMIT => Err(ApiError::BadRequest(format!("limit must be at most {MAX_LIMIT}"))),
        other => Ok(other),
    }
}
