//! `streamctl bench lb`: what one LB costs per request its viewers' pages make.
//!
//! Once a viewer is placed, the only steady load it puts on the LBs is its page asking
//! `/api/stats` every 5 s (the LBs in turn; steering goes to the broadcast). So the figure
//! `streamctl plan` sizes LBs with is `/api/stats` requests per second per core the LB uses.
//! wrk asks one LB for it over HTTPS on keep-alive connections (a browser's page keeps its
//! HTTP/2 connection to each LB: the LBs' idle limit is 60 s, the page asks each every 10 s),
//! or with `--new-connections` a TLS handshake per request (the worst case), for a few rounds; the LB's whole process group's CPU over each
//! round gives the cost. The sources and ingests are hung meanwhile, as in `bench serve`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use streaming_core::config::Role;
use streaming_runner::cluster::Layout;
use streaming_runner::procs;

use crate::affinity::Cpus;
use crate::faults;
use crate::http_load::run_wrk;
use crate::serve::{hang_transcoders, median};

#[derive(Debug, Clone, clap::Args)]
pub struct LbArgs {
    /// State directory of the running cluster.
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// The LB to measure.
    #[arg(long, default_value = "lb1")]
    pub lb: String,
    /// Open keep-alive connections, each asking again as soon as it has its answer.
    #[arg(long, default_value_t = 200)]
    pub connections: u32,
    /// Seconds per round.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// A new TLS connection for every request (`Connection: close`): the cost when pages
    /// cannot reuse one, the worst case.
    #[arg(long)]
    pub new_connections: bool,
    /// Leave the sources and ingests running during the rounds.
    #[arg(long)]
    pub keep_transcoding: bool,
    /// Write the Markdown table here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LbReport {
    pub lb: String,
    pub connections: u32,
    pub new_connections: bool,
    pub seconds: u64,
    pub cores: usize,
    pub rounds: Vec<LbRound>,
    /// Successful requests per second per core the LB used, median over the rounds.
    pub requests_per_second_per_core: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LbRound {
    pub round: u32,
    pub requests_per_second: f64,
    pub p99_ms: f64,
    /// Answers other than 2xx/3xx plus socket errors.
    pub errors: u64,
    /// Cores the LB's processes used during the round.
    pub lb_cores: f64,
}

/// Runs the bench and prints (or writes) its report.
pub async fn run(args: LbArgs) -> anyhow::Result<()> {
    procs::which("wrk").context("wrk is needed (Debian: apt-get install -y wrk)")?;
    let layout = Layout::new(&args.state)?;
    let configs = layout.load_configs()?;
    let config = configs
        .iter()
        .find(|c| c.name == args.lb && c.me().role == Role::Lb)
        .with_context(|| format!("no LB named {} in this cluster", args.lb))?;
    let pgid = procs::live_pid(
        &layout.pid_file(&config.name),
        &layout.config_file(&config.name),
    )
    .with_context(|| format!("{} is not running", config.name))?;
    let url = format!("{}/api/stats", config.me().url);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    let headers: &[&str] = if args.new_connections {
        &["Connection: close"]
    } else {
        &[]
    };
    let hung = hang_transcoders(&args.state, &configs, args.keep_transcoding).await?;
    let mut rounds = Vec::new();
    let mut failure = None;
    for round in 1..=args.rounds {
        let cpu0 = procs::group_cpu_seconds(pgid);
        let t0 = Instant::now();
        match run_wrk(
            &url,
            args.connections,
            args.seconds,
            &Cpus::Any(cores),
            headers,
        )
        .await
        {
            Ok(wrk) => rounds.push(LbRound {
                round,
                requests_per_second: wrk.requests_per_second,
                p99_ms: wrk.p99_ms,
                errors: wrk.non_success + wrk.socket_errors,
                lb_cores: (procs::group_cpu_seconds(pgid) - cpu0) / t0.elapsed().as_secs_f64(),
            }),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    faults::resume_settled(&args.state, &hung).await;
    if let Some(e) = failure {
        return Err(e);
    }

    let report = LbReport {
        lb: config.name.clone(),
        connections: args.connections,
        new_connections: args.new_connections,
        seconds: args.seconds,
        cores,
        requests_per_second_per_core: median(rounds.iter().map(per_core).collect()),
        rounds,
    };
    crate::output::emit(args.out.as_deref(), args.json, &markdown(&report), &report)
}

/// Requests per second per core used. An error answer counts as a request (the LB did the
/// work); the bench is meant to run with none, and the table shows them.
fn per_core(r: &LbRound) -> f64 {
    r.requests_per_second / r.lb_cores.max(1e-3)
}

fn markdown(r: &LbReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} `/api/stats`, {} {} over TLS 1.3, {} s per round, {} cores shared with wrk\n",
        r.lb,
        r.connections,
        if r.new_connections {
            "connections, a new one per request"
        } else {
            "keep-alive connections"
        },
        r.seconds,
        r.cores
    );
    let _ = writeln!(
        s,
        "| round | requests/s | p99 | errors | LB cores | requests/s per core |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for x in &r.rounds {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.1} ms | {} | {:.2} | {:.0} |",
            x.round,
            x.requests_per_second,
            x.p99_ms,
            x.errors,
            x.lb_cores,
            per_core(x)
        );
    }
    let _ = writeln!(
        s,
        "\nRequests per second per core the LB used (median): {:.0}.",
        r.requests_per_second_per_core
    );
    s
}
