//! Emission: segments from the runs, and each slot decided once at its deadline, live or slate,
//! in every rendition; the status the origin shows.

use streaming_hls::{SegmentInfo, unix_now_ms};

use streaming_core::sync::{lock, write};

use crate::transcode::SegmentMedia;

use super::{ChannelTask, LastPushed, PendingSlot, publish_at_ms};

impl ChannelTask {
    pub(super) fn segment(
        &mut self,
        run_id: u64,
        rendition: usize,
        slot: u64,
        media: SegmentMedia,
    ) {
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
            entry.parts[rendition] = Some(media);
            self.run_progress_ms = unix_now_ms();
        }
        self.emit_complete();
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
            self.next_slot += 1;
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
        while self.deadline_ms(self.next_slot) <= now {
            let slot = self.next_slot;
            self.decide(slot);
            self.next_slot += 1;
        }
        self.kill_stalled_run(now);
    }

    pub(super) fn decide(&mut self, slot: u64) {
        let live = self
            .pending
            .remove(&slot)
            .filter(|p| p.parts.iter().all(Option::is_some));
        self.pending.retain(|s, _| *s > slot);
        let segment_s = self.setup.clock.segment_seconds();
        let pdt = self.setup.clock.slot_start_ms(slot);
        let (parts, kind): (Vec<SegmentMedia>, LastPushed) = match live {
            Some(p) => (
                p.parts.into_iter().flatten().collect(),
                LastPushed::Live(p.run_id),
            ),
            None => (self.slate_segments(slot), LastPushed::Slate),
        };
        let discontinuity = kind == LastPushed::Slate || self.last_pushed != Some(kind);
        {
            let mut out = write(&self.shared.output);
            for (r, media) in out.renditions.iter_mut().zip(parts) {
                let info = SegmentInfo {
                    seq: slot,
                    duration_s: segment_s,
                    discontinuity,
                    program_date_time_ms: pdt,
                    map: None,
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
        self.shared.last_slot.send_replace(Some(slot));
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
