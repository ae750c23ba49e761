//! An OBS-like outside publisher for the failover bench's "publisher's ingest" rows: ffmpeg
//! publishing a test pattern over RTMPS to the site's publish address (the LBs), reconnecting
//! [`RECONNECT_DELAY`] after a drop as OBS does, and trying the next LB address at once when
//! one refuses, as a resolver's address list is tried. Plus what the rows measure: where the
//! publisher is, and how many slate segments an ingest put on the timeline.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use streaming_core::config::{HostConfig, Role};

use crate::cluster::Layout;

/// OBS waits a few seconds before reconnecting after a drop.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(2);
/// The channel the bench publishes.
pub const CHANNEL: &str = "test";

/// A running publisher loop; stopped (and its ffmpeg killed) when dropped.
pub struct ObsPublisher {
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Child>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ObsPublisher {
    /// Starts publishing channel [`CHANNEL`] through the LBs of the cluster in `state`.
    ///
    /// ffmpeg takes the stream key in its URL, so it shows in its command line to local users
    /// (as with any ffmpeg publisher): meant for the local cluster's test key.
    pub fn start(state: &Path) -> anyhow::Result<Self> {
        let layout = Layout::new(state)?;
        let configs = layout.load_configs()?;
        let config = configs.first().context("no host config in the state dir")?;
        let key_file = config.paths.stream_keys_dir.join(format!("{CHANNEL}.key"));
        let key = streaming_core::secrets::read_secret(&key_file)
            .with_context(|| format!("stream key {}", key_file.display()))?;
        let lbs: Vec<String> = config
            .cluster
            .hosts_with_role(Role::Lb)
            .map(|h| h.socket(h.ports.rtmps).to_string())
            .collect();
        anyhow::ensure!(!lbs.is_empty(), "no LB in the cluster");
        let stop = Arc::new(AtomicBool::new(false));
        let child: Arc<Mutex<Option<Child>>> = Arc::default();
        let (s, c) = (stop.clone(), child.clone());
        let thread = std::thread::spawn(move || {
            let mut lb = 0;
            while !s.load(Ordering::SeqCst) {
                let url = format!("rtmps://{}/live/{CHANNEL}?key={key}", lbs[lb]);
                let started = Instant::now();
                let spawned = Command::new("ffmpeg")
                    .args(["-hide_banner", "-loglevel", "error", "-re"])
                    .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=25"])
                    .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
                    .args(["-g", "50", "-c:v", "libx264", "-preset", "ultrafast"])
                    .args(["-b:v", "1000k", "-c:a", "aac", "-b:a", "96k", "-f", "flv"])
                    .arg(&url)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    // ffmpeg prints its URL, key included, in its errors.
                    .stderr(Stdio::null())
                    .spawn();
                match spawned {
                    Ok(child) => *c.lock().unwrap_or_else(|e| e.into_inner()) = Some(child),
                    Err(e) => {
                        tracing::error!("cannot start ffmpeg: {e}");
                        return;
                    }
                }
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    let mut slot = c.lock().unwrap_or_else(|e| e.into_inner());
                    let exited = slot
                        .as_mut()
                        .is_none_or(|ch| ch.try_wait().ok().flatten().is_some());
                    if exited || s.load(Ordering::SeqCst) {
                        tracing::info!(lb = %lbs[lb], ran_s = started.elapsed().as_secs_f64(), "publisher's ffmpeg ended");
                        if let Some(mut ch) = slot.take() {
                            let _ = ch.kill();
                            let _ = ch.wait();
                        }
                        break;
                    }
                }
                if started.elapsed() > Duration::from_secs(1) {
                    std::thread::sleep(RECONNECT_DELAY);
                } else {
                    lb = (lb + 1) % lbs.len();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
        Ok(Self {
            stop,
            child,
            thread: Some(thread),
        })
    }
}

impl Drop for ObsPublisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(mut ch) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = ch.kill();
            let _ = ch.wait();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// [`CHANNEL`]'s status on every ingest that answers, by ingest name.
pub async fn ingest_channels(state: &Path) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let layout = Layout::new(state)?;
    let configs: Vec<HostConfig> = layout.load_configs()?;
    let client = crate::probe::client(&layout.ca().cert, Duration::from_secs(1))?;
    let token = configs
        .first()
        .and_then(|c| c.paths.metrics_token.as_deref())
        .and_then(|p| streaming_core::secrets::read_secret(p).ok());
    let mut out = Vec::new();
    for config in configs.iter().filter(|c| c.me().role == Role::Ingest) {
        let me = config.me();
        let url = me.url.trim_end_matches('/');
        if let Some(json) = crate::probe::status_json(&client, url, token.as_deref()).await {
            out.push((me.name.clone(), json["channels"][CHANNEL].clone()));
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
        .find(|(_, s)| s["outside_publishers"].as_u64() > Some(0) && s["live"] == true)
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
        .map(|(name, s)| (name, s["segments_slate"].as_u64().unwrap_or(0)))
        .collect()
}
