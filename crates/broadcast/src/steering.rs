//! `/steering`: the HLS Content Steering server of the masters we serve, answered through
//! whichever LB answers.
//!
//! The LBs know which broadcasts are healthy, so they make the steering manifest. A master
//! naming one LB's `/steering` would tie every steering player to that LB: dead or hung (SIGSTOP:
//! the connection opens, no answer comes), the player is never steered again. A steering player
//! cannot try several servers itself (a master has one `SERVER-URI`), but it is always talking
//! to the broadcast that served its master, so the master names us and we ask the LBs in turn,
//! each with a short deadline, starting with the one that answered last. When we die the player
//! leaves us by pathway (its last `PATHWAY-PRIORITY`, every other healthy broadcast), which is
//! what steering would have told it.
//!
//! After that the player gets no fresh manifest, and that is accepted: hls.js (1.6, web/vendor)
//! asks a failed `SERVER-URI` again every TTL, and on any network error it penalises the failing
//! pathway for five minutes and takes the next one of its last `PATHWAY-PRIORITY`, so it plays
//! on while one broadcast of that list lives. A `RELOAD-URI` elsewhere would only move the single
//! point of failure to another host. Our own page does not rely on any of this: it asks for the
//! master without steering and fails over through every LB itself (web/app.js).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use streaming_core::config::{Role, is_safe_name};
use streaming_core::http::text_error;
use streaming_core::sync::lock;

use crate::state::Broadcast;

/// One LB's time to connect and answer; a hung LB costs this, then the next one is asked.
pub const LB_ATTEMPT: Duration = Duration::from_secs(1);
/// How long one LB answer (or the failure of every LB) serves every player on the same channel
/// and pathway: the LBs' view of the broadcasts changes twice a second, players ask every 10 s,
/// so this only caps what many players (or a flood) can make us ask the LBs: one question per
/// channel and pathway a second, whatever the number of requests.
const CACHE_FOR: Duration = Duration::from_secs(1);
/// Questions to the LBs in flight at once; more are refused (the player asks again after TTL).
/// Keys are few (known channels and pathways), so this is a backstop.
const MAX_IN_FLIGHT: usize = 64;
/// Largest steering manifest we take from an LB (they are a few hundred bytes).
const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// Why no LB gave us a manifest (one reason per LB, for the log).
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    #[error("manifest larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("not a steering manifest")]
    NotAManifest,
    #[error("bad LB URL {0}")]
    BadUrl(String),
}

type Key = (String, Option<String>);

/// One question to the LBs for one key, shared by every request that comes while it is fresh:
/// the first asks, the others wait for its answer. A failure is kept as long as a success, so
/// when no LB answers a flood of requests still asks them at most once per key and second.
type Answer = Arc<tokio::sync::OnceCell<Option<bytes::Bytes>>>;

pub struct SteeringProxy {
    bc: Arc<Broadcast>,
    /// Index (in the config's LB list) of the LB that answered last: asked first.
    preferred: AtomicUsize,
    cache: Mutex<HashMap<Key, (Instant, Answer)>>,
    in_flight: tokio::sync::Semaphore,
}

pub fn router(bc: Arc<Broadcast>) -> Router {
    Router::new()
        .route("/steering", get(steering))
        .with_state(Arc::new(SteeringProxy {
            bc,
            preferred: AtomicUsize::new(0),
            cache: Mutex::new(HashMap::new()),
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        }))
}

/// The master's `SERVER-URI` on this broadcast.
pub fn server_uri(me_url: &str, channel: &str) -> String {
    format!(
        "{}/steering?channel={channel}",
        me_url.trim_end_matches('/')
    )
}

/// `GET /steering?channel=C&_HLS_pathway=P[&_HLS_throughput=N]`, asked by steering players
/// every TTL.
async fn steering(
    State(proxy): State<Arc<SteeringProxy>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let config = proxy.bc.config();
    let Some(channel) = query
        .get("channel")
        .filter(|c| is_safe_name(c) && config.cluster.channel(c).is_some())
        .cloned()
    else {
        return text_error(StatusCode::NOT_FOUND, "unknown channel");
    };
    // Only a pathway we would have offered is passed on, so the cache stays small.
    let pathway = query
        .get("_HLS_pathway")
        .filter(|p| {
            config
                .cluster
                .hosts_with_role(Role::Broadcast)
                .any(|h| &h.name == *p)
        })
        .cloned();
    let key = (channel, pathway);
    let Some(body) = proxy.manifest(&config.cluster.lb_urls(), key).await else {
        return unavailable("no LB answered");
    };
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response();
    // Public information, as on the LBs: any page's player may steer with it.
    response.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

fn unavailable(why: &str) -> Response {
    let mut r = text_error(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
    r
}

impl SteeringProxy {
    /// The manifest for `key`: the fresh answer (or failure) if there is one, else one
    /// question to the LBs, shared with every request for the same key meanwhile.
    async fn manifest(&self, lbs: &[String], key: Key) -> Option<bytes::Bytes> {
        let (answer, asker) = {
            let mut cache = lock(&self.cache);
            match cache.get(&key).filter(|(at, _)| at.elapsed() < CACHE_FOR) {
                Some((_, answer)) => (answer.clone(), false),
                None => {
                    // Keys are bounded (known channels and pathways); old answers go anyway.
                    cache.retain(|_, (at, _)| at.elapsed() < CACHE_FOR);
                    let answer = Answer::default();
                    cache.insert(key.clone(), (Instant::now(), answer.clone()));
                    (answer, true)
                }
            }
        };
        if let Some(done) = answer.get() {
            let result = if done.is_some() {
                "cached"
            } else {
                "cached_failure"
            };
            metrics::counter!("broadcast_steering_total", "result" => result).increment(1);
            return done.clone();
        }
        if !asker {
            metrics::counter!("broadcast_steering_total", "result" => "joined").increment(1);
        }
        answer
            .get_or_init(|| async {
                // A request whose asker went away takes over its question (OnceCell), so
                // this bounds questions, not waiting requests (the HTTP caps do that).
                let Ok(_permit) = self.in_flight.try_acquire() else {
                    metrics::counter!("broadcast_steering_total", "result" => "busy").increment(1);
                    return None;
                };
                let body = self.ask_lbs(lbs, &key).await;
                let result = if body.is_some() { "ok" } else { "no_lb" };
                metrics::counter!("broadcast_steering_total", "result" => result).increment(1);
                body
            })
            .await
            .clone()
    }

    /// Each LB once, the last one that answered first; `None` when none did.
    async fn ask_lbs(&self, lbs: &[String], key: &Key) -> Option<bytes::Bytes> {
        let first = self.preferred.load(Ordering::Relaxed);
        for i in 0..lbs.len() {
            let index = (first + i) % lbs.len();
            let lb = &lbs[index];
            match tokio::time::timeout(LB_ATTEMPT, self.ask(lb, key)).await {
                Ok(Ok(body)) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Some(body);
                }
                Ok(Err(e)) => self.lb_failed(lb, &e),
                Err(_) => self.lb_failed(lb, &AskError::Timeout(LB_ATTEMPT)),
            }
        }
        None
    }

    fn lb_failed(&self, lb: &str, e: &AskError) {
        metrics::counter!("broadcast_steering_lb_failures_total", "lb" => lb.to_owned())
            .increment(1);
        tracing::warn!(lb, "steering: LB failed, asking the next one: {e}");
    }

    async fn ask(&self, lb: &str, (channel, pathway): &Key) -> Result<bytes::Bytes, AskError> {
        let mut url = reqwest::Url::parse(&format!("{lb}/steering"))
            .map_err(|_| AskError::BadUrl(lb.to_owned()))?;
        url.query_pairs_mut().append_pair("channel", channel);
        if let Some(p) = pathway {
            url.query_pairs_mut().append_pair("_HLS_pathway", p);
        }
        let response = self.bc.client().get(url).send().await?;
        if !response.status().is_success() {
            return Err(AskError::Status(response.status()));
        }
        let body = streaming_core::client::read_limited(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| match e {
                streaming_core::client::BodyError::TooLarge(_) => AskError::TooLarge,
                streaming_core::client::BodyError::Read(e) => AskError::from(e),
            })?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| AskError::NotAManifest)?;
        if !manifest["PATHWAY-PRIORITY"].is_array() {
            return Err(AskError::NotAManifest);
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use std::sync::atomic::AtomicBool;
    use streaming_core::token::TokenSigner;
    use tower::ServiceExt;

    /// A plain-HTTP stand-in for both LBs: counts the questions, answers a manifest while
    /// `healthy`, else 503 (as an LB that cannot serve).
    async fn fake_lb(healthy: Arc<AtomicBool>, asked: Arc<AtomicUsize>) -> String {
        let app = Router::new().route(
            "/steering",
            get(move || {
                let (healthy, asked) = (healthy.clone(), asked.clone());
                async move {
                    asked.fetch_add(1, Ordering::SeqCst);
                    // Slow enough that a flood piles up behind one question.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if healthy.load(Ordering::SeqCst) {
                        (
                            StatusCode::OK,
                            r#"{"VERSION":1,"TTL":10,"PATHWAY-PRIORITY":["broadcast1"]}"#,
                        )
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "no")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    async fn flood(app: &Router, n: usize, query: &str) -> Vec<StatusCode> {
        let requests = (0..n).map(|_| {
            let request = Request::get(format!("/steering?{query}"))
                .body(Body::empty())
                .unwrap();
            let app = app.clone();
            async move { app.oneshot(request).await.unwrap().status() }
        });
        futures::future::join_all(requests).await
    }

    #[tokio::test]
    async fn a_flood_asks_the_lbs_once_per_key_and_second_even_when_they_fail() {
        let healthy = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(AtomicUsize::new(0));
        let lb = fake_lb(healthy.clone(), asked.clone()).await;
        let mut config = crate::state::test_support::config();
        for host in config
            .cluster
            .hosts
            .iter_mut()
            .filter(|h| h.role == Role::Lb)
        {
            host.url = lb.clone();
        }
        let bc = Arc::new(Broadcast::new(
            config,
            TokenSigner::new(b"k"),
            "ck".into(),
            reqwest::Client::new(),
        ));
        let app = router(bc);

        // Every LB failing: 500 requests at once cost one question to each LB.
        let statuses = flood(&app, 500, "channel=test&_HLS_pathway=broadcast1").await;
        assert!(
            statuses
                .iter()
                .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE)
        );
        let failing = asked.load(Ordering::SeqCst);
        assert_eq!(failing, 2, "one question per LB");

        // Healthy again: after the cache second, one question serves the next flood.
        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(CACHE_FOR).await;
        let statuses = flood(&app, 500, "channel=test&_HLS_pathway=broadcast1").await;
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));
        assert_eq!(asked.load(Ordering::SeqCst), failing + 1);

        // Unknown channels, pathways nobody offered, huge and odd values ask nobody new or
        // share the pathway-less key: at most one more question.
        // Near the largest URI `http` takes (64 KiB); hyper refuses longer ones before us.
        let huge = "x".repeat(60 * 1024);
        for (query, want) in [
            ("channel=nope", StatusCode::NOT_FOUND),
            ("channel=..%2F..%2Fetc", StatusCode::NOT_FOUND),
            ("channel=%FF%FE", StatusCode::NOT_FOUND),
            (&format!("channel={huge}") as &str, StatusCode::NOT_FOUND),
            ("channel=test&_HLS_pathway=evil", StatusCode::OK),
            (&format!("channel=test&_HLS_pathway={huge}"), StatusCode::OK),
            (
                "channel=test&t=forged.token&_HLS_throughput=-1",
                StatusCode::OK,
            ),
        ] {
            let statuses = flood(&app, 50, query).await;
            assert!(
                statuses.iter().all(|s| *s == want),
                "{} {statuses:?}",
                &query[..query.len().min(40)]
            );
        }
        assert_eq!(asked.load(Ordering::SeqCst), failing + 2);
    }
}
