//! The outbox: events written in the same transaction as the business change that
//! caused them, and the queries the relay runs on them.
//!
//! A **stream** is an ordered sequence of events from one producer (`source`), named by
//! the producer (e.g. `users`). Each event of a stream gets the next sequence number
//! (1, 2, 3, ...): assigned inside the caller's transaction, so a rolled-back write
//! leaves no gap, and counted in `outbox_streams`, so deleting old rows never lets a
//! number be reused. Consumers apply each stream's events in this order, exactly once.
//! Streams are independent: a producer chooses as many as it needs (one per aggregate
//! type is typical); events of different streams have no order between them.

pub mod envelope;

use std::collections::BTreeMap;

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;

use crate::clock::{ms_since_epoch, now_ms};
use crate::config::Config;
use crate::protocol::{self, HeadAnnouncement, StreamHead, Topics};
use crate::storage::DbError;
use envelope::CloudEvent;

/// Why an event was refused. The business write it came with is refused too, because
/// the caller's transaction fails with it.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The stream name is not a valid name (see [`protocol::validate_name`]).
    #[error("invalid stream name: {0}")]
    InvalidStream(String),
    /// The event type or subject is invalid.
    #[error("invalid event: {0}")]
    InvalidEvent(String),
    #[error(
        "event envelope is {size} bytes, more than the {max}-byte limit (--payload-max-bytes)"
    )]
    /// The envelope would exceed `--payload-max-bytes`.
    PayloadTooLarge {
        /// The envelope's size.
        size: usize,
        /// `--payload-max-bytes`.
        max: usize,
    },
    /// The backlog of events not yet published reached its cap (the broker has been
    /// unreachable for long): new events, and the writes they come with, are refused
    /// until the relay catches up.
    #[error(
        "{events} events ({bytes} bytes) are waiting to be published, at the limit of {max_events} events or {max_bytes} bytes \
         (--outbox-backlog-max-events, --outbox-backlog-max-bytes); nothing was written: retry once the broker is reachable"
    )]
    BacklogFull {
        /// Events waiting.
        events: u64,
        /// Bytes of their envelopes.
        bytes: u64,
        /// `--outbox-backlog-max-events`.
        max_events: u64,
        /// `--outbox-backlog-max-bytes`.
        max_bytes: u64,
    },
    #[error("event data cannot be serialised to JSON: {0}")]
    /// The event's data could not be serialised.
    Serialize(#[from] serde_json::Error),
    #[error(transparent)]
    /// A database error.
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError::Db(e.into())
    }
}

/// An event to enqueue.
#[derive(Debug, Clone, Copy)]
pub struct NewEvent<'a, D: Serialize> {
    /// The stream it belongs to (see the module docs).
    pub stream: &'a str,
    /// What happened, e.g. `user.created`.
    pub event_type: &'a str,
    /// What it happened to, e.g. the user id.
    pub subject: Option<&'a str>,
    /// The payload, serialised as the envelope's `data`.
    pub data: &'a D,
}

/// An event that was enqueued (and commits or rolls back with the caller's transaction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    /// Outbox row id.
    pub row_id: i64,
    /// The CloudEvents id (UUIDv7).
    pub event_id: String,
    /// Position in its stream.
    pub seq: u64,
}

/// Enqueues events for one producer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    source: String,
    topics: Topics,
    payload_max_bytes: usize,
    backlog_max_events: u64,
    backlog_max_bytes: u64,
}

impl Outbox {
    /// The outbox of the producer `config.source`. `config` must be valid.
    pub fn new(config: &Config) -> Outbox {
        Outbox {
            source: config.source.clone(),
            topics: Topics::new(&config.topic_prefix),
            payload_max_bytes: config.payload_max_bytes,
            backlog_max_events: config.outbox_backlog_max_events,
            backlog_max_bytes: config.outbox_backlog_max_bytes,
        }
    }

    /// The producer name.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The backlog cap, in events.
    pub fn backlog_max_events(&self) -> u64 {
        self.backlog_max_events
    }

    /// The backlog cap, in bytes.
    pub fn backlog_max_bytes(&self) -> u64 {
        self.backlog_max_bytes
    }

    /// Writes `event` into the outbox inside `tx`: it commits or rolls back with the
    /// caller's other writes. An event that could never be published (bad names, too
    /// large) is refused here, so that the caller's transaction fails with it rather
    /// than leaving a row that would be stuck later.
    pub fn enqueue<D: Serialize>(
        &self,
        tx: &Transaction,
        event: NewEvent<'_, D>,
    ) -> Result<Enqueued, OutboxError> {
        protocol::validate_name(event.stream).map_err(OutboxError::InvalidStream)?;
        protocol::validate_event_type(event.event_type).map_err(OutboxError::InvalidEvent)?;
        if let Some(subject) = event.subject {
            if subject.len() > 1024 {
                return Err(OutboxError::InvalidEvent(
                    "subject is longer than 1024 bytes".into(),
                ));
            }
        }
        let topic = self.topics.events(&self.source, event.stream);
        if topic.len() > protocol::TOPIC_MAX_BYTES {
            return Err(OutboxError::InvalidEvent(format!(
                "topic {topic:?} is too long"
            )));
        }

        let seq: i64 = tx
            .prepare_cached(
                "INSERT INTO outbox_streams (stream, last_seq) VALUES (?1, 1)
                 ON CONFLICT (stream) DO UPDATE SET last_seq = last_seq + 1
                 RETURNING last_seq",
            )?
            .query_row([event.stream], |r| r.get(0))?;
        let seq = seq as u64;
        let epoch: String = tx
            .prepare_cached("SELECT epoch FROM outbox_epoch WHERE id = 1")?
            .query_row([], |r| r.get(0))?;
        // One reading of the clock for the row and the envelope.
        let now = std::time::SystemTime::now();
        let event_id = uuid::Uuid::now_v7().to_string();
        let envelope = CloudEvent {
            specversion: envelope::SPEC_VERSION.into(),
            id: event_id.clone(),
            source: self.source.clone(),
            event_type: event.event_type.into(),
            subject: event.subject.map(str::to_owned),
            time: humantime::format_rfc3339_millis(now).to_string(),
            datacontenttype: envelope::CONTENT_TYPE.into(),
            stream: event.stream.into(),
            sequence: envelope::format_sequence(seq),
            epoch: Some(epoch),
            data: event.data,
        };
        let payload = serde_json::to_vec(&envelope)?;
        if payload.len() > self.payload_max_bytes {
            // The sequence number taken above is given back when the caller's
            // transaction rolls back, as it must on this error.
            return Err(OutboxError::PayloadTooLarge {
                size: payload.len(),
                max: self.payload_max_bytes,
            });
        }
        let backlog = backlog(tx)?;
        if backlog.events >= self.backlog_max_events
            || backlog.bytes + payload.len() as u64 > self.backlog_max_bytes
        {
            return Err(OutboxError::BacklogFull {
                events: backlog.events,
                bytes: backlog.bytes,
                max_events: self.backlog_max_events,
                max_bytes: self.backlog_max_bytes,
            });
        }
        tx.prepare_cached(
            "INSERT INTO outbox (event_id, stream, seq, event_type, topic, payload, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            event_id,
            event.stream,
            seq as i64,
            event.event_type,
            topic,
            payload,
            ms_since_epoch(now)
        ])?;
        Ok(Enqueued {
            row_id: tx.last_insert_rowid(),
            event_id,
            seq,
        })
    }
}

/// Events enqueued and not yet published (replays excluded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    /// Events waiting to be published.
    pub events: u64,
    /// Bytes of their envelopes.
    pub bytes: u64,
}

/// The backlog, as the triggers keep it.
pub fn backlog(conn: &Connection) -> Result<Backlog, DbError> {
    let (events, bytes): (i64, i64) = conn
        .prepare_cached("SELECT events, bytes FROM outbox_backlog WHERE id = 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(Backlog {
        events: events as u64,
        bytes: bytes as u64,
    })
}

/// A pending outbox row, as the relay publishes it.
#[derive(Debug, Clone)]
pub(crate) struct PendingRow {
    /// The outbox row id.
    pub id: i64,
    /// The event's CloudEvents `id`.
    pub event_id: String,
    /// The stream it belongs to.
    pub stream: String,
    /// Its sequence number in the stream.
    pub seq: u64,
    /// The topic it is published on.
    pub topic: String,
    /// The envelope, as published.
    pub payload: Vec<u8>,
    /// Set back to pending by a replay (published before).
    pub replayed: bool,
}

/// Up to `limit` pending rows: first those never published with `id > live_after`,
/// then, to fill the batch, those a replay set back to pending with
/// `id > replay_after`; each in id order (which is sequence order within a stream).
/// Live events so never wait behind a long replay.
pub(crate) fn fetch_pending(
    conn: &Connection,
    live_after: i64,
    replay_after: i64,
    limit: usize,
) -> Result<Vec<PendingRow>, DbError> {
    let mut rows = Vec::with_capacity(limit.min(1024));
    for (replayed, after) in [(0, live_after), (1, replay_after)] {
        if rows.len() >= limit {
            break;
        }
        let mut stmt = conn.prepare_cached(
            "SELECT id, event_id, stream, seq, topic, payload FROM outbox
             WHERE published_at_ms IS NULL AND replayed = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
        )?;
        let fetched =
            stmt.query_map(params![replayed, after, (limit - rows.len()) as i64], |r| {
                Ok(PendingRow {
                    id: r.get(0)?,
                    event_id: r.get(1)?,
                    stream: r.get(2)?,
                    seq: r.get::<_, i64>(3)? as u64,
                    topic: r.get(4)?,
                    payload: r.get(5)?,
                    replayed: replayed == 1,
                })
            })?;
        for row in fetched {
            rows.push(row?);
        }
    }
    Ok(rows)
}

/// Marks rows published (after their PUBACK). Rows already marked are left alone.
///
/// One statement for the whole batch: one UPDATE per row, each firing the backlog
/// trigger inside the writer's savepoint, grew quadratically (62,641 rows took 70 s
/// in `make bench`; 20,000 took 2.6 s against 0.06 s for this form).
pub fn mark_published(tx: &Transaction, ids: &[i64]) -> Result<usize, DbError> {
    let list = serde_json::to_string(ids).expect("integers serialise");
    let marked = tx
        .prepare_cached(
            "UPDATE outbox SET published_at_ms = ?1
             WHERE id IN (SELECT value FROM json_each(?2)) AND published_at_ms IS NULL",
        )?
        .execute(params![now_ms(), list])?;
    Ok(marked)
}

/// Sets the published rows of `stream` from `from_seq` on back to pending, so that the
/// relay publishes them again (the answer to a replay request). Returns how many.
pub fn reset_for_replay(tx: &Transaction, stream: &str, from_seq: u64) -> Result<usize, DbError> {
    let n = tx
        .prepare_cached(
            "UPDATE outbox SET published_at_ms = NULL, replayed = 1
             WHERE stream = ?1 AND seq >= ?2 AND published_at_ms IS NOT NULL",
        )?
        .execute(params![stream, from_seq.min(i64::MAX as u64) as i64])?;
    Ok(n)
}

/// Every stream's head: what has been published without a hole, the lowest sequence
/// number still held, the last one enqueued and the epoch's base.
pub fn heads(conn: &Connection) -> Result<BTreeMap<String, StreamHead>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.stream, s.last_seq,
                (SELECT MIN(o.seq) FROM outbox o WHERE o.stream = s.stream AND o.published_at_ms IS NULL),
                (SELECT MIN(o.seq) FROM outbox o WHERE o.stream = s.stream),
                s.epoch_base
         FROM outbox_streams s",
    )?;
    let heads = stmt
        .query_map([], |r| {
            let last: i64 = r.get(1)?;
            let min_pending: Option<i64> = r.get(2)?;
            let first: Option<i64> = r.get(3)?;
            Ok((
                r.get::<_, String>(0)?,
                StreamHead {
                    head: min_pending.map_or(last, |p| p - 1) as u64,
                    first: first.unwrap_or(last + 1) as u64,
                    last: last as u64,
                    base: r.get::<_, i64>(4)? as u64,
                },
            ))
        })?
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    Ok(heads)
}

/// The head announcement of the producer `source`: its epoch and every stream's head.
pub fn announcement(conn: &Connection, source: &str) -> Result<HeadAnnouncement, DbError> {
    let epoch = epoch(conn)?;
    Ok(HeadAnnouncement {
        source: source.to_owned(),
        epoch: Some(epoch.epoch),
        previous: epoch.previous,
        streams: heads(conn)?,
    })
}

/// A producer database's identity (see `schema/core/0002_producer_epochs.sql`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Epoch {
    /// The epoch every event enqueued now carries.
    pub epoch: String,
    /// The epoch it continues, if any.
    pub previous: Option<String>,
    /// Why it began: `created`, `rewound` or `restored`.
    pub reason: String,
    /// When it began, in ms since the Unix epoch.
    pub started_at_ms: i64,
}

/// This database's epoch.
pub fn epoch(conn: &Connection) -> Result<Epoch, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT epoch, previous, reason, started_at_ms FROM outbox_epoch WHERE id = 1",
        )?
        .query_row([], |r| {
            Ok(Epoch {
                epoch: r.get(0)?,
                previous: r.get(1)?,
                reason: r.get(2)?,
                started_at_ms: r.get(3)?,
            })
        })?)
}

/// Why a new epoch begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochReason {
    /// A consumer had applied more of this epoch than the database holds: the
    /// database was restored from an older backup (or its file replaced by an older
    /// copy) and is writing numbers that consumers saw with other events.
    Rewound,
    /// An operator said so (`edge-outbox mark-restored`) after restoring a backup.
    Restored,
}

impl EpochReason {
    fn as_str(self) -> &'static str {
        match self {
            EpochReason::Rewound => "rewound",
            EpochReason::Restored => "restored",
        }
    }
}

/// What [`start_new_epoch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochChange {
    /// The epoch that ended.
    pub from: String,
    /// The epoch that began.
    pub to: String,
    /// Rows written since the database was opened, now carrying the new epoch and set
    /// back to pending so that they are published again.
    pub restamped: usize,
}

/// Begins a new epoch. It shares with the old one what the database held when this
/// process opened it (`run_base`): events written since then carry numbers that
/// consumers may have seen with other events, so they are published again. Every
/// envelope is rewritten to carry the new epoch, in one transaction (a rare event; it
/// holds the writer for about as long as reading and writing the outbox once). Consumers follow the change at the
/// next head announcement (docs/recovery.md, "Producer identity"). Recorded positions
/// are lowered to the base, so that retention keeps what consumers will ask for.
///
/// The base never lies below the events older than half of `retention_ms`: consumers
/// recognise events they applied before by the id in their inbox, which keeps it for
/// `--retention-ms` after applying; older events are taken as shared.
pub fn start_new_epoch(
    tx: &Transaction,
    reason: EpochReason,
    retention_ms: u64,
) -> Result<EpochChange, DbError> {
    let from = epoch(tx)?.epoch;
    let to: String = tx.query_row(
        "UPDATE outbox_epoch SET previous = epoch, epoch = lower(hex(randomblob(16))),
                reason = ?1, started_at_ms = ?2
         WHERE id = 1 RETURNING epoch",
        params![reason.as_str(), now_ms()],
        |r| r.get(0),
    )?;
    let shared_before = now_ms().saturating_sub((retention_ms / 2) as i64);
    tx.execute(
        "UPDATE outbox_streams SET run_base = MIN(last_seq, MAX(run_base,
             COALESCE((SELECT MAX(o.seq) FROM outbox o
                       WHERE o.stream = outbox_streams.stream AND o.created_at_ms < ?1), 0),
             COALESCE((SELECT MIN(o.seq) FROM outbox o WHERE o.stream = outbox_streams.stream),
                      last_seq + 1) - 1))",
        [shared_before],
    )?;
    tx.execute("UPDATE outbox_streams SET epoch_base = run_base", [])?;
    // Every row carries the new epoch (those up to the base are shared, and consumers
    // ask for them in the new epoch); those after it are published again. In pages,
    // so that memory stays bounded however large the outbox.
    let mut backlog_bytes_delta: i64 = 0;
    let mut restamped_rows = 0;
    let mut after = 0i64;
    let mut page = tx.prepare(
        "SELECT o.id, o.payload, o.published_at_ms IS NULL AND o.replayed = 0, o.seq > s.run_base
         FROM outbox o JOIN outbox_streams s ON s.stream = o.stream
         WHERE o.id > ?1 ORDER BY o.id LIMIT 1000",
    )?;
    let mut update = tx.prepare(
        "UPDATE outbox SET payload = ?2,
                replayed = CASE WHEN ?3 AND published_at_ms IS NOT NULL THEN 1 ELSE replayed END,
                published_at_ms = CASE WHEN ?3 THEN NULL ELSE published_at_ms END
         WHERE id = ?1",
    )?;
    loop {
        let rows: Vec<(i64, Vec<u8>, bool, bool)> = page
            .query_map([after], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<Result<_, _>>()?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (id, payload, in_backlog, again) in &rows {
            // A row that is not an envelope of this program (a damaged database) goes
            // out as it is: the consumers dead-letter it, which says more than stopping.
            let restamped = restamp(payload, &to).unwrap_or_else(|| payload.clone());
            if *in_backlog {
                backlog_bytes_delta += restamped.len() as i64 - payload.len() as i64;
            }
            restamped_rows += usize::from(*again);
            update.execute(params![id, restamped, again])?;
        }
    }
    tx.execute(
        "UPDATE outbox_backlog SET bytes = MAX(0, bytes + ?1) WHERE id = 1",
        [backlog_bytes_delta],
    )?;
    tx.execute(
        "UPDATE consumer_positions SET position = MIN(position,
             (SELECT s.epoch_base FROM outbox_streams s WHERE s.stream = consumer_positions.stream))",
        [],
    )?;
    Ok(EpochChange {
        from,
        to,
        restamped: restamped_rows,
    })
}

/// The envelope `payload` with its `epoch` attribute set to `epoch`, every other
/// byte as it was (the outbox holds the exact bytes published). The attribute follows
/// `sequence`, as [`Outbox::enqueue`] writes it; an envelope written before epochs
/// gets one there. The first `"sequence":"` is the envelope's own: in a JSON string a
/// quote is escaped, and `data` comes after it. None when the payload is not such an
/// envelope.
fn restamp(payload: &[u8], epoch: &str) -> Option<Vec<u8>> {
    const KEY: &[u8] = br#""sequence":""#;
    const ATTR: &[u8] = br#","epoch":""#;
    let start = payload.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = payload.get(start..start + 20)?;
    if !digits.iter().all(u8::is_ascii_digit) || payload.get(start + 20) != Some(&b'"') {
        return None;
    }
    let after_sequence = start + 21;
    let rest = &payload[after_sequence..];
    let keep_from = if rest.starts_with(ATTR) {
        let value = after_sequence + ATTR.len();
        value + payload[value..].iter().position(|&b| b == b'"')? + 1
    } else {
        after_sequence
    };
    let mut out = Vec::with_capacity(payload.len() + ATTR.len() + epoch.len() + 1);
    out.extend_from_slice(&payload[..after_sequence]);
    out.extend_from_slice(ATTR);
    out.extend_from_slice(epoch.as_bytes());
    out.push(b'"');
    out.extend_from_slice(&payload[keep_from..]);
    Some(out)
}

/// The first sign in `report` (counting in this database's epoch) that the database
/// was rewound: `(stream, position or divergent sequence, last sequence held)`.
fn rewind_claim(
    tx: &Transaction,
    report: &protocol::PositionReport,
) -> Result<Option<(String, u64, u64)>, DbError> {
    for (stream, &position) in &report.positions {
        let last = last_seq(tx, stream)?.unwrap_or(0);
        if position > last {
            return Ok(Some((stream.clone(), position, last)));
        }
    }
    // A consumer applied another event at a number this database holds: taken when this
    // database's own row at that number has another id (a claim naming the row's own
    // id is false and ignored).
    for (stream, d) in &report.diverged {
        let here: Option<String> = tx
            .prepare_cached("SELECT event_id FROM outbox WHERE stream = ?1 AND seq = ?2")?
            .query_row(params![stream, d.seq.min(protocol::SEQ_MAX) as i64], |r| {
                r.get(0)
            })
            .optional()?;
        if here.is_some_and(|id| id != d.applied_id) {
            let last = last_seq(tx, stream)?.unwrap_or(0);
            return Ok(Some((stream.clone(), d.seq, last)));
        }
    }
    Ok(None)
}

/// What a position report told a producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Recorded for retention (as far as [`record_position`] takes it).
    Recorded,
    /// Counted in another epoch than this database's: not recorded.
    OtherEpoch,
    /// The consumer claims more of this epoch than this database holds, but an epoch
    /// already began since the relay started: nothing done.
    RewindIgnored {
        /// The stream.
        stream: String,
        /// The consumer's position (or divergent sequence) in it.
        position: u64,
        /// The last sequence number this database holds in it.
        last: u64,
    },
    /// The consumer has applied more of this epoch than this database holds: a new
    /// epoch began.
    Rewound {
        /// The stream that showed it.
        stream: String,
        /// The consumer's position in it.
        position: u64,
        /// The last sequence number this database holds in it.
        last: u64,
        /// The new epoch.
        change: EpochChange,
    },
}

/// Takes a consumer's report: when it counts in this database's epoch and shows a
/// position beyond a stream's last sequence number, or a divergence that this
/// database's own row confirms (the consumer applied another event at that number),
/// the database was rewound and a new epoch begins ([`start_new_epoch`]); otherwise, when `record` is set, its positions
/// are recorded for retention. A report without an epoch (an older consumer) counts in
/// the current one.
///
/// With `may_rewind` unset (the relay began an epoch already since it started), a
/// rewind is only reported ([`ReportOutcome::RewindIgnored`]): nobody can make a
/// producer change epochs again and again by claiming rewinds (a restore needs a
/// restart anyway).
pub fn take_report(
    tx: &Transaction,
    report: &protocol::PositionReport,
    record: bool,
    retention_ms: u64,
    may_rewind: bool,
) -> Result<ReportOutcome, DbError> {
    let current = epoch(tx)?.epoch;
    match &report.epoch {
        Some(e) if *e != current => return Ok(ReportOutcome::OtherEpoch),
        Some(_) => {
            if let Some((stream, position, last)) = rewind_claim(tx, report)? {
                if !may_rewind {
                    return Ok(ReportOutcome::RewindIgnored {
                        stream,
                        position,
                        last,
                    });
                }
                let change = start_new_epoch(tx, EpochReason::Rewound, retention_ms)?;
                return Ok(ReportOutcome::Rewound {
                    stream,
                    position,
                    last,
                    change,
                });
            }
        }
        None => {}
    }
    if record {
        for (stream, position) in &report.positions {
            record_position(tx, &report.consumer, stream, *position)?;
        }
    }
    Ok(ReportOutcome::Recorded)
}

/// Records what a consumer reported it has applied, as retention must see it: only for
/// a stream this producer has, and never beyond the stream's last sequence number. A
/// position may move back: a consumer whose database was restored must win back the
/// rows it lacks again. A report for a stream this producer does not have writes
/// nothing.
pub fn record_position(
    tx: &Transaction,
    consumer: &str,
    stream: &str,
    position: u64,
) -> Result<(), DbError> {
    tx.prepare_cached(
        "INSERT INTO consumer_positions (consumer, stream, position, reported_at_ms)
             SELECT ?1, s.stream, MIN(?3, s.last_seq), ?4
             FROM outbox_streams s WHERE s.stream = ?2
             ON CONFLICT (consumer, stream) DO UPDATE SET
                 position = excluded.position, reported_at_ms = excluded.reported_at_ms",
    )?
    .execute(params![
        consumer,
        stream,
        position.min(protocol::SEQ_MAX) as i64,
        now_ms()
    ])?;
    Ok(())
}

/// Retention: deletes up to `limit` outbox rows that are published, were created more
/// than `retention_ms` ago, and that every consumer which reported within
/// `consumer_expiry_ms` has applied. Returns how many were deleted. It looks at the
/// rows oldest first, `limit` at a time, and stops at the first window of rows
/// younger than the cutoff ([`prune_window`]).
pub fn prune(
    tx: &Transaction,
    retention_ms: u64,
    consumer_expiry_ms: u64,
    limit: usize,
) -> Result<usize, DbError> {
    let before = now_ms().saturating_sub(retention_ms as i64);
    let (mut cursor, mut total) = (0, 0);
    while total < limit {
        match prune_window(tx, &mut cursor, before, consumer_expiry_ms, limit, true)? {
            Some(n) => total += n,
            None => break,
        }
    }
    Ok(total)
}

/// One step of a retention pass: among the `window` rows that follow row id `cursor`,
/// deletes those that are published, were created before `created_before_ms`, and
/// that every consumer which reported within `consumer_expiry_ms` has applied; moves
/// `cursor` past the window. None when the table ends there, or, with `stop_at_young`,
/// when the window holds no row created before the cutoff: rows are created in id
/// order, so the pass is done (a full table of young history costs one short read, not
/// a scan of every row while the writer waits). A wall clock that stepped back breaks
/// that order for a while: the byte cap passes `false` and reads on to the end.
pub fn prune_window(
    tx: &Transaction,
    cursor: &mut i64,
    created_before_ms: i64,
    consumer_expiry_ms: u64,
    window: usize,
    stop_at_young: bool,
) -> Result<Option<usize>, DbError> {
    let (last, oldest): (Option<i64>, Option<i64>) = tx
        .prepare_cached(
            "SELECT MAX(id), MIN(created_at_ms) FROM
                 (SELECT id, created_at_ms FROM outbox WHERE id > ?1 ORDER BY id LIMIT ?2)",
        )?
        .query_row(params![*cursor, window.max(1) as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let (Some(last), Some(oldest)) = (last, oldest) else {
        return Ok(None);
    };
    if oldest >= created_before_ms {
        if stop_at_young {
            return Ok(None);
        }
        *cursor = last;
        return Ok(Some(0));
    }
    let n = tx
        .prepare_cached(
            "DELETE FROM outbox WHERE id IN (
                 SELECT o.id FROM outbox o
                 WHERE o.id > ?1 AND o.id <= ?2
                   AND o.published_at_ms IS NOT NULL AND o.created_at_ms < ?3
                   AND o.seq <= COALESCE(
                       (SELECT MIN(p.position) FROM consumer_positions p
                        WHERE p.stream = o.stream AND p.reported_at_ms >= ?4),
                       9223372036854775807))",
        )?
        .execute(params![
            *cursor,
            last,
            created_before_ms,
            now_ms().saturating_sub(consumer_expiry_ms as i64),
        ])?;
    *cursor = last;
    Ok(Some(n))
}

/// Forgets consumers that have not reported for `consumer_expiry_ms`: they no longer
/// hold anything back (see [`prune`]), and consumers that come and go must leave no
/// rows behind. Returns how many rows it deleted.
pub fn forget_expired_consumers(
    tx: &Transaction,
    consumer_expiry_ms: u64,
) -> Result<usize, DbError> {
    let cutoff = now_ms().saturating_sub(consumer_expiry_ms as i64);
    Ok(tx
        .prepare_cached("DELETE FROM consumer_positions WHERE reported_at_ms < ?1")?
        .execute([cutoff])?)
}

/// A stream whose outbox rows were written for another topic than `topics` and
/// `source` give now (the producer's `--source` or `--topic-prefix` changed while it
/// held events): `(stream, stored topic, expected topic)`. Checks each stream's first
/// and last row, two index lookups per stream.
pub fn foreign_topic(
    conn: &Connection,
    topics: &Topics,
    source: &str,
) -> Result<Option<(String, String, String)>, DbError> {
    let mut streams = conn.prepare("SELECT stream FROM outbox_streams ORDER BY stream")?;
    let streams = streams
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for stream in streams {
        let expected = topics.events(source, &stream);
        for order in ["ASC", "DESC"] {
            let stored: Option<String> = conn
                .query_row(
                    &format!(
                        "SELECT topic FROM outbox WHERE stream = ?1 ORDER BY seq {order} LIMIT 1"
                    ),
                    [&stream],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(stored) = stored.filter(|t| *t != expected) {
                return Ok(Some((stream, stored, expected)));
            }
        }
    }
    Ok(None)
}

/// Counts for status pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutboxStats {
    /// Rows not yet published.
    pub pending: u64,
    /// Rows published and not yet deleted by retention.
    pub published: u64,
    /// Age of the oldest pending row, when there is one.
    pub oldest_pending_age_ms: Option<i64>,
}

/// Pending and published counts and the oldest pending age.
pub fn stats(conn: &Connection) -> Result<OutboxStats, DbError> {
    let (pending, oldest): (i64, Option<i64>) = conn.query_row(
        "SELECT COUNT(*), MIN(created_at_ms) FROM outbox WHERE published_at_ms IS NULL",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let total: i64 = conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
    Ok(OutboxStats {
        pending: pending as u64,
        published: (total - pending) as u64,
        oldest_pending_age_ms: oldest.map(|t| now_ms().saturating_sub(t)),
    })
}

/// When the oldest event never published was written (ms since the Unix epoch), if
/// any. Rows pending again for a replay (old by design) do not count. By the partial
/// index of pending rows: cheap at any backlog, though it reads past the rows of a
/// replay in progress.
pub fn oldest_unpublished_ms(conn: &Connection) -> Result<Option<i64>, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT created_at_ms FROM outbox INDEXED BY outbox_pending_by_id
             WHERE published_at_ms IS NULL AND replayed = 0 ORDER BY id LIMIT 1",
        )?
        .query_row([], |r| r.get(0))
        .optional()?)
}

/// The highest sequence number enqueued in `stream`, if any.
pub fn last_seq(conn: &Connection, stream: &str) -> Result<Option<u64>, DbError> {
    Ok(conn
        .query_row(
            "SELECT last_seq FROM outbox_streams WHERE stream = ?1",
            [stream],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map(|v| v as u64))
}

/// One outbox row as status pages show it.
#[derive(Debug, Clone, Serialize)]
pub struct OutboxRow {
    /// The outbox row id.
    pub id: i64,
    /// The event's CloudEvents `id`.
    pub event_id: String,
    /// The stream it belongs to.
    pub stream: String,
    /// Its sequence number in the stream.
    pub seq: u64,
    /// The CloudEvents `type`.
    pub event_type: String,
    /// The topic it is published on.
    pub topic: String,
    /// "pending" or "published".
    pub status: &'static str,
    /// When it was enqueued, in ms since the Unix epoch.
    pub created_at_ms: i64,
    /// When its PUBACK was recorded, if it was.
    pub published_at_ms: Option<i64>,
    /// The envelope as published.
    pub event: serde_json::Value,
}

/// Which rows [`list`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFilter {
    /// Every row.
    All,
    /// Rows not yet published.
    Pending,
    /// Rows published.
    Published,
}

/// Up to `limit` rows in id order: with `newest_first`, those with `id < after` (all
/// when `after` is 0) from the newest down; otherwise those with `id > after`. Only
/// rows of `stream` when it is given.
pub fn list(
    conn: &Connection,
    filter: RowFilter,
    stream: Option<&str>,
    after: i64,
    limit: u32,
    newest_first: bool,
) -> Result<Vec<OutboxRow>, DbError> {
    let condition = match filter {
        RowFilter::All => "1",
        RowFilter::Pending => "published_at_ms IS NULL",
        RowFilter::Published => "published_at_ms IS NOT NULL",
    };
    let (cursor, order) = match (newest_first, after) {
        (true, 0) => ("?1 = 0", "DESC"),
        (true, _) => ("id < ?1", "DESC"),
        (false, _) => ("id > ?1", "ASC"),
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT id, event_id, stream, seq, event_type, topic, created_at_ms, published_at_ms, payload
         FROM outbox WHERE {condition} AND {cursor} AND (?3 IS NULL OR stream = ?3)
         ORDER BY id {order} LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![after, limit, stream], |r| {
            let published_at_ms: Option<i64> = r.get(7)?;
            let payload: Vec<u8> = r.get(8)?;
            Ok(OutboxRow {
                id: r.get(0)?,
                event_id: r.get(1)?,
                stream: r.get(2)?,
                seq: r.get::<_, i64>(3)? as u64,
                event_type: r.get(4)?,
                topic: r.get(5)?,
                status: if published_at_ms.is_some() {
                    "published"
                } else {
                    "pending"
                },
                created_at_ms: r.get(6)?,
                published_at_ms,
                event: serde_json::from_slice(&payload).unwrap_or(serde_json::Value::Null),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::restamp;

    #[test]
    fn restamping_changes_only_the_epoch_attribute() {
        let with = br#"{"specversion":"1.0","id":"a","sequence":"00000000000000000007","epoch":"old","data":{"epoch":"old","n":1e2,"big":123456789012345678901234567890}}"#;
        assert_eq!(
            restamp(with, "new").unwrap(),
            br#"{"specversion":"1.0","id":"a","sequence":"00000000000000000007","epoch":"new","data":{"epoch":"old","n":1e2,"big":123456789012345678901234567890}}"#.to_vec(),
            "the data, its numbers and its order untouched"
        );
        let without = br#"{"id":"a","sequence":"00000000000000000007","data":{}}"#;
        assert_eq!(
            restamp(without, "new").unwrap(),
            br#"{"id":"a","sequence":"00000000000000000007","epoch":"new","data":{}}"#.to_vec(),
            "an envelope from before epochs gets one"
        );
        assert_eq!(restamp(b"garbage", "new"), None);
        assert_eq!(restamp(br#"{"sequence":"12"}"#, "new"), None);
    }
}
