//! `bulkhead-collector`: observes every connection of the node's workloads in the
//! kernel (eBPF), aggregates them per flush interval and streams flow batches to the
//! learner, spooling to disk while the learner is unreachable.

pub mod datapath;
pub mod endpoints;
pub mod event;
pub mod seed;
