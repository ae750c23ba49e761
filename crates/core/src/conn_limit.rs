//! Caps on open connections, globally and per client address, taken at accept.
//!
//! A refused connection is closed before any TLS work, so a flood costs one accept each.
//! Memory is bounded by the global cap: only addresses with an open connection are tracked.

use crate::sync::lock;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The address a client is counted under. One IPv6 host usually owns a whole /64, so an IPv6
/// client is its /64; IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// Why a connection was refused; the label of `http_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Global,
    PerAddress,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Global => "global",
            Refusal::PerAddress => "per_address",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_key: HashMap<IpAddr, u32>,
}

/// Open-connection counters shared by one listener's accept loop and its connections.
#[derive(Debug, Clone)]
pub struct ConnLimiter {
    global: u32,
    per_address: u32,
    counts: Arc<Mutex<Counts>>,
}

impl ConnLimiter {
    pub fn new(global: u32, per_address: u32) -> Self {
        Self {
            global,
            per_address,
            counts: Arc::default(),
        }
    }

    /// A permit held for as long as the connection lives, or why there is none.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<ConnPermit, Refusal> {
        let key = client_key(ip);
        let mut counts = lock(&self.counts);
        if counts.total >= self.global {
            return Err(Refusal::Global);
        }
        let n = counts.per_key.entry(key).or_insert(0);
        if *n >= self.per_address {
            return Err(Refusal::PerAddress);
        }
        *n += 1;
        counts.total += 1;
        Ok(ConnPermit {
            key,
            counts: self.counts.clone(),
        })
    }

    /// Connections open now (all addresses).
    pub fn open(&self) -> u32 {
        lock(&self.counts).total
    }
}

/// One open connection; dropping it frees its place.
#[derive(Debug)]
pub struct ConnPermit {
    key: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let mut counts = lock(&self.counts);
        counts.total = counts.total.saturating_sub(1);
        if let Some(n) = counts.per_key.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.per_key.remove(&self.key);
            }
        }
    }
}

/// Lets a message through at most once per interval, so a flood of refusals cannot flood the
/// log; the counters in `/metrics` carry the totals.
#[derive(Debug)]
pub struct LogThrottle {
    every: std::time::Duration,
    /// When a message last went through, and how many were held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogThrottle {
    pub fn per_second() -> Self {
        Self {
            every: std::time::Duration::from_secs(1),
            state: Mutex::new((None, 0)),
        }
    }

    /// True when the caller may log now.
    pub fn allow(&self) -> bool {
        self.allow_counting().is_some()
    }

    /// `Some(messages held back since the last one let through)` when the caller may log now,
    /// so the line can say how many it stands for.
    pub fn allow_counting(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = lock(&self.state);
        match state.0 {
            Some(t) if now.duration_since(t) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_and_global_caps() {
        let limiter = ConnLimiter::new(3, 2);
        let a1 = limiter.try_acquire(ip("10.0.0.1")).unwrap();
        let _a2 = limiter.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(
            limiter.try_acquire(ip("10.0.0.1")).unwrap_err(),
            Refusal::PerAddress
        );
        let _b1 = limiter.try_acquire(ip("10.0.0.2")).unwrap();
        assert_eq!(
            limiter.try_acquire(ip("10.0.0.3")).unwrap_err(),
            Refusal::Global
        );
        drop(a1);
        assert_eq!(limiter.open(), 2);
        let _a3 = limiter.try_acquire(ip("10.0.0.1")).unwrap();
        assert_eq!(limiter.open(), 3);
    }

    #[test]
    fn released_addresses_are_forgotten() {
        let limiter = ConnLimiter::new(10, 1);
        for i in 0..5 {
            drop(limiter.try_acquire(ip(&format!("10.0.0.{i}"))).unwrap());
        }
        assert!(limiter.counts.lock().unwrap().per_key.is_empty());
        assert_eq!(limiter.open(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1")),
            client_key(ip("2001:db8:1:2:bbbb::2"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(client_key(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
        let limiter = ConnLimiter::new(10, 1);
        let _a = limiter.try_acquire(ip("10.1.2.3")).unwrap();
        assert_eq!(
            limiter.try_acquire(ip("::ffff:10.1.2.3")).unwrap_err(),
            Refusal::PerAddress
        );
    }

    #[test]
    fn throttle_lets_one_through_per_interval() {
        let t = LogThrottle::per_second();
        assert!(t.allow());
        assert!(!t.allow());
    }
}
