//! The harness the integration tests share: an in-process dev agent on `127.0.0.1`, a raw
//! HTTP/1.1 client for it (hyper-util's legacy client), the typed [`Client`], and small helpers
//! for polling and building registrations.
//!
//! Every test binary compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use discovery::agent::{run, AgentConfig};
use discovery::wire::ServiceRegistration;
use discovery::{Client, ClientConfig, HealthQuery};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HttpClient};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant};

/// Generous: these tests share two cores with parallel builds and other test binaries.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// Upper bound for any single HTTP exchange, blocking ones included (they wait ≤ 30 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// "Returned well before the 30 s wait": only a wake-up can meet this.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// An agent with Consul's defaults, named `dev` like `consul agent -dev`.
pub fn dev_config() -> AgentConfig {
    AgentConfig::new("dev", "127.0.0.1".parse().unwrap())
}

/// Node `test`, reaping every second with a one-second `DeregisterCriticalServiceAfter` floor.
pub fn quick_config() -> AgentConfig {
    AgentConfig {
        reap_interval: Duration::from_secs(1),
        deregister_min: Duration::from_secs(1),
        ..AgentConfig::new("test", "127.0.0.1".parse().unwrap())
    }
}

/// An in-process dev agent plus a raw HTTP client for it. It can be stopped and started again
/// (empty) on the same address; dropping it stops it too.
pub struct Agent {
    pub addr: SocketAddr,
    pub http: HttpClient<HttpConnector, Full<Bytes>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Agent {
    /// An agent with Consul's defaults ([`dev_config`]).
    pub async fn start() -> Agent {
        Self::start_with(dev_config()).await
    }

    /// An agent with [`quick_config`].
    pub async fn start_quick() -> Agent {
        Self::start_with(quick_config()).await
    }

    pub async fn start_with(config: AgentConfig) -> Agent {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), config)
    }

    /// A fresh agent with [`dev_config`] on `addr`, retrying the bind every 50 ms.
    pub async fn start_at(addr: SocketAddr) -> Agent {
        Self::start_at_with(addr, dev_config(), Duration::from_millis(50)).await
    }

    /// A fresh agent with [`quick_config`] on `addr`, retrying the bind every 100 ms.
    pub async fn start_quick_at(addr: SocketAddr) -> Agent {
        Self::start_at_with(addr, quick_config(), Duration::from_millis(100)).await
    }

    /// A fresh agent on `addr`; the port may take a moment to become free again, so the bind is
    /// retried every `retry` until [`DEADLINE`].
    pub async fn start_at_with(addr: SocketAddr, config: AgentConfig, retry: Duration) -> Agent {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return Self::serve(listener, config),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("binding {addr} again: {e}; retrying");
                    sleep(retry).await;
                }
                Err(e) => panic!("could not bind {addr} again: {e}"),
            }
        }
    }

    fn serve(listener: TcpListener, config: AgentConfig) -> Agent {
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(config, listener, async {
            let _ = rx.await;
        }));
        Agent {
            addr,
            http: HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new()),
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            timeout(DEADLINE, task)
                .await
                .expect("the agent stops")
                .unwrap()
                .unwrap();
        }
    }

    /// The typed client, configured with the bare `host:port`.
    pub fn client(&self) -> Client {
        client_for(self.addr)
    }

    /// One raw exchange, bounded by [`CALL_TIMEOUT`].
    pub async fn call(&self, method: &str, path: &str, body: &str) -> Reply {
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(format!("http://{}{path}", self.addr))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let fut = async { Reply::read(self.http.request(req).await.unwrap()).await };
        timeout(CALL_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| panic!("{method} {path} did not answer"))
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, "").await
    }

    /// A write that must succeed: 200 with an empty body, as Consul's write endpoints answer.
    pub async fn put_ok(&self, path: &str, body: &str) {
        let r = self.call("PUT", path, body).await;
        assert_eq!((r.status, r.body.as_str()), (200, ""), "PUT {path} {body}");
    }

    pub async fn register(&self, body: Value) {
        self.put_ok("/v1/agent/service/register", &body.to_string())
            .await;
    }

    /// Asserts a request fails with exactly this status and plain-text body.
    pub async fn expect_error(
        &self,
        method: &str,
        path: &str,
        body: &str,
        status: u16,
        text: &str,
    ) {
        let r = self.call(method, path, body).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (status, text),
            "{method} {path} with body {body:?}"
        );
        assert_eq!(
            r.header("Content-Type"),
            Some("text/plain; charset=utf-8"),
            "errors are plain text, not JSON: {method} {path}"
        );
    }
}

impl Agent {
    /// Asserts a registration is refused with a 400 and exactly this text.
    pub async fn expect_register_error(&self, body: &Value, text: &str) {
        self.expect_error(
            "PUT",
            "/v1/agent/service/register",
            &body.to_string(),
            400,
            text,
        )
        .await;
    }
}

/// One answer, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    /// `X-Consul-Index` when present (it must parse whenever it is).
    pub consul_index: Option<u64>,
    pub body: String,
}

impl Reply {
    async fn read(resp: Response<Incoming>) -> Reply {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let consul_index = parts
            .headers
            .get("X-Consul-Index")
            .map(|v| v.to_str().unwrap().parse().unwrap());
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            consul_index,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {:?}", self.status, self.body))
    }

    /// The body as JSON, which must come with a 200.
    pub fn ok_json(&self) -> Value {
        assert_eq!(self.status, 200, "{}", self.body);
        self.json()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// `X-Consul-Index`, which must be present and never 0.
    pub fn index(&self) -> u64 {
        let index = self
            .consul_index
            .unwrap_or_else(|| panic!("no X-Consul-Index on {self:?}"));
        assert!(index >= 1, "X-Consul-Index must never be 0");
        index
    }
}

/// Starts a raw (blocking) GET in the background, without [`CALL_TIMEOUT`].
pub fn spawn_get(agent: &Agent, path: String) -> JoinHandle<Reply> {
    let http = agent.http.clone();
    let uri = format!("http://{}{path}", agent.addr);
    tokio::spawn(async move {
        let resp = http
            .request(Request::get(uri).body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        Reply::read(resp).await
    })
}

/// The typed client for `addr`, configured with the bare `host:port`.
pub fn client_for(addr: SocketAddr) -> Client {
    Client::new(ClientConfig::new(&addr.to_string()).unwrap())
}

/// A TCP address nobody listens on (connection refused), free to bind later.
pub async fn dead_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Polls `cond` every 50 ms until it holds, or panics after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(50)).await;
    }
}

/// Instance `id` of service `name` on `127.0.0.1:port`, without checks.
pub fn service(id: &str, name: &str, port: u16) -> ServiceRegistration {
    ServiceRegistration {
        id: Some(id.into()),
        name: name.into(),
        address: Some("127.0.0.1".into()),
        port: Some(port),
        ..Default::default()
    }
}

/// `?passing`.
pub fn passing() -> HealthQuery {
    HealthQuery {
        passing: true,
        ..Default::default()
    }
}
