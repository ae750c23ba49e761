//! The HTTPS origin the broadcasts pull from (contract "Ingest origin API"), plus the usual
//! `/healthz`, `/status` and `/metrics`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use streaming_core::config::is_safe_name;
use streaming_core::http::{has_bearer, metrics_response, text_error};
use streaming_core::status::IngestStatus;
use streaming_hls::names;
use streaming_hls::playlist::{HOLD_TARGETS, MAX_MSN_AHEAD};

use crate::channel::ChannelShared;
use streaming_core::sync::{lock, read};

const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
/// Init segments and fragmented MP4 media segments.
pub const MP4_TYPE: &str = "video/mp4";

#[derive(Clone)]
pub struct OriginState {
    pub channels: Arc<RwLock<HashMap<String, Arc<ChannelShared>>>>,
    pub cluster_key: Arc<RwLock<String>>,
    pub metrics: PrometheusHandle,
    pub host: String,
    /// Who may read `/status` and `/metrics`.
    pub ops: Arc<streaming_core::ops_auth::OpsGuard>,
}

impl OriginState {
    fn channel(&self, name: &str) -> Option<Arc<ChannelShared>> {
        if !is_safe_name(name) {
            return None;
        }
        read(&self.channels).get(name).cloned()
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        has_bearer(headers, &read(&self.cluster_key))
    }

    /// The channel a broadcast asks for, once its cluster key is checked: 401 without the key
    /// (before anything about channels is told), 404 for an unknown channel.
    fn authorized_channel(
        &self,
        headers: &HeaderMap,
        name: &str,
    ) -> Result<Arc<ChannelShared>, Refused> {
        if !self.authorized(headers) {
            return Err(Refused::Unauthorized);
        }
        self.channel(name).ok_or(Refused::NoChannel)
    }
}

/// Why a playlist or segment request got no channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Unauthorized,
    NoChannel,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::Unauthorized => unauthorized(),
            Refused::NoChannel => text_error(StatusCode::NOT_FOUND, "no such channel"),
        }
    }
}

pub fn router(state: OriginState) -> Router {
    let ops =
        axum::middleware::from_fn_with_state(state.ops.clone(), streaming_core::ops_auth::require);
    Router::new()
        .route("/origin/{channel}/master.m3u8", get(master))
        .route(
            "/origin/{channel}/{rendition}/{file}",
            get(media_or_segment),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/status", get(status).layer(ops.clone()))
        .route(
            "/metrics",
            get(|State(s): State<OriginState>| async move { metrics_response(&s.metrics) })
                .layer(ops),
        )
        .with_state(state)
}

fn playlist(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, PLAYLIST_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn unauthorized() -> Response {
    text_error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong cluster key (Authorization: Bearer ...)",
    )
}

async fn master(
    State(s): State<OriginState>,
    Path(channel): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ch = match s.authorized_channel(&headers, &channel) {
        Ok(ch) => ch,
        Err(refused) => return refused.into_response(),
    };
    let body = {
        let out = read(&ch.output);
        streaming_hls::render_master(&out.variants, |name| format!("{name}/index.m3u8"))
    };
    playlist(body)
}

#[derive(Deserialize)]
struct MediaQuery {
    #[serde(rename = "_HLS_msn")]
    msn: Option<u64>,
    #[serde(rename = "_HLS_part")]
    part: Option<u32>,
}

async fn media_or_segment(
    State(s): State<OriginState>,
    Path((channel, rendition, file)): Path<(String, String, String)>,
    Query(query): Query<MediaQuery>,
    headers: HeaderMap,
) -> Response {
    let ch = match s.authorized_channel(&headers, &channel) {
        Ok(ch) => ch,
        Err(refused) => return refused.into_response(),
    };
    if !is_safe_name(&rendition) || read(&ch.output).rendition(&rendition).is_none() {
        return text_error(StatusCode::NOT_FOUND, "no such rendition");
    }
    let Some(kind) = names::File::of(&file) else {
        return text_error(StatusCode::NOT_FOUND, "no such file");
    };
    if kind == names::File::Playlist {
        if query.part.is_some() && query.msn.is_none() {
            return text_error(StatusCode::BAD_REQUEST, "_HLS_part needs _HLS_msn");
        }
        if let Some(msn) = query.msn {
            let last = read(&ch.output)
                .rendition(&rendition)
                .and_then(|r| r.media.window().last_seq());
            if last.is_some_and(|l| msn > l + MAX_MSN_AHEAD) {
                return text_error(StatusCode::BAD_REQUEST, "_HLS_msn is too far in the future");
            }
            let hold = Duration::from_secs_f64(f64::from(ch.shape.target_s) * HOLD_TARGETS);
            wait_for(&ch, &rendition, msn, query.part, hold).await;
        }
        let body = read(&ch.output).media_playlist(&rendition, &ch.shape);
        return match body {
            Some(body) => playlist(body),
            None => text_error(StatusCode::NOT_FOUND, "no such rendition"),
        };
    }
    if let names::File::Part(seq, index) = kind {
        // The hinted part (the next one) is answered as soon as it exists.
        let hold = Duration::from_secs_f64(ch.shape.part_target_s * HOLD_TARGETS);
        wait_for(&ch, &rendition, seq, Some(index), hold).await;
    }
    let out = read(&ch.output);
    let Some(r) = out.rendition(&rendition) else {
        return text_error(StatusCode::NOT_FOUND, "no such rendition");
    };
    let data = match kind {
        names::File::Segment(seq) => r.media.window().get(seq).map(|(_, d)| d.clone()),
        names::File::Part(seq, index) => r.media.part(seq, index),
        names::File::Init => r.media.init(&file),
        names::File::Playlist => None,
    };
    match data {
        Some(data) => ([(header::CONTENT_TYPE, MP4_TYPE)], data).into_response(),
        None => text_error(StatusCode::NOT_FOUND, "not in the window"),
    }
}

/// Holds a request until part `part` of segment `msn` (the whole segment without `part`) is
/// published, or `hold` passed.
async fn wait_for(
    ch: &ChannelShared,
    rendition: &str,
    msn: u64,
    part: Option<u32>,
    hold: Duration,
) {
    ch.published
        .wait_until(hold, || {
            read(&ch.output)
                .rendition(rendition)
                .is_some_and(|r| r.media.has(msn, part))
        })
        .await;
}

async fn status(State(s): State<OriginState>) -> Response {
    let channels: Vec<(String, Arc<ChannelShared>)> = read(&s.channels)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let status = IngestStatus {
        name: s.host.clone(),
        role: "ingest".to_owned(),
        channels: channels
            .into_iter()
            .map(|(name, ch)| (name, lock(&ch.status).clone()))
            .collect(),
    };
    axum::Json(status).into_response()
}
