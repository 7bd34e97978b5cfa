//! The agent's in-memory state: one node, its services and checks, and Consul's indexes.
//!
//! Everything lives behind one `std::sync::Mutex`, held only for short, non-async sections.
//! Every real change takes the next value of one global index (seeded from the clock so it
//! keeps growing across restarts), stamps the rows it touched, and is announced on a
//! `watch` channel that wakes blocking queries. Changes that change nothing (re-registering
//! an identical service, a check that stays passing) take no index and wake nobody.
//!
//! Two secondary indexes (instances by service name, checks by service ID) keep every read of
//! one service proportional to that service, not to the catalog; and every change records
//! which service names it touched ([`Dirty`]), so that only the blocking queries that can
//! see them are woken (`Shared::notify`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::decode::CheckDef;
use super::json;
use crate::wire::{HealthCheck, Node, NodeService, ServiceAddress, Weights};

/// The Consul version whose API the dev agent follows; shown where Consul shows its version.
pub(crate) const CONSUL_VERSION: &str = "1.21.0";

pub(crate) const PASSING: &str = "passing";
pub(crate) const WARNING: &str = "warning";
pub(crate) const CRITICAL: &str = "critical";

/// Default `OutputMaxSize` (Consul's `DefaultBufSize`).
pub(crate) const DEFAULT_OUTPUT_MAX: usize = 4096;

/// Aborts the task when dropped, so removing a check row stops its runner.
pub(crate) struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a check's status is produced.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Probe {
    /// Set from outside: the node's `serfHealth`, maintenance checks.
    Static,
    Ttl(Duration),
    Http(CheckDef),
    Tcp(CheckDef),
}

/// A check row plus what keeps it running.
pub(crate) struct CheckRow {
    /// Read through [`CheckRow::hc`]; changed only through [`CheckRow::hc_mut`], which drops
    /// `element`.
    hc: HealthCheck,
    /// `hc` as an element of a JSON array answer (`json::array_element`), encoded by the first
    /// read that needs it after each change: a read of every check of a large node then
    /// encodes only the rows that changed since the last one.
    element: OnceLock<Bytes>,
    pub probe: Probe,
    /// Identifies this row's runner; a result from an older runner is ignored.
    pub generation: u64,
    /// Dropped with the row: stops the runner.
    pub runner: Option<AbortOnDrop>,
    /// TTL checks: the current expiry, moved forward by every pass/warn/fail/update.
    pub ttl_deadline: Option<watch::Sender<Instant>>,
    /// When the check last turned critical; the reaper measures from here.
    pub critical_since: Option<Instant>,
    /// `DeregisterCriticalServiceAfter`, already raised to the agent's floor.
    pub deregister_after: Option<Duration>,
    pub output_max: usize,
}

impl CheckRow {
    /// A check whose status is set from outside ([`Probe::Static`]): no runner, no timers.
    fn fixed(hc: HealthCheck) -> Self {
        Self {
            hc,
            element: OnceLock::new(),
            probe: Probe::Static,
            generation: 0,
            runner: None,
            ttl_deadline: None,
            critical_since: None,
            deregister_after: None,
            output_max: DEFAULT_OUTPUT_MAX,
        }
    }

    /// The check as reads show it.
    pub fn hc(&self) -> &HealthCheck {
        &self.hc
    }

    /// The row for a change: its encoded element no longer holds.
    fn hc_mut(&mut self) -> &mut HealthCheck {
        self.element.take();
        &mut self.hc
    }

    /// The check as `json::array_element` encodes it; shares the bytes kept in the row.
    pub fn element(&self) -> Bytes {
        self.element
            .get_or_init(|| json::array_element(&self.hc))
            .clone()
    }
}

/// A service row.
pub(crate) struct ServiceRow {
    pub svc: NodeService,
    /// The `consul` service: in the catalog, not in the agent's local services.
    pub catalog_only: bool,
}

/// The node this agent is.
#[derive(Debug, Clone)]
pub(crate) struct NodeInfo {
    pub id: String,
    pub name: String,
    pub address: String,
    pub datacenter: String,
    pub meta: BTreeMap<String, String>,
}

/// The service names changed since the last `Shared::notify`; `all` when a node-level row
/// changed, which every service's health answer shows.
#[derive(Debug, Default)]
pub(crate) struct Dirty {
    pub all: bool,
    pub names: BTreeSet<String>,
}

pub(crate) struct Store {
    index: u64,
    node_create_index: u64,
    /// By service ID. Rows are added and removed only through `Store`'s methods, which keep
    /// `instances` in step.
    pub services: BTreeMap<String, ServiceRow>,
    /// By check ID. Rows are added and removed only through `Store`'s methods, which keep
    /// `checks_of` in step.
    pub checks: BTreeMap<String, CheckRow>,
    /// Service name -> IDs of its instances.
    instances: Listing,
    /// Service ID -> IDs of its checks; node-level checks under `""`.
    checks_of: Listing,
    /// What changed since the last notification.
    dirty: Dirty,
    services_table: u64,
    checks_table: u64,
    node_checks: u64,
    by_name: HashMap<String, u64>,
    generation: u64,
    pub node: NodeInfo,
}

/// What a registration changed, so the caller can start runners outside the lock.
pub(crate) struct Applied {
    pub changed: bool,
    pub new_runners: Vec<(String, u64, Probe)>,
}

impl Store {
    pub fn new(node: NodeInfo) -> Self {
        // Seed from wall-clock microseconds: a restarted agent never shows a smaller index
        // than the one before, so watchers do not have to notice a reset. Milliseconds were
        // not enough: a burst of more than one change per millisecond (TTL updates in a loop,
        // then a quick restart) left the old index ahead of the new seed. Microseconds stay
        // below 2^53 (JavaScript clients' exact integers) until the year 2255.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let mut s = Self {
            index: seed,
            node_create_index: 0,
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
            instances: HashMap::new(),
            checks_of: HashMap::new(),
            dirty: Dirty::default(),
            services_table: 0,
            checks_table: 0,
            node_checks: 0,
            by_name: HashMap::new(),
            generation: 0,
            node,
        };
        let idx = s.next_index();
        s.node_create_index = idx;
        s.services_table = idx;
        s.checks_table = idx;
        s.node_checks = idx;
        let consul = NodeService {
            id: "consul".into(),
            service: "consul".into(),
            port: 8300,
            meta: [
                ("non_voter", "false"),
                ("raft_version", "3"),
                ("read_replica", "false"),
                ("serf_protocol_current", "2"),
                ("serf_protocol_max", "5"),
                ("serf_protocol_min", "1"),
                ("version", CONSUL_VERSION),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            proxy: Some(default_proxy()),
            connect: Some(json!({})),
            create_index: idx,
            modify_index: idx,
            ..Default::default()
        };
        s.by_name.insert("consul".into(), idx);
        s.put_service(ServiceRow {
            svc: consul,
            catalog_only: true,
        });
        let node_name = s.node.name.clone();
        s.put_check(CheckRow::fixed(HealthCheck {
            node: node_name,
            check_id: "serfHealth".into(),
            name: "Serf Health Status".into(),
            status: PASSING.into(),
            output: "Agent alive and reachable".into(),
            definition: json!({}),
            create_index: idx,
            modify_index: idx,
            ..Default::default()
        }));
        s.dirty = Dirty::default();
        s
    }

    /// Stores a service row under its ID, keeping `instances` in step (a re-registration
    /// may rename the service).
    fn put_service(&mut self, row: ServiceRow) {
        let id = row.svc.id.clone();
        let name = row.svc.service.clone();
        if let Some(old) = self.services.insert(id.clone(), row) {
            if old.svc.service != name {
                self.unlist_instance(&old.svc.service, &id);
            }
        }
        self.instances.entry(name).or_default().insert(id);
    }

    fn unlist_instance(&mut self, name: &str, id: &str) {
        unlist(&mut self.instances, name, id);
    }

    /// Stores a check row under its ID, keeping `checks_of` in step. When the ID belonged to
    /// another owner, returns that owner's service name (`""` for the node), whose readers
    /// see the check go.
    fn put_check(&mut self, row: CheckRow) -> Option<String> {
        let id = row.hc.check_id.clone();
        let owner = row.hc.service_id.clone();
        let mut moved = None;
        if let Some(old) = self.checks.insert(id.clone(), row) {
            if old.hc.service_id != owner {
                self.unlist_check(&old.hc.service_id, &id);
                moved = Some(old.hc.service_name);
            }
        }
        self.checks_of.entry(owner).or_default().insert(id);
        moved
    }

    /// Records a change at `idx` for the readers of a check's former owner (see `put_check`).
    fn touch_moved(&mut self, moved: Option<String>, idx: u64) {
        if let Some(old) = moved {
            let old = (!old.is_empty()).then_some(old);
            self.touch(old.as_deref(), false, true, idx);
        }
    }

    fn take_check(&mut self, id: &str) -> Option<CheckRow> {
        let row = self.checks.remove(id)?;
        self.unlist_check(&row.hc.service_id, id);
        Some(row)
    }

    fn unlist_check(&mut self, owner: &str, id: &str) {
        unlist(&mut self.checks_of, owner, id);
    }

    /// The instances of service `name`, by ID.
    pub fn instances_of<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a ServiceRow> + 'a {
        listed(&self.instances, &self.services, name)
    }

    /// The checks of service instance `service_id` (node-level ones for `""`), by check ID.
    pub fn checks_of<'a>(&'a self, service_id: &str) -> impl Iterator<Item = &'a CheckRow> + 'a {
        listed(&self.checks_of, &self.checks, service_id)
    }

    /// What changed since the last call; `Shared::notify` wakes the watchers of exactly that.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    fn next_index(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// The latest index handed out.
    pub fn index(&self) -> u64 {
        self.index
    }

    fn next_generation(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Records that rows of `service_name` (or node-level rows, for `None`) changed at `idx`.
    fn touch(&mut self, service_name: Option<&str>, services: bool, checks: bool, idx: u64) {
        if services {
            self.services_table = idx;
        }
        if checks {
            self.checks_table = idx;
        }
        match service_name {
            Some(name) => {
                self.by_name.insert(name.to_string(), idx);
                if !self.dirty.all {
                    self.dirty.names.insert(name.to_string());
                }
            }
            None => {
                self.node_checks = idx;
                self.dirty.all = true;
                self.dirty.names.clear();
            }
        }
    }

    /// The `Node` object of reads.
    pub fn node_wire(&self) -> Node {
        let a = &self.node.address;
        Node {
            id: self.node.id.clone(),
            node: self.node.name.clone(),
            address: a.clone(),
            datacenter: self.node.datacenter.clone(),
            tagged_addresses: [("lan", a), ("lan_ipv4", a), ("wan", a), ("wan_ipv4", a)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            meta: self.node.meta.clone(),
            create_index: self.node_create_index,
            modify_index: self.node_create_index.max(self.node_checks),
        }
    }

    /// Index of a `health/service` or `catalog/service` read: the newest change to that
    /// service's rows (node checks included). For a service with no instances, the change
    /// that removed the last one (the agent's first index if it never had any): Consul falls
    /// back to the services table there, which moves with every other service, but then a
    /// read's answer would change without a change to what it can see, and only changes to
    /// the service wake its watchers.
    pub fn service_index(&self, name: &str) -> u64 {
        let own = self
            .by_name
            .get(name)
            .copied()
            .unwrap_or(self.node_create_index);
        if self.instances.contains_key(name) {
            own.max(self.node_checks)
        } else {
            own
        }
    }

    pub fn services_table_index(&self) -> u64 {
        self.services_table
    }

    pub fn checks_table_index(&self) -> u64 {
        self.checks_table.max(self.node_checks)
    }

    pub fn node_index(&self) -> u64 {
        self.services_table.max(self.checks_table_index())
    }

    /// Registers (or replaces) a service and its checks. `checks` carry final IDs and names.
    pub fn register_service(
        &mut self,
        mut svc: NodeService,
        checks: Vec<(CheckDef, Probe, Option<Duration>)>,
        replace_existing_checks: bool,
    ) -> Applied {
        let id = svc.id.clone();
        let name = svc.service.clone();
        let existing = self.services.get(&id).map(|r| &r.svc);
        let old_name = existing.map(|s| s.service.clone());
        let existing_create = existing.map(|s| s.create_index);
        let same_service = existing.is_some_and(|old| {
            let mut a = old.clone();
            a.create_index = 0;
            a.modify_index = 0;
            a == svc
        });
        let mut pending_idx: Option<u64> = None;
        let mut idx = |store: &mut Store| *pending_idx.get_or_insert_with(|| store.next_index());
        let mut changed_checks = false;
        let mut changed_service = false;

        if !same_service {
            let i = idx(self);
            svc.create_index = existing_create.unwrap_or(i);
            svc.modify_index = i;
            self.put_service(ServiceRow {
                svc,
                catalog_only: false,
            });
            changed_service = true;
        }
        let tags = self
            .services
            .get(&id)
            .map(|r| r.svc.tags.clone())
            .unwrap_or_default();

        let mut new_runners = Vec::new();
        let mut keep = Vec::new();
        for (def, probe, deregister_after) in checks {
            keep.push(def.id.clone());
            let old = self.checks.get(&def.id);
            let unchanged = old.is_some_and(|o| {
                o.probe == probe
                    && o.hc.service_id == id
                    && o.hc.name == def.name
                    && o.hc.notes == def.notes
                    && o.hc.service_tags == tags
                    && o.deregister_after == deregister_after
            });
            if unchanged {
                continue;
            }
            let i = idx(self);
            let service = (id.clone(), name.clone(), tags.clone());
            let row = self.check_row(&def, &probe, deregister_after, service, i);
            let generation = row.generation;
            let moved = self.put_check(row);
            self.touch_moved(moved, i);
            new_runners.push((def.id.clone(), generation, probe));
            changed_checks = true;
        }
        if replace_existing_checks {
            let stale: Vec<String> = self
                .checks_of(&id)
                .map(|c| &c.hc.check_id)
                .filter(|cid| !keep.contains(cid))
                .cloned()
                .collect();
            for cid in stale {
                self.take_check(&cid);
                changed_checks = true;
            }
        }
        if changed_checks || changed_service {
            let i = idx(self);
            // A renamed service also changes what the old name's readers see.
            if let Some(old) = old_name.filter(|o| *o != name) {
                self.touch(Some(&old), true, true, i);
            }
            self.touch(Some(&name), changed_service, changed_checks, i);
        }
        Applied {
            changed: changed_checks || changed_service,
            new_runners,
        }
    }

    /// Removes a service and all its checks; false if unknown.
    pub fn deregister_service(&mut self, id: &str) -> bool {
        let Some(row) = self.services.get(id).filter(|r| !r.catalog_only) else {
            return false;
        };
        let name = row.svc.service.clone();
        self.services.remove(id);
        self.unlist_instance(&name, id);
        let checks: Vec<String> = self.checks_of(id).map(|c| c.hc.check_id.clone()).collect();
        for cid in checks {
            self.take_check(&cid);
        }
        let i = self.next_index();
        self.touch(Some(&name), true, true, i);
        true
    }

    /// Sets a check's status and output. Only a status change takes an index (and wakes
    /// watchers); new output alone is stored quietly, as Consul defers syncing output.
    /// Returns whether watchers must be woken.
    pub fn set_status(&mut self, check_id: &str, status: &str, output: String) -> bool {
        let Some(row) = self.checks.get_mut(check_id) else {
            return false;
        };
        // A TTL kept alive with the same output (the usual heartbeat) keeps its encoding.
        if row.hc.output != output {
            row.hc_mut().output = output;
        }
        if row.hc.status == status {
            return false;
        }
        row.hc_mut().status = status.to_string();
        row.critical_since = (status == CRITICAL).then(Instant::now);
        let service = (!row.hc.service_name.is_empty()).then(|| row.hc.service_name.clone());
        let i = self.next_index();
        if let Some(row) = self.checks.get_mut(check_id) {
            row.hc_mut().modify_index = i;
        }
        self.touch(service.as_deref(), false, true, i);
        true
    }

    /// Adds a synthetic critical check (maintenance mode); false if it already exists.
    pub fn add_static_check(&mut self, hc: HealthCheck) -> bool {
        if self.checks.contains_key(&hc.check_id) {
            return false;
        }
        let i = self.next_index();
        let service = (!hc.service_name.is_empty()).then(|| hc.service_name.clone());
        self.put_check(CheckRow::fixed(HealthCheck {
            create_index: i,
            modify_index: i,
            ..hc
        }));
        self.touch(service.as_deref(), false, true, i);
        true
    }

    /// Registers a check on its own (`/v1/agent/check/register`).
    pub fn register_check(
        &mut self,
        def: CheckDef,
        probe: Probe,
        deregister_after: Option<Duration>,
    ) -> Applied {
        let (service_id, service_name, tags) = match self.services.get(&def.service_id) {
            Some(r) => (r.svc.id.clone(), r.svc.service.clone(), r.svc.tags.clone()),
            None => (String::new(), String::new(), Vec::new()),
        };
        let i = self.next_index();
        let service = (service_id, service_name.clone(), tags);
        let row = self.check_row(&def, &probe, deregister_after, service, i);
        let generation = row.generation;
        let moved = self.put_check(row);
        self.touch_moved(moved, i);
        let service = (!service_name.is_empty()).then_some(service_name);
        self.touch(service.as_deref(), false, true, i);
        Applied {
            changed: true,
            new_runners: vec![(def.id, generation, probe)],
        }
    }

    /// A new row for check `def` at index `i`, for the service `(id, name, tags)` (empty for a
    /// node check). A check that already exists under the ID keeps its live status, output and
    /// creation index: re-registering must not flap a passing check back to critical.
    fn check_row(
        &mut self,
        def: &CheckDef,
        probe: &Probe,
        deregister_after: Option<Duration>,
        (service_id, service_name, service_tags): (String, String, Vec<String>),
        i: u64,
    ) -> CheckRow {
        let (status, output, critical_since, create) = match self.checks.get(&def.id) {
            Some(o) => (
                o.hc.status.clone(),
                o.hc.output.clone(),
                o.critical_since,
                o.hc.create_index,
            ),
            None => {
                let st = if def.status.is_empty() {
                    CRITICAL.to_string()
                } else {
                    def.status.clone()
                };
                let since = (st == CRITICAL).then(Instant::now);
                (st, String::new(), since, i)
            }
        };
        let (kind, interval, timeout) = check_kind(probe, def);
        let ttl_deadline = match probe {
            Probe::Ttl(ttl) => Some(watch::channel(Instant::now() + *ttl).0),
            _ => None,
        };
        CheckRow {
            element: OnceLock::new(),
            hc: HealthCheck {
                node: self.node.name.clone(),
                check_id: def.id.clone(),
                name: def.name.clone(),
                status,
                notes: def.notes.clone(),
                output,
                service_id,
                service_name,
                service_tags,
                kind: kind.into(),
                interval,
                timeout,
                exposed_port: 0,
                definition: check_definition_json(def),
                create_index: create,
                modify_index: i,
            },
            probe: probe.clone(),
            generation: self.next_generation(),
            runner: None,
            ttl_deadline,
            critical_since,
            deregister_after,
            // Consul's agent-wide `check_output_max_size` (4096 by default) is a ceiling: a
            // check's `OutputMaxSize` can only lower it.
            output_max: if def.output_max_size > 0 {
                (def.output_max_size as usize).min(DEFAULT_OUTPUT_MAX)
            } else {
                DEFAULT_OUTPUT_MAX
            },
        }
    }

    /// Removes a check; false if unknown.
    pub fn remove_check(&mut self, check_id: &str) -> bool {
        let Some(row) = self.take_check(check_id) else {
            return false;
        };
        let service = (!row.hc.service_name.is_empty()).then(|| row.hc.service_name.clone());
        let i = self.next_index();
        self.touch(service.as_deref(), false, true, i);
        true
    }

    /// Services whose reaping deadline has passed.
    pub fn reapable(&self, now: Instant) -> Vec<String> {
        let mut out: Vec<String> = self
            .checks
            .values()
            .filter_map(|c| {
                let after = c.deregister_after?;
                let since = c.critical_since?;
                (c.hc.status == CRITICAL && now.duration_since(since) >= after)
                    .then(|| c.hc.service_id.clone())
            })
            .filter(|id| !id.is_empty())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Node-level checks, then the service's checks, as Consul lists them in an entry.
    pub fn entry_checks(&self, service_id: &str) -> Vec<HealthCheck> {
        self.checks_of("")
            .chain(self.checks_of(service_id))
            .map(|c| c.hc.clone())
            .collect()
    }
}

/// A secondary index: a key (service name, service ID) to the IDs of rows in a table.
type Listing = HashMap<String, BTreeSet<String>>;

/// Removes `id` from `key`'s entry, dropping the entry when it empties.
fn unlist(index: &mut Listing, key: &str, id: &str) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

/// The rows of `table` listed under `key`, in ID order.
fn listed<'a, T>(
    index: &'a Listing,
    table: &'a BTreeMap<String, T>,
    key: &str,
) -> impl Iterator<Item = &'a T> + 'a {
    index
        .get(key)
        .into_iter()
        .flatten()
        .filter_map(|id| table.get(id))
}

/// Consul's `Proxy` object of a non-proxy service.
pub(crate) fn default_proxy() -> Value {
    json!({"Mode": "", "MeshGateway": {}, "Expose": {}})
}

/// `Type`, `Interval` and `Timeout` as reads show them.
fn check_kind(probe: &Probe, def: &CheckDef) -> (&'static str, String, String) {
    let fmt = |d: std::time::Duration| {
        if d.is_zero() {
            String::new()
        } else {
            crate::duration::format(d)
        }
    };
    match probe {
        Probe::Static => ("", String::new(), String::new()),
        Probe::Ttl(_) => ("ttl", String::new(), String::new()),
        Probe::Http(_) => ("http", fmt(def.interval), fmt(def.timeout)),
        Probe::Tcp(_) => ("tcp", fmt(def.interval), fmt(def.timeout)),
    }
}

/// `Definition` of a check row: the probe settings, zero values omitted.
fn check_definition_json(def: &CheckDef) -> Value {
    let mut m = serde_json::Map::new();
    let mut s = |k: &str, v: &str| {
        if !v.is_empty() {
            m.insert(k.into(), Value::String(v.into()));
        }
    };
    s("HTTP", &def.http);
    s("TCP", &def.tcp);
    s("Method", &def.method);
    s("Body", &def.body);
    s("TLSServerName", &def.tls_server_name);
    for (k, d) in [
        ("Interval", def.interval),
        ("Timeout", def.timeout),
        ("TTL", def.ttl),
        (
            "DeregisterCriticalServiceAfter",
            def.deregister_critical_service_after,
        ),
    ] {
        if !d.is_zero() {
            m.insert(k.into(), Value::String(crate::duration::format(d)));
        }
    }
    if !def.header.is_empty() {
        m.insert("Header".into(), json!(def.header));
    }
    if def.tls_skip_verify {
        m.insert("TLSSkipVerify".into(), Value::Bool(true));
    }
    if def.disable_redirects {
        m.insert("DisableRedirects".into(), Value::Bool(true));
    }
    Value::Object(m)
}

/// Adds Consul's automatic `lan_ipv4`/`wan_ipv4` (or `_ipv6`) tagged addresses for an IP
/// literal address, leaving keys the registration set.
pub(crate) fn auto_tagged_addresses(svc: &mut NodeService) {
    let Ok(ip) = svc.address.parse::<std::net::IpAddr>() else {
        return;
    };
    let (lan, wan) = if ip.is_ipv4() {
        ("lan_ipv4", "wan_ipv4")
    } else {
        ("lan_ipv6", "wan_ipv6")
    };
    for key in [lan, wan] {
        svc.tagged_addresses
            .entry(key.to_string())
            .or_insert_with(|| ServiceAddress {
                address: svc.address.clone(),
                port: svc.port,
            });
    }
}

/// Weights to store: Consul fills `{1, 1}` when omitted.
pub(crate) fn weights_or_default(w: Option<Weights>) -> Weights {
    w.unwrap_or_default()
}
