//! The one owner of the kernel maps (STYLE.md: one task owns a resource). Policy
//! snapshots come in, are checked, rendered under the next generation, diffed
//! against what the kernel holds and applied; verdict events and rule counters go
//! out as [`VerdictReport`]s named by the learner's version that made them.
//!
//! What "applied" means here is exact: a snapshot is acked only after its
//! generation is active in the kernel and the version is recorded. A snapshot that
//! cannot be applied is rejected with the reason and changes nothing the kernel
//! enforces: a failure before the activation is rolled back to the applied policy
//! (read back from the kernel, not from memory), a failure after it leaves only
//! an inactive generation behind, which is deleted on the next start.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use bulkhead_model::{
    Direction as ModelDirection, EnforcerLoss, Identity, NodePolicy, NodePolicyError, PolicyUpdate, Protocol,
    RuleCounter, Verdict, VerdictEvent, VerdictReport,
};

use crate::applied::{Applied, AppliedFile};
use crate::datapath::{
    Datapath, DatapathError, Direction, KernelState, ResolvedNetns, RuleUse, TcError, VerdictRecord, resolve_netns,
};
use crate::metrics::Metrics;
use crate::render::{Capacity, MapState, RenderError, diff, netns_workloads, render_resolved};
use bulkhead_abi::enforcer as abi;

/// Most verdict events kept while the learner is unreachable; later ones are
/// counted as `queue_dropped` (reported, never silent).
pub const DEFAULT_MAX_PENDING_EVENTS: usize = 100_000;

/// How many generations' versions are remembered to name the version of late events.
const GENERATION_HISTORY: usize = 8;

/// Why a snapshot was not applied. The applied policy stays in force in every case.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("version {version} is older than the applied version {applied}")]
    Older { version: u64, applied: u64 },
    #[error("invalid snapshot: {0}")]
    Decode(String),
    #[error("invalid policy: {0}")]
    Invalid(#[from] NodePolicyError),
    #[error("cannot be enforced: {0}")]
    Render(#[from] RenderError),
    #[error("writing the kernel maps failed (the applied policy stays): {0}")]
    Kernel(String),
    /// Not the policy's fault: this enforcer does not hold the delta's base (it
    /// restarted, or rejected the base). Resynchronize with a snapshot.
    #[error("cannot apply a delta from version {base}: holding {held:?}")]
    Resync { base: u64, held: Option<u64> },
    #[error("delta: {0}")]
    Delta(#[from] bulkhead_model::DeltaError),
    #[error("attaching to a network-namespace workload failed (the applied policy stays): {0}")]
    Netns(String),
}

/// What [`MapOwner::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The snapshot is active under `generation`.
    Applied { generation: u32, ops: usize },
    /// The same version was applied before (a resync after reconnecting).
    AlreadyApplied,
}

/// Why the owner could not start.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// Owns the datapath and everything derived from it.
#[derive(Debug)]
pub struct MapOwner {
    datapath: Datapath,
    /// What the kernel holds (kept equal to it by every apply).
    state: MapState,
    applied: Option<Applied>,
    /// The applied policy itself, the base of the next delta; `None` after a
    /// restart until the learner's first snapshot (the kernel holds only entries).
    policy: Option<NodePolicy>,
    file: AppliedFile,
    capacity: Capacity,
    /// Recent generation → version, to name the version of drained events.
    versions: BTreeMap<u32, u64>,
    /// Endpoint key (cgroup id or tc key) → netns inode of the managed endpoints
    /// (events carry the key).
    netns_of: HashMap<u64, u64>,
    /// Network-namespace workloads this process attached tc programs to, by
    /// cookie, with the interfaces it attached to.
    attached: BTreeMap<u64, ResolvedNetns>,
    /// Events drained and not yet reported, per version.
    events: BTreeMap<u64, Vec<VerdictEvent>>,
    pending_events: usize,
    max_pending_events: usize,
    /// Rule counter deltas cut when a version was replaced, per version.
    counters: BTreeMap<u64, Vec<RuleCounter>>,
    /// Rule use at the last cut: deltas are reported, the learner adds them up.
    rule_base: BTreeMap<u32, RuleUse>,
    queue_dropped: u64,
    /// `queue_dropped` as last exported to the metrics.
    queue_dropped_exported: u64,
    scratch: Vec<VerdictRecord>,
}

impl MapOwner {
    /// Takes over a loaded datapath: reads back what the kernel enforces, deletes
    /// inactive leftovers of a killed predecessor and believes the applied-version
    /// file only when it names the active generation.
    pub fn open(datapath: Datapath, file: AppliedFile, capacity: Capacity) -> Result<Self, OwnerError> {
        let mut datapath = datapath;
        let KernelState { state, stale_generations } = datapath.read_state()?;
        for generation in stale_generations {
            let removed = datapath.delete_generation(generation)?;
            tracing::info!(generation, removed, "Deleted an inactive policy generation left by an earlier process.");
        }
        let applied = file.read().filter(|a| a.generation == state.generation);
        match applied {
            Some(a) => {
                tracing::info!(version = a.version, generation = a.generation, "Kernel enforces a known version.")
            }
            None if state.endpoints.is_empty() => tracing::info!("No policy in the kernel yet."),
            None => tracing::warn!(
                generation = state.generation,
                endpoints = state.endpoints.len(),
                "The kernel enforces a policy of unknown version; it stays until the learner sends one."
            ),
        }
        let versions = applied.map(|a| BTreeMap::from([(a.generation, a.version)])).unwrap_or_default();
        // Hits before this process are not reported again: the previous process
        // reported most of them, and a delta reported twice would inflate counts.
        let rule_base = datapath.rule_use();
        Ok(Self {
            datapath,
            state,
            applied,
            policy: None,
            file,
            capacity,
            versions,
            netns_of: HashMap::new(),
            attached: BTreeMap::new(),
            events: BTreeMap::new(),
            pending_events: 0,
            max_pending_events: DEFAULT_MAX_PENDING_EVENTS,
            counters: BTreeMap::new(),
            rule_base,
            queue_dropped: 0,
            queue_dropped_exported: 0,
            scratch: Vec::new(),
        })
    }

    /// Caps the events kept while they cannot be reported.
    pub fn with_max_pending_events(mut self, max: usize) -> Self {
        self.max_pending_events = max;
        self
    }

    /// The version the kernel enforces, 0 when unknown (the Hello's `applied_version`).
    pub fn applied_version(&self) -> u64 {
        self.applied.map_or(0, |a| a.version)
    }

    /// What the kernel holds.
    pub fn state(&self) -> &MapState {
        &self.state
    }

    pub fn datapath(&self) -> &Datapath {
        &self.datapath
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// Applies a snapshot or a delta against the applied policy.
    pub fn apply_update(&mut self, update: &PolicyUpdate) -> Result<Outcome, Rejection> {
        match update {
            PolicyUpdate::Snapshot(policy) => self.apply(policy),
            PolicyUpdate::Delta(delta) => {
                let held = self.policy.as_ref().map(|p| p.version);
                let base = match &self.policy {
                    Some(p) if p.version == delta.base_version => p,
                    _ => return Err(Rejection::Resync { base: delta.base_version, held }),
                };
                let policy = delta.apply(base)?;
                self.apply(&policy)
            }
        }
    }

    /// Applies a snapshot atomically (see the module doc) or says why not.
    pub fn apply(&mut self, policy: &NodePolicy) -> Result<Outcome, Rejection> {
        if let Some(a) = self.applied {
            if policy.version < a.version {
                return Err(Rejection::Older { version: policy.version, applied: a.version });
            }
            if policy.version == a.version {
                // A resync after a restart: the kernel has it, now we know it too.
                if self.policy.is_none() {
                    self.policy = Some(policy.clone());
                }
                return Ok(Outcome::AlreadyApplied);
            }
        }
        policy.validate()?;
        let generation = next_generation(self.state.generation);
        // Network-namespace workloads get their tc programs before their endpoint
        // entries exist (until then the programs pass everything).
        let (netns_keys, wanted, gone) = self.attach_netns_workloads(policy)?;
        let pruned;
        let renderable = if gone.is_empty() {
            policy
        } else {
            pruned = NodePolicy {
                endpoints: policy
                    .endpoints
                    .iter()
                    .filter(|e| !(e.cgroups.is_empty() && e.netns_ino.is_some_and(|i| gone.contains(&i))))
                    .cloned()
                    .collect(),
                ..policy.clone()
            };
            &pruned
        };
        // The same content under a new version (a learner that restarted, or this
        // process after a restart): nothing to write, only the version to record.
        // Compared as the kernel would hold it, so it is exact whatever came before.
        let same = render_resolved(renderable, self.state.generation, &self.capacity, &netns_keys)?;
        if same == self.state {
            self.cut_rule_counters();
            let generation = self.state.generation;
            self.record_applied(policy, generation, &netns_keys, &wanted);
            tracing::info!(
                version = policy.version,
                generation,
                "Applied a policy with unchanged content (no map writes)."
            );
            return Ok(Outcome::Applied { generation, ops: 0 });
        }
        let target = render_resolved(renderable, generation, &self.capacity, &netns_keys)?;
        let ops = diff(&self.state, &target);

        // Hits so far belong to the version being replaced.
        self.cut_rule_counters();
        tracing::debug!(version = policy.version, generation, ops = ops.len(), "Writing the maps.");
        if let Err(err) = self.datapath.apply(&ops) {
            let reason = err.to_string();
            self.recover();
            return Err(Rejection::Kernel(reason));
        }
        self.state = target;
        self.record_applied(policy, generation, &netns_keys, &wanted);
        tracing::info!(
            version = policy.version,
            generation,
            ops = ops.len(),
            endpoints = self.state.endpoints.len(),
            rules = self.state.policy.len(),
            "Applied a policy."
        );
        Ok(Outcome::Applied { generation, ops: ops.len() })
    }

    /// Everything that follows the kernel enforcing `policy` under `generation`.
    fn record_applied(
        &mut self,
        policy: &NodePolicy,
        generation: u32,
        netns_keys: &BTreeMap<u64, u64>,
        wanted: &[u64],
    ) {
        let applied = Applied { version: policy.version, generation };
        if let Err(err) = self.file.write(applied) {
            // The kernel enforces the new version; only a restart would not know it.
            tracing::warn!(path = %self.file.path().display(), error = %err, "Could not record the applied version.");
        }
        self.applied = Some(applied);
        self.policy = Some(policy.clone());
        self.versions.insert(generation, policy.version);
        while self.versions.len() > GENERATION_HISTORY {
            self.versions.pop_first();
        }
        self.netns_of = policy
            .endpoints
            .iter()
            .flat_map(|e| e.cgroups.iter().map(move |c| (c.cgroup_id, e.netns_ino.unwrap_or(0))))
            .chain(netns_keys.iter().map(|(ino, key)| (*key, *ino)))
            .collect();
        // Namespaces that left the policy (or the node) lose their programs only now
        // that no active policy names them.
        self.detach_netns_except(wanted);
    }

    /// Resolves every network-namespace workload of `policy` and attaches the tc
    /// programs in the ones this process has not attached yet. Returns inode → key
    /// of the attached ones, their cookies, and the inodes of namespaces that no
    /// longer exist (their endpoints are left out: nothing runs there to enforce).
    /// Any other failure rejects the snapshot.
    #[expect(clippy::type_complexity, reason = "three results of one walk, each used once")]
    fn attach_netns_workloads(
        &mut self,
        policy: &NodePolicy,
    ) -> Result<(BTreeMap<u64, u64>, Vec<u64>, Vec<u64>), Rejection> {
        let mut keys = BTreeMap::new();
        let mut wanted = Vec::new();
        let mut gone = Vec::new();
        for (name, ino) in netns_workloads(policy) {
            let ns = match resolve_netns(name, Some(ino)) {
                Ok(ns) => ns,
                Err(e) if netns_is_gone(&e) => {
                    tracing::warn!(netns = ?name, ino, error = %e, "A network-namespace workload is gone from this node; left out.");
                    gone.push(ino);
                    continue;
                }
                Err(e) => return Err(Rejection::Netns(e.to_string())),
            };
            let fresh = self.attached.get(&ns.cookie).is_none_or(|seen| seen.interfaces != ns.interfaces);
            if fresh {
                self.datapath.attach_netns(&ns).map_err(|e| Rejection::Netns(e.to_string()))?;
            }
            keys.insert(ino, ns.endpoint_key());
            wanted.push(ns.cookie);
            self.attached.insert(ns.cookie, ns);
        }
        Ok((keys, wanted, gone))
    }

    /// Detaches the tc programs of every pinned namespace not in `keep`.
    fn detach_netns_except(&mut self, keep: &[u64]) {
        let pinned = match self.datapath.tc_attachments() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot list tc attachments.");
                return;
            }
        };
        let stale: std::collections::BTreeSet<u64> =
            pinned.into_iter().map(|a| a.cookie).filter(|c| !keep.contains(c)).collect();
        for cookie in stale {
            let ns = self.attached.remove(&cookie);
            if let Err(e) = self.datapath.detach_netns(cookie, ns.as_ref()) {
                tracing::warn!(cookie, error = %e, "Could not detach the tc enforcer from a namespace.");
            }
        }
    }

    /// Attaches to interfaces added to managed namespaces since the last look (a
    /// new veth in a workload's namespace would otherwise pass unjudged). The agent
    /// calls it every few seconds.
    pub fn refresh_netns(&mut self) {
        let Some(policy) = self.policy.take() else { return };
        for (name, ino) in netns_workloads(&policy) {
            let Ok(ns) = resolve_netns(name, Some(ino)) else { continue };
            if self.attached.get(&ns.cookie).is_some_and(|seen| seen.interfaces != ns.interfaces) {
                match self.datapath.attach_netns(&ns) {
                    Ok(_) => {
                        tracing::info!(netns = %ns.path.display(), "Attached to a namespace's new interfaces.");
                        self.attached.insert(ns.cookie, ns);
                    }
                    Err(e) => {
                        tracing::warn!(netns = %ns.path.display(), error = %e, "Could not attach to new interfaces.")
                    }
                }
            }
        }
        self.policy = Some(policy);
    }

    /// After a failed apply: put ipcache and endpoints back as the applied policy
    /// has them and drop the half-written generation, from what the kernel holds
    /// now. If the activation itself went through, the new generation is what the
    /// kernel enforces and `state` follows it (version unknown until the next apply).
    fn recover(&mut self) {
        let now = match self.datapath.read_state() {
            Ok(s) => s,
            Err(err) => {
                tracing::error!(error = %err, "Cannot read the kernel maps back after a failed apply.");
                return;
            }
        };
        if now.state.generation != self.state.generation {
            tracing::warn!(generation = now.state.generation, "A failed apply still activated its generation.");
            self.state = now.state;
            self.applied = None;
            self.policy = None;
            return;
        }
        let mut ops = diff(&now.state, &self.state);
        for generation in now.stale_generations {
            ops.push(crate::render::MapOp::DeleteGeneration { generation });
        }
        if let Err(err) = self.datapath.apply(&ops) {
            tracing::error!(error = %err, "Restoring the applied policy after a failed apply failed.");
        }
    }

    /// Brings the metrics up to date with the kernel's counters and the applied
    /// state (the agent calls it once a second: it reads every per-CPU counter).
    pub fn export(&mut self, m: &Metrics) {
        m.observe(&self.datapath.counters());
        m.applied_version.set(self.applied_version());
        m.generation.set(i64::from(self.state.generation));
        m.endpoints.set(self.state.endpoints.len() as i64);
        m.policy_entries.set(self.state.policy.len() as i64);
        m.queue_dropped.inc_by(self.queue_dropped - self.queue_dropped_exported);
        self.queue_dropped_exported = self.queue_dropped;
    }

    /// Moves verdict events from the kernel ring buffer into the report queue
    /// (non-blocking; the agent calls it every 10 ms).
    pub fn drain(&mut self) {
        self.scratch.clear();
        self.datapath.drain_events(&mut self.scratch);
        if self.scratch.is_empty() {
            return;
        }
        let clock = BootClock::now();
        let fallback = self.applied_version();
        for rec in self.scratch.drain(..) {
            if self.pending_events >= self.max_pending_events {
                self.queue_dropped += 1;
                continue;
            }
            let version = self.versions.get(&rec.generation).copied().unwrap_or(fallback);
            let netns = self.netns_of.get(&rec.cgroup_id).copied().unwrap_or(0);
            if let Some(mut event) = to_event(&rec, netns, &clock) {
                if abi::is_tc_endpoint_key(rec.cgroup_id) {
                    // A namespace workload: no cgroup to name.
                    event.cgroup_id = 0;
                }
                self.events.entry(version).or_default().push(event);
                self.pending_events += 1;
            }
        }
    }

    /// Everything not reported yet, one report per version, with the node's
    /// cumulative loss counters. Empty when there is nothing new.
    pub fn take_reports(&mut self) -> Vec<VerdictReport> {
        self.drain();
        self.cut_rule_counters();
        let c = self.datapath.counters();
        let loss = EnforcerLoss {
            ringbuf_dropped: c.events_lost,
            queue_dropped: self.queue_dropped,
            conntrack_full: c.ct_insert_failed,
        };
        let mut versions: Vec<u64> = self.events.keys().chain(self.counters.keys()).copied().collect();
        versions.sort_unstable();
        versions.dedup();
        let reports = versions
            .into_iter()
            .map(|v| VerdictReport {
                policy_version: v,
                events: self.events.remove(&v).unwrap_or_default(),
                rule_counters: self.counters.remove(&v).unwrap_or_default(),
                loss,
                // Stamped when it is actually sent (`agent`).
                sent_unix_ms: 0,
            })
            .collect();
        self.pending_events = 0;
        reports
    }

    /// Puts reports that could not be sent back in front of the queue (the
    /// stream broke): nothing drained is lost to a reconnect.
    pub fn requeue(&mut self, reports: Vec<VerdictReport>) {
        for r in reports {
            let n = r.events.len();
            let mut events = r.events;
            if let Some(later) = self.events.remove(&r.policy_version) {
                events.extend(later);
            }
            self.events.insert(r.policy_version, events);
            self.pending_events += n;
            let mut counters = r.rule_counters;
            if let Some(later) = self.counters.remove(&r.policy_version) {
                counters.extend(later);
            }
            if !counters.is_empty() {
                self.counters.insert(r.policy_version, counters);
            }
        }
    }

    /// Turns rule use since the last cut into deltas of the applied version.
    fn cut_rule_counters(&mut self) {
        let now = self.datapath.rule_use();
        let clock = BootClock::now();
        let version = self.applied_version();
        let mut out = Vec::new();
        for (rule_id, u) in &now {
            let base = self.rule_base.get(rule_id).copied().unwrap_or_default();
            // A smaller count means the LRU map dropped and re-created the entry.
            let hits = if u.hits >= base.hits { u.hits - base.hits } else { u.hits };
            if hits > 0 {
                out.push(RuleCounter { rule_id: *rule_id, hits, last_hit_unix_ms: clock.unix_ms(u.last_hit_ns) });
            }
        }
        self.rule_base = now;
        if !out.is_empty() {
            self.counters.entry(version).or_default().extend(out);
        }
    }
}

/// The namespace a netns-only workload lived in no longer exists (or is another one
/// now): nothing runs there to enforce.
fn netns_is_gone(e: &TcError) -> bool {
    match e {
        TcError::NetnsOpen { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        TcError::NetnsNotFound { .. } | TcError::NetnsMismatch { .. } | TcError::CookieMismatch { .. } => true,
        _ => false,
    }
}

/// The generation after `g`; 0 is never used (a fresh config array reads 0), and
/// parity always alternates (endpoint and ipcache values keep one slot per parity:
/// the wrap goes u32::MAX → 2, not 1).
pub fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 2,
        n => n,
    }
}

/// Converts the kernel's `CLOCK_BOOTTIME` stamps to Unix milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct BootClock {
    boot_ns: u64,
    unix_ms: i64,
}

impl BootClock {
    pub fn now() -> Self {
        use nix::time::{ClockId, clock_gettime};
        let boot_ns = clock_gettime(ClockId::CLOCK_BOOTTIME)
            .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec() as u64))
            .unwrap_or(0);
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Self { boot_ns, unix_ms }
    }

    /// Pins the clock (tests).
    pub fn at(boot_ns: u64, unix_ms: i64) -> Self {
        Self { boot_ns, unix_ms }
    }

    pub fn unix_ms(&self, boot_ns: u64) -> i64 {
        let ago_ms = self.boot_ns.saturating_sub(boot_ns) / 1_000_000;
        self.unix_ms.saturating_sub(ago_ms as i64)
    }
}

/// The wire form of a kernel verdict record; `None` for records that cannot be
/// one (unknown protocol or verdict: a newer kernel object than this agent).
pub fn to_event(rec: &VerdictRecord, netns_ino: u64, clock: &BootClock) -> Option<VerdictEvent> {
    let protocol = Protocol::from_number(rec.protocol)?;
    let verdict = match rec.verdict {
        abi::VERDICT_ALLOWED => Verdict::Forwarded,
        abi::VERDICT_AUDIT => Verdict::Audit,
        abi::VERDICT_DENIED => Verdict::Denied,
        _ => return None,
    };
    let direction = match rec.direction {
        Direction::Ingress => ModelDirection::Ingress,
        Direction::Egress => ModelDirection::Egress,
    };
    let (local, peer): (SocketAddr, SocketAddr) = (rec.local, rec.remote);
    Some(VerdictEvent {
        time_unix_ms: clock.unix_ms(rec.ts_ns),
        cgroup_id: rec.cgroup_id,
        netns_ino,
        local_identity: Identity(rec.local_identity),
        peer_identity: Identity(rec.peer_identity),
        local_addr: local.ip(),
        local_port: local.port(),
        peer_addr: peer.ip(),
        peer_port: peer.port(),
        protocol,
        direction,
        verdict,
        rule_id: (rec.rule_id != 0).then_some(rec.rule_id),
        suppressed: 0,
        http: rec.http.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::Mode;

    #[test]
    fn generations_skip_zero() {
        assert_eq!(next_generation(0), 1);
        assert_eq!(next_generation(41), 42);
        assert_eq!(next_generation(u32::MAX), 2);
        for g in [0, 1, 2, 41, u32::MAX - 1, u32::MAX] {
            assert_ne!(next_generation(g) & 1, g & 1, "parity alternates after {g}");
            assert_ne!(next_generation(g), 0);
        }
    }

    #[test]
    fn boot_clock_converts_relative_to_now() {
        let c = BootClock::at(10_000_000_000, 1_700_000_000_000);
        assert_eq!(c.unix_ms(10_000_000_000), 1_700_000_000_000);
        assert_eq!(c.unix_ms(9_000_000_000), 1_699_999_999_000);
        // A stamp from "the future" (read after the clock) is now, not later.
        assert_eq!(c.unix_ms(11_000_000_000), 1_700_000_000_000);
    }

    fn record(verdict: u8, rule_id: u32, protocol: u8) -> VerdictRecord {
        VerdictRecord {
            ts_ns: 5_000_000_000,
            cgroup_id: 77,
            local: "10.0.0.2:80".parse().expect("addr"),
            remote: "10.0.0.3:40000".parse().expect("addr"),
            local_identity: 1002,
            peer_identity: 1003,
            rule_id,
            generation: 3,
            protocol,
            direction: Direction::Ingress,
            verdict,
            reason: abi::REASON_DEFAULT_DENY,
            mode: Mode::Monitor,
            http: None,
        }
    }

    #[test]
    fn events_name_rule_or_default_deny() {
        let clock = BootClock::at(6_000_000_000, 1_000_000);
        let e = to_event(&record(abi::VERDICT_AUDIT, 0, 6), 4026531840, &clock).expect("event");
        assert_eq!(e.verdict, Verdict::Audit);
        assert_eq!(e.rule_id, None);
        assert_eq!(e.time_unix_ms, 999_000);
        assert_eq!((e.local_port, e.peer_port), (80, 40000));
        assert_eq!(e.netns_ino, 4026531840);
        assert_eq!(e.direction, ModelDirection::Ingress);
        let e = to_event(&record(abi::VERDICT_ALLOWED, 9, 17), 0, &clock).expect("event");
        assert_eq!((e.verdict, e.rule_id, e.protocol), (Verdict::Forwarded, Some(9), Protocol::Udp));
        assert!(to_event(&record(99, 0, 6), 0, &clock).is_none());
        assert!(to_event(&record(abi::VERDICT_DENIED, 0, 1), 0, &clock).is_none());
    }
}
