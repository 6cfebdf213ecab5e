//! deploy/ checked with the real tools, so that what a user installs works:
//!
//! * the Helm chart (`deploy/helm/bulkhead`): `helm lint --strict` and `helm template`
//!   with its defaults and with non-default values ([`CASES`]); its values schema
//!   refuses a misspelt value;
//! * every rendered object against the official schemas (`kubernetes-validate
//!   --strict`, 1.25 and 1.37) and against a real kube-apiserver v1.20 (server-side
//!   apply, dry run), where no field the chart writes may be dropped as unknown;
//! * what the chart promises about security (capabilities, the same as the systemd
//!   units'; a non-root learner; seccomp; read-only root filesystems; nothing
//!   privileged; hostPID for the collector only) and its wiring (probes on real
//!   endpoints, Prometheus annotations on the metrics ports the agents and the learner bind, the
//!   learner URL the agents dial, the certificate flags);
//! * its RBAC: the learner's own Kubernetes watchers, impersonating the chart's
//!   ServiceAccount, are refused until the chart's ClusterRole is applied, then
//!   healthy, and still may not read Secrets;
//! * `deploy/kubernetes/bulkhead.yaml` is what `deploy/kubernetes/generate.sh` renders;
//! * the systemd units pass `systemd-analyze verify` (in a scratch root);
//! * the Dockerfile passes hadolint (parser, Dockerfile rules, ShellCheck on `RUN`) and
//!   builds the binaries the chart runs, with the toolchain set-up uses;
//! * the learner accepts every argument these files give it: the real binary parses
//!   them (followed by `--help`, which stops before it would start). The agents'
//!   arguments are checked the same way by `collector/tests/deploy.rs` and
//!   `enforcer/tests/deploy.rs`, which can run the agent binaries.
//!
//! helm, kubernetes-validate and hadolint are installed by `cargo xtask setup`
//! (xtask/src/setup.rs, `deploy_tools`), the API server comes from
//! `bulkhead_testkit::kube`. A missing tool fails these tests; none is skipped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bulkhead_learner::identity::Resolver;
use bulkhead_learner::identity::inventory::Inventory;
use bulkhead_learner::identity::kube::KubeWatchers;
use bulkhead_testkit::assert_eventually_async;
use bulkhead_testkit::kube::KubeApiServer;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde::Deserialize;
use serde_json::Value;

/// The helm release `cargo xtask setup` installs (`setup::HELM_VERSION`).
const HELM_VERSION: &str = "4.1.4";
/// Watches of a fresh API server converge in well under this; RBAC changes are seen
/// at the watchers' next retry (backoff up to 30 s).
const CONVERGE: Duration = Duration::from_secs(90);

/// Capabilities each agent needs (deploy/README.md says what for).
const COLLECTOR_CAPS: &[&str] = &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"];
const ENFORCER_CAPS: &[&str] = &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"];

/// A values file the chart is rendered with.
#[derive(Debug)]
struct Case {
    name: &'static str,
    values: &'static str,
    /// Whether agents and learner use mTLS in this case.
    tls: bool,
    /// Capabilities added to both agents on top of theirs.
    extra_caps: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case { name: "defaults", values: "", tls: true, extra_caps: &[] },
    Case {
        name: "postgresql-plaintext-inventory",
        values: r#"
database:
  type: postgresql
tls:
  enabled: false
learner:
  bindAddress: "[::]"
  enrollment: closed
  extraArgs: ["--flow-retention-hours=72"]
  inventory: |
    workloads:
      - name: billing
        namespace: finance
        labels: {app: billing}
        match:
          cidrs: [10.20.0.0/24]
    external:
      - name: corp-vpn
        cidrs: [192.0.2.0/24]
agents:
  metricsBindAddress: "[::]"
  extraCapabilities: [SYS_RESOURCE]
postgresql:
  storage:
    storageClass: fast
"#,
        tls: false,
        extra_caps: &["SYS_RESOURCE"],
    },
    Case {
        name: "external-db-secret-per-node",
        values: r#"
fullnameOverride: bh
namespace:
  create: true
database:
  type: external
  external:
    secretName: bulkhead-db
learner:
  kubernetes: false
  persistence:
    existingClaim: learner-data
tls:
  agents:
    source: secretPerNode
    secretPerNode:
      nodes: [node-a, ip-10-0-0-1.eu-west-1.compute.internal]
"#,
        tls: true,
        extra_caps: &[],
    },
    Case {
        name: "collector-only",
        values: "enforcer:\n  enabled: false\nlearner:\n  logFormat: plain\n",
        tls: true,
        extra_caps: &[],
    },
];

// === tools and files ===

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the learner is one level below the root").to_owned()
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/bulkhead")
}

/// `$XDG_CACHE_HOME/bulkhead` or `~/.cache/bulkhead`, where set-up puts the tools.
fn cache() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(xdg) => PathBuf::from(xdg).join("bulkhead"),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/bulkhead"),
    }
}

fn require(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.is_file(),
        "{what} is missing at {}: run `cargo xtask setup` (xtask/src/setup.rs installs it). \
         The deploy tests fail rather than skip.",
        path.display()
    );
    path
}

fn helm() -> PathBuf {
    require(cache().join(format!("helm-{HELM_VERSION}/helm")), "helm")
}

fn venv_bin(tool: &str) -> PathBuf {
    require(cache().join("venv/bin").join(tool), tool)
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `helm template` of `case` as release `release` in `namespace`.
fn render(case: &Case, release: &str, namespace: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, case.values).expect("writes values");
    let out = run(Command::new(helm())
        .args(["template", release])
        .arg(chart())
        .args(["--namespace", namespace, "-f"])
        .arg(&values));
    assert!(out.status.success(), "helm template ({}) failed:\n{}", case.name, text(&out.stderr));
    text(&out.stdout)
}

/// The YAML documents of a stream, as JSON (empty documents dropped).
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{yaml}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(obj: &Value) -> &str {
    obj["kind"].as_str().unwrap_or_else(|| panic!("object without kind: {obj}"))
}

fn name(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or_else(|| panic!("object without name: {obj}"))
}

fn str_list(v: &Value) -> Vec<&str> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// Deployments, DaemonSets and StatefulSets with their component label.
fn workloads(objects: &[Value]) -> Vec<(&str, &Value)> {
    objects
        .iter()
        .filter(|o| matches!(kind(o), "Deployment" | "DaemonSet" | "StatefulSet"))
        .map(|o| {
            let component = o["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .unwrap_or_else(|| panic!("{} has no component label", name(o)));
            (component, o)
        })
        .collect()
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn only_container(workload: &Value) -> &Value {
    let containers = pod_spec(workload)["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{}: one container expected", name(workload));
    &containers[0]
}

/// The value of `--flag=value` among a container's args.
fn flag<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    str_list(&container["args"]).into_iter().find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

fn has_flag(container: &Value, flag: &str) -> bool {
    str_list(&container["args"]).iter().any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
}

/// The port of a `host:port` listen address (`[::]:7401` too).
fn listen_port(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr:?}"))
}

fn container_port(container: &Value, port_name: &str) -> u64 {
    container["ports"]
        .as_array()
        .and_then(|ports| ports.iter().find(|p| p["name"] == port_name))
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container {} has no port {port_name}", container["name"]))
}

// === helm ===

#[test]
fn helm_is_the_pinned_release() {
    let out = run(Command::new(helm()).args(["version", "--short"]));
    assert!(text(&out.stdout).starts_with(&format!("v{HELM_VERSION}")), "{}", text(&out.stdout));
}

#[test]
fn helm_lint_passes_for_every_case_and_the_schema_refuses_misspelt_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    for case in CASES {
        let values = dir.path().join(format!("{}.yaml", case.name));
        std::fs::write(&values, case.values).expect("writes");
        let out = run(Command::new(helm()).args(["lint", "--strict"]).arg(chart()).arg("-f").arg(&values));
        assert!(out.status.success(), "helm lint ({}):\n{}{}", case.name, text(&out.stdout), text(&out.stderr));
    }
    // The values schema bites: a misspelt key, a bad enum, a bad type.
    for (bad, what) in [
        ("learner:\n  enrolment: open\n", "enrolment"),
        ("database:\n  type: mysql\n", "database/type"),
        ("collector:\n  metricsPort: \"7401\"\n", "metricsPort"),
        ("tls:\n  agents:\n    source: csi\n", "tls/agents/source"),
    ] {
        let values = dir.path().join("bad.yaml");
        std::fs::write(&values, bad).expect("writes");
        let out = run(Command::new(helm()).args(["lint", "--strict"]).arg(chart()).arg("-f").arg(&values));
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success() && all.contains(what), "helm lint accepted {bad:?}:\n{all}");
    }
}

#[test]
fn impossible_values_fail_with_a_reason() {
    for (values, reason) in [
        ("database:\n  type: external\n", "needs database.external.secretName"),
        ("tls:\n  agents:\n    source: secretPerNode\n", "needs tls.agents.secretPerNode.nodes"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("values.yaml");
        std::fs::write(&file, values).expect("writes");
        let out = run(Command::new(helm()).args(["template", "t"]).arg(chart()).arg("-f").arg(&file));
        assert!(!out.status.success() && text(&out.stderr).contains(reason), "{values:?}: {}", text(&out.stderr));
    }
}

#[test]
fn the_plain_manifests_are_the_rendered_chart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fresh = dir.path().join("bulkhead.yaml");
    let out = run(Command::new("sh").arg(repo().join("deploy/kubernetes/generate.sh")).arg(&fresh).env("HELM", helm()));
    assert!(out.status.success(), "generate.sh failed:\n{}", text(&out.stderr));
    let fresh = std::fs::read_to_string(&fresh).expect("reads");
    let committed = repo().join("deploy/kubernetes/bulkhead.yaml");
    let committed = std::fs::read_to_string(&committed).unwrap_or_else(|e| panic!("{}: {e}", committed.display()));
    if fresh != committed {
        let (line, (want, got)) = fresh
            .lines()
            .zip(committed.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(i, pair)| (i + 1, pair))
            .unwrap_or((fresh.lines().count().min(committed.lines().count()) + 1, ("<end>", "<end>")));
        panic!(
            "deploy/kubernetes/bulkhead.yaml is not the chart's current rendering: run \
             deploy/kubernetes/generate.sh and commit the result. First difference at line {line}:\n  \
             rendered:  {want}\n  committed: {got}"
        );
    }
    // What the plain manifests hold: the namespace first (kubectl applies in order),
    // then everything else in it.
    let objects = documents(&committed);
    assert_eq!(kind(&objects[0]), "Namespace");
    assert_eq!(name(&objects[0]), "bulkhead");
    let kinds: BTreeSet<&str> = objects.iter().map(kind).collect();
    for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "PersistentVolumeClaim", "Service", "Deployment"] {
        assert!(kinds.contains(k), "no {k} in the plain manifests");
    }
    assert_eq!(objects.iter().filter(|o| kind(o) == "DaemonSet").count(), 2);
}

// === offline schema validation ===

#[test]
fn every_rendered_object_passes_kubernetes_validate_strict() {
    let tool = venv_bin("kubernetes-validate");
    let dir = tempfile::tempdir().expect("tempdir");
    for case in CASES {
        let yaml = render(case, "bulkhead", "bulkhead");
        let file = dir.path().join(format!("{}.yaml", case.name));
        std::fs::write(&file, &yaml).expect("writes");
        let objects = documents(&yaml);
        for version in ["1.25.0", "1.37.0"] {
            let out = run(Command::new(&tool).args(["--strict", "-k", version]).arg(&file));
            let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
            assert!(out.status.success(), "kubernetes-validate {version} ({}) rejected:\n{all}", case.name);
            assert!(!all.contains("WARN") && !all.contains("ERROR"), "kubernetes-validate {version}:\n{all}");
            // It exits 0 on kinds it has no schema for: every object must be named.
            for obj in &objects {
                let passed = format!("passed for resource {}/{} ", kind(obj).to_lowercase(), name(obj));
                assert!(all.contains(&passed), "{} {}: not validated by {version}:\n{all}", kind(obj), name(obj));
            }
        }
    }
}

// === what the chart promises ===

#[test]
fn the_chart_keeps_its_security_promises() {
    for case in CASES {
        let objects = documents(&render(case, "bulkhead", "ns1"));
        let workloads = workloads(&objects);
        assert!(!workloads.is_empty());
        let watches_kubernetes = objects.iter().any(|o| kind(o) == "ClusterRole");
        for (component, w) in &workloads {
            let what = format!("{} ({})", name(w), case.name);
            let pod = pod_spec(w);
            assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{what}");
            assert_ne!(pod["hostNetwork"], true, "{what}: no host network namespace is needed");
            assert_ne!(pod["hostIPC"], true, "{what}");
            assert_eq!(pod["hostPID"] == true, *component == "collector", "{what}: hostPID is for the collector only");
            let agent = matches!(*component, "collector" | "enforcer");
            assert_eq!(
                pod["automountServiceAccountToken"] == true,
                *component == "learner" && watches_kubernetes,
                "{what}: only the learner talks to the API, and only to watch it"
            );
            for volume in pod["volumes"].as_array().into_iter().flatten() {
                assert!(agent || volume.get("hostPath").is_none(), "{what}: hostPath only for node agents");
            }
            let c = only_container(w);
            let sc = &c["securityContext"];
            assert_ne!(sc["privileged"], true, "{what}: nothing runs privileged");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(str_list(&sc["capabilities"]["drop"]), ["ALL"], "{what}");
            for kind in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    assert!(c["resources"][kind][res].is_string(), "{what}: resources.{kind}.{res}");
                }
            }
            let added: BTreeSet<&str> = str_list(&sc["capabilities"]["add"]).into_iter().collect();
            let want: BTreeSet<&str> = match *component {
                "collector" => COLLECTOR_CAPS.iter().chain(case.extra_caps).copied().collect(),
                "enforcer" => ENFORCER_CAPS.iter().chain(case.extra_caps).copied().collect(),
                _ => BTreeSet::new(),
            };
            assert_eq!(added, want, "{what}: capabilities");
            if agent {
                assert_eq!(sc["runAsUser"], 0, "{what}: root, for its capabilities");
            } else {
                assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
                assert!(pod["securityContext"]["runAsUser"].as_u64().is_some_and(|u| u != 0), "{what}");
                assert_eq!(sc["runAsNonRoot"], true, "{what}");
            }
            // Every mount has its volume.
            let claims = w["spec"]["volumeClaimTemplates"].as_array().into_iter().flatten();
            let volumes: BTreeSet<&str> = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["name"].as_str())
                .chain(claims.filter_map(|c| c["metadata"]["name"].as_str()))
                .collect();
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                assert!(volumes.contains(m["name"].as_str().unwrap_or_default()), "{what}: mount {m} has no volume");
            }
        }
    }
}

#[test]
fn agent_capabilities_are_the_systemd_units_capabilities() {
    let objects = documents(&render(&CASES[0], "bulkhead", "bulkhead"));
    for (agent, want) in [("collector", COLLECTOR_CAPS), ("enforcer", ENFORCER_CAPS)] {
        let unit = std::fs::read_to_string(repo().join(format!("deploy/systemd/bulkhead-{agent}.service")))
            .expect("reads the unit");
        let bounding: BTreeSet<&str> = unit
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .expect("CapabilityBoundingSet")
            .split_whitespace()
            .map(|c| c.strip_prefix("CAP_").unwrap_or(c))
            .collect();
        let ambient: BTreeSet<&str> = unit
            .lines()
            .find_map(|l| l.strip_prefix("AmbientCapabilities="))
            .expect("AmbientCapabilities")
            .split_whitespace()
            .map(|c| c.strip_prefix("CAP_").unwrap_or(c))
            .collect();
        let (_, ds) = workloads(&objects).into_iter().find(|(c, _)| *c == agent).expect("the agent's DaemonSet");
        let chart: BTreeSet<&str> =
            str_list(&only_container(ds)["securityContext"]["capabilities"]["add"]).into_iter().collect();
        let want: BTreeSet<&str> = want.iter().copied().collect();
        assert_eq!(bounding, want, "{agent}: systemd bounding set");
        assert_eq!(ambient, want, "{agent}: systemd ambient set");
        assert_eq!(chart, want, "{agent}: chart");
    }
}

#[test]
fn probes_metrics_and_the_learner_url_are_wired_to_real_ports() {
    for case in CASES {
        let ns = "ns1";
        let objects = documents(&render(case, "rel", ns));
        let workloads = workloads(&objects);
        let (_, learner) = workloads.iter().find(|(c, _)| *c == "learner").expect("the learner");
        let lc = only_container(learner);
        let service = objects
            .iter()
            .find(|o| kind(o) == "Service" && o["spec"]["selector"]["app.kubernetes.io/component"] == "learner")
            .expect("the learner's Service");
        // The Service selects the learner's pods.
        let pod_labels = &learner["spec"]["template"]["metadata"]["labels"];
        for (k, v) in service["spec"]["selector"].as_object().expect("selector") {
            assert_eq!(&pod_labels[k], v, "{}: selector {k}", case.name);
        }
        let service_port = |port: &str| {
            service["spec"]["ports"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["name"] == port))
                .unwrap_or_else(|| panic!("Service port {port}"))
                .clone()
        };
        // Ports: what the learner binds, what it declares, what the Service targets.
        let grpc = listen_port(flag(lc, "--grpc-listen").expect("--grpc-listen"));
        let http = listen_port(flag(lc, "--http-listen").expect("--http-listen"));
        assert_eq!(container_port(lc, "grpc"), u64::from(grpc));
        assert_eq!(container_port(lc, "http"), u64::from(http));
        assert_eq!(service_port("grpc")["targetPort"], "grpc");
        assert_eq!(service_port("http")["targetPort"], "http");
        // Prometheus scrapes the learner's own metrics listener, not the UI port.
        let metrics = listen_port(flag(lc, "--metrics-listen").expect("the learner's --metrics-listen"));
        let annotations = &learner["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{}: learner", case.name);
        assert_eq!(annotations["prometheus.io/port"], metrics.to_string(), "{}: learner", case.name);
        assert_eq!(annotations["prometheus.io/path"], "/metrics", "{}: learner", case.name);
        assert_eq!(container_port(lc, "metrics"), u64::from(metrics), "{}: learner", case.name);
        assert!(metrics != http && metrics != grpc, "{}: learner metrics on a port of their own", case.name);
        assert!(
            !flag(lc, "--metrics-listen").expect("listen").starts_with("127."),
            "{}: learner metrics must be reachable from outside the pod",
            case.name
        );
        // The learner's probes ask /healthz on its HTTP port (no gRPC probe: mTLS).
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(lc[probe]["httpGet"]["path"], "/healthz", "{}: learner {probe}", case.name);
            assert_eq!(lc[probe]["httpGet"]["port"], "http", "{}: learner {probe}", case.name);
        }
        if case.tls {
            for f in ["--tls-cert", "--tls-key", "--tls-client-ca"] {
                assert!(flag(lc, f).is_some_and(|p| p.starts_with("/etc/bulkhead/tls/")), "{}: learner {f}", case.name);
            }
            assert!(!has_flag(lc, "--insecure-grpc"));
        } else {
            assert!(has_flag(lc, "--insecure-grpc") && flag(lc, "--tls-cert").is_none(), "{}", case.name);
        }

        for (component, w) in workloads.iter().filter(|(c, _)| matches!(*c, "collector" | "enforcer")) {
            let what = format!("{} ({})", name(w), case.name);
            let c = only_container(w);
            // Prometheus scrapes the port the agent binds, on the path it serves.
            let annotations = &w["spec"]["template"]["metadata"]["annotations"];
            let metrics = listen_port(flag(c, "--metrics-listen").expect("--metrics-listen"));
            assert_eq!(annotations["prometheus.io/scrape"], "true", "{what}");
            assert_eq!(annotations["prometheus.io/port"], metrics.to_string(), "{what}");
            assert_eq!(annotations["prometheus.io/path"], "/metrics", "{what}");
            assert_eq!(container_port(c, "metrics"), u64::from(metrics), "{what}");
            let default = if *component == "collector" { 7401 } else { 7402 };
            assert_eq!(metrics, default, "{what}: the binary's default port");
            assert!(
                !flag(c, "--metrics-listen").expect("listen").starts_with("127."),
                "{what}: metrics must be reachable from outside the pod"
            );
            for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                assert_eq!(c[probe]["httpGet"]["path"], "/metrics", "{what}: {probe}");
                assert_eq!(c[probe]["httpGet"]["port"], "metrics", "{what}: {probe}");
            }
            // The learner URL names the Service, its gRPC port, and the scheme of the
            // transport in use.
            let scheme = if case.tls { "https" } else { "http" };
            let want = format!("{scheme}://{}.{ns}.svc:{}", name(service), service_port("grpc")["port"]);
            assert_eq!(flag(c, "--learner"), Some(want.as_str()), "{what}");
            // The node name comes from the pod's node.
            assert_eq!(flag(c, "--node-id"), Some("$(NODE_NAME)"), "{what}");
            let env = c["env"].as_array().expect("env");
            assert!(
                env.iter()
                    .any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
                "{what}"
            );
            if case.tls {
                let tls_mount = c["volumeMounts"]
                    .as_array()
                    .and_then(|ms| ms.iter().find(|m| m["name"] == "tls"))
                    .unwrap_or_else(|| panic!("{what}: no tls mount"));
                for f in ["--tls-cert", "--tls-key", "--tls-ca"] {
                    let path = flag(c, f).unwrap_or_else(|| panic!("{what}: {f}"));
                    assert!(path.starts_with(tls_mount["mountPath"].as_str().expect("path")), "{what}: {f}");
                }
            } else {
                assert!(has_flag(c, "--insecure-grpc") && flag(c, "--tls-cert").is_none(), "{what}");
            }
        }
    }
}

#[test]
fn per_node_certificates_pin_one_daemonset_to_each_node() {
    let case = CASES.iter().find(|c| c.name == "external-db-secret-per-node").expect("case");
    let objects = documents(&render(case, "rel", "ns1"));
    let nodes = ["node-a", "ip-10-0-0-1.eu-west-1.compute.internal"];
    for agent in ["collector", "enforcer"] {
        let sets: Vec<&Value> = workloads(&objects).into_iter().filter(|(c, _)| *c == agent).map(|(_, w)| w).collect();
        assert_eq!(sets.len(), nodes.len(), "{agent}: one DaemonSet per node");
        let mut selectors = BTreeSet::new();
        for node in nodes {
            let ds = sets
                .iter()
                .find(|w| w["metadata"]["annotations"]["bulkhead.io/node"] == node)
                .unwrap_or_else(|| panic!("{agent}: no DaemonSet for {node}"));
            let pod = pod_spec(ds);
            let term = &pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
                [0]["matchFields"][0];
            assert_eq!(term["key"], "metadata.name");
            assert_eq!(term["operator"], "In");
            assert_eq!(str_list(&term["values"]), [node]);
            let tls = pod["volumes"].as_array().and_then(|vs| vs.iter().find(|v| v["name"] == "tls")).expect("tls");
            assert_eq!(tls["secret"]["secretName"], format!("bulkhead-node-{node}"));
            let paths: Vec<&str> =
                tls["secret"]["items"].as_array().expect("items").iter().filter_map(|i| i["path"].as_str()).collect();
            assert_eq!(paths, ["node.crt", "node.key", "ca.crt"]);
            selectors.insert(ds["spec"]["selector"].to_string());
            assert!(name(ds).len() <= 63, "{}", name(ds));
        }
        assert_eq!(selectors.len(), nodes.len(), "{agent}: the DaemonSets' selectors must not overlap");
    }
}

#[test]
fn the_rendered_inventory_is_one_the_learner_loads() {
    let case = CASES.iter().find(|c| c.name == "postgresql-plaintext-inventory").expect("case");
    let objects = documents(&render(case, "rel", "ns1"));
    let cm = objects.iter().find(|o| kind(o) == "ConfigMap").expect("the inventory ConfigMap");
    let inventory = Inventory::parse(cm["data"]["inventory.yaml"].as_str().expect("inventory.yaml"))
        .expect("the learner accepts the inventory");
    let names: BTreeSet<&str> = inventory.workloads().iter().map(|w| w.name.as_str()).collect();
    assert!(names.contains("billing"), "{names:?}");
    let (_, learner) = workloads(&objects).into_iter().find(|(c, _)| *c == "learner").expect("learner");
    let c = only_container(learner);
    let path = flag(c, "--inventory").expect("--inventory");
    let mount =
        c["volumeMounts"].as_array().and_then(|ms| ms.iter().find(|m| m["name"] == "inventory")).expect("mount");
    assert_eq!(Path::new(path).parent(), Some(Path::new(mount["mountPath"].as_str().expect("path"))));
}

// === the learner's arguments, parsed by the real binary ===

/// Runs `bulkhead-learner ARGS --help`: clap parses (and checks the values of) every
/// argument before `--help` and stops there, so nothing starts.
fn learner_accepts(args: &[String], what: &str) {
    let out = run(Command::new(env!("CARGO_BIN_EXE_bulkhead-learner")).args(args).arg("--help"));
    assert!(out.status.success(), "bulkhead-learner refuses the arguments of {what}: {args:?}\n{}", text(&out.stderr));
}

#[test]
fn the_learner_accepts_every_argument_the_chart_and_unit_give_it() {
    for case in CASES {
        let objects = documents(&render(case, "rel", "ns1"));
        let (_, learner) = workloads(&objects).into_iter().find(|(c, _)| *c == "learner").expect("learner");
        let c = only_container(learner);
        assert_eq!(str_list(&c["command"]), ["bulkhead-learner"]);
        let args: Vec<String> = str_list(&c["args"]).into_iter().map(str::to_owned).collect();
        assert!(args.iter().all(|a| !a.contains("$(")), "the learner's args need no substitution");
        learner_accepts(&args, case.name);
        // The database URL for PostgreSQL arrives through the environment instead.
        let env = c["env"].as_array().map(|e| e.iter().filter_map(|v| v["name"].as_str()).collect::<Vec<_>>());
        assert_eq!(env.unwrap_or_default().contains(&"BULKHEAD_DB"), flag(c, "--db").is_none(), "{}", case.name);
    }
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/bulkhead-learner.service")).expect("unit");
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/bulkhead-learner"));
    // %d is systemd's credentials directory.
    let args: Vec<String> = words.map(|w| w.replace("%d", "/run/credentials/bulkhead-learner.service")).collect();
    learner_accepts(&args, "bulkhead-learner.service");
    // The unit's environment is the learner's too.
    for line in unit.lines().filter_map(|l| l.strip_prefix("Environment=")) {
        let (key, value) = line.split_once('=').expect("KEY=value");
        let out = run(Command::new(env!("CARGO_BIN_EXE_bulkhead-learner")).env(key, value).arg("--help"));
        assert!(out.status.success(), "{key}={value}: {}", text(&out.stderr));
        let help = text(&out.stdout);
        assert!(key == "BULKHEAD_LOG" || help.contains(&format!("[env: {key}=")), "{key} is not a learner variable");
    }
    // The commands NOTES.txt tells operators to run.
    let notes = std::fs::read_to_string(chart().join("templates/NOTES.txt")).expect("NOTES.txt");
    assert!(notes.contains("bulkhead-learner user add admin --role admin"));
    let out = run(Command::new(env!("CARGO_BIN_EXE_bulkhead-learner"))
        .args(["user", "add", "admin", "--role", "admin", "--help"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(Command::new(env!("CARGO_BIN_EXE_bulkhead-learner")).args(["user", "token", "admin", "--help"]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(Command::new(env!("CARGO_BIN_EXE_bulkhead")).args([
        "--server",
        "http://127.0.0.1:7480",
        "--token",
        "bht_x",
        "agents",
        "--help",
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
}

// === against a real API server ===

/// An admin client of `server` impersonating `user`.
async fn impersonating(server: &KubeApiServer, user: &str) -> Client {
    let mut kubeconfig = Kubeconfig::read_from(server.kubeconfig_path()).expect("reads the kubeconfig");
    for auth in &mut kubeconfig.auth_infos {
        if let Some(info) = auth.auth_info.as_mut() {
            info.impersonate = Some(user.to_owned());
        }
    }
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await.expect("config");
    Client::try_from(config).expect("client")
}

/// Server-side apply of `obj` (a dry run unless `for_real`); returns what the API
/// server made of it.
async fn apply(client: &Client, obj: &Value, for_real: bool) -> Result<Value, kube::Error> {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind(obj));
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("the API server does not serve {api_version} {}: {e}", kind(obj)));
    let api: Api<DynamicObject> = match caps.scope {
        kube::discovery::Scope::Namespaced => {
            let ns = obj["metadata"]["namespace"].as_str().unwrap_or_else(|| panic!("{} has no namespace", name(obj)));
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        kube::discovery::Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply("bulkhead-deploy-test").force();
    if !for_real {
        params = params.dry_run();
    }
    let got = api.patch(name(obj), &params, &Patch::Apply(obj)).await?;
    Ok(serde_json::to_value(got).expect("serializes"))
}

/// Fails where the API server's answer lacks something that was sent: v1.20 drops
/// fields it does not know without a word.
fn assert_kept(sent: &Value, got: &Value, path: &str) {
    match (sent, got) {
        (Value::Object(s), Value::Object(g)) => {
            for (k, v) in s {
                let child = format!("{path}.{k}");
                let Some(gv) = g.get(k) else { panic!("the API server dropped {child} = {v}") };
                assert_kept(v, gv, &child);
            }
        }
        (Value::Array(s), Value::Array(g)) => {
            assert_eq!(s.len(), g.len(), "{path}: list length changed");
            for (i, (sv, gv)) in s.iter().zip(g).enumerate() {
                assert_kept(sv, gv, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(sent, got, "{path} changed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_case_passes_a_server_side_dry_run_with_nothing_dropped() {
    let server = KubeApiServer::start().await;
    let client = server.client();
    for case in CASES {
        let ns = server.create_namespace("deploy", &[]).await;
        let objects = documents(&render(case, "bulkhead", &ns));
        for obj in &objects {
            let got = apply(&client, obj, false).await.unwrap_or_else(|e| {
                panic!("{} {} ({}): the API server refused the dry run: {e}\n{obj:#}", kind(obj), name(obj), case.name)
            });
            assert_kept(obj, &got, &format!("{}/{} ({})", kind(obj), name(obj), case.name));
        }
    }
    // The check bites: a field v1.20 does not know (gRPC probes came in 1.23) is
    // refused or dropped, and a bad value is refused.
    let ns = server.create_namespace("deploy-bad", &[]).await;
    let objects = documents(&render(&CASES[0], "bulkhead", &ns));
    let mut learner = objects.iter().find(|o| kind(o) == "Deployment").expect("learner").clone();
    learner["spec"]["template"]["spec"]["containers"][0]["livenessProbe"] = serde_json::json!({"grpc": {"port": 7400}});
    let dropped = match apply(&client, &learner, false).await {
        Err(_) => true,
        Ok(got) => std::panic::catch_unwind(|| assert_kept(&learner, &got, "learner")).is_err(),
    };
    assert!(dropped, "a gRPC probe went through v1.20 unnoticed");
    let mut collector = objects.iter().find(|o| kind(o) == "DaemonSet").expect("collector").clone();
    collector["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["type"] = "Dir".into();
    assert!(apply(&client, &collector, false).await.is_err(), "a bad hostPath type was accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_rbac_is_what_the_learner_watchers_need() {
    let server = KubeApiServer::start().await;
    let ns = server.create_namespace("rbac", &[]).await;
    let objects = documents(&render(&CASES[0], "bulkhead", &ns));
    let (_, learner) = workloads(&objects).into_iter().find(|(c, _)| *c == "learner").expect("learner");
    let account = pod_spec(learner)["serviceAccountName"].as_str().expect("serviceAccountName");
    let user = format!("system:serviceaccount:{ns}:{account}");
    let client = impersonating(&server, &user).await;

    // The learner's own watchers, as the chart's ServiceAccount: refused at first.
    let resolver = Arc::new(RwLock::new(Resolver::default()));
    let watchers = KubeWatchers::spawn(client.clone(), resolver);
    assert_eventually_async!(
        CONVERGE,
        async || watchers.status().pods.error.as_deref().is_some_and(|e| e.contains("forbidden")),
        "refused before the RBAC objects exist: {:?}",
        watchers.status()
    );

    // The chart's ServiceAccount, ClusterRole and binding make them healthy.
    let rbac: Vec<&Value> =
        objects.iter().filter(|o| matches!(kind(o), "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding")).collect();
    assert_eq!(rbac.len(), 4, "two ServiceAccounts, a ClusterRole and its binding");
    for obj in rbac {
        apply(&server.client(), obj, true).await.unwrap_or_else(|e| panic!("applying {}: {e}", name(obj)));
    }
    assert_eventually_async!(
        CONVERGE,
        async || watchers.status().healthy(),
        "healthy with the chart's RBAC: {:?}",
        watchers.status()
    );

    // And no more than that: no Secrets, no writes.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let err = secrets.list(&ListParams::default()).await.expect_err("listing Secrets must be forbidden");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let err = pods.delete_collection(&Default::default(), &ListParams::default()).await.expect_err("no writes");
    assert!(matches!(&err, kube::Error::Api(s) if s.code == 403), "{err}");
    watchers.abort();
}

// === certificates, as deploy/README.md makes them ===

#[test]
fn the_certificate_commands_of_the_readme_make_the_files_it_installs() {
    let readme = std::fs::read_to_string(repo().join("deploy/README.md")).expect("deploy/README.md");
    let pki = tempfile::tempdir().expect("tempdir");
    let dir = pki.path().join("pki");
    // Each `bulkhead certs …` line of the README, run as written (into a scratch pki/).
    let commands: Vec<Vec<&str>> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("bulkhead certs "))
        .map(|l| l.split_whitespace().take_while(|w| *w != "#").filter(|w| *w != "…").collect())
        .collect();
    assert_eq!(commands.len(), 3, "ca, learner, node");
    let mut san = None;
    for words in &commands {
        let args: Vec<&std::ffi::OsStr> =
            words.iter().map(|w| if *w == "pki" { dir.as_os_str() } else { std::ffi::OsStr::new(w) }).collect();
        let out = run(Command::new(env!("CARGO_BIN_EXE_bulkhead")).arg("certs").args(&args));
        assert!(out.status.success(), "bulkhead certs {words:?}: {}", text(&out.stderr));
        if let Some(i) = words.iter().position(|w| *w == "--san") {
            san = words.get(i + 1).copied();
        }
    }
    let san = san.expect("the README names the learner with --san");
    // The files the README's kubectl and install commands read.
    for file in ["ca.crt", "ca.key", "learner.crt", "learner.key", "node-node-a.crt", "node-node-a.key"] {
        assert!(dir.join(file).is_file(), "bulkhead certs wrote no {file}");
        if file == "ca.key" {
            continue;
        }
        let reference = format!("pki/{}", file.replace("node-a", "NODE"));
        assert!(readme.contains(&reference), "deploy/README.md does not use {reference}");
    }
    // The learner's default certificate names the host the chart's agents dial.
    let objects = documents(&render(&CASES[0], "bulkhead", "bulkhead"));
    let (_, collector) = workloads(&objects).into_iter().find(|(c, _)| *c == "collector").expect("collector");
    let url = flag(only_container(collector), "--learner").expect("--learner");
    assert!(url.starts_with(&format!("https://{san}:")), "{url} vs the README's --san {san}");
}

// === systemd ===

/// Where the distribution keeps its unit files (`sysinit.target` and friends).
fn system_unit_dir() -> PathBuf {
    ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("sysinit.target").is_file())
        .expect("no systemd unit directory with sysinit.target (Debian package `systemd`)")
}

/// `systemd-analyze verify` of `unit` in a scratch root holding the distribution's
/// units and an executable at every `ExecStart` path (it checks that they exist).
/// Returns (success, everything it printed).
fn verify_unit(unit_name: &str, unit: &str) -> (bool, String) {
    let root = tempfile::tempdir().expect("tempdir");
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).expect("mkdir");
    for entry in std::fs::read_dir(system_unit_dir()).expect("reads unit dir").flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::copy(&path, units.join(entry.file_name())).expect("copies a unit");
        }
    }
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).expect("mkdir");
    std::fs::write(etc.join(unit_name), unit).expect("writes the unit");
    for exec in unit.lines().filter_map(|l| l.strip_prefix("ExecStart=")) {
        let bin = root.path().join(exec.split_whitespace().next().expect("a command").trim_start_matches('/'));
        std::fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
        std::fs::write(&bin, "#!/bin/sh\n").expect("writes a stand-in");
        std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    }
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .args(["--man=no", "--generators=no"])
        .arg(etc.join(unit_name)));
    (out.status.success(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

#[test]
fn the_systemd_units_verify() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("deploy/systemd")).expect("deploy/systemd").flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if !file_name.ends_with(".service") {
            continue;
        }
        let unit = std::fs::read_to_string(entry.path()).expect("reads");
        let (ok, said) = verify_unit(&file_name, &unit);
        // It exits 0 on unknown keys and unparsable values and only prints them.
        assert!(ok && said.trim().is_empty(), "systemd-analyze verify {file_name}:\n{said}");
        seen += 1;
    }
    assert_eq!(seen, 3, "learner, collector and enforcer units");

    // The check bites: a misspelt key, a bad value and a missing binary are reported.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/bulkhead-learner.service")).expect("reads");
    let (_, said) = verify_unit("bad.service", &unit.replace("NoNewPrivileges=", "NoNewPrivilege="));
    assert!(said.contains("Unknown key"), "{said}");
    let (_, said) = verify_unit("bad.service", &unit.replace("Restart=on-failure", "Restart=sometimes"));
    assert!(said.contains("Failed to parse"), "{said}");
    let missing = unit.replace("ExecStart=/usr/local/bin/", "ExecStartPre=/nonexistent/x\nExecStart=/usr/local/bin/");
    let (ok, said) = verify_unit("bad.service", &missing);
    assert!(!ok && said.contains("/nonexistent/x"), "{said}");
}

// === container build ===

#[test]
fn the_dockerfile_passes_hadolint_and_builds_what_the_chart_runs() {
    let dockerfile = repo().join("deploy/container/Dockerfile");
    let hadolint = venv_bin("hadolint");
    let out = run(Command::new(&hadolint).arg(&dockerfile));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "hadolint:\n{said}");

    // hadolint bites: shell mistakes in RUN (ShellCheck) and unknown instructions.
    let text_of = std::fs::read_to_string(&dockerfile).expect("reads the Dockerfile");
    let dir = tempfile::tempdir().expect("tempdir");
    for (bad, finding) in
        [(format!("{text_of}RUN cp $SRC /tmp\n"), "SC2086"), (format!("{text_of}FROBNICATE true\n"), "unexpected")]
    {
        let file = dir.path().join("Dockerfile");
        std::fs::write(&file, bad).expect("writes");
        let out = run(Command::new(&hadolint).arg(&file));
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!out.status.success() && said.contains(finding), "hadolint missed {finding}:\n{said}");
    }

    // Instructions, with continuation lines joined.
    let joined = text_of.replace("\\\n", " ");
    let lines: Vec<&str> = joined.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let arg = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("ARG {name}=")))
            .unwrap_or_else(|| panic!("no ARG {name}=… in the Dockerfile"))
            .to_owned()
    };
    // The toolchain set-up uses: bpf-linker's release and the workspace's Rust.
    let setup = std::fs::read_to_string(repo().join("xtask/src/setup.rs")).expect("setup.rs");
    let linker = setup
        .lines()
        .find_map(|l| l.strip_prefix("pub const BPF_LINKER_VERSION: &str = \""))
        .and_then(|l| l.strip_suffix("\";"))
        .expect("BPF_LINKER_VERSION in setup.rs");
    assert_eq!(arg("BPF_LINKER_VERSION"), linker);
    let workspace = std::fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    let rust = workspace
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("rust-version");
    assert!(arg("RUST_VERSION").starts_with(&format!("{rust}.")), "RUST_VERSION vs rust-version {rust}");
    assert!(joined.contains("rustup component add rust-src"), "the eBPF build needs rust-src");
    let build = lines.iter().find(|l| l.contains("cargo build --release --locked")).expect("a release build");
    for package in ["bulkhead-learner", "bulkhead-collector", "bulkhead-enforcer"] {
        assert!(build.contains(&format!("-p {package}")), "the build leaves out {package}");
    }

    // The last stage: non-root by default, with every binary the chart starts.
    let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).expect("FROM");
    let runtime = &lines[last_from..];
    assert!(runtime[0].contains("debian:"), "nsenter comes from Debian's util-linux: {}", runtime[0]);
    let user = runtime.iter().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER in the runtime stage");
    assert!(!user.starts_with('0') && !user.starts_with("root"), "USER {user}");
    let copied: BTreeSet<&str> =
        ["bulkhead-learner", "bulkhead", "bulkhead-collector", "bulkhead-enforcer"].into_iter().collect();
    let loop_line = lines.iter().find(|l| l.contains("for bin in")).expect("the copy loop");
    for bin in &copied {
        assert!(loop_line.split_whitespace().any(|w| w == *bin), "{bin} is not copied into the image");
    }
    assert!(runtime.iter().any(|l| l.starts_with("COPY --from=build /out/ /usr/local/bin/")));
    for case in CASES {
        for (_, w) in workloads(&documents(&render(case, "rel", "ns1"))) {
            let command = str_list(&only_container(w)["command"]);
            let program = command.first().copied().unwrap_or_default();
            if program == "nsenter" {
                assert!(command.iter().any(|w| copied.contains(w)), "{command:?}");
            } else if !program.is_empty() {
                assert!(copied.contains(program), "the chart runs {program}, which the image lacks");
            }
        }
    }

    // The build context leaves out what must not be sent.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    let ignored: BTreeSet<&str> = ignore.lines().map(str::trim).collect();
    for entry in [".git", "target"] {
        assert!(ignored.contains(entry), ".dockerignore must leave out {entry}");
    }
}
