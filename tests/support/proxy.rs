//! A TCP proxy in front of a real broker, for faults a broker does not make on its
//! own: a slow CONNACK, connections dropped right after CONNACK, every connection cut
//! at a chosen moment, a partition (bytes held both ways, nothing closed, as when a
//! host is cut off: only the keep-alive notices). It counts the connections it
//! accepted.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to each new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    Pass,
    /// Holds the broker's first bytes (its CONNACK) this long.
    SlowConnack(Duration),
    /// Forwards the broker's first bytes (its CONNACK), then closes the connection.
    CloseAfterConnack,
}

pub struct Proxy {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    mode: Arc<Mutex<Mode>>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    partitioned: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16, mode: Mode) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let p = Proxy {
            port,
            accepted: Arc::default(),
            mode: Arc::new(Mutex::new(mode)),
            open: Arc::default(),
            stop: Arc::default(),
            partitioned: Arc::default(),
            down: Arc::default(),
        };
        let (accepted, mode, open, stop, hole, down) = (
            p.accepted.clone(),
            p.mode.clone(),
            p.open.clone(),
            p.stop.clone(),
            p.partitioned.clone(),
            p.down.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                accepted.fetch_add(1, Ordering::Relaxed);
                if down.load(Ordering::Relaxed) {
                    continue; // as a broker that is down: the connection closes at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue; // broker down: the client sees the connection close
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let m = *mode.lock().unwrap();
                open.lock().unwrap().push(client.try_clone().unwrap());
                open.lock().unwrap().push(server.try_clone().unwrap());
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let hole2 = hole.clone();
                std::thread::spawn(move || pipe(client, server, Mode::Pass, hole2));
                let hole2 = hole.clone();
                std::thread::spawn(move || pipe(s2, c2, m, hole2));
            }
        });
        p
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Starts (`true`) or ends (`false`) a partition: bytes are held both ways and
    /// nothing is closed. Connections made meanwhile get no CONNACK. Held bytes of a
    /// connection its client gave up on are dropped with it after the partition ends.
    pub fn partition(&self, on: bool) {
        self.partitioned.store(on, Ordering::Relaxed);
    }

    /// Takes the broker away (`true`: every connection closed, new ones closed at once)
    /// or brings it back, with its sessions.
    pub fn set_down(&self, on: bool) {
        self.down.store(on, Ordering::Relaxed);
        if on {
            self.cut();
        }
    }

    /// Closes every connection open now, both ways (as a broker that dies would).
    pub fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

/// Copies `from` to `to` until either side closes, applying `mode` to the first bytes.
fn pipe(mut from: TcpStream, mut to: TcpStream, mode: Mode, partitioned: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = true;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while partitioned.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if first {
            first = false;
            if let Mode::SlowConnack(d) = mode {
                std::thread::sleep(d);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if mode == Mode::CloseAfterConnack {
            break;
        }
    }
    while partitioned.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10)); // a close does not cross it either
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}
