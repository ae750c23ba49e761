//! One simulated viewer: entering through an LB (redirect + token), the master and media
//! playlists, segment after segment, and moving to another broadcast when a request fails.

use std::time::{Duration, Instant};

use super::buffer::BufferModel;
use super::report::{Experience, ViewerReport};
use super::{LB_ATTEMPT, MAX_BACKOFF, MAX_BODY_BYTES, MAX_REDIRECTS, START_BEHIND_SEGMENTS};
use anyhow::{Context, bail};
use streaming_hls::{
    ParsedMedia, ParsedSegment, ParsedVariant, parse_master, parse_media, unix_now_ms,
};
use url::Url;

/// Where a viewer currently gets its media from.
#[derive(Debug, Clone)]
pub(super) struct Assignment {
    /// Origin of the broadcast, e.g. `https://127.77.2.1:8443`.
    base: Url,
    broadcast: String,
    token: String,
}

/// Rewrites a URL to another broadcast's origin and token, keeping its path: segment and
/// playlist paths are the same on every broadcast.
pub(super) fn rebase(url: &Url, assignment: &Assignment) -> Url {
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

pub(super) fn origin_of(url: &Url) -> Url {
    let mut base = url.clone();
    base.set_path("/");
    base.set_query(None);
    base.set_fragment(None);
    base
}

pub(super) struct Viewer {
    pub(super) index: usize,
    pub(super) client: reqwest::Client,
    pub(super) entry: Url,
    /// LB base URLs, for the entry and `/api/assign`.
    pub(super) lbs: Vec<Url>,
    /// Index in `lbs` of the LB asked first: the last one that answered.
    pub(super) next_lb: usize,
    pub(super) channel: String,
    pub(super) rendition_mode: String,
    pub(super) low_latency: bool,
    pub(super) pin: Option<Url>,
    /// Broadcasts that failed this viewer recently: all are excluded at the next assignment,
    /// since an LB may not have noticed a death yet.
    pub(super) failed: std::collections::HashMap<String, Instant>,
    pub(super) report: ViewerReport,
}

/// LBs a viewer keeps in its list (what `/api/cluster` says is added to what it knew).
const MAX_LBS: usize = 16;

/// How long a broadcast that failed a viewer stays excluded from its reassignments.
const FAILED_MEMORY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    #[error("no first byte within {0:?}")]
    Timeout(Duration),
    #[error("HTTP {0}")]
    Status(reqwest::StatusCode),
    #[error("{0}")]
    Transport(String),
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
}

/// One viewing session: where it plays from and what it has played so far.
pub(super) struct Playback {
    pub(super) assignment: Assignment,
    pub(super) master_url: Url,
    pub(super) variants: Vec<ParsedVariant>,
    pub(super) variant: usize,
    pub(super) media_url: Url,
    pub(super) buffer: BufferModel,
    pub(super) latencies: Vec<f64>,
    /// Per segment or part played: (media position where it starts, duration, its PDT), for
    /// the latency at the play head.
    pub(super) timeline: Vec<(f64, f64, Option<u64>)>,
    pub(super) next_seq: Option<u64>,
    /// Low-latency mode: the next part to play, (segment, part index).
    pub(super) next_part: Option<(u64, u32)>,
    /// The preload-hinted part, fetched before it was listed.
    pub(super) hinted: Option<((u64, u32), bytes::Bytes)>,
    pub(super) target: Duration,
    /// When the run ends: `seconds` after the first segment played.
    pub(super) deadline: Option<Instant>,
    pub(super) playlist: Option<ParsedMedia>,
    pub(super) failures_this_segment: u32,
}

impl Playback {
    /// Media of `duration_s` entered the buffer at `now`: where it sits on the play head's
    /// timeline (for the latency), the run's deadline from the first media on, the rendition.
    pub(super) fn took(
        &mut self,
        felt: &mut Experience,
        now: Instant,
        duration_s: f64,
        pdt: Option<u64>,
        started: Instant,
        seconds: u64,
    ) {
        let start_pos = self.buffer.buffer_ahead_s() + self.buffer.position_s();
        self.buffer.advance(now);
        self.buffer.add_segment(now, duration_s);
        self.timeline.push((start_pos, duration_s, pdt));
        if self.deadline.is_none() {
            felt.startup_s = now.duration_since(started).as_secs_f64();
            self.deadline = Some(now + Duration::from_secs(seconds));
        }
        let rendition = self.variants[self.variant]
            .uri
            .split('/')
            .next()
            .unwrap_or_default();
        felt.renditions.insert(rendition.to_owned());
        self.failures_this_segment = 0;
        if let Some(latency) = latency_at(&self.timeline, self.buffer.position_s()) {
            self.latencies.push(latency);
        }
    }
}

impl Viewer {
    /// GET with a time-to-first-byte limit and a whole-body limit.
    pub(super) async fn fetch(
        &self,
        url: &Url,
        first_byte: Duration,
    ) -> Result<bytes::Bytes, FetchError> {
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
                        self.report.felt.lb_failures += 1;
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
                    self.report.felt.lb_failures += 1;
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

    pub(super) async fn run(mut self, seconds: u64) -> ViewerReport {
        let started = Instant::now();
        if let Err(e) = self.watch(started, seconds).await {
            self.report.fatal = Some(format!("{e:#}"));
        }
        self.report
    }

    async fn watch(&mut self, started: Instant, seconds: u64) -> anyhow::Result<()> {
        let mut p = self.start_playback(started, seconds).await?;
        loop {
            if let Some(end) = p.deadline
                && Instant::now() >= end
            {
                break;
            }
            if p.deadline.is_none() && started.elapsed() > Duration::from_secs(30 + seconds) {
                bail!("no segment could be played within 30 s");
            }
            if self.low_latency {
                self.step_low_latency(&mut p, started, seconds).await?;
                continue;
            }
            // Find the next segment in the current playlist, refreshing it when needed.
            let listed = p.playlist.as_ref().and_then(|list| {
                p.next_seq
                    .and_then(|n| list.segments.iter().find(|s| s.seq == n))
                    .cloned()
            });
            match listed {
                Some(segment) => {
                    self.play_segment(&mut p, &segment, started, seconds)
                        .await?
                }
                None => self.refresh_playlist(&mut p).await?,
            }
        }
        p.buffer.finish(Instant::now());
        self.report.felt.stalls = p.buffer.stalls;
        self.report.felt.stall_s = p.buffer.stall_s;
        if !p.latencies.is_empty() {
            self.report.felt.latency_s = p.latencies.iter().sum::<f64>() / p.latencies.len() as f64;
            self.report.felt.latency_max_s = p.latencies.iter().copied().fold(0.0, f64::max);
        }
        Ok(())
    }

    /// In through an LB, then the master playlist of the broadcast it gave (or the pinned one)
    /// and a first rendition.
    async fn start_playback(&mut self, started: Instant, seconds: u64) -> anyhow::Result<Playback> {
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
        let variant = self.choose_variant(&variants, None);
        let media_url = master_url.join(&variants[variant].uri)?;
        self.report
            .felt
            .broadcasts
            .insert(assignment.broadcast.clone());
        Ok(Playback {
            assignment,
            master_url,
            variants,
            variant,
            media_url,
            buffer: BufferModel::new(started),
            latencies: Vec::new(),
            timeline: Vec::new(),
            next_seq: None,
            next_part: None,
            hinted: None,
            target: Duration::from_secs(2),
            deadline: None,
            playlist: None,
            failures_this_segment: 0,
        })
    }

    /// The media playlist again (the next segment is not listed yet), at half a target
    /// duration like a player; where to start in it the first time.
    async fn refresh_playlist(&mut self, p: &mut Playback) -> anyhow::Result<()> {
        if p.playlist.is_some() {
            tokio::time::sleep(p.target / 2).await;
        }
        match self
            .fetch(&rebase(&p.media_url, &p.assignment), p.target)
            .await
        {
            Ok(body) => {
                let parsed = parse_media(std::str::from_utf8(&body)?)?;
                p.target = Duration::from_secs_f64(parsed.target_duration_s.max(1.0));
                // Start 3 segments behind the live edge; a playlist that does not list 3 yet
                // (a channel that just went live) is waited for, as a player holding back 3
                // segments would.
                if p.next_seq.is_none() && parsed.segments.len() as u64 >= START_BEHIND_SEGMENTS {
                    let last = parsed.last_seq().context("empty media playlist")?;
                    p.next_seq = Some(last + 1 - START_BEHIND_SEGMENTS);
                }
                if let (Some(n), Some(first)) = (p.next_seq, parsed.segments.first())
                    && n < first.seq
                {
                    // Fell out of the window (a long outage): skip ahead, and say so.
                    self.report.felt.errors += first.seq - n;
                    p.next_seq = Some(first.seq);
                }
                p.playlist = Some(parsed);
                p.failures_this_segment = 0;
            }
            Err(e) => {
                self.on_failure(&mut p.assignment, &e, &mut p.failures_this_segment)
                    .await;
                // The next broadcast's playlist is asked for at once, as the page's player
                // retries a timed-out playlist there with no delay; the one kept came from the
                // broadcast that failed.
                p.playlist = None;
            }
        }
        Ok(())
    }

    /// Downloads one segment into the buffer: stalls, latency at the play head, and ABR with
    /// the throughput of this download.
    async fn play_segment(
        &mut self,
        p: &mut Playback,
        segment: &ParsedSegment,
        started: Instant,
        seconds: u64,
    ) -> anyhow::Result<()> {
        let segment_url = rebase(&p.media_url.join(&segment.uri)?, &p.assignment);
        let t0 = Instant::now();
        let body = match self.fetch(&segment_url, p.target).await {
            Ok(body) => body,
            Err(e) => {
                self.on_failure(&mut p.assignment, &e, &mut p.failures_this_segment)
                    .await;
                return Ok(());
            }
        };
        if !streaming_media::fmp4::starts_with_fragment(&body) {
            bail!("segment {} is not a fragmented MP4 segment", segment.seq);
        }
        let now = Instant::now();
        let stalls_before = p.buffer.stalls;
        p.took(
            &mut self.report.felt,
            now,
            segment.duration_s,
            segment.program_date_time_ms,
            started,
            seconds,
        );
        tracing::debug!(viewer = self.index, broadcast = %p.assignment.broadcast,
            seq = segment.seq, fetch_ms = now.duration_since(t0).as_millis() as u64,
            ahead_s = p.buffer.buffer_ahead_s(), "segment");
        if p.buffer.stalls > stalls_before {
            tracing::info!(viewer = self.index, broadcast = %p.assignment.broadcast,
                seq = segment.seq, "stalled until this segment arrived");
        }
        self.report.felt.segments += 1;
        self.report
            .segment_fetch_s
            .push(now.duration_since(t0).as_secs_f32());
        self.report.felt.discontinuities += u64::from(segment.discontinuity);
        p.next_seq = Some(segment.seq + 1);
        let elapsed = now.duration_since(t0).as_secs_f64().max(1e-3);
        let choice = self.choose_variant(&p.variants, Some(body.len() as f64 * 8.0 / elapsed));
        if choice != p.variant {
            p.variant = choice;
            p.media_url = p.master_url.join(&p.variants[p.variant].uri)?;
            p.playlist = None;
            self.report.felt.switches += 1;
        }
        Ok(())
    }

    /// A request failed: ask the LBs for another broadcast. Never gives up: with no answer
    /// from any LB, waits a little longer each time (at most [`MAX_BACKOFF`]) and the caller
    /// tries again, until the run ends.
    pub(super) async fn on_failure(
        &mut self,
        assignment: &mut Assignment,
        error: &FetchError,
        failures_in_a_row: &mut u32,
    ) {
        self.report.felt.request_failures += 1;
        *failures_in_a_row += 1;
        tracing::warn!(viewer = self.index, broadcast = %assignment.broadcast, "request failed: {error}");
        let asked = Instant::now();
        match self.reassign(assignment).await {
            Some(next) => {
                self.report.felt.reassign_max_s = self
                    .report
                    .felt
                    .reassign_max_s
                    .max(asked.elapsed().as_secs_f64());
                self.report.felt.failovers += 1;
                self.report.felt.broadcasts.insert(next.broadcast.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

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
