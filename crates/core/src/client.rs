//! The one way a service builds an HTTPS client for cluster traffic (LB -> broadcast and ingest
//! `/status`, broadcast -> ingest origin and LB steering, chat -> Patroni), and reads a body
//! without letting a peer make it allocate without bound.

use std::path::Path;
use std::time::Duration;

use crate::tls::{TlsError, load_certs};

/// Servers close a keep-alive connection that asks nothing for `http_header_seconds` (10 s by
/// default): the client gives it up first rather than race the server's close.
const POOL_IDLE: Duration = Duration::from_secs(5);

/// A client builder for cluster peers: trusts only the cluster CA (`ca_cert`, PEM), bounds the
/// connect and every whole request by `timeout` (a hung peer must look like a dead one quickly),
/// never follows redirects (a peer that redirects is misconfigured, and a redirect could lead the
/// cluster's bearer keys elsewhere) and never goes through a proxy. Callers add what only they
/// need (a local address, a client certificate) and build.
pub fn cluster_client_builder(
    ca_cert: &Path,
    timeout: Duration,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .connect_timeout(timeout)
        .timeout(timeout)
        .pool_idle_timeout(POOL_IDLE)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    for cert in load_certs(ca_cert)? {
        builder = builder.add_root_certificate(reqwest::Certificate::from_der(&cert)?);
    }
    Ok(builder)
}

/// [`cluster_client_builder`], built.
pub fn cluster_client(ca_cert: &Path, timeout: Duration) -> Result<reqwest::Client, TlsError> {
    Ok(cluster_client_builder(ca_cert, timeout)?.build()?)
}

/// Why a body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("body: {0}")]
    Read(#[from] reqwest::Error),
}

/// Reads a response body of at most `limit` bytes: refused at once when the announced length is
/// larger, and as soon as the received bytes pass the limit otherwise.
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<bytes::Bytes, BodyError> {
    let announced = response.content_length();
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge(limit));
    }
    let capacity = announced.map_or(0, |n| n as usize);
    let mut body = bytes::BytesMut::with_capacity(capacity);
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
