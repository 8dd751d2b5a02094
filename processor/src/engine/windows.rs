//! Tumbling, epoch-aligned event-time windows (CONTRACT.md "Windows").
//!
//! `WindowStore` keeps, per open window, additive [`Measures`] cells keyed
//! by grain. Cells are sums, so partial cells computed from different input
//! partitions merge by addition in any order: that is what lets a later
//! scale-out stage combine per-partition partials. A window is handed out
//! exactly once, when the watermark reaches `window_end + allowed_lateness`;
//! after that no cell of it can change (the engine routes anything that
//! would touch it to late).
//!
//! A window's cells are an append-only log, not a table keyed by grain: a
//! window holds about one grain per impression, so a table of them was
//! larger than the cache and every record's update of its cell was a
//! random memory access (a sixth of the engine's time). Appending is
//! sequential. Entries of the same grain are merged when the window closes,
//! right after the sort into grain order that its output needs anyway, and
//! in between whenever the log has doubled since it was last merged, so a
//! window of few grains and many records stays small.
//!
//! Invariant: every entry holds one reference to its grain in the
//! [`Interner`]; merging gives back the references of the entries merged
//! away, so each cell handed out holds exactly one.

use std::collections::BTreeMap;

use super::ids::{GrainId, Interner};

/// What one cell counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Measures {
    pub impressions: i64,
    pub clicks: i64,
    pub conversions: i64,
    pub cost_micros: i64,
    pub revenue_micros: i64,
}

impl Measures {
    pub fn merge(&mut self, o: &Measures) {
        self.impressions += o.impressions;
        self.clicks += o.clicks;
        self.conversions += o.conversions;
        self.cost_micros += o.cost_micros;
        self.revenue_micros += o.revenue_micros;
    }

    /// Clicks per impression (CONTRACT.md's rates: `None` on a zero denominator).
    pub fn ctr(&self) -> Option<f64> {
        adstream_schemas::records::rate(self.clicks, self.impressions)
    }

    /// Conversions per click.
    pub fn conversion_rate(&self) -> Option<f64> {
        adstream_schemas::records::rate(self.conversions, self.clicks)
    }

    pub fn impression(cost_micros: i64) -> Measures {
        Measures {
            impressions: 1,
            cost_micros,
            ..Default::default()
        }
    }

    pub fn click(cost_micros: i64) -> Measures {
        Measures {
            clicks: 1,
            cost_micros,
            ..Default::default()
        }
    }

    pub fn conversion(revenue_micros: i64) -> Measures {
        Measures {
            conversions: 1,
            revenue_micros,
            ..Default::default()
        }
    }
}

/// A window handed out when the watermark passed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClosedWindow {
    pub start: i64,
    pub end: i64,
    /// One cell per grain, in grain order ([`Interner::sorted_cells`]); each
    /// holds one reference to its grain.
    pub cells: Vec<(GrainId, Measures)>,
}

/// Fewest entries at which a window's log is merged before it closes.
const MERGE_AT_LEAST: usize = 1 << 17;

/// Most emptied cell vectors kept for new windows (see
/// [`WindowStore::recycle`]).
const MAX_SPARE: usize = 64;

/// One open window's cells.
///
/// Serialized as its entries alone: the same bytes (in bincode) as the map
/// from grain to cell that checkpoint format 3 held, so those checkpoints
/// read as logs without repeated grains.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct WindowLog {
    entries: Vec<(GrainId, Measures)>,
    /// Length after the last merge; the log is merged again once it has
    /// doubled (and holds at least [`MERGE_AT_LEAST`] entries).
    #[serde(skip)]
    merged_len: usize,
}

impl WindowLog {
    /// Merges entries of the same grain, in raw grain-id order (not the
    /// output order: that needs the dimension values, and is only wanted
    /// once, at close).
    fn merge(&mut self, interner: &mut Interner) {
        self.entries.sort_unstable_by_key(|(g, _)| *g);
        merge_adjacent(&mut self.entries, interner);
        self.merged_len = self.entries.len();
    }
}

/// Merges runs of equal grains in `cells` (equal grains must be adjacent),
/// giving back the references of the entries merged away.
fn merge_adjacent(cells: &mut Vec<(GrainId, Measures)>, interner: &mut Interner) {
    let mut kept = 0;
    for i in 0..cells.len() {
        let (g, m) = cells[i];
        if kept > 0 && cells[kept - 1].0 == g {
            cells[kept - 1].1.merge(&m);
            interner.release(g);
        } else {
            cells[kept] = (g, m);
            kept += 1;
        }
    }
    cells.truncate(kept);
}

/// Open windows and their cells.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct WindowStore {
    size: i64,
    allowed_lateness: i64,
    open: BTreeMap<i64, WindowLog>,
    /// Emptied cell vectors of emitted windows ([`WindowStore::recycle`]),
    /// for new windows' logs: memory the allocator might have handed back
    /// to the system, to be faulted in and zeroed again every window.
    #[serde(skip)]
    spare: Vec<Vec<(GrainId, Measures)>>,
}

impl WindowStore {
    pub fn new(size: i64, allowed_lateness: i64) -> Self {
        assert!(size > 0, "window size must be positive");
        WindowStore {
            size,
            allowed_lateness,
            open: BTreeMap::new(),
            spare: Vec::new(),
        }
    }

    /// Start of the window holding `t`.
    pub fn window_start(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.size)
    }

    /// Whether the window holding `t` has already been emitted at watermark `wm`.
    pub fn is_emitted(&self, t: i64, wm: i64) -> bool {
        self.closes_at(self.window_start(t)) <= wm
    }

    fn closes_at(&self, start: i64) -> i64 {
        start
            .saturating_add(self.size)
            .saturating_add(self.allowed_lateness)
    }

    /// Adds `m` to the cell of (window of `t`, `grain`), taking a reference
    /// to `grain` (the caller's own is left as it was).
    pub fn add(&mut self, t: i64, grain: GrainId, m: &Measures, interner: &mut Interner) {
        let start = self.window_start(t);
        let spare = &mut self.spare;
        let log = self.open.entry(start).or_insert_with(|| WindowLog {
            entries: spare.pop().unwrap_or_default(),
            merged_len: 0,
        });
        interner.retain(grain);
        log.entries.push((grain, *m));
        if log.entries.len() >= MERGE_AT_LEAST.max(2 * log.merged_len) {
            log.merge(interner);
        }
    }

    /// Removes and returns every window that watermark `wm` closes, oldest
    /// first, each with one cell per grain in grain order.
    pub fn close_until(&mut self, wm: i64, interner: &mut Interner) -> Vec<ClosedWindow> {
        let mut out = Vec::new();
        while let Some((&start, _)) = self.open.first_key_value() {
            if self.closes_at(start) > wm {
                break;
            }
            let Some(log) = self.open.remove(&start) else {
                break;
            };
            let mut cells = self.spare.pop().unwrap_or_default();
            interner.sorted_cells(&log.entries, &mut cells);
            self.recycle(log.entries);
            merge_adjacent(&mut cells, interner);
            out.push(ClosedWindow {
                start,
                end: start + self.size,
                cells,
            });
        }
        out
    }

    /// Takes back the cell vector of an emitted window, for a later
    /// window's log.
    pub fn recycle(&mut self, mut cells: Vec<(GrainId, Measures)>) {
        cells.clear();
        // Windows close in bursts (one mark can close several) and open one
        // at a time; about as many will open soon as are open now (the
        // watermark's lag behind the newest event time), so keep that many.
        // Keeping more would hold the memory of a burst of large windows
        // (a backlog read at full speed) for nothing.
        if self.spare.len() < self.open.len().clamp(2, MAX_SPARE) {
            self.spare.push(cells);
        }
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grain(i: &mut Interner, keyword: &str) -> GrainId {
        i.grain("c1", "a1", keyword, "CA", "10.0.0.0/24", "mobile")
    }

    #[test]
    fn event_at_window_end_belongs_to_next_window() {
        let mut i = Interner::default();
        let g = grain(&mut i, "kw");
        let mut w = WindowStore::new(60_000, 0);
        w.add(59_999, g, &Measures::impression(1), &mut i);
        w.add(60_000, g, &Measures::impression(1), &mut i);
        w.add(60_001, g, &Measures::click(1), &mut i);
        let closed = w.close_until(60_000, &mut i);
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].start, closed[0].end), (0, 60_000));
        assert!(w.close_until(119_999, &mut i).is_empty());
        let next = w.close_until(120_000, &mut i);
        assert_eq!(next.len(), 1);
        let mut both = Measures::impression(1);
        both.merge(&Measures::click(1));
        assert_eq!(next[0].cells, vec![(g, both)]);
    }

    #[test]
    fn lateness_delays_close() {
        let mut i = Interner::default();
        let g = grain(&mut i, "kw");
        let mut w = WindowStore::new(60_000, 5_000);
        w.add(10, g, &Measures::click(7), &mut i);
        assert!(w.close_until(64_999, &mut i).is_empty());
        assert!(!w.is_emitted(10, 64_999));
        assert!(w.is_emitted(10, 65_000));
        let c = w.close_until(65_000, &mut i);
        assert_eq!(c[0].cells, vec![(g, Measures::click(7))]);
    }

    #[test]
    fn negative_times_align_to_epoch() {
        let w = WindowStore::new(60_000, 0);
        assert_eq!(w.window_start(-1), -60_000);
    }

    #[test]
    fn measures_merge_in_any_order() {
        let a = Measures::impression(3);
        let b = Measures::click(5);
        let c = Measures::conversion(11);
        let mut x = a;
        x.merge(&b);
        x.merge(&c);
        let mut y = c;
        y.merge(&a);
        y.merge(&b);
        assert_eq!(x, y);
    }

    /// Many records over few grains, enough to merge the log several times
    /// before close: one cell per grain comes out, in grain order, with the
    /// sums of its records, and each holds exactly one reference.
    #[test]
    fn repeated_grains_merge_into_one_cell_each_in_grain_order() {
        let mut i = Interner::default();
        // Interned in reverse of grain order, so that raw-id order (used
        // by merges before close) is not the output order.
        let grains: Vec<GrainId> = (0..7u8)
            .rev()
            .map(|n| grain(&mut i, &format!("kw{n}")))
            .collect();
        let mut w = WindowStore::new(60_000, 0);
        let records = 3 * MERGE_AT_LEAST + 5;
        let mut expected = vec![Measures::default(); grains.len()];
        for r in 0..records {
            let k = (r * 5 + r / 3) % grains.len();
            let m = if r % 4 == 0 {
                Measures::click(r as i64)
            } else {
                Measures::impression(r as i64)
            };
            w.add(r as i64 % 60_000, grains[k], &m, &mut i);
            expected[k].merge(&m);
        }
        assert!(
            w.open
                .values()
                .all(|l| l.entries.len() < 2 * MERGE_AT_LEAST),
            "the log was not merged while it grew"
        );
        let closed = w.close_until(60_000, &mut i);
        let cells = &closed[0].cells;
        let mut want: Vec<(GrainId, Measures)> = grains.iter().copied().zip(expected).collect();
        want.reverse();
        assert_eq!(cells, &want);
        // With our own references given back, the cells hold the only
        // ones left: one each, so releasing them frees every string.
        for g in &grains {
            i.release(*g);
        }
        assert!(i.strings() > 0);
        for (g, _) in cells {
            i.release(*g);
        }
        assert_eq!(i.strings(), 0);
    }

    /// Checkpoint format 3 held each window's cells as a map from grain to
    /// cell; those bytes read back as a log with the same cells.
    #[test]
    fn format_3_windows_read_back_as_logs() {
        #[derive(serde::Serialize)]
        struct Format3 {
            size: i64,
            allowed_lateness: i64,
            open: BTreeMap<i64, hashbrown::HashMap<GrainId, Measures>>,
        }
        let mut i = Interner::default();
        let (a, b) = (grain(&mut i, "a"), grain(&mut i, "b"));
        let cells =
            hashbrown::HashMap::from([(a, Measures::impression(3)), (b, Measures::click(4))]);
        let old = Format3 {
            size: 60_000,
            allowed_lateness: 0,
            open: BTreeMap::from([(0, cells)]),
        };
        let mut w: WindowStore =
            bincode::deserialize(&bincode::serialize(&old).expect("serialize")).expect("reads");
        let closed = w.close_until(60_000, &mut i);
        assert_eq!(
            closed[0].cells,
            vec![(a, Measures::impression(3)), (b, Measures::click(4))]
        );
    }
}
