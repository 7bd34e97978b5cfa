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

pub use crate::http1::MAX_BUFFERED_BODY;
use crate::http1::{
    encode_local, find_head_end, parse_request, parse_response, BodyEnd, Framing, Parsed,
    ParsedResponse, Request,
};
use crate::proxy::{Attempt, Attempts, Peer, ProxyError};
use crate::service::{Backends, ServiceState};
use crate::upstream::{is_local_resource_error, Backend, MAX_IDLE_PER_INSTANCE};
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

/// The fast path's thread, as `run` sees it.
pub struct FastPath {
    waker: Arc<Waker>,
    signals: Arc<Signals>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FastPath {
    /// Starts serving `listener` on a new thread. Connections it does not serve go to
    /// `handoffs`; each connection holds one of `permits` while open.
    pub fn start(
        app: Arc<App>,
        listener: std::net::TcpListener,
        permits: Arc<Semaphore>,
        handoffs: mpsc::UnboundedSender<Handoff>,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let signals = Arc::new(Signals::default());
        let now = Instant::now();
        let mut engine = Engine {
            app,
            poll,
            listener: Some(listener),
            permits,
            handoffs,
            signals: Arc::clone(&signals),
            slots: Slab::new(),
            pool: HashMap::new(),
            timers: Timers::default(),
            next_gen: 0,
            clients: 0,
            accept_paused: false,
            stopping: false,
            now,
            out: Vec::with_capacity(1024),
        };
        let thread = std::thread::Builder::new()
            .name("balancer-fast".into())
            .spawn(move || engine.run())?;
        Ok(Self {
            waker,
            signals,
            thread: Some(thread),
        })
    }

    /// Stops accepting: idle connections close now, busy ones after their response.
    pub fn stop(&self) {
        self.signals.stop.store(true, Ordering::Release);
        self.wake();
    }

    /// Ends every connection at once and waits for the thread.
    pub fn abort(mut self) {
        self.signals.abort.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "cannot wake the fast path");
        }
    }
}

/// What a slab entry is. Client and upstream sockets share the slab, so a token names
/// either.
enum Slot {
    Client(Box<Client>),
    /// An upstream socket in use: the socket itself is in the client's [`Exchange`].
    Busy {
        client: usize,
    },
    /// An idle upstream socket in the pool.
    Idle(Upstream),
    /// A client taken out of the slab while it is being driven.
    Driving,
}

/// An upstream socket.
struct Upstream {
    stream: TcpStream,
    key: usize,
    addr: SocketAddr,
    gen: u64,
    /// [`Backend::pool_epoch`] when it was pooled.
    epoch: u64,
    /// Pooled since (while idle).
    since: Instant,
    connected: bool,
    readable: bool,
    writable: bool,
    /// Came from the pool (it may have gone stale while idle).
    reused: bool,
    /// The instance closed its side or the socket failed: not to be pooled.
    eof: bool,
    /// Bytes of the request written.
    written: usize,
    timer: TimerState,
}

/// A client connection.
struct Client {
    stream: TcpStream,
    peer: Peer,
    gen: u64,
    _permit: OwnedSemaphorePermit,
    readable: bool,
    /// The client closed its side (or the socket failed): reads go on until they say so.
    eof: bool,
    /// No request yet: the first bytes may be the HTTP/2 preface.
    first: bool,
    /// Bytes from the client not yet served.
    rbuf: IoBuf,
    /// Bytes at the start of `rbuf` already searched for the end of a request head.
    scanned: usize,
    /// Bytes from the instance.
    ubuf: IoBuf,
    /// The request as it goes to the instance: head, then body.
    req_out: Vec<u8>,
    /// The response head as it goes to the client.
    resp_out: Vec<u8>,
    out: Output,
    state: State,
    /// The request in flight.
    exchange: Option<Exchange>,
    attempts: Option<Attempts>,
    deadline: Instant,
    timer: TimerState,
}

enum State {
    /// Waiting for a request head; idle when `rbuf` is empty.
    Head,
    /// The head is parsed; waiting for the rest of the body.
    Body(Request),
    /// At an instance: connecting, sending, or waiting for the response head.
    Upstream,
    /// Streaming the response body to the client.
    Relay,
    /// Writing out what is queued for the client; then the next request, or close.
    Drain { close: bool },
}

/// A request in flight.
struct Exchange {
    service: Arc<ServiceState>,
    backends: Arc<Backends>,
    is_head: bool,
    replayable: bool,
    /// The client connection closes after this request.
    close: bool,
    started: Instant,
    attempt: Option<Attempt>,
    up: Option<Upstream>,
    last_error: Option<String>,
    relay: Option<Relay>,
}

impl Exchange {
    /// The instance of the current attempt.
    fn backend(&self) -> Option<&Arc<Backend>> {
        self.attempt.as_ref().map(|a| &self.backends.list[a.index])
    }

    /// When the answer must have begun: the first attempt's clock starts with the request.
    fn upstream_deadline(&self, now: Instant, timeout: Duration) -> Instant {
        let first = self.attempt.as_ref().is_some_and(|a| a.first);
        let start = if first { self.started } else { now };
        start + timeout
    }

    /// Remembers why an attempt at `backend` failed, for the 502 if no attempt succeeds.
    fn note_failure(&mut self, backend: &Backend, cause: impl std::fmt::Display) {
        self.last_error = Some(format!("{}: {cause}", backend.authority));
    }

    /// The answer when no attempt succeeded.
    fn all_failed(&mut self) -> ProxyError {
        ProxyError::AllFailed {
            service: self.service.name.clone(),
            last: self.last_error.take(),
        }
    }
}

struct Relay {
    end: BodyEnd,
    framing: Framing,
    /// The upstream socket may carry another request afterwards.
    reusable: bool,
    head_sent: bool,
    space: usize,
}

/// How an attempt at an instance failed (as in [`crate::proxy`]).
enum Failure {
    /// Nothing of the request left: any request may go elsewhere.
    Unsent(String),
    /// The request may have reached the instance; no answer came.
    Sent(String),
    /// The instance answered something that is not an HTTP response.
    Malformed(String),
    Timeout,
}

/// What driving a client came to.
enum Step {
    /// Waiting for a socket event or a deadline.
    Wait,
    Close,
    Handoff {
        http2: bool,
    },
}

impl Client {
    /// Reads more request bytes into `rbuf` if the socket has any. `None`: some came; else
    /// what to do (wait for more, or close on end of stream or error).
    fn read_more(&mut self, space: usize) -> Option<Step> {
        if !self.readable {
            return Some(Step::Wait);
        }
        match self.rbuf.read_from(&mut self.stream, space) {
            Ok((0, _)) => Some(Step::Close),
            Ok((_, drained)) => {
                self.readable = !drained || self.eof;
                None
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                Some(Step::Wait)
            }
            Err(_) => Some(Step::Close),
        }
    }
}

/// A read buffer: `data[start..end]` is unread. `data` stays initialised, so reads need no
/// unsafe code; it grows when a read needs room and is compacted before it grows.
struct IoBuf {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

impl IoBuf {
    fn new() -> Self {
        Self {
            data: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// One read of at least `space` bytes of room. `Ok((n, drained))`: `drained` when the
    /// read did not fill the room, so the kernel had nothing more (a new event comes with
    /// new bytes).
    fn read_from(&mut self, s: &mut TcpStream, space: usize) -> io::Result<(usize, bool)> {
        if self.data.len() - self.end < space {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < space {
                self.data.resize(self.end + space, 0);
            }
        }
        let room = self.data.len() - self.end;
        loop {
            match s.read(&mut self.data[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok((n, n < room));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The client's socket for writing, and what it has not taken yet.
struct Output {
    queued: Vec<u8>,
    pos: usize,
    writable: bool,
}

impl Output {
    fn pending(&self) -> bool {
        self.pos < self.queued.len()
    }

    /// Writes `bytes` after anything queued; what the socket does not take is queued.
    fn send(&mut self, s: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.pending() || !self.writable {
            self.queued.extend_from_slice(bytes);
            return Ok(());
        }
        let n = write_some(s, bytes, &mut self.writable)?;
        if n < bytes.len() {
            self.queued.clear();
            self.pos = 0;
            self.queued.extend_from_slice(&bytes[n..]);
        }
        Ok(())
    }

    /// Writes what is queued. `Ok(true)` when nothing is left.
    fn flush(&mut self, s: &mut TcpStream) -> io::Result<bool> {
        if !self.pending() {
            return Ok(true);
        }
        if self.writable {
            self.pos += write_some(s, &self.queued[self.pos..], &mut self.writable)?;
        }
        if self.pending() {
            return Ok(false);
        }
        self.queued.clear();
        self.pos = 0;
        Ok(true)
    }
}

/// Writes as much of `bytes` as the socket takes; clears `writable` when it takes no more.
fn write_some(s: &mut TcpStream, bytes: &[u8], writable: &mut bool) -> io::Result<usize> {
    let mut n = 0;
    while n < bytes.len() {
        match s.write(&bytes[n..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(w) => n += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A socket's place in the timer heap: the earliest entry it has there, if any.
#[derive(Default, Clone, Copy)]
struct TimerState {
    armed: Option<Instant>,
}

/// Deadlines of every socket in one heap, kept lazily: moving a deadline later (what every
/// request does) changes nothing in the heap; when an entry comes due, its socket's current
/// deadline decides whether it fires or goes back in for the later time.
#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    /// Makes sure the socket at `key` (generation `gen`) is looked at by `deadline`.
    fn arm(&mut self, t: &mut TimerState, deadline: Instant, key: usize, gen: u64) {
        if t.armed.is_none_or(|a| a > deadline) {
            t.armed = Some(deadline);
            self.heap.push(Reverse((deadline, key, gen)));
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next entry due by `now`.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize, u64)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }
}

struct Engine {
    app: Arc<App>,
    poll: Poll,
    listener: Option<TcpListener>,
    permits: Arc<Semaphore>,
    handoffs: mpsc::UnboundedSender<Handoff>,
    signals: Arc<Signals>,
    slots: Slab<Slot>,
    /// Idle upstream sockets by address, most recently used last.
    pool: HashMap<SocketAddr, Vec<usize>>,
    timers: Timers,
    next_gen: u64,
    /// Client connections open here.
    clients: usize,
    /// Not accepting until a connection slot frees or an accept error passes.
    accept_paused: bool,
    stopping: bool,
    /// The time at the start of the current batch of events.
    now: Instant,
    /// Scratch space for local answers.
    out: Vec<u8>,
}

impl Engine {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "fast path: poll failed; closing its connections");
                return;
            }
            self.now = Instant::now();
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => {
                        if self.signals.abort.load(Ordering::Acquire) {
                            return;
                        }
                        if self.signals.stop.load(Ordering::Acquire) {
                            self.begin_stop();
                        }
                    }
                    Token(key) => {
                        let closed = ev.is_read_closed() || ev.is_error();
                        let readable = ev.is_readable() || closed;
                        let writable = ev.is_writable() || ev.is_write_closed() || ev.is_error();
                        self.on_event(key, readable, writable, closed);
                    }
                }
            }
            self.fire_timers();
            if self.accept_paused {
                self.accept();
            }
            if self.stopping && self.clients == 0 {
                return;
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        let mut t = self
            .timers
            .next_due()
            .map(|at| at.saturating_duration_since(Instant::now()));
        if self.accept_paused && !self.stopping {
            t = Some(t.map_or(ACCEPT_RETRY, |t| t.min(ACCEPT_RETRY)));
        }
        t
    }

    fn gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    fn accept(&mut self) {
        self.accept_paused = false;
        while !self.stopping {
            let Some(listener) = &self.listener else {
                return;
            };
            // The slot is taken before accepting: excess clients wait in the kernel's
            // backlog instead of costing memory here.
            let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                self.accept_paused = true;
                return;
            };
            let (mut stream, addr) = match listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    self.accept_paused = true;
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let gen = self.gen();
            let entry = self.slots.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(error = %e, "cannot watch a new connection; closing it");
                continue;
            }
            let deadline = self.now + self.app.config.header_read_timeout;
            let mut client = Box::new(Client {
                stream,
                peer: Peer::new(addr),
                gen,
                _permit: permit,
                readable: false,
                eof: false,
                first: true,
                rbuf: IoBuf::new(),
                scanned: 0,
                ubuf: IoBuf::new(),
                req_out: Vec::new(),
                resp_out: Vec::new(),
                out: Output {
                    queued: Vec::new(),
                    pos: 0,
                    writable: true,
                },
                state: State::Head,
                exchange: None,
                attempts: None,
                deadline,
                timer: TimerState::default(),
            });
            self.timers.arm(&mut client.timer, deadline, key, gen);
            entry.insert(Slot::Client(client));
            self.clients += 1;
            self.app.connections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Shutdown: no more accepting; idle clients close now, the others after their
    /// response (see `step`).
    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let idle: Vec<usize> = self
            .slots
            .iter()
            .filter_map(|(k, s)| match s {
                Slot::Client(c) if matches!(c.state, State::Head) && c.rbuf.is_empty() => Some(k),
                _ => None,
            })
            .collect();
        for k in idle {
            if let Slot::Client(c) = self.slots.remove(k) {
                self.close_client(c);
            }
        }
    }

    fn on_event(&mut self, key: usize, readable: bool, writable: bool, closed: bool) {
        let client = match self.slots.get_mut(key) {
            Some(Slot::Client(c)) => {
                c.readable |= readable;
                c.eof |= closed;
                c.out.writable |= writable;
                key
            }
            Some(Slot::Busy { client }) => {
                let client = *client;
                if let Some(Slot::Client(c)) = self.slots.get_mut(client) {
                    if let Some(up) = c.exchange.as_mut().and_then(|x| x.up.as_mut()) {
                        if up.key == key {
                            up.readable |= readable;
                            up.writable |= writable;
                            up.eof |= closed;
                        }
                    }
                }
                client
            }
            Some(Slot::Idle(_)) => {
                // An idle upstream socket has nothing to say: the instance closed it, or
                // sent bytes no request asked for. Either way it is done.
                if readable {
                    self.drop_idle(key);
                }
                return;
            }
            Some(Slot::Driving) | None => return,
        };
        self.drive(client, false);
    }

    fn fire_timers(&mut self) {
        while let Some((at, key, gen)) = self.timers.pop_due(self.now) {
            match self.slots.get_mut(key) {
                Some(Slot::Client(c)) if c.gen == gen && c.timer.armed == Some(at) => {
                    c.timer.armed = None;
                    if c.deadline <= self.now {
                        self.drive(key, true);
                    } else {
                        let d = c.deadline;
                        self.timers.arm(&mut c.timer, d, key, gen);
                    }
                }
                Some(Slot::Idle(u)) if u.gen == gen && u.timer.armed == Some(at) => {
                    u.timer.armed = None;
                    let expires = u.since + self.app.config.pool_idle_timeout;
                    if expires <= self.now {
                        self.drop_idle(key);
                    } else {
                        self.timers.arm(&mut u.timer, expires, key, gen);
                    }
                }
                _ => {}
            }
        }
    }

    /// Runs client `key`'s state machine as far as it goes; `timed_out` when its deadline
    /// passed.
    fn drive(&mut self, key: usize, timed_out: bool) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let Slot::Client(mut c) = std::mem::replace(slot, Slot::Driving) else {
            return;
        };
        let early = if timed_out {
            self.on_timeout(key, &mut c)
        } else {
            None
        };
        let step = match early {
            Some(s) => s,
            None => self.step(key, &mut c),
        };
        match step {
            Step::Wait => {
                let (d, gen) = (c.deadline, c.gen);
                self.timers.arm(&mut c.timer, d, key, gen);
                self.slots[key] = Slot::Client(c);
            }
            Step::Close => {
                self.slots.remove(key);
                self.close_client(c);
            }
            Step::Handoff { http2 } => {
                self.slots.remove(key);
                self.handoff(c, http2);
            }
        }
    }

    fn close_client(&mut self, mut c: Box<Client>) {
        if let Some(x) = c.exchange.take() {
            if let Some(up) = x.up {
                self.close_upstream(up);
            }
        }
        let _ = self.poll.registry().deregister(&mut c.stream);
        let _ = c.stream.shutdown(Shutdown::Write);
        self.clients -= 1;
        self.app.connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn handoff(&mut self, mut c: Box<Client>, http2: bool) {
        let _ = self.poll.registry().deregister(&mut c.stream);
        self.clients -= 1;
        if self.stopping {
            // The hyper side drains already; the client will retry elsewhere.
            self.app.connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let Client {
            stream,
            peer,
            _permit,
            rbuf,
            ..
        } = *c;
        let h = Handoff {
            stream: stream.into(),
            read: BytesMut::from(rbuf.bytes()),
            peer: peer.addr,
            permit: _permit,
            http2,
        };
        if self.handoffs.send(h).is_err() {
            self.app.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// `None`: the state changed; drive on.
    fn on_timeout(&mut self, key: usize, c: &mut Client) -> Option<Step> {
        match c.state {
            State::Head | State::Body(_) => {
                if !c.rbuf.is_empty() {
                    tracing::debug!(peer = %c.peer.addr, "request head not complete within the header read timeout");
                }
                Some(Step::Close)
            }
            State::Upstream => {
                let connecting = c
                    .exchange
                    .as_ref()
                    .and_then(|x| x.up.as_ref())
                    .is_some_and(|u| !u.connected);
                if connecting {
                    self.connect_failed(c, "connect timed out".into());
                    self.next_attempt(key, c)
                } else {
                    self.attempt_failed(key, c, Failure::Timeout)
                }
            }
            State::Relay => {
                if let Some(x) = &c.exchange {
                    x.service.metrics.cut.fetch_add(1, Ordering::Relaxed);
                    let instance = x.backend().map(|b| b.instance.id.as_str()).unwrap_or("");
                    tracing::warn!(service = %x.service.name, %instance, peer = %c.peer.addr, timeout = ?self.app.config.upstream_timeout, "response cut off: nothing moved for the upstream timeout");
                }
                Some(Step::Close)
            }
            State::Drain { .. } => {
                tracing::debug!(peer = %c.peer.addr, "client took no answer for the upstream timeout; closing");
                Some(Step::Close)
            }
        }
    }

    /// Runs the state machine until it must wait.
    fn step(&mut self, key: usize, c: &mut Client) -> Step {
        loop {
            let next = match &c.state {
                State::Head => self.read_head(c),
                State::Body(_) => self.read_body(key, c),
                State::Upstream => self.at_upstream(key, c),
                State::Relay => self.relay(c),
                State::Drain { close } => {
                    let close = *close;
                    match c.out.flush(&mut c.stream) {
                        Err(_) => return Step::Close,
                        Ok(false) => return Step::Wait,
                        Ok(true) if close || self.stopping => return Step::Close,
                        Ok(true) => {
                            c.state = State::Head;
                            c.deadline = self.now + self.app.config.header_read_timeout;
                            None
                        }
                    }
                }
            };
            if let Some(step) = next {
                return step;
            }
        }
    }

    /// `None`: the state changed; go on.
    fn read_head(&mut self, c: &mut Client) -> Option<Step> {
        loop {
            if !c.rbuf.is_empty() {
                if c.first {
                    let b = c.rbuf.bytes();
                    let n = b.len().min(H2_PREFACE.len());
                    if b[..n] == H2_PREFACE[..n] {
                        if n == H2_PREFACE.len() {
                            return Some(Step::Handoff { http2: true });
                        }
                        // Part of a preface: wait for the rest.
                    } else {
                        c.first = false;
                    }
                }
                if !c.first {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2).
                    while c.rbuf.bytes().starts_with(b"\r\n") {
                        c.rbuf.consume(2);
                        c.scanned = c.scanned.saturating_sub(2);
                    }
                    match find_head_end(c.rbuf.bytes(), c.scanned) {
                        Err(()) => return self.reject(c, StatusCode::BAD_REQUEST),
                        Ok(None) => {
                            // The last byte may be the CR of a line end still to come.
                            c.scanned = c.rbuf.len().saturating_sub(1);
                            if c.rbuf.len() >= self.app.config.max_header_bytes {
                                return self.reject(c, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                            }
                        }
                        Ok(Some(_)) => {
                            c.scanned = 0;
                            let parsed =
                                parse_request(c.rbuf.bytes(), &self.app, &c.peer, &mut c.req_out);
                            match parsed {
                                Parsed::Request(req) => {
                                    c.deadline = self.now + self.app.config.header_read_timeout;
                                    c.state = State::Body(req);
                                    return None;
                                }
                                // The head is complete, so httparse must see all of it.
                                Parsed::Partial => return self.reject(c, StatusCode::BAD_REQUEST),
                                Parsed::Handoff => return Some(Step::Handoff { http2: false }),
                                Parsed::Reject(status) => return self.reject(c, status),
                            }
                        }
                    }
                }
            } else if self.stopping {
                return Some(Step::Close);
            }
            if let Some(step) = c.read_more(CLIENT_READ_SPACE) {
                return Some(step);
            }
        }
    }

    fn read_body(&mut self, key: usize, c: &mut Client) -> Option<Step> {
        let State::Body(req) = &c.state else {
            return None;
        };
        let msg_len = req.head_len + req.body_len;
        while c.rbuf.len() < msg_len {
            if let Some(step) = c.read_more(msg_len - c.rbuf.len()) {
                return Some(step);
            }
        }
        let State::Body(req) = std::mem::replace(&mut c.state, State::Upstream) else {
            return None;
        };
        c.req_out
            .extend_from_slice(&c.rbuf.bytes()[req.head_len..msg_len]);
        c.rbuf.consume(msg_len);
        self.start(key, c, &req)
    }

    /// Starts proxying a request whose head and body are in `req_out`.
    fn start(&mut self, key: usize, c: &mut Client, req: &Request) -> Option<Step> {
        let app = Arc::clone(&self.app);
        let close = req.close || self.stopping;
        let Some(service) = req.route.clone() else {
            app.no_route.fetch_add(1, Ordering::Relaxed);
            return self.answer_local(c, &ProxyError::NoRoute, req.is_head, close);
        };
        let backends = service.backends();
        if backends.list.is_empty() {
            let e = ProxyError::NoHealthyInstance {
                service: service.name.clone(),
            };
            service.metrics.latency.observe(Duration::ZERO);
            e.report(&service);
            return self.answer_local(c, &e, req.is_head, close);
        }
        match &mut c.attempts {
            Some(a) => a.reset(&backends, app.config.retries),
            None => c.attempts = Some(Attempts::new(&backends, app.config.retries)),
        }
        c.exchange = Some(Exchange {
            service,
            backends,
            is_head: req.is_head,
            replayable: req.replayable,
            close,
            started: self.now,
            attempt: None,
            up: None,
            last_error: None,
            relay: None,
        });
        self.next_attempt(key, c)
    }

    /// Picks the next instance and gets a socket to it, pooled or new.
    fn next_attempt(&mut self, key: usize, c: &mut Client) -> Option<Step> {
        let cfg = &self.app.config;
        let (connect_timeout, upstream_timeout) = (cfg.connect_timeout, cfg.upstream_timeout);
        loop {
            let (Some(x), Some(attempts)) = (c.exchange.as_mut(), c.attempts.as_mut()) else {
                return Some(Step::Close);
            };
            let Some(attempt) = attempts.next(&x.service, &x.backends) else {
                let e = x.all_failed();
                return self.fail(c, &e);
            };
            let backend = Arc::clone(&x.backends.list[attempt.index]);
            let fresh = attempt.fresh;
            x.attempt = Some(attempt);
            let addr = match backend.socket_addr() {
                Ok(a) => a,
                Err(e) => {
                    self.connect_failed(c, format!("cannot resolve: {e}"));
                    continue;
                }
            };
            let pooled = if fresh {
                None
            } else {
                self.checkout(addr, backend.pool_epoch(), key)
            };
            let up = match pooled {
                Some(up) => up,
                None => match self.connect(addr, key) {
                    Ok(up) => up,
                    Err(e) if is_local_resource_error(&e) => {
                        let e = ProxyError::LocalResources {
                            cause: e.to_string(),
                        };
                        return self.fail(c, &e);
                    }
                    Err(e) => {
                        self.connect_failed(c, format!("connect failed: {e}"));
                        continue;
                    }
                },
            };
            let Some(x) = c.exchange.as_mut() else {
                return Some(Step::Close);
            };
            c.deadline = if up.connected {
                x.upstream_deadline(self.now, upstream_timeout)
            } else {
                self.now + connect_timeout
            };
            x.up = Some(up);
            c.ubuf.clear();
            c.state = State::Upstream;
            return None;
        }
    }

    /// A connect failed: the instance is ejected for a cool-off, the request is intact for
    /// the next one.
    fn connect_failed(&mut self, c: &mut Client, cause: String) {
        let Some(x) = c.exchange.as_mut() else { return };
        if let Some(up) = x.up.take() {
            self.close_upstream(up);
        }
        let Some(backend) = x.backend().cloned() else {
            return;
        };
        backend.record_connect_failure();
        tracing::warn!(service = %x.service.name, instance = %backend.instance.id, addr = %backend.authority, error = %cause, "connect failed; instance ejected for a cool-off");
        x.note_failure(&backend, cause);
    }

    /// Connecting, sending, or reading the response head. `None`: progress; drive on.
    fn at_upstream(&mut self, key: usize, c: &mut Client) -> Option<Step> {
        let max_header_bytes = self.app.config.max_header_bytes;
        let Some(x) = c.exchange.as_mut() else {
            return Some(Step::Close);
        };
        let Some(up) = x.up.as_mut() else {
            return Some(Step::Close);
        };
        if !up.connected {
            if !up.writable {
                return Some(Step::Wait);
            }
            match up.stream.take_error() {
                Ok(Some(e)) | Err(e) => {
                    self.connect_failed(c, format!("connect failed: {e}"));
                    return self.next_attempt(key, c);
                }
                Ok(None) => {}
            }
            match up.stream.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    up.writable = false;
                    return Some(Step::Wait);
                }
                Err(e) => {
                    self.connect_failed(c, format!("connect failed: {e}"));
                    return self.next_attempt(key, c);
                }
            }
            up.connected = true;
            if let Some(b) = x.backend() {
                b.record_connect_success();
            }
            c.deadline = x.upstream_deadline(self.now, self.app.config.upstream_timeout);
            // Connected: the step loop comes back here to send.
            return None;
        }
        while up.written < c.req_out.len() {
            if !up.writable {
                return Some(Step::Wait);
            }
            match write_some(&mut up.stream, &c.req_out[up.written..], &mut up.writable) {
                Ok(n) => up.written += n,
                Err(e) if up.written == 0 => {
                    return self.attempt_failed(key, c, Failure::Unsent(e.to_string()))
                }
                Err(e) => return self.attempt_failed(key, c, Failure::Sent(e.to_string())),
            }
        }
        loop {
            if !c.ubuf.is_empty() {
                let parsed = parse_response(c.ubuf.bytes(), x.is_head, x.close, &mut c.resp_out);
                match parsed {
                    Ok(ParsedResponse::Response(r)) => {
                        c.ubuf.consume(r.head_len);
                        let Some(backend) = x.backend() else {
                            return Some(Step::Close);
                        };
                        backend.record_status(r.status);
                        x.service
                            .metrics
                            .latency
                            .observe(self.now.saturating_duration_since(x.started));
                        x.relay = Some(Relay {
                            end: BodyEnd::new(r.framing),
                            framing: r.framing,
                            reusable: r.keep_alive,
                            head_sent: false,
                            space: UPSTREAM_READ_SPACE,
                        });
                        c.deadline = self.now + self.app.config.upstream_timeout;
                        c.state = State::Relay;
                        return None;
                    }
                    Ok(ParsedResponse::Informational(n)) => {
                        c.ubuf.consume(n);
                        continue;
                    }
                    Ok(ParsedResponse::Partial) => {}
                    Err(cause) => {
                        return self.attempt_failed(key, c, Failure::Malformed(cause.into()))
                    }
                }
                if c.ubuf.len() >= max_header_bytes {
                    let f = Failure::Malformed("response head too large".into());
                    return self.attempt_failed(key, c, f);
                }
            }
            if !up.readable {
                return Some(Step::Wait);
            }
            let empty = c.ubuf.is_empty();
            match c.ubuf.read_from(&mut up.stream, UPSTREAM_READ_SPACE) {
                Ok((0, _)) if empty => {
                    let f = Failure::Sent("the connection closed before an answer".into());
                    return self.attempt_failed(key, c, f);
                }
                Ok((0, _)) => {
                    let f = Failure::Malformed("the connection closed mid-head".into());
                    return self.attempt_failed(key, c, f);
                }
                Ok((_, drained)) => up.readable = !drained || up.eof,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    up.readable = false;
                    return Some(Step::Wait);
                }
                Err(e) if empty => {
                    return self.attempt_failed(key, c, Failure::Sent(e.to_string()))
                }
                Err(e) => return self.attempt_failed(key, c, Failure::Malformed(e.to_string())),
            }
        }
    }

    /// An attempt failed after connecting: the next one where the rules allow, else an
    /// error answer.
    fn attempt_failed(&mut self, key: usize, c: &mut Client, failure: Failure) -> Option<Step> {
        let Some(x) = c.exchange.as_mut() else {
            return Some(Step::Close);
        };
        let reused = x.up.as_ref().is_some_and(|u| u.reused);
        if let Some(up) = x.up.take() {
            self.close_upstream(up);
        }
        let (Some(backend), Some(attempts)) = (x.backend().cloned(), c.attempts.as_mut()) else {
            return Some(Step::Close);
        };
        let Some(attempt) = x.attempt.take() else {
            return Some(Step::Close);
        };
        backend.failures.fetch_add(1, Ordering::Relaxed);
        let cause = match failure {
            Failure::Timeout => {
                let e = ProxyError::Timeout {
                    service: x.service.name.clone(),
                    instance: backend.instance.id.clone(),
                };
                return self.fail(c, &e);
            }
            Failure::Unsent(e) => {
                x.note_failure(&backend, e);
                attempts.unsent(&backend, &attempt, reused);
                return self.next_attempt(key, c);
            }
            Failure::Malformed(cause) => {
                // The instance answered, but not in HTTP: no retry, like any answer.
                x.note_failure(&backend, cause);
                let e = x.all_failed();
                return self.fail(c, &e);
            }
            Failure::Sent(cause) => cause,
        };
        x.note_failure(&backend, &cause);
        if attempts.may_resend(x.replayable, &backend, &attempt, reused) {
            tracing::debug!(service = %x.service.name, instance = %backend.instance.id, %cause, "retrying an idempotent request");
            return self.next_attempt(key, c);
        }
        let e = x.all_failed();
        self.fail(c, &e)
    }

    /// Ends the request in flight with an error answer.
    fn fail(&mut self, c: &mut Client, e: &ProxyError) -> Option<Step> {
        let Some(x) = c.exchange.take() else {
            return Some(Step::Close);
        };
        if let Some(up) = x.up {
            self.close_upstream(up);
        }
        x.service
            .metrics
            .latency
            .observe(self.now.saturating_duration_since(x.started));
        e.report(&x.service);
        self.answer_local(c, e, x.is_head, x.close)
    }

    /// Answers from the balancer itself (404, 502, 503, 504).
    fn answer_local(
        &mut self,
        c: &mut Client,
        e: &ProxyError,
        is_head: bool,
        close: bool,
    ) -> Option<Step> {
        let (status, body) = e.status_and_body();
        encode_local(&mut self.out, status, &body, close, !is_head);
        if c.out.send(&mut c.stream, &self.out).is_err() {
            return Some(Step::Close);
        }
        c.deadline = self.now + self.app.config.upstream_timeout;
        c.state = State::Drain { close };
        None
    }

    /// Answers a request that cannot be parsed or is too large, then closes.
    fn reject(&mut self, c: &mut Client, status: StatusCode) -> Option<Step> {
        tracing::debug!(peer = %c.peer.addr, %status, "rejecting a client request");
        encode_local(&mut self.out, status, "", true, false);
        if c.out.send(&mut c.stream, &self.out).is_err() {
            return Some(Step::Close);
        }
        c.deadline = self.now + self.app.config.upstream_timeout;
        c.state = State::Drain { close: true };
        None
    }

    /// Streams the response body. `None`: the state changed.
    fn relay(&mut self, c: &mut Client) -> Option<Step> {
        let timeout = self.app.config.upstream_timeout;
        loop {
            match c.out.flush(&mut c.stream) {
                Err(_) => return Some(Step::Close),
                Ok(false) => return Some(Step::Wait),
                Ok(true) => {}
            }
            let Some(x) = c.exchange.as_mut() else {
                return Some(Step::Close);
            };
            let Some(relay) = x.relay.as_mut() else {
                return Some(Step::Close);
            };
            let (take, complete, broken) = match relay.end.feed(c.ubuf.bytes()) {
                Ok((take, complete)) => (take, complete, false),
                Err(e) => {
                    tracing::debug!(error = %e, "bad response body framing");
                    (c.ubuf.len(), false, true)
                }
            };
            if complete && take < c.ubuf.len() {
                // Bytes after the end of the response: the instance is out of step.
                relay.reusable = false;
            }
            // The head and the first body bytes go out in one write.
            let sent = if !relay.head_sent {
                relay.head_sent = true;
                c.resp_out.extend_from_slice(&c.ubuf.bytes()[..take]);
                c.out.send(&mut c.stream, &c.resp_out)
            } else {
                c.out.send(&mut c.stream, &c.ubuf.bytes()[..take])
            };
            c.ubuf.consume(take);
            if complete {
                let reusable = relay.reusable;
                let close = x.close;
                if let Some(up) = x.up.take() {
                    if reusable {
                        // Read exactly to its end: clean, whatever the client does next.
                        let epoch = x.backend().map_or(0, |b| b.pool_epoch());
                        self.checkin(up, epoch);
                    } else {
                        self.close_upstream(up);
                    }
                }
                c.exchange = None;
                c.ubuf.clear();
                if sent.is_err() {
                    return Some(Step::Close);
                }
                c.deadline = self.now + timeout;
                c.state = State::Drain { close };
                return None;
            }
            if broken || sent.is_err() {
                return Some(Step::Close);
            }
            if c.out.pending() {
                // The client is slower than the instance: read on once it catches up.
                return Some(Step::Wait);
            }
            let Some(up) = x.up.as_mut() else {
                return Some(Step::Close);
            };
            if !up.readable {
                return Some(Step::Wait);
            }
            match c.ubuf.read_from(&mut up.stream, relay.space) {
                // The end of a close-delimited body; the client was told to close.
                Ok((0, _)) if relay.framing == Framing::Close => {
                    if let Some(up) = x.up.take() {
                        self.close_upstream(up);
                    }
                    c.exchange = None;
                    c.state = State::Drain { close: true };
                    return None;
                }
                Ok((0, _)) => {
                    // The instance stopped mid-body: the client can only see a cut answer.
                    tracing::debug!("response body cut off by the instance");
                    return Some(Step::Close);
                }
                Ok((n, drained)) => {
                    up.readable = !drained || up.eof;
                    if n >= relay.space && relay.space < MAX_READ_SPACE {
                        relay.space *= 2;
                    }
                    c.deadline = self.now + timeout;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    up.readable = false;
                    return Some(Step::Wait);
                }
                Err(_) => return Some(Step::Close),
            }
        }
    }

    /// A new socket to `addr`, owned by client `client`.
    fn connect(&mut self, addr: SocketAddr, client: usize) -> io::Result<Upstream> {
        let mut stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let gen = self.gen();
        let key = self.slots.insert(Slot::Busy { client });
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.slots.remove(key);
            return Err(e);
        }
        Ok(Upstream {
            stream,
            key,
            addr,
            gen,
            epoch: 0,
            since: self.now,
            connected: false,
            readable: false,
            writable: false,
            reused: false,
            eof: false,
            written: 0,
            timer: TimerState::default(),
        })
    }

    /// The most recently pooled live socket to `addr`, now owned by client `client`.
    fn checkout(&mut self, addr: SocketAddr, epoch: u64, client: usize) -> Option<Upstream> {
        let idle_timeout = self.app.config.pool_idle_timeout;
        loop {
            let key = self.pool.get_mut(&addr)?.pop()?;
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            let Slot::Idle(_) = slot else { continue };
            let Slot::Idle(mut up) = std::mem::replace(slot, Slot::Busy { client }) else {
                continue;
            };
            if up.epoch != epoch || self.now.saturating_duration_since(up.since) >= idle_timeout {
                self.close_upstream(up);
                continue;
            }
            up.reused = true;
            up.written = 0;
            // Idle, it had nothing to read (an event would have retired it), and may write.
            up.readable = false;
            up.writable = true;
            return Some(up);
        }
    }

    /// Pools a socket whose last response was read exactly to its end.
    /// `epoch` is the instance's [`Backend::pool_epoch`] now.
    fn checkin(&mut self, mut up: Upstream, epoch: u64) {
        // The last read filled its buffer, so the kernel may hold more: bytes past the end
        // of the response mean the instance is out of step, and the next request on this
        // socket would get them as its answer. An edge-triggered socket reports nothing for
        // bytes already there, so look now. (A read that did not fill its buffer drained the
        // socket; anything later arrives as an event, which retires the idle socket.)
        if up.readable && !up.eof {
            let mut probe = [0u8; 1];
            up.eof = !matches!(up.stream.read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            up.readable = false;
        }
        let list = self.pool.entry(up.addr).or_default();
        if up.eof || list.len() >= MAX_IDLE_PER_INSTANCE {
            self.close_upstream(up);
            return;
        }
        list.push(up.key);
        up.epoch = epoch;
        up.since = self.now;
        let (key, gen) = (up.key, up.gen);
        let expires = self.now + self.app.config.pool_idle_timeout;
        // An entry that came due while the socket was busy was dropped unseen.
        if up.timer.armed.is_some_and(|a| a <= self.now) {
            up.timer.armed = None;
        }
        self.timers.arm(&mut up.timer, expires, key, gen);
        self.slots[key] = Slot::Idle(up);
    }

    /// Closes an idle socket and takes it out of the pool.
    fn drop_idle(&mut self, key: usize) {
        if let Slot::Idle(up) = self.slots.remove(key) {
            if let Some(list) = self.pool.get_mut(&up.addr) {
                list.retain(|k| *k != key);
            }
            let mut stream = up.stream;
            let _ = self.poll.registry().deregister(&mut stream);
        }
    }

    fn close_upstream(&mut self, mut up: Upstream) {
        let _ = self.poll.registry().deregister(&mut up.stream);
        if self.slots.contains(up.key) {
            self.slots.remove(up.key);
        }
    }
}
