//! Hostile and faithful RTMP peers against the ingest's session, after a real handshake.
//!
//! In a file of its own: before the depth limit, the nested AMF0 below overflowed the stack,
//! which aborts the whole test binary rather than failing one test.

use std::time::Instant;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use streaming_ingest::amf0::{self, Amf0Error, Value};
use streaming_ingest::chunk::{ChunkError, ChunkReader, Message, write_message};
use streaming_ingest::listener::refusal_line;
use streaming_ingest::publish::{PublishRequest, Refusal, StreamKeys};
use streaming_ingest::rtmp::{
    MAX_COMMAND_BYTES, MAX_PENDING_BYTES, Output, RtmpSession, SETUP_BUDGET, SessionError,
    SessionEvent,
};

const KEY: &str = "5f2b8c0e9a7d4431b6e8f1c2d3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2";

fn keys() -> StreamKeys {
    StreamKeys::from_map([("test".to_string(), KEY.to_string())].into())
}

/// A client that completed a real handshake with a fresh session, and reads the session's
/// answers with a chunk reader of its own.
struct Peer {
    server: RtmpSession,
    keys: StreamKeys,
    from_server: ChunkReader,
    received: Vec<Message>,
    events: Vec<SessionEvent>,
    closed: bool,
    /// Our chunk size towards the server.
    chunk_size: usize,
}

impl Peer {
    fn connect() -> Self {
        let mut peer = Peer {
            server: RtmpSession::new(),
            keys: keys(),
            from_server: ChunkReader::new(1 << 20),
            received: Vec::new(),
            events: Vec::new(),
            closed: false,
            chunk_size: 128,
        };
        let mut client = Handshake::new(PeerType::Client);
        let mut to_server = client.generate_outbound_p0_and_p1().unwrap();
        loop {
            let out = peer.feed(&to_server).unwrap();
            match client.process_bytes(&out).unwrap() {
                HandshakeProcessResult::InProgress { response_bytes } => to_server = response_bytes,
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    assert!(remaining_bytes.is_empty());
                    let out = peer.feed(&response_bytes).unwrap();
                    peer.read_answers(&out);
                    return peer;
                }
            }
        }
    }

    /// Feeds the server, returns what it sent back.
    fn feed(&mut self, bytes: &[u8]) -> Result<Vec<u8>, SessionError> {
        let keys = self.keys.clone();
        let auth = move |r: &PublishRequest| keys.check(r);
        let Output {
            send,
            events,
            close,
        } = self.server.feed(bytes, &auth)?;
        self.events.extend(events);
        self.closed |= close;
        Ok(send)
    }

    fn read_answers(&mut self, mut bytes: &[u8]) {
        while let Some(m) = self
            .from_server
            .next_message(&mut bytes, &mut |_| Ok::<_, ChunkError>(()))
            .unwrap()
        {
            if m.type_id == 1 {
                let size = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                self.from_server.set_chunk_size(size);
            }
            self.received.push(m);
        }
    }

    fn send(&mut self, type_id: u8, stream_id: u32, payload: &[u8]) -> Result<(), SessionError> {
        let mut wire = Vec::new();
        write_message(&mut wire, 3, self.chunk_size, type_id, stream_id, payload);
        if type_id == 1 {
            self.chunk_size = u32::from_be_bytes(payload[..4].try_into().unwrap()) as usize;
        }
        let out = self.feed(&wire)?;
        self.read_answers(&out);
        Ok(())
    }

    fn command(&mut self, stream_id: u32, values: &[Value]) -> Result<(), SessionError> {
        let mut payload = Vec::new();
        for v in values {
            amf0::encode(v, &mut payload);
        }
        self.send(20, stream_id, &payload)
    }

    /// Decoded commands the server sent, in order.
    fn answers(&self) -> Vec<Vec<Value>> {
        self.received
            .iter()
            .filter(|m| m.type_id == 20)
            .map(|m| amf0::decode_all(&m.payload).unwrap())
            .collect()
    }

    /// The ffmpeg publisher's sequence up to and including `publish`.
    fn ffmpeg_publish(&mut self, name: &str) -> Result<(), SessionError> {
        let s = amf0::string;
        self.command(
            0,
            &[
                s("connect"),
                Value::Number(1.0),
                amf0::object([
                    ("app", s("live")),
                    ("type", s("nonprivate")),
                    ("flashVer", s("FMLE/3.0 (compatible; Lavf61.7.100)")),
                    ("tcUrl", s("rtmp://127.0.0.1:1935/live")),
                ]),
            ],
        )?;
        // ffmpeg announces its window and chunk size right after connect.
        self.send(5, 0, &2_500_000u32.to_be_bytes())?;
        self.send(1, 0, &4096u32.to_be_bytes())?;
        let name_only = s(name);
        self.command(
            0,
            &[
                s("releaseStream"),
                Value::Number(2.0),
                Value::Null,
                name_only.clone(),
            ],
        )?;
        self.command(
            0,
            &[
                s("FCPublish"),
                Value::Number(3.0),
                Value::Null,
                name_only.clone(),
            ],
        )?;
        self.command(0, &[s("createStream"), Value::Number(4.0), Value::Null])?;
        self.command(
            1,
            &[
                s("publish"),
                Value::Number(5.0),
                Value::Null,
                name_only,
                s("live"),
            ],
        )
    }
}

/// `levels` objects nested in each other (`03 00 01 61` repeated), closed properly.
fn nested_objects(levels: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(levels * 7 + 1);
    for _ in 0..levels {
        v.extend_from_slice(&[0x03, 0, 1, b'a']);
    }
    v.push(0x05);
    for _ in 0..levels {
        v.extend_from_slice(&[0, 0, 0x09]);
    }
    v
}

fn connect_with_object(object: &[u8]) -> Vec<u8> {
    let mut payload = Vec::new();
    amf0::encode(&amf0::string("connect"), &mut payload);
    amf0::encode(&Value::Number(1.0), &mut payload);
    payload.extend_from_slice(object);
    payload
}

#[test]
fn deeply_nested_amf0_is_a_clean_error() {
    // The attack as sent: a 20 KB connect, refused from its header (too big for a command).
    let mut peer = Peer::connect();
    let err = peer
        .send(20, 0, &connect_with_object(&nested_objects(5_000)))
        .unwrap_err();
    assert!(
        matches!(err, SessionError::TooLarge { type_id: 20, .. }),
        "{err}"
    );

    // Small enough to pass the size cap, still far too deep: the decoder says so.
    let mut peer = Peer::connect();
    let object = nested_objects(500);
    assert!(object.len() < MAX_COMMAND_BYTES as usize);
    let err = peer.send(20, 0, &connect_with_object(&object)).unwrap_err();
    assert!(
        matches!(err, SessionError::Amf0(Amf0Error::TooDeep)),
        "{err}"
    );

    // The decoder itself, fed the whole 5,000 levels and 200,000 nested strict arrays.
    let started = Instant::now();
    assert_eq!(
        amf0::decode_all(&nested_objects(5_000)),
        Err(Amf0Error::TooDeep)
    );
    let arrays: Vec<u8> = std::iter::repeat_n([0x0Au8, 0, 0, 0, 1], 200_000)
        .flatten()
        .chain([0x05])
        .collect();
    assert_eq!(amf0::decode_all(&arrays), Err(Amf0Error::TooDeep));
    let mut peer = Peer::connect();
    let err = peer.send(20, 0, &connect_with_object(&arrays)).unwrap_err();
    assert!(matches!(err, SessionError::TooLarge { .. }), "{err}");
    println!("deep AMF0 refused in {:?}", started.elapsed());
}

#[test]
fn ffmpeg_sequence_publishes_and_media_flows() {
    let mut peer = Peer::connect();
    peer.ffmpeg_publish(&format!("test?key={KEY}&source=source1"))
        .unwrap();
    let answers = peer.answers();
    let code = |a: &Vec<Value>| {
        a.get(3)
            .and_then(|o| o.property("code"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    assert_eq!(answers[0][0], amf0::string("_result"));
    assert_eq!(
        code(&answers[0]).as_deref(),
        Some("NetConnection.Connect.Success")
    );
    assert_eq!(
        answers[1],
        vec![
            amf0::string("_result"),
            Value::Number(4.0),
            Value::Null,
            Value::Number(1.0)
        ]
    );
    assert_eq!(answers[2][0], amf0::string("onStatus"));
    assert_eq!(
        code(&answers[2]).as_deref(),
        Some("NetStream.Publish.Start")
    );
    assert!(matches!(&peer.events[0], SessionEvent::PublishAccepted(r) if r.channel == "test"));
    assert!(peer.server.is_publishing() && !peer.closed);

    // @setDataFrame, then media larger than one chunk.
    let mut meta = Vec::new();
    for v in [
        amf0::string("@setDataFrame"),
        amf0::string("onMetaData"),
        amf0::object([("width", Value::Number(1280.0))]),
    ] {
        amf0::encode(&v, &mut meta);
    }
    peer.send(18, 1, &meta).unwrap();
    let video: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    peer.send(9, 1, &video).unwrap();
    peer.send(8, 1, &[0xAF, 1, 2, 3]).unwrap();
    assert!(
        matches!(&peer.events[1], SessionEvent::Video { data, .. } if data == &Bytes::from(video.clone()))
    );
    assert!(matches!(&peer.events[2], SessionEvent::Audio { .. }));

    // FCUnpublish, deleteStream: the publish ends.
    peer.command(
        1,
        &[amf0::string("FCUnpublish"), Value::Number(6.0), Value::Null],
    )
    .unwrap();
    peer.command(
        0,
        &[
            amf0::string("deleteStream"),
            Value::Number(7.0),
            Value::Null,
            Value::Number(1.0),
        ],
    )
    .unwrap();
    assert_eq!(peer.events.last(), Some(&SessionEvent::PublishFinished));
    assert!(peer.closed);
}

#[test]
fn tiny_ack_window_cannot_hide_buffering() {
    // Before a publish: a window of one byte, then messages forever. Acks go out, and the setup
    // budget still ends it.
    let mut peer = Peer::connect();
    peer.send(5, 0, &1u32.to_be_bytes()).unwrap();
    let ping = [0u8, 6, 0, 0, 0, 1]; // user control ping request
    let mut sent = 0;
    let err = loop {
        match peer.send(4, 0, &ping) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, SessionError::SetupTooLong(n) if n > SETUP_BUDGET),
        "{err}"
    );
    assert!(
        peer.received.iter().any(|m| m.type_id == 3),
        "acks were sent"
    );
    println!("{sent} pings before the setup budget closed the connection");

    // After a publish: a window of one byte, then a message that never ends (on two chunk
    // streams, each within the media cap): refused when the held bytes pass the cap.
    let mut peer = Peer::connect();
    peer.ffmpeg_publish(&format!("test?key={KEY}")).unwrap();
    peer.send(5, 0, &1u32.to_be_bytes()).unwrap();
    let acks_before = peer.received.iter().filter(|m| m.type_id == 3).count();
    let body = vec![0u8; 4096];
    let mut held = 0;
    let mut first = true;
    let err = loop {
        let mut bytes = Vec::new();
        for csid in [6u8, 7] {
            if first {
                // Type 0 header of a 4 MiB video message on stream 1.
                bytes.extend_from_slice(&[csid, 0, 0, 0, 0x40, 0, 0, 9, 1, 0, 0, 0]);
            } else {
                bytes.push(0xC0 | csid);
            }
            bytes.extend_from_slice(&body);
        }
        first = false;
        match peer.feed(&bytes) {
            Ok(out) => {
                peer.read_answers(&out);
                held = peer.server.buffered();
            }
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, SessionError::Chunk(ChunkError::TooMuchPending(n)) if n > MAX_PENDING_BYTES),
        "{err}"
    );
    assert!(held <= MAX_PENDING_BYTES);
    let acks = peer.received.iter().filter(|m| m.type_id == 3).count() - acks_before;
    println!("refused at {held} held bytes after {acks} acks");
    assert!(acks > 0);
}

#[test]
fn oversized_or_early_messages_are_refused_from_their_header() {
    // Only the 12-byte header of a 5,000-byte command: refused before its body.
    let mut peer = Peer::connect();
    let header = [3u8, 0, 0, 0, 0, 0x13, 0x88, 20, 0, 0, 0, 0];
    let err = peer.feed(&header).unwrap_err();
    assert!(
        matches!(
            err,
            SessionError::TooLarge {
                type_id: 20,
                length: 5000,
                ..
            }
        ),
        "{err}"
    );
    // Media before a publish, and AMF3, are refused from the header too.
    let mut peer = Peer::connect();
    let err = peer
        .feed(&[4u8, 0, 0, 0, 0, 0, 10, 9, 1, 0, 0, 0])
        .unwrap_err();
    assert!(matches!(err, SessionError::NotAllowed(_)), "{err}");
    let mut peer = Peer::connect();
    let err = peer
        .feed(&[3u8, 0, 0, 0, 0, 0, 10, 17, 0, 0, 0, 0])
        .unwrap_err();
    assert!(matches!(err, SessionError::NotAllowed(_)), "{err}");
    // A publish before connect is a protocol error.
    let mut peer = Peer::connect();
    let err = peer
        .command(
            1,
            &[
                amf0::string("publish"),
                Value::Number(1.0),
                Value::Null,
                amf0::string("x"),
            ],
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::Protocol(_)), "{err}");
}

#[test]
fn a_pasted_key_never_reaches_a_refusal() {
    let wrong = KEY.replace('5', "6");
    for name in [
        KEY.to_string(),
        format!("{KEY}?key={KEY}"),
        format!("live/{KEY}"),
        format!("test?key={wrong}&source={KEY}"),
        format!("test?key={wrong}&source=source1"),
        format!("test?key={KEY}&anchor=18446744073709551615"),
    ] {
        let mut peer = Peer::connect();
        peer.ffmpeg_publish(&name).unwrap();
        assert!(peer.closed, "{name}");
        let SessionEvent::PublishRefused { channel, reason } = &peer.events[0] else {
            panic!("{name}: {:?}", peer.events);
        };
        let mut texts = vec![
            refusal_line(channel.as_deref(), reason),
            format!("{:?}", peer.events),
        ];
        texts.extend(peer.answers().iter().map(|a| format!("{a:?}")));
        for text in texts {
            for part in [KEY, &wrong] {
                for window in part.as_bytes().windows(8) {
                    let window = std::str::from_utf8(window).unwrap();
                    assert!(!text.contains(window), "{name}: {text}");
                }
            }
        }
        println!("{}", refusal_line(channel.as_deref(), reason));
    }
}

#[test]
fn wrong_app_and_play_are_refused() {
    let mut peer = Peer::connect();
    peer.command(
        0,
        &[
            amf0::string("connect"),
            Value::Number(1.0),
            amf0::object([("app", amf0::string("other"))]),
        ],
    )
    .unwrap();
    assert!(peer.closed);
    assert_eq!(peer.answers()[0][0], amf0::string("_error"));
    assert!(matches!(
        peer.events[0],
        SessionEvent::PublishRefused {
            channel: None,
            reason: Refusal::BadName(_)
        }
    ));
}

/// A cheap smoke run before real fuzzing: a valid ffmpeg-like stream with a few bytes changed,
/// fed in random pieces, ends in events or a clean error, never a panic or unbounded buffering.
#[test]
fn mutated_publish_streams_end_cleanly() {
    let s = amf0::string;
    let command = |values: &[Value]| {
        let mut p = Vec::new();
        for v in values {
            amf0::encode(v, &mut p);
        }
        p
    };
    let name = s(&format!("test?key={KEY}&source=source1"));
    let mut wire = Vec::new();
    let connect = command(&[
        s("connect"),
        Value::Number(1.0),
        amf0::object([("app", s("live")), ("tcUrl", s("rtmp://x/live"))]),
    ]);
    write_message(&mut wire, 3, 128, 20, 0, &connect);
    write_message(&mut wire, 2, 128, 1, 0, &4096u32.to_be_bytes());
    let create = command(&[s("createStream"), Value::Number(2.0), Value::Null]);
    write_message(&mut wire, 3, 4096, 20, 0, &create);
    let publish = command(&[
        s("publish"),
        Value::Number(3.0),
        Value::Null,
        name,
        s("live"),
    ]);
    write_message(&mut wire, 8, 4096, 20, 1, &publish);
    let video: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    write_message(&mut wire, 6, 4096, 9, 1, &video);
    write_message(&mut wire, 4, 4096, 8, 1, &[0xAF, 1, 2]);

    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let (mut errors, mut published) = (0, 0);
    for _ in 0..2000 {
        let mut peer = Peer::connect();
        let mut bytes = wire.clone();
        for _ in 0..1 + next(4) {
            // Mostly headers and commands: the media body is opaque to the session.
            let i = next(bytes.len().min(400));
            bytes[i] = next(256) as u8;
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = 1 + next(rest.len().min(3000));
            let (piece, tail) = rest.split_at(n);
            rest = tail;
            if peer.feed(piece).is_err() {
                errors += 1;
                break;
            }
            assert!(peer.server.buffered() <= MAX_PENDING_BYTES);
        }
        published += usize::from(peer.server.is_publishing());
    }
    println!("2000 mutated streams: {errors} ended in an error, {published} still published");
}
