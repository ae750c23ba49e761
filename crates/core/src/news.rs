//! "Something was published": the origin and the broadcasts announce every new part or
//! segment, and blocking playlist and part requests (low-latency HLS) wait on it.

use std::time::Duration;

/// A counter bumped at every announcement.
#[derive(Debug)]
pub struct News(tokio::sync::watch::Sender<u64>);

impl Default for News {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(0).0)
    }
}

impl News {
    /// Wakes the requests waiting for news.
    pub fn announce(&self) {
        self.0.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Returns once `ready()` holds, checked at every announcement, or after `hold`.
    pub async fn wait_until(&self, hold: Duration, ready: impl Fn() -> bool) {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(hold, async {
            while !ready() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn waits_for_the_announcement_that_makes_it_ready_or_gives_up() {
        let news = std::sync::Arc::new(News::default());
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let waiter = {
            let (news, flag) = (news.clone(), flag.clone());
            tokio::spawn(async move {
                news.wait_until(Duration::from_secs(10), || flag.load(Ordering::SeqCst))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        news.announce();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "not ready yet");
        flag.store(true, Ordering::SeqCst);
        news.announce();
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        let started = std::time::Instant::now();
        news.wait_until(Duration::from_millis(100), || false).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
    }
}
