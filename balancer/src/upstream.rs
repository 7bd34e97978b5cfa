//! Instances as the proxy sees them: address, keep-alive connection pool, passive health
//! (ejection after failed connects) and counters.
//!
//! The pool is our own rather than hyper-util's legacy client because the proxy must know
//! *when* a failure happened: a failed connect sent nothing, so the request may go to the
//! next instance with its body intact; a failure after sending may not be retried blindly.
//! hyper-util's client hides that boundary and consumes the body either way.

use std::net::{SocketAddr, ToSocketAddrs};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use discovery::Instance;

use crate::deadline::LazyTimer;

/// First cool-off after a failed connect; doubles per consecutive failure.
const EJECT_BASE: Duration = Duration::from_secs(1);
/// Longest cool-off.
const EJECT_MAX: Duration = Duration::from_secs(30);
/// Idle connections kept per instance; more than this are closed when returned.
pub(crate) const MAX_IDLE_PER_INSTANCE: usize = 256;

/// Body of a request sent upstream: the client's body, or nothing (also for a retry of a
/// bodiless request, whose original body was consumed by the failed attempt).
pub enum UpBody {
    Incoming(Incoming),
    Empty,
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Incoming(b) => Pin::new(b).poll_frame(cx),
            UpBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Incoming(b) => b.is_end_stream(),
            UpBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Incoming(b) => b.size_hint(),
            UpBody::Empty => SizeHint::with_exact(0),
        }
    }
}

type Sender = http1::SendRequest<UpBody>;

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One instance of a service. Shared by consecutive snapshots while the instance stays
/// (same ID, same address), so counters, ejection state and pooled connections survive
/// discovery updates; dropped (closing its pool) when the instance leaves.
pub struct Backend {
    pub instance: Instance,
    /// `host:port`, also the `Host`-independent connect target.
    pub authority: String,
    pool: Mutex<Vec<Idle>>,
    /// Bumped by [`Backend::clear_pool`]: the fast path's idle sockets from an older epoch
    /// are not reused.
    pool_epoch: AtomicU64,
    /// The connect target, resolved once (see [`Backend::socket_addr`]).
    addr: OnceLock<SocketAddr>,
    idle_timeout: Duration,
    /// Requests answered, by status class 1xx..5xx (index 0..4).
    pub responses: [AtomicU64; 5],
    /// Attempts that failed (connect or transport).
    pub failures: AtomicU64,
    pub ejections: AtomicU64,
    consecutive_connect_failures: AtomicU32,
    /// Requests at the instance now, counted only under `--max-conns-per-instance` (see
    /// [`Backend::try_begin`]).
    in_use: AtomicUsize,
    /// Milliseconds since `epoch` until which the instance is skipped; 0 when not ejected.
    ejected_until_ms: AtomicU64,
    epoch: Instant,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("id", &self.instance.id)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

/// How a connection to an instance could not be had.
#[derive(Debug)]
pub enum ConnectError {
    Timeout,
    Io(std::io::Error),
    Handshake(hyper::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("connect timed out"),
            Self::Io(e) => write!(f, "connect failed: {e}"),
            Self::Handshake(e) => write!(f, "HTTP handshake failed: {e}"),
        }
    }
}

impl ConnectError {
    /// This host ran short (see [`is_local_resource_error`]): not the instance's fault.
    pub fn is_local(&self) -> bool {
        matches!(self, Self::Io(e) if is_local_resource_error(e))
    }
}

/// Whether a socket call failed for want of something on this host (descriptors, buffers,
/// local ports), which says nothing about the instance: it must not be ejected or blamed.
pub fn is_local_resource_error(e: &std::io::Error) -> bool {
    // Linux errno values (libc's EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL).
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    const EADDRNOTAVAIL: i32 = 99;
    matches!(
        e.raw_os_error(),
        Some(EMFILE | ENFILE | ENOBUFS | ENOMEM | EADDRNOTAVAIL)
    )
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Timeout => None,
            Self::Io(e) => Some(e),
            Self::Handshake(e) => Some(e),
        }
    }
}

/// A connection ready to carry one request, and whether it came from the pool (a pooled
/// connection may have been closed by the instance while idle).
pub struct Conn {
    pub sender: Sender,
    pub reused: bool,
}

impl Backend {
    pub fn new(instance: Instance, idle_timeout: Duration, epoch: Instant) -> Self {
        let authority = instance.authority();
        Self {
            instance,
            authority,
            pool: Mutex::new(Vec::new()),
            pool_epoch: AtomicU64::new(0),
            addr: OnceLock::new(),
            idle_timeout,
            responses: Default::default(),
            failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            consecutive_connect_failures: AtomicU32::new(0),
            in_use: AtomicUsize::new(0),
            ejected_until_ms: AtomicU64::new(0),
            epoch,
        }
    }

    fn pool(&self) -> MutexGuard<'_, Vec<Idle>> {
        // The pool holds only connections; a panic elsewhere cannot corrupt it.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether passive health currently skips this instance.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// A connect failed: eject for a cool-off that grows with consecutive failures.
    pub fn record_connect_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let n = self
            .consecutive_connect_failures
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let cool = EJECT_BASE.saturating_mul(1u32 << n.min(5)).min(EJECT_MAX);
        self.ejected_until_ms.store(
            self.now_ms() + cool.as_millis() as u64 + 1,
            Ordering::Relaxed,
        );
        self.ejections.fetch_add(1, Ordering::Relaxed);
        // Pooled connections to an instance that refuses new ones are suspect too.
        self.clear_pool();
    }

    /// A connect succeeded: the instance is back.
    pub fn record_connect_success(&self) {
        if self.consecutive_connect_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_connect_failures
                .store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    pub fn record_status(&self, status: u16) {
        let class = usize::from((status / 100).clamp(1, 5)) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.responses
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// A pooled idle connection, or a new one.
    pub async fn checkout(&self, connect_timeout: Duration) -> Result<Conn, ConnectError> {
        {
            let mut pool = self.pool();
            while let Some(idle) = pool.pop() {
                if idle.sender.is_ready() && idle.since.elapsed() < self.idle_timeout {
                    return Ok(Conn {
                        sender: idle.sender,
                        reused: true,
                    });
                }
            }
        }
        self.connect_fresh(connect_timeout).await
    }

    /// The fast path's pool epoch (see `pool_epoch`).
    pub(crate) fn pool_epoch(&self) -> u64 {
        self.pool_epoch.load(Ordering::Relaxed)
    }

    /// The socket address to connect to. Consul addresses are nearly always IP literals;
    /// a host name is resolved once, on first use, and blocks the caller while it resolves.
    pub fn socket_addr(&self) -> std::io::Result<SocketAddr> {
        if let Some(a) = self.addr.get() {
            return Ok(*a);
        }
        let a = match self.authority.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => self.authority.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the address resolves to nothing",
                )
            })?,
        };
        Ok(*self.addr.get_or_init(|| a))
    }

    /// A place for one more request at this instance, if fewer than `cap` are there now.
    /// The place is given back when the returned guard drops.
    pub fn try_begin(self: &Arc<Self>, cap: usize) -> Option<InFlight> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(Arc::clone(self)))
    }

    /// Requests at the instance now (counted only under `--max-conns-per-instance`).
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// An attempt had no first answer byte within `--first-byte-timeout`: most likely a dead
    /// link or a hung process, so its pooled connections are not trusted either, and it sits
    /// out a cool-off as after a failed connect. Both request paths call this.
    pub fn record_silence(&self, service: &str) {
        self.clear_pool();
        self.record_connect_failure();
        tracing::warn!(%service, instance = %self.instance.id, "no first byte within the first-byte timeout; instance ejected for a cool-off");
    }

    /// Drops every pooled connection (the instance restarted or closed them).
    pub fn clear_pool(&self) {
        self.pool().clear();
        self.pool_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// A new TCP connection to the instance.
    async fn dial(&self, connect_timeout: Duration) -> Result<TcpStream, ConnectError> {
        let stream = match tokio::time::timeout(
            connect_timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        {
            Err(_) => return Err(ConnectError::Timeout),
            Ok(Err(e)) => return Err(ConnectError::Io(e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A new connection, bypassing the pool.
    pub async fn connect_fresh(&self, connect_timeout: Duration) -> Result<Conn, ConnectError> {
        let stream = self.dial(connect_timeout).await?;
        // Flat writes, as on the client side (see `run`).
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let authority = self.authority.clone();
        tokio::spawn(async move {
            // With upgrades, a `101` hands the socket to the tunnel instead of ending here.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %authority, error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn {
            sender,
            reused: false,
        })
    }

    /// Returns a connection whose last response was read to the end.
    fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut pool = self.pool();
        if pool.len() < MAX_IDLE_PER_INSTANCE {
            pool.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// One request's place at an instance under `--max-conns-per-instance`; given back on drop.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Errors of a response body on its way to the client.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The instance sent nothing more of a response body for the whole idle limit.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the instance sent no more of the body for {:?}", self.0)
    }
}

impl std::error::Error for BodyStalled {}

/// An instance's response body on its way to the client. When it has been read to the end,
/// the connection goes back to the instance's pool; if the client goes away first, the
/// connection is dropped (closed), since the rest of the response is still on the wire.
/// An instance that stalls mid-body for `idle` ends the body with [`BodyStalled`], so that
/// neither the client nor the connection waits forever.
pub struct PooledBody {
    inner: Incoming,
    conn: Option<(Sender, Arc<Backend>)>,
    /// Whose answer this is, to count a cut.
    service: Arc<crate::service::ServiceState>,
    idle: Duration,
    /// When the last frame arrived.
    last: tokio::time::Instant,
    /// Made at the first wait only.
    timer: Option<LazyTimer>,
    /// The request's place at the instance (`--max-conns-per-instance`), given back when
    /// the body is done with.
    place: Option<InFlight>,
}

impl PooledBody {
    pub fn new(
        inner: Incoming,
        sender: Sender,
        backend: Arc<Backend>,
        service: Arc<crate::service::ServiceState>,
        idle: Duration,
    ) -> Self {
        let mut body = Self {
            inner,
            conn: Some((sender, backend)),
            service,
            idle,
            last: tokio::time::Instant::now(),
            timer: None,
            place: None,
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    /// Keeps the request's place at the instance until the body is done with.
    pub fn hold(&mut self, place: Option<InFlight>) {
        if !self.inner.is_end_stream() {
            self.place = place;
        }
    }

    fn release(&mut self) {
        self.place = None;
        if let Some((sender, backend)) = self.conn.take() {
            backend.checkin(sender);
        }
    }

    /// Whether the idle limit ran out while waiting (registers the wake-up if not).
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last + self.idle;
        self.timer
            .get_or_insert_with(|| LazyTimer::new(deadline))
            .poll_expired(deadline, cx)
            .is_ready()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => {
                if this.stalled(cx) {
                    // The rest of the response may still come: the connection is not reusable.
                    let instance = this.conn.take().map(|(_, b)| b.instance.id.clone());
                    this.service.metrics.cut.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %this.service.name, instance = instance.as_deref().unwrap_or(""), idle = ?this.idle, "response cut off: the instance sent nothing more of the body for the upstream timeout");
                    return Poll::Ready(Some(Err(Box::new(BodyStalled(this.idle)))));
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            Poll::Ready(Some(Ok(_))) => {}
        }
        this.last = tokio::time::Instant::now();
        polled.map(|f| f.map(|r| r.map_err(BodyError::from)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> Backend {
        Backend::new(
            Instance {
                id: "a".into(),
                service: "web".into(),
                address: "127.0.0.1".into(),
                port: 1,
                tags: vec![],
                meta: Default::default(),
                weights: (1, 1),
            },
            Duration::from_secs(30),
            Instant::now(),
        )
    }

    #[test]
    fn ejection_grows_and_clears() {
        let b = backend();
        assert!(!b.is_ejected());
        b.record_connect_failure();
        assert!(b.is_ejected());
        assert_eq!(b.ejections.load(Ordering::Relaxed), 1);
        b.record_connect_success();
        assert!(!b.is_ejected());
    }

    #[test]
    fn status_classes() {
        let b = backend();
        b.record_status(200);
        b.record_status(204);
        b.record_status(503);
        b.record_status(99);
        assert_eq!(b.responses[1].load(Ordering::Relaxed), 2);
        assert_eq!(b.responses[4].load(Ordering::Relaxed), 1);
        assert_eq!(b.responses[0].load(Ordering::Relaxed), 1);
        assert_eq!(b.requests(), 4);
    }
}
