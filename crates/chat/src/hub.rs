//! Fan-out of committed chat events to this broadcast's WebSocket clients.
//!
//! One task per broadcast LISTENs on the primary. A notification (or a one-second tick, in case
//! one was lost in a failover) makes it read every event after the last one it saw, in `seq`
//! order, and pass them on. After any reconnect, and after the primary changed, it simply reads
//! from its last seq again: nothing is missed and nothing doubled. A ring of recent events lets a
//! client that reconnects (even to another broadcast, even while the database fails over) catch up
//! from memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio::sync::{broadcast, watch};

use crate::db::{Database, DbError, STATEMENT_TIMEOUT};
use crate::store::{self, Event, NOTIFY_CHANNEL};

/// Events kept in memory per channel for reconnecting clients.
const RING: usize = 2000;
/// Events read per query while catching up.
const BATCH: i64 = 500;
/// Live events buffered per client before it is considered too slow and resynchronised.
const LIVE_BUFFER: usize = 1024;
const POLL_EVERY: Duration = Duration::from_secs(1);

struct ChannelHub {
    live: broadcast::Sender<Arc<Event>>,
    state: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    /// Highest seq read from the database; `None` until the first successful read.
    last: Option<i64>,
    events: VecDeque<Arc<Event>>,
}

/// What a client needs to start following a channel.
pub struct Follow {
    pub live: broadcast::Receiver<Arc<Event>>,
    /// Events after the asked seq that the ring holds, oldest first.
    pub backlog: Vec<Arc<Event>>,
    /// The hub's last seq, if it has read the database at least once.
    pub last: Option<i64>,
    /// The ring does not reach back to the asked seq: read the rest from the database.
    pub incomplete: bool,
}

pub struct Hub {
    channels: HashMap<String, ChannelHub>,
    /// Flips to true once every channel has been read from the database.
    ready: watch::Sender<bool>,
}

impl Hub {
    pub fn new(channels: &[String]) -> Arc<Self> {
        let channels = channels
            .iter()
            .map(|name| {
                (
                    name.clone(),
                    ChannelHub {
                        live: broadcast::channel(LIVE_BUFFER).0,
                        state: Mutex::new(Ring::default()),
                    },
                )
            })
            .collect();
        Arc::new(Hub {
            channels,
            ready: watch::channel(false).0,
        })
    }

    pub fn has_channel(&self, channel: &str) -> bool {
        self.channels.contains_key(channel)
    }

    /// Subscribes first, then copies the ring, so no event falls between the two (duplicates
    /// are dropped by the caller's seq check).
    pub fn follow(&self, channel: &str, after: i64) -> Option<Follow> {
        let hub = self.channels.get(channel)?;
        let live = hub.live.subscribe();
        let ring = hub.state.lock().ok()?;
        let backlog: Vec<_> = ring
            .events
            .iter()
            .filter(|e| e.seq() > after)
            .cloned()
            .collect();
        let oldest = ring.events.front().map(|e| e.seq());
        let incomplete = match (ring.last, oldest) {
            (None, _) => true,
            (Some(last), _) if after >= last => false,
            (Some(_), Some(oldest)) => oldest > after + 1,
            (Some(_), None) => true,
        };
        Some(Follow {
            live,
            backlog,
            last: ring.last,
            incomplete,
        })
    }

    pub fn last_seq(&self, channel: &str) -> Option<i64> {
        self.channels.get(channel)?.state.lock().ok()?.last
    }

    /// Resolves once the hub has read every channel from the database at least once.
    pub async fn ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Appends events read from the database (in seq order) and hands them to live followers.
    fn publish(&self, channel: &str, events: Vec<Event>) {
        let Some(hub) = self.channels.get(channel) else {
            return;
        };
        let Ok(mut ring) = hub.state.lock() else {
            return;
        };
        for event in events {
            if ring.last.is_some_and(|last| event.seq() <= last) {
                continue;
            }
            ring.last = Some(event.seq());
            let event = Arc::new(event);
            ring.events.push_back(event.clone());
            if ring.events.len() > RING {
                ring.events.pop_front();
            }
            metrics::counter!("chat_events_fanned_out_total").increment(1);
            // No receiver is not an error: nobody is connected.
            let _ = hub.live.send(event);
        }
    }

    /// Where to read from next; the first read of a channel starts a little before its end so
    /// the ring has history for new clients.
    async fn cursor(&self, db: &Database, channel: &str) -> Result<i64, store::StoreError> {
        let known = self
            .channels
            .get(channel)
            .and_then(|h| h.state.lock().ok().and_then(|r| r.last));
        match known {
            Some(last) => Ok(last),
            None => {
                let last = store::last_seq(&db.pool()?, channel).await?;
                Ok((last - 200).max(0))
            }
        }
    }

    async fn catch_up(&self, db: &Database, channel: &str) -> Result<(), store::StoreError> {
        loop {
            let after = self.cursor(db, channel).await?;
            let events = store::events_after(&db.pool()?, channel, after, BATCH).await?;
            let n = events.len();
            if n == 0 {
                // An empty channel still counts as read.
                if let Some(hub) = self.channels.get(channel)
                    && let Ok(mut ring) = hub.state.lock()
                {
                    ring.last.get_or_insert(after);
                }
                return Ok(());
            }
            self.publish(channel, events);
            if (n as i64) < BATCH {
                return Ok(());
            }
        }
    }

    async fn catch_up_all(&self, db: &Database) -> Result<(), store::StoreError> {
        for channel in self.channels.keys() {
            self.catch_up(db, channel).await?;
        }
        self.ready.send_replace(true);
        Ok(())
    }

    /// Follows the primary until `shutdown`: LISTEN, catch up, then read on every notification.
    pub async fn run(self: Arc<Self>, db: Database, prepared: watch::Receiver<u64>) {
        let mut generations = db.generations();
        let mut prepared = prepared;
        loop {
            // Wait until the current primary has the schema (the chat service prepares it).
            let generation = *generations.borrow_and_update();
            if *prepared.borrow_and_update() != generation || db.pool().is_err() {
                tokio::select! {
                    _ = generations.changed() => {}
                    _ = prepared.changed() => {}
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            if let Err(e) = self.follow_primary(&db, &mut generations).await {
                tracing::warn!("chat fan-out lost the database, reconnecting: {e}");
                db.suspect();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    async fn follow_primary(
        &self,
        db: &Database,
        generations: &mut watch::Receiver<u64>,
    ) -> Result<(), store::StoreError> {
        let mut listener = bounded(async {
            let mut listener = PgListener::connect_with(&db.pool()?)
                .await
                .map_err(DbError::from)?;
            listener
                .listen(NOTIFY_CHANNEL)
                .await
                .map_err(DbError::from)?;
            Ok(listener)
        })
        .await?;
        bounded(self.catch_up_all(db)).await?;
        let mut tick = tokio::time::interval(POLL_EVERY);
        loop {
            tokio::select! {
                n = listener.try_recv() => match n.map_err(DbError::from)? {
                    Some(n) => {
                        let channel = n.payload().to_owned();
                        if self.has_channel(&channel) {
                            bounded(self.catch_up(db, &channel)).await?;
                        }
                    }
                    // The connection dropped; `try_recv` would reconnect to the same host, but
                    // the primary may have moved: start over.
                    None => return Ok(()),
                },
                _ = tick.tick() => bounded(self.catch_up_all(db)).await?,
                _ = generations.changed() => return Ok(()),
            }
        }
    }
}

/// A hung primary must not hang the fan-out: every database step has a deadline, after which
/// the hub starts over on whichever host leads then.
async fn bounded<T>(
    step: impl Future<Output = Result<T, store::StoreError>>,
) -> Result<T, store::StoreError> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, step).await {
        Ok(result) => result,
        Err(_) => Err(DbError::Timeout(STATEMENT_TIMEOUT).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UserRole;

    fn msg(seq: i64) -> Event {
        Event::Message {
            seq,
            id: format!("c{seq}"),
            user: "u".into(),
            role: UserRole::Viewer,
            text: "t".into(),
            at: String::new(),
        }
    }

    #[test]
    fn follow_replays_from_the_ring_and_skips_what_was_seen() {
        let hub = Hub::new(&["test".into()]);
        assert!(
            hub.follow("test", 0).unwrap().incomplete,
            "never read: unknown"
        );
        hub.publish("test", (1..=5).map(msg).collect());
        let f = hub.follow("test", 2).unwrap();
        assert_eq!(
            f.backlog.iter().map(|e| e.seq()).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert!(!f.incomplete);
        assert_eq!(f.last, Some(5));
        // Already-published seqs are not published twice.
        hub.publish("test", vec![msg(4), msg(5), msg(6)]);
        let f = hub.follow("test", 0).unwrap();
        assert_eq!(f.backlog.len(), 6);
        assert!(hub.follow("nope", 0).is_none());
    }

    #[test]
    fn a_ring_that_starts_later_than_asked_is_incomplete() {
        let hub = Hub::new(&["test".into()]);
        hub.publish("test", (100..=110).map(msg).collect());
        assert!(hub.follow("test", 50).unwrap().incomplete);
        assert!(!hub.follow("test", 99).unwrap().incomplete);
        assert!(!hub.follow("test", 110).unwrap().incomplete);
    }

    #[tokio::test]
    async fn live_followers_get_new_events_in_order() {
        let hub = Hub::new(&["test".into()]);
        hub.publish("test", vec![msg(1)]);
        let mut f = hub.follow("test", 1).unwrap();
        assert!(f.backlog.is_empty());
        hub.publish("test", vec![msg(2), msg(3)]);
        assert_eq!(f.live.recv().await.unwrap().seq(), 2);
        assert_eq!(f.live.recv().await.unwrap().seq(), 3);
    }
}
