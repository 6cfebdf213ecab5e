//! "Why was this flow denied — and would it be?" (`GET /api/v1/explain`,
//! `bulkhead explain`).
//!
//! One connection — a recorded flow, or a tuple an operator names by workload, address
//! or identity — is resolved to the identities of both ends and judged the way the
//! enforcers judge it: the active policy set (per workload the newest approved or
//! deployed version, what distribution compiles) through the same pure evaluator
//! replay and synthesis use ([`bulkhead_synth::Evaluator`]), then each direction by its
//! workload's rollout mode — `learn`: the policy is not installed, nothing is judged;
//! `monitor`: a would-deny passes and is reported (audit); `enforce`: it is dropped.
//! There is deliberately no second evaluator here: what explain says and what replay,
//! the graph and the compiled node policies say cannot drift apart.
//!
//! Around that answer it puts what decides whether the answer is what actually
//! happens: whether the enforcers of the nodes involved applied the version the
//! learner wants (a stale enforcer still decides by an older one), the verdict events
//! enforcers reported for the tuple, and the pending proposal that would change the
//! answer once approved.
//!
//! The answer is for the policy set and modes in force *now*. `at` chooses which
//! reported events are shown (those up to that moment) and makes the notes name any
//! rollout mode or policy of the two workloads that changed after it: the learner keeps
//! the audit trail of such changes, not replayable snapshots of older policy sets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use bulkhead_model::labels::NAME_KEYS;
use bulkhead_model::{
    Direction, Identity, Labels, Policy, ProposalStatus, Protocol, ReservedIdentity, RolloutMode, Rule, Verdict,
};
use bulkhead_synth::{Connection, Evaluator, IdentityInfo, IdentityKind, SideVerdict};
use serde::Serialize;

use super::PolicyService;
use crate::distribute::stream::DNS_GRACE_MS;
use crate::identity::inventory::CIDR_GROUP_KEY;
use crate::policy::inputs::SERVICE_ACCOUNT_KEY;
use crate::store::{
    EndpointRow, EnforcerRow, FlowQuery, FlowRow, ProposalQuery, RolloutRow, StoreError, VerdictEventRecord,
    VerdictQuery,
};

/// Most verdict events an answer lists (newest first).
pub const MAX_EVENTS: usize = 10;

/// Most verdict events of one workload scanned for ones matching the tuple: the events
/// are indexed by workload, not by peer and port, so a busy workload's matching events
/// are searched for in its newest ones only.
pub const EVENT_SCAN_LIMIT: usize = 5_000;

/// Events up to this long after `at` still count: node clocks and the moment an
/// operator names are rarely exact.
pub const EVENT_SLACK_MS: i64 = 60_000;

/// An enforcer without a verdict report for this long is called silent (they report
/// every second by default).
pub const SILENT_AFTER_MS: i64 = 5 * 60_000;

/// Longest accepted endpoint description (`--from`, `--to`).
pub const MAX_SPEC_LEN: usize = 1_024;

/// Candidates named in an "ambiguous" answer.
const MAX_CANDIDATES: usize = 10;

/// Page size of the event scan.
const EVENT_PAGE: u32 = 1_000;

/// Why a question could not be answered. Each variant is something the caller can fix
/// (the API answers 404 or 400 with the message), except [`ExplainError::Store`].
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("flow {id} does not exist (never recorded, or pruned after the flow retention window)")]
    NoSuchFlow { id: i64 },
    #[error("{given:?} names no known workload, identity or reserved entity")]
    UnknownEndpoint { given: String },
    #[error("{given:?} is ambiguous: it names {candidates}; give namespace/name or the identity number")]
    Ambiguous { given: String, candidates: String },
    #[error("invalid request: {reason}")]
    Invalid { reason: String },
}

// === request ===

/// Which connection to explain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExplainTarget {
    /// A recorded flow (its id from `/api/v1/flows`, `bulkhead flows`, the flows page).
    Flow { id: i64 },
    /// A connection `from` would open to `to` on `port`. Each end is a workload name,
    /// `namespace/name`, an identity number, a reserved entity (`world`,
    /// `reserved:host`, …) or an IP address.
    Tuple { from: String, to: String, port: u16, protocol: Protocol },
}

/// One HTTP request on the connection, to judge L7 rules by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
}

/// A question for [`PolicyService::explain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainRequest {
    pub target: ExplainTarget,
    /// The moment asked about (Unix ms); default: the flow's last sighting, or now.
    pub at_unix_ms: Option<i64>,
    /// Judge this request (TCP only) instead of the connection alone.
    pub request: Option<HttpRequest>,
}

// === answer ===

/// What an end of the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PartyKind {
    /// A managed workload: policies select it, enforcers judge its traffic.
    Workload,
    /// A reserved entity (host, world, …): never selected by a policy.
    Reserved,
    /// A named external CIDR group: only ever a peer.
    External,
}

/// One end of the connection, resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Party {
    pub identity: Identity,
    pub name: String,
    pub namespace: Option<String>,
    pub labels: Labels,
    pub kind: PartyKind,
    /// How the description (or the flow) became this identity.
    pub resolved_by: String,
    pub address: Option<IpAddr>,
    /// Nodes running this end (its endpoints as the collectors last reported them).
    pub nodes: Vec<String>,
    /// Rollout mode of a managed workload; `None` for the others.
    pub mode: Option<RolloutMode>,
}

impl Party {
    fn managed(&self) -> bool {
        self.kind == PartyKind::Workload && !self.identity.is_reserved()
    }
}

/// An approved or deployed policy version (or a pending one, in [`PendingChange`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyRef {
    pub proposal_id: i64,
    /// The workload the proposal was made for.
    pub target: Identity,
    pub version: u32,
    pub status: ProposalStatus,
    pub name: String,
}

/// A rule as operators read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleView {
    pub direction: Direction,
    /// Index in the policy's rule list of that direction (what verdict events and rule
    /// hit counters name).
    pub index: usize,
    pub peer: String,
    pub ports: Vec<String>,
    /// The HTTP requests an L7 rule admits (`POST /v1/request-landing`); empty = L4.
    pub http: Vec<String>,
}

/// How one direction decided by policy (before the rollout mode is applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum SideDecision {
    /// A rule of a policy selecting the workload allows it.
    Allowed { policy: PolicyRef, rule: RuleView },
    /// The connection passes by `rule`, but the HTTP request matches none of its HTTP
    /// rules (nor does any L4 rule allow the port).
    RequestDenied { policy: PolicyRef, rule: RuleView },
    /// Policies selecting the workload cover this direction and none of their rules
    /// allows the connection.
    DefaultDeny { policies: Vec<PolicyRef> },
    /// No policy selecting the workload covers this direction: allowed.
    NotCovered,
    /// This end is not a managed workload (reserved entity, outside address): no
    /// policy selects it and no enforcer judges its side.
    NotManaged,
}

impl SideDecision {
    pub fn allows(&self) -> bool {
        matches!(self, SideDecision::Allowed { .. } | SideDecision::NotCovered | SideDecision::NotManaged)
    }

    /// The kind of answer, without which policy or rule gave it.
    pub fn class(&self) -> &'static str {
        match self {
            SideDecision::Allowed { .. } => "allowed",
            SideDecision::RequestDenied { .. } => "request_denied",
            SideDecision::DefaultDeny { .. } => "default_deny",
            SideDecision::NotCovered => "not_covered",
            SideDecision::NotManaged => "not_managed",
        }
    }
}

/// What an enforcer does with the connection. Ordered: the worse of two sides wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EnforcerVerdict {
    /// Allowed, or not judged at all.
    Pass,
    /// Would be denied; passed and reported (monitor).
    Audit,
    /// Dropped and reported (enforce).
    Drop,
}

impl EnforcerVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            EnforcerVerdict::Pass => "pass",
            EnforcerVerdict::Audit => "audit",
            EnforcerVerdict::Drop => "drop",
        }
    }
}

/// One direction: the initiator's egress or the responder's ingress.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub direction: Direction,
    /// The workload whose side this is.
    pub workload: Identity,
    pub name: String,
    pub mode: Option<RolloutMode>,
    /// Approved or deployed policies selecting the workload.
    pub policies: Vec<PolicyRef>,
    pub decision: SideDecision,
    /// What the enforcer does on this side in the workload's current mode.
    pub verdict: EnforcerVerdict,
    pub reason: String,
    /// Nodes running the workload: their enforcers judge this side (outside learn).
    pub nodes: Vec<String>,
}

/// How far a node's enforcer is from what the learner wants it to enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnforcerState {
    /// It applied the version the learner wants.
    InSync,
    /// It still enforces an older version (or none): it has not applied the newest.
    Stale,
    /// It refused the newest version and keeps enforcing its previous one.
    Rejected,
    /// The learner has no policy for the node (nothing there in monitor or enforce).
    NoPolicy,
    /// No enforcer ever connected from the node: nothing is enforced there.
    NotConnected,
}

/// A node whose enforcer judges one side of the connection.
#[derive(Debug, Clone, Serialize)]
pub struct NodeEnforcer {
    pub node_id: String,
    /// The sides of the connection whose workload runs there (judged by this enforcer
    /// once the workload is in monitor or enforce).
    pub directions: Vec<Direction>,
    pub state: EnforcerState,
    pub desired_version: Option<u64>,
    pub applied_version: Option<u64>,
    pub rejected_version: Option<u64>,
    pub last_error: Option<String>,
    pub last_seen_unix_ms: Option<i64>,
    pub last_report_unix_ms: Option<i64>,
    /// No verdict report for [`SILENT_AFTER_MS`].
    pub silent: bool,
    pub message: String,
}

/// A reported verdict event for the tuple, with its reason in words.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    #[serde(flatten)]
    pub record: VerdictEventRecord,
    pub reason: String,
}

/// A pending proposal that, once approved, would decide the connection differently.
#[derive(Debug, Clone, Serialize)]
pub struct PendingChange {
    pub proposal: PolicyRef,
    pub egress: SideDecision,
    pub ingress: SideDecision,
    /// The enforcers' verdict with it approved, in the current modes.
    pub verdict: EnforcerVerdict,
    pub summary: String,
}

/// The flow record a question started from.
#[derive(Debug, Clone, Serialize)]
pub struct FlowFacts {
    pub id: i64,
    /// The node whose collector reported it (it runs the flow's local side).
    pub node_id: String,
    pub direction: Direction,
    pub src_addr: IpAddr,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
    pub protocol: Protocol,
    pub comm: String,
    pub connections: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub flow: Option<FlowFacts>,
    pub source: Party,
    pub destination: Party,
    pub dst_port: u16,
    pub protocol: Protocol,
    pub request: Option<HttpRequest>,
    /// The moment asked about (events up to it are shown).
    pub at_unix_ms: i64,
    /// When the answer was computed: the policy set and modes are those of this moment.
    pub evaluated_unix_ms: i64,
    pub egress: Side,
    pub ingress: Side,
    /// Both directions allow it by policy (modes aside).
    pub allowed_by_policy: bool,
    /// What the enforcers do with it now: the worse of the two sides.
    pub verdict: EnforcerVerdict,
    pub summary: String,
    pub enforcers: Vec<NodeEnforcer>,
    /// Reported audit and deny events for this tuple, newest first.
    pub events: Vec<EventView>,
    pub pending: Vec<PendingChange>,
    pub notes: Vec<String>,
}

// === impl PolicyService ===

impl PolicyService {
    /// Explains one connection; see the module docs. `now_ms` is the evaluation time.
    pub async fn explain(&self, req: &ExplainRequest, now_ms: i64) -> Result<Explanation, ExplainError> {
        if let Some(at) = req.at_unix_ms
            && at < 0
        {
            return Err(invalid(format!("at must be a Unix time in milliseconds, got {at}")));
        }
        let ctx = Context::load(self, now_ms).await?;
        let (flow, source, destination, dst_port, protocol) = match &req.target {
            ExplainTarget::Flow { id } => {
                let row = self.flow_by_id(*id).await?;
                let (src, dst) = ctx.flow_parties(&row);
                (Some(facts(&row)), src, dst, row.flow.dst_port, row.flow.protocol)
            }
            ExplainTarget::Tuple { from, to, port, protocol } => {
                if *port == 0 {
                    return Err(invalid("port must be 1–65535".into()));
                }
                (None, ctx.resolve(self, "from", from)?, ctx.resolve(self, "to", to)?, *port, *protocol)
            }
        };
        if req.request.is_some() && protocol != Protocol::Tcp {
            return Err(invalid("an HTTP request can only be judged on a TCP connection".into()));
        }
        let at_unix_ms = req.at_unix_ms.or(flow.as_ref().map(|f| f.last_seen_unix_ms)).unwrap_or(now_ms);
        let conn = Connection {
            src: source.identity,
            dst: destination.identity,
            src_addr: source.address,
            dst_addr: destination.address,
            dst_port,
            protocol,
        };
        let parties = Parties { source: &source, destination: &destination, port: dst_port };

        let set = PolicySet::new(&ctx.active);
        let [egress_d, ingress_d] = set.decide(&ctx, &conn, req.request.as_ref(), &parties);
        let egress = side(&set, Direction::Egress, &source, egress_d, &parties, req.request.is_some());
        let ingress = side(&set, Direction::Ingress, &destination, ingress_d, &parties, req.request.is_some());
        let verdict = egress.verdict.max(ingress.verdict);
        let allowed_by_policy = egress.decision.allows() && ingress.decision.allows();
        let summary = summary(verdict, &egress, &ingress);

        let enforcers = ctx.enforcers_for(&[&egress, &ingress], now_ms);
        let mut notes = Vec::new();
        for e in &enforcers {
            if matches!(e.state, EnforcerState::Stale | EnforcerState::Rejected) || e.silent {
                notes.push(e.message.clone());
            }
        }
        let since_note = |p: &Party| ctx.mode_changed_after(p, at_unix_ms);
        notes.extend([since_note(&source), since_note(&destination)].into_iter().flatten());
        notes.extend(self.policies_changed_after(&egress, &ingress, at_unix_ms).await?);

        // Events up to the moment asked about: an explicit `at`, or the flow's last sighting.
        let until = (req.at_unix_ms.is_some() || flow.is_some()).then(|| at_unix_ms.saturating_add(EVENT_SLACK_MS));
        let mut events = self.matching_events(&egress, &destination, &conn, until).await?;
        events.extend(self.matching_events(&ingress, &source, &conn, until).await?);
        events.sort_by(|a, b| {
            b.record.event.at_unix_ms.cmp(&a.record.event.at_unix_ms).then(b.record.id.cmp(&a.record.id))
        });
        events.truncate(MAX_EVENTS);

        let pending = self.pending_changes(&ctx, &conn, req.request.as_ref(), &parties, [&egress, &ingress]).await?;
        Ok(Explanation {
            flow,
            dst_port,
            protocol,
            request: req.request.clone(),
            at_unix_ms,
            evaluated_unix_ms: now_ms,
            allowed_by_policy,
            verdict,
            summary,
            enforcers,
            events,
            pending,
            notes,
            source,
            destination,
            egress,
            ingress,
        })
    }

    /// The flow with this id: the newest flow with a smaller id than `id + 1` is it, if
    /// it still exists.
    async fn flow_by_id(&self, id: i64) -> Result<FlowRow, ExplainError> {
        let Some(before) = id.checked_add(1).filter(|_| id > 0) else {
            return Err(ExplainError::NoSuchFlow { id });
        };
        let q = FlowQuery { before_id: Some(before), limit: 1, ..FlowQuery::default() };
        self.store.flows(&q).await?.into_iter().find(|r| r.id == id).ok_or(ExplainError::NoSuchFlow { id })
    }

    /// Notes for selecting policies decided or deployed after `at`.
    async fn policies_changed_after(
        &self,
        egress: &Side,
        ingress: &Side,
        at: i64,
    ) -> Result<Vec<String>, ExplainError> {
        let ids: BTreeSet<i64> = egress.policies.iter().chain(&ingress.policies).map(|p| p.proposal_id).collect();
        let mut out = Vec::new();
        for id in ids {
            let Some(r) = self.store.proposal(id).await? else { continue };
            let s = &r.summary;
            let changed = [s.decided_unix_ms, s.deployed_unix_ms].into_iter().flatten().filter(|t| *t > at).max();
            if let Some(t) = changed {
                out.push(format!(
                    "Policy {} (proposal {id}, version {}) was decided or deployed at {}, after the time asked \
                     about ({}); the answer is for the policy set in force now.",
                    r.proposal.policy.name,
                    s.version,
                    utc(t),
                    utc(at)
                ));
            }
        }
        Ok(out)
    }

    /// Audit and deny events the enforcers reported for `side`'s workload with `peer`
    /// on the connection's port, newest first, up to [`MAX_EVENTS`].
    async fn matching_events(
        &self,
        side: &Side,
        peer: &Party,
        conn: &Connection,
        until: Option<i64>,
    ) -> Result<Vec<EventView>, ExplainError> {
        if side.decision == SideDecision::NotManaged {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut before_id = None;
        let mut scanned = 0usize;
        while out.len() < MAX_EVENTS && scanned < EVENT_SCAN_LIMIT {
            let q = VerdictQuery {
                identity: Some(side.workload),
                until_unix_ms: until,
                limit: EVENT_PAGE,
                before_id,
                ..VerdictQuery::default()
            };
            let page = self.store.verdict_events(&q).await?;
            scanned += page.len();
            let Some(last) = page.last() else { break };
            before_id = Some(last.id);
            let full = page.len() == EVENT_PAGE as usize;
            for r in page {
                let e = &r.event;
                // External peers have node-local identities in the enforcer: their
                // address names them.
                let peer_addr = match side.direction {
                    Direction::Egress => e.dst_addr,
                    Direction::Ingress => e.src_addr,
                };
                let matches = e.direction == side.direction
                    && e.dst_port == conn.dst_port
                    && e.protocol == conn.protocol
                    && e.verdict != Verdict::Forwarded
                    && (e.peer == peer.identity || peer.address == Some(peer_addr));
                if matches && out.len() < MAX_EVENTS {
                    let reason = match &e.rule {
                        None => format!("default deny of the covered {}", e.direction.as_str()),
                        Some(rule) => format!(
                            "HTTP request not allowed by proposal {} {} rule {}",
                            rule.proposal_id,
                            rule.direction.as_str(),
                            rule.rule_index
                        ),
                    };
                    out.push(EventView { record: r, reason });
                }
            }
            if !full {
                break;
            }
        }
        Ok(out)
    }

    /// The newest pending proposal of either managed end, where approving it would
    /// decide a side differently.
    async fn pending_changes(
        &self,
        ctx: &Context,
        conn: &Connection,
        request: Option<&HttpRequest>,
        parties: &Parties<'_>,
        sides: [&Side; 2],
    ) -> Result<Vec<PendingChange>, ExplainError> {
        let mut targets: Vec<Identity> = Vec::new();
        for p in [parties.source, parties.destination] {
            if p.managed() && !targets.contains(&p.identity) {
                targets.push(p.identity);
            }
        }
        let mut out = Vec::new();
        for target in targets {
            let q = ProposalQuery {
                status: Some(ProposalStatus::Proposed),
                target: Some(target),
                limit: 1,
                before_id: None,
            };
            let Some(summary) = self.store.proposals(&q).await?.into_iter().next() else { continue };
            let Some(record) = self.store.proposal(summary.id).await? else { continue };
            let pref = PolicyRef {
                proposal_id: summary.id,
                target,
                version: summary.version,
                status: summary.status,
                name: record.proposal.policy.name.clone(),
            };
            let mut active = ctx.active.clone();
            active.insert(target, (pref.clone(), record.proposal.policy));
            let set = PolicySet::new(&active);
            let [e, i] = set.decide(ctx, conn, request, parties);
            // Only a flip between allowing and denying changes the answer (not covered →
            // allowed by a new rule does not).
            if e.allows() == sides[0].decision.allows() && i.allows() == sides[1].decision.allows() {
                continue;
            }
            let has_request = request.is_some();
            let egress = side(&set, Direction::Egress, parties.source, e, parties, has_request);
            let ingress = side(&set, Direction::Ingress, parties.destination, i, parties, has_request);
            let verdict = egress.verdict.max(ingress.verdict);
            let summary = format!(
                "Approving proposal {} ({} version {}) would make it: egress {}, ingress {} → {} in the current modes.",
                pref.proposal_id,
                pref.name,
                pref.version,
                egress.decision.class().replace('_', " "),
                ingress.decision.class().replace('_', " "),
                verdict.as_str()
            );
            out.push(PendingChange {
                proposal: pref,
                egress: egress.decision,
                ingress: ingress.decision,
                verdict,
                summary,
            });
        }
        Ok(out)
    }
}

fn invalid(reason: String) -> ExplainError {
    ExplainError::Invalid { reason }
}

fn facts(r: &FlowRow) -> FlowFacts {
    let f = &r.flow;
    FlowFacts {
        id: r.id,
        node_id: r.node_id.clone(),
        direction: f.direction,
        src_addr: f.src_addr,
        dst_addr: f.dst_addr,
        dst_port: f.dst_port,
        protocol: f.protocol,
        comm: f.comm.clone(),
        connections: f.connections,
        first_seen_unix_ms: f.first_seen_unix_ms,
        last_seen_unix_ms: f.last_seen_unix_ms,
    }
}

/// Both ends, for the pure parts.
struct Parties<'a> {
    source: &'a Party,
    destination: &'a Party,
    port: u16,
}

// === context: the store's state, once per question ===

/// Everything a question is answered from.
struct Context {
    labels: BTreeMap<Identity, Labels>,
    infos: Vec<IdentityInfo>,
    /// Display name per identity.
    names: BTreeMap<Identity, String>,
    /// Every name an identity can be asked for by.
    aliases: BTreeMap<Identity, BTreeSet<String>>,
    endpoints: Vec<EndpointRow>,
    modes: BTreeMap<Identity, RolloutRow>,
    /// Per target the newest approved or deployed policy (what distribution compiles).
    active: BTreeMap<Identity, (PolicyRef, Policy)>,
    enforcers: BTreeMap<String, EnforcerRow>,
    /// DNS names → addresses still valid, as distribution uses them for FQDN peers.
    fqdn: BTreeMap<String, Vec<IpAddr>>,
}

impl Context {
    async fn load(service: &PolicyService, now_ms: i64) -> Result<Context, StoreError> {
        let store = &service.store;
        let (identities, endpoints, modes, active_rows, enforcers, dns) = tokio::try_join!(
            store.identities(),
            store.endpoints(),
            store.rollout_modes(),
            store.active_policies(),
            store.enforcers(),
            store.dns_answers(now_ms.saturating_sub(24 * 3_600_000)),
        )?;
        let mut active: BTreeMap<Identity, (PolicyRef, Policy)> = BTreeMap::new();
        for a in active_rows {
            if active.get(&a.target).is_some_and(|(r, _)| r.version >= a.version) {
                continue;
            }
            let r = PolicyRef {
                proposal_id: a.proposal_id,
                target: a.target,
                version: a.version,
                status: a.status,
                name: a.policy.name.clone(),
            };
            active.insert(a.target, (r, a.policy));
        }
        let mut fqdn: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for a in dns {
            let valid_until =
                a.seen_unix_ms.saturating_add(i64::from(a.ttl_seconds) * 1000).saturating_add(DNS_GRACE_MS);
            if valid_until >= now_ms {
                fqdn.entry(a.name).or_default().push(a.addr);
            }
        }
        for addrs in fqdn.values_mut() {
            addrs.sort();
            addrs.dedup();
        }

        let inventory = &service.inventory;
        let by_labels: HashMap<&Labels, &str> =
            inventory.workloads().iter().map(|w| (&w.labels, w.name.as_str())).collect();
        let mut given: HashMap<Identity, BTreeSet<&str>> = HashMap::new();
        for e in &endpoints {
            if let Some(w) = e.workload.as_deref().filter(|w| !w.is_empty()) {
                given.entry(e.identity).or_default().insert(w);
            }
        }
        let mut infos = Vec::new();
        let mut names = BTreeMap::new();
        let mut aliases: BTreeMap<Identity, BTreeSet<String>> = BTreeMap::new();
        for row in &identities {
            let id = row.id;
            if let Some(r) = id.reserved() {
                names.insert(id, r.name().to_owned());
                continue;
            }
            let group = row.labels.get(CIDR_GROUP_KEY);
            let mut base: Vec<String> = given.get(&id).into_iter().flatten().map(|s| (*s).to_owned()).collect();
            base.extend(by_labels.get(&row.labels).map(|s| (*s).to_owned()));
            base.extend(group.map(str::to_owned));
            base.extend(NAME_KEYS.iter().filter_map(|k| row.labels.get(k)).map(str::to_owned));
            let name = base
                .first()
                .cloned()
                .or_else(|| row.labels.workload_name())
                .unwrap_or_else(|| format!("identity-{}", id.0));
            let set = aliases.entry(id).or_default();
            set.extend(row.labels.workload_name());
            for b in base {
                if let Some(ns) = row.labels.namespace()
                    && !b.contains('/')
                {
                    set.insert(format!("{ns}/{b}"));
                }
                set.insert(b);
            }
            let kind = match group {
                Some(g) => IdentityKind::CidrGroup { cidrs: inventory.cidrs_of(g) },
                None => IdentityKind::Workload,
            };
            infos.push(IdentityInfo {
                id,
                name: name.clone(),
                labels: row.labels.clone(),
                kind,
                kubernetes: row.labels.get(SERVICE_ACCOUNT_KEY).is_some(),
                service_backend: false,
            });
            names.insert(id, name);
        }
        Ok(Context {
            labels: identities.into_iter().map(|r| (r.id, r.labels)).collect(),
            infos,
            names,
            aliases,
            endpoints,
            modes: modes.into_iter().map(|r| (r.target, r)).collect(),
            active,
            enforcers: enforcers.into_iter().map(|e| (e.node_id.clone(), e)).collect(),
            fqdn,
        })
    }

    fn name(&self, id: Identity) -> String {
        self.names.get(&id).cloned().unwrap_or_else(|| match id.reserved() {
            Some(r) => r.name().to_owned(),
            None => format!("identity-{}", id.0),
        })
    }

    fn kind(&self, id: Identity) -> PartyKind {
        if id.is_reserved() {
            PartyKind::Reserved
        } else if self.labels.get(&id).is_some_and(|l| l.get(CIDR_GROUP_KEY).is_some()) {
            PartyKind::External
        } else {
            PartyKind::Workload
        }
    }

    /// Nodes with an endpoint of `id` (at `addr`, when given and any matches).
    fn nodes_of(&self, id: Identity, addr: Option<IpAddr>) -> Vec<String> {
        let of_id = || self.endpoints.iter().filter(|e| e.identity == id);
        let at_addr: BTreeSet<String> = of_id()
            .filter(|e| addr.is_some_and(|a| e.fact.addresses.iter().any(|x| x.addr == a)))
            .map(|e| e.node_id.clone())
            .collect();
        if !at_addr.is_empty() {
            return at_addr.into_iter().collect();
        }
        of_id().map(|e| e.node_id.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    }

    fn party(&self, id: Identity, address: Option<IpAddr>, resolved_by: String) -> Party {
        let labels = self.labels.get(&id).cloned().unwrap_or_default();
        let kind = self.kind(id);
        let managed = kind == PartyKind::Workload;
        Party {
            identity: id,
            name: self.name(id),
            namespace: labels.namespace().map(str::to_owned),
            labels,
            kind,
            resolved_by,
            address,
            nodes: if managed { self.nodes_of(id, address) } else { Vec::new() },
            mode: managed.then(|| self.modes.get(&id).map_or(RolloutMode::Learn, |r| r.mode)),
        }
    }

    /// Both ends of a recorded flow, as ingest resolved them.
    fn flow_parties(&self, row: &FlowRow) -> (Party, Party) {
        let f = &row.flow;
        let (id, node) = (row.id, &row.node_id);
        let local = |addr| {
            format!(
                "flow {id}: the local side of the {} flow node {node} reported at {addr} (resolved by its cgroup, \
                 network namespace or process when the flow was ingested)",
                f.direction.as_str()
            )
        };
        let peer = |addr| {
            format!(
                "flow {id}: the peer address {addr} of the flow node {node} reported (resolved by the nodes' \
                 endpoints, the inventory and Kubernetes when the flow was ingested)"
            )
        };
        let (src_how, dst_how) = match f.direction {
            Direction::Egress => (local(f.src_addr), peer(f.dst_addr)),
            Direction::Ingress => (peer(f.src_addr), local(f.dst_addr)),
        };
        (
            self.party(row.src_identity, Some(f.src_addr), src_how),
            self.party(row.dst_identity, Some(f.dst_addr), dst_how),
        )
    }

    /// One end described by an operator.
    fn resolve(&self, service: &PolicyService, field: &str, spec: &str) -> Result<Party, ExplainError> {
        let given = spec.trim();
        if given.is_empty() {
            return Err(invalid(format!(
                "{field} must name a workload, namespace/name, identity number, reserved entity or IP address"
            )));
        }
        if given.len() > MAX_SPEC_LEN {
            return Err(invalid(format!("{field} is longer than {MAX_SPEC_LEN} bytes")));
        }
        if let Ok(addr) = given.parse::<IpAddr>() {
            return self.resolve_addr(service, field, addr);
        }
        if let Ok(n) = given.parse::<u32>() {
            let id = Identity(n);
            if self.labels.contains_key(&id) || id.reserved().is_some() {
                return Ok(self.party(id, None, format!("identity number {n}")));
            }
            return Err(ExplainError::UnknownEndpoint { given: given.to_owned() });
        }
        let matches: Vec<Identity> =
            self.aliases.iter().filter(|(_, names)| names.contains(given)).map(|(id, _)| *id).collect();
        match matches.as_slice() {
            [id] => return Ok(self.party(*id, None, format!("workload name {given:?}"))),
            [] => {}
            many => {
                let candidates: Vec<String> = many
                    .iter()
                    .take(MAX_CANDIDATES)
                    .map(|id| {
                        let ns = self.labels.get(id).and_then(|l| l.namespace()).unwrap_or("(no namespace)");
                        format!("{ns}/{} (identity {})", self.name(*id), id.0)
                    })
                    .collect();
                let more = many.len().saturating_sub(MAX_CANDIDATES);
                let mut candidates = candidates.join(", ");
                if more > 0 {
                    candidates.push_str(&format!(" and {more} more"));
                }
                return Err(ExplainError::Ambiguous { given: given.to_owned(), candidates });
            }
        }
        let reserved = given.strip_prefix("reserved:").unwrap_or(given);
        if let Some(r) = ReservedIdentity::ALL.into_iter().find(|r| r.name() == reserved) {
            return Ok(self.party(Identity::from(r), None, format!("reserved entity {}", r.name())));
        }
        Err(ExplainError::UnknownEndpoint { given: given.to_owned() })
    }

    /// An address: a node's endpoint first (what the collectors report), then the
    /// inventory and Kubernetes, else world — the order ingest resolves peers in.
    fn resolve_addr(&self, service: &PolicyService, field: &str, addr: IpAddr) -> Result<Party, ExplainError> {
        if addr.is_loopback() || addr.is_unspecified() {
            return Err(invalid(format!(
                "{field}: {addr} exists in every network namespace and names no workload; give the workload instead"
            )));
        }
        let hits: Vec<&EndpointRow> =
            self.endpoints.iter().filter(|e| e.fact.addresses.iter().any(|a| a.addr == addr)).collect();
        let ids: BTreeSet<Identity> = hits.iter().map(|e| e.identity).collect();
        if ids.len() > 1 {
            let candidates: Vec<String> = hits
                .iter()
                .take(MAX_CANDIDATES)
                .map(|e| format!("{} (identity {}) on node {}", self.name(e.identity), e.identity.0, e.node_id))
                .collect();
            return Err(ExplainError::Ambiguous { given: addr.to_string(), candidates: candidates.join(", ") });
        }
        if let (Some(id), Some(e)) = (ids.first(), hits.first()) {
            let ns = match &e.fact.netns_name {
                Some(n) => format!("network namespace {n}"),
                None if e.fact.host => "the host network namespace".to_owned(),
                None => format!("network namespace inode {}", e.fact.netns_ino),
            };
            let how = format!("address {addr} of {ns} on node {} (the collectors' endpoint report)", e.node_id);
            return Ok(self.party(*id, Some(addr), how));
        }
        let by_labels = |labels: &Labels| self.labels.iter().find(|(_, l)| *l == labels).map(|(id, _)| *id);
        if let Some(w) = service.inventory.by_addr(addr) {
            if let Some(id) = by_labels(&w.labels) {
                let how = format!("address {addr} of inventory entry {:?}", w.name);
                return Ok(self.party(id, Some(addr), how));
            }
            return Err(ExplainError::UnknownEndpoint {
                given: format!("{addr} (inventory entry {:?} has no identity yet: it was never seen)", w.name),
            });
        }
        if let Some(r) = &service.resolver {
            let r = r.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, subject)) = r.kube().subject_by_ip(addr)
                && let Some(id) = subject.labels().and_then(by_labels)
            {
                return Ok(self.party(id, Some(addr), format!("Kubernetes pod address {addr}")));
            }
        }
        let how = format!("{addr} is no endpoint, inventory or pod address the learner knows: outside → world");
        Ok(self.party(Identity::WORLD, Some(addr), how))
    }

    /// The enforcers judging the sides, one per node.
    fn enforcers_for(&self, sides: &[&Side], now_ms: i64) -> Vec<NodeEnforcer> {
        let mut nodes: BTreeMap<&str, Vec<Direction>> = BTreeMap::new();
        for s in sides {
            if s.decision == SideDecision::NotManaged {
                continue;
            }
            for n in &s.nodes {
                nodes.entry(n.as_str()).or_default().push(s.direction);
            }
        }
        nodes
            .into_iter()
            .map(|(node, directions)| node_enforcer(node, directions, self.enforcers.get(node), now_ms))
            .collect()
    }

    /// A note when a party's mode changed after `at`.
    fn mode_changed_after(&self, p: &Party, at: i64) -> Option<String> {
        let row = self.modes.get(&p.identity).filter(|_| p.managed())?;
        (row.mode_since_unix_ms > at).then(|| {
            format!(
                "{} entered {} mode at {}, after the time asked about ({}); the verdict is for the current mode.",
                p.name,
                row.mode.as_str(),
                utc(row.mode_since_unix_ms),
                utc(at)
            )
        })
    }
}

fn node_enforcer(node: &str, directions: Vec<Direction>, row: Option<&EnforcerRow>, now_ms: i64) -> NodeEnforcer {
    let Some(e) = row else {
        return NodeEnforcer {
            node_id: node.to_owned(),
            directions,
            state: EnforcerState::NotConnected,
            desired_version: None,
            applied_version: None,
            rejected_version: None,
            last_error: None,
            last_seen_unix_ms: None,
            last_report_unix_ms: None,
            silent: false,
            message: format!(
                "No enforcer has connected from node {node}: nothing is enforced there. Is bulkhead-enforcer running \
                 on it (see `bulkhead enforcers`)?"
            ),
        };
    };
    let v = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |v| v.to_string());
    let (state, mut message) = match (e.desired_version, e.applied_version) {
        (None, None) => (
            EnforcerState::NoPolicy,
            format!("The learner has no policy for node {node} (nothing there is in monitor or enforce yet)."),
        ),
        (d, a) if d == a => (EnforcerState::InSync, format!("Node {node} enforces version {}, as wanted.", v(a))),
        // A refusal not yet overtaken by an applied version (as the overview shows it).
        (d, a) if e.rejected_version.is_some() => (
            EnforcerState::Rejected,
            format!(
                "Node {node} rejected version {} ({}) and still enforces version {}; the learner wants version {}. \
                 The answer above is what the wanted version says, the node decides by the older one.",
                v(e.rejected_version),
                e.last_error.as_deref().unwrap_or("no reason given"),
                v(a),
                v(d)
            ),
        ),
        (d, a) => (
            EnforcerState::Stale,
            format!(
                "Node {node}'s enforcer is stale: it enforces version {} while the learner wants version {}. The \
                 answer above is what version {} says; until the node applies it, it decides by version {}. Check \
                 `bulkhead enforcers` and the enforcer's log.",
                v(a),
                v(d),
                v(d),
                v(a)
            ),
        ),
    };
    let silent = e.last_report_unix_ms.is_some_and(|t| now_ms.saturating_sub(t) > SILENT_AFTER_MS);
    if silent {
        message.push_str(&format!(
            " No verdict report from node {node} for more than {} minutes: is its enforcer running and connected?",
            SILENT_AFTER_MS / 60_000
        ));
    }
    NodeEnforcer {
        node_id: node.to_owned(),
        directions,
        state,
        desired_version: e.desired_version,
        applied_version: e.applied_version,
        rejected_version: e.rejected_version,
        last_error: e.last_error.clone(),
        last_seen_unix_ms: e.last_seen_unix_ms,
        last_report_unix_ms: e.last_report_unix_ms,
        silent,
        message,
    }
}

// === the pure part: deciding ===

/// A policy set in the evaluator's shape, with what each policy is.
struct PolicySet {
    refs: Vec<PolicyRef>,
    policies: Vec<Policy>,
}

impl PolicySet {
    fn new(active: &BTreeMap<Identity, (PolicyRef, Policy)>) -> Self {
        let (refs, policies) = active.values().cloned().unzip();
        Self { refs, policies }
    }

    /// Egress and ingress decisions for `c` (and the request, if any).
    fn decide(
        &self,
        ctx: &Context,
        c: &Connection,
        request: Option<&HttpRequest>,
        parties: &Parties<'_>,
    ) -> [SideDecision; 2] {
        let ev = Evaluator::new(&self.policies, &ctx.infos, &ctx.fqdn);
        let l4 = ev.decide(c);
        let req = request.map(|r| ev.decide_request(c, &r.method, &r.path));
        let one = |dir: Direction, managed: bool, l4: &SideVerdict, req: Option<&SideVerdict>| {
            if !managed {
                return SideDecision::NotManaged;
            }
            match (l4, req) {
                (SideVerdict::Allowed { policy, rule }, Some(SideVerdict::DefaultDeny { .. })) => {
                    SideDecision::RequestDenied {
                        policy: self.refs[*policy].clone(),
                        rule: self.rule(*policy, dir, *rule),
                    }
                }
                (_, Some(v)) | (v, None) => self.convert(dir, v),
            }
        };
        [
            one(Direction::Egress, parties.source.managed(), &l4.egress, req.as_ref().map(|d| &d.egress)),
            one(Direction::Ingress, parties.destination.managed(), &l4.ingress, req.as_ref().map(|d| &d.ingress)),
        ]
    }

    fn convert(&self, dir: Direction, v: &SideVerdict) -> SideDecision {
        match v {
            SideVerdict::NotCovered => SideDecision::NotCovered,
            SideVerdict::Allowed { policy, rule } => {
                SideDecision::Allowed { policy: self.refs[*policy].clone(), rule: self.rule(*policy, dir, *rule) }
            }
            SideVerdict::DefaultDeny { policies } => {
                SideDecision::DefaultDeny { policies: policies.iter().map(|n| self.refs[*n].clone()).collect() }
            }
        }
    }

    fn rule(&self, policy: usize, dir: Direction, index: usize) -> RuleView {
        let rule = self.policies[policy].rules(dir).and_then(|r| r.get(index));
        match rule {
            Some(r) => rule_view(dir, index, r),
            None => RuleView { direction: dir, index, peer: String::new(), ports: Vec::new(), http: Vec::new() },
        }
    }
}

fn rule_view(direction: Direction, index: usize, r: &Rule) -> RuleView {
    RuleView {
        direction,
        index,
        peer: r.peer.to_string(),
        ports: if r.ports.is_empty() {
            vec!["any".to_owned()]
        } else {
            r.ports.iter().map(ToString::to_string).collect()
        },
        http: r.http.iter().map(ToString::to_string).collect(),
    }
}

/// One side: the decision in the workload's current mode.
fn side(
    set: &PolicySet,
    direction: Direction,
    local: &Party,
    decision: SideDecision,
    parties: &Parties<'_>,
    has_request: bool,
) -> Side {
    let dir = direction.as_str();
    let who = &local.name;
    let policies: Vec<PolicyRef> = if local.managed() {
        set.refs
            .iter()
            .zip(&set.policies)
            .filter(|(_, p)| p.selector.matches(&local.labels))
            .map(|(r, _)| r.clone())
            .collect()
    } else {
        Vec::new()
    };
    let mode = local.mode.unwrap_or(RolloutMode::Learn);
    let because = match &decision {
        SideDecision::NotManaged => {
            format!("{who} is not a managed workload: no policy selects it, nothing judges its {dir}")
        }
        SideDecision::NotCovered => format!("no policy selecting {who} covers {dir}: allowed"),
        SideDecision::Allowed { policy, rule } => {
            let mut s = format!(
                "allowed by policy {} (proposal {}) {dir} rule {}",
                policy.name, policy.proposal_id, rule.index
            );
            if !rule.http.is_empty() && !has_request {
                s.push_str(&format!(
                    " — an L7 rule: only HTTP requests {} pass; others are {} on this connection",
                    rule.http.join(", "),
                    match mode {
                        RolloutMode::Enforce => "dropped",
                        RolloutMode::Monitor => "audited",
                        RolloutMode::Learn => "not judged in learn mode",
                    }
                ));
            }
            s
        }
        SideDecision::RequestDenied { policy, rule } => format!(
            "the connection passes policy {} (proposal {}) {dir} rule {}, but the request matches none of its HTTP \
             rules ({})",
            policy.name,
            policy.proposal_id,
            rule.index,
            rule.http.join(", ")
        ),
        SideDecision::DefaultDeny { policies } => {
            let names: Vec<String> =
                policies.iter().map(|p| format!("{} (proposal {})", p.name, p.proposal_id)).collect();
            format!(
                "default deny: {dir} of {who} is covered by {} and no rule allows port {}",
                names.join(", "),
                parties.port
            )
        }
    };
    let (verdict, reason) = if decision.allows() || decision == SideDecision::NotManaged {
        (EnforcerVerdict::Pass, because)
    } else if local.nodes.is_empty() {
        let r = format!("{because}; but no node reports an endpoint of {who}, so no enforcer judges it");
        (EnforcerVerdict::Pass, r)
    } else {
        match mode {
            RolloutMode::Learn => (
                EnforcerVerdict::Pass,
                format!(
                    "{because}; {who} is in learn mode: its policy is not installed (monitor would audit, enforce would drop)"
                ),
            ),
            RolloutMode::Monitor => {
                (EnforcerVerdict::Audit, format!("{because}; {who} is in monitor mode: passed and reported as audit"))
            }
            RolloutMode::Enforce => {
                (EnforcerVerdict::Drop, format!("{because}; {who} is in enforce mode: dropped and reported"))
            }
        }
    };
    Side {
        direction,
        workload: local.identity,
        name: local.name.clone(),
        mode: local.mode,
        policies,
        decision,
        verdict,
        reason,
        nodes: if local.managed() { local.nodes.clone() } else { Vec::new() },
    }
}

/// A Unix-ms time as RFC 3339 UTC (second precision), for the notes people read.
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1_000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", sod / 3_600, sod % 3_600 / 60, sod % 60)
}

/// One line: the verdict and the side that decides it.
fn summary(verdict: EnforcerVerdict, egress: &Side, ingress: &Side) -> String {
    let line = |s: &Side| format!("{} of {}: {}", s.direction.as_str(), s.name, s.reason);
    match verdict {
        EnforcerVerdict::Pass => format!("pass — {}; {}", line(egress), line(ingress)),
        v => {
            // Egress is judged first: a drop there means ingress never sees it.
            let deciding = if egress.verdict == v { egress } else { ingress };
            format!("{} — {}", v.as_str(), line(deciding))
        }
    }
}

#[cfg(test)]
mod tests;
