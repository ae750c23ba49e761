//! The publish front: one address for OBS (`rtmp(s)://<site>/live`) that always reaches a live
//! ingest.
//!
//! The LB accepts RTMP (1935) and RTMPS (1936, the site certificate) and forwards the bytes of
//! each connection, unread, to one ingest's RTMPS port, whose certificate it checks against the
//! cluster CA. It does not end RTMP itself: the stream key check stays on the ingest, the key
//! passes between hosts only inside TLS, and since the LB never parses the stream it has nothing
//! to log but addresses. The price is that the LB does not know the channel: it prefers the
//! ingest that already holds an outside publisher (any channel), then config order, so both LBs
//! send every publisher to the same live ingest and a channel's publishers meet there.
//!
//! An ingest that dies closes its connections, and the publisher reconnects (OBS does, after a
//! couple of seconds) to the same name and gets a live ingest. A hung one keeps its sockets
//! open, so the LB closes what it forwards there once the ingest stops answering `/status`
//! (the same freshness rule as for broadcasts), or when a write to it stalls.
//!
//! Limits are the RTMP ones of `cluster.nix`, per real client address here (the ingests exempt
//! the LBs' addresses from their per-address cap): new connections per address and minute,
//! connections in all and per address, and the publish deadline for the TLS handshake and the
//! publisher's first bytes; after that the ingest's own deadline applies to the forwarded
//! publish. The one byte the front does read is the first: an RTMP stream starts with its
//! version, 3, so scanners and other protocols are closed without costing an ingest a
//! connection. Refusals: `lb_rtmp_refused_total`.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use rustls::ClientConfig;
use streaming_core::config::{HostConfig, LimitsConfig};
use streaming_core::conn_limit::{ConnLimiter, ConnPermit, LogThrottle};
use streaming_core::lifecycle::Lifecycle;
use streaming_core::rate_limit::RateLimiter;
use streaming_rtmp_publish::Target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::ingest_health::{Ingests, ranked};
use streaming_core::sync::{read, write};

/// One ingest's TCP connect and TLS handshake; the next is tried after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A publisher that sends nothing for this long is gone (publishers send all the time).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that cannot finish within this means the other side hangs.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a forwarded connection checks that its ingest still answers.
const HEALTH_CHECK: Duration = Duration::from_millis(250);
const BUFFER: usize = 64 * 1024;
/// The first byte of every RTMP connection (C0: the protocol version).
const RTMP_VERSION: u8 = 3;

/// What the front needs, swapped whole on SIGHUP.
pub struct FrontConfig {
    pub config: Arc<HostConfig>,
    /// The site certificate, for RTMPS from publishers.
    pub acceptor: TlsAcceptor,
    /// Trusts the cluster CA, for RTMPS to the ingests.
    pub upstream: Arc<ClientConfig>,
}

impl FrontConfig {
    pub fn load(config: Arc<HostConfig>) -> anyhow::Result<Self> {
        let server =
            streaming_core::tls::server_config(&config.paths.tls_cert, &config.paths.tls_key)
                .context("RTMPS certificate")?;
        let upstream = streaming_rtmp_publish::client_config(&config.paths.ca_cert)
            .context("cluster CA for the ingests")?;
        Ok(Self {
            config,
            acceptor: TlsAcceptor::from(server),
            upstream,
        })
    }
}

/// The front's shared state.
pub struct Front {
    current: RwLock<Arc<FrontConfig>>,
    limiter: RwLock<Limiters>,
    ingests: Arc<Ingests>,
}

impl Front {
    pub fn new(config: FrontConfig, ingests: Arc<Ingests>) -> Arc<Self> {
        let limits = config.config.cluster.limits.clone();
        Arc::new(Self {
            current: RwLock::new(Arc::new(config)),
            limiter: RwLock::new(Limiters::new(limits)),
            ingests,
        })
    }

    /// New certificate, CA, ingests and limits apply to connections accepted from now on.
    pub fn reload(&self, config: FrontConfig) {
        let limits = config.config.cluster.limits.clone();
        let mut limiter = write(&self.limiter);
        // Only new numbers need new counters: open connections stay counted otherwise.
        if limiter.limits != limits {
            *limiter = Limiters::new(limits);
        }
        *write(&self.current) = Arc::new(config);
    }

    fn current(&self) -> Arc<FrontConfig> {
        read(&self.current).clone()
    }
}

/// The counters behind the limits of one `cluster.nix` version.
struct Limiters {
    limits: LimitsConfig,
    open: ConnLimiter,
    connects: RateLimiter,
}

impl Limiters {
    fn new(limits: LimitsConfig) -> Self {
        Self {
            open: ConnLimiter::new(limits.rtmp_connections, limits.rtmp_connections_per_address),
            connects: RateLimiter::new("rtmp_connect", limits.rtmp_connect_rate),
            limits,
        }
    }

    /// A permit for a new connection from `ip`, or the label of the refusal.
    fn admit(&self, ip: std::net::IpAddr) -> Result<ConnPermit, &'static str> {
        // The rate first: a refused flood must not even count as open connections.
        if self.connects.check(ip, std::time::Instant::now()).is_err() {
            return Err("rate");
        }
        self.open.try_acquire(ip).map_err(|r| r.as_str())
    }
}

fn refused(reason: &'static str) {
    metrics::counter!("lb_rtmp_refused_total", "reason" => reason).increment(1);
}

/// Serves RTMP (or RTMPS with `tls`) on `addr` until shutdown.
pub async fn serve(
    addr: SocketAddr,
    tls: bool,
    front: Arc<Front>,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let scheme = if tls { "RTMPS" } else { "RTMP" };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("{scheme} listen on {addr}"))?;
    tracing::info!(%addr, "{scheme} publish front listening");
    accept_loop(listener, tls, front, lifecycle).await
}

/// Accepts on a bound listener until shutdown.
pub async fn accept_loop(
    listener: TcpListener,
    tls: bool,
    front: Arc<Front>,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    // A flood of refusals costs one log line a second.
    let refusals = LogThrottle::per_second();
    loop {
        let Some((stream, peer)) =
            streaming_core::serve::accept_until_shutdown(&listener, &lifecycle, "RTMP front").await
        else {
            return Ok(());
        };
        let permit = read(&front.limiter).admit(peer.ip());
        let permit = match permit {
            Ok(p) => p,
            Err(reason) => {
                // Dropped now: a refused address holds nothing.
                drop(stream);
                refused(reason);
                if let Some(suppressed) = refusals.allow_counting() {
                    tracing::warn!(%peer, reason, suppressed, "RTMP front refused a connection (caps on new and open connections per address and in all)");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (front, lifecycle) = (front.clone(), lifecycle.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let current = front.current();
            let deadline = Instant::now()
                + Duration::from_secs(u64::from(
                    current.config.cluster.limits.rtmp_publish_seconds.max(1),
                ));
            if !tls {
                return handle(stream, peer, &front, current, &lifecycle, deadline).await;
            }
            match tokio::time::timeout_at(deadline, current.acceptor.accept(stream)).await {
                Ok(Ok(stream)) => handle(stream, peer, &front, current, &lifecycle, deadline).await,
                Ok(Err(e)) => {
                    refused("tls");
                    tracing::debug!(%peer, "RTMPS handshake failed: {e}");
                }
                Err(_) => {
                    refused("publish_deadline");
                    tracing::debug!(%peer, "RTMPS handshake not done within the publish deadline");
                }
            }
        });
    }
}

/// Why a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    PublisherClosed,
    PublisherIdle,
    IngestClosed,
    IngestStalled,
    IngestSilent,
    PublisherStalled,
    Shutdown,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::PublisherClosed => "publisher_closed",
            End::PublisherIdle => "publisher_idle",
            End::IngestClosed => "ingest_closed",
            End::IngestStalled => "ingest_stalled",
            End::IngestSilent => "ingest_not_answering",
            End::PublisherStalled => "publisher_stalled",
            End::Shutdown => "shutdown",
        }
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    peer: SocketAddr,
    front: &Front,
    current: Arc<FrontConfig>,
    lifecycle: &Lifecycle,
    deadline: Instant,
) {
    // The ingest connection is opened only once the publisher speaks, so idle sockets cost the
    // ingests nothing.
    let mut first = vec![0u8; BUFFER];
    let n = match tokio::time::timeout_at(deadline, client.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        Ok(_) => return,
        Err(_) => {
            refused("publish_deadline");
            tracing::debug!(%peer, "RTMP front: nothing received within the publish deadline");
            return;
        }
    };
    if first[0] != RTMP_VERSION {
        refused("not_rtmp");
        tracing::debug!(%peer, "RTMP front: not an RTMP stream, closed");
        return;
    }
    let Some((ingest, mut upstream)) = connect_upstream(&current, front, deadline).await else {
        refused("no_ingest");
        tracing::warn!(%peer, "RTMP front: no ingest reachable, publisher closed");
        return;
    };
    metrics::counter!("lb_rtmp_forwarded_total", "ingest" => ingest.clone()).increment(1);
    metrics::gauge!("lb_rtmp_open", "ingest" => ingest.clone()).increment(1.0);
    tracing::info!(%peer, %ingest, "publisher forwarded");
    let started = Instant::now();
    let end = match tokio::time::timeout(WRITE_TIMEOUT, upstream.write_all(&first[..n])).await {
        Ok(Ok(())) => pump(client, upstream, &ingest, &front.ingests, lifecycle).await,
        _ => End::IngestStalled,
    };
    metrics::gauge!("lb_rtmp_open", "ingest" => ingest.clone()).decrement(1.0);
    metrics::counter!("lb_rtmp_closed_total", "reason" => end.as_str()).increment(1);
    let secs = started.elapsed().as_secs_f64();
    if end == End::IngestSilent {
        tracing::warn!(%peer, %ingest, secs, "ingest stopped answering: publisher closed so it reconnects to a live one");
    } else {
        tracing::info!(%peer, %ingest, secs, reason = end.as_str(), "publisher connection ended");
    }
}

/// Connects to the best reachable ingest's RTMPS port (see [`ranked`]), from our own address.
async fn connect_upstream(
    current: &FrontConfig,
    front: &Front,
    deadline: Instant,
) -> Option<(String, tokio_rustls::client::TlsStream<TcpStream>)> {
    let me = current.config.me().address;
    let connector = TlsConnector::from(current.upstream.clone());
    let candidates = ranked(
        &current.config,
        &front.ingests.snapshot(),
        std::time::Instant::now(),
    );
    for host in candidates {
        let target = match Target::rtmps_of(&host) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(ingest = %host.name, "ingest RTMPS address: {e}");
                continue;
            }
        };
        let attempt = async {
            let socket = if target.addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            if me.is_ipv4() == target.addr.is_ipv4() {
                socket.bind(SocketAddr::new(me, 0))?;
            }
            let tcp = socket.connect(target.addr).await?;
            let _ = tcp.set_nodelay(true);
            connector.connect(target.server_name.clone(), tcp).await
        };
        let until = deadline.min(Instant::now() + CONNECT_TIMEOUT);
        match tokio::time::timeout_at(until, attempt).await {
            Ok(Ok(stream)) => return Some((host.name.clone(), stream)),
            Ok(Err(e)) => {
                metrics::counter!("lb_rtmp_ingest_failures_total", "ingest" => host.name.clone())
                    .increment(1);
                tracing::warn!(ingest = %host.name, "ingest RTMPS connection failed, trying the next: {e}");
            }
            Err(_) => {
                metrics::counter!("lb_rtmp_ingest_failures_total", "ingest" => host.name.clone())
                    .increment(1);
                tracing::warn!(ingest = %host.name, "ingest RTMPS connection timed out, trying the next");
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    None
}

/// Copies bytes both ways until either side ends, stalls, or the ingest stops answering.
async fn pump<C, U>(
    client: C,
    upstream: U,
    ingest: &str,
    ingests: &Ingests,
    lifecycle: &Lifecycle,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut ingest_rx, mut ingest_tx) = tokio::io::split(upstream);
    let up = async {
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = match tokio::time::timeout(IDLE_TIMEOUT, client_rx.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return End::PublisherClosed,
                Ok(Ok(n)) => n,
                Err(_) => return End::PublisherIdle,
            };
            match tokio::time::timeout(WRITE_TIMEOUT, ingest_tx.write_all(&buf[..n])).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return End::IngestClosed,
                Err(_) => return End::IngestStalled,
            }
        }
    };
    let down = async {
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = match ingest_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return End::IngestClosed,
                Ok(n) => n,
            };
            match tokio::time::timeout(WRITE_TIMEOUT, client_tx.write_all(&buf[..n])).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return End::PublisherClosed,
                Err(_) => return End::PublisherStalled,
            }
        }
    };
    let watchdog = async {
        let mut tick = tokio::time::interval(HEALTH_CHECK);
        loop {
            tick.tick().await;
            if ingests.should_leave(ingest, std::time::Instant::now()) {
                return End::IngestSilent;
            }
        }
    };
    tokio::select! {
        end = up => end,
        end = down => end,
        end = watchdog => end,
        _ = lifecycle.shutdown() => End::Shutdown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls_pki_types::pem::PemObject;

    /// A CA and a leaf for 127.0.0.1 signed by it, as PEM files in `dir`.
    fn pki(dir: &std::path::Path) {
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key).unwrap().pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        std::fs::write(dir.join("host.crt"), leaf_cert.pem()).unwrap();
        std::fs::write(dir.join("host.key"), leaf_key.serialize_pem()).unwrap();
    }

    fn config(dir: &std::path::Path, ingest_rtmps: u16, limits: serde_json::Value) -> HostConfig {
        use streaming_core::fixture::{host, host_config};
        let mut ingest = host("ingest1", "ingest", "127.0.0.1");
        ingest["ports"]["rtmps"] = ingest_rtmps.into();
        let mut json = host_config("lb1", vec![host("lb1", "lb", "127.0.0.1"), ingest]);
        json["cluster"]["limits"] = limits;
        let path = |f: &str| dir.join(f).display().to_string();
        json["paths"]["tls_cert"] = path("host.crt").into();
        json["paths"]["tls_key"] = path("host.key").into();
        json["paths"]["ca_cert"] = path("ca.crt").into();
        serde_json::from_value(json).unwrap()
    }

    /// An "ingest" that answers every byte it gets over TLS with the same byte plus one.
    async fn ingest(dir: &std::path::Path) -> u16 {
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(dir.join("host.key")).unwrap();
        let certs = streaming_core::tls::load_certs(&dir.join("host.crt")).unwrap();
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tls.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let answer: Vec<u8> = buf[..n].iter().map(|b| b.wrapping_add(1)).collect();
                        if tls.write_all(&answer).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    async fn connect(to: SocketAddr) -> TcpStream {
        TcpStream::connect(to).await.unwrap()
    }

    /// Seconds until the front closes `stream` (reading, sending nothing), or None within `wait`.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<f64> {
        let started = Instant::now();
        let mut buf = [0u8; 64];
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => Some(started.elapsed().as_secs_f64()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn forwards_over_verified_tls_and_refuses_beyond_the_caps_and_the_deadline() {
        streaming_core::tls::install_crypto_provider();
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        pki(dir.path());
        let port = ingest(dir.path()).await;
        let limits = serde_json::json!({
            "rtmp_connections": 3, "rtmp_connections_per_address": 2, "rtmp_publish_seconds": 1,
            "rtmp_connect_rate": {"burst": 6, "per_minute": 1}
        });
        let config = Arc::new(config(dir.path(), port, limits));
        let front = Front::new(
            FrontConfig::load(config).unwrap(),
            Arc::new(Ingests::default()),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let lifecycle = Lifecycle::from_signals().unwrap();
        tokio::spawn(accept_loop(listener, false, front, lifecycle.clone()));

        // Bytes reach the ingest over TLS (its certificate checked against the CA) and back.
        let mut publisher = connect(addr).await;
        publisher.write_all(&[3, 2, 1]).await.unwrap();
        let mut answer = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(5), publisher.read_exact(&mut answer))
            .await
            .expect("answer through the front")
            .unwrap();
        assert_eq!(answer, [4, 3, 2]);

        // A second connection from the address is held; the third is closed at accept.
        let mut silent = connect(addr).await;
        let mut third = connect(addr).await;
        let refused = closed_within(&mut third, Duration::from_secs(3)).await;
        assert!(refused.is_some(), "per-address cap");
        // The silent one is closed by the publish deadline (1 s), without an ingest connection.
        let deadline = closed_within(&mut silent, Duration::from_secs(5)).await;
        assert!(deadline.is_some_and(|s| s >= 0.9), "{deadline:?}");
        // The forwarded one is still served.
        publisher.write_all(&[9]).await.unwrap();
        let mut one = [0u8; 1];
        publisher.read_exact(&mut one).await.unwrap();
        assert_eq!(one, [10]);
        println!(
            "per-address refusal after {refused:?} s, publish deadline closed after {deadline:?} s"
        );

        // Not RTMP (a TLS ClientHello on the plain port, an HTTP scanner): closed, unanswered.
        let mut garbage = connect(addr).await;
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let not_rtmp = closed_within(&mut garbage, Duration::from_millis(900)).await;
        assert!(not_rtmp.is_some(), "garbage is closed before the deadline");

        // Four connections so far from this address; the bucket holds six, then one a minute.
        let mut rate_refused = 0;
        for _ in 0..6 {
            let mut c = connect(addr).await;
            if closed_within(&mut c, Duration::from_millis(300))
                .await
                .is_some()
            {
                rate_refused += 1;
            }
        }
        assert!(rate_refused >= 3, "{rate_refused} of 6 refused");

        let rendered = prometheus.render();
        for needle in [
            "lb_rtmp_refused_total{reason=\"per_address\"}",
            "lb_rtmp_refused_total{reason=\"publish_deadline\"}",
            "lb_rtmp_refused_total{reason=\"not_rtmp\"}",
            "lb_rtmp_refused_total{reason=\"rate\"}",
            "lb_rtmp_forwarded_total{ingest=\"ingest1\"}",
        ] {
            assert!(rendered.contains(needle), "{needle} missing in {rendered}");
        }
        lifecycle.request_shutdown();
    }
}
