//! Dev-agent benchmark (not a test): prints numbers, asserts nothing.
//!
//! 1. 1,000 concurrent blocking watchers on one service, all woken by one change: how long
//!    after the change each answer arrives (target: the last within 50 ms).
//! 2. Registering 10,000 services: wall time (target: under 2 s) and the agent's resident
//!    memory afterwards (target: under 100 MB).
//!
//! Run: `cargo bench -p discovery --bench agent` (release build). The agent runs as its own
//! process (the `discovery` binary), so its memory is measured alone.

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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_discovery"))
        .args(["agent", "--dev", "--http-addr", &addr, "--node", "bench"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = agent.id();
    let result = run(&addr, pid).await;
    let _ = agent.kill();
    let _ = agent.wait();
    result
}

async fn run(addr: &str, pid: u32) -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::new(ClientConfig::new(addr)?);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.status_leader().await.is_err() {
        if Instant::now() > deadline {
            return Err("the dev agent did not start".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        tasks.push(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
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
