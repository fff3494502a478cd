//! The consumer: receives events with QoS1 on a persistent session, applies them
//! through [`crate::consumer::inbox`] and acknowledges each one only after its transaction
//! committed.
//!
//! Two tasks. The *poller* (`mqtt::Link`) owns the MQTT event loop: it
//! forwards received messages, subscribes after every CONNACK (a broker that lost the
//! session has lost the subscriptions too) and again after a refusal, and backs off
//! after errors. The *processor* takes messages in batches, applies each batch in one
//! write (one fsync), then sends the PUBACKs in receive order. Acks are never sent from
//! the poller: rumqttc's request queue would fill while the poller waits on it (a
//! deadlock seen in practice).
//!
//! The processor also repairs what the broker lost (docs/recovery.md): it tracks, per
//! stream, the highest sequence number known to exist (from messages ahead of a gap
//! and from the producer's head announcements) and asks the producer to replay when
//! its position has not reached it for `--consumer-gap-timeout-ms`.

pub mod dead_letters;
pub mod inbox;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, Publish, QoS, SubscribeFilter};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{interval, sleep, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::mqtt::{Gate, Link, LinkOptions, LinkStatus, Polled};
use crate::protocol::{self, HeadAnnouncement, PositionReport, ReplayRequest, Topics};
use crate::retry::{truncated, Backoff, LogLimiter, LOG_DETAIL_MAX_CHARS};
use crate::storage::{Database, DbError};
use inbox::{ApplyError, Handlers, InboxContext, Isolation, Outcome, StreamKey};

/// Sizes rumqttc's request queue (acks, replay requests, position reports). The broker
/// sends at most its `max_inflight_messages` unacknowledged QoS1 messages.
const RECEIVE_QUEUE_MAX: usize = 1_024;
/// How soon acks that rumqttc's full queue refused are offered again.
const ACK_RETRY: Duration = Duration::from_millis(5);
/// Time given to the acks and the DISCONNECT on shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_millis(1_000);
/// Rows deleted per inbox retention transaction at most.
const PRUNE_BATCH_ROWS: usize = 5_000;
/// The per-stream status (`ConsumerStatus::streams`) is rebuilt at most this often.
const STATUS_EVERY: Duration = Duration::from_millis(50);
/// A producer's epoch changes are followed at most this often: a real one happens once
/// per restore, and each costs a replay and a record in `inbox_epoch_changes`, so
/// announcements flipping faster (forged, or stale copies) must not multiply them.
const EPOCH_CHANGE_MIN_INTERVAL: Duration = Duration::from_secs(5);

/// Errors that stop the consumer from starting.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error(transparent)]
    /// A setting is invalid.
    Config(#[from] ConfigError),
    #[error("invalid subscription: {0}")]
    /// A stream to consume has an invalid source or stream name.
    Subscription(String),
    #[error("consumer cannot read its positions: {0}")]
    /// The positions could not be read.
    Db(#[from] DbError),
}

/// One stream's progress, for status pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StreamProgress {
    /// Last sequence number applied.
    pub position: u64,
    /// Highest sequence number known to exist (from heads and received messages).
    pub known_head: u64,
    /// When the open gap (events known to exist, not applied yet) was found.
    #[serde(skip)]
    pub gap_since: Option<Instant>,
}

impl StreamProgress {
    /// Events known to exist and not applied yet.
    pub fn lag(&self) -> u64 {
        self.known_head.saturating_sub(self.position)
    }

    /// How long the open gap has been open, if there is one.
    pub fn gap_open_for(&self) -> Option<Duration> {
        self.gap_since.map(|t| t.elapsed())
    }
}

/// What the consumer is doing, for status pages.
#[derive(Debug, Default)]
pub struct ConsumerStatus {
    connected: AtomicBool,
    received: AtomicU64,
    applied: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    replays_requested: AtomicU64,
    epoch_changes: AtomicU64,
    other_epoch: AtomicU64,
    orphaned: AtomicU64,
    producer_rewound: Mutex<Option<String>>,
    streams: Mutex<BTreeMap<String, StreamProgress>>,
    link: Arc<LinkStatus>,
}

impl ConsumerStatus {
    /// True while the consumer holds a session with the broker.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// The broker connection: the address in use, refused subscriptions, failovers.
    pub fn link(&self) -> &LinkStatus {
        &self.link
    }
    /// Event messages taken for applying since start (applied or not).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    /// Events applied since start.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
    /// Duplicates acknowledged without effect since start.
    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
    /// Messages dead-lettered since start.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_lettered.load(Ordering::Relaxed)
    }
    /// Replay requests sent since start.
    pub fn replays_requested(&self) -> u64 {
        self.replays_requested.load(Ordering::Relaxed)
    }
    /// Producer epoch changes followed since start (docs/recovery.md, "Producer
    /// identity"); each is recorded in `inbox_epoch_changes`.
    pub fn epoch_changes(&self) -> u64 {
        self.epoch_changes.load(Ordering::Relaxed)
    }
    /// Events of another producer epoch than the one followed, acknowledged without
    /// effect since start (they come again once the consumer follows the epoch).
    pub fn other_epoch(&self) -> u64 {
        self.other_epoch.load(Ordering::Relaxed)
    }
    /// Events applied here that their producer no longer has (its database was
    /// replaced or restored from an older backup), counted when epoch changes showed
    /// it since start.
    pub fn orphaned(&self) -> u64 {
        self.orphaned.load(Ordering::Relaxed)
    }
    /// Set while a producer announces, in the epoch this consumer follows, fewer events
    /// than it has applied: that producer's database was rewound and has not noticed
    /// yet (it begins a new epoch when it reads this consumer's position report).
    pub fn producer_rewound(&self) -> Option<String> {
        self.producer_rewound.lock().ok().and_then(|s| s.clone())
    }
    /// Progress per stream ("source/stream").
    pub fn streams(&self) -> BTreeMap<String, StreamProgress> {
        self.streams.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A gap: events up to `known` exist, the position is below it.
#[derive(Debug)]
struct Gap {
    known: u64,
    /// When the gap was found.
    opened_at: Instant,
    /// When the position last moved (or the gap was found).
    progress_at: Instant,
    requested_at: Option<Instant>,
}

/// Consumes the given streams into one database. See the module docs.
pub struct Consumer {
    db: Database,
    config: Config,
    streams: Vec<StreamKey>,
    ctx: Arc<InboxContext>,
    status: Arc<ConsumerStatus>,
    replays_tx: mpsc::Sender<OperatorReplay>,
    replays_rx: mpsc::Receiver<OperatorReplay>,
}

/// How long an operator's replay request waits for the consumer loop.
const OPERATOR_WAIT: Duration = Duration::from_secs(5);

/// A replay an operator asked for, and where to say whether it was sent.
struct OperatorReplay {
    key: StreamKey,
    from_seq: u64,
    sent: oneshot::Sender<Result<(), String>>,
}

/// Why an operator's action on a running consumer was not done.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// This consumer does not consume that stream.
    #[error("this service does not consume {0}")]
    NotConsumed(StreamKey),
    /// A sequence number out of range.
    #[error("from_seq {0} is not 1 to {max}", max = protocol::SEQ_MAX)]
    BadSequence(u64),
    /// The consumer is not running, or could not queue the request.
    #[error("the consumer could not send the request: {0}")]
    NotSent(String),
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Applying the message.
    #[error(transparent)]
    Apply(#[from] inbox::ApplyError),
}

/// An operator's actions on a running consumer (the box's admin endpoints use it):
/// requeue or drop dead letters ([`dead_letters`]) through its own handlers and
/// writer, and ask a producer to replay a stream. Cheap to clone.
#[derive(Clone)]
pub struct ConsumerAdmin {
    db: Database,
    ctx: Arc<InboxContext>,
    streams: Arc<Vec<StreamKey>>,
    replays: mpsc::Sender<OperatorReplay>,
}

impl ConsumerAdmin {
    /// Applies dead letter `id` again; None when there is no such dead letter.
    pub async fn requeue(&self, id: i64) -> Result<Option<dead_letters::Requeued>, AdminError> {
        let ctx = self.ctx.clone();
        Ok(self
            .db
            .writer()
            .write(move |tx| dead_letters::requeue(tx, &ctx, id))
            .await?)
    }

    /// Sets dead letter `id` aside with an optional note; false when there is none.
    pub async fn drop_dead_letter(
        &self,
        id: i64,
        note: Option<String>,
    ) -> Result<bool, AdminError> {
        Ok(self
            .db
            .writer()
            .write(move |tx| dead_letters::drop(tx, id, note.as_deref()))
            .await?)
    }

    /// Asks the producer of `key` to publish the stream again from `from_seq`, as this
    /// consumer (the producer's relay limits how often it serves a stream and a
    /// consumer). Events this consumer has applied come again as duplicates.
    pub async fn request_replay(&self, key: StreamKey, from_seq: u64) -> Result<(), AdminError> {
        if !self.streams.contains(&key) {
            return Err(AdminError::NotConsumed(key));
        }
        if from_seq == 0 || from_seq > protocol::SEQ_MAX {
            return Err(AdminError::BadSequence(from_seq));
        }
        let (sent, answer) = oneshot::channel();
        let stopped = || AdminError::NotSent("the consumer is not running".into());
        self.replays
            .try_send(OperatorReplay {
                key,
                from_seq,
                sent,
            })
            .map_err(|_| {
                AdminError::NotSent("the consumer is busy or stopped; try again".into())
            })?;
        // The loop takes operator requests after the messages waiting for it: during a
        // catch-up that can take a while, and the caller should not wait for ever.
        match tokio::time::timeout(OPERATOR_WAIT, answer).await {
            Ok(answer) => answer.map_err(|_| stopped())?.map_err(AdminError::NotSent),
            Err(_) => Err(AdminError::NotSent(format!(
                "the consumer did not take the request within {OPERATOR_WAIT:?} (it is busy applying); it was not sent, try again"
            ))),
        }
    }
}

impl Consumer {
    /// A consumer of `streams`, applying events with `handlers`.
    pub fn new(
        db: Database,
        config: Config,
        streams: Vec<StreamKey>,
        handlers: Handlers,
    ) -> Result<Consumer, ConsumerError> {
        config.validate()?;
        if streams.is_empty() {
            return Err(ConsumerError::Subscription("no streams to consume".into()));
        }
        for k in &streams {
            protocol::validate_name(&k.source)
                .map_err(|e| ConsumerError::Subscription(format!("source {e}")))?;
            protocol::validate_name(&k.stream)
                .map_err(|e| ConsumerError::Subscription(format!("stream {e}")))?;
        }
        let ctx = Arc::new(InboxContext {
            topics: Topics::new(&config.topic_prefix),
            handlers,
            payload_max_bytes: config.payload_max_bytes,
        });
        let (replays_tx, replays_rx) = mpsc::channel(16);
        Ok(Consumer {
            db,
            config,
            streams,
            ctx,
            status: Arc::new(ConsumerStatus::default()),
            replays_tx,
            replays_rx,
        })
    }

    /// The operator's handle on this consumer, usable while it runs.
    pub fn admin(&self) -> ConsumerAdmin {
        ConsumerAdmin {
            db: self.db.clone(),
            ctx: self.ctx.clone(),
            streams: Arc::new(self.streams.clone()),
            replays: self.replays_tx.clone(),
        }
    }

    /// Live status, shared with the running consumer.
    pub fn status(&self) -> Arc<ConsumerStatus> {
        self.status.clone()
    }

    /// The name this consumer gives producers in replay requests and position reports:
    /// its service's `--source`, which is also its MQTT username under the box's ACL.
    pub fn name(&self) -> &str {
        &self.config.source
    }

    /// The stable MQTT client id of this consumer.
    pub fn client_id(&self) -> String {
        format!("{}-consumer", self.config.client_id)
    }

    /// Runs until `cancel` fires. The batch being applied is finished (committed and
    /// acknowledged) first; messages not yet applied stay with the broker.
    pub async fn run(mut self, cancel: CancellationToken) -> Result<(), ConsumerError> {
        let (_, idle) = mpsc::channel(1);
        let mut operator_replays = std::mem::replace(&mut self.replays_rx, idle);
        let cfg = &self.config;
        let client_id = self.client_id();
        let topics = &self.ctx.topics;
        let mut filters: Vec<SubscribeFilter> = self
            .streams
            .iter()
            .map(|k| SubscribeFilter::new(topics.events(&k.source, &k.stream), QoS::AtLeastOnce))
            .collect();
        let mut sources: Vec<&str> = self.streams.iter().map(|k| k.source.as_str()).collect();
        sources.sort_unstable();
        sources.dedup();
        // Heads are periodic and retained: QoS0 keeps them out of the offline queue.
        filters.extend(
            sources
                .iter()
                .map(|s| SubscribeFilter::new(topics.heads(s), QoS::AtMostOnce)),
        );

        let stored = self.db.read(inbox::positions).await?;
        let mut positions: HashMap<StreamKey, u64> =
            stored.iter().map(|(k, (p, _))| (k.clone(), *p)).collect();
        let epochs: HashMap<StreamKey, Option<String>> =
            stored.into_iter().map(|(k, (_, e))| (k, e)).collect();
        for k in &self.streams {
            positions.entry(k.clone()).or_insert(0);
        }
        // Dropped with this future, so that a consumer killed mid-batch (its task
        // aborted) also drops its connection, as a killed process would.
        let mut link = Link::start(
            cfg,
            LinkOptions {
                client_id,
                role: "consumer",
                clean_session: false,
                manual_acks: true,
                request_capacity: 4 * RECEIVE_QUEUE_MAX,
                filters,
            },
            self.status.link.clone(),
        )?;
        let client = link.client.clone();

        let mut p = Processor {
            consumer: &self,
            client: &client,
            positions,
            epochs,
            gaps: HashMap::new(),
            diverged: HashMap::new(),
            epoch_changed_at: HashMap::new(),
            rewound: BTreeMap::new(),
            report_due: false,
            status_at: Instant::now(),
            status_stale: false,
            dead_log: LogLimiter::new(Duration::from_secs(10)),
            epoch_log: LogLimiter::new(Duration::from_secs(60)),
            db_log: LogLimiter::new(Duration::from_secs(60)),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            unacked: VecDeque::new(),
            gate: link.gate.clone(),
            connection: 0,
            session: 0,
        };
        p.publish_status_now();
        let gap_every = Duration::from_millis((cfg.consumer_gap_timeout_ms / 2).max(10));
        let mut gap_tick = interval(gap_every);
        let mut report_tick = interval(Config::ms(cfg.consumer_report_interval_ms));
        let mut retention_tick = interval(Config::ms(cfg.retention_interval_ms));
        for t in [&mut gap_tick, &mut report_tick, &mut retention_tick] {
            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        let mut batch = Vec::with_capacity(cfg.consumer_batch_max);
        let mut retention: Option<tokio::task::JoinHandle<()>> = None;
        let mut conn_log = LogLimiter::new(Duration::from_secs(60));
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                first = link.events.recv() => {
                    let Some(first) = first else { break };
                    let mut next = Some(first);
                    while let Some(item) = next.take() {
                        match item {
                            Polled::Connected { session_present, connection } => {
                                tracing::info!(session_present, broker = ?self.status.link.broker(), "consumer connected to broker");
                                p.connected(session_present, connection);
                                self.status.connected.store(true, Ordering::Relaxed);
                                p.report_positions();
                            }
                            Polled::Event(Event::Incoming(Packet::Publish(m))) if topics.parse_heads(&m.topic).is_some() => p.on_heads(&m).await,
                            Polled::Event(Event::Incoming(Packet::Publish(mut m))) => {
                                self.status.received.fetch_add(1, Ordering::Relaxed);
                                // rumqttc's payload is a slice of its read buffer: a
                                // message kept until its ack would keep that whole
                                // buffer alive (hundreds of MB over a long backlog).
                                m.payload = bytes::Bytes::copy_from_slice(&m.payload);
                                batch.push(Received { session: p.session, m })
                            }
                            Polled::Event(_) => {}
                            Polled::Lost { why, .. } => {
                                self.status.connected.store(false, Ordering::Relaxed);
                                if let Some(suppressed) = conn_log.allow() {
                                    tracing::warn!(error = %why, suppressed, "consumer: broker connection failed; reconnecting");
                                }
                            }
                        }
                        if batch.len() < cfg.consumer_batch_max {
                            next = link.events.try_recv().ok();
                        }
                    }
                    if !batch.is_empty() && !p.process(&mut batch, &cancel).await {
                        break;
                    }
                    // Nothing more waiting: whoever looks now sees where it stands.
                    if p.status_stale && link.events.is_empty() {
                        p.publish_status_now();
                    }
                    if p.report_due {
                        p.report_positions();
                    }
                }
                // Only while acks can go out: not every 5 ms through an outage.
                _ = sleep(ACK_RETRY), if !p.unacked.is_empty() && p.may_ack() => p.flush_acks(),
                _ = gap_tick.tick() => {
                    p.request_replays();
                    if p.status_stale {
                        p.publish_status_now();
                    }
                }
                Some(r) = operator_replays.recv() => {
                    // A caller that gave up was told it was not sent: do not send it.
                    if !r.sent.is_closed() {
                        let sent = p.send_replay_request(&r.key, r.from_seq);
                        if sent.is_ok() {
                            tracing::info!(stream = %r.key, from_seq = r.from_seq, "an operator asked the producer to replay");
                        }
                        let _ = r.sent.send(sent);
                    }
                }
                _ = report_tick.tick() => p.report_positions(),
                _ = tokio::time::sleep_until(p.status_at + STATUS_EVERY), if p.status_stale => {
                    p.publish_status_now();
                }
                _ = retention_tick.tick() => {
                    // In a task of its own: deleting a million rows takes seconds, and
                    // events keep being applied meanwhile.
                    if retention.as_ref().is_none_or(|r| r.is_finished()) {
                        let writer = self.db.writer().clone();
                        let (keep_ms, max_bytes) = (cfg.retention_ms, cfg.retention_max_bytes);
                        retention = Some(tokio::spawn(prune_all(writer, keep_ms, max_bytes)));
                    }
                }
            }
        }

        tracing::info!("consumer stopping");
        p.publish_status_now();
        if let Some(r) = retention {
            r.abort(); // a pass cut short is taken up at the next start
        }
        // Send the acks of what was committed. Messages still in the channel are not
        // applied and not acknowledged (the broker redelivers them); dropping them
        // keeps the poller, which sends the acks, from waiting on this task.
        let deadline = tokio::time::Instant::now() + DISCONNECT_TIMEOUT;
        while !p.unacked.is_empty() && tokio::time::Instant::now() < deadline {
            while let Ok(item) = link.events.try_recv() {
                if let Polled::Connected {
                    session_present,
                    connection,
                } = item
                {
                    p.connected(session_present, connection);
                }
            }
            p.flush_acks();
            sleep(ACK_RETRY).await;
        }
        // The link sends the queued acks, then the DISCONNECT. When the broker is
        // unreachable there is nothing to send: it is stopped after a moment.
        drop(p);
        link.disconnect(DISCONNECT_TIMEOUT).await;
        self.status.connected.store(false, Ordering::Relaxed);
        tracing::info!("consumer stopped");
        Ok(())
    }
}

/// A message taken for applying, with the broker session it came in.
struct Received {
    session: u64,
    m: Publish,
}

/// The processor's state.
struct Processor<'a> {
    consumer: &'a Consumer,
    client: &'a AsyncClient,
    positions: HashMap<StreamKey, u64>,
    /// The producer epoch each position counts in, as last read or written (a stream
    /// that took its epoch from an event may show None until the next announcement).
    epochs: HashMap<StreamKey, Option<String>>,
    gaps: HashMap<StreamKey, Gap>,
    /// Streams in which the producer's numbering went back, until it begins a new
    /// epoch: `(seq, id applied there)`, sent with the position reports.
    diverged: HashMap<StreamKey, (u64, String)>,
    /// When each producer's epoch change was last followed, and to which epoch (one
    /// entry per source): the later pages of that announcement follow it too.
    epoch_changed_at: HashMap<String, (Instant, String)>,
    /// Streams whose producer announces fewer events than this consumer applied in
    /// its epoch, and why ([`ConsumerStatus::producer_rewound`]).
    rewound: BTreeMap<StreamKey, String>,
    /// A divergence was found: report at once rather than at the next tick.
    report_due: bool,
    /// When the per-stream status was last published, and whether it is behind.
    status_at: Instant,
    status_stale: bool,
    dead_log: LogLimiter,
    epoch_log: LogLimiter,
    db_log: LogLimiter,
    backoff: Backoff,
    /// Committed messages whose PUBACK rumqttc has not accepted yet, in receive order.
    unacked: VecDeque<Received>,
    /// Acks go to rumqttc only while it admits `connection`, the connection whose
    /// CONNACK this task read last: none is left in rumqttc's queue for the next one.
    gate: Arc<Gate>,
    connection: u64,
    /// Bumped when a CONNACK says the broker lost the session: a message of an
    /// earlier session is never acknowledged (its packet id names another message now).
    session: u64,
}

impl Processor<'_> {
    /// A CONNACK was read: acks may go to this connection, and when the broker lost
    /// the session, those of what it had sent never will (their packet ids now name
    /// other messages).
    fn connected(&mut self, session_present: bool, connection: u64) {
        self.connection = connection;
        if !session_present {
            self.session += 1;
        }
        self.flush_acks();
    }

    /// Whether rumqttc would take acks now (the connection this task knows is live).
    fn may_ack(&self) -> bool {
        self.gate.lock().admits(self.connection)
    }

    /// Hands committed messages' PUBACKs to rumqttc, in order, without waiting: when
    /// its request queue is full they wait here. Waiting for it instead would deadlock:
    /// the poller drains that queue only while it can hand received messages to this
    /// task, and rumqttc reads new messages in preference to sending queued acks
    /// (measured: the broker sent 1,250 messages beyond the last ack sent).
    fn flush_acks(&mut self) {
        // rumqttc reports a full queue and a stopped event loop alike; either way
        // the acks wait (messages never acked are redelivered after a reconnect).
        let gate = self.gate.lock();
        if !gate.admits(self.connection) {
            return; // the connection died: wait for the next CONNACK
        }
        while let Some(r) = self.unacked.front() {
            if r.session != self.session {
                self.unacked.pop_front(); // its session is gone, and its ack with it
                continue;
            }
            if self.client.try_ack(&r.m).is_err() {
                return;
            }
            self.unacked.pop_front();
        }
    }

    /// Applies `batch` and acknowledges every message whose outcome is final, in
    /// receive order. Returns false when cancelled while waiting to retry (the rest of
    /// the batch stays unacknowledged; the broker delivers it again).
    async fn process(&mut self, batch: &mut Vec<Received>, cancel: &CancellationToken) -> bool {
        // Without a savepoint per handler first; after a handler failed (the writer
        // rolled the batch back), again with one, for the rest of this batch.
        let mut isolation = Isolation::Optimistic;
        while !batch.is_empty() {
            let messages: Vec<(String, bytes::Bytes)> = batch
                .iter()
                .map(|r| (r.m.topic.clone(), r.m.payload.clone()))
                .collect();
            let ctx = self.consumer.ctx.clone();
            let result = self
                .consumer
                .db
                .writer()
                .write(move |tx| inbox::apply_batch(tx, &ctx, &messages, isolation))
                .await;
            let retry = match result {
                Err(ApplyError::HandlerFailed) => {
                    tracing::debug!(
                        messages = batch.len(),
                        "a handler failed: applying the batch again with a savepoint per handler"
                    );
                    isolation = Isolation::PerHandler;
                    continue;
                }
                Err(e) => Some(e.to_string()),
                Ok(outcomes) => {
                    let mut retry = None;
                    let mut done = 0;
                    for outcome in outcomes {
                        if let Outcome::Retry(reason) = outcome {
                            retry = Some(reason);
                            break;
                        }
                        self.record(outcome);
                        done += 1;
                    }
                    // Committed: now the broker may forget them.
                    self.unacked.extend(batch.drain(..done));
                    self.flush_acks();
                    retry
                }
            };
            self.publish_status();
            match retry {
                None => self.backoff.reset(),
                Some(reason) => {
                    if let Some(suppressed) = self.db_log.allow() {
                        tracing::warn!(error = %reason, waiting = batch.len(), suppressed, "consumer: transient failure; retrying");
                    }
                    tokio::select! {
                        _ = sleep(self.backoff.next_delay()) => {}
                        _ = cancel.cancelled() => return false,
                    }
                }
            }
        }
        true
    }

    fn record(&mut self, outcome: Outcome) {
        let status = &self.consumer.status;
        match outcome {
            Outcome::Applied {
                key,
                seq,
                event_id,
                epoch,
            } => {
                tracing::debug!(%event_id, stream = %key, seq, "applied");
                status.applied.fetch_add(1, Ordering::Relaxed);
                if epoch.is_some() {
                    self.epochs.insert(key.clone(), epoch);
                }
                self.advanced(key, seq);
            }
            Outcome::AppliedBefore { key, seq } => {
                tracing::debug!(stream = %key, seq, "applied before under another epoch of its producer: no effect");
                status.duplicates.fetch_add(1, Ordering::Relaxed);
                self.advanced(key, seq);
            }
            Outcome::Diverged {
                key,
                seq,
                applied_id,
            } => {
                status.duplicates.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.epoch_log.allow() {
                    tracing::error!(stream = %key, seq, %applied_id, suppressed, "the producer sent another event at a sequence number this consumer applied: its database was rewound (restored from an older backup?); telling it");
                }
                if !self.diverged.contains_key(&key) {
                    self.report_due = true;
                }
                self.diverged.insert(key, (seq, applied_id));
            }
            Outcome::OtherEpoch { key, seq } => {
                status.other_epoch.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(stream = %key, seq, "event of another producer epoch than the one followed: not applied");
            }
            Outcome::Duplicate { key, seq } => {
                tracing::debug!(stream = %key, seq, "duplicate acknowledged without effect");
                status.duplicates.fetch_add(1, Ordering::Relaxed);
                // The database's position is at least `seq`: if this process thought
                // otherwise (an operator's requeue moved it), it catches up here
                // rather than asking for replays of what is applied.
                if self.positions.get(&key).is_some_and(|&p| p < seq) {
                    self.advanced(key, seq);
                }
            }
            Outcome::Ahead { key, seq, position } => {
                tracing::debug!(stream = %key, seq, position, "event ahead of a gap: not applied, the gap will be replayed");
                self.known(key, seq);
            }
            Outcome::DeadLettered { reason, advanced } => {
                status.dead_lettered.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.dead_log.allow() {
                    tracing::warn!(reason = %reason.escape_debug(), suppressed, "message dead-lettered");
                }
                if let Some((key, seq)) = advanced {
                    self.advanced(key, seq);
                }
            }
            Outcome::Retry(_) => unreachable!("retries are handled by the caller"),
        }
    }

    fn advanced(&mut self, key: StreamKey, seq: u64) {
        if let Some(gap) = self.gaps.get_mut(&key) {
            gap.progress_at = Instant::now();
            if seq >= gap.known {
                self.gaps.remove(&key);
            }
        }
        self.positions.insert(key, seq);
    }

    /// Sequence numbers up to `seq` exist in `key`.
    fn known(&mut self, key: StreamKey, seq: u64) {
        let position = self.positions.get(&key).copied().unwrap_or(0);
        if seq <= position {
            return;
        }
        let gap = self.gaps.entry(key).or_insert_with(|| Gap {
            known: seq,
            opened_at: Instant::now(),
            progress_at: Instant::now(),
            requested_at: None,
        });
        gap.known = gap.known.max(seq);
    }

    async fn on_heads(&mut self, m: &Publish) {
        let topic_source = self
            .consumer
            .ctx
            .topics
            .parse_heads(&m.topic)
            .unwrap_or_default();
        let heads: HeadAnnouncement = match protocol::parse_control(&m.payload) {
            Ok(h) => h,
            Err(e) => {
                if let Some(suppressed) = self.dead_log.allow() {
                    tracing::warn!(error = %e, topic = %m.topic, suppressed, "ignoring malformed head announcement");
                }
                return;
            }
        };
        if let Err(e) = heads.validate() {
            if let Some(suppressed) = self.dead_log.allow() {
                tracing::warn!(error = %truncated(&e, LOG_DETAIL_MAX_CHARS), topic = %m.topic, suppressed, "ignoring invalid head announcement");
            }
            return;
        }
        if heads.source != topic_source {
            if let Some(suppressed) = self.dead_log.allow() {
                tracing::warn!(topic = %m.topic, suppressed, "ignoring head announcement whose source does not match its topic");
            }
            return;
        }
        // Only the streams this consumer consumes: an announcement may list thousands.
        let mut heads = heads;
        let source = heads.source.clone();
        heads.streams.retain(|stream, _| {
            self.positions.contains_key(&StreamKey {
                source: source.clone(),
                stream: stream.clone(),
            })
        });
        if let Some(announced) = &heads.epoch {
            let follow = heads.streams.keys().any(|stream| {
                let key = StreamKey {
                    source: heads.source.clone(),
                    stream: stream.clone(),
                };
                self.epochs.get(&key).and_then(|e| e.as_deref()) != Some(announced)
            });
            // A change to the epoch last followed is the rest of that change (an
            // announcement comes in pages), not another one.
            let recent = self
                .epoch_changed_at
                .get(&heads.source)
                .is_some_and(|(t, to)| t.elapsed() < EPOCH_CHANGE_MIN_INTERVAL && to != announced);
            if follow && recent {
                // A producer changes epochs once per restore: announcements that flip
                // faster are not followed (each change costs a replay and a record).
                if let Some(suppressed) = self.epoch_log.allow() {
                    tracing::warn!(source = %heads.source, suppressed, "not following another epoch change of this producer so soon after the last one; its next announcement is considered");
                }
            } else if follow {
                self.follow_epoch(&heads).await;
            }
        }
        let mut rewound = None;
        for (stream, head) in heads.streams {
            let key = StreamKey {
                source: heads.source.clone(),
                stream,
            };
            let Some(&position) = self.positions.get(&key) else {
                continue; // a stream this consumer does not consume
            };
            let followed = self.epochs.get(&key).cloned().flatten();
            if heads.epoch.is_some() && followed.is_some() && heads.epoch != followed {
                // Another epoch's heads say nothing about this position (the change
                // was not followed): never skip or count on them.
                continue;
            }
            if heads.epoch.is_some() && heads.epoch == followed && head.last < position {
                let why = format!(
                    "{key}: position {position} in the producer's epoch, which announces only {} events",
                    head.last
                );
                self.rewound.insert(key, why.clone());
                rewound = Some(why);
                continue;
            }
            self.rewound.remove(&key);
            if head.first > position + 1 {
                self.skip_unrecoverable(key.clone(), head.first).await;
            }
            // The producer's word replaces what earlier messages suggested: a forged
            // event far ahead must not keep a gap open (and replays coming) forever.
            // Real events published since the announcement raise it again.
            if let Some(gap) = self.gaps.get_mut(&key) {
                gap.known = head.head;
            }
            self.known(key, head.head);
        }
        if let Some(why) = &rewound {
            if let Some(suppressed) = self.epoch_log.allow() {
                tracing::error!(%why, suppressed, "a producer's database was rewound (restored from an older backup?): waiting for it to begin a new epoch, which it does on this consumer's next position report");
            }
        }
        if let Ok(mut r) = self.consumer.status.producer_rewound.lock() {
            *r = self.rewound.values().next().cloned();
        }
        self.forget_closed_gaps();
        self.publish_status();
    }

    /// Follows a change of a producer's epoch (see [`inbox::follow_epoch`]).
    async fn follow_epoch(&mut self, heads: &HeadAnnouncement) {
        let h = heads.clone();
        match self
            .consumer
            .db
            .read(move |c| inbox::must_follow_epoch(c, &h))
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                // Nothing to change: the streams with a position follow this epoch, and
                // those without one take it with their first event.
                for stream in heads.streams.keys() {
                    let key = StreamKey {
                        source: heads.source.clone(),
                        stream: stream.clone(),
                    };
                    if self.positions.contains_key(&key) {
                        self.epochs.insert(key, heads.epoch.clone());
                    }
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, source = %heads.source, "could not read the epochs followed; will try again at the producer's next announcement");
                return;
            }
        }
        let h = heads.clone();
        let result = self
            .consumer
            .db
            .writer()
            .write(move |tx| inbox::follow_epoch(tx, &h))
            .await;
        let follows = match result {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, source = %heads.source, "could not follow the producer's epoch; will try again at its next announcement");
                return;
            }
        };
        let status = &self.consumer.status;
        for follow in follows {
            match follow {
                inbox::EpochFollow::Unchanged { key } | inbox::EpochFollow::Adopted { key } => {
                    self.epochs.insert(key, heads.epoch.clone());
                }
                inbox::EpochFollow::Changed(c) => {
                    status.epoch_changes.fetch_add(1, Ordering::Relaxed);
                    self.epoch_changed_at
                        .insert(c.key.source.clone(), (Instant::now(), c.to_epoch.clone()));
                    let (stream, from, to) = (&c.key, &c.from_epoch, &c.to_epoch);
                    match c.orphaned {
                        Some((first, last)) => {
                            status
                                .orphaned
                                .fetch_add(last - first + 1, Ordering::Relaxed);
                            tracing::error!(
                                %stream, from_epoch = %from, from_position = c.from_position,
                                to_epoch = %to, to_position = c.to_position,
                                orphaned_first = first, orphaned_last = last,
                                "the producer's database was replaced or restored from an older backup: events this consumer applied are gone there \
                                 (recorded in inbox_epoch_changes); following its new epoch, events applied before are recognised by their id"
                            );
                        }
                        None => tracing::warn!(
                            %stream, from_epoch = %from, from_position = c.from_position,
                            to_epoch = %to, to_position = c.to_position,
                            "the producer began a new epoch; following it (recorded in inbox_epoch_changes)"
                        ),
                    }
                    self.epochs.insert(c.key.clone(), Some(c.to_epoch));
                    self.gaps.remove(&c.key);
                    self.diverged.remove(&c.key);
                    self.positions.insert(c.key, c.to_position);
                }
            }
        }
    }

    /// The producer no longer holds what this consumer lacks: record the loss loudly
    /// and move on (see the retention rule in docs/recovery.md).
    async fn skip_unrecoverable(&mut self, key: StreamKey, first: u64) {
        let k = key.clone();
        let result = self
            .consumer
            .db
            .writer()
            .write(move |tx| inbox::skip_unrecoverable(tx, &k, first))
            .await;
        match result {
            Ok(Some((from, to))) => {
                tracing::error!(stream = %key, from, to, "events deleted by the producer's retention before this consumer applied them: skipped and recorded in inbox_skipped");
                self.advanced(key, first - 1);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, stream = %key, "could not record skipped events; will try again")
            }
        }
    }

    /// Asks producers to replay streams whose gap has not closed in time.
    fn request_replays(&mut self) {
        let cfg = &self.consumer.config;
        let now = Instant::now();
        let (gap_timeout, retry) = (
            Config::ms(cfg.consumer_gap_timeout_ms),
            Config::ms(cfg.consumer_replay_retry_ms),
        );
        for (key, gap) in &mut self.gaps {
            let position = self.positions.get(key).copied().unwrap_or(0);
            let stalled = now.duration_since(gap.progress_at) >= gap_timeout;
            let due = gap
                .requested_at
                .is_none_or(|t| now.duration_since(t) >= retry);
            if position >= gap.known || !stalled || !due {
                continue;
            }
            match send_replay_request(self.consumer, self.client, key, position + 1) {
                Ok(()) => {
                    tracing::info!(stream = %key, from_seq = position + 1, known = gap.known, "asking the producer to replay");
                    gap.requested_at = Some(now);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not queue a replay request; will try again")
                }
            }
        }
        self.forget_closed_gaps();
    }

    /// Queues a replay request for `key` from `from_seq` to its producer.
    fn send_replay_request(&self, key: &StreamKey, from_seq: u64) -> Result<(), String> {
        send_replay_request(self.consumer, self.client, key, from_seq)
    }

    /// Drops the gaps that the position has reached.
    fn forget_closed_gaps(&mut self) {
        let positions = &self.positions;
        self.gaps
            .retain(|key, gap| positions.get(key).copied().unwrap_or(0) < gap.known);
    }

    /// Tells each producer what this consumer has applied (retained), so that its
    /// retention keeps what this consumer still needs.
    /// A report counts in one epoch of its producer: the one most of its streams follow
    /// (all of them, but for a moment after a change); streams in another are left out.
    fn report_positions(&mut self) {
        self.report_due = false;
        type ByEpoch<'a> = BTreeMap<Option<&'a str>, BTreeMap<String, u64>>;
        let mut by_source: BTreeMap<&str, ByEpoch> = BTreeMap::new();
        for (key, position) in &self.positions {
            let epoch = self.epochs.get(key).and_then(|e| e.as_deref());
            by_source
                .entry(&key.source)
                .or_default()
                .entry(epoch)
                .or_default()
                .insert(key.stream.clone(), *position);
        }
        for (source, by_epoch) in by_source {
            let Some((epoch, positions)) = by_epoch
                .into_iter()
                .max_by_key(|(epoch, positions)| (positions.len(), epoch.is_some()))
            else {
                continue;
            };
            let diverged = self
                .diverged
                .iter()
                .filter(|(key, _)| {
                    key.source == source
                        && self.epochs.get(*key).and_then(|e| e.as_deref()) == epoch
                })
                .map(|(key, (seq, id))| {
                    (
                        key.stream.clone(),
                        protocol::Divergence {
                            seq: *seq,
                            applied_id: id.clone(),
                        },
                    )
                })
                .collect();
            let report = PositionReport {
                consumer: self.consumer.name().to_owned(),
                epoch: epoch.map(str::to_owned),
                positions,
                diverged,
            };
            let topic = self
                .consumer
                .ctx
                .topics
                .positions(source, self.consumer.name());
            let page_max =
                (self.consumer.config.payload_max_bytes).min(protocol::CONTROL_PAGE_MAX_BYTES);
            for page in report.pages(page_max) {
                let payload = serde_json::to_vec(&page).expect("position reports serialise");
                if let Err(e) =
                    self.client
                        .try_publish(topic.clone(), QoS::AtLeastOnce, true, payload)
                {
                    tracing::debug!(error = %e, "could not queue a position report; will send the next one");
                    break;
                }
            }
        }
    }

    /// Publishes the per-stream status at most every [`STATUS_EVERY`] (the gap timer
    /// publishes what is left behind): with 10,000 streams, rebuilding it after every
    /// batch took a quarter of the consumer's time.
    fn publish_status(&mut self) {
        if self.status_at.elapsed() < STATUS_EVERY {
            self.status_stale = true;
            return;
        }
        self.publish_status_now();
    }

    fn publish_status_now(&mut self) {
        self.status_at = Instant::now();
        self.status_stale = false;
        let progress = self
            .positions
            .iter()
            .map(|(key, &position)| {
                let gap = self.gaps.get(key).filter(|g| g.known > position);
                (
                    key.to_string(),
                    StreamProgress {
                        position,
                        known_head: gap.map_or(position, |g| g.known),
                        gap_since: gap.map(|g| g.opened_at),
                    },
                )
            })
            .collect();
        if let Ok(mut s) = self.consumer.status.streams.lock() {
            *s = progress;
        }
    }
}

/// Retention on the consumer side, in batches of [`PRUNE_BATCH_ROWS`]: by age, then by
/// `--retention-max-bytes`. Logs what it did.
async fn prune_all(writer: crate::storage::Writer, keep_ms: u64, max_bytes: u64) {
    let mut aged = 0;
    loop {
        match writer
            .write(move |t| inbox::prune(t, keep_ms, PRUNE_BATCH_ROWS))
            .await
        {
            Ok(n) => {
                aged += n;
                if n < PRUNE_BATCH_ROWS {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbox retention failed; will try again");
                return;
            }
        }
        tokio::task::yield_now().await;
    }
    if aged > 0 {
        tracing::info!(
            rows = aged,
            "retention deleted old inbox records and dead letters"
        );
    }
    // Never the records of the last half of --retention-ms: a producer restored from a
    // backup takes what is older as shared (outbox::start_new_epoch), and the events it
    // sends again from the newer half are recognised by these records.
    let horizon = crate::clock::now_ms().saturating_sub((keep_ms / 2) as i64);
    let oldest = move |t: &rusqlite::Transaction, limit| {
        let n = inbox::prune_oldest(t, horizon, limit)?;
        Ok((n > 0).then_some(n))
    };
    match crate::storage::prune_to_fit(&writer, max_bytes, PRUNE_BATCH_ROWS, oldest).await {
        Ok((capped, over)) => {
            if capped > 0 {
                tracing::info!(rows = capped, max_bytes, "retention deleted the oldest inbox records to keep the database within --retention-max-bytes");
            }
            if let Some(used) = over {
                tracing::warn!(used_bytes = used, max_bytes, "the database is above --retention-max-bytes and holds no more inbox history that may be deleted: the rest is inbox records of the last half of --retention-ms, dead letters, outbox history or domain data");
            }
        }
        Err(e) => tracing::warn!(error = %e, "inbox retention failed; will try again"),
    }
}

/// Queues a replay request of `consumer` for `key` from `from_seq`; counts it.
fn send_replay_request(
    consumer: &Consumer,
    client: &AsyncClient,
    key: &StreamKey,
    from_seq: u64,
) -> Result<(), String> {
    let request = ReplayRequest {
        consumer: consumer.name().to_owned(),
        stream: key.stream.clone(),
        from_seq,
    };
    let payload = serde_json::to_vec(&request).expect("replay requests serialise");
    let topic = consumer.ctx.topics.replay(&key.source, consumer.name());
    client
        .try_publish(topic, QoS::AtLeastOnce, false, payload)
        .map_err(|e| e.to_string())?;
    consumer
        .status
        .replays_requested
        .fetch_add(1, Ordering::Relaxed);
    Ok(())
}
