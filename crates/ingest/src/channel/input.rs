//! The input side of a channel: media from its publishers, which source feeds the transcoder
//! in each slot (decided once per slot, the same way on every ingest), and feeds that fell
//! silent.

use std::collections::BTreeMap;
use std::time::Instant;

use bytes::Bytes;
use streaming_hls::unix_now_ms;

use crate::flv::{self, TagKind};
use crate::select::{MAX_MEDIA_GAP_MS, SLOT_EDGE_TOLERANCE_MS, SlotFact};
use crate::transcode::FeedError;

use super::{ChannelTask, Feed, MAX_RECENT_BYTES, MAX_RECENT_TAGS, SourceKey, is_key_picture};

impl ChannelTask {
    pub(super) fn media(&mut self, conn: u64, kind: TagKind, timestamp_ms: u32, data: Bytes) {
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
        if self.feed.as_ref().is_some_and(|f| f.publisher == conn)
            && kind == TagKind::Video
            && !flv::is_avc_sequence_header(&data)
            && let Some(p) = self.publishers.get(&conn)
        {
            self.switch_if_planned(p.key.anchor_ms.saturating_add(u64::from(timestamp_ms)));
        }
        if self.feed.as_ref().is_some_and(|f| f.publisher == conn) {
            if kind == TagKind::Video
                && let Some(p) = self.publishers.get(&conn)
            {
                // How long after its wall-clock time a picture reaches us: the source's and the
                // network's share of the latency (docs/latency.md).
                let media_ms = p.key.anchor_ms.saturating_add(u64::from(timestamp_ms));
                let late_ms = unix_now_ms().saturating_sub(media_ms);
                metrics::histogram!("ingest_media_arrival_delay_seconds", "channel" => self.setup.config.name.clone())
                    .record(late_ms as f64 / 1000.0);
            }
            self.route(kind, timestamp_ms, data);
        }
    }

    /// Hands one tag of the active publisher to the transcoder (starting a run at a keyframe).
    pub(super) fn route(&mut self, kind: TagKind, timestamp_ms: u32, data: Bytes) {
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

    /// The active connection closed: hand over to another connection of the same stream (a
    /// relayed copy carries identical timestamps, so the run goes on), or end the run and let
    /// the next slot decision pick a source.
    pub(super) fn left(&mut self, conn: u64) {
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

    /// Feeds the new source's recent media from its last keyframe at or before `slot`'s start
    /// (or its first kept keyframe), so its run can deliver `slot` whole.
    pub(super) fn replay(&mut self, slot: u64) {
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

    /// The active source fell silent for longer than a media gap may last (hung: its
    /// connection stays open, nothing arrives) during the slot decided last. Waiting for the
    /// next decision would cost that slot and often the one before it (its run cannot finish a
    /// segment without the next frames), so both ingests published two slates about a second
    /// late. Instead the slot goes at once to a source that delivered the previous one (the
    /// same facts the decision had; both ingests see the same silence), whose run starts from
    /// its keyframe at the slot's start, and ending the silent run makes ffmpeg flush its last
    /// whole segment. Without such a source nothing changes: a late source may still catch up.
    pub(super) fn check_silent_feed(&mut self, now: u64) {
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
            // Nobody takes over: the slot the silent source left short gets nothing more, so it
            // is published now and the slate follows part by part (low-latency viewers hold
            // only PART-HOLD-BACK); the source's return starts a later slot.
            self.publish_short_slot();
            return;
        };
        tracing::warn!(channel = %self.setup.config.name, source = %feed.label, silent_ms, slot,
            to = %next.source, "active source silent: its slot goes to another source now");
        metrics::counter!("ingest_silent_source_switches_total", "channel" => self.setup.config.name.clone())
            .increment(1);
        self.switch_feed(slot, Some(next), &facts);
    }

    /// Decides the source of every slot whose decision time has come.
    pub(super) fn decide_due(&mut self) {
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
    ///
    /// A switch away from a source that delivered the previous slot and still sends is planned
    /// for the next slot boundary instead (see `planned_switch`): the choice is made after the
    /// boundary, when the current run is already inside this slot.
    pub(super) fn choose_source(&mut self, slot: u64) {
        let facts = self.facts(slot);
        let chosen = self.selector.decide(&facts);
        let overdue = self.planned_switch.take().is_some_and(|(at, _)| at <= slot);
        let now = unix_now_ms();
        let current_delivers = self.feed.as_ref().is_some_and(|f| {
            f.run.is_some()
                && facts.iter().any(|x| x.key == f.key && x.delivered)
                && self.publishers.values().any(|p| {
                    p.key == f.key && now.saturating_sub(p.last_arrival_ms) <= MAX_MEDIA_GAP_MS
                })
        });
        if let Some(next) = chosen.as_ref()
            && !overdue
            && current_delivers
            && self.feed.as_ref().is_some_and(|f| &f.key != next)
        {
            tracing::info!(channel = %self.setup.config.name, slot = slot + 1, to = %next.source,
                "input switch planned at the next slot boundary");
            self.planned_switch = Some((slot + 1, next.clone()));
            return;
        }
        self.switch_feed(slot, chosen, &facts);
    }

    /// Makes the planned switch when the current source's media reaches its slot.
    fn switch_if_planned(&mut self, wall_ms: u64) {
        let Some((slot, key)) = self.planned_switch.clone() else {
            return;
        };
        if wall_ms < self.setup.clock.slot_start_ms(slot) {
            return;
        }
        if !self.publishers.values().any(|p| p.usable() && p.key == key) {
            // The source it was for left meanwhile: the current one goes on.
            self.planned_switch = None;
            return;
        }
        let facts = self.facts(slot);
        self.switch_feed(slot, Some(key), &facts);
    }

    /// What the rule knows for deciding `slot`: per stream, whether it delivered the slot
    /// before and whether it starts this one.
    pub(super) fn facts(&self, slot: u64) -> Vec<SlotFact<SourceKey>> {
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
    pub(super) fn switch_feed(
        &mut self,
        slot: u64,
        chosen: Option<SourceKey>,
        facts: &[SlotFact<SourceKey>],
    ) {
        let clock = self.setup.clock;
        let prev = slot.saturating_sub(1);
        self.planned_switch = None;
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
}
