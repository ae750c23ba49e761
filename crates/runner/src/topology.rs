//! Changes to the host list of a running local cluster: `streamctl add`, `drain` and `sync`
//! regenerate every config, start or stop what changed and SIGHUP the rest.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;
use streaming_core::config::{HostConfig, Role};

use crate::cluster::{self, Layout};
use crate::db;
use crate::hosts::{STOP_GRACE, Started, start_host};
use crate::probe;
use crate::procs;
use crate::status::PROBE_TIMEOUT;

/// What a topology change (`add`, `drain`, `sync`) did.
#[derive(Debug, Default, Serialize)]
pub struct TopologyReport {
    /// Hosts started.
    pub started: Vec<String>,
    /// Hosts sent SIGHUP to re-read their (rewritten) config.
    pub reloaded: Vec<String>,
    /// Hosts stopped because they left the host list.
    pub removed: Vec<String>,
    /// Listed hosts whose process is not running (`streamctl add NAME` or `start NAME`).
    pub not_running: Vec<String>,
    /// Hosts currently drained.
    pub drained: Vec<String>,
}

/// Re-evaluates the host list, rewrites every config (certificates and secrets for new hosts),
/// and returns the new configs plus the hosts that left the list.
fn regenerate(
    layout: &Layout,
    source: &cluster::Source,
) -> anyhow::Result<(BTreeMap<String, HostConfig>, Vec<String>)> {
    let before: Vec<String> = layout.load_configs()?.into_iter().map(|c| c.name).collect();
    // Names that left the list are dropped from the drained list too.
    let mut drained = cluster::read_drained(layout)?;
    let configs = cluster::generate(layout, source)?;
    if drained.iter().any(|d| !configs.contains_key(d)) {
        drained.retain(|d| configs.contains_key(d));
        cluster::write_drained(layout, &drained)?;
    }
    cluster::materialise(layout, &configs)?;
    source.save(layout)?;
    let removed = before
        .into_iter()
        .filter(|name| !configs.contains_key(name))
        .collect();
    Ok((configs, removed))
}

/// SIGHUP to the main process of every running host (not its group: ffmpeg children would
/// die of it), so services re-read config and secrets without a restart.
fn reload_running(
    layout: &Layout,
    configs: &BTreeMap<String, HostConfig>,
    skip: Option<&str>,
    report: &mut TopologyReport,
) {
    let mut ordered: Vec<&HostConfig> = configs.values().collect();
    ordered.sort_by_key(|c| (cluster::start_rank(c.me().role), c.name.clone()));
    for config in ordered {
        let name = &config.name;
        if config.me().role == Role::Db || skip == Some(name.as_str()) {
            continue;
        }
        match procs::live_pid(&layout.pid_file(name), &layout.config_file(name)) {
            Some(pid) if procs::signal_pid(pid, libc::SIGHUP) => report.reloaded.push(name.clone()),
            _ => report.not_running.push(name.clone()),
        }
    }
}

/// Stops hosts that left the host list (after the others reloaded, so LBs no longer send
/// viewers there) and deletes their config and pid files.
fn stop_removed(layout: &Layout, removed: &[String], report: &mut TopologyReport) {
    for name in removed {
        let pid = procs::live_pid(&layout.pid_file(name), &layout.config_file(name));
        match layout.load_config(name) {
            Ok(config) if config.patroni.is_some() => {
                db::stop_host(&config, pid, STOP_GRACE);
            }
            _ => {
                if let Some(pid) = pid {
                    procs::stop_group(pid, STOP_GRACE);
                }
            }
        }
        let _ = std::fs::remove_file(layout.config_file(name));
        let _ = std::fs::remove_file(layout.pid_file(name));
        let _ = std::fs::remove_file(layout.service_file(name));
        report.removed.push(name.clone());
    }
}

/// Waits until a started host answers `/healthz` (broadcasts: once they have a live segment).
async fn wait_healthy(layout: &Layout, config: &HostConfig, timeout: Duration) -> bool {
    let Ok(client) = probe::client(&layout.ca().cert, PROBE_TIMEOUT) else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if probe::healthy(&client, &config.me().url).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    false
}

/// Which host list to read: the one recorded in the state dir unless given.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListSource<'a> {
    pub cluster: Option<&'a Path>,
    pub address_prefix: Option<&'a str>,
}

/// `streamctl add NAME`: the host's entry is in the cluster file; generate, start it, reload
/// the others, then wait up to `wait` for it to be healthy. Also takes a drained host back
/// into service.
pub async fn add(
    layout: &Layout,
    name: &str,
    list: ListSource<'_>,
    wait: Duration,
    say: &dyn Fn(&str),
) -> anyhow::Result<TopologyReport> {
    if !streaming_core::config::is_safe_name(name) {
        bail!("{name:?} is not a host name");
    }
    let source = cluster::Source::resolve(layout, list.cluster, list.address_prefix)?;
    let mut drained = cluster::read_drained(layout)?;
    let undrained = drained.remove(name);
    if undrained {
        cluster::write_drained(layout, &drained)?;
    }
    let (configs, removed) = regenerate(layout, &source)?;
    let Some(config) = configs.get(name) else {
        bail!(
            "{name} is not in {}: add its entry to `hosts` first",
            source.cluster.display()
        );
    };
    if config.me().role == Role::Db {
        bail!(
            "{name}: db hosts join the etcd/Patroni cluster only with `up` (etcd membership is \
             fixed at bootstrap); `streamctl start {name}` restarts a stopped one"
        );
    }
    let mut report = TopologyReport::default();
    let fresh = match start_host(layout, config)? {
        Started::Fresh(pid) => {
            let me = config.me();
            say(&format!(
                "{name}: started {} pid {pid} at {}",
                me.role, me.url
            ));
            report.started.push(name.to_owned());
            true
        }
        Started::AlreadyUp(pid) => {
            let what = if undrained { ", back in service" } else { "" };
            say(&format!("{name}: already up (pid {pid}){what}"));
            false
        }
    };
    // The new host already read its config; everyone else learns about it now.
    reload_running(layout, &configs, fresh.then_some(name), &mut report);
    stop_removed(layout, &removed, &mut report);
    report.drained = drained.into_iter().collect();
    if fresh && !wait.is_zero() {
        if wait_healthy(layout, config, wait).await {
            say(&format!("{name}: healthy; the LBs use it within a second"));
        } else {
            say(&format!(
                "{name}: not healthy after {} s (see {})",
                wait.as_secs(),
                layout.out_file(name).display()
            ));
        }
    }
    Ok(report)
}

/// `streamctl drain NAME`.
pub fn drain(
    layout: &Layout,
    name: &str,
    cluster: Option<&Path>,
    say: &dyn Fn(&str),
) -> anyhow::Result<TopologyReport> {
    let config = layout.load_config(name)?;
    let mut drained = cluster::read_drained(layout)?;
    drained.insert(name.to_owned());
    cluster::write_drained(layout, &drained)?;
    let report = sync(layout, cluster)?;
    if config.me().role == Role::Broadcast {
        say(&format!(
            "{name}: draining: the LBs assign it no new viewers and its viewers move at their \
             next playlist request.\n`streamctl add {name}` takes it back; removing its entry \
             from the cluster file and `streamctl sync` take it out for good."
        ));
    } else {
        say(&format!(
            "{name}: marked drained in every config; only broadcasts act on it so far"
        ));
    }
    Ok(report)
}

/// Takes a drained host back (the end of its turn in a rolling upgrade): off the drained list,
/// every config rewritten and reloaded. Unlike [`add`], starts nothing.
pub fn undrain(layout: &Layout, name: &str) -> anyhow::Result<TopologyReport> {
    let mut drained = cluster::read_drained(layout)?;
    if drained.remove(name) {
        cluster::write_drained(layout, &drained)?;
    }
    sync(layout, None)
}

/// `streamctl sync`: re-read the cluster file, stop hosts no longer listed, reload the rest.
pub fn sync(layout: &Layout, cluster: Option<&Path>) -> anyhow::Result<TopologyReport> {
    let source = cluster::Source::resolve(layout, cluster, None)?;
    let (configs, removed) = regenerate(layout, &source)?;
    let mut report = TopologyReport::default();
    reload_running(layout, &configs, None, &mut report);
    stop_removed(layout, &removed, &mut report);
    report.drained = cluster::read_drained(layout)?.into_iter().collect();
    Ok(report)
}
