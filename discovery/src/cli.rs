//! The `discovery` command line: `agent --dev`, and `members` / `services` for people, which
//! work against the dev agent and against real Consul alike.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::agent::{AgentConfig, DEFAULT_DEREGISTER_MIN, DEFAULT_REAP_INTERVAL};
use crate::client::{Client, ClientConfig, DEFAULT_ADDR};
use crate::wire::Member;

// Exit codes, the same in every binary of the project (`sysexits.h`); the README's table
// "Exit codes" lists them with the situations that lead to each.

/// Exit code for bad flags or configuration (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code when something the program needs is not there (`EX_UNAVAILABLE`): an address to
/// listen on is taken or not on this host, the Consul agent does not answer, a component of
/// the local cluster did not come up or died.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code for an internal error after a good start (`EX_SOFTWARE`).
pub const EXIT_SOFTWARE: u8 = 70;
/// Exit code when the operating system refuses a resource (`EX_OSERR`): threads for the
/// runtime, a child process.
pub const EXIT_OSERR: u8 = 71;

/// Service discovery on Consul: an embedded dev agent and tools to look at a cluster.
#[derive(Debug, Parser)]
#[command(name = "discovery", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the embedded single-node, in-memory Consul-compatible agent.
    Agent(AgentArgs),
    /// List the cluster's members, with the columns of `consul members`.
    Members(MembersArgs),
    /// List the catalog's services, like `consul catalog services`.
    Services(ServicesArgs),
}

/// Flags of `discovery agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Development mode: single node, in memory, nothing persisted (required, as for Consul).
    #[arg(long)]
    pub dev: bool,
    /// Address of the HTTP API.
    #[arg(long, default_value = DEFAULT_ADDR, env = "DISCOVERY_HTTP_ADDR")]
    pub http_addr: SocketAddr,
    /// Node name; defaults to the host name.
    #[arg(long)]
    pub node: Option<String>,
    /// Address the node advertises (services without an address inherit it); defaults to the
    /// HTTP address's IP, or 127.0.0.1 when that is unspecified.
    #[arg(long)]
    pub advertise: Option<IpAddr>,
    /// Not a Consul flag: how often critical services are reaped (Consul: 30s). For tests.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub dev_reap_interval: Duration,
    /// Not a Consul flag: floor of DeregisterCriticalServiceAfter (Consul: 1m). For tests.
    #[arg(long, value_parser = parse_duration, default_value = "1m")]
    pub dev_deregister_min: Duration,
    /// Most concurrent HTTP connections from one client address, as Consul's
    /// `limits.http_max_conns_per_client`; past it a connection gets Consul's 429 and is
    /// closed. 0: no limit.
    #[arg(long, default_value_t = crate::agent::DEFAULT_MAX_CONNS_PER_CLIENT)]
    pub dev_max_conns_per_client: usize,
}

/// Where the agent is: `CONSUL_HTTP_ADDR` and `CONSUL_HTTP_TOKEN`, like every Consul tool.
#[derive(Debug, clap::Args)]
pub struct AgentAddr {
    /// Consul agent HTTP address (`host:port` or `http://host:port`).
    #[arg(long = "http-addr", env = "CONSUL_HTTP_ADDR", default_value = DEFAULT_ADDR)]
    pub http_addr: String,
    /// ACL token, sent as X-Consul-Token.
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Flags of `discovery members`.
#[derive(Debug, clap::Args)]
pub struct MembersArgs {
    #[command(flatten)]
    pub addr: AgentAddr,
    /// Show all tags instead of the summary columns.
    #[arg(long)]
    pub detailed: bool,
    /// List WAN members (servers of every datacenter).
    #[arg(long)]
    pub wan: bool,
}

/// Flags of `discovery services`.
#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    pub addr: AgentAddr,
    /// Show each service's tags.
    #[arg(long)]
    pub tags: bool,
}

/// A clap value parser for Go duration strings (`10s`, `1m30s`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s).map_err(|e| e.to_string())
}

/// Parses arguments; on bad flags prints clap's message and exits 64 (help/version: 0).
pub fn parse_or_exit<P: Parser>() -> P {
    P::try_parse().unwrap_or_else(|e| exit_on_clap_error(e))
}

/// Prints a clap error and exits: 0 for `--help`/`--version`, 64 for bad usage.
pub fn exit_on_clap_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    let code = match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
        _ => i32::from(EXIT_USAGE),
    };
    let _ = e.print();
    std::process::exit(code);
}

/// Installs the tracing subscriber once, filtered by `RUST_LOG` (default `info`), on stderr.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    // No colour codes when stderr is a pipe or file: they would garble logs and `grep`.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A multi-threaded tokio runtime; if the OS refuses one, says so and exits 71 (`EX_OSERR`).
pub fn runtime_or_exit() -> tokio::runtime::Runtime {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(i32::from(EXIT_OSERR))
        }
    }
}

/// Prints `error: <msg>` and returns exit code 64, for configuration a flag parser accepted
/// but the program cannot use.
pub fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(EXIT_USAGE)
}

fn client_for(addr: &AgentAddr) -> Result<Client, ExitCode> {
    let cfg = ClientConfig::new(&addr.http_addr).map_err(usage)?;
    let token = match addr.token.clone() {
        Some(t) => Some(t),
        None => crate::client::token_from_env().map_err(usage)?,
    };
    Ok(Client::new(cfg.with_token(token)))
}

/// Runs a parsed command line to completion; the agent stops when `shutdown` completes.
pub async fn run(cli: Cli, shutdown: impl std::future::Future<Output = ()>) -> ExitCode {
    match cli.command {
        Command::Agent(a) => run_agent(a, shutdown).await,
        Command::Members(m) => run_members(m).await,
        Command::Services(s) => run_services(s).await,
    }
}

async fn run_agent(a: AgentArgs, shutdown: impl std::future::Future<Output = ()>) -> ExitCode {
    if !a.dev {
        return usage(
            "only development mode is supported: run `discovery agent --dev` (use real Consul for anything else)",
        );
    }
    let node = a.node.clone().unwrap_or_else(hostname);
    let advertise = a.advertise.unwrap_or_else(|| {
        let ip = a.http_addr.ip();
        if ip.is_unspecified() {
            IpAddr::from([127, 0, 0, 1])
        } else {
            ip
        }
    });
    let mut config = AgentConfig::new(node, advertise);
    config.reap_interval = a.dev_reap_interval.max(Duration::from_millis(100));
    config.deregister_min = a.dev_deregister_min;
    config.max_conns_per_client = a.dev_max_conns_per_client;
    if config.reap_interval != DEFAULT_REAP_INTERVAL
        || config.deregister_min != DEFAULT_DEREGISTER_MIN
    {
        tracing::warn!(reap_interval = ?config.reap_interval, deregister_min = ?config.deregister_min, "reaper timings differ from Consul's (test settings)");
    }
    let listener = match tokio::net::TcpListener::bind(a.http_addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "error: cannot listen on {}: {e} (is another Consul agent or dev agent running? pick another with --http-addr)",
                a.http_addr
            );
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    eprintln!(
        "discovery dev agent: Consul HTTP API on http://{} (node {}, datacenter {}); Ctrl-C to stop",
        a.http_addr, config.node_name, config.datacenter
    );
    match crate::agent::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_SOFTWARE)
        }
    }
}

/// Completes on the first SIGTERM or Ctrl-C. A second one ends the process at once, for an
/// operator who does not want to wait for the drain.
pub async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
                    () = ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c().await;
}

/// Completes on Ctrl-C; never, if no handler can be installed (SIGTERM still works).
async fn ctrl_c() {
    match tokio::signal::ctrl_c().await {
        Ok(()) => tracing::info!(signal = "SIGINT", "signal received"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "dev".to_string())
}

async fn run_members(m: MembersArgs) -> ExitCode {
    let client = match client_for(&m.addr) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let members = if m.wan {
        client.members_wan().await
    } else {
        client.members().await
    };
    match members {
        Ok(list) if list.is_empty() => ExitCode::from(2),
        Ok(list) => {
            print!("{}", format_members(&list, m.detailed));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "Error retrieving members from {}: {}",
                client.base_url(),
                crate::error::chain(&e)
            );
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// The table `consul members` prints (columns separated by at least two spaces).
pub fn format_members(list: &[Member], detailed: bool) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    if detailed {
        rows.push(vec![
            "Node".into(),
            "Address".into(),
            "Status".into(),
            "Tags".into(),
        ]);
        for m in list {
            let tags: Vec<String> = m.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            rows.push(vec![
                m.name.clone(),
                format!("{}:{}", m.addr, m.port),
                m.status_name().into(),
                tags.join(","),
            ]);
        }
    } else {
        rows.push(
            [
                "Node",
                "Address",
                "Status",
                "Type",
                "Build",
                "Protocol",
                "DC",
                "Partition",
                "Segment",
            ]
            .map(String::from)
            .to_vec(),
        );
        for m in list {
            let tag = |k: &str| m.tags.get(k).cloned().unwrap_or_default();
            let kind = match tag("role").as_str() {
                "consul" => "server",
                "node" => "client",
                _ => "unknown",
            };
            let build = m
                .tags
                .get("build")
                .map(|b| b.split(':').next().unwrap_or("").to_string())
                .unwrap_or_else(|| "< 0.3".into());
            let segment = if kind == "server" {
                "<all>".to_string()
            } else {
                let s = tag("segment");
                if s.is_empty() {
                    "<default>".into()
                } else {
                    s
                }
            };
            let partition = m
                .tags
                .get("ap")
                .cloned()
                .unwrap_or_else(|| "default".into());
            rows.push(vec![
                m.name.clone(),
                format!("{}:{}", m.addr, m.port),
                m.status_name().into(),
                kind.into(),
                build,
                tag("vsn"),
                tag("dc"),
                partition,
                segment,
            ]);
        }
    }
    columnize(&rows)
}

fn columnize(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < r.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

async fn run_services(s: ServicesArgs) -> ExitCode {
    let client = match client_for(&s.addr) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match client.catalog_services(0, None).await {
        Ok((services, _)) => {
            if s.tags {
                let rows: Vec<Vec<String>> = services
                    .iter()
                    .map(|(name, tags)| {
                        let mut t = tags.clone();
                        t.sort();
                        t.dedup();
                        vec![name.clone(), t.join(",")]
                    })
                    .collect();
                print!("{}", columnize(&rows));
            } else {
                for name in services.keys() {
                    println!("{name}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "Error listing services from {}: {}",
                client.base_url(),
                crate::error::chain(&e)
            );
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_table_has_consul_columns() {
        let m = Member {
            name: "dev".into(),
            addr: "127.0.0.1".into(),
            port: 8301,
            tags: [
                ("role", "consul"),
                ("build", "1.21.0:abc"),
                ("vsn", "2"),
                ("dc", "dc1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            status: 1,
            ..Default::default()
        };
        let out = format_members(&[m], false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "Node  Address         Status  Type    Build   Protocol  DC   Partition  Segment"
        );
        assert_eq!(
            lines[1],
            "dev   127.0.0.1:8301  alive   server  1.21.0  2         dc1  default    <all>"
        );
    }
}
