//! Test fixtures shared by Bulkhead's test suites: network namespaces, veth links and
//! cgroups with unique per-run names that are removed on drop (even when a test
//! panics), a throwaway PostgreSQL database, a real Kubernetes API server, a small tmpfs
//! (a real full disk), and
//! `assert_eventually!`.

pub mod benchmarks;
pub mod cgroup;
pub mod dns;
pub mod eventually;
pub mod kube;
pub mod netns;
pub mod postgres;
pub mod tmpfs;

pub use netns::{require_root, unique_suffix};

/// An error and all its causes, `: `-separated: what a test prints when a fixture or
/// the code under test fails (transport and loader errors say little on their own).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
