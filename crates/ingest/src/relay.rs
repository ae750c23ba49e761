//! Relaying a publisher that reached only this ingest (OBS has one server URL) to every peer
//! ingest, so both keep transcoding the same stream on the same timeline.
//!
//! The relay is an RTMP client (rml_rtmp) that publishes `<channel>?key=..&source=..&anchor=..
//! &relayed=1`: same key, same source name, and the anchor this ingest fixed, so the peer maps
//! every timestamp to the same wall clock; `relayed=1` keeps the peer from relaying it back. It
//! reconnects with backoff while the publisher lives; after a (re)connect or a dropped tag it
//! sends the sequence headers again and resumes video at a keyframe, so the peer always gets a
//! decodable stream.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use streaming_core::lifecycle::Lifecycle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::flv::{self, TagKind};
use crate::rtmp::APP;

/// Tags queued towards one peer; when full, tags are dropped and video resumes at a keyframe.
pub const RELAY_QUEUE: usize = 1024;
/// TCP connect + RTMP handshake + connect + publish must finish within this.
pub const RELAY_SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A write that does not finish within this means the peer hangs: reconnect.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bytes the peer may send us during setup (it only answers commands).
const MAX_SETUP_BYTES: usize = 256 * 1024;

/// The stream being relayed.
#[derive(Clone)]
pub struct RelayStream {
    pub channel: String,
    /// The publish name towards the peer (key included: never logged).
    pub publish_name: String,
    pub source: String,
    pub anchor_ms: u64,
}

#[derive(Debug, Clone)]
struct RelayTag {
    kind: TagKind,
    timestamp_ms: u32,
    data: Bytes,
}

struct Target {
    tx: mpsc::Sender<RelayTag>,
    /// A tag was dropped: skip video until the next keyframe.
    resync: bool,
}

/// The publisher side's handle: one queue per peer. Dropping it ends the relays.
pub struct Relays {
    targets: Vec<Target>,
}

impl Relays {
    /// Starts one relay task per peer address.
    pub fn start(stream: &RelayStream, peers: &[SocketAddr], lifecycle: &Lifecycle) -> Self {
        let targets = peers
            .iter()
            .map(|&addr| {
                let (tx, rx) = mpsc::channel(RELAY_QUEUE);
                tokio::spawn(relay_task(addr, stream.clone(), rx, lifecycle.clone()));
                Target { tx, resync: false }
            })
            .collect();
        Self { targets }
    }

    /// Queues one media tag for every peer without waiting (the publisher is never slowed down
    /// by a slow peer).
    pub fn push(&mut self, kind: TagKind, timestamp_ms: u32, data: &Bytes) {
        let keyframe = kind == TagKind::Video && flv::is_video_keyframe(data);
        for t in &mut self.targets {
            if t.resync && kind == TagKind::Video && !keyframe {
                continue;
            }
            let tag = RelayTag {
                kind,
                timestamp_ms,
                data: data.clone(),
            };
            match t.tx.try_send(tag) {
                Ok(()) => {
                    if keyframe {
                        t.resync = false;
                    }
                }
                Err(mpsc::error::TrySendError::Full(_)) => t.resync = true,
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("RTMP: {0}")]
    Rtmp(String),
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("peer closed the connection")]
    Closed,
}

fn rtmp_err(e: impl std::fmt::Debug) -> RelayError {
    RelayError::Rtmp(format!("{e:?}"))
}

async fn relay_task(
    addr: SocketAddr,
    stream: RelayStream,
    mut rx: mpsc::Receiver<RelayTag>,
    lifecycle: Lifecycle,
) {
    let mut backoff = BACKOFF_FIRST;
    let (mut avc, mut aac): (Option<Bytes>, Option<Bytes>) = (None, None);
    loop {
        let attempt = async {
            let (mut tcp, mut session) =
                tokio::time::timeout(RELAY_SETUP_TIMEOUT, connect(addr, &stream.publish_name))
                    .await
                    .map_err(|_| RelayError::Timeout)??;
            tracing::info!(channel = %stream.channel, peer = %addr, source = %stream.source, anchor_ms = stream.anchor_ms, "relay publishing to peer ingest");
            forward(&mut tcp, &mut session, &mut rx, &mut avc, &mut aac).await
        };
        let result = tokio::select! {
            _ = lifecycle.shutdown() => return,
            r = attempt => r,
        };
        match result {
            Ok(()) => {
                tracing::info!(channel = %stream.channel, peer = %addr, "relay ended: publisher gone");
                return;
            }
            Err(e) => {
                tracing::warn!(channel = %stream.channel, peer = %addr, "relay to peer ingest failed, retrying in {} ms: {e}", backoff.as_millis());
                metrics::counter!("ingest_relay_failures_total").increment(1);
            }
        }
        // Keep the queue drained while waiting (only the sequence headers matter then).
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = lifecycle.shutdown() => return,
                _ = &mut wait => break,
                tag = rx.recv() => match tag {
                    None => return,
                    Some(t) => remember_headers(&t, &mut avc, &mut aac),
                },
            }
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn remember_headers(t: &RelayTag, avc: &mut Option<Bytes>, aac: &mut Option<Bytes>) {
    match t.kind {
        TagKind::Video if flv::is_avc_sequence_header(&t.data) => *avc = Some(t.data.clone()),
        TagKind::Audio if flv::is_aac_sequence_header(&t.data) => *aac = Some(t.data.clone()),
        _ => {}
    }
}

async fn write_results(
    tcp: &mut TcpStream,
    results: Vec<ClientSessionResult>,
) -> Result<Vec<ClientSessionEvent>, RelayError> {
    let mut events = Vec::new();
    for r in results {
        match r {
            ClientSessionResult::OutboundResponse(p) => tcp.write_all(&p.bytes).await?,
            ClientSessionResult::RaisedEvent(e) => events.push(e),
            ClientSessionResult::UnhandleableMessageReceived(_) => {}
        }
    }
    Ok(events)
}

/// TCP connect, RTMP handshake, `connect` to app `live`, `publish`.
async fn connect(
    addr: SocketAddr,
    publish_name: &str,
) -> Result<(TcpStream, ClientSession), RelayError> {
    let mut tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let mut handshake = Handshake::new(PeerType::Client);
    tcp.write_all(&handshake.generate_outbound_p0_and_p1().map_err(rtmp_err)?)
        .await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut received = 0usize;
    let leftover = loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(RelayError::Closed);
        }
        received += n;
        if received > MAX_SETUP_BYTES {
            return Err(RelayError::Rtmp("handshake too long".into()));
        }
        match handshake.process_bytes(&buf[..n]).map_err(rtmp_err)? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                tcp.write_all(&response_bytes).await?
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                tcp.write_all(&response_bytes).await?;
                break remaining_bytes;
            }
        }
    };
    let (mut session, initial) =
        ClientSession::new(ClientSessionConfig::new()).map_err(rtmp_err)?;
    write_results(&mut tcp, initial).await?;
    let r = session
        .request_connection(APP.to_string())
        .map_err(rtmp_err)?;
    write_results(&mut tcp, vec![r]).await?;
    let mut pending = leftover;
    let mut publishing_requested = false;
    loop {
        if !pending.is_empty() {
            let results = session.handle_input(&pending).map_err(rtmp_err)?;
            pending.clear();
            for event in write_results(&mut tcp, results).await? {
                match event {
                    ClientSessionEvent::ConnectionRequestAccepted if !publishing_requested => {
                        publishing_requested = true;
                        let r = session
                            .request_publishing(publish_name.to_string(), PublishRequestType::Live)
                            .map_err(rtmp_err)?;
                        write_results(&mut tcp, vec![r]).await?;
                    }
                    ClientSessionEvent::ConnectionRequestRejected { description } => {
                        return Err(RelayError::Refused(description));
                    }
                    ClientSessionEvent::PublishRequestAccepted => return Ok((tcp, session)),
                    ClientSessionEvent::UnhandleableOnStatusCode { code } => {
                        return Err(RelayError::Refused(code));
                    }
                    _ => {}
                }
            }
        }
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Err(RelayError::Closed);
        }
        received += n;
        if received > MAX_SETUP_BYTES {
            return Err(RelayError::Rtmp("peer talks too much during setup".into()));
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Sends headers, then the queued tags (video from a keyframe), until the publisher is gone
/// (`Ok`) or the peer fails (`Err`).
async fn forward(
    tcp: &mut TcpStream,
    session: &mut ClientSession,
    rx: &mut mpsc::Receiver<RelayTag>,
    avc: &mut Option<Bytes>,
    aac: &mut Option<Bytes>,
) -> Result<(), RelayError> {
    let send = |session: &mut ClientSession, t: &RelayTag| {
        let ts = RtmpTimestamp::new(t.timestamp_ms);
        match t.kind {
            TagKind::Video => session.publish_video_data(t.data.clone(), ts, false),
            TagKind::Audio => session.publish_audio_data(t.data.clone(), ts, false),
        }
        .map_err(rtmp_err)
    };
    let mut waiting_keyframe = true;
    let mut headers_sent = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            tag = rx.recv() => {
                let Some(tag) = tag else { return Ok(()) };
                remember_headers(&tag, avc, aac);
                if !headers_sent {
                    // The codec headers first, stamped like the first tag (RTMP timestamps must
                    // not run backwards).
                    headers_sent = true;
                    let mut out = Vec::new();
                    for (kind, header) in [(TagKind::Video, &*avc), (TagKind::Audio, &*aac)] {
                        let Some(data) = header else { continue };
                        let h = RelayTag { kind, timestamp_ms: tag.timestamp_ms, data: data.clone() };
                        if let ClientSessionResult::OutboundResponse(p) = send(session, &h)? {
                            out.extend_from_slice(&p.bytes);
                        }
                    }
                    write_timed(tcp, &out).await?;
                    if flv::is_avc_sequence_header(&tag.data) || flv::is_aac_sequence_header(&tag.data) {
                        continue;
                    }
                }
                if tag.kind == TagKind::Video {
                    if flv::is_video_keyframe(&tag.data) && !flv::is_avc_sequence_header(&tag.data) {
                        waiting_keyframe = false;
                    } else if waiting_keyframe && !flv::is_avc_sequence_header(&tag.data) {
                        continue;
                    }
                }
                if let ClientSessionResult::OutboundResponse(p) = send(session, &tag)? {
                    write_timed(tcp, &p.bytes).await?;
                }
            }
            read = tcp.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    return Err(RelayError::Closed);
                }
                // Acks and pings: answer what needs an answer, ignore the rest.
                let results = session.handle_input(&buf[..n]).map_err(rtmp_err)?;
                let mut answers = Vec::new();
                for r in results {
                    if let ClientSessionResult::OutboundResponse(p) = r {
                        answers.extend_from_slice(&p.bytes);
                    }
                }
                write_timed(tcp, &answers).await?;
            }
        }
    }
}

async fn write_timed(tcp: &mut TcpStream, bytes: &[u8]) -> Result<(), RelayError> {
    if bytes.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(WRITE_TIMEOUT, tcp.write_all(bytes))
        .await
        .map_err(|_| RelayError::Timeout)??;
    Ok(())
}
