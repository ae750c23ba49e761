//! One channel: its publishers, the input switch, the transcoder runs and the slot emission.
//!
//! A single tokio task owns all of it (no locks on the media path); the origin reads the
//! published windows through [`ChannelShared`]. Every slot k is decided once, at
//! (k+1)·D + [`EMIT_GRACE`]: the live segments of all renditions if they all arrived, otherwise
//! the slate in every rendition. So the playlists advance every D seconds whatever the input does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use streaming_core::config::ChannelConfig;
use streaming_core::status::IngestChannelStatus;
use streaming_hls::{SegmentInfo, SegmentWindow, SlotClock, Variant, unix_now_ms};
use tokio::sync::{mpsc, watch};

use crate::flv::{self, TagKind};
use crate::segments::RunTimeline;
use crate::select::{
    Coverage, MAX_MEDIA_GAP_MS, SLOT_EDGE_TOLERANCE_MS, Selector, SlotFact, rank_of,
};
use crate::transcode::{FeedError, RunEvent, RunExit, RunHandle, RunSpec, start_run};
use streaming_core::sync::{lock, write};

/// How long after a slot ends we wait for its live segments (ffmpeg finishes a segment when the
/// next keyframe arrives, plus encode and poll delay).
pub const EMIT_GRACE: Duration = Duration::from_millis(1500);
/// Messages queued towards a channel task; publishers block (TCP backpressure) when it is full.
pub const CHANNEL_QUEUE: usize = 2048;
/// Restart backoff after a transcoder crash: doubles from the first value up to the second.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A run that lived this long resets the backoff.
const RUN_HEALTHY_AFTER: Duration = Duration::from_secs(30);
/// The source of slot k is decided at k·D plus this: the last frames of slot k-1 must have
/// arrived by then (from the source directly or through a relay) to count as delivered.
pub const DECIDE_DELAY: Duration = Duration::from_millis(700);
/// Media kept per publisher for a switch: two GOPs, so the run of a newly chosen source can
/// start at its keyframe before the slot boundary and deliver that slot whole. Capped anyway.
const MAX_RECENT_TAGS: usize = 2000;
/// A running transcoder that has produced no segment for this many segment durations (plus the
/// emission grace) while being fed is hung (SIGSTOPped, deadlocked): it is killed and restarted
/// like a crashed one. A fresh run needs about two durations for its first whole segment.
const STALLED_AFTER_SEGMENTS: u64 = 3;
const MAX_RECENT_BYTES: usize = 32 * 1024 * 1024;

/// When slot `slot` goes into the playlists: at its end on the wall clock when its live
/// segments are all in, else at the deadline (live if they arrived by then, or the slate).
///
/// Never before the slot's end: a plain publisher's anchor is its first tag's arrival, so a
/// publisher whose first tags came late (an encoder starved of CPU at its start, then catching
/// up) has media ahead of the clock, finished before its slot ends. Published that early, the
/// playlists run ahead of the slot clock and then wait up to `EMIT_GRACE` more for the slate
/// when that publisher goes: viewers who joined on the early segments hold seconds less
/// buffer and underrun by a few frames at the move.
pub fn publish_at_ms(clock: SlotClock, slot: u64, complete: bool) -> u64 {
    let end = clock.slot_start_ms(slot + 1);
    if complete {
        end
    } else {
        end + EMIT_GRACE.as_millis() as u64
    }
}

/// What reaches a channel task.
#[derive(Debug)]
pub enum ChannelMsg {
    /// A publisher whose anchor is known (from its publish name, or fixed by the listener at
    /// its first media tag). `source` is its source name (`publisher` for a plain one).
    Joined {
        conn: u64,
        source: String,
        anchor_ms: u64,
        relayed: bool,
        peer: SocketAddr,
    },
    Media {
        conn: u64,
        kind: TagKind,
        timestamp_ms: u32,
        data: Bytes,
    },
    Left {
        conn: u64,
    },
    /// What the channel's current (or an old) ffmpeg run reports.
    Run(RunEvent),
    /// New config after SIGHUP: ranked source names and the channel's settings.
    Reconfigure {
        sources: Vec<String>,
        config: ChannelConfig,
    },
}

impl From<RunEvent> for ChannelMsg {
    fn from(event: RunEvent) -> Self {
        ChannelMsg::Run(event)
    }
}

/// One rendition's published segments.
pub struct RenditionOutput {
    pub name: String,
    pub window: SegmentWindow<Bytes>,
}

/// What the origin serves for a channel.
pub struct ChannelOutput {
    pub renditions: Vec<RenditionOutput>,
    pub variants: Vec<Variant>,
}

/// The part of a channel shared with the origin.
pub struct ChannelShared {
    pub name: String,
    pub output: RwLock<ChannelOutput>,
    /// Last decided slot; origin requests with `_HLS_msn` wait on it.
    pub last_slot: watch::Sender<Option<u64>>,
    pub status: Mutex<IngestChannelStatus>,
}

impl ChannelShared {
    pub fn new(config: &ChannelConfig, cache_segments: usize) -> Arc<Self> {
        let renditions = config
            .ladder
            .iter()
            .map(|r| RenditionOutput {
                name: r.name.clone(),
                window: SegmentWindow::new(cache_segments),
            })
            .collect();
        let bandwidth = streaming_core::config::Rendition::bandwidth_bps_with(config.audio_kbps);
        let variants = config
            .ladder
            .iter()
            .map(|r| Variant {
                name: r.name.clone(),
                bandwidth_bps: bandwidth(r),
                width: r.width,
                height: r.height,
                fps: config.fps,
            })
            .collect();
        Arc::new(Self {
            name: config.name.clone(),
            output: RwLock::new(ChannelOutput {
                renditions,
                variants,
            }),
            last_slot: watch::channel(None).0,
            status: Mutex::new(IngestChannelStatus::default()),
        })
    }
}

/// One stream as every ingest sees it: a source name and an anchor. A relayed copy and the
/// direct connection of the same publish share it; two OBS publishers do not.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey {
    pub source: String,
    pub anchor_ms: u64,
}

struct Publisher {
    key: SourceKey,
    peer: SocketAddr,
    rank: u32,
    relayed: bool,
    avc_header: Option<Bytes>,
    aac_header: Option<Bytes>,
    coverage: Coverage,
    /// When its last tag arrived (unix ms): a hung publisher keeps its connection open.
    last_arrival_ms: u64,
    /// The current and the previous GOP (see `MAX_RECENT_TAGS`).
    recent: VecDeque<(TagKind, u32, Bytes)>,
    recent_bytes: usize,
}

impl Publisher {
    fn usable(&self) -> bool {
        self.avc_header.is_some() && self.aac_header.is_some()
    }
}

fn is_key_picture(kind: TagKind, data: &[u8]) -> bool {
    kind == TagKind::Video && flv::is_video_keyframe(data) && !flv::is_avc_sequence_header(data)
}

/// The input currently routed to the transcoder.
struct Feed {
    publisher: u64,
    key: SourceKey,
    /// Last timestamps fed per kind: a handover to another connection of the same stream skips
    /// what was already fed.
    last_fed: [Option<u32>; 2],
    /// For log lines after the publisher is gone.
    label: String,
    epoch_ms: u64,
    anchor_ms: u64,
    /// `None` until the first keyframe (or while backing off after a crash).
    run: Option<(RunHandle, u32)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LastPushed {
    Slate,
    Live(u64),
}

struct PendingSlot {
    run_id: u64,
    parts: Vec<Option<Bytes>>,
}

/// Settings fixed for the channel task's life (the ladder shape is, see `Reconfigure`).
pub struct ChannelSetup {
    pub config: ChannelConfig,
    pub sources: Vec<String>,
    pub clock: SlotClock,
    pub work_dir: PathBuf,
    pub slates: Vec<Bytes>,
    /// Whole slots a better source must deliver before it is taken back.
    pub primary_return_slots: u32,
}

pub struct ChannelTask {
    setup: ChannelSetup,
    shared: Arc<ChannelShared>,
    tx: mpsc::Sender<ChannelMsg>,
    publishers: HashMap<u64, Publisher>,
    feed: Option<Feed>,
    next_run: u64,
    crashes_in_row: u32,
    backoff_until: Option<Instant>,
    pending: BTreeMap<u64, PendingSlot>,
    next_slot: u64,
    last_pushed: Option<LastPushed>,
    cache_segments: u64,
    selector: Selector<SourceKey>,
    /// The next slot whose source is to be decided.
    next_decision: u64,
    /// The last slot for which a silent active source was looked at (once per slot).
    silence_checked: Option<u64>,
    /// When the task last looked for a silent source (unix ms).
    last_wake_ms: u64,
    /// When the current run started or last delivered a segment (unix ms): the hang watchdog.
    run_progress_ms: u64,
}

impl ChannelTask {
    pub fn new(
        setup: ChannelSetup,
        shared: Arc<ChannelShared>,
        tx: mpsc::Sender<ChannelMsg>,
        cache_segments: u32,
    ) -> Self {
        let next_slot = setup.clock.slot_at(unix_now_ms());
        let selector = Selector::new(setup.primary_return_slots);
        Self {
            setup,
            shared,
            tx,
            publishers: HashMap::new(),
            feed: None,
            next_run: 1,
            crashes_in_row: 0,
            backoff_until: None,
            pending: BTreeMap::new(),
            next_slot,
            last_pushed: None,
            cache_segments: u64::from(cache_segments),
            selector,
            next_decision: next_slot + 1,
            silence_checked: None,
            last_wake_ms: unix_now_ms(),
            run_progress_ms: 0,
        }
    }

    /// Runs until shutdown; then ends the current run's input so ffmpeg exits.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<ChannelMsg>,
        lifecycle: streaming_core::lifecycle::Lifecycle,
    ) {
        let _ = std::fs::remove_dir_all(&self.setup.work_dir);
        loop {
            let now = unix_now_ms();
            let emit_at =
                publish_at_ms(self.setup.clock, self.next_slot, self.next_slot_complete());
            let wait = Duration::from_millis(emit_at.saturating_sub(now));
            let decide_at = self.decision_ms(self.next_decision);
            let decide_wait = Duration::from_millis(decide_at.saturating_sub(now));
            tokio::select! {
                _ = lifecycle.shutdown() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = tokio::time::sleep(wait) => self.emit_due(),
                _ = tokio::time::sleep(decide_wait) => self.decide_due(),
            }
            self.check_silent_feed(unix_now_ms());
        }
        if let Some(feed) = &mut self.feed
            && let Some((run, _)) = &mut feed.run
        {
            run.finish();
        }
    }

    fn decision_ms(&self, slot: u64) -> u64 {
        self.setup.clock.slot_start_ms(slot) + DECIDE_DELAY.as_millis() as u64
    }

    fn deadline_ms(&self, slot: u64) -> u64 {
        publish_at_ms(self.setup.clock, slot, false)
    }

    fn next_slot_complete(&self) -> bool {
        self.pending
            .get(&self.next_slot)
            .is_some_and(|p| p.parts.iter().all(Option::is_some))
    }

    fn handle(&mut self, msg: ChannelMsg) {
        match msg {
            ChannelMsg::Joined {
                conn,
                source,
                anchor_ms,
                relayed,
                peer,
            } => {
                let rank = rank_of(Some(&source), &self.setup.sources);
                tracing::info!(channel = %self.setup.config.name, conn, %peer, %source, anchor_ms, relayed, rank, "publisher connected");
                self.publishers.insert(
                    conn,
                    Publisher {
                        key: SourceKey { source, anchor_ms },
                        peer,
                        rank,
                        relayed,
                        avc_header: None,
                        aac_header: None,
                        coverage: Coverage::default(),
                        last_arrival_ms: unix_now_ms(),
                        recent: VecDeque::new(),
                        recent_bytes: 0,
                    },
                );
                self.update_status();
            }
            ChannelMsg::Left { conn } => {
                if let Some(p) = self.publishers.remove(&conn) {
                    tracing::info!(channel = %self.setup.config.name, conn, peer = %p.peer, source = %p.key.source, relayed = p.relayed, "publisher disconnected");
                }
                self.left(conn);
                self.update_status();
            }
            ChannelMsg::Media {
                conn,
                kind,
                timestamp_ms,
                data,
            } => self.media(conn, kind, timestamp_ms, data),
            ChannelMsg::Run(RunEvent::Segment {
                run_id,
                rendition,
                slot,
                data,
            }) => self.segment(run_id, rendition, slot, data),
            ChannelMsg::Run(RunEvent::Exited { run_id, exit }) => self.run_exited(run_id, exit),
            ChannelMsg::Reconfigure { sources, config } => {
                for p in self.publishers.values_mut() {
                    p.rank = rank_of(Some(&p.key.source), &sources);
                }
                self.setup.sources = sources; // applied at the next slot decision
                self.update_status();
                let same_shape = config.ladder.len() == self.setup.config.ladder.len()
                    && config
                        .ladder
                        .iter()
                        .zip(&self.setup.config.ladder)
                        .all(|(a, b)| {
                            a.name == b.name && a.width == b.width && a.height == b.height
                        });
                if config != self.setup.config {
                    if same_shape {
                        tracing::info!(channel = %config.name, "channel settings changed: applied at the next transcoder start");
                        self.setup.config = config;
                    } else {
                        tracing::warn!(channel = %config.name, "ladder renditions changed: restart the ingest to apply (bitrates, preset and fps apply on reload)");
                    }
                }
            }
        }
    }

    fn media(&mut self, conn: u64, kind: TagKind, timestamp_ms: u32, data: Bytes) {
        let Some(p) = self.publishers.get_mut(&conn) else {
            return;
        };
        p.last_arrival_ms = unix_now_ms();
        match kind {
            TagKind::Video if flv::is_avc_sequence_header(&data) => {
                p.avc_header = Some(data.clone())
            }
            TagKind::Audio if flv::is_aac_sequence_header(&data) => {
                p.aac_header = Some(data.clone())
            }
            _ => {
                p.coverage
                    .observe(p.key.anchor_ms.saturating_add(u64::from(timestamp_ms)));
                if is_key_picture(kind, &data)
                    && let Some(i) = p.recent.iter().rposition(|(k, _, d)| is_key_picture(*k, d))
                {
                    for (_, _, d) in p.recent.drain(..i) {
                        p.recent_bytes -= d.len();
                    }
                }
                p.recent_bytes += data.len();
                p.recent.push_back((kind, timestamp_ms, data.clone()));
                while p.recent.len() > MAX_RECENT_TAGS || p.recent_bytes > MAX_RECENT_BYTES {
                    if let Some((_, _, d)) = p.recent.pop_front() {
                        p.recent_bytes -= d.len();
                    }
                }
            }
        }
        if self.feed.as_ref().is_some_and(|f| f.publisher == conn) {
            self.route(kind, timestamp_ms, data);
        }
    }

    /// Hands one tag of the active publisher to the transcoder (starting a run at a keyframe).
    fn route(&mut self, kind: TagKind, timestamp_ms: u32, data: Bytes) {
        let now = Instant::now();
        let Some(feed) = &mut self.feed else { return };
        let slot = kind as usize & 1; // Audio = 8 -> 0, Video = 9 -> 1
        if feed.last_fed[slot].is_some_and(|last| timestamp_ms <= last)
            && !flv::is_avc_sequence_header(&data)
            && !flv::is_aac_sequence_header(&data)
        {
            return; // already fed through another connection of the same stream
        }
        // Anchors are bounded when a publish is parsed; this stays checked all the same, so a
        // wild one drops tags instead of wrapping.
        let flv_ts =
            (i128::from(feed.anchor_ms) + i128::from(timestamp_ms)) - i128::from(feed.epoch_ms);
        let Ok(flv_ts) = u32::try_from(flv_ts) else {
            return;
        };
        if feed.run.is_none() {
            let is_start = is_key_picture(kind, &data);
            if is_start && self.backoff_until.is_none_or(|t| now >= t) {
                self.start_run(flv_ts, &data);
                if let Some(feed) = &mut self.feed
                    && feed.run.is_some()
                {
                    feed.last_fed[slot] = Some(timestamp_ms);
                }
            }
            return;
        }
        let Some((run, first_ts)) = &mut feed.run else {
            return;
        };
        if kind == TagKind::Audio && flv_ts < *first_ts {
            return; // audio from before the first frame would start the output early
        }
        feed.last_fed[slot] = Some(timestamp_ms);
        match run.feed(flv::tag(kind, flv_ts, &data)) {
            Ok(()) => {}
            Err(FeedError::Gone) => {} // RunExited follows
            Err(FeedError::Stalled) => {
                tracing::error!(channel = %self.setup.config.name, run = run.run_id, "transcoder does not keep up with its input: killing it");
                run.kill();
            }
        }
    }

    /// Starts a transcoder run at this keyframe: FLV header, sequence headers, then the frame.
    fn start_run(&mut self, flv_ts: u32, keyframe: &Bytes) {
        let Some(feed) = &self.feed else { return };
        let Some(p) = self.publishers.get(&feed.publisher) else {
            return;
        };
        let (Some(avc), Some(aac)) = (p.avc_header.clone(), p.aac_header.clone()) else {
            tracing::debug!(channel = %self.setup.config.name, "waiting for AVC and AAC sequence headers");
            return;
        };
        let run_id = self.next_run;
        self.next_run += 1;
        let first_frame_ms = f64::from(flv_ts) + f64::from(flv::composition_time_ms(keyframe));
        // C is passed with 3 decimals: round here so the boundary check sees the same value.
        let first_frame_ms = (first_frame_ms).round();
        let timeline = RunTimeline {
            clock: self.setup.clock,
            epoch_ms: feed.epoch_ms,
            first_frame_ms,
            frame_ms: 1000.0 / f64::from(self.setup.config.fps.max(1)),
        };
        let spec = RunSpec {
            channel_name: self.setup.config.name.clone(),
            run_id,
            config: self.setup.config.clone(),
            segment_s: self.setup.clock.segment_ms() as u32 / 1000,
            timeline,
            dir: self.setup.work_dir.join(run_id.to_string()),
        };
        match start_run(spec, self.tx.clone()) {
            Ok(run) => {
                tracing::info!(
                    channel = %self.setup.config.name, run = run_id,
                    source = %p.key.source, epoch_ms = feed.epoch_ms,
                    first_frame_s = first_frame_ms / 1000.0, "transcoder started"
                );
                let header = Bytes::from_static(&flv::HEADER);
                let tags = [
                    header,
                    flv::tag(TagKind::Video, flv_ts, &avc),
                    flv::tag(TagKind::Audio, flv_ts, &aac),
                    flv::tag(TagKind::Video, flv_ts, keyframe),
                ];
                for t in tags {
                    let _ = run.feed(t);
                }
                if let Some(feed) = &mut self.feed {
                    feed.run = Some((run, flv_ts));
                }
                self.run_progress_ms = unix_now_ms();
            }
            Err(e) => {
                tracing::error!(channel = %self.setup.config.name, "cannot start the transcoder: {e}");
                self.note_crash();
            }
        }
    }

    fn note_crash(&mut self) {
        self.crashes_in_row += 1;
        let backoff = BACKOFF_FIRST
            .saturating_mul(1 << self.crashes_in_row.min(4).saturating_sub(1))
            .min(BACKOFF_MAX);
        self.backoff_until = Some(Instant::now() + backoff);
        metrics::counter!("ingest_ffmpeg_restarts_total", "channel" => self.setup.config.name.clone()).increment(1);
        lock(&self.shared.status).ffmpeg_restarts += 1;
    }

    fn run_exited(&mut self, run_id: u64, exit: RunExit) {
        let current = self
            .feed
            .as_ref()
            .and_then(|f| f.run.as_ref())
            .map(|(r, _)| r.run_id);
        if current != Some(run_id) {
            tracing::info!(channel = %self.setup.config.name, run = run_id, status = %exit.status, "transcoder run ended");
            return;
        }
        let lived = self
            .feed
            .as_mut()
            .and_then(|f| f.run.take())
            .map(|(r, _)| r.started.elapsed())
            .unwrap_or_default();
        if lived >= RUN_HEALTHY_AFTER {
            self.crashes_in_row = 0;
        }
        tracing::error!(
            channel = %self.setup.config.name, run = run_id, status = %exit.status, lived_s = lived.as_secs(),
            stderr = %exit.stderr_tail.join(" | "),
            "transcoder exited while its input is live: restarting at the next keyframe (slate fills the gap)"
        );
        self.note_crash();
    }

    /// Decides the source of every slot whose decision time has come.
    fn decide_due(&mut self) {
        let now = unix_now_ms();
        let now_slot = self.setup.clock.slot_at(now);
        if self.next_decision + 2 < now_slot {
            // Asleep (SIGSTOP): coverage facts of long-gone slots say nothing; decide from now.
            self.next_decision = now_slot;
        }
        while self.decision_ms(self.next_decision) <= now {
            let slot = self.next_decision;
            self.choose_source(slot);
            self.next_decision += 1;
        }
    }

    /// The per-slot rule (`select`): which stream feeds slot `slot`, from who delivered the
    /// whole previous slot. On a change, ends the current run and starts the new source at its
    /// keyframe at or before the slot boundary (replayed from its recent media).
    fn choose_source(&mut self, slot: u64) {
        let facts = self.facts(slot);
        let chosen = self.selector.decide(&facts);
        self.switch_feed(slot, chosen, &facts);
    }

    /// What the rule knows for deciding `slot`: per stream, whether it delivered the slot
    /// before and whether it starts this one.
    fn facts(&self, slot: u64) -> Vec<SlotFact<SourceKey>> {
        let clock = self.setup.clock;
        let prev = slot.saturating_sub(1);
        let mut facts: BTreeMap<SourceKey, SlotFact<SourceKey>> = BTreeMap::new();
        for p in self.publishers.values().filter(|p| p.usable()) {
            let fact = facts.entry(p.key.clone()).or_insert_with(|| SlotFact {
                key: p.key.clone(),
                rank: p.rank,
                delivered: false,
                starts: false,
            });
            fact.delivered |= p.coverage.covers(clock, prev);
            fact.starts |= p.coverage.starts(clock, slot);
        }
        facts.into_values().collect()
    }

    /// Routes `chosen` (`None`: the slate) to the transcoder from `slot` on, if it is not the
    /// current feed.
    fn switch_feed(&mut self, slot: u64, chosen: Option<SourceKey>, facts: &[SlotFact<SourceKey>]) {
        let clock = self.setup.clock;
        let prev = slot.saturating_sub(1);
        if self.feed.as_ref().map(|f| &f.key) == chosen.as_ref() {
            return;
        }
        let conn = chosen.as_ref().and_then(|key| {
            self.publishers
                .iter()
                .filter(|(_, p)| p.usable() && &p.key == key)
                .min_by_key(|(id, p)| (p.relayed, !p.coverage.covers(clock, prev), **id))
                .map(|(id, _)| *id)
        });
        let from = self
            .feed
            .as_ref()
            .map_or("-".to_string(), |f| f.label.clone());
        let from_delivered = self
            .feed
            .as_ref()
            .and_then(|f| facts.iter().find(|x| x.key == f.key))
            .is_some_and(|x| x.delivered);
        let label = conn
            .and_then(|id| self.publishers.get(&id))
            .map_or("-".to_string(), |p| {
                format!(
                    "{}@{}",
                    p.key.source,
                    if p.relayed { "relay" } else { "direct" }
                )
            });
        tracing::info!(
            channel = %self.setup.config.name, slot, %from, from_delivered_previous_slot = from_delivered,
            to = %label, "input switch (decided at the slot boundary)"
        );
        if let Some(mut old) = self.feed.take()
            && let Some((run, _)) = &mut old.run
        {
            run.finish();
        }
        self.feed = conn.and_then(|id| {
            let p = self.publishers.get(&id)?;
            Some(Feed {
                publisher: id,
                key: p.key.clone(),
                last_fed: [None; 2],
                label: label.clone(),
                epoch_ms: clock.epoch_for_anchor(p.key.anchor_ms),
                anchor_ms: p.key.anchor_ms,
                run: None,
            })
        });
        self.replay(slot);
        self.update_status();
    }

    /// The active source fell silent for longer than a media gap may last (hung: its
    /// connection stays open, nothing arrives) during the slot decided last. Waiting for the
    /// next decision would cost that slot and often the one before it (its run cannot finish a
    /// segment without the next frames), so both ingests published two slates about a second
    /// late. Instead the slot goes at once to a source that delivered the previous one (the
    /// same facts the decision had; both ingests see the same silence), whose run starts from
    /// its keyframe at the slot's start, and ending the silent run makes ffmpeg flush its last
    /// whole segment. Without such a source nothing changes: a late source may still catch up.
    fn check_silent_feed(&mut self, now: u64) {
        if now.saturating_sub(self.last_wake_ms) > MAX_MEDIA_GAP_MS / 2 {
            // This task did not run meanwhile (the host was hung or starved, or nothing at all
            // arrived): the publishers' silence may be ours, so it counts from now.
            for p in self.publishers.values_mut() {
                p.last_arrival_ms = p.last_arrival_ms.max(now);
            }
        }
        self.last_wake_ms = now;
        let Some(feed) = &self.feed else { return };
        let slot = self.next_decision.saturating_sub(1);
        if self.silence_checked == Some(slot) {
            return;
        }
        let last = self
            .publishers
            .values()
            .filter(|p| p.key == feed.key)
            .map(|p| p.last_arrival_ms)
            .max();
        let Some(silent_ms) = last.map(|t| now.saturating_sub(t)) else {
            return; // every connection of it left: `left` handled it
        };
        if silent_ms <= MAX_MEDIA_GAP_MS {
            return;
        }
        self.silence_checked = Some(slot);
        let facts = self.facts(slot);
        let Some(next) = self.selector.replace_active(&facts) else {
            return;
        };
        tracing::warn!(channel = %self.setup.config.name, source = %feed.label, silent_ms, slot,
            to = %next.source, "active source silent: its slot goes to another source now");
        metrics::counter!("ingest_silent_source_switches_total", "channel" => self.setup.config.name.clone())
            .increment(1);
        self.switch_feed(slot, Some(next), &facts);
    }

    /// Feeds the new source's recent media from its last keyframe at or before `slot`'s start
    /// (or its first kept keyframe), so its run can deliver `slot` whole.
    fn replay(&mut self, slot: u64) {
        let Some(feed) = &self.feed else { return };
        let Some(p) = self.publishers.get(&feed.publisher) else {
            return;
        };
        let boundary = self.setup.clock.slot_start_ms(slot) + SLOT_EDGE_TOLERANCE_MS;
        let anchor = p.key.anchor_ms;
        let start = p
            .recent
            .iter()
            .rposition(|(k, ts, d)| {
                is_key_picture(*k, d) && anchor.saturating_add(u64::from(*ts)) <= boundary
            })
            .or_else(|| p.recent.iter().position(|(k, _, d)| is_key_picture(*k, d)));
        let Some(start) = start else { return };
        let tags: Vec<_> = p.recent.iter().skip(start).cloned().collect();
        tracing::debug!(channel = %self.setup.config.name, slot, tags = tags.len(), "replaying recent media into the new run");
        for (kind, ts, data) in tags {
            self.route(kind, ts, data);
        }
    }

    /// The active connection closed: hand over to another connection of the same stream (a
    /// relayed copy carries identical timestamps, so the run goes on), or end the run and let
    /// the next slot decision pick a source.
    fn left(&mut self, conn: u64) {
        let Some(feed) = &mut self.feed else { return };
        if feed.publisher != conn {
            return;
        }
        let other = self
            .publishers
            .iter()
            .filter(|(_, p)| p.usable() && p.key == feed.key)
            .min_by_key(|(id, p)| (p.relayed, **id))
            .map(|(id, p)| (*id, p.relayed));
        if let Some((id, relayed)) = other {
            tracing::info!(channel = %self.setup.config.name, from = conn, to = id, relayed, "active connection closed: same stream continues from another connection");
            feed.publisher = id;
            return;
        }
        tracing::info!(channel = %self.setup.config.name, source = %feed.label, "active publisher left: slate until the next slot decision");
        if let Some((run, _)) = &mut feed.run {
            run.finish();
        }
        self.feed = None;
    }

    fn segment(&mut self, run_id: u64, rendition: usize, slot: u64, data: Bytes) {
        let n = self.setup.slates.len();
        if rendition >= n {
            return;
        }
        let now_slot = self.setup.clock.slot_at(unix_now_ms());
        if slot < self.next_slot {
            tracing::debug!(channel = %self.setup.config.name, slot, "live segment arrived after its slot was decided: dropped");
            metrics::counter!("ingest_segments_late_total").increment(1);
            return;
        }
        if slot > now_slot + 1 {
            tracing::warn!(channel = %self.setup.config.name, slot, now_slot, "live segment from the future (bad anchor?): dropped");
            return;
        }
        let after_slot_end_ms =
            unix_now_ms() as i64 - self.setup.clock.slot_start_ms(slot + 1) as i64;
        tracing::debug!(channel = %self.setup.config.name, run = run_id, rendition, slot, after_slot_end_ms, "live segment received");
        let entry = self.pending.entry(slot).or_insert_with(|| PendingSlot {
            run_id,
            parts: vec![None; n],
        });
        if entry.run_id == run_id {
            entry.parts[rendition] = Some(data);
            self.run_progress_ms = unix_now_ms();
        }
        self.emit_complete();
    }

    /// Publishes the next slots as soon as every rendition's live segment is in and the slot
    /// has ended, instead of waiting for the deadline: the deadline only exists to decide for a
    /// slate. Saves about `EMIT_GRACE` minus the transcoder's latency of viewer latency.
    fn emit_complete(&mut self) {
        let now = unix_now_ms();
        while self.next_slot_complete()
            && publish_at_ms(self.setup.clock, self.next_slot, true) <= now
        {
            let slot = self.next_slot;
            self.decide(slot);
            self.next_slot += 1;
        }
    }

    /// Publishes every complete slot that has ended, and decides every slot whose deadline
    /// passed.
    fn emit_due(&mut self) {
        let now = unix_now_ms();
        let now_slot = self.setup.clock.slot_at(now);
        if now_slot > self.next_slot + self.cache_segments {
            // Asleep for a long time (SIGSTOP): do not replay a window's worth of slates.
            self.next_slot = now_slot - self.cache_segments;
        }
        self.emit_complete();
        while self.deadline_ms(self.next_slot) <= now {
            let slot = self.next_slot;
            self.decide(slot);
            self.next_slot += 1;
        }
        self.kill_stalled_run(now);
    }

    /// The watchdog: a transcoder that is fed but makes no segments is killed, so the usual crash
    /// path restarts it instead of the slate standing in for it indefinitely.
    fn kill_stalled_run(&mut self, now: u64) {
        let limit =
            STALLED_AFTER_SEGMENTS * self.setup.clock.segment_ms() + EMIT_GRACE.as_millis() as u64;
        let stalled_ms = now.saturating_sub(self.run_progress_ms);
        if stalled_ms <= limit {
            return;
        }
        if let Some(feed) = &mut self.feed
            && let Some((run, _)) = &mut feed.run
        {
            tracing::error!(channel = %self.setup.config.name, stalled_ms, "transcoder made no segment while fed: killing it (it will be restarted)");
            metrics::counter!("ingest_transcoder_stalls_total", "channel" => self.setup.config.name.clone()).increment(1);
            run.kill();
            // One kill per stall: the exit restarts it and resets the clock.
            self.run_progress_ms = now;
        }
    }

    fn decide(&mut self, slot: u64) {
        let live = self
            .pending
            .remove(&slot)
            .filter(|p| p.parts.iter().all(Option::is_some));
        self.pending.retain(|s, _| *s > slot);
        let segment_s = self.setup.clock.segment_seconds();
        let pdt = self.setup.clock.slot_start_ms(slot);
        let (parts, kind): (Vec<Bytes>, LastPushed) = match live {
            Some(p) => (
                p.parts.into_iter().flatten().collect(),
                LastPushed::Live(p.run_id),
            ),
            None => (self.setup.slates.clone(), LastPushed::Slate),
        };
        let discontinuity = kind == LastPushed::Slate || self.last_pushed != Some(kind);
        {
            let mut out = write(&self.shared.output);
            for (r, data) in out.renditions.iter_mut().zip(parts) {
                let info = SegmentInfo {
                    seq: slot,
                    duration_s: segment_s,
                    discontinuity,
                    program_date_time_ms: pdt,
                };
                if let Err(e) = r.window.push(info, data) {
                    tracing::error!(channel = %self.setup.config.name, "timeline: {e}");
                }
            }
        }
        self.last_pushed = Some(kind);
        let live = matches!(kind, LastPushed::Live(_));
        metrics::counter!("ingest_segments_total", "channel" => self.setup.config.name.clone(), "kind" => if live { "live" } else { "slate" }).increment(1);
        {
            let mut status = lock(&self.shared.status);
            status.live = live;
            status.last_slot = Some(slot);
            if live {
                status.segments_live += 1
            } else {
                status.segments_slate += 1
            }
        }
        self.shared.last_slot.send_replace(Some(slot));
    }

    fn update_status(&self) {
        let active = self
            .feed
            .as_ref()
            .and_then(|f| self.publishers.get(&f.publisher));
        let mut status = lock(&self.shared.status);
        status.active_source = active.map(|p| p.key.source.clone());
        status.publishers_connected = self.publishers.len();
        let configured = self.setup.sources.len() as u32;
        status.outside_publishers = self
            .publishers
            .values()
            .filter(|p| !p.relayed && p.rank >= configured)
            .count();
        metrics::gauge!("ingest_publishers_connected", "channel" => self.setup.config.name.clone())
            .set(self.publishers.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_slot_waits_for_its_end_and_a_missing_one_for_the_grace() {
        let clock = SlotClock::new(2);
        let slot = 882_000_000u64;
        let end = clock.slot_start_ms(slot + 1);
        // Live segments that are in before the slot ended (media ahead of the clock) are held
        // until the end, so the playlists keep the slot clock's pace.
        assert_eq!(publish_at_ms(clock, slot, true), end);
        assert_eq!(
            publish_at_ms(clock, slot, false),
            end + EMIT_GRACE.as_millis() as u64
        );
    }
}
