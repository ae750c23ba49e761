//! RTMP chunk stream: reassembly of the peer's messages with our own byte accounting, and
//! chunking of our (few, small) outbound messages.
//!
//! Every message is admitted from its header, before its body arrives, by a check the session
//! supplies (so a 16 MiB "command" is refused at its first 12 bytes), and the bytes held in
//! unfinished messages are counted here, never inferred from what the peer is answered (an
//! acknowledgement sent back must not reset anything). Bodies grow as their bytes really arrive,
//! nothing is allocated from a declared length.

use std::collections::HashMap;

use bytes::Bytes;

/// Largest chunk size a peer may set: the largest message the format can describe.
pub const MAX_CHUNK_SIZE: u32 = 0xFF_FFFF;
/// Chunk streams a peer may use (ffmpeg and OBS use about five).
pub const MAX_CHUNK_STREAMS: usize = 64;
const DEFAULT_CHUNK_SIZE: u32 = 128;
const EXTENDED_TIMESTAMP: u32 = 0xFF_FFFF;

/// One reassembled message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub type_id: u8,
    pub stream_id: u32,
    pub timestamp: u32,
    pub payload: Bytes,
}

/// What the session decides about a message from its header alone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Header {
    pub type_id: u8,
    pub length: u32,
    pub stream_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk stream {0} continues a message header it never sent")]
    NoPreviousHeader(u32),
    #[error("chunk stream {0} starts a new message before finishing the last one")]
    Interleaved(u32),
    #[error("more than {MAX_CHUNK_STREAMS} chunk streams")]
    TooManyStreams,
    #[error("peer holds {0} bytes in unfinished messages")]
    TooMuchPending(usize),
}

#[derive(Default)]
struct ChunkStream {
    timestamp: u32,
    /// The last timestamp field: absolute after a type 0 header, a delta after types 1 and 2.
    /// A type 3 header that starts a message adds it again (as ffmpeg and rml_rtmp do).
    ts_field: u32,
    length: u32,
    type_id: u8,
    stream_id: u32,
    extended: bool,
    /// The message being reassembled, if one is under way.
    body: Option<Vec<u8>>,
}

/// Reassembles messages from the peer's bytes.
pub struct ChunkReader {
    chunk_size: u32,
    streams: HashMap<u32, ChunkStream>,
    /// Bytes of a chunk header not complete yet (at most 18).
    header: Vec<u8>,
    /// Chunk stream and bytes left of the chunk body being read.
    in_body: Option<(u32, u32)>,
    /// Bytes in unfinished messages.
    buffered: usize,
    max_buffered: usize,
}

impl ChunkReader {
    pub fn new(max_buffered: usize) -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            streams: HashMap::new(),
            header: Vec::with_capacity(18),
            in_body: None,
            buffered: 0,
            max_buffered,
        }
    }

    /// Applies the peer's Set Chunk Size (already checked by the caller).
    pub fn set_chunk_size(&mut self, size: u32) {
        self.chunk_size = size.clamp(1, MAX_CHUNK_SIZE);
    }

    /// Drops the unfinished message of a chunk stream (the peer's Abort message).
    pub fn abort(&mut self, csid: u32) {
        if let Some(body) = self.streams.get_mut(&csid).and_then(|s| s.body.take()) {
            // Abort is a message of its own, so no chunk of `csid` is being read now.
            self.buffered -= body.len();
        }
    }

    pub fn buffered(&self) -> usize {
        self.buffered + self.header.len()
    }

    /// Consumes bytes from `input` until one message is complete (returned) or `input` is empty
    /// (`None`). `admit` sees each message's header before any of its body is accepted.
    pub fn next_message<E: From<ChunkError>>(
        &mut self,
        input: &mut &[u8],
        admit: &mut dyn FnMut(&Header) -> Result<(), E>,
    ) -> Result<Option<Message>, E> {
        loop {
            if let Some((csid, left)) = self.in_body {
                let n = left.min(u32::try_from(input.len()).unwrap_or(u32::MAX));
                let (now, rest) = input.split_at(n as usize);
                *input = rest;
                let stream = self.streams.entry(csid).or_default();
                let body = stream.body.get_or_insert_with(Vec::new);
                body.extend_from_slice(now);
                self.buffered += now.len();
                if self.buffered > self.max_buffered {
                    return Err(ChunkError::TooMuchPending(self.buffered).into());
                }
                let left = left - n;
                if left > 0 {
                    self.in_body = Some((csid, left));
                    return Ok(None);
                }
                self.in_body = None;
                if body.len() as u64 >= u64::from(stream.length) {
                    let body = stream.body.take().unwrap_or_default();
                    self.buffered -= body.len();
                    return Ok(Some(Message {
                        type_id: stream.type_id,
                        stream_id: stream.stream_id,
                        timestamp: stream.timestamp,
                        payload: Bytes::from(body),
                    }));
                }
                continue;
            }
            if !self.read_header(input)? {
                return Ok(None);
            }
            if let Some(message) = self.start_chunk(admit)? {
                return Ok(Some(message));
            }
        }
    }

    /// Moves header bytes from `input` until a whole header is there. Takes only what the header
    /// needs, so body bytes stay in `input`.
    fn read_header(&mut self, input: &mut &[u8]) -> Result<bool, ChunkError> {
        loop {
            let (need, known) = self.header_need()?;
            if self.header.len() >= need {
                if known {
                    return Ok(true);
                }
                continue;
            }
            let take = (need - self.header.len()).min(input.len());
            if take == 0 {
                return Ok(false);
            }
            self.header.extend_from_slice(&input[..take]);
            *input = &input[take..];
        }
    }

    /// Header bytes needed so far, and whether that is the whole header's length.
    fn header_need(&self) -> Result<(usize, bool), ChunkError> {
        let h = &self.header;
        let Some(&first) = h.first() else {
            return Ok((1, false));
        };
        let basic = match first & 0x3F {
            0 => 2,
            1 => 3,
            _ => 1,
        };
        let fmt = first >> 6;
        let message_header = [11, 7, 3, 0][usize::from(fmt)];
        if h.len() < basic + message_header {
            return Ok((basic + message_header, false));
        }
        let extended = if fmt < 3 {
            be24(&h[basic..basic + 3]) == EXTENDED_TIMESTAMP
        } else {
            let csid = csid_of(h);
            self.streams
                .get(&csid)
                .ok_or(ChunkError::NoPreviousHeader(csid))?
                .extended
        };
        Ok((basic + message_header + if extended { 4 } else { 0 }, true))
    }

    /// Applies a complete header; returns a message at once if it has no body.
    fn start_chunk<E: From<ChunkError>>(
        &mut self,
        admit: &mut dyn FnMut(&Header) -> Result<(), E>,
    ) -> Result<Option<Message>, E> {
        let h = std::mem::take(&mut self.header);
        let csid = csid_of(&h);
        let fmt = h[0] >> 6;
        let at = match h[0] & 0x3F {
            0 => 2,
            1 => 3,
            _ => 1,
        };
        if !self.streams.contains_key(&csid) {
            if fmt != 0 {
                return Err(ChunkError::NoPreviousHeader(csid).into());
            }
            if self.streams.len() >= MAX_CHUNK_STREAMS {
                return Err(ChunkError::TooManyStreams.into());
            }
        }
        let stream = self.streams.entry(csid).or_default();
        let continuing = stream.body.is_some();
        if fmt < 3 {
            if continuing {
                return Err(ChunkError::Interleaved(csid).into());
            }
            let mut ts = be24(&h[at..at + 3]);
            stream.extended = ts == EXTENDED_TIMESTAMP;
            if stream.extended {
                let e = &h[h.len() - 4..];
                ts = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
            }
            if fmt <= 1 {
                stream.length = be24(&h[at + 3..at + 6]);
                stream.type_id = h[at + 6];
            }
            if fmt == 0 {
                let s = &h[at + 7..at + 11];
                stream.stream_id = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                stream.timestamp = ts;
            } else {
                stream.timestamp = stream.timestamp.wrapping_add(ts);
            }
            stream.ts_field = ts;
        } else if !continuing {
            stream.timestamp = stream.timestamp.wrapping_add(stream.ts_field);
        }
        let length = stream.length;
        if !continuing {
            admit(&Header {
                type_id: stream.type_id,
                length,
                stream_id: stream.stream_id,
            })?;
            if length == 0 {
                return Ok(Some(Message {
                    type_id: stream.type_id,
                    stream_id: stream.stream_id,
                    timestamp: stream.timestamp,
                    payload: Bytes::new(),
                }));
            }
            stream.body = Some(Vec::new());
        }
        let have = stream.body.as_ref().map_or(0, Vec::len);
        let left = length.saturating_sub(u32::try_from(have).unwrap_or(u32::MAX));
        self.in_body = Some((csid, left.min(self.chunk_size)));
        Ok(None)
    }
}

fn be24(b: &[u8]) -> u32 {
    u32::from_be_bytes([0, b[0], b[1], b[2]])
}

fn csid_of(h: &[u8]) -> u32 {
    match h[0] & 0x3F {
        0 => 64 + u32::from(h[1]),
        1 => 64 + u32::from(h[1]) + 256 * u32::from(h[2]),
        n => u32::from(n),
    }
}

/// Chunks one outbound message with our chunk size (type 0 header, then type 3 headers).
pub fn write_message(
    out: &mut Vec<u8>,
    csid: u8,
    chunk_size: usize,
    type_id: u8,
    stream_id: u32,
    payload: &[u8],
) {
    debug_assert!((2..64).contains(&csid));
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .min(MAX_CHUNK_SIZE);
    out.push(csid);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(type_id);
    out.extend_from_slice(&stream_id.to_le_bytes());
    let mut chunks = payload[..len as usize].chunks(chunk_size.max(1));
    if let Some(first) = chunks.next() {
        out.extend_from_slice(first);
    }
    for chunk in chunks {
        out.push(0xC0 | csid);
        out.extend_from_slice(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit_all(_: &Header) -> Result<(), ChunkError> {
        Ok(())
    }

    fn read_all(reader: &mut ChunkReader, mut input: &[u8]) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some(m) = reader.next_message(&mut input, &mut admit_all).unwrap() {
            out.push(m);
        }
        assert!(input.is_empty());
        out
    }

    #[test]
    fn reassembles_our_own_chunking_byte_by_byte() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        write_message(&mut wire, 4, 128, 9, 1, &payload);
        write_message(&mut wire, 3, 128, 20, 0, b"abc");
        let mut reader = ChunkReader::new(1 << 20);
        let mut got = Vec::new();
        for b in &wire {
            got.extend(read_all(&mut reader, std::slice::from_ref(b)));
        }
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].type_id, got[0].stream_id), (9, 1));
        assert_eq!(got[0].payload, payload);
        assert_eq!(got[1].payload, &b"abc"[..]);
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn compressed_headers_and_extended_timestamps() {
        let mut wire = vec![
            // type 0 on csid 6: ts 0xFFFFFF (extended 0x01000000), 2 bytes, video, stream 1
            0x06, 0xFF, 0xFF, 0xFF, 0, 0, 2, 9, 1, 0, 0, 0, 0x01, 0, 0, 0, b'a', b'b',
        ];
        // type 1: delta 40, 1 byte, audio
        wire.extend_from_slice(&[0x46, 0, 0, 40, 0, 0, 1, 8, b'c']);
        // type 2: delta 20
        wire.extend_from_slice(&[0x86, 0, 0, 20, b'd']);
        // type 3 starting a message: same delta again
        wire.extend_from_slice(&[0xC6, b'e']);
        let msgs = read_all(&mut ChunkReader::new(1 << 20), &wire);
        let ts: Vec<u32> = msgs.iter().map(|m| m.timestamp).collect();
        assert_eq!(ts, [0x0100_0000, 0x0100_0028, 0x0100_003C, 0x0100_0050]);
        assert_eq!(msgs[1].type_id, 8);
    }

    #[test]
    fn refusals() {
        let mut r = ChunkReader::new(100);
        let mut input: &[u8] = &[0x43, 0, 0, 0, 0, 0, 1, 20];
        assert_eq!(
            r.next_message(&mut input, &mut admit_all),
            Err(ChunkError::NoPreviousHeader(3))
        );
        // Declared 1000 bytes, admitted, but only 100 may be held.
        let mut r = ChunkReader::new(100);
        r.set_chunk_size(4096);
        let mut wire = vec![0x03, 0, 0, 0, 0, 0x03, 0xE8, 9, 1, 0, 0, 0];
        wire.extend_from_slice(&[0; 101]);
        let mut input = &wire[..];
        assert_eq!(
            r.next_message(&mut input, &mut admit_all),
            Err(ChunkError::TooMuchPending(101))
        );
        // The header alone decides: refused before a body byte.
        let mut r = ChunkReader::new(100);
        let mut input: &[u8] = &[0x03, 0, 0, 0, 0xFF, 0xFF, 0xFF, 20, 0, 0, 0, 0];
        let mut refuse = |h: &Header| {
            if h.length > 4096 {
                Err(ChunkError::TooMuchPending(h.length as usize))
            } else {
                Ok(())
            }
        };
        assert_eq!(
            r.next_message(&mut input, &mut refuse),
            Err(ChunkError::TooMuchPending(0xFF_FFFF))
        );
    }
}
