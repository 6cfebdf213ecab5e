//! HTTP: the `/api/v1` JSON API (the CLI and, later, the UI use it). Built in one
//! place by [`router`] and tested with `oneshot`.

pub mod api;
pub mod policy;

use axum::Router;

use crate::policy::PolicyService;
use crate::store::Store;

/// Everything handlers need.
#[derive(Debug, Clone)]
pub struct AppState {
    pub store: Store,
    pub policy: PolicyService,
}

impl AppState {
    /// State over `store` with default policy settings and no inventory (tests).
    pub fn for_store(store: Store) -> Self {
        let policy = PolicyService::new(store.clone(), Default::default(), Default::default());
        Self { store, policy }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .nest("/api/v1", api::routes().merge(policy::routes()))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .with_state(state)
}
