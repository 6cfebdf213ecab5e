//! `cargo xtask …`: the command line over the `xtask` library (see its crate docs).

#![forbid(unsafe_code)]

use xtask::{browser, demo, setup, test};

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
