//! The HTTP server's limits against clients that misbehave on purpose, over raw TCP to a
//! real user-service. Regression tests for issue 16, findings 1-3: each held before.
#![allow(clippy::result_large_err)]

// The library's test support (real brokers, databases), shared rather than copied.
mod services;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use services::Service;
use support::Broker;

/// user-service with 500 ms header and body timeouts unless `extra` sets them.
fn user_service(dir: &std::path::Path, broker: &Broker, extra: &[&str]) -> Service {
    let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for flag in ["--http-header-timeout-ms", "--http-body-timeout-ms"] {
        if !extra.iter().any(|a| a == flag) {
            extra.extend([flag.to_owned(), "500".to_owned()]);
        }
    }
    Service::start_with(
        "user-service",
        env!("CARGO_BIN_EXE_user-service"),
        dir,
        &broker.url(),
        |cmd| {
            cmd.args(["--topic-prefix", &format!("http-{}", std::process::id())])
                .args(&extra);
        },
    )
}

fn connect(s: &Service) -> TcpStream {
    let addr = s.base.trim_start_matches("http://");
    let c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Reads until the server closes; returns what it sent and how long that took.
fn read_to_close(c: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

const POST_HEAD: &str = "POST /users HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";

#[test]
fn silent_slow_and_idle_connections_are_closed_after_their_timeouts() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let users = user_service(dir.path(), &broker, &[]);

    // Sends nothing.
    let (_, took) = read_to_close(&mut connect(&users));
    assert!(
        took < Duration::from_secs(3),
        "a silent connection was held {took:?}"
    );

    // Headers a line at a time, slower than the timeout allows in total.
    let mut slow = connect(&users);
    let started = Instant::now();
    for line in [
        "POST /users HTTP/1.1\r\n",
        "Host: x\r\n",
        "X-A: 1\r\n",
        "X-B: 2\r\n",
        "X-C: 3\r\n",
    ] {
        if slow.write_all(line.as_bytes()).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, _) = read_to_close(&mut slow);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "slow headers were held {:?}",
        started.elapsed()
    );

    // A body that never completes: 408 in the documented JSON shape.
    let mut body = connect(&users);
    body.write_all(format!("{POST_HEAD}Content-Length: 100\r\n\r\n{{\"name\":").as_bytes())
        .unwrap();
    let (answer, took) = read_to_close(&mut body);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // An idle keep-alive connection after one answered request.
    let mut idle = connect(&users);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, took) = read_to_close(&mut idle);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        took < Duration::from_secs(3),
        "an idle keep-alive connection was held {took:?}"
    );
}

#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let users = user_service(dir.path(), &broker, &[]);
    let body = r#"{"name":"Half","email":"half@example.com"}"#;
    let mut c = connect(&users);
    c.write_all(
        format!(
            "{POST_HEAD}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (answer, _) = read_to_close(&mut c);
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "the committed write's answer: {answer:?}"
    );
}

#[test]
fn sigterm_stops_the_service_within_its_timeout_whatever_a_client_holds_open() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let mut users = user_service(
        dir.path(),
        &broker,
        &[
            "--shutdown-timeout-ms",
            "1000",
            "--http-header-timeout-ms",
            "60000",
            "--http-body-timeout-ms",
            "60000",
        ],
    );
    // A half-sent request, and one whose body never comes.
    let mut half = connect(&users);
    half.write_all(b"POST /users HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut no_body = connect(&users);
    no_body
        .write_all(format!("{POST_HEAD}Content-Length: 50\r\n\r\n").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (status, took) = users.terminate();
    assert!(status.success(), "{status}: {}", users.log());
    assert!(
        took < Duration::from_secs(4),
        "SIGTERM took {took:?} with --shutdown-timeout-ms 1000"
    );
}

#[test]
fn connections_beyond_the_cap_wait_until_one_is_free() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let users = user_service(
        dir.path(),
        &broker,
        &[
            "--http-connections-max",
            "2",
            "--http-header-timeout-ms",
            "60000",
        ],
    );
    // Two connections hold both slots (a silent client waits for the header timeout).
    let held: Vec<TcpStream> = (0..2).map(|_| connect(&users)).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut third = connect(&users);
    third
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        third.read(&mut buf).is_err(),
        "a third connection was served beyond the cap of 2"
    );
    drop(held);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (answer, _) = read_to_close(&mut third);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "served once a slot was free: {answer:?}"
    );
}

#[test]
fn a_client_that_never_reads_its_answers_loses_its_connection_and_its_slot() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let users = user_service(dir.path(), &broker, &["--http-connections-max", "1"]);
    for i in 0..400 {
        let (status, _) = users.post(
            "/users",
            serde_json::json!({"name": format!("U{i}"), "email": format!("u{i}@example.com")}),
            None,
        );
        assert_eq!(status, 201);
    }
    // Pipelined requests for large pages (about 150 KB each), never read: the answers
    // fill both sockets' buffers and the server's write stalls.
    let mut greedy = connect(&users);
    let request = b"GET /outbox/events?limit=500 HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..200 {
        if greedy.write_all(request).is_err() {
            break;
        }
    }
    // The only slot is the greedy client's until its stalled write times out (500 ms).
    let started = Instant::now();
    let mut next = connect(&users);
    next.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (answer, _) = read_to_close(&mut next);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the slot was held {:?} by a client that does not read",
        started.elapsed()
    );
    drop(greedy);
}
