//! `streamctl upgrade`: every host of the local cluster restarted in turn on the build there
//! is now, as `nix run .#deploy` switches real hosts (docs/deploy.md), with no stall for
//! viewers and no acknowledged chat message lost.
//!
//! Per host ([`order`] says which and when): wait until the cluster could lose it ([`gates`]);
//! a broadcast is drained first (the LBs stop sending it viewers, its viewers move at their
//! next playlist request) and its viewers waited for; the database primary first hands over to
//! its synchronous standby by a Patroni switchover; then the host stops cleanly and starts
//! again, and the next one waits until the cluster is whole again. An interrupt lets the host
//! in hand finish, so every host is left either old and healthy or new and healthy.

pub mod gates;
pub mod local;
pub mod nixos;
pub mod order;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use streaming_core::config::{HostConfig, Role};
use streaming_core::status::BroadcastStatus;

use crate::status::HostStatus;
use crate::{db, probe};
pub use local::LocalFleet;
pub use nixos::NixosFleet;
pub use order::{Selection, Step};

/// The hosts being upgraded and how to act on them: the local cluster's processes
/// ([`LocalFleet`]) or NixOS hosts over ssh with deploy-rs ([`NixosFleet`]). The order, the
/// waits and the report are the same for both ([`upgrade`]).
// Only used with concrete types of this crate: no caller needs a `Send` bound on the futures.
#[allow(async_fn_in_trait)]
pub trait Fleet {
    /// The cluster's host configs, with this machine's CA and ops token paths.
    fn configs(&self) -> &[HostConfig];
    /// A client trusting the cluster's certificates.
    fn client(&self) -> &reqwest::Client;
    /// The ops token `/status` asks for.
    fn token(&self) -> Option<&str>;
    /// Every host's status now.
    async fn statuses(&self) -> anyhow::Result<Vec<HostStatus>>;
    /// Before the first host is touched: whatever can fail without touching one (NixOS: build
    /// every chosen host's system).
    async fn prepare(&self, steps: &[Step]) -> anyhow::Result<()>;
    /// What only this kind of fleet can check of one host (NixOS: its units, its system).
    async fn host_ready(&self, host: &str) -> Result<(), String>;
    /// The LBs stop sending the broadcast viewers; its viewers move at their next request.
    async fn drain(&self, host: &str) -> anyhow::Result<()>;
    async fn undrain(&self, host: &str) -> anyhow::Result<()>;
    /// The host on its new build: restarted, or switched to its new system. What was done.
    async fn replace(&self, host: &str) -> anyhow::Result<String>;
    /// Patroni hands the primary role from `primary` to `candidate`.
    async fn switchover(&self, primary: &str, candidate: &str) -> anyhow::Result<String>;
}

/// How long each wait may last.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For the cluster to be whole again after a host's restart (or before the first).
    pub ready: Duration,
    /// For a drained broadcast's viewers to leave.
    pub drain: Duration,
}

/// One host's turn, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub host: String,
    pub role: Role,
    /// The database primary: the replica it handed over to, and how long that took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub switchover_s: Option<f64>,
    /// Broadcasts: from the drain until no viewer was left (or the drain limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_s: Option<f64>,
    /// Broadcasts: viewers still counted when it stopped (0 when all had moved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewers_left: Option<u64>,
    /// Stop and start.
    pub restart_s: f64,
    /// From the start until the cluster was whole again.
    pub ready_s: f64,
    pub total_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpgradeReport {
    pub hosts: Vec<HostReport>,
    pub total_s: f64,
    /// Hosts not done because the operator interrupted.
    pub skipped: Vec<String>,
}

/// Upgrades the selected hosts one at a time. `stop` set (by an interrupt) ends the run after
/// the host in hand. `say` tells the operator what happens.
pub async fn upgrade<F: Fleet>(
    fleet: &F,
    selection: &Selection,
    limits: Limits,
    stop: &AtomicBool,
    say: &dyn Fn(&str),
) -> anyhow::Result<UpgradeReport> {
    let started = Instant::now();
    let configs = fleet.configs();
    let cluster = &configs.first().context("no host configs")?.cluster;
    wait_ready(fleet, None, limits.ready)
        .await
        .map_err(|missing| anyhow!("the cluster is not whole, nothing was touched: {missing}"))?;
    let primary = db::primary(configs).await;
    let steps = order::order(&cluster.hosts, selection, primary.as_deref())?;
    fleet.prepare(&steps).await?;
    say(&format!(
        "upgrading {} host(s) in this order: {}",
        steps.len(),
        steps
            .iter()
            .map(|s| s.host.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    for step in &steps {
        if stop.load(Ordering::SeqCst) {
            skipped.push(step.host.clone());
            continue;
        }
        let report = one_host(fleet, step, limits, say).await?;
        say(&format!(
            "{}: done in {:.1} s (restart {:.1} s, whole again {:.1} s later)",
            report.host, report.total_s, report.restart_s, report.ready_s
        ));
        reports.push(report);
    }
    if !skipped.is_empty() {
        say(&format!(
            "interrupted: not upgraded: {} (every other host is upgraded and healthy)",
            skipped.join(", ")
        ));
    }
    Ok(UpgradeReport {
        hosts: reports,
        total_s: started.elapsed().as_secs_f64(),
        skipped,
    })
}

/// Seconds until the cluster may lose its next host (`host`, just replaced, checked by the
/// fleet too), or what was still missing at `limit`.
pub async fn wait_ready<F: Fleet>(
    fleet: &F,
    host: Option<&str>,
    limit: Duration,
) -> Result<f64, String> {
    let start = Instant::now();
    let probe = gates::Probe {
        configs: fleet.configs(),
        client: fleet.client(),
        token: fleet.token(),
    };
    loop {
        let verdict = match fleet.statuses().await {
            Ok(hosts) => match gates::ready(&hosts, &probe).await {
                Ok(()) => match host {
                    Some(host) => fleet.host_ready(host).await,
                    None => Ok(()),
                },
                Err(missing) => Err(missing),
            },
            Err(e) => Err(format!("status: {e:#}")),
        };
        match verdict {
            Ok(()) => return Ok(start.elapsed().as_secs_f64()),
            Err(missing) if start.elapsed() >= limit => return Err(missing),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// One host's turn: hand over or drain, replace, wait until whole, take back.
async fn one_host<F: Fleet>(
    fleet: &F,
    step: &Step,
    limits: Limits,
    say: &dyn Fn(&str),
) -> anyhow::Result<HostReport> {
    let name = step.host.as_str();
    let t0 = Instant::now();
    let mut report = HostReport {
        host: name.to_owned(),
        role: step.role,
        switchover_to: step.switchover_to.clone(),
        switchover_s: None,
        drain_s: None,
        viewers_left: None,
        restart_s: 0.0,
        ready_s: 0.0,
        total_s: 0.0,
    };
    if let Some(candidate) = &step.switchover_to {
        say(&format!("{name}: switchover to {candidate}"));
        report.switchover_s = Some(switchover(fleet, name, candidate, limits.ready).await?);
    }
    let draining = step.role == Role::Broadcast;
    if draining {
        fleet.drain(name).await?;
        let (seconds, left) = viewers_gone(fleet, name, limits.drain).await;
        say(&format!(
            "{name}: drained; {left} viewer(s) left after {seconds:.1} s"
        ));
        report.drain_s = Some(seconds);
        report.viewers_left = Some(left);
    }
    let replace_started = Instant::now();
    say(&fleet.replace(name).await?);
    report.restart_s = replace_started.elapsed().as_secs_f64();
    report.ready_s = wait_ready(fleet, Some(name), limits.ready)
        .await
        .map_err(|missing| {
            anyhow!(
                "{name}: the cluster was not whole {:.0} s after it was replaced: {missing}{}",
                limits.ready.as_secs_f64(),
                if draining {
                    format!("; {name} stays drained")
                } else {
                    String::new()
                }
            )
        })?;
    if draining {
        fleet.undrain(name).await?;
    }
    report.total_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Hands the primary role from `primary` to `candidate` and waits until the cluster is whole
/// with `candidate` primary (the old primary streaming from it as its synchronous standby).
async fn switchover<F: Fleet>(
    fleet: &F,
    primary: &str,
    candidate: &str,
    limit: Duration,
) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    fleet.switchover(primary, candidate).await?;
    while db::primary(fleet.configs()).await.as_deref() != Some(candidate) {
        if t0.elapsed() > limit {
            bail!("{candidate} was not primary {limit:?} after the switchover");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_ready(fleet, None, limit)
        .await
        .map_err(|missing| anyhow!("after the switchover to {candidate}: {missing}"))?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Waits until the drained broadcast counts no viewer (they moved at their next playlist
/// request) or `limit`: seconds waited and viewers still counted.
async fn viewers_gone<F: Fleet>(fleet: &F, name: &str, limit: Duration) -> (f64, u64) {
    let t0 = Instant::now();
    let Some(url) = fleet
        .configs()
        .first()
        .and_then(|c| c.cluster.hosts.iter().find(|h| h.name == name))
        .map(|h| h.url.clone())
    else {
        return (0.0, 0);
    };
    loop {
        let viewers = probe::status::<BroadcastStatus>(fleet.client(), &url, fleet.token())
            .await
            .map_or(0, |s| s.viewers);
        if viewers == 0 || t0.elapsed() >= limit {
            return (t0.elapsed().as_secs_f64(), viewers);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
