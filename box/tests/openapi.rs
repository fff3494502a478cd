//! The OpenAPI document (GET /openapi.json) against the README's API reference: the
//! error codes and statuses must be the same in both, and every route documented.

use std::collections::BTreeSet;

use edge_box::service::openapi;
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
fn the_readme_and_the_openapi_document_list_the_same_error_codes_and_statuses() {
    let readme = readme_errors();
    assert!(
        readme.len() > 10,
        "the README's error table was not found: {readme:?}"
    );
    for api in [
        user_service::Api::openapi(),
        transaction_service::Api::openapi(),
    ] {
        let doc = doc(api);
        let codes: BTreeSet<String> = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("an ErrorCode enum in the document")
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        let readme_codes: BTreeSet<String> = readme.iter().map(|(_, c)| c.clone()).collect();
        assert_eq!(
            codes, readme_codes,
            "error codes: OpenAPI (left) vs README (right)"
        );
        let readme_statuses: BTreeSet<String> = readme.iter().map(|(s, _)| s.to_string()).collect();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let statuses: BTreeSet<String> = op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .filter(|s| s.starts_with('4') || s.starts_with('5'))
                    .cloned()
                    .collect();
                if path == "/healthz" {
                    continue; // 503 "degraded" only: it reads nothing a client sends
                }
                assert_eq!(
                    statuses, readme_statuses,
                    "{method} {path}: error statuses (left) vs README (right)"
                );
            }
        }
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
    let common = ["/healthz", "/outbox", "/outbox/events"];
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
fn every_user_id_in_the_document_has_the_pattern_of_user_id_parse() {
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
    assert!(found >= 7, "user ids with a pattern: {found}");
}
