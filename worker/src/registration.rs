//! What the worker registers in Consul, and the options it hands to the `discovery`
//! registration lifecycle, which retries while the agent is down, registers again after the
//! agent lost the registration, and logs each of those steps itself.

use discovery::register::RegistrationOptions;
use discovery::wire::{CheckDefinition, ServiceRegistration};

use crate::config::{Config, Identity};

/// Name of the HTTP check as Consul shows it.
const CHECK_NAME: &str = "http";

/// The registration body: the advertised address, the bound (or advertised) port, and an HTTP
/// check on `/health` that Consul probes (`consul-api.md` §1.2.5).
pub fn service_registration(config: &Config, identity: &Identity) -> ServiceRegistration {
    let go = discovery::duration::format;
    ServiceRegistration {
        id: Some(identity.id.clone()),
        name: identity.service.clone(),
        tags: config.tags.clone(),
        address: Some(identity.host.clone()),
        port: Some(identity.port),
        meta: config.meta.clone(),
        check: Some(CheckDefinition {
            check_id: Some(identity.check_id()),
            name: Some(CHECK_NAME.to_string()),
            http: Some(identity.health_url()),
            interval: Some(go(config.check.interval)),
            timeout: Some(go(config.check.timeout)),
            deregister_critical_service_after: Some(go(config.check.deregister_after)),
            // No initial `Status`: the instance stays critical until Consul's first probe
            // reaches it, so a wrong advertise address never attracts traffic.
            ..CheckDefinition::default()
        }),
        checks: Vec::new(),
    }
}

/// Lifecycle options: the library's retry and verification defaults, the configured leave mode.
pub fn options(config: &Config) -> RegistrationOptions {
    RegistrationOptions {
        leave: config.leave,
        ..RegistrationOptions::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    #[test]
    fn body_matches_consul_sample() {
        let cfg = Config {
            tags: vec!["v1".into()],
            check: crate::config::CheckSettings {
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                deregister_after: Duration::from_secs(60),
            },
            ..Config::default()
        };
        let id = cfg.identity("127.0.0.1:9001".parse().unwrap()).unwrap();
        let json = serde_json::to_value(service_registration(&cfg, &id)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "ID": "web-127.0.0.1-9001", "Name": "web", "Tags": ["v1"],
                "Address": "127.0.0.1", "Port": 9001,
                "Check": {"CheckID": "web-127.0.0.1-9001:http", "Name": "http",
                          "HTTP": "http://127.0.0.1:9001/health", "Interval": "5s",
                          "Timeout": "2s", "DeregisterCriticalServiceAfter": "1m0s"}
            })
        );
    }
}
