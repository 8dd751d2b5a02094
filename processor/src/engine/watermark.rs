//! Event-time watermarks (CONTRACT.md "Partition watermark", "Processor watermark").
//!
//! A partition's watermark is the highest valid `event_time` it has carried
//! minus the maximum out-of-orderness. The processor watermark is the minimum
//! over the active partitions, where a partition marked idle (by the runtime,
//! which knows wall time and consumer lag) stops holding it back until it
//! carries data again. When every partition is idle, nothing holds the
//! watermark back and it moves to the highest partition watermark, so that
//! the tail of a finished input is emitted.
//!
//! Invariant: the processor watermark never decreases. A partition that comes
//! back from idleness below it cannot move it back; its records for windows
//! already emitted are late.

use std::collections::BTreeMap;

/// An input partition: topic index (0 impressions, 1 clicks, 2 conversions) and partition.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct InputPartition {
    pub topic: u8,
    pub partition: i32,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct PartitionState {
    max_event_time: Option<i64>,
    idle: bool,
}

/// A partition's watermark given its highest event time (`i64::MIN` before
/// it has data).
fn watermark_of(max_event_time: Option<i64>, max_out_of_orderness: i64) -> i64 {
    max_event_time.map_or(i64::MIN, |t| t.saturating_sub(max_out_of_orderness))
}

/// Tracks partition watermarks and the processor watermark.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WatermarkTracker {
    max_out_of_orderness: i64,
    partitions: BTreeMap<InputPartition, PartitionState>,
    current: i64,
    /// What [`advance`](Self::advance) last computed from the partitions,
    /// while no change since could alter it: recomputing it meant a pass
    /// over every partition per record.
    #[serde(skip)]
    candidate: Option<i64>,
}

impl WatermarkTracker {
    pub fn new(max_out_of_orderness: i64) -> Self {
        WatermarkTracker {
            max_out_of_orderness,
            partitions: BTreeMap::new(),
            current: i64::MIN,
            candidate: None,
        }
    }

    /// Starts tracking `p` (no data yet, so it holds the watermark at its minimum until it has data or is idle).
    pub fn add_partition(&mut self, p: InputPartition) {
        self.candidate = None;
        self.partitions.entry(p).or_insert(PartitionState {
            max_event_time: None,
            idle: false,
        });
    }

    /// Restores a partition's highest event time (e.g. from a checkpoint).
    pub fn restore_partition(&mut self, p: InputPartition, max_event_time: Option<i64>) {
        self.candidate = None;
        self.partitions.insert(
            p,
            PartitionState {
                max_event_time,
                idle: false,
            },
        );
    }

    /// Stops tracking `p` (revoked).
    pub fn remove_partition(&mut self, p: InputPartition) {
        self.candidate = None;
        self.partitions.remove(&p);
    }

    /// The partition's watermark; `i64::MIN` before it has data.
    pub fn partition_watermark(&self, p: InputPartition) -> i64 {
        let max_event_time = self.partitions.get(&p).and_then(|s| s.max_event_time);
        watermark_of(max_event_time, self.max_out_of_orderness)
    }

    /// Highest event time seen in `p`.
    pub fn max_event_time(&self, p: InputPartition) -> Option<i64> {
        self.partitions.get(&p).and_then(|s| s.max_event_time)
    }

    /// Records a valid event of `p` at `event_time`; the partition becomes
    /// active. Returns the partition's watermark just before it (what
    /// lateness is judged against: one lookup for both, per record).
    pub fn observe(&mut self, p: InputPartition, event_time: i64) -> i64 {
        let s = self.partitions.entry(p).or_insert_with(|| {
            self.candidate = None;
            PartitionState {
                max_event_time: None,
                idle: false,
            }
        });
        let before = s.max_event_time;
        let after = before.map_or(event_time, |m| m.max(event_time));
        // The minimum over active partitions can only change if `p` joins
        // them or rises from exactly that minimum.
        let held_min = self.candidate == Some(watermark_of(before, self.max_out_of_orderness));
        if s.idle || (held_min && before != Some(after)) {
            self.candidate = None;
        }
        s.idle = false;
        s.max_event_time = Some(after);
        watermark_of(before, self.max_out_of_orderness)
    }

    /// Marks `p` idle or active.
    pub fn set_idle(&mut self, p: InputPartition, idle: bool) {
        if let Some(s) = self.partitions.get_mut(&p) {
            if s.idle != idle {
                self.candidate = None;
            }
            s.idle = idle;
        }
    }

    /// Whether there are partitions and every one is idle.
    pub fn all_idle(&self) -> bool {
        !self.partitions.is_empty() && self.partitions.values().all(|s| s.idle)
    }

    pub fn is_idle(&self, p: InputPartition) -> bool {
        self.partitions.get(&p).is_some_and(|s| s.idle)
    }

    /// Recomputes the processor watermark; returns it (never lower than before).
    pub fn advance(&mut self) -> i64 {
        let candidate = match self.candidate {
            Some(c) => c,
            None => {
                let c = self.compute_candidate();
                self.candidate = Some(c);
                c
            }
        };
        debug_assert_eq!(candidate, self.compute_candidate());
        self.current = self.current.max(candidate);
        self.current
    }

    /// The minimum watermark of the active partitions; with none active,
    /// the maximum of all.
    fn compute_candidate(&self) -> i64 {
        let wm = |s: &PartitionState| watermark_of(s.max_event_time, self.max_out_of_orderness);
        let active_min = self.partitions.values().filter(|s| !s.idle).map(wm).min();
        match active_min {
            Some(m) => m,
            None => self.partitions.values().map(wm).max().unwrap_or(i64::MIN),
        }
    }

    /// The processor watermark as of the last [`advance`](Self::advance).
    pub fn current(&self) -> i64 {
        self.current
    }

    /// Forces the processor watermark up to at least `wm` (restored checkpoints).
    pub fn restore_current(&mut self, wm: i64) {
        self.current = self.current.max(wm);
    }

    pub fn partitions(&self) -> impl Iterator<Item = (InputPartition, Option<i64>)> + '_ {
        self.partitions.iter().map(|(p, s)| (*p, s.max_event_time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(topic: u8, partition: i32) -> InputPartition {
        InputPartition { topic, partition }
    }

    #[test]
    fn minimum_over_partitions() {
        let mut w = WatermarkTracker::new(5_000);
        w.add_partition(p(0, 0));
        w.add_partition(p(0, 1));
        w.observe(p(0, 0), 100_000);
        assert_eq!(w.advance(), i64::MIN, "partition 1 has no data yet");
        w.observe(p(0, 1), 50_000);
        assert_eq!(w.advance(), 45_000);
        assert_eq!(w.partition_watermark(p(0, 0)), 95_000);
        assert_eq!(w.observe(p(0, 0), 120_000), 95_000, "the watermark before");
        assert_eq!(w.observe(p(0, 0), 99_000), 115_000, "the watermark before");
        assert_eq!(w.partition_watermark(p(0, 0)), 115_000);
    }

    #[test]
    fn idle_partition_stops_holding_back_and_watermark_never_decreases() {
        let mut w = WatermarkTracker::new(0);
        w.add_partition(p(0, 0));
        w.add_partition(p(1, 0));
        w.observe(p(0, 0), 1_000);
        w.observe(p(1, 0), 10);
        assert_eq!(w.advance(), 10);
        w.set_idle(p(1, 0), true);
        assert_eq!(w.advance(), 1_000);
        // Data again in the idle partition: it rejoins, but cannot move the watermark back.
        w.observe(p(1, 0), 20);
        assert_eq!(w.advance(), 1_000);
        w.observe(p(1, 0), 2_000);
        w.observe(p(0, 0), 3_000);
        assert_eq!(w.advance(), 2_000);
    }

    #[test]
    fn all_idle_moves_to_the_highest() {
        let mut w = WatermarkTracker::new(100);
        w.observe(p(0, 0), 1_000);
        w.observe(p(2, 3), 5_000);
        w.set_idle(p(0, 0), true);
        w.set_idle(p(2, 3), true);
        assert_eq!(w.advance(), 4_900);
    }
}
