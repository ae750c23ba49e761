//! The cutter on real ffmpeg output: the ladder's MPEG-TS (two renditions sharing one audio
//! stream, keyframes forced on slot boundaries, timestamps kept) becomes parts that players read.

use std::process::Command;

use streaming_media::avc::access_unit;
use streaming_media::ts::{Demuxer, StreamKind};
use streaming_media::{Cut, Cutter, Part, PartClock, aac};

const CLOCK: PartClock = PartClock {
    segment_ms: 2000,
    part_ms: 500,
    frame_ms: 40.0,
};

/// `seconds` of a 25 fps test picture and tone whose first frame is at `start_s`, encoded like
/// the ladder (forced keyframes on 2 s boundaries, B-frames, MPEG-TS with timestamps kept).
fn ladder_ts(start_s: f64, seconds: u32) -> Vec<u8> {
    let force = format!(
        "expr:if(isnan(prev_forced_t),1,gte(floor((t+{start_s})/2),floor((prev_forced_t+{start_s})/2)+1))"
    );
    let out = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i"])
        .arg(format!("testsrc2=s=320x180:r=25:d={seconds}"))
        .args(["-f", "lavfi", "-i"])
        .arg(format!("sine=r=48000:d={seconds}"))
        .args(["-output_ts_offset", &start_s.to_string()])
        .args(["-filter_complex", "[0:v]split=2[a][b];[b]scale=160:90[c]"])
        .args(["-map", "[a]", "-map", "[c]", "-map", "1:a"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            "-g",
            "9999",
            "-sc_threshold",
            "0",
        ])
        .args(["-forced-idr", "1", "-force_key_frames", &force])
        .args(["-c:a", "aac", "-muxdelay", "0", "-muxpreload", "0"])
        .args(["-omit_video_pes_length", "0", "-pes_payload_size", "0"])
        .args(["-f", "mpegts", "pipe:1"])
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Cuts the first rendition of a ladder stream, then flushes at its end when `flush`.
fn cut_with(ts: &[u8], flush: bool) -> Vec<Cut> {
    let mut demuxer = Demuxer::new(ts);
    let mut cutter = Cutter::new(CLOCK, 320, 180);
    let mut cuts = Vec::new();
    while let Some(pes) = demuxer.next_pes().unwrap() {
        match (pes.kind, pes.stream) {
            (StreamKind::H264, 0) => cuts.extend(
                cutter
                    .push_video(pes.dts, pes.pts, access_unit(&pes.data))
                    .unwrap(),
            ),
            (StreamKind::Aac, _) => {
                let frames = aac::frames(&pes.data).unwrap();
                cuts.extend(cutter.push_audio(pes.pts, &frames).unwrap());
            }
            _ => {}
        }
    }
    if flush {
        cuts.extend(cutter.flush().unwrap());
    }
    cuts
}

fn cut(ts: &[u8]) -> Vec<Cut> {
    cut_with(ts, false)
}

fn parts(cuts: &[Cut]) -> Vec<&Part> {
    cuts.iter()
        .filter_map(|c| match c {
            Cut::Part(p) => Some(p),
            Cut::Segment { .. } => None,
        })
        .collect()
}

#[test]
fn parts_follow_the_slot_clock_and_add_up_to_segments() {
    // Starts 1.37 s into slot 5: that slot is partial and never published.
    let cuts = cut(&ladder_ts(11.37, 9));
    let segments: Vec<(u64, bool)> = cuts
        .iter()
        .filter_map(|c| match c {
            Cut::Segment { slot, complete, .. } => Some((*slot, *complete)),
            Cut::Part(_) => None,
        })
        .collect();
    // Slots 6, 7, 8 and 9 are whole; the run ends at 20.37 s, inside slot 10, whose parts
    // wait for a picture that never comes.
    assert_eq!(segments, vec![(6, true), (7, true), (8, true), (9, true)]);
    let target = CLOCK.part_target_s();
    for slot in 6..=9 {
        let of_slot: Vec<&Part> = parts(&cuts)
            .into_iter()
            .filter(|p| p.slot == slot)
            .collect();
        let indexes: Vec<u32> = of_slot.iter().map(|p| p.index).collect();
        assert_eq!(indexes, vec![0, 1, 2, 3], "slot {slot}");
        assert!(of_slot[0].independent && !of_slot[1].independent);
        let total: f64 = of_slot.iter().map(|p| p.duration_s).sum();
        assert!((total - 2.0).abs() < 0.001, "slot {slot} lasts {total}");
        for p in &of_slot {
            assert!(p.duration_s <= target + 1e-9, "{} > {target}", p.duration_s);
            assert!(
                p.duration_s >= 0.85 * target || p.index == 3,
                "{}",
                p.duration_s
            );
        }
    }
}

/// A transcoder whose input ends on a slot boundary (a source switch, a clean stop) flushes its
/// last part: its last slot is complete, not cut short.
#[test]
fn a_run_that_ends_on_a_boundary_completes_its_last_slot() {
    // 12.0 s to 20.0 s: slots 6 to 9, whole.
    let cuts = cut_with(&ladder_ts(12.0, 8), true);
    let segments: Vec<(u64, bool)> = cuts
        .iter()
        .filter_map(|c| match c {
            Cut::Segment { slot, complete, .. } => Some((*slot, *complete)),
            Cut::Part(_) => None,
        })
        .collect();
    assert_eq!(segments, vec![(6, true), (7, true), (8, true), (9, true)]);
    assert_eq!(parts(&cuts).iter().filter(|p| p.slot == 9).count(), 4);
}

/// Two ingests start their transcoders at different keyframes of the same publish: part j of
/// slot k covers the same span of the timeline on both. The pictures are the same; the audio
/// encoder's frames follow where each run began (here the test tone restarts with each run, a
/// publisher's audio does not), so audio agrees within one frame.
#[test]
fn two_ingests_cut_the_same_parts() {
    let one = cut(&ladder_ts(11.37, 9));
    let two = cut(&ladder_ts(13.37, 7));
    /// (slot, part, (track, tfdt) per fragment, duration in 90 kHz ticks)
    type Span = (u64, u32, Vec<(u32, u64)>, u64);
    let spans = |cuts: &[Cut]| -> Vec<Span> {
        parts(cuts)
            .iter()
            .filter(|p| p.slot >= 7)
            .map(|p| {
                (
                    p.slot,
                    p.index,
                    streaming_media::fmp4::fragment_times(&p.data),
                    (p.duration_s * 90_000.0).round() as u64,
                )
            })
            .collect()
    };
    let (a, b) = (spans(&one), spans(&two));
    assert_eq!(a.len(), 12);
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(&b) {
        assert_eq!((a.0, a.1, a.2[0], a.3), (b.0, b.1, b.2[0], b.3));
        assert_eq!(a.2[1].0, b.2[1].0);
        assert!(a.2[1].1.abs_diff(b.2[1].1) < 1024, "{a:?} {b:?}");
    }
}

/// An init segment and the parts of a slot, concatenated, are an MP4 ffmpeg decodes entirely,
/// with the pictures at their timeline times.
#[test]
fn a_segment_made_of_parts_plays() {
    let cuts = cut(&ladder_ts(11.37, 9));
    let of_slot: Vec<&Part> = parts(&cuts).into_iter().filter(|p| p.slot == 7).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("seg.mp4");
    let mut bytes = of_slot[0].init.bytes.to_vec();
    for p in &of_slot {
        bytes.extend_from_slice(&p.data);
    }
    std::fs::write(&file, bytes).unwrap();
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries"])
        .args([
            "stream=codec_name,nb_read_frames,start_time",
            "-of",
            "csv=p=0",
        ])
        .arg(&file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success(),
        "{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let fields = |line: &str| -> (String, f64, u32) {
        let f: Vec<&str> = line.split(',').collect();
        (
            f[0].to_owned(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        )
    };
    // Slot 7 starts at 14 s; the input's pictures fall 10 ms after each 40 ms step, so the
    // forced keyframe is the one at 14.01 s.
    let (codec, start, pictures) = fields(lines[0]);
    assert_eq!((codec.as_str(), pictures), ("h264", 50), "{text}");
    assert!((start - 14.0).abs() <= 0.04, "{text}");
    // 2 s of 48 kHz AAC is 93.75 frames: 93 or 94 start in the slot, the first within one
    // frame of its start.
    let (codec, start, frames) = fields(lines[1]);
    assert_eq!(codec, "aac", "{text}");
    assert!((14.0..14.0 + 1024.0 / 48_000.0).contains(&start), "{text}");
    assert!((93..=94).contains(&frames), "{text}");
}
