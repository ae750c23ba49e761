//! Each local host's processes in a cgroup v2 of their own.
//!
//! Many clients of a local host do not bind its loopback address (sqlx to PostgreSQL, libpq
//! replication, etcd peers, Patroni), so their packets leave from 127.0.0.1 and no address rule
//! can tell which host sent them. The kernel knows which cgroup opened each socket, and
//! nftables can match on it: [`crate::partition`] marks every connection with the host that
//! opened it that way. Children inherit the cgroup, so a host's ffmpeg, Patroni and PostgreSQL
//! are in it too.
//!
//! Layout: `<cgroup2 mount>/streamctl-<a>_<b>/<host>` for the address prefix `<a>.<b>`, so
//! clusters on different prefixes never share one. Needs root; without it hosts run as before,
//! outside any cgroup of their own, and only partitions are unavailable.

use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use streaming_core::config::HostConfig;

/// The mounted cgroup v2 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted, e.g. `/sys/fs/cgroup` or `/sys/fs/cgroup/unified` (hybrid systems).
    pub mount: PathBuf,
    /// How deep the mount's root lies in the hierarchy (0 unless inside a cgroup namespace
    /// or a bind mount of a sub-tree).
    pub root_depth: usize,
}

/// The cgroup v2 mount in a `/proc/self/mountinfo` text: the first line whose filesystem type
/// (after the ` - ` separator) is `cgroup2`.
pub fn parse_mountinfo(text: &str) -> Option<Hierarchy> {
    text.lines().find_map(|line| {
        let (fields, fs) = line.split_once(" - ")?;
        if fs.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = fields.split_whitespace();
        let root = fields.nth(3)?;
        let mount = fields.next()?;
        // Octal escapes (`\040` for a space) would need decoding; no real system mounts
        // cgroup2 at such a path.
        if mount.contains('\\') || root.contains('\\') {
            return None;
        }
        Some(Hierarchy {
            mount: PathBuf::from(mount),
            root_depth: Path::new(root)
                .components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .count(),
        })
    })
}

pub fn hierarchy() -> Option<Hierarchy> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// `127.92` for a host at `127.92.2.1`; `None` for IPv6 (the local runner uses IPv4 only).
pub fn prefix_of(address: IpAddr) -> Option<String> {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            Some(format!("{a}.{b}"))
        }
        IpAddr::V6(_) => None,
    }
}

/// The directory name that groups one cluster's hosts.
pub fn cluster_dir_name(prefix: &str) -> String {
    format!("streamctl-{}", prefix.replace('.', "_"))
}

/// Where one host's cgroup is (whether or not it exists).
pub fn host_dir(hierarchy: &Hierarchy, config: &HostConfig) -> Option<PathBuf> {
    let prefix = prefix_of(config.me().address)?;
    Some(
        hierarchy
            .mount
            .join(cluster_dir_name(&prefix))
            .join(&config.name),
    )
}

/// What nftables needs to match a host's sockets: the cgroup's path relative to
/// `/sys/fs/cgroup` (nft resolves it there) and its level in the hierarchy.
pub fn nft_selector(hierarchy: &Hierarchy, dir: &Path) -> Option<(String, usize)> {
    let relative = dir.strip_prefix("/sys/fs/cgroup").ok()?;
    let below_mount = dir.strip_prefix(&hierarchy.mount).ok()?;
    let level = hierarchy.root_depth + below_mount.components().count();
    Some((relative.to_str()?.to_owned(), level))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Creates the host's cgroup when the machine allows it; `Ok(None)` when it does not (no
/// root, no cgroup v2): the host then runs without one and cannot be partitioned.
pub fn prepare(config: &HostConfig) -> std::io::Result<Option<PathBuf>> {
    if !is_root() {
        return Ok(None);
    }
    let Some(dir) = hierarchy().and_then(|h| host_dir(&h, config)) else {
        return Ok(None);
    };
    std::fs::create_dir_all(&dir)?;
    Ok(Some(dir))
}

/// The host's cgroup if it exists.
pub fn existing(config: &HostConfig) -> Option<PathBuf> {
    hierarchy()
        .and_then(|h| host_dir(&h, config))
        .filter(|dir| dir.is_dir())
}

/// Makes the child enter `dir` before it runs anything, so that no socket of it (or of its
/// children) is ever opened outside the host's cgroup.
pub fn join_in_child(command: &mut Command, dir: &Path) {
    let procs = std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
        .unwrap_or_default();
    // SAFETY: between fork and exec only async-signal-safe calls happen here (open, write,
    // close on a path built before the fork); no allocation.
    unsafe {
        command.pre_exec(move || {
            if procs.as_bytes().is_empty() {
                return Err(std::io::Error::other("cgroup path holds a NUL byte"));
            }
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" moves the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
            Ok(())
        });
    }
}

/// The pids in a cgroup.
pub fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes the cgroups of every host of the prefix, then their parent. Cgroups that still hold
/// processes stay; their paths are returned.
pub fn remove_cluster(prefix: &str) -> Vec<PathBuf> {
    let Some(hierarchy) = hierarchy() else {
        return Vec::new();
    };
    let parent = hierarchy.mount.join(cluster_dir_name(prefix));
    let mut left = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for dir in entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.is_dir())
        {
            // An exiting process may still be listed for a moment after its group died.
            let gone = (0..20).any(|_| {
                std::fs::remove_dir(&dir).is_ok() || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    false
                }
            });
            if !gone {
                left.push(dir);
            }
        }
    }
    if parent.is_dir() && std::fs::remove_dir(&parent).is_err() {
        left.push(parent);
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_hierarchy_in_hybrid_and_unified_mountinfo() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let h = parse_mountinfo(hybrid).unwrap();
        assert_eq!(h.mount, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(h.root_depth, 0);
        let dir = h.mount.join("streamctl-127_92/lb1");
        assert_eq!(
            nft_selector(&h, &dir),
            Some(("unified/streamctl-127_92/lb1".to_owned(), 2))
        );
        // Optional fields before the separator, and a namespaced root.
        let unified = "29 23 0:26 /user.slice /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n";
        let h = parse_mountinfo(unified).unwrap();
        assert_eq!(
            (h.mount.as_path(), h.root_depth),
            (Path::new("/sys/fs/cgroup"), 1)
        );
        assert_eq!(
            nft_selector(&h, &h.mount.join("streamctl-127_77/db1")),
            Some(("streamctl-127_77/db1".to_owned(), 3))
        );
        assert_eq!(
            parse_mountinfo("31 23 0:28 / /x rw - tmpfs tmpfs rw\n"),
            None
        );
        // nft only looks under /sys/fs/cgroup.
        let elsewhere = parse_mountinfo("1 2 0:3 / /cg rw - cgroup2 none rw\n").unwrap();
        assert_eq!(
            nft_selector(&elsewhere, Path::new("/cg/streamctl-1_2/x")),
            None
        );
    }

    #[test]
    fn prefixes_and_names() {
        assert_eq!(
            prefix_of("127.92.2.1".parse().unwrap()).as_deref(),
            Some("127.92")
        );
        assert_eq!(prefix_of("::1".parse().unwrap()), None);
        assert_eq!(cluster_dir_name("127.92"), "streamctl-127_92");
    }
}
