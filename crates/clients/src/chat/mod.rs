//! `streamctl chat`: a chat load client that checks what the chat promises.
//!
//! K clients, each logged in with its own freshly registered account, are spread over at least
//! two broadcasts (the LB's `/api/assign?exclude=`) and send R messages per second in total over
//! the chat WebSocket (`wss://<broadcast>/api/chat/<channel>`, `streaming_core::chat_protocol`). Every message carries
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

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use url::Url;

mod book;
mod bucket;
mod client;
mod load;
mod net;

pub use book::{
    AckedMessage, ChatReport, ClientBook, Outage, Sent, acked_messages, analyse, write_outages,
};
pub use bucket::TokenBucket;

pub use client::Live;
pub use load::{LoadOptions, LoadOutcome, load, user_prefix};
pub use net::{Assignment, Net, Ws, close_socket};

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
    /// Also write every acked message (user, client id, seq) and the run's account prefix to
    /// this file as JSON, for checks against the database (the restore drill).
    #[arg(long)]
    pub acked: Option<PathBuf>,
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
        let config = crate::local::any_config(state);
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
                .and_then(|c| c.cluster.default_channel().map(|c| c.name.clone()))
                .unwrap_or_else(|| "test".to_owned()),
        };
        Ok(Self {
            lbs,
            ca: ca.map_or_else(|| state.join("tls/ca.crt"), Path::to_owned),
            channel,
        })
    }
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
    if let Some(path) = &args.acked {
        let acked: Vec<serde_json::Value> = outcome
            .acked
            .iter()
            .map(|m| serde_json::json!({"user": m.user, "id": m.id, "seq": m.seq}))
            .collect();
        let doc = serde_json::json!({"user_prefix": outcome.user_prefix, "acked": acked});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome.report)?);
    } else {
        print!("{}", summary(&outcome.report));
    }
    Ok(())
}
