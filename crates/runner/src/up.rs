//! `streamctl up`: every host of the cluster started in order, then waiting until the stream
//! plays through an LB and the database has a primary (and a streaming replica).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use streaming_core::config::{HostConfig, Role};

use crate::cluster::{self, Layout};
use crate::db;
use crate::hosts::{Started, host_liveness, prepare_partitions, start_host};
use crate::probe;
use crate::procs::{self, Liveness};
use crate::status::PROBE_TIMEOUT;

/// Timeout of each request of the playback check in `up`.
pub const PLAY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize)]
pub struct HostSummary {
    pub name: String,
    pub role: Role,
    pub url: String,
    pub pid: Option<i32>,
}

#[derive(Debug, Serialize)]
pub struct UpReport {
    pub viewer_url: String,
    pub playlist_url: String,
    pub ca_cert: String,
    pub hosts: Vec<HostSummary>,
    pub startup_s: f64,
    /// The segment that played first.
    #[serde(skip)]
    pub first_segment: String,
    /// The db host holding Patroni's leader lock when `up` returned (`None`: no db hosts).
    pub db_primary: Option<String>,
    /// Seconds from the start of `up` until `db_primary` answered 200 on `/primary`.
    pub db_primary_s: Option<f64>,
    /// Replicas streaming from the primary when `up` returned.
    pub db_streaming: Vec<String>,
    /// Seconds from the start of `up` until a replica streamed.
    pub db_streaming_s: Option<f64>,
    /// Prometheus's URL with `--monitoring`.
    pub prometheus_url: Option<String>,
}

/// Where `up` reads the host list and which loopback addresses it gives the hosts.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub cluster: PathBuf,
    pub address_prefix: String,
    /// How long to wait for the first playable segment (and the database primary).
    pub timeout: Duration,
    /// Also run Prometheus against the cluster ([`crate::monitoring`]).
    pub monitoring: bool,
}

/// `streamctl up`: generates every host's config, starts the hosts in order and waits until
/// the stream plays through an LB and the database is ready; `say` hears each step.
pub async fn up(
    layout: &Layout,
    options: &UpOptions,
    say: &dyn Fn(&str),
) -> anyhow::Result<UpReport> {
    let started = Instant::now();
    std::fs::create_dir_all(&layout.root)
        .with_context(|| format!("create {}", layout.root.display()))?;
    let source = cluster::Source::resolve(
        layout,
        Some(&options.cluster),
        Some(&options.address_prefix),
    )?;
    let configs = cluster::generate(layout, &source)?;
    cluster::materialise(layout, &configs)?;
    source.save(layout)?;
    let mut ordered: Vec<HostConfig> = configs.into_values().collect();
    cluster::sort_for_start(&mut ordered);
    if let Some(note) = prepare_partitions(layout, &ordered) {
        say(&note);
    }
    let hosts = start_hosts(layout, &ordered, say);
    let prometheus_url = if options.monitoring {
        let url = crate::monitoring::start(layout, &source)?;
        say(&format!(
            "prometheus: {url} (rules and scrape jobs of nix/monitoring.nix)"
        ));
        Some(url)
    } else {
        None
    };
    let any = ordered.first().context("cluster has no host")?;
    let lb_url = any
        .cluster
        .hosts_with_role(Role::Lb)
        .map(|h| h.url.clone())
        .next()
        .or_else(|| any.cluster.site_urls.first().cloned())
        .context("cluster has no LB")?;
    let channel = any
        .cluster
        .default_channel()
        .context("cluster has no channel")?
        .name
        .clone();
    let target = (lb_url.as_str(), channel.as_str());
    let ready = wait_ready(layout, any, target, started, options.timeout, say).await?;
    let Some((first_segment, startup_s)) = ready.played else {
        bail!(
            "no playable stream through {lb_url} after {} s: {}\n{}cluster did not come up \
             (hosts left running: `streamctl down` stops them)",
            options.timeout.as_secs(),
            ready.last_error,
            report_unhealthy(layout, &ordered).await
        )
    };
    let database = ready.database;
    if ready.has_db && database.primary.is_none() {
        bail!(
            "no database primary (no db host answered 200 on Patroni's /primary) after {} s:\n{}\n\
             the database did not come up (hosts left running: `streamctl down` stops them)",
            options.timeout.as_secs(),
            db::explain_no_primary(layout, &ordered).await
        )
    }
    Ok(UpReport {
        viewer_url: format!("{lb_url}/"),
        playlist_url: format!("{lb_url}/live/{channel}/master.m3u8"),
        ca_cert: layout.ca().cert.display().to_string(),
        hosts,
        startup_s,
        first_segment,
        db_primary: database.primary,
        db_primary_s: database.primary_s,
        db_streaming: database.streaming,
        db_streaming_s: database.streaming_s,
        prometheus_url,
    })
}

/// Starts each host in order; one that does not start is reported and left for `status`.
fn start_hosts(layout: &Layout, ordered: &[HostConfig], say: &dyn Fn(&str)) -> Vec<HostSummary> {
    let mut hosts = Vec::new();
    for config in ordered {
        let me = config.me();
        let pid = match start_host(layout, config) {
            Ok(Started::Fresh(pid)) if me.role == Role::Db => {
                say(&format!(
                    "{}: started etcd + Patroni (supervisor pid {pid}), Patroni REST {}, \
                     PostgreSQL {}",
                    me.name,
                    db::rest_url(me),
                    me.socket(me.ports.postgres)
                ));
                Some(pid)
            }
            Ok(Started::Fresh(pid)) => {
                say(&format!(
                    "{}: started {} pid {pid} at {}",
                    me.name, me.role, me.url
                ));
                Some(pid)
            }
            Ok(Started::AlreadyUp(pid)) => {
                say(&format!("{}: already up (pid {pid}), left alone", me.name));
                Some(pid)
            }
            Err(e) => {
                say(&format!("{}: NOT started: {e:#}", me.name));
                None
            }
        };
        hosts.push(HostSummary {
            name: me.name.clone(),
            role: me.role,
            url: me.url.clone(),
            pid,
        });
    }
    hosts
}

/// What `up` saw while waiting.
struct Ready {
    /// The first segment played through the LB, and when.
    played: Option<(String, f64)>,
    last_error: String,
    has_db: bool,
    database: db::Readiness,
}

/// Polls the LB (a segment must play) and Patroni (a primary, then a streaming replica) every
/// half second until both are there or `timeout` since `started` (the start of `up`, which the
/// figures count from) passes.
async fn wait_ready(
    layout: &Layout,
    any: &HostConfig,
    (lb_url, channel): (&str, &str),
    started: Instant,
    timeout: Duration,
    say: &dyn Fn(&str),
) -> anyhow::Result<Ready> {
    let deadline = started + timeout;
    let client = probe::client(&layout.ca().cert, PLAY_TIMEOUT)?;
    let has_db = any.cluster.hosts_with_role(Role::Db).next().is_some();
    say(&format!(
        "waiting up to {} s for {lb_url}/live/{channel}/master.m3u8 to play{} ...",
        timeout.as_secs(),
        if has_db {
            " and for a database primary"
        } else {
            ""
        }
    ));
    let mut ready = Ready {
        played: None,
        last_error: String::new(),
        has_db,
        database: db::Readiness::default(),
    };
    let patroni = db::rest_client(any)?;
    loop {
        if ready.played.is_none() {
            match probe::plays(&client, lb_url, channel).await {
                Ok(segment) => ready.played = Some((segment, started.elapsed().as_secs_f64())),
                Err(e) => ready.last_error = format!("{e:#}"),
            }
        }
        let database = &mut ready.database;
        if has_db && !database.settled(&any.cluster, started) {
            let had_primary = database.primary.is_some();
            database.poll(&patroni, &any.cluster, started).await;
            if let (false, Some(primary), Some(s)) =
                (had_primary, &database.primary, database.primary_s)
            {
                say(&format!("database: {primary} is primary after {s:.1} s"));
            }
        }
        let db_done = !has_db || ready.database.settled(&any.cluster, started);
        if (ready.played.is_some() && db_done) || Instant::now() >= deadline {
            return Ok(ready);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// After a failed `up`: which hosts are down or unhealthy, with the end of their logs.
async fn report_unhealthy(layout: &Layout, configs: &[HostConfig]) -> String {
    let mut out = String::new();
    let client = probe::client(&layout.ca().cert, PROBE_TIMEOUT).ok();
    for config in configs {
        let me = config.me();
        if me.role == Role::Db {
            continue;
        }
        let pid = procs::live_pid(&layout.pid_file(&me.name), &layout.config_file(&me.name));
        let problem = match host_liveness(layout, &me.name, pid).0 {
            Liveness::Dead => Some("process not running".to_owned()),
            Liveness::Hung => Some("process stopped (hung)".to_owned()),
            Liveness::Restarting => Some("service failed, restarting".to_owned()),
            Liveness::Running => match &client {
                Some(client) => probe::healthy(client, &me.url)
                    .await
                    .err()
                    .map(|e| format!("unhealthy: {e}")),
                None => None,
            },
        };
        if let Some(problem) = problem {
            out.push_str(&format!(
                "--- {} ({}): {problem}; last lines of {}:\n{}\n",
                me.name,
                me.role,
                layout.out_file(&me.name).display(),
                procs::tail(&layout.out_file(&me.name), 15)
            ));
        }
    }
    out
}
