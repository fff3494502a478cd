//! What deploying under systemd relies on: the units in deploy/systemd pass
//! `systemd-analyze verify`, and a service tells systemd it is ready (Type=notify) only
//! once its database is open and its HTTP port listens.

#![allow(clippy::result_large_err)]

#[path = "../../tests/support/mod.rs"]
mod support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{free_port, Broker};

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return support::skip("deploy", "systemd-analyze (package systemd)");
    }
    let dir = tempfile::tempdir().unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let mut files = Vec::new();
    for (unit, exe) in [
        (
            "edge-outbox-user-service.service",
            env!("CARGO_BIN_EXE_user-service"),
        ),
        (
            "edge-outbox-transaction-service.service",
            env!("CARGO_BIN_EXE_transaction-service"),
        ),
    ] {
        // The unit names the installed binary; verify checks that it exists.
        let text = std::fs::read_to_string(units.join(unit)).unwrap();
        let name = Path::new(exe).file_name().unwrap().to_str().unwrap();
        assert!(
            text.contains(&format!("ExecStart=/usr/local/bin/{name}\n")),
            "{unit}"
        );
        let local = text.replace(&format!("/usr/local/bin/{name}"), exe);
        let path = dir.path().join(unit);
        std::fs::write(&path, local).unwrap();
        files.push(path);
    }
    // Each service has a state folder of its own: two dynamic users sharing one would
    // take it from each other at every start.
    let state_dirs: Vec<String> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            let dir = text
                .lines()
                .find_map(|l| l.strip_prefix("StateDirectory="))
                .expect("a StateDirectory")
                .to_owned();
            let db = text
                .lines()
                .find_map(|l| l.strip_prefix("Environment=DB_PATH="))
                .expect("a DB_PATH");
            assert!(db.starts_with(&format!("/var/lib/{dir}/")), "{db} in {dir}");
            dir
        })
        .collect();
    assert_ne!(state_dirs[0], state_dirs[1]);
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );
}

#[test]
fn a_service_tells_systemd_it_is_ready_once_its_port_listens() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(["--db", dir.path().join("u.db").to_str().unwrap()])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--broker",
            &broker.url(),
        ])
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("MQTT_USERNAME")
        .env_remove("MQTT_PASSWORD")
        .env_remove("MQTT_PASSWORD_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let received = socket.recv(&mut buf);
    // Ready means the port listens now, not soon.
    let listening = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    let n = received.expect("READY=1 within 20 s");
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim(), "READY=1");
    assert!(
        listening,
        "the port was not listening when the service said it was ready"
    );
}

#[test]
fn make_install_puts_binaries_units_and_docs_under_destdir_and_prefix() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dest = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_user-service"))
        .parent()
        .unwrap();
    let out = Command::new("make")
        .current_dir(&repo)
        .args(["-s", "install-files"])
        .arg(format!("BIN={}", bin.display()))
        .arg(format!("DESTDIR={}", dest.path().display()))
        .arg("PREFIX=/opt/eo")
        .output()
        .expect("make");
    assert!(out.status.success(), "{out:?}");
    let mut files = Vec::new();
    let mut stack = vec![dest.path().to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p.strip_prefix(dest.path()).unwrap().display().to_string());
            }
        }
    }
    files.sort();
    let mut want: Vec<String> = [
        "etc/systemd/system/edge-outbox-transaction-service.service",
        "etc/systemd/system/edge-outbox-user-service.service",
        "opt/eo/bin/edge-outbox",
        "opt/eo/bin/transaction-service",
        "opt/eo/bin/user-service",
        "opt/eo/share/doc/edge-outbox/README.md",
        "opt/eo/share/doc/edge-outbox/edge-outbox.env.example",
        "opt/eo/share/doc/edge-outbox/mosquitto.conf",
        "opt/eo/share/doc/edge-outbox/prometheus/alerts.yml",
        "opt/eo/share/doc/edge-outbox/prometheus/prometheus.yml.example",
    ]
    .map(str::to_owned)
    .to_vec();
    for d in std::fs::read_dir(repo.join("docs")).unwrap() {
        let name = d.unwrap().file_name().into_string().unwrap();
        want.push(format!("opt/eo/share/doc/edge-outbox/docs/{name}"));
    }
    want.sort();
    assert_eq!(files, want);
    let unit = std::fs::read_to_string(
        dest.path()
            .join("etc/systemd/system/edge-outbox-user-service.service"),
    )
    .unwrap();
    assert!(
        unit.contains("ExecStart=/opt/eo/bin/user-service\n"),
        "{unit}"
    );
    assert!(
        !unit.contains("/usr/local/"),
        "every path follows PREFIX: {unit}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dest.path().join("opt/eo/bin/user-service"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
}

#[test]
fn broker_access_creates_the_accounts_and_prints_the_broker_config_lines() {
    support::Broker::reserve(""); // fails loudly when mosquitto (mosquitto_passwd) is missing
    let dir = tempfile::tempdir().unwrap();
    // Folders that do not exist yet, as /etc/edge-outbox on a fresh box.
    let mqtt = dir.path().join("etc/edge-outbox/mqtt");
    let out = Command::new(env!("CARGO_BIN_EXE_edge-outbox"))
        .args(["broker-access", "--dir", mqtt.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    use std::os::unix::fs::PermissionsExt;
    for parent in [dir.path().join("etc"), dir.path().join("etc/edge-outbox")] {
        let mode = std::fs::metadata(&parent).unwrap().permissions().mode();
        assert_ne!(
            mode & 0o001,
            0,
            "{} must let the broker's user through",
            parent.display()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "allow_anonymous false".to_owned(),
        format!("password_file {}", mqtt.join("passwd").display()),
        format!("acl_file {}", mqtt.join("acl").display()),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in {text}");
    }
    for account in ["user-service", "transaction-service", "edge-observer"] {
        let secret = std::fs::read_to_string(mqtt.join(format!("{account}.password"))).unwrap();
        assert!(!text.contains(secret.trim()), "a password was printed");
        let passwd = std::fs::read_to_string(mqtt.join("passwd")).unwrap();
        assert!(
            passwd.contains(&format!("{account}:")),
            "{account} in passwd"
        );
        assert!(!passwd.contains(secret.trim()), "passwd holds hashes only");
    }
}
