//! One simulated chat user: its connection loop (hello, welcome, sends, events, acks) and what
//! it does after an error: reconnect through the LB, away from the broadcast that failed it,
//! and resend every unacked message under the same id.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::book::ClientBook;
use super::bucket::TokenBucket;
use super::net::{Assignment, CLOSE_WAIT, Net, Ws, close_socket};
use super::{
    CONNECT_TIMEOUT, FAILED_MEMORY, IDLE_TIMEOUT, MAX_PENDING, RETRY_AFTER_S, TICK, WELCOME_TIMEOUT,
};
use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use streaming_core::chat_protocol::{ClientFrame, Event, ServerFrame};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

/// A seq as the book counts them (the protocol's are never negative).
fn seq_of(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// Figures a bench reads while the load runs.
#[derive(Debug, Default)]
pub struct Live {
    inner: Mutex<LiveInner>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LiveInner {
    acked: u64,
    last_ack_s: Option<f64>,
}

impl Live {
    pub(super) fn on_ack(&self, at_s: f64) {
        if let Ok(mut l) = self.inner.lock() {
            l.acked += 1;
            l.last_ack_s = Some(l.last_ack_s.map_or(at_s, |t| t.max(at_s)));
        }
    }
    /// Messages acked so far (first acks only).
    pub fn acked(&self) -> u64 {
        self.inner.lock().map(|l| l.acked).unwrap_or(0)
    }
    /// Time of the latest ack, seconds since the epoch.
    pub fn last_ack_s(&self) -> Option<f64> {
        self.inner.lock().ok().and_then(|l| l.last_ack_s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Setup,
    Sending,
    Draining,
    Done,
}

/// What the coordinator needs to end the drain.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// Per client: (pending, highest seq received).
    pub(super) clients: Vec<(usize, Option<u64>)>,
    pub(super) max_acked_seq: Option<u64>,
}

impl Progress {
    pub(super) fn delivered(&self) -> bool {
        self.clients.iter().all(|(pending, highest)| {
            *pending == 0 && (self.max_acked_seq.is_none() || *highest >= self.max_acked_seq)
        })
    }
}

pub(super) struct Client {
    pub(super) index: usize,
    pub(super) book: ClientBook,
    pub(super) password: String,
    pub(super) session: Option<String>,
    pub(super) assignment: Assignment,
    pub(super) failed: HashMap<String, Instant>,
    pub(super) net: Arc<Net>,
    pub(super) epoch: Instant,
    pub(super) phase: watch::Receiver<Phase>,
    pub(super) progress: Arc<Mutex<Progress>>,
    pub(super) live: Arc<Live>,
    pub(super) ready: Option<mpsc::UnboundedSender<usize>>,
    pub(super) bucket: TokenBucket,
    /// Seconds between two new messages of this client, and when the next one is due.
    pub(super) interval_s: f64,
    pub(super) next_send_s: Option<f64>,
    pub(super) offset_s: f64,
    pub(super) ack_timeout: Duration,
    /// Resends scheduled after `rate_limited`/`unavailable`: id -> due time.
    pub(super) retry_at: BTreeMap<String, f64>,
}

enum SessionEnd {
    Done,
}

impl Client {
    fn now_s(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn publish_progress(&self) {
        if let Ok(mut p) = self.progress.lock() {
            p.clients[self.index] = (self.book.pending_count(), self.book.highest());
        }
    }

    pub(super) async fn run(mut self) -> ClientBook {
        let mut backoff = Duration::from_millis(250);
        loop {
            if self.phase() == Phase::Done {
                break;
            }
            match self.session().await {
                Ok(SessionEnd::Done) => break,
                Err(e) => {
                    if self.phase() == Phase::Done {
                        break;
                    }
                    tracing::info!(
                        client = self.index,
                        broadcast = %self.assignment.broadcast,
                        "chat session ended: {e:#}"
                    );
                    if self.session.is_some() && self.ready.is_none() {
                        self.book.reconnects += 1;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    self.reassign().await;
                }
            }
        }
        self.publish_progress();
        self.book
    }

    /// A broadcast other than the ones that failed this client lately.
    async fn reassign(&mut self) {
        let now = Instant::now();
        self.failed
            .insert(self.assignment.broadcast.clone(), Instant::now());
        self.failed
            .retain(|_, at| now.duration_since(*at) < FAILED_MEMORY);
        let mut exclude: Vec<String> = self.failed.keys().cloned().collect();
        exclude.sort();
        match self.net.assign(&exclude).await {
            Ok(Some(a)) => self.assignment = a,
            Ok(None) => {
                // Nothing outside the exclusions: they may have recovered.
                self.failed.clear();
                if let Ok(Some(a)) = self.net.assign(&[]).await {
                    self.assignment = a;
                }
            }
            Err(e) => tracing::info!(client = self.index, "no assignment: {e:#}"),
        }
    }

    async fn send_frame(&mut self, ws: &mut Ws, frame: &ClientFrame) -> anyhow::Result<()> {
        let json = serde_json::to_string(frame).context("encoding a frame")?;
        tokio::time::timeout(CONNECT_TIMEOUT, ws.send(Message::text(json)))
            .await
            .context("send timeout")?
            .context("send")
    }

    /// One connection: hello, welcome, then sends and events until an error or the end.
    async fn session(&mut self) -> anyhow::Result<SessionEnd> {
        let mut ws = self.open().await?;
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(self.index);
        }
        // Everything unacked goes out again under the same id.
        let mut outbox: VecDeque<String> = self.book.pending().into();
        let mut resend: BTreeSet<String> = outbox.iter().cloned().collect();
        self.retry_at.clear();
        let mut last_frame = Instant::now();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = ws.next() => {
                    let frame = frame.context("closed")?.context("read")?;
                    last_frame = Instant::now();
                    match frame {
                        Message::Text(text) => self.on_frame(text.as_str(), &mut outbox)?,
                        Message::Close(close) => {
                            let _ = close_socket(&mut ws, CLOSE_WAIT).await;
                            bail!("closed by the server: {close:?}");
                        }
                        _ => {}
                    }
                    self.publish_progress();
                }
                _ = tick.tick() => {
                    if self.phase() == Phase::Done {
                        if close_socket(&mut ws, CLOSE_WAIT).await.is_none() {
                            tracing::info!(client = self.index, "no answer to our Close within {CLOSE_WAIT:?}");
                        }
                        return Ok(SessionEnd::Done);
                    }
                    self.on_tick(&mut ws, &mut outbox, &mut resend).await?;
                    if last_frame.elapsed() > IDLE_TIMEOUT {
                        bail!("nothing from the server for {} s", IDLE_TIMEOUT.as_secs());
                    }
                }
            }
        }
    }

    /// Registers (once), connects to the assigned broadcast, says hello and waits for the
    /// welcome (events may only follow it).
    async fn open(&mut self) -> anyhow::Result<Ws> {
        if self.session.is_none() {
            let name = self.book.user.clone();
            let session = self
                .net
                .register(&self.assignment.base, &name, &self.password)
                .await?;
            self.session = Some(session);
        }
        let mut ws = self.net.connect(&self.assignment.base).await?;
        let hello = ClientFrame::Hello {
            session: self.session.clone(),
            since: self.book.since().and_then(|s| i64::try_from(s).ok()),
        };
        self.send_frame(&mut ws, &hello).await?;
        let deadline = tokio::time::Instant::now() + WELCOME_TIMEOUT;
        loop {
            let frame = tokio::time::timeout_at(deadline, ws.next())
                .await
                .context("no welcome")?
                .context("closed before welcome")??;
            let Message::Text(text) = frame else { continue };
            match serde_json::from_str::<ServerFrame>(text.as_str()) {
                Ok(ServerFrame::Welcome {
                    broadcast,
                    user,
                    last_seq,
                    ..
                }) => {
                    if user.is_none() {
                        bail!("welcome without user: session not accepted");
                    }
                    self.book.on_welcome(last_seq.map(seq_of));
                    self.book.broadcasts.insert(broadcast);
                    return Ok(ws);
                }
                Ok(ServerFrame::Error { code, message, .. }) => {
                    self.book.note_error(&code);
                    bail!("error before welcome: {code} {message}");
                }
                _ => bail!("first frame is not a welcome: {}", text.as_str()),
            }
        }
    }

    /// Every tick: a new message when its slot comes, retries that are due, as much of the
    /// outbox as the rate allows; an error when a message sent on this socket got no ack.
    async fn on_tick(
        &mut self,
        ws: &mut Ws,
        outbox: &mut VecDeque<String>,
        resend: &mut BTreeSet<String>,
    ) -> anyhow::Result<()> {
        let now = self.now_s();
        if self.phase() == Phase::Sending {
            let next = *self.next_send_s.get_or_insert(now + self.offset_s);
            if now >= next {
                // A slot missed while too much is pending is skipped, not queued.
                self.next_send_s = Some(next + self.interval_s);
                if self.book.pending_count() + outbox.len().saturating_sub(resend.len())
                    < MAX_PENDING
                {
                    outbox.push_back(String::new());
                }
            }
        }
        let due: Vec<String> = self
            .retry_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.retry_at.remove(&id);
            if !outbox.contains(&id) {
                resend.insert(id.clone());
                outbox.push_back(id);
            }
        }
        self.send_outbox(ws, outbox, resend, now).await?;
        self.publish_progress();
        // Only messages actually out on this socket can time out (not ones waiting for a token
        // or a scheduled retry).
        let timed_out = self.book.messages.iter().any(|(n, m)| {
            m.ack.is_none() && now - m.last_sent_s > self.ack_timeout.as_secs_f64() && {
                let id = self.book.id_of(*n);
                !self.retry_at.contains_key(&id) && !outbox.contains(&id)
            }
        });
        if timed_out {
            bail!("no ack within {} s", self.ack_timeout.as_secs());
        }
        Ok(())
    }

    /// Sends from the front of the outbox while the token bucket allows: an empty entry is a
    /// new message, an id one to resend (unless it was acked meanwhile).
    async fn send_outbox(
        &mut self,
        ws: &mut Ws,
        outbox: &mut VecDeque<String>,
        resend: &mut BTreeSet<String>,
        now: f64,
    ) -> anyhow::Result<()> {
        while let Some(front) = outbox.front().cloned() {
            if !self.bucket.try_take(now) {
                break;
            }
            outbox.pop_front();
            let id = if front.is_empty() {
                self.book.new_message(now)
            } else {
                let n = self.book.n_of(&front);
                resend.remove(&front);
                if n.and_then(|n| self.book.messages.get(&n))
                    .is_none_or(|m| m.ack.is_some())
                {
                    continue;
                }
                self.book.resent(&front, now);
                front
            };
            let text = format!("chat load {id} at {now:.3} s");
            self.send_frame(ws, &ClientFrame::Send { id, text }).await?;
        }
        Ok(())
    }

    fn on_frame(&mut self, text: &str, outbox: &mut VecDeque<String>) -> anyhow::Result<()> {
        let now = self.now_s();
        let Ok(frame) = serde_json::from_str::<ServerFrame>(text) else {
            self.book.note_error("unparsed_frame");
            return Ok(());
        };
        match frame {
            ServerFrame::Event(Event::Message { seq, id, user, .. }) => {
                self.book.on_event(seq_of(seq), Some((user, id)));
            }
            ServerFrame::Event(event) => self.book.on_event(seq_of(event.seq()), None),
            ServerFrame::Ack { id, seq } => {
                let seq = seq_of(seq);
                if self.book.on_ack(&id, seq, now) {
                    self.live.on_ack(now);
                    if let Ok(mut p) = self.progress.lock() {
                        p.max_acked_seq = Some(p.max_acked_seq.map_or(seq, |m| m.max(seq)));
                    }
                }
                self.retry_at.remove(&id);
            }
            ServerFrame::Error { id, code, message } => {
                self.book.note_error(&code);
                match (id, code.as_str()) {
                    (Some(id), "rate_limited" | "unavailable") => {
                        self.retry_at.insert(id, now + RETRY_AFTER_S);
                    }
                    (Some(id), _) => {
                        tracing::warn!(client = self.index, %id, %code, "message refused: {message}");
                        // Refused for good: forget it so it is not resent forever.
                        if let Some(n) = self.book.n_of(&id)
                            && self.book.messages.get(&n).is_some_and(|m| m.ack.is_none())
                        {
                            self.book.messages.remove(&n);
                            outbox.retain(|o| *o != id);
                        }
                    }
                    (None, "login_required" | "bad_session") => {
                        bail!("server says {code}: {message}")
                    }
                    (None, _) => {}
                }
            }
            ServerFrame::Welcome { .. } | ServerFrame::Pong => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_delivered_when_nothing_is_pending_and_everyone_is_caught_up() {
        let mut p = Progress {
            clients: vec![(0, Some(10)), (0, Some(9))],
            max_acked_seq: Some(10),
        };
        assert!(!p.delivered());
        p.clients[1] = (1, Some(10));
        assert!(!p.delivered());
        p.clients[1] = (0, Some(10));
        assert!(p.delivered());
    }
}
