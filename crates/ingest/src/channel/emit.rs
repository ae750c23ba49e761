//! Emission: parts from the runs shown as they come, and each slot decided once (when complete,
//! or at its deadline), live or slate, in every rendition; the status the origin shows.

use streaming_hls::{SegmentInfo, unix_now_ms};

use streaming_core::sync::{lock, write};

use streaming_media::Part;

use crate::transcode::SegmentMedia;

use super::{
    ChannelTask, LastPushed, PendingRendition, PendingSlot, SLATE_PART_GRACE, publish_at_ms,
};

impl ChannelTask {
    /// A part from a run: kept for its slot's decision, and shown at once when its slot is the
    /// next to be decided (low-latency playlists list it before the segment is complete).
    pub(super) fn part(&mut self, run_id: u64, rendition: usize, part: Part) {
        let n = self.setup.slates.len();
        let slot = part.slot;
        if rendition >= n
            || !self.accepts(slot)
            || self.slating.as_ref().is_some_and(|(s, _)| *s == slot)
        {
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
            metrics::counter!("ingest_segments_late_total").increment(1);
            return false;
        }
        if slot > now_slot + 1 {
            tracing::warn!(channel = %self.setup.config.name, slot, now_slot, "live media from the future (bad anchor?): dropped");
            return false;
        }
        true
    }

    /// Publishes the next slot now, as far as its live parts go, when it has some and is not
    /// complete (its run will add nothing more).
    pub(super) fn publish_short_slot(&mut self) {
        let slot = self.next_slot;
        if self.has_live_parts(slot) && !self.next_slot_complete() {
            self.decide(slot);
        }
    }

    /// Slates the next slot part by part when no live part of it came in time: each slate part
    /// is shown [`SLATE_PART_GRACE`] after its end, and the slot is decided once all are.
    fn slate_due(&mut self, now: u64) {
        let slot = self.next_slot;
        let start = self.setup.clock.slot_start_ms(slot);
        let (part_ms, grace) = (
            self.setup.parts.part_ms.max(1),
            SLATE_PART_GRACE.as_millis() as u64,
        );
        if self.slating.as_ref().map(|(s, _)| *s) != Some(slot) {
            if self.has_live_parts(slot) || now < start + part_ms + grace {
                return;
            }
            let parts = self
                .setup
                .slates
                .iter()
                .map(|slate| slate.parts(slot).unwrap_or_default())
                .collect();
            tracing::info!(channel = %self.setup.config.name, slot, "no live part in time: slate shown part by part");
            self.pending.remove(&slot);
            self.slating = Some((slot, parts));
        }
        let due = (now.saturating_sub(start + grace) / part_ms) as usize;
        let Some((_, parts)) = &self.slating else {
            return;
        };
        let info = SegmentInfo {
            seq: slot,
            duration_s: 0.0,
            discontinuity: true,
            program_date_time_ms: start,
            map: None,
            parts: Vec::new(),
        };
        let all_shown = parts.iter().all(|p| p.len() <= due);
        {
            let mut out = write(&self.shared.output);
            for (r, slate) in out.renditions.iter_mut().zip(parts) {
                r.show_building(info.clone(), &slate[..due.min(slate.len())]);
            }
        }
        self.shared.published.announce();
        if all_shown && now >= self.setup.clock.slot_start_ms(slot + 1) + grace {
            self.slating = None;
            self.decide(slot);
        }
    }

    /// When the slating of the next slot has something to do next (unix ms).
    pub(super) fn next_slate_ms(&self) -> u64 {
        let slot = self.next_slot;
        let start = self.setup.clock.slot_start_ms(slot);
        let (part_ms, grace) = (
            self.setup.parts.part_ms.max(1),
            SLATE_PART_GRACE.as_millis() as u64,
        );
        match &self.slating {
            Some((s, parts)) if *s == slot => {
                let now = unix_now_ms();
                let due = now.saturating_sub(start + grace) / part_ms + 1;
                let most = parts.iter().map(Vec::len).max().unwrap_or(0) as u64;
                if due > most {
                    self.setup.clock.slot_start_ms(slot + 1) + grace
                } else {
                    start + grace + due * part_ms
                }
            }
            _ if self.has_live_parts(slot) => u64::MAX,
            _ => start + part_ms + grace,
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
        let pdt = self.setup.clock.slot_start_ms(slot);
        let slates = || self.slate_segments(slot);
        let (parts, kind): (Vec<SegmentMedia>, LastPushed) = match pending {
            Some(p) if p.renditions.iter().any(|r| !r.parts.is_empty()) => {
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
