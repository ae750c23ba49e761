//! The cluster HTTPS client and the Patroni client against real loopback HTTPS servers signed by
//! a test CA: only that CA is trusted, redirects are not followed, bodies are bounded, and the
//! primary is the host answering 200 on `/primary`.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use streaming_core::client::{BodyError, cluster_client, read_limited};
use streaming_core::config::HostEntry;
use streaming_core::lifecycle::Lifecycle;
use streaming_core::patroni::{Check, Patroni};
use streaming_core::serve::{HttpLimits, serve_https_on};
use tokio::net::TcpListener;

const TIMEOUT: Duration = Duration::from_secs(5);

/// A CA (written to `ca.pem`) and a certificate for 127.0.0.1 signed by it.
fn pki(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress(IpAddr::from([127, 0, 0, 1])));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
}

/// A fake Patroni (plus a redirect and a large body) on a fresh port; `leads` decides
/// `/primary`.
async fn server(dir: &Path, leads: bool, lifecycle: &Lifecycle) -> u16 {
    let primary = if leads {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let app = axum::Router::new()
        .route("/primary", get(move || async move { primary }))
        .route("/health", get(|| async { StatusCode::OK }))
        .route(
            "/patroni",
            get(|| async { r#"{"role":"master","state":"running"}"# }),
        )
        .route("/big", get(|| async { vec![b'x'; 100_000] }))
        .route(
            "/moved",
            get(|| async { (StatusCode::FOUND, [("location", "/health")]) }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let limits = HttpLimits {
        header: TIMEOUT,
        idle: TIMEOUT,
        connections: 100,
        connections_per_address: 100,
    };
    tokio::spawn(serve_https_on(
        listener,
        app,
        dir.join("cert.pem"),
        dir.join("key.pem"),
        limits,
        lifecycle.clone(),
    ));
    port
}

fn db_host(name: &str, patroni: u16) -> HostEntry {
    serde_json::from_value(serde_json::json!({
        "name": name, "role": "db", "fqdn": "x", "address": "127.0.0.1",
        "ports": {"https": 1, "rtmp": 1, "rtmps": 1, "patroni": patroni, "postgres": 1,
                  "etcd_client": 1, "etcd_peer": 1},
        "url": "https://127.0.0.1:1", "uplink_mbps": null, "preferred_ingest": null,
        "channels": [], "priority": null, "etcd_witness": false, "drain": false
    }))
    .unwrap()
}

#[tokio::test]
async fn cluster_client_and_patroni_against_real_servers() {
    streaming_core::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let lifecycle = Lifecycle::manual();
    let replica = server(dir.path(), false, &lifecycle).await;
    let leader = server(dir.path(), true, &lifecycle).await;
    let ca = dir.path().join("ca.pem");

    let client = cluster_client(&ca, TIMEOUT).unwrap();
    let moved = client
        .get(format!("https://127.0.0.1:{leader}/moved"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        moved.status(),
        reqwest::StatusCode::FOUND,
        "followed a redirect"
    );
    let big = client
        .get(format!("https://127.0.0.1:{leader}/big"))
        .send()
        .await
        .unwrap();
    assert!(matches!(
        read_limited(big, 64 * 1024).await,
        Err(BodyError::TooLarge(65536))
    ));
    let small = client
        .get(format!("https://127.0.0.1:{leader}/big"))
        .send()
        .await
        .unwrap();
    assert_eq!(read_limited(small, 100_000).await.unwrap().len(), 100_000);

    let patroni = Patroni::new(&ca, TIMEOUT).unwrap();
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gone = closed.local_addr().unwrap().port();
    drop(closed);
    let hosts = [
        db_host("db0", gone),
        db_host("db1", replica),
        db_host("db2", leader),
    ];
    let leaders = patroni.leaders(&hosts).await;
    assert_eq!(
        leaders.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(),
        ["db2"]
    );
    assert_eq!(patroni.primary(&hosts).await.unwrap().name, "db2");
    // References work too, as a caller filtering the config's hosts has them.
    let refs: Vec<&HostEntry> = hosts.iter().collect();
    assert_eq!(patroni.primary(&refs).await.unwrap().name, "db2");
    assert!(patroni.check(&hosts[1], Check::Health).await.unwrap());
    assert!(!patroni.check(&hosts[1], Check::Primary).await.unwrap());
    assert!(patroni.check(&hosts[0], Check::Health).await.is_err());
    let (status, document) = patroni.document(&hosts[2]).await.unwrap();
    assert_eq!((status, document["role"].as_str()), (200, Some("master")));

    // A client trusting another CA refuses the servers.
    let other = tempfile::tempdir().unwrap();
    pki(other.path());
    let stranger = Patroni::new(&other.path().join("ca.pem"), TIMEOUT).unwrap();
    assert!(stranger.primary(&hosts).await.is_none());
    lifecycle.request_shutdown();
}
