//! Does the broker deliver what the relay publishes? Pure state, no I/O.
//!
//! A PUBACK does not say so: Mosquitto 2.0 with MQTT 3.1.1 answers a publish that its
//! ACL denies with a normal PUBACK and drops the message (../shared/FIELD-NOTES.md).
//! So the relay subscribes to a probe topic among its own event topics
//! ([`crate::protocol::Topics::probe`]) and, while connected, publishes a numbered probe
//! there every `--relay-heads-interval-ms`. A probe that has not come back within the
//! timeout means the broker refuses this service's publishes (or its subscription):
//! the relay reports it (an error log, [`super::RelayStatus::publish_refused`]) until
//! a probe comes back. Rows are not lost meanwhile: they are marked published, and
//! consumers' gap detection asks for them again once the ACL is fixed.

use std::time::{Duration, Instant};

/// The probe's bookkeeping.
#[derive(Debug)]
pub struct Probe {
    /// Distinguishes this relay's probes from an earlier run's (or anyone else's).
    run_id: String,
    /// Number of the next probe.
    next: u64,
    /// The oldest probe sent and not yet echoed, and when it was sent.
    outstanding: Option<(u64, Instant)>,
    timeout: Duration,
    /// Set while the broker is known not to deliver the relay's publishes.
    refused: bool,
}

/// What a tick asks of the relay.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// A probe to publish (QoS1, not retained) on the probe topic.
    pub send: Option<Vec<u8>>,
    /// The outstanding probe just timed out: report the refusal.
    pub newly_refused: bool,
}

impl Probe {
    /// A probe that declares a refusal after `timeout` without an echo.
    pub fn new(timeout: Duration) -> Probe {
        Probe {
            run_id: uuid::Uuid::now_v7().simple().to_string(),
            next: 1,
            outstanding: None,
            timeout,
            refused: false,
        }
    }

    /// Call periodically while connected. Sends a probe when none is outstanding, and
    /// another one after a timeout (so that a fixed ACL is noticed on the next echo).
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut tick = Tick::default();
        if let Some((_, sent_at)) = self.outstanding {
            if now.duration_since(sent_at) < self.timeout {
                return tick;
            }
            tick.newly_refused = !self.refused;
            self.refused = true;
            self.outstanding = None;
        }
        let n = self.next;
        self.next += 1;
        self.outstanding = Some((n, now));
        tick.send = Some(self.payload(n));
        tick
    }

    /// A message arrived on the probe topic. Returns true when it is one of this
    /// relay's probes and it ends a refusal. Anything else (an earlier run's probe,
    /// a stranger's bytes) is ignored.
    pub fn on_echo(&mut self, payload: &[u8]) -> bool {
        let Some(n) = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.strip_prefix(self.run_id.as_str()))
            .and_then(|s| s.strip_prefix('-'))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return false;
        };
        if n >= self.next {
            return false; // never sent: not an echo
        }
        if self.outstanding.is_some_and(|(o, _)| o <= n) {
            self.outstanding = None;
        }
        std::mem::replace(&mut self.refused, false)
    }

    /// The connection is gone: an outstanding probe may have been lost with it.
    pub fn connection_lost(&mut self) {
        self.outstanding = None;
    }

    /// True while the broker is known not to deliver this relay's publishes.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// How long a probe may take to come back.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn payload(&self, n: u64) -> Vec<u8> {
        format!("{}-{n}", self.run_id).into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn an_echoed_probe_keeps_the_relay_healthy() {
        let mut p = Probe::new(T);
        let t0 = Instant::now();
        let sent = p.tick(t0).send.unwrap();
        assert_eq!(p.tick(t0 + T / 2), Tick::default(), "one probe at a time");
        assert!(!p.on_echo(&sent));
        assert!(!p.refused());
        assert!(p.tick(t0 + T).send.is_some(), "the next probe goes out");
    }

    #[test]
    fn a_probe_that_never_comes_back_reports_a_refusal_once_until_an_echo_ends_it() {
        let mut p = Probe::new(T);
        let t0 = Instant::now();
        p.tick(t0).send.unwrap();
        let late = p.tick(t0 + T);
        assert!(late.newly_refused);
        assert!(p.refused());
        let again = p.tick(t0 + 2 * T);
        assert!(!again.newly_refused, "reported once");
        assert!(p.on_echo(&again.send.unwrap()), "an echo ends the refusal");
        assert!(!p.refused());
    }

    #[test]
    fn foreign_and_unsent_probes_are_ignored() {
        let mut p = Probe::new(T);
        let t0 = Instant::now();
        p.tick(t0);
        p.tick(t0 + T);
        assert!(p.refused());
        let other = Probe::new(T).payload(1);
        assert!(!p.on_echo(&other));
        assert!(!p.on_echo(&p.payload(99)), "a number never sent");
        assert!(!p.on_echo(b"garbage"));
        assert!(p.refused());
    }
}
