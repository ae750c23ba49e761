//! `serve_https` on a real loopback listener with real TLS and small limits: what a hostile
//! client can hold, and that normal and slow-but-honest clients are still served.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::get;
use rustls_pki_types::{CertificateDer, ServerName};
use streaming_core::lifecycle::Lifecycle;
use streaming_core::serve::{HttpLimits, serve_https_on};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Upper bound for "is it closed": far above every limit used here, only there so a broken
/// server fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(30);
const SLOW_BODY: usize = 4 << 20;

struct Server {
    addr: SocketAddr,
    connector: TlsConnector,
    lifecycle: Lifecycle,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

fn pki(dir: &std::path::Path) -> CertificateDer<'static> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
    ca_cert.der().clone()
}

async fn start(limits: HttpLimits) -> Server {
    streaming_core::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki(dir.path());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(client));
    let app = axum::Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/big",
            get(|| async {
                let chunks = (0..SLOW_BODY / 65536)
                    .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 65536])));
                Body::from_stream(futures::stream::iter(chunks))
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let lifecycle = Lifecycle::manual();
    let task = tokio::spawn(serve_https_on(
        listener,
        app,
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
        limits,
        lifecycle.clone(),
    ));
    Server {
        addr,
        connector,
        lifecycle,
        task,
        _dir: dir,
    }
}

impl Server {
    async fn tcp_from(&self, source: [u8; 4]) -> tokio::net::TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(self.addr).await.unwrap()
    }

    async fn tls_from(&self, source: [u8; 4]) -> std::io::Result<TlsStream<tokio::net::TcpStream>> {
        let tcp = self.tcp_from(source).await;
        let name = ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into());
        tokio::time::timeout(PATIENCE, self.connector.connect(name, tcp))
            .await
            .expect("TLS handshake neither done nor refused")
    }

    async fn stop(self) {
        self.lifecycle.request_shutdown();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}

/// Reads until the server closes; how long that took. Panics past [`PATIENCE`].
async fn time_to_close<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {PATIENCE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends one keep-alive GET and reads its response (headers and Content-Length body).
async fn get_once<S>(stream: &mut S, path: &str) -> (String, usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (head, length)
}

fn limits(header: u64, idle: u64, per_address: u32) -> HttpLimits {
    HttpLimits {
        header: Duration::from_secs(header),
        idle: Duration::from_secs(idle),
        connections: 1000,
        connections_per_address: per_address,
    }
}

#[tokio::test]
async fn slow_and_idle_clients_are_closed_honest_ones_served() {
    let server = start(limits(1, 2, 100)).await;

    // TLS done, request headers never finished.
    let mut half = server.tls_from([127, 0, 0, 1]).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let t = time_to_close(&mut half).await;
    println!("half-sent headers closed after {t:?} (header limit 1 s)");

    // TLS done, then silence.
    let mut silent = server.tls_from([127, 0, 0, 1]).await.unwrap();
    let t = time_to_close(&mut silent).await;
    println!("silent connection closed after {t:?} (header limit 1 s)");

    // TCP only, no TLS handshake at all.
    let mut raw = server.tcp_from([127, 0, 0, 1]).await;
    let t = time_to_close(&mut raw).await;
    println!("no TLS handshake closed after {t:?} (header limit 1 s)");

    // A normal request, then an idle keep-alive.
    let mut keep = server.tls_from([127, 0, 0, 1]).await.unwrap();
    let (head, len) = get_once(&mut keep, "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(len, 2);
    let t = time_to_close(&mut keep).await;
    println!("idle keep-alive closed after {t:?} (header limit 1 s, idle limit 2 s)");

    // A large response read slowly, for far longer than the header limit: never cut.
    let mut slow = server.tls_from([127, 0, 0, 1]).await.unwrap();
    slow.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::time::timeout(PATIENCE, slow.read(&mut buf))
            .await
            .expect("slow response stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let text_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(got.starts_with(b"HTTP/1.1 200"));
    // Chunked encoding adds framing around the 4 MiB: at least all of it arrived.
    assert!(got.len() - text_end >= SLOW_BODY, "{} bytes", got.len());
    println!(
        "slow reader got {} bytes in {:?} (header limit 1 s)",
        got.len(),
        start.elapsed()
    );

    server.stop().await;
}

#[tokio::test]
async fn per_address_cap_refuses_before_tls() {
    // Limits far above the test's duration: the held connections stay open throughout.
    let server = start(limits(60, 60, 3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(server.tls_from([127, 0, 0, 2]).await.unwrap());
    }
    let refused = server.tls_from([127, 0, 0, 2]).await;
    assert!(refused.is_err(), "4th connection from 127.0.0.2 was served");

    let mut other = server.tls_from([127, 0, 0, 3]).await.unwrap();
    let (head, _) = get_once(&mut other, "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // A place freed is a place taken again.
    drop(held.pop());
    let freed = Instant::now();
    let mut again = loop {
        // The server notices the close asynchronously.
        match server.tls_from([127, 0, 0, 2]).await {
            Ok(s) => break s,
            Err(e) if freed.elapsed() > PATIENCE => panic!("place never freed: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let (head, _) = get_once(&mut again, "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    drop(held);
    server.stop().await;
}
