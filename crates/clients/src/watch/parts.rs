//! Low-latency playback, as hls.js does it in `lowLatencyMode`: start PART-HOLD-BACK behind the
//! newest part, then part after part, each asked for with a blocking playlist reload
//! (`_HLS_msn`/`_HLS_part`) while the preload-hinted part is requested before it exists (which
//! hls.js does not do; Safari does). Like the page, a reload unanswered for two part targets
//! leads to a quick plain request, and only a broadcast that does not answer that is left.

use std::time::{Duration, Instant};

use anyhow::bail;
use streaming_hls::parse::ParsedPart;
use streaming_hls::{ParsedMedia, ParsedSegment, parse_media};
use url::Url;

use super::viewer::{Playback, Viewer, rebase};

/// What comes next in a low-latency playlist.
enum Next {
    Part(ParsedPart),
    /// A full segment whose parts are no longer listed (we fell behind).
    Segment(ParsedSegment),
    NotYet,
}

/// The part (or part-less segment) at `want`, moving to the next segment's first part when
/// `want` is past the end of a full segment.
fn next_in(list: &ParsedMedia, want: (u64, u32)) -> (Next, (u64, u32)) {
    let low = &list.low_latency;
    if let Some(part) = low.parts.iter().find(|p| (p.seq, p.index) == want) {
        return (Next::Part(part.clone()), want);
    }
    let full = list.segments.iter().find(|s| s.seq == want.0);
    match full {
        Some(segment) if low.parts_of(want.0).count() == 0 && want.1 == 0 => {
            (Next::Segment(segment.clone()), want)
        }
        Some(_) => next_in(list, (want.0 + 1, 0)),
        None if list.segments.first().is_some_and(|f| want.0 < f.seq) => {
            // Fell out of the window: the oldest listed segment.
            next_in(list, (list.segments[0].seq, 0))
        }
        None => (Next::NotYet, want),
    }
}

/// Where playback starts: the part whose start is at least PART-HOLD-BACK before the end of
/// the newest part (3 part targets without the attribute).
fn start_part(list: &ParsedMedia) -> Option<(u64, u32)> {
    let low = &list.low_latency;
    let hold = low
        .part_hold_back_s
        .or(low.part_target_s.map(|t| 3.0 * t))?;
    let mut behind = 0.0;
    for part in low.parts.iter().rev() {
        behind += part.duration_s;
        if behind >= hold {
            return Some((part.seq, part.index));
        }
    }
    low.parts.first().map(|p| (p.seq, p.index))
}

/// How long a part or a blocking reload may take before the broadcast is asked whether it is
/// alive: two part targets, when a new part is due every part target.
fn blocking_timeout(list: Option<&ParsedMedia>) -> Duration {
    let part = list
        .and_then(|l| l.low_latency.part_target_s)
        .unwrap_or(0.5);
    Duration::from_secs_f64(2.0 * part)
}

/// A live broadcast answers a plain playlist request in milliseconds; one that does not within
/// this is dead or hung.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

impl Viewer {
    /// One step: play the next part if the playlist lists it, else wait for it.
    pub(super) async fn step_low_latency(
        &mut self,
        p: &mut Playback,
        started: Instant,
        seconds: u64,
    ) -> anyhow::Result<()> {
        let Some(list) = &p.playlist else {
            return self.reload(p, None).await;
        };
        let Some(want) = p.next_part.or_else(|| start_part(list)) else {
            // No part listed yet (the channel just started): plain reloads until there is.
            tokio::time::sleep(p.target / 2).await;
            return self.reload(p, None).await;
        };
        let (next, at) = next_in(list, want);
        p.next_part = Some(at);
        match next {
            Next::Part(part) => self.play_part(p, &part, started, seconds).await,
            Next::Segment(segment) => {
                let uri = segment.uri.clone();
                self.play_media(
                    p,
                    &uri,
                    segment.duration_s,
                    segment.program_date_time_ms,
                    started,
                    seconds,
                )
                .await?;
                p.next_part = Some((segment.seq + 1, 0));
                Ok(())
            }
            Next::NotYet => self.reload(p, Some(at)).await,
        }
    }

    /// The playlist again: a blocking reload for `want` (with the hinted part asked for at the
    /// same time), or a plain one.
    async fn reload(&mut self, p: &mut Playback, want: Option<(u64, u32)>) -> anyhow::Result<()> {
        let mut url = rebase(&p.media_url, &p.assignment);
        if let Some((msn, part)) = want {
            url.query_pairs_mut()
                .append_pair("_HLS_msn", &msn.to_string())
                .append_pair("_HLS_part", &part.to_string());
        }
        let limit = blocking_timeout(p.playlist.as_ref());
        let hint = want.zip(hinted_uri(p, want));
        let (answer, hinted) = tokio::join!(self.fetch(&url, limit), async {
            match &hint {
                Some((part, uri)) => self.fetch(uri, limit).await.ok().map(|b| (*part, b)),
                None => None,
            }
        });
        match answer {
            Ok(body) => {
                let parsed = parse_media(std::str::from_utf8(&body)?)?;
                p.target = Duration::from_secs_f64(parsed.target_duration_s.max(1.0));
                if parsed.low_latency.part_target_s.is_none() {
                    bail!("--low-latency: the playlist has no parts (EXT-X-PART-INF)");
                }
                p.playlist = Some(parsed);
                p.hinted = hinted.or(p.hinted.take());
                p.failures_this_segment = 0;
            }
            Err(e) => {
                // No news within two part targets: a source outage looks the same as a hung
                // broadcast, so ask the broadcast a question it answers at once.
                let plain = rebase(&p.media_url, &p.assignment);
                if want.is_some() && self.fetch(&plain, PROBE_TIMEOUT).await.is_ok() {
                    return Ok(());
                }
                self.on_failure(&mut p.assignment, &e, &mut p.failures_this_segment)
                    .await;
                p.playlist = None;
                p.hinted = None;
            }
        }
        Ok(())
    }

    async fn play_part(
        &mut self,
        p: &mut Playback,
        part: &ParsedPart,
        started: Instant,
        seconds: u64,
    ) -> anyhow::Result<()> {
        let key = (part.seq, part.index);
        let pdt = p.playlist.as_ref().and_then(|l| part_date(l, part));
        let body = match p.hinted.take() {
            Some((hinted, body)) if hinted == key => Some(body),
            _ => None,
        };
        let played = match body {
            Some(body) => {
                self.take_media(p, body, part.duration_s, pdt, started, seconds)?;
                true
            }
            None => {
                let uri = part.uri.clone();
                self.play_media(p, &uri, part.duration_s, pdt, started, seconds)
                    .await?
            }
        };
        if played {
            self.report.felt.parts += 1;
            p.next_part = Some((part.seq, part.index + 1));
        }
        Ok(())
    }

    /// Downloads a part or segment into the buffer; false when the request failed (the
    /// viewer moved).
    async fn play_media(
        &mut self,
        p: &mut Playback,
        uri: &str,
        duration_s: f64,
        pdt: Option<u64>,
        started: Instant,
        seconds: u64,
    ) -> anyhow::Result<bool> {
        let url = rebase(&p.media_url.join(uri)?, &p.assignment);
        let first_byte = blocking_timeout(p.playlist.as_ref());
        match self.fetch(&url, first_byte).await {
            Ok(body) => {
                self.take_media(p, body, duration_s, pdt, started, seconds)?;
                Ok(true)
            }
            Err(e) => {
                self.on_failure(&mut p.assignment, &e, &mut p.failures_this_segment)
                    .await;
                p.playlist = None;
                Ok(false)
            }
        }
    }

    fn take_media(
        &mut self,
        p: &mut Playback,
        body: bytes::Bytes,
        duration_s: f64,
        pdt: Option<u64>,
        started: Instant,
        seconds: u64,
    ) -> anyhow::Result<()> {
        if !streaming_media::fmp4::starts_with_fragment(&body) {
            bail!("a part is not fragmented MP4");
        }
        let stalls_before = p.buffer.stalls;
        p.took(
            &mut self.report.felt,
            Instant::now(),
            duration_s,
            pdt,
            started,
            seconds,
        );
        tracing::debug!(
            viewer = self.index,
            pdt,
            ahead_s = p.buffer.buffer_ahead_s(),
            "part"
        );
        if p.buffer.stalls > stalls_before {
            tracing::info!(viewer = self.index, pdt, "stalled until this part arrived");
        }
        Ok(())
    }
}

/// The preload hint's URL, when it names the part we wait for.
fn hinted_uri(p: &Playback, want: Option<(u64, u32)>) -> Option<Url> {
    let (seq, index) = want?;
    let hint = p.playlist.as_ref()?.low_latency.preload_hint.as_deref()?;
    let named = hint.split('?').next()?;
    (named == streaming_hls::names::part(seq, index))
        .then(|| p.media_url.join(hint).ok())
        .flatten()
        .map(|u| rebase(&u, &p.assignment))
}

/// PROGRAM-DATE-TIME of a part: its segment's, plus the parts before it.
fn part_date(list: &ParsedMedia, part: &ParsedPart) -> Option<u64> {
    let start = list
        .segments
        .iter()
        .find(|s| s.seq == part.seq)
        .and_then(|s| s.program_date_time_ms)
        .or_else(|| {
            list.low_latency
                .building
                .as_ref()
                .filter(|b| b.seq == part.seq)
                .and_then(|b| b.program_date_time_ms)
        })?;
    let before: f64 = list
        .low_latency
        .parts_of(part.seq)
        .take_while(|p| p.index < part.index)
        .map(|p| p.duration_s)
        .sum();
    Some(start + (before * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn playlist() -> ParsedMedia {
        let mut text = String::from(
            "#EXTM3U\n#EXT-X-VERSION:6\n#EXT-X-TARGETDURATION:2\n\
             #EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=1.200,HOLD-BACK=6.000\n\
             #EXT-X-PART-INF:PART-TARGET=0.400\n#EXT-X-MEDIA-SEQUENCE:10\n",
        );
        for seq in 10..13 {
            text.push_str(&format!(
                "#EXT-X-PROGRAM-DATE-TIME:2026-12-02T00:00:{:02}.000Z\n",
                (seq - 10) * 2
            ));
            if seq > 10 {
                for i in 0..5 {
                    text.push_str(&format!(
                        "#EXT-X-PART:DURATION=0.400,URI=\"{seq}.{i}.m4s\"\n"
                    ));
                }
            }
            text.push_str(&format!("#EXTINF:2.000,\n{seq}.m4s\n"));
        }
        text.push_str("#EXT-X-PROGRAM-DATE-TIME:2026-12-02T00:00:06.000Z\n");
        text.push_str("#EXT-X-PART:DURATION=0.400,URI=\"13.0.m4s\",INDEPENDENT=YES\n");
        text.push_str("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"13.1.m4s\"\n");
        parse_media(&text).unwrap()
    }

    #[test]
    fn starts_part_hold_back_behind_and_walks_parts_then_segments() {
        let list = playlist();
        // 1.2 s behind the newest part's end: 3 parts back from 13.0.
        assert_eq!(start_part(&list), Some((12, 3)));
        let at = |want| match next_in(&list, want) {
            (Next::Part(p), _) => format!("part {}.{}", p.seq, p.index),
            (Next::Segment(s), _) => format!("segment {}", s.seq),
            (Next::NotYet, w) => format!("wait {}.{}", w.0, w.1),
        };
        assert_eq!(at((12, 4)), "part 12.4");
        assert_eq!(
            at((12, 5)),
            "part 13.0",
            "past the last part: the next segment"
        );
        assert_eq!(at((13, 1)), "wait 13.1");
        assert_eq!(
            at((10, 0)),
            "segment 10",
            "no parts listed: the whole segment"
        );
        assert_eq!(at((3, 0)), "segment 10", "out of the window: the oldest");
        let part = list
            .low_latency
            .parts
            .iter()
            .find(|p| (p.seq, p.index) == (12, 3))
            .unwrap();
        assert_eq!(part_date(&list, part), Some(1_796_169_604_000 + 1_200));
        assert_eq!(blocking_timeout(Some(&list)), Duration::from_secs_f64(0.8));
    }
}
