//! The publisher against a real RTMPS server (rustls + rml_rtmp's server session) with a
//! certificate from a fresh CA: what arrives, in which order, and that a server whose
//! certificate does not carry the expected name never sees the publish name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject;
use streaming_core::lifecycle::Lifecycle;
use streaming_rtmp_publish::{
    Backoff, Fanout, PublishOptions, Stream, Tag, TagKind, Target, client_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the server saw: the publish name, then `(kind, timestamp, first payload byte, second)`.
#[derive(Debug, PartialEq)]
enum Seen {
    Publish(String),
    Media(TagKind, u32, u8, u8),
    TlsFailed,
}

/// A CA (PEM file) and a server config for a leaf with only the IP SAN 127.0.0.1.
fn pki(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone()], key)
        .unwrap();
    (ca_path, Arc::new(server))
}

/// Accepts one connection: TLS, RTMP handshake, accepts `connect` and `publish`, reports media.
async fn serve_one(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let (tcp, _) = listener.accept().await.unwrap();
    let Ok(mut io) = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await else {
        let _ = seen.send(Seen::TlsFailed);
        return;
    };
    let mut handshake = Handshake::new(PeerType::Server);
    let mut buf = vec![0u8; 64 * 1024];
    let leftover = loop {
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0, "client closed during the handshake");
        match handshake.process_bytes(&buf[..n]).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => {
                io.write_all(&response_bytes).await.unwrap()
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                io.write_all(&response_bytes).await.unwrap();
                break remaining_bytes;
            }
        }
    };
    io.flush().await.unwrap();
    let (mut session, results) = ServerSession::new(ServerSessionConfig::new()).unwrap();
    let mut pending = results;
    let mut input = leftover;
    loop {
        pending.extend(session.handle_input(&input).unwrap());
        while !pending.is_empty() {
            for r in std::mem::take(&mut pending) {
                match r {
                    ServerSessionResult::OutboundResponse(p) => {
                        io.write_all(&p.bytes).await.unwrap()
                    }
                    ServerSessionResult::RaisedEvent(event) => match event {
                        ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                            pending.extend(session.accept_request(request_id).unwrap())
                        }
                        ServerSessionEvent::PublishStreamRequested {
                            request_id,
                            stream_key,
                            ..
                        } => {
                            let _ = seen.send(Seen::Publish(stream_key));
                            pending.extend(session.accept_request(request_id).unwrap())
                        }
                        ServerSessionEvent::VideoDataReceived {
                            data, timestamp, ..
                        } => {
                            let _ = seen.send(Seen::Media(
                                TagKind::Video,
                                timestamp.value,
                                data[0],
                                data[1],
                            ));
                        }
                        ServerSessionEvent::AudioDataReceived {
                            data, timestamp, ..
                        } => {
                            let _ = seen.send(Seen::Media(
                                TagKind::Audio,
                                timestamp.value,
                                data[0],
                                data[1],
                            ));
                        }
                        _ => {}
                    },
                    ServerSessionResult::UnhandleableMessageReceived(_) => {}
                }
            }
        }
        io.flush().await.unwrap();
        let n = io.read(&mut buf).await.unwrap_or(0);
        if n == 0 {
            return;
        }
        input = buf[..n].to_vec();
    }
}

fn tag(kind: TagKind, timestamp_ms: u32, data: &[u8]) -> Tag {
    Tag {
        kind,
        timestamp_ms,
        data: Bytes::copy_from_slice(data),
    }
}

async fn publish_to(server_name: ServerName<'static>) -> Vec<Seen> {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = pki(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server_task = tokio::spawn(serve_one(listener, server, seen_tx));
    let options = PublishOptions {
        tls: client_config(&ca).unwrap(),
        app: "live".into(),
        queue_tags: 64,
        backoff: Backoff {
            first: Duration::from_secs(60),
            max: Duration::from_secs(60),
        },
        failures_metric: "test_publish_failures_total",
        bind: Some([127, 0, 0, 1].into()),
    };
    let stream = Stream {
        label: "test".into(),
        publish_name: "test?key=s3cret&anchor=1".into(),
    };
    let target = Target {
        name: "server".into(),
        addr,
        server_name,
    };
    let lifecycle = Lifecycle::from_signals().unwrap();
    let mut fanout = Fanout::start(&stream, &[target], &options, &lifecycle);
    for t in [
        tag(TagKind::Other(18), 0, b"\x02\x00\x0aonMetaData"),
        tag(TagKind::Video, 0, &[0x17, 0, 0, 0, 0, 1]),
        tag(TagKind::Audio, 0, &[0xAF, 0, 0x11, 0x90]),
        tag(TagKind::Video, 0, &[0x17, 1, 0, 0, 0, 0xAA]),
        tag(TagKind::Audio, 21, &[0xAF, 1, 0x21]),
        tag(TagKind::Video, 40, &[0x27, 1, 0, 0, 0, 0xBB]),
    ] {
        fanout.push(&t);
    }
    let mut out = Vec::new();
    // Publish + 5 media messages, or a refused handshake; bounded so a failure cannot hang.
    while let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await {
        let done = s == Seen::TlsFailed;
        out.push(s);
        if done || out.len() == 6 {
            break;
        }
    }
    drop(fanout);
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;
    out
}

#[tokio::test]
async fn publishes_over_tls_headers_first_then_media_in_order() {
    let seen = publish_to(ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]))).await;
    assert_eq!(
        seen,
        vec![
            Seen::Publish("test?key=s3cret&anchor=1".into()),
            Seen::Media(TagKind::Video, 0, 0x17, 0),
            Seen::Media(TagKind::Audio, 0, 0xAF, 0),
            Seen::Media(TagKind::Video, 0, 0x17, 1),
            Seen::Media(TagKind::Audio, 21, 0xAF, 1),
            Seen::Media(TagKind::Video, 40, 0x27, 1),
        ]
    );
}

#[tokio::test]
async fn a_server_without_the_expected_name_never_gets_the_key() {
    let seen = publish_to(ServerName::try_from("ingest9.example").unwrap()).await;
    assert_eq!(seen, vec![Seen::TlsFailed]);
}
