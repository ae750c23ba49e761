//! Who is watching and how much we send: the numbers the LBs balance on.
//!
//! A viewer is a distinct token viewer id that downloaded a whole segment in the last 2·D: a
//! player fetches about one segment per D, so anyone still playing did so within that window.
//! Tokens are handed out to anyone, so holding one, or asking for playlists with it, proves
//! nothing; a whole segment costs the client its own download bandwidth. Ids enter the map only
//! on such a download, and the map has a cap, so a flood of fresh ids cannot grow it without
//! bound. Egress is measured from the bodies we hand out, over a short sliding window, which is
//! what the uplink actually carries.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A full map is pruned at most this often on the insert path, so a flood of fresh ids does not
/// turn every segment request into a scan of the whole map.
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Distinct viewer ids with the last time each finished downloading a segment.
#[derive(Debug)]
pub struct ViewerTracker {
    window: Duration,
    cap: usize,
    last_fetch: HashMap<String, Instant>,
    last_prune: Option<Instant>,
}

impl ViewerTracker {
    /// Tracks at most `cap` distinct ids at once.
    pub fn new(window: Duration, cap: usize) -> Self {
        Self {
            window,
            cap,
            last_fetch: HashMap::new(),
            last_prune: None,
        }
    }

    /// Changes the window and the cap (the segment duration, uplink and ladder may change on
    /// reload).
    pub fn set_limits(&mut self, window: Duration, cap: usize) {
        self.window = window;
        self.cap = cap;
    }

    /// Notes that `viewer` finished downloading a whole segment. Returns false when the id was
    /// not tracked because the map is full of viewers still within the window (its bytes still
    /// count as egress, which bounds capacity on its own).
    pub fn fetched_segment(&mut self, viewer: &str, now: Instant) -> bool {
        if let Some(t) = self.last_fetch.get_mut(viewer) {
            *t = (*t).max(now);
            return true;
        }
        if self.last_fetch.len() >= self.cap {
            let due = self
                .last_prune
                .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
            if due {
                self.prune(now);
            }
            if self.last_fetch.len() >= self.cap {
                return false;
            }
        }
        self.last_fetch.insert(viewer.to_owned(), now);
        true
    }

    /// Forgets viewers without a download within the window and returns how many remain.
    pub fn prune(&mut self, now: Instant) -> u64 {
        let window = self.window;
        self.last_fetch
            .retain(|_, fetched| now.saturating_duration_since(*fetched) < window);
        self.last_prune = Some(now);
        self.last_fetch.len() as u64
    }

    /// Ids currently held, stale ones included (the memory bound).
    pub fn tracked(&self) -> usize {
        self.last_fetch.len()
    }
}

/// Seconds of history the egress rate is averaged over.
pub const EGRESS_WINDOW_SECS: u64 = 5;

/// Bytes sent per whole second since `start`, for the last few seconds.
#[derive(Debug)]
pub struct EgressMeter {
    start: Instant,
    /// (second index, bytes) of the most recent seconds, oldest first.
    buckets: std::collections::VecDeque<(u64, u64)>,
}

impl EgressMeter {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            buckets: std::collections::VecDeque::new(),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    pub fn add(&mut self, bytes: u64, now: Instant) {
        let second = self.second(now);
        match self.buckets.back_mut() {
            Some((s, b)) if *s == second => *b += bytes,
            _ => self.buckets.push_back((second, bytes)),
        }
        while self
            .buckets
            .front()
            .is_some_and(|(s, _)| *s + EGRESS_WINDOW_SECS < second)
        {
            self.buckets.pop_front();
        }
    }

    /// Mbit/s over the last [`EGRESS_WINDOW_SECS`] complete seconds (the current, partial second
    /// is left out so the rate does not dip at every second boundary).
    pub fn mbps(&self, now: Instant) -> f64 {
        let current = self.second(now);
        let from = current.saturating_sub(EGRESS_WINDOW_SECS);
        let bytes: u64 = self
            .buckets
            .iter()
            .filter(|(s, _)| *s >= from && *s < current)
            .map(|(_, b)| *b)
            .sum();
        // Early in the process life fewer whole seconds exist.
        let seconds = (current - from).max(1) as f64;
        bytes as f64 * 8.0 / 1e6 / seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_segment_fetchers_within_the_window() {
        let t0 = Instant::now();
        let mut v = ViewerTracker::new(Duration::from_secs(4), 100);
        assert!(v.fetched_segment("a", t0));
        v.fetched_segment("a", t0 + Duration::from_secs(1));
        v.fetched_segment("b", t0 + Duration::from_secs(1));
        assert_eq!(v.prune(t0 + Duration::from_secs(2)), 2);
        v.fetched_segment("a", t0 + Duration::from_secs(3));
        // b last fetched at 1 s: gone at 5 s; a (3 s) still counts.
        assert_eq!(v.prune(t0 + Duration::from_secs(5)), 1);
        assert_eq!(v.prune(t0 + Duration::from_secs(8)), 0);
    }

    #[test]
    fn a_flood_of_distinct_ids_stays_within_the_cap() {
        let t0 = Instant::now();
        let cap = 1000;
        let mut v = ViewerTracker::new(Duration::from_secs(4), cap);
        // 100,000 distinct ids, each downloading a segment within the same second.
        let tracked = (0..100_000)
            .filter(|i| v.fetched_segment(&format!("fake-{i}"), t0 + Duration::from_micros(*i)))
            .count();
        assert_eq!(tracked, cap);
        assert_eq!(v.tracked(), cap);
        // Ids already tracked keep being refreshed while the map is full.
        assert!(v.fetched_segment("fake-0", t0 + Duration::from_secs(2)));
        // Once the window has passed, room is made for new viewers (pruned on insert).
        let later = t0 + Duration::from_secs(5);
        assert!(v.fetched_segment("real", later));
        assert_eq!(v.prune(later), 2, "fake-0 (2 s) and real remain");
    }

    #[test]
    fn egress_is_averaged_over_whole_seconds() {
        let t0 = Instant::now();
        let mut m = EgressMeter::new(t0);
        for s in 0..10 {
            // 1.25 MB per second = 10 Mbit/s
            m.add(1_250_000, t0 + Duration::from_millis(s * 1000 + 100));
        }
        let rate = m.mbps(t0 + Duration::from_millis(10_500));
        assert!((rate - 10.0).abs() < 1e-9, "{rate}");
        // Nothing sent for a while: the rate falls to zero.
        assert_eq!(m.mbps(t0 + Duration::from_secs(30)), 0.0);
    }
}
