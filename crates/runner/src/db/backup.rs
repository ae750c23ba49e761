//! Backups of the chat database with pgBackRest (docs/backup.md): every db host archives its
//! WAL into one repository while it is the primary (Patroni's `archive_command`), `backup`
//! takes a base backup from the current primary, and `restore` rebuilds the cluster at a point
//! in time: both db hosts' Patroni stopped and held, their data directories moved aside (never
//! deleted), the chosen host restored and recovered to the target, the old cluster's keys
//! removed from etcd, then Patroni released on the restored host (it initialises the DCS from
//! its data and becomes the primary) and on the other (cloned from the new primary).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use serde::Serialize;
use serde_json::{Value, json};

use streaming_core::config::{HostConfig, Role};

use super::{
    PG_OS_USER, Scope, etcd_client, etcd_health, kill_host, member, os_user, own_dir,
    patroni_hold_file, pg_bin_dir, pg_dirs, pgbackrest, primary, rest_client,
};
use crate::cluster::Layout;
use crate::procs;

/// A base backup of a few hundred MB takes seconds here; a large one may take long.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(3600);
/// `info`, `check`, `stanza-create`: quick, unless the repository is unreachable.
const QUICK_TIMEOUT: Duration = Duration::from_secs(120);
/// Replaying the archived WAL up to the target.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(1800);
/// Patroni on the restored host takes the leader key (etcd must have a quorum first).
const PRIMARY_TIMEOUT: Duration = Duration::from_secs(180);
/// The other db host clones the new primary (pg_basebackup) and streams.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs a program as the postgres OS user (environment cleared), output captured, killed after
/// `timeout`.
fn run_as_postgres(program: &Path, args: &[String], timeout: Duration) -> anyhow::Result<Output> {
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={PG_OS_USER}"))
        .arg(format!("--regid={PG_OS_USER}"))
        .args(["--init-groups", "--"])
        .arg(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("start {}", program.display()))?;
    // Readers in threads, so a chatty child never blocks on a full pipe while we wait.
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not finish within {timeout:?}", program.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// `pgbackrest --config=<host's> --stanza=<stanza> <args>` as postgres; its stdout.
pub fn run_pgbackrest(
    config: &HostConfig,
    args: &[&str],
    timeout: Duration,
) -> anyhow::Result<String> {
    let settings = pgbackrest(config)?;
    let mut all = vec![
        format!("--config={}", settings.config_file.display()),
        format!("--stanza={}", settings.stanza),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let output = run_as_postgres(Path::new(pgbackrest_binary()), &all, timeout)?;
    if !output.status.success() {
        bail!(
            "pgbackrest {} on {}: {}{}",
            args.join(" "),
            config.name,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn pgbackrest_binary() -> &'static str {
    if Path::new("/usr/bin/pgbackrest").exists() {
        "/usr/bin/pgbackrest"
    } else {
        "pgbackrest"
    }
}

/// What `streamctl backup` did.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The db host the backup was taken from (the primary).
    pub host: String,
    /// `full`, `diff` or `incr` as asked; pgBackRest makes a full one when there is none.
    pub requested: String,
    /// The backup pgBackRest made: label, type, sizes.
    pub label: Option<String>,
    pub kind: Option<String>,
    /// Database size and what this backup stored in the repository (bytes, compressed).
    pub database_bytes: Option<u64>,
    pub repository_bytes: Option<u64>,
    pub seconds: f64,
    /// `pgbackrest info --output=json`.
    pub info: Value,
    /// `pgbackrest info` as text.
    pub info_text: String,
}

fn db_configs(configs: &[HostConfig]) -> Vec<&HostConfig> {
    configs
        .iter()
        .filter(|c| c.me().role == Role::Db && c.pgbackrest.is_some())
        .collect()
}

async fn primary_config(configs: &[HostConfig]) -> anyhow::Result<&HostConfig> {
    let name = primary(configs)
        .await
        .context("no db host answers 200 on /primary (is the database up?)")?;
    configs
        .iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no config for {name}"))
}

/// The stanza exists (created once, idempotent) and archiving works: `pgbackrest check`
/// switches the WAL segment and waits until it is in the repository, so every commit before
/// the call is archived when it returns.
pub async fn archive_check(layout: &Layout) -> anyhow::Result<String> {
    let configs = layout.load_configs()?;
    let config = primary_config(&configs).await?;
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        run_pgbackrest(&config, &["stanza-create"], QUICK_TIMEOUT)?;
        run_pgbackrest(&config, &["check"], QUICK_TIMEOUT)?;
        Ok(config.name)
    })
    .await?
}

/// `streamctl backup`: the stanza made sure of, archiving checked, a base backup of `kind`
/// (`full`, `diff`, `incr`) taken from the primary, and what the repository holds.
pub async fn backup(layout: &Layout, kind: &str) -> anyhow::Result<BackupReport> {
    if !["full", "diff", "incr"].contains(&kind) {
        bail!("backup type {kind}: full, diff or incr");
    }
    let host = archive_check(layout).await?;
    let configs = layout.load_configs()?;
    let config = configs
        .iter()
        .find(|c| c.name == host)
        .context("primary's config")?
        .clone();
    let kind = kind.to_owned();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        run_pgbackrest(
            &config,
            &[&format!("--type={kind}"), "backup"],
            BACKUP_TIMEOUT,
        )?;
        let seconds = started.elapsed().as_secs_f64();
        let info_json = run_pgbackrest(&config, &["--output=json", "info"], QUICK_TIMEOUT)?;
        let info: Value = serde_json::from_str(&info_json).context("pgbackrest info JSON")?;
        let info_text = run_pgbackrest(&config, &["info"], QUICK_TIMEOUT)?;
        let last = info[0]["backup"]
            .as_array()
            .and_then(|b| b.last())
            .cloned()
            .unwrap_or_default();
        Ok(BackupReport {
            host: config.name.clone(),
            requested: kind,
            label: last["label"].as_str().map(str::to_owned),
            kind: last["type"].as_str().map(str::to_owned),
            database_bytes: last["info"]["size"].as_u64(),
            repository_bytes: last["info"]["repository"]["delta"].as_u64(),
            seconds,
            info,
            info_text,
        })
    })
    .await?
}

/// What `streamctl restore` did, with its figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreReport {
    /// The host restored first (the new primary).
    pub host: String,
    pub target: String,
    /// Data directories moved aside (`<pgdata>.replaced-<unix time>`): delete them once the
    /// restored cluster is trusted.
    pub moved_aside: Vec<PathBuf>,
    /// Seconds for `pgbackrest restore` (files), then WAL replay to the target.
    pub restore_s: f64,
    pub recovery_s: f64,
    /// etcd keys of the old cluster removed.
    pub dcs_keys_removed: u64,
    /// From the start of `restore`: the restored host primary, the other streaming from it.
    pub primary_after_s: Option<f64>,
    pub healthy_after_s: Option<f64>,
    pub streaming: Vec<String>,
}

/// `streamctl restore --to TIME`: see the module documentation. `host`: the db host restored
/// first (default: the current primary if there is one, else the first db host).
pub async fn restore(
    layout: &Layout,
    target: &str,
    host: Option<&str>,
) -> anyhow::Result<RestoreReport> {
    let started = Instant::now();
    let configs = layout.load_configs()?;
    let dbs: Vec<HostConfig> = db_configs(&configs).into_iter().cloned().collect();
    let chosen = match host {
        Some(h) => h.to_owned(),
        None => match primary(&configs).await {
            Some(p) => p,
            None => dbs
                .first()
                .context("no db host with pgbackrest")?
                .name
                .clone(),
        },
    };
    let first = dbs
        .iter()
        .find(|c| c.name == chosen)
        .with_context(|| format!("{chosen} is not a db host"))?
        .clone();
    let mut report = RestoreReport {
        host: chosen.clone(),
        target: target.to_owned(),
        ..Default::default()
    };
    {
        let layout = Layout::new(&layout.root)?;
        let dbs = dbs.clone();
        let first = first.clone();
        let target = target.to_owned();
        report = tokio::task::spawn_blocking(move || -> anyhow::Result<RestoreReport> {
            for config in &dbs {
                hold_database(&layout, config)?;
            }
            for config in &dbs {
                if let Some(moved) = move_aside(config)? {
                    report.moved_aside.push(moved);
                }
            }
            let t = Instant::now();
            run_pgbackrest(
                &first,
                &[
                    "--type=time",
                    &format!("--target={target}"),
                    "--target-action=promote",
                    "restore",
                ],
                BACKUP_TIMEOUT,
            )?;
            report.restore_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            recover_standalone(&first)?;
            report.recovery_s = t.elapsed().as_secs_f64();
            Ok(report)
        })
        .await??;
    }
    report.dcs_keys_removed = clear_dcs(&first).await?;
    release(layout, &first)?;
    wait_primary(&configs, &chosen).await?;
    report.primary_after_s = Some(started.elapsed().as_secs_f64());
    for config in dbs.iter().filter(|c| c.name != chosen) {
        release(layout, config)?;
    }
    report.streaming = wait_streaming(&configs, &chosen, dbs.len() - 1).await?;
    report.healthy_after_s = Some(started.elapsed().as_secs_f64());
    Ok(report)
}

/// Patroni held (the supervisor starts only etcd) and stopped with its PostgreSQL; a host that
/// is down is started this way, so its etcd member is there for the DCS cleanup.
fn hold_database(layout: &Layout, config: &HostConfig) -> anyhow::Result<()> {
    let hold = patroni_hold_file(config);
    std::fs::write(&hold, b"streamctl restore\n")
        .with_context(|| format!("write {}", hold.display()))?;
    let pid = procs::live_pid(
        &layout.pid_file(&config.name),
        &layout.config_file(&config.name),
    );
    match pid {
        Some(pid) => {
            let left = kill_host(config, Some(pid), Scope::Database);
            if !left.is_empty() {
                bail!("{}: Patroni/PostgreSQL still alive: {left:?}", config.name);
            }
        }
        None => {
            crate::hosts::start_host(layout, config)?;
        }
    }
    Ok(())
}

/// The data directory renamed to `<pgdata>.replaced-<unix time>` (if it holds anything) and an
/// empty one made in its place.
fn move_aside(config: &HostConfig) -> anyhow::Result<Option<PathBuf>> {
    let data = pg_dirs(config)?.data_dir;
    let user = os_user(PG_OS_USER)?;
    let empty = std::fs::read_dir(&data)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    let mut moved = None;
    if !empty {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        let aside = PathBuf::from(format!("{}.replaced-{now}", data.display()));
        std::fs::rename(&data, &aside).with_context(|| format!("move {} aside", data.display()))?;
        moved = Some(aside);
    }
    own_dir(&data, Some(user), 0o700)?;
    Ok(moved)
}

/// psql as postgres over the host's socket (peer authentication), against `postgres`.
fn local_psql(config: &HostConfig, sql: &str) -> anyhow::Result<String> {
    let dirs = pg_dirs(config)?;
    let socket = dirs.socket_dir.context("no unix_socket_directories")?;
    let args: Vec<String> = [
        "-X",
        "-A",
        "-t",
        "-h",
        &socket.to_string_lossy(),
        "-p",
        &config.me().ports.postgres.to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let output = run_as_postgres(&pg_bin_dir()?.join("psql"), &args, QUICK_TIMEOUT)?;
    if !output.status.success() {
        bail!("psql: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The restored data directory recovered outside Patroni: PostgreSQL started on its socket only
/// (no TCP: no client writes before the cluster is whole), replays the archive up to the
/// target and promotes itself; the recovery settings pgBackRest wrote are reset and it is shut
/// down cleanly, ready for Patroni.
fn recover_standalone(config: &HostConfig) -> anyhow::Result<()> {
    let data = pg_dirs(config)?.data_dir;
    let pg_ctl = pg_bin_dir()?.join("pg_ctl");
    let log = config.paths.state_dir.join("restore-recovery.log");
    let data_s = data.to_string_lossy().into_owned();
    let options = standalone_options(config, &data)?;
    clear_stale_socket_locks(config);
    let start: Vec<String> = [
        "-D",
        &data_s,
        "-l",
        &log.to_string_lossy(),
        "-o",
        &options,
        "-W",
        "start",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let output = run_as_postgres(&pg_ctl, &start, QUICK_TIMEOUT)?;
    if !output.status.success() {
        bail!("pg_ctl start: {}", String::from_utf8_lossy(&output.stderr));
    }
    let started = Instant::now();
    let deadline = started + RECOVERY_TIMEOUT;
    loop {
        if local_psql(config, "SELECT pg_is_in_recovery()").is_ok_and(|r| r == "f") {
            break;
        }
        // `pg_ctl start -W` returns before the pid file is written: a moment's grace.
        let gone = super::postmaster_pid(config).is_none();
        if gone && started.elapsed() > Duration::from_secs(3) {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "{}: recovery stopped (PostgreSQL exited); {}:\n{}",
                config.name,
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: recovery not done within {RECOVERY_TIMEOUT:?}",
                config.name
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // One statement per call: psql -c runs a list as one transaction, ALTER SYSTEM refuses.
    for sql in [
        "ALTER SYSTEM RESET restore_command",
        "ALTER SYSTEM RESET recovery_target_time",
        "ALTER SYSTEM RESET recovery_target_action",
        "CHECKPOINT",
    ] {
        local_psql(config, sql)?;
    }
    let stop: Vec<String> = ["-D", &data_s, "-m", "fast", "-w", "-t", "120", "stop"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let output = run_as_postgres(&pg_ctl, &stop, Duration::from_secs(150))?;
    if !output.status.success() {
        bail!("pg_ctl stop: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

/// Server options for the standalone recovery: the restored postgresql.conf is the one Patroni
/// wrote on the host the backup came from (its paths, its archive_command), so this host's own
/// parameters are given on the command line, and no TCP listener.
/// A killed postmaster leaves its socket lock (`.s.PGSQL.<port>.lock`) behind, and PostgreSQL
/// refuses to start while the pid in it answers a signal: a zombie the init process has not
/// reaped yet, or the pid reused by another program. Locks of pids that are no live postgres
/// are removed with their sockets; a live postgres's are left (PostgreSQL then says which).
fn clear_stale_socket_locks(config: &HostConfig) {
    let dirs = config
        .patroni
        .as_ref()
        .and_then(|p| p["postgresql"]["parameters"]["unix_socket_directories"].as_str())
        .unwrap_or_default()
        .split(',')
        .map(|d| PathBuf::from(d.trim()))
        .filter(|d| d.is_absolute());
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for lock in entries.filter_map(|e| e.ok().map(|e| e.path())) {
            let name = lock
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if !(name.starts_with(".s.PGSQL.") && name.ends_with(".lock")) {
                continue;
            }
            let pid: Option<i32> = std::fs::read_to_string(&lock)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()));
            let live_postgres = pid.is_some_and(|pid| {
                procs::liveness(pid) != procs::Liveness::Dead
                    && procs::stat(pid).is_some_and(|s| s.comm.starts_with("postgres"))
            });
            if !live_postgres {
                let _ = std::fs::remove_file(lock.with_extension(""));
                let _ = std::fs::remove_file(&lock);
            }
        }
    }
}

fn standalone_options(config: &HostConfig, data: &Path) -> anyhow::Result<String> {
    let patroni = config.patroni.as_ref().context("no patroni section")?;
    let mut options: Vec<String> = patroni["postgresql"]["parameters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    options.extend([
        format!("hba_file={}", data.join("pg_hba.conf").display()),
        format!("ident_file={}", data.join("pg_ident.conf").display()),
        format!("port={}", config.me().ports.postgres),
        "listen_addresses=".to_owned(),
    ]);
    Ok(options
        .iter()
        .map(|o| format!("-c {}", super::sh_quote(o)))
        .collect::<Vec<_>>()
        .join(" "))
}

/// The old cluster's keys removed from etcd (`<namespace>/<scope>/`: initialize, leader,
/// members, history, status, sync): otherwise Patroni would measure the restored node against
/// the old leader's last position and refuse to lead. Waits for etcd to have a quorum.
async fn clear_dcs(config: &HostConfig) -> anyhow::Result<u64> {
    let etcd = config.etcd.as_ref().context("db host without etcd")?;
    let client = etcd_client(config)?;
    let deadline = Instant::now() + PRIMARY_TIMEOUT;
    while let Err(e) = etcd_health(&client, etcd).await {
        if Instant::now() >= deadline {
            bail!("{}: etcd not healthy: {e}", config.name);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let patroni = config.patroni.as_ref().context("no patroni section")?;
    let scope = patroni["scope"].as_str().context("patroni.scope")?;
    let namespace = patroni["namespace"].as_str().unwrap_or("/service");
    let prefix = format!("{}/{scope}/", namespace.trim_end_matches('/'));
    let mut end = prefix.clone().into_bytes();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let response = client
        .post(format!("{}/v3/kv/deleterange", etcd.client_url))
        .json(&json!({"key": b64.encode(prefix.as_bytes()), "range_end": b64.encode(&end)}))
        .send()
        .await
        .context("etcd deleterange")?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!("etcd deleterange {prefix}: HTTP {status} {body}");
    }
    Ok(body["deleted"]
        .as_str()
        .and_then(|d| d.parse().ok())
        .unwrap_or(0))
}

/// Patroni allowed again and its supervisor told to start it (SIGUSR1, as `streamctl start`).
fn release(layout: &Layout, config: &HostConfig) -> anyhow::Result<()> {
    let hold = patroni_hold_file(config);
    let _ = std::fs::remove_file(&hold);
    let pid = procs::live_pid(
        &layout.pid_file(&config.name),
        &layout.config_file(&config.name),
    )
    .with_context(|| format!("{}: supervisor not running", config.name))?;
    procs::signal_pid(pid, libc::SIGUSR1);
    Ok(())
}

async fn wait_primary(configs: &[HostConfig], host: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + PRIMARY_TIMEOUT;
    loop {
        if primary(configs).await.as_deref() == Some(host) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{host} did not become the primary within {PRIMARY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until `count` replicas stream from `host`; returns them.
async fn wait_streaming(
    configs: &[HostConfig],
    host: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let any = configs.first().context("no config")?;
    let client = rest_client(any)?;
    let entry = any.cluster.host(host).context("primary entry")?;
    let deadline = Instant::now() + REPLICA_TIMEOUT;
    loop {
        if let Ok(m) = member(&client, entry).await {
            let streaming = m.only_members(&any.cluster).streaming;
            if streaming.len() >= count {
                return Ok(streaming);
            }
        }
        if Instant::now() >= deadline {
            bail!("fewer than {count} replicas streaming from {host} after {REPLICA_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
