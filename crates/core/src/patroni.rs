//! Asking Patroni's REST API about the db hosts: who is primary, who is a replica, who is up.
//!
//! Patroni answers its health endpoints with a status code only: `GET /primary` is 200 on the
//! member that holds the leader lock, `GET /replica` on a running replica, `GET /health` on any
//! member whose PostgreSQL runs. That, not libpq's `target_session_attrs`, is how the cluster
//! finds its primary: an orphaned old primary still accepts writes but no longer answers 200 on
//! `/primary`. The REST API is HTTPS with the cluster's certificates; reads need no client
//! certificate.

use std::borrow::Borrow;
use std::path::Path;
use std::time::Duration;

use crate::client::{BodyError, cluster_client_builder, read_limited};
use crate::config::HostEntry;
use crate::tls::TlsError;

/// Patroni's `/patroni` document is a few hundred bytes.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// One of Patroni's status-code-only endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// `/primary`: holds the leader lock.
    Primary,
    /// `/replica`: a running replica.
    Replica,
    /// `/sync`: the synchronous standby (`synchronous_mode`), the one Patroni may promote.
    Sync,
    /// `/health`: PostgreSQL is up.
    Health,
}

impl Check {
    pub fn path(self) -> &'static str {
        match self {
            Check::Primary => "/primary",
            Check::Replica => "/replica",
            Check::Sync => "/sync",
            Check::Health => "/health",
        }
    }
}

/// Why Patroni gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum PatroniError {
    #[error("timeout")]
    Timeout,
    #[error("no answer (connect failed)")]
    Connect,
    #[error("request failed: {0}")]
    Request(reqwest::Error),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error("HTTP {status}, not JSON: {source}")]
    NotJson {
        status: u16,
        source: serde_json::Error,
    },
}

impl From<reqwest::Error> for PatroniError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            PatroniError::Timeout
        } else if e.is_connect() {
            PatroniError::Connect
        } else {
            PatroniError::Request(e.without_url())
        }
    }
}

/// Patroni's REST base URL of a db host.
pub fn rest_url(host: &HostEntry) -> String {
    format!("https://{}", host.socket(host.ports.patroni))
}

/// A client for the Patroni REST API of the cluster's db hosts.
#[derive(Debug, Clone)]
pub struct Patroni {
    http: reqwest::Client,
}

impl Patroni {
    /// Trusts only the cluster CA, HTTPS only, every request bounded by `timeout` (a hung db
    /// host must not stall the caller's next check).
    pub fn new(ca_cert: &Path, timeout: Duration) -> Result<Self, TlsError> {
        let http = cluster_client_builder(ca_cert, timeout)?
            .https_only(true)
            .build()?;
        Ok(Self { http })
    }

    /// Whether `host` answers 200 on `check`'s endpoint; `Err` when it does not answer.
    pub async fn check(&self, host: &HostEntry, check: Check) -> Result<bool, PatroniError> {
        let url = format!("{}{}", rest_url(host), check.path());
        let response = self.http.get(url).send().await?;
        Ok(response.status() == reqwest::StatusCode::OK)
    }

    /// The hosts among `hosts` that answer 200 on `/primary`, in the given order, all asked at
    /// once. More than one means a split the caller must resolve (Patroni's own lock makes it
    /// short-lived); none means a failover is under way.
    /// `hosts` may be owned entries or references (`&[HostEntry]`, `&[&HostEntry]`).
    pub async fn leaders<'a, H: Borrow<HostEntry>>(&self, hosts: &'a [H]) -> Vec<&'a H> {
        let answers = futures::future::join_all(hosts.iter().map(|h| async move {
            let leads = matches!(self.check(h.borrow(), Check::Primary).await, Ok(true));
            leads.then_some(h)
        }))
        .await;
        answers.into_iter().flatten().collect()
    }

    /// The first of `hosts` (in order) that answers 200 on `/primary`.
    pub async fn primary<'a, H: Borrow<HostEntry>>(&self, hosts: &'a [H]) -> Option<&'a H> {
        self.leaders(hosts).await.into_iter().next()
    }

    /// `GET /patroni` of one db host: the HTTP status and the JSON document (role, state,
    /// timeline, replication), at most [`MAX_DOCUMENT_BYTES`].
    pub async fn document(
        &self,
        host: &HostEntry,
    ) -> Result<(u16, serde_json::Value), PatroniError> {
        let response = self
            .http
            .get(format!("{}/patroni", rest_url(host)))
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = read_limited(response, MAX_DOCUMENT_BYTES).await?;
        let json = serde_json::from_slice(&body)
            .map_err(|source| PatroniError::NotJson { status, source })?;
        Ok((status, json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(Check::Primary.path(), "/primary");
        assert_eq!(Check::Replica.path(), "/replica");
        assert_eq!(Check::Health.path(), "/health");
    }
}
