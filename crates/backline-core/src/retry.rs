//! How failed attempts are retried.

use std::time::Duration;

/// Back-off and limits for retrying a job.
///
/// The wait after the `n`-th failed attempt is `initial × factor^(n−1)`, capped at `max_delay`,
/// then spread by ±`jitter` (a fraction) so that a burst of failures does not retry in lockstep.
/// The job goes to `Dead` when `max_attempts` attempts have been made, or when its next try would
/// fall later than `max_age` after it was enqueued (ABP's "abandoned" rule).
///
/// Two presets:
///
/// | | [`RetryPolicy::default`] | [`RetryPolicy::abp`] |
/// |---|---|---|
/// | first wait | 1 s | 60 s |
/// | factor | 2.0 | 2.0 |
/// | cap | 5 min | none |
/// | jitter | ±10 % | none |
/// | attempts | 25 | unbounded by count |
/// | max age | none | 172,800 s (2 days): 12 attempts over about 34 h |
///
/// ```
/// use std::time::Duration;
/// use backline_core::RetryPolicy;
///
/// let abp = RetryPolicy::abp();
/// assert_eq!(abp.delay_for(1), Duration::from_secs(60));
/// assert_eq!(abp.delay_for(3), Duration::from_secs(240));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// The wait after the first failure.
    pub initial: Duration,
    /// The growth of the wait per failure.
    pub factor: f64,
    /// The longest wait.
    pub max_delay: Duration,
    /// The spread of each wait, as a fraction (0.1 = ±10 %).
    pub jitter: f64,
    /// The most attempts a job gets (counted when an attempt starts); at least 1.
    pub max_attempts: u32,
    /// Abandon the job when its next try would start later than this after it was enqueued.
    pub max_age: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            factor: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.1,
            max_attempts: 25,
            max_age: None,
        }
    }
}

impl RetryPolicy {
    /// ABP Framework's defaults: 60 s × 2.0^(n−1), abandoned after 172,800 s (2 days).
    ///
    /// ABP limits jobs by age only; `max_attempts` is set high (1,000) so that the age rule decides.
    pub fn abp() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(60),
            factor: 2.0,
            max_delay: Duration::MAX,
            jitter: 0.0,
            max_attempts: 1000,
            max_age: Some(Duration::from_secs(172_800)),
        }
    }

    /// A policy with no retries: the first failure is final.
    pub fn never() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The same policy with another number of attempts.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The same policy with another first wait.
    pub fn with_initial(mut self, d: Duration) -> Self {
        self.initial = d;
        self
    }

    /// The same policy with a maximum age.
    pub fn with_max_age(mut self, d: Duration) -> Self {
        self.max_age = Some(d);
        self
    }

    /// The wait before the next try after the `attempt`-th attempt failed, without jitter.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(1000) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.max(1.0).powi(exp);
        let capped = secs.min(self.max_delay.as_secs_f64());
        if !capped.is_finite() || capped >= Duration::MAX.as_secs_f64() {
            return self.max_delay;
        }
        Duration::from_secs_f64(capped.max(0.0))
    }

    /// [`delay_for`](Self::delay_for) with this policy's jitter applied.
    pub fn jittered_delay_for(&self, attempt: u32) -> Duration {
        let base = self.delay_for(attempt);
        if self.jitter <= 0.0 {
            return base;
        }
        let spread = self.jitter.min(1.0) * (fastrand::f64() * 2.0 - 1.0);
        let secs = base.as_secs_f64() * (1.0 + spread);
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abp_gives_twelve_attempts_within_two_days() {
        let p = RetryPolicy::abp();
        let max_age = p.max_age.map(|d| d.as_secs_f64()).unwrap_or(f64::MAX);
        let mut elapsed = 0.0;
        let mut attempts = 1;
        loop {
            elapsed += p.delay_for(attempts).as_secs_f64();
            if elapsed > max_age {
                break;
            }
            attempts += 1;
        }
        assert_eq!(attempts, 12);
    }

    #[test]
    fn default_backoff_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay_for(1), Duration::from_secs(1));
        assert_eq!(p.delay_for(2), Duration::from_secs(2));
        assert_eq!(p.delay_for(40), Duration::from_secs(300));
        let j = p.jittered_delay_for(3).as_secs_f64();
        assert!((3.6..=4.4).contains(&j), "{j}");
    }
}
