//! The processing engine: plain synchronous Rust, no Kafka or tokio types.
//!
//! Operators, each its own module with its own invariants:
//! - [`watermark::WatermarkTracker`]: partition and processor watermarks;
//! - [`join::ClickJoin`]: impression → click → conversion join state;
//! - [`windows::WindowStore`]: tumbling windows of additive cells;
//! - [`anomaly::AnomalyDetector`]: SPIKE/DROP episodes on campaign windows.
//!
//! [`Engine::on_record`] takes one raw input record (topic, partition,
//! offset, key, value) and applies CONTRACT.md's processing order: invalid →
//! dead letter; late → late side output; duplicate → dropped and counted;
//! otherwise into the join. After each record the processor watermark is
//! recomputed; windows it closes are emitted (ad-metrics rows, campaign rows,
//! then alerts), and clicks/conversions it leaves unmatched go to the
//! unmatched side output. Outputs accumulate until the runtime takes them with
//! [`Engine::take_outputs`].
//!
//! Invariant (accounting): every input record ends as exactly one of
//! counted, late, duplicate, unmatched or dead letter; [`EngineStats`] counts
//! each, and pending (still buffered) records make up the difference.

pub mod anomaly;
pub mod ids;
pub mod join;
pub mod rollup;
mod short_table;
mod slot_index;
pub mod validate;
pub mod watermark;
pub mod windows;

use adstream_schemas::codec::WriterCache;
use adstream_schemas::records::{ClickView, ConversionView, ImpressionView};
use adstream_schemas::{AnomalyAlert, CampaignCtr, Codec, CodecError};
use serde::{Deserialize, Serialize};

use anomaly::{AnomalyConfig, AnomalyDetector};
use ids::{id_key, id_key_of_bytes, Interner, IpRange};
use join::{ClickEvent, ClickJoin, Counted, JoinConfig};
use rollup::{emit_window, partials_of, Partial};
use watermark::{InputPartition, WatermarkTracker};
use windows::{Measures, WindowStore};

/// Input topics, by index.
pub const IMPRESSIONS: u8 = 0;
pub const CLICKS: u8 = 1;
pub const CONVERSIONS: u8 = 2;

/// Where an input record came from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SourceRef {
    pub topic: u8,
    pub partition: i32,
    pub offset: i64,
}

impl SourceRef {
    pub fn input_partition(&self) -> InputPartition {
        InputPartition {
            topic: self.topic,
            partition: self.partition,
        }
    }
}

/// An input record's original bytes, kept for side outputs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RawRecord {
    pub source: SourceRef,
    pub key: Option<Box<[u8]>>,
    pub value: Option<Box<[u8]>>,
    /// Kafka timestamp of the input record (ms), if any.
    pub timestamp: Option<i64>,
}

/// Which side output a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SideKind {
    Late,
    Unmatched,
    DeadLetter,
}

/// Something the engine wants written.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A closed window's ad-metrics rows.
    AdMetrics(rollup::AdMetricRows),
    CampaignCtr(CampaignCtr),
    Alert(AnomalyAlert),
    /// A join task's final cells of a window for one campaign (task mode).
    Partial(Partial),
    Side {
        kind: SideKind,
        raw: RawRecord,
        reason: String,
    },
}

/// Engine parameters (all times in ms).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_out_of_orderness: i64,
    pub allowed_lateness: i64,
    pub click_window: i64,
    pub conversion_window: i64,
    pub window: i64,
    pub anomaly: AnomalyConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_out_of_orderness: 5_000,
            allowed_lateness: 0,
            click_window: 30 * 60_000,
            conversion_window: 24 * 3_600_000,
            window: 60_000,
            anomaly: AnomalyConfig::default(),
        }
    }
}

/// Counts of what happened to input records, per input topic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopicStats {
    pub input: u64,
    pub counted: u64,
    pub late: u64,
    pub duplicate: u64,
    pub unmatched: u64,
    pub dead_letter: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    pub by_topic: [TopicStats; 3],
    pub ad_metric_rows: u64,
    pub campaign_rows: u64,
    pub alerts: u64,
    pub windows_closed: u64,
}

impl EngineStats {
    pub fn total(&self) -> TopicStats {
        let mut t = TopicStats::default();
        for s in &self.by_topic {
            t.input += s.input;
            t.counted += s.counted;
            t.late += s.late;
            t.duplicate += s.duplicate;
            t.unmatched += s.unmatched;
            t.dead_letter += s.dead_letter;
        }
        t
    }
}

/// A decoded input record, borrowing its strings from the payload.
enum Decoded<'a> {
    Impression(ImpressionView<'a>),
    Click(ClickView<'a>),
    Conversion(ConversionView<'a>),
}

/// What the engine does with a window its watermark closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowOutput {
    /// Emit the final rows, campaign rows and alerts: the engine sees every
    /// input partition (one process, tests, benchmarks).
    Final,
    /// Hand the cells out as [`Partial`]s for a [`rollup::Rollup`]: the
    /// engine is one join task among several.
    Partials,
}

/// The engine's state, as a checkpoint holds it.
#[derive(Serialize, Deserialize)]
struct EngineState {
    mode: WindowOutput,
    watermarks: WatermarkTracker,
    join: ClickJoin,
    windows: WindowStore,
    detector: AnomalyDetector,
    interner: Interner,
    stats: EngineStats,
}

/// The engine. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    codec: Codec,
    state: EngineState,
    outputs: Vec<Output>,
    counted: Vec<Counted>,
    unmatched: Vec<RawRecord>,
    /// Per input topic, the writer schema it used last (no lock per record).
    writers: [WriterCache; 3],
}

/// A checkpoint that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("not a checkpoint of this format (written by an incompatible version of the processor? this build reads format {CHECKPOINT_FORMAT}); delete the task's checkpoints to start it from its committed input, or run the version that wrote them")]
    Format,
    #[error("unreadable checkpoint: {0}")]
    Decode(#[from] bincode::Error),
}

/// Version of the state layout in checkpoints; bumped whenever a
/// checkpointed type changes shape or meaning.
///
/// 4: a window's cells may repeat a grain (they are a log, merged when the
/// window closes). The bytes are those of format 3, whose cells were a map
/// from grain to cell: 3 reads as 4 (a log without repeats), but a build
/// that writes 3 must not read 4, which is why the number changed.
pub const CHECKPOINT_FORMAT: u16 = 4;

/// Older formats this build reads as [`CHECKPOINT_FORMAT`].
const READS_FORMATS: [u16; 1] = [3];

/// Prefixes serialized state with a tag and [`CHECKPOINT_FORMAT`].
pub(crate) fn framed_checkpoint(tag: &[u8; 4], state: &impl Serialize) -> Vec<u8> {
    let mut out = tag.to_vec();
    out.extend(CHECKPOINT_FORMAT.to_le_bytes());
    // Serializing plain data into a Vec cannot fail.
    bincode::serialize_into(&mut out, state).unwrap_or_default();
    out
}

/// The state after a [`framed_checkpoint`] header, if the tag matches and
/// the format is one this build reads.
pub(crate) fn unframed_checkpoint<'a>(
    tag: &[u8; 4],
    bytes: &'a [u8],
) -> Result<&'a [u8], CheckpointError> {
    let Some((head, rest)) = bytes.split_at_checked(6) else {
        return Err(CheckpointError::Format);
    };
    let format = u16::from_le_bytes([head[4], head[5]]);
    if head[..4] == tag[..] && (format == CHECKPOINT_FORMAT || READS_FORMATS.contains(&format)) {
        Ok(rest)
    } else {
        Err(CheckpointError::Format)
    }
}

impl Engine {
    /// `codec` must already know every writer schema the input may use
    /// (the runtime fetches unknown ids before handing records over).
    pub fn new(cfg: EngineConfig, codec: Codec) -> Self {
        Self::with_output(cfg, codec, WindowOutput::Final)
    }

    /// An engine that is one join task of a scaled-out processor.
    pub fn new_task(cfg: EngineConfig, codec: Codec) -> Self {
        Self::with_output(cfg, codec, WindowOutput::Partials)
    }

    fn with_output(cfg: EngineConfig, codec: Codec, mode: WindowOutput) -> Self {
        Engine {
            state: EngineState {
                mode,
                watermarks: WatermarkTracker::new(cfg.max_out_of_orderness),
                join: ClickJoin::new(JoinConfig {
                    click_window: cfg.click_window,
                    conversion_window: cfg.conversion_window,
                    allowed_lateness: cfg.allowed_lateness,
                    bucket: cfg.window,
                }),
                windows: WindowStore::new(cfg.window, cfg.allowed_lateness),
                detector: AnomalyDetector::new(cfg.anomaly.clone()),
                interner: Interner::default(),
                stats: EngineStats::default(),
            },
            outputs: Vec::new(),
            counted: Vec::new(),
            unmatched: Vec::new(),
            writers: Default::default(),
            codec,
            cfg,
        }
    }

    /// Serializes the state: join buffers, open windows, dedup ids,
    /// watermarks, anomaly baselines and counters. Outputs not yet taken are
    /// not part of it (take them first).
    pub fn checkpoint(&self) -> Vec<u8> {
        framed_checkpoint(b"ADSJ", &self.state)
    }

    /// An engine continuing from a [`checkpoint`](Self::checkpoint).
    pub fn restore(cfg: EngineConfig, codec: Codec, bytes: &[u8]) -> Result<Self, CheckpointError> {
        let state: EngineState = bincode::deserialize(unframed_checkpoint(b"ADSJ", bytes)?)?;
        let mut e = Self::with_output(cfg, codec, state.mode);
        e.state = state;
        Ok(e)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Starts tracking an input partition (it holds the watermark back until
    /// it has data or is marked idle).
    pub fn add_partition(&mut self, p: InputPartition) {
        self.state.watermarks.add_partition(p);
    }

    pub fn remove_partition(&mut self, p: InputPartition) {
        self.state.watermarks.remove_partition(p);
    }

    /// Marks a partition idle (or active again) and applies the watermark.
    pub fn set_idle(&mut self, p: InputPartition, idle: bool) {
        if self.state.watermarks.is_idle(p) != idle {
            self.state.watermarks.set_idle(p, idle);
            self.advance();
        }
    }

    pub fn is_idle(&self, p: InputPartition) -> bool {
        self.state.watermarks.is_idle(p)
    }

    pub fn watermark(&self) -> i64 {
        self.state.watermarks.current()
    }

    pub fn partition_watermark(&self, p: InputPartition) -> i64 {
        self.state.watermarks.partition_watermark(p)
    }

    pub fn stats(&self) -> &EngineStats {
        &self.state.stats
    }

    pub fn join_sizes(&self) -> join::JoinSizes {
        self.state.join.sizes()
    }

    pub fn open_windows(&self) -> usize {
        self.state.windows.open_windows()
    }

    /// Distinct dimension strings the join state and open windows hold.
    pub fn interned_strings(&self) -> usize {
        self.state.interner.strings()
    }

    /// Takes the outputs produced so far, in production order.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// Takes the outputs produced so far, in production order, keeping the
    /// buffer: a closed window's rows would otherwise grow a fresh buffer,
    /// page by newly touched page, every minute.
    pub fn drain_outputs(&mut self) -> std::vec::Drain<'_, Output> {
        self.outputs.drain(..)
    }

    /// Whether outputs are waiting.
    pub fn has_outputs(&self) -> bool {
        !self.outputs.is_empty()
    }

    fn dead_letter(&mut self, raw: RawRecord, reason: String) {
        self.state.stats.by_topic[raw.source.topic as usize].dead_letter += 1;
        self.outputs.push(Output::Side {
            kind: SideKind::DeadLetter,
            raw,
            reason,
        });
    }

    fn decode<'a>(&mut self, topic: u8, value: &'a [u8]) -> Result<Decoded<'a>, CodecError> {
        let (codec, cache) = (&self.codec, &mut self.writers[topic as usize]);
        Ok(match topic {
            IMPRESSIONS => Decoded::Impression(codec.decode_view_with(cache, value)?),
            CLICKS => Decoded::Click(codec.decode_view_with(cache, value)?),
            _ => Decoded::Conversion(codec.decode_view_with(cache, value)?),
        })
    }

    /// Says that a record of `topic` with `key` comes soon (the next one or
    /// so): the join's index line for its impression is fetched now, so
    /// that its lookup, a cache miss otherwise, finds it in cache. Results
    /// do not depend on it; callers that see records ahead (a fetched
    /// batch) call it one record ahead.
    pub fn prefetch(&self, topic: u8, key: Option<&[u8]>) {
        // Impressions and clicks look their impression up by their key; a
        // conversion looks up its click, by an id only its value holds.
        if let (IMPRESSIONS | CLICKS, Some(key)) = (topic, key) {
            self.state.join.prefetch_impression(id_key_of_bytes(key));
        }
    }

    /// Processes one input record.
    pub fn on_record(
        &mut self,
        source: SourceRef,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        timestamp: Option<i64>,
    ) {
        let topic = source.topic.min(CONVERSIONS);
        let source = SourceRef { topic, ..source };
        self.state.stats.by_topic[topic as usize].input += 1;
        let raw = || RawRecord {
            source,
            key: key.map(Into::into),
            value: value.map(Into::into),
            timestamp,
        };
        let Some(bytes) = value else {
            self.dead_letter(raw(), "invalid: record has no value (tombstone)".to_owned());
            return;
        };
        let decoded = match self.decode(topic, bytes) {
            Ok(d) => d,
            Err(e) => {
                self.dead_letter(raw(), format!("undecodable: {}: {e}", e.reason_code()));
                return;
            }
        };
        let event_time = match &decoded {
            Decoded::Impression(r) => r.event_time,
            Decoded::Click(r) => r.event_time,
            Decoded::Conversion(r) => r.event_time,
        };
        let valid = match &decoded {
            Decoded::Impression(r) => validate::impression(r, key).map(Some),
            Decoded::Click(r) => validate::click(r, key).map(|_| None),
            Decoded::Conversion(r) => validate::conversion(r, key).map(|_| None),
        };
        let ip = match valid {
            Ok(ip) => ip,
            Err(e) => {
                self.dead_letter(raw(), format!("invalid: {}: {e}", e.code()));
                return;
            }
        };

        // Late: against the record's own partition watermark just before it,
        // or its window is already emitted.
        let p = source.input_partition();
        let pwm = self.state.watermarks.observe(p, event_time);
        let late_by_partition = event_time < pwm.saturating_sub(self.cfg.allowed_lateness);
        // Observing moves no processor watermark (`advance` does).
        let late_by_window = self
            .state
            .windows
            .is_emitted(event_time, self.state.watermarks.current());
        if late_by_partition || late_by_window {
            self.state.stats.by_topic[topic as usize].late += 1;
            let reason = if late_by_partition {
                format!(
                    "late: event_time {event_time} < partition watermark {pwm} - allowed lateness {}",
                    self.cfg.allowed_lateness
                )
            } else {
                format!("late: window of event_time {event_time} already emitted")
            };
            self.outputs.push(Output::Side {
                kind: SideKind::Late,
                raw: raw(),
                reason,
            });
            self.advance();
            return;
        }

        let s = &mut self.state.stats.by_topic[topic as usize];
        match decoded {
            Decoded::Impression(r) => {
                let found = self.state.join.find_impression(id_key(r.impression_id));
                if let Ok(absent) = found {
                    s.counted += 1;
                    let grain = self.state.interner.grain_of(
                        r.campaign_id,
                        r.ad_id,
                        r.search_keyword,
                        r.state,
                        IpRange::of(ip),
                        r.device_type,
                    );
                    let st = &mut self.state;
                    st.windows.add(
                        r.event_time,
                        grain,
                        &Measures::impression(r.cost_micros),
                        &mut st.interner,
                    );
                    // The window cell takes a reference of its own; the
                    // held impression takes over `grain_of`'s.
                    st.join.on_impression(
                        absent,
                        r.event_time,
                        grain,
                        &mut st.interner,
                        &mut self.counted,
                    );
                } else {
                    s.duplicate += 1;
                }
            }
            Decoded::Click(r) => {
                let id = id_key(r.click_id);
                if self.state.join.is_duplicate_click(id) {
                    s.duplicate += 1;
                } else {
                    self.state.join.on_click(
                        ClickEvent {
                            click_id: id,
                            impression_id: id_key(r.impression_id),
                            t: r.event_time,
                            cost_micros: r.cost_micros,
                        },
                        raw,
                        &mut self.state.interner,
                        &mut self.counted,
                    );
                }
            }
            Decoded::Conversion(r) => {
                let id = id_key(r.conversion_id);
                if self.state.join.is_duplicate_conversion(id) {
                    s.duplicate += 1;
                } else {
                    self.state.join.on_conversion(
                        id,
                        id_key(r.click_id),
                        r.event_time,
                        r.revenue_micros,
                        raw,
                        &mut self.counted,
                    );
                }
            }
        }
        self.apply_counted();
        self.advance();
    }

    fn apply_counted(&mut self) {
        let st = &mut self.state;
        for c in self.counted.drain(..) {
            // The grain is held by the join entry the record matched, so it
            // is live here; a new cell takes its own reference.
            let (topic, t, grain, m) = match c {
                Counted::Click {
                    t,
                    grain,
                    cost_micros,
                } => (CLICKS, t, grain, Measures::click(cost_micros)),
                Counted::Conversion {
                    t,
                    grain,
                    revenue_micros,
                } => (CONVERSIONS, t, grain, Measures::conversion(revenue_micros)),
            };
            st.stats.by_topic[topic as usize].counted += 1;
            st.windows.add(t, grain, &m, &mut st.interner);
        }
    }

    /// Takes the processor watermark computed over every join task (see
    /// [`rollup`]): a task whose partitions are all idle follows it, as a
    /// single engine's idle partitions follow the others.
    pub fn on_global_watermark(&mut self, global: i64) {
        let before = self.state.watermarks.current();
        if !self.all_idle() || global <= before {
            return;
        }
        self.state.watermarks.restore_current(global);
        self.apply_watermark(global);
    }

    /// Recomputes the watermark; emits closed windows and unmatched records.
    fn advance(&mut self) {
        let before = self.state.watermarks.current();
        let wm = self.state.watermarks.advance();
        if wm == before {
            return;
        }
        self.apply_watermark(wm);
    }

    fn apply_watermark(&mut self, wm: i64) {
        self.state
            .join
            .expire(wm, &mut self.state.interner, &mut self.unmatched);
        for raw in self.unmatched.drain(..) {
            self.state.stats.by_topic[raw.source.topic as usize].unmatched += 1;
            let reason = format!(
                "unmatched: no matching {} by watermark {wm}",
                if raw.source.topic == CLICKS {
                    "impression"
                } else {
                    "matched click"
                }
            );
            self.outputs.push(Output::Side {
                kind: SideKind::Unmatched,
                raw,
                reason,
            });
        }
        let st = &mut self.state;
        for w in st.windows.close_until(wm, &mut st.interner) {
            let cells = match st.mode {
                WindowOutput::Final => emit_window(
                    &mut st.interner,
                    w,
                    &mut st.detector,
                    &mut self.outputs,
                    &mut st.stats,
                ),
                WindowOutput::Partials => {
                    st.stats.windows_closed += 1;
                    partials_of(&mut st.interner, w, &mut self.outputs)
                }
            };
            st.windows.recycle(cells);
        }
    }

    /// Whether every partition this engine tracks is idle.
    pub fn all_idle(&self) -> bool {
        self.state.watermarks.all_idle()
    }
}

#[cfg(test)]
mod tests;
