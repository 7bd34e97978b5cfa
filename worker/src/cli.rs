//! The `worker` command line: clap derive at the edge, converted once into a [`Config`].
//!
//! Every flag has an environment fallback (`WORKER_*`, and Consul's own `CONSUL_HTTP_ADDR` /
//! `CONSUL_HTTP_TOKEN`), so the same binary runs from a shell, a systemd unit or the Vagrant
//! provisioning scripts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use discovery::cli::parse_duration;
use discovery::register::LeaveMode;
use discovery::ClientConfig;

use crate::config::{
    AdminAddr, Advertise, CheckSettings, Config, DEFAULT_LISTEN, DEFAULT_MESSAGE, DEFAULT_SERVICE,
};
use crate::Error;

/// A demo service that registers itself with Consul, answers who it is, and leaves cleanly.
///
/// Service endpoints: `GET /` (identity; JSON with `Accept: application/json`), `GET /health`,
/// `POST /echo`, `GET /delay?ms=N`, `GET /headers`. On the separate admin listener (`--admin`,
/// loopback only): `GET|PUT /admin/health` (`pass`|`fail`).
#[derive(Debug, Parser)]
#[command(name = "worker", version)]
pub struct Cli {
    /// Service name registered in Consul.
    #[arg(
        long,
        env = "WORKER_SERVICE",
        default_value = DEFAULT_SERVICE,
    )]
    pub service: String,

    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "WORKER_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// Address registered in Consul (`host` or `host:port`). Required when listening on
    /// 0.0.0.0 or [::]: an "any" address is never registered. Defaults to the listen IP.
    #[arg(long, env = "WORKER_ADVERTISE")]
    pub advertise: Option<Advertise>,

    /// Instance ID registered in Consul [default: <service>-<advertise host>-<port>].
    #[arg(long, env = "WORKER_ID")]
    pub id: Option<String>,

    /// Consul tag; repeat for several (env: comma-separated).
    #[arg(
        long = "tag",
        value_name = "TAG",
        env = "WORKER_TAGS",
        value_delimiter = ','
    )]
    pub tags: Vec<String>,

    /// Consul service metadata as key=value; repeat for several (env: comma-separated).
    #[arg(
        long = "meta",
        value_name = "KEY=VALUE",
        env = "WORKER_META",
        value_delimiter = ',',
        value_parser = parse_meta
    )]
    pub meta: Vec<(String, String)>,

    /// Text shown by `GET /`.
    #[arg(long, env = "WORKER_MESSAGE", default_value = DEFAULT_MESSAGE)]
    pub message: String,

    /// Consul agent HTTP address (host:port or http://host:port).
    #[arg(
        long,
        env = "CONSUL_HTTP_ADDR",
        default_value = discovery::client::DEFAULT_ADDR
    )]
    pub consul_addr: String,

    /// Consul ACL token (else CONSUL_HTTP_TOKEN_FILE is read).
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,

    /// Serve without registering in Consul.
    #[arg(long, env = "WORKER_NO_REGISTER")]
    pub no_register: bool,

    /// How often Consul probes GET /health (Go duration: 2s, 500ms, 1m30s).
    #[arg(
        long,
        env = "WORKER_CHECK_INTERVAL",
        default_value = "2s",
        value_parser = parse_duration
    )]
    pub check_interval: Duration,

    /// Timeout of each Consul probe.
    #[arg(
        long,
        env = "WORKER_CHECK_TIMEOUT",
        default_value = "1s",
        value_parser = parse_duration
    )]
    pub check_timeout: Duration,

    /// DeregisterCriticalServiceAfter: Consul removes a worker whose check stays critical this
    /// long (it cleans up after crashes; Consul raises values below 1m to 1m).
    #[arg(
        long,
        env = "WORKER_DEREGISTER_AFTER",
        default_value = "1m",
        value_parser = parse_duration
    )]
    pub deregister_after: Duration,

    /// On shutdown: deregister at once, or turn maintenance on first, then deregister.
    #[arg(
        long,
        env = "WORKER_LEAVE",
        value_enum,
        default_value_t = LeaveArg::Deregister,
    )]
    pub leave: LeaveArg,

    /// Time between leaving Consul and closing the listener, so balancers stop sending first.
    #[arg(
        long,
        env = "WORKER_DRAIN_DELAY",
        default_value = "2s",
        value_parser = parse_duration
    )]
    pub drain_delay: Duration,

    /// Deadline for in-flight requests once the listener is closed.
    #[arg(
        long,
        env = "WORKER_SHUTDOWN_GRACE",
        default_value = "10s",
        value_parser = parse_duration
    )]
    pub shutdown_grace: Duration,

    /// Admin listener for PUT /admin/health (the health switch), apart from the service port:
    /// a loopback `host:port`, or `off`. Default: 127.0.0.1 (::1 for an IPv6 --listen) at the
    /// --listen port + 1000 (9001 → 10001, so workers on one host do not collide), or an
    /// ephemeral port when --listen has port 0. The address is logged at startup (admin=).
    #[arg(long, env = "WORKER_ADMIN", value_name = "ADDR|off")]
    pub admin: Option<AdminAddr>,

    /// When set, PUT /admin/health also needs this value in the X-Admin-Token header
    /// (it is always refused to non-loopback and proxied clients).
    #[arg(long, env = "WORKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Fixed latency added to every request except /health and /admin/health (at most 1m).
    #[arg(
        long,
        env = "WORKER_DELAY",
        default_value = "0",
        value_parser = parse_duration
    )]
    pub delay: Duration,
}

/// `--leave` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LeaveArg {
    /// Deregister at once.
    Deregister,
    /// Maintenance on, then deregister.
    Maintenance,
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// The addresses to bind, decided before anything is bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The service listener (`--listen`).
    pub service: SocketAddr,
    /// The admin listener (`--admin`); `None` when `--admin off`.
    pub admin: Option<SocketAddr>,
}

impl Cli {
    /// Validates the flags and converts them: the addresses to bind, and the worker's config.
    pub fn into_config(self) -> Result<(Listen, Config), Error> {
        let admin = self
            .admin
            .unwrap_or(AdminAddr::Default)
            .resolve(self.listen)?;
        if admin.is_none() && self.admin_token.is_some() {
            return Err(Error::Config(
                "--admin-token is set but --admin is off: nothing would use the token".into(),
            ));
        }
        let mut meta = BTreeMap::new();
        for (k, v) in self.meta {
            if meta.insert(k.clone(), v).is_some() {
                return Err(Error::Config(format!("meta key {k:?} given twice")));
            }
        }
        let consul = if self.no_register {
            None
        } else {
            let token = match self.consul_token.filter(|t| !t.trim().is_empty()) {
                Some(t) => Some(t),
                None => discovery::client::token_from_env().map_err(consul_config)?,
            };
            Some(
                ClientConfig::new(&self.consul_addr)
                    .map_err(consul_config)?
                    .with_token(token),
            )
        };
        let config = Config {
            service: self.service,
            id: self.id,
            advertise: self.advertise,
            tags: self.tags,
            meta,
            message: self.message,
            consul,
            check: CheckSettings {
                interval: self.check_interval,
                timeout: self.check_timeout,
                deregister_after: self.deregister_after,
            },
            leave: match self.leave {
                LeaveArg::Deregister => LeaveMode::Deregister,
                LeaveArg::Maintenance => LeaveMode::MaintenanceThenDeregister,
            },
            drain_delay: self.drain_delay,
            shutdown_grace: self.shutdown_grace,
            admin_token: self.admin_token,
            delay: self.delay,
        };
        config.validate(self.listen)?;
        let listen = Listen {
            service: self.listen,
            admin,
        };
        Ok((listen, config))
    }
}

/// `sysexits.h` `EX_USAGE`: the command was used incorrectly.
const EX_USAGE: u8 = discovery::cli::EXIT_USAGE;

/// Validates the flags, binds, and runs the worker until `shutdown` completes; returns the
/// exit code: 0 after a clean shutdown, 64 for bad configuration, 69 when the address cannot
/// be listened on, 70 for a failure after starting, 71 when the runtime cannot start.
pub fn main(cli: Cli, shutdown: impl std::future::Future<Output = ()>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let (listen, config) = match cli.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("worker: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "could not start the async runtime");
            return ExitCode::from(discovery::cli::EXIT_OSERR);
        }
    };
    runtime.block_on(async move {
        let Some(listener) = bind(listen.service).await else {
            return ExitCode::from(discovery::cli::EXIT_UNAVAILABLE);
        };
        let admin = match listen.admin {
            Some(addr) => match bind(addr).await {
                Some(l) => Some(l),
                None => return ExitCode::from(discovery::cli::EXIT_UNAVAILABLE),
            },
            None => None,
        };
        match crate::run(config, listener, admin, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %discovery::error::chain(&e), "worker failed");
                if e.is_config() {
                    ExitCode::from(EX_USAGE)
                } else {
                    ExitCode::from(discovery::cli::EXIT_SOFTWARE)
                }
            }
        }
    })
}

/// Binds `addr`, logging why it could not (the caller exits 1: a taken port is not a usage error).
async fn bind(addr: SocketAddr) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(%addr, error = %e, "could not listen");
            None
        }
    }
}

fn consul_config(e: discovery::Error) -> Error {
    // A bad CONSUL_HTTP_ADDR or unreadable token file is the operator's to fix: exit 64.
    Error::Config(e.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<(Listen, Config), String> {
        let mut argv = vec!["worker", "--consul-addr", "127.0.0.1:8500"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn converts_flags() {
        let (listen, cfg) = parse(&[
            "--service",
            "api",
            "--listen",
            "0.0.0.0:9002",
            "--advertise",
            "10.0.0.5",
            "--tag",
            "v1",
            "--tag",
            "blue",
            "--meta",
            "version=1.2.3",
            "--meta",
            "zone=a=b",
            "--check-interval",
            "500ms",
            "--deregister-after",
            "1m30s",
            "--leave",
            "maintenance",
        ])
        .unwrap();
        assert_eq!(listen.service, "0.0.0.0:9002".parse().unwrap());
        assert_eq!(listen.admin, Some("127.0.0.1:10002".parse().unwrap()));
        assert_eq!(cfg.service, "api");
        assert_eq!(cfg.tags, ["v1", "blue"]);
        assert_eq!(cfg.meta["zone"], "a=b");
        assert_eq!(cfg.check.interval, Duration::from_millis(500));
        assert_eq!(cfg.check.deregister_after, Duration::from_secs(90));
        assert_eq!(cfg.leave, LeaveMode::MaintenanceThenDeregister);
        assert_eq!(
            cfg.consul.unwrap().base_url,
            "http://127.0.0.1:8500".to_string()
        );
    }

    #[test]
    fn admin_listener_is_apart_from_the_service() {
        let admin = |args: &[&str]| parse(args).map(|(l, _)| l.admin);
        let sa = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        // Defaults: loopback of the same family at the service port + 1000; ephemeral for 0.
        assert_eq!(admin(&[]).unwrap(), sa("127.0.0.1:10001"));
        assert_eq!(
            admin(&["--listen", "127.0.0.1:9003"]).unwrap(),
            sa("127.0.0.1:10003")
        );
        assert_eq!(
            admin(&["--listen", "127.0.0.1:0"]).unwrap(),
            sa("127.0.0.1:0")
        );
        assert_eq!(
            admin(&["--listen", "[::1]:9001"]).unwrap(),
            sa("[::1]:10001")
        );
        assert_eq!(
            admin(&["--listen", "0.0.0.0:9001", "--advertise", "10.0.0.5"]).unwrap(),
            sa("127.0.0.1:10001")
        );
        assert_eq!(admin(&["--admin", "[::1]:7000"]).unwrap(), sa("[::1]:7000"));
        assert_eq!(admin(&["--admin", "off"]).unwrap(), None);
        assert_eq!(admin(&["--admin", "OFF"]).unwrap(), None);
        // The token is kept for the admin listener.
        let (_, cfg) = parse(&["--admin-token", "s3cret"]).unwrap();
        assert_eq!(cfg.admin_token.as_deref(), Some("s3cret"));

        for (args, needle) in [
            (&["--admin", "0.0.0.0:10001"][..], "loopback"),
            (&["--admin", "10.0.0.5:10001"][..], "loopback"),
            (&["--admin", "127.0.0.1"][..], "neither off"),
            (&["--admin", "on"][..], "neither off"),
            (&["--admin", ""][..], "neither off"),
            (&["--admin", "127.0.0.1:9001"][..], "service port"),
            (
                &[
                    "--listen",
                    "0.0.0.0:9001",
                    "--advertise",
                    "h",
                    "--admin",
                    "127.0.0.1:9001",
                ][..],
                "service port",
            ),
            (&["--listen", "127.0.0.1:65000"][..], "past 65535"),
            (
                &["--admin", "off", "--admin-token", "x"][..],
                "--admin is off",
            ),
            (&["--admin-token", ""][..], "empty"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        // A high service port works with an explicit admin address.
        assert_eq!(
            admin(&["--listen", "127.0.0.1:65000", "--admin", "127.0.0.1:0"]).unwrap(),
            sa("127.0.0.1:0")
        );
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse(&["--listen", "0.0.0.0:9001"])
            .unwrap_err()
            .contains("--advertise"));
        assert!(parse(&["--advertise", "0.0.0.0"]).is_err());
        assert!(parse(&["--check-interval", "2"])
            .unwrap_err()
            .contains("missing unit"));
        assert!(parse(&["--meta", "novalue"]).is_err());
        assert!(parse(&["--meta", "a=1", "--meta", "a=2"]).is_err());
        assert!(parse(&["--delay", "2m"]).is_err());
        assert!(parse(&["--consul-addr", "https://x:8501"]).is_err());
        assert!(parse(&["--no-such-flag"]).is_err());
    }
}
