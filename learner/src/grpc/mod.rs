//! gRPC services the learner serves to agents.

pub mod ingest;
pub mod tls;
