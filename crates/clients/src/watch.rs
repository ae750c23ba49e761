//! `streamctl watch`: a real HLS viewer, many at once, with a playback buffer model.
//!
//! Each simulated viewer enters through the LB like a browser would (redirect + token), reads the
//! master playlist, picks a rendition, starts three segments behind the live edge once one
//! segment is buffered, and then downloads segment after segment while a play head advances in
//! real time. A stall is the play head reaching the end of the buffer. A request without a first
//! byte within one target duration is a failure: the viewer asks an LB for another broadcast
//! (`/api/assign?exclude=`) and continues with the same next segment there, as the page does.
//! Like the page, a viewer knows every LB (from `--lb`, the local cluster's config and the
//! `/api/cluster` of the broadcast it lands on), gives each one [`LB_ATTEMPT`] to answer (a hung
//! LB accepts the connection and says nothing), moves on from one that failed, and never gives
//! up while the run lasts.
//!
//! Everything measured here is what a viewer would feel; the figures feed the README and docs/.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use streaming_hls::{ParsedMedia, ParsedVariant, parse_master, parse_media, unix_now_ms};
use url::Url;

/// Segments a viewer stays behind the live edge when it starts (hls.js's default hold-back).
pub const START_BEHIND_SEGMENTS: u64 = 3;
/// Largest segment or playlist body we accept.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// Redirect hops followed when entering through the LB.
const MAX_REDIRECTS: usize = 5;
/// One LB's time to connect and answer, entry or `/api/assign`: catches a hung LB quickly, and
/// a healthy one answers in milliseconds.
pub const LB_ATTEMPT: Duration = Duration::from_millis(1500);
/// Longest pause between two rounds over every LB when none gave a broadcast.
const MAX_BACKOFF: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Entry URL (the LB's `/live/<channel>/master.m3u8`) where every viewer enters; by
    /// default the local cluster's, through each of its LBs in turn (viewer i through LB i mod n).
    pub url: Option<String>,
    /// Another LB to enter and fail over through (base URL, repeatable); the broadcast a viewer
    /// lands on names the others (`/api/cluster`). Defaults to the local cluster's LBs.
    #[arg(long = "lb", value_name = "URL")]
    pub lb: Vec<String>,
    /// State directory of `streamctl up` (for the default URL and the local CA).
    #[arg(long, default_value = ".streamctl")]
    pub state: PathBuf,
    /// CA certificate to trust; defaults to `<state>/tls/ca.crt`.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// How long to watch, after startup.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Simulated viewers, each with its own token, buffer and failover.
    #[arg(long, default_value_t = 1)]
    pub viewers: usize,
    /// `auto` (throughput-based ABR), `all` (viewer i takes rendition i mod n), or a rendition
    /// name such as `360p`.
    #[arg(long, default_value = "auto")]
    pub renditions: String,
    /// Start viewers on these broadcasts (host names, comma-separated; viewer i takes the
    /// i-th modulo their number) instead of the LB's choice. They still fail over through the LB.
    #[arg(long)]
    pub pin: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What one viewer experienced.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ViewerReport {
    pub viewer: usize,
    pub startup_s: f64,
    pub stalls: u64,
    pub stall_s: f64,
    /// Segments that could not be had from any broadcast (a hole the viewer saw or skipped).
    pub errors: u64,
    /// Requests that failed or timed out (each one triggered a failover).
    pub request_failures: u64,
    pub failovers: u64,
    /// LBs that failed to answer within [`LB_ATTEMPT`] (entry or `/api/assign`).
    pub lb_failures: u64,
    /// Longest time from a failed request to the next broadcast (asking the LBs in turn).
    pub reassign_max_s: f64,
    /// Rendition changes after the first choice.
    pub switches: u64,
    pub segments: u64,
    /// Segments played that began with EXT-X-DISCONTINUITY (a source switch or a slate): a
    /// picture change the viewer sees, though not a stall.
    pub discontinuities: u64,
    /// Mean of now − PROGRAM-DATE-TIME at the play head, sampled at every segment.
    pub latency_s: f64,
    pub latency_max_s: f64,
    pub renditions: BTreeSet<String>,
    pub broadcasts: BTreeSet<String>,
    /// Set when the viewer could not start at all.
    pub fatal: Option<String>,
}

/// The whole run: sums over viewers, startup and latency averaged.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchReport {
    pub viewers: usize,
    pub seconds: u64,
    pub startup_s: f64,
    pub stalls: u64,
    pub stall_s: f64,
    pub errors: u64,
    pub request_failures: u64,
    pub failovers: u64,
    pub lb_failures: u64,
    pub reassign_max_s: f64,
    pub switches: u64,
    pub segments: u64,
    pub discontinuities: u64,
    pub latency_s: f64,
    pub latency_max_s: f64,
    pub renditions: BTreeSet<String>,
    pub broadcasts: BTreeSet<String>,
    pub per_viewer: Vec<ViewerReport>,
}

impl WatchReport {
    fn from_viewers(seconds: u64, per_viewer: Vec<ViewerReport>) -> Self {
        let n = per_viewer.len().max(1) as f64;
        let mut report = WatchReport {
            viewers: per_viewer.len(),
            seconds,
            ..Default::default()
        };
        for v in &per_viewer {
            report.startup_s += v.startup_s / n;
            report.latency_s += v.latency_s / n;
            report.latency_max_s = report.latency_max_s.max(v.latency_max_s);
            report.stalls += v.stalls;
            report.stall_s += v.stall_s;
            report.errors += v.errors + u64::from(v.fatal.is_some());
            report.request_failures += v.request_failures;
            report.failovers += v.failovers;
            report.lb_failures += v.lb_failures;
            report.reassign_max_s = report.reassign_max_s.max(v.reassign_max_s);
            report.switches += v.switches;
            report.segments += v.segments;
            report.discontinuities += v.discontinuities;
            report.renditions.extend(v.renditions.iter().cloned());
            report.broadcasts.extend(v.broadcasts.iter().cloned());
        }
        report.per_viewer = per_viewer;
        report
    }
}

/// The playback buffer: media seconds downloaded vs. media seconds played.
///
/// Pure and clock-injected so the stall accounting is unit-tested without a network.
#[derive(Debug, Clone)]
pub struct BufferModel {
    buffered_s: f64,
    position_s: f64,
    playing: bool,
    started: bool,
    last_update: Instant,
    stall_started: Option<Instant>,
    pub stalls: u64,
    pub stall_s: f64,
}

impl BufferModel {
    pub fn new(now: Instant) -> Self {
        Self {
            buffered_s: 0.0,
            position_s: 0.0,
            playing: false,
            started: false,
            last_update: now,
            stall_started: None,
            stalls: 0,
            stall_s: 0.0,
        }
    }

    /// Advances the play head to `now`; a play head that reaches the end of the buffer stalls.
    pub fn advance(&mut self, now: Instant) {
        if self.playing {
            let elapsed = now
                .saturating_duration_since(self.last_update)
                .as_secs_f64();
            let room = self.buffered_s - self.position_s;
            if elapsed >= room {
                self.position_s = self.buffered_s;
                self.playing = false;
                self.stalls += 1;
                self.stall_started =
                    Some(self.last_update + Duration::from_secs_f64(room.max(0.0)));
            } else {
                self.position_s += elapsed;
            }
        }
        self.last_update = now;
    }

    /// A segment of `duration_s` arrived; playback starts (or resumes) as soon as there is media.
    pub fn add_segment(&mut self, now: Instant, duration_s: f64) {
        self.advance(now);
        self.buffered_s += duration_s;
        if !self.playing {
            if let Some(since) = self.stall_started.take() {
                self.stall_s += now.saturating_duration_since(since).as_secs_f64();
            }
            self.playing = true;
            self.started = true;
        }
    }

    /// Closes the run: a stall still going on counts until `now`.
    pub fn finish(&mut self, now: Instant) {
        self.advance(now);
        if let Some(since) = self.stall_started.take() {
            self.stall_s += now.saturating_duration_since(since).as_secs_f64();
        }
    }

    pub fn position_s(&self) -> f64 {
        self.position_s
    }

    pub fn buffer_ahead_s(&self) -> f64 {
        self.buffered_s - self.position_s
    }

    pub fn started(&self) -> bool {
        self.started
    }
}

/// Where a viewer currently gets its media from.
#[derive(Debug, Clone)]
struct Assignment {
    /// Origin of the broadcast, e.g. `https://127.77.2.1:8443`.
    base: Url,
    broadcast: String,
    token: String,
}

/// Rewrites a URL to another broadcast's origin and token, keeping its path: segment and
/// playlist paths are the same on every broadcast.
fn rebase(url: &Url, assignment: &Assignment) -> Url {
    let mut out = assignment.base.clone();
    out.set_path(url.path());
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "t")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    {
        let mut query = out.query_pairs_mut();
        query.clear();
        for (k, v) in &pairs {
            query.append_pair(k, v);
        }
        query.append_pair("t", &assignment.token);
    }
    out
}

fn token_of(url: &Url) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == "t")
        .map(|(_, v)| v.into_owned())
}

fn origin_of(url: &Url) -> Url {
    let mut base = url.clone();
    base.set_path("/");
    base.set_query(None);
    base.set_fragment(None);
    base
}

struct Viewer {
    index: usize,
    client: reqwest::Client,
    entry: Url,
    /// LB base URLs, for the entry and `/api/assign`.
    lbs: Vec<Url>,
    /// Index in `lbs` of the LB asked first: the last one that answered.
    next_lb: usize,
    channel: String,
    rendition_mode: String,
    pin: Option<Url>,
    /// Broadcasts that failed this viewer recently: all are excluded at the next assignment,
    /// since an LB may not have noticed a death yet.
    failed: std::collections::HashMap<String, Instant>,
    report: ViewerReport,
}

/// LBs a viewer keeps in its list (what `/api/cluster` says is added to what it knew).
const MAX_LBS: usize = 16;

/// How long a broadcast that failed a viewer stays excluded from its reassignments.
const FAILED_MEMORY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("no first byte within {0:?}")]
    Timeout(Duration),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Transport(String),
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
}

impl Viewer {
    /// GET with a time-to-first-byte limit and a whole-body limit.
    async fn fetch(&self, url: &Url, first_byte: Duration) -> Result<bytes::Bytes, FetchError> {
        let response = tokio::time::timeout(first_byte, self.client.get(url.clone()).send())
            .await
            .map_err(|_| FetchError::Timeout(first_byte))?
            .map_err(|e| FetchError::Transport(e.to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        if response.content_length().unwrap_or(0) > MAX_BODY_BYTES as u64 {
            return Err(FetchError::TooLarge);
        }
        let body = tokio::time::timeout(first_byte * 4, response.bytes())
            .await
            .map_err(|_| FetchError::Timeout(first_byte * 4))?
            .map_err(|e| FetchError::Transport(e.to_string()))?;
        if body.len() > MAX_BODY_BYTES {
            return Err(FetchError::TooLarge);
        }
        Ok(body)
    }

    /// Enters through the LBs in turn (the entry URL's path and query on each), the last one
    /// that answered first, until one lets us in or `give_up` passes.
    async fn enter(&mut self, give_up: Instant) -> anyhow::Result<(Assignment, Url)> {
        let mut pause = Duration::from_millis(250);
        loop {
            let mut why = anyhow::anyhow!("no LB to enter through");
            for i in 0..self.lbs.len() {
                let index = (self.next_lb + i) % self.lbs.len();
                let mut url = self.lbs[index].join(self.entry.path())?;
                url.set_query(self.entry.query());
                match self.enter_through(url).await {
                    Ok(found) => {
                        self.next_lb = index;
                        return Ok(found);
                    }
                    Err(e) => {
                        self.report.lb_failures += 1;
                        tracing::warn!(viewer = self.index, lb = %self.lbs[index], "entry failed: {e:#}");
                        why = e;
                    }
                }
            }
            if Instant::now() + pause > give_up {
                return Err(why.context("no LB let us in"));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    /// Follows one LB's redirect by hand to learn the broadcast's origin and the token.
    async fn enter_through(&self, mut url: Url) -> anyhow::Result<(Assignment, Url)> {
        for hop in 0..MAX_REDIRECTS {
            // The first answer is the LB's; a hung LB must not hold us longer.
            let limit = if hop == 0 {
                LB_ATTEMPT
            } else {
                Duration::from_secs(5)
            };
            let response = tokio::time::timeout(limit, self.client.get(url.clone()).send())
                .await
                .with_context(|| format!("{url}: no answer within {limit:?}"))??;
            if response.status().is_redirection() {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .context("redirect without Location")?;
                url = url.join(location)?;
                continue;
            }
            if !response.status().is_success() {
                bail!("{url} answered {}", response.status());
            }
            let token = token_of(&url).context("the LB's redirect carries no token")?;
            return Ok((
                Assignment {
                    base: origin_of(&url),
                    broadcast: String::new(),
                    token,
                },
                url,
            ));
        }
        bail!("more than {MAX_REDIRECTS} redirects from {url}")
    }

    /// A broadcast's host name (what `/api/assign?exclude=` takes), from its `/api/cluster`,
    /// which also names every LB: the ones we did not know yet join our list.
    async fn cluster_info(&mut self, base: &Url) -> anyhow::Result<String> {
        #[derive(serde::Deserialize)]
        struct ClusterInfo {
            broadcast: String,
            #[serde(default)]
            lbs: Vec<String>,
        }
        let body = self
            .fetch(&base.join("/api/cluster")?, Duration::from_secs(5))
            .await
            .with_context(|| format!("{base}api/cluster"))?;
        let info = serde_json::from_slice::<ClusterInfo>(&body)?;
        for lb in info.lbs.iter().filter_map(|u| Url::parse(u).ok()) {
            let lb = origin_of(&lb);
            if self.lbs.len() < MAX_LBS && !self.lbs.contains(&lb) {
                self.lbs.push(lb);
            }
        }
        Ok(info.broadcast)
    }

    /// Asks the LBs in turn, the last one that answered first, for a broadcast other than the
    /// ones that failed recently.
    async fn reassign(&mut self, current: &Assignment) -> Option<Assignment> {
        let now = Instant::now();
        self.failed.insert(current.broadcast.clone(), now);
        self.failed
            .retain(|_, at| now.duration_since(*at) < FAILED_MEMORY);
        let mut exclude: Vec<&str> = self.failed.keys().map(String::as_str).collect();
        exclude.sort_unstable();
        let exclude = exclude.join(",");
        #[derive(serde::Deserialize)]
        struct Assign {
            broadcast: String,
            base_url: String,
            token: String,
        }
        for i in 0..self.lbs.len() {
            let index = (self.next_lb + i) % self.lbs.len();
            let Ok(mut url) = self.lbs[index].join("/api/assign") else {
                continue;
            };
            url.query_pairs_mut()
                .append_pair("channel", &self.channel)
                .append_pair("exclude", &exclude)
                .append_pair("t", &current.token);
            let answer = match tokio::time::timeout(LB_ATTEMPT, self.fetch(&url, LB_ATTEMPT)).await
            {
                Ok(Ok(body)) => serde_json::from_slice::<Assign>(&body)
                    .map_err(|e| e.to_string())
                    .and_then(|a| {
                        let base = Url::parse(&a.base_url).map_err(|e| e.to_string())?;
                        Ok((a, base))
                    }),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {LB_ATTEMPT:?}")),
            };
            match answer {
                Ok((answer, base)) => {
                    self.next_lb = index;
                    return Some(Assignment {
                        base: origin_of(&base),
                        broadcast: answer.broadcast,
                        token: answer.token,
                    });
                }
                Err(e) => {
                    self.report.lb_failures += 1;
                    tracing::warn!(viewer = self.index, lb = %self.lbs[index], "assign failed: {e}");
                }
            }
        }
        // Nothing left outside the exclusions: they may have recovered, so forget them.
        self.failed.clear();
        None
    }

    fn choose_variant(&self, variants: &[ParsedVariant], throughput_bps: Option<f64>) -> usize {
        // Variants come best first from our master playlist; keep that order explicit.
        let mut order: Vec<usize> = (0..variants.len()).collect();
        order.sort_by_key(|i| std::cmp::Reverse(variants[*i].bandwidth));
        match self.rendition_mode.as_str() {
            "all" => order[self.index % order.len()],
            "auto" => match throughput_bps {
                // Highest rendition that fits 70 % of the measured throughput, else the lowest.
                Some(bps) => order
                    .iter()
                    .copied()
                    .find(|i| (variants[*i].bandwidth as f64) < bps * 0.7)
                    .unwrap_or(*order.last().unwrap_or(&0)),
                None => order[0],
            },
            name => variants
                .iter()
                .position(|v| v.uri.split('/').next() == Some(name))
                .unwrap_or(order[0]),
        }
    }

    async fn run(mut self, seconds: u64) -> ViewerReport {
        let started = Instant::now();
        if let Err(e) = self.watch(started, seconds).await {
            self.report.fatal = Some(format!("{e:#}"));
        }
        self.report
    }

    async fn watch(&mut self, started: Instant, seconds: u64) -> anyhow::Result<()> {
        let (mut assignment, master_url) = self
            .enter(started + Duration::from_secs(30 + seconds))
            .await?;
        if let Some(pin) = self.pin.clone() {
            assignment.base = pin;
        }
        assignment.broadcast = self.cluster_info(&assignment.base.clone()).await?;
        let mut master_url = rebase(&master_url, &assignment);
        // Like the page: the plain master (no content-steering pathways); failover goes through
        // the LB instead.
        master_url.query_pairs_mut().append_pair("steering", "0");
        let master_body = self.fetch(&master_url, Duration::from_secs(5)).await?;
        let variants = parse_master(std::str::from_utf8(&master_body)?)?;
        if variants.is_empty() {
            bail!("master playlist lists no variant");
        }
        let name_of = |v: &ParsedVariant| v.uri.split('/').next().unwrap_or_default().to_owned();
        let mut variant = self.choose_variant(&variants, None);
        let mut media_url = master_url.join(&variants[variant].uri)?;
        self.report.broadcasts.insert(assignment.broadcast.clone());

        let mut buffer = BufferModel::new(started);
        let mut latencies: Vec<f64> = Vec::new();
        // seq -> (media position where it starts, its PDT) for latency at the play head.
        let mut timeline: Vec<(f64, f64, Option<u64>)> = Vec::new();
        let mut next_seq: Option<u64> = None;
        let mut target = Duration::from_secs(2);
        let mut deadline: Option<Instant> = None;
        let mut playlist: Option<ParsedMedia> = None;
        let mut failures_this_segment = 0u32;

        loop {
            if let Some(end) = deadline
                && Instant::now() >= end
            {
                break;
            }
            if deadline.is_none() && started.elapsed() > Duration::from_secs(30 + seconds) {
                bail!("no segment could be played within 30 s");
            }
            // Find the next segment in the current playlist, refreshing it when needed.
            let listed = playlist.as_ref().and_then(|p| {
                next_seq
                    .and_then(|n| p.segments.iter().find(|s| s.seq == n))
                    .cloned()
            });
            let segment = match listed {
                Some(segment) => segment,
                None => {
                    if playlist.is_some() {
                        // Not listed yet: poll at half a target duration, like a player.
                        tokio::time::sleep(target / 2).await;
                    }
                    match self.fetch(&rebase(&media_url, &assignment), target).await {
                        Ok(body) => {
                            let parsed = parse_media(std::str::from_utf8(&body)?)?;
                            target = Duration::from_secs_f64(parsed.target_duration_s.max(1.0));
                            // Start 3 segments behind the live edge; a playlist that does not
                            // list 3 yet (a channel that just went live) is waited for, as a
                            // player holding back 3 segments would.
                            if next_seq.is_none()
                                && parsed.segments.len() as u64 >= START_BEHIND_SEGMENTS
                            {
                                let last = parsed.last_seq().context("empty media playlist")?;
                                next_seq = Some(last + 1 - START_BEHIND_SEGMENTS);
                            }
                            if let (Some(n), Some(first)) = (next_seq, parsed.segments.first())
                                && n < first.seq
                            {
                                // Fell out of the window (a long outage): skip ahead, and say so.
                                self.report.errors += first.seq - n;
                                next_seq = Some(first.seq);
                            }
                            playlist = Some(parsed);
                            failures_this_segment = 0;
                        }
                        Err(e) => {
                            self.on_failure(&mut assignment, &e, &mut failures_this_segment)
                                .await;
                            // The next broadcast's playlist is asked for at once, as the page's
                            // player retries a timed-out playlist there with no delay; the one
                            // kept came from the broadcast that failed.
                            playlist = None;
                        }
                    }
                    continue;
                }
            };
            let segment_url = rebase(&media_url.join(&segment.uri)?, &assignment);
            let t0 = Instant::now();
            match self.fetch(&segment_url, target).await {
                Ok(body) => {
                    if body.first() != Some(&0x47) {
                        bail!("segment {} is not MPEG-TS", segment.seq);
                    }
                    let now = Instant::now();
                    let start_pos = buffer.buffer_ahead_s() + buffer.position_s();
                    let stalls_before = buffer.stalls;
                    buffer.advance(now);
                    let ahead_s = buffer.buffer_ahead_s();
                    buffer.add_segment(now, segment.duration_s);
                    tracing::debug!(viewer = self.index, broadcast = %assignment.broadcast,
                        seq = segment.seq, fetch_ms = now.duration_since(t0).as_millis() as u64,
                        ahead_s, "segment");
                    if buffer.stalls > stalls_before {
                        tracing::info!(viewer = self.index, broadcast = %assignment.broadcast,
                            seq = segment.seq, "stalled until this segment arrived");
                    }
                    timeline.push((start_pos, segment.duration_s, segment.program_date_time_ms));
                    if deadline.is_none() {
                        self.report.startup_s = now.duration_since(started).as_secs_f64();
                        deadline = Some(now + Duration::from_secs(seconds));
                    }
                    self.report.segments += 1;
                    self.report.discontinuities += u64::from(segment.discontinuity);
                    self.report.renditions.insert(name_of(&variants[variant]));
                    next_seq = Some(segment.seq + 1);
                    failures_this_segment = 0;
                    if let Some(latency) = latency_at(&timeline, buffer.position_s()) {
                        latencies.push(latency);
                    }
                    // ABR: pick again with the throughput of this download.
                    let elapsed = now.duration_since(t0).as_secs_f64().max(1e-3);
                    let choice =
                        self.choose_variant(&variants, Some(body.len() as f64 * 8.0 / elapsed));
                    if choice != variant {
                        variant = choice;
                        media_url = master_url.join(&variants[variant].uri)?;
                        playlist = None;
                        self.report.switches += 1;
                    }
                }
                Err(e) => {
                    self.on_failure(&mut assignment, &e, &mut failures_this_segment)
                        .await
                }
            }
        }
        buffer.finish(Instant::now());
        self.report.stalls = buffer.stalls;
        self.report.stall_s = buffer.stall_s;
        if !latencies.is_empty() {
            self.report.latency_s = latencies.iter().sum::<f64>() / latencies.len() as f64;
            self.report.latency_max_s = latencies.iter().copied().fold(0.0, f64::max);
        }
        Ok(())
    }

    /// A request failed: ask the LBs for another broadcast. Never gives up: with no answer
    /// from any LB, waits a little longer each time (at most [`MAX_BACKOFF`]) and the caller
    /// tries again, until the run ends.
    async fn on_failure(
        &mut self,
        assignment: &mut Assignment,
        error: &FetchError,
        failures_in_a_row: &mut u32,
    ) {
        self.report.request_failures += 1;
        *failures_in_a_row += 1;
        tracing::warn!(viewer = self.index, broadcast = %assignment.broadcast, "request failed: {error}");
        let asked = Instant::now();
        match self.reassign(assignment).await {
            Some(next) => {
                self.report.reassign_max_s = self
                    .report
                    .reassign_max_s
                    .max(asked.elapsed().as_secs_f64());
                self.report.failovers += 1;
                self.report.broadcasts.insert(next.broadcast.clone());
                *assignment = next;
            }
            None => {
                let exponent = failures_in_a_row.saturating_sub(1).min(5);
                let pause = Duration::from_millis(250) * 2u32.pow(exponent);
                tokio::time::sleep(pause.min(MAX_BACKOFF)).await;
            }
        }
    }
}

/// now − PROGRAM-DATE-TIME of the media at the play head, in seconds.
fn latency_at(timeline: &[(f64, f64, Option<u64>)], position_s: f64) -> Option<f64> {
    let (start, _, pdt) = timeline
        .iter()
        .rev()
        .find(|(start, duration, _)| position_s >= *start && position_s <= start + duration)?;
    let pdt_ms = (*pdt)? as f64 + (position_s - start) * 1000.0;
    Some((unix_now_ms() as f64 - pdt_ms) / 1000.0)
}

/// Builds the HTTPS client a viewer uses: trusts the cluster CA, no automatic redirects (the
/// viewer follows them itself to learn its broadcast), leaving from `local` if given.
fn viewer_client(
    ca: &std::path::Path,
    local: Option<std::net::IpAddr>,
) -> anyhow::Result<reqwest::Client> {
    streaming_core::tls::peer_client_from(ca, Duration::from_secs(10), local)
        .with_context(|| format!("loading CA {}", ca.display()))
}

/// The local cluster's entry URL (through its first LB) and every LB, from the configs
/// `streamctl up` wrote.
fn local_defaults(state: &std::path::Path) -> anyhow::Result<(String, Vec<String>)> {
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
    let config = streaming_core::config::HostConfig::load(&entry.path())?;
    let lbs = config.cluster.lb_urls();
    let first = lbs.first().context("cluster has no LB")?;
    let channel = config
        .cluster
        .channels
        .first()
        .context("cluster has no channel")?;
    Ok((format!("{first}/live/{}/master.m3u8", channel.name), lbs))
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let report = watch(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} viewer(s), {} s: startup {:.2} s, {} stalls ({:.2} s), {} errors, {} request failures, {} failovers, {} switches, {} segments, latency {:.2} s (max {:.2} s)",
            report.viewers,
            report.seconds,
            report.startup_s,
            report.stalls,
            report.stall_s,
            report.errors,
            report.request_failures,
            report.failovers,
            report.switches,
            report.segments,
            report.latency_s,
            report.latency_max_s
        );
        println!(
            "renditions: {}; broadcasts: {}",
            report
                .renditions
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            report
                .broadcasts
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        for v in report.per_viewer.iter().filter(|v| v.fatal.is_some()) {
            println!(
                "viewer {}: {}",
                v.viewer,
                v.fatal.as_deref().unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Runs the viewers and gathers their reports.
pub async fn watch(args: &WatchArgs) -> anyhow::Result<WatchReport> {
    let ca = args
        .ca
        .clone()
        .unwrap_or_else(|| args.state.join("tls/ca.crt"));
    let (entry, defaults) = match &args.url {
        Some(url) => (url.clone(), Vec::new()),
        None => local_defaults(&args.state)?,
    };
    let entry = Url::parse(&entry).with_context(|| format!("bad URL {entry}"))?;
    // The entry's LB first, then the others.
    let mut lbs = vec![origin_of(&entry)];
    for lb in args.lb.iter().chain(&defaults) {
        let lb = origin_of(&Url::parse(lb).with_context(|| format!("bad LB URL {lb}"))?);
        if !lbs.contains(&lb) {
            lbs.push(lb);
        }
    }
    let channel = entry
        .path_segments()
        .and_then(|mut s| {
            let first = s.next();
            if first == Some("live") {
                s.next().map(str::to_owned)
            } else {
                None
            }
        })
        .unwrap_or_else(|| "test".to_owned());
    let pins: Vec<Url> = match &args.pin {
        Some(names) => names
            .split(',')
            .filter(|n| !n.is_empty())
            .map(|name| pin_url(&args.state, name))
            .collect::<anyhow::Result<_>>()?,
        None => Vec::new(),
    };
    let mut tasks = Vec::new();
    for index in 0..args.viewers.max(1) {
        let viewer = Viewer {
            index,
            client: viewer_client(&ca, crate::client_address::simulated(&entry, index))?,
            entry: entry.clone(),
            lbs: lbs.clone(),
            // A given URL is where every viewer enters; without one, viewers spread over the
            // LBs as browsers do over the addresses of the site's name.
            next_lb: if args.url.is_some() {
                0
            } else {
                index % lbs.len()
            },
            channel: channel.clone(),
            rendition_mode: args.renditions.clone(),
            pin: (!pins.is_empty()).then(|| pins[index % pins.len()].clone()),
            failed: Default::default(),
            report: ViewerReport {
                viewer: index,
                ..Default::default()
            },
        };
        let seconds = args.seconds;
        tasks.push(tokio::spawn(viewer.run(seconds)));
        // Spread starts a little, as real viewers arrive.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.context("viewer task panicked")?);
    }
    Ok(WatchReport::from_viewers(args.seconds, reports))
}

/// The base URL of a broadcast named in the local cluster's config.
fn pin_url(state: &std::path::Path, name: &str) -> anyhow::Result<Url> {
    let config = streaming_core::config::HostConfig::load(
        &state.join("config").join(format!("{name}.json")),
    )
    .with_context(|| format!("--pin {name}: no such host in {}", state.display()))?;
    Ok(origin_of(&Url::parse(&config.me().url)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_stall_when_segments_arrive_in_time() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        // Three segments at once (start 3 behind live), then one every 2 s.
        for _ in 0..3 {
            b.add_segment(t0, 2.0);
        }
        for i in 1..=10 {
            b.add_segment(t0 + Duration::from_secs(2 * i), 2.0);
        }
        b.finish(t0 + Duration::from_secs(20));
        assert_eq!((b.stalls, b.stall_s), (0, 0.0));
        assert!((b.position_s() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn a_late_segment_is_one_stall_of_the_right_length() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        b.add_segment(t0, 2.0);
        // Next segment arrives 3.5 s later: the play head ran dry at 2 s, stalled 1.5 s.
        b.add_segment(t0 + Duration::from_millis(3500), 2.0);
        b.finish(t0 + Duration::from_millis(4000));
        assert_eq!(b.stalls, 1);
        assert!((b.stall_s - 1.5).abs() < 1e-6, "{}", b.stall_s);
        assert!(b.started());
    }

    #[test]
    fn a_stall_still_going_at_the_end_is_counted() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        b.add_segment(t0, 2.0);
        b.finish(t0 + Duration::from_secs(5));
        assert_eq!(b.stalls, 1);
        assert!((b.stall_s - 3.0).abs() < 1e-6);
    }

    #[test]
    fn nothing_plays_before_the_first_segment() {
        let t0 = Instant::now();
        let mut b = BufferModel::new(t0);
        b.finish(t0 + Duration::from_secs(5));
        assert_eq!((b.stalls, b.stall_s, b.started()), (0, 0.0, false));
    }

    #[test]
    fn rebase_swaps_origin_and_token_but_keeps_the_path() {
        let url = Url::parse("https://127.77.2.1:8443/live/test/360p/42.ts?t=old").unwrap();
        let to = Assignment {
            base: Url::parse("https://127.77.2.3:8443/").unwrap(),
            broadcast: "broadcast3".into(),
            token: "new".into(),
        };
        assert_eq!(
            rebase(&url, &to).as_str(),
            "https://127.77.2.3:8443/live/test/360p/42.ts?t=new"
        );
    }

    #[test]
    fn latency_is_measured_at_the_play_head() {
        let now = unix_now_ms();
        let timeline = vec![(0.0, 2.0, Some(now - 8000)), (2.0, 2.0, Some(now - 6000))];
        let latency = latency_at(&timeline, 3.0).unwrap();
        assert!((latency - 5.0).abs() < 0.1, "{latency}");
    }
}
