//! End to end through the real binaries: `streamctl up` starts every host of cluster.nix on
//! loopback, a viewer watches through an LB, ffprobe reads the ladder, a wrong stream key is
//! refused while the stream plays on, the stream key is on no command line and in no log while
//! sources and the relay publish over RTMPS only, a transcoder crash does not break the playlist,
//! and `streamctl down` leaves no process behind.
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
use common::{LocalCluster, json_of, run, streamctl};

/// Every process's pid and command line (arguments joined by spaces).
fn command_lines() -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// The parent pid from `/proc/<pid>/stat` (the field after the parenthesised command name).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The cluster's processes: every host (its command line names the state dir) and their
/// children (the ingests' and sources' ffmpeg).
fn cluster_processes(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy().to_string();
    let all = command_lines();
    let hosts: Vec<u32> = all
        .iter()
        .filter(|(pid, cmdline)| *pid != std::process::id() && cmdline.contains(dir.as_str()))
        .map(|(pid, _)| *pid)
        .collect();
    all.into_iter()
        .filter(|(pid, _)| {
            hosts.contains(pid) || parent_of(*pid).is_some_and(|p| hosts.contains(&p))
        })
        .collect()
}

/// Of `pids`, and of processes naming the state dir, those still alive (not zombies).
fn still_alive(dir: &Path, pids: &[u32]) -> Vec<String> {
    let mut pids = pids.to_vec();
    pids.extend(cluster_processes(dir).into_iter().map(|(pid, _)| pid));
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let state = stat[stat.rfind(')')? + 1..]
                .split_whitespace()
                .next()?
                .to_owned();
            (state != "Z").then(|| format!("{pid} ({state})"))
        })
        .collect()
}

/// `a.b.c.d` as `/proc/net/tcp` prints it: the address bytes as a little-endian hex number.
fn proc_net_ip(ip: &str) -> String {
    let octets: Vec<u8> = ip.split('.').map(|o| o.parse().unwrap()).collect();
    format!(
        "{:02X}{:02X}{:02X}{:02X}",
        octets[3], octets[2], octets[1], octets[0]
    )
}

/// Established TCP connections from address `from` to `to:port`.
fn established(from: &str, to: &str, port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let (from, remote) = (proc_net_ip(from), format!("{}:{port:04X}", proc_net_ip(to)));
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3
                && fields[1].starts_with(&format!("{from}:"))
                && fields[2] == remote
                && fields[3] == "01"
        })
        .count()
}

/// Every thread of every process of `host` (its process group) may run on every CPU.
fn assert_runs_on_every_cpu(state: &Path, host: &str) {
    let layout = streaming_runner::cluster::Layout::new(state).unwrap();
    let pgid: i32 = std::fs::read_to_string(layout.pid_file(host))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cores = std::thread::available_parallelism().unwrap().get();
    let all = if cores == 1 {
        "0".to_owned()
    } else {
        format!("0-{}", cores - 1)
    };
    let members = streaming_runner::procs::group_members(pgid);
    assert!(!members.is_empty(), "{host} has no process");
    for member in members {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", member.pid)) else {
            continue;
        };
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            if let Some(line) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
                assert!(
                    line.ends_with(&all),
                    "{host} {} thread: {line}",
                    member.comm
                );
            }
        }
    }
}

fn host_log(state: &Path, host: &str) -> String {
    std::fs::read_to_string(state.join(format!("logs/{host}.log"))).unwrap_or_default()
        + &std::fs::read_to_string(state.join(format!("logs/{host}.out"))).unwrap_or_default()
}

/// Waits (up to `limit`) for a line of `host`'s log that contains every one of `parts`.
fn wait_for_log_line(state: &Path, host: &str, parts: &[&str], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if host_log(state, host)
            .lines()
            .any(|line| parts.iter().all(|p| line.contains(p)))
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The stream key is on no command line of this machine, in no log of the cluster and in no
/// status answer; each source holds an RTMPS connection to each ingest and none over plain
/// RTMP, and the ingests accepted their publishes.
fn assert_key_stays_secret_and_sources_use_rtmps(state: &Path, key: &str) {
    let on_command_line: Vec<u32> = command_lines()
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains(key))
        .map(|(pid, _)| pid)
        .collect();
    assert!(
        on_command_line.is_empty(),
        "the stream key is on the command line of pids {on_command_line:?}"
    );
    for log in std::fs::read_dir(state.join("logs")).unwrap().flatten() {
        let text = String::from_utf8_lossy(&std::fs::read(log.path()).unwrap()).into_owned();
        assert!(
            !text.contains(key),
            "the stream key is in {}",
            log.path().display()
        );
    }
    let status = run(streamctl().args(["status", "--json", "--state"]).arg(state));
    assert!(
        !String::from_utf8_lossy(&status.stdout).contains(key),
        "the stream key is in `streamctl status`"
    );
    // One publish per channel a source publishes.
    let configs = streaming_runner::cluster::Layout::new(state)
        .unwrap()
        .load_configs()
        .unwrap();
    for (n, source) in [(1, "source1"), (2, "source2")] {
        let from = format!("{PREFIX}.5.{n}");
        let channels = configs[0].cluster.host(source).unwrap().channels.len();
        assert!(
            channels >= 2,
            "cluster.nix has a source with several channels"
        );
        for ingest in ["4.1", "4.2"] {
            let to = format!("{PREFIX}.{ingest}");
            assert_eq!(
                established(&from, &to, 1936),
                channels,
                "{from} publishes each of its channels to {to} over RTMPS"
            );
            assert_eq!(
                established(&from, &to, 1935),
                0,
                "{from} uses no plain RTMP towards {to}"
            );
        }
    }
    for ingest in ["ingest1", "ingest2"] {
        for source in ["source1", "source2"] {
            assert!(
                wait_for_log_line(state, ingest, &["publish accepted", source], Duration::ZERO),
                "{ingest} logs the publish of {source}"
            );
        }
    }
}

fn watch(state: &Path, seconds: u64, viewers: usize) -> Value {
    watch_with(state, seconds, viewers, &[])
}

fn watch_with(state: &Path, seconds: u64, viewers: usize, extra: &[&str]) -> Value {
    json_of(&run(streamctl()
        .args(["watch", "--json", "--renditions", "all"])
        .args(extra)
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

/// GET `url` with curl, as JSON.
fn get_json(url: &str) -> Value {
    json_of(&run(Command::new("curl").args([
        "-sf",
        "--max-time",
        "5",
        url,
    ])))
}

/// The Prometheus of `up --monitoring` scrapes every host of the cluster (each target up
/// within a minute) and runs every alert rule nix/monitoring.nix generated, none in error.
fn assert_monitoring(up: &Value, state: &Path) {
    let url = up["prometheus_url"]
        .as_str()
        .expect("up --monitoring names Prometheus");
    let hosts = up["hosts"].as_array().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets = get_json(&format!("{url}/api/v1/targets?state=active"));
        let health: Vec<(String, String)> = targets["data"]["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["labels"]["host"].to_string(), t["health"].to_string()))
            .collect();
        if health.len() == hosts && health.iter().all(|(_, h)| h == "\"up\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus targets not all up: {health:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let generated: Value =
        serde_json::from_slice(&std::fs::read(state.join("monitoring/alerts.rules.json")).unwrap())
            .unwrap();
    let count = |groups: &Value| -> usize {
        groups
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["rules"].as_array().unwrap().len())
            .sum()
    };
    let loaded = get_json(&format!("{url}/api/v1/rules"));
    let groups = &loaded["data"]["groups"];
    assert_eq!(count(groups), count(&generated["groups"]), "rules loaded");
    assert!(count(groups) > 30, "{loaded:#}");
    for group in groups.as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule:#}");
        }
    }
    eprintln!(
        "prometheus: {hosts} targets up, {} rules loaded",
        count(groups)
    );
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate and the workspace binaries (scripts/test.sh)"]
fn local_cluster_streams_end_to_end() {
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();

    // Up: every host as real processes, until the stream plays through an LB; Prometheus
    // watching them.
    let started = Instant::now();
    let up = cluster.up(PREFIX, None, &["--monitoring"]);
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

    // Prometheus (`up --monitoring`) reads every host and runs every alert rule.
    assert_monitoring(&up, &state);

    // The same in low-latency mode: parts, blocking reloads and preload hints, every rendition,
    // no stall, and a latency figure (measured, not asserted: docs/latency.md).
    let low = watch_with(&state, 12, 3, &["--low-latency"]);
    eprintln!("watch --low-latency: {low:#}");
    assert_eq!(low["stalls"], 0, "low latency: stalls in {low:#}");
    assert_eq!(low["errors"], 0, "low latency: errors in {low:#}");
    assert!(
        low["parts"].as_u64().unwrap() > 3 * 12,
        "parts played: {low:#}"
    );
    assert_eq!(low["renditions"].as_array().unwrap().len(), 3, "{low:#}");
    let low_latency = low["latency_s"].as_f64().unwrap();
    assert!(low_latency > 0.0, "latency is measured: {low_latency}");

    let key = std::fs::read_to_string(state.join("secrets/stream-keys/test.key")).unwrap();
    let key = key.trim();
    assert!(key.len() >= 32, "a real stream key");
    assert_key_stays_secret_and_sources_use_rtmps(&state, key);

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
    let wrong = common::test_publisher(
        &format!("rtmp://{ingest1}:1935/live/test?key=not-the-key&source=intruder"),
        5,
        25,
    )
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

    // An OBS-like publisher that reaches ingest1 only (plain RTMP, as OBS users may) is relayed
    // to ingest2 over RTMPS. Its command line carries the key, as OBS's would not: it runs only
    // after the check above.
    let mut obs = common::test_publisher(
        &format!("rtmp://{ingest1}:1935/live/test?key={key}&source=relay-check"),
        8,
        25,
    )
    .spawn()
    .unwrap();
    let relayed = wait_for_log_line(
        &state,
        "ingest2",
        &["publish accepted", "relay-check", "relayed"],
        Duration::from_secs(10),
    );
    let relay_log = wait_for_log_line(
        &state,
        "ingest1",
        &["publishing over RTMPS", "relay-check", "ingest2"],
        Duration::ZERO,
    );
    let _ = obs.wait();
    assert!(relayed, "ingest2 accepts ingest1's relay");
    assert!(relay_log, "ingest1 relays to ingest2 over RTMPS");
    assert!(
        host_log(&state, "ingest2")
            .lines()
            .filter(|l| l.contains("publish accepted") && l.contains("relay-check"))
            .all(|l| l.contains("relayed=true") || l.contains("\"relayed\":true")),
        "the relayed publish is marked as relayed"
    );

    // The capacity benches in short form (docs/benchmarks.md has the real runs): both servers
    // answer every request (over HTTP/2, what browsers use: h2load; the LB bench drives wrk),
    // the viewers step holds, and the hosts they hang come back.
    // Pinned (each server on CPU 0, h2load on the other), and the broadcast runs on every
    // CPU again afterwards.
    let serve = json_of(&run(streamctl()
        .args(["bench", "serve", "--rounds", "1", "--seconds", "2", "--pin"])
        .args(["--connections", "20", "--protocol", "http2"])
        .args(["--json", "--state"])
        .arg(&state)));
    assert_eq!(serve["server_cpus"], serde_json::json!([0]), "{serve:#}");
    assert_runs_on_every_cpu(&state, "broadcast1");
    for round in serve["rounds"].as_array().unwrap() {
        assert!(
            round["requests_per_second"].as_f64().unwrap() > 0.0
                && round["p99_ms"].as_f64().unwrap() > 0.0
                && round["errors"] == 0,
            "bench serve: {serve:#}"
        );
    }
    assert_eq!(serve["rounds"].as_array().unwrap().len(), 2, "{serve:#}");
    let lb = json_of(&run(streamctl()
        .args(["bench", "lb", "--rounds", "1", "--seconds", "2"])
        .args(["--connections", "20", "--json", "--state"])
        .arg(&state)));
    let lb_round = &lb["rounds"][0];
    assert!(
        lb_round["requests_per_second"].as_f64().unwrap() > 0.0
            && lb_round["errors"] == 0
            && lb["requests_per_second_per_core"].as_f64().unwrap() > 0.0,
        "bench lb: {lb:#}"
    );
    let viewers = json_of(&run(streamctl()
        .args([
            "bench",
            "viewers",
            "--steps",
            "20",
            "--seconds",
            "8",
            "--json",
            "--state",
        ])
        .arg(&state)));
    assert_eq!(viewers[0]["holds"], true, "bench viewers: {viewers:#}");
    assert!(
        viewers[0]["segments"].as_u64().unwrap() >= 20,
        "{viewers:#}"
    );
    assert_clean_watch(
        &watch(&state, 8, 1),
        "after the benches resumed their hosts",
    );

    // Down leaves nothing behind: hosts and ffmpeg children.
    let processes: Vec<u32> = cluster_processes(&state)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    assert!(
        processes.len() >= 12,
        "hosts and ffmpeg children found: {processes:?}"
    );
    run(streamctl().arg("down").arg("--state").arg(&state));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut left = still_alive(&state, &processes);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        left = still_alive(&state, &processes);
    }
    assert!(left.is_empty(), "processes left after down: {left:#?}");
}
