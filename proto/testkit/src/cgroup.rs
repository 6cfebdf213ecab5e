//! cgroup fixtures.
