//! The local cluster in one command: `cargo run --release` starts the embedded dev agent,
//! workers and the balancer, each as its own OS process, prints where they are, and stops
//! them in order on Ctrl-C (workers first, so they deregister while the balancer still runs).
//!
//! The `cluster` binary is also a multi-call binary: `cluster agent|members|services ...`,
//! `cluster worker ...` and `cluster balancer ...` take exactly the flags of the `discovery`,
//! `worker` and `balancer` binaries. The launcher starts its children that way, so one
//! `cargo run` builds everything it needs.
//!
//! # Supervision
//!
//! Children run in their own process group, so a terminal's Ctrl-C reaches only the launcher,
//! which then stops them in order. Each child's standard input is a pipe from the launcher;
//! a child started by the launcher (`CLUSTER_SUPERVISED=1`) shuts down gracefully when that
//! pipe closes, which is how the launcher asks it to stop, and how children notice a launcher
//! that died without cleaning up. No signals need to be sent, and no process outlives the
//! launcher.

use std::future::Future;
use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// Set in a child's environment by the launcher.
pub const SUPERVISED_ENV: &str = "CLUSTER_SUPERVISED";

/// Runs a local cluster: the embedded Consul-compatible dev agent (or your own Consul), N
/// workers and the balancer, each its own process. Ctrl-C stops them all.
///
/// Subcommands `agent`, `members`, `services`, `worker` and `balancer` run one component with
/// the same flags as the standalone `discovery`, `worker` and `balancer` binaries.
#[derive(Debug, Parser)]
#[command(name = "cluster", version, about)]
pub struct LaunchArgs {
    /// Number of workers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Use this Consul agent (host:port) instead of starting the embedded dev agent.
    #[arg(long, env = "CONSUL_HTTP_ADDR")]
    pub consul_addr: Option<String>,
    /// Address of the embedded dev agent, when it is started.
    #[arg(long, default_value = "127.0.0.1:8500")]
    pub agent_addr: SocketAddr,
    /// Address the balancer serves on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Address of the balancer's admin listener (/status, /metrics).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub admin: SocketAddr,
    /// Port of the first worker; the others follow (9001, 9002, ...). Each worker's admin
    /// listener (the health switch) is on loopback at its port + 1000 (10001, 10002, ...).
    #[arg(long, default_value_t = 9001)]
    pub worker_port: u16,
    /// Consul service name of the workers.
    #[arg(long, default_value = "web")]
    pub service: String,
}

/// A started child process.
struct Proc {
    name: String,
    child: Child,
    /// Dropping it asks the child to stop gracefully.
    stdin: Option<ChildStdin>,
}

/// What the launcher runs, in start order.
#[derive(Debug, Clone)]
struct Plan {
    agent: Option<SocketAddr>,
    consul: String,
    workers: Vec<SocketAddr>,
    listen: SocketAddr,
    admin: SocketAddr,
    service: String,
}

impl Plan {
    fn new(a: &LaunchArgs) -> Result<Self, String> {
        let last = u32::from(a.worker_port) + u32::from(a.workers) - 1;
        let last_admin = last + u32::from(worker::config::ADMIN_PORT_OFFSET);
        if a.worker_port == 0 || last_admin > 65535 {
            return Err(format!(
                "--worker-port {} with --workers {} runs past port 65535 (the workers' admin \
                 ports are theirs + {})",
                a.worker_port,
                a.workers,
                worker::config::ADMIN_PORT_OFFSET
            ));
        }
        let workers = (0..a.workers)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], a.worker_port + i)))
            .collect();
        let (agent, consul) = match &a.consul_addr {
            Some(c) if !c.trim().is_empty() => (None, c.trim().to_string()),
            _ => (Some(a.agent_addr), a.agent_addr.to_string()),
        };
        Ok(Self {
            agent,
            consul,
            workers,
            listen: a.listen,
            admin: a.admin,
            service: a.service.clone(),
        })
    }

    /// The Consul service ID of worker `n` (1-based).
    fn worker_id(&self, n: usize) -> String {
        format!("{}-{n}", self.service)
    }

    /// Every address the launcher will bind, with what binds it.
    fn ports(&self) -> Vec<(SocketAddr, String)> {
        let mut out = Vec::new();
        if let Some(a) = self.agent {
            out.push((a, "the dev agent (--agent-addr)".to_string()));
        }
        for (i, w) in self.workers.iter().enumerate() {
            out.push((*w, format!("worker-{} (--worker-port)", i + 1)));
            out.push((
                worker_admin(*w),
                format!("worker-{}'s admin listener (--worker-port + 1000)", i + 1),
            ));
        }
        out.push((self.listen, "the balancer (--listen)".into()));
        out.push((self.admin, "the balancer's admin listener (--admin)".into()));
        out
    }
}

/// The admin listener (health switch) of the worker serving on `w`: loopback at its port +
/// 1000, the worker's own default, passed explicitly so the launcher's port check covers it.
/// [`Plan::new`] keeps the sum within the port range.
fn worker_admin(w: SocketAddr) -> SocketAddr {
    let port = w.port().saturating_add(worker::config::ADMIN_PORT_OFFSET);
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Fails with a message naming the first address that is already taken.
fn check_ports(plan: &Plan) -> Result<(), String> {
    let ports = plan.ports();
    for (i, (addr, what)) in ports.iter().enumerate() {
        if ports[..i].iter().any(|(a, _)| a == addr) {
            return Err(format!(
                "{addr} is used twice ({what}); pick distinct addresses"
            ));
        }
        if let Err(e) = std::net::TcpListener::bind(addr) {
            return Err(format!(
                "cannot use {addr} for {what}: {e}. Is an earlier cluster (or a Consul agent) still running? Stop it, or pick another address with the flag named."
            ));
        }
    }
    Ok(())
}

fn spawn(name: &str, args: &[String]) -> Result<Proc, StartError> {
    let exe = std::env::current_exe()
        .map_err(|e| StartError::Spawn(format!("cannot find my own executable: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env(SUPERVISED_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches only the launcher, which stops
        // the children in order.
        .process_group(0)
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        // Children log warnings only, so the launcher's own lines stay readable.
        cmd.env("RUST_LOG", "warn");
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| StartError::Spawn(format!("cannot start {name}: {e}")))?;
    for (stream, out) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            false,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            true,
        ),
    ] {
        let Some(stream) = stream else { continue };
        let prefix = format!("[{name}]");
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if out {
                    eprintln!("{prefix} {line}");
                } else {
                    println!("{prefix} {line}");
                }
            }
        });
    }
    let stdin = child.stdin.take();
    Ok(Proc {
        name: name.to_string(),
        child,
        stdin,
    })
}

/// A bare HTTP/1.0 GET on loopback for readiness probes; the status code, if any.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    http_get(addr, path).await.map(|(code, _)| code)
}

/// A bare HTTP/1.0 GET on loopback: the status code and the body.
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::AsyncWriteExt;
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Some((code, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

async fn wait_until<F, Fut>(what: &str, deadline: Duration, mut ok: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    while tokio::time::Instant::now() < end {
        if ok().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{what} did not come up within {deadline:?}"))
}

/// Asks processes to stop (closing their stdin) and waits, killing those past `grace`.
async fn stop_all(procs: &mut [Proc], grace: Duration) {
    for p in procs.iter_mut() {
        p.stdin = None;
    }
    for p in procs.iter_mut() {
        match tokio::time::timeout(grace, p.child.wait()).await {
            Ok(Ok(status)) if status.success() => println!("cluster: {} stopped", p.name),
            Ok(Ok(status)) => println!("cluster: {} stopped ({status})", p.name),
            Ok(Err(e)) => println!("cluster: {} could not be waited for: {e}", p.name),
            Err(_) => {
                println!(
                    "cluster: {} did not stop within {grace:?}; killing it",
                    p.name
                );
                let _ = p.child.kill().await;
            }
        }
    }
}

/// Why the launcher could not bring the cluster up, with its exit code.
#[derive(Debug)]
enum StartError {
    /// A child process could not be started (`EX_OSERR`).
    Spawn(String),
    /// A component did not come up, or died while starting (`EX_UNAVAILABLE`).
    NotUp(String),
    /// Ctrl-C or SIGTERM while starting: stop what runs and exit 0.
    Interrupted,
}

/// Runs the launcher until Ctrl-C / SIGTERM (`shutdown`), or until the agent or balancer dies.
pub async fn launch(args: LaunchArgs, shutdown: impl Future<Output = ()>) -> ExitCode {
    use discovery::cli::{EXIT_OSERR, EXIT_UNAVAILABLE, EXIT_USAGE};
    let plan = match Plan::new(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cluster: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = check_ports(&plan) {
        eprintln!("cluster: {e}");
        return ExitCode::from(EXIT_UNAVAILABLE);
    }
    let mut agent: Vec<Proc> = Vec::new();
    let mut workers: Vec<Proc> = Vec::new();
    let mut balancer: Vec<Proc> = Vec::new();
    tokio::pin!(shutdown);
    let result = start(
        &plan,
        &mut agent,
        &mut workers,
        &mut balancer,
        &mut shutdown,
    )
    .await;
    let code = match result {
        Err(StartError::Spawn(e)) => {
            eprintln!("cluster: {e}");
            ExitCode::from(EXIT_OSERR)
        }
        Err(StartError::NotUp(e)) => {
            eprintln!("cluster: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(StartError::Interrupted) => ExitCode::SUCCESS,
        Ok(()) => {
            print_summary(&plan, &agent, &workers, &balancer);
            supervise(&mut agent, &mut workers, &mut balancer, shutdown).await
        }
    };
    println!(
        "cluster: stopping: workers first (they deregister), then the balancer, then the agent"
    );
    stop_all(&mut workers, Duration::from_secs(20)).await;
    stop_all(&mut balancer, Duration::from_secs(15)).await;
    stop_all(&mut agent, Duration::from_secs(10)).await;
    code
}

/// After this long without every worker in the rotation, the launcher says which one is
/// missing and why.
const READY_EXPLAIN_AFTER: Duration = Duration::from_secs(30);
/// After this long it gives up.
const READY_GIVE_UP: Duration = Duration::from_secs(120);

async fn start<F: Future<Output = ()>>(
    plan: &Plan,
    agent: &mut Vec<Proc>,
    workers: &mut Vec<Proc>,
    balancer: &mut Vec<Proc>,
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Result<(), StartError> {
    if let Some(addr) = plan.agent {
        agent.push(spawn(
            "agent",
            &[
                "agent".into(),
                "--dev".into(),
                "--http-addr".into(),
                addr.to_string(),
            ],
        )?);
        wait_until("the dev agent", Duration::from_secs(15), || async move {
            http_status(addr, "/v1/status/leader").await == Some(200)
        })
        .await
        .map_err(StartError::NotUp)?;
    }
    for (i, w) in plan.workers.iter().enumerate() {
        let n = i + 1;
        workers.push(spawn(
            &format!("worker-{n}"),
            &[
                "worker".into(),
                "--service".into(),
                plan.service.clone(),
                "--listen".into(),
                w.to_string(),
                "--admin".into(),
                worker_admin(*w).to_string(),
                "--id".into(),
                plan.worker_id(n),
                "--message".into(),
                format!("hello from worker {n}"),
                "--consul-addr".into(),
                plan.consul.clone(),
            ],
        )?);
    }
    balancer.push(spawn(
        "balancer",
        &[
            "balancer".into(),
            "--listen".into(),
            plan.listen.to_string(),
            "--admin".into(),
            plan.admin.to_string(),
            "--service".into(),
            plan.service.clone(),
            "--consul-addr".into(),
            plan.consul.clone(),
        ],
    )?);
    wait_ready(plan, agent, workers, balancer, shutdown).await
}

/// Waits until every worker passes its check in the agent *and* is in the balancer's
/// rotation, so that the first requests after the banner already rotate over all of them.
/// Prints what it waits for whenever that changes; past [`READY_EXPLAIN_AFTER`], which worker
/// is missing and why (its check's output).
async fn wait_ready<F: Future<Output = ()>>(
    plan: &Plan,
    agent: &mut [Proc],
    workers: &mut [Proc],
    balancer: &mut [Proc],
    shutdown: &mut std::pin::Pin<&mut F>,
) -> Result<(), StartError> {
    let consul = discovery::ClientConfig::new(&plan.consul)
        .map(|c| {
            let token = discovery::client::token_from_env().ok().flatten();
            discovery::Client::new(c.with_token(token))
        })
        .map_err(|e| StartError::NotUp(format!("cannot talk to Consul at {}: {e}", plan.consul)))?;
    let ids: Vec<String> = (1..=plan.workers.len())
        .map(|n| plan.worker_id(n))
        .collect();
    let started = tokio::time::Instant::now();
    let mut shown = String::new();
    let mut explained = false;
    loop {
        for p in agent
            .iter_mut()
            .chain(workers.iter_mut())
            .chain(balancer.iter_mut())
        {
            if let Ok(Some(status)) = p.child.try_wait() {
                p.stdin = None;
                return Err(StartError::NotUp(format!(
                    "{} exited while the cluster was starting ({status}); its log is above",
                    p.name
                )));
            }
        }
        let checks = agent_checks(&consul, &plan.service).await;
        let routed = balancer_rotation(plan.admin, &plan.service).await;
        let missing = missing_workers(&ids, checks.as_ref(), routed.as_deref());
        if missing.is_empty() {
            return Ok(());
        }
        let waiting = format!(
            "cluster: waiting for {}",
            missing
                .iter()
                .map(|m| format!("{} ({})", m.id, m.state.short()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if waiting != shown {
            println!("{waiting}");
            shown = waiting;
        }
        let waited = started.elapsed();
        if waited >= READY_EXPLAIN_AFTER && !explained {
            explained = true;
            for m in &missing {
                println!(
                    "cluster: after {}s, {} is still missing: {}",
                    waited.as_secs(),
                    m.id,
                    m.state.explain()
                );
            }
        }
        if waited >= READY_GIVE_UP {
            let why: Vec<String> = missing
                .iter()
                .map(|m| format!("{}: {}", m.id, m.state.explain()))
                .collect();
            return Err(StartError::NotUp(format!(
                "the cluster did not come up within {}s: {}",
                READY_GIVE_UP.as_secs(),
                why.join("; ")
            )));
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Err(StartError::Interrupted),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// One worker's checks in the agent: their aggregated status and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AgentView {
    status: String,
    /// `check name: output` of each check that is not passing.
    outputs: Vec<String>,
}

/// Every registered instance of `service` in the agent, by ID; `None` if the agent does not
/// answer.
async fn agent_checks(
    consul: &discovery::Client,
    service: &str,
) -> Option<std::collections::BTreeMap<String, AgentView>> {
    let q = discovery::HealthQuery::default();
    let answer = tokio::time::timeout(Duration::from_secs(2), consul.health_service(service, &q));
    let (entries, _) = answer.await.ok()?.ok()?;
    Some(
        entries
            .iter()
            .map(|e| {
                let outputs = e
                    .checks
                    .iter()
                    .filter(|c| c.status != "passing")
                    .map(|c| {
                        let out = c.output.trim();
                        let out = if out.is_empty() {
                            "no output yet (the check has not run)"
                        } else {
                            out
                        };
                        format!("{} is {}: {out}", c.name, c.status)
                    })
                    .collect();
                let view = AgentView {
                    status: e.aggregated_status().to_string(),
                    outputs,
                };
                (e.service.id.clone(), view)
            })
            .collect(),
    )
}

/// The instance IDs of `service` in the balancer's rotation (listed, not ejected), from its
/// `/status`; `None` while it does not answer.
async fn balancer_rotation(admin: SocketAddr, service: &str) -> Option<Vec<String>> {
    let (code, body) = http_get(admin, "/status").await?;
    if code != 200 {
        return None;
    }
    let st: serde_json::Value = serde_json::from_str(&body).ok()?;
    let svc = st["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?;
    Some(
        svc["instances"]
            .as_array()?
            .iter()
            .filter(|i| i["ejected"] == false)
            .filter_map(|i| i["id"].as_str().map(String::from))
            .collect(),
    )
}

/// Where a worker that is not in the rotation yet stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    AgentDown,
    NotRegistered,
    Checking(AgentView),
    BalancerDown,
    NotRouted,
}

impl Pending {
    fn short(&self) -> &'static str {
        match self {
            Pending::AgentDown => "the agent does not answer",
            Pending::NotRegistered => "not registered yet",
            Pending::Checking(_) => "its check is not passing yet",
            Pending::BalancerDown => "the balancer does not answer yet",
            Pending::NotRouted => "passing, not in the balancer's rotation yet",
        }
    }

    fn explain(&self) -> String {
        match self {
            Pending::Checking(v) if !v.outputs.is_empty() => format!(
                "the agent reports it {}: {}",
                v.status,
                v.outputs.join("; ")
            ),
            Pending::Checking(v) => format!("the agent reports it {}", v.status),
            other => other.short().to_string(),
        }
    }
}

/// A worker that is not ready yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Missing {
    id: String,
    state: Pending,
}

/// The workers of `ids` not yet both passing in the agent and routed by the balancer.
fn missing_workers(
    ids: &[String],
    agent: Option<&std::collections::BTreeMap<String, AgentView>>,
    routed: Option<&[String]>,
) -> Vec<Missing> {
    ids.iter()
        .filter_map(|id| {
            let state = match agent.map(|a| a.get(id)) {
                None => Pending::AgentDown,
                Some(None) => Pending::NotRegistered,
                Some(Some(v)) if v.status != "passing" => Pending::Checking(v.clone()),
                Some(Some(_)) => match routed {
                    None => Pending::BalancerDown,
                    Some(r) if r.contains(id) => return None,
                    Some(_) => Pending::NotRouted,
                },
            };
            Some(Missing {
                id: id.clone(),
                state,
            })
        })
        .collect()
}

fn print_summary(plan: &Plan, agent: &[Proc], workers: &[Proc], balancer: &[Proc]) {
    let pid = |p: &Proc| p.child.id().map_or("?".into(), |id| id.to_string());
    println!();
    println!("cluster is up:");
    match (plan.agent, agent.first()) {
        (Some(a), Some(p)) => println!(
            "  dev agent   http://{a}  (embedded Consul-compatible agent, pid {})",
            pid(p)
        ),
        _ => println!(
            "  consul      {}  (your agent; no dev agent started)",
            plan.consul
        ),
    }
    for (w, p) in plan.workers.iter().zip(workers) {
        println!(
            "  {:<10}  http://{w}  (service {}, pid {})",
            p.name,
            plan.service,
            pid(p)
        );
    }
    if let Some(p) = balancer.first() {
        println!(
            "  balancer    http://{}  (admin http://{}, pid {})",
            plan.listen,
            plan.admin,
            pid(p)
        );
    }
    println!();
    println!("Try:");
    println!(
        "  for i in 1 2 3 4 5 6; do curl -s http://{}/; done",
        plan.listen
    );
    println!(
        "  open http://{}/     (the dashboard: instances, traffic, changes, live)",
        plan.admin
    );
    println!("  curl -s http://{}/status", plan.admin);
    println!("  curl -s http://{}/metrics", plan.admin);
    // Worker 2 in the default cluster, as in the README; the only one with --workers 1.
    if let Some((n, w)) = plan.workers.iter().enumerate().take(2).next_back() {
        println!(
            "  curl -X PUT -d fail http://{}/admin/health     (worker-{} out of rotation; -d pass brings it back)",
            worker_admin(*w),
            n + 1
        );
    }
    println!(
        "  cargo run --release -- members --http-addr {}     (like `consul members`)",
        plan.consul
    );
    println!(
        "  curl -s 'http://{}/v1/health/service/{}?passing'",
        plan.consul, plan.service
    );
    println!();
    println!("Ctrl-C stops everything (workers deregister first).");
}

/// Waits for the shutdown signal; reports children that exit on their own. A worker that
/// dies leaves the others serving (the balancer routes around it); a dead agent or balancer
/// ends the cluster, since nothing works without them.
async fn supervise(
    agent: &mut [Proc],
    workers: &mut [Proc],
    balancer: &mut [Proc],
    shutdown: impl Future<Output = ()>,
) -> ExitCode {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut shutdown => return ExitCode::SUCCESS,
            _ = tick.tick() => {}
        }
        for p in workers.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                if p.stdin.is_some() {
                    eprintln!(
                        "cluster: {} exited unexpectedly ({status}); the balancer routes around it",
                        p.name
                    );
                    p.stdin = None;
                }
            }
        }
        for p in agent.iter_mut().chain(balancer.iter_mut()) {
            if let Ok(Some(status)) = p.child.try_wait() {
                eprintln!(
                    "cluster: {} exited unexpectedly ({status}); stopping the cluster",
                    p.name
                );
                p.stdin = None;
                return ExitCode::from(discovery::cli::EXIT_UNAVAILABLE);
            }
        }
    }
}

/// Completes when standard input reaches end of file: a supervised child's cue to stop.
pub async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 256];
    loop {
        match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The shutdown cue of a component process: SIGTERM/Ctrl-C, or, when started by the
/// launcher, its stdin closing.
pub async fn component_shutdown() {
    let supervised = std::env::var_os(SUPERVISED_ENV).is_some();
    tokio::select! {
        _ = discovery::cli::shutdown_signal() => {}
        _ = async {
            if supervised {
                stdin_closed().await
            } else {
                std::future::pending::<()>().await
            }
        } => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> LaunchArgs {
        let mut v = vec!["cluster"];
        v.extend_from_slice(extra);
        LaunchArgs::try_parse_from(v).unwrap()
    }

    #[test]
    fn plan_defaults() {
        let p = Plan::new(&args(&[])).unwrap();
        assert_eq!(p.workers.len(), 3);
        assert_eq!(p.workers[2].port(), 9003);
        assert_eq!(worker_admin(p.workers[2]).port(), 10003);
        assert_eq!(p.agent, Some("127.0.0.1:8500".parse().unwrap()));
        assert_eq!(p.ports().len(), 9);
    }

    #[test]
    fn external_consul_skips_the_agent() {
        let p = Plan::new(&args(&["--consul-addr", "10.0.0.1:8500", "--workers", "2"])).unwrap();
        assert_eq!(p.agent, None);
        assert_eq!(p.consul, "10.0.0.1:8500");
        assert_eq!(p.ports().len(), 6);
    }

    #[test]
    fn port_range_checked() {
        assert!(Plan::new(&args(&["--worker-port", "65535", "--workers", "2"])).is_err());
        // The last worker's admin port must fit too.
        assert!(Plan::new(&args(&["--worker-port", "64535", "--workers", "2"])).is_err());
        assert!(Plan::new(&args(&["--worker-port", "64535", "--workers", "1"])).is_ok());
    }

    #[test]
    fn missing_workers_say_where_they_stand() {
        let ids: Vec<String> = ["web-1", "web-2", "web-3"].map(String::from).to_vec();
        assert_eq!(missing_workers(&ids, None, None).len(), 3, "agent down");
        let view = |status: &str, outputs: &[&str]| AgentView {
            status: status.into(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
        };
        let agent: std::collections::BTreeMap<String, AgentView> = [
            ("web-1".to_string(), view("passing", &[])),
            (
                "web-2".to_string(),
                view("critical", &["HTTP check is critical: connection refused"]),
            ),
        ]
        .into();
        let routed = vec!["web-1".to_string()];
        let m = missing_workers(&ids, Some(&agent), Some(&routed));
        assert_eq!(
            m.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["web-2", "web-3"]
        );
        assert_eq!(
            m[0].state.explain(),
            "the agent reports it critical: HTTP check is critical: connection refused"
        );
        assert_eq!(m[1].state, Pending::NotRegistered);
        // Passing but the balancer has not routed it yet (or does not answer).
        let agent: std::collections::BTreeMap<String, AgentView> = ids
            .iter()
            .map(|id| (id.clone(), view("passing", &[])))
            .collect();
        let m = missing_workers(&ids, Some(&agent), Some(&routed));
        assert!(m.iter().all(|m| m.state == Pending::NotRouted), "{m:?}");
        let m = missing_workers(&ids, Some(&agent), None);
        assert!(m.iter().all(|m| m.state == Pending::BalancerDown), "{m:?}");
        assert!(missing_workers(&ids, Some(&agent), Some(&ids)).is_empty());
    }

    #[test]
    fn taken_port_is_named() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        let p = Plan::new(&args(&[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "1",
            "--worker-port",
            "1",
        ]))
        .unwrap();
        // Port 1 needs privileges or is free; only the taken balancer port must be reported.
        let err = check_ports(&Plan {
            workers: vec![],
            agent: None,
            ..p
        })
        .unwrap_err();
        assert!(
            err.contains(&port.to_string()) && err.contains("--listen"),
            "{err}"
        );
    }
}
