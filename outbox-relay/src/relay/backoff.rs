//! The wait between the relay's retries (leader lock, source reconnects, delivery failures):
//! exponential with jitter, from [`backon`], and cut short by shutdown.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// The first wait after a success.
pub(super) const MIN_DELAY: Duration = Duration::from_millis(200);
/// No wait is this long or longer.
pub(super) const MAX_DELAY: Duration = Duration::from_secs(30);

/// Waits that start at [`MIN_DELAY`], double after each failure and stay below [`MAX_DELAY`],
/// each stretched by a random 0–100 % so that relays failing together do not retry together.
///
/// backon's jitter adds up to the whole base delay, so the base is capped at half of
/// [`MAX_DELAY`]: once capped, waits are spread over `[MAX_DELAY / 2, MAX_DELAY)` instead of all
/// landing on the cap.
pub(super) struct Backoff {
    delays: <ExponentialBuilder as BackoffBuilder>::Backoff,
}

impl Backoff {
    fn schedule() -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(MIN_DELAY)
            .with_max_delay(MAX_DELAY / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
    }

    /// A backoff whose next wait is the first one.
    pub(super) fn new() -> Self {
        Self {
            delays: Self::schedule().build(),
        }
    }

    /// Starts over from the first wait (after a success).
    pub(super) fn reset(&mut self) {
        *self = Self::new();
    }

    /// The next wait (advancing the schedule), never longer than [`MAX_DELAY`].
    fn next_delay(&mut self) -> Duration {
        // The schedule has no attempt limit, so it never runs out; the cap is kept regardless.
        self.delays.next().unwrap_or(MAX_DELAY).min(MAX_DELAY)
    }

    /// Sleeps for the next wait, or until `shutdown` is cancelled, whichever comes first.
    pub(super) async fn wait(&mut self, shutdown: &CancellationToken) {
        let delay = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The un-jittered wait of attempt `n` (0-based): doubling from the minimum, capped.
    fn base(n: u32) -> Duration {
        MIN_DELAY
            .saturating_mul(2u32.saturating_pow(n))
            .min(MAX_DELAY / 2)
    }

    #[test]
    fn waits_grow_from_the_minimum_and_stay_below_the_maximum() {
        for _ in 0..200 {
            let mut backoff = Backoff::new();
            for n in 0..40 {
                let delay = backoff.next_delay();
                assert!(delay >= base(n), "attempt {n}: {delay:?} < {:?}", base(n));
                assert!(
                    delay < base(n) * 2,
                    "attempt {n}: {delay:?} ≥ {:?}",
                    base(n) * 2
                );
                assert!(delay >= MIN_DELAY && delay <= MAX_DELAY, "{delay:?}");
            }
        }
    }

    #[test]
    fn jitter_spreads_the_waits() {
        // Capped waits are spread over [MAX/2, MAX), not all equal.
        let mut backoff = Backoff::new();
        let capped: Vec<Duration> = (0..60).map(|_| backoff.next_delay()).skip(20).collect();
        let (lo, hi) = (capped.iter().min().unwrap(), capped.iter().max().unwrap());
        assert!(*lo >= MAX_DELAY / 2 && *hi < MAX_DELAY, "{lo:?}..{hi:?}");
        assert!(hi > lo, "no jitter: {capped:?}");
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::new();
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        let first = backoff.next_delay();
        assert!(first >= MIN_DELAY && first < MIN_DELAY * 2, "{first:?}");
    }

    #[tokio::test]
    async fn shutdown_cuts_the_wait_short() {
        let mut backoff = Backoff::new();
        for _ in 0..10 {
            backoff.next_delay();
        }
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let started = std::time::Instant::now();
        backoff.wait(&shutdown).await;
        // The scheduled wait was at least 15 s.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn wait_sleeps_for_the_scheduled_delay() {
        let mut backoff = Backoff::new();
        let started = std::time::Instant::now();
        backoff.wait(&CancellationToken::new()).await;
        assert!(started.elapsed() >= MIN_DELAY, "{:?}", started.elapsed());
    }
}
