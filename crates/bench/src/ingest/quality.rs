//! Picture quality, measured offline: each pipeline's exact ffmpeg arguments run on the input
//! file (ours: `transcode::ladder_args` fed FLV on stdin and writing MPEG-TS on stdout, as the
//! ingest runs it; the original: its `exec ffmpeg` outputs written to files instead of pushed
//! to nginx-rtmp), then every rendition compared with the input scaled to its size.
//!
//! Offline, because x264's output depends on its input frames and settings, not on the
//! clock: the same arguments on the same frames give the same pictures live, while live
//! captures would have to be aligned frame by frame across RTMP, HLS and restarts. Both
//! sides are decoded whole, so frame n of a rendition is compared with frame n of the
//! input; the counts are reported and must match.
//!
//! The reference is the input scaled with Lanczos, a better scaler than either pipeline
//! uses, so neither is favoured by being compared with its own scaler. A rendition is first
//! copied into Matroska: ffmpeg 5.1 mismatched frames when the MPEG-TS was read beside the
//! FLV input (every third frame swapped with its neighbour, a 10 dB drop that a remux
//! removes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde::Serialize;
use streaming_core::config::ChannelConfig;

use super::input::FPS;
use super::original;

/// One rendition of one pipeline against the input.
#[derive(Debug, Clone, Serialize)]
pub struct Score {
    pub pipeline: String,
    pub rendition: String,
    pub width: u32,
    pub height: u32,
    /// What the video really took (from its packets), whatever was asked for.
    pub video_kbps: f64,
    /// ffmpeg's `ssim` filter, all planes.
    pub ssim: f64,
    /// ffmpeg's `psnr` filter, average over the frames, dB.
    pub psnr_db: f64,
    pub frames: u64,
}

/// An offline encode: where its output went and the CPU it took.
pub struct Encode {
    pub files: Vec<PathBuf>,
    pub cpu_seconds: f64,
}

/// CPU seconds (user + system) of the children this process has waited for so far.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs ffmpeg to its end (stdin and stdout as given), with the CPU it used.
fn ffmpeg(args: &[String], stdin: Stdio, stdout: Stdio) -> anyhow::Result<f64> {
    let before = children_cpu_seconds();
    let output = Command::new("ffmpeg")
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .context("cannot run ffmpeg")?;
    if !output.status.success() {
        bail!(
            "ffmpeg failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(children_cpu_seconds() - before)
}

/// The original's outputs, one FLV file per rendition, top first.
pub fn encode_original(input: &Path, dir: &Path) -> anyhow::Result<Encode> {
    let file = |name: &str| dir.join(format!("original-{name}.flv"));
    let mut args: Vec<String> = ["-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i"]
        .map(String::from)
        .to_vec();
    args.push(input.display().to_string());
    args.extend(original::output_args(|r| {
        file(r.name).display().to_string()
    }));
    let cpu_seconds = ffmpeg(&args, Stdio::null(), Stdio::null())?;
    Ok(Encode {
        files: original::LADDER.iter().map(|r| file(r.name)).collect(),
        cpu_seconds,
    })
}

/// Our ladder run as the ingest runs it: the input's FLV on stdin, one MPEG-TS on stdout
/// with every rendition's video in ladder order.
pub fn encode_ours(input: &Path, channel: &ChannelConfig, dir: &Path) -> anyhow::Result<Encode> {
    let out = dir.join("ours.ts");
    let args = streaming_ingest::transcode::ladder_args(channel, 2, 0.0);
    let stdin = std::fs::File::open(input).with_context(|| format!("open {}", input.display()))?;
    let stdout = std::fs::File::create(&out)?;
    let cpu_seconds = ffmpeg(&args, stdin.into(), stdout.into())?;
    Ok(Encode {
        files: vec![out],
        cpu_seconds,
    })
}

/// Which rendition to score: its file, its video stream there, and its size and names.
pub struct Target<'a> {
    pub pipeline: &'a str,
    pub rendition: &'a str,
    pub file: &'a Path,
    pub stream: usize,
    pub width: u32,
    pub height: u32,
}

/// SSIM, PSNR and real bitrate of one rendition against the input.
pub fn score(target: &Target<'_>, input: &Path, dir: &Path) -> anyhow::Result<Score> {
    let copy = dir.join(format!(
        "score-{}-{}.mkv",
        target.pipeline, target.rendition
    ));
    let remux: Vec<String> = ["-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i"]
        .map(String::from)
        .into_iter()
        .chain([
            target.file.display().to_string(),
            "-map".into(),
            format!("0:v:{}", target.stream),
            "-c".into(),
            "copy".into(),
            copy.display().to_string(),
        ])
        .collect();
    ffmpeg(&remux, Stdio::null(), Stdio::null())?;
    let (w, h) = (target.width, target.height);
    let graph = format!(
        "[0:v]setpts=N/{FPS}/TB,split[d1][d2];\
         [1:v]scale={w}:{h}:flags=lanczos,setpts=N/{FPS}/TB,split[r1][r2];\
         [d1][r1]ssim=shortest=1;[d2][r2]psnr=shortest=1"
    );
    let output = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-i"])
        .arg(&copy)
        .arg("-i")
        .arg(input)
        .args(["-lavfi", &graph, "-f", "null", "-"])
        .output()
        .context("cannot run ffmpeg")?;
    let log = String::from_utf8_lossy(&output.stderr);
    let ssim = number_after(&log, "SSIM Y:", "All:").context("no SSIM in ffmpeg's output")?;
    let psnr_db =
        number_after(&log, "PSNR y:", "average:").context("no PSNR in ffmpeg's output")?;
    let (bytes, frames) = packet_bytes(&copy)?;
    let _ = std::fs::remove_file(&copy);
    Ok(Score {
        pipeline: target.pipeline.to_owned(),
        rendition: target.rendition.to_owned(),
        width: w,
        height: h,
        video_kbps: bytes as f64 * 8.0 / (frames.max(1) as f64 / f64::from(FPS)) / 1000.0,
        ssim,
        psnr_db,
        frames,
    })
}

/// The number after `field` on the last line holding `line_mark` (ffmpeg's summary lines).
fn number_after(log: &str, line_mark: &str, field: &str) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(line_mark))?;
    let rest = &line[line.find(field)? + field.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Total size and count of the video packets of a one-stream file.
fn packet_bytes(file: &Path) -> anyhow::Result<(u64, u64)> {
    let output = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "packet=size", "-of", "csv=p=0"])
        .arg(file)
        .output()
        .context("cannot run ffprobe")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let sizes: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split(',').next()?.trim().parse().ok())
        .collect();
    Ok((sizes.iter().sum(), sizes.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffmpeg_summaries_are_read() {
        let log = "frame=  500 fps=40\n\
            [Parsed_ssim_4 @ 0x55] SSIM Y:0.993110 (21.618) U:0.990 (20.0) V:0.991 (20.5) All:0.992612 (21.315)\n\
            [Parsed_psnr_5 @ 0x56] PSNR y:43.1 u:45.0 v:46.2 average:43.888481 min:38.2 max:50.1\n";
        assert_eq!(number_after(log, "SSIM Y:", "All:"), Some(0.992612));
        assert_eq!(number_after(log, "PSNR y:", "average:"), Some(43.888481));
        assert_eq!(number_after(log, "PSNR y:", "nothing:"), None);
        assert_eq!(number_after("", "SSIM Y:", "All:"), None);
    }
}
