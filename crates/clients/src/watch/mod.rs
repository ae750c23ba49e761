//! `streamctl watch`: a real HLS viewer, many at once, with a playback buffer model.
//!
//! Each simulated viewer enters through the LB like a browser would (redirect + token), reads the
//! master playlist, picks a rendition, starts three segments behind the live edge once one
//! segment is buffered, and then downloads segment after segment while a play head advances in
//! real time. A stall is the play head reaching the end of the buffer. A request without a first
//! byte within one target duration is a failure: the viewer asks an LB for another broadcast
//! (`/api/assign?exclude=`) and continues with the same next segment there, as the page does.
//! Like the page, a viewer knows every LB (from `--lb`, the local cluster's config and the
//! `/api/cluster` of the broadcast it lands on), gives each one [`LB_ATTEMPT`] to answer (a hung
//! LB accepts the connection and says nothing), moves on from one that failed, and never gives
//! up while the run lasts.
//!
//! Everything measured here is what a viewer would feel; the figures feed the README and docs/.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use url::Url;
use viewer::{Viewer, origin_of};

mod buffer;
mod parts;
mod report;
mod viewer;

pub use buffer::BufferModel;
pub use report::{Experience, ViewerReport, WatchReport};

pub const START_BEHIND_SEGMENTS: u64 = 3;
/// Largest segment or playlist body we accept.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Redirect hops followed when entering through the LB.
const MAX_REDIRECTS: usize = 5;
/// One LB's time to connect and answer, entry or `/api/assign`: catches a hung LB quickly, and
/// a healthy one answers in milliseconds.
pub const LB_ATTEMPT: Duration = Duration::from_millis(1500);
/// Longest pause between two rounds over every LB when none gave a broadcast.
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// Every viewer has started within this long of the first one.
const ARRIVAL_SPREAD: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Entry URL (the LB's `/live/<channel>/master.m3u8`) where every viewer enters; by
    /// default the local cluster's, through each of its LBs in turn (viewer i through LB i mod n).
    pub url: Option<String>,
    /// Another LB to enter and fail over through (base URL, repeatable); the broadcast a viewer
    /// lands on names the others (`/api/cluster`). Defaults to the local cluster's LBs.
    #[arg(long = "lb", value_name = "URL")]
    pub lb: Vec<String>,
    /// State directory of `streamctl up` (for the default URL and the local CA).
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// CA certificate to trust; defaults to `<state>/tls/ca.crt`.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// How long to watch, after startup.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Simulated viewers, each with its own token, buffer and failover.
    #[arg(long, default_value_t = 1)]
    pub viewers: usize,
    /// `auto` (throughput-based ABR), `all` (viewer i takes rendition i mod n), or a rendition
    /// name such as `360p`.
    #[arg(long, default_value = "auto")]
    pub renditions: String,
    /// Start viewers on these broadcasts (host names, comma-separated; viewer i takes the
    /// i-th modulo their number) instead of the LB's choice. They still fail over through the LB.
    #[arg(long)]
    pub pin: Option<String>,
    /// Play like hls.js in low-latency mode: parts from PART-HOLD-BACK behind the newest,
    /// blocking playlist reloads, and the preload-hinted part asked for before it exists.
    #[arg(long)]
    pub low_latency: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Builds the HTTPS client a viewer uses: trusts the cluster CA, no automatic redirects (the
/// viewer follows them itself to learn its broadcast), leaving from `local` if given.
fn viewer_client(
    ca: &std::path::Path,
    local: Option<std::net::IpAddr>,
) -> anyhow::Result<reqwest::Client> {
    let builder = streaming_core::client::cluster_client_builder(ca, Duration::from_secs(10))
        .with_context(|| format!("loading CA {}", ca.display()))?;
    Ok(builder.local_address(local).build()?)
}

/// The local cluster's entry URL (through its first LB) and every LB, from the configs
/// `streamctl up` wrote.
fn local_defaults(state: &std::path::Path) -> anyhow::Result<(String, Vec<String>)> {
    let config = crate::local::any_config(state)?;
    let lbs = config.cluster.lb_urls();
    let first = lbs.first().context("cluster has no LB")?;
    let channel = config
        .cluster
        .default_channel()
        .context("cluster has no channel")?;
    Ok((format!("{first}/live/{}/master.m3u8", channel.name), lbs))
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let report = watch(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} viewer(s), {} s: startup {:.2} s, {} stalls ({:.2} s), {} errors, {} request failures, {} failovers, {} switches, {} segments, {} parts, latency {:.2} s (max {:.2} s)",
            report.viewers,
            report.seconds,
            report.felt.startup_s,
            report.felt.stalls,
            report.felt.stall_s,
            report.felt.errors,
            report.felt.request_failures,
            report.felt.failovers,
            report.felt.switches,
            report.felt.segments,
            report.felt.parts,
            report.felt.latency_s,
            report.felt.latency_max_s
        );
        println!(
            "renditions: {}; broadcasts: {}",
            report
                .felt
                .renditions
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            report
                .felt
                .broadcasts
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        for v in report.per_viewer.iter().filter(|v| v.fatal.is_some()) {
            println!(
                "viewer {}: {}",
                v.viewer,
                v.fatal.as_deref().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Runs the viewers and gathers their reports.
pub async fn watch(args: &WatchArgs) -> anyhow::Result<WatchReport> {
    let ca = args
        .ca
        .clone()
        .unwrap_or_else(|| args.state.join("tls/ca.crt"));
    let (entry, defaults) = match &args.url {
        Some(url) => (url.clone(), Vec::new()),
        None => local_defaults(&args.state)?,
    };
    let entry = Url::parse(&entry).with_context(|| format!("bad URL {entry}"))?;
    // The entry's LB first, then the others.
    let mut lbs = vec![origin_of(&entry)];
    for lb in args.lb.iter().chain(&defaults) {
        let lb = origin_of(&Url::parse(lb).with_context(|| format!("bad LB URL {lb}"))?);
        if !lbs.contains(&lb) {
            lbs.push(lb);
        }
    }
    let channel = entry
        .path_segments()
        .and_then(|mut s| {
            let first = s.next();
            if first == Some("live") {
                s.next().map(str::to_owned)
            } else {
                None
            }
        })
        .unwrap_or_else(|| "test".to_owned());
    let pins: Vec<Url> = match &args.pin {
        Some(names) => names
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|name| pin_url(&args.state, name))
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    let mut tasks = Vec::new();
    for index in 0..args.viewers.max(1) {
        let viewer = Viewer {
            index,
            client: viewer_client(&ca, crate::client_address::simulated(&entry, index))?,
            entry: entry.clone(),
            lbs: lbs.clone(),
            // A given URL is where every viewer enters; without one, viewers spread over the
            // LBs as browsers do over the addresses of the site's name.
            next_lb: if args.url.is_some() {
                0
            } else {
                index % lbs.len()
            },
            channel: channel.clone(),
            rendition_mode: args.renditions.clone(),
            low_latency: args.low_latency,
            pin: (!pins.is_empty()).then(|| pins[index % pins.len()].clone()),
            failed: Default::default(),
            report: ViewerReport {
                viewer: index,
                ..Default::default()
            },
        };
        let seconds = args.seconds;
        tasks.push(tokio::spawn(viewer.run(seconds)));
        // Spread starts a little, as real viewers arrive, but all within ARRIVAL_SPREAD: load
        // benches count on the whole audience watching at once after that.
        let gap = ARRIVAL_SPREAD / u32::try_from(args.viewers.max(1)).unwrap_or(u32::MAX);
        tokio::time::sleep(gap.min(Duration::from_millis(50))).await;
    }
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.context("viewer task panicked")?);
    }
    Ok(WatchReport::from_viewers(args.seconds, reports))
}

/// The base URL of a broadcast named in the local cluster's config.
fn pin_url(state: &std::path::Path, name: &str) -> anyhow::Result<Url> {
    let config = crate::local::host_config(state, name).context("--pin")?;
    Ok(origin_of(&Url::parse(&config.me().url)?))
}
