//! The one input both pipelines get: a 1080p25 H.264 + AAC FLV file made once with ffmpeg's
//! own generators, so it needs no download and is the same on every machine with the same
//! ffmpeg.
//!
//! The picture gives the encoder real work without being noise: a pan across a detailed
//! Mandelbrot still (smooth gradients and fine edges, sub-pixel motion), ffmpeg's `testsrc2`
//! moving across it (flat colours, sharp edges, a burnt-in clock and frame counter), a rotating
//! detail of the same still (motion that block matching cannot follow exactly), and light
//! temporal noise as a camera has. It is encoded as an OBS-like publisher sends it: 6 Mbit/s,
//! a keyframe every 2 s, two B-frames. The audio is a beeping sine.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Input frame rate: the channel's (25 fps) and the original pipeline's.
pub const FPS: u32 = 25;
/// Input picture size.
pub const WIDTH: u32 = 1920;
pub const HEIGHT: u32 = 1080;

/// The lavfi graph of the picture and sound, outputs `[v]` and `[a]`.
pub fn graph() -> String {
    format!(
        "mandelbrot=s=3840x2160:end_scale=0.02:end_pts=1:outer=normalized_iteration_count:rate={FPS},\
         trim=end_frame=1,loop=loop=-1:size=1,setpts=N/{FPS}/TB,split[m1][m2];\
         [m1]crop={WIDTH}:{HEIGHT}:x='960+900*sin(t/3)':y='540+500*sin(t/4.1)'[bg];\
         [m2]crop=1280:1280:x=1700:y=500,rotate=a='t/3':ow=960:oh=640:c=black[rot];\
         testsrc2=s=960x540:r={FPS}[ts];\
         [bg][ts]overlay=x='480+400*sin(t)':y=60[a];\
         [a][rot]overlay=x='160+150*sin(t/2)':y=420:format=auto,noise=alls=3:allf=t,format=yuv420p[v];\
         sine=f=440:beep_factor=4:sample_rate=48000,aformat=channel_layouts=stereo[a]"
    )
}

/// The input file of `seconds` in `dir`, made unless already there (a file of that name
/// holds that content: the name carries the length and a version of the graph).
pub fn ensure(dir: &Path, seconds: u32) -> anyhow::Result<PathBuf> {
    let file = dir.join(format!("source-v1-{seconds}s.flv"));
    if file.exists() {
        return Ok(file);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let partial = file.with_extension("partial.flv");
    eprintln!("bench ingest: making the {seconds} s 1080p25 input (once)...");
    let status = Command::new("ffmpeg")
        .args(["-hide_banner", "-nostdin", "-loglevel", "error", "-y"])
        .arg("-filter_complex")
        .arg(graph())
        .args(["-map", "[v]", "-map", "[a]", "-t", &seconds.to_string()])
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-g", "50", "-bf", "2",
        ])
        .args(["-b:v", "6M", "-maxrate", "6M", "-bufsize", "12M"])
        .args(["-c:a", "aac", "-b:a", "128k", "-f", "flv"])
        .arg(&partial)
        .status()
        .context("cannot run ffmpeg")?;
    if !status.success() {
        bail!("ffmpeg could not make the input: {status}");
    }
    std::fs::rename(&partial, &file)?;
    Ok(file)
}
