//! The source's small HTTPS API: what `streamctl status` and monitoring read.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::encodes::{ChannelEncode, Encodes};

#[derive(Clone)]
pub struct AppState {
    pub name: String,
    pub encodes: Arc<Encodes>,
    pub metrics: PrometheusHandle,
    /// Who may read `/status` and `/metrics`.
    pub ops: Arc<streaming_core::ops_auth::OpsGuard>,
}

/// `/status` body.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    pub name: String,
    /// Every channel's encode is healthy.
    pub healthy: bool,
    pub channels: std::collections::BTreeMap<String, ChannelEncode>,
}

pub fn router(state: AppState) -> axum::Router {
    let ops =
        axum::middleware::from_fn_with_state(state.ops.clone(), streaming_core::ops_auth::require);
    axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status).layer(ops.clone()))
        .route("/metrics", get(metrics).layer(ops))
        .with_state(state)
}

/// 200 while every channel's ffmpeg runs and makes progress; 503 with the reasons otherwise.
async fn healthz(State(state): State<AppState>) -> Response {
    let reasons: Vec<String> = state
        .encodes
        .statuses()
        .into_iter()
        .filter(|(_, c)| !c.healthy)
        .map(|(channel, c)| {
            let reason = match (c.encode.running, c.encode.last_exit) {
                (true, _) => "ffmpeg runs but reports no progress".to_owned(),
                (false, Some(exit)) => format!("ffmpeg not running (last exit: {exit})"),
                (false, None) => "ffmpeg not started yet".to_owned(),
            };
            format!("{channel}: {reason}")
        })
        .collect();
    if reasons.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        streaming_core::http::text_error(StatusCode::SERVICE_UNAVAILABLE, reasons.join("; "))
    }
}

async fn status(State(state): State<AppState>) -> Json<SourceStatus> {
    let channels = state.encodes.statuses();
    Json(SourceStatus {
        name: state.name.clone(),
        healthy: channels.values().all(|c| c.healthy),
        channels,
    })
}

async fn metrics(State(state): State<AppState>) -> Response {
    streaming_core::http::metrics_response(&state.metrics)
}
