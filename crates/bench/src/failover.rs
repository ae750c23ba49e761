//! `streamctl bench failover`: the failover matrix.
//!
//! Against a running local cluster (`streamctl up`), for each fault: start simulated viewers
//! spread over every broadcast (plus the ones pinned to the faulty host's path), inject the
//! fault a few seconds in (SIGKILL, or SIGSTOP for a hang), restore the host after a while
//! (`streamctl start`), and report what the viewers felt (stalls, stall seconds, errors,
//! failovers) and how long the cluster took to be whole again after the restore. Faults are
//! injected only into processes of the local cluster, through `streamctl kill`/`start`, so the
//! bench exercises exactly what an operator would use.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use streaming_clients::watch::{WatchArgs, WatchReport, watch};
use streaming_core::config::Role;
use streaming_runner::cluster::Layout;
use streaming_runner::hosts::Blow;

use crate::faults;
use streaming_runner::whole::wait_whole;

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    /// State directory of the running cluster.
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// Viewers spread over every broadcast (one more is added on the faulty host's path).
    #[arg(long, default_value_t = 20)]
    pub viewers: usize,
    /// Watching time per fault, after viewer startup.
    #[arg(long, default_value_t = 40)]
    pub seconds: u64,
    /// Seconds of watching before the fault is injected.
    #[arg(long, default_value_t = 8)]
    pub fault_after: u64,
    /// Seconds the fault lasts before the host is restored.
    #[arg(long, default_value_t = 15)]
    pub fault_for: u64,
    /// Only these faults (comma-separated names from the table), default all.
    #[arg(long)]
    pub only: Option<String>,
    /// Write the Markdown table here (e.g. docs/failover-matrix.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
    /// Viewers play low-latency HLS (parts, blocking reloads), as `watch --low-latency`.
    #[arg(long)]
    pub low_latency: bool,
}

/// One way a host can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// SIGKILL of the host's whole process group.
    Kill,
    /// SIGSTOP: the host hangs, sockets stay open.
    Hang,
    /// SIGKILL of one ffmpeg child only.
    Ffmpeg,
    /// SIGSTOP of one ffmpeg child only: the host must notice by itself.
    FfmpegHang,
    /// SIGABRT of the host's service only (a stack overflow, any abort): the local runner
    /// restarts it, as systemd would.
    Crash,
    /// A network cut (`streamctl partition`): the host is cut off from `Fault::from` (empty:
    /// from everyone, viewers included); `streamctl heal` restores it.
    Partition,
}

/// Stands for the database primary of the moment in [`Fault::hosts`].
pub const DB_PRIMARY: &str = "db-primary";

/// A fault of the matrix: one or more hosts failing together.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub name: String,
    pub hosts: Vec<String>,
    pub mode: Mode,
    /// The broadcast whose path the fault is on: some viewers are pinned there.
    pub path: String,
    /// Partitions: the hosts and roles cut from (`--from`); empty: everyone.
    pub from: Vec<String>,
    /// Seconds between the first host's fault and the others' (0: all at once).
    pub stagger_s: f64,
}

/// The matrix: kill and hang of lb1, the viewers' broadcast, its preferred ingest and source1;
/// kill and hang of the transcoder of one ingest; a crash; double faults (a broadcast, an LB or
/// both ingests' preferred source with an ingest; an LB with the viewers' broadcast; source1
/// hung, then the viewers' broadcast); network partitions (one host of each role cut off from
/// everyone, and the asymmetric cuts: a broadcast that reaches its ingests but not the LBs, an
/// ingest that reaches the broadcasts but not its peer, the database primary cut off from its
/// replica and etcd).
pub fn matrix() -> Vec<Fault> {
    let fault = |name: &str, hosts: &[&str], mode: Mode| Fault {
        name: name.to_owned(),
        hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        mode,
        path: "broadcast1".to_owned(),
        from: Vec::new(),
        stagger_s: 0.0,
    };
    let cut = |name: &str, host: &str, from: &[&str]| Fault {
        from: from.iter().map(|h| (*h).to_owned()).collect(),
        ..fault(name, &[host], Mode::Partition)
    };
    vec![
        fault("lb1-kill", &["lb1"], Mode::Kill),
        fault("lb1-hang", &["lb1"], Mode::Hang),
        fault("broadcast-kill", &["broadcast1"], Mode::Kill),
        fault("broadcast-hang", &["broadcast1"], Mode::Hang),
        fault("ingest-kill", &["ingest1"], Mode::Kill),
        fault("ingest-hang", &["ingest1"], Mode::Hang),
        fault("source1-kill", &["source1"], Mode::Kill),
        fault("source1-hang", &["source1"], Mode::Hang),
        fault("ingest-ffmpeg-kill", &["ingest1"], Mode::Ffmpeg),
        fault("ingest-ffmpeg-hang", &["ingest1"], Mode::FfmpegHang),
        fault("ingest-crash", &["ingest1"], Mode::Crash),
        fault(
            "broadcast+ingest-kill",
            &["broadcast1", "ingest1"],
            Mode::Kill,
        ),
        fault("lb1+broadcast-kill", &["lb1", "broadcast1"], Mode::Kill),
        fault("lb1+ingest-kill", &["lb1", "ingest1"], Mode::Kill),
        fault("source1+ingest-kill", &["source1", "ingest1"], Mode::Kill),
        // The broadcast hangs while the slot after source1's hang is awaited: its viewers move
        // with the least buffer (chaos seed 2026 found it).
        Fault {
            stagger_s: 2.8,
            ..fault(
                "source1+broadcast-hang",
                &["source1", "broadcast1"],
                Mode::Hang,
            )
        },
        cut("lb1-cut", "lb1", &[]),
        cut("broadcast-cut", "broadcast1", &[]),
        cut("ingest-cut", "ingest1", &[]),
        cut("source1-cut", "source1", &[]),
        cut("db-primary-cut", DB_PRIMARY, &[]),
        cut("broadcast-cut-from-lbs", "broadcast1", &["lb"]),
        cut("ingest-cut-from-peer", "ingest1", &["ingest2"]),
        // The primary keeps its clients (the broadcasts) but loses its replica and every etcd
        // member but its own: it must step down before the replica is promoted.
        cut(
            "db-primary-cut-from-db-and-etcd",
            DB_PRIMARY,
            &["db", "lb1"],
        ),
        fault("publisher-ingest-kill", &[PUBLISHER_INGEST], Mode::Kill),
        fault("publisher-ingest-hang", &[PUBLISHER_INGEST], Mode::Hang),
    ]
}

/// Stands for the ingest an outside publisher is on. For such a row the sources are stopped
/// and a single OBS-like publisher publishes through the LBs (`obs_publisher`); the row
/// measures the slate its fault puts on the timeline, and the sources start again at the
/// restore.
pub const PUBLISHER_INGEST: &str = "publisher's ingest";

/// The single-publisher setup of a [`PUBLISHER_INGEST`] row.
struct PublisherRow {
    publisher: crate::obs_publisher::ObsPublisher,
    sources: Vec<String>,
    ingest: String,
    slate_before: Vec<(String, u64)>,
}

impl PublisherRow {
    async fn setup(state: &std::path::Path) -> anyhow::Result<Self> {
        let sources = hosts_of(state, Role::Source).await?;
        for source in &sources {
            faults::kill(state, source, Blow::Kill).await?;
        }
        let publisher = crate::obs_publisher::ObsPublisher::start(state)?;
        let ingest = crate::obs_publisher::wait_live(state, Duration::from_secs(60)).await?;
        // Both ingests settle on it (the relay) before the viewers start.
        tokio::time::sleep(Duration::from_secs(6)).await;
        Ok(Self {
            publisher,
            sources,
            ingest,
            slate_before: Vec::new(),
        })
    }

    /// Slate seconds on the ingests the publisher did not start on, since the fault.
    async fn slate_s(&self, state: &std::path::Path, segment_s: f64) -> f64 {
        let after = crate::obs_publisher::slate_counts(state).await;
        let slate = after
            .iter()
            .filter(|(name, _)| *name != self.ingest)
            .filter_map(|(name, n)| {
                let before = self.slate_before.iter().find(|(b, _)| b == name)?.1;
                Some(n.saturating_sub(before))
            })
            .max()
            .unwrap_or(0);
        slate as f64 * segment_s
    }

    /// Once the viewers are done (so that the row measures the fault, not this teardown): the
    /// publisher stops and the sources start again.
    async fn finish(self, state: &std::path::Path) -> anyhow::Result<()> {
        drop(self.publisher);
        for source in &self.sources {
            faults::start(state, source).await?;
        }
        Ok(())
    }
}

/// The hosts a fault acts on now: [`DB_PRIMARY`] becomes the current primary.
async fn resolve_hosts(state: &std::path::Path, fault: &Fault) -> anyhow::Result<Vec<String>> {
    let mut hosts = Vec::new();
    for host in &fault.hosts {
        if host == DB_PRIMARY {
            let configs = Layout::new(state)?.load_configs()?;
            hosts.push(
                streaming_runner::db::primary(&configs)
                    .await
                    .context("no database primary to cut off")?,
            );
        } else {
            hosts.push(host.clone());
        }
    }
    Ok(hosts)
}

/// What one fault did to the viewers.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub fault: Fault,
    /// The hosts the fault hit ([`DB_PRIMARY`] resolved).
    pub hosts: Vec<String>,
    pub viewers: usize,
    pub stalls: u64,
    pub stall_s: f64,
    pub errors: u64,
    pub failovers: u64,
    pub request_failures: u64,
    pub discontinuities: u64,
    pub latency_max_s: f64,
    /// Seconds from the restore until every host answered its health check again (for a
    /// crash, which nobody restores: from the crash).
    pub whole_again_s: Option<f64>,
    /// Crash: seconds from the crash until the runner had started the service again.
    pub restarted_s: Option<f64>,
    /// Publisher rows: seconds of slate the fault put on the timeline.
    pub slate_s: Option<f64>,
}

impl Row {
    pub fn clean(&self) -> bool {
        self.stalls == 0 && self.errors == 0
    }
}

/// The hosts of one role, as `streamctl status` lists them.
async fn hosts_of(state: &std::path::Path, role: Role) -> anyhow::Result<Vec<String>> {
    Ok(faults::statuses(state)
        .await?
        .into_iter()
        .filter(|h| h.role == role)
        .map(|h| h.name)
        .collect())
}

/// Injects the row's fault into `hosts`.
async fn inject(state: &std::path::Path, fault: &Fault, hosts: &[String]) -> anyhow::Result<()> {
    for host in hosts {
        let blow = match fault.mode {
            Mode::Partition => {
                faults::cut(state, host, &fault.from).await?;
                continue;
            }
            Mode::Kill => Blow::Kill,
            Mode::Hang => Blow::Hang,
            Mode::Ffmpeg => Blow::Ffmpeg { hang: false },
            Mode::FfmpegHang => Blow::Ffmpeg { hang: true },
            Mode::Crash => Blow::Crash,
        };
        faults::kill(state, host, blow).await?;
    }
    Ok(())
}

/// Undoes the row's fault where the cluster does not undo it itself.
async fn restore(state: &std::path::Path, fault: &Fault, hosts: &[String]) -> anyhow::Result<()> {
    if fault.mode == Mode::Partition {
        for host in hosts {
            faults::heal(state, host).await?;
        }
        return Ok(());
    }
    if matches!(fault.mode, Mode::Ffmpeg | Mode::FfmpegHang | Mode::Crash) {
        // The ingest restarts its own transcoder (killing a hung one first); the runner
        // restarts a crashed service.
        return Ok(());
    }
    for host in hosts {
        faults::start(state, host).await?;
    }
    Ok(())
}

/// Runs one row: viewers watch while the fault comes and goes.
pub async fn run_fault(args: &FailoverArgs, fault: &Fault) -> anyhow::Result<Row> {
    let state = args.state.clone();
    if let Err(missing) = wait_whole(&state, &[], Duration::from_secs(60)).await {
        bail!("the cluster is not whole before {}: {missing}", fault.name);
    }
    let mut publisher = match fault.hosts.as_slice() {
        [host] if host == PUBLISHER_INGEST => Some(PublisherRow::setup(&state).await?),
        _ => None,
    };
    // Hosts down on purpose for the whole row, left out of "whole again".
    let stopped = publisher
        .as_ref()
        .map(|p| p.sources.clone())
        .unwrap_or_default();
    let fault = &match &publisher {
        Some(p) => Fault {
            hosts: vec![p.ingest.clone()],
            ..fault.clone()
        },
        None => fault.clone(),
    };
    let watch_args = viewers_for(args, fault, &hosts_of(&state, Role::Broadcast).await?);
    let viewers_task = tokio::spawn(async move { watch(&watch_args).await });
    tokio::time::sleep(Duration::from_secs(args.fault_after)).await;
    tracing::info!(fault = %fault.name, "injecting");
    let hosts = resolve_hosts(&state, fault).await?;
    let before = service_pids(&state, &hosts).await?;
    if let Some(p) = &mut publisher {
        p.slate_before = crate::obs_publisher::slate_counts(&state).await;
    }
    let injected = Instant::now();
    let (first, later) = hosts.split_at(hosts.len().min(1));
    inject(&state, fault, first).await?;
    if !later.is_empty() {
        tokio::time::sleep(Duration::from_secs_f64(fault.stagger_s)).await;
        inject(&state, fault, later).await?;
    }
    let mut restarted_s = None;
    let mut whole_again_s = None;
    if fault.mode == Mode::Crash {
        restarted_s = wait_restarted(&state, &before, Duration::from_secs(60)).await;
        if restarted_s.is_some() {
            whole_again_s = wait_whole(&state, &stopped, Duration::from_secs(60))
                .await
                .ok()
                .map(|_| injected.elapsed().as_secs_f64());
        }
    }
    tokio::time::sleep(Duration::from_secs(args.fault_for).saturating_sub(injected.elapsed()))
        .await;
    tracing::info!(fault = %fault.name, "restoring");
    let slate_s = match &publisher {
        Some(p) => Some(p.slate_s(&state, segment_seconds(&state)).await),
        None => None,
    };
    restore(&state, fault, &hosts).await?;
    if fault.mode != Mode::Crash {
        whole_again_s = wait_whole(&state, &stopped, Duration::from_secs(60))
            .await
            .ok();
    }
    let report: WatchReport = viewers_task.await.context("viewer task")??;
    if let Some(p) = publisher {
        p.finish(&state).await?;
    }
    Ok(Row {
        fault: fault.clone(),
        hosts,
        viewers: report.viewers,
        stalls: report.felt.stalls,
        stall_s: report.felt.stall_s,
        errors: report.felt.errors,
        failovers: report.felt.failovers,
        request_failures: report.felt.request_failures,
        discontinuities: report.felt.discontinuities,
        latency_max_s: report.felt.latency_max_s,
        whole_again_s,
        restarted_s,
        slate_s,
    })
}

/// The row's viewers: spread over every broadcast, and one more on the faulty path.
fn viewers_for(args: &FailoverArgs, fault: &Fault, broadcasts: &[String]) -> WatchArgs {
    let mut pins = broadcasts.to_vec();
    pins.push(fault.path.clone());
    let viewers = args.viewers.max(pins.len());
    WatchArgs {
        url: None,
        lb: Vec::new(),
        state: args.state.clone(),
        ca: None,
        seconds: args.seconds,
        viewers: viewers + 1,
        renditions: "all".into(),
        low_latency: args.low_latency,
        pin: Some(
            (0..=viewers)
                .map(|i| {
                    if i == viewers {
                        fault.path.clone()
                    } else {
                        broadcasts[i % broadcasts.len()].clone()
                    }
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        json: true,
    }
}
/// The cluster's segment duration (2 s unless cluster.nix says otherwise).
fn segment_seconds(state: &std::path::Path) -> f64 {
    Layout::new(state)
        .and_then(|l| l.load_configs())
        .ok()
        .and_then(|c| {
            c.first()
                .map(|c| f64::from(c.cluster.timeline.segment_seconds))
        })
        .unwrap_or(2.0)
}

/// The service pid of each host (`streamctl status`), to see when a crashed one was replaced.
async fn service_pids(
    state: &std::path::Path,
    hosts: &[String],
) -> anyhow::Result<Vec<(String, Option<i32>)>> {
    let all = faults::statuses(state).await?;
    Ok(hosts
        .iter()
        .map(|name| {
            let pid = all
                .iter()
                .find(|h| h.name == *name)
                .and_then(|h| h.service_pid);
            (name.clone(), pid)
        })
        .collect())
}

/// Seconds until every host of `before` runs a service with another pid than before.
async fn wait_restarted(
    state: &std::path::Path,
    before: &[(String, Option<i32>)],
    limit: Duration,
) -> Option<f64> {
    let start = Instant::now();
    let hosts: Vec<String> = before.iter().map(|(h, _)| h.clone()).collect();
    while start.elapsed() < limit {
        if let Ok(now) = service_pids(state, &hosts).await
            && now
                .iter()
                .zip(before)
                .all(|((_, new), (_, old))| new.is_some() && new != old)
        {
            return Some(start.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The hosts column: `db1 cut from db, lb1`, `lb1 cut from everyone`, `lb1 + broadcast1`.
fn what_was_hit(row: &Row) -> String {
    let hosts = match row.hosts.split_first() {
        Some((first, later)) if row.fault.stagger_s > 0.0 && !later.is_empty() => format!(
            "{first} + {} {:.1} s later",
            later.join(" + "),
            row.fault.stagger_s
        ),
        _ => row.hosts.join(" + "),
    };
    if row.fault.mode != Mode::Partition {
        return hosts;
    }
    let from = if row.fault.from.is_empty() {
        "everyone".to_owned()
    } else {
        row.fault.from.join(", ")
    };
    format!("{hosts} cut from {from}")
}

/// The Markdown table, with the command that made it.
pub fn markdown(args: &FailoverArgs, rows: &[Row]) -> String {
    let mut out = String::from("# Failover matrix\n\n");
    let _ = writeln!(
        out,
        "Made by `streamctl bench failover --viewers {} --seconds {} --fault-after {} --fault-for {}{}` \
         against a local cluster started with `streamctl up` (2-core machine). Each row: viewers \
         spread over every broadcast plus one pinned to the faulty host's path watch for {} s; the \
         fault starts after {} s and the host is restored (`streamctl start`) {} s later; a \
         crashed service is restarted by the runner (1 s backoff), and its \"whole again\" counts \
         from the crash. A cut (`streamctl partition HOST [--from HOST|ROLE]`: nftables drops \
         the host's connections to and from them, existing ones included; from everyone: \
         viewers too) is lifted with `streamctl heal` instead of a restore. `db-primary` is \
         the database primary when the fault starts.\n",
        args.viewers,
        args.seconds,
        args.fault_after,
        args.fault_for,
        if args.low_latency {
            " --low-latency"
        } else {
            ""
        },
        args.seconds,
        args.fault_after,
        args.fault_for
    );
    out.push_str("| fault | hosts | viewers | stalls | stall s | errors | failovers | request failures | discontinuities seen | max latency s | restarted by the runner after | whole again after restore | slate s (single publisher) |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {:.1} | {} | {} | {} |",
            r.fault.name,
            what_was_hit(r),
            r.viewers,
            r.stalls,
            r.stall_s,
            r.errors,
            r.failovers,
            r.request_failures,
            r.discontinuities,
            r.latency_max_s,
            r.restarted_s
                .map_or("-".to_owned(), |s| format!("{s:.1} s")),
            r.whole_again_s
                .map_or("not within 60 s".to_owned(), |s| format!("{s:.1} s")),
            r.slate_s.map_or("-".to_owned(), |s| format!("{s:.0}"))
        );
    }
    out
}

/// `streamctl bench failover`: every row (or those of `--only`), then the table.
pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    let wanted: Option<Vec<&str>> = args.only.as_deref().map(|o| o.split(',').collect());
    let faults: Vec<Fault> = matrix()
        .into_iter()
        .filter(|f| wanted.as_ref().is_none_or(|w| w.contains(&f.name.as_str())))
        .collect();
    if faults.is_empty() {
        bail!(
            "no fault matches --only (names: {})",
            matrix()
                .iter()
                .map(|f| f.name.clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut rows = Vec::new();
    for fault in &faults {
        eprintln!("bench: {} ...", fault.name);
        let row = run_fault(&args, fault).await?;
        eprintln!(
            "bench: {}: {} stalls ({:.2} s), {} errors, {} failovers, whole again {}",
            row.fault.name,
            row.stalls,
            row.stall_s,
            row.errors,
            row.failovers,
            row.whole_again_s
                .map_or("-".into(), |s| format!("{s:.1} s"))
        );
        rows.push(row);
    }
    let table = markdown(&args, &rows);
    crate::output::emit(args.out.as_deref(), args.json, &table, &rows)
}
