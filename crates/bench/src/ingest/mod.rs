//! `streamctl bench ingest`: our ingest against the original pipeline (nginx-rtmp with its
//! `exec ffmpeg` ladder) on the same input: the cores each pipeline uses per channel, and the
//! picture quality and real bitrate of each rendition, so that a cheaper encode only counts
//! when the pictures are as good.
//!
//! Standalone: the bench generates its own ingest config from `cluster.nix` at an address
//! prefix of its own (no running cluster is needed or touched), with the channel's ladder
//! replaced by the original's renditions (720p, 480p, 360p) at the bitrates the original
//! really produced on this input (`--bitrates matched`; its `-crf 23` overrides the `-b:v`
//! it names), so both spend about the same bits.
//!
//! 1. The input: a 1080p25 H.264 + AAC file made once ([`input`]).
//! 2. Quality, offline ([`quality`]): each pipeline's exact ffmpeg arguments on the file,
//!    SSIM and PSNR of each rendition against the input scaled to its size.
//! 3. CPU, live: our ingest and nginx-rtmp run side by side, idle; in alternating rounds
//!    (ours first) an ffmpeg publisher sends the file in real time (`-re -stream_loop -1
//!    -c copy`) to one of them; after a warm-up, the cores of that pipeline's whole process
//!    tree (ingest + its ffmpeg; nginx master, workers + the exec'ed ffmpeg) are measured
//!    over the round. The publisher's own CPU is not counted.

mod input;
mod original;
mod ours;
mod quality;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use streaming_core::config::{ChannelConfig, Rendition};
use streaming_runner::procs;

pub use report::{IngestReport, IngestRound};

#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// The cluster file the ingest's config is generated from.
    #[arg(long, default_value = "cluster.nix")]
    pub cluster: PathBuf,
    /// Loopback prefix of the bench's ingest and nginx-rtmp (away from a running cluster's).
    #[arg(long, default_value = "127.86")]
    pub address_prefix: String,
    /// Rounds: each measures our ingest, then the original.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seconds measured per round and pipeline, after the warm-up.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Seconds of publishing before the measurement starts (ffmpeg starting, HLS filling).
    #[arg(long, default_value_t = 8)]
    pub warmup: u64,
    /// Length of the input file (the publisher loops it); quality is scored over all of it.
    #[arg(long, default_value_t = 20)]
    pub input_seconds: u32,
    /// Our ladder's bitrates: `matched` (what the original really produced on the input) or
    /// `nominal` (the original's `-b:v`, which its `-crf 23` ignores).
    #[arg(long, default_value = "matched", value_parser = ["matched", "nominal"])]
    pub bitrates: String,
    /// Our x264 preset [default: the channel's production preset in the cluster file].
    #[arg(long)]
    pub preset: Option<String>,
    /// The ingest binary to measure [default: the one beside streamctl].
    #[arg(long)]
    pub ingest: Option<PathBuf>,
    /// Where the input is kept between runs and the bench's files go.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("streaming-bench-ingest"))]
    pub work: PathBuf,
    /// Write the Markdown table here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    for tool in ["ffmpeg", "ffprobe", "nginx"] {
        streaming_runner::procs::which(tool).with_context(|| {
            format!(
                "{tool} is needed (Debian: apt-get install -y ffmpeg nginx-light libnginx-mod-rtmp)"
            )
        })?;
    }
    let work = args.work.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = bench(&args, &work).await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("bench ingest: its files are kept in {}", work.display());
    }
    let report = result?;
    let table = report::markdown(&report);
    crate::output::emit(args.out.as_deref(), args.json, &table, &report)
}

async fn bench(args: &IngestArgs, work: &Path) -> anyhow::Result<IngestReport> {
    let cluster = std::fs::canonicalize(&args.cluster)
        .with_context(|| format!("cluster file {}", args.cluster.display()))?;
    let input = input::ensure(&args.work, args.input_seconds)?;
    eprintln!("bench ingest: quality, offline (the original, then ours)...");
    let original = quality::encode_original(&input, work)?;
    let mut scores = Vec::new();
    for (rung, file) in original::LADDER.iter().zip(&original.files) {
        scores.push(quality::score(
            &quality::Target {
                pipeline: "original",
                rendition: rung.name,
                file,
                stream: 0,
                width: rung.width,
                height: original::height_of(rung),
            },
            &input,
            work,
        )?);
    }
    let channel = our_channel(args, &cluster, &scores)?;
    let ours = quality::encode_ours(&input, &channel, work)?;
    for (i, r) in channel.ladder.iter().enumerate() {
        scores.push(quality::score(
            &quality::Target {
                pipeline: "ours",
                rendition: &r.name,
                file: &ours.files[0],
                stream: i,
                width: r.width,
                height: r.height,
            },
            &input,
            work,
        )?);
    }
    let offline = [original.cpu_seconds, ours.cpu_seconds]
        .map(|cpu| cpu / f64::from(args.input_seconds.max(1)));
    let rounds = live_rounds(args, &cluster, &channel, &input, work).await?;
    Ok(report::summarise(args, &channel, scores, offline, rounds))
}

/// The bench's channel: the original's renditions at the chosen bitrates, our x264 preset.
fn our_channel(
    args: &IngestArgs,
    cluster: &Path,
    original: &[quality::Score],
) -> anyhow::Result<ChannelConfig> {
    let production = streaming_runner::cluster::evaluate_production(
        &streaming_runner::cluster::find_generator(cluster)?,
        cluster,
    )?;
    let base = production
        .channels
        .first()
        .context("the cluster file declares no channel")?;
    let ladder = original::LADDER
        .iter()
        .zip(original)
        .map(|(rung, score)| Rendition {
            name: rung.name.to_owned(),
            width: rung.width,
            height: original::height_of(rung),
            video_kbps: match args.bitrates.as_str() {
                // To 10 kbit/s: what the original spent, not more.
                "matched" => (score.video_kbps / 10.0).round() as u32 * 10,
                _ => rung.video_kbps,
            },
        })
        .collect();
    Ok(ChannelConfig {
        name: base.name.clone(),
        fps: input::FPS,
        preset: args.preset.clone().unwrap_or_else(|| base.preset.clone()),
        // One AAC stream for every rendition, at the original's top audio bitrate.
        audio_kbps: original::LADDER[0].audio_kbps,
        ladder,
    })
}

/// Both pipelines started, then the alternating rounds; both stopped whatever happens.
async fn live_rounds(
    args: &IngestArgs,
    cluster: &Path,
    channel: &ChannelConfig,
    input: &Path,
    work: &Path,
) -> anyhow::Result<Vec<IngestRound>> {
    let config = ours::prepare(cluster, &args.address_prefix, work, channel.clone())?;
    eprintln!("bench ingest: starting our ingest (slates first) and nginx-rtmp...");
    let mut ours = ours::OurIngest::start(&config, args.ingest.as_deref(), work)?;
    let me = config.me();
    let nginx_addr = std::net::SocketAddr::new(me.address, me.ports.rtmp + 1000);
    let ffmpeg = streaming_runner::procs::which("ffmpeg").context("ffmpeg")?;
    let mut nginx = original::NginxRtmp::start(nginx_addr, work, &ffmpeg)?;
    let mut rounds = Vec::new();
    let mut result = Ok(());
    'rounds: for round in 1..=args.rounds {
        for pipeline in ["ours", "original"] {
            let (url, root) = match pipeline {
                "ours" => (ours.publish_url().to_owned(), ours.pid()),
                _ => (nginx.publish_url(), nginx.pid()),
            };
            eprintln!("bench ingest: round {round}, {pipeline}...");
            match measure(args, input, &url, root, work).await {
                Ok(m) => rounds.push(IngestRound {
                    round,
                    pipeline: pipeline.to_owned(),
                    cores: m.cores,
                    processes: m.processes,
                }),
                Err(e) => {
                    result = Err(e.context(format!("round {round}, {pipeline}")));
                    break 'rounds;
                }
            }
        }
    }
    if result.is_ok() && !has_hls(&nginx.hls_dir) {
        result = Err(anyhow::anyhow!(
            "nginx-rtmp wrote no HLS for every rendition: the original did not run"
        ));
    }
    ours.stop();
    nginx.stop();
    result.map(|()| rounds)
}

/// What one round measured.
struct Measured {
    cores: f64,
    /// Processes of the pipeline's tree at the end of the round, e.g. `ingest, ffmpeg`.
    processes: String,
}

/// One round: publish, warm up, measure the tree under `root`, stop publishing, cool down.
async fn measure(
    args: &IngestArgs,
    input: &Path,
    url: &str,
    root: i32,
    work: &Path,
) -> anyhow::Result<Measured> {
    let mut publisher = Publisher::start(input, url, work)?;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let (cpu0, t0) = (tree_cpu_seconds(root), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let (cpu1, wall) = (tree_cpu_seconds(root), t0.elapsed().as_secs_f64());
    let names = tree(root).into_iter().map(|s| s.comm).collect::<Vec<_>>();
    let alive = publisher.alive();
    publisher.stop();
    // The pipeline goes idle (its ffmpeg ends) before the other one is measured.
    tokio::time::sleep(Duration::from_secs(3)).await;
    if !alive {
        bail!("the publisher stopped: {}", publisher.log());
    }
    if !names.iter().any(|n| n == "ffmpeg") {
        bail!(
            "no ffmpeg transcoding under the pipeline ({})",
            names.join(", ")
        );
    }
    Ok(Measured {
        cores: (cpu1 - cpu0) / wall.max(1e-3),
        processes: names.join(", "),
    })
}

/// `pid` and every process descending from it.
fn tree(pid: i32) -> Vec<procs::Stat> {
    let all = procs::all();
    let mut members: Vec<procs::Stat> = all.iter().filter(|s| s.pid == pid).cloned().collect();
    let mut i = 0;
    while i < members.len() {
        let parent = members[i].pid;
        members.extend(all.iter().filter(|s| s.ppid == parent).cloned());
        i += 1;
    }
    members.retain(|s| !matches!(s.state, 'Z' | 'X'));
    members
}

/// CPU seconds so far of the live processes of `pid`'s tree.
fn tree_cpu_seconds(pid: i32) -> f64 {
    tree(pid)
        .iter()
        .filter_map(|s| procs::process_usage(s.pid))
        .map(|u| u.cpu_seconds)
        .sum()
}

/// Whether nginx-rtmp wrote a playlist for every rendition.
fn has_hls(dir: &Path) -> bool {
    original::LADDER
        .iter()
        .all(|r| dir.join(format!("test_{}.m3u8", r.name)).exists())
}

/// The publisher: ffmpeg sending the input in real time, as it is, looped.
struct Publisher {
    child: Child,
    log: PathBuf,
}

impl Publisher {
    fn start(input: &Path, url: &str, work: &Path) -> anyhow::Result<Self> {
        let log = work.join("publisher.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new("ffmpeg")
            .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-re"])
            .args(["-stream_loop", "-1", "-i"])
            .arg(input)
            .args(["-c", "copy", "-f", "flv", url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("cannot start the publisher")?;
        Ok(Self { child, log })
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop();
    }
}
