//! The LB's HTTP surface: redirects for the page and for plain HLS clients, `/api/assign` for
//! players that lost their broadcast, and the operator endpoints.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use streaming_core::config::{HostConfig, is_safe_name};
use streaming_core::http::{cluster_origins, hsts_layer, text_error};
use streaming_core::ops_auth::{self, OpsGuard};
use streaming_core::rate_limit::{self, RateLimiter};
use streaming_core::token::{TOKEN_TTL_SECS, TokenSigner, ViewerClaims, new_viewer_id, unix_now};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::assign::{Candidate, choose, draw_by_free_viewers, for_channel, parse_exclude};
use crate::health::{Health, candidates};
use streaming_core::sync::read;

/// Seconds a client should wait before asking again when the cluster is full.
pub const RETRY_AFTER_SECS: &str = "5";

/// Config and key, swapped together on SIGHUP.
pub struct Current {
    pub config: Arc<HostConfig>,
    pub signer: TokenSigner,
    pub client: reqwest::Client,
}

#[derive(Clone)]
pub struct App {
    pub current: Arc<RwLock<Current>>,
    pub health: Arc<Health>,
    pub metrics: PrometheusHandle,
    /// Who may read `/status` and `/metrics`.
    pub ops: Arc<OpsGuard>,
    /// Per-address limit on everything that hands out a viewer token.
    pub assign_rate: Arc<RateLimiter>,
}

impl App {
    fn config(&self) -> Arc<HostConfig> {
        read(&self.current).config.clone()
    }
    fn signer(&self) -> TokenSigner {
        read(&self.current).signer.clone()
    }
}

/// A broadcast chosen for a viewer, with the token that takes them there.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Assignment {
    pub broadcast: String,
    pub base_url: String,
    pub token: String,
}

/// Why no assignment could be made.
#[derive(Debug, PartialEq)]
pub enum AssignError {
    UnknownChannel,
    NoBroadcast,
}

impl App {
    /// The channel asked for (default: the first configured one), if it exists.
    fn channel(&self, asked: Option<&String>) -> Result<String, AssignError> {
        let config = self.config();
        match asked {
            Some(name) if is_safe_name(name) && config.cluster.channel(name).is_some() => {
                Ok(name.clone())
            }
            Some(_) => Err(AssignError::UnknownChannel),
            None => config
                .cluster
                .default_channel()
                .map(|c| c.name.clone())
                .ok_or(AssignError::UnknownChannel),
        }
    }

    /// Picks a broadcast and signs a token for it. A bad or expired token is no error here: it
    /// just means a new assignment (and a new viewer id).
    pub fn assign(
        &self,
        query: &HashMap<String, String>,
    ) -> Result<(String, Assignment), AssignError> {
        let channel = self.channel(query.get("channel"))?;
        let signer = self.signer();
        let now = unix_now();
        let claims = query
            .get("t")
            .and_then(|t| signer.verify(t, now).ok())
            .filter(|c| c.channel == channel);
        let exclude = parse_exclude(query.get("exclude").map(String::as_str));
        let config = self.config();
        let cands = for_channel(
            candidates(&config, &self.health.snapshot(), Instant::now()),
            &channel,
        );
        let sticky = claims.as_ref().map(|c| c.broadcast.as_str());
        let Some(chosen) = choose(&cands, sticky, &exclude, &mut rand::rng()) else {
            metrics::counter!("lb_no_broadcast_total").increment(1);
            return Err(AssignError::NoBroadcast);
        };
        let kept = sticky == Some(chosen.name.as_str());
        if !kept {
            // A viewer new to this broadcast: count it until the next poll shows it.
            self.health.note_assignment(&chosen.name, Instant::now());
        }
        metrics::counter!("lb_assignments_total", "broadcast" => chosen.name.clone(),
            "kind" => if kept { "sticky" } else { "new" })
        .increment(1);
        let token = signer.sign(&ViewerClaims {
            broadcast: chosen.name.clone(),
            channel: channel.clone(),
            viewer: claims.map(|c| c.viewer).unwrap_or_else(new_viewer_id),
            expires: now + TOKEN_TTL_SECS,
        });
        Ok((
            channel,
            Assignment {
                broadcast: chosen.name.clone(),
                base_url: chosen.base_url.clone(),
                token,
            },
        ))
    }
}

/// Seconds a steering player waits before asking again: how soon it leaves a broadcast that
/// died, hung or started draining (its own request errors usually make it move sooner).
pub const STEERING_TTL_SECS: u64 = 10;

/// `PATHWAY-PRIORITY` of the steering manifest: the viewer's current pathway first while it is
/// eligible (steering must not move everyone to the emptiest broadcast every TTL), then every
/// other eligible broadcast in an order drawn in proportion to free capacity (as assignments
/// are: when a broadcast dies, its steering players spread like new viewers would). With
/// nothing eligible the current pathway (or every broadcast) is kept, so the player does not
/// jump to a dead one.
pub fn pathway_priority(
    cands: &[Candidate],
    current: Option<&str>,
    rng: &mut impl rand::Rng,
) -> Vec<String> {
    let mut rest: Vec<&Candidate> = cands
        .iter()
        .filter(|c| c.eligible && Some(c.name.as_str()) != current)
        .collect();
    let mut order: Vec<String> = cands
        .iter()
        .filter(|c| c.eligible && Some(c.name.as_str()) == current)
        .map(|c| c.name.clone())
        .collect();
    while let Some(i) = draw_by_free_viewers(&rest, rng) {
        order.push(rest.swap_remove(i).name.clone());
    }
    if !order.is_empty() {
        return order;
    }
    match current.filter(|cur| cands.iter().any(|c| c.name == *cur)) {
        Some(cur) => vec![cur.to_owned()],
        None => cands.iter().map(|c| c.name.clone()).collect(),
    }
}

/// The HLS Content Steering manifest (version 1) for a player currently on `current`.
pub fn steering_manifest(
    cands: &[Candidate],
    current: Option<&str>,
    rng: &mut impl rand::Rng,
) -> serde_json::Value {
    serde_json::json!({
        "VERSION": 1,
        "TTL": STEERING_TTL_SECS,
        "PATHWAY-PRIORITY": pathway_priority(cands, current, rng),
    })
}

pub fn router(app: App) -> Router {
    let current = app.current.clone();
    // Only the cluster's own pages may ask for an assignment from a browser; anyone else's page
    // could otherwise mint viewers from every visitor it has.
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            let config = read(&current).config.clone();
            origin
                .to_str()
                .is_ok_and(|o| cluster_origins(&config).iter().any(|a| a == o))
        }))
        .allow_methods([axum::http::Method::GET]);
    let limited =
        axum::middleware::from_fn_with_state(app.assign_rate.clone(), rate_limit::enforce);
    let ops = axum::middleware::from_fn_with_state(app.ops.clone(), ops_auth::require);
    Router::new()
        .route("/", get(page).layer(limited.clone()))
        .route("/live/{channel}/", get(channel_page).layer(limited.clone()))
        .route("/steering", get(steering))
        .route("/live/{channel}/{file}", get(hls).layer(limited.clone()))
        .route(
            "/api/assign",
            get(api_assign).layer::<_, Infallible>(limited).layer(cors),
        )
        .route("/api/stats", get(api_stats))
        .route("/healthz", get(healthz))
        .route("/status", get(status).layer(ops.clone()))
        .route("/metrics", get(metrics).layer(ops))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(hsts_layer())
        .with_state(app)
}

fn redirect(location: String) -> Response {
    match HeaderValue::from_str(&location) {
        Ok(value) => (
            StatusCode::FOUND,
            [
                (header::LOCATION, value),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
        Err(_) => text_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "bad broadcast URL in config",
        ),
    }
}

fn with_retry_after(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

const FULL_PAGE: &str = "<!doctype html>
<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">
<title>Stream unavailable</title></head>
<body><h1>Cluster full or no healthy broadcast</h1>
<p>No broadcast server can take another viewer right now (all are full, draining or not live).
This page retries by itself in a few seconds.</p></body></html>
";

/// `/` (the first channel, or `?channel=`) and `/live/<channel>/`: the viewer is sent to the
/// channel's page on the broadcast chosen for it, token in hand.
async fn page(State(app): State<App>, Query(query): Query<HashMap<String, String>>) -> Response {
    match app.assign(&query) {
        Ok((channel, a)) => redirect(format!("{}/live/{channel}/?t={}", a.base_url, a.token)),
        Err(AssignError::UnknownChannel) => text_error(StatusCode::NOT_FOUND, "unknown channel"),
        Err(AssignError::NoBroadcast) => with_retry_after(
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'none'; frame-ancestors 'none'",
                    ),
                ],
                FULL_PAGE,
            )
                .into_response(),
        ),
    }
}

async fn channel_page(
    state: State<App>,
    Path(channel): Path<String>,
    Query(mut query): Query<HashMap<String, String>>,
) -> Response {
    query.insert("channel".into(), channel);
    page(state, Query(query)).await
}

async fn hls(
    State(app): State<App>,
    Path((channel, file)): Path<(String, String)>,
    Query(mut query): Query<HashMap<String, String>>,
) -> Response {
    if file != "master.m3u8" {
        return text_error(
            StatusCode::NOT_FOUND,
            "only /live/<channel>/master.m3u8 is served here",
        );
    }
    query.insert("channel".into(), channel);
    match app.assign(&query) {
        Ok((channel, a)) => redirect(format!(
            "{}/live/{channel}/master.m3u8?t={}",
            a.base_url, a.token
        )),
        Err(AssignError::UnknownChannel) => text_error(StatusCode::NOT_FOUND, "unknown channel"),
        Err(AssignError::NoBroadcast) => with_retry_after(text_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "cluster full / no healthy broadcast: retry in a few seconds",
        )),
    }
}

async fn api_assign(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (status, body) = match app.assign(&query) {
        Ok((_, a)) => (StatusCode::OK, serde_json::to_value(a).unwrap_or_default()),
        Err(AssignError::UnknownChannel) => (
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "unknown channel"}),
        ),
        Err(AssignError::NoBroadcast) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": "cluster full / no healthy broadcast"}),
        ),
    };
    let mut response = (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response = with_retry_after(response);
    }
    response
}

/// `GET /api/stats`: the audience the page shows (viewers on every broadcast that answers).
async fn api_stats(State(app): State<App>) -> Response {
    let loads = crate::health::loads(&app.config(), &app.health.snapshot(), Instant::now());
    let headroom = streaming_core::capacity::headroom(&loads);
    (
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        axum::Json(serde_json::json!({
            "viewers": headroom.viewers,
            "broadcasts": loads.len(),
            "headroom": headroom,
        })),
    )
        .into_response()
}

/// `GET /steering?channel=C&_HLS_pathway=P[&_HLS_throughput=N]`: what a steering player asks
/// every TTL from the broadcast that served its master, which asks us (or the other LB).
async fn steering(
    State(app): State<App>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Ok(channel) = app.channel(query.get("channel")) else {
        return text_error(StatusCode::NOT_FOUND, "unknown channel");
    };
    let current = query
        .get("_HLS_pathway")
        .map(String::as_str)
        .filter(|p| is_safe_name(p));
    let config = app.config();
    let cands = for_channel(
        candidates(&config, &app.health.snapshot(), Instant::now()),
        &channel,
    );
    metrics::counter!("lb_steering_total").increment(1);
    (
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        axum::Json(steering_manifest(&cands, current, &mut rand::rng())),
    )
        .into_response()
}

async fn healthz(State(app): State<App>) -> Response {
    let config = app.config();
    let n = candidates(&config, &app.health.snapshot(), Instant::now())
        .iter()
        .filter(|c| c.eligible)
        .count();
    if n == 0 {
        text_error(StatusCode::SERVICE_UNAVAILABLE, "no eligible broadcast")
    } else {
        (StatusCode::OK, format!("ok: {n} eligible broadcasts\n")).into_response()
    }
}

async fn status(State(app): State<App>) -> Response {
    let config = app.config();
    let snapshot = app.health.snapshot();
    let now = Instant::now();
    let broadcasts: Vec<serde_json::Value> = candidates(&config, &snapshot, now)
        .into_iter()
        .map(|c| {
            let h = snapshot.get(&c.name);
            let st = h.and_then(|h| h.status.as_ref());
            serde_json::json!({
                "name": c.name,
                "url": c.base_url,
                "eligible": c.eligible,
                "reason": c.reason,
                "free_viewers": c.free_viewers,
                "viewers": st.map(|s| s.viewers),
                "egress_mbps": st.map(|s| s.egress_mbps),
                "live": st.map(|s| s.live),
                "live_channels": c.live_channels,
                "channel_viewers": st.map(|s| &s.channel_viewers),
                "draining": st.map(|s| s.draining),
                "recent_assignments": h.map_or(0, |h| h.recent.count(now)),
                "last_poll_age_s": h.and_then(|h| h.last_ok).map(|t| now.saturating_duration_since(t).as_secs_f64()),
                "last_error": h.and_then(|h| h.last_error.clone()),
            })
        })
        .collect();
    let body = serde_json::json!({"name": config.name, "broadcasts": broadcasts});
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    streaming_core::http::metrics_response(&app.metrics)
}

#[cfg(test)]
mod tests;
