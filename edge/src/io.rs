//! Small I/O helpers of the proxy: a stream that replays bytes already read (a PROXY header's
//! leftovers, a buffered ClientHello) before reading on, and bounded, deadline-limited reads of
//! a connection's first bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A stream whose first reads return `prefix`.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a bounded read of a connection's first bytes decided.
pub enum Opening<T> {
    Done { value: T, buffered: Vec<u8> },
    Refused(String),
}

/// Reads from `stream` until `decide` over the bytes so far returns a decision, at most
/// `max_bytes` and until `deadline`: a client that sends garbage or trickles bytes (slowloris)
/// is refused with a reason.
pub async fn read_opening<S, T>(
    stream: &mut S,
    max_bytes: usize,
    deadline: Duration,
    what: &str,
    mut decide: impl FnMut(&[u8]) -> Option<Result<T, String>>,
) -> Opening<T>
where
    S: AsyncRead + Unpin,
{
    let mut buffered = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 2048];
        loop {
            if let Some(decision) = decide(&buffered) {
                return decision;
            }
            if buffered.len() >= max_bytes {
                return Err(format!("no complete {what} within {max_bytes} bytes"));
            }
            let room = (max_bytes - buffered.len()).min(chunk.len());
            match stream.read(&mut chunk[..room]).await {
                Ok(0) => return Err(format!("the client closed before a complete {what}")),
                Ok(n) => buffered.extend_from_slice(&chunk[..n]),
                Err(error) => return Err(format!("reading the {what}: {error}")),
            }
        }
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(value)) => Opening::Done { value, buffered },
        Ok(Err(reason)) => Opening::Refused(reason),
        Err(_) => Opening::Refused(format!(
            "no complete {what} within {} ms",
            deadline.as_millis()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn prefixed_streams_replay_then_read_on() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b" world").await.unwrap();
        drop(client);
        let mut stream = Prefixed::new(Bytes::from_static(b"hello"), server);
        let mut all = String::new();
        stream.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world");
    }

    #[tokio::test]
    async fn openings_are_bounded_in_size_and_time() {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(&[b'x'; 100]).await.unwrap();
        let decided = read_opening(&mut server, 50, Duration::from_secs(5), "header", |_| {
            None::<Result<(), String>>
        })
        .await;
        assert!(matches!(decided, Opening::Refused(reason) if reason.contains("50 bytes")));
        let (_client, mut server) = tokio::io::duplex(64);
        let decided = read_opening(&mut server, 50, Duration::from_millis(20), "header", |_| {
            None::<Result<(), String>>
        })
        .await;
        assert!(matches!(decided, Opening::Refused(reason) if reason.contains("within 20 ms")));
    }
}
