//! Who is watching and how much we send: the two numbers the LBs balance on.
//!
//! A viewer is a distinct token viewer id seen in the last 2·D (DESIGN.md section 8): a player
//! asks for its media playlist about once per segment, so anyone still playing is seen at least
//! once in that window. Egress is measured from the bodies we hand out, over a short sliding
//! window, which is what the uplink actually carries.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Distinct viewer ids with the last time each was seen.
#[derive(Debug)]
pub struct ViewerTracker {
    window: Duration,
    last_seen: HashMap<String, Instant>,
}

impl ViewerTracker {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last_seen: HashMap::new(),
        }
    }

    /// Changes the window (the segment duration may change on reload).
    pub fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// Notes a request from a viewer. Ids come from tokens whose signature was checked, so an
    /// outsider cannot grow this map.
    pub fn seen(&mut self, viewer: &str, now: Instant) {
        match self.last_seen.get_mut(viewer) {
            Some(t) => *t = (*t).max(now),
            None => {
                self.last_seen.insert(viewer.to_owned(), now);
            }
        }
    }

    /// Forgets viewers not seen within the window and returns how many remain.
    pub fn prune(&mut self, now: Instant) -> u64 {
        let window = self.window;
        self.last_seen
            .retain(|_, seen| now.saturating_duration_since(*seen) < window);
        self.last_seen.len() as u64
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
    fn distinct_viewers_within_the_window() {
        let t0 = Instant::now();
        let mut v = ViewerTracker::new(Duration::from_secs(4));
        v.seen("a", t0);
        v.seen("a", t0 + Duration::from_secs(1));
        v.seen("b", t0 + Duration::from_secs(1));
        assert_eq!(v.prune(t0 + Duration::from_secs(2)), 2);
        v.seen("a", t0 + Duration::from_secs(3));
        // b was last seen at 1 s: gone at 5 s; a (3 s) still counts.
        assert_eq!(v.prune(t0 + Duration::from_secs(5)), 1);
        assert_eq!(v.prune(t0 + Duration::from_secs(8)), 0);
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
