//! One host of a local cluster as the operator sees it: started (with its cgroup and, for lb1,
//! its etcd witness), stopped, killed, hung, crashed, resumed. `streamctl up`, `down`, `kill`,
//! `start` and the benches' faults all come here.

use std::time::Duration;

use anyhow::{Context, bail};
use streaming_core::config::{HostConfig, Role};

use crate::cluster::Layout;
use crate::db;
use crate::partition;
use crate::procs::{self, Liveness};
use crate::supervise;

/// How long `down` lets a host shut down gracefully before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Every host's cgroup and the cluster's nftables table, before any host opens a connection
/// (one opened earlier would escape cuts). A note for the operator when partitions are not
/// possible here.
pub fn prepare_partitions(layout: &Layout, configs: &[HostConfig]) -> Option<String> {
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
                tracing::warn!("{}: it cannot be partitioned: {e}", config.name);
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(
            "{}: no cgroup of its own ({e}); it cannot be partitioned",
            config.name
        ),
    }
}

/// Whether `start_host` started the host or found it running.
pub enum Started {
    Fresh(i32),
    AlreadyUp(i32),
}

/// Starts one host unless its pid file names a live process of it.
pub fn start_host(layout: &Layout, config: &HostConfig) -> anyhow::Result<Started> {
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

/// Stops one (non-db) host for `down`: what to print, and whether nothing of it is left.
fn stop_one(
    layout: &Layout,
    pid_file: &std::path::Path,
    config: Option<&HostConfig>,
) -> (String, bool) {
    let host = host_of(pid_file);
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

/// What `streamctl kill` does to a host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Blow {
    /// SIGKILL to the whole host (a db host: its postmaster and backends too).
    #[default]
    Kill,
    /// SIGSTOP instead: the host hangs, alive and answering nothing; `start` resumes it.
    Hang,
    /// SIGABRT to the host's service process alone; its supervisor restarts it.
    Crash,
    /// SIGKILL (or SIGSTOP) to one ffmpeg child of the host (an ingest's transcoder first).
    Ffmpeg { hang: bool },
    /// Db hosts: only Patroni and PostgreSQL; the host and its etcd member stay up.
    Postgres { hang: bool },
}

/// The fault of `streamctl kill` (the benches inject it in-process): what was done, as the
/// operator would read it.
pub fn kill(layout: &Layout, name: &str, blow: Blow) -> anyhow::Result<String> {
    let config = layout.load_config(name)?;
    let pid = procs::live_pid(&layout.pid_file(name), &layout.config_file(name))
        .with_context(|| format!("{name} is not running"))?;
    let db_host = config.patroni.is_some();
    match blow {
        Blow::Postgres { .. } if !db_host => {
            bail!("{name} is not a db host: --postgres applies to db hosts")
        }
        Blow::Crash => crash_service(layout, name),
        Blow::Ffmpeg { hang } => kill_ffmpeg(&config, pid, hang),
        Blow::Postgres { hang } => kill_db_host(&config, pid, db::Scope::Database, hang),
        Blow::Kill | Blow::Hang if db_host => {
            kill_db_host(&config, pid, db::Scope::Host, blow == Blow::Hang)
        }
        Blow::Hang => {
            procs::signal_group(pid, libc::SIGSTOP);
            Ok(format!(
                "{name}: hung (SIGSTOP to group {pid}); `streamctl start {name}` resumes it"
            ))
        }
        Blow::Kill => {
            procs::signal_group(pid, libc::SIGKILL);
            procs::wait_group_gone(pid, Duration::from_secs(2));
            Ok(format!("{name}: killed (SIGKILL to group {pid})"))
        }
    }
}

/// SIGABRT to the supervised service alone, as a stack overflow or any abort would end it.
fn crash_service(layout: &Layout, name: &str) -> anyhow::Result<String> {
    let service = supervise::ServiceState::read(&layout.service_file(name))
        .filter(|s| s.pid > 0 && procs::liveness(s.pid) != Liveness::Dead)
        .with_context(|| {
            format!(
                "{name}: no supervised service running (db hosts: use --postgres; a host \
                 restarting now: wait)"
            )
        })?;
    procs::signal_pid(service.pid, libc::SIGABRT);
    Ok(format!(
        "{name}: crashed its service (SIGABRT to pid {}); the runner restarts it",
        service.pid
    ))
}

/// SIGKILL (or SIGSTOP) to one ffmpeg child: the host's watchdog must notice.
fn kill_ffmpeg(config: &HostConfig, pid: i32, hang: bool) -> anyhow::Result<String> {
    let name = &config.name;
    let default_channel = config.cluster.default_channel().map(|c| c.name.as_str());
    let children = procs::ffmpeg_children(pid, default_channel);
    let (child, cmdline) = children.first().with_context(|| {
        format!(
            "{name} ({}) has no ffmpeg child right now",
            config.me().role
        )
    })?;
    let (signal, done) = if hang {
        (libc::SIGSTOP, "hung")
    } else {
        (libc::SIGKILL, "killed")
    };
    procs::signal_pid(*child, signal);
    let shown: String = cmdline.chars().take(100).collect();
    Ok(format!("{name}: {done} ffmpeg pid {child} ({shown}...)"))
}

/// A db host's postmaster and backends are in sessions of their own: the group is not enough.
fn kill_db_host(
    config: &HostConfig,
    pid: i32,
    scope: db::Scope,
    hang: bool,
) -> anyhow::Result<String> {
    let name = &config.name;
    let database_only = scope == db::Scope::Database;
    if hang {
        let stopped = db::hang_host(config, Some(pid), scope);
        let what = if database_only {
            "Patroni, the postmaster and its children"
        } else {
            "the whole host"
        };
        return Ok(format!(
            "{name}: hung (SIGSTOP to {what}: {stopped} processes); `streamctl start {name}` \
             resumes it"
        ));
    }
    let survivors = db::kill_host(config, Some(pid), scope);
    if !survivors.is_empty() {
        bail!("{name}: processes survived SIGKILL: {survivors:?}");
    }
    Ok(if database_only {
        format!(
            "{name}: killed Patroni and PostgreSQL (SIGKILL); etcd and the host stay up, \
             `streamctl start {name}` runs Patroni again"
        )
    } else {
        format!("{name}: killed (SIGKILL to group {pid}, the postmaster and its children)")
    })
}

/// The restore of `streamctl start`, for benches that run it in-process: what was done.
pub fn start_again(layout: &Layout, name: &str) -> anyhow::Result<String> {
    let config = layout.load_config(name)?;
    let live = procs::live_pid(&layout.pid_file(name), &layout.config_file(name));
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
            name
        ));
    }
    if let Some(pid) = live
        && procs::liveness(pid) == Liveness::Hung
    {
        procs::signal_group(pid, libc::SIGCONT);
        return Ok(format!("{}: resumed (SIGCONT to group {pid})", name));
    }
    Ok(match start_host(layout, &config)? {
        Started::Fresh(pid) => format!("{}: started pid {pid}", name),
        Started::AlreadyUp(pid) => format!("{}: already up (pid {pid})", name),
    })
}

/// A rolling upgrade's restart: the host stops as `down` stops it (SIGTERM, in-flight requests
/// finish within [`STOP_GRACE`]; a db host's Patroni shuts its PostgreSQL down cleanly) and
/// starts again on the binaries there are now. What was done, for the operator.
pub fn restart(layout: &Layout, name: &str) -> anyhow::Result<String> {
    let config = layout.load_config(name)?;
    let pid_file = layout.pid_file(name);
    let stopped = if config.patroni.is_some() {
        let pid = procs::live_pid(&pid_file, &layout.config_file(name));
        let gone = db::stop_host(&config, pid, STOP_GRACE);
        let _ = std::fs::remove_file(&pid_file);
        (format!("{name}: stopped"), gone)
    } else {
        stop_one(layout, &pid_file, Some(&config))
    };
    if !stopped.1 {
        bail!("{}: not started again", stopped.0);
    }
    Ok(match start_host(layout, &config)? {
        Started::Fresh(pid) | Started::AlreadyUp(pid) => {
            format!("{}; started pid {pid}", stopped.0)
        }
    })
}

/// The pid files of every host started from this state dir, with each host's config.
fn started_hosts(layout: &Layout) -> Vec<(std::path::PathBuf, Option<HostConfig>)> {
    let Ok(entries) = std::fs::read_dir(layout.run_dir()) else {
        return Vec::new();
    };
    let mut pid_files: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pid"))
        .collect();
    pid_files.sort();
    pid_files
        .into_iter()
        .map(|p| {
            let config = layout.load_config(&host_of(&p)).ok();
            (p, config)
        })
        .collect()
}

fn host_of(pid_file: &std::path::Path) -> String {
    pid_file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_owned()
}

/// `streamctl down`: stops every host started from the state dir, telling `say` about each;
/// returns the hosts that could not be stopped.
pub fn stop_all(layout: &Layout, say: &dyn Fn(&str)) -> Vec<String> {
    // Db hosts last (they started first: the broadcasts use them until they stop), and
    // all together: each Patroni stops its PostgreSQL and releases the leader key while
    // both db hosts' etcd members still answer.
    let (db_hosts, others): (Vec<_>, Vec<_>) = started_hosts(layout)
        .into_iter()
        .partition(|(_, c)| c.as_ref().is_some_and(|c| c.patroni.is_some()));
    let mut left = stop_others(layout, &others, say);
    left.extend(stop_db_hosts(layout, &db_hosts, say));
    left
}

/// Every non-db host at once (each may use its whole grace to finish responses), reported in
/// order.
fn stop_others(
    layout: &Layout,
    hosts: &[(std::path::PathBuf, Option<HostConfig>)],
    say: &dyn Fn(&str),
) -> Vec<String> {
    let outcomes: Vec<(String, bool)> = std::thread::scope(|scope| {
        let stops: Vec<_> = hosts
            .iter()
            .map(|(pid_file, config)| scope.spawn(|| stop_one(layout, pid_file, config.as_ref())))
            .collect();
        stops
            .into_iter()
            .zip(hosts)
            .map(|(stop, (pid_file, _))| {
                let host = host_of(pid_file);
                match stop.join() {
                    Ok((message, stopped)) => {
                        say(&message);
                        (host, stopped)
                    }
                    Err(_) => (host, false),
                }
            })
            .collect()
    });
    outcomes
        .into_iter()
        .filter(|(_, stopped)| !stopped)
        .map(|(h, _)| h)
        .collect()
}

/// The db hosts together, so that their etcd members keep a quorum until every Patroni is done.
fn stop_db_hosts(
    layout: &Layout,
    db_hosts: &[(std::path::PathBuf, Option<HostConfig>)],
    say: &dyn Fn(&str),
) -> Vec<String> {
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
    let mut left = Vec::new();
    for (((pid_file, _), (host, pid)), stopped) in db_hosts.iter().zip(db_pids).zip(stopped) {
        match (stopped, pid) {
            (true, Some(pid)) => say(&format!("{host}: stopped (pid {pid})")),
            (true, None) => say(&format!("{host}: was not running")),
            (false, _) => {
                say(&format!("{host}: processes survived SIGKILL"));
                left.push(host.clone());
            }
        }
        let _ = std::fs::remove_file(pid_file);
    }
    left
}
