//! The balancer's command line, shared by the `balancer` binary and the cluster launcher.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use std::future::Future;

use crate::config::{self, Config, Route};
use clap::Parser;
use discovery::cli::{parse_duration, usage, EXIT_OSERR, EXIT_SOFTWARE, EXIT_UNAVAILABLE};

/// A Consul-aware round-robin reverse proxy: routes each request to the next healthy
/// instance of a Consul service, watching the catalog with blocking queries.
#[derive(Debug, Clone, Parser)]
#[command(name = "balancer", version, about)]
pub struct Args {
    /// Address to accept client requests on.
    #[arg(long, env = "BALANCER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A Consul service to route to: `web` routes `/`; `api=/api` routes the `/api` prefix on
    /// any host; `shop=shop.example.com/` routes the host `shop.example.com` (any port, any
    /// case) and `shop=shop.example.com/v1` a prefix on it. Options after commas: `strip`
    /// removes the route's prefix before forwarding (`ui=/ui,strip`: `/ui/app.js` reaches
    /// the service as `/app.js`, with `X-Forwarded-Prefix: /ui`), `strip=/path` removes
    /// `/path`. A route naming the host beats any route without one; the longest prefix wins.
    /// Repeat for several; comma-separated in the environment. Without any, --tag-routes is on.
    #[arg(long = "service", env = "BALANCER_SERVICES", value_delimiter = ',')]
    pub services: Vec<String>,
    /// A file of routes, one `--service` spec per line (`#` starts a comment): how to give
    /// thousands of routes without thousands of arguments.
    #[arg(long, env = "BALANCER_SERVICES_FILE")]
    pub services_file: Option<std::path::PathBuf>,
    /// Route every service whose passing instances carry route tags (Fabio's syntax:
    /// `urlprefix-/path`, `urlprefix-host/path`, options after a space such as
    /// `strip=/path`). On by default when no --service is given. Routes from tags and flags
    /// share one table; on the same host and prefix the older route wins (flags first).
    #[arg(long, env = "BALANCER_TAG_ROUTES")]
    pub tag_routes: bool,
    /// The prefix of route tags.
    #[arg(long, env = "BALANCER_TAG_PREFIX", default_value = "urlprefix-")]
    pub tag_prefix: String,
    /// Address of the admin listener (/status, /metrics, /health); `off` disables it.
    #[arg(long, env = "BALANCER_ADMIN", default_value = "127.0.0.1:8081")]
    pub admin: String,
    /// Most admin connections open at once; more wait in the listen backlog (they cost the
    /// balancer no file descriptor, so they cannot starve the proxy port).
    #[arg(long, env = "BALANCER_ADMIN_MAX_CONNECTIONS", default_value_t = config::DEFAULT_ADMIN_MAX_CONNECTIONS)]
    pub admin_max_connections: usize,
    /// An admin connection on which no byte moves for this long is closed. A request head
    /// must arrive within --header-read-timeout, as on the proxy port.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub admin_idle_timeout: Duration,
    /// Consul agent HTTP address (`host:port` or `http://host:port`).
    #[arg(long, env = "CONSUL_HTTP_ADDR", default_value = discovery::client::DEFAULT_ADDR)]
    pub consul_addr: String,
    /// Consul ACL token (sent as X-Consul-Token); `CONSUL_HTTP_TOKEN_FILE` also works.
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,
    /// Connect timeout to an instance; a refused or timed-out connect moves on to the next.
    /// It outlives the kernel's SYN retransmits at 1 s and 3 s, so that a burst that
    /// overflows an instance's accept queue waits instead of failing.
    #[arg(long, value_parser = parse_duration, default_value = "4s")]
    pub connect_timeout: Duration,
    /// Time from sending a request to an instance until its response head arrives (streaming
    /// the request body counts too); past it the client gets 504. Also the longest pause
    /// allowed within a response body; past it the answer is cut off.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub upstream_timeout: Duration,
    /// For idempotent requests without a body: how long one attempt may wait for the first
    /// byte of its answer before the request is sent to another instance (within --retries),
    /// and the silent instance sits out a cool-off. Finds a dead link under a pooled
    /// connection in this time instead of the upstream timeout. `off` (the default): only
    /// --upstream-timeout applies. Set it above the slowest answer such requests may take.
    #[arg(long, env = "BALANCER_FIRST_BYTE_TIMEOUT", default_value = "off")]
    pub first_byte_timeout: String,
    /// Most requests at one instance at once (HAProxy's per-server maxconn); more wait in a
    /// queue for a place, up to --queue-timeout, then get 503. 0 (the default): no limit.
    /// Protects instances with small accept queues or little concurrency from bursts.
    #[arg(long, env = "BALANCER_MAX_CONNS_PER_INSTANCE", default_value_t = 0)]
    pub max_conns_per_instance: usize,
    /// Longest wait for a place at an instance under --max-conns-per-instance.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub queue_timeout: Duration,
    /// Most requests waiting for a place, per event loop; past it, 503 at once.
    #[arg(long, default_value_t = config::DEFAULT_MAX_QUEUE)]
    pub max_queue: usize,
    /// Time a client gets to send its request head; also how long an idle keep-alive
    /// connection (HTTP/1, or HTTP/2 with no open stream) stays open.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,
    /// An upgraded connection (WebSocket) that carries nothing either way for this long is
    /// closed.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub tunnel_idle_timeout: Duration,
    /// Most concurrent streams on one HTTP/2 client connection (each may hold an upstream
    /// connection).
    #[arg(long, default_value_t = config::DEFAULT_HTTP2_MAX_STREAMS)]
    pub http2_max_streams: u32,
    /// Idle pooled connections to instances are closed after this; keep it below the
    /// instances' own keep-alive idle limit.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub pool_idle_timeout: Duration,
    /// Deadline for in-flight requests on shutdown.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub shutdown_grace: Duration,
    /// Most client connections open at once; more wait in the listen backlog.
    #[arg(long, default_value_t = config::DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Extra attempts for idempotent, bodiless requests that failed after being sent.
    #[arg(long, default_value_t = config::DEFAULT_RETRIES)]
    pub retries: u32,
    /// Longest Consul blocking-query wait.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub watch_wait: Duration,
    /// Threads serving clients: N event loops for the HTTP/1 fast path, each on its own
    /// thread with its own sockets, pool and timers (routing and round robin are shared, so
    /// rotation stays exact), and the runtime behind them (connections handed over: HTTP/2,
    /// HTTP/1.0, upgrades, large uploads; discovery; the admin listener), which is one
    /// thread for 1 and N threads otherwise. 0 (the default) is one per CPU. On a machine
    /// shared with the instances or a load generator, 1 gives the most requests per
    /// CPU-second.
    #[arg(long, env = "BALANCER_THREADS", default_value_t = 0)]
    pub threads: usize,
}

/// Puts route options split off by the comma delimiter (`api=/api,strip` arrives as `api=/api`
/// and `strip`) back on the spec they follow.
fn rejoin_options(values: &[String]) -> Vec<String> {
    let mut specs: Vec<String> = Vec::new();
    for v in values {
        let v = v.trim();
        let is_option = v == "strip" || v.starts_with("strip=");
        match specs.last_mut() {
            Some(last) if is_option => {
                last.push(',');
                last.push_str(v);
            }
            _ if v.is_empty() => {}
            _ => specs.push(v.to_string()),
        }
    }
    specs
}

/// Runs the balancer with parsed flags until `shutdown` completes; returns the exit code
/// (64 for bad configuration, 69 when an address cannot be listened on, 70 when the proxy
/// fails after starting, 71 when the runtime cannot start; see `discovery::cli::EXIT_*`).
pub fn main(cli: Args, shutdown: impl Future<Output = ()>) -> ExitCode {
    let mut specs = rejoin_options(&cli.services);
    if let Some(path) = &cli.services_file {
        match std::fs::read_to_string(path) {
            Ok(text) => specs.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .map(str::to_string),
            ),
            Err(e) => return usage(format!("--services-file {}: {e}", path.display())),
        }
    }
    let tags = cli.tag_routes || specs.is_empty();
    if tags && cli.tag_prefix.trim().is_empty() {
        return usage("--tag-prefix must not be empty");
    }
    let routes: Result<Vec<Route>, _> = specs.iter().map(|s| Route::parse(s)).collect();
    let tag_prefix = tags.then(|| cli.tag_prefix.trim().to_string());
    let mut config = match routes.and_then(|r| Config::with_tags(r, tag_prefix)) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    if cli.max_connections == 0 {
        return usage("--max-connections must be at least 1");
    }
    if cli.http2_max_streams == 0 {
        return usage("--http2-max-streams must be at least 1");
    }
    if cli.admin_max_connections == 0 {
        return usage("--admin-max-connections must be at least 1");
    }
    // A zero timeout would turn every request into a 504, or close every connection at once.
    for (flag, d) in [
        ("--connect-timeout", cli.connect_timeout),
        ("--upstream-timeout", cli.upstream_timeout),
        ("--header-read-timeout", cli.header_read_timeout),
        ("--pool-idle-timeout", cli.pool_idle_timeout),
        ("--tunnel-idle-timeout", cli.tunnel_idle_timeout),
        ("--admin-idle-timeout", cli.admin_idle_timeout),
        ("--queue-timeout", cli.queue_timeout),
    ] {
        if d.is_zero() {
            return usage(format!("{flag} must be more than 0"));
        }
    }
    config.admin_max_connections = cli.admin_max_connections;
    config.admin_idle_timeout = cli.admin_idle_timeout;
    config.connect_timeout = cli.connect_timeout;
    config.upstream_timeout = cli.upstream_timeout;
    config.header_read_timeout = cli.header_read_timeout;
    config.pool_idle_timeout = cli.pool_idle_timeout;
    config.shutdown_grace = cli.shutdown_grace;
    config.max_connections = cli.max_connections;
    config.retries = cli.retries;
    config.tunnel_idle_timeout = cli.tunnel_idle_timeout;
    config.max_conns_per_instance =
        (cli.max_conns_per_instance > 0).then_some(cli.max_conns_per_instance);
    config.queue_timeout = cli.queue_timeout;
    config.max_queue = cli.max_queue;
    config.first_byte_timeout = match cli.first_byte_timeout.as_str() {
        "off" => None,
        v => match parse_duration(v) {
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => return usage("--first-byte-timeout must be more than 0, or off"),
            Err(e) => return usage(format!("--first-byte-timeout {v:?}: {e}")),
        },
    };
    config.http2_max_streams = cli.http2_max_streams;
    config.watch_wait = cli.watch_wait.max(Duration::from_secs(1));
    let admin: Option<SocketAddr> = if cli.admin == "off" {
        None
    } else {
        match cli.admin.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                return usage(format!(
                    "--admin {:?}: expected host:port or off",
                    cli.admin
                ))
            }
        }
    };
    let consul = match discovery::ClientConfig::new(&cli.consul_addr) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let token = match cli.consul_token.clone() {
        Some(t) => Some(t),
        None => match discovery::client::token_from_env() {
            Ok(t) => t,
            Err(e) => return usage(e),
        },
    };
    let client = discovery::Client::new(consul.with_token(token));

    // One thread: a current-thread runtime, which skips the work-stealing scheduler's
    // cross-thread wake-ups. Measured with ../shared/bench on 2 cores shared with the load
    // generator and the instances, when this runtime served every request: ~39k requests per
    // CPU-second on one thread, ~22k on the default two-thread pool.
    let threads = match cli.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    config.event_loops = threads;
    let mut rt = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_OSERR);
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(cli.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {} (--listen): {e}", cli.listen);
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        let admin_listener = match admin {
            Some(a) => match tokio::net::TcpListener::bind(a).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("error: cannot listen on {a} (--admin): {e}");
                    return ExitCode::from(EXIT_UNAVAILABLE);
                }
            },
            None => None,
        };
        eprintln!(
            "balancer: proxying on http://{} (admin {}), Consul at {}",
            cli.listen,
            admin.map_or("off".to_string(), |a| format!("http://{a}")),
            client.base_url()
        );
        match crate::run(
            config,
            Some(client),
            listener,
            admin_listener,
            |_| {},
            shutdown,
        )
        .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_SOFTWARE)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_go_back_on_their_spec() {
        let v: Vec<String> = ["web", "ui=/ui", "strip", "api=h/api", "strip=/api", "x"]
            .map(String::from)
            .into();
        assert_eq!(
            rejoin_options(&v),
            ["web", "ui=/ui,strip", "api=h/api,strip=/api", "x"].map(String::from)
        );
    }
}
