//! The fast path's event loop (`balancer::fast`) as a whole: the connection cap (accepting
//! paused while every slot is taken), the upstream pool's idle expiry and its reaction to an
//! instance closing an idle socket, connect timeouts moving a request to the next instance,
//! back-pressure from a slow client, a client vanishing mid-response, and many concurrent
//! keep-alive clients.
//!
//! Real sockets on 127.0.0.1:0 throughout; where the hyper test backend cannot show a
//! behaviour (which connection a request came on, when the balancer closes an upstream socket),
//! a scripted raw upstream ([`RawUpstream`]) does. Every wait is bounded by a generous deadline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

// ---------------------------------------------------------------------------------------------
// A scripted raw upstream that knows its connections
// ---------------------------------------------------------------------------------------------

/// One thing the raw upstream does in answer to a request.
enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Close the connection from this side (no further requests are read on it).
    Close,
}

/// A request as the raw upstream received it.
#[derive(Debug, Clone)]
struct RawRequest {
    /// The connection it came on: 1 for the first accepted, 2 for the next, ...
    conn: u64,
    method: String,
    path: String,
    body: Vec<u8>,
}

type Script = Arc<dyn Fn(&RawRequest) -> Vec<Step> + Send + Sync>;

/// What the raw upstream saw.
#[derive(Default)]
struct RawSeen {
    /// TCP connections accepted.
    accepted: AtomicU64,
    /// Connections the peer (the balancer) closed: a read saw the end of the stream or an
    /// error, or a write failed.
    closed_by_peer: Mutex<Vec<u64>>,
    /// Connections this side closed (a [`Step::Close`]).
    closed_here: Mutex<Vec<u64>>,
    log: Mutex<Vec<RawRequest>>,
}

/// A `TcpListener` whose connections read request heads (and `Content-Length` bodies) and
/// answer each with the steps the script returns for it.
struct RawUpstream {
    addr: SocketAddr,
    seen: Arc<RawSeen>,
    accept: JoinHandle<()>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl RawUpstream {
    async fn start(script: impl Fn(&RawRequest) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(RawSeen::default());
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let script: Script = Arc::new(script);
        let (seen_c, seen_count) = (Arc::clone(&seen), Arc::clone(&seen));
        // `accept_loop` counts a connection, then hands it to `serve`, in one task: the count
        // as `serve` sees it is that connection's number.
        let accept = accept_loop(
            listener,
            move || {
                seen_count.accepted.fetch_add(1, Ordering::SeqCst);
            },
            Arc::clone(&conns),
            move |stream| {
                let n = seen_c.accepted.load(Ordering::SeqCst);
                tokio::spawn(serve_raw(
                    stream,
                    n,
                    Arc::clone(&script),
                    Arc::clone(&seen_c),
                ))
            },
        );
        RawUpstream {
            addr,
            seen,
            accept,
            conns,
        }
    }

    fn accepted(&self) -> u64 {
        self.seen.accepted.load(Ordering::SeqCst)
    }

    fn closed_by_peer(&self) -> Vec<u64> {
        self.seen.closed_by_peer.lock().unwrap().clone()
    }

    fn closed_here(&self) -> Vec<u64> {
        self.seen.closed_here.lock().unwrap().clone()
    }

    fn log(&self) -> Vec<RawRequest> {
        self.seen.log.lock().unwrap().clone()
    }

    /// A balancer with `cfg` routing service `web` to this upstream alone.
    async fn balancer(&self, cfg: balancer::Config) -> Balancer {
        Balancer::with_static(cfg, vec![("web", vec![instance("raw", "web", self.addr)])]).await
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(mut c) = self.conns.lock() {
            for t in c.drain(..) {
                t.abort();
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn serve_raw(mut s: TcpStream, conn: u64, script: Script, seen: Arc<RawSeen>) {
    let peer_closed = || seen.closed_by_peer.lock().unwrap().push(conn);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return peer_closed(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut words = head.lines().next().unwrap_or("").split(' ');
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("").to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return peer_closed(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let req = RawRequest {
            conn,
            method,
            path,
            body: buf[head_end..head_end + len].to_vec(),
        };
        buf.drain(..head_end + len);
        seen.log.lock().unwrap().push(req.clone());
        for step in script(&req) {
            match step {
                Step::Write(b) => {
                    if s.write_all(&b).await.is_err() {
                        return peer_closed();
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Close => {
                    seen.closed_here.lock().unwrap().push(conn);
                    return;
                }
            }
        }
    }
}

/// A complete keep-alive `Content-Length` answer.
fn ok_with(body: &[u8]) -> Vec<u8> {
    let mut w = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
        body.len()
    )
    .into_bytes();
    w.extend_from_slice(body);
    w
}

// ---------------------------------------------------------------------------------------------
// A raw client
// ---------------------------------------------------------------------------------------------

/// A response read off a raw socket (`Content-Length` framing only).
#[derive(Debug)]
struct RawResponse {
    status: u16,
    body: Vec<u8>,
}

impl RawResponse {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 client on a bare socket, so that the test decides when it reads.
struct RawClient {
    s: TcpStream,
    /// Bytes read and not yet consumed by a response.
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        RawClient {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes, or panics at the end of the stream or after [`DEADLINE`].
    async fn more(&mut self, what: &str) {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = timeout(DEADLINE, self.s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no bytes of {what} within {DEADLINE:?}"))
            .unwrap_or_else(|e| panic!("reading {what}: {e}"));
        assert!(
            n > 0,
            "connection closed while reading {what}; buffered: {:?}",
            String::from_utf8_lossy(&self.buf[..self.buf.len().min(400)])
        );
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Reads one response with a `Content-Length` body.
    async fn response(&mut self) -> RawResponse {
        let (head_len, status, len) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut hs);
            let parsed = r.parse(&self.buf).unwrap_or_else(|e| {
                panic!(
                    "malformed response head ({e}): {:?}",
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(400)])
                )
            });
            if let httparse::Status::Complete(n) = parsed {
                let len: usize = r
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .unwrap()
                            .trim()
                            .parse()
                            .unwrap()
                    })
                    .expect("a content-length response");
                break (n, r.code.unwrap(), len);
            }
            self.more("a response head").await;
        };
        let end = head_len + len;
        while self.buf.len() < end {
            self.more("a response body").await;
        }
        let body = self.buf[head_len..end].to_vec();
        self.buf.drain(..end);
        RawResponse { status, body }
    }

    /// Asserts that for `d` nothing arrives: no byte, and no end of stream.
    async fn expect_silence(&mut self, d: Duration, why: &str) {
        let mut chunk = [0u8; 4096];
        match timeout(d, self.s.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("{why}: the connection was closed"),
            Ok(Ok(n)) => panic!(
                "{why}: got {:?}",
                String::from_utf8_lossy(&chunk[..n.min(400)])
            ),
            Ok(Err(e)) => panic!("{why}: read failed: {e}"),
        }
    }
}

fn get_req(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\n\r\n").into_bytes()
}

/// The `/status` entry of instance `id` of service `web`.
async fn instance_status(lb: &Balancer, id: &str) -> serde_json::Value {
    let s = lb.service_status("web").await;
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("instance {id} in /status: {s}"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// `max_connections = 2`: two idle keep-alive clients hold both slots, so a third client
/// (accepted by the kernel, not by the balancer) gets nothing for its request; once one of
/// the first two closes, the third is accepted and answered, and the other idle client still
/// works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_holds_excess_clients_until_a_slot_frees() {
    let b = Backend::start("b1").await;
    let mut cfg = config(&["web"]);
    cfg.max_connections = 2;
    // Idle clients must not be closed by the header read timeout during the test: only the
    // client's own close may free a slot here.
    cfg.header_read_timeout = DEADLINE * 6;
    let lb = Balancer::with_static(cfg, vec![("web", vec![b.instance("web")])]).await;

    let mut c1 = RawClient::connect(lb.addr).await;
    let mut c2 = RawClient::connect(lb.addr).await;
    for (i, c) in [&mut c1, &mut c2].into_iter().enumerate() {
        c.send(&get_req("/")).await;
        let r = c.response().await;
        assert_eq!(r.status, 200, "client {}: {r:?}", i + 1);
        assert_eq!(r.text(), "b1");
    }
    assert_eq!(b.hits(), 2);

    let mut c3 = RawClient::connect(lb.addr).await;
    c3.send(&get_req("/")).await;
    c3.expect_silence(
        Duration::from_millis(500),
        "a third client while two connections hold both slots",
    )
    .await;
    assert_eq!(b.hits(), 2, "the third request did not reach the instance");
    let st = lb.status().await;
    assert_eq!(
        st["connections"], 2,
        "only two connections are served: {st}"
    );

    drop(c1);
    let r = timeout(Duration::from_secs(10), c3.response())
        .await
        .expect("the third client is answered once a slot frees");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "b1");
    assert_eq!(b.hits(), 3);

    // The idle second client kept its slot and is served as before.
    c2.send(&get_req("/")).await;
    let r = c2.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    lb.stop().await;
}

/// `pool_idle_timeout = 300ms`: an upstream socket pooled after a request is reused while
/// fresh, and closed by the balancer once it has been idle too long; the next request then
/// goes over a new upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_upstream_sockets_expire() {
    let up = RawUpstream::start(|req| vec![Step::Write(ok_with(req.method.as_bytes()))]).await;
    let mut cfg = config(&["web"]);
    cfg.pool_idle_timeout = Duration::from_millis(300);
    let lb = up.balancer(cfg).await;
    let mut conn = H1Conn::connect(lb.addr).await.unwrap();

    let t0 = Instant::now();
    for _ in 0..2 {
        let a = conn.get("/", &[]).await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        assert_eq!(a.text(), "GET");
    }
    // Both requests, and the pooling between them, happened within `elapsed`: if that is
    // shorter than the idle timeout, the pooled socket must have carried the second one.
    let elapsed = t0.elapsed();
    if elapsed < Duration::from_millis(250) {
        assert_eq!(
            up.accepted(),
            1,
            "a fresh pooled socket is reused (two requests within {elapsed:?})"
        );
    } else {
        println!("skipping the reuse check: two requests took {elapsed:?}");
    }
    let first = up.accepted();

    // The upstream never closes on its own: any close is the balancer's.
    eventually(
        Duration::from_secs(5),
        "the balancer to close its idle upstream socket",
        || async { (up.closed_by_peer().len() as u64 == first).then_some(()) },
    )
    .await;
    assert!(up.closed_here().is_empty());
    assert!(conn.is_open(), "the client connection stays open");

    let a = conn.get("/", &[]).await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(up.accepted(), first + 1, "a new upstream connection");
    let log = up.log();
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[2].conn, first + 1, "{log:?}");
    lb.stop().await;
}

/// An instance that closes its keep-alive connection ~100 ms after answering: the balancer
/// drops that pooled socket when the instance closes it, so a later POST (which may not be
/// retried) goes over a fresh connection, reaches the instance once, and gets 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_closing_an_idle_pooled_socket() {
    let up = RawUpstream::start(|req| {
        let body = format!("{} {}", req.method, req.body.len());
        vec![
            Step::Write(ok_with(body.as_bytes())),
            Step::Sleep(Duration::from_millis(100)),
            Step::Close,
        ]
    })
    .await;
    let lb = up.balancer(config(&["web"])).await;
    let mut conn = H1Conn::connect(lb.addr).await.unwrap();

    let a = conn.get("/", &[]).await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), "GET 0");
    eventually(DEADLINE, "the instance to close its connection", || async {
        (up.closed_here() == vec![1]).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let req = request(Method::POST, lb.addr, "/submit")
        .body(Full::new(Bytes::from_static(b"a small body")))
        .unwrap();
    let a = conn.send(req).await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "POST: {}", a.text());
    assert_eq!(a.text(), "POST 12");

    let log = up.log();
    let posts: Vec<&RawRequest> = log.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(
        posts.len(),
        1,
        "the POST reached the instance once: {log:?}"
    );
    assert_eq!(posts[0].path, "/submit");
    assert_eq!(posts[0].body, b"a small body");
    assert_eq!(
        posts[0].conn, 2,
        "the POST came on a fresh connection: {log:?}"
    );
    assert_eq!(up.accepted(), 2);
    lb.stop().await;
}

/// A listener with backlog 1 that never accepts, its queue filled by the test: further
/// connects hang. `None` (after saying why) when connects to it do not hang on this machine.
async fn black_hole() -> Option<(tokio::net::TcpListener, Vec<TcpStream>)> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = sock.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fill = Vec::new();
    let mut full = false;
    for _ in 0..8 {
        match timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fill.push(s),
            Ok(Err(e)) => {
                println!("black hole: a connect to a full backlog failed at once ({e}); skipping");
                return None;
            }
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    if !full {
        println!(
            "black hole: {} connects to a backlog-1 listener all completed; skipping",
            fill.len()
        );
        return None;
    }
    // The check the test relies on: a plain connect now hangs for longer than the balancer's
    // connect timeout.
    let started = Instant::now();
    match timeout(Duration::from_millis(400), TcpStream::connect(addr)).await {
        Err(_) => Some((listener, fill)),
        Ok(r) => {
            println!(
                "black hole: a probe connect ended after {:?} ({:?}) instead of hanging; skipping",
                started.elapsed(),
                r.map(|_| "connected")
            );
            None
        }
    }
}

/// `connect_timeout = 200ms` with a black-hole instance (connects hang) next to a healthy
/// one: every request gets 200 from the healthy instance, the connect that timed out
/// counting as a connect failure that ejected the black hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_moves_the_request_to_the_next_instance() {
    let Some((hole, _fill)) = black_hole().await else {
        return;
    };
    let hole_addr = hole.local_addr().unwrap();
    let ok = Backend::start("ok").await;
    let mut cfg = config(&["web"]);
    cfg.connect_timeout = Duration::from_millis(200);
    let lb = Balancer::with_static(
        cfg,
        vec![(
            "web",
            vec![instance("hole", "web", hole_addr), ok.instance("web")],
        )],
    )
    .await;

    for i in 0..6 {
        let a = timeout(DEADLINE, get(lb.addr, "/"))
            .await
            .unwrap_or_else(|_| panic!("request {i} answered within {DEADLINE:?}"))
            .unwrap();
        assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
        assert_eq!(a.text(), "ok", "request {i}");
    }
    assert_eq!(ok.hits(), 6);

    let h = instance_status(&lb, "hole").await;
    assert!(
        h["ejections"].as_u64().unwrap() >= 1,
        "the black hole was ejected: {h}"
    );
    assert!(h["failures"].as_u64().unwrap() >= 1, "{h}");
    assert_eq!(h["requests"], 0, "{h}");
    let o = instance_status(&lb, "ok").await;
    assert_eq!(o["requests"], 6, "{o}");
    assert_eq!(o["failures"], 0, "{o}");
    assert_eq!(o["ejections"], 0, "{o}");
    lb.stop().await;
    drop(hole);
}

/// An 8 MiB `Content-Length` body to a client that reads nothing for a second: the balancer
/// waits for the client (back-pressure) and the body arrives intact; the same client
/// connection then carries another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_gets_a_large_body_intact() {
    let big = Arc::new(random_bytes(8 << 20));
    let big_c = Arc::clone(&big);
    let up = RawUpstream::start(move |req| {
        if req.path == "/big" {
            vec![Step::Write(ok_with(&big_c))]
        } else {
            vec![Step::Write(ok_with(b"small"))]
        }
    })
    .await;
    let lb = up.balancer(config(&["web"])).await;
    let mut c = RawClient::connect(lb.addr).await;

    c.send(&get_req("/big")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = c.response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    assert_eq!(digest(&r.body), digest(&big), "the body arrived intact");
    assert!(c.buf.is_empty(), "nothing after the body");

    c.send(&get_req("/small")).await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "small");
    assert_eq!(up.log().len(), 2);
    lb.stop().await;
}

/// A client that closes while a 4 MiB body is still coming (slowly) from the instance: the
/// balancer closes that upstream connection rather than keep or pool it, and a new client's
/// request succeeds over a new upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_mid_response_retires_the_upstream_connection() {
    const PIECE: usize = 64 * 1024;
    const PIECES: usize = 64;
    let up = RawUpstream::start(|req| {
        if req.path == "/big" {
            let mut steps = vec![Step::Write(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    PIECE * PIECES
                )
                .into_bytes(),
            )];
            for i in 0..PIECES {
                steps.push(Step::Write(vec![b'a' + (i % 26) as u8; PIECE]));
                steps.push(Step::Sleep(Duration::from_millis(10)));
            }
            steps
        } else {
            vec![Step::Write(ok_with(b"small"))]
        }
    })
    .await;
    let lb = up.balancer(config(&["web"])).await;

    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/big")).await;
    while c.buf.len() < 2 * PIECE {
        c.more("the start of the big body").await;
    }
    assert!(c.buf.starts_with(b"HTTP/1.1 200"), "{:?}", &c.buf[..40]);
    drop(c);

    eventually(
        DEADLINE,
        "the balancer to close the first upstream connection",
        || async { up.closed_by_peer().contains(&1).then_some(()) },
    )
    .await;

    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/small")).await;
    let r = c.response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "small");
    assert_eq!(up.accepted(), 2, "the cut-off connection was not reused");
    let log = up.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1].conn, 2, "{log:?}");
    lb.stop().await;
}

/// 100 concurrent keep-alive clients, 20 sequential GETs each, to 3 instances: every answer
/// is 200, and round robin per request spreads the 2000 evenly across the instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_keep_alive_clients() {
    const CLIENTS: usize = 100;
    const EACH: usize = 20;
    let backends = vec![
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let instances = backends.iter().map(|b| b.instance("web")).collect();
    let lb = Balancer::with_static(config(&["web"]), vec![("web", instances)]).await;
    let addr = lb.addr;

    let barrier = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            let mut conn = H1Conn::connect(addr).await.unwrap();
            // Every connection is open before any request goes.
            barrier.wait().await;
            let mut names = Vec::with_capacity(EACH);
            for i in 0..EACH {
                let a = conn.get("/", &[]).await.unwrap();
                assert_eq!(a.status, StatusCode::OK, "request {i}: {}", a.text());
                names.push(a.text());
            }
            names
        }));
    }
    let mut names = Vec::new();
    for t in tasks {
        let got = timeout(DEADLINE * 3, t)
            .await
            .expect("every client finishes")
            .expect("no client failed");
        names.extend(got);
    }
    assert_eq!(names.len(), CLIENTS * EACH);
    let counts = tally(names.iter().map(String::as_str));
    let hits: Vec<u64> = backends.iter().map(Backend::hits).collect();
    assert_eq!(
        hits.iter().sum::<u64>(),
        (CLIENTS * EACH) as u64,
        "{hits:?}"
    );
    for b in &backends {
        assert_eq!(
            u64::from(counts.get(&b.name).copied().unwrap_or(0)),
            b.hits(),
            "answers from {} match its hits: {counts:?}",
            b.name
        );
        let per = (CLIENTS * EACH / 3) as u64;
        assert!(
            b.hits().abs_diff(per) <= 40,
            "{} got {} requests, expected {per} ± 40: {hits:?}",
            b.name,
            b.hits()
        );
    }
    lb.stop().await;
}
