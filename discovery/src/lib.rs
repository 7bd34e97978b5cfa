//! Service discovery on Consul: a typed client, a blocking-query watcher, the registration
//! lifecycle of a service, and an embedded Consul-compatible dev agent.
//!
//! # Layout
//!
//! - [`wire`]: Consul's JSON shapes, shared by the client and the dev agent.
//! - [`client`]: the typed HTTP client (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`).
//! - [`watch`]: follows `health/service` with blocking queries and publishes snapshots.
//! - [`register`]: registers a service, keeps it registered, deregisters it on the way out.
//! - [`agent`]: `discovery agent --dev`, a single-node in-memory agent.
//! - [`duration`]: Go duration strings, as Consul reads and writes them.
//! - [`cli`]: the `discovery` command line (`agent`, `members`, `services`).
//! - [`serve`]: pieces shared by the project's HTTP servers.

pub mod agent;
pub mod cli;
pub mod client;
pub mod duration;
pub mod error;
pub mod json_rows;
pub mod register;
pub mod serve;
pub mod watch;
pub mod wire;

use std::collections::BTreeMap;

pub use client::{Client, ClientConfig, HealthQuery, QueryMeta};
pub use error::Error;

/// One healthy instance of a service, as the balancer routes to it. Built from a
/// `health/service` entry at the boundary; nothing past this point sees Consul's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Instance {
    /// Consul service ID, unique per agent.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Host to connect to: `Service.Address`, else `Node.Address`.
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// `Weights.Passing`, `Weights.Warning`.
    pub weights: (i64, i64),
}

impl Instance {
    /// Converts a `health/service` entry.
    pub fn from_entry(entry: &wire::ServiceEntry) -> Self {
        Self {
            id: entry.service.id.clone(),
            service: entry.service.service.clone(),
            address: entry.address().to_string(),
            port: entry.service.port,
            tags: entry.service.tags.clone(),
            meta: entry.service.meta.clone(),
            weights: (entry.service.weights.passing, entry.service.weights.warning),
        }
    }

    /// `host:port` for a URI authority; IPv6 literals get brackets.
    pub fn authority(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_brackets_ipv6() {
        let mut i = Instance {
            id: "a".into(),
            service: "web".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            weights: (1, 1),
        };
        assert_eq!(i.authority(), "10.0.0.1:80");
        i.address = "::1".into();
        assert_eq!(i.authority(), "[::1]:80");
    }
}
