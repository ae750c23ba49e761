//! What a puller takes from an origin's playlist: the full segments we miss (assembled from
//! the parts we already hold when we have them all, fetched otherwise) and the parts of the
//! segment being made, each as soon as the origin lists it.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use streaming_hls::parse::ParsedBuilding;
use streaming_hls::{
    Building, ParsedMedia, ParsedSegment, PartInfo, SegmentInfo, SlotClock, names,
};

use crate::pull::{
    MAX_INIT_BYTES, MAX_SEGMENT_BYTES, Origin, PullError, Puller, fetch_limited, segments_to_fetch,
};
use crate::state::{lock, read, write};

/// Where one origin's files are, and how long a fetch may take.
#[derive(Clone, Copy)]
pub(crate) struct Source<'a> {
    pub client: &'a reqwest::Client,
    pub key: &'a str,
    pub origin: &'a Origin,
    pub path: &'a str,
    pub d: Duration,
}

impl Source<'_> {
    async fn fetch(&self, file: &str, timeout: Duration, limit: usize) -> Result<Bytes, PullError> {
        let url = format!("{}/origin/{}/{file}", self.origin.url, self.path);
        fetch_limited(self.client, &url, self.key, timeout, limit).await
    }
}

impl Puller {
    /// Takes what the playlist offers; returns how many segments and parts were added.
    pub(crate) async fn take(
        &mut self,
        source: Source<'_>,
        playlist: &ParsedMedia,
        origin_count: usize,
    ) -> Result<usize, PullError> {
        *lock(&self.rendition.part_target_s) = playlist.low_latency.part_target_s;
        let segments = self.take_segments(source, playlist, origin_count).await;
        let parts = match &segments {
            Ok(_) => self.take_parts(source, playlist).await,
            Err(_) => Ok(0),
        };
        let added = *segments.as_ref().unwrap_or(&0) + *parts.as_ref().unwrap_or(&0);
        if added > 0 {
            *lock(&self.rendition.last_new) = Some(Instant::now());
            self.channel_state.published.announce();
        }
        segments?;
        parts?;
        Ok(added)
    }

    async fn take_segments(
        &mut self,
        source: Source<'_>,
        playlist: &ParsedMedia,
        origin_count: usize,
    ) -> Result<usize, PullError> {
        let held = read(&self.rendition.media).window().last_seq();
        let clock = SlotClock::new(source.d.as_secs() as u32);
        let mut added = 0;
        for segment in segments_to_fetch(playlist, held) {
            if let Some((seq, tries)) = self.failed_seq
                && seq == segment.seq
                && tries >= origin_count
            {
                tracing::warn!(channel = %self.channel, rendition = %self.rendition.name, seq,
                    "segment failed on every ingest: skipping it (discontinuity)");
                continue;
            }
            let fetched = self.segment_media(source, playlist, segment).await;
            let (map, data, parts) = match fetched {
                Ok(x) => x,
                Err(e) => {
                    let tries = match self.failed_seq {
                        Some((seq, n)) if seq == segment.seq => n + 1,
                        _ => 1,
                    };
                    self.failed_seq = Some((segment.seq, tries));
                    return Err(e);
                }
            };
            let info = SegmentInfo {
                seq: segment.seq,
                duration_s: segment.duration_s,
                discontinuity: segment.discontinuity,
                program_date_time_ms: segment
                    .program_date_time_ms
                    .unwrap_or(clock.slot_start_ms(segment.seq)),
                map,
                parts,
            };
            let size = data.len();
            let mut media = write(&self.rendition.media);
            media.start_discontinuity_sequence(segment.discontinuity_sequence);
            let pushed = media.push(info, data);
            drop(media);
            match pushed {
                Ok(()) => {
                    added += 1;
                    tracing::debug!(channel = %self.channel, rendition = %self.rendition.name,
                        seq = segment.seq, size, ingest = %source.origin.name, "segment pulled");
                }
                // Only possible if the window moved meanwhile; the timeline never goes back.
                Err(e) => tracing::debug!("{e}"),
            }
            self.failed_seq = None;
        }
        Ok(added)
    }

    /// A listed segment's init segment name, bytes and parts: put together from the parts we
    /// hold when we hold all of them, else downloaded.
    async fn segment_media(
        &self,
        source: Source<'_>,
        playlist: &ParsedMedia,
        segment: &ParsedSegment,
    ) -> Result<(Option<String>, Bytes, Vec<PartInfo>), PullError> {
        let map = self.take_init(source, segment.map.as_deref()).await?;
        let listed: Vec<f64> = playlist
            .low_latency
            .parts_of(segment.seq)
            .map(|p| p.duration_s)
            .collect();
        if let Some((data, parts)) = self.assemble(segment.seq, &listed) {
            return Ok((map, data, parts));
        }
        let data = source
            .fetch(
                &names::segment(segment.seq),
                2 * source.d + Duration::from_secs(1),
                MAX_SEGMENT_BYTES,
            )
            .await?;
        let lens = streaming_media::fmp4::part_lengths(&data);
        let parts = if lens.len() == listed.len() {
            part_infos(&listed, &lens)
        } else {
            Vec::new()
        };
        Ok((map, data, parts))
    }

    /// The segment made of the parts we hold of it, when we hold every listed one.
    fn assemble(&self, seq: u64, listed: &[f64]) -> Option<(Bytes, Vec<PartInfo>)> {
        let media = read(&self.rendition.media);
        let b = media.building().filter(|b| b.info.seq == seq)?;
        if listed.is_empty() || b.parts.len() != listed.len() {
            return None;
        }
        let mut data = BytesMut::with_capacity(b.parts.iter().map(Bytes::len).sum());
        for part in &b.parts {
            data.extend_from_slice(part);
        }
        let lens: Vec<usize> = b.parts.iter().map(Bytes::len).collect();
        Some((data.freeze(), part_infos(listed, &lens)))
    }

    /// Fetches the parts of the segment being made that we do not hold yet, showing each as it
    /// arrives.
    async fn take_parts(
        &self,
        source: Source<'_>,
        playlist: &ParsedMedia,
    ) -> Result<usize, PullError> {
        let Some(b) = &playlist.low_latency.building else {
            return Ok(0);
        };
        if read(&self.rendition.media).window().last_seq() != b.seq.checked_sub(1) {
            return Ok(0);
        }
        let map = self.take_init(source, b.map.as_deref()).await?;
        let listed: Vec<(f64, bool)> = playlist
            .low_latency
            .parts_of(b.seq)
            .map(|p| (p.duration_s, p.independent))
            .collect();
        let mut parts: Vec<Bytes> = read(&self.rendition.media)
            .building()
            .filter(|held| held.info.seq == b.seq)
            .map(|held| held.parts.clone())
            .unwrap_or_default();
        // A listed part is complete at the origin: it comes at link speed, or the origin hangs.
        let part_target = playlist.low_latency.part_target_s.unwrap_or(0.5);
        let timeout = Duration::from_secs_f64((2.0 * part_target).max(0.5));
        let mut added = 0;
        while parts.len() < listed.len() {
            let file = names::part(b.seq, parts.len() as u32);
            parts.push(source.fetch(&file, timeout, MAX_SEGMENT_BYTES).await?);
            added += 1;
            let building = building(b, map.clone(), &listed, &parts, source.d);
            write(&self.rendition.media).set_building(Some(building));
            self.channel_state.published.announce();
        }
        Ok(added)
    }

    /// The init segment a segment names, fetched once (names are content-derived, so one
    /// fetched from either ingest serves both). Returns its name.
    async fn take_init(
        &self,
        source: Source<'_>,
        name: Option<&str>,
    ) -> Result<Option<String>, PullError> {
        let Some(name) = name else {
            return Ok(None);
        };
        if !names::is_init(name) {
            return Err(PullError::BadInit(name.to_owned()));
        }
        if read(&self.rendition.media).init(name).is_none() {
            let bytes = source.fetch(name, source.d, MAX_INIT_BYTES).await?;
            write(&self.rendition.media).add_init(name, bytes);
        }
        Ok(Some(name.to_owned()))
    }
}

/// The segment being made as we hold it.
fn building(
    b: &ParsedBuilding,
    map: Option<String>,
    listed: &[(f64, bool)],
    parts: &[Bytes],
    d: Duration,
) -> Building {
    let infos: Vec<PartInfo> = listed
        .iter()
        .zip(parts)
        .map(|(&(duration_s, independent), bytes)| PartInfo {
            duration_s,
            independent,
            len: bytes.len(),
        })
        .collect();
    Building {
        info: SegmentInfo {
            seq: b.seq,
            duration_s: infos.iter().map(|p| p.duration_s).sum(),
            discontinuity: b.discontinuity,
            program_date_time_ms: b
                .program_date_time_ms
                .unwrap_or(SlotClock::new(d.as_secs() as u32).slot_start_ms(b.seq)),
            map,
            parts: infos,
        },
        parts: parts.to_vec(),
    }
}

/// Part descriptions from the listed durations and the byte lengths we hold; the first part
/// of a segment is the independent one.
fn part_infos(durations: &[f64], lens: &[usize]) -> Vec<PartInfo> {
    durations
        .iter()
        .zip(lens)
        .enumerate()
        .map(|(i, (&duration_s, &len))| PartInfo {
            duration_s,
            independent: i == 0,
            len,
        })
        .collect()
}
