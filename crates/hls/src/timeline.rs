//! The shared timeline (docs/architecture.md): slot k covers wall-clock [k·D, (k+1)·D) and the
//! segment made from it has media sequence number k on every ingest.
//!
//! Media timestamps reach us relative to a per-publish *epoch* E (a multiple of D, milliseconds
//! since the Unix epoch). An FLV timestamp T therefore means wall-clock E + T, and the slot of a
//! media time never depends on which ingest computed it or when its transcoder started.

/// Slot arithmetic for one segment duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotClock {
    segment_ms: u64,
}

impl SlotClock {
    /// `segment_seconds` must be at least 1 (the config validates it).
    pub fn new(segment_seconds: u32) -> Self {
        Self {
            segment_ms: u64::from(segment_seconds.max(1)) * 1000,
        }
    }

    pub fn segment_ms(self) -> u64 {
        self.segment_ms
    }

    pub fn segment_seconds(self) -> f64 {
        self.segment_ms as f64 / 1000.0
    }

    /// The slot containing a wall-clock instant (ms since the Unix epoch).
    pub fn slot_at(self, unix_ms: u64) -> u64 {
        unix_ms / self.segment_ms
    }

    /// Wall-clock start of slot k (ms since the Unix epoch): its PROGRAM-DATE-TIME.
    pub fn slot_start_ms(self, slot: u64) -> u64 {
        slot * self.segment_ms
    }

    /// The epoch for a publish whose media time 0 is at `anchor_unix_ms`: the slot boundary at or
    /// before it, so media timestamps stay small and slot boundaries are whole multiples of D.
    pub fn epoch_for_anchor(self, anchor_unix_ms: u64) -> u64 {
        self.slot_start_ms(self.slot_at(anchor_unix_ms))
    }

    /// The slot a segment starting at media time `media_ms` (relative to `epoch_ms`) belongs to,
    /// tolerating up to half a segment of jitter (a keyframe lands on the first frame at or after
    /// the boundary).
    pub fn slot_of_media_start(self, epoch_ms: u64, media_ms: f64) -> u64 {
        let unix_ms = epoch_ms as f64 + media_ms;
        (unix_ms / self.segment_ms as f64).round().max(0.0) as u64
    }

    /// True when a media time is on a slot boundary within `tolerance_ms` (one frame).
    pub fn is_on_boundary(self, media_ms: f64, tolerance_ms: f64) -> bool {
        let rem = media_ms.rem_euclid(self.segment_ms as f64);
        rem <= tolerance_ms || self.segment_ms as f64 - rem <= tolerance_ms
    }
}

/// Wall-clock now in ms since the Unix epoch.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 with milliseconds in UTC, as EXT-X-PROGRAM-DATE-TIME wants it.
pub fn format_program_date_time(unix_ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Parses an EXT-X-PROGRAM-DATE-TIME value into ms since the Unix epoch.
pub fn parse_program_date_time(value: &str) -> Option<u64> {
    let t =
        time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_wall_clock_multiples() {
        let c = SlotClock::new(2);
        assert_eq!(c.slot_at(1_764_000_001_999), 882_000_000);
        assert_eq!(c.slot_at(1_764_000_002_000), 882_000_001);
        assert_eq!(c.slot_start_ms(882_000_001), 1_764_000_002_000);
        assert_eq!(c.epoch_for_anchor(1_764_000_003_370), 1_764_000_002_000);
    }

    #[test]
    fn media_start_maps_to_the_same_slot_on_any_ingest() {
        let c = SlotClock::new(2);
        let epoch = 1_764_000_000_000;
        // Keyframes land on the first frame at or after the boundary (25 fps: up to 40 ms late).
        assert_eq!(
            c.slot_of_media_start(epoch, 14_010.0),
            c.slot_at(epoch + 14_000)
        );
        assert_eq!(
            c.slot_of_media_start(epoch, 13_990.0),
            c.slot_at(epoch + 14_000)
        );
        assert!(c.is_on_boundary(14_010.0, 41.0));
        assert!(!c.is_on_boundary(13_370.0, 41.0));
    }

    #[test]
    fn program_date_time_round_trip() {
        let s = format_program_date_time(1_764_000_002_040);
        assert_eq!(s, "2025-11-24T16:00:02.040Z");
        assert_eq!(parse_program_date_time(&s), Some(1_764_000_002_040));
    }
}
