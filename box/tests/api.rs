//! The HTTP APIs of both services, called in-process (`oneshot`) on real SQLite files:
//! validation, error bodies, idempotency, paging, and that nothing is written on error.
#![allow(clippy::result_large_err)]

// The library's test support (real brokers, databases), shared rather than copied.
#[path = "../../tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use edge_box::service::{self, AppState, ServiceArgs};
use edge_box::{transaction_service, user_service};
use edge_outbox::consumer::ConsumerStatus;
use edge_outbox::relay::RelayStatus;
use edge_outbox::storage::Schema;
use edge_outbox::{Config, Outbox};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use support::{config, count, inspect};
use tower::ServiceExt;

struct Api {
    app: Router,
    db: edge_outbox::Database,
    path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn api(name: &str, schema: Schema, routes: Router<AppState>) -> Api {
    api_with(name, schema, routes, |c| c)
}

fn api_with(
    name: &str,
    schema: Schema,
    routes: Router<AppState>,
    tweak: impl Fn(Config) -> Config,
) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.db"));
    api_at(
        dir,
        path,
        schema,
        routes,
        tweak(config("mqtt://127.0.0.1:1", name)),
    )
}

/// The OpenAPI document of the service whose schema is `schema`.
fn doc_of(schema: &Schema) -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    if schema.component == user_service::SCHEMA.component {
        user_service::Api::openapi()
    } else {
        transaction_service::Api::openapi()
    }
}

/// A service whose database is at `path`; `dir` is kept as long as the service.
fn api_at(
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    schema: Schema,
    routes: Router<AppState>,
    cfg: Config,
) -> Api {
    let args = ServiceArgs {
        db_path: path.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http_header_timeout_ms: 10_000,
        http_body_timeout_ms: 10_000,
        http_connections_max: 16,
        log_format: edge_box::service::LogFormat::Text,
        outbox: cfg.clone(),
    };
    let db = service::open_database(&args, schema).unwrap();
    let state = AppState::new(
        db,
        Outbox::new(&cfg),
        Arc::new(RelayStatus::default()),
        Arc::new(ConsumerStatus::default()),
    );
    Api {
        app: service::app(routes, doc_of(&schema), state.clone()),
        db: state.db,
        path,
        _dir: dir,
    }
}

fn users_api() -> Api {
    api("user-service", user_service::SCHEMA, user_service::routes())
}

fn ledger_api() -> Api {
    api(
        "transaction-service",
        transaction_service::SCHEMA,
        transaction_service::routes(),
    )
}

impl Api {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_owned())))
            .unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        (status, value)
    }

    /// POSTs a user and asserts the 201; returns the user.
    async fn create_user(&self, name: &str, email: &str) -> Value {
        let body = serde_json::json!({ "name": name, "email": email }).to_string();
        let (status, user) = self.post("/users", &body).await;
        assert_eq!(status, StatusCode::CREATED, "{user}");
        user
    }

    async fn post(&self, uri: &str, body: &str) -> (StatusCode, Value) {
        self.call("POST", uri, Some(body), &[]).await
    }

    fn rows(&self, table: &str) -> i64 {
        count(&self.path, &format!("SELECT COUNT(*) FROM {table}"))
    }
}

#[tokio::test]
async fn creating_a_user_returns_201_and_enqueues_user_created_in_the_same_transaction() {
    let api = users_api();
    let (status, user) = api
        .post(
            "/users",
            r#"{"name":"  Ada Lovelace ","email":"ada@example.com"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{user}");
    assert_eq!(user["name"], "Ada Lovelace", "the name is trimmed");
    assert_eq!(user["balance_cents"], 0);
    assert!(user["created_at"].as_str().unwrap().ends_with('Z'));
    let (_, events) = api
        .call("GET", "/outbox/events?status=pending", None, &[])
        .await;
    let event = &events["events"][0];
    assert_eq!(event["event_type"], "user.created");
    assert_eq!(event["seq"], 1);
    assert_eq!(event["event"]["data"]["id"], user["id"]);
    let id = user["id"].as_str().unwrap();
    assert_eq!(
        edge_box::contract::UserId::parse(id).map(|_| id.len()),
        Ok(36),
        "a UUID"
    );
    assert_eq!(event["event"]["subject"], id);
    let (status, fetched) = api.call("GET", &format!("/users/{id}"), None, &[]).await;
    assert_eq!((status, fetched), (StatusCode::OK, user));
}

#[tokio::test]
async fn bad_user_bodies_get_a_clear_error_and_write_nothing() {
    let api = users_api();
    let long_name = format!(r#"{{"name":"{}","email":"a@b.io"}}"#, "x".repeat(101));
    let huge = format!(r#"{{"name":"{}","email":"a@b.io"}}"#, "x".repeat(70_000));
    let cases: Vec<(&str, StatusCode, &str, Option<&str>)> = vec![
        (
            r#"{"name":"#,
            StatusCode::BAD_REQUEST,
            "malformed_json",
            None,
        ),
        ("not json", StatusCode::BAD_REQUEST, "malformed_json", None),
        (
            r#"{"name":"A","email":"a@b.io","admin":true}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("admin"),
        ),
        (
            r#"{"name":"A"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("email"),
        ),
        (
            r#"{"name":7,"email":"a@b.io"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            r#"{"name":" ","email":"a@b.io"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            &long_name,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("name"),
        ),
        (
            r#"{"name":"A","email":"not-an-email"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            Some("email"),
        ),
        (
            r#"[]"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            None,
        ),
        (&huge, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", None),
    ];
    for (body, status, code, field) in cases {
        let (got, err) = api.post("/users", body).await;
        assert_eq!(got, status, "{body:.60}: {err}");
        assert_eq!(err["error"], code, "{body:.60}: {err}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{err}"
        );
        assert_eq!(err["field"].as_str(), field, "{body:.60}: {err}");
    }
    let (status, err) = api.call("POST", "/users", None, &[]).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported_media_type")
        )
    );
    assert_eq!(api.rows("users"), 0);
    assert_eq!(api.rows("outbox"), 0);
}

#[tokio::test]
async fn a_duplicate_email_is_a_409_whatever_its_case_and_writes_nothing() {
    let api = users_api();
    api.create_user("A", "ada@example.com").await;
    let (status, err) = api
        .post("/users", r#"{"name":"B","email":"ADA@Example.com"}"#)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        (err["error"].as_str(), err["field"].as_str()),
        (Some("duplicate_email"), Some("email"))
    );
    assert_eq!(api.rows("users"), 1);
    assert_eq!(api.rows("outbox"), 1, "the refused user enqueued no event");
    assert_eq!(
        count(&api.path, "SELECT last_seq FROM outbox_streams"),
        1,
        "and took no sequence number"
    );
}

#[tokio::test]
async fn unknown_and_malformed_user_ids_are_404_and_400() {
    let api = users_api();
    let (status, err) = api.call("GET", "/users/42", None, &[]).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    let (status, err) = api.call("GET", "/users/forty-two", None, &[]).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_path"))
    );
}

#[tokio::test]
async fn an_idempotency_key_replays_the_original_response_and_refuses_a_different_body() {
    let api = users_api();
    let key = [("Idempotency-Key", "signup-7f3a")];
    let body = r#"{"name":"Ada","email":"ada@example.com"}"#;
    let first = api.call("POST", "/users", Some(body), &key).await;
    assert_eq!(first.0, StatusCode::CREATED);
    // Same request, fields in another order: the same request.
    let retry = api
        .call(
            "POST",
            "/users",
            Some(r#"{"email":"ada@example.com","name":"Ada"}"#),
            &key,
        )
        .await;
    assert_eq!(retry, first, "a retry gets the original response");
    assert_eq!(api.rows("users"), 1);
    assert_eq!(api.rows("outbox"), 1);

    let (status, err) = api
        .call(
            "POST",
            "/users",
            Some(r#"{"name":"Eve","email":"eve@example.com"}"#),
            &key,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        (err["error"].as_str(), err["field"].as_str()),
        (Some("idempotency_key_reused"), Some("Idempotency-Key"))
    );
    assert_eq!(
        api.rows("users"),
        1,
        "nothing written for the refused reuse"
    );

    let (status, err) = api
        .call("POST", "/users", Some(body), &[("Idempotency-Key", "")])
        .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_header"))
    );
    let k2 = [("Idempotency-Key", "k2")];
    let failed = api
        .call(
            "POST",
            "/users",
            Some(r#"{"name":"","email":"x@example.com"}"#),
            &k2,
        )
        .await;
    assert_eq!(failed.0, StatusCode::UNPROCESSABLE_ENTITY);
    let fixed = api
        .call(
            "POST",
            "/users",
            Some(r#"{"name":"Xavier","email":"x@example.com"}"#),
            &k2,
        )
        .await;
    assert_eq!(
        fixed.0,
        StatusCode::CREATED,
        "a failed request stored nothing: the corrected retry with the same key is applied"
    );
    assert_eq!(api.rows("idempotency_keys"), 2);
}

#[tokio::test]
async fn users_are_listed_in_bounded_pages() {
    let api = users_api();
    let mut created = Vec::new();
    for i in 0..5 {
        let user = api
            .create_user(&format!("U{i}"), &format!("u{i}@example.com"))
            .await;
        created.push(user["id"].as_str().unwrap().to_owned());
    }
    let (_, page1) = api.call("GET", "/users?limit=2", None, &[]).await;
    assert_eq!(page1["users"].as_array().unwrap().len(), 2);
    assert_eq!(page1["next_after"], created[1].as_str());
    let (_, rest) = api
        .call(
            "GET",
            &format!("/users?limit=10&after={}", created[1]),
            None,
            &[],
        )
        .await;
    let ids: Vec<&str> = rest["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, created[2..].to_vec(), "in the order they were created");
    assert_eq!(rest["next_after"], Value::Null);
    let unknown = edge_box::contract::UserId::generate();
    for bad in [
        "/users?limit=501",
        "/users?limit=0",
        "/users?after=-1",
        "/users?after=2x",
        &format!("/users?after={unknown}"),
        "/users?limit=abc",
        "/users?sort=name",
    ] {
        let (status, err) = api.call("GET", bad, None, &[]).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_query")),
            "{bad}: {err}"
        );
    }
}

/// A 503 with error `code` whose message tells the client nothing was written.
fn assert_refused_with_nothing_written(status: StatusCode, err: &Value, code: &str) {
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some(code)),
        "{err}"
    );
    let message = err["message"].as_str().unwrap_or_default();
    assert!(message.contains("nothing was written"), "{err}");
}

/// A user transaction-service has learnt about, with a starting balance.
fn seed_known_user(api: &Api, id: &str, balance: i64) {
    support::inspect(&api.path)
        .execute("INSERT INTO known_users (user_id, name, email, balance_cents, seen_at_ms) VALUES (?1, 'A', 'a@b.io', ?2, 0)", rusqlite::params![id, balance])
        .unwrap();
}

#[tokio::test]
async fn transactions_for_users_not_seen_yet_are_404_with_an_explanation() {
    let api = ledger_api();
    let (status, err) = api
        .post(
            "/transactions",
            r#"{"user_id":"9","amount_cents":5,"kind":"credit"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("may not have arrived yet"),
        "{err}"
    );
    let (status, _) = api.call("GET", "/users/9/balance", None, &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(api.rows("transactions") + api.rows("outbox"), 0);
}

#[tokio::test]
async fn credits_and_debits_move_the_balance_and_a_debit_beyond_it_is_refused() {
    let api = ledger_api();
    seed_known_user(&api, "1", 100);
    let (status, err) = api
        .post(
            "/transactions",
            r#"{"user_id":"1","amount_cents":150,"kind":"debit"}"#,
        )
        .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("insufficient_funds"))
    );
    assert_eq!(
        api.rows("transactions") + api.rows("outbox"),
        0,
        "nothing written on error"
    );

    let (status, t) = api
        .post(
            "/transactions",
            r#"{"user_id":"1","amount_cents":50,"kind":"credit","description":" top-up "}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{t}");
    assert_eq!(
        (t["description"].as_str(), t["welcome"].as_bool()),
        (Some("top-up"), Some(false))
    );
    let (status, _) = api
        .post(
            "/transactions",
            r#"{"user_id":"1","amount_cents":150,"kind":"debit"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, balance) = api.call("GET", "/users/1/balance", None, &[]).await;
    assert_eq!(balance, json!({ "user_id": "1", "balance_cents": 0 }));

    let (_, events) = api.call("GET", "/outbox/events", None, &[]).await;
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["data"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec!["credit", "debit"],
        "one transaction.created per entry, in order"
    );

    let (_, list) = api
        .call("GET", "/transactions?user_id=1&limit=1", None, &[])
        .await;
    assert_eq!(list["transactions"].as_array().unwrap().len(), 1);
    assert_eq!(list["next_after"], 1);
}

#[tokio::test]
async fn bad_transaction_bodies_are_refused_with_their_field() {
    let api = ledger_api();
    seed_known_user(&api, "1", 100);
    let cases = [
        (
            r#"{"user_id":"1","amount_cents":0,"kind":"credit"}"#,
            "amount_cents",
        ),
        (
            r#"{"user_id":"1","amount_cents":-3,"kind":"credit"}"#,
            "amount_cents",
        ),
        (
            r#"{"user_id":"1","amount_cents":1000000001,"kind":"credit"}"#,
            "amount_cents",
        ),
        (
            r#"{"user_id":"1","amount_cents":1.5,"kind":"credit"}"#,
            "amount_cents",
        ),
        (r#"{"user_id":"1","amount_cents":5,"kind":"gift"}"#, "kind"),
        (
            r#"{"user_id":"0","amount_cents":5,"kind":"credit"}"#,
            "user_id",
        ),
        (
            r#"{"user_id":"1","amount_cents":5,"kind":"credit","memo":"x"}"#,
            "memo",
        ),
    ];
    for (body, field) in cases {
        let (status, err) = api.post("/transactions", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_eq!(err["field"].as_str(), Some(field), "{body}: {err}");
    }
    assert_eq!(api.rows("transactions"), 0);
}

#[tokio::test]
async fn a_retried_transaction_with_the_same_key_is_recorded_once() {
    let api = ledger_api();
    seed_known_user(&api, "1", 0);
    let key = [("Idempotency-Key", "pay-1")];
    let body = r#"{"user_id":"1","amount_cents":25,"kind":"credit"}"#;
    let first = api.call("POST", "/transactions", Some(body), &key).await;
    let again = api.call("POST", "/transactions", Some(body), &key).await;
    assert_eq!(first.0, StatusCode::CREATED);
    assert_eq!(again, first);
    assert_eq!(api.rows("transactions"), 1);
    assert_eq!(api.rows("outbox"), 1);
    let (_, balance) = api.call("GET", "/users/1/balance", None, &[]).await;
    assert_eq!(balance["balance_cents"], 25);
}

#[tokio::test]
async fn status_endpoints_show_the_outbox_and_refuse_bad_filters() {
    let api = users_api();
    assert_eq!(
        api.call("GET", "/healthz", None, &[]).await,
        (StatusCode::OK, json!({ "status": "ok" }))
    );
    api.post("/users", r#"{"name":"A","email":"a@example.com"}"#)
        .await;
    let (status, s) = api.call("GET", "/outbox", None, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        s["outbox"]["pending"], 1,
        "no relay runs here: the row stays pending"
    );
    assert_eq!(s["outbox"]["streams"]["users"]["last_seq"], 1);
    assert_eq!(s["outbox"]["streams"]["users"]["last_published_seq"], 0);
    assert_eq!(s["broker_connected"], false);
    let (_, published) = api
        .call("GET", "/outbox/events?status=published", None, &[])
        .await;
    assert_eq!(published["events"], json!([]));
    let (_, newest) = api
        .call("GET", "/outbox/events?order=desc&limit=1", None, &[])
        .await;
    assert_eq!(newest["events"][0]["status"], "pending");
    for bad in [
        "/outbox/events?status=done",
        "/outbox/events?order=up",
        "/outbox/events?limit=1000",
    ] {
        assert_eq!(
            api.call("GET", bad, None, &[]).await.0,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn a_full_backlog_refuses_writes_with_503_and_writes_nothing() {
    let api = api_with(
        "user-service",
        user_service::SCHEMA,
        user_service::routes(),
        |c| Config {
            outbox_backlog_max_events: 2,
            ..c
        },
    );
    for i in 0..2 {
        api.create_user("U", &format!("u{i}@example.com")).await;
    }
    let (status, err) = api
        .post("/users", r#"{"name":"U","email":"u9@example.com"}"#)
        .await;
    assert_refused_with_nothing_written(status, &err, "backlog_full");
    assert_eq!(api.rows("users"), 2);
    let (_, s) = api.call("GET", "/outbox", None, &[]).await;
    assert_eq!(s["outbox"]["backlog"]["events"], 2);
    assert_eq!(s["outbox"]["backlog"]["max_events"], 2);
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn disk_full_refuses_writes_with_503_keeps_what_was_accepted_and_recovers_needs_root() {
    let test = "disk_full_refuses_writes_with_503_keeps_what_was_accepted_and_recovers_needs_root";
    if let Some(missing) = support::root_missing(&["mount", "umount"]) {
        return support::skip(test, &missing);
    }
    let disk = match SmallDisk::mount("3m") {
        Ok(d) => d,
        Err(e) => return support::skip(test, &format!("cannot mount a tmpfs: {e}")),
    };
    let path = disk.0.path().join("user-service.db");
    let cfg = config("mqtt://127.0.0.1:1", "user-service");
    let api = api_at(
        tempfile::tempdir().unwrap(),
        path,
        user_service::SCHEMA,
        user_service::routes(),
        cfg,
    );
    let user = |i: usize| format!(r#"{{"name":"U","email":"u{i}@example.com"}}"#);
    for i in 0..3 {
        assert_eq!(api.post("/users", &user(i)).await.0, StatusCode::CREATED);
    }

    // Fill the disk to the last byte.
    let filler = disk.0.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let mut accepted = 3;
    let mut refused = None;
    for i in 3..200 {
        let (status, body) = api.post("/users", &user(i)).await;
        match status {
            StatusCode::CREATED => accepted += 1,
            _ => {
                refused = Some((status, body));
                break;
            }
        }
    }
    let (status, err) = refused.expect("a full disk refuses writes");
    assert_refused_with_nothing_written(status, &err, "storage_full");
    assert_eq!(
        api.rows("users"),
        accepted,
        "everything acknowledged is still there"
    );

    // Space comes back: the service recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let (status, created) = api.post("/users", &user(999)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(api.rows("users"), accepted + 1);
    assert_eq!(api.rows("outbox"), accepted + 1, "every user has its event");
}

/// Regression tests for issue 16, findings 4-8: every error is JSON in the documented
/// shape, bodies are JSON objects, a wrongly typed field is 422 with its field.
#[tokio::test]
async fn fallbacks_and_shapes_of_bodies_are_refused_as_json_with_their_field() {
    let users = users_api();
    let ledger = ledger_api();
    // 404 and 405 from the router itself.
    let (status, err) = users.call("GET", "/no/such/route", None, &[]).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found")),
        "{err}"
    );
    let (status, err) = users.call("DELETE", "/users", None, &[]).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
        "{err}"
    );

    // Not an object: nothing is created from an array.
    let (status, err) = users.post("/users", r#"["Bob","bob@example.com"]"#).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_field")),
        "{err}"
    );
    assert_eq!(users.rows("users"), 0);
    // A repeated key names its field.
    let (status, err) = users
        .post("/users", r#"{"name":"A","name":"B","email":"a@b.io"}"#)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert_eq!(err["field"], "name", "{err}");
    // A name of invisible characters only.
    let (status, err) = users
        .post(
            "/users",
            "{\"name\":\"\u{200B}\u{202E}\u{2060}\",\"email\":\"a@b.io\"}",
        )
        .await;
    assert_eq!(
        (status, err["field"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("name")),
        "{err}"
    );
    assert_eq!(users.rows("users"), 0);

    // Wrongly typed fields of a transaction: 422 with the field, not 400.
    for body in [
        r#"{"user_id":"1","amount_cents":5,"kind":null}"#,
        r#"{"user_id":"1","amount_cents":5,"kind":7}"#,
        r#"{"user_id":"1","amount_cents":5,"kind":{"credit":null}}"#,
    ] {
        let (status, err) = ledger.post("/transactions", body).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {err}");
        assert_eq!(err["error"], "invalid_field", "{body}: {err}");
        assert_eq!(err["field"], "kind", "{body}: {err}");
    }
    let (status, err) = ledger.post("/transactions", r#"[1,5,"credit"]"#).await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_field")),
        "{err}"
    );
    assert_eq!(ledger.rows("transactions"), 0);
}

#[tokio::test]
async fn repeated_idempotency_keys_and_non_canonical_ids_are_refused() {
    let users = users_api();
    let user = users.create_user("Ada", "ada@example.com").await;
    let id = user["id"].as_str().unwrap().to_owned();
    let body = r#"{"name":"Bob","email":"bob@example.com"}"#;
    let (status, err) = users
        .call(
            "POST",
            "/users",
            Some(body),
            &[("Idempotency-Key", "k1"), ("Idempotency-Key", "k2")],
        )
        .await;
    assert_eq!(
        (status, err["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_header")),
        "{err}"
    );
    assert_eq!(users.rows("users"), 1, "nothing written");
    for alias in [
        "/users/+1",
        "/users/01",
        "/users/001",
        "/users/%2B1",
        "/users/%301",
        "/users/-0",
        &format!("/users/{}", id.to_uppercase()),
        &format!("/users/{}", id.replace('-', "")),
        &format!("/users/%7B{id}%7D"),
    ] {
        let (status, err) = users.call("GET", alias, None, &[]).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_path")),
            "{alias}: {err}"
        );
    }
    assert_eq!(
        users
            .call("GET", &format!("/users/{id}"), None, &[])
            .await
            .0,
        StatusCode::OK
    );
}

/// Regression test for issue 16, finding 7.
#[tokio::test]
async fn emails_are_unique_after_unicode_case_folding_and_normalisation() {
    let users = users_api();
    users.create_user("Émile", "émile@example.com").await;
    for same in [
        "ÉMILE@EXAMPLE.COM",
        "e\u{301}mile@example.com", // the accent as a combining character (NFD)
        "E\u{301}MILE@example.com",
    ] {
        let body = serde_json::json!({ "name": "Again", "email": same }).to_string();
        let (status, err) = users.post("/users", &body).await;
        assert_eq!(
            (status, err["error"].as_str()),
            (StatusCode::CONFLICT, Some("duplicate_email")),
            "{same:?}: {err}"
        );
    }
    assert_eq!(users.rows("users"), 1);

    // A user written before schema version 2 has no key until the service's start
    // computes it; then a folded variant of it is refused too.
    inspect(&users.path)
        .execute(
            "INSERT INTO users (name, email, balance_cents, created_at) VALUES ('Old', 'straße@example.com', 0, 'x')",
            [],
        )
        .unwrap();
    let keyed = users
        .db
        .writer()
        .write(|tx| user_service::backfill_email_keys(tx).map_err(edge_outbox::DbError::from))
        .await
        .unwrap();
    assert_eq!(keyed, 1);
    let body = serde_json::json!({ "name": "New", "email": "STRASSE@example.com" }).to_string();
    let (status, err) = users.post("/users", &body).await;
    assert_eq!(status, StatusCode::CONFLICT, "ß folds to ss: {err}");
}

#[tokio::test]
async fn each_service_serves_its_openapi_document() {
    for (api, path) in [(users_api(), "/users"), (ledger_api(), "/transactions")] {
        let (status, doc) = api.call("GET", "/openapi.json", None, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"][path].is_object(), "{path} documented");
        assert!(doc["paths"]["/healthz"].is_object());
    }
}
