//! A job as an AMQP message: the body is the encoded arguments alone; everything else travels
//! in headers, the priority as the AMQP priority.

use std::time::Duration;

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

/// The attempts a message without Backline headers gets (e.g. one published by ABP): ABP's
/// default policy gives 12.
pub(crate) const FOREIGN_MAX_ATTEMPTS: u32 = 12;

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
    pub(crate) fn new(job: &NewJob, now: DateTime<Utc>, run_at: DateTime<Utc>) -> Self {
        Meta {
            id: job.id,
            name: job.name.clone(),
            queue: job.queue.clone(),
            attempt: 0,
            max_attempts: job.max_attempts.max(1),
            timeout: job.timeout,
            priority: job.priority,
            enqueued_at: now,
            run_at,
            last_error: None,
            died_at: None,
        }
    }

    /// The message properties: persistent, the priority, the id and the headers.
    pub(crate) fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::default();
        h.insert(
            H_ID.into(),
            AMQPValue::LongString(self.id.to_string().into()),
        );
        h.insert(
            H_NAME.into(),
            AMQPValue::LongString(self.name.clone().into()),
        );
        h.insert(
            H_QUEUE.into(),
            AMQPValue::LongString(self.queue.clone().into()),
        );
        h.insert(
            H_ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(self.attempt)),
        );
        h.insert(
            H_MAX_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(self.max_attempts)),
        );
        if let Some(t) = self.timeout {
            h.insert(
                H_TIMEOUT_MS.into(),
                AMQPValue::LongLongInt(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        h.insert(H_ENQUEUED_AT.into(), micros(self.enqueued_at));
        h.insert(H_RUN_AT.into(), micros(self.run_at));
        if let Some(e) = &self.last_error {
            h.insert(
                H_ERROR.into(),
                AMQPValue::LongString(truncate_error(e).into()),
            );
        }
        if let Some(t) = self.died_at {
            h.insert(H_DIED_AT.into(), micros(t));
        }
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(amqp_priority(self.priority))
            .with_content_type("application/json".into())
            .with_message_id(ShortString::from(self.id.to_string()))
            .with_timestamp(u64::try_from(self.enqueued_at.timestamp()).unwrap_or(0))
            .with_headers(h)
    }

    /// Reads the headers of a delivery from `queue`.
    ///
    /// A message without Backline headers (another publisher, e.g. ABP) in a work queue of
    /// `name` becomes a fresh job of that name: a new id (or its `message_id` if that is a
    /// UUID), attempt 0 and [`FOREIGN_MAX_ATTEMPTS`]. Elsewhere (wait or dead queues, where
    /// the name is not known) it is `None`.
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
        let id = get_text(H_ID)
            .or_else(|| props.message_id().as_ref().map(|m| m.as_str().to_owned()))
            .and_then(|s| s.parse::<JobId>().ok());
        let header_name = get_text(H_NAME);
        let (id, name) = match (id, header_name, name) {
            (Some(id), Some(n), _) => (id, n),
            (id, None, Some(n)) | (id, Some(_), Some(n)) => (id.unwrap_or_default(), n.to_owned()),
            (_, _, None) => return None,
        };
        let clamp =
            |v: Option<i64>, default: u32| v.and_then(|x| u32::try_from(x).ok()).unwrap_or(default);
        let max_attempts = clamp(get_int(H_MAX_ATTEMPTS), FOREIGN_MAX_ATTEMPTS).max(1);
        // Headers are outside input: an attempt count past the limit is the limit (a dead
        // letter carries exactly the limit), never a number that overflows when counted on.
        let attempt = clamp(get_int(H_ATTEMPT), 0).min(max_attempts);
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
            enqueued_at: time(get_int(H_ENQUEUED_AT)).unwrap_or(now),
            run_at: time(get_int(H_RUN_AT)).unwrap_or(now),
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
        Job {
            id: self.id,
            name: self.name.clone(),
            queue: self.queue.clone(),
            payload,
            priority: self.priority,
            state,
            attempt,
            max_attempts: self.max_attempts,
            timeout: self.timeout,
            enqueued_at: self.enqueued_at,
            run_at: self.run_at,
            last_error: self.last_error.clone(),
            lease_until,
            finished_at: self.died_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backline_core::RunAt;

    #[test]
    fn headers_round_trip() {
        let job = NewJob {
            id: JobId::new(),
            name: "email".into(),
            queue: "mail".into(),
            payload: b"{}".to_vec(),
            priority: Priority::AboveNormal,
            run_at: RunAt::Now,
            max_attempts: 7,
            timeout: Some(Duration::from_millis(1500)),
        };
        let now = Utc::now();
        let mut m = Meta::new(&job, now, now);
        m.attempt = 3;
        m.last_error = Some("boom".into());
        let back = Meta::from_delivery(&m.properties(), "elsewhere", None).expect("meta");
        assert_eq!(back.id, job.id);
        assert_eq!((back.name.as_str(), back.queue.as_str()), ("email", "mail"));
        assert_eq!((back.attempt, back.max_attempts), (3, 7));
        assert_eq!(back.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(back.priority, Priority::AboveNormal);
        assert_eq!(back.last_error.as_deref(), Some("boom"));
        assert_eq!(back.run_at.timestamp_micros(), now.timestamp_micros());
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
