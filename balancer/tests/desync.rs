//! Attack requests against the front door: the balancer in front of a scripted raw upstream
//! that records every byte it receives. Each test sends raw bytes, then checks two things:
//!
//! - what reached the instance: exactly the requests the client sent, with exactly their
//!   bodies (or nothing, when the balancer refused the request);
//! - the next client: on the same pooled upstream connection, it gets its own answer.
//!
//! The upstream answers every request with `<method> <path> <body length>`, so an answer
//! that went to the wrong client shows. Cases: `Connection` naming a framing header (both
//! directions), a pooled socket with bytes past the answer, `Host` rules, duplicate
//! `Content-Length`, `CONNECT`, fragments, CL.TE, TE.CL and TE.TE obfuscations, chunk-size
//! overflow, bare LF, obs-fold, pipelining after a body, and a request head sent a byte at a
//! time (linear work, not quadratic). Every wait is bounded by [`DEADLINE`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;

/// The answer of the recording upstream: who asked for what.
fn echo_script(req: &RawRequest) -> Vec<Step> {
    let body = format!("{} {} {}", req.method, req.path, req.body.len());
    vec![Step::Write(ok_with(body))]
}

async fn recording_upstream() -> RawUpstream {
    RawUpstream::start(echo_script).await
}

/// A fresh client's `GET /next` gets its own answer, over the pooled upstream connection
/// when there is one.
async fn next_client_gets_its_own_answer(lb: &Balancer) {
    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/next")).await;
    let r = c.length_response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.text(),
        "GET /next 0",
        "the next client got someone else's answer"
    );
}

/// Sends `attack` on a new connection and reads one answer (`Content-Length` framed).
async fn send_raw(lb: &Balancer, attack: &[u8]) -> (RawClient, RawResponse) {
    let mut c = RawClient::connect(lb.addr).await;
    c.send(attack).await;
    let r = c.length_response().await;
    (c, r)
}

/// `attack` is refused with `status`, the connection closes, and nothing reaches the
/// instance.
async fn refused(attack: &[u8], status: u16) {
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let (mut c, r) = send_raw(&lb, attack).await;
    assert_eq!(r.status, status, "{r:?}");
    assert!(r.has_connection_close(), "{r:?}");
    c.expect_closed().await;
    assert_eq!(
        up.wire(),
        b"",
        "nothing of a refused request may reach the instance"
    );
    next_client_gets_its_own_answer(&lb).await;
    assert_eq!(up.requests(), 1);
}

// ---------------------------------------------------------------------------------------------
// Framing headers named in `Connection`
// ---------------------------------------------------------------------------------------------

/// The reproducer of the front-door issue: `Connection: Content-Length` once made the fast
/// path drop the length from the forwarded head but forward the body, which the instance
/// read as a second request (a `PUT /admin/health` from loopback). The body must arrive as
/// this request's body, with its length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_content_length_cannot_smuggle_a_request() {
    let smuggled = b"PUT /admin/health HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nfail";
    let mut attack = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\nContent-Length: {}\r\n\r\n",
        smuggled.len()
    )
    .into_bytes();
    attack.extend_from_slice(smuggled);
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let (_c, r) = send_raw(&lb, &attack).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), format!("POST /echo {}", smuggled.len()));
    let log = up.log();
    assert_eq!(log.len(), 1, "one request in, one request out: {log:?}");
    assert_eq!(log[0].body, smuggled, "the body arrives as the body");
    assert!(
        log[0]
            .head
            .to_ascii_lowercase()
            .contains(&format!("content-length: {}\r\n", smuggled.len())),
        "{}",
        log[0].head
    );
    next_client_gets_its_own_answer(&lb).await;
    assert_eq!(up.requests(), 2);
    assert!(
        up.log().iter().all(|r| r.method != "PUT"),
        "nothing smuggled"
    );
}

/// The same trick with `Transfer-Encoding` named in `Connection`: the chunked body still
/// arrives as this request's body (the hyper path serves chunked uploads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_transfer_encoding_cannot_smuggle_a_request() {
    let attack = b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let (_c, r) = send_raw(&lb, attack).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "POST /up 5");
    let log = up.log();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0].body, b"hello");
    next_client_gets_its_own_answer(&lb).await;
}

/// An instance's `Connection: content-length` once stripped the length from the head sent
/// to the client, who then could not tell where the answer ends. The client gets the
/// length, and its next request on the same connection its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_connection_content_length_keeps_the_length() {
    let up = RawUpstream::start(|req| {
        let body = format!("{} {}", req.method, req.path);
        vec![Step::Write(ok_with_headers(
            "Connection: content-length\r\n",
            body,
        ))]
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    for path in ["/one", "/two"] {
        c.send(&get_req(path)).await;
        let r = c.length_response().await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.text(), format!("GET {path}"));
        assert_eq!(
            r.header("content-length"),
            Some(format!("GET {path}").len().to_string().as_str())
        );
    }
    assert_eq!(up.connections(), 1, "the upstream socket stayed in step");
}

// ---------------------------------------------------------------------------------------------
// A pooled socket with bytes past the answer
// ---------------------------------------------------------------------------------------------

/// An instance that answers with exactly 8,192 bytes (the fast path's first read) and, in
/// the same write, a second answer nobody asked for. The read filled the buffer exactly, so
/// the socket once went back to the pool with the stray answer unread, and the next client
/// got it. The socket must be closed instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_socket_with_unread_bytes_is_not_reused() {
    const FIRST: usize = 8192;
    let up = RawUpstream::start(|req| {
        if req.path == "/exact" {
            let head_len = ok_with(vec![b'a'; 1000]).len() - 1000;
            // Head plus body exactly FIRST bytes (the length digits stay 4 wide).
            let mut w = ok_with(vec![b'a'; FIRST - head_len]);
            assert_eq!(w.len(), FIRST);
            w.extend_from_slice(&ok_with("STRAY"));
            vec![Step::Write(w)]
        } else {
            echo_script(req)
        }
    })
    .await;
    let lb = up.balancer().await;
    for round in 0..3 {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&get_req("/exact")).await;
        let r = c.length_response().await;
        let head_len = ok_with(vec![b'a'; 1000]).len() - 1000;
        assert_eq!(r.body.len(), FIRST - head_len, "round {round}");
        next_client_gets_its_own_answer(&lb).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Header hygiene
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_host_is_refused() {
    refused(b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_with_two_hosts_is_refused() {
    refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400).await;
}

/// `Content-Length: 5` and `Content-Length: 005` agree: one normalised line goes on, never
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_content_length_is_normalised() {
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let attack =
        b"POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 005\r\n\r\nhello";
    let (_c, r) = send_raw(&lb, attack).await;
    assert_eq!(r.text(), "POST /d 5");
    let log = up.log();
    let head = log[0].head.to_ascii_lowercase();
    assert_eq!(head.matches("content-length").count(), 1, "{head}");
    assert!(head.contains("content-length: 5\r\n"), "{head}");
    next_client_gets_its_own_answer(&lb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_content_lengths_are_refused() {
    refused(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_a_sign_is_refused() {
    refused(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        400,
    )
    .await;
}

/// `CONNECT` once reached the instance as `CONNECT / HTTP/1.1` and the client got no answer
/// at all. A reverse proxy has no tunnel to offer: 501, nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_answered_not_forwarded() {
    refused(
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        501,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragment_is_not_forwarded() {
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let (_c, r) = send_raw(&lb, b"GET /page?q=1#section-2 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "GET /page?q=1 0");
    assert!(!String::from_utf8_lossy(&up.wire()).contains('#'));
}

// ---------------------------------------------------------------------------------------------
// The classics
// ---------------------------------------------------------------------------------------------

/// CL.TE: a front end that reads the length and a back end that reads the chunks see
/// different requests. Both headers together are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cl_te_is_refused() {
    refused(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED",
        400,
    )
    .await;
}

/// TE.CL: the same pair, in the other order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_cl_is_refused() {
    refused(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
        400,
    )
    .await;
}

/// TE.TE: obfuscated `Transfer-Encoding` headers that one parser honours and another does
/// not. Each is refused; none reaches the instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_te_obfuscations_are_refused() {
    let body = "5\r\nhello\r\n0\r\n\r\n";
    let cases: [(&str, u16); 7] = [
        ("Transfer-Encoding: xchunked\r\n", 400),
        ("Transfer-Encoding : chunked\r\n", 400),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
            400,
        ),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            400,
        ),
        ("Transfer-Encoding: chunked, identity\r\n", 400),
        ("Transfer-Encoding: chunked, chunked\r\n", 400),
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
    ];
    for (te, status) in cases {
        let attack = format!("POST / HTTP/1.1\r\nHost: x\r\n{te}\r\n{body}");
        eprintln!("case: {te:?}");
        refused(attack.as_bytes(), status).await;
    }
}

/// Requests that go to the hyper path (absolute form, HTTP/1.0) meet the same framing
/// rules: refused, nothing forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handed_off_requests_meet_the_same_framing_rules() {
    let body = "5\r\nhello\r\n0\r\n\r\n";
    let cases: [(String, u16); 4] = [
        (format!("POST http://x/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{body}"), 400),
        (format!("POST http://x/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{body}"), 501),
        (format!("POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}"), 400),
        ("GET http://x/ HTTP/1.1\r\nX-A: 1\r\n\r\n".to_string(), 400),
    ];
    for (attack, status) in cases {
        eprintln!("case: {attack:?}");
        refused(attack.as_bytes(), status).await;
    }
}

/// A chunked `GET` reaches the instance with its body (hyper's client sends none for a
/// `GET` of unknown length unless told the coding).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_get_keeps_its_body() {
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let (_c, r) = send_raw(
        &lb,
        b"GET /g HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.text(), "GET /g 5");
    assert_eq!(up.log()[0].body, b"hello");
}

/// A chunk size that overflows 64 bits: the upload fails (400), the instance never sees a
/// complete request, and the upstream socket it may have started on is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_size_overflow_is_refused() {
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let attack = b"POST /o HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n";
    let (_c, r) = send_raw(&lb, attack).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(up.requests(), 0, "{:?}", up.log());
    next_client_gets_its_own_answer(&lb).await;
    assert_eq!(up.requests(), 1);
}

/// Lines ended by a bare LF: some parsers accept them, some do not. Refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_is_refused() {
    refused(b"GET / HTTP/1.1\nHost: x\n\n", 400).await;
    refused(b"GET / HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n", 400).await;
}

/// A header continued on the next line (obs-fold, RFC 9112 §5.2): refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn obs_fold_is_refused() {
    refused(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
        400,
    )
    .await;
}

/// Two requests in one write, the first with a body: the instance gets both, each with
/// exactly its own body, and the client both answers in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_after_a_body() {
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    let mut two = b"POST /first HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello".to_vec();
    two.extend_from_slice(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n");
    c.send(&two).await;
    assert_eq!(c.length_response().await.text(), "POST /first 5");
    assert_eq!(c.length_response().await.text(), "GET /second 0");
    let log = up.log();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].body, b"hello");
    assert!(log[1].body.is_empty());
    next_client_gets_its_own_answer(&lb).await;
}

/// A request head sent a byte at a time costs the event loop linear work: it once re-parsed
/// the head from its start on every read (quadratic: a 60 KB head cost over a second of CPU).
/// Measured as the CPU time of the fast path's thread, with a bound far above the linear
/// cost and far below the quadratic one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_a_byte_at_a_time_costs_linear_work() {
    let up = recording_upstream().await;
    let lb = up.balancer().await;
    // Once it has answered, the balancer's loop is running.
    next_client_gets_its_own_answer(&lb).await;
    // Every event loop in this process (other tests' too: they add a little noise, far
    // below the bound).
    let cpu0 = fast_threads_cpu();
    let mut head = b"GET /slow HTTP/1.1\r\nHost: x\r\n".to_vec();
    while head.len() < 60_000 {
        head.extend_from_slice(format!("X-Padding: {}\r\n", "a".repeat(2000)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let addr = lb.addr;
    // Blocking writes with short pauses, each its own segment (no Nagle), so that the loop
    // sees thousands of small reads rather than a few coalesced ones.
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        for piece in head.chunks(4) {
            s.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_micros(50));
        }
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("GET /slow 0") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.ends_with("GET /slow 0"), "{answer}");
    let cpu1 = fast_threads_cpu();
    let used: Duration = cpu0
        .iter()
        .filter_map(|(tid, t0)| Some(cpu1.get(tid)?.saturating_sub(*t0)))
        .sum();
    eprintln!("fast path CPU for a 60 KB head in 4-byte writes: {used:?}");
    assert!(
        used < Duration::from_millis(600),
        "the event loop spent {used:?} on one slow head"
    );
}

/// CPU time (user plus system) of each of this process's fast-path event loops, by thread.
fn fast_threads_cpu() -> std::collections::HashMap<u64, Duration> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            if !comm.starts_with("balancer-fast") {
                return None;
            }
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // Fields after the command name (which may hold spaces) follow the last ')';
            // utime and stime are the 12th and 13th of them.
            let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
            let ticks = f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?;
            // The kernel's USER_HZ is 100 on every Linux this runs on.
            Some((
                e.file_name().to_str()?.parse().ok()?,
                Duration::from_millis(ticks * 10),
            ))
        })
        .collect()
}

/// An instance's `Content-Length: 5, 5` reaches an HTTP/1.0 client (the hyper path) as one
/// `Content-Length: 5` (RFC 9110 §8.6), never as the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_length_list_is_normalised() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello".to_vec(),
        )]
    })
    .await;
    let lb = up.balancer().await;
    let (_c, r) = send_raw(&lb, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.text(), "hello");
    let lengths: Vec<_> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "content-length")
        .collect();
    assert_eq!(lengths.len(), 1, "{r:?}");
    assert_eq!(lengths[0].1, "5", "{r:?}");
}
