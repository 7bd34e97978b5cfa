//! Follows many services through a small, fixed number of connections to the agent.
//!
//! One blocking query per service needs one connection per service, and real Consul allows
//! 200 concurrent connections per client address (`limits.http_max_conns_per_client`). A
//! [`CatalogWatch`] instead holds two blocking queries whatever the number of services:
//!
//! - `GET /v1/catalog/services`: every service name with its tags. New services, services
//!   gone, and tag changes;
//! - `GET /v1/health/state/any`: every check with its status and `ModifyIndex`. A service
//!   whose checks changed (added, removed, status, re-registered) is re-read.
//!
//! and re-reads only the services that changed with plain `GET /v1/health/service/:name?passing`
//! calls, at most [`CatalogOptions::concurrency`] at a time. So at most `2 + concurrency`
//! connections are open to the agent.
//!
//! A change the two streams cannot place (the catalog index moved, no name or tag changed, and
//! no check changed at that index: an instance registered without a check, or re-registered on
//! a new address) re-reads every followed service. Consul gives every write one index, so a
//! registration with checks moves both streams to the same index and is placed exactly.
//!
//! The rules of the single-service [`super::Watch`] hold here too: index resets, rate-limited
//! streams, backoff with jitter, last known good on errors, and the recovery grace after an
//! outage (instances, and services, missing from a recovered agent's answers stay published
//! for [`CatalogOptions::recovery_grace`]).

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use super::{
    backoff_ceiling, hold_missing, index_after_error, jitter, lost_contact, next_index, or_stop,
    sleep_until_or_stop, IndexStep, RateLimit, Snapshot, StopSignal, WatchOptions, WatchStatus,
};
use crate::client::{Client, HealthQuery, QueryMeta};
use crate::error::{chain, Error};
use crate::json_rows::ArrayRows;
use crate::wire::ServiceEntry;
use crate::Instance;

/// Default number of service reads in flight at once (each holds one connection).
pub const DEFAULT_READ_CONCURRENCY: usize = 4;
/// How long a catalog change nothing explains yet waits for the health stream to catch up
/// before every followed service is re-read.
const EXPLAIN_WAIT: Duration = Duration::from_millis(250);
/// Health answers with changes remembered, to place catalog changes at the same index.
const EXPLAINED_KEPT: usize = 64;
/// A view is published at most this long after the first change it carries, so a burst of
/// reads (at start: every service) publishes a few views, not one per service.
const PUBLISH_DELAY: Duration = Duration::from_millis(10);
/// The same while the first full read is under way.
const SYNC_PUBLISH_DELAY: Duration = Duration::from_millis(250);
/// Capacity of the channel from the two streams to the coordinator.
const EVENTS: usize = 16;

/// What a [`CatalogWatch`] follows and how it queries.
#[derive(Debug, Clone)]
pub struct CatalogOptions {
    /// Services followed whatever their tags (routes given on the command line).
    pub services: Vec<String>,
    /// Also follow every service with a tag starting with this (`urlprefix-`).
    pub tag_prefix: Option<String>,
    /// Service reads in flight at once (at least 1).
    pub concurrency: usize,
    /// Wait, backoff, rate limit and recovery grace, as for a single-service [`super::Watch`]
    /// (its `passing` and `tags` do not apply: reads always ask for passing instances). The
    /// grace also keeps services missing from a recovered agent's catalog.
    pub timing: WatchOptions,
}

impl Default for CatalogOptions {
    fn default() -> Self {
        Self {
            services: Vec::new(),
            tag_prefix: None,
            concurrency: DEFAULT_READ_CONCURRENCY,
            timing: WatchOptions::default(),
        }
    }
}

/// The followed services' healthy instances at one moment. Immutable; a change publishes a
/// new view in which unchanged services keep the same `Arc<Snapshot>` (compare with
/// `Arc::ptr_eq` to find what changed).
#[derive(Debug, Clone, Default)]
pub struct CatalogView {
    pub services: BTreeMap<String, Arc<Snapshot>>,
    /// True once every service followed at start has been read once.
    pub synced: bool,
}

/// Handle of a running catalog watcher; dropping it stops its tasks and cancels their queries.
#[derive(Debug)]
pub struct CatalogWatch {
    view: watch::Receiver<Arc<CatalogView>>,
    status: Arc<Mutex<Board>>,
    /// The tasks stop when this sender is dropped; nothing is ever sent on it.
    _stop: watch::Sender<()>,
    task: JoinHandle<()>,
}

impl Drop for CatalogWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Health of the streams and of each service's reads, for status pages.
#[derive(Debug, Default)]
struct Board {
    /// When each stream (catalog, health) last answered.
    stream_success: [Option<SystemTime>; 2],
    stream_failures: u64,
    stream_error: Option<String>,
    services: HashMap<String, WatchStatus>,
}

impl CatalogWatch {
    /// Starts watching. Must be called inside a tokio runtime.
    pub fn spawn(client: Client, opts: CatalogOptions) -> CatalogWatch {
        let (view_tx, view_rx) = watch::channel(Arc::new(CatalogView::default()));
        let status = Arc::new(Mutex::new(Board::default()));
        let (stop_tx, stop_rx) = watch::channel(());
        let (ev_tx, ev_rx) = mpsc::channel(EVENTS);
        let timing = opts.timing.clone();
        let span = tracing::info_span!("catalog");
        // One connection each for the two streams and for each read slot: the bound holds
        // exactly, however the calls interleave.
        let c = client.single_connection();
        let catalog = stream(
            "catalog",
            timing.clone(),
            ev_tx.clone(),
            StopSignal(stop_rx.clone()),
            move |index, wait| {
                let c = c.clone();
                async move { c.catalog_services_changed(index, Some(wait)).await }
            },
            |services, index| Event::Catalog { services, index },
        );
        let c = client.single_connection();
        let health = stream(
            "health",
            timing,
            ev_tx,
            StopSignal(stop_rx.clone()),
            move |index, wait| {
                let c = c.clone();
                async move {
                    // Reduced to one entry per service as the answer arrives: the 5.5 MB of
                    // 10,000 checks are never held whole.
                    let mut fold = FingerprintFold::default();
                    let (fed, meta) = c
                        .health_state_stream("any", index, Some(wait), |chunk| fold.feed(chunk))
                        .await?;
                    Ok((if fed { Some(fold.finish()?) } else { None }, meta))
                }
            },
            |services, index| Event::Health { services, index },
        );
        let coord = Coordinator::new(client, opts, Arc::clone(&status), view_tx);
        let task = tokio::spawn(
            async move {
                let streams = [tokio::spawn(catalog), tokio::spawn(health)];
                coord.run(ev_rx, StopSignal(stop_rx)).await;
                for s in streams {
                    s.abort();
                }
            }
            .instrument(span),
        );
        CatalogWatch {
            view: view_rx,
            status,
            _stop: stop_tx,
            task,
        }
    }

    /// A receiver of the published views; marked changed only on a real change.
    pub fn views(&self) -> watch::Receiver<Arc<CatalogView>> {
        self.view.clone()
    }

    /// The latest view.
    pub fn current(&self) -> Arc<CatalogView> {
        Arc::clone(&self.view.borrow())
    }

    /// The discovery health of `service` as a single-service watcher would report it: its
    /// read index, publications and changes; errors and last success combine the streams'
    /// (the older of the two answers) with its own reads.
    pub fn status(&self, service: &str) -> WatchStatus {
        let board = lock_board(&self.status);
        let mut st = board.services.get(service).cloned().unwrap_or_default();
        let streams = match board.stream_success {
            [Some(a), Some(b)] => Some(a.min(b)),
            _ => None,
        };
        st.last_success = match (st.last_success, streams) {
            (Some(_), Some(s)) => Some(s),
            _ => None,
        };
        st.consecutive_failures += board.stream_failures;
        if st.last_error.is_none() {
            st.last_error.clone_from(&board.stream_error);
        }
        st
    }

    /// Errors of the two streams in a row (0 while the agent answers).
    pub fn stream_failures(&self) -> u64 {
        lock_board(&self.status).stream_failures
    }
}

fn lock_board(b: &Mutex<Board>) -> std::sync::MutexGuard<'_, Board> {
    b.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The fields of a `health/state` row the watcher needs, borrowed from the answer where the
/// JSON has no escapes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CheckRow<'a> {
    #[serde(rename = "CheckID", borrow)]
    pub check_id: Cow<'a, str>,
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(rename = "ServiceID", borrow)]
    pub service_id: Cow<'a, str>,
    #[serde(borrow)]
    pub service_name: Cow<'a, str>,
    #[serde(borrow)]
    pub service_tags: Vec<Cow<'a, str>>,
    pub modify_index: u64,
}

/// Per service: a hash of its checks (ID, service ID, status, index, tags) and the highest
/// `ModifyIndex` among them.
pub type Fingerprints = HashMap<String, (u64, u64)>;

/// Folds `health/state/any` rows into [`Fingerprints`], one row at a time, in any order. Node
/// checks (no service) are left out: they move every service's index, not one service's
/// instances.
#[derive(Debug, Default)]
pub struct FingerprintFold {
    rows: ArrayRows,
    /// Per service: the sum and the xor of its checks' hashes (neither depends on the order
    /// of the rows), their number, and the highest `ModifyIndex`.
    by_service: HashMap<String, [u64; 4]>,
}

impl FingerprintFold {
    /// Feeds the next bytes of the JSON answer.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Error> {
        let by_service = &mut self.by_service;
        self.rows.feed(chunk, |bytes| {
            let row: CheckRow = serde_json::from_slice(bytes).map_err(Error::Decode)?;
            fold_row(by_service, &row);
            Ok(())
        })
    }

    /// The fingerprints, once the whole answer was fed.
    pub fn finish(self) -> Result<Fingerprints, Error> {
        self.rows.finish()?;
        Ok(prints(self.by_service))
    }
}

fn prints(by_service: HashMap<String, [u64; 4]>) -> Fingerprints {
    by_service
        .into_iter()
        .map(|(n, [sum, xor, count, max_modify])| {
            let mut h = DefaultHasher::new();
            (sum, xor, count).hash(&mut h);
            (n, (h.finish(), max_modify))
        })
        .collect()
}

fn fold_row(by_service: &mut HashMap<String, [u64; 4]>, c: &CheckRow<'_>) {
    if c.service_name.is_empty() {
        return;
    }
    let mut h = DefaultHasher::new();
    (&c.check_id, &c.service_id, &c.status, c.modify_index).hash(&mut h);
    c.service_tags.hash(&mut h);
    let h = h.finish();
    let acc = match by_service.get_mut(c.service_name.as_ref()) {
        Some(acc) => acc,
        None => by_service
            .entry(c.service_name.to_string())
            .or_insert([0; 4]),
    };
    acc[0] = acc[0].wrapping_add(h);
    acc[1] ^= h;
    acc[2] += 1;
    acc[3] = acc[3].max(c.modify_index);
}

/// The [`Fingerprints`] of decoded rows (as [`FingerprintFold`] gives for their JSON).
pub fn fingerprints(checks: &[CheckRow<'_>]) -> Fingerprints {
    let mut by_service = HashMap::new();
    for c in checks {
        fold_row(&mut by_service, c);
    }
    prints(by_service)
}

enum Event {
    Catalog {
        services: BTreeMap<String, Vec<String>>,
        index: u64,
    },
    Health {
        services: Fingerprints,
        index: u64,
    },
    /// A blocking query's wait ran out with no change.
    Renewed {
        stream: usize,
    },
    /// The stream's index went backwards: the agent was restored or restarted.
    Reset {
        stream: usize,
    },
    Failed {
        error: String,
        lost_contact: bool,
    },
}

const CATALOG: usize = 0;
const HEALTH: usize = 1;

/// One blocking-query stream: follows the index rules, rate limit and backoff of
/// [`super::Watch`], and hands every answer to the coordinator.
async fn stream<T, F, Fut>(
    name: &'static str,
    t: WatchOptions,
    tx: mpsc::Sender<Event>,
    mut stop: StopSignal,
    fetch: F,
    wrap: fn(T, u64) -> Event,
) where
    F: Fn(u64, Duration) -> Fut,
    Fut: Future<Output = Result<(Option<T>, QueryMeta), Error>>,
{
    let which = if name == "catalog" { CATALOG } else { HEALTH };
    let mut limit = RateLimit::new(t.rate_burst, t.rate_interval, Instant::now());
    let mut index = 0u64;
    let mut failures = 0u32;
    loop {
        if !sleep_until_or_stop(limit.reserve(Instant::now()), &mut stop).await {
            return;
        }
        let Some(result) = or_stop(&mut stop, fetch(index, t.wait)).await else {
            return;
        };
        let event = match result {
            Ok((value, meta)) => {
                failures = 0;
                match next_index(index, meta.index) {
                    IndexStep::Reset => {
                        warn!(
                            stream = name,
                            previous = index,
                            got = meta.index,
                            "Consul index went backwards; resetting"
                        );
                        index = 0;
                        Event::Reset { stream: which }
                    }
                    IndexStep::Wait(next) => {
                        index = next;
                        match value {
                            Some(v) => wrap(v, next),
                            // The wait ran out with nothing new: an answer all the same, which
                            // clears errors and may end an outage.
                            None => Event::Renewed { stream: which },
                        }
                    }
                }
            }
            Err(err) => {
                failures = failures.saturating_add(1);
                index = index_after_error(index, &err);
                let delay = jitter(backoff_ceiling(failures, t.backoff_min, t.backoff_max));
                warn!(stream = name, error = %chain(&err), failures, retry_in = ?delay,
                    "catalog query failed; keeping the last known instances");
                let ev = Event::Failed {
                    error: chain(&err),
                    lost_contact: lost_contact(&err),
                };
                if tx.send(ev).await.is_err()
                    || !sleep_until_or_stop(Instant::now() + delay, &mut stop).await
                {
                    return;
                }
                continue;
            }
        };
        if tx.send(event).await.is_err() {
            return;
        }
    }
}

type ReadResult = (
    String,
    Result<(Vec<ServiceEntry>, QueryMeta), Error>,
    Client,
);

/// Owns everything the watcher knows; the only writer of the published view.
struct Coordinator {
    /// Single-connection clients not reading right now (one per read slot).
    slots: Vec<Client>,
    /// Where new slots come from, should a read task be lost.
    base: Client,
    /// The service each running read task reads.
    reading: HashMap<tokio::task::Id, String>,
    opts: CatalogOptions,
    board: Arc<Mutex<Board>>,
    view: watch::Sender<Arc<CatalogView>>,
    /// The last catalog answer: name → tags.
    catalog: BTreeMap<String, Vec<String>>,
    catalog_index: Option<u64>,
    /// Per service: a hash of its checks (ID, service ID, status, index, tags).
    fingerprints: HashMap<String, u64>,
    health_index: Option<u64>,
    /// Indexes of health answers that changed something.
    explained: VecDeque<u64>,
    /// A catalog index nothing has explained yet, and until when to wait for the health
    /// stream to explain it.
    unexplained: Option<(u64, Instant)>,
    followed: BTreeSet<String>,
    published: BTreeMap<String, Arc<Snapshot>>,
    /// Index of each service's last successful read.
    read_index: HashMap<String, u64>,
    dirty: BTreeSet<String>,
    inflight: HashSet<String>,
    /// Per service: failed reads in a row, and when to try again.
    backoff: HashMap<String, (u32, Instant)>,
    reads: JoinSet<ReadResult>,
    /// Contact with the agent was lost (or its index went backwards); the next answer starts
    /// the recovery grace.
    outage: bool,
    grace_until: Option<Instant>,
    publish_at: Option<Instant>,
    synced: bool,
}

impl Coordinator {
    fn new(
        client: Client,
        mut opts: CatalogOptions,
        board: Arc<Mutex<Board>>,
        view: watch::Sender<Arc<CatalogView>>,
    ) -> Self {
        opts.concurrency = opts.concurrency.max(1);
        let slots = (0..opts.concurrency)
            .map(|_| client.single_connection())
            .collect();
        let followed: BTreeSet<String> = opts.services.iter().cloned().collect();
        Self {
            slots,
            base: client,
            reading: HashMap::new(),
            dirty: followed.clone(),
            followed,
            opts,
            board,
            view,
            catalog: BTreeMap::new(),
            catalog_index: None,
            fingerprints: HashMap::new(),
            health_index: None,
            explained: VecDeque::new(),
            unexplained: None,
            published: BTreeMap::new(),
            read_index: HashMap::new(),
            inflight: HashSet::new(),
            backoff: HashMap::new(),
            reads: JoinSet::new(),
            outage: false,
            grace_until: None,
            publish_at: None,
            synced: false,
        }
    }

    async fn run(mut self, mut events: mpsc::Receiver<Event>, mut stop: StopSignal) {
        loop {
            self.start_reads();
            self.maybe_publish();
            let timer = self.next_timer();
            tokio::select! {
                () = stop.wait() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev),
                    None => break,
                },
                Some(done) = self.reads.join_next_with_id(), if !self.reads.is_empty() => {
                    match done {
                        Ok((id, (name, result, slot))) => {
                            self.reading.remove(&id);
                            self.slots.push(slot);
                            self.on_read(name, result);
                        }
                        // Only a panic (a bug) ends a read without its result: its slot is
                        // replaced and its service read again.
                        Err(e) => {
                            self.slots.push(self.base.single_connection());
                            if let Some(name) = self.reading.remove(&e.id()) {
                                warn!(service = %name, error = %e, "a service read failed; reading it again");
                                self.inflight.remove(&name);
                                self.dirty.insert(name);
                            }
                        }
                    }
                }
                () = sleep_until_opt(timer) => self.on_timer(),
            }
        }
        debug!("catalog watch stopped");
    }

    fn wanted(&self, name: &str, tags: &[String]) -> bool {
        self.opts.services.iter().any(|s| s == name)
            || self
                .opts
                .tag_prefix
                .as_deref()
                .is_some_and(|p| tags.iter().any(|t| t.starts_with(p)))
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Catalog { services, index } => {
                debug!(index, services = services.len(), "catalog answer");
                self.answered(CATALOG);
                self.on_catalog(services, index);
            }
            Event::Health { services, index } => {
                debug!(index, services = services.len(), "health answer");
                self.answered(HEALTH);
                self.on_health(services, index);
            }
            Event::Renewed { stream } => self.answered(stream),
            Event::Reset { stream } => {
                self.outage = true;
                if stream == CATALOG {
                    self.catalog_index = None;
                } else {
                    self.health_index = None;
                }
            }
            Event::Failed {
                error,
                lost_contact,
                ..
            } => {
                self.outage |= lost_contact;
                let mut b = lock_board(&self.board);
                b.stream_failures += 1;
                b.stream_error = Some(error);
            }
        }
    }

    /// A stream answered: clears its errors; the first answer after an outage starts the
    /// recovery grace and re-reads everything (changes during the outage were not seen).
    fn answered(&mut self, stream: usize) {
        {
            let mut b = lock_board(&self.board);
            b.stream_success[stream] = Some(SystemTime::now());
            b.stream_failures = 0;
            b.stream_error = None;
        }
        if self.outage {
            self.outage = false;
            if !self.opts.timing.recovery_grace.is_zero() {
                self.grace_until = Some(Instant::now() + self.opts.timing.recovery_grace);
            }
            self.sweep();
        }
    }

    fn sweep(&mut self) {
        self.dirty.extend(self.followed.iter().cloned());
    }

    fn on_catalog(&mut self, services: BTreeMap<String, Vec<String>>, index: u64) {
        let previous = self.catalog_index.replace(index);
        let mut changed = false;
        for (name, tags) in &services {
            if self.catalog.get(name) != Some(tags) {
                changed = true;
                if self.wanted(name, tags) {
                    self.followed.insert(name.clone());
                    self.dirty.insert(name.clone());
                }
            }
        }
        changed |= self.catalog.keys().any(|n| !services.contains_key(n));
        self.catalog = services;
        self.refollow();
        if let Some(prev) = previous {
            if index > prev && !changed && !self.explained.contains(&index) {
                if self.health_index.is_some_and(|h| h >= index) {
                    debug!(
                        index,
                        "catalog changed with no check change; re-reading all"
                    );
                    self.sweep();
                } else {
                    self.unexplained = Some((index, Instant::now() + EXPLAIN_WAIT));
                }
            }
        }
    }

    /// Drops the services no longer wanted (gone from the catalog, or their route tags
    /// removed); during the recovery grace a service missing from the catalog stays.
    fn refollow(&mut self) {
        if self.grace_until.is_some() {
            return;
        }
        let gone: Vec<String> = self
            .followed
            .iter()
            .filter(|n| {
                !self
                    .catalog
                    .get(n.as_str())
                    .map_or(self.opts.services.contains(n), |t| self.wanted(n, t))
            })
            .cloned()
            .collect();
        for name in gone {
            debug!(service = %name, "no longer followed");
            self.followed.remove(&name);
            self.dirty.remove(&name);
            self.read_index.remove(&name);
            self.backoff.remove(&name);
            lock_board(&self.board).services.remove(&name);
            if self.published.remove(&name).is_some() {
                self.schedule_publish();
            }
        }
    }

    fn on_health(&mut self, fresh: Fingerprints, index: u64) {
        let mut changed = self.health_index.is_none();
        for (name, (fp, max_modify)) in &fresh {
            let moved = self.fingerprints.get(name) != Some(fp);
            changed |= moved;
            if self.followed.contains(name)
                && ((moved && self.health_index.is_some())
                    || *max_modify > self.read_index.get(name).copied().unwrap_or(0))
            {
                self.dirty.insert(name.clone());
            }
        }
        for name in self.fingerprints.keys() {
            if !fresh.contains_key(name) {
                changed = true;
                if self.followed.contains(name) {
                    self.dirty.insert(name.clone());
                }
            }
        }
        self.fingerprints = fresh.into_iter().map(|(n, (fp, _))| (n, fp)).collect();
        self.health_index = Some(index);
        if changed {
            if self.explained.len() == EXPLAINED_KEPT {
                self.explained.pop_front();
            }
            self.explained.push_back(index);
        }
        if let Some((c, _)) = self.unexplained {
            if index >= c {
                self.unexplained = None;
                if !self.explained.contains(&c) {
                    debug!(
                        index = c,
                        "catalog changed with no check change; re-reading all"
                    );
                    self.sweep();
                }
            }
        }
    }

    fn start_reads(&mut self) {
        // While the agent is away the reads would fail too; the streams notice its return,
        // and then everything is re-read.
        if self.outage {
            return;
        }
        let now = Instant::now();
        while !self.slots.is_empty() {
            let next = self
                .dirty
                .iter()
                .find(|n| {
                    !self.inflight.contains(n.as_str())
                        && self.backoff.get(n.as_str()).is_none_or(|(_, t)| *t <= now)
                })
                .cloned();
            let Some(name) = next else { break };
            let Some(client) = self.slots.pop() else {
                break;
            };
            self.dirty.remove(&name);
            tracing::trace!(service = %name, "reading");
            self.inflight.insert(name.clone());
            let reading = name.clone();
            let task = self.reads.spawn(async move {
                let q = HealthQuery {
                    passing: true,
                    ..HealthQuery::default()
                };
                let r = client.health_service(&name, &q).await;
                (name, r, client)
            });
            self.reading.insert(task.id(), reading);
        }
    }

    fn on_read(&mut self, name: String, result: Result<(Vec<ServiceEntry>, QueryMeta), Error>) {
        self.inflight.remove(&name);
        tracing::trace!(service = %name, ok = result.is_ok(), "read");
        if !self.followed.contains(&name) {
            return;
        }
        match result {
            Ok((entries, meta)) => {
                self.backoff.remove(&name);
                self.read_index.insert(name.clone(), meta.index);
                let mut instances: Vec<Instance> =
                    entries.iter().map(Instance::from_entry).collect();
                let previous = self.published.get(&name).cloned();
                if let (Some(_), Some(prev)) = (self.grace_until, &previous) {
                    let held = hold_missing(&mut instances, &prev.instances);
                    if held > 0 {
                        debug!(service = %name, held, "agent recovered without some instances; keeping them during the grace");
                    }
                }
                instances.sort();
                let mut board = lock_board(&self.board);
                let st = board.services.entry(name.clone()).or_default();
                st.index = meta.index;
                st.last_success = Some(SystemTime::now());
                st.consecutive_failures = 0;
                st.last_error = None;
                if previous.is_some_and(|p| *p.instances == *instances) {
                    return;
                }
                st.updates += 1;
                st.last_change = Some(SystemTime::now());
                drop(board);
                debug!(service = %name, index = meta.index, instances = instances.len(), "healthy instances changed");
                let snap = Snapshot {
                    service: name.clone(),
                    instances: instances.into(),
                    index: meta.index,
                };
                self.published.insert(name, Arc::new(snap));
                self.schedule_publish();
            }
            Err(err) => {
                let lost = lost_contact(&err);
                self.outage |= lost;
                let failures = self.backoff.get(&name).map_or(0, |(f, _)| *f) + 1;
                let delay = jitter(backoff_ceiling(
                    failures,
                    self.opts.timing.backoff_min,
                    self.opts.timing.backoff_max,
                ));
                // One line per service per failure streak: the streams already report an agent
                // that is away, which would otherwise print a line per service.
                if failures == 1 && !lost {
                    warn!(service = %name, error = %chain(&err), "reading a service failed; keeping its last known instances");
                }
                self.backoff
                    .insert(name.clone(), (failures, Instant::now() + delay));
                let mut board = lock_board(&self.board);
                let st = board.services.entry(name.clone()).or_default();
                st.consecutive_failures += 1;
                st.last_error = Some(chain(&err));
                drop(board);
                self.dirty.insert(name);
            }
        }
    }

    fn schedule_publish(&mut self) {
        // Before the first full read, views carry partial routes nobody waits for, and each
        // costs the consumer a rebuild: fewer of them.
        let delay = if self.synced {
            PUBLISH_DELAY
        } else {
            SYNC_PUBLISH_DELAY
        };
        self.publish_at
            .get_or_insert_with(|| Instant::now() + delay);
    }

    /// Publishes the view when a change waits and either nothing is left to read or the
    /// change has waited [`PUBLISH_DELAY`].
    fn maybe_publish(&mut self) {
        let idle = self.reads.is_empty() && (self.dirty.is_empty() || self.outage);
        let first_sync = !self.synced && self.catalog_index.is_some() && idle;
        if first_sync {
            self.synced = true;
            info!(
                services = self.published.len(),
                instances = self
                    .published
                    .values()
                    .map(|s| s.instances.len())
                    .sum::<usize>(),
                "catalog read"
            );
        }
        let due = self.publish_at.is_some_and(|t| idle || Instant::now() >= t);
        if !(due || first_sync) {
            return;
        }
        self.publish_at = None;
        self.view.send_replace(Arc::new(CatalogView {
            services: self.published.clone(),
            synced: self.synced,
        }));
    }

    fn next_timer(&self) -> Option<Instant> {
        let now = Instant::now();
        let backoff = (!self.outage)
            .then(|| {
                self.dirty
                    .iter()
                    .filter_map(|n| self.backoff.get(n).map(|(_, t)| *t))
                    .filter(|t| *t > now)
                    .min()
            })
            .flatten();
        [
            self.publish_at,
            self.unexplained.map(|(_, t)| t),
            self.grace_until,
            backoff,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.unexplained.is_some_and(|(_, t)| t <= now) {
            self.unexplained = None;
            debug!("catalog changed with no check change; re-reading all");
            self.sweep();
        }
        if self.grace_until.is_some_and(|t| t <= now) {
            // The agent's own answers, as they are, from now on.
            self.grace_until = None;
            self.refollow();
            self.sweep();
        }
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn coord(services: &[&str], prefix: Option<&str>) -> Coordinator {
        let client = Client::new(crate::ClientConfig::new("127.0.0.1:1").unwrap());
        let opts = CatalogOptions {
            services: services.iter().map(|s| s.to_string()).collect(),
            tag_prefix: prefix.map(str::to_string),
            ..CatalogOptions::default()
        };
        Coordinator::new(
            client,
            opts,
            Arc::default(),
            watch::channel(Arc::new(CatalogView::default())).0,
        )
    }

    fn catalog(entries: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        entries
            .iter()
            .map(|(n, t)| (n.to_string(), t.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    fn check(service: &str, id: &str, modify: u64) -> CheckRow<'static> {
        CheckRow {
            check_id: format!("service:{id}").into(),
            status: "passing".into(),
            service_id: id.to_string().into(),
            service_name: service.to_string().into(),
            service_tags: vec![],
            modify_index: modify,
        }
    }

    fn health(c: &mut Coordinator, checks: &[CheckRow<'_>], index: u64) {
        c.on_health(fingerprints(checks), index);
    }

    #[test]
    fn follows_flag_services_and_tagged_ones() {
        let mut c = coord(&["web"], Some("urlprefix-"));
        c.on_catalog(
            catalog(&[("web", &[]), ("api", &["urlprefix-/api"]), ("db", &["x"])]),
            5,
        );
        assert_eq!(c.followed, ["api", "web"].map(String::from).into());
        assert_eq!(c.dirty, ["api", "web"].map(String::from).into());
        // The tag goes: the service is dropped; web stays although not in the catalog.
        c.dirty.clear();
        c.on_catalog(catalog(&[("api", &[]), ("db", &["x"])]), 6);
        assert_eq!(c.followed, ["web"].map(String::from).into());
    }

    #[test]
    fn a_check_change_re_reads_only_its_service() {
        let mut c = coord(&["a", "b"], None);
        c.on_catalog(catalog(&[("a", &[]), ("b", &[])]), 5);
        c.read_index.insert("a".into(), 5);
        c.read_index.insert("b".into(), 5);
        c.dirty.clear();
        health(&mut c, &[check("a", "a1", 3), check("b", "b1", 4)], 5);
        assert!(c.dirty.is_empty(), "{:?}", c.dirty);
        health(
            &mut c,
            &[
                check("a", "a1", 3),
                check("b", "b1", 4),
                check("b", "b2", 7),
            ],
            7,
        );
        assert_eq!(c.dirty, ["b"].map(String::from).into());
        // The catalog moves to the same index: placed, no re-read of everything.
        c.dirty.clear();
        c.on_catalog(catalog(&[("a", &[]), ("b", &[])]), 7);
        assert!(c.dirty.is_empty() && c.unexplained.is_none());
        // A catalog change no check explains: everything, once the health stream is past it.
        c.on_catalog(catalog(&[("a", &[]), ("b", &[])]), 9);
        assert!(c.unexplained.is_some());
        health(
            &mut c,
            &[
                check("a", "a1", 3),
                check("b", "b1", 4),
                check("b", "b2", 7),
            ],
            9,
        );
        assert_eq!(c.dirty, ["a", "b"].map(String::from).into());
    }

    #[test]
    fn the_streamed_fold_matches_the_decoded_rows_in_any_order_and_chunking() {
        let rows = [
            check("a", "a1", 3),
            check("b", "b1", 4),
            check("a", "a2", 9),
            CheckRow {
                check_id: "serfHealth".into(),
                ..check("", "", 2)
            },
        ];
        let json = |rows: &[&CheckRow]| {
            let v: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({"Node": "n", "CheckID": r.check_id, "Status": r.status,
                        "Output": "a \"quoted\", [odd] {output}", "ServiceID": r.service_id,
                        "ServiceName": r.service_name, "ServiceTags": r.service_tags,
                        "ModifyIndex": r.modify_index})
                })
                .collect();
            serde_json::to_vec(&v).unwrap()
        };
        let expected = fingerprints(&rows);
        assert_eq!(expected.len(), 2);
        assert_eq!(expected["a"].1, 9);
        let forward = json(&rows.iter().collect::<Vec<_>>());
        let backward = json(&rows.iter().rev().collect::<Vec<_>>());
        for body in [&forward, &backward] {
            for size in [1, 7, 100, body.len()] {
                let mut fold = FingerprintFold::default();
                for chunk in body.chunks(size) {
                    fold.feed(chunk).unwrap();
                }
                assert_eq!(fold.finish().unwrap(), expected, "chunks of {size}");
            }
        }
        // A status change moves only its service's print.
        let mut changed = rows.clone();
        changed[1].status = "critical".into();
        let after = fingerprints(&changed);
        assert_eq!(after["a"], expected["a"]);
        assert_ne!(after["b"], expected["b"]);
        // A cut answer is an error, not a smaller catalog.
        let mut fold = FingerprintFold::default();
        fold.feed(&forward[..forward.len() - 1]).unwrap();
        assert!(fold.finish().is_err());
    }

    #[test]
    fn a_removed_check_re_reads_its_service() {
        let mut c = coord(&["a"], None);
        health(&mut c, &[check("a", "a1", 3), check("a", "a2", 4)], 4);
        c.read_index.insert("a".into(), 4);
        c.dirty.clear();
        health(&mut c, &[check("a", "a1", 3)], 8);
        assert_eq!(c.dirty, ["a"].map(String::from).into());
    }

    #[test]
    fn services_missing_after_an_outage_stay_during_the_grace() {
        let mut c = coord(&[], Some("urlprefix-"));
        c.on_catalog(catalog(&[("api", &["urlprefix-/api"])]), 5);
        c.outage = true;
        c.answered(CATALOG);
        assert!(c.grace_until.is_some());
        c.on_catalog(catalog(&[]), 2);
        assert!(c.followed.contains("api"));
        c.grace_until = Some(Instant::now());
        c.on_timer();
        assert!(!c.followed.contains("api"));
    }
}
