//! Asking Patroni and etcd over their HTTPS APIs: who is primary, who streams, is etcd healthy.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use serde_json::Value;
use streaming_core::config::{ClusterConfig, EtcdConfig, HostConfig, HostEntry, Role};

use super::{MAX_REST_BYTES, REST_TIMEOUT};

/// One db host as Patroni's `GET /patroni` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// `primary` (Patroni 3 says "master"), `replica`, `uninitialized`, ...
    pub role: String,
    /// `running`, `starting`, `stopped`, `creating replica`, ...
    pub state: String,
    pub timeline: Option<u64>,
    /// On the primary: replicas (Patroni member names) whose WAL stream is live.
    pub streaming: Vec<String>,
    /// On a replica: it is the synchronous standby.
    pub sync_standby: bool,
}

impl Member {
    /// Keeps only db hosts of the cluster in `streaming` (a replica being cloned shows up as
    /// `pg_basebackup`, which streams but is no replica yet).
    pub fn only_members(mut self, cluster: &ClusterConfig) -> Self {
        self.streaming
            .retain(|name| cluster.host(name).is_some_and(|h| h.role == Role::Db));
        self
    }
}

/// Reads `/patroni`'s JSON; `None` when it lacks role or state.
pub fn parse_member(json: &Value) -> Option<Member> {
    let role = json.get("role")?.as_str()?;
    let role = if role == "master" { "primary" } else { role };
    let streaming = json
        .get("replication")
        .and_then(Value::as_array)
        .map(|replicas| {
            replicas
                .iter()
                .filter(|r| r["state"] == "streaming")
                .filter_map(|r| r["application_name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Some(Member {
        role: role.to_owned(),
        state: json.get("state")?.as_str()?.to_owned(),
        timeline: json.get("timeline").and_then(Value::as_u64),
        streaming,
        sync_standby: json.get("sync_standby").and_then(Value::as_bool) == Some(true),
    })
}

fn https_client(
    ca_cert: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<reqwest::Client> {
    let ca = std::fs::read(ca_cert).with_context(|| format!("read {}", ca_cert.display()))?;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(REST_TIMEOUT)
        .timeout(REST_TIMEOUT)
        .no_proxy()
        .https_only(true)
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&ca)
                .with_context(|| format!("{} is no PEM certificate", ca_cert.display()))?,
        );
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?;
        pem.extend(std::fs::read(key).with_context(|| format!("read {}", key.display()))?);
        builder = builder.identity(
            reqwest::Identity::from_pem(&pem)
                .with_context(|| format!("{} + {}", cert.display(), key.display()))?,
        );
    }
    builder.build().context("build the HTTPS client")
}

/// An HTTPS client for Patroni's REST API (never through a proxy), trusting only the cluster CA.
/// It shows no client certificate: reads need none.
pub fn rest_client(config: &HostConfig) -> anyhow::Result<reqwest::Client> {
    https_client(&config.paths.ca_cert, None)
}

/// An HTTPS client for etcd, which refuses clients without a certificate from the cluster CA:
/// it shows the host's own.
pub fn etcd_client(config: &HostConfig) -> anyhow::Result<reqwest::Client> {
    https_client(
        &config.paths.ca_cert,
        Some((&config.paths.tls_cert, &config.paths.tls_key)),
    )
}

/// Patroni's REST base URL of a db host.
pub fn rest_url(host: &HostEntry) -> String {
    format!("https://{}", host.socket(host.ports.patroni))
}

async fn get_small(client: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let mut response = client.get(url).send().await.map_err(|e| {
        if e.is_timeout() {
            "timeout".to_owned()
        } else if e.is_connect() {
            "no answer (connect failed)".to_owned()
        } else {
            crate::probe::error_chain(&e.without_url())
        }
    })?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_REST_BYTES {
            return Err(format!("answer larger than {MAX_REST_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// `GET /patroni` of one db host.
pub async fn member(client: &reqwest::Client, host: &HostEntry) -> Result<Member, String> {
    let (status, body) = get_small(client, &format!("{}/patroni", rest_url(host))).await?;
    let json: Value =
        serde_json::from_slice(&body).map_err(|e| format!("HTTP {status}, not JSON: {e}"))?;
    parse_member(&json).ok_or_else(|| format!("HTTP {status} without role/state: {json}"))
}

/// Every db host of the cluster with its Patroni state (asked concurrently).
pub async fn members(
    client: &reqwest::Client,
    cluster: &ClusterConfig,
) -> Vec<(String, Result<Member, String>)> {
    let hosts: Vec<&HostEntry> = cluster.hosts_with_role(Role::Db).collect();
    let answers = futures::future::join_all(hosts.iter().map(|h| member(client, h))).await;
    hosts
        .iter()
        .map(|h| h.name.clone())
        .zip(
            answers
                .into_iter()
                .map(|a| a.map(|m| m.only_members(cluster))),
        )
        .collect()
}

/// The db host whose Patroni answers 200 on `GET /primary` (it holds the leader lock).
pub async fn primary_in(client: &reqwest::Client, cluster: &ClusterConfig) -> Option<String> {
    let hosts: Vec<&HostEntry> = cluster.hosts_with_role(Role::Db).collect();
    let urls: Vec<String> = hosts
        .iter()
        .map(|h| format!("{}/primary", rest_url(h)))
        .collect();
    let answers = futures::future::join_all(urls.iter().map(|url| get_small(client, url))).await;
    hosts
        .iter()
        .zip(answers)
        .find(|(_, answer)| matches!(answer, Ok((200, _))))
        .map(|(h, _)| h.name.clone())
}

/// The name of the db host that is the primary now, from any host configs of the cluster
/// (each holds the whole cluster view), e.g. `Layout::load_configs()`'s.
pub async fn primary(configs: &[HostConfig]) -> Option<String> {
    let any = configs.first()?;
    primary_in(&rest_client(any).ok()?, &any.cluster).await
}

/// `GET <client_url>/health` of an etcd member: `Ok` when it answers `"health":"true"`.
pub async fn etcd_health(client: &reqwest::Client, etcd: &EtcdConfig) -> Result<(), String> {
    let (status, body) = get_small(client, &format!("{}/health", etcd.client_url)).await?;
    let json: Value = serde_json::from_slice(&body).unwrap_or_default();
    if status == 200 && json["health"] == "true" {
        Ok(())
    } else {
        Err(format!(
            "etcd unhealthy: HTTP {status} {}",
            String::from_utf8_lossy(&body).trim()
        ))
    }
}
