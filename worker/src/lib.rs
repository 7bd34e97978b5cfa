//! The worker: a small HTTP service that registers itself with Consul, says plainly which
//! instance answered, and leaves Consul before it stops listening.
//!
//! It is the service behind the balancer in every demo. [`run`] serves first, then registers
//! through the `discovery` registration lifecycle (which retries while the agent is down and
//! registers again after the agent lost it), and on shutdown runs the leave sequence:
//! `/health` turns 503, the instance leaves Consul, the drain delay lets balancers notice, and
//! only then the listener closes and in-flight requests finish within a deadline.
//!
//! The health switch (`PUT /admin/health`) is served on a second, loopback-only listener, never
//! on the service port: a proxy on the same host relays strangers' requests from loopback.
//!
//! # Layout
//!
//! - [`config`]: the validated [`Config`] and the [`Identity`] derived once the port is bound.
//! - [`cli`]: the command line (clap derive, env fallbacks) → [`Config`].
//! - [`handler`]: request handling: identity, health, the admin switch, echo, delay, headers,
//!   routed by listener ([`handler::Surface`]).
//! - [`server`]: the accept loop (one per listener), connection caps and graceful shutdown.
//! - [`registration`]: the Consul registration body and lifecycle options.

pub mod cli;
pub mod config;
pub mod handler;
pub mod registration;
pub mod server;

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::{Config, Identity};
use handler::Surface;

/// Why the worker could not run.
#[derive(Debug)]
pub enum Error {
    /// The configuration is unusable (exit code 64): bad flags, an "any" address without
    /// `--advertise`, metadata Consul would refuse.
    Config(String),
    /// The listener's socket failed (reading its address).
    Io(std::io::Error),
    /// The registration lifecycle could not be started.
    Register(discovery::Error),
}

impl Error {
    /// True for configuration errors, which the binary maps to exit code 64.
    pub fn is_config(&self) -> bool {
        // The lifecycle validates the registration too; what it rejects is configuration.
        matches!(
            self,
            Self::Config(_) | Self::Register(discovery::Error::Config(_))
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Self::Io(_) => f.write_str("listener failed"),
            Self::Register(_) => f.write_str("could not start the Consul registration"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config(_) => None,
            Self::Io(e) => Some(e),
            Self::Register(e) => Some(e),
        }
    }
}

/// Serves on `listener`, and the health switch on `admin` (when given), registers in Consul
/// (when `config.consul` is set) and runs until `shutdown` completes; then leaves Consul, waits
/// the drain delay, stops accepting on both listeners and finishes in-flight requests within
/// `config.shutdown_grace`.
///
/// Returns `Ok` after a shutdown, whichever way draining ended; failing to leave Consul is
/// logged, not returned, because the process is exiting either way and the check's
/// `DeregisterCriticalServiceAfter` cleans up.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let bound = listener.local_addr().map_err(Error::Io)?;
    let admin_bound = admin
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()
        .map_err(Error::Io)?;
    let identity = config.identity(bound)?;
    let state = Arc::new(handler::State::new(&config, identity.clone()));

    // Serve before registering: Consul's first probe must find the port open, and a worker
    // whose agent is down still answers (a static balancer or curl can reach it).
    let server = Servers {
        service: server::Server::start(listener, state.clone(), Surface::Service),
        admin: admin.map(|l| server::Server::start(l, state.clone(), Surface::Admin)),
    };
    tracing::info!(
        addr = %bound,
        // Tests and scripts read both addresses from this line; "off" when there is none.
        admin = %admin_bound.map_or_else(|| "off".to_string(), |a| a.to_string()),
        id = %identity.id,
        service = %identity.service,
        advertise = %identity.address(),
        "listening"
    );

    let registration = match &config.consul {
        Some(consul) => {
            let client = discovery::Client::new(consul.clone());
            tracing::info!(
                agent = %client.base_url(),
                check = %identity.health_url(),
                "registering in Consul"
            );
            let body = registration::service_registration(&config, &identity);
            match discovery::register::Registration::spawn(
                client,
                body,
                registration::options(&config),
            ) {
                Ok(r) => Some(r),
                Err(e) => {
                    // Close the listener before returning: a worker that cannot register
                    // must not linger half-started, answering traffic nobody routes to it.
                    server.shutdown(config.shutdown_grace).await;
                    return Err(Error::Register(e));
                }
            }
        }
        None => {
            tracing::info!("not registering in Consul (--no-register)");
            None
        }
    };

    shutdown.await;

    tracing::info!("shutdown requested: /health now answers 503");
    state.set_draining();
    if let Some(registration) = registration {
        tracing::info!(id = %identity.id, "leaving Consul");
        // The lifecycle logs how leaving went; a failure changes nothing here: /health already
        // answers 503, so the check turns critical and balancers drop the instance anyway.
        if registration.leave().await.is_err() {
            tracing::info!("continuing the shutdown without a confirmed deregistration");
        }
    }
    tracing::info!(
        delay = %discovery::duration::format(config.drain_delay),
        "draining: still serving while balancers notice"
    );
    tokio::time::sleep(config.drain_delay).await;

    match server.shutdown(config.shutdown_grace).await {
        server::Drained::Clean => tracing::info!("all connections finished; stopped"),
        server::Drained::Aborted(n) => tracing::warn!(
            connections = n,
            "grace period over; cut the remaining connections"
        ),
    }
    Ok(())
}

/// The service listener and, unless `--admin off`, the admin listener: stopped together.
struct Servers {
    service: server::Server,
    admin: Option<server::Server>,
}

impl Servers {
    /// Stops both listeners and drains both at once within `grace`; the admin listener's
    /// connections count with the service's.
    async fn shutdown(self, grace: std::time::Duration) -> server::Drained {
        let admin = async {
            match self.admin {
                Some(admin) => admin.shutdown(grace).await,
                None => server::Drained::Clean,
            }
        };
        match tokio::join!(self.service.shutdown(grace), admin) {
            (server::Drained::Clean, server::Drained::Clean) => server::Drained::Clean,
            (a, b) => server::Drained::Aborted(a.cut() + b.cut()),
        }
    }
}
