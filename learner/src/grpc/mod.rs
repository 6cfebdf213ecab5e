//! gRPC services the learner serves to agents.

pub mod clock;
pub mod ingest;
pub mod tls;
