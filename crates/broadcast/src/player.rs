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
use std::collections::HashMap;
use streaming_core::http::text_error;
use streaming_core::player_report::PlayerReport;
use streaming_core::token::unix_now;

use crate::routes::App;
pub use crate::viewers::REPORT_EVERY;

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
