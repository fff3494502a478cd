//! The MQTT link shared by the relay and the consumer: one client, and one task that
//! owns its event loop for the life of the link.
//!
//! Why a task of its own: `EventLoop::poll` is not safe to drop while it connects. A
//! relay that polled inside its own `select!` dropped the half-made connection
//! whenever a timer or a commit won the race, and opened another with the same client
//! id (found on a NATS cluster: several connections per relay at start, the broker
//! kicking one). Here `poll` is only ever dropped when the link is dropped.
//!
//! The task also:
//! - subscribes to the link's filters at every CONNACK and checks each SUBACK return
//!   code: a refused filter is logged and asked for again, with a capped backoff, until
//!   the broker grants it (a NATS cluster refuses subscriptions for a few seconds after a
//!   node dies; an ACL refuses them until it is fixed);
//! - after a connection error, drops what rumqttc still holds of the dead connection
//!   (PUBACK and outgoing-publish events it read or made before the error are returned
//!   by the next `poll`, after the next CONNACK, where they resolved the wrong publishes);
//! - moves to the next broker address after each failure (`--broker` may list several
//!   nodes of a cluster), waiting a capped exponential backoff that only a connection
//!   that lasted resets.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::config::{BrokerAddr, Config, ConfigError};
use crate::retry::{short_connections_hint, Backoff, Connections, LogLimiter};

/// Largest packet accepted from the broker. Larger than any valid event, so that an
/// oversize message is received and dead-lettered by the inbox: a packet above the
/// client's limit is a connection error, and the broker would redeliver it after every
/// reconnect. Beyond this, only the broker's own `max_packet_size` (mosquitto.conf)
/// protects the consumer.
pub const INCOMING_PACKET_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Seconds allowed for the TCP connect and CONNACK, and for flushing a write.
pub const CONNECT_TIMEOUT_S: u64 = 5;

/// Events of the event loop waiting for the relay or consumer to take them.
const EVENTS_QUEUE_MAX: usize = 1024;

/// First and longest wait before asking again for a subscription the broker refused.
const SUBSCRIBE_RETRY_MIN: Duration = Duration::from_millis(500);
const SUBSCRIBE_RETRY_MAX: Duration = Duration::from_secs(30);

/// A status text that a task sets and status pages read.
#[derive(Debug, Default)]
pub(crate) struct Note(Mutex<Option<String>>);

impl Note {
    pub(crate) fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, text: Option<String>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }
}

/// What a link is connected to, for status pages. Cheap to read at any time.
#[derive(Debug, Default)]
pub struct LinkStatus {
    broker: Note,
    subscription_refused: Note,
    failovers: AtomicU64,
    connections: AtomicU64,
    connected: AtomicBool,
}

impl LinkStatus {
    /// The broker address (HOST:PORT) in use or being tried.
    pub fn broker(&self) -> Option<String> {
        self.broker.get()
    }
    /// Filters the broker refused in its last SUBACK and that are being asked for
    /// again, or None while every subscription is granted.
    pub fn subscription_refused(&self) -> Option<String> {
        self.subscription_refused.get()
    }
    /// Times the link moved to another address of `--broker` since start.
    pub fn failovers(&self) -> u64 {
        self.failovers.load(Ordering::Relaxed)
    }
    /// Connections made (CONNACKs received) since start.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// True between a CONNACK and the next connection error.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Which connection the owner may hand publishes to. The link closes it (under its
/// lock) before it drains rumqttc's request queue after a failure, and numbers each
/// new connection; the owner learns the number from [`Polled::Connected`], in order
/// with the events. So no publish meant for a dead connection reaches the next one,
/// where its outgoing-publish event would be matched to another row.
#[derive(Debug, Default)]
pub struct Gate(Mutex<GateState>);

#[derive(Debug, Default)]
pub struct GateState {
    connection: u64,
    open: bool,
}

impl GateState {
    /// True while connection number `connection` is the live one.
    pub fn admits(&self, connection: u64) -> bool {
        self.open && self.connection == connection
    }
}

impl Gate {
    /// Hold this while checking [`GateState::admits`] and handing publishes over.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the link task hands to its owner, in the order the event loop produced it.
#[derive(Debug)]
pub enum Polled {
    /// A new connection (its CONNACK), and its number for [`Gate`].
    Connected {
        /// The broker kept the session.
        session_present: bool,
        /// Its number: publish only while the gate admits it.
        connection: u64,
    },
    /// An event of the current connection.
    Event(Event),
    /// The connection (or an attempt) failed; the link waits and tries the next address.
    Lost {
        /// What failed, with its causes and, when the broker keeps dropping the
        /// connection right after accepting it, what that most likely means.
        why: String,
        /// The broker answered CONNECT with a refusal (credentials, authorisation).
        refused: bool,
    },
}

/// How a link connects.
pub struct LinkOptions {
    /// The MQTT client id.
    pub client_id: String,
    /// Who owns the link, for log lines: "relay" or "consumer".
    pub role: &'static str,
    /// Ask the broker to drop the session at disconnect (the relay: its outbox is its
    /// session) or keep it (the consumer: queued QoS1 messages wait for it).
    pub clean_session: bool,
    /// Leave the PUBACK of each received message to the owner.
    pub manual_acks: bool,
    /// Requests (publishes, acks) queued for the event loop at most.
    pub request_capacity: usize,
    /// Subscribed at every CONNACK.
    pub filters: Vec<SubscribeFilter>,
}

/// A connected client: publish with `client`, read what happens from `events`.
pub struct Link {
    /// Requests to the broker.
    pub client: AsyncClient,
    /// Events and connection failures, in order.
    pub events: mpsc::Receiver<Polled>,
    /// Which connection publishes may go to.
    pub gate: Arc<Gate>,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Link {
    /// Starts the link task for `config`'s broker addresses.
    pub fn start(
        config: &Config,
        opts: LinkOptions,
        status: Arc<LinkStatus>,
    ) -> Result<Link, ConfigError> {
        let addresses = config.brokers()?;
        // The password file and the TLS files are read once, for every address.
        let (credentials, tls) = (config.credentials()?, config.tls()?);
        let options: Vec<MqttOptions> = addresses
            .iter()
            .map(|a| mqtt_options(config, a, &opts, credentials.as_ref(), tls.as_ref()))
            .collect();
        let (client, mut eventloop) = AsyncClient::new(options[0].clone(), opts.request_capacity);
        let mut net = NetworkOptions::new();
        // Without TCP_NODELAY a publish-then-wait-for-PUBACK loop stalls on Nagle plus
        // delayed ACK (about 40 ms per round trip).
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(CONNECT_TIMEOUT_S);
        eventloop.set_network_options(net);
        let (tx, events) = mpsc::channel(EVENTS_QUEUE_MAX);
        let stop = CancellationToken::new();
        let gate = Arc::new(Gate::default());
        let backoff = Backoff::new(
            Config::ms(config.reconnect_backoff_min_ms),
            Config::ms(config.reconnect_backoff_max_ms),
        );
        let driver = Driver {
            eventloop,
            client: client.clone(),
            addresses,
            options,
            current: 0,
            role: opts.role,
            clean_session: opts.clean_session,
            manual_acks: opts.manual_acks,
            filters: opts.filters,
            packet_max: config.mqtt_packet_max_bytes(),
            status,
            backoff,
            gate: gate.clone(),
        };
        let task = tokio::spawn(driver.run(tx, stop.clone()));
        Ok(Link {
            client,
            events,
            gate,
            task: Some(task),
            stop,
        })
    }

    /// Sends DISCONNECT after what is queued and waits up to `timeout` for the task to
    /// write it; stops the task in any case. Events not read yet are dropped.
    pub async fn disconnect(mut self, timeout: Duration) {
        let _ = self.client.try_disconnect();
        self.events.close();
        if let Some(task) = self.task.as_mut() {
            if tokio::time::timeout(timeout, task).await.is_err() {
                self.stop.cancel();
            }
        }
    }
}

impl Drop for Link {
    /// A link dropped (its owner's task aborted, as when a process is killed) drops its
    /// connection at once.
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// rumqttc's options for one broker address.
fn mqtt_options(
    config: &Config,
    addr: &BrokerAddr,
    opts: &LinkOptions,
    credentials: Option<&crate::config::Credentials>,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> MqttOptions {
    let mut o = MqttOptions::new(opts.client_id.clone(), addr.host.clone(), addr.port);
    if let Some(c) = credentials {
        o.set_credentials(c.username.clone(), c.password.expose());
    }
    if let Some(tls) = tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    o.set_keep_alive(Duration::from_secs(config.mqtt_keep_alive_s));
    // rumqttc's default (10 KiB) turns one larger message into an endless reconnect
    // loop; events up to --payload-max-bytes must pass both ways.
    let packet_max = config.mqtt_packet_max_bytes();
    o.set_max_packet_size(packet_max.max(INCOMING_PACKET_MAX_BYTES), packet_max);
    o.set_clean_session(opts.clean_session);
    o.set_manual_acks(opts.manual_acks);
    o.set_request_channel_capacity(opts.request_capacity);
    o
}

/// A connection error with its causes, e.g. "TLS: invalid peer certificate:
/// UnknownIssuer": rumqttc's own message names only the outermost layer.
pub fn connection_error_text(e: &rumqttc::ConnectionError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Whether the owner needs `item`: CONNACKs, received messages and PUBACKs, the
/// publishes rumqttc wrote (the relay correlates them) and failures. Pings, SUBACKs
/// (handled here) and outgoing acks would only fill the queue.
fn wanted(item: &Polled) -> bool {
    match item {
        Polled::Lost { .. } | Polled::Connected { .. } => true,
        Polled::Event(Event::Incoming(p)) => matches!(p, Packet::Publish(_) | Packet::PubAck(_)),
        Polled::Event(Event::Outgoing(o)) => matches!(o, Outgoing::Publish(_)),
    }
}

/// Subscriptions asked for and not yet answered, and the one retry that may be
/// waiting: a broker that refuses again and again (or sends SUBACKs nobody asked for)
/// costs one timer, never a task per refusal.
#[derive(Default)]
struct Subscriptions {
    /// Filters of SUBSCRIBE packets queued and not yet answered, oldest first.
    asked: std::collections::VecDeque<Vec<SubscribeFilter>>,
    /// Filters to ask for again when the retry's timer fires (a task waits for it).
    retry: Option<Vec<SubscribeFilter>>,
    /// The largest packet the client may send.
    packet_max: usize,
}

fn lock(subs: &Mutex<Subscriptions>) -> std::sync::MutexGuard<'_, Subscriptions> {
    subs.lock().unwrap_or_else(|e| e.into_inner())
}

impl Subscriptions {
    /// A new connection: nothing asked on the old one will be answered.
    fn clear(&mut self) {
        self.asked.clear();
        self.retry = None;
    }

    /// Queues SUBSCRIBEs for `filters`; false when rumqttc's queue is full.
    fn ask(&mut self, client: &AsyncClient, filters: Vec<SubscribeFilter>) -> bool {
        for packet in subscribe_packets(filters, self.packet_max) {
            if client.try_subscribe_many(packet.clone()).is_err() {
                return false;
            }
            self.asked.push_back(packet);
        }
        true
    }

    /// Asks for `filters` again after `delay`, with any others already waiting, on
    /// the connection current now (none if it is replaced meanwhile). The timer ends
    /// with the link (`stop`).
    fn retry(
        subs: &Arc<Mutex<Subscriptions>>,
        client: &AsyncClient,
        filters: Vec<SubscribeFilter>,
        delay: Duration,
        connection: &Arc<AtomicU64>,
        stop: &CancellationToken,
    ) {
        {
            let mut s = lock(subs);
            if let Some(waiting) = s.retry.as_mut() {
                for f in filters {
                    if !waiting.iter().any(|w| w.path == f.path) {
                        waiting.push(f);
                    }
                }
                return; // its task is waiting already
            }
            s.retry = Some(filters);
        }
        let (subs, client, gen) = (subs.clone(), client.clone(), connection.clone());
        let at = gen.load(Ordering::Relaxed);
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = sleep(delay) => {}
                    _ = stop.cancelled() => return,
                }
                if gen.load(Ordering::Relaxed) != at {
                    return; // a new connection subscribed to everything
                }
                let mut s = lock(&subs);
                let Some(filters) = s.retry.clone() else {
                    return;
                };
                if s.ask(&client, filters) {
                    s.retry = None;
                    return;
                }
                // rumqttc's queue is full: the filters stay in `retry` (refusals that
                // come meanwhile join them) and this task waits again.
            }
        });
    }
}

/// `filters` in SUBSCRIBE packets of at most `packet_max` bytes each: a consumer of
/// 10,000 streams asks for more than one packet may hold.
fn subscribe_packets(
    filters: Vec<SubscribeFilter>,
    packet_max: usize,
) -> Vec<Vec<SubscribeFilter>> {
    // A fixed header of at most 5 bytes and a packet id; per filter its length, its
    // topic and its options byte.
    let budget = packet_max.saturating_sub(7);
    let mut packets: Vec<Vec<SubscribeFilter>> = Vec::new();
    let mut used = 0;
    for f in filters {
        let n = f.path.len() + 3;
        match packets.last_mut() {
            Some(p) if used + n <= budget => p.push(f),
            _ => {
                packets.push(vec![f]);
                used = 0;
            }
        }
        used += n;
    }
    packets
}

/// The link task's state.
struct Driver {
    eventloop: EventLoop,
    client: AsyncClient,
    addresses: Vec<BrokerAddr>,
    options: Vec<MqttOptions>,
    current: usize,
    role: &'static str,
    clean_session: bool,
    manual_acks: bool,
    filters: Vec<SubscribeFilter>,
    /// The largest packet the client may send.
    packet_max: usize,
    status: Arc<LinkStatus>,
    backoff: Backoff,
    gate: Arc<Gate>,
}

impl Driver {
    async fn run(mut self, tx: mpsc::Sender<Polled>, stop: CancellationToken) {
        let client_id = self.eventloop.mqtt_options.client_id();
        let mut connections = Connections::default();
        let mut flap_log = LogLimiter::new(Duration::from_secs(60));
        let mut sub_log = LogLimiter::new(Duration::from_secs(60));
        let mut grant_log = LogLimiter::new(Duration::from_secs(60));
        let subs = Arc::new(Mutex::new(Subscriptions {
            packet_max: self.packet_max,
            ..Subscriptions::default()
        }));
        let mut sub_backoff = Backoff::new(SUBSCRIBE_RETRY_MIN, SUBSCRIBE_RETRY_MAX);
        // Bumped at every CONNACK, so that a retry timed for an earlier connection
        // (whose CONNACK subscribed to everything again) does nothing.
        let connection = Arc::new(AtomicU64::new(0));
        self.status.broker.set(Some(self.address()));
        loop {
            let polled = tokio::select! {
                _ = stop.cancelled() => return,
                event = self.eventloop.poll() => event,
            };
            let item = match polled {
                Ok(event) => {
                    match &event {
                        Event::Incoming(Packet::ConnAck(_)) => {
                            connections.connected();
                            {
                                let mut g = self.gate.lock();
                                g.connection += 1;
                                g.open = true;
                            }
                            self.status.connected.store(true, Ordering::Relaxed);
                            self.status.connections.fetch_add(1, Ordering::Relaxed);
                            connection.fetch_add(1, Ordering::Relaxed);
                            lock(&subs).clear();
                            sub_backoff.reset();
                            // Always subscribe: a broker that lost the session lost the
                            // subscriptions. A full request queue: asked for again soon.
                            if !self.filters.is_empty()
                                && !lock(&subs).ask(&self.client, self.filters.clone())
                            {
                                tracing::warn!(
                                    "{}: could not queue its subscriptions; asking again",
                                    self.role
                                );
                                self.retry_all(&subs, sub_backoff.next_delay(), &connection, &stop);
                            }
                        }
                        Event::Incoming(Packet::SubAck(ack)) => {
                            let Some(filters) = lock(&subs).asked.pop_front() else {
                                // No SUBSCRIBE waits for it: a broker's mistake. If it
                                // refuses something, ask for everything again.
                                let refusal = ack
                                    .return_codes
                                    .iter()
                                    .any(|c| matches!(c, SubscribeReasonCode::Failure));
                                if refusal {
                                    self.retry_all(
                                        &subs,
                                        sub_backoff.next_delay(),
                                        &connection,
                                        &stop,
                                    );
                                }
                                continue;
                            };
                            let failed =
                                |c: &SubscribeReasonCode| matches!(c, SubscribeReasonCode::Failure);
                            let refused: Vec<SubscribeFilter> =
                                if filters.len() == ack.return_codes.len() {
                                    filters
                                        .iter()
                                        .zip(&ack.return_codes)
                                        .filter(|(_, c)| failed(c))
                                        .map(|(f, _)| f.clone())
                                        .collect()
                                } else if ack.return_codes.iter().any(failed) {
                                    self.filters.clone() // not the SUBACK expected: ask for all
                                } else {
                                    Vec::new()
                                };
                            // Only once no packet of the subscriptions is left
                            // unanswered or refused: one granted packet says nothing
                            // of another.
                            let settled = {
                                let s = lock(&subs);
                                s.asked.is_empty() && s.retry.is_none()
                            };
                            if refused.is_empty() && !settled {
                                // wait for the rest
                            } else if refused.is_empty() {
                                if self.status.subscription_refused.get().is_some() {
                                    if let Some(suppressed) = grant_log.allow() {
                                        tracing::info!(
                                            suppressed,
                                            "{}: the broker granted the subscriptions it had refused",
                                            self.role
                                        );
                                    }
                                }
                                self.status.subscription_refused.set(None);
                                sub_backoff.reset();
                            } else {
                                let names: Vec<&str> =
                                    refused.iter().map(|f| f.path.as_str()).collect();
                                let delay = sub_backoff.next_delay();
                                let why = format!(
                                    "the broker refused the subscription to {} (its ACL, or a cluster still electing a leader); asking again in {} ms",
                                    names.join(", "),
                                    delay.as_millis()
                                );
                                if let Some(suppressed) = sub_log.allow() {
                                    tracing::error!(suppressed, "{}: {why}", self.role);
                                }
                                self.status.subscription_refused.set(Some(why));
                                Subscriptions::retry(
                                    &subs,
                                    &self.client,
                                    refused,
                                    delay,
                                    &connection,
                                    &stop,
                                );
                            }
                        }
                        _ => {}
                    }
                    let done = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                    if done {
                        let _ = tx.try_send(Polled::Event(event));
                        return;
                    }
                    match event {
                        Event::Incoming(Packet::ConnAck(ack)) => Polled::Connected {
                            session_present: ack.session_present,
                            connection: self.gate.lock().connection,
                        },
                        event => Polled::Event(event),
                    }
                }
                Err(e) => {
                    self.status.connected.store(false, Ordering::Relaxed);
                    lock(&subs).clear();
                    self.forget_dead_connection();
                    let mut why = format!("{}: {}", self.address(), connection_error_text(&e));
                    if let Some(n) = connections.lost(&mut self.backoff) {
                        let hint = short_connections_hint(&client_id, n);
                        if let Some(suppressed) = flap_log.allow() {
                            tracing::error!(suppressed, "{}: {hint}", self.role);
                        }
                        why = format!("{why}; {hint}");
                    }
                    let refused = matches!(e, rumqttc::ConnectionError::ConnectionRefused(_));
                    if tx.send(Polled::Lost { why, refused }).await.is_err() {
                        return; // the owner is stopping: nothing to reconnect for
                    }
                    self.next_address();
                    tokio::select! {
                        _ = sleep(self.backoff.next_delay()) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue;
                }
            };
            // A closed receiver means the owner is stopping: keep polling (queued acks
            // and the DISCONNECT still go out) without forwarding.
            if !tx.is_closed() && wanted(&item) {
                let _ = tx.send(item).await;
            }
        }
    }

    /// Asks for every filter of the link again after `delay`.
    fn retry_all(
        &self,
        subs: &Arc<Mutex<Subscriptions>>,
        delay: Duration,
        connection: &Arc<AtomicU64>,
        stop: &CancellationToken,
    ) {
        Subscriptions::retry(
            subs,
            &self.client,
            self.filters.clone(),
            delay,
            connection,
            stop,
        );
    }

    /// "HOST:PORT" of the address in use.
    fn address(&self) -> String {
        let a = &self.addresses[self.current];
        if a.host.contains(':') {
            format!("[{}]:{}", a.host, a.port)
        } else {
            format!("{}:{}", a.host, a.port)
        }
    }

    /// After a failure: the next address of `--broker`, if it lists several.
    fn next_address(&mut self) {
        if self.addresses.len() < 2 {
            return;
        }
        self.current = (self.current + 1) % self.addresses.len();
        self.eventloop.mqtt_options = self.options[self.current].clone();
        self.status.failovers.fetch_add(1, Ordering::Relaxed);
        self.status.broker.set(Some(self.address()));
        tracing::info!(broker = %self.address(), "{}: trying the next broker address", self.role);
    }

    /// rumqttc keeps, after an error, the events it had made for the dead connection
    /// (returned by the next `poll`, after the next CONNACK), the requests queued for
    /// it and, for a clean session, the publishes it would send again (which only a
    /// resumed session wants). The owner resets what it waited for when it reads
    /// [`Polled::Lost`]: PUBACKs and outgoing-publish events of the dead connection
    /// would resolve the wrong publishes of the new one. So the gate is closed first
    /// (no new request can be meant for the dead connection), then the queue drained.
    /// With manual acks, messages received but not yet handed over are dropped too:
    /// unacknowledged, a kept session delivers them again, with packet ids that mean
    /// something on the new connection (an ack of an old id on a new session would
    /// acknowledge another message). Without (the relay's control messages), rumqttc
    /// acknowledged them as it read them: they are kept.
    fn forget_dead_connection(&mut self) {
        self.gate.lock().open = false;
        // Moves the request queue into `pending` (dropping acks, which a resumed
        // session's redelivery replaces); the connection is gone already.
        self.eventloop.clean();
        if self.manual_acks {
            self.eventloop.state.events.clear();
        } else {
            // rumqttc queued their acks as it read them, and the relay's clean session
            // would not get them again: keep them (a replay request, a report).
            self.eventloop
                .state
                .events
                .retain(|e| matches!(e, Event::Incoming(Packet::Publish(_))));
        }
        // A publish set aside because its packet id was still taken (a PUBACK that
        // never came) would stop rumqttc from sending anything on every later
        // connection (rumqtt#1014): a clean session's owner publishes it again anyway.
        if let Some(p) = self.eventloop.state.collision.take() {
            if !self.clean_session {
                self.eventloop
                    .pending
                    .push_back(rumqttc::Request::Publish(p));
            }
        }
        self.eventloop.state.collision_ping_count = 0;
        if self.clean_session {
            self.eventloop.pending.clear();
        } else {
            // The next CONNACK subscribes again: a SUBSCRIBE left from this connection
            // would get the SUBACK that the new one waits for.
            self.eventloop.pending.retain(|r| {
                !matches!(
                    r,
                    rumqttc::Request::Subscribe(_) | rumqttc::Request::Unsubscribe(_)
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_filters_go_in_packets_within_the_limit_in_order() {
        let filters: Vec<SubscribeFilter> = (0..10_000)
            .map(|i| {
                SubscribeFilter::new(
                    format!("edge-outbox/events/p/dev-{i:05}"),
                    rumqttc::QoS::AtLeastOnce,
                )
            })
            .collect();
        let packets = subscribe_packets(filters.clone(), 1_600);
        assert!(packets.len() > 100, "{}", packets.len());
        for p in &packets {
            let packet = rumqttc::Packet::Subscribe(rumqttc::Subscribe::new_many(p.clone()));
            let mut buf = bytes::BytesMut::new();
            packet.write(&mut buf, 1_600).expect("within the limit");
        }
        assert_eq!(packets.concat(), filters);
        assert!(subscribe_packets(Vec::new(), 1_600).is_empty());
    }
}
