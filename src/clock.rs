//! Wall-clock time in the units the database stores.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. A clock set before 1970 reads as 0 rather than
/// failing: timestamps here are for retention and display, never for ordering.
pub fn now_ms() -> i64 {
    ms_since_epoch(SystemTime::now())
}

/// `t` in milliseconds since the Unix epoch, as [`now_ms`] reads the clock.
pub fn ms_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
