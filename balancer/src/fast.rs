//! The HTTP/1 fast path: one task per client connection that parses each request head
//! itself, writes it to a pooled upstream socket and copies the answer back, with no
//! channel, extra task or header map between the two sockets.
//!
//! It serves what nearly all traffic is: HTTP/1.1 requests in origin form whose body is
//! absent or small (up to [`MAX_BUFFERED_BODY`], read whole before forwarding, so that a
//! request may go to another instance with its body intact). Anything else (HTTP/1.0,
//! `Expect`, upgrades, chunked or large uploads, `CONNECT`, absolute-form targets) hands
//! the connection, with the bytes read so far, to the hyper path in `run`, which serves it
//! from then on. The rules are those of [`crate::proxy`]: the same error mapping, retry
//! policy, ejection, forwarding headers and counters.
//!
//! Response bodies of any size stream through; their framing (length, chunked, until
//! close) is tracked only to know where each response ends.

use std::mem::MaybeUninit;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::chunked::ChunkedEnd;
use crate::deadline::LazyTimer;
use crate::proxy::{is_idempotent_method, Attempts, Peer, ProxyError};
use crate::service::{Backends, ServiceState};
use crate::upstream::Backend;
use crate::{App, Config};

/// Most header lines in a request or response head.
const MAX_HEADERS: usize = 100;
/// Largest request body the fast path buffers; larger ones go to the hyper path.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;
/// Buffer space offered to each read of a client's requests (a head grows the buffer further
/// if it needs to). Small, since an idle keep-alive connection keeps its buffers.
const CLIENT_READ_SPACE: usize = 4 * 1024;
/// Buffer space for the first read of a response; reads of a long body that fill it double
/// it, up to [`MAX_READ_SPACE`].
const UPSTREAM_READ_SPACE: usize = 8 * 1024;
const MAX_READ_SPACE: usize = 64 * 1024;
/// Most names a `Connection` header may list before the request goes to the hyper path.
const MAX_CONNECTION_NAMES: usize = 8;

/// How a connection left the fast path.
pub enum Outcome {
    /// Served until the client closed, an error, or shutdown.
    Closed,
    /// A request the fast path does not serve: the hyper path takes over the connection,
    /// starting with these bytes (read but not served).
    Handoff(BytesMut),
}

/// Serves HTTP/1 requests on `stream` until the connection ends or must be handed off.
pub async fn serve(
    app: Arc<App>,
    stream: TcpStream,
    peer: Peer,
    stop: watch::Receiver<bool>,
) -> (TcpStream, Outcome) {
    let now = Instant::now();
    let mut c = Conn {
        client_timer: LazyTimer::new(now + app.config.header_read_timeout),
        upstream_timer: LazyTimer::new(now + app.config.upstream_timeout),
        app,
        stream,
        peer,
        stop,
        rbuf: BytesMut::with_capacity(CLIENT_READ_SPACE),
        ubuf: BytesMut::with_capacity(UPSTREAM_READ_SPACE),
        req_out: Vec::with_capacity(1024),
        resp_out: Vec::with_capacity(1024),
        tried: Vec::with_capacity(4),
    };
    let outcome = c.run().await;
    (c.stream, outcome)
}

/// What was learned from a request head (the head for the instance is in `req_out`).
struct Request {
    head_len: usize,
    body_len: usize,
    /// The client asked to close after this request.
    close: bool,
    is_head: bool,
    /// Idempotent and bodiless: may be sent again after it may have reached an instance.
    replayable: bool,
    route: Option<usize>,
}

enum Parsed {
    Request(Request),
    Partial,
    Handoff,
    /// Answer with this status and close.
    Reject(StatusCode),
}

/// Where a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the instance closes the connection.
    Close,
}

/// What was learned from a response head (the head for the client is in `resp_out`).
struct Response {
    head_len: usize,
    status: u16,
    framing: Framing,
    /// The instance keeps the connection open after this response.
    keep_alive: bool,
}

enum ParsedResponse {
    Response(Response),
    /// A 1xx answer of this length, to skip.
    Informational(usize),
    Partial,
}

/// The per-connection state; buffers are reused from request to request.
struct Conn {
    app: Arc<App>,
    stream: TcpStream,
    peer: Peer,
    stop: watch::Receiver<bool>,
    /// Bytes from the client not yet served.
    rbuf: BytesMut,
    /// Bytes from the instance.
    ubuf: BytesMut,
    /// The request as it goes to the instance: head, then body.
    req_out: Vec<u8>,
    /// The response head as it goes to the client, then the first body bytes.
    resp_out: Vec<u8>,
    /// Instances tried for the current request.
    tried: Vec<usize>,
    /// Deadlines for reading from the client, and for the instance.
    client_timer: LazyTimer,
    upstream_timer: LazyTimer,
}

/// A failed read.
enum ReadError {
    Closed,
    Timeout,
    /// Shutdown began while the connection was idle.
    Stopped,
}

impl Conn {
    async fn run(&mut self) -> Outcome {
        loop {
            let deadline = Instant::now() + self.app.config.header_read_timeout;
            let req = loop {
                if !self.rbuf.is_empty() {
                    match parse_request(&self.rbuf, &self.app, &self.peer, &mut self.req_out) {
                        Parsed::Request(r) => break r,
                        Parsed::Partial => {}
                        Parsed::Handoff => {
                            return Outcome::Handoff(std::mem::take(&mut self.rbuf));
                        }
                        Parsed::Reject(status) => {
                            self.reject(status).await;
                            return Outcome::Closed;
                        }
                    }
                }
                if self.rbuf.len() >= self.app.config.max_header_bytes {
                    self.reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
                        .await;
                    return Outcome::Closed;
                }
                match self.read_client(deadline).await {
                    Ok(()) => {}
                    Err(ReadError::Timeout) if !self.rbuf.is_empty() => {
                        tracing::debug!(peer = %self.peer.addr, "request head not complete within the header read timeout");
                        return Outcome::Closed;
                    }
                    Err(_) => return Outcome::Closed,
                }
            };
            let started = Instant::now();
            let msg_len = req.head_len + req.body_len;
            if self.rbuf.len() < msg_len {
                self.rbuf.reserve(msg_len - self.rbuf.len());
                let deadline = Instant::now() + self.app.config.header_read_timeout;
                while self.rbuf.len() < msg_len {
                    if self.read_client(deadline).await.is_err() {
                        return Outcome::Closed;
                    }
                }
            }
            self.req_out
                .extend_from_slice(&self.rbuf[req.head_len..msg_len]);
            self.rbuf.advance(msg_len);
            let close = req.close || *self.stop.borrow();
            let keep = match self.proxy(&req, close, started).await {
                Ok(keep) => keep && !close,
                Err(()) => false,
            };
            if !keep {
                let _ = self.stream.shutdown().await;
                return Outcome::Closed;
            }
        }
    }

    /// Reads more client bytes into `rbuf`, until `deadline`.
    async fn read_client(&mut self, deadline: Instant) -> Result<(), ReadError> {
        self.rbuf.reserve(CLIENT_READ_SPACE);
        let idle = self.rbuf.is_empty();
        tokio::select! {
            biased;
            r = self.stream.read_buf(&mut self.rbuf) => match r {
                Ok(0) | Err(_) => Err(ReadError::Closed),
                Ok(_) => Ok(()),
            },
            () = self.client_timer.expired(deadline) => Err(ReadError::Timeout),
            _ = self.stop.changed(), if idle => Err(ReadError::Stopped),
        }
    }

    /// Proxies one request. `Ok(true)`: the client connection may carry another request.
    async fn proxy(&mut self, req: &Request, close: bool, started: Instant) -> Result<bool, ()> {
        let app = Arc::clone(&self.app);
        let Some(route) = req.route else {
            app.no_route.fetch_add(1, Ordering::Relaxed);
            return self.local(&ProxyError::NoRoute, req.is_head, close).await;
        };
        let service = &app.services[app.route_service[route]];
        let backends = service.backends();
        let exchanged = if backends.list.is_empty() {
            Err(ProxyError::NoHealthyInstance {
                service: service.name.clone(),
            })
        } else {
            // The buffer of tried instances is lent out for the attempts and put back after.
            let mut tried = std::mem::take(&mut self.tried);
            let exchanged = self
                .exchange(
                    &app.config,
                    service,
                    &backends,
                    req,
                    close,
                    started,
                    &mut tried,
                )
                .await;
            self.tried = tried;
            exchanged
        };
        service.metrics.latency.observe(started.elapsed());
        let (up, backend, resp) = match exchanged {
            Ok(x) => x,
            Err(e) => {
                e.report(service);
                return self.local(&e, req.is_head, close).await;
            }
        };
        self.relay(up, &backend, resp, started).await
    }

    /// Sends the request to an instance and reads its response head, trying the next
    /// instance (or a fresh connection) where the rules allow. `tried` is a reused buffer.
    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &mut self,
        cfg: &Config,
        service: &ServiceState,
        backends: &Backends,
        req: &Request,
        close: bool,
        started: Instant,
        tried: &mut Vec<usize>,
    ) -> Result<(TcpStream, Arc<Backend>, Response), ProxyError> {
        let mut attempts = Attempts::new(backends, cfg.retries, tried);
        let mut last_error: Option<String> = None;
        while let Some(attempt) = attempts.next(service, backends) {
            let backend = &backends.list[attempt.index];
            let connected = if attempt.fresh {
                backend
                    .connect_raw(cfg.connect_timeout)
                    .await
                    .map(|s| (s, false))
            } else {
                backend
                    .checkout_raw(cfg.connect_timeout, started.into_std())
                    .await
            };
            let (mut up, reused) = match connected {
                Ok(c) => c,
                Err(e) => {
                    // Nothing was sent: the request is intact for the next instance.
                    backend.record_connect_failure();
                    tracing::warn!(service = %service.name, instance = %backend.instance.id, addr = %backend.authority, error = %e, "connect failed; instance ejected for a cool-off");
                    last_error = Some(format!("{}: {e}", backend.authority));
                    continue;
                }
            };
            if !reused {
                backend.record_connect_success();
            }
            // The first attempt starts with the request; saves reading the clock again.
            let deadline = if attempt.first {
                started
            } else {
                Instant::now()
            } + cfg.upstream_timeout;
            let failure = match self
                .send_and_read_head(&mut up, deadline, req.is_head, close)
                .await
            {
                Ok(resp) => {
                    backend.record_status(resp.status);
                    return Ok((up, Arc::clone(backend), resp));
                }
                Err(f) => f,
            };
            backend.failures.fetch_add(1, Ordering::Relaxed);
            let cause = match failure {
                Failure::Timeout => {
                    return Err(ProxyError::Timeout {
                        service: service.name.clone(),
                        instance: backend.instance.id.clone(),
                    })
                }
                Failure::Unsent(e) => {
                    last_error = Some(format!("{}: {e}", backend.authority));
                    attempts.unsent(backend, &attempt, reused);
                    continue;
                }
                Failure::Malformed(cause) => {
                    // The instance answered, but not in HTTP: no retry, like any answer.
                    last_error = Some(format!("{}: {cause}", backend.authority));
                    break;
                }
                Failure::Sent(cause) => cause,
            };
            last_error = Some(format!("{}: {cause}", backend.authority));
            if attempts.may_resend(req.replayable, backend, &attempt, reused) {
                tracing::debug!(service = %service.name, instance = %backend.instance.id, %cause, "retrying an idempotent request");
                continue;
            }
            break;
        }
        Err(ProxyError::AllFailed {
            service: service.name.clone(),
            last: last_error,
        })
    }

    /// Writes `req_out` to `up` and reads the response head into `ubuf` (the client's
    /// version of it into `resp_out`).
    async fn send_and_read_head(
        &mut self,
        up: &mut TcpStream,
        deadline: Instant,
        is_head: bool,
        close: bool,
    ) -> Result<Response, Failure> {
        let mut written = 0;
        while written < self.req_out.len() {
            let r = tokio::select! {
                biased;
                r = up.write(&self.req_out[written..]) => r,
                () = self.upstream_timer.expired(deadline) => return Err(Failure::Timeout),
            };
            match r {
                Ok(0) if written == 0 => {
                    return Err(Failure::Unsent(std::io::ErrorKind::WriteZero.into()))
                }
                Ok(0) => return Err(Failure::Sent("the connection closed while sending".into())),
                Ok(n) => written += n,
                Err(e) if written == 0 => return Err(Failure::Unsent(e)),
                Err(e) => return Err(Failure::Sent(e.to_string())),
            }
        }
        self.ubuf.clear();
        loop {
            if !self.ubuf.is_empty() {
                match parse_response(&self.ubuf, is_head, close, &mut self.resp_out) {
                    Ok(ParsedResponse::Response(r)) => return Ok(r),
                    Ok(ParsedResponse::Informational(n)) => {
                        self.ubuf.advance(n);
                        continue;
                    }
                    Ok(ParsedResponse::Partial) => {}
                    Err(cause) => return Err(Failure::Malformed(cause.into())),
                }
                if self.ubuf.len() >= self.app.config.max_header_bytes {
                    return Err(Failure::Malformed("response head too large".into()));
                }
            }
            let read = read_upstream(
                up,
                &mut self.ubuf,
                UPSTREAM_READ_SPACE,
                &mut self.upstream_timer,
                deadline,
            );
            match read.await {
                Ok(0) if self.ubuf.is_empty() => {
                    return Err(Failure::Sent(
                        "the connection closed before an answer".into(),
                    ))
                }
                Ok(0) => return Err(Failure::Malformed("the connection closed mid-head".into())),
                Ok(_) => {}
                Err(UpstreamRead::Timeout) => return Err(Failure::Timeout),
                Err(UpstreamRead::Io(e)) if self.ubuf.is_empty() => {
                    return Err(Failure::Sent(e.to_string()))
                }
                Err(UpstreamRead::Io(e)) => return Err(Failure::Malformed(e.to_string())),
            }
        }
    }

    /// Streams the response (head already in `resp_out`) to the client. `Ok(true)` when the
    /// client connection may carry another request.
    async fn relay(
        &mut self,
        mut up: TcpStream,
        backend: &Backend,
        resp: Response,
        started: Instant,
    ) -> Result<bool, ()> {
        self.ubuf.advance(resp.head_len);
        let mut end = BodyEnd::new(resp.framing);
        let mut reusable = resp.keep_alive;
        let mut first = true;
        let mut space = UPSTREAM_READ_SPACE;
        loop {
            let (take, complete, broken) = match end.feed(&self.ubuf) {
                Ok((take, complete)) => (take, complete, false),
                Err(e) => {
                    tracing::debug!(instance = %backend.instance.id, error = %e, "bad response body framing");
                    (self.ubuf.len(), false, true)
                }
            };
            if complete && take < self.ubuf.len() {
                // Bytes after the end of the response: the instance is out of step.
                reusable = false;
            }
            // The head and the first body bytes go out in one write.
            let written = if first {
                first = false;
                self.resp_out.extend_from_slice(&self.ubuf[..take]);
                self.stream.write_all(&self.resp_out).await
            } else if take > 0 {
                self.stream.write_all(&self.ubuf[..take]).await
            } else {
                Ok(())
            };
            if complete {
                // Read exactly to its end: the upstream socket is clean, whatever the client
                // did with the answer.
                if reusable {
                    backend.checkin_raw(up, started.into_std());
                }
                return written.map(|()| true).map_err(|_| ());
            }
            if broken || written.is_err() {
                return Err(());
            }
            self.ubuf.clear();
            let deadline = Instant::now() + self.app.config.upstream_timeout;
            let read = read_upstream(
                &mut up,
                &mut self.ubuf,
                space,
                &mut self.upstream_timer,
                deadline,
            );
            match read.await {
                // The end of a close-delimited body; the client was told to close.
                Ok(0) if resp.framing == Framing::Close => return Ok(false),
                Ok(0) | Err(_) => {
                    // The instance stopped mid-body: the client can only see a cut answer.
                    tracing::debug!(instance = %backend.instance.id, "response body cut off by the instance");
                    return Err(());
                }
                Ok(n) if n >= space && space < MAX_READ_SPACE => space *= 2,
                Ok(_) => {}
            }
        }
    }

    /// Answers the request locally (404, 502, 503, 504). `Ok(true)`: keep the connection.
    async fn local(&mut self, e: &ProxyError, is_head: bool, close: bool) -> Result<bool, ()> {
        let (status, body) = e.status_and_body();
        encode_local(&mut self.resp_out, status, &body, close, !is_head);
        match self.stream.write_all(&self.resp_out).await {
            Ok(()) => Ok(!close),
            Err(_) => Err(()),
        }
    }

    /// Answers a request that cannot be parsed or is too large, then closes.
    async fn reject(&mut self, status: StatusCode) {
        tracing::debug!(peer = %self.peer.addr, %status, "rejecting a client request");
        encode_local(&mut self.resp_out, status, "", true, false);
        let _ = self.stream.write_all(&self.resp_out).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A whole answer from the balancer itself into `out`; `send_body` is false for `HEAD`.
fn encode_local(out: &mut Vec<u8>, status: StatusCode, body: &str, close: bool, send_body: bool) {
    out.clear();
    write_status_line(
        out,
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    if !body.is_empty() {
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if send_body {
        out.extend_from_slice(body.as_bytes());
    }
}

/// Where a response body ends, tracked as its bytes pass.
enum BodyEnd {
    Empty,
    /// Bytes left.
    Length(u64),
    Chunked(ChunkedEnd),
    Close,
}

impl BodyEnd {
    fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => BodyEnd::Empty,
            Framing::Length(n) => BodyEnd::Length(n),
            Framing::Chunked => BodyEnd::Chunked(ChunkedEnd::default()),
            Framing::Close => BodyEnd::Close,
        }
    }

    /// Of `bytes`, the next ones from the instance: how many belong to the body, and
    /// whether the body ended with them.
    fn feed(&mut self, bytes: &[u8]) -> Result<(usize, bool), crate::chunked::Malformed> {
        Ok(match self {
            BodyEnd::Empty => (0, true),
            BodyEnd::Length(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                (take as usize, *left == 0)
            }
            BodyEnd::Chunked(c) => match c.feed(bytes)? {
                Some(end) => (end, true),
                None => (bytes.len(), false),
            },
            BodyEnd::Close => (bytes.len(), false),
        })
    }
}

/// How an attempt at an instance failed.
enum Failure {
    /// Nothing of the request left: any request may go elsewhere.
    Unsent(std::io::Error),
    /// The request may have reached the instance; no answer came.
    Sent(String),
    /// The instance answered something that is not an HTTP response.
    Malformed(String),
    Timeout,
}

enum UpstreamRead {
    Io(std::io::Error),
    Timeout,
}

/// Reads from an instance into `buf` until `deadline`.
async fn read_upstream(
    up: &mut TcpStream,
    buf: &mut BytesMut,
    space: usize,
    timer: &mut LazyTimer,
    deadline: Instant,
) -> Result<usize, UpstreamRead> {
    buf.reserve(space);
    tokio::select! {
        biased;
        r = up.read_buf(buf) => r.map_err(UpstreamRead::Io),
        () = timer.expired(deadline) => Err(UpstreamRead::Timeout),
    }
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Headers never forwarded as received, in either direction: hop-by-hop ones (RFC 9110
/// §7.6.1), and the forwarding headers the balancer writes itself (requests only; the
/// response side passes those through).
fn is_hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => eq(name, "te"),
        7 => eq(name, "trailer") || eq(name, "upgrade"),
        10 => eq(name, "connection") || eq(name, "keep-alive"),
        16 => eq(name, "proxy-connection"),
        17 => eq(name, "transfer-encoding"),
        18 => eq(name, "proxy-authenticate"),
        19 => eq(name, "proxy-authorization"),
        _ => false,
    }
}

fn named_in(name: &[u8], names: &[&[u8]]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Parses a request head at the start of `buf`; on success the head to send upstream is in
/// `out`.
fn parse_request(buf: &[u8], app: &App, peer: &Peer, out: &mut Vec<u8>) -> Parsed {
    // Uninitialised slots: httparse fills what it uses, and a request or response pays no
    // 3 KiB clearing of a header array.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Parsed::Reject(StatusCode::BAD_REQUEST),
    };
    if head_len > app.config.max_header_bytes {
        return Parsed::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::Handoff;
    };
    if method == "CONNECT" || !target.starts_with('/') {
        return Parsed::Handoff;
    }
    let facts = HeadFacts::scan(req.headers);
    // Invalid or conflicting lengths, chunked uploads, `Expect` and upgrades: hyper's.
    if facts.bad_length
        || facts.too_many_names
        || facts.transfer_encoding
        || facts.expect
        || (facts.upgrade && facts.upgrade_header)
    {
        return Parsed::Handoff;
    }
    let length = facts.length;
    let body_len = match length {
        Some(l) if l > MAX_BUFFERED_BODY as u64 => return Parsed::Handoff,
        Some(l) => l as usize,
        None => 0,
    };
    let names = facts.names();

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host: Option<&[u8]> = None;
    let mut prior_xff = false;
    for h in req.headers.iter() {
        let n = h.name.as_bytes();
        if is_hop_by_hop(n) || named_in(n, names) {
            continue;
        }
        if n.len() > 11 && n[..11].eq_ignore_ascii_case(b"x-forwarded") {
            if eq(n, "x-forwarded-for") {
                prior_xff |= tokens(h.value).next().is_some();
                continue;
            }
            if eq(n, "x-forwarded-proto") || eq(n, "x-forwarded-host") {
                continue;
            }
        }
        if host.is_none() && eq(n, "host") {
            host = Some(h.value);
        }
        write_header(out, n, h.value);
    }
    // Earlier hops may have sent several X-Forwarded-For lines: one line, all in order.
    out.extend_from_slice(b"x-forwarded-for: ");
    if prior_xff {
        for h in req
            .headers
            .iter()
            .filter(|h| eq(h.name.as_bytes(), "x-forwarded-for"))
        {
            for t in tokens(h.value) {
                out.extend_from_slice(t);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(peer.ip_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if let Some(host) = host {
        write_header(out, b"x-forwarded-host", host);
    }
    out.extend_from_slice(b"\r\n");

    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Parsed::Request(Request {
        head_len,
        body_len,
        close: facts.close,
        is_head: method == "HEAD",
        replayable: body_len == 0 && is_idempotent_method(method),
        route: app.config.route_for(path),
    })
}

/// Parses a response head at the start of `buf`; the head for the client goes to `out`.
fn parse_response(
    buf: &[u8],
    is_head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<ParsedResponse, &'static str> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(ParsedResponse::Partial),
        Err(_) => return Err("malformed response head"),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err("malformed response head");
    };
    if (100..200).contains(&status) {
        // Never asked for (no `Expect`, no upgrade goes this way): skip, as hyper does.
        if status == 101 {
            return Err("unrequested protocol switch");
        }
        return Ok(ParsedResponse::Informational(head_len));
    }
    let facts = HeadFacts::scan(resp.headers);
    if facts.bad_length {
        return Err("invalid or conflicting content-length");
    }
    if facts.too_many_names {
        return Err("too many connection options");
    }
    let mut keep_alive = if version == 1 {
        !facts.close
    } else {
        facts.keep_alive && !facts.close
    };
    let (transfer_encoding, chunked, length) =
        (facts.transfer_encoding, facts.chunked, facts.length);
    let framing = if is_head || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    let names = facts.names();

    out.clear();
    write_status_line(out, status, resp.reason.unwrap_or(""));
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        // The body passes through unchanged, so its `Transfer-Encoding` does too; a length
        // beside it is dropped (RFC 9112 §6.3).
        let coding = eq(n, "transfer-encoding");
        if (is_hop_by_hop(n) && !coding)
            || named_in(n, names)
            || (transfer_encoding && eq(n, "content-length"))
        {
            continue;
        }
        write_header(out, n, h.value);
    }
    if close || framing == Framing::Close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ParsedResponse::Response(Response {
        head_len,
        status,
        framing,
        keep_alive,
    }))
}

fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What a head's headers say about the connection and the body's framing.
struct HeadFacts<'a> {
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive` (meaningful for HTTP/1.0).
    keep_alive: bool,
    /// `Connection: upgrade`.
    upgrade: bool,
    /// Other `Connection` options: names of headers that are hop-by-hop for this message.
    names: [&'a [u8]; MAX_CONNECTION_NAMES],
    named: usize,
    too_many_names: bool,
    length: Option<u64>,
    /// A `Content-Length` that is not a number, or two that differ.
    bad_length: bool,
    transfer_encoding: bool,
    /// Chunked is the last transfer coding (RFC 9112 §6.3).
    chunked: bool,
    upgrade_header: bool,
    expect: bool,
}

impl<'a> HeadFacts<'a> {
    fn scan(headers: &[httparse::Header<'a>]) -> Self {
        let mut f = HeadFacts {
            close: false,
            keep_alive: false,
            upgrade: false,
            names: [b""; MAX_CONNECTION_NAMES],
            named: 0,
            too_many_names: false,
            length: None,
            bad_length: false,
            transfer_encoding: false,
            chunked: false,
            upgrade_header: false,
            expect: false,
        };
        for h in headers {
            let n = h.name.as_bytes();
            if eq(n, "connection") {
                for t in tokens(h.value) {
                    if eq(t, "close") {
                        f.close = true;
                    } else if eq(t, "keep-alive") {
                        f.keep_alive = true;
                    } else if eq(t, "upgrade") {
                        f.upgrade = true;
                    } else if f.named == MAX_CONNECTION_NAMES {
                        f.too_many_names = true;
                    } else {
                        f.names[f.named] = t;
                        f.named += 1;
                    }
                }
            } else if eq(n, "content-length") {
                match parse_decimal(h.value) {
                    Some(v) if f.length.is_none_or(|l| l == v) => f.length = Some(v),
                    _ => f.bad_length = true,
                }
            } else if eq(n, "transfer-encoding") {
                f.transfer_encoding = true;
                f.chunked = tokens(h.value).last().is_some_and(|t| eq(t, "chunked"));
            } else if eq(n, "upgrade") {
                f.upgrade_header = true;
            } else if eq(n, "expect") {
                f.expect = true;
            }
        }
        f
    }

    fn names(&self) -> &[&'a [u8]] {
        &self.names[..self.named]
    }
}

fn write_status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A `Content-Length` value: ASCII digits only, no overflow.
fn parse_decimal(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}
