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

/// One route: requests whose path starts with `prefix` (and, when `host` is set, whose
/// `Host` is `host`) go to Consul service `service`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub service: String,
    /// Starts with `/`; `/` matches everything.
    pub prefix: String,
    /// Lower case, without a port; `None` matches any host.
    pub host: Option<String>,
    /// Removed from the start of the path before forwarding (and sent as
    /// `X-Forwarded-Prefix`); `None` forwards the path as it came.
    pub strip: Option<String>,
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

/// `/api/` and `/api` mean the same route; `/` stays `/`.
fn normalize_prefix(prefix: &str) -> String {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        "/".into()
    } else {
        p.to_string()
    }
}

/// Whether `prefix` is a path we can route on: starts with `/`, no query, fragment or space.
fn valid_prefix(prefix: &str) -> bool {
    prefix.starts_with('/') && !prefix.contains(['?', '#', ' ', '*'])
}

/// Lower-cases a host and checks it is a DNS name or an IP literal, without a port.
fn normalize_host(host: &str) -> Result<String, String> {
    let host = host.to_ascii_lowercase();
    let ok = !host.is_empty()
        && host.len() <= 253
        && (host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            || (host.starts_with('[') && host.ends_with(']')));
    if ok {
        Ok(host)
    } else {
        Err(format!(
            "{host:?} is not a host name (no port, no wildcard: routes match the Host header exactly, ignoring its port)"
        ))
    }
}

/// `[host]/path` → (host, prefix).
fn split_host_path(route: &str) -> Result<(Option<String>, String), String> {
    let Some(slash) = route.find('/') else {
        return Err("a route is /prefix or host/prefix".into());
    };
    let (host, path) = route.split_at(slash);
    if !valid_prefix(path) {
        return Err("the prefix must be a path starting with '/'".into());
    }
    let host = if host.is_empty() {
        None
    } else {
        Some(normalize_host(host)?)
    };
    Ok((host, normalize_prefix(path)))
}

/// A `strip=` value: a path prefix, normalised like a route's.
fn parse_strip(v: &str) -> Result<String, String> {
    if !valid_prefix(v) {
        return Err(format!("strip={v}: expected a path starting with '/'"));
    }
    Ok(normalize_prefix(v))
}

impl Route {
    /// Parses a `--service` spec: `NAME` routes `/`; `NAME=/prefix` a path prefix on any
    /// host; `NAME=host/prefix` a prefix on one host (`NAME=host/` is the host's catch-all).
    /// Options follow after commas: `strip` removes the route's prefix before forwarding,
    /// `strip=/path` removes `/path`.
    pub fn parse(spec: &str) -> Result<Self, RouteError> {
        let bad = |why: &str| RouteError(format!("--service {spec:?}: {why}"));
        let (service, rest) = match spec.split_once('=') {
            Some((s, p)) => (s.trim(), p.trim()),
            None => (spec.trim(), "/"),
        };
        if service.is_empty() {
            return Err(bad(
                "the service name is empty (use NAME or NAME=[host]/prefix[,strip])",
            ));
        }
        if !service
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(bad(&format!(
                "{service:?} is not a valid Consul service name"
            )));
        }
        let mut parts = rest.split(',').map(str::trim);
        let route = parts.next().unwrap_or("/");
        let (host, prefix) = split_host_path(route).map_err(|e| bad(&e))?;
        let mut strip = None;
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "strip" => strip = Some(prefix.clone()),
                Some(("strip", v)) => strip = Some(parse_strip(v).map_err(|e| bad(&e))?),
                _ => {
                    return Err(bad(&format!(
                        "unknown option {opt:?} (known: strip, strip=/path)"
                    )))
                }
            }
        }
        Ok(Self {
            service: service.to_string(),
            prefix,
            host,
            strip,
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

    /// The route as people write it: `host/prefix` or `/prefix`, plus `strip=` when set.
    pub fn display(&self) -> String {
        let mut s = format!("{}{}", self.host.as_deref().unwrap_or(""), self.prefix);
        if let Some(p) = &self.strip {
            s.push_str(" strip=");
            s.push_str(p);
        }
        s
    }
}

/// A route tag that could be read: the route and the options we read but do not support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRoute {
    pub route: Route,
    /// Options ignored, each with why (`proto=tcp`, `redirect=`...).
    pub ignored: Vec<String>,
}

/// Reads a Fabio-style route tag of `service`: `PREFIX[host]/path[ opt=value ...]`.
/// `None` when the tag does not start with `tag_prefix` (not a route tag); `Err` with the
/// reason when it does but cannot be routed.
pub fn parse_tag(tag: &str, tag_prefix: &str, service: &str) -> Option<Result<TagRoute, String>> {
    let body = tag.strip_prefix(tag_prefix)?;
    Some((|| {
        let mut words = body.split_whitespace();
        let route = words.next().ok_or("nothing after the prefix")?;
        let (host, prefix) = split_host_path(route)?;
        let mut strip = None;
        let mut ignored = Vec::new();
        for w in words {
            match w.split_once('=') {
                Some(("strip", v)) => strip = Some(parse_strip(v)?),
                Some((
                    k @ ("proto" | "redirect" | "host" | "tlsskipverify" | "allow" | "deny"
                    | "auth" | "register" | "pxyproto" | "opts"),
                    _,
                )) => ignored.push(format!("{w}: option {k} is not supported")),
                _ => ignored.push(format!("{w}: unknown option")),
            }
        }
        Ok(TagRoute {
            route: Route {
                service: service.to_string(),
                prefix,
                host,
                strip,
            },
            ignored,
        })
    })())
}

/// The request target with `strip` removed from the start of its path: `/ui/app.js?x` with
/// `strip=/ui` becomes `/app.js?x`, and `/ui` becomes `/`. A target whose path does not start
/// with `strip` on a segment boundary is left as it is.
pub fn strip_target<'a>(target: &'a str, strip: &str) -> std::borrow::Cow<'a, str> {
    use std::borrow::Cow;
    if strip == "/" {
        return Cow::Borrowed(target);
    }
    match target.strip_prefix(strip) {
        Some(rest) if rest.is_empty() || rest.starts_with('?') => Cow::Owned(format!("/{rest}")),
        Some(rest) if rest.starts_with('/') => Cow::Borrowed(rest),
        _ => Cow::Borrowed(target),
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
    /// Route every service whose passing instances carry tags with this prefix
    /// (`urlprefix-`); `None` routes the `--service` flags only.
    pub tag_prefix: Option<String>,
}

impl Config {
    /// A config with default timeouts for `routes`; fails on duplicate prefixes.
    pub fn new(routes: Vec<Route>) -> Result<Self, RouteError> {
        if routes.is_empty() {
            return Err(RouteError(
                "no route: give at least one --service NAME[=/prefix]".into(),
            ));
        }
        Self::with_tags(routes, None)
    }

    /// A config for `routes` plus, with `tag_prefix`, the routes services announce in
    /// their tags; without it at least one route is needed. Fails on a route given twice.
    pub fn with_tags(
        mut routes: Vec<Route>,
        tag_prefix: Option<String>,
    ) -> Result<Self, RouteError> {
        if routes.is_empty() && tag_prefix.is_none() {
            return Err(RouteError(
                "no route: give at least one --service NAME[=/prefix], or --tag-routes".into(),
            ));
        }
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(a.prefix.cmp(&b.prefix))
                .then(a.host.cmp(&b.host))
        });
        for (i, a) in routes.iter().enumerate() {
            if let Some(b) = routes[i + 1..]
                .iter()
                .find(|b| b.prefix == a.prefix && b.host == a.host)
            {
                return Err(RouteError(format!(
                    "{}{} is routed twice ({} and {})",
                    a.host.as_deref().unwrap_or(""),
                    a.prefix,
                    a.service,
                    b.service
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
            tag_prefix,
        })
    }

    /// The route without a host for `path`: the longest matching prefix. (Requests are
    /// routed by [`crate::routes::RouteTable::lookup`], which also knows hosts and tags.)
    pub fn route_for(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|r| r.host.is_none() && r.matches(path))
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
                prefix: "/".into(),
                host: None,
                strip: None,
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
