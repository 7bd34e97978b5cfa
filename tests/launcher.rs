//! End to end: the launcher itself, `cluster` with no subcommand, as a user runs it: it brings
//! up a dev agent, three workers and the balancer as its own children, stops them all on
//! Ctrl-C (SIGINT) and leaves no process and no bound port behind. A taken port and a bad flag
//! end it at once with a clear message and the documented exit code.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// The launcher and the children it reported. Dropped while the launcher still runs (a failed
/// test), it gets Ctrl-C first, so it stops its children in order; whatever is left after that
/// is killed by PID.
struct Launcher {
    proc: Proc,
    children: Vec<u32>,
}

/// Whether `pid` is a live process of the binary under test (not a reused PID).
fn is_ours(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    // A zombie has an empty command line; it is gone as far as ports and work are concerned.
    !argv0.is_empty() && Path::new(&*String::from_utf8_lossy(argv0)).ends_with(Path::new(BIN))
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if self.proc.try_status().is_none() {
            self.proc.signal("INT");
            let end = Instant::now() + Duration::from_secs(30);
            while self.proc.try_status().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.proc.kill();
        for pid in &self.children {
            if is_ours(*pid) {
                let _ = std::process::Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
}

/// The PIDs in the launcher's summary (`... pid 1234)`), once the summary is complete.
fn summary_pids(stdout: &str) -> Option<Vec<u32>> {
    let summary = stdout.split("cluster is up:").nth(1)?;
    if !summary.contains("Ctrl-C stops everything") {
        return None;
    }
    let pids = summary
        .lines()
        .filter_map(|l| {
            let rest = l.split("pid ").nth(1)?;
            rest.trim_end_matches(')').trim().parse().ok()
        })
        .collect();
    Some(pids)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The launcher puts each worker's admin listener at its port + 1000.
const ADMIN_OFFSET: u16 = 1000;

/// The first of three free worker ports whose admin ports (+ 1000) are free as well.
fn free_worker_ports() -> u16 {
    loop {
        let p = free_ports(3);
        if (0..3).all(|i| port_is_free(addr(p + ADMIN_OFFSET + i))) {
            return p;
        }
    }
}

/// The URL of the "make a worker unhealthy" line of the summary's `Try:` list.
fn health_switch_url(stdout: &str) -> Option<String> {
    let line = stdout.lines().find(|l| l.contains("/admin/health"))?;
    let url = line.split_whitespace().find(|w| w.starts_with("http://"))?;
    Some(url.to_string())
}

/// `cluster --agent-addr … --listen … --admin … --worker-port …` comes up, and the first 30
/// requests after its banner split 10/10/10 over the three workers; on SIGINT it exits 0
/// leaving no process and no bound port behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launcher_runs_the_cluster_and_stops_cleanly() {
    let started = Instant::now();
    let agent = free_addr();
    let listen = free_addr();
    let admin = free_addr();
    let worker_port = free_worker_ports();
    let workers: Vec<SocketAddr> = (0..3).map(|i| addr(worker_port + i)).collect();
    let worker_admins: Vec<SocketAddr> = workers
        .iter()
        .map(|w| addr(w.port() + ADMIN_OFFSET))
        .collect();
    let proc = Proc::spawn(
        "launcher",
        &args(&[
            "--agent-addr",
            &agent.to_string(),
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
            "--worker-port",
            &worker_port.to_string(),
        ]),
    );
    let mut l = Launcher {
        proc,
        children: Vec::new(),
    };

    wait_for(
        "the launcher prints its summary",
        Duration::from_secs(60),
        || {
            let done = l.proc.try_status();
            assert!(
                done.is_none(),
                "the launcher exited early: {done:?}\n{}",
                l.proc.logs()
            );
            std::future::ready(summary_pids(&l.proc.stdout()).is_some())
        },
    )
    .await;
    l.children = summary_pids(&l.proc.stdout()).unwrap();
    assert_eq!(
        l.children.len(),
        5,
        "agent, 3 workers, balancer: {}",
        l.proc.stdout()
    );
    for pid in &l.children {
        assert!(is_ours(*pid), "pid {pid} from the summary runs `cluster`");
    }

    // The banner comes only once every worker passes in the agent and is in the balancer's
    // rotation: the very first requests after it rotate over all three.
    let mut answers = Vec::new();
    for i in 0..30 {
        let r = get(listen, "/")
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200, "request {i}: {r:?}");
        answers.push(r);
    }
    let tally = tally(&answers);
    assert_eq!(tally.len(), 3, "{tally:?}");
    assert!(tally.values().all(|n| *n == 10), "{tally:?}");
    for n in 1..=3 {
        assert!(
            answers
                .iter()
                .any(|a| a.body.contains(&format!("hello from worker {n}"))),
            "worker {n} answers with its message"
        );
    }

    // The summary's health-switch command works as printed: worker-2's admin listener takes it;
    // the same request on worker-2's service port is not found.
    let stdout = l.proc.stdout();
    let url =
        health_switch_url(&stdout).unwrap_or_else(|| panic!("no /admin/health line:\n{stdout}"));
    assert_eq!(
        url,
        format!("http://{}/admin/health", worker_admins[1]),
        "the summary names worker-2's admin listener:\n{stdout}"
    );
    assert!(stdout.contains("(worker-2 out of rotation"), "{stdout}");
    let r = request(workers[1], http::Method::PUT, "/admin/health", "fail")
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    let r = request(worker_admins[1], http::Method::PUT, "/admin/health", "fail")
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "unhealthy\n"), "{r:?}");
    assert_eq!(get(workers[1], "/health").await.unwrap().status, 503);
    let r = request(worker_admins[1], http::Method::PUT, "/admin/health", "pass")
        .await
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "{r:?}");
    assert_eq!(get(workers[1], "/health").await.unwrap().status, 200);

    l.proc.signal("INT");
    let status = l.proc.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "{}", l.proc.logs());
    let out = l.proc.stdout();
    for name in ["worker-1", "worker-2", "worker-3", "balancer", "agent"] {
        assert!(
            out.contains(&format!("cluster: {name} stopped")),
            "{name} stopped cleanly:\n{out}"
        );
    }
    // The launcher reaped its children before it exited: none is left.
    for pid in &l.children {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || !is_ours(*pid),
            "child {pid} is still running"
        );
    }
    let mut all = vec![agent, listen, admin];
    all.extend(&workers);
    all.extend(&worker_admins);
    for a in all {
        assert!(
            port_is_free(a),
            "{a} is still bound after the launcher exited"
        );
    }
    eprintln!("launcher: {:?}", started.elapsed());
}

/// A port that is already taken: exit code 69 (EX_UNAVAILABLE) and a message naming it, before
/// anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launcher_names_a_taken_port() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let (code, out, err) = run_to_end(
        "launcher-taken",
        &args(&[
            "--agent-addr",
            &free_addr().to_string(),
            "--listen",
            &taken.to_string(),
            "--admin",
            &free_addr().to_string(),
            "--worker-port",
            &free_worker_ports().to_string(),
        ]),
        DEADLINE,
    )
    .await;
    assert_eq!(code, 69, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&taken.to_string()) && err.contains("--listen"),
        "the message names the port and its flag: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.contains("cluster is up"), "{out}");
    drop(held);
}

/// A bad flag: exit code 64 (EX_USAGE) with clap's message, for the launcher and a component.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_64() {
    for argv in [
        &["--no-such-flag"][..],
        &["--workers", "0"][..],
        &["worker", "--no-such-flag"][..],
        &["balancer", "--service", "web", "--listen", "not-an-address"][..],
        // A zero timeout would turn every request into a 504.
        &["balancer", "--service", "web", "--upstream-timeout", "0s"][..],
        &["balancer", "--service", "web", "--connect-timeout", "0s"][..],
        &["balancer", "--service", "web", "--first-byte-timeout", "0s"][..],
        &[
            "balancer",
            "--service",
            "web",
            "--first-byte-timeout",
            "soon",
        ][..],
        &["balancer", "--service", "web", "--http2-max-streams", "0"][..],
    ] {
        let (code, out, err) = run_to_end("bad-flag", &args(argv), DEADLINE).await;
        assert_eq!(code, 64, "{argv:?}: stdout: {out}\nstderr: {err}");
        assert!(err.contains("error"), "{argv:?}: {err}");
    }
}

/// Every component exits 69 (EX_UNAVAILABLE) when its address is taken or the agent it asks
/// does not answer, with a message naming the address: the README's table of exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_addresses_exit_69() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    // Bound and closed again: nothing answers there.
    let dead = free_addr().to_string();
    let free = || free_addr().to_string();
    let cases: Vec<Vec<String>> = vec![
        args(&["agent", "--dev", "--http-addr", &taken]),
        args(&["worker", "--listen", &taken, "--no-register"]),
        args(&[
            "balancer",
            "--service",
            "web",
            "--listen",
            &taken,
            "--admin",
            &free(),
            "--consul-addr",
            &dead,
        ]),
        args(&[
            "balancer",
            "--service",
            "web",
            "--listen",
            &free(),
            "--admin",
            &taken,
            "--consul-addr",
            &dead,
        ]),
        args(&["members", "--http-addr", &dead]),
        args(&["services", "--http-addr", &dead]),
    ];
    for argv in cases {
        let (code, out, err) = run_to_end("unavailable", &argv, DEADLINE).await;
        assert_eq!(code, 69, "{argv:?}: stdout: {out}\nstderr: {err}");
        assert!(!err.contains("panicked"), "{argv:?}: {err}");
        let named = if argv[0] == "members" || argv[0] == "services" {
            &dead
        } else {
            &taken
        };
        assert!(
            err.contains(named.as_str()),
            "{argv:?} names {named}: {err}"
        );
    }
    drop(held);
}
