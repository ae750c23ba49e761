//! The database as the benches check it: who is primary (and whether two ever are at once),
//! and whether every acked chat message is stored once under its seq.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sqlx::Connection as _;
use streaming_clients::chat::AckedMessage;
use streaming_core::config::HostEntry;
use streaming_core::patroni::{Check, Patroni};
use streaming_runner::cluster::Layout;
use tokio::sync::watch;

/// The database side of the check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DbCheck {
    /// The db host read (the primary after the run).
    pub host: String,
    /// Acked messages looked up.
    pub checked: u64,
    /// Message rows of this run's accounts.
    pub rows: u64,
    /// Acked and not stored.
    pub lost: u64,
    /// Acked and stored under another seq than the ack said.
    pub wrong_seq: u64,
    /// Acked and stored more than once.
    pub duplicates: u64,
    /// Seqs used twice in the channel (any account).
    pub seq_duplicates: u64,
    /// Stored but never acked (the ack was lost with a socket; allowed, and delivered anyway).
    pub stored_unacked: u64,
}

/// Patroni's `check` endpoint of `host` answered 200.
pub async fn patroni_says(http: &Patroni, host: &HostEntry, check: Check) -> bool {
    matches!(http.check(host, check).await, Ok(true))
}

/// The db host among `dbs` that is primary now (Patroni's `/primary`).
pub async fn find_primary(http: &Patroni, dbs: &[HostEntry]) -> Option<String> {
    http.primary(dbs).await.map(|h| h.name.clone())
}

/// Per acked message: how many rows hold its (user, id), and whether one has its seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Once,
    Missing,
    WrongSeq,
    Twice,
}

/// Compares the acks with the rows `(user, client_id, seq)` read from the database.
pub fn compare(acked: &[AckedMessage], rows: &[(String, String, i64)]) -> Vec<Stored> {
    let mut by_id: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
    for (user, id, seq) in rows {
        by_id.entry((user, id)).or_default().push(*seq);
    }
    acked
        .iter()
        .map(|m| match by_id.get(&(m.user.as_str(), m.id.as_str())) {
            None => Stored::Missing,
            Some(seqs) if seqs.len() > 1 => Stored::Twice,
            Some(seqs) if seqs[0] == m.seq as i64 => Stored::Once,
            Some(_) => Stored::WrongSeq,
        })
        .collect()
}

/// Reads this run's messages from the primary as the services' role and checks every ack.
pub async fn check_db(
    layout: &Layout,
    dbs: &[HostEntry],
    primary: &str,
    channel: &str,
    user_prefix: &str,
    acked: &[AckedMessage],
) -> anyhow::Result<(DbCheck, Vec<Stored>)> {
    let config = layout.load_configs()?;
    let any = config.first().context("no host config")?;
    let database = &any.cluster.database;
    let password = streaming_core::secrets::read_secret(&any.paths.db_password)
        .with_context(|| format!("db password {}", any.paths.db_password.display()))?;
    let host = dbs
        .iter()
        .find(|h| h.name == primary)
        .with_context(|| format!("{primary} is not a db host"))?;
    let options = sqlx::postgres::PgConnectOptions::new()
        .host(&host.address.to_string())
        .port(host.ports.postgres)
        .username(&database.user)
        .password(&password)
        .database(&database.name)
        .ssl_mode(sqlx::postgres::PgSslMode::VerifyFull)
        .ssl_root_cert(&any.paths.ca_cert)
        .application_name("streamctl-chat-failover");
    let mut conn = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::postgres::PgConnection::connect_with(&options),
    )
    .await
    .context("connecting to PostgreSQL: timeout")?
    .with_context(|| format!("connecting to PostgreSQL on {primary} as {}", database.user))?;
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT u.name, e.client_id, e.seq FROM chat_events e JOIN users u ON u.id = e.user_id \
         WHERE e.channel = $1 AND e.kind = 'message' AND starts_with(u.name, $2)",
    )
    .bind(channel)
    .bind(user_prefix)
    .fetch_all(&mut conn)
    .await
    .context("reading chat_events")?;
    let (seq_duplicates,): (i64,) =
        sqlx::query_as("SELECT count(*) - count(DISTINCT seq) FROM chat_events WHERE channel = $1")
            .bind(channel)
            .fetch_one(&mut conn)
            .await
            .context("counting seqs")?;
    let _ = conn.close().await;
    let stored = compare(acked, &rows);
    let count = |s: Stored| stored.iter().filter(|x| **x == s).count() as u64;
    let matched = count(Stored::Once) + count(Stored::WrongSeq) + count(Stored::Twice);
    let check = DbCheck {
        host: primary.to_owned(),
        checked: acked.len() as u64,
        rows: rows.len() as u64,
        lost: count(Stored::Missing),
        wrong_seq: count(Stored::WrongSeq),
        duplicates: count(Stored::Twice),
        seq_duplicates: seq_duplicates.max(0) as u64,
        stored_unacked: (rows.len() as u64).saturating_sub(matched),
    };
    Ok((check, stored))
}

/// The most db hosts that answered `/primary` with 200 in one poll, until `stop` turns true.
pub async fn most_primaries(
    http: Patroni,
    dbs: Vec<HostEntry>,
    mut stop: watch::Receiver<bool>,
) -> usize {
    let mut most = 0;
    while !*stop.borrow() {
        let polls = dbs.iter().map(|h| patroni_says(&http, h, Check::Primary));
        let now = futures::future::join_all(polls)
            .await
            .into_iter()
            .filter(|p| *p)
            .count();
        most = most.max(now);
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    most
}

pub async fn wait_for_primary(
    http: &Patroni,
    dbs: &[HostEntry],
    limit: Duration,
) -> Option<String> {
    let start = Instant::now();
    loop {
        if let Some(p) = find_primary(http, dbs).await {
            return Some(p);
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(user: &str, id: &str, seq: u64) -> AckedMessage {
        AckedMessage {
            user: user.into(),
            id: id.into(),
            seq,
            acked_s: 0.0,
        }
    }

    #[test]
    fn compare_finds_missing_wrong_seq_and_doubles() {
        let acks = vec![
            acked("a", "a-1", 1),
            acked("a", "a-2", 2),
            acked("b", "b-1", 3),
            acked("b", "b-2", 4),
        ];
        let rows = vec![
            ("a".to_owned(), "a-1".to_owned(), 1),
            ("b".to_owned(), "b-1".to_owned(), 5),
            ("b".to_owned(), "b-2".to_owned(), 4),
            ("b".to_owned(), "b-2".to_owned(), 6),
            ("c".to_owned(), "c-1".to_owned(), 7),
        ];
        assert_eq!(
            compare(&acks, &rows),
            vec![
                Stored::Once,
                Stored::Missing,
                Stored::WrongSeq,
                Stored::Twice
            ]
        );
    }
}
