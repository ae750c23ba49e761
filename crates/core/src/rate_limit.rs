//! Per-address request rate limits: a token bucket per client address, in bounded memory.
//!
//! Used on the endpoints where one client asking too often hurts everyone (viewer assignment,
//! account register and login). A refusal is a 429 with `Retry-After`, counted in `/metrics`
//! as `http_rate_limited_total{limit=...}`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;

use crate::config::RateLimit;
use crate::conn_limit::client_key;
use crate::sync::lock;

/// Addresses tracked at most per limiter (about 50 bytes each). Past this, buckets that have
/// refilled are forgotten (they hold nothing a new bucket would not).
pub const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Buckets {
    map: HashMap<IpAddr, Bucket>,
    last_prune: Option<Instant>,
}

/// One limit (e.g. `assign`) over every client address.
#[derive(Debug)]
pub struct RateLimiter {
    name: &'static str,
    burst: f64,
    per_second: f64,
    max_tracked: usize,
    buckets: Mutex<Buckets>,
}

impl RateLimiter {
    pub fn new(name: &'static str, limit: RateLimit) -> Self {
        Self::with_capacity(name, limit, MAX_TRACKED)
    }

    pub fn with_capacity(name: &'static str, limit: RateLimit, max_tracked: usize) -> Self {
        Self {
            name,
            // A bucket of 0 would refuse everyone forever: a misconfiguration, not a policy.
            burst: f64::from(limit.burst.max(1)),
            per_second: f64::from(limit.per_minute) / 60.0,
            max_tracked,
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                last_prune: None,
            }),
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Takes one token for `ip`, or says how long until one is there.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = client_key(ip);
        let mut buckets = lock(&self.buckets);
        if !buckets.map.contains_key(&key) && buckets.map.len() >= self.max_tracked {
            self.prune(&mut buckets, now);
            if buckets.map.len() >= self.max_tracked {
                // More distinct addresses than we can remember are asking at once: let this
                // one through untracked rather than refuse every newcomer.
                metrics::counter!("http_rate_limit_untracked_total", "limit" => self.name)
                    .increment(1);
                return Ok(());
            }
        }
        let bucket = buckets.map.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = if self.per_second > 0.0 {
            (1.0 - bucket.tokens) / self.per_second
        } else {
            60.0
        };
        Err(Duration::from_secs_f64(wait))
    }

    /// Forgets buckets that are full again; at most once a second, as it walks them all.
    fn prune(&self, buckets: &mut Buckets, now: Instant) {
        if buckets
            .last_prune
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        buckets.last_prune = Some(now);
        let (burst, rate) = (self.burst, self.per_second);
        buckets.map.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
        });
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap().map.len()
    }
}

/// The 429 a refused client gets.
pub fn too_many_requests(retry_after: Duration) -> Response {
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = crate::http::text_error(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many requests from your address: retry in {secs} s"),
    );
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Middleware: `axum::middleware::from_fn_with_state(limiter, rate_limit::enforce)`.
///
/// The client address comes from the connection ([`crate::serve`] always records it); a request
/// without one (an in-process call) counts under the unspecified address.
pub async fn enforce(
    State(limiter): State<Arc<RateLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
    match limiter.check(ip, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            metrics::counter!("http_rate_limited_total", "limit" => limiter.name).increment(1);
            too_many_requests(wait)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_steady_rate() {
        let limiter = RateLimiter::new(
            "t",
            RateLimit {
                burst: 3,
                per_minute: 60,
            },
        );
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check(ip("10.0.0.1"), t0).unwrap();
        }
        let wait = limiter.check(ip("10.0.0.1"), t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        // Another address has its own bucket.
        limiter.check(ip("10.0.0.2"), t0).unwrap();
        // One token a second comes back, never more than the burst.
        limiter
            .check(ip("10.0.0.1"), t0 + Duration::from_secs(1))
            .unwrap();
        assert!(
            limiter
                .check(ip("10.0.0.1"), t0 + Duration::from_secs(1))
                .is_err()
        );
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.check(ip("10.0.0.1"), later).unwrap();
        }
        assert!(limiter.check(ip("10.0.0.1"), later).is_err());
    }

    #[test]
    fn ipv6_neighbours_share_a_bucket() {
        let limiter = RateLimiter::new(
            "t",
            RateLimit {
                burst: 1,
                per_minute: 1,
            },
        );
        let t0 = Instant::now();
        limiter.check(ip("2001:db8::1"), t0).unwrap();
        let wait = limiter.check(ip("2001:db8::2"), t0).unwrap_err();
        assert!(wait > Duration::from_secs(59), "{wait:?}");
    }

    #[test]
    fn memory_stays_bounded() {
        let limiter = RateLimiter::with_capacity(
            "t",
            RateLimit {
                burst: 2,
                per_minute: 60,
            },
            100,
        );
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let _ = limiter.check(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert_eq!(limiter.tracked(), 100);
        // Once the tracked ones have refilled, they make room for new addresses.
        let later = t0 + Duration::from_secs(5);
        limiter.check(ip("192.0.2.1"), later).unwrap();
        assert_eq!(limiter.tracked(), 1);
    }

    #[tokio::test]
    async fn refusal_is_429_with_retry_after() {
        use axum::body::Body;
        use tower::ServiceExt;
        let limiter = Arc::new(RateLimiter::new(
            "t",
            RateLimit {
                burst: 1,
                per_minute: 6,
            },
        ));
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(limiter, enforce));
        let request = |from: &str| {
            let mut r = axum::http::Request::get("/").body(Body::empty()).unwrap();
            r.extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(from.parse().unwrap()));
            r
        };
        let ok = app.clone().oneshot(request("10.0.0.1:1000")).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let refused = app.clone().oneshot(request("10.0.0.1:1001")).await.unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[header::RETRY_AFTER], "10");
        let other = app.oneshot(request("10.0.0.2:1000")).await.unwrap();
        assert_eq!(other.status(), StatusCode::OK);
    }
}
