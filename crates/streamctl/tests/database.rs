//! The database role end to end through the real binaries: `streamctl up` starts etcd (db1, db2
//! and the witness on lb1) and Patroni with PostgreSQL on the db hosts beside the streaming
//! hosts, and returns with a primary; the services' role writes on it; a hung replica resumes;
//! `streamctl kill <primary>` leaves none of that host's processes (postmaster and backends
//! included) and the other db host takes over within ttl + 10 s with the committed rows; the old
//! primary comes back as a replica; `down` leaves no etcd, Patroni or PostgreSQL behind.
//!
//! Needs postgresql-15, patroni, etcd-server, python3-psycopg2 (scripts/setup-debian.sh), root
//! (Patroni runs as the postgres user), and the workspace binaries: `#[ignore]`d in a bare
//! `cargo test`; scripts/test.sh runs it with `--include-ignored`, one cluster at a time.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use streaming_core::config::HostConfig;
use streaming_streamctl::cluster::Layout;
use streaming_streamctl::db;

/// Loopback prefix of this test's cluster (127.76 and 127.73 are the other tests').
const PREFIX: &str = "127.78";

mod common;
use common::{Cluster, json_of, repo_root, run, streamctl};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn status(state: &Path) -> Vec<Value> {
    let status = json_of(&run(streamctl()
        .args(["status", "--json", "--state"])
        .arg(state)));
    status.as_array().unwrap().clone()
}

fn db_status(state: &Path, host: &str) -> Value {
    status(state)
        .into_iter()
        .find(|s| s["name"] == host)
        .unwrap_or_else(|| panic!("{host} in status"))
}

/// Polls Patroni until `host` is a running replica streaming from `primary`; seconds taken.
fn wait_replica(configs: &[HostConfig], primary: &str, host: &str, timeout: Duration) -> f64 {
    let rt = runtime();
    let started = Instant::now();
    let cluster = &configs[0].cluster;
    loop {
        let members: Vec<_> = rt.block_on(db::members(cluster));
        let role = |name: &str| {
            members
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, m)| m.as_ref().ok().cloned())
        };
        if let (Some(p), Some(r)) = (role(primary), role(host))
            && p.role == "primary"
            && r.role == "replica"
            && r.state == "running"
            && p.streaming.iter().any(|s| s == host)
        {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < timeout,
            "{host} is no streaming replica of {primary} after {timeout:?}: {members:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Processes that are dead or zombies are gone.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z') && !rest.starts_with('X'))
}

fn describe(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    format!("{stat} | {cmdline}")
}

fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim().chars().next()
}

#[test]
#[ignore = "end to end: needs PostgreSQL, Patroni, etcd, root and the workspace binaries (scripts/test.sh)"]
fn database_primary_fails_over_and_rejoins() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let _cluster = Cluster {
        state: state.clone(),
    };

    // Up: the stream plays and a primary answers /primary.
    let started = Instant::now();
    let up = json_of(&run(streamctl()
        .arg("up")
        .arg("--json")
        .arg("--cluster")
        .arg(repo_root().join("cluster.nix"))
        .arg("--state")
        .arg(&state)
        .args(["--address-prefix", PREFIX])));
    eprintln!(
        "up took {:.1} s: playing after {} s, db primary {} after {} s, streaming {} after {} s",
        started.elapsed().as_secs_f64(),
        up["startup_s"],
        up["db_primary"],
        up["db_primary_s"],
        up["db_streaming"],
        up["db_streaming_s"]
    );
    let primary = up["db_primary"].as_str().expect("db_primary").to_owned();
    let replica = if primary == "db1" { "db2" } else { "db1" }.to_owned();
    let configs = Layout::new(&state).unwrap().load_configs().unwrap();
    let config_of = |name: &str| configs.iter().find(|c| c.name == name).unwrap().clone();
    let ttl = configs[0].cluster.database.ttl;
    let rt = runtime();
    assert_eq!(
        rt.block_on(db::primary(&configs)).as_deref(),
        Some(primary.as_str())
    );

    // The services' role owns the database: it creates a table and writes.
    let psql = |host: &str, sql: &str| db::psql_app(&configs, host, sql, Duration::from_secs(10));
    let count = psql(
        &primary,
        "CREATE TABLE probe (id int PRIMARY KEY); INSERT INTO probe VALUES (1); \
         SELECT count(*) FROM probe",
    )
    .unwrap();
    assert_eq!(count, "1");
    assert!(
        db::app_database_url(&configs, &primary)
            .unwrap()
            .starts_with("postgres://streaming:")
    );
    let rejoin_s = wait_replica(&configs, &primary, &replica, Duration::from_secs(30));
    eprintln!("{replica} streaming {rejoin_s:.1} s after up returned");
    let s = db_status(&state, &primary);
    assert_eq!(
        (s["db_role"].as_str(), s["health"].as_str()),
        (Some("primary"), Some("ok")),
        "{s}"
    );
    assert_eq!(s["etcd"], "ok", "{s}");
    assert_eq!(db_status(&state, &replica)["db_role"], "replica");
    assert_eq!(
        db_status(&state, "lb1")["etcd"],
        "ok",
        "the witness runs etcd"
    );

    // Hang the replica: every process of it stops (postmaster and backends too), then resumes.
    let replica_config = config_of(&replica);
    run(streamctl()
        .args(["kill", &replica, "--hang", "--state"])
        .arg(&state));
    let hung = db::host_processes(&replica_config, None);
    assert!(
        hung.len() >= 5,
        "etcd, Patroni, postmaster and its children: {hung:?}"
    );
    for pid in &hung {
        assert_eq!(
            process_state(*pid),
            Some('T'),
            "pid {pid} of {replica} is stopped"
        );
    }
    assert_eq!(db_status(&state, &replica)["process"], "hung");
    run(streamctl().args(["start", &replica, "--state"]).arg(&state));
    for pid in &hung {
        assert_ne!(
            process_state(*pid),
            Some('T'),
            "pid {pid} of {replica} resumed"
        );
    }
    wait_replica(&configs, &primary, &replica, Duration::from_secs(30));

    // Kill the primary: nothing of that host survives, the replica takes over.
    let primary_config = config_of(&primary);
    let doomed = db::host_processes(&primary_config, None);
    let postmaster = db::postmaster_pid(&primary_config).expect("the primary's postmaster");
    assert!(doomed.contains(&postmaster));
    let killed_at = Instant::now();
    run(streamctl().args(["kill", &primary, "--state"]).arg(&state));
    let survivors: Vec<String> = doomed
        .iter()
        .copied()
        .filter(|p| alive(*p))
        .map(describe)
        .collect();
    assert!(
        survivors.is_empty(),
        "{primary} processes alive after kill: {survivors:#?}"
    );
    assert!(db::host_processes(&primary_config, None).is_empty());
    let pgrep = std::process::Command::new("pgrep")
        .arg("-f")
        .arg(primary_config.paths.state_dir.join(""))
        .output()
        .unwrap();
    assert!(
        pgrep.stdout.is_empty(),
        "pgrep finds {primary}: {}",
        String::from_utf8_lossy(&pgrep.stdout)
    );
    let limit = Duration::from_secs(u64::from(ttl) + 10);
    let new_primary = loop {
        if let Some(p) = rt.block_on(db::primary(&configs)) {
            break p;
        }
        assert!(
            killed_at.elapsed() < limit,
            "no new primary {limit:?} after the kill"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let failover_s = killed_at.elapsed().as_secs_f64();
    assert_eq!(new_primary, replica);
    // Writable (promotion may trail the leader lock by a moment) and the committed row is there.
    let count = loop {
        match psql(
            &new_primary,
            "INSERT INTO probe VALUES (2); SELECT count(*) FROM probe",
        ) {
            Ok(count) => break count,
            Err(e) if killed_at.elapsed() < limit => {
                eprintln!("not writable yet: {e:#}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{new_primary} not writable {limit:?} after the kill: {e:#}"),
        }
    };
    let writable_s = killed_at.elapsed().as_secs_f64();
    assert_eq!(count, "2", "the row committed before the kill survived");
    eprintln!(
        "failover: {new_primary} primary {failover_s:.1} s and writable {writable_s:.1} s after \
         killing {primary} (ttl {ttl} s)"
    );

    // The old primary comes back as a replica of the new one (pg_rewind).
    let restarted = Instant::now();
    run(streamctl().args(["start", &primary, "--state"]).arg(&state));
    wait_replica(&configs, &new_primary, &primary, Duration::from_secs(40));
    eprintln!(
        "rejoin: {primary} streaming from {new_primary} {:.1} s after start",
        restarted.elapsed().as_secs_f64()
    );
    assert_eq!(psql(&primary, "SELECT count(*) FROM probe").unwrap(), "2");

    // Down: no etcd, Patroni or PostgreSQL process of this cluster is left.
    let mut everything: Vec<i32> = configs
        .iter()
        .filter(|c| c.etcd.is_some() || c.patroni.is_some())
        .flat_map(|c| db::host_processes(c, None))
        .collect();
    everything.sort();
    assert!(everything.len() >= 10, "{everything:?}");
    let stopping = Instant::now();
    run(streamctl().arg("down").arg("--state").arg(&state));
    eprintln!("down took {:.1} s", stopping.elapsed().as_secs_f64());
    let left: Vec<i32> = everything.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "left after down: {left:?}");
    for c in &configs {
        assert!(
            db::host_processes(c, None).is_empty(),
            "{} left processes",
            c.name
        );
    }
}
