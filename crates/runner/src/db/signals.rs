//! Signals to a whole db host: its group, the postmaster (a session of its own) and every
//! process naming its state directory.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use streaming_core::config::HostConfig;

use super::{ETCD_STOP_GRACE, HOST_COMMANDS, pg_dirs};
use crate::procs;

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
