//! A client that closes its connection while its request waits at the instance: the
//! balancer lets go of the upstream request at once (its connection to the instance is
//! closed, not left waiting for an answer nobody will read), frees the client's connection
//! slot, and counts it (`balancer_client_aborts_total`, nginx's 499), on both paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;

use common::raw::*;
use common::*;

async fn leaves_while_waiting(request: &[u8], handed_off: bool) {
    let up = silent_upstream().await;
    let mut cfg = config(&["web"]);
    cfg.upstream_timeout = DEADLINE * 3;
    let lb =
        Balancer::with_static(cfg, vec![("web", vec![instance("silent", "web", up.addr)])]).await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(request).await;
    eventually(DEADLINE, "the request at the instance", || async {
        (up.requests.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    drop(c);
    // The instance sees its connection closed by the balancer, long before the upstream
    // timeout would have ended the wait.
    eventually(DEADLINE, "the upstream connection closed", || async {
        (up.closed.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    eventually(
        DEADLINE,
        "the client's slot freed and the abort counted",
        || async {
            let s = lb.status().await;
            let web = &s["services"][0];
            (s["connections"] == 0 && web["client_aborts"] == 1).then_some(())
        },
    )
    .await;
    let metrics = get(lb.admin, "/metrics").await.unwrap().text();
    assert!(
        metrics.contains("balancer_client_aborts_total{service=\"web\"} 1\n"),
        "{metrics}"
    );
    assert_eq!(lb.status().await["http1_handoffs"], u64::from(handed_off));
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_abandons_the_upstream_request_on_the_fast_path() {
    leaves_while_waiting(&get_req("/slow"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_leaving_abandons_the_upstream_request_on_the_hyper_path() {
    leaves_while_waiting(b"GET /slow HTTP/1.0\r\nHost: lb.test\r\n\r\n", true).await;
}
