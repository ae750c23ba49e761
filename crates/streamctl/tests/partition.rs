//! Network partitions end to end: `streamctl partition` cuts a host off (existing and new
//! connections, both directions), `heal` restores it, and the database primary cut off from
//! its replica and etcd (its clients still reach it) steps down: chat clients sending 20 msg/s
//! lose no acked message and never see two primaries at once.
//!
//! Needs root and nftables (the cuts are nftables rules matching each host's cgroup), besides
//! what every end-to-end test needs. `#[ignore]`d in a bare `cargo test`; scripts/test.sh runs
//! it with `--include-ignored`.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

/// Loopback prefix of this test's cluster.
const PREFIX: &str = "127.83";
/// Hosts left out (2 shared cores): the chat needs an LB, two broadcasts with a stream behind
/// them, and the database with its etcd witness (lb1).
const LEFT_OUT: [&str; 5] = ["broadcast3", "broadcast4", "ingest2", "source2", "lb2"];

mod common;
use common::{Cluster, json_of, repo_root, run, streamctl};

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `GET <url>/healthz` from outside the cluster (no cgroup), 3 s at most: the HTTP status, or
/// curl's error.
fn healthz(ca: &Path, host_url: &str) -> Result<u16, String> {
    let output = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-m",
            "3",
            "--cacert",
        ])
        .arg(ca)
        .arg(format!("{host_url}/healthz"))
        .output()
        .expect("curl runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap_or(0))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

#[test]
#[ignore = "end to end: needs root, nftables, ffmpeg, nix-instantiate, PostgreSQL + Patroni + etcd and the workspace binaries (scripts/test.sh)"]
fn partitions_cut_hosts_and_a_cut_off_primary_steps_down_without_losing_acked_chat() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _cluster = Cluster {
        state: state.clone(),
    };
    let cluster_file = tmp.path().join("cluster.nix");
    let full = std::fs::read_to_string(repo_root().join("cluster.nix")).unwrap();
    let trimmed: String = full
        .lines()
        .filter(|line| {
            !LEFT_OUT
                .iter()
                .any(|h| line.contains(&format!("name = \"{h}\";")))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&cluster_file, trimmed).unwrap();
    let report = common::up(&state, PREFIX, Some(&cluster_file));
    let url_of = |name: &str| {
        report["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .and_then(|h| h["url"].as_str())
            .unwrap_or_else(|| panic!("no {name} in {report:#}"))
            .to_owned()
    };
    let ca = Path::new(report["ca_cert"].as_str().unwrap()).to_owned();
    let (b1, b2) = (url_of("broadcast1"), url_of("broadcast2"));
    assert_eq!(healthz(&ca, &b2), Ok(200));

    // Cut off from everyone: outsiders time out on it, its peers are untouched.
    run(streamctl()
        .args(["partition", "broadcast2", "--state"])
        .arg(&state));
    let cut_at = Instant::now();
    let refused = healthz(&ca, &b2);
    assert!(
        refused.is_err(),
        "broadcast2 answered while cut: {refused:?}"
    );
    eprintln!(
        "request to the cut host failed after {:.1} s: {}",
        cut_at.elapsed().as_secs_f64(),
        refused.unwrap_err()
    );
    assert_eq!(healthz(&ca, &b1), Ok(200));
    let status = json_of(&run(streamctl()
        .args(["status", "--json", "--state"])
        .arg(&state)));
    let shown = status
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "broadcast2")
        .map(|h| h["partitions"].clone());
    assert_eq!(
        shown,
        Some(serde_json::json!(["broadcast2 <-/-> everyone"])),
        "{status:#}"
    );
    run(streamctl().args(["heal", "--state"]).arg(&state));
    assert_eq!(healthz(&ca, &b2), Ok(200), "healed broadcast2");

    // The primary cut off from its replica and etcd while chat clients write through it.
    let output = run(streamctl()
        .args([
            "bench",
            "chat-failover",
            "--json",
            "--faults",
            "partition",
            "--clients",
            "6",
            "--rate",
            "20",
            "--seconds",
            "20",
            "--settle",
            "3",
            "--state",
        ])
        .arg(&state));
    let report = json_of(&output);
    let ttl = number(&report["ttl_s"]);
    let load = &report["load"];
    let fault = &report["faults"][0];
    eprintln!(
        "partition of {}: new primary {} after {} s, write outage {:.2} s, {} acked, {} lost, \
         most primaries at once {}; whole test {:.0} s",
        fault["host"],
        fault["new_primary"],
        fault["new_primary_after_s"],
        number(&fault["outage_s"]),
        fault["acked"],
        fault["lost"],
        fault["primaries_max"],
        started.elapsed().as_secs_f64()
    );
    assert!(
        fault["new_primary"].is_string() && fault["new_primary"] != fault["host"],
        "the replica was not promoted: {fault:#}"
    );
    assert_eq!(
        fault["primaries_max"], 1,
        "two primaries at once: {fault:#}"
    );
    assert_eq!(fault["took_leader_back"], false, "{fault:#}");
    assert!(
        number(&fault["outage_s"]) <= ttl + 5.0,
        "write outage beyond ttl + 5 s: {fault:#}"
    );
    assert!(
        fault["sync_after_restore_s"].is_number(),
        "the healed host did not rejoin as synchronous standby: {fault:#}"
    );
    let db = &report["db"];
    assert!(number(&db["checked"]) > 0.0, "{db:#}");
    for key in ["lost", "wrong_seq", "duplicates", "seq_duplicates"] {
        assert_eq!(db[key], 0, "db {key}: {db:#}");
    }
    for key in ["missing", "duplicates", "out_of_order", "unacked"] {
        assert_eq!(load[key], 0, "load {key}: {load:#}");
    }
    assert_eq!(report["passed"], true, "{report:#}");
}
