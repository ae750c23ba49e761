//! Who is watching and how much we send: the numbers the LBs balance on.
//!
//! A viewer is a distinct token viewer id that downloaded a whole segment in the last 2·D: a
//! player fetches about one segment per D, so anyone still playing did so within that window.
//! Tokens are handed out to anyone, so holding one, or asking for playlists with it, proves
//! nothing; a whole segment costs the client its own download bandwidth. Ids enter the map only
//! on such a download, and the map has a cap, so a flood of fresh ids cannot grow it without
//! bound. Egress is measured from the bodies we hand out, over a short sliding window, which is
//! what the uplink actually carries.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// A full map is pruned at most this often on the insert path, so a flood of fresh ids does not
/// turn every segment request into a scan of the whole map.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// A viewer's player reports (see `crate::player`) count at most this often: one holding a
/// token cannot flood the players' figures.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// One viewer: its last whole segment, and its player's last report that counted.
#[derive(Debug, Clone, Copy)]
struct Seen {
    fetched: Instant,
    reported: Option<Instant>,
}

/// Distinct viewer ids per channel with the last time each finished downloading a segment.
#[derive(Debug)]
pub struct ViewerTracker {
    window: Duration,
    cap: usize,
    /// channel → viewer id → last whole segment. Per channel because a viewer commits its own
    /// channel's top rendition to the uplink, and one id may watch two channels at once.
    last_fetch: HashMap<String, HashMap<String, Seen>>,
    /// Ids held over all channels, stale ones included.
    tracked: usize,
    last_prune: Option<Instant>,
}

impl ViewerTracker {
    /// Tracks at most `cap` distinct ids at once.
    pub fn new(window: Duration, cap: usize) -> Self {
        Self {
            window,
            cap,
            last_fetch: HashMap::new(),
            tracked: 0,
            last_prune: None,
        }
    }

    /// Changes the window and the cap (the segment duration, uplink and ladder may change on
    /// reload).
    pub fn set_limits(&mut self, window: Duration, cap: usize) {
        self.window = window;
        self.cap = cap;
    }

    /// Notes that `viewer` finished downloading a whole segment of `channel`. Returns false
    /// when the id was not tracked because the map is full of viewers still within the window
    /// (its bytes still count as egress, which bounds capacity on its own).
    pub fn fetched_segment(&mut self, channel: &str, viewer: &str, now: Instant) -> bool {
        if let Some(t) = self
            .last_fetch
            .get_mut(channel)
            .and_then(|viewers| viewers.get_mut(viewer))
        {
            t.fetched = t.fetched.max(now);
            return true;
        }
        if self.tracked >= self.cap {
            let due = self
                .last_prune
                .is_none_or(|t| now.saturating_duration_since(t) >= PRUNE_EVERY);
            if due {
                self.prune(now);
            }
            if self.tracked >= self.cap {
                return false;
            }
        }
        let viewers = match self.last_fetch.get_mut(channel) {
            Some(viewers) => viewers,
            None => self.last_fetch.entry(channel.to_owned()).or_default(),
        };
        let seen = Seen {
            fetched: now,
            reported: None,
        };
        viewers.insert(viewer.to_owned(), seen);
        self.tracked += 1;
        true
    }

    /// Whether a report of `viewer`'s player counts now: it must be a viewer (a whole segment
    /// within the window) whose last counted report is at least [`REPORT_EVERY`] old. A report
    /// that counts is noted.
    pub fn report_counts(&mut self, channel: &str, viewer: &str, now: Instant) -> bool {
        let window = self.window;
        let Some(seen) = self
            .last_fetch
            .get_mut(channel)
            .and_then(|viewers| viewers.get_mut(viewer))
            .filter(|seen| now.saturating_duration_since(seen.fetched) < window)
        else {
            return false;
        };
        if seen
            .reported
            .is_some_and(|t| now.saturating_duration_since(t) < REPORT_EVERY)
        {
            return false;
        }
        seen.reported = Some(now);
        true
    }

    /// Forgets viewers without a download within the window and returns how many remain on
    /// each channel (channels without any are left out).
    pub fn prune(&mut self, now: Instant) -> BTreeMap<String, u64> {
        let window = self.window;
        for viewers in self.last_fetch.values_mut() {
            viewers.retain(|_, seen| now.saturating_duration_since(seen.fetched) < window);
        }
        self.last_fetch.retain(|_, viewers| !viewers.is_empty());
        self.last_prune = Some(now);
        self.tracked = self.last_fetch.values().map(HashMap::len).sum();
        self.last_fetch
            .iter()
            .map(|(channel, viewers)| (channel.clone(), viewers.len() as u64))
            .collect()
    }

    /// Ids currently held, stale ones included (the memory bound).
    pub fn tracked(&self) -> usize {
        self.tracked
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
        let counts = |v: &mut ViewerTracker, s| {
            let counts = v.prune(t0 + Duration::from_secs(s));
            (counts.get("main").copied(), counts.get("side").copied())
        };
        assert!(v.fetched_segment("main", "a", t0));
        v.fetched_segment("main", "a", t0 + Duration::from_secs(1));
        v.fetched_segment("main", "b", t0 + Duration::from_secs(1));
        // The same id on another channel is another viewer of that channel.
        v.fetched_segment("side", "a", t0 + Duration::from_secs(1));
        assert_eq!(counts(&mut v, 2), (Some(2), Some(1)));
        v.fetched_segment("main", "a", t0 + Duration::from_secs(3));
        // b and side's a last fetched at 1 s: gone at 5 s; main's a (3 s) still counts.
        assert_eq!(counts(&mut v, 5), (Some(1), None));
        assert_eq!(counts(&mut v, 8), (None, None));
        assert_eq!(v.tracked(), 0);
    }

    #[test]
    fn player_reports_count_for_viewers_at_most_every_few_seconds() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut v = ViewerTracker::new(Duration::from_secs(8), 100);
        // No segment yet: a token alone reports nothing.
        assert!(!v.report_counts("main", "a", t0));
        v.fetched_segment("main", "a", t0);
        assert!(
            !v.report_counts("side", "a", at(1)),
            "a viewer of another channel"
        );
        assert!(v.report_counts("main", "a", at(1)));
        assert!(
            !v.report_counts("main", "a", at(3)),
            "too soon after the last one"
        );
        v.fetched_segment("main", "a", at(4));
        assert!(v.report_counts("main", "a", at(6)));
        // Gone quiet for a whole window: no longer a viewer.
        assert!(!v.report_counts("main", "a", at(13)));
    }

    #[test]
    fn a_flood_of_distinct_ids_stays_within_the_cap() {
        let t0 = Instant::now();
        let cap = 1000;
        let mut v = ViewerTracker::new(Duration::from_secs(4), cap);
        // 100,000 distinct ids, each downloading a segment within the same second.
        let tracked = (0..100_000)
            .filter(|i| {
                let at = t0 + Duration::from_micros(*i);
                v.fetched_segment("main", &format!("fake-{i}"), at)
            })
            .count();
        assert_eq!(tracked, cap);
        assert_eq!(v.tracked(), cap);
        // Ids already tracked keep being refreshed while the map is full.
        assert!(v.fetched_segment("main", "fake-0", t0 + Duration::from_secs(2)));
        // Once the window has passed, room is made for new viewers (pruned on insert).
        let later = t0 + Duration::from_secs(5);
        assert!(v.fetched_segment("side", "real", later));
        let left = v.prune(later);
        assert_eq!(
            left.values().sum::<u64>(),
            2,
            "fake-0 (2 s) and real remain"
        );
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
