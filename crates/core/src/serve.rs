//! Serving an axum app over HTTPS to the internet: TLS by hand with tokio-rustls, HTTP/1.1 and
//! HTTP/2 by hyper, and the limits that keep slow or idle clients from holding sockets.
//!
//! Per connection:
//! - the global and per-address caps are taken at accept; a refused connection is closed at
//!   once, before any TLS work, counted in `http_connections_refused_total{reason}`;
//! - TLS handshake and the first request's headers must both be done within the header
//!   deadline of the accept;
//! - HTTP/1.1 later requests' headers get the same deadline (hyper starts that timer as soon as
//!   a connection waits for its next request, so an idle HTTP/1.1 keep-alive ends then too);
//! - a connection on which no byte moves either way for the idle limit is closed (HTTP/2 and
//!   upgraded connections included; a slow reader that still drains is not idle, and the chat
//!   WebSocket pings far more often).
//!
//! SIGTERM stops accepting and lets requests in flight finish for [`GRACE_PERIOD`]; SIGHUP
//! re-reads the certificate for new connections.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::config::LimitsConfig;
use crate::conn_limit::{ConnLimiter, ConnPermit, LogThrottle};
use crate::lifecycle::Lifecycle;
use crate::sync::lock;

/// In-flight requests get this long to finish after SIGTERM.
pub const GRACE_PERIOD: Duration = Duration::from_secs(5);

/// The connection limits of one listener, taken from `limits` in `cluster.nix` when the
/// listener starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// TLS handshake plus first request headers; every later request's headers.
    pub header: Duration,
    /// No byte either way for this long closes the connection.
    pub idle: Duration,
    pub connections: u32,
    pub connections_per_address: u32,
}

impl From<&LimitsConfig> for HttpLimits {
    fn from(l: &LimitsConfig) -> Self {
        Self {
            header: Duration::from_secs(u64::from(l.http_header_seconds.max(1))),
            idle: Duration::from_secs(u64::from(l.http_idle_seconds.max(1))),
            connections: l.http_connections,
            connections_per_address: l.http_connections_per_address,
        }
    }
}

/// The next connection on `listener`, or `None` at shutdown. An accept error (out of file
/// descriptors, a connection reset before it was accepted) is logged as `{what} accept failed`
/// and retried after a short pause, so a burst of them cannot spin the loop. For the raw TCP
/// listeners (RTMP, RTMPS, the LB's publish front).
pub async fn accept_until_shutdown(
    listener: &TcpListener,
    lifecycle: &Lifecycle,
    what: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            () = lifecycle.shutdown() => return None,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    tracing::warn!("{what} accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Binds `addr` and serves `app` until shutdown; re-reads the certificate on every SIGHUP.
pub async fn serve_https(
    app: axum::Router,
    addr: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    limits: HttpLimits,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("HTTPS listener on {addr}: {e}"))?;
    serve_https_on(listener, app, cert, key, limits, lifecycle).await
}

/// [`serve_https`] on a listener the caller bound.
pub async fn serve_https_on(
    listener: TcpListener,
    app: axum::Router,
    cert: PathBuf,
    key: PathBuf,
    limits: HttpLimits,
    lifecycle: Lifecycle,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let mut acceptor = TlsAcceptor::from(tls_config(&cert, &key)?);
    let conns = ConnLimiter::new(limits.connections, limits.connections_per_address);
    let refusal_log = LogThrottle::per_second();
    let accept_error_log = LogThrottle::per_second();
    let builder = Arc::new(http_builder(limits));
    let mut reloads = lifecycle.reloads();
    let mut reloads_open = true;
    let mut tasks = JoinSet::new();
    tracing::info!(%addr, ?limits, "HTTPS listening");
    loop {
        tokio::select! {
            () = lifecycle.shutdown() => break,
            changed = reloads.changed(), if reloads_open => {
                if changed.is_err() {
                    reloads_open = false;
                    continue;
                }
                match tls_config(&cert, &key) {
                    Ok(config) => {
                        acceptor = TlsAcceptor::from(config);
                        tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                    }
                    Err(e) => tracing::error!("TLS reload failed, keeping the old certificate: {e:#}"),
                }
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        if accept_error_log.allow() {
                            tracing::warn!(%addr, "accept failed: {e}");
                        }
                        // Out of file descriptors, most likely: do not spin on it.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let permit = match conns.try_acquire(peer.ip()) {
                    Ok(permit) => permit,
                    Err(refusal) => {
                        metrics::counter!("http_connections_refused_total", "reason" => refusal.as_str())
                            .increment(1);
                        if refusal_log.allow() {
                            tracing::warn!(%addr, peer = %peer.ip(), reason = refusal.as_str(),
                                open = conns.open(), "connection refused: too many open connections");
                        }
                        drop(tcp);
                        continue;
                    }
                };
                tasks.spawn(connection(
                    tcp,
                    peer,
                    permit,
                    acceptor.clone(),
                    builder.clone(),
                    app.clone(),
                    limits,
                    lifecycle.clone(),
                ));
            }
        }
    }
    // Closing the listener refuses new connections at once instead of leaving them queued.
    drop(listener);
    let drained = tokio::time::timeout(GRACE_PERIOD, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(%addr, open = tasks.len(), "connections still busy after the grace period: closing them");
    }
    // Dropping the set aborts what is left.
    Ok(())
}

fn tls_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs = crate::tls::load_certs(cert)?;
    let key_der = crate::tls::load_key(key)?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            anyhow::anyhow!(
                "TLS certificate {} / key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn http_builder(limits: HttpLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Why a connection task ended early; the label of `http_connections_closed_total`.
fn closed(reason: &'static str) {
    metrics::counter!("http_connections_closed_total", "reason" => reason).increment(1);
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: ConnPermit,
    acceptor: TlsAcceptor,
    builder: Arc<auto::Builder<TokioExecutor>>,
    app: axum::Router,
    limits: HttpLimits,
    lifecycle: Lifecycle,
) {
    let deadline = Instant::now() + limits.header;
    let io = IdleStream::new(tcp, permit, limits.idle);
    let tls = tokio::select! {
        () = lifecycle.shutdown() => return,
        () = tokio::time::sleep_until(deadline) => return closed("handshake_timeout"),
        tls = acceptor.accept(io) => match tls {
            Ok(tls) => tls,
            Err(_) => return closed("handshake_failed"),
        },
    };

    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let first_tx = Arc::new(Mutex::new(Some(first_tx)));
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        if let Some(tx) = lock(&first_tx).take() {
            let _ = tx.send(());
        }
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut app = app.clone();
        async move { app.call(request.map(axum::body::Body::new)).await }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);

    tokio::select! {
        biased;
        _ = &mut conn => return,
        () = lifecycle.shutdown() => return,
        _ = first_rx => {}
        () = tokio::time::sleep_until(deadline) => return closed("header_timeout"),
    }
    tokio::select! {
        _ = &mut conn => {}
        () = lifecycle.shutdown() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// A TCP stream that holds its connection permit and fails once no byte has moved either
/// way for the idle limit.
struct IdleStream {
    inner: TcpStream,
    _permit: ConnPermit,
    idle: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl IdleStream {
    fn new(inner: TcpStream, permit: ConnPermit, idle: Duration) -> Self {
        let last = Instant::now();
        Self {
            inner,
            _permit: permit,
            idle,
            last,
            timer: Box::pin(tokio::time::sleep_until(last + idle)),
        }
    }

    fn moved(&mut self) {
        self.last = Instant::now();
    }

    /// Called when the stream would wait: pending until the idle limit, then an error.
    fn poll_idle<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let due = self.last + self.idle;
        if self.timer.deadline() != due {
            self.timer.as_mut().reset(due);
        }
        ready!(self.timer.as_mut().poll(cx));
        closed("idle");
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "connection idle too long",
        )))
    }
}

impl AsyncRead for IdleStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.moved();
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_idle(cx),
        }
    }
}

impl AsyncWrite for IdleStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.moved();
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_idle(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.moved();
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_idle(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
