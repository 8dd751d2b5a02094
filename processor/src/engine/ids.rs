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

/// Interns strings and grains; ids are stable for the engine's life.
///
/// Each string and each grain is stored once: the hash tables hold only
/// indices into `values` and `grain_parts` and hash what those point to
/// (a map keyed by the values would store every one twice).
#[derive(Default)]
pub struct Interner {
    hasher: hashbrown::DefaultHashBuilder,
    strings: HashTable<u32>,
    values: Vec<Box<str>>,
    grains: HashTable<GrainId>,
    grain_parts: Vec<[u32; 6]>,
}

/// Serialized form of an [`Interner`]: the values and grains in id order
/// (the hash tables are rebuilt on load, so ids stay the same).
#[derive(serde::Serialize, serde::Deserialize)]
struct InternerData {
    values: Vec<Box<str>>,
    grain_parts: Vec<[u32; 6]>,
}

impl serde::Serialize for Interner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("InternerData", 2)?;
        st.serialize_field("values", &self.values)?;
        st.serialize_field("grain_parts", &self.grain_parts)?;
        st.end()
    }
}

impl<'de> serde::Deserialize<'de> for Interner {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let data = InternerData::deserialize(d)?;
        let mut i = Interner::default();
        for v in data.values {
            i.intern(&v);
        }
        for parts in data.grain_parts {
            i.grain_of_parts(parts);
        }
        Ok(i)
    }
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        let hash = self.hasher.hash_one(s);
        let values = &self.values;
        if let Some(&id) = self.strings.find(hash, |&i| &*values[i as usize] == s) {
            return id;
        }
        let id = self.values.len() as u32;
        self.values.push(s.into());
        let (values, hasher) = (&self.values, &self.hasher);
        self.strings
            .insert_unique(hash, id, |&i| hasher.hash_one(&*values[i as usize]));
        id
    }

    /// The grain id of these dimension values.
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
        self.grain_of_parts(parts)
    }

    fn grain_of_parts(&mut self, parts: [u32; 6]) -> GrainId {
        let hash = self.hasher.hash_one(parts);
        let all = &self.grain_parts;
        if let Some(&g) = self.grains.find(hash, |&g| all[g as usize] == parts) {
            return g;
        }
        let g = self.grain_parts.len() as GrainId;
        self.grain_parts.push(parts);
        let (all, hasher) = (&self.grain_parts, &self.hasher);
        self.grains
            .insert_unique(hash, g, |&i| hasher.hash_one(all[i as usize]));
        g
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

    /// Number of distinct grains seen.
    pub fn grains(&self) -> usize {
        self.grain_parts.len()
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
    fn id_keys_differ() {
        assert_ne!(id_key("imp-1"), id_key("imp-2"));
        assert_eq!(id_key("imp-1"), id_key("imp-1"));
    }
}
