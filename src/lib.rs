//! # edge-outbox
//!
//! The transactional outbox pattern for one box at the edge: a domain change and its
//! event commit atomically in SQLite; a relay publishes the event to an MQTT broker
//! with QoS1; consumers apply each event exactly once, in the producer's order per
//! stream, even when the broker loses messages it had acknowledged.
//!
//! ## Layout, in the order an event travels
//!
//! | step | file |
//! |---|---|
//! | open the database: WAL, FULL durability, schema migrations, readers | [`db`] (`schema/*.sql`) |
//! | one writer thread, group commit with a savepoint per request | [`writer`] |
//! | domain write + [`outbox::Outbox::enqueue`] in the caller's `&Transaction` | [`outbox`] |
//! | the wire format: CloudEvents 1.0 with `stream` and `sequence` | [`envelope`] |
//! | topics and the recovery protocol's control messages | [`protocol`] |
//! | relay: pending rows -> QoS1 publish -> PUBACK -> marked published | [`relay`] |
//! | consumer: receive -> apply in one transaction -> commit -> ack | [`consumer`] |
//! | inbox: order, dedup, dead letters, handlers | [`inbox`] |
//! | settings, backoff, MQTT options | [`config`], [`retry`], [`mqtt`] |
//!
//! The box built on it: [`service`] (HTTP plumbing, start-up, shutdown),
//! [`user_service`], [`transaction_service`], and the admin commands [`verify`],
//! [`run_all`], [`demo_offline`], [`power_cut`].
//!
//! docs/ARCHITECTURE.md draws the same flow and maps each guarantee to its file;
//! docs/recovery.md describes how lost events are detected and replayed.

// Errors carry rusqlite's error by value, with the path or context that makes the
// message useful; they are returned rarely, so their size does not matter.
#![allow(clippy::result_large_err)]

pub mod clock;
pub mod config;
pub mod consumer;
pub mod db;
pub mod demo_offline;
pub mod envelope;
pub mod inbox;
pub mod mqtt;
pub mod outbox;
pub mod power_cut;
pub mod protocol;
pub mod relay;
pub mod retry;
pub mod run_all;
pub mod service;
pub mod transaction_service;
pub mod user_service;
pub mod verify;
pub mod writer;

pub use config::Config;
pub use consumer::Consumer;
pub use db::{Database, DbOptions};
pub use inbox::{HandlerError, Handlers, StreamKey};
pub use outbox::{NewEvent, Outbox};
pub use relay::Relay;
