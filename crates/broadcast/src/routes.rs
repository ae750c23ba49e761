//! The viewer API: the page, `/api/cluster`, token-protected playlists and segments, and the
//! operator endpoints `/healthz`, `/status`, `/metrics`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use streaming_core::config::{ChannelConfig, HostConfig, Rendition, Role, is_safe_name};
use streaming_core::http::{hsts_layer, text_error};
use streaming_core::ops_auth::{self, OpsGuard};
use streaming_core::rate_limit::RateLimiter;
use streaming_core::token::{TOKEN_TTL_SECS, TokenError, TokenSigner, ViewerClaims, unix_now};
use streaming_hls::playlist::{HOLD_TARGETS, MAX_MSN_AHEAD};
use streaming_hls::{
    PlaylistShape, RenditionMedia, RenditionReport, Variant, names, render_master,
};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::state::{Broadcast, ChannelState, RenditionState, lock, read};

pub const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
/// Fragmented MP4: media segments and their init segments.
pub const SEGMENT_TYPE: &str = "video/mp4";

#[derive(Clone)]
pub struct App {
    pub bc: Arc<Broadcast>,
    pub metrics: PrometheusHandle,
    /// Who may read `/status` and `/metrics` (the LBs poll `/status`).
    pub ops: Arc<OpsGuard>,
}

/// `chat` is `None` only in tests of the media routes.
pub fn router(app: App, chat: Option<Arc<streaming_chat::Chat>>) -> Router {
    let bc = app.bc.clone();
    // The page of another broadcast (after a failover) or an LB page calls us cross-origin.
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin
                .to_str()
                .is_ok_and(|o| bc.allowed_origins().iter().any(|a| a == o))
        }))
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]);
    let mut cross_origin = Router::new()
        .route("/live/{channel}/{file}", get(master))
        .route("/live/{channel}/{rendition}/{file}", get(media_or_segment))
        .route("/api/cluster", get(cluster))
        .route(
            "/api/player",
            axum::routing::post(crate::player::report).layer(DefaultBodyLimit::max(
                streaming_core::player_report::MAX_REPORT_BYTES,
            )),
        )
        .with_state(app.clone());
    let steering = crate::steering::router(app.bc.clone());
    // Accounts and chat: a page that failed over to us keeps its account session.
    if let Some(chat) = chat {
        let account_rate = Arc::new(RateLimiter::new(
            "account",
            app.bc.config().cluster.limits.account_rate,
        ));
        cross_origin = cross_origin
            .merge(streaming_chat::api::router(chat.clone(), account_rate))
            .merge(streaming_chat::ws::router(chat));
    }
    let cross_origin = cross_origin.layer(cors);
    let ops = axum::middleware::from_fn_with_state(app.ops.clone(), ops_auth::require);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status).layer(ops.clone()))
        .route("/metrics", get(metrics).layer(ops))
        .route("/live/{channel}/", get(channel_page))
        .fallback(page)
        .with_state(app)
        .merge(cross_origin)
        .merge(steering)
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(hsts_layer())
}

/// Why a request for media is refused, as the 403 body says it.
pub fn check_token(
    signer: &TokenSigner,
    token: Option<&str>,
    channel: &str,
    now: u64,
) -> Result<ViewerClaims, TokenError> {
    let claims = signer.verify(token.unwrap_or_default(), now)?;
    // A token naming another broadcast is fine: viewers fail over between broadcasts.
    if claims.channel != channel {
        return Err(TokenError::WrongChannel(claims.channel));
    }
    Ok(claims)
}

/// A fresh token for the same viewer, naming us, with a sliding expiry.
pub fn renew(signer: &TokenSigner, claims: &ViewerClaims, me: &str, now: u64) -> String {
    signer.sign(&ViewerClaims {
        broadcast: me.to_owned(),
        channel: claims.channel.clone(),
        viewer: claims.viewer.clone(),
        expires: now + TOKEN_TTL_SECS,
    })
}

fn variants_of(channel: &ChannelConfig) -> Vec<Variant> {
    channel
        .ladder
        .iter()
        .map(|r| Variant {
            name: r.name.clone(),
            bandwidth_bps: Rendition::bandwidth_bps_with(channel.audio_kbps)(r),
            width: r.width,
            height: r.height,
            fps: channel.fps,
        })
        .collect()
}

/// The master playlist of a channel, each variant URI carrying the token.
pub fn master_playlist(channel: &ChannelConfig, token: &str) -> String {
    render_master(&variants_of(channel), |name| {
        format!("{name}/index.m3u8?t={token}")
    })
}

/// HLS Content Steering for players that do not run our page: every broadcast is a Pathway,
/// and the LBs' steering manifest (through our `/steering`, see [`crate::steering`]) tells
/// compliant players (hls.js >= 1.4, Safari, ExoPlayer) which one to use, so they leave a dead,
/// hung or draining broadcast on their own. Players that ignore steering see the other pathways
/// as redundant variants (same BANDWIDTH), their classic backup streams.
#[derive(Debug, Clone, PartialEq)]
pub struct Steering {
    /// Steering manifest URI (our own `/steering`).
    pub server_uri: String,
    /// Pathway the player starts on (us, unless we are draining).
    pub first: String,
    /// (broadcast name, base URL or `None` for ourselves: relative URIs), first one first.
    pub pathways: Vec<(String, Option<String>)>,
}

/// The steering plan of a channel's master as this broadcast serves it: itself first with
/// relative URIs (unless draining), then every other broadcast not draining, in config order.
/// `None` without LBs: nobody could answer the steering requests.
pub fn steering_plan(config: &HostConfig, channel: &str) -> Option<Steering> {
    let me = config.me();
    if config.cluster.lb_urls().is_empty() {
        return None;
    }
    let mut pathways: Vec<(String, Option<String>)> = Vec::new();
    if !me.drain {
        pathways.push((me.name.clone(), None));
    }
    for host in config.cluster.hosts_with_role(Role::Broadcast) {
        if host.name != me.name && !host.drain && is_pathway_id(&host.name) {
            pathways.push((
                host.name.clone(),
                Some(host.url.trim_end_matches('/').to_owned()),
            ));
        }
    }
    if pathways.is_empty() {
        pathways.push((me.name.clone(), None));
    }
    Some(Steering {
        server_uri: crate::steering::server_uri(&me.url, channel),
        first: pathways[0].0.clone(),
        pathways,
    })
}

/// Pathway IDs are [a-zA-Z0-9._-]; host names are stricter already, this guards the quoting.
fn is_pathway_id(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The master with one copy of the ladder per pathway (`PATHWAY-ID` on each variant) and the
/// `EXT-X-CONTENT-STEERING` tag. Our own pathway keeps relative URIs, so a player that ignores
/// steering plays from us first.
pub fn steered_master_playlist(
    channel: &ChannelConfig,
    token: &str,
    steering: &Steering,
) -> String {
    let variants = variants_of(channel);
    let mut out = String::from("#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    out.push_str(&format!(
        "#EXT-X-CONTENT-STEERING:SERVER-URI=\"{}\",PATHWAY-ID=\"{}\"\n",
        steering.server_uri, steering.first
    ));
    for (pathway, base) in &steering.pathways {
        let one = render_master(&variants, |name| match base {
            None => format!("{name}/index.m3u8?t={token}"),
            Some(base) => format!("{base}/live/{}/{name}/index.m3u8?t={token}", channel.name),
        });
        for line in one.lines() {
            if line.starts_with("#EXTM3U")
                || line.starts_with("#EXT-X-VERSION")
                || line.starts_with("#EXT-X-INDEPENDENT-SEGMENTS")
            {
                continue;
            }
            out.push_str(line);
            if line.starts_with("#EXT-X-STREAM-INF:") {
                out.push_str(&format!(",PATHWAY-ID=\"{pathway}\""));
            }
            out.push('\n');
        }
    }
    out
}

/// The media playlist of a rendition, every URI carrying the token: low-latency once the
/// origin announced parts (`shape.part_target_s` > 0), classic before.
pub fn media_playlist(
    media: &RenditionMedia,
    shape: &PlaylistShape,
    reports: Vec<RenditionReport>,
    token: &str,
) -> String {
    let uri = |name: &str| format!("{name}?t={token}");
    if shape.part_target_s > 0.0 {
        media.low_latency_playlist(shape, reports, uri)
    } else {
        media.classic_playlist(shape, uri)
    }
}

fn forbidden(e: TokenError) -> Response {
    text_error(StatusCode::FORBIDDEN, e.to_string())
}

fn playlist_response(bc: &Broadcast, channel: &str, body: String) -> Response {
    bc.count_egress(channel, body.len());
    (
        [
            (header::CONTENT_TYPE, PLAYLIST_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Why a media request is refused.
enum Refused {
    UnknownChannel,
    Token(TokenError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::UnknownChannel => text_error(StatusCode::NOT_FOUND, "unknown channel"),
            Refused::Token(e) => forbidden(e),
        }
    }
}

/// Checks the channel name and the token. A valid token does not make a viewer: only a
/// downloaded segment does (see [`segment_body`]).
fn admit(
    bc: &Broadcast,
    channel: &str,
    query: &HashMap<String, String>,
) -> Result<(ChannelConfig, ViewerClaims), Refused> {
    let config = bc.config();
    let known = is_safe_name(channel)
        .then(|| config.cluster.channel(channel))
        .flatten();
    let Some(channel_config) = known.cloned() else {
        return Err(Refused::UnknownChannel);
    };
    let claims = check_token(
        &bc.signer(),
        query.get("t").map(String::as_str),
        channel,
        unix_now(),
    )
    .map_err(Refused::Token)?;
    Ok((channel_config, claims))
}

async fn master(
    State(app): State<App>,
    Path((channel, file)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if file != "master.m3u8" {
        return text_error(StatusCode::NOT_FOUND, "not found");
    }
    let (channel_config, claims) = match admit(&app.bc, &channel, &query) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let token = renew(&app.bc.signer(), &claims, &app.bc.name, unix_now());
    // Our page fails over by itself and asks for a plain master (`steering=0`).
    let plan = if query.get("steering").map(String::as_str) == Some("0") {
        None
    } else {
        steering_plan(&app.bc.config(), &channel)
    };
    let body = match plan {
        Some(plan) => steered_master_playlist(&channel_config, &token, &plan),
        None => master_playlist(&channel_config, &token),
    };
    playlist_response(&app.bc, &channel, body)
}

async fn media_or_segment(
    State(app): State<App>,
    Path((channel, rendition, file)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let bc = &app.bc;
    let kind = names::File::of(&file);
    if !is_safe_name(&rendition) || kind.is_none() {
        return text_error(StatusCode::NOT_FOUND, "not found");
    }
    let (channel_config, claims) = match admit(bc, &channel, &query) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let channel_state = bc.channel(&channel);
    let state = channel_state.as_ref().and_then(|c| c.rendition(&rendition));
    let (Some(channel_state), Some(state), true) = (
        channel_state,
        state,
        channel_config.ladder.iter().any(|r| r.name == rendition),
    ) else {
        return text_error(StatusCode::NOT_FOUND, "unknown rendition");
    };
    let config = bc.config();
    let timeline = &config.cluster.timeline;
    let part_target = lock(&state.part_target_s).unwrap_or(0.0);
    match kind {
        Some(names::File::Init) => {
            // Named by its content, so it never changes: cacheable for as long as players like.
            let Some(bytes) = read(&state.media).init(&file) else {
                return text_error(StatusCode::NOT_FOUND, "init segment not in the window");
            };
            bc.count_egress(&channel, bytes.len());
            (
                [
                    (header::CONTENT_TYPE, SEGMENT_TYPE),
                    (header::CACHE_CONTROL, "private, max-age=86400, immutable"),
                ],
                bytes,
            )
                .into_response()
        }
        Some(names::File::Segment(seq)) => {
            let found = read(&state.media).window().get(seq).map(|(_, b)| b.clone());
            let cache = timeline.cache_segments * timeline.segment_seconds;
            media_response(bc, claims, found, cache)
        }
        Some(names::File::Part(seq, index)) => {
            // The hinted part (the next one) is answered as soon as it exists.
            let hold = Duration::from_secs_f64(part_target * HOLD_TARGETS);
            wait_for(&channel_state, &state, seq, Some(index), hold).await;
            let found = read(&state.media).part(seq, index);
            media_response(bc, claims, found, timeline.segment_seconds)
        }
        Some(names::File::Playlist) | None => {
            if config.me().drain {
                return draining();
            }
            if query.contains_key("_HLS_part") && !query.contains_key("_HLS_msn") {
                return text_error(StatusCode::BAD_REQUEST, "_HLS_part needs _HLS_msn");
            }
            if let Some((msn, part)) = blocking_request(&query) {
                let last = read(&state.media).window().last_seq();
                if last.is_some_and(|l| msn > l + MAX_MSN_AHEAD) {
                    return text_error(
                        StatusCode::BAD_REQUEST,
                        "_HLS_msn is too far in the future",
                    );
                }
                let hold = Duration::from_secs(u64::from(timeline.segment_seconds)) * 3;
                wait_for(&channel_state, &state, msn, part, hold).await;
            }
            let token = renew(&bc.signer(), &claims, &bc.name, unix_now());
            let shape = PlaylistShape::new(
                timeline.playlist_segments as usize,
                timeline.segment_seconds,
                part_target,
                timeline.part_hold_back_parts,
            );
            let reports = read(&channel_state.renditions)
                .values()
                .filter(|r| r.name != rendition)
                .filter_map(|r| read(&r.media).report(format!("../{}/index.m3u8", r.name)))
                .collect();
            let body = {
                let media = read(&state.media);
                (!media.window().is_empty())
                    .then(|| media_playlist(&media, &shape, reports, &token))
            };
            match body {
                Some(body) => playlist_response(bc, &channel, body),
                None => {
                    let mut r = text_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "channel is not live here yet",
                    );
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
                    r
                }
            }
        }
    }
}

/// `_HLS_msn` (and `_HLS_part`) of a blocking playlist request; malformed values are ignored.
fn blocking_request(query: &HashMap<String, String>) -> Option<(u64, Option<u32>)> {
    let msn = query.get("_HLS_msn")?.parse().ok()?;
    Some((msn, query.get("_HLS_part").and_then(|p| p.parse().ok())))
}

/// Holds a request until part `part` of segment `msn` (the whole segment without `part`) is
/// here, or `hold` passed.
async fn wait_for(
    channel: &ChannelState,
    rendition: &RenditionState,
    msn: u64,
    part: Option<u32>,
    hold: Duration,
) {
    channel
        .published
        .wait_until(hold, || read(&rendition.media).has(msn, part))
        .await;
}

/// Draining: the viewer's next playlist request moves it (the page and `watch` fail over
/// through an LB on any error; steering players already left by pathway).
fn draining() -> Response {
    metrics::counter!("broadcast_drain_refusals_total").increment(1);
    let mut r = text_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "broadcast is draining: ask an LB for another one",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    r
}

/// A segment or part, counted for the viewer as it is taken.
fn media_response(
    bc: &Arc<Broadcast>,
    viewer: ViewerClaims,
    found: Option<bytes::Bytes>,
    max_age_s: u32,
) -> Response {
    let Some(bytes) = found else {
        return text_error(StatusCode::NOT_FOUND, "not in the window");
    };
    let length = bytes.len();
    let mut response = (
        [
            (header::CONTENT_TYPE, SEGMENT_TYPE.to_owned()),
            (
                header::CACHE_CONTROL,
                format!("private, max-age={max_age_s}"),
            ),
        ],
        segment_body(bc.clone(), viewer, bytes),
    )
        .into_response();
    // A streamed body has no length of its own; players like to know it.
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// Chunk size of a segment body: hyper asks for the next chunk only when its write buffer has
/// room, so what we count is close to what the connection really took.
const SEGMENT_CHUNK: usize = 16 * 1024;

/// A segment body counted as it is handed to the connection: each chunk is egress when hyper
/// takes it, and the viewer counts once the last chunk is taken. A client that asks for a segment
/// but does not read it (or closes early) gets no viewer slot and costs at most what its
/// connection buffers hold.
fn segment_body(bc: Arc<Broadcast>, viewer: ViewerClaims, bytes: bytes::Bytes) -> axum::body::Body {
    use futures::StreamExt;
    let total = bytes.len();
    let chunks = total.div_ceil(SEGMENT_CHUNK).max(1);
    // `Bytes::slice`: every chunk still shares the one buffer all viewers get.
    let stream = futures::stream::iter(0..chunks).map(move |i| {
        let end = ((i + 1) * SEGMENT_CHUNK).min(total);
        let chunk = bytes.slice((i * SEGMENT_CHUNK).min(end)..end);
        bc.count_segment_egress(&viewer.channel, chunk.len());
        if i + 1 == chunks {
            bc.segment_fetched(&viewer.channel, &viewer.viewer);
        }
        Ok::<_, std::convert::Infallible>(chunk)
    });
    axum::body::Body::from_stream(stream)
}

async fn cluster(State(app): State<App>) -> Response {
    let config = app.bc.config();
    let live = app.bc.live_channels();
    // Every channel, the front page's first: the page's channel list.
    let channels: Vec<serde_json::Value> = config
        .cluster
        .channels
        .iter()
        .map(|c| serde_json::json!({"name": c.name, "live": live.contains(&c.name)}))
        .collect();
    let body = serde_json::json!({
        "broadcast": app.bc.name,
        "lbs": config.cluster.lb_urls(),
        "channel": config.cluster.default_channel().map(|c| c.name.clone()),
        "channels": channels,
    });
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

async fn healthz(State(app): State<App>) -> Response {
    let live = app.bc.live_channels();
    if live.is_empty() {
        let d = app.bc.segment_duration().as_secs() * 3;
        text_error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: no channel has a segment newer than {d} s"),
        )
    } else {
        (
            StatusCode::OK,
            format!("ok: live channels {}\n", live.join(",")),
        )
            .into_response()
    }
}

async fn status(State(app): State<App>) -> Response {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(app.bc.status()),
    )
        .into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    app.bc.viewer_count();
    streaming_core::http::metrics_response(&app.metrics)
}

/// `/` is the page of the `?channel=` asked for, by default the first one: its own address,
/// `/live/<channel>/`, keeping the token.
fn front_page_redirect(app: &App, query: &HashMap<String, String>) -> Response {
    let config = app.bc.config();
    let channel = match query.get("channel") {
        Some(asked) => config.cluster.channel(asked),
        None => config.cluster.default_channel(),
    };
    let Some(channel) = channel else {
        return text_error(StatusCode::NOT_FOUND, "unknown channel");
    };
    let mut location = format!("/live/{}/", channel.name);
    // Tokens are base64url and dots; anything else is no token of ours and is left behind.
    if let Some(token) = query.get("t").filter(|t| {
        t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    }) {
        location.push_str("?t=");
        location.push_str(token);
    }
    match HeaderValue::from_str(&location) {
        Ok(value) => (StatusCode::FOUND, [(header::LOCATION, value)]).into_response(),
        Err(_) => text_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad channel name in config",
        ),
    }
}

/// A channel's page: the viewer page, which reads the channel from its address.
async fn channel_page(State(app): State<App>, Path(channel): Path<String>) -> Response {
    if app.bc.config().cluster.channel(&channel).is_none() {
        return text_error(StatusCode::NOT_FOUND, "unknown channel");
    }
    let mut connect = app.bc.allowed_origins();
    connect.retain(|o| !o.is_empty());
    crate::web::serve("index.html", &connect)
}

async fn page(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return text_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    if uri.path() == "/" {
        return front_page_redirect(&app, &query);
    }
    let mut connect = app.bc.allowed_origins();
    connect.retain(|o| !o.is_empty());
    crate::web::serve_uri(&uri, &connect)
}

#[cfg(test)]
mod tests;
