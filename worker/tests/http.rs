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
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), worker::Error>>,
}

impl Running {
    async fn start(config: Config) -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(worker::run(config, listener, async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            stop: Some(stop),
            task,
        }
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
    let a = request(w.addr, Method::POST, "/admin/health", &[], "fail")
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
        request(w.addr, Method::PUT, "/admin/health", headers, body)
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
        w.addr,
        Method::PUT,
        "/admin/health?state=fail",
        &[],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        get(w.addr, "/admin/health").await.unwrap().text(),
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
        request(w.addr, Method::PUT, "/admin/health", headers, "fail")
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
    let stream = TcpStream::connect(w.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{}/", w.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
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
    let slow = tokio::spawn(async move { get(addr, "/delay?ms=1500").await });
    // Make sure the slow request is in flight before shutting down.
    common::eventually(
        common::DEADLINE,
        "the slow request to be counted",
        || async {
            let j = request(
                addr,
                Method::GET,
                "/",
                &[("accept", "application/json")],
                Bytes::new(),
            )
            .await
            .ok()?
            .json();
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
            let j = request(
                addr,
                Method::GET,
                "/",
                &[("accept", "application/json")],
                Bytes::new(),
            )
            .await
            .ok()?
            .json();
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
    let err = worker::run(quick(), listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(err.is_config(), "{err}");
}
