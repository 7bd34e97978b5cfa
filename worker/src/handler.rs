//! Request handling: routing, the identity answer, health, the admin switch and the test
//! endpoints. Pure request → response; the accept loop lives in [`crate::server`].
//!
//! Each listener serves one [`Surface`]: the service port never routes `/admin/*`, so nothing
//! a proxy relays to it can reach the health switch.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde::Serialize;

use crate::config::{Config, Identity, MAX_DELAY};

/// Response body: small fixed answers, or the request body streamed back by `/echo`.
pub type Body = BoxBody<Bytes, BoxError>;
/// Error type of [`Body`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Names every answer with the instance that produced it, so balancer tests can count.
pub const WORKER_ID_HEADER: &str = "x-worker-id";
/// Header carrying `--admin-token` on `PUT /admin/health`.
pub const ADMIN_TOKEN_HEADER: &str = "x-admin-token";
/// The admin body is one word; anything longer is refused without buffering it.
const ADMIN_BODY_LIMIT: usize = 64;
/// Headers a proxy adds: a request carrying one came through a balancer, so its loopback peer
/// address says nothing about who sent it.
const PROXY_HEADERS: [&str; 4] = ["forwarded", "x-forwarded-for", "x-real-ip", "via"];

/// State shared by every connection: fixed identity, counters and health flags.
#[derive(Debug)]
pub struct State {
    identity: Identity,
    message: String,
    admin_token: Option<String>,
    delay: Duration,
    /// Pre-built `X-Worker-Id`; `None` when the ID is not a valid header value.
    id_header: Option<HeaderValue>,
    /// Requests answered, `/health` and `/admin/*` excluded (Consul's probes would drown
    /// the number a person watches go up).
    requests: AtomicU64,
    /// Cleared by `PUT /admin/health fail`, set again by `pass`.
    healthy: AtomicBool,
    /// Set once on shutdown, never cleared: `/health` answers 503 from then on.
    draining: AtomicBool,
}

impl State {
    /// State for an instance with this identity.
    pub fn new(config: &Config, identity: Identity) -> Self {
        Self {
            id_header: HeaderValue::from_str(&identity.id).ok(),
            identity,
            message: config.message.clone(),
            admin_token: config.admin_token.clone(),
            delay: config.delay,
            requests: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
        }
    }

    /// The instance's identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Starts answering 503 on `/health`; the shutdown sequence calls it before leaving Consul.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn health(&self) -> Health {
        if self.draining.load(Ordering::SeqCst) {
            Health::Draining
        } else if self.healthy.load(Ordering::SeqCst) {
            Health::Healthy
        } else {
            Health::Unhealthy
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Healthy,
    Unhealthy,
    Draining,
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "ok",
            Self::Unhealthy => "unhealthy",
            Self::Draining => "draining",
        }
    }
}

/// The identity answer, as JSON.
#[derive(Debug, Serialize)]
struct IdentityBody<'a> {
    service: &'a str,
    id: &'a str,
    address: String,
    host: &'a str,
    port: u16,
    message: &'a str,
    request: u64,
    health: &'static str,
}

/// The `/headers` answer.
#[derive(Debug, Serialize)]
struct HeadersBody {
    peer: String,
    method: String,
    uri: String,
    version: String,
    headers: BTreeMap<String, Vec<String>>,
}

/// Which endpoints a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The service port (`--listen`): what the balancer and Consul's check reach.
    Service,
    /// The admin listener (`--admin`): the health switch, loopback only.
    Admin,
}

/// Answers one request on a listener serving `surface`. Never fails: every problem becomes a
/// status code.
pub async fn handle(
    state: &State,
    surface: Surface,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut resp = route(state, surface, peer, req).await;
    if let Some(id) = &state.id_header {
        resp.headers_mut()
            .insert(HeaderName::from_static(WORKER_ID_HEADER), id.clone());
    }
    Ok(resp)
}

/// The endpoints, decided from the path alone before the method is checked (405 vs 404).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Identity,
    Health,
    AdminHealth,
    Echo,
    Delay,
    Headers,
}

impl Route {
    fn from_path(surface: Surface, path: &str) -> Option<Self> {
        Some(match (surface, path) {
            (Surface::Service, "/") => Self::Identity,
            (Surface::Service, "/health") => Self::Health,
            (Surface::Service, "/echo") => Self::Echo,
            (Surface::Service, "/delay") => Self::Delay,
            (Surface::Service, "/headers") => Self::Headers,
            (Surface::Admin, "/admin/health") => Self::AdminHealth,
            _ => return None,
        })
    }

    /// The `Allow` header value, and whether `method` is in it.
    fn allows(self, method: &Method) -> (&'static str, bool) {
        match self {
            Self::Identity | Self::Health | Self::Delay | Self::Headers => {
                ("GET, HEAD", matches!(*method, Method::GET | Method::HEAD))
            }
            Self::AdminHealth => ("GET, PUT", matches!(*method, Method::GET | Method::PUT)),
            Self::Echo => ("POST", *method == Method::POST),
        }
    }

    /// Health and admin describe the instance rather than serve traffic: they are not counted
    /// and not delayed (a delayed probe would fail Consul's check).
    fn is_traffic(self) -> bool {
        !matches!(self, Self::Health | Self::AdminHealth)
    }
}

async fn route(
    state: &State,
    surface: Surface,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some(route) = Route::from_path(surface, req.uri().path()) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let (allow, ok) = route.allows(req.method());
    if !ok {
        return method_not_allowed(allow);
    }
    let mut n = 0;
    if route.is_traffic() {
        n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if !state.delay.is_zero() {
            tokio::time::sleep(state.delay).await;
        }
    }
    match route {
        Route::Identity => identity(state, n, req.headers()),
        Route::Health => health(state),
        Route::AdminHealth => admin_health(state, peer, req).await,
        Route::Echo => echo(req),
        Route::Delay => delay(state, req.uri().query()).await,
        Route::Headers => headers(peer, &req),
    }
}

fn identity(state: &State, n: u64, req_headers: &HeaderMap) -> Response<Body> {
    let id = &state.identity;
    let wants_json = req_headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/json"));
    let mut resp = if wants_json {
        let body = IdentityBody {
            service: &id.service,
            id: &id.id,
            address: id.address(),
            host: &id.host,
            port: id.port,
            message: &state.message,
            request: n,
            health: state.health().as_str(),
        };
        json(StatusCode::OK, &body)
    } else {
        let mut line = format!("{} ({}, {}) request {n}", id.id, id.service, id.address());
        if !state.message.is_empty() {
            line.push_str(": ");
            line.push_str(&state.message);
        }
        line.push('\n');
        text(StatusCode::OK, line)
    };
    // The answer depends on Accept; caches between client and balancer must know.
    resp.headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    resp
}

fn health(state: &State) -> Response<Body> {
    let h = state.health();
    let status = match h {
        Health::Healthy => StatusCode::OK,
        Health::Unhealthy | Health::Draining => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut resp = text(status, format!("{}\n", h.as_str()));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Why an admin request was refused; the text goes to the client and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminDenied {
    /// The peer is not on loopback.
    NotLoopback,
    /// The request came through a proxy (forwarding headers present).
    Proxied,
    /// `--admin-token` is set and the header is missing or wrong.
    BadToken,
}

impl AdminDenied {
    fn reason(self) -> &'static str {
        match self {
            Self::NotLoopback => "admin requests are accepted from loopback clients only\n",
            Self::Proxied => "admin requests through a proxy are refused\n",
            Self::BadToken => "missing or wrong X-Admin-Token\n",
        }
    }
}

/// Who may flip the health switch on the admin listener: a loopback peer, not relayed by a
/// proxy, with the admin token when one is configured.
///
/// The switch's real protection is that it is not on the service port at all (a request
/// smuggled past a proxy on the same host arrives from loopback without forwarding headers);
/// these checks are the second line, for an admin port someone forwards or proxies by mistake.
pub fn authorize_admin(
    peer: SocketAddr,
    headers: &HeaderMap,
    token: Option<&str>,
) -> Result<(), AdminDenied> {
    // `::ffff:127.0.0.1` is loopback too when a dual-stack socket accepted an IPv4 client.
    if !peer.ip().to_canonical().is_loopback() {
        return Err(AdminDenied::NotLoopback);
    }
    if PROXY_HEADERS.iter().any(|h| headers.contains_key(*h)) {
        return Err(AdminDenied::Proxied);
    }
    if let Some(expected) = token {
        let given = headers
            .get(ADMIN_TOKEN_HEADER)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !constant_time_eq(given, expected.as_bytes()) {
            return Err(AdminDenied::BadToken);
        }
    }
    Ok(())
}

/// Compares without an early exit, so response timing does not reveal a token's prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn admin_health(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    if let Err(denied) = authorize_admin(peer, req.headers(), state.admin_token.as_deref()) {
        tracing::warn!(%peer, reason = ?denied, "admin request refused");
        return text(StatusCode::FORBIDDEN, denied.reason());
    }
    if req.method() == Method::GET {
        return text(StatusCode::OK, format!("{}\n", state.health().as_str()));
    }
    let wanted = match query_param(req.uri().query(), "state") {
        Some(s) => s,
        None => match Limited::new(req.into_body(), ADMIN_BODY_LIMIT)
            .collect()
            .await
        {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
            Err(_) => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "expected a body of pass or fail\n",
                )
            }
        },
    };
    let healthy = match wanted.trim() {
        "pass" => true,
        "fail" => false,
        _ => return text(StatusCode::BAD_REQUEST, "expected pass or fail\n"),
    };
    let was = state.healthy.swap(healthy, Ordering::SeqCst);
    if was != healthy {
        tracing::info!(%peer, healthy, "health switched by an operator");
    }
    text(StatusCode::OK, format!("{}\n", state.health().as_str()))
}

/// Streams the body back as it arrives: nothing is buffered beyond hyper's own frames.
fn echo(req: Request<Incoming>) -> Response<Body> {
    let content_type = req.headers().get(header::CONTENT_TYPE).cloned();
    let mut resp = Response::new(req.into_body().map_err(BoxError::from).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    resp
}

async fn delay(state: &State, query: Option<&str>) -> Response<Body> {
    let max_ms = MAX_DELAY.as_millis();
    let ms = match query_param(query, "ms").map(|v| v.parse::<u64>()) {
        Some(Ok(ms)) if u128::from(ms) <= max_ms => ms,
        _ => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("expected ?ms=N with 0 <= N <= {max_ms}\n"),
            )
        }
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    text(
        StatusCode::OK,
        format!("{} answered after {ms} ms\n", state.identity.id),
    )
}

fn headers<B>(peer: SocketAddr, req: &Request<B>) -> Response<Body> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in req.headers() {
        map.entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let body = HeadersBody {
        peer: peer.to_string(),
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        version: format!("{:?}", req.version()),
        headers: map,
    };
    json(StatusCode::OK, &body)
}

/// The first value of `name` in a query string, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(mut bytes) => {
            bytes.push(b'\n');
            let mut resp = Response::new(full(bytes));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        // Our own structs of strings and integers always serialize; answer rather than panic.
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn admin_needs_loopback_no_proxy_and_token() {
        let none = HeaderMap::new();
        assert_eq!(authorize_admin(sa("127.0.0.1:1"), &none, None), Ok(()));
        assert_eq!(authorize_admin(sa("[::1]:1"), &none, None), Ok(()));
        assert_eq!(
            authorize_admin(sa("[::ffff:127.0.0.1]:1"), &none, None),
            Ok(())
        );
        assert_eq!(
            authorize_admin(sa("10.0.0.9:1"), &none, None),
            Err(AdminDenied::NotLoopback)
        );
        assert_eq!(
            authorize_admin(sa("[::ffff:10.0.0.9]:1"), &none, None),
            Err(AdminDenied::NotLoopback)
        );
        let mut proxied = HeaderMap::new();
        proxied.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        assert_eq!(
            authorize_admin(sa("127.0.0.1:1"), &proxied, None),
            Err(AdminDenied::Proxied)
        );
        assert_eq!(
            authorize_admin(sa("127.0.0.1:1"), &none, Some("s3cret")),
            Err(AdminDenied::BadToken)
        );
        let mut good = HeaderMap::new();
        good.insert(ADMIN_TOKEN_HEADER, HeaderValue::from_static("s3cret"));
        assert_eq!(
            authorize_admin(sa("127.0.0.1:1"), &good, Some("s3cret")),
            Ok(())
        );
        let mut bad = HeaderMap::new();
        bad.insert(ADMIN_TOKEN_HEADER, HeaderValue::from_static("s3cre"));
        assert_eq!(
            authorize_admin(sa("127.0.0.1:1"), &bad, Some("s3cret")),
            Err(AdminDenied::BadToken)
        );
        // A token does not open the door to remote peers.
        assert_eq!(
            authorize_admin(sa("10.0.0.9:1"), &good, Some("s3cret")),
            Err(AdminDenied::NotLoopback)
        );
    }

    #[test]
    fn reads_query_params() {
        assert_eq!(query_param(Some("ms=250"), "ms").as_deref(), Some("250"));
        assert_eq!(
            query_param(Some("a=1&ms=2&ms=3"), "ms").as_deref(),
            Some("2")
        );
        assert_eq!(
            query_param(Some("state=f%61il"), "state").as_deref(),
            Some("fail")
        );
        assert_eq!(query_param(Some("ms"), "ms").as_deref(), Some(""));
        assert_eq!(query_param(Some("x=1"), "ms"), None);
        assert_eq!(query_param(None, "ms"), None);
    }

    #[test]
    fn health_reflects_switch_and_draining() {
        let cfg = Config::default();
        let st = State::new(&cfg, cfg.identity(sa("127.0.0.1:9001")).unwrap());
        assert_eq!(st.health(), Health::Healthy);
        st.healthy.store(false, Ordering::SeqCst);
        assert_eq!(st.health(), Health::Unhealthy);
        st.healthy.store(true, Ordering::SeqCst);
        st.set_draining();
        // Draining wins over a "pass": once leaving, the instance never looks healthy again.
        assert_eq!(st.health(), Health::Draining);
        assert_eq!(health(&st).status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
