//! [`Policy`] → `cilium.io/v2` CiliumNetworkPolicy.
//!
//! Cilium speaks the model's language almost word for word: label selectors over the
//! same keys (`io.kubernetes.pod.namespace`, `io.cilium.k8s.namespace.labels.*`,
//! `io.cilium.k8s.policy.serviceaccount`), reserved entities, CIDR sets and DNS names.
//! The typed structs below cover exactly the subset Bulkhead writes; field names follow
//! the CRD (`deploy/kubernetes/crds/ciliumnetworkpolicy.yaml`, written from
//! <https://docs.cilium.io/en/stable/security/policy/language/>).
//!
//! Choices worth knowing:
//! * **Namespaces.** In a CiliumNetworkPolicy a peer selector without a namespace term
//!   is limited to the policy's own namespace
//!   (<https://docs.cilium.io/en/stable/security/policy/kubernetes/#namespaces>); the
//!   model's "no namespace term" means *any* namespace, so such peers get
//!   `io.kubernetes.pod.namespace Exists`, which Cilium treats as an explicit namespace
//!   term. A peer with `io.cilium.k8s.namespace.labels.*` terms but no namespace name is
//!   left to Cilium, which (since 1.14) then matches any namespace with those labels;
//!   older agents narrow it to the policy's namespace — narrower, never wider.
//! * **Deny-all.** A covered direction without rules is written as `ingress: [{}]`
//!   (`egress: [{}]`): a rule section puts the endpoint into default deny and an empty
//!   rule allows nothing, the form Cilium documents at
//!   <https://docs.cilium.io/en/stable/security/policy/language/#ingress-egress-default-deny>.
//!   An empty list would not do: Cilium reads `ingress: []` as "no ingress section".
//!   `enableDefaultDeny` would also work but only on Cilium ≥ 1.15, and says nothing the
//!   rule section does not.
//! * **One peer kind per rule.** `toEndpoints`, `toEntities`, `toCIDRSet` and `toFQDNs`
//!   are mutually exclusive within one rule, so each group of rules with the same ports
//!   becomes up to four Cilium rules.
//! * **DNS.** `toFQDNs` only matches addresses Cilium's DNS proxy saw being resolved. When
//!   the policy has `toFQDNs`, every egress rule to single port 53 gets
//!   `rules.dns: [{matchPattern: "*"}]` (all lookups allowed, now through the proxy);
//!   without such a rule the export warns ([`ExportWarningKind::FqdnWithoutDnsRule`]).
//! * **Ports.** Every port of a protocol is `port: "0"` (Cilium's wildcard; older CRDs
//!   require `port`), ranges use `endPort`, and port lists are cut into chunks of 40,
//!   the CRD's `maxItems`.
//! * **HTTP (L7).** A rule with HTTP rules becomes a port rule with
//!   `rules.http: [{method, path}]` (rules with the same ports but other HTTP rules are
//!   separate Cilium rules). Cilium matches `method` and `path` as regular expressions
//!   against the whole method and the request's `:path`, so a method is written as is
//!   (an upper-case token), an exact path as the path with every regex metacharacter
//!   escaped followed by `(\?.*)?` (the model's paths never include the query string,
//!   Envoy's `:path` does), a prefix as the escaped prefix followed by `.*`, and "any
//!   path" by leaving `path` out. Cilium applies HTTP rules to TCP ports only; on other
//!   ports they are left out with a warning (the export then allows any request there).

use std::collections::BTreeMap;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{Direction, HttpPath, HttpRule, LabelSelector, Peer, Policy, Protocol, SelectorOperator};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::{
    Ctx, ExportError, ExportWarning, ExportWarningKind, Format, HttpDropReason, KeyClass, MANAGED_BY_LABEL, PortSpec,
    check_metadata, check_selectors, cidr_block, classify, describe_rule, group_by_ports, is_everyone, operator_name,
    own_selector, protocol_name, validate,
};

/// Cilium's `ports` list holds at most this many entries (CRD `maxItems`).
const MAX_PORTS_PER_RULE: usize = 40;
/// The DNS port whose egress rules get the DNS proxy rule.
const DNS_PORT: u16 = 53;

/// A `cilium.io/v2` CiliumNetworkPolicy, restricted to the fields Bulkhead writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumNetworkPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: CiliumSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumSpec {
    /// The endpoints (of the policy's namespace) the policy applies to.
    pub endpoint_selector: EndpointSelector,
    /// `None`: ingress not covered; `[{}]`: deny all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<IngressRule>>,
    /// `None`: egress not covered; `[{}]`: deny all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<EgressRule>>,
}

/// A Kubernetes label selector as Cilium writes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// One ingress rule: at most one of the `from*` lists is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_entities: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet", skip_serializing_if = "Option::is_none")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

/// One egress rule: at most one of the `to*` peer lists is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_entities: Option<Vec<String>>,
    #[serde(default, rename = "toCIDRSet", skip_serializing_if = "Option::is_none")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default, rename = "toFQDNs", skip_serializing_if = "Option::is_none")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ports: Option<Vec<PortRule>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrRule {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FqdnSelector {
    pub match_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortRule {
    pub ports: Vec<PortProtocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<L7Rules>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortProtocol {
    /// A port number as a string; `"0"` = every port.
    pub port: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i32>,
    /// `TCP` or `UDP`.
    pub protocol: String,
}

/// Layer-7 rules of a port rule: one kind per port rule (the CRD's `oneOf`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Rules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<DnsRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Vec<HttpRuleSpec>>,
}

/// One allowed HTTP request shape: regular expressions over the whole method and the
/// whole `:path` (absent = any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// What Cilium's `path` regex must be for `path` to mean what the model means: the
/// query string never matters. `None` = any path (the field is left out).
pub fn http_path_regex(path: &HttpPath) -> Option<String> {
    match path {
        HttpPath::Any => None,
        HttpPath::Exact(p) => Some(format!(r"{}(\?.*)?", regex_escape(p))),
        HttpPath::Prefix(p) => Some(format!("{}.*", regex_escape(p))),
    }
}

/// Cilium's `method` regex: the model's methods are upper-case tokens, never
/// metacharacters, so the token itself. `None` = any method.
pub fn http_method_regex(method: Option<&str>) -> Option<String> {
    method.map(regex_escape)
}

/// Escapes every RE2 / POSIX ERE metacharacter.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if matches!(c, '\\' | '.' | '+' | '*' | '?' | '(' | ')' | '|' | '[' | ']' | '{' | '}' | '^' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DnsRule {
    pub match_pattern: String,
}

/// The peers of one Cilium rule before it is typed by direction; one kind per rule.
#[derive(Debug)]
enum Peers {
    Endpoints(Vec<EndpointSelector>),
    Entities(Vec<String>),
    Cidrs(Vec<CidrRule>),
    Fqdns(Vec<FqdnSelector>),
}

/// One Cilium rule before it is typed by direction: its peers and `toPorts`.
type CnpRule = (Peers, Option<Vec<PortRule>>);

/// Exports one policy as a CiliumNetworkPolicy, with what it allows differently.
pub fn cilium_network_policy(policy: &Policy) -> Result<(CiliumNetworkPolicy, Vec<ExportWarning>), ExportError> {
    let mut p = policy.clone();
    p.normalize();
    let mut ctx = Ctx::new(&p, Format::CiliumNetworkPolicy);
    let ns = check_metadata(&ctx, &p)?;
    check_selectors(&ctx, &p)?;
    let own = own_selector(&ctx, &p, ns)?;

    let ingress = match &p.ingress {
        Some(rules) => {
            let rules: Vec<IngressRule> = cnp_rules(&mut ctx, Direction::Ingress, rules)?
                .into_iter()
                .map(|(peers, to_ports)| {
                    let mut r = IngressRule { to_ports, ..IngressRule::default() };
                    match peers {
                        Peers::Endpoints(v) => r.from_endpoints = Some(v),
                        Peers::Entities(v) => r.from_entities = Some(v),
                        Peers::Cidrs(v) => r.from_cidr_set = Some(v),
                        // Never produced for ingress: DNS names become addresses there.
                        Peers::Fqdns(_) => {}
                    }
                    r
                })
                .collect();
            Some(if rules.is_empty() { vec![IngressRule::default()] } else { rules })
        }
        None => None,
    };
    let egress = match &p.egress {
        Some(rules) => {
            let mut rules: Vec<EgressRule> = cnp_rules(&mut ctx, Direction::Egress, rules)?
                .into_iter()
                .map(|(peers, to_ports)| {
                    let mut r = EgressRule { to_ports, ..EgressRule::default() };
                    match peers {
                        Peers::Endpoints(v) => r.to_endpoints = Some(v),
                        Peers::Entities(v) => r.to_entities = Some(v),
                        Peers::Cidrs(v) => r.to_cidr_set = Some(v),
                        Peers::Fqdns(v) => r.to_fqdns = Some(v),
                    }
                    r
                })
                .collect();
            if rules.iter().any(|r| r.to_fqdns.is_some()) && !attach_dns_proxy(&mut rules) {
                ctx.warn(Some(Direction::Egress), None, ExportWarningKind::FqdnWithoutDnsRule);
            }
            Some(if rules.is_empty() { vec![EgressRule::default()] } else { rules })
        }
        None => None,
    };

    let cnp = CiliumNetworkPolicy {
        api_version: "cilium.io/v2".to_owned(),
        kind: "CiliumNetworkPolicy".to_owned(),
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            namespace: Some(ns.to_owned()),
            labels: Some([(MANAGED_BY_LABEL.0.to_owned(), MANAGED_BY_LABEL.1.to_owned())].into()),
            ..ObjectMeta::default()
        },
        spec: CiliumSpec { endpoint_selector: endpoint_selector(&own), ingress, egress },
    };
    Ok((cnp, ctx.warnings))
}

/// A direction's rules as Cilium rules: per group of equal ports, one rule per peer kind.
fn cnp_rules(ctx: &mut Ctx, direction: Direction, rules: &[bulkhead_model::Rule]) -> Result<Vec<CnpRule>, ExportError> {
    let mut out = Vec::new();
    for (ports, group) in group_by_ports(ctx, direction, rules)? {
        // Rules with the same ports but other HTTP rules cannot share a port rule.
        let mut by_http: BTreeMap<&[HttpRule], Vec<(usize, &bulkhead_model::Rule)>> = BTreeMap::new();
        for (i, r) in &group {
            by_http.entry(r.http.as_slice()).or_default().push((*i, *r));
        }
        for (http, group) in by_http {
            cnp_group(ctx, direction, &ports, http, &group, &mut out);
        }
    }
    Ok(out)
}

/// One group of rules with the same ports and HTTP rules: one Cilium rule per peer kind.
fn cnp_group(
    ctx: &mut Ctx,
    direction: Direction,
    ports: &[PortSpec],
    http: &[HttpRule],
    group: &[(usize, &bulkhead_model::Rule)],
    out: &mut Vec<CnpRule>,
) {
    let http = if !http.is_empty() && !ports.iter().all(|p| matches!(p, PortSpec::Single(Protocol::Tcp, _))) {
        for (_, rule) in group {
            let kind = ExportWarningKind::HttpRulesDropped {
                format: Format::CiliumNetworkPolicy,
                reason: HttpDropReason::NotSingleTcpPorts,
            };
            ctx.warn(Some(direction), Some(describe_rule(rule)), kind);
        }
        &[]
    } else {
        http
    };
    let to_ports = port_rules(ports, http);
    if is_everyone(group) {
        out.push((Peers::Entities(vec!["all".to_owned()]), to_ports));
        return;
    }
    let (mut endpoints, mut entities, mut cidrs, mut fqdns) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (_, rule) in group {
        match &rule.peer {
            Peer::Workloads { selector } => push_new(&mut endpoints, peer_selector(selector)),
            Peer::Entity { entity } => push_new(&mut entities, entity.name().to_owned()),
            Peer::Cidr { cidr, except } => {
                if let Some((cidr, except)) = cidr_block(ctx, direction, rule, cidr, except) {
                    push_new(&mut cidrs, CidrRule { cidr, except });
                }
            }
            Peer::CidrGroup { cidrs: group_cidrs, .. } => {
                if group_cidrs.is_empty() {
                    ctx.warn(Some(direction), Some(describe_rule(rule)), ExportWarningKind::PeerMatchesNothing);
                }
                for c in group_cidrs {
                    push_new(&mut cidrs, CidrRule { cidr: c.trunc().to_string(), except: vec![] });
                }
            }
            Peer::Fqdn { name, addresses } => match direction {
                Direction::Egress => match validate::dns_name(name) {
                    Ok(()) => push_new(&mut fqdns, FqdnSelector { match_name: name.clone() }),
                    Err(rule_broken) => ctx.warn(
                        Some(direction),
                        Some(describe_rule(rule)),
                        ExportWarningKind::InvalidFqdnName { name: name.clone(), rule: rule_broken },
                    ),
                },
                // Cilium has no `fromFQDNs`: the addresses are all there is.
                Direction::Ingress => {
                    let mut addrs = addresses.clone();
                    addrs.sort();
                    addrs.dedup();
                    let format = Format::CiliumNetworkPolicy;
                    let kind = if addrs.is_empty() {
                        ExportWarningKind::FqdnWithoutAddresses { format, name: name.clone() }
                    } else {
                        ExportWarningKind::FqdnAsAddresses { format, name: name.clone(), addresses: addrs.len() }
                    };
                    ctx.warn(Some(direction), Some(describe_rule(rule)), kind);
                    for a in addrs {
                        push_new(&mut cidrs, CidrRule { cidr: ipnet::IpNet::from(a).to_string(), except: vec![] });
                    }
                }
            },
        }
    }
    // Empty peer lists are never written: a rule without peers but with ports
    // would allow those ports from everyone.
    if !endpoints.is_empty() {
        out.push((Peers::Endpoints(endpoints), to_ports.clone()));
    }
    if !entities.is_empty() {
        out.push((Peers::Entities(entities), to_ports.clone()));
    }
    if !cidrs.is_empty() {
        out.push((Peers::Cidrs(cidrs), to_ports.clone()));
    }
    if !fqdns.is_empty() {
        out.push((Peers::Fqdns(fqdns), to_ports));
    }
}

fn push_new<T: PartialEq>(v: &mut Vec<T>, item: T) {
    if !v.contains(&item) {
        v.push(item);
    }
}

/// The selector of a workload peer. Without a namespace term (name or labels) the model
/// means "any namespace", which Cilium only reads that way with an explicit
/// `io.kubernetes.pod.namespace Exists`.
fn peer_selector(selector: &LabelSelector) -> EndpointSelector {
    let mut es = endpoint_selector(selector);
    let about_namespace = |k: &str| matches!(classify(k), KeyClass::Namespace | KeyClass::NamespaceLabel(_));
    let pinned = selector.match_labels.keys().any(|k| about_namespace(k))
        || selector.match_expressions.iter().any(|r| about_namespace(&r.key));
    if !pinned {
        es.match_expressions.push(Requirement {
            key: NAMESPACE_KEY.to_owned(),
            operator: operator_name(SelectorOperator::Exists).to_owned(),
            values: vec![],
        });
        es.match_expressions.sort_by(|a, b| (&a.key, &a.operator, &a.values).cmp(&(&b.key, &b.operator, &b.values)));
    }
    es
}

fn endpoint_selector(selector: &LabelSelector) -> EndpointSelector {
    EndpointSelector {
        match_labels: selector.match_labels.clone(),
        match_expressions: selector
            .match_expressions
            .iter()
            .map(|r| Requirement {
                key: r.key.clone(),
                operator: operator_name(r.operator).to_owned(),
                values: r.values.clone(),
            })
            .collect(),
    }
}

/// `toPorts` for a group's ports, each port rule carrying the group's HTTP rules (the
/// caller has checked they can be attached to these ports).
fn port_rules(ports: &[PortSpec], http: &[HttpRule]) -> Option<Vec<PortRule>> {
    if ports.is_empty() {
        return None;
    }
    let rules = (!http.is_empty()).then(|| L7Rules {
        dns: None,
        http: Some(
            http.iter()
                .map(|h| HttpRuleSpec {
                    method: http_method_regex(h.method.as_deref()),
                    path: http_path_regex(&h.path),
                })
                .collect(),
        ),
    });
    let entries: Vec<PortProtocol> = ports.iter().map(port_protocol).collect();
    Some(entries.chunks(MAX_PORTS_PER_RULE).map(|c| PortRule { ports: c.to_vec(), rules: rules.clone() }).collect())
}

fn port_protocol(spec: &PortSpec) -> PortProtocol {
    let (protocol, port, end_port) = match *spec {
        PortSpec::All(p) => (p, 0, None),
        PortSpec::Single(p, port) => (p, port, None),
        PortSpec::Range(p, first, last) => (p, first, Some(i32::from(last))),
    };
    PortProtocol { port: port.to_string(), end_port, protocol: protocol_name(protocol).to_owned() }
}

/// Routes DNS through Cilium's proxy: in every non-FQDN egress rule, the single-port-53
/// entries move to their own port rule carrying `rules.dns: [{matchPattern: "*"}]`.
/// Returns whether any rule got one.
fn attach_dns_proxy(rules: &mut [EgressRule]) -> bool {
    let is_dns = |p: &PortProtocol| {
        p.end_port.is_none()
            && p.port == DNS_PORT.to_string()
            && (p.protocol == protocol_name(Protocol::Udp) || p.protocol == protocol_name(Protocol::Tcp))
    };
    let mut attached = false;
    for rule in rules.iter_mut().filter(|r| r.to_fqdns.is_none()) {
        let Some(port_rules) = rule.to_ports.take() else { continue };
        // Port rules with HTTP rules keep them; only plain ones are regrouped.
        let (l7, plain): (Vec<PortRule>, Vec<PortRule>) = port_rules.into_iter().partition(|r| r.rules.is_some());
        let all: Vec<PortProtocol> = plain.into_iter().flat_map(|r| r.ports).collect();
        let (dns, other): (Vec<_>, Vec<_>) = all.into_iter().partition(|p| is_dns(p));
        let mut out = Vec::new();
        if !dns.is_empty() {
            attached = true;
            out.push(PortRule {
                ports: dns,
                rules: Some(L7Rules { dns: Some(vec![DnsRule { match_pattern: "*".to_owned() }]), http: None }),
            });
        }
        out.extend(other.chunks(MAX_PORTS_PER_RULE).map(|c| PortRule { ports: c.to_vec(), rules: None }));
        out.extend(l7);
        rule.to_ports = Some(out);
    }
    attached
}
