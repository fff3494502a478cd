//! The relay: publishes pending outbox rows to the broker with QoS1 and marks each one
//! published only after the broker's PUBACK for that very row.
//!
//! One task owns the MQTT event loop and all relay state, and waits on whichever comes
//! first: an MQTT event, a local commit that inserted outbox rows (an in-process
//! signal from the writer), a timer that checks `PRAGMA data_version` for commits made
//! by other processes, the result of a database read or write (run off the async
//! threads), or a timer (head announcements, retention). When idle it sleeps.
//!
//! - Publishing: rows are read ahead in id order (sequence order within each stream),
//!   up to `--relay-batch-max` at a time, into a buffer, and handed to rumqttc from
//!   it while fewer than `--relay-inflight-max` await their PUBACK.
//! - Marking: PUBACKed row ids are collected and marked in one write per batch of at
//!   least `MARK_BATCH_MIN` (250) rows while more are in flight (at once when none are).
//! - Failure: on any connection error the PUBACK correlation is dropped, the relay
//!   waits (capped exponential backoff with jitter) and, once connected again,
//!   publishes every row still pending from the start: at-least-once. Killed at any
//!   instant, it resumes the same way on restart.
//! - Recovery (docs/recovery.md): it announces each stream's head every
//!   `--relay-heads-interval-ms` and answers replay requests by setting the requested
//!   rows back to pending.
//! - Delivery check ([`probe`]): a PUBACK does not prove that the broker delivers a
//!   message (an ACL may drop it), so the relay sends itself a probe on its own event
//!   topics at the same interval, and reports when one does not come back.

mod correlation;
mod heads;
pub mod probe;

use correlation::Correlator;
use probe::Probe;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};

use crate::mqtt::{Gate, Link, LinkOptions, LinkStatus, Note, Polled};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;
use tokio::time::{interval, sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::outbox::{self, PendingRow};
use crate::protocol::{self, HeadAnnouncement, PositionReport, ReplayRequest, Topics};
use crate::retry::{truncated, LogLimiter, LOG_DETAIL_MAX_CHARS};
use crate::storage::{Database, DbError};

/// Rows deleted per retention transaction at most, so that retention never holds the
/// writer for long.
const PRUNE_BATCH_ROWS: usize = 1_000;
/// Replay requests for one stream are served at most this often; a consumer whose gap
/// is still open asks again (see `--consumer-replay-retry-ms`).
const REPLAY_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// Streams whose last replay time is remembered at most (bounds memory under a flood
/// of requests naming made-up streams).
const REPLAY_MEMORY_MAX: usize = 10_000;
/// Position reports are gathered (the latest per consumer) and written together this
/// often, in one transaction: a burst of reports costs one write, not one each.
const REPORT_FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Bytes of position reports waiting to be written at most; a report from a consumer
/// not already waiting that would go beyond is dropped (it reports again an interval
/// later). Bounds memory under a flood of reports naming made-up consumers.
const REPORTS_PENDING_MAX_BYTES: usize = 4 << 20;
/// Bytes of position reports waiting from one consumer at most (its pages, merged).
const REPORTS_PER_CONSUMER_MAX_BYTES: usize = 1 << 20;
/// Head announcement pages that rumqttc's queue holds room for, beside the events.
const HEADS_PAGES_QUEUED: usize = 64;
/// Replay requests served per consumer per [`REPLAY_WINDOW`] at most.
const REPLAYS_PER_CONSUMER_MAX: u32 = 60;
const REPLAY_WINDOW: Duration = Duration::from_secs(60);
/// PUBACKed rows gathered before they are marked while other rows are still in flight.
/// Each mark is a commit (an fsync) that rewrites the rows' pages and the pending
/// indexes; marking whatever had arrived (often a few dozen rows) rewrote the same
/// pages many times: relay drain 59,900 events/s, against 72,500 with this minimum
/// (interleaved runs of 100,000 rows, docs/performance.md).
const MARK_BATCH_MIN: usize = 250;
/// Wait before reading or marking again after a failed read or mark.
const DB_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Time given to the DISCONNECT packet on shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A probe may take at least this long to come back before the relay reports that the
/// broker does not deliver its publishes (otherwise twice `--relay-heads-interval-ms`).
const PROBE_TIMEOUT_MIN: Duration = Duration::from_secs(2);

/// Errors that stop the relay from starting.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    /// A setting is invalid.
    Config(#[from] ConfigError),
    #[error("relay cannot open the database: {0}")]
    /// The database could not be read.
    Db(#[from] DbError),
    /// The outbox holds events written under other settings.
    #[error(
        "the outbox's stream {stream:?} holds events written for topic {stored:?}, but --source and \
         --topic-prefix now give {expected:?}: start with the settings they were written with \
         (a producer's name and prefix cannot change while it holds events)"
    )]
    ForeignTopics {
        /// The stream.
        stream: String,
        /// A topic its rows were written for.
        stored: String,
        /// The topic the current settings give.
        expected: String,
    },
}

/// What the relay is doing, for status pages. Cheap to read at any time.
#[derive(Debug, Default)]
pub struct RelayStatus {
    connected: AtomicBool,
    marked_published: AtomicU64,
    publish_retries: AtomicU64,
    replays_served: AtomicU64,
    publish_refused: Note,
    connection_error: Note,
    /// The broker answered CONNECT with a refusal (bad credentials, not authorised).
    connect_refused: AtomicBool,
    epoch: Note,
    epoch_changes: AtomicU64,
    unmatched_publishes: AtomicU64,
    link: Arc<LinkStatus>,
}

impl RelayStatus {
    /// True while connected to the broker.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Rows marked published since the relay started.
    pub fn marked_published(&self) -> u64 {
        self.marked_published.load(Ordering::Relaxed)
    }
    /// Publishes handed to the broker again since the relay started: rows whose PUBACK
    /// a lost connection took with it, and rows the MQTT client's full queue refused.
    pub fn publish_retries(&self) -> u64 {
        self.publish_retries.load(Ordering::Relaxed)
    }
    /// Replay requests acted on since the relay started (those ignored as covered,
    /// too frequent, retained or invalid are not counted).
    pub fn replays_served(&self) -> u64 {
        self.replays_served.load(Ordering::Relaxed)
    }
    /// Why the broker is believed not to deliver this service's publishes (its probe
    /// did not come back: an ACL that denies them, most likely), or None while it does.
    pub fn publish_refused(&self) -> Option<String> {
        self.publish_refused.get()
    }
    /// Why the last attempt to reach the broker failed (refused, TLS certificate not
    /// trusted, ...), while not connected; None once connected.
    pub fn connection_error(&self) -> Option<String> {
        self.connection_error.get()
    }
    /// True while the broker refuses this service's CONNECT (wrong username or
    /// password, not authorised): a setting to fix, not an outage to wait out.
    pub fn connect_refused(&self) -> bool {
        self.connect_refused.load(Ordering::Relaxed)
    }
    /// Publishes that rumqttc reported writing but that the relay had not handed it:
    /// always 0 unless the PUBACK correlation is broken (each one is also logged).
    pub fn unmatched_publishes(&self) -> u64 {
        self.unmatched_publishes.load(Ordering::Relaxed)
    }
    /// The broker connection: the address in use, refused subscriptions, failovers.
    pub fn link(&self) -> &LinkStatus {
        &self.link
    }
    /// The epoch of the last head announcement, once one was built.
    pub fn epoch(&self) -> Option<String> {
        self.epoch.get()
    }
    /// New epochs begun since the relay started because the database was found
    /// rewound (see [`outbox::start_new_epoch`]).
    pub fn epoch_changes(&self) -> u64 {
        self.epoch_changes.load(Ordering::Relaxed)
    }
}

/// Publishes the outbox of one database. See the module docs.
pub struct Relay {
    db: Database,
    config: Config,
    topics: Topics,
    status: Arc<RelayStatus>,
    /// One limiter for every warning about a message from the broker.
    input_log: Mutex<LogLimiter>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
/// A read of pending rows: the (wake, rewind) generations it started at, its limit,
/// its rows.
type FetchResult = ((u64, u64), usize, Result<Vec<PendingRow>, DbError>);
/// A mark of PUBACKed rows: the row ids and the outcome.
type MarkResult = (Vec<i64>, Result<usize, DbError>);

/// Results of work done off the relay task.
enum Side {
    DataVersion(Result<i64, DbError>),
    Heads(Result<HeadAnnouncement, DbError>),
    Replayed {
        stream: String,
        from_seq: u64,
        result: Result<usize, DbError>,
    },
    Pruned(Result<(usize, usize, Option<u64>), DbError>),
    Reported(Result<Vec<(String, outbox::ReportOutcome)>, DbError>),
}

/// The relay task's state between events.
struct State {
    correlator: Correlator,
    /// PUBACKed rows waiting to be marked.
    acked: Vec<i64>,
    /// Rows handed to rumqttc, PUBACKed or being marked: not to be fetched again.
    sent: HashSet<i64>,
    /// Highest id of a row never published that was fetched since the last reset.
    cursor: i64,
    /// Highest id of a row set back to pending by a replay fetched since the last
    /// reset (replayed rows are published after live ones).
    replay_cursor: i64,
    /// Rows fetched ahead, to publish as soon as the in-flight window has room: reading
    /// ahead keeps SQLite reads off the publish path (up to `--relay-batch-max`, with
    /// `replay_buffer`). Rows never published.
    buffer: VecDeque<PendingRow>,
    /// Replayed rows fetched ahead: published only when `buffer` is empty.
    replay_buffer: VecDeque<PendingRow>,
    /// There may be pending rows after `cursor`.
    maybe_more: bool,
    /// Bumped by every wake-up, so that a fetch that started before a commit does not
    /// conclude that nothing is left.
    wake_gen: u64,
    /// Bumped by every rewind. A fetch that started before a rewind is discarded:
    /// its rows would move the cursor past rows the rewind made pending again
    /// (found by `make power-cut`: replayed rows were stranded until the next rewind).
    rewinds: u64,
    connected: bool,
    /// The number of the connection this state counts publishes for ([`Gate`]).
    connection: u64,
    last_data_version: Option<i64>,
    last_replay: HashMap<String, Instant>,
    /// Streams whose replay reset is still being written, and from which sequence: a
    /// request that this covers is a no-op. Forgotten when the reset is done, so that a
    /// replay whose events are lost again can be asked for again.
    replaying: HashMap<String, u64>,
    /// Replay requests served per consumer in the current window: (window start, count).
    replays_by_consumer: HashMap<String, (Instant, u32)>,
    /// Position reports waiting to be written, the latest per consumer: (report, live
    /// rather than retained, its size).
    reports: HashMap<String, (PositionReport, bool, usize)>,
    /// Bytes of `reports`.
    reports_bytes: usize,
    /// A write of reports is under way.
    reports_writing: bool,
    /// Which streams the next head announcement lists.
    announcer: heads::Announcer,
    /// A retention pass is under way.
    pruning: bool,
}

impl State {
    /// Before the first connection: everything pending is to be published.
    fn new() -> State {
        State {
            correlator: Correlator::default(),
            acked: Vec::new(),
            sent: HashSet::new(),
            cursor: 0,
            replay_cursor: 0,
            buffer: VecDeque::new(),
            replay_buffer: VecDeque::new(),
            maybe_more: true,
            wake_gen: 0,
            rewinds: 0,
            connected: false,
            connection: 0,
            last_data_version: None,
            last_replay: HashMap::new(),
            replaying: HashMap::new(),
            replays_by_consumer: HashMap::new(),
            reports: HashMap::new(),
            reports_bytes: 0,
            reports_writing: false,
            announcer: heads::Announcer::default(),
            pruning: false,
        }
    }

    fn wake(&mut self) {
        self.maybe_more = true;
        self.wake_gen += 1;
    }

    /// Start publishing from the first pending row again.
    fn rewind(&mut self) {
        self.cursor = 0;
        self.buffer.clear(); // still pending in the outbox: fetched again
        self.rewind_replays();
    }

    /// A replay set rows back to pending: the replayed rows are fetched again from the
    /// first; live rows carry on where they were.
    fn rewind_replays(&mut self) {
        self.replay_cursor = 0;
        self.replay_buffer.clear();
        self.rewinds += 1;
        self.wake();
    }

    /// Rows fetched and not yet handed to rumqttc.
    fn buffered(&self) -> usize {
        self.buffer.len() + self.replay_buffer.len()
    }

    /// The generations a fetch starting now records.
    fn generations(&self) -> (u64, u64) {
        (self.wake_gen, self.rewinds)
    }

    /// A fetch that started at `generations` with `limit` returned `rows`: they join
    /// the buffer, unless a rewind happened meanwhile (then they are dropped and fetched
    /// again from the start). Also decides whether more rows may be pending. Returns
    /// whether the rows were taken.
    fn fetched(&mut self, generations: (u64, u64), limit: usize, rows: Vec<PendingRow>) -> bool {
        let (wake_gen, rewinds) = generations;
        if rewinds != self.rewinds {
            self.maybe_more = true;
            return false;
        }
        if rows.len() < limit && wake_gen == self.wake_gen {
            self.maybe_more = false;
        }
        for row in rows {
            if row.replayed {
                self.replay_cursor = self.replay_cursor.max(row.id);
                self.replay_buffer.push_back(row);
            } else {
                self.cursor = self.cursor.max(row.id);
                self.buffer.push_back(row);
            }
        }
        true
    }

    /// Whether the PUBACKed rows should be marked now: once [`MARK_BATCH_MIN`] have
    /// gathered, or at once when nothing else is in flight (a trickle of events, a
    /// lost connection) or the relay is stopping.
    fn mark_due(&self, stopping: bool) -> bool {
        !self.acked.is_empty()
            && (self.acked.len() >= MARK_BATCH_MIN || self.correlator.is_empty() || stopping)
    }

    /// The connection is gone: rows waiting for a PUBACK will be published again.
    /// Returns how many.
    fn connection_lost(&mut self) -> u64 {
        let mut again = 0;
        for id in self.correlator.reset() {
            again += u64::from(self.sent.remove(&id));
        }
        self.connected = false;
        self.rewind();
        again
    }
}

/// Awaits the future in `slot`, or never when there is none.
async fn maybe<T>(slot: &mut Option<BoxFuture<T>>) -> T {
    match slot {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl Relay {
    /// A relay for `db`, publishing as `config.source`.
    /// Refuses to start when the outbox holds events written for another `--source`
    /// or `--topic-prefix`: published on the old topics, they would be dropped by the
    /// broker's ACL (or reach nobody), while the probe on the new topics looks healthy.
    pub fn new(db: Database, config: Config) -> Result<Relay, RelayError> {
        config.validate()?;
        let topics = Topics::new(&config.topic_prefix);
        let conn = db.reader()?;
        if let Some((stream, stored, expected)) =
            outbox::foreign_topic(&conn, &topics, &config.source)?
        {
            return Err(RelayError::ForeignTopics {
                stream,
                stored,
                expected,
            });
        }
        drop(conn);
        Ok(Relay {
            topics,
            db,
            config,
            status: Arc::new(RelayStatus::default()),
            input_log: Mutex::new(LogLimiter::new(Duration::from_secs(10))),
        })
    }

    /// Live status, shared with the running relay.
    pub fn status(&self) -> Arc<RelayStatus> {
        self.status.clone()
    }

    /// Runs until `cancel` fires, then waits up to `--shutdown-timeout-ms` for the
    /// PUBACKs of what is in flight and marks them; anything still unacknowledged stays
    /// pending and is published again by the next run.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), RelayError> {
        let cfg = &self.config;
        let window = usize::from(cfg.relay_inflight_max);
        let source = cfg.source.as_str();
        let client_id = format!("{}-relay", cfg.client_id);
        let replay_filter = self.topics.replay_all(source);
        let replay_prefix = replay_filter.trim_end_matches('+').to_owned();
        let positions_filter = self.topics.positions_all(source);
        let positions_prefix = positions_filter.trim_end_matches('+').to_owned();
        let heads_topic = self.topics.heads(source);
        let page_max = cfg.payload_max_bytes.min(protocol::CONTROL_PAGE_MAX_BYTES);
        let probe_topic = self.topics.probe(source);
        let filters = vec![
            rumqttc::SubscribeFilter::new(replay_filter.clone(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(positions_filter.clone(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(probe_topic.clone(), QoS::AtMostOnce),
        ];
        let mut link = Link::start(
            cfg,
            LinkOptions {
                client_id: client_id.clone(),
                role: "relay",
                clean_session: true,
                manual_acks: false,
                // Room for a burst of head announcement pages beside the window.
                request_capacity: window * 2 + 16 + HEADS_PAGES_QUEUED,
                filters,
            },
            self.status.link.clone(),
        )?;
        let client = link.client.clone();
        let mut probe = Probe::new(
            Config::ms(cfg.relay_heads_interval_ms.saturating_mul(2)).max(PROBE_TIMEOUT_MIN),
        );
        let mut probe_log = LogLimiter::new(Duration::from_secs(60));

        // A connection of its own: data_version reports commits by *other* connections.
        let dv_conn = Connection::open_with_flags(
            self.db.path(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(DbError::from)?;
        let dv_conn = Arc::new(Mutex::new(dv_conn));
        let inserted = self.db.writer().outbox_inserted();
        let (side_tx, mut side_rx) = mpsc::channel::<Side>(64);

        let mut st = State::new();
        let mut fetch: Option<BoxFuture<FetchResult>> = None;
        let mut mark: Option<BoxFuture<MarkResult>> = None;
        let mut db_retry_at: Option<Instant> = None;
        let mut poll_tick = interval(Config::ms(cfg.relay_poll_interval_ms));
        let mut heads_tick = interval(Config::ms(cfg.relay_heads_interval_ms));
        let mut report_tick = interval(REPORT_FLUSH_INTERVAL);
        let mut retention_tick = interval(Config::ms(cfg.retention_interval_ms));
        for t in [
            &mut poll_tick,
            &mut heads_tick,
            &mut retention_tick,
            &mut report_tick,
        ] {
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        let mut conn_log = LogLimiter::new(Duration::from_secs(60));
        let mut db_log = LogLimiter::new(Duration::from_secs(60));
        let mut drain_deadline: Option<Instant> = None;

        loop {
            if st.connected && drain_deadline.is_none() {
                self.publish_buffered(&client, &link.gate, &mut st, window);
            }
            if drain_deadline.is_none()
                && st.connected
                && fetch.is_none()
                && db_retry_at.is_none()
                && st.maybe_more
                && st.buffered() <= cfg.relay_batch_max / 2
            {
                let limit = cfg.relay_batch_max - st.buffered();
                let (after, replay_after) = (st.cursor, st.replay_cursor);
                let (generations, db) = (st.generations(), self.db.clone());
                fetch = Some(Box::pin(async move {
                    let rows = db
                        .read(move |c| outbox::fetch_pending(c, after, replay_after, limit))
                        .await;
                    (generations, limit, rows)
                }));
            }
            if mark.is_none() && db_retry_at.is_none() && st.mark_due(drain_deadline.is_some()) {
                let ids = std::mem::take(&mut st.acked);
                let (writer, batch) = (self.db.writer().clone(), ids.clone());
                mark = Some(Box::pin(async move {
                    let result = writer
                        .write(move |tx| outbox::mark_published(tx, &batch))
                        .await;
                    (ids, result)
                }));
            }
            if let Some(deadline) = drain_deadline {
                if st.correlator.is_empty() && st.acked.is_empty() && mark.is_none() {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        unacknowledged = st.correlator.len(),
                        unmarked = st.acked.len(),
                        "relay shutdown timeout: leaving these rows pending, they will be published again"
                    );
                    break;
                }
            }

            tokio::select! {
                _ = cancel.cancelled(), if drain_deadline.is_none() => {
                    tracing::info!(in_flight = st.correlator.len(), "relay stopping");
                    drain_deadline = Some(Instant::now() + Config::ms(cfg.shutdown_timeout_ms));
                }
                _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if drain_deadline.is_some() => {}
                polled = link.events.recv() => match polled {
                    None => break, // the link task ended: cannot happen before shutdown
                    Some(Polled::Connected { session_present, connection }) => {
                        tracing::info!(session_present, broker = ?self.status.link.broker(), "relay connected to broker");
                        st.connected = true;
                        st.connection = connection;
                        self.status.connected.store(true, Ordering::Relaxed);
                        self.status.connection_error.set(None);
                        self.status.connect_refused.store(false, Ordering::Relaxed);
                        conn_log.reset();
                        st.rewind();
                        st.announcer.reset();
                        heads_tick.reset_immediately();
                    }
                    Some(Polled::Event(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        if !st.correlator.on_outgoing_publish(pkid) {
                            self.status.unmatched_publishes.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(Polled::Event(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(Some(row)) = st.correlator.on_puback(ack.pkid) {
                            st.acked.push(row);
                        }
                    }
                    Some(Polled::Event(Event::Incoming(Packet::Publish(p)))) => {
                        if p.topic == probe_topic {
                            if probe.on_echo(&p.payload) {
                                tracing::info!(topic = %probe_topic, "relay: the broker delivers this service's publishes again");
                                self.status.publish_refused.set(None);
                                probe_log.reset();
                            }
                        } else if let Some(consumer) = p.topic.strip_prefix(replay_prefix.as_str()) {
                            self.on_replay_request(consumer, p.retain, &p.payload, &mut st, &side_tx);
                        } else if let Some(consumer) = p.topic.strip_prefix(positions_prefix.as_str()) {
                            self.on_position_report(consumer, p.retain, &p.payload, &mut st);
                        }
                    }
                    Some(Polled::Event(_)) => {}
                    Some(Polled::Lost { why, refused }) => {
                        let was_connected = st.connected;
                        let again = st.connection_lost();
                        self.status.publish_retries.fetch_add(again, Ordering::Relaxed);
                        probe.connection_lost();
                        self.status.connected.store(false, Ordering::Relaxed);
                        self.status.connect_refused.store(refused, Ordering::Relaxed);
                        if let Some(suppressed) = conn_log.allow() {
                            tracing::warn!(error = %why, was_connected, suppressed, "relay: broker connection failed; rows stay pending and are re-published after reconnecting");
                        }
                        self.status.connection_error.set(Some(why));
                    }
                },
                (generations, limit, rows) = maybe(&mut fetch) => {
                    fetch = None;
                    match rows {
                        Ok(rows) => {
                            db_log.reset();
                            st.fetched(generations, limit, rows);
                        }
                        Err(e) => {
                            if let Some(suppressed) = db_log.allow() {
                                tracing::error!(error = %e, suppressed, "relay cannot read the outbox");
                            }
                            db_retry_at = Some(Instant::now() + DB_RETRY_DELAY);
                        }
                    }
                }
                (ids, result) = maybe(&mut mark) => {
                    mark = None;
                    match result {
                        Ok(_) => {
                            for id in &ids {
                                st.sent.remove(id);
                            }
                            self.status.marked_published.fetch_add(ids.len() as u64, Ordering::Relaxed);
                            tracing::debug!(rows = ids.len(), "marked published after PUBACK");
                        }
                        Err(e) => {
                            if let Some(suppressed) = db_log.allow() {
                                tracing::error!(error = %e, rows = ids.len(), suppressed, "relay cannot mark rows published; retrying (they may be published twice)");
                            }
                            st.acked.extend(ids);
                            db_retry_at = Some(Instant::now() + DB_RETRY_DELAY);
                        }
                    }
                }
                _ = sleep_until(db_retry_at.unwrap_or_else(Instant::now)), if db_retry_at.is_some() => {
                    db_retry_at = None;
                }
                _ = inserted.notified() => st.wake(),
                _ = poll_tick.tick() => {
                    let (conn, tx) = (dv_conn.clone(), side_tx.clone());
                    tokio::task::spawn_blocking(move || {
                        let v = conn
                            .lock()
                            .map_err(|_| DbError::Join("data_version connection poisoned".into()))
                            .and_then(|c| Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?));
                        let _ = tx.blocking_send(Side::DataVersion(v));
                    });
                }
                _ = heads_tick.tick(), if st.connected && drain_deadline.is_none() => {
                    let tick = probe.tick(Instant::now().into_std());
                    if tick.newly_refused || (probe.refused() && tick.send.is_some()) {
                        let why = format!(
                            "the broker acknowledged this service's probe on {probe_topic} but did not deliver it within {} ms: \
                             it most likely refuses this service's publishes or subscriptions (check its ACL and --mqtt-username); \
                             events are kept and consumers ask for them again once it is fixed",
                            probe.timeout().as_millis()
                        );
                        if let Some(suppressed) = probe_log.allow() {
                            tracing::error!(suppressed, "relay: {why}");
                        }
                        self.status.publish_refused.set(Some(why));
                    }
                    if let Some(payload) = tick.send {
                        if !control_publish(&client, &link.gate, &mut st, &probe_topic, false, payload) {
                            probe.connection_lost(); // never sent: nothing to wait for
                        }
                    }
                    let tx = side_tx.clone();
                    let db = self.db.clone();
                    let announcer = source.to_owned();
                    tokio::spawn(async move {
                        let heads = db.read(move |c| outbox::announcement(c, &announcer)).await;
                        let _ = tx.send(Side::Heads(heads)).await;
                    });
                }
                _ = report_tick.tick(), if !st.reports.is_empty() && !st.reports_writing => {
                    st.reports_writing = true;
                    st.reports_bytes = 0;
                    let reports: Vec<(PositionReport, bool)> =
                        st.reports.drain().map(|(_, (r, live, _))| (r, live)).collect();
                    let (tx, writer) = (side_tx.clone(), self.db.writer().clone());
                    let retention_ms = cfg.retention_ms;
                    let may_rewind = self.status.epoch_changes() == 0;
                    tokio::spawn(async move {
                        // A retained report (delivered because this relay just
                        // subscribed) may be the last word of a consumer that is gone:
                        // recording it would keep that consumer alive, and retention
                        // held back, at every reconnect; live consumers report again
                        // soon. It still tells whether this database was rewound: what
                        // that consumer applied, it applied.
                        let result = writer
                            .write(move |t| {
                                reports
                                    .iter()
                                    .map(|(r, live)| {
                                        Ok((r.consumer.clone(), outbox::take_report(t, r, *live, retention_ms, may_rewind)?))
                                    })
                                    .collect::<Result<Vec<_>, DbError>>()
                            })
                            .await;
                        let _ = tx.send(Side::Reported(result)).await;
                    });
                }
                _ = retention_tick.tick(), if drain_deadline.is_none() && !st.pruning => {
                    st.pruning = true;
                    let (tx, writer) = (side_tx.clone(), self.db.writer().clone());
                    let (keep_ms, expiry_ms, max_bytes) = (cfg.retention_ms, cfg.consumer_expiry_ms, cfg.retention_max_bytes);
                    tokio::spawn(async move {
                        let result = prune_all(&writer, keep_ms, expiry_ms, max_bytes).await;
                        let _ = tx.send(Side::Pruned(result)).await;
                    });
                }
                Some(side) = side_rx.recv() => match side {
                    Side::DataVersion(Ok(v)) => {
                        if st.last_data_version.is_some_and(|old| old != v) {
                            st.wake();
                        }
                        st.last_data_version = Some(v);
                    }
                    Side::Heads(Ok(msg)) => {
                        if let Some(epoch) = &msg.epoch {
                            self.status.epoch.set(Some(epoch.clone()));
                        }
                        if st.connected && !msg.streams.is_empty() {
                            let listed = st.announcer.select(msg);
                            let mut all = true;
                            for page in listed.pages(page_max) {
                                let payload = serde_json::to_vec(&page).expect("head announcements serialise");
                                if !control_publish(&client, &link.gate, &mut st, &heads_topic, true, payload) {
                                    all = false;
                                    break; // listed again at the next interval
                                }
                                st.announcer.sent(&page);
                            }
                            if all {
                                st.announcer.all_sent();
                            }
                        }
                    }
                    Side::Replayed { stream, from_seq, result: Ok(rows) } => {
                        st.replaying.remove(&stream);
                        tracing::info!(stream = %stream, from_seq, rows, "replay: rows set back to pending");
                        if rows > 0 {
                            st.rewind_replays();
                        }
                    }
                    Side::Pruned(Ok((aged, capped, over))) => {
                        st.pruning = false;
                        if aged > 0 {
                            tracing::info!(rows = aged, "retention deleted old published outbox rows");
                        }
                        if capped > 0 {
                            tracing::info!(rows = capped, max_bytes = cfg.retention_max_bytes, "retention deleted the oldest published outbox rows to keep the database within --retention-max-bytes");
                        }
                        if let Some(used) = over {
                            tracing::warn!(used_bytes = used, max_bytes = cfg.retention_max_bytes, "the database is above --retention-max-bytes and holds no more outbox history that may be deleted: the rest is unpublished, not yet applied by a known consumer, inbox history or domain data");
                        }
                    }
                    Side::Reported(Ok(outcomes)) => {
                        st.reports_writing = false;
                        for (consumer, outcome) in outcomes {
                            let (stream, position, last, change) = match outcome {
                                outbox::ReportOutcome::Rewound { stream, position, last, change } => (stream, position, last, change),
                                outbox::ReportOutcome::RewindIgnored { stream, position, last } => {
                                    self.input_warning(
                                        "ignoring a claim that this database was rewound: an epoch began already since the relay started (restart the service after restoring a backup)",
                                        format!("consumer {consumer}, stream {stream}, position {position}, last {last}"),
                                    );
                                    continue;
                                }
                                _ => continue,
                            };
                            tracing::error!(
                            consumer = %consumer, stream = %stream, position, last,
                            from_epoch = %change.from, to_epoch = %change.to, restamped = change.restamped,
                            "this database was rewound (restored from an older backup?): a consumer has applied more of its epoch than it holds; \
                             a new epoch began, and the events written since it was opened are published again in it (docs/recovery.md)"
                        );
                            self.status.epoch_changes.fetch_add(1, Ordering::Relaxed);
                            self.status.epoch.set(Some(change.to));
                            st.rewind();
                            heads_tick.reset_immediately();
                        }
                    }
                    Side::Replayed { stream, result: Err(e), .. } => {
                        st.replaying.remove(&stream);
                        if let Some(suppressed) = db_log.allow() {
                            tracing::error!(error = %e, suppressed, "relay could not set rows back to pending for a replay");
                        }
                    }
                    Side::Reported(Err(e)) => {
                        st.reports_writing = false;
                        if let Some(suppressed) = db_log.allow() {
                            tracing::error!(error = %e, suppressed, "relay could not write position reports; consumers report again");
                        }
                    }
                    Side::Pruned(Err(e)) => {
                        st.pruning = false;
                        if let Some(suppressed) = db_log.allow() {
                            tracing::error!(error = %e, suppressed, "relay retention failed; will try again");
                        }
                    }
                    Side::DataVersion(Err(e)) | Side::Heads(Err(e)) => {
                        if let Some(suppressed) = db_log.allow() {
                            tracing::error!(error = %e, suppressed, "relay database task failed");
                        }
                    }
                },
            }
        }

        self.status.connected.store(false, Ordering::Relaxed);
        if st.connected {
            link.disconnect(DISCONNECT_TIMEOUT).await;
        }
        tracing::info!("relay stopped");
        Ok(())
    }

    /// Hands buffered rows to rumqttc while fewer than `window` await their PUBACK.
    /// A row rumqttc refuses (its queue is full) goes back to the buffer's front.
    fn publish_buffered(&self, client: &AsyncClient, gate: &Gate, st: &mut State, window: usize) {
        let gate = gate.lock();
        if !gate.admits(st.connection) {
            return; // the connection died: wait for the relay to read why
        }
        while st.correlator.len() < window {
            let Some(row) = st
                .buffer
                .pop_front()
                .or_else(|| st.replay_buffer.pop_front())
            else {
                return;
            };
            if st.sent.contains(&row.id) {
                continue; // in flight or being marked already
            }
            st.correlator.queued(Some(row.id));
            let (topic, payload) = (row.topic, row.payload);
            if let Err(e) = client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                st.correlator.unqueue_last();
                self.status.publish_retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "relay: MQTT request queue full; will retry");
                // rumqttc hands the refused publish back: keep its bytes for the retry.
                if let rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p)) = e {
                    let (topic, payload) = (p.topic, p.payload.to_vec());
                    let buffer = if row.replayed {
                        &mut st.replay_buffer
                    } else {
                        &mut st.buffer
                    };
                    buffer.push_front(PendingRow {
                        topic,
                        payload,
                        ..row
                    });
                } else {
                    st.rewind(); // cannot happen; fetch everything again rather than lose it
                }
                return;
            }
            tracing::debug!(event_id = %row.event_id, stream = %row.stream, seq = row.seq, "publishing");
            st.sent.insert(row.id);
        }
    }

    /// A warning about a message from the broker: rate-limited, its detail truncated,
    /// so that no sender can flood the log.
    fn input_warning(&self, what: &str, detail: impl std::fmt::Display) {
        let mut log = self.input_log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(suppressed) = log.allow() {
            let detail = truncated(&detail.to_string(), LOG_DETAIL_MAX_CHARS);
            tracing::warn!(detail = %detail, suppressed, "relay: {what}");
        }
    }

    fn on_replay_request(
        &self,
        consumer: &str,
        retained: bool,
        payload: &[u8],
        st: &mut State,
        side: &mpsc::Sender<Side>,
    ) {
        if retained {
            // A replay request is a one-time ask; retained, it would replay the whole
            // history at every connect.
            self.input_warning("ignoring a retained replay request", consumer);
            return;
        }
        let req: ReplayRequest = match protocol::parse_control(payload) {
            Ok(r) => r,
            Err(e) => {
                self.input_warning("ignoring malformed replay request", &e);
                return;
            }
        };
        if let Err(e) = req.validate() {
            self.input_warning("ignoring invalid replay request", &e);
            return;
        }
        if req.consumer != consumer {
            self.input_warning(
                "ignoring replay request: consumer does not match its topic",
                consumer,
            );
            return;
        }
        let now = Instant::now();
        if st
            .replaying
            .get(&req.stream)
            .is_some_and(|from| *from <= req.from_seq)
        {
            tracing::debug!(stream = %req.stream, from_seq = req.from_seq, "replay request covered by the replay in progress; ignored");
            return;
        }
        if st
            .last_replay
            .get(&req.stream)
            .is_some_and(|t| now.duration_since(*t) < REPLAY_MIN_INTERVAL)
        {
            tracing::debug!(stream = %req.stream, "replay request for a stream replayed moments ago; ignored");
            return;
        }
        if st.last_replay.len() >= REPLAY_MEMORY_MAX {
            st.last_replay.clear();
        }
        if st.replays_by_consumer.len() >= REPLAY_MEMORY_MAX {
            st.replays_by_consumer.clear();
        }
        let window = st
            .replays_by_consumer
            .entry(req.consumer.clone())
            .or_insert((now, 0));
        if now.duration_since(window.0) >= REPLAY_WINDOW {
            *window = (now, 0);
        }
        if window.1 >= REPLAYS_PER_CONSUMER_MAX {
            self.input_warning(
                "ignoring replay request: this consumer asked too often (REPLAYS_PER_CONSUMER_MAX a minute)",
                consumer,
            );
            return;
        }
        window.1 += 1;
        st.last_replay.insert(req.stream.clone(), now);
        let from = st
            .replaying
            .entry(req.stream.clone())
            .or_insert(req.from_seq);
        *from = (*from).min(req.from_seq);
        tracing::info!(consumer = %req.consumer, stream = %req.stream, from_seq = req.from_seq, "replay requested");
        self.status.replays_served.fetch_add(1, Ordering::Relaxed);
        let (writer, tx) = (self.db.writer().clone(), side.clone());
        tokio::spawn(async move {
            let (stream, from_seq) = (req.stream, req.from_seq.max(1));
            let s = stream.clone();
            let result = writer
                .write(move |t| outbox::reset_for_replay(t, &s, from_seq))
                .await;
            let _ = tx
                .send(Side::Replayed {
                    stream,
                    from_seq,
                    result,
                })
                .await;
        });
    }

    fn on_position_report(&self, consumer: &str, retained: bool, payload: &[u8], st: &mut State) {
        let report: PositionReport = match protocol::parse_control(payload) {
            Ok(r) => r,
            Err(e) => {
                self.input_warning("ignoring malformed position report", &e);
                return;
            }
        };
        if let Err(e) = report.validate() {
            self.input_warning("ignoring invalid position report", &e);
            return;
        }
        if report.consumer != consumer {
            self.input_warning(
                "ignoring position report: consumer does not match its topic",
                consumer,
            );
            return;
        }
        // The latest report of each consumer waits for the next write (every
        // REPORT_FLUSH_INTERVAL): a burst costs one transaction, and a flood of
        // reports from made-up consumers is bounded in bytes. A consumer of many
        // streams reports in pages: a page joins the one waiting in the same epoch.
        let live = !retained;
        let (merge, waiting) = match st.reports.get(consumer) {
            Some((w, w_live, n)) => (*w_live == live && w.epoch == report.epoch, *n),
            None => (false, 0),
        };
        let size = payload.len() + if merge { waiting } else { 0 };
        if st.reports_bytes - waiting + size > REPORTS_PENDING_MAX_BYTES
            || size > REPORTS_PER_CONSUMER_MAX_BYTES
        {
            self.input_warning(
                "dropping a position report: too many waiting to be written",
                consumer,
            );
            return;
        }
        st.reports_bytes = st.reports_bytes - waiting + size;
        match st.reports.get_mut(consumer) {
            Some((w, _, n)) if merge => {
                w.positions.extend(report.positions);
                w.diverged.extend(report.diverged);
                *n = size;
            }
            _ => {
                st.reports.insert(consumer.to_owned(), (report, live, size));
            }
        }
    }
}

/// Hands a control message (a probe, a head announcement) to rumqttc, QoS1, while the
/// gate admits the relay's connection. False when it was not sent.
fn control_publish(
    client: &AsyncClient,
    gate: &Gate,
    st: &mut State,
    topic: &str,
    retain: bool,
    payload: Vec<u8>,
) -> bool {
    let gate = gate.lock();
    if !gate.admits(st.connection) {
        return false;
    }
    st.correlator.queued(None);
    if client
        .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        .is_err()
    {
        st.correlator.unqueue_last();
        return false;
    }
    true
}

/// Retention, in batches of [`PRUNE_BATCH_ROWS`] so that it never holds the writer
/// for long: by age, then by `--retention-max-bytes`. Returns the rows it deleted by
/// age and by size, and the used bytes if still above the cap.
async fn prune_all(
    writer: &crate::storage::writer::Writer,
    retention_ms: u64,
    expiry_ms: u64,
    max_bytes: u64,
) -> Result<(usize, usize, Option<u64>), DbError> {
    writer
        .write(move |t| outbox::forget_expired_consumers(t, expiry_ms))
        .await?;
    let before = crate::clock::now_ms().saturating_sub(retention_ms as i64);
    let (mut total, mut cursor) = (0, 0);
    loop {
        let (n, at) = writer
            .write(move |t| {
                let mut at = cursor;
                let n =
                    outbox::prune_window(t, &mut at, before, expiry_ms, PRUNE_BATCH_ROWS, true)?;
                Ok::<_, DbError>((n, at))
            })
            .await?;
        let Some(n) = n else { break };
        (total, cursor) = (total + n, at);
        tokio::task::yield_now().await;
    }
    // The cap: from the oldest row again, at any age but the last hour.
    let before = crate::clock::now_ms().saturating_sub(CAP_MIN_AGE_MS);
    let cursor = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let (capped, over) =
        crate::storage::prune_to_fit(writer, max_bytes, PRUNE_BATCH_ROWS, move |t, window| {
            let mut at = cursor.load(Ordering::Relaxed);
            let n = outbox::prune_window(t, &mut at, before, expiry_ms, window, false)?;
            cursor.store(at, Ordering::Relaxed);
            Ok(n)
        })
        .await?;
    Ok((total, capped, over))
}

/// `--retention-max-bytes` deletes no outbox row younger than this: a consumer that
/// has not reported its position in a new stream yet may still ask for them.
const CAP_MIN_AGE_MS: i64 = 3_600_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State {
            connected: true,
            ..State::new()
        }
    }

    fn row(id: i64) -> PendingRow {
        PendingRow {
            id,
            event_id: id.to_string(),
            stream: "s".into(),
            seq: id as u64,
            topic: "t".into(),
            payload: Vec::new(),
            replayed: false,
        }
    }

    #[test]
    fn live_rows_are_published_before_replayed_ones_and_a_replay_leaves_the_live_cursor() {
        let mut st = state();
        let replayed = |id| PendingRow {
            replayed: true,
            ..row(id)
        };
        let started = st.generations();
        assert!(st.fetched(started, 10, vec![row(900), replayed(1), replayed(2)]));
        assert_eq!((st.cursor, st.replay_cursor), (900, 2));
        st.rewind_replays(); // another replay request reset rows again
        assert_eq!((st.cursor, st.replay_cursor), (900, 0));
        assert_eq!(st.buffer.len(), 1, "the live row stays buffered");
        assert!(st.replay_buffer.is_empty());
        let started = st.generations();
        assert!(st.fetched(started, 10, vec![row(901), replayed(1)]));
        let order: Vec<i64> = st
            .buffer
            .iter()
            .chain(st.replay_buffer.iter())
            .map(|r| r.id)
            .collect();
        assert_eq!(order, vec![900, 901, 1], "live first, each in id order");
    }

    #[test]
    fn a_fetch_that_started_before_a_rewind_is_discarded() {
        let mut st = state();
        let started = st.generations();
        st.rewind(); // a replay set rows back to pending while the fetch ran
        assert!(!st.fetched(started, 10, vec![row(7), row(8)]));
        assert!(st.buffer.is_empty());
        assert_eq!(st.cursor, 0, "the cursor stays where the rewind put it");
        assert!(st.maybe_more, "the rows are fetched again from the start");
    }

    #[test]
    fn acknowledged_rows_are_marked_in_batches_while_others_are_in_flight() {
        let mut st = state();
        assert!(!st.mark_due(false), "nothing acknowledged, nothing to mark");
        st.acked.push(1);
        assert!(st.mark_due(false), "nothing in flight: marked at once");
        st.correlator.queued(Some(2));
        assert!(
            !st.mark_due(false),
            "more in flight: wait for a larger batch"
        );
        assert!(st.mark_due(true), "stopping: marked at once");
        st.acked.extend(3..MARK_BATCH_MIN as i64 + 2);
        assert!(st.mark_due(false), "a full batch is marked");
    }

    #[test]
    fn a_short_fetch_means_nothing_more_unless_a_commit_woke_the_relay_meanwhile() {
        let mut st = state();
        let started = st.generations();
        assert!(st.fetched(started, 10, vec![row(1)]));
        assert_eq!((st.buffer.len(), st.cursor), (1, 1));
        assert!(!st.maybe_more);

        st.maybe_more = true;
        let started = st.generations();
        st.wake(); // a commit landed during the read
        st.fetched(started, 10, vec![row(2)]);
        assert!(st.maybe_more, "the commit may not be in what was read");
    }
}
