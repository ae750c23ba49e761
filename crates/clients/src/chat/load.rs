//! The load driver: K clients registered and spread over broadcasts, a shared send rate, the
//! run's phases, and the books collected at the end.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::book::{AckedMessage, ChatReport, ClientBook, acked_messages, analyse};
use super::bucket::TokenBucket;
use super::client::{Client, Live, Phase, Progress};
use super::net::{Assignment, Net};
use super::{SETUP_TIMEOUT, Target, USER_BURST, USER_RATE};
use anyhow::bail;
use tokio::sync::{mpsc, oneshot, watch};
use url::Url;

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

/// The report plus what a bench checks against the database.
#[derive(Debug, Clone)]
pub struct LoadOutcome {
    pub report: ChatReport,
    pub acked: Vec<AckedMessage>,
    /// Every account of the run starts with this (`cl<tag>_`).
    pub user_prefix: String,
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
    let per_client = per_client_rate(&opts)?;
    let net = Arc::new(Net::new(opts.target.clone())?);
    let broadcasts = net.discover().await?;
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
    let mut initial_broadcasts: Vec<String> = broadcasts
        .iter()
        .take(opts.clients)
        .map(|a| a.broadcast.clone())
        .collect();
    initial_broadcasts.sort();
    let tag = run_tag();
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let (ready_tx, ready_rx) = mpsc::unbounded_channel();
    let progress = Arc::new(Mutex::new(Progress {
        clients: vec![(0, None); opts.clients],
        max_acked_seq: None,
    }));
    let crowd = Crowd {
        opts: &opts,
        broadcasts: &broadcasts,
        tag: &tag,
        interval_s: 1.0 / per_client,
        phase: &phase_rx,
        progress: &progress,
    };
    let tasks = crowd.spawn(ready_tx)?;
    if let Err(e) = wait_connected(opts.clients, ready_rx).await {
        let _ = phase_tx.send(Phase::Done);
        for t in &tasks {
            t.abort();
        }
        return Err(e);
    }
    let sending_from_s = opts.epoch.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Sending);
    if let Some(tx) = opts.sending.take() {
        let _ = tx.send(());
    }
    send_until_stopped(opts.stop.take(), opts.seconds).await;
    let sending_until_s = opts.epoch.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Draining);
    let delivered = drain(&progress, opts.drain).await;
    let end_s = opts.epoch.elapsed().as_secs_f64();
    let _ = phase_tx.send(Phase::Done);
    let books = collect(tasks).await?;
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

/// Checks the options; each client's share of the send rate.
fn per_client_rate(opts: &LoadOptions) -> anyhow::Result<f64> {
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
    Ok(per_client)
}

/// What every client of one run shares.
struct Crowd<'a> {
    opts: &'a LoadOptions,
    broadcasts: &'a [Assignment],
    tag: &'a str,
    interval_s: f64,
    phase: &'a watch::Receiver<Phase>,
    progress: &'a Arc<Mutex<Progress>>,
}

impl Crowd<'_> {
    /// One task per client, spread over the broadcasts, each from its own address and with its
    /// own offset in the send schedule.
    fn spawn(
        &self,
        ready: mpsc::UnboundedSender<usize>,
    ) -> anyhow::Result<Vec<tokio::task::JoinHandle<ClientBook>>> {
        let opts = self.opts;
        let first_lb = opts.target.lbs.first();
        let mut tasks = Vec::new();
        for index in 0..opts.clients {
            let user = format!("{}{index}", user_prefix(self.tag));
            let client = Client {
                index,
                book: ClientBook::new(&user),
                password: format!("pw-{}-{}", run_tag(), run_tag()),
                session: None,
                assignment: self.broadcasts[index % self.broadcasts.len()].clone(),
                failed: HashMap::new(),
                net: Arc::new(Net::from_address(
                    opts.target.clone(),
                    first_lb.and_then(|lb| crate::client_address::simulated(lb, index)),
                )?),
                epoch: opts.epoch,
                phase: self.phase.clone(),
                progress: self.progress.clone(),
                live: opts.live.clone(),
                ready: Some(ready.clone()),
                bucket: TokenBucket::new(USER_BURST, USER_RATE, 0.0),
                interval_s: self.interval_s,
                next_send_s: None,
                offset_s: self.interval_s * index as f64 / opts.clients as f64,
                ack_timeout: opts.ack_timeout,
                retry_at: BTreeMap::new(),
            };
            tasks.push(tokio::spawn(client.run()));
        }
        Ok(tasks)
    }
}

/// Every client connected (so each one's history starts before the first message).
async fn wait_connected(
    clients: usize,
    mut ready: mpsc::UnboundedReceiver<usize>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    let mut connected = 0;
    while connected < clients {
        match tokio::time::timeout_at(deadline, ready.recv()).await {
            Ok(Some(_)) => connected += 1,
            _ => bail!(
                "only {connected} of {clients} chat clients could register and connect within \
                 {} s (is the chat up? RUST_LOG=streaming_clients=info shows why)",
                SETUP_TIMEOUT.as_secs()
            ),
        }
    }
    Ok(())
}

/// The sending phase: until `seconds` pass or `stop` turns true (or its sender goes away).
async fn send_until_stopped(mut stop: Option<watch::Receiver<bool>>, seconds: Option<f64>) {
    let deadline = seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    loop {
        if stop.as_ref().is_some_and(|s| *s.borrow()) {
            break;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
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
}

/// Waits up to `limit` for every ack and every event to reach every client.
async fn drain(progress: &Mutex<Progress>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    // Let in-flight sends reach the server before judging.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while Instant::now() < deadline {
        if progress.lock().map(|p| p.delivered()).unwrap_or(false) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Every client's book, once its task has stopped.
async fn collect(
    tasks: Vec<tokio::task::JoinHandle<ClientBook>>,
) -> anyhow::Result<Vec<ClientBook>> {
    let mut books = Vec::new();
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(15), task).await {
            Ok(Ok(book)) => books.push(book),
            Ok(Err(e)) => bail!("chat client task failed: {e}"),
            Err(_) => bail!("a chat client did not stop within 15 s"),
        }
    }
    Ok(books)
}
