//! Writes the committed seed corpora (`fuzz/seeds/<target>/`) from real traffic and real writer
//! output: a real rml_rtmp client publishing to our RTMP session, playlists rendered by the hls
//! crate, tokens signed by the real signers, chat protocol frames, and FLV bodies made by ffmpeg.
//! Every RTMP seed is replayed through `RtmpSession` and must publish (or be refused) as intended.
//!
//! cargo run --manifest-path fuzz/Cargo.toml --example make_seeds

use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult, PublishRequestType,
};
use rml_rtmp::time::RtmpTimestamp;
use streaming_chat::session::{SessionClaims, SessionSigner};
use streaming_core::token::{TokenSigner, ViewerClaims};
use streaming_hls::{SegmentInfo, SegmentWindow, Variant, render_master};
use streaming_ingest::publish::{PublishRequest, StreamKeys};
use streaming_ingest::rtmp::{RtmpSession, SessionEvent};

fn seeds_dir(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(seeds_dir(target).join(name), bytes).unwrap();
}

/// What a publisher sends: (handshake bytes, chunk stream after the handshake, the offsets in
/// that stream where the client waited for an answer).
fn capture_publish(name: &str) -> (Vec<u8>, Vec<u8>, Vec<usize>) {
    let keys = StreamKeys::from_map([("test".to_owned(), "right".to_owned())].into());
    let auth = |r: &PublishRequest| keys.check(r);
    let mut server = RtmpSession::new();
    let mut client_hs = Handshake::new(PeerType::Client);
    let mut handshake = client_hs.generate_outbound_p0_and_p1().unwrap();
    let mut to_server = handshake.clone();
    let mut from_server;
    loop {
        let out = server.feed(&to_server, &auth).unwrap();
        match client_hs.process_bytes(&out.send).unwrap() {
            HandshakeProcessResult::InProgress { response_bytes } => {
                handshake.extend_from_slice(&response_bytes);
                to_server = response_bytes;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                handshake.extend_from_slice(&response_bytes);
                let out = server.feed(&response_bytes, &auth).unwrap();
                from_server = remaining_bytes;
                from_server.extend(out.send);
                break;
            }
        }
    }

    let mut stream = Vec::new();
    let mut waits = Vec::new();
    let (mut client, initial) = ClientSession::new(ClientSessionConfig::new()).unwrap();
    let mut pending = Vec::new();
    let mut publishing = false;
    let mut take = |results: Vec<ClientSessionResult>, pending: &mut Vec<u8>| {
        let mut connected = false;
        for r in results {
            match r {
                ClientSessionResult::OutboundResponse(p) => pending.extend(p.bytes),
                ClientSessionResult::RaisedEvent(ClientSessionEvent::ConnectionRequestAccepted) => {
                    connected = true
                }
                ClientSessionResult::RaisedEvent(ClientSessionEvent::PublishRequestAccepted) => {
                    publishing = true
                }
                _ => {}
            }
        }
        connected
    };
    take(initial, &mut pending);
    if let ClientSessionResult::OutboundResponse(p) =
        client.request_connection("live".into()).unwrap()
    {
        pending.extend(p.bytes);
    }
    for _ in 0..10 {
        let results = client.handle_input(&from_server).unwrap();
        if take(results, &mut pending)
            && let ClientSessionResult::OutboundResponse(p) = client
                .request_publishing(name.into(), PublishRequestType::Live)
                .unwrap()
        {
            pending.extend(p.bytes);
        }
        let bytes = std::mem::take(&mut pending);
        stream.extend_from_slice(&bytes);
        if !bytes.is_empty() {
            waits.push(stream.len());
        }
        let out = server.feed(&bytes, &auth).unwrap();
        from_server = out.send;
        if out.close {
            break;
        }
    }
    if publishing {
        for (video, body) in [
            (true, &[0x17, 0, 0, 0, 0, 1, 0x64, 0, 0x28, 0xFF][..]),
            (false, &[0xAF, 0, 0x11, 0x90][..]),
            (true, &[0x17, 1, 0, 0, 0x50, 0, 0, 0, 2, 0x65, 0x88][..]),
            (false, &[0xAF, 1, 0x21, 0x10, 0x04][..]),
        ] {
            let data = Bytes::copy_from_slice(body);
            let result = if video {
                client.publish_video_data(data, RtmpTimestamp::new(40), false)
            } else {
                client.publish_audio_data(data, RtmpTimestamp::new(40), false)
            };
            if let ClientSessionResult::OutboundResponse(p) = result.unwrap() {
                stream.extend_from_slice(&p.bytes);
            }
        }
    }
    (handshake, stream, waits)
}

/// Replays a seed the way the fuzz target reads it and returns the events.
fn replay(seed: &[u8]) -> Vec<SessionEvent> {
    let keys = StreamKeys::from_map([("test".to_owned(), "right".to_owned())].into());
    let auth = |r: &PublishRequest| keys.check(r);
    let mut session = RtmpSession::new();
    if seed[0] & 1 == 1 {
        let mut plain = vec![0u8; 1 + 2 * 1536];
        plain[0] = 3;
        session.feed(&plain, &auth).unwrap();
    }
    let mut events = Vec::new();
    let mut body = &seed[4..];
    let mut cuts: Vec<usize> = seed[1..4]
        .iter()
        .map(|&c| body.len() * usize::from(c) / 256)
        .collect();
    cuts.sort_unstable();
    let mut at = 0;
    for cut in cuts.into_iter().chain([body.len()]) {
        let (feed, rest) = body.split_at(cut - at);
        at = cut;
        body = rest;
        events.extend(session.feed(feed, &auth).unwrap().events);
    }
    events
}

fn rtmp_seeds() {
    let good = "test?key=right&source=source1&anchor=1764000000000";
    for (name, publish_name, accepted) in [
        ("publish", good, true),
        ("wrong_key", "test?key=wrong&source=source2", false),
    ] {
        let (handshake, stream, waits) = capture_publish(publish_name);
        // The session answers a client that waits for each answer, as real publishers do, so
        // the reads are cut where the client waited.
        for (mode, file, skipped, bytes) in [
            (
                0u8,
                format!("{name}_with_handshake"),
                handshake.len(),
                [&handshake[..], &stream].concat(),
            ),
            (1u8, format!("{name}_after_handshake"), 0, stream.clone()),
        ] {
            let len = bytes.len();
            let cut = |at: usize| u8::try_from((at * 256).div_ceil(len)).unwrap();
            let mut cuts: Vec<u8> = waits
                .iter()
                .map(|w| skipped + w)
                .filter(|&p| p < len)
                .take(3)
                .map(cut)
                .collect();
            while cuts.len() < 3 {
                cuts.push(*cuts.last().unwrap_or(&0));
            }
            let seed = [&[mode][..], &cuts, &bytes].concat();
            let events = replay(&seed);
            assert_eq!(
                events
                    .iter()
                    .any(|e| matches!(e, SessionEvent::PublishAccepted(_))),
                accepted,
                "{file}: {events:?}"
            );
            write("rtmp_session", &file, &seed);
        }
    }
}

fn hls_seeds() {
    let info = |seq: u64, discontinuity: bool| SegmentInfo {
        seq,
        duration_s: 2.0,
        discontinuity,
        program_date_time_ms: seq * 2000,
    };
    let mut steady = SegmentWindow::new(6);
    for seq in 882_000_000..882_000_006 {
        steady.push(info(seq, false), ()).unwrap();
    }
    write(
        "m3u8_media",
        "steady",
        steady
            .render(6, 2, |i| format!("{}.ts?t=abc.def", i.seq))
            .as_bytes(),
    );
    let mut switched = SegmentWindow::new(10);
    switched.start_discontinuity_sequence(7);
    for (seq, d) in [
        (1, false),
        (2, true),
        (3, true),
        (4, false),
        (6, true),
        (7, false),
    ] {
        switched.push(info(seq, d), ()).unwrap();
    }
    write(
        "m3u8_media",
        "discontinuities",
        switched
            .render(10, 2, |i| format!("{}.ts", i.seq))
            .as_bytes(),
    );
    let ladder = [
        ("1080p", 5_000_000, 1920, 1080),
        ("720p", 2_800_000, 1280, 720),
        ("360p", 1_000_000, 640, 360),
        ("144p", 300_000, 256, 144),
    ];
    let variants: Vec<Variant> = ladder
        .iter()
        .map(|&(name, bandwidth_bps, width, height)| Variant {
            name: name.into(),
            bandwidth_bps,
            width,
            height,
            fps: 25,
        })
        .collect();
    write(
        "m3u8_master",
        "ladder",
        render_master(&variants, |name| format!("{name}/index.m3u8?t=abc.def")).as_bytes(),
    );
}

fn token_seeds() {
    let viewer = TokenSigner::new(b"fuzz key shared by lbs and broadcasts").sign(&ViewerClaims {
        broadcast: "broadcast2".into(),
        channel: "test".into(),
        viewer: "q3Zl1C9xW0aQb1hC".into(),
        expires: 1_800_000_300,
    });
    write("viewer_token", "valid", viewer.as_bytes());
    let session = SessionSigner::new(b"fuzz key of the cluster").sign(&SessionClaims {
        session: uuid::Uuid::from_u128(0x3a1f_6c2e_9d4b_4f0a_8e7c_1b2d_3e4f_5a6b),
        user_id: 42,
        name: "alice".into(),
        expires: 1_800_604_800,
    });
    write("session_token", "valid", session.as_bytes());
}

fn chat_seeds() {
    for (name, frame) in [
        ("hello", r#"{"type":"hello","session":null,"since":12}"#),
        (
            "hello_session",
            r#"{"type":"hello","session":"s1.YWJj.ZGVm","since":null}"#,
        ),
        (
            "send",
            r#"{"type":"send","id":"c1-abc_9","text":"<b>hi</b> \u00e9\n"}"#,
        ),
        ("delete", r#"{"type":"delete","id":"d1","target":12345}"#),
        (
            "mute",
            r#"{"type":"mute","id":"m1","user":"alice","seconds":600}"#,
        ),
        ("ban", r#"{"type":"ban","id":"b1","user":"mallory"}"#),
        ("unban", r#"{"type":"unban","id":"u1","user":"mallory"}"#),
        ("ping", r#"{"type":"ping"}"#),
    ] {
        write("chat_frame", name, frame.as_bytes());
    }
}

/// The first few audio and video tag bodies of a short ffmpeg FLV (H.264 + AAC, as OBS sends).
fn flv_seeds() {
    let out = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x36:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440",
            "-t",
            "0.2",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            "25",
            "-bf",
            "2",
            "-c:a",
            "aac",
            "-f",
            "flv",
            "pipe:1",
        ])
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let flv = out.stdout;
    let mut at = 13;
    let (mut video, mut audio) = (0, 0);
    while at + 11 <= flv.len() {
        let kind = flv[at];
        let size = u32::from_be_bytes([0, flv[at + 1], flv[at + 2], flv[at + 3]]) as usize;
        let ts = u32::from_be_bytes([flv[at + 7], flv[at + 4], flv[at + 5], flv[at + 6]]);
        let body = &flv[at + 11..at + 11 + size];
        at += 11 + size + 4;
        let (count, flag, name) = match kind {
            9 => (&mut video, 1u8, "video"),
            8 => (&mut audio, 0u8, "audio"),
            _ => continue,
        };
        if *count < 4 {
            let seed = [&[flag][..], &ts.to_be_bytes(), body].concat();
            write("flv_tag", &format!("{name}{count}"), &seed);
            *count += 1;
        }
    }
    assert!(
        video >= 3 && audio >= 2,
        "ffmpeg's FLV had {video} video and {audio} audio tags"
    );
}

fn main() {
    rtmp_seeds();
    hls_seeds();
    token_seeds();
    chat_seeds();
    flv_seeds();
    println!("seeds written under {}", seeds_dir("").display());
}
