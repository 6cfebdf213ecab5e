//! Draining the kernel's UDP aggregates (`UDP_FLOWS_V1`).
//!
//! The kernel only ever adds to a flow's counters. User space remembers what it
//! already reported per 5-tuple and emits the difference as a Traffic event, so
//! no counter is ever reset under the kernel's feet (a read-then-zero would lose
//! the datagrams counted in between). Flows idle for longer than the idle timeout
//! are reported one last time and deleted, which keeps the LRU map for live flows.
//!
//! Known, bounded losses (documented rather than hidden):
//! * a datagram counted between our last read of an idle entry and its deletion;
//! * counters of an entry the LRU evicted before we read them (the map is sized so
//!   this only happens under a flood of new 5-tuples; the next datagram of such a
//!   flow re-creates it and reports a new Connect/Accept).
//!
//! A flow that resumes after being idle past the timeout is, likewise, reported
//! as a new Connect/Accept: for UDP there is no connection to tell otherwise.

use std::collections::HashMap;
use std::time::Duration;

use bulkhead_abi::collector::{UdpFlowKey, UdpFlowValue};

use super::decode::{self, BootClock};
use crate::event::SockEvent;

/// Counters already reported for one flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reported {
    bytes_sent: u64,
    bytes_received: u64,
    packets: u64,
}

/// What one sweep produced.
#[derive(Debug, Default)]
pub struct SweepResult {
    pub events: Vec<SockEvent>,
    /// Idle flows fully reported: delete them from the kernel map.
    pub expired: Vec<UdpFlowKey>,
}

#[derive(Debug)]
pub struct UdpSweeper {
    reported: HashMap<UdpFlowKey, Reported>,
    idle_timeout_ns: u64,
}

impl UdpSweeper {
    pub fn new(idle_timeout: Duration) -> Self {
        Self { reported: HashMap::new(), idle_timeout_ns: u64::try_from(idle_timeout.as_nanos()).unwrap_or(u64::MAX) }
    }

    /// Compares a snapshot of the kernel map with what was reported.
    ///
    /// `created_before_ns`: entries created after this boot time are left for the
    /// next sweep, so a flow's Connect/Accept (read from the ring buffer just
    /// before the sweep) always precedes its first Traffic event.
    pub fn sweep(
        &mut self,
        snapshot: impl IntoIterator<Item = (UdpFlowKey, UdpFlowValue)>,
        now_ns: u64,
        created_before_ns: u64,
        clock: &BootClock,
    ) -> SweepResult {
        let mut out = SweepResult::default();
        let mut live: HashMap<UdpFlowKey, Reported> = HashMap::with_capacity(self.reported.len());
        for (key, value) in snapshot {
            if value.first_ns > created_before_ns {
                if let Some(prev) = self.reported.get(&key) {
                    live.insert(key, *prev);
                }
                continue;
            }
            let prev = self.reported.get(&key).copied().unwrap_or_default();
            let now = Reported {
                bytes_sent: value.bytes_sent,
                bytes_received: value.bytes_received,
                packets: value.packets_sent.saturating_add(value.packets_received),
            };
            // A counter below what we reported means the entry was deleted and
            // re-created (LRU eviction or our own expiry racing a datagram): its
            // counts are all new.
            let base = if now.bytes_sent < prev.bytes_sent
                || now.bytes_received < prev.bytes_received
                || now.packets < prev.packets
            {
                Reported::default()
            } else {
                prev
            };
            let delta = (
                now.bytes_sent - base.bytes_sent,
                now.bytes_received - base.bytes_received,
                now.packets - base.packets,
            );
            if delta != (0, 0, 0) {
                match decode::udp_traffic(&key, &value, delta, clock) {
                    Ok(ev) => out.events.push(ev),
                    Err(err) => tracing::debug!(error = %err, "Skipping an undecodable UDP aggregate."),
                }
            }
            if now_ns.saturating_sub(value.last_ns) > self.idle_timeout_ns {
                out.expired.push(key);
            } else {
                live.insert(key, now);
            }
        }
        // Entries gone from the kernel map (expired by us or evicted) are forgotten.
        self.reported = live;
        out
    }

    pub fn tracked(&self) -> usize {
        self.reported.len()
    }
}

#[cfg(test)]
mod tests {
    use bulkhead_abi::collector::AF_INET;

    use super::*;
    use crate::event::SockEventKind;

    fn key(port: u16) -> UdpFlowKey {
        let mut k = UdpFlowKey {
            netns_ino: 9,
            laddr: [0; 16],
            raddr: [0; 16],
            lport: port,
            rport: 53,
            family: AF_INET,
            _pad: [0; 2],
        };
        k.laddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.raddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        k
    }

    fn value(first: u64, last: u64, sent: u64, recv: u64) -> UdpFlowValue {
        UdpFlowValue {
            first_ns: first,
            last_ns: last,
            bytes_sent: sent,
            bytes_received: recv,
            packets_sent: u64::from(sent > 0),
            packets_received: u64::from(recv > 0),
            cgroup_id: 3,
            sock: 4,
            pid: 5,
            _pad: [0; 4],
            comm: [0; 16],
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn reports_deltas_then_expires_idle_flows() {
        let clock = BootClock::with_offset_ms(0);
        let mut s = UdpSweeper::new(Duration::from_secs(30));
        let r = s.sweep([(key(1000), value(SEC, SEC, 40, 0))], 2 * SEC, 2 * SEC, &clock);
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.events[0].kind, SockEventKind::Traffic);
        assert_eq!((r.events[0].bytes_sent, r.events[0].bytes_received, r.events[0].packets), (40, 0, 1));
        assert!(r.expired.is_empty());

        // Nothing new: no event.
        let r = s.sweep([(key(1000), value(SEC, SEC, 40, 0))], 3 * SEC, 3 * SEC, &clock);
        assert!(r.events.is_empty());

        // More bytes: only the delta.
        let r = s.sweep([(key(1000), value(SEC, 4 * SEC, 40, 100))], 4 * SEC, 4 * SEC, &clock);
        assert_eq!((r.events[0].bytes_sent, r.events[0].bytes_received), (0, 100));

        // Idle past the timeout: expired, forgotten.
        let r = s.sweep([(key(1000), value(SEC, 4 * SEC, 40, 100))], 40 * SEC, 40 * SEC, &clock);
        assert!(r.events.is_empty());
        assert_eq!(r.expired, vec![key(1000)]);
        assert_eq!(s.tracked(), 0);
    }

    #[test]
    fn young_entries_wait_for_the_next_sweep() {
        let clock = BootClock::with_offset_ms(0);
        let mut s = UdpSweeper::new(Duration::from_secs(30));
        let r = s.sweep([(key(1), value(5 * SEC, 5 * SEC, 10, 0))], 5 * SEC, 4 * SEC, &clock);
        assert!(r.events.is_empty());
        let r = s.sweep([(key(1), value(5 * SEC, 5 * SEC, 10, 0))], 6 * SEC, 6 * SEC, &clock);
        assert_eq!(r.events.len(), 1);
    }

    #[test]
    fn recreated_entry_counts_from_zero() {
        let clock = BootClock::with_offset_ms(0);
        let mut s = UdpSweeper::new(Duration::from_secs(30));
        let _ = s.sweep([(key(1), value(SEC, SEC, 1000, 0))], SEC, SEC, &clock);
        let r = s.sweep([(key(1), value(2 * SEC, 2 * SEC, 10, 0))], 3 * SEC, 3 * SEC, &clock);
        assert_eq!(r.events[0].bytes_sent, 10);
    }

    #[test]
    fn evicted_entries_are_forgotten() {
        let clock = BootClock::with_offset_ms(0);
        let mut s = UdpSweeper::new(Duration::from_secs(30));
        let _ = s.sweep([(key(1), value(SEC, SEC, 1, 0)), (key(2), value(SEC, SEC, 1, 0))], SEC, SEC, &clock);
        assert_eq!(s.tracked(), 2);
        let _ = s.sweep([(key(2), value(SEC, SEC, 1, 0))], SEC, SEC, &clock);
        assert_eq!(s.tracked(), 1);
    }
}
