//! Reading what the scripts return: reply values, and a job hash into a [`Job`], checking every
//! field as the scripts do ([`parse_job`]).

use super::*;

/// Reads script replies.
pub(crate) fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(crate) fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

pub(crate) fn array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

/// The hash fields of a job, in the order of the scripts' `F` (a row is the id, then these).
pub(crate) const FIELDS: [&str; 13] = [
    "name", "queue", "payload", "pri", "state", "att", "max", "tmo", "enq", "run", "err", "lease",
    "fin",
];

/// A part of a stored job that is missing or holds a value Backline never writes there (a
/// hash rewritten by hand, by a migration script or by another client).
#[derive(Debug)]
pub(crate) struct BadField {
    /// Where the value is: `field NAME` for a hash field, or `id in the key`.
    pub(crate) field: String,
    /// What is wrong with the value, quoting it.
    pub(crate) problem: String,
}

impl BadField {
    pub(crate) fn new(field: &str, problem: impl Into<String>) -> Self {
        BadField {
            field: format!("field {field}"),
            problem: problem.into(),
        }
    }

    /// The typed error of `get`, and what `list` and the claim log: `job` is the id as stored.
    pub(crate) fn error(&self, job: &str) -> Error {
        Error::Undecodable {
            backend: NAME,
            job: job.to_owned(),
            field: self.field.clone(),
            problem: self.problem.clone(),
        }
    }

    /// The `err` of a job made dead for this, worded as the scripts' `kill` words it.
    pub(crate) fn reason(&self) -> String {
        format!(
            "the stored job cannot be read: {}: {}",
            self.field, self.problem
        )
    }
}

/// A stored value quoted for a message: its first 64 bytes (as the scripts quote it), as text.
pub(crate) fn quoted(b: &[u8]) -> String {
    if b.len() > 64 {
        format!("'{}…'", String::from_utf8_lossy(&b[..64]))
    } else {
        format!("'{}'", String::from_utf8_lossy(b))
    }
}

/// An integer as the scripts store it: an optional minus and 1 to 15 digits (exact in a Lua
/// double). The same rule as `problem` in the scripts' prelude.
pub(crate) fn stored_int(b: &[u8]) -> Option<i64> {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// A job from a row `[id, FIELDS…]` (an `HMGET` of [`FIELDS`] after the id), or the first part
/// that does not read.
///
/// The rules are those of the scripts' prelude (keep the two in step): integers as
/// [`stored_int`] reads them, the priority within the five levels (5 to 25), attempts from 0,
/// at least one attempt allowed, time-out not negative; the time-out, lease and finish time may
/// be absent or empty; name, queue, payload and state must be present, the state one of the six.
/// Nothing is clamped or defaulted: a value out of its range is reported, not hidden.
pub(crate) fn parse_job(v: &[Value]) -> Result<Job, BadField> {
    // Index `i` of the row is FIELDS[i - 1]; `None` for an absent field.
    let at = |i: usize| v.get(i).and_then(bytes);
    let name = |i: usize| {
        i.checked_sub(1)
            .and_then(|j| FIELDS.get(j))
            .copied()
            .unwrap_or("id")
    };
    let present = |i: usize| at(i).ok_or_else(|| BadField::new(name(i), "missing"));
    let number = |b: &[u8], i: usize| {
        stored_int(b)
            .ok_or_else(|| BadField::new(name(i), format!("{} is not a number", quoted(b))))
    };
    let ranged = |i: usize, lo: i64, hi: i64| {
        let b = present(i)?;
        let n = number(b, i)?;
        if n < lo || n > hi {
            return Err(BadField::new(
                name(i),
                format!("{} is out of range ({lo} to {hi})", quoted(b)),
            ));
        }
        Ok(n)
    };
    let optional = |i: usize| match at(i) {
        None | Some(b"") => Ok(None),
        Some(b) => number(b, i).map(Some),
    };
    let to_time = |i: usize, ms: i64| {
        DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| BadField::new(name(i), format!("{ms} ms is out of range as a time")))
    };
    let required_time = |i: usize| {
        let b = present(i)?;
        to_time(i, number(b, i)?)
    };
    let optional_time = |i: usize| optional(i)?.map(|ms| to_time(i, ms)).transpose();
    let text_of = |i: usize| present(i).map(|b| String::from_utf8_lossy(b).into_owned());

    let id = at(0).unwrap_or_default();
    let id = std::str::from_utf8(id)
        .ok()
        .and_then(|s| s.parse::<uuid::Uuid>().ok())
        .ok_or_else(|| BadField {
            field: "id in the key".to_owned(),
            problem: format!("{} is not a UUID", quoted(id)),
        })?;
    let state = text_of(5)?;
    let state = JobState::parse(&state).ok_or_else(|| {
        BadField::new(
            "state",
            format!("{} is not a job state", quoted(state.as_bytes())),
        )
    })?;
    let levels = i64::from(Priority::Low.value())..=i64::from(Priority::High.value());
    let priority = ranged(4, *levels.start(), *levels.end())?;
    let timeout = match optional(8)? {
        None => None,
        Some(ms) if ms >= 0 => Some(Duration::from_millis(ms.unsigned_abs())),
        Some(_) => {
            let b = at(8).unwrap_or_default();
            return Err(BadField::new("tmo", format!("{} is below 0", quoted(b))));
        }
    };
    let u32_max = i64::from(u32::MAX);
    let mut job = Job::new(
        JobId::from_uuid(id),
        text_of(1)?,
        text_of(2)?,
        present(3)?.to_vec(),
    );
    job.priority = Priority::from_value(i16::try_from(priority).unwrap_or_default());
    job.state = state;
    job.attempt = u32::try_from(ranged(6, 0, u32_max)?).unwrap_or_default();
    job.max_attempts = u32::try_from(ranged(7, 1, u32_max)?).unwrap_or(1);
    job.timeout = timeout;
    job.enqueued_at = required_time(9)?;
    job.run_at = required_time(10)?;
    job.last_error = at(11).map(|b| String::from_utf8_lossy(b).into_owned());
    job.lease_until = optional_time(12)?;
    job.finished_at = optional_time(13)?;
    Ok(job)
}
