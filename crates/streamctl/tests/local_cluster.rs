//! End to end through the real binaries: `streamctl up` starts every host of cluster.nix on
//! loopback, a viewer watches through an LB, ffprobe reads the ladder, a wrong stream key is
//! refused while the stream plays on, a transcoder crash does not break the playlist, and
//! `streamctl down` leaves no process behind.
//!
//! Needs ffmpeg, ffprobe and nix-instantiate (scripts/setup-debian.sh installs them) and the
//! workspace binaries built next to streamctl (`cargo build --workspace`), so it is `#[ignore]`d
//! in a bare `cargo test`; scripts/test.sh runs it with `--include-ignored`, one cluster at a time.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Loopback prefix of this test's cluster: not 127.77, so a developer's own cluster may keep
/// running while the tests do.
const PREFIX: &str = "127.76";

mod common;
use common::{Cluster, json_of, run, streamctl};

/// Processes whose command line mentions the state dir (every host, the ingests' ffmpeg) or
/// this cluster's RTMP addresses (the sources' ffmpeg).
fn processes_left(dir: &Path) -> Vec<String> {
    let needles = [
        dir.to_string_lossy().to_string(),
        format!("rtmp://{PREFIX}."),
    ];
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if needles.iter().any(|n| cmdline.contains(n.as_str())) {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
    }
    found
}

fn watch(state: &Path, seconds: u64, viewers: usize) -> Value {
    json_of(&run(streamctl()
        .args(["watch", "--json", "--renditions", "all"])
        .arg("--seconds")
        .arg(seconds.to_string())
        .arg("--viewers")
        .arg(viewers.to_string())
        .arg("--state")
        .arg(state)))
}

fn assert_clean_watch(report: &Value, what: &str) {
    assert_eq!(report["stalls"], 0, "{what}: stalls in {report:#}");
    assert_eq!(report["errors"], 0, "{what}: errors in {report:#}");
    assert!(
        report["segments"].as_u64().unwrap() > 0,
        "{what}: no segment in {report:#}"
    );
}

/// An origin media playlist read with the cluster key: (media sequence, segments listed).
fn origin_sequence(state: &Path, ingest_url: &str, channel: &str, rendition: &str) -> (u64, usize) {
    let key = std::fs::read_to_string(state.join("secrets/cluster.key")).unwrap();
    let output = run(Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
        .arg(state.join("tls/ca.crt"))
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", key.trim()))
        .arg(format!(
            "{ingest_url}/origin/{channel}/{rendition}/index.m3u8"
        )));
    let playlist = streaming_hls::parse_media(&String::from_utf8_lossy(&output.stdout)).unwrap();
    (playlist.media_sequence, playlist.segments.len())
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate and the workspace binaries (scripts/test.sh)"]
fn local_cluster_streams_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _cluster = Cluster {
        state: state.clone(),
    };

    // Up: every host as real processes, until the stream plays through an LB.
    let started = Instant::now();
    let up = common::up(&state, PREFIX, None);
    eprintln!("up took {:.1} s: {up:#}", started.elapsed().as_secs_f64());
    let playlist_url = up["playlist_url"]
        .as_str()
        .expect("playlist_url")
        .to_owned();
    let ca_cert = up["ca_cert"].as_str().expect("ca_cert").to_owned();
    assert!(
        up["viewer_url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("https://{PREFIX}.1."))
    );
    assert!(Path::new(&ca_cert).exists());

    // A viewer per rendition for 30 s through the LB: no stall, no error, the whole ladder.
    let report = watch(&state, 30, 3);
    eprintln!("watch: {report:#}");
    assert_clean_watch(&report, "steady state");
    let renditions: Vec<&str> = report["renditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        renditions.len(),
        3,
        "every rendition fetched: {renditions:?}"
    );
    let latency = report["latency_s"].as_f64().unwrap();
    assert!(latency > 0.0, "latency is measured: {latency}");

    // ffprobe through the LB URL (follows the redirect, token in every URI): the whole ladder.
    let probe = run(Command::new("ffprobe")
        .args(["-v", "error", "-of", "json", "-show_streams", "-ca_file"])
        .arg(&ca_cert)
        .args(["-tls_verify", "1"])
        .arg(&playlist_url));
    let probe: Value = serde_json::from_slice(&probe.stdout).unwrap();
    let streams = probe["streams"].as_array().unwrap();
    let mut sizes: Vec<(u64, u64)> = streams
        .iter()
        .filter(|s| s["codec_type"] == "video")
        .map(|s| (s["width"].as_u64().unwrap(), s["height"].as_u64().unwrap()))
        .collect();
    sizes.sort();
    sizes.dedup();
    assert_eq!(
        sizes,
        vec![(256, 144), (426, 240), (640, 360)],
        "ffprobe video variants: {probe:#}"
    );
    assert!(
        streams
            .iter()
            .any(|s| s["codec_type"] == "audio" && s["codec_name"] == "aac"),
        "ffprobe finds AAC audio: {probe:#}"
    );

    // A publish with a wrong key is refused and logged, and the real stream plays on.
    let ingest1 = format!("{PREFIX}.4.1");
    let wrong = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg("testsrc2=size=320x180:rate=25")
        .args([
            "-t",
            "5",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-f",
            "flv",
        ])
        .arg(format!(
            "rtmp://{ingest1}:1935/live/test?key=not-the-key&source=intruder"
        ))
        .output()
        .unwrap();
    assert!(
        !wrong.status.success(),
        "a publish with a wrong key must fail"
    );
    let ingest_log = std::fs::read_to_string(state.join("logs/ingest1.log")).unwrap_or_default()
        + &std::fs::read_to_string(state.join("logs/ingest1.out")).unwrap_or_default();
    assert!(
        ingest_log.contains("wrong stream key"),
        "ingest1 logs the refusal clearly; log tail: {}",
        &ingest_log[ingest_log.len().saturating_sub(2000)..]
    );
    assert_clean_watch(&watch(&state, 8, 1), "after a wrong-key publish");

    // Killing ingest1's transcoder: restarted, and its playlist keeps moving forward.
    let ingest_url = format!("https://{ingest1}:8443");
    let before = origin_sequence(&state, &ingest_url, "test", "360p");
    run(streamctl()
        .args(["kill", "ingest1", "--ffmpeg", "--state"])
        .arg(&state));
    let report = watch(&state, 14, 1);
    assert_eq!(
        report["errors"], 0,
        "ffmpeg crash: viewer errors in {report:#}"
    );
    let after = origin_sequence(&state, &ingest_url, "test", "360p");
    // One segment per slot (a slate fills the restart), so the list is whole and has moved on.
    assert!(
        after.0 >= before.0 + 7,
        "ingest1 playlist moves on: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.1, before.1,
        "ingest1 lists a gap-free window: {before:?} -> {after:?}"
    );

    // Down leaves nothing behind: hosts and ffmpeg children.
    run(streamctl().arg("down").arg("--state").arg(&state));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = processes_left(&state);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        left = processes_left(&state);
    }
    assert!(left.is_empty(), "processes left after down: {left:#?}");
}
