//! RTMP and RTMPS listeners: accept, limit, time out, and shuttle bytes between the socket and
//! an [`RtmpSession`]. Everything protocol-related is in `rtmp.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use streaming_core::lifecycle::Lifecycle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::channel::ChannelMsg;
use crate::flv::TagKind;
use crate::publish::{PLAIN_SOURCE, PublishRequest, StreamKeys, relay_publish_name};
use crate::relay::{RelayStream, Relays};
use crate::rtmp::{RtmpSession, SessionEvent};
use streaming_hls::unix_now_ms;

/// Concurrent RTMP(S) connections; publishers are few (sources, OBS), so this is generous.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends nothing for this long is closed (publishers send constantly).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake, and RTMP handshake + connect + publish, must finish within this.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at once.
const READ_BUFFER: usize = 64 * 1024;

/// What every connection needs.
pub struct RtmpContext {
    pub keys: RwLock<StreamKeys>,
    pub channels: RwLock<HashMap<String, mpsc::Sender<ChannelMsg>>>,
    /// RTMP addresses of the other ingests: publishers that reach only us are relayed there.
    pub peers: RwLock<Vec<SocketAddr>>,
    pub limit: Arc<Semaphore>,
    next_conn: AtomicU64,
}

impl RtmpContext {
    pub fn new(keys: StreamKeys) -> Arc<Self> {
        Arc::new(Self {
            keys: RwLock::new(keys),
            channels: RwLock::new(HashMap::new()),
            peers: RwLock::new(Vec::new()),
            limit: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            next_conn: AtomicU64::new(1),
        })
    }
}

/// Plain RTMP on `addr` until shutdown.
pub async fn serve_rtmp(
    addr: SocketAddr,
    ctx: Arc<RtmpContext>,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("RTMP listen on {addr}: {e}"))?;
    tracing::info!(%addr, "RTMP listening");
    accept_loop(listener, ctx, lifecycle, None).await
}

/// RTMPS on `addr`; the acceptor is swapped on SIGHUP (certificate reload).
pub async fn serve_rtmps(
    addr: SocketAddr,
    ctx: Arc<RtmpContext>,
    lifecycle: Lifecycle,
    tls: watch::Receiver<tokio_rustls::TlsAcceptor>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("RTMPS listen on {addr}: {e}"))?;
    tracing::info!(%addr, "RTMPS listening");
    accept_loop(listener, ctx, lifecycle, Some(tls)).await
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<RtmpContext>,
    lifecycle: Lifecycle,
    tls: Option<watch::Receiver<tokio_rustls::TlsAcceptor>>,
) -> anyhow::Result<()> {
    loop {
        let (stream, peer) = tokio::select! {
            _ = lifecycle.shutdown() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("RTMP accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = ctx.limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "RTMP connection refused: {MAX_CONNECTIONS} connections already open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
        let (ctx, lifecycle, acceptor) = (
            ctx.clone(),
            lifecycle.clone(),
            tls.as_ref().map(|t| t.borrow().clone()),
        );
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => handle_connection(stream, peer, conn, &ctx, &lifecycle).await,
                Some(acceptor) => {
                    match tokio::time::timeout(SETUP_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => handle_connection(tls, peer, conn, &ctx, &lifecycle).await,
                        Ok(Err(e)) => tracing::warn!(%peer, "RTMPS TLS handshake failed: {e}"),
                        Err(_) => tracing::warn!(%peer, "RTMPS TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn handle_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    conn: u64,
    ctx: &RtmpContext,
    lifecycle: &Lifecycle,
) {
    let mut session = RtmpSession::new();
    let mut buf = vec![0u8; READ_BUFFER];
    let started = Instant::now();
    let mut channel: Option<(String, mpsc::Sender<ChannelMsg>)> = None;
    // Accepted, waiting for the first media tag to fix the anchor before joining the channel.
    let mut joining: Option<PublishRequest> = None;
    let mut relays: Option<Relays> = None;
    loop {
        let read = tokio::select! {
            _ = lifecycle.shutdown() => break,
            r = tokio::time::timeout(IDLE_TIMEOUT, stream.read(&mut buf)) => r,
        };
        let n = match read {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(%peer, conn, "RTMP read error: {e}");
                break;
            }
            Err(_) => {
                tracing::warn!(%peer, conn, "closing RTMP connection: idle for {}s", IDLE_TIMEOUT.as_secs());
                break;
            }
        };
        let output = {
            let keys = ctx.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
            session.feed(&buf[..n], &|r| keys.check(r))
        };
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(%peer, conn, "closing RTMP connection: {e}");
                break;
            }
        };
        if !output.send.is_empty() {
            match tokio::time::timeout(IDLE_TIMEOUT, stream.write_all(&output.send)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        for event in output.events {
            let (kind, timestamp_ms, data) = match event {
                SessionEvent::PublishAccepted(mut request) => {
                    let tx = ctx
                        .channels
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&request.channel)
                        .cloned();
                    let Some(tx) = tx else {
                        tracing::warn!(%peer, channel = %request.channel, "refused publish: channel has a key but is not configured");
                        metrics::counter!("ingest_publishes_refused_total").increment(1);
                        return;
                    };
                    tracing::info!(%peer, conn, channel = %request.channel, source = request.source.as_deref().unwrap_or("-"), anchor_ms = ?request.anchor_ms, relayed = request.relayed, "publish accepted");
                    metrics::counter!("ingest_publishes_accepted_total").increment(1);
                    if request.source.is_none() {
                        request.source = Some(PLAIN_SOURCE.to_string());
                    }
                    channel = Some((request.channel.clone(), tx));
                    joining = Some(request);
                    continue;
                }
                SessionEvent::PublishRefused {
                    name_channel,
                    source,
                    reason,
                } => {
                    tracing::warn!(%peer, conn, channel = %name_channel, source = source.as_deref().unwrap_or("-"), "refused publish on channel {name_channel:?} from {peer}: {reason}");
                    metrics::counter!("ingest_publishes_refused_total").increment(1);
                    continue;
                }
                SessionEvent::PublishFinished => continue,
                SessionEvent::Video { timestamp_ms, data } => (TagKind::Video, timestamp_ms, data),
                SessionEvent::Audio { timestamp_ms, data } => (TagKind::Audio, timestamp_ms, data),
            };
            if let Some(request) = joining.take() {
                // A plain publisher (no anchor): its media time 0 is "now minus this first
                // timestamp", fixed once here so the relay carries exactly the anchor we use.
                let anchor_ms = request
                    .anchor_ms
                    .unwrap_or_else(|| unix_now_ms().saturating_sub(u64::from(timestamp_ms)));
                let source = request.source.clone().unwrap_or_default();
                if !request.relayed {
                    let peers = ctx.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
                    if !peers.is_empty() {
                        let stream = RelayStream {
                            channel: request.channel.clone(),
                            publish_name: relay_publish_name(
                                &request.channel,
                                &request.key,
                                &source,
                                anchor_ms,
                            ),
                            source: source.clone(),
                            anchor_ms,
                        };
                        relays = Some(Relays::start(&stream, &peers, lifecycle));
                    }
                }
                let joined = ChannelMsg::Joined {
                    conn,
                    source,
                    anchor_ms,
                    relayed: request.relayed,
                    peer,
                };
                if let Some((_, tx)) = &channel
                    && tx.send(joined).await.is_err()
                {
                    break;
                }
            }
            if let Some(relays) = &mut relays {
                relays.push(kind, timestamp_ms, &data);
            }
            if let Some((_, tx)) = &channel
                && tx
                    .send(ChannelMsg::Media {
                        conn,
                        kind,
                        timestamp_ms,
                        data,
                    })
                    .await
                    .is_err()
            {
                break;
            }
        }
        if output.close {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.flush()).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
            break;
        }
        if !session.is_publishing() && started.elapsed() > SETUP_TIMEOUT {
            tracing::warn!(%peer, conn, "closing RTMP connection: no publish within {}s", SETUP_TIMEOUT.as_secs());
            break;
        }
    }
    if let Some((name, tx)) = channel {
        tracing::debug!(%peer, conn, channel = %name, "RTMP connection closed");
        let _ = tx.send(ChannelMsg::Left { conn }).await;
    }
}
