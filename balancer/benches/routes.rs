//! Routes benchmark (not a test): prints numbers, asserts nothing.
//!
//! 1,000 services × 10 instances, each service with one `urlprefix-/svcN` tag and each instance
//! with a passing TTL check, registered in the dev agent (in this process). Ten small HTTP
//! servers stand in for the instances (each instance of a service on its own one of the ten
//! ports). The balancer runs as its own process, so its memory and CPU are its own, twice:
//!
//! - tag mode: `balancer` with no `--service` (routes from tags);
//! - flag mode: `balancer --services-file FILE`, one `svcN=/svcN` line per service.
//!
//! For each it prints: the time from start until all 1,000 routes answer 200 (target 2 s);
//! resident memory then, and its peak (target under 50 MB); connections to the agent (target at
//! most 8); CPU over 30 s idle, with `--watch-wait 10s` so that the blocking queries renew
//! within the window (target near zero); and the time from registering one more instance in
//! one service until the balancer routes to it, 20 times (target p99 under 100 ms): each
//! change alone, then changes back to back (where the watcher's rate limit, 10 catalog reads a
//! second after a burst of 3, sets the pace).
//!
//! Run: `cargo bench -p balancer --bench routes` (release build). Ports: 127.0.0.1:0, or
//! consecutive ports from `ROUTES_BENCH_PORTS` (e.g. `35000`) when set.
//! `ROUTES_BENCH_LOG=/tmp/lb` keeps the balancers' logs (`/tmp/lb.tags`, `/tmp/lb.flags`);
//! `ROUTES_BENCH_IDLE_SECS` shortens the idle window; `ROUTES_BENCH_RUST_LOG` sets the
//! balancers' `RUST_LOG` (default `info`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use discovery::wire::{CheckDefinition, ServiceRegistration};
use discovery::{Client, ClientConfig};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HttpClient};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

const SERVICES: usize = 1_000;
const INSTANCES: usize = 10;
const REGISTER_CONCURRENCY: usize = 16;
const IDLE: Duration = Duration::from_secs(30);
const TRIES: usize = 20;
/// Long enough for the watcher's rate limit (`discovery::watch::DEFAULT_RATE_INTERVAL` per
/// query, two queries per try) to give back what a try took.
const LIMIT_REFILL: Duration = Duration::from_millis(300);

type Error = Box<dyn std::error::Error + Send + Sync>;

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A listener on the next bench port (or port 0).
async fn bind() -> Result<TcpListener, Error> {
    let base: u16 = std::env::var("ROUTES_BENCH_PORTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if base == 0 {
        return Ok(TcpListener::bind("127.0.0.1:0").await?);
    }
    loop {
        let p = base + NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        if let Ok(l) = TcpListener::bind(("127.0.0.1", p)).await {
            return Ok(l);
        }
    }
}

/// A free address for a child process to listen on.
async fn free_addr() -> Result<SocketAddr, Error> {
    Ok(bind().await?.local_addr()?)
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; here 11 and 12 (state is 0).
    n(11) + n(12)
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100)
}

/// Established TCP connections of `pid` to `port`.
fn connections_to(pid: u32, port: u16) -> usize {
    let mut inodes = HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy().into_owned();
                if let Some(i) = t.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
                    inodes.insert(i.to_string());
                }
            }
        }
    }
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 9
                && f[3] == "01"
                && inodes.contains(f[9])
                && f[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Ten tiny HTTP/1.1 servers answering `ok` to everything.
async fn instances() -> Result<Vec<SocketAddr>, Error> {
    let mut addrs = Vec::new();
    for _ in 0..INSTANCES {
        let l = bind().await?;
        addrs.push(l.local_addr()?);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
    }
    Ok(addrs)
}

fn registration(service: usize, id: &str, addr: SocketAddr) -> ServiceRegistration {
    ServiceRegistration {
        id: Some(id.to_string()),
        name: format!("svc{service}"),
        tags: vec![format!("urlprefix-/svc{service}")],
        address: Some(addr.ip().to_string()),
        port: Some(addr.port()),
        check: Some(CheckDefinition {
            ttl: Some("24h".into()),
            status: Some("passing".into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Bench {
    consul: Client,
    agent_port: u16,
    http: HttpClient<HttpConnector, Empty<Bytes>>,
    instances: Vec<SocketAddr>,
}

fn main() -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<(), Error> {
    let listener = bind().await?;
    let agent_addr = listener.local_addr()?;
    let config = discovery::agent::AgentConfig::new("bench", agent_addr.ip());
    tokio::spawn(discovery::agent::run(
        config,
        listener,
        std::future::pending(),
    ));
    let consul = Client::new(ClientConfig::new(&agent_addr.to_string())?);
    while consul.status_leader().await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bench = Arc::new(Bench {
        consul,
        agent_port: agent_addr.port(),
        http: HttpClient::builder(TokioExecutor::new()).build_http(),
        instances: instances().await?,
    });

    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..REGISTER_CONCURRENCY {
        let b = Arc::clone(&bench);
        tasks.push(tokio::spawn(async move {
            for s in (w..SERVICES).step_by(REGISTER_CONCURRENCY) {
                for (i, addr) in b.instances.iter().enumerate() {
                    b.consul
                        .register(&registration(s, &format!("svc{s}-{i}"), *addr))
                        .await?;
                }
            }
            Ok::<_, discovery::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "registered {SERVICES} services x {INSTANCES} instances (urlprefix-/svcN tag, TTL check passing) in {:?}",
        t.elapsed()
    );

    // What each change costs the health query: the whole answer, as the balancer reads it.
    let t = Instant::now();
    let (checks, meta) = bench
        .consul
        .health_state_changed::<serde_json::Value>("any", 0, None)
        .await?;
    let uri: hyper::Uri = format!("http://{agent_addr}/v1/health/state/any").parse()?;
    let body = bench
        .http
        .get(uri)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    println!(
        "health/state/any: {} checks, {} KiB, read and decoded in {:?} (index {})",
        checks.map_or(0, |c| c.len()),
        body.len() / 1024,
        t.elapsed(),
        meta.index
    );

    scenario(&bench, "tags", &[]).await?;
    let file = std::env::temp_dir().join(format!("routes-bench-{}.txt", std::process::id()));
    let lines: String = (0..SERVICES).map(|s| format!("svc{s}=/svc{s}\n")).collect();
    std::fs::write(&file, lines)?;
    let r = scenario(
        &bench,
        "flags (--services-file)",
        &["--services-file", file.to_str().unwrap_or_default()],
    )
    .await;
    let _ = std::fs::remove_file(&file);
    r
}

/// Registers one more instance in one service and waits until `/status` counts it, then
/// deregisters it and waits until it is gone, [`TRIES`] times, pausing `pause` after each try;
/// the times from registration to routed, sorted.
async fn new_instance_latency(
    b: &Bench,
    admin: SocketAddr,
    name: &str,
    pause: Option<Duration>,
) -> Result<Vec<Duration>, Error> {
    let mut lat = Vec::new();
    for k in 0..TRIES {
        let s = (k * 37) % SERVICES;
        let id = format!("svc{s}-extra");
        let t = Instant::now();
        b.consul
            .register(&registration(s, &id, b.instances[k % INSTANCES]))
            .await?;
        while healthy(b, admin, s).await != Some(INSTANCES as u64 + 1) {
            if t.elapsed() > Duration::from_secs(10) {
                return Err(format!("{name}: svc{s} never saw its new instance").into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        lat.push(t.elapsed());
        b.consul.deregister(&id).await?;
        while healthy(b, admin, s).await != Some(INSTANCES as u64) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    }
    lat.sort();
    Ok(lat)
}

/// Kills the balancer when dropped.
struct Balancer(Child);

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(b: &Bench, addr: SocketAddr, path: &str) -> Option<(u16, Bytes)> {
    let uri: hyper::Uri = format!("http://{addr}{path}").parse().ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), b.http.get(uri))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

async fn healthy(b: &Bench, admin: SocketAddr, service: usize) -> Option<u64> {
    let (_, body) = get(b, admin, &format!("/status?service=svc{service}")).await?;
    let st: serde_json::Value = serde_json::from_slice(&body).ok()?;
    st["services"][0]["healthy_instances"].as_u64()
}

async fn scenario(b: &Bench, name: &str, extra: &[&str]) -> Result<(), Error> {
    let (listen, admin) = (free_addr().await?, free_addr().await?);
    let agent = format!("127.0.0.1:{}", b.agent_port);
    let mut args = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--consul-addr".into(),
        agent,
        "--watch-wait".into(),
        "10s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_balancer"))
        .args(&args)
        .env(
            "RUST_LOG",
            std::env::var("ROUTES_BENCH_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(match std::env::var_os("ROUTES_BENCH_LOG") {
            Some(p) => Stdio::from(std::fs::File::create(format!(
                "{}.{}",
                p.to_string_lossy(),
                name.split_whitespace().next().unwrap_or("x")
            ))?),
            None => Stdio::null(),
        })
        .spawn()?;
    let lb = Balancer(child);
    let pid = lb.0.id();

    // Every route answers 200. Asking every route again and again would load the two cores
    // the balancer and the agent share with this process: /health first (200 once the
    // catalog has been read), then each route.
    while get(b, admin, "/health").await.map(|(s, _)| s) != Some(200) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (rss_at_ready, hwm_at_ready) = (proc_field(pid, "VmRSS:"), proc_field(pid, "VmHWM:"));
    let mut pending: Vec<usize> = (0..SERVICES).collect();
    while !pending.is_empty() {
        let mut left = Vec::new();
        for s in pending {
            match get(b, listen, &format!("/svc{s}/x")).await {
                Some((200, _)) => {}
                _ => left.push(s),
            }
        }
        pending = left;
        if started.elapsed() > Duration::from_secs(60) {
            return Err(
                format!("{name}: {} routes still failing after 60 s", pending.len()).into(),
            );
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let all_routes = started.elapsed();
    // Every route has now opened a connection to one of its instances: pools hold 1,000.
    let hwm_routed = proc_field(pid, "VmHWM:");
    let (rss_ready, hwm_ready) = (rss_at_ready, hwm_at_ready);
    let rss = proc_field(pid, "VmRSS:");
    let conns = connections_to(pid, b.agent_port);

    // Idle CPU: nothing changes, the blocking queries renew (wait 10 s).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    let idle = std::env::var("ROUTES_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(IDLE, Duration::from_secs);
    tokio::time::sleep(idle).await;
    let idle_cpu = (cpu_ticks(pid) - c0) as f64 / clock_ticks() as f64 / t0.elapsed().as_secs_f64();
    let conns_idle = connections_to(pid, b.agent_port);
    let hwm_idle = proc_field(pid, "VmHWM:");

    // One more instance in one service, 20 times: from the registration until routed. First
    // each change alone (a pause after each try lets the watcher's rate limit refill), then
    // back to back: a registration or deregistration every ~40 ms, above the 10 catalog reads
    // a second the watcher allows itself once its burst of 3 is spent.
    let alone = new_instance_latency(b, admin, name, Some(LIMIT_REFILL)).await?;
    let back_to_back = new_instance_latency(b, admin, name, None).await?;
    let hwm_changes = proc_field(pid, "VmHWM:");
    let status_len = get(b, admin, "/status").await.map_or(0, |(_, s)| s.len());
    let hwm_status = proc_field(pid, "VmHWM:");
    let metrics_len = get(b, admin, "/metrics").await.map_or(0, |(_, m)| m.len());
    let peak = proc_field(pid, "VmHWM:");

    println!("\n== balancer, {name} ==");
    println!(
        "all {SERVICES} routes answer 200 after      {all_routes:?} from start (target < 2 s)"
    );
    println!(
        "resident memory when ready / peak so far {} MiB / {} MiB (catalog read, no request yet)",
        rss_ready / 1024,
        hwm_ready / 1024
    );
    println!(
        "peak after one request to every route    {} MiB",
        hwm_routed / 1024
    );
    println!(
        "peak after idle / the {} changes / /status  {} / {} / {} MiB",
        TRIES * 4,
        hwm_idle / 1024,
        hwm_changes / 1024,
        hwm_status / 1024
    );
    println!(
        "resident memory then / peak             {} MiB / {} MiB (target < 50 MB)",
        rss / 1024,
        peak / 1024
    );
    println!("connections to the agent                {conns} after start, {conns_idle} after idle (target <= 8)");
    println!(
        "CPU while idle over {idle:?}                {:.2}% of one core (--watch-wait 10s)",
        idle_cpu * 100.0
    );
    for (lat, what) in [
        (&alone, "each change alone   "),
        (&back_to_back, "changes back to back"),
    ] {
        println!(
            "new instance routed after, {what} p50 {:?}  p99 {:?}  max {:?} over {TRIES} (target p99 < 100 ms)",
            percentile(lat, 0.5),
            percentile(lat, 0.99),
            lat[lat.len() - 1]
        );
    }
    println!("/status {status_len} bytes, /metrics {metrics_len} bytes");
    Ok(())
}
