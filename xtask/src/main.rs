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
//! - `demo`: the whole pipeline on this host (see `demo.rs`).
//!
//! Everything is plain `std::process::Command`: each step prints what it runs.

#![forbid(unsafe_code)]

mod browser;
mod demo;
mod kube;
mod postgres;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Bulkhead developer commands.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install and check everything the build and the tests need (root; idempotent).
    Setup,
    /// Set up, then run fmt, clippy (host + eBPF) and all tests as root.
    Test(test::TestArgs),
    /// What CI runs (`.ci/run`): currently the same as `test`.
    Ci,
    /// Set up and start PostgreSQL, then print `export …` lines for running `cargo test`
    /// by hand: `eval "$(cargo xtask env)"`.
    Env,
    /// Only the browser-test tooling (apt packages incl. chromium, Node.js, the pinned
    /// playwright-core), then its `export` lines: `eval "$(cargo xtask browser-setup)"`.
    BrowserSetup,
    /// The whole pipeline on this host: workloads in network namespaces, learner on
    /// SQLite, collector, real traffic, then the learned graph.
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::ensure_all().map(|_| ExitCode::SUCCESS),
        Cmd::Test(args) => test::run(&args),
        Cmd::Ci => test::run_ci(),
        Cmd::Env => test::print_env(),
        Cmd::BrowserSetup => browser::setup_and_print_env().map(|()| ExitCode::SUCCESS),
        Cmd::Demo(args) => demo::run(&args).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
