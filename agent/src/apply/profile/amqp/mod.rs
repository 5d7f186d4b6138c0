//! RabbitMQ EventBus adapter (feature `amqp`, C3): a small synchronous AMQP 0-9-1 client over a
//! std `TcpStream` — durable exchanges and queues (TTL, dead-letter exchange), bindings, publish
//! with publisher confirms, basic.get.
//!
//! A redeclare that differs makes the broker close the channel with 406 PRECONDITION_FAILED, so
//! every declare runs on a throwaway channel: the failure is reported as drift and the
//! connection and the publishing channel stay usable. AMQP 0-9-1 cannot list bindings (the
//! management HTTP API could, but it is an optional plugin), so [`EventBus::check_binding`]
//! answers [`BindingCheck::Unknown`] and the engine re-issues the idempotent `queue.bind` on every
//! reconcile of the broker: a binding removed by hand comes back at the next verify.
//!
//! Declares and binds carry no idempotency key: AMQP 0-9-1 has nowhere to put one. Their only
//! free-form field is the argument table, which is the exchange's, queue's or binding's own
//! configuration (a key there would make a redeclare fail with 406, or a new binding per
//! generation). They are idempotent by protocol; the engine logs each one's key
//! (`idempotency_key=` on its log line). Publishes carry the key as the `message_id` property.

pub mod frame;

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use outpost_proto::profile::{BindingSpec, ExchangeKind, ExchangeSpec, QueueSpec};

use self::frame::{
    Args, FieldValue, Method, Parsed, Payload, bits, content_frames, method_frame, parse_frame,
};
use super::config::redact_url;
use super::ports::{
    AdapterIdentity, AdapterKind, BindingCheck, BusMessage, DeclareCheck, EventBus, IdempotencyKey,
    PortError,
};

/// Connect, read and write timeout of every broker call.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and as whom to connect, parsed from `amqp://user:pass@host:port/vhost`.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpAddress {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl std::fmt::Debug for AmqpAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "amqp://{}:***@{}:{}/{}",
            self.user, self.host, self.port, self.vhost
        )
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = text.get(index + 1..index + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parses an AMQP URL; the error names the URL with its password hidden.
pub fn parse_amqp_url(url: &str) -> Result<AmqpAddress, PortError> {
    let invalid = |reason: &str| PortError::refused("parse AMQP_URL", redact_url(url), reason);
    let rest = url
        .strip_prefix("amqp://")
        .ok_or_else(|| invalid("must start with amqp://"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => (&rest[..slash], &rest[slash + 1..]),
        None => (rest, ""),
    };
    let (credentials, host_port) = match authority.rfind('@') {
        Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
        None => (None, authority),
    };
    let (user, password) = match credentials {
        Some(credentials) => {
            let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
            (
                percent_decode(user).ok_or_else(|| invalid("bad percent-encoding in the user"))?,
                percent_decode(password)
                    .ok_or_else(|| invalid("bad percent-encoding in the password"))?,
            )
        }
        None => ("guest".to_string(), "guest".to_string()),
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (
            host,
            port.parse::<u16>()
                .map_err(|_| invalid("the port is not a number"))?,
        ),
        _ => (host_port, 5672),
    };
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let vhost = if path.is_empty() {
        "/".to_string()
    } else {
        percent_decode(path).ok_or_else(|| invalid("bad vhost"))?
    };
    Ok(AmqpAddress {
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        user,
        password,
        vhost,
    })
}

/// Why a broker call failed, before it becomes a [`PortError`].
#[derive(Debug)]
enum CallError {
    Io(std::io::Error),
    Protocol(String),
    ChannelClosed { code: u16, text: String },
    ConnectionClosed { code: u16, text: String },
}

impl CallError {
    fn into_port(self, operation: &'static str, target: &str) -> PortError {
        match self {
            CallError::Io(error) => PortError::transient(operation, target, error),
            CallError::Protocol(message) => PortError::bad_answer(operation, target, message),
            CallError::ChannelClosed { code, text } => {
                PortError::refused(operation, target, format!("{code} {text}"))
            }
            CallError::ConnectionClosed { code, text } if code == 320 || code >= 500 => {
                PortError::transient(
                    operation,
                    target,
                    format!("connection closed: {code} {text}"),
                )
            }
            CallError::ConnectionClosed { code, text } => PortError::refused(
                operation,
                target,
                format!("connection closed: {code} {text}"),
            ),
        }
    }
}

struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
    frame_max: u32,
    channel_max: u16,
    next_channel: u16,
}

impl Connection {
    fn open(address: &AmqpAddress) -> Result<Self, CallError> {
        let socket = (address.host.as_str(), address.port)
            .to_socket_addrs()
            .map_err(CallError::Io)?
            .next()
            .ok_or_else(|| CallError::Protocol(format!("host {} has no address", address.host)))?;
        let stream = TcpStream::connect_timeout(&socket, IO_TIMEOUT).map_err(CallError::Io)?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(CallError::Io)?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(CallError::Io)?;
        stream.set_nodelay(true).map_err(CallError::Io)?;
        let mut connection = Connection {
            stream,
            buffer: Vec::new(),
            frame_max: frame::FRAME_MAX_BYTES,
            channel_max: 2047,
            next_channel: 1,
        };
        connection.send(frame::PROTOCOL_HEADER)?;
        connection.expect(0, |method| matches!(method, Method::ConnectionStart))?;
        let mut response = vec![0u8];
        response.extend_from_slice(address.user.as_bytes());
        response.push(0);
        response.extend_from_slice(address.password.as_bytes());
        let start_ok = Args::new()
            .table(&[("product", FieldValue::LongString("outpost-agent".into()))])
            .short_string("PLAIN")
            .long_bytes(&response)
            .short_string("en_US");
        connection.send(&method_frame(0, 10, 11, start_ok))?;
        let Method::ConnectionTune {
            channel_max,
            frame_max,
            ..
        } = connection.expect(0, |method| matches!(method, Method::ConnectionTune { .. }))?
        else {
            return Err(CallError::Protocol("expected connection.tune".into()));
        };
        connection.channel_max = if channel_max == 0 {
            2047
        } else {
            channel_max.min(2047)
        };
        connection.frame_max = if frame_max == 0 {
            frame::FRAME_MAX_BYTES
        } else {
            frame_max.min(frame::FRAME_MAX_BYTES)
        };
        let tune_ok = Args::new()
            .u16(connection.channel_max)
            .u32(connection.frame_max)
            .u16(0);
        connection.send(&method_frame(0, 10, 31, tune_ok))?;
        let open = Args::new()
            .short_string(&address.vhost)
            .short_string("")
            .u8(0);
        connection.send(&method_frame(0, 10, 40, open))?;
        connection.expect(0, |method| matches!(method, Method::ConnectionOpenOk))?;
        Ok(connection)
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), CallError> {
        self.stream.write_all(bytes).map_err(CallError::Io)
    }

    fn read_frame(&mut self) -> Result<frame::Frame, CallError> {
        loop {
            match parse_frame(&self.buffer)
                .map_err(|error| CallError::Protocol(error.to_string()))?
            {
                Parsed::Frame(frame, used) => {
                    self.buffer.drain(..used);
                    return Ok(frame);
                }
                Parsed::Incomplete => {
                    let mut chunk = [0u8; 16 * 1024];
                    let read = self.stream.read(&mut chunk).map_err(CallError::Io)?;
                    if read == 0 {
                        return Err(CallError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                    self.buffer.extend_from_slice(&chunk[..read]);
                }
            }
        }
    }

    /// Reads until a method on `channel` that `wanted` accepts; a close of that channel or of
    /// the connection is answered and returned as an error.
    fn expect(
        &mut self,
        channel: u16,
        wanted: impl Fn(&Method) -> bool,
    ) -> Result<Method, CallError> {
        loop {
            let frame = self.read_frame()?;
            let Payload::Method(method) = frame.payload else {
                continue;
            };
            match method {
                Method::ConnectionClose { code, text } => {
                    let _ = self.send(&method_frame(0, 10, 51, Args::new()));
                    return Err(CallError::ConnectionClosed { code, text });
                }
                Method::ChannelClose { code, text } if frame.channel == channel => {
                    let _ = self.send(&method_frame(channel, 20, 41, Args::new()));
                    return Err(CallError::ChannelClosed { code, text });
                }
                Method::ChannelClose { .. } => {
                    let _ = self.send(&method_frame(frame.channel, 20, 41, Args::new()));
                }
                method if frame.channel == channel && wanted(&method) => return Ok(method),
                _ => {}
            }
        }
    }

    fn open_channel(&mut self) -> Result<u16, CallError> {
        let channel = self.next_channel;
        self.next_channel = if self.next_channel >= self.channel_max {
            1
        } else {
            self.next_channel + 1
        };
        self.send(&method_frame(channel, 20, 10, Args::new().short_string("")))?;
        self.expect(channel, |method| matches!(method, Method::ChannelOpenOk))?;
        Ok(channel)
    }

    fn close_channel(&mut self, channel: u16) -> Result<(), CallError> {
        let close = Args::new().u16(200).short_string("done").u16(0).u16(0);
        self.send(&method_frame(channel, 20, 40, close))?;
        self.expect(channel, |method| matches!(method, Method::ChannelCloseOk))
            .map(|_| ())
    }

    /// Runs one synchronous method on a fresh channel and closes it; a channel the broker
    /// closed (406, 404) is not closed again.
    fn on_throwaway_channel(
        &mut self,
        request: impl Fn(u16) -> Vec<u8>,
        wanted: impl Fn(&Method) -> bool,
    ) -> Result<Method, CallError> {
        let channel = self.open_channel()?;
        self.send(&request(channel))?;
        let answer = self.expect(channel, wanted)?;
        self.close_channel(channel)?;
        Ok(answer)
    }
}

fn exchange_type(kind: ExchangeKind) -> &'static str {
    match kind {
        ExchangeKind::Direct => "direct",
        ExchangeKind::Topic => "topic",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Headers => "headers",
    }
}

fn exchange_declare(channel: u16, exchange: &ExchangeSpec, passive: bool) -> Vec<u8> {
    let args = Args::new()
        .u16(0)
        .short_string(&exchange.name)
        .short_string(exchange_type(exchange.kind))
        .u8(bits(&[passive, true, false, false, false]))
        .table(&[]);
    method_frame(channel, 40, 10, args)
}

fn queue_arguments(queue: &QueueSpec) -> Vec<(&'static str, FieldValue)> {
    let mut arguments = Vec::new();
    if let Some(ttl) = queue.message_ttl_ms {
        arguments.push((
            "x-message-ttl",
            FieldValue::LongLong(i64::try_from(ttl).unwrap_or(i64::MAX)),
        ));
    }
    if let Some(exchange) = &queue.dead_letter_exchange {
        arguments.push((
            "x-dead-letter-exchange",
            FieldValue::LongString(exchange.to_string()),
        ));
    }
    arguments
}

fn queue_declare(channel: u16, queue: &QueueSpec, passive: bool) -> Vec<u8> {
    let args = Args::new()
        .u16(0)
        .short_string(&queue.name)
        .u8(bits(&[passive, true, false, false, false]))
        .table(&queue_arguments(queue));
    method_frame(channel, 50, 10, args)
}

/// The arguments `queue.bind` and `queue.unbind` start with: reserved, queue, exchange, routing
/// key (bind then has a no-wait bit; both end with an argument table).
fn binding_arguments(binding: &BindingSpec) -> Args {
    Args::new()
        .u16(0)
        .short_string(&binding.queue)
        .short_string(&binding.exchange)
        .short_string(&binding.routing_key)
}

/// The RabbitMQ adapter. Connects on first use and again after any connection error.
pub struct RabbitMqBus {
    address: AmqpAddress,
    location: String,
    connection: Option<Connection>,
    /// The channel in confirm mode used for publishing, and the next delivery tag on it.
    publish_channel: Option<(u16, u64)>,
}

impl RabbitMqBus {
    pub fn new(url: &str) -> Result<Self, PortError> {
        let address = parse_amqp_url(url)?;
        let location = format!("amqp://{}:{}/{}", address.host, address.port, address.vhost);
        Ok(Self {
            address,
            location,
            connection: None,
            publish_channel: None,
        })
    }

    /// Runs `call` on the connection, connecting first if needed; a connection-level failure
    /// drops the connection so the next call reconnects.
    fn with_connection<T>(
        &mut self,
        operation: &'static str,
        target: &str,
        call: impl FnOnce(&mut Connection, &mut Option<(u16, u64)>) -> Result<T, CallError>,
    ) -> Result<T, PortError> {
        if self.connection.is_none() {
            let connection = Connection::open(&self.address)
                .map_err(|error| error.into_port(operation, &self.location))?;
            self.connection = Some(connection);
            self.publish_channel = None;
        }
        let Some(connection) = self.connection.as_mut() else {
            return Err(PortError::transient(operation, target, "not connected"));
        };
        let result = call(connection, &mut self.publish_channel);
        if let Err(CallError::Io(_) | CallError::ConnectionClosed { .. } | CallError::Protocol(_)) =
            &result
        {
            self.connection = None;
            self.publish_channel = None;
        }
        result.map_err(|error| error.into_port(operation, target))
    }

    fn check_declare(
        &mut self,
        operation: &'static str,
        target: &str,
        passive: impl Fn(u16) -> Vec<u8>,
        active: impl Fn(u16) -> Vec<u8>,
        ok: fn(&Method) -> bool,
    ) -> Result<DeclareCheck, PortError> {
        self.with_connection(operation, target, |connection, _| {
            match connection.on_throwaway_channel(&passive, ok) {
                Err(CallError::ChannelClosed {
                    code: frame::REPLY_NOT_FOUND,
                    ..
                }) => return Ok(DeclareCheck::Missing),
                Err(error) => return Err(error),
                Ok(_) => {}
            }
            // It exists: declaring the desired shape is a no-op when equal, 406 when not.
            match connection.on_throwaway_channel(&active, ok) {
                Ok(_) => Ok(DeclareCheck::Matches),
                Err(CallError::ChannelClosed {
                    code: frame::REPLY_PRECONDITION_FAILED,
                    text,
                }) => Ok(DeclareCheck::Differs(text)),
                Err(error) => Err(error),
            }
        })
    }
}

impl EventBus for RabbitMqBus {
    fn identity(&self) -> AdapterIdentity {
        AdapterIdentity {
            kind: AdapterKind::RabbitMq,
            location: self.location.clone(),
        }
    }

    fn check_exchange(&mut self, exchange: &ExchangeSpec) -> Result<DeclareCheck, PortError> {
        self.check_declare(
            "check exchange",
            &exchange.name.clone(),
            |channel| exchange_declare(channel, exchange, true),
            |channel| exchange_declare(channel, exchange, false),
            |method| matches!(method, Method::ExchangeDeclareOk),
        )
    }

    fn check_queue(&mut self, queue: &QueueSpec) -> Result<DeclareCheck, PortError> {
        self.check_declare(
            "check queue",
            &queue.name.clone(),
            |channel| queue_declare(channel, queue, true),
            |channel| queue_declare(channel, queue, false),
            |method| matches!(method, Method::QueueDeclareOk),
        )
    }

    fn check_binding(&mut self, _binding: &BindingSpec) -> Result<BindingCheck, PortError> {
        Ok(BindingCheck::Unknown)
    }

    fn declare_exchange(
        &mut self,
        exchange: &ExchangeSpec,
        _key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.with_connection(
            "declare exchange",
            &exchange.name.clone(),
            |connection, _| {
                connection
                    .on_throwaway_channel(
                        |channel| exchange_declare(channel, exchange, false),
                        |m| matches!(m, Method::ExchangeDeclareOk),
                    )
                    .map(|_| ())
            },
        )
    }

    fn declare_queue(&mut self, queue: &QueueSpec, _key: &IdempotencyKey) -> Result<(), PortError> {
        self.with_connection("declare queue", &queue.name.clone(), |connection, _| {
            connection
                .on_throwaway_channel(
                    |channel| queue_declare(channel, queue, false),
                    |m| matches!(m, Method::QueueDeclareOk),
                )
                .map(|_| ())
        })
    }

    fn bind(&mut self, binding: &BindingSpec, _key: &IdempotencyKey) -> Result<(), PortError> {
        let target = format!("{}->{}", binding.exchange, binding.queue);
        self.with_connection("bind queue", &target, |connection, _| {
            connection
                .on_throwaway_channel(
                    |channel| {
                        let args = binding_arguments(binding).u8(0).table(&[]);
                        method_frame(channel, 50, 20, args)
                    },
                    |m| matches!(m, Method::QueueBindOk),
                )
                .map(|_| ())
        })
    }

    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        key: &IdempotencyKey,
    ) -> Result<(), PortError> {
        self.with_connection("publish", exchange, |connection, publish_channel| {
            let (channel, tag) = match *publish_channel {
                Some(open) => open,
                None => {
                    let channel = connection.open_channel()?;
                    connection.send(&method_frame(channel, 85, 10, Args::new().u8(0)))?;
                    connection.expect(channel, |m| matches!(m, Method::ConfirmSelectOk))?;
                    (channel, 1)
                }
            };
            *publish_channel = Some((channel, tag + 1));
            let mut bytes =
                method_frame(channel, 60, 40, Args::new().u16(0).short_string(exchange).short_string(routing_key).u8(0));
            bytes.extend_from_slice(&content_frames(channel, payload, key.as_str(), connection.frame_max));
            connection.send(&bytes)?;
            let answer = connection.expect(channel, |m| {
                matches!(m, Method::BasicAck { delivery_tag, multiple } | Method::BasicNack { delivery_tag, multiple }
                    if *delivery_tag == tag || (*multiple && *delivery_tag >= tag))
            });
            match answer {
                Ok(Method::BasicAck { .. }) => Ok(()),
                Ok(_) => Err(CallError::Io(std::io::Error::other("the broker nacked the message"))),
                Err(error) => {
                    *publish_channel = None;
                    Err(error)
                }
            }
        })
    }

    fn get(&mut self, queue: &str) -> Result<Option<BusMessage>, PortError> {
        self.with_connection("get", queue, |connection, _| {
            let channel = connection.open_channel()?;
            connection.send(&method_frame(
                channel,
                60,
                70,
                Args::new().u16(0).short_string(queue).u8(1),
            ))?;
            let answer = connection.expect(channel, |m| {
                matches!(m, Method::BasicGetOk { .. } | Method::BasicGetEmpty)
            })?;
            let message = match answer {
                Method::BasicGetOk { routing_key } => {
                    let (body_size, message_id) = loop {
                        let frame = connection.read_frame()?;
                        if frame.channel != channel {
                            continue;
                        }
                        match frame.payload {
                            Payload::Header {
                                body_size,
                                message_id,
                            } => break (body_size, message_id),
                            other => {
                                return Err(CallError::Protocol(format!(
                                    "expected a content header, got {other:?}"
                                )));
                            }
                        }
                    };
                    if body_size > 64 * 1024 * 1024 {
                        return Err(CallError::Protocol(format!(
                            "message of {body_size} bytes is too large"
                        )));
                    }
                    let mut payload = Vec::with_capacity(body_size as usize);
                    while (payload.len() as u64) < body_size {
                        let frame = connection.read_frame()?;
                        if frame.channel != channel {
                            continue;
                        }
                        match frame.payload {
                            Payload::Body(piece) => payload.extend_from_slice(&piece),
                            other => {
                                return Err(CallError::Protocol(format!(
                                    "expected a content body, got {other:?}"
                                )));
                            }
                        }
                    }
                    Some(BusMessage {
                        routing_key,
                        payload,
                        idempotency_key: message_id,
                    })
                }
                _ => None,
            };
            connection.close_channel(channel)?;
            Ok(message)
        })
    }

    fn delete_exchange(&mut self, exchange: &str, _key: &IdempotencyKey) -> Result<(), PortError> {
        self.with_connection("delete exchange", exchange, |connection, _| {
            connection
                .on_throwaway_channel(
                    |channel| {
                        method_frame(
                            channel,
                            40,
                            20,
                            Args::new().u16(0).short_string(exchange).u8(0),
                        )
                    },
                    |m| matches!(m, Method::ExchangeDeleteOk),
                )
                .map(|_| ())
        })
    }

    fn delete_queue(&mut self, queue: &str, _key: &IdempotencyKey) -> Result<(), PortError> {
        self.with_connection("delete queue", queue, |connection, _| {
            connection
                .on_throwaway_channel(
                    |channel| {
                        method_frame(
                            channel,
                            50,
                            40,
                            Args::new().u16(0).short_string(queue).u8(0),
                        )
                    },
                    |m| matches!(m, Method::QueueDeleteOk),
                )
                .map(|_| ())
        })
    }
}

impl Drop for RabbitMqBus {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.as_mut() {
            let close = Args::new().u16(200).short_string("bye").u16(0).u16(0);
            let _ = connection.send(&method_frame(0, 10, 50, close));
            let _ = connection.expect(0, |m| matches!(m, Method::ConnectionCloseOk));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL_RABBITMQ: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

    #[test]
    fn urls_parse_with_defaults_and_errors_hide_the_password() {
        let address = parse_amqp_url("amqp://u%40x:p%3As@broker:5673/prod").unwrap();
        assert_eq!(
            (address.user.as_str(), address.password.as_str()),
            ("u@x", "p:s")
        );
        assert_eq!(
            (address.host.as_str(), address.port, address.vhost.as_str()),
            ("broker", 5673, "prod")
        );
        let address = parse_amqp_url("amqp://h").unwrap();
        assert_eq!(
            (address.port, address.vhost.as_str(), address.user.as_str()),
            (5672, "/", "guest")
        );
        assert_eq!(parse_amqp_url(LOCAL_RABBITMQ).unwrap().vhost, "/");
        let error = parse_amqp_url("amqp://u:secret@h:notaport/")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("port") && !error.contains("secret"),
            "{error}"
        );
        assert!(!format!("{address:?}").contains("guest:guest"));
    }

    #[test]
    fn rabbitmq_meets_the_event_bus_contract() {
        let mut bus = RabbitMqBus::new(LOCAL_RABBITMQ).unwrap();
        super::super::contract_tests::event_bus_contract(&mut bus);
    }

    #[test]
    fn unreachable_broker_is_a_transient_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut bus = RabbitMqBus::new(&format!("amqp://guest:guest@127.0.0.1:{port}/")).unwrap();
        let exchange = ExchangeSpec {
            name: outpost_proto::name::Name::try_from("x").unwrap(),
            kind: ExchangeKind::Topic,
        };
        let error = bus.check_exchange(&exchange).unwrap_err();
        assert!(error.is_transient(), "{error}");
    }

    /// The seed profile with its exchange and queue renamed `PREFIX-x-…`/`PREFIX-q-…`, unique to
    /// this run (the broker is shared); returns it with the two names.
    fn seed_profile_with_unique_names(
        prefix: &str,
    ) -> (outpost_proto::profile::EnvironmentProfile, String, String) {
        let mut profile = super::super::engine_tests::seed_profile();
        let exchange = super::super::contract_tests::unique(&format!("{prefix}-x"));
        let queue = super::super::contract_tests::unique(&format!("{prefix}-q"));
        let name = |text: &str| outpost_proto::name::Name::try_from(text).unwrap();
        profile.spec.broker.exchanges[0].name = name(&exchange);
        profile.spec.broker.queues[0].name = name(&queue);
        profile.spec.broker.queues[0].dead_letter_exchange = Some(name(&exchange));
        profile.spec.broker.bindings[0].exchange = name(&exchange);
        profile.spec.broker.bindings[0].queue = name(&queue);
        (profile, exchange, queue)
    }

    /// Removes a binding as an operator would: `queue.unbind` on a throwaway channel of its own
    /// connection, outside the adapter.
    fn unbind_by_hand(binding: &BindingSpec) {
        let mut connection = Connection::open(&parse_amqp_url(LOCAL_RABBITMQ).unwrap()).unwrap();
        connection
            .on_throwaway_channel(
                |channel| method_frame(channel, 50, 50, binding_arguments(binding).table(&[])),
                |m| {
                    matches!(
                        m,
                        Method::Other {
                            class: 50,
                            method: 51
                        }
                    )
                },
            )
            .unwrap();
        let close = Args::new().u16(200).short_string("bye").u16(0).u16(0);
        connection.send(&method_frame(0, 10, 50, close)).unwrap();
        connection
            .expect(0, |m| matches!(m, Method::ConnectionCloseOk))
            .unwrap();
    }

    /// Seed case "deleted by hand" for a binding on the real broker: AMQP cannot list bindings,
    /// so the verify re-issues `queue.bind`, and the exchange routes to the queue again.
    #[test]
    fn a_binding_removed_by_hand_on_rabbitmq_is_added_back() {
        use super::super::engine::Outcome;
        use super::super::engine_tests::{Harness, binding_removed_by_hand_comes_back};
        let mut harness = Harness::new();
        harness.adapters.bus = Box::new(RabbitMqBus::new(LOCAL_RABBITMQ).unwrap());
        let (profile, exchange, queue) = seed_profile_with_unique_names("unbind");
        let binding = profile.spec.broker.bindings[0].clone();

        let mut observer = RabbitMqBus::new(LOCAL_RABBITMQ).unwrap();
        let broker =
            binding_removed_by_hand_comes_back(&mut harness, &profile, &mut observer, || {
                unbind_by_hand(&binding)
            });
        // Not observable, so not a step applied: the bind was re-asserted.
        assert_eq!(broker.outcome, Outcome::Unchanged, "{broker:#?}");
        assert!(
            broker
                .message
                .as_deref()
                .is_some_and(|message| message.contains("1 binding(s) re-asserted")),
            "{broker:#?}"
        );

        let cleanup = IdempotencyKey("cleanup".into());
        observer.delete_queue(&queue, &cleanup).unwrap();
        observer.delete_exchange(&exchange, &cleanup).unwrap();
    }

    /// Seed cases against the real broker: created once then no-ops; a queue deleted by hand is
    /// declared and bound again; a differing queue is drift, not a failure.
    #[test]
    fn engine_against_rabbitmq_creates_once_repairs_and_reports_drift() {
        use super::super::engine::{Outcome, UnchangedPolicy};
        use super::super::engine_tests::Harness;
        let mut harness = Harness::new();
        harness.adapters.bus = Box::new(RabbitMqBus::new(LOCAL_RABBITMQ).unwrap());
        let (mut profile, exchange, queue) = seed_profile_with_unique_names("seed");

        let first = harness.run(&profile, UnchangedPolicy::VerifyActual);
        assert_eq!(first.components[1].outcome, Outcome::Applied, "{first:#?}");
        assert_eq!(first.components[1].steps_applied.len(), 3);
        let second = harness.run(&profile, UnchangedPolicy::VerifyActual);
        assert_eq!(
            second.components[1].outcome,
            Outcome::Unchanged,
            "{second:#?}"
        );

        let mut by_hand = RabbitMqBus::new(LOCAL_RABBITMQ).unwrap();
        by_hand
            .delete_queue(&queue, &IdempotencyKey("by-hand".into()))
            .unwrap();
        let repaired = harness.run(&profile, UnchangedPolicy::VerifyActual);
        assert_eq!(repaired.components[1].outcome, Outcome::Applied);
        assert_eq!(
            repaired.components[1].steps_applied.len(),
            2,
            "declare and bind again"
        );
        by_hand
            .publish(
                &exchange,
                "sensor.door",
                b"open",
                &IdempotencyKey("k".into()),
            )
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(message) = by_hand.get(&queue).unwrap() {
                assert_eq!(message.payload, b"open");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the rebound queue got nothing"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        profile.spec.broker.queues[0].message_ttl_ms = Some(1_000);
        let drift = harness.run(&profile, UnchangedPolicy::Skip);
        let broker = &drift.components[1];
        assert_eq!(broker.outcome, Outcome::NeedsAttention, "{broker:#?}");
        assert!(broker.drift[0].contains("x-message-ttl"), "{broker:?}");
        assert_eq!(
            drift.components[2].outcome,
            Outcome::Skipped,
            "the index still ran after the drift"
        );

        by_hand
            .delete_queue(&queue, &IdempotencyKey("cleanup".into()))
            .unwrap();
        by_hand
            .delete_exchange(&exchange, &IdempotencyKey("cleanup".into()))
            .unwrap();
    }
}
