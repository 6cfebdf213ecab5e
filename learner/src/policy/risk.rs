//! Which proposals an analyst should look at first: a risk score per proposal from what
//! its rules would newly allow. Pure (the proposals page gathers the inputs), so the
//! ranking is table-tested here.
//!
//! Factors, each with points (highest first in the queue):
//! * **new external egress** — an egress rule to outside addresses (world, CIDR, CIDR
//!   group, DNS name) the workload's policy in force does not already allow, or a rule
//!   synthesis flagged as such: the classic exfiltration path;
//! * **lateral movement into a sensitive namespace** — an ingress rule letting peers
//!   from other namespaces (or outside) into a workload of a sensitive namespace, or an
//!   egress rule reaching into one from elsewhere. Sensitive: listed in
//!   [`RiskConfig::sensitive_namespaces`] (default `kube-system`) or labelled with
//!   [`RiskConfig::sensitive_label`] (a Kubernetes namespace label, which pods carry as
//!   `io.cilium.k8s.namespace.labels.<key>`, or the same key on an inventory workload);
//! * **flagged learning flows** — rules held back by learning hygiene (port scan, cloud
//!   metadata, new external egress) until someone confirms them;
//! * **rare ports** — ports no other destination in the graph serves (and not a
//!   well-known service port), and port ranges;
//! * smaller: not converged yet, widening beyond what was observed, lint warnings.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Direction, HygieneFlag, Identity, Labels, Peer, Policy, Proposal, ProposedRule, Protocol, Severity,
};
use serde::Serialize;

use crate::identity::kube::NAMESPACE_LABELS_PREFIX;

/// Points per factor.
pub mod points {
    pub const NEW_EXTERNAL_EGRESS: u32 = 40;
    pub const LATERAL_MOVEMENT: u32 = 35;
    pub const FLAGGED_RULE: u32 = 30;
    /// On top of [`FLAGGED_RULE`] for the flags that name an attack pattern.
    pub const PORT_SCAN: u32 = 20;
    pub const CLOUD_METADATA: u32 = 30;
    pub const RARE_PORT: u32 = 15;
    pub const UNCONVERGED: u32 = 5;
    pub const WIDENING_MAX: u32 = 10;
    pub const LINT_WARNING: u32 = 2;
    pub const LINT_WARNINGS_MAX: u32 = 10;
}

/// Ports common enough that one destination serving them is not remarkable.
const WELL_KNOWN_PORTS: &[u16] = &[
    25, 53, 80, 123, 443, 587, 2181, 2379, 2380, 3000, 3306, 4317, 4318, 5000, 5432, 5672, 6379, 6443, 8000, 8080,
    8443, 9090, 9092, 9100, 9200, 9300, 10250, 11211, 15672, 27017, 50051,
];

/// What makes a namespace sensitive and a port rare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskConfig {
    /// Namespaces whose workloads are sensitive whatever their labels.
    pub sensitive_namespaces: BTreeSet<String>,
    /// Label key marking a namespace sensitive (any value but `false`): on the
    /// Kubernetes namespace, or on an inventory workload.
    pub sensitive_label: String,
    /// A port is rare when at most this many destination identities serve it across
    /// the whole graph (well-known service ports never are).
    pub rare_port_max_destinations: u64,
}

impl Default for RiskConfig {
    fn default() -> Self {
        Self {
            sensitive_namespaces: ["kube-system".to_owned()].into(),
            sensitive_label: "bulkhead.io/sensitive".to_owned(),
            rare_port_max_destinations: 1,
        }
    }
}

impl RiskConfig {
    /// `kube-system, vault ,payments` → the set (blank entries dropped).
    pub fn parse_namespaces(list: &str) -> BTreeSet<String> {
        list.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }
}

/// Namespaces that are sensitive: configured, or labelled on any identity seen.
pub fn sensitive_namespaces<'a>(config: &RiskConfig, labels: impl IntoIterator<Item = &'a Labels>) -> BTreeSet<String> {
    let mut out = config.sensitive_namespaces.clone();
    let namespace_key = format!("{NAMESPACE_LABELS_PREFIX}{}", config.sensitive_label);
    for l in labels {
        let Some(ns) = l.namespace() else { continue };
        let marked = [namespace_key.as_str(), config.sensitive_label.as_str()]
            .iter()
            .filter_map(|k| l.get(k))
            .any(|v| !v.eq_ignore_ascii_case("false"));
        if marked {
            out.insert(ns.to_owned());
        }
    }
    out
}

/// Why a proposal scores what it scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RiskKind {
    NewExternalEgress,
    LateralMovement,
    FlaggedRule,
    RarePort,
    Unconverged,
    Widening,
    LintWarnings,
}

impl RiskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskKind::NewExternalEgress => "new external egress",
            RiskKind::LateralMovement => "lateral movement into a sensitive namespace",
            RiskKind::FlaggedRule => "flagged learning flow",
            RiskKind::RarePort => "rare port",
            RiskKind::Unconverged => "not converged",
            RiskKind::Widening => "widening",
            RiskKind::LintWarnings => "lint warnings",
        }
    }
}

/// One reason, with the rule it is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RiskFactor {
    pub kind: RiskKind,
    pub points: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub detail: String,
}

/// A proposal's score and its reasons (largest first).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Risk {
    pub score: u32,
    pub factors: Vec<RiskFactor>,
}

impl Risk {
    /// `high`, `medium`, `low` or `none`, for badges.
    pub fn level(&self) -> &'static str {
        match self.score {
            60.. => "high",
            25..=59 => "medium",
            1..=24 => "low",
            0 => "none",
        }
    }

    /// Whether any factor is of `kind`.
    pub fn has(&self, kind: RiskKind) -> bool {
        self.factors.iter().any(|f| f.kind == kind)
    }

    fn push(&mut self, kind: RiskKind, points: u32, rule: Option<&str>, detail: String) {
        self.score = self.score.saturating_add(points);
        self.factors.push(RiskFactor { kind, points, rule: rule.map(str::to_owned), detail });
    }
}

/// What scoring one proposal needs besides the proposal.
#[derive(Debug, Clone, Copy)]
pub struct RiskInputs<'a> {
    pub config: &'a RiskConfig,
    /// Labels of every identity (target and peers).
    pub labels: &'a HashMap<Identity, Labels>,
    /// From [`sensitive_namespaces`].
    pub sensitive: &'a BTreeSet<String>,
    /// Distinct destination identities per (protocol, port) across the graph.
    pub port_destinations: &'a HashMap<(Protocol, u16), u64>,
    /// The target's policy in force (newest approved or deployed), if any.
    pub active: Option<&'a Policy>,
}

/// Scores a proposal (see the module docs).
pub fn score(p: &Proposal, inputs: &RiskInputs<'_>) -> Risk {
    let mut risk = Risk::default();
    let target_ns = inputs.labels.get(&p.target).and_then(|l| l.namespace());
    for r in &p.rules {
        let id = Some(r.id.as_str());
        if r.direction == Direction::Egress
            && r.rule.peer.is_external()
            && (r.flags.contains(&HygieneFlag::NewExternalEgress) || !already_allowed(r, inputs.active))
        {
            risk.push(
                RiskKind::NewExternalEgress,
                points::NEW_EXTERNAL_EGRESS,
                id,
                format!("egress to {}", r.rule.peer),
            );
        }
        if let Some(detail) = lateral(r, target_ns, inputs) {
            risk.push(RiskKind::LateralMovement, points::LATERAL_MOVEMENT, id, detail);
        }
        if !r.flags.is_empty() {
            let extra: u32 = r
                .flags
                .iter()
                .map(|f| match f {
                    HygieneFlag::PortScan => points::PORT_SCAN,
                    HygieneFlag::CloudMetadata => points::CLOUD_METADATA,
                    HygieneFlag::NewExternalEgress => 0,
                })
                .sum();
            let why: Vec<&str> = r.flags.iter().map(|f| f.describe()).collect();
            risk.push(RiskKind::FlaggedRule, points::FLAGGED_RULE + extra, id, why.join("; "));
        }
        let rare = rare_ports(r, inputs);
        if !rare.is_empty() {
            risk.push(RiskKind::RarePort, points::RARE_PORT, id, rare.join(", "));
        }
    }
    if !p.convergence.converged {
        risk.push(
            RiskKind::Unconverged,
            points::UNCONVERGED,
            None,
            "new edges still appear in the learning window".into(),
        );
    }
    if p.widening_total > 0 {
        let pts = u32::try_from(p.widening_total).unwrap_or(u32::MAX).min(points::WIDENING_MAX);
        risk.push(RiskKind::Widening, pts, None, format!("{} unobserved (peer, port) pairs allowed", p.widening_total));
    }
    let warnings = p.lints.iter().filter(|l| l.severity == Severity::Warning).count() as u32;
    if warnings > 0 {
        let pts = (warnings * points::LINT_WARNING).min(points::LINT_WARNINGS_MAX);
        risk.push(RiskKind::LintWarnings, pts, None, format!("{warnings} lint warning(s)"));
    }
    risk.factors.sort_by(|a, b| b.points.cmp(&a.points).then(a.kind.cmp(&b.kind)));
    risk
}

/// Whether the policy in force already allows everything this rule allows.
fn already_allowed(r: &ProposedRule, active: Option<&Policy>) -> bool {
    let Some(rules) = active.and_then(|a| a.rules(r.direction)) else { return false };
    rules.iter().any(|a| {
        a.peer == r.rule.peer
            && (a.ports.is_empty()
                || (!r.rule.ports.is_empty()
                    && r.rule.ports.iter().all(|p| {
                        a.ports.iter().any(|q| q.protocol == p.protocol && q.first <= p.first && p.last <= q.last)
                    })))
    })
}

/// The namespaces a rule's peers live in: observed peers first, else what the selector
/// pins. `None` inside: outside any namespace (world, host, …) or not pinned.
fn peer_namespaces<'a>(r: &'a ProposedRule, labels: &'a HashMap<Identity, Labels>) -> Vec<Option<&'a str>> {
    if !r.evidence.peers.is_empty() {
        return r.evidence.peers.iter().map(|p| labels.get(p).and_then(|l| l.namespace())).collect();
    }
    match &r.rule.peer {
        Peer::Workloads { selector } => vec![selector.match_labels.get(NAMESPACE_KEY).map(String::as_str)],
        _ => vec![None],
    }
}

/// Why this rule is lateral movement into a sensitive namespace, if it is.
fn lateral(r: &ProposedRule, target_ns: Option<&str>, inputs: &RiskInputs<'_>) -> Option<String> {
    let peers = peer_namespaces(r, inputs.labels);
    match r.direction {
        Direction::Ingress => {
            let ns = target_ns.filter(|ns| inputs.sensitive.contains(*ns))?;
            let from: BTreeSet<&str> =
                peers.iter().filter(|p| **p != Some(ns)).map(|p| p.unwrap_or("outside")).collect();
            (!from.is_empty()).then(|| {
                format!("into sensitive namespace {ns} from {}", from.into_iter().collect::<Vec<_>>().join(", "))
            })
        }
        Direction::Egress => {
            let into: BTreeSet<&str> = peers
                .iter()
                .flatten()
                .copied()
                .filter(|p| Some(*p) != target_ns && inputs.sensitive.contains(*p))
                .collect();
            (!into.is_empty())
                .then(|| format!("into sensitive namespace {}", into.into_iter().collect::<Vec<_>>().join(", ")))
        }
    }
}

/// The rule's ports that are rare (or ranges), as text.
fn rare_ports(r: &ProposedRule, inputs: &RiskInputs<'_>) -> Vec<String> {
    r.rule
        .ports
        .iter()
        .filter(|p| {
            if !p.is_single() {
                return true;
            }
            let used = inputs.port_destinations.get(&(p.protocol, p.first)).copied().unwrap_or(0);
            !WELL_KNOWN_PORTS.contains(&p.first) && used <= inputs.config.rare_port_max_destinations
        })
        .map(ToString::to_string)
        .collect()
}

/// Queue order: highest score first, then the more attack-like factors, then newest
/// (higher id) first.
pub fn queue_order(a: (&Risk, i64), b: (&Risk, i64)) -> Ordering {
    let weight = |r: &Risk| {
        [RiskKind::NewExternalEgress, RiskKind::LateralMovement, RiskKind::FlaggedRule, RiskKind::RarePort]
            .map(|k| r.has(k))
    };
    b.0.score.cmp(&a.0.score).then_with(|| weight(b.0).cmp(&weight(a.0))).then(b.1.cmp(&a.1))
}

#[cfg(test)]
mod tests {
    use bulkhead_model::{
        Convergence, Evidence, LabelSelector, Level, Lint, LintCode, PortRange, ReservedIdentity, Rule, Window,
    };

    use super::*;

    fn labels(ns: &str, app: &str) -> Labels {
        Labels::new([(NAMESPACE_KEY, ns), ("app", app)]).expect("labels")
    }

    fn rule(id: &str, direction: Direction, peer: Peer, port: u16, peers: &[u32]) -> ProposedRule {
        ProposedRule {
            id: id.into(),
            direction,
            rule: Rule::l4(peer, vec![PortRange::single(Protocol::Tcp, port)]),
            evidence: Evidence { peers: peers.iter().map(|p| Identity(*p)).collect(), ..Evidence::default() },
            flags: vec![],
            included: true,
            widens: vec![],
            widens_total: 0,
        }
    }

    fn proposal(target: u32, rules: Vec<ProposedRule>) -> Proposal {
        Proposal {
            target: Identity(target),
            workload: format!("w{target}"),
            level: Level::Exact,
            window: Window { from_unix_ms: 0, to_unix_ms: 1 },
            policy: Policy {
                name: "p".into(),
                namespace: None,
                selector: LabelSelector::default(),
                ingress: None,
                egress: None,
            },
            rules,
            widening_total: 0,
            convergence: Convergence { converged: true, last_new_edge_unix_ms: None, quiet_period_ms: 1 },
            lints: vec![],
            removals: vec![],
        }
    }

    struct World {
        config: RiskConfig,
        labels: HashMap<Identity, Labels>,
        sensitive: BTreeSet<String>,
        ports: HashMap<(Protocol, u16), u64>,
    }

    fn world() -> World {
        let config = RiskConfig::default();
        let mut labels = HashMap::new();
        labels.insert(Identity(300), labels_of("shop", "web"));
        labels.insert(Identity(301), labels_of("shop", "db"));
        labels.insert(Identity(302), labels_of("kube-system", "coredns"));
        let mut vault = labels_of("secrets", "vault");
        vault.insert(format!("{NAMESPACE_LABELS_PREFIX}bulkhead.io/sensitive"), "true").expect("label");
        labels.insert(Identity(303), vault);
        let mut dev = labels_of("dev", "tool");
        dev.insert(format!("{NAMESPACE_LABELS_PREFIX}bulkhead.io/sensitive"), "false").expect("label");
        labels.insert(Identity(304), dev);
        let sensitive = sensitive_namespaces(&config, labels.values());
        let ports = [((Protocol::Tcp, 5432), 3), ((Protocol::Tcp, 31337), 1), ((Protocol::Tcp, 8200), 4)].into();
        World { config, labels, sensitive, ports }
    }

    fn labels_of(ns: &str, app: &str) -> Labels {
        labels(ns, app)
    }

    fn inputs<'a>(w: &'a World, active: Option<&'a Policy>) -> RiskInputs<'a> {
        RiskInputs {
            config: &w.config,
            labels: &w.labels,
            sensitive: &w.sensitive,
            port_destinations: &w.ports,
            active,
        }
    }

    fn world_peer() -> Peer {
        Peer::Entity { entity: ReservedIdentity::World }
    }

    #[test]
    fn sensitive_namespaces_come_from_config_and_labels() {
        let w = world();
        let got: Vec<&str> = w.sensitive.iter().map(String::as_str).collect();
        assert_eq!(got, ["kube-system", "secrets"], "dev is labelled false");
        assert_eq!(
            RiskConfig::parse_namespaces(" kube-system, vault ,,payments"),
            ["kube-system", "payments", "vault"].map(String::from).into()
        );
    }

    #[test]
    fn new_external_egress_unless_already_in_force() {
        let w = world();
        let p = proposal(300, vec![rule("egress-0", Direction::Egress, world_peer(), 443, &[2])]);
        let r = score(&p, &inputs(&w, None));
        assert!(r.has(RiskKind::NewExternalEgress), "{r:?}");
        assert_eq!(r.score, points::NEW_EXTERNAL_EGRESS);
        let in_force = Policy {
            egress: Some(vec![Rule::l4(world_peer(), vec![PortRange::single(Protocol::Tcp, 443)])]),
            ..p.policy.clone()
        };
        let r = score(&p, &inputs(&w, Some(&in_force)));
        assert!(!r.has(RiskKind::NewExternalEgress), "already allowed: {r:?}");
        let mut flagged = p.clone();
        flagged.rules[0].flags = vec![HygieneFlag::NewExternalEgress];
        let r = score(&flagged, &inputs(&w, Some(&in_force)));
        assert!(r.has(RiskKind::NewExternalEgress) && r.has(RiskKind::FlaggedRule), "synthesis flagged it: {r:?}");
        // Internal egress is not external.
        let internal = proposal(
            300,
            vec![rule(
                "egress-0",
                Direction::Egress,
                Peer::Workloads { selector: LabelSelector::with_labels([("app", "db")]) },
                5432,
                &[301],
            )],
        );
        assert_eq!(score(&internal, &inputs(&w, None)).score, 0);
    }

    #[test]
    fn lateral_movement_into_sensitive_namespaces() {
        let w = world();
        let sel = |app: &str| Peer::Workloads { selector: LabelSelector::with_labels([("app", app)]) };
        // Ingress into kube-system from shop: lateral.
        let p = proposal(302, vec![rule("ingress-0", Direction::Ingress, sel("web"), 53, &[300])]);
        let r = score(&p, &inputs(&w, None));
        assert!(r.has(RiskKind::LateralMovement), "{r:?}");
        assert!(r.factors[0].detail.contains("kube-system") && r.factors[0].detail.contains("shop"));
        // Ingress into shop (not sensitive): nothing.
        let p = proposal(301, vec![rule("ingress-0", Direction::Ingress, sel("web"), 5432, &[300])]);
        assert!(!score(&p, &inputs(&w, None)).has(RiskKind::LateralMovement));
        // Egress from shop into the labelled namespace: lateral.
        let p = proposal(300, vec![rule("egress-0", Direction::Egress, sel("vault"), 8200, &[303])]);
        assert!(score(&p, &inputs(&w, None)).has(RiskKind::LateralMovement));
        // Egress inside the same sensitive namespace is not lateral.
        let p = proposal(302, vec![rule("egress-0", Direction::Egress, sel("coredns"), 53, &[302])]);
        assert!(!score(&p, &inputs(&w, None)).has(RiskKind::LateralMovement));
        // From outside (world) into a sensitive namespace.
        let p = proposal(303, vec![rule("ingress-0", Direction::Ingress, world_peer(), 8200, &[2])]);
        let r = score(&p, &inputs(&w, None));
        assert!(r.has(RiskKind::LateralMovement) && r.factors[0].detail.contains("outside"), "{r:?}");
    }

    #[test]
    fn rare_ports_and_ranges() {
        let w = world();
        let sel = Peer::Workloads { selector: LabelSelector::with_labels([("app", "web")]) };
        let p = proposal(301, vec![rule("ingress-0", Direction::Ingress, sel.clone(), 31337, &[300])]);
        let r = score(&p, &inputs(&w, None));
        assert_eq!(r.factors.iter().map(|f| f.kind).collect::<Vec<_>>(), [RiskKind::RarePort]);
        assert_eq!(r.factors[0].detail, "31337/tcp");
        // A well-known port served once is not rare; a port served by many is not either.
        for port in [5432, 8200, 443] {
            let p = proposal(301, vec![rule("ingress-0", Direction::Ingress, sel.clone(), port, &[300])]);
            assert!(!score(&p, &inputs(&w, None)).has(RiskKind::RarePort), "{port}");
        }
        let mut range = proposal(301, vec![rule("ingress-0", Direction::Ingress, sel, 80, &[300])]);
        range.rules[0].rule.ports = vec![PortRange { protocol: Protocol::Tcp, first: 1000, last: 2000 }];
        assert!(score(&range, &inputs(&w, None)).has(RiskKind::RarePort));
    }

    #[test]
    fn flags_convergence_widening_and_lints_add_up() {
        let w = world();
        let sel = Peer::Workloads { selector: LabelSelector::with_labels([("app", "web")]) };
        let mut p = proposal(301, vec![rule("ingress-0", Direction::Ingress, sel, 5432, &[300])]);
        p.rules[0].flags = vec![HygieneFlag::PortScan];
        p.convergence.converged = false;
        p.widening_total = 3;
        p.lints = vec![
            Lint { code: LintCode::DnsEgressMissing, severity: Severity::Warning, message: "dns".into() },
            Lint { code: LintCode::NoTraffic, severity: Severity::Info, message: "info".into() },
        ];
        let r = score(&p, &inputs(&w, None));
        let expected = points::FLAGGED_RULE + points::PORT_SCAN + points::UNCONVERGED + 3 + points::LINT_WARNING;
        assert_eq!(r.score, expected, "{r:?}");
        assert_eq!(r.factors[0].kind, RiskKind::FlaggedRule, "largest first");
        assert_eq!(r.level(), "high");
        assert_eq!(Risk::default().level(), "none");
    }

    #[test]
    fn the_queue_puts_the_riskiest_first() {
        let w = world();
        let sel = |app: &str| Peer::Workloads { selector: LabelSelector::with_labels([("app", app)]) };
        let plain = proposal(301, vec![rule("ingress-0", Direction::Ingress, sel("web"), 5432, &[300])]);
        let external = proposal(300, vec![rule("egress-0", Direction::Egress, world_peer(), 443, &[2])]);
        let lateral = proposal(302, vec![rule("ingress-0", Direction::Ingress, sel("web"), 53, &[300])]);
        let rare = proposal(301, vec![rule("ingress-0", Direction::Ingress, sel("web"), 31337, &[300])]);
        let mut flagged = plain.clone();
        flagged.rules[0].flags = vec![HygieneFlag::CloudMetadata];
        let mut scored: Vec<(i64, Risk)> = [(1, plain), (2, external), (3, lateral), (4, rare), (5, flagged)]
            .into_iter()
            .map(|(id, p)| (id, score(&p, &inputs(&w, None))))
            .collect();
        scored.sort_by(|a, b| queue_order((&a.1, a.0), (&b.1, b.0)));
        let order: Vec<i64> = scored.iter().map(|s| s.0).collect();
        assert_eq!(order, [5, 2, 3, 4, 1]);
        // Equal scores: the newer proposal first.
        let a = Risk::default();
        assert_eq!(queue_order((&a, 7), (&a, 9)), Ordering::Greater);
    }
}
