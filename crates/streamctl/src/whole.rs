//! "Whole again": what the failover matrix and the chaos schedule wait for after a restore:
//! every host up and healthy, as `streamctl status` sees it, plus the database primary
//! streaming to every other db host, so the next fault never fails a primary whose replica
//! could not take over.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `Ok` when whole, not counting the hosts in `stopped` (stopped on purpose, as the sources
/// are while an outside publisher is measured); else what is missing, for the operator.
pub fn whole(state: &Path, stopped: &[String]) -> Result<(), String> {
    let text =
        crate::bench::streamctl(state, &["status", "--json"]).map_err(|e| format!("{e:#}"))?;
    let hosts: Vec<Value> =
        serde_json::from_str(&text).map_err(|e| format!("streamctl status --json: {e}"))?;
    let name = |h: &Value| h["name"].as_str().unwrap_or("?").to_owned();
    let mut missing = Vec::new();
    for h in hosts.iter().filter(|h| !stopped.contains(&name(h))) {
        if h["up"] != true || h["health"] != "ok" {
            missing.push(format!(
                "{} {}",
                name(h),
                h["health"].as_str().unwrap_or("down")
            ));
        }
    }
    let dbs: Vec<String> = hosts
        .iter()
        .filter(|h| h["role"] == "db")
        .map(name)
        .collect();
    if dbs.len() > 1 {
        match hosts.iter().find(|h| h["db_role"] == "primary") {
            None => missing.push("no db primary".to_owned()),
            Some(primary) => {
                let streaming: Vec<&str> = primary["db_streaming"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                for db in dbs.iter().filter(|d| **d != name(primary)) {
                    if !streaming.contains(&db.as_str()) {
                        missing.push(format!("{db} not streaming from {}", name(primary)));
                    }
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(missing.join(", "))
    }
}

/// Seconds until whole (see [`whole`]), or what was still missing at `limit`.
pub async fn wait_whole(state: &Path, stopped: &[String], limit: Duration) -> Result<f64, String> {
    let start = Instant::now();
    loop {
        let state: PathBuf = state.to_owned();
        let stopped = stopped.to_vec();
        let now = tokio::task::spawn_blocking(move || whole(&state, &stopped))
            .await
            .unwrap_or_else(|e| Err(format!("status task: {e}")));
        match now {
            Ok(()) => return Ok(start.elapsed().as_secs_f64()),
            Err(missing) if start.elapsed() >= limit => return Err(missing),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
