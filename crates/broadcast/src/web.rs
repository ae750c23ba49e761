//! The viewer page (web/ at the repository root), embedded in the binary so a broadcast is one
//! file to deploy, served with a strict Content-Security-Policy.

use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use rust_embed::RustEmbed;

#[derive(RustEmbed)]
#[folder = "../../web/"]
struct Web;

/// Content type by file extension; anything unknown is served as opaque bytes.
pub fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("txt") | Some("md") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The page may load only its own files, play blob: media made by hls.js, and talk to the
/// cluster's own hosts (other broadcasts after a failover, their chat sockets, the LBs for
/// `/api/assign`).
pub fn content_security_policy(connect_origins: &[String]) -> String {
    let mut connect = String::from("'self'");
    for origin in connect_origins {
        connect.push(' ');
        connect.push_str(origin);
        // The chat socket of whichever broadcast the player moved to.
        if let Some(host) = origin.strip_prefix("https://") {
            connect.push_str(" wss://");
            connect.push_str(host);
        }
    }
    format!(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         media-src 'self' blob:; worker-src 'self' blob:; connect-src {connect}; \
         frame-ancestors 'none'; base-uri 'none'"
    )
}

/// Serves an embedded file; HTML gets the CSP header.
pub fn serve(path: &str, connect_origins: &[String]) -> Response {
    let path = path.trim_start_matches('/');
    let path = if path.is_empty() { "index.html" } else { path };
    let Some(file) = Web::get(path) else {
        return streaming_core::http::text_error(StatusCode::NOT_FOUND, "not found");
    };
    let ctype = content_type(path);
    let mut response = (
        [
            (header::CONTENT_TYPE, ctype),
            (
                header::CACHE_CONTROL,
                if ctype.starts_with("text/html") {
                    "no-cache"
                } else {
                    "public, max-age=300"
                },
            ),
        ],
        match file.data {
            std::borrow::Cow::Borrowed(b) => bytes::Bytes::from_static(b),
            std::borrow::Cow::Owned(v) => bytes::Bytes::from(v),
        },
    )
        .into_response();
    if ctype.starts_with("text/html")
        && let Ok(value) = HeaderValue::from_str(&content_security_policy(connect_origins))
    {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, value);
        response.headers_mut().insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
    }
    response
}

/// Fallback route: any path that is not an API path is looked up among the embedded files.
pub fn serve_uri(uri: &Uri, connect_origins: &[String]) -> Response {
    serve(uri.path(), connect_origins)
}
