//! The impression → click → conversion join (CONTRACT.md "Join", "Unmatched",
//! "State lifetime").
//!
//! State:
//! - kept impressions by `impression_id` until the watermark passes
//!   `event_time + click_window + allowed_lateness`;
//! - matched clicks by `click_id` until it passes
//!   `event_time + conversion_window + allowed_lateness`;
//! - clicks waiting for their impression and conversions waiting for their
//!   matched click, until it passes `event_time + allowed_lateness`, when they
//!   are handed back as unmatched;
//! - ids of kept clicks and conversions for duplicate detection, for as long
//!   as a copy could still arrive on time.
//!
//! Expiry is by buckets of event time (a bucket expires once every entry in it
//! has), so an entry may outlive its horizon by up to one bucket: harmless,
//! since nothing on time can reach it after the horizon anyway.
//!
//! Either side may arrive first; a record that arrives on time always finds
//! its partner if the partner is on time too, which is what makes the join a
//! function of the input alone (the horizons above are the proof).

use std::collections::BTreeMap;

use hashbrown::{HashMap, HashSet};

use super::ids::{GrainId, IdKey, Interner};
use super::RawRecord;

/// Join horizons, in ms.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct JoinConfig {
    pub click_window: i64,
    pub conversion_window: i64,
    pub allowed_lateness: i64,
    /// Width of expiry buckets.
    pub bucket: i64,
}

/// A contribution to a window cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Click {
        t: i64,
        grain: GrainId,
        cost_micros: i64,
    },
    Conversion {
        t: i64,
        grain: GrainId,
        revenue_micros: i64,
    },
}

/// What the join needs of a click.
#[derive(Debug, Clone, Copy)]
pub struct ClickEvent {
    pub click_id: IdKey,
    pub impression_id: IdKey,
    pub t: i64,
    pub cost_micros: i64,
}

#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Held {
    t: i64,
    grain: GrainId,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PendingClick {
    click_id: IdKey,
    impression_id: IdKey,
    cost_micros: i64,
    raw: RawRecord,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PendingConversion {
    click_id: IdKey,
    revenue_micros: i64,
    raw: RawRecord,
}

/// Removes the buckets whose last possible member has expired
/// (`last_t + horizon < wm`) and returns their ids.
fn pop_expired(
    buckets: &mut BTreeMap<i64, Vec<IdKey>>,
    wm: i64,
    bucket_width: i64,
    horizon: i64,
) -> Vec<IdKey> {
    let mut out = Vec::new();
    while let Some(e) = buckets.first_entry() {
        let last_t = *e.key() + bucket_width - 1;
        if last_t.saturating_add(horizon) >= wm {
            break;
        }
        out.extend(e.remove());
    }
    out
}

/// Ids with an expiry, bucketed by event time.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct ExpiringIds {
    ids: HashSet<IdKey>,
    buckets: BTreeMap<i64, Vec<IdKey>>,
}

impl ExpiringIds {
    fn insert(&mut self, id: IdKey, bucket: i64) {
        if self.ids.insert(id) {
            self.buckets.entry(bucket).or_default().push(id);
        }
    }

    fn expire(&mut self, wm: i64, bucket_width: i64, horizon: i64) {
        for id in pop_expired(&mut self.buckets, wm, bucket_width, horizon) {
            self.ids.remove(&id);
        }
    }
}

/// Held records keyed by id, expired by buckets of event time.
///
/// Only a count per bucket is kept, not the ids: when the oldest buckets
/// expire, one pass over the map removes their entries (`t` below the end
/// of the last expired bucket). That costs a scan per bucket width of event
/// time instead of 16 bytes per held record, which at ten million buffered
/// impressions is the better trade (the map is what dominates memory).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct HeldById {
    map: HashMap<IdKey, Held>,
    counts: BTreeMap<i64, u32>,
}

impl HeldById {
    /// Holds `held` (in the bucket starting at `bucket`), taking a
    /// reference to its grain.
    fn insert(&mut self, id: IdKey, held: Held, bucket: i64, width: i64, interner: &mut Interner) {
        interner.retain(held.grain);
        if let Some(old) = self.map.insert(id, held) {
            interner.release(old.grain);
            let old_bucket = old.t - old.t.rem_euclid(width);
            if let Some(n) = self.counts.get_mut(&old_bucket) {
                *n = n.saturating_sub(1);
            }
        }
        *self.counts.entry(bucket).or_default() += 1;
    }

    fn expire(&mut self, wm: i64, width: i64, horizon: i64, interner: &mut Interner) {
        let mut below = None;
        while let Some(e) = self.counts.first_entry() {
            let last_t = *e.key() + width - 1;
            if last_t.saturating_add(horizon) >= wm {
                break;
            }
            below = Some(*e.key() + width);
            e.remove();
        }
        if let Some(below) = below {
            self.map.retain(|_, h| {
                let keep = h.t >= below;
                if !keep {
                    interner.release(h.grain);
                }
                keep
            });
        }
    }
}

/// Join state and its rules.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ClickJoin {
    cfg: JoinConfig,
    impressions: HeldById,
    matched_clicks: HeldById,
    click_ids: ExpiringIds,
    conversion_ids: ExpiringIds,
    seq: u64,
    pending_clicks: BTreeMap<(i64, u64), PendingClick>,
    pending_clicks_by_impression: HashMap<IdKey, Vec<(i64, u64)>>,
    pending_conversions: BTreeMap<(i64, u64), PendingConversion>,
    pending_conversions_by_click: HashMap<IdKey, Vec<(i64, u64)>>,
}

impl ClickJoin {
    pub fn new(cfg: JoinConfig) -> Self {
        assert!(cfg.bucket > 0);
        ClickJoin {
            cfg,
            impressions: HeldById::default(),
            matched_clicks: HeldById::default(),
            click_ids: ExpiringIds::default(),
            conversion_ids: ExpiringIds::default(),
            seq: 0,
            pending_clicks: BTreeMap::new(),
            pending_clicks_by_impression: HashMap::new(),
            pending_conversions: BTreeMap::new(),
            pending_conversions_by_click: HashMap::new(),
        }
    }

    fn bucket(&self, t: i64) -> i64 {
        t - t.rem_euclid(self.cfg.bucket)
    }

    pub fn is_duplicate_impression(&self, id: IdKey) -> bool {
        self.impressions.map.contains_key(&id)
    }

    pub fn is_duplicate_click(&self, id: IdKey) -> bool {
        self.click_ids.ids.contains(&id)
    }

    pub fn is_duplicate_conversion(&self, id: IdKey) -> bool {
        self.conversion_ids.ids.contains(&id)
    }

    /// A kept impression arrives; clicks waiting for it may match now.
    ///
    /// Held impressions and matched clicks each own a reference to their
    /// grain in `interner`.
    pub fn on_impression(
        &mut self,
        id: IdKey,
        t: i64,
        grain: GrainId,
        interner: &mut Interner,
        out: &mut Vec<Counted>,
    ) {
        let b = self.bucket(t);
        self.impressions
            .insert(id, Held { t, grain }, b, self.cfg.bucket, interner);
        let Some(waiting) = self.pending_clicks_by_impression.remove(&id) else {
            return;
        };
        let mut still = Vec::new();
        for k in waiting {
            let (ct, _) = k;
            if t <= ct && ct <= t.saturating_add(self.cfg.click_window) {
                if let Some(pc) = self.pending_clicks.remove(&k) {
                    self.match_click(pc.click_id, ct, grain, pc.cost_micros, interner, out);
                }
            } else {
                still.push(k);
            }
        }
        if !still.is_empty() {
            self.pending_clicks_by_impression.insert(id, still);
        }
    }

    fn match_click(
        &mut self,
        click_id: IdKey,
        t: i64,
        grain: GrainId,
        cost_micros: i64,
        interner: &mut Interner,
        out: &mut Vec<Counted>,
    ) {
        out.push(Counted::Click {
            t,
            grain,
            cost_micros,
        });
        let b = self.bucket(t);
        self.matched_clicks
            .insert(click_id, Held { t, grain }, b, self.cfg.bucket, interner);
        let Some(waiting) = self.pending_conversions_by_click.remove(&click_id) else {
            return;
        };
        let mut still = Vec::new();
        for k in waiting {
            let (vt, _) = k;
            if t <= vt && vt <= t.saturating_add(self.cfg.conversion_window) {
                if let Some(pc) = self.pending_conversions.remove(&k) {
                    out.push(Counted::Conversion {
                        t: vt,
                        grain,
                        revenue_micros: pc.revenue_micros,
                    });
                }
            } else {
                still.push(k);
            }
        }
        if !still.is_empty() {
            self.pending_conversions_by_click.insert(click_id, still);
        }
    }

    /// A kept click arrives. `raw` is called only if the click has to wait
    /// (its bytes are kept for the unmatched side output).
    pub fn on_click(
        &mut self,
        click: ClickEvent,
        raw: impl FnOnce() -> RawRecord,
        interner: &mut Interner,
        out: &mut Vec<Counted>,
    ) {
        let ClickEvent {
            click_id,
            impression_id,
            t,
            cost_micros,
        } = click;
        let b = self.bucket(t);
        self.click_ids.insert(click_id, b);
        if let Some(imp) = self.impressions.map.get(&impression_id).copied() {
            if imp.t <= t && t <= imp.t.saturating_add(self.cfg.click_window) {
                self.match_click(click_id, t, imp.grain, cost_micros, interner, out);
                return;
            }
        }
        self.seq += 1;
        let k = (t, self.seq);
        self.pending_clicks.insert(
            k,
            PendingClick {
                click_id,
                impression_id,
                cost_micros,
                raw: raw(),
            },
        );
        self.pending_clicks_by_impression
            .entry(impression_id)
            .or_default()
            .push(k);
    }

    /// A kept conversion arrives. `raw` is called only if it has to wait.
    pub fn on_conversion(
        &mut self,
        conversion_id: IdKey,
        click_id: IdKey,
        t: i64,
        revenue_micros: i64,
        raw: impl FnOnce() -> RawRecord,
        out: &mut Vec<Counted>,
    ) {
        let b = self.bucket(t);
        self.conversion_ids.insert(conversion_id, b);
        if let Some(click) = self.matched_clicks.map.get(&click_id).copied() {
            if click.t <= t && t <= click.t.saturating_add(self.cfg.conversion_window) {
                out.push(Counted::Conversion {
                    t,
                    grain: click.grain,
                    revenue_micros,
                });
                return;
            }
        }
        self.seq += 1;
        let k = (t, self.seq);
        self.pending_conversions.insert(
            k,
            PendingConversion {
                click_id,
                revenue_micros,
                raw: raw(),
            },
        );
        self.pending_conversions_by_click
            .entry(click_id)
            .or_default()
            .push(k);
    }

    /// Applies watermark `wm`: frees expired state and returns records that
    /// are now definitely unmatched (`wm > event_time + allowed_lateness`).
    pub fn expire(&mut self, wm: i64, interner: &mut Interner, unmatched: &mut Vec<RawRecord>) {
        let lateness = self.cfg.allowed_lateness;
        let width = self.cfg.bucket;
        while let Some(e) = self.pending_clicks.first_entry() {
            let (t, _) = *e.key();
            if t.saturating_add(lateness) >= wm {
                break;
            }
            let k = *e.key();
            let pc = e.remove();
            remove_index(&mut self.pending_clicks_by_impression, pc.impression_id, k);
            unmatched.push(pc.raw);
        }
        while let Some(e) = self.pending_conversions.first_entry() {
            let (t, _) = *e.key();
            if t.saturating_add(lateness) >= wm {
                break;
            }
            let k = *e.key();
            let pc = e.remove();
            remove_index(&mut self.pending_conversions_by_click, pc.click_id, k);
            unmatched.push(pc.raw);
        }
        self.impressions.expire(
            wm,
            width,
            self.cfg.click_window.saturating_add(lateness),
            interner,
        );
        self.matched_clicks.expire(
            wm,
            width,
            self.cfg.conversion_window.saturating_add(lateness),
            interner,
        );
        self.click_ids.expire(wm, width, lateness);
        self.conversion_ids.expire(wm, width, lateness);
    }

    /// Sizes of the state, for metrics and memory checks.
    pub fn sizes(&self) -> JoinSizes {
        JoinSizes {
            impressions: self.impressions.map.len(),
            matched_clicks: self.matched_clicks.map.len(),
            pending_clicks: self.pending_clicks.len(),
            pending_conversions: self.pending_conversions.len(),
            dedup_ids: self.click_ids.ids.len() + self.conversion_ids.ids.len(),
        }
    }
}

fn remove_index(index: &mut HashMap<IdKey, Vec<(i64, u64)>>, id: IdKey, k: (i64, u64)) {
    if let Some(v) = index.get_mut(&id) {
        v.retain(|x| *x != k);
        if v.is_empty() {
            index.remove(&id);
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinSizes {
    pub impressions: usize,
    pub matched_clicks: usize,
    pub pending_clicks: usize,
    pub pending_conversions: usize,
    pub dedup_ids: usize,
}
