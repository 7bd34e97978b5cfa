//! One event loop: its poller, listener, sockets and timers; accepting, dispatching events,
//! shutdown and hand-offs.

use super::*;

/// What a slab entry is. Client and upstream sockets share the slab, so a token names
/// either.
pub(super) enum Slot {
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

pub(super) struct Engine {
    pub(super) app: Arc<App>,
    pub(super) poll: Poll,
    pub(super) listener: Option<TcpListener>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) handoffs: mpsc::UnboundedSender<Handoff>,
    pub(super) signals: Arc<Signals>,
    pub(super) slots: Slab<Slot>,
    /// Idle upstream sockets by address, most recently used last.
    pub(super) pool: HashMap<SocketAddr, Vec<usize>>,
    pub(super) timers: Timers,
    pub(super) next_gen: u64,
    /// Client connections open here.
    pub(super) clients: usize,
    /// Not accepting until a connection slot frees or an accept error passes.
    pub(super) accept_paused: bool,
    pub(super) stopping: bool,
    /// The time at the start of the current batch of events.
    pub(super) now: Instant,
    /// Scratch space for local answers.
    pub(super) out: Vec<u8>,
    /// Clients waiting for a place at an instance (`State::Queued`), oldest first, with
    /// their generation (a slot may have been reused since).
    pub(super) queue: std::collections::VecDeque<(usize, u64)>,
    /// A place at an instance was given back on this loop since the queue was last served.
    pub(super) place_freed: bool,
    pub(super) next_queue_poll: Instant,
}

impl Engine {
    pub(super) fn run(&mut self) {
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
            if !self.queue.is_empty() && (self.place_freed || self.now >= self.next_queue_poll) {
                self.serve_queue();
            }
            if self.accept_paused {
                self.accept();
            }
            if self.stopping && self.clients == 0 {
                return;
            }
        }
    }

    pub(super) fn poll_timeout(&self) -> Option<Duration> {
        let mut t = self
            .timers
            .next_due()
            .map(|at| at.saturating_duration_since(Instant::now()));
        if self.accept_paused && !self.stopping {
            t = Some(t.map_or(ACCEPT_RETRY, |t| t.min(ACCEPT_RETRY)));
        }
        if !self.queue.is_empty() {
            t = Some(t.map_or(QUEUE_POLL, |t| t.min(QUEUE_POLL)));
        }
        t
    }

    pub(super) fn gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    pub(super) fn accept(&mut self) {
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

    /// Gives each queued client, oldest first, one more try at a place; those that find
    /// none go back in the queue.
    fn serve_queue(&mut self) {
        self.place_freed = false;
        self.next_queue_poll = self.now + QUEUE_POLL;
        for _ in 0..self.queue.len() {
            let Some((key, gen)) = self.queue.pop_front() else {
                break;
            };
            let waiting = matches!(self.slots.get(key), Some(Slot::Client(c)) if c.gen == gen && matches!(c.state, State::Queued));
            if waiting {
                self.drive(key, false);
            }
        }
    }

    /// Shutdown: no more accepting; idle clients close now, the others after their
    /// response (see `step`).
    pub(super) fn begin_stop(&mut self) {
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

    pub(super) fn on_event(&mut self, key: usize, readable: bool, writable: bool, closed: bool) {
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

    pub(super) fn fire_timers(&mut self) {
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
    pub(super) fn drive(&mut self, key: usize, timed_out: bool) {
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

    pub(super) fn close_client(&mut self, mut c: Box<Client>) {
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

    pub(super) fn handoff(&mut self, mut c: Box<Client>, http2: bool) {
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
    pub(super) fn on_timeout(&mut self, key: usize, c: &mut Client) -> Option<Step> {
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
                let mut first_byte = false;
                if let Some(x) = c.exchange.as_mut() {
                    if x.try_deadline.is_some_and(|d| d <= self.now) {
                        x.try_deadline = None;
                        if c.ubuf.is_empty() {
                            first_byte = true;
                        } else if x.answer_deadline > self.now {
                            // The answer has begun: the upstream timeout alone applies now.
                            c.deadline = x.answer_deadline;
                            return Some(Step::Wait);
                        }
                    }
                }
                if connecting {
                    self.connect_failed(c, "connect timed out".into());
                    self.next_attempt(key, c)
                } else if first_byte {
                    self.attempt_failed(key, c, Failure::FirstByte)
                } else {
                    self.attempt_failed(key, c, Failure::Timeout)
                }
            }
            State::Queued => {
                let e = ProxyError::Queue {
                    service: c
                        .exchange
                        .as_ref()
                        .map_or_else(String::new, |x| x.service.name.clone()),
                };
                self.fail(c, &e)
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
}
