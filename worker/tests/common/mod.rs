//! Helpers shared by the worker's integration tests: a tiny HTTP client that opens a fresh
//! connection per request (so a successful request proves the listener still accepts), process
//! guards that kill their child on drop, and polling with a deadline instead of fixed sleeps.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A response, fully read.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// One request on a new HTTP/1.1 connection.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send.send_request(req.body(Full::new(body.into()))?).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `GET path` on a new connection.
pub async fn get(
    addr: SocketAddr,
    path: &str,
) -> Result<Answer, Box<dyn std::error::Error + Send + Sync>> {
    request(addr, Method::GET, path, &[], Bytes::new()).await
}

/// A request body fed through a channel, to prove responses stream before the request ends.
pub struct ChannelBody(pub tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A port that was free a moment ago (for the agent, which must keep its port across restarts).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A child process killed (SIGKILL) and reaped on drop, pass or fail.
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM, the way an init system stops a service.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Kills at once (SIGKILL) and reaps.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit status, if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit, polling, up to `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let name = self.name.clone();
        eventually(deadline, &format!("{name} to exit"), || {
            let s = self.try_wait();
            async move { s }
        })
        .await
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log -----\n{}",
                self.name,
                self.pid(),
                self.log()
            );
        }
    }
}

/// Spawns `cmd` with stderr captured: kept for the failure report, and sent line by line to the
/// returned receiver as it arrives.
fn spawn_logged(name: &str, mut cmd: Command) -> (Proc, mpsc::Receiver<String>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info,worker=debug")
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_HTTP_TOKEN_FILE");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut l) = sink.lock() {
                l.push(line.clone());
            }
            let _ = tx.send(line);
        }
    });
    (
        Proc {
            name: name.to_string(),
            child,
            log,
        },
        rx,
    )
}

/// The `worker` binary under test.
pub fn worker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_worker"))
}

/// The `discovery` binary, built once per test process next to the `worker` binary (cargo only
/// builds the binaries of the package under test). `DISCOVERY_BIN` overrides the path.
pub fn discovery_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("DISCOVERY_BIN") {
            return PathBuf::from(p);
        }
        let profile_dir = worker_bin()
            .parent()
            .expect("worker binary has a directory")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("profile dir has a parent");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile dir name");
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "discovery", "--bin", "discovery"])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir);
        match profile {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd
            .status()
            .expect("run cargo build for the discovery binary");
        assert!(status.success(), "building the discovery binary failed");
        let bin = profile_dir.join("discovery");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// A `discovery agent --dev` process on 127.0.0.1:`port`.
pub struct Agent {
    pub port: u16,
    pub proc: Proc,
}

impl Agent {
    /// Starts the dev agent and waits until `/v1/status/leader` answers.
    pub async fn start(port: u16) -> Agent {
        let mut cmd = Command::new(discovery_bin());
        cmd.args([
            "agent",
            "--dev",
            "--http-addr",
            &format!("127.0.0.1:{port}"),
        ]);
        let (proc, _lines) = spawn_logged(&format!("agent:{port}"), cmd);
        let mut agent = Agent { port, proc };
        let client = agent.client();
        eventually(
            DEADLINE,
            "the dev agent to answer /v1/status/leader",
            || {
                let c = client.clone();
                async move { c.status_leader().await.ok() }
            },
        )
        .await;
        assert!(agent.proc.try_wait().is_none(), "agent exited early");
        agent
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A Consul client for this agent.
    pub fn client(&self) -> discovery::Client {
        consul_client(self.port)
    }
}

/// A Consul client for an agent on 127.0.0.1:`port`.
pub fn consul_client(port: u16) -> discovery::Client {
    let cfg = discovery::ClientConfig::new(&format!("127.0.0.1:{port}")).expect("client config");
    discovery::Client::new(discovery::ClientConfig {
        timeout: Duration::from_secs(3),
        ..cfg
    })
}

/// A `worker` process and the addresses it reported.
pub struct Worker {
    pub addr: SocketAddr,
    /// The admin listener; `None` with `--admin off`.
    pub admin: Option<SocketAddr>,
    pub proc: Proc,
}

impl Worker {
    /// Starts the worker on 127.0.0.1:0 with `args` and reads the bound addresses from its
    /// `listening` log line (the admin listener defaults to an ephemeral port then).
    pub fn start(args: &[&str]) -> Worker {
        let mut cmd = Command::new(worker_bin());
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        let (mut proc, lines) = spawn_logged("worker", cmd);
        let start = Instant::now();
        let (addr, admin) = loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addrs) = listening_addrs(&line) {
                        break addrs;
                    }
                }
                Err(_) => {
                    let status = proc.try_wait();
                    panic!(
                        "worker never reported its address (exit: {status:?})\n{}",
                        proc.log()
                    );
                }
            }
        };
        Worker { addr, admin, proc }
    }

    /// The admin listener's address; panics when the worker runs with `--admin off`.
    pub fn admin(&self) -> SocketAddr {
        self.admin.expect("the worker has an admin listener")
    }

    /// The instance ID the worker registers by default.
    pub fn default_id(&self, service: &str) -> String {
        format!("{service}-{}-{}", self.addr.ip(), self.addr.port())
    }
}

/// `... listening addr=127.0.0.1:41234 admin=127.0.0.1:41235 ...` → the service address, and
/// the admin address unless it says `admin=off`.
fn listening_addrs(line: &str) -> Option<(SocketAddr, Option<SocketAddr>)> {
    if !line.contains("listening") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
    };
    let addr = field("addr=")?.parse().ok()?;
    let admin = match field("admin=")?.as_str() {
        "off" => None,
        a => Some(a.parse().ok()?),
    };
    Some((addr, admin))
}

/// Runs a worker binary to completion with `args`; returns its status and stderr.
pub fn run_worker_to_end(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(worker_bin())
        .args(args)
        .env_remove("CONSUL_HTTP_ADDR")
        .stdin(Stdio::null())
        .output()
        .expect("run worker");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
