//! Deployed `networking.k8s.io/v1` NetworkPolicy → [`Policy`], so that what the cluster
//! already enforces can be shown next to proposals.
//!
//! The mapping is the inverse of [`super::network_policy`], and `export → import` gives
//! the same policy back for everything NetworkPolicy can express (property-tested).
//! Choices:
//! * the policy's selector = `podSelector` plus `io.kubernetes.pod.namespace=<ns>`;
//! * a peer without `namespaceSelector` is pinned to the policy's namespace; a
//!   `namespaceSelector` term on `kubernetes.io/metadata.name` becomes a term on
//!   `io.kubernetes.pod.namespace`, any other namespace label `k` becomes
//!   `io.cilium.k8s.namespace.labels.k`; `namespaceSelector: {}` means any namespace and
//!   becomes no namespace term;
//! * an absent or empty `from` / `to` means every source / destination, inside the
//!   cluster or not. The model has no single peer for that, so it becomes every workload
//!   (empty selector) plus every reserved entity (host, world, unmanaged, remote-node,
//!   kube-apiserver) — the set of all identities, which is exactly what such a rule
//!   admits, and what the exporters turn back into "everyone";
//! * `ipBlock` → CIDR peer with its `except`;
//! * `policyTypes` decide the covered directions, defaulted as the API server does
//!   (Ingress always, Egress when there are egress rules).
//!
//! What the model cannot hold — named ports, SCTP, malformed CIDRs — leaves the whole
//! rule out with an [`ImportWarning`] saying the policy is shown incompletely. Leaving out
//! only the offending port or peer would show a rule the cluster does not have.
//!
//! `cilium.io/v2` CiliumNetworkPolicy → [`Policy`] ([`import_cilium_network_policy`]) is
//! likewise the inverse of [`super::cilium_network_policy`] (property-tested for what
//! the export writes): `endpointSelector` plus the namespace; `from/toEndpoints`
//! selectors without a namespace term are the policy's namespace (Cilium's rule), with
//! `io.kubernetes.pod.namespace Exists` any namespace; entities by name (`all` =
//! everyone); CIDR sets; `toFQDNs` names; and per `toPorts` entry one model rule, its
//! `rules.http` becoming HTTP rules: a method that is a plain token, and a path regex of
//! the shapes the export writes (escaped literal, optionally followed by `(\?.*)?` →
//! exact; escaped literal followed by `.*` → prefix; absent → any path). A port rule with
//! any other regex, or DNS rules other than "allow every lookup" (`matchPattern: "*"`,
//! which the model reads as plain L4), is left out with a warning.

use std::fmt;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::policy::{validate_method, validate_path};
use bulkhead_model::{
    Direction, HttpPath, HttpRule, LabelSelector, Peer, Policy, PortRange, Protocol, ReservedIdentity, Rule,
    SelectorOperator, SelectorRequirement,
};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::validate::shown;
use super::{
    CiliumNetworkPolicy, EndpointSelector, Format, HttpRuleSpec, K8S_NAMESPACE_NAME_LABEL, KeyClass,
    NAMESPACE_LABELS_PREFIX, PortProtocol, PortRule, classify, insert_label,
};

/// Why a NetworkPolicy (or CiliumNetworkPolicy) could not be imported at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    #[error("NetworkPolicy without metadata.name")]
    MissingName,
    #[error("NetworkPolicy {name:?} without metadata.namespace")]
    MissingNamespace { name: String },
    #[error("NetworkPolicy {policy}: no spec")]
    MissingSpec { policy: String },
    #[error("NetworkPolicy {policy}: podSelector {problem}")]
    PodSelector { policy: String, problem: SelectorProblem },
    #[error("CiliumNetworkPolicy {policy}: endpointSelector {problem}")]
    EndpointSelector { policy: String, problem: SelectorProblem },
}

/// What is wrong with a selector the model cannot hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SelectorProblem {
    /// An operator other than `In`, `NotIn`, `Exists`, `DoesNotExist`.
    UnknownOperator { operator: String },
    /// A pod-label key the model reserves for namespaces or Cilium identities.
    ReservedKey { key: String },
}

impl fmt::Display for SelectorProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SelectorProblem::UnknownOperator { operator } => {
                write!(f, "uses the unknown operator {:?}", shown(operator))
            }
            SelectorProblem::ReservedKey { key } => write!(
                f,
                "matches the pod label {:?}, a key Bulkhead reserves for namespaces and Cilium identities",
                shown(key)
            ),
        }
    }
}

/// Something of a NetworkPolicy the model cannot show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportWarning {
    /// The kind of object the warning is about.
    pub format: Format,
    /// `namespace/name`.
    pub policy: String,
    /// The direction concerned, if the warning is about one.
    pub direction: Option<Direction>,
    /// 1-based index of the rule in the NetworkPolicy's list, if about one rule.
    pub rule: Option<usize>,
    pub kind: ImportWarningKind,
}

impl fmt::Display for ImportWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.format, self.policy)?;
        match (self.direction, self.rule) {
            (Some(d), Some(i)) => write!(f, "{} rule {i}: ", d.as_str())?,
            (Some(d), None) => write!(f, "{}: ", d.as_str())?,
            (None, _) => {}
        }
        write!(f, "{}", self.kind)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportWarningKind {
    /// A named port (`port: http`).
    NamedPort { name: String },
    /// A protocol other than TCP and UDP.
    UnsupportedProtocol { protocol: String },
    /// A port number outside 1–65535, or `endPort` before `port` or without one.
    InvalidPort,
    /// A peer the model cannot hold (bad CIDR, bad selector, empty peer).
    UnsupportedPeer { problem: PeerProblem },
    /// Rules for a direction the policy does not cover: Kubernetes ignores them.
    IgnoredRules,
    /// A `policyTypes` entry other than Ingress and Egress.
    UnknownPolicyType { policy_type: String },
    /// A Cilium entity the model has no identity for (`cluster`, `init`, …).
    UnsupportedEntity { entity: String },
    /// A Cilium HTTP rule the model cannot hold (a regular expression beyond an exact
    /// path or a prefix, a method that is not a token): the port rule is left out.
    UnsupportedHttpRule { method: Option<String>, path: Option<String> },
    /// Cilium DNS rules that restrict the names: the port rule is left out.
    UnsupportedDnsRule,
}

/// What is wrong with one NetworkPolicy peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerProblem {
    InvalidCidr {
        cidr: String,
    },
    Selector(SelectorProblem),
    /// Neither selectors nor an ipBlock, or an ipBlock together with selectors.
    Malformed,
}

impl fmt::Display for ImportWarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const INCOMPLETE: &str =
            "the rule is left out, so this policy is shown incompletely (the cluster allows more than shown)";
        match self {
            ImportWarningKind::NamedPort { name } => {
                write!(f, "uses the named port {:?}, which Bulkhead cannot resolve; {INCOMPLETE}", shown(name))
            }
            ImportWarningKind::UnsupportedProtocol { protocol } => {
                write!(f, "uses protocol {:?}; Bulkhead models TCP and UDP only; {INCOMPLETE}", shown(protocol))
            }
            ImportWarningKind::InvalidPort => {
                write!(f, "has a port or port range Kubernetes would reject; {INCOMPLETE}")
            }
            ImportWarningKind::UnsupportedPeer { problem } => {
                let what = match problem {
                    PeerProblem::InvalidCidr { cidr } => format!("the ipBlock {:?} is not a valid CIDR", shown(cidr)),
                    PeerProblem::Selector(p) => format!("a peer selector {p}"),
                    PeerProblem::Malformed => "a peer has neither selectors nor an ipBlock, or both".to_owned(),
                };
                write!(f, "{what}; {INCOMPLETE}")
            }
            ImportWarningKind::IgnoredRules => {
                f.write_str("has rules but policyTypes does not cover this direction; Kubernetes ignores them")
            }
            ImportWarningKind::UnknownPolicyType { policy_type } => {
                write!(f, "unknown policyTypes entry {:?} ignored", shown(policy_type))
            }
            ImportWarningKind::UnsupportedEntity { entity } => {
                write!(f, "uses the entity {:?}, which Bulkhead has no identity for; {INCOMPLETE}", shown(entity))
            }
            ImportWarningKind::UnsupportedHttpRule { method, path } => write!(
                f,
                "has the HTTP rule method {:?} path {:?}, which is not a method token with an exact path or a \
                 prefix; {INCOMPLETE}",
                method.as_deref().map(shown),
                path.as_deref().map(shown)
            ),
            ImportWarningKind::UnsupportedDnsRule => {
                write!(f, "has DNS rules that restrict the names looked up; {INCOMPLETE}")
            }
        }
    }
}

/// One NetworkPolicy rule of either direction: its peers (`from` / `to`) and ports.
type RawRule<'a> = (Option<&'a [NetworkPolicyPeer]>, Option<&'a [NetworkPolicyPort]>);

/// Imports one NetworkPolicy. The result is normalised.
pub fn import_network_policy(np: &NetworkPolicy) -> Result<(Policy, Vec<ImportWarning>), ImportError> {
    let name = np.metadata.name.clone().ok_or(ImportError::MissingName)?;
    let ns = np.metadata.namespace.clone().ok_or_else(|| ImportError::MissingNamespace { name: shown(&name) })?;
    let id = format!("{}/{}", shown(&ns), shown(&name));
    let spec = np.spec.as_ref().ok_or_else(|| ImportError::MissingSpec { policy: id.clone() })?;

    let mut selector = match &spec.pod_selector {
        Some(s) => pod_selector(s).map_err(|problem| ImportError::PodSelector { policy: id.clone(), problem })?,
        None => LabelSelector::default(),
    };
    insert_label(&mut selector, NAMESPACE_KEY, &ns);

    let mut ctx = ImportCtx { format: Format::NetworkPolicy, policy: id, namespace: ns.clone(), warnings: Vec::new() };
    let egress_rules = spec.egress.as_deref().unwrap_or_default();
    let ingress_rules = spec.ingress.as_deref().unwrap_or_default();
    let (covers_ingress, covers_egress) = match &spec.policy_types {
        Some(types) => {
            for t in types.iter().filter(|t| *t != "Ingress" && *t != "Egress") {
                ctx.warn(None, None, ImportWarningKind::UnknownPolicyType { policy_type: t.clone() });
            }
            (types.iter().any(|t| t == "Ingress"), types.iter().any(|t| t == "Egress"))
        }
        // The API server's defaulting (networking/v1 SetDefaults_NetworkPolicy).
        None => (true, !egress_rules.is_empty()),
    };

    let mut direction_rules = |direction: Direction, covered: bool, rules: Vec<RawRule<'_>>| {
        if !covered {
            if !rules.is_empty() {
                ctx.warn(Some(direction), None, ImportWarningKind::IgnoredRules);
            }
            return None;
        }
        let mut out = Vec::new();
        for (i, (peers, ports)) in rules.into_iter().enumerate() {
            ctx.rule(direction, i + 1, peers, ports, &mut out);
        }
        Some(out)
    };
    let ingress = direction_rules(
        Direction::Ingress,
        covers_ingress,
        ingress_rules.iter().map(|r| (r.from.as_deref(), r.ports.as_deref())).collect(),
    );
    let egress = direction_rules(
        Direction::Egress,
        covers_egress,
        egress_rules.iter().map(|r| (r.to.as_deref(), r.ports.as_deref())).collect(),
    );

    let mut policy = Policy { name, namespace: Some(ns), selector, ingress, egress };
    policy.normalize();
    Ok((policy, ctx.warnings))
}

struct ImportCtx {
    format: Format,
    policy: String,
    namespace: String,
    warnings: Vec<ImportWarning>,
}

impl ImportCtx {
    fn warn(&mut self, direction: Option<Direction>, rule: Option<usize>, kind: ImportWarningKind) {
        self.warnings.push(ImportWarning { format: self.format, policy: self.policy.clone(), direction, rule, kind });
    }

    /// Appends the model rules of one NetworkPolicy rule (peers × ports), or nothing
    /// with a warning.
    fn rule(
        &mut self,
        direction: Direction,
        index: usize,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
        out: &mut Vec<Rule>,
    ) {
        let ports = match ports.unwrap_or_default().iter().map(port_range).collect::<Result<Vec<_>, _>>() {
            Ok(ports) => ports,
            Err(kind) => return self.warn(Some(direction), Some(index), kind),
        };
        let peers = match peers {
            None | Some([]) => everyone(),
            Some(peers) => match peers.iter().map(|p| self.peer(p)).collect::<Result<Vec<_>, _>>() {
                Ok(peers) => peers,
                Err(problem) => {
                    return self.warn(Some(direction), Some(index), ImportWarningKind::UnsupportedPeer { problem });
                }
            },
        };
        out.extend(peers.into_iter().map(|peer| Rule::l4(peer, ports.clone())));
    }

    fn peer(&self, peer: &NetworkPolicyPeer) -> Result<Peer, PeerProblem> {
        match (&peer.ip_block, &peer.pod_selector, &peer.namespace_selector) {
            (Some(block), None, None) => {
                let parse = |s: &str| s.parse::<IpNet>().map_err(|_| PeerProblem::InvalidCidr { cidr: s.to_owned() });
                let cidr = parse(&block.cidr)?;
                let except =
                    block.except.as_deref().unwrap_or_default().iter().map(|e| parse(e)).collect::<Result<_, _>>()?;
                Ok(Peer::Cidr { cidr, except })
            }
            (None, None, None) | (Some(_), _, _) => Err(PeerProblem::Malformed),
            (None, pods, namespaces) => {
                let mut selector = match pods {
                    Some(s) => pod_selector(s).map_err(PeerProblem::Selector)?,
                    None => LabelSelector::default(),
                };
                match namespaces {
                    None => insert_label(&mut selector, NAMESPACE_KEY, &self.namespace),
                    Some(ns_sel) => namespace_selector(ns_sel, &mut selector).map_err(PeerProblem::Selector)?,
                }
                selector.normalize();
                Ok(Peer::Workloads { selector })
            }
        }
    }
}

/// Every workload and every reserved entity: what an absent peer list admits.
fn everyone() -> Vec<Peer> {
    std::iter::once(Peer::Workloads { selector: LabelSelector::default() })
        .chain(ReservedIdentity::ALL.into_iter().map(|entity| Peer::Entity { entity }))
        .collect()
}

fn port_range(port: &NetworkPolicyPort) -> Result<PortRange, ImportWarningKind> {
    let protocol = match port.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some(other) => return Err(ImportWarningKind::UnsupportedProtocol { protocol: other.to_owned() }),
    };
    let number = |n: i32| u16::try_from(n).ok().filter(|n| *n >= 1).ok_or(ImportWarningKind::InvalidPort);
    match (&port.port, port.end_port) {
        (None, None) => Ok(PortRange::all(protocol)),
        (None, Some(_)) => Err(ImportWarningKind::InvalidPort),
        (Some(IntOrString::String(name)), _) => Err(ImportWarningKind::NamedPort { name: name.clone() }),
        (Some(IntOrString::Int(n)), end) => range(protocol, number(*n)?, end.map(number).transpose()?),
    }
}

fn range(protocol: Protocol, first: u16, last: Option<u16>) -> Result<PortRange, ImportWarningKind> {
    match last {
        None => Ok(PortRange::single(protocol, first)),
        Some(last) if last >= first => Ok(PortRange { protocol, first, last }),
        Some(_) => Err(ImportWarningKind::InvalidPort),
    }
}

/// A pod selector in the model's terms. Keys the model reserves for namespaces and
/// Cilium identities cannot be pod labels here.
fn pod_selector(s: &meta::LabelSelector) -> Result<LabelSelector, SelectorProblem> {
    let sel = selector(s)?;
    let reserved = sel
        .match_labels
        .keys()
        .chain(sel.match_expressions.iter().map(|r| &r.key))
        .find(|k| classify(k) != KeyClass::Pod);
    match reserved {
        Some(key) => Err(SelectorProblem::ReservedKey { key: key.clone() }),
        None => Ok(sel),
    }
}

/// Adds a `namespaceSelector`'s terms to a peer's selector.
fn namespace_selector(s: &meta::LabelSelector, into: &mut LabelSelector) -> Result<(), SelectorProblem> {
    let rekey = |k: &str| {
        if k == K8S_NAMESPACE_NAME_LABEL { NAMESPACE_KEY.to_owned() } else { format!("{NAMESPACE_LABELS_PREFIX}{k}") }
    };
    let sel = selector(s)?;
    for (k, v) in &sel.match_labels {
        insert_label(into, &rekey(k), v);
    }
    for r in sel.match_expressions {
        into.match_expressions.push(SelectorRequirement { key: rekey(&r.key), ..r });
    }
    Ok(())
}

fn selector(s: &meta::LabelSelector) -> Result<LabelSelector, SelectorProblem> {
    let mut out = LabelSelector { match_labels: s.match_labels.clone().unwrap_or_default(), match_expressions: vec![] };
    for r in s.match_expressions.as_deref().unwrap_or_default() {
        let operator = match r.operator.as_str() {
            "In" => SelectorOperator::In,
            "NotIn" => SelectorOperator::NotIn,
            "Exists" => SelectorOperator::Exists,
            "DoesNotExist" => SelectorOperator::DoesNotExist,
            other => return Err(SelectorProblem::UnknownOperator { operator: other.to_owned() }),
        };
        out.match_expressions.push(SelectorRequirement {
            key: r.key.clone(),
            operator,
            values: r.values.clone().unwrap_or_default(),
        });
    }
    out.normalize();
    Ok(out)
}

// === CiliumNetworkPolicy ===

/// The peers of one Cilium rule (one kind per rule) and its `toPorts`.
type CnpRawRule<'a> = (Result<Vec<Peer>, ImportWarningKind>, Option<&'a [PortRule]>);

/// Imports one CiliumNetworkPolicy. The result is normalised.
pub fn import_cilium_network_policy(cnp: &CiliumNetworkPolicy) -> Result<(Policy, Vec<ImportWarning>), ImportError> {
    let name = cnp.metadata.name.clone().ok_or(ImportError::MissingName)?;
    let ns = cnp.metadata.namespace.clone().ok_or_else(|| ImportError::MissingNamespace { name: shown(&name) })?;
    let id = format!("{}/{}", shown(&ns), shown(&name));
    let mut selector = cilium_selector(&cnp.spec.endpoint_selector)
        .and_then(pod_keys_only)
        .map_err(|problem| ImportError::EndpointSelector { policy: id.clone(), problem })?;
    insert_label(&mut selector, NAMESPACE_KEY, &ns);
    let mut ctx =
        ImportCtx { format: Format::CiliumNetworkPolicy, policy: id, namespace: ns.clone(), warnings: Vec::new() };

    let ingress = cnp.spec.ingress.as_ref().map(|rules| {
        let raw: Vec<CnpRawRule<'_>> = rules
            .iter()
            .map(|r| {
                let peers = ctx.cnp_peers(
                    r.from_endpoints.as_deref(),
                    r.from_entities.as_deref(),
                    r.from_cidr_set
                        .as_deref()
                        .map(|c| c.iter().map(|c| (c.cidr.as_str(), c.except.as_slice())).collect()),
                    None,
                );
                (peers, r.to_ports.as_deref())
            })
            .collect();
        ctx.cnp_rules(Direction::Ingress, raw)
    });
    let egress = cnp.spec.egress.as_ref().map(|rules| {
        let raw: Vec<CnpRawRule<'_>> = rules
            .iter()
            .map(|r| {
                let peers = ctx.cnp_peers(
                    r.to_endpoints.as_deref(),
                    r.to_entities.as_deref(),
                    r.to_cidr_set
                        .as_deref()
                        .map(|c| c.iter().map(|c| (c.cidr.as_str(), c.except.as_slice())).collect()),
                    r.to_fqdns.as_deref().map(|f| f.iter().map(|f| f.match_name.as_str()).collect()),
                );
                (peers, r.to_ports.as_deref())
            })
            .collect();
        ctx.cnp_rules(Direction::Egress, raw)
    });
    let mut policy = Policy { name, namespace: Some(ns), selector, ingress, egress };
    policy.normalize();
    Ok((policy, ctx.warnings))
}

impl ImportCtx {
    /// A direction's model rules. An empty Cilium rule (`{}`, the deny-all form) adds
    /// nothing; a rule without `toPorts` allows every port.
    fn cnp_rules(&mut self, direction: Direction, raw: Vec<CnpRawRule<'_>>) -> Vec<Rule> {
        let mut out = Vec::new();
        for (i, (peers, to_ports)) in raw.into_iter().enumerate() {
            let index = i + 1;
            let peers = match peers {
                Ok(peers) => peers,
                Err(kind) => {
                    self.warn(Some(direction), Some(index), kind);
                    continue;
                }
            };
            let Some(to_ports) = to_ports else {
                out.extend(peers.into_iter().map(|peer| Rule::l4(peer, Vec::new())));
                continue;
            };
            // Port rules without L7 are one allowance (the export cuts long port lists
            // and moves DNS ports apart); each port rule with HTTP rules is its own.
            let mut l4: Vec<PortRange> = Vec::new();
            let mut any_l4 = false;
            for pr in to_ports {
                match port_rule(pr) {
                    Ok((ports, http)) if http.is_empty() => {
                        any_l4 = true;
                        l4.extend(ports);
                    }
                    Ok((ports, http)) => out.extend(peers.iter().map(|peer| Rule {
                        peer: peer.clone(),
                        ports: ports.clone(),
                        http: http.clone(),
                    })),
                    Err(kind) => self.warn(Some(direction), Some(index), kind),
                }
            }
            if any_l4 {
                out.extend(peers.iter().map(|peer| Rule::l4(peer.clone(), l4.clone())));
            }
        }
        out
    }

    /// The peers of one Cilium rule. No peer list at all means no peer (the deny-all
    /// rule `{}`): Cilium only allows what a rule names.
    fn cnp_peers(
        &self,
        endpoints: Option<&[EndpointSelector]>,
        entities: Option<&[String]>,
        cidrs: Option<Vec<(&str, &[String])>>,
        fqdns: Option<Vec<&str>>,
    ) -> Result<Vec<Peer>, ImportWarningKind> {
        let mut out = Vec::new();
        for es in endpoints.unwrap_or_default() {
            let mut selector = cilium_selector(es)
                .map_err(|p| ImportWarningKind::UnsupportedPeer { problem: PeerProblem::Selector(p) })?;
            let any_namespace = SelectorRequirement {
                key: NAMESPACE_KEY.to_owned(),
                operator: SelectorOperator::Exists,
                values: vec![],
            };
            let about_namespace = |k: &str| matches!(classify(k), KeyClass::Namespace | KeyClass::NamespaceLabel(_));
            if let Some(pos) = selector.match_expressions.iter().position(|r| r == &any_namespace) {
                selector.match_expressions.remove(pos);
            } else if !selector.match_labels.keys().any(|k| about_namespace(k))
                && !selector.match_expressions.iter().any(|r| about_namespace(&r.key))
            {
                insert_label(&mut selector, NAMESPACE_KEY, &self.namespace);
            }
            selector.normalize();
            out.push(Peer::Workloads { selector });
        }
        for e in entities.unwrap_or_default() {
            if e == "all" {
                out.extend(everyone());
                continue;
            }
            match ReservedIdentity::ALL.into_iter().find(|r| r.name() == e) {
                Some(entity) => out.push(Peer::Entity { entity }),
                None => return Err(ImportWarningKind::UnsupportedEntity { entity: e.clone() }),
            }
        }
        for (cidr, except) in cidrs.unwrap_or_default() {
            let parse = |s: &str| {
                s.parse::<IpNet>().map_err(|_| ImportWarningKind::UnsupportedPeer {
                    problem: PeerProblem::InvalidCidr { cidr: s.to_owned() },
                })
            };
            let cidr = parse(cidr)?;
            let except = except.iter().map(|e| parse(e)).collect::<Result<_, _>>()?;
            out.push(Peer::Cidr { cidr, except });
        }
        for name in fqdns.unwrap_or_default() {
            out.push(Peer::Fqdn { name: name.to_owned(), addresses: Vec::new() });
        }
        Ok(out)
    }
}

/// A Cilium selector in the model's terms (any key allowed: Cilium selectors also hold
/// namespace and identity labels).
fn cilium_selector(es: &EndpointSelector) -> Result<LabelSelector, SelectorProblem> {
    let meta = meta::LabelSelector {
        match_labels: (!es.match_labels.is_empty()).then(|| es.match_labels.clone()),
        match_expressions: (!es.match_expressions.is_empty()).then(|| {
            es.match_expressions
                .iter()
                .map(|r| meta::LabelSelectorRequirement {
                    key: r.key.clone(),
                    operator: r.operator.clone(),
                    values: (!r.values.is_empty()).then(|| r.values.clone()),
                })
                .collect()
        }),
    };
    selector(&meta)
}

/// The policy's own selector may not name the namespace (the object's namespace does).
fn pod_keys_only(sel: LabelSelector) -> Result<LabelSelector, SelectorProblem> {
    let reserved = sel
        .match_labels
        .keys()
        .chain(sel.match_expressions.iter().map(|r| &r.key))
        .find(|k| matches!(classify(k), KeyClass::Namespace | KeyClass::NamespaceLabel(_)));
    match reserved {
        Some(key) => Err(SelectorProblem::ReservedKey { key: key.clone() }),
        None => Ok(sel),
    }
}

/// One `toPorts` entry: its ports and HTTP rules.
fn port_rule(pr: &PortRule) -> Result<(Vec<PortRange>, Vec<HttpRule>), ImportWarningKind> {
    let ports = pr.ports.iter().map(cilium_port).collect::<Result<Vec<_>, _>>()?;
    let mut http = Vec::new();
    if let Some(rules) = &pr.rules {
        if rules.dns.iter().flatten().any(|d| d.match_pattern != "*") {
            return Err(ImportWarningKind::UnsupportedDnsRule);
        }
        for h in rules.http.iter().flatten() {
            http.push(http_rule(h).ok_or_else(|| ImportWarningKind::UnsupportedHttpRule {
                method: h.method.clone(),
                path: h.path.clone(),
            })?);
        }
    }
    Ok((ports, http))
}

fn cilium_port(p: &PortProtocol) -> Result<PortRange, ImportWarningKind> {
    let protocol = match p.protocol.as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        other => return Err(ImportWarningKind::UnsupportedProtocol { protocol: other.to_owned() }),
    };
    let Ok(number) = p.port.parse::<u16>() else {
        return Err(ImportWarningKind::NamedPort { name: p.port.clone() });
    };
    let end = p.end_port.map(|e| u16::try_from(e).map_err(|_| ImportWarningKind::InvalidPort)).transpose()?;
    match (number, end) {
        (0, None) => Ok(PortRange::all(protocol)),
        (0, Some(_)) => Err(ImportWarningKind::InvalidPort),
        (first, end) => range(protocol, first, end),
    }
}

/// The model's HTTP rule for a Cilium one, when it is one of the shapes the export
/// writes (see the module docs).
pub(super) fn http_rule(h: &HttpRuleSpec) -> Option<HttpRule> {
    let method = match h.method.as_deref() {
        None | Some("") => None,
        Some(m) => {
            validate_method(m).ok()?;
            Some(m.to_owned())
        }
    };
    let path = match h.path.as_deref() {
        None | Some("") => HttpPath::Any,
        Some(re) => {
            let (literal, rest) = unescape_literal(re);
            let path = match rest {
                "" | r"(\?.*)?" => HttpPath::Exact(literal),
                ".*" => HttpPath::Prefix(literal),
                _ => return None,
            };
            match &path {
                HttpPath::Exact(p) | HttpPath::Prefix(p) => validate_path(p).ok()?,
                HttpPath::Any => {}
            }
            path
        }
    };
    Some(HttpRule { method, path })
}

/// The literal prefix of a regular expression (escaped metacharacters unescaped) and
/// the rest, from its first unescaped metacharacter on.
fn unescape_literal(re: &str) -> (String, &str) {
    let mut out = String::new();
    let mut chars = re.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.peek() {
                Some(&(_, next)) if !next.is_ascii_alphanumeric() => {
                    out.push(next);
                    chars.next();
                }
                _ => return (out, &re[i..]),
            },
            '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$' => return (out, &re[i..]),
            c => out.push(c),
        }
    }
    (out, "")
}

#[cfg(test)]
pub(super) mod tests_support {
    pub(in crate::export) use super::http_rule;
}
