//! The database role of a local cluster: etcd members, Patroni with its PostgreSQL (run as the
//! `postgres` OS user, initdb refuses root), and what others ask about them: which db host is
//! the primary, and how the services' role connects.
//!
//! Process model. A db host is one process group like every host. Its leader is a small
//! `streamctl db-host --config <host>.json` supervisor (its command line names the host's config,
//! so pid files, `live_pid`, `status` and `down` treat it as any host) whose children are the
//! host's etcd member and Patroni. Patroni starts the postmaster in a session of its own and
//! every PostgreSQL backend calls setsid too, so signalling the group is not enough:
//! [`host_processes`] adds the postmaster (from `postmaster.pid`) and whatever else names the
//! host's state directory, with all their descendants. The etcd witness of lb1 joins lb1's
//! group, so `kill lb1` takes it down as a real host failure would.
//!
//! Secrets never reach a command line: Patroni gets its passwords from the environment
//! (`PATRONI_*_PASSWORD`, which Patroni removes from its environment at start), and the
//! post-bootstrap script reads the services' password from a postgres-owned copy in the host's
//! state directory.
//!
//! Everything between hosts is TLS with the cluster CA: etcd requires a client certificate from
//! clients and peers, Patroni's REST API is HTTPS and wants a client certificate plus its
//! credentials for anything that changes state, and PostgreSQL accepts TCP connections only
//! over TLS. Patroni and PostgreSQL read postgres-owned copies of the host's certificate and key
//! (see [`db_tls_files`]); etcd runs as the runner and reads the host's files directly.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use streaming_core::config::{ClusterConfig, EtcdConfig, HostConfig, HostEntry, HostPaths, Role};
use streaming_core::secrets::read_secret;

use crate::cluster::{Layout, write_file};
use crate::procs;

/// The OS user Patroni and PostgreSQL run as (created by Debian's postgresql packages).
pub const PG_OS_USER: &str = "postgres";
/// Patroni from PyPI in a venv over Debian's python3 (whose psycopg2 it uses), installed by
/// scripts/setup-debian.sh. Debian 12's own patroni 3.0.2 can take the leader key back after
/// a hang longer than the ttl and demote the new primary, losing acknowledged commits
/// (patroni/patroni#2689, fixed in 3.0.3). Pinned to 3.0.4: from 3.1 on, a ttl under 20 s is
/// raised to 20 s.
pub const PYTHON: &str = "/opt/streaming-cluster/patroni/bin/python3";
pub const PATRONI: &str = "/opt/streaming-cluster/patroni/bin/patroni";
/// Server binaries when `STREAMCTL_PG_BIN_DIR` is unset (else the newest installed version).
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// One REST request to Patroni or etcd (a hung host must not stall `status` or `up`).
pub const REST_TIMEOUT: Duration = Duration::from_secs(2);
/// Patroni's `/patroni` document is a few hundred bytes.
const MAX_REST_BYTES: usize = 64 * 1024;
/// `sockaddr_un.sun_path` holds 107 bytes plus the NUL.
const MAX_SOCKET_PATH: usize = 107;
/// How long `down` lets etcd stop on SIGTERM after Patroni is gone (it can take ~9 s).
const ETCD_STOP_GRACE: Duration = Duration::from_secs(2);
/// How long `up` waits for a streaming replica once the primary is there.
pub const REPLICA_GRACE: Duration = Duration::from_secs(20);
/// Patroni's REST API user for requests that change state. Its password is the PostgreSQL
/// superuser's: whoever holds that already controls the database entirely, so the API gains no
/// new holder and the cluster no new secret to hand out.
pub const RESTAPI_USER: &str = "patroni";
/// Processes that may belong to a db host although they are not in its group (the postmaster
/// and its helpers); an operator's `less <state>/hosts/db1/...` is not one of them.
const HOST_COMMANDS: &[&str] = &[
    "postgres",
    "etcd",
    "python3",
    "patroni",
    "pg_rewind",
    "pg_basebackup",
    "pg_ctl",
    "initdb",
    "psql",
    "setpriv",
];

// ---------------------------------------------------------------------------------------------
// Files of a db host

/// Patroni's config file (JSON is YAML).
pub fn patroni_file(config: &HostConfig) -> PathBuf {
    config.paths.state_dir.join("patroni.yml")
}

/// The script Patroni runs once after initdb (`bootstrap.post_bootstrap`).
pub fn post_bootstrap_file(config: &HostConfig) -> PathBuf {
    config.paths.state_dir.join("post-bootstrap.sh")
}

/// The postgres-owned copy of the services' password that the post-bootstrap script reads.
pub fn app_password_copy(config: &HostConfig) -> PathBuf {
    config.paths.state_dir.join("app-password")
}

/// The host's certificate, key and CA as Patroni and PostgreSQL must read them (postgres-owned
/// copies named in the generator's patroni section): (source, copy) pairs.
pub fn db_tls_files(config: &HostConfig) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let patroni = config
        .patroni
        .as_ref()
        .with_context(|| format!("{} has no patroni section", config.name))?;
    let restapi = &patroni["restapi"];
    [
        (&config.paths.tls_cert, "certfile"),
        (&config.paths.tls_key, "keyfile"),
        (&config.paths.ca_cert, "cafile"),
    ]
    .into_iter()
    .map(|(source, key)| {
        let copy = restapi[key]
            .as_str()
            .with_context(|| format!("{}: patroni.restapi.{key} is missing", config.name))?;
        Ok((source.clone(), PathBuf::from(copy)))
    })
    .collect()
}

/// etcd's own output (verbose JSON lines), beside the host's `.out` file.
pub fn etcd_log_file(config: &HostConfig) -> PathBuf {
    let dir = config
        .paths
        .log_dir
        .clone()
        .unwrap_or_else(|| config.paths.state_dir.clone());
    dir.join(format!("{}-etcd.out", config.name))
}

/// The log files worth reading when the host's database does not come up.
pub fn log_files(layout: &Layout, config: &HostConfig) -> Vec<PathBuf> {
    let mut files = vec![layout.out_file(&config.name)];
    if config.etcd.is_some() {
        files.push(etcd_log_file(config));
    }
    files
}

/// PostgreSQL's directories from the host's `patroni` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgDirs {
    pub data_dir: PathBuf,
    pub socket_dir: Option<PathBuf>,
}

pub fn pg_dirs(config: &HostConfig) -> anyhow::Result<PgDirs> {
    let patroni = config
        .patroni
        .as_ref()
        .with_context(|| format!("{} has no patroni section", config.name))?;
    let postgresql = &patroni["postgresql"];
    let data_dir = postgresql["data_dir"]
        .as_str()
        .with_context(|| format!("{}: patroni.postgresql.data_dir is missing", config.name))?;
    let socket_dir = postgresql["parameters"]["unix_socket_directories"]
        .as_str()
        .and_then(|dirs| dirs.split(',').next())
        .map(|d| PathBuf::from(d.trim()));
    Ok(PgDirs {
        data_dir: data_dir.into(),
        socket_dir,
    })
}

/// PostgreSQL's server binaries: `STREAMCTL_PG_BIN_DIR`, else version 15, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
pub fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("STREAMCTL_PG_BIN_DIR") {
        return Ok(dir.into());
    }
    let preferred = Path::new(PG_BIN_DIR);
    if preferred.join("postgres").exists() {
        return Ok(preferred.to_owned());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).context(
        "PostgreSQL server binaries not found in /usr/lib/postgresql/<version>/bin \
         (Debian: apt install postgresql-15, or set STREAMCTL_PG_BIN_DIR)",
    )
}

/// Patroni's configuration for this host: the generator's section plus what depends on this
/// machine (where the server binaries are, the post-bootstrap script).
pub fn patroni_settings(
    config: &HostConfig,
    bin_dir: &Path,
    post_bootstrap: &Path,
) -> anyhow::Result<Value> {
    let mut settings = config
        .patroni
        .clone()
        .with_context(|| format!("{} has no patroni section", config.name))?;
    let object = settings
        .as_object_mut()
        .context("the patroni section is not an object")?;
    for (section, key, value) in [
        ("postgresql", "bin_dir", bin_dir),
        // Patroni splits the command with shlex, so the path is quoted.
        ("bootstrap", "post_bootstrap", post_bootstrap),
    ] {
        let value = if key == "post_bootstrap" {
            sh_quote(&value.to_string_lossy())
        } else {
            value.to_string_lossy().into_owned()
        };
        object
            .entry(section)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .with_context(|| format!("patroni.{section} is not an object"))?
            .insert(key.to_owned(), Value::String(value));
    }
    Ok(settings)
}

/// The post-bootstrap script: creates the services' login role and their database. Patroni
/// runs it as the postgres user with a superuser connection string as `$1`. The password is
/// read by psql itself (backquote into a psql variable, quoted with `:'pw'`), so it appears
/// in no command line.
pub fn post_bootstrap_script(psql: &Path, database: &str, user: &str) -> String {
    format!(
        r#"#!/bin/sh
# Written by streamctl. Patroni runs it once after initdb, as the postgres user, with a
# superuser connection string as $1: it creates the services' role and their database.
set -eu
cd "$(dirname "$0")"
test -s app-password || {{ echo "post-bootstrap: app-password missing" >&2; exit 1; }}
exec {psql} -X -q -v ON_ERROR_STOP=1 -v role={role} -v db={db} -d "$1" <<'SQL'
\set pw `cat app-password`
CREATE ROLE :"role" LOGIN PASSWORD :'pw';
CREATE DATABASE :"db" OWNER :"role";
SQL
"#,
        psql = sh_quote(&psql.to_string_lossy()),
        role = sh_quote(user),
        db = sh_quote(database),
    )
}

/// Single-quotes a word for sh (and Python's shlex).
pub fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// etcd's flags for one member. With an existing data dir etcd ignores the `--initial-*`
/// flags and simply restarts as the member it was. Clients and peers must show a certificate
/// from the cluster CA; the member shows the host's own to both.
pub fn etcd_args(etcd: &EtcdConfig, paths: &HostPaths) -> Vec<String> {
    let data_dir = etcd.data_dir.to_string_lossy().into_owned();
    let cert = paths.tls_cert.to_string_lossy().into_owned();
    let key = paths.tls_key.to_string_lossy().into_owned();
    let ca = paths.ca_cert.to_string_lossy().into_owned();
    let flags = [
        ("--name", etcd.name.as_str()),
        ("--data-dir", &data_dir),
        ("--listen-client-urls", &etcd.client_url),
        ("--advertise-client-urls", &etcd.client_url),
        ("--listen-peer-urls", &etcd.peer_url),
        ("--initial-advertise-peer-urls", &etcd.peer_url),
        ("--initial-cluster", &etcd.initial_cluster),
        ("--initial-cluster-token", &etcd.cluster_token),
        ("--initial-cluster-state", "new"),
        ("--heartbeat-interval", "100"),
        ("--election-timeout", "1000"),
        ("--logger", "zap"),
        ("--log-outputs", "stderr"),
        ("--cert-file", &cert),
        ("--key-file", &key),
        ("--trusted-ca-file", &ca),
        ("--peer-cert-file", &cert),
        ("--peer-key-file", &key),
        ("--peer-trusted-ca-file", &ca),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value.to_owned()]);
    flags
        .chain([
            "--client-cert-auth".to_owned(),
            "--peer-client-cert-auth".to_owned(),
            // A member back from a partition asks before it campaigns: without it (etcd 3.4's
            // default) the terms it ran up alone depose the leader, and the election that
            // follows outlasted Patroni's retry_timeout and demoted a healthy primary.
            "--pre-vote".to_owned(),
        ])
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Preparing and starting

/// An OS user's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsUser {
    pub uid: u32,
    pub gid: u32,
}

pub fn os_user(name: &str) -> anyhow::Result<OsUser> {
    let c_name = CString::new(name)?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwnam_r writes into `entry` and `buffer`, both ours and large enough (it
    // reports ERANGE otherwise); `found` is null or points at `entry`.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        bail!("no `{name}` OS user (Debian: apt install postgresql-15 creates it)");
    }
    Ok(OsUser {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
}

/// Gives others the search (x) bit on every ancestor of `dir` that lacks it, so the postgres
/// user can reach its directory (a test's tempdir is 0700). Returns the directories changed.
pub fn open_ancestors(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for ancestor in dir.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            continue;
        }
        let meta =
            std::fs::metadata(ancestor).with_context(|| format!("stat {}", ancestor.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            std::fs::set_permissions(ancestor, std::fs::Permissions::from_mode(mode | 0o001))
                .with_context(|| format!("chmod o+x {}", ancestor.display()))?;
            changed.push(ancestor.to_owned());
        }
    }
    Ok(changed)
}

fn own_dir(dir: &Path, user: Option<OsUser>, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    if let Some(user) = user {
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))
            .with_context(|| format!("chown {} to {PG_OS_USER}", dir.display()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dir.display()))
}

fn write_owned(path: &Path, bytes: &[u8], user: OsUser, mode: u32) -> anyhow::Result<()> {
    write_file(path, bytes, true).with_context(|| format!("write {}", path.display()))?;
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn prepare_etcd_dir(etcd: &EtcdConfig) -> anyhow::Result<()> {
    // etcd wants its data dir private.
    own_dir(&etcd.data_dir, None, 0o700)
}

/// Everything a db host needs on disk before its supervisor starts: directories owned by the
/// postgres user (and reachable by it), Patroni's config, the post-bootstrap script and the
/// password copy it reads. Returns the ancestor directories that had to be opened (o+x).
pub fn prepare_host(config: &HostConfig) -> anyhow::Result<Vec<PathBuf>> {
    let user = os_user(PG_OS_USER)?;
    let bin_dir = pg_bin_dir()?;
    for needed in [PYTHON, PATRONI] {
        if !Path::new(needed).exists() {
            bail!("{needed} is missing (Debian: apt install patroni python3-psycopg2)");
        }
    }
    let state = &config.paths.state_dir;
    std::fs::create_dir_all(state).with_context(|| format!("create {}", state.display()))?;
    let opened = open_ancestors(state)?;
    own_dir(state, Some(user), 0o700)?;
    let dirs = pg_dirs(config)?;
    // An existing data dir keeps its contents (and their owner); only its top is fixed.
    own_dir(&dirs.data_dir, Some(user), 0o700)?;
    if let Some(socket_dir) = &dirs.socket_dir {
        let port = config.me().ports.postgres;
        let socket = socket_dir.join(format!(".s.PGSQL.{port}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "{}: PostgreSQL's socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a \
                 shorter --state directory",
                config.name,
                socket.display()
            );
        }
        own_dir(socket_dir, Some(user), 0o700)?;
    }
    if let Some(etcd) = &config.etcd {
        prepare_etcd_dir(etcd)?;
    }
    // PostgreSQL refuses a key that others could read; a renewed certificate is copied again at
    // the next start.
    for (source, copy) in db_tls_files(config)? {
        let bytes = std::fs::read(&source).with_context(|| format!("read {}", source.display()))?;
        if let Some(dir) = copy.parent() {
            own_dir(dir, Some(user), 0o700)?;
        }
        write_owned(&copy, &bytes, user, 0o600)?;
    }
    let password = read_secret(&config.paths.db_password)?;
    write_owned(&app_password_copy(config), password.as_bytes(), user, 0o600)?;
    let database = &config.cluster.database;
    let script = post_bootstrap_script(&bin_dir.join("psql"), &database.name, &database.user);
    write_owned(&post_bootstrap_file(config), script.as_bytes(), user, 0o700)?;
    let settings = patroni_settings(config, &bin_dir, &post_bootstrap_file(config))?;
    write_owned(
        &patroni_file(config),
        &serde_json::to_vec_pretty(&settings)?,
        user,
        0o600,
    )?;
    Ok(opened)
}

/// Starts a db host: its files, then the `streamctl db-host` supervisor as the leader of the
/// host's process group. Returns the supervisor's pid (recorded in the host's pid file).
pub fn start_host(layout: &Layout, config: &HostConfig) -> anyhow::Result<i32> {
    for dir in prepare_host(config)? {
        eprintln!(
            "{}: gave others search permission (o+x) on {} so the {PG_OS_USER} user reaches \
             its files",
            config.name,
            dir.display()
        );
    }
    let exe = std::env::current_exe().context("cannot locate streamctl's own executable")?;
    let cgroup = crate::cgroup::existing(config);
    procs::spawn_with_args(
        &procs::HostProcess {
            binary: &exe,
            config: &layout.config_file(&config.name),
            out_file: &layout.out_file(&config.name),
            pid_file: &layout.pid_file(&config.name),
            cgroup: cgroup.as_deref(),
        },
        &["db-host"],
    )
}

fn etcd_binary() -> &'static str {
    if Path::new("/usr/bin/etcd").exists() {
        "/usr/bin/etcd"
    } else {
        "etcd"
    }
}

/// Starts the host's etcd member, output appended to its own log. `group`: join that process
/// group (the witness joins lb1's); `None` stays in the caller's (the db supervisor's).
pub fn spawn_etcd(config: &HostConfig, group: Option<i32>) -> anyhow::Result<i32> {
    let etcd = config
        .etcd
        .as_ref()
        .with_context(|| format!("{} runs no etcd member", config.name))?;
    prepare_etcd_dir(etcd)?;
    let log_path = etcd_log_file(config);
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let mut command = Command::new(etcd_binary());
    command
        .args(etcd_args(etcd, &config.paths))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(group) = group {
        command.process_group(group);
        // Joining another host's group: its cgroup too (a db host's own etcd inherits it).
        if let Some(dir) = crate::cgroup::existing(config) {
            crate::cgroup::join_in_child(&mut command, &dir);
        }
    }
    let child = command.spawn().with_context(|| {
        format!(
            "start etcd for {} (Debian: apt install etcd-server)",
            config.name
        )
    })?;
    i32::try_from(child.id()).context("pid out of range")
}

/// Patroni as the postgres user, passwords in its environment only.
fn patroni_command(config: &HostConfig) -> anyhow::Result<Command> {
    let superuser = read_secret(&config.paths.db_superuser_password)?;
    let replication = read_secret(&config.paths.db_replication_password)?;
    let state = &config.paths.state_dir;
    let mut command = Command::new("setpriv");
    command
        .arg(format!("--reuid={PG_OS_USER}"))
        .arg(format!("--regid={PG_OS_USER}"))
        .args(["--init-groups", "--", PYTHON, PATRONI])
        .arg(patroni_file(config))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", state)
        .env("LANG", "C.UTF-8")
        .env("PYTHONUNBUFFERED", "1")
        .env("PATRONI_SUPERUSER_PASSWORD", &superuser)
        .env("PATRONI_REPLICATION_PASSWORD", &replication)
        .env("PATRONI_REWIND_PASSWORD", &superuser)
        .env("PATRONI_RESTAPI_USERNAME", RESTAPI_USER)
        .env("PATRONI_RESTAPI_PASSWORD", &superuser)
        .current_dir(state)
        .stdin(Stdio::null());
    Ok(command)
}

/// The body of `streamctl db-host --config FILE`: starts the host's etcd member and Patroni as
/// children (same process group) and stays as the group's leader until both have exited.
pub fn run_host(config_file: &Path) -> anyhow::Result<()> {
    let config = HostConfig::load(config_file)?;
    let name = config.name.clone();
    // SIGTERM (from `down`) reaches the whole group: this leader stays until its children have
    // stopped and are reaped, instead of leaving them to init, and restarts nothing meanwhile.
    // A handler, unlike SIG_IGN, is reset to the default in the children at exec.
    static TERMINATING: AtomicBool = AtomicBool::new(false);
    extern "C" fn note_termination(_: libc::c_int) {
        TERMINATING.store(true, Ordering::SeqCst);
    }
    // SAFETY: installing a handler that only stores an atomic (async-signal-safe).
    unsafe {
        libc::signal(
            libc::SIGTERM,
            note_termination as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let mut children: BTreeMap<i32, &str> = BTreeMap::new();
    if config.etcd.is_some() {
        let pid = spawn_etcd(&config, None)?;
        println!(
            "{name}: etcd pid {pid}, log {}",
            etcd_log_file(&config).display()
        );
        children.insert(pid, "etcd");
    }
    let spawn_patroni = |children: &mut BTreeMap<i32, &str>| -> anyhow::Result<()> {
        let child = patroni_command(&config)?
            .spawn()
            .with_context(|| format!("{name}: start Patroni"))?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        println!("{name}: Patroni pid {pid} as {PG_OS_USER}");
        children.insert(pid, "Patroni");
        Ok(())
    };
    if config.patroni.is_some() {
        spawn_patroni(&mut children)?;
    }
    // `streamctl start` after `kill --postgres` sends SIGUSR1: run Patroni again, as systemd's
    // Restart= would on a real host. No SA_RESTART, so waitpid returns EINTR and we look.
    static RESPAWN: AtomicBool = AtomicBool::new(false);
    extern "C" fn respawn(_: libc::c_int) {
        RESPAWN.store(true, Ordering::SeqCst);
    }
    // SAFETY: a zeroed sigaction with a handler that only stores an atomic (async-signal-safe).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = respawn as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
    }
    while !children.is_empty() {
        let mut status = 0;
        // SAFETY: plain syscall; reaps any child of this process.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                if RESPAWN.swap(false, Ordering::SeqCst)
                    && config.patroni.is_some()
                    && !children.values().any(|w| *w == "Patroni")
                    && let Err(e) = spawn_patroni(&mut children)
                {
                    eprintln!("{name}: {e:#}");
                }
                continue;
            }
            break;
        }
        if let Some(what) = children.remove(&pid) {
            println!(
                "{name}: {what} (pid {pid}) exited: {}",
                describe_wait(status)
            );
            // Patroni that fails on its own (it exits at start when its etcd member has not yet
            // decided the cluster version) is started again, as the NixOS unit's
            // Restart=on-failure does; one killed by a signal (`streamctl kill`) stays down
            // until `streamctl start`.
            let failed = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) != 0;
            if what == "Patroni" && failed && !TERMINATING.load(Ordering::SeqCst) {
                println!(
                    "{name}: starting Patroni again in {} s",
                    PATRONI_RESTART_DELAY.as_secs()
                );
                std::thread::sleep(PATRONI_RESTART_DELAY);
                if !TERMINATING.load(Ordering::SeqCst)
                    && let Err(e) = spawn_patroni(&mut children)
                {
                    eprintln!("{name}: {e:#}");
                }
            }
        }
    }
    Ok(())
}

/// How long a failed Patroni stays down before it is started again (a pause, so that a Patroni
/// that cannot start does not spin).
const PATRONI_RESTART_DELAY: Duration = Duration::from_secs(1);

fn describe_wait(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

// ---------------------------------------------------------------------------------------------
// Signals to a whole db host

/// The postmaster's pid from `<data_dir>/postmaster.pid` (first line), if it is alive.
pub fn postmaster_pid(config: &HostConfig) -> Option<i32> {
    let dirs = pg_dirs(config).ok()?;
    let text = std::fs::read_to_string(dirs.data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 1 && procs::liveness(pid) != procs::Liveness::Dead).then_some(pid)
}

fn cmdline_mentions(pid: i32, needle: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.windows(needle.len()).any(|w| w == needle))
        .unwrap_or(false)
}

/// Every live process of a host: its group (`pgid`: the pid-file pid), the postmaster, host
/// programs whose command line names the host's state directory, and all their descendants
/// (PostgreSQL backends are each in a session of their own).
pub fn host_processes(config: &HostConfig, pgid: Option<i32>) -> Vec<i32> {
    let live: Vec<procs::Stat> = procs::all()
        .into_iter()
        .filter(|s| !matches!(s.state, 'Z' | 'X'))
        .collect();
    let pgid = pgid.filter(|g| *g > 1);
    let needle = format!("{}/", config.paths.state_dir.display());
    let mut set: BTreeSet<i32> = live
        .iter()
        .filter(|s| {
            Some(s.pgrp) == pgid
                || (HOST_COMMANDS.contains(&s.comm.as_str())
                    && cmdline_mentions(s.pid, needle.as_bytes()))
        })
        .map(|s| s.pid)
        .collect();
    if let Some(postmaster) = postmaster_pid(config) {
        set.insert(postmaster);
        // Patroni's helper called setsid and then started the postmaster: that session's
        // group is the postmaster's.
        if let Some(pgrp) = procs::stat(postmaster).map(|s| s.pgrp).filter(|g| *g > 1) {
            set.extend(live.iter().filter(|s| s.pgrp == pgrp).map(|s| s.pid));
        }
    }
    loop {
        let before = set.len();
        for s in &live {
            if set.contains(&s.ppid) {
                set.insert(s.pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    set.remove(&(std::process::id() as i32));
    set.into_iter().collect()
}

/// Whether a process is an etcd member (stopped last on `down`).
fn is_etcd(pid: i32) -> bool {
    procs::stat(pid).is_some_and(|s| s.comm == "etcd")
}

fn signal_all(pids: &[i32], pgid: Option<i32>, signal: libc::c_int) {
    if let Some(pgid) = pgid {
        procs::signal_group(pgid, signal);
    }
    for pid in pids {
        procs::signal_pid(*pid, signal);
    }
}

/// What `kill`/`hang` reach on a db host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything, as a power cut would: supervisor, etcd, Patroni, PostgreSQL.
    Host,
    /// Patroni and PostgreSQL only: the database service crashed, the machine (its supervisor
    /// and etcd member) is fine.
    Database,
}

fn in_scope(pids: Vec<i32>, pgid: Option<i32>, scope: Scope) -> Vec<i32> {
    match scope {
        Scope::Host => pids,
        Scope::Database => pids
            .into_iter()
            .filter(|p| Some(*p) != pgid && !is_etcd(*p))
            .collect(),
    }
}

/// SIGKILL every process of the host (or of its database service), as a power cut would. Everything is frozen (SIGSTOP)
/// first and the tree read again, so nothing forks or restarts the postmaster between the read
/// and the kill; every process seen in any round is killed (one orphaned by a parent that
/// exited meanwhile included). Returns the survivors (empty when the host is gone).
pub fn kill_host(config: &HostConfig, pgid: Option<i32>, scope: Scope) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen: BTreeSet<i32> = BTreeSet::new();
    // Group-wide signals would reach the supervisor and etcd too.
    let group = (scope == Scope::Host).then_some(pgid).flatten();
    loop {
        seen.extend(in_scope(host_processes(config, pgid), pgid, scope));
        let alive: Vec<i32> = seen.iter().copied().filter(|p| is_alive(*p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        signal_all(&alive, group, libc::SIGSTOP);
        seen.extend(in_scope(host_processes(config, pgid), pgid, scope));
        let alive: Vec<i32> = seen.iter().copied().filter(|p| is_alive(*p)).collect();
        signal_all(&alive, group, libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_alive(pid: i32) -> bool {
    procs::liveness(pid) != procs::Liveness::Dead
}

/// SIGSTOP every process of the host (Patroni first, so it cannot react to its postmaster
/// stopping). Returns how many processes are stopped.
pub fn hang_host(config: &HostConfig, pgid: Option<i32>, scope: Scope) -> usize {
    let mut pids = Vec::new();
    let group = (scope == Scope::Host).then_some(pgid).flatten();
    // A second pass stops what was forked while the first ran.
    for _ in 0..2 {
        pids = in_scope(host_processes(config, pgid), pgid, scope);
        signal_all(&pids, group, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(20));
    }
    pids.len()
}

/// SIGCONT every process of the host (after `kill --hang`).
pub fn resume_host(config: &HostConfig, pgid: Option<i32>) -> usize {
    let pids = host_processes(config, pgid);
    // The postmaster and its children first: Patroni then finds PostgreSQL answering.
    for pid in pids.iter().rev() {
        procs::signal_pid(*pid, libc::SIGCONT);
    }
    if let Some(pgid) = pgid {
        procs::signal_group(pgid, libc::SIGCONT);
    }
    pids.len()
}

/// Stops one host for `down` (see [`stop_hosts`]). True when nothing of it is left.
pub fn stop_host(config: &HostConfig, pgid: Option<i32>, grace: Duration) -> bool {
    stop_hosts(&[(config, pgid)], grace)[0]
}

/// Stops hosts together for `down`: first every Patroni (and supervisor or service) gets
/// SIGTERM and every postmaster a fast shutdown (SIGINT) while all etcd members still answer,
/// so the leader key is released cleanly; then every etcd member gets SIGTERM; after the grace
/// periods (`grace`, then 2 s for etcd) whatever is left is killed. One result per host: true
/// when nothing of it is left.
pub fn stop_hosts(hosts: &[(&HostConfig, Option<i32>)], grace: Duration) -> Vec<bool> {
    let all_of = |(config, pgid): &(&HostConfig, Option<i32>)| host_processes(config, *pgid);
    for host in hosts {
        let (config, pgid) = *host;
        let pids = all_of(host);
        signal_all(&pids, pgid, libc::SIGCONT);
        let postmaster = postmaster_pid(config);
        for pid in &pids {
            if is_etcd(*pid) {
                continue;
            }
            let signal = if Some(*pid) == postmaster {
                libc::SIGINT
            } else if procs::stat(*pid).is_some_and(|s| s.comm == "postgres") {
                // Backends follow their postmaster.
                continue;
            } else {
                libc::SIGTERM
            };
            procs::signal_pid(*pid, signal);
        }
    }
    type Done<'a> = &'a dyn Fn(&[i32], &HostConfig, Option<i32>) -> bool;
    let wait_for = |done: Done<'_>, timeout: Duration| {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && !hosts.iter().all(|h| done(&all_of(h), h.0, h.1)) {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // A db host's supervisor (its group's leader) stays until etcd, its last child, is gone.
    let only_etcd_left = |left: &[i32], config: &HostConfig, pgid: Option<i32>| {
        left.iter()
            .all(|p| is_etcd(*p) || (config.patroni.is_some() && Some(*p) == pgid))
    };
    wait_for(&only_etcd_left, grace);
    for host in hosts {
        for pid in all_of(host).into_iter().filter(|p| is_etcd(*p)) {
            procs::signal_pid(pid, libc::SIGTERM);
        }
    }
    wait_for(&|left, _, _| left.is_empty(), ETCD_STOP_GRACE);
    hosts
        .iter()
        .map(|(config, pgid)| kill_host(config, *pgid, Scope::Host).is_empty())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Asking Patroni and etcd

/// One db host as Patroni's `GET /patroni` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// `primary` (Patroni 3 says "master"), `replica`, `uninitialized`, ...
    pub role: String,
    /// `running`, `starting`, `stopped`, `creating replica`, ...
    pub state: String,
    pub timeline: Option<u64>,
    /// On the primary: replicas (Patroni member names) whose WAL stream is live.
    pub streaming: Vec<String>,
    /// On a replica: it is the synchronous standby.
    pub sync_standby: bool,
}

impl Member {
    /// Keeps only db hosts of the cluster in `streaming` (a replica being cloned shows up as
    /// `pg_basebackup`, which streams but is no replica yet).
    pub fn only_members(mut self, cluster: &ClusterConfig) -> Self {
        self.streaming
            .retain(|name| cluster.host(name).is_some_and(|h| h.role == Role::Db));
        self
    }
}

/// Reads `/patroni`'s JSON; `None` when it lacks role or state.
pub fn parse_member(json: &Value) -> Option<Member> {
    let role = json.get("role")?.as_str()?;
    let role = if role == "master" { "primary" } else { role };
    let streaming = json
        .get("replication")
        .and_then(Value::as_array)
        .map(|replicas| {
            replicas
                .iter()
                .filter(|r| r["state"] == "streaming")
                .filter_map(|r| r["application_name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Some(Member {
        role: role.to_owned(),
        state: json.get("state")?.as_str()?.to_owned(),
        timeline: json.get("timeline").and_then(Value::as_u64),
        streaming,
        sync_standby: json.get("sync_standby").and_then(Value::as_bool) == Some(true),
    })
}

fn https_client(
    ca_cert: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<reqwest::Client> {
    let ca = std::fs::read(ca_cert).with_context(|| format!("read {}", ca_cert.display()))?;
    let mut builder = reqwest::Client::builder()
        .connect_timeout(REST_TIMEOUT)
        .timeout(REST_TIMEOUT)
        .no_proxy()
        .https_only(true)
        .tls_built_in_root_certs(false)
        .add_root_certificate(
            reqwest::Certificate::from_pem(&ca)
                .with_context(|| format!("{} is no PEM certificate", ca_cert.display()))?,
        );
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert).with_context(|| format!("read {}", cert.display()))?;
        pem.extend(std::fs::read(key).with_context(|| format!("read {}", key.display()))?);
        builder = builder.identity(
            reqwest::Identity::from_pem(&pem)
                .with_context(|| format!("{} + {}", cert.display(), key.display()))?,
        );
    }
    builder.build().context("build the HTTPS client")
}

/// An HTTPS client for Patroni's REST API (never through a proxy), trusting only the cluster CA.
/// It shows no client certificate: reads need none.
pub fn rest_client(config: &HostConfig) -> anyhow::Result<reqwest::Client> {
    https_client(&config.paths.ca_cert, None)
}

/// An HTTPS client for etcd, which refuses clients without a certificate from the cluster CA:
/// it shows the host's own.
pub fn etcd_client(config: &HostConfig) -> anyhow::Result<reqwest::Client> {
    https_client(
        &config.paths.ca_cert,
        Some((&config.paths.tls_cert, &config.paths.tls_key)),
    )
}

/// Patroni's REST base URL of a db host.
pub fn rest_url(host: &HostEntry) -> String {
    format!("https://{}", host.socket(host.ports.patroni))
}

async fn get_small(client: &reqwest::Client, url: &str) -> Result<(u16, Vec<u8>), String> {
    let mut response = client.get(url).send().await.map_err(|e| {
        if e.is_timeout() {
            "timeout".to_owned()
        } else if e.is_connect() {
            "no answer (connect failed)".to_owned()
        } else {
            crate::probe::error_chain(&e.without_url())
        }
    })?;
    let status = response.status().as_u16();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_REST_BYTES {
            return Err(format!("answer larger than {MAX_REST_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, body))
}

/// `GET /patroni` of one db host.
pub async fn member(client: &reqwest::Client, host: &HostEntry) -> Result<Member, String> {
    let (status, body) = get_small(client, &format!("{}/patroni", rest_url(host))).await?;
    let json: Value =
        serde_json::from_slice(&body).map_err(|e| format!("HTTP {status}, not JSON: {e}"))?;
    parse_member(&json).ok_or_else(|| format!("HTTP {status} without role/state: {json}"))
}

/// Every db host of the cluster with its Patroni state (asked concurrently).
pub async fn members(
    client: &reqwest::Client,
    cluster: &ClusterConfig,
) -> Vec<(String, Result<Member, String>)> {
    let hosts: Vec<&HostEntry> = cluster.hosts_with_role(Role::Db).collect();
    let answers = futures::future::join_all(hosts.iter().map(|h| member(client, h))).await;
    hosts
        .iter()
        .map(|h| h.name.clone())
        .zip(
            answers
                .into_iter()
                .map(|a| a.map(|m| m.only_members(cluster))),
        )
        .collect()
}

/// The db host whose Patroni answers 200 on `GET /primary` (it holds the leader lock).
pub async fn primary_in(client: &reqwest::Client, cluster: &ClusterConfig) -> Option<String> {
    let hosts: Vec<&HostEntry> = cluster.hosts_with_role(Role::Db).collect();
    let urls: Vec<String> = hosts
        .iter()
        .map(|h| format!("{}/primary", rest_url(h)))
        .collect();
    let answers = futures::future::join_all(urls.iter().map(|url| get_small(client, url))).await;
    hosts
        .iter()
        .zip(answers)
        .find(|(_, answer)| matches!(answer, Ok((200, _))))
        .map(|(h, _)| h.name.clone())
}

/// The name of the db host that is the primary now, from any host configs of the cluster
/// (each holds the whole cluster view), e.g. `Layout::load_configs()`'s.
pub async fn primary(configs: &[HostConfig]) -> Option<String> {
    let any = configs.first()?;
    primary_in(&rest_client(any).ok()?, &any.cluster).await
}

/// `GET <client_url>/health` of an etcd member: `Ok` when it answers `"health":"true"`.
pub async fn etcd_health(client: &reqwest::Client, etcd: &EtcdConfig) -> Result<(), String> {
    let (status, body) = get_small(client, &format!("{}/health", etcd.client_url)).await?;
    let json: Value = serde_json::from_slice(&body).unwrap_or_default();
    if status == 200 && json["health"] == "true" {
        Ok(())
    } else {
        Err(format!(
            "etcd unhealthy: HTTP {status} {}",
            String::from_utf8_lossy(&body).trim()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The services' database

fn database_host<'a>(
    configs: &'a [HostConfig],
    host: &str,
) -> anyhow::Result<(&'a HostConfig, &'a HostEntry)> {
    let any = configs.first().context("no host config")?;
    let entry = any
        .cluster
        .host(host)
        .filter(|h| h.role == Role::Db)
        .with_context(|| format!("{host} is not a db host"))?;
    Ok((any, entry))
}

/// `postgres://streaming:<password>@<addr>:5432/streaming?sslmode=verify-full&sslrootcert=<CA>`
/// for a db host: the services' role, password read from the state's secret file, TLS checked
/// against the cluster CA.
pub fn app_database_url(configs: &[HostConfig], host: &str) -> anyhow::Result<String> {
    let (any, entry) = database_host(configs, host)?;
    let password = read_secret(&any.paths.db_password)?;
    let database = &any.cluster.database;
    Ok(format!(
        "postgres://{}:{}@{}/{}?sslmode=verify-full&sslrootcert={}",
        percent_encode(&database.user),
        percent_encode(&password),
        entry.socket(entry.ports.postgres),
        percent_encode(&database.name),
        percent_encode(&any.paths.ca_cert.to_string_lossy())
    ))
}

/// The services' URL of the current primary (see [`primary`]).
pub async fn primary_database_url(configs: &[HostConfig]) -> anyhow::Result<String> {
    let host = primary(configs)
        .await
        .context("no db host answers 200 on /primary")?;
    app_database_url(configs, &host)
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs SQL with psql as the services' role on a db host and returns its unaligned, tuples-only
/// output, over TLS checked against the cluster CA (`sslmode` overrides that, e.g. `disable` to
/// show that a plaintext connection is refused). The password travels in psql's environment,
/// not its command line. Blocking; a psql that has not finished within `timeout` (a hung
/// server) is killed.
pub fn psql_app(
    configs: &[HostConfig],
    host: &str,
    sql: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    psql_app_with(configs, host, sql, timeout, "verify-full")
}

pub fn psql_app_with(
    configs: &[HostConfig],
    host: &str,
    sql: &str,
    timeout: Duration,
    sslmode: &str,
) -> anyhow::Result<String> {
    let (any, entry) = database_host(configs, host)?;
    let password = read_secret(&any.paths.db_password)?;
    let database = &any.cluster.database;
    let connect_timeout = timeout.as_secs().clamp(2, 30);
    let mut child = Command::new(pg_bin_dir()?.join("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGHOST", entry.address.to_string())
        .env("PGPORT", entry.ports.postgres.to_string())
        .env("PGUSER", &database.user)
        .env("PGDATABASE", &database.name)
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", connect_timeout.to_string())
        .env("PGAPPNAME", "streamctl")
        .env("PGSSLMODE", sslmode)
        .env("PGSSLROOTCERT", &any.paths.ca_cert)
        .env_remove("PGPASSFILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start psql")?;
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("psql on {host} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "psql on {host}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// `up`: waiting for the database

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
    /// One round of checks (each request bounded by [`REST_TIMEOUT`]).
    pub async fn poll(
        &mut self,
        client: &reqwest::Client,
        cluster: &ClusterConfig,
        started: Instant,
    ) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patroni_roles_and_streaming_replicas() {
        let primary = json!({
            "state": "running", "role": "master", "timeline": 2,
            "replication": [
                {"usename": "replicator", "application_name": "db2", "state": "streaming",
                 "sync_state": "sync"},
                {"usename": "replicator", "application_name": "db3", "state": "catchup"}
            ]
        });
        let m = parse_member(&primary).unwrap();
        assert_eq!(m.role, "primary");
        assert_eq!(m.state, "running");
        assert_eq!(m.timeline, Some(2));
        assert_eq!(m.streaming, vec!["db2".to_owned()]);
        let clone = json!({"state": "running", "role": "master", "replication": [
            {"application_name": "pg_basebackup", "state": "streaming"}]});
        assert_eq!(
            parse_member(&clone).unwrap().streaming,
            vec!["pg_basebackup"]
        );
        let replica = json!({"state": "running", "role": "replica", "sync_standby": true});
        let m = parse_member(&replica).unwrap();
        assert_eq!((m.role.as_str(), m.sync_standby), ("replica", true));
        assert!(m.streaming.is_empty());
        assert_eq!(parse_member(&json!({"state": "running"})), None);
        assert_eq!(parse_member(&json!("x")), None);
    }

    #[test]
    fn etcd_flags_name_the_member_and_new_cluster() {
        let etcd = EtcdConfig {
            name: "db1".into(),
            data_dir: "/s/hosts/db1/etcd".into(),
            client_url: "https://127.78.3.1:2379".into(),
            peer_url: "https://127.78.3.1:2380".into(),
            initial_cluster: "db1=https://127.78.3.1:2380,lb1=https://127.78.1.1:2380".into(),
            cluster_token: "t".into(),
        };
        let paths = HostPaths {
            state_dir: "/s/hosts/db1".into(),
            log_dir: None,
            tls_cert: "/s/tls/db1.crt".into(),
            tls_key: "/s/tls/db1.key".into(),
            ca_cert: "/s/tls/ca.crt".into(),
            token_key: "/s/k".into(),
            cluster_key: "/s/c".into(),
            stream_keys_dir: "/s/sk".into(),
            db_password: "/s/p".into(),
            db_superuser_password: "/s/su".into(),
            db_replication_password: "/s/r".into(),
            admin_password: "/s/a".into(),
            metrics_token: None,
        };
        let args = etcd_args(&etcd, &paths);
        let flag = |name: &str| {
            let at = args.iter().position(|a| a == name).unwrap();
            args[at + 1].clone()
        };
        assert_eq!(flag("--data-dir"), "/s/hosts/db1/etcd");
        assert_eq!(flag("--listen-client-urls"), "https://127.78.3.1:2379");
        assert_eq!(
            flag("--initial-advertise-peer-urls"),
            "https://127.78.3.1:2380"
        );
        // Client and peer TLS, both requiring a certificate from the cluster CA.
        assert_eq!(flag("--cert-file"), "/s/tls/db1.crt");
        assert_eq!(flag("--peer-key-file"), "/s/tls/db1.key");
        assert_eq!(flag("--trusted-ca-file"), "/s/tls/ca.crt");
        assert_eq!(flag("--peer-trusted-ca-file"), "/s/tls/ca.crt");
        assert!(args.contains(&"--client-cert-auth".to_owned()));
        assert!(args.contains(&"--peer-client-cert-auth".to_owned()));
        assert!(args.contains(&"--pre-vote".to_owned()));
        assert_eq!(flag("--initial-cluster-state"), "new");
        assert_eq!(flag("--heartbeat-interval"), "100");
        assert_eq!(flag("--election-timeout"), "1000");
        assert!(!args.iter().any(|a| a.starts_with("http://")), "{args:?}");
    }

    #[test]
    fn post_bootstrap_keeps_the_password_out_of_argv_and_quotes_names() {
        let script = post_bootstrap_script(Path::new("/usr/lib/pg bin/psql"), "streaming", "o'k");
        assert!(script.contains("exec '/usr/lib/pg bin/psql' -X"));
        assert!(script.contains(r"-v role='o'\''k'"));
        assert!(script.contains("\\set pw `cat app-password`"));
        assert!(script.contains(r#"CREATE ROLE :"role" LOGIN PASSWORD :'pw';"#));
        assert!(script.contains(r#"CREATE DATABASE :"db" OWNER :"role";"#));
        // The heredoc is quoted: the shell expands nothing in the SQL.
        assert!(script.contains("<<'SQL'"));
        assert!(script.contains("ON_ERROR_STOP=1"));
    }

    /// The generator's db1 section plus this machine's parts: no password anywhere in the file
    /// Patroni reads, the script path quoted for shlex, fast clones.
    #[test]
    fn patroni_settings_from_the_generator() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let state = tempfile::tempdir().unwrap();
        let configs = crate::cluster::evaluate(
            &root.join("nix/generate.nix"),
            &root.join("cluster.nix"),
            state.path(),
            "127.80",
        )
        .unwrap();
        let db1 = &configs["db1"];
        let script = db1.paths.state_dir.join("post bootstrap.sh");
        let settings = patroni_settings(db1, Path::new("/pg/bin"), &script).unwrap();
        assert_eq!(settings["postgresql"]["bin_dir"], "/pg/bin");
        assert_eq!(
            settings["bootstrap"]["post_bootstrap"],
            sh_quote(&script.to_string_lossy())
        );
        assert_eq!(
            settings["postgresql"]["basebackup"],
            json!([{"checkpoint": "fast"}])
        );
        assert_eq!(settings["name"], "db1");
        assert_eq!(settings["restapi"]["listen"], "127.80.3.1:8008");
        // TLS everywhere, with postgres-owned copies of the host's files.
        let tls = db1.paths.state_dir.join("tls");
        let copies: Vec<PathBuf> = db_tls_files(db1)
            .unwrap()
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        assert_eq!(
            copies,
            ["cert.pem", "key.pem", "ca.pem"].map(|f| tls.join(f))
        );
        assert_eq!(settings["restapi"]["verify_client"], "optional");
        assert_eq!(settings["etcd3"]["protocol"], "https");
        assert_eq!(settings["etcd3"]["cert"], settings["restapi"]["certfile"]);
        // Its own etcd member only: a host cut off from the others loses the DCS with it.
        assert_eq!(
            settings["etcd3"]["hosts"],
            serde_json::json!(["127.80.3.1:2379"])
        );
        assert_eq!(settings["etcd3"]["use_proxies"], true);
        let pg = &settings["postgresql"];
        assert_eq!(pg["parameters"]["ssl"], "on");
        assert_eq!(
            pg["parameters"]["ssl_key_file"],
            settings["restapi"]["keyfile"]
        );
        for user in ["superuser", "replication", "rewind"] {
            assert_eq!(
                pg["authentication"][user]["sslmode"], "verify-full",
                "{user}"
            );
        }
        for hba in [&pg["pg_hba"], &settings["bootstrap"]["pg_hba"]] {
            let lines: Vec<&str> = hba
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            assert!(
                lines
                    .iter()
                    .all(|l| l.starts_with("local ") || l.starts_with("hostssl ")),
                "{lines:?}"
            );
        }
        assert!(!settings.to_string().contains("password"), "{settings}");
        let dirs = pg_dirs(db1).unwrap();
        assert_eq!(dirs.data_dir, db1.paths.state_dir.join("pgdata"));
        assert_eq!(dirs.socket_dir, Some(db1.paths.state_dir.join("run")));
        // The witness runs etcd only; broadcasts run neither.
        assert!(configs["lb1"].etcd.is_some() && configs["lb1"].patroni.is_none());
        assert!(configs["broadcast1"].etcd.is_none());
        assert!(pg_dirs(&configs["lb1"]).is_err());
        let url = app_database_url(&configs.values().cloned().collect::<Vec<_>>(), "db2");
        // No secrets were created in this state dir: a clear error, not a URL without password.
        assert!(url.is_err());
    }

    #[test]
    fn sh_quote_survives_quotes() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn urls_encode_what_needs_it() {
        assert_eq!(percent_encode("abc-1_2.3~"), "abc-1_2.3~");
        assert_eq!(percent_encode("p@ss:w/rd"), "p%40ss%3Aw%2Frd");
    }

    #[test]
    fn ancestors_get_the_search_bit() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let inner = closed.join("inner/host");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let changed = open_ancestors(&inner).unwrap();
        assert!(changed.contains(&closed), "{changed:?}");
        let mode = std::fs::metadata(&closed).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o701);
        // Idempotent: nothing left to open.
        assert!(!open_ancestors(&inner).unwrap().contains(&closed));
    }
}
