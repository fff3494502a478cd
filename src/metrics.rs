//! Metrics in the Prometheus text format (OpenMetrics), for whatever HTTP server the
//! embedding program runs: [`Metrics::render`] returns the page a scrape gets.
//!
//! Built on the Prometheus project's `prometheus-client`: typed metrics, no global
//! registry, and values that exist elsewhere (the relay's and the consumer's counters,
//! the outbox's backlog) are read when a scrape asks rather than kept twice. What is
//! measured on the hot path costs one histogram observation per write batch.
//!
//! Every name begins with `edge_outbox_` and carries the label `source` (this
//! producer's name). Per-stream series are bounded: at most [`STREAM_SERIES_MAX`]
//! streams per family (for the consumer, the ones furthest behind first); how many
//! were left out is `edge_outbox_metrics_streams_omitted`. No label ever holds a value
//! that a request chooses (a user id, a path).
//!
//! | metric | type | what |
//! |---|---|---|
//! | `pending_events`, `pending_bytes` | gauge | not yet published (the backlog) |
//! | `oldest_pending_age_seconds` | gauge | age of the oldest event never published, 0 when none (rows pending again for a replay do not count) |
//! | `stream_last_sequence{stream}` | gauge | last sequence number written per stream |
//! | `relay_connected` | gauge | 1 while the relay holds a broker session |
//! | `relay_published_total` | counter | rows marked published (PUBACK received) |
//! | `relay_publish_retries_total` | counter | publishes handed to the broker again |
//! | `relay_replay_requests_served_total` | counter | replay requests acted on |
//! | `relay_epochs_begun_total` | counter | new epochs begun (database found rewound) |
//! | `consumer_connected` | gauge | 1 while the consumer holds a broker session |
//! | `consumer_received_total`, `consumer_applied_total`, `consumer_duplicates_total` | counter | event messages taken, applied, acknowledged as duplicates |
//! | `consumer_dead_lettered_total` | counter | messages dead-lettered |
//! | `consumer_dead_letters` | gauge | rows in `dead_letters` now |
//! | `consumer_replay_requests_total` | counter | replay requests sent |
//! | `consumer_position{producer,stream}`, `consumer_lag_events{...}` | gauge | last applied sequence; known head minus position |
//! | `consumer_gap_open_seconds{...}` | gauge | how long the stream's gap has been open, 0 when none |
//! | `write_batch_requests` | histogram | requests per group-commit transaction |
//! | `write_commit_duration_seconds` | histogram | BEGIN to end of COMMIT (fsync included) |
//! | `write_queue_depth` | gauge | requests waiting for the writer |
//! | `storage_failed_batches_total` | counter | write batches that failed as a whole |
//!
//! Counters count since the process started (Prometheus' `rate()` handles restarts).

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use crate::clock::now_ms;
use crate::consumer::ConsumerStatus;
use crate::relay::RelayStatus;
use crate::storage::{Database, DbError};

/// Streams per per-stream family at most.
pub const STREAM_SERIES_MAX: usize = 1_000;

/// The `Content-Type` of [`Metrics::render`]'s page.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const PREFIX: &str = "edge_outbox";

type Labels = Vec<(&'static str, String)>;
type GaugeF = Gauge<f64, AtomicU64>;

/// The metrics of one database's outbox, relay and consumer.
pub struct Metrics {
    db: Database,
    source: String,
    relay: Option<Arc<RelayStatus>>,
    consumer: Option<Arc<ConsumerStatus>>,
    /// Metrics that live as long as the process (histograms, and the embedder's own).
    registry: Registry,
}

/// What a scrape reads from the database.
struct Snapshot {
    pending_events: u64,
    pending_bytes: u64,
    oldest_pending_ms: Option<i64>,
    streams: Vec<(String, u64)>,
    streams_total: u64,
    dead_letters: u64,
}

impl Metrics {
    /// Metrics for `db`, whose producer is named `source`. Add the relay and the
    /// consumer with [`Metrics::relay`] and [`Metrics::consumer`].
    pub fn new(db: &Database, source: &str) -> Metrics {
        let mut registry = Registry::with_prefix_and_labels(
            PREFIX,
            [("source".into(), source.to_owned().into())].into_iter(),
        );
        let stats = db.writer().stats();
        registry.register(
            "write_batch_requests",
            "Requests per group-commit transaction",
            stats.batch_requests.clone(),
        );
        registry.register_with_unit(
            "write_commit_duration",
            "Time from BEGIN IMMEDIATE to the end of COMMIT, the fsync included",
            Unit::Seconds,
            stats.commit_seconds.clone(),
        );
        registry.register(
            "storage_failed_batches",
            "Write batches that failed as a whole (every request in them was refused)",
            stats.failed_batches.clone(),
        );
        Metrics {
            db: db.clone(),
            source: source.to_owned(),
            relay: None,
            consumer: None,
            registry,
        }
    }

    /// Includes the relay's metrics.
    pub fn relay(mut self, status: Arc<RelayStatus>) -> Metrics {
        self.relay = Some(status);
        self
    }

    /// Includes the consumer's metrics.
    pub fn consumer(mut self, status: Arc<ConsumerStatus>) -> Metrics {
        self.consumer = Some(status);
        self
    }

    /// The registry the page is made from, for the embedder's own metrics (they get
    /// the `edge_outbox_` prefix and the `source` label).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The page a scrape gets ([`CONTENT_TYPE`]). Reads a few rows of the database
    /// (the backlog counters, the oldest pending row by index, the streams table).
    pub async fn render(&self) -> Result<String, DbError> {
        let snapshot = self.db.read(read_snapshot).await?;
        let mut scrape = Registry::with_prefix_and_labels(
            PREFIX,
            [("source".into(), self.source.clone().into())].into_iter(),
        );
        self.describe(&mut scrape, snapshot);
        let mut page = String::with_capacity(16 * 1024);
        let encoded = encode_registry(&mut page, &self.registry)
            .and_then(|()| encode_registry(&mut page, &scrape))
            .and_then(|()| encode_eof(&mut page));
        // Writing into a String cannot fail; an encoder error would be a bug there.
        if let Err(e) = encoded {
            let _ = writeln!(page, "# encoding failed: {e}");
        }
        Ok(page)
    }

    fn describe(&self, r: &mut Registry, s: Snapshot) {
        let mut omitted = 0u64;
        r.register(
            "pending_events",
            "Events written and not yet published",
            ConstGauge::new(s.pending_events as i64),
        );
        r.register_with_unit(
            "pending",
            "Bytes of the envelopes not yet published",
            Unit::Bytes,
            ConstGauge::new(s.pending_bytes as i64),
        );
        let age = s
            .oldest_pending_ms
            .map_or(0.0, |t| now_ms().saturating_sub(t).max(0) as f64 / 1e3);
        r.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest event never published (0 when none is; rows pending again for a replay do not count)",
            Unit::Seconds,
            ConstGauge::new(age),
        );
        let last = Family::<Labels, Gauge>::default();
        for (stream, seq) in &s.streams {
            last.get_or_create(&vec![("stream", stream.clone())])
                .set(*seq as i64);
        }
        omitted += s.streams_total.saturating_sub(s.streams.len() as u64);
        r.register(
            "stream_last_sequence",
            "Last sequence number written in each stream",
            last,
        );
        if let Some(relay) = &self.relay {
            r.register(
                "relay_connected",
                "1 while the relay holds a session with the broker",
                ConstGauge::new(i64::from(relay.connected())),
            );
            let counters = [
                ("relay_published", "Events marked published (their PUBACK received)", relay.marked_published()),
                ("relay_publish_retries", "Publishes handed to the broker again (a lost connection took their PUBACK, or the client's queue was full)", relay.publish_retries()),
                ("relay_replay_requests_served", "Replay requests acted on", relay.replays_served()),
                ("relay_epochs_begun", "New epochs begun because the database was found rewound", relay.epoch_changes()),
            ];
            for (name, help, value) in counters {
                r.register(name, help, ConstCounter::new(value));
            }
        }
        if let Some(consumer) = &self.consumer {
            r.register(
                "consumer_connected",
                "1 while the consumer holds a session with the broker",
                ConstGauge::new(i64::from(consumer.connected())),
            );
            let counters = [
                (
                    "consumer_received",
                    "Event messages taken for applying",
                    consumer.received(),
                ),
                ("consumer_applied", "Events applied", consumer.applied()),
                (
                    "consumer_duplicates",
                    "Duplicates acknowledged without effect",
                    consumer.duplicates(),
                ),
                (
                    "consumer_dead_lettered",
                    "Messages dead-lettered",
                    consumer.dead_lettered(),
                ),
                (
                    "consumer_replay_requests",
                    "Replay requests sent to producers",
                    consumer.replays_requested(),
                ),
            ];
            for (name, help, value) in counters {
                r.register(name, help, ConstCounter::new(value));
            }
            r.register(
                "consumer_dead_letters",
                "Messages in the dead_letters table now",
                ConstGauge::new(s.dead_letters as i64),
            );
            let mut streams: Vec<_> = consumer.streams().into_iter().collect();
            streams.sort_by(|a, b| b.1.lag().cmp(&a.1.lag()).then_with(|| a.0.cmp(&b.0)));
            omitted += streams.len().saturating_sub(STREAM_SERIES_MAX) as u64;
            streams.truncate(STREAM_SERIES_MAX);
            let position = Family::<Labels, Gauge>::default();
            let lag = Family::<Labels, Gauge>::default();
            let gap = Family::<Labels, GaugeF>::default();
            for (key, p) in streams {
                let (producer, stream) = key.split_once('/').unwrap_or(("", key.as_str()));
                let labels = vec![
                    ("producer", producer.to_owned()),
                    ("stream", stream.to_owned()),
                ];
                position.get_or_create(&labels).set(p.position as i64);
                lag.get_or_create(&labels).set(p.lag() as i64);
                let open = p.gap_open_for().map_or(0.0, |d| d.as_secs_f64());
                gap.get_or_create(&labels).set(open);
            }
            r.register(
                "consumer_position",
                "Last sequence number applied per stream",
                position,
            );
            r.register(
                "consumer_lag_events",
                "Events known to exist and not applied yet, per stream",
                lag,
            );
            r.register_with_unit(
                "consumer_gap_open",
                "How long the stream's gap (events known to exist, not applied) has been open; 0 when none",
                Unit::Seconds,
                gap,
            );
        }
        r.register(
            "write_queue_depth",
            "Write requests waiting for the writer",
            ConstGauge::new(self.db.writer().queue_depth() as i64),
        );
        r.register(
            "metrics_streams_omitted",
            "Streams left out of per-stream families (more than 1000 in one)",
            ConstGauge::new(omitted as i64),
        );
    }
}

fn read_snapshot(c: &rusqlite::Connection) -> Result<Snapshot, DbError> {
    let backlog = crate::outbox::backlog(c)?;
    let oldest_pending_ms = crate::outbox::oldest_unpublished_ms(c)?;
    let mut stmt =
        c.prepare_cached("SELECT stream, last_seq FROM outbox_streams ORDER BY stream LIMIT ?1")?;
    let streams = stmt
        .query_map([STREAM_SERIES_MAX as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let streams_total: i64 =
        c.query_row("SELECT COUNT(*) FROM outbox_streams", [], |r| r.get(0))?;
    let dead_letters = crate::consumer::dead_letters::count(c)?;
    Ok(Snapshot {
        pending_events: backlog.events,
        pending_bytes: backlog.bytes,
        oldest_pending_ms,
        streams,
        streams_total: streams_total.max(0) as u64,
        dead_letters,
    })
}
