//! The LB's routes through a real router: assignment, redirects, tokens, limits.

use super::*;
use axum::body::Body;
use axum::http::Request;
use streaming_core::status::BroadcastStatus;
use tower::ServiceExt;

const KEY: &[u8] = b"k";

fn config() -> HostConfig {
    use streaming_core::fixture::{host, host_config};
    let mut hosts = vec![
        host("lb1", "lb", "127.79.1.1"),
        host("broadcast1", "broadcast", "127.79.2.1"),
        host("broadcast2", "broadcast", "127.79.2.2"),
    ];
    for h in &mut hosts[1..] {
        h["uplink_mbps"] = 100.into();
    }
    let mut json = host_config("lb1", hosts);
    json["cluster"]["site"] = "s".into();
    json["cluster"]["site_urls"] = serde_json::json!(["https://127.79.1.1:8443"]);
    serde_json::from_value(json).unwrap()
}

fn app(free: &[(&str, u64)]) -> App {
    streaming_core::tls::install_crypto_provider();
    let health = Arc::new(Health::default());
    for (name, free) in free {
        let status = BroadcastStatus {
            name: name.to_string(),
            viewers: 100u64.saturating_sub(*free),
            egress_mbps: 0.0,
            segment_egress_mbps: 0.0,
            uplink_mbps: 100,
            free_viewers: *free,
            live: true,
            draining: false,
            channel_viewers: Default::default(),
            live_channels: vec!["test".into()],
            origins: Default::default(),
        };
        health.record(name, Ok(status), Instant::now());
    }
    let current = Current {
        config: Arc::new(config()),
        signer: TokenSigner::new(KEY),
        client: reqwest::Client::new(),
    };
    App {
        current: Arc::new(RwLock::new(current)),
        health,
        metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle(),
        ops: Arc::new(OpsGuard::from_config(&config()).unwrap()),
        assign_rate: Arc::new(RateLimiter::new(
            "assign",
            streaming_core::config::RateLimit {
                burst: 20,
                per_minute: 1,
            },
        )),
    }
}

/// A viewer's address, not one of the cluster's.
const VIEWER: &str = "203.0.113.7:40000";

async fn get(app: &App, uri: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    get_from(app, uri, VIEWER, &[]).await
}

async fn get_from(
    app: &App,
    uri: &str,
    peer: &str,
    headers: &[(header::HeaderName, &str)],
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut request = Request::get(uri);
    for (name, value) in headers {
        request = request.header(name, *value);
    }
    let mut request = request.body(Body::empty()).unwrap();
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo::<std::net::SocketAddr>(
            peer.parse().unwrap(),
        ));
    let resp = router(app.clone()).oneshot(request).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn claims_of(location: &str) -> ViewerClaims {
    let t = location
        .split("t=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    TokenSigner::new(KEY).verify(t, unix_now()).unwrap()
}

#[tokio::test]
async fn redirects_carry_a_token_for_the_chosen_broadcast() {
    // broadcast1 is full: broadcast2 is the only choice.
    let app = app(&[("broadcast1", 0), ("broadcast2", 50)]);
    let (status, headers, _) = get(&app, "/live/test/master.m3u8").await;
    assert_eq!(status, StatusCode::FOUND);
    let loc = headers[header::LOCATION].to_str().unwrap();
    assert!(
        loc.starts_with("https://127.79.2.2:8443/live/test/master.m3u8?t="),
        "{loc}"
    );
    let claims = claims_of(loc);
    assert_eq!(
        (claims.broadcast.as_str(), claims.channel.as_str()),
        ("broadcast2", "test")
    );

    let (status, headers, _) = get(&app, "/").await;
    assert_eq!(status, StatusCode::FOUND);
    let loc = headers[header::LOCATION].to_str().unwrap();
    assert!(
        loc.starts_with("https://127.79.2.2:8443/live/test/?t="),
        "{loc}"
    );
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    // A channel's own address on the LB, and one that does not exist.
    let (status, headers, _) = get(&app, "/live/test/").await;
    assert_eq!(status, StatusCode::FOUND);
    let loc = headers[header::LOCATION].to_str().unwrap();
    assert!(
        loc.starts_with("https://127.79.2.2:8443/live/test/?t="),
        "{loc}"
    );
    assert_eq!(get(&app, "/live/nope/").await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn stats_sum_the_viewers_of_answering_broadcasts() {
    let both = app(&[("broadcast1", 5), ("broadcast2", 50)]);
    let (status, headers, body) = get(&both, "/api/stats").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["viewers"].as_u64(), v["broadcasts"].as_u64()),
        (Some(145), Some(2))
    );
    // 100 Mbit/s each, 0.99 Mbit/s top rendition: 81 viewers each under the 80 % rule.
    let h = &v["headroom"];
    assert_eq!(
        (h["capacity"].as_u64(), h["free"].as_i64()),
        (Some(162), Some(17))
    );
    // Either one down (equal: the first by name), the other cannot take 145 viewers.
    assert_eq!(
        h["without_largest"],
        serde_json::json!({"name": "broadcast1", "capacity": 81, "free": -64, "holds": false})
    );
    let silent = app(&[("broadcast1", 5)]);
    let (_, _, body) = get(&silent, "/api/stats").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["viewers"].as_u64(), v["broadcasts"].as_u64()),
        (Some(95), Some(1))
    );
    assert_eq!(v["headroom"]["free"].as_i64(), Some(81 - 95));
    assert!(v["headroom"]["without_largest"].is_null());
}

#[tokio::test]
async fn valid_token_is_sticky_and_keeps_the_viewer_id() {
    let app = app(&[("broadcast1", 5), ("broadcast2", 50)]);
    let t = TokenSigner::new(KEY).sign(&ViewerClaims {
        broadcast: "broadcast1".into(),
        channel: "test".into(),
        viewer: "me".into(),
        expires: unix_now() + 60,
    });
    let (_, headers, _) = get(&app, &format!("/live/test/master.m3u8?t={t}")).await;
    let claims = claims_of(headers[header::LOCATION].to_str().unwrap());
    assert_eq!(
        (claims.broadcast.as_str(), claims.viewer.as_str()),
        ("broadcast1", "me")
    );
    // Excluding it (player failover) moves the same viewer elsewhere.
    let (status, headers, body) = get_from(
        &app,
        &format!("/api/assign?channel=test&exclude=broadcast1&t={t}"),
        VIEWER,
        &[(header::ORIGIN, "https://127.79.2.1:8443")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // The broadcast's page (after a failover) may ask; nobody else's.
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://127.79.2.1:8443"
    );
    assert_eq!(
        headers[header::STRICT_TRANSPORT_SECURITY],
        "max-age=31536000"
    );
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    let a: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(a["broadcast"], "broadcast2");
    assert_eq!(a["base_url"], "https://127.79.2.2:8443");
    let claims = TokenSigner::new(KEY)
        .verify(a["token"].as_str().unwrap(), unix_now())
        .unwrap();
    assert_eq!(claims.viewer, "me");
    // A forged token is just a new assignment with a new viewer id.
    let forged = TokenSigner::new(b"evil").sign(&ViewerClaims {
        viewer: "me".into(),
        ..claims
    });
    let (status, headers, _) = get(&app, &format!("/live/test/master.m3u8?t={forged}")).await;
    assert_eq!(status, StatusCode::FOUND);
    assert_ne!(
        claims_of(headers[header::LOCATION].to_str().unwrap()).viewer,
        "me"
    );
}

#[tokio::test]
async fn bursts_spread_before_the_next_poll_but_do_not_fill_the_cluster() {
    let app = app(&[("broadcast1", 10), ("broadcast2", 16)]);
    let free = |body: String| -> Vec<(Option<bool>, Option<u64>)> {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["broadcasts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["eligible"].as_bool(), b["free_viewers"].as_u64()))
            .collect()
    };
    // One new viewer: one slot fewer on the broadcast it went to, before any poll shows it.
    let (_, _, body) = get(&app, "/api/assign").await;
    let a: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (_, _, body) = get_from(&app, "/status", "127.79.1.1:5000", &[]).await;
    let expected = if a["broadcast"] == "broadcast1" {
        [(Some(true), Some(9)), (Some(true), Some(16))]
    } else {
        [(Some(true), Some(10)), (Some(true), Some(15))]
    };
    assert_eq!(free(body), expected);
    // Assignments nobody uses (fake viewers, here from a thousand addresses, past the
    // per-address rate limit) take at most half the reported room: the cluster stays open
    // until the broadcasts themselves report it full.
    for n in 0..1000 {
        let peer = format!("198.51.{}.{}:40000", 100 + n / 250, n % 250 + 1);
        let status = get_from(&app, "/api/assign", &peer, &[]).await.0;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, _, body) = get_from(&app, "/status", "127.79.1.1:5000", &[]).await;
    assert_eq!(free(body), [(Some(true), Some(5)), (Some(true), Some(8))]);
}

#[tokio::test]
async fn a_full_cluster_says_so() {
    let app = app(&[("broadcast1", 0), ("broadcast2", 0)]);
    let (status, headers, body) = get(&app, "/api/assign").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[header::RETRY_AFTER], "5");
    assert!(body.contains("no healthy broadcast"));
    let (status, headers, body) = get(&app, "/").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(body.contains("Cluster full"));
    let (status, _, body) = get(&app, "/live/test/master.m3u8").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("cluster full"));
}

#[tokio::test]
async fn unknown_channel_is_404() {
    let app = app(&[("broadcast1", 5)]);
    for uri in [
        "/live/nope/master.m3u8",
        "/?channel=nope",
        "/api/assign?channel=..",
        "/live/test/index.m3u8",
    ] {
        assert_eq!(get(&app, uri).await.0, StatusCode::NOT_FOUND, "{uri}");
    }
}

use crate::assign::tests::c as cand;

#[test]
fn steering_keeps_the_current_pathway_while_eligible() {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let cands = [
        cand("broadcast1", true, 5),
        cand("broadcast2", true, 50),
        cand("broadcast3", false, 500),
        cand("broadcast4", true, 20),
    ];
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let order = pathway_priority(&cands, Some("broadcast1"), &mut rng);
    assert_eq!(order[0], "broadcast1");
    assert_eq!(sorted(order), ["broadcast1", "broadcast2", "broadcast4"]);
    // The current one died, hung or drains: it is left out, and who leads is drawn in
    // proportion to free capacity (broadcast2: 50 of 75).
    let mut leads = HashMap::<String, u32>::new();
    for _ in 0..3000 {
        let order = pathway_priority(&cands, Some("broadcast3"), &mut rng);
        assert_eq!(
            sorted(order.clone()),
            ["broadcast1", "broadcast2", "broadcast4"]
        );
        *leads.entry(order[0].clone()).or_default() += 1;
    }
    for (name, expected) in [
        ("broadcast1", 200),
        ("broadcast2", 2000),
        ("broadcast4", 800),
    ] {
        let n = leads[name];
        assert!(n.abs_diff(expected) * 5 <= expected, "{name}: {leads:?}");
    }
    // Nothing eligible: stay put rather than jump to a dead broadcast.
    let dead = [cand("broadcast1", false, 0), cand("broadcast2", false, 0)];
    assert_eq!(
        pathway_priority(&dead, Some("broadcast2"), &mut rng),
        ["broadcast2"]
    );
    assert_eq!(
        pathway_priority(&dead, Some("nope"), &mut rng),
        ["broadcast1", "broadcast2"]
    );
    let m = steering_manifest(&cands, Some("broadcast4"), &mut rng);
    assert_eq!(m["VERSION"], 1);
    assert_eq!(m["TTL"], STEERING_TTL_SECS);
    assert_eq!(m["PATHWAY-PRIORITY"][0], "broadcast4");
}

#[tokio::test]
async fn steering_endpoint_serves_the_manifest() {
    // broadcast2 never answered a poll: not a pathway to go to.
    let app = app(&[("broadcast1", 5)]);
    let (status, headers, body) = get(
        &app,
        "/steering?channel=test&_HLS_pathway=broadcast2&_HLS_throughput=1000",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"VERSION": 1, "TTL": 10, "PATHWAY-PRIORITY": ["broadcast1"]})
    );
    assert_eq!(
        get(&app, "/steering?channel=nope").await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn tokens_from_the_other_lb_are_sticky_too() {
    // Both LBs sign with the shared token key: lb2's token keeps the viewer at lb1.
    let app = app(&[("broadcast1", 5), ("broadcast2", 50)]);
    let from_lb2 = TokenSigner::new(KEY).sign(&ViewerClaims {
        broadcast: "broadcast1".into(),
        channel: "test".into(),
        viewer: "v2".into(),
        expires: unix_now() + 60,
    });
    let (_, _, body) = get(&app, &format!("/api/assign?channel=test&t={from_lb2}")).await;
    let a: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(a["broadcast"], "broadcast1");
    let claims = TokenSigner::new(KEY)
        .verify(a["token"].as_str().unwrap(), unix_now())
        .unwrap();
    assert_eq!(claims.viewer, "v2");
}

#[tokio::test]
async fn assign_answers_only_cluster_origins() {
    let app = app(&[("broadcast1", 50)]);
    for origin in ["https://evil.example", "null", "https://127.79.3.1:8443"] {
        let (status, headers, _) = get_from(
            &app,
            "/api/assign?channel=test",
            VIEWER,
            &[(header::ORIGIN, origin)],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers.get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none(),
            "{origin}"
        );
    }
    let (_, headers, _) = get_from(
        &app,
        "/api/assign",
        VIEWER,
        &[(header::ORIGIN, "https://127.79.1.1:8443")],
    )
    .await;
    assert_eq!(
        headers[header::ACCESS_CONTROL_ALLOW_ORIGIN],
        "https://127.79.1.1:8443"
    );
}

#[tokio::test]
async fn one_address_cannot_mint_viewers_without_limit() {
    let app = app(&[("broadcast1", 10_000)]);
    let mut statuses = Vec::new();
    for uri in ["/api/assign", "/", "/live/test/master.m3u8"]
        .iter()
        .cycle()
        .take(21)
    {
        statuses.push(get(&app, uri).await.0);
    }
    assert!(
        statuses[..20]
            .iter()
            .all(|s| *s != StatusCode::TOO_MANY_REQUESTS)
    );
    let (status, headers, _) = get(&app, "/api/assign").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(headers.contains_key(header::RETRY_AFTER));
    assert_eq!(statuses[20], StatusCode::TOO_MANY_REQUESTS);
    // Another address is not affected; the steering manifest is not limited.
    let (status, _, _) = get_from(&app, "/api/assign", "198.51.100.1:1", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(get(&app, "/steering?channel=test").await.0, StatusCode::OK);
}

#[tokio::test]
async fn status_and_metrics_only_for_cluster_hosts_or_the_token() {
    let app = app(&[("broadcast1", 5)]);
    for uri in ["/status", "/metrics"] {
        let (status, _, body) = get(&app, uri).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
        assert_eq!(body, "forbidden\n");
        let (status, _, _) = get_from(&app, uri, "127.79.2.1:5000", &[]).await;
        assert_eq!(status, StatusCode::OK, "{uri} from broadcast1");
    }
    let (status, _, body) = get(&app, "/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("127.79"), "{body}");
}

#[tokio::test]
async fn status_lists_every_broadcast() {
    let app = app(&[("broadcast1", 5)]);
    let (status, _, body) = get_from(&app, "/status", "127.79.1.1:5000", &[]).await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["broadcasts"][0]["eligible"], true);
    assert_eq!(v["broadcasts"][1]["eligible"], false);
    assert_eq!(v["broadcasts"][1]["reason"], "no fresh status");
    assert_eq!(get(&app, "/healthz").await.0, StatusCode::OK);
}
