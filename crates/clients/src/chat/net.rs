//! Reaching the chat: an assignment from the LB, account registration and login over HTTPS,
//! and the WebSocket over the cluster's TLS (with its close handshake).

use std::sync::Arc;
use std::time::Duration;

use super::{CONNECT_TIMEOUT, MAX_FRAME_BYTES, Target};
use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use url::Url;

/// A chat WebSocket over the cluster's TLS.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A broadcast handed out by an LB.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub broadcast: String,
    pub base: Url,
}

/// What every client shares: HTTP and TLS clients, the LBs, the channel. Public for the
/// end-to-end tests, which speak the protocol by hand.
pub struct Net {
    http: reqwest::Client,
    tls: tokio_rustls::TlsConnector,
    target: Target,
    /// Address the client's sockets leave from (see [`crate::client_address`]).
    local: Option<std::net::IpAddr>,
}

impl Net {
    pub fn new(target: Target) -> anyhow::Result<Self> {
        Self::from_address(target, None)
    }

    /// A client whose HTTP requests and chat sockets leave from `local`.
    pub fn from_address(target: Target, local: Option<std::net::IpAddr>) -> anyhow::Result<Self> {
        let http =
            streaming_core::client::cluster_client_builder(&target.ca, Duration::from_secs(5))
                .with_context(|| format!("loading CA {}", target.ca.display()))?
                .local_address(local)
                .build()?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in streaming_core::tls::load_certs(&target.ca)? {
            roots.add(cert)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            http,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            target,
            local,
        })
    }

    /// The HTTPS client trusting the cluster CA.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Asks the LBs in turn for a broadcast outside `exclude`; `None` if none has one.
    pub(super) async fn assign(&self, exclude: &[String]) -> anyhow::Result<Option<Assignment>> {
        #[derive(Deserialize)]
        struct Answer {
            broadcast: String,
            base_url: String,
        }
        let mut last_error = None;
        for lb in &self.target.lbs {
            let mut url = lb.join("/api/assign")?;
            url.query_pairs_mut()
                .append_pair("channel", &self.target.channel)
                .append_pair("exclude", &exclude.join(","));
            match self.http.get(url.clone()).send().await {
                Ok(r) if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE => return Ok(None),
                Ok(r) if r.status().is_success() => {
                    let body = r.bytes().await?;
                    if body.len() > 64 * 1024 {
                        bail!("{url}: answer too large");
                    }
                    let answer: Answer = serde_json::from_slice(&body)
                        .with_context(|| format!("{url}: not an assignment"))?;
                    let base = Url::parse(&answer.base_url)
                        .with_context(|| format!("{url}: bad base_url"))?;
                    return Ok(Some(Assignment {
                        broadcast: answer.broadcast,
                        base,
                    }));
                }
                Ok(r) => last_error = Some(anyhow::anyhow!("{url}: {}", r.status())),
                Err(e) => last_error = Some(anyhow::anyhow!("{url}: {e}")),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no LB")))
    }

    /// Every broadcast the LBs hand out: assign, excluding the ones found, until none is left.
    pub async fn discover(&self) -> anyhow::Result<Vec<Assignment>> {
        let mut found: Vec<Assignment> = Vec::new();
        for _ in 0..32 {
            let exclude: Vec<String> = found.iter().map(|a| a.broadcast.clone()).collect();
            match self.assign(&exclude).await? {
                Some(a) if !exclude.contains(&a.broadcast) => found.push(a),
                _ => break,
            }
        }
        Ok(found)
    }

    /// Registers an account; its session token.
    pub(super) async fn register(
        &self,
        base: &Url,
        name: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        match self.account(base, "register", name, password).await? {
            // Registered by an attempt whose answer was lost: log in instead.
            Err((reqwest::StatusCode::CONFLICT, _)) => self.login(base, name, password).await,
            Err((status, why)) => bail!("register {name} at {base}: {status} {why}"),
            Ok(session) => Ok(session),
        }
    }

    async fn login(&self, base: &Url, name: &str, password: &str) -> anyhow::Result<String> {
        match self.account(base, "login", name, password).await? {
            Err((status, why)) => bail!("log in {name} at {base}: {status} {why}"),
            Ok(session) => Ok(session),
        }
    }

    /// `POST /api/account/<action>` with a name and password: the session token, or the status
    /// and reason of a refusal.
    async fn account(
        &self,
        base: &Url,
        action: &str,
        name: &str,
        password: &str,
    ) -> anyhow::Result<Result<String, (reqwest::StatusCode, String)>> {
        #[derive(Deserialize)]
        struct Answer {
            session: String,
        }
        let url = base.join(&format!("/api/account/{action}"))?;
        let response = self
            .http
            .post(url.clone())
            .json(&serde_json::json!({"name": name, "password": password}))
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status();
        let body = response.bytes().await?;
        if !status.is_success() {
            let why = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Ok(Err((status, why)));
        }
        Ok(Ok(serde_json::from_slice::<Answer>(&body)
            .with_context(|| format!("POST {url}: no session in the answer"))?
            .session))
    }

    async fn tcp_connect(&self, addr: &str) -> std::io::Result<tokio::net::TcpStream> {
        let Some(local) = self.local else {
            return tokio::net::TcpStream::connect(addr).await;
        };
        let remote = tokio::net::lookup_host(addr)
            .await?
            .find(|a| a.is_ipv4() == local.is_ipv4())
            .ok_or_else(|| {
                std::io::Error::other(format!("{addr}: no address of {local}'s family"))
            })?;
        let socket = if local.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(std::net::SocketAddr::new(local, 0))?;
        socket.connect(remote).await
    }

    /// TCP, TLS (cluster CA) and the WebSocket handshake to a broadcast's chat.
    pub async fn connect(&self, base: &Url) -> anyhow::Result<Ws> {
        let host = base.host().context("base URL without host")?;
        let port = base.port_or_known_default().unwrap_or(443);
        let server_name = match &host {
            url::Host::Ipv4(a) => rustls_pki_types::ServerName::IpAddress((*a).into()),
            url::Host::Ipv6(a) => rustls_pki_types::ServerName::IpAddress((*a).into()),
            url::Host::Domain(d) => rustls_pki_types::ServerName::try_from((*d).to_owned())?,
        };
        let addr = format!("{host}:{port}");
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, self.tcp_connect(&addr))
            .await
            .with_context(|| format!("connect {addr}: timeout"))?
            .with_context(|| format!("connect {addr}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, self.tls.connect(server_name, tcp))
            .await
            .with_context(|| format!("TLS {addr}: timeout"))?
            .with_context(|| format!("TLS {addr}"))?;
        let ws_url = format!("wss://{addr}/api/chat/{}", self.target.channel);
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let (ws, _) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::client_async_with_config(ws_url.as_str(), tls, Some(config)),
        )
        .await
        .with_context(|| format!("{ws_url}: handshake timeout"))?
        .with_context(|| format!("{ws_url}: handshake"))?;
        Ok(ws)
    }
}

/// How long a client waits for the server's side of the close handshake.
pub(super) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Ends a chat socket as RFC 6455 asks: our Close (1000), unless the server's came first
/// (tungstenite then answers it), then reads until the server's Close and the end of the
/// connection, for at most `within`. The server's close code, if it came in time.
pub async fn close_socket(ws: &mut Ws, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    let bye = Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    }));
    // Refused when the server closed first: the next read sends the answer.
    let _ = tokio::time::timeout_at(deadline, ws.send(bye)).await;
    let mut code = None;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Close(frame) = frame {
            code = frame.map(|f| u16::from(f.code));
        }
    }
    code
}
