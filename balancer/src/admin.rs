//! The admin listener: the dashboard (`/`, a page compiled into the binary that polls
//! `/status`), `/status` (JSON), `/metrics` (Prometheus text), `/health` (readiness).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::dashboard;
use crate::idle::IdleTimeout;
use crate::metrics::label;
use crate::App;

fn age(t: Option<SystemTime>) -> Option<f64> {
    t.and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// Above this many instances in all, `/status` lists counts per service and leaves the
/// instances to `/status?service=NAME`, so the page stays small at thousands of instances.
pub const STATUS_INSTANCES_MAX: usize = 256;

/// The status page as JSON: every service (or only `only`), with its instances when asked
/// for one service or when there are at most [`STATUS_INSTANCES_MAX`] in all.
pub fn status(app: &App, only: Option<&str>) -> serde_json::Value {
    let removed = app.history.removed();
    let table = app.routes.load();
    let total = table.instance_count();
    let detailed = only.is_some() || total <= STATUS_INSTANCES_MAX;
    let services: Vec<_> = table
        .services
        .values()
        .filter(|s| only.is_none_or(|n| n == s.name))
        .map(|s| {
            let b = s.backends();
            let routes = table.routes_of(&s.name);
            let discovery = match &app.catalog {
                Some(w) => {
                    let st = w.status(&s.name);
                    json!({
                        "source": "consul",
                        "index": st.index,
                        "updates": s.updates.load(Ordering::Relaxed),
                        "last_change_age_seconds": age(st.last_change),
                        "last_success_age_seconds": age(st.last_success),
                        "consecutive_errors": st.consecutive_failures,
                        "last_error": st.last_error,
                        // Routing on the last known instances because Consul is not answering.
                        "stale": st.consecutive_failures > 0,
                    })
                }
                None => json!({"source": "static", "index": b.index, "updates": s.updates.load(Ordering::Relaxed), "stale": false}),
            };
            if !detailed {
                return json!({
                    "name": s.name,
                    "routes": routes,
                    "healthy_instances": b.list.len(),
                    "stale": discovery["stale"],
                });
            }
            let instances: Vec<_> = b
                .list
                .iter()
                .map(|be| {
                    let requests = be.requests();
                    let failures = be.failures.load(Ordering::Relaxed);
                    let recent = app.history.recent(
                        &s.name,
                        &be.instance.id,
                        &be.authority,
                        requests,
                        failures,
                    );
                    json!({
                        "id": be.instance.id,
                        "address": be.authority,
                        "ejected": be.is_ejected(),
                        "requests": requests,
                        "failures": failures,
                        "responses_5xx": be.responses[4].load(Ordering::Relaxed),
                        "ejections": be.ejections.load(Ordering::Relaxed),
                        "in_flight": be.in_use(),
                        "last_minute": {
                            "requests": recent.requests,
                            "failures": recent.failures,
                            "rate_per_second": (recent.rate * 100.0).round() / 100.0,
                            "per_second": recent.per_second,
                        },
                    })
                })
                .collect();
            let gone: Vec<_> = removed
                .iter()
                .filter(|r| r.service == s.name)
                .map(|r| {
                    json!({
                        "id": r.id,
                        "address": r.address,
                        "removed_at_ms": crate::dashboard::unix_ms(r.at),
                        "requests": r.requests,
                        "failures": r.failures,
                        "age_seconds": age(Some(r.at)),
                    })
                })
                .collect();
            json!({
                "name": s.name,
                "routes": routes,
                "healthy_instances": b.list.len(),
                "responses_cut": s.metrics.cut.load(Ordering::Relaxed),
                "client_aborts": s.metrics.aborted.load(Ordering::Relaxed),
                "queued": s.metrics.queued.load(Ordering::Relaxed),
                "queue_timeouts": s.metrics.queue_timeouts.load(Ordering::Relaxed),
                "instances": instances,
                "recently_removed": gone,
                "discovery": discovery,
            })
        })
        .collect();
    json!({
        "ready": app.is_ready(),
        "uptime_seconds": app.started.elapsed().as_secs(),
        "connections": app.connections.load(Ordering::Relaxed),
        "admin": {
            "connections": app.admin_connections.load(Ordering::Relaxed),
            "max_connections": app.config.admin_max_connections,
        },
        "requests_without_route": app.no_route.load(Ordering::Relaxed),
        "http1_handoffs": app.handoffs.load(Ordering::Relaxed),
        "tunnels": {
            "open": app.tunnels.open.load(Ordering::Relaxed),
            "total": app.tunnels.total.load(Ordering::Relaxed),
            "idle_closed": app.tunnels.idle_closed.load(Ordering::Relaxed),
        },
        "routes": table.entries.len(),
        "healthy_instances": total,
        "instances_listed": detailed,
        "services": services,
        "now_ms": crate::dashboard::unix_ms(SystemTime::now()),
        "events": app.history.events().iter().map(|e| json!({
            "at_ms": crate::dashboard::unix_ms(e.at),
            "age_seconds": age(Some(e.at)),
            "service": e.service,
            "instance": e.instance,
            "address": e.address,
            "change": e.change,
        })).collect::<Vec<_>>(),
    })
}

/// Above this many instances in all, `/metrics` drops the `instance` and `address` labels:
/// request counts become one series per service and class (`instance="*"`), and the
/// per-instance ejection counters are left out.
pub const METRICS_INSTANCES_MAX: usize = 256;

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// All metrics in the Prometheus text exposition format.
pub fn metrics(app: &App) -> String {
    let table = app.routes.load();
    let services: Vec<&std::sync::Arc<crate::service::ServiceState>> =
        table.services.values().collect();
    // Per-instance series only while they stay few; above, one series per service.
    let per_instance = table.instance_count() <= METRICS_INSTANCES_MAX;
    let mut out = String::with_capacity(4096);
    out.push_str("# HELP balancer_requests_total Requests answered, by service, instance and status class (instance=\"\" for the balancer's own answers).\n# TYPE balancer_requests_total counter\n");
    for s in &services {
        let name = label(&s.name);
        let backends = s.backends();
        if per_instance {
            for be in &backends.list {
                let id = label(&be.instance.id);
                let addr = label(&be.authority);
                for (c, class) in CLASSES.iter().enumerate() {
                    let n = be.responses[c].load(Ordering::Relaxed);
                    let _ = writeln!(out, "balancer_requests_total{{service=\"{name}\",instance=\"{id}\",address=\"{addr}\",class=\"{class}\"}} {n}");
                }
            }
        } else {
            for (c, class) in CLASSES.iter().enumerate() {
                let n: u64 = backends
                    .list
                    .iter()
                    .map(|be| be.responses[c].load(Ordering::Relaxed))
                    .sum();
                let _ = writeln!(out, "balancer_requests_total{{service=\"{name}\",instance=\"*\",class=\"{class}\"}} {n}");
            }
        }
        for (c, class) in CLASSES.iter().enumerate() {
            let n = s.metrics.local[c].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "balancer_requests_total{{service=\"{name}\",instance=\"\",class=\"{class}\"}} {n}"
            );
        }
    }
    let _ = writeln!(out, "# HELP balancer_unrouted_requests_total Requests that matched no route (404).\n# TYPE balancer_unrouted_requests_total counter\nbalancer_unrouted_requests_total {}", app.no_route.load(Ordering::Relaxed));
    out.push_str("# HELP balancer_request_duration_seconds Time to the response head, by service.\n# TYPE balancer_request_duration_seconds histogram\n");
    for s in &services {
        s.metrics.latency.render(
            &mut out,
            "balancer_request_duration_seconds",
            &format!("service=\"{}\"", label(&s.name)),
        );
    }
    per_service(
        &mut out,
        &services,
        "balancer_retries_total",
        "counter",
        "Extra attempts after a failed one.",
        |s| s.metrics.retries.load(Ordering::Relaxed),
    );
    out.push_str("# HELP balancer_ejections_total Times an instance was ejected after a failed connect.\n# TYPE balancer_ejections_total counter\n");
    for s in services.iter().filter(|_| per_instance) {
        for be in &s.backends().list {
            let _ = writeln!(
                out,
                "balancer_ejections_total{{service=\"{}\",instance=\"{}\"}} {}",
                label(&s.name),
                label(&be.instance.id),
                be.ejections.load(Ordering::Relaxed)
            );
        }
    }
    per_service(
        &mut out,
        &services,
        "balancer_healthy_instances",
        "gauge",
        "Instances currently routed to.",
        |s| s.backends().list.len() as u64,
    );
    per_service(
        &mut out,
        &services,
        "balancer_discovery_updates_total",
        "counter",
        "Routing-table updates applied from discovery.",
        |s| s.updates.load(Ordering::Relaxed),
    );
    out.push_str("# HELP balancer_discovery_last_success_age_seconds Seconds since Consul last answered (-1: never).\n# TYPE balancer_discovery_last_success_age_seconds gauge\n");
    out.push_str("# HELP balancer_discovery_consecutive_errors Failed Consul queries in a row.\n# TYPE balancer_discovery_consecutive_errors gauge\n");
    for s in &services {
        if let Some(w) = &app.catalog {
            let st = w.status(&s.name);
            let name = label(&s.name);
            let _ = writeln!(
                out,
                "balancer_discovery_last_success_age_seconds{{service=\"{name}\"}} {}",
                age(st.last_success).unwrap_or(-1.0)
            );
            let _ = writeln!(
                out,
                "balancer_discovery_consecutive_errors{{service=\"{name}\"}} {}",
                st.consecutive_failures
            );
        }
    }
    let _ = writeln!(out, "# HELP balancer_http1_handoffs_total HTTP/1 connections the fast path handed to the general path (HTTP/1.0, Expect, upgrades, chunked or large uploads).\n# TYPE balancer_http1_handoffs_total counter\nbalancer_http1_handoffs_total {}", app.handoffs.load(Ordering::Relaxed));
    per_service(
        &mut out,
        &services,
        "balancer_responses_cut_total",
        "counter",
        "Responses cut off mid-body after nothing moved for the upstream timeout.",
        |s| s.metrics.cut.load(Ordering::Relaxed),
    );
    per_service(&mut out, &services, "balancer_client_aborts_total", "counter", "Requests whose client closed before the answer (nginx's 499); the upstream request was abandoned.", |s| s.metrics.aborted.load(Ordering::Relaxed));
    per_service(
        &mut out,
        &services,
        "balancer_queued_total",
        "counter",
        "Requests that waited for a place at an instance (--max-conns-per-instance).",
        |s| s.metrics.queued.load(Ordering::Relaxed),
    );
    per_service(
        &mut out,
        &services,
        "balancer_queue_timeouts_total",
        "counter",
        "Requests that found no place within --queue-timeout (503).",
        |s| s.metrics.queue_timeouts.load(Ordering::Relaxed),
    );
    let t = &app.tunnels;
    let _ = writeln!(out, "# HELP balancer_tunnels Upgraded connections (WebSocket) open.\n# TYPE balancer_tunnels gauge\nbalancer_tunnels {}", t.open.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP balancer_tunnels_total Upgraded connections (WebSocket) opened.\n# TYPE balancer_tunnels_total counter\nbalancer_tunnels_total {}", t.total.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP balancer_tunnels_closed_total Upgraded connections the balancer closed, by reason.\n# TYPE balancer_tunnels_closed_total counter\nbalancer_tunnels_closed_total{{reason=\"idle\"}} {}\nbalancer_tunnels_closed_total{{reason=\"shutdown\"}} {}", t.idle_closed.load(Ordering::Relaxed), t.shutdown_closed.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP balancer_connections Client connections open.\n# TYPE balancer_connections gauge\nbalancer_connections {}", app.connections.load(Ordering::Relaxed));
    out
}

/// One metric with one series per service: its help and type lines, then `name{service=..}
/// value` for each of `services`.
fn per_service(
    out: &mut String,
    services: &[&Arc<crate::service::ServiceState>],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&crate::service::ServiceState) -> u64,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for s in services {
        let _ = writeln!(out, "{name}{{service=\"{}\"}} {}", label(&s.name), value(s));
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A file of the dashboard. The page loads only its own script and style and asks only
/// `/status`; the policy says so, so that an instance ID crafted as markup could not run
/// anything even if the page were wrong to insert it as markup (it inserts text only).
fn page(content_type: &'static str, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = respond(StatusCode::OK, content_type, body);
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    r
}

/// Answers one admin request.
pub fn handle(app: &App, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/" => page("text/html; charset=utf-8", dashboard::PAGE_HTML),
        "/dashboard.js" => page("text/javascript; charset=utf-8", dashboard::PAGE_JS),
        "/dashboard.css" => page("text/css; charset=utf-8", dashboard::PAGE_CSS),
        "/status" => {
            let only = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("service=")));
            let st = status(app, only);
            // Pretty while it is small enough to read; compact past that.
            let body = if st["instances_listed"] == true {
                serde_json::to_vec_pretty(&st)
            } else {
                serde_json::to_vec(&st)
            };
            respond(StatusCode::OK, "application/json", body.unwrap_or_default())
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(app),
        ),
        "/health" => {
            if app.is_ready() {
                respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    "waiting for the first discovery answer\n",
                )
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: try / (the dashboard), /status, /metrics or /health\n",
        ),
    }
}

/// Serves the admin API until `stop` flips. Bounded like the proxy port: at most
/// `admin_max_connections` open (the rest wait in the listen backlog, holding no file
/// descriptor of ours), a request head within `header_read_timeout` (hyper's timer also runs
/// while a keep-alive connection waits for its next request), and no connection that moves no
/// byte for `admin_idle_timeout`.
pub async fn serve(app: Arc<App>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    tracing::info!(addr = ?listener.local_addr().ok(), max_connections = app.config.admin_max_connections, "admin listening (/, /status, /metrics, /health)");
    let mut h1 = hyper::server::conn::http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(app.config.header_read_timeout)
        .keep_alive(true);
    let h1 = Arc::new(h1);
    let permits = Arc::new(Semaphore::new(app.config.admin_max_connections));
    let stopped = async move {
        let _ = stop.changed().await;
    };
    tokio::pin!(stopped);
    while let Some((permit, stream, peer)) =
        discovery::serve::accept(&listener, &permits, &mut stopped).await
    {
        let app = Arc::clone(&app);
        let h1 = Arc::clone(&h1);
        app.admin_connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let idle = app.config.admin_idle_timeout;
            let counted = Arc::clone(&app);
            let svc = hyper::service::service_fn(move |req| {
                let r = handle(&app, &req);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let io = TokioIo::new(IdleTimeout::new(stream, idle));
            if let Err(e) = h1.serve_connection(io, svc).await {
                tracing::debug!(%peer, error = %e, "admin connection ended with an error");
            }
            counted.admin_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}
