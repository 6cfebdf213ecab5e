//! Fault tests of the whole pipeline, as root, with the real binaries (learner,
//! collector, enforcer over mTLS) and the reference scenario's workloads in network
//! namespaces: one fault per test (`xtask::faults` says what each checks). Each run has
//! its own names, ports, cgroup and pins, removed even when it fails.
//!
//! The binaries come from the target directory: `cargo xtask test` builds them before
//! `cargo test`; by hand, `cargo build --bins` first.

use std::path::PathBuf;

use bulkhead_testkit::netns::{require_root, unique_suffix};
use xtask::faults::{self, Fault};
use xtask::scenario::{Names, Options, Overrides, Ports};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target"))
}

fn options(overrides: Overrides) -> Options {
    let suffix = unique_suffix();
    let target = target_dir();
    Options {
        bins: target.join("debug"),
        dir: target.join("tmp").join(format!("fault-{suffix}")),
        names: Names { prefix: "bh".into(), suffix: suffix.clone(), enforcer_instance: format!("test-{suffix}") },
        ports: Ports::free().expect("free ports"),
        landings: 3,
        pause_after_learning: false,
        keep: false,
        overrides,
    }
}

fn run(fault: Fault, overrides: Overrides) {
    require_root();
    let opts = options(overrides);
    faults::run(&fault, &opts).unwrap_or_else(|e| panic!("fault {fault:?}: {e:#}"));
    let _ = std::fs::remove_dir_all(&opts.dir);
}

#[test]
fn learner_killed_during_ingest_and_during_a_rollout() {
    run(Fault::LearnerKilled, Overrides::default());
}

#[test]
fn enforcer_killed_during_a_policy_update() {
    run(Fault::EnforcerKilled, Overrides::default());
}

#[test]
fn database_unavailable_for_a_while() {
    let db = bulkhead_testkit::postgres::fresh_database_blocking();
    let fault = Fault::DatabaseUnavailable { admin_url: db.admin_url().to_owned(), database: db.name().to_owned() };
    run(fault, Overrides { db_url: Some(db.url().to_owned()), ..Overrides::default() });
}

#[test]
fn disk_full_spool() {
    require_root();
    let fs = bulkhead_testkit::tmpfs::Tmpfs::mount(32 << 10);
    run(Fault::DiskFullSpool, Overrides { spool_dir: Some(fs.path().to_owned()), ..Overrides::default() });
}

#[test]
fn clock_skew_between_node_and_learner() {
    const OFFSET_MS: i64 = 2 * 3_600_000;
    let env = faults::clock_skew_env(OFFSET_MS);
    run(Fault::ClockSkew { offset_ms: OFFSET_MS }, Overrides { agent_env: env, ..Overrides::default() });
}
