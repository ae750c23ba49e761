//! Pulling each channel's renditions from the ingests' origin API into in-memory windows.
//!
//! One task per channel and rendition. It long-polls the media playlist of its current ingest
//! (`?_HLS_msn=<last+1>` answers when the next segment exists), fetches every segment newer than
//! what we hold and pushes it into the rendition's [`SegmentWindow`] under the origin's sequence
//! number. Both ingests cut the same timeline (docs/architecture.md), so when a fetch fails or
//! times out we simply continue from the other ingest; the window refuses to go backwards, so a
//! switch can never make our own playlist jump back or repeat. A playlist that goes stale is
//! left only for an ingest that has something newer (see [`Puller::on_stale`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use streaming_core::client::{BodyError, read_limited};
use streaming_core::config::{HostConfig, Role};
use streaming_core::lifecycle::Lifecycle;
use streaming_hls::parse::MAX_PLAYLIST_BYTES;
use streaming_hls::{ParsedMedia, RenditionMedia, parse_media};

use crate::state::{Broadcast, ChannelState, RenditionState, lock, read, write};
use crate::take::Source;

/// The first fill (or a refill after a gap) takes only this many of the newest segments: enough
/// for a player to start 3 segments behind the edge, without downloading a stale backlog.
pub const FIRST_FILL_SEGMENTS: usize = 4;
/// No segment of ours comes near this; a bigger body is a broken or hostile origin.
pub const MAX_SEGMENT_BYTES: usize = 16 * 1024 * 1024;
/// Largest init segment accepted (ours are about 1 KiB: two track headers and the SPS/PPS).
pub const MAX_INIT_BYTES: usize = 64 * 1024;
/// How often a puller that failed over asks its preferred ingest whether it is back.
pub const PREFERRED_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Pause after every ingest failed in a row, so a dead cluster does not make us spin.
const ALL_FAILED_PAUSE: Duration = Duration::from_millis(500);
/// How long a stale puller waits for the other ingest's playlist before it stays where it is.
const STALE_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const STALE: &str = "stale: no news in 1.5 target durations (with parts: two part targets)";

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("playlist is not UTF-8")]
    Utf8,
    #[error("the playlist names {0:?} as its init segment, not a name of ours")]
    BadInit(String),
    #[error(transparent)]
    Parse(#[from] streaming_hls::parse::ParseError),
}

/// An ingest we can pull from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub name: String,
    pub url: String,
}

/// Ingests in the order we try them: this host's preferred ingest first (the generator spreads
/// broadcasts over ingests), then the others in config order.
pub fn origin_order(config: &HostConfig) -> Vec<Origin> {
    let preferred = config.me().preferred_ingest.as_deref();
    let mut origins: Vec<Origin> = config
        .cluster
        .hosts_with_role(Role::Ingest)
        .map(|h| Origin {
            name: h.name.clone(),
            url: h.url.trim_end_matches('/').to_owned(),
        })
        .collect();
    // Stable sort: preferred first, the rest keep their order.
    origins.sort_by_key(|o| Some(o.name.as_str()) != preferred);
    origins
}

/// Which ingest a puller uses. Pure, so the failover rule is testable.
#[derive(Debug, Default)]
pub struct OriginChoice {
    current: Option<String>,
}

impl OriginChoice {
    /// The current origin if it is still configured, else the first (preferred) one.
    pub fn current<'a>(&mut self, origins: &'a [Origin]) -> Option<&'a Origin> {
        let found = self
            .current
            .as_ref()
            .and_then(|c| origins.iter().find(|o| &o.name == c));
        let chosen = found.or_else(|| origins.first())?;
        self.current = Some(chosen.name.clone());
        Some(chosen)
    }

    /// Moves to the next origin after the current one (wrapping); returns it.
    pub fn advance<'a>(&mut self, origins: &'a [Origin]) -> Option<&'a Origin> {
        let chosen = self.next(origins)?;
        self.current = Some(chosen.name.clone());
        Some(chosen)
    }

    /// The origin [`Self::advance`] would move to.
    pub fn next<'a>(&self, origins: &'a [Origin]) -> Option<&'a Origin> {
        let index = self
            .current
            .as_ref()
            .and_then(|c| origins.iter().position(|o| &o.name == c))
            .map_or(0, |i| (i + 1) % origins.len().max(1));
        origins.get(index)
    }

    pub fn set(&mut self, name: &str) {
        self.current = Some(name.to_owned());
    }
}

/// Where a rendition's media ends: the newest segment, and how many parts of the one after it
/// exist ([`Position::of`]). Ordered: more parts of the next segment is newer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub seq: u64,
    pub parts_after: u32,
}

impl Position {
    /// What a playlist holds (`None`: nothing yet).
    pub fn of(playlist: &ParsedMedia) -> Option<Self> {
        let parts_after = |seq| playlist.low_latency.parts_of(seq).count() as u32;
        match (playlist.low_latency.building.as_ref(), playlist.last_seq()) {
            (Some(b), _) => Some(Self {
                seq: b.seq - 1,
                parts_after: parts_after(b.seq),
            }),
            (None, Some(last)) => Some(Self {
                seq: last,
                parts_after: 0,
            }),
            (None, None) => None,
        }
    }

    /// What we hold.
    pub fn held(media: &RenditionMedia) -> Option<Self> {
        match (media.building(), media.window().last_seq()) {
            (Some(b), _) => Some(Self {
                seq: b.info.seq - 1,
                parts_after: b.parts.len() as u32,
            }),
            (None, Some(last)) => Some(Self {
                seq: last,
                parts_after: 0,
            }),
            (None, None) => None,
        }
    }
}

/// True when an origin whose media ends at `last` has some we do not hold.
pub fn has_newer<T: Ord>(held: Option<T>, last: Option<T>) -> bool {
    match (held, last) {
        (Some(h), Some(l)) => l > h,
        (None, l) => l.is_some(),
        (Some(_), None) => false,
    }
}

/// Which of a playlist's segments to fetch given the newest one we hold: everything newer, but
/// only the last [`FIRST_FILL_SEGMENTS`] when we hold nothing or the origin is past a gap.
pub fn segments_to_fetch(
    playlist: &ParsedMedia,
    held: Option<u64>,
) -> Vec<&streaming_hls::ParsedSegment> {
    let newer: Vec<_> = playlist
        .segments
        .iter()
        .filter(|s| held.is_none_or(|h| s.seq > h))
        .collect();
    let gap = match (held, newer.first()) {
        (None, _) => true,
        (Some(h), Some(first)) => first.seq > h + 1,
        (Some(_), None) => false,
    };
    if gap && newer.len() > FIRST_FILL_SEGMENTS {
        newer[newer.len() - FIRST_FILL_SEGMENTS..].to_vec()
    } else {
        newer
    }
}

/// One round of a puller: the origin asked, the rendition's path, what we hold, and when the
/// lack of news makes the origin stale.
#[derive(Clone, Copy)]
struct Round<'a> {
    client: &'a reqwest::Client,
    key: &'a str,
    origins: &'a [Origin],
    origin: &'a Origin,
    path: &'a str,
    held: Option<Position>,
    d: Duration,
    stale_at: Instant,
}

/// While pulling from another ingest, whether the preferred one serves this rendition again:
/// it answers, and its playlist is not behind what we already serve.
async fn preferred_is_back(
    client: &reqwest::Client,
    key: &str,
    preferred: &Origin,
    path: &str,
    held: Option<Position>,
    d: Duration,
) -> bool {
    let answer = fetch_playlist(
        client,
        key,
        preferred,
        path,
        None,
        d.min(Duration::from_secs(2)),
    )
    .await;
    answer.is_ok_and(|p| match (held, Position::of(&p)) {
        (Some(h), Some(last)) => last >= h,
        (None, _) => true,
        (Some(_), None) => false,
    })
}

/// GET with a bearer key, a timeout and a body size limit.
pub(crate) async fn fetch_limited(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    timeout: Duration,
    limit: usize,
) -> Result<Bytes, PullError> {
    let response = client
        .get(url)
        .bearer_auth(key)
        .timeout(timeout)
        .send()
        .await?;
    if response.status() != reqwest::StatusCode::OK {
        return Err(PullError::Status(response.status().as_u16()));
    }
    read_limited(response, limit).await.map_err(|e| match e {
        BodyError::TooLarge(limit) => PullError::TooLarge(limit),
        BodyError::Read(e) => PullError::Http(e),
    })
}

/// What a blocking playlist request waits for: segment `msn`, or part `part` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub msn: u64,
    pub part: Option<u32>,
}

async fn fetch_playlist(
    client: &reqwest::Client,
    key: &str,
    origin: &Origin,
    path: &str,
    want: Option<Want>,
    timeout: Duration,
) -> Result<ParsedMedia, PullError> {
    let base = format!("{}/origin/{path}/index.m3u8", origin.url);
    let url = match want {
        Some(Want { msn, part: Some(p) }) => format!("{base}?_HLS_msn={msn}&_HLS_part={p}"),
        Some(Want { msn, part: None }) => format!("{base}?_HLS_msn={msn}"),
        None => base,
    };
    let body = fetch_limited(client, &url, key, timeout, MAX_PLAYLIST_BYTES).await?;
    let text = std::str::from_utf8(&body).map_err(|_| PullError::Utf8)?;
    Ok(parse_media(text)?)
}

/// Keeps one puller per configured channel and rendition; called at start and after a reload.
/// Pullers of renditions that left the config stop by themselves.
pub fn spawn_missing(bc: &Arc<Broadcast>, lifecycle: &Lifecycle) {
    let config = bc.config();
    let capacity = config.cluster.timeline.cache_segments as usize;
    for channel in &config.cluster.channels {
        let state = write(&bc.channels)
            .entry(channel.name.clone())
            .or_default()
            .clone();
        for rendition in &channel.ladder {
            let mut renditions = write(&state.renditions);
            if renditions.contains_key(&rendition.name) {
                continue;
            }
            let r = Arc::new(RenditionState::new(&rendition.name, capacity));
            renditions.insert(rendition.name.clone(), r.clone());
            let puller = Puller::new(bc.clone(), channel.name.clone(), state.clone(), r);
            tokio::spawn(puller.run(lifecycle.clone()));
        }
    }
}

/// The pulling state machine of one rendition.
pub(crate) struct Puller {
    bc: Arc<Broadcast>,
    pub(crate) channel: String,
    pub(crate) channel_state: Arc<ChannelState>,
    pub(crate) rendition: Arc<RenditionState>,
    choice: OriginChoice,
    switched_at: Instant,
    last_probe: Instant,
    /// The question to the preferred ingest in flight, if any. It runs beside the pulling, never
    /// in its way: a hung preferred ingest takes the whole probe timeout to not answer, and a
    /// low-latency viewer holds only PART-HOLD-BACK of buffer.
    preferred_probe: Option<tokio::task::JoinHandle<bool>>,
    consecutive_failures: usize,
    /// A segment that failed to download, and on how many tries: after one try per ingest we
    /// give up on it (the window then marks the gap as a discontinuity).
    pub(crate) failed_seq: Option<(u64, usize)>,
}

enum Step {
    Continue,
    Gone,
}

impl Puller {
    fn new(
        bc: Arc<Broadcast>,
        channel: String,
        channel_state: Arc<ChannelState>,
        rendition: Arc<RenditionState>,
    ) -> Self {
        let now = Instant::now();
        Self {
            bc,
            channel,
            channel_state,
            rendition,
            choice: OriginChoice::default(),
            switched_at: now,
            last_probe: now,
            preferred_probe: None,
            consecutive_failures: 0,
            failed_seq: None,
        }
    }

    async fn run(mut self, lifecycle: Lifecycle) {
        tracing::info!(channel = %self.channel, rendition = %self.rendition.name, "puller started");
        loop {
            let step = tokio::select! {
                _ = lifecycle.shutdown() => break,
                step = self.step() => step,
            };
            if let Step::Gone = step {
                tracing::info!(channel = %self.channel, rendition = %self.rendition.name,
                    "rendition left the config: puller stopped");
                write(&self.channel_state.renditions).remove(&self.rendition.name);
                let mut channels = write(&self.bc.channels);
                if read(&self.channel_state.renditions).is_empty()
                    && self.bc.config().cluster.channel(&self.channel).is_none()
                {
                    channels.remove(&self.channel);
                }
                break;
            }
        }
    }

    async fn step(&mut self) -> Step {
        let config = self.bc.config();
        let Some(channel) = config.cluster.channel(&self.channel) else {
            return Step::Gone;
        };
        if !channel.ladder.iter().any(|r| r.name == self.rendition.name) {
            return Step::Gone;
        }
        let d = Duration::from_secs(u64::from(config.cluster.timeline.segment_seconds.max(1)));
        let origins = origin_order(&config);
        let Some(origin) = self.choice.current(&origins).cloned() else {
            tracing::warn!(channel = %self.channel, "no ingest in the config");
            tokio::time::sleep(d).await;
            return Step::Continue;
        };
        let preferred = origins[0].clone();
        let (client, key) = (self.bc.client(), self.bc.cluster_key());
        let path = format!("{}/{}", self.channel, self.rendition.name);
        let held = Position::held(&read(&self.rendition.media));
        let part_target = *lock(&self.rendition.part_target_s);

        // Stale = no news for 1.5·D since the last (or since we switched here); with parts, for
        // two part targets (a part is due every part target).
        let now = Instant::now();
        let progress =
            (*lock(&self.rendition.last_new)).map_or(self.switched_at, |t| t.max(self.switched_at));
        let stale_after = part_target.map_or(d * 3 / 2, |p| Duration::from_secs_f64(p * 2.0));
        let stale_at = progress + stale_after;
        let wait_until = stale_at.max(now + stale_after / 3).min(now + 3 * d);
        let want = held.map(|h| match part_target {
            Some(_) => Want {
                msn: h.seq + 1,
                part: Some(h.parts_after),
            },
            None => Want {
                msn: h.seq + 1,
                part: None,
            },
        });
        let main = tokio::time::timeout_at(
            wait_until.into(),
            fetch_playlist(
                &client,
                &key,
                &origin,
                &path,
                want,
                3 * d + Duration::from_secs(1),
            ),
        );
        let probe = match self.preferred_probe.take() {
            Some(task) if task.is_finished() => task.await.ok(),
            other => {
                self.preferred_probe = other;
                None
            }
        };
        if self.preferred_probe.is_none()
            && origin != preferred
            && now.duration_since(self.last_probe) >= PREFERRED_PROBE_INTERVAL
        {
            self.last_probe = now;
            let (client, key, preferred, path) =
                (client.clone(), key.clone(), preferred.clone(), path.clone());
            self.preferred_probe = Some(tokio::spawn(async move {
                preferred_is_back(&client, &key, &preferred, &path, held, d).await
            }));
        }
        let main = main.await;

        let round = Round {
            client: &client,
            key: &key,
            origins: &origins,
            origin: &origin,
            path: &path,
            held,
            d,
            stale_at,
        };
        self.settle(&round, main).await;

        if probe == Some(true)
            && self
                .choice
                .current(&origins)
                .is_some_and(|o| o.name != preferred.name)
        {
            tracing::info!(channel = %self.channel, rendition = %self.rendition.name, ingest = %preferred.name,
                "preferred ingest answers again: switching back");
            self.switch_to(&preferred.name);
        }
        if self.consecutive_failures >= origins.len() {
            tokio::time::sleep(ALL_FAILED_PAUSE).await;
        }
        Step::Continue
    }

    /// What the main playlist request of a round led to: segments taken, a failure counted
    /// against the origin, or (no news by `stale_at`) the stale handling.
    async fn settle(
        &mut self,
        round: &Round<'_>,
        main: Result<Result<ParsedMedia, PullError>, tokio::time::error::Elapsed>,
    ) {
        let Round {
            client,
            key,
            origins,
            origin,
            path,
            held,
            d,
            stale_at,
        } = *round;
        match main {
            Err(_elapsed) => {
                if Instant::now() >= stale_at {
                    self.on_stale(client, key, origins, origin, path, held)
                        .await;
                }
            }
            Ok(Err(e)) => self.fail(origins, origin, &format!("playlist: {e}")),
            Ok(Ok(playlist)) => {
                metrics::counter!("broadcast_pulls_total", "origin" => origin.name.clone(), "result" => "ok")
                    .increment(1);
                *lock(&self.channel_state.origin) = Some(origin.name.clone());
                let source = Source {
                    client,
                    key,
                    origin,
                    path,
                    d,
                };
                match self.take(source, &playlist, origins.len()).await {
                    Ok(0) => {
                        if Instant::now() >= stale_at {
                            self.on_stale(client, key, origins, origin, path, held)
                                .await;
                        } else {
                            // A blocking origin answers only when there is news; anything else
                            // must not make us spin.
                            tokio::time::sleep(d / 8).await;
                        }
                    }
                    Ok(_) => self.consecutive_failures = 0,
                    Err(e) => self.fail(origins, origin, &format!("segment: {e}")),
                }
            }
        }
    }

    /// The current ingest listed nothing new for 1.5·D. That is not always its fault: when the
    /// source both ingests had died or hung, each lists the slot as slate only at its deadline
    /// (the slot's end plus the ingest's `EMIT_GRACE`, 1.5 s), which can come just after
    /// 1.5·D; moving then would go to an ingest that has nothing newer, or is
    /// the dead one, and cost a viewer's buffer another 1.5·D there. So we move only to an
    /// ingest that answers within [`STALE_PROBE_TIMEOUT`] with a segment newer than ours, and
    /// otherwise ask both again on the next round.
    async fn on_stale(
        &mut self,
        client: &reqwest::Client,
        key: &str,
        origins: &[Origin],
        origin: &Origin,
        path: &str,
        held: Option<Position>,
    ) {
        let Some(next) = self.choice.next(origins).filter(|n| n.name != origin.name) else {
            self.fail(origins, origin, STALE);
            return;
        };
        let answer = fetch_playlist(client, key, next, path, None, STALE_PROBE_TIMEOUT).await;
        if answer.is_ok_and(|p| has_newer(held, Position::of(&p))) {
            self.fail(origins, origin, STALE);
        } else {
            tracing::debug!(channel = %self.channel, rendition = %self.rendition.name,
                ingest = %origin.name, other = %next.name,
                "stale, but the other ingest has nothing newer: staying");
        }
    }

    fn fail(&mut self, origins: &[Origin], origin: &Origin, reason: &str) {
        metrics::counter!("broadcast_pulls_total", "origin" => origin.name.clone(), "result" => "failed")
            .increment(1);
        self.consecutive_failures += 1;
        let quiet = self.consecutive_failures > origins.len();
        if let Some(next) = self.choice.advance(origins).cloned()
            && next.name != origin.name
        {
            if !quiet {
                tracing::warn!(channel = %self.channel, rendition = %self.rendition.name, ingest = %origin.name,
                    next = %next.name, "pull failed ({reason}): switching ingest");
            }
            self.switched_at = Instant::now();
            self.last_probe = Instant::now();
            metrics::counter!("broadcast_origin_switches_total", "channel" => self.channel.clone())
                .increment(1);
        } else if !quiet {
            tracing::warn!(channel = %self.channel, rendition = %self.rendition.name, ingest = %origin.name,
                "pull failed ({reason}), no other ingest to try");
        }
    }

    fn switch_to(&mut self, name: &str) {
        self.choice.set(name);
        self.switched_at = Instant::now();
        self.consecutive_failures = 0;
        metrics::counter!("broadcast_origin_switches_total", "channel" => self.channel.clone())
            .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins() -> Vec<Origin> {
        ["ingest2", "ingest1"]
            .iter()
            .map(|n| Origin {
                name: n.to_string(),
                url: format!("https://{n}"),
            })
            .collect()
    }

    #[test]
    fn a_stale_puller_moves_only_for_something_newer() {
        assert!(has_newer(Some(10), Some(11)));
        assert!(!has_newer(Some(10), Some(10)), "as far behind as we are");
        assert!(!has_newer(Some(10), Some(9)));
        assert!(!has_newer(Some(10), None), "an empty playlist");
        assert!(has_newer(None, Some(1)));
        assert!(!has_newer::<u64>(None, None));
        // With parts: one more part of the segment being made is newer.
        let at = |seq, parts_after| Some(Position { seq, parts_after });
        assert!(has_newer(at(10, 1), at(10, 2)));
        assert!(has_newer(at(10, 3), at(11, 0)));
        assert!(!has_newer(at(10, 2), at(10, 2)));
    }

    #[test]
    fn next_names_the_ingest_advance_moves_to() {
        let origins = origins();
        let mut choice = OriginChoice::default();
        assert_eq!(choice.current(&origins).unwrap().name, "ingest2");
        assert_eq!(choice.next(&origins).unwrap().name, "ingest1");
        assert_eq!(
            choice.current(&origins).unwrap().name,
            "ingest2",
            "next does not move"
        );
        assert_eq!(choice.advance(&origins).unwrap().name, "ingest1");
        assert_eq!(choice.next(&origins).unwrap().name, "ingest2");
    }

    #[test]
    fn preferred_ingest_comes_first() {
        let config = crate::state::test_support::config();
        let order: Vec<String> = origin_order(&config).into_iter().map(|o| o.name).collect();
        assert_eq!(order, ["ingest2", "ingest1"]);
    }

    #[test]
    fn failover_cycles_through_ingests() {
        let o = origins();
        let mut c = OriginChoice::default();
        assert_eq!(c.current(&o).unwrap().name, "ingest2");
        assert_eq!(c.advance(&o).unwrap().name, "ingest1");
        assert_eq!(c.current(&o).unwrap().name, "ingest1");
        assert_eq!(c.advance(&o).unwrap().name, "ingest2");
        // The current origin left the config: back to the first.
        c.set("ingest9");
        assert_eq!(c.current(&o).unwrap().name, "ingest2");
    }

    fn playlist(first: u64, n: u64) -> ParsedMedia {
        let mut text = format!(
            "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:{first}\n"
        );
        for seq in first..first + n {
            text.push_str(&format!("#EXTINF:2.000,\n{seq}.m4s\n"));
        }
        parse_media(&text).unwrap()
    }

    #[test]
    fn first_fill_takes_only_the_newest() {
        let p = playlist(100, 6);
        let seqs = |held| {
            segments_to_fetch(&p, held)
                .iter()
                .map(|s| s.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(seqs(None), [102, 103, 104, 105]);
        // Continuing: everything newer, even more than the first fill.
        assert_eq!(seqs(Some(99)), [100, 101, 102, 103, 104, 105]);
        assert_eq!(seqs(Some(103)), [104, 105]);
        assert!(seqs(Some(105)).is_empty());
        // A gap (we fell far behind): only the newest few.
        assert_eq!(seqs(Some(50)), [102, 103, 104, 105]);
        // An origin behind us offers nothing.
        assert!(seqs(Some(200)).is_empty());
    }
}
