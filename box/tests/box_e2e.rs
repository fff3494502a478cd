//! The whole box as real processes: Mosquitto, user-service and transaction-service,
//! driven over HTTP on loopback, then checked with `edge-outbox verify`.
#![allow(clippy::result_large_err)]

// The library's test support (real brokers, databases), shared rather than copied.
mod services;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use services::{wait_until, Service};
use support::Broker;

fn verify(dir: &Path) -> (i32, String) {
    verify_with(dir, &[])
}

fn verify_with(dir: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .args([
            "verify",
            "--user-db",
            dir.join("user-service.db").to_str().unwrap(),
        ])
        .args([
            "--transaction-db",
            dir.join("transaction-service.db").to_str().unwrap(),
        ])
        .args(extra)
        .env_remove("WELCOME_CREDIT_CENTS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn drained(s: &Service) -> bool {
    let (_, st) = s.get("/outbox");
    let lag: u64 = st["consumer"]["streams"].as_object().map_or(1, |m| {
        m.values().map(|v| v["lag"].as_u64().unwrap_or(1)).sum()
    });
    st["outbox"]["pending"] == 0 && lag == 0
}

#[test]
fn users_get_one_welcome_credit_balances_match_the_ledger_and_verify_passes() {
    const USERS: usize = 40;
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let users = Service::start(
        "user-service",
        env!("CARGO_BIN_EXE_user-service"),
        dir.path(),
        &broker,
    );
    let ledger = Service::start(
        "transaction-service",
        env!("CARGO_BIN_EXE_transaction-service"),
        dir.path(),
        &broker,
    );

    // Four clients create users concurrently; each request is sent twice with the same
    // Idempotency-Key, as a client that lost the first answer would.
    let ids: Vec<i64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let users = &users;
                scope.spawn(move || {
                    (0..USERS / 4)
                        .map(|i| {
                            let body = json!({ "name": format!("User {t}-{i}"), "email": format!("u{t}-{i}@example.com") });
                            let key = format!("create-{t}-{i}");
                            let (status, first) = users.post("/users", body.clone(), Some(&key));
                            assert_eq!(status, 201, "{first}");
                            let (status, again) = users.post("/users", body, Some(&key));
                            assert_eq!((status, &again), (201, &first), "the retry returns the original answer");
                            first["id"].as_i64().unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), USERS);

    wait_until(
        "every user's welcome credit reached user-service",
        30,
        || {
            ids.iter()
                .all(|id| users.get(&format!("/users/{id}")).1["balance_cents"] == 1000)
        },
    );
    // Spend some of it through transaction-service, which answers from its projection.
    for id in &ids[..10] {
        let (status, t) = ledger.post(
            "/transactions",
            json!({ "user_id": id, "amount_cents": 300, "kind": "debit" }),
            Some(&format!("debit-{id}")),
        );
        assert_eq!(status, 201, "{t}");
        let (status, _) = ledger.post(
            "/transactions",
            json!({ "user_id": id, "amount_cents": 5000, "kind": "debit" }),
            None,
        );
        assert_eq!(status, 422, "a debit beyond the balance is refused");
    }
    wait_until("both services drained", 30, || {
        drained(&users) && drained(&ledger)
    });
    for id in &ids[..10] {
        assert_eq!(users.get(&format!("/users/{id}")).1["balance_cents"], 700);
        assert_eq!(
            ledger.get(&format!("/users/{id}/balance")).1["balance_cents"],
            700
        );
    }
    let (_, welcome) = ledger.get(&format!("/transactions?user_id={}", ids[0]));
    let welcomes = welcome["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["welcome"] == true)
        .count();
    assert_eq!(welcomes, 1);

    for mut s in [users, ledger] {
        let (status, took) = s.terminate();
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM",
            s.name
        );
        assert!(
            took < Duration::from_secs(10),
            "{} took {took:?} to stop",
            s.name
        );
    }

    let (code, report) = verify(dir.path());
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("all 9 checks passed"), "{report}");
    let (code, report) = verify_with(dir.path(), &["--welcome-credit-cents", "500"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("is 1000 cents, not 500"),
        "a box configured otherwise is reported: {report}"
    );

    // The same check must catch a broken invariant (the last user was not debited).
    let untouched = ids[USERS - 1];
    support::inspect(&dir.path().join("user-service.db"))
        .execute(
            "UPDATE users SET balance_cents = balance_cents + 1 WHERE id = ?1",
            [untouched],
        )
        .unwrap();
    let (code, report) = verify(dir.path());
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains(&format!(
            "user {untouched}: balance 1001 != ledger sum 1000"
        )),
        "{report}"
    );
}

#[test]
fn verify_refuses_missing_or_foreign_databases_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = verify(dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("user-service.db"), "{out}");
    for name in ["user-service.db", "transaction-service.db"] {
        rusqlite::Connection::open(dir.path().join(name))
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
    }
    let (code, out) = verify(dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is not a user-service database"), "{out}");
}

#[test]
fn the_offline_demo_runs_to_the_end_and_its_verify_passes() {
    let dir = tempfile::tempdir().unwrap();
    let out = box_command("demo-offline", &dir.path().join("demo"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("POST /users -> 201, user 8; user-service outbox: 5 pending"),
        "{text}"
    );
    assert!(text.contains("verify: all 9 checks passed"), "{text}");
}

/// `edge-outbox SUBCOMMAND --dir DIR` for a command that runs a box of its own: the
/// services from this build, mosquitto from Debian's /usr/sbin.
fn box_command(subcommand: &str, dir: &Path) -> Command {
    support::Broker::reserve(""); // fails loudly when mosquitto is missing
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_user-service"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:/usr/sbin:/sbin",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-outbox"));
    cmd.arg(subcommand)
        .arg("--dir")
        .arg(dir)
        .arg("--bin-dir")
        .arg(bin_dir)
        .env("PATH", path);
    cmd
}

/// Runs `edge-outbox power-cut` with `args`; returns its output, or None when it
/// skipped (said loudly).
fn power_cut(test: &str, args: &[&str]) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let out = box_command("power-cut", &dir.path().join("pc"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(line) = text.lines().find(|l| l.contains("SKIPPED")) {
        support::skip(test, line);
        return None;
    }
    assert!(out.status.success(), "{text}");
    Some(text)
}

#[test]
fn power_cuts_under_load_lose_no_acknowledged_request_needs_root() {
    let test = "power_cuts_under_load_lose_no_acknowledged_request_needs_root";
    if let Some(text) = power_cut(test, &["--cycles", "5"]) {
        assert!(
            text.contains("cycles=5") && text.contains("lost=0 duplicated=0 pending=0"),
            "{text}"
        );
        eprintln!("{}", text.lines().last().unwrap_or_default());
    }
}

#[test]
fn killing_one_component_at_a_time_under_load_loses_nothing() {
    let text =
        power_cut("", &["--mode", "kill", "--cycles", "6"]).expect("kill mode needs no root");
    assert!(
        text.contains("mode=kill cycles=6") && text.contains("lost=0 duplicated=0 pending=0"),
        "{text}"
    );
}
