//! A burst of new connections to an instance with a small accept queue: 200 concurrent GETs
//! on new connections through the balancer, to one instance that is a Python `http.server`
//! with a listen backlog of 128. The balancer dials one upstream connection per concurrent
//! request; SYNs past the backlog are dropped and retried by the kernel after 1 s (then 3 s),
//! so the connect timeout must outlive a retransmit. With the default flags, every request
//! succeeds, three runs in a row. With `--max-conns-per-instance`, a burst waits in a queue
//! instead (HAProxy's per-server `maxconn`), up to `--queue-timeout`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A threaded Python HTTP server with a listen backlog of 128 that accepts at most 200
/// connections a second, killed on drop.
struct PyServer {
    child: Child,
    addr: std::net::SocketAddr,
}

impl PyServer {
    fn start() -> PyServer {
        let script = r#"
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"py"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True
    # An instance busy elsewhere: it takes each connection off its accept queue 5 ms apart,
    # so a burst overflows the queue and the kernel drops SYNs.
    def get_request(self):
        time.sleep(0.005)
        return super().get_request()
s = S(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the server's port");
        PyServer {
            child,
            addr: ([127, 0, 0, 1], port).into(),
        }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_new_connections_to_a_small_backlog_fails_nothing() {
    let py = PyServer::start();
    // The default flags: `Config::new` holds the defaults, as the command line does.
    let cfg = balancer::Config::new(vec![balancer::Route::parse("web").unwrap()]).unwrap();
    let lb = Balancer::with_static(cfg, vec![("web", vec![instance("py", "web", py.addr)])]).await;
    for run in 1..=3 {
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let addr = lb.addr;
            tasks.push(tokio::spawn(async move {
                let mut c = RawClient::connect(addr).await;
                c.send(b"GET / HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n")
                    .await;
                c.length_response().await.status
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        let failed = statuses.iter().filter(|s| **s != 200).count();
        assert_eq!(failed, 0, "run {run}: {failed} of 200 failed: {statuses:?}");
    }
    lb.stop().await;
}

/// An instance that answers each request after 50 ms and records the most requests it had
/// at once.
struct Counting {
    addr: std::net::SocketAddr,
    most: Arc<AtomicUsize>,
    _server: Server,
}

async fn counting_upstream() -> Counting {
    let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (Arc::clone(&now), Arc::clone(&most));
    let server = Server::start(
        || {},
        move |mut s| {
            let (n, m) = (Arc::clone(&n), Arc::clone(&m));
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                    }
                    if !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        continue;
                    }
                    got.clear();
                    let at_once = n.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(at_once, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    n.fetch_sub(1, Ordering::SeqCst);
                    if s.write_all(&ok_with("counted")).await.is_err() {
                        return;
                    }
                }
            })
        },
    )
    .await;
    Counting {
        addr: server.addr,
        most,
        _server: server,
    }
}

async fn capped(up: std::net::SocketAddr, cap: usize, queue_timeout: Duration) -> Balancer {
    let mut cfg = config(&["web"]);
    cfg.max_conns_per_instance = Some(cap);
    cfg.queue_timeout = queue_timeout;
    Balancer::with_static(cfg, vec![("web", vec![instance("up", "web", up)])]).await
}

async fn burst(lb: &Balancer, n: usize, request: &'static [u8]) -> Vec<u16> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let addr = lb.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = RawClient::connect(addr).await;
            c.send(request).await;
            c.response(false).await.status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// `--max-conns-per-instance 8`: a burst of 100 requests reaches the instance at most 8 at a
/// time, every one is answered, and the waits are counted (`balancer_queued_total`); on both
/// paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_instance_cap_queues_a_burst() {
    for request in [
        &b"GET / HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n"[..],
        &b"GET / HTTP/1.0\r\nHost: lb.test\r\n\r\n"[..],
    ] {
        let up = counting_upstream().await;
        let lb = capped(up.addr, 8, DEADLINE).await;
        let statuses = burst(&lb, 100, request).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        let most = up.most.load(Ordering::SeqCst);
        assert!(most <= 8, "{most} requests at the instance at once");
        let web = lb.service_status("web").await;
        assert!(web["queued"].as_u64().unwrap() > 0, "{web}");
        assert_eq!(web["queue_timeouts"], 0, "{web}");
        let metrics = get(lb.admin, "/metrics").await.unwrap().text();
        assert!(
            metrics.contains("balancer_queued_total{service=\"web\"} "),
            "{metrics}"
        );
        lb.stop().await;
    }
}

/// With the only place taken by a request the instance never answers, the next request
/// waits `--queue-timeout` and gets 503, counted as a queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeout_is_a_503() {
    let hung = silent_upstream().await;
    let lb = capped(hung.addr, 1, Duration::from_millis(300)).await;
    let mut first = RawClient::connect(lb.addr).await;
    first.send(&get_req("/")).await;
    eventually(DEADLINE, "the first request at the instance", || async {
        (hung.requests.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    for request in [
        get_req("/"),
        b"GET / HTTP/1.0\r\nHost: lb.test\r\n\r\n".to_vec(),
    ] {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&request).await;
        let r = c.response(false).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.text().contains("connection limit"), "{r:?}");
    }
    assert_eq!(hung.requests.load(Ordering::SeqCst), 1);
    let web = lb.service_status("web").await;
    assert_eq!(web["queue_timeouts"], 2, "{web}");
    drop(first);
    lb.stop().await;
}
