//! The netlink socket: the only I/O of this module. Opens `NETLINK_ROUTE` or `NETLINK_GENERIC`,
//! sends one request at a time with its own sequence number, and reads the answer until the
//! acknowledgement (or `NLMSG_DONE` for a dump), within a deadline. Messages of another
//! sequence (a late answer to an earlier request) are skipped.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    setsockopt, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use super::{MessageBuilder, NetlinkError, Reply, classify, parse_messages};

/// Which netlink bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// rtnetlink: links, addresses, routes.
    Route,
    /// Generic netlink: the WireGuard family.
    Generic,
}

/// Largest datagram read; the kernel's dump messages fit in a page or two.
const RECEIVE_BUFFER_BYTES: usize = 64 * 1024;
/// Most data messages one request may answer (a dump of every route of a busy host).
const ANSWER_MESSAGES_MAX: usize = 100_000;

pub struct NetlinkSocket {
    fd: OwnedFd,
    sequence: u32,
    timeout: Duration,
}

fn socket_error(operation: &'static str, errno: Errno) -> NetlinkError {
    NetlinkError::Socket {
        operation,
        reason: errno.desc().to_string(),
    }
}

impl NetlinkSocket {
    /// Opens a socket on `bus`; every request must be answered within `timeout`.
    pub fn open(bus: Bus, timeout: Duration) -> Result<Self, NetlinkError> {
        let protocol = match bus {
            Bus::Route => SockProtocol::NetlinkRoute,
            Bus::Generic => SockProtocol::NetlinkGeneric,
        };
        let fd = nix::sys::socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .map_err(|errno| socket_error("socket", errno))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|errno| socket_error("bind", errno))?;
        Ok(Self {
            fd,
            // Any start works; a per-process one keeps answers of two sockets apart in traces.
            sequence: std::process::id().wrapping_mul(1000),
            timeout,
        })
    }

    /// Sends `request` and returns the payloads of its data messages: one for a get, many for
    /// a dump, none for a change. A kernel refusal is [`NetlinkError::Kernel`] with its errno.
    pub fn request(&mut self, request: MessageBuilder) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let description = request.description.clone();
        let dump = request.is_dump();
        let mut bytes = request.finish(sequence);
        let sent = sendto(
            self.fd.as_raw_fd(),
            &bytes,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        );
        zeroize::Zeroize::zeroize(&mut bytes);
        sent.map_err(|errno| socket_error("send", errno))?;
        let deadline = Instant::now() + self.timeout;
        let mut answers = Vec::new();
        // A device answer holds the private key: the buffer is wiped when dropped.
        let mut buffer = zeroize::Zeroizing::new(vec![0u8; RECEIVE_BUFFER_BYTES]);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetlinkError::Timeout {
                    request: description,
                    timeout_ms: self.timeout.as_millis(),
                });
            }
            // `microseconds` builds the platform's own `timeval` (32-bit fields on armv7).
            let wait =
                TimeVal::microseconds(i64::try_from(left.as_micros()).unwrap_or(i64::MAX).max(1));
            setsockopt(&self.fd, sockopt::ReceiveTimeout, &wait)
                .map_err(|errno| socket_error("setsockopt SO_RCVTIMEO", errno))?;
            let length = match recv(self.fd.as_raw_fd(), &mut buffer, MsgFlags::empty()) {
                Ok(length) => length,
                Err(Errno::EAGAIN | Errno::EINTR) => continue,
                Err(errno) => return Err(socket_error("recv", errno)),
            };
            for message in parse_messages(&buffer[..length])? {
                if message.sequence != sequence {
                    continue;
                }
                match classify(&message)? {
                    Reply::Data(payload) => {
                        if answers.len() >= ANSWER_MESSAGES_MAX {
                            return Err(NetlinkError::Invalid {
                                what: "answer",
                                reason: format!(
                                    "{description} answered more than {ANSWER_MESSAGES_MAX} messages"
                                ),
                            });
                        }
                        answers.push(payload.to_vec());
                    }
                    Reply::Refused(errno) => return Err(NetlinkError::kernel(&description, errno)),
                    Reply::Ack if !dump => return Ok(answers),
                    Reply::Done if dump => return Ok(answers),
                    Reply::Ack | Reply::Done | Reply::Skip => {}
                }
            }
        }
    }
}
