//! A rolling upgrade end to end: all twelve hosts restarted in turn by `streamctl upgrade
//! --all` (the database primary last, after a Patroni switchover) while viewers watch and chat
//! clients send. Every host must run a new process afterwards, the viewers must see 0 stalls
//! and 0 errors, and every chat message must be acknowledged, delivered once in order and
//! stored once in PostgreSQL.
//!
//! `#[ignore]`d in a bare `cargo test` (needs ffmpeg, nix-instantiate, PostgreSQL + Patroni +
//! etcd and the workspace binaries); scripts/test.sh runs it with `--include-ignored`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Loopback prefix of this test's cluster.
const PREFIX: &str = "127.89";
/// Long enough for the whole upgrade (about a minute here) with margin on a loaded machine.
const WATCH_SECONDS: u64 = 120;

mod common;
use common::{LocalCluster, json_of, run, streamctl};

/// Each host's process group, from `streamctl status --json`.
fn pids(state: &Path) -> BTreeMap<String, i64> {
    let status = json_of(&run(streamctl()
        .args(["status", "--json", "--state"])
        .arg(state)));
    status
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_owned(),
                h["pid"].as_i64().unwrap_or(0),
            )
        })
        .collect()
}

fn spawn_json(command: &mut Command) -> Child {
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("streamctl starts")
}

fn report_of(child: Child, what: &str) -> Value {
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate, PostgreSQL + Patroni + etcd and the workspace binaries (scripts/test.sh)"]
fn every_host_restarts_in_turn_and_nobody_notices() {
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    cluster.up(PREFIX, None, &[]);
    let before = pids(&state);
    let configs = streaming_runner::cluster::Layout::new(&state)
        .unwrap()
        .load_configs()
        .unwrap();
    let primary_before = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(streaming_runner::db::primary(&configs))
        .expect("a database primary");

    let viewers = spawn_json(
        streamctl()
            .args(["watch", "--json", "--viewers", "8", "--seconds"])
            .arg(WATCH_SECONDS.to_string())
            .arg("--state")
            .arg(&state),
    );
    let chat = spawn_json(
        streamctl()
            .args([
                "chat",
                "--json",
                "--clients",
                "4",
                "--rate",
                "8",
                "--seconds",
            ])
            .arg((WATCH_SECONDS - 10).to_string())
            .arg("--state")
            .arg(&state),
    );
    // Viewers and chat clients settle in before the first host goes.
    std::thread::sleep(Duration::from_secs(5));
    let upgrade = json_of(&run(streamctl()
        .args(["upgrade", "--all", "--json", "--state"])
        .arg(&state)));
    let viewers = report_of(viewers, "watch");
    let chat = report_of(chat, "chat");

    eprintln!("rolling upgrade: figures for docs/deploy.md:");
    let hosts = upgrade["hosts"].as_array().unwrap();
    for h in hosts {
        eprintln!("  {h}");
    }
    eprintln!(
        "  total {} s; viewers: {}; chat: {}",
        upgrade["total_s"], viewers, chat
    );

    // Every host, once, the primary last after a switchover.
    let upgraded: Vec<&str> = hosts.iter().map(|h| h["host"].as_str().unwrap()).collect();
    assert_eq!(upgraded.len(), before.len(), "{upgraded:?}");
    assert_eq!(upgraded.last(), Some(&primary_before.as_str()));
    assert!(
        hosts.last().unwrap()["switchover_to"].is_string(),
        "{upgrade:#}"
    );
    let after = pids(&state);
    for (host, pid) in &before {
        assert_ne!(after.get(host), Some(pid), "{host} runs the same process");
        assert!(
            after.get(host).is_some_and(|p| *p > 0),
            "{host} is not running"
        );
    }
    let primary_after = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(streaming_runner::db::primary(&configs))
        .expect("a database primary after the upgrade");
    assert_ne!(
        primary_after, primary_before,
        "the switchover moved the primary"
    );

    // The viewers saw nothing.
    assert!(
        viewers["stalls"] == 0 && viewers["errors"] == 0 && viewers["segments"].as_u64() > Some(0),
        "viewers: {viewers:#}"
    );
    // Chat lost nothing and doubled nothing, as the clients saw it...
    for field in [
        "unacked",
        "missing",
        "duplicates",
        "out_of_order",
        "seq_conflicts",
        "gaps",
    ] {
        assert_eq!(chat[field], 0, "chat {field}: {chat:#}");
    }
    let acked = chat["acked"].as_u64().unwrap();
    assert!(acked > 0 && chat["sent"] == chat["acked"], "chat: {chat:#}");
    // ... and as PostgreSQL stored it (a retried message is stored once by its client id).
    let stored = streaming_runner::db::psql_app(
        &configs,
        &primary_after,
        "SELECT count(*) FROM chat_events WHERE kind = 'message'",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(
        stored.trim().parse::<u64>().unwrap(),
        acked,
        "messages stored"
    );
}
