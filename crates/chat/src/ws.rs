//! The chat WebSocket, `wss://<broadcast>/api/chat/<channel>`: the frames of
//! `streaming_core::chat_protocol` (hello, writes and moderation in; welcome, events, acks and
//! errors out).
//!
//! A client keeps the highest seq it saw and sends it as `since` after a reconnect (to any
//! broadcast): the gap is replayed, from this broadcast's memory or from the database, and
//! nothing is sent twice on one connection. Sends carry a client-made id and may be resent
//! after a reconnect: the database keeps one copy and the ack repeats its seq.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use streaming_core::chat_protocol::{ClientFrame, Member, ServerFrame};
use tokio::sync::{broadcast, mpsc};

use crate::Chat;
use crate::hub::Follow;
use crate::limits::{self, ConnectionGuard};
use crate::socket::{End, Inbox, SEND_TIMEOUT, finish, shutting_down};
use crate::store::{self, Action, Event, StoreError, User};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const PING_EVERY: Duration = Duration::from_secs(10);
/// A client silent (not even a pong) for this long is gone.
const IDLE_LIMIT: Duration = Duration::from_secs(35);
/// After SIGTERM, how long acks of writes already under way may still reach their client
/// before the socket closes (1001); a write that misses it is resent and stored once.
const ACK_DRAIN: Duration = Duration::from_secs(1);
/// Events sent to a fresh client (no `since`).
const HISTORY: i64 = 50;
/// Largest gap replayed to a logged-in client; older history is not chat any more.
const MAX_REPLAY: i64 = 5000;
/// Largest gap replayed to an anonymous client: a viewer needs the recent conversation, and
/// the hub's ring always holds this much, so a crowd of anonymous sockets replays from shared
/// memory rather than from the database.
const ANONYMOUS_REPLAY: i64 = 200;
/// A replay waiting this long for its turn to read the database is told to come back later.
const REPLAY_WAIT: Duration = Duration::from_secs(10);
/// Writes queued per connection while the database is slow.
const PENDING_OPS: usize = 16;
/// Tungstenite's own ceiling; our limit (limits::MAX_FRAME_BYTES) is checked with a clear error.
const TRANSPORT_LIMIT: usize = 64 * 1024;

pub fn router(chat: Arc<Chat>) -> axum::Router {
    axum::Router::new()
        .route("/api/chat/{channel}", axum::routing::get(upgrade))
        .with_state(chat)
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

async fn upgrade(
    State(chat): State<Arc<Chat>>,
    Path(channel): Path<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !chat.hub.has_channel(&channel) {
        return refuse(StatusCode::NOT_FOUND, "no such channel");
    }
    // Browsers always send Origin: only the cluster's own pages may use a viewer's session.
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origin.to_str().is_ok_and(|o| chat.origin_allowed(o))
    {
        return refuse(
            StatusCode::FORBIDDEN,
            "chat is only open to the cluster's own pages",
        );
    }
    let max = chat.max_sockets.load(std::sync::atomic::Ordering::Relaxed);
    let guard = match chat
        .connections
        .try_open(peer.ip(), limits::CONNECTIONS_PER_IP, max)
    {
        Ok(guard) => guard,
        Err(limits::Full::Address) => {
            metrics::counter!("chat_sockets_refused_total", "reason" => "per_address").increment(1);
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "too many chat connections from your address",
            );
        }
        Err(limits::Full::Total) => {
            metrics::counter!("chat_sockets_refused_total", "reason" => "total").increment(1);
            let mut r = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "this broadcast's chat is full, retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            return r;
        }
    };
    ws.max_message_size(TRANSPORT_LIMIT)
        .max_frame_size(TRANSPORT_LIMIT)
        .on_upgrade(move |socket| async move {
            metrics::gauge!("chat_connections").increment(1.0);
            Connection::serve(chat, channel, socket, guard).await;
            metrics::gauge!("chat_connections").decrement(1.0);
        })
}

/// Where a client's replay starts when the server chooses: the last `HISTORY` events for a
/// fresh client, and for an anonymous one asking for more, at most `ANONYMOUS_REPLAY`.
fn replay_from(since: Option<i64>, last: i64) -> i64 {
    match since {
        Some(seq) => seq.max(last - ANONYMOUS_REPLAY),
        None => (last - HISTORY).max(0),
    }
}

/// A write the worker performs in order, off the connection's loop.
struct Op {
    id: String,
    action: Action,
}

fn error_json(id: Option<&str>, code: &str, message: &str) -> String {
    ServerFrame::Error {
        id: id.map(str::to_owned),
        code: code.to_owned(),
        message: message.to_owned(),
    }
    .to_json()
}

fn text(s: String) -> Message {
    Message::Text(Utf8Bytes::from(s))
}

struct Connection {
    chat: Arc<Chat>,
    channel: String,
    sink: SplitSink<WebSocket, Message>,
    inbox: Inbox,
    user: Option<User>,
    /// Highest seq sent on this connection.
    last_sent: i64,
}

impl Connection {
    async fn serve(chat: Arc<Chat>, channel: String, socket: WebSocket, _guard: ConnectionGuard) {
        let (sink, stream) = socket.split();
        let inbox = Inbox::new(stream, chat.lifecycle.clone());
        let mut conn = Connection {
            chat,
            channel,
            sink,
            inbox,
            user: None,
            last_sent: 0,
        };
        let (end, during) = match conn.open().await {
            Ok(follow) => (conn.run(follow).await, "live"),
            Err(end) => (end, "open"),
        };
        finish(conn.sink, conn.inbox, end, during).await;
    }

    /// Sends one frame while still reading the client (see [`Inbox::watch`]).
    async fn send(&mut self, message: Message) -> Result<(), End> {
        let sending = tokio::time::timeout(SEND_TIMEOUT, self.sink.send(message));
        match self.inbox.watch(sending).await? {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::server(1001, "send failed or too slow")),
        }
    }

    fn history_unavailable() -> End {
        End::refuse(
            1013,
            "try again later",
            "unavailable",
            "chat history is unavailable (database failover), reconnect shortly",
        )
    }

    async fn send_event(&mut self, event: &Event) -> Result<(), End> {
        if event.seq() <= self.last_sent {
            return Ok(());
        }
        let json = serde_json::to_string(event).unwrap_or_default();
        self.send(text(json)).await?;
        self.last_sent = event.seq();
        Ok(())
    }

    /// Hello, authentication, welcome and the replay of what the client missed.
    async fn open(&mut self) -> Result<Follow, End> {
        let expected_hello = End::refuse(
            1008,
            "expected hello",
            "bad_request",
            "the first message must be {\"type\":\"hello\",\"session\":...,\"since\":...} within 10 s",
        );
        let lifecycle = self.chat.lifecycle.clone();
        let hello = tokio::select! {
            hello = tokio::time::timeout(HELLO_TIMEOUT, self.inbox.next()) => hello,
            () = lifecycle.shutdown() => return Err(shutting_down()),
        };
        let hello = match hello {
            Ok(Ok(Message::Text(t))) if t.len() <= limits::MAX_FRAME_BYTES => {
                serde_json::from_str::<ClientFrame>(&t).ok()
            }
            Ok(Err(end)) => return Err(end),
            _ => None,
        };
        let Some(ClientFrame::Hello { session, since }) = hello else {
            return Err(expected_hello);
        };
        if let Some(token) = session.filter(|t| !t.is_empty()) {
            let chat = self.chat.clone();
            match self.inbox.watch(chat.authenticate(&token)).await? {
                Ok(user) => self.user = Some(user),
                Err(e) => {
                    self.send(text(error_json(None, "bad_session", &e.to_string())))
                        .await?;
                }
            }
        }
        let since = since.filter(|seq| *seq >= 0);
        let after = match since {
            Some(seq) if self.user.is_some() => seq,
            _ => {
                let ready = tokio::time::timeout(self.chat.retry_window, self.chat.hub.ready());
                if self.inbox.watch(ready).await?.is_err() {
                    return Err(Self::history_unavailable());
                }
                replay_from(since, self.chat.hub.last_seq(&self.channel).unwrap_or(0))
            }
        };
        self.last_sent = after;
        let welcome = ServerFrame::Welcome {
            channel: self.channel.clone(),
            broadcast: self.chat.broadcast.clone(),
            user: self.user.as_ref().map(|u| Member {
                name: u.name.clone(),
                role: u.role,
            }),
            last_seq: self.chat.hub.last_seq(&self.channel),
        };
        self.send(text(welcome.to_json())).await?;
        self.catch_up().await
    }

    /// Follows the hub from `last_sent`: replays the ring, or the database when the ring does
    /// not reach back that far, and returns the live feed.
    async fn catch_up(&mut self) -> Result<Follow, End> {
        // An anonymous socket that fell behind (or asked for old history) skips ahead: it gets
        // what the ring holds, not database reads.
        let reach = if self.user.is_some() {
            MAX_REPLAY
        } else {
            if let Some(last) = self.chat.hub.last_seq(&self.channel) {
                self.last_sent = self.last_sent.max(last - ANONYMOUS_REPLAY);
            }
            ANONYMOUS_REPLAY
        };
        let follow = self
            .chat
            .hub
            .follow(&self.channel, self.last_sent)
            .ok_or(End::server(1011, "channel vanished"))?;
        if follow.incomplete {
            let stop = self.last_sent + reach;
            loop {
                let chat = self.chat.clone();
                let waiting = tokio::time::timeout(REPLAY_WAIT, chat.replay_reads.acquire());
                let Ok(Ok(turn)) = self.inbox.watch(waiting).await? else {
                    metrics::counter!("chat_replays_refused_total").increment(1);
                    return Err(Self::history_unavailable());
                };
                let (channel, after) = (self.channel.clone(), self.last_sent);
                let reading = chat.retry(|pool| {
                    let channel = channel.clone();
                    async move { store::events_after(&pool, &channel, after, 500).await }
                });
                let batch = self.inbox.watch(reading).await?;
                drop(turn);
                let batch = match batch {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!("chat replay failed: {e}");
                        return Err(Self::history_unavailable());
                    }
                };
                let done = batch.len() < 500 || self.last_sent >= stop;
                for event in &batch {
                    self.send_event(event).await?;
                }
                if done {
                    break;
                }
            }
        }
        for event in &follow.backlog {
            self.send_event(event).await?;
        }
        Ok(follow)
    }

    async fn run(&mut self, mut follow: Follow) -> End {
        let (ops, op_rx) = mpsc::channel::<Op>(PENDING_OPS);
        let (replies, mut reply_rx) = mpsc::channel::<String>(PENDING_OPS * 2);
        match self.user.clone() {
            Some(user) => {
                tokio::spawn(write_worker(
                    self.chat.clone(),
                    self.channel.clone(),
                    user,
                    op_rx,
                    replies,
                ));
            }
            // Nothing will answer: the shutdown's wait for acks ends at once.
            None => drop(replies),
        }
        let mut ping = tokio::time::interval(PING_EVERY);
        let lifecycle = self.chat.lifecycle.clone();
        loop {
            let step = tokio::select! {
                frame = self.inbox.next() => match frame {
                    Ok(Message::Text(t)) => self.handle(&t, &ops).await,
                    Ok(_) => self.send(text(error_json(None, "bad_request", "text frames only"))).await,
                    Err(end) => return end,
                },
                event = follow.live.recv() => match event {
                    Ok(event) => self.send_event(&event).await,
                    // Too slow to follow live: catch up from the ring or the database.
                    Err(broadcast::error::RecvError::Lagged(_)) => match self.catch_up().await {
                        Ok(f) => { follow = f; Ok(()) }
                        Err(c) => Err(c),
                    },
                    Err(broadcast::error::RecvError::Closed) => Err(End::server(1011, "channel closed")),
                },
                Some(reply) = reply_rx.recv() => self.send(text(reply)).await,
                _ = ping.tick() => {
                    if self.inbox.last_heard.elapsed() > IDLE_LIMIT {
                        return End::server(1001, "idle");
                    }
                    self.send(Message::Ping(Default::default())).await
                }
                () = lifecycle.shutdown() => {
                    // No new writes; the acks of those under way still go out, briefly.
                    drop(ops);
                    return self.deliver_acks(reply_rx).await.err().unwrap_or_else(shutting_down);
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Sends the worker's answers until it is done, for at most [`ACK_DRAIN`] (the shutdown
    /// has come: not watched for again).
    async fn deliver_acks(&mut self, mut replies: mpsc::Receiver<String>) -> Result<(), End> {
        let sending = async {
            while let Some(reply) = replies.recv().await {
                self.sink.send(text(reply)).await?;
            }
            Ok::<(), axum::Error>(())
        };
        match tokio::time::timeout(ACK_DRAIN, sending).await {
            Ok(Err(_)) => Err(End::Gone),
            Ok(Ok(())) | Err(_) => Ok(()),
        }
    }

    /// One client frame: validated here, writes queued for the worker.
    async fn handle(&mut self, raw: &str, ops: &mpsc::Sender<Op>) -> Result<(), End> {
        if raw.len() > limits::MAX_FRAME_BYTES {
            return Err(End::refuse(
                1009,
                "frame too big",
                "too_long",
                "frames are limited to 4 KiB",
            ));
        }
        let message = match serde_json::from_str::<ClientFrame>(raw) {
            Ok(m) => m,
            Err(_) => {
                return self
                    .send(text(error_json(None, "bad_request", "not a chat message (see the protocol: type send/delete/mute/ban/unban/ping)")))
                    .await;
            }
        };
        let (id, action) = match message {
            ClientFrame::Ping => return self.send(text(ServerFrame::Pong.to_json())).await,
            ClientFrame::Hello { .. } => {
                return self
                    .send(text(error_json(None, "bad_request", "already said hello")))
                    .await;
            }
            ClientFrame::Send { id, text } => (id, Action::Message { text }),
            ClientFrame::Delete { id, target } => (id, Action::Delete { target }),
            ClientFrame::Mute { id, user, seconds } => (
                id,
                Action::Mute {
                    user,
                    seconds: seconds.clamp(1, 7 * 24 * 3600),
                },
            ),
            ClientFrame::Ban { id, user } => (id, Action::Ban { user }),
            ClientFrame::Unban { id, user } => (id, Action::Unban { user }),
        };
        if let Err((code, why)) = self.check(&id, &action) {
            let id = limits::valid_client_id(&id).then_some(id.as_str());
            return self.send(text(error_json(id, code, why))).await;
        }
        if ops
            .try_send(Op {
                id: id.clone(),
                action,
            })
            .is_err()
        {
            return self
                .send(text(error_json(
                    Some(&id),
                    "rate_limited",
                    "too many messages waiting for the database",
                )))
                .await;
        }
        Ok(())
    }

    fn check(&self, id: &str, action: &Action) -> Result<(), (&'static str, &'static str)> {
        let Some(user) = &self.user else {
            return Err(("login_required", "log in to chat"));
        };
        if !limits::valid_client_id(id) {
            return Err(("bad_request", "id must be 1-64 of [A-Za-z0-9_-]"));
        }
        match action {
            Action::Message { text } => {
                limits::check_text(text)?;
                if !self.chat.rates.allow(&user.id, Instant::now()) {
                    return Err(("rate_limited", "slow down: at most 3 messages per second"));
                }
            }
            _ if !user.role.moderates() => {
                return Err(("forbidden", "only moderators may do that"));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Appends one client's writes in order, each retried through a failover; answers go back to
/// the connection (which may have closed: then they are dropped, and the client resends).
async fn write_worker(
    chat: Arc<Chat>,
    channel: String,
    user: User,
    mut ops: mpsc::Receiver<Op>,
    replies: mpsc::Sender<String>,
) {
    while let Some(op) = ops.recv().await {
        let started = Instant::now();
        let result = chat
            .retry(|pool| {
                let (channel, user, id, action) = (
                    channel.clone(),
                    user.clone(),
                    op.id.clone(),
                    op.action.clone(),
                );
                async move { store::append(&pool, &channel, &user, &id, &action).await }
            })
            .await;
        metrics::histogram!("chat_append_seconds").record(started.elapsed().as_secs_f64());
        let reply = match result {
            Ok(appended) => {
                metrics::counter!("chat_appends_total", "duplicate" => appended.duplicate.to_string()).increment(1);
                ServerFrame::Ack {
                    id: op.id,
                    seq: appended.seq,
                }
                .to_json()
            }
            Err(e) => {
                let (code, message) = match &e {
                    StoreError::Banned => ("banned", e.to_string()),
                    StoreError::Muted(_) => ("muted", e.to_string()),
                    StoreError::Forbidden => ("forbidden", e.to_string()),
                    StoreError::NotFound(_) => ("bad_request", e.to_string()),
                    StoreError::Db(_) => {
                        tracing::warn!("chat write gave up after the retry window: {e}");
                        (
                            "unavailable",
                            "the database did not answer in time (failover): resend the same id"
                                .to_owned(),
                        )
                    }
                    StoreError::NameTaken => ("bad_request", e.to_string()),
                };
                error_json(Some(&op.id), code, &message)
            }
        };
        if replies.send(reply).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_messages_parse() {
        let hello: ClientFrame =
            serde_json::from_str(r#"{"type":"hello","session":null,"since":12}"#).unwrap();
        assert!(matches!(
            hello,
            ClientFrame::Hello {
                session: None,
                since: Some(12)
            }
        ));
        let send: ClientFrame =
            serde_json::from_str(r#"{"type":"send","id":"a1","text":"<b>hi</b>"}"#).unwrap();
        assert!(matches!(send, ClientFrame::Send { ref text, .. } if text == "<b>hi</b>"));
        for bad in [
            r#"{"type":"drop"}"#,
            r#"{"type":"send","id":"a"}"#,
            "[]",
            "garbage",
        ] {
            assert!(serde_json::from_str::<ClientFrame>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn anonymous_replays_are_a_short_page() {
        assert_eq!(replay_from(Some(0), 10_000), 10_000 - ANONYMOUS_REPLAY);
        assert_eq!(replay_from(Some(9_990), 10_000), 9_990);
        assert_eq!(replay_from(Some(0), 30), 0);
        assert_eq!(replay_from(None, 10_000), 10_000 - HISTORY);
        assert_eq!(replay_from(None, 10), 0);
    }
}
