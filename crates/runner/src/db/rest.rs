//! Asking Patroni and etcd over their HTTPS APIs: who is primary, who streams, is etcd healthy.

use anyhow::Context;
use serde::Serialize;
use streaming_core::client::{cluster_client_builder, read_limited};
use streaming_core::patroni::PatroniError;
pub use streaming_core::patroni::{Patroni, rest_url};

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

/// A client of Patroni's REST API, trusting only the cluster CA. It shows no client
/// certificate: reads need none.
pub fn rest_client(config: &HostConfig) -> anyhow::Result<Patroni> {
    Ok(Patroni::new(&config.paths.ca_cert, REST_TIMEOUT)?)
}

/// An HTTPS client for etcd, which refuses clients without a certificate from the cluster CA:
/// it shows the host's own.
pub fn etcd_client(config: &HostConfig) -> anyhow::Result<reqwest::Client> {
    let paths = &config.paths;
    let mut pem = std::fs::read(&paths.tls_cert)
        .with_context(|| format!("read {}", paths.tls_cert.display()))?;
    pem.extend(
        std::fs::read(&paths.tls_key)
            .with_context(|| format!("read {}", paths.tls_key.display()))?,
    );
    let identity = reqwest::Identity::from_pem(&pem)
        .with_context(|| format!("{} + {}", paths.tls_cert.display(), paths.tls_key.display()))?;
    Ok(cluster_client_builder(&paths.ca_cert, REST_TIMEOUT)?
        .https_only(true)
        .identity(identity)
        .build()?)
}

/// `GET /patroni` of one db host.
pub async fn member(client: &Patroni, host: &HostEntry) -> Result<Member, String> {
    let (status, json) = client.document(host).await.map_err(|e| e.to_string())?;
    parse_member(&json).ok_or_else(|| format!("HTTP {status} without role/state: {json}"))
}

/// Every db host of the cluster with its Patroni state (asked concurrently).
pub async fn members(
    client: &Patroni,
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
pub async fn primary_in(client: &Patroni, cluster: &ClusterConfig) -> Option<String> {
    let hosts: Vec<&HostEntry> = cluster.hosts_with_role(Role::Db).collect();
    client.primary(&hosts).await.map(|h| h.name.clone())
}

/// The name of the db host that is the primary now, from any host configs of the cluster
/// (each holds the whole cluster view), e.g. `Layout::load_configs()`'s.
pub async fn primary(configs: &[HostConfig]) -> Option<String> {
    let any = configs.first()?;
    primary_in(&rest_client(any).ok()?, &any.cluster).await
}

/// `GET <client_url>/health` of an etcd member: `Ok` when it answers `"health":"true"`.
pub async fn etcd_health(client: &reqwest::Client, etcd: &EtcdConfig) -> Result<(), String> {
    let response = client
        .get(format!("{}/health", etcd.client_url))
        .send()
        .await
        .map_err(|e| PatroniError::from(e).to_string())?;
    let status = response.status().as_u16();
    let body = read_limited(response, MAX_REST_BYTES)
        .await
        .map_err(|e| e.to_string())?;
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
