//! HTTP: the `/api/v1` JSON API (the CLI and, later, the UI use it). Built in one
//! place by [`router`] and tested with `oneshot`.

pub mod api;

use axum::Router;

use crate::store::Store;

/// Everything handlers need.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .nest("/api/v1", api::routes())
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(state)
}
