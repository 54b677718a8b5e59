//! Bounded per-key statistics: at most `capacity` keys are tracked, the
//! rest is summed under "other" by the caller (total minus tracked).
//!
//! Membership is sticky so that exported counters stay monotonic: a key
//! admitted starts from zero (what it did before stays in "other"), and a key
//! leaves only after a whole epoch without traffic (its counts then move to
//! "other", which only grows). While the table is full, newcomers are ranked
//! with a bounded Space-Saving sketch and the heaviest fill the slots freed at
//! the next epoch.

use std::hash::Hash;

// Hashed per event: foldhash, not std's DoS-resistant SipHash (the keys
// are our own endpoints, not attacker-chosen strings).
use foldhash::{HashMap, HashMapExt};

/// Candidates kept per tracked slot while the table is full.
const CANDIDATES_PER_SLOT: usize = 4;

struct Slot<V> {
    value: V,
    /// Traffic this epoch; 0 at the epoch's end means idle.
    epoch_weight: u64,
}

pub struct TopK<K, V> {
    capacity: usize,
    tracked: HashMap<K, Slot<V>>,
    /// Traffic this epoch of keys waiting for a slot (over-estimates, as
    /// Space-Saving does).
    candidates: HashMap<K, u64>,
    /// Keys that left the table, ever.
    pub retired: u64,
}

impl<K: Hash + Eq + Clone, V: Default> TopK<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, tracked: HashMap::new(), candidates: HashMap::new(), retired: 0 }
    }

    /// The statistics of `key`, admitting it when there is room; `None`
    /// when it must be counted under "other".
    pub fn get_or_admit(&mut self, key: &K, weight: u64) -> Option<&mut V> {
        if !self.tracked.contains_key(key) {
            if self.tracked.len() >= self.capacity {
                self.note_candidate(key, weight);
                return None;
            }
            self.tracked.insert(key.clone(), Slot { value: V::default(), epoch_weight: 0 });
        }
        let slot = self.tracked.get_mut(key)?;
        slot.epoch_weight += weight;
        Some(&mut slot.value)
    }

    /// The statistics of `key` if tracked, without admitting it.
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.tracked.get_mut(key).map(|slot| &mut slot.value)
    }

    fn note_candidate(&mut self, key: &K, weight: u64) {
        if let Some(count) = self.candidates.get_mut(key) {
            *count += weight;
            return;
        }
        let limit = self.capacity.max(1) * CANDIDATES_PER_SLOT;
        let mut inherited = 0;
        if self.candidates.len() >= limit {
            // Space-Saving: the newcomer replaces the lightest candidate and
            // inherits its count, so a heavy key cannot be starved.
            if let Some(lightest) = self.candidates.iter().min_by_key(|(_, count)| **count).map(|(k, _)| k.clone()) {
                inherited = self.candidates.remove(&lightest).unwrap_or(0);
            }
        }
        self.candidates.insert(key.clone(), inherited + weight);
    }

    /// Ends an epoch: idle keys leave (returned, so the caller can fold them
    /// into "other"), the heaviest candidates take the free slots.
    pub fn end_epoch(&mut self) -> Vec<(K, V)> {
        let idle: Vec<K> = self.tracked.iter().filter(|(_, slot)| slot.epoch_weight == 0).map(|(k, _)| k.clone()).collect();
        let mut left = Vec::with_capacity(idle.len());
        for key in idle {
            if let Some(slot) = self.tracked.remove(&key) {
                left.push((key, slot.value));
            }
        }
        self.retired += left.len() as u64;
        let mut waiting: Vec<(K, u64)> = self.candidates.drain().collect();
        waiting.sort_by(|a, b| b.1.cmp(&a.1));
        for (key, _) in waiting.into_iter().take(self.capacity.saturating_sub(self.tracked.len())) {
            self.tracked.insert(key, Slot { value: V::default(), epoch_weight: 0 });
        }
        for slot in self.tracked.values_mut() {
            slot.epoch_weight = 0;
        }
        left
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.tracked.iter().map(|(key, slot)| (key, &slot.value))
    }

    pub fn len(&self) -> usize {
        self.tracked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_tracks_more_than_capacity() {
        let mut table: TopK<u32, u64> = TopK::new(50);
        for key in 0..5_000 {
            if let Some(count) = table.get_or_admit(&key, 1) {
                *count += 1;
            }
        }
        assert_eq!(table.len(), 50);
        let tracked: u64 = table.iter().map(|(_, count)| count).sum();
        assert_eq!(tracked, 50, "the first 50 keys got slots, the rest goes to other");
    }

    #[test]
    fn idle_keys_leave_and_heavy_candidates_take_their_place() {
        let mut table: TopK<u32, u64> = TopK::new(2);
        table.get_or_admit(&1, 1);
        table.get_or_admit(&2, 1);
        table.end_epoch();
        // Epoch 2: key 1 stays busy, key 2 goes quiet, 9 is heavy, 8 light.
        table.get_or_admit(&1, 1);
        for _ in 0..10 {
            assert!(table.get_or_admit(&9, 1).is_none());
        }
        table.get_or_admit(&8, 1);
        let left = table.end_epoch();
        assert_eq!(left.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![2]);
        let mut keys: Vec<u32> = table.iter().map(|(k, _)| *k).collect();
        keys.sort();
        assert_eq!(keys, vec![1, 9]);
        assert_eq!(table.retired, 1);
    }

    #[test]
    fn candidate_sketch_stays_bounded() {
        let mut table: TopK<u32, u64> = TopK::new(1);
        table.get_or_admit(&0, 1);
        for key in 1..10_000 {
            table.get_or_admit(&key, 1);
        }
        assert!(table.candidates.len() <= CANDIDATES_PER_SLOT);
    }
}
