//! Follows one service's healthy instances with Consul blocking queries and publishes them as
//! immutable snapshots.
//!
//! A [`Watch`] owns one task that long-polls `GET /v1/health/service/:name?passing&index=N` and
//! follows the client rules of Consul's blocking-query contract (`consul-api.md` §1.5):
//!
//! - **reset when the index goes backwards** (snapshot restore, agent restart): index 0, re-query;
//! - **never block on index 0**: after each answer the index is at least 1;
//! - **rate-limited**: a token bucket lets a short burst through, then one query per interval,
//!   so a service under churn degrades to polling instead of a hot loop;
//! - **backoff with jitter on errors**, and index 0 after a connection failure (the agent may have
//!   restarted with a fresh index);
//! - **publish only real changes**: a wake-up with the same sorted set of instances publishes
//!   nothing;
//! - **last known good**: a failed query never replaces the published set.
//!
//! Consumers read [`Watch::snapshots`] (a `tokio::sync::watch` receiver, so the data path reads
//! an `Arc` without a lock) and [`Watch::status`] for the watcher's own health.
//!
//! [`catalog::CatalogWatch`] follows many services at once through a fixed number of
//! connections, on the same rules.
//!
//! The small helpers at the bottom (stop signal, sleeping, backoff) are shared with
//! [`crate::register`].

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn, Instrument};

use crate::client::{Client, HealthQuery};
use crate::error::{chain, Error};
use crate::Instance;

pub mod catalog;

/// Default longest time one blocking query waits for a change.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);
/// Default first backoff after a failed query.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// Default ceiling of the backoff after repeated failures.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Default number of queries the rate limiter lets through back to back.
pub const DEFAULT_RATE_BURST: u32 = 3;
/// Default time instances missing from a recovered agent's answers stay published.
pub const DEFAULT_RECOVERY_GRACE: Duration = Duration::from_secs(10);
/// Default sustained spacing of queries once the burst is spent.
pub const DEFAULT_RATE_INTERVAL: Duration = Duration::from_millis(100);

/// How a [`Watch`] queries Consul.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Only instances whose every check passes (`?passing`). Default `true`.
    pub passing: bool,
    /// Instances must carry all of these tags (`?tag=`, repeated).
    pub tags: Vec<String>,
    /// Longest time one blocking query waits (`?wait=`). Consul caps it at 10 min and adds up to
    /// `wait/16` of jitter; the client's deadline already allows for both.
    pub wait: Duration,
    /// First backoff after a failure; doubles per consecutive failure.
    pub backoff_min: Duration,
    /// Ceiling of the backoff.
    pub backoff_max: Duration,
    /// Queries allowed back to back before the rate limit applies (at least 1).
    pub rate_burst: u32,
    /// Sustained spacing between queries once the burst is spent.
    pub rate_interval: Duration,
    /// After the agent comes back from an outage (connection failures, or an index that went
    /// backwards), instances it no longer lists stay published for this long: an agent that
    /// restarted empty (`consul agent -dev`, our dev agent) has not yet heard from services
    /// that are about to register again, and emptying a route for that would fail requests
    /// that live instances could answer. Additions are published at once; after the grace the
    /// agent's answer is published as it is.
    pub recovery_grace: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            passing: true,
            tags: Vec::new(),
            wait: DEFAULT_WAIT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            rate_burst: DEFAULT_RATE_BURST,
            rate_interval: DEFAULT_RATE_INTERVAL,
            recovery_grace: DEFAULT_RECOVERY_GRACE,
        }
    }
}

/// One published set of healthy instances. Immutable: a change publishes a new `Snapshot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The watched service's name.
    pub service: String,
    /// The instances, sorted (by ID first), so equal sets compare equal.
    pub instances: Arc<[Instance]>,
    /// `X-Consul-Index` of the answer that produced this set.
    pub index: u64,
}

/// The watcher's own health, for status pages, metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchStatus {
    /// The index the next query blocks on (0 right after a reset).
    pub index: u64,
    /// When Consul last answered.
    pub last_success: Option<SystemTime>,
    /// When a changed set was last published.
    pub last_change: Option<SystemTime>,
    /// Failed queries since the last answer; 0 while healthy.
    pub consecutive_failures: u64,
    /// The last failure with its cause chain, while failures continue; cleared by an answer.
    pub last_error: Option<String>,
    /// Snapshots published so far (the first answer counts).
    pub updates: u64,
}

impl WatchStatus {
    /// True when Consul has answered and the latest query did not fail. When false, the
    /// published snapshot (if any) is the last known good set and may be stale.
    pub fn is_healthy(&self) -> bool {
        self.last_success.is_some() && self.consecutive_failures == 0
    }
}

/// Handle of a running watcher. Dropping it (or calling [`Watch::stop`]) ends the task
/// promptly, also while a blocking query is in flight or the task is backing off. Receivers
/// obtained from [`Watch::snapshots`] keep the last published value after the task ends.
#[derive(Debug)]
pub struct Watch {
    service: String,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    status: Arc<Mutex<WatchStatus>>,
    /// The task stops when this sender is dropped; nothing is ever sent on it.
    stop: watch::Sender<()>,
    task: JoinHandle<()>,
}

impl Watch {
    /// Starts watching `service`. Must be called inside a tokio runtime.
    pub fn spawn(client: Client, service: impl Into<String>, opts: WatchOptions) -> Watch {
        let service = service.into();
        let (snap_tx, snap_rx) = watch::channel(None);
        let status = Arc::new(Mutex::new(WatchStatus::default()));
        let (stop_tx, stop_rx) = watch::channel(());
        let task = Task {
            client,
            service: service.clone(),
            opts,
            snapshots: snap_tx,
            status: Arc::clone(&status),
        };
        let span = tracing::info_span!("watch", service = %service);
        let task = tokio::spawn(task.run(StopSignal(stop_rx)).instrument(span));
        Watch {
            service,
            snapshots: snap_rx,
            status,
            stop: stop_tx,
            task,
        }
    }

    /// The watched service's name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A receiver of the published snapshots: `None` until Consul first answers, then the
    /// latest set. It is marked changed only when the set of instances changed.
    pub fn snapshots(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshots.clone()
    }

    /// The latest published snapshot, if any.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.snapshots.borrow().clone()
    }

    /// The watcher's own health right now.
    pub fn status(&self) -> WatchStatus {
        lock(&self.status).clone()
    }

    /// Stops the task and waits until it has ended.
    pub async fn stop(self) {
        let Watch {
            service,
            stop,
            task,
            ..
        } = self;
        drop(stop);
        if let Err(err) = task.await {
            if err.is_panic() {
                warn!(service = %service, "watch task panicked");
            }
        }
    }
}

/// Locks the status; a panic elsewhere while holding the lock leaves plain data behind, which is
/// still worth reading, so poisoning is ignored.
fn lock(status: &Mutex<WatchStatus>) -> MutexGuard<'_, WatchStatus> {
    status.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The state the watcher task owns.
struct Task {
    client: Client,
    service: String,
    opts: WatchOptions,
    /// Swapped whole on every real change; receivers never see a half-built set.
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    status: Arc<Mutex<WatchStatus>>,
}

impl Task {
    async fn run(self, mut stop: StopSignal) {
        let mut limit = RateLimit::new(
            self.opts.rate_burst,
            self.opts.rate_interval,
            Instant::now(),
        );
        let mut index = 0u64;
        let mut failures = 0u32;
        // Set by an outage; the first answer after it starts the recovery grace.
        let mut outage = false;
        let mut grace_until: Option<Instant> = None;
        // The node ID of the agent answering (`agent/self`), learnt with the first answer and
        // again after each outage. An agent restarted between two queries shows no outage
        // (no failed query, and our dev agent's index keeps growing); its new node ID is how
        // a restart is told from services leaving (`None`: unknown, e.g. ACLs deny it).
        let mut agent_id: Option<String> = None;
        let mut learn_agent = !self.opts.recovery_grace.is_zero();
        loop {
            if !sleep_until_or_stop(limit.reserve(Instant::now()), &mut stop).await {
                break;
            }
            // During the grace, wake up when it ends so the agent's own answer gets published.
            let wait = match grace_until {
                Some(end) => {
                    let left = end.saturating_duration_since(Instant::now());
                    self.opts.wait.min(left + Duration::from_millis(50))
                }
                None => self.opts.wait,
            };
            let query = HealthQuery {
                passing: self.opts.passing,
                tags: self.opts.tags.clone(),
                index,
                wait: Some(wait),
            };
            // Racing the query against the stop signal drops (and so cancels) an in-flight
            // long poll instead of waiting out its `wait`.
            let Some(result) =
                or_stop(&mut stop, self.client.health_service(&self.service, &query)).await
            else {
                break;
            };
            match result {
                Ok((entries, meta)) => {
                    failures = 0;
                    match next_index(index, meta.index) {
                        IndexStep::Reset => {
                            // The data may come from a restored or restarted server; re-read
                            // from scratch rather than trust (and publish) it.
                            warn!(
                                previous = index,
                                got = meta.index,
                                "Consul index went backwards; resetting"
                            );
                            index = 0;
                            outage = true;
                            self.record_answer(index);
                        }
                        IndexStep::Wait(next) => {
                            index = next;
                            let now = Instant::now();
                            if outage && !self.opts.recovery_grace.is_zero() {
                                grace_until = Some(now + self.opts.recovery_grace);
                                learn_agent = true;
                            }
                            outage = false;
                            if grace_until.is_some_and(|end| now >= end) {
                                grace_until = None;
                            }
                            let mut instances: Vec<Instance> =
                                entries.iter().map(Instance::from_entry).collect();
                            // One extra request per watcher start and per recovery, and one
                            // per answer that loses instances.
                            let restarted = if learn_agent {
                                learn_agent = false;
                                agent_id = self.agent_id(&mut stop).await;
                                false
                            } else if grace_until.is_none()
                                && agent_id.is_some()
                                && self.loses_instances(&instances)
                            {
                                let now_id = self.agent_id(&mut stop).await;
                                let restarted = now_id.is_some() && agent_id != now_id;
                                agent_id = now_id;
                                restarted
                            } else {
                                false
                            };
                            if restarted {
                                warn!(
                                    grace = ?self.opts.recovery_grace,
                                    "the agent restarted between two queries (new node ID); treating it as a recovery"
                                );
                                grace_until = Some(now + self.opts.recovery_grace);
                            }
                            if grace_until.is_some() {
                                let previous = self.snapshots.borrow().clone();
                                if let Some(previous) = previous {
                                    let held = hold_missing(&mut instances, &previous.instances);
                                    if held > 0 {
                                        info!(
                                            held,
                                            grace = ?self.opts.recovery_grace,
                                            "agent recovered without some instances; keeping them while services re-register"
                                        );
                                    }
                                }
                            }
                            instances.sort();
                            self.publish_if_changed(instances, index);
                            self.record_answer(index);
                        }
                    }
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    // e2e fix: not only a refused connect; a blocking query whose connection
                    // broke as the agent went away counts too. Otherwise an agent restarted
                    // quickly (answering the retry, empty, with a higher clock-seeded index)
                    // went unnoticed and its empty answer emptied the route at once.
                    outage |= lost_contact(&err);
                    index = index_after_error(index, &err);
                    let delay = jitter(backoff_ceiling(
                        failures,
                        self.opts.backoff_min,
                        self.opts.backoff_max,
                    ));
                    warn!(
                        error = %chain(&err),
                        failures,
                        retry_in = ?delay,
                        "health query failed; keeping the last known instances"
                    );
                    self.record_failure(&err, index);
                    if !sleep_until_or_stop(Instant::now() + delay, &mut stop).await {
                        break;
                    }
                }
            }
        }
        debug!("watch stopped");
    }

    /// The answering agent's node ID, if it tells (`agent/self`); `None` on any failure.
    async fn agent_id(&self, stop: &mut StopSignal) -> Option<String> {
        match or_stop(stop, self.client.agent_self()).await? {
            Ok(me) if !me.config.node_id.is_empty() => Some(me.config.node_id),
            Ok(_) => None,
            Err(e) => {
                debug!(error = %chain(&e), "agent/self failed; cannot tell a restarted agent");
                None
            }
        }
    }

    /// Whether `instances` lacks an instance the published set has.
    fn loses_instances(&self, instances: &[Instance]) -> bool {
        self.snapshots.borrow().as_ref().is_some_and(|published| {
            published
                .instances
                .iter()
                .any(|p| !instances.iter().any(|i| i.id == p.id))
        })
    }

    /// Publishes `instances` (sorted) unless they equal the published set.
    fn publish_if_changed(&self, instances: Vec<Instance>, index: u64) {
        let changed = match self.snapshots.borrow().as_ref() {
            None => true,
            Some(current) => *current.instances != *instances,
        };
        if !changed {
            debug!(index, instances = instances.len(), "no change");
            return;
        }
        info!(
            index,
            instances = instances.len(),
            ids = ?instances.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            "healthy instances changed"
        );
        let snapshot = Snapshot {
            service: self.service.clone(),
            instances: instances.into(),
            index,
        };
        // `send_replace` stores the value even with no receiver left; the handle keeps one anyway.
        self.snapshots.send_replace(Some(Arc::new(snapshot)));
        let mut status = lock(&self.status);
        status.updates += 1;
        status.last_change = Some(SystemTime::now());
    }

    fn record_answer(&self, index: u64) {
        let mut status = lock(&self.status);
        status.index = index;
        status.last_success = Some(SystemTime::now());
        status.consecutive_failures = 0;
        status.last_error = None;
    }

    fn record_failure(&self, err: &Error, index: u64) {
        let mut status = lock(&self.status);
        status.index = index;
        status.consecutive_failures += 1;
        status.last_error = Some(chain(err));
    }
}

/// Adds to `current` the instances of `previous` it lacks (by ID); returns how many.
fn hold_missing(current: &mut Vec<Instance>, previous: &[Instance]) -> usize {
    let missing: Vec<Instance> = previous
        .iter()
        .filter(|p| !current.iter().any(|c| c.id == p.id))
        .cloned()
        .collect();
    let n = missing.len();
    current.extend(missing);
    n
}

/// What to do with the index of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexStep {
    /// Block on this index next (never 0).
    Wait(u64),
    /// The index went backwards: query again from 0, without blocking.
    Reset,
}

/// The index rules of `consul-api.md` §1.5: `previous` is the index the query blocked on, `got`
/// the answer's `X-Consul-Index`.
fn next_index(previous: u64, got: u64) -> IndexStep {
    if got < previous {
        IndexStep::Reset
    } else {
        // Blocking on 0 returns at once, so a 0 echoed back (a missing header) would spin.
        IndexStep::Wait(got.max(1))
    }
}

/// Whether a failed query lost contact with the agent: the connect failed, or the connection
/// broke before the answer came (the agent went away mid-query). Either way the agent that
/// answers next may be a new one, without the old one's registrations or index sequence. A
/// timeout or an error status is not: the agent was there, merely slow or refusing.
fn lost_contact(err: &Error) -> bool {
    matches!(err, Error::Transport(_))
}

/// The index to query next after a failed query: 0 after contact with the agent was lost, as
/// the agent may have restarted with a new, lower index sequence and blocking on the old index
/// could wait out the whole `wait` for nothing (consul-template does the same after a refused
/// connect; a connection broken mid-query is the same situation); otherwise unchanged.
fn index_after_error(index: u64, err: &Error) -> u64 {
    if lost_contact(err) {
        0
    } else {
        index
    }
}

/// A token bucket in its GCRA form: one timestamp (`next`, when the bucket would be full again
/// minus the burst allowance) instead of a token count and a refill clock. Up to `burst`
/// reservations go through at once; after that one per `interval`.
#[derive(Debug, Clone)]
pub(crate) struct RateLimit {
    interval: Duration,
    /// How far `tat` may run ahead of now before callers must wait: `(burst - 1) * interval`.
    tolerance: Duration,
    /// Theoretical arrival time of the next request at the sustained rate.
    tat: Instant,
}

impl RateLimit {
    /// A full bucket at `now`. A `burst` of 0 is treated as 1.
    pub(crate) fn new(burst: u32, interval: Duration, now: Instant) -> Self {
        Self {
            interval,
            tolerance: interval.saturating_mul(burst.max(1) - 1),
            tat: now,
        }
    }

    /// Takes a token and returns when the caller may proceed (`now` when one was available).
    pub(crate) fn reserve(&mut self, now: Instant) -> Instant {
        let tat = self.tat.max(now);
        let ready = tat.checked_sub(self.tolerance).unwrap_or(now).max(now);
        self.tat = tat + self.interval;
        ready
    }
}

/// The backoff ceiling after `failures` consecutive failures: `min`, doubling per failure,
/// capped at `max`.
pub(crate) fn backoff_ceiling(failures: u32, min: Duration, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    min.saturating_mul(1u32 << doublings).min(max)
}

/// "Equal jitter": a random delay in `[ceiling/2, ceiling]`. Spreads retries of many clients
/// apart while keeping a floor, so a dead agent is never hammered.
pub(crate) fn jitter(ceiling: Duration) -> Duration {
    let half = ceiling / 2;
    let spread = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(rand::thread_rng().gen_range(0..=spread))
}

/// Completes once the owning handle is gone. The handle never sends; dropping its
/// `watch::Sender` closes the channel, which wakes every pending [`StopSignal::wait`].
#[derive(Debug)]
pub(crate) struct StopSignal(pub(crate) watch::Receiver<()>);

impl StopSignal {
    /// Waits for the stop. Cancel-safe, and returns at once when already stopped.
    pub(crate) async fn wait(&mut self) {
        while self.0.changed().await.is_ok() {}
    }
}

/// Runs `fut` unless the stop comes first; `None` means stopped (and `fut` dropped).
pub(crate) async fn or_stop<F: Future>(stop: &mut StopSignal, fut: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = stop.wait() => None,
        out = fut => Some(out),
    }
}

/// Sleeps until `deadline`; false when the stop came first.
pub(crate) async fn sleep_until_or_stop(deadline: Instant, stop: &mut StopSignal) -> bool {
    or_stop(stop, tokio::time::sleep_until(deadline))
        .await
        .is_some()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn hold_missing_adds_only_absent_ids() {
        let inst = |id: &str, port: u16| Instance {
            id: id.into(),
            service: "web".into(),
            address: "127.0.0.1".into(),
            port,
            tags: vec![],
            meta: Default::default(),
            weights: (1, 1),
        };
        let mut current = vec![inst("a", 2)];
        let held = hold_missing(&mut current, &[inst("a", 1), inst("b", 1)]);
        assert_eq!(held, 1);
        assert_eq!(current, vec![inst("a", 2), inst("b", 1)]);
    }

    use super::*;

    #[test]
    fn index_moves_forward_and_never_to_zero() {
        assert_eq!(next_index(0, 0), IndexStep::Wait(1));
        assert_eq!(next_index(0, 42), IndexStep::Wait(42));
        assert_eq!(next_index(42, 42), IndexStep::Wait(42));
        assert_eq!(next_index(42, 43), IndexStep::Wait(43));
        assert_eq!(next_index(1, 1), IndexStep::Wait(1));
    }

    #[test]
    fn index_going_backwards_resets() {
        assert_eq!(next_index(42, 41), IndexStep::Reset);
        assert_eq!(next_index(42, 1), IndexStep::Reset);
        // A missing header (0) after a real index is treated as going backwards too.
        assert_eq!(next_index(42, 0), IndexStep::Reset);
        // After a reset the query runs on 0, and whatever comes back is accepted.
        assert_eq!(next_index(0, 7), IndexStep::Wait(7));
    }

    #[test]
    fn connection_failures_reset_the_index() {
        let refused = Error::Transport(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert_eq!(index_after_error(42, &refused), 0);
        // A blocking query cut off as the agent went away (hyper: "connection closed before
        // message completed") is no connect failure, but the agent may be a new one too.
        let cut = Error::Transport(Box::new(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before message completed",
        )));
        assert!(!cut.is_connect());
        assert!(lost_contact(&cut));
        assert_eq!(index_after_error(42, &cut), 0);
        // The agent answered (or is merely slow): its index sequence is still valid.
        let status = Error::Status {
            status: 500,
            body: String::new(),
        };
        assert_eq!(index_after_error(42, &status), 42);
        assert_eq!(
            index_after_error(42, &Error::Timeout(Duration::from_secs(1))),
            42
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let min = Duration::from_millis(250);
        let max = Duration::from_secs(10);
        let ms = |n| backoff_ceiling(n, min, max).as_millis();
        assert_eq!(ms(0), 250);
        assert_eq!(ms(1), 250);
        assert_eq!(ms(2), 500);
        assert_eq!(ms(3), 1000);
        assert_eq!(ms(6), 8000);
        assert_eq!(ms(7), 10_000);
        assert_eq!(ms(1000), 10_000);
        assert_eq!(ms(u32::MAX), 10_000);
    }

    #[test]
    fn jitter_stays_within_half_and_full_ceiling() {
        for ceiling_ms in [0u64, 1, 3, 250, 10_000] {
            let ceiling = Duration::from_millis(ceiling_ms);
            for _ in 0..200 {
                let d = jitter(ceiling);
                assert!(d >= ceiling / 2 && d <= ceiling, "{d:?} for {ceiling:?}");
            }
        }
    }

    #[test]
    fn rate_limit_allows_a_burst_then_one_per_interval() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(100);
        let mut rl = RateLimit::new(3, iv, t0);
        assert_eq!(rl.reserve(t0), t0);
        assert_eq!(rl.reserve(t0), t0);
        assert_eq!(rl.reserve(t0), t0);
        assert_eq!(rl.reserve(t0), t0 + iv);
        assert_eq!(rl.reserve(t0), t0 + iv * 2);
        // Idle time refills the bucket, but never beyond the burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(rl.reserve(later), later);
        assert_eq!(rl.reserve(later), later);
        assert_eq!(rl.reserve(later), later);
        assert_eq!(rl.reserve(later), later + iv);
    }

    #[test]
    fn rate_limit_refills_one_token_per_interval() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(100);
        let mut rl = RateLimit::new(2, iv, t0);
        assert_eq!(rl.reserve(t0), t0);
        assert_eq!(rl.reserve(t0), t0);
        // One interval later exactly one token is back.
        let t1 = t0 + iv;
        assert_eq!(rl.reserve(t1), t1);
        assert_eq!(rl.reserve(t1), t1 + iv);
    }

    #[test]
    fn rate_limit_burst_zero_means_one() {
        let t0 = Instant::now();
        let iv = Duration::from_millis(100);
        let mut rl = RateLimit::new(0, iv, t0);
        assert_eq!(rl.reserve(t0), t0);
        assert_eq!(rl.reserve(t0), t0 + iv);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_loop_runs_at_the_sustained_rate() {
        let (_tx, rx) = watch::channel(());
        let mut stop = StopSignal(rx);
        let iv = Duration::from_millis(100);
        let start = Instant::now();
        let mut rl = RateLimit::new(3, iv, start);
        for _ in 0..13 {
            assert!(sleep_until_or_stop(rl.reserve(Instant::now()), &mut stop).await);
        }
        // 3 free, then 10 spaced by the interval.
        assert_eq!(Instant::now() - start, iv * 10);
    }

    #[tokio::test(start_paused = true)]
    async fn stop_interrupts_a_sleep() {
        let (tx, rx) = watch::channel(());
        let mut stop = StopSignal(rx);
        let start = Instant::now();
        let sleeper = tokio::spawn(async move {
            sleep_until_or_stop(Instant::now() + Duration::from_secs(3600), &mut stop).await
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(tx);
        assert!(!sleeper.await.unwrap());
        assert!(Instant::now() - start < Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn stop_signal_stays_stopped() {
        let (tx, rx) = watch::channel(());
        let mut stop = StopSignal(rx);
        drop(tx);
        stop.wait().await;
        assert_eq!(or_stop(&mut stop, async { 1 }).await, None);
    }
}
