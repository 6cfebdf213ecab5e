//! `bulkhead-enforcer`: enforces approved policy in the kernel.
//!
//! What exists today is the in-kernel datapath and its loader, as a library
//! (`bulkhead_enforcer::datapath`): cgroup_skb verdict programs with pinned maps
//! (ipcache, double-buffered policy, endpoints with learn/monitor/enforce modes,
//! conntrack, rate-limited audit/deny events, counters), exercised by the root
//! tests in `enforcer/tests/datapath.rs`. What does not exist yet is the
//! PolicyStream client that receives policy from the learner, so the binary
//! refuses to start rather than attach programs with nothing to enforce.
#![forbid(unsafe_code)]

use clap::Parser;

/// Bulkhead enforcer (datapath ready, policy distribution not yet).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!(
        "bulkhead-enforcer cannot run yet: its kernel datapath (cgroup_skb verdicts, pinned maps, \
         monitor/enforce modes, audit events) is built and tested, but the PolicyStream client that \
         would receive policy from the learner is not, so there is nothing to enforce. Programs left \
         pinned under /sys/fs/bpf/bulkhead/ by tests or a future version keep enforcing without it."
    )
}
