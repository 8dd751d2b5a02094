//! The rollup stage: combines per-task partial windows into the final
//! `ad-metrics`, `campaign-ctr` and alert outputs (scale-out, issue 7).
//!
//! A join task ([`Engine`](super::Engine) in task mode) owns one input
//! partition of each input topic. When its own watermark closes a window it
//! hands out that window's cells as [`Partial`]s, one per campaign, in
//! (window, campaign) order, and afterwards announces its watermark with a
//! [`Mark`]. Its cells for a window are final once its watermark has passed
//! the window: anything later that would add to it is late in that task's
//! own partitions (CONTRACT.md rule 2a), which is why the task-local close is
//! safe.
//!
//! A [`Rollup`] owns a set of campaigns (a partition of the partials topic).
//! It sums the partial cells of every task and closes a window when the
//! minimum of the tasks' announced watermarks reaches `window_end +
//! allowed_lateness`. That minimum over tasks is the minimum over all input
//! partitions, CONTRACT.md's processor watermark, so windows close exactly
//! where a single engine owning every partition closes them, and the outputs
//! are the same whatever the number of instances. Until every task has
//! spoken the minimum is unknown and nothing closes.
//!
//! Idleness: CONTRACT.md's processor watermark leaves idle partitions out
//! (and is the highest partition watermark when all are idle). The rollup
//! computes that *global* watermark from the marks ([`Rollup::global`]) and
//! it is fed back to join tasks whose partitions are all idle
//! ([`Engine::on_global_watermark`](super::Engine::on_global_watermark)):
//! such a task follows it, flushes its windows and announces the raised
//! watermark. Windows still close only on the minimum over every task's
//! announcement, so an idle task's cells are never left behind.
//!
//! Invariants:
//! - a task's partials arrive in strictly increasing (window, campaign,
//!   chunk) order; anything not above the last accepted one is a replayed copy (a
//!   broker that shows aborted transactions to `read_committed` readers) and
//!   is dropped, so replays never double count;
//! - a window is emitted once; partial cells that reach an emitted window
//!   (possible only after idleness let the watermark pass a task) are counted
//!   in `late_cells` and dropped.

use serde::{Deserialize, Serialize};

use adstream_schemas::records::AdMetricRef;
use adstream_schemas::{AdMetric, CampaignCtr};

use super::anomaly::{AnomalyDetector, CampaignWindow};
use super::ids::{self, BatchStrings, GrainId, Interner};
use super::windows::{ClosedWindow, Measures, WindowStore};
use super::{EngineConfig, EngineStats, Output};

/// One task's final cells of one window for one campaign, or a chunk of
/// them: a campaign with many grains in a window is split so no message
/// comes near the broker's message size limit.
///
/// The cells' strings are in `strings` once each; a cell names them by
/// index, in grain order (campaign, ad, keyword, state, ip range, device),
/// the IP range coded as in a [`GrainId`] (an IPv4 /24 as its number, a
/// text range as a flagged index). A cell of text strings was about 140
/// bytes on the topic, and a rollup hashed its six strings; this one is 64
/// bytes and maps indices through a table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    pub window_start: i64,
    pub window_end: i64,
    pub campaign_id: String,
    /// 0, 1, … within (window, campaign).
    pub chunk: u32,
    /// The distinct strings of the cells.
    pub strings: Vec<String>,
    /// Cells in grain order; every grain's campaign is `campaign_id`.
    pub cells: Vec<(GrainId, Measures)>,
}

impl Partial {
    /// The dimension values of cell `i`, if its indices are in range.
    pub fn values(&self, i: usize) -> Option<[String; 6]> {
        let mut ip = String::new();
        let g = self.cells.get(i)?.0;
        let table = |id: u32| self.strings.get(id as usize).map(String::as_str);
        let v = ids::values_in(g, table, &mut ip)?;
        Some(v.map(str::to_owned))
    }
}

/// A task's watermark announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub watermark: i64,
    /// Every partition of the task is idle: it stops holding the watermark back.
    pub idle: bool,
    /// Wall time (epoch ms) the task published this watermark. Only for
    /// measuring emit latency; it never affects what is emitted.
    pub at_ms: i64,
}

/// What travels on the partials topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PartialMessage {
    /// Cells with their strings in each cell, as checkpoint format 2 wrote
    /// them; never written now, and refused when read (an upgrade starts
    /// from fresh checkpoints anyway).
    TextCells,
    Mark {
        task: u32,
        mark: Mark,
    },
    Cells {
        task: u32,
        partial: Partial,
    },
}

impl PartialMessage {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain data into a Vec cannot fail.
        bincode::serialize(self).unwrap_or_default()
    }
}

/// A [`PartialMessage`] decoded in place: the same encoding, its strings
/// pointing into the record, so a rollup interns them without allocating.
#[derive(Debug, Deserialize)]
pub enum PartialMessageRef<'a> {
    TextCells,
    Mark {
        task: u32,
        mark: Mark,
    },
    Cells {
        task: u32,
        #[serde(borrow)]
        partial: PartialRef<'a>,
    },
}

impl<'a> PartialMessageRef<'a> {
    pub fn decode(bytes: &'a [u8]) -> Result<Self, bincode::Error> {
        bincode::deserialize(bytes)
    }
}

/// A [`Partial`], borrowed.
#[derive(Debug, PartialEq, Deserialize)]
pub struct PartialRef<'a> {
    pub window_start: i64,
    pub window_end: i64,
    pub campaign_id: &'a str,
    pub chunk: u32,
    #[serde(borrow)]
    pub strings: Vec<&'a str>,
    pub cells: Vec<(GrainId, Measures)>,
}

impl Partial {
    fn as_ref(&self) -> PartialRef<'_> {
        PartialRef {
            window_start: self.window_start,
            window_end: self.window_end,
            campaign_id: &self.campaign_id,
            chunk: self.chunk,
            strings: self.strings.iter().map(String::as_str).collect(),
            cells: self.cells.clone(),
        }
    }
}

/// A closed window's ad-metrics rows in grain order, their strings once in
/// a table: a window has about a row per impression, and six owned strings
/// per row were a tenth of the engine's time.
#[derive(Debug, Clone, PartialEq)]
pub struct AdMetricRows {
    pub window_start: i64,
    pub window_end: i64,
    strings: Vec<Box<str>>,
    /// Grains in `strings`' numbering, with their measures.
    cells: Vec<(GrainId, Measures)>,
}

impl AdMetricRows {
    fn new(interner: &Interner, start: i64, end: i64, cells: &[(GrainId, Measures)]) -> Self {
        let mut table = BatchStrings::new(interner);
        let mut strings = Vec::new();
        let cells = cells
            .iter()
            .map(|(g, m)| {
                let g = table.renumber(*g, |id| strings.push(interner.string(id).into()));
                (g, *m)
            })
            .collect();
        AdMetricRows {
            window_start: start,
            window_end: end,
            strings,
            cells,
        }
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Calls `f` with each row, in order, borrowing from the table.
    pub fn try_for_each<E>(
        &self,
        mut f: impl FnMut(&AdMetricRef<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut ip = String::new();
        for (g, m) in &self.cells {
            // The table was built with every string the cells name.
            let s = |id: u32| Some(&*self.strings[id as usize]);
            let [campaign_id, ad_id, search_keyword, state, ip_range, device_type] =
                ids::values_in(*g, s, &mut ip).unwrap_or([""; 6]);
            f(&AdMetricRef {
                window_start: self.window_start,
                window_end: self.window_end,
                campaign_id,
                ad_id,
                search_keyword,
                state,
                ip_range,
                device_type,
                impressions: m.impressions,
                clicks: m.clicks,
                conversions: m.conversions,
                cost_micros: m.cost_micros,
                revenue_micros: m.revenue_micros,
                ctr: m.ctr(),
                conversion_rate: m.conversion_rate(),
            })?;
        }
        Ok(())
    }

    /// The rows as owned records (tests, tools).
    pub fn to_vec(&self) -> Vec<AdMetric> {
        let mut out = Vec::with_capacity(self.len());
        let _ = self.try_for_each(|r| {
            out.push(r.to_owned());
            Ok::<(), ()>(())
        });
        out
    }
}

/// Emits one closed window: its ad-metrics rows in grain order, then per
/// campaign its campaign-ctr row followed by the alerts it opens.
///
/// Gives back the references the window's cells held, and the emptied
/// cell vector (for [`WindowStore::recycle`]).
pub(crate) fn emit_window(
    interner: &mut Interner,
    w: ClosedWindow,
    detector: &mut AnomalyDetector,
    outputs: &mut Vec<Output>,
    stats: &mut EngineStats,
) -> Vec<(GrainId, Measures)> {
    stats.windows_closed += 1;
    // The cells come in grain order (by dimension values), so a window's
    // output order does not depend on the order records were interned in.
    let mut cells = w.cells;
    // Campaign is the first grain dimension: its cells are adjacent.
    let mut campaigns: Vec<(u32, Measures)> = Vec::new();
    for (g, m) in &cells {
        let c = interner.campaign_of(*g);
        match campaigns.last_mut() {
            Some((last, acc)) if *last == c => acc.merge(m),
            _ => campaigns.push((c, *m)),
        }
    }
    stats.ad_metric_rows += cells.len() as u64;
    outputs.push(Output::AdMetrics(AdMetricRows::new(
        interner, w.start, w.end, &cells,
    )));
    for (campaign, m) in campaigns {
        let campaign = interner.string(campaign);
        stats.campaign_rows += 1;
        let alerts = detector.on_window(&CampaignWindow {
            campaign_id: campaign,
            window_start: w.start,
            window_end: w.end,
            impressions: m.impressions,
            clicks: m.clicks,
            conversions: m.conversions,
        });
        outputs.push(Output::CampaignCtr(CampaignCtr {
            window_start: w.start,
            window_end: w.end,
            campaign_id: campaign.into(),
            impressions: m.impressions,
            clicks: m.clicks,
            conversions: m.conversions,
            cost_micros: m.cost_micros,
            revenue_micros: m.revenue_micros,
            ctr: m.ctr(),
            conversion_rate: m.conversion_rate(),
        }));
        for a in alerts {
            stats.alerts += 1;
            outputs.push(Output::Alert(a));
        }
    }
    for (g, _) in cells.drain(..) {
        interner.release(g);
    }
    cells
}

/// Encoded size above which a campaign's cells continue in a new chunk:
/// far below the brokers' default 1 MB message limit.
const CHUNK_BYTES: usize = 256 << 10;

/// bincode's size of a cell: six u32 and five i64.
const CELL_BYTES: usize = 6 * 4 + 5 * 8;

/// Splits a window closed by a join task into per-campaign partials (in
/// chunks of at most about [`CHUNK_BYTES`]), in campaign order.
///
/// Gives back the references the window's cells held, and the emptied
/// cell vector (for [`WindowStore::recycle`]).
pub(crate) fn partials_of(
    interner: &mut Interner,
    w: ClosedWindow,
    out: &mut Vec<Output>,
) -> Vec<(GrainId, Measures)> {
    let mut cells = w.cells;
    let mut table = BatchStrings::new(interner);
    let mut current: Option<(Partial, usize)> = None;
    for (g, m) in cells.drain(..) {
        let campaign = interner.campaign_of(g);
        let fits = |c: &Partial, bytes: usize| {
            c.campaign_id == interner.string(campaign) && bytes + CELL_BYTES + 256 <= CHUNK_BYTES
        };
        let chunk = match &current {
            Some((c, bytes)) if fits(c, *bytes) => None,
            Some((c, _)) if c.campaign_id == interner.string(campaign) => Some(c.chunk + 1),
            _ => Some(0),
        };
        if let Some(chunk) = chunk {
            if let Some((done, _)) = current.take() {
                out.push(Output::Partial(done));
            }
            table.clear();
            current = Some((
                Partial {
                    window_start: w.start,
                    window_end: w.end,
                    campaign_id: interner.string(campaign).to_owned(),
                    chunk,
                    strings: Vec::new(),
                    cells: Vec::new(),
                },
                64,
            ));
        }
        let Some((c, bytes)) = current.as_mut() else {
            continue;
        };
        let cell = table.renumber(g, |id| {
            let s = interner.string(id);
            *bytes += 8 + s.len();
            c.strings.push(s.to_owned());
        });
        *bytes += CELL_BYTES;
        c.cells.push((cell, m));
        interner.release(g);
    }
    if let Some((done, _)) = current {
        out.push(Output::Partial(done));
    }
    cells
}

/// Counters of the rollup stage.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollupStats {
    pub partials: u64,
    pub replayed_partials: u64,
    pub late_cells: u64,
}

/// A rollup task's state. See the module docs.
#[derive(Serialize, Deserialize)]
pub struct Rollup {
    windows: WindowStore,
    interner: Interner,
    marks: Vec<Option<Mark>>,
    last_partial: Vec<Option<(i64, String, u32)>>,
    watermark: i64,
    global: i64,
    /// Per window closed since last taken: the mark that closed it.
    #[serde(skip)]
    closes: Vec<WindowClose>,
    detector: AnomalyDetector,
    #[serde(skip)]
    outputs: Vec<Output>,
    stats: EngineStats,
    rollup_stats: RollupStats,
}

/// The mark that closed a window, for its emit latency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowClose {
    /// Wall time (ms) at which the join task sent the mark.
    pub at_ms: i64,
    /// The mark came from a task whose partitions are all idle: the window
    /// closed because input stopped (after `--idle-timeout`), not because
    /// event time passed it, so its latency includes that wait.
    pub idle: bool,
}

impl Rollup {
    /// A rollup fed by `tasks` join tasks (the input partition count).
    pub fn new(cfg: &EngineConfig, tasks: usize) -> Self {
        Rollup {
            windows: WindowStore::new(cfg.window, cfg.allowed_lateness),
            interner: Interner::default(),
            marks: vec![None; tasks],
            last_partial: vec![None; tasks],
            watermark: i64::MIN,
            global: i64::MIN,
            closes: Vec::new(),
            detector: AnomalyDetector::new(cfg.anomaly.clone()),
            outputs: Vec::new(),
            stats: EngineStats::default(),
            rollup_stats: RollupStats::default(),
        }
    }

    /// Takes one message of the partials topic.
    /// Takes one record of the partials topic as it was read.
    pub fn on_record(&mut self, bytes: &[u8]) -> Result<(), bincode::Error> {
        match PartialMessageRef::decode(bytes)? {
            PartialMessageRef::Cells { task, partial } => self.on_partial_ref(task, &partial)?,
            PartialMessageRef::Mark { task, mark } => self.on_mark(task, mark),
            PartialMessageRef::TextCells => {
                return Err(Box::new(bincode::ErrorKind::Custom(
                    "partial cells in the text layout of an older version (checkpoint format 2); its windows must be rebuilt from the input".to_owned(),
                )))
            }
        }
        Ok(())
    }

    /// Adds a task's partial cells.
    pub fn on_partial(&mut self, task: u32, p: Partial) -> Result<(), bincode::Error> {
        self.on_partial_ref(task, &p.as_ref())
    }

    fn on_partial_ref(&mut self, task: u32, p: &PartialRef) -> Result<(), bincode::Error> {
        let valid = p.cells.iter().all(|(g, _)| {
            ids::values_in(
                *g,
                |i| p.strings.get(i as usize).copied(),
                &mut String::new(),
            )
            .is_some()
        });
        if !valid {
            return Err(Box::new(bincode::ErrorKind::Custom(
                "a partial cell names a string its table does not have".to_owned(),
            )));
        }
        let Some(last) = self.last_partial.get_mut(task as usize) else {
            tracing::warn!(task, "partial from an unknown task ignored");
            return Ok(());
        };
        let this = (p.window_start, p.campaign_id.to_owned(), p.chunk);
        if last.as_ref().is_some_and(|l| *l >= this) {
            self.rollup_stats.replayed_partials += 1;
            return Ok(());
        }
        self.rollup_stats.partials += 1;
        if self.windows.is_emitted(this.0, self.watermark) {
            self.rollup_stats.late_cells += p.cells.len() as u64;
            tracing::warn!(task, window_start = this.0, campaign = %this.1, "partial cells for an emitted window dropped (an idle partition let the watermark pass)");
            *last = Some(this);
            return Ok(());
        }
        // Each table string is interned once, held for the message, and
        // given back after it: a new cell takes its own references.
        let ids: Vec<u32> = p.strings.iter().map(|s| self.interner.hold(s)).collect();
        for (cell, m) in &p.cells {
            let g = ids::map_strings(*cell, |i| ids[i as usize]);
            self.windows.add(this.0, g, m, &mut self.interner);
        }
        for id in ids {
            self.interner.release_string(id);
        }
        *last = Some(this);
        Ok(())
    }

    /// Takes a task's watermark; closes the windows the minimum now passes.
    pub fn on_mark(&mut self, task: u32, mark: Mark) {
        let Some(slot) = self.marks.get_mut(task as usize) else {
            tracing::warn!(task, "mark from an unknown task ignored");
            return;
        };
        // A task's watermark never decreases; an older mark is a replay.
        if slot.is_some_and(|m| m.watermark > mark.watermark) {
            return;
        }
        *slot = Some(mark);
        self.advance(WindowClose {
            at_ms: mark.at_ms,
            idle: mark.idle,
        });
    }

    fn advance(&mut self, by: WindowClose) {
        if self.marks.iter().any(Option::is_none) {
            return;
        }
        let marks = self.marks.iter().flatten();
        let active = marks.clone().filter(|m| !m.idle).map(|m| m.watermark).min();
        let global =
            active.unwrap_or_else(|| marks.clone().map(|m| m.watermark).max().unwrap_or(i64::MIN));
        self.global = self.global.max(global);
        let candidate = marks.map(|m| m.watermark).min().unwrap_or(i64::MIN);
        if candidate <= self.watermark {
            return;
        }
        self.watermark = candidate;
        for w in self.windows.close_until(candidate, &mut self.interner) {
            self.closes.push(by);
            let cells = emit_window(
                &mut self.interner,
                w,
                &mut self.detector,
                &mut self.outputs,
                &mut self.stats,
            );
            self.windows.recycle(cells);
        }
    }

    /// The watermark this rollup has closed windows to.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// CONTRACT.md's processor watermark as the marks tell it (idle tasks
    /// left out), for join tasks whose partitions are all idle.
    pub fn global(&self) -> i64 {
        self.global
    }

    /// For each window closed since the last call, the mark that let the
    /// watermark pass it.
    pub fn take_closes(&mut self) -> Vec<WindowClose> {
        std::mem::take(&mut self.closes)
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// As [`Engine::drain_outputs`](super::Engine::drain_outputs).
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, Output> {
        self.outputs.drain(..)
    }

    pub fn has_outputs(&self) -> bool {
        !self.outputs.is_empty()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn rollup_stats(&self) -> &RollupStats {
        &self.rollup_stats
    }

    pub fn open_windows(&self) -> usize {
        self.windows.open_windows()
    }

    /// Distinct grains the open windows hold.
    /// Distinct dimension strings the open windows hold.
    pub fn interned_strings(&self) -> usize {
        self.interner.strings()
    }

    /// Serializes the state (outputs not yet taken are not part of it).
    pub fn snapshot(&self) -> Vec<u8> {
        super::framed_checkpoint(b"ADSR", self)
    }

    /// Restores a state written by [`snapshot`](Self::snapshot).
    pub fn restore(bytes: &[u8]) -> Result<Self, super::CheckpointError> {
        Ok(bincode::deserialize(super::unframed_checkpoint(
            b"ADSR", bytes,
        )?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window where campaign "c" has enough grains to need several chunks.
    fn big_window(interner: &mut Interner, grains: usize) -> ClosedWindow {
        let mut cells = Vec::new();
        let keyword = "k".repeat(200);
        for i in 0..grains {
            let ip = format!("10.{}.{}.0/24", i / 256, i % 256);
            let g = interner.grain("c", "a", &keyword, "s", &ip, "d");
            cells.push((g, Measures::impression(i as i64)));
        }
        let g = interner.grain("b", "a", "k", "s", "1.1.1.0/24", "d");
        cells.push((g, Measures::click(5)));
        // As `WindowStore::close_until` hands them out.
        let mut sorted = Vec::new();
        interner.sorted_cells(&cells, &mut sorted);
        ClosedWindow {
            start: 0,
            end: 60_000,
            cells: sorted,
        }
    }

    fn partials(out: Vec<Output>) -> Vec<Partial> {
        out.into_iter()
            .filter_map(|o| match o {
                Output::Partial(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_large_campaign_is_split_into_numbered_chunks_below_the_limit() {
        let mut interner = Interner::default();
        let mut out = Vec::new();
        let w = big_window(&mut interner, 10_000);
        partials_of(&mut interner, w, &mut out);
        let ps = partials(out);
        assert_eq!(interner.strings(), 0, "every cell's reference given back");
        assert_eq!(ps[0].campaign_id, "b");
        assert_eq!(ps[0].chunk, 0);
        let c: Vec<&Partial> = ps.iter().filter(|p| p.campaign_id == "c").collect();
        assert!(c.len() >= 3, "{} chunks", c.len());
        for (i, p) in c.iter().enumerate() {
            assert_eq!(p.chunk, i as u32);
            let bytes = PartialMessage::Cells {
                task: 0,
                partial: (*p).clone(),
            }
            .encode()
            .len();
            assert!(bytes <= CHUNK_BYTES + 1024, "chunk of {bytes} bytes");
        }
        assert_eq!(c.iter().map(|p| p.cells.len()).sum::<usize>(), 10_000);
        // Each chunk's cells name their values through its own table.
        // in grain order across chunks.
        let keyword = "k".repeat(200);
        let mut ips = Vec::new();
        for p in &c {
            assert_eq!(p.strings.iter().filter(|s| **s == keyword).count(), 1);
            for j in 0..p.cells.len() {
                let v = p.values(j).expect("in the table");
                assert_eq!((v[0].as_str(), v[2].as_str()), ("c", keyword.as_str()));
                ips.push(v[4].clone());
            }
        }
        let mut want: Vec<String> = (0..10_000)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        want.sort();
        assert_eq!(ips, want);
    }

    #[test]
    fn a_close_records_whether_an_idle_mark_made_it() {
        let mark = |watermark, idle, at_ms| Mark {
            watermark,
            idle,
            at_ms,
        };
        for last_idle in [false, true] {
            let mut interner = Interner::default();
            let mut out = Vec::new();
            let w = big_window(&mut interner, 3);
            partials_of(&mut interner, w, &mut out);
            let mut r = Rollup::new(&EngineConfig::default(), 2);
            for p in partials(out) {
                r.on_partial(0, p).expect("a partial");
            }
            // An idle task ahead does not close the window: the other task
            // holds it back.
            r.on_mark(0, mark(60_000, true, 1));
            r.on_mark(1, mark(59_999, false, 2));
            assert!(r.take_closes().is_empty());
            r.on_mark(1, mark(60_000, last_idle, 3));
            assert_eq!(
                r.take_closes(),
                vec![WindowClose {
                    at_ms: 3,
                    idle: last_idle
                }]
            );
        }
    }

    #[test]
    fn the_rollup_sums_every_chunk_once() {
        let mut interner = Interner::default();
        let mut out = Vec::new();
        let w = big_window(&mut interner, 10_000);
        partials_of(&mut interner, w, &mut out);
        let ps = partials(out);
        let cfg = EngineConfig::default();
        let mut r = Rollup::new(&cfg, 1);
        // As the runtime feeds them: encoded records, decoded in place.
        for p in &ps {
            let bytes = PartialMessage::Cells {
                task: 0,
                partial: p.clone(),
            }
            .encode();
            match PartialMessageRef::decode(&bytes).expect("decodes") {
                PartialMessageRef::Cells { task, partial } => {
                    assert_eq!(task, 0);
                    assert_eq!(partial, p.as_ref());
                }
                other => panic!("{other:?}"),
            }
            r.on_record(&bytes).expect("a partial");
        }
        // A replayed chunk (aborted copy) is dropped.
        r.on_partial(0, ps[1].clone()).expect("a replayed chunk");
        assert_eq!(r.rollup_stats().replayed_partials, 1);
        // A cell naming a string its table lacks, and the text layout of
        // an older version, are refused without touching the state.
        let mut bad = ps[2].clone();
        bad.chunk += 100;
        bad.cells[0].0[1] = bad.strings.len() as u32;
        assert!(r.on_partial(0, bad).is_err());
        assert!(r.on_record(&PartialMessage::TextCells.encode()).is_err());
        assert_eq!(r.rollup_stats().partials as usize, ps.len());
        assert!(r.on_record(&[1, 2, 3]).is_err());
        let mark = Mark {
            watermark: 60_000,
            idle: false,
            at_ms: 0,
        };
        r.on_record(&PartialMessage::Mark { task: 0, mark }.encode())
            .expect("a mark");
        let rows: Vec<AdMetric> = r
            .take_outputs()
            .into_iter()
            .flat_map(|o| match o {
                Output::AdMetrics(rows) => rows.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(rows.len(), 10_001);
        let c: i64 = rows
            .iter()
            .filter(|m| m.campaign_id == "c")
            .map(|m| m.cost_micros)
            .sum();
        assert_eq!(c, (0..10_000i64).sum::<i64>());
        assert_eq!(r.interned_strings(), 0);
    }
}
