//! `streamctl bench serve`: one broadcast against nginx serving the same segment bytes.
//!
//! Against a running local cluster: the bench signs a viewer token for the broadcast (with the
//! cluster's token key, as an LB would), takes a segment of a rendition from it (the largest of
//! the newest five: not a slate), and writes those bytes under an nginx root at the same path.
//! nginx (Debian's, `worker_processes` = cores, TLS 1.3 only, the broadcast's own certificate,
//! sendfile, no access log: how an nginx edge is usually set up, HTTP/2 offered as the
//! broadcast offers it) listens beside the broadcast. Then one client (wrk for HTTP/1.1, h2load
//! for HTTP/2: `--protocol`) asks each server for that segment over HTTPS with the same
//! connections for the same time, in alternating rounds, broadcast first. The sources and
//! ingests are hung meanwhile (their transcoders would take the cores the servers compete for;
//! the broadcast keeps its window of segments) and resumed at the end, whatever happens.
//!
//! Each round gives requests per second, Gbit/s, the 99th percentile of the request time and
//! the CPU the server used (its whole process group, from /proc): Gbit/s per core of the
//! broadcast is the figure `streamctl plan` sizes broadcasts with. With `--pin` each server
//! runs on CPU 0 only (nginx with one worker) and the client on the others (`affinity`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use streaming_core::config::{HostConfig, Role};
use streaming_core::token::{TokenSigner, ViewerClaims, new_viewer_id, unix_now};
use streaming_runner::cluster::Layout;
use streaming_runner::hosts::Blow;
use streaming_runner::procs;

use crate::affinity::{self, Cpus, PinnedGroup};
use crate::faults;
use crate::http_load::{self, Protocol};

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// State directory of the running cluster.
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// The broadcast to measure.
    #[arg(long, default_value = "broadcast1")]
    pub broadcast: String,
    /// The rendition whose segment is served [default: the channel's top one].
    #[arg(long)]
    pub rendition: Option<String>,
    /// The protocol the client speaks: HTTP/1.1 (wrk) or HTTP/2 (h2load), what browsers use.
    #[arg(long, value_enum, default_value = "http1")]
    pub protocol: Protocol,
    /// Open connections, each asking for the segment again as soon as it has it.
    #[arg(long, default_value_t = 200)]
    pub connections: u32,
    /// Seconds per round and server.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Rounds: each measures the broadcast, then nginx.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Leave the sources and ingests running during the rounds.
    #[arg(long)]
    pub keep_transcoding: bool,
    /// Keep each server on CPU 0 during its rounds and the client on the other CPUs, so that
    /// the two servers get the same one CPU and the client does not take from it.
    #[arg(long)]
    pub pin: bool,
    /// Write the Markdown table here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeReport {
    pub broadcast: String,
    pub rendition: String,
    pub protocol: Protocol,
    pub segment_bytes: usize,
    pub connections: u32,
    pub seconds: u64,
    pub cores: usize,
    /// The CPUs each server was kept on (`--pin`); `None`: it shared every core with the client.
    pub server_cpus: Option<Vec<usize>>,
    pub rounds: Vec<ServeRound>,
    /// Broadcast requests per second over nginx's, per round.
    pub ratios: Vec<f64>,
    /// Broadcast Gbit/s per core it used over nginx's, per round: the fair comparison when the
    /// client shares the machine's cores and the request rate follows the scheduler.
    pub per_core_ratios: Vec<f64>,
    /// The broadcast's Gbit/s per core it used, median over its rounds.
    pub broadcast_gbps_per_core: f64,
    pub nginx_gbps_per_core: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeRound {
    pub round: u32,
    pub server: String,
    pub requests_per_second: f64,
    pub gbps: f64,
    pub p99_ms: f64,
    /// Answers other than 2xx/3xx plus socket errors.
    pub errors: u64,
    /// Cores the server's processes used during the round.
    pub server_cores: f64,
}

impl ServeRound {
    fn gbps_per_core(&self) -> f64 {
        self.gbps / self.server_cores.max(1e-3)
    }
}

/// Runs the bench and prints (or writes) its report.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    for (tool, package) in [
        (args.protocol.tool(), args.protocol.package()),
        ("nginx", "nginx-light"),
    ] {
        procs::which(tool)
            .with_context(|| format!("{tool} is needed (Debian: apt-get install -y {package})"))?;
    }
    let layout = Layout::new(&args.state)?;
    let configs = layout.load_configs()?;
    let config = configs
        .iter()
        .find(|c| c.name == args.broadcast && c.me().role == Role::Broadcast)
        .with_context(|| format!("no broadcast named {} in this cluster", args.broadcast))?
        .clone();
    let work = tempdir()?;
    let segment = fetch_segment(&config, args.rendition.as_deref()).await?;
    // Hung only once the segment is in hand; resumed whatever the rounds did.
    let hung = hang_transcoders(&args.state, &configs, args.keep_transcoding).await?;
    let result = measure(&args, &layout, &config, &segment, &work).await;
    faults::resume_settled(&args.state, &hung).await;
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    let table = markdown(&report);
    crate::output::emit(args.out.as_deref(), args.json, &table, &report)
}

/// Hangs every source and ingest (unless `keep`): their transcoders would take the cores the
/// measured server competes for. Returns the hosts to hand to
/// [`faults::resume_settled`].
pub(crate) async fn hang_transcoders(
    state: &Path,
    configs: &[HostConfig],
    keep: bool,
) -> anyhow::Result<Vec<String>> {
    let mut hung = Vec::new();
    if keep {
        return Ok(hung);
    }
    for config in configs {
        if matches!(config.me().role, Role::Source | Role::Ingest) {
            if let Err(e) = faults::kill(state, &config.name, Blow::Hang).await {
                faults::resume_settled(state, &hung).await;
                return Err(e);
            }
            hung.push(config.name.clone());
        }
    }
    Ok(hung)
}

/// The segment both servers serve: its URL path on the broadcast, its bytes and the token.
/// How long the bench waits for the window to hold a live segment.
const LIVE_SEGMENT_WAIT: Duration = Duration::from_secs(60);

struct Segment {
    rendition: String,
    path: String,
    bytes: Vec<u8>,
    token: String,
}

/// The largest segment of the rendition's window, once it is a live one. The window may hold
/// only slate segments for a while (after a restart, or right after an earlier bench hung and
/// resumed the sources), each a fraction of a live one's size: a segment counts as live from a
/// quarter of what the rendition's bitrate fills in a segment's time.
async fn fetch_segment(config: &HostConfig, rendition: Option<&str>) -> anyhow::Result<Segment> {
    let channel = config
        .cluster
        .channels
        .first()
        .context("the cluster has no channel")?;
    let rendition = match rendition {
        Some(name) => channel.ladder.iter().find(|r| r.name == name),
        None => channel.ladder.first(),
    }
    .context("no such rendition in the channel's ladder")?;
    let live_bytes = u64::from(rendition.video_kbps) * 1000 / 8
        * u64::from(config.cluster.timeline.segment_seconds)
        / 4;
    let key = streaming_core::secrets::read_secret(&config.paths.token_key)?;
    let token = TokenSigner::new(key.as_bytes()).sign(&ViewerClaims {
        broadcast: config.name.clone(),
        channel: channel.name.clone(),
        viewer: new_viewer_id(),
        expires: unix_now() + 3600,
    });
    let client =
        streaming_core::client::cluster_client(&config.paths.ca_cert, Duration::from_secs(10))?;
    let base = format!(
        "{}/live/{}/{}",
        config.me().url,
        channel.name,
        rendition.name
    );
    let deadline = Instant::now() + LIVE_SEGMENT_WAIT;
    loop {
        let (file, bytes) = largest_in_window(&client, &base, &token).await?;
        if bytes.len() as u64 >= live_bytes {
            return Ok(Segment {
                path: format!("/live/{}/{}/{file}", channel.name, rendition.name),
                rendition: rendition.name.clone(),
                bytes,
                token,
            });
        }
        if Instant::now() > deadline {
            bail!(
                "no live segment in {}'s window after {} s (the largest has {} bytes, a live one \
                 at least {live_bytes}): is the channel on slate?",
                rendition.name,
                LIVE_SEGMENT_WAIT.as_secs(),
                bytes.len()
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// The name and bytes of the largest segment the media playlist at `base` lists.
async fn largest_in_window(
    client: &reqwest::Client,
    base: &str,
    token: &str,
) -> anyhow::Result<(String, Vec<u8>)> {
    let playlist = client
        .get(format!("{base}/index.m3u8?t={token}"))
        .send()
        .await?
        .error_for_status()
        .context("media playlist")?
        .text()
        .await?;
    let mut largest: Option<(String, Vec<u8>)> = None;
    for line in playlist
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let file = line.split('?').next().unwrap_or(line).to_owned();
        let bytes = client
            .get(format!("{base}/{file}?t={token}"))
            .send()
            .await?
            .error_for_status()
            .context("segment")?
            .bytes()
            .await?
            .to_vec();
        if largest.as_ref().is_none_or(|(_, l)| bytes.len() > l.len()) {
            largest = Some((file, bytes));
        }
    }
    largest.context("the media playlist lists no segment yet: is the cluster live?")
}

async fn measure(
    args: &ServeArgs,
    layout: &Layout,
    config: &HostConfig,
    segment: &Segment,
    work: &Path,
) -> anyhow::Result<ServeReport> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let broadcast_pgid = procs::live_pid(
        &layout.pid_file(&config.name),
        &layout.config_file(&config.name),
    )
    .context("the broadcast is not running")?;
    let (server_cpus, client_cpus) = if args.pin {
        let (server, client) = affinity::split(cores)?;
        (Some(server), client)
    } else {
        (None, Cpus::Any(cores))
    };
    let workers = server_cpus.as_ref().map_or(cores, Vec::len);
    let nginx_addr = SocketAddr::new(config.me().address, config.me().ports.https + 1000);
    let mut nginx = Nginx::start(config, segment, nginx_addr, workers, work)?;
    // Both stay pinned over all the rounds (the idle one takes nothing from the other), and
    // the broadcast runs on every core again when the guard drops, whatever happens.
    let _pinned = match &server_cpus {
        Some(cpus) => Some((
            PinnedGroup::new(broadcast_pgid, cpus, cores).context("pinning the broadcast")?,
            PinnedGroup::new(nginx.pgid(), cpus, cores).context("pinning nginx")?,
        )),
        None => None,
    };
    let broadcast_url = format!("{}{}?t={}", config.me().url, segment.path, segment.token);
    let nginx_url = format!("https://{nginx_addr}{}?t={}", segment.path, segment.token);
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        for (server, url, pgid) in [
            ("broadcast", &broadcast_url, broadcast_pgid),
            ("nginx", &nginx_url, nginx.pgid()),
        ] {
            let cpu0 = procs::group_cpu_seconds(pgid);
            let t0 = Instant::now();
            let load = http_load::run(
                args.protocol,
                url,
                args.connections,
                args.seconds,
                &client_cpus,
                work,
            )
            .await?;
            let cpu = procs::group_cpu_seconds(pgid) - cpu0;
            let wall = t0.elapsed().as_secs_f64();
            let ok = load.requests.saturating_sub(load.non_success);
            let ok_per_second = load.requests_per_second * ok as f64 / load.requests.max(1) as f64;
            rounds.push(ServeRound {
                round,
                server: server.to_owned(),
                requests_per_second: load.requests_per_second,
                gbps: ok_per_second * segment.bytes.len() as f64 * 8.0 / 1e9,
                p99_ms: load.p99_ms,
                errors: load.non_success + load.socket_errors,
                server_cores: cpu / wall,
            });
        }
    }
    nginx.stop();
    Ok(summarise(args, config, segment, cores, server_cpus, rounds))
}

fn summarise(
    args: &ServeArgs,
    config: &HostConfig,
    segment: &Segment,
    cores: usize,
    server_cpus: Option<Vec<usize>>,
    rounds: Vec<ServeRound>,
) -> ServeReport {
    let of = |server: &str| -> Vec<&ServeRound> {
        rounds.iter().filter(|r| r.server == server).collect()
    };
    let pairs = || of("broadcast").into_iter().zip(of("nginx"));
    let ratios = pairs()
        .map(|(b, n)| b.requests_per_second / n.requests_per_second.max(f64::MIN_POSITIVE))
        .collect();
    let per_core_ratios = pairs()
        .map(|(b, n)| b.gbps_per_core() / n.gbps_per_core().max(f64::MIN_POSITIVE))
        .collect();
    let per_core = |server: &str| median(of(server).iter().map(|r| r.gbps_per_core()).collect());
    ServeReport {
        broadcast: config.name.clone(),
        rendition: segment.rendition.clone(),
        protocol: args.protocol,
        segment_bytes: segment.bytes.len(),
        connections: args.connections,
        seconds: args.seconds,
        cores,
        server_cpus,
        ratios,
        per_core_ratios,
        broadcast_gbps_per_core: per_core("broadcast"),
        nginx_gbps_per_core: per_core("nginx"),
        rounds,
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Debian's nginx, run by us in the foreground with its own process group.
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(
        config: &HostConfig,
        segment: &Segment,
        addr: SocketAddr,
        workers: usize,
        work: &Path,
    ) -> anyhow::Result<Self> {
        let root = work.join("root");
        let file = root.join(segment.path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().context("segment path")?)?;
        std::fs::write(&file, &segment.bytes)?;
        let conf = work.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(config, addr, workers, work, &root))?;
        let child = spawn_nginx(work, &conf, "nginx")?;
        let nginx = Self { child };
        wait_listening(addr, &work.join("nginx.out"), "nginx")?;
        Ok(nginx)
    }

    fn pgid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stop(&mut self) {
        procs::stop_group(self.pgid(), Duration::from_secs(3));
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// Debian's nginx with `conf`, in a process group of its own (stopping it stops its workers
/// and whatever they exec), output in `<work>/<name>.out`, errors in `<work>/<name>-error.log`.
pub(crate) fn spawn_nginx(work: &Path, conf: &Path, name: &str) -> anyhow::Result<Child> {
    let log = std::fs::File::create(work.join(format!("{name}.out")))?;
    std::os::unix::process::CommandExt::process_group(
        Command::new("nginx")
            .arg("-p")
            .arg(work)
            .arg("-c")
            .arg(conf)
            .arg("-e")
            .arg(work.join(format!("{name}-error.log")))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
        0,
    )
    .spawn()
    .context("cannot start nginx")
}

/// Waits up to 10 s for `addr` to accept connections; `out` tells why not.
pub(crate) fn wait_listening(addr: SocketAddr, out: &Path, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            let out = std::fs::read_to_string(out).unwrap_or_default();
            bail!("{what} did not listen on {addr}: {out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn nginx_conf(
    config: &HostConfig,
    addr: SocketAddr,
    workers: usize,
    work: &Path,
    root: &Path,
) -> String {
    let w = work.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid {w}/nginx.pid;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n\
           keepalive_timeout 60;\n  client_body_temp_path {w}/body;\n  proxy_temp_path {w}/proxy;\n\
           fastcgi_temp_path {w}/fastcgi;\n  uwsgi_temp_path {w}/uwsgi;\n  scgi_temp_path {w}/scgi;\n\
           types {{ video/mp4 m4s; }}\n\
           server {{\n    listen {addr} ssl http2;\n    ssl_protocols TLSv1.3;\n\
             ssl_certificate {};\n    ssl_certificate_key {};\n    root {};\n\
             add_header Cache-Control \"private, max-age=24\";\n  }}\n}}\n",
        config.paths.tls_cert.display(),
        config.paths.tls_key.display(),
        root.display(),
    )
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn markdown(r: &ServeReport) -> String {
    let mut s = String::new();
    let machine = match &r.server_cpus {
        Some(cpus) => format!(
            "each server kept on {} of the {} cores, {} on the others",
            cpus.len(),
            r.cores,
            r.protocol.tool()
        ),
        None => format!("{} cores shared with {}", r.cores, r.protocol.tool()),
    };
    let _ = writeln!(
        s,
        "{} ({} rendition, one {:.2} MB segment), {}, {} connections, {} s per round, {machine}\n",
        r.broadcast,
        r.rendition,
        r.segment_bytes as f64 / 1e6,
        r.protocol.label(),
        r.connections,
        r.seconds,
    );
    let _ = writeln!(
        s,
        "| round | server | requests/s | Gbit/s | p99 | errors | server cores | Gbit/s per core |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
    for x in &r.rounds {
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} | {:.2} | {:.0} ms | {} | {:.2} | {:.2} |",
            x.round,
            x.server,
            x.requests_per_second,
            x.gbps,
            x.p99_ms,
            x.errors,
            x.server_cores,
            x.gbps_per_core()
        );
    }
    let list = |v: &[f64]| -> String {
        let v: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
        v.join(", ")
    };
    let _ = writeln!(
        s,
        "\nBroadcast / nginx, per round: requests per second {}; Gbit/s per core used {}. Gbit/s per core used (median): broadcast {:.2}, nginx {:.2}.",
        list(&r.ratios),
        list(&r.per_core_ratios),
        r.broadcast_gbps_per_core,
        r.nginx_gbps_per_core
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(Vec::new()), 0.0);
    }
}
