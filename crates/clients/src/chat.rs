//! `streamctl chat`: a chat load client that checks what the chat promises.
//!
//! K clients, each logged in with its own freshly registered account, are spread over at least
//! two broadcasts (the LB's `/api/assign?exclude=`) and send R messages per second in total over
//! the chat WebSocket (`wss://<broadcast>/api/chat/<channel>`, protocol in `crates/chat/src/ws.rs`). Every message carries
//! a client-made id (`<user>-<n>`). On any socket error, close or ack timeout a client reconnects
//! through the LB, away from the broadcast that failed it, says `hello` with `since` = the last
//! seq it saw, and resends every unacked message under the same id — exactly what the page does,
//! so the server's idempotent insert and gap replay are exercised for real.
//!
//! Everything a client saw goes into a [`ClientBook`]; [`analyse`] then answers the questions of
//! the durability test: was every acked message delivered to every client, once, in seq order;
//! did one (user, id) ever get two seqs; and how long could nobody write (`write_outages`).
//! The bookkeeping is pure (times are seconds since an epoch passed in), so it is unit-tested
//! without sockets.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use url::Url;

/// An interval of more than this without any ack while something was pending is an outage.
pub const OUTAGE_THRESHOLD_S: f64 = 1.0;
/// The server's per-user limit (burst 10, then 3 msg/s): the client stays inside it so a
/// rate-limit error never passes for a failure.
const USER_BURST: f64 = 10.0;
const USER_RATE: f64 = 3.0;
/// Unacked messages a client allows itself: during an outage it stops typing, so that the
/// resends after it fit the server's burst.
const MAX_PENDING: usize = 5;
/// Largest frame we accept from the server (its own frames are a few hundred bytes).
const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Connect, TLS and WebSocket handshake, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The server answers `hello` at once.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// The server pings every 10 s: a socket silent for longer than this is dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(25);
/// How long a broadcast that failed a client stays excluded from its reassignments.
const FAILED_MEMORY: Duration = Duration::from_secs(30);
/// Delay before resending a message the server refused with `rate_limited` or `unavailable`.
const RETRY_AFTER_S: f64 = 1.0;
/// Housekeeping period of a client: sends, resends, timeouts.
const TICK: Duration = Duration::from_millis(50);
/// Setup (assignment, registration, first welcome) of every client must end within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// An LB's base URL (e.g. https://127.77.1.1:8443); default: the local cluster's LBs.
    pub url: Option<String>,
    /// State directory of `streamctl up` (default URL, CA, channel).
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// CA certificate to trust; defaults to `<state>/tls/ca.crt`.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Seconds of sending (then the clients stop and wait for delivery).
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Chat clients, each with its own registered account.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Messages per second, all clients together (the server allows 3 per user).
    #[arg(long, default_value_t = 24.0)]
    pub rate: f64,
    /// Channel; default: the cluster's first.
    #[arg(long)]
    pub channel: Option<String>,
    /// After sending: seconds to wait until every client has every acked message.
    #[arg(long, default_value_t = 20)]
    pub drain: u64,
    /// Seconds without the ack of a sent message before the client gives up on the socket.
    #[arg(long, default_value_t = 20)]
    pub ack_timeout: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where the load goes.
#[derive(Debug, Clone)]
pub struct Target {
    /// LB base URLs, asked in turn for assignments.
    pub lbs: Vec<Url>,
    pub ca: PathBuf,
    pub channel: String,
}

impl Target {
    /// From the command line, with the local cluster's state for what is not given.
    pub fn resolve(
        url: Option<&str>,
        state: &Path,
        ca: Option<&Path>,
        channel: Option<&str>,
    ) -> anyhow::Result<Self> {
        let config = first_config(state);
        let lbs: Vec<Url> = match url {
            Some(url) => vec![Url::parse(url).with_context(|| format!("bad URL {url}"))?],
            None => {
                let config = config.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                config
                    .cluster
                    .site_urls
                    .iter()
                    .map(|u| Url::parse(u).with_context(|| format!("bad site URL {u}")))
                    .collect::<anyhow::Result<_>>()?
            }
        };
        if lbs.is_empty() {
            bail!("no LB URL (give one, or a state dir of `streamctl up`)");
        }
        let channel = match channel {
            Some(c) => c.to_owned(),
            None => config
                .as_ref()
                .ok()
                .and_then(|c| c.cluster.channels.first().map(|c| c.name.clone()))
                .unwrap_or_else(|| "test".to_owned()),
        };
        Ok(Self {
            lbs,
            ca: ca.map_or_else(|| state.join("tls/ca.crt"), Path::to_owned),
            channel,
        })
    }
}

fn first_config(state: &Path) -> anyhow::Result<streaming_core::config::HostConfig> {
    let dir = state.join("config");
    let entry = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "no cluster state in {} (run `streamctl up` first or give a URL)",
                dir.display()
            )
        })?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "json"))
        .context("no host config in the state dir")?;
    Ok(streaming_core::config::HostConfig::load(&entry.path())?)
}

/// One load run. The bench drives `stop` and shares its `epoch` so fault times and outages are
/// on one clock.
pub struct LoadOptions {
    pub target: Target,
    pub clients: usize,
    /// Messages per second, all clients together.
    pub rate: f64,
    /// Stop sending after this many seconds of sending (`None`: only on `stop`).
    pub seconds: Option<f64>,
    /// `true` stops the sending (then the drain runs as after `seconds`).
    pub stop: Option<watch::Receiver<bool>>,
    pub drain: Duration,
    pub ack_timeout: Duration,
    /// Time zero of every `*_s` figure of the report.
    pub epoch: Instant,
    /// Told once every client is connected and sending begins.
    pub sending: Option<oneshot::Sender<()>>,
    /// Live figures for a bench watching the run.
    pub live: Arc<Live>,
}

/// Figures a bench reads while the load runs.
#[derive(Debug, Default)]
pub struct Live {
    inner: Mutex<LiveInner>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LiveInner {
    acked: u64,
    last_ack_s: Option<f64>,
}

impl Live {
    fn on_ack(&self, at_s: f64) {
        if let Ok(mut l) = self.inner.lock() {
            l.acked += 1;
            l.last_ack_s = Some(l.last_ack_s.map_or(at_s, |t| t.max(at_s)));
        }
    }
    /// Messages acked so far (first acks only).
    pub fn acked(&self) -> u64 {
        self.inner.lock().map(|l| l.acked).unwrap_or(0)
    }
    /// Time of the latest ack, seconds since the epoch.
    pub fn last_ack_s(&self) -> Option<f64> {
        self.inner.lock().ok().and_then(|l| l.last_ack_s)
    }
}

/// A write outage: something was pending and no ack came for more than
/// [`OUTAGE_THRESHOLD_S`]; from the first send left unacked after the last ack to the next ack.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    pub start_s: f64,
    pub duration_s: f64,
}

/// The JSON report of `streamctl chat` (its keys are read by the tests and benches).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatReport {
    pub clients: usize,
    /// Broadcasts the clients were on (at start and after reconnects).
    pub broadcasts: Vec<String>,
    /// Broadcasts the clients were spread over at the start.
    pub initial_broadcasts: Vec<String>,
    pub channel: String,
    pub seconds: f64,
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    /// Sum over clients of acked messages (anyone's) the client never received.
    pub missing: u64,
    /// Events a client received twice, plus (user, id) pairs seen with more than one seq.
    pub duplicates: u64,
    /// Events that arrived after an event with a higher seq.
    pub out_of_order: u64,
    /// Seqs acked or delivered for two different messages (a rewound primary reused them).
    pub seq_conflicts: u64,
    /// Seqs never received between a client's first and last event.
    pub gaps: u64,
    pub reconnects: u64,
    /// Frames sent again (resends after reconnects and after `rate_limited`/`unavailable`).
    pub resends: u64,
    pub max_ack_wait_s: f64,
    pub write_outages: Vec<Outage>,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// Time (since the epoch) the sending began and ended.
    pub sending_from_s: f64,
    pub sending_until_s: f64,
    /// Every client had every acked message when the drain ended.
    pub delivered: bool,
}

impl ChatReport {
    /// Nothing lost, doubled or reordered, and everything sent was acked.
    pub fn clean(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.seq_conflicts == 0
            && self.out_of_order == 0
            && self.gaps == 0
            && self.unacked == 0
    }
}

/// One acked message: who, which id, which seq, when acked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AckedMessage {
    pub user: String,
    pub id: String,
    pub seq: u64,
    pub acked_s: f64,
}

/// The report plus what a bench checks against the database.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    pub report: ChatReport,
    pub acked: Vec<AckedMessage>,
    /// Every account of the run starts with this (`cl<tag>_`).
    pub user_prefix: String,
}

// ---------------------------------------------------------------------------------------------
// Pure bookkeeping.

/// One message a client made.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub first_sent_s: f64,
    pub last_sent_s: f64,
    pub sends: u32,
    /// First ack: (seq, time).
    pub ack: Option<(u64, f64)>,
    /// Seqs of later acks that disagreed with the first one (must stay empty).
    pub conflicting_acks: Vec<u64>,
}

/// What one client sent, got acked and received.
#[derive(Debug, Clone, Default)]
pub struct ClientBook {
    pub user: String,
    next: u64,
    /// By message number n (id = `<user>-<n>`).
    pub messages: BTreeMap<u64, Sent>,
    /// Events by seq: `Some((user, id))` for messages, `None` for moderation events.
    pub received: BTreeMap<u64, Option<(String, String)>>,
    /// The server's last seq at the first welcome: where this client's history starts.
    pub floor: Option<u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub reconnects: u64,
    pub resends: u64,
    pub errors: BTreeMap<String, u64>,
    pub broadcasts: BTreeSet<String>,
}

impl ClientBook {
    pub fn new(user: &str) -> Self {
        Self {
            user: user.to_owned(),
            next: 1,
            ..Default::default()
        }
    }

    pub fn id_of(&self, n: u64) -> String {
        format!("{}-{n}", self.user)
    }

    fn n_of(&self, id: &str) -> Option<u64> {
        id.strip_prefix(self.user.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    /// Makes a new message, sent now; returns its id.
    pub fn new_message(&mut self, now_s: f64) -> String {
        let n = self.next;
        self.next += 1;
        self.messages.insert(
            n,
            Sent {
                first_sent_s: now_s,
                last_sent_s: now_s,
                sends: 1,
                ack: None,
                conflicting_acks: Vec::new(),
            },
        );
        self.id_of(n)
    }

    /// The message `id` goes out again (same id).
    pub fn resent(&mut self, id: &str, now_s: f64) {
        if let Some(m) = self.n_of(id).and_then(|n| self.messages.get_mut(&n)) {
            m.last_sent_s = now_s;
            m.sends += 1;
            self.resends += 1;
        }
    }

    /// An ack; true if it is the first for this id.
    pub fn on_ack(&mut self, id: &str, seq: u64, now_s: f64) -> bool {
        let Some(m) = self.n_of(id).and_then(|n| self.messages.get_mut(&n)) else {
            return false;
        };
        match m.ack {
            None => {
                m.ack = Some((seq, now_s));
                true
            }
            Some((first, _)) => {
                if first != seq && !m.conflicting_acks.contains(&seq) {
                    m.conflicting_acks.push(seq);
                }
                false
            }
        }
    }

    /// Ids sent and not yet acked, oldest first.
    pub fn pending(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter(|(_, m)| m.ack.is_none())
            .map(|(n, _)| self.id_of(*n))
            .collect()
    }

    pub fn pending_count(&self) -> usize {
        self.messages.values().filter(|m| m.ack.is_none()).count()
    }

    /// Oldest time a still-pending message was last sent.
    pub fn oldest_pending_send_s(&self) -> Option<f64> {
        self.messages
            .values()
            .filter(|m| m.ack.is_none())
            .map(|m| m.last_sent_s)
            .reduce(f64::min)
    }

    pub fn on_welcome(&mut self, last_seq: Option<u64>) {
        if self.floor.is_none() {
            self.floor = Some(last_seq.unwrap_or(0));
        }
    }

    pub fn highest(&self) -> Option<u64> {
        self.received.keys().next_back().copied()
    }

    /// `since` of the next hello: the highest seq seen (or the server's last seq at the first
    /// welcome); `None` before any welcome.
    pub fn since(&self) -> Option<u64> {
        match (self.highest(), self.floor) {
            (Some(h), Some(f)) => Some(h.max(f)),
            (h, f) => h.or(f),
        }
    }

    /// An event with a seq (message or moderation).
    pub fn on_event(&mut self, seq: u64, message: Option<(String, String)>) {
        if self.received.contains_key(&seq) {
            self.duplicates += 1;
            return;
        }
        if self.highest().is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        self.received.insert(seq, message);
    }

    /// Seqs never received between the first and the last event this client got.
    pub fn gaps(&self) -> u64 {
        let (Some(first), Some(last)) = (
            self.received.keys().next().copied(),
            self.received.keys().next_back().copied(),
        ) else {
            return 0;
        };
        (last - first + 1).saturating_sub(self.received.len() as u64)
    }

    pub fn note_error(&mut self, code: &str) {
        *self.errors.entry(code.to_owned()).or_default() += 1;
    }
}

/// Write outages from (first send, first ack) of every message of every client.
///
/// Sweep over time: an ack closes the current interval (an outage if it lasted more than
/// [`OUTAGE_THRESHOLD_S`]) and opens the next one at once if something is still pending; a send
/// with nothing pending opens one. A message never acked keeps the last interval open until
/// `end_s`.
pub fn write_outages(messages: &[(f64, Option<f64>)], end_s: f64) -> Vec<Outage> {
    // At equal times, sends before acks (a message acked at once was pending for an instant).
    let mut events: Vec<(f64, bool)> = Vec::with_capacity(messages.len() * 2);
    for (sent, acked) in messages {
        events.push((*sent, false));
        if let Some(a) = acked {
            events.push((*a, true));
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut outages = Vec::new();
    let mut pending: i64 = 0;
    let mut open: Option<f64> = None;
    for (t, is_ack) in events {
        if is_ack {
            if let Some(start) = open
                && t - start > OUTAGE_THRESHOLD_S
            {
                outages.push(Outage {
                    start_s: start,
                    duration_s: t - start,
                });
            }
            pending -= 1;
            open = (pending > 0).then_some(t);
        } else {
            pending += 1;
            open.get_or_insert(t);
        }
    }
    if let Some(start) = open
        && pending > 0
        && end_s - start > OUTAGE_THRESHOLD_S
    {
        outages.push(Outage {
            start_s: start,
            duration_s: end_s - start,
        });
    }
    outages
}

/// Every acked message of every book, first ack only.
pub fn acked_messages(books: &[ClientBook]) -> Vec<AckedMessage> {
    let mut out = Vec::new();
    for book in books {
        for (n, m) in &book.messages {
            if let Some((seq, at)) = m.ack {
                out.push(AckedMessage {
                    user: book.user.clone(),
                    id: book.id_of(*n),
                    seq,
                    acked_s: at,
                });
            }
        }
    }
    out.sort_by_key(|m| m.seq);
    out
}

/// The report's figures from every client's book.
pub fn analyse(books: &[ClientBook], end_s: f64) -> ChatReport {
    let mut report = ChatReport {
        clients: books.len(),
        ..Default::default()
    };
    let acked = acked_messages(books);
    let mut timeline = Vec::new();
    for book in books {
        for m in book.messages.values() {
            report.sent += 1;
            timeline.push((m.first_sent_s, m.ack.map(|a| a.1)));
            if let Some((_, at)) = m.ack {
                report.acked += 1;
                report.max_ack_wait_s = report.max_ack_wait_s.max(at - m.first_sent_s);
            }
            // One message acked with two seqs: stored twice.
            report.duplicates += m.conflicting_acks.len() as u64;
        }
        report.duplicates += book.duplicates;
        report.out_of_order += book.out_of_order;
        report.gaps += book.gaps();
        report.reconnects += book.reconnects;
        report.resends += book.resends;
        for (code, n) in &book.errors {
            *report.errors.entry(code.clone()).or_default() += n;
        }
        report.broadcasts.extend(book.broadcasts.iter().cloned());
    }
    report.broadcasts.sort();
    report.broadcasts.dedup();
    report.unacked = report.sent - report.acked;
    // A (user, id) delivered under two seqs (to anyone) was stored twice.
    let mut seqs_of: HashMap<(&str, &str), BTreeSet<u64>> = HashMap::new();
    for book in books {
        for (seq, m) in &book.received {
            if let Some((user, id)) = m {
                seqs_of
                    .entry((user.as_str(), id.as_str()))
                    .or_default()
                    .insert(*seq);
            }
        }
    }
    for m in &acked {
        seqs_of
            .entry((m.user.as_str(), m.id.as_str()))
            .or_default()
            .insert(m.seq);
    }
    report.duplicates += seqs_of
        .values()
        .map(|s| s.len().saturating_sub(1) as u64)
        .sum::<u64>();
    // One seq for two messages: the log was rewound and its numbers handed out again.
    let mut messages_of: HashMap<u64, BTreeSet<(&str, &str)>> = HashMap::new();
    for ((user, id), seqs) in &seqs_of {
        for seq in seqs {
            messages_of.entry(*seq).or_default().insert((user, id));
        }
    }
    report.seq_conflicts = messages_of
        .values()
        .map(|m| m.len().saturating_sub(1) as u64)
        .sum();
    // Every client must have every acked message, under its acked seq.
    for book in books {
        for m in &acked {
            let got = book.received.get(&m.seq).and_then(|e| e.as_ref());
            if got.is_none_or(|(user, id)| *user != m.user || *id != m.id) {
                report.missing += 1;
            }
        }
    }
    report.write_outages = write_outages(&timeline, end_s);
    report
}

/// A token bucket like the server's per-user limit, so the client never trips it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    capacity: f64,
    rate: f64,
    last_s: f64,
}

impl TokenBucket {
    pub fn new(capacity: f64, rate: f64, now_s: f64) -> Self {
        Self {
            tokens: capacity,
            capacity,
            rate,
            last_s: now_s,
        }
    }

    pub fn try_take(&mut self, now_s: f64) -> bool {
        let elapsed = (now_s - self.last_s).max(0.0);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last_s = now_s;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The protocol.

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerFrame {
    Welcome {
        #[serde(default)]
        broadcast: Option<String>,
        #[serde(default)]
        user: Option<serde_json::Value>,
        #[serde(default)]
        last_seq: Option<u64>,
    },
    Message {
        seq: u64,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        user: Option<String>,
    },
    Delete {
        seq: u64,
    },
    Mute {
        seq: u64,
    },
    Ban {
        seq: u64,
    },
    Unban {
        seq: u64,
    },
    Ack {
        id: String,
        seq: u64,
    },
    Error {
        #[serde(default)]
        id: Option<String>,
        code: String,
        #[serde(default)]
        message: Option<String>,
    },
    #[serde(other)]
    Other,
}

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
        let http = streaming_core::tls::peer_client_from(&target.ca, Duration::from_secs(5), local)
            .with_context(|| format!("loading CA {}", target.ca.display()))?;
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
    async fn assign(&self, exclude: &[String]) -> anyhow::Result<Option<Assignment>> {
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
    async fn register(&self, base: &Url, name: &str, password: &str) -> anyhow::Result<String> {
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
const CLOSE_WAIT: Duration = Duration::from_secs(2);

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Sending,
    Draining,
    Done,
}

/// What the coordinator needs to end the drain.
#[derive(Debug, Default)]
struct Progress {
    /// Per client: (pending, highest seq received).
    clients: Vec<(usize, Option<u64>)>,
    max_acked_seq: Option<u64>,
}

impl Progress {
    fn delivered(&self) -> bool {
        self.clients.iter().all(|(pending, highest)| {
            *pending == 0 && (self.max_acked_seq.is_none() || *highest >= self.max_acked_seq)
        })
    }
}

struct Client {
    index: usize,
    book: ClientBook,
    password: String,
    session: Option<String>,
    assignment: Assignment,
    failed: HashMap<String, Instant>,
    net: Arc<Net>,
    epoch: Instant,
    phase: watch::Receiver<Phase>,
    progress: Arc<Mutex<Progress>>,
    live: Arc<Live>,
    ready: Option<mpsc::UnboundedSender<usize>>,
    bucket: TokenBucket,
    /// Seconds between two new messages of this client, and when the next one is due.
    interval_s: f64,
    next_send_s: Option<f64>,
    offset_s: f64,
    ack_timeout: Duration,
    /// Resends scheduled after `rate_limited`/`unavailable`: id -> due time.
    retry_at: BTreeMap<String, f64>,
}

enum SessionEnd {
    Done,
}

impl Client {
    fn now_s(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn publish_progress(&self) {
        if let Ok(mut p) = self.progress.lock() {
            p.clients[self.index] = (self.book.pending_count(), self.book.highest());
        }
    }

    async fn run(mut self) -> ClientBook {
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.phase() == Phase::Done {
                break;
            }
            match self.session().await {
                Ok(SessionEnd::Done) => break,
                Err(e) => {
                    if self.phase() == Phase::Done {
                        break;
                    }
                    tracing::info!(
                        client = self.index,
                        broadcast = %self.assignment.broadcast,
                        "chat session ended: {e:#}"
                    );
                    if self.session.is_some() && self.ready.is_none() {
                        self.book.reconnects += 1;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    self.reassign().await;
                }
            }
        }
        self.publish_progress();
        self.book
    }

    /// A broadcast other than the ones that failed this client lately.
    async fn reassign(&mut self) {
        let now = Instant::now();
        self.failed
            .insert(self.assignment.broadcast.clone(), Instant::now());
        self.failed
            .retain(|_, at| now.duration_since(*at) < FAILED_MEMORY);
        let mut exclude: Vec<String> = self.failed.keys().cloned().collect();
        exclude.sort();
        match self.net.assign(&exclude).await {
            Ok(Some(a)) => self.assignment = a,
            Ok(None) => {
                // Nothing outside the exclusions: they may have recovered.
                self.failed.clear();
                if let Ok(Some(a)) = self.net.assign(&[]).await {
                    self.assignment = a;
                }
            }
            Err(e) => tracing::info!(client = self.index, "no assignment: {e:#}"),
        }
    }

    async fn send_frame(&mut self, ws: &mut Ws, frame: serde_json::Value) -> anyhow::Result<()> {
        tokio::time::timeout(CONNECT_TIMEOUT, ws.send(Message::text(frame.to_string())))
            .await
            .context("send timeout")?
            .context("send")
    }

    /// One connection: hello, welcome, then sends and events until an error or the end.
    async fn session(&mut self) -> anyhow::Result<SessionEnd> {
        if self.session.is_none() {
            let name = self.book.user.clone();
            let session = self
                .net
                .register(&self.assignment.base, &name, &self.password)
                .await?;
            self.session = Some(session);
        }
        let mut ws = self.net.connect(&self.assignment.base).await?;
        let hello = serde_json::json!({
            "type": "hello",
            "session": self.session,
            "since": self.book.since(),
        });
        self.send_frame(&mut ws, hello).await?;
        // The welcome (events may only follow it).
        let deadline = tokio::time::Instant::now() + WELCOME_TIMEOUT;
        loop {
            let frame = tokio::time::timeout_at(deadline, ws.next())
                .await
                .context("no welcome")?
                .context("closed before welcome")??;
            let Message::Text(text) = frame else { continue };
            match serde_json::from_str::<ServerFrame>(text.as_str()) {
                Ok(ServerFrame::Welcome {
                    broadcast,
                    user,
                    last_seq,
                }) => {
                    if user.as_ref().is_none_or(serde_json::Value::is_null) {
                        bail!("welcome without user: session not accepted");
                    }
                    self.book.on_welcome(last_seq);
                    self.book
                        .broadcasts
                        .insert(broadcast.unwrap_or_else(|| self.assignment.broadcast.clone()));
                    break;
                }
                Ok(ServerFrame::Error { code, message, .. }) => {
                    self.book.note_error(&code);
                    bail!(
                        "error before welcome: {code} {}",
                        message.unwrap_or_default()
                    );
                }
                _ => bail!("first frame is not a welcome: {}", text.as_str()),
            }
        }
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(self.index);
        }
        // Everything unacked goes out again under the same id.
        let mut outbox: VecDeque<String> = self.book.pending().into();
        let mut resend: BTreeSet<String> = outbox.iter().cloned().collect();
        self.retry_at.clear();
        let mut last_frame = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = ws.next() => {
                    let frame = frame.context("closed")?.context("read")?;
                    last_frame = Instant::now();
                    match frame {
                        Message::Text(text) => self.on_frame(text.as_str(), &mut outbox)?,
                        Message::Close(close) => {
                            let _ = close_socket(&mut ws, CLOSE_WAIT).await;
                            bail!("closed by the server: {close:?}");
                        }
                        _ => {}
                    }
                    self.publish_progress();
                }
                _ = tick.tick() => {
                    let now = self.now_s();
                    let phase = self.phase();
                    if phase == Phase::Done {
                        if close_socket(&mut ws, CLOSE_WAIT).await.is_none() {
                            tracing::info!(client = self.index, "no answer to our Close within {CLOSE_WAIT:?}");
                        }
                        return Ok(SessionEnd::Done);
                    }
                    if phase == Phase::Sending {
                        let next = *self.next_send_s.get_or_insert(now + self.offset_s);
                        if now >= next {
                            // A slot missed while too much is pending is skipped, not queued.
                            self.next_send_s = Some(next + self.interval_s);
                            if self.book.pending_count() + outbox.len().saturating_sub(resend.len()) < MAX_PENDING {
                                outbox.push_back(String::new());
                            }
                        }
                    }
                    let due: Vec<String> = self
                        .retry_at
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in due {
                        self.retry_at.remove(&id);
                        if !outbox.contains(&id) {
                            resend.insert(id.clone());
                            outbox.push_back(id);
                        }
                    }
                    while let Some(front) = outbox.front().cloned() {
                        if !self.bucket.try_take(now) {
                            break;
                        }
                        outbox.pop_front();
                        let id = if front.is_empty() {
                            self.book.new_message(now)
                        } else {
                            // Acked in the meantime: nothing to resend.
                            let n = self.book.n_of(&front);
                            if n.and_then(|n| self.book.messages.get(&n)).is_none_or(|m| m.ack.is_some()) {
                                resend.remove(&front);
                                continue;
                            }
                            self.book.resent(&front, now);
                            resend.remove(&front);
                            front
                        };
                        let text = format!("chat load {id} at {now:.3} s");
                        self.send_frame(&mut ws, serde_json::json!({"type": "send", "id": id, "text": text})).await?;
                    }
                    self.publish_progress();
                    // Only messages actually out on this socket can time out (not ones waiting
                    // for a token or a scheduled retry).
                    let timed_out = self.book.messages.iter().any(|(n, m)| {
                        m.ack.is_none()
                            && now - m.last_sent_s > self.ack_timeout.as_secs_f64()
                            && {
                                let id = self.book.id_of(*n);
                                !self.retry_at.contains_key(&id) && !outbox.contains(&id)
                            }
                    });
                    if timed_out {
                        bail!("no ack within {} s", self.ack_timeout.as_secs());
                    }
                    if last_frame.elapsed() > IDLE_TIMEOUT {
                        bail!("nothing from the server for {} s", IDLE_TIMEOUT.as_secs());
                    }
                }
            }
        }
    }

    fn on_frame(&mut self, text: &str, outbox: &mut VecDeque<String>) -> anyhow::Result<()> {
        let now = self.now_s();
        let Ok(frame) = serde_json::from_str::<ServerFrame>(text) else {
            self.book.note_error("unparsed_frame");
            return Ok(());
        };
        match frame {
            ServerFrame::Message { seq, id, user } => {
                let message = match (user, id) {
                    (Some(user), Some(id)) => Some((user, id)),
                    _ => None,
                };
                self.book.on_event(seq, message);
            }
            ServerFrame::Delete { seq }
            | ServerFrame::Mute { seq }
            | ServerFrame::Ban { seq }
            | ServerFrame::Unban { seq } => self.book.on_event(seq, None),
            ServerFrame::Ack { id, seq } => {
                if self.book.on_ack(&id, seq, now) {
                    self.live.on_ack(now);
                    if let Ok(mut p) = self.progress.lock() {
                        p.max_acked_seq = Some(p.max_acked_seq.map_or(seq, |m| m.max(seq)));
                    }
                }
                self.retry_at.remove(&id);
            }
            ServerFrame::Error { id, code, message } => {
                self.book.note_error(&code);
                match (id, code.as_str()) {
                    (Some(id), "rate_limited" | "unavailable") => {
                        self.retry_at.insert(id, now + RETRY_AFTER_S);
                    }
                    (Some(id), _) => {
                        tracing::warn!(client = self.index, %id, %code, "message refused: {}", message.unwrap_or_default());
                        // Refused for good: forget it so it is not resent forever.
                        if let Some(n) = self.book.n_of(&id)
                            && self.book.messages.get(&n).is_some_and(|m| m.ack.is_none())
                        {
                            self.book.messages.remove(&n);
                            outbox.retain(|o| *o != id);
                        }
                    }
                    (None, "login_required" | "bad_session") => {
                        bail!("server says {code}: {}", message.unwrap_or_default())
                    }
                    (None, _) => {}
                }
            }
            ServerFrame::Welcome { .. } | ServerFrame::Other => {}
        }
        Ok(())
    }
}

/// A short random tag so account names of different runs never collide.
fn run_tag() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..6)
        .map(|_| char::from(b"abcdefghijkmnpqrstuvwxyz23456789"[rng.random_range(0..32)]))
        .collect()
}

/// The prefix shared by the account names of one run: `cl<tag>_`.
pub fn user_prefix(tag: &str) -> String {
    format!("cl{tag}_")
}

/// Runs the load: setup, sending, drain; the books analysed.
pub async fn load(mut opts: LoadOptions) -> anyhow::Result<LoadOutcome> {
    if opts.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if opts.stop.is_none() && opts.seconds.is_none() {
        bail!("the load needs --seconds or a stop signal");
    }
    if !opts.rate.is_finite() || opts.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let per_client = opts.rate / opts.clients as f64;
    if per_client > USER_RATE {
        tracing::warn!(
            "{per_client:.2} msg/s per client is above the server's {USER_RATE} per user: \
             more clients give the same rate without rate limiting"
        );
    }
    let net = Arc::new(Net::new(opts.target.clone())?);
    let broadcasts = net.discover().await?;
    let first_lb = opts.target.lbs.first().cloned();
    if broadcasts.is_empty() {
        bail!(
            "no LB of {} assigns a broadcast",
            opts.target
                .lbs
                .iter()
                .map(Url::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let initial_broadcasts: Vec<String> = {
        let mut b: Vec<String> = broadcasts
            .iter()
            .take(opts.clients)
            .map(|a| a.broadcast.clone())
            .collect();
        b.sort();
        b
    };
    let tag = run_tag();
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let progress = Arc::new(Mutex::new(Progress {
        clients: vec![(0, None); opts.clients],
        max_acked_seq: None,
    }));
    let interval_s = 1.0 / per_client;
    let mut tasks = Vec::new();
    for index in 0..opts.clients {
        let user = format!("{}{index}", user_prefix(&tag));
        let client = Client {
            index,
            book: ClientBook::new(&user),
            password: format!("pw-{}-{}", run_tag(), run_tag()),
            session: None,
            assignment: broadcasts[index % broadcasts.len()].clone(),
            failed: HashMap::new(),
            net: Arc::new(Net::from_address(
                opts.target.clone(),
                first_lb
                    .as_ref()
                    .and_then(|lb| crate::client_address::simulated(lb, index)),
            )?),
            epoch: opts.epoch,
            phase: phase_rx.clone(),
            progress: progress.clone(),
            live: opts.live.clone(),
            ready: Some(ready_tx.clone()),
            bucket: TokenBucket::new(USER_BURST, USER_RATE, 0.0),
            interval_s,
            next_send_s: None,
            offset_s: interval_s * index as f64 / opts.clients as f64,
            ack_timeout: opts.ack_timeout,
            retry_at: BTreeMap::new(),
        };
        tasks.push(tokio::spawn(client.run()));
    }
    drop(ready_tx);
    // Every client connected (so each one's history starts before the first message).
    let setup_deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    let mut ready = 0;
    while ready < opts.clients {
        match tokio::time::timeout_at(setup_deadline, ready_rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            _ => {
                let _ = phase_tx.send(Phase::Done);
                for t in &tasks {
                    t.abort();
                }
                bail!(
                    "only {ready} of {} chat clients could register and connect within {} s \
                     (is the chat up? RUST_LOG=streaming_clients=info shows why)",
                    opts.clients,
                    SETUP_TIMEOUT.as_secs()
                );
            }
        }
    }
    let sending_from_s = opts.epoch.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Sending);
    if let Some(tx) = opts.sending.take() {
        let _ = tx.send(());
    }
    let sending_deadline = opts
        .seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    let mut stop = opts.stop.take();
    loop {
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
        if sending_deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        match stop.as_mut() {
            Some(s) => {
                tokio::select! {
                    // The bench went away: stop as if told to.
                    changed = s.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let sending_until_s = opts.epoch.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Draining);
    let drain_deadline = Instant::now() + opts.drain;
    let mut delivered = false;
    // Let in-flight sends reach the server before judging.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while Instant::now() < drain_deadline {
        if progress.lock().map(|p| p.delivered()).unwrap_or(false) {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let end_s = opts.epoch.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Done);
    let mut books = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(15), task).await {
            Ok(Ok(book)) => books.push(book),
            Ok(Err(e)) => bail!("chat client task failed: {e}"),
            Err(_) => bail!("a chat client did not stop within 15 s"),
        }
    }
    let mut report = analyse(&books, end_s);
    report.channel = opts.target.channel.clone();
    report.initial_broadcasts = initial_broadcasts;
    report.seconds = sending_until_s - sending_from_s;
    report.sending_from_s = sending_from_s;
    report.sending_until_s = sending_until_s;
    report.delivered = delivered;
    Ok(LoadOutcome {
        report,
        acked: acked_messages(&books),
        user_prefix: user_prefix(&tag),
    })
}

/// The human summary.
pub fn summary(report: &ChatReport) -> String {
    let mut out = format!(
        "{} clients on {} ({}), {:.1} s: sent {}, acked {}, unacked {}\n\
         missing {}, duplicates {}, out of order {}, gaps {}; reconnects {}, resends {}; \
         max ack wait {:.2} s; {}\n",
        report.clients,
        report.initial_broadcasts.join(", "),
        report.channel,
        report.seconds,
        report.sent,
        report.acked,
        report.unacked,
        report.missing,
        report.duplicates,
        report.out_of_order,
        report.gaps,
        report.reconnects,
        report.resends,
        report.max_ack_wait_s,
        if report.delivered {
            "every client received every acked message"
        } else {
            "NOT every client received every acked message within the drain"
        }
    );
    if report.write_outages.is_empty() {
        out.push_str("write outages: none\n");
    } else {
        for o in &report.write_outages {
            out.push_str(&format!(
                "write outage at {:.1} s for {:.2} s\n",
                o.start_s, o.duration_s
            ));
        }
    }
    if !report.errors.is_empty() {
        let errors: Vec<String> = report
            .errors
            .iter()
            .map(|(c, n)| format!("{c} x{n}"))
            .collect();
        out.push_str(&format!("server errors: {}\n", errors.join(", ")));
    }
    out
}

/// `streamctl chat`.
pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let target = Target::resolve(
        args.url.as_deref(),
        &args.state,
        args.ca.as_deref(),
        args.channel.as_deref(),
    )?;
    let outcome = load(LoadOptions {
        target,
        clients: args.clients,
        rate: args.rate,
        seconds: Some(args.seconds as f64),
        stop: None,
        drain: Duration::from_secs(args.drain),
        ack_timeout: Duration::from_secs(args.ack_timeout.max(1)),
        epoch: Instant::now(),
        sending: None,
        live: Arc::new(Live::default()),
    })
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome.report)?);
    } else {
        print!("{}", summary(&outcome.report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(user: &str, n: u64) -> Option<(String, String)> {
        Some((user.to_owned(), format!("{user}-{n}")))
    }

    #[test]
    fn events_in_order_are_clean() {
        let mut b = ClientBook::new("a");
        b.on_welcome(Some(10));
        for seq in 11..=15 {
            b.on_event(seq, msg("x", seq));
        }
        assert_eq!((b.duplicates, b.out_of_order, b.gaps()), (0, 0, 0));
        assert_eq!(b.since(), Some(15));
    }

    #[test]
    fn a_repeated_seq_is_a_duplicate_and_a_late_one_is_out_of_order() {
        let mut b = ClientBook::new("a");
        b.on_event(1, msg("x", 1));
        b.on_event(3, msg("x", 3));
        assert_eq!(b.gaps(), 1);
        b.on_event(3, msg("x", 3));
        assert_eq!(b.duplicates, 1);
        b.on_event(2, msg("x", 2));
        assert_eq!((b.out_of_order, b.gaps()), (1, 0));
    }

    #[test]
    fn since_is_the_floor_until_an_event_arrives() {
        let mut b = ClientBook::new("a");
        assert_eq!(b.since(), None);
        b.on_welcome(Some(42));
        b.on_welcome(Some(50)); // a later welcome does not move the floor
        assert_eq!(b.since(), Some(42));
        b.on_event(43, None);
        assert_eq!(b.since(), Some(43));
    }

    #[test]
    fn acks_and_pending() {
        let mut b = ClientBook::new("u1");
        let first = b.new_message(0.0);
        let second = b.new_message(0.5);
        assert_eq!(first, "u1-1");
        assert_eq!(b.pending(), vec!["u1-1".to_owned(), "u1-2".to_owned()]);
        assert!(b.on_ack(&first, 7, 0.2));
        assert!(!b.on_ack(&first, 7, 0.3), "a repeated ack is not a new one");
        assert_eq!(b.pending(), vec![second.clone()]);
        b.resent(&second, 2.0);
        assert_eq!(b.oldest_pending_send_s(), Some(2.0));
        assert!(!b.on_ack("other-1", 9, 1.0), "someone else's id is ignored");
        assert!(!b.on_ack("u1-x", 9, 1.0));
        assert!(b.on_ack(&second, 8, 3.0));
        assert_eq!(b.pending_count(), 0);
        assert_eq!(b.resends, 1);
    }

    #[test]
    fn an_id_acked_with_two_seqs_is_a_duplicate() {
        let mut b = ClientBook::new("u");
        let id = b.new_message(0.0);
        b.on_ack(&id, 5, 0.1);
        b.on_ack(&id, 6, 2.0);
        b.on_event(5, msg("u", 1));
        b.on_event(6, msg("u", 1));
        let report = analyse(&[b], 3.0);
        // The second ack seq, and the (user, id) stored under two seqs.
        assert_eq!(report.duplicates, 2);
        assert_eq!(report.missing, 0);
    }

    #[test]
    fn missing_counts_per_client_and_checks_the_acked_seq() {
        let mut a = ClientBook::new("a");
        let mut b = ClientBook::new("b");
        let ia = a.new_message(0.0);
        let ib = b.new_message(0.1);
        a.on_ack(&ia, 1, 0.2);
        b.on_ack(&ib, 2, 0.3);
        a.on_event(1, msg("a", 1));
        a.on_event(2, msg("b", 1));
        b.on_event(2, msg("b", 1)); // b never got a's message
        let report = analyse(&[a.clone(), b.clone()], 1.0);
        assert_eq!((report.sent, report.acked, report.unacked), (2, 2, 0));
        assert_eq!(report.missing, 1);
        // A different message under the acked seq is no delivery either.
        let mut c = ClientBook::new("c");
        c.on_event(1, msg("z", 9));
        c.on_event(2, msg("b", 1));
        let report = analyse(&[a, b, c], 1.0);
        assert_eq!(report.missing, 2);
        assert_eq!(report.duplicates, 0);
    }

    #[test]
    fn a_seq_handed_out_twice_is_a_conflict() {
        // a's message was acked as seq 5 by a primary that was then rewound; b's got 5 again.
        let mut a = ClientBook::new("a");
        let mut b = ClientBook::new("b");
        let ia = a.new_message(0.0);
        a.on_ack(&ia, 5, 0.1);
        let ib = b.new_message(1.0);
        b.on_ack(&ib, 5, 1.1);
        a.on_event(5, msg("a", 1));
        b.on_event(5, msg("a", 1));
        let report = analyse(&[a, b], 2.0);
        assert_eq!(report.seq_conflicts, 1);
        // Neither client got b's message under seq 5.
        assert_eq!(report.missing, 2);
        assert!(!report.clean());
    }

    #[test]
    fn steady_acks_are_no_outage() {
        let messages: Vec<(f64, Option<f64>)> = (0..100)
            .map(|i| {
                let t = i as f64 * 0.05;
                (t, Some(t + 0.02))
            })
            .collect();
        assert!(write_outages(&messages, 10.0).is_empty());
    }

    #[test]
    fn an_outage_runs_from_the_first_unacked_send_to_the_next_ack() {
        // Acks every 0.1 s until 1.0; a send at 1.05 waits until 11.3; sends in between too.
        let mut messages: Vec<(f64, Option<f64>)> = (0..10)
            .map(|i| (i as f64 * 0.1, Some(i as f64 * 0.1 + 0.01)))
            .collect();
        messages.push((1.05, Some(11.3)));
        messages.push((3.0, Some(11.31)));
        messages.push((6.0, Some(11.32)));
        messages.push((11.4, Some(11.45)));
        let outages = write_outages(&messages, 20.0);
        assert_eq!(outages.len(), 1, "{outages:?}");
        assert!((outages[0].start_s - 1.05).abs() < 1e-9);
        assert!((outages[0].duration_s - 10.25).abs() < 1e-9);
    }

    #[test]
    fn a_message_pending_at_an_ack_starts_the_outage_at_that_ack() {
        // m1 sent at 0 is still pending when m0's ack arrives at 0.5; next ack at 3.0.
        let messages = vec![(0.0, Some(3.0)), (0.1, Some(0.5))];
        let outages = write_outages(&messages, 5.0);
        assert_eq!(
            outages,
            vec![Outage {
                start_s: 0.5,
                duration_s: 2.5
            }]
        );
    }

    #[test]
    fn idle_time_without_pending_sends_is_no_outage_and_open_ends_count() {
        let messages = vec![(0.0, Some(0.1)), (5.0, Some(5.1)), (6.0, None)];
        let outages = write_outages(&messages, 9.0);
        assert_eq!(
            outages,
            vec![Outage {
                start_s: 6.0,
                duration_s: 3.0
            }]
        );
        // Exactly the threshold is not an outage.
        assert!(write_outages(&[(0.0, Some(1.0))], 2.0).is_empty());
    }

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10.0, 3.0, 0.0);
        assert_eq!((0..20).filter(|_| bucket.try_take(0.0)).count(), 10);
        assert!(!bucket.try_take(0.2));
        assert!(bucket.try_take(0.34));
        assert!(!bucket.try_take(0.35));
    }

    #[test]
    fn progress_is_delivered_when_nothing_is_pending_and_everyone_is_caught_up() {
        let mut p = Progress {
            clients: vec![(0, Some(10)), (0, Some(9))],
            max_acked_seq: Some(10),
        };
        assert!(!p.delivered());
        p.clients[1] = (1, Some(10));
        assert!(!p.delivered());
        p.clients[1] = (0, Some(10));
        assert!(p.delivered());
    }

    #[test]
    fn server_frames_parse() {
        let f: ServerFrame = serde_json::from_str(r#"{"type":"ack","id":"a-1","seq":3}"#).unwrap();
        assert!(matches!(f, ServerFrame::Ack { seq: 3, .. }));
        let f: ServerFrame = serde_json::from_str(r#"{"type":"stats","viewers":4}"#).unwrap();
        assert!(matches!(f, ServerFrame::Other));
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"message","seq":9,"id":"x","user":"bob","role":"viewer","text":"<b>","at":"2025-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert!(matches!(f, ServerFrame::Message { seq: 9, .. }));
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"welcome","channel":"test","broadcast":"broadcast1","user":null,"last_seq":0}"#,
        )
        .unwrap();
        assert!(matches!(f, ServerFrame::Welcome { user: None, .. }));
    }
}
