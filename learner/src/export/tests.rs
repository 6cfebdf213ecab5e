//! Unit and property tests of the exporters and the importer. Snapshot, schema and
//! API-server checks of the rendered YAML live in `learner/tests/export.rs`.

use std::net::IpAddr;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{HttpPath, HttpRule};
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer};
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;
use proptest::prelude::*;
use serde_json::json;

use super::*;

// === builders ===

fn sel(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector::with_labels(pairs.iter().copied())
}

fn rule(peer: Peer, ports: &[PortRange]) -> Rule {
    Rule::l4(peer, ports.to_vec())
}

fn workloads(pairs: &[(&str, &str)]) -> Peer {
    Peer::Workloads { selector: sel(pairs) }
}

fn tcp(port: u16) -> PortRange {
    PortRange::single(Protocol::Tcp, port)
}

fn udp(port: u16) -> PortRange {
    PortRange::single(Protocol::Udp, port)
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn addr(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// The reference scenario's proposal: empire ships may land on the deathstar.
fn deathstar() -> Policy {
    Policy {
        name: "bulkhead-deathstar".into(),
        namespace: Some("default".into()),
        selector: sel(&[(NAMESPACE_KEY, "default"), ("org", "empire"), ("class", "deathstar")]),
        ingress: Some(vec![rule(workloads(&[(NAMESPACE_KEY, "default"), ("org", "empire")]), &[tcp(80)])]),
        egress: None,
    }
}

fn egress_policy(rules: Vec<Rule>) -> Policy {
    Policy {
        name: "bulkhead-tiefighter".into(),
        namespace: Some("default".into()),
        selector: sel(&[(NAMESPACE_KEY, "default"), ("class", "tiefighter")]),
        ingress: None,
        egress: Some(rules),
    }
}

fn np_json(p: &Policy) -> serde_json::Value {
    let (np, _) = network_policy(p).expect("exports");
    serde_json::to_value(np).expect("serializes")
}

fn cnp_json(p: &Policy) -> serde_json::Value {
    let (cnp, _) = cilium_network_policy(p).expect("exports");
    serde_json::to_value(cnp).expect("serializes")
}

// === syntax ===

#[test]
fn label_syntax_follows_kubernetes() {
    for ok in ["app", "app.kubernetes.io/name", "a", "A_b-c.d", "example.com/x", &"k".repeat(63)] {
        assert_eq!(validate::label_key(ok), Ok(()), "{ok}");
    }
    for bad in ["", "/app", "a/", "-app", "app-", "a/b/c", "Example.com/x", "ä", &"k".repeat(64), "k8s:app"] {
        assert_eq!(validate::label_key(bad), Err(SyntaxRule::LabelKey), "{bad}");
    }
    assert_eq!(validate::label_key(&format!("{}/x", "a".repeat(254))), Err(SyntaxRule::LabelKey));
    for ok in ["", "v", "1.2.3", "a_b-c", &"v".repeat(63)] {
        assert_eq!(validate::label_value(ok), Ok(()), "{ok}");
    }
    for bad in ["<script>", " v", "v ", "-v", "v.", "a/b", "é", &"v".repeat(64), "a\nb"] {
        assert_eq!(validate::label_value(bad), Err(SyntaxRule::LabelValue), "{bad:?}");
    }
    assert!(validate::dns1123_label("kube-system").is_ok());
    assert!(validate::dns1123_label("Kube").is_err() && validate::dns1123_label("a.b").is_err());
    assert!(validate::dns1123_subdomain("bulkhead.deathstar-1").is_ok());
    assert!(validate::dns1123_subdomain("a..b").is_err() && validate::dns1123_subdomain("a_b").is_err());
    assert!(validate::dns_name("api.example.com.").is_ok() && validate::dns_name("_srv.x").is_ok());
    for bad in ["", ".", "a..b", ".a", "a b", "*.example.com", "a.b..", &"a".repeat(256)] {
        assert!(validate::dns_name(bad).is_err(), "{bad}");
    }
}

// === NetworkPolicy ===

#[test]
fn reference_scenario_as_network_policy() {
    let (np, warnings) = network_policy(&deathstar()).expect("exports");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        serde_json::to_value(np).expect("serializes"),
        json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "bulkhead"},
                "name": "bulkhead-deathstar",
                "namespace": "default",
            },
            "spec": {
                "ingress": [{
                    "from": [{"podSelector": {"matchLabels": {"org": "empire"}}}],
                    "ports": [{"port": 80, "protocol": "TCP"}],
                }],
                "podSelector": {"matchLabels": {"class": "deathstar", "org": "empire"}},
                "policyTypes": ["Ingress"],
            },
        })
    );
}

#[test]
fn peers_map_to_namespace_selectors() {
    let mut p = deathstar();
    p.ingress = Some(vec![
        // Any namespace.
        rule(workloads(&[("org", "empire")]), &[tcp(80)]),
        // Another namespace by name and by label.
        rule(workloads(&[(NAMESPACE_KEY, "fleet"), ("org", "empire")]), &[tcp(80)]),
        rule(workloads(&[("io.cilium.k8s.namespace.labels.team", "navy")]), &[tcp(80)]),
    ]);
    let spec = &np_json(&p)["spec"];
    assert_eq!(
        spec["ingress"],
        json!([{
            "from": [
                {"namespaceSelector": {"matchLabels": {"team": "navy"}}, "podSelector": {}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "fleet"}},
                 "podSelector": {"matchLabels": {"org": "empire"}}},
                {"namespaceSelector": {}, "podSelector": {"matchLabels": {"org": "empire"}}},
            ],
            "ports": [{"port": 80, "protocol": "TCP"}],
        }])
    );
}

#[test]
fn rules_with_equal_ports_merge_and_ports_keep_their_shape() {
    let mut p = deathstar();
    let range = PortRange { protocol: Protocol::Tcp, first: 8000, last: 8080 };
    p.ingress = Some(vec![
        rule(workloads(&[(NAMESPACE_KEY, "default"), ("class", "tiefighter")]), &[tcp(80)]),
        rule(workloads(&[(NAMESPACE_KEY, "default"), ("class", "shuttle")]), &[tcp(80)]),
        rule(Peer::Cidr { cidr: net("10.0.0.0/8"), except: vec![] }, &[range, PortRange::all(Protocol::Udp)]),
        rule(Peer::Cidr { cidr: net("192.0.2.7/24"), except: vec![net("192.0.2.128/25")] }, &[]),
    ]);
    let ingress = &np_json(&p)["spec"]["ingress"];
    assert_eq!(
        ingress,
        &json!([
            {"from": [{"ipBlock": {"cidr": "192.0.2.0/24", "except": ["192.0.2.128/25"]}}]},
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
             "ports": [{"protocol": "UDP"}, {"endPort": 8080, "port": 8000, "protocol": "TCP"}]},
            {"from": [{"podSelector": {"matchLabels": {"class": "shuttle"}}},
                      {"podSelector": {"matchLabels": {"class": "tiefighter"}}}],
             "ports": [{"port": 80, "protocol": "TCP"}]},
        ])
    );
}

#[test]
fn entities_never_widen_a_network_policy() {
    let p = egress_policy(vec![
        rule(Peer::Entity { entity: ReservedIdentity::Host }, &[tcp(10250)]),
        rule(Peer::Entity { entity: ReservedIdentity::KubeApiserver }, &[tcp(443)]),
        rule(Peer::Entity { entity: ReservedIdentity::World }, &[tcp(443)]),
    ]);
    let (np, warnings) = network_policy(&p).expect("exports");
    let spec = serde_json::to_value(np).expect("serializes")["spec"].clone();
    // The host rule is gone entirely (no `to: []`, which would mean "everyone"); the
    // world rule became both address families.
    assert_eq!(
        spec["egress"],
        json!([{"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}],
                "ports": [{"port": 443, "protocol": "TCP"}]}])
    );
    let kinds: Vec<_> = warnings.iter().map(|w| w.kind.clone()).collect();
    assert_eq!(
        kinds,
        vec![
            ExportWarningKind::WorldAsCidrs,
            ExportWarningKind::EntityNotExpressible { entity: ReservedIdentity::KubeApiserver },
            ExportWarningKind::EntityNotExpressible { entity: ReservedIdentity::Host },
        ]
    );
    assert_eq!(
        warnings[2].to_string(),
        "policy default/bulkhead-tiefighter: egress rule entity host on 10250/tcp: NetworkPolicy cannot express the \
         'host' entity; peer left out, so the export allows less than the approved policy"
    );

    // Only inexpressible peers: the direction stays covered with no rule = deny all.
    let p = egress_policy(vec![rule(Peer::Entity { entity: ReservedIdentity::Host }, &[])]);
    let spec = np_json(&p)["spec"].clone();
    assert_eq!(spec["policyTypes"], json!(["Egress"]));
    assert!(spec.get("egress").is_none(), "{spec}");
}

#[test]
fn deny_all_directions() {
    let mut p = deathstar();
    p.ingress = Some(vec![]);
    p.egress = Some(vec![]);
    let spec = np_json(&p)["spec"].clone();
    assert_eq!(
        spec,
        json!({"podSelector": {"matchLabels": {"class": "deathstar", "org": "empire"}},
               "policyTypes": ["Ingress", "Egress"]})
    );
    let spec = cnp_json(&p)["spec"].clone();
    assert_eq!(
        spec,
        json!({"endpointSelector": {"matchLabels": {"class": "deathstar", "org": "empire"}},
               "ingress": [{}], "egress": [{}]})
    );
}

#[test]
fn fqdn_as_network_policy_addresses() {
    let p = egress_policy(vec![rule(
        Peer::Fqdn { name: "api.example.com".into(), addresses: vec![addr("2001:db8::1"), addr("192.0.2.10")] },
        &[tcp(443)],
    )]);
    let (np, warnings) = network_policy(&p).expect("exports");
    assert_eq!(
        serde_json::to_value(np).expect("serializes")["spec"]["egress"],
        json!([{"to": [{"ipBlock": {"cidr": "192.0.2.10/32"}}, {"ipBlock": {"cidr": "2001:db8::1/128"}}],
                "ports": [{"port": 443, "protocol": "TCP"}]}])
    );
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].to_string().contains("NetworkPolicy cannot match DNS names"), "{}", warnings[0]);
    assert!(warnings[0].to_string().contains("will go stale"), "{}", warnings[0]);

    // No address known: nothing to allow, and no `to: []`.
    let p = egress_policy(vec![rule(Peer::Fqdn { name: "gone.example.com".into(), addresses: vec![] }, &[tcp(443)])]);
    let (np, warnings) = network_policy(&p).expect("exports");
    assert!(np.spec.expect("spec").egress.is_none());
    assert!(matches!(warnings[0].kind, ExportWarningKind::FqdnWithoutAddresses { .. }));
}

#[test]
fn hostile_labels_are_refused_with_the_rule() {
    let mut p = deathstar();
    p.name = "bulkhead-web".into();
    p.ingress = Some(vec![rule(workloads(&[("app", "<script>")]), &[tcp(80)])]);
    let err = network_policy(&p).expect_err("refused");
    assert_eq!(
        err.to_string(),
        "policy default/bulkhead-web: label value \"<script>\" of key \"app\" in the peer of ingress rule 1 is not a \
         valid Kubernetes label value (must be empty or ≤63 characters of [A-Za-z0-9-_.], starting and ending \
         alphanumeric)"
    );
    assert_eq!(cilium_network_policy(&p).expect_err("refused"), err);

    let mut p = deathstar();
    p.selector.match_labels.insert("bad key\u{202e}".into(), "v".into());
    let err = network_policy(&p).expect_err("refused");
    assert!(matches!(err, ExportError::InvalidLabelKey { site: Site::PolicySelector, .. }), "{err}");
    assert!(err.to_string().contains(r#""bad key\u{202e}""#), "{err}");

    let mut p = deathstar();
    p.selector.match_labels.insert("app".into(), "x".repeat(1000));
    let msg = network_policy(&p).expect_err("refused").to_string();
    assert!(msg.len() < 400, "message stays short: {msg}");

    let mut p = deathstar();
    p.name = "Bulkhead_Web".into();
    assert_eq!(
        network_policy(&p).expect_err("refused").to_string(),
        "policy default/\"Bulkhead_Web\": name is not a valid Kubernetes object name (must be ≤253 characters of \
         [a-z0-9-.], each dot-separated part starting and ending with a lower-case letter or digit)"
    );
}

#[test]
fn identity_labels_are_refused_for_network_policy_only() {
    let mut p = deathstar();
    p.ingress = Some(vec![rule(
        workloads(&[(NAMESPACE_KEY, "default"), (SERVICE_ACCOUNT_KEY, "tiefighter-pilot")]),
        &[tcp(80)],
    )]);
    let err = network_policy(&p).expect_err("refused");
    assert!(
        matches!(&err, ExportError::NotExpressible { key, reason: NotExpressible::CiliumIdentityLabel, .. } if key == SERVICE_ACCOUNT_KEY),
        "{err}"
    );
    assert!(err.to_string().contains("export it as a CiliumNetworkPolicy instead"), "{err}");
    let ingress = &cnp_json(&p)["spec"]["ingress"];
    assert_eq!(
        ingress[0]["fromEndpoints"],
        json!([{"matchLabels": {"io.cilium.k8s.policy.serviceaccount": "tiefighter-pilot",
                                "io.kubernetes.pod.namespace": "default"}}])
    );

    // A podSelector cannot see namespace labels.
    let mut p = deathstar();
    p.selector.match_labels.insert("io.cilium.k8s.namespace.labels.team".into(), "navy".into());
    assert!(matches!(
        network_policy(&p),
        Err(ExportError::NotExpressible { reason: NotExpressible::NamespaceLabelInPolicySelector, .. })
    ));
    assert!(cilium_network_policy(&p).is_ok());
}

#[test]
fn policies_must_be_namespaced_like_their_selector() {
    let mut p = deathstar();
    p.namespace = None;
    assert!(matches!(network_policy(&p), Err(ExportError::MissingNamespace { format: Format::NetworkPolicy, .. })));
    assert!(matches!(
        cilium_network_policy(&p),
        Err(ExportError::MissingNamespace { format: Format::CiliumNetworkPolicy, .. })
    ));

    let mut p = deathstar();
    p.selector.match_labels.remove(NAMESPACE_KEY);
    assert!(matches!(network_policy(&p), Err(ExportError::SelectorLacksNamespace { .. })));

    let mut p = deathstar();
    p.selector.match_labels.insert(NAMESPACE_KEY.into(), "other".into());
    assert!(matches!(network_policy(&p), Err(ExportError::SelectorNamespaceMismatch { .. })));

    let mut p = deathstar();
    p.selector.match_labels.remove(NAMESPACE_KEY);
    p.selector.match_expressions.push(SelectorRequirement {
        key: NAMESPACE_KEY.into(),
        operator: SelectorOperator::In,
        values: vec!["default".into(), "other".into()],
    });
    assert!(matches!(network_policy(&p), Err(ExportError::SelectorNamespaceMismatch { .. })));
    p.selector.match_expressions[0].values = vec!["default".into()];
    assert!(network_policy(&p).is_ok());

    let mut p = deathstar();
    p.ingress = None;
    assert!(matches!(network_policy(&p), Err(ExportError::NothingCovered { .. })));
}

#[test]
fn ports_that_cannot_be_written() {
    let mut p = deathstar();
    let peer = workloads(&[(NAMESPACE_KEY, "default")]);
    p.ingress = Some(vec![rule(peer.clone(), &[tcp(0)])]);
    let (np, warnings) = network_policy(&p).expect("exports");
    // Dropping port 0 must not leave a rule without ports (= every port).
    assert!(np.spec.expect("spec").ingress.is_none());
    assert_eq!(
        warnings.iter().map(|w| w.kind.clone()).collect::<Vec<_>>(),
        vec![ExportWarningKind::PortZero, ExportWarningKind::RuleDropped]
    );

    p.ingress = Some(vec![rule(peer.clone(), &[PortRange { protocol: Protocol::Tcp, first: 0, last: 1023 }])]);
    assert_eq!(np_json(&p)["spec"]["ingress"][0]["ports"], json!([{"endPort": 1023, "port": 1, "protocol": "TCP"}]));

    p.ingress = Some(vec![rule(peer, &[PortRange { protocol: Protocol::Tcp, first: 90, last: 80 }])]);
    assert!(matches!(network_policy(&p), Err(ExportError::InvalidPortRange { .. })));
}

#[test]
fn cidr_excepts_are_kept_inside_their_cidr() {
    let p = egress_policy(vec![
        rule(Peer::Cidr { cidr: net("10.0.0.0/16"), except: vec![net("10.1.0.0/24"), net("10.0.1.0/24")] }, &[]),
        rule(Peer::Cidr { cidr: net("10.9.0.0/24"), except: vec![net("10.0.0.0/8")] }, &[tcp(22)]),
        rule(Peer::CidrGroup { name: "empty".into(), cidrs: vec![] }, &[tcp(23)]),
    ]);
    let (np, warnings) = network_policy(&p).expect("exports");
    assert_eq!(
        serde_json::to_value(np).expect("serializes")["spec"]["egress"],
        json!([{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]}}]}])
    );
    let kinds: Vec<_> = warnings.into_iter().map(|w| w.kind).collect();
    assert_eq!(
        kinds,
        vec![
            ExportWarningKind::ExceptOutsideCidr { except: "10.1.0.0/24".into() },
            ExportWarningKind::PeerMatchesNothing,
            ExportWarningKind::PeerMatchesNothing,
        ]
    );
}

// === CiliumNetworkPolicy ===

#[test]
fn reference_scenario_as_cilium_network_policy() {
    let (cnp, warnings) = cilium_network_policy(&deathstar()).expect("exports");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        serde_json::to_value(cnp).expect("serializes"),
        json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNetworkPolicy",
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "bulkhead"},
                "name": "bulkhead-deathstar",
                "namespace": "default",
            },
            "spec": {
                "endpointSelector": {"matchLabels": {"class": "deathstar", "org": "empire"}},
                "ingress": [{
                    "fromEndpoints": [{"matchLabels": {"io.kubernetes.pod.namespace": "default", "org": "empire"}}],
                    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
                }],
            },
        })
    );
}

#[test]
fn cilium_peers_by_kind() {
    let mut p = deathstar();
    p.ingress = Some(vec![
        rule(workloads(&[("org", "empire")]), &[tcp(80)]),
        rule(Peer::Entity { entity: ReservedIdentity::Host }, &[tcp(80)]),
        rule(Peer::Entity { entity: ReservedIdentity::RemoteNode }, &[tcp(80)]),
        rule(Peer::Cidr { cidr: net("192.0.2.0/24"), except: vec![net("192.0.2.0/28")] }, &[tcp(80)]),
        rule(Peer::CidrGroup { name: "partners".into(), cidrs: vec![net("198.51.100.0/24")] }, &[tcp(80)]),
    ]);
    let (cnp, warnings) = cilium_network_policy(&p).expect("exports");
    assert!(warnings.is_empty(), "{warnings:?}");
    let to_ports = json!([{"ports": [{"port": "80", "protocol": "TCP"}]}]);
    assert_eq!(
        serde_json::to_value(cnp).expect("serializes")["spec"]["ingress"],
        json!([
            // Without a namespace term a Cilium peer would mean "this namespace".
            {"fromEndpoints": [{"matchExpressions": [{"key": "io.kubernetes.pod.namespace", "operator": "Exists"}],
                                "matchLabels": {"org": "empire"}}],
             "toPorts": to_ports},
            {"fromEntities": ["host", "remote-node"], "toPorts": to_ports},
            {"fromCIDRSet": [{"cidr": "192.0.2.0/24", "except": ["192.0.2.0/28"]}, {"cidr": "198.51.100.0/24"}],
             "toPorts": to_ports},
        ])
    );
}

#[test]
fn fqdn_as_cilium_to_fqdns_with_dns_proxy() {
    let dns_server = workloads(&[(NAMESPACE_KEY, "kube-system"), ("k8s-app", "kube-dns")]);
    let fqdn = Peer::Fqdn { name: "api.example.com".into(), addresses: vec![addr("192.0.2.10")] };
    let p =
        egress_policy(vec![rule(dns_server.clone(), &[udp(53), tcp(53), tcp(9153)]), rule(fqdn.clone(), &[tcp(443)])]);
    let (cnp, warnings) = cilium_network_policy(&p).expect("exports");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        serde_json::to_value(cnp).expect("serializes")["spec"]["egress"],
        json!([
            {"toEndpoints": [{"matchLabels": {"io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
             "toPorts": [
                {"ports": [{"port": "53", "protocol": "TCP"}, {"port": "53", "protocol": "UDP"}],
                 "rules": {"dns": [{"matchPattern": "*"}]}},
                {"ports": [{"port": "9153", "protocol": "TCP"}]},
             ]},
            {"toFQDNs": [{"matchName": "api.example.com"}], "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]},
        ])
    );

    // Without a DNS rule: exported, with the warning that explains what is missing.
    let p = egress_policy(vec![rule(fqdn, &[tcp(443)])]);
    let (_, warnings) = cilium_network_policy(&p).expect("exports");
    assert_eq!(
        warnings.iter().map(|w| w.kind.clone()).collect::<Vec<_>>(),
        vec![ExportWarningKind::FqdnWithoutDnsRule]
    );

    // A name Cilium would reject is left out, never passed through.
    let p = egress_policy(vec![rule(Peer::Fqdn { name: "evil\" name".into(), addresses: vec![] }, &[tcp(443)])]);
    let (cnp, warnings) = cilium_network_policy(&p).expect("exports");
    assert_eq!(cnp.spec.egress, Some(vec![EgressRule::default()]));
    assert!(matches!(warnings[0].kind, ExportWarningKind::InvalidFqdnName { .. }));
}

#[test]
fn cilium_ports() {
    let mut p = deathstar();
    let ports: Vec<PortRange> = (1000..1050).map(tcp).chain([PortRange::all(Protocol::Udp)]).collect();
    p.ingress = Some(vec![rule(workloads(&[(NAMESPACE_KEY, "default")]), &ports)]);
    let (cnp, _) = cilium_network_policy(&p).expect("exports");
    let ingress = cnp.spec.ingress.expect("covered");
    let to_ports = ingress[0].to_ports.as_ref().expect("ports");
    assert_eq!(to_ports.iter().map(|r| r.ports.len()).collect::<Vec<_>>(), vec![40, 11], "CRD maxItems is 40");
    assert_eq!(to_ports[0].ports[0], PortProtocol { port: "0".into(), end_port: None, protocol: "UDP".into() });
}

// === everyone ===

#[test]
fn everyone_round_trips_to_an_absent_peer_list() {
    let imported: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "allow-web", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": [{"ports": [{"port": 443}]}]},
    }))
    .expect("parses");
    let (policy, warnings) = import_network_policy(&imported).expect("imports");
    assert!(warnings.is_empty());
    let ingress = policy.ingress.as_ref().expect("covered");
    assert_eq!(ingress.len(), 6, "every workload and every reserved entity: {ingress:?}");
    assert!(ingress.iter().all(|r| r.ports == vec![tcp(443)]));

    let (np, warnings) = network_policy(&policy).expect("exports");
    assert!(warnings.is_empty(), "{warnings:?}");
    let spec = np.spec.expect("spec");
    assert_eq!(spec.ingress.expect("rules")[0].from, None);
    let (cnp, _) = cilium_network_policy(&policy).expect("exports");
    assert_eq!(cnp.spec.ingress.expect("rules")[0].from_entities, Some(vec!["all".to_owned()]));
}

// === import ===

fn import_json(v: serde_json::Value) -> (Policy, Vec<ImportWarning>) {
    let np: NetworkPolicy = serde_json::from_value(v).expect("parses");
    import_network_policy(&np).expect("imports")
}

#[test]
fn import_maps_namespaces_and_defaults() {
    let (policy, warnings) = import_json(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": "api"}}},
                    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops", "team": "sre"}}},
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
                ],
                "ports": [{"port": 5432, "protocol": "TCP"}, {"port": 9000, "endPort": 9100, "protocol": "UDP"}],
            }],
        },
    }));
    assert!(warnings.is_empty(), "{warnings:?}");
    let ports = vec![tcp(5432), PortRange { protocol: Protocol::Udp, first: 9000, last: 9100 }];
    let mut expected = Policy {
        name: "db".into(),
        namespace: Some("shop".into()),
        selector: sel(&[(NAMESPACE_KEY, "shop"), ("app", "db")]),
        // No policyTypes and no egress rules: ingress only, as the API server defaults.
        ingress: Some(vec![
            rule(workloads(&[(NAMESPACE_KEY, "shop"), ("app", "api")]), &ports),
            rule(workloads(&[(NAMESPACE_KEY, "ops"), ("io.cilium.k8s.namespace.labels.team", "sre")]), &ports),
            rule(Peer::Cidr { cidr: net("10.0.0.0/8"), except: vec![net("10.1.0.0/16")] }, &ports),
        ]),
        egress: None,
    };
    expected.normalize();
    assert_eq!(policy, expected);

    let (policy, _) = import_json(json!({
        "metadata": {"name": "lockdown", "namespace": "shop"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }));
    assert_eq!((policy.ingress, policy.egress), (Some(vec![]), Some(vec![])));
}

#[test]
fn import_shows_what_it_cannot_model() {
    let (policy, warnings) = import_json(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [{"port": "http"}, {"port": 8443}]},
                {"ports": [{"port": 3868, "protocol": "SCTP"}]},
                {"from": [{"ipBlock": {"cidr": "not-a-cidr"}}]},
                {"from": [{"podSelector": {"matchLabels": {"app": "lb"}}}], "ports": [{"port": 8080}]},
            ],
            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}],
        },
    }));
    // Only the last rule survives; each other one is reported, never half-shown.
    assert_eq!(policy.ingress, Some(vec![rule(workloads(&[(NAMESPACE_KEY, "shop"), ("app", "lb")]), &[tcp(8080)])]));
    assert_eq!(policy.egress, None);
    let shown: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 4, "{shown:#?}");
    assert_eq!(
        shown[0],
        "NetworkPolicy shop/web: ingress rule 1: uses the named port \"http\", which Bulkhead cannot resolve; the rule \
         is left out, so this policy is shown incompletely (the cluster allows more than shown)"
    );
    assert!(matches!(warnings[1].kind, ImportWarningKind::UnsupportedProtocol { .. }));
    assert!(matches!(warnings[2].kind, ImportWarningKind::UnsupportedPeer { .. }));
    assert_eq!(warnings[3].kind, ImportWarningKind::IgnoredRules);

    let np: NetworkPolicy = serde_json::from_value(json!({"metadata": {"name": "x"}})).expect("parses");
    assert_eq!(import_network_policy(&np), Err(ImportError::MissingNamespace { name: "x".into() }));
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "x", "namespace": "y"},
        "spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
    }))
    .expect("parses");
    assert!(matches!(import_network_policy(&np), Err(ImportError::PodSelector { .. })));
}

// === export_yaml ===

#[test]
fn export_yaml_scopes_sorts_and_reports() {
    let mut other_ns = deathstar();
    other_ns.name = "bulkhead-xwing".into();
    other_ns.namespace = Some("alliance".into());
    other_ns.selector = sel(&[(NAMESPACE_KEY, "alliance"), ("class", "xwing")]);
    let mut hostile = deathstar();
    hostile.name = "bulkhead-hostile".into();
    hostile.selector.match_labels.insert("app".into(), "<script>".into());
    let mut dup = deathstar();
    dup.name = "bulkhead-dup".into();
    let policies = vec![deathstar(), hostile, other_ns, dup.clone(), dup];

    let all = export_yaml(&policies, Format::NetworkPolicy, &Scope::All);
    let names: Vec<&str> = all.yaml.lines().filter_map(|l| l.strip_prefix("  name: ")).collect();
    assert_eq!(names, vec!["bulkhead-xwing", "bulkhead-deathstar"], "sorted by namespace, then name");
    assert_eq!(all.yaml.matches("---\n").count(), 2);
    assert_eq!(all.errors.len(), 2, "{:?}", all.errors);
    assert!(matches!(all.errors[0], ExportError::DuplicateName { count: 2, .. }));
    assert!(matches!(all.errors[1], ExportError::InvalidLabelValue { .. }));

    let ns = export_yaml(&policies, Format::NetworkPolicy, &Scope::Namespace("alliance".into()));
    assert_eq!(ns.yaml.matches("---\n").count(), 1);
    assert!(ns.errors.is_empty());

    let deathstar_pod =
        Labels::new([(NAMESPACE_KEY, "default"), ("org", "empire"), ("class", "deathstar")]).expect("labels");
    let one = export_yaml(&policies, Format::CiliumNetworkPolicy, &Scope::Workload(deathstar_pod));
    assert_eq!(one.yaml.matches("kind: CiliumNetworkPolicy").count(), 1, "{}", one.yaml);
    assert_eq!(one.errors.len(), 1, "the duplicates also select the deathstar");

    assert_eq!(export_yaml(&[], Format::NetworkPolicy, &Scope::All), ExportOutput::default());
}

// === properties ===

fn key_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]([-A-Za-z0-9_.]{0,8}[A-Za-z0-9])?"
}

/// Valid pod-label keys (never one of the reserved prefixes).
fn pod_key() -> impl Strategy<Value = String> {
    (prop::option::of("[a-z]([a-z0-9-]{0,6}[a-z0-9])?(\\.[a-z]{1,4})?"), key_name())
        .prop_map(|(prefix, name)| match prefix {
            Some(p) => format!("{p}/{name}"),
            None => name,
        })
        .prop_filter("not reserved", |k| classify(k) == KeyClass::Pod)
}

fn value() -> impl Strategy<Value = String> {
    "([A-Za-z0-9]([-A-Za-z0-9_.]{0,8}[A-Za-z0-9])?)?"
}

fn namespace_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9]{0,5}"
}

fn requirement(
    key: impl Strategy<Value = String>,
    value: BoxedStrategy<String>,
) -> impl Strategy<Value = SelectorRequirement> {
    (
        key,
        prop_oneof![
            Just(SelectorOperator::In),
            Just(SelectorOperator::NotIn),
            Just(SelectorOperator::Exists),
            Just(SelectorOperator::DoesNotExist)
        ],
        prop::collection::vec(value, 1..3),
    )
        .prop_map(|(key, operator, values)| {
            let values = match operator {
                SelectorOperator::In | SelectorOperator::NotIn => values,
                SelectorOperator::Exists | SelectorOperator::DoesNotExist => vec![],
            };
            SelectorRequirement { key, operator, values }
        })
}

/// Pod-label terms of a selector.
fn pod_terms() -> impl Strategy<Value = LabelSelector> {
    (
        prop::collection::btree_map(pod_key(), value(), 0..3),
        prop::collection::vec(requirement(pod_key(), value().boxed()), 0..2),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector { match_labels, match_expressions })
}

/// A workload peer NetworkPolicy can express: pod terms, optionally a namespace name
/// (label and/or expression) and namespace-label terms.
fn expressible_peer_selector() -> impl Strategy<Value = LabelSelector> {
    let ns_label_key = pod_key().prop_filter("not the name label", |k| k != K8S_NAMESPACE_NAME_LABEL);
    (
        pod_terms(),
        prop::option::of(namespace_name()),
        prop::option::of(requirement(Just(NAMESPACE_KEY.to_owned()), namespace_name().boxed())),
        prop::collection::btree_map(ns_label_key, value(), 0..2),
    )
        .prop_map(|(mut sel, ns, ns_expr, ns_labels)| {
            if let Some(ns) = ns {
                sel.match_labels.insert(NAMESPACE_KEY.to_owned(), ns);
            }
            sel.match_expressions.extend(ns_expr);
            for (k, v) in ns_labels {
                sel.match_labels.insert(format!("{NAMESPACE_LABELS_PREFIX}{k}"), v);
            }
            sel
        })
}

fn cidr_with_excepts() -> impl Strategy<Value = Peer> {
    (any::<[u8; 4]>(), 0u8..=30, prop::collection::vec((any::<u32>(), 1u8..=2), 0..3)).prop_map(|(a, len, excepts)| {
        let cidr = IpNet::new(IpAddr::from(a), len).expect("prefix ≤ 32").trunc();
        let mut except: Vec<IpNet> = excepts
            .into_iter()
            .map(|(bits, extra)| {
                let host = u32::from_be_bytes(a) | (bits >> len.max(1));
                IpNet::new(IpAddr::from(host.to_be_bytes()), len + extra).expect("prefix ≤ 32").trunc()
            })
            .filter(|e| cidr.contains(e) && e != &cidr)
            .collect();
        except.sort();
        except.dedup();
        Peer::Cidr { cidr, except }
    })
}

fn expressible_ports() -> impl Strategy<Value = Vec<PortRange>> {
    let protocol = prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)];
    let range = (protocol, 1u16..=65535, 1u16..=65535, any::<bool>()).prop_map(|(protocol, a, b, all)| {
        if all { PortRange::all(protocol) } else { PortRange { protocol, first: a.min(b), last: a.max(b) } }
    });
    prop::collection::vec(range, 0..3)
}

fn expressible_policy() -> impl Strategy<Value = Policy> {
    let rule = (
        prop_oneof![expressible_peer_selector().prop_map(|selector| Peer::Workloads { selector }), cidr_with_excepts()],
        expressible_ports(),
    )
        .prop_map(|(peer, ports)| Rule::l4(peer, ports));
    let rules = prop::option::of(prop::collection::vec(rule, 0..4)).boxed();
    ("[a-z]([a-z0-9-]{0,10}[a-z0-9])?", namespace_name(), pod_terms(), rules.clone(), rules)
        .prop_filter("covers a direction", |(.., i, e)| i.is_some() || e.is_some())
        .prop_map(|(name, ns, mut selector, ingress, egress)| {
            selector.match_labels.insert(NAMESPACE_KEY.to_owned(), ns.clone());
            Policy { name, namespace: Some(ns), selector, ingress, egress }
        })
}

/// Any policy at all: arbitrary text anywhere (biased towards valid Kubernetes syntax so
/// that many policies get far enough to be exported), every peer kind, any port numbers.
fn arbitrary_policy() -> impl Strategy<Value = Policy> {
    let key = || {
        prop_oneof![
            12 => pod_key(),
            1 => ".{0,12}",
            1 => Just(NAMESPACE_KEY.to_owned()),
            1 => Just(SERVICE_ACCOUNT_KEY.to_owned()),
            1 => "io\\.cilium\\.k8s\\.namespace\\.labels\\..{0,8}",
        ]
    };
    let text = || prop_oneof![12 => value(), 1 => ".{0,12}", 1 => "[a-z]{60,70}", 1 => Just("default".to_owned())];
    let selector = (
        prop::collection::btree_map(key(), text(), 0..3),
        prop::collection::vec(requirement(key(), text().boxed()), 0..2),
    )
        .prop_map(|(match_labels, match_expressions)| LabelSelector { match_labels, match_expressions })
        .boxed();
    let entity = prop::sample::select(ReservedIdentity::ALL.to_vec());
    let peer = prop_oneof![
        3 => selector.clone().prop_map(|selector| Peer::Workloads { selector }),
        1 => entity.prop_map(|entity| Peer::Entity { entity }),
        1 => (any::<[u8; 16]>(), 0u8..=128, prop::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..3)).prop_map(|(a, len, ex)| Peer::Cidr {
            cidr: IpNet::new(IpAddr::from(a), len).expect("prefix ≤ 128"),
            except: ex.into_iter().map(|(e, l)| IpNet::new(IpAddr::from(e), l).expect("prefix ≤ 32")).collect(),
        }),
        1 => (any::<[u8; 4]>(), 0u8..=32, prop::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..3)).prop_map(|(a, len, ex)| Peer::Cidr {
            cidr: IpNet::new(IpAddr::from(a), len).expect("prefix ≤ 32"),
            except: ex.into_iter().map(|(e, l)| IpNet::new(IpAddr::from(e), l).expect("prefix ≤ 32")).collect(),
        }),
        1 => (text(), prop::collection::vec(any::<[u8; 4]>(), 0..3)).prop_map(|(name, cidrs)| Peer::CidrGroup {
            name,
            cidrs: cidrs.into_iter().map(|c| IpNet::from(IpAddr::from(c))).collect(),
        }),
        1 => (prop_oneof![text(), "[a-z]{1,5}\\.[a-z]{2,3}"], prop::collection::vec(any::<IpAddr>(), 0..3)).prop_map(|(name, addresses)| Peer::Fqdn { name, addresses }),
    ];
    let port = (
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)],
        prop_oneof![any::<u16>(), 0u16..3, 50u16..56, Just(u16::MAX)],
        any::<u16>(),
    )
        .prop_map(|(protocol, first, last)| PortRange { protocol, first, last });
    let rule = (peer, prop::collection::vec(port, 0..3)).prop_map(|(peer, ports)| Rule::l4(peer, ports));
    let rules = prop_oneof![1 => Just(None), 3 => prop::collection::vec(rule, 0..4).prop_map(Some)].boxed();
    let namespace = prop_oneof![9 => Just(Some("default".to_owned())), 1 => prop::option::of(text())];
    (prop_oneof![9 => "[a-z]{1,8}", 1 => text()], namespace, selector, prop::bool::weighted(0.9), rules.clone(), rules)
        .prop_map(|(name, namespace, mut selector, pin, ingress, egress)| {
            if let (true, Some(ns)) = (pin, &namespace) {
                selector.match_labels.insert(NAMESPACE_KEY.to_owned(), ns.clone());
            }
            Policy { name, namespace, selector, ingress, egress }
        })
}

fn assert_k8s_selector(s: &meta::LabelSelector) {
    for (k, v) in s.match_labels.iter().flatten() {
        assert!(validate::label_key(k).is_ok() && validate::label_value(v).is_ok(), "{k:?}={v:?}");
    }
    for r in s.match_expressions.iter().flatten() {
        assert!(validate::label_key(&r.key).is_ok(), "{:?}", r.key);
        for v in r.values.iter().flatten() {
            assert!(validate::label_value(v).is_ok(), "{v:?}");
        }
    }
}

/// What every exported NetworkPolicy must satisfy, whatever the input.
fn assert_np_sound(np: &NetworkPolicy) {
    let name = np.metadata.name.as_deref().expect("name");
    assert!(validate::dns1123_subdomain(name).is_ok(), "{name:?}");
    assert!(validate::dns1123_label(np.metadata.namespace.as_deref().expect("namespace")).is_ok());
    let spec = np.spec.as_ref().expect("spec");
    assert!(!spec.policy_types.as_deref().unwrap_or_default().is_empty());
    assert_k8s_selector(spec.pod_selector.as_ref().expect("podSelector"));
    let peers = |p: &Option<Vec<NetworkPolicyPeer>>| {
        // An empty peer list means "everyone": never written.
        assert!(p.as_ref().is_none_or(|p| !p.is_empty()));
        for peer in p.iter().flatten() {
            peer.pod_selector.iter().chain(&peer.namespace_selector).for_each(assert_k8s_selector);
            if let Some(b) = &peer.ip_block {
                let cidr: IpNet = b.cidr.parse().expect("cidr");
                for e in b.except.iter().flatten() {
                    let e: IpNet = e.parse().expect("except");
                    assert!(cidr.contains(&e) && e.prefix_len() > cidr.prefix_len());
                }
            }
        }
    };
    let ports = |ports: &Option<Vec<k8s_openapi::api::networking::v1::NetworkPolicyPort>>| {
        assert!(ports.as_ref().is_none_or(|p| !p.is_empty()));
        for p in ports.iter().flatten() {
            if let Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) = p.port {
                assert!((1..=65535).contains(&n));
                assert!(p.end_port.is_none_or(|e| e > n && e <= 65535));
            }
        }
    };
    for r in spec.ingress.iter().flatten() {
        peers(&r.from);
        ports(&r.ports);
    }
    for r in spec.egress.iter().flatten() {
        peers(&r.to);
        ports(&r.ports);
    }
}

fn assert_cnp_sound(cnp: &CiliumNetworkPolicy) {
    let check = |s: &EndpointSelector| {
        let key_ok = |k: &str| match classify(k) {
            KeyClass::NamespaceLabel(rest) => validate::label_key(rest).is_ok(),
            _ => validate::label_key(k).is_ok(),
        };
        for (k, v) in &s.match_labels {
            assert!(key_ok(k) && validate::label_value(v).is_ok(), "{k:?}={v:?}");
        }
        for r in &s.match_expressions {
            assert!(key_ok(&r.key) && r.values.iter().all(|v| validate::label_value(v).is_ok()), "{r:?}");
        }
    };
    check(&cnp.spec.endpoint_selector);
    let ports_ok = |p: &Option<Vec<PortRule>>| {
        for r in p.iter().flatten() {
            assert!(!r.ports.is_empty() && r.ports.len() <= 40);
        }
    };
    for r in cnp.spec.ingress.iter().flatten() {
        let kinds = [r.from_endpoints.is_some(), r.from_entities.is_some(), r.from_cidr_set.is_some()];
        assert!(kinds.iter().filter(|k| **k).count() == 1 || r == &IngressRule::default(), "{r:?}");
        r.from_endpoints.iter().flatten().for_each(check);
        ports_ok(&r.to_ports);
    }
    for r in cnp.spec.egress.iter().flatten() {
        let kinds = [r.to_endpoints.is_some(), r.to_entities.is_some(), r.to_cidr_set.is_some(), r.to_fqdns.is_some()];
        assert!(kinds.iter().filter(|k| **k).count() == 1 || r == &EgressRule::default(), "{r:?}");
        r.to_endpoints.iter().flatten().for_each(check);
        for f in r.to_fqdns.iter().flatten() {
            assert!(validate::dns_name(&f.match_name).is_ok());
        }
        ports_ok(&r.to_ports);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// export → import gives the policy back for everything NetworkPolicy can say.
    #[test]
    fn network_policy_round_trips(policy in expressible_policy()) {
        let (np, warnings) = network_policy(&policy).expect("expressible policies export");
        prop_assert!(warnings.is_empty(), "{:?}", warnings);
        let (back, warnings) = import_network_policy(&np).expect("own exports import");
        prop_assert!(warnings.is_empty(), "{:?}", warnings);
        let mut expected = policy.clone();
        expected.normalize();
        prop_assert_eq!(back, expected);
    }

    /// No input panics, and whatever is exported is valid Kubernetes.
    #[test]
    fn any_policy_exports_soundly_or_is_refused(policy in arbitrary_policy()) {
        if let Ok((np, _)) = network_policy(&policy) {
            assert_np_sound(&np);
            let back: NetworkPolicy = serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&np).expect("renders")).expect("parses");
            prop_assert_eq!(&back, &np);
            let _ = import_network_policy(&np).expect("own exports import");
        }
        if let Ok((cnp, _)) = cilium_network_policy(&policy) {
            assert_cnp_sound(&cnp);
            let back: CiliumNetworkPolicy = serde_yaml_ng::from_str(&serde_yaml_ng::to_string(&cnp).expect("renders")).expect("parses");
            prop_assert_eq!(back, cnp);
        }
    }

    /// The same policies in any order give byte-identical YAML.
    #[test]
    fn export_is_deterministic(
        (policies, shuffled) in prop::collection::vec(prop_oneof![expressible_policy(), arbitrary_policy()], 0..6)
            .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle()))
    ) {
        for format in [Format::NetworkPolicy, Format::CiliumNetworkPolicy] {
            let a = export_yaml(&policies, format, &Scope::All);
            let b = export_yaml(&shuffled, format, &Scope::All);
            prop_assert_eq!(&a.yaml, &b.yaml);
            prop_assert_eq!(a.errors.len(), b.errors.len());
        }
    }

    /// Importing arbitrary NetworkPolicies never panics.
    #[test]
    fn any_network_policy_imports_or_is_refused(
        labels in prop::collection::btree_map(".{0,10}", ".{0,10}", 0..3),
        port in prop::option::of(prop_oneof![any::<i32>().prop_map(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int), ".{0,6}".prop_map(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String)]),
        end_port in prop::option::of(any::<i32>()),
        protocol in prop::option::of(prop_oneof![Just("TCP".to_owned()), Just("SCTP".to_owned()), ".{0,4}"]),
        cidr in ".{0,20}",
        types in prop::option::of(prop::collection::vec(prop_oneof![Just("Ingress".to_owned()), Just("Egress".to_owned()), ".{0,5}"], 0..3)),
    ) {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "n", "namespace": "ns"},
            "spec": {
                "podSelector": {"matchLabels": labels},
                "policyTypes": types,
                "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}, {"namespaceSelector": {"matchLabels": labels}}],
                             "ports": [{"port": port, "endPort": end_port, "protocol": protocol}]}],
                "egress": [{}],
            },
        })).expect("parses");
        if let Ok((policy, _)) = import_network_policy(&np) {
            for rule in policy.ingress.iter().flatten() {
                prop_assert!(rule.ports.iter().all(|p| p.first <= p.last));
            }
        }
    }
}

// === HTTP (L7) ===

fn landing_policy(http: Vec<HttpRule>) -> Policy {
    let mut p = deathstar();
    p.ingress.as_mut().expect("ingress")[0].http = http;
    p
}

#[test]
fn cilium_writes_http_rules_as_anchored_regexes() {
    let p = landing_policy(vec![
        HttpRule::exact("POST", "/v1/request-landing"),
        HttpRule::prefix("GET", "/v1/ships/"),
        HttpRule { method: None, path: HttpPath::Exact("/a.b+c(d)[e]{f}|g^h$i*j\\k".into()) },
        HttpRule { method: Some("DELETE".into()), path: HttpPath::Any },
    ]);
    let (cnp, warnings) = cilium_network_policy(&p).expect("exports");
    assert!(warnings.is_empty(), "{warnings:?}");
    let ingress = cnp.spec.ingress.expect("ingress");
    assert_eq!(ingress.len(), 1);
    let to_ports = ingress[0].to_ports.as_ref().expect("toPorts");
    assert_eq!(to_ports.len(), 1);
    assert_eq!(to_ports[0].ports, vec![PortProtocol { port: "80".into(), end_port: None, protocol: "TCP".into() }]);
    let http = to_ports[0].rules.as_ref().and_then(|r| r.http.clone()).expect("rules.http");
    let got: Vec<(Option<&str>, Option<&str>)> =
        http.iter().map(|h| (h.method.as_deref(), h.path.as_deref())).collect();
    // Sorted as the model normalizes: by method (None first), then path.
    assert_eq!(
        got,
        vec![
            (None, Some(r"/a\.b\+c\(d\)\[e\]\{f\}\|g\^h\$i\*j\\k(\?.*)?")),
            (Some("DELETE"), None),
            (Some("GET"), Some(r"/v1/ships/.*")),
            (Some("POST"), Some(r"/v1/request-landing(\?.*)?")),
        ]
    );
    // Rules with the same ports but other (or no) HTTP rules stay apart.
    let mut p = landing_policy(vec![HttpRule::exact("POST", "/v1/request-landing")]);
    p.ingress
        .as_mut()
        .expect("ingress")
        .push(rule(workloads(&[(NAMESPACE_KEY, "default"), ("class", "probe")]), &[tcp(80)]));
    let (cnp, _) = cilium_network_policy(&p).expect("exports");
    let ingress = cnp.spec.ingress.expect("ingress");
    assert_eq!(ingress.len(), 2, "{ingress:#?}");
    let l7: Vec<bool> = ingress.iter().map(|r| r.to_ports.as_ref().expect("ports")[0].rules.is_some()).collect();
    assert_eq!(l7.iter().filter(|x| **x).count(), 1);
}

#[test]
fn http_rules_on_ports_cilium_cannot_narrow_are_dropped_with_a_warning() {
    let mut p = deathstar();
    let r = &mut p.ingress.as_mut().expect("ingress")[0];
    r.ports = vec![PortRange { protocol: Protocol::Tcp, first: 8000, last: 8080 }];
    r.http = vec![HttpRule::exact("GET", "/")];
    let (cnp, warnings) = cilium_network_policy(&p).expect("exports");
    assert_eq!(
        warnings.iter().map(|w| &w.kind).collect::<Vec<_>>(),
        vec![&ExportWarningKind::HttpRulesDropped {
            format: Format::CiliumNetworkPolicy,
            reason: HttpDropReason::NotSingleTcpPorts
        }]
    );
    assert!(warnings[0].to_string().contains("wider than the approved policy"), "{}", warnings[0]);
    assert!(cnp.spec.ingress.expect("ingress")[0].to_ports.as_ref().expect("ports")[0].rules.is_none());
}

#[test]
fn network_policy_exports_l4_and_says_the_http_rules_were_dropped() {
    let p = landing_policy(vec![HttpRule::exact("POST", "/v1/request-landing")]);
    let (np, warnings) = network_policy(&p).expect("exports");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(
        warnings[0].kind,
        ExportWarningKind::HttpRulesDropped { format: Format::NetworkPolicy, reason: HttpDropReason::NoL7 }
    );
    let text = warnings[0].to_string();
    assert!(text.contains("NetworkPolicy cannot express HTTP (L7) rules") && text.contains("ingress rule"), "{text}");
    let note = np.metadata.annotations.as_ref().and_then(|a| a.get(L7_DROPPED_ANNOTATION)).expect("annotation");
    assert!(note.contains("POST /v1/request-landing") && note.contains("80/tcp"), "{note}");
    // The L4 part is exactly the L4 policy's.
    let (l4, _) = network_policy(&deathstar()).expect("exports");
    assert_eq!(np.spec, l4.spec);
    assert!(l4.metadata.annotations.is_none());
}

#[test]
fn cilium_http_rules_import_back_and_other_regexes_are_left_out() {
    let p = landing_policy(vec![HttpRule::exact("POST", "/v1/request-landing"), HttpRule::prefix("GET", "/v1/")]);
    let (cnp, _) = cilium_network_policy(&p).expect("exports");
    let (back, warnings) = import_cilium_network_policy(&cnp).expect("imports");
    assert!(warnings.is_empty(), "{warnings:?}");
    let mut want = p.clone();
    want.normalize();
    assert_eq!(back, want);

    // Hand-written rules: a bare literal path is exact, a real regex is not ours.
    let mut cnp = cnp;
    let http = vec![
        HttpRuleSpec { method: Some("GET".into()), path: Some("/health".into()) },
        HttpRuleSpec { method: Some("GET".into()), path: Some("/v1/ships/[0-9]+".into()) },
    ];
    let ingress = cnp.spec.ingress.as_mut().expect("ingress");
    ingress[0].to_ports.as_mut().expect("ports")[0].rules = Some(L7Rules { dns: None, http: Some(http[..1].to_vec()) });
    let (back, warnings) = import_cilium_network_policy(&cnp).expect("imports");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(back.ingress.expect("ingress")[0].http, vec![HttpRule::exact("GET", "/health")]);
    let ingress = cnp.spec.ingress.as_mut().expect("ingress");
    ingress[0].to_ports.as_mut().expect("ports")[0].rules = Some(L7Rules { dns: None, http: Some(http) });
    let (back, warnings) = import_cilium_network_policy(&cnp).expect("imports");
    assert_eq!(back.ingress, Some(vec![]), "the port rule is left out: shown incompletely, never wider");
    assert!(
        matches!(&warnings[0].kind, ImportWarningKind::UnsupportedHttpRule { path: Some(p), .. } if p == "/v1/ships/[0-9]+")
    );
    assert!(
        warnings[0].to_string().starts_with("CiliumNetworkPolicy default/bulkhead-deathstar: ingress rule 1:"),
        "{}",
        warnings[0]
    );
}

/// Policies CiliumNetworkPolicy can express, HTTP rules included (on single TCP ports).
fn cilium_expressible_policy() -> impl Strategy<Value = Policy> {
    let entity = prop::sample::select(ReservedIdentity::ALL.to_vec()).prop_map(|entity| Peer::Entity { entity });
    // `io.kubernetes.pod.namespace Exists` alone is how the export writes "any
    // namespace", so a model selector holding exactly that term comes back without it.
    let any_namespace =
        SelectorRequirement { key: NAMESPACE_KEY.to_owned(), operator: SelectorOperator::Exists, values: vec![] };
    let workload = expressible_peer_selector()
        .prop_filter("not the export's own any-namespace term", move |s| !s.match_expressions.contains(&any_namespace))
        .prop_map(|selector| Peer::Workloads { selector });
    let peer = prop_oneof![3 => workload, 1 => entity, 1 => cidr_with_excepts()];
    let path = prop_oneof![
        Just(HttpPath::Any),
        "/[!-~&&[^?#]]{0,20}".prop_map(HttpPath::Exact),
        "/([a-z0-9.+*()]{1,6}/){0,2}".prop_map(HttpPath::Prefix),
    ];
    let method =
        prop::option::of(prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]).prop_map(String::from));
    let http = prop::collection::vec((method, path).prop_map(|(method, path)| HttpRule { method, path }), 1..4);
    let l7_rule = (peer.clone(), prop::collection::vec(1u16..=65535, 1..3), http)
        .prop_map(|(peer, ports, http)| Rule { peer, ports: ports.into_iter().map(tcp).collect(), http })
        .boxed();
    let l4_rule = (peer, expressible_ports()).prop_map(|(peer, ports)| Rule::l4(peer, ports)).boxed();
    let fqdn = ("[a-z]{1,8}\\.example", expressible_ports())
        .prop_map(|(name, ports)| Rule::l4(Peer::Fqdn { name, addresses: vec![] }, ports));
    let ingress = prop::option::of(prop::collection::vec(prop_oneof![l4_rule.clone(), l7_rule.clone()], 0..4));
    let egress = prop::option::of(prop::collection::vec(prop_oneof![l4_rule, l7_rule, fqdn], 0..4));
    ("[a-z]([a-z0-9-]{0,10}[a-z0-9])?", namespace_name(), pod_terms(), ingress, egress)
        .prop_filter("covers a direction", |(.., i, e)| i.is_some() || e.is_some())
        .prop_map(|(name, ns, mut selector, ingress, egress)| {
            selector.match_labels.insert(NAMESPACE_KEY.to_owned(), ns.clone());
            Policy { name, namespace: Some(ns), selector, ingress, egress }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// export → import gives the policy back for everything CiliumNetworkPolicy can say,
    /// HTTP rules included.
    #[test]
    fn cilium_network_policy_round_trips(policy in cilium_expressible_policy()) {
        let (cnp, warnings) = cilium_network_policy(&policy).expect("expressible policies export");
        let dns_only = warnings.iter().all(|w| w.kind == ExportWarningKind::FqdnWithoutDnsRule);
        prop_assert!(dns_only, "{:?}", warnings);
        assert_cnp_sound(&cnp);
        let yaml = serde_yaml_ng::to_string(&cnp).expect("renders");
        let parsed: CiliumNetworkPolicy = serde_yaml_ng::from_str(&yaml).expect("parses");
        let (back, warnings) = import_cilium_network_policy(&parsed).expect("own exports import");
        prop_assert!(warnings.is_empty(), "{:?}", warnings);
        let mut expected = policy.clone();
        expected.normalize();
        prop_assert_eq!(back, expected, "{}", yaml);
    }

    /// Every rule path survives the regex it is exported as.
    #[test]
    fn path_regexes_invert(path in "/[!-~&&[^?#]]{0,60}", prefix in any::<bool>()) {
        let p = if prefix { HttpPath::Prefix(path) } else { HttpPath::Exact(path) };
        let spec = HttpRuleSpec { method: http_method_regex(Some("GET")), path: http_path_regex(&p) };
        let back = import::tests_support::http_rule(&spec).expect("own regexes import");
        prop_assert_eq!(back, HttpRule { method: Some("GET".into()), path: p });
    }
}
