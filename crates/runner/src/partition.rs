//! Network partitions between the hosts of a local cluster (`streamctl partition` / `heal`).
//!
//! One nftables table per cluster (address prefix). Its output-hook chain marks every new
//! connection with the host that opened it, known by the socket's cgroup ([`crate::cgroup`]):
//! the mark stays on the connection, replies included. Its input-hook chain drops the packets of
//! cut connections, by (mark of the host that opened it, the address it was opened to), so both
//! directions of existing and new connections go silent, as on a broken network (dropping on
//! output would fail a sender's writes at once instead of letting it time out). Simulated
//! viewers and chat clients are outside every host's cgroup and bind their own addresses
//! (third octet 100 and up): plain address rules cut them.
//!
//! Active cuts live in `<state>/run/partitions.json`; the table is rebuilt from them and the
//! host list in one nft transaction at each change, so it never holds half a change.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use streaming_core::config::HostConfig;

use crate::cgroup;
use crate::cluster::Layout;
use crate::procs;

/// The pseudo-peer for the simulated viewers and chat clients.
pub const VIEWERS: &str = "viewers";

/// One active cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cut {
    /// The host cut off.
    pub host: String,
    /// Host names (and possibly [`VIEWERS`]) it is cut from; empty: from everyone, viewers and
    /// operator commands included.
    pub from: Vec<String>,
    /// Only the connections `host` opens are cut: it cannot reach them, they still reach it.
    pub one_way: bool,
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers = if self.from.is_empty() {
            "everyone".to_owned()
        } else {
            self.from.join(" ")
        };
        let arrow = if self.one_way { "-/->" } else { "<-/->" };
        write!(f, "{} {arrow} {peers}", self.host)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("partitions need root (nftables rules and cgroups); run streamctl as root")]
    NotRoot,
    #[error("the nft command was not found (Debian: apt install nftables); partitions need it")]
    NoNft,
    #[error(
        "no cgroup v2 hierarchy under /sys/fs/cgroup (see /proc/self/mountinfo); partitions need one"
    )]
    NoCgroup2,
    #[error("{0} is not a host of this cluster")]
    UnknownHost(String),
    #[error("{0:?} is neither a host, a role (lb, broadcast, db, ingest, source) nor \"viewers\"")]
    UnknownPeer(String),
    #[error("{0} cannot be cut from itself")]
    SelfCut(String),
    #[error("{0} has no IPv4 address; the local runner's partitions are IPv4 only")]
    NotIpv4(String),
    #[error(
        "{host} runs outside its cgroup (started before partitions were possible, or without \
         root): `streamctl kill {host}` and `streamctl start {host}` put it in"
    )]
    NotInCgroup { host: String },
    #[error("nft refused the ruleset: {0}")]
    Nft(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] anyhow::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PartitionError + '_ {
    move |source| PartitionError::Io {
        path: path.to_owned(),
        source,
    }
}

fn cuts_file(layout: &Layout) -> PathBuf {
    layout.run_dir().join("partitions.json")
}

/// The active cuts (none when the file is missing or unreadable).
pub fn active(layout: &Layout) -> Vec<Cut> {
    std::fs::read(cuts_file(layout))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save(layout: &Layout, cuts: &[Cut]) -> Result<(), PartitionError> {
    let path = cuts_file(layout);
    if cuts.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        };
    }
    let bytes = serde_json::to_vec_pretty(cuts).unwrap_or_default();
    crate::files::write_file(&path, &bytes, false).map_err(io(&path))
}

/// The nftables table of the cluster on `prefix` (`127.92` -> `streamctl_127_92`).
pub fn table_name(prefix: &str) -> String {
    format!("streamctl_{}", prefix.replace('.', "_"))
}

/// A connection mark naming one host, from its whole address so that clusters on other
/// prefixes never share one.
pub fn mark(address: Ipv4Addr) -> u32 {
    let [_, b, c, d] = address.octets();
    (u32::from(b) << 16) | (u32::from(c) << 8) | u32::from(d)
}

/// What the ruleset needs to know about one host.
#[derive(Debug, Clone)]
pub struct HostNet {
    pub name: String,
    pub address: Ipv4Addr,
    /// nft's cgroup path and level; `None` when the host has no cgroup (its connections stay
    /// unmarked).
    pub cgroup: Option<(String, usize)>,
}

fn find<'a>(hosts: &'a [HostNet], name: &str) -> Option<&'a HostNet> {
    hosts.iter().find(|h| h.name == name)
}

fn set<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The whole table as one nft transaction: created if missing, emptied, filled.
pub fn ruleset(prefix: &str, hosts: &[HostNet], cuts: &[Cut]) -> String {
    let table = table_name(prefix);
    let mut out = format!(
        "table inet {table} {{}}\ndelete table inet {table}\ntable inet {table} {{\n\
         \tchain tag_hosts {{\n\t\ttype filter hook output priority 0; policy accept;\n"
    );
    for host in hosts {
        if let Some((path, level)) = &host.cgroup {
            out.push_str(&format!(
                "\t\tct state new socket cgroupv2 level {level} \"{path}\" ct mark set {:#x}\n",
                mark(host.address)
            ));
        }
    }
    out.push_str(
        "\t}\n\tchain drop_cuts {\n\t\ttype filter hook input priority 0; policy accept;\n",
    );
    let Ok(cluster) = format!("{prefix}.0.0").parse::<Ipv4Addr>() else {
        return out + "\t}\n}\n";
    };
    let [a, b, ..] = cluster.octets();
    for cut in cuts {
        let Some(host) = find(hosts, &cut.host) else {
            continue;
        };
        let (addr, own) = (host.address, mark(host.address));
        let mut rules = Vec::new();
        if cut.from.is_empty() {
            rules.push(format!(
                "ct mark {own:#x} ct original ip daddr {a}.{b}.0.0/16 ct original ip daddr != \
                 {addr} drop"
            ));
            if !cut.one_way {
                rules.push(format!(
                    "ct original ip daddr {addr} ct mark != {own:#x} drop"
                ));
            }
        } else {
            let peers: Vec<&HostNet> = cut.from.iter().filter_map(|p| find(hosts, p)).collect();
            if !peers.is_empty() {
                rules.push(format!(
                    "ct mark {own:#x} ct original ip daddr {} drop",
                    set(peers.iter().map(|p| p.address))
                ));
                if !cut.one_way {
                    rules.push(format!(
                        "ct mark {} ct original ip daddr {addr} drop",
                        set(peers.iter().map(|p| format!("{:#x}", mark(p.address))))
                    ));
                }
            }
            if !cut.one_way && cut.from.iter().any(|p| p == VIEWERS) {
                rules.push(format!(
                    "ct original ip saddr {a}.{b}.100.0-{a}.{b}.255.255 ct original ip daddr \
                     {addr} drop"
                ));
            }
        }
        for rule in rules {
            out.push_str(&format!("\t\t{rule}\n"));
        }
    }
    out + "\t}\n}\n"
}

fn run_nft(args: &[&str], stdin: Option<&str>) -> Result<String, PartitionError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PartitionError::NoNft,
            _ => io(Path::new("nft"))(e),
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(io(Path::new("nft stdin")))?;
    }
    let output = child.wait_with_output().map_err(io(Path::new("nft")))?;
    if !output.status.success() {
        return Err(PartitionError::Nft(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn prefix(configs: &[HostConfig]) -> Result<String, PartitionError> {
    let first = configs
        .first()
        .ok_or_else(|| PartitionError::Cluster(anyhow::anyhow!("the cluster has no host")))?;
    cgroup::prefix_of(first.me().address).ok_or_else(|| PartitionError::NotIpv4(first.name.clone()))
}

fn host_nets(configs: &[HostConfig]) -> Vec<HostNet> {
    let hierarchy = cgroup::hierarchy();
    configs
        .iter()
        .filter_map(|config| {
            let IpAddr::V4(address) = config.me().address else {
                return None;
            };
            let cgroup = hierarchy.as_ref().and_then(|h| {
                let dir = cgroup::host_dir(h, config).filter(|d| d.is_dir())?;
                cgroup::nft_selector(h, &dir)
            });
            Some(HostNet {
                name: config.name.clone(),
                address,
                cgroup,
            })
        })
        .collect()
}

/// Rebuilds the cluster's table from the host list and the active cuts. `up`, `start` and
/// `add` call it after creating cgroups (nft resolves a cgroup's path when the rule is loaded).
pub fn apply(layout: &Layout) -> Result<(), PartitionError> {
    if !is_root() {
        return Err(PartitionError::NotRoot);
    }
    let configs = layout.load_configs()?;
    let prefix = prefix(&configs)?;
    run_nft(
        &["-f", "-"],
        Some(&ruleset(&prefix, &host_nets(&configs), &active(layout))),
    )?;
    Ok(())
}

/// `up`'s part: the marks in place before any host opens a connection. Quiet when the machine
/// cannot do partitions (no root, no nft): everything else works without them.
pub fn prepare_cluster(layout: &Layout) -> Option<String> {
    match apply(layout) {
        Ok(()) => None,
        Err(e) => Some(format!("partitions unavailable: {e}")),
    }
}

/// Removes the cluster's table (for `down`) and its hosts' cgroups; what could not be removed
/// is returned for the operator.
pub fn remove_cluster(layout: &Layout) -> Vec<String> {
    let Ok(configs) = layout.load_configs() else {
        return Vec::new();
    };
    let Ok(prefix) = prefix(&configs) else {
        return Vec::new();
    };
    let _ = std::fs::remove_file(cuts_file(layout));
    let mut left = Vec::new();
    if is_root() {
        let table = table_name(&prefix);
        // Absent already (no nft, or never created): nothing to do.
        let listed = run_nft(&["list", "tables"], None).unwrap_or_default();
        if listed
            .lines()
            .any(|l| l.trim() == format!("table inet {table}"))
            && let Err(e) = run_nft(&["delete", "table", "inet", &table], None)
        {
            left.push(format!("nftables table {table}: {e}"));
        }
    }
    left.extend(
        cgroup::remove_cluster(&prefix)
            .into_iter()
            .map(|p| format!("cgroup {} (still has processes)", p.display())),
    );
    left
}

/// The hosts a `--from` word names.
fn resolve(configs: &[HostConfig], host: &str, word: &str) -> Result<Vec<String>, PartitionError> {
    if word == VIEWERS {
        return Ok(vec![VIEWERS.to_owned()]);
    }
    if word == host {
        return Err(PartitionError::SelfCut(host.to_owned()));
    }
    if configs.iter().any(|c| c.name == word) {
        return Ok(vec![word.to_owned()]);
    }
    let by_role: Vec<String> = configs
        .iter()
        .filter(|c| c.me().role.as_str() == word && c.name != host)
        .map(|c| c.name.clone())
        .collect();
    if by_role.is_empty() {
        return Err(PartitionError::UnknownPeer(word.to_owned()));
    }
    Ok(by_role)
}

/// Checks that the host's running processes are in its cgroup, else the cut would miss the
/// connections they open.
fn check_in_cgroup(layout: &Layout, config: &HostConfig) -> Result<(), PartitionError> {
    let not_in = || PartitionError::NotInCgroup {
        host: config.name.clone(),
    };
    let pid = procs::live_pid(
        &layout.pid_file(&config.name),
        &layout.config_file(&config.name),
    );
    let Some(pid) = pid else {
        // Not running: it enters its cgroup when started.
        return Ok(());
    };
    let dir = cgroup::existing(config).ok_or_else(not_in)?;
    if cgroup::members(&dir).contains(&pid) {
        Ok(())
    } else {
        Err(not_in())
    }
}

/// Cuts `host` off from the hosts and roles in `from` (empty: from everyone, viewers and
/// operator commands included); `one_way`: only the connections it opens. Adds to the cuts
/// already active.
pub async fn partition(
    state: &Path,
    host: &str,
    from: &[String],
    one_way: bool,
) -> Result<Cut, PartitionError> {
    let (state, host, from) = (state.to_owned(), host.to_owned(), from.to_vec());
    tokio::task::spawn_blocking(move || partition_now(&state, &host, &from, one_way))
        .await
        .map_err(|e| PartitionError::Cluster(anyhow::anyhow!("partition task: {e}")))?
}

fn partition_now(
    state: &Path,
    host: &str,
    from: &[String],
    one_way: bool,
) -> Result<Cut, PartitionError> {
    if !is_root() {
        return Err(PartitionError::NotRoot);
    }
    if cgroup::hierarchy().is_none() {
        return Err(PartitionError::NoCgroup2);
    }
    let layout = Layout::new(state)?;
    let configs = layout.load_configs()?;
    if !configs.iter().any(|c| c.name == host) {
        return Err(PartitionError::UnknownHost(host.to_owned()));
    }
    let mut peers = BTreeSet::new();
    for word in from {
        peers.extend(resolve(&configs, host, word)?);
    }
    for name in std::iter::once(host).chain(peers.iter().map(String::as_str)) {
        if let Some(c) = configs.iter().find(|c| c.name == name) {
            if !matches!(c.me().address, IpAddr::V4(_)) {
                return Err(PartitionError::NotIpv4(name.to_owned()));
            }
            check_in_cgroup(&layout, c)?;
        }
    }
    let cut = Cut {
        host: host.to_owned(),
        from: peers.into_iter().collect(),
        one_way,
    };
    let mut cuts = active(&layout);
    if !cuts.contains(&cut) {
        cuts.push(cut.clone());
    }
    save(&layout, &cuts)?;
    if let Err(e) = apply(&layout) {
        cuts.retain(|c| c != &cut);
        save(&layout, &cuts)?;
        return Err(e);
    }
    Ok(cut)
}

/// Lifts the cuts that involve `host` (as the host cut off or as a peer), or all with `None`.
/// Returns the cuts lifted.
pub async fn heal(state: &Path, host: Option<&str>) -> Result<Vec<Cut>, PartitionError> {
    let (state, host) = (state.to_owned(), host.map(str::to_owned));
    tokio::task::spawn_blocking(move || heal_now(&state, host.as_deref()))
        .await
        .map_err(|e| PartitionError::Cluster(anyhow::anyhow!("heal task: {e}")))?
}

fn heal_now(state: &Path, host: Option<&str>) -> Result<Vec<Cut>, PartitionError> {
    let layout = Layout::new(state)?;
    if let Some(host) = host
        && layout.load_config(host).is_err()
    {
        return Err(PartitionError::UnknownHost(host.to_owned()));
    }
    let (healed, kept): (Vec<Cut>, Vec<Cut>) = active(&layout)
        .into_iter()
        .partition(|c| host.is_none_or(|h| c.host == h || c.from.iter().any(|p| p == h)));
    if healed.is_empty() {
        return Ok(healed);
    }
    save(&layout, &kept)?;
    apply(&layout)?;
    Ok(healed)
}

/// The cuts a host is part of, for `status`.
pub fn describe_for(cuts: &[Cut], host: &str) -> Vec<String> {
    cuts.iter()
        .filter_map(|c| {
            if c.host == host {
                Some(c.to_string())
            } else if c.from.iter().any(|p| p == host) {
                Some(format!(
                    "{host} cut from {}{}",
                    c.host,
                    if c.one_way { " (one-way)" } else { "" }
                ))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<HostNet> {
        let host = |name: &str, address: &str| HostNet {
            name: name.to_owned(),
            address: address.parse().unwrap(),
            cgroup: Some((format!("unified/streamctl-127_92/{name}"), 2)),
        };
        vec![
            host("lb1", "127.92.1.1"),
            host("broadcast1", "127.92.2.1"),
            host("db1", "127.92.3.1"),
            host("db2", "127.92.3.2"),
        ]
    }

    #[test]
    fn marks_are_unique_across_prefixes() {
        assert_eq!(mark("127.92.2.1".parse().unwrap()), 0x5c0201);
        assert_ne!(
            mark("127.92.2.1".parse().unwrap()),
            mark("127.83.2.1".parse().unwrap())
        );
    }

    #[test]
    fn ruleset_marks_every_host_and_cuts_both_directions() {
        let cuts = [
            Cut {
                host: "db1".into(),
                from: vec!["db2".into(), "lb1".into()],
                one_way: false,
            },
            Cut {
                host: "broadcast1".into(),
                from: vec![],
                one_way: false,
            },
            Cut {
                host: "lb1".into(),
                from: vec!["broadcast1".into(), VIEWERS.into()],
                one_way: true,
            },
        ];
        let text = ruleset("127.92", &hosts(), &cuts);
        assert!(
            text.starts_with(
                "table inet streamctl_127_92 {}\ndelete table inet streamctl_127_92\n"
            )
        );
        assert!(text.contains(
            "ct state new socket cgroupv2 level 2 \"unified/streamctl-127_92/db2\" ct mark set 0x5c0302"
        ));
        assert!(
            text.contains("ct mark 0x5c0301 ct original ip daddr { 127.92.3.2, 127.92.1.1 } drop")
        );
        assert!(
            text.contains("ct mark { 0x5c0302, 0x5c0101 } ct original ip daddr 127.92.3.1 drop")
        );
        assert!(text.contains(
            "ct mark 0x5c0201 ct original ip daddr 127.92.0.0/16 ct original ip daddr != 127.92.2.1 drop"
        ));
        assert!(text.contains("ct original ip daddr 127.92.2.1 ct mark != 0x5c0201 drop"));
        // One-way: lb1 cannot reach broadcast1; nothing is cut towards lb1.
        assert!(text.contains("ct mark 0x5c0101 ct original ip daddr { 127.92.2.1 } drop"));
        assert!(!text.contains("ct original ip daddr 127.92.1.1 drop"));
        assert!(!text.contains("ct original ip saddr"));
    }

    #[test]
    fn viewers_are_cut_by_address() {
        let cut = Cut {
            host: "broadcast1".into(),
            from: vec![VIEWERS.into()],
            one_way: false,
        };
        let text = ruleset("127.92", &hosts(), std::slice::from_ref(&cut));
        assert!(text.contains(
            "ct original ip saddr 127.92.100.0-127.92.255.255 ct original ip daddr 127.92.2.1 drop"
        ));
        assert_eq!(cut.to_string(), "broadcast1 <-/-> viewers");
        assert_eq!(
            describe_for(&[cut], "broadcast1"),
            ["broadcast1 <-/-> viewers"]
        );
    }
}
