//! What players report: every few seconds the page tells its broadcast how long it played, how
//! long of that it stalled and how far behind live it is (`POST /api/player?t=<token>`), so the
//! dashboard and the alerts show what viewers see, their own networks and the time it takes to
//! find another broadcast included, which no server can measure.
//!
//! Anyone may hold a token, so a report counts only from a viewer (a whole segment within the
//! window: `crate::viewers`), at most one per [`REPORT_EVERY`] per viewer, and every figure is
//! bounded: one token moves the figures by no more than one real player could.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use std::collections::HashMap;
use streaming_core::http::text_error;
use streaming_core::token::unix_now;

use crate::routes::App;
pub use crate::viewers::REPORT_EVERY;

/// Bytes of one report's body; a real one is under 100.
pub const MAX_REPORT_BYTES: usize = 1024;
/// The page reports every 10 s (and when it leaves); a report of more play time than this is
/// no report of ours.
const MAX_WATCH_S: f64 = 30.0;
/// Latencies beyond this are not a live player's.
const MAX_LATENCY_S: f64 = 600.0;

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

/// `POST /api/player?t=<token>`: 204 when counted.
pub async fn report(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let signer = app.bc.signer();
    let token = query.get("t").map(String::as_str).unwrap_or_default();
    let claims = match signer.verify(token, unix_now()) {
        Ok(claims) => claims,
        Err(e) => return refused("bad_token", StatusCode::FORBIDDEN, e.to_string()),
    };
    let report = match PlayerReport::parse(&body) {
        Ok(report) => report,
        Err(e) => return refused("bad_report", StatusCode::BAD_REQUEST, e),
    };
    if !app.bc.player_report_counts(&claims.channel, &claims.viewer) {
        return refused(
            "not_counted",
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "not counted: reports come from viewers (a whole segment lately), one per {} s",
                REPORT_EVERY.as_secs()
            ),
        );
    }
    let channel = claims.channel;
    // Counters are whole numbers: milliseconds (the alerts use the ratio of the two).
    let ms = |s: f64| (s * 1000.0).round() as u64;
    metrics::counter!("broadcast_player_watch_milliseconds_total", "channel" => channel.clone())
        .increment(ms(report.watch_s));
    metrics::counter!("broadcast_player_stall_milliseconds_total", "channel" => channel.clone())
        .increment(ms(report.stall_s));
    if let Some(latency) = report.latency_s {
        metrics::histogram!("broadcast_player_latency_seconds", "channel" => channel.clone())
            .record(latency);
    }
    metrics::counter!("broadcast_player_reports_total", "result" => "counted").increment(1);
    StatusCode::NO_CONTENT.into_response()
}

fn refused(result: &'static str, status: StatusCode, reason: String) -> Response {
    metrics::counter!("broadcast_player_reports_total", "result" => result).increment(1);
    text_error(status, reason)
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
