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

use std::fmt;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Direction, LabelSelector, Peer, Policy, PortRange, Protocol, ReservedIdentity, Rule, SelectorOperator,
    SelectorRequirement,
};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::validate::shown;
use super::{K8S_NAMESPACE_NAME_LABEL, KeyClass, NAMESPACE_LABELS_PREFIX, classify, insert_label};

/// Why a NetworkPolicy could not be imported at all.
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
        write!(f, "NetworkPolicy {}: ", self.policy)?;
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

    let mut ctx = ImportCtx { policy: id, namespace: ns.clone(), warnings: Vec::new() };
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
    policy: String,
    namespace: String,
    warnings: Vec<ImportWarning>,
}

impl ImportCtx {
    fn warn(&mut self, direction: Option<Direction>, rule: Option<usize>, kind: ImportWarningKind) {
        self.warnings.push(ImportWarning { policy: self.policy.clone(), direction, rule, kind });
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
        out.extend(peers.into_iter().map(|peer| Rule { peer, ports: ports.clone() }));
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
