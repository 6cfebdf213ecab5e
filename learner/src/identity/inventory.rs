//! The inventory file: labels for workloads that no orchestrator describes (plain
//! hosts, docker compose, network namespaces). It maps network namespaces, cgroup
//! paths, process names, IPs and CIDRs to label sets.
//!
//! ```yaml
//! workloads:
//!   - name: deathstar
//!     namespace: empire            # optional grouping, becomes a label
//!     labels: {org: empire, class: deathstar}
//!     match:
//!       netns: [bh-deathstar]      # names under /var/run/netns
//!       cgroup: [/bulkhead/deathstar]   # cgroup v2 path prefixes
//!       process: [nginx]           # process names (comm)
//!       ips: [10.0.0.5]
//!       cidrs: [10.0.1.0/24]
//! external:
//!   - name: corp-vpn
//!     cidrs: [192.0.2.0/24]
//! ```
//!
//! Validation is strict and names the offending entry: an inventory that maps the same
//! namespace or address to two workloads would silently give one of them the other's
//! rights, so it is refused instead.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::Path;

use bulkhead_model::Labels;
use bulkhead_model::labels::NAMESPACE_KEY;
use ipnet::IpNet;
use serde::Deserialize;

/// Label key marking a named external CIDR group.
pub const CIDR_GROUP_KEY: &str = "bulkhead.io/cidr-group";

/// Biggest inventory file accepted.
pub const MAX_INVENTORY_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("reading inventory {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("inventory {path} is {size} bytes; at most {max} accepted")]
    TooLarge { path: String, size: u64, max: u64 },
    #[error("inventory is not valid YAML for this format: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("{entry}: {reason}")]
    Invalid { entry: String, reason: String },
    #[error("{what} {value:?} is claimed by both {first} and {second}")]
    Conflict { what: &'static str, value: String, first: String, second: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    #[serde(default)]
    external: Vec<RawExternal>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(rename = "match")]
    matcher: RawMatch,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default)]
    netns: Vec<String>,
    #[serde(default)]
    cgroup: Vec<String>,
    #[serde(default)]
    process: Vec<String>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    cidrs: Vec<IpNet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExternal {
    name: String,
    cidrs: Vec<IpNet>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// One workload of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    /// The identity-defining labels (including the namespace label when given).
    pub labels: Labels,
}

/// A validated inventory with lookup indexes.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    workloads: Vec<Workload>,
    by_netns: HashMap<String, usize>,
    /// (prefix, workload) sorted longest first.
    by_cgroup: Vec<(String, usize)>,
    by_process: HashMap<String, usize>,
    by_ip: HashMap<IpAddr, usize>,
    /// (net, workload) sorted longest prefix first; external groups included.
    by_cidr: Vec<(IpNet, usize)>,
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        let p = path.display().to_string();
        let size = std::fs::metadata(path).map_err(|source| InventoryError::Read { path: p.clone(), source })?.len();
        if size > MAX_INVENTORY_BYTES {
            return Err(InventoryError::TooLarge { path: p, size, max: MAX_INVENTORY_BYTES });
        }
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read { path: p, source })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, InventoryError> {
        let raw: RawInventory = serde_yaml_ng::from_str(text)?;
        let mut inv = Inventory::default();
        let mut names: HashMap<String, ()> = HashMap::new();
        for (i, w) in raw.workloads.into_iter().enumerate() {
            let entry = format!("workloads[{i}] ({})", w.name);
            if w.name.trim().is_empty() {
                return Err(InventoryError::Invalid { entry, reason: "name must not be empty".into() });
            }
            if names.insert(w.name.clone(), ()).is_some() {
                return Err(InventoryError::Invalid { entry, reason: "name is used twice".into() });
            }
            if w.labels.is_empty() {
                return Err(InventoryError::Invalid {
                    entry,
                    reason: "labels must not be empty: they define the workload's identity".into(),
                });
            }
            let mut labels = Labels::new(w.labels)
                .map_err(|e| InventoryError::Invalid { entry: entry.clone(), reason: e.to_string() })?;
            if let Some(ns) = &w.namespace {
                labels
                    .insert(NAMESPACE_KEY, ns.clone())
                    .map_err(|e| InventoryError::Invalid { entry: entry.clone(), reason: e.to_string() })?;
            }
            let m = w.matcher;
            if m.netns.is_empty()
                && m.cgroup.is_empty()
                && m.process.is_empty()
                && m.ips.is_empty()
                && m.cidrs.is_empty()
            {
                return Err(InventoryError::Invalid {
                    entry,
                    reason: "match must name at least one of netns, cgroup, process, ips, cidrs".into(),
                });
            }
            let idx = inv.workloads.len();
            inv.workloads.push(Workload { name: w.name.clone(), labels });
            for ns in m.netns {
                inv.claim_str("network namespace", ns, idx, Index::Netns)?;
            }
            for cg in m.cgroup {
                if !cg.starts_with('/') {
                    return Err(InventoryError::Invalid {
                        entry,
                        reason: format!("cgroup {cg:?} must be a path starting with '/'"),
                    });
                }
                let cg = cg.trim_end_matches('/').to_owned();
                if let Some((_, other)) = inv.by_cgroup.iter().find(|(p, _)| *p == cg) {
                    return Err(inv.conflict("cgroup", cg.clone(), *other, idx));
                }
                inv.by_cgroup.push((cg, idx));
            }
            for p in m.process {
                inv.claim_str("process", p, idx, Index::Process)?;
            }
            for ip in m.ips {
                if let Some(other) = inv.by_ip.insert(ip, idx) {
                    return Err(inv.conflict("address", ip.to_string(), other, idx));
                }
            }
            for net in m.cidrs {
                inv.claim_cidr(net.trunc(), idx)?;
            }
        }
        for (i, e) in raw.external.into_iter().enumerate() {
            let entry = format!("external[{i}] ({})", e.name);
            if e.name.trim().is_empty() || e.cidrs.is_empty() {
                return Err(InventoryError::Invalid { entry, reason: "needs a name and at least one CIDR".into() });
            }
            if names.insert(e.name.clone(), ()).is_some() {
                return Err(InventoryError::Invalid { entry, reason: "name is used twice".into() });
            }
            let mut labels = Labels::new(e.labels)
                .map_err(|err| InventoryError::Invalid { entry: entry.clone(), reason: err.to_string() })?;
            labels
                .insert(CIDR_GROUP_KEY, e.name.clone())
                .map_err(|err| InventoryError::Invalid { entry: entry.clone(), reason: err.to_string() })?;
            let idx = inv.workloads.len();
            inv.workloads.push(Workload { name: e.name, labels });
            for net in e.cidrs {
                inv.claim_cidr(net.trunc(), idx)?;
            }
        }
        inv.by_cgroup.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        inv.by_cidr.sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then_with(|| a.0.cmp(&b.0)));
        Ok(inv)
    }

    pub fn workloads(&self) -> &[Workload] {
        &self.workloads
    }

    /// The CIDRs of every workload or external group named by CIDR (synthesis turns
    /// external groups into CIDR-group peers and needs their prefixes).
    pub fn cidrs_of(&self, workload: &str) -> Vec<IpNet> {
        let mut out: Vec<IpNet> =
            self.by_cidr.iter().filter(|(_, i)| self.workloads[*i].name == workload).map(|(net, _)| *net).collect();
        out.sort();
        out
    }

    pub fn by_netns(&self, name: &str) -> Option<&Workload> {
        self.by_netns.get(name).map(|i| &self.workloads[*i])
    }

    /// Longest cgroup path prefix (on path-component boundaries).
    pub fn by_cgroup(&self, path: &str) -> Option<&Workload> {
        self.by_cgroup
            .iter()
            .find(|(prefix, _)| {
                path == prefix
                    || (path.starts_with(prefix.as_str()) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
            })
            .map(|(_, i)| &self.workloads[*i])
    }

    pub fn by_process(&self, comm: &str) -> Option<&Workload> {
        self.by_process.get(comm).map(|i| &self.workloads[*i])
    }

    /// Exact address first, then the longest matching prefix.
    pub fn by_addr(&self, ip: IpAddr) -> Option<&Workload> {
        if let Some(i) = self.by_ip.get(&ip) {
            return Some(&self.workloads[*i]);
        }
        self.by_cidr.iter().find(|(net, _)| net.contains(&ip)).map(|(_, i)| &self.workloads[*i])
    }

    fn claim_str(&mut self, what: &'static str, value: String, idx: usize, index: Index) -> Result<(), InventoryError> {
        let map = match index {
            Index::Netns => &mut self.by_netns,
            Index::Process => &mut self.by_process,
        };
        match map.insert(value.clone(), idx) {
            Some(other) if other != idx => Err(self.conflict(what, value, other, idx)),
            _ => Ok(()),
        }
    }

    fn claim_cidr(&mut self, net: IpNet, idx: usize) -> Result<(), InventoryError> {
        if let Some((_, other)) = self.by_cidr.iter().find(|(n, _)| *n == net) {
            return Err(self.conflict("CIDR", net.to_string(), *other, idx));
        }
        self.by_cidr.push((net, idx));
        Ok(())
    }

    fn conflict(&self, what: &'static str, value: String, first: usize, second: usize) -> InventoryError {
        InventoryError::Conflict {
            what,
            value,
            first: self.workloads[first].name.clone(),
            second: self.workloads[second].name.clone(),
        }
    }
}

enum Index {
    Netns,
    Process,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workloads:
  - name: deathstar
    namespace: empire
    labels: {org: empire, class: deathstar}
    match: {netns: [bh-ds], cidrs: [10.1.0.0/16]}
  - name: tiefighter
    labels: {org: empire, class: tiefighter}
    match: {cgroup: [/bulkhead/tie/], process: [tie], ips: [10.1.2.3]}
external:
  - name: corp
    cidrs: [192.0.2.0/24]
"#;

    #[test]
    fn lookups_follow_specificity() {
        let inv = Inventory::parse(GOOD).expect("valid inventory");
        assert_eq!(inv.by_netns("bh-ds").map(|w| w.name.as_str()), Some("deathstar"));
        assert_eq!(inv.by_netns("bh-ds").and_then(|w| w.labels.namespace()), Some("empire"));
        assert_eq!(inv.by_cgroup("/bulkhead/tie").map(|w| w.name.as_str()), Some("tiefighter"));
        assert_eq!(inv.by_cgroup("/bulkhead/tie/sub").map(|w| w.name.as_str()), Some("tiefighter"));
        assert!(inv.by_cgroup("/bulkhead/tiefighter2").is_none(), "prefix must end on a path boundary");
        assert_eq!(inv.by_process("tie").map(|w| w.name.as_str()), Some("tiefighter"));
        // The exact address beats the /16 that contains it.
        assert_eq!(inv.by_addr("10.1.2.3".parse().expect("ip")).map(|w| w.name.as_str()), Some("tiefighter"));
        assert_eq!(inv.by_addr("10.1.9.9".parse().expect("ip")).map(|w| w.name.as_str()), Some("deathstar"));
        let corp = inv.by_addr("192.0.2.7".parse().expect("ip")).expect("external group");
        assert_eq!(corp.labels.get(CIDR_GROUP_KEY), Some("corp"));
        assert!(inv.by_addr("8.8.8.8".parse().expect("ip")).is_none());
    }

    #[test]
    fn invalid_inventories_say_what_is_wrong() {
        let cases = [
            ("workloads: [{name: a, labels: {}, match: {netns: [x]}}]", "labels must not be empty"),
            ("workloads: [{name: a, labels: {k: v}, match: {}}]", "match must name at least one"),
            ("workloads: [{name: a, labels: {k: v}, match: {netns: [x]}, extra: 1}]", "unknown field `extra`"),
            ("workloads: [{name: a, labels: {k: v}, match: {ips: [not-an-ip]}}]", "invalid IP address"),
            ("workloads: [{name: a, labels: {k: v}, match: {cidrs: [10.0.0.0/33]}}]", "invalid IP address"),
            ("workloads: [{name: a, labels: {k: v}, match: {cgroup: [relative]}}]", "must be a path"),
            (
                "workloads: [{name: a, labels: {k: v}, match: {netns: [x]}}, {name: b, labels: {k: w}, match: {netns: [x]}}]",
                "network namespace \"x\" is claimed by both a and b",
            ),
            (
                "workloads: [{name: a, labels: {k: v}, match: {netns: [x]}}, {name: a, labels: {k: w}, match: {netns: [y]}}]",
                "name is used twice",
            ),
            ("workloads: [{name: a, labels: {'': v}, match: {netns: [x]}}]", "label key is empty"),
            ("workloads: {", "not valid YAML"),
        ];
        for (text, want) in cases {
            let err = Inventory::parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text}\n  gave: {err}\n  want: {want}");
        }
    }

    #[test]
    fn hostile_label_values_are_kept_verbatim() {
        let text =
            "workloads: [{name: a, labels: {app: \"x'); DROP TABLE identities;-- <script>ü\"}, match: {netns: [x]}}]";
        let inv = Inventory::parse(text).expect("valid");
        assert_eq!(
            inv.by_netns("x").and_then(|w| w.labels.get("app")),
            Some("x'); DROP TABLE identities;-- <script>ü")
        );
    }
}
