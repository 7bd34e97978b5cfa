//! Consul's JSON shapes, shared by the client (which decodes them) and the dev agent (which
//! encodes them).
//!
//! Decoding is tolerant, as real Consul versions differ: every struct has `#[serde(default)]`,
//! unknown keys are ignored, and fields Consul omits when empty are `Option` or defaulted.
//! Encoding follows Consul's field order and `omitempty` rules, so the dev agent's answers
//! match a real agent's (`consul-api.md` §1.4). Domain types built from these live elsewhere
//! (`crate::Instance`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

fn is_zero_u16(v: &u16) -> bool {
    *v == 0
}

/// `Weights` of a service; Consul fills `{1, 1}` when a registration omits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Weights {
    pub passing: i64,
    pub warning: i64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            passing: 1,
            warning: 1,
        }
    }
}

/// A service's tagged address: an object on the wire, not a string (`structs.ServiceAddress`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceAddress {
    pub address: String,
    pub port: u16,
}

/// A node as it appears in `health/service` entries (`structs.Node`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Node {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    /// Plain strings here, unlike a service's tagged addresses.
    pub tagged_addresses: BTreeMap<String, String>,
    pub meta: BTreeMap<String, String>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A service instance as `health/service` shows it (`structs.NodeService`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NodeService {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub meta: BTreeMap<String, String>,
    /// `omitempty` in Consul: an instance with port 0 has no `Port` key.
    #[serde(skip_serializing_if = "is_zero_u16")]
    pub port: u16,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub socket_path: String,
    pub weights: Weights,
    pub enable_tag_override: bool,
    /// Service-mesh settings; carried opaquely.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<Value>,
    pub peer_name: String,
    pub create_index: u64,
    pub modify_index: u64,
}

/// A health check row (`structs.HealthCheck`), as in `Checks` arrays and `agent/checks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct HealthCheck {
    pub node: String,
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    pub status: String,
    pub notes: String,
    pub output: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    #[serde(rename = "Type")]
    pub kind: String,
    pub interval: String,
    pub timeout: String,
    pub exposed_port: u16,
    pub definition: Value,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One entry of `GET /v1/health/service/:name`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ServiceEntry {
    pub node: Node,
    pub service: NodeService,
    pub checks: Vec<HealthCheck>,
}

impl ServiceEntry {
    /// The address to reach the instance: `Service.Address`, else the node's address.
    pub fn address(&self) -> &str {
        if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        }
    }

    /// Consul's `AggregatedStatus` (Go `api.HealthChecks.AggregatedStatus`).
    pub fn aggregated_status(&self) -> &'static str {
        aggregated_status(
            self.checks
                .iter()
                .map(|c| (c.check_id.as_str(), c.status.as_str())),
        )
    }
}

/// `maintenance` if any maintenance check is present, else the worst status; `passing` for none.
pub fn aggregated_status<'a>(checks: impl Iterator<Item = (&'a str, &'a str)>) -> &'static str {
    let (mut critical, mut warning, mut maintenance, mut unknown) = (false, false, false, false);
    for (id, status) in checks {
        if id == NODE_MAINTENANCE_CHECK || id.starts_with(SERVICE_MAINTENANCE_PREFIX) {
            maintenance = true;
        }
        match status {
            "passing" => {}
            "warning" => warning = true,
            "critical" => critical = true,
            _ => unknown = true,
        }
    }
    if maintenance {
        "maintenance"
    } else if critical {
        "critical"
    } else if warning {
        "warning"
    } else if unknown {
        ""
    } else {
        "passing"
    }
}

/// Check ID of node-wide maintenance mode.
pub const NODE_MAINTENANCE_CHECK: &str = "_node_maintenance";
/// Prefix of a service's maintenance check ID (`_service_maintenance:<id>`).
pub const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";

/// One service of `GET /v1/agent/services` and `GET /v1/agent/service/:id` (`api.AgentService`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentService {
    #[serde(skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    pub port: u16,
    pub address: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub socket_path: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub weights: Weights,
    pub enable_tag_override: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub content_hash: String,
    pub datacenter: String,
}

/// One entry of `GET /v1/catalog/service/:name` (`structs.ServiceNode`, flattened).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CatalogService {
    #[serde(rename = "ID")]
    pub id: String,
    pub node: String,
    pub address: String,
    pub datacenter: String,
    pub tagged_addresses: BTreeMap<String, String>,
    pub node_meta: BTreeMap<String, String>,
    pub service_kind: String,
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    pub service_name: String,
    pub service_tags: Vec<String>,
    pub service_address: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub service_tagged_addresses: BTreeMap<String, ServiceAddress>,
    pub service_weights: Weights,
    pub service_meta: BTreeMap<String, String>,
    pub service_port: u16,
    pub service_socket_path: String,
    pub service_enable_tag_override: bool,
    pub service_proxy: Option<Value>,
    pub service_connect: Option<Value>,
    pub service_locality: Option<Value>,
    pub create_index: u64,
    pub modify_index: u64,
}

/// One serf member of `GET /v1/agent/members` (`api.AgentMember`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Member {
    pub name: String,
    pub addr: String,
    pub port: u16,
    pub tags: BTreeMap<String, String>,
    /// 0 none, 1 alive, 2 leaving, 3 left, 4 failed.
    pub status: u8,
    pub protocol_min: u8,
    pub protocol_max: u8,
    pub protocol_cur: u8,
    pub delegate_min: u8,
    pub delegate_max: u8,
    pub delegate_cur: u8,
}

impl Member {
    /// Serf's name for `Status`.
    pub fn status_name(&self) -> &'static str {
        match self.status {
            0 => "none",
            1 => "alive",
            2 => "leaving",
            3 => "left",
            4 => "failed",
            _ => "unknown",
        }
    }
}

/// `Config` of `GET /v1/agent/self`; the rest of that answer is read as loose JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct SelfConfig {
    pub datacenter: String,
    pub primary_datacenter: String,
    pub node_name: String,
    #[serde(rename = "NodeID")]
    pub node_id: String,
    pub revision: String,
    pub server: bool,
    pub version: String,
    pub build_date: String,
}

/// The part of `GET /v1/agent/self` clients use.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentSelf {
    pub config: SelfConfig,
    pub member: Member,
}

/// A check in a registration body (`structs.CheckType`); only what the workers send.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckDefinition {
    #[serde(rename = "CheckID", skip_serializing_if = "Option::is_none")]
    pub check_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// Initial status; Consul defaults to `critical`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(rename = "HTTP", skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Header values are arrays in Consul (`map[string][]string`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<BTreeMap<String, Vec<String>>>,
    #[serde(rename = "TCP", skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// Go duration strings (`"2s"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(rename = "TTL", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deregister_critical_service_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_before_passing: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failures_before_critical: Option<u32>,
}

/// Body of `PUT /v1/agent/service/register` as the workers send it (`api.AgentServiceRegistration`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceRegistration {
    #[serde(rename = "ID", skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckDefinition>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub checks: Vec<CheckDefinition>,
}

impl ServiceRegistration {
    /// The ID Consul will use: `ID`, or `Name` when no ID is given.
    pub fn effective_id(&self) -> &str {
        self.id
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&self.name)
    }
}

/// Body of `PUT /v1/agent/check/update/:id`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CheckUpdate {
    pub status: String,
    pub output: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_real_consul_shapes() {
        // Port omitted (port 0), tagged addresses as objects, unknown keys, header arrays.
        let raw = r#"[{"Node":{"ID":"x","Node":"n1","Address":"10.0.0.1","Datacenter":"dc1",
              "TaggedAddresses":{"lan":"10.0.0.1"},"Meta":{},"Partition":"default","CreateIndex":1,"ModifyIndex":2},
            "Service":{"ID":"w1","Service":"web","Tags":["a"],"Address":"",
              "TaggedAddresses":{"lan_ipv4":{"Address":"10.0.0.1","Port":0}},
              "Meta":null,"Weights":{"Passing":1,"Warning":1},"EnableTagOverride":false,
              "Proxy":{"Mode":"","MeshGateway":{},"Expose":{}},"Connect":{},"Locality":null,
              "CreateIndex":5,"ModifyIndex":5,"SomethingNew":true},
            "Checks":[{"Node":"n1","CheckID":"serfHealth","Status":"passing",
              "Definition":{"Header":{"X":["a","b"]}},"Namespace":"default"}]}]"#;
        let raw = raw.replace("\"Meta\":null,", "");
        let entries: Vec<ServiceEntry> = serde_json::from_str(&raw).expect("decodes");
        assert_eq!(entries[0].service.port, 0);
        assert_eq!(entries[0].address(), "10.0.0.1");
        assert_eq!(entries[0].aggregated_status(), "passing");
        assert_eq!(
            entries[0].service.tagged_addresses["lan_ipv4"].address,
            "10.0.0.1"
        );
    }

    #[test]
    fn encodes_omitempty_like_consul() {
        let svc = NodeService {
            id: "a".into(),
            service: "a".into(),
            ..Default::default()
        };
        let json = serde_json::to_value(&svc).expect("encodes");
        assert!(json.get("Port").is_none());
        assert!(json.get("Kind").is_none());
        assert!(json.get("TaggedAddresses").is_none());
        assert_eq!(json["Weights"]["Passing"], 1);
    }

    #[test]
    fn aggregated_status_order() {
        let s = |v: &[(&'static str, &'static str)]| aggregated_status(v.iter().copied());
        assert_eq!(s(&[]), "passing");
        assert_eq!(s(&[("a", "passing"), ("b", "warning")]), "warning");
        assert_eq!(s(&[("a", "critical"), ("b", "warning")]), "critical");
        assert_eq!(s(&[("_service_maintenance:x", "critical")]), "maintenance");
        assert_eq!(s(&[("a", "bogus")]), "");
    }
}
