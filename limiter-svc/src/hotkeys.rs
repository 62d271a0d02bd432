//! Hot keys: a counter Redis just denied until T is denied here until T, without a round trip.
//!
//! Safe by construction: a local denial only ever admits less. An entry remembers the cost it
//! was denied at, and applies only to requests of at least that cost (a cheaper request may fit
//! sooner). Entries expire at T; the cache holds a bounded number of them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Known over-limit counters.
#[derive(Debug)]
pub struct HotKeys {
    entries: Mutex<HashMap<String, (Instant, u64)>>,
    capacity: usize,
    /// Denials shorter than this are not worth remembering.
    min_ttl: Duration,
}

impl HotKeys {
    /// A cache of at most `capacity` counters.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
            min_ttl: Duration::from_millis(5),
        }
    }

    /// How long `key` is known to deny a request of `cost`, if it is.
    pub fn denied_for(&self, key: &str, cost: u64) -> Option<Duration> {
        let entries = self.entries.lock().ok()?;
        let (until, denied_cost) = entries.get(key)?;
        let now = Instant::now();
        (*until > now && cost >= *denied_cost).then(|| *until - now)
    }

    /// Remembers that `key` denies `cost` for `retry_after`.
    pub fn remember(&self, key: &str, cost: u64, retry_after: Duration) {
        if retry_after < self.min_ttl {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let now = Instant::now();
        if entries.len() >= self.capacity {
            entries.retain(|_, (until, _)| *until > now);
            if entries.len() >= self.capacity {
                return;
            }
        }
        let until = now + retry_after;
        entries
            .entry(key.to_owned())
            .and_modify(|e| *e = (until, cost.min(e.1)))
            .or_insert((until, cost));
    }

    /// Forgets `key` (after ResetLimit).
    pub fn forget(&self, key: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn denies_until_t_and_only_costs_at_least_the_denied_one() {
        let hot = HotKeys::new(10);
        hot.remember("k", 3, Duration::from_secs(2));
        assert_eq!(hot.denied_for("k", 3), Some(Duration::from_secs(2)));
        assert_eq!(hot.denied_for("k", 1), None, "a cheaper request may fit");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(hot.denied_for("k", 3), None, "expired at T");
    }

    #[tokio::test(start_paused = true)]
    async fn bounded() {
        let hot = HotKeys::new(2);
        for key in ["a", "b", "c"] {
            hot.remember(key, 1, Duration::from_secs(1));
        }
        assert!(hot.denied_for("c", 1).is_none(), "full: not remembered");
        tokio::time::advance(Duration::from_secs(1)).await;
        hot.remember("c", 1, Duration::from_secs(1));
        assert!(hot.denied_for("c", 1).is_some(), "room after expiry");
    }
}
