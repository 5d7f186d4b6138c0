//! The proxy's worker threads: one single-threaded tokio runtime per thread (one per core by
//! default), each serving whole client connections — the client side, its backend connections
//! and their hyper tasks on one thread and one I/O driver — so a proxied request never crosses
//! threads or wakes a parked one. The listeners accept on the main runtime and hand each
//! connection to the next worker in turn; the main runtime keeps the control-plane work (feed,
//! reports, health checks, listeners).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;

/// The worker runtimes, or none: then connections are served on the runtime that accepted them.
#[derive(Default)]
pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` worker threads (at least one), each running its own runtime until the
    /// process exits.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("edge-worker-{index}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// How many worker threads serve connections (0: the accepting runtime does).
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Serves one accepted connection with `serve` on the next worker, its socket registered
    /// with that worker's I/O driver.
    pub fn serve<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let _ = stream.set_nodelay(true);
        if self.handles.is_empty() {
            tokio::spawn(serve(stream));
            return;
        }
        let handle = &self.handles[self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()];
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(
                    component = "workers",
                    action = "hand_over",
                    "could not hand a connection to a worker: {error}"
                );
                return;
            }
        };
        handle.spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::debug!(
                    component = "workers",
                    action = "hand_over",
                    "a worker could not take a connection: {error}"
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_connection_is_served_on_a_worker_thread_and_answered() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.count(), 2);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream.write_all(b"ping").await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        });
        let (stream, _) = listener.accept().await.unwrap();
        workers.serve(stream, |mut stream| async move {
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await.unwrap();
            let thread = std::thread::current().name().unwrap_or("").to_string();
            let answer = format!("{} on {thread}", String::from_utf8_lossy(&ping));
            stream.write_all(answer.as_bytes()).await.unwrap();
        });
        let answer = client.await.unwrap();
        assert!(answer.starts_with("ping on edge-worker-"), "{answer}");
    }
}
