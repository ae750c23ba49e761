//! Three channels on one cluster, end to end: the repository's two (`test` and `backstage`,
//! each published by both sources) and a third, `studio`, added to a copy of `cluster.nix`
//! and published from outside through an LB as OBS would. While a publisher with a wrong key
//! for `backstage` is refused:
//! - the viewers of each channel play that channel's own ladder with 0 stalls, and no channel
//!   shows the slate;
//! - each channel has its own page address on the LBs and the broadcasts, and the page's list
//!   names all three;
//! - chat is per channel: the messages sent to `studio` and to `test` are each stored once
//!   under their own channel and none under the other.
//!
//! `#[ignore]`d in a bare `cargo test` (needs ffmpeg, nix-instantiate, PostgreSQL + Patroni +
//! etcd and the workspace binaries); scripts/test.sh runs it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use streaming_bench::database::{Stored, check_db, find_primary};
use streaming_clients::chat::{Live, LoadOptions, LoadOutcome, Target, load};
use streaming_core::config::Role;
use streaming_runner::cluster::Layout;

mod common;
use common::{LocalCluster, json_of, repo_root, streamctl};

/// Loopback prefix of this test's cluster.
const PREFIX: &str = "127.87";
const STUDIO: &str = "studio";
/// How long every channel is watched (and chatted in) at once.
const WATCH_SECONDS: u64 = 30;

/// `<dir>/cluster.nix`: the repository's host list with a third channel, `studio`, that no
/// source publishes (its publisher comes from outside).
fn cluster_with_studio(dir: &Path) -> PathBuf {
    let path = dir.join("cluster.nix");
    let text = format!(
        "let base = import {root}/cluster.nix; in base // {{\n\
         channels = base.channels ++ [ {{\n\
           name = \"{STUDIO}\"; fps = 25; audioKbps = 64; preset = \"veryfast\";\n\
           ladder = [ {{ name = \"360p\"; width = 640; height = 360; videoKbps = 800; }} ];\n\
           smallPreset = \"ultrafast\";\n\
           smallLadder = [ {{ name = \"180p\"; width = 320; height = 180; videoKbps = 300; }} ];\n\
         }} ];\n}}\n",
        root = repo_root().display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// ffmpeg's test pattern with a tone, as FLV on stdout, piped into `streamctl publish` to the
/// first LB (the key read from `key_file`, so it is on no command line): (publish, encoder).
fn publish(state: &Path, channel: &str, key_file: &Path, seconds: u64) -> (Child, Child) {
    let mut encoder = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=320x180:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-t", &seconds.to_string(), "-g", "50", "-c:v", "libx264"])
        .args([
            "-preset",
            "ultrafast",
            "-b:v",
            "600k",
            "-c:a",
            "aac",
            "-b:a",
            "64k",
        ])
        .args(["-f", "flv", "pipe:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ffmpeg starts");
    let publish = streamctl()
        .arg("publish")
        .arg("--to")
        .arg(format!("rtmps://{PREFIX}.1.1:1936/live/{channel}"))
        .arg("--key-file")
        .arg(key_file)
        .arg("--ca-file")
        .arg(state.join("tls/ca.crt"))
        .stdin(encoder.stdout.take().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("streamctl publish starts");
    (publish, encoder)
}

/// Kills the children when dropped, whatever happens to the test.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTPS client trusting the cluster CA that leaves from an LB's address (a cluster host
/// may read `/status`) and follows no redirect.
fn client(state: &Path) -> reqwest::Client {
    streaming_core::client::cluster_client_builder(
        &state.join("tls/ca.crt"),
        Duration::from_secs(10),
    )
    .unwrap()
    .local_address(Some(format!("{PREFIX}.1.1").parse().unwrap()))
    .build()
    .unwrap()
}

async fn json(client: &reqwest::Client, url: &str) -> Value {
    let response = client
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    assert!(
        response.status().is_success(),
        "{url}: {}",
        response.status()
    );
    response.json().await.unwrap()
}

/// Every channel of ingest1's `/status`.
async fn ingest_channels(client: &reqwest::Client) -> Value {
    json(client, &format!("https://{PREFIX}.4.1:8443/status")).await["channels"].clone()
}

/// Waits until both ingests have `studio` live from its outside publisher.
async fn wait_for_studio(client: &reqwest::Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut live = 0;
        for n in 1..=2 {
            let url = format!("https://{PREFIX}.4.{n}:8443/status");
            let channel = &json(client, &url).await["channels"][STUDIO];
            if channel["live"] == true && channel["active_source"].is_string() {
                live += 1;
            }
        }
        if live == 2 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "studio never went live on both ingests"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `streamctl watch` of one channel through the first LB, every rendition taken.
fn watch(state: &Path, channel: &str, viewers: usize) -> Child {
    streamctl()
        .arg("watch")
        .arg(format!(
            "https://{PREFIX}.1.1:8443/live/{channel}/master.m3u8"
        ))
        .args([
            "--viewers",
            &viewers.to_string(),
            "--renditions",
            "all",
            "--json",
        ])
        .args(["--seconds", &WATCH_SECONDS.to_string()])
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("streamctl watch starts")
}

/// A chat load on `channel` for [`WATCH_SECONDS`].
fn chat_load(state: &Path, channel: &str) -> LoadOptions {
    let target = Target::resolve(None, state, None, Some(channel)).unwrap();
    LoadOptions {
        target,
        clients: 3,
        rate: 3.0,
        seconds: Some(WATCH_SECONDS as f64 - 10.0),
        stop: None,
        drain: Duration::from_secs(10),
        ack_timeout: Duration::from_secs(20),
        epoch: Instant::now(),
        sending: None,
        live: std::sync::Arc::new(Live::default()),
    }
}

/// Each load's messages are stored once under its own channel and none under the others.
async fn check_chat_isolated(state: &Path, loads: &[(&str, &LoadOutcome)]) {
    let layout = Layout::new(state).unwrap();
    let config = layout.load_configs().unwrap().remove(0);
    let dbs: Vec<_> = config.cluster.hosts_with_role(Role::Db).cloned().collect();
    let http = streaming_core::patroni::Patroni::new(&config.paths.ca_cert, Duration::from_secs(3))
        .unwrap();
    let primary = find_primary(&http, &dbs).await.expect("a database primary");
    for (channel, outcome) in loads {
        assert!(
            outcome.report.clean(),
            "{channel} chat: {:?}",
            outcome.report
        );
        assert!(
            outcome.acked.len() >= 10,
            "{channel}: {} acked",
            outcome.acked.len()
        );
        let (_, stored) = check_db(
            &layout,
            &dbs,
            &primary,
            channel,
            &outcome.user_prefix,
            &outcome.acked,
        )
        .await
        .unwrap();
        assert!(
            stored.iter().all(|s| *s == Stored::Once),
            "{channel}: {stored:?}"
        );
        for (other, _) in loads.iter().filter(|(c, _)| c != channel) {
            let (leaked, _) = check_db(&layout, &dbs, &primary, other, &outcome.user_prefix, &[])
                .await
                .unwrap();
            assert_eq!(leaked.rows, 0, "{channel}'s messages stored under {other}");
        }
    }
}

/// The channel pages: an LB sends `/live/<channel>/` to that channel's page on a broadcast,
/// which serves it, and lists every channel in order, all live.
async fn check_pages(client: &reqwest::Client) {
    for channel in ["test", "backstage", STUDIO] {
        let url = format!("https://{PREFIX}.1.1:8443/live/{channel}/");
        let response = client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::FOUND, "{url}");
        let location = response.headers()["location"].to_str().unwrap().to_owned();
        let page = url::Url::parse(&location).unwrap();
        assert_eq!(page.path(), format!("/live/{channel}/"), "{location}");
        let html = client.get(location.as_str()).send().await.unwrap();
        assert_eq!(html.status(), reqwest::StatusCode::OK, "{location}");
        let cluster = json(
            client,
            &format!("{}/api/cluster", page.origin().ascii_serialization()),
        )
        .await;
        let listed: Vec<(&str, bool)> = cluster["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["name"].as_str().unwrap(), c["live"] == true))
            .collect();
        assert_eq!(
            listed,
            [("test", true), ("backstage", true), (STUDIO, true)]
        );
    }
    let unknown = client
        .get(format!("https://{PREFIX}.1.1:8443/live/nope/"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), reqwest::StatusCode::NOT_FOUND);
}

/// Slate segments each channel has published on ingest1 so far.
fn slates(channels: &Value) -> Vec<(String, u64)> {
    ["test", "backstage", STUDIO]
        .iter()
        .map(|c| {
            (
                c.to_string(),
                channels[*c]["segments_slate"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn watch_report(child: Child) -> Value {
    let output: Output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "watch failed: {}", output.status);
    json_of(&output)
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate, PostgreSQL + Patroni + etcd and the workspace binaries (scripts/test.sh)"]
fn three_channels_play_and_chat_side_by_side_and_a_wrong_key_is_refused() {
    let started = Instant::now();
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    cluster.up(PREFIX, Some(&cluster_with_studio(cluster.dir())), &[]);
    let key = state.join(format!("secrets/stream-keys/{STUDIO}.key"));
    let (studio, encoder) = publish(&state, STUDIO, &key, WATCH_SECONDS + 120);
    let _publisher = Children(vec![studio, encoder]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = client(&state);
    runtime.block_on(wait_for_studio(&client));
    eprintln!(
        "cluster up and studio live after {:.0} s",
        started.elapsed().as_secs_f64()
    );
    runtime.block_on(check_pages(&client));
    let before = slates(&runtime.block_on(ingest_channels(&client)));

    let viewers = [("test", 3), ("backstage", 2), (STUDIO, 2)];
    let watches: Vec<Child> = viewers.iter().map(|(c, n)| watch(&state, c, *n)).collect();
    let chats = runtime.spawn(futures::future::join(
        load(chat_load(&state, "test")),
        load(chat_load(&state, STUDIO)),
    ));
    // A publisher for backstage with a wrong key, while everyone watches.
    std::thread::sleep(Duration::from_secs(5));
    let wrong_key = cluster.dir().join("wrong.key");
    std::fs::write(&wrong_key, "not-the-backstage-key").unwrap();
    let (refused, encoder) = publish(&state, "backstage", &wrong_key, 20);
    let _encoder = Children(vec![encoder]);
    let refused = refused.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("refused"),
        "wrong key: {said}"
    );

    let ladders = [
        ("test", vec!["144p", "240p", "360p"]),
        ("backstage", vec!["144p"]),
        (STUDIO, vec!["180p"]),
    ];
    for (watch, (channel, renditions)) in watches.into_iter().zip(ladders) {
        let report = watch_report(watch);
        eprintln!(
            "{channel}: {} segments, {} stalls, renditions {}",
            report["segments"], report["stalls"], report["renditions"]
        );
        assert_eq!(
            (report["stalls"].as_u64(), report["errors"].as_u64()),
            (Some(0), Some(0)),
            "{channel}: {report:#}"
        );
        let played: BTreeSet<&str> = report["renditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(played, renditions.into_iter().collect(), "{channel}");
    }
    let after = slates(&runtime.block_on(ingest_channels(&client)));
    assert_eq!(before, after, "a channel showed the slate while watched");

    let (test_chat, studio_chat) = runtime.block_on(chats).unwrap();
    let (test_chat, studio_chat) = (test_chat.unwrap(), studio_chat.unwrap());
    runtime.block_on(check_chat_isolated(
        &state,
        &[("test", &test_chat), (STUDIO, &studio_chat)],
    ));
    eprintln!("whole test {:.0} s", started.elapsed().as_secs_f64());
}
