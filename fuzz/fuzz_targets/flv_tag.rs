//! The FLV helpers look at publisher-supplied audio/video bodies (keyframes, sequence headers,
//! composition time) and wrap them into tags for ffmpeg: any body must give a well-formed tag.

#![no_main]

use libfuzzer_sys::fuzz_target;
use streaming_ingest::flv::{
    TagKind, composition_time_ms, is_aac_sequence_header, is_avc_sequence_header,
    is_video_keyframe, tag,
};

// Input: one byte (bit 0: video), the 32-bit timestamp, then the tag body.
fuzz_target!(|data: &[u8]| {
    let Some((&[flags, t0, t1, t2, t3], body)) = data.split_first_chunk::<5>() else {
        return;
    };
    let (video, timestamp_ms) = (flags & 1 == 1, u32::from_be_bytes([t0, t1, t2, t3]));
    let keyframe = is_video_keyframe(body);
    let avc_header = is_avc_sequence_header(body);
    let aac_header = is_aac_sequence_header(body);
    let cts = composition_time_ms(body);
    assert!((-(1 << 23)..(1 << 23)).contains(&cts));
    if cts != 0 {
        assert!(!avc_header && body[0] & 0x0F == 7 && body[1] == 1);
    }
    if keyframe || avc_header || aac_header {
        assert!(!body.is_empty());
    }

    let kind = if video {
        TagKind::Video
    } else {
        TagKind::Audio
    };
    let t = tag(kind, timestamp_ms, body);
    let len = body.len().min(0xFF_FFFF);
    assert_eq!(t.len(), 11 + len + 4);
    assert_eq!(t[0], kind as u8);
    let data_size = u32::from_be_bytes([0, t[1], t[2], t[3]]) as usize;
    assert_eq!(data_size, len);
    let ts = u32::from_be_bytes([t[7], t[4], t[5], t[6]]);
    assert_eq!(ts, timestamp_ms);
    assert_eq!(&t[11..11 + len], &body[..len]);
    let previous = u32::from_be_bytes(t[11 + len..].try_into().unwrap()) as usize;
    assert_eq!(previous, 11 + len);
});
