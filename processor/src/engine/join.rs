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
//! has), so an entry may outlive its horizon by up to one bucket, and held
//! records are freed in batches some buckets later still ([`HeldById`]):
//! harmless, since nothing on time can reach an entry after its horizon.
//!
//! Either side may arrive first; a record that arrives on time always finds
//! its partner if the partner is on time too, which is what makes the join a
//! function of the input alone (the horizons above are the proof).

use std::borrow::Cow;
use std::collections::BTreeMap;

use hashbrown::{HashMap, HashSet};

use super::ids::{GrainId, IdKey, Interner};
use super::slot_index::{prefetch, SlotIndex};
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

/// A held record.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
struct Held {
    id: IdKey,
    t: i64,
    grain: GrainId,
}

/// `t` of a free slot (event times are positive).
const FREE: i64 = i64::MIN;

const SLOT_CHUNK: usize = 4096;

/// Held records keyed by id, expired by buckets of event time.
///
/// Records sit in dense fixed-size chunks of slots (free slots reused);
/// the index ([`SlotIndex`]) holds per record only its slot and the id's
/// low 32 bits, 8 bytes. The index's table is sized in powers of two, so
/// every byte in its entries costs up to two in memory: with whole records
/// in it (48 bytes) ten million held impressions took 105 bytes each, with
/// a slot and a separate grain 123; this way they take about 60. The id's
/// low bits in the entry let lookups skip other records' slots and let the
/// table grow without reading them.
///
/// Only a count per bucket is kept. Expired buckets are dropped from the
/// counts at once, but their records are freed in one sequential pass over
/// the slots only once they make up a quarter of those held: a pass per
/// bucket would read the whole click window (30 buckets) to free one
/// bucket, the conversion window (1 440) likewise. Expired records left in
/// place until then are unreachable by anything on time (the module doc's
/// argument holds for any time past the horizon), so when they are freed
/// changes no result; they cost at most a third more memory for a while,
/// and each pass reads at most five slots per record it frees.
#[derive(Debug, Default)]
struct HeldById {
    index: SlotIndex,
    slots: Vec<Vec<Held>>,
    free: Vec<u32>,
    counts: BTreeMap<i64, u32>,
    /// End of the last expired bucket: records below it are expired.
    expired_below: Option<i64>,
    /// Expired records not yet freed.
    expired_held: usize,
}

/// The number of slot `i` of chunk `c`.
fn slot_number(c: usize, i: usize) -> u32 {
    (c * SLOT_CHUNK + i) as u32
}

/// Serialized form of a [`HeldById`]: slots, free list and bucket counts
/// (the index is rebuilt on load). Borrowed when written, so a checkpoint
/// copies none of them.
#[derive(serde::Serialize, serde::Deserialize)]
struct HeldData<'a> {
    slots: Cow<'a, [Vec<Held>]>,
    free: Cow<'a, [u32]>,
    counts: Cow<'a, BTreeMap<i64, u32>>,
}

impl serde::Serialize for HeldById {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        HeldData {
            slots: Cow::Borrowed(&self.slots),
            free: Cow::Borrowed(&self.free),
            counts: Cow::Borrowed(&self.counts),
        }
        .serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for HeldById {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let data = HeldData::deserialize(d)?;
        let mut h = HeldById {
            index: SlotIndex::default(),
            slots: data.slots.into_owned(),
            free: data.free.into_owned(),
            counts: data.counts.into_owned(),
            expired_below: None,
            expired_held: 0,
        };
        // Records whose bucket has left the counts had expired but were not
        // freed yet when the checkpoint was taken.
        let held = || h.slots.iter().flatten().filter(|r| r.t != FREE);
        let below = match h.counts.first_key_value() {
            Some((&first, _)) => Some(first),
            None => held().map(|r| r.t + 1).max(),
        };
        let expired = below.map_or(0, |b| held().filter(|r| r.t < b).count());
        let live = held().count();
        h.expired_below = below.filter(|_| expired > 0);
        h.expired_held = expired;
        h.index.reserve(live);
        for (c, chunk) in h.slots.iter().enumerate() {
            for (i, r) in chunk.iter().enumerate() {
                if r.t != FREE {
                    h.index.insert(r.id as u32, slot_number(c, i));
                }
            }
        }
        Ok(h)
    }
}

impl HeldById {
    fn slot(&self, s: u32) -> &Held {
        &self.slots[s as usize / SLOT_CHUNK][s as usize % SLOT_CHUNK]
    }

    fn slot_mut(&mut self, s: u32) -> &mut Held {
        &mut self.slots[s as usize / SLOT_CHUNK][s as usize % SLOT_CHUNK]
    }

    fn find(&self, id: IdKey) -> Option<u32> {
        self.index.find(id as u32, |s| self.slot(s).id == id)
    }

    /// Records held and not expired.
    fn len(&self) -> usize {
        self.index.len().saturating_sub(self.expired_held)
    }

    /// Holds a record (in the bucket starting at `bucket`), taking a
    /// reference to its grain.
    fn insert(&mut self, held: Held, bucket: i64, width: i64, interner: &mut Interner) {
        let existing = self.find(held.id);
        interner.retain(held.grain);
        self.insert_at(existing, held, bucket, width, interner);
    }

    /// [`insert`](Self::insert), where the caller has looked up the id
    /// (`existing` is its slot if it is held) and hands over a reference
    /// to the grain it owns.
    ///
    /// Inlined so `held` goes from registers into its slot: passed through
    /// the stack, it was read back in wider pieces than it was written,
    /// which the CPU cannot forward from its store buffer.
    #[inline(always)]
    fn insert_at(
        &mut self,
        existing: Option<u32>,
        held: Held,
        bucket: i64,
        width: i64,
        interner: &mut Interner,
    ) {
        debug_assert_eq!(existing, self.find(held.id));
        *self.counts.entry(bucket).or_default() += 1;
        if let Some(s) = existing {
            let old = std::mem::replace(self.slot_mut(s), held);
            interner.release(old.grain);
            // A record is expired exactly when its bucket has left the counts.
            match self.counts.get_mut(&(old.t - old.t.rem_euclid(width))) {
                Some(n) => *n = n.saturating_sub(1),
                None => self.expired_held = self.expired_held.saturating_sub(1),
            }
            return;
        }
        let s = match self.free.pop() {
            Some(s) => {
                *self.slot_mut(s) = held;
                // Freed slots are cold; the next insert's is fetched now so
                // its line is in cache by then.
                if let Some(&next) = self.free.last() {
                    prefetch(self.slot(next));
                }
                s
            }
            None => {
                if self.slots.last().is_none_or(|c| c.len() == SLOT_CHUNK) {
                    self.slots.push(Vec::with_capacity(SLOT_CHUNK));
                }
                let c = self.slots.len() - 1;
                self.slots[c].push(held);
                slot_number(c, self.slots[c].len() - 1)
            }
        };
        self.index.insert(held.id as u32, s);
    }

    /// Event time and grain of the held record `id`.
    fn get(&self, id: IdKey) -> Option<(i64, GrainId)> {
        self.find(id).map(|s| {
            let h = self.slot(s);
            (h.t, h.grain)
        })
    }

    fn expire(&mut self, wm: i64, width: i64, horizon: i64, interner: &mut Interner) {
        while let Some(e) = self.counts.first_entry() {
            let last_t = *e.key() + width - 1;
            if last_t.saturating_add(horizon) >= wm {
                break;
            }
            self.expired_below = Some(*e.key() + width);
            self.expired_held += e.remove() as usize;
        }
        if self.expired_held > 0 && self.expired_held * 4 >= self.index.len() {
            self.free_expired(interner);
        }
    }

    /// Frees every record below `expired_below`, in one pass over the slots
    /// and one over the index. The index pass drops the freed slots' entries
    /// by a bit per slot: sequential reads of the whole table cost less than
    /// one random lookup per freed record, since at least a quarter of the
    /// entries go.
    fn free_expired(&mut self, interner: &mut Interner) {
        let Some(below) = self.expired_below else {
            return;
        };
        let mut freed = vec![0u64; self.slots.len() * SLOT_CHUNK / 64];
        for (c, chunk) in self.slots.iter_mut().enumerate() {
            for (i, h) in chunk.iter_mut().enumerate() {
                if h.t == FREE || h.t >= below {
                    continue;
                }
                let slot = slot_number(c, i);
                freed[slot as usize / 64] |= 1 << (slot % 64);
                interner.release(h.grain);
                h.t = FREE;
                self.free.push(slot);
            }
        }
        self.index
            .retain(|slot| freed[slot as usize / 64] & (1 << (slot % 64)) == 0);
        self.expired_held = 0;
    }
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

/// An impression id found not held by [`ClickJoin::find_impression`]: the
/// join then holds it without looking it up again (a lookup is a cache miss
/// in a table of millions).
#[derive(Debug)]
pub struct ImpressionAbsent(IdKey);

/// The impression id is held already: a duplicate.
#[derive(Debug)]
pub struct HeldImpression;

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

    /// Whether impression `id` is held (then a record with it is a
    /// duplicate); if not, the token [`on_impression`](Self::on_impression)
    /// takes.
    pub fn find_impression(&self, id: IdKey) -> Result<ImpressionAbsent, HeldImpression> {
        match self.impressions.find(id) {
            None => Ok(ImpressionAbsent(id)),
            Some(_) => Err(HeldImpression),
        }
    }

    /// Starts fetching what looking up impression `id` will read first
    /// (see [`Engine::prefetch`](super::Engine::prefetch)).
    pub fn prefetch_impression(&self, id: IdKey) {
        self.impressions.index.prefetch(id as u32);
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
    /// grain in `interner`: the held impression takes over the caller's
    /// (the one [`Interner::grain_of`] handed out), which saves taking one
    /// and giving one back for every impression.
    pub fn on_impression(
        &mut self,
        absent: ImpressionAbsent,
        t: i64,
        grain: GrainId,
        interner: &mut Interner,
        out: &mut Vec<Counted>,
    ) {
        let ImpressionAbsent(id) = absent;
        let b = self.bucket(t);
        self.impressions
            .insert_at(None, Held { id, t, grain }, b, self.cfg.bucket, interner);
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
        self.matched_clicks.insert(
            Held {
                id: click_id,
                t,
                grain,
            },
            b,
            self.cfg.bucket,
            interner,
        );
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
        if let Some((imp_t, grain)) = self.impressions.get(impression_id) {
            if imp_t <= t && t <= imp_t.saturating_add(self.cfg.click_window) {
                self.match_click(click_id, t, grain, cost_micros, interner, out);
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
        if let Some((click_t, grain)) = self.matched_clicks.get(click_id) {
            if click_t <= t && t <= click_t.saturating_add(self.cfg.conversion_window) {
                out.push(Counted::Conversion {
                    t,
                    grain,
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
            impressions: self.impressions.len(),
            matched_clicks: self.matched_clicks.len(),
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

#[cfg(test)]
mod tests {
    use super::*;

    const WIDTH: i64 = 60_000;
    const HORIZON: i64 = 30 * WIDTH;

    /// One record per id, all sharing one interned grain.
    fn hold(h: &mut HeldById, interner: &mut Interner, id: IdKey, t: i64, grain: GrainId) {
        h.insert(
            Held { id, t, grain },
            t - t.rem_euclid(WIDTH),
            WIDTH,
            interner,
        );
    }

    fn grain(interner: &mut Interner) -> GrainId {
        interner.grain("c", "a", "k", "s", "10.0.0.0/24", "d")
    }

    fn slots(h: &HeldById) -> usize {
        h.slots.iter().map(Vec::len).sum()
    }

    /// Expired records stop counting at once, are freed in batches, and
    /// their slots are reused: in steady state the slots stay within a
    /// third above the live records.
    #[test]
    fn expired_records_are_freed_in_batches_and_their_slots_reused() {
        let mut interner = Interner::default();
        let g = grain(&mut interner);
        let mut h = HeldById::default();
        let per_bucket = 100u64;
        let mut id: IdKey = 0;
        for minute in 0..200i64 {
            for i in 0..per_bucket {
                id += 1;
                hold(&mut h, &mut interner, id, minute * WIDTH + i as i64, g);
            }
            let wm = minute * WIDTH + WIDTH - 1;
            h.expire(wm, WIDTH, HORIZON, &mut interner);
            // Live: the buckets whose last ms + horizon >= wm.
            let live_buckets = (minute + 1).min(HORIZON / WIDTH + 1) as usize;
            assert_eq!(
                h.len(),
                live_buckets * per_bucket as usize,
                "minute {minute}"
            );
            assert!(h.index.len() * 3 <= h.len() * 4 + 3, "minute {minute}");
            assert!(slots(&h) * 3 <= h.len() * 4 + 3 * per_bucket as usize);
        }
        // Nothing expired is found once freed; live records all are.
        assert!(h.find(1).is_none());
        assert!(h.find(id).is_some());
        // The grain's references: one per record still in the slots.
        h.free_expired(&mut interner);
        assert_eq!(h.index.len(), h.len());
        for _ in 0..h.len() {
            interner.release(g);
        }
        assert_eq!(
            interner.strings(),
            5,
            "only the grain's own reference is left"
        );
    }

    /// A checkpoint taken while expired records wait to be freed restores
    /// the same live count, and the restored state frees them later.
    #[test]
    fn a_checkpoint_with_expired_records_waiting_restores_them_as_expired() {
        let mut interner = Interner::default();
        let g = grain(&mut interner);
        let mut h = HeldById::default();
        for minute in 0..40i64 {
            for i in 0..10 {
                hold(
                    &mut h,
                    &mut interner,
                    (minute * 10 + i) as IdKey + 1,
                    minute * WIDTH + i,
                    g,
                );
            }
        }
        // Expire one bucket: too few to free at once.
        h.expire(HORIZON + WIDTH, WIDTH, HORIZON, &mut interner);
        assert_eq!((h.len(), h.expired_held), (390, 10));
        let bytes = bincode::serialize(&h).expect("serializes");
        let mut r: HeldById = bincode::deserialize(&bytes).expect("deserializes");
        assert_eq!((r.len(), r.expired_held, r.index.len()), (390, 10, 400));
        // Holding an expired id again replaces its record, counted live once.
        hold(&mut r, &mut interner, 1, 40 * WIDTH, g);
        assert_eq!((r.len(), r.expired_held), (391, 9));
        // Expire most of the rest: the pass frees everything expired.
        r.expire(HORIZON + 30 * WIDTH, WIDTH, HORIZON, &mut interner);
        assert_eq!(r.expired_held, 0);
        assert_eq!(r.index.len(), r.len());
        assert_eq!(r.len(), 101, "buckets 30..=39 and the record held again");
        assert!(r.find(2).is_none() && r.find(1).is_some());
    }

    /// Everything expired, and nothing left in the counts: a restore still
    /// knows every held record is expired.
    #[test]
    fn a_checkpoint_with_only_expired_records_restores_none_live() {
        let mut interner = Interner::default();
        let g = grain(&mut interner);
        let mut h = HeldById::default();
        for i in 0..100 {
            hold(&mut h, &mut interner, i + 1, i as i64, g);
        }
        for i in 0..10 {
            hold(&mut h, &mut interner, 1000 + i, 20 * WIDTH + i as i64, g);
        }
        // The first bucket expires (and is 10/11 of the records: freed).
        h.expire(HORIZON + WIDTH, WIDTH, HORIZON, &mut interner);
        assert_eq!((h.len(), h.index.len()), (10, 10));
        h.expire(HORIZON + 21 * WIDTH, WIDTH, HORIZON, &mut interner);
        assert_eq!(h.len(), 0);
        let r: HeldById = bincode::deserialize(&bincode::serialize(&h).expect("serializes"))
            .expect("deserializes");
        assert_eq!(r.len(), 0);
    }
}
