//! The bench's report: rounds, cores per pipeline and their ratio, and per rendition the real
//! bitrate next to SSIM and PSNR for both pipelines.

use std::fmt::Write as _;

use serde::Serialize;
use streaming_core::config::ChannelConfig;

use super::IngestArgs;
use super::quality::Score;

#[derive(Debug, Clone, Serialize)]
pub struct IngestReport {
    pub cores_available: usize,
    pub seconds: u64,
    pub warmup: u64,
    pub input_seconds: u32,
    /// Our x264 preset; the original's is veryfast (`-tune zerolatency -g 10 -crf 23`).
    pub preset: String,
    /// `matched` or `nominal` (see `--bitrates`).
    pub bitrates: String,
    pub rounds: Vec<IngestRound>,
    /// Our cores over the original's, per round.
    pub ratios: Vec<f64>,
    /// Medians over the rounds.
    pub ours_cores: f64,
    pub original_cores: f64,
    /// The offline encodes' CPU seconds per second of input: the ladder alone, no RTMP or HLS.
    pub ours_offline_cores: f64,
    pub original_offline_cores: f64,
    /// Our cores per megapixel per second of output (all renditions): the planner's
    /// `ingest_cores_per_output_mpx_s` at `preset`.
    pub ours_cores_per_output_mpx_s: f64,
    pub quality: Vec<Score>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IngestRound {
    pub round: u32,
    pub pipeline: String,
    /// Cores of the pipeline's whole process tree over the round.
    pub cores: f64,
    pub processes: String,
}

pub(super) fn summarise(
    args: &IngestArgs,
    channel: &ChannelConfig,
    quality: Vec<Score>,
    offline: [f64; 2],
    rounds: Vec<IngestRound>,
) -> IngestReport {
    let of = |p: &str| -> Vec<f64> {
        rounds
            .iter()
            .filter(|r| r.pipeline == p)
            .map(|r| r.cores)
            .collect()
    };
    let ratios = of("ours")
        .iter()
        .zip(of("original"))
        .map(|(o, n)| o / n.max(1e-6))
        .collect();
    let ours_cores = median(of("ours"));
    let mpx_s: f64 = channel
        .ladder
        .iter()
        .map(|r| f64::from(r.width * r.height) * f64::from(channel.fps) / 1e6)
        .sum();
    IngestReport {
        cores_available: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds: args.seconds,
        warmup: args.warmup,
        input_seconds: args.input_seconds,
        preset: channel.preset.clone(),
        bitrates: args.bitrates.clone(),
        ratios,
        ours_cores,
        original_cores: median(of("original")),
        original_offline_cores: offline[0],
        ours_offline_cores: offline[1],
        ours_cores_per_output_mpx_s: ours_cores / mpx_s.max(1e-6),
        quality,
        rounds,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(super) fn markdown(r: &IngestReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "One channel, 1080p25 input published with `-c copy`, {} s per round after {} s of warm-up, {} cores. \
         Ours: x264 {}, GOP 2 s, bitrates {}; the original: x264 veryfast, zerolatency, `-g 10 -crf 23`.\n",
        r.seconds, r.warmup, r.cores_available, r.preset, r.bitrates
    );
    let _ = writeln!(s, "| round | pipeline | cores | processes |");
    let _ = writeln!(s, "|---|---|---|---|");
    for x in &r.rounds {
        let _ = writeln!(
            s,
            "| {} | {} | {:.2} | {} |",
            x.round, x.pipeline, x.cores, x.processes
        );
    }
    let ratios: Vec<String> = r.ratios.iter().map(|x| format!("{x:.2}")).collect();
    let _ = writeln!(
        s,
        "\nOurs / original cores, per round: {}. Medians: ours {:.2}, original {:.2} cores \
         (offline, the ladder alone: ours {:.2}, original {:.2}). Ours: {:.4} cores per output Mpx/s.\n",
        ratios.join(", "),
        r.ours_cores,
        r.original_cores,
        r.ours_offline_cores,
        r.original_offline_cores,
        r.ours_cores_per_output_mpx_s
    );
    let _ = writeln!(
        s,
        "| rendition | original kbit/s | original SSIM | original PSNR | ours kbit/s | ours SSIM | ours PSNR |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let find = |p: &str, name: &str| {
        r.quality
            .iter()
            .find(|q| q.pipeline == p && q.rendition == name)
    };
    for o in r.quality.iter().filter(|q| q.pipeline == "original") {
        let Some(u) = find("ours", &o.rendition) else {
            continue;
        };
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.4} | {:.2} dB | {:.0} | {:.4} | {:.2} dB |",
            o.rendition, o.video_kbps, o.ssim, o.psnr_db, u.video_kbps, u.ssim, u.psnr_db
        );
    }
    s
}
