//! High availability end to end through the real binaries: both ingests publish one timeline,
//! the failover matrix (short windows) leaves viewers with 0 stalls and 0 errors, a broadcast
//! and an ingest are added and removed while the cluster runs, and live media that stops inside
//! a slot is followed by the slate in the same segment.
//!
//! `#[ignore]`d in a bare `cargo test` (needs ffmpeg, ffprobe, nix-instantiate and the workspace
//! binaries); scripts/test.sh runs it with `--include-ignored`, one cluster at a time.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Loopback prefix of this test's cluster (127.76 is the other end-to-end test's).
const PREFIX: &str = "127.73";

mod common;
use common::{LocalCluster, json_of, repo_root, run, streamctl};

fn curl(state: &Path, url: &str, bearer: Option<&str>) -> Vec<u8> {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--fail", "--max-time", "10", "--cacert"])
        .arg(state.join("tls/ca.crt"));
    if let Some(key) = bearer {
        command
            .arg("-H")
            .arg(format!("Authorization: Bearer {key}"));
    }
    run(command.arg(url)).stdout
}

/// `/status` of a host, asked from lb1's address: status pages answer cluster hosts only.
fn status_of(state: &Path, url: &str) -> Value {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--fail", "--max-time", "10", "--interface"])
        .arg(format!("{PREFIX}.1.1"))
        .arg("--cacert")
        .arg(state.join("tls/ca.crt"));
    serde_json::from_slice(&run(command.arg(url)).stdout).unwrap()
}

/// First video PTS of a segment, in seconds (ffprobe on the bytes).
fn first_video_pts(bytes: &[u8], scratch: &Path) -> f64 {
    std::fs::write(scratch, bytes).unwrap();
    let out = run(Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "packet=pts_time",
            "-read_intervals",
            "%+#1",
            "-of",
            "csv=p=0",
        ])
        .arg(scratch));
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .trim_end_matches(',');
    first
        .parse()
        .unwrap_or_else(|e| panic!("ffprobe pts {first:?}: {e}"))
}

fn watch(state: &Path, seconds: u64, pin: Option<&str>) -> Value {
    let mut command = streamctl();
    command
        .args(["watch", "--json", "--viewers", "2", "--seconds"])
        .arg(seconds.to_string())
        .arg("--state")
        .arg(state);
    if let Some(pin) = pin {
        command.args(["--pin", pin]);
    }
    json_of(&run(&mut command))
}

fn watch_low_latency(state: &Path, seconds: u64) -> Value {
    json_of(&run(streamctl()
        .args([
            "watch",
            "--json",
            "--low-latency",
            "--viewers",
            "2",
            "--seconds",
        ])
        .arg(seconds.to_string())
        .arg("--state")
        .arg(state)))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn lb_broadcasts(state: &Path) -> Vec<(String, bool)> {
    let status = status_of(state, &format!("https://{PREFIX}.1.1:8443/status"));
    status["broadcasts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["eligible"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate and the workspace binaries (scripts/test.sh)"]
fn any_one_host_may_fail_and_the_topology_may_change() {
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    let cluster_file = cluster.dir().join("cluster.nix");
    std::fs::copy(repo_root().join("cluster.nix"), &cluster_file).unwrap();
    cluster.up(PREFIX, Some(&cluster_file), &[]);
    // Let both ingests settle on source1 and fill their windows.
    let settled = watch(&state, 8, None);
    assert_eq!(settled["errors"], 0, "{settled:#}");

    // One timeline: the same sequence numbers carry the same PROGRAM-DATE-TIME and the same
    // media time on both ingests.
    let key = std::fs::read_to_string(state.join("secrets/cluster.key")).unwrap();
    let key = key.trim();
    let playlist = |ingest: u8| {
        let body = curl(
            &state,
            &format!("https://{PREFIX}.4.{ingest}:8443/origin/test/360p/index.m3u8"),
            Some(key),
        );
        streaming_hls::parse_media(&String::from_utf8_lossy(&body)).unwrap()
    };
    let (one, two) = (playlist(1), playlist(2));
    let common: Vec<_> = one
        .segments
        .iter()
        .filter_map(|a| two.segments.iter().find(|b| b.seq == a.seq).map(|b| (a, b)))
        .collect();
    assert!(
        common.len() >= 4,
        "both ingests list the same slots: {one:?} / {two:?}"
    );
    for (a, b) in &common {
        assert_eq!(
            a.program_date_time_ms, b.program_date_time_ms,
            "slot {}",
            a.seq
        );
    }
    // And the same parts: the slots whose parts both list have the same number of parts with
    // the same durations and the same independent part.
    let parts = |p: &streaming_hls::ParsedMedia, seq| -> Vec<(u32, String, bool)> {
        p.low_latency
            .parts_of(seq)
            .map(|part| {
                (
                    part.index,
                    format!("{:.3}", part.duration_s),
                    part.independent,
                )
            })
            .collect()
    };
    let with_parts: Vec<u64> = common
        .iter()
        .map(|(a, _)| a.seq)
        .filter(|seq| !parts(&one, *seq).is_empty() && !parts(&two, *seq).is_empty())
        .collect();
    assert!(!with_parts.is_empty(), "no slot with parts on both ingests");
    for seq in with_parts {
        assert_eq!(parts(&one, seq), parts(&two, seq), "parts of slot {seq}");
    }
    let (a, _) = common[common.len() - 2];
    // Init segment + segment: what a player reads.
    let segment = |ingest: u8| {
        let file = |name: &str| {
            curl(
                &state,
                &format!("https://{PREFIX}.4.{ingest}:8443/origin/test/360p/{name}"),
                Some(key),
            )
        };
        let mut bytes = file(a.map.as_deref().expect("segments name their init segment"));
        bytes.extend(file(&streaming_hls::names::segment(a.seq)));
        bytes
    };
    let scratch = cluster.dir().join("segment.mp4");
    let (pts1, pts2) = (
        first_video_pts(&segment(1), &scratch),
        first_video_pts(&segment(2), &scratch),
    );
    assert!(
        (pts1 - pts2).abs() <= 0.041,
        "segment {} starts at {pts1} on ingest1 and {pts2} on ingest2",
        a.seq
    );

    // The failover matrix, short windows: every fault once, 0 stalls and 0 errors; but the
    // rows other end-to-end tests already run with the same assertions (the publisher's
    // ingest: publish_failover; the cut-off database primary: partition), to keep CI short.
    let rows_run: Vec<String> = streaming_bench::failover::matrix()
        .into_iter()
        .map(|f| f.name)
        .filter(|n| !n.starts_with("publisher-") && !n.starts_with("db-primary-cut"))
        .collect();
    let rows = json_of(&run(streamctl()
        .args([
            "bench",
            "failover",
            "--json",
            "--viewers",
            "20",
            "--seconds",
            "13",
            "--fault-after",
            "4",
            "--fault-for",
            "6",
            "--only",
            &rows_run.join(","),
            "--state",
        ])
        .arg(&state)));
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), rows_run.len(), "every fault asked for ran");
    for row in rows {
        let name = &row["fault"]["name"];
        assert_eq!(row["stalls"], 0, "{name}: {row:#}");
        assert_eq!(row["errors"], 0, "{name}: {row:#}");
        assert!(
            row["whole_again_s"].is_number(),
            "{name}: the cluster became whole again: {row:#}"
        );
    }
    let crash = rows
        .iter()
        .find(|r| r["fault"]["mode"] == "crash")
        .expect("the crash row");
    eprintln!("crash row: {crash}");
    assert!(
        crash["restarted_s"].is_number(),
        "the runner restarted the crashed ingest: {crash:#}"
    );
    let moved: u64 = rows.iter().map(|r| r["failovers"].as_u64().unwrap()).sum();
    assert!(
        moved > 0,
        "viewers on the faulty broadcast moved: {rows:#?}"
    );

    // Topology: add broadcast5 and ingest3 to the list, use them, then take them out for good.
    let text = std::fs::read_to_string(&cluster_file).unwrap();
    let extra = r#"
    { name = "broadcast5"; role = "broadcast"; address = "192.0.2.25"; uplinkMbps = 1000; }
    { name = "ingest3"; role = "ingest"; address = "192.0.2.43"; }
  ];
}"#;
    let grown = text
        .trim_end()
        .trim_end_matches('}')
        .trim_end()
        .trim_end_matches("];")
        .to_owned()
        + extra;
    std::fs::write(&cluster_file, &grown).unwrap();
    run(streamctl().args(["add", "ingest3", "--state"]).arg(&state));
    run(streamctl()
        .args(["add", "broadcast5", "--state"])
        .arg(&state));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !lb_broadcasts(&state).contains(&("broadcast5".to_owned(), true)) {
        assert!(
            std::time::Instant::now() < deadline,
            "lb1 uses broadcast5: {:?}",
            lb_broadcasts(&state)
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    let on_new = watch(&state, 8, Some("broadcast5"));
    assert_eq!(
        (on_new["stalls"].as_u64(), on_new["errors"].as_u64()),
        (Some(0), Some(0)),
        "{on_new:#}"
    );
    assert!(
        on_new["broadcasts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == "broadcast5"),
        "{on_new:#}"
    );
    let ingest3 = status_of(&state, &format!("https://{PREFIX}.4.3:8443/status"));
    assert!(
        ingest3["channels"]["test"]["last_slot"].is_number(),
        "ingest3 emits the timeline: {ingest3:#}"
    );

    run(streamctl()
        .args(["drain", "broadcast5", "--state"])
        .arg(&state));
    std::fs::write(&cluster_file, &text).unwrap();
    run(streamctl().args(["sync", "--state"]).arg(&state));
    let names: Vec<String> = lb_broadcasts(&state).into_iter().map(|(n, _)| n).collect();
    assert!(
        !names.contains(&"broadcast5".to_owned()),
        "broadcast5 is gone from lb1: {names:?}"
    );
    let after = watch(&state, 8, None);
    assert_eq!(
        (after["stalls"].as_u64(), after["errors"].as_u64()),
        (Some(0), Some(0)),
        "{after:#}"
    );
    let status = json_of(&run(streamctl()
        .args(["status", "--json", "--state"])
        .arg(&state)));
    assert!(
        !status
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == "ingest3" || h["name"] == "broadcast5"),
        "removed hosts are gone: {status:#}"
    );

    // Live media that stops inside a slot, with nobody to take over (both sources hung), leaves
    // no hole: the slate finishes that slot from the next part on, inside the same segment,
    // and low-latency viewers keep playing.
    let viewers = {
        let state = state.clone();
        std::thread::spawn(move || watch_low_latency(&state, 14))
    };
    std::thread::sleep(std::time::Duration::from_secs(5));
    while !(800..1000).contains(&(unix_ms() % 2000)) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let hung_slot = unix_ms() / 2000;
    for source in ["source1", "source2"] {
        run(streamctl()
            .args(["kill", source, "--hang", "--state"])
            .arg(&state));
    }
    let listed = (hung_slot + 1) * 2000 + 1500;
    std::thread::sleep(std::time::Duration::from_millis(
        listed.saturating_sub(unix_ms()),
    ));
    let after_hang = playlist(1);
    let segment = after_hang
        .segments
        .iter()
        .find(|s| s.seq == hung_slot)
        .unwrap_or_else(|| panic!("slot {hung_slot} is listed: {after_hang:#?}"));
    assert!(
        (segment.duration_s - 2.0).abs() < 0.05,
        "the slot the sources stopped in is whole: {segment:?}"
    );
    let hung_parts: Vec<_> = after_hang.low_latency.parts_of(hung_slot).collect();
    assert_eq!(hung_parts.len(), 5, "{hung_parts:#?}");
    assert!(
        hung_parts[0].independent && hung_parts[1..].iter().any(|p| p.independent),
        "live parts, then slate parts from a keyframe: {hung_parts:#?}"
    );
    let watched = viewers.join().unwrap();
    assert_eq!(
        (watched["stalls"].as_u64(), watched["errors"].as_u64()),
        (Some(0), Some(0)),
        "{watched:#}"
    );
    for source in ["source1", "source2"] {
        run(streamctl().args(["start", source, "--state"]).arg(&state));
    }
}
