//! `bulkhead`: the operator CLI. Talks to a running learner's `/api/v1` JSON API, so
//! it works from any machine that can reach the learner and never touches its store.

mod certs;
mod explain;
mod policy;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bulkhead_model::{DnsAnswer, Edge, Flow, Identity, Labels};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Bulkhead operator CLI.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Learner HTTP API base URL.
    #[arg(long, env = "BULKHEAD_SERVER", default_value = "http://127.0.0.1:7480", global = true)]
    server: String,
    /// API token (`bht_…`; `bulkhead-learner user token NAME TOKEN_NAME` makes one).
    /// Decisions are recorded under the token's user.
    #[arg(long, env = "BULKHEAD_TOKEN", hide_env_values = true, global = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the API token (first line); default `~/.config/bulkhead/token`
    /// when it exists.
    #[arg(long, env = "BULKHEAD_TOKEN_FILE", global = true)]
    token_file: Option<std::path::PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The learned service graph: who talks to whom on which port.
    Graph {
        /// Only edges touching this identity.
        #[arg(long)]
        identity: Option<u32>,
        /// Only edges seen in the last N seconds.
        #[arg(long)]
        since_secs: Option<i64>,
    },
    /// Recently recorded flows, newest first.
    Flows {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        identity: Option<u32>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Identities and their labels.
    Identities,
    /// Endpoints (network namespaces) per node with their addresses and identity.
    Endpoints,
    /// Nodes (agents), their last contact and loss counters.
    Agents,
    /// DNS answers workloads received (name → address, TTL).
    Dns,
    /// Policy proposals: list, show, diff, approve, reject, synthesize.
    #[command(subcommand)]
    Proposals(policy::ProposalsCommand),
    /// "What would this block?": replay recorded flows against a proposal or the
    /// active policy set and list the connections it would deny.
    Simulate {
        /// Replay this proposal alone (its workload's flows).
        #[arg(long)]
        proposal: Option<i64>,
        /// With the active set: let pending proposals stand in for their workloads.
        #[arg(long)]
        include_proposed: bool,
        /// How far back to replay, in hours.
        #[arg(long, default_value_t = 24.0)]
        since_hours: f64,
        /// At most this many would-deny connections listed.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Export approved policies (or one proposal) as Kubernetes YAML.
    Export {
        /// networkpolicy or cilium.
        #[arg(long, default_value = "networkpolicy")]
        format: String,
        /// Only the policies selecting this workload (identity number).
        #[arg(long, conflicts_with = "namespace")]
        target: Option<u32>,
        /// Only this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Export this proposal's policy instead of the approved set.
        #[arg(long)]
        proposal: Option<i64>,
        /// Write to this file instead of stdout.
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Rollout modes per workload (learn → monitor → enforce) with their gates.
    #[command(subcommand)]
    Rollout(policy::RolloutCommand),
    /// Enforcers per node: the policy version wanted there and the one applied.
    Enforcers,
    /// Why a flow was (or would be) allowed, audited or dropped: both ends' identities,
    /// the policy and mode deciding each direction, the enforcers' versions, recent
    /// verdict events and a pending proposal that would change the answer.
    Explain(explain::ExplainArgs),
    /// Recent audit (would-deny) and deny events reported by enforcers.
    Verdicts {
        /// Only this workload (identity number).
        #[arg(long)]
        identity: Option<u32>,
        /// audit, denied or forwarded.
        #[arg(long)]
        verdict: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// The audit log: every proposal decision and rollout change, newest first.
    Audit {
        /// Only actions starting with this, e.g. `proposal.`.
        #[arg(long)]
        action: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Mint the mTLS material between agents and the learner: a CA, the learner's
    /// certificate, node certificates (works offline; no learner needed).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
}

#[derive(Debug, Deserialize)]
struct EdgeView {
    #[serde(flatten)]
    edge: Edge,
    src_labels: Labels,
    dst_labels: Labels,
}

#[derive(Debug, Deserialize)]
struct FlowView {
    id: i64,
    node_id: String,
    flow: Flow,
    src_identity: Identity,
    dst_identity: Identity,
}

#[derive(Debug, Deserialize)]
struct IdentityView {
    id: Identity,
    labels: Labels,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Command::Certs(cmd) = args.command {
        return certs::run(cmd);
    }
    let token = api_token(args.token.clone(), args.token_file.as_deref())?;
    let api = Api { base: args.server.trim_end_matches('/').to_owned(), client: reqwest::Client::new(), token };
    match args.command {
        Command::Graph { identity, since_secs } => {
            let mut q = Vec::new();
            if let Some(i) = identity {
                q.push(("identity", i.to_string()));
            }
            if let Some(s) = since_secs {
                q.push(("since_ms", (now_ms() - s * 1000).to_string()));
            }
            let raw = api.get("edges", &q).await?;
            if args.json {
                return print_json(&raw);
            }
            let edges: Vec<EdgeView> = parse(&raw)?;
            let rows: Vec<Vec<String>> = edges
                .iter()
                .map(|e| {
                    vec![
                        who(e.edge.key.src, &e.src_labels),
                        who(e.edge.key.dst, &e.dst_labels),
                        format!("{}/{}", e.edge.key.dst_port, e.edge.key.protocol.as_str()),
                        e.edge.connections.to_string(),
                        e.edge.bytes.to_string(),
                        ago(e.edge.last_seen_unix_ms),
                    ]
                })
                .collect();
            print_table(&["SOURCE", "DESTINATION", "PORT", "CONNECTIONS", "BYTES", "LAST SEEN"], &rows);
            println!("{} edges", edges.len());
        }
        Command::Flows { limit, node, identity, port } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(n) = node {
                q.push(("node", n));
            }
            if let Some(i) = identity {
                q.push(("identity", i.to_string()));
            }
            if let Some(p) = port {
                q.push(("port", p.to_string()));
            }
            let raw = api.get("flows", &q).await?;
            if args.json {
                return print_json(&raw);
            }
            let flows: Vec<FlowView> = parse(&raw)?;
            let rows: Vec<Vec<String>> = flows
                .iter()
                .map(|f| {
                    vec![
                        f.id.to_string(),
                        f.node_id.clone(),
                        f.flow.direction.as_str().to_owned(),
                        format!("{} {}", f.src_identity, f.flow.src_addr),
                        format!("{} {}:{}", f.dst_identity, f.flow.dst_addr, f.flow.dst_port),
                        f.flow.protocol.as_str().to_owned(),
                        printable(&f.flow.comm),
                        f.flow.connections.to_string(),
                        (f.flow.bytes_sent + f.flow.bytes_received).to_string(),
                        ago(f.flow.last_seen_unix_ms),
                    ]
                })
                .collect();
            print_table(
                &["ID", "NODE", "DIR", "SOURCE", "DESTINATION", "PROTO", "PROCESS", "CONNS", "BYTES", "SEEN"],
                &rows,
            );
        }
        Command::Identities => {
            let raw = api.get("identities", &[]).await?;
            if args.json {
                return print_json(&raw);
            }
            let ids: Vec<IdentityView> = parse(&raw)?;
            let rows: Vec<Vec<String>> =
                ids.iter().map(|i| vec![i.id.to_string(), printable(&i.labels.to_string())]).collect();
            print_table(&["IDENTITY", "LABELS"], &rows);
        }
        Command::Endpoints => print_json(&api.get("endpoints", &[]).await?)?,
        Command::Agents => print_json(&api.get("agents", &[]).await?)?,
        Command::Dns => {
            let raw = api.get("dns", &[]).await?;
            if args.json {
                return print_json(&raw);
            }
            let answers: Vec<DnsAnswer> = parse(&raw)?;
            let rows: Vec<Vec<String>> = answers
                .iter()
                .map(|d| {
                    vec![
                        printable(&d.name),
                        d.addr.to_string(),
                        format!("{}s", d.ttl_seconds),
                        d.netns_ino.to_string(),
                        ago(d.seen_unix_ms),
                    ]
                })
                .collect();
            print_table(&["NAME", "ADDRESS", "TTL", "NETNS", "SEEN"], &rows);
        }
        Command::Proposals(cmd) => policy::proposals(&api, args.json, cmd).await?,
        Command::Simulate { proposal, include_proposed, since_hours, limit } => {
            policy::simulate(&api, args.json, proposal, include_proposed, since_hours, limit).await?
        }
        Command::Export { format, target, namespace, proposal, output } => {
            policy::export(&api, format, target, namespace, proposal, output).await?
        }
        Command::Audit { action, limit } => policy::audit(&api, args.json, action, limit).await?,
        Command::Rollout(cmd) => policy::rollout(&api, args.json, cmd).await?,
        Command::Enforcers => policy::enforcers(&api, args.json).await?,
        Command::Verdicts { identity, verdict, limit } => {
            policy::verdicts(&api, args.json, identity, verdict, limit).await?
        }
        Command::Explain(a) => explain::run(&api, args.json, a).await?,
        Command::Certs(_) => unreachable!("handled before the API client is made"),
    }
    Ok(())
}

/// The API token from `--token`, `--token-file`, or the default file. A named file
/// that cannot be read is an error; a missing default file just means no token (the
/// learner then answers 401 with a hint).
fn api_token(given: Option<String>, file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    if let Some(t) = given {
        return Ok(Some(t.trim().to_owned()));
    }
    let (path, required) = match file {
        Some(p) => (p.to_path_buf(), true),
        None => match std::env::var_os("HOME") {
            Some(home) => (std::path::PathBuf::from(home).join(".config/bulkhead/token"), false),
            None => return Ok(None),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.lines().next().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty())),
        Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading the API token from {}", path.display())),
    }
}

struct Api {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl Api {
    async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/api/v1/{path}", self.base);
        let resp = self
            .authorized(self.client.get(&url))
            .query(query)
            .send()
            .await
            .with_context(|| format!("requesting {url} (is the learner running? see --server)"))?;
        Self::answer(&url, resp).await
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// POSTs JSON, as the token's user.
    async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}/api/v1/{path}", self.base);
        let req = self.authorized(self.client.post(&url).json(body));
        let resp =
            req.send().await.with_context(|| format!("requesting {url} (is the learner running? see --server)"))?;
        Self::answer(&url, resp).await
    }

    async fn answer(url: &str, resp: reqwest::Response) -> anyhow::Result<serde_json::Value> {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.with_context(|| format!("reading the answer of {url}"))?;
        if !status.is_success() {
            let msg = body.get("error").and_then(|e| e.as_str()).unwrap_or("no detail");
            if status == reqwest::StatusCode::UNAUTHORIZED {
                anyhow::bail!(
                    "{url} answered {status}: {msg} — pass an API token with --token, --token-file or \
                     BULKHEAD_TOKEN (made by `bulkhead-learner user token USER NAME`)"
                );
            }
            anyhow::bail!("{url} answered {status}: {msg}");
        }
        Ok(body)
    }
}

fn parse<T: DeserializeOwned>(v: &serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(v.clone()).context("the learner's answer has an unexpected shape (version mismatch?)")
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn who(id: Identity, labels: &Labels) -> String {
    match id.reserved() {
        Some(r) => format!("reserved:{}", r.name()),
        None => format!("{id} {{{}}}", printable(&labels.to_string())),
    }
}

/// Label values are attacker-controlled: never let them drive the terminal.
fn printable(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn ago(ms: i64) -> String {
    let s = (now_ms() - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
