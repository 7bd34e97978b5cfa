//! The route table: every route from `--service` flags and from service tags in one immutable
//! snapshot, swapped whole when discovery changes it; and the [`Router`] that builds the next
//! snapshot from discovery's view.
//!
//! # Which route wins
//!
//! - A route naming the request's host (`Host`, case-insensitive, port ignored) beats every
//!   route without a host; among routes of the same kind the longest path prefix wins, on
//!   `/` boundaries (`/api` takes `/api` and `/api/x`, not `/apix`).
//! - Two services claiming the same host and prefix: the older route wins, and keeps winning
//!   while it exists. `--service` flags are older than any tag (in the order given); tag
//!   routes are ordered by when the balancer first saw them. The loser is logged once, at
//!   WARN, and listed nowhere else; it takes over if the winner's route goes away.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use discovery::watch::catalog::CatalogView;
use discovery::watch::Snapshot;

use crate::config::{parse_tag, strip_target, Config, Route};
use crate::service::ServiceState;

/// One route of the table and the service it sends to.
#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub route: Route,
    pub service: Arc<ServiceState>,
    /// From a service tag rather than a `--service` flag.
    pub from_tag: bool,
    /// Order of first appearance; the lower wins a conflict.
    pub seq: u64,
}

/// Every route at one moment. Immutable: discovery builds the next one aside and swaps it in.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Sorted by host, then prefix.
    pub entries: Vec<RouteEntry>,
    /// Routes without a host: prefix → index in `entries`.
    any: HashMap<String, usize>,
    /// Routes with a host: host → prefix → index in `entries`.
    hosts: HashMap<String, HashMap<String, usize>>,
    /// Every service with a route, by name.
    pub services: BTreeMap<String, Arc<ServiceState>>,
}

/// A route that lost a conflict, and the service that holds the route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub route: Route,
    pub winner: String,
}

impl RouteTable {
    /// Healthy instances over every routed service.
    pub fn instance_count(&self) -> usize {
        self.services
            .values()
            .map(|s| s.backends().list.len())
            .sum()
    }

    /// Builds the table from `candidates`; on a conflict the lower `seq` wins.
    pub fn build(mut candidates: Vec<RouteEntry>) -> (Self, Vec<Conflict>) {
        candidates.sort_by_key(|e| e.seq);
        let mut t = RouteTable::default();
        let mut conflicts = Vec::new();
        let mut taken: HashMap<(Option<String>, String), String> = HashMap::new();
        for e in candidates {
            t.services
                .entry(e.service.name.clone())
                .or_insert_with(|| Arc::clone(&e.service));
            let key = (e.route.host.clone(), e.route.prefix.clone());
            if let Some(winner) = taken.get(&key) {
                // The same route announced twice by one service (two tags, or a flag and a
                // tag) is no conflict.
                if *winner != e.route.service {
                    conflicts.push(Conflict {
                        route: e.route,
                        winner: winner.clone(),
                    });
                }
                continue;
            }
            taken.insert(key, e.route.service.clone());
            t.entries.push(e);
        }
        t.entries.sort_by(|a, b| {
            (&a.route.host, &a.route.prefix).cmp(&(&b.route.host, &b.route.prefix))
        });
        for (i, e) in t.entries.iter().enumerate() {
            let map = match &e.route.host {
                Some(h) => t.hosts.entry(h.clone()).or_default(),
                None => &mut t.any,
            };
            map.insert(e.route.prefix.clone(), i);
        }
        (t, conflicts)
    }

    /// The route for a request to `host` (the `Host` header or `:authority`, as sent) and
    /// `path` (without the query).
    pub fn lookup(&self, host: Option<&[u8]>, path: &str) -> Option<&RouteEntry> {
        if !self.hosts.is_empty() {
            if let Some(map) = host.and_then(host_key).and_then(|h| self.hosts.get(&*h)) {
                if let Some(i) = longest(map, path) {
                    return Some(&self.entries[i]);
                }
            }
        }
        longest(&self.any, path).map(|i| &self.entries[i])
    }

    /// The route for a request to `host` with request target `target` (origin form, query
    /// included), and the target to send on: with the route's `strip` prefix removed. The one
    /// place both request paths (fast and hyper) route and rewrite.
    pub fn resolve<'a>(
        &'a self,
        host: Option<&[u8]>,
        target: &'a str,
    ) -> Option<(&'a RouteEntry, Cow<'a, str>)> {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        let e = self.lookup(host, path)?;
        let target = match &e.route.strip {
            Some(p) => strip_target(target, p),
            None => Cow::Borrowed(target),
        };
        Some((e, target))
    }

    /// The state of service `name`, if routed.
    pub fn service(&self, name: &str) -> Option<&Arc<ServiceState>> {
        self.services.get(name)
    }

    /// The routes of service `name`, as people write them.
    pub fn routes_of(&self, name: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.service.name == name)
            .map(|e| e.route.display())
            .collect()
    }
}

/// The longest prefix of `path` on a `/` boundary that `map` holds, `/` last.
fn longest(map: &HashMap<String, usize>, path: &str) -> Option<usize> {
    if map.is_empty() {
        return None;
    }
    let mut end = path.len();
    loop {
        let candidate = if end == 0 { "/" } else { &path[..end] };
        if let Some(i) = map.get(candidate) {
            return Some(*i);
        }
        if end == 0 {
            return None;
        }
        end = path[..end].rfind('/').unwrap_or(0);
    }
}

/// A `Host` value as a table key: without its port or a trailing dot, lower case.
fn host_key(raw: &[u8]) -> Option<Cow<'_, str>> {
    let raw = std::str::from_utf8(raw).ok()?.trim();
    let host = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |i| &raw[..=i])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// Builds route tables from discovery's views. Owned by the discovery task.
pub struct Router {
    flags: Vec<Route>,
    tag_prefix: Option<String>,
    idle_timeout: Duration,
    /// Every service state alive, by name; flag services never leave.
    states: HashMap<String, Arc<ServiceState>>,
    /// Order of first appearance of each tag route (flags take 0..n).
    seq: HashMap<Route, u64>,
    next_seq: u64,
    /// The snapshots applied last, per service.
    applied: BTreeMap<String, Arc<Snapshot>>,
    /// Per service, the tag routes read from the snapshot in `applied`.
    tag_routes: HashMap<String, Vec<Route>>,
    /// Bad tags and lost conflicts already logged, so each is logged once.
    reported: HashSet<String>,
    /// Routes are logged at INFO once the first full catalog has been read; the routes of
    /// that first read are summed up in one line.
    synced: bool,
    /// Each route as last logged: (host, prefix) → (service, instances). The service states
    /// are shared by the old and the new table, so the old table cannot tell what changed.
    logged: HashMap<(Option<String>, String), (String, usize)>,
}

impl Router {
    /// A router for `config`, reusing the service states of `initial` (the table built by
    /// [`Router::initial`]).
    pub fn new(config: &Config, initial: &RouteTable) -> Self {
        let n = config.routes.len() as u64;
        Self {
            flags: config.routes.clone(),
            tag_prefix: config.tag_prefix.clone(),
            idle_timeout: config.pool_idle_timeout,
            states: initial
                .services
                .iter()
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect(),
            seq: HashMap::new(),
            next_seq: n,
            applied: BTreeMap::new(),
            tag_routes: HashMap::new(),
            reported: HashSet::new(),
            synced: false,
            logged: HashMap::new(),
        }
    }

    /// The table of the `--service` flags alone, before discovery said anything.
    pub fn initial(config: &Config) -> RouteTable {
        let mut states: HashMap<String, Arc<ServiceState>> = HashMap::new();
        let entries = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| RouteEntry {
                route: r.clone(),
                service: Arc::clone(states.entry(r.service.clone()).or_insert_with(|| {
                    Arc::new(ServiceState::new(
                        r.service.clone(),
                        config.pool_idle_timeout,
                    ))
                })),
                from_tag: false,
                seq: i as u64,
            })
            .collect();
        RouteTable::build(entries).0
    }

    /// Applies `view`: services whose snapshot changed get it; routes are rebuilt when any
    /// service changed. Returns the new table, or `None` when nothing changed.
    pub fn apply(&mut self, view: &CatalogView) -> Option<RouteTable> {
        let mut changed: Vec<String> = Vec::new();
        for (name, snap) in &view.services {
            if self.applied.get(name).is_some_and(|a| Arc::ptr_eq(a, snap)) {
                continue;
            }
            let state = self
                .states
                .entry(name.clone())
                .or_insert_with(|| Arc::new(ServiceState::new(name.clone(), self.idle_timeout)));
            state.apply(snap);
            self.applied.insert(name.clone(), Arc::clone(snap));
            let routes = self.read_tags(name, snap);
            self.tag_routes.insert(name.clone(), routes);
            changed.push(name.clone());
        }
        let gone: Vec<String> = self
            .applied
            .keys()
            .filter(|n| !view.services.contains_key(*n))
            .cloned()
            .collect();
        for name in &gone {
            self.applied.remove(name);
            self.tag_routes.remove(name);
            if !self.flags.iter().any(|r| r.service == *name) {
                self.states.remove(name);
            }
        }
        let first_sync = view.synced && !self.synced;
        if changed.is_empty() && gone.is_empty() && !first_sync {
            return None;
        }
        let table = self.build();
        self.log_changes(&table, first_sync);
        self.synced |= view.synced;
        Some(table)
    }

    /// The tag routes of `name` in `snap`: its instances' tags, each read once.
    fn read_tags(&mut self, name: &str, snap: &Snapshot) -> Vec<Route> {
        let Some(prefix) = self.tag_prefix.as_deref() else {
            return Vec::new();
        };
        let mut tags: Vec<&str> = snap
            .instances
            .iter()
            .flat_map(|i| i.tags.iter().map(String::as_str))
            .collect();
        tags.sort_unstable();
        tags.dedup();
        let mut routes = Vec::new();
        for tag in tags {
            match parse_tag(tag, prefix, name) {
                None => {}
                Some(Ok(t)) => {
                    for why in &t.ignored {
                        if self.reported.insert(format!("{name}\u{0}{tag}\u{0}{why}")) {
                            tracing::warn!(service = %name, tag, option = %why, "route tag option ignored");
                        }
                    }
                    routes.push(t.route);
                }
                Some(Err(why)) if self.reported.insert(format!("{name}\u{0}{tag}")) => {
                    tracing::warn!(service = %name, tag, reason = %why, "route tag ignored");
                }
                Some(Err(_)) => {}
            }
        }
        routes
    }

    fn build(&mut self) -> RouteTable {
        let mut candidates: Vec<RouteEntry> = Vec::new();
        for (i, r) in self.flags.iter().enumerate() {
            if let Some(s) = self.states.get(&r.service) {
                candidates.push(RouteEntry {
                    route: r.clone(),
                    service: Arc::clone(s),
                    from_tag: false,
                    seq: i as u64,
                });
            }
        }
        let mut live: HashSet<&Route> = HashSet::new();
        for (name, routes) in &self.tag_routes {
            let Some(s) = self.states.get(name) else {
                continue;
            };
            for r in routes {
                let seq = *self.seq.entry(r.clone()).or_insert_with(|| {
                    self.next_seq += 1;
                    self.next_seq
                });
                live.insert(r);
                candidates.push(RouteEntry {
                    route: r.clone(),
                    service: Arc::clone(s),
                    from_tag: true,
                    seq,
                });
            }
        }
        // A route that went away and comes back later is a new route.
        self.seq.retain(|r, _| live.contains(r));
        let (table, conflicts) = RouteTable::build(candidates);
        for c in conflicts {
            if self.reported.insert(format!(
                "{}\u{0}{}\u{0}conflict",
                c.route.display(),
                c.route.service
            )) {
                tracing::warn!(route = %c.route.display(), service = %c.route.service, held_by = %c.winner,
                    "route already held by an older route; ignored while that one exists");
            }
        }
        table
    }

    /// One line per route that appeared, went, or changed its instance count; at DEBUG
    /// until the first full catalog read, which is summed up in one INFO line.
    fn log_changes(&mut self, new: &RouteTable, first_sync: bool) {
        let quiet = !self.synced;
        let mut now = HashMap::with_capacity(new.entries.len());
        for e in &new.entries {
            let key = (e.route.host.clone(), e.route.prefix.clone());
            let val = (e.service.name.clone(), e.service.backends().list.len());
            if self.logged.remove(&key).as_ref() != Some(&val) {
                if quiet {
                    tracing::debug!(route = %e.route.display(), service = %val.0, instances = val.1, "route");
                } else {
                    tracing::info!(route = %e.route.display(), service = %val.0, instances = val.1, "route updated");
                }
            }
            now.insert(key, val);
        }
        // What is left was not in the new table.
        for ((host, prefix), (service, _)) in std::mem::replace(&mut self.logged, now) {
            tracing::info!(route = %format!("{}{prefix}", host.as_deref().unwrap_or("")), service = %service, "route removed");
        }
        if first_sync {
            tracing::info!(
                routes = new.entries.len(),
                services = new.services.len(),
                instances = new.instance_count(),
                "routes ready"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use discovery::Instance;

    fn state(name: &str) -> Arc<ServiceState> {
        Arc::new(ServiceState::new(name, Duration::from_secs(30)))
    }

    fn entry(spec: &str, seq: u64) -> RouteEntry {
        let route = Route::parse(spec).unwrap();
        RouteEntry {
            service: state(&route.service),
            route,
            from_tag: false,
            seq,
        }
    }

    fn table(specs: &[&str]) -> RouteTable {
        let entries = specs
            .iter()
            .enumerate()
            .map(|(i, s)| entry(s, i as u64))
            .collect();
        RouteTable::build(entries).0
    }

    fn svc<'a>(t: &'a RouteTable, host: &str, path: &str) -> Option<&'a str> {
        t.lookup(Some(host.as_bytes()), path)
            .map(|e| e.service.name.as_str())
    }

    #[test]
    fn host_routes_beat_hostless_and_longest_prefix_wins() {
        let t = table(&[
            "web",
            "api=/api",
            "v2=/api/v2",
            "shop=Shop.example.com/",
            "shopapi=shop.example.com/api",
        ]);
        assert_eq!(svc(&t, "other", "/"), Some("web"));
        assert_eq!(svc(&t, "other", "/apix"), Some("web"));
        assert_eq!(svc(&t, "other", "/api/v2/x"), Some("v2"));
        assert_eq!(svc(&t, "shop.example.com", "/"), Some("shop"));
        // Case and port do not matter; the host's catch-all beats a longer hostless prefix.
        assert_eq!(
            svc(&t, "SHOP.example.com:8080", "/api/v2/x"),
            Some("shopapi")
        );
        assert_eq!(svc(&t, "shop.example.com.", "/apix"), Some("shop"));
        assert_eq!(t.lookup(None, "/api").unwrap().service.name, "api");
    }

    #[test]
    fn without_a_match_there_is_no_route() {
        let t = table(&["api=/api", "h=a.example/x"]);
        assert!(t.lookup(Some(b"a.example"), "/y").is_none());
        assert!(t.lookup(Some(b"b.example"), "/x").is_none());
        assert_eq!(svc(&t, "[::1]:80", "/api/"), Some("api"));
    }

    #[test]
    fn older_route_wins_a_conflict() {
        let (t, conflicts) = RouteTable::build(vec![entry("b=/x", 7), entry("a=/x", 3)]);
        assert_eq!(svc(&t, "h", "/x"), Some("a"));
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].winner, "a");
        assert_eq!(conflicts[0].route.service, "b");
    }

    fn snap(service: &str, tags: &[&[&str]]) -> Arc<Snapshot> {
        let instances: Vec<Instance> = tags
            .iter()
            .enumerate()
            .map(|(i, t)| Instance {
                id: format!("{service}-{i}"),
                service: service.into(),
                address: "127.0.0.1".into(),
                port: 1000 + i as u16,
                tags: t.iter().map(|s| s.to_string()).collect(),
                meta: Default::default(),
                weights: (1, 1),
            })
            .collect();
        Arc::new(Snapshot {
            service: service.into(),
            instances: instances.into(),
            index: 1,
        })
    }

    #[test]
    fn router_reads_tags_and_keeps_the_older_route() {
        let cfg = Config::with_tags(
            vec![Route::parse("web=/").unwrap()],
            Some("urlprefix-".into()),
        )
        .unwrap();
        let initial = Router::initial(&cfg);
        let mut r = Router::new(&cfg, &initial);
        let mut view = CatalogView {
            services: BTreeMap::new(),
            synced: true,
        };
        view.services.insert("web".into(), snap("web", &[&[]]));
        view.services.insert(
            "pagos".into(),
            snap(
                "pagos",
                &[&["urlprefix-/pagos", "other"], &["urlprefix-/pagos"]],
            ),
        );
        view.services.insert(
            "ui".into(),
            snap(
                "ui",
                &[&["urlprefix-/ui strip=/ui proto=http", "urlprefix-nopath"]],
            ),
        );
        let t1 = r.apply(&view).unwrap();
        assert_eq!(svc(&t1, "h", "/pagos/1"), Some("pagos"));
        let ui = t1.lookup(None, "/ui/app.js").unwrap();
        assert_eq!(ui.route.strip.as_deref(), Some("/ui"));
        assert_eq!(svc(&t1, "h", "/x"), Some("web"));
        assert_eq!(t1.service("pagos").unwrap().backends().list.len(), 2);
        assert!(r.apply(&view).is_none(), "no change, no new table");

        // A newer service claims /pagos: the older route keeps it.
        view.services
            .insert("pagos2".into(), snap("pagos2", &[&["urlprefix-/pagos"]]));
        let t2 = r.apply(&view).unwrap();
        assert_eq!(svc(&t2, "h", "/pagos"), Some("pagos"));
        // The tag goes from pagos: pagos2 takes over; pagos is unrouted.
        view.services
            .insert("pagos".into(), snap("pagos", &[&["other"]]));
        let t3 = r.apply(&view).unwrap();
        assert_eq!(svc(&t3, "h", "/pagos"), Some("pagos2"));
        assert!(t3.service("pagos").is_none());
        // A service gone from the view takes its routes along; flags stay.
        view.services.clear();
        let t4 = r.apply(&view).unwrap();
        assert_eq!(svc(&t4, "h", "/pagos"), Some("web"));
        assert!(t4.service("web").is_some());
    }

    #[test]
    fn strip_rewrites_the_target() {
        let t = table(&["ui=/ui,strip", "api=h.example/api,strip=/api/v1", "web"]);
        let (e, to) = t.resolve(None, "/ui/a?q=/ui").unwrap();
        assert_eq!((e.service.name.as_str(), &*to), ("ui", "/a?q=/ui"));
        let (_, to) = t.resolve(Some(b"h.example"), "/api/v1/x").unwrap();
        assert_eq!(to, "/x");
        let (_, to) = t.resolve(Some(b"h.example"), "/api/v2").unwrap();
        assert_eq!(to, "/api/v2", "a path outside strip= goes on as it came");
        let (_, to) = t.resolve(None, "/x?y").unwrap();
        assert_eq!(to, "/x?y");
        assert_eq!(strip_target("/ui/app.js?x=1", "/ui"), "/app.js?x=1");
        assert_eq!(strip_target("/ui", "/ui"), "/");
        assert_eq!(strip_target("/ui?x", "/ui"), "/?x");
        assert_eq!(strip_target("/uix", "/ui"), "/uix");
        assert_eq!(strip_target("/a/b", "/"), "/a/b");
    }
}
