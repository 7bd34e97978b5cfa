//! The read-view cache: the encoded answers of recent reads, so that the readers one change
//! wakes share one rendering, bounded by bytes rather than by entries (one answer of a large
//! catalog can be megabytes).

use std::collections::HashMap;

use bytes::Bytes;

/// Default bound on the bytes the cache holds (answers plus keys).
pub(crate) const DEFAULT_BUDGET: usize = 32 * 1024 * 1024;
/// What an entry costs beyond its key and body (the map slot, the entry, the `Bytes`
/// header), so that many tiny answers are bounded too.
const ENTRY_OVERHEAD: usize = 128;

/// A read's encoded answer and index at one version of its topic.
#[derive(Debug, Clone)]
pub(crate) struct CachedView {
    /// The topic's value (`Shared::subscribe`) the answer was computed at.
    pub at: u64,
    pub index: u64,
    pub body: Bytes,
}

struct Entry {
    view: CachedView,
    /// When it was last read or written (a tick of `ViewCache::clock`).
    used: u64,
    size: usize,
}

/// Least-recently-used answers go first once the bytes pass the budget.
pub(crate) struct ViewCache {
    entries: HashMap<String, Entry>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

impl ViewCache {
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            entries: HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    /// The answer cached for `key` at topic version `at`, if there is one.
    pub(crate) fn get(&mut self, key: &str, at: u64) -> Option<CachedView> {
        self.clock += 1;
        let e = self.entries.get_mut(key).filter(|e| e.view.at == at)?;
        e.used = self.clock;
        Some(e.view.clone())
    }

    /// Caches `view` for `key`, replacing what was there; an answer larger than the whole
    /// budget is not kept (and the stale one it replaces goes).
    pub(crate) fn insert(&mut self, key: &str, view: CachedView) {
        self.clock += 1;
        let size = key.len() + view.body.len() + ENTRY_OVERHEAD;
        if let Some(old) = self.entries.remove(key) {
            self.bytes -= old.size;
        }
        if size > self.budget {
            return;
        }
        self.bytes += size;
        self.entries.insert(
            key.to_string(),
            Entry {
                view,
                used: self.clock,
                size,
            },
        );
        if self.bytes > self.budget {
            self.evict();
        }
    }

    /// Drops the least recently used entries down to three quarters of the budget, so that
    /// a cache at its bound does not sort on every insert.
    fn evict(&mut self) {
        let target = self.budget / 4 * 3;
        let mut by_age: Vec<(u64, String)> = self
            .entries
            .iter()
            .map(|(k, e)| (e.used, k.clone()))
            .collect();
        by_age.sort_unstable();
        for (_, key) in by_age {
            if self.bytes <= target {
                break;
            }
            if let Some(e) = self.entries.remove(&key) {
                self.bytes -= e.size;
            }
        }
    }

    /// Bytes held, as counted against the budget.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(at: u64, len: usize) -> CachedView {
        CachedView {
            at,
            index: at,
            body: Bytes::from(vec![b'x'; len]),
        }
    }

    #[test]
    fn hits_only_at_the_same_version() {
        let mut c = ViewCache::new(1 << 20);
        c.insert("a", view(7, 10));
        assert_eq!(c.get("a", 7).map(|v| v.index), Some(7));
        assert!(c.get("a", 8).is_none());
        assert!(c.get("b", 7).is_none());
        c.insert("a", view(8, 10));
        assert_eq!((c.len(), c.bytes()), (1, 1 + 10 + ENTRY_OVERHEAD));
    }

    #[test]
    fn bytes_stay_within_the_budget_and_recent_entries_survive() {
        let budget = 100 * 1024;
        let mut c = ViewCache::new(budget);
        for i in 0..1_000u64 {
            c.insert(&format!("k{i}"), view(i, 4096));
            // Keep reading the first entry: it must outlive the others.
            assert!(c.get("k0", 0).is_some(), "k0 evicted at {i}");
            assert!(c.bytes() <= budget, "{} bytes over {budget}", c.bytes());
        }
        assert!(c.len() < 25, "{} entries", c.len());
        assert!(c.get("k999", 999).is_some(), "the newest entry is kept");
    }

    #[test]
    fn an_answer_larger_than_the_budget_is_not_kept() {
        let mut c = ViewCache::new(1000);
        c.insert("a", view(1, 100));
        c.insert("a", view(2, 5000));
        assert!(c.get("a", 1).is_none() && c.get("a", 2).is_none());
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }
}
