//! The OpenAPI document (GET /openapi.json) against the README's API reference: the
//! error codes and statuses must be the same in both, and every route documented.

use std::collections::BTreeSet;

use edge_box::service::http::{ErrorCode, PAGE_MAX};
use edge_box::service::{idempotency, openapi};
use edge_box::{transaction_service, user_service};
use serde_json::Value;
use utoipa::OpenApi;

fn doc(api: utoipa::openapi::OpenApi) -> Value {
    serde_json::to_value(openapi(api)).unwrap()
}

/// (status, code) of every row of the README's error table.
fn readme_errors() -> BTreeSet<(u16, String)> {
    let readme = include_str!("../../README.md");
    let mut errors = BTreeSet::new();
    for line in readme.lines() {
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(status), Some(codes)) = (cols.get(1), cols.get(2)) else {
            continue;
        };
        let Ok(status) = status.parse::<u16>() else {
            continue;
        };
        if !(400..600).contains(&status) || !codes.starts_with('`') {
            continue;
        }
        for code in codes.split(',') {
            errors.insert((status, code.trim().trim_matches('`').to_owned()));
        }
    }
    errors
}

#[test]
fn the_readme_the_code_and_the_openapi_document_agree_on_every_error_code_and_status() {
    let readme = readme_errors();
    let code: BTreeSet<(u16, String)> = ErrorCode::ALL
        .iter()
        .map(|c| (c.status().as_u16(), c.as_str()))
        .collect();
    assert_eq!(
        readme, code,
        "(status, code): README (left) vs ErrorCode::status (right)"
    );
    let codes: BTreeSet<String> = code.iter().map(|(_, c)| c.clone()).collect();
    let statuses: BTreeSet<String> = code.iter().map(|(s, _)| s.to_string()).collect();
    let mut answered = BTreeSet::new();
    for api in [
        user_service::Api::openapi(),
        transaction_service::Api::openapi(),
    ] {
        let doc = doc(api);
        let in_doc: BTreeSet<String> = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("an ErrorCode enum in the document")
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            in_doc, codes,
            "error codes: document (left) vs ErrorCode (right)"
        );
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for status in op["responses"].as_object().unwrap().keys() {
                    if status.starts_with('4') || status.starts_with('5') {
                        assert!(
                            statuses.contains(status),
                            "{method} {path} documents {status}, which no code has"
                        );
                        answered.insert(status.clone());
                    }
                }
            }
        }
    }
    // 405 is the answer for the methods an operation does not have: the fallback's.
    let expected: BTreeSet<String> = statuses.into_iter().filter(|s| s != "405").collect();
    assert_eq!(
        answered, expected,
        "statuses some operation documents vs the codes'"
    );
}

#[test]
fn the_documented_limits_are_the_ones_the_handlers_check() {
    let users = doc(user_service::Api::openapi());
    let ledger = doc(transaction_service::Api::openapi());
    let schema = |d: &Value, name: &str, field: &str| {
        d["components"]["schemas"][name]["properties"][field].clone()
    };
    assert_eq!(
        schema(&users, "NewUser", "name")["maxLength"],
        user_service::NAME_MAX_CHARS
    );
    assert_eq!(
        schema(&users, "NewUser", "email")["maxLength"],
        user_service::EMAIL_MAX_BYTES
    );
    assert_eq!(
        schema(&ledger, "NewTransaction", "description")["maxLength"],
        transaction_service::DESCRIPTION_MAX_CHARS
    );
    assert_eq!(
        schema(&ledger, "NewTransaction", "amount_cents")["maximum"],
        transaction_service::AMOUNT_MAX_CENTS
    );
    let params = |d: &Value, path: &str, method: &str| -> Vec<Value> {
        d["paths"][path][method]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    for (d, path) in [(&users, "/users"), (&ledger, "/transactions")] {
        let limit = params(d, path, "get")
            .into_iter()
            .find(|p| p["name"] == "limit")
            .expect("a limit parameter");
        assert_eq!(limit["schema"]["maximum"], PAGE_MAX, "{path}");
        let key = params(d, path, "post")
            .into_iter()
            .find(|p| p["name"] == idempotency::HEADER)
            .expect("an Idempotency-Key parameter");
        let pattern = key["schema"]["pattern"].as_str().unwrap_or_default();
        assert!(
            pattern.contains(&format!("{{1,{}}}", idempotency::KEY_MAX_BYTES)),
            "{path}: {pattern}"
        );
    }
}

#[test]
fn each_service_documents_its_routes_and_the_common_ones() {
    let users = doc(user_service::Api::openapi());
    let ledger = doc(transaction_service::Api::openapi());
    assert_eq!(users["openapi"], "3.1.0");
    let paths = |d: &Value| -> BTreeSet<String> {
        d["paths"].as_object().unwrap().keys().cloned().collect()
    };
    let common = [
        "/healthz",
        "/outbox",
        "/outbox/events",
        "/metrics",
        "/admin/dead-letters/{id}/requeue",
        "/admin/dead-letters/{id}/drop",
        "/admin/replay",
    ];
    let want_users: BTreeSet<String> = ["/users", "/users/{id}"]
        .into_iter()
        .chain(common)
        .map(str::to_owned)
        .collect();
    let want_ledger: BTreeSet<String> = ["/transactions", "/users/{id}/balance"]
        .into_iter()
        .chain(common)
        .map(str::to_owned)
        .collect();
    assert_eq!(paths(&users), want_users);
    assert_eq!(paths(&ledger), want_ledger);
    assert_eq!(users["info"]["title"], "user-service");
    assert_eq!(ledger["info"]["title"], "transaction-service");
}

#[test]
fn every_user_id_in_the_document_has_the_one_user_id_pattern() {
    let mut found = 0;
    for api in [
        user_service::Api::openapi(),
        transaction_service::Api::openapi(),
    ] {
        let text = serde_json::to_string(&doc(api)).unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        let mut stack = vec![&doc];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(p)) = m.get("pattern") {
                        if p.contains("[0-9a-f]{8}") {
                            assert_eq!(p, edge_box::contract::USER_ID_PATTERN);
                            found += 1;
                        }
                    }
                    stack.extend(m.values());
                }
                Value::Array(a) => stack.extend(a),
                _ => {}
            }
        }
    }
    assert_eq!(found, 9, "user ids with a pattern");
}
