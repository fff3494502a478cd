//! The event envelope: CloudEvents 1.0 in JSON structured mode.
//!
//! ```json
//! {"specversion":"1.0","id":"0193...","source":"user-service","type":"user.created",
//!  "subject":"42","time":"2026-11-27T12:00:00.000Z","datacontenttype":"application/json",
//!  "stream":"users","sequence":"00000000000000000007",
//!  "epoch":"3f2a...","data":{...}}
//! ```
//!
//! Two extension attributes carry what exactly-once, in-order delivery needs: `stream`
//! names the producer's stream and `sequence` is the event's position in it (1, 2, 3,
//! ... with no gaps). `sequence` follows the CloudEvents sequence extension: a string
//! whose lexical order is its numeric order, here 20 zero-padded decimal digits.
//! A third, `epoch`, names the producer database's numbering (docs/recovery.md,
//! "Producer identity"): sequence numbers of two epochs are never compared. Events
//! written before epochs existed have none, and count in whatever epoch the consumer
//! follows.

use serde::{Deserialize, Serialize};

use crate::protocol;

/// CloudEvents version this program writes and accepts.
pub const SPEC_VERSION: &str = "1.0";
/// The only `datacontenttype` this program writes and accepts.
pub const CONTENT_TYPE: &str = "application/json";

/// One event, as on the wire. `D` is the payload: `serde_json::Value` when received;
/// the producer's own type when enqueued, so that it is serialised only once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent<D = serde_json::Value> {
    /// Always "1.0".
    pub specversion: String,
    /// A UUIDv7, unique per event.
    pub id: String,
    /// The producer (see `--source`).
    pub source: String,
    /// What happened, e.g. `user.created`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// What it happened to, e.g. the user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When the event was enqueued, RFC 3339 in UTC.
    pub time: String,
    /// Always "application/json".
    pub datacontenttype: String,
    /// Extension: the producer's stream.
    pub stream: String,
    /// Extension: the position in the stream, 20 zero-padded digits.
    pub sequence: String,
    /// Extension: the producer database's epoch (absent in events written before
    /// epochs existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    /// The event's payload.
    pub data: D,
}

/// Formats a sequence number the way the `sequence` attribute carries it.
pub fn format_sequence(seq: u64) -> String {
    format!("{seq:020}")
}

impl CloudEvent {
    /// The sequence number as an integer.
    pub fn seq(&self) -> Result<u64, String> {
        let s = &self.sequence;
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "sequence {s:?} is not a decimal number of at most 20 digits"
            ));
        }
        match s.parse::<u64>() {
            Ok(0) => Err("sequence 0 is not valid; sequences start at 1".into()),
            Ok(n) if n > protocol::SEQ_MAX => Err(format!(
                "sequence {n} exceeds the largest sequence number, {}",
                protocol::SEQ_MAX
            )),
            Ok(n) => Ok(n),
            Err(e) => Err(format!("sequence {s:?}: {e}")),
        }
    }

    /// Parses and checks an envelope received from the broker. The error says what is
    /// wrong, for the dead-letter table.
    pub fn parse(payload: &[u8]) -> Result<(CloudEvent, u64), String> {
        let event: CloudEvent = serde_json::from_slice(payload).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                format!("not JSON: {e}")
            } else {
                format!("not a CloudEvent of this program: {e}")
            }
        })?;
        if event.specversion != SPEC_VERSION {
            return Err(format!(
                "specversion {:?} is not {SPEC_VERSION:?}",
                event.specversion
            ));
        }
        if event.id.is_empty() || event.id.len() > 128 {
            return Err("id must be 1 to 128 bytes".into());
        }
        if event.datacontenttype != CONTENT_TYPE {
            return Err(format!(
                "datacontenttype {:?} is not {CONTENT_TYPE:?}",
                event.datacontenttype
            ));
        }
        protocol::validate_name(&event.source).map_err(|e| format!("source {e}"))?;
        protocol::validate_name(&event.stream).map_err(|e| format!("stream {e}"))?;
        protocol::validate_event_type(&event.event_type)?;
        if let Some(epoch) = &event.epoch {
            protocol::validate_name(epoch).map_err(|e| format!("epoch {e}"))?;
        }
        let seq = event.seq()?;
        Ok((event, seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CloudEvent {
        CloudEvent {
            specversion: "1.0".into(),
            id: "id-1".into(),
            source: "user-service".into(),
            event_type: "user.created".into(),
            subject: Some("7".into()),
            time: "2026-11-27T12:00:00.000Z".into(),
            datacontenttype: CONTENT_TYPE.into(),
            stream: "users".into(),
            sequence: format_sequence(7),
            epoch: Some("0a1b".into()),
            data: serde_json::json!({"name": "Ada"}),
        }
    }

    #[test]
    fn a_valid_envelope_parses_with_its_sequence() {
        let bytes = serde_json::to_vec(&sample()).unwrap();
        let (event, seq) = CloudEvent::parse(&bytes).unwrap();
        assert_eq!(seq, 7);
        assert_eq!(event, sample());
        let text = String::from_utf8(bytes).unwrap();
        assert!(
            text.contains(r#""sequence":"00000000000000000007""#),
            "{text}"
        );
        assert!(text.contains(r#""type":"user.created""#), "{text}");
    }

    #[test]
    fn bad_envelopes_say_what_is_wrong() {
        let changed = |change: fn(&mut CloudEvent)| {
            let mut event = sample();
            change(&mut event);
            serde_json::to_vec(&event).unwrap()
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"\xff\x00garbage".to_vec(), "not JSON"),
            (br#"{"hello":"world"}"#.to_vec(), "not a CloudEvent"),
            (changed(|e| e.specversion = "0.3".into()), "specversion"),
            (changed(|e| e.sequence = "-1".into()), "sequence"),
            (changed(|e| e.sequence = "0".into()), "sequence 0"),
            (
                changed(|e| e.sequence = "99999999999999999999".into()),
                "sequence",
            ),
            (changed(|e| e.stream = "a/b".into()), "stream"),
            (changed(|e| e.event_type = "a b".into()), "event type"),
            (changed(|e| e.epoch = Some("A/B".into())), "epoch"),
        ];
        for (bytes, want) in cases {
            let err = CloudEvent::parse(&bytes).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
