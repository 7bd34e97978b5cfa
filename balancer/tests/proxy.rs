//! The proxy path with static instances (no Consul): round robin, error mapping, bodies,
//! forwarding headers, client limits, HTTP/2, retries when a backend dies, the admin listener.
//!
//! Real sockets on 127.0.0.1:0 throughout; every wait is a poll with a generous deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

async fn balancer_for(backends: &[Backend]) -> Balancer {
    let instances = backends.iter().map(|b| b.instance("web")).collect();
    Balancer::with_static(config(&["web"]), vec![("web", instances)]).await
}

fn assert_even(backends: &[Backend], per: u64) {
    let hits: Vec<(String, u64)> = backends
        .iter()
        .map(|b| (b.name.clone(), b.hits()))
        .collect();
    assert!(
        hits.iter().all(|(_, h)| *h == per),
        "expected {per} requests per backend, got {hits:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_new_connection_per_request() {
    let backends = three_backends().await;
    let lb = balancer_for(&backends).await;
    let mut bodies = Vec::new();
    for _ in 0..30 {
        let a = get(lb.addr, "/").await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(a.headers["x-backend"], a.text().as_str());
        bodies.push(a.text());
    }
    let t = tally(bodies.iter().map(String::as_str));
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{t:?}"
    );
    assert_even(&backends, 10);
    // Strict rotation: each window of three consecutive answers names all three backends.
    for w in bodies.chunks(3) {
        let mut w = w.to_vec();
        w.sort();
        w.dedup();
        assert_eq!(
            w.len(),
            3,
            "one cycle visits each instance once: {bodies:?}"
        );
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_on_one_keep_alive_connection() {
    let backends = three_backends().await;
    let lb = balancer_for(&backends).await;
    let mut conn = H1Conn::connect(lb.addr).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..30 {
        let a = conn.get("/", &[]).await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        bodies.push(a.text());
    }
    assert!(conn.is_open(), "the client connection stayed open");
    let t = tally(bodies.iter().map(String::as_str));
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{t:?}"
    );
    assert_even(&backends, 10);
    // Pooled upstream keep-alive: a handful of upstream connections, not one per request.
    let upstream: u64 = backends
        .iter()
        .map(|b| {
            b.seen
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert!(
        upstream <= 6,
        "{upstream} upstream connections for 30 sequential requests"
    );
    drop(conn);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_http2_prior_knowledge() {
    let backends = three_backends().await;
    let lb = balancer_for(&backends).await;
    let stream = TcpStream::connect(lb.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let mut bodies = Vec::new();
    for _ in 0..30 {
        let req = http::Request::builder()
            .uri(format!("http://{}/", lb.addr))
            .body(Empty::<Bytes>::new())
            .unwrap();
        tx.ready().await.unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        bodies.push(String::from_utf8(body.to_vec()).unwrap());
    }
    let t = tally(bodies.iter().map(String::as_str));
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{t:?}"
    );

    // The :authority becomes Host upstream.
    let req = http::Request::builder()
        .uri("http://h2.example:8080/headers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let a = Answer {
        status: resp.status(),
        headers: resp.headers().clone(),
        body: resp.into_body().collect().await.unwrap().to_bytes(),
    };
    assert_eq!(a.status, StatusCode::OK);
    let h = reported_headers(&a);
    let host: Vec<_> = h.iter().filter(|(k, _)| k == "host").collect();
    assert_eq!(host.len(), 1, "{h:?}");
    assert_eq!(host[0].1, "h2.example:8080");
    assert_eq!(
        a.json()["version"],
        "HTTP/1.1",
        "instances are spoken to in HTTP/1.1"
    );
    drop(tx);
    conn.abort();
    lb.stop().await;
}

/// One HTTP/2 client connection with 200 requests in flight at once opens about as many
/// upstream connections as `--http2-max-streams` allows streams, not 200: the rest wait for
/// a stream (and every request is answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_bound_upstream_connections() {
    const STREAMS: u32 = 8;
    let up = common::raw::RawUpstream::start(|_| {
        vec![
            common::raw::Step::Sleep(Duration::from_millis(50)),
            common::raw::Step::Write(common::raw::ok_with("slow")),
        ]
    })
    .await;
    let mut cfg = config(&["web"]);
    cfg.http2_max_streams = STREAMS;
    let lb = up.balancer_with(cfg).await;
    let stream = TcpStream::connect(lb.addr).await.unwrap();
    let (tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // One request first, so that the balancer's SETTINGS (with its stream limit) are known:
    // streams opened before that are refused (REFUSED_STREAM), as RFC 9113 allows.
    let mut first = tx.clone();
    first.ready().await.unwrap();
    let req = http::Request::builder()
        .uri(format!("http://{}/first", lb.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(
        first.send_request(req).await.unwrap().status(),
        StatusCode::OK
    );
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut tx = tx.clone();
        let uri = format!("http://{}/{i}", lb.addr);
        tasks.push(tokio::spawn(async move {
            let req = http::Request::builder()
                .uri(uri)
                .body(Empty::<Bytes>::new())
                .unwrap();
            tx.ready().await.unwrap();
            let resp = tx.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            resp.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for t in tasks {
        let body = timeout(DEADLINE, t).await.unwrap().unwrap();
        assert_eq!(body, "slow");
    }
    assert_eq!(up.requests(), 201);
    // A stream ends as its last body bytes leave, a moment before its upstream connection is
    // back in the pool, so a new stream may dial once more; unbounded, it would be ~200.
    assert!(
        up.connections() <= 2 * u64::from(STREAMS),
        "{} upstream connections for {STREAMS} streams",
        up.connections()
    );
    conn.abort();
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_prefix_routing_with_two_services() {
    let web = Backend::start("w1").await;
    let api = Backend::start("a1").await;
    let lb = Balancer::with_static(
        config(&["web", "api=/api"]),
        vec![
            ("web", vec![web.instance("web")]),
            ("api", vec![api.instance("api")]),
        ],
    )
    .await;
    for (path, want) in [
        ("/", "w1"),
        ("/index.html", "w1"),
        ("/api", "a1"),
        ("/api/", "a1"),
        ("/api/users/7?x=1", "a1"),
        ("/apix", "w1"),
        ("/web/api", "w1"),
    ] {
        let a = get(lb.addr, path).await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
        assert_eq!(a.text(), want, "{path}");
    }
    // The path and query reach the instance unchanged (no prefix stripping).
    let a = get(lb.addr, "/api/v1/headers?q=1").await.unwrap();
    assert_eq!(a.json()["uri"], "/api/v1/headers?q=1");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_404() {
    let api = Backend::start("a1").await;
    let lb = Balancer::with_static(
        config(&["api=/api"]),
        vec![("api", vec![api.instance("api")])],
    )
    .await;
    let a = get(lb.addr, "/other").await.unwrap();
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.text());
    let a = get(lb.addr, "/apix").await.unwrap();
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.text());
    assert_eq!(api.hits(), 0);
    let a = get(lb.addr, "/api/x").await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    let st = lb.status().await;
    assert_eq!(st["requests_without_route"], 2, "{st}");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_instance_is_503_at_once_naming_the_service() {
    // Discovery answered, with nobody passing.
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![])]).await;
    let started = Instant::now();
    let a = get(lb.addr, "/").await.unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert!(
        a.text().contains("web"),
        "the body names the service: {:?}",
        a.text()
    );
    // "At once": no connect or upstream timeout was waited for (those are 2 s and 30 s here).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_instances_refusing_is_502() {
    let instances = vec![
        instance("d1", "web", dead_addr().await),
        instance("d2", "web", dead_addr().await),
        instance("d3", "web", dead_addr().await),
    ];
    let lb = Balancer::with_static(config(&["web"]), vec![("web", instances)]).await;
    let a = get(lb.addr, "/").await.unwrap();
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    assert!(a.text().contains("web"), "{}", a.text());
    // Each instance was tried once, and each refusal ejected it.
    let s = lb.service_status("web").await;
    for i in s["instances"].as_array().unwrap() {
        assert_eq!(i["failures"], 1, "{s}");
        assert_eq!(i["ejected"], true, "{s}");
    }
    // Still 502 (not a hang, not 503) while every instance is ejected.
    let a = get(lb.addr, "/").await.unwrap();
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.text());
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_instance_is_skipped_without_client_errors() {
    let backends = three_backends().await;
    let mut instances: Vec<_> = backends.iter().map(|b| b.instance("web")).collect();
    instances.push(instance("dead", "web", dead_addr().await));
    let lb = Balancer::with_static(config(&["web"]), vec![("web", instances)]).await;
    let mut conn = H1Conn::connect(lb.addr).await.unwrap();
    for _ in 0..40 {
        let a = conn.get("/", &[]).await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    let s = lb.service_status("web").await;
    let dead = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "dead")
        .unwrap()
        .clone();
    assert!(dead["ejections"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(backends.iter().map(Backend::hits).sum::<u64>(), 40);
    drop(conn);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_slower_than_upstream_timeout_is_504() {
    let slow = Backend::start("slow").await;
    let mut cfg = config(&["web"]);
    cfg.upstream_timeout = Duration::from_secs(1);
    let lb = Balancer::with_static(cfg, vec![("web", vec![slow.instance("web")])]).await;
    let a = get(lb.addr, "/slow?ms=10000").await.unwrap();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.text());
    assert!(a.text().contains("web"), "{}", a.text());
    // A fast request afterwards still works.
    let a = get(lb.addr, "/slow?ms=0").await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_post_body_arrives_intact() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let data = Bytes::from(random_bytes(8 << 20));

    // Hashed by the instance.
    let req = request(Method::POST, lb.addr, "/hash")
        .body(Full::new(data.clone()))
        .unwrap();
    let a = send(lb.addr, req).await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), digest(&data));
    assert_eq!(
        a.headers["x-got-content-length"],
        (8usize << 20).to_string().as_str()
    );

    // Echoed back whole: streamed both ways.
    let req = request(Method::POST, lb.addr, "/echo")
        .body(Full::new(data.clone()))
        .unwrap();
    let a = send(lb.addr, req).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body.len(), data.len());
    assert!(a.body == data, "the echoed body differs");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunked_upload_arrives_intact() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let data = Bytes::from(random_bytes(8 << 20));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let feeder = {
        let data = data.clone();
        tokio::spawn(async move {
            // Uneven chunks, so nothing lines up with buffer sizes by luck.
            let mut off = 0;
            let mut n = 1usize;
            while off < data.len() {
                let len = (n * 7919 % 100_000 + 1).min(data.len() - off);
                if tx.send(data.slice(off..off + len)).await.is_err() {
                    return;
                }
                off += len;
                n += 1;
            }
        })
    };
    let req = request(Method::POST, lb.addr, "/hash")
        .body(ChannelBody(rx))
        .unwrap();
    let a = send(lb.addr, req).await.unwrap();
    feeder.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), digest(&data));
    // It reached the instance as a stream: no content-length was invented on the way.
    assert_eq!(a.headers["x-got-content-length"], "");
    assert_eq!(a.headers["x-got-transfer-encoding"], "chunked");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_and_hop_by_hop() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    // A raw request, so nothing in a client library adds or drops headers.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let head = "GET /headers?a=1 HTTP/1.1\r\n\
        Host: shop.example:8443\r\n\
        X-Forwarded-For: 10.9.8.7\r\n\
        Connection: keep-alive, X-Private\r\n\
        X-Private: secret\r\n\
        Keep-Alive: timeout=5\r\n\
        TE: trailers\r\n\
        Proxy-Connection: keep-alive\r\n\
        Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
        Upgrade: websocket\r\n\
        X-Custom: kept\r\n\
        \r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let raw = read_one_response(&mut s).await;
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let body = raw.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let headers: Vec<(String, String)> = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()))
        .collect();
    let all = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(v["uri"], "/headers?a=1");
    assert_eq!(all("host"), vec!["shop.example:8443"], "{headers:?}");
    assert_eq!(
        all("x-forwarded-for"),
        vec!["10.9.8.7, 127.0.0.1"],
        "{headers:?}"
    );
    assert_eq!(all("x-forwarded-proto"), vec!["http"], "{headers:?}");
    assert_eq!(
        all("x-forwarded-host"),
        vec!["shop.example:8443"],
        "{headers:?}"
    );
    assert_eq!(all("x-custom"), vec!["kept"], "{headers:?}");
    for hop in [
        "x-private",
        "keep-alive",
        "te",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
    ] {
        assert!(
            all(hop).is_empty(),
            "{hop} must not be forwarded: {headers:?}"
        );
    }
    for c in all("connection") {
        let c = c.to_ascii_lowercase();
        assert!(
            !c.contains("x-private") && !c.contains("upgrade"),
            "{headers:?}"
        );
    }

    // Without an incoming X-Forwarded-For, the peer alone.
    let a = get(lb.addr, "/headers").await.unwrap();
    let h = reported_headers(&a);
    let xff: Vec<_> = h.iter().filter(|(k, _)| k == "x-forwarded-for").collect();
    assert_eq!(xff.len(), 1, "{h:?}");
    assert_eq!(xff[0].1, "127.0.0.1");
    lb.stop().await;
}

/// Reads one `Content-Length`-framed response from a raw socket.
async fn read_one_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    timeout(DEADLINE, async {
        loop {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed early: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
        }
    })
    .await
    .expect("a response within the deadline")
}

/// Reads until the peer closes; returns what arrived and whether it closed within `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = timeout(within, async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_client_is_cut_off() {
    let b = Backend::start("b1").await;
    let mut cfg = config(&["web"]);
    cfg.header_read_timeout = Duration::from_secs(1);
    let lb = Balancer::with_static(cfg, vec![("web", vec![b.instance("web")])]).await;

    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    // Stall. The balancer must close the connection after about a second; allow far more.
    let started = Instant::now();
    let (got, closed) = read_until_closed(&mut s, DEADLINE).await;
    assert!(closed, "the connection was not closed within {DEADLINE:?}");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 408"),
        "nothing but a possible 408 before closing: {got:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "closed too early: {:?}",
        started.elapsed()
    );
    assert_eq!(b.hits(), 0, "the half request never reached an instance");

    // Others are served meanwhile and afterwards.
    let a = get(lb.addr, "/").await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_cut_off() {
    // A client that connects and sends nothing at all holds a connection slot just the same.
    let b = Backend::start("b1").await;
    let mut cfg = config(&["web"]);
    cfg.header_read_timeout = Duration::from_secs(1);
    let lb = Balancer::with_static(cfg, vec![("web", vec![b.instance("web")])]).await;

    let mut silent = TcpStream::connect(lb.addr).await.unwrap();
    // A partial HTTP/2 preface, then a stall.
    let mut partial = TcpStream::connect(lb.addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2").await.unwrap();

    let (_, closed) = read_until_closed(&mut silent, DEADLINE).await;
    assert!(
        closed,
        "a silent connection was not closed within {DEADLINE:?}"
    );
    let (_, closed) = read_until_closed(&mut partial, DEADLINE).await;
    assert!(
        closed,
        "a stalled HTTP/2 preface was not closed within {DEADLINE:?}"
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_431() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let big = "a".repeat(config(&["web"]).max_header_bytes + 16 * 1024);
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let head = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    // The balancer may answer and close before reading everything; a failed write is fine.
    let _ = s.write_all(head.as_bytes()).await;
    let (got, closed) = read_until_closed(&mut s, DEADLINE).await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 431"),
        "{:?}",
        &got[..got.len().min(200)]
    );
    assert!(closed);
    assert_eq!(b.hits(), 0);

    // Large but within the limit is fine.
    let ok = "a".repeat(16 * 1024);
    let req = request(Method::GET, lb.addr, "/")
        .header("x-big", ok)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let a = send(lb.addr, req).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_under_steady_load_fails_no_request() {
    let mut backends = three_backends().await;
    let lb = balancer_for(&backends).await;
    let load = Load::start(lb.addr, 3, 1);
    let stats = std::sync::Arc::clone(&load.stats);
    // Every backend has pooled connections to it and traffic on them.
    stats.wait_more(150).await;
    assert!(backends.iter().all(|b| b.hits() > 0));

    backends[1].kill().await;
    let hits_at_kill = backends[1].hits();
    // Keep going well past the kill, through at least one cool-off expiry (1 s), so that
    // requests also meet the dead instance again after its ejection ends.
    stats.wait_more(150).await;
    let s = lb.service_status("web").await;
    let b2 = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "b2")
        .unwrap()
        .clone();
    assert!(
        b2["ejections"].as_u64().unwrap() >= 1,
        "the dead instance was ejected: {s}"
    );
    // The cool-off lapses and the dead instance is tried (and ejected) again, still without a
    // client error: note the ejection count while it is ejected, then wait for one more.
    let b2 = |s: serde_json::Value| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == "b2")
            .unwrap()
            .clone()
    };
    let during = eventually(DEADLINE, "b2 ejected", || async {
        let i = b2(lb.service_status("web").await);
        (i["ejected"] == true).then(|| i["ejections"].as_u64().unwrap())
    })
    .await;
    eventually(DEADLINE, "b2 tried again after its cool-off", || async {
        let i = b2(lb.service_status("web").await);
        (i["ejections"].as_u64().unwrap() > during).then_some(())
    })
    .await;
    stats.wait_more(50).await;

    let stats = load.stop().await;
    assert_eq!(
        stats.errors(),
        Vec::<String>::new(),
        "client requests failed"
    );
    assert_eq!(
        backends[1].hits(),
        hits_at_kill,
        "a killed backend serves nothing"
    );
    assert!(stats.ok() >= 350);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_requests_by_instance_and_latency_histogram() {
    let backends = three_backends().await;
    let lb = balancer_for(&backends).await;
    for _ in 0..6 {
        assert_eq!(get(lb.addr, "/").await.unwrap().status, StatusCode::OK);
    }
    let a = get(lb.admin, "/metrics").await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        a.headers
    );
    let m = a.text();
    for b in ["b1", "b2", "b3"] {
        // instance="<id>",address="<host:port>",class="2xx" with 2 requests each.
        let start = format!(
            "balancer_requests_total{{service=\"web\",instance=\"{b}\",address=\"127.0.0.1:"
        );
        let found = m
            .lines()
            .any(|l| l.starts_with(&start) && l.ends_with("\",class=\"2xx\"} 2"));
        assert!(found, "missing {start:?}...2xx 2 in\n{m}");
    }
    assert!(m.contains("# TYPE balancer_requests_total counter"), "{m}");
    assert!(
        m.contains("# TYPE balancer_request_duration_seconds histogram"),
        "{m}"
    );
    assert!(
        m.contains("balancer_request_duration_seconds_bucket{service=\"web\",le=\"+Inf\"} 6\n"),
        "{m}"
    );
    assert!(
        m.contains("balancer_request_duration_seconds_count{service=\"web\"} 6\n"),
        "{m}"
    );
    assert!(
        m.contains("balancer_request_duration_seconds_sum{service=\"web\"}"),
        "{m}"
    );
    assert!(
        m.contains("balancer_healthy_instances{service=\"web\"} 3\n"),
        "{m}"
    );
    // Every sample line is `name{labels} number`.
    for line in m.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
    }

    // The balancer's own answers are counted with instance="".
    let lb2 = Balancer::with_static(config(&["web"]), vec![("web", vec![])]).await;
    assert_eq!(
        get(lb2.addr, "/").await.unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let m2 = get(lb2.admin, "/metrics").await.unwrap().text();
    assert!(
        m2.contains("balancer_requests_total{service=\"web\",instance=\"\",class=\"5xx\"} 1\n"),
        "{m2}"
    );
    lb2.stop().await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_instances_and_requests() {
    let backends = three_backends().await;
    let lb = balancer_for(&backends).await;
    for _ in 0..9 {
        get(lb.addr, "/").await.unwrap();
    }
    let st = lb.status().await;
    assert_eq!(st["ready"], true, "{st}");
    let s = lb.service_status("web").await;
    assert_eq!(s["healthy_instances"], 3, "{s}");
    assert_eq!(s["routes"], serde_json::json!(["/"]), "{s}");
    assert_eq!(s["discovery"]["source"], "static", "{s}");
    for i in s["instances"].as_array().unwrap() {
        assert_eq!(i["requests"], 3, "{s}");
        assert_eq!(i["ejected"], false, "{s}");
        let id = i["id"].as_str().unwrap();
        let b = backends.iter().find(|b| b.name == id).unwrap();
        assert_eq!(i["address"], b.addr.to_string().as_str());
    }
    let a = get(lb.admin, "/health").await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_discovery_answered() {
    // A static service never filled: no discovery answer yet.
    let lb = Balancer::start(config(&["web"]), None, |_| {}).await;
    let a = get(lb.admin, "/health").await.unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert_eq!(lb.status().await["ready"], false);
    lb.stop().await;
}

/// The test backend's `kill` must behave like a dead process, or the retry tests prove nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_backend_kill_closes_listener_and_connections() {
    let mut b = Backend::start("b1").await;
    let mut conn = H1Conn::connect(b.addr).await.unwrap();
    assert_eq!(conn.get("/", &[]).await.unwrap().text(), "b1");
    let mut raw = TcpStream::connect(b.addr).await.unwrap();
    b.kill().await;
    let (_, closed) = read_until_closed(&mut raw, DEADLINE).await;
    assert!(closed, "an idle accepted connection was closed");
    assert!(
        conn.get("/", &[]).await.is_err(),
        "a keep-alive connection broke"
    );
    let refused = TcpStream::connect(b.addr).await;
    assert!(refused.is_err(), "new connections are refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_client_body_is_the_clients_fault() {
    // A chunked upload whose chunk size is not hex: the client's body fails while it is being
    // forwarded. The client gets a 4xx (or a closed connection), never a 502, and the
    // instance is not counted as failing.
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n",
    )
    .await
    .unwrap();
    let (got, _) = read_until_closed(&mut s, DEADLINE).await;
    let got = String::from_utf8_lossy(&got);
    // The echo backend may start its answer before the broken chunk arrives; then the client
    // sees that answer cut short. Either way: never a 5xx, and the instance is not blamed.
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 4") || got.starts_with("HTTP/1.1 200"),
        "{:?}",
        &got[..got.len().min(200)]
    );
    let status = lb.service_status("web").await;
    assert_eq!(status["instances"][0]["failures"], 0, "{status}");
    assert_eq!(status["instances"][0]["ejected"], false, "{status}");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http1_stays_on_the_fast_path_and_the_rest_is_handed_off() {
    // The fast path serves HTTP/1.1 requests with small bodies; HTTP/1.0 and chunked uploads
    // go to the general (hyper) path. Both answer alike; `/status` counts the hand-offs.
    let backends = three_backends().await;
    let lb = balancer_for(&backends).await;
    let handoffs = |st: serde_json::Value| st["http1_handoffs"].as_u64().unwrap();

    let mut conn = H1Conn::connect(lb.addr).await.unwrap();
    for _ in 0..9 {
        assert_eq!(conn.get("/", &[]).await.unwrap().status, StatusCode::OK);
    }
    let small = random_bytes(3000);
    let req = request(Method::POST, lb.addr, "/hash")
        .body(Full::new(Bytes::from(small.clone())))
        .unwrap();
    let a = conn.send(req).await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.text(), digest(&small));
    assert_eq!(handoffs(lb.status().await), 0, "all on the fast path");
    assert_eq!(backends.iter().map(Backend::hits).sum::<u64>(), 10);

    // HTTP/1.0: handed off, and answered.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let (got, closed) = read_until_closed(&mut s, DEADLINE).await;
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200"),
        "{got}"
    );
    assert!(closed, "an HTTP/1.0 request without keep-alive closes");
    assert_eq!(handoffs(lb.status().await), 1);

    // A chunked upload on a connection that served a request on the fast path first.
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_one_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    s.write_all(b"POST /hash HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        .await
        .unwrap();
    let second = read_one_response(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.ends_with(&digest(b"abc")), "{second}");
    assert_eq!(handoffs(lb.status().await), 2);
    drop(conn);
    lb.stop().await;
}
