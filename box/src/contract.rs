//! The contract between the two services: the streams they produce, the event types on
//! them and the payload each event carries. Both services import this module and
//! neither imports the other, so a change to an event is made here, once, for its
//! producer and its consumer together. docs/events.md describes the same on the wire.

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
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

/// A user's id, as both services and their events know it: a UUIDv7 in canonical
/// lowercase form (`0193a1b2-...`). Users created before UUID ids keep their decimal
/// id as a string ("42"). A UUID, unlike a counter, is never handed out twice: a
/// user-service restored from an older backup, or started on an empty database, can
/// never give a new user the id of one that transaction-service already knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

/// [`UserId::parse`]'s rule as a regular expression. The OpenAPI document repeats it
/// (utoipa takes only literals there; box/tests/openapi.rs checks they agree).
pub const USER_ID_PATTERN: &str =
    r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$";

impl UserId {
    /// A new id.
    pub fn generate() -> UserId {
        UserId(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// Checks one spelling of an id: a canonical lowercase UUID, or a decimal number
    /// without sign or leading zeros (the ids of users created before UUIDs).
    pub fn parse(s: &str) -> Result<UserId, String> {
        let decimal = !s.is_empty()
            && s.len() <= 19
            && s.bytes().all(|b| b.is_ascii_digit())
            && !s.starts_with('0');
        let uuid = uuid::Uuid::try_parse(s)
            .is_ok_and(|u| s.len() == 36 && u.hyphenated().to_string() == s);
        if decimal || uuid {
            Ok(UserId(s.to_owned()))
        } else {
            Err(format!(
                "{:?} is not a user id: ids are lowercase UUIDs such as 0193a1b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b",
                s.chars().take(64).collect::<String>()
            ))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl UserId {
    /// Reads a user id in event data: a string, or (in events written before UUID ids,
    /// still in outboxes and replayed) a positive JSON integer, taken as its decimal
    /// text. The HTTP API takes strings only.
    pub fn from_event<'de, D: serde::Deserializer<'de>>(d: D) -> Result<UserId, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Text(String),
            Number(u64),
        }
        let text = match Either::deserialize(d)? {
            Either::Text(s) => s,
            Either::Number(n) => n.to_string(),
        };
        UserId::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<String> for UserId {
    type Error = String;
    fn try_from(s: String) -> Result<UserId, String> {
        UserId::parse(&s)
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> String {
        id.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for UserId {
    type Err = String;
    fn from_str(s: &str) -> Result<UserId, String> {
        UserId::parse(s)
    }
}

impl ToSql for UserId {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        self.0.to_sql()
    }
}

impl FromSql for UserId {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        String::column_result(value).map(UserId)
    }
}

/// A user: the data of `user.created` (as it was created), and what `GET /users/{id}`
/// shows (with its current balance).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct User {
    /// The user's id.
    #[schema(value_type = String, pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")]
    pub id: UserId,
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct LedgerEntry {
    /// transaction-service's id of the entry.
    pub id: i64,
    /// The user it belongs to.
    #[schema(value_type = String, pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")]
    pub user_id: UserId,
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
    #[serde(deserialize_with = "UserId::from_event")]
    pub id: UserId,
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
    #[serde(deserialize_with = "UserId::from_event")]
    pub user_id: UserId,
    /// [`LedgerEntry::amount_cents`].
    pub amount_cents: i64,
    /// [`LedgerEntry::kind`]: "credit" or "debit".
    pub kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_have_one_spelling() {
        let id = UserId::generate();
        assert_eq!(UserId::parse(id.as_str()), Ok(id.clone()));
        assert_eq!(UserId::parse("42").unwrap().as_str(), "42");
        for bad in [
            "",
            "0",
            "042",
            "+42",
            "-1",
            "forty-two",
            &id.as_str().to_uppercase(),
            &id.as_str().replace('-', ""),
            &format!("{{{id}}}"),
            "99999999999999999999",
        ] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert!(
            serde_json::from_str::<UserId>("42").is_err(),
            "a number is not an id"
        );
    }
}
