//! The HTTP/1 fast path (`balancer::fast`) over raw sockets: response framing (chunked with
//! trailers, HEAD, 204/304, close-delimited, 1xx, large bodies, non-chunked transfer codings),
//! pipelining, the hand-offs to hyper (HTTP/1.0, `Expect`), malformed and oversized requests,
//! upstream keep-alive hygiene (stale pooled sockets, instances out of step), `Connection:
//! close` and graceful shutdown.
//!
//! Where the hyper test backend cannot produce a behaviour, a scripted raw upstream
//! ([`RawUpstream`]) writes exact bytes. Every wait is bounded by [`DEADLINE`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::*;
use common::*;
use http::StatusCode;
use tokio::time::timeout;

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// A chunked response with a chunk extension and a trailer, written by the instance in odd
/// pieces (cut inside the size line, inside chunk data, between the CR and LF of the final
/// empty line) with pauses between, reaches the client whole and correctly framed; a second
/// request on the same client connection works, and both went over one upstream connection
/// (the balancer found the exact end of the chunked body and pooled the socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_response_with_trailers_in_odd_pieces() {
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n".to_vec();
    let body =
        b"1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n3\r\nxyz\r\n0\r\nx-sum: 42\r\n\r\n".to_vec();
    let mut wire = head.clone();
    wire.extend_from_slice(&body);
    let h = head.len();
    let cuts = [
        20,              // inside the head
        h + 1,           // inside the size line "1|a;ext=1"
        h + 5,           // inside the extension
        h + 10 + 7,      // inside chunk data
        h + 10 + 26 + 1, // between the CR and LF after the data
        wire.len() - 1,  // between the CR and LF of the final empty line
    ];
    let up = RawUpstream::start(move |_| in_pieces(&wire, &cuts, Duration::from_millis(30))).await;
    let lb = up.balancer().await;

    let mut c = RawClient::connect(lb.addr).await;
    for round in 0..2 {
        c.send(&get_req("/chunked")).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "round {round}: {r:?}");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"), "{r:?}");
        assert_eq!(r.text(), "abcdefghijklmnopqrstuvwxyzxyz", "round {round}");
        assert_eq!(r.trailers, vec!["x-sum: 42".to_string()], "round {round}");
        assert_eq!(r.wire_body, body, "chunked bytes pass unchanged");
        assert!(!r.has_connection_close(), "{r:?}");
    }
    assert_eq!(up.requests(), 2);
    assert_eq!(
        up.connections(),
        1,
        "both requests went over one pooled upstream connection"
    );
    lb.stop().await;
}

/// A `HEAD` answer carries `Content-Length: 1234` and no body: the client gets that head
/// (length kept) and no body bytes, and the next `GET` on the same connection gets its own
/// answer at once (the balancer did not wait for 1234 bytes); the upstream socket was reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_response_has_no_body() {
    let up = RawUpstream::start(|req| {
        if req.method == "HEAD" {
            vec![Step::Write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n".to_vec(),
            )]
        } else {
            vec![Step::Write(ok_with("after head"))]
        }
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(b"HEAD /thing HTTP/1.1\r\nHost: lb.test\r\n\r\n")
        .await;
    let r = c.response(true).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("content-length"), Some("1234"), "{r:?}");
    assert!(r.wire_body.is_empty());
    assert!(c.buf.is_empty(), "no body bytes after a HEAD answer");

    c.send(&get_req("/thing")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "after head");
    let log = up.log();
    assert_eq!(log.len(), 2);
    assert_eq!(log[0].method, "HEAD");
    assert_eq!(log[1].method, "GET");
    assert_eq!(up.connections(), 1, "the upstream socket was reused");
    lb.stop().await;
}

/// 204 and 304 answers have no body, even when the 304 carries a `Content-Length`: the client
/// gets each head alone, and the following requests on the same connection work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_content_and_not_modified_have_no_body() {
    let up = RawUpstream::start(|req| {
        let answer: Vec<u8> = match req.path.as_str() {
            "/204" => b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n".to_vec(),
            "/304" => {
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"v1\"\r\n\r\n".to_vec()
            }
            _ => ok_with("plain"),
        };
        vec![Step::Write(answer)]
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;

    c.send(&get_req("/204")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("x-kind"), Some("none"));

    c.send(&get_req("/304")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 304, "{r:?}");
    assert_eq!(r.header("content-length"), Some("10"), "{r:?}");
    assert_eq!(r.header("etag"), Some("\"v1\""), "{r:?}");

    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "plain");
    assert!(c.buf.is_empty());
    assert_eq!(up.requests(), 3);
    assert_eq!(up.connections(), 1);
    lb.stop().await;
}

/// A response without `Content-Length` or `Transfer-Encoding` ends when the instance closes:
/// the client gets the whole body with `connection: close`, then the balancer closes the client
/// connection. A new connection afterwards is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_response_closes_the_client() {
    let body = random_bytes(200 * 1024);
    let body_c = body.clone();
    let up = RawUpstream::start(move |req| {
        if req.path == "/close" {
            let mut steps = vec![Step::Write(
                b"HTTP/1.1 200 OK\r\nX-Kind: eof\r\n\r\n".to_vec(),
            )];
            for piece in body_c.chunks(50_000) {
                steps.push(Step::Sleep(Duration::from_millis(10)));
                steps.push(Step::Write(piece.to_vec()));
            }
            steps.push(Step::Close);
            steps
        } else {
            vec![Step::Write(ok_with("fresh"))]
        }
    })
    .await;
    let lb = up.balancer().await;

    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/close")).await;
    // Close-delimited for the client too: `response` reads until the balancer closes.
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{:?}", r.headers);
    assert_eq!(r.header("x-kind"), Some("eof"));
    assert!(r.has_connection_close(), "{:?}", r.headers);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(digest(&r.body), digest(&body));
    c.expect_closed().await;

    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "fresh");
    lb.stop().await;
}

/// A 103 Early Hints before the final answer is skipped: the client gets the 200 with its body
/// as the first thing on the wire (the 103 is not forwarded), and the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn informational_answer_before_the_final_one() {
    let up = RawUpstream::start(|req| {
        if req.path == "/hints" {
            vec![
                Step::Write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n".to_vec()),
                Step::Sleep(Duration::from_millis(50)),
                Step::Write(ok_with("final")),
            ]
        } else {
            vec![Step::Write(ok_with("next"))]
        }
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/hints")).await;
    let r = c.response(false).await;
    assert_eq!(
        r.status, 200,
        "the 103 is not forwarded; the 200 comes first: {r:?}"
    );
    assert_eq!(r.text(), "final");
    assert_eq!(r.header("link"), None);

    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "next");
    lb.stop().await;
}

/// Three requests in one write (pipelined) get three complete answers, in order, on the same
/// connection, spread over three instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_answered_in_order() {
    let backends = [
        Backend::start("b1").await,
        Backend::start("b2").await,
        Backend::start("b3").await,
    ];
    let instances = backends.iter().map(|b| b.instance("web")).collect();
    let lb = Balancer::with_static(config(&["web"]), vec![("web", instances)]).await;

    let mut c = RawClient::connect(lb.addr).await;
    let mut all = Vec::new();
    for n in 1..=3 {
        all.extend_from_slice(&get_req(&format!("/headers?n={n}")));
    }
    c.send(&all).await;
    let mut names = Vec::new();
    for n in 1..=3 {
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{r:?}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["uri"], format!("/headers?n={n}"), "answer {n} in order");
        names.push(r.header("x-backend").unwrap().to_string());
    }
    names.sort();
    assert_eq!(names, ["b1", "b2", "b3"], "round robin per request");
    // Still open and usable.
    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    lb.stop().await;
}

/// An HTTP/1.0 request (handed to the hyper path) is answered with the body, and then the
/// connection is closed (HTTP/1.0 without keep-alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_request_is_served_then_closed() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(b"GET / HTTP/1.0\r\n\r\n").await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "b1");
    c.expect_closed().await;
    assert_eq!(b.hits(), 1);
    lb.stop().await;
}

/// `Expect: 100-continue` the way curl sends it (head, then the body after a `100 Continue` or
/// about a second) reaches `/hash` intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_upload() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let data = random_bytes(20_000);
    let mut c = RawClient::connect(lb.addr).await;
    c.send(
        format!(
            "POST /hash HTTP/1.1\r\nHost: lb.test\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            data.len()
        )
        .as_bytes(),
    )
    .await;
    // Like curl: wait for the interim answer, but not forever.
    let mut got_continue = false;
    if let Ok(more) = timeout(Duration::from_secs(1), c.fill()).await {
        assert!(more, "closed before the body was sent");
        let r = c.response(false).await;
        assert_eq!(r.status, 100, "an interim 100 Continue: {r:?}");
        got_continue = true;
    }
    c.send(&data).await;
    let mut r = c.response(false).await;
    if r.status == 100 {
        assert!(!got_continue, "a second 100 Continue");
        r = c.response(false).await;
    }
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), digest(&data));
    assert_eq!(
        r.header("x-got-content-length").unwrap(),
        data.len().to_string()
    );
    lb.stop().await;
}

/// A small `Content-Length` body sent in two writes 200 ms apart is waited for and arrives
/// intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_body_in_two_writes_arrives_intact() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let data = random_bytes(3000);
    let mut c = RawClient::connect(lb.addr).await;
    let mut first = format!(
        "POST /hash HTTP/1.1\r\nHost: lb.test\r\nContent-Length: {}\r\n\r\n",
        data.len()
    )
    .into_bytes();
    first.extend_from_slice(&data[..1000]);
    c.send(&first).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.send(&data[1000..]).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), digest(&data));
    assert_eq!(r.header("x-got-content-length"), Some("3000"));
    // The connection carries on.
    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(b.hits(), 2);
    lb.stop().await;
}

/// A malformed request line or header line is answered 400 and the connection closed; 101
/// header lines are answered 431 and the connection closed; no instance saw any of them. 100
/// header lines (the limit) are served. (A raw instance, which has no header limit of its own:
/// the request reaches it with three forwarding headers more.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_are_rejected() {
    let up = RawUpstream::start(|_| vec![Step::Write(ok_with("ok"))]).await;
    let lb = up.balancer().await;

    for bad in [
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(),
    ] {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&bad).await;
        let r = c.response(false).await;
        let what = String::from_utf8_lossy(&bad).into_owned();
        assert_eq!(r.status, 400, "{what:?}: {r:?}");
        assert!(r.has_connection_close(), "{what:?}: {r:?}");
        c.expect_closed().await;
    }

    let lines = |n: usize| {
        let mut head = String::from("GET / HTTP/1.1\r\nHost: lb.test\r\n");
        for i in 1..n {
            head.push_str(&format!("X-H{i}: v\r\n"));
        }
        head.push_str("\r\n");
        head
    };
    let mut c = RawClient::connect(lb.addr).await;
    c.send(lines(101).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 431, "101 header lines: {r:?}");
    assert!(r.has_connection_close(), "{r:?}");
    c.expect_closed().await;
    assert_eq!(up.requests(), 0, "no rejected request reached an instance");

    let mut c = RawClient::connect(lb.addr).await;
    c.send(lines(100).as_bytes()).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "100 header lines: {r:?}");
    assert_eq!(r.text(), "ok");
    let log = up.log();
    assert_eq!(log.len(), 1);
    assert!(log[0].head.contains("X-H99: v\r\n"), "{}", log[0].head);
    lb.stop().await;
}

/// 4 MiB answers stream through intact, framed by `Content-Length` and by chunks (written in
/// 64 KiB pieces), one after the other on one client connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_stream_intact() {
    const SIZE: usize = 4 << 20;
    const PIECE: usize = 64 * 1024;
    let data = Arc::new(random_bytes(SIZE));
    let data_c = Arc::clone(&data);
    let up = RawUpstream::start(move |req| {
        let mut steps = Vec::new();
        if req.path == "/length" {
            steps.push(Step::Write(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\n\r\n").into_bytes(),
            ));
            for p in data_c.chunks(PIECE) {
                steps.push(Step::Write(p.to_vec()));
            }
        } else {
            steps.push(Step::Write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            ));
            for p in data_c.chunks(PIECE) {
                let mut w = format!("{:x}\r\n", p.len()).into_bytes();
                w.extend_from_slice(p);
                w.extend_from_slice(b"\r\n");
                steps.push(Step::Write(w));
            }
            steps.push(Step::Write(b"0\r\n\r\n".to_vec()));
        }
        steps
    })
    .await;
    let lb = up.balancer().await;
    let mut conn = H1Conn::connect(lb.addr).await.unwrap();
    for path in ["/length", "/chunked", "/length"] {
        let a = timeout(DEADLINE, conn.get(path, &[]))
            .await
            .expect("the answer within the deadline")
            .unwrap();
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert_eq!(a.body.len(), SIZE, "{path}");
        assert_eq!(digest(&a.body), digest(&data), "{path}");
    }
    assert!(conn.is_open());
    assert_eq!(up.requests(), 3);
    lb.stop().await;
}

/// An instance that closes each connection ~50 ms after answering (an idle timeout): pooled
/// sockets it closed are never used, so a GET, a POST with a body (not retryable) and another
/// GET, 300 ms apart, all get 200, never 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_pooled_connection_is_not_used() {
    let up = RawUpstream::start(answer_then_close(
        "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
        Duration::from_millis(50),
    ))
    .await;
    let lb = up.balancer().await;
    let mut conn = H1Conn::connect(lb.addr).await.unwrap();

    get_answered(&mut conn).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    post_answered(&mut conn, lb.addr, "/").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    get_answered(&mut conn).await;
    assert_eq!(up.requests(), 3, "each request reached the instance once");
    assert_eq!(up.connections(), 3);
    lb.stop().await;
}

/// An instance that writes bytes after its `Content-Length` body is out of step: the client
/// gets the right answer, and that upstream connection is not used again, whether the extra
/// bytes came with the answer or a little later (while the socket sat in the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extra_bytes_after_the_body_retire_the_upstream_connection() {
    let up = RawUpstream::start(|req| {
        if req.path == "/late" {
            vec![
                Step::Write(ok_with("hello")),
                Step::Sleep(Duration::from_millis(100)),
                Step::Write(b"GARBAGE".to_vec()),
            ]
        } else {
            let mut w = ok_with("hello");
            w.extend_from_slice(b"GARBAGE\r\n");
            vec![Step::Write(w)]
        }
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;

    // The extra bytes in the same write as the answer.
    for round in 0..2 {
        c.send(&get_req("/")).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "round {round}: {r:?}");
        assert_eq!(r.text(), "hello");
    }
    assert!(c.buf.is_empty(), "no garbage reached the client");
    assert!(
        up.connections() >= 2,
        "the out-of-step connection was not reused: {} connection(s)",
        up.connections()
    );

    // The extra bytes after the answer, while the socket is idle in the pool.
    let before = up.connections();
    c.send(&get_req("/late")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.send(&get_req("/late")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "hello");
    assert!(
        up.connections() >= before + 2,
        "a pooled socket with unasked-for bytes was dropped"
    );
    assert_eq!(up.requests(), 4);
    lb.stop().await;
}

/// A client's `Connection: close` on the fast path: the answer carries `connection: close` and
/// the balancer then closes the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connection_close_is_honoured() {
    let b = Backend::start("b1").await;
    let lb = Balancer::with_static(config(&["web"]), vec![("web", vec![b.instance("web")])]).await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(b"GET / HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n")
        .await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "b1");
    assert!(r.has_connection_close(), "{r:?}");
    c.expect_closed().await;
    assert_eq!(b.hits(), 1);
    lb.stop().await;
}

/// Graceful shutdown with an idle keep-alive client connection (one request served): the
/// balancer closes it and `stop` returns, although neither the shutdown grace nor the header
/// read timeout (both longer than the test's deadline) could have ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_keep_alive_connections() {
    let b = Backend::start("b1").await;
    let mut cfg = config(&["web"]);
    cfg.shutdown_grace = DEADLINE * 3;
    cfg.header_read_timeout = DEADLINE * 3;
    let lb = Balancer::with_static(cfg, vec![("web", vec![b.instance("web")])]).await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!r.has_connection_close());

    // `stop` fails the test if the balancer has not returned within DEADLINE.
    lb.stop().await;
    c.expect_closed().await;
}

/// Shutdown while a request is in flight on the fast path: the request is answered in full,
/// then the connection closes and the balancer returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish() {
    let b = Backend::start("b1").await;
    let mut cfg = config(&["web"]);
    cfg.shutdown_grace = DEADLINE * 3;
    let lb = Balancer::with_static(cfg, vec![("web", vec![b.instance("web")])]).await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/slow?ms=1500")).await;
    // Let the request reach the instance before shutdown begins.
    eventually(
        DEADLINE,
        "the slow request reached the instance",
        || async { (b.hits() == 1).then_some(()) },
    )
    .await;
    let stopping = tokio::spawn(lb.stop());
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "b1");
    c.expect_closed().await;
    timeout(DEADLINE, stopping)
        .await
        .expect("the balancer stops once the request is answered")
        .unwrap();
}

/// `Transfer-Encoding: gzip, chunked` on a response: the header reaches the client as sent and
/// the chunked bytes pass unchanged (not decoded, not re-framed); the body's end is found, so
/// the connection carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_chunked_response_passes_unchanged() {
    let mut chunked = Vec::new();
    let payload = random_bytes(5000);
    for p in payload.chunks(1777) {
        chunked.extend_from_slice(format!("{:X}\r\n", p.len()).as_bytes());
        chunked.extend_from_slice(p);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let chunked_c = chunked.clone();
    let up = RawUpstream::start(move |req| {
        if req.path == "/gz" {
            let mut w =
                b"HTTP/1.1 200 OK\r\nContent-Encoding: x-test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                    .to_vec();
            w.extend_from_slice(&chunked_c);
            vec![Step::Write(w)]
        } else {
            vec![Step::Write(ok_with("next"))]
        }
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/gz")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("transfer-encoding"), Some("gzip, chunked"));
    assert_eq!(r.header("content-encoding"), Some("x-test"));
    assert!(r.wire_body == chunked, "the chunked bytes pass unchanged");
    assert!(r.body == payload);

    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "next");
    assert_eq!(up.connections(), 1);
    lb.stop().await;
}

/// An instance that stops in the middle of a response body: on both paths (the fast path for
/// HTTP/1.1, hyper's for an HTTP/1.0 client it is handed) the client gets the head and the
/// bytes sent so far, then the connection closes once the body has been silent for
/// `upstream_timeout`, instead of hanging; the balancer keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_off_on_both_paths() {
    let up = RawUpstream::start(|req| {
        if req.path == "/stall" {
            vec![
                Step::Write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst ten.".to_vec()),
                Step::Sleep(DEADLINE * 4),
            ]
        } else {
            vec![Step::Write(ok_with("fine"))]
        }
    })
    .await;
    let mut cfg = config(&["web"]);
    cfg.upstream_timeout = Duration::from_millis(500);
    let lb = up.balancer_with(cfg).await;

    for request in [
        get_req("/stall"),
        b"GET /stall HTTP/1.0\r\nHost: lb.test\r\n\r\n".to_vec(),
    ] {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&request).await;
        // Everything up to the stall arrives, then the connection ends (within DEADLINE:
        // `fill` panics past it).
        while c.fill().await {}
        let got = String::from_utf8_lossy(&c.buf).into_owned();
        assert!(got.starts_with("HTTP/1."), "{got:?}");
        assert!(got.contains(" 200 "), "{got:?}");
        assert!(
            got.ends_with("first ten."),
            "the bytes before the stall: {got:?}"
        );
    }
    let status = lb.status().await;
    assert_eq!(status["http1_handoffs"], 1, "{status}");

    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/")).await;
    let r = c.response(false).await;
    assert_eq!(r.text(), "fine");
    lb.stop().await;
}
