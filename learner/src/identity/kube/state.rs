//! The learner's view of a Kubernetes cluster as a pure state machine: watcher events
//! for Pods, Namespaces, Services and NetworkPolicies go in ([`KubeSnapshot::apply_pod`]
//! and friends), lookups come out — pod IP → [`Subject`], pod UID (as found in a
//! cgroup path) → [`Subject`], which identities back which Services, and the current
//! NetworkPolicy objects. No I/O, so every rule is unit-tested with constructed events;
//! the watch tasks in [`super`] only feed it.
//!
//! Identity labels of a pod (the security-relevant label set; key names follow Cilium
//! so that exported CiliumNetworkPolicies select the same pods):
//! * every pod label except the instance-unique ones in [`INSTANCE_UNIQUE_LABELS`]
//!   (replicas must share one identity) and except keys reserved for the labels below
//!   ([`is_reserved_key`]: a pod must not be able to claim another namespace);
//! * [`NAMESPACE_KEY`] = the pod's namespace;
//! * [`SERVICE_ACCOUNT_KEY`] = its service account;
//! * each label of its namespace as [`NAMESPACE_LABELS_PREFIX`]`<key>`, except
//!   `kubernetes.io/metadata.name` (the namespace name, already above).
//!
//! Label values are attacker-controlled (anyone who may create a pod names it) and are
//! kept verbatim; [`Labels::new`] bounds their size. A pod whose label set is refused
//! gets no identity (its flows stay `unmanaged`/`world`) rather than a truncated one:
//! dropping a label could merge two workloads that policy must tell apart.
//!
//! Addresses: a pod owns the addresses in `status.podIPs` while it runs. Pods with
//! `hostNetwork` report the node's address, which must stay the host's, so they own
//! none (their UID still names their processes by cgroup). Finished pods (`Succeeded`,
//! `Failed`) own none: the address is free for reuse. When several pods claim one
//! address (a new pod reusing the address of one still terminating), a pod that is not
//! terminating wins over one that is, then the newest, then the greater name — an
//! address reused by a new pod moves to it, whatever order the events came in.
//!
//! Until the initial lists of both Pods and Namespaces are complete, the view answers
//! nothing ([`KubeSnapshot::is_ready`]): a pod seen before its namespace would
//! otherwise get a label set without the namespace's labels, and identities are
//! persisted. For the same reason a pod whose namespace is unknown has no identity.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use bulkhead_model::labels::NAMESPACE_KEY;
use bulkhead_model::{LabelError, Labels};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::Event;
use serde::Serialize;

use crate::identity::resolver::Subject;

/// Pod labels that differ between replicas of one workload and so must not be part of
/// its identity: with them every pod would get an identity of its own and no rule
/// written for one replica would cover the next.
///
/// * `pod-template-hash` — Deployment → ReplicaSet template hash;
/// * `controller-revision-hash` — StatefulSet/DaemonSet revision;
/// * `statefulset.kubernetes.io/pod-name` — one value per StatefulSet pod;
/// * `pod-template-generation` — DaemonSet template generation (legacy);
/// * `apps.kubernetes.io/pod-index` — StatefulSet ordinal (1.28+);
/// * `batch.kubernetes.io/controller-uid`, `controller-uid` — one value per Job run;
/// * `batch.kubernetes.io/job-name`, `job-name` — one value per Job run (CronJobs
///   create a new Job name every time).
pub const INSTANCE_UNIQUE_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "pod-template-generation",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
    "batch.kubernetes.io/job-name",
    "job-name",
];

/// Identity label holding the pod's service account (Cilium's key).
pub const SERVICE_ACCOUNT_KEY: &str = "io.cilium.k8s.policy.serviceaccount";

/// Prefix of identity labels copied from the pod's namespace (Cilium's key).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";

/// Label every namespace carries since Kubernetes 1.21; it repeats the namespace name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Prefix of Cilium's policy-relevant keys (service account, cluster); pods may not set
/// them themselves.
const CILIUM_POLICY_PREFIX: &str = "io.cilium.k8s.policy.";

/// Service account a pod runs as when its spec names none (what the API server fills
/// in).
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Whether a pod label key is reserved for labels the learner derives itself. Such pod
/// labels are dropped: a pod labelled `io.kubernetes.pod.namespace: kube-system` must
/// not share an identity with kube-system's pods.
pub fn is_reserved_key(key: &str) -> bool {
    key == NAMESPACE_KEY || key.starts_with(NAMESPACE_LABELS_PREFIX) || key.starts_with(CILIUM_POLICY_PREFIX)
}

/// The identity label set of a pod (see the module docs for the rules).
pub fn identity_labels(
    pod_labels: &BTreeMap<String, String>,
    namespace: &str,
    service_account: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<Labels, LabelError> {
    let own = pod_labels
        .iter()
        .filter(|(k, _)| !INSTANCE_UNIQUE_LABELS.contains(&k.as_str()) && !is_reserved_key(k))
        .map(|(k, v)| (k.clone(), v.clone()));
    let ns = namespace_labels
        .iter()
        .filter(|(k, _)| k.as_str() != NAMESPACE_NAME_LABEL)
        .map(|(k, v)| (format!("{NAMESPACE_LABELS_PREFIX}{k}"), v.clone()));
    let derived = [
        (NAMESPACE_KEY.to_owned(), namespace.to_owned()),
        (SERVICE_ACCOUNT_KEY.to_owned(), service_account.to_owned()),
    ];
    Labels::new(own.chain(ns).chain(derived))
}

/// The workload a pod belongs to, as `namespace/name`: the Deployment for a
/// ReplicaSet's pod (the ReplicaSet name minus its `-<pod-template-hash>`), the
/// StatefulSet/DaemonSet/Job/other controller otherwise, the pod itself when it has no
/// controller (bare and static pods). A display name only: identity is the label set.
pub fn workload_name(
    namespace: &str,
    pod_name: &str,
    pod_labels: &BTreeMap<String, String>,
    owners: &[OwnerReference],
) -> String {
    let owner = owners.iter().find(|o| o.controller == Some(true)).or_else(|| owners.first());
    let base = match owner {
        // Static pods are "owned" by their node; the pod name says more.
        None => pod_name,
        Some(o) if o.kind == "Node" || o.name.is_empty() => pod_name,
        Some(o) if o.kind == "ReplicaSet" => pod_labels
            .get("pod-template-hash")
            .and_then(|hash| o.name.strip_suffix(hash.as_str()))
            .and_then(|rest| rest.strip_suffix('-'))
            .filter(|deployment| !deployment.is_empty())
            .unwrap_or(&o.name),
        Some(o) => &o.name,
    };
    format!("{namespace}/{base}")
}

/// The pod UID in a cgroup path written by the kubelet, normalised to the API's form
/// (lowercase, dashes). Both cgroup drivers are understood:
/// `/kubepods/burstable/pod<uid>/<container>` (cgroupfs) and
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice/…`
/// (systemd). Paths outside a `kubepods` hierarchy name no pod.
pub fn pod_uid_from_cgroup(path: &str) -> Option<String> {
    if !path.contains("kubepods") {
        return None;
    }
    path.split('/').find_map(|component| {
        let component = component.strip_suffix(".slice").unwrap_or(component);
        let at = component.rfind("pod")?;
        normalise_uid(&component[at + 3..])
    })
}

/// `8-4-4-4-12` hex digits separated by `-` or `_`, lowercased with dashes.
fn normalise_uid(s: &str) -> Option<String> {
    const DASHES: [usize; 4] = [8, 13, 18, 23];
    if s.len() != 36 {
        return None;
    }
    let ok =
        s.char_indices().all(|(i, c)| if DASHES.contains(&i) { c == '-' || c == '_' } else { c.is_ascii_hexdigit() });
    ok.then(|| s.replace('_', "-").to_ascii_lowercase())
}

// === keys and kinds ===

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The kinds the learner watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubeKind {
    Pods,
    Namespaces,
    Services,
    NetworkPolicies,
}

impl KubeKind {
    pub const ALL: [KubeKind; 4] =
        [KubeKind::Pods, KubeKind::Namespaces, KubeKind::Services, KubeKind::NetworkPolicies];

    /// The API resource name (`pods`, …), as RBAC rules spell it.
    pub fn resource(self) -> &'static str {
        match self {
            KubeKind::Pods => "pods",
            KubeKind::Namespaces => "namespaces",
            KubeKind::Services => "services",
            KubeKind::NetworkPolicies => "networkpolicies",
        }
    }

    /// The API group (`""` for the core group), as RBAC rules spell it.
    pub fn api_group(self) -> &'static str {
        match self {
            KubeKind::NetworkPolicies => "networking.k8s.io",
            _ => "",
        }
    }
}

impl fmt::Display for KubeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.resource())
    }
}

// === objects ===

/// What the learner keeps of one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubePod {
    pub key: ObjectKey,
    /// Normalised UID (lowercase, dashes).
    pub uid: String,
    /// `namespace/workload` (see [`workload_name`]).
    pub workload: String,
    /// All labels as written on the pod (Service selectors match these).
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub host_network: bool,
    /// Addresses this pod claims (none for host-network or finished pods).
    pub ips: Vec<IpAddr>,
    terminating: bool,
    created: Option<Timestamp>,
    /// The pod's identity; `None` while its namespace is unknown or when its labels
    /// were refused.
    subject: Option<Subject>,
}

impl KubePod {
    /// Extracts what matters from a Pod object; `None` when it has no name/namespace.
    pub fn from_pod(pod: &Pod) -> Option<KubePod> {
        let meta = &pod.metadata;
        let key = ObjectKey { namespace: meta.namespace.clone()?, name: meta.name.clone()? };
        let labels = meta.labels.clone().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        // Older API servers may only fill the deprecated `serviceAccount` field.
        let service_account = spec
            .and_then(|s| s.service_account_name.clone().or_else(|| s.service_account.clone()))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
        let status = pod.status.as_ref();
        let finished = matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        let ips = if host_network || finished { Vec::new() } else { status.map(pod_ips).unwrap_or_default() };
        let workload =
            workload_name(&key.namespace, &key.name, &labels, meta.owner_references.as_deref().unwrap_or_default());
        Some(KubePod {
            uid: meta.uid.as_deref().map(|u| u.replace('_', "-").to_ascii_lowercase()).unwrap_or_default(),
            workload,
            labels,
            service_account,
            host_network,
            ips,
            terminating: meta.deletion_timestamp.is_some(),
            created: meta.creation_timestamp.as_ref().map(|t| t.0),
            subject: None,
            key,
        })
    }

    /// The pod's identity; `None` while its namespace is unknown or when its labels
    /// were refused.
    pub fn subject(&self) -> Option<&Subject> {
        self.subject.as_ref()
    }

    /// Recomputes the identity for the namespace's current labels (`None`: unknown).
    fn derive_subject(&mut self, namespace_labels: Option<&BTreeMap<String, String>>) {
        self.subject = namespace_labels.and_then(|ns_labels| {
            match identity_labels(&self.labels, &self.key.namespace, &self.service_account, ns_labels) {
                Ok(labels) => Some(Subject::Workload { name: self.workload.clone(), labels }),
                Err(error) => {
                    tracing::warn!(pod = %self.key, %error, "Refused the pod's labels; it gets no identity.");
                    None
                }
            }
        });
    }

    /// Rank among pods claiming one address: the greatest wins.
    fn claim_rank(&self) -> (bool, Option<Timestamp>, &ObjectKey) {
        (!self.terminating, self.created, &self.key)
    }
}

/// `status.podIPs` (or the older `status.podIP`), parsed; unparsable entries are
/// ignored.
fn pod_ips(status: &k8s_openapi::api::core::v1::PodStatus) -> Vec<IpAddr> {
    let listed: Vec<&str> = match &status.pod_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(|p| p.ip.as_str()).collect(),
        _ => status.pod_ip.as_deref().into_iter().collect(),
    };
    let mut ips: Vec<IpAddr> = listed.into_iter().filter_map(|s| s.trim().parse().ok()).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubeServicePort {
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// What the learner keeps of one Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KubeService {
    pub key: ObjectKey,
    /// `None` or empty: no selector (endpoints are managed by hand), backed by no pod.
    pub selector: Option<BTreeMap<String, String>>,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<KubeServicePort>,
}

impl KubeService {
    pub fn from_service(svc: &Service) -> Option<KubeService> {
        let key = ObjectKey { namespace: svc.metadata.namespace.clone()?, name: svc.metadata.name.clone()? };
        let spec = svc.spec.as_ref();
        let mut cluster_ips: Vec<IpAddr> = spec
            .map(|s| match &s.cluster_ips {
                Some(ips) if !ips.is_empty() => ips.clone(),
                _ => s.cluster_ip.clone().into_iter().collect(),
            })
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        cluster_ips.sort();
        cluster_ips.dedup();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some(KubeServicePort {
                            port: u16::try_from(p.port).ok()?,
                            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(KubeService { key, selector: spec.and_then(|s| s.selector.clone()), cluster_ips, ports })
    }

    /// Whether this Service selects the pod (same namespace, every selector pair
    /// present). A Service without selector selects nothing.
    pub fn selects(&self, pod: &KubePod) -> bool {
        match &self.selector {
            Some(sel) if !sel.is_empty() => {
                pod.key.namespace == self.key.namespace && sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
            }
            _ => false,
        }
    }
}

// === the snapshot ===

/// Objects listed since the last `Init`, waiting for `InitDone` to replace the kind's
/// whole set at once (objects absent from a re-list were deleted meanwhile).
#[derive(Debug, Clone, Default)]
struct InitBuffers {
    pods: Option<Vec<KubePod>>,
    namespaces: Option<Vec<(String, BTreeMap<String, String>)>>,
    services: Option<Vec<KubeService>>,
    network_policies: Option<Vec<(ObjectKey, NetworkPolicy)>>,
}

/// The cluster as far as identities are concerned. See the module docs.
#[derive(Debug, Clone, Default)]
pub struct KubeSnapshot {
    pods: HashMap<ObjectKey, KubePod>,
    /// Namespace → its labels.
    namespaces: HashMap<String, BTreeMap<String, String>>,
    services: BTreeMap<ObjectKey, KubeService>,
    network_policies: BTreeMap<ObjectKey, NetworkPolicy>,
    /// Address → every pod claiming it.
    ip_claims: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Address → the winning claim.
    by_ip: HashMap<IpAddr, ObjectKey>,
    by_uid: HashMap<String, ObjectKey>,
    init: InitBuffers,
    synced: BTreeSet<KubeKind>,
    generation: u64,
}

impl KubeSnapshot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Both Pods and Namespaces have been listed completely at least once; before
    /// that, the lookups answer nothing.
    pub fn is_ready(&self) -> bool {
        self.synced.contains(&KubeKind::Pods) && self.synced.contains(&KubeKind::Namespaces)
    }

    /// Whether the kind's initial list has completed at least once.
    pub fn is_synced(&self, kind: KubeKind) -> bool {
        self.synced.contains(&kind)
    }

    /// Counts applied events; changes whenever the view may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    // --- events ---

    pub fn apply_pod(&mut self, event: Event<Pod>) {
        self.generation += 1;
        match event {
            Event::Init => self.init.pods = Some(Vec::new()),
            Event::InitApply(pod) => match (&mut self.init.pods, KubePod::from_pod(&pod)) {
                (Some(buffer), Some(p)) => buffer.push(p),
                (None, Some(p)) => self.upsert_pod(p),
                (_, None) => {}
            },
            Event::InitDone => {
                if let Some(listed) = self.init.pods.take() {
                    self.pods.clear();
                    for mut p in listed {
                        p.derive_subject(self.namespaces.get(&p.key.namespace));
                        self.pods.insert(p.key.clone(), p);
                    }
                    self.rebuild_pod_indexes();
                }
                self.synced.insert(KubeKind::Pods);
            }
            Event::Apply(pod) => {
                if let Some(p) = KubePod::from_pod(&pod) {
                    self.upsert_pod(p);
                }
            }
            Event::Delete(pod) => {
                if let Some(p) = KubePod::from_pod(&pod) {
                    self.remove_pod(&p.key);
                }
            }
        }
    }

    pub fn apply_namespace(&mut self, event: Event<Namespace>) {
        self.generation += 1;
        let entry = |ns: &Namespace| Some((ns.metadata.name.clone()?, ns.metadata.labels.clone().unwrap_or_default()));
        match event {
            Event::Init => self.init.namespaces = Some(Vec::new()),
            Event::InitApply(ns) => match (&mut self.init.namespaces, entry(&ns)) {
                (Some(buffer), Some(e)) => buffer.push(e),
                (None, Some((name, labels))) => self.upsert_namespace(name, labels),
                (_, None) => {}
            },
            Event::InitDone => {
                if let Some(listed) = self.init.namespaces.take() {
                    self.namespaces = listed.into_iter().collect();
                    let namespaces = &self.namespaces;
                    for p in self.pods.values_mut() {
                        p.derive_subject(namespaces.get(&p.key.namespace));
                    }
                }
                self.synced.insert(KubeKind::Namespaces);
            }
            Event::Apply(ns) => {
                if let Some((name, labels)) = entry(&ns) {
                    self.upsert_namespace(name, labels);
                }
            }
            Event::Delete(ns) => {
                if let Some((name, _)) = entry(&ns)
                    && self.namespaces.remove(&name).is_some()
                {
                    self.rederive_namespace(&name);
                }
            }
        }
    }

    pub fn apply_service(&mut self, event: Event<Service>) {
        self.generation += 1;
        match event {
            Event::Init => self.init.services = Some(Vec::new()),
            Event::InitApply(svc) => match (&mut self.init.services, KubeService::from_service(&svc)) {
                (Some(buffer), Some(s)) => buffer.push(s),
                (None, Some(s)) => {
                    self.services.insert(s.key.clone(), s);
                }
                (_, None) => {}
            },
            Event::InitDone => {
                if let Some(listed) = self.init.services.take() {
                    self.services = listed.into_iter().map(|s| (s.key.clone(), s)).collect();
                }
                self.synced.insert(KubeKind::Services);
            }
            Event::Apply(svc) => {
                if let Some(s) = KubeService::from_service(&svc) {
                    self.services.insert(s.key.clone(), s);
                }
            }
            Event::Delete(svc) => {
                if let Some(s) = KubeService::from_service(&svc) {
                    self.services.remove(&s.key);
                }
            }
        }
    }

    pub fn apply_network_policy(&mut self, event: Event<NetworkPolicy>) {
        self.generation += 1;
        let entry = |mut np: NetworkPolicy| {
            let key = ObjectKey { namespace: np.metadata.namespace.clone()?, name: np.metadata.name.clone()? };
            // Bookkeeping of server-side apply; large and irrelevant to the policy.
            np.metadata.managed_fields = None;
            Some((key, np))
        };
        match event {
            Event::Init => self.init.network_policies = Some(Vec::new()),
            Event::InitApply(np) => match (&mut self.init.network_policies, entry(np)) {
                (Some(buffer), Some(e)) => buffer.push(e),
                (None, Some((key, np))) => {
                    self.network_policies.insert(key, np);
                }
                (_, None) => {}
            },
            Event::InitDone => {
                if let Some(listed) = self.init.network_policies.take() {
                    self.network_policies = listed.into_iter().collect();
                }
                self.synced.insert(KubeKind::NetworkPolicies);
            }
            Event::Apply(np) => {
                if let Some((key, np)) = entry(np) {
                    self.network_policies.insert(key, np);
                }
            }
            Event::Delete(np) => {
                if let Some((key, _)) = entry(np) {
                    self.network_policies.remove(&key);
                }
            }
        }
    }

    // --- lookups for resolution (answer only when ready) ---

    /// The identity of the pod owning `ip`.
    pub fn subject_by_ip(&self, ip: IpAddr) -> Option<(&KubePod, &Subject)> {
        self.ready_pod(self.by_ip.get(&ip)?)
    }

    /// The identity of the pod with this UID (any case, dashes or underscores).
    pub fn subject_by_uid(&self, uid: &str) -> Option<(&KubePod, &Subject)> {
        let uid = normalise_uid(uid)?;
        self.ready_pod(self.by_uid.get(&uid)?)
    }

    /// The identity of the pod whose cgroup `path` is (see [`pod_uid_from_cgroup`]).
    pub fn subject_by_cgroup(&self, path: &str) -> Option<(&KubePod, &Subject)> {
        self.subject_by_uid(&pod_uid_from_cgroup(path)?)
    }

    fn ready_pod(&self, key: &ObjectKey) -> Option<(&KubePod, &Subject)> {
        if !self.is_ready() {
            return None;
        }
        let pod = self.pods.get(key)?;
        Some((pod, pod.subject.as_ref()?))
    }

    // --- accessors (raw state, whether ready or not) ---

    pub fn pod(&self, key: &ObjectKey) -> Option<&KubePod> {
        self.pods.get(key)
    }

    /// The pod owning `ip` (the winning claim), identity or not.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&KubePod> {
        self.pods.get(self.by_ip.get(&ip)?)
    }

    /// Every known pod, in no particular order.
    pub fn pods(&self) -> impl Iterator<Item = &KubePod> {
        self.pods.values()
    }

    /// Addresses and the pod each resolves to.
    pub fn pod_addresses(&self) -> impl Iterator<Item = (IpAddr, &KubePod)> {
        self.by_ip.iter().filter_map(|(ip, key)| Some((*ip, self.pods.get(key)?)))
    }

    /// Every known namespace with its labels, in no particular order.
    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &BTreeMap<String, String>)> {
        self.namespaces.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Labels of a namespace, `None` when it is unknown.
    pub fn namespace_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(name)
    }

    /// Services, sorted by namespace and name.
    pub fn services(&self) -> impl Iterator<Item = &KubeService> {
        self.services.values()
    }

    /// The current NetworkPolicy objects (without `managedFields`), sorted by namespace
    /// and name: what the cluster enforces today, for import next to learned proposals.
    pub fn network_policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.network_policies.values()
    }

    /// The identity label sets of the pods each Service selects, for every Service.
    pub fn service_backends(&self) -> BTreeMap<&ObjectKey, BTreeSet<&Labels>> {
        let mut out: BTreeMap<&ObjectKey, BTreeSet<&Labels>> =
            self.services.values().map(|s| (&s.key, BTreeSet::new())).collect();
        for pod in self.pods.values() {
            let Some(Subject::Workload { labels, .. }) = &pod.subject else { continue };
            for svc in self.services.values().filter(|s| s.selects(pod)) {
                out.entry(&svc.key).or_default().insert(labels);
            }
        }
        out
    }

    /// The Services some pod with this identity backs (synthesis flags such
    /// identities: they are meant to be reached).
    pub fn services_backed_by(&self, identity: &Labels) -> Vec<&KubeService> {
        let pods: Vec<&KubePod> = self
            .pods
            .values()
            .filter(|p| matches!(&p.subject, Some(Subject::Workload { labels, .. }) if labels == identity))
            .collect();
        self.services.values().filter(|s| pods.iter().any(|p| s.selects(p))).collect()
    }

    // --- internals ---

    fn upsert_namespace(&mut self, name: String, labels: BTreeMap<String, String>) {
        if self.namespaces.get(&name) == Some(&labels) {
            return;
        }
        self.namespaces.insert(name.clone(), labels);
        self.rederive_namespace(&name);
    }

    fn rederive_namespace(&mut self, name: &str) {
        let ns_labels = self.namespaces.get(name);
        for p in self.pods.values_mut().filter(|p| p.key.namespace == name) {
            p.derive_subject(ns_labels);
        }
    }

    fn upsert_pod(&mut self, mut pod: KubePod) {
        pod.derive_subject(self.namespaces.get(&pod.key.namespace));
        let key = pod.key.clone();
        let old_ips = self.unindex_pod(&key);
        if !pod.uid.is_empty() {
            self.by_uid.insert(pod.uid.clone(), key.clone());
        }
        for ip in &pod.ips {
            self.ip_claims.entry(*ip).or_default().insert(key.clone());
        }
        let touched: BTreeSet<IpAddr> = old_ips.into_iter().chain(pod.ips.iter().copied()).collect();
        self.pods.insert(key, pod);
        for ip in touched {
            self.elect(ip);
        }
    }

    fn remove_pod(&mut self, key: &ObjectKey) {
        let old_ips = self.unindex_pod(key);
        self.pods.remove(key);
        for ip in old_ips {
            self.elect(ip);
        }
    }

    /// Drops a pod's UID and address claims; returns the addresses it claimed.
    fn unindex_pod(&mut self, key: &ObjectKey) -> Vec<IpAddr> {
        let Some(old) = self.pods.get(key) else { return Vec::new() };
        if self.by_uid.get(&old.uid) == Some(key) {
            self.by_uid.remove(&old.uid);
        }
        for ip in &old.ips {
            if let Some(claims) = self.ip_claims.get_mut(ip) {
                claims.remove(key);
                if claims.is_empty() {
                    self.ip_claims.remove(ip);
                }
            }
        }
        old.ips.clone()
    }

    /// Picks the owner of one address among its claims.
    fn elect(&mut self, ip: IpAddr) {
        let pods = &self.pods;
        let winner = self
            .ip_claims
            .get(&ip)
            .and_then(|claims| {
                claims.iter().filter_map(|k| pods.get(k)).max_by(|a, b| a.claim_rank().cmp(&b.claim_rank()))
            })
            .map(|p| p.key.clone());
        match winner {
            Some(k) => self.by_ip.insert(ip, k),
            None => self.by_ip.remove(&ip),
        };
    }

    fn rebuild_pod_indexes(&mut self) {
        self.ip_claims.clear();
        self.by_ip.clear();
        self.by_uid.clear();
        for p in self.pods.values() {
            if !p.uid.is_empty() {
                self.by_uid.insert(p.uid.clone(), p.key.clone());
            }
            for ip in &p.ips {
                self.ip_claims.entry(*ip).or_default().insert(p.key.clone());
            }
        }
        let ips: Vec<IpAddr> = self.ip_claims.keys().copied().collect();
        for ip in ips {
            self.elect(ip);
        }
    }
}
