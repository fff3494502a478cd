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
use std::time::{Duration, Instant};

use services::{drained, wait_until, Service};
use support::Broker;

/// Seconds of fuzzing per service.
const FUZZ_SECS: &str = "30";
/// A schemathesis run that has not ended after this is killed and the test fails.
const WATCHDOG: Duration = Duration::from_secs(120);

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
        // In the test's folder: schemathesis keeps a cache (with fuzzed bodies) in its
        // working directory, which must not be the source tree.
        let log = dir.path().join(format!("schemathesis-{}.log", s.name));
        let mut child = Command::new(&st)
            .current_dir(dir.path())
            .args(["run", &format!("{}/openapi.json", s.base)])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            ])
            .args(["--max-time", FUZZ_SECS, "--request-timeout", "5"])
            .args(["--workers", "1", "--no-color"])
            .env("SCHEMATHESIS_HOOKS", "")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("running {}: {e}", st.to_string_lossy()));
        // --max-time bounds the run; this bounds a schemathesis that hangs anyway.
        let deadline = Instant::now() + WATCHDOG;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("schemathesis did not finish within {WATCHDOG:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        println!("schemathesis against {}:\n{text}", s.name);
        assert!(
            status.success(),
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
    assert!(
        out.status.success(),
        "verify after the fuzzing:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
