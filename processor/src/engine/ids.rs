//! Fixed-size keys for ids and interned dimensions.
//!
//! Ids (`impression_id`, `click_id`, `conversion_id`) are arbitrary strings
//! from upstream; join state keys them by their 128-bit XXH3 hash so every
//! entry has the same small size. Two distinct ids collide with probability
//! about n²/2¹²⁹ (≈10⁻²⁵ for ten million ids), far below any hardware error
//! rate, so the hash is treated as the id.
//!
//! A grain (campaign, ad, keyword, state, ip range, device) is a
//! `GrainId`: its six dimensions as numbers, kept inline wherever the grain
//! is held. Five are interned strings (they repeat heavily: tens of
//! campaigns, hundreds of ads and keywords); the IP range, nearly unique
//! per impression (a /24 each), is its network number. Interning whole
//! grains, or even the five repeating dimensions together, would make the
//! interner as large as the join state and cost every impression a lookup
//! and every expiry a release in a table that large, each a cache miss.

use std::hash::BuildHasher as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::HashTable;

use super::short_table::{short_key, ShortTable};

/// A 128-bit id key.
pub type IdKey = u128;

/// Hashes an id string to its key.
pub fn id_key(id: &str) -> IdKey {
    id_key_of_bytes(id.as_bytes())
}

/// [`id_key`] of an id still in bytes (a record key, before validation).
pub fn id_key_of_bytes(id: &[u8]) -> IdKey {
    xxhash_rust::xxh3::xxh3_128(id)
}

/// An ad-metrics grain: in grain order, the interned ids of campaign, ad,
/// keyword and state, the [`IpRange`] code, and the interned id of the
/// device (see [`Interner`]).
pub type GrainId = [u32; 6];

/// IP range codes: 0 is no IP range (the empty string), 1..=2²⁴ an IPv4
/// /24 network plus one, and `IP_TEXT | id` an interned string (IPv6 /48
/// ranges, and any text that is not a canonical IPv4 /24).
const IP_TEXT: u32 = 1 << 31;

/// An impression's IP range, as the grain keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRange<'a> {
    /// No IP range: the empty string.
    None,
    /// The IPv4 /24 network holding this address.
    V4(Ipv4Addr),
    /// The IPv6 /48 network holding this address.
    V6(Ipv6Addr),
    /// A range as its text (tests build grains from the text rows carry).
    #[cfg_attr(not(test), allow(dead_code))]
    Text(&'a str),
}

impl<'a> IpRange<'a> {
    /// The range of `ip` (CONTRACT.md: /24 for IPv4, /48 for IPv6).
    pub fn of(ip: Option<IpAddr>) -> Self {
        match ip {
            None => IpRange::None,
            Some(IpAddr::V4(v4)) => IpRange::V4(v4),
            Some(IpAddr::V6(v6)) => IpRange::V6(v6),
        }
    }

    /// The range written as `text` (as an output row carries it); tests
    /// build grains from text through it.
    #[cfg(test)]
    pub fn from_text(text: &'a str) -> Self {
        if text.is_empty() {
            return IpRange::None;
        }
        match text.strip_suffix(".0/24").and_then(canonical_octets) {
            Some([a, b, c]) => IpRange::V4(Ipv4Addr::new(a, b, c, 0)),
            None => IpRange::Text(text),
        }
    }
}

/// `a.b.c` as three decimal octets, only in the form [`v4_range_text`]
/// writes (no leading zeros), so a number maps back to the same text.
#[cfg(test)]
fn canonical_octets(s: &str) -> Option<[u8; 3]> {
    let mut out = [0u8; 3];
    let mut parts = s.split('.');
    for o in &mut out {
        let p = parts.next()?.as_bytes();
        let canonical = matches!(p.len(), 1..=3)
            && p.iter().all(u8::is_ascii_digit)
            && (p.len() == 1 || p[0] != b'0');
        if !canonical {
            return None;
        }
        let v = p.iter().fold(0u32, |v, d| v * 10 + u32::from(d - b'0'));
        *o = u8::try_from(v).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// An IPv4 /24 code's text (`a.b.c.0/24`, at most 16 bytes) and its length.
fn v4_range_text(code: u32) -> ([u8; 16], usize) {
    let net = code - 1;
    let mut b = [0u8; 16];
    let mut n = 0;
    for shift in [16, 8, 0] {
        let o = (net >> shift) as u8;
        if o >= 100 {
            b[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            b[n] = b'0' + o / 10 % 10;
            n += 1;
        }
        b[n] = b'0' + o % 10;
        b[n + 1] = b'.';
        n += 2;
    }
    b[n..n + 4].copy_from_slice(b"0/24");
    (b, n + 4)
}

/// The code of the IPv4 /24 network holding `v4`.
fn v4_code(v4: Ipv4Addr) -> u32 {
    (u32::from(v4) >> 8) + 1
}

/// Writes the text of the IPv4 /24 network holding `v4`.
pub(crate) fn write_v4_range_of(v4: Ipv4Addr, out: &mut String) {
    write_v4_range(v4_code(v4), out);
}

/// Writes an IPv4 /24 code's text.
fn write_v4_range(code: u32, out: &mut String) {
    let (b, n) = v4_range_text(code);
    debug_assert!(b[..n].is_ascii());
    // SAFETY: `v4_range_text` writes only digits, dots and "/", which are
    // ASCII and so UTF-8. (Checking it with `from_utf8` was two fifths of
    // this function, which runs for nearly every output row.)
    out.push_str(unsafe { std::str::from_utf8_unchecked(&b[..n]) });
}

/// The dimension values of one grain. Ordered in grain order: by campaign,
/// ad, keyword and state, then IP range (none first, then IPv4 ranges,
/// then IPv6 ones, each family in text order), then device.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grain {
    pub campaign_id: Box<str>,
    pub ad_id: Box<str>,
    pub search_keyword: Box<str>,
    pub state: Box<str>,
    pub ip_range: Box<str>,
    pub device_type: Box<str>,
}

impl Grain {
    fn order_key(&self) -> (&str, &str, &str, &str, u8, &str, &str) {
        let family = match &*self.ip_range {
            "" => 0,
            t if t.ends_with("/24") => 1,
            _ => 2,
        };
        (
            &self.campaign_id,
            &self.ad_id,
            &self.search_keyword,
            &self.state,
            family,
            &self.ip_range,
            &self.device_type,
        )
    }
}

impl PartialOrd for Grain {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Grain {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

/// Rank of `x` followed by a dot, `"{x}."`, among those of every octet, in
/// text order. Octet texts end in a dot (the last one in ".0/24") and a dot
/// sorts before every digit, so no octet's text is a prefix of another's:
/// two IPv4 range texts compare as their octets' ranks do, left to right.
fn octet_text_rank() -> &'static [u8; 256] {
    static RANKS: std::sync::OnceLock<[u8; 256]> = std::sync::OnceLock::new();
    RANKS.get_or_init(|| {
        let mut texts: Vec<(String, u8)> = (0..=255u8).map(|x| (format!("{x}."), x)).collect();
        texts.sort();
        let mut ranks = [0u8; 256];
        for (rank, (_, x)) in texts.into_iter().enumerate() {
            ranks[x as usize] = rank as u8;
        }
        ranks
    })
}

/// An IPv4 range code as a number in the text order of its range.
fn v4_text_order(code: u32) -> u32 {
    let ranks = octet_text_rank();
    let net = code - 1;
    let rank = |shift: u32| u32::from(ranks[(net >> shift) as usize & 0xff]);
    (rank(16) << 16) | (rank(8) << 8) | rank(0)
}

/// Where the dimensions sit in a [`GrainId`].
const CAMPAIGN: usize = 0;
const IP: usize = 4;

/// Interns strings, counting references so that state which no longer
/// mentions a string frees it.
///
/// Each string is stored once: the hash table holds only indices into
/// `values` and hashes what those point to.
///
/// Invariant: every grain reference (each join entry and each open window
/// cell holding a grain owns one) counts once on each of its interned
/// strings (five, six when the IP range is text); a string is live while
/// its count is above zero. Freed slots are reused, so ids are only stable
/// while referenced. Ids never reach an output (rows are ordered by the
/// values, [`Interner::sorted_cells`]), so reuse cannot change results.
#[derive(Default)]
pub struct Interner {
    hasher: hashbrown::DefaultHashBuilder,
    /// Ids of strings longer than [`SHORT_MAX`](super::short_table::SHORT_MAX) bytes, by their hash.
    strings: HashTable<u32>,
    /// Ids of the others (nearly every dimension value), by their
    /// [`short_key`] ([`ShortTable`] says why); and ids of IPv6 /48 range
    /// texts by [`v6_range_key`] as well.
    short: ShortTable,
    /// Where a range's text is written before it is interned.
    scratch: String,
    values: Vec<Box<str>>,
    value_refs: Vec<u32>,
    free_values: Vec<u32>,
}

/// Serialized form of an [`Interner`]: the slots in id order with their
/// reference counts (free slots have count 0; the hash tables and free
/// lists are rebuilt on load, so ids stay the same).
#[derive(serde::Serialize, serde::Deserialize)]
struct InternerData {
    values: Vec<Box<str>>,
    value_refs: Vec<u32>,
}

impl serde::Serialize for Interner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("InternerData", 2)?;
        st.serialize_field("values", &self.values)?;
        st.serialize_field("value_refs", &self.value_refs)?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for Interner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let data = InternerData::deserialize(d)?;
        if data.values.len() != data.value_refs.len() {
            return Err(D::Error::custom("inconsistent interner tables"));
        }
        let mut i = Interner {
            values: data.values,
            value_refs: data.value_refs,
            ..Interner::default()
        };
        for id in 0..i.values.len() {
            if i.value_refs[id] == 0 {
                i.free_values.push(id as u32);
            } else {
                i.index(id as u32);
            }
        }
        // Reuse low ids first, as a fresh interner would have.
        i.free_values.reverse();
        Ok(i)
    }
}

/// The interned strings of a grain: all but the IP range, which only
/// sometimes is one.
fn strings_of(g: &GrainId) -> impl Iterator<Item = u32> + '_ {
    g.iter().enumerate().filter_map(|(d, &v)| match d {
        IP if v & IP_TEXT != 0 => Some(v & !IP_TEXT),
        IP => None,
        _ => Some(v),
    })
}

/// `g` with each of its strings renumbered by `f` (from one string table
/// to another); IPv4 codes are kept.
pub fn map_strings(g: GrainId, mut f: impl FnMut(u32) -> u32) -> GrainId {
    std::array::from_fn(|d| match g[d] {
        code if d == IP && code & IP_TEXT != 0 => IP_TEXT | f(code & !IP_TEXT),
        code if d == IP => code,
        id => f(id),
    })
}

/// The interner's strings renumbered for one batch that carries its own
/// string table (a window's rows, a partials record): numbered in order of
/// first use, so the batch holds each string once.
pub struct BatchStrings {
    /// Batch number by interner id (`u32::MAX`: not in this batch).
    index: Vec<u32>,
    /// Interner ids in batch order.
    used: Vec<u32>,
}

impl BatchStrings {
    /// A numbering for grains of `interner` as it is now (it may release
    /// strings meanwhile, but not intern new ones).
    pub fn new(interner: &Interner) -> Self {
        BatchStrings {
            index: vec![u32::MAX; interner.values.len()],
            used: Vec::new(),
        }
    }

    /// `g` in this batch's numbering; `added` is called with the interner
    /// id of each string the batch did not have yet, in batch order.
    pub fn renumber(&mut self, g: GrainId, mut added: impl FnMut(u32)) -> GrainId {
        map_strings(g, |id| {
            let slot = &mut self.index[id as usize];
            if *slot == u32::MAX {
                *slot = self.used.len() as u32;
                self.used.push(id);
                added(id);
            }
            *slot
        })
    }

    /// Starts a new batch.
    pub fn clear(&mut self) {
        for id in self.used.drain(..) {
            self.index[id as usize] = u32::MAX;
        }
    }
}

/// The dimension values of `g` with its strings looked up in `table` (the
/// IP range is written into `ip`); `None` if `table` lacks one or the IP
/// code is out of range.
pub fn values_in<'a>(
    g: GrainId,
    table: impl Fn(u32) -> Option<&'a str>,
    ip: &'a mut String,
) -> Option<[&'a str; 6]> {
    ip.clear();
    match g[IP] {
        0 => {}
        code if code & IP_TEXT != 0 => ip.push_str(table(code & !IP_TEXT)?),
        code if code <= 1 << 24 => write_v4_range(code, ip),
        _ => return None,
    }
    Some([
        table(g[0])?,
        table(g[1])?,
        table(g[2])?,
        table(g[3])?,
        ip.as_str(),
        table(g[5])?,
    ])
}

impl Interner {
    /// The id of `s` with one reference taken (give it back with
    /// [`release_string`](Self::release_string)).
    pub fn hold(&mut self, s: &str) -> u32 {
        let id = self.intern(s);
        self.value_refs[id as usize] += 1;
        id
    }

    /// The id of `s`, adding it (unreferenced) if new.
    #[inline]
    fn intern(&mut self, s: &str) -> u32 {
        match short_key(s.as_bytes()) {
            Some(key) => match self.short.find(key) {
                Some(id) => id,
                None => self.add(s),
            },
            None => self.intern_long(s),
        }
    }

    #[inline(never)]
    fn intern_long(&mut self, s: &str) -> u32 {
        let hash = self.hasher.hash_one(s);
        let values = &self.values;
        match self.strings.find(hash, |&i| {
            same_bytes(values[i as usize].as_bytes(), s.as_bytes())
        }) {
            Some(&id) => id,
            None => self.add(s),
        }
    }

    /// The id of the text of `v6`'s /48 range, found by the network's
    /// bits: the text is written only the first time (a fifth of users
    /// are on IPv6, and writing and hashing the text was most of their
    /// interning).
    #[inline]
    fn intern_v6(&mut self, v6: Ipv6Addr) -> u32 {
        match self.short.find(v6_range_key(v6)) {
            Some(id) => id,
            None => self.intern_v6_text(v6),
        }
    }

    #[inline(never)]
    fn intern_v6_text(&mut self, v6: Ipv6Addr) -> u32 {
        let mut text = std::mem::take(&mut self.scratch);
        super::validate::ip_range_into(IpAddr::V6(v6), &mut text);
        // By its text first: the same string may be held already (interned
        // by text, or before a restore, which indexes texts only).
        let id = self.intern(&text);
        self.scratch = text;
        self.short.insert(v6_range_key(v6), id);
        id
    }

    /// Adds `s` (not interned yet), unreferenced.
    #[inline(never)]
    fn add(&mut self, s: &str) -> u32 {
        let id = match self.free_values.pop() {
            Some(id) => {
                self.values[id as usize] = s.into();
                id
            }
            None => {
                self.values.push(s.into());
                self.value_refs.push(0);
                (self.values.len() - 1) as u32
            }
        };
        self.index(id);
        id
    }

    /// Puts string `id` into the table its length says.
    fn index(&mut self, id: u32) {
        let (values, hasher) = (&self.values, &self.hasher);
        let v = &values[id as usize];
        match short_key(v.as_bytes()) {
            Some(key) => self.short.insert(key, id),
            None => {
                self.strings.insert_unique(hasher.hash_one(&**v), id, |&i| {
                    hasher.hash_one(&*values[i as usize])
                });
            }
        }
    }

    /// Gives back one reference to string `v`, freeing it at the last.
    ///
    /// Inlined: it runs five times for every reference to a grain given
    /// back, and nearly always only counts down.
    #[inline]
    pub fn release_string(&mut self, v: u32) {
        let refs = &mut self.value_refs[v as usize];
        *refs = refs.saturating_sub(1);
        if *refs == 0 {
            self.free_string(v);
        }
    }

    #[inline(never)]
    fn free_string(&mut self, v: u32) {
        let value = std::mem::take(&mut self.values[v as usize]);
        match short_key(value.as_bytes()) {
            Some(key) => {
                self.short.remove(key);
            }
            None => {
                if let Ok(e) = self
                    .strings
                    .find_entry(self.hasher.hash_one(&*value), |&x| x == v)
                {
                    e.remove();
                }
            }
        }
        // A range's network key goes with its text.
        if let Some(v6) = value
            .strip_suffix("/48")
            .and_then(|a| a.parse::<Ipv6Addr>().ok())
        {
            self.short.remove(v6_range_key(v6));
        }
        self.free_values.push(v);
    }

    /// The grain id of these dimension values, with one reference owned by
    /// the caller (give it back with [`release`](Self::release)).
    pub fn grain_of(
        &mut self,
        campaign_id: &str,
        ad_id: &str,
        search_keyword: &str,
        state: &str,
        ip_range: IpRange<'_>,
        device_type: &str,
    ) -> GrainId {
        let ip = match ip_range {
            IpRange::None => 0,
            IpRange::V4(v4) => v4_code(v4),
            IpRange::V6(v6) => IP_TEXT | self.intern_v6(v6),
            IpRange::Text(s) => IP_TEXT | self.intern(s),
        };
        let g = [
            self.intern(campaign_id),
            self.intern(ad_id),
            self.intern(search_keyword),
            self.intern(state),
            ip,
            self.intern(device_type),
        ];
        self.retain(g);
        g
    }

    /// [`grain_of`](Self::grain_of) with the IP range as text (tests).
    #[cfg(test)]
    pub fn grain(
        &mut self,
        campaign_id: &str,
        ad_id: &str,
        search_keyword: &str,
        state: &str,
        ip_range: &str,
        device_type: &str,
    ) -> GrainId {
        self.grain_of(
            campaign_id,
            ad_id,
            search_keyword,
            state,
            IpRange::from_text(ip_range),
            device_type,
        )
    }

    /// Takes one more reference to a grain.
    pub fn retain(&mut self, g: GrainId) {
        for v in strings_of(&g) {
            self.value_refs[v as usize] += 1;
        }
    }

    /// Gives back one reference; strings it was the last user of are freed.
    pub fn release(&mut self, g: GrainId) {
        for v in strings_of(&g) {
            self.release_string(v);
        }
    }

    /// The campaign of a grain, as its interned string id.
    pub fn campaign_of(&self, g: GrainId) -> u32 {
        g[CAMPAIGN]
    }

    pub fn string(&self, id: u32) -> &str {
        &self.values[id as usize]
    }

    /// `cells` in grain order (by the dimension values, as [`Grain`]'s
    /// `Ord` orders them), written into `out` (cleared first): a window's
    /// cells are megabytes, and sorting them in place cost one more copy.
    ///
    /// Comparing grains string by string was a tenth of the engine's time
    /// (a window holds about one grain per impression, nearly all differing
    /// only in the IP range). Instead each dimension is ranked once over its
    /// distinct values in the window ([`WindowRanks`]), and the six ranks
    /// pack into one integer with the cell's index, so cells sort as plain
    /// integers.
    pub fn sorted_cells<T: Copy>(&self, cells: &[(GrainId, T)], out: &mut Vec<(GrainId, T)>) {
        self.sorted_cells_as(cells, out, Packing::Narrowest);
    }

    /// [`sorted_cells`](Self::sorted_cells) with the keys packed as
    /// `packing` says (tests force each way).
    fn sorted_cells_as<T: Copy>(
        &self,
        cells: &[(GrainId, T)],
        out: &mut Vec<(GrainId, T)>,
        packing: Packing,
    ) {
        out.clear();
        if cells.len() < 2 {
            out.extend_from_slice(cells);
            return;
        }
        let ranks = WindowRanks::of(self, cells);
        let bits = ranks.bits();
        // A radix sort over only the digits that vary: a window holds many
        // cells. It reads every digit of every key to count them, so the
        // narrower key is half the work when the ranks fit in 64 bits (the
        // generator's windows need 58); it is stable, so equal grains stay
        // in log order.
        if bits <= 64 && packing == Packing::Narrowest {
            let mut keyed: Vec<(u64, u32)> = cells
                .iter()
                .enumerate()
                .map(|(i, (g, _))| (ranks.key64(g), i as u32))
                .collect();
            radsort::sort_by_key(&mut keyed, |k| k.0);
            out.extend(keyed.iter().map(|k| cells[k.1 as usize]));
        } else if bits <= 96 && packing != Packing::Compare {
            let mut keys: Vec<u128> = cells
                .iter()
                .enumerate()
                .map(|(i, (g, _))| (ranks.key(g) << 32) | i as u128)
                .collect();
            radsort::sort(&mut keys);
            out.extend(keys.iter().map(|&k| cells[k as u32 as usize]));
        } else {
            let mut order: Vec<u32> = (0..cells.len() as u32).collect();
            order.sort_unstable_by(|&a, &b| {
                let (ga, gb) = (&cells[a as usize].0, &cells[b as usize].0);
                (0..6)
                    .map(|d| ranks.rank(ga, d).cmp(&ranks.rank(gb, d)))
                    .find(|o| o.is_ne())
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            out.extend(order.iter().map(|&i| cells[i as usize]));
        }
    }

    /// The first 16 bytes of an IP range text's (by interned id),
    /// big-endian, zero-padded.
    fn ip_sort_key(&self, id: u32) -> u128 {
        let mut b = [0u8; 16];
        let t = self.values[id as usize].as_bytes();
        let n = t.len().min(16);
        b[..n].copy_from_slice(&t[..n]);
        u128::from_be_bytes(b)
    }

    /// The dimension values of a live grain (tests, debugging).
    pub fn resolve(&self, g: GrainId) -> Grain {
        let mut ip = String::new();
        let table = |id: u32| self.values.get(id as usize).map(|v| &**v);
        let v = values_in(g, table, &mut ip).unwrap_or([""; 6]);
        Grain {
            campaign_id: v[0].into(),
            ad_id: v[1].into(),
            search_keyword: v[2].into(),
            state: v[3].into(),
            ip_range: v[4].into(),
            device_type: v[5].into(),
        }
    }

    /// Number of live strings.
    pub fn strings(&self) -> usize {
        self.values.len() - self.free_values.len()
    }
}

/// How [`Interner::sorted_cells`] sorts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Only tests ask for the other ways.
#[cfg_attr(not(test), allow(dead_code))]
enum Packing {
    /// Ranks packed into a `u64` if they fit, else a `u128` with the index.
    Narrowest,
    /// Ranks packed into a `u128` with the index (if they fit in 96 bits).
    Wide,
    /// Ranks compared one by one.
    Compare,
}

/// First rank of the IP ranges kept as text: after no range (0) and every
/// IPv4 range (1 + [`v4_text_order`]).
const TEXTS_FROM: u32 = (1 << 24) + 1;

/// For one window's cells, the rank of each dimension value in grain
/// order: string dimensions by their rank among the window's distinct
/// values, through a table by interned id (interned strings are unique, so
/// equal ids mean equal values); IPv4 ranges by a number that orders them
/// as their text does ([`v4_text_order`]), with no sort; IP ranges kept as
/// text (IPv6), after those, by a sort of their texts (first on their
/// first 16 bytes as a big-endian number, only ties compared as strings).
///
/// Built in one pass over the cells; the sort key of a cell is then read
/// from it in another ([`key`](Self::key)). Materializing a vector of
/// ranks per dimension took two more passes per dimension, and close (this
/// sort) was a tenth of the engine's time.
struct WindowRanks {
    /// Rank by interned id, per dimension (at `IP`: of the range texts);
    /// set only for the window's ids.
    by_id: [Vec<u32>; 6],
    /// Bits each dimension's ranks take.
    bits: [u32; 6],
}

impl WindowRanks {
    fn of<T>(interner: &Interner, cells: &[(GrainId, T)]) -> Self {
        let n = interner.values.len();
        let mut by_id: [Vec<u32>; 6] = std::array::from_fn(|_| vec![u32::MAX; n]);
        let mut distinct: [Vec<u32>; 6] = Default::default();
        let mut top_v4 = 0;
        for (g, _) in cells {
            for (d, &code) in g.iter().enumerate() {
                let id = if d != IP {
                    code
                } else if code & IP_TEXT != 0 {
                    code & !IP_TEXT
                } else {
                    top_v4 = top_v4.max(v4_rank(code));
                    continue;
                };
                let r = &mut by_id[d][id as usize];
                if *r == u32::MAX {
                    *r = 0;
                    distinct[d].push(id);
                }
            }
        }
        let mut bits = [0; 6];
        for (d, ids) in distinct.iter_mut().enumerate() {
            if d == IP {
                continue;
            }
            ids.sort_unstable_by(|&a, &b| {
                interner.values[a as usize].cmp(&interner.values[b as usize])
            });
            for (rank, &id) in ids.iter().enumerate() {
                by_id[d][id as usize] = rank as u32;
            }
            bits[d] = bits_for(ids.len());
        }
        let texts = &mut distinct[IP];
        bits[IP] = if texts.is_empty() {
            bits_for(top_v4 as usize + 1)
        } else {
            let mut keyed: Vec<(u128, u32)> = texts
                .iter()
                .map(|&id| (interner.ip_sort_key(id), id))
                .collect();
            // Equal 16-byte keys of different texts are told apart by the
            // whole text.
            let text = |id: u32| &*interner.values[id as usize];
            keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| text(a.1).cmp(text(b.1))));
            for (k, &(_, id)) in keyed.iter().enumerate() {
                by_id[IP][id as usize] = TEXTS_FROM + k as u32;
            }
            bits_for(TEXTS_FROM as usize + texts.len())
        };
        WindowRanks { by_id, bits }
    }

    /// Bits all six ranks take together.
    fn bits(&self) -> u32 {
        self.bits.iter().sum()
    }

    /// The rank of `g`'s value in dimension `d`.
    fn rank(&self, g: &GrainId, d: usize) -> u32 {
        match g[d] {
            code if d == IP && code & IP_TEXT != 0 => self.by_id[IP][(code & !IP_TEXT) as usize],
            code if d == IP => v4_rank(code),
            id => self.by_id[d][id as usize],
        }
    }

    /// `g`'s six ranks packed in grain order (when [`bits`](Self::bits)
    /// is at most 96).
    fn key(&self, g: &GrainId) -> u128 {
        (0..6).fold(0u128, |k, d| {
            (k << self.bits[d]) | u128::from(self.rank(g, d))
        })
    }

    /// [`key`](Self::key) when [`bits`](Self::bits) is at most 64 (half
    /// the shifting).
    #[inline]
    fn key64(&self, g: &GrainId) -> u64 {
        (0..6).fold(0u64, |k, d| {
            (k << self.bits[d]) | u64::from(self.rank(g, d))
        })
    }
}

/// The rank of an IP range code that is not text: no range first, then
/// IPv4 ranges in text order.
fn v4_rank(code: u32) -> u32 {
    if code == 0 {
        0
    } else {
        1 + v4_text_order(code)
    }
}

/// The [`ShortTable`] key of `v6`'s /48 range: the network's 48 bits, and
/// a top byte of 0xff, which no [`short_key`] has (theirs is a length of at
/// most 15).
fn v6_range_key(v6: Ipv6Addr) -> u128 {
    (u128::from(v6) >> 80) | 0xff << 120
}

/// Whether `a` and `b` hold the same bytes. The interned values compared
/// here (those too long for a [`short_key`]: some keywords, IPv6 range
/// texts) are mostly 16 to 32 bytes, and there overlapping word compares
/// cost less than the call to `memcmp` that `==` makes.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    use adstream_schemas::records::words::{u32_at as w4, u64_at as w8};
    // Each case reads words that together cover all `n` bytes.
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => w4(a, 0) == w4(b, 0) && w4(a, n - 4) == w4(b, n - 4),
        8..=16 => w8(a, 0) == w8(b, 0) && w8(a, n - 8) == w8(b, n - 8),
        17..=32 => {
            w8(a, 0) == w8(b, 0)
                && w8(a, 8) == w8(b, 8)
                && w8(a, n - 16) == w8(b, n - 16)
                && w8(a, n - 8) == w8(b, n - 8)
        }
        _ => a == b,
    }
}

/// Bits needed for ranks below `distinct`.
fn bits_for(distinct: usize) -> u32 {
    usize::BITS - distinct.saturating_sub(1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_bytes_agrees_with_eq_at_every_length_and_position() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(37)).collect();
            assert!(same_bytes(&a, &a.clone()), "{n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x10;
                assert!(!same_bytes(&a, &b), "{n} bytes, differing at {at}");
            }
            let longer = [a.as_slice(), &[0]].concat();
            assert!(!same_bytes(&a, &longer), "{n}");
        }
    }

    #[test]
    fn interning_is_stable() {
        let mut i = Interner::default();
        let a = i.grain("c", "a", "k", "s", "1.2.3.0/24", "mobile");
        let b = i.grain("c", "a", "k", "s", "1.2.3.0/24", "mobile");
        let c = i.grain("c", "a", "k", "s", "1.2.4.0/24", "mobile");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(&*i.resolve(c).ip_range, "1.2.4.0/24");
        assert_eq!(i.string(i.campaign_of(a)), "c");
        assert_eq!(i.strings(), 5, "IP ranges as numbers");
    }

    #[test]
    fn every_ip_range_text_comes_back_as_it_went_in() {
        let mut i = Interner::default();
        for text in [
            "",
            "0.0.0.0/24",
            "1.2.3.0/24",
            "255.255.255.0/24",
            "10.100.9.0/24",
            "2001:db8:1::/48",
            "::/48",
            // Not what the engine writes, so kept as text, unchanged.
            "010.1.2.0/24",
            "1.2.3.4/24",
            "1.2.256.0/24",
            "1.2.0/24",
            "1.2.3.4.0/24",
            "1..3.0/24",
            "x",
        ] {
            let g = i.grain("c", "a", "k", "s", text, "d");
            assert_eq!(&*i.resolve(g).ip_range, text);
            let numeric = matches!(IpRange::from_text(text), IpRange::V4(_) | IpRange::None);
            assert_eq!(g[IP] & IP_TEXT == 0, numeric, "{text}");
        }
        assert!(matches!(
            IpRange::from_text("10.100.9.0/24"),
            IpRange::V4(v) if v == Ipv4Addr::new(10, 100, 9, 0)
        ));
        let v4 = IpRange::of(Some("10.1.2.3".parse().expect("ip")));
        let g = i.grain_of("c", "a", "k", "s", v4, "d");
        assert_eq!(g, i.grain("c", "a", "k", "s", "10.1.2.0/24", "d"));
    }

    #[test]
    fn sorted_cells_are_in_grain_order() {
        let mut i = Interner::default();
        let mut seed = 7u64;
        let mut pick = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for n in [0usize, 1, 5, 63, 64, 65, 3_000] {
            let mut cells: Vec<(GrainId, usize)> = Vec::new();
            for k in 0..n {
                // Few values per dimension, so ties reach every dimension;
                // IP ranges whose text order is not their numeric order.
                let ip = match pick(6) {
                    0 => String::new(),
                    1 => format!("2001:db8:{:x}::/48", pick(20)),
                    // Texts longer than 16 bytes that share their first 16.
                    2 => format!("2001:0db8:abcd:0001:{:x}::/80", pick(20)),
                    _ => format!("{}.{}.0.0/24", pick(3) * 45, pick(12)),
                };
                let g = i.grain(
                    &format!("c{}", pick(3)),
                    &format!("a{}", pick(4)),
                    ["k", "k2", "", "ü"][pick(4) as usize],
                    &format!("s{}", pick(2)),
                    &ip,
                    ["mobile", "ctv", "desktop"][pick(3) as usize],
                );
                if cells.iter().all(|(c, _)| *c != g) {
                    cells.push((g, k));
                }
            }
            let mut want = cells.clone();
            want.sort_by_key(|a| i.resolve(a.0));
            // The output vector holds stale cells first: it is cleared.
            let mut sorted = cells.clone();
            i.sorted_cells(&cells, &mut sorted);
            assert_eq!(sorted, want, "{n} cells");
            i.sorted_cells_as(&cells, &mut sorted, Packing::Wide);
            assert_eq!(sorted, want, "{n} cells, ranks packed with the index");
            i.sorted_cells_as(&cells, &mut sorted, Packing::Compare);
            assert_eq!(sorted, want, "{n} cells, ranks compared one by one");
        }
    }

    #[test]
    fn ipv4_ranges_order_by_number_as_by_text() {
        let text = |code: u32| {
            let mut t = String::new();
            write_v4_range(code, &mut t);
            t
        };
        let mut seed = 11u64;
        let mut code = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Octets drawn so that they often share digits and lengths.
            let o = |k: u64| {
                [0, 1, 2, 9, 10, 19, 20, 25, 99, 100, 199, 200, 249, 250, 255][(k % 15) as usize]
            };
            let s = seed >> 20;
            1 + ((o(s) << 16) | (o(s >> 8) << 8) | o(s >> 16)) as u32
        };
        for _ in 0..20_000 {
            let (a, b) = (code(), code());
            assert_eq!(
                v4_text_order(a).cmp(&v4_text_order(b)),
                text(a).cmp(&text(b)),
                "{} vs {}",
                text(a),
                text(b)
            );
        }
    }

    #[test]
    fn a_restored_interner_keeps_every_id() {
        let mut i = Interner::default();
        let a = i.grain("c", "a", "k", "s", "1.2.3.0/24", "mobile");
        let b = i.grain("d", "a", "k", "s", "2001:db8::/48", "tablet");
        let bytes = bincode::serialize(&i).expect("serialize");
        let mut j: Interner = bincode::deserialize(&bytes).expect("deserialize");
        assert_eq!(j.resolve(a), i.resolve(a));
        assert_eq!(j.resolve(b), i.resolve(b));
        assert_eq!(j.grain("d", "a", "k", "s", "2001:db8::/48", "tablet"), b);
        assert_eq!(j.strings(), 8);
    }

    #[test]
    fn the_last_release_frees_unshared_strings() {
        // Longer than a short key: both of the interner's tables are used.
        const K: &str = "a keyword of more than fifteen bytes";
        let mut i = Interner::default();
        let a = i.grain("c", "a", K, "s", "2001:db8::/48", "mobile");
        let b = i.grain("c", "a", K, "s", "9.9.9.0/24", "mobile");
        i.retain(a);
        assert_eq!(i.strings(), 6);
        i.release(a);
        assert_eq!(i.strings(), 6);
        i.release(a);
        assert_eq!(i.strings(), 5, "the IPv6 text is freed");
        assert_eq!(&*i.resolve(b).ip_range, "9.9.9.0/24");
        let d = i.grain("d", "a", K, "s", "1.2.3.0/24", "mobile");
        assert_eq!(i.strings(), 6);
        assert_eq!(i.grain("c", "a", K, "s", "9.9.9.0/24", "mobile"), b);
        assert_eq!(&*i.resolve(d).campaign_id, "d");
        i.release(b);
        i.release(b);
        assert_eq!(i.strings(), 5, "campaign c is freed");
        i.release(d);
        assert_eq!(i.strings(), 0);
        // Freed slots are reused, and lookups still find live strings.
        let e = i.grain("e", "a", K, "s", "", "mobile");
        assert!(e.iter().all(|&v| v < 7), "freed slots, not new ones: {e:?}");
        // Freed strings left both tables: interned again, each resolves
        // to itself, not to an emptied slot.
        let r = i.resolve(e);
        assert_eq!(
            [&*r.campaign_id, &*r.ad_id, &*r.search_keyword, &*r.state],
            ["e", "a", K, "s"]
        );
        assert_eq!((&*r.ip_range, &*r.device_type), ("", "mobile"));
        let f = i.grain("e", "a2", K, "s", "", "mobile");
        assert_eq!((f[0], f[2]), (e[0], e[2]));
    }

    #[test]
    fn an_ipv6_range_by_address_is_the_same_string_as_by_text() {
        let v6: Ipv6Addr = "2001:db8:7:1::5".parse().expect("ip");
        let mut i = Interner::default();
        let by_text = i.grain("c", "a", "k", "s", "2001:db8:7::/48", "mobile");
        let by_address = i.grain_of("c", "a", "k", "s", IpRange::V6(v6), "mobile");
        assert_eq!(by_address, by_text, "one string, whichever way it came");
        assert_eq!(
            i.grain_of("c", "a", "k", "s", IpRange::V6(v6), "mobile"),
            by_text
        );
        assert_eq!(&*i.resolve(by_address).ip_range, "2001:db8:7::/48");
        for _ in 0..3 {
            i.release(by_text);
        }
        assert_eq!(i.strings(), 0);
        // The range's key left with its text: its slot, reused by another
        // string, is not what the range resolves to.
        let other = i.grain("x", "y", "z", "w", "", "tablet");
        let again = i.grain_of("c", "a", "k", "s", IpRange::V6(v6), "mobile");
        assert_eq!(&*i.resolve(again).ip_range, "2001:db8:7::/48");
        assert_eq!(&*i.resolve(other).campaign_id, "x");
        // A restored interner finds the range by its address too.
        let bytes = bincode::serialize(&i).expect("serialize");
        let mut j: Interner = bincode::deserialize(&bytes).expect("deserialize");
        assert_eq!(
            j.grain_of("c", "a", "k", "s", IpRange::V6(v6), "mobile"),
            again
        );
    }

    #[test]
    fn a_restored_interner_keeps_free_slots_and_counts() {
        let mut i = Interner::default();
        let a = i.grain("c", "a", "k", "s", "1.2.3.0/24", "mobile");
        let b = i.grain("d", "a", "k", "s", "9.9.9.0/24", "mobile");
        i.release(a);
        let bytes = bincode::serialize(&i).expect("serialize");
        let mut j: Interner = bincode::deserialize(&bytes).expect("deserialize");
        assert_eq!(j.strings(), 5);
        assert_eq!(j.resolve(b), i.resolve(b));
        assert_eq!(
            j.grain("e", "a", "k", "s", "1.2.3.0/24", "mobile"),
            a,
            "c's slot reused"
        );
        j.release(b);
        assert_eq!(j.strings(), 5);
    }

    #[test]
    fn id_keys_differ() {
        assert_ne!(id_key("imp-1"), id_key("imp-2"));
        assert_eq!(id_key("imp-1"), id_key("imp-1"));
    }
}
