//! What an operator does with a dead letter: look at it, apply it again (requeue) or
//! set it aside (drop). Both remove it from `dead_letters` only when done, and keep a
//! copy with what was done in `dead_letter_actions`.
//!
//! A message is dead-lettered in one of two ways, and is requeued accordingly:
//! - its handler failed for good (or its type had no handler). The stream's position
//!   moved past it, so that the stream did not stall, and later events of the stream
//!   may have been applied since. Requeue runs its handler now, in its own savepoint,
//!   and records it applied: **after** those later events, not in its place in the
//!   stream. Requeue it only once what it does no longer depends on that order (a
//!   handler fixed by an upgrade, a missing row created by hand).
//! - it was refused before its stream was looked at (not an event topic, too large,
//!   not a CloudEvent, source or stream not matching the topic, an event id seen at
//!   another place). Requeue takes it through the inbox's rules as if it had just
//!   arrived: applied if it is its stream's next event, recognised as a duplicate if
//!   the stream is past it, left where it is if it is ahead of a gap or refused again.

use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use super::inbox::{self, ApplyError, InboxContext, Isolation, Outcome};
use crate::clock::now_ms;
use crate::outbox::envelope::CloudEvent;
use crate::storage::DbError;

/// One dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its id in `dead_letters`.
    pub id: i64,
    /// The topic it came on.
    pub topic: String,
    /// Why it was refused.
    pub reason: String,
    /// Its producer and stream, when they could be read.
    pub source: Option<String>,
    /// The stream.
    pub stream: Option<String>,
    /// Its sequence number when its handler failed (the stream moved past it); None
    /// when it was refused before its stream was looked at.
    pub seq: Option<u64>,
    /// Its size as received.
    pub payload_len: u64,
    /// When it was refused (ms since the Unix epoch).
    pub received_at_ms: i64,
    /// The message as kept (at most its first 1 MiB), lossily as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

/// What a requeue did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Requeued {
    /// Applied now; the dead letter is gone (kept in `dead_letter_actions`).
    Applied,
    /// Its event had been applied already; the dead letter is gone.
    AlreadyApplied,
    /// Not applied, for `reason`; the dead letter stays.
    NotApplied {
        /// Why.
        reason: String,
    },
}

const COLUMNS: &str = "id, topic, reason, source, stream, seq, payload_len, received_at_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        id: r.get(0)?,
        topic: r.get(1)?,
        reason: r.get(2)?,
        source: r.get(3)?,
        stream: r.get(4)?,
        seq: r.get::<_, Option<i64>>(5)?.map(|s| s.max(0) as u64),
        payload_len: r.get::<_, i64>(6)?.max(0) as u64,
        received_at_ms: r.get(7)?,
        payload: None,
    })
}

/// How many dead letters there are (by the index on `received_at_ms`: cheap however
/// large the kept messages).
pub fn count(conn: &rusqlite::Connection) -> Result<u64, DbError> {
    let n: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM dead_letters")?
        .query_row([], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

/// Dead letters with an id above `after`, oldest first, at most `limit`.
pub fn list(
    conn: &rusqlite::Connection,
    after: i64,
    limit: u32,
) -> Result<Vec<DeadLetter>, DbError> {
    let sql = format!("SELECT {COLUMNS} FROM dead_letters WHERE id > ?1 ORDER BY id LIMIT ?2");
    let rows = conn
        .prepare(&sql)?
        .query_map(params![after, limit], row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// One dead letter with its payload, if it exists.
pub fn get(conn: &rusqlite::Connection, id: i64) -> Result<Option<DeadLetter>, DbError> {
    let sql = format!("SELECT {COLUMNS}, payload FROM dead_letters WHERE id = ?1");
    Ok(conn
        .query_row(&sql, [id], |r| {
            let mut d = row(r)?;
            d.payload = Some(String::from_utf8_lossy(&r.get::<_, Vec<u8>>(8)?).into_owned());
            Ok(d)
        })
        .optional()?)
}

/// Applies dead letter `id` again (see the module docs); None when there is no such
/// dead letter. A transient failure (the database busy) is an error: nothing changed.
pub fn requeue(
    tx: &Transaction,
    ctx: &InboxContext,
    id: i64,
) -> Result<Option<Requeued>, ApplyError> {
    let found: Option<(String, Vec<u8>, i64, Option<i64>)> = tx
        .query_row(
            "SELECT topic, payload, payload_len, seq FROM dead_letters WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(DbError::from)?;
    let Some((topic, payload, payload_len, seq)) = found else {
        return Ok(None);
    };
    let not_applied = |reason: String| Ok(Some(Requeued::NotApplied { reason }));
    if payload_len > payload.len() as i64 {
        return not_applied(format!(
            "only the first {} of its {payload_len} bytes were kept",
            payload.len()
        ));
    }
    let result = match seq {
        Some(seq) => requeue_failed_handler(tx, ctx, &payload, seq.max(0) as u64)?,
        None => requeue_refused(tx, ctx, &topic, &payload)?,
    };
    match &result {
        Requeued::Applied => record(tx, id, "requeued", "applied", None)?,
        Requeued::AlreadyApplied => record(tx, id, "requeued", "already_applied", None)?,
        Requeued::NotApplied { .. } => {}
    }
    Ok(Some(result))
}

/// A message whose handler failed: the stream is past it; run its handler now.
fn requeue_failed_handler(
    tx: &Transaction,
    ctx: &InboxContext,
    payload: &[u8],
    seq: u64,
) -> Result<Requeued, ApplyError> {
    let (event, _) = match CloudEvent::parse(payload) {
        Ok(parsed) => parsed,
        Err(reason) => return Ok(Requeued::NotApplied { reason }),
    };
    let outcome: Option<String> = tx
        .query_row(
            "SELECT outcome FROM inbox WHERE event_id = ?1",
            [&event.id],
            |r| r.get(0),
        )
        .optional()
        .map_err(DbError::from)?;
    if outcome.as_deref() == Some("applied") {
        return Ok(Requeued::AlreadyApplied);
    }
    // Retention may have deleted its inbox record; then its place must still be free.
    // An event without an epoch was recorded in the epoch its stream followed.
    let key = super::inbox::StreamKey {
        source: event.source.clone(),
        stream: event.stream.clone(),
    };
    let epoch = match &event.epoch {
        Some(e) => e.clone(),
        None => inbox::stream_state(tx, &key)?.1.unwrap_or_default(),
    };
    if outcome.is_none() {
        let taken: Option<String> = tx
            .query_row(
                "SELECT event_id FROM inbox WHERE source = ?1 AND stream = ?2 AND epoch = ?3 AND seq = ?4",
                params![event.source, event.stream, epoch, seq as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(DbError::from)?;
        if let Some(other) = taken {
            return Ok(Requeued::NotApplied {
                reason: format!("another event ({other}) is recorded at its place, sequence {seq}"),
            });
        }
    }
    let Some(handler) = ctx.handlers.get(&event.event_type) else {
        let reason = format!("still no handler for event type {:?}", event.event_type);
        return Ok(Requeued::NotApplied { reason });
    };
    match inbox::run_handler(tx, handler, &event, Isolation::PerHandler)? {
        Ok(()) => {}
        Err(inbox::HandlerError::Permanent(reason)) => {
            return Ok(Requeued::NotApplied {
                reason: format!("its handler fails again: {reason}"),
            })
        }
        Err(inbox::HandlerError::Transient(reason)) => {
            return Err(ApplyError::Db(DbError::Commit {
                code: None,
                message: format!("transient failure, nothing changed: {reason}"),
            }))
        }
    }
    // Its inbox record says dead_lettered (or retention deleted it): now applied.
    tx.execute(
        "INSERT INTO inbox (event_id, source, stream, epoch, seq, event_type, outcome, applied_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'applied', ?7)
         ON CONFLICT (event_id) DO UPDATE SET outcome = 'applied', applied_at_ms = excluded.applied_at_ms",
        params![event.id, event.source, event.stream, epoch, seq as i64, event.event_type, now_ms()],
    )
    .map_err(DbError::from)?;
    Ok(Requeued::Applied)
}

/// A message refused before its stream was looked at: through the inbox again.
fn requeue_refused(
    tx: &Transaction,
    ctx: &InboxContext,
    topic: &str,
    payload: &[u8],
) -> Result<Requeued, ApplyError> {
    tx.execute_batch("SAVEPOINT requeue")
        .map_err(DbError::from)?;
    let message = [(topic.to_owned(), bytes::Bytes::copy_from_slice(payload))];
    let outcome = inbox::apply_batch(tx, ctx, &message, Isolation::PerHandler);
    let result = match outcome {
        Err(e) => Err(e),
        Ok(mut outcomes) => Ok(match outcomes.pop() {
            Some(Outcome::Applied { .. }) => Requeued::Applied,
            Some(Outcome::AppliedBefore { .. }) => Requeued::AlreadyApplied,
            // The stream is past it: applied already only if the inbox holds this very
            // event there.
            Some(Outcome::Duplicate { key, seq }) => {
                if recorded_at(tx, payload, &key, seq)? {
                    Requeued::AlreadyApplied
                } else {
                    Requeued::NotApplied {
                        reason: format!(
                            "{key} is past sequence {seq}, and the inbox does not hold this event there (another event, or a record deleted by retention)"
                        ),
                    }
                }
            }
            Some(Outcome::DeadLettered { reason, .. }) => Requeued::NotApplied {
                reason: format!("refused again: {reason}"),
            },
            Some(Outcome::Ahead { key, seq, position }) => Requeued::NotApplied {
                reason: format!(
                    "{key} sequence {seq} is ahead of the stream's position {position}: it comes with a replay"
                ),
            },
            Some(Outcome::OtherEpoch { key, seq }) => Requeued::NotApplied {
                reason: format!("{key} sequence {seq} is of an epoch of its producer that this consumer does not follow"),
            },
            Some(Outcome::Diverged { key, seq, applied_id }) => Requeued::NotApplied {
                reason: format!("{key} sequence {seq} was applied as another event ({applied_id})"),
            },
            Some(Outcome::Retry(reason)) => {
                return rollback_then(tx, Err(ApplyError::Db(DbError::Commit {
                    code: None,
                    message: format!("transient failure, nothing changed: {reason}"),
                })))
            }
            None => Requeued::NotApplied {
                reason: "the inbox returned no outcome".into(),
            },
        }),
    };
    // Keep what applying did only when it applied: a refusal would add a second dead
    // letter for the same message.
    match result {
        Ok(r @ (Requeued::Applied | Requeued::AlreadyApplied)) => {
            tx.execute_batch("RELEASE requeue").map_err(DbError::from)?;
            Ok(r)
        }
        other => rollback_then(tx, other),
    }
}

/// Undoes what the requeue wrote. If that fails too (SQLite already rolled the whole
/// transaction back, after a disk-full error say), the first error is the one to tell.
fn rollback_then<T>(tx: &Transaction, result: Result<T, ApplyError>) -> Result<T, ApplyError> {
    let undone = tx.execute_batch("ROLLBACK TO requeue; RELEASE requeue");
    match (result, undone) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(DbError::from(e).into()),
        (Ok(r), Ok(())) => Ok(r),
    }
}

/// True when the inbox records the event of `payload` at `key`'s sequence `seq`.
fn recorded_at(
    tx: &Transaction,
    payload: &[u8],
    key: &super::inbox::StreamKey,
    seq: u64,
) -> Result<bool, ApplyError> {
    let Ok((event, _)) = CloudEvent::parse(payload) else {
        return Ok(false);
    };
    let found = tx
        .query_row(
            "SELECT 1 FROM inbox WHERE event_id = ?1 AND source = ?2 AND stream = ?3 AND seq = ?4",
            params![event.id, key.source, key.stream, seq as i64],
            |_| Ok(()),
        )
        .optional()
        .map_err(DbError::from)?;
    Ok(found.is_some())
}

/// Sets dead letter `id` aside, with an optional note; false when there is no such
/// dead letter.
pub fn drop(tx: &Transaction, id: i64, note: Option<&str>) -> Result<bool, DbError> {
    let exists = tx
        .query_row("SELECT 1 FROM dead_letters WHERE id = ?1", [id], |_| Ok(()))
        .optional()?
        .is_some();
    if exists {
        record(tx, id, "dropped", "dropped", note)?;
    }
    Ok(exists)
}

/// Moves dead letter `id` to `dead_letter_actions` with what was done.
fn record(
    tx: &Transaction,
    id: i64,
    action: &str,
    result: &str,
    note: Option<&str>,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO dead_letter_actions (dead_letter_id, action, result, note, acted_at_ms,
             topic, payload, payload_len, reason, source, stream, seq, received_at_ms)
         SELECT id, ?2, ?3, ?4, ?5, topic, payload, payload_len, reason, source, stream, seq, received_at_ms
         FROM dead_letters WHERE id = ?1",
        params![id, action, result, note, now_ms()],
    )?;
    tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
    Ok(())
}
