//! One RTMP connection as a pure state machine: bytes in, bytes to send and events out.
//!
//! The socket loop (`listener.rs`) stays thin, so garbage, a wrong key and a good publish are all
//! tested here without sockets. rml_rtmp does only the handshake (fixed sizes, no parsing of
//! peer-controlled structure). The message layer is ours: chunk reassembly with our own byte
//! accounting (`chunk`), a depth-limited AMF0 decoder (`amf0`), and the handful of commands a
//! publisher (ffmpeg, OBS, our relay) sends. We replaced rml_rtmp's session here because its
//! AMF0 decoder recurses without limit (a 20 KB nested `connect` overflowed the stack and aborted
//! the process), it buffers without a cap we can see (its acknowledgements made our "no message
//! completed" heuristic useless), and it cannot refuse a message from its header; a patched
//! rml_amf0 would have fixed only the first.
//!
//! Before a publish is accepted the peer gets little: commands of at most
//! [`MAX_COMMAND_BYTES`], no media, no AMF3, and [`SETUP_BUDGET`] bytes in all (handshake
//! included). After it, media messages of at most [`MAX_MEDIA_BYTES`] and at most
//! [`MAX_PENDING_BYTES`] held in unfinished messages.

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};

use crate::amf0::{self, Value};
use crate::chunk::{self, ChunkError, ChunkReader, Header, Message};
use crate::publish::{PublishNameError, PublishRequest, Refusal, parse_publish_name};

/// The only RTMP application we serve.
pub const APP: &str = "live";

/// Bytes a peer may hold in unfinished messages. Real keyframes of our ladders stay far below.
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;
/// Largest audio or video message.
pub const MAX_MEDIA_BYTES: u32 = 4 * 1024 * 1024;
/// Largest command message (ffmpeg's and OBS's `connect` are a few hundred bytes).
pub const MAX_COMMAND_BYTES: u32 = 4096;
/// Largest data message (`@setDataFrame`/`onMetaData`) once publishing; it is not parsed.
pub const MAX_DATA_BYTES: u32 = 64 * 1024;
/// Bytes a peer may send, handshake included, before its publish is accepted (ffmpeg needs
/// about 4 KiB).
pub const SETUP_BUDGET: usize = 64 * 1024;
/// Protocol control and user control messages are at most 10 bytes.
const MAX_CONTROL_BYTES: u32 = 64;
/// Streams one connection may create (a publisher needs one).
const MAX_STREAMS: u32 = 4;
/// We acknowledge at most this often, whatever window the peer asks for, so a window of one byte
/// cannot make us answer every byte.
const MIN_ACK_WINDOW: u32 = 4096;
/// Chunk size we announce and use for our (small) messages.
const OUR_CHUNK_SIZE: u32 = 4096;
/// Window acknowledgement size and peer bandwidth we announce.
const OUR_WINDOW: u32 = 2_500_000;

// Message type ids.
const SET_CHUNK_SIZE: u8 = 1;
const ABORT: u8 = 2;
const ACKNOWLEDGEMENT: u8 = 3;
const USER_CONTROL: u8 = 4;
const WINDOW_ACK_SIZE: u8 = 5;
const SET_PEER_BANDWIDTH: u8 = 6;
const AUDIO: u8 = 8;
const VIDEO: u8 = 9;
const AMF3_DATA: u8 = 15;
const AMF3_COMMAND: u8 = 17;
const AMF0_DATA: u8 = 18;
const AMF0_COMMAND: u8 = 20;

// Chunk streams of our messages.
const CONTROL_CSID: u8 = 2;
const COMMAND_CSID: u8 = 3;
const STREAM_CSID: u8 = 5;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("RTMP handshake failed: {0}")]
    Handshake(String),
    #[error("RTMP chunk stream: {0}")]
    Chunk(#[from] ChunkError),
    #[error("bad AMF0 in a command: {0}")]
    Amf0(#[from] amf0::Amf0Error),
    #[error("RTMP message of type {type_id} declares {length} bytes, more than the {cap} allowed")]
    TooLarge { type_id: u8, length: u32, cap: u32 },
    #[error("RTMP message not accepted: {0}")]
    NotAllowed(&'static str),
    #[error("RTMP protocol error: {0}")]
    Protocol(&'static str),
    #[error("peer sent {0} bytes without being accepted as a publisher")]
    SetupTooLong(usize),
}

/// What the connection tells the rest of the ingest.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    PublishAccepted(PublishRequest),
    /// The publish was refused; the connection must be closed after sending `send`.
    /// `channel` is named only when it is a configured one: a refused name may be a pasted key.
    PublishRefused {
        channel: Option<String>,
        reason: Refusal,
    },
    Video {
        timestamp_ms: u32,
        data: Bytes,
    },
    Audio {
        timestamp_ms: u32,
        data: Bytes,
    },
    PublishFinished,
}

/// Result of feeding bytes.
#[derive(Debug, Default)]
pub struct Output {
    pub send: Vec<u8>,
    pub events: Vec<SessionEvent>,
    /// Close the connection once `send` is written.
    pub close: bool,
}

/// Server side of one RTMP connection.
pub struct RtmpSession {
    handshake: Option<Box<Handshake>>,
    reader: ChunkReader,
    connected: bool,
    streams_created: u32,
    publishing: bool,
    /// Bytes taken from the peer before its publish was accepted.
    setup_bytes: usize,
    /// Bytes of chunk stream received, and the count we last acknowledged.
    received: u64,
    acked: u64,
    ack_window: Option<u32>,
}

impl RtmpSession {
    pub fn new() -> Self {
        Self {
            handshake: Some(Box::new(Handshake::new(PeerType::Server))),
            reader: ChunkReader::new(MAX_PENDING_BYTES),
            connected: false,
            streams_created: 0,
            publishing: false,
            setup_bytes: 0,
            received: 0,
            acked: 0,
            ack_window: None,
        }
    }

    /// True once a publish was accepted (and until it ends).
    pub fn is_publishing(&self) -> bool {
        self.publishing
    }

    /// Bytes held for messages not complete yet.
    pub fn buffered(&self) -> usize {
        self.reader.buffered()
    }

    /// Feeds bytes read from the peer. `authorize` decides a publish request (stream key check).
    /// An error means: log it and drop the connection.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<Output, SessionError> {
        let mut out = Output::default();
        let Some(handshake) = &mut self.handshake else {
            self.process(bytes, &mut out, authorize)?;
            return Ok(out);
        };
        match handshake
            .process_bytes(bytes)
            .map_err(|e| SessionError::Handshake(e.to_string()))?
        {
            HandshakeProcessResult::InProgress { response_bytes } => {
                out.send.extend_from_slice(&response_bytes);
                self.count_setup(bytes.len())?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                out.send.extend_from_slice(&response_bytes);
                self.count_setup(bytes.len() - remaining_bytes.len().min(bytes.len()))?;
                self.handshake = None;
                control(&mut out.send, SET_CHUNK_SIZE, &OUR_CHUNK_SIZE.to_be_bytes());
                control(&mut out.send, WINDOW_ACK_SIZE, &OUR_WINDOW.to_be_bytes());
                self.process(&remaining_bytes, &mut out, authorize)?;
            }
        }
        Ok(out)
    }

    fn count_setup(&mut self, n: usize) -> Result<(), SessionError> {
        if !self.publishing {
            self.setup_bytes += n;
            if self.setup_bytes > SETUP_BUDGET {
                return Err(SessionError::SetupTooLong(self.setup_bytes));
            }
        }
        Ok(())
    }

    fn process(
        &mut self,
        mut input: &[u8],
        out: &mut Output,
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<(), SessionError> {
        while !input.is_empty() && !out.close {
            let before = input.len();
            let publishing = self.publishing;
            let message = self
                .reader
                .next_message(&mut input, &mut |h: &Header| admit(h, publishing))?;
            let taken = before - input.len();
            self.received += taken as u64;
            self.count_setup(taken)?;
            if let Some(message) = message {
                self.handle_message(message, out, authorize)?;
            }
        }
        if let Some(window) = self.ack_window
            && self.received - self.acked >= u64::from(window)
        {
            self.acked = self.received;
            // The sequence number wraps like the peer's byte counter does.
            control(
                &mut out.send,
                ACKNOWLEDGEMENT,
                &(self.received as u32).to_be_bytes(),
            );
        }
        Ok(())
    }

    fn handle_message(
        &mut self,
        message: Message,
        out: &mut Output,
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<(), SessionError> {
        let payload = &message.payload;
        match message.type_id {
            SET_CHUNK_SIZE => {
                let size = be_u32(payload)? & 0x7FFF_FFFF;
                if size == 0 {
                    return Err(SessionError::Protocol("chunk size 0"));
                }
                self.reader.set_chunk_size(size);
            }
            ABORT => self.reader.abort(be_u32(payload)?),
            WINDOW_ACK_SIZE => self.ack_window = Some(be_u32(payload)?.max(MIN_ACK_WINDOW)),
            ACKNOWLEDGEMENT | USER_CONTROL | SET_PEER_BANDWIDTH | AMF0_DATA => {}
            AUDIO | VIDEO if self.publishing => {
                let (timestamp_ms, data) = (message.timestamp, message.payload);
                out.events.push(if message.type_id == AUDIO {
                    SessionEvent::Audio { timestamp_ms, data }
                } else {
                    SessionEvent::Video { timestamp_ms, data }
                });
            }
            AMF0_COMMAND => {
                let values = amf0::decode_all(payload)?;
                self.handle_command(&values, message.stream_id, out, authorize)?;
            }
            // `admit` let nothing else through.
            _ => return Err(SessionError::NotAllowed("message type")),
        }
        Ok(())
    }

    fn handle_command(
        &mut self,
        values: &[Value],
        stream_id: u32,
        out: &mut Output,
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<(), SessionError> {
        let name = values
            .first()
            .and_then(Value::as_str)
            .ok_or(SessionError::Protocol("command without a name"))?;
        let transaction = values.get(1).and_then(Value::as_number).unwrap_or(0.0);
        if name != "connect" && !self.connected {
            return Err(SessionError::Protocol("command before connect"));
        }
        match name {
            "connect" => self.on_connect(values, transaction, out)?,
            "createStream" => self.on_create_stream(transaction, out)?,
            "publish" => self.on_publish(values, stream_id, out, authorize)?,
            "play" => {
                out.close = true;
                on_status(
                    out,
                    stream_id,
                    "error",
                    "NetStream.Play.Failed",
                    "this ingest does not serve playback",
                );
            }
            "deleteStream" | "closeStream" if self.publishing => {
                self.publishing = false;
                out.events.push(SessionEvent::PublishFinished);
                out.close = true;
            }
            // releaseStream, FCPublish, FCUnpublish, _checkbw, answers to nothing we asked: the
            // publishers we serve do not wait for a reply to these.
            _ => {}
        }
        Ok(())
    }

    /// `connect`: only our application name is accepted (anything else is refused and the
    /// connection closed); the answer tells the client we speak AMF0.
    fn on_connect(
        &mut self,
        values: &[Value],
        transaction: f64,
        out: &mut Output,
    ) -> Result<(), SessionError> {
        if self.connected {
            return Err(SessionError::Protocol("second connect"));
        }
        let app = values
            .get(2)
            .and_then(|o| o.property("app"))
            .and_then(Value::as_str)
            .ok_or(SessionError::Protocol("connect without an app name"))?;
        if app.strip_suffix('/').unwrap_or(app) == APP {
            self.connected = true;
            let mut bandwidth = OUR_WINDOW.to_be_bytes().to_vec();
            bandwidth.push(2); // dynamic
            control(&mut out.send, SET_PEER_BANDWIDTH, &bandwidth);
            command(
                &mut out.send,
                COMMAND_CSID,
                0,
                &[
                    amf0::string("_result"),
                    Value::Number(transaction),
                    amf0::object([
                        ("fmsVer", amf0::string("FMS/3,0,1,123")),
                        ("capabilities", Value::Number(31.0)),
                    ]),
                    amf0::object([
                        ("level", amf0::string("status")),
                        ("code", amf0::string("NetConnection.Connect.Success")),
                        ("description", amf0::string("Connection succeeded.")),
                        // We speak AMF0 only, whatever the client offered.
                        ("objectEncoding", Value::Number(0.0)),
                    ]),
                ],
            );
        } else {
            out.close = true;
            out.events.push(SessionEvent::PublishRefused {
                channel: None,
                reason: Refusal::BadName(PublishNameError::BadChannel),
            });
            command(
                &mut out.send,
                COMMAND_CSID,
                0,
                &[
                    amf0::string("_error"),
                    Value::Number(transaction),
                    Value::Null,
                    status(
                        "error",
                        "NetConnection.Connect.Rejected",
                        "unknown application",
                    ),
                ],
            );
        }
        Ok(())
    }

    /// `createStream`: a few streams per connection at most (a publisher needs one).
    fn on_create_stream(&mut self, transaction: f64, out: &mut Output) -> Result<(), SessionError> {
        if self.streams_created >= MAX_STREAMS {
            return Err(SessionError::Protocol("too many createStream"));
        }
        self.streams_created += 1;
        command(
            &mut out.send,
            COMMAND_CSID,
            0,
            &[
                amf0::string("_result"),
                Value::Number(transaction),
                Value::Null,
                Value::Number(f64::from(self.streams_created)),
            ],
        );
        Ok(())
    }

    /// `publish` on a created stream: the name is parsed and authorized ([`Self::decide`]);
    /// a refusal closes the connection after telling the client why.
    fn on_publish(
        &mut self,
        values: &[Value],
        stream_id: u32,
        out: &mut Output,
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<(), SessionError> {
        if stream_id == 0 || stream_id > self.streams_created {
            return Err(SessionError::Protocol("publish on a stream never created"));
        }
        let name = values
            .get(3)
            .and_then(Value::as_str)
            .ok_or(SessionError::Protocol("publish without a name"))?;
        match self.decide(name, authorize) {
            Ok(request) => {
                self.publishing = true;
                out.events.push(SessionEvent::PublishAccepted(request));
                let mut begin = vec![0, 0]; // StreamBegin
                begin.extend_from_slice(&stream_id.to_be_bytes());
                control(&mut out.send, USER_CONTROL, &begin);
                on_status(
                    out,
                    stream_id,
                    "status",
                    "NetStream.Publish.Start",
                    "publishing",
                );
            }
            Err((channel, reason)) => {
                out.close = true;
                let description = reason.to_string();
                out.events
                    .push(SessionEvent::PublishRefused { channel, reason });
                on_status(
                    out,
                    stream_id,
                    "error",
                    "NetStream.Publish.BadName",
                    &description,
                );
            }
        }
        Ok(())
    }

    /// Parses and authorizes a publish name. A refusal names the channel only when it is
    /// configured (the key check got that far): anything else may be a key pasted in the wrong
    /// place, and must not reach a log.
    fn decide(
        &self,
        name: &str,
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<PublishRequest, (Option<String>, Refusal)> {
        if self.publishing {
            return Err((None, Refusal::AlreadyPublishing));
        }
        let request = parse_publish_name(name).map_err(|e| (None, Refusal::BadName(e)))?;
        match authorize(&request) {
            Ok(()) => Ok(request),
            Err(Refusal::UnknownChannel) => Err((None, Refusal::UnknownChannel)),
            Err(reason) => Err((Some(request.channel), reason)),
        }
    }
}

impl Default for RtmpSession {
    fn default() -> Self {
        Self::new()
    }
}

/// Decides a message from its header, before any of its body is taken.
fn admit(h: &Header, publishing: bool) -> Result<(), SessionError> {
    let cap = match h.type_id {
        SET_CHUNK_SIZE..=SET_PEER_BANDWIDTH => MAX_CONTROL_BYTES,
        AMF0_COMMAND => MAX_COMMAND_BYTES,
        AMF0_DATA if publishing => MAX_DATA_BYTES,
        AMF0_DATA => MAX_COMMAND_BYTES,
        AUDIO | VIDEO if publishing => MAX_MEDIA_BYTES,
        AUDIO | VIDEO => return Err(SessionError::NotAllowed("media before an accepted publish")),
        AMF3_DATA | AMF3_COMMAND => {
            return Err(SessionError::NotAllowed(
                "AMF3 (this server speaks AMF0 only)",
            ));
        }
        _ => {
            return Err(SessionError::NotAllowed(
                "message type a publisher never sends",
            ));
        }
    };
    if h.length > cap {
        return Err(SessionError::TooLarge {
            type_id: h.type_id,
            length: h.length,
            cap,
        });
    }
    Ok(())
}

fn be_u32(payload: &[u8]) -> Result<u32, SessionError> {
    payload
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(SessionError::Protocol("control message too short"))
}

fn control(out: &mut Vec<u8>, type_id: u8, payload: &[u8]) {
    chunk::write_message(
        out,
        CONTROL_CSID,
        OUR_CHUNK_SIZE as usize,
        type_id,
        0,
        payload,
    );
}

fn command(out: &mut Vec<u8>, csid: u8, stream_id: u32, values: &[Value]) {
    let mut payload = Vec::new();
    for v in values {
        amf0::encode(v, &mut payload);
    }
    chunk::write_message(
        out,
        csid,
        OUR_CHUNK_SIZE as usize,
        AMF0_COMMAND,
        stream_id,
        &payload,
    );
}

fn status(level: &str, code: &str, description: &str) -> Value {
    amf0::object([
        ("level", amf0::string(level)),
        ("code", amf0::string(code)),
        ("description", amf0::string(description)),
    ])
}

fn on_status(out: &mut Output, stream_id: u32, level: &str, code: &str, description: &str) {
    command(
        &mut out.send,
        STREAM_CSID,
        stream_id,
        &[
            amf0::string("onStatus"),
            Value::Number(0.0),
            Value::Null,
            status(level, code, description),
        ],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::StreamKeys;
    use rml_rtmp::sessions::{
        ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
        PublishRequestType,
    };

    fn keys() -> StreamKeys {
        StreamKeys::from_map([("test".to_string(), "right".to_string())].into())
    }

    /// Drives a real rml_rtmp client against our session in memory, returns the server events
    /// and whether the client saw its publish accepted.
    fn publish(name: &str) -> (Vec<SessionEvent>, bool, bool) {
        let keys = keys();
        let auth = |r: &PublishRequest| keys.check(r);
        let mut server = RtmpSession::new();
        let mut client_hs = Handshake::new(PeerType::Client);
        let mut to_server = client_hs.generate_outbound_p0_and_p1().unwrap();
        let mut events = Vec::new();
        let mut closed = false;
        // Handshake ping-pong.
        let mut leftover;
        loop {
            let out = server.feed(&to_server, &auth).unwrap();
            events.extend(out.events);
            match client_hs.process_bytes(&out.send).unwrap() {
                HandshakeProcessResult::InProgress { response_bytes } => to_server = response_bytes,
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    let out = server.feed(&response_bytes, &auth).unwrap();
                    events.extend(out.events);
                    leftover = remaining_bytes;
                    leftover.extend(out.send);
                    break;
                }
            }
        }
        let (mut client, initial) = ClientSession::new(ClientSessionConfig::new()).unwrap();
        let mut pending_to_server: Vec<u8> = Vec::new();
        let mut accepted = false;
        let handle_client =
            |results: Vec<ClientSessionResult>, pending: &mut Vec<u8>, accepted: &mut bool| {
                let mut connected = false;
                for r in results {
                    match r {
                        ClientSessionResult::OutboundResponse(p) => pending.extend(p.bytes),
                        ClientSessionResult::RaisedEvent(
                            ClientSessionEvent::ConnectionRequestAccepted,
                        ) => connected = true,
                        ClientSessionResult::RaisedEvent(
                            ClientSessionEvent::PublishRequestAccepted,
                        ) => *accepted = true,
                        _ => {}
                    }
                }
                connected
            };
        handle_client(initial, &mut pending_to_server, &mut accepted);
        if let ClientSessionResult::OutboundResponse(p) =
            client.request_connection(APP.into()).unwrap()
        {
            pending_to_server.extend(p.bytes);
        }
        let mut from_server = leftover;
        for _ in 0..10 {
            let r = client.handle_input(&from_server).unwrap();
            if handle_client(r, &mut pending_to_server, &mut accepted)
                && let ClientSessionResult::OutboundResponse(p) = client
                    .request_publishing(name.into(), PublishRequestType::Live)
                    .unwrap()
            {
                pending_to_server.extend(p.bytes);
            }
            let out = server
                .feed(&std::mem::take(&mut pending_to_server), &auth)
                .unwrap();
            closed |= out.close;
            events.extend(out.events);
            from_server = out.send;
        }
        if accepted {
            // A video tag after the publish reaches us as an event.
            if let ClientSessionResult::OutboundResponse(p) = client
                .publish_video_data(
                    Bytes::from_static(&[0x17, 0, 0, 0, 0]),
                    rml_rtmp::time::RtmpTimestamp::new(40),
                    false,
                )
                .unwrap()
            {
                events.extend(server.feed(&p.bytes, &auth).unwrap().events);
            }
        }
        (events, accepted, closed)
    }

    #[test]
    fn good_key_publishes_and_media_flows() {
        let anchor = streaming_hls::unix_now_ms() - 5000;
        let (events, accepted, closed) =
            publish(&format!("test?key=right&source=source1&anchor={anchor}"));
        assert!(accepted && !closed);
        assert!(
            matches!(&events[0], SessionEvent::PublishAccepted(r) if r.channel == "test" && r.anchor_ms == Some(anchor))
        );
        assert!(events.iter().any(|e| matches!(
            e,
            SessionEvent::Video {
                timestamp_ms: 40,
                ..
            }
        )));
    }

    #[test]
    fn wrong_key_is_refused_and_closes() {
        let (events, accepted, closed) = publish("test?key=wrong&source=source2");
        assert!(!accepted && closed);
        assert_eq!(
            events,
            vec![SessionEvent::PublishRefused {
                channel: Some("test".into()),
                reason: Refusal::WrongKey
            }]
        );
        let (events, accepted, _) = publish("nochannel?key=right");
        assert!(!accepted);
        assert!(matches!(
            &events[0],
            SessionEvent::PublishRefused {
                reason: Refusal::UnknownChannel,
                ..
            }
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let auth = |_: &PublishRequest| Ok(());
        // Wrong RTMP version byte.
        assert!(
            RtmpSession::new()
                .feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", &auth)
                .is_err()
        );
        // Pseudo-random bytes after a plausible version byte: whatever happens, no panic, and the
        // session either errors or keeps bounded state.
        let mut s = RtmpSession::new();
        let mut x: u32 = 12345;
        let mut failed = false;
        for _ in 0..200 {
            let mut chunk = vec![3u8];
            for _ in 0..4096 {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                chunk.push((x >> 16) as u8);
            }
            if s.feed(&chunk, &auth).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "garbage must end the session");
    }
}
