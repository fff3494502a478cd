//! Property-based fuzzing of both services' HTTP APIs from their own OpenAPI document
//! (GET /openapi.json), with schemathesis: no 5xx, every status and body as the
//! document says. Then the box's invariants must still hold (`edge-outbox verify`).
//!
//! `make test` installs schemathesis (a pinned version, from PyPI) into a virtualenv in
//! cargo's target folder and passes its `st` as SCHEMATHESIS; without it this test
//! says SKIPPED and why.

#![allow(clippy::result_large_err)]

mod services;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::process::Command;

use services::{drained, wait_until, Service};
use support::Broker;

/// Seconds of fuzzing per service.
const FUZZ_SECS: &str = "30";

#[test]
fn both_apis_conform_to_their_openapi_document_under_fuzzing_and_the_invariants_hold() {
    let Some(st) = std::env::var_os("SCHEMATHESIS") else {
        return support::skip(
            "fuzz",
            "schemathesis (SCHEMATHESIS=path to its `st`; `make test` installs it)",
        );
    };
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &'static str, exe: &str| {
        Service::start_with(name, exe, dir.path(), &broker.url(), |cmd| {
            cmd.args(["--topic-prefix", &format!("fuzz-{}", std::process::id())])
                .env("RUST_LOG", "warn");
        })
    };
    let users = start("user-service", env!("CARGO_BIN_EXE_user-service"));
    let ledger = start(
        "transaction-service",
        env!("CARGO_BIN_EXE_transaction-service"),
    );
    for s in [&users, &ledger] {
        let out = Command::new(&st)
            .args(["run", &format!("{}/openapi.json", s.base)])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .args(["--max-time", FUZZ_SECS, "--workers", "1", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", st.to_string_lossy()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("schemathesis against {}:\n{text}", s.name);
        assert!(
            out.status.success(),
            "schemathesis found failures in {}:\n{text}\n{} log:\n{}",
            s.name,
            s.name,
            s.log()
        );
    }
    wait_until("both services drained after the fuzzing", 60, || {
        drained(&users) && drained(&ledger)
    });
    let out = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .args([
            "verify",
            "--user-db",
            dir.path().join("user-service.db").to_str().unwrap(),
            "--transaction-db",
            dir.path().join("transaction-service.db").to_str().unwrap(),
        ])
        .env_remove("WELCOME_CREDIT_CENTS")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "verify after the fuzzing:\n{report}");
}
