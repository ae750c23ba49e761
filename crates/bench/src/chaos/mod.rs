//! `streamctl bench chaos`: a random fault schedule, reproducible from a seed, while viewers
//! watch and chat clients write.
//!
//! - [`schedule`]: the faults drawn from the seed, and the invariant every step keeps.
//! - [`inject`]: doing and undoing one fault through the operator's commands.
//! - [`report`]: per step and total figures, JSON and the Markdown page.
//!
//! Each step gets its own viewers (spread over every broadcast, failing over through every LB
//! in turn, as the page does) and chat clients (new accounts, entering through the LBs), started
//! before the first fault and stopped once the cluster is whole again, so every figure belongs
//! to one step. The acked messages of the step are then looked up in PostgreSQL.

pub mod inject;
pub mod report;
pub mod schedule;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use streaming_core::config::Role;
use tokio::sync::{oneshot, watch};

use report::{ChaosReport, StepRow, Totals};
use schedule::{Bounds, Fault, Kind, Shape, Step, Target};
use streaming_clients::chat::{self, LoadOptions, Target as ChatTarget};
use streaming_core::patroni::Patroni;
use streaming_runner::cluster::Layout;

/// The longest wait for the cluster to be whole, before a step and after its restores.
const WHOLE_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// State directory of the running cluster.
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// The seed of the schedule: the same seed replays the same faults (default: from the
    /// clock, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Faults in all (a pair counts two).
    #[arg(long, default_value_t = 10)]
    pub faults: usize,
    /// Viewers per step, entering through the LBs.
    #[arg(long, default_value_t = 20)]
    pub viewers: usize,
    /// Chat clients per step, each with its own account.
    #[arg(long, default_value_t = 8)]
    pub chat_clients: usize,
    /// Chat messages per second, all clients together.
    #[arg(long, default_value_t = 20.0)]
    pub chat_rate: f64,
    /// Shortest time a fault lasts before its restore (seconds).
    #[arg(long, default_value_t = 4.0)]
    pub min_fault_s: f64,
    /// Longest time a fault lasts before its restore (seconds).
    #[arg(long, default_value_t = 15.0)]
    pub max_fault_s: f64,
    /// The kinds of fault to draw (kill, hang, crash, partition; partitions need root, cgroup v2
    /// and nft when the cluster was started).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,hang,crash,partition"
    )]
    pub kinds: Vec<Kind>,
    /// Share of steps that are two faults at once.
    #[arg(long, default_value_t = 0.4)]
    pub pairs: f64,
    /// Seconds of watching and chatting before a step's first fault.
    #[arg(long, default_value_t = 6)]
    pub lead_in: u64,
    /// Seconds of watching after a step's last restore.
    #[arg(long, default_value_t = 6)]
    pub settle: u64,
    /// Print the schedule and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the Markdown page here (e.g. docs/chaos.md).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ChaosArgs {
    fn bounds(&self) -> Bounds {
        Bounds {
            min_fault_s: self.min_fault_s,
            max_fault_s: self.max_fault_s,
            pair_share: self.pairs,
            max_pair_offset_s: 3.0,
        }
    }

    /// The command line that replays the schedule (the state dir left out).
    fn command(&self, seed: u64) -> String {
        format!(
            "streamctl bench chaos --seed {seed} --faults {} --kinds {} --viewers {} \
             --chat-clients {} --chat-rate {} --min-fault-s {} --max-fault-s {} --pairs {} \
             --lead-in {} --settle {}",
            self.faults,
            schedule::KINDS
                .iter()
                .filter(|k| self.kinds.contains(k))
                .map(|k| format!("{k:?}").to_lowercase())
                .collect::<Vec<_>>()
                .join(","),
            self.viewers,
            self.chat_clients,
            self.chat_rate,
            self.min_fault_s,
            self.max_fault_s,
            self.pairs,
            self.lead_in,
            self.settle
        )
    }
}

/// The hosts of the running cluster the schedule draws from (drained ones left out), by name.
fn targets(layout: &Layout) -> anyhow::Result<Vec<Target>> {
    let drained = streaming_runner::cluster::read_drained(layout)?;
    let mut hosts: Vec<Target> = layout
        .load_configs()?
        .iter()
        .map(|c| {
            let me = c.me();
            Target {
                name: me.name.clone(),
                role: me.role,
                etcd: c.etcd.is_some(),
            }
        })
        .filter(|t| !drained.contains(&t.name))
        .collect();
    hosts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(hosts)
}

/// The step's faults with their peers, the database primary resolved where a fault aims at it.
async fn plan(
    ctx: &StepContext,
    step: &Step,
    row: &mut StepRow,
) -> anyhow::Result<Vec<(Fault, Vec<String>)>> {
    let mut planned = Vec::new();
    for fault in &step.faults {
        let mut fault = fault.clone();
        let from = fault
            .shape
            .map(|shape| shape.from_words(fault.role, &ctx.targets))
            .unwrap_or_default();
        if fault.shape == Some(Shape::PrimaryFromReplicaAndEtcd) {
            fault.host =
                crate::database::wait_for_primary(&ctx.db_http, &ctx.dbs, Duration::from_secs(30))
                    .await
                    .context("no database primary to cut off")?;
            row.actions
                .push(format!("the db primary is {}", fault.host));
        }
        planned.push((fault, from));
    }
    Ok(planned)
}

/// Every fault on its own clock (injected at its start, restored after its length, unless the
/// runner restores it); what was done and what failed go into the row.
async fn play(
    state: &std::path::Path,
    planned: Vec<(Fault, Vec<String>)>,
    row: &mut StepRow,
) -> anyhow::Result<()> {
    let tasks: Vec<_> = planned
        .into_iter()
        .map(|(fault, from)| {
            let state = state.to_owned();
            tokio::spawn(async move {
                let mut lines = Vec::new();
                let mut errors = Vec::new();
                tokio::time::sleep(Duration::from_secs_f64(fault.start_s)).await;
                match inject::inject(&state, &fault, &from).await {
                    Ok(line) => lines.push(line),
                    Err(e) => errors.push(format!("{fault}: inject: {e:#}")),
                }
                if fault.restores_itself() {
                    // "Whole again" then counts from the crash.
                    return (lines, errors);
                }
                tokio::time::sleep(Duration::from_secs_f64(fault.restore_after_s)).await;
                match inject::restore(&state, &fault).await {
                    Ok(line) => lines.extend(line),
                    Err(e) => errors.push(format!("{fault}: restore: {e:#}")),
                }
                (lines, errors)
            })
        })
        .collect();
    for task in tasks {
        let (lines, errors) = task.await.context("fault task")?;
        row.actions.extend(lines);
        row.fault_errors.extend(errors);
    }
    Ok(())
}

/// Everything a step needs that does not change between steps.
struct StepContext {
    args: ChaosArgs,
    layout: Layout,
    chat: ChatTarget,
    /// Longer than the broadcasts' retry window (Patroni ttl + 5 s), so a write outage ends in
    /// an ack or an `unavailable` answer before a client gives up on its socket.
    ack_timeout: Duration,
    db_http: Patroni,
    dbs: Vec<streaming_core::config::HostEntry>,
    broadcasts: Vec<String>,
    targets: Vec<Target>,
}

pub async fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let hosts = targets(&layout)?;
    let plan = schedule::schedule(seed, args.faults, &hosts, &args.kinds, &args.bounds())?;
    eprintln!(
        "chaos: seed {seed}, {} faults in {} steps (replay: {}):\n{}",
        args.faults,
        plan.len(),
        args.command(seed),
        report::schedule_lines(&plan)
    );
    if args.dry_run {
        return Ok(());
    }
    let report = bench(&args, layout, seed, plan).await?;
    let page = report::markdown(&report);
    crate::output::emit(args.out.as_deref(), args.json, &page, &report)
}

/// Runs the schedule; stops early (and says why in the report) when the cluster is not whole
/// or a step cannot run.
pub async fn bench(
    args: &ChaosArgs,
    layout: Layout,
    seed: u64,
    plan: Vec<Step>,
) -> anyhow::Result<ChaosReport> {
    let configs = layout.load_configs()?;
    let any = configs.first().context("no host config in the state dir")?;
    let cluster = any.cluster.clone();
    let dbs: Vec<_> = cluster.hosts_with_role(Role::Db).cloned().collect();
    let targets = targets(&layout)?;
    let broadcasts: Vec<String> = targets
        .iter()
        .filter(|t| t.role == Role::Broadcast)
        .map(|t| t.name.clone())
        .collect();
    if broadcasts.is_empty() {
        bail!("the cluster has no broadcast to watch");
    }
    let cuts = plan
        .iter()
        .flat_map(|s| &s.faults)
        .any(|f| f.kind == Kind::Partition);
    if cuts
        && configs
            .iter()
            .all(|c| streaming_runner::cgroup::existing(c).is_none())
    {
        bail!(
            "the schedule has partitions, but no host of this cluster has a cgroup of its own \
             (partitions need root, cgroup v2 and nft when `streamctl up` ran): start the \
             cluster as root, or leave them out with --kinds kill,hang,crash"
        );
    }
    let ctx = StepContext {
        targets,
        broadcasts,
        chat: ChatTarget::resolve(None, &args.state, None, None)?,
        ack_timeout: Duration::from_secs(u64::from(cluster.database.ttl) + 10),
        db_http: streaming_runner::db::rest_client(any)?,
        dbs,
        args: args.clone(),
        layout,
    };
    let mut rows = Vec::new();
    let mut stopped = None;
    for step in &plan {
        if let Err(missing) =
            streaming_runner::whole::wait_whole(&args.state, &[], WHOLE_LIMIT).await
        {
            stopped = Some(format!(
                "not whole within {} s before step {}: {missing}",
                WHOLE_LIMIT.as_secs(),
                step.number
            ));
            break;
        }
        eprintln!("chaos: step {}: {} ...", step.number, step.label());
        // A step that cannot run (no chat, no primary to check on) ends the run, with the
        // figures so far: a long schedule's first steps are not thrown away.
        let row = match run_step(&ctx, step).await {
            Ok(row) => row,
            Err(e) => {
                stopped = Some(format!("step {} ({}): {e:#}", step.number, step.label()));
                break;
            }
        };
        eprintln!(
            "chaos: step {}: {} stalls ({:.2} s), {} viewer errors; chat {} acked, {} lost, {} \
             missed, {} duplicated, longest write outage {:.1} s; whole again {}",
            step.number,
            row.stalls,
            row.stall_s,
            row.viewer_errors,
            row.chat_acked,
            row.chat_lost,
            row.chat_missing,
            row.chat_duplicated,
            row.longest_write_outage_s,
            row.not_whole.as_ref().map_or_else(
                || format!("after {:.1} s", row.whole_again_s.unwrap_or(0.0)),
                |w| format!("NOT: {w}")
            )
        );
        let not_whole = row.not_whole.is_some();
        rows.push(row);
        if not_whole {
            stopped = Some(format!("not whole after step {}", step.number));
            break;
        }
    }
    let totals = Totals::of(&plan, &rows);
    let passed = stopped.is_none() && rows.len() == plan.len() && rows.iter().all(StepRow::clean);
    Ok(ChaosReport {
        seed,
        command: args.command(seed),
        bounds: args.bounds(),
        viewers: args.viewers,
        chat_clients: args.chat_clients,
        chat_rate: args.chat_rate,
        schedule: plan,
        steps: rows,
        totals,
        passed,
        stopped,
    })
}

/// One step: chat clients and viewers start, the faults come and go, the cluster becomes
/// whole, the clients stop and the acked messages are checked in PostgreSQL.
async fn run_step(ctx: &StepContext, step: &Step) -> anyhow::Result<StepRow> {
    let args = &ctx.args;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sending_tx, sending_rx) = oneshot::channel();
    let load = tokio::spawn(chat::load(LoadOptions {
        target: ctx.chat.clone(),
        clients: args.chat_clients,
        rate: args.chat_rate,
        seconds: None,
        stop: Some(stop_rx),
        drain: Duration::from_secs(20),
        ack_timeout: ctx.ack_timeout,
        epoch: Instant::now(),
        sending: Some(sending_tx),
        live: Arc::new(chat::Live::default()),
    }));
    if sending_rx.await.is_err() {
        return match load.await.context("chat load task")? {
            Err(e) => Err(e),
            Ok(_) => bail!("the chat load ended before sending"),
        };
    }
    let watch_args = streaming_clients::watch::WatchArgs {
        url: None,
        // Every LB of the local cluster, in turn, as a browser would.
        lb: Vec::new(),
        state: args.state.clone(),
        ca: None,
        seconds: args.lead_in + step.length_s().ceil() as u64 + args.settle,
        viewers: args.viewers,
        renditions: "all".into(),
        low_latency: false,
        // Spread over every broadcast, so a broadcast's fault always has viewers to move.
        pin: Some(ctx.broadcasts.join(",")),
        json: true,
    };
    let viewers = tokio::spawn(async move { streaming_clients::watch::watch(&watch_args).await });
    tokio::time::sleep(Duration::from_secs(args.lead_in)).await;

    let (primaries_stop, primaries_rx) = watch::channel(false);
    let primaries = tokio::spawn(crate::database::most_primaries(
        ctx.db_http.clone(),
        ctx.dbs.clone(),
        primaries_rx,
    ));
    let mut row = StepRow::default();
    let planned = plan(ctx, step, &mut row).await?;
    play(&args.state, planned, &mut row).await?;
    let whole = streaming_runner::whole::wait_whole(&args.state, &[], WHOLE_LIMIT).await;
    let _ = primaries_stop.send(true);
    let max_primaries = primaries.await.context("primary poll task")?;

    let watched = viewers.await.context("viewer task")??;
    let _ = stop_tx.send(true);
    let outcome = load.await.context("chat load task")??;
    let primary =
        crate::database::wait_for_primary(&ctx.db_http, &ctx.dbs, Duration::from_secs(30))
            .await
            .context("no database primary to check the step's messages on")?;
    let (db, _) = crate::database::check_db(
        &ctx.layout,
        &ctx.dbs,
        &primary,
        &ctx.chat.channel,
        &outcome.user_prefix,
        &outcome.acked,
    )
    .await?;
    let mut full = StepRow::from_parts(step, &watched, &outcome.report, &db);
    full.actions = row.actions;
    full.max_primaries = max_primaries;
    full.fault_errors = row.fault_errors;
    match whole {
        Ok(s) => full.whole_again_s = Some(s),
        Err(missing) => full.not_whole = Some(missing),
    }
    Ok(full)
}
