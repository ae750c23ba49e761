//! Small HTTP pieces every service uses: `/metrics`, a bearer-token check, HSTS, the cluster's
//! own web origins.

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

/// `GET /metrics` in Prometheus text format.
pub fn metrics_response(handle: &PrometheusHandle) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// True when the request carries `Authorization: Bearer <expected>` (constant-time compare).
pub fn has_bearer(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| crate::secrets::secrets_equal(given, expected))
}

/// A plain-text error with a status, for clients and operators alike.
pub fn text_error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.into() + "\n",
    )
        .into_response()
}

/// `Strict-Transport-Security` for every response of the public site: a year, and not
/// `includeSubDomains`, as the operator may run other hosts under the same domain.
pub fn hsts_layer() -> tower_http::set_header::SetResponseHeaderLayer<header::HeaderValue> {
    tower_http::set_header::SetResponseHeaderLayer::overriding(
        header::STRICT_TRANSPORT_SECURITY,
        header::HeaderValue::from_static("max-age=31536000"),
    )
}

/// The web origins of the cluster's own pages (LB sites and broadcasts), the only ones allowed
/// to call its APIs from a browser.
pub fn cluster_origins(config: &crate::config::HostConfig) -> Vec<String> {
    use crate::config::Role;
    let mut origins: Vec<String> = config
        .cluster
        .hosts
        .iter()
        .filter(|h| matches!(h.role, Role::Lb | Role::Broadcast))
        .map(|h| h.url.as_str())
        .chain(config.cluster.site_urls.iter().map(String::as_str))
        .filter_map(|u| url::Url::parse(u).ok())
        .map(|u| u.origin().ascii_serialization())
        .filter(|o| o != "null")
        .collect();
    origins.sort();
    origins.dedup();
    origins
}
