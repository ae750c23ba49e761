//! Hostile clients end to end: while viewers watch through an LB and the sources publish, each
//! attack runs from its own attacker address (127.66.0.x, so per-address limits hit the
//! attacker, not the viewers) against a local cluster: a deeply nested AMF `connect`, idle and
//! trickling RTMP sockets, slowloris on a broadcast and an LB, `/api/assign` and master-playlist
//! spam, parallel password guessing on a taken name, unauthenticated etcd and Patroni requests,
//! a flood of anonymous chat replays, slowloris, garbage, a wrong key and the global cap on an
//! LB's publish front (with an OBS-like publisher meanwhile), and a `/steering` flood with odd
//! queries. For each: the attacked process keeps its pid (or was
//! restarted by the runner without the viewers noticing), the attack gets a clear refusal, a
//! legitimate client still works, and a line of figures is printed (`figures: ...`) for
//! docs/security.md. At the end the viewers report 0 stalls and 0 errors, and a legitimate
//! publish is accepted.
//!
//! Every attack runs even when an earlier one failed; the test fails at the end with the list
//! of what did not hold. Needs what the other end-to-end tests need (ffmpeg, nix-instantiate,
//! PostgreSQL, Patroni, etcd, the workspace binaries), so it is `#[ignore]`d in a bare
//! `cargo test`; scripts/test.sh runs it with `--include-ignored`, one cluster at a time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use streaming_bench::obs_publisher::{self, ObsPublisher};
use streaming_core::config::{HostConfig, LimitsConfig};
use streaming_runner::cluster::Layout;
use streaming_runner::procs;
use streaming_runner::supervise::ServiceState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Loopback prefix of this test's cluster (the other end-to-end tests use 127.73, .76, .78).
const PREFIX: &str = "127.74";
/// The chat's per-address WebSocket cap.
const CHAT_SOCKETS_PER_ADDRESS: usize = 32;
/// Login failures a name may collect before its lockout starts.
const ALLOWED_LOGIN_FAILURES: usize = 5;
/// Viewers watching through an LB during the whole test.
const VIEWERS: u64 = 4;
/// How long they watch: every attack runs inside this window.
const WATCH_SECONDS: u64 = 130;

mod common;
use common::{LocalCluster, run, streamctl};

fn addr(role: u8, n: u8, port: u16) -> SocketAddr {
    format!("{PREFIX}.{role}.{n}:{port}").parse().unwrap()
}

fn attacker(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 66, 0, n)
}

/// A TCP connection from `src` (any free port).
async fn tcp_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    socket.connect(dst).await
}

/// Reads (and drops) whatever comes until the peer closes; with `trickle`, writes one of its
/// bytes every `every` meanwhile. How long the peer took to close, or `None` if it held the
/// connection for all of `limit`.
async fn held<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    trickle: Option<(&[u8], Duration)>,
    limit: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    let mut sent = 0;
    let mut next_byte = tokio::time::Instant::now();
    loop {
        let write_due = trickle.is_some_and(|(bytes, _)| sent < bytes.len());
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(start.elapsed()),
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(next_byte), if write_due => {
                let (bytes, every) = trickle.unwrap_or((&[], Duration::ZERO));
                if stream.write_all(&bytes[sent..sent + 1]).await.is_err()
                    || stream.flush().await.is_err()
                {
                    return Some(start.elapsed());
                }
                sent += 1;
                next_byte += every;
            }
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/<pid>/status).
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// Counters that count refusals, by name (label sets summed).
fn refusal_counters(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or_default();
        let refusal = [
            "refus",
            "reject",
            "limited",
            "denied",
            "timed_out",
            "timeout",
        ]
        .iter()
        .any(|w| name.contains(w));
        if refusal && let Ok(v) = value.parse::<f64>() {
            *out.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    out
}

/// What changed between two readings of [`refusal_counters`], as `name +N` items.
fn refusal_delta(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> String {
    let items: Vec<String> = after
        .iter()
        .filter_map(|(name, v)| {
            let d = v - before.get(name).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("{name} +{d}"))
        })
        .collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The shared pieces of the attacks.
struct Ctx {
    state: PathBuf,
    layout: Layout,
    limits: LimitsConfig,
    ca: PathBuf,
    tls: tokio_rustls::TlsConnector,
    /// HTTPS from the LB's own address (a cluster address) with the metrics token if there is
    /// one: `/status` and `/metrics` answer either.
    inside: reqwest::Client,
    metrics_token: Option<String>,
    stream_key: String,
    failures: Mutex<Vec<String>>,
    figures: Mutex<Vec<String>>,
}

impl Ctx {
    fn new(state: &Path) -> Self {
        let layout = Layout::new(state).unwrap();
        let config: HostConfig = layout.load_config("lb1").unwrap();
        let ca = state.join("tls/ca.crt");
        let mut roots = rustls::RootCertStore::empty();
        for cert in streaming_core::tls::load_certs(&ca).unwrap() {
            roots.add(cert).unwrap();
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        // The metrics token's file, wherever the final config names it.
        let metrics_token = serde_json::to_value(&config.paths)
            .ok()
            .and_then(|p| {
                p.get("metrics_token")
                    .and_then(|v| v.as_str())
                    .map(PathBuf::from)
            })
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().to_owned());
        let stream_key = std::fs::read_to_string(state.join("secrets/stream-keys/test.key"))
            .unwrap()
            .trim()
            .to_owned();
        Self {
            state: state.to_owned(),
            limits: config.cluster.limits.clone(),
            layout,
            inside: Self::client_from(&ca, Some(addr(1, 1, 0).ip())),
            ca,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            metrics_token,
            stream_key,
            failures: Mutex::new(Vec::new()),
            figures: Mutex::new(Vec::new()),
        }
    }

    /// An HTTPS client trusting the cluster CA, its sockets bound to `from`.
    fn client_from(ca: &Path, from: Option<IpAddr>) -> reqwest::Client {
        let pem = std::fs::read(ca).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .local_address(from)
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn check(&self, attack: &str, ok: bool, what: String) {
        if ok {
            eprintln!("hostile: {attack}: ok: {what}");
        } else {
            eprintln!("hostile: {attack}: FAILED: {what}");
            self.failures
                .lock()
                .unwrap()
                .push(format!("{attack}: {what}"));
        }
    }

    fn figures(&self, attack: &str, line: String) {
        let line = format!("figures: {attack}: {line}");
        eprintln!("{line}");
        self.figures.lock().unwrap().push(line);
    }

    /// The host's service pid while that process lives (a crashed one may still be named in
    /// the service file until its supervisor notices).
    fn service_pid(&self, host: &str) -> Option<i32> {
        ServiceState::read(&self.layout.service_file(host))
            .map(|s| s.pid)
            .filter(|p| *p > 0 && procs::liveness(*p) == procs::Liveness::Running)
    }

    /// Waits (up to 30 s) until the host's service runs and answers `/healthz`: after a crash
    /// the runner restarts it, and the next attack needs a target.
    async fn serving(&self, host: &str, url: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = Self::client_from(&self.ca, None);
        while Instant::now() < deadline {
            if self.service_pid(host).is_some()
                && client
                    .get(format!("{url}/healthz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    fn restarts(&self, host: &str) -> u64 {
        ServiceState::read(&self.layout.service_file(host)).map_or(0, |s| s.restarts)
    }

    fn with_token(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.metrics_token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn metrics(&self, target: SocketAddr) -> std::collections::BTreeMap<String, f64> {
        let request = self.with_token(self.inside.get(format!("https://{target}/metrics")));
        match request.send().await {
            Ok(r) => refusal_counters(&r.text().await.unwrap_or_default()),
            Err(_) => Default::default(),
        }
    }

    async fn metrics_text(&self, target: SocketAddr) -> String {
        let request = self.with_token(self.inside.get(format!("https://{target}/metrics")));
        match request.send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn status(&self, target: SocketAddr) -> Value {
        let request = self.with_token(self.inside.get(format!("https://{target}/status")));
        match request.send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// TCP from `src` and TLS (cluster CA) to `dst`.
    async fn tls_from(
        &self,
        src: Ipv4Addr,
        dst: SocketAddr,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = tcp_from(src, dst).await?;
        let name = rustls_pki_types::ServerName::IpAddress(dst.ip().into());
        tokio::time::timeout(Duration::from_secs(15), self.tls.connect(name, tcp))
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
    }

    /// The attacked service: its pid before, and a check afterwards that it is the same or
    /// was restarted by the runner (then the viewers' report decides).
    fn same_or_restarted(&self, attack: &str, host: &str, pid_before: Option<i32>, restarts: u64) {
        let pid_after = self.service_pid(host);
        let restarted = self.restarts(host).saturating_sub(restarts);
        self.check(
            attack,
            pid_before.is_some() && (pid_after == pid_before || restarted > 0),
            format!(
                "{host} pid {pid_before:?} -> {pid_after:?}, restarted {restarted} times by \
                 the runner"
            ),
        );
    }

    /// A legitimate publish of a few seconds with the right key, from the default address:
    /// accepted (ffmpeg ends cleanly).
    async fn legit_publish(&self, seconds: u32) -> (bool, String) {
        let url = format!(
            "rtmp://{}/live/test?key={}&source=hostile-legit",
            addr(4, 1, 1935),
            self.stream_key
        );
        publish_to(&url, seconds, &self.stream_key).await
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Deep AMF

/// A `connect` command whose AMF0 command object nests `depth` objects, in 128-byte chunks on
/// chunk stream 3 (the default chunk size).
fn deep_amf_connect(depth: usize) -> Vec<u8> {
    let mut payload = vec![0x02, 0x00, 0x07];
    payload.extend_from_slice(b"connect");
    payload.push(0x00);
    payload.extend_from_slice(&1.0f64.to_be_bytes());
    payload.push(0x03);
    for _ in 0..depth {
        payload.extend_from_slice(&[0x00, 0x01, b'a', 0x03]);
    }
    for _ in 0..=depth {
        payload.extend_from_slice(&[0x00, 0x00, 0x09]);
    }
    let len = payload.len() as u32;
    let mut message = vec![0x03, 0, 0, 0];
    message.extend_from_slice(&len.to_be_bytes()[1..]);
    message.push(20);
    message.extend_from_slice(&0u32.to_le_bytes());
    for (i, chunk) in payload.chunks(128).enumerate() {
        if i > 0 {
            message.push(0xC3);
        }
        message.extend_from_slice(chunk);
    }
    message
}

/// The client side of the RTMP handshake (rml_rtmp), then the bytes the server sent after it.
async fn rtmp_handshake(stream: &mut TcpStream) -> anyhow::Result<()> {
    use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
    let mut handshake = Handshake::new(PeerType::Client);
    let c0c1 = handshake.generate_outbound_p0_and_p1()?;
    stream.write_all(&c0c1).await?;
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed during the handshake");
        match handshake.process_bytes(&buf[..n])? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                stream.write_all(&response_bytes).await?;
            }
            HandshakeProcessResult::Completed { response_bytes, .. } => {
                stream.write_all(&response_bytes).await?;
                return Ok(());
            }
        }
    }
}

async fn deep_amf(ctx: &Ctx) {
    const ATTACK: &str = "deep-amf";
    let target = addr(4, 1, 1935);
    let pid = ctx.service_pid("ingest1");
    let restarts = ctx.restarts("ingest1");
    let rss_before = pid.and_then(rss_kib);
    let metrics_before = ctx.metrics(addr(4, 1, 8443)).await;
    let mut stream = tcp_from(attacker(1), target)
        .await
        .expect("connect ingest1");
    let handshake = rtmp_handshake(&mut stream).await;
    ctx.check(
        ATTACK,
        handshake.is_ok(),
        format!("handshake: {handshake:?}"),
    );
    let message = deep_amf_connect(5000);
    let started = Instant::now();
    let _ = stream.write_all(&message).await;
    let closed = held(&mut stream, None, Duration::from_secs(15)).await;
    ctx.check(
        ATTACK,
        closed.is_some(),
        format!(
            "{} byte connect: connection closed after {closed:?}",
            message.len()
        ),
    );
    // A crash (stack overflow) takes a moment to be noticed; then, restarted or not, the
    // ingest must serve again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let serving = ctx
        .serving("ingest1", &format!("https://{}", addr(4, 1, 8443)))
        .await;
    ctx.check(
        ATTACK,
        serving,
        format!("ingest1 serves afterwards: {serving}"),
    );
    ctx.same_or_restarted(ATTACK, "ingest1", pid, restarts);
    let metrics_after = ctx.metrics(addr(4, 1, 8443)).await;
    let pid_after = ctx.service_pid("ingest1");
    ctx.figures(
        ATTACK,
        format!(
            "message {} bytes, closed after {:.2} s, held at end {}/1, ingest1 pid {pid:?} -> \
             {pid_after:?} (restarts +{}), refusals: {}, RSS {} -> {}, took {:.1} s",
            message.len(),
            closed.map_or(f64::NAN, |d| d.as_secs_f64()),
            u8::from(closed.is_none()),
            ctx.restarts("ingest1").saturating_sub(restarts),
            refusal_delta(&metrics_before, &metrics_after),
            mib(rss_before),
            mib(pid_after.and_then(rss_kib)),
            started.elapsed().as_secs_f64()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Idle RTMP sockets

/// What a trickling client sends, a byte a second: the start of a handshake.
const TRICKLE: &[u8] = &[0x03; 64];

async fn idle_rtmp(ctx: &Ctx) {
    const ATTACK: &str = "idle-rtmp";
    let target = addr(4, 1, 1935);
    let pid = ctx.service_pid("ingest1");
    let restarts = ctx.restarts("ingest1");
    let rss_before = pid.and_then(rss_kib);
    let metrics_before = ctx.metrics(addr(4, 1, 8443)).await;
    let limit = Duration::from_secs(u64::from(ctx.limits.rtmp_publish_seconds) + 15);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..120 {
        let trickle: Option<(&'static [u8], Duration)> =
            (i >= 100).then_some((TRICKLE, Duration::from_secs(1)));
        tasks.push(tokio::spawn(async move {
            match tcp_from(attacker(2), target).await {
                Ok(stream) => Ok(held(stream, trickle, limit).await),
                Err(e) => Err(e.to_string()),
            }
        }));
    }
    // A legitimate publisher during the attack, from another address.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (published, why) = ctx.legit_publish(3).await;
    let mut closed_at_once = 0;
    let mut refused_connect = 0;
    let mut held_at_end = 0;
    let mut longest = Duration::ZERO;
    let mut held_longer = 0;
    for task in tasks {
        match task.await.unwrap() {
            Err(_) => refused_connect += 1,
            Ok(None) => held_at_end += 1,
            Ok(Some(d)) => {
                longest = longest.max(d);
                if d < Duration::from_secs(1) {
                    closed_at_once += 1;
                } else {
                    held_longer += 1;
                }
            }
        }
    }
    let per_address = ctx.limits.rtmp_connections_per_address as usize;
    ctx.check(
        ATTACK,
        refused_connect == 0,
        format!("ingest1 accepted the TCP connections: {refused_connect} refused at connect"),
    );
    ctx.check(
        ATTACK,
        held_longer + held_at_end <= per_address,
        format!(
            "{} of 120 held over 1 s (cap {per_address} per address)",
            held_longer + held_at_end
        ),
    );
    let deadline = Duration::from_secs(u64::from(ctx.limits.rtmp_publish_seconds) + 3);
    ctx.check(
        ATTACK,
        held_at_end == 0 && longest <= deadline,
        format!(
            "every one closed within {deadline:?}: longest {longest:?}, {held_at_end} still open"
        ),
    );
    ctx.check(
        ATTACK,
        published,
        format!("a legitimate publish during the attack is accepted: {why}"),
    );
    ctx.same_or_restarted(ATTACK, "ingest1", pid, restarts);
    let metrics_after = ctx.metrics(addr(4, 1, 8443)).await;
    ctx.figures(
        ATTACK,
        format!(
            "120 connections (20 trickling 1 byte/s): {closed_at_once} closed at once, \
             {held_longer} held then closed (longest {:.1} s), {held_at_end} held at end, \
             {refused_connect} refused at connect; refusals: {}; RSS {} -> {}; took {:.1} s",
            longest.as_secs_f64(),
            refusal_delta(&metrics_before, &metrics_after),
            mib(rss_before),
            mib(ctx.service_pid("ingest1").and_then(rss_kib)),
            started.elapsed().as_secs_f64()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Slowloris

async fn slowloris_one(ctx: Arc<Ctx>, host: &'static str, target: SocketAddr) {
    let attack = format!("slowloris-{host}");
    let pid = ctx.service_pid(host);
    let restarts = ctx.restarts(host);
    let rss_before = pid.and_then(rss_kib);
    let metrics_before = ctx.metrics(target).await;
    let limit = Duration::from_secs(u64::from(ctx.limits.http_header_seconds) + 20);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..300 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut stream = match ctx.tls_from(attacker(3), target).await {
                Ok(s) => s,
                Err(e) => return Err(e.to_string()),
            };
            if stream.write_all(b"GET / HTTP/1.1\r\nHo").await.is_err() {
                return Ok(Some(t0.elapsed()));
            }
            let _ = stream.flush().await;
            let rest: &[u8] = b"st: streaming-cluster.test\r\nUser-Agent: slow\r\n";
            Ok(held(stream, Some((rest, Duration::from_secs(3))), limit)
                .await
                .map(|_| t0.elapsed()))
        }));
    }
    let mut refused = 0;
    let mut closed = Vec::new();
    let mut held_at_end = 0;
    for task in tasks {
        match task.await.unwrap() {
            Err(_) => refused += 1,
            Ok(None) => held_at_end += 1,
            Ok(Some(d)) => closed.push(d),
        }
    }
    closed.sort();
    let at_once = closed
        .iter()
        .filter(|d| **d < Duration::from_secs(2))
        .count();
    let longest = closed.last().copied().unwrap_or_default();
    let per_address = ctx.limits.http_connections_per_address as usize;
    ctx.check(
        &attack,
        refused + at_once >= 300usize.saturating_sub(per_address),
        format!(
            "beyond {per_address} per address refused: {refused} refused at connect/TLS, \
             {at_once} closed within 2 s"
        ),
    );
    let header = Duration::from_secs(u64::from(ctx.limits.http_header_seconds) + 5);
    ctx.check(
        &attack,
        held_at_end == 0 && longest <= header,
        format!(
            "every one closed within {header:?}: longest {longest:?}, {held_at_end} still open"
        ),
    );
    // A legitimate request still works from another address.
    let ok = Ctx::client_from(&ctx.ca, None)
        .get(format!("https://{target}/healthz"))
        .send()
        .await
        .map(|r| r.status().is_success());
    ctx.check(
        &attack,
        matches!(ok, Ok(true)),
        format!("legitimate /healthz: {ok:?}"),
    );
    ctx.same_or_restarted(&attack, host, pid, restarts);
    let metrics_after = ctx.metrics(target).await;
    ctx.figures(
        &attack,
        format!(
            "300 TLS connections with half a request: {refused} refused at connect/TLS, \
             {at_once} closed within 2 s, {} closed later (longest {:.1} s), {held_at_end} held \
             at end; refusals: {}; RSS {} -> {}; took {:.1} s",
            closed.len() - at_once,
            longest.as_secs_f64(),
            refusal_delta(&metrics_before, &metrics_after),
            mib(rss_before),
            mib(ctx.service_pid(host).and_then(rss_kib)),
            started.elapsed().as_secs_f64()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Assign and master spam

async fn viewers_counted(ctx: &Ctx) -> (u64, u64) {
    let mut viewers = 0;
    let mut free = 0;
    for n in 1..=4 {
        let status = ctx.status(addr(2, n, 8443)).await;
        viewers += status["viewers"].as_u64().unwrap_or(0);
        free += status["free_viewers"].as_u64().unwrap_or(0);
    }
    (viewers, free)
}

async fn assign_spam(ctx: &Ctx) {
    const ATTACK: &str = "assign-spam";
    let lb = addr(1, 1, 8443);
    let pid = ctx.service_pid("lb1");
    let restarts = ctx.restarts("lb1");
    let rss_before = pid.and_then(rss_kib);
    let metrics_before = ctx.metrics(lb).await;
    let (viewers_before, free_before) = viewers_counted(ctx).await;
    let spammer = Ctx::client_from(&ctx.ca, Some(IpAddr::V4(attacker(4))));
    let started = Instant::now();
    let mut tokens: Vec<(String, String)> = Vec::new();
    let (mut refused, mut refused_with_retry, mut other) = (0, 0, 0);
    for _ in 0..100 {
        match spammer
            .get(format!("https://{lb}/api/assign?channel=test"))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if let (Some(base), Some(token)) =
                    (body["base_url"].as_str(), body["token"].as_str())
                {
                    tokens.push((base.to_owned(), token.to_owned()));
                }
            }
            Ok(r) if r.status().as_u16() == 429 => {
                refused += 1;
                if r.headers().contains_key("retry-after") {
                    refused_with_retry += 1;
                }
            }
            _ => other += 1,
        }
    }
    let burst = ctx.limits.assign_rate.burst as usize;
    // The bucket refills while the loop runs (per_minute), hence a little slack.
    ctx.check(
        ATTACK,
        tokens.len() <= burst + 5 && refused > 0 && refused_with_retry == refused,
        format!(
            "100 assigns: {} answered, {refused} refused with 429 ({refused_with_retry} with \
             Retry-After), {other} other (burst {burst})",
            tokens.len()
        ),
    );
    // Every token asks every broadcast for the master playlist every 2 s.
    let bases: Vec<String> = (1..=4)
        .map(|n| format!("https://{}", addr(2, n, 8443)))
        .collect();
    let mut masters = (0, 0);
    for _ in 0..5 {
        for (_, token) in &tokens {
            for base in &bases {
                let answer = spammer
                    .get(format!("{base}/live/test/master.m3u8?t={token}"))
                    .send()
                    .await;
                match answer {
                    Ok(r) if r.status().is_success() => masters.0 += 1,
                    _ => masters.1 += 1,
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (viewers_after, free_after) = viewers_counted(ctx).await;
    ctx.check(
        ATTACK,
        viewers_after <= VIEWERS + 2 && free_before.saturating_sub(free_after) <= VIEWERS + 2,
        format!(
            "broadcasts count viewers {viewers_before} -> {viewers_after} (real watchers \
             {VIEWERS}), free {free_before} -> {free_after}"
        ),
    );
    let legit = Ctx::client_from(&ctx.ca, None)
        .get(format!("https://{lb}/api/assign?channel=test"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    ctx.check(
        ATTACK,
        matches!(legit, Ok(200)),
        format!("a viewer's assign: {legit:?}"),
    );
    ctx.same_or_restarted(ATTACK, "lb1", pid, restarts);
    let metrics_after = ctx.metrics(lb).await;
    ctx.figures(
        ATTACK,
        format!(
            "100 assigns from one address: {} tokens, {refused} x 429; {} master requests \
             answered, {} refused; viewers counted {viewers_before} -> {viewers_after}, free \
             {free_before} -> {free_after}; lb1 refusals: {}; lb1 RSS {} -> {}; took {:.1} s",
            tokens.len(),
            masters.0,
            masters.1,
            refusal_delta(&metrics_before, &metrics_after),
            mib(rss_before),
            mib(ctx.service_pid("lb1").and_then(rss_kib)),
            started.elapsed().as_secs_f64()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Parallel password guessing

async fn account(
    client: &reqwest::Client,
    url: String,
    name: &str,
    password: &str,
) -> (u16, Value, bool) {
    match client
        .post(url)
        .json(&json!({"name": name, "password": password}))
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            let retry_after = r.headers().contains_key("retry-after");
            (status, r.json().await.unwrap_or(Value::Null), retry_after)
        }
        Err(e) => (0, json!({"error": e.to_string()}), false),
    }
}

/// Returns the owner's name, password and session for the chat attack.
async fn password_guessing(ctx: &Ctx) -> Option<(String, String)> {
    const ATTACK: &str = "password-guessing";
    let b1 = format!("https://{}", addr(2, 1, 8443));
    let b2 = format!("https://{}", addr(2, 2, 8443));
    let pid = ctx.service_pid("broadcast1");
    let restarts = ctx.restarts("broadcast1");
    let rss_before = pid.and_then(rss_kib);
    let metrics_before = ctx.metrics(addr(2, 1, 8443)).await;
    let name = format!("Owner_{}", std::process::id());
    let password = "correct horse battery";
    let owner = Ctx::client_from(&ctx.ca, None);
    let (status, body, _) = account(
        &owner,
        format!("{b1}/api/account/register"),
        &name,
        password,
    )
    .await;
    ctx.check(
        ATTACK,
        status == 201,
        format!("the owner registers: {status}"),
    );
    let registered = body["session"].as_str().map(str::to_owned);
    let started = Instant::now();
    let guesser = Ctx::client_from(&ctx.ca, Some(IpAddr::V4(attacker(5))));
    let guesses = (0..50).map(|i| {
        let base = if i % 2 == 0 { &b1 } else { &b2 };
        account(
            &guesser,
            format!("{base}/api/account/login"),
            &name,
            "wrong password",
        )
    });
    let answers = futures::future::join_all(guesses).await;
    let took = started.elapsed();
    let count = |code: u16| answers.iter().filter(|(s, _, _)| *s == code).count();
    let (unauthorized, limited) = (count(401), count(429));
    let limited_with_retry = answers.iter().filter(|(s, _, r)| *s == 429 && *r).count();
    ctx.check(
        ATTACK,
        unauthorized <= ALLOWED_LOGIN_FAILURES && limited + unauthorized == 50,
        format!(
            "50 parallel wrong logins: {unauthorized} x 401 (passwords checked, at most \
             {ALLOWED_LOGIN_FAILURES}), {limited} x 429"
        ),
    );
    ctx.check(
        ATTACK,
        limited_with_retry == limited,
        format!("{limited_with_retry} of {limited} refusals carry Retry-After"),
    );
    let (status, body, _) =
        account(&owner, format!("{b2}/api/account/login"), &name, password).await;
    let session = body["session"].as_str().map(str::to_owned);
    ctx.check(
        ATTACK,
        status == 200 && session.is_some(),
        format!("the owner logs in from their own address right after: {status}"),
    );
    let (status, body, _) = account(
        &owner,
        format!("{b1}/api/account/register"),
        &name,
        password,
    )
    .await;
    ctx.check(
        ATTACK,
        status == 409 && body.get("session").is_none(),
        format!(
            "register of the taken name (right password): {status}, error {}, session {}",
            body["error"],
            if body.get("session").is_some() {
                "given"
            } else {
                "none"
            }
        ),
    );
    ctx.same_or_restarted(ATTACK, "broadcast1", pid, restarts);
    let metrics_after = ctx.metrics(addr(2, 1, 8443)).await;
    ctx.figures(
        ATTACK,
        format!(
            "50 parallel wrong logins on two broadcasts: {unauthorized} x 401, {limited} x 429, \
             {} other, in {:.2} s; broadcast1 refusals: {}; RSS {} -> {}",
            50 - unauthorized - limited,
            took.as_secs_f64(),
            refusal_delta(&metrics_before, &metrics_after),
            mib(rss_before),
            mib(ctx.service_pid("broadcast1").and_then(rss_kib)),
        ),
    );
    // The chat attack needs a logged-in user even where this attack failed.
    session.or(registered).map(|s| (name, s))
}

// ---------------------------------------------------------------------------------------------
// 6. Unauthenticated etcd and Patroni

fn db_primary(state: &Path) -> Option<String> {
    let status = common::json_of(&run(streamctl()
        .args(["status", "--json", "--state"])
        .arg(state)));
    status
        .as_array()?
        .iter()
        .find(|h| h["db_role"] == "primary")
        .and_then(|h| h["name"].as_str().map(str::to_owned))
}

async fn etcd_patroni(ctx: &Ctx) {
    const ATTACK: &str = "etcd-patroni";
    let attacker_client = Ctx::client_from(&ctx.ca, Some(IpAddr::V4(attacker(7))));
    let etcd = addr(3, 1, 2379);
    let body = json!({"key": "Lw==", "range_end": "AA=="});
    let mut answers = Vec::new();
    for scheme in ["http", "https"] {
        let answer = attacker_client
            .post(format!("{scheme}://{etcd}/v3/kv/range"))
            .json(&body)
            .send()
            .await;
        let refused = !matches!(&answer, Ok(r) if r.status().is_success());
        let shown = match answer {
            Ok(r) => format!("{scheme}: {}", r.status()),
            Err(e) => format!("{scheme}: refused ({})", error_chain(&e)),
        };
        ctx.check(
            ATTACK,
            refused,
            format!("etcd range without a client certificate: {shown}"),
        );
        answers.push(shown);
    }
    let primary = db_primary(&ctx.state);
    let candidate = if primary.as_deref() == Some("db1") {
        "db2"
    } else {
        "db1"
    };
    let mut patroni = Vec::new();
    let mut refused_all = true;
    for scheme in ["https", "http"] {
        let answer = attacker_client
            .post(format!("{scheme}://{}/failover", addr(3, 1, 8008)))
            .json(&json!({"leader": primary, "candidate": candidate}))
            .send()
            .await;
        match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                refused_all &= matches!(status, 401 | 403);
                patroni.push(format!("{scheme}: {status}"));
            }
            Err(e) => patroni.push(format!("{scheme}: refused ({})", error_chain(&e))),
        }
    }
    ctx.check(
        ATTACK,
        refused_all,
        format!(
            "Patroni POST /failover without credentials: {}",
            patroni.join(", ")
        ),
    );
    // Patroni would act within a loop_wait or two.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = db_primary(&ctx.state);
    ctx.check(
        ATTACK,
        primary.is_some() && after == primary,
        format!("the primary stays {primary:?}: now {after:?}"),
    );
    ctx.figures(
        ATTACK,
        format!(
            "etcd /v3/kv/range without client certificate: {}; Patroni POST /failover: {}; \
             primary {primary:?} -> {after:?}",
            answers.join(", "),
            patroni.join(", ")
        ),
    );
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text.chars().take(160).collect()
}

// ---------------------------------------------------------------------------------------------
// 7. Anonymous chat replay flood

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// TCP from `src`, TLS and the WebSocket handshake to `broadcast`'s chat.
async fn chat_socket(ctx: &Ctx, src: Ipv4Addr, broadcast: SocketAddr) -> Result<Ws, String> {
    let tls = ctx
        .tls_from(src, broadcast)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let url = format!("wss://{broadcast}/api/chat/test");
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(url, tls),
    )
    .await
    {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(r))) => {
            Err(format!("HTTP {}", r.status().as_u16()))
        }
        Ok(Err(e)) => Err(format!("handshake: {e}")),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// After `hello`: the welcome (or why not), then the events replayed until 1 s of quiet.
async fn hello_and_replay(
    ws: &mut Ws,
    session: Option<&str>,
    since: Option<u64>,
) -> Result<usize, String> {
    let hello = json!({"type": "hello", "session": session, "since": since});
    ws.send(Message::text(hello.to_string()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut welcomed = false;
    let mut events = 0;
    loop {
        let wait = if welcomed { 1 } else { 10 };
        match tokio::time::timeout(Duration::from_secs(wait), ws.next()).await {
            Err(_) if welcomed => return Ok(events),
            Err(_) => return Err("no welcome".into()),
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                match v["type"].as_str() {
                    Some("welcome") => welcomed = true,
                    Some("error") => return Err(format!("error {}", v["code"])),
                    _ if welcomed => events += 1,
                    _ => {}
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(format!("close {:?}", frame.map(|f| u16::from(f.code))));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(format!("{e}")),
            Ok(None) => return Err("closed".into()),
        }
    }
}

async fn chat_flood(ctx: Arc<Ctx>, owner: Option<(String, String)>) {
    const ATTACK: &str = "chat-flood";
    let target = addr(2, 1, 8443);
    let pid = ctx.service_pid("broadcast1");
    let restarts = ctx.restarts("broadcast1");
    let rss_before = pid.and_then(rss_kib);
    let metrics_before = ctx.metrics(target).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = chat_socket(&ctx, attacker(6), target).await?;
            let replayed = hello_and_replay(&mut ws, None, Some(0)).await?;
            Ok::<_, String>((ws, replayed))
        }));
    }
    let mut open = Vec::new();
    let mut refusals: std::collections::BTreeMap<String, usize> = Default::default();
    for task in tasks {
        match task.await.unwrap() {
            Ok((ws, replayed)) => open.push((ws, replayed)),
            Err(why) => *refusals.entry(why).or_insert(0) += 1,
        }
    }
    let accepted = open.len();
    let most_replayed = open.iter().map(|(_, r)| *r).max().unwrap_or(0);
    let rss_during = ctx.service_pid("broadcast1").and_then(rss_kib);
    ctx.check(
        ATTACK,
        accepted <= CHAT_SOCKETS_PER_ADDRESS,
        format!("{accepted} of 200 accepted from one address (cap {CHAT_SOCKETS_PER_ADDRESS}); refusals {refusals:?}"),
    );
    // A logged-in user's message is acked and delivered while the flood holds its sockets.
    match &owner {
        Some((name, session)) => {
            let delivered = async {
                let mut watcher = chat_socket(&ctx, Ipv4Addr::LOCALHOST, addr(2, 2, 8443)).await?;
                hello_and_replay(&mut watcher, None, None).await?;
                let mut ws = chat_socket(&ctx, Ipv4Addr::LOCALHOST, target).await?;
                hello_and_replay(&mut ws, Some(session), None).await?;
                let text = format!("still here {}", std::process::id());
                let send = json!({"type": "send", "id": "hostile-1", "text": text});
                ws.send(Message::text(send.to_string()))
                    .await
                    .map_err(|e| e.to_string())?;
                let acked = wait_for(&mut ws, |v| v["type"] == "ack").await;
                let seen = wait_for(&mut watcher, |v| {
                    v["type"] == "message" && v["text"] == text.as_str()
                })
                .await;
                Ok::<_, String>((acked, seen))
            }
            .await;
            ctx.check(
                ATTACK,
                matches!(delivered, Ok((true, true))),
                format!("{name}'s message acked and delivered on broadcast2 (acked, seen): {delivered:?}"),
            );
        }
        None => ctx.check(
            ATTACK,
            false,
            "no logged-in user (password attack failed)".into(),
        ),
    }
    let rss_after = ctx.service_pid("broadcast1").and_then(rss_kib);
    ctx.check(
        ATTACK,
        matches!((rss_before, rss_during), (Some(b), Some(d)) if d <= b + 256 * 1024),
        format!(
            "broadcast1 RSS bounded: {} -> {}",
            mib(rss_before),
            mib(rss_during)
        ),
    );
    drop(open);
    ctx.same_or_restarted(ATTACK, "broadcast1", pid, restarts);
    let metrics_after = ctx.metrics(target).await;
    ctx.figures(
        ATTACK,
        format!(
            "200 anonymous sockets with since 0 from one address: {accepted} accepted (most \
             events replayed to one: {most_replayed}), refused {refusals:?}; refusals: {}; \
             RSS {} -> {} (during) -> {}; took {:.1} s",
            refusal_delta(&metrics_before, &metrics_after),
            mib(rss_before),
            mib(rss_during),
            mib(rss_after),
            started.elapsed().as_secs_f64()
        ),
    );
}

/// True once a frame matching `wanted` arrives within 20 s.
async fn wait_for(ws: &mut Ws, wanted: impl Fn(&Value) -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if wanted(&serde_json::from_str(&t).unwrap_or(Value::Null)) {
                    return true;
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 8. The LBs' publish front (RTMP and RTMPS forwarded to an ingest)

/// The sum of every series of counter `name` in a `/metrics` text.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Connections from `src` to `target` that send `first` (if any), then trickle `trickle` a
/// byte a second: how each ended (see [`held`]), `Err` when the connect itself failed.
async fn front_connections(
    src: Ipv4Addr,
    target: SocketAddr,
    n: usize,
    first: &'static [u8],
    trickle: &'static [u8],
    limit: Duration,
) -> Vec<Result<Option<Duration>, String>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            tokio::spawn(async move {
                let mut stream = tcp_from(src, target).await.map_err(|e| e.to_string())?;
                if !first.is_empty() {
                    let _ = stream.write_all(first).await;
                }
                let trickle = (!trickle.is_empty()).then_some((trickle, Duration::from_secs(1)));
                Ok(held(stream, trickle, limit).await)
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

/// (closed within 1 s, closed later, longest, held at the end, refused at connect).
fn endings(results: &[Result<Option<Duration>, String>]) -> (usize, usize, Duration, usize, usize) {
    let (mut at_once, mut later, mut longest, mut open, mut refused) = (0, 0, Duration::ZERO, 0, 0);
    for r in results {
        match r {
            Err(_) => refused += 1,
            Ok(None) => open += 1,
            Ok(Some(d)) => {
                longest = longest.max(*d);
                if *d < Duration::from_secs(1) {
                    at_once += 1;
                } else {
                    later += 1;
                }
            }
        }
    }
    (at_once, later, longest, open, refused)
}

/// Pids whose command line contains `needle`.
fn cmdlines_containing(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
        })
        .collect()
}

/// A publish of a few seconds through `lb`'s RTMPS front with `key`: (accepted, ffmpeg's
/// errors with the real key masked).
async fn publish_through(ctx: &Ctx, lb: SocketAddr, key: &str, seconds: u32) -> (bool, String) {
    let url = format!("rtmps://{lb}/live/test?key={key}&source=hostile-front");
    publish_to(&url, seconds, &ctx.stream_key).await
}

/// A test publish of `seconds` to `url`: (accepted, ffmpeg's errors with `real_key` masked).
async fn publish_to(url: &str, seconds: u32, real_key: &str) -> (bool, String) {
    let output = tokio::process::Command::from(common::test_publisher(url, seconds, 50))
        .output()
        .await
        .expect("ffmpeg starts");
    let why = String::from_utf8_lossy(&output.stderr)
        .replace(real_key, "<key>")
        .trim()
        .chars()
        .take(300)
        .collect();
    (output.status.success(), why)
}

async fn publish_front(ctx: &Ctx) {
    const ATTACK: &str = "publish-front";
    let rtmp = addr(1, 1, 1935);
    let rtmps = addr(1, 1, 1936);
    let pid = ctx.service_pid("lb1");
    let restarts = ctx.restarts("lb1");
    let ingest_pid = ctx.service_pid("ingest1");
    let ingest_restarts = ctx.restarts("ingest1");
    let rss_before = pid.and_then(rss_kib);
    let metrics_before = ctx.metrics(addr(1, 1, 8443)).await;
    let ingest_before = ctx.metrics(addr(4, 1, 8443)).await;
    let publish_s = u64::from(ctx.limits.rtmp_publish_seconds);
    let limit = Duration::from_secs(publish_s + 15);
    let started = Instant::now();

    // Slowloris from one address: silent TCP and an unfinished TLS handshake on RTMPS, and an
    // RTMP handshake a byte a second on RTMP (forwarded, so the ingest's deadline ends it).
    let (silent, tls_half, trickle) = futures::join!(
        front_connections(attacker(8), rtmps, 20, b"", b"", limit),
        front_connections(
            attacker(8),
            rtmps,
            10,
            &[0x16, 0x03, 0x01, 0x02],
            b"",
            limit
        ),
        front_connections(attacker(8), rtmp, 10, b"", TRICKLE, limit),
    );
    let all: Vec<_> = silent
        .iter()
        .chain(&tls_half)
        .chain(&trickle)
        .cloned()
        .collect();
    let (at_once, later, longest, open, refused) = endings(&all);
    let per_address = ctx.limits.rtmp_connections_per_address as usize;
    ctx.check(
        ATTACK,
        later + open <= per_address && refused == 0,
        format!("{} of 40 held over 1 s from one address (cap {per_address}), {refused} refused at connect", later + open),
    );
    let deadline = Duration::from_secs(publish_s * 2 + 3);
    ctx.check(
        ATTACK,
        open == 0 && longest <= deadline,
        format!("every one closed within {deadline:?}: longest {longest:?}, {open} still open"),
    );
    let slowloris = format!(
        "40 connections from one address (20 silent and 10 half TLS handshakes on RTMPS, 10 \
         trickling an RTMP handshake on RTMP): {at_once} closed at once, {later} held then \
         closed (longest {:.1} s), {open} held at end",
        longest.as_secs_f64()
    );

    // Not RTMP (an HTTP request) is closed by the LB itself; an RTMP version byte then
    // garbage is forwarded and refused by the ingest.
    let (http, junk) = futures::join!(
        front_connections(
            attacker(9),
            rtmp,
            3,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"",
            limit
        ),
        front_connections(attacker(9), rtmp, 3, &[0x03; 4000], b"", limit),
    );
    let (http_at_once, ..) = endings(&http);
    let (_, junk_later, junk_longest, junk_open, _) = endings(&junk);
    ctx.check(
        ATTACK,
        http_at_once == 3 && junk_open == 0 && junk_longest <= deadline,
        format!(
            "garbage closed: HTTP on RTMP {http_at_once}/3 at once; RTMP version then junk \
             closed by the ingest after at most {junk_longest:?} ({junk_later} after 1 s, \
             {junk_open} open)"
        ),
    );

    // A wrong key through the LB: refused by the ingest, in no LB log line.
    let wrong_key = format!("wrong-key-{}", std::process::id());
    let (wrong_accepted, _) = publish_through(ctx, rtmps, &wrong_key, 2).await;
    ctx.check(
        ATTACK,
        !wrong_accepted,
        format!("a wrong stream key through lb1 is refused: accepted {wrong_accepted}"),
    );

    // The global cap, from many addresses: silent RTMPS connections, 8 from each of 10.
    let global = ctx.limits.rtmp_connections as usize;
    let spread = futures::future::join_all((1..=10).map(|n| {
        front_connections(
            Ipv4Addr::new(127, 66, 1, n),
            rtmps,
            per_address,
            b"",
            b"",
            limit,
        )
    }));
    // Meanwhile an OBS-like publisher on the publish address: lb1 is full, so it goes on to
    // lb2 as OBS goes on to a name's next address. Its key is on no command line.
    let legit = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let publisher = ObsPublisher::start(&ctx.state).expect("publisher starts");
        let live = obs_publisher::wait_live(&ctx.state, Duration::from_secs(20)).await;
        let in_cmdline = cmdlines_containing(&ctx.stream_key);
        drop(publisher);
        (live, in_cmdline)
    };
    let (spread, (live, in_cmdline)) = futures::join!(spread, legit);
    let published = live.is_ok();
    let why = match &live {
        Ok(ingest) => format!("live on {ingest}"),
        Err(e) => e.to_string(),
    };
    let spread: Vec<_> = spread.into_iter().flatten().collect();
    let (g_at_once, g_later, g_longest, g_open, _) = endings(&spread);
    let offered = spread.len();
    ctx.check(
        ATTACK,
        g_later + g_open <= global && g_at_once >= offered.saturating_sub(global) && g_open == 0,
        format!(
            "{offered} silent connections from 10 addresses: {g_at_once} closed at once \
             (global cap {global}), {g_later} closed at the deadline (longest {g_longest:?}), \
             {g_open} open"
        ),
    );
    ctx.check(
        ATTACK,
        published,
        format!("an OBS-like publisher on the publish address meanwhile is accepted: {why}"),
    );
    ctx.check(
        ATTACK,
        in_cmdline.is_empty(),
        format!("the stream key is in no process's command line: {in_cmdline:?}"),
    );

    // lb1 logged neither key.
    let log = std::fs::read_to_string(ctx.state.join("logs/lb1.log")).unwrap_or_default()
        + &std::fs::read_to_string(ctx.state.join("logs/lb1.out")).unwrap_or_default();
    ctx.check(
        ATTACK,
        !log.is_empty() && !log.contains(&wrong_key) && !log.contains(&ctx.stream_key),
        format!("lb1's log ({} bytes) holds no stream key", log.len()),
    );
    ctx.same_or_restarted(ATTACK, "lb1", pid, restarts);
    ctx.same_or_restarted(ATTACK, "ingest1", ingest_pid, ingest_restarts);
    let metrics_after = ctx.metrics(addr(1, 1, 8443)).await;
    let ingest_after = ctx.metrics(addr(4, 1, 8443)).await;
    ctx.figures(
        ATTACK,
        format!(
            "{slowloris}; garbage: HTTP {http_at_once}/3 closed by lb1 at once, RTMP junk \
             closed by ingest1 within {:.2} s; wrong key refused: {}; {offered} silent from 10 \
             addresses: {g_at_once} refused at once, {g_later} closed at {:.1} s; OBS-like \
             publisher meanwhile: {why}; lb1 refusals: {}; ingest1 refusals: {}; lb1 RSS \
             {} -> {}; took {:.1} s",
            junk_longest.as_secs_f64(),
            !wrong_accepted,
            g_longest.as_secs_f64(),
            refusal_delta(&metrics_before, &metrics_after),
            refusal_delta(&ingest_before, &ingest_after),
            mib(rss_before),
            mib(ctx.service_pid("lb1").and_then(rss_kib)),
            started.elapsed().as_secs_f64()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// 9. The broadcasts' /steering proxy

/// How many answers had each HTTP status (0: no answer).
fn tally(answers: &[u16]) -> std::collections::BTreeMap<u16, usize> {
    let mut by_status = std::collections::BTreeMap::new();
    for a in answers {
        *by_status.entry(*a).or_insert(0) += 1;
    }
    by_status
}

async fn steering_flood(ctx: &Ctx) {
    const ATTACK: &str = "steering-flood";
    let target = addr(2, 1, 8443);
    let pid = ctx.service_pid("broadcast1");
    let restarts = ctx.restarts("broadcast1");
    let lbs = [addr(1, 1, 8443), addr(1, 2, 8443)];
    let mut asked_before = 0.0;
    for lb in lbs {
        asked_before += counter(&ctx.metrics_text(lb).await, "lb_steering_total");
    }
    let flooder = Ctx::client_from(&ctx.ca, Some(IpAddr::V4(attacker(10))));
    let started = Instant::now();
    let huge = "x".repeat(60 * 1024);
    let too_big = "x".repeat(200 * 1024);
    let queries: Vec<String> = (0..2000)
        .map(|i| match i % 10 {
            0 => format!("channel=test&_HLS_pathway={huge}"),
            1 => format!("channel={too_big}"),
            2 => "channel=..%2F..%2Fetc%2Fpasswd&_HLS_pathway=%00%FF".into(),
            3 => format!("channel=test&t=forged.{i}&_HLS_throughput=-1e308"),
            4 => "channel=test&channel=nope&_HLS_pathway=broadcast2".into(),
            _ => "channel=test&_HLS_pathway=broadcast1".into(),
        })
        .collect();
    let answers: Vec<u16> = futures::stream::iter(queries)
        .map(|q| {
            let flooder = flooder.clone();
            async move {
                match flooder
                    .get(format!("https://{target}/steering?{q}"))
                    .send()
                    .await
                {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let took = started.elapsed();
    let by_status = tally(&answers);
    let mut asked_after = 0.0;
    for lb in lbs {
        asked_after += counter(&ctx.metrics_text(lb).await, "lb_steering_total");
    }
    let asked = asked_after - asked_before;
    // One question per (channel, pathway) key and second: three keys here.
    let bound = 3.0 * (took.as_secs_f64().ceil() + 1.0);
    ctx.check(
        ATTACK,
        asked <= bound
            && !by_status.keys().any(|s| *s >= 500)
            && by_status.get(&0).is_none_or(|n| *n <= 200),
        format!(
            "2000 requests in {:.1} s: answers {by_status:?}; the LBs were asked {asked} times \
             (at most {bound})",
            took.as_secs_f64()
        ),
    );
    let legit = Ctx::client_from(&ctx.ca, None)
        .get(format!(
            "https://{target}/steering?channel=test&_HLS_pathway=broadcast1"
        ))
        .send()
        .await
        .map(|r| r.status().as_u16());
    ctx.check(
        ATTACK,
        matches!(legit, Ok(200)),
        format!("a player's steering request: {legit:?}"),
    );
    ctx.same_or_restarted(ATTACK, "broadcast1", pid, restarts);
    ctx.figures(
        ATTACK,
        format!(
            "2000 /steering requests from one address, 64 at a time (a fifth with 60 KiB or \
             200 KiB values, others odd or forged): answers {by_status:?} in {:.1} s; LB steering \
             requests during it: {asked}",
            took.as_secs_f64()
        ),
    );
}

/// The newest segment URL (relative to `{base}/live/test/`) of the first rendition the master
/// playlist lists, fetched with `token`.
async fn newest_segment(client: &reqwest::Client, base: &str, token: &str) -> Option<String> {
    let get = |url: String| async move {
        let r = client.get(url).send().await.ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    };
    let uri_lines = |text: String| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split('?').next().unwrap_or(l).to_owned())
            .collect()
    };
    let master = get(format!("{base}/live/test/master.m3u8?t={token}")).await?;
    let media = uri_lines(master).into_iter().next()?;
    let playlist = get(format!("{base}/live/test/{media}?t={token}")).await?;
    let dir = media.rsplit_once('/').map_or("", |(d, _)| d);
    let segment = uri_lines(playlist).pop()?;
    Some(format!("{dir}/{segment}"))
}

/// Player reports (`POST /api/player`) from a token holder who also downloads a segment, so
/// its reports are a viewer's: forged tokens, bodies too big, odd figures and a flood of
/// "all stalled" reports. One token may move the stall figures by one player's worth at most.
async fn player_reports(ctx: &Ctx) {
    const ATTACK: &str = "player-reports";
    let reporter = Ctx::client_from(&ctx.ca, Some(IpAddr::V4(attacker(11))));
    let assigned: Value = match reporter
        .get(format!(
            "https://{}/api/assign?channel=test",
            addr(1, 2, 8443)
        ))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let (Some(base), Some(token)) = (assigned["base_url"].as_str(), assigned["token"].as_str())
    else {
        ctx.check(
            ATTACK,
            false,
            format!("an assign for the attack: {assigned}"),
        );
        return;
    };
    let Ok(target) = base.trim_start_matches("https://").parse::<SocketAddr>() else {
        ctx.check(ATTACK, false, format!("a broadcast address in {base}"));
        return;
    };
    // Only this attack reports (the watchers are no pages).
    let host = match target.ip() {
        IpAddr::V4(ip) => format!("broadcast{}", ip.octets()[3]),
        IpAddr::V6(_) => unreachable!("the local cluster is on IPv4 loopback"),
    };
    let (pid, restarts) = (ctx.service_pid(&host), ctx.restarts(&host));
    let stalls = |m: &str| counter(m, "broadcast_player_stall_milliseconds_total");
    let stalled_before = stalls(&ctx.metrics_text(target).await);
    let post = |t: String, body: String| {
        let reporter = reporter.clone();
        async move {
            match reporter
                .post(format!("{base}/api/player?t={t}"))
                .body(body)
                .send()
                .await
            {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    let all_stalled = r#"{"watch_s":30,"stall_s":30,"latency_s":600}"#.to_owned();
    // Before any download the token is no viewer's yet.
    let not_viewer = post(token.to_owned(), all_stalled.clone()).await;
    let segment = newest_segment(&reporter, base, token).await;
    let fetched = match &segment {
        Some(s) => match reporter
            .get(format!("{base}/live/test/{s}?t={token}"))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
            _ => false,
        },
        None => false,
    };
    let started = Instant::now();
    let huge = format!(
        r#"{{"watch_s":1,"stall_s":1,"pad":"{}"}}"#,
        "x".repeat(200 * 1024)
    );
    let requests: Vec<(String, String)> = (0..1000)
        .map(|i| match i % 10 {
            0 => (token.to_owned(), huge.clone()),
            1 => (format!("{token}x"), all_stalled.clone()),
            2 => (token.to_owned(), r#"{"watch_s":1e308,"stall_s":-1}"#.into()),
            3 => (token.to_owned(), r#"{"watch_s":5,"stall_s":9}"#.into()),
            4 => (token.to_owned(), "[[[[[[[[[[[[[[[[[[[[".repeat(50)),
            5 => (
                token.to_owned(),
                r#"{"watch_s":5,"stall_s":1,"extra":1}"#.into(),
            ),
            _ => (token.to_owned(), all_stalled.clone()),
        })
        .collect();
    let answers: Vec<u16> = futures::stream::iter(requests)
        .map(|(t, body)| post(t, body))
        .buffer_unordered(64)
        .collect()
        .await;
    let took = started.elapsed();
    let by_status = tally(&answers);
    let stalled = stalls(&ctx.metrics_text(target).await) - stalled_before;
    // One counted report per 5 s, 30 s of stall each at most.
    let bound = 30_000.0 * ((took.as_secs_f64() / 5.0).ceil() + 1.0);
    let counted = by_status.get(&204).copied().unwrap_or(0);
    ctx.check(
        ATTACK,
        not_viewer == 429
            && fetched
            && (1..=(took.as_secs() / 5 + 2) as usize).contains(&counted)
            && stalled <= bound
            && [400, 403].iter().all(|s| by_status.contains_key(s))
            // Too big: 413, or the connection closed before the client finished sending.
            && (by_status.contains_key(&413) || by_status.contains_key(&0))
            && !by_status.keys().any(|s| *s >= 500),
        format!(
            "before a download: {not_viewer}; a segment fetched: {fetched}; 1000 reports in \
             {:.1} s: answers {by_status:?}; stall ms counted {stalled} (at most {bound})",
            took.as_secs_f64()
        ),
    );
    ctx.same_or_restarted(ATTACK, &host, pid, restarts);
    ctx.figures(
        ATTACK,
        format!(
            "1000 player reports from one viewer's token, 64 at a time (a tenth of 200 KiB, \
             a tenth forged, others odd or all-stalled): answers {by_status:?} in {:.1} s; \
             stall seconds counted {:.0}",
            took.as_secs_f64(),
            stalled / 1000.0
        ),
    );
}

// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "end to end: needs ffmpeg, nix-instantiate, PostgreSQL, Patroni, etcd and the workspace binaries (scripts/test.sh)"]
fn hostile_clients_cost_viewers_nothing() {
    let cluster = LocalCluster::new();
    let state = cluster.state.clone();
    cluster.up(PREFIX, None, &[]);
    let started = Instant::now();
    let viewers = streamctl()
        .args(["watch", "--json", "--viewers"])
        .arg(VIEWERS.to_string())
        .arg("--seconds")
        .arg(WATCH_SECONDS.to_string())
        .arg("--state")
        .arg(&state)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("streamctl watch starts");
    let ctx = Arc::new(Ctx::new(&state));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Let the viewers start before the first attack.
        tokio::time::sleep(Duration::from_secs(5)).await;
        deep_amf(&ctx).await;
        idle_rtmp(&ctx).await;
        futures::join!(
            slowloris_one(ctx.clone(), "broadcast1", addr(2, 1, 8443)),
            slowloris_one(ctx.clone(), "lb1", addr(1, 1, 8443)),
        );
        assign_spam(&ctx).await;
        // The publish front and /steering meet other hosts' limits than the accounts, chat and
        // database attacks: they run alongside them.
        futures::join!(
            async {
                let owner = password_guessing(&ctx).await;
                chat_flood(ctx.clone(), owner).await;
                etcd_patroni(&ctx).await;
            },
            async {
                publish_front(&ctx).await;
                steering_flood(&ctx).await;
                player_reports(&ctx).await;
            },
        );
        let (published, why) = ctx.legit_publish(4).await;
        ctx.check(
            "end",
            published,
            format!("a legitimate publish is accepted: {why}"),
        );
    });
    let attacks_s = started.elapsed().as_secs_f64();
    ctx.check(
        "end",
        attacks_s < WATCH_SECONDS as f64,
        format!(
            "every attack ran while the viewers watched: {attacks_s:.0} s of {WATCH_SECONDS} s"
        ),
    );
    let output = viewers.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    ctx.check(
        "viewers",
        report["stalls"] == 0 && report["errors"] == 0 && report["segments"].as_u64() > Some(0),
        format!(
            "{VIEWERS} viewers for {WATCH_SECONDS} s: stalls {}, stall s {}, errors {}, \
             failovers {}, segments {}{}",
            report["stalls"],
            report["stall_s"],
            report["errors"],
            report["failovers"],
            report["segments"],
            if report.is_null() {
                format!(" ({})", String::from_utf8_lossy(&output.stderr))
            } else {
                String::new()
            }
        ),
    );
    eprintln!("hostile: figures for docs/security.md:");
    for line in ctx.figures.lock().unwrap().iter() {
        eprintln!("  {line}");
    }
    let failures = ctx.failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
