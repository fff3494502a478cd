//! Capped exponential backoff with jitter, and a log limiter, for every loop that can
//! fail repeatedly (reconnecting to the broker, retrying a busy database).

use std::time::{Duration, Instant};

/// Waits that double from `min` up to `max`, each drawn at random from its upper half
/// so that many clients restarted together do not retry in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// `min` must not exceed `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        debug_assert!(min <= max);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Back to the shortest wait, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Lets a repeated warning through at most once per `every`, counting what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// Lets one occurrence through per `every`.
    pub fn new(every: Duration) -> LogLimiter {
        LogLimiter {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many were held
    /// back since the last one logged; `None` to stay quiet.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Forget the history (after a recovery), so the next failure is logged at once.
    pub fn reset(&mut self) {
        self.last = None;
        self.suppressed = 0;
    }
}

/// A connection must last this long to count as established: only then is the
/// reconnect backoff reset. A broker that accepts and at once drops a client (another
/// client with the same id, a refusal after CONNACK) must not get reconnects at full
/// speed.
pub const CONNECTION_STABLE: Duration = Duration::from_secs(5);

/// Connections in a row that ended within [`CONNECTION_STABLE`] before
/// [`Connections::lost`] says so.
pub const SHORT_CONNECTIONS_REPORTED: u32 = 3;

/// The life of a client's connections: when to reset the backoff, and when to say
/// that the broker keeps dropping them.
#[derive(Debug, Default)]
pub struct Connections {
    since: Option<Instant>,
    short_in_a_row: u32,
}

impl Connections {
    /// A CONNACK arrived.
    pub fn connected(&mut self) {
        self.since = Some(Instant::now());
    }

    /// The connection (or the attempt) failed. Resets `backoff` when the connection
    /// had lasted; returns the number of short-lived connections in a row once it
    /// reaches [`SHORT_CONNECTIONS_REPORTED`] (and at every such one after).
    pub fn lost(&mut self, backoff: &mut Backoff) -> Option<u32> {
        let Some(since) = self.since.take() else {
            return None; // an attempt that never connected: the backoff handles it
        };
        if since.elapsed() >= CONNECTION_STABLE {
            self.short_in_a_row = 0;
            backoff.reset();
            return None;
        }
        self.short_in_a_row += 1;
        (self.short_in_a_row >= SHORT_CONNECTIONS_REPORTED).then_some(self.short_in_a_row)
    }
}

/// What to tell an operator when the broker keeps dropping the connection of
/// `client_id` right after accepting it.
pub fn short_connections_hint(client_id: &str, n: u32) -> String {
    format!(
        "the broker closed {n} connections in a row within {} s of accepting them: another client \
         is probably connected with the same client id {client_id:?} (each connection takes over \
         the other's session; give each service its own --client-id), or the broker refuses this \
         client after connecting",
        CONNECTION_STABLE.as_secs()
    )
}

/// Characters of a message's detail that a warning about input shows at most.
pub const LOG_DETAIL_MAX_CHARS: usize = 200;

/// `s` cut to `max` characters (with "..." when cut) and escaped, for a log line about
/// input that anyone may have sent.
pub fn truncated(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().count() > max {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_stays_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let ceilings = [100, 200, 400, 800, 800, 800];
        for c in ceilings {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(c / 2) && d <= Duration::from_millis(c),
                "{d:?} not in [{}, {c}] ms",
                c / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn truncated_cuts_long_input_and_escapes_control_characters() {
        assert_eq!(truncated("abc", 5), "abc");
        assert_eq!(truncated("abcdef", 3), "abc...");
        assert_eq!(truncated("a\nb", 5), "a\\nb");
    }

    #[test]
    fn only_a_lasting_connection_resets_the_backoff_and_short_ones_are_counted() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut c = Connections::default();
        assert_eq!(c.lost(&mut b), None, "a failed attempt is not a connection");
        for n in 1..=4 {
            b.next_delay();
            c.connected();
            let reported = c.lost(&mut b);
            assert_eq!(reported, (n >= SHORT_CONNECTIONS_REPORTED).then_some(n));
        }
        assert!(
            b.next_delay() > Duration::from_millis(100),
            "short connections keep the backoff growing"
        );
    }

    #[test]
    fn log_limiter_counts_what_it_suppresses() {
        let mut l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.reset();
        assert_eq!(l.allow(), Some(0));
    }
}
