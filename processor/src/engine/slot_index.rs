//! An open-addressing index from ids to slot numbers, for the join's held
//! records (`HeldById` in [`join`](super::join)).
//!
//! Each entry is 8 bytes, `(slot + 1) << 32 | low`, where `low` is the id's
//! low 32 bits (ids are already hashes) and 0 marks an empty entry. Entries
//! are probed linearly from a home position computed from `low` alone, so:
//! - a lookup for an absent id and the insert after it touch the same cache
//!   line (a table of control bytes beside the entries took two misses);
//! - the line a lookup will read can be prefetched from the id before the
//!   record is processed ([`SlotIndex::prefetch`]).
//!
//! Invariants: the table is at most three quarters full; between an entry's
//! home position and the entry there is no empty position. There are no
//! tombstones: [`SlotIndex::retain`] moves survivors back as it removes, so a
//! lookup for an absent id stops at the first empty entry.

/// Index from an id's low 32 bits to the slots holding records with them.
#[derive(Debug)]
pub struct SlotIndex {
    entries: Box<[u64]>,
    /// `64 - log2(entries.len())`: the home position is the top bits of
    /// the hash.
    shift: u32,
    len: usize,
}

const MIN_BITS: u32 = 4;

impl Default for SlotIndex {
    fn default() -> Self {
        SlotIndex {
            entries: vec![0; 1 << MIN_BITS].into_boxed_slice(),
            shift: 64 - MIN_BITS,
            len: 0,
        }
    }
}

fn slot_of(e: u64) -> u32 {
    ((e >> 32) as u32).wrapping_sub(1)
}

impl SlotIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    fn home(&self, low: u32) -> usize {
        // Multiplying spreads the low bits into the high ones taken here.
        (u64::from(low).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// The slot of the entry with `low` for which `is(slot)` holds.
    #[inline]
    pub fn find(&self, low: u32, mut is: impl FnMut(u32) -> bool) -> Option<u32> {
        let mask = self.mask();
        let mut p = self.home(low);
        loop {
            let e = self.entries[p];
            if e == 0 {
                return None;
            }
            if e as u32 == low && is(slot_of(e)) {
                return Some(slot_of(e));
            }
            p = (p + 1) & mask;
        }
    }

    /// Adds an entry for `slot` (the caller knows its id is not indexed).
    #[inline]
    pub fn insert(&mut self, low: u32, slot: u32) {
        debug_assert!(slot < u32::MAX);
        if (self.len + 1) * 4 > self.entries.len() * 3 {
            self.resize(self.entries.len() * 2);
        }
        self.place((u64::from(slot + 1) << 32) | u64::from(low));
        self.len += 1;
    }

    fn place(&mut self, e: u64) {
        let mask = self.mask();
        let mut p = self.home(e as u32);
        while self.entries[p] != 0 {
            p = (p + 1) & mask;
        }
        self.entries[p] = e;
    }

    /// Makes room for `n` entries in all.
    pub fn reserve(&mut self, n: usize) {
        let mut size = self.entries.len();
        while n * 4 > size * 3 {
            size *= 2;
        }
        if size > self.entries.len() {
            self.resize(size);
        }
    }

    fn resize(&mut self, size: usize) {
        let old = std::mem::replace(&mut self.entries, vec![0; size].into_boxed_slice());
        self.shift = 64 - size.trailing_zeros();
        for &e in old.iter().filter(|&&e| e != 0) {
            self.place(e);
        }
    }

    /// Removes the entries of slots for which `keep` is false, in one pass
    /// in table order. A survivor moves back to the first empty position
    /// from its home, so no lookup has to step over a hole.
    pub fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        let mask = self.mask();
        // Starting just after an empty position, every run of entries is
        // seen from its first position on (the table is never full).
        let Some(start) = self.entries.iter().position(|&e| e == 0) else {
            return;
        };
        for k in 1..self.entries.len() {
            let j = (start + k) & mask;
            let e = self.entries[j];
            if e == 0 {
                continue;
            }
            if !keep(slot_of(e)) {
                self.entries[j] = 0;
                self.len -= 1;
                continue;
            }
            // Positions from the home to here were all occupied and all
            // before it in this pass: move into the first that is now free.
            let mut p = self.home(e as u32);
            while p != j && self.entries[p] != 0 {
                p = (p + 1) & mask;
            }
            if p != j {
                self.entries[p] = e;
                self.entries[j] = 0;
            }
        }
    }

    /// Asks for the cache line a lookup of `low` starts at, without waiting.
    #[inline]
    pub fn prefetch(&self, low: u32) {
        prefetch(&self.entries[self.home(low)]);
    }
}

/// Asks the CPU to bring `value`'s cache lines in without waiting for them.
#[inline]
pub fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = (value as *const T).cast::<i8>();
        let last = start.wrapping_add(std::mem::size_of::<T>().saturating_sub(1));
        // SAFETY: a prefetch reads nothing architecturally and cannot fault,
        // whatever the address; SSE is part of the x86_64 baseline.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(start);
            _mm_prefetch::<_MM_HINT_T0>(last);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Every slot indexed under `low` is found, and nothing else.
    fn check(index: &SlotIndex, model: &HashMap<u32, u32>) {
        assert_eq!(index.len(), model.len());
        for (&slot, &low) in model {
            assert_eq!(index.find(low, |s| s == slot), Some(slot));
        }
        assert_eq!(index.find(7, |s| !model.contains_key(&s)), None);
    }

    #[test]
    fn grows_and_keeps_colliding_ids_apart() {
        let mut index = SlotIndex::default();
        let mut model = HashMap::new();
        for slot in 0..10_000u32 {
            // Few distinct low bits: long runs, and equal lows told apart
            // only by the slot check.
            let low = slot % 37;
            index.insert(low, slot);
            model.insert(slot, low);
        }
        check(&index, &model);
        assert!(index.entries.len() * 3 >= index.len() * 4);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// Inserts and batch removals in any order agree with a map, also
        /// when runs wrap around the end of the table.
        #[test]
        fn agrees_with_a_map(
            rounds in proptest::collection::vec(
                (proptest::collection::vec(proptest::prelude::any::<u32>(), 0..200), 0u32..4),
                1..12,
            ),
            narrow: bool,
        ) {
            let mut index = SlotIndex::default();
            let mut model: HashMap<u32, u32> = HashMap::new();
            let mut next = 0u32;
            for (lows, drop_mod) in rounds {
                for low in lows {
                    let low = if narrow { low % 5 } else { low };
                    index.insert(low, next);
                    model.insert(next, low);
                    next += 1;
                }
                index.retain(|s| s % 4 != drop_mod);
                model.retain(|&s, _| s % 4 != drop_mod);
                check(&index, &model);
            }
        }
    }
}
