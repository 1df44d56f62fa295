//! When a periodic worker runs: [`Schedule`] (every period, or a cron expression in a
//! timezone with the `cron` feature) and `CronSchedule`, the parsed cron expression.

use std::fmt;
#[cfg(feature = "cron")]
use std::sync::Arc;
use std::time::Duration;

/// When a [`PeriodicWorker`](crate::PeriodicWorker) runs.
#[derive(Clone)]
pub enum Schedule {
    /// Every `period`, measured from the end of the previous run (never overlapping).
    Every {
        /// The pause between the end of one run and the start of the next.
        period: Duration,
        /// Run once right at start, before the first pause.
        run_on_start: bool,
    },
    /// On a cron expression in a timezone. A tick that falls in a DST gap runs at the first
    /// valid time after it (a daily 02:30 runs at 03:00 on the day clocks go forward), a tick in
    /// a DST overlap runs once (at its first occurrence), and ticks missed while a run was still
    /// going are not replayed.
    #[cfg(feature = "cron")]
    Cron(CronSchedule),
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Every {
                period,
                run_on_start,
            } => f
                .debug_struct("Every")
                .field("period", period)
                .field("run_on_start", run_on_start)
                .finish(),
            #[cfg(feature = "cron")]
            Schedule::Cron(c) => f.debug_tuple("Cron").field(&c.expr).field(&c.tz).finish(),
        }
    }
}

impl Schedule {
    /// Every `period`, the first run one period after start.
    pub fn every(period: Duration) -> Self {
        Schedule::Every {
            period,
            run_on_start: false,
        }
    }

    /// Every `period`, the first run at start.
    pub fn every_from_start(period: Duration) -> Self {
        Schedule::Every {
            period,
            run_on_start: true,
        }
    }

    /// A cron expression (5 fields, or 6 with seconds first) in a timezone.
    ///
    /// ```
    /// use backline_core::Schedule;
    /// let nightly = Schedule::cron("30 2 * * *", chrono_tz::Europe::Istanbul).unwrap();
    /// assert!(Schedule::cron("not cron", chrono_tz::UTC).is_err());
    /// # let _ = nightly;
    /// ```
    #[cfg(feature = "cron")]
    pub fn cron(expr: &str, tz: chrono_tz::Tz) -> crate::Result<Self> {
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build();
        let cron = parser
            .parse(expr)
            .map_err(|e| crate::Error::Config(format!("cron expression `{expr}`: {e}")))?;
        Ok(Schedule::Cron(CronSchedule {
            expr: expr.to_owned(),
            cron: Arc::new(cron),
            tz,
        }))
    }

    /// How long from `now` until the next run, or `None` if there is none.
    pub(super) fn next_delay(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        first: bool,
    ) -> Option<Duration> {
        match self {
            Schedule::Every {
                period,
                run_on_start,
            } => Some(if first && *run_on_start {
                Duration::ZERO
            } else {
                *period
            }),
            #[cfg(feature = "cron")]
            Schedule::Cron(c) => c
                .next_after(now)
                .map(|next| (next - now).to_std().unwrap_or(Duration::ZERO)),
        }
    }
}

/// A parsed cron schedule with its timezone.
#[cfg(feature = "cron")]
#[derive(Clone)]
pub struct CronSchedule {
    expr: String,
    cron: Arc<croner::Cron>,
    tz: chrono_tz::Tz,
}

#[cfg(feature = "cron")]
impl CronSchedule {
    /// The next tick strictly after `after`.
    pub fn next_after(
        &self,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }
}
