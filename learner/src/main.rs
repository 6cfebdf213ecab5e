//! `bulkhead-learner`: the control plane process, plus a few administrative
//! subcommands that work on its store directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bulkhead_learner::grpc::ingest::{Enrollment, unix_ms};
use bulkhead_learner::server::{self, ServerConfig};
use bulkhead_learner::store::Store;
use clap::{Parser, Subcommand};

/// Bulkhead learner: flow ingest, identities, service graph and API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Store URL: `sqlite://FILE` (created if missing) or `postgres://USER:PASS@HOST/DB`.
    #[arg(long, env = "BULKHEAD_DB", default_value = "sqlite:///var/lib/bulkhead/learner.db", global = true)]
    db: String,
    /// Log format: plain or json.
    #[arg(long, env = "BULKHEAD_LOG_FORMAT", default_value = "plain", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// gRPC listen address for agents.
    #[arg(long, env = "BULKHEAD_GRPC_LISTEN", default_value = "127.0.0.1:7400")]
    grpc_listen: SocketAddr,
    /// HTTP listen address for the API.
    #[arg(long, env = "BULKHEAD_HTTP_LISTEN", default_value = "127.0.0.1:7480")]
    http_listen: SocketAddr,
    /// Inventory file (YAML) labelling workloads by netns, cgroup, process, IP or CIDR.
    #[arg(long, env = "BULKHEAD_INVENTORY")]
    inventory: Option<PathBuf>,
    /// Whether unknown nodes may enroll by connecting.
    #[arg(long, env = "BULKHEAD_ENROLLMENT", value_enum, default_value = "open")]
    enrollment: Enrollment,
    /// Largest flow batch accepted, in bytes.
    #[arg(long, env = "BULKHEAD_MAX_BATCH_BYTES", default_value_t = 4 << 20)]
    max_batch_bytes: usize,
    /// How long recorded flows are kept, in hours (the graph's edges are kept).
    #[arg(long, env = "BULKHEAD_FLOW_RETENTION_HOURS", default_value_t = 24)]
    flow_retention_hours: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the learner (the default).
    Serve,
    /// Manage enrolled nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Register a node so it may stream under `--enrollment closed`.
    Add { node_id: String },
    /// List nodes.
    List,
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
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format)?;
    match args.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let s = args.serve;
            ensure_sqlite_dir(&args.db)?;
            let running = server::start(ServerConfig {
                db_url: args.db,
                grpc_listen: s.grpc_listen,
                http_listen: s.http_listen,
                inventory: s.inventory,
                enrollment: s.enrollment,
                max_batch_bytes: s.max_batch_bytes,
                flow_retention: Duration::from_secs(s.flow_retention_hours * 3600),
            })
            .await?;
            tokio::select! {
                _ = running.wait() => anyhow::bail!("a server task stopped"),
                _ = tokio::signal::ctrl_c() => tracing::info!("Shutting down."),
            }
            Ok(())
        }
        Command::Node { command } => {
            ensure_sqlite_dir(&args.db)?;
            let store = Store::open(&args.db).await.context("opening the store")?;
            match command {
                NodeCommand::Add { node_id } => {
                    store.register_agent(&node_id, unix_ms()).await.context("registering the node")?;
                    println!("registered node {node_id}");
                }
                NodeCommand::List => {
                    for a in store.agents().await.context("listing nodes")? {
                        println!("{}", serde_json::to_string(&a)?);
                    }
                }
            }
            Ok(())
        }
    }
}

/// SQLite creates the file but not its directory; do that for the default path.
fn ensure_sqlite_dir(url: &str) -> anyhow::Result<()> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let path = std::path::Path::new(path.split('?').next().unwrap_or(path));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    Ok(())
}
