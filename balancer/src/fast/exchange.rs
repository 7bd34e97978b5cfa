//! A client connection and the request in flight on it: the state machine that reads the
//! head and body, picks instances, sends, and relays the answer.

use super::*;

/// A client connection.
pub(super) struct Client {
    pub(super) stream: TcpStream,
    pub(super) peer: Peer,
    pub(super) gen: u64,
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) readable: bool,
    /// The client closed its side (or the socket failed): reads go on until they say so.
    pub(super) eof: bool,
    /// No request yet: the first bytes may be the HTTP/2 preface.
    pub(super) first: bool,
    /// Bytes from the client not yet served.
    pub(super) rbuf: IoBuf,
    /// Bytes at the start of `rbuf` already searched for the end of a request head.
    pub(super) scanned: usize,
    /// Bytes from the instance.
    pub(super) ubuf: IoBuf,
    /// The request as it goes to the instance: head, then body.
    pub(super) req_out: Vec<u8>,
    /// The response head as it goes to the client.
    pub(super) resp_out: Vec<u8>,
    pub(super) out: Output,
    pub(super) state: State,
    /// The request in flight.
    pub(super) exchange: Option<Exchange>,
    pub(super) attempts: Option<Attempts>,
    pub(super) deadline: Instant,
    pub(super) timer: TimerState,
}

pub(super) enum State {
    /// Waiting for a request head; idle when `rbuf` is empty.
    Head,
    /// The head is parsed; waiting for the rest of the body.
    Body(Request),
    /// At an instance: connecting, sending, or waiting for the response head.
    Upstream,
    /// Waiting for a place at the chosen instance (`--max-conns-per-instance`).
    Queued,
    /// Streaming the response body to the client.
    Relay,
    /// Writing out what is queued for the client; then the next request, or close.
    Drain { close: bool },
}

/// A request in flight.
pub(super) struct Exchange {
    pub(super) service: Arc<ServiceState>,
    pub(super) backends: Arc<Backends>,
    pub(super) is_head: bool,
    pub(super) replayable: bool,
    /// The client connection closes after this request.
    pub(super) close: bool,
    pub(super) started: Instant,
    pub(super) attempt: Option<Attempt>,
    pub(super) up: Option<Upstream>,
    pub(super) last_error: Option<String>,
    pub(super) relay: Option<Relay>,
    /// When the current attempt must have had its first answer byte (`--first-byte-timeout`,
    /// replayable requests only); set once the request is sent.
    pub(super) try_deadline: Option<Instant>,
    /// The upstream timeout's deadline, which applies again once the first byte came.
    pub(super) answer_deadline: Instant,
}

impl Exchange {
    /// The instance of the current attempt.
    pub(super) fn backend(&self) -> Option<&Arc<Backend>> {
        self.attempt.as_ref().map(|a| &self.backends.list[a.index])
    }

    /// When the answer must have begun: the first attempt's clock starts with the request.
    pub(super) fn upstream_deadline(&self, now: Instant, timeout: Duration) -> Instant {
        let first = self.attempt.as_ref().is_some_and(|a| a.first);
        let start = if first { self.started } else { now };
        start + timeout
    }

    /// Remembers why an attempt at `backend` failed, for the 502 if no attempt succeeds.
    pub(super) fn note_failure(&mut self, backend: &Backend, cause: impl std::fmt::Display) {
        self.last_error = Some(format!("{}: {cause}", backend.authority));
    }

    /// The answer when no attempt succeeded.
    pub(super) fn all_failed(&mut self) -> ProxyError {
        ProxyError::AllFailed {
            service: self.service.name.clone(),
            last: self.last_error.take(),
        }
    }
}

pub(super) struct Relay {
    pub(super) end: BodyEnd,
    pub(super) framing: Framing,
    /// The upstream socket may carry another request afterwards.
    pub(super) reusable: bool,
    pub(super) head_sent: bool,
    pub(super) space: usize,
}

/// How an attempt at an instance failed (as in [`crate::proxy`]).
pub(super) enum Failure {
    /// Nothing of the request left: any request may go elsewhere.
    Unsent(String),
    /// The request may have reached the instance; no answer came.
    Sent(String),
    /// The instance answered something that is not an HTTP response.
    Malformed(String),
    Timeout,
    /// A replayable request had no first answer byte within `--first-byte-timeout`.
    FirstByte,
}

/// What driving a client came to.
pub(super) enum Step {
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
    pub(super) fn read_more(&mut self, space: usize) -> Option<Step> {
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

impl Engine {
    /// Runs the state machine until it must wait.
    pub(super) fn step(&mut self, key: usize, c: &mut Client) -> Step {
        loop {
            let next = match &c.state {
                State::Head => self.read_head(c),
                State::Body(_) => self.read_body(key, c),
                State::Upstream => self.at_upstream(key, c),
                State::Queued => match self.acquire(key, c) {
                    Ok(step) => step,
                    Err(()) => self.next_attempt(key, c),
                },
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
    pub(super) fn read_head(&mut self, c: &mut Client) -> Option<Step> {
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

    pub(super) fn read_body(&mut self, key: usize, c: &mut Client) -> Option<Step> {
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
    pub(super) fn start(&mut self, key: usize, c: &mut Client, req: &Request) -> Option<Step> {
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
            try_deadline: None,
            answer_deadline: self.now,
        });
        self.next_attempt(key, c)
    }

    /// Picks the next instance and gets a socket to it, pooled or new.
    pub(super) fn next_attempt(&mut self, key: usize, c: &mut Client) -> Option<Step> {
        loop {
            let (Some(x), Some(attempts)) = (c.exchange.as_mut(), c.attempts.as_mut()) else {
                return Some(Step::Close);
            };
            let Some(attempt) = attempts.next(&x.service, &x.backends) else {
                let e = x.all_failed();
                return self.fail(c, &e);
            };
            x.attempt = Some(attempt);
            match self.acquire(key, c) {
                Ok(step) => return step,
                Err(()) => continue,
            }
        }
    }

    /// Gets a socket, pooled or new, for the current attempt's instance. `Err`: that
    /// instance cannot be reached now; on to the next attempt. Under
    /// `--max-conns-per-instance`, a full instance puts the request in the loop's queue.
    pub(super) fn acquire(&mut self, key: usize, c: &mut Client) -> Result<Option<Step>, ()> {
        let cfg = &self.app.config;
        let (connect_timeout, upstream_timeout) = (cfg.connect_timeout, cfg.upstream_timeout);
        let Some(x) = c.exchange.as_mut() else {
            return Ok(Some(Step::Close));
        };
        let Some(attempt) = x.attempt.as_ref() else {
            return Ok(Some(Step::Close));
        };
        let backend = Arc::clone(&x.backends.list[attempt.index]);
        let fresh = attempt.fresh;
        let addr = match backend.socket_addr() {
            Ok(a) => a,
            Err(e) => {
                self.connect_failed(c, format!("cannot resolve: {e}"));
                return Err(());
            }
        };
        let place = match cfg.max_conns_per_instance {
            None => None,
            Some(cap) => match backend.try_begin(cap) {
                Some(p) => Some(p),
                None => return Ok(self.enqueue(key, c)),
            },
        };
        let pooled = if fresh {
            None
        } else {
            self.checkout(addr, backend.pool_epoch(), key)
        };
        let mut up = match pooled {
            Some(up) => up,
            None => match self.connect(addr, key) {
                Ok(up) => up,
                Err(e) if is_local_resource_error(&e) => {
                    let e = ProxyError::LocalResources {
                        cause: e.to_string(),
                    };
                    return Ok(self.fail(c, &e));
                }
                Err(e) => {
                    self.connect_failed(c, format!("connect failed: {e}"));
                    return Err(());
                }
            },
        };
        up.place = place;
        let Some(x) = c.exchange.as_mut() else {
            return Ok(Some(Step::Close));
        };
        c.deadline = if up.connected {
            x.upstream_deadline(self.now, upstream_timeout)
        } else {
            self.now + connect_timeout
        };
        x.up = Some(up);
        x.try_deadline = None;
        c.ubuf.clear();
        c.state = State::Upstream;
        Ok(None)
    }

    /// Every place at the chosen instance is taken: the request waits in this loop's queue
    /// (see `Engine::serve_queue`) for up to `--queue-timeout`.
    fn enqueue(&mut self, key: usize, c: &mut Client) -> Option<Step> {
        let Some(x) = c.exchange.as_ref() else {
            return Some(Step::Close);
        };
        if !matches!(c.state, State::Queued) {
            if self.queue.len() >= self.app.config.max_queue {
                let e = ProxyError::Queue {
                    service: x.service.name.clone(),
                };
                return self.fail(c, &e);
            }
            x.service.metrics.queued.fetch_add(1, Ordering::Relaxed);
            c.state = State::Queued;
            c.deadline = self.now + self.app.config.queue_timeout;
        }
        self.queue.push_back((key, c.gen));
        Some(Step::Wait)
    }

    /// A connect failed: the instance is ejected for a cool-off, the request is intact for
    /// the next one.
    pub(super) fn connect_failed(&mut self, c: &mut Client, cause: String) {
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
    pub(super) fn at_upstream(&mut self, key: usize, c: &mut Client) -> Option<Step> {
        if c.eof {
            // The client closed while its request waits at the instance: nobody will read
            // the answer, so the instance's work and the connection slot are let go now
            // (as nginx does by default; it logs 499).
            if let Some(x) = c.exchange.take() {
                if let Some(up) = x.up {
                    self.close_upstream(up);
                }
                x.service.metrics.aborted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(service = %x.service.name, peer = %c.peer.addr, "client closed before the answer (499); upstream request abandoned");
            }
            return Some(Step::Close);
        }
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
        if let (true, None, Some(limit)) = (
            x.replayable,
            x.try_deadline,
            self.app.config.first_byte_timeout,
        ) {
            let at = self.now + limit;
            x.try_deadline = Some(at);
            x.answer_deadline = c.deadline;
            c.deadline = c.deadline.min(at);
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
    pub(super) fn attempt_failed(
        &mut self,
        key: usize,
        c: &mut Client,
        failure: Failure,
    ) -> Option<Step> {
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
            Failure::FirstByte => {
                backend.record_silence(&x.service.name);
                x.note_failure(&backend, "no first byte within the first-byte timeout");
                if attempts.may_resend(x.replayable, &backend, &attempt, false) {
                    return self.next_attempt(key, c);
                }
                let e = ProxyError::Timeout {
                    service: x.service.name.clone(),
                    instance: backend.instance.id.clone(),
                };
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
    pub(super) fn fail(&mut self, c: &mut Client, e: &ProxyError) -> Option<Step> {
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
    pub(super) fn answer_local(
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
    pub(super) fn reject(&mut self, c: &mut Client, status: StatusCode) -> Option<Step> {
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
    pub(super) fn relay(&mut self, c: &mut Client) -> Option<Step> {
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
            let (take, complete) = match relay.end.feed(c.ubuf.bytes()) {
                Ok(fed) => fed,
                Err(e) => {
                    // Nothing from the flaw on is passed on: a client that reads the broken
                    // framing another way must not find a response it did not ask for in it.
                    let head_sent = relay.head_sent;
                    let Some(backend) = x.backend().cloned() else {
                        return Some(Step::Close);
                    };
                    backend.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %x.service.name, instance = %backend.instance.id, error = %e, "malformed response body");
                    if head_sent {
                        // The client has part of the answer: it can only see it cut off.
                        return Some(Step::Close);
                    }
                    x.note_failure(&backend, e);
                    let e = x.all_failed();
                    return self.fail(c, &e);
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
            if sent.is_err() {
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
}
