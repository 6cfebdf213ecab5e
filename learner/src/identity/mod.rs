//! Workload identity: who a flow's ends are ([`resolver`], fed by the [`inventory`]
//! file and the [`kube`] watchers) and the stable numbers allocated for their label
//! sets ([`IdentityCache`]).

pub mod inventory;
pub mod kube;
pub mod resolver;

use std::collections::HashMap;

use bulkhead_model::{Identity, Labels};
use tokio::sync::Mutex;

use crate::store::{Store, StoreError};
pub use resolver::{Conflict, ConflictKind, Resolver, Subject};

/// Label set → identity, backed by the store. Allocation is rare (new workloads) and
/// lookups are per flow, so hits stay in memory; the store guarantees that concurrent
/// allocators agree on one number.
#[derive(Debug)]
pub struct IdentityCache {
    store: Store,
    known: Mutex<HashMap<Labels, Identity>>,
}

impl IdentityCache {
    pub fn new(store: Store) -> Self {
        Self { store, known: Mutex::new(HashMap::new()) }
    }

    pub async fn identity(&self, subject: &Subject) -> Result<Identity, StoreError> {
        match subject {
            Subject::Reserved(r) => Ok(Identity::from(*r)),
            Subject::Workload { labels, .. } => {
                if let Some(id) = self.known.lock().await.get(labels) {
                    return Ok(*id);
                }
                let id = self.store.ensure_identity(labels).await?;
                self.known.lock().await.insert(labels.clone(), id);
                Ok(id)
            }
        }
    }
}
