//! [`Policy`] → `networking.k8s.io/v1` NetworkPolicy.
//!
//! NetworkPolicy can say less than the model: no reserved entities, no DNS names, no
//! service accounts. What it cannot say is left out with a warning when leaving it out
//! only narrows the policy (a peer), and refused when it would widen it (a selector
//! term). See the module docs of [`super`].
//!
//! Mapping:
//! * `podSelector` = the policy's selector without its namespace term (the object's
//!   namespace says that);
//! * `policyTypes` = the covered directions; a covered direction without rules is
//!   written as `policyTypes` without rules, Kubernetes' deny-all;
//! * rules with the same ports are merged into one rule with several peers;
//! * workloads → `podSelector`, plus a `namespaceSelector` unless the peer is pinned to
//!   the policy's own namespace: `{}` when it is pinned to none (any namespace), else
//!   `kubernetes.io/metadata.name` for the namespace's name and the namespace's own
//!   labels for `io.cilium.k8s.namespace.labels.*` terms;
//! * CIDR → `ipBlock` (with `except` inside it), CIDR group → one `ipBlock` per CIDR,
//!   DNS name → one /32 or /128 `ipBlock` per address known when the policy was made
//!   (warned: they go stale), `world` → `0.0.0.0/0` and `::/0` (warned), other entities
//!   → left out (warned);
//! * Cilium identity labels (`io.cilium.k8s.policy.serviceaccount`, `…cluster`) in any
//!   selector refuse the policy ([`ExportError::NotExpressible`]): NetworkPolicy has no
//!   equivalent, and dropping the term would widen the rule to every pod with the
//!   remaining labels. The CiliumNetworkPolicy export keeps them;
//! * ports: single → `port`, range → `port` + `endPort`, every port → protocol only.
//!   (`endPort` needs Kubernetes ≥ 1.22; older API servers drop it, which narrows the
//!   rule to its first port.)
//! * HTTP (L7) rules cannot be expressed: the rule's ports are exported for any
//!   request — wider than approved, so each such rule is warned about and the object
//!   carries the annotation [`L7_DROPPED_ANNOTATION`] listing them, for whoever applies
//!   it without reading the warnings.

use std::net::IpAddr;

use bulkhead_model::{Direction, LabelSelector, Peer, Policy, ReservedIdentity};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Ctx, ExportError, ExportWarning, ExportWarningKind, Format, HttpDropReason, K8S_NAMESPACE_NAME_LABEL, KeyClass,
    MANAGED_BY_LABEL, NotExpressible, PortSpec, Site, check_metadata, check_selectors, cidr_block, classify,
    describe_rule, group_by_ports, insert_label, is_everyone, k8s_selector, own_selector, protocol_name, split,
};

/// Annotation on an exported NetworkPolicy whose policy had HTTP rules: what was not
/// exported (`ingress from … on 80/tcp: POST /v1/request-landing; …`).
pub const L7_DROPPED_ANNOTATION: &str = "bulkhead.io/http-rules-not-exported";

/// One NetworkPolicy rule before it is typed by direction: `None` peers = everyone,
/// `None` ports = every port.
type NpRule = (Option<Vec<NetworkPolicyPeer>>, Option<Vec<NetworkPolicyPort>>);

/// Exports one policy as a NetworkPolicy, with what it allows differently.
pub fn network_policy(policy: &Policy) -> Result<(NetworkPolicy, Vec<ExportWarning>), ExportError> {
    let mut p = policy.clone();
    p.normalize();
    let mut ctx = Ctx::new(&p, Format::NetworkPolicy);
    let ns = check_metadata(&ctx, &p)?;
    check_selectors(&ctx, &p)?;
    let own = own_selector(&ctx, &p, ns)?;
    if let Some(key) = own
        .match_labels
        .keys()
        .chain(own.match_expressions.iter().map(|r| &r.key))
        .find(|k| matches!(classify(k), KeyClass::NamespaceLabel(_)))
    {
        return Err(ExportError::NotExpressible {
            policy: ctx.policy.clone(),
            site: Site::PolicySelector,
            key: key.clone(),
            reason: NotExpressible::NamespaceLabelInPolicySelector,
        });
    }

    let mut policy_types = Vec::new();
    let mut ingress = None;
    let mut egress = None;
    if let Some(rules) = &p.ingress {
        policy_types.push("Ingress".to_owned());
        let rules = np_rules(&mut ctx, ns, Direction::Ingress, rules)?;
        ingress = (!rules.is_empty())
            .then(|| rules.into_iter().map(|(from, ports)| NetworkPolicyIngressRule { from, ports }).collect());
    }
    if let Some(rules) = &p.egress {
        policy_types.push("Egress".to_owned());
        let rules = np_rules(&mut ctx, ns, Direction::Egress, rules)?;
        egress = (!rules.is_empty())
            .then(|| rules.into_iter().map(|(to, ports)| NetworkPolicyEgressRule { to, ports }).collect());
    }

    let mut dropped = Vec::new();
    for (dir, rules) in [(Direction::Ingress, &p.ingress), (Direction::Egress, &p.egress)] {
        for rule in rules.iter().flatten().filter(|r| r.is_l7()) {
            let kind =
                ExportWarningKind::HttpRulesDropped { format: Format::NetworkPolicy, reason: HttpDropReason::NoL7 };
            ctx.warn(Some(dir), Some(describe_rule(rule)), kind);
            let http: Vec<String> = rule.http.iter().map(ToString::to_string).collect();
            dropped.push(format!("{} {}: {}", dir.as_str(), describe_rule(rule), http.join(", ")));
        }
    }
    let annotations = (!dropped.is_empty()).then(|| {
        [(
            L7_DROPPED_ANNOTATION.to_owned(),
            format!(
                "NetworkPolicy cannot express HTTP rules; these ports allow any request here: {}",
                dropped.join("; ")
            ),
        )]
        .into()
    });

    let np = NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(p.name.clone()),
            namespace: Some(ns.to_owned()),
            labels: Some([(MANAGED_BY_LABEL.0.to_owned(), MANAGED_BY_LABEL.1.to_owned())].into()),
            annotations,
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(k8s_selector(&own)),
            policy_types: Some(policy_types),
            ingress,
            egress,
        }),
    };
    Ok((np, ctx.warnings))
}

fn np_rules(
    ctx: &mut Ctx,
    ns: &str,
    direction: Direction,
    rules: &[bulkhead_model::Rule],
) -> Result<Vec<NpRule>, ExportError> {
    let mut out = Vec::new();
    for (ports, group) in group_by_ports(ctx, direction, rules)? {
        let ports = (!ports.is_empty()).then(|| ports.iter().map(np_port).collect());
        if is_everyone(&group) {
            // "From/to everyone" is exactly what an absent peer list means.
            out.push((None, ports));
            continue;
        }
        let mut peers: Vec<NetworkPolicyPeer> = Vec::new();
        for (_, rule) in &group {
            for peer in np_peers(ctx, ns, direction, rule) {
                if !peers.contains(&peer) {
                    peers.push(peer);
                }
            }
        }
        // Never write an empty peer list: Kubernetes reads it as "everyone".
        if !peers.is_empty() {
            out.push((Some(peers), ports));
        }
    }
    Ok(out)
}

/// The NetworkPolicy peers one model peer becomes; empty when it cannot be expressed
/// (warned).
fn np_peers(ctx: &mut Ctx, ns: &str, direction: Direction, rule: &bulkhead_model::Rule) -> Vec<NetworkPolicyPeer> {
    let ip_block = |cidr: String, except: Vec<String>| NetworkPolicyPeer {
        ip_block: Some(IPBlock { cidr, except: (!except.is_empty()).then_some(except) }),
        ..NetworkPolicyPeer::default()
    };
    match &rule.peer {
        Peer::Workloads { selector } => vec![workload_peer(selector, ns)],
        Peer::Entity { entity: ReservedIdentity::World } => {
            ctx.warn(Some(direction), Some(describe_rule(rule)), ExportWarningKind::WorldAsCidrs);
            vec![ip_block("0.0.0.0/0".into(), vec![]), ip_block("::/0".into(), vec![])]
        }
        Peer::Entity { entity } => {
            ctx.warn(
                Some(direction),
                Some(describe_rule(rule)),
                ExportWarningKind::EntityNotExpressible { entity: *entity },
            );
            vec![]
        }
        Peer::Cidr { cidr, except } => match cidr_block(ctx, direction, rule, cidr, except) {
            Some((cidr, except)) => vec![ip_block(cidr, except)],
            None => vec![],
        },
        Peer::CidrGroup { cidrs, .. } => {
            let mut blocks: Vec<String> = cidrs.iter().map(|c| c.trunc().to_string()).collect();
            blocks.sort();
            blocks.dedup();
            if blocks.is_empty() {
                ctx.warn(Some(direction), Some(describe_rule(rule)), ExportWarningKind::PeerMatchesNothing);
            }
            blocks.into_iter().map(|b| ip_block(b, vec![])).collect()
        }
        Peer::Fqdn { name, addresses } => {
            let mut addrs: Vec<IpAddr> = addresses.clone();
            addrs.sort();
            addrs.dedup();
            let kind = if addrs.is_empty() {
                ExportWarningKind::FqdnWithoutAddresses { format: Format::NetworkPolicy, name: name.clone() }
            } else {
                ExportWarningKind::FqdnAsAddresses {
                    format: Format::NetworkPolicy,
                    name: name.clone(),
                    addresses: addrs.len(),
                }
            };
            ctx.warn(Some(direction), Some(describe_rule(rule)), kind);
            addrs.into_iter().map(|a| ip_block(ipnet::IpNet::from(a).to_string(), vec![])).collect()
        }
    }
}

/// A workload selector as a peer. Its terms on the namespace move to a
/// `namespaceSelector`; without any, the peer is in any namespace (`{}`); pinned to the
/// policy's own namespace, the `namespaceSelector` is omitted (same namespace).
fn workload_peer(selector: &LabelSelector, ns: &str) -> NetworkPolicyPeer {
    let parts = split(selector);
    let own_namespace_only = parts.namespace_labels.is_empty()
        && parts.namespace.match_expressions.is_empty()
        && parts.namespace.match_labels.get(bulkhead_model::labels::NAMESPACE_KEY).map(String::as_str) == Some(ns);
    let namespace_selector = if own_namespace_only {
        None
    } else {
        let mut ns_sel = parts.namespace_labels;
        for v in parts.namespace.match_labels.values() {
            insert_label(&mut ns_sel, K8S_NAMESPACE_NAME_LABEL, v);
        }
        for r in parts.namespace.match_expressions {
            ns_sel
                .match_expressions
                .push(bulkhead_model::SelectorRequirement { key: K8S_NAMESPACE_NAME_LABEL.to_owned(), ..r });
        }
        ns_sel.normalize();
        Some(k8s_selector(&ns_sel))
    };
    NetworkPolicyPeer { pod_selector: Some(k8s_selector(&parts.pod)), namespace_selector, ip_block: None }
}

fn np_port(spec: &PortSpec) -> NetworkPolicyPort {
    let (protocol, port, end_port) = match *spec {
        PortSpec::All(p) => (p, None, None),
        PortSpec::Single(p, port) => (p, Some(port), None),
        PortSpec::Range(p, first, last) => (p, Some(first), Some(last)),
    };
    NetworkPolicyPort {
        protocol: Some(protocol_name(protocol).to_owned()),
        port: port.map(|p| IntOrString::Int(i32::from(p))),
        end_port: end_port.map(i32::from),
    }
}
