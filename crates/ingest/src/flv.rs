//! Just enough FLV to feed ffmpeg's `-f flv -i pipe:0`: the file header and audio/video tags,
//! plus the few payload bits the transcoder must look at (keyframes, sequence headers,
//! composition time). RTMP audio/video message payloads are FLV tag bodies already.

use bytes::{BufMut, Bytes, BytesMut};

/// FLV header (version 1, audio + video present, header size 9) followed by PreviousTagSize0.
pub const HEADER: [u8; 13] = [b'F', b'L', b'V', 1, 0x05, 0, 0, 0, 9, 0, 0, 0, 0];

/// FLV tag types we write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    Audio = 8,
    Video = 9,
}

/// One FLV tag: 11-byte header, the body, then the 4-byte PreviousTagSize.
/// Bodies larger than 16 MiB cannot be expressed and are truncated by no one: RTMP message
/// lengths are 24-bit too, so such a body never reaches us.
pub fn tag(kind: TagKind, timestamp_ms: u32, body: &[u8]) -> Bytes {
    let len = body.len().min(0xFF_FFFF) as u32;
    let mut out = BytesMut::with_capacity(15 + body.len());
    out.put_u8(kind as u8);
    out.put_uint(u64::from(len), 3);
    out.put_uint(u64::from(timestamp_ms & 0xFF_FFFF), 3);
    out.put_u8((timestamp_ms >> 24) as u8); // TimestampExtended
    out.put_uint(0, 3); // StreamID
    out.put_slice(&body[..len as usize]);
    out.put_u32(len + 11);
    out.freeze()
}

// The payload checks are the publisher's (the relay resumes at a keyframe with them too).
pub use streaming_rtmp_publish::flv::{
    is_aac_sequence_header, is_avc_sequence_header, is_video_keyframe,
};

/// CompositionTime (pts - dts, signed 24-bit ms) of an AVC NALU tag; 0 for anything else.
pub fn composition_time_ms(body: &[u8]) -> i32 {
    if body.len() < 5 || body[0] & 0x0F != 7 || body[1] != 1 {
        return 0;
    }
    let raw = (i32::from(body[2]) << 16) | (i32::from(body[3]) << 8) | i32::from(body[4]);
    // Sign-extend from 24 bits.
    (raw << 8) >> 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_layout_matches_the_spec() {
        let t = tag(TagKind::Video, 0x0123_4567, &[0x17, 1, 0, 0, 0x28, 0xAA]);
        assert_eq!(t[0], 9);
        assert_eq!(&t[1..4], &[0, 0, 6]); // DataSize
        assert_eq!(&t[4..7], &[0x23, 0x45, 0x67]); // lower 24 bits
        assert_eq!(t[7], 0x01); // TimestampExtended
        assert_eq!(&t[8..11], &[0, 0, 0]);
        assert_eq!(&t[11..17], &[0x17, 1, 0, 0, 0x28, 0xAA]);
        assert_eq!(&t[17..21], &17u32.to_be_bytes()); // PreviousTagSize = 11 + 6
        assert_eq!(t.len(), 21);
    }

    #[test]
    fn composition_time_is_signed_24_bit() {
        assert_eq!(composition_time_ms(&[0x17, 1, 0, 0, 80]), 80);
        assert_eq!(composition_time_ms(&[0x27, 1, 0xFF, 0xFF, 0xD8]), -40);
        assert_eq!(composition_time_ms(&[0x17, 0, 0, 0, 80]), 0);
        assert_eq!(composition_time_ms(&[0x17, 1]), 0);
    }
}
