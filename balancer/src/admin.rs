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

/// The status page as JSON.
pub fn status(app: &App) -> serde_json::Value {
    let removed = app.history.removed();
    let services: Vec<_> = app
        .services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let b = s.backends();
            let routes: Vec<&str> = app
                .config
                .routes
                .iter()
                .zip(&app.route_service)
                .filter(|(_, si)| **si == i)
                .map(|(r, _)| r.prefix.as_str())
                .collect();
            let instances: Vec<_> = b
                .list
                .iter()
                .map(|be| {
                    let requests = be.requests();
                    let failures = be.failures.load(Ordering::Relaxed);
                    let recent =
                        app.history
                            .recent(i, &be.instance.id, &be.authority, requests, failures);
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
                .filter(|r| r.service == i)
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
            let discovery = match app.watches.get(i).and_then(Option::as_ref) {
                Some(w) => {
                    let st = w.status();
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

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// All metrics in the Prometheus text exposition format.
pub fn metrics(app: &App) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str("# HELP balancer_requests_total Requests answered, by service, instance and status class (instance=\"\" for the balancer's own answers).\n# TYPE balancer_requests_total counter\n");
    for s in &app.services {
        let name = label(&s.name);
        for be in &s.backends().list {
            let id = label(&be.instance.id);
            let addr = label(&be.authority);
            for (c, class) in CLASSES.iter().enumerate() {
                let n = be.responses[c].load(Ordering::Relaxed);
                let _ = writeln!(out, "balancer_requests_total{{service=\"{name}\",instance=\"{id}\",address=\"{addr}\",class=\"{class}\"}} {n}");
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
    for s in &app.services {
        s.metrics.latency.render(
            &mut out,
            "balancer_request_duration_seconds",
            &format!("service=\"{}\"", label(&s.name)),
        );
    }
    out.push_str("# HELP balancer_retries_total Extra attempts after a failed one.\n# TYPE balancer_retries_total counter\n");
    for s in &app.services {
        let _ = writeln!(
            out,
            "balancer_retries_total{{service=\"{}\"}} {}",
            label(&s.name),
            s.metrics.retries.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP balancer_ejections_total Times an instance was ejected after a failed connect.\n# TYPE balancer_ejections_total counter\n");
    for s in &app.services {
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
    out.push_str("# HELP balancer_healthy_instances Instances currently routed to.\n# TYPE balancer_healthy_instances gauge\n");
    for s in &app.services {
        let _ = writeln!(
            out,
            "balancer_healthy_instances{{service=\"{}\"}} {}",
            label(&s.name),
            s.backends().list.len()
        );
    }
    out.push_str("# HELP balancer_discovery_updates_total Routing-table updates applied from discovery.\n# TYPE balancer_discovery_updates_total counter\n");
    for s in &app.services {
        let _ = writeln!(
            out,
            "balancer_discovery_updates_total{{service=\"{}\"}} {}",
            label(&s.name),
            s.updates.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP balancer_discovery_last_success_age_seconds Seconds since Consul last answered (-1: never).\n# TYPE balancer_discovery_last_success_age_seconds gauge\n");
    out.push_str("# HELP balancer_discovery_consecutive_errors Failed Consul queries in a row.\n# TYPE balancer_discovery_consecutive_errors gauge\n");
    for (s, w) in app.services.iter().zip(&app.watches) {
        if let Some(w) = w {
            let st = w.status();
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
    out.push_str("# HELP balancer_responses_cut_total Responses cut off mid-body after nothing moved for the upstream timeout.\n# TYPE balancer_responses_cut_total counter\n");
    for s in &app.services {
        let _ = writeln!(
            out,
            "balancer_responses_cut_total{{service=\"{}\"}} {}",
            label(&s.name),
            s.metrics.cut.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP balancer_client_aborts_total Requests whose client closed before the answer (nginx's 499); the upstream request was abandoned.\n# TYPE balancer_client_aborts_total counter\n");
    for s in &app.services {
        let _ = writeln!(
            out,
            "balancer_client_aborts_total{{service=\"{}\"}} {}",
            label(&s.name),
            s.metrics.aborted.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP balancer_queued_total Requests that waited for a place at an instance (--max-conns-per-instance).\n# TYPE balancer_queued_total counter\n");
    out.push_str("# HELP balancer_queue_timeouts_total Requests that found no place within --queue-timeout (503).\n# TYPE balancer_queue_timeouts_total counter\n");
    for s in &app.services {
        let name = label(&s.name);
        let _ = writeln!(
            out,
            "balancer_queued_total{{service=\"{name}\"}} {}\nbalancer_queue_timeouts_total{{service=\"{name}\"}} {}",
            s.metrics.queued.load(Ordering::Relaxed),
            s.metrics.queue_timeouts.load(Ordering::Relaxed)
        );
    }
    let t = &app.tunnels;
    let _ = writeln!(out, "# HELP balancer_tunnels Upgraded connections (WebSocket) open.\n# TYPE balancer_tunnels gauge\nbalancer_tunnels {}", t.open.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP balancer_tunnels_total Upgraded connections (WebSocket) opened.\n# TYPE balancer_tunnels_total counter\nbalancer_tunnels_total {}", t.total.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP balancer_tunnels_closed_total Upgraded connections the balancer closed, by reason.\n# TYPE balancer_tunnels_closed_total counter\nbalancer_tunnels_closed_total{{reason=\"idle\"}} {}\nbalancer_tunnels_closed_total{{reason=\"shutdown\"}} {}", t.idle_closed.load(Ordering::Relaxed), t.shutdown_closed.load(Ordering::Relaxed));
    let _ = writeln!(out, "# HELP balancer_connections Client connections open.\n# TYPE balancer_connections gauge\nbalancer_connections {}", app.connections.load(Ordering::Relaxed));
    out
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
            let body = serde_json::to_vec_pretty(&status(app)).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
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
