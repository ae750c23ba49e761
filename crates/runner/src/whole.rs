//! "Whole again": what the failover matrix and the chaos schedule wait for after a restore,
//! and a rolling upgrade before and after each host: every host up and healthy, as
//! `streamctl status` sees it, plus the database primary streaming to every other db host, so
//! the next fault never fails a primary whose replica could not take over.

use std::path::Path;
use std::time::{Duration, Instant};

use streaming_core::config::Role;

use crate::cluster::Layout;
use crate::status::{self, HostStatus};

/// `Ok` when whole, not counting the hosts in `stopped` (stopped on purpose, as the sources
/// are while an outside publisher is measured); else what is missing, for the operator.
pub async fn whole(state: &Path, stopped: &[String]) -> Result<(), String> {
    let layout = Layout::new(state).map_err(|e| format!("{e:#}"))?;
    let hosts = status::collect(&layout)
        .await
        .map_err(|e| format!("status: {e:#}"))?;
    let missing = missing(&hosts, stopped);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

/// What keeps `hosts` from being whole (see [`whole`]).
pub fn missing(hosts: &[HostStatus], stopped: &[String]) -> Vec<String> {
    let mut missing = Vec::new();
    for h in hosts.iter().filter(|h| !stopped.contains(&h.name)) {
        if !h.up || h.health.as_deref() != Some("ok") {
            missing.push(format!(
                "{} {}",
                h.name,
                h.health.as_deref().unwrap_or("down")
            ));
        }
    }
    let dbs: Vec<&str> = hosts
        .iter()
        .filter(|h| h.role == Role::Db)
        .map(|h| h.name.as_str())
        .collect();
    if dbs.len() > 1 {
        match hosts
            .iter()
            .find(|h| h.db_role.as_deref() == Some("primary"))
        {
            None => missing.push("no db primary".to_owned()),
            Some(primary) => {
                let streaming = primary.db_streaming.as_deref().unwrap_or_default();
                for db in dbs.iter().filter(|d| **d != primary.name) {
                    if !streaming.iter().any(|s| s == db) {
                        missing.push(format!("{db} not streaming from {}", primary.name));
                    }
                }
            }
        }
    }
    missing
}

/// Seconds until whole (see [`whole`]), or what was still missing at `limit`.
pub async fn wait_whole(state: &Path, stopped: &[String], limit: Duration) -> Result<f64, String> {
    let start = Instant::now();
    loop {
        match whole(state, stopped).await {
            Ok(()) => return Ok(start.elapsed().as_secs_f64()),
            Err(missing) if start.elapsed() >= limit => return Err(missing),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
