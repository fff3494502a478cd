//! Which outbox row each PUBACK acknowledges. Pure state, no I/O.
//!
//! rumqttc 0.25 gives no per-publish acknowledgement handle. What it does give, in
//! order, is one `Outgoing::Publish(pkid)` event per publish request as it is written
//! to the socket, and one `Incoming::PubAck(pkid)` per acknowledgement. So the relay
//! pushes each row id into a FIFO just before handing the publish to rumqttc; the next
//! new `Outgoing::Publish(pkid)` takes the FIFO's front, and the PUBACK with that pkid
//! resolves that row. A pkid that is already mapped is a retransmission and takes
//! nothing from the FIFO. After any connection error the whole state is dropped
//! ([`Correlator::reset`]) and the rows are published again: the outbox, not this
//! state, is the source of truth.

use std::collections::{HashMap, VecDeque};

/// What a publish carries: an outbox row, or a control message (head announcement)
/// whose PUBACK needs no action.
pub type Tag = Option<i64>;

/// Maps publishes to PUBACKs.
#[derive(Debug, Default)]
pub struct Correlator {
    /// Handed to rumqttc, not yet written to the socket.
    queued: VecDeque<Tag>,
    /// Written, waiting for PUBACK, by packet id.
    inflight: HashMap<u16, Tag>,
}

impl Correlator {
    /// Call just before handing a publish to rumqttc.
    pub fn queued(&mut self, tag: Tag) {
        self.queued.push_back(tag);
    }

    /// Call when rumqttc refused the publish that was just queued.
    pub fn unqueue_last(&mut self) {
        self.queued.pop_back();
    }

    /// rumqttc wrote a publish with `pkid` to the socket. False when nothing was
    /// queued for it: the correlation is broken (logged).
    pub fn on_outgoing_publish(&mut self, pkid: u16) -> bool {
        if self.inflight.contains_key(&pkid) {
            return true; // a retransmission of a publish already mapped
        }
        match self.queued.pop_front() {
            // QoS0 (pkid 0) gets no PUBACK; nothing to wait for.
            Some(_) if pkid == 0 => {}
            Some(tag) => {
                self.inflight.insert(pkid, tag);
            }
            None => {
                tracing::warn!(pkid, "outgoing publish that the relay did not queue");
                return false;
            }
        }
        true
    }

    /// The broker acknowledged `pkid`: returns what it carried, or `None` for a pkid
    /// this state does not know (e.g. a PUBACK from before a reconnect).
    pub fn on_puback(&mut self, pkid: u16) -> Option<Tag> {
        self.inflight.remove(&pkid)
    }

    /// Publishes handed to rumqttc and not yet acknowledged.
    pub fn len(&self) -> usize {
        self.queued.len() + self.inflight.len()
    }

    /// True when nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (the connection failed). Returns the rows that were waiting:
    /// they are still pending in the outbox and will be published again.
    pub fn reset(&mut self) -> Vec<i64> {
        let rows = self
            .queued
            .drain(..)
            .chain(self.inflight.drain().map(|(_, t)| t))
            .flatten()
            .collect();
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubacks_resolve_rows_in_the_order_they_were_written() {
        let mut c = Correlator::default();
        c.queued(Some(10));
        c.queued(None);
        c.queued(Some(11));
        c.on_outgoing_publish(1);
        c.on_outgoing_publish(2);
        c.on_outgoing_publish(3);
        assert_eq!(c.on_puback(2), Some(None));
        assert_eq!(c.on_puback(3), Some(Some(11)));
        assert_eq!(c.on_puback(1), Some(Some(10)));
        assert!(c.is_empty());
    }

    #[test]
    fn a_retransmitted_pkid_takes_nothing_from_the_queue() {
        let mut c = Correlator::default();
        c.queued(Some(1));
        c.queued(Some(2));
        c.on_outgoing_publish(1);
        c.on_outgoing_publish(1); // retransmission
        c.on_outgoing_publish(2);
        assert_eq!(c.on_puback(1), Some(Some(1)));
        assert_eq!(c.on_puback(2), Some(Some(2)));
    }

    #[test]
    fn a_reused_pkid_maps_to_the_new_row_after_its_puback() {
        let mut c = Correlator::default();
        c.queued(Some(1));
        c.on_outgoing_publish(7);
        assert_eq!(c.on_puback(7), Some(Some(1)));
        c.queued(Some(2));
        c.on_outgoing_publish(7);
        assert_eq!(c.on_puback(7), Some(Some(2)));
    }

    #[test]
    fn unknown_pubacks_resolve_nothing_and_reset_returns_waiting_rows() {
        let mut c = Correlator::default();
        assert_eq!(c.on_puback(5), None);
        c.queued(Some(1));
        c.queued(Some(2));
        c.on_outgoing_publish(1);
        let mut rows = c.reset();
        rows.sort();
        assert_eq!(rows, vec![1, 2]);
        assert!(c.is_empty());
        assert_eq!(c.on_puback(1), None);
    }
}
