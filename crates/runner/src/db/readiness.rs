//! When the database of a starting cluster is ready, and why not.

use std::time::Instant;

use serde::Serialize;

use streaming_core::config::{ClusterConfig, HostConfig, Role};

use super::{Patroni, REPLICA_GRACE, log_files, member, members, primary_in, rest_client};
use crate::cluster::Layout;

/// What `up` learned about the database while it waited.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Readiness {
    /// The db host holding the leader lock.
    pub primary: Option<String>,
    /// Seconds from the start of `up` until `/primary` answered 200.
    pub primary_s: Option<f64>,
    /// Replicas streaming from the primary.
    pub streaming: Vec<String>,
    /// Seconds from the start of `up` until a replica streamed.
    pub streaming_s: Option<f64>,
}

impl Readiness {
    /// One round of checks (each request bounded by [`REST_TIMEOUT`](super::REST_TIMEOUT)).
    pub async fn poll(&mut self, client: &Patroni, cluster: &ClusterConfig, started: Instant) {
        if self.primary.is_none() {
            self.primary = primary_in(client, cluster).await;
            if self.primary.is_some() {
                self.primary_s = Some(started.elapsed().as_secs_f64());
            }
        }
        if let Some(primary) = &self.primary
            && self.streaming.is_empty()
            && let Some(entry) = cluster.host(primary)
            && let Ok(member) = member(client, entry).await
        {
            self.streaming = member.only_members(cluster).streaming;
            if !self.streaming.is_empty() {
                self.streaming_s = Some(started.elapsed().as_secs_f64());
            }
        }
    }

    /// Done waiting: a primary, and a streaming replica or [`REPLICA_GRACE`] spent on it
    /// (a single db host has none to wait for).
    pub fn settled(&self, cluster: &ClusterConfig, started: Instant) -> bool {
        let Some(primary_s) = self.primary_s else {
            return false;
        };
        !self.streaming.is_empty()
            || cluster.hosts_with_role(Role::Db).count() < 2
            || started.elapsed().as_secs_f64() - primary_s > REPLICA_GRACE.as_secs_f64()
    }
}

/// Why no primary appeared: each db host's Patroni answer and where its logs are.
pub async fn explain_no_primary(layout: &Layout, configs: &[HostConfig]) -> String {
    let Some(any) = configs.first() else {
        return "no host config".into();
    };
    let client = match rest_client(any) {
        Ok(c) => c,
        Err(e) => return format!("{e:#}"),
    };
    let mut lines = Vec::new();
    for (name, answer) in members(&client, &any.cluster).await {
        let state = match answer {
            Ok(m) => format!("Patroni says {} ({})", m.role, m.state),
            Err(e) => format!("Patroni REST: {e}"),
        };
        let logs: Vec<String> = configs
            .iter()
            .find(|c| c.name == name)
            .map(|c| log_files(layout, c))
            .unwrap_or_default()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        lines.push(format!("  {name}: {state}; logs: {}", logs.join(", ")));
    }
    lines.join("\n")
}
