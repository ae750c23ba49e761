//! Chat durability end to end (issue 5's durability test, short form): chat clients on two
//! broadcasts send 24 msg/s while the PostgreSQL primary is killed (Patroni, PostgreSQL and
//! etcd: SIGKILL), then the new primary is killed, then the primary is hung (SIGSTOP) — each
//! restored before the next. Afterwards every acked message must be in PostgreSQL exactly once
//! under its acked seq, and every client must have received every acked message once and in
//! seq order. The write outage of each failover is printed (the target is ttl + 2 s;
//! this test allows ttl + 5 s on a loaded 2-core machine).
//!
//! `#[ignore]`d in a bare `cargo test` (needs ffmpeg, nix-instantiate, PostgreSQL 15, Patroni,
//! etcd and the workspace binaries); scripts/test.sh runs it with `--include-ignored`.

use std::time::Instant;

use serde_json::Value;

/// Loopback prefix of this test's cluster.
const PREFIX: &str = "127.80";
/// Hosts left out of this test's cluster (2 shared cores): the chat needs an LB, two
/// broadcasts with a live stream behind them, and the database.
const LEFT_OUT: [&str; 4] = ["broadcast3", "broadcast4", "ingest2", "source2"];

mod common;
use common::{LocalCluster, json_of, run, streamctl};

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate, PostgreSQL + Patroni + etcd and the workspace binaries (scripts/test.sh)"]
fn acked_chat_messages_survive_killed_and_hung_database_primaries() {
    let started = Instant::now();
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    cluster.up_without(PREFIX, &LEFT_OUT);
    let up_s = started.elapsed().as_secs_f64();

    let markdown = cluster.dir().join("chat-failover.md");
    let output = run(streamctl()
        .args([
            "bench",
            "chat-failover",
            "--json",
            "--clients",
            "10",
            "--rate",
            "24",
            "--seconds",
            "45",
            "--settle",
            "3",
            "--markdown",
        ])
        .arg(&markdown)
        .arg("--state")
        .arg(&state));
    let report = json_of(&output);
    eprintln!("{}", std::fs::read_to_string(&markdown).unwrap());
    let ttl = number(&report["ttl_s"]);
    let load = &report["load"];
    let faults = report["faults"].as_array().unwrap();
    for f in faults {
        eprintln!(
            "{} of {}: write outage {:.2} s, new primary after {} s, {} acked, {} lost, {} duplicates",
            f["fault"],
            f["host"],
            number(&f["outage_s"]),
            f["new_primary_after_s"],
            f["acked"],
            f["lost"],
            f["duplicates"]
        );
    }
    eprintln!(
        "cluster up in {up_s:.0} s, whole test {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // The load: at least two broadcasts, at least 20 msg/s while writes were possible.
    let broadcasts = load["initial_broadcasts"].as_array().unwrap();
    assert!(broadcasts.len() >= 2, "clients on one broadcast: {load:#}");
    let outage_total: f64 = load["write_outages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| number(&o["duration_s"]))
        .sum();
    let writable_s = number(&load["seconds"]) - outage_total;
    let rate = number(&load["acked"]) / writable_s;
    eprintln!(
        "acked {} in {:.1} s of sending ({:.1} s writable): {rate:.1} msg/s",
        load["acked"],
        number(&load["seconds"]),
        writable_s
    );
    assert!(rate >= 20.0, "only {rate:.1} msg/s acked while writable");

    // The three faults happened, each one on the primary of the moment.
    let kinds: Vec<&str> = faults.iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["kill", "kill", "hang"]);
    assert_ne!(
        faults[0]["host"], faults[1]["host"],
        "the second kill is of the new primary"
    );
    for f in faults {
        assert!(
            f["new_primary_after_s"].is_number(),
            "no new primary after {}: {f:#}",
            f["fault"]
        );
        let outage = number(&f["outage_s"]);
        assert!(
            outage <= ttl + 5.0,
            "{}: write outage {outage:.2} s > ttl {ttl} + 5 s: {f:#}",
            f["fault"]
        );
        assert_eq!(f["lost"], 0, "{f:#}");
        assert_eq!(f["duplicates"], 0, "{f:#}");
    }

    // Nothing acked was lost or stored twice in PostgreSQL.
    let db = &report["db"];
    assert_eq!(db["checked"], load["acked"], "{db:#}");
    for key in ["lost", "wrong_seq", "duplicates", "seq_duplicates"] {
        assert_eq!(db[key], 0, "db {key}: {db:#}");
    }
    // Every client got every acked message, once, in order; nothing stayed unacked.
    for key in ["missing", "duplicates", "out_of_order", "gaps", "unacked"] {
        assert_eq!(load[key], 0, "load {key}: {load:#}");
    }
    assert_eq!(load["delivered"], true, "{load:#}");
}
