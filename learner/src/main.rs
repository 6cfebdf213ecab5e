//! `bulkhead-learner`: the control plane process, plus a few administrative
//! subcommands that work on its store directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bulkhead_learner::auth::{self, Role};
use bulkhead_learner::grpc::ingest::{Enrollment, unix_ms};
use bulkhead_learner::identity::kube::KubeConfigSource;
use bulkhead_learner::policy::PolicyConfig;
use bulkhead_learner::policy::risk::RiskConfig;
use bulkhead_learner::server::{self, ServerConfig};
use bulkhead_learner::store::Store;
use bulkhead_learner::web::AuthConfig;
use bulkhead_proto::tls::ServerTlsArgs;
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
    /// HTTP listen address for the UI and the API.
    #[arg(long, env = "BULKHEAD_HTTP_LISTEN", default_value = "127.0.0.1:7480")]
    http_listen: SocketAddr,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. `127.0.0.1:7403`
    /// (default: not served). A listener of its own: the UI port requires a login.
    #[arg(long, env = "BULKHEAD_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Send the session cookie without `Secure`. Browsers keep secure cookies on
    /// http://localhost and 127.0.0.1; only a plain-HTTP UI reached by another name
    /// needs this (and then any network observer can steal sessions).
    #[arg(long, env = "BULKHEAD_INSECURE_COOKIES")]
    insecure_cookies: bool,
    /// How long a UI login lasts, in hours.
    #[arg(long, env = "BULKHEAD_SESSION_HOURS", default_value_t = 12)]
    session_hours: u64,
    /// Inventory file (YAML) labelling workloads by netns, cgroup, process, IP or CIDR.
    #[arg(long, env = "BULKHEAD_INVENTORY")]
    inventory: Option<PathBuf>,
    /// Watch this Kubernetes cluster for identities (pods, namespaces, services,
    /// network policies), using a kubeconfig file (its current context).
    #[arg(long, env = "BULKHEAD_KUBECONFIG", value_name = "PATH", conflicts_with_all = ["kube_in_cluster", "kube"])]
    kubeconfig: Option<PathBuf>,
    /// Watch the cluster the learner runs in, with its pod's service account.
    #[arg(long, env = "BULKHEAD_KUBE_IN_CLUSTER", conflicts_with = "kube")]
    kube_in_cluster: bool,
    /// Watch the cluster kubectl would use: `$KUBECONFIG` or `~/.kube/config`, else the
    /// pod's service account.
    #[arg(long, env = "BULKHEAD_KUBE")]
    kube: bool,
    /// Whether unknown nodes may enroll by connecting.
    #[arg(long, env = "BULKHEAD_ENROLLMENT", value_enum, default_value = "open")]
    enrollment: Enrollment,
    /// Largest flow batch accepted, in bytes.
    #[arg(long, env = "BULKHEAD_MAX_BATCH_BYTES", default_value_t = 4 << 20)]
    max_batch_bytes: usize,
    /// How long recorded flows are kept, in hours (the graph's edges are kept).
    #[arg(long, env = "BULKHEAD_FLOW_RETENTION_HOURS", default_value_t = 24)]
    flow_retention_hours: u64,
    /// Re-synthesize proposals every N minutes in the background (0 = only on request).
    #[arg(long, env = "BULKHEAD_SYNTHESIZE_EVERY_MINUTES", default_value_t = 5)]
    synthesize_every_minutes: u64,
    /// Learning window of synthesis, in hours.
    #[arg(long, env = "BULKHEAD_LEARNING_WINDOW_HOURS", default_value_t = 24)]
    learning_window_hours: u64,
    /// How far background synthesis generalizes peers: exact, labels or namespace.
    #[arg(long, env = "BULKHEAD_LEVEL", default_value = "exact")]
    level: bulkhead_model::Level,
    /// A workload's learning has converged after this many minutes without new edges.
    #[arg(long, env = "BULKHEAD_QUIET_PERIOD_MINUTES", default_value_t = 60)]
    quiet_period_minutes: u64,
    /// Namespaces whose workloads the review queue treats as sensitive (comma-separated;
    /// namespaces labelled `bulkhead.io/sensitive` count too): lateral movement into
    /// them ranks first.
    #[arg(long, env = "BULKHEAD_SENSITIVE_NAMESPACES", default_value = "kube-system")]
    sensitive_namespaces: String,
    /// Approved rules unused this many days are suggested for removal.
    #[arg(long, env = "BULKHEAD_UNUSED_AFTER_DAYS", default_value_t = 14)]
    unused_after_days: u64,
    /// mTLS for the agents' gRPC, or explicit plaintext.
    #[command(flatten)]
    tls: ServerTlsArgs,
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
    /// Manage the users of the UI and API (there is no default user: create the first
    /// admin here).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create a user; prints a one-time password (once) that must be changed at first login.
    Add {
        name: String,
        /// viewer, analyst, approver or admin.
        #[arg(long)]
        role: Role,
    },
    /// List users (JSON lines).
    List,
    /// Change a user's role.
    SetRole { name: String, role: Role },
    /// Replace a user's password with a new one-time password (printed once) and end
    /// their sessions.
    ResetPassword { name: String },
    /// Disable a user: sessions end, API tokens stop working.
    Disable { name: String },
    /// Re-enable a disabled user.
    Enable { name: String },
    /// Create an API token for the CLI or a script; prints it (once).
    Token {
        name: String,
        /// A label for the token, unique among the user's live tokens.
        #[arg(long, default_value = "cli")]
        token_name: String,
        /// Days until the token expires (default: never).
        #[arg(long)]
        expires_days: Option<u64>,
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
            let tls = s.tls.server_config().context("configuring the agents' gRPC listener")?;
            ensure_sqlite_dir(&args.db)?;
            let kube = match (s.kubeconfig, s.kube_in_cluster, s.kube) {
                (Some(path), _, _) => Some(KubeConfigSource::Kubeconfig(path)),
                (None, true, _) => Some(KubeConfigSource::InCluster),
                (None, false, true) => Some(KubeConfigSource::Infer),
                (None, false, false) => None,
            };
            let config = ServerConfig {
                db_url: args.db,
                grpc_listen: s.grpc_listen,
                http_listen: s.http_listen,
                inventory: s.inventory,
                enrollment: s.enrollment,
                max_batch_bytes: s.max_batch_bytes,
                flow_retention: Duration::from_secs(s.flow_retention_hours * 3600),
                policy: PolicyConfig {
                    level: s.level,
                    window_ms: hours_ms(s.learning_window_hours),
                    quiet_period_ms: hours_ms(s.quiet_period_minutes) / 60,
                    unused_after_ms: hours_ms(s.unused_after_days.saturating_mul(24)),
                    synthesize_every: (s.synthesize_every_minutes > 0)
                        .then(|| Duration::from_secs(s.synthesize_every_minutes.saturating_mul(60))),
                    risk: RiskConfig {
                        sensitive_namespaces: RiskConfig::parse_namespaces(&s.sensitive_namespaces),
                        ..RiskConfig::default()
                    },
                },
                auth: AuthConfig {
                    secure_cookies: !s.insecure_cookies,
                    session_ttl_ms: hours_ms(s.session_hours.max(1)),
                },
                tls,
            };
            let metrics_listen = s.metrics_listen;
            let mut running = server::start_with_kube(config, kube).await?;
            if let Some(addr) = metrics_listen {
                running.serve_metrics(addr).await?;
            }
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
        Command::User { command } => {
            ensure_sqlite_dir(&args.db)?;
            let store = Store::open(&args.db).await.context("opening the store")?;
            let result = user_command(&store, command).await;
            store.close().await;
            result
        }
    }
}

/// Secrets go to stdout alone (`PW=$(bulkhead-learner user add …)`), explanations to
/// stderr.
async fn user_command(store: &Store, command: UserCommand) -> anyhow::Result<()> {
    let actor = cli_actor();
    let now = unix_ms();
    match command {
        UserCommand::Add { name, role } => {
            let password = auth::one_time_password().context("generating a one-time password")?;
            let hash = auth::hash_password(&password).context("hashing the password")?;
            let user = store.create_user(&name, role, &hash, true, &actor, now).await.context("creating the user")?;
            eprintln!(
                "Created {} user {:?}. One-time password (shown once; to be changed at first login):",
                role, user.username
            );
            println!("{password}");
        }
        UserCommand::List => {
            for u in store.users().await.context("listing users")? {
                println!("{}", serde_json::to_string(&u)?);
            }
        }
        UserCommand::SetRole { name, role } => {
            let user = store.set_role(&name, role, &actor, now).await.context("changing the role")?;
            eprintln!("User {:?} is now {}.", user.username, user.role);
        }
        UserCommand::ResetPassword { name } => {
            let password = auth::one_time_password().context("generating a one-time password")?;
            let hash = auth::hash_password(&password).context("hashing the password")?;
            let user = store.set_password(&name, &hash, true, &actor, now).await.context("resetting the password")?;
            eprintln!(
                "Reset the password of {:?}; their sessions ended. One-time password (shown once):",
                user.username
            );
            println!("{password}");
        }
        UserCommand::Disable { name } => {
            let user = store.set_disabled(&name, true, &actor, now).await.context("disabling the user")?;
            eprintln!("Disabled {:?}; their sessions ended and their API tokens stopped working.", user.username);
        }
        UserCommand::Enable { name } => {
            let user = store.set_disabled(&name, false, &actor, now).await.context("enabling the user")?;
            eprintln!("Enabled {:?}.", user.username);
        }
        UserCommand::Token { name, token_name, expires_days } => {
            let expires = expires_days.map(|d| now.saturating_add(hours_ms(d.saturating_mul(24))));
            let (token, row) = store
                .create_api_token(&name, &token_name, expires, &actor, now)
                .await
                .context("creating the API token")?;
            eprintln!("Created API token {} ({:?}) for {:?}. Token (shown once):", row.id, row.name, row.username);
            println!("{}", token.expose());
        }
    }
    Ok(())
}

/// Who the audit log names for changes made here: the local account running the CLI.
fn cli_actor() -> String {
    let user = std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")).unwrap_or_default();
    let user: String = user.chars().filter(|c| !c.is_control()).take(64).collect();
    if user.is_empty() { "cli".to_owned() } else { format!("cli:{user}") }
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

/// Hours as milliseconds, saturating (flags are operator input).
fn hours_ms(hours: u64) -> i64 {
    i64::try_from(hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX)
}
