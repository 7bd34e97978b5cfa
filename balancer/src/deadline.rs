//! A timer for deadlines that move with every request but almost never expire.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::time::{Instant, Sleep};

/// One `Sleep`, re-armed lazily: a new deadline is a plain `Instant` the caller passes, and the
/// timer wheel is touched only when the timer fires before that deadline. A request that sets
/// a deadline and finishes well within it costs no timer update at all.
pub struct LazyTimer {
    sleep: Pin<Box<Sleep>>,
}

impl LazyTimer {
    /// A timer that first fires at `first` (any deadline passed later is checked then).
    pub fn new(first: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(first)),
        }
    }

    /// Ready once `deadline` has passed.
    pub fn poll_expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            ready!(self.sleep.as_mut().poll(cx));
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_at_the_latest_deadline_not_the_first() {
        let start = Instant::now();
        let mut t = LazyTimer::new(start + Duration::from_millis(10));
        // The deadline moved on before the first one came: the early firing is not taken for it.
        let d = start + Duration::from_millis(200);
        std::future::poll_fn(|cx| t.poll_expired(d, cx)).await;
        assert!(Instant::now() >= start + Duration::from_millis(200));
        // An already-passed deadline completes at once.
        std::future::poll_fn(|cx| t.poll_expired(start, cx)).await;
    }
}
