//! The chat socket's reading side and its end: the client is read at every wait of the
//! connection (database, replay, slow writes), so its Close is answered at once, and every way a
//! connection ends goes through the close handshake of RFC 6455 section 5.5.1.
//!
//! When the client sends Close, tungstenite queues the answer (the same status code) and allows
//! no data frame after it; the next read or flush puts it on the wire and, as the server, ends
//! the connection, so the server closes TCP first as the RFC asks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use streaming_core::lifecycle::Lifecycle;

use crate::limits;

/// How long a write to the client may take, its Close included.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the end of a connection waits for the client: for its Close after ours, or for
/// the answer to its Close to leave.
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// Frames kept while the connection is busy elsewhere. Fewer than the per-second flood limit,
/// so handling them all at once never counts as a flood; when full, reading pauses until they
/// are handled.
const QUEUED_FRAMES: usize = 16;

/// How a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent Close: the answer echoes its code.
    ClientClosed,
    /// The client went away without a Close (EOF, reset, a broken frame): nothing to answer.
    Gone,
    /// The server ends it with this code and reason, after an error frame saying why when
    /// `why` (code, message) is set.
    Server {
        code: u16,
        reason: &'static str,
        why: Option<(&'static str, &'static str)>,
    },
}

impl End {
    pub(crate) fn server(code: u16, reason: &'static str) -> End {
        End::Server {
            code,
            reason,
            why: None,
        }
    }

    /// Closes with `code` after an error frame `{"type":"error","code":error,"message":...}`.
    pub(crate) fn refuse(
        code: u16,
        reason: &'static str,
        error: &'static str,
        message: &'static str,
    ) -> End {
        End::Server {
            code,
            reason,
            why: Some((error, message)),
        }
    }

    /// The label of `chat_socket_closes_total`.
    fn by(&self) -> &'static str {
        match self {
            End::ClientClosed => "client",
            End::Gone => "gone",
            End::Server { .. } => "server",
        }
    }
}

/// The client's frames: read from the socket, or kept from a read made while the connection
/// waited for something else.
pub(crate) struct Inbox {
    stream: SplitStream<WebSocket>,
    queued: VecDeque<Message>,
    lifecycle: Lifecycle,
    /// When the client last sent anything (a ping or pong included).
    pub(crate) last_heard: Instant,
    window_start: Instant,
    frames: u32,
}

impl Inbox {
    pub(crate) fn new(stream: SplitStream<WebSocket>, lifecycle: Lifecycle) -> Inbox {
        Inbox {
            stream,
            queued: VecDeque::new(),
            lifecycle,
            last_heard: Instant::now(),
            window_start: Instant::now(),
            frames: 0,
        }
    }

    /// The next text or binary frame (pings and pongs only count as signs of life). Cancel
    /// safe: a frame is never lost to a dropped call.
    pub(crate) async fn next(&mut self) -> Result<Message, End> {
        if let Some(frame) = self.queued.pop_front() {
            return Ok(frame);
        }
        loop {
            let frame = self.stream.next().await;
            if let Some(frame) = self.take(frame)? {
                return Ok(frame);
            }
        }
    }

    /// Runs `work` while reading the client, so its Close, its disappearance, a flood or the
    /// broadcast's shutdown end the wait at once instead of after it. Other frames are kept
    /// for [`Inbox::next`].
    pub(crate) async fn watch<T>(&mut self, work: impl Future<Output = T>) -> Result<T, End> {
        let mut work = std::pin::pin!(work);
        let lifecycle = self.lifecycle.clone();
        let shutdown = lifecycle.shutdown();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let reading = self.queued.len() < QUEUED_FRAMES;
            tokio::select! {
                biased;
                frame = self.stream.next(), if reading => {
                    if let Some(frame) = self.take(frame)? {
                        self.queued.push_back(frame);
                    }
                }
                () = &mut shutdown => return Err(shutting_down()),
                out = &mut work => return Ok(out),
            }
        }
    }

    /// One read: `Some` for a frame the connection handles, `None` for a ping or pong, the end
    /// for a Close, a vanished client or a flood.
    fn take(
        &mut self,
        frame: Option<Result<Message, axum::Error>>,
    ) -> Result<Option<Message>, End> {
        let frame = match frame {
            Some(Ok(frame)) => frame,
            // A frame over the transport's ceiling (64 KiB) lands here too: it stays unread in
            // the kernel, so closing resets the connection whatever we send first.
            Some(Err(_)) | None => return Err(End::Gone),
        };
        let now = Instant::now();
        self.last_heard = now;
        if now.duration_since(self.window_start) >= Duration::from_secs(1) {
            (self.window_start, self.frames) = (now, 0);
        }
        self.frames += 1;
        if self.frames > limits::FRAMES_PER_SECOND {
            return Err(End::refuse(
                1008,
                "flood",
                "rate_limited",
                "too many frames per second: closing",
            ));
        }
        match frame {
            Message::Close(_) => Err(End::ClientClosed),
            Message::Ping(_) | Message::Pong(_) => Ok(None),
            frame => Ok(Some(frame)),
        }
    }

    /// Waits for the client's answer to our Close (or EOF), dropping what it still sends.
    async fn until_close(&mut self) {
        while let Some(Ok(frame)) = self.stream.next().await {
            if matches!(frame, Message::Close(_)) {
                break;
            }
        }
    }
}

pub(crate) fn shutting_down() -> End {
    End::server(1001, "broadcast shutting down")
}

fn error_frame(code: &str, message: &str) -> Message {
    let frame = streaming_core::chat_protocol::ServerFrame::Error {
        id: None,
        code: code.to_owned(),
        message: message.to_owned(),
    };
    Message::Text(Utf8Bytes::from(frame.to_json()))
}

/// The close handshake, then the socket is dropped (TCP closes). `during` says where the
/// connection was ("open": hello, login and replay; "live"), for the metric.
pub(crate) async fn finish(
    mut sink: SplitSink<WebSocket, Message>,
    mut inbox: Inbox,
    end: End,
    during: &'static str,
) {
    let started = Instant::now();
    let code = match &end {
        End::Server { code, .. } => code.to_string(),
        _ => String::new(),
    };
    metrics::counter!("chat_socket_closes_total", "by" => end.by(), "code" => code, "during" => during)
        .increment(1);
    match end {
        End::Gone => {}
        // The answer is queued: a read puts it on the wire and ends the connection (a flush of
        // the sink could first try to send a data frame left in its slot, which tungstenite
        // refuses after a Close, and stop there).
        End::ClientClosed => {
            let _ = tokio::time::timeout(CLOSE_LINGER, inbox.stream.next()).await;
        }
        End::Server { code, reason, why } => {
            let told = async {
                if let Some((error, message)) = why {
                    sink.send(error_frame(error, message)).await?;
                }
                sink.send(Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                })))
                .await
            };
            // Dropping the socket while the client still sends would reset the connection, and a
            // reset can destroy the Close (and its reason) before the client reads it.
            if matches!(tokio::time::timeout(SEND_TIMEOUT, told).await, Ok(Ok(()))) {
                let _ = tokio::time::timeout(CLOSE_LINGER, inbox.until_close()).await;
            }
        }
    }
    metrics::histogram!("chat_socket_close_seconds").record(started.elapsed().as_secs_f64());
}

/// The handshake over real sockets: axum's WebSocket on loopback, tungstenite as the client.
/// The chat protocol on top (hello, replay from PostgreSQL, acks) is the database end-to-end
/// test's.
#[cfg(test)]
mod tests {
    use axum::extract::WebSocketUpgrade;
    use axum::extract::ws::WebSocket;
    use tokio::sync::mpsc;
    use tokio_tungstenite::tungstenite::Message as Client;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame as ClientClose;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    use super::*;

    /// What the server side does with its socket until it ends.
    #[derive(Clone, Copy)]
    enum Busy {
        /// Waits for something that never comes (a database that does not answer).
        Waiting,
        /// Sends numbered frames without end (a long replay).
        Replaying,
    }

    struct Server {
        url: String,
        lifecycle: Lifecycle,
        ends: mpsc::UnboundedReceiver<(End, usize)>,
    }

    /// A WebSocket server on 127.94.0.1 whose connections do `busy` and report how they ended
    /// and how many frames they sent.
    async fn server(busy: Busy) -> Server {
        let lifecycle = Lifecycle::manual();
        let (tx, ends) = mpsc::unbounded_channel();
        let state = (lifecycle.clone(), tx);
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(
                    move |axum::extract::State((lifecycle, tx)): axum::extract::State<(
                        Lifecycle,
                        mpsc::UnboundedSender<(End, usize)>,
                    )>,
                          ws: WebSocketUpgrade| async move {
                        ws.max_frame_size(64 * 1024)
                            .max_message_size(64 * 1024)
                            .on_upgrade(move |socket| serve(socket, busy, lifecycle, tx))
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.94.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let shutdown = lifecycle.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.shutdown().await })
                .await
                .unwrap();
        });
        Server {
            url,
            lifecycle,
            ends,
        }
    }

    async fn serve(
        socket: WebSocket,
        busy: Busy,
        lifecycle: Lifecycle,
        ends: mpsc::UnboundedSender<(End, usize)>,
    ) {
        let (mut sink, stream) = socket.split();
        let mut inbox = Inbox::new(stream, lifecycle);
        let mut sent = 0;
        let end = match busy {
            Busy::Waiting => inbox
                .watch(std::future::pending::<()>())
                .await
                .expect_err("never done"),
            Busy::Replaying => loop {
                let frame = Message::Text(Utf8Bytes::from(format!("{sent:0>100}")));
                match inbox.watch(sink.send(frame)).await {
                    Ok(Ok(())) => sent += 1,
                    Ok(Err(_)) => break End::Gone,
                    Err(end) => break end,
                }
            },
        };
        finish(sink, inbox, end.clone(), "open").await;
        let _ = ends.send((end, sent));
    }

    type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// Reads until the server's Close and then the end of the connection: the Close's code,
    /// the data frames before it, and the seconds until the Close and until EOF.
    async fn read_to_end(ws: &mut Socket) -> (Option<u16>, usize, f64, f64) {
        let started = Instant::now();
        let (mut code, mut frames, mut close_s) = (None, 0, f64::NAN);
        let deadline = Duration::from_secs(10);
        loop {
            match tokio::time::timeout(deadline, ws.next())
                .await
                .expect("the server ends the connection within 10 s")
            {
                Some(Ok(Client::Close(frame))) => {
                    code = frame.map(|f| u16::from(f.code));
                    close_s = started.elapsed().as_secs_f64();
                }
                Some(Ok(Client::Text(_))) if code.is_none() => frames += 1,
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                Some(Err(e)) => panic!("not a clean close: {e}"),
                None => return (code, frames, close_s, started.elapsed().as_secs_f64()),
            }
        }
    }

    async fn close(ws: &mut Socket, code: u16) {
        ws.send(Client::Close(Some(ClientClose {
            code: CloseCode::from(code),
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_close_during_a_wait_is_answered_with_its_code_at_once() {
        let mut server = server(Busy::Waiting).await;
        for code in [1000, 1001, 4000] {
            let (mut ws, _) = tokio_tungstenite::connect_async(&server.url).await.unwrap();
            close(&mut ws, code).await;
            let (answer, frames, close_s, eof_s) = read_to_end(&mut ws).await;
            eprintln!(
                "close {code} while waiting: answered in {close_s:.4} s, EOF after {eof_s:.4} s"
            );
            assert_eq!((answer, frames), (Some(code), 0));
            assert!(eof_s < CLOSE_LINGER.as_secs_f64(), "EOF after {eof_s} s");
            assert_eq!(server.ends.recv().await.unwrap().0, End::ClientClosed);
        }
    }

    #[tokio::test]
    async fn a_close_during_a_long_replay_stops_it() {
        let mut server = server(Busy::Replaying).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(&server.url).await.unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Client::Text(_)))));
        close(&mut ws, 1000).await;
        let (answer, frames, close_s, eof_s) = read_to_end(&mut ws).await;
        let (end, sent) = server.ends.recv().await.unwrap();
        eprintln!(
            "close during a replay: answered in {close_s:.4} s, EOF after {eof_s:.4} s, \
             {frames} frames after the Close, {sent} sent in all"
        );
        assert_eq!((answer, end), (Some(1000), End::ClientClosed));
        assert_eq!(
            frames + 1,
            sent,
            "every frame sent arrived before the answer"
        );
        assert!(eof_s < CLOSE_LINGER.as_secs_f64(), "EOF after {eof_s} s");
    }

    #[tokio::test]
    async fn shutdown_closes_with_1001_and_waits_for_the_clients_close() {
        let mut server = server(Busy::Waiting).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(&server.url).await.unwrap();
        tokio::task::yield_now().await;
        server.lifecycle.request_shutdown();
        // tungstenite answers the server's Close on the next read, which then sees the EOF.
        let (code, frames, close_s, eof_s) = read_to_end(&mut ws).await;
        eprintln!("shutdown: 1001 after {close_s:.4} s, EOF after {eof_s:.4} s");
        assert_eq!((code, frames), (Some(1001), 0));
        let (end, _) = server.ends.recv().await.unwrap();
        assert_eq!(end, shutting_down());
    }

    #[tokio::test]
    async fn a_flood_is_closed_with_a_reason() {
        let mut server = server(Busy::Waiting).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(&server.url).await.unwrap();
        for _ in 0..=limits::FRAMES_PER_SECOND {
            ws.send(Client::Ping(Default::default())).await.unwrap();
        }
        let mut error = None;
        let code = loop {
            match ws.next().await {
                Some(Ok(Client::Text(t))) => error = Some(t.to_string()),
                Some(Ok(Client::Close(f))) => break f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("no Close: {other:?}"),
            }
        };
        assert_eq!(code, Some(1008));
        assert!(error.is_some_and(|e| e.contains("rate_limited")));
        // Our answer goes out with this read; the server then ends the connection.
        let eof = tokio::time::timeout(2 * CLOSE_LINGER, ws.next()).await;
        assert!(matches!(eof, Ok(None)), "EOF after the handshake: {eof:?}");
        assert!(matches!(
            server.ends.recv().await.unwrap().0,
            End::Server { code: 1008, .. }
        ));
    }
}
