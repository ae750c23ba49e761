//! The restore drill (issue 15, item 5, docs/backup.md): chat messages written through the real
//! chat clients in three batches around a pgBackRest backup and a point in time T; both db hosts
//! destroyed (every process SIGKILLed, data directories deleted); `streamctl restore --to T`;
//! then every message acked up to T must be in PostgreSQL exactly once and nothing after T.
//! Prints the figures: backup duration and size, restore duration, time until both db hosts
//! are healthy again.
//!
//! `#[ignore]`d in a bare `cargo test` (needs ffmpeg, nix-instantiate, PostgreSQL 15, Patroni,
//! etcd, pgBackRest and the workspace binaries); scripts/test.sh runs it with
//! `--include-ignored`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use streaming_runner::cluster::Layout;
use streaming_runner::db;

/// Loopback prefix of this test's cluster.
const PREFIX: &str = "127.90";
/// An LB, two broadcasts with their ingest and source, both db hosts.
const LEFT_OUT: [&str; 4] = ["broadcast3", "broadcast4", "ingest2", "source2"];

mod common;
use common::{LocalCluster, json_of, run, streamctl};

/// One batch of chat messages through `streamctl chat` (real clients, real servers); returns
/// the run's account prefix and its acked (user, id) pairs.
fn chat_batch(state: &Path, dir: &Path, name: &str, seconds: u32) -> (String, Vec<String>) {
    let acked_file = dir.join(format!("acked-{name}.json"));
    let output = run(streamctl()
        .args(["chat", "--json", "--clients", "4", "--rate", "8"])
        .args(["--seconds", &seconds.to_string(), "--acked"])
        .arg(&acked_file)
        .arg("--state")
        .arg(state));
    let report = json_of(&output);
    let doc: Value = serde_json::from_slice(&std::fs::read(&acked_file).unwrap()).unwrap();
    let mut acked: Vec<String> = doc["acked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m["user"].as_str().unwrap(),
                m["id"].as_str().unwrap()
            )
        })
        .collect();
    acked.sort();
    eprintln!(
        "batch {name}: {} acked, {} unacked",
        acked.len(),
        report["unacked"]
    );
    assert!(!acked.is_empty(), "batch {name}: nothing acked: {report:#}");
    assert_eq!(report["unacked"], 0, "batch {name}: {report:#}");
    (doc["user_prefix"].as_str().unwrap().to_owned(), acked)
}

/// The stored (user, client id) pairs of a run's accounts, on the current primary, sorted.
fn stored(state: &Path, prefix: &str) -> Vec<String> {
    let configs = Layout::new(state).unwrap().load_configs().unwrap();
    let primary = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(db::primary(&configs))
        .expect("a primary");
    let sql = format!(
        "SELECT u.name || ' ' || e.client_id FROM chat_events e JOIN users u ON u.id = e.user_id \
         WHERE e.kind = 'message' AND starts_with(u.name, '{prefix}') ORDER BY 1"
    );
    let text = db::psql_app(&configs, &primary, &sql, Duration::from_secs(30)).unwrap();
    text.lines().map(str::to_owned).collect()
}

fn primary_sql(state: &Path, sql: &str) -> String {
    let configs = Layout::new(state).unwrap().load_configs().unwrap();
    let primary = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(db::primary(&configs))
        .expect("a primary");
    db::psql_app(&configs, &primary, sql, Duration::from_secs(30)).unwrap()
}

fn archive_check(state: &Path) {
    run(streamctl()
        .args(["backup", "--archive-check", "--state"])
        .arg(state));
}

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate, PostgreSQL + Patroni + etcd + pgBackRest and the workspace binaries (scripts/test.sh)"]
fn point_in_time_restore_keeps_what_was_acked_up_to_t_and_nothing_after() {
    let started = Instant::now();
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    cluster.up_without(PREFIX, &LEFT_OUT);
    eprintln!("cluster up in {:.0} s", started.elapsed().as_secs_f64());

    let (prefix_a, acked_a) = chat_batch(&state, cluster.dir(), "a", 6);
    let backup = json_of(&run(streamctl()
        .args(["backup", "--type", "full", "--json", "--state"])
        .arg(&state)));
    eprintln!("{}", backup["info_text"].as_str().unwrap_or_default());
    assert_eq!(backup["kind"], "full", "{backup:#}");
    let (prefix_b, acked_b) = chat_batch(&state, cluster.dir(), "b", 6);
    // An incremental backup on top: the restore below starts from it.
    let incr = json_of(&run(streamctl()
        .args(["backup", "--json", "--state"])
        .arg(&state)));
    assert_eq!(incr["kind"], "incr", "{incr:#}");
    // B's commits are in the repository; T is read from the primary's clock after them.
    archive_check(&state);
    let target = primary_sql(
        &state,
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    );
    eprintln!("T = {target}");
    let (prefix_c, acked_c) = chat_batch(&state, cluster.dir(), "c", 6);
    // C's commits archived too: recovery needs a commit after T to know it has reached T.
    archive_check(&state);
    for (prefix, acked) in [
        (&prefix_a, &acked_a),
        (&prefix_b, &acked_b),
        (&prefix_c, &acked_c),
    ] {
        assert_eq!(
            &stored(&state, prefix),
            acked,
            "before the disaster: {prefix}"
        );
    }

    // The disaster: both db hosts die (etcd members included) and lose their data.
    for host in ["db1", "db2"] {
        run(streamctl().args(["kill", host, "--state"]).arg(&state));
        let pgdata = state.join("hosts").join(host).join("pgdata");
        std::fs::remove_dir_all(&pgdata).unwrap();
    }
    let restore_started = Instant::now();
    let restore = json_of(&run(streamctl()
        .args(["restore", "--to", &target, "--json", "--state"])
        .arg(&state)));
    let restore_s = restore_started.elapsed().as_secs_f64();
    eprintln!("{restore:#}");
    assert_eq!(restore["streaming"].as_array().map(Vec::len), Some(1));

    let after: BTreeMap<&str, Vec<String>> = [
        ("a", stored(&state, &prefix_a)),
        ("b", stored(&state, &prefix_b)),
        ("c", stored(&state, &prefix_c)),
    ]
    .into();
    assert_eq!(
        after["a"], acked_a,
        "batch a (before the backup) after the restore"
    );
    assert_eq!(after["b"], acked_b, "batch b (after the backup, before T)");
    assert!(
        after["c"].is_empty(),
        "batch c is after T: {:?}",
        after["c"]
    );

    // The chat writes again on the restored cluster.
    let (prefix_d, acked_d) = chat_batch(&state, cluster.dir(), "d", 4);
    assert_eq!(stored(&state, &prefix_d), acked_d, "after the restore");

    eprintln!(
        "FIGURES: full backup {:.1} s, database {} B, stored {} B; incremental {:.1} s, stored {} B; restore (command) {restore_s:.1} s: \
         files {:.1} s, recovery {:.1} s, primary after {:.1} s, both db hosts healthy after {:.1} s; \
         {} + {} messages kept, {} after T gone; whole test {:.0} s",
        backup["seconds"].as_f64().unwrap(),
        backup["database_bytes"],
        backup["repository_bytes"],
        incr["seconds"].as_f64().unwrap(),
        incr["repository_bytes"],
        restore["restore_s"].as_f64().unwrap(),
        restore["recovery_s"].as_f64().unwrap(),
        restore["primary_after_s"].as_f64().unwrap(),
        restore["healthy_after_s"].as_f64().unwrap(),
        acked_a.len(),
        acked_b.len(),
        acked_c.len(),
        started.elapsed().as_secs_f64()
    );
}
