//! What `streamctl status` shows of every host: process, health, load, database role, cuts.

use std::time::Duration;

use serde::Serialize;
use streaming_core::config::{HostConfig, Role};
use streaming_core::status::{BroadcastStatus, IngestStatus};

use crate::cluster::Layout;
use crate::db;
use crate::hosts::host_liveness;
use crate::partition;
use crate::probe;
use crate::procs::{self, Liveness};

/// Timeout of one health or status request (a hung host must not stall `status`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub name: String,
    pub role: Role,
    pub url: String,
    /// The host's process group: its supervisor (or a db host's `streamctl db-host`).
    pub pid: Option<i32>,
    /// The role's service process under the supervisor (not for db hosts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_pid: Option<i32>,
    /// Times the supervisor restarted the service after a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restarts: Option<u64>,
    /// How the previous service process ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Process alive and not stopped.
    pub up: bool,
    pub process: Liveness,
    /// "ok", or why `/healthz` failed; db hosts: "ok" when Patroni reports its PostgreSQL
    /// running, else Patroni's state or why its REST API did not answer.
    pub health: Option<String>,
    /// Broadcasts: viewers, Mbit/s sent, free viewer slots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewers: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_mbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_viewers: Option<u64>,
    /// Ingests: the source currently used, per channel ("channel=source").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_source: Option<String>,
    /// Ingests: the channels whose outside publisher (OBS, through an LB) is connected here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publisher_of: Option<Vec<String>>,
    /// Db hosts: Patroni's role (`primary`, `replica`, ...) from its REST `/patroni`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_role: Option<String>,
    /// Db hosts: Patroni's state (`running`, `starting`, `creating replica`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_state: Option<String>,
    /// Db primary: replicas streaming from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_streaming: Option<Vec<String>>,
    /// Hosts with an etcd member: "ok" or why its `/health` failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<String>,
    /// Active network cuts this host is part of (`streamctl partition`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<String>,
}

/// The ops token `/status` asks for. Every host reads the same token file; a cluster from
/// before it existed has none yet.
pub fn ops_token(configs: &[HostConfig]) -> Option<String> {
    configs
        .first()
        .and_then(|c| c.paths.metrics_token.as_deref())
        .and_then(|path| streaming_core::secrets::read_secret(path).ok())
}

/// Every host's status, asked in parallel (a hung host costs [`PROBE_TIMEOUT`], not more).
pub async fn collect(layout: &Layout) -> anyhow::Result<Vec<HostStatus>> {
    let configs = layout.load_configs()?;
    let client = probe::client(&layout.ca().cert, PROBE_TIMEOUT)?;
    let token = ops_token(&configs);
    let checks = configs
        .iter()
        .map(|config| host_status(Some(layout), &client, config, token.as_deref()));
    let mut statuses: Vec<HostStatus> = futures::future::join_all(checks).await;
    let cuts = partition::active(layout);
    for s in &mut statuses {
        s.partitions = partition::describe_for(&cuts, &s.name);
    }
    Ok(statuses)
}

/// Every host's status seen from outside, over HTTPS only: hosts this machine did not start
/// (NixOS hosts, for `streamctl upgrade --nixos`). No process is visible, so a host counts as
/// up and its health says the rest; etcd members are not asked (they want a cluster
/// certificate). `configs`' CA and ops token paths are this machine's files.
pub async fn collect_remote(
    configs: &[HostConfig],
    client: &reqwest::Client,
    token: Option<&str>,
) -> Vec<HostStatus> {
    let checks = configs
        .iter()
        .map(|config| host_status(None, client, config, token));
    futures::future::join_all(checks).await
}

/// One host's status; `layout` is the local cluster's state dir (its processes and etcd
/// members are then looked at too).
async fn host_status(
    layout: Option<&Layout>,
    client: &reqwest::Client,
    config: &HostConfig,
    token: Option<&str>,
) -> HostStatus {
    let me = config.me();
    let (pid, process, service) = match layout {
        Some(layout) => {
            let pid = procs::live_pid(&layout.pid_file(&me.name), &layout.config_file(&me.name));
            let (process, service) = host_liveness(layout, &me.name, pid);
            (pid, process, service)
        }
        None => (None, Liveness::Running, None),
    };
    let mut status = HostStatus {
        name: me.name.clone(),
        role: me.role,
        url: me.url.clone(),
        pid,
        service_pid: service.as_ref().map(|s| s.pid).filter(|p| *p > 0),
        restarts: service.as_ref().map(|s| s.restarts),
        last_exit: service.and_then(|s| s.last_exit),
        up: process == Liveness::Running,
        process,
        health: None,
        viewers: None,
        egress_mbps: None,
        free_viewers: None,
        active_source: None,
        publisher_of: None,
        db_role: None,
        db_state: None,
        db_streaming: None,
        etcd: None,
        partitions: Vec::new(),
    };
    if let Some(etcd) = config.etcd.as_ref().filter(|_| layout.is_some()) {
        status.etcd = Some(match db::etcd_client(config) {
            Ok(client) => match db::etcd_health(&client, etcd).await {
                Ok(()) => "ok".into(),
                Err(e) => e,
            },
            Err(e) => format!("{e:#}"),
        });
    }
    if me.role == Role::Db {
        // No HTTPS service here: health is Patroni's view of its PostgreSQL.
        let answer = match db::rest_client(config) {
            Ok(client) => db::member(&client, me).await,
            Err(e) => Err(format!("{e:#}")),
        };
        status.health = Some(match answer {
            Ok(member) => {
                let member = member.only_members(&config.cluster);
                let health = if member.state == "running" {
                    "ok".to_owned()
                } else {
                    member.state.clone()
                };
                if member.role == "primary" {
                    status.db_streaming = Some(member.streaming.clone());
                }
                status.db_role = Some(member.role);
                status.db_state = Some(member.state);
                health
            }
            Err(e) => format!("patroni: {e}"),
        });
        return status;
    }
    status.health = Some(match probe::healthy(client, &me.url).await {
        Ok(()) => "ok".into(),
        Err(e) => e,
    });
    if !matches!(me.role, Role::Broadcast | Role::Ingest) || process != Liveness::Running {
        return status;
    }
    if me.role == Role::Broadcast {
        if let Some(load) = probe::status::<BroadcastStatus>(client, &me.url, token).await {
            status.viewers = Some(load.viewers);
            status.egress_mbps = Some(load.egress_mbps);
            status.free_viewers = Some(load.free_viewers);
        }
    } else if let Some(ingest) = probe::status::<IngestStatus>(client, &me.url, token).await {
        status.active_source = active_source(&ingest);
        status.publisher_of = Some(publisher_of(&ingest));
    }
    status
}

/// The active source of each channel of an ingest, as `test=source1`.
pub fn active_source(ingest: &IngestStatus) -> Option<String> {
    let parts: Vec<String> = ingest
        .channels
        .iter()
        .map(|(name, c)| format!("{name}={}", c.active_source.as_deref().unwrap_or("none")))
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// The channels with an outside publisher connected to an ingest.
pub fn publisher_of(ingest: &IngestStatus) -> Vec<String> {
    ingest
        .channels
        .iter()
        .filter(|(_, c)| c.outside_publishers > 0)
        .map(|(name, _)| name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_source_and_publisher_per_channel() {
        let ingest: IngestStatus = serde_json::from_value(serde_json::json!({
            "name": "ingest1", "role": "ingest", "channels": {
                "test": {"active_source": "source2", "outside_publishers": 1},
                "idle": {"active_source": null}
            }
        }))
        .unwrap();
        assert_eq!(
            active_source(&ingest).as_deref(),
            Some("idle=none test=source2")
        );
        assert_eq!(publisher_of(&ingest), ["test"]);
        let empty: IngestStatus = serde_json::from_value(
            serde_json::json!({"name": "ingest1", "role": "ingest", "channels": {}}),
        )
        .unwrap();
        assert_eq!(active_source(&empty), None);
    }
}
