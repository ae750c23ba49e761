//! What every client saw, and what it means: the per-client book of sends, acks and events
//! (pure: times are seconds since an epoch passed in, so it is unit-tested without sockets), and
//! the analysis over all books (`analyse`): delivered to everyone once and in order, lost or
//! duplicated writes, write outages.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::OUTAGE_THRESHOLD_S;
use serde::{Deserialize, Serialize};

/// A write outage: something was pending and no ack came for more than
/// [`OUTAGE_THRESHOLD_S`]; from the first send left unacked after the last ack to the next ack.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outage {
    pub start_s: f64,
    pub duration_s: f64,
}

/// The JSON report of `streamctl chat` (its keys are read by the tests and benches).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatReport {
    pub clients: usize,
    /// Broadcasts the clients were on (at start and after reconnects).
    pub broadcasts: Vec<String>,
    /// Broadcasts the clients were spread over at the start.
    pub initial_broadcasts: Vec<String>,
    pub channel: String,
    pub seconds: f64,
    pub sent: u64,
    pub acked: u64,
    pub unacked: u64,
    /// Sum over clients of acked messages (anyone's) the client never received.
    pub missing: u64,
    /// Events a client received twice, plus (user, id) pairs seen with more than one seq.
    pub duplicates: u64,
    /// Events that arrived after an event with a higher seq.
    pub out_of_order: u64,
    /// Seqs acked or delivered for two different messages (a rewound primary reused them).
    pub seq_conflicts: u64,
    /// Seqs never received between a client's first and last event.
    pub gaps: u64,
    pub reconnects: u64,
    /// Frames sent again (resends after reconnects and after `rate_limited`/`unavailable`).
    pub resends: u64,
    pub max_ack_wait_s: f64,
    pub write_outages: Vec<Outage>,
    /// Error frames by code.
    pub errors: BTreeMap<String, u64>,
    /// Time (since the epoch) the sending began and ended.
    pub sending_from_s: f64,
    pub sending_until_s: f64,
    /// Every client had every acked message when the drain ended.
    pub delivered: bool,
}

impl ChatReport {
    /// Nothing lost, doubled or reordered, and everything sent was acked.
    pub fn clean(&self) -> bool {
        self.missing == 0
            && self.duplicates == 0
            && self.seq_conflicts == 0
            && self.out_of_order == 0
            && self.gaps == 0
            && self.unacked == 0
    }
}

/// One acked message: who, which id, which seq, when acked.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AckedMessage {
    pub user: String,
    pub id: String,
    pub seq: u64,
    pub acked_s: f64,
}

/// One message a client made.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub first_sent_s: f64,
    pub last_sent_s: f64,
    pub sends: u32,
    /// First ack: (seq, time).
    pub ack: Option<(u64, f64)>,
    /// Seqs of later acks that disagreed with the first one (must stay empty).
    pub conflicting_acks: Vec<u64>,
}

/// What one client sent, got acked and received.
#[derive(Debug, Clone, Default)]
pub struct ClientBook {
    pub user: String,
    next: u64,
    /// By message number n (id = `<user>-<n>`).
    pub messages: BTreeMap<u64, Sent>,
    /// Events by seq: `Some((user, id))` for messages, `None` for moderation events.
    pub received: BTreeMap<u64, Option<(String, String)>>,
    /// The server's last seq at the first welcome: where this client's history starts.
    pub floor: Option<u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub reconnects: u64,
    pub resends: u64,
    pub errors: BTreeMap<String, u64>,
    pub broadcasts: BTreeSet<String>,
}

impl ClientBook {
    pub fn new(user: &str) -> Self {
        Self {
            user: user.to_owned(),
            next: 1,
            ..Default::default()
        }
    }

    pub fn id_of(&self, n: u64) -> String {
        format!("{}-{n}", self.user)
    }

    pub(super) fn n_of(&self, id: &str) -> Option<u64> {
        id.strip_prefix(self.user.as_str())?
            .strip_prefix('-')?
            .parse()
            .ok()
    }

    /// Makes a new message, sent now; returns its id.
    pub fn new_message(&mut self, now_s: f64) -> String {
        let n = self.next;
        self.next += 1;
        self.messages.insert(
            n,
            Sent {
                first_sent_s: now_s,
                last_sent_s: now_s,
                sends: 1,
                ack: None,
                conflicting_acks: Vec::new(),
            },
        );
        self.id_of(n)
    }

    /// The message `id` goes out again (same id).
    pub fn resent(&mut self, id: &str, now_s: f64) {
        if let Some(m) = self.n_of(id).and_then(|n| self.messages.get_mut(&n)) {
            m.last_sent_s = now_s;
            m.sends += 1;
            self.resends += 1;
        }
    }

    /// An ack; true if it is the first for this id.
    pub fn on_ack(&mut self, id: &str, seq: u64, now_s: f64) -> bool {
        let Some(m) = self.n_of(id).and_then(|n| self.messages.get_mut(&n)) else {
            return false;
        };
        match m.ack {
            None => {
                m.ack = Some((seq, now_s));
                true
            }
            Some((first, _)) => {
                if first != seq && !m.conflicting_acks.contains(&seq) {
                    m.conflicting_acks.push(seq);
                }
                false
            }
        }
    }

    /// Ids sent and not yet acked, oldest first.
    pub fn pending(&self) -> Vec<String> {
        self.messages
            .iter()
            .filter(|(_, m)| m.ack.is_none())
            .map(|(n, _)| self.id_of(*n))
            .collect()
    }

    pub fn pending_count(&self) -> usize {
        self.messages.values().filter(|m| m.ack.is_none()).count()
    }

    /// Oldest time a still-pending message was last sent.
    pub fn oldest_pending_send_s(&self) -> Option<f64> {
        self.messages
            .values()
            .filter(|m| m.ack.is_none())
            .map(|m| m.last_sent_s)
            .reduce(f64::min)
    }

    pub fn on_welcome(&mut self, last_seq: Option<u64>) {
        if self.floor.is_none() {
            self.floor = Some(last_seq.unwrap_or(0));
        }
    }

    pub fn highest(&self) -> Option<u64> {
        self.received.keys().next_back().copied()
    }

    /// `since` of the next hello: the highest seq seen (or the server's last seq at the first
    /// welcome); `None` before any welcome.
    pub fn since(&self) -> Option<u64> {
        match (self.highest(), self.floor) {
            (Some(h), Some(f)) => Some(h.max(f)),
            (h, f) => h.or(f),
        }
    }

    /// An event with a seq (message or moderation).
    pub fn on_event(&mut self, seq: u64, message: Option<(String, String)>) {
        if self.received.contains_key(&seq) {
            self.duplicates += 1;
            return;
        }
        if self.highest().is_some_and(|h| seq < h) {
            self.out_of_order += 1;
        }
        self.received.insert(seq, message);
    }

    /// Seqs never received between the first and the last event this client got.
    pub fn gaps(&self) -> u64 {
        let (Some(first), Some(last)) = (
            self.received.keys().next().copied(),
            self.received.keys().next_back().copied(),
        ) else {
            return 0;
        };
        (last - first + 1).saturating_sub(self.received.len() as u64)
    }

    pub fn note_error(&mut self, code: &str) {
        *self.errors.entry(code.to_owned()).or_default() += 1;
    }
}

/// Write outages from (first send, first ack) of every message of every client.
///
/// Sweep over time: an ack closes the current interval (an outage if it lasted more than
/// [`OUTAGE_THRESHOLD_S`]) and opens the next one at once if something is still pending; a send
/// with nothing pending opens one. A message never acked keeps the last interval open until
/// `end_s`.
pub fn write_outages(messages: &[(f64, Option<f64>)], end_s: f64) -> Vec<Outage> {
    // At equal times, sends before acks (a message acked at once was pending for an instant).
    let mut events: Vec<(f64, bool)> = Vec::with_capacity(messages.len() * 2);
    for (sent, acked) in messages {
        events.push((*sent, false));
        if let Some(a) = acked {
            events.push((*a, true));
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut outages = Vec::new();
    let mut pending: i64 = 0;
    let mut open: Option<f64> = None;
    for (t, is_ack) in events {
        if is_ack {
            if let Some(start) = open
                && t - start > OUTAGE_THRESHOLD_S
            {
                outages.push(Outage {
                    start_s: start,
                    duration_s: t - start,
                });
            }
            pending -= 1;
            open = (pending > 0).then_some(t);
        } else {
            pending += 1;
            open.get_or_insert(t);
        }
    }
    if let Some(start) = open
        && pending > 0
        && end_s - start > OUTAGE_THRESHOLD_S
    {
        outages.push(Outage {
            start_s: start,
            duration_s: end_s - start,
        });
    }
    outages
}

/// Every acked message of every book, first ack only.
pub fn acked_messages(books: &[ClientBook]) -> Vec<AckedMessage> {
    let mut out = Vec::new();
    for book in books {
        for (n, m) in &book.messages {
            if let Some((seq, at)) = m.ack {
                out.push(AckedMessage {
                    user: book.user.clone(),
                    id: book.id_of(*n),
                    seq,
                    acked_s: at,
                });
            }
        }
    }
    out.sort_by_key(|m| m.seq);
    out
}

/// The report's figures from every client's book.
pub fn analyse(books: &[ClientBook], end_s: f64) -> ChatReport {
    let mut report = ChatReport {
        clients: books.len(),
        ..Default::default()
    };
    let acked = acked_messages(books);
    let mut timeline = Vec::new();
    for book in books {
        for m in book.messages.values() {
            report.sent += 1;
            timeline.push((m.first_sent_s, m.ack.map(|a| a.1)));
            if let Some((_, at)) = m.ack {
                report.acked += 1;
                report.max_ack_wait_s = report.max_ack_wait_s.max(at - m.first_sent_s);
            }
            // One message acked with two seqs: stored twice.
            report.duplicates += m.conflicting_acks.len() as u64;
        }
        report.duplicates += book.duplicates;
        report.out_of_order += book.out_of_order;
        report.gaps += book.gaps();
        report.reconnects += book.reconnects;
        report.resends += book.resends;
        for (code, n) in &book.errors {
            *report.errors.entry(code.clone()).or_default() += n;
        }
        report.broadcasts.extend(book.broadcasts.iter().cloned());
    }
    report.broadcasts.sort();
    report.broadcasts.dedup();
    report.unacked = report.sent - report.acked;
    // A (user, id) delivered under two seqs (to anyone) was stored twice.
    let mut seqs_of: HashMap<(&str, &str), BTreeSet<u64>> = HashMap::new();
    for book in books {
        for (seq, m) in &book.received {
            if let Some((user, id)) = m {
                seqs_of
                    .entry((user.as_str(), id.as_str()))
                    .or_default()
                    .insert(*seq);
            }
        }
    }
    for m in &acked {
        seqs_of
            .entry((m.user.as_str(), m.id.as_str()))
            .or_default()
            .insert(m.seq);
    }
    report.duplicates += seqs_of
        .values()
        .map(|s| s.len().saturating_sub(1) as u64)
        .sum::<u64>();
    // One seq for two messages: the log was rewound and its numbers handed out again.
    let mut messages_of: HashMap<u64, BTreeSet<(&str, &str)>> = HashMap::new();
    for ((user, id), seqs) in &seqs_of {
        for seq in seqs {
            messages_of.entry(*seq).or_default().insert((user, id));
        }
    }
    report.seq_conflicts = messages_of
        .values()
        .map(|m| m.len().saturating_sub(1) as u64)
        .sum();
    // Every client must have every acked message, under its acked seq.
    for book in books {
        for m in &acked {
            let got = book.received.get(&m.seq).and_then(|e| e.as_ref());
            if got.is_none_or(|(user, id)| *user != m.user || *id != m.id) {
                report.missing += 1;
            }
        }
    }
    report.write_outages = write_outages(&timeline, end_s);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(user: &str, n: u64) -> Option<(String, String)> {
        Some((user.to_owned(), format!("{user}-{n}")))
    }

    #[test]
    fn events_in_order_are_clean() {
        let mut b = ClientBook::new("a");
        b.on_welcome(Some(10));
        for seq in 11..=15 {
            b.on_event(seq, msg("x", seq));
        }
        assert_eq!((b.duplicates, b.out_of_order, b.gaps()), (0, 0, 0));
        assert_eq!(b.since(), Some(15));
    }

    #[test]
    fn a_repeated_seq_is_a_duplicate_and_a_late_one_is_out_of_order() {
        let mut b = ClientBook::new("a");
        b.on_event(1, msg("x", 1));
        b.on_event(3, msg("x", 3));
        assert_eq!(b.gaps(), 1);
        b.on_event(3, msg("x", 3));
        assert_eq!(b.duplicates, 1);
        b.on_event(2, msg("x", 2));
        assert_eq!((b.out_of_order, b.gaps()), (1, 0));
    }

    #[test]
    fn since_is_the_floor_until_an_event_arrives() {
        let mut b = ClientBook::new("a");
        assert_eq!(b.since(), None);
        b.on_welcome(Some(42));
        b.on_welcome(Some(50)); // a later welcome does not move the floor
        assert_eq!(b.since(), Some(42));
        b.on_event(43, None);
        assert_eq!(b.since(), Some(43));
    }

    #[test]
    fn acks_and_pending() {
        let mut b = ClientBook::new("u1");
        let first = b.new_message(0.0);
        let second = b.new_message(0.5);
        assert_eq!(first, "u1-1");
        assert_eq!(b.pending(), vec!["u1-1".to_owned(), "u1-2".to_owned()]);
        assert!(b.on_ack(&first, 7, 0.2));
        assert!(!b.on_ack(&first, 7, 0.3), "a repeated ack is not a new one");
        assert_eq!(b.pending(), vec![second.clone()]);
        b.resent(&second, 2.0);
        assert_eq!(b.oldest_pending_send_s(), Some(2.0));
        assert!(!b.on_ack("other-1", 9, 1.0), "someone else's id is ignored");
        assert!(!b.on_ack("u1-x", 9, 1.0));
        assert!(b.on_ack(&second, 8, 3.0));
        assert_eq!(b.pending_count(), 0);
        assert_eq!(b.resends, 1);
    }

    #[test]
    fn an_id_acked_with_two_seqs_is_a_duplicate() {
        let mut b = ClientBook::new("u");
        let id = b.new_message(0.0);
        b.on_ack(&id, 5, 0.1);
        b.on_ack(&id, 6, 2.0);
        b.on_event(5, msg("u", 1));
        b.on_event(6, msg("u", 1));
        let report = analyse(&[b], 3.0);
        // The second ack seq, and the (user, id) stored under two seqs.
        assert_eq!(report.duplicates, 2);
        assert_eq!(report.missing, 0);
    }

    #[test]
    fn missing_counts_per_client_and_checks_the_acked_seq() {
        let mut a = ClientBook::new("a");
        let mut b = ClientBook::new("b");
        let ia = a.new_message(0.0);
        let ib = b.new_message(0.1);
        a.on_ack(&ia, 1, 0.2);
        b.on_ack(&ib, 2, 0.3);
        a.on_event(1, msg("a", 1));
        a.on_event(2, msg("b", 1));
        b.on_event(2, msg("b", 1)); // b never got a's message
        let report = analyse(&[a.clone(), b.clone()], 1.0);
        assert_eq!((report.sent, report.acked, report.unacked), (2, 2, 0));
        assert_eq!(report.missing, 1);
        // A different message under the acked seq is no delivery either.
        let mut c = ClientBook::new("c");
        c.on_event(1, msg("z", 9));
        c.on_event(2, msg("b", 1));
        let report = analyse(&[a, b, c], 1.0);
        assert_eq!(report.missing, 2);
        assert_eq!(report.duplicates, 0);
    }

    #[test]
    fn a_seq_handed_out_twice_is_a_conflict() {
        // a's message was acked as seq 5 by a primary that was then rewound; b's got 5 again.
        let mut a = ClientBook::new("a");
        let mut b = ClientBook::new("b");
        let ia = a.new_message(0.0);
        a.on_ack(&ia, 5, 0.1);
        let ib = b.new_message(1.0);
        b.on_ack(&ib, 5, 1.1);
        a.on_event(5, msg("a", 1));
        b.on_event(5, msg("a", 1));
        let report = analyse(&[a, b], 2.0);
        assert_eq!(report.seq_conflicts, 1);
        // Neither client got b's message under seq 5.
        assert_eq!(report.missing, 2);
        assert!(!report.clean());
    }

    #[test]
    fn steady_acks_are_no_outage() {
        let messages: Vec<(f64, Option<f64>)> = (0..100)
            .map(|i| {
                let t = i as f64 * 0.05;
                (t, Some(t + 0.02))
            })
            .collect();
        assert!(write_outages(&messages, 10.0).is_empty());
    }

    #[test]
    fn an_outage_runs_from_the_first_unacked_send_to_the_next_ack() {
        // Acks every 0.1 s until 1.0; a send at 1.05 waits until 11.3; sends in between too.
        let mut messages: Vec<(f64, Option<f64>)> = (0..10)
            .map(|i| (i as f64 * 0.1, Some(i as f64 * 0.1 + 0.01)))
            .collect();
        messages.push((1.05, Some(11.3)));
        messages.push((3.0, Some(11.31)));
        messages.push((6.0, Some(11.32)));
        messages.push((11.4, Some(11.45)));
        let outages = write_outages(&messages, 20.0);
        assert_eq!(outages.len(), 1, "{outages:?}");
        assert!((outages[0].start_s - 1.05).abs() < 1e-9);
        assert!((outages[0].duration_s - 10.25).abs() < 1e-9);
    }

    #[test]
    fn a_message_pending_at_an_ack_starts_the_outage_at_that_ack() {
        // m1 sent at 0 is still pending when m0's ack arrives at 0.5; next ack at 3.0.
        let messages = vec![(0.0, Some(3.0)), (0.1, Some(0.5))];
        let outages = write_outages(&messages, 5.0);
        assert_eq!(
            outages,
            vec![Outage {
                start_s: 0.5,
                duration_s: 2.5
            }]
        );
    }

    #[test]
    fn idle_time_without_pending_sends_is_no_outage_and_open_ends_count() {
        let messages = vec![(0.0, Some(0.1)), (5.0, Some(5.1)), (6.0, None)];
        let outages = write_outages(&messages, 9.0);
        assert_eq!(
            outages,
            vec![Outage {
                start_s: 6.0,
                duration_s: 3.0
            }]
        );
        // Exactly the threshold is not an outage.
        assert!(write_outages(&[(0.0, Some(1.0))], 2.0).is_empty());
    }
}
