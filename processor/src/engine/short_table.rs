//! The interner's table of short strings ([`Interner`](super::ids::Interner)):
//! ids by [`short_key`], the string itself packed into one integer.
//!
//! Nearly every campaign, ad, state and device id, and most keywords, are
//! at most [`SHORT_MAX`] bytes, and each impression interns five values.
//! Held in a general hash table they cost a seeded string hash, a group
//! probe and a compare through the string's box; here the entry holds the
//! key, so a lookup is two multiplies, one load and one compare.
//!
//! Invariants: linear probing from a home position; the table is at most
//! half full; between an entry's home and the entry there is no empty
//! entry (removal shifts later entries back instead of leaving tombstones,
//! so a lookup stops at the first empty entry).

use std::hash::BuildHasher as _;

use adstream_schemas::records::words::{u32_at, u64_at};

/// Longest string with a [`short_key`].
pub const SHORT_MAX: usize = 15;

/// A string of at most [`SHORT_MAX`] bytes as one integer: its bytes from
/// the lowest on, and its length in the top byte (so no two strings share
/// a key); `None` for longer strings. Read in at most two loads whatever
/// the length.
#[inline]
pub fn short_key(s: &[u8]) -> Option<u128> {
    let n = s.len();
    let w8 = |at: usize| u64_at(s, at);
    let w4 = |at: usize| u64::from(u32_at(s, at));
    // Overlapping loads put each byte at its own place: where two cover
    // the same byte they hold the same value there.
    let (lo, hi) = match n {
        0 => (0, 0),
        1..=3 => {
            let b = |i: usize| u64::from(s[i]) << (8 * i);
            (b(0) | b(n / 2) | b(n - 1), 0)
        }
        4..=7 => (w4(0) | w4(n - 4) << (8 * (n - 4)), 0),
        8 => (w8(0), 0),
        9..=SHORT_MAX => (w8(0), w8(n - 8) >> (8 * (16 - n))),
        _ => return None,
    };
    Some(u128::from(lo) | u128::from(hi) << 64 | (n as u128) << 120)
}

/// Id of an empty entry.
const EMPTY: u32 = u32::MAX;

const MIN_BITS: u32 = 6;

/// Ids of short strings by their keys.
#[derive(Debug)]
pub struct ShortTable {
    entries: Box<[(u128, u32)]>,
    /// `64 - log2(entries.len())`: the home position is the top bits of
    /// the hash.
    shift: u32,
    len: usize,
    /// Random per table, so that no fixed set of strings upstream can be
    /// made to share home positions.
    seed: u64,
}

impl Default for ShortTable {
    fn default() -> Self {
        ShortTable {
            entries: vec![(0, EMPTY); 1 << MIN_BITS].into_boxed_slice(),
            shift: 64 - MIN_BITS,
            len: 0,
            seed: std::collections::hash_map::RandomState::new().hash_one(0u64),
        }
    }
}

impl ShortTable {
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    #[inline]
    fn home(&self, key: u128) -> usize {
        // The high bits of a product depend on every bit below them: the
        // first multiply spreads the low word, the second everything.
        let h = ((key as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (key >> 64) as u64)
            .wrapping_add(self.seed)
            .wrapping_mul(0xD6E8_FEB8_6659_FD93);
        (h >> self.shift) as usize
    }

    /// The id of `key`.
    #[inline]
    pub fn find(&self, key: u128) -> Option<u32> {
        self.position(key).map(|p| self.entries[p].1)
    }

    /// Where `key`'s entry is.
    #[inline]
    fn position(&self, key: u128) -> Option<usize> {
        let mask = self.mask();
        let mut p = self.home(key);
        loop {
            let (k, id) = self.entries[p];
            if id == EMPTY {
                return None;
            }
            if k == key {
                return Some(p);
            }
            p = (p + 1) & mask;
        }
    }

    /// Adds `key` (the caller knows it is absent) with `id`.
    pub fn insert(&mut self, key: u128, id: u32) {
        debug_assert!(id != EMPTY && self.find(key).is_none());
        if (self.len + 1) * 2 > self.entries.len() {
            let size = self.entries.len() * 2;
            let old =
                std::mem::replace(&mut self.entries, vec![(0, EMPTY); size].into_boxed_slice());
            self.shift = 64 - size.trailing_zeros();
            for &(k, id) in old.iter().filter(|e| e.1 != EMPTY) {
                self.place(k, id);
            }
        }
        self.place(key, id);
        self.len += 1;
    }

    fn place(&mut self, key: u128, id: u32) {
        let mask = self.mask();
        let mut p = self.home(key);
        while self.entries[p].1 != EMPTY {
            p = (p + 1) & mask;
        }
        self.entries[p] = (key, id);
    }

    /// Removes `key`; false if it was absent.
    pub fn remove(&mut self, key: u128) -> bool {
        let Some(mut hole) = self.position(key) else {
            return false;
        };
        let mask = self.mask();
        // Later entries of the run move back into the hole when it lies
        // between their home and them, keeping the invariant.
        let mut q = (hole + 1) & mask;
        while self.entries[q].1 != EMPTY {
            let home = self.home(self.entries[q].0);
            if q.wrapping_sub(home) & mask >= q.wrapping_sub(hole) & mask {
                self.entries[hole] = self.entries[q];
                hole = q;
            }
            q = (q + 1) & mask;
        }
        self.entries[hole] = (0, EMPTY);
        self.len -= 1;
        true
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_short_key_is_the_strings_bytes_and_its_length() {
        for n in 0..40usize {
            let s: Vec<u8> = (0..n as u8).map(|x| x.wrapping_mul(37) | 1).collect();
            let Some(key) = short_key(&s) else {
                assert!(n > SHORT_MAX, "{n} bytes have a key");
                continue;
            };
            assert!(n <= SHORT_MAX, "{n} bytes have none");
            // The key holds the bytes in order, zeros after them, and the
            // length in the top byte: so keys are equal only for equal strings.
            let mut want = [0u8; 16];
            want[..n].copy_from_slice(&s);
            want[15] = n as u8;
            assert_eq!(key.to_le_bytes(), want, "{n} bytes");
        }
    }

    /// Random inserts and removes, checked against a `HashMap` after each.
    /// Few distinct keys in a growing table make long runs whose removals
    /// must shift entries back across the table's end.
    #[test]
    fn agrees_with_a_map_through_inserts_and_removes() {
        let mut t = ShortTable::default();
        let mut model: HashMap<u128, u32> = HashMap::new();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut removed = 0;
        for step in 0..200_000u32 {
            let before = t.len();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // The key and the operation come from different bits of `x`.
            let key = short_key(format!("k{}", (x >> 32) % 300).as_bytes()).expect("short");
            if x.is_multiple_of(3) {
                assert_eq!(t.remove(key), model.remove(&key).is_some(), "step {step}");
            } else if let Some(&id) = model.get(&key) {
                assert_eq!(t.find(key), Some(id), "step {step}");
            } else {
                t.insert(key, step);
                model.insert(key, step);
            }
            assert_eq!(t.len(), model.len());
            removed += u32::from(x.is_multiple_of(3) && t.len() < before);
        }
        assert!(removed > 10_000, "{removed} removals");
        for (k, id) in &model {
            assert_eq!(t.find(*k), Some(*id));
        }
        for k in (0..300).filter_map(|i| short_key(format!("k{i}").as_bytes())) {
            assert_eq!(t.find(k), model.get(&k).copied());
        }
    }
}
