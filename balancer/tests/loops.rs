//! The fast path with four event loops (`Config::event_loops`, `--threads 4`): whichever loop
//! accepts a connection, round robin stays exact per request (shared counters), the
//! connection cap holds across loops, hand-offs to hyper work from any loop, many clients at
//! once are served, and shutdown drains every loop.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::raw::*;
use common::*;

const LOOPS: usize = 4;

async fn four_loops(backends: &[Backend], tweak: impl FnOnce(&mut balancer::Config)) -> Balancer {
    let mut cfg = config(&["web"]);
    cfg.event_loops = LOOPS;
    tweak(&mut cfg);
    let instances = backends.iter().map(|b| b.instance("web")).collect();
    Balancer::with_static(cfg, vec![("web", instances)]).await
}

/// 30 answers split 10/10/10 over three backends.
fn assert_even(names: &[String]) {
    let t = tally(names.iter().map(String::as_str));
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{t:?}"
    );
}

fn fast_loop_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|c| c.starts_with("balancer-fast"))
        .count()
}

/// 30 requests on new connections, then 30 on one keep-alive connection: 10/10/10 each
/// time, although the connections land on different loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_is_exact_across_loops() {
    let backends = three_backends().await;
    let lb = four_loops(&backends, |_| {}).await;
    let mut names = Vec::new();
    for _ in 0..30 {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&get_req("/")).await;
        names.push(c.length_response().await.text());
    }
    assert_even(&names);
    assert!(fast_loop_threads() >= LOOPS, "four event loops run");

    let mut c = RawClient::connect(lb.addr).await;
    let mut names = Vec::new();
    for _ in 0..30 {
        c.send(&get_req("/")).await;
        names.push(c.length_response().await.text());
    }
    assert_even(&names);
    lb.stop().await;
}

/// `max_connections = 3` with four loops: three idle clients hold every slot, wherever they
/// landed; a fourth waits unanswered until one of them leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_holds_across_loops() {
    let backends = three_backends().await;
    let lb = four_loops(&backends, |c| {
        c.max_connections = 3;
        c.header_read_timeout = DEADLINE * 6;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&get_req("/")).await;
        assert_eq!(c.length_response().await.status, 200);
        held.push(c);
    }
    let mut late = RawClient::connect(lb.addr).await;
    late.send(&get_req("/")).await;
    late.expect_silence(Duration::from_millis(500), "a fourth client past the cap")
        .await;
    drop(held.pop());
    assert_eq!(late.length_response().await.status, 200);
    for c in &mut held {
        c.send(&get_req("/")).await;
        assert_eq!(c.length_response().await.status, 200);
    }
    lb.stop().await;
}

/// Connections every loop hands to hyper (HTTP/1.0, chunked uploads) are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoffs_from_every_loop() {
    let backends = three_backends().await;
    let lb = four_loops(&backends, |_| {}).await;
    for i in 0..12 {
        let mut c = RawClient::connect(lb.addr).await;
        if i % 2 == 0 {
            c.send(b"GET / HTTP/1.0\r\nHost: lb.test\r\n\r\n").await;
        } else {
            c.send(b"POST / HTTP/1.1\r\nHost: lb.test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                .await;
        }
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(lb.status().await["http1_handoffs"], 12);
    lb.stop().await;
}

/// 200 keep-alive clients at once, 5 requests each: every request answered, spread evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_over_four_loops() {
    let backends = three_backends().await;
    let lb = four_loops(&backends, |_| {}).await;
    let addr = lb.addr;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            for _ in 0..5 {
                c.send(&get_req("/")).await;
                assert_eq!(c.length_response().await.status, 200);
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
    }
    let hits: Vec<u64> = backends.iter().map(Backend::hits).collect();
    assert_eq!(hits.iter().sum::<u64>(), 1000);
    assert!(hits.iter().all(|h| (332..=335).contains(h)), "{hits:?}");
    lb.stop().await;
}

/// A request in flight on each loop finishes during shutdown; then every loop ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_every_loop() {
    let up = RawUpstream::start(|_| {
        vec![
            Step::Sleep(Duration::from_millis(400)),
            Step::Write(ok_with("late")),
        ]
    })
    .await;
    let mut cfg = config(&["web"]);
    cfg.event_loops = LOOPS;
    let lb = up.balancer_with(cfg).await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&get_req("/")).await;
        clients.push(c);
    }
    // Every request has reached the instance before shutdown begins.
    eventually(DEADLINE, "8 requests at the instance", || async {
        (up.requests() == 8).then_some(())
    })
    .await;
    let stop = tokio::spawn(lb.stop());
    for c in &mut clients {
        let r = c.length_response().await;
        assert_eq!(r.text(), "late");
        c.expect_closed().await;
    }
    tokio::time::timeout(DEADLINE, stop).await.unwrap().unwrap();
}
