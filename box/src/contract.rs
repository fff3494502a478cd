//! The contract between the two services: the streams they produce, the event types on
//! them and the payload each event carries. Both services import this module and
//! neither imports the other, so a change to an event is made here, once, for its
//! producer and its consumer together. docs/events.md describes the same on the wire.

use serde::{Deserialize, Serialize};

/// user-service's default `--source`: the CloudEvents `source` of its events, a level
/// of its topics, and its MQTT username on the box's broker.
pub const USER_SERVICE: &str = "user-service";
/// transaction-service's default `--source` (see [`USER_SERVICE`]).
pub const TRANSACTION_SERVICE: &str = "transaction-service";

/// The stream user-service produces.
pub const USERS_STREAM: &str = "users";
/// The event a new user produces, on [`USERS_STREAM`]; its data is a [`User`], read by
/// consumers as a [`UserCreated`].
pub const USER_CREATED: &str = "user.created";

/// The stream transaction-service produces.
pub const TRANSACTIONS_STREAM: &str = "transactions";
/// The event each ledger entry produces, on [`TRANSACTIONS_STREAM`]; its data is a
/// [`LedgerEntry`], read by consumers as a [`TransactionCreated`].
pub const TRANSACTION_CREATED: &str = "transaction.created";

/// A user: the data of `user.created` (as it was created), and what `GET /users/{id}`
/// shows (with its current balance).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct User {
    /// user-service's id of the user.
    pub id: i64,
    /// The trimmed name.
    pub name: String,
    /// The trimmed email, unique among users.
    pub email: String,
    /// The balance as transaction-service reported it; 0 in `user.created`.
    pub balance_cents: i64,
    /// RFC 3339, milliseconds, UTC.
    pub created_at: String,
}

/// A ledger entry: the data of `transaction.created`, and what the ledger API shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LedgerEntry {
    /// transaction-service's id of the entry.
    pub id: i64,
    /// The user it belongs to (user-service's id).
    pub user_id: i64,
    /// Always positive; `kind` says which way it moves the balance.
    pub amount_cents: i64,
    /// "credit" or "debit".
    pub kind: String,
    /// The trimmed description, if any.
    pub description: Option<String>,
    /// True for the welcome credit granted on user.created.
    pub welcome: bool,
    /// RFC 3339, milliseconds, UTC.
    pub created_at: String,
}

/// What transaction-service reads of a `user.created` ([`User`]): consumers require
/// only the fields they use, so that a producer may add fields without its events
/// being dead-lettered by an older consumer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct UserCreated {
    /// [`User::id`].
    pub id: i64,
    /// [`User::name`].
    pub name: String,
    /// [`User::email`].
    pub email: String,
}

/// What user-service reads of a `transaction.created` ([`LedgerEntry`]); see
/// [`UserCreated`].
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TransactionCreated {
    /// [`LedgerEntry::id`].
    pub id: i64,
    /// [`LedgerEntry::user_id`].
    pub user_id: i64,
    /// [`LedgerEntry::amount_cents`].
    pub amount_cents: i64,
    /// [`LedgerEntry::kind`]: "credit" or "debit".
    pub kind: String,
}
