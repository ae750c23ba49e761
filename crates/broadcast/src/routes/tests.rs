//! The routes through a real router: tokens, limits, headers, what each path answers.

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
const INIT: &str = "init-00112233aabbccdd.mp4";

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
                map: Some(INIT.to_owned()),
                parts: Vec::new(),
            };
            let mut media = state.media.write().unwrap();
            media.add_init(INIT, Bytes::from_static(b"init"));
            media.push(info, body(seq)).unwrap();
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
    send(app, req.body(Body::empty()).unwrap(), peer).await
}

/// Sends `req` from `peer` through the router: status, headers and body as text.
async fn send(
    app: &App,
    mut req: Request<Body>,
    peer: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
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
    let (status, headers, body) = get(&app, &format!("/live/test/master.m3u8?t={t}"), None).await;
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
        assert!(s.uri.starts_with(&format!("{}.m4s?t=", s.seq)));
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
    // The init segment is named once, carries the token too, and needs it.
    let map = media.segments[0].map.clone().unwrap();
    assert!(map.starts_with(&format!("{INIT}?t=")), "{map}");
    assert_eq!(media.segments[5].map.as_deref(), Some(map.as_str()));
    let (status, headers, init) = get(&app, &format!("/live/test/360p/{map}"), None).await;
    assert_eq!((status, init.as_str()), (StatusCode::OK, "init"));
    assert_eq!(headers[header::CONTENT_TYPE], SEGMENT_TYPE);
    let (status, _, _) = get(&app, &format!("/live/test/360p/{INIT}"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = get(
        &app,
        &format!("/live/test/360p/init-ffffffffffffffff.mp4?t={}", t_of(&map)),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
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
                "/live/test/360p/1.m4s?t={}",
                token("broadcast1", "other", "v", now + 100)
            ),
            "channel",
        ),
        ("/live/test/360p/1.m4s?t=garbage".to_owned(), "malformed"),
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
        format!("/live/test/360p/99.m4s?t={t}"),
        format!("/live/test/360p/1.mp4?t={t}"),
        format!("/live/test/360p/-1.m4s?t={t}"),
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
    // The front page is the first channel's page, token kept.
    let (status, headers, _) = get(&app, "/?t=a.b-c_d&channel=test", None).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers[header::LOCATION], "/live/test/?t=a.b-c_d");
    let (status, headers, _) = get(&app, "/?t=%3Cx%3E", None).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(headers[header::LOCATION], "/live/test/");
    assert_eq!(
        get(&app, "/?channel=nope", None).await.0,
        StatusCode::NOT_FOUND
    );
    let (status, headers, body) = get(&app, "/live/test/?t=x", None).await;
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
    // The page's assets are absolute: it is served at /live/<channel>/.
    assert!(body.contains("src=\"/app.js\""), "{body}");
    assert_eq!(
        get(&app, "/live/nope/", None).await.0,
        StatusCode::NOT_FOUND
    );
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
        let (status, _, body) = get(&app, &format!("/live/test/360p/index.m3u8?t={t}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let during = status_now(&app);
    assert!(during.egress_mbps > 0.0, "playlists were sent: {during:?}");
    assert_eq!(during.segment_egress_mbps, 0.0);
    assert_eq!((during.viewers, during.free_viewers), (0, 81));
    assert_eq!(app.bc.viewers.lock().unwrap().tracked(), 0);
    // One real viewer downloading a segment counts.
    let t = token("broadcast1", "test", "real", now + 100);
    let (status, _, body) = get(&app, &format!("/live/test/360p/3.m4s?t={t}"), None).await;
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
            get(&app, &format!("/live/test/360p/{seq}.m4s?t={t}"), None).await;
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
            Request::get(format!("/live/test/360p/1.m4s?t={t}"))
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
    assert_eq!(
        v["channels"],
        serde_json::json!([{"name": "test", "live": false}])
    );
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
    let (status, _, body) = get(&app, &format!("/live/test/360p/105.m4s?t={t}"), None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ts-105"));
    assert!(app.bc.status().draining);
    // The master steers to the others only.
    let (_, _, body) = get(&app, &format!("/live/test/master.m3u8?t={t}"), None).await;
    assert!(
        body.contains("PATHWAY-ID=\"broadcast2\"") && !body.contains("\"broadcast1\""),
        "{body}"
    );
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

/// Shows the parts made so far of segment `seq` (after the filled window) in every rendition.
fn show_parts(app: &App, seq: u64, parts: &[&'static [u8]]) {
    let channel = app.bc.channel("test").unwrap();
    for r in channel.renditions.read().unwrap().values() {
        *r.part_target_s.lock().unwrap() = Some(0.4);
        let info = SegmentInfo {
            seq,
            duration_s: 0.4 * parts.len() as f64,
            discontinuity: false,
            program_date_time_ms: seq * 2000,
            map: Some(INIT.to_owned()),
            parts: parts
                .iter()
                .enumerate()
                .map(|(i, p)| streaming_hls::PartInfo {
                    duration_s: 0.4,
                    independent: i == 0,
                    len: p.len(),
                })
                .collect(),
        };
        let building = streaming_hls::Building {
            info,
            parts: parts.iter().map(|p| Bytes::from_static(p)).collect(),
        };
        r.media.write().unwrap().set_building(Some(building));
    }
    channel.published.announce();
}

#[tokio::test]
async fn low_latency_requests_wait_for_the_part_they_ask_for() {
    let app = app();
    fill(&app, 100..110);
    show_parts(&app, 110, &[b"p0"]);
    let t = token("broadcast1", "test", "viewer-a", unix_now() + 60);
    let playlist = format!("/live/test/360p/index.m3u8?t={t}");
    let (status, _, body) = get(&app, &playlist, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let parsed = parse_media(&body).unwrap();
    let low = &parsed.low_latency;
    assert_eq!(low.part_target_s, Some(0.4));
    let last = low.parts.last().unwrap();
    assert_eq!((last.seq, last.index), (110, 0));
    assert!(last.uri.starts_with("110.0.m4s?t="), "{body}");
    let hint = low.preload_hint.clone().unwrap();
    assert!(hint.starts_with("110.1.m4s?t="), "{body}");
    assert_eq!(
        body.matches("#EXT-X-RENDITION-REPORT:").count(),
        app.bc.config().cluster.channels[0].ladder.len() - 1,
        "{body}"
    );
    // A blocking reload for part 1 and the hinted part itself wait until part 1 exists.
    let ask = |uri: String| {
        let app = app.clone();
        tokio::spawn(async move { get(&app, &uri, None).await })
    };
    let blocking = ask(format!(
        "/live/test/360p/index.m3u8?_HLS_msn=110&_HLS_part=1&t={t}"
    ));
    let hinted = ask(format!("/live/test/360p/{hint}"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocking.is_finished() && !hinted.is_finished());
    show_parts(&app, 110, &[b"p0", b"p1"]);
    let (status, _, body) = blocking.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let parts = parse_media(&body).unwrap().low_latency.parts;
    assert!(parts.iter().any(|p| (p.seq, p.index) == (110, 1)), "{body}");
    let (status, headers, part) = hinted.await.unwrap();
    assert_eq!((status, part.as_str()), (StatusCode::OK, "p1"));
    assert_eq!(headers[header::CONTENT_TYPE], SEGMENT_TYPE);
    // Asking too far ahead, or for a part without its segment, is a client error.
    for bad in ["_HLS_msn=113&_HLS_part=0", "_HLS_part=1"] {
        let (status, _, _) = get(&app, &format!("{playlist}&{bad}"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

async fn post(app: &App, uri: &str, body: &[u8]) -> (StatusCode, String) {
    let req = Request::post(uri)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(body.to_vec()))
        .unwrap();
    let (status, _, body) = send(app, req, VIEWER).await;
    (status, body)
}

#[tokio::test]
async fn player_reports_count_only_from_viewers_bounded_and_spaced() {
    let app = app();
    fill(&app, 1..5);
    let report = br#"{"watch_s": 10, "stall_s": 0.5, "latency_s": 3.2}"#;
    let t = token("broadcast1", "test", "v", unix_now() + 100);
    let uri = format!("/api/player?t={t}");
    // A token alone is no viewer.
    let (status, body) = post(&app, &uri, report).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(body.contains("viewers"), "{body}");
    let (status, _, _) = get(&app, &format!("/live/test/360p/3.m4s?t={t}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(post(&app, &uri, report).await.0, StatusCode::NO_CONTENT);
    // At most one per REPORT_EVERY.
    assert_eq!(
        post(&app, &uri, report).await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Forged, garbage, out of bounds, too big.
    let forged = format!("/api/player?t={}x", t);
    assert_eq!(post(&app, &forged, report).await.0, StatusCode::FORBIDDEN);
    let (status, body) = post(&app, &uri, br#"{"watch_s": 1e9, "stall_s": 0}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        post(&app, &uri, b"<script>").await.0,
        StatusCode::BAD_REQUEST
    );
    let huge = vec![b' '; 64 * 1024];
    assert_eq!(
        post(&app, &uri, &huge).await.0,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}
