//! A media playlist from a peer: broadcasts parse their ingests', `streamctl watch` parses a
//! broadcast's. Besides "no crash", what parses is put through the writer the way a broadcast
//! does (a segment window filled from the playlist, then rendered) and must read back the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use streaming_hls::{SegmentInfo, SegmentWindow, parse_media};

/// Two hours of 2 s slots; beyond that the re-rendered numbers are not what a broadcast serves.
const SEGMENT_MS: u64 = 2000;
/// Latest instant the writer formats exactly (year 9999).
const MAX_DATE_MS: u64 = 253_402_300_799_999;

fuzz_target!(|data: &[u8]| {
    // hls_m3u8 panics on some inputs and `parse_media` turns that into an error; libfuzzer-sys's
    // panic hook would abort before the catch. Quiet hook: only a panic that reaches libFuzzer's
    // own wrapper (this target's checks, or one the parser does not catch) is a crash.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = parse_media(text) else {
        return;
    };
    // Only values our own writer can produce are compared: durations printed with 3 decimals,
    // dates within what RFC 3339 spells.
    let plausible = parsed.segments.iter().all(|s| {
        (0.0..=3600.0).contains(&s.duration_s)
            && s.seq < u64::MAX / SEGMENT_MS
            && s.program_date_time_ms.is_none_or(|ms| ms <= MAX_DATE_MS)
    }) && parsed.target_duration_s <= 3600.0;
    if !plausible || parsed.segments.is_empty() {
        return;
    }

    let mut window = SegmentWindow::new(parsed.segments.len());
    for (index, s) in parsed.segments.iter().enumerate() {
        window.start_discontinuity_sequence(s.discontinuity_sequence);
        let info = SegmentInfo {
            seq: s.seq,
            duration_s: s.duration_s,
            // A discontinuity tag on the first listed segment is already counted in the
            // playlist's EXT-X-DISCONTINUITY-SEQUENCE (the number of that segment).
            discontinuity: s.discontinuity && index > 0,
            program_date_time_ms: s.program_date_time_ms.unwrap_or(s.seq * SEGMENT_MS),
            map: None,
            parts: Vec::new(),
        };
        window
            .push(info, ())
            .expect("parsed segments are numbered in order");
    }
    let rendered = window.render(
        parsed.segments.len(),
        parsed.target_duration_s as u32,
        str::to_owned,
    );
    let again = parse_media(&rendered)
        .unwrap_or_else(|e| panic!("our own playlist does not parse: {e}\n{rendered}"));
    assert_eq!(again.segments.len(), parsed.segments.len(), "{rendered}");
    assert_eq!(again.media_sequence, parsed.media_sequence);
    for (index, (a, b)) in parsed.segments.iter().zip(&again.segments).enumerate() {
        assert_eq!(a.seq, b.seq);
        assert_eq!(
            a.discontinuity_sequence, b.discontinuity_sequence,
            "{rendered}"
        );
        if index > 0 {
            assert_eq!(a.discontinuity, b.discontinuity);
        }
        // Written to the millisecond.
        assert!((a.duration_s - b.duration_s).abs() < 0.001, "{rendered}");
        if let Some(ms) = a.program_date_time_ms {
            assert_eq!(b.program_date_time_ms, Some(ms), "{rendered}");
        }
        assert_eq!(b.uri, streaming_hls::names::segment(a.seq));
    }
});
