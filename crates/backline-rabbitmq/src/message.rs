//! A job as an AMQP message: the body is the encoded arguments alone; the rest travels in the
//! message's properties, with headers only for what differs from a fresh job's defaults.
//!
//! # Why so few headers
//!
//! The broker stores every byte of a persistent message's properties, and on this kind of
//! machine that is what a confirmed publish costs: in the bench, a `null` body with the ten
//! fields in properties and seven `x-backline-*` headers (about 250 bytes) published at
//! 55–65 % of the bare message's rate, one long-string header alone cost as much, and a
//! 100-byte body cost 20 %. So a fresh job travels in the standard properties, which any AMQP
//! tool shows:
//!
//! | field | where |
//! |---|---|
//! | id | `message_id` (a UUID) |
//! | job name | `type` |
//! | queue | the queue the message is in (never a header) |
//! | priority | `priority` (1–5) |
//! | enqueue time | `timestamp` (seconds), refined to the millisecond by the id's UUIDv7 time when the two agree within a second |
//! | run at | the enqueue time |
//!
//! A header is added only where the reader's default would be wrong: an attempt count above
//! zero, a max attempts other than [`DEFAULT_MAX_ATTEMPTS`] (25, [`RetryPolicy`]'s default), a
//! time limit, a run time other than the enqueue time (a delay or a retry), an enqueue time the
//! id cannot refine, the last error and the time of death. Retries and dead letters are the
//! rare case; they pay for it.
//!
//! Messages of the earlier format (every field in headers) are read as before; a process of
//! that earlier version, though, reads a delayed job of this format as foreign: upgrade every
//! process of a deployment together.

use std::time::Duration;

#[cfg(doc)]
use backline_core::RetryPolicy;
use backline_core::{Job, JobId, JobState, NewJob, Priority};
use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

pub(crate) const H_ID: &str = "x-backline-id";
pub(crate) const H_NAME: &str = "x-backline-name";
pub(crate) const H_QUEUE: &str = "x-backline-queue";
pub(crate) const H_ATTEMPT: &str = "x-backline-attempt";
pub(crate) const H_MAX_ATTEMPTS: &str = "x-backline-max-attempts";
pub(crate) const H_TIMEOUT_MS: &str = "x-backline-timeout-ms";
pub(crate) const H_ENQUEUED_AT: &str = "x-backline-enqueued-at";
pub(crate) const H_RUN_AT: &str = "x-backline-run-at";
pub(crate) const H_ERROR: &str = "x-backline-error";
pub(crate) const H_DIED_AT: &str = "x-backline-died-at";

/// The longest error text a message carries in [`H_ERROR`]: the whole header block of a
/// message must fit in one AMQP frame (131,072 bytes by default), and a broker that receives a
/// larger one closes the whole connection (every lease of the handle with it).
pub(crate) const MAX_ERROR_BYTES: usize = 4096;

/// What a cut error text ends with.
const TRUNCATED: &str = "… (truncated)";

/// `error` cut to at most [`MAX_ERROR_BYTES`] bytes (at a character boundary), marked as cut.
pub(crate) fn truncate_error(error: &str) -> String {
    if error.len() <= MAX_ERROR_BYTES {
        return error.to_owned();
    }
    let mut end = MAX_ERROR_BYTES - TRUNCATED.len();
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{TRUNCATED}", &error[..end])
}

/// The attempts a message without Backline's marks gets (e.g. one published by ABP): ABP's
/// default policy gives 12.
pub(crate) const FOREIGN_MAX_ATTEMPTS: u32 = 12;

/// The attempts a Backline message without [`H_MAX_ATTEMPTS`] has. Part of the message
/// format (queued messages keep their meaning whatever a later version's default): it is
/// [`RetryPolicy`]'s default today, so most jobs need no header for it.
pub(crate) const DEFAULT_MAX_ATTEMPTS: u32 = 25;

/// The time in a UUIDv7 id, to the millisecond.
fn id_time(id: JobId) -> Option<DateTime<Utc>> {
    let (secs, nanos) = id.as_uuid().get_timestamp()?.to_unix();
    let ms = i64::try_from(secs).ok()?.checked_mul(1000)? + i64::from(nanos / 1_000_000);
    DateTime::from_timestamp_millis(ms)
}

/// The enqueue time a reader derives from the id and the `timestamp` property (seconds): the
/// id's UUIDv7 time (milliseconds) when it lies within a second of the timestamp, else the
/// timestamp itself.
fn derived_enqueued_at(id: JobId, timestamp: Option<u64>) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(timestamp?).ok()?;
    let coarse = DateTime::from_timestamp(secs, 0)?;
    match id_time(id) {
        Some(t) if (t - coarse).num_milliseconds().abs() < 1000 => Some(t),
        _ => Some(coarse),
    }
}

/// What the headers say about a job.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) id: JobId,
    pub(crate) name: String,
    pub(crate) queue: String,
    /// Attempts started before this message was published.
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) priority: Priority,
    pub(crate) enqueued_at: DateTime<Utc>,
    pub(crate) run_at: DateTime<Utc>,
    pub(crate) last_error: Option<String>,
    pub(crate) died_at: Option<DateTime<Utc>>,
}

/// ABP's five levels onto the AMQP priorities 1–5 (`x-max-priority = 5`).
pub(crate) fn amqp_priority(p: Priority) -> u8 {
    match p {
        Priority::Low => 1,
        Priority::BelowNormal => 2,
        Priority::Normal => 3,
        Priority::AboveNormal => 4,
        Priority::High => 5,
    }
}

fn from_amqp_priority(p: Option<u8>) -> Priority {
    match p {
        Some(0 | 1) => Priority::Low,
        Some(2) => Priority::BelowNormal,
        Some(4) => Priority::AboveNormal,
        Some(5..) => Priority::High,
        _ => Priority::Normal,
    }
}

fn micros(t: DateTime<Utc>) -> AMQPValue {
    AMQPValue::LongLongInt(t.timestamp_micros())
}

fn int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(x) => Some(i64::from(*x)),
        AMQPValue::ShortShortUInt(x) => Some(i64::from(*x)),
        AMQPValue::ShortInt(x) => Some(i64::from(*x)),
        AMQPValue::ShortUInt(x) => Some(i64::from(*x)),
        AMQPValue::LongInt(x) => Some(i64::from(*x)),
        AMQPValue::LongUInt(x) => Some(i64::from(*x)),
        AMQPValue::LongLongInt(x) => Some(*x),
        AMQPValue::Timestamp(x) => i64::try_from(*x).ok(),
        _ => None,
    }
}

fn text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The time of the newest `x-death` record the broker added when it dead-lettered a message
/// (AMQP timestamps are seconds).
fn death_time(h: &std::collections::BTreeMap<ShortString, AMQPValue>) -> Option<DateTime<Utc>> {
    let AMQPValue::FieldArray(deaths) = h.get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    let secs = first.inner().get("time").and_then(int)?;
    DateTime::from_timestamp(secs, 0)
}

fn time(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.and_then(DateTime::from_timestamp_micros)
}

impl Meta {
    /// A fresh job enqueued `now`, due at `run_at` (`None`: now).
    ///
    /// Its enqueue time is the one a reader derives from the id and the `timestamp` property
    /// (the id's time, to the millisecond, for a UUIDv7 minted up to a second before `now`),
    /// so that a fresh job needs no header for it.
    pub(crate) fn new(job: &NewJob, now: DateTime<Utc>, run_at: Option<DateTime<Utc>>) -> Self {
        // Never later than now: a job due now must not look due later (an id minted on a
        // host whose clock runs ahead).
        let enqueued_at = id_time(job.id)
            .filter(|t| *t <= now && (now - *t).num_milliseconds() < 1000)
            .unwrap_or(now);
        Meta {
            id: job.id,
            name: job.name.clone(),
            queue: job.queue.clone(),
            attempt: 0,
            max_attempts: job.max_attempts.max(1),
            timeout: job.timeout,
            priority: job.priority,
            enqueued_at,
            run_at: run_at.unwrap_or(enqueued_at),
            last_error: None,
            died_at: None,
        }
    }

    /// The `timestamp` property: the enqueue time in whole seconds (none before 1970).
    fn timestamp(&self) -> Option<u64> {
        u64::try_from(self.enqueued_at.timestamp()).ok()
    }

    /// The message properties: persistent, the priority, the id, the name, the enqueue time,
    /// and headers for what differs from a fresh job's defaults (see the module docs).
    pub(crate) fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        if self.attempt > 0 {
            h.insert(
                H_ATTEMPT.into(),
                AMQPValue::LongLongInt(i64::from(self.attempt)),
            );
        }
        if self.max_attempts != DEFAULT_MAX_ATTEMPTS {
            h.insert(
                H_MAX_ATTEMPTS.into(),
                AMQPValue::LongLongInt(i64::from(self.max_attempts)),
            );
        }
        if let Some(t) = self.timeout {
            h.insert(
                H_TIMEOUT_MS.into(),
                AMQPValue::LongLongInt(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        let timestamp = self.timestamp();
        if derived_enqueued_at(self.id, timestamp) != Some(self.enqueued_at) {
            h.insert(H_ENQUEUED_AT.into(), micros(self.enqueued_at));
        }
        if self.run_at != self.enqueued_at {
            h.insert(H_RUN_AT.into(), micros(self.run_at));
        }
        if let Some(e) = &self.last_error {
            h.insert(
                H_ERROR.into(),
                AMQPValue::LongString(truncate_error(e).into()),
            );
        }
        if let Some(t) = self.died_at {
            h.insert(H_DIED_AT.into(), micros(t));
        }
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(amqp_priority(self.priority))
            .with_message_id(ShortString::from(self.id.to_string()));
        // The reader takes a `type` for a job name only if it is a valid one (see
        // `from_delivery`); any other name (none Backline declares a queue for) goes in a
        // header, as `type` could not hold one over 255 bytes anyway.
        if crate::config::check_job_name(&self.name).is_ok() {
            props = props.with_type(ShortString::from(self.name.clone()));
        } else {
            h.insert(
                H_NAME.into(),
                AMQPValue::LongString(self.name.clone().into()),
            );
        }
        if let Some(t) = timestamp {
            props = props.with_timestamp(t);
        }
        if !h.inner().is_empty() {
            props = props.with_headers(h);
        }
        props
    }

    /// Reads a delivery from `queue` (the Backline queue whose work, wait, landing or dead
    /// queue it came from).
    ///
    /// The name is the `x-backline-name` header (older messages), else `name` (the job name
    /// of the work queue it came from), else the `type` property. A message that is not
    /// Backline's (another publisher, e.g. ABP: no `type`) in a work queue of `name` becomes
    /// a fresh job of that name: a new id (or its `message_id` if that is a UUID), attempt 0
    /// and [`FOREIGN_MAX_ATTEMPTS`]. Without a name (a foreign message in a wait, landing or
    /// dead queue) it is `None`.
    pub(crate) fn from_delivery(
        props: &BasicProperties,
        queue: &str,
        name: Option<&str>,
    ) -> Option<Meta> {
        let empty = FieldTable::default();
        let h = props.headers().as_ref().unwrap_or(&empty).inner();
        let get_int = |k: &str| h.get(k).and_then(int);
        let get_text = |k: &str| h.get(k).and_then(text);
        let now = Utc::now();
        // Another publisher's `type` (MassTransit and others set one) that is no job name
        // Backline could have written marks a foreign message.
        let kind = props
            .kind()
            .as_ref()
            .map(|k| k.as_str().to_owned())
            .filter(|k| crate::config::check_job_name(k).is_ok());
        let ours = kind.is_some() || h.contains_key(H_NAME);
        let parsed_id = get_text(H_ID)
            .or_else(|| props.message_id().as_ref().map(|m| m.as_str().to_owned()))
            .and_then(|s| s.parse::<JobId>().ok());
        let name = get_text(H_NAME)
            .or_else(|| name.map(str::to_owned))
            .or(kind)?;
        let id = parsed_id.unwrap_or_default();
        let default_max = if ours {
            DEFAULT_MAX_ATTEMPTS
        } else {
            FOREIGN_MAX_ATTEMPTS
        };
        let clamp =
            |v: Option<i64>, default: u32| v.and_then(|x| u32::try_from(x).ok()).unwrap_or(default);
        let max_attempts = clamp(get_int(H_MAX_ATTEMPTS), default_max).max(1);
        // Headers are outside input: an attempt count past the limit is the limit (a dead
        // letter carries exactly the limit), never a number that overflows when counted on.
        let attempt = clamp(get_int(H_ATTEMPT), 0).min(max_attempts);
        let enqueued_at = time(get_int(H_ENQUEUED_AT))
            .or_else(|| derived_enqueued_at(id, *props.timestamp()))
            .unwrap_or(now);
        Some(Meta {
            id,
            name,
            queue: get_text(H_QUEUE).unwrap_or_else(|| queue.to_owned()),
            attempt,
            max_attempts,
            timeout: get_int(H_TIMEOUT_MS)
                .and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis),
            priority: from_amqp_priority(*props.priority()),
            enqueued_at,
            run_at: time(get_int(H_RUN_AT)).unwrap_or(enqueued_at),
            last_error: get_text(H_ERROR),
            // A message the broker dead-lettered itself (a quorum queue's delivery limit)
            // carries no death time of ours: the broker's `x-death` record has one.
            died_at: time(get_int(H_DIED_AT)).or_else(|| death_time(h)),
        })
    }

    /// The job as the core sees it.
    pub(crate) fn to_job(
        &self,
        payload: Vec<u8>,
        state: JobState,
        attempt: u32,
        lease_until: Option<DateTime<Utc>>,
    ) -> Job {
        let mut job = Job::new(self.id, self.name.clone(), self.queue.clone(), payload);
        job.priority = self.priority;
        job.state = state;
        job.attempt = attempt;
        job.max_attempts = self.max_attempts;
        job.timeout = self.timeout;
        job.enqueued_at = self.enqueued_at;
        job.run_at = self.run_at;
        job.last_error = self.last_error.clone();
        job.lease_until = lease_until;
        job.finished_at = self.died_at;
        job
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        let job = NewJob::new("email", b"{}".to_vec())
            .with_id(JobId::new())
            .with_queue("mail")
            .with_priority(Priority::AboveNormal)
            .with_max_attempts(7)
            .with_timeout(Some(Duration::from_millis(1500)));
        let now = Utc::now();
        let run_at = now + chrono::Duration::seconds(5);
        let mut m = Meta::new(&job, now, Some(run_at));
        m.attempt = 3;
        m.last_error = Some("boom".into());
        let back = Meta::from_delivery(&m.properties(), "mail", None).expect("meta");
        assert_eq!(back.id, job.id);
        assert_eq!((back.name.as_str(), back.queue.as_str()), ("email", "mail"));
        assert_eq!((back.attempt, back.max_attempts), (3, 7));
        assert_eq!(back.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(back.priority, Priority::AboveNormal);
        assert_eq!(back.last_error.as_deref(), Some("boom"));
        assert_eq!(back.run_at.timestamp_micros(), run_at.timestamp_micros());
        assert_eq!(back.enqueued_at, m.enqueued_at);
    }

    fn fresh(id: JobId, max_attempts: u32) -> NewJob {
        NewJob::new("email", b"null".to_vec())
            .with_id(id)
            .with_queue("mail")
            .with_max_attempts(max_attempts)
    }

    /// A UUIDv7 id minted at `t`.
    fn v7_at(t: DateTime<Utc>) -> JobId {
        let ts = uuid::Timestamp::from_unix(
            uuid::NoContext,
            u64::try_from(t.timestamp()).expect("after 1970"),
            t.timestamp_subsec_nanos(),
        );
        JobId::from_uuid(uuid::Uuid::new_v7(ts))
    }

    #[test]
    fn a_fresh_job_travels_without_headers() {
        let now = Utc::now();
        let job = fresh(v7_at(now - chrono::Duration::milliseconds(3)), 25);
        let m = Meta::new(&job, now, None);
        let props = m.properties();
        assert_eq!(props.headers(), &None);
        assert_eq!(props.kind().as_ref().map(|k| k.as_str()), Some("email"));
        let back = Meta::from_delivery(&props, "mail", None).expect("meta");
        assert_eq!((back.id, back.name.as_str()), (job.id, "email"));
        assert_eq!((back.attempt, back.max_attempts), (0, 25));
        assert_eq!(back.timeout, None);
        // The enqueue time is the id's, to the millisecond, and the job is due then.
        assert_eq!(back.enqueued_at, m.enqueued_at);
        assert_eq!(
            back.enqueued_at.timestamp_millis(),
            (now - chrono::Duration::milliseconds(3)).timestamp_millis()
        );
        assert_eq!(back.run_at, back.enqueued_at);
        // Read again after a retry: still the same job, now with headers for what changed.
        let mut retried = back.clone();
        retried.attempt = 1;
        retried.run_at = back.enqueued_at + chrono::Duration::seconds(2);
        let again = Meta::from_delivery(&retried.properties(), "mail", None).expect("meta");
        assert_eq!((again.attempt, again.run_at), (1, retried.run_at));
        assert_eq!(again.enqueued_at, m.enqueued_at);
    }

    #[test]
    fn an_id_that_is_not_uuidv7_keeps_its_exact_enqueue_time() {
        // A v4-like id carries no time: the enqueue time travels in a header, to the µs.
        let job = fresh(JobId::from_uuid(uuid::Uuid::from_u128(0x1234_5678)), 3);
        let now = Utc::now();
        let m = Meta::new(&job, now, None);
        let props = m.properties();
        let h = props.headers().as_ref().expect("headers").inner();
        assert!(h.contains_key(H_ENQUEUED_AT) && h.contains_key(H_MAX_ATTEMPTS));
        let back = Meta::from_delivery(&props, "mail", Some("email")).expect("meta");
        assert_eq!(back.enqueued_at.timestamp_micros(), now.timestamp_micros());
        assert_eq!((back.run_at, back.max_attempts), (back.enqueued_at, 3));
    }

    #[test]
    fn an_id_minted_in_the_future_does_not_delay_its_job() {
        let now = Utc::now();
        let job = fresh(v7_at(now + chrono::Duration::milliseconds(500)), 25);
        let m = Meta::new(&job, now, None);
        assert_eq!((m.enqueued_at, m.run_at), (now, now));
        let back = Meta::from_delivery(&m.properties(), "mail", None).expect("meta");
        assert_eq!(back.run_at.timestamp_micros(), now.timestamp_micros());
        assert_eq!(back.enqueued_at, back.run_at);
    }

    #[test]
    fn the_earlier_all_headers_format_is_still_read() {
        let id = JobId::new();
        let text = |s: &str| AMQPValue::LongString(s.to_owned().into());
        let mut h = FieldTable::default();
        h.insert(H_ID.into(), text(&id.to_string()));
        h.insert(H_NAME.into(), text("email"));
        h.insert(H_QUEUE.into(), text("mail"));
        h.insert(H_ATTEMPT.into(), AMQPValue::LongLongInt(2));
        h.insert(H_MAX_ATTEMPTS.into(), AMQPValue::LongLongInt(25));
        h.insert(
            H_ENQUEUED_AT.into(),
            AMQPValue::LongLongInt(1_795_600_000_123_456),
        );
        h.insert(
            H_RUN_AT.into(),
            AMQPValue::LongLongInt(1_795_600_005_000_000),
        );
        h.insert(H_ERROR.into(), text("boom"));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(5)
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(id.to_string()))
            .with_timestamp(1_795_600_000)
            .with_headers(h);
        // In a wait queue: the name comes from the header.
        let m = Meta::from_delivery(&props, "mail", None).expect("meta");
        assert_eq!(
            (m.id, m.name.as_str(), m.queue.as_str()),
            (id, "email", "mail")
        );
        assert_eq!((m.attempt, m.max_attempts), (2, 25));
        assert_eq!(m.priority, Priority::High);
        assert_eq!(m.enqueued_at.timestamp_micros(), 1_795_600_000_123_456);
        assert_eq!(m.run_at.timestamp_micros(), 1_795_600_005_000_000);
        assert_eq!(m.last_error.as_deref(), Some("boom"));
    }

    #[test]
    fn another_publishers_type_is_no_job_name() {
        // A `type` Backline could not have written: foreign, so unknown in a wait queue.
        let props = BasicProperties::default().with_type("Some.Namespace:Message Type".into());
        assert!(Meta::from_delivery(&props, "default", None).is_none());
        let m = Meta::from_delivery(&props, "default", Some("email")).expect("meta");
        assert_eq!(
            (m.name.as_str(), m.max_attempts),
            ("email", FOREIGN_MAX_ATTEMPTS)
        );
    }

    #[test]
    fn a_name_too_long_for_type_travels_in_a_header() {
        let mut job = fresh(JobId::new(), 25);
        job.name = "n".repeat(300);
        let m = Meta::new(&job, Utc::now(), None);
        let props = m.properties();
        assert_eq!(props.kind(), &None);
        let back = Meta::from_delivery(&props, "mail", None).expect("meta");
        assert_eq!(back.name, job.name);
    }

    #[test]
    fn a_foreign_message_in_a_work_queue_is_a_fresh_job() {
        let props = BasicProperties::default();
        assert!(Meta::from_delivery(&props, "default", None).is_none());
        let m = Meta::from_delivery(&props, "default", Some("email")).expect("meta");
        assert_eq!((m.attempt, m.max_attempts), (0, FOREIGN_MAX_ATTEMPTS));
        assert_eq!(m.priority, Priority::Normal);
    }

    #[test]
    fn a_long_error_is_cut_at_a_char_boundary() {
        assert_eq!(truncate_error("short"), "short");
        // Multi-byte characters straddle the cut.
        let long = "é".repeat(100_000);
        let cut = truncate_error(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.ends_with(TRUNCATED));
        assert!(cut.starts_with("éé"));
    }

    #[test]
    fn a_huge_attempt_header_is_clamped() {
        let mut h = FieldTable::default();
        h.insert(
            H_ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(u32::MAX)),
        );
        h.insert(
            H_MAX_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(u32::MAX)),
        );
        let props = BasicProperties::default().with_headers(h);
        let m = Meta::from_delivery(&props, "default", Some("email")).expect("meta");
        assert_eq!(m.attempt, u32::MAX);
        let mut h = FieldTable::default();
        h.insert(
            H_ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(u32::MAX)),
        );
        let props = BasicProperties::default().with_headers(h);
        let m = Meta::from_delivery(&props, "default", Some("email")).expect("meta");
        assert_eq!(
            (m.attempt, m.max_attempts),
            (FOREIGN_MAX_ATTEMPTS, FOREIGN_MAX_ATTEMPTS)
        );
    }

    #[test]
    fn priorities_map_onto_one_to_five() {
        for p in Priority::ALL {
            assert_eq!(from_amqp_priority(Some(amqp_priority(p))), p);
        }
    }
}
