//! user-service: users, and their balances as transaction-service reports them.
//!
//! ```text
//! POST /users ──> INSERT users + enqueue user.created (stream "users"), one transaction
//! transaction.created (from transaction-service) ──> users.balance_cents += amount
//! ```

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use edge_outbox::{CloudEvent, HandlerError, Handlers, Migration, NewEvent, Schema, StreamKey};

use crate::contract::{
    TransactionCreated, User, UserId, TRANSACTIONS_STREAM, TRANSACTION_CREATED, USERS_STREAM,
    USER_CREATED,
};
use crate::service::http::{
    page, ApiError, AppJson, AppPath, AppQuery, ErrorCode, ReadErrors, UserWriteErrors,
};
use crate::service::idempotency::{self, IdempotencyKey};
use crate::service::{AppState, Spec};

pub const SCHEMA: Schema = Schema {
    component: "user_service",
    migrations: &[
        Migration {
            version: 1,
            name: "0001_users.sql",
            sql: include_str!("../schema/user-service/0001_users.sql"),
        },
        Migration {
            version: 2,
            name: "0002_email_key.sql",
            sql: include_str!("../schema/user-service/0002_email_key.sql"),
        },
        Migration {
            version: 3,
            name: "0003_user_uuid.sql",
            sql: include_str!("../schema/user-service/0003_user_uuid.sql"),
        },
        Migration {
            version: 4,
            name: "0004_one_email_index.sql",
            sql: include_str!("../schema/user-service/0004_one_email_index.sql"),
        },
    ],
};

/// The key under which an email is unique: NFC, Unicode case folding, NFC again (so
/// that "émile@…" typed with a combining accent and "ÉMILE@…" are one address).
pub fn email_key(email: &str) -> String {
    use unicode_normalization::UnicodeNormalization;
    let nfc: String = email.nfc().collect();
    caseless::default_case_fold_str(&nfc).nfc().collect()
}

/// Gives every user written before schema version 2 its `email_key`. Two old users
/// whose emails fold to one key keep their rows; the later one gets no key (it can
/// then not be matched by a new signup either way) and is logged. Returns how many
/// rows got a key.
pub fn backfill_email_keys(tx: &rusqlite::Transaction) -> rusqlite::Result<usize> {
    let rows: Vec<(i64, String)> = tx
        .prepare("SELECT id, email FROM users WHERE email_key IS NULL ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut set = 0;
    for (id, email) in rows {
        let key = email_key(&email);
        match tx.execute(
            "UPDATE users SET email_key = ?2 WHERE id = ?1",
            params![id, key],
        ) {
            Ok(_) => set += 1,
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) => {
                tracing::warn!(user_id = id, "an older user's email equals another's after Unicode case folding; left without an email key")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(set)
}

/// Longest name, in characters, after trimming.
pub const NAME_MAX_CHARS: usize = 100;
/// Longest email, in bytes (RFC 5321's path limit).
pub const EMAIL_MAX_BYTES: usize = 254;

/// user-service, consuming `transactions_source`'s stream "transactions".
pub fn spec(transactions_source: &str) -> Spec {
    Spec {
        name: "user-service",
        schema: SCHEMA,
        routes: routes(),
        api: <Api as utoipa::OpenApi>::openapi(),
        consumes: vec![StreamKey {
            source: transactions_source.to_owned(),
            stream: TRANSACTIONS_STREAM.to_owned(),
        }],
        handlers: Handlers::new().on(TRANSACTION_CREATED, apply_transaction),
        prepare: Some(backfill_email_keys),
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/users", get(list_users).post(create_user))
        .route("/users/{id}", get(get_user))
}

const USER_COLUMNS: &str = "uid, name, email, balance_cents, created_at";

fn user_from(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        name: r.get(1)?,
        email: r.get(2)?,
        balance_cents: r.get(3)?,
        created_at: r.get(4)?,
    })
}

/// The body of `POST /users`.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    /// 1-100 characters after trimming, at least one of them visible, no control
    /// characters.
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// Like `name@example.com`, at most 254 bytes; unique after Unicode case folding.
    #[schema(
        min_length = 3,
        max_length = 254,
        pattern = r"^[^@\s]{1,64}@[^@\s.]+(\.[^@\s.]+)+$"
    )]
    pub email: String,
}

/// Checks and normalises a new user: the trimmed name, the trimmed email.
pub fn validate(input: &NewUser) -> Result<(String, String), ApiError> {
    let name = input.name.trim();
    let chars = name.chars().count();
    if chars == 0 || chars > NAME_MAX_CHARS {
        return Err(ApiError::invalid(
            "name",
            format!("name must be 1 to {NAME_MAX_CHARS} characters after trimming"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name",
            "name must not contain control characters",
        ));
    }
    if !name.chars().any(is_visible) {
        return Err(ApiError::invalid(
            "name",
            "name must hold at least one visible character",
        ));
    }
    // Normalised before it is checked, so that the 254-byte limit holds for what is
    // stored (NFC may change the length).
    use unicode_normalization::UnicodeNormalization;
    let email: String = input.email.trim().nfc().collect();
    if !plausible_email(&email) {
        return Err(ApiError::invalid(
            "email",
            "email must look like name@example.com",
        ));
    }
    Ok((name.to_owned(), email))
}

/// A character that shows: not whitespace, not a control character, not one of the
/// invisible formatting characters (zero-width spaces and joiners, bidi controls, the
/// BOM, soft hyphen, word joiner and the invisible operators, tag characters).
fn is_visible(c: char) -> bool {
    !c.is_whitespace()
        && !c.is_control()
        && !matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
            | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{E0000}'..='\u{E0FFF}')
}

/// One `@`, a non-empty local part, a domain with a dot and no empty label, no spaces
/// or control characters, at most 254 bytes. Deliverability is not checked.
fn plausible_email(email: &str) -> bool {
    if email.len() > EMAIL_MAX_BYTES || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && local.len() <= 64
        && !domain.contains('@')
        && domain.contains('.')
        && domain.split('.').all(|l| !l.is_empty())
}

/// Creates a user; its `user.created` event is committed with it.
#[utoipa::path(post, path = "/users", tag = "user-service",
    params(("Idempotency-Key" = Option<String>, Header, description = "1-200 visible ASCII characters: a retry with the same key and request gets the first answer", pattern = r"^[!-~]{1,200}$")),
    request_body = NewUser,
    responses((status = 201, description = "The user", body = User), UserWriteErrors))]
pub(crate) async fn create_user(
    State(state): State<AppState>,
    IdempotencyKey(key): IdempotencyKey,
    AppJson(input): AppJson<NewUser>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let (name, email) = validate(&input)?;
    let outbox = state.outbox.clone();
    let request = idempotency::fingerprint("POST /users", &input);
    let (status, body) = idempotency::write_once(&state.db, key, request, move |tx| {
        let created_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let id = UserId::generate();
        let inserted = tx
            .prepare_cached("INSERT INTO users (uid, name, email, email_key, balance_cents, created_at) VALUES (?1, ?2, ?3, ?4, 0, ?5)")?
            .execute(params![id, name, email, email_key(&email), created_at]);
        if let Err(e) = inserted {
            if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) {
                return Err(ApiError::new(ErrorCode::DuplicateEmail, format!("a user with email {email:?} already exists")).with_field("email"));
            }
            return Err(e.into());
        }
        let user = User { id, name, email, balance_cents: 0, created_at };
        let subject = user.id.to_string();
        let event = outbox.enqueue(tx, NewEvent { stream: USERS_STREAM, event_type: USER_CREATED, subject: Some(&subject), data: &user })?;
        tracing::info!(user_id = %user.id, event_id = %event.event_id, seq = event.seq, "user created");
        Ok((StatusCode::CREATED, json!(user)))
    })
    .await?;
    Ok((status, Json(body)))
}

/// One user, with the balance transaction-service reported.
#[utoipa::path(get, path = "/users/{id}", tag = "user-service",
    params(("id" = String, Path, description = "A user id", pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")),
    responses((status = 200, description = "The user", body = User), ReadErrors))]
pub(crate) async fn get_user(
    State(state): State<AppState>,
    AppPath(id): AppPath<UserId>,
) -> Result<Json<User>, ApiError> {
    let key = id.clone();
    let user = state.db.read(move |c| Ok(find_user(c, &key)?)).await?;
    user.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no user with id {id}")))
}

fn find_user(c: &Connection, id: &UserId) -> rusqlite::Result<Option<User>> {
    c.prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE uid = ?1"))?
        .query_row([id], user_from)
        .optional()
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Users per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The id of the last user of the previous page.
    #[param(value_type = Option<String>, pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")]
    after: Option<UserId>,
}

/// A page of users.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct UserPage {
    users: Vec<User>,
    /// The `after` of the next page; null on the last one.
    #[schema(value_type = Option<String>, pattern = r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[1-9][0-9]{0,18})$")]
    next_after: Option<UserId>,
}

/// Users in the order they were created.
#[utoipa::path(get, path = "/users", tag = "user-service", params(ListQuery),
    responses((status = 200, description = "A page of users", body = UserPage), ReadErrors))]
pub(crate) async fn list_users(
    State(state): State<AppState>,
    AppQuery(q): AppQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let (limit, _) = page(q.limit, None)?;
    let after = q.after;
    let users = state
        .db
        .read(move |c| {
            // Users in the order they were created; `after` names the last one seen.
            let row: Option<i64> = match &after {
                None => Some(0),
                Some(uid) => c
                    .prepare_cached("SELECT id FROM users WHERE uid = ?1")?
                    .query_row([uid], |r| r.get(0))
                    .optional()?,
            };
            let Some(row) = row else {
                return Ok(None);
            };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let users = stmt
                .query_map(params![row, limit], user_from)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(users))
        })
        .await?
        .ok_or_else(|| ApiError::invalid_query("after", "after names no user"))?;
    let next_after = (users.len() == limit as usize)
        .then(|| users.last().map(|u| u.id.clone()))
        .flatten();
    Ok(Json(json!(UserPage { users, next_after })))
}

/// Applies a `transaction.created` event: the user's balance moves by its amount.
fn apply_transaction(tx: &rusqlite::Transaction, event: &CloudEvent) -> Result<(), HandlerError> {
    let t: TransactionCreated = serde_json::from_value(event.data.clone())
        .map_err(|e| HandlerError::Permanent(format!("bad transaction.created data: {e}")))?;
    let delta = match t.kind.as_str() {
        "credit" => t.amount_cents,
        "debit" => -t.amount_cents,
        other => {
            return Err(HandlerError::Permanent(format!(
                "transaction {} has unknown kind {other:?}",
                t.id
            )))
        }
    };
    let changed = tx
        .prepare_cached("UPDATE users SET balance_cents = balance_cents + ?2 WHERE uid = ?1")?
        .execute(params![t.user_id, delta])?;
    if changed == 0 {
        return Err(HandlerError::Permanent(format!(
            "transaction {} is for unknown user {}",
            t.id, t.user_id
        )));
    }
    tracing::info!(event_id = %event.id, seq = %event.sequence, user_id = %t.user_id, delta, "balance updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, email: &str) -> NewUser {
        NewUser {
            name: name.into(),
            email: email.into(),
        }
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(validate(&user("  Ada  ", "a@b.io")).unwrap().0, "Ada");
        assert_eq!(
            validate(&user("   ", "a@b.io"))
                .unwrap_err()
                .field
                .as_deref(),
            Some("name")
        );
        assert!(
            validate(&user(&"é".repeat(100), "a@b.io")).is_ok(),
            "100 characters, not bytes"
        );
        assert!(validate(&user(&"é".repeat(101), "a@b.io")).is_err());
        assert!(validate(&user("a\u{0}b", "a@b.io")).is_err());
    }

    #[test]
    fn implausible_emails_are_refused() {
        for bad in [
            "", "ada", "ada@", "@b.io", "a@b", "a@@b.io", "a b@c.io", "a@b..io", "a@.io",
        ] {
            assert_eq!(
                validate(&user("Ada", bad)).unwrap_err().field.as_deref(),
                Some("email"),
                "{bad:?}"
            );
        }
        assert!(validate(&user("Ada", "ada.lovelace+x@math.example.org")).is_ok());
    }
}

/// user-service's API, for GET /openapi.json.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "user-service",
        description = "Users, and their balances as transaction-service reports them."
    ),
    paths(create_user, get_user, list_users)
)]
pub struct Api;
