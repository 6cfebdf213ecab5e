//! Export of [`Policy`]s as Kubernetes `networking.k8s.io/v1` NetworkPolicy and
//! `cilium.io/v2` CiliumNetworkPolicy objects, and import of deployed NetworkPolicies
//! so that cluster policy can be shown next to proposals.
//!
//! Everything here is pure: policies in, typed objects or YAML out. Three rules shape it:
//!
//! * **Never widen.** What an analyst approved is an allow-list; an export may allow
//!   *less* (and says so with an [`ExportWarning`]) but never more. A peer the target
//!   format cannot express is left out with a warning; a selector term it cannot express
//!   refuses the whole policy ([`ExportError`]), because dropping a term widens it.
//!   The one documented exception is `world` in a plain NetworkPolicy, which has no
//!   better spelling than `0.0.0.0/0` and `::/0` (warned).
//! * **Refuse bad input loudly.** Label keys and values come from inventories and pod
//!   authors; whatever Kubernetes would reject is refused per policy with the rule it
//!   broke ([`validate`]), and the other policies still export.
//! * **Deterministic.** Policies are normalised, objects sorted by namespace and name,
//!   and keys written in a fixed order, so the same input gives byte-identical YAML.
//!
//! Label conventions follow Cilium, which is also what the learner's identities use:
//! the workload's namespace is [`NAMESPACE_KEY`], its namespace's labels are
//! `io.cilium.k8s.namespace.labels.<key>` and its service account is
//! `io.cilium.k8s.policy.serviceaccount`.

mod cilium;
mod import;
mod networkpolicy;
#[cfg(test)]
mod tests;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{
    Direction, LabelSelector, Labels, Peer, Policy, PortRange, Protocol, ReservedIdentity, Rule, SelectorOperator,
    SelectorRequirement,
};
use serde::Serialize;

pub use cilium::{
    CidrRule, CiliumNetworkPolicy, CiliumSpec, DnsRule, EgressRule, EndpointSelector, FqdnSelector, HttpRuleSpec,
    IngressRule, L7Rules, PortProtocol, PortRule, Requirement, cilium_network_policy, http_method_regex,
    http_path_regex,
};
pub use import::{
    ImportError, ImportWarning, ImportWarningKind, PeerProblem, SelectorProblem, import_cilium_network_policy,
    import_network_policy,
};
pub use networkpolicy::{L7_DROPPED_ANNOTATION, network_policy};
use validate::{SyntaxRule, shown};

/// The label Kubernetes (≥ 1.21) puts on every namespace with the namespace's name:
/// how a NetworkPolicy `namespaceSelector` names one namespace.
pub const K8S_NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Prefix under which Cilium (and Bulkhead identities) carry a namespace's labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Prefix of Cilium's policy identity labels (`serviceaccount`, `cluster`): facts about a
/// pod that are not pod labels, so a NetworkPolicy cannot select on them.
pub const CILIUM_POLICY_LABELS_PREFIX: &str = "io.cilium.k8s.policy.";
/// Cilium's service-account label.
pub const SERVICE_ACCOUNT_KEY: &str = "io.cilium.k8s.policy.serviceaccount";
/// Label put on every exported object so operators can find (and prune) what Bulkhead
/// generated.
pub const MANAGED_BY_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", "bulkhead");

// === formats and scopes ===

/// Which Kubernetes object kind to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `networking.k8s.io/v1` NetworkPolicy: portable, but no entities, DNS names or
    /// service accounts.
    NetworkPolicy,
    /// `cilium.io/v2` CiliumNetworkPolicy: entities, `toFQDNs`, identity labels.
    CiliumNetworkPolicy,
}

impl Format {
    /// The Kubernetes `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            Format::NetworkPolicy => "NetworkPolicy",
            Format::CiliumNetworkPolicy => "CiliumNetworkPolicy",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind())
    }
}

/// Which policies an export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every policy that selects a workload with these labels (all that apply to it).
    Workload(Labels),
    /// Every policy of one namespace.
    Namespace(String),
    /// Everything.
    All,
}

impl Scope {
    pub fn includes(&self, policy: &Policy) -> bool {
        match self {
            Scope::Workload(labels) => policy.selector.matches(labels),
            Scope::Namespace(ns) => policy.namespace.as_deref() == Some(ns.as_str()),
            Scope::All => true,
        }
    }
}

/// What [`export_yaml`] produced: the objects that could be exported, and why the
/// others could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportOutput {
    /// Multi-document YAML, each object introduced by `---`, sorted by namespace then
    /// name. Empty when nothing was exported.
    pub yaml: String,
    /// Everything an exported object allows differently from its policy, in the order
    /// of the objects.
    pub warnings: Vec<ExportWarning>,
    /// One per policy that was not exported.
    pub errors: Vec<ExportError>,
}

/// Renders the policies in `scope` as YAML. Policies that cannot be exported are
/// reported in [`ExportOutput::errors`]; the others still are.
pub fn export_yaml(policies: &[Policy], format: Format, scope: &Scope) -> ExportOutput {
    let mut selected: Vec<&Policy> = policies.iter().filter(|p| scope.includes(p)).collect();
    selected.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let mut out = ExportOutput::default();
    let mut i = 0;
    while let Some(policy) = selected.get(i) {
        let same =
            selected[i..].iter().take_while(|q| q.namespace == policy.namespace && q.name == policy.name).count();
        i += same;
        if same > 1 {
            // Refusing all of them (not "first wins") keeps the output independent of
            // the input order.
            out.errors.push(ExportError::DuplicateName { policy: policy_id(policy), count: same });
            continue;
        }
        let rendered = match format {
            Format::NetworkPolicy => network_policy(policy).and_then(|(np, w)| Ok((render(policy, &np)?, w))),
            Format::CiliumNetworkPolicy => {
                cilium_network_policy(policy).and_then(|(cnp, w)| Ok((render(policy, &cnp)?, w)))
            }
        };
        match rendered {
            Ok((doc, warnings)) => {
                out.yaml.push_str("---\n");
                out.yaml.push_str(&doc);
                out.warnings.extend(warnings);
            }
            Err(e) => out.errors.push(e),
        }
    }
    out
}

fn render(policy: &Policy, object: &impl Serialize) -> Result<String, ExportError> {
    serde_yaml_ng::to_string(object)
        .map_err(|e| ExportError::Render { policy: policy_id(policy), reason: e.to_string() })
}

// === warnings ===

/// Something an exported object allows differently from the approved policy (always
/// less, except [`ExportWarningKind::WorldAsCidrs`]) or that needs the operator's
/// attention before it works as intended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportWarning {
    /// `namespace/name` of the policy.
    pub policy: String,
    /// The direction concerned, if the warning is about one rule or direction.
    pub direction: Option<Direction>,
    /// The rule concerned (`peer on ports`), if any.
    pub rule: Option<String>,
    pub kind: ExportWarningKind,
}

impl fmt::Display for ExportWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy {}: ", self.policy)?;
        match (&self.direction, &self.rule) {
            (Some(d), Some(r)) => write!(f, "{} rule {r}: ", d.as_str())?,
            (Some(d), None) => write!(f, "{}: ", d.as_str())?,
            (None, Some(r)) => write!(f, "rule {r}: ")?,
            (None, None) => {}
        }
        write!(f, "{}", self.kind)
    }
}

/// What an [`ExportWarning`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportWarningKind {
    /// A DNS name exported as the addresses it resolved to.
    FqdnAsAddresses { format: Format, name: String, addresses: usize },
    /// A DNS name with no known address: the peer was left out.
    FqdnWithoutAddresses { format: Format, name: String },
    /// A DNS name Cilium's `matchName` does not accept: the peer was left out.
    InvalidFqdnName { name: String, rule: SyntaxRule },
    /// `world` exported as `0.0.0.0/0` and `::/0` (NetworkPolicy only).
    WorldAsCidrs,
    /// A reserved entity NetworkPolicy cannot name: the peer was left out.
    EntityNotExpressible { entity: ReservedIdentity },
    /// An `except` outside its CIDR excludes nothing and was left out.
    ExceptOutsideCidr { except: String },
    /// A peer that matches no address (fully excepted CIDR, empty CIDR group) was left
    /// out.
    PeerMatchesNothing,
    /// Port 0 (single) cannot be written in either format and was left out.
    PortZero,
    /// Nothing of the rule could be expressed: it was left out.
    RuleDropped,
    /// The policy uses `toFQDNs` but has no egress rule to port 53 where a DNS proxy
    /// rule could be attached, so Cilium never learns the names' addresses.
    FqdnWithoutDnsRule,
    /// The rule's HTTP rules (L7) cannot be written here: its ports are exported for any
    /// request, which is wider than the approved policy.
    HttpRulesDropped { format: Format, reason: HttpDropReason },
}

/// Why a rule's HTTP rules were not exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpDropReason {
    /// NetworkPolicy has no L7 at all.
    NoL7,
    /// Cilium applies HTTP rules to single TCP ports only (not UDP, ranges or "every
    /// port").
    NotSingleTcpPorts,
}

impl fmt::Display for ExportWarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LESS: &str = "so the export allows less than the approved policy";
        match self {
            ExportWarningKind::FqdnAsAddresses { format, name, addresses } => write!(
                f,
                "{format} cannot match DNS names here; exported the {addresses} address(es) {:?} resolved to \
                 when the policy was made, which will go stale when its records change",
                shown(name)
            ),
            ExportWarningKind::FqdnWithoutAddresses { format, name } => write!(
                f,
                "{format} cannot match DNS names here and no current address of {:?} is known; peer left out, {LESS}",
                shown(name)
            ),
            ExportWarningKind::InvalidFqdnName { name, rule } => write!(
                f,
                "DNS name {:?} is not accepted by CiliumNetworkPolicy toFQDNs ({rule}); peer left out, {LESS}",
                shown(name)
            ),
            ExportWarningKind::WorldAsCidrs => f.write_str(
                "NetworkPolicy has no 'world' entity; exported as ipBlocks 0.0.0.0/0 and ::/0, which many network \
                 plugins also match against pod and node addresses — wider than 'world'; prefer the \
                 CiliumNetworkPolicy export",
            ),
            ExportWarningKind::EntityNotExpressible { entity } => {
                write!(f, "NetworkPolicy cannot express the '{}' entity; peer left out, {LESS}", entity.name())
            }
            ExportWarningKind::ExceptOutsideCidr { except } => {
                write!(f, "except {except} lies outside the CIDR and excludes nothing; left out")
            }
            ExportWarningKind::PeerMatchesNothing => {
                write!(f, "peer matches no address (its except list covers the whole CIDR, or it is empty); left out")
            }
            ExportWarningKind::PortZero => write!(f, "port 0 cannot be expressed; left out, {LESS}"),
            ExportWarningKind::RuleDropped => {
                write!(f, "no peer or port of the rule can be expressed; rule left out, {LESS}")
            }
            ExportWarningKind::HttpRulesDropped { format, reason } => {
                let why = match reason {
                    HttpDropReason::NoL7 => "cannot express HTTP (L7) rules",
                    HttpDropReason::NotSingleTcpPorts => {
                        "applies HTTP rules to single TCP ports only, and this rule has other ports"
                    }
                };
                write!(
                    f,
                    "{format} {why}; exported the ports for any request, which is wider than the approved policy \
                     (the Bulkhead enforcer and the CiliumNetworkPolicy export keep the HTTP rules)"
                )
            }
            ExportWarningKind::FqdnWithoutDnsRule => f.write_str(
                "toFQDNs rules only match once Cilium's DNS proxy has seen the names resolved, but the policy has \
                 no egress rule to port 53 (a single port, UDP or TCP) where a `rules.dns` proxy rule could be \
                 attached; until one is added (e.g. toEndpoints k8s-app=kube-dns in kube-system, port 53, \
                 rules.dns matchPattern \"*\") the FQDN rules allow nothing",
            ),
        }
    }
}

// === errors ===

/// Where in a policy a selector sits, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The policy's own selector (the workloads it applies to).
    PolicySelector,
    /// The peer of the `rule`-th (1-based, normalised order) rule of a direction.
    Peer { direction: Direction, rule: usize },
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::PolicySelector => f.write_str("the policy's selector"),
            Site::Peer { direction, rule } => write!(f, "the peer of {} rule {rule}", direction.as_str()),
        }
    }
}

/// Why a selector term has no NetworkPolicy spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotExpressible {
    /// Cilium identity labels (service account, cluster) are not pod labels.
    CiliumIdentityLabel,
    /// A podSelector only sees pod labels, not the labels of the pod's namespace.
    NamespaceLabelInPolicySelector,
}

impl fmt::Display for NotExpressible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotExpressible::CiliumIdentityLabel => {
                "a Cilium identity label such as the service account, not a pod label, and NetworkPolicy selects only \
                 on pod and namespace labels"
            }
            NotExpressible::NamespaceLabelInPolicySelector => {
                "a namespace label, and a NetworkPolicy's podSelector only sees pod labels"
            }
        })
    }
}

/// What is wrong with a `matchExpressions` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequirementProblem {
    /// `In` / `NotIn` without values (Kubernetes rejects it).
    NeedsValues,
    /// `Exists` / `DoesNotExist` with values (Kubernetes rejects it).
    TakesNoValues,
}

impl fmt::Display for RequirementProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequirementProblem::NeedsValues => "needs at least one value",
            RequirementProblem::TakesNoValues => "takes no values",
        })
    }
}

/// Why one policy was not exported. Each names the policy (`namespace/name`), the place
/// and the rule broken; untrusted text is quoted, escaped and shortened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error(
        "policy {policy}: has no namespace, and a {format} is a namespaced object; only policies for namespaced \
         workloads can be exported"
    )]
    MissingNamespace { policy: String, format: Format },
    #[error("policy {policy}: namespace is not a valid Kubernetes namespace name ({rule})")]
    InvalidNamespace { policy: String, rule: SyntaxRule },
    #[error("policy {policy}: name is not a valid Kubernetes object name ({rule})")]
    InvalidName { policy: String, rule: SyntaxRule },
    #[error(
        "policy {policy}: covers neither ingress nor egress; a NetworkPolicy or CiliumNetworkPolicy always covers a \
         direction, so there is nothing faithful to export"
    )]
    NothingCovered { policy: String },
    #[error("policy {policy}: label key {key:?} in {site} is not a valid Kubernetes label key ({rule})")]
    InvalidLabelKey { policy: String, site: Site, key: String, rule: SyntaxRule },
    #[error(
        "policy {policy}: label value {value:?} of key {key:?} in {site} is not a valid Kubernetes label value ({rule})"
    )]
    InvalidLabelValue { policy: String, site: Site, key: String, value: String, rule: SyntaxRule },
    #[error("policy {policy}: expression {operator:?} on {key:?} in {site} {problem}")]
    InvalidRequirement {
        policy: String,
        site: Site,
        key: String,
        operator: SelectorOperator,
        problem: RequirementProblem,
    },
    #[error(
        "policy {policy}: the policy's selector does not pin its workloads to namespace {namespace:?} (no \
         {NAMESPACE_KEY} term); a namespaced object only selects pods of its own namespace, so exporting it would \
         leave the other workloads it selects unprotected"
    )]
    SelectorLacksNamespace { policy: String, namespace: String },
    #[error(
        "policy {policy}: the policy's selector term {term} also selects workloads outside namespace {namespace:?}; \
         a namespaced object only selects pods of its own namespace, so exporting it would leave those unprotected"
    )]
    SelectorNamespaceMismatch { policy: String, namespace: String, term: String },
    #[error(
        "policy {policy}: {site} matches on {key:?}, which is {reason}; refusing rather than dropping the term, \
         which would widen the policy — export it as a CiliumNetworkPolicy instead"
    )]
    NotExpressible { policy: String, site: Site, key: String, reason: NotExpressible },
    #[error("policy {policy}: {site} has port range {first}-{last}, which is empty", first = range.first, last = range.last)]
    InvalidPortRange { policy: String, site: Site, range: PortRange },
    #[error("policy {policy}: {count} policies have this namespace and name; none of them was exported")]
    DuplicateName { policy: String, count: usize },
    #[error("policy {policy}: could not be rendered as YAML: {reason}")]
    Render { policy: String, reason: String },
}

// === shared by both exporters ===

/// `namespace/name` for messages; parts Kubernetes would reject are quoted and shortened
/// so that a hostile name cannot forge a message.
pub(crate) fn policy_id(p: &Policy) -> String {
    let part = |s: &str, ok: bool| if ok { s.to_owned() } else { format!("{:?}", shown(s)) };
    let name = part(&p.name, validate::dns1123_subdomain(&p.name).is_ok());
    match &p.namespace {
        Some(ns) => format!("{}/{name}", part(ns, validate::dns1123_label(ns).is_ok())),
        None => name,
    }
}

/// Per-export state: the policy's id and the warnings collected so far.
pub(crate) struct Ctx {
    pub policy: String,
    pub format: Format,
    pub warnings: Vec<ExportWarning>,
}

impl Ctx {
    pub fn new(policy: &Policy, format: Format) -> Self {
        Self { policy: policy_id(policy), format, warnings: Vec::new() }
    }

    pub fn warn(&mut self, direction: Option<Direction>, rule: Option<String>, kind: ExportWarningKind) {
        self.warnings.push(ExportWarning { policy: self.policy.clone(), direction, rule, kind });
    }
}

/// Checks the parts every object needs; returns the namespace.
pub(crate) fn check_metadata<'p>(ctx: &Ctx, p: &'p Policy) -> Result<&'p str, ExportError> {
    let policy = ctx.policy.clone();
    let Some(ns) = p.namespace.as_deref() else {
        return Err(ExportError::MissingNamespace { policy, format: ctx.format });
    };
    validate::dns1123_label(ns).map_err(|rule| ExportError::InvalidNamespace { policy: policy.clone(), rule })?;
    validate::dns1123_subdomain(&p.name).map_err(|rule| ExportError::InvalidName { policy: policy.clone(), rule })?;
    if p.ingress.is_none() && p.egress.is_none() {
        return Err(ExportError::NothingCovered { policy });
    }
    Ok(ns)
}

/// What a selector's label key is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyClass<'a> {
    /// The workload's namespace ([`NAMESPACE_KEY`]).
    Namespace,
    /// A label of the workload's namespace; the key without the prefix.
    NamespaceLabel(&'a str),
    /// A Cilium identity label (service account, cluster).
    CiliumIdentity,
    /// A label of the workload itself.
    Pod,
}

pub(crate) fn classify(key: &str) -> KeyClass<'_> {
    if key == NAMESPACE_KEY {
        KeyClass::Namespace
    } else if let Some(rest) = key.strip_prefix(NAMESPACE_LABELS_PREFIX) {
        KeyClass::NamespaceLabel(rest)
    } else if key.starts_with(CILIUM_POLICY_LABELS_PREFIX) {
        KeyClass::CiliumIdentity
    } else {
        KeyClass::Pod
    }
}

/// Checks every selector of the policy before anything is converted, so that no
/// warning ever quotes an unchecked label.
pub(crate) fn check_selectors(ctx: &Ctx, p: &Policy) -> Result<(), ExportError> {
    check_selector(ctx, Site::PolicySelector, &p.selector)?;
    for direction in [Direction::Ingress, Direction::Egress] {
        for (i, rule) in p.rules(direction).unwrap_or_default().iter().enumerate() {
            if let Peer::Workloads { selector } = &rule.peer {
                check_selector(ctx, Site::Peer { direction, rule: i + 1 }, selector)?;
            }
        }
    }
    Ok(())
}

fn check_selector(ctx: &Ctx, site: Site, sel: &LabelSelector) -> Result<(), ExportError> {
    let key_error =
        |key: &str, rule| ExportError::InvalidLabelKey { policy: ctx.policy.clone(), site, key: shown(key), rule };
    let check_key = |key: &str| -> Result<(), ExportError> {
        match classify(key) {
            KeyClass::Namespace | KeyClass::Pod => validate::label_key(key).map_err(|rule| key_error(key, rule)),
            KeyClass::NamespaceLabel(rest) => validate::label_key(rest).map_err(|rule| key_error(key, rule)),
            KeyClass::CiliumIdentity => match ctx.format {
                Format::NetworkPolicy => Err(ExportError::NotExpressible {
                    policy: ctx.policy.clone(),
                    site,
                    key: key.to_owned(),
                    reason: NotExpressible::CiliumIdentityLabel,
                }),
                Format::CiliumNetworkPolicy => validate::label_key(key).map_err(|rule| key_error(key, rule)),
            },
        }
    };
    let check_value = |key: &str, value: &str| {
        validate::label_value(value).map_err(|rule| ExportError::InvalidLabelValue {
            policy: ctx.policy.clone(),
            site,
            key: shown(key),
            value: shown(value),
            rule,
        })
    };
    for (k, v) in &sel.match_labels {
        check_key(k)?;
        check_value(k, v)?;
    }
    for r in &sel.match_expressions {
        check_key(&r.key)?;
        let problem = match r.operator {
            SelectorOperator::In | SelectorOperator::NotIn if r.values.is_empty() => {
                Some(RequirementProblem::NeedsValues)
            }
            SelectorOperator::Exists | SelectorOperator::DoesNotExist if !r.values.is_empty() => {
                Some(RequirementProblem::TakesNoValues)
            }
            _ => None,
        };
        if let Some(problem) = problem {
            return Err(ExportError::InvalidRequirement {
                policy: ctx.policy.clone(),
                site,
                key: shown(&r.key),
                operator: r.operator,
                problem,
            });
        }
        for v in &r.values {
            check_value(&r.key, v)?;
        }
    }
    Ok(())
}

/// The policy's own selector without its namespace terms, which the object's namespace
/// replaces. Those terms must say exactly "this namespace": anything looser selects
/// workloads elsewhere that a namespaced object cannot protect.
pub(crate) fn own_selector(ctx: &Ctx, p: &Policy, ns: &str) -> Result<LabelSelector, ExportError> {
    let mismatch = |term: String| ExportError::SelectorNamespaceMismatch {
        policy: ctx.policy.clone(),
        namespace: ns.to_owned(),
        term,
    };
    let mut pinned = false;
    let mut rest = LabelSelector::default();
    for (k, v) in &p.selector.match_labels {
        if classify(k) == KeyClass::Namespace {
            if v != ns {
                return Err(mismatch(format!("{k}={v}")));
            }
            pinned = true;
        } else {
            rest.match_labels.insert(k.clone(), v.clone());
        }
    }
    for r in &p.selector.match_expressions {
        if classify(&r.key) == KeyClass::Namespace {
            if r.operator != SelectorOperator::In || r.values.iter().any(|v| v != ns) {
                return Err(mismatch(format!("{} {:?} ({})", r.key, r.operator, r.values.join(","))));
            }
            pinned = true;
        } else {
            rest.match_expressions.push(r.clone());
        }
    }
    if !pinned {
        return Err(ExportError::SelectorLacksNamespace { policy: ctx.policy.clone(), namespace: ns.to_owned() });
    }
    Ok(rest)
}

/// A selector split by what each term is about.
#[derive(Debug, Default)]
pub(crate) struct SplitSelector {
    /// Terms on [`NAMESPACE_KEY`].
    pub namespace: LabelSelector,
    /// Terms on the namespace's labels, keys without [`NAMESPACE_LABELS_PREFIX`].
    pub namespace_labels: LabelSelector,
    /// Everything else (pod labels and, for Cilium, identity labels), keys as they are.
    pub pod: LabelSelector,
}

pub(crate) fn split(sel: &LabelSelector) -> SplitSelector {
    let mut out = SplitSelector::default();
    for (k, v) in &sel.match_labels {
        match classify(k) {
            KeyClass::Namespace => insert_label(&mut out.namespace, k, v),
            KeyClass::NamespaceLabel(rest) => insert_label(&mut out.namespace_labels, rest, v),
            KeyClass::CiliumIdentity | KeyClass::Pod => insert_label(&mut out.pod, k, v),
        }
    }
    for r in &sel.match_expressions {
        match classify(&r.key) {
            KeyClass::Namespace => out.namespace.match_expressions.push(r.clone()),
            KeyClass::NamespaceLabel(rest) => {
                out.namespace_labels.match_expressions.push(SelectorRequirement { key: rest.to_owned(), ..r.clone() })
            }
            KeyClass::CiliumIdentity | KeyClass::Pod => out.pod.match_expressions.push(r.clone()),
        }
    }
    out
}

/// Adds `key=value` to a selector. When two terms land on one key (a namespace's name
/// given both as [`NAMESPACE_KEY`] and as its `kubernetes.io/metadata.name` label), the
/// second becomes an `In` expression: overwriting would drop a term and widen.
pub(crate) fn insert_label(sel: &mut LabelSelector, key: &str, value: &str) {
    match sel.match_labels.get(key) {
        Some(existing) if existing != value => sel.match_expressions.push(SelectorRequirement {
            key: key.to_owned(),
            operator: SelectorOperator::In,
            values: vec![value.to_owned()],
        }),
        Some(_) => {}
        None => {
            sel.match_labels.insert(key.to_owned(), value.to_owned());
        }
    }
}

/// One port entry as both formats write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PortSpec {
    /// Every port of the protocol.
    All(Protocol),
    Single(Protocol, u16),
    /// `first..=last`, `first < last`, `first ≥ 1`.
    Range(Protocol, u16, u16),
}

/// The rule's ports as [`PortSpec`]s; empty = every port of every protocol. `None` when
/// the rule had ports but none can be written (the rule must then be left out: an
/// empty port list would allow every port).
pub(crate) fn port_specs(
    ctx: &mut Ctx,
    direction: Direction,
    index: usize,
    rule: &Rule,
) -> Result<Option<Vec<PortSpec>>, ExportError> {
    let mut out = Vec::with_capacity(rule.ports.len());
    for range in &rule.ports {
        let spec = match (range.first, range.last) {
            (a, b) if a > b => {
                return Err(ExportError::InvalidPortRange {
                    policy: ctx.policy.clone(),
                    site: Site::Peer { direction, rule: index },
                    range: *range,
                });
            }
            (0, u16::MAX) => PortSpec::All(range.protocol),
            (0, 0) => {
                // Neither format can say "port 0": NetworkPolicy rejects it and Cilium
                // reads it as "every port".
                ctx.warn(Some(direction), Some(describe_rule(rule)), ExportWarningKind::PortZero);
                continue;
            }
            // Nothing connects to port 0, so starting at 1 loses nothing.
            (0, 1) => PortSpec::Single(range.protocol, 1),
            (0, b) => PortSpec::Range(range.protocol, 1, b),
            (a, b) if a == b => PortSpec::Single(range.protocol, a),
            (a, b) => PortSpec::Range(range.protocol, a, b),
        };
        out.push(spec);
    }
    out.sort();
    out.dedup();
    if out.is_empty() && !rule.ports.is_empty() {
        ctx.warn(Some(direction), Some(describe_rule(rule)), ExportWarningKind::RuleDropped);
        return Ok(None);
    }
    Ok(Some(out))
}

/// Rules grouped by their ports, each with its 1-based index.
pub(crate) type PortGroups<'r> = BTreeMap<Vec<PortSpec>, Vec<(usize, &'r Rule)>>;

/// Groups a direction's rules by their ports, in a fixed order, so that each group
/// becomes one object rule with several peers. Rules whose ports cannot be written are
/// left out (with a warning).
pub(crate) fn group_by_ports<'r>(
    ctx: &mut Ctx,
    direction: Direction,
    rules: &'r [Rule],
) -> Result<PortGroups<'r>, ExportError> {
    let mut groups = PortGroups::new();
    for (i, rule) in rules.iter().enumerate() {
        if let Some(ports) = port_specs(ctx, direction, i + 1, rule)? {
            groups.entry(ports).or_default().push((i + 1, rule));
        }
    }
    Ok(groups)
}

/// Whether a group's peers are every peer there is (every workload and every reserved
/// entity): how an imported "from/to everyone" rule comes back.
pub(crate) fn is_everyone(rules: &[(usize, &Rule)]) -> bool {
    let has = |peer: &Peer| rules.iter().any(|(_, r)| &r.peer == peer);
    has(&Peer::Workloads { selector: LabelSelector::default() })
        && ReservedIdentity::ALL.into_iter().all(|entity| has(&Peer::Entity { entity }))
}

/// `peer on ports` for warnings. Free text from outside (DNS and group names) is quoted;
/// selectors have been checked by [`check_selectors`] by the time this runs.
pub(crate) fn describe_rule(rule: &Rule) -> String {
    let peer = match &rule.peer {
        Peer::Fqdn { name, .. } => format!("fqdn {:?}", shown(name)),
        Peer::CidrGroup { name, .. } => format!("cidr-group {:?}", shown(name)),
        other => other.to_string(),
    };
    if rule.ports.is_empty() {
        format!("{peer} on any port")
    } else {
        let ports: Vec<String> = rule.ports.iter().map(ToString::to_string).collect();
        format!("{peer} on {}", ports.join(","))
    }
}

/// The CIDR blocks a CIDR peer becomes, with its `except` list reduced to what
/// Kubernetes and Cilium accept (prefixes strictly inside the CIDR). `None` when the
/// peer matches nothing.
pub(crate) fn cidr_block(
    ctx: &mut Ctx,
    direction: Direction,
    rule: &Rule,
    cidr: &ipnet::IpNet,
    except: &[ipnet::IpNet],
) -> Option<(String, Vec<String>)> {
    let cidr = cidr.trunc();
    let mut kept = Vec::new();
    for e in except {
        let e = e.trunc();
        if e.contains(&cidr) {
            ctx.warn(Some(direction), Some(describe_rule(rule)), ExportWarningKind::PeerMatchesNothing);
            return None;
        }
        if cidr.contains(&e) {
            kept.push(e.to_string());
        } else {
            ctx.warn(
                Some(direction),
                Some(describe_rule(rule)),
                ExportWarningKind::ExceptOutsideCidr { except: e.to_string() },
            );
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    kept.retain(|e| seen.insert(e.clone()));
    Some((cidr.to_string(), kept))
}

/// A model selector as a Kubernetes one (the type both NetworkPolicy and Cilium use).
pub(crate) fn k8s_selector(sel: &LabelSelector) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
    meta::LabelSelector {
        match_labels: (!sel.match_labels.is_empty()).then(|| sel.match_labels.clone()),
        match_expressions: (!sel.match_expressions.is_empty()).then(|| {
            sel.match_expressions
                .iter()
                .map(|r| meta::LabelSelectorRequirement {
                    key: r.key.clone(),
                    operator: operator_name(r.operator).to_owned(),
                    values: (!r.values.is_empty()).then(|| r.values.clone()),
                })
                .collect()
        }),
    }
}

pub(crate) fn operator_name(op: SelectorOperator) -> &'static str {
    match op {
        SelectorOperator::In => "In",
        SelectorOperator::NotIn => "NotIn",
        SelectorOperator::Exists => "Exists",
        SelectorOperator::DoesNotExist => "DoesNotExist",
    }
}

pub(crate) fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}
