//! The embedded Consul-compatible dev agent (`discovery agent --dev`).
//!
//! A single node, in memory, standing where `consul agent -dev` would: workers register with
//! it, the balancer watches it, and third-party Consul clients work against it unchanged on
//! the API subset in `consul-api.md`. Anything multi-host runs on real Consul.
//!
//! # Layout
//!
//! - [`state`]: the node, services, checks and Consul's indexes, behind one mutex.
//! - [`decode`]: strict, Go-compatible decoding of registration bodies.
//! - [`http`]: routes, handlers, blocking queries, Consul's exact status codes and texts.
//! - [`json`]: Consul's JSON format, and arrays assembled from rows encoded ahead of time.
//! - [`checks`]: HTTP/TCP/TTL check runners and the reaper.

mod bounds;
mod cache;
mod checks;
mod decode;
mod fields;
mod filter;
mod http;
mod json;
mod limit;
mod state;

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use state::{AbortOnDrop, Probe, Store, CRITICAL};

/// Consul's `check_reap_interval`.
pub const DEFAULT_REAP_INTERVAL: Duration = Duration::from_secs(30);
/// Consul's `check_deregister_interval_min`.
pub const DEFAULT_DEREGISTER_MIN: Duration = Duration::from_secs(60);
/// Consul's `limits.http_max_conns_per_client`.
pub const DEFAULT_MAX_CONNS_PER_CLIENT: usize = 200;
/// Time a client gets to send a request head (and, first, its first bytes).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Ping interval on HTTP/2 connections with a stream open, and how long a ping may go
/// unanswered.
const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// Most connections open at once; blocking watchers hold one each, so this is generous.
const MAX_CONNECTIONS: usize = 16_384;
/// How long open connections get to finish when the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Settings of the dev agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name (`consul agent -dev` uses the hostname).
    pub node_name: String,
    /// Datacenter, `dc1` like Consul.
    pub datacenter: String,
    /// The node's address, as registered services without an address inherit it.
    pub advertise: IpAddr,
    /// How often critical services are reaped (Consul: 30 s).
    pub reap_interval: Duration,
    /// Floor of `DeregisterCriticalServiceAfter` (Consul: 1 min).
    pub deregister_min: Duration,
    /// Most concurrent HTTP connections from one client address (Consul's
    /// `limits.http_max_conns_per_client`, default 200); 0 means no limit, as in Consul.
    pub max_conns_per_client: usize,
    /// Bound on the bytes of encoded answers the agent keeps for sharing between readers.
    pub view_cache_bytes: usize,
}

impl AgentConfig {
    /// Consul's defaults for a node named `node_name` at `advertise`.
    pub fn new(node_name: impl Into<String>, advertise: IpAddr) -> Self {
        Self {
            node_name: node_name.into(),
            datacenter: "dc1".into(),
            advertise,
            reap_interval: DEFAULT_REAP_INTERVAL,
            deregister_min: DEFAULT_DEREGISTER_MIN,
            max_conns_per_client: DEFAULT_MAX_CONNS_PER_CLIENT,
            view_cache_bytes: cache::DEFAULT_BUDGET,
        }
    }
}

/// What a blocking query waits on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Topic {
    /// Every change: the views across services (`catalog/services`, `health/state/*`, the
    /// node views).
    All,
    /// Changes to the rows of one service name, and node-level checks (which every health
    /// answer of the node shows).
    Service(String),
}

/// The channels blocking queries wait on. Each sends the store index of the last change it
/// concerns, so a value also identifies a version of the views behind it (the view cache's
/// key, with the read). A service's channel exists while someone waits on it.
struct Watches {
    all: watch::Sender<u64>,
    services: std::collections::HashMap<String, watch::Sender<u64>>,
}

/// A blocking query's place on a [`Topic`]; leaving drops the service's channel when it was
/// the last one waiting there.
pub(crate) struct Subscription<'a> {
    shared: &'a Shared,
    pub(crate) topic: Topic,
    pub(crate) rx: watch::Receiver<u64>,
}

impl Subscription<'_> {
    /// Whether other queries wait on the same topic, and so may share an answer.
    pub(crate) fn shared(&self) -> bool {
        let w = self.shared.watches();
        let tx = match &self.topic {
            Topic::All => Some(&w.all),
            Topic::Service(name) => w.services.get(name),
        };
        tx.is_some_and(|tx| tx.receiver_count() > 1)
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        if let Topic::Service(name) = &self.topic {
            let mut w = self.shared.watches();
            // Subscribing holds the same lock, so "only ours" cannot change under us.
            if w.services
                .get(name)
                .is_some_and(|tx| tx.receiver_count() <= 1)
            {
                w.services.remove(name);
            }
        }
    }
}

/// State shared by the HTTP handlers, check runners and the reaper.
pub(crate) struct Shared {
    pub(crate) config: AgentConfig,
    store: Mutex<Store>,
    /// Where blocking queries wait; `notify` wakes only those a change concerns. Locked
    /// inside the store lock (by `notify`), never the other way round.
    watches: Mutex<Watches>,
    /// Flips to true when the agent stops, so blocking queries answer at once.
    pub(crate) stopping: watch::Sender<bool>,
    pub(crate) probe_client: checks::ProbeClient,
    pub(crate) started: Instant,
    /// Encoded answers of recent reads, by read (see `http::cached_view`).
    view_cache: Mutex<cache::ViewCache>,
    /// Reads rendered from the store (not served from the view cache), for `agent/self`.
    pub(crate) renders: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn new(config: AgentConfig) -> Self {
        let node = state::NodeInfo {
            id: random_uuid(),
            name: config.node_name.clone(),
            address: config.advertise.to_string(),
            datacenter: config.datacenter.clone(),
            meta: [
                ("consul-network-segment", ""),
                ("consul-version", state::CONSUL_VERSION),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        };
        let store = Store::new(node);
        let (all, _) = watch::channel(store.index());
        let (stopping, _) = watch::channel(false);
        let view_cache = Mutex::new(cache::ViewCache::new(config.view_cache_bytes));
        Self {
            config,
            store: Mutex::new(store),
            watches: Mutex::new(Watches {
                all,
                services: std::collections::HashMap::new(),
            }),
            stopping,
            probe_client: checks::probe_client(),
            started: Instant::now(),
            view_cache,
            renders: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Locks the store. A panic while holding the lock cannot leave it half-updated in a way
    /// that matters more than stopping the agent would, so a poisoned lock is used as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The read cache; holds only encoded answers, so a poisoned lock is safe to reuse.
    pub(crate) fn view_cache(&self) -> MutexGuard<'_, cache::ViewCache> {
        self.view_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queries waiting or about to wait on a topic, for `agent/self`.
    pub(crate) fn subscriptions(&self) -> usize {
        let w = self.watches();
        w.all.receiver_count()
            + w.services
                .values()
                .map(|tx| tx.receiver_count())
                .sum::<usize>()
    }

    /// Holds only channels, so a poisoned lock is safe to reuse.
    fn watches(&self) -> MutexGuard<'_, Watches> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts waiting on `topic`. Subscribe *before* reading the store: a change that lands
    /// between the read and the wait then still wakes the query.
    pub(crate) fn subscribe(&self, topic: Topic) -> Subscription<'_> {
        let mut w = self.watches();
        let rx = match &topic {
            Topic::All => w.all.subscribe(),
            Topic::Service(name) => match w.services.get(name) {
                Some(tx) => tx.subscribe(),
                None => {
                    // The newest index announced: no change to this service after it has
                    // been announced, so views cached at this value are still right.
                    let now = *w.all.borrow();
                    let (tx, rx) = watch::channel(now);
                    w.services.insert(name.clone(), tx);
                    rx
                }
            },
        };
        Subscription {
            shared: self,
            topic,
            rx,
        }
    }

    /// Wakes the blocking queries that can see what changed since the last call: those on
    /// the services touched and those on [`Topic::All`]. Everyone else sleeps on.
    pub(crate) fn notify(&self, store: &mut Store) {
        let dirty = store.take_dirty();
        let index = store.index();
        let w = self.watches();
        w.all.send_replace(index);
        if dirty.all {
            for tx in w.services.values() {
                tx.send_replace(index);
            }
        } else {
            for name in &dirty.names {
                if let Some(tx) = w.services.get(name) {
                    tx.send_replace(index);
                }
            }
        }
    }

    /// Starts the runners of newly stored checks and parks their handles in the rows.
    pub(crate) fn start_runners(self: &Arc<Self>, runners: Vec<(String, u64, Probe)>) {
        let mut store = self.lock();
        for (id, generation, probe) in runners {
            let Some(row) = store.checks.get_mut(&id) else {
                continue;
            };
            if row.generation != generation {
                continue;
            }
            let ttl = row.ttl_deadline.as_ref().map(|tx| tx.subscribe());
            if let Some(handle) = checks::spawn(self, id, generation, probe, ttl) {
                row.runner = Some(AbortOnDrop(handle));
            }
        }
    }

    /// A runner's result; ignored when the row was replaced since the runner started.
    pub(crate) fn report(&self, check_id: &str, generation: u64, status: &str, output: String) {
        let mut store = self.lock();
        if store.checks.get(check_id).map(|r| r.generation) != Some(generation) {
            return;
        }
        if store.set_status(check_id, status, output) {
            tracing::debug!(check = check_id, status, "check status changed");
            self.notify(&mut store);
        }
    }

    pub(crate) fn output_max(&self, check_id: &str) -> usize {
        self.lock()
            .checks
            .get(check_id)
            .map_or(state::DEFAULT_OUTPUT_MAX, |r| r.output_max)
    }

    /// A TTL ran out: critical, with Consul's output.
    pub(crate) fn expire_ttl(&self, check_id: &str, generation: u64) {
        let mut store = self.lock();
        let Some(row) = store.checks.get(check_id) else {
            return;
        };
        if row.generation != generation {
            return;
        }
        let output = if row.hc().output.is_empty() || row.hc().output.starts_with("TTL expired") {
            "TTL expired".to_string()
        } else {
            format!(
                "TTL expired (last output before timeout follows): {}",
                row.hc().output
            )
        };
        if store.set_status(check_id, CRITICAL, output) {
            tracing::info!(check = check_id, "TTL check expired");
            self.notify(&mut store);
        }
    }

    /// Deregisters services critical for longer than their `DeregisterCriticalServiceAfter`.
    pub(crate) fn reap(&self, now: Instant) {
        let mut store = self.lock();
        let ids = store.reapable(now);
        let mut changed = false;
        for id in ids {
            tracing::info!(service = %id, "reaping service critical past DeregisterCriticalServiceAfter");
            changed |= store.deregister_service(&id);
        }
        if changed {
            self.notify(&mut store);
        }
    }
}

/// A random version-4 UUID in the usual text form, for the node ID.
fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Serves the agent API on `listener` until `shutdown` completes, then stops accepting,
/// answers open blocking queries at once, and gives connections a short grace period.
pub async fn run(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared::new(config));
    let reaper = AbortOnDrop(tokio::spawn(checks::reaper(
        Arc::downgrade(&shared),
        shared.config.reap_interval,
    )));
    // Tells open connections to finish (HTTP/1 after the current answer, h2 with a GOAWAY).
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // Pings find an HTTP/2 peer that went away while a stream was open (an idle one is
    // closed by `serve_until_idle`).
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(HTTP2_PING_INTERVAL))
        .keep_alive_timeout(HTTP2_PING_INTERVAL);
    // Shared with the connection tasks, which serve only once the protocol is known.
    let builder = Arc::new(builder);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_client = limit::ConnLimit::new(shared.config.max_conns_per_client);
    tracing::info!(addr = ?listener.local_addr().ok(), node = %shared.config.node_name, "dev agent serving the Consul HTTP API");
    tokio::pin!(shutdown);
    while let Some((permit, stream, peer)) =
        crate::serve::accept(&listener, &permits, &mut shutdown).await
    {
        // Counted from the accept, before any byte is read, as Consul counts.
        let Some(slot) = per_client.admit(peer.ip()) else {
            tracing::warn!(%peer, limit = shared.config.max_conns_per_client, "too many concurrent connections from one client address; answered 429");
            tokio::spawn(async move {
                limit::refuse(stream).await;
                drop(permit);
            });
            continue;
        };
        let shared = shared.clone();
        // Open requests (h2 streams), so that a connection idle with none is closed like an
        // idle HTTP/1 keep-alive one.
        let activity = Arc::new(crate::serve::StreamActivity::default());
        let counted = Arc::clone(&activity);
        let service = hyper::service::service_fn(move |req| {
            let shared = shared.clone();
            let stream = counted.open();
            async move {
                let resp = http::handle(shared, req, peer).await;
                Ok::<_, std::convert::Infallible>(
                    resp.map(|b| crate::serve::Tracked::new(b, Some(stream))),
                )
            }
        });
        let builder = Arc::clone(&builder);
        let stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            if crate::serve::protocol_decided(&stream, HEADER_READ_TIMEOUT).await {
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                let served = crate::serve::serve_until_idle(
                    conn,
                    &activity,
                    HEADER_READ_TIMEOUT,
                    stop_rx,
                    |c| c.graceful_shutdown(),
                );
                if let Err(e) = served.await {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
            } else {
                tracing::debug!(%peer, "no request within the header read timeout; closing");
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    shared.stopping.send_replace(true);
    stop.send_replace(true);
    // Every connection holds a permit until it ends.
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    tokio::select! {
        _ = permits.acquire_many(all) => tracing::info!("dev agent stopped"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("dev agent stopped with connections still open"),
    }
    drop(reaper);
    // Dropping the rows aborts every check runner.
    let mut store = shared.lock();
    store.checks.clear();
    store.services.clear();
    Ok(())
}
