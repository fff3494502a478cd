//! MQTT client settings shared by the relay and the consumer.

use std::time::Duration;

use rumqttc::{AsyncClient, EventLoop, MqttOptions, NetworkOptions, TlsConfiguration, Transport};

use crate::config::{Config, ConfigError};

/// Largest packet accepted from the broker. Larger than any valid event, so that an
/// oversize message is received and dead-lettered by the inbox: a packet above the
/// client's limit is a connection error, and the broker would redeliver it after every
/// reconnect. Beyond this, only the broker's own `max_packet_size` (mosquitto.conf)
/// protects the consumer.
pub const INCOMING_PACKET_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Seconds allowed for the TCP connect and CONNACK, and for flushing a write.
const CONNECT_TIMEOUT_S: u64 = 5;

/// A client and its event loop for `client_id`. `clean_session = false` asks the broker
/// to keep the session (subscriptions and queued QoS1 messages) across disconnects.
/// `request_capacity` bounds the queue of requests (publishes, acks) to the event loop.
/// `manual_acks` leaves the PUBACK of each received message to the caller.
pub fn client(
    config: &Config,
    client_id: String,
    clean_session: bool,
    manual_acks: bool,
    request_capacity: usize,
) -> Result<(AsyncClient, EventLoop), ConfigError> {
    let broker = config.broker()?;
    let mut opts = MqttOptions::new(client_id, broker.host, broker.port);
    if let Some(c) = config.credentials()? {
        opts.set_credentials(c.username, c.password.expose());
    }
    if let Some(tls) = config.tls()? {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    opts.set_keep_alive(Duration::from_secs(config.mqtt_keep_alive_s));
    // rumqttc's default (10 KiB) turns one larger message into an endless reconnect
    // loop; events up to --payload-max-bytes must pass both ways.
    let packet_max = config.mqtt_packet_max_bytes();
    opts.set_max_packet_size(packet_max.max(INCOMING_PACKET_MAX_BYTES), packet_max);
    opts.set_clean_session(clean_session);
    opts.set_manual_acks(manual_acks);
    opts.set_request_channel_capacity(request_capacity);
    let (client, mut eventloop) = AsyncClient::new(opts, request_capacity);
    let mut net = NetworkOptions::new();
    // Without TCP_NODELAY a publish-then-wait-for-PUBACK loop stalls on Nagle plus
    // delayed ACK (about 40 ms per round trip).
    net.set_tcp_nodelay(true);
    net.set_connection_timeout(CONNECT_TIMEOUT_S);
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}
