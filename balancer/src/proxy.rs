//! The request path: route, pick an instance round robin, forward, stream the answer back.
//!
//! Failures are handled by when they happened:
//!
//! - **before anything was sent** (connect refused or timed out, or hyper handing the request
//!   back from a connection that closed while idle): the request, body included, goes to the
//!   next instance, at most one try per instance, and a refusing instance is ejected for a
//!   cool-off without waiting for Consul;
//! - **after it may have been sent**: retried on another instance only when the method is
//!   idempotent, the request has no body, and the retry budget allows;
//! - **after response bytes went to the client**: never retried.
//!
//! Every error answer is produced in [`ProxyError::into_response`], the one place that maps
//! failures to status codes (DESIGN.md).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::service::{Backends, ServiceState};
use crate::upstream::{Backend, BodyError, PooledBody, UpBody};
use crate::{App, ClientConn};

/// Body of a response to a client: streamed from an instance, or a short local answer.
pub enum ProxyBody {
    Upstream(PooledBody),
    Local(Full<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
            ProxyBody::Local(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e: Infallible| match e {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Local(b) => b.size_hint(),
        }
    }
}

/// Why the balancer answers a request itself.
#[derive(Debug)]
pub enum ProxyError {
    NoRoute,
    /// The client's request could not be read to the end.
    BadRequest {
        cause: String,
    },
    NoHealthyInstance {
        service: String,
    },
    /// Every instance tried refused or failed before or while answering.
    AllFailed {
        service: String,
        last: Option<String>,
    },
    /// The instance did not send its response head in time.
    Timeout {
        service: String,
        instance: String,
    },
    /// The request itself is ambiguous or unsupported; answered with `Connection: close`,
    /// so that nothing after it on the connection is read as a request.
    Refused {
        status: StatusCode,
        why: &'static str,
    },
    /// No place at an instance came free within `--queue-timeout`, or the queue was full.
    Queue {
        service: String,
    },
    /// This host ran out of something a connection needs (descriptors, ports, buffers):
    /// no instance is to blame, and another try would fail the same way.
    LocalResources {
        cause: String,
    },
}

impl ProxyError {
    /// The one mapping from failure to status code and short body.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (status, body) = self.status_and_body();
        let close = matches!(self, ProxyError::Refused { .. });
        let mut r = local(status, body);
        if close {
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }

    /// The status code and body of the answer (see [`ProxyError::into_response`]).
    pub fn status_and_body(&self) -> (StatusCode, String) {
        match self {
            ProxyError::BadRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "the request body could not be read\n".to_string(),
            ),
            ProxyError::NoRoute => (
                StatusCode::NOT_FOUND,
                "no route for this path\n".to_string(),
            ),
            ProxyError::NoHealthyInstance { service } => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy instance of service {service}\n"),
            ),
            ProxyError::AllFailed { service, .. } => (
                StatusCode::BAD_GATEWAY,
                format!("no instance of service {service} could answer\n"),
            ),
            ProxyError::Timeout { service, .. } => (
                StatusCode::GATEWAY_TIMEOUT,
                format!("an instance of service {service} did not answer in time\n"),
            ),
            ProxyError::Refused { status, why } => (*status, (*why).to_string()),
            ProxyError::Queue { service } => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("every instance of service {service} is at its connection limit\n"),
            ),
            ProxyError::LocalResources { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the balancer is short of resources; try again\n".to_string(),
            ),
        }
    }

    /// Logs the failure and counts the local answer it becomes, for `service`.
    pub fn report(&self, state: &ServiceState) {
        match self {
            ProxyError::AllFailed { service, last } => {
                tracing::warn!(%service, cause = last.as_deref().unwrap_or(""), "no instance could answer");
            }
            ProxyError::Timeout { service, instance } => {
                tracing::warn!(%service, %instance, "instance did not answer in time");
            }
            ProxyError::BadRequest { cause } => {
                tracing::debug!(%cause, "client request body failed");
            }
            ProxyError::Queue { service } => {
                state.metrics.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%service, "no place at an instance within the queue timeout (503)");
            }
            ProxyError::LocalResources { cause } => {
                tracing::warn!(%cause, "cannot open an upstream connection: this host is short of resources (no instance blamed)");
            }
            _ => {}
        }
        let class = usize::from(self.status_and_body().0.as_u16() / 100).clamp(1, 5) - 1;
        state.metrics.local[class].fetch_add(1, Ordering::Relaxed);
    }
}

pub fn local(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::Local(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too, except those that frame the message
    // or name its target: never one hop's business (RFC 9110 §7.6.1), so ignored there.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| {
            ![
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::HOST,
            ]
            .contains(n)
        })
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(header::UPGRADE);
}

fn is_idempotent(m: &Method) -> bool {
    is_idempotent_method(m.as_str())
}

/// Methods that may be sent twice (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent_method(m: &str) -> bool {
    matches!(m, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// The client end of a connection, with what every request on it forwards, computed once
/// per connection rather than per request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client IP as a header value, for `X-Forwarded-For`.
    ip: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { addr, ip }
    }

    /// The client IP as text, for `X-Forwarded-For`.
    pub fn ip_bytes(&self) -> &[u8] {
        self.ip.as_bytes()
    }
}

/// Rewrites the request head for the instance: origin-form URI, forwarding headers, `Host`
/// kept (or taken from an HTTP/2 `:authority`).
fn prepare(parts: &mut http::request::Parts, peer: &Peer) {
    let authority = parts.uri.authority().cloned();
    let mut uri = http::uri::Parts::default();
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let h = &mut parts.headers;
    if !h.contains_key(header::HOST) {
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            h.insert(header::HOST, v);
        }
    }
    // Earlier hops may have sent several X-Forwarded-For lines: keep them all, in order.
    let prev: Vec<&str> = h
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let xff = if prev.is_empty() {
        Some(peer.ip.clone())
    } else {
        HeaderValue::from_str(&format!("{}, {}", prev.join(", "), peer.addr.ip())).ok()
    };
    if let Some(v) = xff {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(host) = h.get(header::HOST).cloned() {
        h.insert("x-forwarded-host", host);
    }
}

/// Whether a request's target and framing are unambiguous, as the fast path requires of
/// its own (`http1::HeadFacts::check_request`): hyper parses what the fast path hands over,
/// and every later request on that connection.
fn check_request(req: &Request<Incoming>) -> Result<(), ProxyError> {
    let h = req.headers();
    let hosts = h.get_all(header::HOST).iter().count();
    let refuse = |status, why| Err(ProxyError::Refused { status, why });
    if req.method() == Method::CONNECT {
        tracing::info!("CONNECT refused (501)");
        return refuse(StatusCode::NOT_IMPLEMENTED, "CONNECT is not supported\n");
    }
    let host_rule = match req.version() {
        http::Version::HTTP_11 => hosts == 1,
        // HTTP/1.0 may omit it; HTTP/2 has `:authority`, and a `Host` beside it at most once.
        _ => hosts <= 1,
    };
    if !host_rule {
        return refuse(
            StatusCode::BAD_REQUEST,
            "exactly one Host header is required\n",
        );
    }
    let mut codings = crate::http1::Codings::default();
    for v in h.get_all(header::TRANSFER_ENCODING) {
        codings.add(v.as_bytes());
    }
    let length = h.contains_key(header::CONTENT_LENGTH);
    if let Err(status) = codings.request_verdict(length, req.version() == http::Version::HTTP_10) {
        return refuse(status, "unsupported or ambiguous Transfer-Encoding\n");
    }
    Ok(())
}

/// The protocol an HTTP/1.1 request asks to switch to (`Connection: upgrade` and an
/// `Upgrade` header), if any.
fn upgrade_asked(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let named = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    named
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
}

/// The service for `req` (`RouteTable::resolve`); with a `strip` route, the request's target
/// loses the prefix and `X-Forwarded-Prefix` names it.
fn route<B>(app: &App, req: &mut Request<B>) -> Option<Arc<ServiceState>> {
    let table = app.routes.load();
    let host = req
        .headers()
        .get(header::HOST)
        .map(HeaderValue::as_bytes)
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()));
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let (entry, to) = table.resolve(host, target)?;
    let service = Arc::clone(&entry.service);
    if let Some(prefix) = entry.route.strip.as_deref() {
        let to: Option<http::uri::PathAndQuery> = match to {
            std::borrow::Cow::Owned(t) => t.parse().ok(),
            std::borrow::Cow::Borrowed(t) => t.parse().ok(),
        };
        let prefix = HeaderValue::from_str(prefix).ok();
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = to;
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        if let Some(p) = prefix {
            req.headers_mut().insert("x-forwarded-prefix", p);
        }
    }
    Some(service)
}

/// Handles one client request. Never fails: every failure becomes an answer.
pub async fn handle(
    app: Arc<App>,
    mut req: Request<Incoming>,
    conn: &Arc<ClientConn>,
) -> Response<ProxyBody> {
    if let Err(e) = check_request(&req) {
        return e.into_response();
    }
    let started = Instant::now();
    let Some(service) = route(&app, &mut req) else {
        app.no_route.fetch_add(1, Ordering::Relaxed);
        return ProxyError::NoRoute.into_response();
    };
    // Dropped unanswered when the client goes away first (hyper drops this future then):
    // that is counted, and dropping the upstream request closes its connection.
    let mut abort = AbortWatch {
        service: Some(Arc::clone(&service)),
        peer: conn.peer.addr,
    };
    let upgrade = upgrade_asked(&req).map(|proto| Upgrade {
        proto,
        client: hyper::upgrade::on(&mut req),
    });
    let result = forward(&app, &service, req, upgrade, conn).await;
    abort.service = None;
    service.metrics.latency.observe(started.elapsed());
    match result {
        Ok(resp) => resp,
        Err(e) => {
            e.report(&service);
            e.into_response()
        }
    }
}

/// One attempt at a request: the instance (an index into the snapshot) and whether it must
/// go over a new connection rather than a pooled one.
pub(crate) struct Attempt {
    pub index: usize,
    pub fresh: bool,
    pub first: bool,
}

/// Which instance each attempt at a request goes to, under the rules in the module docs:
/// each instance once, a stale pooled connection replaced by a fresh one to the same
/// instance, and requests that may have reached an instance retried only when replayable and
/// within `--retries`. Shared by this path and the fast path.
pub(crate) struct Attempts {
    /// Instances already picked.
    tried: Vec<usize>,
    retries_left: u32,
    /// Attempts left: each instance once plus the retries; the bound also covers
    /// fresh-connection attempts on the same instance.
    left: usize,
    made: usize,
    /// Set when the next attempt repeats this instance on a fresh connection.
    again: Option<usize>,
}

impl Attempts {
    pub(crate) fn new(backends: &Backends, retries: u32) -> Self {
        let mut a = Self {
            tried: Vec::new(),
            retries_left: 0,
            left: 0,
            made: 0,
            again: None,
        };
        a.reset(backends, retries);
        a
    }

    /// Starts over for a new request, keeping the buffer.
    pub(crate) fn reset(&mut self, backends: &Backends, retries: u32) {
        self.tried.clear();
        self.retries_left = retries;
        self.left = backends.list.len() + retries as usize + 1;
        self.made = 0;
        self.again = None;
    }

    /// The next attempt, or `None` when the rules allow no more.
    pub(crate) fn next(&mut self, service: &ServiceState, backends: &Backends) -> Option<Attempt> {
        if self.left == 0 {
            return None;
        }
        let (index, fresh) = match self.again.take() {
            Some(i) => (i, true),
            None => {
                let i = service.pick(backends, &self.tried)?;
                self.tried.push(i);
                (i, false)
            }
        };
        self.left -= 1;
        self.made += 1;
        if self.made > 1 {
            service.metrics.retries.fetch_add(1, Ordering::Relaxed);
        }
        Some(Attempt {
            index,
            fresh,
            first: self.made == 1,
        })
    }

    /// Nothing of the request left. A pooled connection (`reused`) most likely went stale
    /// while idle: the next attempt is the same instance on a fresh connection; otherwise the
    /// next instance.
    pub(crate) fn unsent(&mut self, backend: &Backend, attempt: &Attempt, reused: bool) {
        if reused {
            backend.clear_pool();
            self.again = Some(attempt.index);
        }
    }

    /// The request may have reached the instance and no answer came: whether it may be sent
    /// again (replayable, and within the retry budget). A pooled connection is most likely one
    /// the instance closed as we wrote, so the retry is the same instance on a fresh one.
    pub(crate) fn may_resend(
        &mut self,
        replayable: bool,
        backend: &Backend,
        attempt: &Attempt,
        reused: bool,
    ) -> bool {
        if !replayable || self.retries_left == 0 {
            return false;
        }
        self.retries_left -= 1;
        self.unsent(backend, attempt, reused);
        true
    }
}

/// Whether an instance's response has one reading of its body that hyper's client shares:
/// no `Transfer-Encoding`, or exactly one line that says `chunked` and nothing else, without
/// a `Content-Length` beside it and not in HTTP/1.0. (hyper frames `chunked,` or a length
/// beside a coding its own way, and drops codings before `chunked` that the client would
/// then never learn of.) The fast path relays such responses byte for byte instead.
fn plain_response_framing<B>(resp: &Response<B>) -> bool {
    let h = resp.headers();
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (None, _) => true,
        (Some(v), None) => {
            v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked")
                && !h.contains_key(header::CONTENT_LENGTH)
                && resp.version() != http::Version::HTTP_10
        }
        (Some(_), Some(_)) => false,
    }
}

/// `Content-Length: 5, 5` (or two such lines, which hyper accepts when they agree) as the
/// one value it stands for (RFC 9110 §8.6: a list of equal lengths is not to be passed on).
fn normalise_length(h: &mut HeaderMap) {
    let mut values = h
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    if let Ok(v) = HeaderValue::from_bytes(first) {
        h.insert(header::CONTENT_LENGTH, v);
    }
}

/// A place at `backend` for one request under `--max-conns-per-instance`: at once if one is
/// free, else after waiting (counted as queued) up to `timeout`; `None` if none came free.
/// Places freed anywhere (either path, any event loop) are seen within a few milliseconds.
async fn wait_for_place(
    backend: &Arc<Backend>,
    cap: usize,
    timeout: std::time::Duration,
    service: &ServiceState,
) -> Option<crate::upstream::InFlight> {
    if let Some(p) = backend.try_begin(cap) {
        return Some(p);
    }
    service.metrics.queued.fetch_add(1, Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        if let Some(p) = backend.try_begin(cap) {
            return Some(p);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// Counts a request whose client left before its answer (see [`handle`]).
struct AbortWatch {
    /// Cleared once the answer is ready.
    service: Option<Arc<ServiceState>>,
    peer: SocketAddr,
}

impl Drop for AbortWatch {
    fn drop(&mut self) {
        if let Some(s) = self.service.take() {
            s.metrics.aborted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(service = %s.name, peer = %self.peer, "client closed before the answer (499); upstream request abandoned");
        }
    }
}

/// A request that asks to switch protocols: what it asks for, and the client's side of the
/// switch.
struct Upgrade {
    proto: HeaderValue,
    client: hyper::upgrade::OnUpgrade,
}

async fn forward(
    app: &Arc<App>,
    service: &Arc<ServiceState>,
    req: Request<Incoming>,
    mut upgrade: Option<Upgrade>,
    client: &Arc<ClientConn>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let backends = service.backends();
    if backends.list.is_empty() {
        return Err(ProxyError::NoHealthyInstance {
            service: service.name.clone(),
        });
    }
    let (mut parts, body) = req.into_parts();
    prepare(&mut parts, &client.peer);
    if !body.is_end_stream() && body.size_hint().exact().is_none() {
        // A body of unknown length (chunked from the client) goes on chunked: said outright,
        // since hyper's client sends no body at all for a `GET` or `HEAD` without it.
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    if let Some(u) = &upgrade {
        // The two headers that ask for the switch are hop-by-hop, and are asked again of
        // the instance (RFC 9110 §7.8).
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, u.proto.clone());
    }
    let bodiless = body.is_end_stream();
    let replayable = bodiless && is_idempotent(&parts.method);
    // The body to send next: taken by each attempt, and put back by every path that tries
    // again (so it is always `Some` at the top of the loop).
    let mut body = Some(if bodiless {
        UpBody::Empty
    } else {
        UpBody::Incoming(body)
    });
    let mut attempts = Attempts::new(&backends, app.config.retries);
    let mut last_error: Option<String> = None;

    while let Some(attempt) = attempts.next(service, &backends) {
        let backend: &Arc<Backend> = &backends.list[attempt.index];
        let place = match app.config.max_conns_per_instance {
            None => None,
            Some(cap) => {
                match wait_for_place(backend, cap, app.config.queue_timeout, service).await {
                    Some(p) => Some(p),
                    None => {
                        return Err(ProxyError::Queue {
                            service: service.name.clone(),
                        })
                    }
                }
            }
        };
        let Some(b) = body.take() else { break };
        let conn = if attempt.fresh {
            backend.connect_fresh(app.config.connect_timeout).await
        } else {
            backend.checkout(app.config.connect_timeout).await
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) if e.is_local() => {
                return Err(ProxyError::LocalResources {
                    cause: e.to_string(),
                })
            }
            Err(e) => {
                // Nothing was sent: the body is intact for the next instance.
                backend.record_connect_failure();
                tracing::warn!(service = %service.name, instance = %backend.instance.id, addr = %backend.authority, error = %e, "connect failed; instance ejected for a cool-off");
                last_error = Some(format!("{}: {e}", backend.authority));
                body = Some(b);
                continue;
            }
        };
        if !conn.reused {
            backend.record_connect_success();
        }
        let request = Request::from_parts(parts.clone(), b);
        // A replayable request may give up on a silent instance sooner and go elsewhere.
        let first_byte = app
            .config
            .first_byte_timeout
            .filter(|t| replayable && *t < app.config.upstream_timeout);
        let sent = tokio::time::timeout(
            first_byte.unwrap_or(app.config.upstream_timeout),
            conn.sender.try_send_request(request),
        )
        .await;
        match sent {
            Ok(Ok(mut resp)) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    backend.record_status(101);
                    let Some(u) = upgrade.take() else {
                        // Nobody asked: an instance out of step. Its connection goes with it.
                        backend.failures.fetch_add(1, Ordering::Relaxed);
                        last_error = Some(format!(
                            "{}: unrequested protocol switch",
                            backend.authority
                        ));
                        break;
                    };
                    let instance_side = hyper::upgrade::on(&mut resp);
                    let (mut rparts, _) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers);
                    rparts
                        .headers
                        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    let proto = rparts.headers.get(header::UPGRADE).cloned();
                    rparts
                        .headers
                        .insert(header::UPGRADE, proto.unwrap_or(u.proto));
                    tokio::spawn(crate::tunnel::run(
                        Arc::clone(app),
                        Arc::clone(client),
                        u.client,
                        instance_side,
                        backend.instance.id.clone(),
                    ));
                    return Ok(Response::from_parts(
                        rparts,
                        ProxyBody::Local(Full::default()),
                    ));
                }
                if !plain_response_framing(&resp) {
                    // hyper has already framed it one way; a reader could frame it another.
                    // Dropping the response closes its connection.
                    backend.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(service = %service.name, instance = %backend.instance.id, "response with an ambiguous or unsupported Transfer-Encoding; answered 502");
                    last_error = Some(format!("{}: ambiguous response framing", backend.authority));
                    break;
                }
                let (mut rparts, rbody) = resp.into_parts();
                backend.record_status(rparts.status.as_u16());
                strip_hop_by_hop(&mut rparts.headers);
                normalise_length(&mut rparts.headers);
                let mut body = PooledBody::new(
                    rbody,
                    conn.sender,
                    Arc::clone(backend),
                    Arc::clone(service),
                    app.config.upstream_timeout,
                );
                body.hold(place);
                return Ok(Response::from_parts(rparts, ProxyBody::Upstream(body)));
            }
            Ok(Err(mut e)) => {
                if e.error().is_user() {
                    // The client's own body failed (bad chunking, a reset stream, a client
                    // gone mid-upload): not the instance's fault, and not retryable.
                    return Err(ProxyError::BadRequest {
                        cause: e.error().to_string(),
                    });
                }
                backend.failures.fetch_add(1, Ordering::Relaxed);
                last_error = Some(format!("{}: {}", backend.authority, e.error()));
                if let Some(unsent) = e.take_message() {
                    // hyper handed the request back: it never left.
                    body = Some(unsent.into_body());
                    attempts.unsent(backend, &attempt, conn.reused);
                    continue;
                }
                if attempts.may_resend(replayable, backend, &attempt, conn.reused) {
                    body = Some(UpBody::Empty);
                    tracing::debug!(service = %service.name, instance = %backend.instance.id, error = %e.error(), "retrying an idempotent request");
                    continue;
                }
                break;
            }
            Err(_) if first_byte.is_some() => {
                backend.failures.fetch_add(1, Ordering::Relaxed);
                backend.record_silence(&service.name);
                last_error = Some(format!(
                    "{}: no first byte within the first-byte timeout",
                    backend.authority
                ));
                if attempts.may_resend(replayable, backend, &attempt, false) {
                    body = Some(UpBody::Empty);
                    continue;
                }
                return Err(ProxyError::Timeout {
                    service: service.name.clone(),
                    instance: backend.instance.id.clone(),
                });
            }
            Err(_) => {
                backend.failures.fetch_add(1, Ordering::Relaxed);
                return Err(ProxyError::Timeout {
                    service: service.name.clone(),
                    instance: backend.instance.id.clone(),
                });
            }
        }
    }
    Err(ProxyError::AllFailed {
        service: service.name.clone(),
        last: last_error,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prepares_forwarding_headers() {
        let req = Request::builder()
            .uri("http://example.com:8080/a/b?x=1")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "1")
            .header("keep-alive", "timeout=5")
            .header("x-forwarded-for", "10.0.0.9")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (mut parts, ()) = req.into_parts();
        prepare(&mut parts, &Peer::new("127.0.0.7:5555".parse().unwrap()));
        assert_eq!(parts.uri, "/a/b?x=1");
        let h = &parts.headers;
        assert!(h.get("connection").is_none());
        assert!(h.get("x-private").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("te").is_none());
        assert_eq!(h["host"], "example.com:8080");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9, 127.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.com:8080");
    }

    #[test]
    fn error_mapping() {
        let s = |e: ProxyError| e.into_response().status().as_u16();
        assert_eq!(s(ProxyError::NoRoute), 404);
        assert_eq!(
            s(ProxyError::NoHealthyInstance {
                service: "web".into()
            }),
            503
        );
        assert_eq!(
            s(ProxyError::AllFailed {
                service: "web".into(),
                last: None
            }),
            502
        );
        assert_eq!(
            s(ProxyError::Timeout {
                service: "web".into(),
                instance: "a".into()
            }),
            504
        );
    }
}
