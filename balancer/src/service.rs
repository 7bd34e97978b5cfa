//! A routed service: the snapshot of its healthy instances, swapped whole when discovery
//! reports a change, and round-robin selection over it without locks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use discovery::watch::Snapshot;
use discovery::Instance;

use crate::metrics::ServiceMetrics;
use crate::upstream::Backend;

/// The instances a service routes to at one moment. Immutable; replaced, never edited.
#[derive(Debug, Default)]
pub struct Backends {
    /// Sorted by instance ID.
    pub list: Vec<Arc<Backend>>,
    /// Consul index of the discovery answer this was built from.
    pub index: u64,
}

/// One routed service.
pub struct ServiceState {
    pub name: String,
    /// Swapped by the discovery task; read lock-free by every request.
    backends: ArcSwap<Backends>,
    /// Round-robin position. Starts at a random offset so that several balancers in front of
    /// the same instances do not move in step.
    next: AtomicUsize,
    pub metrics: ServiceMetrics,
    /// Discovery updates applied.
    pub updates: std::sync::atomic::AtomicU64,
    /// Whether a discovery answer has arrived at all.
    pub ready: std::sync::atomic::AtomicBool,
    idle_timeout: Duration,
    epoch: Instant,
}

impl std::fmt::Debug for ServiceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceState")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ServiceState {
    pub fn new(name: impl Into<String>, idle_timeout: Duration) -> Self {
        Self {
            name: name.into(),
            backends: ArcSwap::from_pointee(Backends::default()),
            next: AtomicUsize::new(rand::random::<u16>() as usize),
            metrics: ServiceMetrics::default(),
            updates: Default::default(),
            ready: Default::default(),
            idle_timeout,
            epoch: Instant::now(),
        }
    }

    /// The current snapshot.
    pub fn backends(&self) -> Arc<Backends> {
        self.backends.load_full()
    }

    /// Applies a discovery snapshot: instances that stay keep their `Backend` (pool,
    /// counters, ejection); new ones get a fresh one; gone ones are dropped.
    pub fn apply(&self, snapshot: &Snapshot) {
        let current = self.backends.load();
        // Keyed by ID *and* address: service IDs are unique per Consul agent only, so two
        // nodes may both register `web`.
        let mut known: HashMap<(&str, String), &Arc<Backend>> = current
            .list
            .iter()
            .map(|b| ((b.instance.id.as_str(), b.authority.clone()), b))
            .collect();
        let list: Vec<Arc<Backend>> = snapshot
            .instances
            .iter()
            .map(
                |inst| match known.remove(&(inst.id.as_str(), inst.authority())) {
                    Some(b) if b.instance == *inst => Arc::clone(b),
                    _ => Arc::new(Backend::new(inst.clone(), self.idle_timeout, self.epoch)),
                },
            )
            .collect();
        let ids: Vec<&str> = list.iter().map(|b| b.instance.id.as_str()).collect();
        // The watcher already logs the change at info.
        tracing::debug!(service = %self.name, index = snapshot.index, instances = ?ids, "routing table updated");
        self.backends.store(Arc::new(Backends {
            list,
            index: snapshot.index,
        }));
        self.updates.fetch_add(1, Ordering::Relaxed);
        self.ready.store(true, Ordering::Release);
    }

    /// Replaces the instances with a fixed list (tests, static routes).
    pub fn set_static(&self, instances: Vec<Instance>) {
        self.apply(&Snapshot {
            service: self.name.clone(),
            instances: instances.into(),
            index: 1,
        });
    }

    /// Round robin: the next instance not yet `tried` and not ejected; if every untried
    /// instance is ejected, the next untried one anyway, since a possible answer beats a
    /// certain 502.
    pub fn pick(&self, backends: &Backends, tried: &[usize]) -> Option<usize> {
        let n = backends.list.len();
        if n == 0 || tried.len() >= n {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = (0..n)
            .map(|k| (start.wrapping_add(k)) % n)
            .filter(|i| !tried.contains(i));
        let mut fallback = None;
        for i in candidates {
            if !backends.list[i].is_ejected() {
                return Some(i);
            }
            fallback.get_or_insert(i);
        }
        fallback
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// An instance `id` of `web` at 127.0.0.1:1 (also for the dashboard's tests).
    pub(crate) fn inst(id: &str) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            address: "127.0.0.1".into(),
            port: 1,
            tags: vec![],
            meta: Default::default(),
            weights: (1, 1),
        }
    }

    #[test]
    fn round_robin_visits_every_instance_once_per_cycle() {
        let s = ServiceState::new("web", Duration::from_secs(30));
        s.set_static(vec![inst("a"), inst("b"), inst("c")]);
        let b = s.backends();
        for _ in 0..10 {
            let mut seen: Vec<usize> = (0..3).map(|_| s.pick(&b, &[]).unwrap()).collect();
            seen.sort();
            assert_eq!(seen, vec![0, 1, 2]);
        }
    }

    #[test]
    fn skips_tried_and_ejected() {
        let s = ServiceState::new("web", Duration::from_secs(30));
        s.set_static(vec![inst("a"), inst("b"), inst("c")]);
        let b = s.backends();
        b.list[1].record_connect_failure();
        for _ in 0..6 {
            assert_ne!(s.pick(&b, &[]), Some(1));
        }
        assert_eq!(
            s.pick(&b, &[0, 2]),
            Some(1),
            "ejected is still better than nothing"
        );
        assert_eq!(s.pick(&b, &[0, 1, 2]), None);
    }

    #[test]
    fn apply_keeps_state_of_instances_that_stay() {
        let s = ServiceState::new("web", Duration::from_secs(30));
        s.set_static(vec![inst("a"), inst("b")]);
        let a1 = Arc::clone(&s.backends().list[0]);
        s.set_static(vec![inst("a"), inst("c")]);
        let b = s.backends();
        assert!(Arc::ptr_eq(&a1, &b.list[0]));
        assert_eq!(b.list[1].instance.id, "c");
        assert_eq!(s.updates.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn same_id_on_two_nodes_are_two_backends() {
        let s = ServiceState::new("web", Duration::from_secs(30));
        let mut other = inst("a");
        other.port = 2;
        s.set_static(vec![inst("a"), other.clone()]);
        let first = s.backends();
        assert_eq!(first.list.len(), 2);
        assert!(!Arc::ptr_eq(&first.list[0], &first.list[1]));
        s.set_static(vec![inst("a"), other]);
        let second = s.backends();
        assert!(Arc::ptr_eq(&first.list[0], &second.list[0]));
        assert!(Arc::ptr_eq(&first.list[1], &second.list[1]));
    }

    #[test]
    fn empty_service_picks_nothing() {
        let s = ServiceState::new("web", Duration::from_secs(30));
        assert_eq!(s.pick(&s.backends(), &[]), None);
    }
}
