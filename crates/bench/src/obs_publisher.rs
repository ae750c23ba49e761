//! An OBS-like outside publisher for the failover bench's "publisher's ingest" rows: a test
//! pattern published over RTMPS to the site's publish address (the LBs), reconnecting
//! [`RECONNECT_DELAY`] after a drop as OBS does, and trying the next LB address at once when
//! one refuses, as a resolver's address list is tried. Plus what the rows measure: where the
//! publisher is, and how many slate segments an ingest put on the timeline.
//!
//! ffmpeg only encodes, as FLV on a pipe; our own RTMPS client (`streaming_rtmp_publish`)
//! publishes it, so the stream key is on no command line and the LB's certificate is checked
//! against the cluster CA. Each connection gets a fresh ffmpeg, so it starts on a keyframe, as
//! OBS's does after a reconnect.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use streaming_core::config::{HostConfig, Role};
use streaming_core::status::{IngestChannelStatus, IngestStatus};
use streaming_rtmp_publish::{
    Backoff, PublishOptions, Stream, Target, client_config, publish_once,
};
use tokio::sync::{mpsc, watch};

use streaming_clients::publish::{MediaEnd, QUEUE_TAGS, forward_media};
use streaming_runner::cluster::Layout;

/// OBS waits a few seconds before reconnecting after a drop.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// The channel the bench publishes.
pub const CHANNEL: &str = "test";

/// A running publisher loop; stopped (and its ffmpeg killed) when dropped.
pub struct ObsPublisher {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ObsPublisher {
    /// Starts publishing channel [`CHANNEL`] through the LBs of the cluster in `state`.
    pub fn start(state: &Path) -> anyhow::Result<Self> {
        let layout = Layout::new(state)?;
        let configs = layout.load_configs()?;
        let config = configs.first().context("no host config in the state dir")?;
        let key_file = config.paths.stream_keys_dir.join(format!("{CHANNEL}.key"));
        let key = streaming_core::secrets::read_secret(&key_file)
            .with_context(|| format!("stream key {}", key_file.display()))?;
        let lbs = config
            .cluster
            .hosts_with_role(Role::Lb)
            .map(Target::rtmps_of)
            .collect::<Result<Vec<_>, _>>()?;
        anyhow::ensure!(!lbs.is_empty(), "no LB in the cluster");
        let options = PublishOptions {
            tls: client_config(&layout.ca().cert).context("cluster CA")?,
            app: "live".into(),
            queue_tags: QUEUE_TAGS,
            backoff: Backoff {
                first: RECONNECT_DELAY,
                max: RECONNECT_DELAY,
            },
            failures_metric: "obs_publisher_failures_total",
            bind: None,
        };
        let stream = Stream {
            label: format!("{CHANNEL} from the OBS-like publisher"),
            publish_name: format!(
                "{CHANNEL}?{}",
                url::form_urlencoded::Serializer::new(String::new())
                    .append_pair("key", &key)
                    .finish()
            ),
        };
        let (stop, stopped) = watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(publish_loop(lbs, stream, options, stopped));
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// Connections one after the other until `stopped`: the same LB again after a drop, the next
/// at once when one fails within a second.
async fn publish_loop(
    lbs: Vec<Target>,
    stream: Stream,
    options: PublishOptions,
    mut stopped: watch::Receiver<bool>,
) {
    let mut lb = 0;
    while !*stopped.borrow() {
        let started = Instant::now();
        let attempt = one_connection(&lbs[lb], &stream, &options);
        tokio::select! {
            _ = stopped.changed() => return,
            ended = attempt => match ended {
                Ok(why) => tracing::info!(lb = %lbs[lb].name, ran_s = started.elapsed().as_secs_f64(), "publisher's connection ended: {why}"),
                Err(e) => {
                    tracing::error!("OBS-like publisher: {e:#}");
                    return;
                }
            },
        }
        let wait = if started.elapsed() > Duration::from_secs(1) {
            RECONNECT_DELAY
        } else {
            lb = (lb + 1) % lbs.len();
            Duration::from_millis(100)
        };
        tokio::select! {
            _ = stopped.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// A fresh ffmpeg encode published over one connection to `target`, until either ends: why it
/// ended, or `Err` when ffmpeg cannot run at all.
async fn one_connection(
    target: &Target,
    stream: &Stream,
    options: &PublishOptions,
) -> anyhow::Result<String> {
    let mut ffmpeg = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args(["-g", "50", "-c:v", "libx264", "-preset", "ultrafast"])
        .args([
            "-b:v", "1000k", "-c:a", "aac", "-b:a", "96k", "-f", "flv", "pipe:1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start ffmpeg")?;
    let stdout = ffmpeg.stdout.take().context("ffmpeg's stdout")?;
    let (tx, mut rx) = mpsc::channel(QUEUE_TAGS);
    let encode = async move {
        match forward_media(stdout, tx).await {
            Ok(MediaEnd::ReceiverGone) => "the connection is gone".to_owned(),
            Ok(MediaEnd::InputEnded) => "ffmpeg ended".to_owned(),
            Err(e) => format!("ffmpeg's FLV: {e}"),
        }
    };
    let why = tokio::select! {
        why = encode => why,
        ended = publish_once(target, stream, options, &mut rx) => match ended {
            Ok(()) => "the encode ended".to_owned(),
            Err(e) => e.to_string(),
        },
    };
    let _ = ffmpeg.kill().await;
    Ok(why)
}

impl Drop for ObsPublisher {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// [`CHANNEL`]'s status on every ingest that answers, by ingest name.
pub async fn ingest_channels(state: &Path) -> anyhow::Result<Vec<(String, IngestChannelStatus)>> {
    let layout = Layout::new(state)?;
    let configs: Vec<HostConfig> = layout.load_configs()?;
    let client = streaming_runner::probe::client(&layout.ca().cert, Duration::from_secs(1))?;
    let token = streaming_runner::status::ops_token(&configs);
    let mut out = Vec::new();
    for config in configs.iter().filter(|c| c.me().role == Role::Ingest) {
        let me = config.me();
        let url = me.url.trim_end_matches('/');
        if let Some(mut ingest) =
            streaming_runner::probe::status::<IngestStatus>(&client, url, token.as_deref()).await
        {
            let channel = ingest.channels.remove(CHANNEL).unwrap_or_default();
            out.push((me.name.clone(), channel));
        }
    }
    Ok(out)
}

/// The ingest holding the outside publisher, live.
pub async fn publisher_ingest(state: &Path) -> Option<String> {
    ingest_channels(state)
        .await
        .ok()?
        .into_iter()
        .find(|(_, s)| s.outside_publishers > 0 && s.live)
        .map(|(name, _)| name)
}

/// Waits until the publisher is live on an ingest.
pub async fn wait_live(state: &Path, limit: Duration) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        if let Some(ingest) = publisher_ingest(state).await {
            return Ok(ingest);
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "the outside publisher is not live on any ingest after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Slate segments each answering ingest has put on [`CHANNEL`]'s timeline so far.
pub async fn slate_counts(state: &Path) -> Vec<(String, u64)> {
    ingest_channels(state)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|(name, s)| (name, s.segments_slate))
        .collect()
}
