//! `bulkhead-collector` entry point: configuration and logging, then the agent loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bulkhead_proto::tls::AgentTlsArgs;
use clap::Parser;

mod agent;

/// Observes the node's connections with eBPF and streams flows to the learner.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Learner gRPC endpoint: `https://HOST:PORT` with --tls-*, `http://` with
    /// --insecure-grpc.
    #[arg(long, env = "BULKHEAD_LEARNER", default_value = "https://127.0.0.1:7400")]
    pub learner: String,
    /// Name of this node as the learner knows it (default: the node its certificate
    /// names, else the hostname).
    #[arg(long, env = "BULKHEAD_NODE_ID")]
    pub node_id: Option<String>,
    #[command(flatten)]
    pub tls: AgentTlsArgs,
    /// Directory of the on-disk spool of undelivered batches.
    #[arg(long, env = "BULKHEAD_SPOOL_DIR", default_value = "/var/lib/bulkhead/spool")]
    pub spool_dir: PathBuf,
    /// Most bytes the spool may hold before the oldest batches are evicted (and counted as lost).
    #[arg(long, env = "BULKHEAD_SPOOL_MAX_BYTES", default_value_t = 256 << 20)]
    pub spool_max_bytes: u64,
    /// How often aggregated flows are cut into a batch.
    #[arg(long, env = "BULKHEAD_FLUSH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub flush_interval: Duration,
    /// How often the kernel ring buffer is drained (no per-event wakeups).
    #[arg(long, env = "BULKHEAD_POLL_INTERVAL", default_value = "10ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// How often network namespaces and their addresses are rescanned.
    #[arg(long, env = "BULKHEAD_ENDPOINT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub endpoint_interval: Duration,
    /// Most flows per batch (larger intervals are split).
    #[arg(long, env = "BULKHEAD_MAX_BATCH_FLOWS", default_value_t = 5000)]
    pub max_batch_flows: usize,
    /// Also observe the node's own network namespace (off by default: it carries the
    /// agents' own traffic to the learner).
    #[arg(long, env = "BULKHEAD_OBSERVE_HOST")]
    pub observe_host: bool,
    /// Observe only these named network namespaces (names under /var/run/netns),
    /// instead of every namespace but the host's. Comma-separated or repeated.
    #[arg(long = "netns", env = "BULKHEAD_NETNS", value_delimiter = ',')]
    pub netns: Vec<String>,
    /// Size of the kernel's socket-event ring buffer (a power of two). Its job is to
    /// absorb stalls of the agent: 8 MiB holds about a second of events at 14k new
    /// connections/s. Overflow is counted as `ringbuf_dropped`.
    #[arg(long, env = "BULKHEAD_RINGBUF_BYTES", default_value_t = bulkhead_abi::collector::DEFAULT_FLOW_EVENTS_BYTES)]
    pub ringbuf_bytes: u32,
    /// Prometheus metrics listen address.
    #[arg(long, env = "BULKHEAD_METRICS_LISTEN", default_value = "127.0.0.1:7401")]
    pub metrics_listen: SocketAddr,
    /// Log format: plain or json.
    #[arg(long, env = "BULKHEAD_LOG_FORMAT", default_value = "plain")]
    pub log_format: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map(|i| s.split_at(i)).unwrap_or((s, "s"));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 1s, 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    }
}

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BULKHEAD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "plain" => builder.init(),
        other => anyhow::bail!("unknown log format {other:?}: use plain or json"),
    }
    // tracing-subscriber's init() also bridges `log` records (aya's) into tracing.
    Ok(())
}

// One thread: the agent's work is a poll loop, a small gRPC stream and a metrics
// endpoint; a multi-threaded runtime only added wake-ups and context switches.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    init_logging(&args.log_format)?;
    // Before anything is loaded: a wrong or missing TLS setup stops the agent here.
    let transport = args.tls.transport(&args.learner).context("configuring the connection to the learner")?;
    args.node_id = transport.node_id(args.node_id.as_deref())?;
    transport.log(&args.learner);
    agent::run(args, transport).await
}
