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
use services::{
    box_command, create_users, drained, run_ok, verify, verify_with, wait_until, wait_welcomed,
    Service,
};
use support::Broker;

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
    let ids: Vec<String> = std::thread::scope(|scope| {
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
                            first["id"].as_str().unwrap().to_owned()
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
    assert!(report.contains("all 10 checks passed"), "{report}");
    let (code, report) = verify_with(dir.path(), &["--welcome-credit-cents", "500"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("is 1000 cents, not 500"),
        "a box configured otherwise is reported: {report}"
    );

    // The same check must catch a broken invariant (the last user was not debited).
    let untouched = &ids[USERS - 1];
    support::inspect(&dir.path().join("user-service.db"))
        .execute(
            "UPDATE users SET balance_cents = balance_cents + 1 WHERE uid = ?1",
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
    let text = run_ok(&mut box_command("demo-offline", &dir.path().join("demo")));
    assert!(
        text.contains("POST /users -> 201, user \"")
            && text.contains("; user-service outbox: 5 pending"),
        "{text}"
    );
    assert!(text.contains("verify: all 10 checks passed"), "{text}");
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

/// Starts user-service or transaction-service with short report intervals, so that a
/// restored producer hears at once how far its consumer got.
fn start_fast(name: &'static str, exe: &str, dir: &Path, broker: &Broker) -> Service {
    Service::start_with(name, exe, dir, &broker.url(), |cmd| {
        cmd.args(["--topic-prefix", &format!("e2e-r-{}", std::process::id())])
            .args(["--consumer-report-interval-ms", "300"]);
    })
}

fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Once both services drained, verify fails on the divergence (and the dead letters it
/// caused) only, naming each of `gone`. Returns its report.
fn verify_names_divergence(
    dir: &Path,
    users: &Service,
    ledger: &Service,
    gone: &[String],
) -> String {
    wait_until("both services drained", 30, || {
        drained(users) && drained(ledger)
    });
    let (code, report) = verify(dir);
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        failed_checks(&report),
        vec![
            "no producer database replaced or restored",
            "no dead letters"
        ],
        "{report}"
    );
    for id in gone {
        assert!(
            report.contains(&format!(
                "knows user {id}, which user-service no longer has"
            )),
            "{report}"
        );
    }
    report
}

/// The checks verify failed, by name.
fn failed_checks(report: &str) -> Vec<String> {
    report
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL  "))
        .map(|l| l.split("  ").next().unwrap_or(l).trim().to_owned())
        .collect()
}

/// Regression test for issue 12, "Producer identity": user-service restored from an
/// older backup, then started on an empty database, under the same source.
#[test]
fn a_restored_or_emptied_user_service_gives_new_users_one_welcome_credit_and_verify_names_the_divergence(
) {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let users_exe = env!("CARGO_BIN_EXE_user-service");
    let users_db = dir.path().join("user-service.db");
    let mut users = start_fast("user-service", users_exe, dir.path(), &broker);
    let ledger = start_fast(
        "transaction-service",
        env!("CARGO_BIN_EXE_transaction-service"),
        dir.path(),
        &broker,
    );
    let before = create_users(&users, "before", 2);
    wait_welcomed(&users, &ledger, &before);
    let backup = dir.path().join("backup.db");
    support::inspect(&users_db)
        .execute("VACUUM INTO ?1", [backup.to_str().unwrap()])
        .unwrap();
    let lost = create_users(&users, "lost", 2);
    wait_welcomed(&users, &ledger, &lost);
    wait_until("both services drained", 30, || {
        drained(&users) && drained(&ledger)
    });
    std::thread::sleep(Duration::from_millis(600)); // a position report after the last event
    users.terminate();

    // Restore the backup the way an operator would: the file, without its WAL.
    remove_database(&users_db);
    std::fs::copy(&backup, &users_db).unwrap();
    let mut users = start_fast("user-service", users_exe, dir.path(), &broker);
    let after = create_users(&users, "after", 3);
    wait_welcomed(&users, &ledger, &after);
    for id in &lost {
        assert_eq!(users.get(&format!("/users/{id}")).0, 404, "restored away");
    }
    assert_eq!(users.get("/outbox").1["outbox"]["epoch_reason"], "rewound");
    assert_eq!(
        ledger.get("/outbox").1["consumer"]["orphaned_events"],
        2,
        "what the producer no longer has, on transaction-service's status page"
    );
    // The restored user-service also consumes transaction-service's stream again from
    // where its backup stood: the welcome credits of the users it no longer has are
    // dead-lettered, which verify shows too.
    let report = verify_names_divergence(dir.path(), &users, &ledger, &lost);
    for id in &lost {
        assert!(
            report.contains(&format!("for unknown user {id}")),
            "{report}"
        );
    }
    assert!(report.contains("user-service/users 3..4"), "{report}");

    // Now on an empty database.
    users.terminate();
    remove_database(&users_db);
    let users = start_fast("user-service", users_exe, dir.path(), &broker);
    let fresh = create_users(&users, "fresh", 2);
    wait_welcomed(&users, &ledger, &fresh);
    let gone: Vec<String> = before.iter().chain(&after).cloned().collect();
    verify_names_divergence(dir.path(), &users, &ledger, &gone);
}

#[test]
fn mark_restored_begins_an_epoch_that_shares_all_the_backup_holds_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("restored.db");
    let cfg = support::config("mqtt://127.0.0.1:1", "user-service");
    let db = support::open_db(dir.path(), "restored", &cfg);
    let outbox = edge_outbox::Outbox::new(&cfg);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(support::create_items(&db, &outbox, "x", 3));
    drop(db);
    let old: String = support::inspect(&path)
        .query_row("SELECT epoch FROM outbox_epoch", [], |r| r.get(0))
        .unwrap();

    let mark_restored = |db: &Path| {
        Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
            .args(["mark-restored", "--db", db.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let out = mark_restored(&path);
    assert!(out.status.success(), "{out:?}");
    let (epoch, previous, reason): (String, String, String) = support::inspect(&path)
        .query_row(
            "SELECT epoch, previous, reason FROM outbox_epoch",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (previous.as_str(), reason.as_str()),
        (old.as_str(), "restored")
    );
    assert_ne!(epoch, old);
    assert_eq!(
        support::count(
            &path,
            "SELECT epoch_base FROM outbox_streams WHERE stream = 'items'"
        ),
        3,
        "the new epoch shares every event the backup holds"
    );
    assert_eq!(
        support::count(
            &path,
            &format!(
                "SELECT COUNT(*) FROM outbox WHERE json_extract(payload, '$.epoch') = '{epoch}'"
            )
        ),
        3,
        "every envelope carries the new epoch"
    );

    let missing = dir.path().join("missing.db");
    let out = mark_restored(&missing);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{out:?}"
    );
    assert!(!missing.exists(), "nothing created");
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let out = mark_restored(&empty);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not an SQLite database"),
        "{out:?}"
    );
    assert_eq!(
        std::fs::metadata(&empty).unwrap().len(),
        0,
        "left as it was"
    );
}

#[test]
fn logs_are_one_json_object_per_line_with_log_format_json_and_never_hold_the_password() {
    const SECRET: &str = "pw-that-must-never-be-logged-7f3a";
    let broker = Broker::start();
    for format in ["json", "text"] {
        let dir = tempfile::tempdir().unwrap();
        let mut users = Service::start_with(
            "user-service",
            env!("CARGO_BIN_EXE_user-service"),
            dir.path(),
            &broker.url(),
            |cmd| {
                cmd.args(["--topic-prefix", &format!("logs-{}", std::process::id())])
                    .args(["--log-format", format, "--mqtt-username", "user-service"])
                    .env("MQTT_PASSWORD", SECRET);
            },
        );
        let (status, _) = users.post(
            "/users",
            json!({ "name": "Logged", "email": "logged@example.com" }),
            None,
        );
        assert_eq!(status, 201);
        users.terminate();
        let log = users.log();
        assert!(log.contains("user created"), "{format}: {log}");
        assert!(
            !log.contains(SECRET),
            "{format}: the password is in the log"
        );
        if format == "json" {
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(
                    v["level"].is_string() && v["timestamp"].is_string() && v["fields"].is_object(),
                    "{line}"
                );
            }
        }
    }
}
