//! The player's buffer: a play head advancing in real time over the segments downloaded; a
//! stall is the play head reaching the end of the buffer.

use std::time::{Duration, Instant};

/// The playback buffer: media seconds downloaded vs. media seconds played.
///
/// Pure and clock-injected so the stall accounting is unit-tested without a network.
#[derive(Debug, Clone)]
pub struct BufferModel {
    buffered_s: f64,
    position_s: f64,
    playing: bool,
    started: bool,
    last_update: Instant,
    stall_started: Option<Instant>,
    pub stalls: u64,
    pub stall_s: f64,
}

impl BufferModel {
    pub fn new(now: Instant) -> Self {
        Self {
            buffered_s: 0.0,
            position_s: 0.0,
            playing: false,
            started: false,
            last_update: now,
            stall_started: None,
            stalls: 0,
            stall_s: 0.0,
        }
    }

    /// Advances the play head to `now`; a play head that reaches the end of the buffer stalls.
    pub fn advance(&mut self, now: Instant) {
        if self.playing {
            let elapsed = now
                .saturating_duration_since(self.last_update)
                .as_secs_f64();
            let room = self.buffered_s - self.position_s;
            if elapsed >= room {
                self.position_s = self.buffered_s;
                self.playing = false;
                self.stalls += 1;
                self.stall_started =
                    Some(self.last_update + Duration::from_secs_f64(room.max(0.0)));
            } else {
                self.position_s += elapsed;
            }
        }
        self.last_update = now;
    }

    /// A segment of `duration_s` arrived; playback starts (or resumes) as soon as there is media.
    pub fn add_segment(&mut self, now: Instant, duration_s: f64) {
        self.advance(now);
        self.buffered_s += duration_s;
        if !self.playing {
            if let Some(since) = self.stall_started.take() {
                self.stall_s += now.saturating_duration_since(since).as_secs_f64();
            }
            self.playing = true;
            self.started = true;
        }
    }

    /// Closes the run: a stall still going on counts until `now`.
    pub fn finish(&mut self, now: Instant) {
        self.advance(now);
        if let Some(since) = self.stall_started.take() {
            self.stall_s += now.saturating_duration_since(since).as_secs_f64();
        }
    }

    pub fn position_s(&self) -> f64 {
        self.position_s
    }

    pub fn buffer_ahead_s(&self) -> f64 {
        self.buffered_s - self.position_s
    }

    pub fn started(&self) -> bool {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_stall_when_segments_arrive_in_time() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        // Three segments at once (start 3 behind live), then one every 2 s.
        for _ in 0..3 {
            b.add_segment(t0, 2.0);
        }
        for i in 1..=10 {
            b.add_segment(t0 + Duration::from_secs(2 * i), 2.0);
        }
        b.finish(t0 + Duration::from_secs(20));
        assert_eq!((b.stalls, b.stall_s), (0, 0.0));
        assert!((b.position_s() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn a_late_segment_is_one_stall_of_the_right_length() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        b.add_segment(t0, 2.0);
        // Next segment arrives 3.5 s later: the play head ran dry at 2 s, stalled 1.5 s.
        b.add_segment(t0 + Duration::from_millis(3500), 2.0);
        b.finish(t0 + Duration::from_millis(4000));
        assert_eq!(b.stalls, 1);
        assert!((b.stall_s - 1.5).abs() < 1e-6, "{}", b.stall_s);
        assert!(b.started());
    }

    #[test]
    fn a_stall_still_going_at_the_end_is_counted() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        b.add_segment(t0, 2.0);
        b.finish(t0 + Duration::from_secs(5));
        assert_eq!(b.stalls, 1);
        assert!((b.stall_s - 3.0).abs() < 1e-6);
    }

    #[test]
    fn nothing_plays_before_the_first_segment() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        b.finish(t0 + Duration::from_secs(5));
        assert_eq!((b.stalls, b.stall_s, b.started()), (0, 0.0, false));
    }
}
