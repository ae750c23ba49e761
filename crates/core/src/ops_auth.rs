//! Who may read the operational surfaces (`/status`, `/metrics`): cluster hosts, by their
//! address, and anyone presenting the metrics token (`Authorization: Bearer ...`, what
//! Prometheus and `streamctl status` send). These pages name internal URLs and last errors.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use crate::config::HostConfig;
use crate::secrets::SecretError;
use crate::sync::{read, write};

#[derive(Debug, Default)]
struct Allowed {
    addresses: HashSet<IpAddr>,
    token: Option<String>,
}

/// The current allowance; [`OpsGuard::update`] swaps it on SIGHUP (hosts added, token rotated).
#[derive(Debug, Default)]
pub struct OpsGuard {
    allowed: RwLock<Allowed>,
}

impl OpsGuard {
    /// From the cluster's host list and the metrics token file (none configured: hosts only).
    pub fn from_config(config: &HostConfig) -> Result<Self, SecretError> {
        let guard = Self::default();
        guard.update(config)?;
        Ok(guard)
    }

    /// Re-reads hosts and token; on error the previous allowance stays.
    pub fn update(&self, config: &HostConfig) -> Result<(), SecretError> {
        let token = match &config.paths.metrics_token {
            Some(path) => Some(crate::secrets::read_secret(path)?),
            None => None,
        };
        let addresses = config
            .cluster
            .hosts
            .iter()
            .map(|h| h.address.to_canonical())
            .collect();
        *write(&self.allowed) = Allowed { addresses, token };
        Ok(())
    }

    /// True for a cluster host's address or the right bearer token.
    pub fn allows(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> bool {
        let allowed = read(&self.allowed);
        peer.is_some_and(|ip| allowed.addresses.contains(&ip.to_canonical()))
            || allowed
                .token
                .as_deref()
                .is_some_and(|t| crate::http::has_bearer(headers, t))
    }
}

/// The guard of a running service, re-read from its config file on every SIGHUP (new hosts,
/// rotated token) without touching the service's own reload.
pub fn for_service(ctx: &crate::service::ServiceContext) -> Result<Arc<OpsGuard>, SecretError> {
    let guard = Arc::new(OpsGuard::from_config(&ctx.config)?);
    let (watched, path, lifecycle) = (
        guard.clone(),
        ctx.config_path.clone(),
        ctx.lifecycle.clone(),
    );
    let mut reloads = lifecycle.reloads();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = lifecycle.shutdown() => break,
                changed = reloads.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let updated = HostConfig::load(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|config| watched.update(&config).map_err(|e| e.to_string()));
                    if let Err(e) = updated {
                        tracing::error!("/status and /metrics access: reload failed, keeping the previous one: {e}");
                    }
                }
            }
        }
    });
    Ok(guard)
}

/// Middleware: `axum::middleware::from_fn_with_state(guard, ops_auth::require)`. Others get a
/// bare 403: what is behind it is nobody else's business.
pub async fn require(State(guard): State<Arc<OpsGuard>>, request: Request, next: Next) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if guard.allows(peer, request.headers()) {
        next.run(request).await
    } else {
        metrics::counter!("http_ops_refused_total").increment(1);
        crate::http::text_error(StatusCode::FORBIDDEN, "forbidden")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderValue, header};

    fn guard(token: Option<&str>) -> OpsGuard {
        let guard = OpsGuard::default();
        *guard.allowed.write().unwrap() = Allowed {
            addresses: ["127.77.1.1", "2001:db8::5"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect(),
            token: token.map(str::to_owned),
        };
        guard
    }

    fn bearer(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn cluster_addresses_pass_others_need_the_token() {
        let g = guard(Some("s3cret"));
        let none = HeaderMap::new();
        assert!(g.allows(Some("127.77.1.1".parse().unwrap()), &none));
        assert!(g.allows(Some("::ffff:127.77.1.1".parse().unwrap()), &none));
        assert!(g.allows(Some("2001:db8::5".parse().unwrap()), &none));
        assert!(!g.allows(Some("127.0.0.1".parse().unwrap()), &none));
        assert!(!g.allows(Some("2001:db8::6".parse().unwrap()), &none));
        assert!(!g.allows(None, &none));
        assert!(g.allows(
            Some("203.0.113.9".parse().unwrap()),
            &bearer("Bearer s3cret")
        ));
        assert!(g.allows(None, &bearer("Bearer s3cret")));
        for wrong in ["Bearer s3cre", "Bearer s3cretx", "s3cret", "Basic s3cret"] {
            assert!(
                !g.allows(Some("203.0.113.9".parse().unwrap()), &bearer(wrong)),
                "{wrong}"
            );
        }
    }

    #[test]
    fn without_a_token_only_hosts_pass() {
        let g = guard(None);
        assert!(!g.allows(Some("203.0.113.9".parse().unwrap()), &bearer("Bearer ")));
        assert!(g.allows(Some("127.77.1.1".parse().unwrap()), &HeaderMap::new()));
    }

    #[tokio::test]
    async fn refusal_is_a_bare_403() {
        use axum::body::Body;
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route(
                "/status",
                axum::routing::get(|| async { "internal detail" }),
            )
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(guard(Some("s3cret"))),
                require,
            ));
        let from = |peer: &str, auth: Option<&str>| {
            let mut r = axum::http::Request::get("/status");
            if let Some(a) = auth {
                r = r.header(header::AUTHORIZATION, a);
            }
            let mut r = r.body(Body::empty()).unwrap();
            r.extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer.parse().unwrap()));
            r
        };
        let denied = app
            .clone()
            .oneshot(from("203.0.113.9:5000", None))
            .await
            .unwrap();
        assert_eq!(denied.status(), StatusCode::FORBIDDEN);
        let body = axum::body::to_bytes(denied.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"forbidden\n");
        let host = app
            .clone()
            .oneshot(from("127.77.1.1:5000", None))
            .await
            .unwrap();
        assert_eq!(host.status(), StatusCode::OK);
        let token = app
            .oneshot(from("203.0.113.9:5000", Some("Bearer s3cret")))
            .await
            .unwrap();
        assert_eq!(token.status(), StatusCode::OK);
    }
}
