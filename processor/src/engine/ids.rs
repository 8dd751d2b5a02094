//! Fixed-size keys for ids and interned dimensions.
//!
//! Ids (`impression_id`, `click_id`, `conversion_id`) are arbitrary strings
//! from upstream; join state keys them by their 128-bit XXH3 hash so every
//! entry has the same small size. Two distinct ids collide with probability
//! about n²/2¹²⁹ (≈10⁻²⁵ for ten million ids), far below any hardware error
//! rate, so the hash is treated as the id.
//!
//! Dimensions repeat heavily (campaigns, ads, keywords, states, IP ranges,
//! devices), so each distinct value is stored once and the full ad-metrics
//! grain is interned to a `GrainId`.

use std::hash::BuildHasher as _;

use hashbrown::HashTable;

/// A 128-bit id key.
pub type IdKey = u128;

/// Hashes an id string to its key.
pub fn id_key(id: &str) -> IdKey {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Index of an interned ad-metrics grain (campaign, ad, keyword, state, ip_range, device).
pub type GrainId = u32;

/// The dimension values of one grain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grain {
    pub campaign_id: Box<str>,
    pub ad_id: Box<str>,
    pub search_keyword: Box<str>,
    pub state: Box<str>,
    pub ip_range: Box<str>,
    pub device_type: Box<str>,
}

/// Interns strings and grains, counting references so that state which no
/// longer mentions a grain frees it.
///
/// Each string and each grain is stored once: the hash tables hold only
/// indices into `values` and `grain_parts` and hash what those point to
/// (a map keyed by the values would store every one twice).
///
/// Invariants: a grain is live while its reference count is above zero
/// (each join entry and each open window cell holding it owns one
/// reference); a string is live while a live grain uses it. Freed slots are
/// reused, so ids are only stable while referenced. Grain ids never reach an
/// output (rows are ordered by the values, [`Interner::cmp_grains`]), so
/// reuse cannot change results. Without this the interner would grow by
/// every distinct grain ever seen, which with per-/24 IP ranges is nearly
/// one per impression: unbounded memory and checkpoints in a long run.
#[derive(Default)]
pub struct Interner {
    hasher: hashbrown::DefaultHashBuilder,
    strings: HashTable<u32>,
    values: Vec<Box<str>>,
    value_refs: Vec<u32>,
    free_values: Vec<u32>,
    grains: HashTable<GrainId>,
    grain_parts: Vec<[u32; 6]>,
    grain_refs: Vec<u32>,
    free_grains: Vec<GrainId>,
}

/// Serialized form of an [`Interner`]: the slots in id order with their
/// reference counts (free slots have count 0; the hash tables and free
/// lists are rebuilt on load, so ids stay the same).
#[derive(serde::Serialize, serde::Deserialize)]
struct InternerData {
    values: Vec<Box<str>>,
    value_refs: Vec<u32>,
    grain_parts: Vec<[u32; 6]>,
    grain_refs: Vec<u32>,
}

impl serde::Serialize for Interner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("InternerData", 4)?;
        st.serialize_field("values", &self.values)?;
        st.serialize_field("value_refs", &self.value_refs)?;
        st.serialize_field("grain_parts", &self.grain_parts)?;
        st.serialize_field("grain_refs", &self.grain_refs)?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for Interner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let data = InternerData::deserialize(d)?;
        if data.values.len() != data.value_refs.len()
            || data.grain_parts.len() != data.grain_refs.len()
            || data
                .grain_parts
                .iter()
                .flatten()
                .any(|&v| v as usize >= data.values.len())
        {
            return Err(D::Error::custom("inconsistent interner tables"));
        }
        let mut i = Interner {
            values: data.values,
            value_refs: data.value_refs,
            grain_parts: data.grain_parts,
            grain_refs: data.grain_refs,
            ..Interner::default()
        };
        let (values, hasher) = (&i.values, &i.hasher);
        for (id, v) in values.iter().enumerate() {
            if i.value_refs[id] == 0 {
                i.free_values.push(id as u32);
            } else {
                i.strings
                    .insert_unique(hasher.hash_one(&**v), id as u32, |&x| {
                        hasher.hash_one(&*values[x as usize])
                    });
            }
        }
        let all = &i.grain_parts;
        for (g, parts) in all.iter().enumerate() {
            if i.grain_refs[g] == 0 {
                i.free_grains.push(g as GrainId);
            } else {
                i.grains
                    .insert_unique(hasher.hash_one(parts), g as GrainId, |&x| {
                        hasher.hash_one(all[x as usize])
                    });
            }
        }
        // Reuse low ids first, as a fresh interner would have.
        i.free_values.reverse();
        i.free_grains.reverse();
        Ok(i)
    }
}

impl Interner {
    /// The id of `s`, adding it (unreferenced) if new.
    fn intern(&mut self, s: &str) -> u32 {
        let hash = self.hasher.hash_one(s);
        let values = &self.values;
        if let Some(&id) = self.strings.find(hash, |&i| &*values[i as usize] == s) {
            return id;
        }
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
        let (values, hasher) = (&self.values, &self.hasher);
        self.strings
            .insert_unique(hash, id, |&i| hasher.hash_one(&*values[i as usize]));
        id
    }

    /// The grain id of these dimension values, with one reference owned by
    /// the caller (give it back with [`release`](Self::release)).
    pub fn grain(
        &mut self,
        campaign_id: &str,
        ad_id: &str,
        search_keyword: &str,
        state: &str,
        ip_range: &str,
        device_type: &str,
    ) -> GrainId {
        let parts = [
            self.intern(campaign_id),
            self.intern(ad_id),
            self.intern(search_keyword),
            self.intern(state),
            self.intern(ip_range),
            self.intern(device_type),
        ];
        let hash = self.hasher.hash_one(parts);
        let all = &self.grain_parts;
        if let Some(&g) = self.grains.find(hash, |&g| all[g as usize] == parts) {
            self.grain_refs[g as usize] += 1;
            return g;
        }
        for v in parts {
            self.value_refs[v as usize] += 1;
        }
        let g = match self.free_grains.pop() {
            Some(g) => {
                self.grain_parts[g as usize] = parts;
                self.grain_refs[g as usize] = 1;
                g
            }
            None => {
                self.grain_parts.push(parts);
                self.grain_refs.push(1);
                (self.grain_parts.len() - 1) as GrainId
            }
        };
        let (all, hasher) = (&self.grain_parts, &self.hasher);
        self.grains
            .insert_unique(hash, g, |&i| hasher.hash_one(all[i as usize]));
        g
    }

    /// Takes one more reference to a live grain.
    pub fn retain(&mut self, g: GrainId) {
        debug_assert!(self.grain_refs[g as usize] > 0, "retain of a freed grain");
        self.grain_refs[g as usize] += 1;
    }

    /// Gives back one reference; the last one frees the grain, and strings
    /// no other grain uses.
    pub fn release(&mut self, g: GrainId) {
        let refs = &mut self.grain_refs[g as usize];
        debug_assert!(*refs > 0, "release of a freed grain");
        *refs = refs.saturating_sub(1);
        if *refs > 0 {
            return;
        }
        let parts = self.grain_parts[g as usize];
        if let Ok(e) = self
            .grains
            .find_entry(self.hasher.hash_one(parts), |&x| x == g)
        {
            e.remove();
        }
        self.free_grains.push(g);
        for v in parts {
            let refs = &mut self.value_refs[v as usize];
            *refs = refs.saturating_sub(1);
            if *refs > 0 {
                continue;
            }
            let value = std::mem::take(&mut self.values[v as usize]);
            if let Ok(e) = self
                .strings
                .find_entry(self.hasher.hash_one(&*value), |&x| x == v)
            {
                e.remove();
            }
            self.free_values.push(v);
        }
    }

    /// The campaign of a grain, as its interned string id.
    pub fn campaign_of(&self, g: GrainId) -> u32 {
        self.grain_parts[g as usize][0]
    }

    /// The interned string ids of a grain's dimensions, in grain order.
    pub fn parts(&self, g: GrainId) -> &[u32; 6] {
        &self.grain_parts[g as usize]
    }

    /// Orders grains by their dimension values (as [`Grain`]'s `Ord` does),
    /// without building them.
    pub fn cmp_grains(&self, a: GrainId, b: GrainId) -> std::cmp::Ordering {
        let (pa, pb) = (self.parts(a), self.parts(b));
        for (x, y) in pa.iter().zip(pb) {
            if x != y {
                let o = self.values[*x as usize].cmp(&self.values[*y as usize]);
                if o.is_ne() {
                    return o;
                }
            }
        }
        std::cmp::Ordering::Equal
    }

    pub fn string(&self, id: u32) -> &str {
        &self.values[id as usize]
    }

    /// Sorts cells into [`cmp_grains`](Self::cmp_grains) order, the order
    /// of a closed window's rows.
    ///
    /// Comparing grains string by string was a tenth of the engine's time
    /// (a window holds about one grain per impression, nearly all differing
    /// only from the IP range on). Instead each dimension but the IP range
    /// is ranked once over its few distinct values, so most comparisons are
    /// one integer compare; the IP range strings are compared only between
    /// grains equal in the first four dimensions. Interned strings are
    /// unique, so equal ids mean equal values and the order is exactly
    /// `cmp_grains`'s.
    pub fn sort_cells<T: Copy>(&self, cells: &mut [(GrainId, T)]) {
        if cells.len() < 64 {
            cells.sort_unstable_by(|a, b| self.cmp_grains(a.0, b.0));
            return;
        }
        let parts: Vec<[u32; 6]> = cells.iter().map(|(g, _)| *self.parts(*g)).collect();
        let rank = |d: usize| -> Vec<u32> {
            let mut ids: Vec<u32> = parts.iter().map(|p| p[d]).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut by_value: Vec<u32> = (0..ids.len() as u32).collect();
            by_value.sort_unstable_by(|a, b| {
                self.values[ids[*a as usize] as usize].cmp(&self.values[ids[*b as usize] as usize])
            });
            let mut rank_of = vec![0u32; ids.len()];
            for (r, i) in by_value.iter().enumerate() {
                rank_of[*i as usize] = r as u32;
            }
            parts
                .iter()
                .map(|p| match ids.binary_search(&p[d]) {
                    Ok(i) => rank_of[i],
                    Err(_) => unreachable!("every id was collected"),
                })
                .collect()
        };
        let ranks: [Vec<u32>; 5] = [rank(0), rank(1), rank(2), rank(3), rank(5)];
        let mut order: Vec<(u128, u32, u32, u32)> = (0..cells.len())
            .map(|i| {
                let key = (u128::from(ranks[0][i]) << 96)
                    | (u128::from(ranks[1][i]) << 64)
                    | (u128::from(ranks[2][i]) << 32)
                    | u128::from(ranks[3][i]);
                (key, parts[i][4], ranks[4][i], i as u32)
            })
            .collect();
        order.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| {
                    if a.1 == b.1 {
                        std::cmp::Ordering::Equal
                    } else {
                        self.values[a.1 as usize].cmp(&self.values[b.1 as usize])
                    }
                })
                .then(a.2.cmp(&b.2))
        });
        let sorted: Vec<(GrainId, T)> = order.iter().map(|o| cells[o.3 as usize]).collect();
        cells.copy_from_slice(&sorted);
    }

    /// The dimension values of a grain.
    pub fn resolve(&self, g: GrainId) -> Grain {
        let p = self.grain_parts[g as usize];
        let s = |i: usize| -> Box<str> { self.values[p[i] as usize].clone() };
        Grain {
            campaign_id: s(0),
            ad_id: s(1),
            search_keyword: s(2),
            state: s(3),
            ip_range: s(4),
            device_type: s(5),
        }
    }

    /// Number of live grains.
    pub fn grains(&self) -> usize {
        self.grain_parts.len() - self.free_grains.len()
    }

    /// Number of live strings.
    pub fn strings(&self) -> usize {
        self.values.len() - self.free_values.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(i.cmp_grains(a, b), std::cmp::Ordering::Equal);
        assert_eq!(i.cmp_grains(a, c), i.resolve(a).cmp(&i.resolve(c)));
        assert_eq!(i.cmp_grains(c, a), i.resolve(c).cmp(&i.resolve(a)));
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
                // Few values per dimension, so ties reach every dimension.
                let g = i.grain(
                    &format!("c{}", pick(3)),
                    &format!("a{}", pick(4)),
                    ["k", "k2", "", "ü"][pick(4) as usize],
                    &format!("s{}", pick(2)),
                    &format!("10.{}.0.0/24", pick(9)),
                    ["mobile", "ctv", "desktop"][pick(3) as usize],
                );
                if cells.iter().all(|(c, _)| *c != g) {
                    cells.push((g, k));
                }
            }
            let mut want = cells.clone();
            want.sort_by_key(|a| i.resolve(a.0));
            i.sort_cells(&mut cells);
            assert_eq!(cells, want, "{n} cells");
        }
    }

    #[test]
    fn a_restored_interner_keeps_every_id() {
        let mut i = Interner::default();
        let a = i.grain("c", "a", "k", "s", "1.2.3.0/24", "mobile");
        let b = i.grain("d", "a", "k", "s", "1.2.3.0/24", "tablet");
        let bytes = bincode::serialize(&i).expect("serialize");
        let mut j: Interner = bincode::deserialize(&bytes).expect("deserialize");
        assert_eq!(j.resolve(a), i.resolve(a));
        assert_eq!(j.resolve(b), i.resolve(b));
        assert_eq!(j.grain("d", "a", "k", "s", "1.2.3.0/24", "tablet"), b);
        assert_eq!(j.grains(), 2);
    }

    #[test]
    fn the_last_release_frees_a_grain_and_its_unshared_strings() {
        let mut i = Interner::default();
        let a = i.grain("c", "a", "k", "s", "1.2.3.0/24", "mobile");
        let b = i.grain("c", "a", "k", "s", "9.9.9.0/24", "mobile");
        i.retain(a);
        assert_eq!((i.grains(), i.strings()), (2, 7));
        i.release(a);
        assert_eq!(i.grains(), 2);
        i.release(a);
        assert_eq!((i.grains(), i.strings()), (1, 6));
        assert_eq!(&*i.resolve(b).ip_range, "9.9.9.0/24");
        // Freed slots are reused, and lookups still find live grains.
        let c = i.grain("d", "a", "k", "s", "1.2.3.0/24", "mobile");
        assert_eq!(c, a);
        assert_eq!(i.grain("c", "a", "k", "s", "9.9.9.0/24", "mobile"), b);
        assert_eq!(&*i.resolve(c).campaign_id, "d");
        i.release(b);
        i.release(b);
        i.release(c);
        assert_eq!((i.grains(), i.strings()), (0, 0));
    }

    #[test]
    fn a_restored_interner_keeps_free_slots_and_counts() {
        let mut i = Interner::default();
        let a = i.grain("c", "a", "k", "s", "1.2.3.0/24", "mobile");
        let b = i.grain("c", "a", "k", "s", "9.9.9.0/24", "mobile");
        i.release(a);
        let bytes = bincode::serialize(&i).expect("serialize");
        let mut j: Interner = bincode::deserialize(&bytes).expect("deserialize");
        assert_eq!((j.grains(), j.strings()), (1, 6));
        assert_eq!(j.resolve(b), i.resolve(b));
        assert_eq!(j.grain("e", "a", "k", "s", "1.2.3.0/24", "mobile"), a);
        j.release(b);
        assert_eq!(j.grains(), 1);
    }

    #[test]
    fn id_keys_differ() {
        assert_ne!(id_key("imp-1"), id_key("imp-2"));
        assert_eq!(id_key("imp-1"), id_key("imp-1"));
    }
}
