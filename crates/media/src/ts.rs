//! PES packets out of the transcoder's MPEG-TS, one elementary stream at a time.
//!
//! The packets come from our own ffmpeg child, but it is still outside data: every PES is
//! bounded in size and a stream type we do not handle is an error, not a guess.

use std::collections::HashMap;
use std::io::Read;

use mpeg2ts::es::StreamType;
use mpeg2ts::ts::{ReadTsPacket, TsPacket, TsPacketReader, TsPayload};

/// The largest PES accepted: a 1080p keyframe at a high bitrate stays well under it.
pub const MAX_PES_BYTES: usize = 8 << 20;
/// MPEG-TS timestamps count 90 kHz ticks modulo 2^33 (about 26.5 hours).
const WRAP: u64 = 1 << 33;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    H264,
    Aac,
}

/// One complete PES packet. `stream` is the elementary stream's position in the program map,
/// which is the order of ffmpeg's `-map` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pes {
    pub stream: usize,
    pub kind: StreamKind,
    /// 90 kHz, unwrapped: keeps counting past 2^33.
    pub pts: u64,
    pub dts: u64,
    pub data: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TsError {
    #[error("unreadable transport stream: {0}")]
    Parse(String),
    #[error("stream type {0:?} is neither H.264 nor ADTS AAC")]
    Unsupported(StreamType),
    #[error("a PES packet of PID {0} is larger than {MAX_PES_BYTES} bytes")]
    TooLarge(u16),
    #[error("a PES packet of PID {0} has no timestamp")]
    NoTimestamp(u16),
}

struct Open {
    stream: usize,
    kind: StreamKind,
    pts: u64,
    dts: u64,
    data: Vec<u8>,
    /// From the PES length field; `None` when the muxer left it 0 (unbounded).
    expected: Option<usize>,
}

/// Reads PES packets from an MPEG-TS byte stream.
pub struct Demuxer<R> {
    reader: TsPacketReader<R>,
    streams: HashMap<u16, (usize, StreamKind)>,
    open: HashMap<u16, Open>,
    last_dts: HashMap<u16, u64>,
    ready: std::collections::VecDeque<Pes>,
    ended: bool,
}

impl<R: Read> Demuxer<R> {
    pub fn new(input: R) -> Self {
        Self {
            reader: TsPacketReader::new(input),
            streams: HashMap::new(),
            open: HashMap::new(),
            last_dts: HashMap::new(),
            ready: Default::default(),
            ended: false,
        }
    }

    /// The next complete PES, or `None` at the end of the input.
    pub fn next_pes(&mut self) -> Result<Option<Pes>, TsError> {
        loop {
            if let Some(pes) = self.ready.pop_front() {
                return Ok(Some(pes));
            }
            if self.ended {
                return Ok(None);
            }
            match self
                .reader
                .read_ts_packet()
                .map_err(|e| TsError::Parse(e.to_string()))?
            {
                Some(packet) => self.packet(packet)?,
                None => {
                    self.ended = true;
                    // At the end, a PES without a length is complete; one with a length is
                    // complete only if all of it arrived.
                    let mut rest: Vec<(u16, Open)> = self.open.drain().collect();
                    rest.sort_by_key(|(_, o)| o.dts);
                    for (_, open) in rest {
                        if open.expected.is_none_or(|n| open.data.len() >= n) {
                            self.ready.push_back(finish(open));
                        }
                    }
                }
            }
        }
    }

    fn packet(&mut self, packet: TsPacket) -> Result<(), TsError> {
        let pid = packet.header.pid.as_u16();
        match packet.payload {
            Some(TsPayload::Pmt(pmt)) if self.streams.is_empty() => {
                for (index, es) in pmt.es_info.iter().enumerate() {
                    let kind = match es.stream_type {
                        StreamType::H264 => StreamKind::H264,
                        StreamType::AdtsAac => StreamKind::Aac,
                        other => return Err(TsError::Unsupported(other)),
                    };
                    self.streams
                        .insert(es.elementary_pid.as_u16(), (index, kind));
                }
            }
            Some(TsPayload::PesStart(pes)) => {
                let Some(&(stream, kind)) = self.streams.get(&pid) else {
                    return Ok(());
                };
                if let Some(previous) = self.open.remove(&pid) {
                    self.ready.push_back(finish(previous));
                }
                let pts = pes.header.pts.ok_or(TsError::NoTimestamp(pid))?.as_u64();
                let dts = pes.header.dts.map_or(pts, |d| d.as_u64());
                let dts = unwrap(self.last_dts.get(&pid).copied(), dts);
                self.last_dts.insert(pid, dts);
                // The PTS is within a few seconds of its DTS: unwrap it next to it.
                let pts = unwrap(Some(dts), pts);
                let expected = (pes.pes_packet_len != 0).then(|| {
                    usize::from(pes.pes_packet_len).saturating_sub(optional_header_len(&pes.header))
                });
                let open = Open {
                    stream,
                    kind,
                    pts,
                    dts,
                    data: pes.data.to_vec(),
                    expected,
                };
                self.store(pid, open)?;
            }
            Some(TsPayload::PesContinuation(bytes)) => {
                if let Some(mut open) = self.open.remove(&pid) {
                    open.data.extend_from_slice(&bytes);
                    self.store(pid, open)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Keeps a PES open, or hands it over as soon as its announced length is in.
    fn store(&mut self, pid: u16, mut open: Open) -> Result<(), TsError> {
        if open.data.len() > MAX_PES_BYTES {
            return Err(TsError::TooLarge(pid));
        }
        match open.expected {
            Some(n) if open.data.len() >= n => {
                open.data.truncate(n);
                self.ready.push_back(finish(open));
            }
            _ => {
                self.open.insert(pid, open);
            }
        }
        Ok(())
    }
}

/// Bytes of the PES header after the length field: flags (2), header length (1), timestamps.
/// ffmpeg writes no other optional field and no stuffing there.
fn optional_header_len(header: &mpeg2ts::pes::PesHeader) -> usize {
    3 + if header.pts.is_some() { 5 } else { 0 }
        + if header.dts.is_some() { 5 } else { 0 }
        + if header.escr.is_some() { 6 } else { 0 }
}

fn finish(open: Open) -> Pes {
    Pes {
        stream: open.stream,
        kind: open.kind,
        pts: open.pts,
        dts: open.dts,
        data: open.data,
    }
}

/// The value congruent to `raw` modulo 2^33 that is nearest to `near`.
fn unwrap(near: Option<u64>, raw: u64) -> u64 {
    let Some(near) = near else { return raw };
    let base = near - near % WRAP;
    [base.checked_sub(WRAP), Some(base), base.checked_add(WRAP)]
        .into_iter()
        .flatten()
        .map(|b| b + raw)
        .min_by_key(|v| v.abs_diff(near))
        .unwrap_or(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_keep_counting_across_the_wrap() {
        assert_eq!(unwrap(None, 5), 5);
        assert_eq!(unwrap(Some(WRAP - 10), 20), WRAP + 20);
        assert_eq!(unwrap(Some(WRAP + 20), WRAP - 10), WRAP - 10);
        assert_eq!(unwrap(Some(3 * WRAP + 7), 9), 3 * WRAP + 9);
        assert_eq!(unwrap(Some(100), 90), 90);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let garbage = vec![0x55u8; 188 * 3];
        let mut demuxer = Demuxer::new(&garbage[..]);
        assert!(demuxer.next_pes().is_err());
        let mut empty = Demuxer::new(&[][..]);
        assert!(empty.next_pes().unwrap().is_none());
    }
}
