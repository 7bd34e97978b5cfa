//! The accept loop: HTTP/1.1 with keep-alive and h2c (hyper-util `auto`), a cap on connections,
//! and a two-step stop (close the listener, then drain connections with a deadline).
//!
//! The service and admin listeners run the same loop, each with its own [`Limits`]: a flood of
//! connections on one cannot take the slots of the other.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use crate::handler::{handle, State, Surface};

/// Most connections served at once on the service port; further clients wait in the listen
/// backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most connections served at once on the admin listener: operators and scripts, a handful at
/// a time.
pub const ADMIN_MAX_CONNECTIONS: usize = 16;
/// A service client must send a complete request head within this time (slowloris guard);
/// it also bounds how long an idle keep-alive connection waits for its next request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The same bound on the admin listener, shorter: `curl` sends its head at once, and an admin
/// connection has no reason to idle.
pub const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after an accept error that is about the process (EMFILE, ENOBUFS), not the peer.
/// Ping interval on HTTP/2 connections with a stream open, and how long a ping may go
/// unanswered.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A running accept loop.
pub struct Server {
    /// Fired once by [`Server::shutdown`]; dropping it stops the loop too.
    stop: oneshot::Sender<()>,
    /// Ends when the listener is closed, handing back what is needed to drain.
    task: JoinHandle<Draining>,
    /// Which listener this is, for the logs.
    surface: Surface,
}

/// What the accept loop leaves behind: the connections still open.
struct Draining {
    /// Tells every open connection to finish (HTTP/1 after the current response, h2 with a
    /// GOAWAY).
    stop: watch::Sender<bool>,
    conns: JoinSet<()>,
}

/// How [`Server::shutdown`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished within the grace period.
    Clean,
    /// The grace period ran out; this many connections were cut.
    Aborted(usize),
}

impl Drained {
    /// Connections cut: 0 for a clean drain.
    pub fn cut(self) -> usize {
        match self {
            Self::Clean => 0,
            Self::Aborted(n) => n,
        }
    }
}

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limits {
    /// Connections served at once.
    max_connections: usize,
    /// Time for the first bytes, each request head, and idling between keep-alive requests.
    header_read_timeout: Duration,
}

impl Limits {
    fn of(surface: Surface) -> Self {
        match surface {
            Surface::Service => Self {
                max_connections: MAX_CONNECTIONS,
                header_read_timeout: HEADER_READ_TIMEOUT,
            },
            Surface::Admin => Self {
                max_connections: ADMIN_MAX_CONNECTIONS,
                header_read_timeout: ADMIN_HEADER_READ_TIMEOUT,
            },
        }
    }
}

impl Server {
    /// Starts accepting on `listener`; each connection is answered by [`handle`] with the
    /// endpoints of `surface`, within that surface's limits.
    pub fn start(listener: TcpListener, state: Arc<State>, surface: Surface) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, state, surface, stopped).in_current_span());
        Self {
            stop,
            task,
            surface,
        }
    }

    /// Closes the listener (new connections are refused from here on), asks open connections
    /// to finish (HTTP/1 after the current response, h2 via GOAWAY) and waits up to `grace`.
    pub async fn shutdown(self, grace: Duration) -> Drained {
        // The loop may already be gone only if it panicked; either way there is nothing to stop.
        let _ = self.stop.send(());
        let Ok(Draining { stop, mut conns }) = self.task.await else {
            tracing::error!(listener = ?self.surface, "the accept loop panicked; nothing left to drain");
            return Drained::Aborted(0);
        };
        tracing::info!(
            listener = ?self.surface,
            open = conns.len(),
            grace = %discovery::duration::format(grace),
            "listener closed; finishing in-flight requests"
        );
        stop.send_replace(true);
        let drained = async { while conns.join_next().await.is_some() {} };
        match tokio::time::timeout(grace, drained).await {
            Ok(()) => Drained::Clean,
            Err(_) => {
                let cut = conns.len();
                conns.shutdown().await;
                Drained::Aborted(cut)
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<State>,
    surface: Surface,
    mut stopped: oneshot::Receiver<()>,
) -> Draining {
    let limits = Limits::of(surface);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper starts the header read timer whenever it waits for a request head, so it also
    // closes keep-alive connections left idle that long.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    // Pings find an HTTP/2 peer that went away while a stream was open (an idle one is
    // closed by `serve_until_idle`).
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(HTTP2_PING_INTERVAL))
        .keep_alive_timeout(HTTP2_PING_INTERVAL);
    // Shared with the connection tasks, which serve only once the protocol is known.
    let builder = Arc::new(builder);
    let (stop, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let limit = Arc::new(Semaphore::new(limits.max_connections));

    loop {
        // Finished connection tasks are reaped here, so the set stays as small as the number
        // of open connections.
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = &mut stopped => break,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                // The semaphore is never closed; if it were, stop accepting rather than spin.
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_peer_error(&e) => {
                    tracing::debug!(error = %e, "accept failed for one connection");
                    continue;
                }
                Err(e) => {
                    // Out of descriptors or buffers: wait for connections to close rather
                    // than spin or die.
                    tracing::error!(error = %e, "accept failed; backing off");
                    tokio::select! {
                        _ = &mut stopped => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let st = state.clone();
        // Open requests (h2 streams), so that a connection idle with none is closed like an
        // idle HTTP/1 keep-alive one.
        let activity = Arc::new(discovery::serve::StreamActivity::default());
        let counted = Arc::clone(&activity);
        let svc = service_fn(move |req| {
            let st = st.clone();
            let stream = counted.open();
            async move {
                let resp = handle(&st, surface, peer, req).await?;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|b| discovery::serve::Tracked::new(b, Some(stream))),
                )
            }
        });
        let builder = Arc::clone(&builder);
        let stop_rx = stop_rx.clone();
        conns.spawn(
            async move {
                // hyper-util reads the first bytes with no deadline; a client that never
                // sends any must not hold a connection slot forever.
                if !discovery::serve::protocol_decided(&stream, limits.header_read_timeout).await {
                    tracing::debug!("no request within the header read timeout; closing");
                    drop(permit);
                    return;
                }
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                let idle = limits.header_read_timeout;
                let served =
                    discovery::serve::serve_until_idle(conn, &activity, idle, stop_rx, |c| {
                        c.graceful_shutdown()
                    });
                if let Err(e) = served.await {
                    // Clients that vanish mid-request are routine; not worth more than debug.
                    tracing::debug!(
                        error = %discovery::error::chain(e.as_ref()),
                        "connection ended with an error"
                    );
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("conn", ?surface, %peer)),
        );
    }
    // Dropping the listener closes the socket: from here on connecting is refused.
    drop(listener);
    Draining { stop, conns }
}

/// Errors that concern one incoming connection only (it was reset before we took it).
fn is_peer_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}
