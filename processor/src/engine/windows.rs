//! Tumbling, epoch-aligned event-time windows (CONTRACT.md "Windows").
//!
//! `WindowStore` keeps one additive [`Measures`] cell per (window, grain).
//! Cells are sums, so partial cells computed from different input partitions
//! merge by addition in any order: that is what lets a later scale-out stage
//! combine per-partition partials. A window is handed out exactly once, when
//! the watermark reaches `window_end + allowed_lateness`; after that no cell of
//! it can change (the engine routes anything that would touch it to late).

use std::collections::BTreeMap;

use hashbrown::HashMap;

use super::ids::GrainId;

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
    pub cells: Vec<(GrainId, Measures)>,
}

/// Open windows and their cells.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct WindowStore {
    size: i64,
    allowed_lateness: i64,
    open: BTreeMap<i64, HashMap<GrainId, Measures>>,
    /// The cell table of the last closed window, emptied, for the next one
    /// to open: a fresh table would grow (rehash) and touch new pages all
    /// over again every window.
    #[serde(skip)]
    spare: Option<HashMap<GrainId, Measures>>,
}

impl WindowStore {
    pub fn new(size: i64, allowed_lateness: i64) -> Self {
        assert!(size > 0, "window size must be positive");
        WindowStore {
            size,
            allowed_lateness,
            open: BTreeMap::new(),
            spare: None,
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

    /// Adds `m` to the cell of (window of `t`, `grain`). Returns whether
    /// the cell is new (it then holds a reference to `grain`, given back
    /// when the closed window is emitted).
    #[must_use = "a new cell must take a reference to its grain"]
    pub fn add(&mut self, t: i64, grain: GrainId, m: &Measures) -> bool {
        let start = self.window_start(t);
        let mut new = false;
        self.open
            .entry(start)
            .or_insert_with(|| self.spare.take().unwrap_or_default())
            .entry(grain)
            .or_insert_with(|| {
                new = true;
                Measures::default()
            })
            .merge(m);
        new
    }

    /// Removes and returns every window that watermark `wm` closes, oldest first.
    pub fn close_until(&mut self, wm: i64) -> Vec<ClosedWindow> {
        let mut out = Vec::new();
        while let Some(&start) = self.open.keys().next() {
            if self.closes_at(start) > wm {
                break;
            }
            let mut cells = Vec::new();
            if let Some(mut m) = self.open.remove(&start) {
                cells.extend(m.drain());
                self.spare = Some(m);
            }
            out.push(ClosedWindow {
                start,
                end: start + self.size,
                cells,
            });
        }
        out
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    pub fn open_cells(&self) -> usize {
        self.open.values().map(|m| m.len()).sum()
    }

    /// Every open cell (for checkpoints), oldest window first.
    pub fn cells(&self) -> impl Iterator<Item = (i64, GrainId, Measures)> + '_ {
        self.open
            .iter()
            .flat_map(|(s, m)| m.iter().map(move |(g, c)| (*s, *g, *c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: GrainId = [1, 2, 3, 4, 5, 6];

    #[test]
    fn event_at_window_end_belongs_to_next_window() {
        let mut w = WindowStore::new(60_000, 0);
        assert!(w.add(59_999, G, &Measures::impression(1)));
        assert!(w.add(60_000, G, &Measures::impression(1)));
        assert!(!w.add(60_001, G, &Measures::click(1)));
        let closed = w.close_until(60_000);
        assert_eq!(closed.len(), 1);
        assert_eq!((closed[0].start, closed[0].end), (0, 60_000));
        assert!(w.close_until(119_999).is_empty());
        assert_eq!(w.close_until(120_000).len(), 1);
    }

    #[test]
    fn lateness_delays_close() {
        let mut w = WindowStore::new(60_000, 5_000);
        assert!(w.add(10, G, &Measures::click(7)));
        assert!(w.close_until(64_999).is_empty());
        assert!(!w.is_emitted(10, 64_999));
        assert!(w.is_emitted(10, 65_000));
        let c = w.close_until(65_000);
        assert_eq!(c[0].cells, vec![(G, Measures::click(7))]);
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
}
