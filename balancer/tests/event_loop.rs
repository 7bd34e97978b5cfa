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

use std::sync::Arc;
use std::time::Duration;

use common::raw::*;
use common::*;
use http::StatusCode;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A raw upstream answering `/big` with the steps `big` returns and any other path with
/// `small`, a balancer routing to it alone, and a client that has sent `GET /big` through it.
async fn big_requested(
    big: impl Fn() -> Vec<Step> + Send + Sync + 'static,
) -> (RawUpstream, Balancer, RawClient) {
    let up = RawUpstream::start(move |req| {
        if req.path == "/big" {
            big()
        } else {
            vec![Step::Write(ok_with(b"small"))]
        }
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(&get_req("/big")).await;
    (up, lb, c)
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
        let r = c.length_response().await;
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
    let r = timeout(Duration::from_secs(10), c3.length_response())
        .await
        .expect("the third client is answered once a slot frees");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "b1");
    assert_eq!(b.hits(), 3);

    // The idle second client kept its slot and is served as before.
    c2.send(&get_req("/")).await;
    let r = c2.length_response().await;
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
    let lb = up.balancer_with(cfg).await;
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
            up.connections(),
            1,
            "a fresh pooled socket is reused (two requests within {elapsed:?})"
        );
    } else {
        println!("skipping the reuse check: two requests took {elapsed:?}");
    }
    let first = up.connections();

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
    assert_eq!(up.connections(), first + 1, "a new upstream connection");
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
    let up = RawUpstream::start(answer_then_close("", Duration::from_millis(100))).await;
    let lb = up.balancer().await;
    let mut conn = H1Conn::connect(lb.addr).await.unwrap();

    get_answered(&mut conn).await;
    eventually(DEADLINE, "the instance to close its connection", || async {
        (up.closed_here() == vec![1]).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    post_answered(&mut conn, lb.addr, "/submit").await;

    let log = up.log();
    let posts: Vec<&RawRequest> = log.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(
        posts.len(),
        1,
        "the POST reached the instance once: {log:?}"
    );
    assert_eq!(posts[0].path, "/submit");
    assert_eq!(posts[0].body, SMALL_BODY);
    assert_eq!(
        posts[0].conn, 2,
        "the POST came on a fresh connection: {log:?}"
    );
    assert_eq!(up.connections(), 2);
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

    let h = lb.instance_status("web", "hole").await;
    assert!(
        h["ejections"].as_u64().unwrap() >= 1,
        "the black hole was ejected: {h}"
    );
    assert!(h["failures"].as_u64().unwrap() >= 1, "{h}");
    assert_eq!(h["requests"], 0, "{h}");
    let o = lb.instance_status("web", "ok").await;
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
    let (up, lb, mut c) = big_requested(move || vec![Step::Write(ok_with(big_c.as_slice()))]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = c.length_response().await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    assert_eq!(digest(&r.body), digest(&big), "the body arrived intact");
    assert!(c.buf.is_empty(), "nothing after the body");

    c.send(&get_req("/small")).await;
    let r = c.length_response().await;
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
    let (up, lb, mut c) = big_requested(|| {
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
    })
    .await;
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
    let r = c.length_response().await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.text(), "small");
    assert_eq!(up.connections(), 2, "the cut-off connection was not reused");
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
