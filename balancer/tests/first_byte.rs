//! `--first-byte-timeout`: an idempotent bodiless request sent to an instance that never
//! answers (a hung process, or a link that died under a pooled connection) goes to another
//! instance after the first-byte timeout instead of waiting the whole upstream timeout, and
//! the silent instance sits out a cool-off; a request with a body is not sent twice. On both
//! paths. (The same with a link really cut, in network namespaces: `deploy/netns-cluster.sh`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

async fn hung_and_good(first_byte: Option<Duration>) -> (Silent, RawUpstream, Balancer) {
    let hung = silent_upstream().await;
    let good = RawUpstream::start(|_| vec![Step::Write(ok_with("good"))]).await;
    let mut cfg = config(&["web"]);
    cfg.upstream_timeout = DEADLINE * 3;
    cfg.first_byte_timeout = first_byte;
    let lb = Balancer::with_static(
        cfg,
        vec![(
            "web",
            vec![
                instance("hung", "web", hung.addr),
                instance("good", "web", good.addr),
            ],
        )],
    )
    .await;
    (hung, good, lb)
}

async fn gets_go_elsewhere(request: &[u8]) {
    let (hung, _good, lb) = hung_and_good(Some(Duration::from_millis(300))).await;
    let started = Instant::now();
    for i in 0..6 {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(request).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        assert_eq!(r.text(), "good", "request {i}");
    }
    // One wait of 300 ms at most (then the hung instance is ejected), not 60 s.
    assert!(started.elapsed() < DEADLINE, "took {:?}", started.elapsed());
    assert!(
        hung.requests.load(std::sync::atomic::Ordering::SeqCst) <= 1,
        "the hung instance was tried again during its cool-off"
    );
    let inst = lb.instance_status("web", "hung").await;
    if hung.requests.load(std::sync::atomic::Ordering::SeqCst) == 1 {
        assert_eq!(inst["ejected"], true, "{inst}");
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_instance_is_left_after_the_first_byte_timeout_on_the_fast_path() {
    gets_go_elsewhere(&get_req("/")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_instance_is_left_after_the_first_byte_timeout_on_the_hyper_path() {
    gets_go_elsewhere(b"GET / HTTP/1.0\r\nHost: lb.test\r\n\r\n").await;
}

/// A POST is never sent twice: at the hung instance it waits (here until the client gives
/// up), whatever the first-byte timeout says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_is_not_sent_twice() {
    let (hung, good, lb) = hung_and_good(Some(Duration::from_millis(100))).await;
    // Round robin alternates: of two POSTs, one goes to the hung instance.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(b"POST / HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 2\r\n\r\nhi")
            .await;
        clients.push(c);
    }
    eventually(DEADLINE, "one POST at each instance", || async {
        (hung.requests.load(std::sync::atomic::Ordering::SeqCst) == 1 && good.requests() == 1)
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        good.requests(),
        1,
        "the POST at the hung instance was not resent"
    );
    drop(clients);
    lb.stop().await;
}
