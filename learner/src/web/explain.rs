//! `GET /api/v1/explain`: why a connection is (or would be) allowed, audited or
//! dropped. The answer is built by [`crate::policy::explain`]; this handler only turns
//! the query string into a question, and every mistake in it into a 400 or 404 that
//! says what to fix — never a 500.
//!
//! ```text
//! /api/v1/explain?flow=12345
//! /api/v1/explain?from=tiefighter&to=default/deathstar&port=80[&proto=tcp][&at_ms=…][&method=POST&path=/v1/x]
//! ```
//!
//! Parameters arrive as text and are parsed here (not by the `Query` extractor), so a
//! bad port or id is answered in the API's JSON error shape with the parameter named.

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use bulkhead_model::Protocol;
use bulkhead_model::policy::{validate_method, validate_path};
use serde::Deserialize;

use super::AppState;
use super::api::ApiError;
use super::auth::Viewer;
use crate::grpc::ingest::unix_ms;
use crate::policy::explain::{ExplainError, ExplainRequest, ExplainTarget, HttpRequest};

pub fn routes() -> Router<AppState> {
    Router::new().route("/explain", get(explain))
}

impl From<ExplainError> for ApiError {
    fn from(err: ExplainError) -> Self {
        match err {
            ExplainError::Store(e) => e.into(),
            ExplainError::NoSuchFlow { .. } | ExplainError::UnknownEndpoint { .. } => {
                ApiError::NotFound(err.to_string())
            }
            ExplainError::Ambiguous { .. } | ExplainError::Invalid { .. } => ApiError::BadRequest(err.to_string()),
        }
    }
}

/// The query string, unparsed.
#[derive(Debug, Default, Deserialize)]
pub struct ExplainParams {
    /// A recorded flow's id; or `from`, `to` and `port`.
    pub flow: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub port: Option<String>,
    /// `tcp` (default) or `udp`.
    pub proto: Option<String>,
    /// The moment asked about, Unix ms.
    pub at_ms: Option<String>,
    /// An HTTP request to judge L7 rules by: both or neither.
    pub method: Option<String>,
    pub path: Option<String>,
}

async fn explain(
    _: Viewer,
    State(s): State<AppState>,
    Query(p): Query<ExplainParams>,
) -> Result<impl IntoResponse, ApiError> {
    let req = request(p)?;
    Ok(Json(s.policy.explain(&req, unix_ms()).await?))
}

/// The question the parameters ask, or why they ask none.
pub fn request(p: ExplainParams) -> Result<ExplainRequest, ApiError> {
    let bad = |m: String| Err(ApiError::BadRequest(m));
    let given = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.trim().is_empty());
    let target = match (&p.flow, given(&p.from) || given(&p.to) || given(&p.port) || given(&p.proto)) {
        (Some(_), true) => return bad("give a flow id or from/to/port, not both".into()),
        (Some(id), false) => match id.trim().parse::<i64>() {
            Ok(id) if id > 0 => ExplainTarget::Flow { id },
            _ => return bad(format!("flow must be a flow id (a positive number), not {id:?}")),
        },
        (None, _) => {
            let (Some(from), Some(to)) =
                (p.from.filter(|s| !s.trim().is_empty()), p.to.filter(|s| !s.trim().is_empty()))
            else {
                return bad("give a flow id (flow=N), or from, to and port".into());
            };
            let Some(port) = p.port.as_deref() else { return bad("port is required with from and to".into()) };
            let port = match port.trim().parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return bad(format!("port must be a number 1–65535, not {port:?}")),
            };
            let protocol = match p.proto.as_deref().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                None | Some("") | Some("tcp") | Some("6") => Protocol::Tcp,
                Some("udp") | Some("17") => Protocol::Udp,
                Some(other) => return bad(format!("proto must be tcp or udp, not {other:?}")),
            };
            ExplainTarget::Tuple { from, to, port, protocol }
        }
    };
    let at_unix_ms = match p.at_ms.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<i64>() {
            Ok(ms) if ms >= 0 => Some(ms),
            _ => return bad(format!("at_ms must be a Unix time in milliseconds, not {s:?}")),
        },
    };
    let request = match (p.method, p.path) {
        (None, None) => None,
        (Some(method), Some(path)) => {
            if let Err(e) = validate_method(&method) {
                return bad(format!("method: {e}"));
            }
            if let Err(e) = validate_path(&path) {
                return bad(format!("path: {e}"));
            }
            Some(HttpRequest { method, path })
        }
        _ => return bad("give both method and path of the HTTP request, or neither".into()),
    };
    Ok(ExplainRequest { target, at_unix_ms, request })
}
