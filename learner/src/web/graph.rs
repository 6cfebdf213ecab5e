//! Placeholder: `/api/v1/graph` (server-aggregated service graph) is being built.

use axum::Router;

use super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
}
