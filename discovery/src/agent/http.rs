//! The agent's HTTP API: routing with Consul's method table, handlers, blocking queries, and
//! Consul's exact status codes and plain-text error bodies (`consul-api.md` §1).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};

use super::decode::{self, CheckDef};
use super::filter::{self, Filter};
use super::state::{self, Probe, Store, CRITICAL, PASSING, WARNING};
use super::Shared;
use crate::wire::{
    AgentService, CatalogService, HealthCheck, Member, NodeService, ServiceEntry,
    SERVICE_MAINTENANCE_PREFIX,
};

type Resp = Response<Full<Bytes>>;

/// Largest request body the agent reads.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Consul's `default_query_time` and `max_query_time`.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_MAINT_REASON: &str =
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message.";
const DEFAULT_NODE_MAINT_REASON: &str =
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Register,
    Deregister,
    ServiceMaintenance,
    AgentService,
    AgentServices,
    AgentChecks,
    Members,
    AgentSelf,
    NodeMaintenance,
    CheckRegister,
    CheckDeregister,
    CheckTtl(&'static str),
    CheckUpdate,
    AgentHealthById,
    AgentHealthByName,
    HealthService,
    HealthChecks,
    HealthNode,
    HealthState,
    CatalogServices,
    CatalogService,
    CatalogNodes,
    CatalogNode,
    CatalogDatacenters,
    CatalogWrite,
    Leader,
    Peers,
}

/// Path, whether it is a prefix (Go's `ServeMux` trailing-slash rule), methods, route.
const ROUTES: &[(&str, bool, &str, Route)] = &[
    ("/v1/agent/service/register", false, "PUT", Route::Register),
    (
        "/v1/agent/service/deregister/",
        true,
        "PUT",
        Route::Deregister,
    ),
    (
        "/v1/agent/service/maintenance/",
        true,
        "PUT",
        Route::ServiceMaintenance,
    ),
    ("/v1/agent/service/", true, "GET", Route::AgentService),
    ("/v1/agent/services", false, "GET", Route::AgentServices),
    ("/v1/agent/checks", false, "GET", Route::AgentChecks),
    ("/v1/agent/members", false, "GET", Route::Members),
    ("/v1/agent/self", false, "GET", Route::AgentSelf),
    (
        "/v1/agent/maintenance",
        false,
        "PUT",
        Route::NodeMaintenance,
    ),
    (
        "/v1/agent/check/register",
        false,
        "PUT",
        Route::CheckRegister,
    ),
    (
        "/v1/agent/check/deregister/",
        true,
        "PUT",
        Route::CheckDeregister,
    ),
    (
        "/v1/agent/check/pass/",
        true,
        "PUT",
        Route::CheckTtl(PASSING),
    ),
    (
        "/v1/agent/check/warn/",
        true,
        "PUT",
        Route::CheckTtl(WARNING),
    ),
    (
        "/v1/agent/check/fail/",
        true,
        "PUT",
        Route::CheckTtl(CRITICAL),
    ),
    ("/v1/agent/check/update/", true, "PUT", Route::CheckUpdate),
    (
        "/v1/agent/health/service/id/",
        true,
        "GET",
        Route::AgentHealthById,
    ),
    (
        "/v1/agent/health/service/name/",
        true,
        "GET",
        Route::AgentHealthByName,
    ),
    ("/v1/health/service/", true, "GET", Route::HealthService),
    ("/v1/health/checks/", true, "GET", Route::HealthChecks),
    ("/v1/health/node/", true, "GET", Route::HealthNode),
    ("/v1/health/state/", true, "GET", Route::HealthState),
    ("/v1/catalog/services", false, "GET", Route::CatalogServices),
    ("/v1/catalog/service/", true, "GET", Route::CatalogService),
    ("/v1/catalog/nodes", false, "GET", Route::CatalogNodes),
    ("/v1/catalog/node/", true, "GET", Route::CatalogNode),
    (
        "/v1/catalog/datacenters",
        false,
        "GET",
        Route::CatalogDatacenters,
    ),
    ("/v1/catalog/register", false, "PUT", Route::CatalogWrite),
    ("/v1/catalog/deregister", false, "PUT", Route::CatalogWrite),
    ("/v1/status/leader", false, "GET", Route::Leader),
    ("/v1/status/peers", false, "GET", Route::Peers),
];

/// A handler's failure: an HTTP status and Consul's plain-text reason.
struct Fail(StatusCode, String);

fn fail(code: u16, msg: impl Into<String>) -> Fail {
    Fail(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        msg.into(),
    )
}

type HResult = Result<Resp, Fail>;

/// A bad `?filter=`: Consul answers the evaluator's error as a 500, on every endpoint.
impl From<filter::FilterError> for Fail {
    fn from(e: filter::FilterError) -> Self {
        fail(500, e.to_string())
    }
}

/// `?filter=`: none when absent or empty.
fn request_filter(q: &Query) -> Result<Option<Filter>, Fail> {
    match q.get("filter") {
        None | Some("") => Ok(None),
        Some(src) => Ok(Some(Filter::parse(src)?)),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty_ok() -> Resp {
    Response::new(Full::new(Bytes::new()))
}

/// Consul in dev mode pretty-prints with four spaces and a trailing newline, and Go's
/// encoder escapes `<`, `>` and `&` inside strings.
fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    // Serializing our own wire types into memory cannot fail: no maps with non-string keys.
    if value.serialize(&mut ser).is_err() {
        return b"null\n".to_vec();
    }
    out.push(b'\n');
    if !out.iter().any(|b| matches!(b, b'<' | b'>' | b'&')) {
        return out;
    }
    let mut escaped = Vec::with_capacity(out.len() + 16);
    for b in out {
        match b {
            b'<' => escaped.extend_from_slice(b"\\u003c"),
            b'>' => escaped.extend_from_slice(b"\\u003e"),
            b'&' => escaped.extend_from_slice(b"\\u0026"),
            b => escaped.push(b),
        }
    }
    escaped
}

fn json_resp<T: Serialize>(value: &T) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(encode_json(value))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Query string pairs, percent-decoded (`+` is a space, as in Go's `ParseQuery`).
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        let dec = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        Self(
            q.unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (dec(k), dec(v)),
                    None => (dec(p), String::new()),
                })
                .collect(),
        )
    }
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
    fn has(&self, key: &str) -> bool {
        self.0.iter().any(|(k, _)| k == key)
    }
    fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Handles one request; never fails (errors become Consul's plain-text answers).
pub(crate) async fn handle(shared: Arc<Shared>, req: Request<Incoming>, peer: SocketAddr) -> Resp {
    let method = req.method().clone();
    let raw_path = req.uri().path().to_string();
    let path = percent_decode_str(&raw_path)
        .decode_utf8_lossy()
        .into_owned();
    let query = Query::parse(req.uri().query());
    let Some(&(prefix, is_prefix, methods, route)) = ROUTES.iter().find(|(p, pre, _, _)| {
        if *pre {
            path.starts_with(p)
        } else {
            path == *p
        }
    }) else {
        tracing::debug!(%method, %path, %peer, "unknown endpoint");
        // Consul's `Index` handler tests whether the path *contains* `/v1/`, not its prefix.
        let body = if path.contains("/v1/") {
            "Invalid URL path: not a recognized HTTP API endpoint\n"
        } else {
            "Invalid URL path: if attempting to use the HTTP API, ensure the path starts with '/v1/'\n"
        };
        return text(StatusCode::NOT_FOUND, body);
    };
    let allow = format!("OPTIONS,{methods}");
    if method == Method::OPTIONS {
        let mut r = empty_ok();
        if let Ok(v) = HeaderValue::from_str(&allow) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    if method.as_str() != methods {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed"),
        );
        if let Ok(v) = HeaderValue::from_str(&allow) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return r;
    }
    let tail = if is_prefix {
        path[prefix.len()..].to_string()
    } else {
        String::new()
    };
    let body = if method == Method::PUT {
        match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            }
        }
    } else {
        Bytes::new()
    };
    // What identifies a read for the view cache: the path and every parameter but the
    // blocking ones, which change how long to wait, not the answer. Decoded values may hold
    // `&` and `=` (`?tag=a%26filter%3Db` is not `?tag=a&filter=b`), so every part carries its
    // length.
    let mut view_key = format!("{}:{path}", path.len());
    for (k, v) in &query.0 {
        if !matches!(k.as_str(), "index" | "wait" | "token") {
            view_key.push_str(&format!("&{}:{k}={}:{v}", k.len(), v.len()));
        }
    }
    let ctx = Ctx {
        shared,
        query,
        tail,
        body,
        view_key,
    };
    let result = dispatch(route, &ctx).await;
    match result {
        Ok(r) => r,
        Err(Fail(code, msg)) => {
            tracing::debug!(%method, %path, status = code.as_u16(), reason = %msg, "request refused");
            text(code, msg)
        }
    }
}

struct Ctx {
    shared: Arc<Shared>,
    query: Query,
    tail: String,
    body: Bytes,
    /// Cache key of a read (see [`cached_view`]).
    view_key: String,
}

async fn dispatch(route: Route, c: &Ctx) -> HResult {
    match route {
        Route::Register => register(c),
        Route::Deregister => deregister(c),
        Route::ServiceMaintenance => service_maintenance(c),
        Route::AgentService => agent_service(c).await,
        Route::AgentServices => agent_services(c),
        Route::AgentChecks => agent_checks(c),
        Route::Members => members(c),
        Route::AgentSelf => Ok(json_resp(&agent_self(&c.shared))),
        Route::NodeMaintenance => node_maintenance(c),
        Route::CheckRegister => check_register(c),
        Route::CheckDeregister => check_deregister(c),
        Route::CheckTtl(status) => {
            let note = c.query.get("note").unwrap_or("").to_string();
            ttl_update(c, status, note)
        }
        Route::CheckUpdate => check_update(c),
        Route::AgentHealthById => agent_health(c, true),
        Route::AgentHealthByName => agent_health(c, false),
        Route::HealthService => {
            if c.tail.is_empty() {
                return Err(fail(400, "Missing service name"));
            }
            let passing = match c.query.get("passing") {
                None => false,
                Some("") => true,
                Some(v) => parse_go_bool(v).ok_or_else(|| fail(400, "Invalid value for ?passing"))?,
            };
            let tags: Vec<String> = c.query.all("tag").into_iter().map(str::to_string).collect();
            let meta = node_meta_filter(&c.query);
            let name = c.tail.clone();
            blocking(c, move |s, f| {
                let entries = filter::retain(f, health_entries(s, &name, passing, &tags, &meta))?;
                Ok((entries, s.service_index(&name)))
            })
            .await
        }
        Route::HealthChecks => {
            if c.tail.is_empty() {
                return Err(fail(400, "Missing service name"));
            }
            let name = c.tail.clone();
            blocking(c, move |s, f| {
                let checks: Vec<HealthCheck> = s
                    .checks
                    .values()
                    .filter(|r| r.hc.service_name == name)
                    .map(|r| r.hc.clone())
                    .collect();
                Ok((filter::retain(f, checks)?, s.service_index(&name)))
            })
            .await
        }
        Route::HealthNode => {
            if c.tail.is_empty() {
                return Err(fail(400, "Missing node name"));
            }
            let node = c.tail.clone();
            blocking(c, move |s, f| {
                let checks: Vec<HealthCheck> = if node == s.node.name {
                    s.checks.values().map(|r| r.hc.clone()).collect()
                } else {
                    Vec::new()
                };
                Ok((filter::retain(f, checks)?, s.checks_table_index()))
            })
            .await
        }
        Route::HealthState => {
            let state = c.tail.clone();
            if state.is_empty() {
                return Err(fail(400, "Missing check state"));
            }
            if !matches!(state.as_str(), "any" | PASSING | WARNING | CRITICAL) {
                return Err(fail(400, "Bad check state"));
            }
            blocking(c, move |s, f| {
                let checks: Vec<HealthCheck> = s
                    .checks
                    .values()
                    .filter(|r| state == "any" || r.hc.status == state)
                    .map(|r| r.hc.clone())
                    .collect();
                Ok((filter::retain(f, checks)?, s.checks_table_index()))
            })
            .await
        }
        Route::CatalogServices => {
            let meta = node_meta_filter(&c.query);
            blocking(c, move |s, f| {
                let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                if node_matches(s, &meta) {
                    let node = s.node_wire();
                    for r in s.services.values() {
                        // Consul filters the service nodes (`ServiceNode` selectors), then
                        // lists what is left.
                        if let Some(f) = f {
                            if !f.matches(&catalog_service(&node, &r.svc))? {
                                continue;
                            }
                        }
                        out.entry(r.svc.service.clone())
                            .or_default()
                            .extend(r.svc.tags.iter().cloned());
                    }
                }
                Ok((out, s.services_table_index()))
            })
            .await
        }
        Route::CatalogService => {
            if c.tail.is_empty() {
                return Err(fail(400, "Missing service name"));
            }
            let name = c.tail.clone();
            let tags: Vec<String> = c.query.all("tag").into_iter().map(str::to_string).collect();
            let meta = node_meta_filter(&c.query);
            blocking(c, move |s, f| {
                let node = s.node_wire();
                let rows: Vec<CatalogService> = s
                    .services
                    .values()
                    .filter(|r| r.svc.service == name && has_tags(&r.svc, &tags))
                    .filter(|_| node_matches(s, &meta))
                    .map(|r| catalog_service(&node, &r.svc))
                    .collect();
                Ok((filter::retain(f, rows)?, s.service_index(&name)))
            })
            .await
        }
        Route::CatalogNodes => {
            let meta = node_meta_filter(&c.query);
            blocking(c, move |s, f| {
                let nodes = if node_matches(s, &meta) {
                    vec![s.node_wire()]
                } else {
                    Vec::new()
                };
                Ok((filter::retain(f, nodes)?, s.node_index()))
            })
            .await
        }
        Route::CatalogNode => {
            let node = c.tail.clone();
            blocking(c, move |s, f| {
                let v = if node == s.node.name {
                    let services: BTreeMap<String, NodeService> = s
                        .services
                        .iter()
                        .map(|(id, r)| (id.clone(), r.svc.clone()))
                        .collect();
                    // Consul filters the node's services.
                    let services = filter::retain_values(f, services)?;
                    json!({"Node": s.node_wire(), "Services": services})
                } else {
                    Value::Null
                };
                Ok((v, s.node_index()))
            })
            .await
        }
        Route::CatalogDatacenters => Ok(json_resp(&[&c.shared.config.datacenter])),
        Route::CatalogWrite => Err(fail(
            501,
            "The dev agent does not support catalog writes; register services with /v1/agent/service/register",
        )),
        Route::Leader => Ok(json_resp(&server_addr(&c.shared))),
        Route::Peers => Ok(json_resp(&[server_addr(&c.shared)])),
    }
}

fn server_addr(shared: &Shared) -> String {
    SocketAddr::new(shared.config.advertise, 8300).to_string()
}

/// `node-meta=k:v` filters (all must match).
fn node_meta_filter(q: &Query) -> Vec<(String, String)> {
    q.all("node-meta")
        .into_iter()
        .map(|kv| match kv.split_once(':') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

fn node_matches(s: &Store, filter: &[(String, String)]) -> bool {
    filter
        .iter()
        .all(|(k, v)| s.node.meta.get(k).is_some_and(|x| x == v))
}

/// Every given tag must be present, compared case-insensitively (Consul's state store).
fn has_tags(svc: &NodeService, tags: &[String]) -> bool {
    tags.iter()
        .all(|t| svc.tags.iter().any(|x| x.eq_ignore_ascii_case(t)))
}

pub(crate) fn health_entries(
    s: &Store,
    name: &str,
    passing: bool,
    tags: &[String],
    meta: &[(String, String)],
) -> Vec<ServiceEntry> {
    if !node_matches(s, meta) {
        return Vec::new();
    }
    let node = s.node_wire();
    let rows: Vec<_> = s
        .services
        .values()
        .filter(|r| r.svc.service == name && has_tags(&r.svc, tags))
        .collect();
    if rows.is_empty() {
        return Vec::new();
    }
    let mut checks = s.entry_checks(rows.iter().map(|r| r.svc.id.as_str()));
    rows.into_iter()
        .filter_map(|r| {
            let checks = checks.remove(r.svc.id.as_str()).unwrap_or_default();
            if passing && checks.iter().any(|c| c.status != PASSING) {
                return None;
            }
            Some(ServiceEntry {
                node: node.clone(),
                service: r.svc.clone(),
                checks,
            })
        })
        .collect()
}

fn catalog_service(node: &crate::wire::Node, svc: &NodeService) -> CatalogService {
    CatalogService {
        id: node.id.clone(),
        node: node.node.clone(),
        address: node.address.clone(),
        datacenter: node.datacenter.clone(),
        tagged_addresses: node.tagged_addresses.clone(),
        node_meta: node.meta.clone(),
        service_kind: svc.kind.clone(),
        service_id: svc.id.clone(),
        service_name: svc.service.clone(),
        service_tags: svc.tags.clone(),
        service_address: svc.address.clone(),
        service_tagged_addresses: svc.tagged_addresses.clone(),
        service_weights: svc.weights,
        service_meta: svc.meta.clone(),
        service_port: svc.port,
        service_socket_path: svc.socket_path.clone(),
        service_enable_tag_override: svc.enable_tag_override,
        service_proxy: svc.proxy.clone(),
        service_connect: svc.connect.clone(),
        service_locality: None,
        create_index: svc.create_index,
        modify_index: svc.modify_index,
    }
}

/// Blocking-query parameters, validated like Consul's `parseWait` and `parseConsistency`.
struct Blocking {
    index: u64,
    wait: Duration,
    consistency: &'static str,
    /// `?filter=`, applied by the view to each result item.
    filter: Option<Filter>,
}

fn parse_blocking(c: &Ctx) -> Result<Blocking, Fail> {
    let q = &c.query;
    // Consul's order (`parseInternal`): consistency flags, then `parseWait`, which reads
    // `wait` before `index`; so a request with several bad values gets Consul's message.
    let stale = q.has("stale");
    let consistent = q.has("consistent");
    if let Some(ms) = q.get("max_stale") {
        crate::duration::parse(ms)
            .map_err(|_| fail(400, format!("Invalid max_stale value {ms:?}")))?;
    }
    if stale && consistent {
        return Err(fail(
            400,
            "Cannot specify ?stale with ?consistent, conflicting semantics.",
        ));
    }
    if q.has("cached") && consistent {
        return Err(fail(
            400,
            "Cannot specify ?cached with ?consistent, conflicting semantics.",
        ));
    }
    let wait = match q.get("wait") {
        None | Some("") => DEFAULT_WAIT,
        // Go's ParseDuration accepts a negative wait, which Consul then treats as "use the
        // default"; our parser rejects negatives, so strip the sign here.
        Some(v) => crate::duration::parse(v.strip_prefix('-').unwrap_or(v))
            .map(|d| {
                if v.starts_with('-') {
                    Duration::ZERO
                } else {
                    d
                }
            })
            .map_err(|_| fail(400, "Invalid wait time"))?,
    };
    let wait = if wait.is_zero() {
        DEFAULT_WAIT
    } else {
        wait.min(MAX_WAIT)
    };
    let index = match q.get("index") {
        None | Some("") => 0,
        Some(v) => v.parse::<u64>().map_err(|_| fail(400, "Invalid index"))?,
    };
    if let Some(dc) = q.get("dc") {
        if !dc.is_empty() && dc != c.shared.config.datacenter {
            return Err(fail(500, "No path to datacenter"));
        }
    }
    // Last, as Consul's server builds the evaluator after every parameter check.
    let filter = request_filter(q)?;
    Ok(Blocking {
        index,
        wait,
        consistency: if stale {
            "stale"
        } else if consistent {
            "consistent"
        } else {
            "leader"
        },
        filter,
    })
}

/// Runs `view` now, or, with `?index=N`, again after each change until its index passes
/// `N` or the wait (plus up to wait/16 of jitter) is over. Returns with Consul's headers.
/// The view gets the request's `?filter=` and fails when it cannot be evaluated.
async fn blocking<T, F>(c: &Ctx, view: F) -> HResult
where
    T: Serialize,
    F: Fn(&Store, Option<&Filter>) -> Result<(T, u64), Fail>,
{
    let b = parse_blocking(c)?;
    let mut changes = c.shared.changes.subscribe();
    let mut stopping = c.shared.stopping.subscribe();
    let jitter = if b.index > 0 {
        let max = (b.wait / 16).as_nanos() as u64;
        Duration::from_nanos(if max > 0 {
            rand::thread_rng().gen_range(0..max)
        } else {
            0
        })
    } else {
        Duration::ZERO
    };
    let deadline = tokio::time::Instant::now() + b.wait + jitter;
    let (body, index) = loop {
        // Mark the current change as seen before reading, so a change that lands between the
        // read and the wait still wakes us.
        let seen = *changes.borrow_and_update();
        let (body, index) = cached_view(c, seen, b.filter.as_ref(), &view)?;
        if b.index == 0 || index > b.index || *stopping.borrow() {
            break (body, index);
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break (body, index) },
            _ = stopping.changed() => break (body, index),
            _ = tokio::time::sleep_until(deadline) => break (body, index),
        }
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let h = r.headers_mut();
    // Consul never sends index 0: a client echoing it back would never block.
    let shown = index.max(1).to_string();
    if let Ok(v) = HeaderValue::from_str(&shown) {
        h.insert("X-Consul-Index", v);
    }
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    h.insert(
        "X-Consul-Effective-Consistency",
        HeaderValue::from_static(b.consistency),
    );
    h.insert(
        "X-Consul-Query-Backend",
        HeaderValue::from_static("blocking-query"),
    );
    Ok(r)
}

/// Entries kept in the view cache before it is cleared; each is one distinct read.
const VIEW_CACHE_MAX: usize = 4096;

/// A read's encoded answer and index, shared by every request for the same read at the same
/// store version: one change wakes every blocking watcher of a service at once, and without
/// this each would rebuild and re-encode the same answer under the store lock.
pub(crate) struct CachedView {
    /// The change index (`Shared::changes`) the answer was computed at.
    at: u64,
    index: u64,
    body: Bytes,
}

/// The key includes `?filter=`, so each filtered read is cached apart; failures are not cached.
fn cached_view<T, F>(
    c: &Ctx,
    seen: u64,
    filter: Option<&Filter>,
    view: &F,
) -> Result<(Bytes, u64), Fail>
where
    T: Serialize,
    F: Fn(&Store, Option<&Filter>) -> Result<(T, u64), Fail>,
{
    if let Some(hit) = c
        .shared
        .view_cache()
        .get(&c.view_key)
        .filter(|v| v.at == seen)
    {
        return Ok((hit.body.clone(), hit.index));
    }
    let (value, index) = {
        let store = c.shared.lock();
        view(&store, filter)?
    };
    // Encode outside the store lock.
    let body = Bytes::from(encode_json(&value));
    let mut cache = c.shared.view_cache();
    if cache.len() >= VIEW_CACHE_MAX {
        cache.clear();
    }
    cache.insert(
        c.view_key.clone(),
        CachedView {
            at: seen,
            index,
            body: body.clone(),
        },
    );
    Ok((body, index))
}

fn decode_failed(e: decode::DecodeError) -> Fail {
    fail(400, format!("Request decode failed: {}", e.0))
}

/// Consul's `validateMetadata` for service meta.
fn validate_meta(meta: &BTreeMap<String, String>) -> Result<(), Fail> {
    if meta.len() > 64 {
        return Err(fail(
            400,
            "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs",
        ));
    }
    for (k, v) in meta {
        // Consul's `validateMetaPair` order: blank, characters, length, prefix, value.
        let reason = if k.is_empty() {
            Some("Key cannot be blank")
        } else if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            Some("Key contains invalid characters")
        } else if k.len() > 128 {
            Some("Key is too long (limit: 128 characters)")
        } else if k.starts_with("consul-") {
            Some("Key prefix 'consul-' is reserved for internal use")
        } else if v.len() > 512 {
            Some("Value is too long (limit: 512 characters)")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(fail(
                400,
                format!(
                    "Invalid Service Meta: Couldn't load metadata pair ('{k}', '{v}'): {reason}"
                ),
            ));
        }
    }
    Ok(())
}

fn valid_status(s: &str) -> bool {
    matches!(s, PASSING | WARNING | CRITICAL)
}

/// Picks how the agent runs a validated check; errors for kinds the dev agent cannot run.
fn probe_for(def: &CheckDef) -> Result<Probe, Fail> {
    if def.is_script() {
        return Err(fail(
            500,
            "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true",
        ));
    }
    if !def.http.is_empty() {
        return Ok(Probe::Http(def.clone()));
    }
    if !def.tcp.is_empty() {
        return Ok(Probe::Tcp(def.clone()));
    }
    if !def.ttl.is_zero() {
        return Ok(Probe::Ttl(def.ttl));
    }
    let kind = if !def.udp.is_empty() {
        "UDP"
    } else if !def.grpc.is_empty() {
        "gRPC"
    } else if !def.h2ping.is_empty() {
        "H2PING"
    } else if !def.docker_container_id.is_empty() {
        "Docker"
    } else if !def.os_service.is_empty() {
        "OSService"
    } else {
        "alias"
    };
    Err(fail(
        501,
        format!("The dev agent does not run {kind} checks; use HTTP, TCP or TTL checks"),
    ))
}

/// `DeregisterCriticalServiceAfter`, raised to the agent's floor as Consul does.
fn deregister_after(shared: &Shared, def: &CheckDef) -> Option<Duration> {
    let d = def.deregister_critical_service_after;
    if d.is_zero() {
        return None;
    }
    let min = shared.config.deregister_min;
    if d < min {
        tracing::warn!(check = %def.id, requested = ?d, floor = ?min, "DeregisterCriticalServiceAfter raised to the agent's minimum");
    }
    Some(d.max(min))
}

fn register(c: &Ctx) -> HResult {
    let def = decode::service_definition(&c.body).map_err(decode_failed)?;
    if def.name.is_empty() {
        return Err(fail(400, "Missing service name"));
    }
    if def
        .address
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(fail(400, "Invalid service address"));
    }
    if let Some(w) = def.weights {
        if w.passing <= 0 {
            return Err(fail(400, "Invalid Weights: Passing must be greater than 0"));
        }
        if w.warning < 0 {
            return Err(fail(
                400,
                "Invalid Weights: Warning must be greater or equal than 0",
            ));
        }
        if w.passing > 65535 || w.warning > 65535 {
            return Err(fail(
                400,
                "Invalid Weights: DNS Weight must be between 0 and 65535",
            ));
        }
    }
    validate_meta(&def.meta)?;
    if !def.kind.is_empty() {
        return Err(fail(
            501,
            format!(
                "The dev agent does not support service kind {:?}; register plain services",
                def.kind
            ),
        ));
    }
    let port = decode::service_port(&def).map_err(decode_failed)?;
    for check in &def.checks {
        check
            .validate()
            .map_err(|m| fail(400, format!("Invalid check: {m}")))?;
    }
    if def
        .checks
        .iter()
        .any(|c| !c.status.is_empty() && !valid_status(&c.status))
    {
        return Err(fail(
            400,
            "Status for checks must 'passing', 'warning', 'critical'",
        ));
    }
    let id = if def.id.is_empty() {
        def.name.clone()
    } else {
        def.id.clone()
    };
    let total = def.checks.len();
    let mut checks = Vec::with_capacity(total);
    for (n, check) in def.checks.iter().enumerate() {
        let probe = probe_for(check)?;
        let mut check = check.clone();
        if check.id.is_empty() {
            check.id = if total == 1 {
                format!("service:{id}")
            } else {
                format!("service:{id}:{}", n + 1)
            };
        }
        if check.name.is_empty() {
            check.name = format!("Service '{}' check", def.name);
        }
        let after = deregister_after(&c.shared, &check);
        checks.push((check, probe, after));
    }
    let mut svc = NodeService {
        id: id.clone(),
        service: def.name.clone(),
        tags: def.tags.clone(),
        address: def.address.clone(),
        tagged_addresses: def.tagged_addresses.clone(),
        meta: def.meta.clone(),
        port,
        socket_path: def.socket_path.clone(),
        weights: state::weights_or_default(def.weights),
        enable_tag_override: def.enable_tag_override,
        proxy: Some(def.proxy.clone().unwrap_or_else(state::default_proxy)),
        connect: Some(def.connect.clone().unwrap_or_else(|| json!({}))),
        ..Default::default()
    };
    state::auto_tagged_addresses(&mut svc);
    let replace = c
        .query
        .get("replace-existing-checks")
        .is_some_and(|v| v.is_empty() || v == "true");
    let applied = {
        let mut store = c.shared.lock();
        let applied = store.register_service(svc, checks, replace);
        if applied.changed {
            c.shared.notify(&store);
        }
        applied
    };
    tracing::info!(service = %def.name, id = %id, changed = applied.changed, "service registered");
    c.shared.start_runners(applied.new_runners);
    Ok(empty_ok())
}

fn unknown_service(id: &str) -> Fail {
    fail(
        404,
        format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."),
    )
}

fn unknown_check(id: &str) -> Fail {
    fail(
        404,
        format!("Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."),
    )
}

fn deregister(c: &Ctx) -> HResult {
    let mut store = c.shared.lock();
    if !store.deregister_service(&c.tail) {
        return Err(unknown_service(&c.tail));
    }
    c.shared.notify(&store);
    tracing::info!(id = %c.tail, "service deregistered");
    Ok(empty_ok())
}

fn parse_enable(c: &Ctx) -> Result<bool, Fail> {
    let v = c
        .query
        .get("enable")
        .ok_or_else(|| fail(400, "Missing value for enable"))?;
    parse_go_bool(v).ok_or_else(|| fail(400, format!("Invalid value for enable: {v:?}")))
}

fn service_maintenance(c: &Ctx) -> HResult {
    if c.tail.is_empty() {
        return Err(fail(400, "Missing service ID"));
    }
    let enable = parse_enable(c)?;
    let mut store = c.shared.lock();
    let Some(row) = store.services.get(&c.tail).filter(|r| !r.catalog_only) else {
        return Err(unknown_service(&c.tail));
    };
    let check_id = format!("{SERVICE_MAINTENANCE_PREFIX}{}", c.tail);
    let changed = if enable {
        let reason = c
            .query
            .get("reason")
            .filter(|r| !r.is_empty())
            .unwrap_or(DEFAULT_MAINT_REASON);
        let hc = HealthCheck {
            node: store.node.name.clone(),
            check_id,
            name: "Service Maintenance Mode".into(),
            status: CRITICAL.into(),
            notes: reason.to_string(),
            service_id: row.svc.id.clone(),
            service_name: row.svc.service.clone(),
            service_tags: row.svc.tags.clone(),
            kind: "maintenance".into(),
            definition: json!({}),
            ..Default::default()
        };
        store.add_static_check(hc)
    } else {
        store.remove_check(&check_id)
    };
    if changed {
        c.shared.notify(&store);
    }
    tracing::info!(id = %c.tail, enable, "service maintenance");
    Ok(empty_ok())
}

fn node_maintenance(c: &Ctx) -> HResult {
    let enable = parse_enable(c)?;
    let mut store = c.shared.lock();
    let check_id = crate::wire::NODE_MAINTENANCE_CHECK;
    let changed = if enable {
        let reason = c
            .query
            .get("reason")
            .filter(|r| !r.is_empty())
            .unwrap_or(DEFAULT_NODE_MAINT_REASON);
        let hc = HealthCheck {
            node: store.node.name.clone(),
            check_id: check_id.into(),
            name: "Node Maintenance Mode".into(),
            status: CRITICAL.into(),
            notes: reason.to_string(),
            kind: "maintenance".into(),
            definition: json!({}),
            ..Default::default()
        };
        store.add_static_check(hc)
    } else {
        store.remove_check(check_id)
    };
    if changed {
        c.shared.notify(&store);
    }
    Ok(empty_ok())
}

fn check_register(c: &Ctx) -> HResult {
    let mut def = decode::check_definition(&c.body).map_err(decode_failed)?;
    if def.name.is_empty() {
        return Err(fail(400, "Missing check name"));
    }
    if !def.status.is_empty() && !valid_status(&def.status) {
        return Err(fail(400, "Bad check status"));
    }
    def.validate()
        .map_err(|m| fail(400, format!("Invalid check: {m}")))?;
    if def.id.is_empty() {
        def.id = def.name.clone();
    }
    let probe = probe_for(&def)?;
    let after = deregister_after(&c.shared, &def);
    let applied = {
        let mut store = c.shared.lock();
        let known = store
            .services
            .get(&def.service_id)
            .is_some_and(|r| !r.catalog_only);
        if !def.service_id.is_empty() && !known {
            return Err(fail(
                404,
                format!("ServiceID {:?} does not exist", def.service_id),
            ));
        }
        let applied = store.register_check(def, probe, after);
        c.shared.notify(&store);
        applied
    };
    c.shared.start_runners(applied.new_runners);
    Ok(empty_ok())
}

fn check_deregister(c: &Ctx) -> HResult {
    let mut store = c.shared.lock();
    if c.tail == "serfHealth" || !store.remove_check(&c.tail) {
        return Err(unknown_check(&c.tail));
    }
    c.shared.notify(&store);
    Ok(empty_ok())
}

fn ttl_update(c: &Ctx, status: &str, output: String) -> HResult {
    let mut store = c.shared.lock();
    let Some(row) = store
        .checks
        .get(&c.tail)
        .filter(|r| r.hc.check_id != "serfHealth")
    else {
        return Err(unknown_check(&c.tail));
    };
    let Probe::Ttl(ttl) = row.probe else {
        return Err(fail(
            500,
            format!("CheckID {:?} does not have associated TTL", c.tail),
        ));
    };
    let max = row.output_max;
    let output = if output.len() > max {
        let mut cut = max;
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        format!(
            "{} ... (captured {max} of {} bytes)",
            &output[..cut],
            output.len()
        )
    } else {
        output
    };
    if let Some(tx) = &row.ttl_deadline {
        tx.send_replace(Instant::now() + ttl);
    }
    if store.set_status(&c.tail, status, output) {
        c.shared.notify(&store);
    }
    Ok(empty_ok())
}

fn check_update(c: &Ctx) -> HResult {
    let v = decode::parse_body(&c.body).map_err(decode_failed)?;
    let (mut status, mut output) = (String::new(), String::new());
    if let Value::Object(m) = &v {
        for (k, val) in m {
            let target = if k.eq_ignore_ascii_case("Status") {
                &mut status
            } else if k.eq_ignore_ascii_case("Output") {
                &mut output
            } else {
                return Err(decode_failed(decode::DecodeError(format!(
                    "json: unknown field \"{k}\""
                ))));
            };
            match val {
                Value::String(s) => *target = s.clone(),
                Value::Null => {}
                _ => {
                    return Err(decode_failed(decode::DecodeError(format!(
                    "json: cannot unmarshal {} into Go struct field checkUpdate.{k} of type string",
                    if val.is_number() {
                        "number"
                    } else if val.is_boolean() {
                        "bool"
                    } else if val.is_array() {
                        "array"
                    } else {
                        "object"
                    }
                ))))
                }
            }
        }
    } else if !v.is_null() {
        return Err(decode_failed(decode::DecodeError(
            "json: cannot unmarshal value into Go value of type agent.checkUpdate".into(),
        )));
    }
    if !valid_status(&status) {
        return Err(fail(400, format!("Invalid check status: '{status}'")));
    }
    let status: &'static str = match status.as_str() {
        PASSING => PASSING,
        WARNING => WARNING,
        _ => CRITICAL,
    };
    ttl_update(c, status, output)
}

fn agent_service_wire(shared: &Shared, svc: &NodeService) -> AgentService {
    AgentService {
        kind: svc.kind.clone(),
        id: svc.id.clone(),
        service: svc.service.clone(),
        tags: svc.tags.clone(),
        meta: svc.meta.clone(),
        port: svc.port,
        address: svc.address.clone(),
        socket_path: svc.socket_path.clone(),
        tagged_addresses: svc.tagged_addresses.clone(),
        weights: svc.weights,
        enable_tag_override: svc.enable_tag_override,
        content_hash: String::new(),
        datacenter: shared.config.datacenter.clone(),
    }
}

fn agent_services(c: &Ctx) -> HResult {
    let filter = request_filter(&c.query)?;
    let store = c.shared.lock();
    let out: BTreeMap<String, AgentService> = store
        .services
        .iter()
        .filter(|(_, r)| !r.catalog_only)
        .map(|(id, r)| (id.clone(), agent_service_wire(&c.shared, &r.svc)))
        .collect();
    drop(store);
    Ok(json_resp(&filter::retain_values(filter.as_ref(), out)?))
}

/// A stable hash of a service's content, for hash-based blocking (`X-Consul-ContentHash`).
fn content_hash(svc: &AgentService) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    encode_json(svc).hash(&mut h);
    format!("{:016x}", h.finish())
}

/// `GET /v1/agent/service/:id`, with hash-based blocking (`?hash=&wait=`).
async fn agent_service(c: &Ctx) -> HResult {
    let id = c.tail.clone();
    let wait_for = c.query.get("hash").map(str::to_string);
    let wait = match c.query.get("wait") {
        None | Some("") => DEFAULT_WAIT,
        Some(v) => crate::duration::parse(v).map_err(|_| fail(400, "Invalid wait time"))?,
    }
    .min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = c.shared.changes.subscribe();
    let mut stopping = c.shared.stopping.subscribe();
    loop {
        changes.borrow_and_update();
        let current = {
            let store = c.shared.lock();
            store
                .services
                .get(&id)
                .filter(|r| !r.catalog_only)
                .map(|r| agent_service_wire(&c.shared, &r.svc))
        };
        let Some(mut svc) = current else {
            return Err(fail(404, format!("unknown service ID: {id}")));
        };
        let hash = content_hash(&svc);
        let unchanged = wait_for.as_deref() == Some(hash.as_str());
        if !unchanged || *stopping.borrow() {
            svc.content_hash = hash.clone();
            let mut r = json_resp(&svc);
            if let Ok(v) = HeaderValue::from_str(&hash) {
                r.headers_mut().insert("X-Consul-ContentHash", v);
            }
            return Ok(r);
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = stopping.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                svc.content_hash = hash.clone();
                let mut r = json_resp(&svc);
                if let Ok(v) = HeaderValue::from_str(&hash) {
                    r.headers_mut().insert("X-Consul-ContentHash", v);
                }
                return Ok(r);
            }
        }
    }
}

fn agent_checks(c: &Ctx) -> HResult {
    let filter = request_filter(&c.query)?;
    let store = c.shared.lock();
    // serfHealth belongs to the catalog, not to the agent's local checks.
    let out: BTreeMap<String, HealthCheck> = store
        .checks
        .iter()
        .filter(|(id, _)| id.as_str() != "serfHealth")
        .map(|(id, r)| (id.clone(), r.hc.clone()))
        .collect();
    drop(store);
    Ok(json_resp(&filter::retain_values(filter.as_ref(), out)?))
}

/// `GET /v1/agent/health/service/{id,name}/...`: the status in the HTTP code (200, 429, 503).
fn agent_health(c: &Ctx, by_id: bool) -> HResult {
    let store = c.shared.lock();
    let rows: Vec<_> = store
        .services
        .values()
        .filter(|r| !r.catalog_only)
        .filter(|r| {
            if by_id {
                r.svc.id == c.tail
            } else {
                r.svc.service == c.tail
            }
        })
        .collect();
    let as_text = c.query.get("format") == Some("text");
    if rows.is_empty() {
        let msg = if by_id {
            format!("ServiceId {} not found", c.tail)
        } else {
            format!("ServiceName {} Not Found", c.tail)
        };
        return Err(fail(404, msg));
    }
    let mut worst = PASSING;
    let mut infos = Vec::new();
    for r in &rows {
        let checks: Vec<HealthCheck> = store
            .checks
            .values()
            .filter(|ch| ch.hc.service_id == r.svc.id)
            .map(|ch| ch.hc.clone())
            .collect();
        let status = crate::wire::aggregated_status(
            checks
                .iter()
                .map(|ch| (ch.check_id.as_str(), ch.status.as_str())),
        );
        // Worst first: maintenance, critical, warning, passing.
        let rank = |s: &str| match s {
            "maintenance" => 3,
            CRITICAL => 2,
            WARNING => 1,
            _ => 0,
        };
        if rank(status) > rank(worst) {
            worst = status;
        }
        infos.push(json!({
            "AggregatedStatus": status,
            "Service": agent_service_wire(&c.shared, &r.svc),
            "Checks": checks,
        }));
    }
    let code = match worst {
        PASSING => StatusCode::OK,
        WARNING => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let worst: &'static str = match worst {
        PASSING => PASSING,
        WARNING => WARNING,
        CRITICAL => CRITICAL,
        _ => "maintenance",
    };
    let mut r = if as_text {
        text(code, worst)
    } else if by_id {
        json_resp(&infos[0])
    } else {
        json_resp(&infos)
    };
    *r.status_mut() = code;
    if code != StatusCode::OK {
        if let Ok(v) = HeaderValue::from_str(worst) {
            r.headers_mut().insert("X-Consul-Reason", v);
        }
    }
    Ok(r)
}

fn member(shared: &Shared, wan: bool) -> Member {
    let cfg = &shared.config;
    let store = shared.lock();
    let tags: BTreeMap<String, String> = [
        ("acls", "0"),
        ("build", &format!("{}:discovery", state::CONSUL_VERSION)),
        ("dc", &cfg.datacenter),
        ("ft_fs", "1"),
        ("ft_si", "1"),
        ("grpc_port", "8502"),
        ("id", &store.node.id),
        ("port", "8300"),
        ("raft_vsn", "3"),
        ("role", "consul"),
        ("segment", ""),
        ("vsn", "2"),
        ("vsn_max", "3"),
        ("vsn_min", "2"),
        ("wan_join_port", "8302"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Member {
        name: if wan {
            format!("{}.{}", cfg.node_name, cfg.datacenter)
        } else {
            cfg.node_name.clone()
        },
        addr: cfg.advertise.to_string(),
        port: if wan { 8302 } else { 8301 },
        tags,
        status: 1,
        protocol_min: 1,
        protocol_max: 5,
        protocol_cur: 2,
        delegate_min: 2,
        delegate_max: 5,
        delegate_cur: 4,
    }
}

fn members(c: &Ctx) -> HResult {
    let wan = c.query.has("wan");
    if wan && c.query.has("segment") {
        return Err(fail(400, "Cannot provide a segment with wan=true"));
    }
    let filter = request_filter(&c.query)?;
    let members = filter::retain(filter.as_ref(), vec![member(&c.shared, wan)])?;
    Ok(json_resp(&members))
}

fn agent_self(shared: &Shared) -> Value {
    let cfg = &shared.config;
    let m = member(shared, false);
    let node_id = m.tags.get("id").cloned().unwrap_or_default();
    let leader = server_addr(shared);
    let uptime = crate::duration::format(Duration::from_secs(shared.started.elapsed().as_secs()));
    let (services, checks) = {
        let s = shared.lock();
        (
            s.services.values().filter(|r| !r.catalog_only).count(),
            s.checks.len().saturating_sub(1),
        )
    };
    json!({
        "Config": {
            "Datacenter": cfg.datacenter,
            "PrimaryDatacenter": cfg.datacenter,
            "NodeName": cfg.node_name,
            "NodeID": node_id,
            "Revision": "discovery",
            "Server": true,
            "Version": state::CONSUL_VERSION,
            "BuildDate": "2026-01-01T00:00:00Z",
        },
        "DebugConfig": {
            "Datacenter": cfg.datacenter,
            "NodeName": cfg.node_name,
            "DevMode": true,
            "ServerMode": true,
            "EnableScriptChecks": false,
            "CheckReapInterval": crate::duration::format(cfg.reap_interval),
            "CheckDeregisterIntervalMin": crate::duration::format(cfg.deregister_min),
        },
        "Coord": {"Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "Error": 1.5, "Adjustment": 0.0, "Height": 1.0e-5},
        "Member": m,
        "Stats": {
            "agent": {"check_monitors": "0", "check_ttls": "0", "checks": checks.to_string(), "services": services.to_string()},
            "build": {"prerelease": "", "revision": "discovery", "version": state::CONSUL_VERSION, "version_metadata": ""},
            "consul": {"acl": "disabled", "bootstrap": "false", "known_datacenters": "1", "leader": "true", "leader_addr": leader, "server": "true"},
            "raft": {"state": "Leader", "num_peers": "0", "protocol_version": "3"},
            "runtime": {"arch": std::env::consts::ARCH, "os": std::env::consts::OS, "version": "rust", "uptime": uptime},
            "serf_lan": {"members": "1", "failed": "0", "left": "0"},
        },
        "Meta": {"consul-network-segment": "", "consul-version": state::CONSUL_VERSION},
        "xDS": {"SupportedProxies": {"envoy": []}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing_is_go_like() {
        let q = Query::parse(Some("passing&tag=a&tag=b%20c&wait=1m&stale=&x=a+b"));
        assert!(q.has("passing"));
        assert_eq!(q.get("passing"), Some(""));
        assert_eq!(q.all("tag"), vec!["a", "b c"]);
        assert_eq!(q.get("x"), Some("a b"));
    }

    #[test]
    fn json_is_pretty_and_html_escaped() {
        let out = String::from_utf8(encode_json(&json!({"a": "<b>&"}))).unwrap_or_default();
        assert_eq!(out, "{\n    \"a\": \"\\u003cb\\u003e\\u0026\"\n}\n");
    }

    #[test]
    fn routes_have_one_method_each_and_no_shadowing() {
        for (i, (p, pre, _, _)) in ROUTES.iter().enumerate() {
            for (q, qpre, _, _) in &ROUTES[..i] {
                // An earlier prefix route must not swallow a later route's path.
                assert!(
                    !(*qpre && p.starts_with(q) && !(*pre && p == q)),
                    "{q} shadows {p}"
                );
            }
        }
    }
}
