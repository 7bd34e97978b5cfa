//! A small typed client for the Consul agent HTTP API, on hyper 1.x.
//!
//! It speaks the subset in `consul-api.md`: registration, TTL updates, maintenance, health and
//! catalog reads (blocking), members, self and leader. Every call has a deadline; blocking
//! calls get `wait + wait/16` (Consul's jitter) plus a margin, so a healthy long poll never
//! times out on our side first.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::{TokioExecutor, TokioIo};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::wire::{
    AgentSelf, AgentService, CheckUpdate, HealthCheck, Member, ServiceEntry, ServiceRegistration,
};

/// Default agent address, as for every Consul tool.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8500";
/// Deadline of a connect to the agent.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of a non-blocking call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to `wait + wait/16` for blocking calls: time for the answer itself to travel.
const BLOCKING_MARGIN: Duration = Duration::from_secs(5);
/// Consul's own default when a blocking query names no `wait`.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// The largest answer we accept; a catalog of tens of thousands of services fits easily.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// Unreserved characters (RFC 3986) stay as they are; everything else is percent-encoded.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

/// Where the agent is and how to authenticate; built from the environment like every Consul
/// tool, and overridable in code.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port`, without a trailing slash.
    pub base_url: String,
    /// Sent as `X-Consul-Token` when set.
    pub token: Option<String>,
    /// Deadline of non-blocking calls.
    pub timeout: Duration,
}

impl ClientConfig {
    /// An agent at `addr` (`host:port` or `http://host:port`), no token.
    pub fn new(addr: &str) -> Result<Self, Error> {
        Ok(Self {
            base_url: normalize_addr(addr)?,
            token: None,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// `CONSUL_HTTP_ADDR` (default `127.0.0.1:8500`), `CONSUL_HTTP_TOKEN`, else the file named
    /// by `CONSUL_HTTP_TOKEN_FILE`.
    pub fn from_env() -> Result<Self, Error> {
        let addr = std::env::var("CONSUL_HTTP_ADDR")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ADDR.to_string());
        let mut cfg = Self::new(&addr)?;
        cfg.token = token_from_env()?;
        Ok(cfg)
    }

    /// Replaces the token.
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }
}

/// `CONSUL_HTTP_TOKEN`, else the contents of `CONSUL_HTTP_TOKEN_FILE`.
pub fn token_from_env() -> Result<Option<String>, Error> {
    if let Ok(t) = std::env::var("CONSUL_HTTP_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(Some(t.trim().to_string()));
        }
    }
    if let Ok(path) = std::env::var("CONSUL_HTTP_TOKEN_FILE") {
        if !path.is_empty() {
            let t = std::fs::read_to_string(&path).map_err(|e| {
                Error::Config(format!("reading CONSUL_HTTP_TOKEN_FILE {path}: {e}"))
            })?;
            let t = t.trim();
            if !t.is_empty() {
                return Ok(Some(t.to_string()));
            }
        }
    }
    Ok(None)
}

/// `host:port` or `http://host:port[/]` → `http://host:port`.
fn normalize_addr(addr: &str) -> Result<String, Error> {
    let addr = addr.trim().trim_end_matches('/');
    let rest = if let Some(rest) = addr.strip_prefix("http://") {
        rest
    } else if addr.starts_with("https://") {
        return Err(Error::Config(format!(
            "{addr}: https is not supported; point CONSUL_HTTP_ADDR at the local agent's plain HTTP port"
        )));
    } else if addr.contains("://") {
        return Err(Error::Config(format!("{addr}: unsupported scheme")));
    } else {
        addr
    };
    if rest.is_empty() || rest.contains('/') {
        return Err(Error::Config(format!("{addr:?} is not host:port")));
    }
    let url = format!("http://{rest}");
    url.parse::<http::Uri>()
        .map_err(|e| Error::Config(format!("{addr:?}: {e}")))?;
    Ok(url)
}

/// Metadata of a read: Consul's `X-Consul-*` headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryMeta {
    /// `X-Consul-Index`; 0 when the header was missing.
    pub index: u64,
    /// `X-Consul-KnownLeader`.
    pub known_leader: bool,
    /// `X-Consul-LastContact`, in milliseconds.
    pub last_contact_ms: u64,
}

/// Options of `GET /v1/health/service/:name`.
#[derive(Debug, Clone, Default)]
pub struct HealthQuery {
    /// Only instances whose every check passes.
    pub passing: bool,
    /// Instances must carry all of these tags.
    pub tags: Vec<String>,
    /// Blocking index; 0 for an immediate answer.
    pub index: u64,
    /// Longest time to block; Consul's default (5 min) when `None`.
    pub wait: Option<Duration>,
}

/// The one connection of a [`Client::single_connection`] client, while it is idle.
type Slot = Arc<tokio::sync::Mutex<Option<http1::SendRequest<Full<Bytes>>>>>;

/// A typed Consul agent client. Cheap to clone: clones share one connection pool (or, for a
/// [`Client::single_connection`] client, its one connection).
#[derive(Clone)]
pub struct Client {
    http: HyperClient<HttpConnector, Full<Bytes>>,
    config: Arc<ClientConfig>,
    /// Set for a client of one connection.
    single: Option<Slot>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.config.base_url)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the agent described by `config`.
    pub fn new(config: ClientConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self {
            http,
            config: Arc::new(config),
            single: None,
        }
    }

    /// A client of the same agent that holds at most one connection, and sends its calls
    /// one at a time over it. A pooled client opens a new connection whenever a call starts
    /// before the previous call's connection is back in the pool; this one never does, so a
    /// watcher made of N such clients holds at most N connections to the agent.
    pub fn single_connection(&self) -> Client {
        Client {
            http: self.http.clone(),
            config: Arc::clone(&self.config),
            single: Some(Slot::default()),
        }
    }

    /// Sends `req` over the one connection of `slot`, opening it when there is none (or the
    /// old one closed). Calls wait for each other.
    async fn send_single(
        &self,
        slot: &Slot,
        mut req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, Error> {
        let transport = |e: hyper::Error| Error::Transport(Box::new(e));
        let mut idle = slot.lock().await;
        // Taken out while in use: a call cancelled halfway leaves no half-used connection.
        let mut sender = match idle.take() {
            Some(mut s) => match s.ready().await {
                Ok(()) => s,
                Err(_) => self.connect_one().await?,
            },
            None => self.connect_one().await?,
        };
        // Origin form, as on any connection to an origin server.
        if let Some(a) = req.uri().authority() {
            if let Ok(host) = http::HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(http::header::HOST, host);
            }
        }
        if let Some(pq) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = http::Uri::from(pq);
        }
        let resp = sender.send_request(req).await.map_err(transport)?;
        // Back for the next call, whose `ready` waits until this answer has been read.
        *idle = Some(sender);
        Ok(resp)
    }

    async fn connect_one(&self) -> Result<http1::SendRequest<Full<Bytes>>, Error> {
        let addr = self
            .config
            .base_url
            .strip_prefix("http://")
            .unwrap_or(&self.config.base_url);
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Timeout(CONNECT_TIMEOUT))?
            .map_err(|e| Error::Transport(Box::new(e)))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Transport(Box::new(e)))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// A client configured from `CONSUL_HTTP_ADDR` / `CONSUL_HTTP_TOKEN[_FILE]`.
    pub fn from_env() -> Result<Self, Error> {
        Ok(Self::new(ClientConfig::from_env()?))
    }

    /// The agent's base URL, for messages.
    pub fn base_url(&self) -> &str {
        &self.config.base_url
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Bytes, Error> {
        let mut buf = Vec::new();
        let into = &mut buf;
        self.exchange(method, path_and_query, body, timeout, move |h| {
            into.reserve(content_length(h).unwrap_or(0).min(MAX_BODY));
            Some(move |chunk: &[u8]| {
                into.extend_from_slice(chunk);
                Ok(())
            })
        })
        .await?;
        Ok(Bytes::from(buf))
    }

    /// Sends a request and hands a 200 answer's body, chunk by chunk as it arrives, to the
    /// sink `pick` chooses from the answer's headers (`None`: the body is read and dropped, so
    /// the connection stays usable). Any other status is an error carrying the body. The
    /// deadline covers the whole body.
    async fn exchange<P, S>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        pick: P,
    ) -> Result<HeaderMap, Error>
    where
        P: FnOnce(&HeaderMap) -> Option<S>,
        S: FnMut(&[u8]) -> Result<(), Error>,
    {
        let uri = format!("{}{}", self.config.base_url, path_and_query);
        let mut req = Request::builder().method(method).uri(&uri);
        if let Some(token) = &self.config.token {
            req = req.header("X-Consul-Token", token);
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Config(format!("bad request URI {uri}: {e}")))?;
        let fut = async {
            let resp = match &self.single {
                Some(slot) => self.send_single(slot, req).await?,
                None => self
                    .http
                    .request(req)
                    .await
                    .map_err(|e| Error::Transport(Box::new(e)))?,
            };
            let (parts, mut body) = resp.into_parts();
            if parts.status != StatusCode::OK {
                let text = read_body(body, content_length(&parts.headers)).await?;
                return Err(Error::Status {
                    status: parts.status.as_u16(),
                    body: String::from_utf8_lossy(&text).into_owned(),
                });
            }
            let mut sink = pick(&parts.headers);
            let mut total = 0usize;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| Error::Transport(Box::new(e)))?;
                if let Ok(data) = frame.into_data() {
                    total += data.len();
                    if total > MAX_BODY {
                        return Err(Error::Transport(
                            format!("answer larger than {MAX_BODY} bytes").into(),
                        ));
                    }
                    if let Some(sink) = sink.as_mut() {
                        sink(&data)?;
                    }
                }
            }
            Ok(parts.headers)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout(timeout))?
    }

    async fn write(&self, path_and_query: &str, body: Option<Vec<u8>>) -> Result<(), Error> {
        self.call(Method::PUT, path_and_query, body, self.config.timeout)
            .await
            .map(drop)
    }

    async fn read<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, Error> {
        let a = self
            .call(Method::GET, path_and_query, None, self.config.timeout)
            .await?;
        serde_json::from_slice(&a).map_err(Error::Decode)
    }

    /// A blocking read: adds `index`/`wait` and a deadline that outlasts Consul's jitter.
    async fn blocking<T: DeserializeOwned>(
        &self,
        path: &str,
        query: String,
        index: u64,
        wait: Option<Duration>,
    ) -> Result<(T, QueryMeta), Error> {
        let (value, meta) = self.blocking_read(path, query, index, wait, false).await?;
        // Only `None` when asked to skip unchanged answers.
        value
            .map(|v| (v, meta))
            .ok_or(Error::Timeout(Duration::ZERO))
    }

    /// [`Client::blocking`], but an answer at the index the query blocked on (the wait ran out
    /// with nothing new) is not decoded when `skip_unchanged`: `None`, as the caller has that
    /// data already. Renewing a blocking query on a large answer then costs the transfer only.
    async fn blocking_read<T: DeserializeOwned>(
        &self,
        path: &str,
        query: String,
        index: u64,
        wait: Option<Duration>,
        skip_unchanged: bool,
    ) -> Result<(Option<T>, QueryMeta), Error> {
        let (body, meta) = self
            .blocking_bytes(path, query, index, wait, skip_unchanged)
            .await?;
        let value = match body {
            Some(b) => Some(serde_json::from_slice(&b).map_err(Error::Decode)?),
            None => None,
        };
        Ok((value, meta))
    }

    /// [`Client::blocking_read`] without the decoding: the answer's body.
    async fn blocking_bytes(
        &self,
        path: &str,
        query: String,
        index: u64,
        wait: Option<Duration>,
        skip_unchanged: bool,
    ) -> Result<(Option<Bytes>, QueryMeta), Error> {
        let mut body = Vec::new();
        let (fed, meta) = self
            .blocking_stream(path, query, index, wait, skip_unchanged, |chunk| {
                body.extend_from_slice(chunk);
                Ok(())
            })
            .await?;
        Ok((fed.then(|| Bytes::from(body)), meta))
    }

    /// A blocking read whose body goes to `sink` chunk by chunk as it arrives, never held
    /// whole: for answers of megabytes that the caller only reduces. With `skip_unchanged`, an
    /// answer at `index` (the wait ran out with nothing new) is read past, not handed over:
    /// `false`.
    async fn blocking_stream(
        &self,
        path: &str,
        query: String,
        index: u64,
        wait: Option<Duration>,
        skip_unchanged: bool,
        sink: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(bool, QueryMeta), Error> {
        let (pq, timeout) = self.blocking_target(path, query, index, wait);
        let mut fed = false;
        let fed_flag = &mut fed;
        let headers = self
            .exchange(Method::GET, &pq, None, timeout, move |h| {
                let skip = skip_unchanged && index > 0 && query_meta(h).index == index;
                *fed_flag = !skip;
                (!skip).then_some(sink)
            })
            .await?;
        Ok((fed, query_meta(&headers)))
    }

    /// The path and query of a blocking read at `index`, and its deadline.
    fn blocking_target(
        &self,
        path: &str,
        mut query: String,
        index: u64,
        wait: Option<Duration>,
    ) -> (String, Duration) {
        let mut timeout = self.config.timeout;
        if index > 0 {
            let wait = wait.unwrap_or(DEFAULT_WAIT);
            let _ = write!(query, "&index={index}&wait={}ms", wait.as_millis());
            timeout = wait + wait / 16 + BLOCKING_MARGIN;
        }
        let pq = match query.strip_prefix('&') {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        (pq, timeout)
    }

    /// `PUT /v1/agent/service/register?replace-existing-checks=true`: idempotent, so a
    /// re-registration leaves exactly the checks it names.
    pub async fn register(&self, reg: &ServiceRegistration) -> Result<(), Error> {
        let body = serde_json::to_vec(reg).map_err(Error::Decode)?;
        self.write(
            "/v1/agent/service/register?replace-existing-checks=true",
            Some(body),
        )
        .await
    }

    /// `PUT /v1/agent/service/deregister/:id`.
    pub async fn deregister(&self, service_id: &str) -> Result<(), Error> {
        self.write(
            &format!("/v1/agent/service/deregister/{}", enc(service_id)),
            None,
        )
        .await
    }

    /// `PUT /v1/agent/service/maintenance/:id?enable=..&reason=..`.
    pub async fn maintenance(
        &self,
        service_id: &str,
        enable: bool,
        reason: Option<&str>,
    ) -> Result<(), Error> {
        let mut pq = format!(
            "/v1/agent/service/maintenance/{}?enable={enable}",
            enc(service_id)
        );
        if let Some(r) = reason {
            let _ = write!(pq, "&reason={}", enc(r));
        }
        self.write(&pq, None).await
    }

    /// `PUT /v1/agent/check/pass/:id?note=..`.
    pub async fn check_pass(&self, check_id: &str, note: Option<&str>) -> Result<(), Error> {
        self.ttl("pass", check_id, note).await
    }

    /// `PUT /v1/agent/check/warn/:id?note=..`.
    pub async fn check_warn(&self, check_id: &str, note: Option<&str>) -> Result<(), Error> {
        self.ttl("warn", check_id, note).await
    }

    /// `PUT /v1/agent/check/fail/:id?note=..`.
    pub async fn check_fail(&self, check_id: &str, note: Option<&str>) -> Result<(), Error> {
        self.ttl("fail", check_id, note).await
    }

    async fn ttl(&self, verb: &str, check_id: &str, note: Option<&str>) -> Result<(), Error> {
        let mut pq = format!("/v1/agent/check/{verb}/{}", enc(check_id));
        if let Some(n) = note {
            let _ = write!(pq, "?note={}", enc(n));
        }
        self.write(&pq, None).await
    }

    /// `PUT /v1/agent/check/update/:id` with `{"Status", "Output"}`.
    pub async fn check_update(
        &self,
        check_id: &str,
        status: &str,
        output: &str,
    ) -> Result<(), Error> {
        let body = serde_json::to_vec(&CheckUpdate {
            status: status.to_string(),
            output: output.to_string(),
        })
        .map_err(Error::Decode)?;
        self.write(
            &format!("/v1/agent/check/update/{}", enc(check_id)),
            Some(body),
        )
        .await
    }

    /// `GET /v1/health/service/:name`, blocking when `q.index > 0`.
    pub async fn health_service(
        &self,
        service: &str,
        q: &HealthQuery,
    ) -> Result<(Vec<ServiceEntry>, QueryMeta), Error> {
        let mut query = String::new();
        if q.passing {
            query.push_str("&passing=1");
        }
        for t in &q.tags {
            let _ = write!(query, "&tag={}", enc(t));
        }
        let path = format!("/v1/health/service/{}", enc(service));
        self.blocking(&path, query, q.index, q.wait).await
    }

    /// `GET /v1/health/checks/:service`.
    pub async fn health_checks(&self, service: &str) -> Result<Vec<HealthCheck>, Error> {
        self.read(&format!("/v1/health/checks/{}", enc(service)))
            .await
    }

    /// `GET /v1/catalog/services`: service name → tags, blocking when `index > 0`.
    pub async fn catalog_services(
        &self,
        index: u64,
        wait: Option<Duration>,
    ) -> Result<(std::collections::BTreeMap<String, Vec<String>>, QueryMeta), Error> {
        self.blocking("/v1/catalog/services", String::new(), index, wait)
            .await
    }

    /// `GET /v1/health/state/:state` (`any`, `passing`, `warning`, `critical`): every check in
    /// that state, blocking when `index > 0`; `None` when the answer is at `index` (nothing
    /// changed: it is not decoded). Rows decode into the caller's `T`, so a watcher that needs
    /// a few fields of ten thousand checks allocates only those.
    pub async fn health_state_changed<T: DeserializeOwned>(
        &self,
        state: &str,
        index: u64,
        wait: Option<Duration>,
    ) -> Result<(Option<Vec<T>>, QueryMeta), Error> {
        let path = format!("/v1/health/state/{}", enc(state));
        self.blocking_read(&path, String::new(), index, wait, true)
            .await
    }

    /// [`Client::health_state_changed`] undecoded and never held whole: the JSON body goes
    /// to `sink` chunk by chunk as it arrives, for a caller that reduces ten thousand checks
    /// to a few numbers. `false` when the answer is at `index` (the sink saw nothing).
    pub async fn health_state_stream(
        &self,
        state: &str,
        index: u64,
        wait: Option<Duration>,
        sink: impl FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<(bool, QueryMeta), Error> {
        let path = format!("/v1/health/state/{}", enc(state));
        self.blocking_stream(&path, String::new(), index, wait, true, sink)
            .await
    }

    /// [`Client::catalog_services`], `None` when the answer is at `index` (not decoded).
    pub async fn catalog_services_changed(
        &self,
        index: u64,
        wait: Option<Duration>,
    ) -> Result<
        (
            Option<std::collections::BTreeMap<String, Vec<String>>>,
            QueryMeta,
        ),
        Error,
    > {
        self.blocking_read("/v1/catalog/services", String::new(), index, wait, true)
            .await
    }

    /// `GET /v1/agent/service/:id`; `Ok(None)` when the agent does not know the ID (404), which
    /// is how a worker notices that a restarted agent lost its registration.
    pub async fn agent_service(&self, service_id: &str) -> Result<Option<AgentService>, Error> {
        match self
            .read(&format!("/v1/agent/service/{}", enc(service_id)))
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(Error::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/agent/services`: service ID → service.
    pub async fn agent_services(
        &self,
    ) -> Result<std::collections::BTreeMap<String, AgentService>, Error> {
        self.read("/v1/agent/services").await
    }

    /// `GET /v1/agent/checks`: check ID → check.
    pub async fn agent_checks(
        &self,
    ) -> Result<std::collections::BTreeMap<String, HealthCheck>, Error> {
        self.read("/v1/agent/checks").await
    }

    /// `GET /v1/agent/members`.
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        self.read("/v1/agent/members").await
    }

    /// `GET /v1/agent/members?wan`: the servers of every datacenter.
    pub async fn members_wan(&self) -> Result<Vec<Member>, Error> {
        self.read("/v1/agent/members?wan=1").await
    }

    /// `GET /v1/agent/self` (the `Config` and `Member` parts).
    pub async fn agent_self(&self) -> Result<AgentSelf, Error> {
        self.read("/v1/agent/self").await
    }

    /// `GET /v1/status/leader`: `ip:port` of the Raft leader, empty when there is none.
    pub async fn status_leader(&self) -> Result<String, Error> {
        self.read("/v1/status/leader").await
    }
}

/// Reads a whole answer into one buffer sized by its `Content-Length`: a large answer
/// (`health/state/any` of 10,000 checks is megabytes) is copied once, each piece freed as it
/// is copied, rather than held in pieces and then copied whole.
fn content_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
}

async fn read_body(mut body: hyper::body::Incoming, len: Option<usize>) -> Result<Bytes, Error> {
    let mut buf = Vec::with_capacity(len.unwrap_or(0).min(MAX_BODY));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::Transport(Box::new(e)))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > MAX_BODY {
                return Err(Error::Transport(
                    format!("answer larger than {MAX_BODY} bytes").into(),
                ));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

fn query_meta(headers: &HeaderMap) -> QueryMeta {
    let num = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    QueryMeta {
        index: num("X-Consul-Index").unwrap_or(0),
        known_leader: headers
            .get("X-Consul-KnownLeader")
            .is_some_and(|v| v.as_bytes() == b"true"),
        last_contact_ms: num("X-Consul-LastContact").unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_addresses() {
        assert_eq!(
            normalize_addr("127.0.0.1:8500").ok().as_deref(),
            Some("http://127.0.0.1:8500")
        );
        assert_eq!(
            normalize_addr("http://consul.local:8500/").ok().as_deref(),
            Some("http://consul.local:8500")
        );
        assert!(normalize_addr("https://x:8501").is_err());
        assert!(normalize_addr("").is_err());
        assert!(normalize_addr("a:1/path").is_err());
    }

    #[test]
    fn encodes_components() {
        assert_eq!(enc("web#1 a/b"), "web%231%20a%2Fb");
        assert_eq!(enc("a-b_c.d~e"), "a-b_c.d~e");
    }
}
