//! In-memory limits of one broadcast: message rate per user, WebSocket connections per IP and
//! in all. They protect this process and the database; a determined abuser spreading over
//! every broadcast gets at most one broadcast's allowance on each. Failed logins are counted
//! for the whole cluster, in the database (see `throttle`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Longest chat message in characters.
pub const MAX_MESSAGE_CHARS: usize = 500;
/// Largest WebSocket frame accepted (a full-length message of 4-byte characters fits).
pub const MAX_FRAME_BYTES: usize = 4096;
/// Messages a user may send at once, and per second after that.
pub const MESSAGE_BURST: f64 = 10.0;
pub const MESSAGES_PER_SECOND: f64 = 3.0;
/// Frames of any kind per connection per second before it is closed as a flood.
pub const FRAMES_PER_SECOND: u32 = 30;
pub const CONNECTIONS_PER_IP: usize = 32;

/// A token bucket per key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(burst: f64, per_second: f64) -> Self {
        RateLimiter {
            burst,
            per_second,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token; false when the bucket is empty.
    pub fn allow(&self, key: &K, now: Instant) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return false;
        };
        if buckets.len() > 100_000 {
            // Forget idle keys rather than grow without bound.
            let full_after = Duration::from_secs_f64(self.burst / self.per_second);
            buckets.retain(|_, (_, at)| now.duration_since(*at) < full_after);
        }
        let (tokens, at) = buckets.entry(key.clone()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts open connections per IP and in all; the guard gives its slot back when dropped.
#[derive(Debug, Default, Clone)]
pub struct ConnectionCounter {
    open: Arc<Mutex<Open>>,
    closed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Open {
    per_ip: HashMap<IpAddr, usize>,
    total: usize,
}

pub struct ConnectionGuard {
    open: Arc<Mutex<Open>>,
    closed: Arc<Notify>,
    ip: IpAddr,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Address,
    Total,
}

impl ConnectionCounter {
    pub fn try_open(
        &self,
        ip: IpAddr,
        per_ip: usize,
        total: usize,
    ) -> Result<ConnectionGuard, Full> {
        let mut open = self.open.lock().map_err(|_| Full::Total)?;
        if open.total >= total {
            return Err(Full::Total);
        }
        let n = open.per_ip.entry(ip).or_default();
        if *n >= per_ip {
            return Err(Full::Address);
        }
        *n += 1;
        open.total += 1;
        Ok(ConnectionGuard {
            open: self.open.clone(),
            closed: self.closed.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().map_or(0, |o| o.total)
    }

    /// Resolves once no connection is open.
    pub async fn until_empty(&self) {
        loop {
            let notified = self.closed.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock() {
            open.total = open.total.saturating_sub(1);
            if let Some(n) = open.per_ip.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.per_ip.remove(&self.ip);
                }
            }
        }
        self.closed.notify_waiters();
    }
}

/// Why a chat text is refused, if it is.
pub fn check_text(text: &str) -> Result<(), (&'static str, &'static str)> {
    if text.trim().is_empty() {
        return Err(("empty", "empty message"));
    }
    if text.chars().count() > MAX_MESSAGE_CHARS {
        return Err(("too_long", "message longer than 500 characters"));
    }
    // PostgreSQL text cannot hold NUL, and other control characters only serve to garble.
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(("bad_request", "control characters are not allowed"));
    }
    Ok(())
}

/// Client-made ids: short and path/JSON safe.
pub fn valid_client_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Account names: 3-32 of `[A-Za-z0-9_-]`, so no markup, quoting or look-alikes get in.
pub fn check_name(name: &str) -> Result<(), &'static str> {
    if !(3..=32).contains(&name.len())
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err("names are 3 to 32 letters, digits, '_' or '-'");
    }
    if name.eq_ignore_ascii_case("admin") {
        return Err("that name is reserved");
    }
    Ok(())
}

pub fn check_password(password: &str) -> Result<(), &'static str> {
    match password.chars().count() {
        0..8 => Err("passwords need at least 8 characters"),
        8..=256 => Ok(()),
        _ => Err("passwords are at most 256 characters"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::new(3.0, 1.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| limiter.allow(&"u", t0)));
        assert!(!limiter.allow(&"u", t0));
        assert!(limiter.allow(&"other", t0), "keys are independent");
        assert!(limiter.allow(&"u", t0 + Duration::from_millis(1000)));
        assert!(!limiter.allow(&"u", t0 + Duration::from_millis(1100)));
    }

    #[test]
    fn connection_slots_come_back() {
        let counter = ConnectionCounter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let a = counter.try_open(ip, 2, 3).unwrap();
        let _b = counter.try_open(ip, 2, 3).unwrap();
        assert_eq!(counter.try_open(ip, 2, 3).err(), Some(Full::Address));
        let _c = counter.try_open(other, 2, 3).unwrap();
        assert_eq!(counter.try_open(other, 2, 3).err(), Some(Full::Total));
        drop(a);
        assert!(counter.try_open(ip, 2, 3).is_ok());
    }

    #[tokio::test]
    async fn until_empty_waits_for_the_last_guard() {
        let counter = ConnectionCounter::default();
        counter.until_empty().await;
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let guards = vec![
            counter.try_open(ip, 2, 3).unwrap(),
            counter.try_open(ip, 2, 3).unwrap(),
        ];
        let waiter = tokio::spawn({
            let counter = counter.clone();
            async move { counter.until_empty().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "two connections are open");
        drop(guards);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("until_empty returns once the guards are gone")
            .unwrap();
        assert_eq!(counter.open(), 0);
    }

    #[test]
    fn texts_names_and_ids() {
        assert!(check_text("hello <b>world</b>; DROP TABLE users; --").is_ok());
        assert_eq!(check_text("  ").unwrap_err().0, "empty");
        assert_eq!(check_text(&"é".repeat(501)).unwrap_err().0, "too_long");
        assert!(check_text(&"é".repeat(500)).is_ok());
        assert_eq!(check_text("a\0b").unwrap_err().0, "bad_request");
        assert!(check_text("two\nlines").is_ok());
        assert!(valid_client_id("c1-abc_9"));
        assert!(
            !valid_client_id("") && !valid_client_id("a b") && !valid_client_id(&"x".repeat(65))
        );
        assert!(check_name("Alice_1").is_ok());
        for bad in ["al", "<script>", "a'b", "Admin", &"x".repeat(33), "émile"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_password("short").is_err());
        assert!(check_password("long enough").is_ok());
        assert!(check_password(&"p".repeat(257)).is_err());
    }
}
