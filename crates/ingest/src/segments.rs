//! Turning ffmpeg's segment list (CSV) into slots of the shared timeline.
//!
//! ffmpeg's segment muxer appends `name,start,end` once a segment is finished. With `-copyts`
//! the times are our FLV timestamps, i.e. ms after the run's epoch E, so a segment starting at
//! `start` belongs to slot round((E + start) / D). The first line's start is printed as 0.0 and
//! really is C, the first frame's time.

use streaming_hls::SlotClock;

/// One finished segment as listed by ffmpeg.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvEntry {
    pub file: String,
    pub start_s: f64,
    pub end_s: f64,
}

/// Parses one complete CSV line; `None` for anything malformed (logged by the caller).
pub fn parse_csv_line(line: &str) -> Option<CsvEntry> {
    let mut parts = line.trim().split(',');
    let file = parts.next()?.trim();
    let start_s = parts.next()?.trim().parse::<f64>().ok()?;
    let end_s = parts.next()?.trim().parse::<f64>().ok()?;
    // Only plain file names of our own pattern: never follow a path out of the work dir.
    if file.is_empty()
        || file.contains('/')
        || file.starts_with('.')
        || !start_s.is_finite()
        || !end_s.is_finite()
    {
        return None;
    }
    Some(CsvEntry {
        file: file.to_owned(),
        start_s,
        end_s,
    })
}

/// Why a listed segment is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The run began off a slot boundary: its first segment covers only part of a slot.
    PartialFirst,
    /// Shorter than D minus one frame (the tail at the end of a run).
    TooShort,
}

/// The slot rules of one ffmpeg run.
#[derive(Debug, Clone, Copy)]
pub struct RunTimeline {
    pub clock: SlotClock,
    pub epoch_ms: u64,
    /// Time of the first frame fed (ms after epoch): C·1000.
    pub first_frame_ms: f64,
    pub frame_ms: f64,
}

impl RunTimeline {
    /// Decides the `index`-th listed segment: its slot, or why it is dropped.
    pub fn place(&self, index: usize, entry: &CsvEntry) -> Result<u64, Rejected> {
        let start_ms = if index == 0 {
            self.first_frame_ms
        } else {
            entry.start_s * 1000.0
        };
        let end_ms = entry.end_s * 1000.0;
        if index == 0
            && !self
                .clock
                .is_on_boundary(self.first_frame_ms, self.frame_ms)
        {
            return Err(Rejected::PartialFirst);
        }
        if end_ms - start_ms < self.clock.segment_ms() as f64 - self.frame_ms - 1.0 {
            return Err(Rejected::TooShort);
        }
        Ok(self.clock.slot_of_media_start(self.epoch_ms, start_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ffmpeg_lines() {
        assert_eq!(
            parse_csv_line("r0_00001.ts,14.010000,16.010000\n"),
            Some(CsvEntry {
                file: "r0_00001.ts".into(),
                start_s: 14.01,
                end_s: 16.01
            })
        );
        assert_eq!(parse_csv_line("r0_00001.ts,abc,1"), None);
        assert_eq!(parse_csv_line("../etc/passwd,1,2"), None);
        assert_eq!(parse_csv_line(""), None);
    }

    #[test]
    fn places_segments_on_slots() {
        let epoch = 1_764_000_000_000;
        let tl = RunTimeline {
            clock: SlotClock::new(2),
            epoch_ms: epoch,
            first_frame_ms: 13_370.0,
            frame_ms: 40.0,
        };
        let slot0 = epoch / 2000;
        // First segment starts mid-slot: dropped.
        let first = CsvEntry {
            file: "r0_00000.ts".into(),
            start_s: 0.0,
            end_s: 14.0,
        };
        assert_eq!(tl.place(0, &first), Err(Rejected::PartialFirst));
        // Next ones sit on boundaries (one frame late at most).
        let e = CsvEntry {
            file: "r0_00001.ts".into(),
            start_s: 14.0,
            end_s: 16.0,
        };
        assert_eq!(tl.place(1, &e), Ok(slot0 + 7));
        let e = CsvEntry {
            file: "r0_00002.ts".into(),
            start_s: 16.04,
            end_s: 18.0,
        };
        assert_eq!(tl.place(2, &e), Ok(slot0 + 8));
        // The tail of a run is short: dropped.
        let e = CsvEntry {
            file: "r0_00003.ts".into(),
            start_s: 18.0,
            end_s: 18.6,
        };
        assert_eq!(tl.place(3, &e), Err(Rejected::TooShort));
        // A run that starts exactly on a boundary keeps its first segment (printed start 0.0).
        let tl = RunTimeline {
            first_frame_ms: 14_000.0,
            ..tl
        };
        let first = CsvEntry {
            file: "r0_00000.ts".into(),
            start_s: 0.0,
            end_s: 16.0,
        };
        assert_eq!(tl.place(0, &first), Ok(slot0 + 7));
    }

    /// Two ingests receive the same publish (same anchor, same timestamps: directly from the
    /// source or through the relay) but start their transcoder runs at different keyframes and
    /// with their own epoch computed independently. The segments they list must land on the
    /// same slots, so segment N is the same media on both.
    #[test]
    fn two_ingests_map_the_same_media_to_the_same_slots() {
        let clock = SlotClock::new(2);
        let anchor = 1_764_000_001_370u64; // source's wall clock at media time 0
        let ingest = |first_frame_ms: f64, lines: &[&str]| -> Vec<Result<u64, Rejected>> {
            let tl = RunTimeline {
                clock,
                epoch_ms: clock.epoch_for_anchor(anchor),
                first_frame_ms,
                frame_ms: 40.0,
            };
            lines
                .iter()
                .enumerate()
                .map(|(i, l)| tl.place(i, &parse_csv_line(l).unwrap()))
                .collect()
        };
        // FLV times are anchor + ts - epoch = 1370 + ts. Ingest 1 started at the source's first
        // keyframe (ts 0 -> 1370 ms), ingest 2 one GOP later (ts 2000 -> 3370 ms).
        let one = ingest(
            1370.0,
            &[
                "r0_00000.ts,0.000000,2.000000",
                "r0_00001.ts,2.000000,4.000000",
                "r0_00002.ts,4.000000,6.040000",
                "r0_00003.ts,6.040000,8.000000",
            ],
        );
        let two = ingest(
            3370.0,
            &[
                "r0_00000.ts,0.000000,4.000000",
                "r0_00001.ts,4.000000,6.040000",
                "r0_00002.ts,6.040000,8.000000",
            ],
        );
        let slot0 = clock.slot_at(clock.epoch_for_anchor(anchor));
        assert_eq!(
            one,
            [
                Err(Rejected::PartialFirst),
                Ok(slot0 + 1),
                Ok(slot0 + 2),
                Ok(slot0 + 3)
            ]
        );
        assert_eq!(
            two,
            [Err(Rejected::PartialFirst), Ok(slot0 + 2), Ok(slot0 + 3)]
        );
        // Same media start -> same slot -> same name and PROGRAM-DATE-TIME on both.
        assert_eq!(clock.slot_start_ms(slot0 + 2), 1_764_000_004_000);
        // And the mapping depends only on anchor and timestamps, not on when a run started.
        for ts in [0u64, 630, 2_630, 40_630, 3_600_000] {
            let media_ms = (anchor + ts - clock.epoch_for_anchor(anchor)) as f64;
            assert_eq!(
                clock.slot_of_media_start(clock.epoch_for_anchor(anchor), media_ms),
                ((anchor + ts) as f64 / 2000.0).round() as u64
            );
        }
    }
}
