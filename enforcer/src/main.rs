//! `bulkhead-enforcer` entry point: configuration and logging, then the agent.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bulkhead_enforcer::datapath::DEFAULT_BPFFS_ROOT;
use bulkhead_enforcer::datapath::EgressCheck;
use bulkhead_proto::tls::AgentTlsArgs;
use clap::{Parser, ValueEnum};

mod agent;

/// Enforces the learner's approved policy in the kernel (eBPF), per workload in
/// monitor or enforce mode, and reports audit/deny verdicts back.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Learner gRPC endpoint: `https://HOST:PORT` with --tls-*, `http://` with
    /// --insecure-grpc.
    #[arg(long, env = "BULKHEAD_LEARNER", default_value = "https://127.0.0.1:7400")]
    pub learner: String,
    /// Name of this node as the learner knows it (default: the node its certificate
    /// names, else the hostname; must match the collector's).
    #[arg(long, env = "BULKHEAD_NODE_ID")]
    pub node_id: Option<String>,
    #[command(flatten)]
    pub tls: AgentTlsArgs,
    /// Name of this enforcer's pinned maps and links under --bpffs-root. A restarted
    /// or upgraded enforcer with the same instance adopts them without a gap.
    #[arg(long, env = "BULKHEAD_ENFORCER_INSTANCE", default_value = "enforcer")]
    pub instance: String,
    /// Where instances pin their maps and links.
    #[arg(long, env = "BULKHEAD_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// cgroup v2 directory the verdict programs attach to; every workload cgroup
    /// below it can be managed.
    #[arg(long, env = "BULKHEAD_CGROUP", default_value = "/sys/fs/cgroup")]
    pub cgroup: PathBuf,
    /// Directory for the applied-version record (per instance).
    #[arg(long, env = "BULKHEAD_ENFORCER_STATE_DIR", default_value = "/var/lib/bulkhead/enforcer")]
    pub state_dir: PathBuf,
    /// What monitor-mode workloads get when the enforcer's own state is broken:
    /// open (pass, the default: monitor promises never to drop) or closed.
    #[arg(long, env = "BULKHEAD_FAIL_MONITOR", value_enum, default_value_t = FailMode::Open)]
    pub fail_monitor: FailMode,
    /// The same for enforce-mode workloads: closed (the default: an enforced workload
    /// must not become reachable because the enforcer broke) or open.
    #[arg(long, env = "BULKHEAD_FAIL_ENFORCE", value_enum, default_value_t = FailMode::Closed)]
    pub fail_enforce: FailMode,
    /// Where the egress of cgroup workloads is judged: `connect` (once per
    /// connection at connect()/sendmsg(), raw IP sockets refused to enforced
    /// workloads whose egress is covered; the default) or `packet` (every egress
    /// packet: a revoked connection cannot send another byte, at twice the
    /// per-packet program runs).
    #[arg(long, env = "BULKHEAD_EGRESS_CHECK", default_value = "connect")]
    pub egress_check: EgressCheck,
    /// Verdict events per second per CPU the kernel reports after the burst; the
    /// rest are counted as rate-limited.
    #[arg(long, env = "BULKHEAD_EVENT_RATE", default_value_t = bulkhead_abi::enforcer::DEFAULT_EVENT_RATE)]
    pub event_rate: u32,
    /// Verdict events per CPU reported back to back.
    #[arg(long, env = "BULKHEAD_EVENT_BURST", default_value_t = bulkhead_abi::enforcer::DEFAULT_EVENT_BURST)]
    pub event_burst: u32,
    /// How often the kernel's verdict ring buffer is drained (no per-event wakeups).
    #[arg(long, env = "BULKHEAD_POLL_INTERVAL", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
    /// How often verdicts and rule counters are reported to the learner.
    #[arg(long, env = "BULKHEAD_REPORT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,
    /// Longest wait between reconnection attempts.
    #[arg(long, env = "BULKHEAD_MAX_BACKOFF", default_value = "5s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
    /// Policy map entries (two generations live in it while one is replaced).
    #[arg(long, env = "BULKHEAD_POLICY_ENTRIES", default_value_t = bulkhead_abi::enforcer::DEFAULT_POLICY_ENTRIES)]
    pub policy_entries: u32,
    /// Prometheus metrics listen address (port 0: any free port, logged).
    #[arg(long, env = "BULKHEAD_METRICS_LISTEN", default_value = "127.0.0.1:7402")]
    pub metrics_listen: std::net::SocketAddr,
    /// Log format: plain or json.
    #[arg(long, env = "BULKHEAD_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
}

/// Fail-open or fail-closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailMode {
    Open,
    Closed,
}

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "plain" => builder.init(),
        other => anyhow::bail!("unknown log format {other:?}: use plain or json"),
    }
    Ok(())
}

// One thread for the stream and timers; the map owner has its own (its map
// walks and writes are blocking syscalls).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    init_logging(&args.log_format)?;
    // Before the datapath is touched: a wrong or missing TLS setup stops the agent here.
    let transport = args.tls.transport(&args.learner).context("configuring the connection to the learner")?;
    args.node_id = transport.node_id(args.node_id.as_deref())?;
    transport.log(&args.learner);
    agent::run(args, transport).await
}
