//! `streamctl bench viewers`: how many viewers one broadcast holds, and what each one costs.
//!
//! Against a running local cluster: in steps of growing audience, `watch`'s simulated viewers
//! (each its own token, TLS connection and loopback address; the HLS pattern of a player:
//! the media playlist reloaded every target duration, every segment fetched, the token renewed
//! by the broadcast in the playlist) all play one rendition from one broadcast. Each step
//! reports what the viewers felt (stalls, errors, segment fetch time) and what the broadcast
//! used over the steady part of the step (cores and resident memory of its process group, from
//! /proc), and the generator's own CPU so that its cost is seen next to what it measures. The
//! steps stop at the first one with a stall or an error: the point where it stops holding.
//!
//! The backup source and ingest are hung meanwhile (the cluster plays on from the others) so
//! that their transcoders leave the cores to the broadcast; both are resumed at the end.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use streaming_clients::watch::{WatchArgs, watch};
use streaming_core::config::Role;
use streaming_runner::cluster::Layout;
use streaming_runner::hosts::Blow;
use streaming_runner::procs;

use crate::faults;

#[derive(Debug, Clone, clap::Args)]
pub struct ViewersArgs {
    /// State directory of the running cluster.
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// The broadcast every viewer plays from.
    #[arg(long, default_value = "broadcast1")]
    pub broadcast: String,
    /// The rendition every viewer plays [default: the channel's first, the top one].
    #[arg(long)]
    pub rendition: Option<String>,
    /// Audiences to try in turn (comma-separated); the steps stop at the first that stalls.
    #[arg(long, value_delimiter = ',', default_value = "250,500,1000,2000")]
    pub steps: Vec<usize>,
    /// Watching time per step, after the viewers' startup.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Leave the backup source and ingest running.
    #[arg(long)]
    pub keep_backups: bool,
    /// Write the Markdown table here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the steps as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ViewersStep {
    pub viewers: usize,
    pub stalls: u64,
    pub stall_s: f64,
    pub errors: u64,
    pub request_failures: u64,
    pub segments: u64,
    pub segment_fetch_p50_s: f64,
    pub segment_fetch_p99_s: f64,
    /// The broadcast's cores over the steady window, and viewers per core it used.
    pub broadcast_cores: f64,
    pub viewers_per_core: f64,
    /// The broadcast's resident memory at the end of the window, and its growth per viewer
    /// over the idle broadcast.
    pub broadcast_rss_mb: f64,
    pub rss_kb_per_viewer: f64,
    /// What the viewers' simulator itself used.
    pub generator_cores: f64,
    pub holds: bool,
}

pub async fn run(args: ViewersArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.state)?;
    let configs = layout.load_configs()?;
    let config = configs
        .iter()
        .find(|c| c.name == args.broadcast && c.me().role == Role::Broadcast)
        .with_context(|| format!("no broadcast named {} in this cluster", args.broadcast))?;
    let rendition = match &args.rendition {
        Some(r) => r.clone(),
        None => config
            .cluster
            .channels
            .first()
            .and_then(|c| c.ladder.first())
            .map(|r| r.name.clone())
            .context("the cluster has no rendition")?,
    };
    let pgid = procs::live_pid(
        &layout.pid_file(&config.name),
        &layout.config_file(&config.name),
    )
    .context("the broadcast is not running")?;
    // The backups: the highest-numbered source and ingest.
    let backups: Vec<String> = if args.keep_backups {
        Vec::new()
    } else {
        [Role::Source, Role::Ingest]
            .into_iter()
            .filter_map(|role| {
                configs
                    .iter()
                    .filter(|c| c.me().role == role)
                    .map(|c| c.name.clone())
                    .max()
            })
            .collect()
    };
    for host in &backups {
        faults::kill(&args.state, host, Blow::Hang).await?;
    }
    let result = steps(&args, &rendition, pgid).await;
    faults::resume_settled(&args.state, &backups).await;
    let steps = result?;
    let table = markdown(&args, &rendition, &steps);
    crate::output::emit(args.out.as_deref(), args.json, &table, &steps)
}

async fn steps(args: &ViewersArgs, rendition: &str, pgid: i32) -> anyhow::Result<Vec<ViewersStep>> {
    let idle_rss = procs::group_rss_bytes(pgid);
    let me = std::process::id() as i32;
    let mut done = Vec::new();
    for &viewers in &args.steps {
        let watch_args = WatchArgs {
            url: None,
            lb: Vec::new(),
            state: args.state.clone(),
            ca: None,
            seconds: args.seconds,
            viewers,
            renditions: rendition.to_owned(),
            low_latency: false,
            pin: Some(args.broadcast.clone()),
            json: true,
        };
        let watching = tokio::spawn(async move { watch(&watch_args).await });
        // The steady window: after every viewer has started (`watch` spreads arrivals over 5 s),
        // before the first ones stop.
        let warmup = Duration::from_secs(8.max(args.seconds / 3));
        tokio::time::sleep(warmup).await;
        let (cpu0, gen0) = (procs::group_cpu_seconds(pgid), own_cpu(me));
        let window = Duration::from_secs(args.seconds.saturating_sub(2)).saturating_sub(warmup);
        tokio::time::sleep(window).await;
        let (cpu1, gen1) = (procs::group_cpu_seconds(pgid), own_cpu(me));
        let rss = procs::group_rss_bytes(pgid);
        let report = watching.await.context("the viewers' task")??;
        let window_s = window.as_secs_f64().max(1e-3);
        let broadcast_cores = (cpu1 - cpu0) / window_s;
        let felt = &report.felt;
        let step = ViewersStep {
            viewers,
            stalls: felt.stalls,
            stall_s: felt.stall_s,
            errors: felt.errors,
            request_failures: felt.request_failures,
            segments: felt.segments,
            segment_fetch_p50_s: report.segment_fetch_p50_s,
            segment_fetch_p99_s: report.segment_fetch_p99_s,
            broadcast_cores,
            viewers_per_core: viewers as f64 / broadcast_cores.max(1e-3),
            broadcast_rss_mb: rss as f64 / 1e6,
            rss_kb_per_viewer: rss.saturating_sub(idle_rss) as f64 / 1e3 / viewers.max(1) as f64,
            generator_cores: (gen1 - gen0) / window_s,
            holds: felt.stalls == 0 && felt.errors == 0,
        };
        let holds = step.holds;
        done.push(step);
        if !holds {
            break;
        }
    }
    Ok(done)
}

fn own_cpu(pid: i32) -> f64 {
    procs::process_usage(pid).map_or(0.0, |u| u.cpu_seconds)
}

fn markdown(args: &ViewersArgs, rendition: &str, steps: &[ViewersStep]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} ({rendition}), {} s per step, every viewer pinned to it\n",
        args.broadcast, args.seconds
    );
    let _ = writeln!(
        s,
        "| viewers | stalls | errors | segment fetch p50 / p99 | broadcast cores | viewers per core | broadcast RSS | per viewer | generator cores |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for x in steps {
        let _ = writeln!(
            s,
            "| {} | {} ({:.1} s) | {} | {:.3} / {:.3} s | {:.2} | {:.0} | {:.0} MB | {:.1} kB | {:.2} |",
            x.viewers,
            x.stalls,
            x.stall_s,
            x.errors,
            x.segment_fetch_p50_s,
            x.segment_fetch_p99_s,
            x.broadcast_cores,
            x.viewers_per_core,
            x.broadcast_rss_mb,
            x.rss_kb_per_viewer,
            x.generator_cores
        );
    }
    match steps.iter().find(|x| !x.holds) {
        Some(x) => {
            let _ = writeln!(s, "\nStopped holding at {} viewers.", x.viewers);
        }
        None => {
            let _ = writeln!(s, "\nEvery step held (0 stalls, 0 errors).");
        }
    }
    s
}
