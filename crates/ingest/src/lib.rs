//! The ingest role: RTMP/RTMPS publishers in (stream key checked), the best live source per
//! channel transcoded by an ffmpeg ladder, segments placed on the shared slot timeline (slate
//! when there is no input), and an HTTPS origin serving the playlists and segments from memory.
//!
//! Modules: `rtmp` (one connection as a state machine, over `chunk` reassembly and the
//! depth-limited `amf0` decoder), `listener` (sockets, TLS, limits), `publish` (publish name + stream keys), `select` (source choice per slot), `relay` (forwarding a single-ingest publisher to the peers), `flv` (FLV writer),
//! `transcode` (ffmpeg runs and slate), `segments` (CSV list -> slots), `channel` (the per-channel
//! task), `origin` (HTTP API).

pub mod amf0;
pub mod channel;
pub mod chunk;
pub mod cut;
pub mod flv;
pub mod listener;
pub mod origin;
pub mod publish;
pub mod relay;
pub mod rtmp;
pub mod select;
pub mod slate;
pub mod transcode;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use streaming_core::config::{ChannelConfig, HostConfig, TimelineConfig};
use streaming_core::lifecycle::Lifecycle;
use streaming_core::secrets::read_secret;
use streaming_core::service::ServiceContext;
use streaming_hls::SlotClock;
use tokio::sync::{mpsc, watch};

use crate::channel::{CHANNEL_QUEUE, ChannelMsg, ChannelSetup, ChannelShared, ChannelTask};
use crate::listener::RtmpContext;
use crate::publish::StreamKeys;
use streaming_core::sync::write;

fn ranked_sources(config: &HostConfig, channel: &str) -> Vec<String> {
    config
        .cluster
        .sources_of(channel)
        .into_iter()
        .map(|h| h.name.clone())
        .collect()
}

/// The other ingests as relay targets (their RTMPS endpoints, verified with the cluster CA).
fn relay_peers(config: &HostConfig) -> anyhow::Result<Arc<relay::RelayPeers>> {
    Ok(Arc::new(relay::RelayPeers::from_config(config)?))
}

fn lb_addresses(config: &HostConfig) -> Vec<std::net::IpAddr> {
    config
        .cluster
        .hosts_with_role(streaming_core::config::Role::Lb)
        .map(|h| h.address.to_canonical())
        .collect()
}

fn load_keys(config: &HostConfig) -> StreamKeys {
    StreamKeys::load(
        &config.paths.stream_keys_dir,
        config.cluster.channels.iter().map(|c| c.name.as_str()),
    )
}

fn tls_acceptor(config: &HostConfig) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let server = streaming_core::tls::server_config(&config.paths.tls_cert, &config.paths.tls_key)?;
    Ok(tokio_rustls::TlsAcceptor::from(server))
}

/// The whole ingest service; returns when shutdown completes.
pub async fn run(ctx: ServiceContext) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let me = config.me().clone();
    let cluster_key = read_secret(&config.paths.cluster_key).context("cluster key")?;
    let rtmp = RtmpContext::new(load_keys(&config), &config.cluster.limits);
    rtmp.set_forwarders(lb_addresses(&config));
    *write(&rtmp.peers) = Some(relay_peers(&config).context("relay peers")?);
    let tls = tls_acceptor(&config).context("RTMPS certificate")?;
    let (tls_tx, tls_rx) = watch::channel(tls);

    let shared: Arc<RwLock<HashMap<String, Arc<ChannelShared>>>> = Arc::default();
    let mut senders: HashMap<String, mpsc::Sender<ChannelMsg>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    for channel in &config.cluster.channels {
        let (out, tx) = start_channel(&config, channel, &mut tasks, &ctx.lifecycle).await?;
        write(&shared).insert(channel.name.clone(), out);
        senders.insert(channel.name.clone(), tx);
    }
    *write(&rtmp.channels) = senders.clone();

    let cluster_key = Arc::new(RwLock::new(cluster_key));
    let state = origin::OriginState {
        channels: shared,
        cluster_key: cluster_key.clone(),
        metrics: ctx.metrics.clone(),
        host: config.name.clone(),
        ops: streaming_core::ops_auth::for_service(&ctx)?,
    };

    // SIGHUP: stream keys, cluster key, config (source ranks, channel settings, RTMP limits),
    // RTMPS cert.
    let reloader = Arc::new(Reloader {
        rtmp: rtmp.clone(),
        cluster_key,
        tls: tls_tx,
        channels: senders,
    });
    tasks.spawn(ctx.reload_loop(move |config| {
        let reloader = reloader.clone();
        async move {
            reloader.apply(&config).await;
            Ok(())
        }
    }));

    let rtmp_task = listener::serve_rtmp(
        me.socket(me.ports.rtmp),
        rtmp.clone(),
        ctx.lifecycle.clone(),
    );
    let rtmps_task = listener::serve_rtmps(
        me.socket(me.ports.rtmps),
        rtmp.clone(),
        ctx.lifecycle.clone(),
        tls_rx,
    );
    let https = streaming_core::serve::serve_https(
        origin::router(state),
        me.socket(me.ports.https),
        config.paths.tls_cert.clone(),
        config.paths.tls_key.clone(),
        (&config.cluster.limits).into(),
        ctx.lifecycle.clone(),
    );
    let result = ctx.stop_on_error(tokio::try_join!(rtmp_task, rtmps_task, https));
    while tasks.join_next().await.is_some() {}
    result.map(|_| ())
}

/// One channel's task: its slate encoded first (the channel serves it from the first slot on,
/// so a failed encode stops the start), then the task spawned into `tasks`. Returns the
/// channel's output for the origin and the sender that RTMP connections and reloads use.
async fn start_channel(
    config: &HostConfig,
    channel: &ChannelConfig,
    tasks: &mut tokio::task::JoinSet<()>,
    lifecycle: &Lifecycle,
) -> anyhow::Result<(Arc<ChannelShared>, mpsc::Sender<ChannelMsg>)> {
    let timeline = &config.cluster.timeline;
    let clock = part_clock(timeline, channel.fps);
    let mut slates = Vec::new();
    for i in 0..channel.ladder.len() {
        let c = channel.clone();
        let slate = tokio::task::spawn_blocking(move || slate::Slate::encode(&c, i, clock))
            .await
            .context("slate encoder")??;
        slates.push(slate);
    }
    tracing::info!(channel = %channel.name, renditions = channel.ladder.len(), "slate encoded");
    let out = ChannelShared::new(channel, timeline);
    let (tx, rx) = mpsc::channel(CHANNEL_QUEUE);
    let setup = ChannelSetup {
        config: channel.clone(),
        sources: ranked_sources(config, &channel.name),
        clock: SlotClock::new(timeline.segment_seconds),
        parts: clock,
        slates,
        primary_return_slots: timeline.primary_return_slots(),
    };
    let task = ChannelTask::new(setup, out.clone(), tx.clone(), timeline.cache_segments);
    tasks.spawn(task.run(rx, lifecycle.clone()));
    Ok((out, tx))
}

/// The part clock of a channel: the timeline's segment and part durations at its frame rate.
pub fn part_clock(timeline: &TimelineConfig, fps: u32) -> streaming_media::PartClock {
    streaming_media::PartClock {
        segment_ms: u64::from(timeline.segment_seconds) * 1000,
        part_ms: u64::from(timeline.part_ms),
        frame_ms: 1000.0 / f64::from(fps.max(1)),
    }
}

/// What a SIGHUP changes in a running ingest.
struct Reloader {
    rtmp: Arc<RtmpContext>,
    cluster_key: Arc<RwLock<String>>,
    tls: watch::Sender<tokio_rustls::TlsAcceptor>,
    channels: HashMap<String, mpsc::Sender<ChannelMsg>>,
}

impl Reloader {
    /// Each part is reloaded on its own: a bad certificate must not keep new stream keys out.
    async fn apply(&self, current: &HostConfig) {
        let rtmp = &self.rtmp;
        *write(&rtmp.keys) = load_keys(current);
        rtmp.set_limits(&current.cluster.limits);
        rtmp.set_forwarders(lb_addresses(current));
        match relay_peers(current) {
            Ok(peers) => *write(&rtmp.peers) = Some(peers),
            Err(e) => tracing::error!("relay peers reload failed, keeping the old ones: {e:#}"),
        }
        match read_secret(&current.paths.cluster_key) {
            Ok(key) => *write(&self.cluster_key) = key,
            Err(e) => tracing::error!("cluster key reload failed, keeping the old one: {e}"),
        }
        match tls_acceptor(current) {
            Ok(acceptor) => {
                let _ = self.tls.send(acceptor);
            }
            Err(e) => tracing::error!("RTMPS certificate reload failed, keeping the old one: {e}"),
        }
        for channel in &current.cluster.channels {
            match self.channels.get(&channel.name) {
                Some(tx) => {
                    let msg = ChannelMsg::Reconfigure {
                        sources: ranked_sources(current, &channel.name),
                        config: channel.clone(),
                    };
                    let _ = tx.send(msg).await;
                }
                None => {
                    tracing::warn!(channel = %channel.name, "new channel in config: restart the ingest to serve it")
                }
            }
        }
        tracing::info!("reloaded stream keys, cluster key, config and RTMPS certificate");
    }
}
