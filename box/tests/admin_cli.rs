//! `edge-outbox status`, `dead-letters`, `replay` and `outbox list` against the real
//! box (Mosquitto and both services as processes), with their exit codes.

#![allow(clippy::result_large_err)]

mod services;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use services::{drained, wait_until, Service};
use support::Broker;

/// Runs `edge-outbox ARGS`: its exit code, standard output and standard error.
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .args(args)
        .env_remove("DB_PATH")
        .env_remove("SERVICE_URL")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        out.status.code().unwrap_or(-1),
        text(&out.stdout),
        text(&out.stderr),
    )
}

/// Its exit code and all it printed.
fn cli(args: &[&str]) -> (i32, String) {
    let (code, stdout, stderr) = run(args);
    (code, format!("{stdout}{stderr}"))
}

/// With `--json`: its exit code and its standard output, which must be JSON.
fn cli_json(args: &[&str]) -> (i32, Value) {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, out, err) = run(&all);
    let v = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}{err}"));
    (code, v)
}

fn sql(db: &Path, statement: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    c.execute_batch(statement).unwrap();
}

#[test]
fn an_operator_finds_requeues_and_drops_dead_letters_and_asks_for_a_replay() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("cli-{}", std::process::id());
    let start = |name: &'static str, exe: &str| {
        Service::start_with(name, exe, dir.path(), &broker.url(), |cmd| {
            cmd.args(["--topic-prefix", &prefix]);
        })
    };
    let users = start("user-service", env!("CARGO_BIN_EXE_user-service"));
    let ledger = start(
        "transaction-service",
        env!("CARGO_BIN_EXE_transaction-service"),
    );
    let users_db = dir.path().join("user-service.db");
    let users_db = users_db.to_str().unwrap();
    let ledger_db = dir.path().join("transaction-service.db");
    let ledger_db = ledger_db.to_str().unwrap();

    let (status, user) = users.post(
        "/users",
        json!({ "name": "Ada", "email": "ada@example.com" }),
        None,
    );
    assert_eq!(status, 201, "{user}");
    let id = user["id"].as_str().unwrap().to_owned();
    wait_until("drained", 30, || drained(&users) && drained(&ledger));
    let (code, out) = cli(&["status", "--db", users_db, "--url", &users.base]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("dead letters: 0") && out.contains("broker connected"),
        "{out}"
    );

    // user-service loses the user (an operator's mistake, say); a credit for it then
    // cannot be applied: dead-lettered, and the stream goes on.
    sql(
        Path::new(users_db),
        &format!("UPDATE users SET uid = 'gone' WHERE uid = '{id}'"),
    );
    let body = json!({ "user_id": id, "amount_cents": 500, "kind": "credit" });
    assert_eq!(ledger.post("/transactions", body, None).0, 201);
    wait_until("a dead letter in user-service", 30, || {
        users.get("/outbox").1["consumer"]["dead_letters"] == 1
    });
    // And a message that is not an event at all.
    broker.publish_raw(
        &format!("{prefix}/events/transaction-service/transactions"),
        b"not json \x1b]0;title\x07\x1b[2J",
    );
    wait_until("a second dead letter", 30, || {
        users.get("/outbox").1["consumer"]["dead_letters"] == 2
    });

    let (code, st) = cli_json(&["status", "--db", users_db, "--url", &users.base]);
    assert_eq!(code, 1, "dead letters need attention: {st}");
    assert_eq!(st["consumer"]["dead_letters"], 2);
    assert_eq!(
        st["consumer"]["streams"]["transaction-service/transactions"]["position"], 2,
        "{st}"
    );
    let (code, list) = cli_json(&["dead-letters", "list", "--db", users_db]);
    assert_eq!(code, 0);
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{list}");
    let failed = letters.iter().find(|d| !d["seq"].is_null()).unwrap();
    let garbage = letters.iter().find(|d| d["seq"].is_null()).unwrap();
    assert!(
        failed["reason"].as_str().unwrap().contains("unknown user"),
        "{failed}"
    );
    let (failed, garbage) = (failed["id"].to_string(), garbage["id"].to_string());
    let (code, shown) = cli_json(&["dead-letters", "show", &failed, "--db", users_db]);
    assert_eq!(code, 0);
    assert!(
        shown["payload"]
            .as_str()
            .unwrap()
            .contains("transaction.created"),
        "{shown}"
    );
    assert_eq!(cli(&["dead-letters", "show", "999", "--db", users_db]).0, 1);
    // A message's bytes do not reach the operator's terminal raw.
    let (code, out) = cli(&["dead-letters", "show", &garbage, "--db", users_db]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains('\x1b') && out.contains("\\u{1b}[2J"), "{out}");

    // Requeued while the user is still missing: not applied, it stays.
    let (code, out) = cli(&["dead-letters", "requeue", &failed, "--url", &users.base]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not_requeued") && out.contains("unknown user"),
        "{out}"
    );
    let (code, out) = cli(&["dead-letters", "requeue", &garbage, "--url", &users.base]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refused again"), "{out}");
    assert_eq!(users.get("/outbox").1["consumer"]["dead_letters"], 2);

    // The user is back: the credit is applied once, and only once.
    sql(
        Path::new(users_db),
        &format!("UPDATE users SET uid = '{id}' WHERE uid = 'gone'"),
    );
    let (code, out) = cli(&["dead-letters", "requeue", &failed, "--url", &users.base]);
    assert_eq!((code, out.as_str()), (0, "applied\n"));
    let (_, u) = users.get(&format!("/users/{id}"));
    assert_eq!(u["balance_cents"], 1_500, "welcome credit + 500: {u}");
    let (code, out) = cli(&["dead-letters", "requeue", &failed, "--url", &users.base]);
    assert_eq!(code, 1, "gone from the dead letters: {out}");
    assert!(out.contains("not_found"), "{out}");

    // The garbage is dropped, with a note kept beside its copy.
    let (code, out) = cli(&[
        "dead-letters",
        "drop",
        &garbage,
        "--url",
        &users.base,
        "--note",
        "junk from a test & co",
    ]);
    assert_eq!((code, out.as_str()), (0, "dropped\n"));
    let c = rusqlite::Connection::open(users_db).unwrap();
    let audit: Vec<(String, String, Option<String>)> = c
        .prepare("SELECT action, result, note FROM dead_letter_actions ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        audit,
        [
            ("requeued".into(), "applied".into(), None),
            (
                "dropped".into(),
                "dropped".into(),
                Some("junk from a test & co".into())
            ),
        ]
    );
    let (code, out) = cli(&["status", "--db", users_db, "--url", &users.base]);
    assert_eq!(code, 0, "{out}");

    // A replay asked for by hand: the events come again as duplicates, without effect.
    let before = users.get("/outbox").1["consumer"]["duplicates_since_start"]
        .as_u64()
        .unwrap();
    let (code, out) = cli(&[
        "replay",
        "--url",
        &users.base,
        "--producer",
        "transaction-service",
        "--stream",
        "transactions",
        "--from",
        "1",
    ]);
    assert_eq!((code, out.as_str()), (0, "requested\n"));
    wait_until("the replayed events counted as duplicates", 30, || {
        users.get("/outbox").1["consumer"]["duplicates_since_start"]
            .as_u64()
            .unwrap()
            >= before + 2
    });
    let (code, out) = cli(&[
        "replay",
        "--url",
        &users.base,
        "--producer",
        "nobody",
        "--stream",
        "transactions",
        "--from",
        "1",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("does not consume"), "{out}");
    let (_, u) = users.get(&format!("/users/{id}"));
    assert_eq!(u["balance_cents"], 1_500, "{u}");

    // The outbox, filtered.
    let (code, rows) = cli_json(&[
        "outbox",
        "list",
        "--db",
        ledger_db,
        "--stream",
        "transactions",
        "--status",
        "published",
    ]);
    assert_eq!(code, 0);
    let rows = rows["rows"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        2,
        "the welcome credit and the credit of 500: {rows:?}"
    );
    assert!(rows
        .iter()
        .all(|r| r["status"] == "published" && r["stream"] == "transactions"));
    let (code, rows) = cli_json(&["outbox", "list", "--db", ledger_db, "--stream", "nothing"]);
    assert_eq!((code, rows["rows"].as_array().unwrap().len()), (0, 0));

    // What cannot run says so and exits 2.
    let (code, out) = cli(&["status", "--db", "/nonexistent/x.db"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("does not exist"), "{out}");
    let (code, v) = cli_json(&["status", "--db", "/nonexistent/x.db"]);
    assert_eq!(code, 2);
    assert!(
        v["error"].as_str().unwrap().contains("does not exist"),
        "{v}"
    );
    let (code, out) = cli(&[
        "dead-letters",
        "requeue",
        "1",
        "--url",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(code, 2, "{out}");
}
