//! The fields a `?filter=` selector may name, per endpoint, as go-bexpr derives them from the
//! Go type Consul filters there: a selector naming anything else is an error before any item
//! is looked at (`Selector "Service.Nope" is not valid`), even on an empty result.
//!
//! The lists follow Consul's structs, including fields the dev agent never fills (`PeerName`,
//! `Locality`, the Enterprise `Namespace`/`Partition`): naming them is valid in Consul, so it is
//! here, and they select nothing. Mesh configuration (`Proxy`, `Connect`, a check's
//! `Definition`) is left open below its name rather than listed field by field.

use super::filter::Field::{self, Bool, Int, Leaf, List, Map, Open, Struct};

const RAFT_INDEX: [Field; 2] = [Int("CreateIndex"), Int("ModifyIndex")];
const LOCALITY: &[Field] = &[Leaf("Region"), Leaf("Zone")];
const WEIGHTS: &[Field] = &[Int("Passing"), Int("Warning")];
const SERVICE_ADDRESS: &[Field] = &[Leaf("Address"), Int("Port")];

/// `structs.Node` (`catalog/nodes`, and `Node` of a `health/service` entry).
pub(crate) const NODE: &[Field] = &[
    Leaf("ID"),
    Leaf("Node"),
    Leaf("Address"),
    Leaf("Datacenter"),
    Leaf("Partition"),
    Leaf("PeerName"),
    Map("TaggedAddresses", &[]),
    Map("Meta", &[]),
    Struct("Locality", LOCALITY),
    RAFT_INDEX[0],
    RAFT_INDEX[1],
];

/// `structs.NodeService` (`catalog/node`'s services, `Service` of a `health/service` entry).
pub(crate) const NODE_SERVICE: &[Field] = &[
    Leaf("Kind"),
    Leaf("ID"),
    Leaf("Service"),
    List("Tags", &[]),
    Leaf("Address"),
    Map("TaggedAddresses", SERVICE_ADDRESS),
    Map("Meta", &[]),
    Int("Port"),
    Leaf("SocketPath"),
    Struct("Weights", WEIGHTS),
    Bool("EnableTagOverride"),
    Open("Proxy"),
    Open("Connect"),
    Leaf("PeerName"),
    Struct("Locality", LOCALITY),
    Leaf("Namespace"),
    Leaf("Partition"),
    RAFT_INDEX[0],
    RAFT_INDEX[1],
];

/// `structs.HealthCheck` (`health/checks`, `health/node`, `health/state`, `agent/checks`).
pub(crate) const HEALTH_CHECK: &[Field] = &[
    Leaf("Node"),
    Leaf("CheckID"),
    Leaf("Name"),
    Leaf("Status"),
    Leaf("Notes"),
    Leaf("Output"),
    Leaf("ServiceID"),
    Leaf("ServiceName"),
    List("ServiceTags", &[]),
    Leaf("Type"),
    Leaf("Interval"),
    Leaf("Timeout"),
    Int("ExposedPort"),
    Open("Definition"),
    Leaf("PeerName"),
    Leaf("Namespace"),
    Leaf("Partition"),
    RAFT_INDEX[0],
    RAFT_INDEX[1],
];

/// `structs.CheckServiceNode` (`health/service`).
pub(crate) const SERVICE_ENTRY: &[Field] = &[
    Struct("Node", NODE),
    Struct("Service", NODE_SERVICE),
    List("Checks", HEALTH_CHECK),
];

/// `structs.ServiceNode` (`catalog/service`, and the service nodes `catalog/services` lists).
pub(crate) const SERVICE_NODE: &[Field] = &[
    Leaf("ID"),
    Leaf("Node"),
    Leaf("Address"),
    Leaf("Datacenter"),
    Map("TaggedAddresses", &[]),
    Map("NodeMeta", &[]),
    Leaf("ServiceKind"),
    Leaf("ServiceID"),
    Leaf("ServiceName"),
    List("ServiceTags", &[]),
    Leaf("ServiceAddress"),
    Map("ServiceTaggedAddresses", SERVICE_ADDRESS),
    Struct("ServiceWeights", WEIGHTS),
    Map("ServiceMeta", &[]),
    Int("ServicePort"),
    Leaf("ServiceSocketPath"),
    Bool("ServiceEnableTagOverride"),
    Open("ServiceProxy"),
    Open("ServiceConnect"),
    Struct("ServiceLocality", LOCALITY),
    Leaf("PeerName"),
    Leaf("Namespace"),
    Leaf("Partition"),
    RAFT_INDEX[0],
    RAFT_INDEX[1],
];

/// `api.AgentService` (`agent/services`).
pub(crate) const AGENT_SERVICE: &[Field] = &[
    Leaf("Kind"),
    Leaf("ID"),
    Leaf("Service"),
    List("Tags", &[]),
    Map("Meta", &[]),
    Int("Port"),
    Leaf("Address"),
    Leaf("SocketPath"),
    Map("TaggedAddresses", SERVICE_ADDRESS),
    Struct("Weights", WEIGHTS),
    Bool("EnableTagOverride"),
    Int("CreateIndex"),
    Int("ModifyIndex"),
    Leaf("ContentHash"),
    Open("Proxy"),
    Open("Connect"),
    Leaf("PeerName"),
    Leaf("Namespace"),
    Leaf("Partition"),
    Leaf("Datacenter"),
    Struct("Locality", LOCALITY),
];

/// `api.AgentMember` (`agent/members`).
pub(crate) const MEMBER: &[Field] = &[
    Leaf("Name"),
    Leaf("Addr"),
    Int("Port"),
    Map("Tags", &[]),
    Int("Status"),
    Int("ProtocolMin"),
    Int("ProtocolMax"),
    Int("ProtocolCur"),
    Int("DelegateMin"),
    Int("DelegateMax"),
    Int("DelegateCur"),
];
