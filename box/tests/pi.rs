//! The Raspberry Pi build, proven: the aarch64 binaries that `make pi` cross-builds
//! run under user-mode emulation (qemu-aarch64) against a local Mosquitto; a user
//! created on them gets its welcome credit exactly once, and the aarch64 `verify`
//! passes. `make test` builds them first and passes their folder as PI_BIN; without
//! it (plain `cargo test`) this test says SKIPPED.

#![allow(clippy::result_large_err)]

mod services;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::Command;

use serde_json::json;
use services::{drained, wait_until, Service};
use support::Broker;

const QEMU: &str = "qemu-aarch64";

/// True when `path` is an ELF file for aarch64 (e_machine 183).
fn is_aarch64_elf(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    bytes.len() > 20
        && &bytes[..4] == b"\x7fELF"
        && u16::from_le_bytes([bytes[18], bytes[19]]) == 183
}

#[test]
fn the_aarch64_services_under_qemu_give_a_new_user_its_welcome_credit() {
    let Some(bin) = std::env::var_os("PI_BIN") else {
        return support::skip(
            "pi",
            "the aarch64 binaries (PI_BIN=folder of `make pi`'s output; `make test` builds them)",
        );
    };
    let bin = Path::new(&bin);
    for b in ["user-service", "transaction-service", "edge-outbox"] {
        assert!(
            is_aarch64_elf(&bin.join(b)),
            "{} is not an aarch64 executable",
            bin.join(b).display()
        );
    }
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &'static str| {
        let exe = bin.join(name);
        Service::start_under(
            Some(QEMU),
            name,
            exe.to_str().unwrap(),
            dir.path(),
            &broker.url(),
            |cmd| {
                cmd.args(["--topic-prefix", &format!("pi-{}", std::process::id())]);
            },
        )
    };
    let users = start("user-service");
    let ledger = start("transaction-service");
    let (status, user) = users.post(
        "/users",
        json!({ "name": "Pi", "email": "pi@example.com" }),
        Some("pi-1"),
    );
    assert_eq!(status, 201, "{user}");
    let id = user["id"].as_str().unwrap().to_owned();
    // Drained alone can hold before transaction-service has heard of user-service's
    // stream at all (no position, no lag): wait for the credit first.
    wait_until("the welcome credit in transaction-service", 60, || {
        ledger.get(&format!("/users/{id}/balance")).1["balance_cents"] == 1000
    });
    wait_until("both aarch64 services drained", 60, || {
        drained(&users) && drained(&ledger)
    });
    let (_, balance) = ledger.get(&format!("/users/{id}/balance"));
    assert_eq!(balance["balance_cents"], 1000, "{balance}");
    let (_, u) = users.get(&format!("/users/{id}"));
    assert_eq!(u["balance_cents"], 1000, "{u}");
    drop((users, ledger));

    let out = Command::new(QEMU)
        .arg(bin.join("edge-outbox"))
        .args(["verify", "--user-db"])
        .arg(dir.path().join("user-service.db"))
        .arg("--transaction-db")
        .arg(dir.path().join("transaction-service.db"))
        .env_remove("WELCOME_CREDIT_CENTS")
        .output()
        .expect("running the aarch64 edge-outbox under qemu");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "aarch64 verify failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("aarch64 verify under qemu:\n{text}");
}
