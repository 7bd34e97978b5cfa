//! Dev-agent benchmark (not a test): prints numbers, asserts nothing.
//!
//! 1. 1,000 concurrent blocking watchers on one service (each from its own client address,
//!    127.2.x.y), all woken by one change: how long after the change each answer arrives
//!    (target: the last within 50 ms).
//! 2. Registering 10,000 services: wall time (target: under 2 s) and the agent's resident
//!    memory afterwards (target: under 100 MB).
//! 3. A second agent with 10,000 instances in 1,000 services and 1,000 blocking watchers, one
//!    per service, each from its own client address (127.1.x.y) on a keep-alive connection
//!    that asks again after every answer, as a watcher does. Then, one at a time, 500
//!    registrations into random services: the agent's CPU per registration (target: < 2 ms),
//!    PUT latency (target: p99 < 5 ms), how soon the affected watcher has its answer
//!    (target: < 5 ms) and how many other watchers were woken (target: none). Then a churn
//!    of 50 changes/s for 20 s (target: < 10% of a core), and the agent's memory with the
//!    watchers and after they are gone.
//!
//! Run: `cargo bench -p discovery --bench agent` (release build). The agents run as their own
//! processes (the `discovery` binary), so their CPU and memory are measured alone.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery::wire::ServiceRegistration;
use discovery::{Client, ClientConfig, HealthQuery};

const WATCHERS: usize = 1_000;
const SERVICES: usize = 10_000;
const REGISTER_CONCURRENCY: usize = 16;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn reg(name: &str, id: &str, port: u16) -> ServiceRegistration {
    ServiceRegistration {
        id: Some(id.to_string()),
        name: name.to_string(),
        address: Some("127.0.0.1".into()),
        port: Some(port),
        ..Default::default()
    }
}

/// The agent's CPU time so far (user + system, all threads, from `/proc/PID/stat`).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// A dev agent as its own process on a free port; killed when dropped.
struct AgentProcess {
    child: std::process::Child,
    addr: String,
}

impl AgentProcess {
    async fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_discovery"))
            .args(["agent", "--dev", "--http-addr", &addr, "--node", "bench"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let agent = Self { child, addr };
        let client = Client::new(ClientConfig::new(&agent.addr)?);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.status_leader().await.is_err() {
            if Instant::now() > deadline {
                return Err("the dev agent did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(agent)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    {
        let agent = AgentProcess::start().await?;
        run(&agent.addr, agent.pid()).await?;
    }
    let agent = AgentProcess::start().await?;
    many_watchers(&agent.addr, agent.pid()).await
}

async fn run(addr: &str, pid: u32) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::new(ClientConfig::new(addr)?);
    println!(
        "agent pid {pid}, RSS at start: {} KiB",
        rss_kib(pid).unwrap_or(0)
    );

    // 1. Fan-out of one change to 1,000 blocking queries.
    client.register(&reg("fanout", "fanout-1", 1)).await?;
    let (_, meta) = client
        .health_service("fanout", &HealthQuery::default())
        .await?;
    let index = meta.index;
    let woke: Arc<std::sync::Mutex<Vec<Instant>>> = Arc::default();
    let mut tasks = Vec::with_capacity(WATCHERS);
    for _ in 0..WATCHERS {
        // Raw HTTP/1.1 on its own connection per watcher: the time measured is when the
        // agent's answer arrives, not how fast this process decodes 1,000 JSON bodies.
        let addr = addr.to_string();
        let woke = Arc::clone(&woke);
        let n = tasks.len();
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            // Each watcher from its own client address, as watchers on many hosts would be:
            // the agent, like Consul, allows 200 connections per client address.
            let Ok(mut s) = connect_from(client_address(2, n), &addr).await else {
                return None;
            };
            let req = format!(
                "GET /v1/health/service/fanout?index={index}&wait=60s HTTP/1.1\r\nHost: {addr}\r\n\r\n"
            );
            if s.write_all(req.as_bytes()).await.is_err() {
                return None;
            }
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            loop {
                match s.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => got += n,
                }
                if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let at = Instant::now();
            let head = String::from_utf8_lossy(&buf[..got]).to_ascii_lowercase();
            let new_index = head
                .lines()
                .find_map(|l| l.strip_prefix("x-consul-index: "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if new_index > index {
                if let Ok(mut w) = woke.lock() {
                    w.push(at);
                }
            }
            // Keep the connection open until every watcher has its answer, as a watcher on a
            // keep-alive connection would: closing it now would add teardown work to the
            // agent while it is still answering the others.
            Some(s)
        }));
    }
    // Let every watcher reach the agent and block (a benchmark may wait; a test would poll).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let changed_at = Instant::now();
    client.register(&reg("fanout", "fanout-2", 2)).await?;
    let mut open = Vec::with_capacity(WATCHERS);
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            open.push(s);
        }
    }
    drop(open);
    let mut lat: Vec<Duration> = woke
        .lock()
        .map(|w| {
            w.iter()
                .map(|t| t.saturating_duration_since(changed_at))
                .collect()
        })
        .unwrap_or_default();
    lat.sort();
    if lat.is_empty() {
        println!("fan-out: no watcher woke up");
    } else {
        println!(
            "fan-out: {} of {WATCHERS} watchers woken by one change; after the change: median {:.1} ms, p99 {:.1} ms, last {:.1} ms (target: last <= 50 ms)",
            lat.len(),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            lat[lat.len() - 1].as_secs_f64() * 1e3,
        );
    }

    // 2. Registering 10,000 services.
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..REGISTER_CONCURRENCY {
        let c = Client::new(ClientConfig::new(addr)?);
        workers.push(tokio::spawn(async move {
            let mut errors = 0;
            for i in (w..SERVICES).step_by(REGISTER_CONCURRENCY) {
                let name = format!("svc-{i}");
                if c.register(&reg(&name, &name, 1000 + (i % 50000) as u16))
                    .await
                    .is_err()
                {
                    errors += 1;
                }
            }
            errors
        }));
    }
    let mut errors = 0;
    for w in workers {
        errors += w.await.unwrap_or(SERVICES);
    }
    let took = started.elapsed();
    let (services, _) = client.catalog_services(0, None).await?;
    println!(
        "register: {SERVICES} services in {:.2} s ({:.0}/s, {REGISTER_CONCURRENCY} concurrent clients, {errors} errors); catalog lists {}; agent RSS {:.1} MiB (targets: < 2 s, < 100 MB)",
        took.as_secs_f64(),
        SERVICES as f64 / took.as_secs_f64(),
        services.len(),
        rss_kib(pid).unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

/// Loopback address number `n` of block `block` (127.block.x.y): one client address per
/// watcher.
fn client_address(block: u8, n: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, block, (n / 250) as u8, (n % 250 + 1) as u8)
}

async fn connect_from(
    local: std::net::Ipv4Addr,
    addr: &str,
) -> Result<tokio::net::TcpStream, std::io::Error> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((local, 0).into())?;
    socket.connect(addr).await
}

const MANY_SERVICES: usize = 1_000;
const MANY_INSTANCES: usize = 10_000;
const PROBE_CHANGES: usize = 500;
const CHURN_RATE: u32 = 50;
const CHURN_SECONDS: u64 = 20;

/// Reads one HTTP/1.1 answer (head and `Content-Length` body) from `s`; returns its
/// `X-Consul-Index`, or `None` when the connection ended.
async fn read_answer(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<u64> {
    use tokio::io::AsyncReadExt;
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let len = header("content-length:").unwrap_or(0) as usize;
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    header("x-consul-index:")
}

/// One blocking watcher of service `n` from its own client address: asks, and after every
/// answer asks again with the new index, reporting each answer's arrival.
async fn watch_service(
    addr: std::net::SocketAddr,
    n: usize,
    woke: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    use tokio::io::AsyncWriteExt;
    let mut s = connect_from(client_address(1, n), &addr.to_string()).await?;
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut index = 0u64;
    loop {
        let req = format!(
            "GET /v1/health/service/svc-{n}?index={index}&wait=120s HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        let answer = tokio::select! {
            a = read_answer(&mut s, &mut buf) => a,
            _ = stop.changed() => return Ok(()),
        };
        let Some(new_index) = answer else {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        };
        if index != 0 {
            let _ = woke.send((n, Instant::now()));
        }
        index = new_index;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// "median …, p99 …, max … ms" of sorted durations.
fn spread(sorted: &[Duration]) -> String {
    match sorted.last() {
        None => "no samples".into(),
        Some(max) => format!(
            "median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(percentile(sorted, 0.5)),
            ms(percentile(sorted, 0.99)),
            ms(*max)
        ),
    }
}

async fn many_watchers(addr: &str, pid: u32) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::new(ClientConfig::new(addr)?);
    let rss_start = rss_kib(pid).unwrap_or(0);
    // 10,000 instances in 1,000 services.
    let mut workers = Vec::new();
    for w in 0..REGISTER_CONCURRENCY {
        let c = Client::new(ClientConfig::new(addr)?);
        workers.push(tokio::spawn(async move {
            for i in (w..MANY_INSTANCES).step_by(REGISTER_CONCURRENCY) {
                let name = format!("svc-{}", i % MANY_SERVICES);
                let id = format!("inst-{i}");
                if c.register(&reg(&name, &id, 1000 + (i % 50000) as u16))
                    .await
                    .is_err()
                {
                    return Err(format!("registering {id} failed"));
                }
            }
            Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    let rss_catalog = rss_kib(pid).unwrap_or(0);

    let sock: std::net::SocketAddr = addr.parse()?;
    let (woke_tx, mut woke) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut watchers = Vec::with_capacity(MANY_SERVICES);
    for n in 0..MANY_SERVICES {
        watchers.push(tokio::spawn(watch_service(
            sock,
            n,
            woke_tx.clone(),
            stop_rx.clone(),
        )));
    }
    // Let every watcher get its first answer and block (a benchmark may wait; a test would
    // poll).
    tokio::time::sleep(Duration::from_secs(3)).await;
    while woke.try_recv().is_ok() {}
    let rss_watching = rss_kib(pid).unwrap_or(0);
    println!(
        "many watchers: {MANY_INSTANCES} instances in {MANY_SERVICES} services, {} blocking watchers (one per service, each its own client address)",
        watchers.iter().filter(|w| !w.is_finished()).count()
    );

    // One registration at a time into a random service.
    let mut put = Vec::with_capacity(PROBE_CHANGES);
    let mut wake = Vec::with_capacity(PROBE_CHANGES);
    let (mut missed, mut others) = (0usize, 0usize);
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    for j in 0..PROBE_CHANGES {
        let n = rand::random::<usize>() % MANY_SERVICES;
        let name = format!("svc-{n}");
        let t0 = Instant::now();
        client
            .register(&reg(&name, &format!("probe-{j}"), 2000))
            .await?;
        put.push(t0.elapsed());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(deadline, woke.recv()).await {
                Ok(Some((m, at))) if m == n => {
                    wake.push(at.saturating_duration_since(t0));
                    break;
                }
                Ok(Some(_)) => others += 1,
                _ => {
                    missed += 1;
                    break;
                }
            }
        }
        // Let stray wake-ups arrive and be counted before the next change.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while woke.try_recv().is_ok() {
            others += 1;
        }
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time(pid)
        .zip(cpu_before)
        .map(|(a, b)| a.saturating_sub(b));
    put.sort();
    wake.sort();
    let cpu_per = cpu.map_or(f64::NAN, |c| ms(c) / PROBE_CHANGES as f64);
    println!(
        "  {PROBE_CHANGES} registrations, one at a time, into random services: agent CPU {cpu_per:.3} ms per registration ({:.0} ms over {:.1} s; target < 2 ms)",
        cpu.map_or(f64::NAN, ms),
        elapsed.as_secs_f64()
    );
    println!("  PUT latency: {} (target: p99 < 5 ms)", spread(&put));
    println!(
        "  affected watcher answered after: {} from the PUT (target: < 5 ms); not woken: {missed}; other watchers woken: {others} (target: 0)",
        spread(&wake)
    );

    // A churn of 50 changes/s for 20 s: register and deregister in turn.
    let total = CHURN_RATE as u64 * CHURN_SECONDS;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / CHURN_RATE);
    let mut failed = 0;
    let cpu_before = cpu_time(pid);
    let started = Instant::now();
    for k in 0..total {
        tick.tick().await;
        let id = format!("churn-{}", k / 2);
        let r = if k % 2 == 0 {
            let name = format!("svc-{}", (k as usize * 7919) % MANY_SERVICES);
            client.register(&reg(&name, &id, 3000)).await
        } else {
            client.deregister(&id).await
        };
        failed += usize::from(r.is_err());
    }
    let elapsed = started.elapsed();
    let cpu = cpu_time(pid)
        .zip(cpu_before)
        .map(|(a, b)| a.saturating_sub(b));
    while woke.try_recv().is_ok() {}
    println!(
        "  churn: {total} changes at {CHURN_RATE}/s in {:.1} s ({failed} failed): agent CPU {:.0} ms = {:.1}% of a core (target < 10%)",
        elapsed.as_secs_f64(),
        cpu.map_or(f64::NAN, ms),
        cpu.map_or(f64::NAN, |c| c.as_secs_f64() / elapsed.as_secs_f64() * 100.0)
    );

    stop_tx.send_replace(true);
    let mut errors = 0;
    for w in watchers {
        errors += usize::from(!matches!(w.await, Ok(Ok(()))));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid).unwrap_or(0);

    // Where a waiting query's memory goes: the same number of connections that are idle after
    // one quick read, then a second round of watchers (does the agent reuse what the first
    // round freed, or grow?).
    let mut idle = Vec::with_capacity(MANY_SERVICES);
    let mut buf = Vec::new();
    for n in 0..MANY_SERVICES {
        use tokio::io::AsyncWriteExt;
        let mut s = connect_from(client_address(3, n), addr).await?;
        s.write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: agent\r\n\r\n")
            .await?;
        read_answer(&mut s, &mut buf).await;
        idle.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = rss_kib(pid).unwrap_or(0);
    drop(idle);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (woke_tx, _woke) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let again: Vec<_> = (0..MANY_SERVICES)
        .map(|n| tokio::spawn(watch_service(sock, n, woke_tx.clone(), stop_rx.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_again = rss_kib(pid).unwrap_or(0);
    stop_tx.send_replace(true);
    for w in again {
        errors += usize::from(!matches!(w.await, Ok(Ok(()))));
    }

    let mib = |k: u64| k as f64 / 1024.0;
    let per = |with: u64, without: u64| with.saturating_sub(without) as f64 / MANY_SERVICES as f64;
    println!(
        "  agent RSS: {:.1} MiB at start, {:.1} MiB with the catalog, {:.1} MiB with {MANY_SERVICES} watchers waiting ({:.1} KiB each), {:.1} MiB after they closed; {:.1} MiB with {MANY_SERVICES} idle keep-alive connections instead; {:.1} MiB with {MANY_SERVICES} watchers again ({errors} watcher errors)",
        mib(rss_start),
        mib(rss_catalog),
        mib(rss_watching),
        per(rss_watching, rss_catalog),
        mib(rss_after),
        mib(rss_idle),
        mib(rss_again),
    );
    Ok(())
}
