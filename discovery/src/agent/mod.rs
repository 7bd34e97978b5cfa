//! The embedded Consul-compatible dev agent (`discovery agent --dev`). Being written.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use tokio::net::TcpListener;

/// Settings of the dev agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name (`consul agent -dev` uses the hostname).
    pub node_name: String,
    /// Datacenter, `dc1` like Consul.
    pub datacenter: String,
    /// The node's address, as registered services without an address inherit it.
    pub advertise: IpAddr,
    /// How often critical services are reaped (Consul: 30 s).
    pub reap_interval: Duration,
    /// Floor of `DeregisterCriticalServiceAfter` (Consul: 1 min).
    pub deregister_min: Duration,
}

/// Serves the agent API on `listener` until `shutdown` completes.
pub async fn run(
    _config: AgentConfig,
    _listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    shutdown.await;
    Ok(())
}
