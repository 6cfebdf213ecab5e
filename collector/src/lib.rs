//! `bulkhead-collector`: observes every connection of the node's workloads in the
//! kernel (eBPF), aggregates them per flush interval and streams flow batches to the
//! learner, spooling to disk while the learner is unreachable.

pub mod aggregate;
pub mod datapath;
pub mod endpoints;
pub mod event;
pub mod metrics;
pub mod seed;
pub mod ship;
pub mod spool;
