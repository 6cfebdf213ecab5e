//! Exported NetworkPolicy and CiliumNetworkPolicy YAML checked against the real schemas
//! (see ../shared/K8S.md, "Offline validation of exported YAML"):
//! * snapshots of the reference scenario and of a policy set using every feature, so a
//!   change to the output is a reviewed diff (`BULKHEAD_BLESS=1` rewrites them);
//! * NetworkPolicy documents parse into k8s-openapi types and re-serialise unchanged;
//! * `kubernetes-validate --strict` accepts them (official schemas, unknown fields are
//!   errors);
//! * CiliumNetworkPolicy documents validate against the openAPIV3Schema of
//!   `deploy/kubernetes/crds/ciliumnetworkpolicy.yaml`, with every object closed;
//! * a real kube-apiserver (v1.20, `bulkhead_testkit::kube`) accepts both in a
//!   server-side dry run, without pruning anything, and rejects what it should.
//!
//! The validators live in the venv `cargo xtask setup` creates; when it is missing these
//! tests fail with the command that fixes it — they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bulkhead_learner::export::{
    CiliumNetworkPolicy, ExportError, Format, Scope, cilium_network_policy, export_yaml, import_cilium_network_policy,
    import_network_policy, network_policy,
};
use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{LabelSelector, Peer, Policy, PortRange, Protocol, ReservedIdentity, Rule};
use bulkhead_testkit::eventually::eventually_async;
use bulkhead_testkit::kube::KubeApiServer;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};

// === fixtures ===

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

/// The reference scenario's proposal (DESIGN.md §9): empire ships may land on the
/// deathstar, on 80/TCP only.
fn deathstar() -> Policy {
    Policy {
        name: "bulkhead-deathstar".into(),
        namespace: Some("default".into()),
        selector: sel(&[(NAMESPACE_KEY, "default"), ("org", "empire"), ("class", "deathstar")]),
        ingress: Some(vec![rule(workloads(&[(NAMESPACE_KEY, "default"), ("org", "empire")]), &[tcp(80)])]),
        egress: None,
    }
}

/// A set of policies using every peer kind, port shape and namespace form.
fn fleet() -> Vec<Policy> {
    let tiefighter = Policy {
        name: "bulkhead-tiefighter".into(),
        namespace: Some("default".into()),
        selector: sel(&[(NAMESPACE_KEY, "default"), ("org", "empire"), ("class", "tiefighter")]),
        ingress: Some(vec![]),
        egress: Some(vec![
            rule(workloads(&[(NAMESPACE_KEY, "default"), ("class", "deathstar")]), &[tcp(80)]),
            rule(workloads(&[(NAMESPACE_KEY, "kube-system"), ("k8s-app", "kube-dns")]), &[udp(53), tcp(53)]),
            rule(
                Peer::Fqdn {
                    name: "api.empire.example".into(),
                    addresses: vec!["192.0.2.10".parse().expect("ip"), "2001:db8::10".parse().expect("ip")],
                },
                &[tcp(443)],
            ),
            rule(
                Peer::Cidr {
                    cidr: "10.0.0.0/8".parse().expect("cidr"),
                    except: vec!["10.96.0.0/12".parse().expect("cidr")],
                },
                &[PortRange { protocol: Protocol::Tcp, first: 5000, last: 5010 }],
            ),
            rule(Peer::Entity { entity: ReservedIdentity::World }, &[tcp(443)]),
            rule(Peer::Entity { entity: ReservedIdentity::KubeApiserver }, &[tcp(6443)]),
        ]),
    };
    let metrics = Policy {
        name: "bulkhead-metrics".into(),
        namespace: Some("monitoring".into()),
        selector: sel(&[(NAMESPACE_KEY, "monitoring"), ("app", "prometheus")]),
        ingress: Some(vec![
            rule(workloads(&[("io.cilium.k8s.namespace.labels.team", "sre")]), &[tcp(9090)]),
            rule(Peer::Entity { entity: ReservedIdentity::Host }, &[PortRange::all(Protocol::Tcp)]),
        ]),
        egress: Some(vec![rule(workloads(&[("app.kubernetes.io/component", "exporter")]), &[tcp(9100)])]),
    };
    let lockdown = Policy {
        name: "bulkhead-xwing".into(),
        namespace: Some("alliance".into()),
        selector: sel(&[(NAMESPACE_KEY, "alliance"), ("org", "alliance"), ("class", "xwing")]),
        ingress: Some(vec![]),
        egress: Some(vec![]),
    };
    // L7: HTTP rules on 80/TCP, one with regex metacharacters in its path.
    let hangar = Policy {
        name: "bulkhead-hangar".into(),
        namespace: Some("default".into()),
        selector: sel(&[(NAMESPACE_KEY, "default"), ("org", "empire"), ("class", "hangar")]),
        ingress: Some(vec![Rule {
            http: vec![
                bulkhead_model::HttpRule::exact("POST", "/v1/request-landing"),
                bulkhead_model::HttpRule::prefix("GET", "/v1/ships/"),
                bulkhead_model::HttpRule::exact("PUT", "/v1/bay(3).door+open"),
            ],
            ..rule(workloads(&[(NAMESPACE_KEY, "default"), ("org", "empire")]), &[tcp(80)])
        }]),
        egress: None,
    };
    vec![tiefighter, deathstar(), metrics, lockdown, hangar]
}

// === snapshots ===

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/export").join(name)
}

fn crd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/crds/ciliumnetworkpolicy.yaml")
}

/// Compares with `tests/data/export/<name>`; `BULKHEAD_BLESS=1` rewrites it instead.
fn assert_snapshot(name: &str, actual: &str) {
    let path = data(name);
    if std::env::var_os("BULKHEAD_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e} (BULKHEAD_BLESS=1 creates it)", path.display()));
    assert!(
        expected == actual,
        "{name} differs from the snapshot; review and rerun with BULKHEAD_BLESS=1 if intended.\n--- expected\n{expected}\n--- actual\n{actual}"
    );
}

fn documents(yaml: &str) -> Vec<serde_json::Value> {
    yaml.split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_yaml_ng::from_str(d).unwrap_or_else(|e| panic!("document does not parse: {e}\n{d}")))
        .collect()
}

#[test]
fn reference_scenario_snapshots() {
    for (format, file) in [
        (Format::NetworkPolicy, "reference-networkpolicy.yaml"),
        (Format::CiliumNetworkPolicy, "reference-ciliumnetworkpolicy.yaml"),
    ] {
        let out = export_yaml(&[deathstar()], format, &Scope::All);
        assert!(out.errors.is_empty() && out.warnings.is_empty(), "{out:?}");
        assert_snapshot(file, &out.yaml);
    }
}

#[test]
fn fleet_snapshots() {
    for (format, file) in
        [(Format::NetworkPolicy, "fleet-networkpolicy"), (Format::CiliumNetworkPolicy, "fleet-ciliumnetworkpolicy")]
    {
        let out = export_yaml(&fleet(), format, &Scope::All);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_snapshot(&format!("{file}.yaml"), &out.yaml);
        let warnings: Vec<String> = out.warnings.iter().map(|w| format!("{w}\n")).collect();
        assert_snapshot(&format!("{file}.warnings.txt"), &warnings.concat());
    }
}

// === k8s-openapi round trip ===

#[test]
fn network_policy_yaml_round_trips_through_k8s_openapi() {
    let out = export_yaml(&fleet(), Format::NetworkPolicy, &Scope::All);
    let docs = documents(&out.yaml);
    assert_eq!(docs.len(), fleet().len());
    for doc in docs {
        let typed: NetworkPolicy = serde_json::from_value(doc.clone()).expect("a k8s-openapi NetworkPolicy");
        assert_eq!(serde_json::to_value(&typed).expect("serializes"), doc, "fields lost or renamed");
        import_network_policy(&typed).expect("imports back");
    }

    // The reference scenario comes back as the same policy.
    let (np, _) = network_policy(&deathstar()).expect("exports");
    let yaml = serde_yaml_ng::to_string(&np).expect("renders");
    let parsed: NetworkPolicy = serde_yaml_ng::from_str(&yaml).expect("parses");
    let (back, warnings) = import_network_policy(&parsed).expect("imports");
    assert!(warnings.is_empty());
    let mut expected = deathstar();
    expected.normalize();
    assert_eq!(back, expected);
}

#[test]
fn cilium_yaml_round_trips_through_its_types() {
    let out = export_yaml(&fleet(), Format::CiliumNetworkPolicy, &Scope::All);
    for doc in documents(&out.yaml) {
        // deny_unknown_fields: a key the exporter wrote but the type does not know fails.
        let typed: CiliumNetworkPolicy = serde_json::from_value(doc.clone()).expect("a CiliumNetworkPolicy");
        assert_eq!(serde_json::to_value(&typed).expect("serializes"), doc);
        // Importing gives the policy back (FQDN peers lose the addresses they were
        // exported without).
        let (back, warnings) = import_cilium_network_policy(&typed).expect("imports back");
        assert!(warnings.is_empty(), "{warnings:?}");
        let mut want =
            fleet().into_iter().find(|p| Some(&p.name) == typed.metadata.name.as_ref()).expect("in the fleet");
        for r in want.egress.iter_mut().flatten() {
            if let Peer::Fqdn { addresses, .. } = &mut r.peer {
                addresses.clear();
            }
        }
        want.normalize();
        assert_eq!(back, want, "{}", want.name);
    }
}

// === offline schema checks ===

fn venv_bin(tool: &str) -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let path = Path::new(&home).join(".cache/bulkhead/venv/bin").join(tool);
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup`, or by hand: python3 -m venv ~/.cache/bulkhead/venv && \
         ~/.cache/bulkhead/venv/bin/pip install kubernetes-validate==1.37.0",
        path.display()
    );
    path
}

/// Runs a validator over `yaml` written to a file; returns (success, stdout + stderr).
fn run_validator(program: &Path, args: &[&str], yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("export.yaml");
    std::fs::write(&file, yaml).expect("writes");
    let output = Command::new(program)
        .args(args)
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// kubernetes-validate exits 0 on kinds it has no schema for, so success alone proves
/// nothing: every object must be named as passed, and nothing may be warned about.
fn assert_kubernetes_validate(yaml: &str, names: &[&str]) {
    let tool = venv_bin("kubernetes-validate");
    for version in ["1.37.0", "1.25.0"] {
        let (ok, text) = run_validator(&tool, &["--strict", "-k", version], yaml);
        assert!(ok, "kubernetes-validate {version} rejected the export:\n{text}\n{yaml}");
        assert!(!text.contains("WARN") && !text.contains("ERROR"), "kubernetes-validate {version}:\n{text}");
        for name in names {
            assert!(
                text.contains(&format!("passed for resource networkpolicy/{name} ")),
                "kubernetes-validate {version} did not validate {name}:\n{text}"
            );
        }
    }
}

#[test]
fn network_policy_yaml_passes_kubernetes_validate() {
    let out = export_yaml(&fleet(), Format::NetworkPolicy, &Scope::All);
    let names: Vec<String> = fleet().into_iter().map(|p| p.name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_kubernetes_validate(&out.yaml, &names);
}

#[test]
fn kubernetes_validate_catches_what_it_should() {
    // Proves the check bites: a misspelt field fails under --strict.
    let out = export_yaml(&[deathstar()], Format::NetworkPolicy, &Scope::All);
    let broken = out.yaml.replace("podSelector:\n    matchLabels:", "podSelectr:\n    matchLabels:");
    assert_ne!(broken, out.yaml);
    let (ok, text) = run_validator(&venv_bin("kubernetes-validate"), &["--strict"], &broken);
    assert!(!ok && text.contains("podSelectr"), "{text}");
}

fn check_crd_schema(yaml: &str) -> (bool, String) {
    let script = data("check_crd_schema.py");
    let crd = crd();
    run_validator(
        &venv_bin("python3"),
        &[script.to_str().expect("utf-8 path"), crd.to_str().expect("utf-8 path")],
        yaml,
    )
}

#[test]
fn cilium_yaml_matches_the_crd_schema() {
    let out = export_yaml(&fleet(), Format::CiliumNetworkPolicy, &Scope::All);
    let (ok, text) = check_crd_schema(&out.yaml);
    assert!(ok, "CRD schema check failed:\n{text}\n{}", out.yaml);
    for p in fleet() {
        assert!(text.contains(&format!("OK CiliumNetworkPolicy/{}\n", p.name)), "{} not validated:\n{text}", p.name);
    }

    // And the check bites: a misspelt field, a bad entity and a bad CIDR each fail.
    for (from, to) in
        [("toFQDNs:", "toFQDN:"), ("- kube-apiserver", "- apiserver"), ("cidr: 10.0.0.0/8", "cidr: 10.0.0.0/33")]
    {
        let broken = out.yaml.replacen(from, to, 1);
        assert_ne!(broken, out.yaml, "{from}");
        let (ok, text) = check_crd_schema(&broken);
        assert!(!ok && text.contains("ERROR"), "{from} → {to} passed:\n{text}");
    }
}

// === bad input ===

#[test]
fn hostile_labels_are_refused_and_the_rest_exports() {
    let mut web = deathstar();
    web.name = "bulkhead-web".into();
    web.ingress = Some(vec![rule(workloads(&[("app", "<script>")]), &[tcp(80)])]);
    let mut rtl = deathstar();
    rtl.name = "bulkhead-rtl".into();
    rtl.selector.match_labels.insert("team\u{202e}".into(), "x".into());
    for format in [Format::NetworkPolicy, Format::CiliumNetworkPolicy] {
        let out = export_yaml(&[web.clone(), deathstar(), rtl.clone()], format, &Scope::All);
        assert_eq!(documents(&out.yaml).len(), 1);
        assert!(out.yaml.contains("name: bulkhead-deathstar"));
        let messages: Vec<String> = out.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages,
            vec![
                "policy default/bulkhead-rtl: label key \"team\\u{202e}\" in the policy's selector is not a valid \
                 Kubernetes label key (must be a name of ≤63 characters of [A-Za-z0-9-_.] starting and ending \
                 alphanumeric, optionally prefixed by a DNS subdomain of ≤253 characters of [a-z0-9-.] and '/')"
                    .to_owned(),
                "policy default/bulkhead-web: label value \"<script>\" of key \"app\" in the peer of ingress rule 1 is \
                 not a valid Kubernetes label value (must be empty or ≤63 characters of [A-Za-z0-9-_.], starting \
                 and ending alphanumeric)"
                    .to_owned(),
            ]
        );
    }
    assert!(matches!(cilium_network_policy(&web), Err(ExportError::InvalidLabelValue { .. })));
}

// === determinism ===

#[test]
fn exports_are_byte_identical_whatever_the_input_order() {
    let mut reversed = fleet();
    reversed.reverse();
    for p in &mut reversed {
        for rules in [p.ingress.as_mut(), p.egress.as_mut()].into_iter().flatten() {
            rules.reverse();
        }
    }
    for format in [Format::NetworkPolicy, Format::CiliumNetworkPolicy] {
        let a = export_yaml(&fleet(), format, &Scope::All);
        let b = export_yaml(&fleet(), format, &Scope::All);
        let c = export_yaml(&reversed, format, &Scope::All);
        assert_eq!(a, b);
        assert_eq!(a.yaml, c.yaml);
    }
}

// === server-side dry run ===

const CNP_CRD_NAME: &str = "ciliumnetworkpolicies.cilium.io";

/// Installs the test CRD and waits until CiliumNetworkPolicies can be created.
async fn install_cnp_crd(client: &kube::Client) -> ApiResource {
    let text = std::fs::read_to_string(crd()).unwrap_or_else(|e| panic!("reading {}: {e}", crd().display()));
    let definition: CustomResourceDefinition = serde_yaml_ng::from_str(&text).expect("the CRD parses");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.create(&PostParams::default(), &definition)
        .await
        .unwrap_or_else(|e| panic!("the API server refused {}: {e}", crd().display()));
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cilium.io", "v2", "CiliumNetworkPolicy"),
        "ciliumnetworkpolicies",
    );
    let cnps = Api::<DynamicObject>::namespaced_with(client.clone(), "default", &resource);
    eventually_async(Duration::from_secs(60), async || {
        let established = crds.get(CNP_CRD_NAME).await.ok().and_then(|c| c.status).and_then(|s| s.conditions);
        established.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Established" && c.status == "True"))
            && cnps.list(&Default::default()).await.is_ok()
    })
    .await
    .unwrap_or_else(|e| panic!("{CNP_CRD_NAME} never became usable: {e}"));
    resource
}

async fn create_namespaces(client: &kube::Client, policies: &[Policy]) {
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut names: Vec<&str> = policies.iter().filter_map(|p| p.namespace.as_deref()).collect();
    names.sort();
    names.dedup();
    for name in names.into_iter().filter(|n| *n != "default") {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    }
}

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

/// A NetworkPolicy's spec without `endPort`, which API servers before Kubernetes 1.22
/// (like the v1.20 test server) drop; everything else must come back unchanged.
fn without_end_port(mut doc: serde_json::Value) -> serde_json::Value {
    for direction in ["ingress", "egress"] {
        let Some(rules) = doc.pointer_mut(&format!("/spec/{direction}")).and_then(|r| r.as_array_mut()) else {
            continue;
        };
        for ports in rules.iter_mut().filter_map(|r| r.get_mut("ports").and_then(|p| p.as_array_mut())) {
            for port in ports.iter_mut().filter_map(|p| p.as_object_mut()) {
                port.remove("endPort");
            }
        }
    }
    doc["spec"].clone()
}

#[tokio::test]
async fn exports_pass_server_side_dry_run() {
    let server = KubeApiServer::start().await;
    let client = server.client();
    let policies = fleet();
    create_namespaces(&client, &policies).await;

    let out = export_yaml(&policies, Format::NetworkPolicy, &Scope::All);
    for doc in documents(&out.yaml) {
        let np: NetworkPolicy = serde_json::from_value(doc.clone()).expect("a NetworkPolicy");
        let ns = np.metadata.namespace.clone().expect("namespaced");
        let name = np.metadata.name.clone().expect("named");
        let created = Api::<NetworkPolicy>::namespaced(client.clone(), &ns)
            .create(&dry_run(), &np)
            .await
            .unwrap_or_else(|e| panic!("dry run refused NetworkPolicy {ns}/{name}: {e}\n{doc:#}"));
        let kept = serde_json::to_value(&created).expect("serializes")["spec"].clone();
        assert!(
            kept == doc["spec"] || kept == without_end_port(doc.clone()),
            "the API server changed NetworkPolicy {ns}/{name}:\n{kept:#}\n{doc:#}"
        );
    }

    let resource = install_cnp_crd(&client).await;
    let out = export_yaml(&policies, Format::CiliumNetworkPolicy, &Scope::All);
    for doc in documents(&out.yaml) {
        let object: DynamicObject = serde_json::from_value(doc.clone()).expect("an object");
        let ns = object.metadata.namespace.clone().expect("namespaced");
        let name = object.metadata.name.clone().expect("named");
        let created = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource)
            .create(&dry_run(), &object)
            .await
            .unwrap_or_else(|e| panic!("dry run refused CiliumNetworkPolicy {ns}/{name}: {e}\n{doc:#}"));
        // Structural schemas prune unknown fields silently: equality proves none was.
        assert_eq!(created.data["spec"], doc["spec"], "the API server pruned CiliumNetworkPolicy {ns}/{name}");
    }

    // The dry run validates for real: a bad CIDR and an unknown entity are refused.
    let (np, _) = network_policy(&deathstar()).expect("exports");
    let mut bad = serde_json::to_value(&np).expect("serializes");
    bad["spec"]["ingress"][0]["from"] = serde_json::json!([{"ipBlock": {"cidr": "10.0.0.0/33"}}]);
    let bad: NetworkPolicy = serde_json::from_value(bad).expect("still a NetworkPolicy");
    let refused = Api::<NetworkPolicy>::namespaced(client.clone(), "default").create(&dry_run(), &bad).await;
    assert!(refused.is_err(), "a /33 CIDR was accepted");

    let (cnp, _) = cilium_network_policy(&deathstar()).expect("exports");
    let mut bad = serde_json::to_value(&cnp).expect("serializes");
    bad["spec"]["ingress"][0] = serde_json::json!({"fromEntities": ["apiserver"]});
    let bad: DynamicObject = serde_json::from_value(bad).expect("an object");
    let refused = Api::<DynamicObject>::namespaced_with(client, "default", &resource).create(&dry_run(), &bad).await;
    assert!(refused.is_err(), "an unknown entity was accepted");
}
