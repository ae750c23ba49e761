//! Relaying a publisher that reached only this ingest (OBS has one server URL) to every peer
//! ingest, so both keep transcoding the same stream on the same timeline.
//!
//! The relay publishes over RTMPS to each peer's RTMPS port, the peer's certificate verified
//! against the cluster CA, as `<channel>?key=..&source=..&anchor=..&relayed=1`: same key, same
//! source name, and the anchor this ingest fixed, so the peer maps every timestamp to the same
//! wall clock; `relayed=1` keeps the peer from relaying it back. Queues, reconnects, codec headers
//! and keyframe resumption are `streaming_rtmp_publish`'s.

use std::time::Duration;

use bytes::Bytes;
use streaming_core::config::{HostConfig, Role};
use streaming_core::lifecycle::Lifecycle;
use streaming_rtmp_publish::{Backoff, Fanout, PublishOptions, Stream, Tag, Target};

use crate::flv::TagKind;
use crate::rtmp::APP;

/// Tags queued towards one peer; when full, tags are dropped and video resumes at a keyframe.
pub const RELAY_QUEUE: usize = 1024;

/// The stream being relayed.
#[derive(Clone)]
pub struct RelayStream {
    pub channel: String,
    /// The publish name towards the peer (key included: never logged).
    pub publish_name: String,
    pub source: String,
    pub anchor_ms: u64,
}

/// Every peer's RTMPS endpoint and the TLS client that verifies them.
pub struct RelayPeers {
    options: PublishOptions,
    targets: Vec<Target>,
}

impl RelayPeers {
    /// The other ingests of `config`, trusted through its CA bundle.
    pub fn from_config(config: &HostConfig) -> anyhow::Result<Self> {
        let tls = streaming_rtmp_publish::client_config(&config.paths.ca_cert)?;
        let targets = config
            .cluster
            .hosts_with_role(Role::Ingest)
            .filter(|h| h.name != config.name)
            .map(Target::rtmps_of)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            options: PublishOptions {
                tls,
                app: APP.to_string(),
                queue_tags: RELAY_QUEUE,
                backoff: Backoff {
                    first: Duration::from_millis(500),
                    max: Duration::from_secs(5),
                },
                failures_metric: "ingest_relay_failures_total",
                bind: Some(config.me().address),
            },
            targets,
        })
    }

    /// No other ingest to relay to.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

/// The publisher side's handle: one queue per peer. Dropping it ends the relays.
pub struct Relays {
    fanout: Option<Fanout>,
}

impl Relays {
    /// Starts one relay task per peer.
    pub fn start(stream: &RelayStream, peers: &RelayPeers, lifecycle: &Lifecycle) -> Self {
        let label = format!(
            "{} from {} (anchor {}, relayed)",
            stream.channel, stream.source, stream.anchor_ms
        );
        let publish = Stream {
            label,
            publish_name: stream.publish_name.clone(),
        };
        Self {
            fanout: Some(Fanout::start(
                &publish,
                &peers.targets,
                &peers.options,
                lifecycle,
            )),
        }
    }

    /// Queues one media tag for every peer without waiting (the publisher is never slowed down
    /// by a slow peer).
    pub fn push(&mut self, kind: TagKind, timestamp_ms: u32, data: &Bytes) {
        let Some(fanout) = &mut self.fanout else {
            return;
        };
        let kind = match kind {
            TagKind::Audio => streaming_rtmp_publish::TagKind::Audio,
            TagKind::Video => streaming_rtmp_publish::TagKind::Video,
        };
        fanout.push(&Tag {
            kind,
            timestamp_ms,
            data: data.clone(),
        });
    }
}
