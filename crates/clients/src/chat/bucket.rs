//! The per-user send rate, as the server enforces it: a token bucket.

/// A token bucket like the server's per-user limit, so the client never trips it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    capacity: f64,
    rate: f64,
    last_s: f64,
}

impl TokenBucket {
    pub fn new(capacity: f64, rate: f64, now_s: f64) -> Self {
        Self {
            tokens: capacity,
            capacity,
            rate,
            last_s: now_s,
        }
    }

    pub fn try_take(&mut self, now_s: f64) -> bool {
        let elapsed = (now_s - self.last_s).max(0.0);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last_s = now_s;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10.0, 3.0, 0.0);
        assert_eq!((0..20).filter(|_| bucket.try_take(0.0)).count(), 10);
        assert!(!bucket.try_take(0.2));
        assert!(bucket.try_take(0.34));
        assert!(!bucket.try_take(0.35));
    }
}
