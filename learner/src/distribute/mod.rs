//! Distribution: the approved policy set compiled into per-node rule sets
//! ([`compile`]) and streamed to the enforcers as versioned snapshots (DESIGN.md §4
//! "Distribution"). The compilation is pure; [`stream`] moves data: it gathers the
//! inputs from the store, publishes one snapshot per node and serves `PolicyStream`.

pub mod compile;
pub mod record;
pub mod stream;

pub use compile::{CompileError, CompileInput, SourcePolicy, compile};
pub use record::Recorder;
pub use stream::{DistributeError, Distributor, NodeStatus, PolicyStreamService, SyncSummary};

#[cfg(test)]
mod tests;
