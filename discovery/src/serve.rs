//! Pieces shared by the HTTP servers of the project (dev agent, worker, balancer).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pause after a failed `accept` (out of file descriptors and the like) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection, with the connection-cap slot it holds; `None` once `shutdown`
/// completes. Waiting for a free slot *before* accepting leaves excess clients in the
/// kernel's listen backlog instead of costing memory here. A failed accept is logged and
/// retried after a short pause: the accept loop never dies of it.
pub async fn accept<F: Future<Output = ()>>(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    shutdown: &mut Pin<&mut F>,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        _ = shutdown.as_mut() => return None,
        p = Arc::clone(permits).acquire_owned() => p.ok()?,
    };
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((permit, stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::select! {
                        _ = shutdown.as_mut() => return None,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
}

/// The first bytes of a prior-knowledge HTTP/2 connection (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// Prior-knowledge HTTP/2 (h2c): the connection starts with the HTTP/2 preface.
    Http2,
}

/// Waits, without consuming anything, until the client's first bytes tell HTTP/1 from the
/// HTTP/2 preface; `None` if that takes longer than `within`. A client that closed or failed
/// counts as HTTP/1: hyper then meets the same end and reports it.
///
/// hyper-util's auto builder reads those bytes with no deadline, and hyper's
/// `header_read_timeout` only starts once the protocol is known: without this bound a client
/// that connects and sends nothing (or part of a preface) would hold a connection slot, and
/// delay a graceful shutdown, forever.
pub async fn detect_protocol(stream: &tokio::net::TcpStream, within: Duration) -> Option<Protocol> {
    let mut buf = [0u8; 24];
    tokio::time::timeout(within, async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n == buf.len() && buf == *H2_PREFACE => return Protocol::Http2,
                Ok(n) if n == 0 || n == buf.len() || buf[..n] != H2_PREFACE[..n] => {
                    return Protocol::Http1
                }
                // Part of a preface: `peek` returns at once while bytes wait unread, so poll
                // (rare: real HTTP/2 clients send the preface in one write).
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return Protocol::Http1,
            }
        }
    })
    .await
    .ok()
}

/// Whether the client's first bytes arrived within `within` (see [`detect_protocol`]).
pub async fn protocol_decided(stream: &tokio::net::TcpStream, within: Duration) -> bool {
    detect_protocol(stream, within).await.is_some()
}

/// The requests (HTTP/2 streams) open on one connection, and since when none is: what lets
/// a server close a connection that sits idle with no stream open, as an HTTP/1 keep-alive
/// connection is closed between requests. hyper's HTTP/2 server has no such limit of its own.
pub struct StreamActivity {
    open: AtomicUsize,
    /// When the count last fell to zero, as milliseconds since `base`.
    idle_since_ms: AtomicU64,
    base: Instant,
    changed: Notify,
}

impl Default for StreamActivity {
    fn default() -> Self {
        Self {
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            base: Instant::now(),
            changed: Notify::new(),
        }
    }
}

impl StreamActivity {
    /// Counts a stream as open until the guard is dropped (with its response body).
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_one();
        StreamGuard(Arc::clone(self))
    }

    /// When the connection will have been idle for `idle`; `None` while a stream is open.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.base + since + idle)
    }
}

/// One open stream of a [`StreamActivity`].
pub struct StreamGuard(Arc<StreamActivity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        a.idle_since_ms.store(ms, Ordering::Release);
        a.open.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_one();
    }
}

/// A response body that keeps its stream counted as open until the body is done with.
pub struct Tracked<B> {
    inner: B,
    _stream: Option<StreamGuard>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, stream: Option<StreamGuard>) -> Self {
        Self {
            inner,
            _stream: stream,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Drives a server connection until it ends, asking it to finish (`graceful`: hyper's
/// `graceful_shutdown`, a GOAWAY on HTTP/2) once no stream has been open for `idle`, or when
/// `stop` turns true. The connection then ends by itself when its open streams are done.
pub async fn serve_until_idle<C, E>(
    conn: C,
    activity: &StreamActivity,
    idle: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    graceful: impl Fn(Pin<&mut C>),
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    loop {
        let deadline = activity.idle_deadline(idle);
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = stop.wait_for(|s| *s) => {
                graceful(conn.as_mut());
                break;
            }
            _ = activity.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                // Still idle? (A stream may have opened and closed since.)
                if activity.idle_deadline(idle).is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!(?idle, "closing a connection idle with no open stream");
                    graceful(conn.as_mut());
                    break;
                }
            }
        }
    }
    conn.await
}
