//! `bulkhead-enforcer`: enforces approved policy in the kernel. The datapath arrives
//! with the enforcement work (issue 4); until then the binary says so instead of
//! pretending to enforce anything.
#![forbid(unsafe_code)]

use clap::Parser;

/// Bulkhead enforcer (not yet available).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("bulkhead-enforcer does not enforce anything yet: run the collector and learner to learn policy")
}
