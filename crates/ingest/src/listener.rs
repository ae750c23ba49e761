//! RTMP and RTMPS listeners: accept, limit, time out, and shuttle bytes between the socket and
//! an [`RtmpSession`]. Everything protocol-related is in `rtmp.rs`.
//!
//! Limits come from `limits` in `cluster.nix` and follow SIGHUP: a global and a per-address cap
//! on open connections (a refused connection is closed at once, so idle sockets from one
//! address cannot lock publishers out), and one deadline from accept to an accepted publish
//! that covers the TLS handshake and whatever the peer sends, so trickling bytes buys nothing.
//!
//! Outside publishers normally arrive through an LB (its RTMP front forwards their bytes), so
//! the LBs' addresses are exempt from the per-address cap: each LB applies it to the real
//! client addresses. They still count against the global cap, but may fill only three quarters
//! of it: the rest stays for the sources and the other ingests, so that publishers trickling in
//! through the LBs cannot keep a source that reconnects out.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use streaming_core::serve::accept_until_shutdown;

use streaming_core::config::LimitsConfig;
use streaming_core::conn_limit::LogThrottle;
use streaming_core::lifecycle::Lifecycle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::channel::ChannelMsg;
use crate::flv::TagKind;
use crate::publish::{PLAIN_SOURCE, PublishRequest, StreamKeys, relay_publish_name};
use crate::relay::{RelayPeers, RelayStream, Relays};
use crate::rtmp::{RtmpSession, SessionEvent};
use streaming_core::sync::{lock, read, write};
use streaming_hls::unix_now_ms;

/// An accepted publisher that sends nothing for this long is closed (publishers send constantly).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at once.
const READ_BUFFER: usize = 64 * 1024;

/// The connection limits of `limits` in `cluster.nix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtmpLimits {
    pub connections: usize,
    pub per_address: usize,
    pub publish_deadline: Duration,
}

impl From<&LimitsConfig> for RtmpLimits {
    fn from(l: &LimitsConfig) -> Self {
        Self {
            connections: l.rtmp_connections as usize,
            per_address: l.rtmp_connections_per_address as usize,
            publish_deadline: Duration::from_secs(u64::from(l.rtmp_publish_seconds.max(1))),
        }
    }
}

#[derive(Default)]
struct OpenConnections {
    total: usize,
    /// Of `total`, those from the LBs.
    forwarded: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// Places of the global cap that connections from the LBs cannot take.
fn reserved(connections: usize) -> usize {
    if connections > 1 {
        (connections / 4).max(1)
    } else {
        0
    }
}

/// What every connection needs.
pub struct RtmpContext {
    pub keys: RwLock<StreamKeys>,
    pub channels: RwLock<HashMap<String, mpsc::Sender<ChannelMsg>>>,
    /// RTMP addresses of the other ingests: publishers that reach only us are relayed there.
    pub peers: RwLock<Option<Arc<RelayPeers>>>,
    limits: RwLock<RtmpLimits>,
    /// Addresses of the LBs, which carry many publishers each (see the module comment).
    forwarders: RwLock<Vec<IpAddr>>,
    open: Mutex<OpenConnections>,
    /// A flood of refusals costs one log line a second.
    refusals: LogThrottle,
    next_conn: AtomicU64,
}

/// One open connection counted against the caps; uncounted when dropped.
struct Slot {
    ctx: Arc<RtmpContext>,
    ip: IpAddr,
    forwarded: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = lock(&self.ctx.open);
        open.total = open.total.saturating_sub(1);
        if self.forwarded {
            open.forwarded = open.forwarded.saturating_sub(1);
            return;
        }
        if let Some(n) = open.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_address.remove(&self.ip);
            }
        }
    }
}

impl RtmpContext {
    pub fn new(keys: StreamKeys, limits: &LimitsConfig) -> Arc<Self> {
        Arc::new(Self {
            keys: RwLock::new(keys),
            channels: RwLock::new(HashMap::new()),
            peers: RwLock::new(None),
            limits: RwLock::new(limits.into()),
            forwarders: RwLock::default(),
            open: Mutex::default(),
            refusals: LogThrottle::per_second(),
            next_conn: AtomicU64::new(1),
        })
    }

    /// New limits apply to connections accepted from now on.
    pub fn set_limits(&self, limits: &LimitsConfig) {
        *write(&self.limits) = limits.into();
    }

    /// The LBs' addresses, exempt from the per-address cap.
    pub fn set_forwarders(&self, addresses: Vec<IpAddr>) {
        *write(&self.forwarders) = addresses;
    }

    pub fn limits(&self) -> RtmpLimits {
        *read(&self.limits)
    }

    /// Counts a new connection from `ip`, or says which cap refuses it.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let limits = self.limits();
        let forwarder = read(&self.forwarders).contains(&ip);
        let mut open = lock(&self.open);
        if open.total >= limits.connections {
            return Err("connections");
        }
        if forwarder {
            if open.forwarded >= limits.connections - reserved(limits.connections) {
                return Err("forwarded");
            }
            open.total += 1;
            open.forwarded += 1;
            return Ok(Slot {
                ctx: self.clone(),
                ip,
                forwarded: true,
            });
        }
        let from_ip = open.per_address.entry(ip).or_insert(0);
        if *from_ip >= limits.per_address {
            if *from_ip == 0 {
                open.per_address.remove(&ip);
            }
            return Err("per_address");
        }
        *from_ip += 1;
        open.total += 1;
        Ok(Slot {
            ctx: self.clone(),
            ip,
            forwarded: false,
        })
    }

    fn log_refusal(&self, peer: SocketAddr, reason: &str, limits: RtmpLimits) {
        metrics::counter!("ingest_rtmp_refused_total", "reason" => reason.to_owned()).increment(1);
        let Some(suppressed) = self.refusals.allow_counting() else {
            return;
        };
        tracing::warn!(
            %peer,
            reason,
            suppressed,
            "RTMP connection refused: at most {} connections, {} per address ({suppressed} more refusals since the last such line)",
            limits.connections,
            limits.per_address,
        );
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

/// Serves RTMP (or RTMPS with `tls`) on a bound listener until shutdown.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<RtmpContext>,
    lifecycle: Lifecycle,
    tls: Option<watch::Receiver<tokio_rustls::TlsAcceptor>>,
) -> anyhow::Result<()> {
    loop {
        let Some((stream, peer)) = accept_until_shutdown(&listener, &lifecycle, "RTMP").await
        else {
            return Ok(());
        };
        let limits = ctx.limits();
        let slot = match ctx.admit(peer.ip().to_canonical()) {
            Ok(slot) => slot,
            Err(reason) => {
                // Dropping the socket closes it now: a refused peer holds nothing.
                drop(stream);
                ctx.log_refusal(peer, reason, limits);
                continue;
            }
        };
        let deadline = Instant::now() + limits.publish_deadline;
        let _ = stream.set_nodelay(true);
        let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
        let (ctx, lifecycle, acceptor) = (
            ctx.clone(),
            lifecycle.clone(),
            tls.as_ref().map(|t| t.borrow().clone()),
        );
        tokio::spawn(async move {
            let _slot = slot;
            let Some(acceptor) = acceptor else {
                return handle_connection(stream, peer, conn, &ctx, &lifecycle, deadline).await;
            };
            match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => handle_connection(tls, peer, conn, &ctx, &lifecycle, deadline).await,
                Ok(Err(e)) => tracing::warn!(%peer, "RTMPS TLS handshake failed: {e}"),
                Err(_) => {
                    metrics::counter!("ingest_rtmp_refused_total", "reason" => "publish_deadline")
                        .increment(1);
                    tracing::warn!(%peer, "RTMPS TLS handshake not done within the publish deadline");
                }
            }
        });
    }
}

/// Serves one connection; `deadline` is when it must have been accepted as a publisher.
async fn handle_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    conn: u64,
    ctx: &RtmpContext,
    lifecycle: &Lifecycle,
    deadline: Instant,
) {
    let mut session = RtmpSession::new();
    let mut buf = vec![0u8; READ_BUFFER];
    let mut publisher = Publisher {
        peer,
        conn,
        ctx,
        lifecycle,
        channel: None,
        joining: None,
        relays: None,
    };
    loop {
        let until = io_deadline(&session, deadline);
        let Some(n) = publisher
            .receive(&mut stream, &mut buf, session.is_publishing(), until)
            .await
        else {
            break;
        };
        let output = {
            let keys = read(&ctx.keys).clone();
            session.feed(&buf[..n], &|r| keys.check(r))
        };
        let output = match output {
            Ok(o) => o,
            Err(e) => {
                metrics::counter!("ingest_rtmp_refused_total", "reason" => "protocol").increment(1);
                tracing::warn!(%peer, conn, "closing RTMP connection: {e}");
                break;
            }
        };
        if !output.send.is_empty() {
            let until = io_deadline(&session, deadline);
            match tokio::time::timeout_at(until, stream.write_all(&output.send)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        for event in output.events {
            match publisher.on_event(event).await {
                ControlFlow::Continue(()) => {}
                // The channel task ends only at shutdown, which the next read sees.
                ControlFlow::Break(Stop::ChannelGone) => break,
                ControlFlow::Break(Stop::Unconfigured) => return,
            }
        }
        if output.close {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.flush()).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
            break;
        }
    }
    if let Some((name, tx)) = publisher.channel {
        tracing::debug!(%peer, conn, channel = %name, "RTMP connection closed");
        let _ = tx.send(ChannelMsg::Left { conn }).await;
    }
}

/// Until the publish is accepted one deadline covers everything, reads and writes alike; a
/// publisher then only has to keep sending.
fn io_deadline(session: &RtmpSession, deadline: Instant) -> Instant {
    if session.is_publishing() {
        Instant::now() + IDLE_TIMEOUT
    } else {
        deadline
    }
}

/// Why a connection stops handling the events of one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The channel task is gone (shutdown): the rest of the batch has nowhere to go.
    ChannelGone,
    /// A publish was accepted for a channel with a key but no configuration: the connection
    /// ends at once, without telling any channel.
    Unconfigured,
}

/// What one connection has become as a publisher: the channel it feeds, the publish waiting
/// for its first media tag, and the relays to the peer ingests.
struct Publisher<'a> {
    peer: SocketAddr,
    conn: u64,
    ctx: &'a RtmpContext,
    lifecycle: &'a Lifecycle,
    channel: Option<(String, mpsc::Sender<ChannelMsg>)>,
    /// Accepted, waiting for the first media tag to fix the anchor before joining the channel.
    joining: Option<PublishRequest>,
    relays: Option<Relays>,
}

impl Publisher<'_> {
    /// Reads what the peer sent by `until`; `None` ends the connection (closed, failed, idle,
    /// or no accepted publish by the deadline, each logged), or shutdown.
    async fn receive<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        buf: &mut [u8],
        publishing: bool,
        until: Instant,
    ) -> Option<usize> {
        let (peer, conn) = (self.peer, self.conn);
        let received = tokio::select! {
            _ = self.lifecycle.shutdown() => return None,
            r = tokio::time::timeout_at(until, stream.read(buf)) => r,
        };
        match received {
            Ok(Ok(0)) => None,
            Ok(Ok(n)) => Some(n),
            Ok(Err(e)) => {
                tracing::debug!(%peer, conn, "RTMP read error: {e}");
                None
            }
            Err(_) if publishing => {
                tracing::warn!(%peer, conn, "closing RTMP connection: idle for {}s", IDLE_TIMEOUT.as_secs());
                None
            }
            Err(_) => {
                metrics::counter!("ingest_rtmp_refused_total", "reason" => "publish_deadline")
                    .increment(1);
                tracing::warn!(%peer, conn, "closing RTMP connection: no accepted publish within {}s of connecting", self.ctx.limits().publish_deadline.as_secs());
                None
            }
        }
    }

    /// One session event: a publish accepted or refused, or a media tag for the channel and
    /// the relays.
    async fn on_event(&mut self, event: SessionEvent) -> ControlFlow<Stop> {
        let (peer, conn) = (self.peer, self.conn);
        let (kind, timestamp_ms, data) = match event {
            SessionEvent::PublishAccepted(request) => return self.accept(request),
            SessionEvent::PublishRefused { channel, reason } => {
                tracing::warn!(%peer, conn, "{}", refusal_line(channel.as_deref(), &reason));
                metrics::counter!("ingest_publishes_refused_total").increment(1);
                return ControlFlow::Continue(());
            }
            SessionEvent::PublishFinished => return ControlFlow::Continue(()),
            SessionEvent::Video { timestamp_ms, data } => (TagKind::Video, timestamp_ms, data),
            SessionEvent::Audio { timestamp_ms, data } => (TagKind::Audio, timestamp_ms, data),
        };
        if let Some(request) = self.joining.take() {
            self.join(request, timestamp_ms).await?;
        }
        if let Some(relays) = &mut self.relays {
            relays.push(kind, timestamp_ms, &data);
        }
        let media = ChannelMsg::Media {
            conn,
            kind,
            timestamp_ms,
            data,
        };
        if let Some((_, tx)) = &self.channel
            && tx.send(media).await.is_err()
        {
            return ControlFlow::Break(Stop::ChannelGone);
        }
        ControlFlow::Continue(())
    }

    /// A publish the keys allow: it joins its channel at the first media tag ([`Self::join`]).
    /// A channel with a key but no configuration is refused here.
    fn accept(&mut self, mut request: PublishRequest) -> ControlFlow<Stop> {
        let (peer, conn) = (self.peer, self.conn);
        let tx = read(&self.ctx.channels).get(&request.channel).cloned();
        let Some(tx) = tx else {
            tracing::warn!(%peer, channel = %request.channel, "refused publish: channel has a key but is not configured");
            metrics::counter!("ingest_publishes_refused_total").increment(1);
            return ControlFlow::Break(Stop::Unconfigured);
        };
        tracing::info!(%peer, conn, channel = %request.channel, source = request.source.as_deref().unwrap_or("-"), anchor_ms = ?request.anchor_ms, relayed = request.relayed, "publish accepted");
        metrics::counter!("ingest_publishes_accepted_total").increment(1);
        if request.source.is_none() {
            request.source = Some(PLAIN_SOURCE.to_string());
        }
        self.channel = Some((request.channel.clone(), tx));
        self.joining = Some(request);
        ControlFlow::Continue(())
    }

    /// At the first media tag: fix the anchor, start relaying a publisher that reached only us,
    /// and join the channel.
    async fn join(&mut self, request: PublishRequest, timestamp_ms: u32) -> ControlFlow<Stop> {
        // A plain publisher (no anchor): its media time 0 is "now minus this first
        // timestamp", fixed once here so the relay carries exactly the anchor we use.
        let anchor_ms = request
            .anchor_ms
            .unwrap_or_else(|| unix_now_ms().saturating_sub(u64::from(timestamp_ms)));
        let source = request.source.clone().unwrap_or_default();
        if !request.relayed {
            let peers = read(&self.ctx.peers).clone();
            if let Some(peers) = peers.filter(|p| !p.is_empty()) {
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
                self.relays = Some(Relays::start(&stream, &peers, self.lifecycle));
            }
        }
        let joined = ChannelMsg::Joined {
            conn: self.conn,
            source,
            anchor_ms,
            relayed: request.relayed,
            peer: self.peer,
        };
        if let Some((_, tx)) = &self.channel
            && tx.send(joined).await.is_err()
        {
            return ControlFlow::Break(Stop::ChannelGone);
        }
        ControlFlow::Continue(())
    }
}

/// The log text of a refused publish. The channel is named only when it is configured (a
/// refused publish name may be a pasted key).
pub fn refusal_line(channel: Option<&str>, reason: &crate::publish::Refusal) -> String {
    match channel {
        Some(channel) => format!("refused publish on channel {channel:?}: {reason}"),
        None => format!("refused publish: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpSocket;

    async fn connect_from(ip: [u8; 4], to: SocketAddr) -> tokio::net::TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((ip, 0)))
            .expect("loopback source address");
        socket.connect(to).await.unwrap()
    }

    /// Reads until the server closes, returns how long that took (or None if still open after
    /// `wait`), trickling a byte every 100 ms when `trickle`.
    async fn closed_within(
        stream: &mut tokio::net::TcpStream,
        wait: Duration,
        trickle: bool,
    ) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 8192];
        // The RTMP version byte, so the handshake is under way and answered.
        let _ = stream.write_all(&[3]).await;
        while started.elapsed() < wait {
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) | Err(_) => {}
            }
            if trickle && stream.write_all(&[0]).await.is_err() {
                return Some(started.elapsed());
            }
        }
        None
    }

    #[tokio::test]
    async fn caps_and_publish_deadline_on_a_real_listener() {
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap();
        let limits = LimitsConfig {
            rtmp_connections: 3,
            rtmp_connections_per_address: 2,
            rtmp_publish_seconds: 2,
            ..LimitsConfig::default()
        };
        let ctx = RtmpContext::new(StreamKeys::default(), &limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lifecycle = Lifecycle::from_signals().unwrap();
        tokio::spawn(accept_loop(listener, ctx.clone(), lifecycle.clone(), None));

        // Two from one address are held; the third from it is closed at once.
        let mut a1 = connect_from([127, 0, 0, 1], addr).await;
        let mut a2 = connect_from([127, 0, 0, 1], addr).await;
        let mut a3 = connect_from([127, 0, 0, 1], addr).await;
        let refused_after = closed_within(&mut a3, Duration::from_secs(5), false).await;
        assert!(refused_after.is_some(), "per-address cap");
        // Another address still gets in, up to the global cap.
        let mut b1 = connect_from([127, 0, 0, 2], addr).await;
        let mut c1 = connect_from([127, 0, 0, 3], addr).await;
        let global_after = closed_within(&mut c1, Duration::from_secs(5), false).await;
        assert!(global_after.is_some(), "global cap");

        // The held ones, trickling a byte every 100 ms, are closed by the publish deadline.
        let (r1, r2, r3) = tokio::join!(
            closed_within(&mut a1, Duration::from_secs(10), true),
            closed_within(&mut a2, Duration::from_secs(10), false),
            closed_within(&mut b1, Duration::from_secs(10), true),
        );
        let held: Vec<_> = [r1, r2, r3]
            .into_iter()
            .map(|r| r.expect("closed by the publish deadline"))
            .collect();
        println!(
            "per-address refusal after {refused_after:?}, global refusal after {global_after:?}, \
             deadline (2 s) closed trickling/idle/trickling sockets after {held:?}"
        );
        // Their slots are free again: a new connection from the first address is served.
        let mut again = connect_from([127, 0, 0, 1], addr).await;
        again.write_all(&[3]).await.unwrap();
        let mut s0s1 = vec![0u8; 1 + 1536];
        tokio::time::timeout(Duration::from_secs(5), again.read_exact(&mut s0s1))
            .await
            .expect("handshake answered")
            .unwrap();

        // Tighter limits after a reload apply to new connections.
        ctx.set_limits(&LimitsConfig {
            rtmp_connections_per_address: 1,
            ..limits
        });
        let mut second = connect_from([127, 0, 0, 1], addr).await;
        assert!(
            closed_within(&mut second, Duration::from_secs(5), false)
                .await
                .is_some()
        );

        // An LB forwards many publishers from its one address: the per-address cap spares it.
        ctx.set_forwarders(vec![IpAddr::from([127, 0, 0, 9])]);
        let mut lb1 = connect_from([127, 0, 0, 9], addr).await;
        let mut lb2 = connect_from([127, 0, 0, 9], addr).await;
        let (h1, h2) = tokio::join!(
            closed_within(&mut lb1, Duration::from_millis(500), false),
            closed_within(&mut lb2, Duration::from_millis(500), false),
        );
        assert_eq!((h1, h2), (None, None), "both held from a forwarder address");
        // The last place of the three is kept from the LBs for a source (or the other ingest).
        drop(again);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut lb3 = connect_from([127, 0, 0, 9], addr).await;
        let mut source = connect_from([127, 0, 0, 5], addr).await;
        let (h3, hs) = tokio::join!(
            closed_within(&mut lb3, Duration::from_millis(500), false),
            closed_within(&mut source, Duration::from_millis(500), false),
        );
        assert!(h3.is_some(), "a third forwarded connection is refused");
        assert_eq!(hs, None, "the reserved place takes a source");
        drop((lb1, lb2, lb3, source));

        let rendered = prometheus.render();
        for reason in [
            "per_address",
            "connections",
            "publish_deadline",
            "forwarded",
        ] {
            assert!(
                rendered.contains(&format!("ingest_rtmp_refused_total{{reason=\"{reason}\"}}")),
                "{reason} missing in {rendered}"
            );
        }
        lifecycle.request_shutdown();
    }
}
