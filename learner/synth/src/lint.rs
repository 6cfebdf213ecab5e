//! Known pitfalls of least-privilege policies (DESIGN.md §4): traffic a policy made
//! from a learning window typically forgets because it is rare, periodic or comes from
//! infrastructure — DNS, kubelet probes from the host, monitoring scrapers, ingress
//! controllers, the API server. When observed it is simply a rule; when missing the
//! proposal says what breaks.

use std::collections::{BTreeSet, HashSet};

use bulkhead_model::{
    Direction, Edge, Identity, Lint, LintCode, Peer, Policy, ProposedRule, Protocol, ReservedIdentity, Rule, Severity,
};

use crate::index::LabelIndex;
use crate::input::{IdentityInfo, Options};

/// Label keys that name an application.
const APP_KEYS: [&str; 3] = ["app.kubernetes.io/name", "app", "k8s-app"];
/// Applications that scrape metrics from other workloads.
const SCRAPERS: [&str; 8] = [
    "prometheus",
    "vmagent",
    "victoria-metrics-agent",
    "otel-collector",
    "opentelemetry-collector",
    "grafana-agent",
    "alloy",
    "datadog-agent",
];
/// Applications that forward external requests to Service backends.
const INGRESS_CONTROLLERS: [&str; 7] =
    ["ingress-nginx", "nginx-ingress", "traefik", "haproxy-ingress", "contour", "envoy-gateway", "kong"];

fn app_is(info: &IdentityInfo, names: &[&str]) -> bool {
    APP_KEYS.iter().any(|k| info.labels.get(k).is_some_and(|v| names.contains(&v)))
}

/// What lints need to know about everyone else, computed once per synthesis.
#[derive(Debug)]
pub struct Population<'a> {
    /// Scrapers seen scraping someone in the window.
    active_scrapers: Vec<&'a IdentityInfo>,
    ingress_controllers: Vec<&'a IdentityInfo>,
}

impl<'a> Population<'a> {
    pub fn new(index: &LabelIndex<'a>, edges: &[Edge], opts: &Options) -> Self {
        let talking: HashSet<Identity> =
            edges.iter().filter(|e| e.last_seen_unix_ms >= opts.window.from_unix_ms).map(|e| e.key.src).collect();
        let workloads = index.workloads();
        Self {
            active_scrapers: workloads
                .iter()
                .copied()
                .filter(|w| app_is(w, &SCRAPERS) && talking.contains(&w.id))
                .collect(),
            ingress_controllers: workloads.iter().copied().filter(|w| app_is(w, &INGRESS_CONTROLLERS)).collect(),
        }
    }

    pub fn lints(
        &self,
        t: &IdentityInfo,
        policy: &Policy,
        rules: &[ProposedRule],
        observed_any: bool,
        resolves_names: bool,
    ) -> Vec<Lint> {
        let mut out = Vec::new();
        let mut lint = |code, severity, message: String| out.push(Lint { code, severity, message });
        let ingress = policy.ingress.as_deref();
        let egress = policy.egress.as_deref();

        if !observed_any && rules.is_empty() {
            lint(
                LintCode::NoTraffic,
                Severity::Warning,
                "No traffic was observed for this workload in the window: the policy denies everything in the \
                 directions it covers. Extend the window if the workload is simply idle."
                    .into(),
            );
        }
        let flagged = rules.iter().filter(|r| !r.flags.is_empty()).count();
        if flagged > 0 {
            lint(
                LintCode::RulesNeedConfirmation,
                Severity::Warning,
                format!("{flagged} rule(s) look suspicious and are held back until an analyst confirms them."),
            );
        }
        if let Some(egress) = egress {
            let dns_ok = egress.iter().any(|r| r.allows_port(Protocol::Udp, 53) || r.allows_port(Protocol::Tcp, 53));
            // Flagged FQDN rules count: once confirmed they need DNS just the same.
            let fqdn =
                rules.iter().any(|r| r.direction == Direction::Egress && matches!(r.rule.peer, Peer::Fqdn { .. }));
            if fqdn && !dns_ok {
                lint(
                    LintCode::FqdnWithoutDns,
                    Severity::Warning,
                    "FQDN rules only work while the workload can resolve names, and no rule allows DNS (53/udp, \
                     53/tcp)."
                        .into(),
                );
            } else if !dns_ok {
                let (severity, why) = if resolves_names {
                    (Severity::Warning, "it resolved names during the window")
                } else {
                    (Severity::Info, "none was seen in the window")
                };
                lint(
                    LintCode::DnsEgressMissing,
                    severity,
                    format!("No rule allows DNS egress (53/udp, 53/tcp); {why}. Name lookups will fail."),
                );
            }
            if t.kubernetes && !egress.iter().any(|r| is_entity(r, ReservedIdentity::KubeApiserver)) {
                lint(
                    LintCode::ApiServerMissing,
                    Severity::Info,
                    "The Kubernetes API server is not allowed; workloads using a Kubernetes client will fail.".into(),
                );
            }
        }
        if let Some(ingress) = ingress {
            if t.kubernetes && !ingress.iter().any(|r| is_entity(r, ReservedIdentity::Host)) {
                lint(
                    LintCode::HostProbesMissing,
                    Severity::Warning,
                    "Ingress from the host is not allowed: kubelet liveness/readiness probes will fail unless the \
                     network plugin exempts them."
                        .into(),
                );
            }
            let missing = |candidates: &[&IdentityInfo]| -> BTreeSet<String> {
                candidates
                    .iter()
                    .filter(|c| c.id != t.id && !ingress.iter().any(|r| selects(r, c)))
                    .map(|c| c.name.clone())
                    .collect()
            };
            let scrapers = missing(&self.active_scrapers);
            if !scrapers.is_empty() {
                lint(
                    LintCode::ScraperMissing,
                    Severity::Info,
                    format!(
                        "Monitoring scraper(s) {} scrape other workloads but are not allowed here; if this workload \
                         exposes metrics they will stop being collected.",
                        join(&scrapers)
                    ),
                );
            }
            if t.service_backend {
                let controllers = missing(&self.ingress_controllers);
                if !controllers.is_empty() {
                    lint(
                        LintCode::IngressControllerMissing,
                        Severity::Warning,
                        format!(
                            "This workload backs a Service and ingress controller(s) {} are not allowed: traffic \
                             arriving through an Ingress will be dropped.",
                            join(&controllers)
                        ),
                    );
                }
            }
        }
        for r in rules.iter().filter(|r| r.included && is_entity(&r.rule, ReservedIdentity::World)) {
            let dir = if r.direction == Direction::Egress { "to" } else { "from" };
            lint(
                LintCode::WorldAllowed,
                Severity::Warning,
                format!(
                    "Rule {} allows {dir} the whole internet (world) because the addresses behind it are no longer \
                     on record; narrow it to CIDRs or names.",
                    r.id
                ),
            );
        }
        out
    }
}

fn is_entity(rule: &Rule, entity: ReservedIdentity) -> bool {
    matches!(rule.peer, Peer::Entity { entity: e } if e == entity)
}

fn selects(rule: &Rule, who: &IdentityInfo) -> bool {
    matches!(&rule.peer, Peer::Workloads { selector } if selector.matches(&who.labels))
}

fn join(names: &BTreeSet<String>) -> String {
    names.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}
