//! Request handling and shutdown, in-process: `worker::run` on 127.0.0.1:0 without Consul,
//! driven over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{get, request, ChannelBody};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use worker::Config;

/// A worker running in this test's runtime; `stop` starts its shutdown sequence.
struct Running {
    addr: SocketAddr,
    /// The admin listener, unless started without one.
    admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), worker::Error>>,
}

impl Running {
    /// Service and admin listeners, both on ephemeral loopback ports.
    async fn start(config: Config) -> Running {
        Self::start_with(config, true).await
    }

    async fn start_with(config: Config, with_admin: bool) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = match with_admin {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker::run(config, listener, admin, async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            admin: admin_addr,
            stop: Some(stop),
            task,
        }
    }

    fn admin(&self) -> SocketAddr {
        self.admin.expect("started with an admin listener")
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    async fn join(self) -> Result<(), worker::Error> {
        self.task.await.expect("run task")
    }
}

/// `GET /` as JSON on a new connection.
async fn identity_json(
    addr: SocketAddr,
) -> Result<serde_json::Value, Box<dyn std::error::Error + Send + Sync>> {
    let a = request(
        addr,
        Method::GET,
        "/",
        &[("accept", "application/json")],
        Bytes::new(),
    )
    .await?;
    Ok(a.json())
}

/// One request over prior-knowledge HTTP/2 on a new connection; the response head.
async fn h2c(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &'static str,
) -> http::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(http_body_util::Full::new(Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap();
    send.send_request(req).await.unwrap()
}

fn quick() -> Config {
    Config {
        message: "hi there".into(),
        drain_delay: Duration::ZERO,
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

#[tokio::test]
async fn identity_text_and_json_count_requests() {
    let w = Running::start(quick()).await;
    let id = format!("web-127.0.0.1-{}", w.addr.port());

    let a = get(w.addr, "/").await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.text(),
        format!("{id} (web, {}) request 1: hi there\n", w.addr)
    );
    assert_eq!(a.headers["x-worker-id"], id.as_str());
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));

    // Health probes do not move the counter a person watches.
    assert_eq!(get(w.addr, "/health").await.unwrap().status, StatusCode::OK);

    let a = request(
        w.addr,
        Method::GET,
        "/",
        &[("accept", "text/html, application/json;q=0.9")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.headers["content-type"], "application/json");
    let j = a.json();
    assert_eq!(j["id"], id.as_str());
    assert_eq!(j["service"], "web");
    assert_eq!(j["address"], w.addr.to_string());
    assert_eq!(j["port"], w.addr.port());
    assert_eq!(j["message"], "hi there");
    assert_eq!(j["request"], 2);

    // HEAD answers the same status without a body.
    let a = request(w.addr, Method::HEAD, "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.is_empty());
}

#[tokio::test]
async fn unknown_paths_and_methods() {
    let w = Running::start(quick()).await;
    let a = get(w.addr, "/nope").await.unwrap();
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = request(w.addr, Method::DELETE, "/", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.headers["allow"], "GET, HEAD");
    let a = get(w.addr, "/echo").await.unwrap();
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.headers["allow"], "POST");
    let a = request(w.admin(), Method::POST, "/admin/health", &[], "fail")
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.headers["allow"], "GET, PUT");
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_server_lives_on() {
    let w = Running::start(quick()).await;
    let mut s = TcpStream::connect(w.addr).await.unwrap();
    s.write_all(b"THIS IS NOT HTTP\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("server closes the connection")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    assert_eq!(get(w.addr, "/").await.unwrap().status, StatusCode::OK);
}

#[tokio::test]
async fn admin_switch_flips_health() {
    let w = Running::start(quick()).await;
    let put = |body: &'static str, headers: &'static [(&'static str, &'static str)]| {
        request(w.admin(), Method::PUT, "/admin/health", headers, body)
    };
    assert_eq!(put("fail", &[]).await.unwrap().status, StatusCode::OK);
    let h = get(w.addr, "/health").await.unwrap();
    assert_eq!(h.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(h.text(), "unhealthy\n");
    // Other endpoints keep answering: only the health verdict changed.
    assert_eq!(get(w.addr, "/").await.unwrap().status, StatusCode::OK);

    assert_eq!(put("pass\n", &[]).await.unwrap().status, StatusCode::OK);
    assert_eq!(get(w.addr, "/health").await.unwrap().status, StatusCode::OK);

    // The query form works too.
    let a = request(
        w.admin(),
        Method::PUT,
        "/admin/health?state=fail",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        get(w.admin(), "/admin/health").await.unwrap().text(),
        "unhealthy\n"
    );

    assert_eq!(
        put("maybe", &[]).await.unwrap().status,
        StatusCode::BAD_REQUEST
    );
    // Relayed by a proxy (a balancer on this host): refused even from loopback.
    let a = put("pass", &[("x-forwarded-for", "203.0.113.9")])
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        get(w.addr, "/health").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn admin_token_is_required_when_set() {
    let w = Running::start(Config {
        admin_token: Some("s3cret".into()),
        ..quick()
    })
    .await;
    let put = |headers: &'static [(&'static str, &'static str)]| {
        request(w.admin(), Method::PUT, "/admin/health", headers, "fail")
    };
    assert_eq!(put(&[]).await.unwrap().status, StatusCode::FORBIDDEN);
    assert_eq!(
        put(&[("x-admin-token", "wrong")]).await.unwrap().status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(get(w.addr, "/health").await.unwrap().status, StatusCode::OK);
    assert_eq!(
        put(&[("x-admin-token", "s3cret")]).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        get(w.addr, "/health").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// The reproducer of issue 11 §5: a request that reaches the service port from loopback with
/// no forwarding header (as one smuggled past a proxy on the same host does) cannot flip the
/// worker's health. The service port has no `/admin/*` at all.
#[tokio::test]
async fn the_service_port_has_no_health_switch() {
    for with_admin in [true, false] {
        let w = Running::start_with(quick(), with_admin).await;
        for (method, path, body) in [
            (Method::PUT, "/admin/health", "fail"),
            (Method::PUT, "/admin/health?state=fail", ""),
            (Method::GET, "/admin/health", ""),
            (Method::POST, "/admin/health", "fail"),
        ] {
            let a = request(w.addr, method.clone(), path, &[], body)
                .await
                .unwrap();
            assert_eq!(a.status, StatusCode::NOT_FOUND, "{method} {path}");
        }
        // Over HTTP/2 as well: the route table is per listener, not per protocol.
        let resp = h2c(w.addr, Method::PUT, "/admin/health", "fail").await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);

        let h = get(w.addr, "/health").await.unwrap();
        assert_eq!((h.status, h.text().as_str()), (StatusCode::OK, "ok\n"));
    }
}

/// The admin listener serves the switch and nothing else.
#[tokio::test]
async fn the_admin_listener_serves_only_the_switch() {
    let w = Running::start(quick()).await;
    for path in ["/", "/health", "/echo", "/headers", "/delay?ms=1", "/admin"] {
        let a = get(w.admin(), path).await.unwrap();
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
    }
    let a = get(w.admin(), "/admin/health").await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "ok\n"));
    // Admin requests are not service traffic: the counter a person watches did not move.
    assert_eq!(identity_json(w.addr).await.unwrap()["request"], 1);
}

/// The admin listener has its own, small connection cap: once it is full, further admin
/// clients wait in the backlog while the service port keeps answering; a freed slot lets the
/// waiting client in.
#[tokio::test]
async fn the_admin_listener_caps_its_connections_apart_from_the_service() {
    let w = Running::start(quick()).await;
    let mut held = Vec::new();
    for _ in 0..worker::server::ADMIN_MAX_CONNECTIONS {
        held.push(TcpStream::connect(w.admin()).await.unwrap());
    }
    let admin = w.admin();
    let mut waiting = tokio::spawn(async move { get(admin, "/admin/health").await });
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), &mut waiting)
            .await
            .is_err(),
        "an admin request past the cap is not served while every slot is held"
    );
    assert_eq!(get(w.addr, "/").await.unwrap().status, StatusCode::OK);
    assert_eq!(get(w.addr, "/health").await.unwrap().status, StatusCode::OK);
    drop(held);
    let a = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once the held connections closed")
        .unwrap()
        .unwrap();
    assert_eq!(a.status, StatusCode::OK);
}

/// The admin listener closes a connection that sends nothing, and a keep-alive connection
/// left idle after a request, within its header read timeout.
#[tokio::test]
async fn the_admin_listener_bounds_silent_and_idle_connections() {
    let w = Running::start(quick()).await;
    let limit = worker::server::ADMIN_HEADER_READ_TIMEOUT;
    let started = Instant::now();
    let silent = TcpStream::connect(w.admin()).await.unwrap();
    let mut idle = TcpStream::connect(w.admin()).await.unwrap();
    idle.write_all(b"GET /admin/health HTTP/1.1\r\nHost: worker\r\n\r\n")
        .await
        .unwrap();
    let read_all = |mut s: TcpStream| async move {
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    };
    let (silent_buf, idle_buf) = tokio::time::timeout(limit + Duration::from_secs(5), async {
        tokio::join!(read_all(silent), read_all(idle))
    })
    .await
    .expect("the admin listener closes silent and idle connections");
    let took = started.elapsed();
    assert!(
        silent_buf.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&silent_buf)
    );
    let idle_text = String::from_utf8_lossy(&idle_buf);
    assert!(idle_text.starts_with("HTTP/1.1 200"), "{idle_text:?}");
    // Closed by the timeout, not right after the answer.
    assert!(took >= limit - Duration::from_millis(500), "{took:?}");
    // The listener lives on.
    assert_eq!(
        get(w.admin(), "/admin/health").await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn echo_returns_large_bodies_intact() {
    let w = Running::start(quick()).await;
    let body: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let a = request(
        w.addr,
        Method::POST,
        "/echo",
        &[("content-type", "application/x-test")],
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["content-type"], "application/x-test");
    assert_eq!(a.body.len(), body.len());
    assert!(a.body == body, "echoed bytes differ");
}

#[tokio::test]
async fn echo_streams_before_the_request_ends() {
    let w = Running::start(quick()).await;
    let stream = TcpStream::connect(w.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let req = Request::post("/echo")
        .header("host", "worker")
        .body(ChannelBody(rx))
        .unwrap();
    let respond = tokio::spawn(async move { send.send_request(req).await });
    tx.send(Bytes::from_static(b"first ")).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), respond)
        .await
        .expect("response head arrives while the request body is still open")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    // The first chunk comes back before we send the second: nothing waits for the whole body.
    let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk echoed before the request ended")
        .unwrap()
        .unwrap();
    assert_eq!(frame.into_data().unwrap(), "first ");
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "second");
}

#[tokio::test]
async fn delay_waits_and_is_bounded() {
    let w = Running::start(quick()).await;
    let t = Instant::now();
    let a = get(w.addr, "/delay?ms=300").await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(300));
    for bad in [
        "/delay",
        "/delay?ms=",
        "/delay?ms=abc",
        "/delay?ms=-1",
        "/delay?ms=60001",
    ] {
        assert_eq!(
            get(w.addr, bad).await.unwrap().status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn headers_are_reported_with_all_values() {
    let w = Running::start(quick()).await;
    let stream = TcpStream::connect(w.addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/headers?x=1")
        .header("host", "example.test")
        .header("x-forwarded-for", "203.0.113.1")
        .header("x-forwarded-for", "198.51.100.2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["peer"], local.to_string());
    assert_eq!(j["method"], "GET");
    assert_eq!(j["uri"], "/headers?x=1");
    assert_eq!(j["headers"]["host"], serde_json::json!(["example.test"]));
    assert_eq!(
        j["headers"]["x-forwarded-for"],
        serde_json::json!(["203.0.113.1", "198.51.100.2"])
    );
}

#[tokio::test]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let w = Running::start(quick()).await;
    let stream = TcpStream::connect(w.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    for n in 1..=5 {
        send.ready().await.unwrap();
        let req = Request::get("/")
            .header("host", "worker")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains(&format!("request {n}:")),
            "{body:?}"
        );
    }
    assert!(!conn.is_finished(), "the connection stayed open");
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let w = Running::start(quick()).await;
    let resp = h2c(w.addr, Method::GET, "/", "").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

#[tokio::test]
async fn shutdown_drains_then_finishes_in_flight_requests() {
    let mut w = Running::start(Config {
        drain_delay: Duration::from_millis(1500),
        shutdown_grace: Duration::from_secs(5),
        ..quick()
    })
    .await;
    let addr = w.addr;
    let admin = w.admin();
    let slow = tokio::spawn(async move { get(addr, "/delay?ms=1500").await });
    // Make sure the slow request is in flight before shutting down.
    common::eventually(
        common::DEADLINE,
        "the slow request to be counted",
        || async {
            let j = identity_json(addr).await.ok()?;
            (j["request"].as_u64()? >= 2).then_some(())
        },
    )
    .await;
    w.shutdown();
    // During the drain delay the listener still accepts, and health says draining.
    let h = common::eventually(common::DEADLINE, "/health to say draining", || async {
        let h = get(addr, "/health").await.unwrap();
        (h.status == StatusCode::SERVICE_UNAVAILABLE).then_some(h)
    })
    .await;
    assert_eq!(h.text(), "draining\n");
    let a = slow.await.unwrap().unwrap();
    assert_eq!(a.status, StatusCode::OK, "the in-flight request finished");
    tokio::time::timeout(Duration::from_secs(10), w.join())
        .await
        .expect("run returns after draining")
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed after run returns"
    );
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the admin listener is closed after run returns"
    );
}

#[tokio::test]
async fn shutdown_grace_cuts_requests_that_take_too_long() {
    let mut w = Running::start(Config {
        drain_delay: Duration::ZERO,
        shutdown_grace: Duration::from_millis(300),
        ..quick()
    })
    .await;
    let addr = w.addr;
    let slow = tokio::spawn(async move { get(addr, "/delay?ms=30000").await });
    common::eventually(
        common::DEADLINE,
        "the slow request to be counted",
        || async {
            let j = identity_json(addr).await.ok()?;
            (j["request"].as_u64()? >= 2).then_some(())
        },
    )
    .await;
    let t = Instant::now();
    w.shutdown();
    tokio::time::timeout(Duration::from_secs(10), w.join())
        .await
        .expect("run returns once the grace period is over")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(slow.await.unwrap().is_err(), "the slow request was cut");
}

#[tokio::test]
async fn run_refuses_an_any_address_without_advertise() {
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = worker::run(quick(), listener, None, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err}");
}
