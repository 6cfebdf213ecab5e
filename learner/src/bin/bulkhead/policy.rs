//! Policy commands: proposals (list, show, diff, approve, reject, synthesize),
//! simulate (replay recorded flows against policies) and export (Kubernetes YAML).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use bulkhead_model::{HttpRequestLine, HygieneFlag, Lint, Proposal, ProposalStatus};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::json;

use crate::{Api, ago, now_ms, parse, print_json, print_table, printable};

#[derive(Debug, Subcommand)]
pub enum ProposalsCommand {
    /// Proposal versions, newest first.
    List {
        /// proposed, approved, rejected, deployed or superseded.
        #[arg(long)]
        status: Option<String>,
        /// Only this workload (identity number).
        #[arg(long)]
        target: Option<u32>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One proposal with every rule's evidence, flags, widening and lints.
    Show { id: i64 },
    /// What a proposal changes against the active policy or another version.
    Diff {
        id: i64,
        /// `active` (deployed, else approved), `previous`, or a version number.
        #[arg(long, default_value = "active")]
        against: String,
    },
    /// Approve a proposal. Every flagged rule must be confirmed or dropped.
    Approve {
        id: i64,
        /// Confirm a flagged rule (repeatable), e.g. `--confirm egress-2`.
        #[arg(long)]
        confirm: Vec<String>,
        /// Leave a flagged rule out (repeatable).
        #[arg(long)]
        drop: Vec<String>,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a proposal; say why.
    Reject {
        id: i64,
        #[arg(long)]
        comment: String,
    },
    /// Synthesize proposals now from the learning window.
    Synthesize {
        /// exact, labels or namespace.
        #[arg(long)]
        level: Option<String>,
        /// Learning window ending now, in hours (default: the learner's, 24 h).
        #[arg(long)]
        window_hours: Option<f64>,
        /// Only these workloads (repeatable identity numbers).
        #[arg(long)]
        target: Vec<u32>,
    },
}

#[derive(Debug, Deserialize)]
struct Summary {
    id: i64,
    target: u32,
    workload: String,
    version: u32,
    status: ProposalStatus,
    created_unix_ms: i64,
    ingress_rules: u64,
    egress_rules: u64,
    flagged_rules: u64,
    widening_total: u64,
    converged: bool,
    lints: u64,
    reviewer: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Record {
    #[serde(flatten)]
    summary: Summary,
    proposal: Proposal,
    comment: Option<String>,
    #[serde(default)]
    cluster_policies: Vec<ClusterPolicy>,
    #[serde(default)]
    active: Vec<ActiveView>,
    #[serde(default)]
    rule_hits: Vec<RuleHit>,
}

/// An approved (or deployed) version of the workload's policy.
#[derive(Debug, Deserialize)]
struct ActiveView {
    proposal_id: i64,
    version: u32,
    policy: bulkhead_model::Policy,
}

/// One rule's use on one node, as enforcers reported it.
#[derive(Debug, Deserialize)]
struct RuleHit {
    rule: RuleHitRef,
    node_id: String,
    hits: u64,
    last_hit_unix_ms: i64,
}

#[derive(Debug, Deserialize)]
struct RuleHitRef {
    proposal_id: i64,
    direction: bulkhead_model::Direction,
    rule_index: u32,
}

/// An imported Kubernetes NetworkPolicy that selects the proposal's workload.
#[derive(Debug, Deserialize)]
struct ClusterPolicy {
    namespace: String,
    name: String,
    policy: bulkhead_model::Policy,
}

pub async fn proposals(api: &Api, json: bool, cmd: ProposalsCommand) -> anyhow::Result<()> {
    match cmd {
        ProposalsCommand::List { status, target, limit } => {
            let mut q = vec![("limit", limit.to_string())];
            if let Some(s) = status {
                q.push(("status", s));
            }
            if let Some(t) = target {
                q.push(("target", t.to_string()));
            }
            let raw = api.get("proposals", &q).await?;
            if json {
                return print_json(&raw);
            }
            print_summaries(&parse::<Vec<Summary>>(&raw)?);
        }
        ProposalsCommand::Show { id } => {
            let raw = api.get(&format!("proposals/{id}"), &[]).await?;
            if json {
                return print_json(&raw);
            }
            print_record(&parse(&raw)?);
        }
        ProposalsCommand::Diff { id, against } => {
            let raw = api.get(&format!("proposals/{id}/diff"), &[("against", against)]).await?;
            if json {
                return print_json(&raw);
            }
            match raw["against"].as_array() {
                Some(a) => println!("proposal {id} against proposal {} (version {}):", a[0], a[1]),
                None => println!("proposal {id} against nothing (no active policy):"),
            }
            let text = raw["text"].as_str().unwrap_or_default();
            print!("{}", if text.is_empty() { "(no changes)\n" } else { text });
        }
        ProposalsCommand::Approve { id, confirm, drop, comment } => {
            let body = json!({"confirm": confirm, "drop": drop, "comment": comment});
            let raw = api.post(&format!("proposals/{id}/approve"), &body).await?;
            if json {
                return print_json(&raw);
            }
            let r: Summary = parse(&raw)?;
            println!("Approved proposal {id} (workload {}, version {}).", printable(&r.workload), r.version);
        }
        ProposalsCommand::Reject { id, comment } => {
            let raw = api.post(&format!("proposals/{id}/reject"), &json!({"comment": comment})).await?;
            if json {
                return print_json(&raw);
            }
            println!("Rejected proposal {id}.");
        }
        ProposalsCommand::Synthesize { level, window_hours, target } => {
            let window_ms = window_hours.map(|h| (h * 3_600_000.0) as i64);
            eprintln!("Synthesizing proposals from the learning window …");
            let raw = api
                .post("proposals/synthesize", &json!({"level": level, "window_ms": window_ms, "targets": target}))
                .await?;
            if json {
                return print_json(&raw);
            }
            let list: Vec<Summary> = parse(&raw)?;
            print_summaries(&list);
            let pending = list.iter().filter(|s| s.status == ProposalStatus::Proposed).count();
            println!("{} workloads, {pending} proposals awaiting review.", list.len());
        }
    }
    Ok(())
}

fn print_summaries(list: &[Summary]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                format!("{} ({})", printable(&s.workload), s.target),
                s.version.to_string(),
                s.status.as_str().to_owned(),
                format!("{}/{}", s.ingress_rules, s.egress_rules),
                s.flagged_rules.to_string(),
                s.widening_total.to_string(),
                if s.converged { "yes" } else { "no" }.to_owned(),
                s.lints.to_string(),
                s.reviewer.as_deref().map(printable).unwrap_or_default(),
                ago(s.created_unix_ms),
            ]
        })
        .collect();
    print_table(
        &[
            "ID",
            "WORKLOAD",
            "VER",
            "STATUS",
            "IN/OUT",
            "FLAGGED",
            "WIDENS",
            "CONVERGED",
            "LINTS",
            "REVIEWER",
            "CREATED",
        ],
        &rows,
    );
}

fn print_record(r: &Record) {
    let p = &r.proposal;
    let s = &r.summary;
    println!(
        "Proposal {} — {} (identity {}), version {}, {}",
        s.id,
        printable(&p.workload),
        s.target,
        s.version,
        s.status.as_str()
    );
    if let Some(c) = &r.comment {
        println!("Comment: {}", printable(c));
    }
    println!(
        "Level {}; window {} → {}; {}",
        p.level,
        ago(p.window.from_unix_ms),
        ago(p.window.to_unix_ms),
        if p.convergence.converged {
            "converged".to_owned()
        } else {
            "NOT converged (edges still appearing)".to_owned()
        }
    );
    println!("Policy {} selects {}", printable(&p.policy.name), printable(&p.policy.selector.to_string()));
    println!();
    let rows: Vec<Vec<String>> = p
        .rules
        .iter()
        .map(|r| {
            let ports: Vec<String> = r.rule.ports.iter().map(ToString::to_string).collect();
            let flags: Vec<&str> = r.flags.iter().map(|f| flag_name(*f)).collect();
            vec![
                r.id.clone(),
                if r.included { "yes".into() } else { "HELD".into() },
                printable(&r.rule.peer.to_string()),
                ports.join(","),
                r.evidence.connections.to_string(),
                r.evidence.edges.len().to_string(),
                if r.evidence.last_seen_unix_ms > 0 { ago(r.evidence.last_seen_unix_ms) } else { "-".into() },
                r.widens_total.to_string(),
                flags.join(","),
            ]
        })
        .collect();
    print_table(&["RULE", "IN POLICY", "PEER", "PORTS", "CONNS", "EDGES", "LAST SEEN", "WIDENS", "FLAGS"], &rows);
    for r in p.rules.iter().filter(|r| !r.flags.is_empty()) {
        for f in &r.flags {
            println!("  {} held back: {}", r.id, f.describe());
        }
    }
    if !p.lints.is_empty() {
        println!();
        for Lint { code, severity, message } in &p.lints {
            println!(
                "{severity:?} [{}]: {message}",
                serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
            );
        }
    }
    if !r.cluster_policies.is_empty() {
        println!();
        println!("Already in the cluster (imported NetworkPolicies selecting this workload):");
        for c in &r.cluster_policies {
            let count = |rules: &Option<Vec<bulkhead_model::Rule>>| {
                rules.as_ref().map_or("-".to_owned(), |r| r.len().to_string())
            };
            println!(
                "  {}/{}: ingress rules {}, egress rules {}",
                printable(&c.namespace),
                printable(&c.name),
                count(&c.policy.ingress),
                count(&c.policy.egress)
            );
        }
    }
    for a in &r.active {
        println!();
        println!(
            "Enforced rules of approved version {} (proposal {}), hits reported by enforcers:",
            a.version, a.proposal_id
        );
        let mut rows = Vec::new();
        for (direction, rules) in [
            (bulkhead_model::Direction::Ingress, &a.policy.ingress),
            (bulkhead_model::Direction::Egress, &a.policy.egress),
        ] {
            for (index, rule) in rules.iter().flatten().enumerate() {
                let hits: Vec<&RuleHit> = r
                    .rule_hits
                    .iter()
                    .filter(|h| {
                        h.rule.proposal_id == a.proposal_id
                            && h.rule.direction == direction
                            && h.rule.rule_index as usize == index
                    })
                    .collect();
                let total: u64 = hits.iter().map(|h| h.hits).fold(0, u64::saturating_add);
                let last = hits.iter().map(|h| h.last_hit_unix_ms).max();
                let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
                rows.push(vec![
                    format!("{}-{index}", direction.as_str()),
                    printable(&rule.peer.to_string()),
                    ports.join(","),
                    total.to_string(),
                    last.map_or_else(|| "never".to_owned(), ago),
                    hits.iter().map(|h| printable(&h.node_id)).collect::<Vec<_>>().join(","),
                ]);
            }
        }
        print_table(&["RULE", "PEER", "PORTS", "HITS", "LAST HIT", "NODES"], &rows);
    }
    for rm in &p.removals {
        let when = rm.last_used_unix_ms.map_or_else(|| "never used".to_owned(), |t| format!("last used {}", ago(t)));
        println!("Suggest removing {} rule {} ({when}).", rm.direction.as_str(), printable(&rm.rule.peer.to_string()));
    }
}

fn flag_name(f: HygieneFlag) -> &'static str {
    match f {
        HygieneFlag::PortScan => "port-scan",
        HygieneFlag::CloudMetadata => "cloud-metadata",
        HygieneFlag::NewExternalEgress => "new-external-egress",
    }
}

/// Replays recorded flows against a proposal or the active policy set.
pub async fn simulate(
    api: &Api,
    json: bool,
    proposal: Option<i64>,
    include_proposed: bool,
    since_hours: f64,
    limit: usize,
) -> anyhow::Result<()> {
    let to = now_ms();
    let from = to - (since_hours * 3_600_000.0) as i64;
    eprintln!("Replaying recorded flows of the last {since_hours} h …");
    let body = json!({
        "proposal_id": proposal,
        "include_proposed": include_proposed,
        "from_unix_ms": from,
        "to_unix_ms": to,
        "limit": limit,
    });
    let raw = api.post("simulate", &body).await?;
    if json {
        return print_json(&raw);
    }
    let policies = raw["policies"].as_array().map_or(0, Vec::len);
    println!(
        "{} flows ({} connections) evaluated against {policies} policies: {} would be denied{}.",
        raw["flows_evaluated"],
        raw["connections_total"],
        raw["would_deny_total"],
        if raw["truncated"] == true { " (range truncated: oldest flows not read)" } else { "" }
    );
    let rows = table_rows(&raw["would_deny"], |d| {
        let s = |k: &str| d[k].as_str().map(printable).unwrap_or_else(|| d[k].to_string());
        vec![
            format!("{} {}", s("src_name"), s("src_addr")),
            format!("{} {}:{}", s("dst_name"), s("dst_addr"), d["dst_port"]),
            s("protocol"),
            d["connections"].to_string(),
            d["last_seen_unix_ms"].as_i64().map(ago).unwrap_or_default(),
            d["reasons"]
                .as_array()
                .map(|r| r.iter().filter_map(|x| x.as_str()).map(printable).collect::<Vec<_>>().join("; "))
                .unwrap_or_default(),
        ]
    });
    if !rows.is_empty() {
        print_table(&["SOURCE", "DESTINATION", "PROTO", "CONNS", "LAST SEEN", "WHY"], &rows);
    }
    Ok(())
}

/// Exports policies as Kubernetes YAML to stdout or a file; warnings go to stderr.
pub async fn export(
    api: &Api,
    format: String,
    target: Option<u32>,
    namespace: Option<String>,
    proposal: Option<i64>,
    output: Option<PathBuf>,
) -> anyhow::Result<()> {
    let mut q = vec![("format", format)];
    if let Some(t) = target {
        q.push(("target", t.to_string()));
    }
    if let Some(ns) = namespace {
        q.push(("namespace", ns));
    }
    if let Some(p) = proposal {
        q.push(("proposal", p.to_string()));
    }
    let raw = api.get("export", &q).await?;
    let yaml = raw["yaml"].as_str().unwrap_or_default();
    match &output {
        Some(path) => std::fs::write(path, yaml).with_context(|| format!("writing {}", path.display()))?,
        None => std::io::stdout().write_all(yaml.as_bytes()).context("writing to stdout")?,
    }
    for w in raw["warnings"].as_array().into_iter().flatten().filter_map(|w| w.as_str()) {
        eprintln!("warning: {}", printable(w));
    }
    let errors: Vec<&str> = raw["errors"].as_array().into_iter().flatten().filter_map(|e| e.as_str()).collect();
    for e in &errors {
        eprintln!("error: {}", printable(e));
    }
    if !errors.is_empty() {
        anyhow::bail!("{} policies could not be exported (see above); the others were", errors.len());
    }
    Ok(())
}

/// The audit log, newest first.
pub async fn audit(api: &Api, json: bool, action: Option<String>, limit: u32) -> anyhow::Result<()> {
    let mut q = vec![("limit", limit.to_string())];
    if let Some(a) = action {
        q.push(("action", a));
    }
    let raw = api.get("audit", &q).await?;
    if json {
        return print_json(&raw);
    }
    let rows = table_rows(&raw, |e| {
        let s = |k: &str| e[k].as_str().map(printable).unwrap_or_default();
        vec![
            e["id"].to_string(),
            e["at_unix_ms"].as_i64().map(ago).unwrap_or_default(),
            s("actor"),
            s("action"),
            s("subject"),
            printable(&e["detail"].to_string()),
        ]
    });
    print_table(&["ID", "WHEN", "ACTOR", "ACTION", "SUBJECT", "DETAIL"], &rows);
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Every workload's mode and gate.
    List,
    /// Move one workload (`--target`) or a namespace to a mode.
    Set {
        #[arg(long, conflicts_with = "namespace", required_unless_present = "namespace")]
        target: Option<u32>,
        #[arg(long)]
        namespace: Option<String>,
        /// learn, monitor or enforce.
        #[arg(long)]
        mode: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// Enforce without a monitor phase first.
        #[arg(long)]
        force: bool,
    },
}

pub async fn rollout(api: &Api, json: bool, cmd: RolloutCommand) -> anyhow::Result<()> {
    match cmd {
        RolloutCommand::List => {
            let raw = api.get("rollout", &[]).await?;
            if json {
                return print_json(&raw);
            }
            let rows = table_rows(&raw, |r| {
                let s = |k: &str| r[k].as_str().map(printable).unwrap_or_default();
                vec![
                    format!("{} ({})", s("workload"), r["target"]),
                    s("mode"),
                    r["mode_since_unix_ms"].as_i64().map(ago).unwrap_or_else(|| "-".into()),
                    if r["has_policy"] == true { "yes" } else { "no" }.into(),
                    match r["converged"].as_bool() {
                        Some(true) => "yes".into(),
                        Some(false) => "no".into(),
                        None => "-".into(),
                    },
                    r["audit_events"].to_string(),
                    r["denied_events"].to_string(),
                    s("changed_by"),
                ]
            });
            print_table(
                &["WORKLOAD", "MODE", "SINCE", "APPROVED POLICY", "CONVERGED", "AUDIT 24H", "DENIED 24H", "CHANGED BY"],
                &rows,
            );
        }
        RolloutCommand::Set { target, namespace, mode, reason, force } => {
            let body =
                json!({"target": target, "namespace": namespace, "mode": mode, "reason": reason, "force": force});
            let raw = api.post("rollout", &body).await?;
            if json {
                return print_json(&raw);
            }
            for c in raw.as_array().into_iter().flatten() {
                println!(
                    "identity {}: {} -> {}",
                    c["target"],
                    c["from"].as_str().unwrap_or("?"),
                    c["to"].as_str().unwrap_or("?")
                );
            }
        }
    }
    Ok(())
}

/// Per node: desired vs applied policy version.
pub async fn enforcers(api: &Api, json: bool) -> anyhow::Result<()> {
    let raw = api.get("enforcers", &[]).await?;
    if json {
        return print_json(&raw);
    }
    let rows = table_rows(&raw, |e| {
        let v = |k: &str| e[k].as_u64().map_or_else(|| "-".to_owned(), |v| v.to_string());
        vec![
            e["node_id"].as_str().map(printable).unwrap_or_default(),
            v("desired_version"),
            v("applied_version"),
            if e["desired_version"] == e["applied_version"] { "yes" } else { "no" }.into(),
            // Events the node could not report (kernel ring full, agent queue full)
            // and connections it could not track: non-zero means look closer.
            format!(
                "{}/{}/{}",
                e["loss"]["ringbuf_dropped"].as_u64().unwrap_or(0),
                e["loss"]["queue_dropped"].as_u64().unwrap_or(0),
                e["loss"]["conntrack_full"].as_u64().unwrap_or(0)
            ),
            e["last_error"].as_str().map(printable).unwrap_or_default(),
            e["last_seen_unix_ms"].as_i64().map(ago).unwrap_or_default(),
            // learner − node: positive = the node is behind. Its times are corrected.
            e["clock_skew_ms"].as_i64().map_or_else(|| "-".to_owned(), |s| format!("{:+.1}s", s as f64 / 1000.0)),
        ]
    });
    print_table(
        &["NODE", "DESIRED", "APPLIED", "IN SYNC", "LOST RING/QUEUE/CT", "LAST ERROR", "SEEN", "CLOCK SKEW"],
        &rows,
    );
    Ok(())
}

/// Recent audit (would-deny) and deny events.
pub async fn verdicts(
    api: &Api,
    json: bool,
    identity: Option<u32>,
    verdict: Option<String>,
    limit: u32,
) -> anyhow::Result<()> {
    let mut q = vec![("limit", limit.to_string())];
    if let Some(i) = identity {
        q.push(("identity", i.to_string()));
    }
    if let Some(v) = verdict {
        q.push(("verdict", v));
    }
    let raw = api.get("verdicts", &q).await?;
    if json {
        return print_json(&raw);
    }
    let rows = table_rows(&raw, |e| {
        let s = |k: &str| e[k].as_str().map(printable).unwrap_or_else(|| e[k].to_string());
        let s_of = |v: &serde_json::Value| v.as_str().map(printable).unwrap_or_else(|| v.to_string());
        vec![
            s("node_id"),
            s("verdict"),
            format!("{} ({})", e["local"], s("direction")),
            e["peer"].to_string(),
            format!("{} -> {}:{}/{}", s("src_addr"), s("dst_addr"), e["dst_port"], s("protocol")),
            // An allow rule on a would-deny event is an L7 rule whose HTTP rules the
            // request did not match (NodePolicy's VerdictEvent).
            if e["rule"].is_null() {
                "default deny".into()
            } else {
                let r = &e["rule"];
                format!(
                    "HTTP request not in proposal {} {} rule {}",
                    r["proposal_id"],
                    s_of(&r["direction"]),
                    r["rule_index"]
                )
            },
            e["at_unix_ms"].as_i64().map(ago).unwrap_or_default(),
            // Last: a path may be hundreds of characters wide.
            request(&e["http"]),
        ]
    });
    print_table(&["NODE", "VERDICT", "WORKLOAD", "PEER", "CONNECTION", "RULE", "WHEN", "REQUEST"], &rows);
    Ok(())
}

/// An HTTP verdict's request line as the pages write it; `-` for an L4 verdict. Escaped
/// for the terminal like every other text the learner relays.
fn request(http: &serde_json::Value) -> String {
    match serde_json::from_value::<Option<HttpRequestLine>>(http.clone()) {
        Ok(Some(line)) => printable(&line.to_string()),
        Ok(None) => "-".to_owned(),
        // A learner newer than this CLI: show what it sent rather than nothing.
        Err(_) => printable(&http.to_string()),
    }
}

/// One table row per element of a JSON array (nothing for anything else).
fn table_rows(raw: &serde_json::Value, row: impl Fn(&serde_json::Value) -> Vec<String>) -> Vec<Vec<String>> {
    raw.as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default()
}
