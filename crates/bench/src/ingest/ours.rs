//! Our side: one ingest service, started alone from a config generated for this bench, with
//! the channel's ladder replaced by the original's renditions. No other host runs: the ingest
//! needs none to take a publish, transcode it and cut it into segments (the relay peers and
//! LBs are left out of its host list, so a publish is not forwarded anywhere, and the
//! publisher names itself `source1`, a source of the channel).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use streaming_core::config::{ChannelConfig, HostConfig, Role};
use streaming_runner::cluster::{self, Layout, Source};
use streaming_runner::procs;

/// The ingest host the bench runs, as `cluster.nix` names it.
const INGEST: &str = "ingest1";
/// The source the publisher claims to be.
const SOURCE: &str = "source1";
/// How long the ingest may take to encode its slates and listen.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// Generates the ingest's config from `cluster_file` at `prefix` under `work/state`, with
/// `channel` as its only channel: the config file, certificate and stream key are written.
pub fn prepare(
    cluster_file: &Path,
    prefix: &str,
    work: &Path,
    channel: ChannelConfig,
) -> anyhow::Result<HostConfig> {
    let layout = Layout::new(&work.join("state"))?;
    let source = Source::resolve(&layout, Some(cluster_file), Some(prefix))?;
    let mut configs = cluster::generate(&layout, &source)?;
    let mut config = configs
        .remove(INGEST)
        .with_context(|| format!("{} declares no host {INGEST}", cluster_file.display()))?;
    let name = channel.name.clone();
    config.cluster.channels = vec![channel];
    config
        .cluster
        .hosts
        .retain(|h| h.name == INGEST || (h.role == Role::Source && h.channels.contains(&name)));
    // The kept sources publish this channel only: the others are not in this config.
    for host in &mut config.cluster.hosts {
        if host.role == Role::Source {
            host.channels = vec![name.clone()];
        }
    }
    if !config.cluster.hosts.iter().any(|h| h.name == SOURCE) {
        bail!("{SOURCE} is not a source of channel {name} in the cluster file");
    }
    config.paths.log_dir = None;
    config.validate().map_err(anyhow::Error::msg)?;
    let one = std::collections::BTreeMap::from([(INGEST.to_owned(), config.clone())]);
    cluster::materialise(&layout, &one)?;
    Ok(config)
}

/// Our ingest service, run by us in its own process group.
pub struct OurIngest {
    child: Child,
    publish_url: String,
}

impl OurIngest {
    /// Starts `binary` (default: the ingest beside streamctl) with `config` and waits until
    /// it listens.
    pub fn start(config: &HostConfig, binary: Option<&Path>, work: &Path) -> anyhow::Result<Self> {
        let binary = match binary {
            Some(b) => b.to_owned(),
            None => procs::role_binary(Role::Ingest)?,
        };
        if !binary.exists() {
            bail!(
                "no binary {} (cargo build -p streaming-ingest)",
                binary.display()
            );
        }
        let layout = Layout::new(&work.join("state"))?;
        let log = std::fs::File::create(work.join("ingest.out"))?;
        let child = std::os::unix::process::CommandExt::process_group(
            Command::new(&binary)
                .arg("--config")
                .arg(layout.config_file(INGEST))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
            0,
        )
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
        let me = config.me();
        let addr = me.socket(me.ports.rtmp);
        let channel = &config.cluster.channels[0].name;
        let key_file = config.paths.stream_keys_dir.join(format!("{channel}.key"));
        let key = streaming_core::secrets::read_secret(&key_file)?;
        let mut ingest = Self {
            child,
            publish_url: format!("rtmp://{addr}/live/{channel}?key={key}&source={SOURCE}"),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline || !matches!(ingest.child.try_wait(), Ok(None)) {
                let out = std::fs::read_to_string(work.join("ingest.out")).unwrap_or_default();
                ingest.stop();
                bail!("the ingest did not listen on {addr}: {out}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(ingest)
    }

    /// The ingest service: its ffmpeg runs are its children.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Where a publisher sends the stream (it carries the stream key: never logged).
    pub fn publish_url(&self) -> &str {
        &self.publish_url
    }

    pub fn stop(&mut self) {
        procs::stop_group(self.pid(), Duration::from_secs(5));
        let _ = self.child.wait();
    }
}

impl Drop for OurIngest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}
