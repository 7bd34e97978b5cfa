//! End to end: a dev agent, workers and a balancer, each a real `cluster <component>` process on
//! free loopback ports, driven over HTTP the way a user would (`curl`, SIGTERM, SIGKILL, the
//! worker's admin switch, restarting the agent).
//!
//! Every test starts its own cluster, so tests run in parallel. Conditions are polled with
//! deadlines; nothing waits a fixed time for correctness. Every process is killed by PID when
//! its guard drops, also when a test fails (its logs are printed then).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Pace of the steady client streams.
const PACE: Duration = Duration::from_millis(5);
/// Upper bound of a steady stream, should a test hang between its checks.
const LOAD_BOUND: Duration = Duration::from_secs(150);

fn assert_no_failures(what: &str, r: &LoadReport) {
    assert!(
        r.failures == 0,
        "{what}: {} of {} requests failed: {:#?}",
        r.failures,
        r.ok + r.failures,
        r.failed
    );
}

/// `curl` 30 times through the balancer: each of 3 workers answers exactly 10, and the bodies
/// name the worker that answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_rotates_evenly_over_three_workers() {
    let started = Instant::now();
    let c = Cluster::start(3).await;
    let answers = c.curl(30).await;
    let tally = tally(&answers);
    for n in 1..=3 {
        assert_eq!(
            tally.get(&worker_id(n)).copied(),
            Some(10),
            "worker {n} answered a third of the requests: {tally:?}"
        );
    }
    assert_eq!(tally.len(), 3, "{tally:?}");
    for a in &answers {
        let id = a.worker.as_deref().unwrap_or("?");
        let n: usize = id.trim_start_matches("web-").parse().unwrap();
        assert!(
            a.body.starts_with(&format!("{id} ({SERVICE}, "))
                && a.body.contains(&worker_message(n)),
            "the body names worker {id}: {:?}",
            a.body
        );
    }
    // Consecutive answers come from different workers: round robin, not random.
    for pair in answers.windows(2) {
        assert_ne!(
            pair[0].worker, pair[1].worker,
            "round robin repeats a worker"
        );
    }
    eprintln!("curl: {:?}", started.elapsed());
}

/// SIGTERM each worker in turn and start it again while a client sends a steady stream:
/// not one request fails, because a worker leaves Consul and drains before it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_fails_no_request() {
    let started = Instant::now();
    let mut c = Cluster::start(3).await;
    let load = Load::start(c.listen, PACE, LOAD_BOUND);
    load.wait_traffic(&worker_id(1), 0, DEADLINE).await;
    for n in 1..=3 {
        let id = worker_id(n);
        let mut w = c.take_worker(n);
        w.signal("TERM");
        let status = w.wait_exit(DEADLINE).await;
        assert!(status.success(), "worker {n} exited with {status}");
        // It left Consul before it stopped listening.
        assert!(
            !c.passing().await.unwrap_or_default().contains(&id),
            "{id} is still passing after it exited"
        );
        drop(w);
        let before = load.count(&id);
        c.start_worker(n);
        wait_for(&format!("{id} is passing again"), DEADLINE, || async {
            c.passing().await.unwrap_or_default().contains(&id)
        })
        .await;
        load.wait_traffic(&id, before, DEADLINE).await;
        assert_no_failures(&format!("after restarting worker {n}"), &load.report());
    }
    let report = load.finish().await;
    assert_no_failures("rolling restart", &report);
    eprintln!(
        "rolling restart: {} requests, all 200, by worker {:?}, {:?}",
        report.ok,
        report.by_worker,
        started.elapsed()
    );
}

/// SIGKILL a worker under a steady stream of GETs: none fails (the balancer moves a refused
/// connect to the next instance); the worker leaves `?passing` once its check fails; started
/// again, it gets traffic again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_worker_fails_no_get_and_comes_back() {
    let started = Instant::now();
    let mut c = Cluster::start(3).await;
    let load = Load::start(c.listen, PACE, LOAD_BOUND);
    let id = worker_id(2);
    load.wait_traffic(&id, 0, DEADLINE).await;

    let mut w = c.take_worker(2);
    w.kill();
    drop(w);
    let others: Vec<String> = vec![worker_id(1), worker_id(3)];
    c.wait_passing(&others).await;
    c.wait_balancer(&others).await;
    // Still serving on the other two.
    let served = load.count(&worker_id(1));
    load.wait_traffic(&worker_id(1), served, DEADLINE).await;

    let before = load.count(&id);
    c.start_worker(2);
    c.wait_converged(3).await;
    load.wait_traffic(&id, before, DEADLINE).await;

    let report = load.finish().await;
    assert_no_failures("crash", &report);
    eprintln!(
        "crash: {} requests, all 200, by worker {:?}, {:?}",
        report.ok,
        report.by_worker,
        started.elapsed()
    );
}

/// A fourth worker receives traffic within a few seconds of its check passing (the balancer
/// follows Consul with blocking queries, so in practice within milliseconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_worker_gets_traffic_soon_after_passing() {
    let started = Instant::now();
    let mut c = Cluster::start(3).await;
    let n = c.add_worker();
    let id = worker_id(n);
    wait_for(&format!("{id} is passing"), DEADLINE, || async {
        c.passing().await.unwrap_or_default().contains(&id)
    })
    .await;
    let passing_at = Instant::now();
    c.wait_traffic_to(n).await;
    let lag = passing_at.elapsed();
    assert!(
        lag < Duration::from_secs(5),
        "{id} got its first request {lag:?} after it was passing"
    );
    c.wait_converged(4).await;
    let tally = tally(&c.curl(40).await);
    assert_eq!(tally.get(&id).copied(), Some(10), "{tally:?}");
    eprintln!(
        "scale out: first request {lag:?} after passing, {:?}",
        started.elapsed()
    );
}

/// `PUT /admin/health fail` on a worker's admin listener: its check fails and the balancer
/// stops sending to it; `pass` brings it back. The same request on the service port, directly
/// from loopback or through the balancer, changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flip_takes_a_worker_out_and_back() {
    let started = Instant::now();
    let c = Cluster::start(3).await;
    let w1 = c.workers[0].addr;
    let w1_admin = c.workers[0].admin;
    let id = worker_id(1);

    for target in [w1, c.listen] {
        let r = request(target, http::Method::PUT, "/admin/health", "fail")
            .await
            .unwrap();
        assert_eq!(r.status, 404, "PUT /admin/health via {target}: {r:?}");
    }
    for n in 1..=3 {
        let w = c.workers[n - 1].addr;
        assert_eq!(get(w, "/health").await.unwrap().status, 200, "worker {n}");
    }

    let r = request(w1_admin, http::Method::PUT, "/admin/health", "fail")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(get(w1, "/health").await.unwrap().status, 503);
    let others: Vec<String> = vec![worker_id(2), worker_id(3)];
    c.wait_passing(&others).await;
    c.wait_balancer(&others).await;
    let tally_out = tally(&c.curl(30).await);
    assert_eq!(
        tally_out.get(&id),
        None,
        "unhealthy {id} got traffic: {tally_out:?}"
    );
    assert_eq!(tally_out.len(), 2, "{tally_out:?}");

    let r = request(w1_admin, http::Method::PUT, "/admin/health", "pass")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    c.wait_traffic_to(1).await;
    c.wait_converged(3).await;
    let tally_back = tally(&c.curl(30).await);
    assert_eq!(tally_back.get(&id).copied(), Some(10), "{tally_back:?}");
    eprintln!("health flip: {:?}", started.elapsed());
}

/// Kill the dev agent and start it again, empty, on the same address: the balancer keeps
/// serving on what it last knew (not one request of a steady stream fails), the workers
/// register again, and the balancer's view converges on the new agent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_keeps_serving_and_converges() {
    let started = Instant::now();
    let mut c = Cluster::start(3).await;
    let load = Load::start(c.listen, PACE, LOAD_BOUND);
    load.wait_traffic(&worker_id(3), 0, DEADLINE).await;

    let mut agent = c.agent.take().unwrap();
    agent.kill();
    drop(agent);
    // The balancer notices Consul is gone and says so, and routes on the last known set.
    wait_for("the balancer reports a stale view", DEADLINE, || async {
        matches!(c.balancer_view().await, Some((ids, true)) if ids.len() == 3)
    })
    .await;
    let during: Vec<u64> = (1..=3).map(|n| load.count(&worker_id(n))).collect();
    for (n, before) in (1..=3).zip(&during) {
        load.wait_traffic(&worker_id(n), *before, DEADLINE).await;
    }

    let restarted = Instant::now();
    c.start_agent().await;
    assert!(
        c.passing().await.is_some(),
        "the new agent answers health queries"
    );
    // The workers notice the empty agent and register again; their checks pass.
    c.wait_converged(3).await;
    let converged = restarted.elapsed();
    let after: Vec<u64> = (1..=3).map(|n| load.count(&worker_id(n))).collect();
    for (n, before) in (1..=3).zip(&after) {
        load.wait_traffic(&worker_id(n), *before, DEADLINE).await;
    }
    let report = load.finish().await;
    assert_no_failures("agent restart", &report);
    // And plain `curl`s rotate over all three again.
    let tally = tally(&c.curl(30).await);
    assert_eq!(tally.len(), 3, "{tally:?}");
    eprintln!(
        "agent restart: {} requests, all 200; converged {converged:?} after the restart; {:?}",
        report.ok,
        started.elapsed()
    );
}

/// `cluster members` prints the `consul members` table with the agent node alive;
/// `cluster services` lists `consul` and the workers' service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_and_services_commands() {
    let started = Instant::now();
    let c = Cluster::start(1).await;
    let addr = c.agent_addr.to_string();

    let (code, out, err) = run_to_end(
        "members",
        &args(&["members", "--http-addr", &addr]),
        DEADLINE,
    )
    .await;
    assert_eq!(code, 0, "members failed: {out}{err}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "Node",
            "Address",
            "Status",
            "Type",
            "Build",
            "Protocol",
            "DC",
            "Partition",
            "Segment"
        ],
        "{out}"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let node = rows
        .iter()
        .find(|r| r.first() == Some(&c.node.as_str()))
        .unwrap_or_else(|| panic!("node {} is listed: {out}", c.node));
    assert_eq!(node.len(), 9, "every column is filled: {out}");
    assert_eq!(node[2], "alive", "{out}");
    assert_eq!(node[3], "server", "{out}");
    assert!(node[1].starts_with("127.0.0.1:"), "{out}");

    let (code, out, err) = run_to_end(
        "services",
        &args(&["services", "--http-addr", &addr]),
        DEADLINE,
    )
    .await;
    assert_eq!(code, 0, "services failed: {out}{err}");
    let names: Vec<&str> = out.lines().map(str::trim).collect();
    assert!(names.contains(&"consul"), "{out}");
    assert!(names.contains(&SERVICE), "{out}");
    eprintln!("members/services: {:?}", started.elapsed());
}

/// The admin listener cannot starve the proxy port of file descriptors: with the balancer's
/// file limit at 256, 300 silent admin connections leave the proxy answering every request
/// (before the admin listener had a cap, the proxy port failed with "Too many open files").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_admin_connections_leave_the_proxy_port_alone() {
    let c = Cluster::start(3).await;
    let pid = c.balancer.as_ref().unwrap().pid().to_string();
    let limited = std::process::Command::new("prlimit")
        .args(["--nofile=256:256", "--pid", &pid])
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(limited.success(), "prlimit --nofile=256 --pid {pid}");
    let mut held = Vec::new();
    for i in 0..300 {
        let s = tokio::net::TcpStream::connect(c.admin)
            .await
            .unwrap_or_else(|e| panic!("admin connection {i}: {e}"));
        held.push(s);
    }
    // Let the balancer take whatever it is going to take.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let answers = c.curl(30).await;
    let tally = tally(&answers);
    assert!(
        tally.len() == 3 && tally.values().all(|n| *n == 10),
        "no instance was ejected: {tally:?}"
    );
    drop(held);
    // Once they are gone, the admin listener answers again.
    wait_for("the admin listener answers", DEADLINE, || async {
        c.status().await.is_some()
    })
    .await;
}

/// A prior-knowledge HTTP/2 client that sends the preface and an empty SETTINGS frame, then
/// nothing: every server of the cluster (agent, worker, balancer) sends a GOAWAY and closes
/// the connection once it has been idle with no open stream for the server's idle limit (its
/// header read timeout: 10 s for the balancer, 30 s for the worker and the agent), as an idle
/// HTTP/1 keep-alive connection is closed. Such connections once stayed open for good, so
/// that a few of them could hold every connection slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_get_goaway_and_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let cluster = Cluster::start(1).await;
    let servers = [
        ("balancer", cluster.listen),
        ("worker", cluster.workers[0].addr),
        ("agent", cluster.agent_addr),
    ];
    let mut waits = Vec::new();
    for (name, addr) in servers {
        waits.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await
                .unwrap();
            // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
            s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            let started = Instant::now();
            // Read frames until the server closes; answer its PINGs as any client does (a
            // graceful GOAWAY waits for one, to know the client has seen it).
            let mut buf = Vec::new();
            let mut types = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(45), async {
                let mut chunk = [0u8; 4096];
                loop {
                    while buf.len() >= 9 {
                        let len = usize::from(buf[0]) << 16
                            | usize::from(buf[1]) << 8
                            | usize::from(buf[2]);
                        if buf.len() < 9 + len {
                            break;
                        }
                        let (kind, flags) = (buf[3], buf[4]);
                        types.push(kind);
                        if kind == 6 && flags & 1 == 0 {
                            let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                            ack.extend_from_slice(&buf[9..17]);
                            let _ = s.write_all(&ack).await;
                        }
                        buf.drain(..9 + len);
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            assert!(
                closed.is_ok(),
                "{name}: the idle HTTP/2 connection is still open after 45 s"
            );
            assert!(types.contains(&7), "{name}: frames {types:?}, no GOAWAY");
            started.elapsed()
        }));
    }
    for ((name, _), w) in servers.iter().zip(waits) {
        let took = w.await.unwrap();
        eprintln!("{name}: idle HTTP/2 connection closed after {took:?}");
    }
    drop(cluster);
}
