//! The topic scheme and the control messages of the recovery protocol.
//!
//! ```text
//! {prefix}/events/{source}/{stream}       CloudEvents, QoS1        producer -> consumers
//! {prefix}/heads/{source}                 HeadAnnouncement, QoS1,  producer -> consumers
//!                                         retained, periodic
//! {prefix}/replay/{source}/{consumer}     ReplayRequest, QoS1      consumer -> producer
//! {prefix}/positions/{source}/{consumer}  PositionReport, QoS1,    consumer -> producer
//!                                         retained, periodic
//! {prefix}/events/{source}/_probe         a probe, QoS1            producer -> itself
//! ```
//!
//! `source` is the producer's `--source`, `consumer` the consuming service's own
//! `--source`. Every topic a service publishes on carries its own name at a fixed level,
//! so that a broker ACL keyed by the username (the service's name) can allow each
//! service exactly its own topics: [`mosquitto_acl`] writes those rules. A producer
//! also checks that a request's `consumer` matches its topic, so the ACL on the topic
//! binds the payload too.
//!
//! docs/recovery.md explains how these messages repair what the broker loses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest topic this program builds or accepts, in bytes.
pub const TOPIC_MAX_BYTES: usize = 512;
/// Longest source, stream or consumer name, in bytes.
pub const NAME_MAX_BYTES: usize = 64;
/// Longest event type, in bytes.
pub const EVENT_TYPE_MAX_BYTES: usize = 128;
/// Longest topic prefix, in bytes.
pub const PREFIX_MAX_BYTES: usize = 128;
/// The largest sequence number or position accepted anywhere: SQLite stores them as
/// signed 64-bit integers. A message carrying a larger one is refused.
pub const SEQ_MAX: u64 = i64::MAX as u64;
/// Streams listed in one control message at most.
pub const CONTROL_STREAMS_MAX: usize = 10_000;

/// The default `--topic-prefix`.
pub const DEFAULT_TOPIC_PREFIX: &str = "edge-outbox";
/// The last level of [`Topics::probe`].
pub const PROBE_STREAM: &str = "_probe";
/// Largest control message accepted, in bytes.
pub const CONTROL_MAX_BYTES: usize = 256 * 1024;
/// Largest control message sent, in bytes (or `--payload-max-bytes`, if smaller): a
/// head announcement or position report that lists more streams than fit is sent as
/// several pages, each a complete message about some of the streams
/// ([`HeadAnnouncement::pages`], [`PositionReport::pages`]). Well under
/// [`CONTROL_MAX_BYTES`], so that a page from a producer with longer names or a newer
/// field still passes.
pub const CONTROL_PAGE_MAX_BYTES: usize = 32 * 1024;

/// A source, stream or consumer name: 1-64 of `a-z 0-9 _ -`, starting with a letter or
/// digit. Such names are safe as one MQTT topic level on every supported broker (no
/// `/`, `+`, `#`, `$`; no `.` or space, which NATS refuses).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX_BYTES {
        return Err(format!("{name:?} must be 1 to {NAME_MAX_BYTES} bytes"));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.contains('.') {
        return Err(format!(
            "{name:?} holds '.', which NATS (a supported clustered broker) refuses in a topic level: use '-' or '_'"
        ));
    }
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c))
    {
        return Err(format!(
            "{name:?} may hold only a-z, 0-9, '_' and '-', and must start with a letter or digit"
        ));
    }
    Ok(())
}

/// A character of an event type or a topic-prefix level: `A-Z a-z 0-9 . _ -`.
fn is_level_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "._-".contains(c)
}

/// An event type such as `user.created`: 1-128 of `A-Z a-z 0-9 . _ -`.
pub fn validate_event_type(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > EVENT_TYPE_MAX_BYTES {
        return Err(format!(
            "event type {t:?} must be 1 to {EVENT_TYPE_MAX_BYTES} bytes"
        ));
    }
    if !t.chars().all(is_level_char) {
        return Err(format!(
            "event type {t:?} may hold only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// A topic prefix: one or more `/`-separated levels, each 1 or more of
/// `A-Z a-z 0-9 _ -`; no `.` (NATS refuses it), no wildcards, no leading `$` (reserved by brokers), no empty level.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || prefix.len() > PREFIX_MAX_BYTES {
        return Err(format!("{prefix:?} must be 1 to {PREFIX_MAX_BYTES} bytes"));
    }
    for level in prefix.split('/') {
        if level.is_empty() {
            return Err(format!("{prefix:?} has an empty topic level"));
        }
        if level.contains('.') {
            return Err(format!(
                "{prefix:?} holds '.', which NATS (a supported clustered broker) refuses in a topic level: use '-' or '_'"
            ));
        }
        if !level.chars().all(is_level_char) {
            return Err(format!(
                "{prefix:?}: topic levels may hold only letters, digits, '_' and '-' (no wildcards)"
            ));
        }
    }
    Ok(())
}

/// Builds and parses the topics under one prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// `prefix` must have passed [`validate_prefix`].
    pub fn new(prefix: &str) -> Topics {
        Topics {
            prefix: prefix.to_owned(),
        }
    }

    /// Where the events of one stream are published.
    pub fn events(&self, source: &str, stream: &str) -> String {
        format!("{}/events/{source}/{stream}", self.prefix)
    }

    /// Every event topic, for `mosquitto_sub`.
    pub fn events_all(&self) -> String {
        format!("{}/events/#", self.prefix)
    }

    /// Where a producer announces the heads of its streams.
    pub fn heads(&self, source: &str) -> String {
        format!("{}/heads/{source}", self.prefix)
    }

    /// Where `consumer` asks the producer `source` to replay.
    pub fn replay(&self, source: &str, consumer: &str) -> String {
        format!("{}/replay/{source}/{consumer}", self.prefix)
    }

    /// Every consumer's replay requests to one producer.
    pub fn replay_all(&self, source: &str) -> String {
        format!("{}/replay/{source}/+", self.prefix)
    }

    /// Where a producer sends probes to itself, to find out whether the broker delivers
    /// what it publishes on its event topics (a broker whose ACL denies a publish may
    /// still acknowledge it). `_probe` can never be a stream: stream names start with
    /// a letter or digit.
    pub fn probe(&self, source: &str) -> String {
        format!("{}/events/{source}/{PROBE_STREAM}", self.prefix)
    }

    /// Where a consumer reports its positions in one producer's streams.
    pub fn positions(&self, source: &str, consumer: &str) -> String {
        format!("{}/positions/{source}/{consumer}", self.prefix)
    }

    /// Every consumer's positions in one producer's streams.
    pub fn positions_all(&self, source: &str) -> String {
        format!("{}/positions/{source}/+", self.prefix)
    }

    /// `(source, stream)` of an event topic, or None for any other topic.
    pub fn parse_events<'a>(&self, topic: &'a str) -> Option<(&'a str, &'a str)> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/events/")?;
        let (source, stream) = rest.split_once('/')?;
        (!stream.contains('/')).then_some((source, stream))
    }

    /// The source of a heads topic, or None for any other topic.
    pub fn parse_heads<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix("/heads/")?;
        (!rest.contains('/')).then_some(rest)
    }
}

/// What a producer has published, per stream. Sent periodically and retained, so that a
/// consumer learns of events it never received even when nothing later arrives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadAnnouncement {
    /// The producer.
    pub source: String,
    /// The producer database's epoch: sequence numbers count within it. Absent only
    /// from producers older than epochs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The epoch this one continues, up to each stream's [`StreamHead::base`]; absent
    /// for a new database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Stream name -> its head.
    pub streams: BTreeMap<String, StreamHead>,
}

/// One stream in a [`HeadAnnouncement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamHead {
    /// Every event with `sequence <= head` has been published (PUBACKed).
    pub head: u64,
    /// The lowest sequence number the producer still holds and can replay; events below
    /// it were deleted by retention.
    pub first: u64,
    /// The last sequence number enqueued (published or not). A consumer whose position
    /// in this epoch is beyond it has seen events this database does not hold: it was
    /// rewound.
    #[serde(default)]
    pub last: u64,
    /// The last sequence number this epoch shares with the previous one (0 when there
    /// is none).
    #[serde(default)]
    pub base: u64,
}

impl HeadAnnouncement {
    /// Refuses an announcement that no producer would send: a bad stream name or
    /// epoch, a head above [`SEQ_MAX`], a `first` beyond `head + 1` (a producer cannot
    /// have deleted what it never published, so a consumer never skips beyond the
    /// announced head), or (with an epoch) a head or base beyond the last sequence.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.source)?;
        for epoch in [&self.epoch, &self.previous].into_iter().flatten() {
            validate_name(epoch).map_err(|e| format!("epoch {e}"))?;
        }
        if self.previous.is_some() && self.epoch.is_none() {
            return Err("a previous epoch without an epoch".into());
        }
        if self.streams.len() > CONTROL_STREAMS_MAX {
            return Err(format!("more than {CONTROL_STREAMS_MAX} streams"));
        }
        for (stream, h) in &self.streams {
            validate_name(stream)?;
            if h.head >= SEQ_MAX || h.first == 0 || h.first > h.head + 1 {
                return Err(format!(
                    "stream {stream:?}: head {} and first {} are not 0 <= first - 1 <= head < {SEQ_MAX}",
                    h.head, h.first
                ));
            }
            if self.epoch.is_some() && (h.head > h.last || h.base > h.last) {
                return Err(format!(
                    "stream {stream:?}: head {} and base {} must not exceed last {}",
                    h.head, h.base, h.last
                ));
            }
        }
        Ok(())
    }
}

/// Bytes of a value's JSON.
fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(0, |v| v.len())
}

/// Splits `entries` into maps whose JSON takes at most `budget` bytes each (an entry
/// larger than `budget` gets a map of its own). Never returns an empty list.
fn paginate<V: Serialize>(entries: BTreeMap<String, V>, budget: usize) -> Vec<BTreeMap<String, V>> {
    let mut pages = vec![BTreeMap::new()];
    let mut used = 2; // {}
    for (name, value) in entries {
        let n = json_len(&name) + 1 + json_len(&value) + 1; // "name":value,
        let page = pages.last_mut().expect("never empty");
        if !page.is_empty() && used + n > budget {
            pages.push(BTreeMap::new());
            used = 2;
        }
        used += n;
        pages.last_mut().expect("never empty").insert(name, value);
    }
    pages
}

/// What is left of `max_bytes` for the entries once `header` (a message with no
/// entries) is counted.
fn entries_budget<T: Serialize>(header: &T, max_bytes: usize) -> usize {
    max_bytes.saturating_sub(json_len(header))
}

impl HeadAnnouncement {
    /// This announcement as messages of at most `max_bytes` each (one per stream at
    /// worst), each with the source and epochs and some of the streams; at least one.
    /// A consumer treats each page as the announcement of the streams it lists.
    pub fn pages(mut self, max_bytes: usize) -> Vec<HeadAnnouncement> {
        let streams = std::mem::take(&mut self.streams);
        let budget = entries_budget(&self, max_bytes);
        paginate(streams, budget)
            .into_iter()
            .map(|streams| HeadAnnouncement {
                streams,
                ..self.clone()
            })
            .collect()
    }
}

impl PositionReport {
    /// This report as messages of at most `max_bytes` each (one per stream at worst);
    /// at least one. Positions and divergences go on pages of their own. A producer
    /// records each page's positions on their own.
    pub fn pages(mut self, max_bytes: usize) -> Vec<PositionReport> {
        let positions = std::mem::take(&mut self.positions);
        let diverged = std::mem::take(&mut self.diverged);
        let budget = entries_budget(&self, max_bytes);
        let mut pages: Vec<PositionReport> = paginate(positions, budget)
            .into_iter()
            .map(|positions| PositionReport {
                positions,
                ..self.clone()
            })
            .collect();
        if !diverged.is_empty() {
            // The header counted `"positions":{}`; these pages carry `"diverged":` too.
            let budget = budget.saturating_sub(r#","diverged":"#.len());
            pages.extend(
                paginate(diverged, budget)
                    .into_iter()
                    .map(|diverged| PositionReport {
                        diverged,
                        ..self.clone()
                    }),
            );
        }
        pages
    }
}

/// A consumer asks a producer to publish a stream again from `from_seq` on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The consumer asking (its client id).
    pub consumer: String,
    /// The producer's stream.
    pub stream: String,
    /// The first sequence number the consumer lacks (its position + 1).
    pub from_seq: u64,
}

impl ReplayRequest {
    /// Refuses a request with a bad consumer or stream name or a sequence out of range.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.consumer)?;
        validate_name(&self.stream)?;
        if self.from_seq == 0 || self.from_seq > SEQ_MAX {
            return Err(format!("from_seq {} is not 1 to {SEQ_MAX}", self.from_seq));
        }
        Ok(())
    }
}

/// A consumer's positions in one producer's streams. The producer keeps outbox rows
/// that a known consumer has not applied yet (see the retention rule).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PositionReport {
    /// The consumer (its client id).
    pub consumer: String,
    /// The producer epoch the positions count in (absent from consumers older than
    /// epochs, and for positions that have not met an epoch yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// Stream name -> last sequence number applied.
    pub positions: BTreeMap<String, u64>,
    /// Streams in which the consumer received, at a sequence number it had applied in
    /// this epoch, an event with another id than the one it applied: the producer's
    /// numbering went back. The producer checks the claim against its own outbox.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub diverged: BTreeMap<String, Divergence>,
}

/// One stream of [`PositionReport::diverged`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Divergence {
    /// The sequence number.
    pub seq: u64,
    /// The id of the event the consumer applied at it.
    pub applied_id: String,
}

impl PositionReport {
    /// Refuses a report with a bad consumer or stream name, too many streams, or a
    /// position out of range.
    pub fn validate(&self) -> Result<(), String> {
        validate_name(&self.consumer)?;
        if let Some(epoch) = &self.epoch {
            validate_name(epoch).map_err(|e| format!("epoch {e}"))?;
        }
        if self.positions.len() > CONTROL_STREAMS_MAX {
            return Err(format!("more than {CONTROL_STREAMS_MAX} streams"));
        }
        for (stream, p) in &self.positions {
            validate_name(stream)?;
            if *p > SEQ_MAX {
                return Err(format!("stream {stream:?}: position {p} exceeds {SEQ_MAX}"));
            }
        }
        if self.diverged.len() > CONTROL_STREAMS_MAX {
            return Err(format!("more than {CONTROL_STREAMS_MAX} diverged streams"));
        }
        for (stream, d) in &self.diverged {
            validate_name(stream)?;
            if d.seq == 0 || d.seq > SEQ_MAX || d.applied_id.is_empty() || d.applied_id.len() > 128
            {
                return Err(format!(
                    "stream {stream:?}: a divergence needs a sequence of 1 to {SEQ_MAX} and an event id of 1 to 128 bytes"
                ));
            }
        }
        Ok(())
    }
}

/// The Mosquitto ACL (`acl_file`) that lets each service publish only its own topics
/// under `prefix`, when each service connects with its `--source` as its username:
/// its events, head announcements and probes as a producer, its replay requests and
/// position reports as a consumer. Every service may read every event and head
/// announcement, and the replay requests and position reports addressed to it.
/// `observers` get read-only access to the events and head announcements (e.g. for
/// `mosquitto_sub`); an observer's name must not be a service's `--source`. Mosquitto
/// may warn at start that the read-all patterns hold no `%u`; that is intended.
/// `prefix` must have passed [`validate_prefix`] and the observers [`validate_name`].
pub fn mosquitto_acl(prefix: &str, observers: &[&str]) -> String {
    debug_assert!(validate_prefix(prefix).is_ok());
    debug_assert!(observers.iter().all(|o| validate_name(o).is_ok()));
    let mut acl = format!(
        "# Written by edge-outbox (protocol::mosquitto_acl) for the topic prefix {prefix:?}.\n\
         # Each service connects with its --source as its MQTT username (%u).\n\
         # What a service may publish: only topics that carry its own name.\n\
         pattern write {prefix}/events/%u/+\n\
         pattern write {prefix}/heads/%u\n\
         pattern write {prefix}/replay/+/%u\n\
         pattern write {prefix}/positions/+/%u\n\
         # What a service may read: every event and head announcement, and the\n\
         # requests and reports addressed to it.\n\
         pattern read {prefix}/events/+/+\n\
         pattern read {prefix}/heads/+\n\
         pattern read {prefix}/replay/%u/+\n\
         pattern read {prefix}/positions/%u/+\n"
    );
    for observer in observers {
        // The write patterns above apply to every user, the observer too: deny it the
        // topics they would grant it (a retained position report of its own would hold
        // back a producer's retention forever; replay requests would replay history).
        acl.push_str(&format!(
            "# {observer}: read-only, for watching (mosquitto_sub). The patterns above apply to\n\
             # every user, so what they would let it write is denied here.\n\
             user {observer}\n\
             topic read {prefix}/#\n\
             topic deny {prefix}/events/{observer}/#\n\
             topic deny {prefix}/heads/{observer}\n\
             topic deny {prefix}/replay/#\n\
             topic deny {prefix}/positions/#\n"
        ));
    }
    acl
}

/// Parses a control message, refusing oversize input before parsing it.
pub(crate) fn parse_control<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    if payload.len() > CONTROL_MAX_BYTES {
        return Err(format!(
            "{} bytes exceeds the {CONTROL_MAX_BYTES}-byte limit for control messages",
            payload.len()
        ));
    }
    serde_json::from_slice(payload).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;

    #[test]
    fn ten_thousand_streams_are_announced_and_reported_in_pages_within_the_limit() {
        let name = |i: usize| format!("{i:05}-{}", "d".repeat(NAME_MAX_BYTES - 6));
        let head = StreamHead {
            head: SEQ_MAX - 1,
            first: SEQ_MAX - 1,
            last: SEQ_MAX - 1,
            base: SEQ_MAX - 1,
        };
        let heads = HeadAnnouncement {
            source: "s".repeat(NAME_MAX_BYTES),
            epoch: Some("e".repeat(NAME_MAX_BYTES)),
            previous: Some("p".repeat(NAME_MAX_BYTES)),
            streams: (0..CONTROL_STREAMS_MAX).map(|i| (name(i), head)).collect(),
        };
        assert!(serde_json::to_vec(&heads).unwrap().len() > CONTROL_MAX_BYTES);
        let pages = heads.clone().pages(CONTROL_PAGE_MAX_BYTES);
        let mut seen = BTreeMap::new();
        for page in &pages {
            let json = serde_json::to_vec(page).unwrap();
            assert!(json.len() <= CONTROL_PAGE_MAX_BYTES, "{} bytes", json.len());
            let parsed: HeadAnnouncement = parse_control(&json).unwrap();
            parsed.validate().unwrap();
            assert_eq!(
                (&parsed.epoch, &parsed.previous),
                (&heads.epoch, &heads.previous)
            );
            seen.extend(parsed.streams);
        }
        assert_eq!(seen, heads.streams, "every stream on exactly one page");
        let whole = serde_json::to_vec(&heads).unwrap().len();
        assert!(
            pages.len() <= whole / (CONTROL_PAGE_MAX_BYTES - 1_000) + 1,
            "pages are full: {} pages for {whole} bytes",
            pages.len()
        );

        let report = PositionReport {
            consumer: "c".repeat(NAME_MAX_BYTES),
            epoch: Some("e".repeat(NAME_MAX_BYTES)),
            positions: (0..CONTROL_STREAMS_MAX)
                .map(|i| (name(i), SEQ_MAX))
                .collect(),
            diverged: (0..30)
                .map(|i| {
                    (
                        name(i),
                        Divergence {
                            seq: SEQ_MAX,
                            applied_id: "x".repeat(128),
                        },
                    )
                })
                .collect(),
        };
        let pages = report.clone().pages(2_000);
        let (mut positions, mut diverged) = (BTreeMap::new(), BTreeMap::new());
        for page in pages {
            let json = serde_json::to_vec(&page).unwrap();
            assert!(json.len() <= 2_000, "{} bytes", json.len());
            let parsed: PositionReport = parse_control(&json).unwrap();
            parsed.validate().unwrap();
            positions.extend(parsed.positions);
            diverged.extend(parsed.diverged);
        }
        assert_eq!((positions, diverged), (report.positions, report.diverged));

        // Nothing to list still makes one message.
        let empty = PositionReport {
            positions: BTreeMap::new(),
            diverged: BTreeMap::new(),
            ..report
        };
        assert_eq!(empty.clone().pages(CONTROL_PAGE_MAX_BYTES), vec![empty]);
    }

    #[test]
    fn names_with_topic_metacharacters_are_refused() {
        for bad in [
            "",
            "a/b",
            "a+",
            "#",
            "$sys",
            "Upper",
            "-lead",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["users", "user-service", "a_b-1", "0"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn dots_are_refused_in_names_and_prefixes_saying_nats_refuses_them() {
        // NATS 2.9's MQTT listener refuses '.' in topic levels (FIELD-NOTES.md).
        let e = validate_name("site.1").unwrap_err();
        assert!(e.contains("NATS"), "{e}");
        let e = validate_prefix("edge/site.1").unwrap_err();
        assert!(e.contains("NATS"), "{e}");
        let e = Config {
            source: "user.service".into(),
            ..Config::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.flag, "source");
        assert!(e.to_string().contains("NATS"), "{e}");
    }

    #[test]
    fn prefixes_refuse_empty_levels_and_wildcards() {
        for bad in ["", "/a", "a/", "a//b", "a/+", "a/#", "$SYS", "a b"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
        validate_prefix("site-1/box").unwrap();
    }

    #[test]
    fn event_topics_round_trip() {
        let t = Topics::new("p/q");
        let topic = t.events("user-service", "users");
        assert_eq!(topic, "p/q/events/user-service/users");
        assert_eq!(t.parse_events(&topic), Some(("user-service", "users")));
        assert_eq!(t.parse_events("p/q/events/a/b/c"), None);
        assert_eq!(t.parse_events("p/q/heads/a"), None);
        assert_eq!(t.parse_heads("p/q/heads/a"), Some("a"));
    }

    #[test]
    fn control_messages_refuse_unknown_fields_and_oversize_input() {
        assert!(parse_control::<ReplayRequest>(
            br#"{"consumer":"c","stream":"s","from_seq":1,"x":1}"#
        )
        .is_err());
        assert!(parse_control::<ReplayRequest>(&vec![b' '; CONTROL_MAX_BYTES + 1]).is_err());
        let r: ReplayRequest =
            parse_control(br#"{"consumer":"c","stream":"s","from_seq":3}"#).unwrap();
        assert_eq!(r.from_seq, 3);
    }
}
