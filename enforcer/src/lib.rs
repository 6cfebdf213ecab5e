//! `bulkhead-enforcer`: enforces approved identity-based policy in the kernel
//! (DESIGN.md §5). [`datapath`] loads, pins and drives the eBPF verdict programs;
//! [`render`] is the pure policy → map-entries core; [`owner`] is the one owner of
//! the maps that applies learner snapshots and turns verdicts into reports; the
//! binary's PolicyStream client feeds it.
#![deny(unsafe_code)]

pub mod applied;
#[expect(unsafe_code, reason = "sysconf/setrlimit and decoding ring-buffer records need unsafe")]
pub mod datapath;
pub mod metrics;
pub mod owner;
pub mod render;

pub use render::{
    Capacity, IpcachePrefix, MapOp, MapState, RenderError, diff, netns_workloads, render, render_resolved, render_with,
};
