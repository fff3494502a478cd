//! # edge-outbox
//!
//! The transactional outbox pattern for one box at the edge: a domain change and its
//! event commit atomically in SQLite; a relay publishes the event to an MQTT broker
//! with QoS1; consumers apply each event exactly once, in the producer's order per
//! stream, even when the broker loses messages it had acknowledged.
//!
//! ## How an event travels, module by module
//!
//! ```text
//! your write ─┐
//!             ▼
//! storage   Database::open (WAL, FULL, migrations) ── writer: one thread, group commit
//!             │  writer().write(|tx| { domain row; outbox.enqueue(tx, event) })
//!             ▼
//! outbox    Outbox::enqueue: next sequence of the stream, CloudEvents envelope
//!             │  (same transaction: both commit, or neither)
//!             ▼
//! relay     Relay::run: pending rows ── QoS1 publish ── PUBACK ── marked published
//!             │
//! protocol  topics; head announcements, replay requests, position reports
//!             │  (how what the broker loses is found and sent again)
//!             ▼
//! consumer  Consumer::run: receive ── inbox: dedup, order, handler, dead letters
//!                           ── commit ── PUBACK to the broker
//! ```
//!
//! | step | module |
//! |---|---|
//! | open the database: WAL, FULL durability, schema migrations, readers | [`storage`], [`storage::migrate`] (`schema/core/*.sql`) |
//! | one writer thread, group commit with a savepoint per request | [`storage::writer`] |
//! | domain write + [`Outbox::enqueue`] in the caller's `&Transaction` | [`outbox`] |
//! | the wire format: CloudEvents 1.0 with `stream` and `sequence` | [`outbox::envelope`] |
//! | pending rows -> QoS1 publish -> PUBACK -> marked published | [`relay`] |
//! | topics and the recovery protocol's control messages | [`protocol`] |
//! | receive -> apply in one transaction -> commit -> ack | [`consumer`] |
//! | order, dedup, dead letters, handlers | [`consumer::inbox`] |
//! | every setting, as clap flags and environment variables | [`config`] |
//!
//! ## Quick start
//!
//! A producer writes a domain row and its event in one transaction; the relay publishes
//! it; a consumer (usually in another program, with its own database) applies it once.
//! `examples/embed.rs` is this program in full, and `make test` runs it against a real
//! Mosquitto.
//!
//! ```no_run
//! use edge_outbox::{Config, Consumer, Database, HandlerError, Handlers, Migration, NewEvent,
//!                   Outbox, OutboxError, Relay, Schema, StreamKey};
//! use tokio_util::sync::CancellationToken;
//!
//! const ORDERS: Schema = Schema {
//!     component: "orders",
//!     migrations: &[Migration {
//!         version: 1,
//!         name: "0001_orders.sql",
//!         sql: "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT NOT NULL) STRICT;",
//!     }],
//! };
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = Config { source: "shop".into(), ..Config::default() };
//! config.validate()?;
//! let db = Database::open(&config.db_options("data/shop.db"), &[ORDERS])?;
//! let outbox = Outbox::new(&config);
//!
//! // The order and its event commit together, or neither does.
//! let o = outbox.clone();
//! db.writer()
//!     .write(move |tx| {
//!         tx.execute("INSERT INTO orders (item) VALUES (?1)", ["tea"])?;
//!         let id = tx.last_insert_rowid().to_string();
//!         o.enqueue(tx, NewEvent {
//!             stream: "orders",
//!             event_type: "order.placed",
//!             subject: Some(&id),
//!             data: &serde_json::json!({ "id": id, "item": "tea" }),
//!         })?;
//!         Ok::<_, OutboxError>(())
//!     })
//!     .await?;
//!
//! // Publish what is pending, now and whenever the broker comes back.
//! let stop = CancellationToken::new();
//! let relay = Relay::new(db.clone(), config.clone())?;
//! tokio::spawn(relay.run(stop.clone()));
//!
//! // Elsewhere, a warehouse with its own database applies each event of stream
//! // "orders" from source "shop" exactly once, in the transaction that records it.
//! # let warehouse_db = db.clone();
//! # let warehouse_config = Config { source: "warehouse".into(), ..config.clone() };
//! let handlers = Handlers::new().on("order.placed", |tx, event| {
//!     let item = event.data["item"].as_str()
//!         .ok_or_else(|| HandlerError::Permanent("data.item missing".into()))?;
//!     tx.execute("INSERT INTO shipments (item) VALUES (?1)", [item])?;
//!     Ok(())
//! });
//! let streams = vec![StreamKey { source: "shop".into(), stream: "orders".into() }];
//! let consumer = Consumer::new(warehouse_db, warehouse_config, streams, handlers)?;
//! consumer.run(stop).await?;
//! # Ok(())
//! # }
//! ```
//!
//! docs/ARCHITECTURE.md draws the same flow and maps each guarantee to its file;
//! docs/recovery.md describes how lost events are detected and replayed.

#![warn(missing_docs)]
// Errors carry rusqlite's error by value, with the path or context that makes the
// message useful; they are returned rarely, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod clock;
pub mod config;
pub mod consumer;
pub mod metrics;
mod mqtt;
pub mod outbox;
pub mod protocol;
pub mod relay;
pub mod retry;
pub mod storage;
mod tls;

pub use config::{Config, ConfigError, Credentials, Secret};
pub use consumer::inbox::{HandlerError, Handlers, StreamKey};
pub use consumer::{Consumer, ConsumerAdmin, ConsumerStatus};
pub use metrics::Metrics;
pub use mqtt::LinkStatus;
pub use outbox::envelope::CloudEvent;
pub use outbox::{NewEvent, Outbox, OutboxError};
pub use relay::{Relay, RelayStatus};
pub use storage::{Database, DbError, DbOptions, Migration, Schema, Synchronous};
