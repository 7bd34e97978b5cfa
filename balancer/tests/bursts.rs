//! A burst of new connections to an instance with a small accept queue: 200 concurrent GETs
//! on new connections through the balancer, to one instance that is a Python `http.server`
//! with a listen backlog of 128. The balancer dials one upstream connection per concurrent
//! request; SYNs past the backlog are dropped and retried by the kernel after 1 s (then 3 s),
//! so the connect timeout must outlive a retransmit. With the default flags, every request
//! succeeds, three runs in a row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::raw::*;
use common::*;

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
