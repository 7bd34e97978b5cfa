//! What the dashboard shows beyond the live counters: each instance's traffic over the last
//! minute and a timeline of changes (instance added, removed, ejected, recovered; discovery
//! stale or fresh again).
//!
//! Nothing here runs on the request path. A sampler task reads the counters the request path
//! already keeps, once a second and right after each discovery update, and diffs them with
//! what it saw before. The page itself (`assets/`) is compiled into the binary and polls
//! `/status` every second.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::upstream::Backend;
use crate::App;

/// The dashboard page and its assets, compiled in: it works offline and needs no CDN.
pub const PAGE_HTML: &str = include_str!("../assets/dashboard.html");
pub const PAGE_JS: &str = include_str!("../assets/dashboard.js");
pub const PAGE_CSS: &str = include_str!("../assets/dashboard.css");

/// How often the sampler looks at the counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The window of the request rates and of the "recently removed" list.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Samples kept per instance: one a second over [`WINDOW`], and one more to measure from.
const SAMPLES: usize = 61;
/// Changes kept for the timeline.
const EVENTS: usize = 100;

/// An instance as the sampler keys it: service name, ID and address (IDs are unique per
/// Consul agent only).
type Key = (String, String, String);

/// One look at an instance's counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    requests: u64,
    failures: u64,
}

/// What the sampler remembers of an instance.
#[derive(Debug)]
struct Seen {
    /// While in the snapshot: an ejection between the last look and the removal is still
    /// seen. Released at the look right after the removal (the discovery task wakes the
    /// sampler), so it keeps a removed instance's pool open no longer than that.
    backend: Option<Arc<Backend>>,
    samples: VecDeque<Sample>,
    ejected: bool,
    ejections: u64,
    /// Set when the instance left the snapshot; the entry is dropped a [`WINDOW`] later.
    removed: Option<(Instant, SystemTime)>,
    /// Its counters when it left: requests answered, failures.
    last: (u64, u64),
}

/// One change on the timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: SystemTime,
    pub service: String,
    /// Empty for changes of the service's discovery (stale, fresh).
    pub instance: String,
    pub address: String,
    pub change: &'static str,
}

#[derive(Debug, Default)]
struct Inner {
    instances: HashMap<Key, Seen>,
    events: VecDeque<Event>,
    /// Per service: whether discovery was stale at the last look.
    stale: HashMap<String, bool>,
}

/// The sampler's memory, read by `/status`.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Inner>,
    /// Woken by the discovery tasks right after they swap a snapshot in, so additions and
    /// removals are stamped with their real time rather than the next tick's.
    pub changed: Arc<Notify>,
}

/// An instance's traffic over the last minute, for `/status`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recent {
    /// Requests per second over the window (or over the instance's life, if shorter).
    pub rate: f64,
    pub requests: u64,
    pub failures: u64,
    /// Requests answered in each of the last seconds, oldest first (at most 60).
    pub per_second: Vec<u64>,
}

/// An instance that left the rotation within the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub service: String,
    pub id: String,
    pub address: String,
    pub at: SystemTime,
    /// Requests it answered and attempts that failed, in all.
    pub requests: u64,
    pub failures: u64,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The sampler only ever leaves whole entries behind; a panic elsewhere does not make them
    // wrong.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl History {
    /// Looks at every instance's counters once: records a sample (on `tick`) and turns what
    /// changed since the last look into events.
    pub fn sample(&self, app: &App, tick: bool) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let mut present: Vec<Key> = Vec::new();
        let table = app.routes.load();
        // Past the point where `/status` lists instances, nobody sees per-instance history:
        // keep none, so that a balancer fronting thousands of instances pays nothing for the
        // page (the timeline then records the services' stale and fresh changes only).
        let detailed = table.instance_count() <= crate::admin::STATUS_INSTANCES_MAX;
        if !detailed {
            inner.instances.clear();
        }
        for s in table.services.values() {
            let stale = app
                .catalog
                .as_ref()
                .is_some_and(|w| w.status(&s.name).consecutive_failures > 0);
            let was = inner.stale.entry(s.name.clone()).or_insert(false);
            if stale != *was {
                *was = stale;
                push(
                    &mut inner.events,
                    Event {
                        at: wall,
                        service: s.name.clone(),
                        instance: String::new(),
                        address: String::new(),
                        change: if stale { "stale" } else { "fresh" },
                    },
                );
            }
            if !detailed {
                continue;
            }
            for be in &s.backends().list {
                let key: Key = (s.name.clone(), be.instance.id.clone(), be.authority.clone());
                let sample = Sample {
                    at: now,
                    requests: be.requests(),
                    failures: be.failures.load(Ordering::Relaxed),
                };
                let ejected = be.is_ejected();
                let ejections = be.ejections.load(Ordering::Relaxed);
                let event = |change| Event {
                    at: wall,
                    service: s.name.clone(),
                    instance: key.1.clone(),
                    address: key.2.clone(),
                    change,
                };
                match inner.instances.get_mut(&key) {
                    Some(seen)
                        if seen.removed.is_none()
                            && seen
                                .samples
                                .back()
                                .is_none_or(|l| sample.requests >= l.requests) =>
                    {
                        if ejections > seen.ejections {
                            push(&mut inner.events, event("ejected"));
                            if !ejected {
                                // Ejected and back between two looks.
                                push(&mut inner.events, event("recovered"));
                            }
                        } else if seen.ejected && !ejected {
                            push(&mut inner.events, event("recovered"));
                        }
                        seen.ejected = ejected;
                        seen.ejections = ejections;
                        seen.backend = Some(Arc::clone(be));
                        if tick {
                            seen.samples.push_back(sample);
                            if seen.samples.len() > SAMPLES {
                                seen.samples.pop_front();
                            }
                        }
                    }
                    // New; or back within the window (a restart on the same address), or
                    // removed and added again between two looks (its counters went back to
                    // 0): a new life either way.
                    _ => {
                        push(&mut inner.events, event("added"));
                        inner.instances.insert(
                            key.clone(),
                            Seen {
                                backend: Some(Arc::clone(be)),
                                samples: VecDeque::from([Sample {
                                    // A new instance's counters start at 0 (a new Backend).
                                    at: now,
                                    requests: 0,
                                    failures: 0,
                                }]),
                                ejected,
                                ejections,
                                removed: None,
                                last: (0, 0),
                            },
                        );
                    }
                }
                present.push(key);
            }
        }
        let events = &mut inner.events;
        inner.instances.retain(|key, seen| {
            if present.contains(key) {
                return true;
            }
            match seen.removed {
                None => {
                    seen.removed = Some((now, wall));
                    let event = |change| Event {
                        at: wall,
                        service: key.0.clone(),
                        instance: key.1.clone(),
                        address: key.2.clone(),
                        change,
                    };
                    if let Some(b) = seen.backend.take() {
                        seen.last = (b.requests(), b.failures.load(Ordering::Relaxed));
                        if b.ejections.load(Ordering::Relaxed) > seen.ejections {
                            push(events, event("ejected"));
                        }
                    }
                    push(events, event("removed"));
                    true
                }
                Some((at, _)) => now.duration_since(at) < WINDOW,
            }
        });
    }

    /// The last-minute traffic of an instance, with its live counters.
    pub fn recent(
        &self,
        service: &str,
        id: &str,
        address: &str,
        requests: u64,
        failures: u64,
    ) -> Recent {
        let inner = lock(&self.inner);
        let key: Key = (service.to_string(), id.to_string(), address.to_string());
        let mut r = Recent::default();
        let Some(seen) = inner.instances.get(&key) else {
            return r;
        };
        let now = Instant::now();
        // The oldest sample still inside the window is the base of the rate.
        let base = seen
            .samples
            .iter()
            .find(|s| now.duration_since(s.at) <= WINDOW + SAMPLE_EVERY / 2)
            .or(seen.samples.back());
        if let Some(base) = base {
            r.requests = requests.saturating_sub(base.requests);
            r.failures = failures.saturating_sub(base.failures);
            let span = now.duration_since(base.at).as_secs_f64();
            if span >= 0.5 {
                r.rate = r.requests as f64 / span;
            }
        }
        let samples: Vec<&Sample> = seen.samples.iter().collect();
        let deltas: Vec<u64> = samples
            .windows(2)
            .map(|w| w[1].requests.saturating_sub(w[0].requests))
            .collect();
        r.per_second = deltas[deltas.len().saturating_sub(60)..].to_vec();
        r
    }

    /// Instances that left their service within the window, newest first.
    pub fn removed(&self) -> Vec<Removed> {
        let inner = lock(&self.inner);
        let mut out: Vec<Removed> = inner
            .instances
            .iter()
            .filter_map(|(k, seen)| {
                let (_, at) = seen.removed?;
                Some(Removed {
                    service: k.0.clone(),
                    id: k.1.clone(),
                    address: k.2.clone(),
                    at,
                    requests: seen.last.0,
                    failures: seen.last.1,
                })
            })
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.at));
        out
    }

    /// The timeline, newest first.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.inner).events.iter().rev().cloned().collect()
    }
}

fn push(events: &mut VecDeque<Event>, e: Event) {
    if events.len() == EVENTS {
        events.pop_front();
    }
    events.push_back(e);
}

/// Milliseconds since the Unix epoch, for the page to show in local time.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Samples every [`SAMPLE_EVERY`] and after each discovery update, until `stop` flips.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let changed = Arc::clone(&app.history.changed);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let on_tick = tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => true,
            _ = changed.notified() => false,
        };
        app.history.sample(&app, on_tick);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::service::tests::inst;
    use crate::{Config, Route};

    fn changes(h: &History) -> Vec<(String, &'static str)> {
        h.events()
            .into_iter()
            .rev()
            .map(|e| (e.instance, e.change))
            .collect()
    }

    /// Past the number of instances `/status` lists, the sampler keeps no per-instance
    /// history at all (its cost at thousands of instances: memory and a core's tenth).
    #[test]
    fn no_per_instance_history_at_scale() {
        let app = App::new(Config::new(vec![Route::parse("web").unwrap()]).unwrap());
        let web = app.service("web").unwrap();
        let many: Vec<_> = (0..=crate::admin::STATUS_INSTANCES_MAX)
            .map(|i| inst(&format!("i{i}")))
            .collect();
        web.set_static(many);
        app.history.sample(&app, true);
        assert!(app.history.events().is_empty());
        assert_eq!(
            app.history
                .recent("web", "i0", "127.0.0.1:1", 5, 0)
                .requests,
            0
        );
        web.set_static(vec![inst("a")]);
        app.history.sample(&app, true);
        assert_eq!(changes(&app.history), [("a".to_string(), "added")]);
    }

    #[tokio::test(start_paused = true)]
    async fn timeline_and_rates_follow_the_counters() {
        let app = App::new(Config::new(vec![Route::parse("web").unwrap()]).unwrap());
        let web = app.service("web").unwrap();
        web.set_static(vec![inst("a"), inst("b")]);
        let h = &app.history;
        h.sample(&app, true);
        assert_eq!(
            changes(h),
            [("a".to_string(), "added"), ("b".to_string(), "added")]
        );

        // Ten seconds of 5 requests a second to `a`.
        for _ in 0..10 {
            tokio::time::advance(SAMPLE_EVERY).await;
            for _ in 0..5 {
                web.backends().list[0].record_status(200);
            }
            h.sample(&app, true);
        }
        let a = h.recent("web", "a", "127.0.0.1:1", 50, 0);
        assert_eq!(a.requests, 50);
        assert!((a.rate - 5.0).abs() < 0.01, "{a:?}");
        assert_eq!(a.per_second, [5; 10]);

        // Ejected, then removed by discovery; then `a` is ejected and removed before the
        // sampler looks: both ejections are on the timeline.
        web.backends().list[1].record_connect_failure();
        h.sample(&app, false);
        web.set_static(vec![inst("a")]);
        h.sample(&app, false);
        assert_eq!(
            changes(h)[2..],
            [("b".to_string(), "ejected"), ("b".to_string(), "removed")]
        );
        web.backends().list[0].record_connect_failure();
        web.set_static(vec![]);
        h.sample(&app, false);
        assert_eq!(
            changes(h)[4..],
            [("a".to_string(), "ejected"), ("a".to_string(), "removed")]
        );
        web.set_static(vec![inst("a")]);
        h.sample(&app, false);
        assert_eq!(changes(h).last().unwrap(), &("a".to_string(), "added"));
        assert_eq!(h.removed().len(), 1, "only b is gone");
        // A minute later it is forgotten.
        tokio::time::advance(WINDOW).await;
        h.sample(&app, true);
        assert!(h.removed().is_empty());

        // Back on the same address: added again, with fresh counters.
        web.set_static(vec![inst("a"), inst("b")]);
        h.sample(&app, false);
        assert_eq!(changes(h).last().unwrap(), &("b".to_string(), "added"));
        assert_eq!(h.recent("web", "b", "127.0.0.1:1", 0, 0).requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_covers_the_last_minute_only() {
        let app = App::new(Config::new(vec![Route::parse("web").unwrap()]).unwrap());
        let web = app.service("web").unwrap();
        web.set_static(vec![inst("a")]);
        let h = &app.history;
        h.sample(&app, true);
        for s in 0..120 {
            tokio::time::advance(SAMPLE_EVERY).await;
            // 10 a second for the first minute, then 1 a second.
            for _ in 0..(if s < 60 { 10 } else { 1 }) {
                web.backends().list[0].record_status(200);
            }
            h.sample(&app, true);
        }
        let total = web.backends().list[0].requests();
        let a = h.recent("web", "a", "127.0.0.1:1", total, 0);
        assert_eq!(a.requests, 60, "{a:?}");
        assert!((a.rate - 1.0).abs() < 0.05, "{a:?}");
        assert_eq!(a.per_second, [1; 60]);
    }
}
