//! Every way in, end to end: `streamctl watch` viewers enter through lb1 (the URL they were
//! given, nothing else), lb1 dies, then the broadcast they are on is killed. They must learn the
//! other LB from the broadcast (`/api/cluster`), skip lb1 and move on with 0 stalls and 0
//! errors. The same again with lb1 hung (SIGSTOP: connections open, nothing answers), which a
//! client only notices by its own deadline. In both states, a steering player's manifest still
//! comes through its broadcast's `/steering`. One cluster for both rounds.
//!
//! Run: `cargo test -p streaming-streamctl --test ways_in -- --include-ignored --nocapture`
//! after `cargo build --workspace`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{LocalCluster, json_of, run, streamctl};

/// Loopback prefix of this test's cluster.
const PREFIX: &str = "127.82";
/// One ingest and one source are enough here; fewer ffmpeg processes share the machine.
const LEFT_OUT: [&str; 2] = ["ingest2", "source2"];
const VIEWERS: u64 = 4;
/// Long enough to play well past the buffer the viewers had when their broadcast died.
const WATCH_SECONDS: u64 = 16;

fn status(state: &Path) -> Vec<Value> {
    serde_json::from_value(json_of(&run(streamctl()
        .args(["status", "--json", "--state"])
        .arg(state))))
    .expect("status is a list")
}

fn ctl(state: &Path, args: &[&str]) {
    run(streamctl().args(args).arg("--state").arg(state));
}

/// Polls `streamctl status` until `done` holds, or fails the test after `limit`.
fn wait_for(state: &Path, what: &str, limit: Duration, done: impl Fn(&[Value]) -> bool) {
    let start = Instant::now();
    loop {
        if done(&status(state)) {
            return;
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn whole(hosts: &[Value]) -> bool {
    hosts.iter().all(|h| h["up"] == true && h["health"] == "ok")
}

/// What a steering player gets: the master of `broadcast` (token from lb2), its `SERVER-URI`,
/// and the manifest behind it. Returns the seconds the manifest took and its pathway order.
async fn steer(
    client: &reqwest::Client,
    lb2: &str,
    broadcast_url: &str,
    pathway: &str,
) -> (f64, Vec<String>) {
    let entry = client
        .get(format!("{lb2}/live/test/master.m3u8"))
        .send()
        .await
        .expect("lb2 answers");
    let location = entry.headers()[reqwest::header::LOCATION]
        .to_str()
        .unwrap()
        .to_owned();
    let token = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "t")
        .map(|(_, v)| v.into_owned())
        .expect("token in lb2's redirect");
    let master = client
        .get(format!("{broadcast_url}/live/test/master.m3u8"))
        .query(&[("t", &token)])
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let server_uri = master
        .lines()
        .find_map(|l| l.strip_prefix("#EXT-X-CONTENT-STEERING:SERVER-URI=\""))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no steering tag in {master}"))
        .to_owned();
    assert!(
        server_uri.starts_with(&format!("{broadcast_url}/steering?")),
        "the steering server is the broadcast itself: {server_uri}"
    );
    let t0 = Instant::now();
    let response = client
        .get(&server_uri)
        .query(&[("_HLS_pathway", pathway)])
        .send()
        .await
        .unwrap();
    let took = t0.elapsed().as_secs_f64();
    assert!(response.status().is_success(), "{server_uri}: {response:?}");
    let manifest: Value = response.json().await.unwrap();
    let order = manifest["PATHWAY-PRIORITY"]
        .as_array()
        .unwrap_or_else(|| panic!("{manifest}"))
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    (took, order)
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate, PostgreSQL + Patroni + etcd and the workspace binaries (scripts/test.sh)"]
fn viewers_and_steering_outlive_an_lb_and_then_their_broadcast() {
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    cluster.up_without(PREFIX, &LEFT_OUT);
    let lb1 = format!("https://{PREFIX}.1.1:8443");
    let lb2 = format!("https://{PREFIX}.1.2:8443");
    let rt = tokio::runtime::Runtime::new().unwrap();
    streaming_core::tls::install_crypto_provider();
    let client =
        streaming_core::client::cluster_client(&state.join("tls/ca.crt"), Duration::from_secs(10))
            .unwrap();

    let mut figures = Vec::new();
    for (fault, victim, number) in [("dead", "broadcast1", 1), ("hung", "broadcast2", 2)] {
        let victim_url = format!("https://{PREFIX}.2.{number}:8443");
        // Only lb1's URL: the viewers learn lb2 from the broadcast they land on.
        let watch = streamctl()
            .arg("watch")
            .arg(format!("{lb1}/live/test/master.m3u8"))
            .args(["--json", "--pin", victim, "--viewers"])
            .arg(VIEWERS.to_string())
            .arg("--seconds")
            .arg(WATCH_SECONDS.to_string())
            .arg("--state")
            .arg(&state)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("streamctl watch starts");
        wait_for(
            &state,
            &format!("{VIEWERS} viewers on {victim}"),
            Duration::from_secs(40),
            |hosts| {
                hosts
                    .iter()
                    .any(|h| h["name"] == victim && h["viewers"].as_u64() >= Some(VIEWERS))
            },
        );
        match fault {
            "dead" => ctl(&state, &["kill", "lb1"]),
            _ => ctl(&state, &["kill", "lb1", "--hang"]),
        }
        // A steering player on the victim, twice: the first question meets lb1 (the proxy's
        // first choice), the second goes straight to lb2, the one that answered.
        let (first_s, order) = rt.block_on(steer(&client, &lb2, &victim_url, victim));
        assert_eq!(order.first().map(String::as_str), Some(victim), "{order:?}");
        let (second_s, _) = rt.block_on(steer(&client, &lb2, &victim_url, "broadcast3"));
        ctl(&state, &["kill", victim]);
        let killed = Instant::now();

        let out = watch.wait_with_output().expect("watch ends");
        assert!(out.status.success(), "watch failed: {}", out.status);
        let report = json_of(&out);
        let fatal: Vec<&Value> = report["per_viewer"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| !v["fatal"].is_null())
            .collect();
        assert!(fatal.is_empty(), "lb1 {fault}: fatal viewers {fatal:#?}");
        assert_eq!(report["stalls"], 0, "lb1 {fault}: {report:#}");
        assert_eq!(report["errors"], 0, "lb1 {fault}: {report:#}");
        for v in report["per_viewer"].as_array().unwrap() {
            assert!(
                v["failovers"].as_u64() >= Some(1)
                    && v["broadcasts"].as_array().unwrap().len() >= 2,
                "lb1 {fault}: every viewer left {victim}: {v:#}"
            );
        }
        figures.push(format!(
            "lb1 {fault}, then {victim} killed: {} viewers, {} stalls ({} s), {} errors, \
             {} failovers, {} LB attempts failed, longest time to another broadcast {:.2} s; \
             steering through {victim}: {first_s:.2} s, then {second_s:.3} s; watch ended {:.0} s after the kill",
            report["viewers"],
            report["stalls"],
            report["stall_s"],
            report["errors"],
            report["failovers"],
            report["lb_failures"],
            report["reassign_max_s"].as_f64().unwrap_or(f64::NAN),
            killed.elapsed().as_secs_f64(),
        ));
        assert!(
            report["lb_failures"].as_u64() >= Some(VIEWERS),
            "each viewer asked lb1 first and went on to lb2: {report:#}"
        );

        ctl(&state, &["start", "lb1"]);
        ctl(&state, &["start", victim]);
        wait_for(&state, "every host back", Duration::from_secs(60), whole);
    }
    for line in &figures {
        eprintln!("{line}");
    }
}
