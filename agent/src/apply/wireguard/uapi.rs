//! The WireGuard cross-platform userspace API (UAPI) spoken over `/var/run/wireguard/IFACE.sock`:
//! a sans-IO encoder and bounded parser (functions over bytes that answer "need more", "done" or
//! "invalid"), and a thin client that puts a deadline on every socket call.
//!
//! Protocol: the client writes `get=1\n\n` or `set=1\n` + `key=value` lines + `\n`; the daemon
//! answers `key=value` lines ending with `errno=N\n\n`. Keys are hex.

use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::cidr::IpCidr;
use super::device::{DeviceUpdate, LiveDevice, LivePeer, PeerChange, PresharedKeyState};
use super::key::{PrivateKey, PublicKey};

/// Largest reply accepted from a daemon.
pub const UAPI_REPLY_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Most peers accepted in one reply.
pub const UAPI_PEERS_MAX: usize = 8192;
/// Most allowed IPs accepted on one peer of a reply.
pub const UAPI_PEER_ALLOWED_IPS_MAX: usize = 4096;

pub const GET_REQUEST: &[u8] = b"get=1\n\n";

/// Result of feeding the bytes received so far to a parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    NeedMore,
    Done(T),
}

/// A reply that is not valid UAPI, or a daemon that answered with an error number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiParseError {
    #[error("uapi reply is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("uapi reply line {line:?} is invalid: {reason}")]
    Malformed { line: String, reason: String },
    #[error("uapi reply ended without errno")]
    NoErrno,
    #[error("the daemon answered errno={errno}")]
    Errno { errno: i64 },
}

fn malformed(line: &str, reason: impl Into<String>) -> UapiParseError {
    UapiParseError::Malformed {
        line: line.chars().take(160).collect(),
        reason: reason.into(),
    }
}

/// The complete message in `buffer` (without its terminating empty line), if there is one.
fn complete_message(buffer: &[u8]) -> Result<Option<&str>, UapiParseError> {
    let end = buffer.windows(2).position(|pair| pair == b"\n\n");
    let Some(end) = end else {
        if buffer.len() > UAPI_REPLY_MAX_BYTES {
            return Err(UapiParseError::TooLarge {
                limit: UAPI_REPLY_MAX_BYTES,
            });
        }
        // A lone "\n" (empty message) is complete too, but only at the very start.
        return Ok((buffer == b"\n").then_some(""));
    };
    if end > UAPI_REPLY_MAX_BYTES {
        return Err(UapiParseError::TooLarge {
            limit: UAPI_REPLY_MAX_BYTES,
        });
    }
    std::str::from_utf8(&buffer[..end])
        .map(Some)
        .map_err(|_| malformed("", "not UTF-8"))
}

fn key_value(line: &str) -> Result<(&str, &str), UapiParseError> {
    line.split_once('=')
        .ok_or_else(|| malformed(line, "no key=value"))
}

fn number<T: std::str::FromStr>(line: &str, value: &str) -> Result<T, UapiParseError> {
    value
        .parse()
        .map_err(|_| malformed(line, "the value is not a number in range"))
}

fn check_errno(line: &str, value: &str) -> Result<(), UapiParseError> {
    let errno: i64 = number(line, value)?;
    if errno == 0 {
        Ok(())
    } else {
        Err(UapiParseError::Errno { errno })
    }
}

/// Parses the reply to `get=1`.
pub fn parse_get_reply(buffer: &[u8]) -> Result<Parsed<LiveDevice>, UapiParseError> {
    let Some(message) = complete_message(buffer)? else {
        return Ok(Parsed::NeedMore);
    };
    let mut device = LiveDevice::default();
    let mut errno_seen = false;
    for line in message.split('\n') {
        let (key, value) = key_value(line)?;
        if errno_seen {
            return Err(malformed(line, "a line after errno"));
        }
        let peer = device.peers.last_mut();
        match (key, peer) {
            ("errno", _) => {
                check_errno(line, value)?;
                errno_seen = true;
            }
            ("public_key", _) => {
                if device.peers.len() >= UAPI_PEERS_MAX {
                    return Err(malformed(line, format!("more than {UAPI_PEERS_MAX} peers")));
                }
                let key = PublicKey::from_hex("public_key", value)
                    .map_err(|error| malformed(line, error.to_string()))?;
                device.peers.push(LivePeer::new(key));
            }
            ("private_key", None) => {
                let key = PrivateKey::from_hex("private_key", value)
                    .map_err(|error| malformed(line, error.to_string()))?;
                device.private_key = (!key.is_zero()).then_some(key);
            }
            // boringtun answers with its public key instead of the private one.
            ("own_public_key", None) => {
                let key = PublicKey::from_hex("own_public_key", value)
                    .map_err(|error| malformed(line, error.to_string()))?;
                device.public_key = Some(key);
            }
            ("listen_port", None) => device.listen_port = number(line, value)?,
            ("fwmark", None) => device.fwmark = number(line, value)?,
            ("preshared_key", Some(peer)) => {
                let key = PrivateKey::from_hex("preshared_key", value)
                    .map_err(|error| malformed(line, error.to_string()))?;
                peer.has_preshared_key = if key.to_bytes() == [0u8; 32] {
                    PresharedKeyState::None
                } else {
                    PresharedKeyState::Set
                };
            }
            ("endpoint", Some(peer)) => {
                let endpoint: SocketAddr = value
                    .parse()
                    .map_err(|_| malformed(line, "the endpoint is not IP:PORT"))?;
                peer.endpoint = Some(endpoint);
            }
            ("allowed_ip", Some(peer)) => {
                if peer.allowed_ips.len() >= UAPI_PEER_ALLOWED_IPS_MAX {
                    return Err(malformed(
                        line,
                        format!("more than {UAPI_PEER_ALLOWED_IPS_MAX} allowed IPs on one peer"),
                    ));
                }
                let network: IpCidr = value
                    .parse()
                    .map_err(|error: super::cidr::CidrParseError| malformed(line, error.reason))?;
                peer.allowed_ips.push(network);
            }
            ("persistent_keepalive_interval", Some(peer)) => {
                peer.persistent_keepalive_secs = number(line, value)?;
            }
            ("last_handshake_time_sec", Some(peer)) => {
                let secs: u64 = number(line, value)?;
                peer.last_handshake_unix_secs = (secs != 0).then_some(secs);
            }
            ("last_handshake_time_nsec", Some(_)) => {
                let _nanos: u64 = number(line, value)?;
            }
            ("rx_bytes", Some(peer)) => peer.rx_bytes = number(line, value)?,
            ("tx_bytes", Some(peer)) => peer.tx_bytes = number(line, value)?,
            // Unknown keys (protocol_version and anything newer daemons add) are ignored.
            _ => {}
        }
    }
    if errno_seen {
        if device.public_key.is_none() {
            device.public_key = device.private_key.as_ref().map(PrivateKey::public_key);
        }
        // Daemons list peers in no particular order; sorted, two reads compare equal.
        device.peers.sort_by_key(|peer| peer.public_key);
        Ok(Parsed::Done(device))
    } else {
        Err(UapiParseError::NoErrno)
    }
}

/// Parses the reply to a `set=1` request: `errno=0` is success.
pub fn parse_set_reply(buffer: &[u8]) -> Result<Parsed<()>, UapiParseError> {
    let Some(message) = complete_message(buffer)? else {
        return Ok(Parsed::NeedMore);
    };
    let mut errno_seen = false;
    for line in message.split('\n') {
        let (key, value) = key_value(line)?;
        if key == "errno" {
            check_errno(line, value)?;
            errno_seen = true;
        }
    }
    if errno_seen {
        Ok(Parsed::Done(()))
    } else {
        Err(UapiParseError::NoErrno)
    }
}

/// Encodes a change request. Each upserted peer is written whole: preshared key cleared,
/// endpoint (when given), keepalive, and its allowed IPs replaced.
pub fn encode_set_request(update: &DeviceUpdate) -> Vec<u8> {
    let mut text = String::from("set=1\n");
    if let Some(key) = &update.private_key {
        let _ = writeln!(text, "private_key={}", key.to_hex());
    }
    if let Some(port) = update.listen_port {
        let _ = writeln!(text, "listen_port={port}");
    }
    for change in &update.peers {
        match change {
            PeerChange::Remove(key) => {
                let _ = writeln!(text, "public_key={}\nremove=true", key.to_hex());
            }
            PeerChange::Upsert(peer) => {
                let _ = writeln!(text, "public_key={}", peer.public_key.to_hex());
                let _ = writeln!(text, "preshared_key={}", "0".repeat(64));
                if let Some(endpoint) = peer.endpoint {
                    let _ = writeln!(text, "endpoint={endpoint}");
                }
                let _ = writeln!(
                    text,
                    "persistent_keepalive_interval={}",
                    peer.persistent_keepalive_secs
                );
                text.push_str("replace_allowed_ips=true\n");
                for network in &peer.allowed_ips {
                    let _ = writeln!(text, "allowed_ip={network}");
                }
            }
        }
    }
    text.push('\n');
    text.into_bytes()
}

/// A socket call that failed, naming the socket.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("cannot connect to uapi socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uapi socket {path} did not answer the {step} within {timeout_ms} ms")]
    Timeout {
        path: PathBuf,
        step: &'static str,
        timeout_ms: u128,
    },
    #[error("uapi socket {path} failed during {step}: {source}")]
    Io {
        path: PathBuf,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("uapi socket {path} closed the connection before the reply ended")]
    Closed { path: PathBuf },
    #[error("uapi socket {path}: {source}")]
    Reply {
        path: PathBuf,
        source: UapiParseError,
    },
    /// The process listening on the socket is not one this client may talk to (another
    /// network namespace's daemon, or not the daemon just started). Nothing was sent to it.
    #[error("uapi socket {path} is served by {listener}, not by {expected}")]
    ForeignListener {
        path: PathBuf,
        /// The listener's pid, when the kernel told it.
        pid: Option<u32>,
        listener: String,
        expected: &'static str,
    },
}

impl UapiError {
    /// The daemon did not answer in time: it is hung.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout { .. })
    }

    /// Nothing listens on the socket (no file, or a stale file left by a dead daemon).
    pub fn is_not_listening(&self) -> bool {
        matches!(self, Self::Connect { source, .. }
            if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused))
    }
}

/// Which process may answer on the socket. The socket folder `/var/run/wireguard` is shared by
/// every network namespace of a host, so a name can be served by another namespace's daemon;
/// the listener is identified by the kernel (`SO_PEERCRED`) on the very connection that then
/// carries the request, so there is no window between the check and the use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerCheck {
    /// Any listener (tests of the client itself).
    Any,
    /// A listener in the calling thread's network namespace. A listener whose namespace cannot
    /// be read counts as foreign.
    SameNetworkNamespace,
    /// Exactly this process (a daemon just started, before it is trusted).
    Pid(u32),
}

/// Talks to one daemon socket; every exchange finishes within `timeout` or fails.
#[derive(Debug, Clone)]
pub struct UapiClient {
    pub socket_path: PathBuf,
    pub timeout: Duration,
    pub listener_check: ListenerCheck,
}

impl UapiClient {
    pub fn new(socket_path: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket_path: socket_path.into(),
            timeout,
            listener_check: ListenerCheck::Any,
        }
    }

    pub fn with_listener_check(mut self, check: ListenerCheck) -> Self {
        self.listener_check = check;
        self
    }

    pub fn get(&self) -> Result<LiveDevice, UapiError> {
        self.exchange(GET_REQUEST, parse_get_reply)
            .map(|(device, _)| device)
    }

    /// `get`, with the pid of the process that answered (when the kernel told it).
    pub fn get_with_listener(&self) -> Result<(LiveDevice, Option<u32>), UapiError> {
        self.exchange(GET_REQUEST, parse_get_reply)
    }

    pub fn set(&self, update: &DeviceUpdate) -> Result<(), UapiError> {
        self.exchange(&encode_set_request(update), parse_set_reply)
            .map(|((), _)| ())
    }

    /// Refuses a listener the check does not allow, before anything is written to it.
    fn check_listener(&self, stream: &UnixStream) -> Result<Option<u32>, UapiError> {
        let pid = listener_pid(stream);
        let refuse = |listener: String, expected: &'static str| UapiError::ForeignListener {
            path: self.socket_path.clone(),
            pid,
            listener,
            expected,
        };
        match (self.listener_check, pid) {
            (ListenerCheck::Any, _) => Ok(pid),
            (ListenerCheck::Pid(expected), Some(actual)) if actual == expected => Ok(pid),
            (ListenerCheck::Pid(_), Some(actual)) => Err(refuse(
                format!("pid {actual}"),
                "the daemon this agent just started",
            )),
            (ListenerCheck::Pid(_), None) => Err(refuse(
                "an unknown process".into(),
                "the daemon this agent just started",
            )),
            (ListenerCheck::SameNetworkNamespace, Some(actual))
                if same_network_namespace(actual) =>
            {
                Ok(pid)
            }
            (ListenerCheck::SameNetworkNamespace, Some(actual)) => Err(refuse(
                format!("pid {actual} of another network namespace"),
                "a daemon of this network namespace",
            )),
            (ListenerCheck::SameNetworkNamespace, None) => Err(refuse(
                "an unknown process".into(),
                "a daemon of this network namespace",
            )),
        }
    }

    fn exchange<T>(
        &self,
        request: &[u8],
        parse: fn(&[u8]) -> Result<Parsed<T>, UapiParseError>,
    ) -> Result<(T, Option<u32>), UapiError> {
        let deadline = Instant::now() + self.timeout;
        let mut stream = connect_with_deadline(&self.socket_path, deadline, self.timeout)?;
        let listener = self.check_listener(&stream)?;
        let path = || self.socket_path.clone();
        let remaining = |step| {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|left| !left.is_zero())
                .ok_or(UapiError::Timeout {
                    path: path(),
                    step,
                    timeout_ms: self.timeout.as_millis(),
                })
        };
        let io_error = |step, source: std::io::Error| {
            if matches!(source.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                UapiError::Timeout {
                    path: path(),
                    step,
                    timeout_ms: self.timeout.as_millis(),
                }
            } else {
                UapiError::Io {
                    path: path(),
                    step,
                    source,
                }
            }
        };
        stream
            .set_write_timeout(Some(remaining("request")?))
            .map_err(|source| io_error("request", source))?;
        stream
            .write_all(request)
            .map_err(|source| io_error("request", source))?;
        let mut received = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            stream
                .set_read_timeout(Some(remaining("reply")?))
                .map_err(|source| io_error("reply", source))?;
            let count = stream
                .read(&mut chunk)
                .map_err(|source| io_error("reply", source))?;
            if count == 0 {
                return Err(UapiError::Closed { path: path() });
            }
            // Only parse once the end marker may have arrived (or the size limit is passed), so
            // a large reply is scanned once, not once per chunk.
            let scan_from = received.len().saturating_sub(1);
            received.extend_from_slice(&chunk[..count]);
            let marker_seen =
                received[scan_from..].windows(2).any(|pair| pair == b"\n\n") || received == b"\n";
            if !marker_seen && received.len() <= UAPI_REPLY_MAX_BYTES {
                continue;
            }
            match parse(&received) {
                Ok(Parsed::NeedMore) => continue,
                Ok(Parsed::Done(value)) => return Ok((value, listener)),
                Err(source) => {
                    return Err(UapiError::Reply {
                        path: path(),
                        source,
                    });
                }
            }
        }
    }
}

/// The pid of the process that listens on the other end of `stream` (`SO_PEERCRED`: the
/// credentials the listener had when it called `listen`).
fn listener_pid(stream: &UnixStream) -> Option<u32> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let credentials = getsockopt(stream, PeerCredentials).ok()?;
    u32::try_from(credentials.pid()).ok().filter(|pid| *pid > 0)
}

/// Whether process `pid` lives in the calling thread's network namespace (a thread may have
/// entered a namespace of its own). Unknown counts as another namespace.
pub fn same_network_namespace(pid: u32) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"));
    let ours = std::fs::read_link("/proc/thread-self/ns/net");
    matches!((theirs, ours), (Ok(theirs), Ok(ours)) if theirs == ours)
}

/// `connect` on a Unix socket blocks when the listener's backlog is full (a hung daemon), so it
/// runs on a helper thread and is abandoned at the deadline; the thread ends once the connect
/// returns (at the latest when the hung daemon is killed).
fn connect_with_deadline(
    path: &Path,
    deadline: Instant,
    timeout: Duration,
) -> Result<UnixStream, UapiError> {
    let (sender, receiver) = mpsc::channel();
    let owned_path = path.to_path_buf();
    thread::Builder::new()
        .name("uapi-connect".into())
        .spawn(move || {
            let _ = sender.send(UnixStream::connect(&owned_path));
        })
        .map_err(|source| UapiError::Io {
            path: path.to_path_buf(),
            step: "connect",
            source,
        })?;
    let left = deadline.saturating_duration_since(Instant::now());
    match receiver.recv_timeout(left) {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(UapiError::Connect {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Err(UapiError::Timeout {
            path: path.to_path_buf(),
            step: "connect",
            timeout_ms: timeout.as_millis(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::PeerConfig;
    use super::*;
    use std::os::unix::net::UnixListener;

    const KEY_A: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const KEY_B: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";

    fn sample_reply() -> String {
        format!(
            "private_key={KEY_A}\nlisten_port=51820\nfwmark=0\n\
             public_key={KEY_B}\npreshared_key={zero}\nprotocol_version=1\n\
             endpoint=[fd00::2]:51821\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=5\n\
             tx_bytes=100\nrx_bytes=200\npersistent_keepalive_interval=25\n\
             allowed_ip=10.232.0.2/32\nallowed_ip=10.99.0.0/24\nerrno=0\n\n",
            zero = "0".repeat(64)
        )
    }

    #[test]
    fn parses_a_full_get_reply() {
        let Parsed::Done(device) = parse_get_reply(sample_reply().as_bytes()).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(device.listen_port, 51820);
        assert_eq!(device.private_key.unwrap().to_hex(), KEY_A);
        let peer = &device.peers[0];
        assert_eq!(peer.public_key.to_hex(), KEY_B);
        assert_eq!(peer.endpoint.unwrap().to_string(), "[fd00::2]:51821");
        assert_eq!(peer.last_handshake_unix_secs, Some(1_700_000_000));
        assert_eq!((peer.rx_bytes, peer.tx_bytes), (200, 100));
        assert_eq!(peer.persistent_keepalive_secs, 25);
        assert_eq!(peer.allowed_ips.len(), 2);
        assert_eq!(peer.has_preshared_key, PresharedKeyState::None);
    }

    #[test]
    fn every_prefix_of_a_reply_needs_more() {
        let reply = sample_reply();
        for end in 0..reply.len() - 1 {
            assert_eq!(
                parse_get_reply(&reply.as_bytes()[..end]).unwrap(),
                Parsed::NeedMore,
                "prefix of {end} bytes"
            );
        }
    }

    #[test]
    fn parses_a_boringtun_reply_that_shows_only_the_public_key() {
        let reply = format!(
            "own_public_key={KEY_A}\nlisten_port=51820\npublic_key={KEY_B}\n\
             persistent_keepalive_interval=25\nendpoint=10.0.0.2:51820\nallowed_ip=10.232.0.2/32\n\
             rx_bytes=0\ntx_bytes=0\nerrno=0\n\n"
        );
        let Parsed::Done(device) = parse_get_reply(reply.as_bytes()).unwrap() else {
            panic!("incomplete")
        };
        assert_eq!(device.private_key, None);
        assert_eq!(device.public_key.unwrap().to_hex(), KEY_A);
        assert_eq!(device.peers[0].last_handshake_unix_secs, None);
        assert_eq!(device.peers[0].has_preshared_key, PresharedKeyState::None);
    }

    #[test]
    fn an_empty_device_and_errors() {
        let Parsed::Done(empty) = parse_get_reply(b"listen_port=0\nerrno=0\n\n").unwrap() else {
            panic!()
        };
        assert_eq!(empty, LiveDevice::default());
        assert_eq!(
            parse_get_reply(b"errno=2\n\n").unwrap_err(),
            UapiParseError::Errno { errno: 2 }
        );
        assert_eq!(
            parse_get_reply(b"listen_port=1\n\n").unwrap_err(),
            UapiParseError::NoErrno
        );
        let bad_lines = [
            "listen_port=99999\nerrno=0\n\n",
            "nonsense\nerrno=0\n\n",
            "public_key=zz\nerrno=0\n\n",
            "errno=0\nlisten_port=1\n\n",
        ];
        for bad in bad_lines {
            let error = parse_get_reply(bad.as_bytes()).unwrap_err();
            assert!(
                matches!(error, UapiParseError::Malformed { .. }),
                "{bad:?}: {error}"
            );
        }
        let endless = vec![b'x'; UAPI_REPLY_MAX_BYTES + 1];
        assert_eq!(
            parse_get_reply(&endless).unwrap_err(),
            UapiParseError::TooLarge {
                limit: UAPI_REPLY_MAX_BYTES
            }
        );
        assert_eq!(parse_set_reply(b"errno=0\n\n").unwrap(), Parsed::Done(()));
        assert_eq!(parse_set_reply(b"errno=0\n").unwrap(), Parsed::NeedMore);
        assert_eq!(
            parse_set_reply(b"errno=22\n\n").unwrap_err(),
            UapiParseError::Errno { errno: 22 }
        );
    }

    #[test]
    fn encodes_a_set_request() {
        let peer_key = PublicKey::from_hex("test", KEY_B).unwrap();
        let update = DeviceUpdate {
            private_key: Some(PrivateKey::from_hex("test", KEY_A).unwrap()),
            listen_port: Some(51820),
            peers: vec![
                PeerChange::Remove(peer_key),
                PeerChange::Upsert(PeerConfig {
                    public_key: peer_key,
                    endpoint: Some("10.231.0.2:51820".parse().unwrap()),
                    allowed_ips: vec!["10.232.0.2/32".parse().unwrap()],
                    persistent_keepalive_secs: 25,
                }),
            ],
        };
        let text = String::from_utf8(encode_set_request(&update)).unwrap();
        let expected = format!(
            "set=1\nprivate_key={KEY_A}\nlisten_port=51820\npublic_key={KEY_B}\nremove=true\n\
             public_key={KEY_B}\npreshared_key={zero}\nendpoint=10.231.0.2:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.232.0.2/32\n\n",
            zero = "0".repeat(64)
        );
        assert_eq!(text, expected);
    }

    proptest::proptest! {
        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_get_reply(&bytes);
            let _ = parse_set_reply(&bytes);
        }

        #[test]
        fn parsers_never_panic_on_line_soup(
            lines in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just("errno=0".to_string()),
                    proptest::strategy::Just(format!("public_key={KEY_B}")),
                    proptest::strategy::Just("allowed_ip=10.0.0.0/8".to_string()),
                    proptest::strategy::Just("endpoint=[::1]:1".to_string()),
                    "[a-z_]{1,12}=[0-9a-f:./\\[\\]]{0,20}",
                ],
                0..12,
            )
        ) {
            let text = format!("{}\n\n", lines.join("\n"));
            let _ = parse_get_reply(text.as_bytes());
        }
    }

    /// A fake daemon on a Unix socket that answers one request with `reply`.
    fn serve_once(path: &Path, reply: Vec<u8>) -> thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        thread::spawn(move || {
            let (mut connection, _) = listener.accept().unwrap();
            let mut request = [0u8; 7];
            connection.read_exact(&mut request).unwrap();
            let _ = connection.write_all(&reply);
        })
    }

    #[test]
    fn client_reads_a_large_reply_and_refuses_an_endless_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut big = String::from("listen_port=1\n");
        for index in 0..2000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&index.to_be_bytes());
            let _ = write!(
                big,
                "public_key={}\nallowed_ip=10.{}.{}.0/24\nrx_bytes={index}\n",
                PublicKey::from_bytes(key).to_hex(),
                index / 256,
                index % 256
            );
        }
        big.push_str("errno=0\n\n");
        let big_path = dir.path().join("big.sock");
        let server = serve_once(&big_path, big.into_bytes());
        let device = UapiClient::new(&big_path, Duration::from_secs(20))
            .get()
            .unwrap();
        assert_eq!(device.peers.len(), 2000);
        server.join().unwrap();

        let endless_path = dir.path().join("endless.sock");
        let server = serve_once(&endless_path, vec![b'a'; UAPI_REPLY_MAX_BYTES + 64 * 1024]);
        let error = UapiClient::new(&endless_path, Duration::from_secs(20))
            .get()
            .unwrap_err();
        assert!(
            matches!(
                &error,
                UapiError::Reply {
                    source: UapiParseError::TooLarge { .. },
                    ..
                }
            ),
            "{error}"
        );
        server.join().unwrap();
    }

    #[test]
    fn a_listener_the_check_does_not_allow_gets_nothing_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checked.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let own_pid = std::process::id();
        // Another pid is expected: refused before the request is written, naming the listener.
        let client = UapiClient::new(&path, Duration::from_secs(2))
            .with_listener_check(ListenerCheck::Pid(own_pid + 1));
        let error = client.get().unwrap_err();
        let UapiError::ForeignListener { pid, .. } = &error else {
            panic!("expected a foreign listener, got {error}");
        };
        assert_eq!(*pid, Some(own_pid));
        assert!(
            error.to_string().contains(&format!("pid {own_pid}")),
            "{error}"
        );
        let (mut refused, _) = listener.accept().unwrap();
        let mut sent = Vec::new();
        refused
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        refused.read_to_end(&mut sent).unwrap();
        assert!(
            sent.is_empty(),
            "the client wrote {sent:?} to a refused listener"
        );
        drop(listener);
        std::fs::remove_file(&path).unwrap();

        // This process is in this thread's network namespace, and it is the expected pid.
        for check in [
            ListenerCheck::SameNetworkNamespace,
            ListenerCheck::Pid(own_pid),
        ] {
            let server = serve_once(&path, b"listen_port=9\nerrno=0\n\n".to_vec());
            let (device, listener_pid) = UapiClient::new(&path, Duration::from_secs(5))
                .with_listener_check(check)
                .get_with_listener()
                .unwrap();
            assert_eq!(device.listen_port, 9);
            assert_eq!(listener_pid, Some(own_pid));
            server.join().unwrap();
            std::fs::remove_file(&path).unwrap();
        }
        assert!(same_network_namespace(own_pid));
        assert!(
            !same_network_namespace(u32::MAX),
            "an unknown pid counts as foreign"
        );
    }

    #[test]
    fn client_times_out_on_a_silent_daemon_and_reads_a_split_reply() {
        let dir = tempfile::tempdir().unwrap();
        let silent_path = dir.path().join("silent.sock");
        let _silent = UnixListener::bind(&silent_path).unwrap(); // never accepts
        let client = UapiClient::new(&silent_path, Duration::from_millis(200));
        let error = client.get().unwrap_err();
        assert!(error.is_timeout(), "{error}");
        assert!(error.to_string().contains("silent.sock"), "{error}");

        let missing = UapiClient::new(dir.path().join("missing.sock"), Duration::from_secs(1));
        assert!(missing.get().unwrap_err().is_not_listening());

        let slow_path = dir.path().join("slow.sock");
        let listener = UnixListener::bind(&slow_path).unwrap();
        let server = thread::spawn(move || {
            let (mut connection, _) = listener.accept().unwrap();
            let mut request = [0u8; 7];
            connection.read_exact(&mut request).unwrap();
            assert_eq!(&request, GET_REQUEST);
            for piece in ["listen_port=7\ner", "rno=0\n", "\n"] {
                connection.write_all(piece.as_bytes()).unwrap();
                thread::sleep(Duration::from_millis(20));
            }
        });
        let device = UapiClient::new(&slow_path, Duration::from_secs(10))
            .get()
            .unwrap();
        assert_eq!(device.listen_port, 7);
        server.join().unwrap();
    }
}
