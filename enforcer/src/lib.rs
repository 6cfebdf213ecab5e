//! `bulkhead-enforcer`: enforces approved identity-based policy in the kernel
//! (DESIGN.md §5). [`datapath`] loads, pins and drives the eBPF verdict programs;
//! the PolicyStream client that feeds it from the learner comes next (issue 4).
#![deny(unsafe_code)]

#[expect(unsafe_code, reason = "sysconf/setrlimit and decoding ring-buffer records need unsafe")]
pub mod datapath;
pub mod render;

pub use render::{Capacity, IpcachePrefix, MapOp, MapState, RenderError, diff, render, render_with};
