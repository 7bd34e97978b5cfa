//! Check runners (HTTP, TCP, TTL) and the reaper, with Consul's semantics (`consul-api.md`
//! §1.7): the first probe is staggered inside the interval, the interval has a 1 s floor,
//! probes time out after `Timeout` or 10 s, and results pass through the
//! `SuccessBeforePassing` / `FailuresBefore*` thresholds before they change a status.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request};
use http_body_util::{BodyExt, Full};
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::decode::CheckDef;
use super::state::{Probe, CRITICAL, PASSING, WARNING};
use super::Shared;

/// Consul's `MinInterval`.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Consul's default probe timeout for HTTP and TCP checks.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the runner of a check, if it has one.
pub(crate) fn spawn(
    shared: &Arc<Shared>,
    check_id: String,
    generation: u64,
    probe: Probe,
    ttl: Option<watch::Receiver<Instant>>,
) -> Option<JoinHandle<()>> {
    let weak = Arc::downgrade(shared);
    match probe {
        Probe::Static => None,
        Probe::Ttl(_) => {
            let rx = ttl?;
            Some(tokio::spawn(run_ttl(weak, check_id, generation, rx)))
        }
        Probe::Http(def) | Probe::Tcp(def) => {
            Some(tokio::spawn(run_interval(weak, check_id, generation, def)))
        }
    }
}

/// Consul's `StatusHandler`: counters start at the thresholds, so the first result applies
/// at once; later a move to passing needs N successes in a row, a move to critical N
/// failures, and between the warning and critical thresholds the check reads warning.
#[derive(Debug)]
pub(crate) struct Thresholds {
    success_before_passing: u32,
    failures_before_warning: u32,
    failures_before_critical: u32,
    successes: u32,
    failures: u32,
}

impl Thresholds {
    pub(crate) fn new(def: &CheckDef) -> Self {
        let sbp = def.success_before_passing.max(0) as u32;
        let fbc = def.failures_before_critical.max(0) as u32;
        let fbw = if def.failures_before_warning > 0 {
            def.failures_before_warning as u32
        } else {
            fbc
        };
        Self {
            success_before_passing: sbp,
            failures_before_warning: fbw,
            failures_before_critical: fbc,
            successes: sbp,
            failures: fbc,
        }
    }

    /// The status to report for one probe result, or `None` to leave the status alone.
    pub(crate) fn apply(&mut self, status: &'static str) -> Option<&'static str> {
        if status == CRITICAL {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.failures >= self.failures_before_critical {
                Some(CRITICAL)
            } else if self.failures >= self.failures_before_warning {
                Some(WARNING)
            } else {
                None
            }
        } else {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            (self.successes >= self.success_before_passing).then_some(status)
        }
    }
}

async fn run_interval(shared: Weak<Shared>, check_id: String, generation: u64, def: CheckDef) {
    let interval = def.interval.max(MIN_INTERVAL);
    if def.interval < MIN_INTERVAL {
        tracing::warn!(check = %check_id, interval = ?def.interval, "check interval below 1s, raised to 1s");
    }
    let timeout = if def.timeout.is_zero() {
        DEFAULT_TIMEOUT
    } else {
        def.timeout
    };
    // Stagger the first probe inside the interval, as Consul does, so checks registered
    // together do not fire together.
    let stagger = rand::thread_rng().gen_range(Duration::ZERO..interval);
    tokio::time::sleep(stagger).await;
    let mut thresholds = Thresholds::new(&def);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (status, output) = if def.http.is_empty() {
            probe_tcp(&def.tcp, timeout).await
        } else {
            let Some(client) = shared.upgrade().map(|s| s.probe_client.clone()) else {
                return;
            };
            probe_http(&client, &def, timeout).await
        };
        let Some(s) = shared.upgrade() else {
            return;
        };
        if let Some(status) = thresholds.apply(status) {
            let max = s.output_max(&check_id);
            s.report(&check_id, generation, status, truncate_tail(output, max));
        }
    }
}

async fn run_ttl(
    shared: Weak<Shared>,
    check_id: String,
    generation: u64,
    mut deadline: watch::Receiver<Instant>,
) {
    loop {
        let until = *deadline.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => {
                let Some(s) = shared.upgrade() else { return };
                s.expire_ttl(&check_id, generation);
                drop(s);
                if deadline.changed().await.is_err() {
                    return;
                }
            }
            changed = deadline.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Keeps the last `max` bytes, like Consul's ring buffer of check output.
fn truncate_tail(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].to_string()
}

/// Go's `url.Error` op: `Get`, `Post`, ...
fn go_op(method: &str) -> String {
    let lower = method.to_ascii_lowercase();
    let mut chars = lower.chars();
    match chars.next() {
        Some(c) => c.to_ascii_uppercase().to_string() + chars.as_str(),
        None => "Get".into(),
    }
}

pub(crate) type ProbeClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// A client for HTTP checks: keep-alives off, as Consul's checker disables them.
pub(crate) fn probe_client() -> ProbeClient {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(connector)
}

async fn probe_http(
    client: &ProbeClient,
    def: &CheckDef,
    timeout: Duration,
) -> (&'static str, String) {
    let method = if def.method.is_empty() {
        "GET".to_string()
    } else {
        def.method.clone()
    };
    let url = &def.http;
    let op = go_op(&method);
    let fail = |msg: String| (CRITICAL, format!("{op} \"{url}\": {msg}"));
    if url.starts_with("https://") {
        return fail("the dev agent does not run HTTPS checks".into());
    }
    let Ok(m) = Method::from_bytes(method.as_bytes()) else {
        return fail(format!("net/http: invalid method {method:?}"));
    };
    let mut req = Request::builder().method(m).uri(url.as_str());
    let mut has_ua = false;
    let mut has_accept = false;
    for (k, vs) in &def.header {
        has_ua |= k.eq_ignore_ascii_case("user-agent");
        has_accept |= k.eq_ignore_ascii_case("accept");
        for v in vs {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    if !has_ua {
        req = req.header(header::USER_AGENT, "Consul Health Check");
    }
    if !has_accept {
        req = req.header(header::ACCEPT, "text/plain, text/*, */*");
    }
    req = req.header(header::CONNECTION, "close");
    let req = match req.body(Full::new(Bytes::from(def.body.clone()))) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let result = tokio::time::timeout(timeout, async {
        let resp = client.request(req).await?;
        let status = resp.status();
        // Keep only the tail of the body: Consul stores at most OutputMaxSize bytes anyway.
        let mut body = resp.into_body();
        let mut kept: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame
                .map_err(|_| ())
                .and_then(|f| f.into_data().map_err(|_| ()))
            {
                kept.extend_from_slice(&data);
                if kept.len() > 64 * 1024 {
                    kept.drain(..kept.len() - 64 * 1024);
                }
            } else {
                break;
            }
        }
        Ok::<_, hyper_util::client::legacy::Error>((status, kept))
    })
    .await;
    match result {
        Err(_) => fail(
            "context deadline exceeded (Client.Timeout exceeded while awaiting headers)".into(),
        ),
        Ok(Err(e)) => {
            let refused = crate::Error::Transport(Box::new(e));
            if refused.is_connect() {
                fail(format!("dial tcp {authority}: connect: connection refused"))
            } else {
                fail(crate::error::chain(&refused))
            }
        }
        Ok(Ok((status, body))) => {
            let st = if status.is_success() {
                PASSING
            } else if status.as_u16() == 429 {
                WARNING
            } else {
                CRITICAL
            };
            let line = format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            (
                st,
                format!(
                    "HTTP {method} {url}: {} Output: {}",
                    line.trim_end(),
                    String::from_utf8_lossy(&body)
                ),
            )
        }
    }
}

async fn probe_tcp(addr: &str, timeout: Duration) -> (&'static str, String) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (PASSING, format!("TCP connect {addr}: Success")),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => (
            CRITICAL,
            format!("dial tcp {addr}: connect: connection refused"),
        ),
        Ok(Err(e)) => (CRITICAL, format!("dial tcp {addr}: {e}")),
        Err(_) => (CRITICAL, format!("dial tcp {addr}: i/o timeout")),
    }
}

/// Every `reap_interval`, deregisters services with a check critical for longer than its
/// `DeregisterCriticalServiceAfter`.
pub(crate) async fn reaper(shared: Weak<Shared>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(s) = shared.upgrade() else { return };
        s.reap(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(sbp: i64, fbw: i64, fbc: i64) -> CheckDef {
        CheckDef {
            success_before_passing: sbp,
            failures_before_warning: fbw,
            failures_before_critical: fbc,
            ..Default::default()
        }
    }

    #[test]
    fn thresholds_default_apply_at_once() {
        let mut t = Thresholds::new(&def(0, 0, 0));
        assert_eq!(t.apply(CRITICAL), Some(CRITICAL));
        assert_eq!(t.apply(PASSING), Some(PASSING));
        assert_eq!(t.apply(WARNING), Some(WARNING));
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let mut t = Thresholds::new(&def(2, 1, 3));
        // First result applies immediately.
        assert_eq!(t.apply(PASSING), Some(PASSING));
        assert_eq!(t.apply(CRITICAL), Some(WARNING));
        assert_eq!(t.apply(CRITICAL), Some(WARNING));
        assert_eq!(t.apply(CRITICAL), Some(CRITICAL));
        assert_eq!(t.apply(PASSING), None);
        assert_eq!(t.apply(PASSING), Some(PASSING));
    }

    #[test]
    fn output_keeps_the_tail() {
        assert_eq!(truncate_tail("abcdef".into(), 3), "def");
        assert_eq!(truncate_tail("ab".into(), 3), "ab");
        assert_eq!(go_op("POST"), "Post");
    }
}
