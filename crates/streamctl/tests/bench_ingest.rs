//! The ingest bench in short form (docs/benchmarks.md has the real run): our ingest and the
//! original nginx-rtmp + `exec ffmpeg` pipeline both take the publish and transcode it, each
//! round measures the cores of both, and every rendition of both is scored against the input
//! at about the same bitrate. It checks that the bench works, not the figures.
//!
//! Standalone (no cluster): needs ffmpeg, ffprobe, nix-instantiate, nginx with the RTMP module
//! (scripts/setup-debian.sh) and the ingest binary built next to streamctl, so it is
//! `#[ignore]`d in a bare `cargo test`. About 2 minutes on 2 cores once the input is made
//! (the first run makes a 10 s 1080p input, about a minute more).

#[allow(dead_code)] // the cluster helpers are for the other tests
mod common;
use common::{json_of, repo_root, run, streamctl};

/// Loopback prefix of the bench's ingest and nginx-rtmp.
const PREFIX: &str = "127.86";

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate, nginx-rtmp and the workspace binaries (scripts/test.sh)"]
fn bench_ingest_short_form_measures_both_pipelines() {
    let tmp = tempfile::tempdir().unwrap();
    let report = json_of(&run(streamctl()
        .current_dir(repo_root())
        .args(["bench", "ingest", "--rounds", "1", "--seconds", "5"])
        .args(["--warmup", "4", "--input-seconds", "6", "--json"])
        .args(["--address-prefix", PREFIX, "--work"])
        .arg(tmp.path())));
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{report:#}");
    for round in rounds {
        assert!(round["cores"].as_f64().unwrap() > 0.1, "{report:#}");
        assert!(
            round["processes"].as_str().unwrap().contains("ffmpeg"),
            "{report:#}"
        );
    }
    let quality = report["quality"].as_array().unwrap();
    assert_eq!(quality.len(), 6, "3 renditions, 2 pipelines: {report:#}");
    for score in quality {
        assert!(
            score["frames"].as_u64().unwrap() >= 145,
            "every frame scored: {report:#}"
        );
        assert!(score["ssim"].as_f64().unwrap() > 0.9, "{report:#}");
        assert!(score["video_kbps"].as_f64().unwrap() > 100.0, "{report:#}");
    }
}
