//! What the page's player reports to its broadcast (`POST /api/player`): the body's shape and
//! the bounds a real player's figures keep. Shared by the broadcast and the fuzz target, since
//! anyone holding a token can send one.

use serde::Deserialize;

/// Bytes of one report's body; a real one is under 100.
pub const MAX_REPORT_BYTES: usize = 1024;
/// The page reports every 10 s (and when it leaves); a report of more play time than this is
/// no report of ours.
pub const MAX_WATCH_S: f64 = 30.0;
/// Latencies beyond this are not a live player's.
pub const MAX_LATENCY_S: f64 = 600.0;

/// One report, as the page sends it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlayerReport {
    /// Seconds played since the last report (stalls included, pauses not).
    pub watch_s: f64,
    /// Seconds of `watch_s` spent waiting for media.
    pub stall_s: f64,
    /// Seconds behind live at the play head, when the player knows.
    pub latency_s: Option<f64>,
}

impl PlayerReport {
    /// Parses a body and checks every figure is one a player could report.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let report: Self =
            serde_json::from_slice(body).map_err(|e| format!("not a player report: {e}"))?;
        let within = |v: f64, max: f64| v.is_finite() && (0.0..=max).contains(&v);
        if !within(report.watch_s, MAX_WATCH_S) {
            return Err(format!("watch_s must be within 0..={MAX_WATCH_S}"));
        }
        if !within(report.stall_s, report.watch_s) {
            return Err("stall_s must be within 0..=watch_s".into());
        }
        if report.latency_s.is_some_and(|l| !within(l, MAX_LATENCY_S)) {
            return Err(format!("latency_s must be within 0..={MAX_LATENCY_S}"));
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_bounded() {
        let ok = PlayerReport::parse(br#"{"watch_s": 10.2, "stall_s": 0.5, "latency_s": 3.1}"#);
        assert_eq!(ok.unwrap().latency_s, Some(3.1));
        assert!(
            PlayerReport::parse(br#"{"watch_s": 10, "stall_s": 0, "latency_s": null}"#).is_ok()
        );
        for bad in [
            &br#"{"watch_s": 1e9, "stall_s": 0}"#[..],
            br#"{"watch_s": 10, "stall_s": 11}"#,
            br#"{"watch_s": -1, "stall_s": 0}"#,
            br#"{"watch_s": 10, "stall_s": 0, "latency_s": 1e6}"#,
            br#"{"watch_s": 10, "stall_s": 0, "extra": 1}"#,
            b"<html>",
            b"",
        ] {
            assert!(
                PlayerReport::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
