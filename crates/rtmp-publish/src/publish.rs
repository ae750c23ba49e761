//! Publishing one stream to several RTMPS servers at once.
//!
//! Each target gets its own task and queue: a target that is down, slow or hung never slows the
//! producer or the other targets. A full queue drops tags and video resumes at the next
//! keyframe; a failed connection is retried with backoff for as long as the [`Fanout`] lives,
//! with the same publish name. After every (re)connect the codec sequence headers go first and
//! video starts at a keyframe, so the server always gets a decodable stream.
//!
//! The publish name carries the stream key: it is only ever written inside TLS, after the
//! server proved its name with a certificate of the cluster CA, and never logged.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use streaming_core::config::HostEntry;
use streaming_core::lifecycle::Lifecycle;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::flv::{self, Tag, TagKind};

/// TCP connect + TLS + RTMP handshake + connect + publish must finish within this.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// A write that does not finish within this means the server hangs: reconnect.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes the server may send us during setup (it only answers commands).
const MAX_SETUP_BYTES: usize = 256 * 1024;

/// One RTMPS server to publish to.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// For logs and metrics (the host name).
    pub name: String,
    pub addr: SocketAddr,
    /// The name its certificate must carry.
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (rtmps://{})", self.name, self.addr)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("host {host}: URL {url:?} names no host to verify its certificate against")]
    NoName { host: String, url: String },
}

impl Target {
    /// The RTMPS port of a cluster host, verified against the name its HTTPS URL uses (its
    /// address in the local cluster, its DNS name where certificates come from ACME), the same
    /// name every HTTPS peer checks.
    pub fn rtmps_of(host: &HostEntry) -> Result<Self, TargetError> {
        let no_name = || TargetError::NoName {
            host: host.name.clone(),
            url: host.url.clone(),
        };
        let url = url::Url::parse(&host.url).map_err(|_| no_name())?;
        let server_name = match url.host().ok_or_else(no_name)? {
            url::Host::Domain(d) => ServerName::try_from(d.to_owned()).map_err(|_| no_name())?,
            url::Host::Ipv4(ip) => ServerName::from(std::net::IpAddr::V4(ip)),
            url::Host::Ipv6(ip) => ServerName::from(std::net::IpAddr::V6(ip)),
        };
        Ok(Self {
            name: host.name.clone(),
            addr: host.socket(host.ports.rtmps),
            server_name,
        })
    }
}

/// A TLS client trusting only the CA bundle at `ca_cert` (the cluster CA, or the system bundle
/// where certificates come from ACME).
pub fn client_config(ca_cert: &Path) -> Result<Arc<ClientConfig>, streaming_core::tls::TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in streaming_core::tls::load_certs(ca_cert)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Waits between reconnection attempts: `first`, doubling up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

/// How a [`Fanout`] publishes.
#[derive(Clone)]
pub struct PublishOptions {
    pub tls: Arc<ClientConfig>,
    /// RTMP application name (`connect`).
    pub app: String,
    /// Tags queued per target before it starts dropping.
    pub queue_tags: usize,
    pub backoff: Backoff,
    /// Counter incremented (label `target`) at every failed connection.
    pub failures_metric: &'static str,
    /// Local address to connect from: the host's own, which its listeners use too, so the
    /// server sees (and limits, and logs) the host by its cluster address.
    pub bind: Option<std::net::IpAddr>,
}

/// The stream to publish. The name includes the key: it never reaches a log line.
#[derive(Clone)]
pub struct Stream {
    /// For logs, e.g. `test from source1`.
    pub label: String,
    pub publish_name: String,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// Decides which tags enter a target's queue: after a drop, video waits for a keyframe.
#[derive(Debug, Default)]
struct Gate {
    resync: bool,
}

impl Gate {
    fn admits(&self, tag: &Tag) -> bool {
        !(self.resync && tag.kind == TagKind::Video && !flv::is_video_keyframe(&tag.data))
    }

    fn queued(&mut self, tag: &Tag) {
        if tag.kind == TagKind::Video && flv::is_video_keyframe(&tag.data) {
            self.resync = false;
        }
    }

    fn dropped(&mut self) {
        self.resync = true;
    }
}

struct Queue {
    tx: mpsc::Sender<Tag>,
    gate: Gate,
}

/// The producer's handle: one queue per target. Dropping it ends every connection.
pub struct Fanout {
    queues: Vec<Queue>,
}

impl Fanout {
    /// Starts one publishing task per target.
    pub fn start(
        stream: &Stream,
        targets: &[Target],
        options: &PublishOptions,
        lifecycle: &Lifecycle,
    ) -> Self {
        let queues = targets
            .iter()
            .map(|target| {
                let (tx, rx) = mpsc::channel(options.queue_tags.max(1));
                tokio::spawn(target_task(
                    target.clone(),
                    stream.clone(),
                    rx,
                    options.clone(),
                    lifecycle.clone(),
                ));
                Queue {
                    tx,
                    gate: Gate::default(),
                }
            })
            .collect();
        Self { queues }
    }

    /// Queues one tag for every target without waiting. Only audio and video are published.
    pub fn push(&mut self, tag: &Tag) {
        if !matches!(tag.kind, TagKind::Audio | TagKind::Video) {
            return;
        }
        for q in &mut self.queues {
            if !q.gate.admits(tag) {
                continue;
            }
            match q.tx.try_send(tag.clone()) {
                Ok(()) => q.gate.queued(tag),
                Err(mpsc::error::TrySendError::Full(_)) => q.gate.dropped(),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

/// The codec headers last seen: what a new connection must get before any media.
#[derive(Debug, Default)]
struct Headers {
    avc: Option<Bytes>,
    aac: Option<Bytes>,
}

impl Headers {
    fn remember(&mut self, tag: &Tag) {
        match tag.kind {
            TagKind::Video if flv::is_avc_sequence_header(&tag.data) => {
                self.avc = Some(tag.data.clone())
            }
            TagKind::Audio if flv::is_aac_sequence_header(&tag.data) => {
                self.aac = Some(tag.data.clone())
            }
            _ => {}
        }
    }
}

fn is_sequence_header(tag: &Tag) -> bool {
    match tag.kind {
        TagKind::Video => flv::is_avc_sequence_header(&tag.data),
        TagKind::Audio => flv::is_aac_sequence_header(&tag.data),
        TagKind::Other(_) => false,
    }
}

/// What one connection has sent so far: headers first, then video from a keyframe on.
#[derive(Debug)]
struct Resume {
    headers_sent: bool,
    waiting_keyframe: bool,
}

impl Resume {
    fn new() -> Self {
        Self {
            headers_sent: false,
            waiting_keyframe: true,
        }
    }

    /// The tags to write for `tag` (already remembered in `headers`).
    fn plan(&mut self, headers: &Headers, tag: &Tag) -> Vec<Tag> {
        let mut out = Vec::new();
        if !self.headers_sent {
            self.headers_sent = true;
            // Stamped like the first tag: RTMP timestamps must not run backwards.
            for (kind, header) in [
                (TagKind::Video, &headers.avc),
                (TagKind::Audio, &headers.aac),
            ] {
                if let Some(data) = header {
                    out.push(Tag {
                        kind,
                        timestamp_ms: tag.timestamp_ms,
                        data: data.clone(),
                    });
                }
            }
            if is_sequence_header(tag) {
                return out;
            }
        }
        if tag.kind == TagKind::Video && !is_sequence_header(tag) {
            if flv::is_video_keyframe(&tag.data) {
                self.waiting_keyframe = false;
            } else if self.waiting_keyframe {
                return out;
            }
        }
        out.push(tag.clone());
        out
    }
}

/// Why a connection to one target ended.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("RTMP: {0}")]
    Rtmp(String),
    #[error("server refused: {0}")]
    Refused(String),
    #[error("server closed the connection")]
    Closed,
}

fn rtmp_err(e: impl std::fmt::Debug) -> PublishError {
    PublishError::Rtmp(format!("{e:?}"))
}

async fn target_task(
    target: Target,
    stream: Stream,
    mut rx: mpsc::Receiver<Tag>,
    options: PublishOptions,
    lifecycle: Lifecycle,
) {
    let mut backoff = options.backoff.first;
    let mut headers = Headers::default();
    loop {
        let attempt = async {
            let (mut tls, mut session) =
                tokio::time::timeout(SETUP_TIMEOUT, connect(&target, &stream, &options))
                    .await
                    .map_err(|_| PublishError::Timeout)??;
            tracing::info!(stream = %stream.label, target = %target.name, addr = %target.addr, "publishing over RTMPS");
            forward(&mut tls, &mut session, &mut rx, &mut headers).await
        };
        let result = tokio::select! {
            _ = lifecycle.shutdown() => return,
            r = attempt => r,
        };
        match result {
            Ok(()) => {
                tracing::info!(stream = %stream.label, target = %target.name, "publishing ended: the stream is over");
                return;
            }
            Err(e) => {
                tracing::warn!(stream = %stream.label, target = %target.name, addr = %target.addr, "publishing over RTMPS failed, retrying in {} ms: {e}", backoff.as_millis());
                metrics::counter!(options.failures_metric, "target" => target.name.clone())
                    .increment(1);
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
                    Some(t) => headers.remember(&t),
                },
            }
        }
        backoff = (backoff * 2).min(options.backoff.max);
    }
}

/// One connection to `target`, as a lone publisher (OBS) makes: set up within
/// [`SETUP_TIMEOUT`], then the audio and video tags of `rx` (headers first, video from a
/// keyframe; anything else is the caller's to leave out) until the
/// producer is gone (`Ok`) or the connection fails. No retry: the caller decides where and
/// when to go next.
pub async fn publish_once(
    target: &Target,
    stream: &Stream,
    options: &PublishOptions,
    rx: &mut mpsc::Receiver<Tag>,
) -> Result<(), PublishError> {
    let (mut tls, mut session) =
        tokio::time::timeout(SETUP_TIMEOUT, connect(target, stream, options))
            .await
            .map_err(|_| PublishError::Timeout)??;
    tracing::info!(stream = %stream.label, target = %target.name, addr = %target.addr, "publishing over RTMPS");
    forward(&mut tls, &mut session, rx, &mut Headers::default()).await
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// TCP, TLS (the server's certificate checked against the CA and the target's name), RTMP
/// handshake, `connect`, `publish`.
async fn connect(
    target: &Target,
    stream: &Stream,
    options: &PublishOptions,
) -> Result<(Tls, ClientSession), PublishError> {
    let socket = match target.addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(ip) = options.bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = socket.connect(target.addr).await?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(options.tls.clone());
    let mut tls = connector.connect(target.server_name.clone(), tcp).await?;
    let session = rtmp_publish(&mut tls, &options.app, &stream.publish_name).await?;
    Ok((tls, session))
}

async fn write_results<S: AsyncWrite + Unpin>(
    io: &mut S,
    results: Vec<ClientSessionResult>,
) -> Result<Vec<ClientSessionEvent>, PublishError> {
    let mut events = Vec::new();
    for r in results {
        match r {
            ClientSessionResult::OutboundResponse(p) => io.write_all(&p.bytes).await?,
            ClientSessionResult::RaisedEvent(e) => events.push(e),
            ClientSessionResult::UnhandleableMessageReceived(_) => {}
        }
    }
    io.flush().await?;
    Ok(events)
}

/// RTMP handshake, `connect` to `app`, `publish` of `publish_name`, over an established stream.
async fn rtmp_publish<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    app: &str,
    publish_name: &str,
) -> Result<ClientSession, PublishError> {
    let mut handshake = Handshake::new(PeerType::Client);
    io.write_all(&handshake.generate_outbound_p0_and_p1().map_err(rtmp_err)?)
        .await?;
    io.flush().await?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut received = 0usize;
    let leftover = loop {
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Err(PublishError::Closed);
        }
        received += n;
        if received > MAX_SETUP_BYTES {
            return Err(PublishError::Rtmp("handshake too long".into()));
        }
        match handshake.process_bytes(&buf[..n]).map_err(rtmp_err)? {
            HandshakeProcessResult::InProgress { response_bytes } => {
                io.write_all(&response_bytes).await?;
                io.flush().await?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                io.write_all(&response_bytes).await?;
                io.flush().await?;
                break remaining_bytes;
            }
        }
    };
    let (mut session, initial) =
        ClientSession::new(ClientSessionConfig::new()).map_err(rtmp_err)?;
    write_results(io, initial).await?;
    let r = session
        .request_connection(app.to_string())
        .map_err(rtmp_err)?;
    write_results(io, vec![r]).await?;
    let mut pending = leftover;
    let mut publishing_requested = false;
    loop {
        if !pending.is_empty() {
            let results = session.handle_input(&pending).map_err(rtmp_err)?;
            pending.clear();
            for event in write_results(io, results).await? {
                match event {
                    ClientSessionEvent::ConnectionRequestAccepted if !publishing_requested => {
                        publishing_requested = true;
                        let r = session
                            .request_publishing(publish_name.to_string(), PublishRequestType::Live)
                            .map_err(rtmp_err)?;
                        write_results(io, vec![r]).await?;
                    }
                    ClientSessionEvent::ConnectionRequestRejected { description } => {
                        return Err(PublishError::Refused(description));
                    }
                    ClientSessionEvent::PublishRequestAccepted => return Ok(session),
                    ClientSessionEvent::UnhandleableOnStatusCode { code } => {
                        return Err(PublishError::Refused(code));
                    }
                    _ => {}
                }
            }
        }
        let n = io.read(&mut buf).await?;
        if n == 0 {
            return Err(PublishError::Closed);
        }
        received += n;
        if received > MAX_SETUP_BYTES {
            return Err(PublishError::Rtmp(
                "server talks too much during setup".into(),
            ));
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Sends the queued tags (headers first, video from a keyframe) until the producer is gone
/// (`Ok`) or the server fails (`Err`).
async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    session: &mut ClientSession,
    rx: &mut mpsc::Receiver<Tag>,
    headers: &mut Headers,
) -> Result<(), PublishError> {
    let mut resume = Resume::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            tag = rx.recv() => {
                let Some(tag) = tag else { return Ok(()) };
                headers.remember(&tag);
                let mut out = Vec::new();
                for t in resume.plan(headers, &tag) {
                    let ts = RtmpTimestamp::new(t.timestamp_ms);
                    let r = match t.kind {
                        TagKind::Video => session.publish_video_data(t.data, ts, false),
                        _ => session.publish_audio_data(t.data, ts, false),
                    }
                    .map_err(rtmp_err)?;
                    if let ClientSessionResult::OutboundResponse(p) = r {
                        out.extend_from_slice(&p.bytes);
                    }
                }
                write_timed(io, &out).await?;
            }
            read = io.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    return Err(PublishError::Closed);
                }
                // Acks and pings: answer what needs an answer, ignore the rest.
                let results = session.handle_input(&buf[..n]).map_err(rtmp_err)?;
                let mut answers = Vec::new();
                for r in results {
                    if let ClientSessionResult::OutboundResponse(p) = r {
                        answers.extend_from_slice(&p.bytes);
                    }
                }
                write_timed(io, &answers).await?;
            }
        }
    }
}

async fn write_timed<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> Result<(), PublishError> {
    if bytes.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(WRITE_TIMEOUT, async {
        io.write_all(bytes).await?;
        io.flush().await
    })
    .await
    .map_err(|_| PublishError::Timeout)??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video(ts: u32, body: &[u8]) -> Tag {
        Tag {
            kind: TagKind::Video,
            timestamp_ms: ts,
            data: Bytes::copy_from_slice(body),
        }
    }

    fn audio(ts: u32, body: &[u8]) -> Tag {
        Tag {
            kind: TagKind::Audio,
            timestamp_ms: ts,
            data: Bytes::copy_from_slice(body),
        }
    }

    const AVC_HEADER: &[u8] = &[0x17, 0, 0, 0, 0, 1, 2];
    const AAC_HEADER: &[u8] = &[0xAF, 0, 0x11, 0x90];
    const KEY: &[u8] = &[0x17, 1, 0, 0, 0, 5];
    const INTER: &[u8] = &[0x27, 1, 0, 0, 0, 6];
    const AAC: &[u8] = &[0xAF, 1, 0x21];

    #[test]
    fn gate_skips_video_until_a_keyframe_after_a_drop() {
        let mut gate = Gate::default();
        assert!(gate.admits(&video(0, INTER)));
        gate.dropped();
        assert!(!gate.admits(&video(40, INTER)));
        assert!(gate.admits(&audio(40, AAC)), "audio keeps flowing");
        let key = video(80, KEY);
        assert!(gate.admits(&key));
        gate.queued(&key);
        assert!(gate.admits(&video(120, INTER)));
    }

    #[test]
    fn a_new_connection_gets_headers_first_then_video_from_a_keyframe() {
        let mut headers = Headers::default();
        for t in [video(0, AVC_HEADER), audio(0, AAC_HEADER)] {
            headers.remember(&t);
        }
        let mut resume = Resume::new();
        // First tag after a reconnect: an inter frame at 5000 ms.
        let first = video(5000, INTER);
        let out = resume.plan(&headers, &first);
        assert_eq!(out.len(), 2, "headers only, the inter frame is skipped");
        assert!(flv::is_avc_sequence_header(&out[0].data));
        assert!(flv::is_aac_sequence_header(&out[1].data));
        assert!(out.iter().all(|t| t.timestamp_ms == 5000));
        assert_eq!(resume.plan(&headers, &audio(5010, AAC)).len(), 1);
        assert!(resume.plan(&headers, &video(5040, INTER)).is_empty());
        assert_eq!(
            resume.plan(&headers, &video(5080, KEY)),
            vec![video(5080, KEY)]
        );
        assert_eq!(resume.plan(&headers, &video(5120, INTER)).len(), 1);
    }

    #[test]
    fn a_sequence_header_as_first_tag_is_sent_once() {
        let mut headers = Headers::default();
        let avc = video(0, AVC_HEADER);
        headers.remember(&avc);
        let mut resume = Resume::new();
        let out = resume.plan(&headers, &avc);
        assert_eq!(out, vec![avc.clone()]);
        // The audio header arriving next goes through as it is.
        let aac = audio(0, AAC_HEADER);
        headers.remember(&aac);
        assert_eq!(resume.plan(&headers, &aac), vec![aac]);
    }

    fn host(url: &str) -> HostEntry {
        HostEntry {
            name: "ingest2".into(),
            role: streaming_core::config::Role::Ingest,
            fqdn: "ingest2.streaming-cluster.test".into(),
            address: [192, 0, 2, 42].into(),
            ports: streaming_core::config::Ports {
                https: 8443,
                rtmp: 1935,
                rtmps: 1936,
                patroni: 8008,
                postgres: 5432,
                etcd_client: 2379,
                etcd_peer: 2380,
            },
            url: url.into(),
            uplink_mbps: None,
            cores: None,
            preferred_ingest: None,
            channels: Vec::new(),
            priority: None,
            etcd_witness: false,
            drain: false,
        }
    }

    #[test]
    fn targets_are_verified_by_the_name_peers_use_for_https() {
        let local = Target::rtmps_of(&host("https://192.0.2.42:8443")).unwrap();
        assert_eq!(local.addr, "192.0.2.42:1936".parse().unwrap());
        assert_eq!(
            local.server_name,
            ServerName::from(std::net::IpAddr::from([192, 0, 2, 42]))
        );
        let acme = Target::rtmps_of(&host("https://ingest2.streaming-cluster.test")).unwrap();
        assert_eq!(acme.addr, "192.0.2.42:1936".parse().unwrap());
        assert_eq!(
            acme.server_name,
            ServerName::try_from("ingest2.streaming-cluster.test").unwrap()
        );
        assert!(Target::rtmps_of(&host("not a url")).is_err());
    }

    #[test]
    fn stream_debug_hides_the_publish_name() {
        let s = Stream {
            label: "test from source1".into(),
            publish_name: "test?key=s3cret".into(),
        };
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
