//! The HTTP/1 fast path: one event loop on its own thread, driving every client connection
//! and every upstream socket as a small state machine over mio (epoll).
//!
//! It serves what nearly all traffic is: HTTP/1.1 requests in origin form whose body is
//! absent or small (up to [`MAX_BUFFERED_BODY`], read whole before forwarding, so that a
//! request may go to another instance with its body intact). Anything else (HTTP/2,
//! HTTP/1.0, `Expect`, upgrades, chunked or large uploads, `CONNECT`, absolute-form targets)
//! is handed, with the bytes read so far, to the hyper path in `run`, which serves that
//! connection from then on. The rules are those of [`crate::proxy`]: the same error mapping,
//! retry policy ([`Attempts`]), ejection, forwarding headers and counters.
//!
//! Response bodies of any size stream through; their framing (length, chunked, until
//! close) is tracked only to know where each response ends.
//!
//! Why not tokio tasks: on loopback three quarters of a request's CPU is the kernel's, the
//! same for any proxy, so the margin over nginx is all in user space. With a task per
//! connection, waking and polling (wakers, readiness bookkeeping, task state) cost about as
//! much as the proxying itself; here an event is a slab lookup and a direct call. The clock
//! is read once per batch of events, and deadlines move without touching the timer heap
//! (see [`Timers`]).
//!
//! # Layout
//!
//! What one event loop owns, and what it shares with the rest of the balancer:
//!
//! - [`event_loop`]: the loop itself ([`Engine`]): its epoll instance, its listener, the slab
//!   of its sockets, accepting, events, timers, shutdown, hand-offs.
//! - [`exchange`]: one client connection's state machine (head, body, attempts, relay).
//! - [`pool`]: the loop's own upstream sockets: dial, check out, check in, idle expiry.
//! - [`buf`]: read buffers and queued writes; [`timers`]: the loop's lazy deadline heap.
//!
//! Shared by every loop, read without locks: [`App`] (routing snapshots, round-robin counters,
//! ejection state, metrics) and the connection cap.

mod buf;
mod event_loop;
mod exchange;
mod pool;
mod timers;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::StatusCode;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use discovery::serve::H2_PREFACE;

use buf::{write_some, IoBuf, Output};
use event_loop::{Engine, Slot};
use exchange::{Client, Failure, State, Step};
use pool::Upstream;
use timers::{TimerState, Timers};

pub use crate::http1::MAX_BUFFERED_BODY;
use crate::http1::{
    encode_local, find_head_end, parse_request, parse_response, BodyEnd, Framing, Parsed,
    ParsedResponse, Request,
};
use crate::proxy::{Attempt, Attempts, Peer, ProxyError};
use crate::service::{Backends, ServiceState};
use crate::upstream::{is_local_resource_error, Backend, InFlight, MAX_IDLE_PER_INSTANCE};
use crate::App;

const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);
/// Buffer space offered to each read of a client's requests (a head grows the buffer further
/// if it needs to). Small, since an idle keep-alive connection keeps its buffers.
const CLIENT_READ_SPACE: usize = 4 * 1024;
/// Buffer space for the first read of a response; reads of a long body that fill it double
/// it, up to [`MAX_READ_SPACE`].
const UPSTREAM_READ_SPACE: usize = 8 * 1024;
const MAX_READ_SPACE: usize = 64 * 1024;
/// How often a paused accept loop (connection cap reached, or accept failing) tries again.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// How often queued requests look for a place freed elsewhere (another loop, the hyper
/// path); a place freed on their own loop is taken at once.
const QUEUE_POLL: Duration = Duration::from_millis(5);

/// A connection the fast path passes to the hyper path.
pub struct Handoff {
    pub stream: std::net::TcpStream,
    /// Bytes read from the client and not served; the hyper path starts with them.
    pub read: BytesMut,
    pub peer: SocketAddr,
    /// The connection-cap slot, held until the connection ends.
    pub permit: OwnedSemaphorePermit,
    /// The client sent the HTTP/2 preface.
    pub http2: bool,
}

#[derive(Default)]
struct Signals {
    stop: AtomicBool,
    abort: AtomicBool,
}

/// The fast path's event loops, as `run` sees them.
pub struct FastPath {
    wakers: Vec<Arc<Waker>>,
    signals: Arc<Signals>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl FastPath {
    /// Starts `loops` event loops (at least one), each on a thread of its own, all accepting
    /// from `listener`. Connections they do not serve go to `handoffs`; each connection holds
    /// one of `permits` while open, whichever loop serves it.
    ///
    /// Each loop has its own copy of the listening socket (a duplicated descriptor in its own
    /// epoll instance), its own sockets, pool and timers; a new connection wakes every loop
    /// and goes to the first to accept it. Routing snapshots and round-robin counters are in
    /// [`App`], shared: rotation stays exact per request across loops.
    pub fn start(
        app: Arc<App>,
        listener: std::net::TcpListener,
        permits: Arc<Semaphore>,
        handoffs: mpsc::UnboundedSender<Handoff>,
        loops: usize,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let signals = Arc::new(Signals::default());
        let mut fast = Self {
            wakers: Vec::new(),
            signals: Arc::clone(&signals),
            threads: Vec::new(),
        };
        let loops = loops.max(1);
        for i in 0..loops {
            let mut listener = TcpListener::from_std(listener.try_clone()?);
            let poll = Poll::new()?;
            poll.registry()
                .register(&mut listener, LISTENER, Interest::READABLE)?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let mut engine = Engine {
                app: Arc::clone(&app),
                poll,
                listener: Some(listener),
                permits: Arc::clone(&permits),
                handoffs: handoffs.clone(),
                signals: Arc::clone(&signals),
                slots: Slab::new(),
                pool: HashMap::new(),
                timers: Timers::default(),
                next_gen: 0,
                clients: 0,
                accept_paused: false,
                stopping: false,
                now: Instant::now(),
                out: Vec::with_capacity(1024),
                queue: std::collections::VecDeque::new(),
                place_freed: false,
                next_queue_poll: Instant::now(),
            };
            let name = if loops == 1 {
                "balancer-fast".to_string()
            } else {
                format!("balancer-fast{i}")
            };
            let spawned = std::thread::Builder::new()
                .name(name)
                .spawn(move || engine.run());
            match spawned {
                Ok(t) => {
                    fast.wakers.push(waker);
                    fast.threads.push(t);
                }
                Err(e) => {
                    // The loops already running are ended by `abort`.
                    fast.abort();
                    return Err(e);
                }
            }
        }
        Ok(fast)
    }

    /// Stops accepting: idle connections close now, busy ones after their response.
    pub fn stop(&self) {
        self.signals.stop.store(true, Ordering::Release);
        self.wake();
    }

    /// Ends every connection at once and waits for the threads.
    pub fn abort(self) {
        self.signals.abort.store(true, Ordering::Release);
        self.wake();
        for t in self.threads {
            let _ = t.join();
        }
    }

    fn wake(&self) {
        for w in &self.wakers {
            if let Err(e) = w.wake() {
                tracing::error!(error = %e, "cannot wake the fast path");
            }
        }
    }
}
