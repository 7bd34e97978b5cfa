//! The balancer's validated configuration: routes and timeouts, already typed.

use std::fmt;
use std::time::Duration;

/// Default connect timeout to an instance. An instance whose accept queue is full drops the
/// SYN, and the kernel sends it again after 1 s and after 3 s: the timeout outlives both
/// retransmits, so a burst of new connections queues rather than fails (at 1 s, a burst of
/// 200 connects to an instance with a backlog of 128 failed a third of them). A refused
/// connect still fails at once.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// Default time to wait for an instance's response head before answering 504.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a client gets to send its request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default idle time of a pooled upstream connection; below the instances' own idle limits
/// (our worker closes idle keep-alive connections at 30 s, nginx at 75 s, Go at 90 s) so the
/// balancer, not the instance, closes them, and a request never races an instance's close.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Default deadline for in-flight requests on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default cap on concurrent client connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default largest request head (bytes) a client may send.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Default cap on open admin connections: the admin listener serves a few operators and
/// scrapers; past the cap, connections wait in the listen backlog and cost no file descriptor,
/// so they cannot starve the proxy port.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default time an admin connection may sit with no byte moving either way (a client that
/// stops reading its answer); waiting for a request head is bounded by the header-read timeout.
pub const DEFAULT_ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of extra attempts for idempotent requests that failed after being sent.
pub const DEFAULT_RETRIES: u32 = 2;
/// Default time an upgraded connection (WebSocket) may carry nothing either way before it is
/// closed: generous, since a quiet WebSocket is normal, but never unbounded.
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default longest wait for a place at an instance under `--max-conns-per-instance`.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default most requests waiting for a place, per event loop.
pub const DEFAULT_MAX_QUEUE: usize = 1024;
/// Default most concurrent streams of one HTTP/2 client connection, which bounds the
/// upstream connections one client connection can hold open at once.
pub const DEFAULT_HTTP2_MAX_STREAMS: u32 = 64;

/// One route: requests whose path starts with `prefix` go to Consul service `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    /// Starts with `/`; `/` matches everything.
    pub prefix: String,
}

/// Why a route spec was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError(pub String);

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RouteError {}

impl Route {
    /// Parses `web` (routes `/`) or `api=/api` (routes the `/api` prefix).
    pub fn parse(spec: &str) -> Result<Self, RouteError> {
        let (service, prefix) = match spec.split_once('=') {
            Some((s, p)) => (s.trim(), p.trim()),
            None => (spec.trim(), "/"),
        };
        if service.is_empty() {
            return Err(RouteError(format!(
                "--service {spec:?}: the service name is empty (use NAME or NAME=/prefix)"
            )));
        }
        if !service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(RouteError(format!(
                "--service {spec:?}: {service:?} is not a valid Consul service name"
            )));
        }
        if !prefix.starts_with('/') || prefix.contains(['?', '#', ' ']) {
            return Err(RouteError(format!(
                "--service {spec:?}: the prefix must be a path starting with '/'"
            )));
        }
        // `/api/` and `/api` mean the same route.
        let prefix = if prefix.len() > 1 {
            prefix.trim_end_matches('/').to_string()
        } else {
            prefix.to_string()
        };
        Ok(Self {
            service: service.to_string(),
            prefix: if prefix.is_empty() {
                "/".into()
            } else {
                prefix
            },
        })
    }

    /// Whether `path` falls under this route: the prefix on a segment boundary, so `/api`
    /// takes `/api` and `/api/x` but not `/apix`.
    pub fn matches(&self, path: &str) -> bool {
        if self.prefix == "/" {
            return true;
        }
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

/// Everything the balancer needs, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sorted longest prefix first, so the first match is the longest.
    pub routes: Vec<Route>,
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub header_read_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub retries: u32,
    /// Most admin connections open at once.
    pub admin_max_connections: usize,
    /// An admin connection on which nothing moves for this long is closed.
    pub admin_idle_timeout: Duration,
    /// Consul blocking-query wait for the watchers.
    pub watch_wait: Duration,
    /// Longest silence both ways on an upgraded connection.
    pub tunnel_idle_timeout: Duration,
    pub http2_max_streams: u32,
    /// HTTP/1 fast-path event loops, each on its own thread (at least one).
    pub event_loops: usize,
    /// For idempotent bodiless requests: how long one attempt may wait for the first byte of
    /// the answer before the request goes to another instance. `None`: no such limit (the
    /// upstream timeout alone applies).
    pub first_byte_timeout: Option<Duration>,
    /// Most requests at one instance at once (HAProxy's per-server `maxconn`); more wait in
    /// a queue. `None`: no limit.
    pub max_conns_per_instance: Option<usize>,
    /// Longest wait in that queue before the answer is 503.
    pub queue_timeout: Duration,
    /// Most requests waiting in the queue of one event loop; more are answered 503 at once.
    pub max_queue: usize,
}

impl Config {
    /// A config with default timeouts for `routes`; fails on duplicate prefixes.
    pub fn new(mut routes: Vec<Route>) -> Result<Self, RouteError> {
        if routes.is_empty() {
            return Err(RouteError(
                "no route: give at least one --service NAME[=/prefix]".into(),
            ));
        }
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(a.prefix.cmp(&b.prefix))
        });
        for pair in routes.windows(2) {
            if pair[0].prefix == pair[1].prefix {
                return Err(RouteError(format!(
                    "prefix {} is routed twice ({} and {})",
                    pair[0].prefix, pair[0].service, pair[1].service
                )));
            }
        }
        Ok(Self {
            routes,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            upstream_timeout: DEFAULT_UPSTREAM_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            pool_idle_timeout: DEFAULT_POOL_IDLE_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            retries: DEFAULT_RETRIES,
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            admin_idle_timeout: DEFAULT_ADMIN_IDLE_TIMEOUT,
            watch_wait: discovery::watch::DEFAULT_WAIT,
            tunnel_idle_timeout: DEFAULT_TUNNEL_IDLE_TIMEOUT,
            http2_max_streams: DEFAULT_HTTP2_MAX_STREAMS,
            event_loops: 1,
            first_byte_timeout: None,
            max_conns_per_instance: None,
            queue_timeout: DEFAULT_QUEUE_TIMEOUT,
            max_queue: DEFAULT_MAX_QUEUE,
        })
    }

    /// The route for `path`: the longest matching prefix.
    pub fn route_for(&self, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.matches(path))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            Route::parse("web").unwrap(),
            Route {
                service: "web".into(),
                prefix: "/".into()
            }
        );
        assert_eq!(Route::parse("api=/api/").unwrap().prefix, "/api");
        assert!(Route::parse("=/x").is_err());
        assert!(Route::parse("api=x").is_err());
        assert!(Route::parse("a b").is_err());
    }

    #[test]
    fn longest_prefix_wins_on_segment_boundaries() {
        let cfg = Config::new(vec![
            Route::parse("web").unwrap(),
            Route::parse("api=/api").unwrap(),
            Route::parse("v2=/api/v2").unwrap(),
        ])
        .unwrap();
        let svc = |p: &str| cfg.route_for(p).map(|i| cfg.routes[i].service.as_str());
        assert_eq!(svc("/"), Some("web"));
        assert_eq!(svc("/apix"), Some("web"));
        assert_eq!(svc("/api"), Some("api"));
        assert_eq!(svc("/api/users"), Some("api"));
        assert_eq!(svc("/api/v2/x"), Some("v2"));
    }

    #[test]
    fn duplicate_prefixes_refused() {
        assert!(Config::new(vec![
            Route::parse("a").unwrap(),
            Route::parse("b=/").unwrap()
        ])
        .is_err());
        assert!(Config::new(vec![]).is_err());
    }

    #[test]
    fn without_root_route_unmatched_paths_have_none() {
        let cfg = Config::new(vec![Route::parse("api=/api").unwrap()]).unwrap();
        assert_eq!(cfg.route_for("/other"), None);
    }
}
