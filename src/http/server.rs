//! The connection loop: what `axum::serve` does, plus the bounds a service on the open internet
//! needs. Each connection gets a header read timeout (a slow-header client cannot hold a socket)
//! and an idle timeout (a connection that moves no byte for that long is closed; event streams
//! send a keep-alive every 15 s, so they stay open while they follow a job). At most
//! `max_connections` are open at once (and never more than the open-file limit allows): when a
//! new connection arrives at the limit, the connection that has been quiet longest is closed to
//! make room, so idle sockets can never lock out a health check or a real client. On shutdown
//! the listener closes, open connections are asked to finish, and whatever is still open after
//! the grace is dropped: the function always returns.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Descriptors kept free for everything but client connections (jobs' pipes, files, git).
const RESERVED_DESCRIPTORS: u64 = 256;

/// The open connections: when each last moved a byte, and how to close it.
#[derive(Default)]
struct Open {
    next_id: u64,
    connections: HashMap<u64, (Arc<AtomicU64>, CancellationToken)>,
}

impl Open {
    /// Closes the connection that has been quiet longest.
    fn shed_quietest(&mut self) {
        let quietest = self
            .connections
            .iter()
            .min_by_key(|(_, (last, _))| last.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        if let Some((_, close)) = quietest.and_then(|id| self.connections.remove(&id)) {
            close.cancel();
        }
    }
}

/// The bounds of the HTTP edge (`HEADER_TIMEOUT_SECS`, `IDLE_TIMEOUT_SECS`, `MAX_CONNECTIONS`,
/// `SHUTDOWN_GRACE_SECS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
}

impl Default for EdgeLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains connections for at most
/// `limits.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: EdgeLimits,
    shutdown: impl Future<Output = ()>,
) {
    let max = effective_max_connections(limits.max_connections);
    let slots = Arc::new(Semaphore::new(max));
    let open = Arc::new(Mutex::new(Open::default()));
    let epoch = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors and the like: wait a moment rather than spin.
                tracing::warn!(error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::warn!(
                    max,
                    "connection limit reached; closing the quietest connection"
                );
                open.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .shed_quietest();
                match tokio::time::timeout(Duration::from_secs(1), slots.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) | Err(_) => {
                        drop(stream);
                        continue;
                    }
                }
            }
        };
        let _ = stream.set_nodelay(true);
        let last = Arc::new(AtomicU64::new(epoch.elapsed().as_millis() as u64));
        let close = CancellationToken::new();
        let id = {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            let id = open.next_id;
            open.next_id += 1;
            open.connections.insert(id, (last.clone(), close.clone()));
            id
        };
        let app = app.clone();
        let limits = limits.clone();
        let stop = stop_rx.clone();
        let open = open.clone();
        connections.spawn(async move {
            let io = Activity {
                inner: stream,
                last,
                epoch,
            };
            tokio::select! {
                _ = serve_connection(io, app, &limits, stop) => {}
                _ = close.cancelled() => tracing::debug!("closed to make room for a new connection"),
            }
            open.lock()
                .unwrap_or_else(|e| e.into_inner())
                .connections
                .remove(&id);
            drop(permit);
        });
    }
    drop(listener);
    stop_tx.send_replace(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            grace_secs = limits.shutdown_grace.as_secs(),
            "closing connections still open after the shutdown grace"
        );
        connections.shutdown().await;
    }
}

/// The connection limit actually applied: the configured one, within what the open-file limit
/// leaves after [`RESERVED_DESCRIPTORS`].
fn effective_max_connections(configured: usize) -> usize {
    let by_descriptors = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft.saturating_sub(RESERVED_DESCRIPTORS).max(16))
        .unwrap_or(u64::MAX);
    configured
        .max(1)
        .min(usize::try_from(by_descriptors).unwrap_or(usize::MAX))
}

async fn serve_connection(
    io: Activity,
    app: Router,
    limits: &EdgeLimits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = io.last.clone();
    let epoch = io.epoch;
    let io = TokioIo::new(io);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // Room above the edge's own limits (see `edge::MAX_HEADERS`), so that a request over
        // them reaches the edge and gets a JSON error rather than hyper's bare one.
        .max_headers(4 * super::edge::MAX_HEADERS)
        .max_buf_size(16 * super::edge::MAX_HEADER_BYTES)
        .writev(true)
        .keep_alive(true);
    // A body must arrive within the header timeout too.
    let app = app.layer(axum::middleware::from_fn_with_state(
        limits.header_timeout,
        super::edge::read_body_within,
    ));
    let connection = builder.serve_connection(io, TowerToHyperService::new(app));
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let last = epoch + Duration::from_millis(activity.load(Ordering::Relaxed));
        let idle_deadline = last + limits.idle_timeout;
        tokio::select! {
            _ = connection.as_mut() => return,
            changed = stop.changed(), if !stopping => {
                if changed.is_ok() {
                    stopping = true;
                    // Finish the request in flight, then close; an idle connection closes now.
                    connection.as_mut().graceful_shutdown();
                }
            }
            _ = tokio::time::sleep_until(idle_deadline) => {
                let last = epoch + Duration::from_millis(activity.load(Ordering::Relaxed));
                if Instant::now() >= last + limits.idle_timeout {
                    tracing::debug!("closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// A socket that records when it last moved a byte (milliseconds after the server's `epoch`).
struct Activity {
    inner: TcpStream,
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        self.last
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

impl AsyncRead for Activity {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        polled
    }
}

impl AsyncWrite for Activity {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    // Vectored writes let hyper queue a body's `Bytes` as they are instead of copying each
    // response into its own buffer: a large patch served to many slow readers stays one copy.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises this process's open-file limit to its hard limit, so that many connections (and the
/// jobs' pipes) do not run out of descriptors at a low default soft limit.
pub fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(err) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %err, soft, hard, "could not raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(err) => tracing::warn!(error = %err, "could not read the open-file limit"),
    }
}
