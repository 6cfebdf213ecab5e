//! NetworkPolicies imported from a cluster's API server, already converted to
//! [`Policy`] by the importer. The store keeps the latest set per `source` (a cluster
//! or importer name): each import replaces the whole set in one transaction, so a
//! NetworkPolicy deleted in the cluster disappears here too, and readers never see half
//! an import. An import that changed something is audited
//! (`cluster_policies.import`, with counts); re-importing the same objects is not.

use std::collections::{BTreeMap, BTreeSet};

use bulkhead_model::Policy;
use serde::Serialize;

use super::StoreError;
use super::prepare::text;

/// One imported NetworkPolicy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterPolicyRow {
    pub namespace: String,
    pub name: String,
    /// The object's `metadata.uid`: a delete-and-recreate under the same name is a
    /// different object.
    pub uid: String,
    /// The object's `metadata.resourceVersion`: changes with every edit.
    pub resource_version: String,
    /// What the importer made of it.
    pub policy: Policy,
    /// The object as the API server returned it.
    pub raw: serde_json::Value,
}

/// What an import changed, compared by (namespace, name) and then (uid,
/// resourceVersion).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClusterPolicyImport {
    pub added: u64,
    pub updated: u64,
    pub removed: u64,
    pub unchanged: u64,
}

impl ClusterPolicyImport {
    pub fn changed(&self) -> bool {
        self.added + self.updated + self.removed > 0
    }
}

/// Which object an imported row is (namespace, name, uid) and which edit of it
/// (resourceVersion): what an import is compared by.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawStoredVersion {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

/// A `cluster_policies` row without its source and import time: what an import writes
/// (see [`prepare`]) and a listing reads back.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RawClusterPolicy {
    #[sqlx(flatten)]
    pub version: RawStoredVersion,
    pub policy: String,
    pub raw: String,
}

/// Converts an import, refusing one that names an object twice (the importer's bug;
/// storing either copy would hide it).
pub(crate) fn prepare(rows: &[ClusterPolicyRow]) -> Result<Vec<RawClusterPolicy>, StoreError> {
    let mut seen = BTreeSet::new();
    rows.iter()
        .map(|r| {
            let p = RawClusterPolicy {
                version: RawStoredVersion {
                    namespace: text(&r.namespace),
                    name: text(&r.name),
                    uid: text(&r.uid),
                    resource_version: text(&r.resource_version),
                },
                policy: serde_json::to_string(&r.policy)
                    .map_err(|source| StoreError::Encode { what: "cluster policy", source })?,
                raw: serde_json::to_string(&r.raw)
                    .map_err(|source| StoreError::Encode { what: "cluster policy object", source })?,
            };
            let v = &p.version;
            if !seen.insert((v.namespace.clone(), v.name.clone())) {
                let RawStoredVersion { namespace, name, .. } = p.version;
                return Err(StoreError::DuplicateClusterPolicy { namespace, name });
            }
            Ok(p)
        })
        .collect()
}

pub(crate) fn compare(stored: &[RawStoredVersion], new: &[RawClusterPolicy]) -> ClusterPolicyImport {
    let mut old: BTreeMap<(&str, &str), (&str, &str)> = stored
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), (s.uid.as_str(), s.resource_version.as_str())))
        .collect();
    let mut c = ClusterPolicyImport::default();
    for RawClusterPolicy { version: n, .. } in new {
        match old.remove(&(n.namespace.as_str(), n.name.as_str())) {
            None => c.added += 1,
            Some(v) if v == (n.uid.as_str(), n.resource_version.as_str()) => c.unchanged += 1,
            Some(_) => c.updated += 1,
        }
    }
    c.removed = old.len() as u64;
    c
}

/// Detail of `cluster_policies.import`.
pub(crate) fn detail(c: &ClusterPolicyImport) -> serde_json::Value {
    serde_json::json!({
        "added": c.added,
        "updated": c.updated,
        "removed": c.removed,
        "unchanged": c.unchanged,
    })
}

/// Audit subject naming an import source.
pub(crate) fn subject(source: &str) -> String {
    format!("cluster-policies:{source}")
}

impl TryFrom<RawClusterPolicy> for ClusterPolicyRow {
    type Error = StoreError;
    fn try_from(r: RawClusterPolicy) -> Result<Self, StoreError> {
        let json = |column| move |source| StoreError::CorruptJson { table: "cluster_policies", column, source };
        let RawStoredVersion { namespace, name, uid, resource_version } = r.version;
        Ok(ClusterPolicyRow {
            policy: serde_json::from_str(&r.policy).map_err(json("policy"))?,
            raw: serde_json::from_str(&r.raw).map_err(json("raw"))?,
            namespace,
            name,
            uid,
            resource_version,
        })
    }
}

// === statements (both backends) ===

pub(crate) const SELECT_VERSIONS: &str =
    "SELECT namespace, name, uid, resource_version FROM cluster_policies WHERE source = $1";

pub(crate) const DELETE_SOURCE: &str = "DELETE FROM cluster_policies WHERE source = $1";

pub(crate) const INSERT: &str = "INSERT INTO cluster_policies (source, namespace, name, uid, resource_version, \
     policy, raw, imported_unix_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

pub(crate) const SELECT_ALL: &str = "SELECT namespace, name, uid, resource_version, policy, raw \
     FROM cluster_policies ORDER BY namespace, name, source";
