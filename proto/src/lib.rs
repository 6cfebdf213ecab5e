//! The `bulkhead.v1` wire API shared by agents and the learner: protobuf messages
//! (prost) and gRPC services (tonic). Domain logic never uses these types directly;
//! `bulkhead-model` converts them at the boundary with validation.

/// `package bulkhead.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all, missing_debug_implementations)]
    tonic::include_proto!("bulkhead.v1");
}

#[cfg(feature = "tls")]
pub mod tls;
