//! `bulkhead-learner`: the control plane. Ingests flow batches over gRPC, resolves
//! workload identities, keeps the service graph in SQLite or Postgres and serves the
//! `/api/v1` JSON API.
#![forbid(unsafe_code)]

pub mod auth;
pub mod certs;
pub mod distribute;
pub mod export;
pub mod grpc;
pub mod identity;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod store;
pub mod web;
