//! Preparing a db host and running it: the `streamctl db-host` supervisor of etcd and Patroni.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use std::sync::atomic::{AtomicBool, Ordering};

use streaming_core::config::{EtcdConfig, HostConfig};
use streaming_core::secrets::read_secret;

use super::{
    MAX_SOCKET_PATH, PATRONI, PG_OS_USER, PYTHON, RESTAPI_USER, app_password_copy, db_tls_files,
    etcd_args, etcd_log_file, patroni_file, patroni_hold_file, patroni_settings, pg_bin_dir,
    pg_dirs, pgbackrest, post_bootstrap_file, post_bootstrap_script,
};
use crate::cluster::Layout;
use crate::files::write_file;
use crate::procs;

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

pub(super) fn own_dir(dir: &Path, user: Option<OsUser>, mode: u32) -> anyhow::Result<()> {
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
    if config.pgbackrest.is_some() {
        prepare_pgbackrest(config, user)?;
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

/// pgBackRest's config file and directories; the repository, shared by the db hosts' postgres
/// user, is created once and keeps its contents.
fn prepare_pgbackrest(config: &HostConfig, user: OsUser) -> anyhow::Result<()> {
    let settings = pgbackrest(config)?;
    for dir in &settings.own_dirs {
        if let Some(parent) = dir.parent() {
            own_dir(parent, Some(user), 0o700)?;
        }
        own_dir(dir, Some(user), 0o700)?;
    }
    if let Some(repo) = &settings.repo_path {
        if let Some(parent) = repo.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("create {}", parent.display()))?;
            open_ancestors(repo)?;
        }
        own_dir(repo, Some(user), 0o750)?;
    }
    write_owned(&settings.config_file, settings.text.as_bytes(), user, 0o600)
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
        if patroni_hold_file(&config).exists() {
            println!("{name}: Patroni held (restore in progress), etcd only");
            return Ok(());
        }
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
