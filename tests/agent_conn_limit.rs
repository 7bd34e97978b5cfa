//! Our own components stay well inside Consul's per-client connection limit
//! (`limits.http_max_conns_per_client`): a balancer routing several services and three
//! workers, all on one client address, against a dev agent whose limit is low. The agent
//! refuses connections past the limit exactly as Consul does, so a component that needed
//! more would fail here.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::{args, free_addr, get, wait_for, Proc, DEADLINE};

/// Far below Consul's default of 200, and still well above what the components need.
const LIMIT: usize = 16;
/// "Well inside": at most half the limit in use at any time we look.
const MOST_USED: usize = LIMIT / 2;
const SERVICES: [(&str, &str); 3] = [("web", "/"), ("api", "/api"), ("admin", "/admin")];

/// Socket inodes of process `pid` (`/proc/PID/fd/* -> socket:[N]`).
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Open TCP connections from processes `pids` to `agent` (from `/proc/net/tcp`).
fn connections_to(agent: SocketAddr, pids: &[u32]) -> usize {
    let inodes: BTreeSet<u64> = pids.iter().flat_map(|p| socket_inodes(*p)).collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let port = format!(":{:04X}", agent.port());
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // rem_address, st (01 = ESTABLISHED), inode
            f.len() > 9
                && f[2].ends_with(&port)
                && f[3] == "01"
                && f[9].parse().is_ok_and(|i: u64| inodes.contains(&i))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_and_workers_stay_well_inside_the_per_client_connection_limit() {
    let agent_addr = free_addr();
    let agent = Proc::spawn(
        "agent",
        &args(&[
            "agent",
            "--dev",
            "--http-addr",
            &agent_addr.to_string(),
            "--node",
            "limits",
            "--dev-max-conns-per-client",
            &LIMIT.to_string(),
        ]),
    );
    let consul =
        discovery::Client::new(discovery::ClientConfig::new(&agent_addr.to_string()).unwrap());
    wait_for("the dev agent answers", DEADLINE, || {
        let consul = consul.clone();
        async move { consul.status_leader().await.is_ok() }
    })
    .await;

    let mut workers = Vec::new();
    for (n, (service, _)) in SERVICES.iter().enumerate() {
        let addr = free_addr();
        let id = format!("{service}-{}", n + 1);
        workers.push(Proc::spawn(
            &format!("worker-{}", n + 1),
            &args(&[
                "worker",
                "--service",
                service,
                "--listen",
                &addr.to_string(),
                "--id",
                &id,
                "--message",
                &format!("hello from {id}"),
                "--consul-addr",
                &agent_addr.to_string(),
                "--check-interval",
                "1s",
            ]),
        ));
    }
    let (listen, admin) = (free_addr(), free_addr());
    let mut balancer_args = vec![
        "balancer".to_string(),
        "--listen".into(),
        listen.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--consul-addr".into(),
        agent_addr.to_string(),
    ];
    for (service, prefix) in SERVICES {
        balancer_args.push("--service".into());
        balancer_args.push(if prefix == "/" {
            service.to_string()
        } else {
            format!("{service}={prefix}")
        });
    }
    let balancer = Proc::spawn("balancer", &balancer_args);

    let mut pids: Vec<u32> = workers.iter().map(Proc::pid).collect();
    pids.push(balancer.pid());
    let mut most = 0;
    for (n, (service, prefix)) in SERVICES.iter().enumerate() {
        let want = format!("{service}-{}", n + 1);
        let path = if *prefix == "/" {
            "/".to_string()
        } else {
            format!("{prefix}/")
        };
        wait_for(
            &format!("{want} answers {path} through the balancer"),
            DEADLINE,
            || {
                most = most.max(connections_to(agent_addr, &pids));
                let (path, want) = (path.clone(), want.clone());
                // The worker knows only its own paths (404 under a prefix), but names itself
                // on every answer.
                async move {
                    get(listen, &path)
                        .await
                        .is_ok_and(|r| r.worker.as_deref() == Some(&want))
                }
            },
        )
        .await;
    }
    // Settled: look a while longer, through a few blocking-query rounds and check intervals.
    for _ in 0..20 {
        most = most.max(connections_to(agent_addr, &pids));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = agent.logs();
    assert!(
        !logs.contains("too many concurrent connections"),
        "the agent refused one of our components:\n{logs}"
    );
    assert!(
        most > 0,
        "no connection to the agent was seen; the count is broken"
    );
    assert!(
        most <= MOST_USED,
        "the balancer and workers held {most} connections to the agent at once (limit {LIMIT})"
    );
    eprintln!("most connections to the agent at once: {most} (limit {LIMIT})");
}
