//! `Idempotency-Key`: a client that retries a POST with the same key gets the original
//! response and nothing is written again; the same key with a different request is
//! refused (422). The key and the response are stored in the same transaction as the
//! request's domain write, so a key is recorded exactly when its write committed.
//! Failed requests store nothing: fixing the request and retrying with the same key
//! works.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use rusqlite::{params, OptionalExtension, Transaction};
use serde_json::Value;

use super::http::{ApiError, ErrorCode};
use edge_outbox::clock::now_ms;
use edge_outbox::storage::Database;

/// The header's name.
pub const HEADER: &str = "Idempotency-Key";
/// Longest key accepted, in bytes.
pub const KEY_MAX_BYTES: usize = 200;

/// The optional `Idempotency-Key` header: 1-200 visible ASCII characters.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let mut values = parts.headers.get_all(HEADER).iter();
        let Some(value) = values.next() else {
            return Ok(IdempotencyKey(None));
        };
        if values.next().is_some() {
            return Err(ApiError::new(
                ErrorCode::InvalidHeader,
                format!("{HEADER} was sent more than once; send one key per request"),
            )
            .with_field(HEADER));
        }
        let valid = value.to_str().ok().filter(|k| {
            !k.is_empty() && k.len() <= KEY_MAX_BYTES && k.bytes().all(|b| b.is_ascii_graphic())
        });
        match valid {
            Some(k) => Ok(IdempotencyKey(Some(k.to_owned()))),
            None => Err(ApiError::new(
                ErrorCode::InvalidHeader,
                format!("{HEADER} must be 1 to {KEY_MAX_BYTES} visible ASCII characters"),
            )
            .with_field(HEADER)),
        }
    }
}

/// "Now" for pruning keys, never ahead of the time this process has measured: the wall
/// clock when the process started plus the monotonic time since. A forward jump of the
/// wall clock (NTP fixing a wrong clock, an operator) would otherwise age every key at
/// once and delete keys before their promised `--retention-ms`, so that a retried POST
/// could be recorded twice. A jump that happened while the service was stopped cannot
/// be seen from here (docs/failure-scenarios.md).
#[derive(Debug, Clone, Copy)]
pub struct PruneClock {
    start_wall_ms: i64,
    start: std::time::Instant,
}

impl PruneClock {
    /// Reads both clocks now.
    pub fn start() -> PruneClock {
        PruneClock {
            start_wall_ms: now_ms(),
            start: std::time::Instant::now(),
        }
    }

    /// The time to prune by, given the wall clock's `wall_now_ms`.
    pub fn now(&self, wall_now_ms: i64) -> i64 {
        let measured = self
            .start_wall_ms
            .saturating_add(i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX));
        wall_now_ms.min(measured)
    }
}

/// A JSON response: its status and body.
pub type Answer = (StatusCode, Value);

/// Runs `write` in one group-commit transaction unless `key` was already used for the
/// same `request` (method, path, canonical body), in which case the stored answer is
/// returned and nothing is written.
pub async fn write_once<F>(
    db: &Database,
    key: Option<String>,
    request: String,
    write: F,
) -> Result<Answer, ApiError>
where
    F: FnOnce(&Transaction) -> Result<Answer, ApiError> + Send + 'static,
{
    db.writer()
        .write(move |tx| {
            if let Some(key) = &key {
                if let Some(stored) = lookup(tx, key, &request)? {
                    return Ok(stored);
                }
            }
            let (status, body) = write(tx)?;
            if let Some(key) = &key {
                tx.prepare_cached(
                    "INSERT INTO idempotency_keys (key, request, status, response, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![key, request, status.as_u16(), body.to_string(), now_ms()])?;
            }
            Ok((status, body))
        })
        .await
}

fn lookup(tx: &Transaction, key: &str, request: &str) -> Result<Option<Answer>, ApiError> {
    let row: Option<(String, u16, String)> = tx
        .prepare_cached("SELECT request, status, response FROM idempotency_keys WHERE key = ?1")?
        .query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((stored_request, status, response)) = row else {
        return Ok(None);
    };
    if stored_request != request {
        return Err(ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            format!("this {HEADER} was already used for a different request"),
        )
        .with_field(HEADER));
    }
    let status = StatusCode::from_u16(status).map_err(ApiError::internal)?;
    let body = serde_json::from_str(&response).map_err(ApiError::internal)?;
    Ok(Some((status, body)))
}

/// The request as compared for retries: method, path and the body re-serialised
/// (serde_json sorts object keys, so key order and whitespace do not matter).
pub fn fingerprint(method_path: &str, body: &impl serde::Serialize) -> String {
    format!(
        "{method_path} {}",
        serde_json::to_value(body)
            .map(|v| v.to_string())
            .unwrap_or_default()
    )
}

/// Deletes keys older than `retention_ms`; returns how many.
pub fn prune(
    tx: &Transaction,
    retention_ms: u64,
    now_ms: i64,
) -> Result<usize, edge_outbox::storage::DbError> {
    let cutoff = now_ms.saturating_sub(retention_ms as i64);
    Ok(tx.execute(
        "DELETE FROM idempotency_keys WHERE created_at_ms < ?1",
        [cutoff],
    )?)
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn a_forward_jump_of_the_wall_clock_does_not_age_keys() {
        let clock = PruneClock::start();
        let week_ms = 7 * 24 * 3600 * 1000;
        let jumped = now_ms() + week_ms;
        assert!(
            clock.now(jumped) < now_ms() + 1_000,
            "pruned by the measured time, not the jump"
        );
        let behind = now_ms() - week_ms;
        assert_eq!(
            clock.now(behind),
            behind,
            "a clock behind is taken as it is (keys live longer)"
        );
    }
}
