//! Emission: parts from the runs shown as they come, and each slot decided once (when complete,
//! or at its deadline), live or slate, in every rendition; the status the origin shows.

use streaming_hls::{SegmentInfo, unix_now_ms};

use streaming_core::sync::{lock, write};

use streaming_media::Part;

use crate::select::MAX_MEDIA_GAP_MS;
use crate::transcode::SegmentMedia;

use super::{
    ChannelTask, LastPushed, PendingRendition, PendingSlot, SLATE_PART_GRACE, Slating,
    publish_at_ms,
};

impl ChannelTask {
    /// A part from a run: kept for its slot's decision, and shown at once when its slot is the
    /// next to be decided (low-latency playlists list it before the segment is complete).
    pub(super) fn part(&mut self, run_id: u64, rendition: usize, part: Part) {
        let n = self.setup.slates.len();
        let slot = part.slot;
        if rendition >= n
            || !self.accepts(slot)
            || self.slating.as_ref().is_some_and(|s| s.slot == slot)
        {
            return;
        }
        if !self.setup.parts.fits(part.index, part.duration_s)
            && self.setup.slates[rendition].can_follow(&part)
        {
            // Cut short by the end of its run, or stretched over a hole in the input: the
            // slate stands in from this part on, so the timeline keeps every part whole.
            tracing::info!(channel = %self.setup.config.name, run = run_id, rendition, slot,
                index = part.index, duration_s = part.duration_s, "live part does not fill its place: the slate takes over from it");
            if slot == self.next_slot && self.pending.get(&slot).is_some_and(|p| p.run_id == run_id)
            {
                self.publish_short_slot();
            }
            return;
        }
        // A newer run delivers a later slot: the run that left the next slot short will add
        // nothing to it, so it is published now, as far as it goes, instead of at its deadline
        // (low-latency viewers would wait for it with only PART-HOLD-BACK of buffer).
        if slot > self.next_slot
            && self
                .pending
                .get(&self.next_slot)
                .is_some_and(|p| p.run_id != run_id)
        {
            self.publish_short_slot();
        }
        let entry = self.pending.entry(slot).or_insert_with(|| PendingSlot {
            run_id,
            renditions: vec![PendingRendition::default(); n],
        });
        if entry.run_id != run_id {
            return;
        }
        let parts = &mut entry.renditions[rendition].parts;
        if part.index as usize != parts.len() {
            // A gap: the segment will not be complete, and parts after it cannot be listed.
            return;
        }
        // How long after the end of its media a part is published: the transcoder's and the
        // cutter's share of the latency (docs/latency.md).
        let end_ms = self.setup.clock.slot_start_ms(slot) as f64
            + f64::from(part.index) * self.setup.parts.part_ms as f64
            + part.duration_s * 1000.0;
        metrics::histogram!("ingest_part_delay_seconds", "channel" => self.setup.config.name.clone())
            .record((unix_now_ms() as f64 - end_ms).max(0.0) / 1000.0);
        parts.push(part);
        self.run_progress_ms = unix_now_ms();
        if slot == self.next_slot {
            self.show_building(rendition);
        }
    }

    /// The transcoder is done with a slot in one rendition.
    pub(super) fn segment_end(&mut self, run_id: u64, rendition: usize, slot: u64, complete: bool) {
        if !self.accepts(slot) {
            return;
        }
        if let Some(entry) = self.pending.get_mut(&slot)
            && entry.run_id == run_id
            && let Some(r) = entry.renditions.get_mut(rendition)
        {
            r.complete = complete;
            let after_slot_end_ms =
                unix_now_ms() as i64 - self.setup.clock.slot_start_ms(slot + 1) as i64;
            tracing::debug!(channel = %self.setup.config.name, run = run_id, rendition, slot, complete, after_slot_end_ms, "live segment made");
        }
        self.emit_complete();
    }

    /// Media for a slot still to be decided, and not from the future.
    fn accepts(&self, slot: u64) -> bool {
        let now_slot = self.setup.clock.slot_at(unix_now_ms());
        if slot < self.next_slot {
            tracing::debug!(channel = %self.setup.config.name, slot, "live media arrived after its slot was decided: dropped");
            metrics::counter!("ingest_segments_late_total", "channel" => self.setup.config.name.clone())
                .increment(1);
            return false;
        }
        if slot > now_slot + 1 {
            tracing::warn!(channel = %self.setup.config.name, slot, now_slot, "live media from the future (bad anchor?): dropped");
            return false;
        }
        true
    }

    /// The run of the next slot will add nothing more to it: the slate finishes it part by
    /// part from where its live parts stop, each slate part shown as soon as its time has
    /// come. When the slate cannot follow those parts (another init segment), the slot is
    /// published now as far as its live parts go.
    pub(super) fn publish_short_slot(&mut self) {
        let slot = self.next_slot;
        if let Some(slating) = self.slating.as_mut().filter(|s| s.slot == slot) {
            slating.lag_ms = 0;
        } else if !self.has_live_parts(slot) || self.next_slot_complete() {
            return;
        } else if !self.start_slating(0) {
            self.decide(slot);
            return;
        }
        self.show_slating(unix_now_ms());
    }

    /// The run that made the next slot's parts so far, if any.
    pub(super) fn next_slot_run(&self) -> Option<u64> {
        let slot = self.next_slot;
        match &self.slating {
            Some(s) if s.slot == slot => s.run_id,
            _ => self.pending.get(&slot).map(|p| p.run_id),
        }
    }

    /// How long after its end a slate part is shown when live media is missing: the grace a
    /// late part gets while some publisher sends media, none when none does (nothing can come
    /// for the slot, and a low-latency viewer's buffer is better kept full).
    fn slate_lag_ms(&self) -> u64 {
        let now = unix_now_ms();
        let sending = self
            .publishers
            .values()
            .any(|p| p.usable() && now.saturating_sub(p.last_arrival_ms) <= MAX_MEDIA_GAP_MS);
        if sending {
            SLATE_PART_GRACE.as_millis() as u64
        } else {
            0
        }
    }

    /// When the next slot's live media is late enough for the slate (unix ms): the end of the
    /// first part some rendition is missing, plus [`Self::slate_lag_ms`]. Never while live
    /// parts that the slate cannot follow are there (they are published short instead).
    fn live_late_ms(&self) -> u64 {
        let slot = self.next_slot;
        if self.next_slot_complete() {
            return u64::MAX;
        }
        let start = self.setup.clock.slot_start_ms(slot);
        let clock = self.setup.parts;
        let grace = self.slate_lag_ms();
        let pending = self.pending.get(&slot);
        let mut late = u64::MAX;
        for (r, slate) in self.setup.slates.iter().enumerate() {
            let live = pending.map_or(&[][..], |p| &p.renditions[r].parts[..]);
            if live.last().is_some_and(|last| !slate.can_follow(last)) {
                return u64::MAX;
            }
            if live.len() < clock.parts_per_segment() as usize {
                let end = ((live.len() as u64 + 1) * clock.part_ms).min(clock.segment_ms);
                late = late.min(start + end + grace);
            }
        }
        late
    }

    /// Starts finishing the next slot with the slate (see [`super::Slating`]). False when the
    /// slate cannot follow its live parts.
    fn start_slating(&mut self, lag_ms: u64) -> bool {
        let slot = self.next_slot;
        let pending = self.pending.get(&slot);
        let (mut parts, mut live) = (Vec::new(), Vec::new());
        for (r, slate) in self.setup.slates.iter().enumerate() {
            let own = pending.map_or(&[][..], |p| &p.renditions[r].parts[..]);
            let slate_parts = match slate.parts(slot) {
                Ok(parts) => parts,
                Err(e) => {
                    tracing::error!(channel = %self.setup.config.name, slot, "slate: {e:#}");
                    return false;
                }
            };
            let rest: Vec<Part> = slate_parts.into_iter().skip(own.len()).collect();
            let joins = own.last().is_none_or(|last| slate.can_follow(last))
                && rest.first().is_none_or(|p| p.independent);
            if !joins {
                return false;
            }
            live.push(own.len());
            parts.push(own.iter().cloned().chain(rest).collect());
        }
        let run_id = pending
            .filter(|_| live.iter().any(|n| *n > 0))
            .map(|p| p.run_id);
        tracing::info!(channel = %self.setup.config.name, slot, ?live, lag_ms, "live parts stop: the slate finishes the slot part by part");
        self.pending.remove(&slot);
        self.slating = Some(Slating {
            slot,
            parts,
            live,
            run_id,
            lag_ms,
        });
        true
    }

    /// Finishes the next slot with the slate once a live part of it is late (see
    /// [`Self::live_late_ms`]), and shows the slate parts that are due.
    fn slate_due(&mut self, now: u64) {
        let slot = self.next_slot;
        if self.slating.as_ref().is_none_or(|s| s.slot != slot) {
            if now < self.live_late_ms() {
                return;
            }
            if !self.start_slating(self.slate_lag_ms()) {
                // Only a slate that cannot be cut gets here (it was cut once at start): the
                // slot goes as it is rather than this being asked again at once.
                self.decide(slot);
                return;
            }
        }
        self.show_slating(now);
    }

    /// Shows the parts of the slot being slated whose time has come, and decides the slot once
    /// all are shown and its end has passed.
    fn show_slating(&mut self, now: u64) {
        let Some(slating) = self.slating.as_ref().filter(|s| s.slot == self.next_slot) else {
            return;
        };
        let slot = slating.slot;
        let start = self.setup.clock.slot_start_ms(slot);
        let due =
            (now.saturating_sub(start + slating.lag_ms) / self.setup.parts.part_ms.max(1)) as usize;
        let info = SegmentInfo {
            seq: slot,
            duration_s: 0.0,
            discontinuity: slating
                .run_id
                .is_none_or(|run| self.last_pushed != Some(LastPushed::Live(run))),
            program_date_time_ms: start,
            map: None,
            parts: Vec::new(),
        };
        let mut all_shown = true;
        {
            let mut out = write(&self.shared.output);
            for ((r, parts), live) in out
                .renditions
                .iter_mut()
                .zip(&slating.parts)
                .zip(&slating.live)
            {
                let shown = due.max(*live).min(parts.len());
                all_shown &= shown == parts.len();
                r.show_building(info.clone(), &parts[..shown]);
            }
        }
        self.shared.published.announce();
        if all_shown && now >= self.setup.clock.slot_start_ms(slot + 1) + slating.lag_ms {
            self.decide(slot);
        }
    }

    /// When the next slot's slating has something to do next (unix ms).
    pub(super) fn next_slate_ms(&self) -> u64 {
        let slot = self.next_slot;
        let Some(slating) = self.slating.as_ref().filter(|s| s.slot == slot) else {
            return self.live_late_ms();
        };
        let start = self.setup.clock.slot_start_ms(slot) + slating.lag_ms;
        let part_ms = self.setup.parts.part_ms.max(1);
        let due = unix_now_ms().saturating_sub(start) / part_ms + 1;
        let most = slating.parts.iter().map(Vec::len).max().unwrap_or(0) as u64;
        if due > most {
            self.setup.clock.slot_start_ms(slot + 1) + slating.lag_ms
        } else {
            start + due * part_ms
        }
    }

    fn has_live_parts(&self, slot: u64) -> bool {
        self.pending
            .get(&slot)
            .is_some_and(|p| p.renditions.iter().any(|r| !r.parts.is_empty()))
    }

    /// Shows the parts of the next slot made so far in one rendition.
    fn show_building(&mut self, rendition: usize) {
        let slot = self.next_slot;
        let Some(entry) = self.pending.get(&slot) else {
            return;
        };
        let info = SegmentInfo {
            seq: slot,
            duration_s: 0.0,
            discontinuity: self.last_pushed != Some(LastPushed::Live(entry.run_id)),
            program_date_time_ms: self.setup.clock.slot_start_ms(slot),
            map: None,
            parts: Vec::new(),
        };
        let parts = &entry.renditions[rendition].parts;
        write(&self.shared.output).renditions[rendition].show_building(info, parts);
        self.shared.published.announce();
    }

    /// Publishes the next slots as soon as every rendition's live segment is in and the slot
    /// has ended, instead of waiting for the deadline: the deadline only exists to decide for a
    /// slate. Saves about `EMIT_GRACE` minus the transcoder's latency of viewer latency.
    pub(super) fn emit_complete(&mut self) {
        let now = unix_now_ms();
        while self.next_slot_complete()
            && publish_at_ms(self.setup.clock, self.next_slot, true) <= now
        {
            let slot = self.next_slot;
            self.decide(slot);
        }
    }

    /// Publishes every complete slot that has ended, and decides every slot whose deadline
    /// passed.
    pub(super) fn emit_due(&mut self) {
        let now = unix_now_ms();
        let now_slot = self.setup.clock.slot_at(now);
        if now_slot > self.next_slot + self.cache_segments {
            // Asleep for a long time (SIGSTOP): do not replay a window's worth of slates.
            self.next_slot = now_slot - self.cache_segments;
        }
        self.emit_complete();
        self.slate_due(now);
        while self.deadline_ms(self.next_slot) <= now {
            let slot = self.next_slot;
            self.decide(slot);
        }
        self.kill_stalled_run(now);
    }

    /// Publishes slot `slot` (the next one) in every rendition, then shows the parts of the
    /// one after it made so far. Live when the run made parts for it: a segment cut short (the
    /// run ended inside the slot) is published short rather than replaced, since players may
    /// have played its parts; a rendition without any part gets the slate.
    pub(super) fn decide(&mut self, slot: u64) {
        let pending = self.pending.remove(&slot);
        self.pending.retain(|s, _| *s > slot);
        let slating = self.slating.take().filter(|s| s.slot == slot);
        let pdt = self.setup.clock.slot_start_ms(slot);
        let slates = || self.slate_segments(slot);
        let (parts, kind): (Vec<SegmentMedia>, LastPushed) = match (slating, pending) {
            (Some(slating), _) => {
                let media = slating
                    .parts
                    .iter()
                    .filter_map(|parts| SegmentMedia::from_parts(parts))
                    .collect();
                (
                    media,
                    slating.run_id.map_or(LastPushed::Slate, LastPushed::Live),
                )
            }
            (None, Some(p)) if p.renditions.iter().any(|r| !r.parts.is_empty()) => {
                let mut slate = None;
                let media = p
                    .renditions
                    .iter()
                    .enumerate()
                    .filter_map(|(i, r)| {
                        SegmentMedia::from_parts(&r.parts)
                            .or_else(|| slate.get_or_insert_with(slates).get(i).cloned())
                    })
                    .collect();
                if !p.complete() {
                    tracing::warn!(channel = %self.setup.config.name, slot, "live segment cut short: published as far as it goes");
                }
                (media, LastPushed::Live(p.run_id))
            }
            _ => (slates(), LastPushed::Slate),
        };
        let discontinuity = kind == LastPushed::Slate || self.last_pushed != Some(kind);
        {
            let mut out = write(&self.shared.output);
            for (r, media) in out.renditions.iter_mut().zip(parts) {
                let info = SegmentInfo {
                    seq: slot,
                    duration_s: media.parts.iter().map(|p| p.duration_s).sum(),
                    discontinuity,
                    program_date_time_ms: pdt,
                    map: None,
                    parts: Vec::new(),
                };
                if let Err(e) = r.push(info, media) {
                    tracing::error!(channel = %self.setup.config.name, "timeline: {e}");
                }
            }
        }
        self.last_pushed = Some(kind);
        let live = matches!(kind, LastPushed::Live(_));
        let channel = self.setup.config.name.clone();
        metrics::counter!("ingest_segments_total", "channel" => channel.clone(), "kind" => if live { "live" } else { "slate" }).increment(1);
        // What `/status` says too: whether the last segment made was live, not the slate.
        metrics::gauge!("ingest_channel_live", "channel" => channel).set(if live {
            1.0
        } else {
            0.0
        });
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
        self.next_slot = slot + 1;
        for rendition in 0..self.setup.slates.len() {
            self.show_building(rendition);
        }
        self.shared.published.announce();
    }

    /// The slate of every rendition, cut for this slot. A rendition whose slate cannot be cut
    /// (it was cut once at start, so this is not expected) misses the slot.
    fn slate_segments(&self, slot: u64) -> Vec<SegmentMedia> {
        self.setup
            .slates
            .iter()
            .filter_map(|slate| {
                slate
                    .segment(slot)
                    .map_err(|e| tracing::error!(channel = %self.setup.config.name, slot, "slate: {e:#}"))
                    .ok()
            })
            .collect()
    }

    pub(super) fn update_status(&self) {
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
