//! Clock skew between an agent and the learner.
//!
//! Agents stamp flows and verdicts with their own wall clock. A node whose clock is an
//! hour off would put its flows an hour into the past or the future: outside the
//! learning window and the dashboard's recent ranges, or straight into retention
//! pruning. So every batch and verdict report carries the agent's clock at the moment
//! it was sent, and the learner compares that with its own clock on arrival.
//!
//! The difference is the skew plus the transit delay (queues, a slow store), and the
//! delay is never negative: the smallest difference over recent messages is the best
//! estimate (the "minimum filter" of NTP). A window rather than the all-time minimum,
//! so a node whose clock was corrected is believed again after a few messages.
//! Differences within [`TOLERANCE_MS`] are left alone: normal delivery jitter is not
//! worth rewriting an agent's timestamps for.

use std::collections::VecDeque;

/// Below this (either way) an agent's times are taken as they are.
pub const TOLERANCE_MS: i64 = 1_000;

/// Messages the minimum is taken over.
const WINDOW: usize = 16;

/// One agent stream's view of that agent's clock.
#[derive(Debug, Clone, Default)]
pub struct SkewEstimator {
    /// `learner clock − agent clock` at each recent arrival (skew + delay).
    samples: VecDeque<i64>,
    /// The estimate last handed out for storing.
    recorded: Option<i64>,
}

/// How far the estimate moves before it is stored again: the stored value is for
/// people and for alerts, not for arithmetic.
const RECORD_STEP_MS: i64 = 250;

impl SkewEstimator {
    /// Records a message the agent sent at `sent_unix_ms` (its clock; 0 = the agent does
    /// not say) and the learner received at `received_unix_ms`.
    pub fn observe(&mut self, sent_unix_ms: i64, received_unix_ms: i64) {
        if sent_unix_ms <= 0 {
            return;
        }
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(received_unix_ms.saturating_sub(sent_unix_ms));
    }

    /// The agent's skew as measured (`learner − agent`, ms), `None` before any
    /// message said when it was sent.
    pub fn skew_ms(&self) -> Option<i64> {
        self.samples.iter().copied().min()
    }

    /// The estimate when it should be stored: the first one of a stream, then whenever
    /// it has moved by more than [`RECORD_STEP_MS`].
    pub fn skew_to_record(&mut self) -> Option<i64> {
        let now = self.skew_ms()?;
        match self.recorded {
            Some(r) if (now - r).abs() <= RECORD_STEP_MS => None,
            _ => {
                self.recorded = Some(now);
                Some(now)
            }
        }
    }

    /// What to add to the agent's timestamps: the skew when it is beyond the
    /// tolerance, else 0.
    pub fn correction_ms(&self) -> i64 {
        match self.skew_ms() {
            Some(s) if s.abs() > TOLERANCE_MS => s,
            _ => 0,
        }
    }
}

/// An agent timestamp on the learner's clock. Zero stays zero ("not known" on the
/// wire); the sum saturates so hostile values cannot overflow.
pub fn corrected(agent_unix_ms: i64, correction_ms: i64) -> i64 {
    if agent_unix_ms == 0 { 0 } else { agent_unix_ms.saturating_add(correction_ms) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_an_hour_behind_is_corrected_by_the_smallest_difference() {
        let mut e = SkewEstimator::default();
        let hour = 3_600_000;
        // Agent clock = learner − 1 h; deliveries take 5, 40 and 2 ms.
        for (sent, delay) in [(1_000_000, 5), (1_001_000, 40), (1_002_000, 2)] {
            e.observe(sent, sent + hour + delay);
        }
        assert_eq!(e.skew_ms(), Some(hour + 2));
        assert_eq!(e.correction_ms(), hour + 2);
        assert_eq!(corrected(1_000_000, e.correction_ms()), 1_000_000 + hour + 2);
    }

    #[test]
    fn the_estimate_is_stored_once_and_again_when_it_moves() {
        let mut e = SkewEstimator::default();
        assert_eq!(e.skew_to_record(), None);
        e.observe(1_000, 1_010);
        assert_eq!(e.skew_to_record(), Some(10));
        e.observe(2_000, 2_005);
        assert_eq!(e.skew_to_record(), None, "5 ms is not news");
        for i in 0..WINDOW as i64 {
            e.observe(10_000 + i, 10_000 + i + 5_000);
        }
        assert_eq!(e.skew_to_record(), Some(5_000));
    }

    #[test]
    fn an_agent_ahead_gives_a_negative_correction() {
        let mut e = SkewEstimator::default();
        e.observe(10_000_000, 10_000_000 - 120_000 + 3);
        assert_eq!(e.correction_ms(), -120_000 + 3);
    }

    #[test]
    fn differences_within_the_tolerance_change_nothing() {
        let mut e = SkewEstimator::default();
        e.observe(5_000, 5_000 + TOLERANCE_MS);
        e.observe(6_000, 6_000 - TOLERANCE_MS);
        assert_eq!(e.skew_ms(), Some(-TOLERANCE_MS));
        assert_eq!(e.correction_ms(), 0);
    }

    #[test]
    fn messages_without_a_send_time_and_zero_timestamps_are_left_alone() {
        let mut e = SkewEstimator::default();
        e.observe(0, 99_999_999);
        assert_eq!(e.skew_ms(), None);
        assert_eq!(e.correction_ms(), 0);
        assert_eq!(corrected(0, 3_600_000), 0);
        assert_eq!(corrected(i64::MAX - 1, 3_600_000), i64::MAX);
    }

    #[test]
    fn a_corrected_clock_is_believed_after_a_window_of_messages() {
        let mut e = SkewEstimator::default();
        for i in 0..WINDOW as i64 {
            e.observe(1_000 + i, 1_000 + i + 60_000);
        }
        assert_eq!(e.correction_ms(), 60_000);
        for i in 0..WINDOW as i64 {
            e.observe(2_000_000 + i, 2_000_000 + i + 3);
        }
        assert_eq!(e.correction_ms(), 0);
    }
}
