//! Bulkhead's developer commands, run as `cargo xtask <command>` (alias in
//! `.cargo/config.toml`).
//!
//! - `setup`: installs what the project needs on a fresh Debian 12 machine (apt
//!   packages, rustup components, bpf-linker built against the toolchain's own LLVM) and
//!   makes the kernel mounts available (bpffs, tracefs, cgroup2), builds the test
//!   kube-apiserver from Debian's source, the kubernetes-validate venv and the browser
//!   tests' playwright-core (`browser.rs`). Idempotent; fast when everything is already
//!   there.
//! - `test`: `setup`, then PostgreSQL for the store tests, then fmt, clippy (host and
//!   eBPF crates) and every test, as root. Ends with the line `N passed, N failed`.
//! - `ci`: what `.ci/run` calls; today the same as `test`.
//! - `env`: `setup` + PostgreSQL, then prints `export …` lines for running single tests
//!   by hand.
//! - `browser-setup`: only the browser-test part of `setup` (apt packages, Node.js,
//!   playwright-core), then `export` lines for `cargo test -p bulkhead-learner --test
//!   browser`: `eval "$(cargo xtask browser-setup)"`.
//! - `demo`: the whole pipeline on this host (see `demo.rs`); `faults.rs` runs the same
//!   pipeline with one fault injected, for the fault tests.
//!
//! Everything is plain `std::process::Command`: each step prints what it runs.

#![forbid(unsafe_code)]

pub mod browser;
pub mod demo;
pub mod faults;
pub mod kube;
pub mod postgres;
pub mod scenario;
pub mod setup;
pub mod test;
pub mod util;
