//! The reference scenario (DESIGN.md §9) end to end, as root, with the real binaries:
//! learner (SQLite), collector and enforcer; deathstar, tiefighter and xwing as network
//! namespaces with a real HTTP server and clients. The same code as `cargo xtask demo`
//! (`xtask::scenario`), with this run's own names and ports.
//!
//! The scenario checks each step itself (and fails naming the step); this test also
//! asserts what it reports, so a scenario that stopped checking would still fail here.
//!
//! The binaries come from the target directory: `cargo xtask test` builds them before
//! `cargo test`; by hand, `cargo build --bins` first.

use std::path::PathBuf;

use bulkhead_testkit::netns::{require_root, unique_suffix};
use xtask::scenario::{self, Names, Options, Ports};

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target"))
}

#[test]
fn reference_scenario_learn_propose_approve_monitor_enforce() {
    require_root();
    let suffix = unique_suffix();
    let target = target_dir();
    let opts = Options {
        bins: target.join("debug"),
        dir: target.join("tmp").join(format!("scenario-{suffix}")),
        names: Names { prefix: "bh".into(), suffix: suffix.clone(), enforcer_instance: format!("test-{suffix}") },
        ports: Ports::free().expect("free ports"),
        landings: 3,
        pause_after_learning: false,
        keep: false,
        overrides: Default::default(),
    };
    let report = scenario::run(&opts).unwrap_or_else(|e| panic!("the reference scenario failed: {e:#}"));

    assert!(!report.paused);
    assert!(report.proposal_text.contains("class=tiefighter"), "{}", report.proposal_text);
    assert!(!report.proposal_text.contains("xwing"), "{}", report.proposal_text);
    assert_eq!(report.monitor_xwing, "Ship landed", "monitor drops nothing");
    assert!(report.audit_events >= 1, "xwing's landing is reported as audit in monitor mode");
    assert_eq!(report.enforce_tiefighter, "Ship landed", "the allowed ship still lands when enforcing");
    assert!(report.enforce_xwing.starts_with("request failed"), "xwing is dropped: {}", report.enforce_xwing);
    assert!(report.denied_events >= 1, "xwing's attempt is reported as denied");
    // L7: the tie fighter's PUT passes (and is audited) in monitor, is dropped in enforce.
    assert!(report.monitor_exhaust.starts_with("HTTP 503"), "{}", report.monitor_exhaust);
    assert!(report.http_audit_events >= 1);
    assert!(report.enforce_exhaust.starts_with("request failed"), "{}", report.enforce_exhaust);
    // One PUT, one event, however often TCP retransmitted the dropped segment.
    assert_eq!(report.http_denied_events, 1);
    println!("HTTP audit events for the one PUT in monitor mode: {}", report.http_audit_events);
    println!("first connection → approvable proposal: {:?}", report.first_connection_to_proposal);
    let _ = std::fs::remove_dir_all(&opts.dir);
}
