//! The admin listener is bounded like the proxy port: silent and idle connections are closed,
//! a client that stops reading its answers is cut off, and connections past the cap wait in
//! the listen backlog without touching the proxy port.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Asks `/status` on `probe` (a keep-alive admin connection, itself counted) every 50 ms
/// until its count of admin connections satisfies `want`.
async fn wait_admin_connections(probe: &mut TcpStream, want: impl Fn(u64) -> bool) {
    let start = Instant::now();
    loop {
        let n = probe_status(probe).await;
        if n.is_some_and(&want) {
            return;
        }
        assert!(start.elapsed() < DEADLINE, "admin connections: {n:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the peer closes (or resets) the connection; how long that took.
async fn time_to_close(s: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the admin listener kept the connection open for {within:?}"));
    start.elapsed()
}

async fn balancer_with(limits: impl FnOnce(&mut balancer::Config)) -> (Balancer, Backend) {
    let b = Backend::start("b1").await;
    let mut c = config(&["web"]);
    limits(&mut c);
    let lb = Balancer::with_static(c, vec![("web", vec![b.instance("web")])]).await;
    (lb, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_closes_silent_and_idle_connections() {
    let (lb, _b) = balancer_with(|c| {
        c.header_read_timeout = Duration::from_millis(500);
        c.admin_idle_timeout = Duration::from_secs(1);
    })
    .await;

    // Connected, sends nothing: closed at the header-read timeout.
    let mut silent = TcpStream::connect(lb.admin).await.unwrap();
    let t = time_to_close(&mut silent, Duration::from_secs(5)).await;
    assert!(t >= Duration::from_millis(400), "closed too early: {t:?}");

    // One request, then nothing: the wait for the next head has the same bound.
    let mut kept = TcpStream::connect(lb.admin).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    time_to_close(&mut kept, Duration::from_secs(5)).await;

    // Asks for many answers and reads none: once the socket buffers are full nothing moves,
    // and the idle limit ends it.
    let mut probe = TcpStream::connect(lb.admin).await.unwrap();
    wait_admin_connections(&mut probe, |n| n == 1).await;
    let stalled = TcpStream::connect(lb.admin).await.unwrap();
    let (_rd, mut wr) = stalled.into_split();
    let writer = tokio::spawn(async move {
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(20_000);
        let _ = wr.write_all(&req).await;
        wr
    });
    wait_admin_connections(&mut probe, |n| n == 2).await;
    let start = Instant::now();
    wait_admin_connections(&mut probe, |n| n == 1).await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "closed after {:?}",
        start.elapsed()
    );
    writer.abort();
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_past_the_cap_wait_and_leave_the_proxy_alone() {
    let (lb, _b) = balancer_with(|c| {
        c.admin_max_connections = 4;
        c.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    // Three silent connections and a keep-alive one asking `/status` fill the cap...
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(TcpStream::connect(lb.admin).await.unwrap());
    }
    let mut probe = TcpStream::connect(lb.admin).await.unwrap();
    wait_admin_connections(&mut probe, |n| n == 4).await;
    // ...so a fifth waits in the backlog, unanswered.
    let mut waiting = TcpStream::connect(lb.admin).await.unwrap();
    waiting
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut buf))
            .await
            .is_err(),
        "a connection past the cap was served"
    );
    // The proxy port does not care.
    for _ in 0..10 {
        assert_eq!(get(lb.addr, "/").await.unwrap().status, StatusCode::OK);
    }
    // A slot frees: the waiting one is answered.
    drop(silent.pop());
    let n = tokio::time::timeout(DEADLINE, waiting.read(&mut buf))
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    drop(probe);
    lb.stop().await;
}

/// `admin.connections` from `/status` asked on `probe`, which stays open.
async fn probe_status(probe: &mut TcpStream) -> Option<u64> {
    probe
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let body = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let n = probe.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                continue;
            };
            let len: usize = head.lines().find_map(|l| {
                let l = l.to_ascii_lowercase();
                l.strip_prefix("content-length:")?.trim().parse().ok()
            })?;
            if body.len() >= len {
                return Some(body[..len].to_string());
            }
        }
    })
    .await
    .ok()??;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["admin"]["connections"].as_u64()
}
