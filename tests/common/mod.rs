//! The harness of the end-to-end tests: free ports, real processes of the `cluster` binary
//! that end with the test (pass or fail), HTTP on 127.0.0.1, and polling with deadlines.
//!
//! # Layout
//!
//! - [`free_ports`]: blocks of free loopback ports, below the kernel's ephemeral range.
//! - [`Proc`]: one child process, its output in log files, killed by PID when dropped.
//! - [`get`] / [`request`]: one HTTP/1.1 request on a fresh connection, like `curl`.
//! - [`Load`]: a steady stream of GETs on a keep-alive client, counting answers per worker.
//! - [`Cluster`]: a dev agent, workers and a balancer started one by one, as the launcher
//!   would, plus the questions the tests ask them (`?passing`, the balancer's `/status`).
//! - [`wait_for`]: polls a condition until a deadline.

// Each test binary uses a different part of the harness.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client as PooledClient;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_cluster");
/// The Consul service name of the workers.
pub const SERVICE: &str = "web";
/// Generous deadline for conditions that normally hold within a few seconds.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// Deadline of one HTTP request made by a test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Ports

/// Next candidate port; seeded from the PID so concurrent test runs start apart.
static NEXT_PORT: Mutex<Option<u16>> = Mutex::new(None);

/// Ports handed out below the ephemeral range (`ip_local_port_range`): a port picked there
/// could be taken by some outgoing connection while a test has its worker stopped, and the
/// worker would then fail to bind the same port again.
fn port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12_000 {
        (10_000, ephemeral_low)
    } else {
        // An unusual configuration: ports high above a low ephemeral range.
        (61_000, 65_000)
    }
}

/// The first of `n` consecutive free ports on 127.0.0.1. Each is bound once to check, then
/// released; ports are never handed out twice by one test binary.
pub fn free_ports(n: u16) -> u16 {
    let (low, high) = port_range();
    let span = high - low - n;
    let mut next = NEXT_PORT.lock().unwrap_or_else(|p| p.into_inner());
    let mut p = next.unwrap_or_else(|| low + (std::process::id() % u32::from(span)) as u16);
    for _ in 0..span {
        if p < low || p + n > high {
            p = low;
        }
        let all_free = (p..p + n).all(|q| TcpListener::bind(("127.0.0.1", q)).is_ok());
        if all_free {
            *next = Some(p + n);
            return p;
        }
        p += 1;
    }
    panic!("no {n} consecutive free ports between {low} and {high}");
}

/// A free address on 127.0.0.1.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_ports(1)))
}

/// Whether `addr` can be bound right now (nothing listens on it).
pub fn port_is_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Processes

static LOG_SEQ: AtomicUsize = AtomicUsize::new(0);

fn log_dir() -> PathBuf {
    std::env::temp_dir().join(format!("cluster-e2e-{}", std::process::id()))
}

/// Creates a log file; retried because a finishing test removes the directory once empty.
fn create_log(path: &Path) -> File {
    let mut last = None;
    for _ in 0..5 {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match File::create(path) {
            Ok(f) => return f,
            Err(e) => last = Some(e),
        }
    }
    panic!("cannot create {}: {last:?}", path.display());
}

/// A child process of the `cluster` binary. Its stdout and stderr go to log files (printed
/// when a test fails); dropping it kills it by PID and reaps it, so no process outlives its
/// test, whichever way the test ends.
pub struct Proc {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    /// Set once the child has been reaped; from then on its PID is never signalled again
    /// (it may belong to another process).
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cluster <args>` with a clean Consul environment.
    pub fn spawn(name: &str, args: &[String]) -> Proc {
        Self::spawn_with(name, args, |_| {})
    }

    /// Starts `cluster <args>`; `adjust` may change the command before it starts.
    pub fn spawn_with(name: &str, args: &[String], adjust: impl FnOnce(&mut Command)) -> Proc {
        let seq = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = log_dir();
        let stdout = dir.join(format!("{seq:03}-{name}.out"));
        let stderr = dir.join(format!("{seq:03}-{name}.err"));
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(create_log(&stdout))
            .stderr(create_log(&stderr))
            // The tests give every address explicitly; inherited settings must not redirect a
            // component to someone else's Consul or make it think it is supervised.
            .env_remove("CONSUL_HTTP_ADDR")
            .env_remove("CONSUL_HTTP_TOKEN")
            .env_remove("CONSUL_HTTP_TOKEN_FILE")
            .env_remove("CLUSTER_SUPERVISED")
            .env("RUST_LOG", "info");
        adjust(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BIN} for {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`, …) with `kill(1)`, if the child has not been reaped.
    pub fn signal(&mut self, sig: &str) {
        if self.try_status().is_some() {
            return;
        }
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {} ({}) failed", self.pid(), self.name);
    }

    /// The exit status, if the child has exited (reaping it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Waits for the child to exit on its own; panics after `within`.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.try_status() {
                return s;
            }
            if Instant::now() >= end {
                panic!(
                    "{} (pid {}) did not exit within {within:?}\n{}",
                    self.name,
                    self.pid(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) -> ExitStatus {
        if let Some(s) = self.try_status() {
            return s;
        }
        let _ = self.child.kill();
        let s = self.child.wait().unwrap();
        self.status = Some(s);
        s
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The last lines of both logs, for failure messages.
    pub fn logs(&self) -> String {
        fn tail(p: &Path) -> String {
            let s = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        format!(
            "----- {} stdout ({}) -----\n{}\n----- {} stderr ({}) -----\n{}\n",
            self.name,
            self.stdout.display(),
            tail(&self.stdout),
            self.name,
            self.stderr.display(),
            tail(&self.stderr)
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Keep the logs and show where they are.
            eprintln!("{}", self.logs());
        } else {
            let _ = std::fs::remove_file(&self.stdout);
            let _ = std::fs::remove_file(&self.stderr);
            // Succeeds only once the last log of this test binary is gone.
            if let Some(dir) = self.stdout.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A helper program that is not ours (chromedriver, Traefik), listening on `addr`; killed by
/// PID and reaped when dropped.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
}

impl Daemon {
    /// Starts `cmd`, which will listen on `addr`.
    pub fn spawn(cmd: &mut Command, addr: SocketAddr) -> Daemon {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Daemon { child, addr }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A program named by the environment variable `env`, or the first of `names` on `PATH`;
/// `None` if that file does not exist.
pub fn program(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// Cargo's target directory, where screenshots and benchmark tools go.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// Runs `cluster <args>` to completion (a one-shot command such as `members`); panics if it
/// takes longer than `within`. Returns the exit code, stdout and stderr.
pub async fn run_to_end(name: &str, args: &[String], within: Duration) -> (i32, String, String) {
    let mut p = Proc::spawn(name, args);
    let status = p.wait_exit(within).await;
    (status.code().unwrap_or(-1), p.stdout(), p.stderr())
}

/// `&["a", "b"]` → owned arguments.
pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Polling

/// Polls `ok` every 50 ms until it holds; panics with `what` after `within`.
pub async fn wait_for<F, Fut>(what: &str, within: Duration, mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + within;
    loop {
        if ok().await {
            return;
        }
        assert!(Instant::now() < end, "timed out after {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// An answer, reduced to what the tests look at.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// The `X-Worker-Id` header: which worker answered.
    pub worker: Option<String>,
    pub body: String,
}

/// One request on a fresh connection (as `curl` does), with a deadline.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: &str,
) -> Result<Resp, String> {
    request_to(addr, &addr.to_string(), method, path, body).await
}

/// [`request`] with `Host: host`.
pub async fn request_to(
    addr: SocketAddr,
    host: &str,
    method: Method,
    path: &str,
    body: &str,
) -> Result<Resp, String> {
    let host = host.to_string();
    let body = Bytes::from(body.to_string());
    let path = path.to_string();
    let exchange = async move {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request to {addr}: {e}"))?;
        into_resp(resp).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("request to {addr} timed out"))?
}

/// Reads an answer whole, into what the tests look at.
pub async fn into_resp<B>(resp: http::Response<B>) -> Result<Resp, String>
where
    B: hyper::body::Body,
    B::Error: std::fmt::Display,
{
    let status = resp.status().as_u16();
    let worker = resp
        .headers()
        .get("x-worker-id")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok(Resp {
        status,
        worker,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// `GET path` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Resp, String> {
    request(addr, Method::GET, path, "").await
}

// ---------------------------------------------------------------------------------------------
// Steady load

/// What a [`Load`] saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Answers with status 200.
    pub ok: u64,
    /// Everything else: transport errors, timeouts, other statuses (at most 50 kept).
    pub failed: Vec<String>,
    /// Number of failures (all of them, also those not kept in `failed`).
    pub failures: u64,
    /// 200 answers per `X-Worker-Id`.
    pub by_worker: BTreeMap<String, u64>,
}

/// A client task sending `GET /` through the balancer at a steady pace on a keep-alive
/// client, like a real one, until [`Load::finish`] or its time bound.
pub struct Load {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<LoadReport>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Starts sending one request every `every` to `addr`, for at most `bound`.
    pub fn start(addr: SocketAddr, every: Duration, bound: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let client: PooledClient<_, Empty<Bytes>> =
            PooledClient::builder(TokioExecutor::new()).build_http();
        let task = {
            let stop = Arc::clone(&stop);
            let report = Arc::clone(&report);
            tokio::spawn(async move {
                let end = Instant::now() + bound;
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    tick.tick().await;
                    let req = Request::get(format!("http://{addr}/"))
                        .body(Empty::new())
                        .unwrap();
                    let answer = tokio::time::timeout(REQUEST_TIMEOUT, async {
                        let resp = client.request(req).await.map_err(|e| {
                            use std::error::Error as _;
                            let mut msg = e.to_string();
                            let mut src = e.source();
                            while let Some(s) = src {
                                msg.push_str(&format!(": {s}"));
                                src = s.source();
                            }
                            msg
                        })?;
                        into_resp(resp).await
                    })
                    .await
                    .unwrap_or_else(|_| Err("timed out".to_string()));
                    let mut r = report.lock().unwrap();
                    match answer {
                        Ok(a) if a.status == 200 => {
                            r.ok += 1;
                            let w = a.worker.unwrap_or_else(|| "?".into());
                            *r.by_worker.entry(w).or_default() += 1;
                        }
                        other => {
                            r.failures += 1;
                            if r.failed.len() < 50 {
                                let at = format!("after {} ok", r.ok);
                                r.failed.push(format!("{at}: {other:?}"));
                            }
                        }
                    }
                }
            })
        };
        Load { stop, report, task }
    }

    /// The report so far.
    pub fn report(&self) -> LoadReport {
        self.report.lock().unwrap().clone()
    }

    /// 200 answers from `worker` so far.
    pub fn count(&self, worker: &str) -> u64 {
        self.report
            .lock()
            .unwrap()
            .by_worker
            .get(worker)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until `worker` has answered more than `than` requests of this load.
    pub async fn wait_traffic(&self, worker: &str, than: u64, within: Duration) {
        wait_for(
            &format!("{worker} receives traffic (more than {than} requests)"),
            within,
            || async { self.count(worker) > than },
        )
        .await;
    }

    /// Stops the stream and returns the report.
    pub async fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let _ = (&mut self.task).await;
        self.report()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster, one process at a time

/// The ID of worker `n` (1-based) in Consul, and in its answers.
pub fn worker_id(n: usize) -> String {
    format!("{SERVICE}-{n}")
}

/// The message of worker `n`.
pub fn worker_message(n: usize) -> String {
    format!("hello from worker {n}")
}

/// A worker slot: fixed service and admin addresses, and the process while it runs.
pub struct Worker {
    pub n: usize,
    pub addr: SocketAddr,
    /// The worker's admin listener (`--admin`): the health switch.
    pub admin: SocketAddr,
    pub proc: Option<Proc>,
}

/// A dev agent, workers and a balancer, each its own `cluster <component>` process, on free
/// ports. Dropping it kills every process it started.
pub struct Cluster {
    pub agent_addr: SocketAddr,
    pub agent: Option<Proc>,
    /// Slot `i` is worker `i + 1`.
    pub workers: Vec<Worker>,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub balancer: Option<Proc>,
    pub consul: discovery::Client,
    /// Node name of the dev agent.
    pub node: String,
    /// Extra flags of every worker (the churn benchmark tags them for Traefik).
    pub worker_args: Vec<String>,
}

impl Cluster {
    /// Starts an agent, `workers` workers and a balancer, and waits until the agent lists every
    /// worker as passing and the balancer routes to all of them.
    pub async fn start(workers: usize) -> Cluster {
        Self::start_with(workers, &[]).await
    }

    /// [`Cluster::start`], with `worker_args` added to every worker's flags.
    pub async fn start_with(workers: usize, worker_args: &[&str]) -> Cluster {
        let agent_addr = free_addr();
        let consul =
            discovery::Client::new(discovery::ClientConfig::new(&agent_addr.to_string()).unwrap());
        let mut c = Cluster {
            agent_addr,
            agent: None,
            workers: Vec::new(),
            listen: free_addr(),
            admin: free_addr(),
            balancer: None,
            consul,
            node: format!("e2e-{}", agent_addr.port()),
            worker_args: args(worker_args),
        };
        c.start_agent().await;
        for _ in 0..workers {
            c.add_worker();
        }
        c.start_balancer();
        c.wait_converged(workers).await;
        c
    }

    /// Starts the dev agent (again) on its address, empty, and waits until it answers.
    pub async fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "the agent is already running");
        self.agent = Some(Proc::spawn(
            "agent",
            &args(&[
                "agent",
                "--dev",
                "--http-addr",
                &self.agent_addr.to_string(),
                "--node",
                &self.node,
            ]),
        ));
        let consul = self.consul.clone();
        wait_for("the dev agent answers", DEADLINE, || {
            let consul = consul.clone();
            async move { consul.status_leader().await.is_ok() }
        })
        .await;
    }

    /// Adds worker `len + 1` on a new free port and starts it.
    pub fn add_worker(&mut self) -> usize {
        let n = self.workers.len() + 1;
        self.workers.push(Worker {
            n,
            addr: free_addr(),
            admin: free_addr(),
            proc: None,
        });
        self.start_worker(n);
        n
    }

    /// Starts worker `n` on its address (again).
    pub fn start_worker(&mut self, n: usize) {
        let agent = self.agent_addr.to_string();
        let w = &mut self.workers[n - 1];
        assert!(w.proc.is_none(), "worker {n} is already running");
        let mut argv = args(&[
            "worker",
            "--service",
            SERVICE,
            "--listen",
            &w.addr.to_string(),
            "--admin",
            &w.admin.to_string(),
            "--id",
            &worker_id(n),
            "--message",
            &worker_message(n),
            "--consul-addr",
            &agent,
            // Consul's floor; a crashed worker leaves `?passing` within about a second.
            "--check-interval",
            "1s",
        ]);
        argv.extend(self.worker_args.iter().cloned());
        w.proc = Some(Proc::spawn(&format!("worker-{n}"), &argv));
    }

    fn start_balancer(&mut self) {
        self.balancer = Some(Proc::spawn(
            "balancer",
            &args(&[
                "balancer",
                "--listen",
                &self.listen.to_string(),
                "--admin",
                &self.admin.to_string(),
                "--service",
                SERVICE,
                "--consul-addr",
                &self.agent_addr.to_string(),
            ]),
        ));
    }

    /// The running process of worker `n`.
    pub fn worker(&mut self, n: usize) -> &mut Proc {
        self.workers[n - 1]
            .proc
            .as_mut()
            .unwrap_or_else(|| panic!("worker {n} is not running"))
    }

    /// Takes worker `n`'s process out of its slot (to stop it; the slot can be started again).
    pub fn take_worker(&mut self, n: usize) -> Proc {
        self.workers[n - 1]
            .proc
            .take()
            .unwrap_or_else(|| panic!("worker {n} is not running"))
    }

    /// IDs the agent lists as passing, sorted; `None` when the agent does not answer.
    pub async fn passing(&self) -> Option<Vec<String>> {
        let q = discovery::HealthQuery {
            passing: true,
            ..Default::default()
        };
        let (entries, _) = self.consul.health_service(SERVICE, &q).await.ok()?;
        let mut ids: Vec<String> = entries.into_iter().map(|e| e.service.id).collect();
        ids.sort();
        Some(ids)
    }

    /// The balancer's `/status` as JSON.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let r = get(self.admin, "/status").await.ok()?;
        if r.status != 200 {
            return None;
        }
        serde_json::from_str(&r.body).ok()
    }

    /// The instance IDs the balancer routes to, sorted, and whether it says its view is stale.
    pub async fn balancer_view(&self) -> Option<(Vec<String>, bool)> {
        let st = self.status().await?;
        let svc = st["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == SERVICE)?
            .clone();
        let mut ids: Vec<String> = svc["instances"]
            .as_array()?
            .iter()
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect();
        ids.sort();
        let stale = svc["discovery"]["stale"].as_bool().unwrap_or(false);
        Some((ids, stale))
    }

    /// Waits until the agent lists exactly workers `1..=n` as passing and the balancer routes
    /// to exactly those, with a fresh view.
    pub async fn wait_converged(&self, n: usize) {
        let mut want: Vec<String> = (1..=n).map(worker_id).collect();
        want.sort();
        self.wait_passing(&want).await;
        self.wait_balancer(&want).await;
    }

    /// Waits until the agent's `?passing` lists exactly `want` (sorted).
    pub async fn wait_passing(&self, want: &[String]) {
        wait_for(
            &format!("the agent lists {want:?} as passing"),
            DEADLINE,
            || async { self.passing().await.as_deref() == Some(want) },
        )
        .await;
    }

    /// Waits until the balancer routes to exactly `want` (sorted) and Consul answers it.
    pub async fn wait_balancer(&self, want: &[String]) {
        wait_for(
            &format!("the balancer routes to {want:?} with a fresh view"),
            DEADLINE,
            || async { matches!(self.balancer_view().await, Some((ids, false)) if ids == want) },
        )
        .await;
    }

    /// Sends `n` sequential GETs through the balancer, each on a fresh connection; every one
    /// must answer 200. Returns the answers.
    pub async fn curl(&self, n: usize) -> Vec<Resp> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let r = get(self.listen, "/")
                .await
                .unwrap_or_else(|e| panic!("request {i} through the balancer failed: {e}"));
            assert_eq!(r.status, 200, "request {i}: {r:?}");
            out.push(r);
        }
        out
    }

    /// Polls through the balancer until worker `n` answers a request.
    pub async fn wait_traffic_to(&self, n: usize) {
        let id = worker_id(n);
        wait_for(
            &format!("{id} answers through the balancer"),
            DEADLINE,
            || {
                let id = id.clone();
                async move {
                    match get(self.listen, "/").await {
                        Ok(r) => {
                            assert_eq!(r.status, 200, "through the balancer: {r:?}");
                            r.worker.as_deref() == Some(id.as_str())
                        }
                        Err(e) => panic!("request through the balancer failed: {e}"),
                    }
                }
            },
        )
        .await;
    }
}

/// Counts answers per worker.
pub fn tally(answers: &[Resp]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in answers {
        *m.entry(a.worker.clone().unwrap_or_else(|| "?".into()))
            .or_default() += 1;
    }
    m
}
