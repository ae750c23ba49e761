//! The viewer page in a real browser, end to end: Debian's headless chromium driven by
//! playwright-core (tests/browser/page-test.mjs) against a local cluster. Context A enters
//! through an LB and plays; context B plays on another broadcast; a user registered in each
//! chats across the two broadcasts; then A's broadcast is killed (`streamctl kill`) and A must
//! keep playing, fail over, reconnect its chat elsewhere and still reach B. Then the LB A would
//! ask first is hung (SIGSTOP) and A's broadcast killed, and again with an LB dead: A must
//! skip that LB and move on with no stall. HTML in a message must stay text, and the page must
//! raise no CSP violation and no script error.
//!
//! Needs what the other end-to-end tests need plus chromium and `npm ci` (node_modules with
//! playwright-core); scripts/setup-debian.sh installs both. Missing ones fail the test with a
//! clear message rather than let it pass silently. Screenshots go to target/page-test/ (or
//! $PAGE_TEST_OUT). Run: `cargo test -p streaming-streamctl --test browser -- --include-ignored`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Loopback prefix of this test's cluster (the other end-to-end tests use 127.76 and 127.73).
const PREFIX: &str = "127.79";

/// The whole browser run, cluster excluded; the script's own watchdog is shorter.
const BROWSER_DEADLINE: Duration = Duration::from_secs(300);

mod common;
use common::{LocalCluster, repo_root, run, streamctl};

fn chromium() -> Option<PathBuf> {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/bin/chromium", "/usr/lib/chromium/chromium"].map(PathBuf::from))
        .find(|p| p.is_file())
}

/// What the test needs besides the cluster; the reason when something is missing.
fn prerequisites(root: &Path) -> Result<PathBuf, String> {
    let chromium = chromium().ok_or(
        "chromium is not installed (/usr/bin/chromium): run scripts/setup-debian.sh \
         (apt-get install chromium)",
    )?;
    if Command::new("node").arg("--version").output().is_err() {
        return Err(
            "node is not installed: run scripts/setup-debian.sh (apt-get install npm)".into(),
        );
    }
    if !root
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return Err(format!(
            "{}/node_modules/playwright-core is missing: run `npm ci` at the repository root \
             (scripts/setup-debian.sh does)",
            root.display()
        ));
    }
    Ok(chromium)
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

#[test]
#[ignore = "end to end in chromium: needs chromium, npm ci, ffmpeg, nix-instantiate and the workspace binaries (scripts/test.sh)"]
fn page_plays_chats_and_survives_its_broadcast_in_chromium() {
    let root = repo_root();
    let chromium =
        prerequisites(&root).unwrap_or_else(|why| panic!("the browser test cannot run: {why}"));

    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    let up = cluster.up(PREFIX, None, &[]);
    let lb = up["viewer_url"]
        .as_str()
        .expect("viewer_url")
        .trim_end_matches('/')
        .to_owned();
    let broadcasts: serde_json::Map<String, Value> = up["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter(|h| h["role"] == "broadcast")
        .map(|h| (h["name"].as_str().unwrap().to_owned(), h["url"].clone()))
        .collect();
    assert!(broadcasts.len() >= 4, "need 4 broadcasts: {up:#}");
    let lbs: Vec<(String, String)> = up["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["role"] == "lb")
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_owned(),
                h["url"].as_str().unwrap().trim_end_matches('/').to_owned(),
            )
        })
        .collect();

    let out_dir = std::env::var_os("PAGE_TEST_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/page-test"));
    // The `admin` account (created from this secret at first start) moderates in context B.
    let admin_password = std::fs::read_to_string(state.join("secrets/admin-password"))
        .map(|p| p.trim().to_owned())
        .ok()
        .filter(|p| !p.is_empty());
    let args = json!({
        "lb": lb,
        "channel": "test",
        "ignore_https_errors": true,
        "broadcasts": broadcasts,
        "out_dir": out_dir,
        "chromium": chromium,
        "play_after_kill_s": 8,
        "timeout_s": BROWSER_DEADLINE.as_secs() - 20,
        "admin_password": admin_password,
    });
    let mut child = Command::new("node")
        .arg(root.join("tests/browser/page-test.mjs"))
        .arg(args.to_string())
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node starts");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    // The script asks for the kill with a `KILL <broadcast>` line and ends with one JSON line.
    let deadline = Instant::now() + BROWSER_DEADLINE;
    let mut killed = None;
    let mut report = None;
    while report.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("KILL ") => {
                let name = line["KILL ".len()..].trim().to_owned();
                assert!(broadcasts.contains_key(&name), "asked to kill {name:?}");
                run(streamctl()
                    .arg("kill")
                    .arg(&name)
                    .arg("--state")
                    .arg(&state));
                eprintln!("killed {name}");
                stdin.write_all(b"killed\n").unwrap();
                stdin.flush().unwrap();
                // The first kill is the one the chat checks are about; later ones follow LB faults.
                killed.get_or_insert(name);
            }
            Ok(line) if line.starts_with("LB ") => {
                let mut words = line.split_whitespace().skip(1);
                let (action, url) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let name = lbs
                    .iter()
                    .find(|(_, u)| u == url.trim_end_matches('/'))
                    .map(|(n, _)| n.clone())
                    .unwrap_or_else(|| panic!("asked about an unknown LB: {line}"));
                match action {
                    "hang" => run(streamctl()
                        .args(["kill", &name, "--hang", "--state"])
                        .arg(&state)),
                    "kill" => run(streamctl().args(["kill", &name, "--state"]).arg(&state)),
                    "start" => run(streamctl().args(["start", &name, "--state"]).arg(&state)),
                    _ => panic!("unknown LB action: {line}"),
                };
                if action == "start" {
                    wait_healthy(&state, &name);
                }
                eprintln!("{action} {name}");
                stdin.write_all(b"done\n").unwrap();
                stdin.flush().unwrap();
            }
            Ok(line) if line.starts_with('{') => {
                report = Some(
                    serde_json::from_str::<Value>(&line)
                        .unwrap_or_else(|e| panic!("page-test result is not JSON ({e}): {line}")),
                );
            }
            Ok(line) => eprintln!("page-test: {line}"),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("page-test gave no result within {BROWSER_DEADLINE:?}: {e}");
            }
        }
    }
    drop(stdin);
    let status = child.wait().expect("node exits");
    let report = report.unwrap();
    eprintln!("page-test report: {report:#}");

    let errors = report["errors"].as_array().cloned().unwrap_or_default();
    assert!(errors.is_empty(), "page-test errors: {errors:#?}");
    assert!(status.success(), "page-test exited with {status}");
    let victim = killed.expect("the script asked for a kill");
    assert_eq!(report["a_broadcast"], victim.as_str());
    assert_ne!(
        report["b_broadcast"], report["a_broadcast"],
        "B on another broadcast"
    );
    assert!(
        report["a_broadcast_after"]
            .as_str()
            .is_some_and(|b| b != victim),
        "A moved off the killed broadcast: {report:#}"
    );

    // The player reported what it played; the page listed every channel of cluster.nix and
    // moved to another one through an LB.
    assert!(
        report["player_reports"]["sent"].as_u64() >= Some(1),
        "{report:#}"
    );
    assert_eq!(report["player_reports"]["last_status"], 204, "{report:#}");
    assert_eq!(
        report["channels"],
        json!(["test", "backstage"]),
        "{report:#}"
    );
    assert_eq!(report["switched_to"]["channel"], "backstage", "{report:#}");
    assert_eq!(report["switched_to"]["title"], "backstage", "{report:#}");

    // Chat crossed broadcasts both ways, before and after the failover.
    let roundtrips = report["chat_roundtrip_ms"].as_array().unwrap();
    assert_eq!(roundtrips.len(), 4, "four chat round trips: {report:#}");
    assert!(f64_of(&report["chat_reconnect_s"]) < 20.0, "{report:#}");
    assert_eq!(
        report["html_inert"], true,
        "HTML in a message must stay text"
    );
    assert!(report["chat_reconnects"].as_u64() >= Some(1), "{report:#}");
    assert_eq!(report["logout"], true, "{report:#}");
    if admin_password.is_some() {
        assert_eq!(report["moderator_delete"], true, "{report:#}");
    }

    // Playback went on: a generous bound on the stall after the kill, no fatal player error.
    let stall = f64_of(&report["stall_s"]);
    let frozen = f64_of(&report["frozen_s"]);
    eprintln!(
        "stall {stall} s, frozen {frozen} s, failover {} s, chat reconnect {} s, chat round trips {:?} ms",
        report["failover_s"], report["chat_reconnect_s"], roundtrips
    );
    assert!(stall < 2.0, "stall after the kill: {stall} s");
    // In low-latency mode, with the latency on the page (the figure goes to docs/latency.md).
    assert_eq!(
        report["low_latency"], true,
        "hls.js plays parts: {report:#}"
    );
    let shown = report["latency_text"].as_str().unwrap_or_default();
    assert!(
        shown.starts_with("Latency: ") && shown.ends_with(" s"),
        "{shown:?}"
    );
    eprintln!("latency {} s (page shows {shown:?})", report["latency_s"]);
    assert!(frozen < 2.0, "play head stood still for {frozen} s");
    assert!(f64_of(&report["failover_s"]) < 15.0, "{report:#}");

    // Every way in: with the LB it asked first hung, then dead, A moved on at once.
    let phases = report["lb_phases"].as_array().cloned().unwrap_or_default();
    assert_eq!(phases.len(), 2, "an LB hung, then one dead: {report:#}");
    for p in &phases {
        eprintln!(
            "LB {} ({}), then {} killed: moved to {} after {} s, stall {} s, frozen {} s, {} LB attempts failed",
            p["lb_fault"],
            p["lb"],
            p["victim"],
            p["broadcast_after"],
            p["failover_s"],
            p["stall_s"],
            p["frozen_s"],
            p["lb_failures"]
        );
        assert!(f64_of(&p["stall_s"]) < 1.0, "{p:#}");
        assert!(f64_of(&p["frozen_s"]) < 1.0, "{p:#}");
        assert!(p["lb_failures"].as_u64() >= Some(1), "{p:#}");
    }

    // Nothing blocked by the CSP, no script error, and a screenshot to look at.
    assert_eq!(report["csp_violations"], json!([]), "CSP violations");
    assert_eq!(report["page_errors"], json!([]), "page errors");
    let shot = report["screenshot"].as_str().expect("screenshot path");
    assert!(
        std::fs::metadata(shot).is_ok_and(|m| m.len() > 10_000),
        "screenshot {shot}"
    );
}

/// Waits until `streamctl status` shows `name` up and healthy (an LB: it sees a broadcast).
fn wait_healthy(state: &Path, name: &str) {
    let start = Instant::now();
    loop {
        let out = run(streamctl().args(["status", "--json", "--state"]).arg(state));
        let hosts: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if hosts
            .iter()
            .any(|h| h["name"] == name && h["up"] == true && h["health"] == "ok")
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{name} not healthy within 30 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
