//! Keeping a server and its load generator on separate CPUs (`bench serve --pin`).
//!
//! On a machine of two cores the client decrypts every byte the server encrypts and competes
//! with it for the same cores, so the request rate of a round follows the scheduler more than
//! the server. With the server's process group on its own CPU and the client on the others,
//! each server gets the same single CPU, and what it answers measures it, until the client's
//! CPUs run out first.

use std::io;

/// The CPUs a load generator may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cpus {
    /// Any CPU, with this many threads.
    Any(usize),
    /// These CPUs only, one thread each.
    Only(Vec<usize>),
}

impl Cpus {
    pub fn threads(&self) -> usize {
        match self {
            Self::Any(threads) => *threads,
            Self::Only(cpus) => cpus.len(),
        }
    }

    /// Makes `command`'s process, and every thread it starts, run on these CPUs.
    pub fn apply(&self, command: &mut tokio::process::Command) {
        let Self::Only(cpus) = self else {
            return;
        };
        let set = cpu_set(cpus);
        // SAFETY: the hook runs in the forked child before exec; sched_setaffinity is a plain
        // system call, and the hook neither allocates nor takes locks.
        unsafe {
            command.pre_exec(move || set_affinity(0, &set));
        }
    }
}

/// The machine's CPUs split for `--pin`: the server on CPU 0, the client on the rest.
pub fn split(cores: usize) -> anyhow::Result<(Vec<usize>, Cpus)> {
    anyhow::ensure!(
        cores >= 2,
        "--pin needs at least 2 CPUs, this machine has {cores}"
    );
    Ok((vec![0], Cpus::Only((1..cores).collect())))
}

/// A process group kept on some CPUs until dropped, then let run on all `cores` again.
pub struct PinnedGroup {
    pgid: i32,
    cores: usize,
}

impl PinnedGroup {
    /// Pins every thread of every live member of the group (threads started later inherit it).
    pub fn new(pgid: i32, cpus: &[usize], cores: usize) -> io::Result<Self> {
        pin_group(pgid, cpus)?;
        Ok(Self { pgid, cores })
    }
}

impl Drop for PinnedGroup {
    fn drop(&mut self) {
        let all: Vec<usize> = (0..self.cores).collect();
        if let Err(e) = pin_group(self.pgid, &all) {
            eprintln!(
                "bench: could not let process group {} run on every CPU again: {e}",
                self.pgid
            );
        }
    }
}

fn pin_group(pgid: i32, cpus: &[usize]) -> io::Result<()> {
    let set = cpu_set(cpus);
    for member in streaming_runner::procs::group_members(pgid) {
        // A member that exits meanwhile is skipped: it has no threads left to pin.
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", member.pid)) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            match set_affinity(tid, &set) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                other => other?,
            }
        }
    }
    Ok(())
}

fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array, valid when zeroed; CPU_SET writes inside it
    // (and ignores a CPU beyond its size).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        set
    }
}

fn set_affinity(tid: libc::pid_t, set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t and the size passed is its own.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_gets_cpu_0_and_the_client_the_rest() {
        assert_eq!(split(2).unwrap(), (vec![0], Cpus::Only(vec![1])));
        assert_eq!(split(4).unwrap().1.threads(), 3);
        assert!(split(1).is_err());
    }

    #[test]
    fn a_pinned_child_runs_on_its_cpu_only() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            return;
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let out = runtime.block_on(async {
            let mut command = tokio::process::Command::new("grep");
            command.args(["Cpus_allowed_list", "/proc/self/status"]);
            Cpus::Only(vec![1]).apply(&mut command);
            command.output().await.unwrap()
        });
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().last(), Some("1"), "{text}");
    }
}
