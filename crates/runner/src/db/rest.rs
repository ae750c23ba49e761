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
    identity_client(config, REST_TIMEOUT)
}

/// `POST /switchover` to the primary: Patroni stops it, lets `candidate` (a synchronous
/// standby) catch up and promotes it, then restarts the old primary as its replica, without a
/// single acknowledged commit lost; it answers once done. A request that changes state needs
/// a certificate of the cluster CA and the REST credentials, which `config` (a db host's)
/// holds.
pub async fn switchover(
    config: &HostConfig,
    primary: &HostEntry,
    candidate: &str,
) -> anyhow::Result<String> {
    // Patroni checks, stops, waits for the candidate and promotes it before answering.
    let client = identity_client(config, SWITCHOVER_TIMEOUT)?;
    let password = streaming_core::secrets::read_secret(&config.paths.db_superuser_password)?;
    let response = client
        .post(format!("{}/switchover", rest_url(primary)))
        .basic_auth(super::RESTAPI_USER, Some(password))
        .json(&serde_json::json!({"leader": primary.name, "candidate": candidate}))
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", PatroniError::from(e)))
        .with_context(|| format!("switchover request to {}", primary.name))?;
    let status = response.status();
    let body = read_limited(response, MAX_REST_BYTES)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{} refused the switchover to {candidate}: HTTP {status} {body}",
            primary.name
        );
    }
    Ok(body)
}

/// Patroni answers a switchover once the candidate is promoted: seconds, not milliseconds.
const SWITCHOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A client showing this host's certificate and key (etcd, Patroni's state-changing requests).
fn identity_client(
    config: &HostConfig,
    timeout: std::time::Duration,
) -> anyhow::Result<reqwest::Client> {
    let paths = &config.paths;
    let mut pem = std::fs::read(&paths.tls_cert)
        .with_context(|| format!("read {}", paths.tls_cert.display()))?;
    pem.extend(
        std::fs::read(&paths.tls_key)
            .with_context(|| format!("read {}", paths.tls_key.display()))?,
    );
    let identity = reqwest::Identity::from_pem(&pem)
        .with_context(|| format!("{} + {}", paths.tls_cert.display(), paths.tls_key.display()))?;
    Ok(cluster_client_builder(&paths.ca_cert, timeout)?
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
