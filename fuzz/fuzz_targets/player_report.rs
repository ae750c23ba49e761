//! A player report body (`POST /api/player`) from anyone holding a token, as the broadcast
//! parses it: an accepted report's figures are finite and within the bounds one real player
//! could reach, so the counters it feeds move by at most that much.

#![no_main]

use libfuzzer_sys::fuzz_target;
use streaming_core::player_report::{MAX_LATENCY_S, MAX_REPORT_BYTES, MAX_WATCH_S, PlayerReport};

fuzz_target!(|data: &[u8]| {
    // The broadcast refuses a longer body before parsing it.
    if data.len() > MAX_REPORT_BYTES {
        return;
    }
    let Ok(report) = PlayerReport::parse(data) else {
        return;
    };
    assert!(report.watch_s.is_finite() && (0.0..=MAX_WATCH_S).contains(&report.watch_s));
    assert!(report.stall_s.is_finite() && (0.0..=report.watch_s).contains(&report.stall_s));
    if let Some(latency) = report.latency_s {
        assert!(latency.is_finite() && (0.0..=MAX_LATENCY_S).contains(&latency));
    }
});
