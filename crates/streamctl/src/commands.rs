//! One function per subcommand; the pieces live in [`crate::cluster`], [`crate::pki`],
//! [`crate::procs`] and [`crate::probe`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use streaming_core::config::{HostConfig, Role};

use crate::cli::{
    AddArgs, DownArgs, DrainArgs, HostsArgs, KillArgs, StartArgs, StatusArgs, SyncArgs, UpArgs,
};
use crate::cluster::{self, Layout};
use crate::db;
use crate::partition;
use crate::probe;
use crate::procs::{self, Liveness};
use crate::supervise;

/// How long `down` lets a host shut down gracefully before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Timeout of one health or status request (a hung host must not stall `status`).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
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
    /// The db host holding Patroni's leader lock when `up` returned (`None`: no db hosts).
    pub db_primary: Option<String>,
    /// Seconds from the start of `up` until `db_primary` answered 200 on `/primary`.
    pub db_primary_s: Option<f64>,
    /// Replicas streaming from the primary when `up` returned.
    pub db_streaming: Vec<String>,
    /// Seconds from the start of `up` until a replica streamed.
    pub db_streaming_s: Option<f64>,
}

/// `streamctl up`.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let layout = Layout::new(&args.state.dir)?;
    std::fs::create_dir_all(&layout.root)
        .with_context(|| format!("create {}", layout.root.display()))?;
    let source =
        cluster::Source::resolve(&layout, Some(&args.cluster), Some(&args.address_prefix))?;
    let configs = cluster::generate(&layout, &source)?;
    cluster::materialise(&layout, &configs)?;
    source.save(&layout)?;
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };
    let mut ordered: Vec<HostConfig> = configs.into_values().collect();
    cluster::sort_for_start(&mut ordered);
    if let Some(note) = prepare_partitions(&layout, &ordered) {
        say(note);
    }
    let mut hosts = Vec::new();
    for config in &ordered {
        let me = config.me();
        let pid = match start_host(&layout, config) {
            Ok(Started::Fresh(pid)) if me.role == Role::Db => {
                say(format!(
                    "{}: started etcd + Patroni (supervisor pid {pid}), Patroni REST {}, \
                     PostgreSQL {}",
                    me.name,
                    db::rest_url(me),
                    me.socket(me.ports.postgres)
                ));
                Some(pid)
            }
            Ok(Started::Fresh(pid)) => {
                say(format!(
                    "{}: started {} pid {pid} at {}",
                    me.name, me.role, me.url
                ));
                Some(pid)
            }
            Ok(Started::AlreadyUp(pid)) => {
                say(format!("{}: already up (pid {pid}), left alone", me.name));
                Some(pid)
            }
            Err(e) => {
                say(format!("{}: NOT started: {e:#}", me.name));
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
        .channels
        .first()
        .context("cluster has no channel")?
        .name
        .clone();
    let ca_cert = layout.ca().cert;
    let client = probe::client(&ca_cert, PLAY_TIMEOUT)?;
    let has_db = any.cluster.hosts_with_role(Role::Db).next().is_some();
    say(format!(
        "waiting up to {} s for {lb_url}/live/{channel}/master.m3u8 to play{} ...",
        args.timeout,
        if has_db {
            " and for a database primary"
        } else {
            ""
        }
    ));
    let deadline = started + Duration::from_secs(args.timeout);
    let mut played: Option<(String, f64)> = None;
    let mut last_error = String::new();
    let mut database = db::Readiness::default();
    let patroni = db::rest_client(any)?;
    loop {
        if played.is_none() {
            match probe::plays(&client, &lb_url, &channel).await {
                Ok(segment) => played = Some((segment, started.elapsed().as_secs_f64())),
                Err(e) => last_error = format!("{e:#}"),
            }
        }
        if has_db && !database.settled(&any.cluster, started) {
            let had_primary = database.primary.is_some();
            database.poll(&patroni, &any.cluster, started).await;
            if let (false, Some(primary), Some(s)) =
                (had_primary, &database.primary, database.primary_s)
            {
                say(format!("database: {primary} is primary after {s:.1} s"));
            }
        }
        let db_done = !has_db || database.settled(&any.cluster, started);
        if (played.is_some() && db_done) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Some((segment, startup_s)) = played else {
        eprintln!(
            "no playable stream through {lb_url} after {} s: {last_error}",
            args.timeout
        );
        report_unhealthy(&layout, &ordered).await;
        bail!("cluster did not come up (hosts left running: `streamctl down` stops them)")
    };
    if has_db && database.primary.is_none() {
        eprintln!(
            "no database primary (no db host answered 200 on Patroni's /primary) after {} s:\n{}",
            args.timeout,
            db::explain_no_primary(&layout, &ordered).await
        );
        bail!("the database did not come up (hosts left running: `streamctl down` stops them)")
    }
    let report = UpReport {
        viewer_url: format!("{lb_url}/"),
        playlist_url: format!("{lb_url}/live/{channel}/master.m3u8"),
        ca_cert: ca_cert.display().to_string(),
        hosts,
        startup_s,
        db_primary: database.primary.clone(),
        db_primary_s: database.primary_s,
        db_streaming: database.streaming.clone(),
        db_streaming_s: database.streaming_s,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("playing after {startup_s:.1} s (first segment {segment})");
        if let (Some(primary), Some(s)) = (&report.db_primary, report.db_primary_s) {
            let replicas = match report.db_streaming_s {
                Some(r) => format!(
                    "{} streaming after {r:.1} s",
                    report.db_streaming.join(", ")
                ),
                None => "no replica streaming yet (see `streamctl status`)".to_owned(),
            };
            println!("database: primary {primary} after {s:.1} s; {replicas}");
        }
        println!("viewer:   {}", report.viewer_url);
        println!("playlist: {}", report.playlist_url);
        println!(
            "CA:       {} (trust it, or use curl --cacert)",
            report.ca_cert
        );
    }
    Ok(())
}

/// After a failed `up`: which hosts are down or unhealthy, with the end of their logs.
async fn report_unhealthy(layout: &Layout, configs: &[HostConfig]) {
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
            eprintln!(
                "--- {} ({}): {problem}; last lines of {}:",
                me.name,
                me.role,
                layout.out_file(&me.name).display()
            );
            eprintln!("{}", procs::tail(&layout.out_file(&me.name), 15));
        }
    }
}

/// Every host's cgroup and the cluster's nftables table, before any host opens a connection
/// (one opened earlier would escape cuts). A note for the operator when partitions are not
/// possible here.
fn prepare_partitions(layout: &Layout, configs: &[HostConfig]) -> Option<String> {
    let mut any = false;
    for config in configs {
        match crate::cgroup::prepare(config) {
            Ok(dir) => any |= dir.is_some(),
            Err(e) => {
                return Some(format!(
                    "partitions unavailable: cgroup of {}: {e}",
                    config.name
                ));
            }
        }
    }
    if !any {
        return Some("partitions unavailable: they need root and a cgroup v2 hierarchy".to_owned());
    }
    partition::prepare_cluster(layout)
}

/// Gives a host about to start its cgroup, so it can be partitioned. A new cgroup needs the
/// nftables table reloaded (rules name cgroups by what the path is when they are loaded).
/// Failures only cost partitions, so they are reported, not fatal.
fn ensure_cgroup(layout: &Layout, config: &HostConfig) {
    if crate::cgroup::existing(config).is_some() {
        return;
    }
    match crate::cgroup::prepare(config) {
        Ok(Some(_)) => {
            if let Err(e) = partition::apply(layout) {
                eprintln!("{}: it cannot be partitioned: {e}", config.name);
            }
        }
        Ok(None) => {}
        Err(e) => eprintln!(
            "{}: no cgroup of its own ({e}); it cannot be partitioned",
            config.name
        ),
    }
}

enum Started {
    Fresh(i32),
    AlreadyUp(i32),
}

/// Starts one host unless its pid file names a live process of it.
fn start_host(layout: &Layout, config: &HostConfig) -> anyhow::Result<Started> {
    let me = config.me();
    let config_file = layout.config_file(&me.name);
    let pid_file = layout.pid_file(&me.name);
    if let Some(pid) = procs::live_pid(&pid_file, &config_file) {
        // A witness whose etcd died alone (the host itself is up): start the member again.
        if me.role != Role::Db
            && config.etcd.is_some()
            && !procs::group_members(pid).iter().any(|s| s.comm == "etcd")
        {
            db::spawn_etcd(config, Some(pid))?;
        }
        return Ok(Started::AlreadyUp(pid));
    }
    ensure_cgroup(layout, config);
    if me.role == Role::Db {
        return Ok(Started::Fresh(db::start_host(layout, config)?));
    }
    let binary = procs::role_binary(me.role)?;
    if !binary.exists() {
        bail!("no binary {} (cargo build --workspace)", binary.display());
    }
    // The supervisor leads the host's group and restarts the service when it fails, as systemd
    // does on a real host; the pid file names the supervisor (the group), the service file the
    // service.
    let cgroup = crate::cgroup::existing(config);
    let service_file = layout.service_file(&me.name);
    let _ = std::fs::remove_file(&service_file);
    let binary = binary
        .to_str()
        .with_context(|| format!("{} is not UTF-8", binary.display()))?;
    let service_arg = service_file
        .to_str()
        .with_context(|| format!("{} is not UTF-8", service_file.display()))?;
    let pid = procs::spawn_with_args(
        &procs::HostProcess {
            binary: &procs::own_binary()?,
            config: &config_file,
            out_file: &layout.out_file(&me.name),
            pid_file: &pid_file,
            cgroup: cgroup.as_deref(),
        },
        &[
            "supervise",
            "--binary",
            binary,
            "--service-file",
            service_arg,
        ],
    )?;
    // The etcd witness (lb1) runs in the host's process group: it lives and dies with it.
    if config.etcd.is_some() {
        db::spawn_etcd(config, Some(pid)).with_context(|| format!("{}: etcd witness", me.name))?;
    }
    Ok(Started::Fresh(pid))
}

/// `streamctl down`.
/// Stops one (non-db) host for `down`: what to print, and whether nothing of it is left.
fn stop_one(
    layout: &Layout,
    pid_file: &std::path::Path,
    config: Option<&HostConfig>,
) -> (String, bool) {
    let host = pid_file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned();
    let pid = procs::live_pid(pid_file, &layout.config_file(&host));
    let outcome = if let Some(config) = config.filter(|c| c.etcd.is_some()) {
        // The etcd witness shares its host's group; etcd may need ~9 s on SIGTERM, so it gets
        // a short grace of its own.
        if db::stop_host(config, pid, STOP_GRACE) {
            match pid {
                Some(pid) => (format!("{host}: stopped (pid {pid})"), true),
                None => (format!("{host}: was not running"), true),
            }
        } else {
            (format!("{host}: processes survived SIGKILL"), false)
        }
    } else if let Some(pid) = pid {
        if procs::stop_group(pid, STOP_GRACE) {
            (format!("{host}: stopped (pid {pid})"), true)
        } else {
            (
                format!("{host}: processes of group {pid} survived SIGKILL"),
                false,
            )
        }
    } else {
        // The service died but ffmpeg children may linger in its group.
        if let Some(pgid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            && !procs::group_members(pgid).is_empty()
        {
            procs::stop_group(pgid, Duration::from_secs(1));
        }
        (format!("{host}: was not running"), true)
    };
    let _ = std::fs::remove_file(pid_file);
    let _ = std::fs::remove_file(layout.service_file(&host));
    outcome
}

pub fn down(args: DownArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let mut left = Vec::new();
    if let Ok(entries) = std::fs::read_dir(layout.run_dir()) {
        let mut pid_files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "pid"))
            .collect();
        pid_files.sort();
        let host_of = |pid_file: &std::path::Path| {
            pid_file
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned()
        };
        // Db hosts last (they started first: the broadcasts use them until they stop), and
        // all together: each Patroni stops its PostgreSQL and releases the leader key while
        // both db hosts' etcd members still answer.
        let (db_hosts, others): (Vec<_>, Vec<_>) = pid_files
            .into_iter()
            .map(|p| {
                let config = layout.load_config(&host_of(&p)).ok();
                (p, config)
            })
            .partition(|(_, c)| c.as_ref().is_some_and(|c| c.patroni.is_some()));
        // All at once (each may use its whole grace to finish responses), reported in order.
        let outcomes: Vec<(String, bool)> = std::thread::scope(|scope| {
            let stops: Vec<_> = others
                .iter()
                .map(|(pid_file, config)| {
                    scope.spawn(|| stop_one(&layout, pid_file, config.as_ref()))
                })
                .collect();
            stops
                .into_iter()
                .zip(&others)
                .map(|(stop, (pid_file, _))| {
                    let host = host_of(pid_file);
                    match stop.join() {
                        Ok((message, stopped)) => {
                            println!("{message}");
                            (host, stopped)
                        }
                        Err(_) => (host, false),
                    }
                })
                .collect()
        });
        left.extend(
            outcomes
                .into_iter()
                .filter(|(_, stopped)| !stopped)
                .map(|(h, _)| h),
        );
        let db_pids: Vec<(String, Option<i32>)> = db_hosts
            .iter()
            .map(|(pid_file, _)| {
                let host = host_of(pid_file);
                let pid = procs::live_pid(pid_file, &layout.config_file(&host));
                (host, pid)
            })
            .collect();
        let stopping: Vec<(&HostConfig, Option<i32>)> = db_hosts
            .iter()
            .zip(&db_pids)
            .filter_map(|((_, config), (_, pid))| Some((config.as_ref()?, *pid)))
            .collect();
        let stopped = db::stop_hosts(&stopping, STOP_GRACE);
        for (((pid_file, _), (host, pid)), stopped) in db_hosts.iter().zip(db_pids).zip(stopped) {
            match (stopped, pid) {
                (true, Some(pid)) => println!("{host}: stopped (pid {pid})"),
                (true, None) => println!("{host}: was not running"),
                (false, _) => {
                    println!("{host}: processes survived SIGKILL");
                    left.push(host.clone());
                }
            }
            let _ = std::fs::remove_file(pid_file);
        }
    }
    for leftover in partition::remove_cluster(&layout) {
        println!("not removed: {leftover}");
    }
    if !left.is_empty() {
        bail!("could not stop: {}", left.join(", "));
    }
    if args.wipe && layout.root.exists() {
        std::fs::remove_dir_all(&layout.root)
            .with_context(|| format!("remove {}", layout.root.display()))?;
        println!("removed {}", layout.root.display());
    }
    Ok(())
}

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

/// `streamctl status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let configs = layout.load_configs()?;
    let client = probe::client(&layout.ca().cert, PROBE_TIMEOUT)?;
    // Every host reads the same token file; a cluster from before it existed has none yet.
    let token = configs
        .first()
        .and_then(|c| c.paths.metrics_token.as_deref())
        .and_then(|path| streaming_core::secrets::read_secret(path).ok());
    let checks = configs
        .iter()
        .map(|config| host_status(&layout, &client, config, token.as_deref()));
    let mut statuses: Vec<HostStatus> = futures::future::join_all(checks).await;
    let cuts = partition::active(&layout);
    for s in &mut statuses {
        s.partitions = partition::describe_for(&cuts, &s.name);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
        return Ok(());
    }
    println!(
        "{:<12} {:<10} {:>8} {:<6} {:<24} details",
        "host", "role", "pid", "proc", "health"
    );
    for s in &statuses {
        let mut details = Vec::new();
        if let Some(v) = s.viewers {
            details.push(format!("viewers {v}"));
        }
        if let Some(e) = s.egress_mbps {
            details.push(format!("egress {e:.1} Mbit/s"));
        }
        if let Some(f) = s.free_viewers {
            details.push(format!("free {f}"));
        }
        if let Some(a) = &s.active_source {
            details.push(format!("source {a}"));
        }
        if let Some(channels) = s.publisher_of.as_ref().filter(|c| !c.is_empty()) {
            details.push(format!("publisher of {}", channels.join(" ")));
        }
        if let Some(role) = &s.db_role {
            let state = s.db_state.as_deref().unwrap_or("?");
            details.push(format!("patroni {role} ({state})"));
        }
        if let Some(streaming) = s.db_streaming.as_ref().filter(|v| !v.is_empty()) {
            details.push(format!("streaming to {}", streaming.join(" ")));
        }
        if let Some(etcd) = &s.etcd {
            details.push(format!("etcd {etcd}"));
        }
        if let Some(restarts) = s.restarts.filter(|r| *r > 0) {
            let last = s.last_exit.as_deref().unwrap_or("?");
            details.push(format!("restarted {restarts}x (last: {last})"));
        }
        let health: String = s
            .health
            .clone()
            .unwrap_or_else(|| "-".into())
            .chars()
            .take(24)
            .collect();
        println!(
            "{:<12} {:<10} {:>8} {:<6} {:<24} {}",
            s.name,
            s.role.as_str(),
            s.service_pid
                .or(s.pid)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            match s.process {
                Liveness::Running => "up",
                Liveness::Hung => "HUNG",
                Liveness::Restarting => "restart",
                Liveness::Dead => "down",
            },
            health,
            details.join(", ")
        );
    }
    if !cuts.is_empty() {
        println!("network cuts (`streamctl heal` lifts them):");
        for cut in &cuts {
            println!("  {cut}");
        }
    }
    Ok(())
}

/// How a host is doing: its group leader's state, refined by its supervised service (a failed
/// service waiting for its restart, or a service stopped alone).
pub fn host_liveness(
    layout: &Layout,
    name: &str,
    pid: Option<i32>,
) -> (Liveness, Option<supervise::ServiceState>) {
    let Some(pid) = pid else {
        return (Liveness::Dead, None);
    };
    let leader = procs::liveness(pid);
    let Some(service) = supervise::ServiceState::read(&layout.service_file(name)) else {
        return (leader, None);
    };
    let process = match leader {
        Liveness::Running if service.pid <= 0 => Liveness::Restarting,
        Liveness::Running => match procs::liveness(service.pid) {
            Liveness::Dead => Liveness::Restarting,
            other => other,
        },
        other => other,
    };
    (process, Some(service))
}

async fn host_status(
    layout: &Layout,
    client: &reqwest::Client,
    config: &HostConfig,
    token: Option<&str>,
) -> HostStatus {
    let me = config.me();
    let pid = procs::live_pid(&layout.pid_file(&me.name), &layout.config_file(&me.name));
    let (process, service) = host_liveness(layout, &me.name, pid);
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
    if let Some(etcd) = &config.etcd {
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
    let Some(json) = probe::status_json(client, &me.url, token).await else {
        return status;
    };
    match me.role {
        Role::Broadcast => {
            status.viewers = json["viewers"].as_u64();
            status.egress_mbps = json["egress_mbps"].as_f64();
            status.free_viewers = json["free_viewers"].as_u64();
        }
        _ => {
            status.active_source = active_source(&json);
            status.publisher_of = Some(publisher_of(&json));
        }
    }
    status
}

/// The active source of each channel from an ingest's `/status`
/// (`{"channels": {"<name>": {"active_source": ...}}}`), as `test=source1`.
pub fn active_source(json: &serde_json::Value) -> Option<String> {
    let channels = json.get("channels")?.as_object()?;
    let parts: Vec<String> = channels
        .iter()
        .map(|(name, v)| {
            let source = v
                .get("active_source")
                .and_then(|s| s.as_str())
                .unwrap_or("none");
            format!("{name}={source}")
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// The channels with an outside publisher connected to an ingest, from its `/status`
/// (`{"channels": {"<name>": {"outside_publishers": n}}}`).
pub fn publisher_of(json: &serde_json::Value) -> Vec<String> {
    json.get("channels")
        .and_then(|c| c.as_object())
        .into_iter()
        .flatten()
        .filter(|(_, v)| {
            v.get("outside_publishers")
                .and_then(|n| n.as_u64())
                .is_some_and(|n| n > 0)
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// `streamctl kill`.
pub fn kill(args: KillArgs) -> anyhow::Result<()> {
    println!("{}", kill_host(&args)?);
    Ok(())
}

/// The fault of `streamctl kill`, for benches that inject it in-process: what was done, as
/// the operator would read it.
pub fn kill_host(args: &KillArgs) -> anyhow::Result<String> {
    let layout = Layout::new(&args.state.dir)?;
    let config = layout.load_config(&args.name)?;
    let pid = procs::live_pid(
        &layout.pid_file(&args.name),
        &layout.config_file(&args.name),
    )
    .with_context(|| format!("{} is not running", args.name))?;
    let done = if args.crash {
        let service = supervise::ServiceState::read(&layout.service_file(&args.name))
            .filter(|s| s.pid > 0 && procs::liveness(s.pid) != Liveness::Dead)
            .with_context(|| {
                format!(
                    "{}: no supervised service running (db hosts: use --postgres; a host \
                     restarting now: wait)",
                    args.name
                )
            })?;
        procs::signal_pid(service.pid, libc::SIGABRT);
        format!(
            "{}: crashed its service (SIGABRT to pid {}); the runner restarts it",
            args.name, service.pid
        )
    } else if args.ffmpeg {
        let children = procs::ffmpeg_children(pid);
        let (child, cmdline) = children.first().with_context(|| {
            format!(
                "{} ({}) has no ffmpeg child right now",
                args.name,
                config.me().role
            )
        })?;
        let (signal, done) = if args.hang {
            (libc::SIGSTOP, "hung")
        } else {
            (libc::SIGKILL, "killed")
        };
        procs::signal_pid(*child, signal);
        let shown: String = cmdline.chars().take(100).collect();
        format!("{}: {done} ffmpeg pid {child} ({shown}...)", args.name)
    } else if args.postgres && config.patroni.is_none() {
        bail!(
            "{} is not a db host: --postgres applies to db hosts",
            args.name
        );
    } else if args.hang && config.patroni.is_some() {
        let scope = if args.postgres {
            db::Scope::Database
        } else {
            db::Scope::Host
        };
        let stopped = db::hang_host(&config, Some(pid), scope);
        let what = if args.postgres {
            "Patroni, the postmaster and its children"
        } else {
            "the whole host"
        };
        format!(
            "{}: hung (SIGSTOP to {what}: {stopped} processes); `streamctl start {}` resumes it",
            args.name, args.name
        )
    } else if args.hang {
        procs::signal_group(pid, libc::SIGSTOP);
        format!(
            "{}: hung (SIGSTOP to group {pid}); `streamctl start {}` resumes it",
            args.name, args.name
        )
    } else if config.patroni.is_some() {
        let scope = if args.postgres {
            db::Scope::Database
        } else {
            db::Scope::Host
        };
        let survivors = db::kill_host(&config, Some(pid), scope);
        if !survivors.is_empty() {
            bail!("{}: processes survived SIGKILL: {survivors:?}", args.name);
        }
        if args.postgres {
            format!(
                "{}: killed Patroni and PostgreSQL (SIGKILL); etcd and the host stay up, \
                 `streamctl start {}` runs Patroni again",
                args.name, args.name
            )
        } else {
            format!(
                "{}: killed (SIGKILL to group {pid}, the postmaster and its children)",
                args.name
            )
        }
    } else {
        procs::signal_group(pid, libc::SIGKILL);
        procs::wait_group_gone(pid, Duration::from_secs(2));
        format!("{}: killed (SIGKILL to group {pid})", args.name)
    };
    Ok(done)
}

/// `streamctl start`.
pub fn start(args: StartArgs) -> anyhow::Result<()> {
    println!("{}", start_host_again(&args)?);
    Ok(())
}

/// The restore of `streamctl start`, for benches that run it in-process: what was done.
pub fn start_host_again(args: &StartArgs) -> anyhow::Result<String> {
    let layout = Layout::new(&args.state.dir)?;
    let config = layout.load_config(&args.name)?;
    let live = procs::live_pid(
        &layout.pid_file(&args.name),
        &layout.config_file(&args.name),
    );
    if let Some(pid) = live
        && config.patroni.is_some()
    {
        // Hung (whole host or database only) or with its database service killed: resume
        // everything, and the host's supervisor starts Patroni again if it is not running.
        let resumed = db::resume_host(&config, Some(pid));
        procs::signal_pid(pid, libc::SIGUSR1);
        return Ok(format!(
            "{}: resumed (SIGCONT to group {pid}, the postmaster and its children: {resumed} \
             processes); Patroni is started again if it was killed",
            args.name
        ));
    }
    if let Some(pid) = live
        && procs::liveness(pid) == Liveness::Hung
    {
        procs::signal_group(pid, libc::SIGCONT);
        return Ok(format!("{}: resumed (SIGCONT to group {pid})", args.name));
    }
    Ok(match start_host(&layout, &config)? {
        Started::Fresh(pid) => format!("{}: started pid {pid}", args.name),
        Started::AlreadyUp(pid) => format!("{}: already up (pid {pid})", args.name),
    })
}

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

fn print_report(report: &TopologyReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let line = |what: &str, names: &[String]| {
        if !names.is_empty() {
            println!("{what}: {}", names.join(", "));
        }
    };
    line("started", &report.started);
    line("reloaded (SIGHUP)", &report.reloaded);
    line("removed (stopped)", &report.removed);
    line("listed but not running", &report.not_running);
    line("drained", &report.drained);
    Ok(())
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

/// `streamctl add NAME`: the host's entry is in the cluster file; generate, start it, reload
/// the others. Also takes a drained host back into service.
pub async fn add(args: AddArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    if !streaming_core::config::is_safe_name(&args.name) {
        bail!("{:?} is not a host name", args.name);
    }
    let source = cluster::Source::resolve(
        &layout,
        args.cluster.as_deref(),
        args.address_prefix.as_deref(),
    )?;
    let mut drained = cluster::read_drained(&layout)?;
    let undrained = drained.remove(&args.name);
    if undrained {
        cluster::write_drained(&layout, &drained)?;
    }
    let (configs, removed) = regenerate(&layout, &source)?;
    let Some(config) = configs.get(&args.name) else {
        bail!(
            "{} is not in {}: add its entry to `hosts` first",
            args.name,
            source.cluster.display()
        );
    };
    if config.me().role == Role::Db {
        bail!(
            "{}: db hosts join the etcd/Patroni cluster only with `up` (etcd membership is \
             fixed at bootstrap); `streamctl start {}` restarts a stopped one",
            args.name,
            args.name
        );
    }
    let mut report = TopologyReport::default();
    let fresh = match start_host(&layout, config)? {
        Started::Fresh(pid) => {
            if !args.json {
                println!(
                    "{}: started {} pid {pid} at {}",
                    args.name,
                    config.me().role,
                    config.me().url
                );
            }
            report.started.push(args.name.clone());
            true
        }
        Started::AlreadyUp(pid) => {
            if !args.json {
                let what = if undrained { ", back in service" } else { "" };
                println!("{}: already up (pid {pid}){what}", args.name);
            }
            false
        }
    };
    // The new host already read its config; everyone else learns about it now.
    reload_running(
        &layout,
        &configs,
        fresh.then_some(args.name.as_str()),
        &mut report,
    );
    stop_removed(&layout, &removed, &mut report);
    report.drained = drained.into_iter().collect();
    if fresh && args.timeout > 0 {
        let healthy = wait_healthy(&layout, config, Duration::from_secs(args.timeout)).await;
        if !args.json {
            if healthy {
                println!("{}: healthy; the LBs use it within a second", args.name);
            } else {
                println!(
                    "{}: not healthy after {} s (see {})",
                    args.name,
                    args.timeout,
                    layout.out_file(&args.name).display()
                );
            }
        }
    }
    print_report(&report, args.json)
}

/// `streamctl drain NAME`.
pub fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let config = layout.load_config(&args.name)?;
    let source = cluster::Source::resolve(&layout, args.cluster.as_deref(), None)?;
    let mut drained = cluster::read_drained(&layout)?;
    drained.insert(args.name.clone());
    cluster::write_drained(&layout, &drained)?;
    let (configs, removed) = regenerate(&layout, &source)?;
    let mut report = TopologyReport::default();
    reload_running(&layout, &configs, None, &mut report);
    stop_removed(&layout, &removed, &mut report);
    report.drained = cluster::read_drained(&layout)?.into_iter().collect();
    if !args.json {
        if config.me().role == Role::Broadcast {
            println!(
                "{}: draining: the LBs assign it no new viewers and its viewers move at their \
                 next playlist request.\n`streamctl add {}` takes it back; removing its entry \
                 from the cluster file and `streamctl sync` take it out for good.",
                args.name, args.name
            );
        } else {
            println!(
                "{}: marked drained in every config; only broadcasts act on it so far",
                args.name
            );
        }
    }
    print_report(&report, args.json)
}

/// `streamctl sync`: re-read the cluster file, stop hosts no longer listed, reload the rest.
pub fn sync(args: SyncArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state.dir)?;
    let source = cluster::Source::resolve(&layout, args.cluster.as_deref(), None)?;
    let (configs, removed) = regenerate(&layout, &source)?;
    let mut report = TopologyReport::default();
    reload_running(&layout, &configs, None, &mut report);
    stop_removed(&layout, &removed, &mut report);
    report.drained = cluster::read_drained(&layout)?.into_iter().collect();
    print_report(&report, args.json)
}

/// `streamctl hosts`.
pub fn hosts(args: HostsArgs) -> anyhow::Result<()> {
    let configs: Vec<HostConfig> = match &args.state {
        Some(state) => Layout::new(state)?.load_configs()?,
        None => {
            let tmp = std::env::temp_dir().join("streamctl-hosts");
            let generator = cluster::find_generator(&args.cluster)?;
            cluster::evaluate(&generator, &args.cluster, &tmp, &args.address_prefix)?
                .into_values()
                .collect()
        }
    };
    let cluster = &configs.first().context("cluster has no host")?.cluster;
    print!("{}", hosts_lines(cluster));
    Ok(())
}

/// `address fqdn name` per host, then the site name on the first LB.
pub fn hosts_lines(cluster: &streaming_core::config::ClusterConfig) -> String {
    let mut out = String::new();
    for host in &cluster.hosts {
        out.push_str(&format!("{} {} {}\n", host.address, host.fqdn, host.name));
    }
    if let Some(lb) = cluster.hosts_with_role(Role::Lb).next() {
        out.push_str(&format!("{} {}\n", lb.address, cluster.site));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_source_per_channel() {
        let status = serde_json::json!({"channels": {
            "test": {"active_source": "source2"},
            "idle": {"active_source": null}
        }});
        assert_eq!(
            active_source(&status).as_deref(),
            Some("idle=none test=source2")
        );
        assert_eq!(active_source(&serde_json::json!({"x": 1})), None);
    }
}
