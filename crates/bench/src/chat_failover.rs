//! `streamctl bench chat-failover`: chat durability while the database primary fails.
//!
//! Against a running local cluster, the chat load of [`streaming_clients::chat`] runs while the current
//! PostgreSQL primary is killed (SIGKILL of Patroni and PostgreSQL, `streamctl kill dbN
//! --postgres`; with `--whole-host` the host's etcd member dies too), restored and left to
//! rejoin as a synchronous standby; then the new primary is killed the same way; then the
//! primary of the moment is hung (SIGSTOP, `--hang`) and resumed. Per fault the bench measures the write outage the chat clients felt
//! (from their ack stream) and how long until another db host answered Patroni's `/primary`.
//! Afterwards it reads the chat log in PostgreSQL, on the primary as the services' role, and
//! checks that every acked (user, id) is stored exactly once under its acked seq.
//! The target: 0 lost, 0 duplicates, outage <= ttl + 2 s.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use streaming_core::config::{ClusterConfig, HostEntry, Role};
use tokio::sync::{oneshot, watch};

use streaming_clients::chat::{self, ChatReport, LoadOptions, LoadOutcome, Outage, Target};
use streaming_core::patroni::{Check, Patroni};
use streaming_runner::cluster::Layout;
use streaming_runner::hosts::Blow;

use crate::database::{
    DbCheck, Stored, check_db, find_primary, most_primaries, patroni_says, wait_for_primary,
};
use crate::faults;

#[derive(Debug, Clone, clap::Args)]
pub struct ChatFailoverArgs {
    /// State directory of the running cluster.
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// Chat clients, each with its own account, spread over the broadcasts.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Messages per second, all clients together.
    #[arg(long, default_value_t = 24.0)]
    pub rate: f64,
    /// Seconds of load at least (the three faults may take longer; the load runs until they end).
    #[arg(long, default_value_t = 90)]
    pub seconds: u64,
    /// Seconds of flowing acks before the first fault, after each recovery and after each rejoin.
    #[arg(long, default_value_t = 5)]
    pub settle: u64,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the Markdown table here (e.g. docs/chat-failover.md).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Fail the whole db host (its etcd member too, as a power cut) instead of only its
    /// database service (Patroni and PostgreSQL).
    #[arg(long)]
    pub whole_host: bool,
    /// The faults, in order, each of the primary of the moment (`partition`: cut off from the
    /// other db hosts and every etcd member but its own, its clients still reach it).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = FAULTS)]
    pub faults: Vec<FaultKind>,
}

/// How the primary fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FaultKind {
    /// SIGKILL of Patroni and PostgreSQL (`streamctl kill dbN --postgres`), or of the whole
    /// host with `--whole-host`.
    Kill,
    /// SIGSTOP of them (`--hang`); `streamctl start` sends SIGCONT.
    Hang,
    /// A network cut (`streamctl partition`) from the other db hosts and the etcd witness;
    /// `streamctl heal` lifts it. The old primary must step down before another is promoted.
    Partition,
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FaultKind::Kill => "kill",
            FaultKind::Hang => "hang",
            FaultKind::Partition => "partition",
        })
    }
}

/// The faults in turn: kill, kill (of the new primary), hang.
pub const FAULTS: [FaultKind; 3] = [FaultKind::Kill, FaultKind::Kill, FaultKind::Hang];

/// What one fault did.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRow {
    pub fault: String,
    pub kind: FaultKind,
    /// The primary that failed.
    pub host: String,
    /// When the fault was injected (seconds since the bench started).
    pub at_s: f64,
    pub new_primary: Option<String>,
    /// From the fault until another db host answered `/primary` with 200.
    pub new_primary_after_s: Option<f64>,
    /// The longest write outage the chat clients saw around this fault.
    pub outage_s: f64,
    /// Every write outage between this fault and the next.
    pub outages: Vec<Outage>,
    /// From the fault until `streamctl start` of the failed host.
    pub restored_after_s: f64,
    /// From the restore until the host answered `/replica`, then `/sync`, with 200.
    pub replica_after_restore_s: Option<f64>,
    pub sync_after_restore_s: Option<f64>,
    /// The primary once the cluster was whole again after the restore.
    pub leader_after_restore: Option<String>,
    /// The failed host became primary again after its restore (Patroni 3.0.2's etcd3 lease bug
    /// after a hang longer than ttl): the new primary's writes since the failover are rewound.
    pub took_leader_back: bool,
    /// Messages acked between this fault and the next.
    pub acked: u64,
    /// Of those: not in the database under their acked seq.
    pub lost: u64,
    /// Of those: stored more than once.
    pub duplicates: u64,
    /// The most db hosts answering Patroni's `/primary` with 200 at once, polled every 200 ms
    /// from the fault until the failed host rejoined (2 or more: split brain).
    pub primaries_max: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatFailoverReport {
    /// Patroni's leader lease (config.cluster.database.ttl).
    pub ttl_s: u32,
    /// ttl + 2 s: the bound each outage is held to (docs/chat-failover.md).
    pub target_outage_s: f64,
    pub faults: Vec<FaultRow>,
    pub load: ChatReport,
    pub db: DbCheck,
    /// 0 lost, 0 duplicates, every client got everything in order, every outage within target.
    pub passed: bool,
}

/// Polls `check` every 200 ms until it holds or `limit` passes; the seconds it took.
async fn wait_until<F, Fut>(limit: Duration, mut check: F) -> Option<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Some(start.elapsed().as_secs_f64());
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The longest outage overlapping `[from_s, to_s)`, and all of them.
pub fn outages_in(outages: &[Outage], from_s: f64, to_s: f64) -> (f64, Vec<Outage>) {
    let inside: Vec<Outage> = outages
        .iter()
        .filter(|o| o.start_s < to_s && o.start_s + o.duration_s > from_s)
        .copied()
        .collect();
    let longest = inside.iter().map(|o| o.duration_s).fold(0.0, f64::max);
    (longest, inside)
}

/// What every fault of one run shares.
struct Run<'a> {
    args: &'a ChatFailoverArgs,
    cluster: &'a ClusterConfig,
    http: &'a Patroni,
    dbs: &'a [HostEntry],
    epoch: Instant,
    live: &'a chat::Live,
    ttl_s: u32,
}

/// Where the failed host stands after its restore.
#[derive(Default)]
struct Rejoin {
    replica_s: Option<f64>,
    sync_s: Option<f64>,
    leader: Option<String>,
}

impl Run<'_> {
    /// One fault from injection to the failed host being a synchronous standby again.
    async fn one_fault(&self, number: usize, kind: FaultKind) -> anyhow::Result<FaultRow> {
        let (args, http) = (self.args, self.http);
        let host = wait_for_primary(http, self.dbs, Duration::from_secs(30))
            .await
            .context("no primary before the fault")?;
        let name = match kind {
            FaultKind::Kill => format!("kill {number}"),
            FaultKind::Hang => "hang".to_owned(),
            FaultKind::Partition => "partition".to_owned(),
        };
        let entry = self
            .dbs
            .iter()
            .find(|h| h.name == host)
            .context("primary is not a db host")?
            .clone();
        eprintln!("bench: {name}: {host} is the primary; failing it");
        let at_s = self.epoch.elapsed().as_secs_f64();
        let fault_at = Instant::now();
        let (watching_tx, watching_rx) = watch::channel(false);
        let split_brain =
            tokio::spawn(most_primaries(http.clone(), self.dbs.to_vec(), watching_rx));
        self.fail(&host, kind).await?;
        let result = self.await_failover(&name, &host, fault_at).await;
        // The host comes back whatever happened above.
        let restored_after_s = fault_at.elapsed().as_secs_f64();
        eprintln!("bench: {name}: restoring {host}");
        if kind == FaultKind::Partition {
            faults::heal(&args.state, &host).await?;
        } else {
            faults::start(&args.state, &host).await?;
        }
        let (new_primary, new_primary_after_s) = result?;
        let rejoin = self.await_rejoin(&entry).await;
        // Only after a promotion elsewhere: a host that stayed the only candidate (nobody was
        // promoted while it was away) rewinds nothing by leading again.
        let took_leader_back =
            new_primary.is_some() && rejoin.leader.as_deref() == Some(host.as_str());
        if took_leader_back {
            eprintln!(
                "bench: {name}: {host} TOOK THE LEADER BACK after its restore: the new primary's \
                 writes since the failover were rewound"
            );
        }
        eprintln!(
            "bench: {name}: {host} replica after {}, synchronous standby after {}",
            rejoin
                .replica_s
                .map_or("-".into(), |s: f64| format!("{s:.1} s")),
            rejoin
                .sync_s
                .map_or("-".into(), |s: f64| format!("{s:.1} s"))
        );
        let _ = watching_tx.send(true);
        let primaries_max = split_brain.await.unwrap_or(0);
        if primaries_max > 1 {
            eprintln!("bench: {name}: SPLIT BRAIN: {primaries_max} db hosts were primary at once");
        }
        tokio::time::sleep(Duration::from_secs(args.settle)).await;
        Ok(FaultRow {
            fault: name,
            kind,
            host,
            at_s,
            new_primary,
            new_primary_after_s,
            outage_s: 0.0,
            outages: Vec::new(),
            restored_after_s,
            replica_after_restore_s: rejoin.replica_s,
            sync_after_restore_s: rejoin.sync_s,
            leader_after_restore: rejoin.leader,
            took_leader_back,
            acked: 0,
            lost: 0,
            duplicates: 0,
            primaries_max,
        })
    }

    /// Kills, hangs or cuts off the primary.
    async fn fail(&self, host: &str, kind: FaultKind) -> anyhow::Result<()> {
        if kind == FaultKind::Partition {
            // Its replicas and every etcd member not on itself: its own member is then a
            // minority of one.
            let mut from = vec!["db".to_owned()];
            from.extend(
                self.cluster
                    .hosts
                    .iter()
                    .filter(|h| h.etcd_witness)
                    .map(|h| h.name.clone()),
            );
            faults::cut(&self.args.state, host, &from).await?;
        } else {
            let hang = kind == FaultKind::Hang;
            let blow = match (self.args.whole_host, hang) {
                (false, hang) => Blow::Postgres { hang },
                (true, true) => Blow::Hang,
                (true, false) => Blow::Kill,
            };
            faults::kill(&self.args.state, host, blow).await?;
        }
        Ok(())
    }

    /// Another db host promoted (and when), then writes flowing again for a few seconds.
    async fn await_failover(
        &self,
        name: &str,
        host: &str,
        fault_at: Instant,
    ) -> anyhow::Result<(Option<String>, Option<f64>)> {
        let others: Vec<HostEntry> = self
            .dbs
            .iter()
            .filter(|h| h.name != host)
            .cloned()
            .collect();
        let new_primary = wait_for_primary(self.http, &others, Duration::from_secs(60)).await;
        let new_primary_after_s = new_primary
            .as_ref()
            .map(|_| fault_at.elapsed().as_secs_f64());
        eprintln!(
            "bench: {name}: new primary {} after {}",
            new_primary.as_deref().unwrap_or("none"),
            new_primary_after_s.map_or("-".into(), |s| format!("{s:.1} s"))
        );
        // Writes flow again (an ack after the promotion), then a few seconds of them.
        let promoted_s = self.epoch.elapsed().as_secs_f64();
        let patience = Duration::from_secs(u64::from(self.ttl_s.max(10)) * 3);
        let live = self.live;
        let resumed = wait_until(patience, || async {
            live.last_ack_s().is_some_and(|t| t > promoted_s)
        })
        .await;
        if resumed.is_none() {
            eprintln!(
                "bench: {name}: no chat ack within {} s of the promotion",
                patience.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(self.args.settle)).await;
        Ok((new_primary, new_primary_after_s))
    }

    /// Whole again: the restored host a synchronous standby of the primary — or, if it took
    /// the leader back (it must not: the writes of the new primary would be rewound), primary
    /// with a synchronous standby. The next fault may only come then (synchronous_mode
    /// promotes only the synchronous standby).
    async fn await_rejoin(&self, entry: &HostEntry) -> Rejoin {
        let (http, dbs) = (self.http, self.dbs);
        let restored = Instant::now();
        let mut rejoin = Rejoin::default();
        while restored.elapsed() < Duration::from_secs(90) {
            if rejoin.replica_s.is_none() && patroni_says(http, entry, Check::Replica).await {
                rejoin.replica_s = Some(restored.elapsed().as_secs_f64());
            }
            if patroni_says(http, entry, Check::Sync).await {
                rejoin.sync_s = Some(restored.elapsed().as_secs_f64());
                rejoin.leader = find_primary(http, dbs).await;
                break;
            }
            if let Some(primary) = find_primary(http, dbs).await
                && primary == entry.name
            {
                let mut has_sync = false;
                for other in dbs.iter().filter(|h| h.name != entry.name) {
                    has_sync |= patroni_says(http, other, Check::Sync).await;
                }
                if has_sync {
                    rejoin.leader = Some(primary);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        rejoin
    }
}

/// A primary with a synchronous standby (or the first kill has nobody to promote).
async fn wait_sync_standby(http: &Patroni, dbs: &[HostEntry]) -> anyhow::Result<()> {
    let whole = wait_until(Duration::from_secs(90), || async {
        let Some(p) = find_primary(http, dbs).await else {
            return false;
        };
        for h in dbs.iter().filter(|h| h.name != p) {
            if patroni_says(http, h, Check::Sync).await {
                return true;
            }
        }
        false
    })
    .await;
    if whole.is_none() {
        bail!("no primary with a synchronous standby within 90 s (see `streamctl status`)");
    }
    Ok(())
}

/// Per fault, the outages and the acked messages of its window, which runs until the next
/// fault (the last one until the end).
fn attribute(rows: &mut [FaultRow], outcome: &LoadOutcome, stored: &[Stored], end_s: f64) {
    let starts: Vec<f64> = rows.iter().map(|r| r.at_s).collect();
    for (i, row) in rows.iter_mut().enumerate() {
        let from = starts[i];
        let to = starts.get(i + 1).copied().unwrap_or(end_s);
        let (longest, inside) = outages_in(&outcome.report.write_outages, from - 0.5, to);
        row.outage_s = longest;
        row.outages = inside;
        for (m, s) in outcome.acked.iter().zip(stored) {
            if m.acked_s >= from && m.acked_s < to {
                row.acked += 1;
                match s {
                    Stored::Missing | Stored::WrongSeq => row.lost += 1,
                    Stored::Twice => row.duplicates += 1,
                    Stored::Once => {}
                }
            }
        }
    }
}

/// The promise: nothing acked lost or doubled, everyone got everything in order, every outage
/// within target, never two primaries, never the leader taken back.
fn passed(db: &DbCheck, load: &ChatReport, rows: &[FaultRow], target_outage_s: f64) -> bool {
    db.lost == 0
        && db.wrong_seq == 0
        && db.duplicates == 0
        && db.seq_duplicates == 0
        && load.missing == 0
        && load.duplicates == 0
        && load.out_of_order == 0
        && load.delivered
        && load.seq_conflicts == 0
        && rows
            .iter()
            .all(|r| r.outage_s <= target_outage_s && !r.took_leader_back && r.primaries_max <= 1)
}

/// Runs the bench; the report (also for the end-to-end test, through `--json`).
pub async fn bench(args: &ChatFailoverArgs) -> anyhow::Result<ChatFailoverReport> {
    let layout = Layout::new(&args.state)?;
    let configs = layout.load_configs()?;
    let any = configs.first().context("no host config in the state dir")?;
    let ttl_s = any.cluster.database.ttl;
    let dbs: Vec<HostEntry> = any.cluster.hosts_with_role(Role::Db).cloned().collect();
    if dbs.len() < 2 {
        bail!(
            "the cluster has {} db host(s); failover needs two",
            dbs.len()
        );
    }
    let http = streaming_runner::db::rest_client(any)?;
    let cluster = &any.cluster;
    wait_sync_standby(&http, &dbs).await?;
    let target = Target::resolve(None, &args.state, None, None)?;
    let channel = target.channel.clone();
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sending_tx, sending_rx) = oneshot::channel();
    let live = Arc::new(chat::Live::default());
    let load = tokio::spawn(chat::load(LoadOptions {
        target,
        clients: args.clients,
        rate: args.rate,
        seconds: None,
        stop: Some(stop_rx),
        drain: Duration::from_secs(20),
        // Longer than the broadcasts' retry window (ttl + 5 s), so their `unavailable` answer
        // comes before the client gives up on the socket.
        ack_timeout: Duration::from_secs(u64::from(ttl_s) + 10),
        epoch,
        sending: Some(sending_tx),
        live: live.clone(),
    }));
    if sending_rx.await.is_err() {
        // The load ended before sending: its error says why.
        return match load.await.context("chat load task")? {
            Err(e) => Err(e),
            Ok(_) => bail!("the chat load ended before sending"),
        };
    }
    eprintln!(
        "bench: chat load running ({} clients, {} msg/s)",
        args.clients, args.rate
    );
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let run = Run {
        args,
        cluster,
        http: &http,
        dbs: &dbs,
        epoch,
        live: &live,
        ttl_s,
    };
    let mut rows = Vec::new();
    for (i, kind) in args.faults.iter().enumerate() {
        match run.one_fault(i + 1, *kind).await {
            Ok(row) => rows.push(row),
            Err(e) => {
                let _ = stop_tx.send(true);
                let _ = load.await;
                return Err(e.context(format!("fault {}", i + 1)));
            }
        }
    }
    let minimum = Duration::from_secs(args.seconds);
    if epoch.elapsed() < minimum {
        tokio::time::sleep(minimum - epoch.elapsed()).await;
    }
    let _ = stop_tx.send(true);
    let outcome = load.await.context("chat load task")??;
    let primary = wait_for_primary(&http, &dbs, Duration::from_secs(30))
        .await
        .context("no primary to check the stored messages on")?;
    let (db, stored) = check_db(
        &layout,
        &dbs,
        &primary,
        &channel,
        &outcome.user_prefix,
        &outcome.acked,
    )
    .await?;
    attribute(&mut rows, &outcome, &stored, epoch.elapsed().as_secs_f64());
    let target_outage_s = f64::from(ttl_s) + 2.0;
    let passed = passed(&db, &outcome.report, &rows, target_outage_s);
    let load_report = outcome.report;
    Ok(ChatFailoverReport {
        ttl_s,
        target_outage_s,
        faults: rows,
        load: load_report,
        db,
        passed,
    })
}

/// The Markdown page (docs/chat-failover.md).
pub fn markdown(args: &ChatFailoverArgs, report: &ChatFailoverReport) -> String {
    let load = &report.load;
    let mut out = String::from("# Chat during database failover\n\n");
    let _ = writeln!(
        out,
        "Made by `streamctl bench chat-failover --clients {} --rate {} --seconds {}{}` against a \
         local cluster started with `streamctl up` (2-core machine; Patroni ttl {} s, \
         synchronous_mode). {} chat clients, each with its own account, on {} send {} msg/s in \
         total for {:.0} s while the PostgreSQL primary is killed ({}), killed again after the \
         first one rejoined, then hung (SIGSTOP of the same) and resumed. The outage is the longest time the clients had a message \
         pending and no ack arrived; \"new primary\" is the time until the other db host \
         answered Patroni's `/primary`. Lost and duplicates are checked in PostgreSQL: every \
         acked (user, id) must be stored exactly once, under its acked seq. Target: 0 lost, \
         0 duplicates, outage <= ttl + 2 s = {:.0} s.\n",
        args.clients,
        args.rate,
        args.seconds,
        if args.whole_host { " --whole-host" } else { "" },
        report.ttl_s,
        load.clients,
        load.initial_broadcasts.join(", "),
        args.rate,
        load.seconds,
        if args.whole_host {
            "SIGKILL of the whole db host: Patroni, PostgreSQL and its etcd member"
        } else {
            "SIGKILL of Patroni and PostgreSQL; the host and its etcd member stay up"
        },
        report.target_outage_s,
    );
    if args.faults != FAULTS {
        let faults: Vec<String> = args.faults.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "This run's faults instead (`--faults {}`; partition: `streamctl partition` of the \
             primary from the other db hosts and the etcd witness, lifted by `streamctl heal`).\n",
            faults.join(",")
        );
    }
    fault_table(&mut out, report);
    let _ = writeln!(
        out,
        "Clients: {} sent, {} acked, {} never acked; deliveries missing {}, duplicated {}, out \
         of order {}; seqs given to two messages {}; {} reconnects, {} resends; longest wait for \
         an ack {:.1} s. Database: {} rows of the run on {}, {} of them stored but never acked \
         (ack lost with a socket).",
        load.sent,
        load.acked,
        load.unacked,
        load.missing,
        load.duplicates,
        load.out_of_order,
        load.seq_conflicts,
        load.reconnects,
        load.resends,
        load.max_ack_wait_s,
        report.db.rows,
        report.db.host,
        report.db.stored_unacked
    );
    let rejoin: Vec<String> = report.faults.iter().map(rejoin_line).collect();
    let _ = writeln!(out, "\nRejoin: {}.", rejoin.join("; "));
    let _ = writeln!(
        out,
        "\nResult: {}.",
        if report.passed {
            "target met"
        } else {
            "TARGET MISSED"
        }
    );
    out
}

/// One row per fault, then the whole run's database check.
fn fault_table(out: &mut String, report: &ChatFailoverReport) {
    out.push_str(
        "| fault | host | outage s | new primary after s | acked | lost | duplicates | most primaries at once |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in &report.faults {
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {} | {} | {} | {} | {} |",
            r.fault,
            r.host,
            r.outage_s,
            r.new_primary_after_s
                .map_or("not within 60 s".to_owned(), |s| format!("{s:.1}")),
            r.acked,
            r.lost,
            r.duplicates,
            r.primaries_max
        );
    }
    let _ = writeln!(
        out,
        "| whole run | | | | {} | {} | {} | |\n",
        report.db.checked,
        report.db.lost + report.db.wrong_seq,
        report.db.duplicates + report.db.seq_duplicates
    );
}

/// How a failed host came back: replica, then synchronous standby (or the leader taken back).
fn rejoin_line(r: &FaultRow) -> String {
    format!(
        "{} ({}): {}replica {} / synchronous standby {} after the restore",
        r.fault,
        r.host,
        if r.took_leader_back {
            "TOOK THE LEADER BACK (writes of the new primary rewound), "
        } else {
            ""
        },
        r.replica_after_restore_s
            .map_or("-".into(), |s| format!("{s:.1} s")),
        r.sync_after_restore_s
            .map_or("-".into(), |s| format!("{s:.1} s"))
    )
}

pub async fn run(args: ChatFailoverArgs) -> anyhow::Result<()> {
    let report = bench(&args).await?;
    let table = markdown(&args, &report);
    crate::output::emit(args.markdown.as_deref(), args.json, &table, &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_attributed_to_the_fault_window_they_overlap() {
        let outages = vec![
            Outage {
                start_s: 10.2,
                duration_s: 10.5,
            },
            Outage {
                start_s: 40.0,
                duration_s: 1.5,
            },
            Outage {
                start_s: 60.0,
                duration_s: 9.0,
            },
        ];
        let (longest, inside) = outages_in(&outages, 9.5, 59.0);
        assert_eq!(longest, 10.5);
        assert_eq!(inside.len(), 2);
        let (longest, _) = outages_in(&outages, 100.0, 120.0);
        assert_eq!(longest, 0.0);
    }
}
