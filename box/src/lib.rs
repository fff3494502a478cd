//! # edge-box
//!
//! The demonstration box built on the [`edge_outbox`] library: two HTTP services, each
//! with its own SQLite database and the library's relay and consumer inside, and the
//! admin tool that runs, checks and tortures them.
//!
//! ```text
//! POST /users ── user_service ── user.created ──> transaction_service (welcome credit)
//!            users.balance_cents <── transaction.created ──┘
//! ```
//!
//! | part | module |
//! |---|---|
//! | the events the two services exchange: streams, types, payloads | [`contract`] |
//! | what both services share: flags, start-up, shutdown, HTTP errors, idempotency, status routes | [`service`] |
//! | users and their balances | [`user_service`] |
//! | a ledger per user | [`transaction_service`] |
//! | the admin commands: verify, run-all, demo-offline, power-cut | [`admin`] |
//!
//! The binaries in `src/bin/` parse their flags and call into these modules.

// Errors carry rusqlite's error by value; they are returned rarely.
#![allow(clippy::result_large_err)]

pub mod admin;
pub mod contract;
pub mod service;
pub mod transaction_service;
pub mod user_service;
