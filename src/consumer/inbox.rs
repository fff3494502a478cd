//! The inbox: applying received events exactly once, in stream order, inside one
//! SQLite transaction each. No I/O besides the caller's transaction; the MQTT side is
//! [`crate::consumer`].
//!
//! For one message, inside the batch's transaction:
//!
//! 1. Check it: an event topic, within the size limit, a CloudEvent whose `source`
//!    and `stream` match the topic, with a valid `sequence`. Otherwise it goes to
//!    `dead_letters` (raw bytes, topic, reason) and is acknowledged.
//! 2. Compare its sequence with the stream's position (last applied):
//!    `seq <= position` is a duplicate (no effect); `seq > position + 1` is ahead of a
//!    gap: not applied now, the gap is repaired by a replay (docs/recovery.md).
//! 3. `seq == position + 1`: run the handler for its type in a nested savepoint, record
//!    the event in `inbox` and advance the position. An unknown type or a handler's
//!    permanent error dead-letters the event *and* advances the position (the stream
//!    must not stall on it); a transient error (database busy) undoes everything for
//!    this message so that it is tried again.
//!
//! A savepoint per handler costs two statements and a copy of every page the handler
//! touches, for a failure that almost never happens. So the consumer first applies a
//! batch with [`Isolation::Optimistic`]: no savepoint per handler, and the first
//! handler that fails stops the batch with [`ApplyError::HandlerFailed`]; the caller's
//! savepoint undoes the whole batch, which is applied again with
//! [`Isolation::PerHandler`].
//!
//! The caller commits with FULL durability and only then acknowledges to the broker.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction};

use crate::clock::now_ms;
use crate::outbox::envelope::CloudEvent;
use crate::outbox::OutboxError;
use crate::protocol::Topics;
use crate::storage::DbError;

/// Bytes of a dead-lettered message kept at most; `payload_len` records its full size.
pub const DEAD_LETTER_KEEP_MAX_BYTES: usize = 1024 * 1024;

/// A handler's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// Will fail again however often it is retried (bad data, a broken invariant): the
    /// event is dead-lettered and the stream moves on.
    #[error("{0}")]
    Permanent(String),
    /// May succeed later (database busy or full): the event is retried.
    #[error("{0}")]
    Transient(String),
}

fn is_transient(code: Option<ErrorCode>) -> bool {
    matches!(
        code,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::DiskFull)
    )
}

impl From<rusqlite::Error> for HandlerError {
    fn from(e: rusqlite::Error) -> Self {
        if is_transient(e.sqlite_error_code()) {
            HandlerError::Transient(e.to_string())
        } else {
            HandlerError::Permanent(e.to_string())
        }
    }
}

impl From<DbError> for HandlerError {
    fn from(e: DbError) -> Self {
        if e.is_retryable() {
            HandlerError::Transient(e.to_string())
        } else {
            HandlerError::Permanent(e.to_string())
        }
    }
}

impl From<OutboxError> for HandlerError {
    fn from(e: OutboxError) -> Self {
        match e {
            OutboxError::Db(e) => e.into(),
            // The handler's own events wait for the broker like any other: try later.
            e @ OutboxError::BacklogFull { .. } => HandlerError::Transient(e.to_string()),
            other => HandlerError::Permanent(other.to_string()),
        }
    }
}

/// Applies one event type inside the consumer's transaction. It may write domain rows
/// and enqueue outbox events of its own through the same `&Transaction`.
pub type HandlerFn = dyn Fn(&Transaction, &CloudEvent) -> Result<(), HandlerError> + Send + Sync;

/// Handlers by event type.
#[derive(Clone, Default)]
pub struct Handlers {
    by_type: HashMap<String, Arc<HandlerFn>>,
}

impl Handlers {
    /// No handlers: every event would be dead-lettered as of an unknown type.
    pub fn new() -> Handlers {
        Handlers::default()
    }

    /// Adds the handler for `event_type`.
    pub fn on<F>(mut self, event_type: &str, f: F) -> Handlers
    where
        F: Fn(&Transaction, &CloudEvent) -> Result<(), HandlerError> + Send + Sync + 'static,
    {
        self.by_type.insert(event_type.to_owned(), Arc::new(f));
        self
    }
}

/// How handlers run inside a batch (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Each handler in a savepoint of its own: a failed handler's writes are undone and
    /// the batch goes on (the event is dead-lettered, or retried with the rest).
    PerHandler,
    /// No savepoint per handler: the first handler that fails or panics stops the
    /// batch with [`ApplyError::HandlerFailed`], leaving partial writes that the caller
    /// must undo (roll back the batch) before applying it again with `PerHandler`.
    Optimistic,
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    /// A database error; the batch was not applied.
    Db(#[from] DbError),
    /// Only with [`Isolation::Optimistic`].
    #[error("a handler failed in a batch applied without a savepoint per handler; roll the batch back and apply it again with one")]
    HandlerFailed,
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Db(e.into())
    }
}

/// What applying needs besides the transaction.
#[derive(Clone)]
pub struct InboxContext {
    /// The topic scheme, to check that a message came on an event topic.
    pub topics: Topics,
    /// How each event type is applied.
    pub handlers: Handlers,
    /// Messages larger than this are dead-lettered unread.
    pub payload_max_bytes: usize,
}

/// A stream of a producer, as the consumer tracks it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// The producer (its `--source`).
    pub source: String,
    /// The stream, as named by the producer.
    pub stream: String,
}

impl std::fmt::Display for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.source, self.stream)
    }
}

/// What happened to one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the stream's position is now `seq`.
    Applied {
        /// The stream.
        key: StreamKey,
        /// The sequence number applied.
        seq: u64,
        /// The event's CloudEvents `id`.
        event_id: String,
    },
    /// Already applied (`seq <= position`); no effect.
    Duplicate {
        /// The stream.
        key: StreamKey,
        /// The sequence number received.
        seq: u64,
    },
    /// Ahead of a gap (`seq > position + 1`); not applied.
    Ahead {
        /// The stream.
        key: StreamKey,
        /// The sequence number received.
        seq: u64,
        /// The stream's position (last applied) when it arrived.
        position: u64,
    },
    /// Stored in `dead_letters`. `advanced` is set when the message held the stream's
    /// next sequence number, which it has consumed.
    DeadLettered {
        /// Why it was refused.
        reason: String,
        /// The stream and the position it moved to, if it moved.
        advanced: Option<(StreamKey, u64)>,
    },
    /// A transient failure; nothing of this message was kept. It and every message
    /// after it in the batch must be tried again.
    Retry(String),
}

/// Applies `messages` (topic, payload) in order. Stops at
/// the first [`Outcome::Retry`], which is then the last outcome returned.
pub fn apply_batch(
    tx: &Transaction,
    ctx: &InboxContext,
    messages: &[(String, bytes::Bytes)],
    isolation: Isolation,
) -> Result<Vec<Outcome>, ApplyError> {
    // Positions are read once per stream and written once per batch, after every
    // message of it.
    let mut positions: HashMap<StreamKey, (u64, bool)> = HashMap::new();
    let mut outcomes = Vec::with_capacity(messages.len());
    for (topic, payload) in messages {
        // No savepoint per message: a message writes nothing before its handler, whose
        // own savepoint (or, in an optimistic pass, the rollback of the whole batch)
        // undoes it on failure; a database error fails the whole batch (the caller's
        // savepoint undoes it, and the batch is tried again).
        let outcome = apply_one(tx, ctx, &mut positions, topic, payload, isolation)?;
        let advanced = match &outcome {
            Outcome::Applied { key, seq, .. } => Some((key, *seq)),
            Outcome::DeadLettered {
                advanced: Some((key, seq)),
                ..
            } => Some((key, *seq)),
            _ => None,
        };
        if let Some((key, seq)) = advanced {
            // apply_one looked the stream's position up, so it is in the map.
            match positions.get_mut(key) {
                Some(p) => *p = (seq, true),
                None => {
                    positions.insert(key.clone(), (seq, true));
                }
            }
        }
        let stop = matches!(outcome, Outcome::Retry(_));
        outcomes.push(outcome);
        if stop {
            break;
        }
    }
    for (key, (position, dirty)) in &positions {
        if *dirty {
            set_position(tx, key, *position)?;
        }
    }
    Ok(outcomes)
}

fn apply_one(
    tx: &Transaction,
    ctx: &InboxContext,
    positions: &mut HashMap<StreamKey, (u64, bool)>,
    topic: &str,
    payload: &[u8],
    isolation: Isolation,
) -> Result<Outcome, ApplyError> {
    let Some((topic_source, topic_stream)) = ctx.topics.parse_events(topic) else {
        return dead_letter(
            tx,
            topic,
            payload,
            None,
            format!("{topic:?} is not an event topic"),
        );
    };
    if payload.len() > ctx.payload_max_bytes {
        let reason = format!(
            "{} bytes exceeds the {}-byte limit",
            payload.len(),
            ctx.payload_max_bytes
        );
        return dead_letter(tx, topic, payload, None, reason);
    }
    let (event, seq) = match CloudEvent::parse(payload) {
        Ok(parsed) => parsed,
        Err(reason) => return dead_letter(tx, topic, payload, None, reason),
    };
    if event.source != topic_source || event.stream != topic_stream {
        let reason = format!(
            "envelope says source {:?} stream {:?} but the topic says {topic_source:?} {topic_stream:?}",
            event.source, event.stream
        );
        return dead_letter(tx, topic, payload, None, reason);
    }
    let key = StreamKey {
        source: event.source.clone(),
        stream: event.stream.clone(),
    };
    let position = match positions.get(&key) {
        Some((p, _)) => *p,
        None => {
            let p = position(tx, &key)?;
            positions.insert(key.clone(), (p, false));
            p
        }
    };
    if seq <= position {
        return Ok(Outcome::Duplicate { key, seq });
    }
    if seq > position + 1 {
        return Ok(Outcome::Ahead { key, seq, position });
    }
    let seen: Option<i64> = tx
        .prepare_cached("SELECT seq FROM inbox WHERE event_id = ?1")?
        .query_row([&event.id], |r| r.get(0))
        .optional()?;
    if let Some(earlier) = seen {
        // The same event id at a second position: a forged or corrupted message. It
        // does not take the position; the real event for it will come in a replay.
        let reason = format!(
            "event id {} was already consumed at sequence {earlier}",
            event.id
        );
        return dead_letter(tx, topic, payload, Some(&key), reason);
    }

    let handled = match ctx.handlers.by_type.get(&event.event_type) {
        None => Err(HandlerError::Permanent(format!(
            "no handler for event type {:?}",
            event.event_type
        ))),
        Some(handler) => run_handler(tx, handler.as_ref(), &event, isolation)?,
    };
    let outcome = match handled {
        Ok(()) => Outcome::Applied {
            key: key.clone(),
            seq,
            event_id: event.id.clone(),
        },
        Err(HandlerError::Transient(reason)) => return Ok(Outcome::Retry(reason)),
        Err(HandlerError::Permanent(reason)) => {
            insert_dead_letter(tx, topic, payload, Some(&key), Some(seq), &reason)?;
            Outcome::DeadLettered {
                reason,
                advanced: Some((key.clone(), seq)),
            }
        }
    };
    let label = if matches!(outcome, Outcome::Applied { .. }) {
        "applied"
    } else {
        "dead_lettered"
    };
    tx.prepare_cached(
        "INSERT INTO inbox (event_id, source, stream, seq, event_type, outcome, applied_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        event.id,
        key.source,
        key.stream,
        seq as i64,
        event.event_type,
        label,
        now_ms()
    ])?;
    Ok(outcome)
}

/// Runs a handler; with [`Isolation::PerHandler`] in a nested savepoint, so that a
/// failed handler leaves no partial writes. A panicking handler counts as a permanent
/// failure.
fn run_handler(
    tx: &Transaction,
    handler: &HandlerFn,
    event: &CloudEvent,
    isolation: Isolation,
) -> Result<Result<(), HandlerError>, ApplyError> {
    let run = || {
        catch_unwind(AssertUnwindSafe(|| handler(tx, event)))
            .unwrap_or_else(|_| Err(HandlerError::Permanent("the handler panicked".into())))
    };
    if isolation == Isolation::Optimistic {
        return match run() {
            Ok(()) => Ok(Ok(())),
            Err(_) => Err(ApplyError::HandlerFailed),
        };
    }
    tx.prepare_cached("SAVEPOINT h")?.execute([])?;
    let result = run();
    if result.is_err() {
        tx.prepare_cached("ROLLBACK TO h")?.execute([])?;
    }
    tx.prepare_cached("RELEASE h")?.execute([])?;
    Ok(result)
}

fn dead_letter(
    tx: &Transaction,
    topic: &str,
    payload: &[u8],
    key: Option<&StreamKey>,
    reason: String,
) -> Result<Outcome, ApplyError> {
    insert_dead_letter(tx, topic, payload, key, None, &reason)?;
    Ok(Outcome::DeadLettered {
        reason,
        advanced: None,
    })
}

fn insert_dead_letter(
    tx: &Transaction,
    topic: &str,
    payload: &[u8],
    key: Option<&StreamKey>,
    seq: Option<u64>,
    reason: &str,
) -> Result<(), DbError> {
    tx.prepare_cached(
        "INSERT INTO dead_letters (topic, payload, payload_len, reason, source, stream, seq, received_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        topic,
        &payload[..payload.len().min(DEAD_LETTER_KEEP_MAX_BYTES)],
        payload.len() as i64,
        reason,
        key.map(|k| &k.source),
        key.map(|k| &k.stream),
        seq.map(|s| s as i64),
        now_ms()
    ])?;
    Ok(())
}

/// The last sequence number applied in a stream (0 before the first).
pub fn position(conn: &Connection, key: &StreamKey) -> Result<u64, DbError> {
    let p: Option<i64> = conn
        .prepare_cached("SELECT position FROM inbox_positions WHERE source = ?1 AND stream = ?2")?
        .query_row([&key.source, &key.stream], |r| r.get(0))
        .optional()?;
    Ok(p.unwrap_or(0) as u64)
}

fn set_position(tx: &Transaction, key: &StreamKey, seq: u64) -> Result<(), DbError> {
    tx.prepare_cached(
        "INSERT INTO inbox_positions (source, stream, position, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (source, stream) DO UPDATE SET position = excluded.position, updated_at_ms = excluded.updated_at_ms",
    )?
    .execute(params![key.source, key.stream, seq as i64, now_ms()])?;
    Ok(())
}

/// Every stream position this inbox holds.
pub fn positions(conn: &Connection) -> Result<HashMap<StreamKey, u64>, DbError> {
    let mut stmt = conn.prepare_cached("SELECT source, stream, position FROM inbox_positions")?;
    let map = stmt
        .query_map([], |r| {
            Ok((
                StreamKey {
                    source: r.get(0)?,
                    stream: r.get(1)?,
                },
                r.get::<_, i64>(2)? as u64,
            ))
        })?
        .collect::<Result<HashMap<_, _>, _>>()?;
    Ok(map)
}

/// The producer no longer holds events `position + 1 .. first - 1` (retention deleted
/// them). Records the loss in `inbox_skipped` and moves the position to `first - 1`,
/// so that the stream goes on. Returns the skipped range, if any.
pub fn skip_unrecoverable(
    tx: &Transaction,
    key: &StreamKey,
    first: u64,
) -> Result<Option<(u64, u64)>, DbError> {
    let position = position(tx, key)?;
    if first <= position + 1 {
        return Ok(None);
    }
    let range = (position + 1, first - 1);
    tx.execute(
        "INSERT INTO inbox_skipped (source, stream, first_seq, last_seq, recorded_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![key.source, key.stream, range.0 as i64, range.1 as i64, now_ms()],
    )?;
    set_position(tx, key, first - 1)?;
    Ok(Some(range))
}

/// Retention on the consumer side: deletes up to `limit` inbox records and dead
/// letters older than `retention_ms`. Positions are kept: they, not these records,
/// guard against applying an event twice.
pub(crate) fn prune(tx: &Transaction, retention_ms: u64, limit: usize) -> Result<usize, DbError> {
    let cutoff = now_ms().saturating_sub(retention_ms as i64);
    let inbox = tx.execute(
        "DELETE FROM inbox WHERE rowid IN (SELECT rowid FROM inbox WHERE applied_at_ms < ?1 LIMIT ?2)",
        params![cutoff, limit as i64],
    )?;
    let dead = tx.execute(
        "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters WHERE received_at_ms < ?1 ORDER BY id LIMIT ?2)",
        params![cutoff, limit as i64],
    )?;
    Ok(inbox + dead)
}
