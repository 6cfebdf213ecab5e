//! "What would this block?" — recorded flows of a time range evaluated against a
//! proposal or the whole policy set, before anything is enforced.
//!
//! A connection is often recorded twice (the client's collector and the server's);
//! results are per connection tuple, with how many flow records and connections
//! stand behind it.
//!
//! L7: a connection a policy allows only through HTTP rules is checked request by
//! request against the (method, path) pairs its edge carried in the range (the
//! learner keeps those per edge, not per flow record); one the rules do not match
//! makes the tuple a would-deny, listed in `requests`. Flows of an edge without HTTP
//! facts are judged at L4 alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use bulkhead_model::{Direction, EdgeHttp, EdgeKey, Identity, Policy, ProposalStatus, Protocol};
use bulkhead_synth::{Connection, Decision, Evaluator, SideVerdict};
use serde::{Deserialize, Serialize};

use super::inputs::Inputs;
use super::{PolicyError, PolicyService};
use crate::store::{FlowQuery, MAX_FLOW_PAGE};

/// At most this many recorded flows are evaluated per request; the report says when
/// the range held more.
pub const MAX_REPLAY_FLOWS: u64 = 5_000_000;

/// What to replay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayRequest {
    /// Evaluate this proposal alone (its workload's flows only). `None`: the active
    /// policy set (deployed, or approved where newer).
    pub proposal_id: Option<i64>,
    /// With the active set: let pending proposals stand in for their workloads.
    #[serde(default)]
    pub include_proposed: bool,
    pub from_unix_ms: i64,
    pub to_unix_ms: i64,
    /// At most this many would-deny connections listed (all are counted).
    pub limit: Option<usize>,
}

/// One connection tuple that would be denied.
#[derive(Debug, Clone, Serialize)]
pub struct WouldDeny {
    pub src: Identity,
    pub dst: Identity,
    pub src_name: String,
    pub dst_name: String,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    pub protocol: Protocol,
    /// Recorded flows behind this tuple and their connections.
    pub flows: u64,
    pub connections: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    /// Which side denies: "egress of X by policy P", "ingress of Y by policy Q".
    pub reasons: Vec<String>,
    /// HTTP requests of the edge the policies' HTTP rules would deny (the connection
    /// itself passes at L4).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<DeniedRequest>,
}

/// An HTTP request an L7 rule would deny, with how often it was seen in the range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeniedRequest {
    pub method: String,
    pub path: String,
    pub requests: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    /// Names of the policies evaluated.
    pub policies: Vec<String>,
    pub flows_evaluated: u64,
    /// The range held more flows than [`MAX_REPLAY_FLOWS`]; the oldest were not read.
    pub truncated: bool,
    pub connections_total: u64,
    pub would_deny_total: u64,
    pub would_deny: Vec<WouldDeny>,
}

impl PolicyService {
    pub async fn replay(&self, req: &ReplayRequest) -> Result<ReplayReport, PolicyError> {
        if req.to_unix_ms < req.from_unix_ms {
            return Err(PolicyError::InvalidRequest { reason: "the range ends before it starts".into() });
        }
        let (policies, only) = self.replay_set(req).await?;
        let window = bulkhead_model::Window { from_unix_ms: req.from_unix_ms, to_unix_ms: req.to_unix_ms };
        let inputs = super::inputs::gather(&self.store, &self.inventory, &Default::default(), window).await?;
        let fqdn = fqdn_map(&inputs);
        let ev = Evaluator::new(&policies, &inputs.identities, &fqdn);
        let names: BTreeMap<Identity, &str> = inputs.identities.iter().map(|i| (i.id, i.name.as_str())).collect();
        let http: BTreeMap<EdgeKey, &EdgeHttp> = inputs.http.iter().map(|h| (h.key, h)).collect();
        // Requests denied at L7, per connection tuple (the same for all its flows).
        let mut l7_cache: BTreeMap<Key, Vec<(DeniedRequest, Vec<String>)>> = BTreeMap::new();

        type Key = (Identity, Identity, IpAddr, IpAddr, u16, Protocol);
        let mut denied: BTreeMap<Key, (WouldDeny, BTreeSet<String>)> = BTreeMap::new();
        let mut seen: BTreeSet<Key> = BTreeSet::new();
        let mut evaluated = 0u64;
        let mut before_id = None;
        let mut truncated = false;
        loop {
            let q = FlowQuery {
                since_unix_ms: Some(req.from_unix_ms),
                until_unix_ms: Some(req.to_unix_ms),
                identity: only,
                limit: MAX_FLOW_PAGE,
                before_id,
                ..FlowQuery::default()
            };
            let page = self.store.flows(&q).await?;
            let Some(last) = page.last() else { break };
            before_id = Some(last.id);
            for row in &page {
                evaluated += 1;
                let f = &row.flow;
                let c = Connection {
                    src: row.src_identity,
                    dst: row.dst_identity,
                    src_addr: Some(f.src_addr),
                    dst_addr: Some(f.dst_addr),
                    dst_port: f.dst_port,
                    protocol: f.protocol,
                };
                let key = (c.src, c.dst, f.src_addr, f.dst_addr, f.dst_port, f.protocol);
                seen.insert(key);
                let d = ev.decide(&c);
                let denied_requests = if d.allowed() {
                    let edge = EdgeKey { src: c.src, dst: c.dst, dst_port: c.dst_port, protocol: c.protocol };
                    let found = l7_cache
                        .entry(key)
                        .or_insert_with(|| l7_denied(&ev, &c, http.get(&edge).copied(), req, &policies, &names));
                    if found.is_empty() {
                        continue;
                    }
                    found.clone()
                } else {
                    Vec::new()
                };
                let entry = denied.entry(key).or_insert_with(|| {
                    let name = |id: Identity| names.get(&id).map_or_else(|| id.to_string(), |n| (*n).to_owned());
                    (
                        WouldDeny {
                            src: c.src,
                            dst: c.dst,
                            src_name: name(c.src),
                            dst_name: name(c.dst),
                            src_addr: f.src_addr,
                            dst_addr: f.dst_addr,
                            dst_port: f.dst_port,
                            protocol: f.protocol,
                            flows: 0,
                            connections: 0,
                            first_seen_unix_ms: f.first_seen_unix_ms,
                            last_seen_unix_ms: f.last_seen_unix_ms,
                            reasons: Vec::new(),
                            requests: Vec::new(),
                        },
                        BTreeSet::new(),
                    )
                });
                let w = &mut entry.0;
                w.flows += 1;
                w.connections = w.connections.saturating_add(f.connections);
                w.first_seen_unix_ms = w.first_seen_unix_ms.min(f.first_seen_unix_ms);
                w.last_seen_unix_ms = w.last_seen_unix_ms.max(f.last_seen_unix_ms);
                entry.1.extend(reasons(&d, &c, &policies, &names));
                if w.requests.is_empty() {
                    for (r, why) in denied_requests {
                        entry.1.extend(why);
                        entry.0.requests.push(r);
                    }
                }
            }
            if evaluated >= MAX_REPLAY_FLOWS {
                truncated = true;
                break;
            }
        }
        let would_deny_total = denied.len() as u64;
        let mut would_deny: Vec<WouldDeny> = denied
            .into_values()
            .map(|(mut w, r)| {
                w.reasons = r.into_iter().collect();
                w
            })
            .collect();
        // Most active first: that is what breaks loudest.
        would_deny
            .sort_by(|a, b| b.connections.cmp(&a.connections).then(b.last_seen_unix_ms.cmp(&a.last_seen_unix_ms)));
        would_deny.truncate(req.limit.unwrap_or(1000));
        Ok(ReplayReport {
            policies: policies.iter().map(|p| p.name.clone()).collect(),
            flows_evaluated: evaluated,
            truncated,
            connections_total: seen.len() as u64,
            would_deny_total,
            would_deny,
        })
    }

    /// The policies to evaluate and, for a single proposal, the identity whose flows
    /// matter.
    async fn replay_set(&self, req: &ReplayRequest) -> Result<(Vec<Policy>, Option<Identity>), PolicyError> {
        if let Some(id) = req.proposal_id {
            let r = self.proposal(id).await?;
            let policy = r.approved_policy.unwrap_or(r.proposal.policy);
            return Ok((vec![policy], Some(r.summary.target)));
        }
        let mut by_target: BTreeMap<Identity, (u32, Policy)> = BTreeMap::new();
        let mut put = |target: Identity, version: u32, policy: Policy| {
            let slot = by_target.entry(target).or_insert((version, policy.clone()));
            if version > slot.0 {
                *slot = (version, policy);
            }
        };
        for a in self.store.active_policies().await? {
            put(a.target, a.version, a.policy);
        }
        if req.include_proposed {
            let q = crate::store::ProposalQuery {
                status: Some(ProposalStatus::Proposed),
                limit: crate::store::MAX_PROPOSAL_PAGE,
                ..Default::default()
            };
            for s in self.store.proposals(&q).await? {
                if let Some(r) = self.store.proposal(s.id).await? {
                    put(s.target, s.version, r.proposal.policy);
                }
            }
        }
        Ok((by_target.into_values().map(|(_, p)| p).collect(), None))
    }
}

fn fqdn_map(inputs: &Inputs) -> BTreeMap<String, Vec<IpAddr>> {
    let mut m: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
    for d in &inputs.dns {
        m.entry(d.name.clone()).or_default().insert(d.addr);
    }
    m.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect()
}

/// The requests of `edge` in the range the policies would deny on connection `c` (which
/// passes at L4), each with the reasons.
fn l7_denied(
    ev: &Evaluator<'_>,
    c: &Connection,
    edge: Option<&EdgeHttp>,
    req: &ReplayRequest,
    policies: &[Policy],
    names: &BTreeMap<Identity, &str>,
) -> Vec<(DeniedRequest, Vec<String>)> {
    let Some(edge) = edge else { return Vec::new() };
    edge.requests
        .iter()
        .filter(|r| r.last_seen_unix_ms >= req.from_unix_ms && r.first_seen_unix_ms <= req.to_unix_ms)
        .filter_map(|r| {
            let d = ev.decide_request(c, &r.method, &r.path);
            (!d.allowed()).then(|| {
                let why = reasons(&d, c, policies, names)
                    .into_iter()
                    .map(|w| format!("{} {}: {w} (HTTP rules)", r.method, r.path))
                    .collect();
                (DeniedRequest { method: r.method.clone(), path: r.path.clone(), requests: r.requests }, why)
            })
        })
        .collect()
}

fn reasons(d: &Decision, c: &Connection, policies: &[Policy], names: &BTreeMap<Identity, &str>) -> Vec<String> {
    let mut out = Vec::new();
    for (side, dir, who) in [(&d.egress, Direction::Egress, c.src), (&d.ingress, Direction::Ingress, c.dst)] {
        if let SideVerdict::DefaultDeny { policies: ps } = side {
            let by: Vec<&str> = ps.iter().filter_map(|n| policies.get(*n)).map(|p| p.name.as_str()).collect();
            let who = names.get(&who).map_or_else(|| who.to_string(), |n| (*n).to_owned());
            out.push(format!("{} of {who}: not allowed by {}", dir.as_str(), by.join(", ")));
        }
    }
    out
}
