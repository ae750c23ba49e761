//! Login throttling shared by every broadcast, kept in PostgreSQL (`login_throttle`).
//!
//! The rule. Every login attempt is counted under three keys: the (name, address) pair, the
//! name alone and the address alone (an IPv4 address, or the /64 of an IPv6 one, since one
//! machine there holds a whole /64). An attempt is let through only if none of its keys is
//! waiting, and it is counted under all three in the same transaction that checks them, with
//! the rows locked, before the password is checked: parallel attempts, on one broadcast or
//! many, are let through one at a time and each sees the others' counts. A key allows
//! `free` attempts, then makes the next one wait 1 s, then 2 s, 4 s ... at most 15 minutes;
//! a refused attempt is not counted, so hammering a waiting key does not lengthen its wait.
//! A key forgets its count after an hour without attempts.
//!
//! - pair (name, address): 5 free attempts. This is the key that stops a guesser.
//! - address: 30 free attempts, over any names: one address spraying many names.
//! - name: 100 free attempts, from any addresses: a guesser spread over many addresses.
//!
//! The real owner is not locked out by an attacker elsewhere: a successful login clears its
//! pair's count and marks the pair trusted, and a trusted pair is checked against its own key
//! only, so failures from other addresses (name-wide) or for other names (address-wide) never
//! delay it. An owner on a new address while the name is under a distributed attack waits at
//! most the name's current delay (15 minutes at worst), and never a hard lock. A success also
//! takes its own attempt back off the name and address counts. Trusted pairs are remembered
//! for 90 days after their last login.
//!
//! While the database is unreachable nothing can be checked, so logins are refused (503)
//! rather than let through unchecked.

use std::net::IpAddr;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Row, Transaction};

use crate::store::StoreError;

/// How one kind of key throttles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowance {
    /// Attempts let through before any wait.
    pub free: i32,
    /// Wait after the last free attempt; it doubles with each attempt after that.
    pub first_wait: Duration,
    pub max_wait: Duration,
}

impl Allowance {
    /// The wait before the next attempt once `count` attempts have been counted.
    pub fn wait_after(&self, count: i32) -> Duration {
        if count < self.free {
            return Duration::ZERO;
        }
        let doublings = u32::try_from(count - self.free).unwrap_or(0).min(30);
        self.first_wait
            .saturating_mul(1u32 << doublings)
            .min(self.max_wait)
    }
}

/// The allowances of the three kinds of keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub pair: Allowance,
    pub address: Allowance,
    pub name: Allowance,
    /// A key without attempts for this long starts again from zero.
    pub forget_after: Duration,
}

const MAX_WAIT: Duration = Duration::from_secs(15 * 60);

pub const RULE: Rule = Rule {
    pair: Allowance {
        free: 5,
        first_wait: Duration::from_secs(1),
        max_wait: MAX_WAIT,
    },
    address: Allowance {
        free: 30,
        first_wait: Duration::from_secs(1),
        max_wait: MAX_WAIT,
    },
    name: Allowance {
        free: 100,
        first_wait: Duration::from_secs(1),
        max_wait: MAX_WAIT,
    },
    forget_after: Duration::from_secs(3600),
};

/// How long a pair that logged in stays trusted after its last login.
const TRUST_DAYS: i32 = 90;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Pair,
    Address,
    Name,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Pair => "pair",
            KeyKind::Address => "address",
            KeyKind::Name => "name",
        }
    }
}

/// The three keys of one login attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pair: String,
    address: String,
    name: String,
}

impl Keys {
    pub fn new(name: &str, address: IpAddr) -> Keys {
        // Longer names cannot exist (see limits::check_name): they share one key rather than
        // let a guesser store arbitrary text.
        let name = if name.len() <= 64 {
            name.to_lowercase()
        } else {
            "~too-long".to_owned()
        };
        let address = match address {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => v4.to_string(),
                None => {
                    let s = v6.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            },
        };
        Keys {
            pair: format!("pair:{name}|{address}"),
            address: format!("addr:{address}"),
            name: format!("name:{name}"),
        }
    }

    /// Sorted by key, so concurrent transactions lock rows in one order and cannot deadlock.
    fn all(&self) -> [(&str, KeyKind); 3] {
        let mut keys = [
            (self.address.as_str(), KeyKind::Address),
            (self.name.as_str(), KeyKind::Name),
            (self.pair.as_str(), KeyKind::Pair),
        ];
        keys.sort_by(|a, b| a.0.cmp(b.0));
        keys
    }
}

/// Whether an attempt may check its password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Counted: check the password, then report a success with `succeeded`.
    Allowed,
    /// Not counted: try again after `wait` (rounded up to whole seconds, at least 1).
    Refused { wait_secs: u64, by: KeyKind },
}

/// One key's row as the attempt found it, under its row lock.
struct KeyState {
    kind: KeyKind,
    failures: i32,
    /// Not seen for `forget_after`: counts start over.
    stale: bool,
    /// Whole seconds until the next attempt is allowed (0: now).
    wait: i64,
}

/// Locks the rows of `all` (the caller inserted any missing, in key order so concurrent attempts
/// never deadlock) and reads their state; also whether the pair is trusted. Times are read
/// after the locks are taken (clock_timestamp, not the transaction's start), or an attempt that
/// queued behind others would misjudge their waits.
async fn locked_states(
    tx: &mut Transaction<'_, Postgres>,
    all: &[(&str, KeyKind)],
    rule: &Rule,
) -> Result<(Vec<KeyState>, bool), StoreError> {
    let names: Vec<&str> = all.iter().map(|(k, _)| *k).collect();
    let rows = sqlx::query(
        "SELECT key, failures, trusted, last_at < clock_timestamp() - make_interval(secs => $2) AS stale, \
         CASE WHEN next_at > clock_timestamp() THEN ceil(extract(epoch FROM next_at - clock_timestamp()))::bigint ELSE 0 END AS wait \
         FROM login_throttle WHERE key = ANY($1) ORDER BY key FOR UPDATE",
    )
    .bind(&names)
    .bind(rule.forget_after.as_secs_f64())
    .fetch_all(&mut **tx)
    .await?;
    let mut states = Vec::with_capacity(3);
    let mut trusted = false;
    for row in &rows {
        let key: &str = row.try_get("key")?;
        let Some((_, kind)) = all.iter().find(|(k, _)| *k == key) else {
            continue;
        };
        if *kind == KeyKind::Pair {
            trusted = row.try_get("trusted")?;
        }
        states.push(KeyState {
            kind: *kind,
            failures: row.try_get("failures")?,
            stale: row.try_get("stale")?,
            wait: row.try_get("wait")?,
        });
    }
    Ok((states, trusted))
}

/// Checks and counts one attempt atomically (see the module doc for the rule).
pub async fn attempt(pool: &PgPool, keys: &Keys, rule: &Rule) -> Result<Verdict, StoreError> {
    let all = keys.all();
    let names: Vec<&str> = all.iter().map(|(k, _)| *k).collect();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO login_throttle (key) SELECT k FROM unnest($1::text[]) AS k ORDER BY k \
         ON CONFLICT (key) DO NOTHING",
    )
    .bind(&names)
    .execute(&mut *tx)
    .await?;
    let (states, trusted) = locked_states(&mut tx, &all, rule).await?;
    let applies = |kind: KeyKind| !trusted || kind == KeyKind::Pair;
    let refusal = states
        .iter()
        .filter(|s| applies(s.kind) && !s.stale && s.wait > 0)
        .max_by_key(|s| s.wait);
    if let Some(s) = refusal {
        let verdict = Verdict::Refused {
            wait_secs: u64::try_from(s.wait).unwrap_or(1).max(1),
            by: s.kind,
        };
        tx.rollback().await?;
        return Ok(verdict);
    }
    for s in &states {
        let count = if s.stale { 1 } else { s.failures + 1 };
        let allowance = match s.kind {
            KeyKind::Pair => rule.pair,
            KeyKind::Address => rule.address,
            KeyKind::Name => rule.name,
        };
        let key = all
            .iter()
            .find(|(_, k)| *k == s.kind)
            .map(|(k, _)| *k)
            .unwrap_or_default();
        sqlx::query(
            "UPDATE login_throttle SET failures = $2, last_at = clock_timestamp(), \
             next_at = clock_timestamp() + make_interval(secs => $3) WHERE key = $1",
        )
        .bind(key)
        .bind(count)
        .bind(allowance.wait_after(count).as_secs_f64())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Verdict::Allowed)
}

/// The password was right: the pair starts over and becomes trusted; the name and address
/// get this attempt back, and if that takes them under their free attempts, any wait ends (many
/// people behind one address logging in at once must not hold each other up).
pub async fn succeeded(pool: &PgPool, keys: &Keys, rule: &Rule) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    for (key, free) in [
        (&keys.address, rule.address.free),
        (&keys.name, rule.name.free),
    ] {
        sqlx::query(
            "UPDATE login_throttle SET failures = greatest(failures - 1, 0), \
             next_at = CASE WHEN failures - 1 < $2 THEN now() ELSE next_at END WHERE key = $1",
        )
        .bind(key)
        .bind(free)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "UPDATE login_throttle SET failures = 0, next_at = now(), trusted = true, \
         last_at = now() WHERE key = $1",
    )
    .bind(&keys.pair)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// The attempt was let through but its password could not be checked (hashing busy): it
/// gives its count back under every key; waits it started stay.
pub async fn withdrawn(pool: &PgPool, keys: &Keys) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE login_throttle SET failures = greatest(failures - 1, 0) WHERE key = ANY($1)",
    )
    .bind(
        [
            keys.pair.as_str(),
            keys.address.as_str(),
            keys.name.as_str(),
        ]
        .as_slice(),
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Drops keys nobody needs any more: forgotten counts, and trust not used for 90 days.
pub async fn forget_old(pool: &PgPool, rule: &Rule) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "DELETE FROM login_throttle WHERE \
         (NOT trusted AND last_at < now() - make_interval(secs => $1) AND next_at < now()) \
         OR last_at < now() - make_interval(days => $2)",
    )
    .bind(rule.forget_after.as_secs_f64())
    .bind(TRUST_DAYS)
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_after_the_free_attempts_up_to_the_cap() {
        let a = RULE.pair;
        assert_eq!(a.wait_after(0), Duration::ZERO);
        assert_eq!(a.wait_after(4), Duration::ZERO);
        assert_eq!(a.wait_after(5), Duration::from_secs(1));
        assert_eq!(a.wait_after(6), Duration::from_secs(2));
        assert_eq!(a.wait_after(7), Duration::from_secs(4));
        assert_eq!(a.wait_after(15), MAX_WAIT);
        assert_eq!(a.wait_after(i32::MAX), MAX_WAIT);
    }

    #[test]
    fn keys_fold_case_and_ipv6_networks() {
        let a = Keys::new("Alice", "192.0.2.7".parse().unwrap());
        assert_eq!(a.pair, "pair:alice|192.0.2.7");
        assert_eq!(a.address, "addr:192.0.2.7");
        assert_eq!(a.name, "name:alice");
        let b = Keys::new("alice", "2001:db8:1:2:aaaa::1".parse().unwrap());
        let c = Keys::new("ALICE", "2001:db8:1:2:bbbb::9".parse().unwrap());
        assert_eq!(b, c, "one /64 is one address");
        assert_eq!(b.address, "addr:2001:db8:1:2::/64");
        let mapped = Keys::new("alice", "::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(mapped, a);
        let long = Keys::new(&"x".repeat(5000), "192.0.2.7".parse().unwrap());
        assert!(long.pair.len() < 64);
    }
}
