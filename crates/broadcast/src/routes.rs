//! The viewer API: the page, `/api/cluster`, token-protected playlists and segments, and the
//! operator endpoints `/healthz`, `/status`, `/metrics`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use streaming_core::config::{ChannelConfig, HostConfig, Rendition, Role, is_safe_name};
use streaming_core::http::{hsts_layer, text_error};
use streaming_core::ops_auth::{self, OpsGuard};
use streaming_core::rate_limit::RateLimiter;
use streaming_core::token::{TOKEN_TTL_SECS, TokenError, TokenSigner, ViewerClaims, unix_now};
use streaming_hls::{SegmentWindow, Variant, render_master};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::state::{Broadcast, read};

pub const PLAYLIST_TYPE: &str = "application/vnd.apple.mpegurl";
pub const SEGMENT_TYPE: &str = "video/mp2t";

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

/// The media playlist of a rendition, each segment URI carrying the token.
pub fn media_playlist<T>(
    window: &SegmentWindow<T>,
    list_len: usize,
    target_s: u32,
    token: &str,
) -> String {
    window.render(list_len, target_s, |info| {
        format!("{}.ts?t={token}", info.seq)
    })
}

/// `<seq>.ts` with a plain decimal seq; anything else is not a segment name of ours.
pub fn parse_segment_name(file: &str) -> Option<u64> {
    let digits = file.strip_suffix(".ts")?;
    if digits.is_empty() || digits.len() > 19 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn forbidden(e: TokenError) -> Response {
    text_error(StatusCode::FORBIDDEN, e.to_string())
}

fn playlist_response(bc: &Broadcast, body: String) -> Response {
    bc.count_egress(body.len());
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
    playlist_response(&app.bc, body)
}

async fn media_or_segment(
    State(app): State<App>,
    Path((channel, rendition, file)): Path<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let bc = &app.bc;
    let is_playlist = file == "index.m3u8";
    let seq = parse_segment_name(&file);
    if !is_safe_name(&rendition) || (!is_playlist && seq.is_none()) {
        return text_error(StatusCode::NOT_FOUND, "not found");
    }
    let (channel_config, claims) = match admit(bc, &channel, &query) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let state = bc.channel(&channel).and_then(|c| c.rendition(&rendition));
    let (Some(state), true) = (
        state,
        channel_config.ladder.iter().any(|r| r.name == rendition),
    ) else {
        return text_error(StatusCode::NOT_FOUND, "unknown rendition");
    };
    let config = bc.config();
    let timeline = &config.cluster.timeline;
    if let Some(seq) = seq {
        let found = read(&state.window).get(seq).map(|(_, bytes)| bytes.clone());
        let Some(bytes) = found else {
            return text_error(StatusCode::NOT_FOUND, "segment not in the window");
        };
        let cache = format!(
            "private, max-age={}",
            timeline.cache_segments * timeline.segment_seconds
        );
        let length = bytes.len();
        let mut response = (
            [
                (header::CONTENT_TYPE, SEGMENT_TYPE.to_owned()),
                (header::CACHE_CONTROL, cache),
            ],
            segment_body(bc.clone(), claims.viewer, bytes),
        )
            .into_response();
        // A streamed body has no length of its own; players like to know it.
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        return response;
    }
    if config.me().drain {
        // Draining: the viewer's next playlist request moves it (the page and `watch` fail
        // over through an LB on any error; steering players already left by pathway).
        metrics::counter!("broadcast_drain_refusals_total").increment(1);
        let mut r = text_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "broadcast is draining: ask an LB for another one",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        return r;
    }
    let token = renew(&bc.signer(), &claims, &bc.name, unix_now());
    let body = {
        let window = read(&state.window);
        if window.is_empty() {
            None
        } else {
            Some(media_playlist(
                &window,
                timeline.playlist_segments as usize,
                timeline.segment_seconds,
                &token,
            ))
        }
    };
    match body {
        Some(body) => playlist_response(bc, body),
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

/// Chunk size of a segment body: hyper asks for the next chunk only when its write buffer has
/// room, so what we count is close to what the connection really took.
const SEGMENT_CHUNK: usize = 16 * 1024;

/// A segment body counted as it is handed to the connection: each chunk is egress when hyper
/// takes it, and the viewer counts once the last chunk is taken. A client that asks for a segment
/// but does not read it (or closes early) gets no viewer slot and costs at most what its
/// connection buffers hold.
fn segment_body(bc: Arc<Broadcast>, viewer: String, bytes: bytes::Bytes) -> axum::body::Body {
    use futures::StreamExt;
    let total = bytes.len();
    let chunks = total.div_ceil(SEGMENT_CHUNK).max(1);
    // `Bytes::slice`: every chunk still shares the one buffer all viewers get.
    let stream = futures::stream::iter(0..chunks).map(move |i| {
        let end = ((i + 1) * SEGMENT_CHUNK).min(total);
        let chunk = bytes.slice((i * SEGMENT_CHUNK).min(end)..end);
        bc.count_segment_egress(chunk.len());
        if i + 1 == chunks {
            bc.segment_fetched(&viewer);
        }
        Ok::<_, std::convert::Infallible>(chunk)
    });
    axum::body::Body::from_stream(stream)
}

async fn cluster(State(app): State<App>) -> Response {
    let config = app.bc.config();
    let body = serde_json::json!({
        "broadcast": app.bc.name,
        "lbs": config.cluster.lb_urls(),
        "channel": config.cluster.channels.first().map(|c| c.name.clone()),
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

async fn page(State(app): State<App>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return text_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let mut connect = app.bc.allowed_origins();
    connect.retain(|o| !o.is_empty());
    crate::web::serve_uri(&uri, &connect)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use bytes::Bytes;
    use std::time::Duration;
    use streaming_hls::{SegmentInfo, parse_master, parse_media};
    use tower::ServiceExt;

    const KEY: &[u8] = b"test-token-key";

    fn app() -> App {
        app_with(crate::state::test_support::config())
    }

    fn app_with(config: HostConfig) -> App {
        streaming_core::tls::install_crypto_provider();
        let bc = Arc::new(Broadcast::new(
            config,
            TokenSigner::new(KEY),
            "ck".into(),
            reqwest::Client::new(),
        ));
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let ops = Arc::new(OpsGuard::from_config(&bc.config()).unwrap());
        App {
            bc,
            metrics: recorder.handle(),
            ops,
        }
    }

    /// A viewer's address, not one of the cluster's.
    const VIEWER: &str = "203.0.113.7:40000";

    fn fill(app: &App, seqs: std::ops::Range<u64>) {
        fill_with(app, seqs, |seq| Bytes::from(format!("ts-{seq}")));
    }

    fn fill_with(app: &App, seqs: std::ops::Range<u64>, body: impl Fn(u64) -> Bytes) {
        let config = app.bc.config();
        let channel = crate::state::ChannelState::default();
        for r in &config.cluster.channels[0].ladder {
            let state = crate::state::RenditionState::new(&r.name, 12);
            for seq in seqs.clone() {
                let info = SegmentInfo {
                    seq,
                    duration_s: 2.0,
                    discontinuity: false,
                    program_date_time_ms: seq * 2000,
                };
                state.window.write().unwrap().push(info, body(seq)).unwrap();
            }
            *state.last_new.lock().unwrap() = Some(std::time::Instant::now());
            channel
                .renditions
                .write()
                .unwrap()
                .insert(r.name.clone(), Arc::new(state));
        }
        app.bc
            .channels
            .write()
            .unwrap()
            .insert("test".into(), Arc::new(channel));
    }

    fn token(broadcast: &str, channel: &str, viewer: &str, expires: u64) -> String {
        TokenSigner::new(KEY).sign(&ViewerClaims {
            broadcast: broadcast.into(),
            channel: channel.into(),
            viewer: viewer.into(),
            expires,
        })
    }

    async fn get(
        app: &App,
        uri: &str,
        origin: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        get_from(app, uri, origin, VIEWER).await
    }

    async fn get_from(
        app: &App,
        uri: &str,
        origin: Option<&str>,
        peer: &str,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut req = Request::get(uri);
        if let Some(o) = origin {
            req = req.header(header::ORIGIN, o);
        }
        let mut req = req.body(Body::empty()).unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo::<std::net::SocketAddr>(
                peer.parse().unwrap(),
            ));
        let resp = router(app.clone(), None).oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn t_of(uri: &str) -> String {
        uri.split_once("?t=")
            .expect("uri carries a token")
            .1
            .to_owned()
    }

    #[tokio::test]
    async fn playlists_carry_renewed_tokens_in_every_uri() {
        let app = app();
        fill(&app, 100..110);
        let now = unix_now();
        // A token made for another broadcast, close to expiry: accepted, and renewed for us.
        let t = token("broadcast2", "test", "viewer-a", now + 5);
        let (status, headers, body) =
            get(&app, &format!("/live/test/master.m3u8?t={t}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers[header::CONTENT_TYPE], PLAYLIST_TYPE);
        assert_eq!(headers[header::CACHE_CONTROL], "no-cache");
        let variants = parse_master(&body).unwrap();
        // Two renditions on each of the two pathways (us, then broadcast2).
        assert_eq!(variants.len(), 4);
        let signer = TokenSigner::new(KEY);
        for v in &variants {
            let claims = signer.verify(&t_of(&v.uri), now).unwrap();
            assert_eq!(
                (claims.broadcast.as_str(), claims.viewer.as_str()),
                ("broadcast1", "viewer-a")
            );
            assert!(claims.expires >= now + TOKEN_TTL_SECS);
        }
        let media_uri = format!("/live/test/{}", variants[0].uri);
        assert!(media_uri.starts_with("/live/test/360p/index.m3u8?t="));
        let (status, _, body) = get(&app, &media_uri, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let media = parse_media(&body).unwrap();
        // playlist_segments = 6 of the 10 held.
        assert_eq!(media.media_sequence, 104);
        assert_eq!(media.segments.len(), 6);
        for s in &media.segments {
            assert!(s.uri.starts_with(&format!("{}.ts?t=", s.seq)));
            assert_eq!(
                signer.verify(&t_of(&s.uri), now).unwrap().viewer,
                "viewer-a"
            );
        }
        let (status, headers, body) = get(
            &app,
            &format!("/live/test/360p/{}", media.segments[5].uri),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "ts-109");
        assert_eq!(headers[header::CONTENT_TYPE], SEGMENT_TYPE);
        assert_eq!(headers[header::CACHE_CONTROL], "private, max-age=24");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        // One viewer, however many requests.
        assert_eq!(app.bc.status().viewers, 1);
    }

    #[tokio::test]
    async fn bad_tokens_are_refused_with_a_reason() {
        let app = app();
        fill(&app, 1..5);
        let now = unix_now();
        let forged = TokenSigner::new(b"other").sign(&ViewerClaims {
            broadcast: "broadcast1".into(),
            channel: "test".into(),
            viewer: "v".into(),
            expires: now + 100,
        });
        let cases = [
            ("/live/test/master.m3u8".to_owned(), "no token"),
            (format!("/live/test/master.m3u8?t={forged}"), "signature"),
            (
                format!(
                    "/live/test/360p/index.m3u8?t={}",
                    token("broadcast1", "test", "v", now - 1)
                ),
                "expired",
            ),
            (
                format!(
                    "/live/test/360p/1.ts?t={}",
                    token("broadcast1", "other", "v", now + 100)
                ),
                "channel",
            ),
            ("/live/test/360p/1.ts?t=garbage".to_owned(), "malformed"),
        ];
        for (uri, reason) in cases {
            let (status, _, body) = get(&app, &uri, None).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
            assert!(body.contains(reason), "{uri}: {body}");
        }
        assert_eq!(app.bc.status().viewers, 0);
    }

    #[tokio::test]
    async fn unknown_or_unsafe_paths_are_404() {
        let app = app();
        fill(&app, 1..5);
        let t = token("broadcast1", "test", "v", unix_now() + 100);
        for uri in [
            format!("/live/nope/master.m3u8?t={t}"),
            format!("/live/test/720p/index.m3u8?t={t}"),
            format!("/live/test/360p/99.ts?t={t}"),
            format!("/live/test/360p/1.mp4?t={t}"),
            format!("/live/test/360p/-1.ts?t={t}"),
            format!("/live/test/..%2F..%2Fetc/index.m3u8?t={t}"),
            format!("/live/test/other.m3u8?t={t}"),
            "/no-such-file.js".to_owned(),
        ] {
            let (status, _, _) = get(&app, &uri, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        }
    }

    #[tokio::test]
    async fn cors_only_for_cluster_origins() {
        let app = app();
        fill(&app, 1..5);
        let t = token("broadcast1", "test", "v", unix_now() + 100);
        let uri = format!("/live/test/360p/index.m3u8?t={t}");
        let (_, headers, _) = get(&app, &uri, Some("https://127.79.2.2:8443")).await;
        assert_eq!(
            headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://127.79.2.2:8443"
        );
        let (_, headers, _) = get(&app, "/api/cluster", Some("https://127.79.1.1:8443")).await;
        assert_eq!(
            headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://127.79.1.1:8443"
        );
        let (_, headers, _) = get(&app, &uri, Some("https://evil.example")).await;
        assert!(headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }

    #[tokio::test]
    async fn page_has_strict_csp_and_types() {
        let app = app();
        let (status, headers, body) = get(&app, "/?t=x&channel=test", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("hls.min.js"));
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("script-src 'self';"));
        assert!(csp.contains("frame-ancestors 'none'"));
        assert!(csp.contains("connect-src 'self' "));
        for origin in [
            "https://127.79.1.1:8443",
            "https://127.79.1.2:8443",
            "https://127.79.2.2:8443",
        ] {
            assert!(csp.contains(origin), "{csp}");
        }
        assert!(
            !csp.contains("127.79.4.1"),
            "ingests are not for browsers: {csp}"
        );
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let (status, headers, _) = get(&app, "/app.js", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let (_, headers, _) = get(&app, "/app.css", None).await;
        assert_eq!(headers[header::CONTENT_TYPE], "text/css; charset=utf-8");
        let (status, _, _) = get(&app, "/vendor/hls.js/hls.min.js", None).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// Egress meters that started 10 s ago, so rates are averaged over their full window
    /// whatever the test's timing.
    fn meters_with_history(app: &App) {
        let now = std::time::Instant::now();
        let start = now.checked_sub(Duration::from_secs(10)).unwrap_or(now);
        *app.bc.egress.lock().unwrap() = crate::viewers::EgressMeter::new(start);
        *app.bc.segment_egress.lock().unwrap() = crate::viewers::EgressMeter::new(start);
    }

    /// The status including the current second of egress.
    fn status_now(app: &App) -> streaming_core::status::BroadcastStatus {
        app.bc
            .status_at(std::time::Instant::now() + Duration::from_secs(1))
    }

    #[tokio::test]
    async fn playlist_fetchers_are_no_viewers_and_cost_no_capacity() {
        let app = app();
        fill(&app, 1..5);
        meters_with_history(&app);
        let before = status_now(&app);
        // Top rendition (800 + 96) kbit/s × 1.1 = 985.6 kbit/s; 80 Mbit/s usable -> 81 viewers.
        assert_eq!((before.viewers, before.free_viewers), (0, 81));
        let now = unix_now();
        for i in 0..1000 {
            let t = token("broadcast1", "test", &format!("fake-{i}"), now + 100);
            let (status, _, body) = get(&app, &format!("/live/test/master.m3u8?t={t}"), None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let (status, _, body) =
                get(&app, &format!("/live/test/360p/index.m3u8?t={t}"), None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        let during = status_now(&app);
        assert!(during.egress_mbps > 0.0, "playlists were sent: {during:?}");
        assert_eq!(during.segment_egress_mbps, 0.0);
        assert_eq!((during.viewers, during.free_viewers), (0, 81));
        assert_eq!(app.bc.viewers.lock().unwrap().tracked(), 0);
        // One real viewer downloading a segment counts.
        let t = token("broadcast1", "test", "real", now + 100);
        let (status, _, body) = get(&app, &format!("/live/test/360p/3.ts?t={t}"), None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ts-3"));
        let after = status_now(&app);
        assert_eq!((after.viewers, after.free_viewers), (1, 80));
    }

    #[tokio::test]
    async fn capacity_follows_measured_segment_egress() {
        let app = app();
        // 1 MB (8 Mbit) segments.
        fill_with(&app, 1..12, |seq| Bytes::from(vec![seq as u8; 1_000_000]));
        meters_with_history(&app);
        let t = token("broadcast1", "test", "v", unix_now() + 100);
        for seq in 1..11 {
            let (status, headers, body) =
                get(&app, &format!("/live/test/360p/{seq}.ts?t={t}"), None).await;
            assert_eq!((status, body.len()), (StatusCode::OK, 1_000_000));
            assert_eq!(headers[header::CONTENT_LENGTH], "1000000");
        }
        let s = status_now(&app);
        // 80 Mbit over the 5 s window: 16 Mbit/s; (80 - 16) Mbit/s / 985.6 kbit/s = 64.9.
        assert!((s.segment_egress_mbps - 16.0).abs() < 1e-9, "{s:?}");
        assert!(s.egress_mbps >= s.segment_egress_mbps);
        // One counted viewer alone would leave 80: the measured egress binds.
        assert_eq!((s.viewers, s.free_viewers), (1, 64));
    }

    #[tokio::test]
    async fn a_segment_not_read_to_the_end_makes_no_viewer() {
        use futures::StreamExt;
        let app = app();
        fill_with(&app, 1..3, |_| Bytes::from(vec![0u8; 100_000]));
        meters_with_history(&app);
        let t = token("broadcast1", "test", "v", unix_now() + 100);
        let response = router(app.clone(), None)
            .oneshot(
                Request::get(format!("/live/test/360p/1.ts?t={t}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert_eq!(first.len(), SEGMENT_CHUNK);
        // The client goes away after the first chunk.
        drop(body);
        let s = status_now(&app);
        assert_eq!(s.viewers, 0);
        let sent_mbit = SEGMENT_CHUNK as f64 * 8.0 / 1e6;
        assert!(
            (s.segment_egress_mbps * 5.0 - sent_mbit).abs() < 1e-9,
            "{s:?}"
        );
    }

    #[tokio::test]
    async fn cluster_info_status_and_health() {
        let app = app();
        let (status, _, body) = get(&app, "/healthz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let (_, _, body) = get(&app, "/api/cluster", None).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["broadcast"], "broadcast1");
        assert_eq!(v["channel"], "test");
        // Each LB by its own URL, not the site name: clients try them in turn.
        assert_eq!(
            v["lbs"],
            serde_json::json!(["https://127.79.1.1:8443", "https://127.79.1.2:8443"])
        );
        fill(&app, 1..5);
        let (status, _, _) = get(&app, "/healthz", None).await;
        assert_eq!(status, StatusCode::OK);
        // Viewers see neither status nor metrics (ingest URLs, errors); the LBs poll it.
        for uri in ["/status", "/metrics"] {
            let (status, headers, body) = get(&app, uri, None).await;
            assert_eq!(
                (status, body.as_str()),
                (StatusCode::FORBIDDEN, "forbidden\n")
            );
            assert_eq!(
                headers[header::STRICT_TRANSPORT_SECURITY],
                "max-age=31536000"
            );
        }
        let (status, _, body) = get_from(&app, "/status", None, "127.79.1.1:40000").await;
        assert_eq!(status, StatusCode::OK);
        let s: streaming_core::status::BroadcastStatus = serde_json::from_str(&body).unwrap();
        assert!(s.live && !s.draining);
        assert_eq!(s.uplink_mbps, 100);
        // Top rendition (800 + 96) kbit/s × 1.1 = 985.6 kbit/s; 80 Mbit/s usable -> 81 viewers.
        assert_eq!(s.free_viewers, 81);
    }

    #[tokio::test]
    async fn master_offers_every_broadcast_as_a_steering_pathway() {
        let app = app();
        fill(&app, 100..110);
        let t = token("broadcast1", "test", "viewer-a", unix_now() + 60);
        let (status, _, body) = get(&app, &format!("/live/test/master.m3u8?t={t}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body.contains(
                "#EXT-X-CONTENT-STEERING:SERVER-URI=\"https://127.79.2.1:8443/steering?channel=test\",PATHWAY-ID=\"broadcast1\"\n"
            ),
            "{body}"
        );
        let infs: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("#EXT-X-STREAM-INF:"))
            .collect();
        assert_eq!(infs.len(), 4);
        assert!(
            infs[..2]
                .iter()
                .all(|l| l.ends_with(",PATHWAY-ID=\"broadcast1\""))
        );
        assert!(
            infs[2..]
                .iter()
                .all(|l| l.ends_with(",PATHWAY-ID=\"broadcast2\""))
        );
        // The parser `watch` uses still reads it: ours first (relative), best first per pathway.
        let variants = parse_master(&body).unwrap();
        let uris: Vec<&str> = variants
            .iter()
            .map(|v| v.uri.split('?').next().unwrap())
            .collect();
        assert_eq!(
            uris,
            [
                "360p/index.m3u8",
                "144p/index.m3u8",
                "https://127.79.2.2:8443/live/test/360p/index.m3u8",
                "https://127.79.2.2:8443/live/test/144p/index.m3u8"
            ]
        );
        assert_eq!(variants[0].bandwidth, variants[2].bandwidth);
        // Every pathway's URI carries the same renewed token, which broadcast2 accepts too.
        let signer = TokenSigner::new(KEY);
        for v in &variants {
            assert_eq!(
                signer.verify(&t_of(&v.uri), unix_now()).unwrap().viewer,
                "viewer-a"
            );
        }
        // Our page fails over by itself and asks for the plain master.
        let (_, _, body) = get(
            &app,
            &format!("/live/test/master.m3u8?t={t}&steering=0"),
            None,
        )
        .await;
        assert!(
            !body.contains("STEERING") && !body.contains("PATHWAY-ID"),
            "{body}"
        );
        assert_eq!(parse_master(&body).unwrap().len(), 2);
    }

    #[test]
    fn steering_plan_skips_draining_broadcasts() {
        let mut config = crate::state::test_support::config();
        let plan = steering_plan(&config, "test").unwrap();
        assert_eq!(plan.first, "broadcast1");
        assert_eq!(
            plan.pathways,
            [
                ("broadcast1".to_owned(), None),
                (
                    "broadcast2".to_owned(),
                    Some("https://127.79.2.2:8443".to_owned())
                )
            ]
        );
        // The steering server is ours, whichever LB is up: we ask them in turn.
        assert_eq!(
            plan.server_uri,
            "https://127.79.2.1:8443/steering?channel=test"
        );
        // Draining ourselves: the player starts on (and is steered to) another pathway.
        for h in &mut config.cluster.hosts {
            if h.name == "broadcast1" {
                h.drain = true;
            }
        }
        let plan = steering_plan(&config, "test").unwrap();
        assert_eq!(plan.first, "broadcast2");
        assert_eq!(plan.pathways.len(), 1);
        // Everything draining: still a playable master (ours).
        for h in &mut config.cluster.hosts {
            h.drain = true;
        }
        let plan = steering_plan(&config, "test").unwrap();
        assert_eq!(plan.pathways, [("broadcast1".to_owned(), None)]);
    }

    #[tokio::test]
    async fn draining_moves_viewers_at_their_next_playlist_request() {
        let app = app();
        fill(&app, 100..110);
        let t = token("broadcast1", "test", "v", unix_now() + 60);
        let mut config = (*app.bc.config()).clone();
        for h in &mut config.cluster.hosts {
            h.drain = h.name == "broadcast1";
        }
        app.bc.replace(
            config,
            TokenSigner::new(KEY),
            "ck".into(),
            reqwest::Client::new(),
        );
        let (status, headers, body) =
            get(&app, &format!("/live/test/360p/index.m3u8?t={t}"), None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers[header::RETRY_AFTER], "2");
        assert!(body.contains("draining"), "{body}");
        // A segment already listed is still served (the download in flight completes).
        let (status, _, body) = get(&app, &format!("/live/test/360p/105.ts?t={t}"), None).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ts-105"));
        assert!(app.bc.status().draining);
        // The master steers to the others only.
        let (_, _, body) = get(&app, &format!("/live/test/master.m3u8?t={t}"), None).await;
        assert!(
            body.contains("PATHWAY-ID=\"broadcast2\"") && !body.contains("\"broadcast1\""),
            "{body}"
        );
    }

    #[test]
    fn segment_names() {
        assert_eq!(parse_segment_name("882000000.ts"), Some(882_000_000));
        for bad in [
            "",
            ".ts",
            "+1.ts",
            "1.ts.ts",
            "99999999999999999999.ts",
            "1",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn steering_skips_a_hung_lb_and_answers_when_none_is_left() {
        // lb1 hung (the kernel completes the handshake, nobody answers: SIGSTOP), lb2 dead.
        let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let mut config = crate::state::test_support::config();
        for h in &mut config.cluster.hosts {
            match h.name.as_str() {
                "lb1" => h.url = format!("http://{}", hung.local_addr().unwrap()),
                "lb2" => h.url = format!("http://127.0.0.1:{dead_port}"),
                _ => {}
            }
        }
        let app = app_with(config);
        let (status, _, _) = get(&app, "/steering?channel=nope", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let t0 = std::time::Instant::now();
        let (status, headers, body) =
            get(&app, "/steering?channel=test&_HLS_pathway=broadcast1", None).await;
        let took = t0.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(headers[header::RETRY_AFTER], "2");
        // The hung LB cost one attempt, the dead one nothing: bounded, whatever the LBs do.
        eprintln!("no LB answered after {took:?}");
        assert!(
            took >= crate::steering::LB_ATTEMPT
                && took < crate::steering::LB_ATTEMPT * 2 + Duration::from_secs(2),
            "{took:?}"
        );
    }
}
