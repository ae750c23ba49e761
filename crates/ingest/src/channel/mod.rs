//! One channel: its publishers, the input switch, the transcoder runs and the slot emission.
//!
//! A single tokio task owns all of it (no locks on the media path); the origin reads the
//! published windows through [`ChannelShared`]. Every slot k is decided once, by
//! (k+1)·D + [`EMIT_GRACE`] at the latest: live parts as far as they came, and the slate for the
//! rest of the slot in every rendition (part by part, see [`SLATE_PART_GRACE`]). So the
//! playlists advance at the clock's pace whatever the input does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use streaming_core::config::ChannelConfig;
use streaming_hls::{SlotClock, unix_now_ms};
use tokio::sync::mpsc;

use crate::flv::{self, TagKind};
use crate::select::{Coverage, Selector, rank_of};
use crate::slate::Slate;
use crate::transcode::{RunEvent, RunHandle};
use streaming_media::{Part, PartClock};

mod emit;
mod output;

pub use output::{ChannelOutput, ChannelShared, RenditionOutput, part_info};
mod input;
mod runs;

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

/// A live part missing this long after its media should have ended is replaced by the slate
/// from there to the end of its slot, and the slate parts are shown at the clock's pace, each
/// this long after its end: more than the transcoder takes to make a part, well within a
/// low-latency viewer's buffer (PART-HOLD-BACK).
pub const SLATE_PART_GRACE: Duration = Duration::from_millis(1000);

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

/// The parts of a slot the transcoder made, per rendition, before the slot is decided.
struct PendingSlot {
    run_id: u64,
    renditions: Vec<PendingRendition>,
}

#[derive(Default, Clone)]
struct PendingRendition {
    parts: Vec<Part>,
    /// The transcoder finished the segment and its parts cover the slot.
    complete: bool,
}

impl PendingSlot {
    fn complete(&self) -> bool {
        self.renditions.iter().all(|r| r.complete)
    }
}

/// The next slot finished by the slate, part by part: per rendition, the live parts it has
/// (none when no live part came in time) followed by the slate's parts from there on.
struct Slating {
    slot: u64,
    parts: Vec<Vec<Part>>,
    /// Live parts at the front of each rendition's `parts`.
    live: Vec<usize>,
    /// The run that made them; `None` when the whole slot is slate.
    run_id: Option<u64>,
    /// A slate part is shown this long after the end of its media: [`SLATE_PART_GRACE`] when
    /// live media is late (it may still be coming), 0 once its run is known to add nothing.
    lag_ms: u64,
}

/// Settings fixed for the channel task's life (the ladder shape is, see `Reconfigure`).
pub struct ChannelSetup {
    pub config: ChannelConfig,
    pub sources: Vec<String>,
    pub clock: SlotClock,
    /// Segment and part durations, as the cutters use them.
    pub parts: PartClock,
    pub slates: Vec<Slate>,
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
    /// The slot being finished by the slate part by part.
    slating: Option<Slating>,
    next_slot: u64,
    last_pushed: Option<LastPushed>,
    cache_segments: u64,
    selector: Selector<SourceKey>,
    /// The next slot whose source is to be decided.
    next_decision: u64,
    /// The last slot for which a silent active source was looked at (once per slot).
    silence_checked: Option<u64>,
    /// A switch away from a source that still delivers, made when its media reaches the start
    /// of this slot: its run then completes the slot it is in (a run ended inside a slot
    /// leaves the rest of that slot to the slate).
    planned_switch: Option<(u64, SourceKey)>,
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
            slating: None,
            next_slot,
            last_pushed: None,
            cache_segments: u64::from(cache_segments),
            selector,
            next_decision: next_slot + 1,
            silence_checked: None,
            planned_switch: None,
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
        loop {
            let now = unix_now_ms();
            let emit_at =
                publish_at_ms(self.setup.clock, self.next_slot, self.next_slot_complete())
                    .min(self.next_slate_ms());
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
            .is_some_and(PendingSlot::complete)
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
            ChannelMsg::Run(RunEvent::Part {
                run_id,
                rendition,
                part,
            }) => self.part(run_id, rendition, part),
            ChannelMsg::Run(RunEvent::SegmentEnd {
                run_id,
                rendition,
                slot,
                complete,
            }) => self.segment_end(run_id, rendition, slot, complete),
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
