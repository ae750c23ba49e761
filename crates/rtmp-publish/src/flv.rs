//! Reading an FLV stream tag by tag, as ffmpeg writes it to a pipe: the file header, then
//! `PreviousTagSize, tag, PreviousTagSize, tag, ...`. Audio and video tag bodies are exactly the
//! payloads of RTMP audio and video messages, so they are published unchanged.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// FLV tag types that carry media; everything else (script data such as `onMetaData`) is
/// reported as [`TagKind::Other`] and not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    Audio,
    Video,
    Other(u8),
}

/// One FLV tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub kind: TagKind,
    /// Milliseconds, the 24-bit timestamp extended by its upper byte.
    pub timestamp_ms: u32,
    pub data: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum FlvError {
    #[error("reading FLV: {0}")]
    Io(#[from] std::io::Error),
    #[error("not an FLV stream (signature {0:02x?})")]
    Signature([u8; 3]),
    #[error("FLV header size {0} is out of range")]
    HeaderSize(u32),
    #[error("FLV stream ends inside a tag")]
    Truncated,
    #[error("encrypted FLV tags are not supported")]
    Filtered,
}

/// Header sizes above this are not FLV version 1 (which has 9): refuse rather than skip blindly.
const MAX_HEADER_SIZE: u32 = 1024;

/// Reads tags from an FLV byte stream. The body length is a 24-bit field, so one tag never
/// takes more than 16 MiB.
pub struct FlvReader<R> {
    input: R,
    header_read: bool,
}

impl<R: AsyncRead + Unpin> FlvReader<R> {
    pub fn new(input: R) -> Self {
        Self {
            input,
            header_read: false,
        }
    }

    /// The next tag, or `None` at a clean end of stream (between two tags).
    pub async fn next_tag(&mut self) -> Result<Option<Tag>, FlvError> {
        if !self.header_read {
            self.read_header().await?;
            self.header_read = true;
        }
        // Each tag is followed by the size of the tag before it: the header is followed by
        // PreviousTagSize0, so a tag starts after 4 bytes that we do not need.
        let mut head = [0u8; 15];
        match read_full(&mut self.input, &mut head).await? {
            0 => return Ok(None),
            n if n < head.len() => {
                // The trailing PreviousTagSize of the last tag, with nothing after it.
                if n == 4 {
                    return Ok(None);
                }
                return Err(FlvError::Truncated);
            }
            _ => {}
        }
        let tag_type = head[4];
        if tag_type & 0x20 != 0 {
            return Err(FlvError::Filtered);
        }
        let size = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let timestamp_ms = u32::from_be_bytes([head[11], head[8], head[9], head[10]]);
        let mut data = vec![0u8; size];
        if read_full(&mut self.input, &mut data).await? < size {
            return Err(FlvError::Truncated);
        }
        let kind = match tag_type & 0x1F {
            8 => TagKind::Audio,
            9 => TagKind::Video,
            other => TagKind::Other(other),
        };
        Ok(Some(Tag {
            kind,
            timestamp_ms,
            data: Bytes::from(data),
        }))
    }

    async fn read_header(&mut self) -> Result<(), FlvError> {
        let mut header = [0u8; 9];
        if read_full(&mut self.input, &mut header).await? < header.len() {
            return Err(FlvError::Truncated);
        }
        if &header[..3] != b"FLV" {
            return Err(FlvError::Signature([header[0], header[1], header[2]]));
        }
        let size = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
        if !(9..=MAX_HEADER_SIZE).contains(&size) {
            return Err(FlvError::HeaderSize(size));
        }
        let mut rest = vec![0u8; size as usize - 9];
        if read_full(&mut self.input, &mut rest).await? < rest.len() {
            return Err(FlvError::Truncated);
        }
        Ok(())
    }
}

/// Fills `buf` unless the stream ends first; returns how much was read.
async fn read_full<R: AsyncRead + Unpin>(input: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = input.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

/// Video tag body with FrameType 1 (keyframe).
pub fn is_video_keyframe(body: &[u8]) -> bool {
    body.first().is_some_and(|b| b >> 4 == 1)
}

/// AVC sequence header (AVCDecoderConfigurationRecord): codec 7, AVCPacketType 0.
pub fn is_avc_sequence_header(body: &[u8]) -> bool {
    body.len() >= 2 && body[0] & 0x0F == 7 && body[1] == 0
}

/// AAC sequence header (AudioSpecificConfig): SoundFormat 10, AACPacketType 0.
pub fn is_aac_sequence_header(body: &[u8]) -> bool {
    body.len() >= 2 && body[0] >> 4 == 10 && body[1] == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: [u8; 13] = [b'F', b'L', b'V', 1, 0x05, 0, 0, 0, 9, 0, 0, 0, 0];

    fn tag_bytes(tag_type: u8, timestamp_ms: u32, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag_type];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        out.extend_from_slice(&timestamp_ms.to_be_bytes()[1..]);
        out.push((timestamp_ms >> 24) as u8);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(body);
        out.extend_from_slice(&(body.len() as u32 + 11).to_be_bytes());
        out
    }

    async fn read_all(bytes: &[u8]) -> Result<Vec<Tag>, FlvError> {
        let mut reader = FlvReader::new(bytes);
        let mut tags = Vec::new();
        while let Some(tag) = reader.next_tag().await? {
            tags.push(tag);
        }
        Ok(tags)
    }

    #[tokio::test]
    async fn reads_tags_in_order_with_extended_timestamps() {
        let mut stream = HEADER.to_vec();
        stream.extend(tag_bytes(18, 0, b"\x02\x00\x0aonMetaData"));
        stream.extend(tag_bytes(9, 0, &[0x17, 0, 0, 0, 0, 1]));
        stream.extend(tag_bytes(8, 0x0123_4567, &[0xAF, 1, 0x21]));
        let tags = read_all(&stream).await.unwrap();
        assert_eq!(tags.len(), 3);
        assert_eq!(tags[0].kind, TagKind::Other(18));
        assert_eq!(tags[1].kind, TagKind::Video);
        assert!(is_avc_sequence_header(&tags[1].data));
        assert_eq!(tags[2].kind, TagKind::Audio);
        assert_eq!(tags[2].timestamp_ms, 0x0123_4567);
        assert_eq!(&tags[2].data[..], &[0xAF, 1, 0x21]);
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_tag_is_an_error() {
        let mut stream = HEADER.to_vec();
        stream.extend(tag_bytes(9, 40, &[0x27, 1, 0, 0, 0, 9, 9]));
        for cut in [HEADER.len() + 6, stream.len() - 6] {
            assert!(matches!(
                read_all(&stream[..cut]).await,
                Err(FlvError::Truncated)
            ));
        }
        // Cut right after a tag's trailing size: a clean end.
        assert_eq!(read_all(&stream).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn refuses_what_is_not_flv() {
        assert!(matches!(
            read_all(b"GIF89a\0\0\0\0\0\0\0").await,
            Err(FlvError::Signature(_))
        ));
        let mut huge = HEADER;
        huge[5] = 0x7F;
        assert!(matches!(
            read_all(&huge).await,
            Err(FlvError::HeaderSize(_))
        ));
        let mut stream = HEADER.to_vec();
        stream.extend(tag_bytes(0x20 | 9, 0, &[1]));
        assert!(matches!(read_all(&stream).await, Err(FlvError::Filtered)));
        assert!(matches!(read_all(&[]).await, Err(FlvError::Truncated)));
    }

    #[tokio::test]
    async fn a_header_longer_than_nine_bytes_is_skipped() {
        let mut stream = vec![b'F', b'L', b'V', 1, 0x05, 0, 0, 0, 12, 0xEE, 0xEE, 0xEE];
        stream.extend_from_slice(&[0, 0, 0, 0]);
        stream.extend(tag_bytes(8, 7, &[0xAF, 0, 0x11, 0x90]));
        let tags = read_all(&stream).await.unwrap();
        assert_eq!(tags.len(), 1);
        assert!(is_aac_sequence_header(&tags[0].data));
        assert_eq!(tags[0].timestamp_ms, 7);
    }

    #[test]
    fn recognises_payload_kinds() {
        assert!(is_video_keyframe(&[0x17, 1]));
        assert!(!is_video_keyframe(&[0x27, 1]));
        assert!(!is_video_keyframe(&[]));
        assert!(!is_avc_sequence_header(&[0x17, 1]));
        assert!(!is_aac_sequence_header(&[0xAF, 1, 0x21]));
        assert!(!is_aac_sequence_header(&[0x2F, 0]));
    }
}
