//! The source's small HTTPS API: what `streamctl status` and monitoring read.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;

use crate::supervisor::{EncodeStatus, Supervisor};

#[derive(Clone)]
pub struct AppState {
    pub name: String,
    pub supervisor: Arc<Supervisor>,
    pub metrics: PrometheusHandle,
    /// Who may read `/status` and `/metrics`.
    pub ops: Arc<streaming_core::ops_auth::OpsGuard>,
}

/// `/status` body.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    pub name: String,
    pub healthy: bool,
    #[serde(flatten)]
    pub encode: EncodeStatus,
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

/// 200 while ffmpeg runs and makes progress; 503 with the reason otherwise.
async fn healthz(State(state): State<AppState>) -> Response {
    if state.supervisor.is_healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let status = state.supervisor.status();
        let reason = match (status.running, status.last_exit) {
            (true, _) => "ffmpeg runs but reports no progress".to_owned(),
            (false, Some(exit)) => format!("ffmpeg not running (last exit: {exit})"),
            (false, None) => "ffmpeg not started yet".to_owned(),
        };
        streaming_core::http::text_error(StatusCode::SERVICE_UNAVAILABLE, reason)
    }
}

async fn status(State(state): State<AppState>) -> Json<SourceStatus> {
    Json(SourceStatus {
        name: state.name.clone(),
        healthy: state.supervisor.is_healthy(),
        encode: state.supervisor.status(),
    })
}

async fn metrics(State(state): State<AppState>) -> Response {
    streaming_core::http::metrics_response(&state.metrics)
}
