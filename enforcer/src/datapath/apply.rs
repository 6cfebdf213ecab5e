//! The map owner's two jobs on the kernel side: reading back what the pinned maps
//! hold ([`Datapath::read_state`]) and turning [`MapOp`]s into map writes
//! ([`Datapath::apply`]).
//!
//! Reading back instead of trusting a file is what makes restarts safe: after a
//! `kill -9` the kernel's maps are the only truth about what is enforced, and a
//! diff against them is exact whatever step the previous process died in.

use aya::maps::MapError;
use bulkhead_abi::enforcer::{self as abi, EndpointValue, IpcacheValue, PolicyKey};

use super::{Datapath, DatapathError, ignore_missing};
use crate::render::{HttpEntry, IpcachePrefix, MapOp, MapState};

/// What the pinned maps hold, as [`Datapath::read_state`] found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// The active generation's entries plus ipcache and endpoints.
    pub state: MapState,
    /// Inactive generations that still have entries (an earlier process died
    /// between activating a generation and deleting the previous one, or while
    /// writing one): safe to delete, and they must be before their number is reused.
    pub stale_generations: Vec<u32>,
}

impl Datapath {
    /// Reads ipcache, endpoints and the active generation's policy entries back
    /// from the kernel, as the active generation sees them (its slot of each
    /// double-buffered value; keys whose two slots differ are listed in
    /// [`MapState::unsettled`](crate::render::MapState)). Walks every map (about a
    /// second per million entries): done at start-up and after a failed apply,
    /// never per packet or per update.
    pub fn read_state(&mut self) -> Result<KernelState, DatapathError> {
        let generation = self.active_generation()?;
        let active = abi::slot_of(generation);
        let mut state = MapState { generation, ..MapState::default() };
        for entry in self.ipcache.iter() {
            match entry {
                Ok((key, value)) => {
                    let prefix = IpcachePrefix { prefixlen: key.prefix_len(), addr: key.data() };
                    state.ipcache.insert(prefix, value.identity[active]);
                    if value.identity[0] != value.identity[1] {
                        state.unsettled.ipcache.insert(prefix);
                    }
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(abi::IPCACHE)(e)),
            }
        }
        for entry in self.endpoints.iter() {
            match entry {
                Ok((key, value)) => {
                    let slot = value.slot[active];
                    if slot.is_present() {
                        state.endpoints.insert(key, slot);
                    }
                    if !slot.is_present() || value.slot[0] != value.slot[1] {
                        state.unsettled.endpoints.insert(key);
                    }
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(abi::ENDPOINTS)(e)),
            }
        }
        let mut stale = Vec::new();
        for entry in self.policy.iter() {
            match entry {
                Ok((key, value)) if key.generation == generation => {
                    state.policy.insert(key, value);
                }
                Ok((key, _)) => stale.push(key.generation),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(abi::POLICY)(e)),
            }
        }
        for entry in self.http.keys() {
            match entry {
                Ok(key) => {
                    let e = HttpEntry { prefixlen: key.prefix_len(), data: key.data() };
                    if e.generation() == generation {
                        state.http.insert(e);
                    } else {
                        stale.push(e.generation());
                    }
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(DatapathError::map(abi::HTTP_RULES)(e)),
            }
        }
        stale.sort_unstable();
        stale.dedup();
        // Now known exactly (until someone else writes the maps).
        let mut known: std::collections::BTreeSet<u32> = stale.iter().copied().collect();
        if !state.policy.is_empty() {
            known.insert(generation);
        }
        self.policy_generations = Some(known);
        Ok(KernelState { state, stale_generations: stale })
    }

    /// Applies `ops` in order (the order [`crate::render::diff`] produced is the
    /// one that keeps every packet on one whole policy). Stops at the first
    /// failing op and returns how many were applied before it, so the caller knows
    /// whether the activation happened.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), ApplyError> {
        for (index, op) in ops.iter().enumerate() {
            self.apply_one(op).map_err(|source| ApplyError { applied: index, source })?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<(), DatapathError> {
        match op {
            MapOp::UpsertIpcache { prefix, identity } => self
                .ipcache
                .insert(&prefix_key(prefix), IpcacheValue::both(*identity), 0)
                .map_err(DatapathError::map(abi::IPCACHE)),
            MapOp::BridgeIpcache { prefix, value } => {
                self.ipcache.insert(&prefix_key(prefix), *value, 0).map_err(DatapathError::map(abi::IPCACHE))
            }
            MapOp::DeleteIpcache { prefix } => ignore_missing(self.ipcache.remove(&prefix_key(prefix)), abi::IPCACHE),
            MapOp::UpsertEndpoint { key, value } => {
                self.endpoints.insert(*key, EndpointValue::both(*value), 0).map_err(DatapathError::map(abi::ENDPOINTS))
            }
            MapOp::BridgeEndpoint { key, value } => {
                self.endpoints.insert(*key, *value, 0).map_err(DatapathError::map(abi::ENDPOINTS))
            }
            MapOp::DeleteEndpoint { key } => ignore_missing(self.endpoints.remove(key), abi::ENDPOINTS),
            MapOp::WriteGeneration { generation, entries } => {
                if *generation == self.active_generation()? {
                    return Err(DatapathError::InvalidGeneration {
                        generation: *generation,
                        reason: "it is the active generation",
                    });
                }
                // Leftovers of an interrupted attempt under the same number must not
                // become part of it (a walk of the map only when there may be some).
                self.clear_generation(*generation)?;
                self.note_policy_generation(*generation);
                for (key, value) in entries {
                    let key = PolicyKey { generation: *generation, ..*key };
                    self.policy.insert(key, *value, 0).map_err(DatapathError::map(abi::POLICY))?;
                }
                Ok(())
            }
            MapOp::Activate { generation } => self.activate(*generation),
            MapOp::DeleteGeneration { generation } => self.delete_generation(*generation).map(|_| ()),
            MapOp::DeleteGenerationKeys { generation, keys } => {
                self.delete_generation_keys(*generation, keys).map(|_| ())
            }
            MapOp::UpsertPolicy { key, value } => {
                self.note_policy_generation(key.generation);
                self.policy.insert(*key, *value, 0).map_err(DatapathError::map(abi::POLICY))
            }
            MapOp::DeletePolicy { key } => ignore_missing(self.policy.remove(key), abi::POLICY),
            MapOp::WriteHttp { entries } => {
                for e in entries {
                    self.note_policy_generation(e.generation());
                    self.http.insert(&http_key(e), 1, 0).map_err(DatapathError::map(abi::HTTP_RULES))?;
                }
                Ok(())
            }
            MapOp::DeleteHttp { entries } => {
                for e in entries {
                    ignore_missing(self.http.remove(&http_key(e)), abi::HTTP_RULES)?;
                }
                Ok(())
            }
        }
    }
}

/// A failed [`Datapath::apply`]: `applied` ops took effect before `source` failed.
#[derive(Debug, thiserror::Error)]
#[error("map op {applied} failed: {source}")]
pub struct ApplyError {
    pub applied: usize,
    #[source]
    pub source: DatapathError,
}

fn http_key(e: &HttpEntry) -> aya::maps::lpm_trie::Key<abi::HttpKeyData> {
    aya::maps::lpm_trie::Key::new(e.prefixlen, e.data)
}

fn prefix_key(p: &IpcachePrefix) -> aya::maps::lpm_trie::Key<[u8; 16]> {
    aya::maps::lpm_trie::Key::new(p.prefixlen, p.addr)
}
