//! The transcoder runs of a channel: started on a keyframe, restarted after a crash with a
//! backoff, killed when stalled.

use std::time::Instant;

use bytes::Bytes;
use streaming_hls::unix_now_ms;

use crate::flv::{self, TagKind};
use crate::transcode::{RunExit, RunSpec, start_run};
use streaming_core::sync::lock;

use super::{
    BACKOFF_FIRST, BACKOFF_MAX, ChannelTask, EMIT_GRACE, RUN_HEALTHY_AFTER, STALLED_AFTER_SEGMENTS,
};

impl ChannelTask {
    /// Starts a transcoder run at this keyframe: FLV header, sequence headers, then the frame.
    pub(super) fn start_run(&mut self, flv_ts: u32, keyframe: &Bytes) {
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
        let spec = RunSpec {
            channel_name: self.setup.config.name.clone(),
            run_id,
            config: self.setup.config.clone(),
            clock: self.setup.parts,
            epoch_ms: feed.epoch_ms,
            first_frame_ms,
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

    pub(super) fn note_crash(&mut self) {
        self.crashes_in_row += 1;
        let backoff = BACKOFF_FIRST
            .saturating_mul(1 << self.crashes_in_row.min(4).saturating_sub(1))
            .min(BACKOFF_MAX);
        self.backoff_until = Some(Instant::now() + backoff);
        metrics::counter!("ingest_ffmpeg_restarts_total", "channel" => self.setup.config.name.clone()).increment(1);
        lock(&self.shared.status).ffmpeg_restarts += 1;
    }

    pub(super) fn run_exited(&mut self, run_id: u64, exit: RunExit) {
        // Everything this run made has been handed over: a slot it left short is published now
        // rather than at its deadline (low-latency viewers hold only PART-HOLD-BACK).
        if self.next_slot_run() == Some(run_id) {
            self.publish_short_slot();
        }
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

    /// The watchdog: a transcoder that is fed but makes no segments is killed, so the usual crash
    /// path restarts it instead of the slate standing in for it indefinitely.
    pub(super) fn kill_stalled_run(&mut self, now: u64) {
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
}
