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
