//! The registration lifecycle of one service instance: register, keep it registered, leave.
//!
//! A [`Registration`] owns one task that follows `consul-api.md` §1.9:
//!
//! 1. **Register** with a stable ID (`PUT /v1/agent/service/register?replace-existing-checks=true`,
//!    idempotent), retrying with jittered backoff while the agent is unreachable or refuses.
//! 2. **Verify** every `verify_interval` with `GET /v1/agent/service/:id`. A 404 means the agent
//!    restarted empty (`-dev` keeps nothing) or someone deregistered us: register again at once.
//!    A connection failure means the agent may be restarting: register again as soon as it
//!    answers, which is cheap and keeps check status (§1.2.3).
//! 3. Optionally **heartbeat a TTL check** (`PUT /v1/agent/check/pass/:id`) every period; a 404
//!    there also means the registration is gone.
//! 4. **Leave** ([`Registration::leave`]): stop the loop first (so it cannot re-register behind
//!    our back), then deregister, optionally after switching on maintenance mode, within a
//!    deadline.
//!
//! The address is validated before anything starts: a registration for `0.0.0.0` or `::` would
//! send every balancer to its own host.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::{debug, info, warn, Instrument};

use crate::client::Client;
use crate::error::{chain, Error};
use crate::watch::{backoff_ceiling, jitter, or_stop, sleep_until_or_stop, RateLimit, StopSignal};
use crate::wire::{AgentService, CheckDefinition, ServiceRegistration};

/// Default period of the `GET /v1/agent/service/:id` check.
pub const DEFAULT_VERIFY_INTERVAL: Duration = Duration::from_secs(2);
/// Default first retry delay after a failed registration.
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(200);
/// Default ceiling of the retry delay.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);
/// Default deadline of [`Registration::leave`]'s calls to the agent.
pub const DEFAULT_LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Shown in Consul as the maintenance reason while leaving.
pub const MAINTENANCE_REASON: &str = "shutting down";
/// Re-registrations allowed back to back before they are spaced by `retry_max`; guards against a
/// registration that vanishes as soon as it is made (an agent in a restart loop).
const REREGISTER_BURST: u32 = 3;

/// How [`Registration::leave`] takes the instance out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeaveMode {
    /// `PUT /v1/agent/service/deregister/:id`.
    #[default]
    Deregister,
    /// Maintenance mode on first (the instance drops out of `?passing` at once, even if the
    /// deregistration then fails), then deregister.
    MaintenanceThenDeregister,
}

/// How a [`Registration`] keeps its service registered.
#[derive(Debug, Clone)]
pub struct RegistrationOptions {
    /// Period of the "does the agent still know us" check. Must be non-zero.
    pub verify_interval: Duration,
    /// First retry delay after a failed registration; doubles per failure.
    pub retry_min: Duration,
    /// Ceiling of the retry delay.
    pub retry_max: Duration,
    /// A TTL check to pass every period: `(check ID, period)`. The check must be one of the
    /// registration's checks, have a `TTL`, and the period must be shorter than that TTL.
    pub ttl_heartbeat: Option<(String, Duration)>,
    /// What leaving does.
    pub leave: LeaveMode,
    /// Deadline of the agent calls made by [`Registration::leave`].
    pub leave_timeout: Duration,
}

impl Default for RegistrationOptions {
    fn default() -> Self {
        Self {
            verify_interval: DEFAULT_VERIFY_INTERVAL,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            ttl_heartbeat: None,
            leave: LeaveMode::Deregister,
            leave_timeout: DEFAULT_LEAVE_TIMEOUT,
        }
    }
}

/// Where the registration stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not registered yet: the first registration has not succeeded.
    Pending,
    /// The agent accepted the registration and, as far as we last checked, still has it.
    Registered,
    /// The agent lost the registration or cannot be reached; registering again.
    Lost,
    /// [`Registration::leave`] ran: the loop has stopped (whether or not deregistering worked).
    Left,
}

/// Handle of a running registration. Call [`Registration::leave`] to deregister. Dropping the
/// handle stops the loop but leaves the service registered, as a crash would; Consul's
/// `DeregisterCriticalServiceAfter` then has to clean up.
#[derive(Debug)]
pub struct Registration {
    service_id: String,
    client: Client,
    leave: LeaveMode,
    leave_timeout: Duration,
    shared: Arc<Shared>,
    /// The task stops when this sender is dropped; nothing is ever sent on it.
    stop: watch::Sender<()>,
    task: JoinHandle<()>,
}

/// What the task and the handle share.
#[derive(Debug)]
struct Shared {
    state: watch::Sender<RegistrationState>,
    /// Successful register calls; grows on every re-registration.
    registrations: AtomicU64,
}

impl Shared {
    fn set_state(&self, new: RegistrationState) {
        self.state.send_if_modified(|state| {
            if *state == new {
                false
            } else {
                *state = new;
                true
            }
        });
    }
}

impl Registration {
    /// Validates `reg` and `opts`, then starts registering. Must be called inside a tokio runtime.
    ///
    /// Fails with [`Error::Config`] for an unspecified address (`0.0.0.0`, `::`), in `Address` or
    /// in a check target, for an empty name, a zero period, or a TTL heartbeat that names no TTL
    /// check of the registration.
    pub fn spawn(
        client: Client,
        reg: ServiceRegistration,
        opts: RegistrationOptions,
    ) -> Result<Registration, Error> {
        validate(&reg, &opts)?;
        let service_id = reg.effective_id().to_string();
        let (state, _) = watch::channel(RegistrationState::Pending);
        let shared = Arc::new(Shared {
            state,
            registrations: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = watch::channel(());
        let leave = opts.leave;
        let leave_timeout = opts.leave_timeout;
        let task = Task {
            client: client.clone(),
            reg,
            service_id: service_id.clone(),
            opts,
            shared: Arc::clone(&shared),
        };
        let span = tracing::info_span!("registration", service_id = %service_id);
        let task = tokio::spawn(task.run(StopSignal(stop_rx)).instrument(span));
        Ok(Registration {
            service_id,
            client,
            leave,
            leave_timeout,
            shared,
            stop: stop_tx,
            task,
        })
    }

    /// The service ID the agent knows this instance by.
    pub fn service_id(&self) -> &str {
        &self.service_id
    }

    /// A receiver of the state; marked changed on every transition.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.shared.state.subscribe()
    }

    /// Successful register calls so far: 1 after the first registration, more after each
    /// re-registration.
    pub fn registrations(&self) -> u64 {
        self.shared.registrations.load(Ordering::Relaxed)
    }

    /// Stops the loop, then takes the service out of the agent as `LeaveMode` says, within
    /// `leave_timeout`. `Ok` when the agent confirmed, or answered that it does not know the ID
    /// (nothing left to remove). The state is [`RegistrationState::Left`] afterwards either way.
    pub async fn leave(self) -> Result<(), Error> {
        let Registration {
            service_id,
            client,
            leave,
            leave_timeout,
            shared,
            stop,
            task,
        } = self;
        // The loop must be gone before deregistering, or a verify that raced us could register
        // the service again. Every await in the loop is raced against this signal, so this is
        // prompt. (A register PUT cut short here may in theory still be applied by the agent
        // after our deregistration, on its other connection; DeregisterCriticalServiceAfter
        // covers that unlikely case like a crash.)
        drop(stop);
        if let Err(err) = task.await {
            if err.is_panic() {
                warn!(service_id = %service_id, "registration task panicked");
            }
        }
        let result = tokio::time::timeout(leave_timeout, take_out(&client, &service_id, leave))
            .await
            .unwrap_or(Err(Error::Timeout(leave_timeout)));
        shared.set_state(RegistrationState::Left);
        match &result {
            Ok(()) => info!(service_id = %service_id, mode = ?leave, "left Consul"),
            Err(err) => warn!(
                service_id = %service_id,
                error = %chain(err),
                "deregistration failed; Consul will drop the service once its checks turn critical \
                 (DeregisterCriticalServiceAfter)"
            ),
        }
        result
    }
}

/// Maintenance (if asked) and deregistration, without a deadline of its own.
async fn take_out(client: &Client, service_id: &str, mode: LeaveMode) -> Result<(), Error> {
    if mode == LeaveMode::MaintenanceThenDeregister {
        match client
            .maintenance(service_id, true, Some(MAINTENANCE_REASON))
            .await
        {
            Ok(()) => debug!(service_id, "maintenance mode on"),
            Err(err) if err.status() == Some(404) => {
                debug!(
                    service_id,
                    "agent does not know the service; nothing to remove"
                );
                return Ok(());
            }
            // Deregistering may still work, and is what matters.
            Err(err) => {
                warn!(service_id, error = %chain(&err), "could not enable maintenance mode")
            }
        }
    }
    match client.deregister(service_id).await {
        Ok(()) => Ok(()),
        // The agent does not know the ID (it restarted empty, or the service was removed by
        // someone else): what leaving wanted.
        Err(err) if err.status() == Some(404) => {
            debug!(
                service_id,
                "agent does not know the service; nothing to remove"
            );
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// The state the registration task owns.
struct Task {
    client: Client,
    reg: ServiceRegistration,
    service_id: String,
    opts: RegistrationOptions,
    shared: Arc<Shared>,
}

/// How one keep-alive call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The agent has the registration.
    Kept,
    /// The agent answered that it does not know the service or check: register again now.
    Gone,
    /// The agent could not be reached: register again as soon as it answers.
    Unreachable,
    /// The agent answered with another error; it is up and did not say we are gone, so keep
    /// the registration and look again next period.
    Trouble,
}

/// Judges `GET /v1/agent/service/:id`.
fn verify_verdict(result: &Result<Option<AgentService>, Error>) -> Verdict {
    match result {
        Ok(Some(_)) => Verdict::Kept,
        Ok(None) => Verdict::Gone,
        Err(err) => error_verdict(err),
    }
}

/// Judges `PUT /v1/agent/check/pass/:id`: 404 is "Unknown check ID".
fn heartbeat_verdict(result: &Result<(), Error>) -> Verdict {
    match result {
        Ok(()) => Verdict::Kept,
        Err(err) if err.status() == Some(404) => Verdict::Gone,
        Err(err) => error_verdict(err),
    }
}

fn error_verdict(err: &Error) -> Verdict {
    match err {
        // Also timeouts: an agent that stopped answering may be restarting; re-registering once
        // it answers again is idempotent.
        Error::Transport(_) | Error::Timeout(_) => Verdict::Unreachable,
        Error::Status { .. } | Error::Decode(_) | Error::Config(_) => Verdict::Trouble,
    }
}

/// Which periodic call is due.
enum Due {
    Verify,
    Heartbeat,
}

impl Task {
    async fn run(self, mut stop: StopSignal) {
        let mut churn = RateLimit::new(REREGISTER_BURST, self.opts.retry_max, Instant::now());
        loop {
            if !sleep_until_or_stop(churn.reserve(Instant::now()), &mut stop).await {
                break;
            }
            if !self.register(&mut stop).await {
                break;
            }
            if !self.keep(&mut stop).await {
                break;
            }
            self.shared.set_state(RegistrationState::Lost);
        }
        debug!("registration loop stopped");
    }

    /// Registers until the agent accepts. False when stopped first.
    async fn register(&self, stop: &mut StopSignal) -> bool {
        let mut failures = 0u32;
        loop {
            let Some(result) = or_stop(stop, self.client.register(&self.reg)).await else {
                return false;
            };
            match result {
                Ok(()) => {
                    let n = self.shared.registrations.fetch_add(1, Ordering::Relaxed) + 1;
                    info!(registrations = n, "registered with the Consul agent");
                    self.shared.set_state(RegistrationState::Registered);
                    return true;
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    let delay = jitter(backoff_ceiling(
                        failures,
                        self.opts.retry_min,
                        self.opts.retry_max,
                    ));
                    warn!(
                        error = %chain(&err),
                        failures,
                        retry_in = ?delay,
                        "registration failed; retrying"
                    );
                    if !sleep_until_or_stop(Instant::now() + delay, stop).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Keeps the registration alive until it is lost (true) or the loop is stopped (false).
    async fn keep(&self, stop: &mut StopSignal) -> bool {
        let heartbeat = self.opts.ttl_heartbeat.as_ref();
        // A TTL check starts critical on a fresh agent; pass it now rather than a period later.
        if let Some((check_id, _)) = heartbeat {
            let Some(result) = or_stop(stop, self.client.check_pass(check_id, None)).await else {
                return false;
            };
            if self.lost(heartbeat_verdict(&result), &result, "TTL heartbeat") {
                return true;
            }
        }
        let start = Instant::now();
        let mut verify = ticker(start, self.opts.verify_interval);
        let mut beat = heartbeat.map(|(_, period)| ticker(start, *period));
        loop {
            let due = tokio::select! {
                biased;
                () = stop.wait() => return false,
                () = tick(&mut beat) => Due::Heartbeat,
                _ = verify.tick() => Due::Verify,
            };
            let lost = match (due, heartbeat) {
                (Due::Heartbeat, Some((check_id, _))) => {
                    let Some(result) = or_stop(stop, self.client.check_pass(check_id, None)).await
                    else {
                        return false;
                    };
                    self.lost(heartbeat_verdict(&result), &result, "TTL heartbeat")
                }
                _ => {
                    let Some(result) =
                        or_stop(stop, self.client.agent_service(&self.service_id)).await
                    else {
                        return false;
                    };
                    self.lost(verify_verdict(&result), &result, "verification")
                }
            };
            if lost {
                return true;
            }
        }
    }

    /// Logs a verdict; true when the registration must be made again.
    fn lost<T>(&self, verdict: Verdict, result: &Result<T, Error>, what: &'static str) -> bool {
        let error = result.as_ref().err().map(|e| chain(e)).unwrap_or_default();
        match verdict {
            Verdict::Kept => {
                debug!(what, "registration confirmed");
                false
            }
            Verdict::Gone => {
                warn!(
                    what,
                    error = %error,
                    "the agent lost the registration; registering again"
                );
                true
            }
            Verdict::Unreachable => {
                warn!(
                    what,
                    error = %error,
                    "the agent is unreachable; registering again once it answers"
                );
                true
            }
            Verdict::Trouble => {
                warn!(
                    what,
                    error = %error,
                    "the agent answered with an error; keeping the registration"
                );
                false
            }
        }
    }
}

/// A ticker whose first tick is one `period` after `start`; late ticks are not bunched up.
fn ticker(start: Instant, period: Duration) -> Interval {
    let mut interval = tokio::time::interval_at(start + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

/// Ticks `interval`, or never when there is none.
async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Checks what can be checked before anything is sent.
fn validate(reg: &ServiceRegistration, opts: &RegistrationOptions) -> Result<(), Error> {
    if reg.name.trim().is_empty() {
        return Err(Error::Config("the service registration has no name".into()));
    }
    if let Some(addr) = reg.address.as_deref() {
        if is_unspecified_host(addr) {
            return Err(Error::Config(format!(
                "service address {addr} is not routable; register the address other hosts reach \
                 this instance on"
            )));
        }
    }
    for (check_id, check) in check_ids(reg) {
        let http_host = check
            .http
            .as_deref()
            .and_then(|url| url.parse::<http::Uri>().ok())
            .and_then(|uri| uri.host().map(str::to_string));
        let tcp_host = check
            .tcp
            .as_deref()
            .and_then(|target| target.rsplit_once(':'))
            .map(|(host, _)| host.to_string());
        for host in http_host.iter().chain(tcp_host.iter()) {
            if is_unspecified_host(host) {
                return Err(Error::Config(format!(
                    "check {check_id} targets {host}, which is not routable; the agent would \
                     probe itself"
                )));
            }
        }
    }
    if opts.verify_interval.is_zero() {
        return Err(Error::Config("verify_interval must be non-zero".into()));
    }
    if let Some((check_id, period)) = &opts.ttl_heartbeat {
        if period.is_zero() {
            return Err(Error::Config(
                "the TTL heartbeat period must be non-zero".into(),
            ));
        }
        let check = check_ids(reg)
            .into_iter()
            .find(|(id, _)| id == check_id)
            .map(|(_, check)| check)
            .ok_or_else(|| {
                Error::Config(format!(
                    "TTL heartbeat check {check_id:?} is not a check of service {:?}",
                    reg.effective_id()
                ))
            })?;
        let ttl = check
            .ttl
            .as_deref()
            .ok_or_else(|| Error::Config(format!("check {check_id:?} is not a TTL check")))?;
        let ttl = crate::duration::parse(ttl)
            .map_err(|e| Error::Config(format!("check {check_id:?}: TTL {ttl:?}: {e}")))?;
        if *period >= ttl {
            return Err(Error::Config(format!(
                "TTL heartbeat period {period:?} must be shorter than the check's TTL {ttl:?}"
            )));
        }
    }
    Ok(())
}

/// `0.0.0.0`, `::` (bracketed or not).
fn is_unspecified_host(host: &str) -> bool {
    let host = host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified())
}

/// The registration's checks with the IDs Consul gives them: `CheckID`, else `service:<id>` for
/// a lone check, else `service:<id>:<n>` counting `Check` then `Checks` from 1 (§1.2.3).
fn check_ids(reg: &ServiceRegistration) -> Vec<(String, &CheckDefinition)> {
    let all: Vec<&CheckDefinition> = reg.check.iter().chain(reg.checks.iter()).collect();
    let service_id = reg.effective_id();
    let many = all.len() > 1;
    all.iter()
        .enumerate()
        .map(|(i, check)| {
            let id = match check.check_id.as_deref().filter(|id| !id.is_empty()) {
                Some(id) => id.to_string(),
                None if many => format!("service:{service_id}:{}", i + 1),
                None => format!("service:{service_id}"),
            };
            (id, *check)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn reg(address: Option<&str>) -> ServiceRegistration {
        ServiceRegistration {
            id: Some("web-1".into()),
            name: "web".into(),
            address: address.map(str::to_string),
            port: Some(9001),
            ..Default::default()
        }
    }

    fn ttl_check(id: Option<&str>, ttl: &str) -> CheckDefinition {
        CheckDefinition {
            check_id: id.map(str::to_string),
            ttl: Some(ttl.into()),
            ..Default::default()
        }
    }

    #[test]
    fn rejects_unspecified_addresses() {
        let opts = RegistrationOptions::default();
        for bad in ["0.0.0.0", "::", "[::]", " 0.0.0.0 "] {
            assert!(
                matches!(validate(&reg(Some(bad)), &opts), Err(Error::Config(_))),
                "{bad}"
            );
        }
        for good in ["10.0.0.5", "::1", "web.internal", ""] {
            assert!(validate(&reg(Some(good)), &opts).is_ok(), "{good}");
        }
        assert!(validate(&reg(None), &opts).is_ok());
    }

    #[test]
    fn rejects_unspecified_check_targets() {
        let opts = RegistrationOptions::default();
        let mut r = reg(Some("10.0.0.5"));
        r.check = Some(CheckDefinition {
            http: Some("http://0.0.0.0:9001/health".into()),
            interval: Some("2s".into()),
            ..Default::default()
        });
        assert!(matches!(validate(&r, &opts), Err(Error::Config(_))));
        r.check = Some(CheckDefinition {
            tcp: Some("[::]:9001".into()),
            interval: Some("2s".into()),
            ..Default::default()
        });
        assert!(matches!(validate(&r, &opts), Err(Error::Config(_))));
        r.check = Some(CheckDefinition {
            http: Some("http://10.0.0.5:9001/health".into()),
            interval: Some("2s".into()),
            ..Default::default()
        });
        assert!(validate(&r, &opts).is_ok());
    }

    #[test]
    fn derives_check_ids_like_consul() {
        let mut r = reg(None);
        r.check = Some(ttl_check(None, "10s"));
        let ids: Vec<String> = check_ids(&r).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["service:web-1"]);
        r.checks = vec![ttl_check(Some("mine"), "10s"), ttl_check(None, "10s")];
        let ids: Vec<String> = check_ids(&r).into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["service:web-1:1", "mine", "service:web-1:3"]);
    }

    #[test]
    fn validates_the_ttl_heartbeat() {
        let mut r = reg(Some("10.0.0.5"));
        r.check = Some(ttl_check(Some("web-1:ttl"), "10s"));
        let opts = |id: &str, period_ms: u64| RegistrationOptions {
            ttl_heartbeat: Some((id.to_string(), Duration::from_millis(period_ms))),
            ..Default::default()
        };
        assert!(validate(&r, &opts("web-1:ttl", 3000)).is_ok());
        // Unknown check, zero period, period not below the TTL.
        assert!(validate(&r, &opts("other", 3000)).is_err());
        assert!(validate(&r, &opts("web-1:ttl", 0)).is_err());
        assert!(validate(&r, &opts("web-1:ttl", 10_000)).is_err());
        // Not a TTL check.
        r.check = Some(CheckDefinition {
            check_id: Some("web-1:ttl".into()),
            http: Some("http://10.0.0.5:9001/health".into()),
            interval: Some("2s".into()),
            ..Default::default()
        });
        assert!(validate(&r, &opts("web-1:ttl", 3000)).is_err());
    }

    #[test]
    fn rejects_empty_name_and_zero_verify_interval() {
        let mut r = reg(None);
        r.name = String::new();
        assert!(validate(&r, &RegistrationOptions::default()).is_err());
        let opts = RegistrationOptions {
            verify_interval: Duration::ZERO,
            ..Default::default()
        };
        assert!(validate(&reg(None), &opts).is_err());
    }

    fn refused() -> Error {
        Error::Transport(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        )))
    }

    fn status(code: u16) -> Error {
        Error::Status {
            status: code,
            body: String::new(),
        }
    }

    #[test]
    fn verify_verdicts() {
        assert_eq!(
            verify_verdict(&Ok(Some(AgentService::default()))),
            Verdict::Kept
        );
        assert_eq!(verify_verdict(&Ok(None)), Verdict::Gone);
        assert_eq!(verify_verdict(&Err(refused())), Verdict::Unreachable);
        assert_eq!(
            verify_verdict(&Err(Error::Timeout(Duration::from_secs(1)))),
            Verdict::Unreachable
        );
        assert_eq!(verify_verdict(&Err(status(500))), Verdict::Trouble);
        assert_eq!(verify_verdict(&Err(status(403))), Verdict::Trouble);
    }

    #[test]
    fn heartbeat_verdicts() {
        assert_eq!(heartbeat_verdict(&Ok(())), Verdict::Kept);
        assert_eq!(heartbeat_verdict(&Err(status(404))), Verdict::Gone);
        assert_eq!(heartbeat_verdict(&Err(refused())), Verdict::Unreachable);
        // "does not have associated TTL": the agent is up and has the check.
        assert_eq!(heartbeat_verdict(&Err(status(500))), Verdict::Trouble);
    }

    #[tokio::test(start_paused = true)]
    async fn ticker_first_tick_is_one_period_out() {
        let start = Instant::now();
        let mut t = ticker(start, Duration::from_secs(2));
        t.tick().await;
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        let mut none: Option<Interval> = None;
        assert!(
            tokio::time::timeout(Duration::from_secs(3600), tick(&mut none))
                .await
                .is_err()
        );
    }
}
