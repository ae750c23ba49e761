//! The database role end to end through the real binaries: `streamctl up` starts etcd (db1, db2
//! and the witness on lb1) and Patroni with PostgreSQL on the db hosts beside the streaming
//! hosts, and returns with a primary; the services' role writes on it; a hung replica resumes;
//! `streamctl kill <primary>` leaves none of that host's processes (postmaster and backends
//! included) and the other db host takes over within ttl + 10 s with the committed rows; the old
//! primary comes back as a replica; accounts and chat refuse bad input (wrong or guessed
//! passwords, taken names, forged sessions, empty/oversized/flooding messages) with clear
//! errors while HTML and SQL metacharacters travel as plain text; parallel password guessing
//! over two broadcasts gets the free attempts only while the owner still logs in, moderators
//! cannot act on moderators, a rotated admin secret takes effect on SIGHUP; the chat socket's
//! close handshake ends promptly with the client's code, mid-replay and mid-write too
//! (`chat_close`), and with 1001 on `down`; `down` leaves no etcd, Patroni or PostgreSQL behind. The database layer is closed to strangers: etcd refuses a
//! client without a certificate from the cluster CA, Patroni refuses a failover without a
//! client certificate and credentials (and does not fail over), PostgreSQL refuses a
//! plaintext connection, and no password of the layer shows on any command line.
//!
//! Needs postgresql-15, patroni, etcd-server, python3-psycopg2 (scripts/setup-debian.sh), root
//! (Patroni runs as the postgres user), and the workspace binaries: `#[ignore]`d in a bare
//! `cargo test`; scripts/test.sh runs it with `--include-ignored`, one cluster at a time.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use streaming_clients::chat::{Net, Target, Ws};
use streaming_core::config::HostConfig;
use streaming_runner::cluster::Layout;
use streaming_runner::db;
use tokio_tungstenite::tungstenite::Message;

/// Loopback prefix of this test's cluster (127.76 and 127.73 are the other tests').
const PREFIX: &str = "127.78";

mod chat_close;
mod common;
use common::{LocalCluster, json_of, run, streamctl};

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
    let client = db::rest_client(&configs[0]).unwrap();
    loop {
        let members: Vec<_> = rt.block_on(db::members(&client, cluster));
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
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();

    // Up: the stream plays and a primary answers /primary.
    let started = Instant::now();
    let up = cluster.up(PREFIX, None, &[]);
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

    // The same SQL without TLS finds no pg_hba line: refused before any password is sent.
    let plain = db::psql_app_with(
        &configs,
        &primary,
        "SELECT 1",
        Duration::from_secs(10),
        "disable",
    )
    .expect_err("a plaintext connection is refused");
    eprintln!("plaintext PostgreSQL: {plain:#}");
    assert!(format!("{plain:#}").contains("no encryption"), "{plain:#}");
    rt.block_on(strangers_are_refused(&configs, &primary));
    no_secret_on_a_command_line(&configs);
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

    // Accounts and chat through the real broadcasts: bad input gets a clear answer and changes
    // nothing that was accepted.
    rt.block_on(chat_refuses_bad_input(&state));
    rt.block_on(accounts_resist_guessing(&state, &configs));
    rt.block_on(chat_close::chat_closes_cleanly(&state, &configs));
    let mut socket = rt.block_on(chat_close::open_socket(&state));

    // Down: no etcd, Patroni or PostgreSQL process of this cluster is left.
    let mut everything: Vec<i32> = configs
        .iter()
        .filter(|c| c.etcd.is_some() || c.patroni.is_some())
        .flat_map(|c| db::host_processes(c, None))
        .collect();
    everything.sort();
    assert!(everything.len() >= 10, "{everything:?}");
    let stopping = Instant::now();
    let down = {
        let state = state.clone();
        std::thread::spawn(move || run(streamctl().arg("down").arg("--state").arg(&state)))
    };
    // SIGTERM: every chat socket is told (1001) and closed before the broadcast exits.
    let ended = rt.block_on(chat_close::read_to_end(&mut socket));
    eprintln!(
        "chat close: down: Close {:?} after {:.1} ms, EOF after {:.1} ms",
        ended.code,
        ended.close_s * 1e3,
        ended.eof_s * 1e3
    );
    assert_eq!(ended.code, Some(1001), "a broadcast going down says so");
    down.join().unwrap();
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

/// etcd and Patroni's REST API as seen by someone who reaches their ports without the cluster's
/// certificates and credentials (a real host's certificate, then a wrong password, too).
async fn strangers_are_refused(configs: &[HostConfig], primary: &str) {
    let config = |name: &str| configs.iter().find(|c| c.name == name).unwrap();
    let db1 = config("db1");
    let etcd = db1.etcd.as_ref().unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&db1.paths.ca_cert).unwrap()).unwrap();
    let builder = || {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca.clone())
    };
    let anonymous = builder().build().unwrap();
    let identity = |host: &HostConfig| {
        let mut pem = std::fs::read(&host.paths.tls_cert).unwrap();
        pem.extend(std::fs::read(&host.paths.tls_key).unwrap());
        reqwest::Identity::from_pem(&pem).unwrap()
    };
    // A broadcast's certificate: from the cluster CA, but no db host's.
    let with_cert = builder()
        .identity(identity(config("broadcast1")))
        .build()
        .unwrap();

    // etcd: TLS required, and a client certificate with it; the host's own passes.
    let plain_url = etcd.client_url.replace("https://", "http://");
    let refused = anonymous
        .get(format!("{plain_url}/v3/kv/range"))
        .send()
        .await;
    // Go's TLS server answers a plaintext request with a 400 at most.
    assert!(
        !refused
            .as_ref()
            .is_ok_and(|r| r.status() != reqwest::StatusCode::BAD_REQUEST),
        "plain HTTP to etcd: {refused:?}"
    );
    let refused = anonymous
        .post(format!("{}/v3/kv/put", etcd.client_url))
        .json(&json!({"key": "eA==", "value": "eQ=="}))
        .send()
        .await;
    eprintln!("etcd without a client certificate: {refused:?}");
    assert!(
        refused.is_err(),
        "etcd accepted a client without a certificate"
    );
    let own = db::etcd_client(db1).unwrap();
    assert!(db::etcd_health(&own, etcd).await.is_ok());

    // Patroni: reads stay open over HTTPS, plain HTTP gets no answer.
    let entry = db1.cluster.host(primary).unwrap();
    let base = db::rest_url(entry);
    let primary_answer = anonymous
        .get(format!("{base}/primary"))
        .send()
        .await
        .unwrap();
    assert_eq!(primary_answer.status(), 200);
    let plain_base = base.replace("https://", "http://");
    let plain = anonymous.get(format!("{plain_base}/primary")).send().await;
    assert!(
        plain.is_err() || plain.as_ref().is_ok_and(|r| r.status() != 200),
        "{plain:?}"
    );
    // A failover without certificate, without credentials, with wrong ones: all refused.
    let failover = json!({"candidate": if primary == "db1" { "db2" } else { "db1" }});
    let password = streaming_core::secrets::read_secret(&db1.paths.db_superuser_password).unwrap();
    let attempts = [
        (&anonymous, None, 403),
        (&with_cert, None, 401),
        (&with_cert, Some("wrong password"), 401),
        (&anonymous, Some(password.as_str()), 403),
    ];
    for (client, pass, expected) in attempts {
        let mut request = client.post(format!("{base}/failover")).json(&failover);
        if let Some(pass) = pass {
            request = request.basic_auth(db::RESTAPI_USER, Some(pass));
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        eprintln!(
            "POST /failover (certificate: {}, password: {}): {status} {body}",
            std::ptr::eq(client, &with_cert),
            pass.is_some()
        );
        assert_eq!(status, expected, "{body}");
    }
    // The credentials themselves work (a harmless request: reload the configuration).
    let reload = with_cert
        .post(format!("{base}/reload"))
        .basic_auth(db::RESTAPI_USER, Some(&password))
        .send()
        .await
        .unwrap();
    assert!(reload.status().is_success(), "{:?}", reload.text().await);
    // Nothing moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(db::primary(configs).await.as_deref(), Some(primary));
}

/// No process of the cluster carries a database password (or the REST API's) in its command
/// line.
fn no_secret_on_a_command_line(configs: &[HostConfig]) {
    let paths = &configs[0].paths;
    let secrets: Vec<String> = [
        &paths.db_password,
        &paths.db_superuser_password,
        &paths.db_replication_password,
    ]
    .into_iter()
    .map(|p| streaming_core::secrets::read_secret(p).unwrap())
    .collect();
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        seen += 1;
        let cmdline = String::from_utf8_lossy(&cmdline);
        for secret in &secrets {
            assert!(
                !cmdline.contains(secret.as_str()),
                "a password on a command line: pid {}",
                entry.file_name().to_string_lossy()
            );
        }
    }
    assert!(seen > 20, "{seen} processes read");
}

async fn post(net: &Net, url: url::Url, body: Value, session: Option<&str>) -> (u16, Value) {
    post_from(net.http(), url, body, session).await
}

/// The next JSON frame that is not an event (welcome, ack, error, pong), within 20 s; `None`
/// when the server closed the socket (its close code with it).
async fn reply(ws: &mut Ws) -> Result<Value, Option<u16>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a reply within 20 s");
        match frame {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("JSON frame");
                if matches!(
                    v["type"].as_str(),
                    Some("welcome" | "ack" | "error" | "pong")
                ) {
                    return Ok(v);
                }
            }
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
}

async fn hello(
    net: &Net,
    base: &url::Url,
    session: Option<&str>,
    since: Option<i64>,
) -> (Ws, Value) {
    let mut ws = net.connect(base).await.expect("chat socket");
    send(
        &mut ws,
        json!({"type": "hello", "session": session, "since": since}),
    )
    .await;
    let welcome = reply(&mut ws).await.expect("welcome or error");
    (ws, welcome)
}

async fn chat_refuses_bad_input(state: &Path) {
    let net = Net::new(Target::resolve(None, state, None, None).unwrap()).unwrap();
    let broadcasts = net.discover().await.unwrap();
    assert!(broadcasts.len() >= 2, "{broadcasts:?}");
    let (a, b) = (&broadcasts[0].base, &broadcasts[1].base);
    let api = |base: &url::Url, path: &str| base.join(path).unwrap();
    let tag = std::process::id();
    let name = format!("Bad_{tag}");

    // Registration: case-insensitive uniqueness, names without markup, passwords with a length.
    let (status, body) = post(
        &net,
        api(a, "/api/account/register"),
        json!({"name": name, "password": "correct horse"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let session = body["session"].as_str().unwrap().to_owned();
    let (status, body) = post(
        &net,
        api(b, "/api/account/register"),
        json!({"name": name.to_lowercase(), "password": "another one"}),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("that name is taken"))
    );
    for bad in [
        "<script>alert(1)</script>",
        "x'; DROP TABLE users; --",
        "ab",
        "admin",
    ] {
        let (status, body) = post(
            &net,
            api(a, "/api/account/register"),
            json!({"name": bad, "password": "long enough"}),
            None,
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let (status, _) = post(
        &net,
        api(a, "/api/account/register"),
        json!({"name": format!("short_{tag}"), "password": "short"}),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = post(
        &net,
        api(a, "/api/account/register"),
        json!("garbage"),
        None,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // The session works on the other broadcast too.
    let me = net
        .http()
        .get(api(b, "/api/account/me"))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status().as_u16(), 200);

    // Wrong passwords: 401 with one message for "no such user" and "wrong password" (the
    // throttle after them is checked in `accounts_resist_guessing`).
    let (status, unknown) = post(
        &net,
        api(a, "/api/account/login"),
        json!({"name": format!("nobody_{tag}"), "password": "whatever1"}),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, wrong) = post(
        &net,
        api(b, "/api/account/login"),
        json!({"name": name, "password": "wrong password"}),
        None,
    )
    .await;
    assert_eq!((status, &wrong["error"]), (401, &unknown["error"]));

    // A forged session: refused with a reason on the API and on the chat, which stays read-only.
    let forged = format!("s1.{}.AAAA", "eyJ4IjoxfQ");
    let me = net
        .http()
        .get(api(a, "/api/account/me"))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status().as_u16(), 401);
    let (mut ws, first) = hello(&net, a, Some(&forged), Some(0)).await;
    assert_eq!(
        (first["type"].as_str(), first["code"].as_str()),
        (Some("error"), Some("bad_session")),
        "{first}"
    );
    assert_eq!(reply(&mut ws).await.unwrap()["user"], Value::Null);
    send(&mut ws, json!({"type": "send", "id": "f1", "text": "hi"})).await;
    assert_eq!(reply(&mut ws).await.unwrap()["code"], "login_required");
    drop(ws);

    // Messages: HTML and SQL metacharacters are stored and delivered byte for byte; empty,
    // oversized and control characters are refused; a resend of an id is not stored twice.
    let (mut ws, welcome) = hello(&net, a, Some(&session), None).await;
    assert_eq!(welcome["user"]["name"], name.as_str(), "{welcome}");
    let nasty = "<img src=x onerror=alert(1)> '; DROP TABLE chat_events; -- \" \\ ✓";
    send(&mut ws, json!({"type": "send", "id": "m1", "text": nasty})).await;
    let ack = reply(&mut ws).await.unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");
    let seq = ack["seq"].as_i64().unwrap();
    send(&mut ws, json!({"type": "send", "id": "m1", "text": nasty})).await;
    assert_eq!(
        reply(&mut ws).await.unwrap()["seq"].as_i64(),
        Some(seq),
        "resend: same seq"
    );
    for (text, code) in [
        ("   ", "empty"),
        (&"x".repeat(501)[..], "too_long"),
        ("a\u{0}b", "bad_request"),
    ] {
        send(&mut ws, json!({"type": "send", "id": "m2", "text": text})).await;
        let r = reply(&mut ws).await.unwrap();
        assert_eq!(
            (r["type"].as_str(), r["code"].as_str()),
            (Some("error"), Some(code)),
            "{r}"
        );
    }
    send(
        &mut ws,
        json!({"type": "delete", "id": "d1", "target": seq}),
    )
    .await;
    assert_eq!(
        reply(&mut ws).await.unwrap()["code"],
        "forbidden",
        "viewers do not moderate"
    );
    send(&mut ws, json!({"type": "send", "id": "m3"})).await;
    assert_eq!(reply(&mut ws).await.unwrap()["code"], "bad_request");
    // A frame over 4 KiB closes the socket with 1009 after a clear error.
    send(
        &mut ws,
        json!({"type": "send", "id": "m4", "text": "y".repeat(5000)}),
    )
    .await;
    assert_eq!(reply(&mut ws).await.unwrap()["code"], "too_long");
    assert_eq!(reply(&mut ws).await.unwrap_err(), Some(1009));

    // The other broadcast replays the accepted message exactly once, as text.
    let (mut ws, _) = hello(&net, b, Some(&session), Some(seq - 1)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let event = loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("replay")
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        if v["type"] == "message" {
            break v;
        }
    };
    assert_eq!(
        (
            event["seq"].as_i64(),
            event["text"].as_str(),
            event["user"].as_str()
        ),
        (Some(seq), Some(nasty), Some(name.as_str()))
    );

    // Sending faster than the per-user rate: refused, not queued; a frame flood: closed (1008).
    let mut limited = 0;
    for i in 0..12 {
        send(
            &mut ws,
            json!({"type": "send", "id": format!("r{i}"), "text": "quick"}),
        )
        .await;
    }
    for _ in 0..12 {
        if reply(&mut ws).await.unwrap()["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(limited >= 1, "12 messages at once: none rate limited");
    for _ in 0..40 {
        if ws.send(Message::text(r#"{"type":"ping"}"#)).await.is_err() {
            break;
        }
    }
    let closed = loop {
        match reply(&mut ws).await {
            Ok(v) if v["code"] == "rate_limited" || v["type"] == "pong" => continue,
            Ok(v) => panic!("unexpected {v}"),
            Err(code) => break code,
        }
    };
    assert_eq!(closed, Some(1008), "flood closes the socket");

    // Logout revokes the session everywhere.
    let (status, _) = post(
        &net,
        api(b, "/api/account/logout"),
        json!({}),
        Some(&session),
    )
    .await;
    assert_eq!(status, 204);
    for base in broadcasts.iter().map(|b| &b.base) {
        // Each broadcast trusts a checked session for at most 5 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let me = net
                .http()
                .get(api(base, "/api/account/me"))
                .bearer_auth(&session)
                .send()
                .await
                .unwrap();
            if me.status().as_u16() == 401 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{base}: still logged in 10 s after logout"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// An HTTPS client trusting the cluster CA whose requests come from `address` (any 127/8
/// address is this machine's): several "machines" for the per-address login keys.
fn client_from(state: &Path, address: &str) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .local_address(address.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(30));
    for cert in streaming_core::tls::load_certs(&state.join("tls/ca.crt")).unwrap() {
        builder = builder.add_root_certificate(reqwest::Certificate::from_der(&cert).unwrap());
    }
    builder.build().unwrap()
}

async fn post_from(
    client: &reqwest::Client,
    url: url::Url,
    body: Value,
    session: Option<&str>,
) -> (u16, Value) {
    let mut request = client.post(url).json(&body);
    if let Some(session) = session {
        request = request.bearer_auth(session);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body: Value = response.json().await.unwrap_or(Value::Null);
    if let Some(secs) = retry_after {
        body["retry_after_header"] = json!(secs);
    }
    (status, body)
}

async fn me(client: &reqwest::Client, base: &url::Url, session: &str) -> u16 {
    client
        .get(base.join("/api/account/me").unwrap())
        .bearer_auth(session)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Password guessing through the real broadcasts: a taken name never logs in through register,
/// parallel guesses over two broadcasts get the free attempts and no more, the owner still logs
/// in from elsewhere; moderators cannot touch moderators; a rotated admin secret takes effect
/// on SIGHUP and ends the old admin sessions.
async fn accounts_resist_guessing(state: &Path, configs: &[HostConfig]) {
    let net = Net::new(Target::resolve(None, state, None, None).unwrap()).unwrap();
    let broadcasts = net.discover().await.unwrap();
    let (a, b) = (&broadcasts[0].base, &broadcasts[1].base);
    let api = |base: &url::Url, path: &str| base.join(path).unwrap();
    let tag = std::process::id();
    let owner = format!("Owner_{tag}");
    let home = client_from(state, "127.78.200.1");
    let attacker = client_from(state, "127.78.200.2");
    let elsewhere = client_from(state, "127.78.200.3");

    let (status, body) = post_from(
        &home,
        api(a, "/api/account/register"),
        json!({"name": owner, "password": "owner's password"}),
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = post_from(
        &home,
        api(b, "/api/account/login"),
        json!({"name": owner, "password": "owner's password"}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Register with a taken name and its right password: 409, no session, no login.
    let (status, body) = post_from(
        &attacker,
        api(b, "/api/account/register"),
        json!({"name": owner.to_uppercase(), "password": "owner's password"}),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("that name is taken")),
        "{body}"
    );
    assert!(body.get("session").is_none(), "{body}");

    // 40 guesses at once, half on each broadcast: the free attempts are checked (plus one per
    // doubling wait that ran out meanwhile), every other one is refused with Retry-After.
    let started = Instant::now();
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let (client, url) = (
                attacker.clone(),
                api(if i % 2 == 0 { a } else { b }, "/api/account/login"),
            );
            let body = json!({"name": owner, "password": format!("guess {i}")});
            tokio::spawn(async move { post_from(&client, url, body, None).await })
        })
        .collect();
    let (mut checked, mut refused, mut longest_wait) = (0u32, 0u32, 0u64);
    for g in guesses {
        let (status, body) = g.await.unwrap();
        match status {
            401 => checked += 1,
            429 => {
                refused += 1;
                let wait = body["retry_after_header"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("429 without Retry-After: {body}"));
                longest_wait = longest_wait.max(wait);
            }
            other => panic!("guess answered {other}: {body}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // After the 5th attempt the pair waits 1 s, then 2 s, 4 s...: by `elapsed` at most
    // log2(elapsed + 1) more attempts can have been let through.
    let extra = (elapsed + 1.0).log2().floor() as u32;
    eprintln!(
        "40 parallel guesses over two broadcasts: {checked} checked, {refused} refused \
         (Retry-After up to {longest_wait} s) in {elapsed:.2} s"
    );
    assert!(
        (5..=5 + extra).contains(&checked),
        "{checked} guesses checked in {elapsed:.2} s"
    );
    assert_eq!(checked + refused, 40);

    // The owner is not locked out: from the address it logged in from before, and from a new one.
    for (client, base) in [(&home, a), (&elsewhere, b)] {
        let (status, body) = post_from(
            client,
            api(base, "/api/account/login"),
            json!({"name": owner, "password": "owner's password"}),
            None,
        )
        .await;
        assert_eq!(status, 200, "the owner logs in during the attack: {body}");
    }

    // Moderators: promoted by the admin, they act on viewers, not on each other.
    let admin_secret = &configs
        .iter()
        .find(|c| c.name.starts_with("broadcast"))
        .unwrap()
        .paths
        .admin_password;
    let old_password = std::fs::read_to_string(admin_secret)
        .unwrap()
        .trim()
        .to_owned();
    let (status, body) = post_from(
        &home,
        api(a, "/api/account/login"),
        json!({"name": "admin", "password": old_password}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let admin_session = body["session"].as_str().unwrap().to_owned();
    let mut sessions = Vec::new();
    for (who, role) in [
        ("ModA", "moderator"),
        ("ModB", "moderator"),
        ("View", "viewer"),
    ] {
        let name = format!("{who}_{tag}");
        let (status, body) = post_from(
            &home,
            api(a, "/api/account/register"),
            json!({"name": name, "password": "moderate well"}),
            None,
        )
        .await;
        assert_eq!(status, 201, "{body}");
        sessions.push((name.clone(), body["session"].as_str().unwrap().to_owned()));
        let (status, body) = post_from(
            &home,
            api(b, "/api/account/role"),
            json!({"name": name, "role": role}),
            Some(&admin_session),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = post_from(
        &home,
        api(a, "/api/account/role"),
        json!({"name": "admin", "role": "viewer"}),
        Some(&sessions[0].1),
    )
    .await;
    assert_eq!(status, 403, "a moderator changes no roles: {body}");
    let (mut ws, welcome) = hello(&net, b, Some(&sessions[0].1), None).await;
    assert_eq!(welcome["user"]["role"], "moderator", "{welcome}");
    send(
        &mut ws,
        json!({"type": "ban", "id": "x1", "user": sessions[1].0}),
    )
    .await;
    let r = reply(&mut ws).await.unwrap();
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "a moderator bans a moderator: {r}"
    );
    send(
        &mut ws,
        json!({"type": "mute", "id": "x2", "user": "admin", "seconds": 60}),
    )
    .await;
    assert_eq!(reply(&mut ws).await.unwrap()["code"], "forbidden");
    send(
        &mut ws,
        json!({"type": "mute", "id": "x3", "user": sessions[2].0, "seconds": 60}),
    )
    .await;
    assert_eq!(
        reply(&mut ws).await.unwrap()["type"],
        "ack",
        "a moderator mutes a viewer"
    );
    drop(ws);
    let (mut ws, _) = hello(&net, a, Some(&admin_session), None).await;
    send(
        &mut ws,
        json!({"type": "ban", "id": "y1", "user": sessions[1].0}),
    )
    .await;
    assert_eq!(
        reply(&mut ws).await.unwrap()["type"],
        "ack",
        "an admin bans a moderator"
    );
    drop(ws);

    // Admin password rotation: a new secret, SIGHUP to every broadcast; the old admin session
    // ends, the new password works, the old one does not.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let new_password = format!("rotated-{tag}-{nanos}");
    let mut secret_files: Vec<_> = configs
        .iter()
        .map(|c| c.paths.admin_password.clone())
        .collect();
    secret_files.sort();
    secret_files.dedup();
    for file in &secret_files {
        std::fs::write(file, format!("{new_password}\n")).unwrap();
    }
    let rotated = Instant::now();
    for host in crate::status(state) {
        if host["role"] == "broadcast"
            && let Some(pid) = host["pid"].as_i64()
        {
            // SAFETY: kill(2) on a pid of this test's own cluster.
            assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
        }
    }
    loop {
        if me(&home, a, &admin_session).await == 401 {
            break;
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(30),
            "the admin session still works 30 s after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "admin rotation: old session ended {:.1} s after SIGHUP",
        rotated.elapsed().as_secs_f64()
    );
    for (password, expected) in [(&new_password, 200), (&old_password, 401)] {
        let (status, body) = post_from(
            &home,
            api(b, "/api/account/login"),
            json!({"name": "admin", "password": password}),
            None,
        )
        .await;
        assert_eq!(status, expected, "{body}");
    }
}
