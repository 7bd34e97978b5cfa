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

use super::bounds;
use super::decode::{self, CheckDef};
use super::fields;
use super::filter::{self, Filter};
use super::json;
use super::state::{self, CheckRow, Probe, Store, CRITICAL, PASSING, WARNING};
use super::{Shared, Topic};
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
/// What Consul's root answers when its UI is off (no trailing newline).
const UI_DISABLED: &str = "Consul Agent: UI disabled. To enable, set ui_config.enabled=true in the agent configuration and restart.";
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

/// `?filter=` over items of the Go type whose fields are `fields`: none when absent or empty.
fn request_filter(q: &Query, fields: &[filter::Field]) -> Result<Option<Filter>, Fail> {
    match q.get("filter") {
        None | Some("") => Ok(None),
        Some(src) => Ok(Some(Filter::parse_for(src, fields)?)),
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

fn json_resp<T: Serialize>(value: &T) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(json::encode(value))));
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
    // Consul's `Index` handler: with the UI off (as in the dev agent), the root answers 200
    // and says so, whatever the method; health checks pointed at an agent's root rely on it.
    if path == "/" {
        return text(StatusCode::OK, UI_DISABLED);
    }
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
        // Not held while a blocking query waits: its head is parsed already.
        drop(req);
        Bytes::new()
    };
    let view_key = view_key(&path, &query);
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

/// The parameters that change a read's answer; everything else (blocking, consistency,
/// tokens, `dc` once validated, parameters we do not know) only changes how or whether it
/// is answered, and must not split the view cache.
const ANSWER_PARAMS: &[&str] = &["filter", "node-meta", "passing", "peer", "tag"];

/// What identifies a read for the view cache: the path and the parameters that change the
/// answer, in request order. Decoded values may hold `&` and `=` (`?tag=a%26filter%3Db` is
/// not `?tag=a&filter=b`), so every part carries its length.
fn view_key(path: &str, query: &Query) -> String {
    let mut key = format!("{}:{path}", path.len());
    for (k, v) in &query.0 {
        if ANSWER_PARAMS.contains(&k.as_str()) {
            key.push_str(&format!("&{}:{k}={}:{v}", k.len(), v.len()));
        }
    }
    key
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
    // Consul parses the query options (consistency, wait, index, dc) before anything of the
    // endpoint's own (`Missing service name`, `?passing`); the filter comes last, in `blocking`.
    if matches!(
        route,
        Route::HealthService
            | Route::HealthChecks
            | Route::HealthNode
            | Route::HealthState
            | Route::CatalogServices
            | Route::CatalogService
            | Route::CatalogNodes
            | Route::CatalogNode
    ) {
        query_options(c)?;
    }
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
            blocking(c, Topic::Service(name.clone()), fields::SERVICE_ENTRY, move |s, f| {
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
            blocking(c, Topic::Service(name.clone()), fields::HEALTH_CHECK, move |s, f| {
                health_checks(s, &name, f)
            })
            .await
        }
        Route::HealthNode => {
            if c.tail.is_empty() {
                return Err(fail(400, "Missing node name"));
            }
            let node = c.tail.clone();
            blocking(c, Topic::All, fields::HEALTH_CHECK, move |s, f| {
                health_node(s, &node, f)
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
            blocking(c, Topic::All, fields::HEALTH_CHECK, move |s, f| {
                health_state(s, &state, f)
            })
            .await
        }
        Route::CatalogServices => {
            let meta = node_meta_filter(&c.query);
            blocking(c, Topic::All, fields::SERVICE_NODE, move |s, f| {
                catalog_services(s, &meta, f)
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
            blocking(c, Topic::Service(name.clone()), fields::SERVICE_NODE, move |s, f| {
                let node = s.node_wire();
                let rows: Vec<CatalogService> = s
                    .instances_of(&name)
                    .filter(|r| has_tags(&r.svc, &tags))
                    .filter(|_| node_matches(s, &meta))
                    .map(|r| catalog_service(&node, &r.svc))
                    .collect();
                Ok((filter::retain(f, rows)?, s.service_index(&name)))
            })
            .await
        }
        Route::CatalogNodes => {
            let meta = node_meta_filter(&c.query);
            blocking(c, Topic::All, fields::NODE, move |s, f| {
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
            blocking(c, Topic::All, fields::NODE_SERVICE, move |s, f| {
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
    s.instances_of(name)
        .filter(|r| has_tags(&r.svc, tags))
        .filter_map(|r| {
            let checks = s.entry_checks(&r.svc.id);
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

/// `catalog/services`: each service's name and the union of its instances' tags.
fn catalog_services(
    s: &Store,
    meta: &[(String, String)],
    f: Option<&Filter>,
) -> Result<(BTreeMap<String, BTreeSet<String>>, u64), Fail> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if node_matches(s, meta) {
        let node = s.node_wire();
        // The name and tags of the last row listed. Rows come in ID order, where a service's
        // instances usually follow one another with the same tags: such a row adds nothing,
        // and looking it up in `out` cost most of a render of a large catalog.
        let mut last: Option<(&str, &[String])> = None;
        for r in s.services.values() {
            // Consul filters the service nodes (`ServiceNode` selectors), then lists what is
            // left.
            if let Some(f) = f {
                if !f.matches(&catalog_service(&node, &r.svc))? {
                    continue;
                }
            }
            let row = (r.svc.service.as_str(), r.svc.tags.as_slice());
            if last == Some(row) {
                continue;
            }
            last = Some(row);
            // Clone only the names and tags not listed yet.
            let tags = match out.get_mut(row.0) {
                Some(tags) => tags,
                None => out.entry(row.0.to_string()).or_default(),
            };
            for t in row.1 {
                if !tags.contains(t) {
                    tags.insert(t.clone());
                }
            }
        }
    }
    Ok((out, s.services_table_index()))
}

/// `health/checks/:service`: the checks of the service's instances, by check ID.
fn health_checks(s: &Store, name: &str, f: Option<&Filter>) -> Result<(json::Elements, u64), Fail> {
    let mut checks: Vec<&CheckRow> = s
        .instances_of(name)
        .flat_map(|r| s.checks_of(&r.svc.id))
        .collect();
    checks.sort_by(|a, b| a.hc().check_id.cmp(&b.hc().check_id));
    Ok((check_elements(checks, f)?, s.service_index(name)))
}

/// `health/node/:node`: every check of the node, by check ID; none for another node.
fn health_node(s: &Store, node: &str, f: Option<&Filter>) -> Result<(json::Elements, u64), Fail> {
    let checks = if node == s.node.name {
        check_elements(s.checks.values(), f)?
    } else {
        json::Elements::default()
    };
    Ok((checks, s.checks_table_index()))
}

/// `health/state/:state`: the checks in `state` (all of them for `any`), by check ID.
fn health_state(s: &Store, state: &str, f: Option<&Filter>) -> Result<(json::Elements, u64), Fail> {
    let checks = s
        .checks
        .values()
        .filter(|r| state == "any" || r.hc().status == state);
    Ok((check_elements(checks, f)?, s.checks_table_index()))
}

/// The rows `filter` selects, in order, as a JSON array of `HealthCheck`s: the bytes of
/// encoding clones of them, without the clones, and encoding again only the rows that changed
/// since the last read.
fn check_elements<'a>(
    rows: impl IntoIterator<Item = &'a CheckRow>,
    filter: Option<&Filter>,
) -> Result<json::Elements, Fail> {
    let mut out = Vec::new();
    for r in rows {
        if let Some(f) = filter {
            if !f.matches(r.hc())? {
                continue;
            }
        }
        out.push(r.element());
    }
    Ok(json::Elements(out))
}

/// What a blocking view answers, encoded after the store lock is released; `Default` is the
/// empty answer (`?peer=`).
trait Answer: Default {
    fn encode(&self) -> Vec<u8>;
}

impl<T: Serialize + Default> Answer for T {
    fn encode(&self) -> Vec<u8> {
        json::encode(self)
    }
}

impl Answer for json::Elements {
    fn encode(&self) -> Vec<u8> {
        json::Elements::encode(self)
    }
}

/// Blocking-query parameters, validated like Consul's `parseWait` and `parseConsistency`.
struct Blocking {
    index: u64,
    wait: Duration,
    consistency: &'static str,
    /// `?filter=`, applied by the view to each result item.
    filter: Option<Filter>,
    /// `?peer=NAME`: a cluster peer's data, and the dev agent has no peers.
    peer: bool,
}

/// The query options with the filter and peer left out (see `dispatch`).
fn query_options(c: &Ctx) -> Result<Blocking, Fail> {
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
        filter: None,
        peer: false,
    })
}

fn parse_blocking(c: &Ctx, fields: &[filter::Field]) -> Result<Blocking, Fail> {
    let mut b = query_options(c)?;
    // Last, as Consul's server builds the evaluator after every parameter check.
    b.filter = request_filter(&c.query, fields)?;
    b.peer = c.query.get("peer").is_some_and(|p| !p.is_empty());
    Ok(b)
}

/// Runs `view` now, or, with `?index=N`, again after each change to `topic` until its index
/// passes `N` or the wait (plus up to wait/16 of jitter) is over. Returns with Consul's
/// headers. The view gets the request's `?filter=` and fails when it cannot be evaluated.
///
/// While it waits, a query holds its subscription and nothing else: the answer it last saw
/// is dropped and rendered again (usually from the view cache) when it is woken.
///
/// With `?peer=NAME` the answer is empty (`[]`, `{}` or `null`): the dev agent has no cluster
/// peers, and Consul answers a peer it does not know with nothing, never the local data.
async fn blocking<T, F>(c: &Ctx, topic: Topic, fields: &[filter::Field], view: F) -> HResult
where
    T: Answer,
    F: Fn(&Store, Option<&Filter>) -> Result<(T, u64), Fail>,
{
    let b = parse_blocking(c, fields)?;
    let mut sub = c.shared.subscribe(topic);
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
    let mut last = false;
    let (body, index) = loop {
        // Mark the current change as seen before reading, so a change that lands between the
        // read and the wait still wakes us.
        let seen = *sub.rx.borrow_and_update();
        let (body, index) = if b.peer {
            (Bytes::from(T::default().encode()), seen)
        } else {
            cached_view(c, &sub, seen, b.filter.as_ref(), &view)?
        };
        if last || b.index == 0 || index > b.index || *stopping.borrow() {
            break (body, index);
        }
        drop(body);
        tokio::select! {
            r = sub.rx.changed() => last = r.is_err(),
            _ = stopping.changed() => last = true,
            _ = tokio::time::sleep_until(deadline) => last = true,
        }
    };
    drop(sub);
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

/// The key holds what changes the answer (see `handle`), so each filtered read is cached
/// apart; failures are not cached. An answer is kept only when other queries wait on the same
/// topic: a read nobody shares (one watcher per service, a one-off read) would only hold
/// memory there.
fn cached_view<T, F>(
    c: &Ctx,
    sub: &super::Subscription<'_>,
    seen: u64,
    filter: Option<&Filter>,
    view: &F,
) -> Result<(Bytes, u64), Fail>
where
    T: Answer,
    F: Fn(&Store, Option<&Filter>) -> Result<(T, u64), Fail>,
{
    // One answer per read and version, shared by every reader the same change wakes.
    if let Some(hit) = c.shared.view_cache().get(&c.view_key, seen) {
        return Ok((hit.body.clone(), hit.index));
    }
    let (value, index) = {
        let store = c.shared.lock();
        view(&store, filter)?
    };
    c.shared
        .renders
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Encode outside the store lock.
    let body = Bytes::from(value.encode());
    drop(value);
    if !sub.shared() {
        return Ok((body, index));
    }
    c.shared.view_cache().insert(
        &c.view_key,
        super::cache::CachedView {
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
    bounds::service(&def).map_err(|m| fail(400, format!("Invalid service: {m}")))?;
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
            .and_then(|()| bounds::check(check))
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
            c.shared.notify(&mut store);
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
    c.shared.notify(&mut store);
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
        c.shared.notify(&mut store);
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
        c.shared.notify(&mut store);
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
        .and_then(|()| bounds::check(&def))
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
        c.shared.notify(&mut store);
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
    c.shared.notify(&mut store);
    Ok(empty_ok())
}

fn ttl_update(c: &Ctx, status: &str, output: String) -> HResult {
    let mut store = c.shared.lock();
    let Some(row) = store
        .checks
        .get(&c.tail)
        .filter(|r| r.hc().check_id != "serfHealth")
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
        c.shared.notify(&mut store);
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
    let filter = request_filter(&c.query, fields::AGENT_SERVICE)?;
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
    json::encode(svc).hash(&mut h);
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
    let mut stopping = c.shared.stopping.subscribe();
    let mut sub: Option<super::Subscription<'_>> = None;
    let mut last = false;
    loop {
        if let Some(sub) = &mut sub {
            sub.rx.borrow_and_update();
        }
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
        // Only changes to this service's name can change its answer. Subscribed after the
        // first read, so read once more before waiting (and again after a rename).
        let topic = Topic::Service(svc.service.clone());
        if sub.as_ref().is_none_or(|s| s.topic != topic) {
            sub = Some(c.shared.subscribe(topic));
            continue;
        }
        let hash = content_hash(&svc);
        let unchanged = wait_for.as_deref() == Some(hash.as_str());
        if last || !unchanged || *stopping.borrow() {
            svc.content_hash = hash.clone();
            let mut r = json_resp(&svc);
            if let Ok(v) = HeaderValue::from_str(&hash) {
                r.headers_mut().insert("X-Consul-ContentHash", v);
            }
            return Ok(r);
        }
        let Some(sub) = &mut sub else { continue };
        tokio::select! {
            r = sub.rx.changed() => last = r.is_err(),
            _ = stopping.changed() => last = true,
            _ = tokio::time::sleep_until(deadline) => last = true,
        }
    }
}

fn agent_checks(c: &Ctx) -> HResult {
    let filter = request_filter(&c.query, fields::HEALTH_CHECK)?;
    let store = c.shared.lock();
    // serfHealth belongs to the catalog, not to the agent's local checks.
    let out: BTreeMap<String, HealthCheck> = store
        .checks
        .iter()
        .filter(|(id, _)| id.as_str() != "serfHealth")
        .map(|(id, r)| (id.clone(), r.hc().clone()))
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
            .filter(|ch| ch.hc().service_id == r.svc.id)
            .map(|ch| ch.hc().clone())
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
    let filter = request_filter(&c.query, fields::MEMBER)?;
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
    let (cache_entries, cache_bytes) = {
        let cache = shared.view_cache();
        (cache.len(), cache.bytes())
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
            // Not Consul's: how the dev agent's blocking queries and view cache fare.
            "dev_agent": {
                "blocking_queries": shared.subscriptions().to_string(),
                "view_renders": shared.renders.load(std::sync::atomic::Ordering::Relaxed).to_string(),
                "view_cache_entries": cache_entries.to_string(),
                "view_cache_bytes": cache_bytes.to_string(),
                "view_cache_budget": shared.config.view_cache_bytes.to_string(),
            },
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
    fn view_keys_hold_only_what_changes_the_answer() {
        let key = |q: &str| view_key("/v1/catalog/services", &Query::parse(Some(q)));
        assert_eq!(key("x=1&index=5&wait=1s&stale&token=t&dc=dc1"), key(""));
        assert_eq!(key("x=1&tag=a"), key("y=2&tag=a"));
        assert_ne!(key("tag=a"), key("tag=b"));
        assert_ne!(key("tag=a%26filter%3Db"), key("tag=a&filter=b"));
        for p in ANSWER_PARAMS {
            assert_ne!(key(&format!("{p}=v")), key(""), "{p}");
        }
    }

    /// A store with checks in every state, of two kinds, whose text needs escaping in JSON:
    /// quotes, backslashes, control characters, the `<`, `>` and `&` Go escapes, non-ASCII.
    fn varied_store() -> Store {
        let mut s = Store::new(state::NodeInfo {
            id: "6b2a4c1e-0000-4000-8000-000000000001".into(),
            name: "node<1>&".into(),
            address: "127.0.0.1".into(),
            datacenter: "dc1".into(),
            meta: BTreeMap::new(),
        });
        for (name, tags) in [
            ("web", vec!["a&b", "v1"]),
            ("db", vec![]),
            ("api", vec!["<x>"]),
        ] {
            for n in 0..3u16 {
                let id = format!("{name}-{n}");
                let svc = NodeService {
                    id: id.clone(),
                    service: name.into(),
                    tags: tags.iter().map(|t| t.to_string()).collect(),
                    port: 8000 + n,
                    ..Default::default()
                };
                let ttl = CheckDef {
                    id: format!("service:{id}"),
                    name: format!("Service '{name}' check"),
                    notes: "\"quoted\" \\ <b> & \t\n\u{1} é 中 \u{2028}".into(),
                    service_id: id.clone(),
                    ttl: Duration::from_secs(30),
                    ..Default::default()
                };
                let http = CheckDef {
                    id: format!("{id}-http"),
                    name: "HTTP <probe>".into(),
                    service_id: id.clone(),
                    http: "http://127.0.0.1/health?a=1&b=<2>".into(),
                    header: [("X-A".to_string(), vec!["1&2".to_string()])].into(),
                    interval: Duration::from_secs(10),
                    timeout: Duration::from_secs(1),
                    status: PASSING.into(),
                    ..Default::default()
                };
                let checks = vec![
                    (ttl.clone(), Probe::Ttl(ttl.ttl), None),
                    (http.clone(), Probe::Http(http), None),
                ];
                s.register_service(svc, checks, false);
            }
        }
        s.set_status("service:web-0", PASSING, "ok <fine> & \"well\"\n".into());
        s.set_status("service:db-1", WARNING, "slow\\path\r\u{7f}".into());
        s.set_status("service:api-2", PASSING, String::new());
        s
    }

    /// `?filter=src` for items with `fields`; none for `""`.
    fn test_filter(src: &str, fields: &[filter::Field]) -> Option<Filter> {
        (!src.is_empty()).then(|| match Filter::parse_for(src, fields) {
            Ok(f) => f,
            Err(e) => panic!("bad filter {src}: {e}"),
        })
    }

    /// The straightforward rendering: clones of the rows, filtered, then encoded.
    fn reference(s: &Store, rows: Vec<&CheckRow>, f: Option<&Filter>) -> Vec<u8> {
        let checks: Vec<HealthCheck> = rows.into_iter().map(|r| r.hc().clone()).collect();
        let Ok(checks) = filter::retain(f, checks) else {
            panic!("filter failed on {:?}", s.node.name);
        };
        json::encode(&checks)
    }

    /// Asserts every `health/state`, `health/node` and `health/checks` answer of `s` is the
    /// reference's bytes, for each filter.
    fn assert_checks_render_as_reference(s: &Store, when: &str) {
        let filters = [
            "",
            r#"Notes contains "<b>""#,
            "ServiceName == web",
            r#"Status != passing and ServiceTags contains "a&b""#,
            r#"Output matches "^ok <""#,
            "CheckID == nothing",
        ];
        for src in filters {
            let parsed = test_filter(src, fields::HEALTH_CHECK);
            let f = parsed.as_ref();
            let render = |r: Result<(json::Elements, u64), Fail>| match r {
                Ok((elements, _)) => elements.encode(),
                Err(Fail(code, msg)) => panic!("{when}, {src:?}: {code} {msg}"),
            };
            for state in ["any", PASSING, WARNING, CRITICAL] {
                let rows = s
                    .checks
                    .values()
                    .filter(|r| state == "any" || r.hc().status == state)
                    .collect();
                let got = render(health_state(s, state, f));
                let want = reference(s, rows, f);
                assert!(
                    got == want,
                    "{when}: health/state/{state}?filter={src}:\n{}\nwant\n{}",
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want)
                );
            }
            let all = s.checks.values().collect();
            assert!(render(health_node(s, &s.node.name, f)) == reference(s, all, f));
            assert_eq!(render(health_node(s, "other", f)), b"[]\n");
            let mut web: Vec<&CheckRow> = s
                .checks
                .values()
                .filter(|r| r.hc().service_name == "web")
                .collect();
            web.sort_by(|a, b| a.hc().check_id.cmp(&b.hc().check_id));
            assert!(render(health_checks(s, "web", f)) == reference(s, web, f));
        }
    }

    #[test]
    fn check_answers_are_the_bytes_of_encoding_the_rows() {
        let mut s = varied_store();
        assert!(s.checks.values().any(|r| r.hc().status == WARNING));
        assert_checks_render_as_reference(&s, "fresh");
        // Each kind of change after the rows' encodings are kept: output alone (no index),
        // a status, a re-registration with other notes, a removal.
        s.set_status("service:web-0", PASSING, "other & <output>".into());
        assert_checks_render_as_reference(&s, "output changed");
        s.set_status("service:web-1", CRITICAL, "now \"critical\"".into());
        s.set_status("service:db-1", PASSING, String::new());
        assert_checks_render_as_reference(&s, "status changed");
        let notes = CheckDef {
            id: "service:api-0".into(),
            name: "Service 'api' check".into(),
            notes: "new <notes> & more".into(),
            service_id: "api-0".into(),
            ttl: Duration::from_secs(30),
            ..Default::default()
        };
        let svc = s
            .services
            .get("api-0")
            .map(|r| r.svc.clone())
            .unwrap_or_default();
        s.register_service(
            svc,
            vec![(notes.clone(), Probe::Ttl(notes.ttl), None)],
            false,
        );
        assert!(
            s.checks.get("service:api-0").map(|r| r.hc().notes.as_str())
                == Some("new <notes> & more")
        );
        assert_checks_render_as_reference(&s, "re-registered");
        s.remove_check("service:web-2");
        assert_checks_render_as_reference(&s, "removed");
    }

    #[test]
    fn catalog_services_lists_every_row_as_the_plain_union_does() {
        let mut s = varied_store();
        // Names out of ID order, repeated apart, and instances of one name with other tags.
        for (id, name, tags) in [
            ("a-1", "web", vec!["v2"]),
            ("a-2", "db", vec!["v2", "a&b"]),
            ("a-3", "web", vec!["v2"]),
            ("a-4", "web", vec![]),
            ("a-5", "web", vec!["v1", "v3"]),
            ("z-1", "cache", vec!["v2"]),
        ] {
            let svc = NodeService {
                id: id.into(),
                service: name.into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            };
            s.register_service(svc, Vec::new(), false);
        }
        let filters = [
            "",
            "ServiceTags contains v2",
            "ServiceName != web",
            "ServicePort == 8001",
        ];
        for src in filters {
            let parsed = test_filter(src, fields::SERVICE_NODE);
            let f = parsed.as_ref();
            let node = s.node_wire();
            let mut want: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            for r in s.services.values() {
                if f.is_some_and(|f| f.matches(&catalog_service(&node, &r.svc)) != Ok(true)) {
                    continue;
                }
                want.entry(r.svc.service.clone())
                    .or_default()
                    .extend(r.svc.tags.iter().cloned());
            }
            match catalog_services(&s, &[], f) {
                Ok((got, _)) => assert_eq!(got, want, "?filter={src}"),
                Err(Fail(code, msg)) => panic!("?filter={src}: {code} {msg}"),
            }
        }
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
