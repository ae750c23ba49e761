//! One RTMP connection as a pure state machine: bytes in, bytes to send and events out.
//!
//! The socket loop (`listener.rs`) stays thin, so garbage, a wrong key and a good publish are all
//! tested here without sockets. rml_rtmp does the handshake and chunk/AMF work; we add the
//! publish policy (app `live`, stream key check) and limits.

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};

use crate::publish::{PublishRequest, Refusal, parse_publish_name};

/// The only RTMP application we serve.
pub const APP: &str = "live";

/// Bytes a peer may send without completing a single RTMP message (or the handshake). The RTMP
/// format caps a message at 16 MiB; real keyframes of our ladders stay far below this, so a peer
/// that buffers more is broken or hostile.
pub const MAX_PENDING_BYTES: usize = 4 * 1024 * 1024;

/// Largest chunk size we announce for our own (tiny) outbound messages.
const OUR_CHUNK_SIZE: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("RTMP handshake failed: {0}")]
    Handshake(String),
    #[error("RTMP protocol error: {0}")]
    Protocol(String),
    #[error("peer sent {0} bytes without a complete RTMP message")]
    TooMuchPending(usize),
    #[error("RTMP library panicked on peer input")]
    Panic,
}

/// What the connection tells the rest of the ingest.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    PublishAccepted(PublishRequest),
    /// The publish was refused; the connection must be closed after sending `send`.
    PublishRefused {
        name_channel: String,
        source: Option<String>,
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

enum State {
    Handshake(Box<Handshake>),
    Session(Box<ServerSession>),
}

/// Server side of one RTMP connection.
pub struct RtmpSession {
    state: State,
    publishing: bool,
    pending: usize,
}

impl RtmpSession {
    pub fn new() -> Self {
        Self {
            state: State::Handshake(Box::new(Handshake::new(PeerType::Server))),
            publishing: false,
            pending: 0,
        }
    }

    pub fn is_publishing(&self) -> bool {
        self.publishing
    }

    /// Feeds bytes read from the peer. `authorize` decides a publish request (stream key check).
    /// An error means: log it and drop the connection.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<Output, SessionError> {
        // rml_rtmp is old and not fuzzed; a panic on hostile input must cost only this connection.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.feed_inner(bytes, authorize)
        }))
        .map_err(|_| SessionError::Panic)?
    }

    fn feed_inner(
        &mut self,
        bytes: &[u8],
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<Output, SessionError> {
        let mut out = Output::default();
        let session_bytes: Vec<u8> = match &mut self.state {
            State::Handshake(handshake) => {
                match handshake
                    .process_bytes(bytes)
                    .map_err(|e| SessionError::Handshake(format!("{e:?}")))?
                {
                    HandshakeProcessResult::InProgress { response_bytes } => {
                        out.send.extend_from_slice(&response_bytes);
                        self.pending += bytes.len();
                        if self.pending > 8192 {
                            return Err(SessionError::Handshake(
                                "handshake longer than 8 KiB".into(),
                            ));
                        }
                        return Ok(out);
                    }
                    HandshakeProcessResult::Completed {
                        response_bytes,
                        remaining_bytes,
                    } => {
                        out.send.extend_from_slice(&response_bytes);
                        let mut config = ServerSessionConfig::new();
                        config.chunk_size = OUR_CHUNK_SIZE;
                        let (session, results) = ServerSession::new(config)
                            .map_err(|e| SessionError::Protocol(format!("{e:?}")))?;
                        self.state = State::Session(Box::new(session));
                        self.pending = 0;
                        self.handle_results(results, &mut out, authorize)?;
                        remaining_bytes
                    }
                }
            }
            State::Session(_) => bytes.to_vec(),
        };
        if session_bytes.is_empty() {
            return Ok(out);
        }
        let State::Session(session) = &mut self.state else {
            return Ok(out);
        };
        let results = session
            .handle_input(&session_bytes)
            .map_err(|e| SessionError::Protocol(format!("{e:?}")))?;
        if results.is_empty() {
            self.pending += session_bytes.len();
            if self.pending > MAX_PENDING_BYTES {
                return Err(SessionError::TooMuchPending(self.pending));
            }
        } else {
            self.pending = 0;
        }
        self.handle_results(results, &mut out, authorize)?;
        Ok(out)
    }

    fn handle_results(
        &mut self,
        results: Vec<ServerSessionResult>,
        out: &mut Output,
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<(), SessionError> {
        let mut queue = std::collections::VecDeque::from(results);
        while let Some(result) = queue.pop_front() {
            match result {
                ServerSessionResult::OutboundResponse(packet) => {
                    out.send.extend_from_slice(&packet.bytes)
                }
                ServerSessionResult::UnhandleableMessageReceived(_) => {}
                ServerSessionResult::RaisedEvent(event) => {
                    let more = self.handle_event(event, out, authorize)?;
                    // Responses to this event go out before anything raised later.
                    for r in more.into_iter().rev() {
                        queue.push_front(r);
                    }
                }
            }
        }
        Ok(())
    }

    fn session(&mut self) -> &mut ServerSession {
        match &mut self.state {
            State::Session(s) => s,
            State::Handshake(_) => unreachable!("events only come from an established session"),
        }
    }

    fn handle_event(
        &mut self,
        event: ServerSessionEvent,
        out: &mut Output,
        authorize: &dyn Fn(&PublishRequest) -> Result<(), Refusal>,
    ) -> Result<Vec<ServerSessionResult>, SessionError> {
        let proto =
            |e: rml_rtmp::sessions::ServerSessionError| SessionError::Protocol(format!("{e:?}"));
        match event {
            ServerSessionEvent::ConnectionRequested {
                request_id,
                app_name,
            } => {
                if app_name == APP {
                    self.session().accept_request(request_id).map_err(proto)
                } else {
                    out.close = true;
                    out.events.push(SessionEvent::PublishRefused {
                        name_channel: String::new(),
                        source: None,
                        reason: Refusal::BadName(crate::publish::PublishNameError::BadChannel),
                    });
                    self.session()
                        .reject_request(
                            request_id,
                            "NetConnection.Connect.Rejected",
                            "unknown application",
                        )
                        .map_err(proto)
                }
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                stream_key,
                ..
            } => {
                let decision = if self.publishing {
                    Err((String::new(), None, Refusal::AlreadyPublishing))
                } else {
                    match parse_publish_name(&stream_key) {
                        Ok(request) => match authorize(&request) {
                            Ok(()) => Ok(request),
                            Err(reason) => Err((request.channel, request.source, reason)),
                        },
                        Err(e) => {
                            let channel = stream_key
                                .split('?')
                                .next()
                                .unwrap_or_default()
                                .chars()
                                .take(64)
                                .collect();
                            Err((channel, None, Refusal::BadName(e)))
                        }
                    }
                };
                match decision {
                    Ok(request) => {
                        self.publishing = true;
                        out.events.push(SessionEvent::PublishAccepted(request));
                        self.session().accept_request(request_id).map_err(proto)
                    }
                    Err((name_channel, source, reason)) => {
                        out.close = true;
                        let description = reason.to_string();
                        out.events.push(SessionEvent::PublishRefused {
                            name_channel,
                            source,
                            reason,
                        });
                        self.session()
                            .reject_request(request_id, "NetStream.Publish.BadName", &description)
                            .map_err(proto)
                    }
                }
            }
            ServerSessionEvent::PlayStreamRequested { request_id, .. } => {
                out.close = true;
                self.session()
                    .reject_request(
                        request_id,
                        "NetStream.Play.Failed",
                        "this ingest does not serve playback",
                    )
                    .map_err(proto)
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } if self.publishing => {
                out.events.push(SessionEvent::Video {
                    timestamp_ms: timestamp.value,
                    data,
                });
                Ok(Vec::new())
            }
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } if self.publishing => {
                out.events.push(SessionEvent::Audio {
                    timestamp_ms: timestamp.value,
                    data,
                });
                Ok(Vec::new())
            }
            ServerSessionEvent::PublishStreamFinished { .. } if self.publishing => {
                self.publishing = false;
                out.events.push(SessionEvent::PublishFinished);
                out.close = true;
                Ok(Vec::new())
            }
            _ => Ok(Vec::new()),
        }
    }
}

impl Default for RtmpSession {
    fn default() -> Self {
        Self::new()
    }
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
        let (events, accepted, closed) =
            publish("test?key=right&source=source1&anchor=1764000000000");
        assert!(accepted && !closed);
        assert!(
            matches!(&events[0], SessionEvent::PublishAccepted(r) if r.channel == "test" && r.anchor_ms == Some(1_764_000_000_000))
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
                name_channel: "test".into(),
                source: Some("source2".into()),
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
