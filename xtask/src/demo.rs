//! `cargo xtask demo`: the reference scenario (DESIGN.md §9) on this host — set-up,
//! release binaries, then [`scenario::run`] with the demo's fixed names and ports.
//!
//! Fully automatic by default: learning → proposal → approve → monitor (xwing shows
//! as audit) → enforce (xwing dropped, the tie fighter lands), printing each step and
//! its evidence. `--stop-after-learning` stops once the proposal exists and leaves the
//! pipeline running for a person to continue in the UI; `--keep` keeps it running
//! after the automatic run. Everything it creates is named `bh-demo-*` and removed at
//! the end (and at the start, in case an earlier run was killed).

use anyhow::Result;

use crate::scenario::{self, Names, Options, Ports};
use crate::setup;
use crate::util::{self, cargo, repo_root};

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop after learning: the proposal is made, the rest (approve, monitor, enforce)
    /// is yours in the UI. Everything keeps running until Enter is pressed.
    #[arg(long)]
    stop_after_learning: bool,
    /// After the automatic run, keep everything running until Enter is pressed.
    #[arg(long)]
    keep: bool,
    /// How many times the tie fighter lands while Bulkhead learns.
    #[arg(long, default_value_t = 5)]
    landings: u32,
    /// Use the binaries in this directory (e.g. `target/debug`) instead of building
    /// release binaries.
    #[arg(long, value_name = "DIR")]
    bins: Option<std::path::PathBuf>,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let setup = setup::ensure_all()?;
    let path = setup.path_env()?;
    let root = repo_root()?;

    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| root.join("target"));
    let bins = match &args.bins {
        Some(dir) => dir.clone(),
        None => {
            build_release(&root, &path)?;
            target.join("release")
        }
    };
    let report = scenario::run(&Options {
        bins,
        dir: target.join("demo"),
        names: Names::demo(),
        ports: Ports::demo(),
        landings: args.landings,
        pause_after_learning: args.stop_after_learning,
        keep: args.keep,
        overrides: Default::default(),
    })?;
    if !report.paused {
        scenario::step("done");
        println!(
            "[demo] first landing → approvable proposal: {:.1} s; monitor: xwing {:?} ({} audit event(s)); \
             enforce: tiefighter {:?}, xwing {:?} ({} denied event(s)); L7: PUT /v1/exhaust-port {:?} in monitor, \
             {:?} in enforce",
            report.first_connection_to_proposal.as_secs_f64(),
            report.monitor_xwing,
            report.audit_events,
            report.enforce_tiefighter,
            report.enforce_xwing,
            report.denied_events,
            report.monitor_exhaust,
            report.enforce_exhaust
        );
    }
    Ok(())
}

fn build_release(root: &std::path::Path, path: &std::ffi::OsStr) -> Result<()> {
    scenario::step("building release binaries (the first build takes a few minutes)");
    util::run(cargo().current_dir(root).env("PATH", path).args([
        "build",
        "--release",
        "-p",
        "bulkhead-collector",
        "-p",
        "bulkhead-enforcer",
        "-p",
        "bulkhead-learner",
    ]))?;
    Ok(())
}
