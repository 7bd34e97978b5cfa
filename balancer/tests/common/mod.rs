//! Helpers shared by the balancer's integration tests: small hyper backends on `127.0.0.1:0`
//! that answer with their own name (and can echo, hash, report headers, be slow, or be killed
//! for real), the balancer run in-process, the embedded Consul dev agent, HTTP clients, a steady
//! load generator, and polling with a deadline instead of fixed sleeps; in [`raw`], a scripted
//! upstream and a client that speak HTTP/1 over bare sockets.
//!
//! Everything started here is stopped on drop, pass or fail.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod raw;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use balancer::{App, Config, Route};
use bytes::Bytes;
use discovery::agent::AgentConfig;
use discovery::wire::ServiceRegistration;
use discovery::{Client, ClientConfig, Instance};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long a condition may take before a test fails. Generous: the tests share two cores
/// with parallel builds.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Installs a test log writer once, when `RUST_LOG` asks for it.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// FNV-1a, 64 bit: streams over chunks, so the backend and the test agree however the body
/// was split on the way.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

/// `"<length> <fnv hex>"`, as the backend's `/hash` answers.
pub fn digest(data: &[u8]) -> String {
    let mut h = Fnv::default();
    h.update(data);
    format!("{} {:016x}", data.len(), h.finish())
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

type RespBody = BoxBody<Bytes, hyper::Error>;

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// What a backend saw; shared with its connection tasks.
#[derive(Default)]
pub struct Seen {
    /// Requests whose head arrived.
    pub hits: AtomicU64,
    /// The `x-seq` header of every request that carried one, in arrival order.
    pub seqs: Mutex<Vec<u64>>,
    /// TCP connections accepted.
    pub connections: AtomicU64,
}

/// A small HTTP/1.1 server standing in for a service instance. It answers with its own name,
/// and by path (the last segment, so it works behind any route prefix):
///
/// - `/echo`: streams the request body back;
/// - `/hash`: reads the body and answers `"<length> <fnv hex>"` plus the request's
///   `content-length` / `transfer-encoding` in headers;
/// - `/headers`: the request head as JSON (`{"headers": [[name, value], ...]}`);
/// - `/slow?ms=N`: waits N ms, then answers.
///
/// [`Backend::kill`] makes it vanish like a crashed process: listener closed (new connects are
/// refused) and every accepted connection closed, pooled ones included.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    server: Server,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let seen = Arc::new(Seen::default());
        let name_c: Arc<str> = name.into();
        let seen_c = Arc::clone(&seen);
        let seen_count = Arc::clone(&seen);
        let server = Server::start(
            move || {
                seen_count.connections.fetch_add(1, Ordering::Relaxed);
            },
            move |stream| {
                let (name, seen) = (Arc::clone(&name_c), Arc::clone(&seen_c));
                let svc = hyper::service::service_fn(move |req| {
                    serve(Arc::clone(&name), Arc::clone(&seen), req)
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                })
            },
        )
        .await;
        Backend {
            name: name.to_string(),
            addr: server.addr,
            seen,
            server,
        }
    }

    /// Requests received so far.
    pub fn hits(&self) -> u64 {
        self.seen.hits.load(Ordering::Relaxed)
    }

    pub fn seqs(&self) -> Vec<u64> {
        self.seen.seqs.lock().unwrap().clone()
    }

    /// This backend as a static instance of `service`.
    pub fn instance(&self, service: &str) -> Instance {
        instance(&self.name, service, self.addr)
    }

    /// This backend as a Consul registration of `service` (no check: passing at once).
    pub fn registration(&self, service: &str) -> ServiceRegistration {
        ServiceRegistration {
            id: Some(self.name.clone()),
            name: service.into(),
            address: Some("127.0.0.1".into()),
            port: Some(self.addr.port()),
            ..Default::default()
        }
    }

    /// Dies like a killed process: stops accepting, closes the listener and every open
    /// connection, and returns once all of that has happened.
    pub async fn kill(&mut self) {
        self.server.kill().await;
    }
}

/// Three [`Backend`]s, named `b1`, `b2` and `b3`.
pub async fn three_backends() -> Vec<Backend> {
    vec![
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ]
}

/// A listener on `127.0.0.1:0` and every task serving it (see [`accept_loop`]); all of them
/// are stopped on drop.
pub struct Server {
    pub addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
    /// Every connection task ever spawned (finished ones pruned), so `kill` can close them.
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    /// Binds `127.0.0.1:0` and serves it with [`accept_loop`].
    pub async fn start(
        accepted: impl Fn() + Send + 'static,
        serve: impl Fn(TcpStream) -> JoinHandle<()> + Send + 'static,
    ) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = accept_loop(listener, accepted, Arc::clone(&conns), serve);
        Server {
            addr,
            accept: Some(accept),
            conns,
        }
    }

    /// Stops accepting, closes the listener and every open connection, and returns once all
    /// of that has happened.
    pub async fn kill(&mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
            // Dropping the aborted accept future drops (closes) the listener.
            let _ = t.await;
        }
        let conns: Vec<_> = std::mem::take(&mut *self.conns.lock().unwrap());
        for t in conns {
            t.abort();
            // Dropping the aborted connection future closes its socket.
            let _ = t.await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = self.accept.take() {
            t.abort();
        }
        if let Ok(mut c) = self.conns.lock() {
            for t in c.drain(..) {
                t.abort();
            }
        }
    }
}

/// Accepts on `listener` until aborted. Each connection (with TCP_NODELAY) is counted by
/// `accepted` and served by the task `serve` spawns, which is kept in `conns` so that a
/// test can close every connection, as a dying process would.
fn accept_loop(
    listener: TcpListener,
    accepted: impl Fn() + Send + 'static,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    serve: impl Fn(TcpStream) -> JoinHandle<()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            accepted();
            let task = serve(stream);
            let mut c = conns.lock().unwrap();
            c.retain(|t| !t.is_finished());
            c.push(task);
        }
    })
}

/// A static instance of `service` with ID `id` at `addr`.
pub fn instance(id: &str, service: &str, addr: SocketAddr) -> Instance {
    Instance {
        id: id.into(),
        service: service.into(),
        address: addr.ip().to_string(),
        port: addr.port(),
        tags: vec![],
        meta: Default::default(),
        weights: (1, 1),
    }
}

/// An address nobody listens on (connections are refused).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

async fn serve(
    name: Arc<str>,
    seen: Arc<Seen>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    seen.hits.fetch_add(1, Ordering::Relaxed);
    if let Some(seq) = req
        .headers()
        .get("x-seq")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        seen.seqs.lock().unwrap().push(seq);
    }
    let path = req.uri().path().to_string();
    let last = path.rsplit('/').next().unwrap_or("");
    let mut resp = match last {
        "echo" => Response::new(req.into_body().boxed()),
        "hash" => {
            let cl = header_str(req.headers(), "content-length");
            let te = header_str(req.headers(), "transfer-encoding");
            let mut body = req.into_body();
            let (mut h, mut len) = (Fnv::default(), 0usize);
            let mut failed = None;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            h.update(d);
                            len += d.len();
                        }
                    }
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            let mut r = match failed {
                None => Response::new(full(format!("{len} {:016x}", h.finish()))),
                Some(e) => {
                    let mut r = Response::new(full(format!("body error: {e}")));
                    *r.status_mut() = StatusCode::BAD_REQUEST;
                    r
                }
            };
            r.headers_mut()
                .insert("x-got-content-length", cl.parse().unwrap());
            r.headers_mut()
                .insert("x-got-transfer-encoding", te.parse().unwrap());
            r
        }
        "headers" => {
            let list: Vec<serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    serde_json::json!([k.as_str(), String::from_utf8_lossy(v.as_bytes())])
                })
                .collect();
            let body = serde_json::json!({
                "method": req.method().as_str(),
                "uri": req.uri().to_string(),
                "version": format!("{:?}", req.version()),
                "headers": list,
            });
            Response::new(full(body.to_string()))
        }
        "slow" => {
            let ms: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(5_000);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full(name.to_string()))
        }
        _ => Response::new(full(name.to_string())),
    };
    resp.headers_mut()
        .insert("x-backend", name.parse().unwrap());
    Ok(resp)
}

fn header_str(h: &HeaderMap, name: &str) -> String {
    h.get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(",")
}

/// The request headers a `/headers` answer reports, in order.
pub fn reported_headers(answer: &Answer) -> Vec<(String, String)> {
    let v = answer.json();
    v["headers"]
        .as_array()
        .expect("headers array")
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The balancer, in-process
// ---------------------------------------------------------------------------------------------

/// A config for `routes` (`"web"`, `"api=/api"`) with test-friendly timeouts.
pub fn config(routes: &[&str]) -> Config {
    let routes = routes.iter().map(|r| Route::parse(r).unwrap()).collect();
    let mut c = Config::new(routes).unwrap();
    c.shutdown_grace = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c
}

/// A running balancer: proxy on `addr`, admin on `admin`. Stopped by [`Balancer::stop`], or
/// aborted on drop.
pub struct Balancer {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), balancer::Error>>>,
}

impl Balancer {
    pub async fn start(
        config: Config,
        client: Option<Client>,
        prepare: impl FnOnce(&App) + Send + 'static,
    ) -> Balancer {
        init_logs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(balancer::run(
            config,
            client,
            listener,
            Some(admin),
            prepare,
            async {
                let _ = rx.await;
            },
        ));
        Balancer {
            addr,
            admin: admin_addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A balancer without discovery, routing `service` to `instances`.
    pub async fn with_static(config: Config, services: Vec<(&str, Vec<Instance>)>) -> Balancer {
        let services: Vec<(String, Vec<Instance>)> = services
            .into_iter()
            .map(|(s, i)| (s.to_string(), i))
            .collect();
        Self::start(config, None, move |app| {
            for (name, instances) in services {
                app.service(&name)
                    .unwrap_or_else(|| panic!("{name} is routed"))
                    .set_static(instances);
            }
        })
        .await
    }

    /// `GET /status` on the admin listener, as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let a = get(self.admin, "/status").await.expect("GET /status");
        assert_eq!(a.status, StatusCode::OK, "/status: {}", a.text());
        a.json()
    }

    /// The status object of `service`.
    pub async fn service_status(&self, service: &str) -> serde_json::Value {
        let st = self.status().await;
        entry(&st, "services", "name", service)
    }

    /// The status object of instance `id` of `service`.
    pub async fn instance_status(&self, service: &str, id: &str) -> serde_json::Value {
        let s = self.service_status(service).await;
        entry(&s, "instances", "id", id)
    }

    /// IDs of the instances `service` currently routes to, per `/status`.
    pub async fn instance_ids(&self, service: &str) -> Vec<String> {
        let s = self.service_status(service).await;
        let mut ids: Vec<String> = s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// Waits until `service` routes to exactly `ids` (any order).
    pub async fn wait_for_instances(&self, service: &str, ids: &[&str]) {
        let mut want: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        want.sort();
        eventually(
            DEADLINE,
            &format!("{service} to route to {want:?}"),
            || async {
                let got = self.instance_ids(service).await;
                (got == want).then_some(())
            },
        )
        .await;
    }

    /// Stops the balancer the graceful way and checks that it returned `Ok`.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("the balancer stops within the deadline")
                .expect("the balancer task did not panic")
                .expect("the balancer returned Ok");
        }
    }
}

/// The element of the array `v[list]` whose `key` is `want`; panics, showing `v`, if none is.
fn entry(v: &serde_json::Value, list: &str, key: &str, want: &str) -> serde_json::Value {
    v[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[key] == want)
        .unwrap_or_else(|| panic!("{want} in {list} of /status: {v}"))
        .clone()
}

impl Drop for Balancer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The Consul dev agent, in-process
// ---------------------------------------------------------------------------------------------

/// An embedded dev agent that can be stopped, and started again (empty) on the same address.
pub struct Agent {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Agent {
    pub async fn start() -> Agent {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    /// Starts a fresh agent on `addr`; the port may take a moment to become free.
    pub async fn start_at(addr: SocketAddr) -> Agent {
        let listener = eventually(DEADLINE, &format!("binding {addr}"), || async {
            TcpListener::bind(addr).await.ok()
        })
        .await;
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Agent {
        init_logs();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let config = AgentConfig::new("test", "127.0.0.1".parse().unwrap());
        let task = tokio::spawn(discovery::agent::run(config, listener, async {
            let _ = rx.await;
        }));
        Agent {
            addr,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A client of this agent.
    pub fn client(&self) -> Client {
        Client::new(ClientConfig::new(&self.addr.to_string()).unwrap())
    }

    /// Stops the agent and waits until it has stopped.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("the agent stops within the deadline")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A response, fully read.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON body ({e}): {}", self.text()))
    }
}

async fn read_answer(resp: Response<Incoming>) -> Result<Answer, BoxError> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// One request on a new HTTP/1.1 connection (closed afterwards).
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Result<Answer, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let result = match tx.send_request(req).await {
        Ok(resp) => read_answer(resp).await,
        Err(e) => Err(e.into()),
    };
    drop(tx);
    conn.abort();
    result
}

/// A bodiless request builder for `path` with `Host` set to `addr`.
pub fn request(method: Method, addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
}

/// `GET path` on a new connection.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Answer, BoxError> {
    send(
        addr,
        request(Method::GET, addr, path).body(Empty::<Bytes>::new())?,
    )
    .await
}

/// One HTTP/1.1 keep-alive connection carrying many requests, one after another.
pub struct H1Conn {
    addr: SocketAddr,
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: JoinHandle<()>,
}

impl H1Conn {
    pub async fn connect(addr: SocketAddr) -> Result<H1Conn, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H1Conn { addr, tx, conn })
    }

    /// Sends `req` on this connection and reads the whole answer.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Answer, BoxError> {
        self.tx.ready().await?;
        let resp = self.tx.send_request(req).await?;
        read_answer(resp).await
    }

    /// `GET path` with extra headers.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<Answer, BoxError> {
        let mut req = request(Method::GET, self.addr, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(Bytes::new()))?).await
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.tx.is_closed()
    }
}

impl Drop for H1Conn {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// A request body fed through a channel: sent chunked, with no `content-length`.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// How many requests per backend name, from answers' bodies.
pub fn tally<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, u32> {
    let mut m = std::collections::BTreeMap::new();
    for n in names {
        *m.entry(n.to_string()).or_insert(0) += 1;
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Steady load
// ---------------------------------------------------------------------------------------------

/// Shared state of a [`Load`].
#[derive(Default)]
pub struct LoadStats {
    /// Next sequence number: a request gets its number just before it is sent, so every
    /// number taken after some moment belongs to a request that started after it.
    pub next_seq: AtomicU64,
    /// Requests answered with 200.
    pub ok: AtomicU64,
    /// Anything else: status, transport error.
    pub errors: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl LoadStats {
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    /// Waits until `n` more requests than now have succeeded (or the deadline passes).
    pub async fn wait_more(&self, n: u64) {
        let target = self.ok() + n;
        eventually(
            DEADLINE,
            &format!("{target} successful requests"),
            || async { (self.ok() >= target).then_some(()) },
        )
        .await;
    }
}

/// Steady GET load: `keep_alive` tasks each sending sequential requests over one keep-alive
/// connection, plus `fresh` tasks opening a new connection per request. Every request carries
/// an `x-seq` header.
pub struct Load {
    pub stats: Arc<LoadStats>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, keep_alive: usize, fresh: usize) -> Load {
        let stats = Arc::new(LoadStats::default());
        let mut tasks = Vec::new();
        for _ in 0..keep_alive {
            let stats = Arc::clone(&stats);
            tasks.push(tokio::spawn(async move {
                let mut conn: Option<H1Conn> = None;
                while !stats.stop.load(Ordering::Relaxed) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match H1Conn::connect(addr).await {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                stats.errors.lock().unwrap().push(format!("connect: {e}"));
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        },
                    };
                    let seq = stats.next_seq.fetch_add(1, Ordering::SeqCst).to_string();
                    match c.get("/", &[("x-seq", &seq)]).await {
                        Ok(a) if a.status == StatusCode::OK => {
                            stats.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(a) => stats.errors.lock().unwrap().push(format!(
                            "seq {seq}: {} {}",
                            a.status,
                            a.text()
                        )),
                        Err(e) => {
                            stats
                                .errors
                                .lock()
                                .unwrap()
                                .push(format!("seq {seq}: {e:?}"));
                            conn = None;
                        }
                    }
                }
            }));
        }
        for _ in 0..fresh {
            let stats = Arc::clone(&stats);
            tasks.push(tokio::spawn(async move {
                while !stats.stop.load(Ordering::Relaxed) {
                    let seq = stats.next_seq.fetch_add(1, Ordering::SeqCst).to_string();
                    let req = request(Method::GET, addr, "/")
                        .header("x-seq", &seq)
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    match send(addr, req).await {
                        Ok(a) if a.status == StatusCode::OK => {
                            stats.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(a) => stats.errors.lock().unwrap().push(format!(
                            "seq {seq}: {} {}",
                            a.status,
                            a.text()
                        )),
                        Err(e) => stats
                            .errors
                            .lock()
                            .unwrap()
                            .push(format!("seq {seq}: {e:?}")),
                    }
                }
            }));
        }
        Load { stats, tasks }
    }

    /// Stops the load, waits for the requests in flight, and returns the stats.
    pub async fn stop(mut self) -> Arc<LoadStats> {
        self.stats.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            tokio::time::timeout(DEADLINE, t)
                .await
                .expect("load task ends")
                .expect("load task did not panic");
        }
        Arc::clone(&self.stats)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
