//! Host processes of a local cluster: spawning each in its own process group, pid files, and
//! signals to whole groups, read back from `/proc`.
//!
//! A host's service and its ffmpeg children share the host's process group (pgid = the service's
//! pid), so signalling `-pgid` acts on the whole "machine" as a real failure would, and children
//! also carry a parent-death signal.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// One line of `/proc/<pid>/stat`, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub comm: String,
    /// R, S, D, T (stopped), t, Z (zombie), X ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
}

/// Parses `/proc/<pid>/stat`; `comm` may hold spaces and parentheses, so split at the last ')'.
pub fn parse_stat(line: &str) -> Option<Stat> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let pid = line.get(..open)?.trim().parse().ok()?;
    let comm = line.get(open + 1..close)?.to_owned();
    let mut rest = line.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    let pgrp = rest.next()?.parse().ok()?;
    Some(Stat {
        pid,
        comm,
        state,
        ppid,
        pgrp,
    })
}

pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process on the machine (those that vanish while we read are skipped).
pub fn all() -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

/// Live (non-zombie) members of a process group.
pub fn group_members(pgid: i32) -> Vec<Stat> {
    all()
        .into_iter()
        .filter(|s| s.pgrp == pgid && !matches!(s.state, 'Z' | 'X'))
        .collect()
}

/// CPU seconds (user + system) spent so far by the live members of a process group: sampled
/// before and after a measurement, the difference over the wall time is the cores it used.
pub fn group_cpu_seconds(pgid: i32) -> f64 {
    group_members(pgid)
        .iter()
        .filter_map(|m| process_usage(m.pid))
        .map(|u| u.cpu_seconds)
        .sum()
}

/// Resident memory of the live members of a process group, in bytes.
pub fn group_rss_bytes(pgid: i32) -> u64 {
    group_members(pgid)
        .iter()
        .filter_map(|m| process_usage(m.pid))
        .map(|u| u.rss_bytes)
        .sum()
}

/// What one process has used: CPU seconds so far and resident memory now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

/// `pid`'s usage from `/proc` (`None` once it is gone).
pub fn process_usage(pid: i32) -> Option<Usage> {
    // SAFETY: plain libc queries.
    let (ticks_per_second, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as f64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    let line = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After ") ": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    // stime.
    let rest = line.get(line.rfind(')')? + 2..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(Usage {
        cpu_seconds: (utime + stime) as f64 / ticks_per_second,
        rss_bytes: resident * page,
    })
}

/// Raises this process's open-file limit to its hard limit, as systemd's `LimitNOFILE` does
/// for the services: the hosts it starts inherit it, and a broadcast with a few thousand
/// viewers (or a bench simulating them) needs more sockets than Debian's default 1,024.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// How a host's main process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Running,
    /// SIGSTOPped (`kill --hang`): alive but answering nothing.
    Hung,
    /// The host's supervisor runs but its service failed and waits for its restart (backoff).
    Restarting,
    Dead,
}

pub fn liveness(pid: i32) -> Liveness {
    match stat(pid) {
        None => Liveness::Dead,
        Some(s) if matches!(s.state, 'Z' | 'X') => Liveness::Dead,
        Some(s) if matches!(s.state, 'T' | 't') => Liveness::Hung,
        Some(_) => Liveness::Running,
    }
}

/// The pid in a pid file, if that process is still the host started with `config` (guards against
/// a recycled pid after a reboot or a long time).
pub fn live_pid(pid_file: &Path, config: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid <= 1 || liveness(pid) == Liveness::Dead {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let wanted = config.as_os_str().as_encoded_bytes();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == wanted)
        .then_some(pid)
}

/// What to run for one host.
pub struct HostProcess<'a> {
    pub binary: &'a Path,
    pub config: &'a Path,
    pub out_file: &'a Path,
    pub pid_file: &'a Path,
    /// The host's cgroup ([`crate::cgroup`]), entered before the binary runs.
    pub cgroup: Option<&'a Path>,
}

/// Starts the host in its own process group, output appended to its `.out` file, pid recorded.
pub fn spawn(host: &HostProcess<'_>) -> anyhow::Result<i32> {
    spawn_with_args(host, &[])
}

/// [`spawn`] with arguments before `--config` (a subcommand: `streamctl db-host --config X`).
pub fn spawn_with_args(host: &HostProcess<'_>, leading: &[&str]) -> anyhow::Result<i32> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(host.out_file)
        .with_context(|| format!("open {}", host.out_file.display()))?;
    let err = out.try_clone()?;
    let mut command = Command::new(host.binary);
    command
        .args(leading)
        .arg("--config")
        .arg(host.config)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    if let Some(dir) = host.cgroup {
        crate::cgroup::join_in_child(&mut command, dir);
    }
    let child = command
        .spawn()
        .with_context(|| format!("start {}", host.binary.display()))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // The child is not waited for: it outlives this command. `down` finds it by its pid file.
    drop(child);
    crate::files::write_file(host.pid_file, format!("{pid}\n").as_bytes(), false)
        .with_context(|| format!("write {}", host.pid_file.display()))?;
    Ok(pid)
}

/// Sends `signal` to every process of the group; false when the group no longer exists.
pub fn signal_group(pgid: i32, signal: libc::c_int) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: plain syscall on a negative pid = process group.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

pub fn signal_pid(pid: i32, signal: libc::c_int) -> bool {
    if pid <= 1 {
        return false;
    }
    // SAFETY: plain syscall.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// SIGCONT + SIGTERM to the group, up to `grace` for it to exit, then SIGKILL; waits until no
/// member is left (or 2 s more). Returns true when the group is gone.
pub fn stop_group(pgid: i32, grace: Duration) -> bool {
    // A hung (stopped) host cannot act on SIGTERM until continued.
    signal_group(pgid, libc::SIGCONT);
    signal_group(pgid, libc::SIGTERM);
    if wait_group_gone(pgid, grace) {
        return true;
    }
    signal_group(pgid, libc::SIGKILL);
    wait_group_gone(pgid, Duration::from_secs(2))
}

pub fn wait_group_gone(pgid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if group_members(pgid).is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// ffmpeg processes of a host (members of its group), the one to kill first first: for an ingest
/// the transcoder (the ffmpeg writing HLS), the one of `preferred_channel` (with several
/// channels, tests and operators mean the front page's), else the oldest.
pub fn ffmpeg_children(pgid: i32, preferred_channel: Option<&str>) -> Vec<(i32, String)> {
    let mut found: Vec<(i32, String, bool)> = group_members(pgid)
        .into_iter()
        .filter(|s| s.comm == "ffmpeg" && s.pid != pgid)
        .map(|s| {
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", s.pid))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let preferred =
                preferred_channel.is_some_and(|c| channel_of(s.pid) == Some(c.to_owned()));
            (s.pid, cmdline, preferred)
        })
        .collect();
    found.sort_by_key(|(pid, cmdline, preferred)| (!is_transcoder(cmdline), !*preferred, *pid));
    found
        .into_iter()
        .map(|(pid, cmdline, _)| (pid, cmdline))
        .collect()
}

/// The channel an ffmpeg child works for, from the variable its service set
/// ([`streaming_core::process::CHANNEL_ENV`]).
fn channel_of(pid: i32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{}=", streaming_core::process::CHANNEL_ENV);
    environ
        .split(|b| *b == 0)
        .find_map(|var| var.strip_prefix(prefix.as_bytes()))
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// The ladder encoder writes HLS or several renditions; relays and slates do not.
pub fn is_transcoder(cmdline: &str) -> bool {
    cmdline.contains("-f hls") || cmdline.contains("var_stream_map") || cmdline.contains("segment")
}

/// The last `lines` lines of a log file, for operators.
pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read(path) else {
        return format!("(no {})", path.display());
    };
    // Only the end matters; avoid printing megabytes.
    let start = text.len().saturating_sub(64 * 1024);
    let text = String::from_utf8_lossy(&text[start..]);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// This very binary, also when a rebuild replaced it while it runs (the kernel then names the
/// running one "`<path> (deleted)`"; the new file at the path is the same program).
pub fn own_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating streamctl")?;
    if exe.exists() {
        return Ok(exe);
    }
    let text = exe.to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(path) if Path::new(path).exists() => Ok(path.into()),
        _ => anyhow::bail!("streamctl binary {} is gone", exe.display()),
    }
}

/// The role binary next to streamctl's own executable (`target/debug/ingest` etc.).
pub fn role_binary(role: streaming_core::config::Role) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate streamctl's own executable")?;
    let dir = exe
        .parent()
        .context("streamctl executable has no directory")?;
    Ok(dir.join(role.as_str()))
}

/// `tool` on the PATH, or in /usr/bin (a service's or sudo's PATH may be short).
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names() {
        let s = parse_stat("1234 (ffmpeg) S 1200 1200 1200 0 -1 4194560 ...").unwrap();
        assert_eq!(
            (s.pid, s.comm.as_str(), s.state, s.ppid, s.pgrp),
            (1234, "ffmpeg", 'S', 1200, 1200)
        );
        let s = parse_stat("77 (a) b (c)) T 1 77 77 0").unwrap();
        assert_eq!((s.comm.as_str(), s.state, s.pgrp), ("a) b (c)", 'T', 77));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn transcoder_is_preferred() {
        assert!(is_transcoder(
            "ffmpeg -f flv -i pipe:0 -f hls -var_stream_map v:0"
        ));
        assert!(!is_transcoder("ffmpeg -f lavfi -i testsrc2 -f tee x"));
    }

    /// A host stand-in (`sh` with two `sleep` children) in its own group: stopping the group
    /// leaves no survivor, even when it was SIGSTOPped first.
    #[test]
    fn stopping_a_group_leaves_no_survivor() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("host.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\nsleep 300 &\nsleep 300 &\ntrap '' TERM\nwait\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = dir.path().join("cfg.json");
        let pid_file = dir.path().join("h.pid");
        let host = HostProcess {
            binary: &script,
            config: &config,
            out_file: &dir.path().join("h.out"),
            pid_file: &pid_file,
            cgroup: None,
        };
        let pid = spawn(&host).unwrap();
        // Wait until both sleeps are in the group.
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_members(pid).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(group_members(pid).len(), 3, "sh + 2 sleeps share the group");
        assert_eq!(live_pid(&pid_file, &config), Some(pid));
        assert_eq!(live_pid(&pid_file, Path::new("/other.json")), None);
        signal_group(pid, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(liveness(pid), Liveness::Hung);
        // sh ignores TERM, so this also exercises the SIGKILL escalation.
        assert!(stop_group(pid, Duration::from_millis(500)));
        // Reap our own child (a real `down` runs in another process, where init reaps it).
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        assert!(group_members(pid).is_empty());
        assert_eq!(liveness(pid), Liveness::Dead);
        assert_eq!(live_pid(&pid_file, &config), None);
    }
}
