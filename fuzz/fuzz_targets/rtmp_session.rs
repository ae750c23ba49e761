//! An RTMP connection from anyone on the internet: bytes into `RtmpSession::feed`.
//!
//! The first input byte picks how the rest is delivered: bit 0 set means "a plain handshake
//! already happened" (so mutations go to the chunk stream instead of being spent keeping 3 KiB of
//! handshake intact), and the next three bytes cut the rest into up to four reads, as TCP would.
//! Invariants checked besides "no crash": media and an accepted publish only ever follow the one
//! good key, and a refused or failed connection is not fed again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use streaming_ingest::publish::{PublishRequest, StreamKeys};
use streaming_ingest::rtmp::{RtmpSession, SessionEvent};

/// C0 (version 3), then C1 and C2 as the original (digest-less) handshake allows: all zeros.
fn plain_handshake() -> Vec<u8> {
    let mut bytes = vec![0u8; 1 + 2 * 1536];
    bytes[0] = 3;
    bytes
}

fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys installs a panic hook that aborts, even for a panic the product catches
    // itself. `feed` catches none (a panic here is a bug), but keep the rule of every target: the
    // hook stays quiet, and a panic that reaches libFuzzer's own wrapper is a crash.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (cuts, body) = rest.split_at(rest.len().min(3));
    let mut positions: Vec<usize> = cuts
        .iter()
        .map(|&c| body.len() * usize::from(c) / 256)
        .collect();
    positions.sort_unstable();
    let mut feeds: Vec<&[u8]> = Vec::with_capacity(4);
    let mut start = 0;
    for end in positions.into_iter().chain([body.len()]) {
        feeds.push(&body[start..end]);
        start = end;
    }

    let keys = StreamKeys::from_map([("test".to_owned(), "right".to_owned())].into());
    let authorize = |r: &PublishRequest| keys.check(r);
    let mut session = RtmpSession::new();
    if mode & 1 == 1 {
        session
            .feed(&plain_handshake(), &authorize)
            .expect("a plain handshake completes");
    }
    let mut accepted = false;
    for feed in feeds {
        let Ok(out) = session.feed(feed, &authorize) else {
            return;
        };
        for event in &out.events {
            match event {
                SessionEvent::PublishAccepted(request) => {
                    assert_eq!(request.channel, "test");
                    assert!(!accepted, "a second publish on one connection was accepted");
                    accepted = true;
                }
                SessionEvent::Video { .. } | SessionEvent::Audio { .. } => {
                    assert!(accepted, "media before an accepted publish");
                }
                SessionEvent::PublishRefused { .. } => assert!(out.close),
                SessionEvent::PublishFinished => {}
            }
        }
        if out.close {
            return;
        }
    }
});
