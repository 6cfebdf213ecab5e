//! `bulkhead explain`: why a flow was (or would be) allowed, audited or dropped — over
//! `GET /api/v1/explain`, which resolves both ends, evaluates the active policy set and
//! the rollout modes, and checks the enforcers of the nodes involved.

use anyhow::Context as _;
use bulkhead_model::{Direction, HttpRequestLine, Identity, Labels, Protocol, RolloutMode};
use clap::{ArgGroup, Args};
use serde::Deserialize;

use crate::{Api, ago, now_ms, parse, print_json, print_table, printable};

/// Which flow to explain: a recorded one, or one described by its ends.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("what").required(true).args(["flow", "from"])))]
pub struct ExplainArgs {
    /// A flow id: the ID column of `bulkhead flows` (or `id` in `bulkhead --json flows`).
    #[arg(conflicts_with_all = ["from", "to", "port", "proto"])]
    pub flow: Option<i64>,
    /// The initiating end: a workload name, namespace/name, identity number, reserved
    /// entity (world, host, …) or IP address.
    #[arg(long, requires_all = ["to", "port"])]
    pub from: Option<String>,
    /// The accepting end (same forms as --from).
    #[arg(long, requires_all = ["from", "port"])]
    pub to: Option<String>,
    /// Destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// tcp (default) or udp.
    #[arg(long)]
    pub proto: Option<String>,
    /// The moment asked about, for the verdict events shown: Unix ms, RFC 3339
    /// (`2025-06-01T12:00:00Z`) or an age (`90s`, `15m`, `2h`, `1d`). Default: the
    /// flow's last sighting, or now.
    #[arg(long)]
    pub at: Option<String>,
    /// Judge this HTTP request method (with --path) against L7 rules.
    #[arg(long, requires = "path")]
    pub method: Option<String>,
    /// The request path (with --method), without the query string.
    #[arg(long, requires = "method")]
    pub path: Option<String>,
}

pub async fn run(api: &Api, json: bool, a: ExplainArgs) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(id) = a.flow {
        q.push(("flow", id.to_string()));
    }
    let optional = [("from", a.from), ("to", a.to), ("proto", a.proto), ("method", a.method), ("path", a.path)];
    q.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
    if let Some(p) = a.port {
        q.push(("port", p.to_string()));
    }
    if let Some(at) = a.at {
        q.push(("at_ms", parse_at(&at, now_ms())?.to_string()));
    }
    let raw = api.get("explain", &q).await?;
    if json {
        return print_json(&raw);
    }
    let e: Explanation = parse(&raw)?;
    print_explanation(&e);
    Ok(())
}

// === the answer, as far as the human output reads it ===

#[derive(Debug, Deserialize)]
struct Explanation {
    flow: Option<FlowFacts>,
    source: Party,
    destination: Party,
    dst_port: u16,
    protocol: Protocol,
    request: Option<Request>,
    egress: Side,
    ingress: Side,
    verdict: String,
    summary: String,
    #[serde(default)]
    enforcers: Vec<Enforcer>,
    #[serde(default)]
    events: Vec<Event>,
    #[serde(default)]
    pending: Vec<Pending>,
    #[serde(default)]
    notes: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct FlowFacts {
    id: i64,
    node_id: String,
    direction: Direction,
    src_addr: String,
    dst_addr: String,
    comm: String,
    connections: u64,
    last_seen_unix_ms: i64,
}

#[derive(Debug, Deserialize)]
struct Request {
    method: String,
    path: String,
}

#[derive(Debug, Deserialize)]
struct Party {
    identity: Identity,
    name: String,
    labels: Labels,
    kind: String,
    resolved_by: String,
    address: Option<String>,
    #[serde(default)]
    nodes: Vec<String>,
    mode: Option<RolloutMode>,
}

#[derive(Debug, Deserialize)]
struct PolicyRef {
    proposal_id: i64,
    version: u32,
    status: String,
    name: String,
}

#[derive(Debug, Deserialize)]
struct RuleView {
    direction: Direction,
    index: usize,
    peer: String,
    ports: Vec<String>,
    #[serde(default)]
    http: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Decision {
    result: String,
    policy: Option<PolicyRef>,
    rule: Option<RuleView>,
    #[serde(default)]
    policies: Vec<PolicyRef>,
}

#[derive(Debug, Deserialize)]
struct Side {
    direction: Direction,
    name: String,
    mode: Option<RolloutMode>,
    #[serde(default)]
    policies: Vec<PolicyRef>,
    decision: Decision,
    verdict: String,
    reason: String,
}

#[derive(Debug, Deserialize)]
struct Enforcer {
    node_id: String,
    directions: Vec<Direction>,
    state: String,
    desired_version: Option<u64>,
    applied_version: Option<u64>,
    last_report_unix_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct Event {
    node_id: String,
    at_unix_ms: i64,
    verdict: String,
    direction: Direction,
    src_addr: String,
    dst_addr: String,
    dst_port: u16,
    protocol: Protocol,
    reason: String,
    /// The request line of an HTTP verdict; absent for an L4 one.
    #[serde(default)]
    http: Option<HttpRequestLine>,
}

#[derive(Debug, Deserialize)]
struct Pending {
    summary: String,
}

fn print_explanation(e: &Explanation) {
    let port = format!("{}/{}", e.dst_port, e.protocol.as_str());
    match &e.flow {
        Some(f) => println!(
            "Flow {}: {} → {}:{port}, {} flow reported by node {} ({}, {} connections), last seen {}",
            f.id,
            printable(&f.src_addr),
            printable(&f.dst_addr),
            f.direction.as_str(),
            printable(&f.node_id),
            if f.comm.is_empty() { "no process name".to_owned() } else { printable(&f.comm) },
            f.connections,
            ago(f.last_seen_unix_ms)
        ),
        None => println!("Connection: {} → {} on {port}", printable(&e.source.name), printable(&e.destination.name)),
    }
    if let Some(r) = &e.request {
        println!("HTTP request: {} {}", printable(&r.method), printable(&r.path));
    }
    println!();
    print_party("Source", &e.source);
    print_party("Destination", &e.destination);
    println!();
    for s in [&e.egress, &e.ingress] {
        print_side(s);
    }
    println!();
    // The summary starts with the verdict; shout it.
    let rest = e.summary.strip_prefix(&format!("{} — ", e.verdict)).unwrap_or(&e.summary);
    println!("Verdict: {} — {}", e.verdict.to_uppercase(), printable(rest));

    if !e.enforcers.is_empty() {
        println!();
        println!("Enforcers");
        let v = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let rows: Vec<Vec<String>> = e
            .enforcers
            .iter()
            .map(|n| {
                vec![
                    printable(&n.node_id),
                    n.directions.iter().map(|d| d.as_str()).collect::<Vec<_>>().join(","),
                    v(n.desired_version),
                    v(n.applied_version),
                    n.state.replace('_', " ").to_uppercase(),
                    n.last_report_unix_ms.map(ago).unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        print_table(&["NODE", "JUDGES", "DESIRED", "APPLIED", "STATE", "LAST REPORT"], &rows);
    }

    println!();
    if e.events.is_empty() {
        println!("Recent verdict events: none reported for this connection.");
    } else {
        println!("Recent verdict events (newest first)");
        let rows: Vec<Vec<String>> = e
            .events
            .iter()
            .map(|v| {
                vec![
                    ago(v.at_unix_ms),
                    printable(&v.node_id),
                    printable(&v.verdict),
                    v.direction.as_str().to_owned(),
                    format!(
                        "{} → {}:{}/{}",
                        printable(&v.src_addr),
                        printable(&v.dst_addr),
                        v.dst_port,
                        v.protocol.as_str()
                    ),
                    printable(&v.reason),
                    v.http.as_ref().map_or_else(|| "-".to_owned(), |h| printable(&h.to_string())),
                ]
            })
            .collect();
        print_table(&["WHEN", "NODE", "VERDICT", "DIRECTION", "CONNECTION", "REASON", "REQUEST"], &rows);
    }
    for p in &e.pending {
        println!();
        println!("Pending: {}", printable(&p.summary));
    }
    if !e.notes.is_empty() {
        println!();
        println!("Notes");
        for n in &e.notes {
            println!("  - {}", printable(n));
        }
    }
}

fn print_party(role: &str, p: &Party) {
    let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{}={}", printable(k), printable(v))).collect();
    let addr = p.address.as_deref().map(|a| format!(" at {}", printable(a))).unwrap_or_default();
    println!("{role}: {} — identity {}{addr} ({})", printable(&p.name), p.identity.0, printable(&p.kind));
    if !labels.is_empty() {
        println!("  labels:      {}", labels.join(", "));
    }
    println!("  resolved by: {}", printable(&p.resolved_by));
    if let Some(mode) = p.mode {
        let nodes = if p.nodes.is_empty() { "no node reports it".to_owned() } else { printable(&p.nodes.join(", ")) };
        println!("  mode:        {} · runs on {nodes}", mode.as_str());
    }
}

fn print_side(s: &Side) {
    let mode = s.mode.map_or_else(|| "-".to_owned(), |m| m.as_str().to_owned());
    println!(
        "{} of {} (mode {mode}): {} → {}",
        capitalised(s.direction.as_str()),
        printable(&s.name),
        s.decision.result.replace('_', " "),
        s.verdict.to_uppercase()
    );
    println!("  {}", printable(&s.reason));
    let policy = |p: &PolicyRef| {
        format!("{} (proposal {}, version {}, {})", printable(&p.name), p.proposal_id, p.version, printable(&p.status))
    };
    if !s.policies.is_empty() {
        let names: Vec<String> = s.policies.iter().map(policy).collect();
        println!("  selected by: {}", names.join("; "));
    }
    if let (Some(p), Some(r)) = (&s.decision.policy, &s.decision.rule) {
        println!(
            "  rule:        {} {} rule {}: {} on {}",
            policy(p),
            r.direction.as_str(),
            r.index,
            printable(&r.peer),
            printable(&r.ports.join(", "))
        );
        if !r.http.is_empty() {
            println!("  L7 (HTTP):   {}", printable(&r.http.join(", ")));
        }
    }
    let covering: Vec<i64> = s.decision.policies.iter().map(|p| p.proposal_id).collect();
    let selecting: Vec<i64> = s.policies.iter().map(|p| p.proposal_id).collect();
    if s.decision.result == "default_deny" && !covering.is_empty() && covering != selecting {
        let names: Vec<String> = s.decision.policies.iter().map(policy).collect();
        println!("  covered by:  {}", names.join("; "));
    }
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

// === --at ===

/// `--at`: Unix milliseconds, an RFC 3339 time, or an age before `now_ms`.
pub fn parse_at(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    let s = s.trim();
    let hint = || {
        format!(
            "--at {s:?}: expected Unix milliseconds, an RFC 3339 time (2025-06-01T12:00:00Z) or an age (90s, 15m, \
             2h, 1d)"
        )
    };
    if let Ok(ms) = s.parse::<i64>() {
        anyhow::ensure!(ms >= 0, hint());
        return Ok(ms);
    }
    let age = s.trim_end_matches(" ago").trim_start_matches('-');
    if let Some(unit_at) = age.find(|c: char| !c.is_ascii_digit())
        && unit_at > 0
    {
        let (n, unit) = age.split_at(unit_at);
        let ms_per = match unit {
            "s" => Some(1_000),
            "m" => Some(60_000),
            "h" => Some(3_600_000),
            "d" => Some(86_400_000),
            _ => None,
        };
        if let Some(ms_per) = ms_per {
            let n: i64 = n.parse().with_context(hint)?;
            return n.checked_mul(ms_per).map(|d| now_ms.saturating_sub(d).max(0)).with_context(hint);
        }
    }
    rfc3339_ms(s).with_context(hint)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` as Unix milliseconds.
fn rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.find(|c: char| !c.is_ascii_digit()).unwrap_or(frac.len());
        if digits == 0 {
            return None;
        }
        let ms: String = frac[..digits].chars().chain("000".chars()).take(3).collect();
        millis = ms.parse::<i64>().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && matches!(&o[..1], "+" | "-") && &o[3..4] == ":" => {
            let m = o[1..3].parse::<i64>().ok()? * 60 + o[4..6].parse::<i64>().ok()?;
            if o.starts_with('-') { -m } else { m }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_min * 60;
    Some(secs * 1_000 + millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_takes_milliseconds_times_and_ages() {
        let now = 1_750_000_000_000;
        assert_eq!(parse_at("1700000000123", now).expect("ms"), 1_700_000_000_123);
        assert_eq!(parse_at("1970-01-01T00:00:00Z", now).expect("epoch"), 0);
        assert_eq!(parse_at("2025-06-01T12:00:00Z", now).expect("utc"), 1_748_779_200_000);
        assert_eq!(parse_at("2025-06-01T14:00:00.5+02:00", now).expect("offset"), 1_748_779_200_500);
        assert_eq!(parse_at("2000-02-29T00:00:00Z", now).expect("leap day"), 951_782_400_000);
        assert_eq!(parse_at("15m", now).expect("age"), now - 900_000);
        assert_eq!(parse_at("2h ago", now).expect("age"), now - 7_200_000);
        assert_eq!(parse_at("-1d", now).expect("age"), now - 86_400_000);
        for bad in ["yesterday", "2025-13-01T00:00:00Z", "2025-06-01T12:00:00", "5y", "-5", ""] {
            assert!(parse_at(bad, now).is_err(), "{bad:?} must be refused");
        }
    }
}
