//! Which streams a head announcement lists. Every `--relay-heads-interval-ms` the
//! relay announces the streams whose head changed since it last announced them, and
//! in turn a share of the others, so that every stream is announced at least once
//! every [`SWEEP_TICKS`] intervals: a producer with 10,000 quiet streams does not send
//! all of them every interval, and a consumer that missed an announcement (or joined
//! late: the broker retains only the last page) learns every head within a few
//! intervals. What is listed goes out in pages of at most
//! [`protocol::CONTROL_PAGE_MAX_BYTES`] (see [`HeadAnnouncement::pages`]).

use std::collections::HashMap;
use std::ops::Bound;

use crate::protocol::{HeadAnnouncement, StreamHead};

/// Every stream is announced at least once every this many intervals.
pub(crate) const SWEEP_TICKS: usize = 6;
/// Unchanged streams announced per interval at least (all of them, below this).
const SWEEP_MIN: usize = 256;

/// What was announced, per stream, and where the sweep of unchanged streams goes on.
#[derive(Debug, Default)]
pub(crate) struct Announcer {
    /// The epoch and previous epoch of what `sent` holds.
    epochs: Option<(Option<String>, Option<String>)>,
    /// The head last handed to the client, per stream.
    sent: HashMap<String, StreamHead>,
    /// The sweep goes on after this stream.
    cursor: Option<String>,
    /// Where the sweep goes on once everything [`Announcer::select`] listed was sent.
    next_cursor: Option<String>,
}

impl Announcer {
    /// The next announcement lists every stream: a new connection (the broker may have
    /// lost what it retained, and consumers what was sent meanwhile).
    pub(crate) fn reset(&mut self) {
        self.sent.clear();
    }

    /// The streams of `full` (every stream's head) to announce now.
    pub(crate) fn select(&mut self, mut full: HeadAnnouncement) -> HeadAnnouncement {
        let epochs = Some((full.epoch.clone(), full.previous.clone()));
        if self.epochs != epochs {
            self.epochs = epochs;
            self.sent.clear();
        }
        if self.sent.is_empty() {
            return full;
        }
        self.sent
            .retain(|stream, _| full.streams.contains_key(stream));
        let share = full.streams.len().div_ceil(SWEEP_TICKS).max(SWEEP_MIN);
        let keys = |range: (Bound<&str>, Bound<&str>)| {
            full.streams
                .range::<str, _>(range)
                .map(|(stream, _)| stream.clone())
        };
        let mut sweep: Vec<String> = match self.cursor.as_deref() {
            Some(c) => keys((Bound::Excluded(c), Bound::Unbounded))
                .chain(keys((Bound::Unbounded, Bound::Included(c))))
                .take(share)
                .collect(),
            None => keys((Bound::Unbounded, Bound::Unbounded))
                .take(share)
                .collect(),
        };
        self.next_cursor = sweep.last().cloned();
        sweep.sort_unstable(); // it may wrap around
        full.streams.retain(|stream, head| {
            self.sent.get(stream) != Some(head) || sweep.binary_search(stream).is_ok()
        });
        full
    }

    /// `page` was handed to the client.
    pub(crate) fn sent(&mut self, page: &HeadAnnouncement) {
        for (stream, head) in &page.streams {
            self.sent.insert(stream.clone(), *head);
        }
    }

    /// Every page of what [`Announcer::select`] listed was handed to the client: the
    /// sweep goes on from there (otherwise it lists the same streams again).
    pub(crate) fn all_sent(&mut self) {
        if let Some(c) = self.next_cursor.take() {
            self.cursor = Some(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn full(n: usize, head: impl Fn(usize) -> u64) -> HeadAnnouncement {
        HeadAnnouncement {
            source: "p".into(),
            epoch: Some("e1".into()),
            previous: None,
            streams: (0..n)
                .map(|i| {
                    let h = head(i);
                    let sh = StreamHead {
                        head: h,
                        first: 1,
                        last: h,
                        base: 0,
                    };
                    (format!("s{i:05}"), sh)
                })
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn announce(a: &mut Announcer, f: HeadAnnouncement) -> BTreeSet<String> {
        let listed = a.select(f);
        a.sent(&listed);
        a.all_sent();
        listed.streams.into_keys().collect()
    }

    #[test]
    fn changed_streams_every_interval_and_every_stream_within_the_sweep() {
        let mut a = Announcer::default();
        let n = 10_000;
        assert_eq!(
            announce(&mut a, full(n, |_| 5)).len(),
            n,
            "the first lists all"
        );

        // Quiet streams: one share per interval, every stream within SWEEP_TICKS.
        let mut seen = BTreeSet::new();
        for _ in 0..SWEEP_TICKS {
            let listed = announce(&mut a, full(n, |_| 5));
            assert!(listed.len() <= n.div_ceil(SWEEP_TICKS), "{}", listed.len());
            seen.extend(listed);
        }
        assert_eq!(seen.len(), n, "every stream announced within the sweep");

        // A stream that moved is listed at once, beside the share.
        let listed = announce(&mut a, full(n, |i| if i == 4242 { 6 } else { 5 }));
        assert!(listed.contains("s04242"));
        assert!(listed.len() <= n.div_ceil(SWEEP_TICKS) + 1);

        // A page that was never handed over is listed again.
        let not_sent = a.select(full(n, |i| if i == 4242 { 7 } else { 5 }));
        assert!(not_sent.streams.contains_key("s04242"));
        let again = a.select(full(n, |i| if i == 4242 { 7 } else { 5 }));
        assert!(again.streams.contains_key("s04242"));

        // A new epoch, or a reset, lists everything again.
        let mut other = full(n, |_| 5);
        other.epoch = Some("e2".into());
        assert_eq!(announce(&mut a, other.clone()).len(), n);
        a.reset();
        assert_eq!(announce(&mut a, other).len(), n);
    }

    #[test]
    fn a_few_streams_are_all_listed_every_interval() {
        let mut a = Announcer::default();
        for _ in 0..3 {
            assert_eq!(announce(&mut a, full(100, |_| 1)).len(), 100);
        }
    }
}
