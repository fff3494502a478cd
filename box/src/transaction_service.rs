//! transaction-service: a ledger per user, answered from its own projection of users.
//!
//! ```text
//! user.created (from user-service) ──> known_users row + welcome credit + enqueue
//!                                       transaction.created, one transaction
//! POST /transactions ──> INSERT transactions + balance + enqueue transaction.created
//! ```
//!
//! It never asks user-service anything: it knows the users that user-service's events
//! told it about, so it keeps working while user-service or the broker is down.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use rusqlite::{params, OptionalExtension, Row, Transaction};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::contract::{
    LedgerEntry, UserCreated, UserId, TRANSACTIONS_STREAM, TRANSACTION_CREATED, USERS_STREAM,
    USER_CREATED,
};
use crate::service::http::{
    next_after, page, ApiError, AppJson, AppPath, AppQuery, ErrorCode, LedgerWriteErrors,
    ReadErrors,
};
use crate::service::idempotency::{self, IdempotencyKey};
use crate::service::{AppState, Spec};
use edge_outbox::consumer::inbox::{HandlerError, Handlers};
use edge_outbox::outbox::envelope::CloudEvent;
use edge_outbox::outbox::{NewEvent, Outbox, OutboxError};
use edge_outbox::storage::{Migration, Schema};
use edge_outbox::StreamKey;

pub const SCHEMA: Schema = Schema {
    component: "transaction_service",
    migrations: &[
        Migration {
            version: 1,
            name: "0001_ledger.sql",
            sql: include_str!("../schema/transaction-service/0001_ledger.sql"),
        },
        Migration {
            version: 2,
            name: "0002_text_user_ids.sql",
            sql: include_str!("../schema/transaction-service/0002_text_user_ids.sql"),
        },
    ],
};

/// Largest amount of one transaction, in cents (ten million in currency units).
pub const AMOUNT_MAX_CENTS: i64 = 1_000_000_000;
/// Longest description, in characters.
pub const DESCRIPTION_MAX_CHARS: usize = 500;

/// transaction-service, consuming `users_source`'s stream "users" and granting
/// `welcome_credit_cents` (0 for none) to each new user.
pub fn spec(users_source: &str, outbox: Outbox, welcome_credit_cents: i64) -> Spec {
    Spec {
        name: "transaction-service",
        schema: SCHEMA,
        routes: routes(),
        api: <Api as utoipa::OpenApi>::openapi(),
        consumes: vec![StreamKey {
            source: users_source.to_owned(),
            stream: USERS_STREAM.to_owned(),
        }],
        handlers: Handlers::new().on(USER_CREATED, move |tx, event| {
            apply_user_created(tx, event, &outbox, welcome_credit_cents)
        }),
        prepare: None,
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/transactions",
            get(list_transactions).post(create_transaction),
        )
        .route("/users/{id}/balance", get(balance))
}

/// Credit or debit. Only the strings "credit" and "debit" are accepted (serde's
/// default would also take `{"credit": null}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Kind {
    Credit,
    Debit,
}

impl TryFrom<String> for Kind {
    type Error = String;
    fn try_from(s: String) -> Result<Kind, String> {
        match s.as_str() {
            "credit" => Ok(Kind::Credit),
            "debit" => Ok(Kind::Debit),
            other => Err(format!(
                "kind must be \"credit\" or \"debit\", not {other:?}"
            )),
        }
    }
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Credit => "credit",
            Kind::Debit => "debit",
        }
    }
}

const ENTRY_COLUMNS: &str = "id, user_id, amount_cents, kind, description, welcome, created_at";

fn entry_from(r: &Row<'_>) -> rusqlite::Result<LedgerEntry> {
    Ok(LedgerEntry {
        id: r.get(0)?,
        user_id: r.get(1)?,
        amount_cents: r.get(2)?,
        kind: r.get(3)?,
        description: r.get(4)?,
        welcome: r.get::<_, i64>(5)? == 1,
        created_at: r.get(6)?,
    })
}

/// The body of `POST /transactions`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTransaction {
    /// A user id transaction-service has seen (from user-service's user.created).
    #[schema(value_type = String, pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")]
    pub user_id: UserId,
    /// 1 to 1,000,000,000.
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub amount_cents: i64,
    pub kind: Kind,
    /// At most 500 characters, no control characters.
    #[serde(default)]
    #[schema(max_length = 500)]
    pub description: Option<String>,
}

/// Checks a new transaction; returns its trimmed description.
pub fn validate(t: &NewTransaction) -> Result<Option<String>, ApiError> {
    if !(1..=AMOUNT_MAX_CENTS).contains(&t.amount_cents) {
        return Err(ApiError::invalid(
            "amount_cents",
            format!("amount_cents must be an integer from 1 to {AMOUNT_MAX_CENTS}"),
        ));
    }
    let description = t
        .description
        .as_deref()
        .map(str::trim)
        .filter(|d| !d.is_empty());
    if let Some(d) = description {
        if d.chars().count() > DESCRIPTION_MAX_CHARS || d.chars().any(char::is_control) {
            let msg = format!("description must be at most {DESCRIPTION_MAX_CHARS} characters, without control characters");
            return Err(ApiError::invalid("description", msg));
        }
    }
    Ok(description.map(str::to_owned))
}

/// Writes a ledger entry, moves the user's balance and enqueues `transaction.created`,
/// all in `tx`. The caller has checked that the user is known.
fn record(
    tx: &Transaction,
    outbox: &Outbox,
    user_id: UserId,
    amount_cents: i64,
    kind: Kind,
    description: Option<String>,
    welcome: bool,
) -> Result<LedgerEntry, OutboxError> {
    let created_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    tx.prepare_cached("INSERT INTO transactions (user_id, amount_cents, kind, description, welcome, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
        .execute(params![user_id, amount_cents, kind.as_str(), description, welcome as i64, created_at])?;
    let entry = LedgerEntry {
        id: tx.last_insert_rowid(),
        user_id: user_id.clone(),
        amount_cents,
        kind: kind.as_str().into(),
        description,
        welcome,
        created_at,
    };
    let delta = if kind == Kind::Credit {
        amount_cents
    } else {
        -amount_cents
    };
    tx.prepare_cached(
        "UPDATE known_users SET balance_cents = balance_cents + ?2 WHERE user_id = ?1",
    )?
    .execute(params![user_id, delta])?;
    let subject = user_id.to_string();
    let event = outbox.enqueue(
        tx,
        NewEvent {
            stream: TRANSACTIONS_STREAM,
            event_type: TRANSACTION_CREATED,
            subject: Some(&subject),
            data: &entry,
        },
    )?;
    tracing::info!(transaction_id = entry.id, %user_id, event_id = %event.event_id, seq = event.seq, welcome, "transaction recorded");
    Ok(entry)
}

fn known_balance(tx: &rusqlite::Connection, user_id: &UserId) -> rusqlite::Result<Option<i64>> {
    tx.prepare_cached("SELECT balance_cents FROM known_users WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))
        .optional()
}

fn unknown_user(user_id: &UserId) -> ApiError {
    ApiError::not_found(format!(
        "user {user_id} is not known to transaction-service; if it was just created, user-service's user.created event may not have arrived yet: retry shortly"
    ))
}

/// Records a credit or a debit; its `transaction.created` event is committed with it.
#[utoipa::path(post, path = "/transactions", tag = "transaction-service",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request gets the first answer", pattern = r"^[!-~]{1,200}$")),
    request_body = NewTransaction,
    responses((status = 201, description = "The ledger entry", body = LedgerEntry), LedgerWriteErrors))]
pub(crate) async fn create_transaction(
    State(state): State<AppState>,
    IdempotencyKey(key): IdempotencyKey,
    AppJson(input): AppJson<NewTransaction>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let description = validate(&input)?;
    let outbox = state.outbox.clone();
    let request = idempotency::fingerprint("POST /transactions", &input);
    let (user_id, amount_cents, kind) = (input.user_id, input.amount_cents, input.kind);
    let (status, body) = idempotency::write_once(&state.db, key, request, move |tx| {
        let balance = known_balance(tx, &user_id)?
            .ok_or_else(|| unknown_user(&user_id).with_field("user_id"))?;
        if kind == Kind::Debit && amount_cents > balance {
            return Err(ApiError::new(
                ErrorCode::InsufficientFunds,
                format!("a debit of {amount_cents} cents exceeds the balance of {balance} cents"),
            )
            .with_field("amount_cents"));
        }
        if kind == Kind::Credit && balance.checked_add(amount_cents).is_none() {
            return Err(ApiError::invalid(
                "amount_cents",
                "the balance would overflow",
            ));
        }
        let entry = record(tx, &outbox, user_id, amount_cents, kind, description, false)?;
        Ok((StatusCode::CREATED, json!(entry)))
    })
    .await?;
    Ok((status, Json(body)))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this user's entries.
    #[param(value_type = Option<String>, pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")]
    user_id: Option<UserId>,
    /// Entries per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The id of the last entry of the previous page.
    #[param(minimum = 0)]
    after: Option<i64>,
}

/// Ledger entries in the order they were recorded.
#[utoipa::path(get, path = "/transactions", tag = "transaction-service", params(ListQuery),
    responses((status = 200, description = "A page of ledger entries", body = LedgerPage), ReadErrors))]
pub(crate) async fn list_transactions(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let (limit, after) = page(q.limit, q.after)?;
    let user_id = q.user_id;
    let entries = state
        .db
        .read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {ENTRY_COLUMNS} FROM transactions WHERE (?1 IS NULL OR user_id = ?1) AND id > ?2 ORDER BY id LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![user_id, after, limit], entry_from)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await?;
    let next_after = next_after(entries.len(), limit, entries.last().map(|x| x.id));
    Ok(Json(json!(LedgerPage {
        transactions: entries,
        next_after
    })))
}

/// A user's balance, from transaction-service's own ledger.
#[utoipa::path(get, path = "/users/{id}/balance", tag = "transaction-service",
    params(("id" = String, Path, description = "A user id", pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")),
    responses((status = 200, description = "The balance", body = Balance), ReadErrors))]
pub(crate) async fn balance(
    State(state): State<AppState>,
    AppPath(user_id): AppPath<UserId>,
) -> Result<Json<Value>, ApiError> {
    let id = user_id.clone();
    let balance = state.db.read(move |c| Ok(known_balance(c, &id)?)).await?;
    let balance_cents = balance.ok_or_else(|| unknown_user(&user_id))?;
    Ok(Json(json!(Balance {
        user_id,
        balance_cents
    })))
}

/// Applies `user.created`: records the user in the projection and grants the welcome
/// credit, once per user (the inbox applies each event once; a unique index refuses a
/// second welcome credit whatever happens upstream).
fn apply_user_created(
    tx: &Transaction,
    event: &CloudEvent,
    outbox: &Outbox,
    welcome_credit_cents: i64,
) -> Result<(), HandlerError> {
    let u: UserCreated = serde_json::from_value(event.data.clone())
        .map_err(|e| HandlerError::Permanent(format!("bad user.created data: {e}")))?;
    let now = edge_outbox::clock::now_ms();
    let new = tx
        .prepare_cached("INSERT INTO known_users (user_id, name, email, balance_cents, seen_at_ms) VALUES (?1, ?2, ?3, 0, ?4) ON CONFLICT (user_id) DO NOTHING")?
        .execute(params![u.id, u.name, u.email, now])?;
    tracing::info!(event_id = %event.id, seq = %event.sequence, user_id = %u.id, new = new == 1, "user seen");
    let has_welcome: bool = tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM transactions WHERE user_id = ?1 AND welcome = 1)",
        )?
        .query_row([&u.id], |r| r.get(0))?;
    if welcome_credit_cents > 0 && !has_welcome {
        record(
            tx,
            outbox,
            u.id,
            welcome_credit_cents,
            Kind::Credit,
            Some("welcome credit".into()),
            true,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(amount_cents: i64, description: Option<&str>) -> NewTransaction {
        NewTransaction {
            user_id: UserId::parse("1").unwrap(),
            amount_cents,
            kind: Kind::Credit,
            description: description.map(Into::into),
        }
    }

    #[test]
    fn amounts_are_positive_and_bounded() {
        for bad in [0, -5, AMOUNT_MAX_CENTS + 1] {
            assert_eq!(
                validate(&t(bad, None)).unwrap_err().field.as_deref(),
                Some("amount_cents"),
                "{bad}"
            );
        }
        assert!(validate(&t(AMOUNT_MAX_CENTS, None)).is_ok());
    }

    #[test]
    fn descriptions_are_trimmed_and_bounded() {
        assert_eq!(
            validate(&t(1, Some("  rent "))).unwrap(),
            Some("rent".into())
        );
        assert_eq!(validate(&t(1, Some("   "))).unwrap(), None);
        assert!(validate(&t(1, Some(&"x".repeat(501)))).is_err());
    }
}

/// A page of ledger entries.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct LedgerPage {
    transactions: Vec<LedgerEntry>,
    /// The `after` of the next page; null on the last one.
    next_after: Option<i64>,
}

/// A user's balance.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Balance {
    #[schema(value_type = String, pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")]
    user_id: UserId,
    balance_cents: i64,
}

/// transaction-service's API, for GET /openapi.json.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "transaction-service",
        description = "A ledger per user, with a welcome credit for every new user."
    ),
    paths(create_transaction, list_transactions, balance)
)]
pub struct Api;
