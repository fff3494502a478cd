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

    /// The handler of `event_type`, if any.
    pub(crate) fn get(&self, event_type: &str) -> Option<&HandlerFn> {
        self.by_type.get(event_type).map(|h| h.as_ref())
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
        /// The producer epoch the position now counts in.
        epoch: Option<String>,
    },
    /// The next event of the stream, but applied before under another epoch of its
    /// producer (a producer found rewound publishes again, in its new epoch, what it
    /// wrote since it was opened): no effect; the position moved to `seq`.
    AppliedBefore {
        /// The stream.
        key: StreamKey,
        /// The sequence number, in the new epoch.
        seq: u64,
    },
    /// Counted in another epoch of its producer than the one this consumer follows:
    /// not applied. The consumer changes epochs only on the producer's head
    /// announcement, and then has such events replayed.
    OtherEpoch {
        /// The stream.
        key: StreamKey,
        /// The sequence number received.
        seq: u64,
    },
    /// Already applied (`seq <= position`); no effect.
    Duplicate {
        /// The stream.
        key: StreamKey,
        /// The sequence number received.
        seq: u64,
    },
    /// At a sequence number already applied in this epoch, but with another event id
    /// than the one applied there: the producer's numbering went back (its database
    /// was restored from an older backup). Not applied; the consumer tells the
    /// producer, which checks the claim and begins a new epoch.
    Diverged {
        /// The stream.
        key: StreamKey,
        /// The sequence number received.
        seq: u64,
        /// The id of the event applied at it.
        applied_id: String,
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
    let mut positions: HashMap<StreamKey, Tracked> = HashMap::new();
    let mut outcomes = Vec::with_capacity(messages.len());
    for (topic, payload) in messages {
        // No savepoint per message: a message writes nothing before its handler, whose
        // own savepoint (or, in an optimistic pass, the rollback of the whole batch)
        // undoes it on failure; a database error fails the whole batch (the caller's
        // savepoint undoes it, and the batch is tried again).
        let outcome = apply_one(tx, ctx, &mut positions, topic, payload, isolation)?;
        let advanced = match &outcome {
            Outcome::Applied { key, seq, .. } | Outcome::AppliedBefore { key, seq } => {
                Some((key, *seq))
            }
            Outcome::DeadLettered {
                advanced: Some((key, seq)),
                ..
            } => Some((key, *seq)),
            _ => None,
        };
        if let Some((key, seq)) = advanced {
            // apply_one looked the stream's position up, so it is in the map.
            if let Some(p) = positions.get_mut(key) {
                p.position = seq;
                p.dirty = true;
            }
        }
        let stop = matches!(outcome, Outcome::Retry(_));
        outcomes.push(outcome);
        if stop {
            break;
        }
    }
    for (key, p) in &positions {
        if p.dirty {
            set_position(tx, key, p.position, p.epoch.as_deref())?;
        }
    }
    Ok(outcomes)
}

/// A stream's position during a batch.
struct Tracked {
    position: u64,
    epoch: Option<String>,
    dirty: bool,
}

fn apply_one(
    tx: &Transaction,
    ctx: &InboxContext,
    positions: &mut HashMap<StreamKey, Tracked>,
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
    if !positions.contains_key(&key) {
        let (position, epoch) = stream_state(tx, &key)?;
        positions.insert(
            key.clone(),
            Tracked {
                position,
                epoch,
                dirty: false,
            },
        );
    }
    let tracked = positions.get_mut(&key).expect("inserted above");
    let position = tracked.position;
    // The epoch this event counts in. A position older than epochs (or a stream's first
    // event) takes the first epoch it meets, but only when an event of it moves the
    // position: a forged event ahead or behind must not change what the stream follows.
    let epoch = match (&tracked.epoch, &event.epoch) {
        // An event older than epochs counts in whatever epoch the stream follows.
        (current, None) => current.clone(),
        (None, Some(e)) => Some(e.clone()),
        (Some(current), Some(e)) if current == e => Some(e.clone()),
        (Some(_), Some(_)) => return Ok(Outcome::OtherEpoch { key, seq }),
    };
    if seq <= position {
        if let (Some(e), Some(_)) = (&epoch, &event.epoch) {
            if let Some(applied_id) = applied_at(tx, &key, e, seq)?.filter(|a| *a != event.id) {
                return Ok(Outcome::Diverged {
                    key,
                    seq,
                    applied_id,
                });
            }
        }
        return Ok(Outcome::Duplicate { key, seq });
    }
    if seq > position + 1 {
        return Ok(Outcome::Ahead { key, seq, position });
    }
    let seen: Option<(String, String, i64)> = tx
        .prepare_cached("SELECT source, stream, seq FROM inbox WHERE event_id = ?1")?
        .query_row([&event.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    match seen {
        // This very event, at this very place, consumed before: under an earlier epoch
        // of its producer, or before an epoch change lowered the position. No effect.
        Some((source, stream, earlier))
            if source == key.source && stream == key.stream && earlier == seq as i64 =>
        {
            tracked.position = seq;
            tracked.epoch = epoch;
            tracked.dirty = true;
            return Ok(Outcome::AppliedBefore { key, seq });
        }
        // The same event id at another position: a forged or corrupted message. It
        // does not take the position; the real event for it will come in a replay.
        Some((source, stream, earlier)) => {
            let reason = format!(
                "event id {} was already consumed at {source}/{stream} sequence {earlier}",
                event.id
            );
            return dead_letter(tx, topic, payload, Some(&key), reason);
        }
        None => {}
    }
    if let Some(e) = &epoch {
        if let Some(applied_id) = applied_at(tx, &key, e, seq)? {
            // Another event was applied at this number in this epoch (the position was
            // lowered by an epoch change and the producer now sends something else):
            // the producer's numbering went back. Not applied; reported.
            return Ok(Outcome::Diverged {
                key,
                seq,
                applied_id,
            });
        }
    }
    tracked.epoch = epoch.clone();

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
            epoch: epoch.clone(),
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
        "INSERT INTO inbox (event_id, source, stream, epoch, seq, event_type, outcome, applied_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        event.id,
        key.source,
        key.stream,
        epoch.as_deref().unwrap_or(""),
        seq as i64,
        event.event_type,
        label,
        now_ms()
    ])?;
    Ok(outcome)
}

/// The id of the event applied at `seq` of `key` in `epoch`, if one was (and its
/// record is still kept).
fn applied_at(
    tx: &Transaction,
    key: &StreamKey,
    epoch: &str,
    seq: u64,
) -> Result<Option<String>, DbError> {
    Ok(tx
        .prepare_cached(
            "SELECT event_id FROM inbox WHERE source = ?1 AND stream = ?2 AND epoch = ?3 AND seq = ?4",
        )?
        .query_row(params![key.source, key.stream, epoch, seq as i64], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Runs a handler; with [`Isolation::PerHandler`] in a nested savepoint, so that a
/// failed handler leaves no partial writes. A panicking handler counts as a permanent
/// failure.
pub(crate) fn run_handler(
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
    Ok(stream_state(conn, key)?.0)
}

/// The stream's position and the producer epoch it counts in (None before the
/// stream met an epoch).
pub fn stream_state(conn: &Connection, key: &StreamKey) -> Result<(u64, Option<String>), DbError> {
    let p: Option<(i64, Option<String>)> = conn
        .prepare_cached(
            "SELECT position, epoch FROM inbox_positions WHERE source = ?1 AND stream = ?2",
        )?
        .query_row([&key.source, &key.stream], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(p.map_or((0, None), |(p, e)| (p as u64, e)))
}

fn set_position(
    tx: &Transaction,
    key: &StreamKey,
    seq: u64,
    epoch: Option<&str>,
) -> Result<(), DbError> {
    tx.prepare_cached(
        "INSERT INTO inbox_positions (source, stream, position, updated_at_ms, epoch) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (source, stream) DO UPDATE SET position = excluded.position,
             updated_at_ms = excluded.updated_at_ms, epoch = COALESCE(excluded.epoch, epoch)",
    )?
    .execute(params![key.source, key.stream, seq as i64, now_ms(), epoch])?;
    Ok(())
}

/// Every stream position this inbox holds, with the epoch it counts in.
pub fn positions(conn: &Connection) -> Result<HashMap<StreamKey, (u64, Option<String>)>, DbError> {
    let mut stmt =
        conn.prepare_cached("SELECT source, stream, position, epoch FROM inbox_positions")?;
    let map = stmt
        .query_map([], |r| {
            Ok((
                StreamKey {
                    source: r.get(0)?,
                    stream: r.get(1)?,
                },
                (r.get::<_, i64>(2)? as u64, r.get(3)?),
            ))
        })?
        .collect::<Result<HashMap<_, _>, _>>()?;
    Ok(map)
}

/// What following a head announcement's epoch did to one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EpochFollow {
    /// The stream already follows the announced epoch.
    Unchanged {
        /// The stream.
        key: StreamKey,
    },
    /// A position without an epoch took the announced one; nothing else changed.
    Adopted {
        /// The stream.
        key: StreamKey,
    },
    /// The producer's epoch changed: the position now counts in the new epoch.
    Changed(EpochChanged),
}

/// A change of a producer's epoch that a stream followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochChanged {
    /// The stream.
    pub key: StreamKey,
    /// The epoch it counted in.
    pub from_epoch: String,
    /// Its position there.
    pub from_position: u64,
    /// The new epoch.
    pub to_epoch: String,
    /// Its position in the new epoch: what the two epochs share of it.
    pub to_position: u64,
    /// Events this consumer applied that the producer no longer has (its database
    /// was replaced, or restored from an older backup), if any.
    pub orphaned: Option<(u64, u64)>,
}

/// True when [`follow_epoch`] would change anything for `heads`: some stream of it
/// has a position here counting in another epoch, or in none yet. A read, so that the
/// consumer writes only when there is something to follow.
pub fn must_follow_epoch(
    conn: &Connection,
    heads: &crate::protocol::HeadAnnouncement,
) -> Result<bool, DbError> {
    let Some(announced) = &heads.epoch else {
        return Ok(false);
    };
    let mut stmt =
        conn.prepare_cached("SELECT epoch FROM inbox_positions WHERE source = ?1 AND stream = ?2")?;
    for stream in heads.streams.keys() {
        let epoch: Option<Option<String>> = stmt
            .query_row([&heads.source, stream], |r| r.get(0))
            .optional()?;
        if matches!(epoch, Some(e) if e.as_deref() != Some(announced.as_str())) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Follows the epoch a producer announces (see docs/recovery.md, "Producer
/// identity"), for the streams of `heads` that this inbox has a position in:
///
/// - the same epoch: nothing to do;
/// - no epoch yet (a position older than epochs): it takes the announced one;
/// - the announced epoch continues the stream's (`previous`): the position becomes
///   `min(position, base)`, and what it had applied beyond `base` is recorded as
///   orphaned;
/// - any other epoch (a new database, or more than one change missed): the position
///   starts again at 0 and everything it had applied is recorded as orphaned; events
///   applied before are recognised by their id and not applied again.
///
/// `heads` must have passed [`crate::protocol::HeadAnnouncement::validate`]. Records every change in
/// `inbox_epoch_changes`.
pub fn follow_epoch(
    tx: &Transaction,
    heads: &crate::protocol::HeadAnnouncement,
) -> Result<Vec<EpochFollow>, DbError> {
    let Some(announced) = &heads.epoch else {
        return Ok(Vec::new());
    };
    let mut follows = Vec::new();
    for (stream, head) in &heads.streams {
        let key = StreamKey {
            source: heads.source.clone(),
            stream: stream.clone(),
        };
        let Some((position, epoch)) = tx
            .prepare_cached(
                "SELECT position, epoch FROM inbox_positions WHERE source = ?1 AND stream = ?2",
            )?
            .query_row([&key.source, &key.stream], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Option<String>>(1)?))
            })
            .optional()?
        else {
            continue; // not consumed here, or no event yet: the first one brings the epoch
        };
        let change = match epoch {
            Some(e) if e == *announced => {
                follows.push(EpochFollow::Unchanged { key });
                continue;
            }
            None => {
                tx.prepare_cached(
                    "UPDATE inbox_positions SET epoch = ?3 WHERE source = ?1 AND stream = ?2",
                )?
                .execute(params![key.source, key.stream, announced])?;
                follows.push(EpochFollow::Adopted { key });
                continue;
            }
            Some(from_epoch) => {
                let shared = if heads.previous.as_deref() == Some(from_epoch.as_str()) {
                    head.base
                } else {
                    0
                };
                let to_position = position.min(shared);
                EpochChanged {
                    orphaned: (position > to_position).then_some((to_position + 1, position)),
                    key,
                    from_epoch,
                    from_position: position,
                    to_epoch: announced.clone(),
                    to_position,
                }
            }
        };
        {
            let EpochChanged {
                key,
                from_epoch,
                from_position,
                to_epoch,
                to_position,
                orphaned,
            } = &change;
            tx.prepare_cached(
                "INSERT INTO inbox_epoch_changes (source, stream, from_epoch, from_position, to_epoch,
                     to_position, orphaned_first, orphaned_last, recorded_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                key.source,
                key.stream,
                from_epoch,
                *from_position as i64,
                to_epoch,
                *to_position as i64,
                orphaned.map(|o| o.0 as i64),
                orphaned.map(|o| o.1 as i64),
                now_ms()
            ])?;
            tx.prepare_cached(
                "UPDATE inbox_positions SET epoch = ?3, position = ?4, updated_at_ms = ?5
                 WHERE source = ?1 AND stream = ?2",
            )?
            .execute(params![
                key.source,
                key.stream,
                to_epoch,
                *to_position as i64,
                now_ms()
            ])?;
        }
        follows.push(EpochFollow::Changed(change));
    }
    Ok(follows)
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
    set_position(tx, key, first - 1, None)?;
    Ok(Some(range))
}

/// Retention on the consumer side: deletes up to `limit` inbox records, dead letters
/// and recorded epoch changes older than `retention_ms`. Positions are kept: they, not these records,
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
    let changes = tx.execute(
        "DELETE FROM inbox_epoch_changes WHERE id IN (SELECT id FROM inbox_epoch_changes WHERE recorded_at_ms < ?1 ORDER BY id LIMIT ?2)",
        params![cutoff, limit as i64],
    )?;
    Ok(inbox + dead + changes)
}

/// Retention at `--retention-max-bytes`: deletes the `limit` oldest records of applied
/// events applied before `applied_before_ms`. Dead letters stay (they are events not
/// applied).
pub(crate) fn prune_oldest(
    tx: &Transaction,
    applied_before_ms: i64,
    limit: usize,
) -> Result<usize, DbError> {
    Ok(tx
        .prepare_cached(
            "DELETE FROM inbox WHERE rowid IN (
                 SELECT rowid FROM inbox WHERE applied_at_ms < ?1 AND outcome = 'applied'
                 ORDER BY applied_at_ms LIMIT ?2)",
        )?
        .execute(params![applied_before_ms, limit as i64])?)
}
