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
    /// let nightly = Schedule::cron("30 2 * * *", chrono_tz::Europe::Istanbul).expect("valid cron");
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
    #[cfg_attr(
        not(feature = "cron"),
        expect(unused_variables, reason = "only cron reads `now`")
    )]
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn every_waits_one_period_before_each_run() {
        let s = Schedule::every(Duration::from_secs(5));
        let now = utc(2026, 6, 1, 12, 0);
        assert_eq!(s.next_delay(now, true), Some(Duration::from_secs(5)));
        assert_eq!(s.next_delay(now, false), Some(Duration::from_secs(5)));
    }

    #[test]
    fn every_from_start_runs_at_once_then_every_period() {
        let s = Schedule::every_from_start(Duration::from_secs(5));
        let now = utc(2026, 6, 1, 12, 0);
        assert_eq!(s.next_delay(now, true), Some(Duration::ZERO));
        assert_eq!(s.next_delay(now, false), Some(Duration::from_secs(5)));
    }

    #[cfg(feature = "cron")]
    #[test]
    fn cron_waits_for_the_next_tick_in_its_timezone() {
        // 23:00 UTC is 02:00 in Istanbul (UTC+3): the 02:30 tick is half an hour away.
        let s = Schedule::cron("30 2 * * *", chrono_tz::Europe::Istanbul).expect("valid cron");
        let now = utc(2026, 6, 1, 23, 0);
        assert_eq!(s.next_delay(now, true), Some(Duration::from_secs(30 * 60)));
        assert_eq!(s.next_delay(now, false), Some(Duration::from_secs(30 * 60)));
        let six_fields =
            Schedule::cron("15 30 2 * * *", chrono_tz::Europe::Istanbul).expect("valid cron");
        assert_eq!(
            six_fields.next_delay(now, false),
            Some(Duration::from_secs(30 * 60 + 15))
        );
    }

    #[cfg(feature = "cron")]
    #[test]
    fn cron_ticks_across_daylight_saving_changes_as_documented() {
        let Schedule::Cron(daily) =
            Schedule::cron("30 2 * * *", chrono_tz::Europe::Berlin).expect("valid cron")
        else {
            unreachable!()
        };
        // 29 March 2026: Berlin's clocks jump from 02:00 to 03:00 (01:00 UTC); 02:30 does not
        // exist that day, so the tick runs at 03:00 local.
        assert_eq!(
            daily.next_after(utc(2026, 3, 29, 0, 0)),
            Some(utc(2026, 3, 29, 1, 0))
        );
        // 25 October 2026: 02:00 to 03:00 local happens twice (00:00 to 02:00 UTC); the tick
        // runs once, at the first 02:30 (00:30 UTC), and next on the following day.
        assert_eq!(
            daily.next_after(utc(2026, 10, 25, 0, 0)),
            Some(utc(2026, 10, 25, 0, 30))
        );
        assert_eq!(
            daily.next_after(utc(2026, 10, 25, 0, 30)),
            Some(utc(2026, 10, 26, 1, 30))
        );
    }
}
