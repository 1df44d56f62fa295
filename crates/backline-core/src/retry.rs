//! How failed attempts are retried: [`RetryPolicy`], its back-off, and
//! [`RetryPolicy::outcome`], the retry-or-dead decision for a failed attempt.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::{FailureKind, Job, JobError, Outcome};

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

    /// What becomes of `job` when its current attempt failed with `err`, decided at `now`: a
    /// retry after a delay, or a dead job. The [`JobServer`](crate::JobServer) applies this to
    /// every failed attempt (with the policy of the job's type, and `now` from the clock):
    ///
    /// 1. a [`FailureKind::Fatal`] error makes the job dead at once, with the error's message;
    /// 2. the delay is the one a [`FailureKind::RetryAfter`] asks for (the back-off is not
    ///    escalated), or else this policy's [`jittered_delay_for`](Self::jittered_delay_for)
    ///    the job's attempt;
    /// 3. on the job's last attempt (`job.attempt >= job.max_attempts`; the job's own limit,
    ///    stored when it was enqueued, not this policy's `max_attempts`) the job is dead, the
    ///    message followed by `(attempt n of m)`;
    /// 4. with a [`max_age`](Self::max_age), a job whose next try (`now` + the delay) would
    ///    start later than `max_age` after [`enqueued_at`](Job::enqueued_at) is dead
    ///    ("abandoned");
    /// 5. otherwise the job is retried after the delay, the message kept as its last error.
    ///
    /// It is public so that an application can check in a unit test what its policy does with
    /// a failure, and so that a runtime other than the job server (a provider that runs handlers
    /// itself, a tool that replays jobs) decides exactly as the server does. `now` is a
    /// parameter so that neither needs a clock; the only randomness is the jitter of rule 2.
    pub fn outcome(&self, job: &Job, err: &JobError, now: DateTime<Utc>) -> Outcome {
        let error = err.message().to_owned();
        let delay = match err.kind() {
            FailureKind::Fatal => return Outcome::Dead { error },
            FailureKind::RetryAfter(d) => d,
            FailureKind::Retryable => self.jittered_delay_for(job.attempt),
        };
        if job.attempt >= job.max_attempts {
            return Outcome::Dead {
                error: format!("{error} (attempt {} of {})", job.attempt, job.max_attempts),
            };
        }
        if let Some(max_age) = self.max_age {
            // Saturating: a huge retry-after or max age must not panic the attempt (which
            // would leave the job running under a heartbeated lease until the server stops).
            let next = crate::provider::saturating_add(now, delay);
            let limit = crate::provider::saturating_add(job.enqueued_at, max_age);
            if next > limit {
                return Outcome::Dead {
                    error: format!("abandoned: the next try would be past the max age of {max_age:?}; last error: {error}"),
                };
            }
        }
        Outcome::Retry { delay, error }
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

    fn now() -> DateTime<Utc> {
        use chrono::TimeZone;
        Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
    }

    /// A job in its `attempt`-th attempt of `max_attempts`, enqueued `age` seconds before [`now`].
    fn job(attempt: u32, max_attempts: u32, age: i64) -> Job {
        let enqueued_at = now() - chrono::Duration::seconds(age);
        Job {
            id: crate::JobId::new(),
            name: "test".into(),
            queue: "default".into(),
            payload: b"null".to_vec(),
            priority: crate::Priority::default(),
            state: crate::JobState::Running,
            attempt,
            max_attempts,
            timeout: None,
            enqueued_at,
            run_at: enqueued_at,
            last_error: None,
            lease_until: None,
            finished_at: None,
        }
    }

    fn retry(secs: u64, error: &str) -> Outcome {
        Outcome::Retry {
            delay: Duration::from_secs(secs),
            error: error.into(),
        }
    }

    fn dead(error: &str) -> Outcome {
        Outcome::Dead {
            error: error.into(),
        }
    }

    #[test]
    fn outcome_follows_the_rules_in_order() {
        // No jitter, so every delay is exact: 1 s × 2^(attempt − 1), at most 5 min, 25 attempts.
        let plain = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let aged = plain.with_max_age(Duration::from_secs(60));
        let abandoned = |error: &str| {
            dead(&format!(
                "abandoned: the next try would be past the max age of 60s; last error: {error}"
            ))
        };
        #[rustfmt::skip]
        let table: Vec<(&str, RetryPolicy, Job, JobError, Outcome)> = vec![
            ("fatal is dead at once, attempts left or not",
                plain, job(1, 25, 0), JobError::fatal("bad input"), dead("bad input")),
            ("fatal on the last attempt is dead without the attempt count",
                plain, job(25, 25, 0), JobError::fatal("bad input"), dead("bad input")),
            ("fatal beats the max age",
                aged, job(1, 25, 3600), JobError::fatal("bad input"), dead("bad input")),
            ("retryable waits the back-off of its attempt",
                plain, job(1, 25, 0), JobError::msg("boom"), retry(1, "boom")),
            ("the back-off grows with the attempt",
                plain, job(3, 25, 0), JobError::msg("boom"), retry(4, "boom")),
            ("the back-off is capped at max_delay",
                plain, job(20, 25, 0), JobError::msg("boom"), retry(300, "boom")),
            ("a panic is an ordinary retryable failure",
                plain, job(2, 25, 0), JobError::msg("panicked: oops"), retry(2, "panicked: oops")),
            ("a timeout is an ordinary retryable failure",
                plain, job(2, 25, 0), JobError::msg("timed out after 1s"), retry(2, "timed out after 1s")),
            ("retry-after waits exactly its delay, without escalating",
                plain, job(10, 25, 0), JobError::retry_after(Duration::from_secs(7)),
                retry(7, "retry requested after 7s")),
            ("retry-after may exceed max_delay",
                plain, job(1, 25, 0), JobError::retry_after(Duration::from_secs(900)),
                retry(900, "retry requested after 900s")),
            ("the last attempt is dead, with the attempt count",
                plain, job(25, 25, 0), JobError::msg("boom"), dead("boom (attempt 25 of 25)")),
            ("a retry-after beyond the calendar is past any max age, and does not panic",
                aged, job(1, 25, 0), JobError::retry_after(Duration::MAX),
                abandoned(&format!("retry requested after {:?}", Duration::MAX))),
            ("a max age beyond the calendar never abandons, and does not panic",
                plain.with_max_age(Duration::MAX), job(1, 25, 0), JobError::msg("boom"), retry(1, "boom")),
            ("retry-after on the last attempt is dead too",
                plain, job(3, 3, 0), JobError::retry_after(Duration::from_secs(7)),
                dead("retry requested after 7s (attempt 3 of 3)")),
            ("past the last attempt is dead",
                plain, job(4, 3, 0), JobError::msg("boom"), dead("boom (attempt 4 of 3)")),
            ("the job's own max_attempts counts, not the policy's",
                RetryPolicy { jitter: 0.0, ..RetryPolicy::never() }, job(1, 3, 0),
                JobError::msg("boom"), retry(1, "boom")),
            ("the job's own max_attempts also ends it early",
                plain, job(1, 1, 0), JobError::msg("boom"), dead("boom (attempt 1 of 1)")),
            ("within the max age it retries",
                aged, job(3, 25, 50), JobError::msg("boom"), retry(4, "boom")),
            ("a next try exactly at the max age still retries",
                aged, job(3, 25, 56), JobError::msg("boom"), retry(4, "boom")),
            ("a next try past the max age is abandoned",
                aged, job(3, 25, 57), JobError::msg("boom"), abandoned("boom")),
            ("the max age applies to retry-after as well",
                aged, job(1, 25, 0), JobError::retry_after(Duration::from_secs(61)),
                abandoned("retry requested after 61s")),
            ("the last attempt is reported before the max age",
                aged, job(25, 25, 3600), JobError::msg("boom"), dead("boom (attempt 25 of 25)")),
        ];
        for (case, policy, job, err, expected) in table {
            assert_eq!(policy.outcome(&job, &err, now()), expected, "{case}");
        }
    }

    #[test]
    fn outcome_spreads_a_retryable_delay_by_the_jitter() {
        let p = RetryPolicy::default();
        for _ in 0..100 {
            match p.outcome(&job(3, 25, 0), &JobError::msg("boom"), now()) {
                Outcome::Retry { delay, error } => {
                    assert!((3.6..=4.4).contains(&delay.as_secs_f64()), "{delay:?}");
                    assert_eq!(error, "boom");
                }
                other => panic!("expected a retry, got {other:?}"),
            }
        }
    }

    #[test]
    fn outcome_does_not_jitter_a_retry_after() {
        let p = RetryPolicy::default();
        for _ in 0..100 {
            let err = JobError::retry_after(Duration::from_millis(1500));
            assert_eq!(
                p.outcome(&job(3, 25, 0), &err, now()),
                Outcome::Retry {
                    delay: Duration::from_millis(1500),
                    error: "retry requested after 1.5s".into(),
                }
            );
        }
    }

    #[test]
    fn outcome_measures_the_max_age_from_now() {
        let p = RetryPolicy::abp();
        let j = job(1, 1000, 0);
        let err = JobError::msg("boom");
        // The first wait is 60 s: fine at enqueue time, too late 2 days later.
        assert_eq!(p.outcome(&j, &err, now()), retry(60, "boom"));
        let later = now() + chrono::Duration::seconds(172_800 - 59);
        assert!(matches!(p.outcome(&j, &err, later), Outcome::Dead { .. }));
    }
}
