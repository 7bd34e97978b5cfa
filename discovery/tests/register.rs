//! The registration lifecycle against the real embedded dev agent, over HTTP.
//!
//! Every wait is a poll for a condition with a generous deadline; nothing asserts tight timing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{client_for, dead_addr, eventually, passing, service, Agent, DEADLINE};
use discovery::register::{LeaveMode, Registration, RegistrationOptions, RegistrationState};
use discovery::wire::{CheckDefinition, ServiceRegistration};
use discovery::{Client, Error};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

fn with_ttl(mut reg: ServiceRegistration, check_id: &str, ttl: &str) -> ServiceRegistration {
    reg.check = Some(CheckDefinition {
        check_id: Some(check_id.into()),
        name: Some("ttl".into()),
        ttl: Some(ttl.into()),
        ..Default::default()
    });
    reg
}

/// Fast verification and retries, so recoveries happen well within the deadlines.
fn quick_opts() -> RegistrationOptions {
    RegistrationOptions {
        verify_interval: Duration::from_millis(300),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_millis(500),
        ..RegistrationOptions::default()
    }
}

async fn state_is(rx: &mut watch::Receiver<RegistrationState>, want: RegistrationState) {
    timeout(DEADLINE, rx.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for state {want:?}"))
        .expect("the state sender is alive");
}

async fn passing_ids(client: &Client) -> Vec<String> {
    let (entries, _) = client.health_service("web", &passing()).await.unwrap();
    entries.into_iter().map(|e| e.service.id).collect()
}

#[tokio::test]
async fn registers_and_shows_in_agent_services() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    let reg = Registration::spawn(
        client.clone(),
        service("web-1", "web", 9001),
        RegistrationOptions::default(),
    )
    .unwrap();
    assert_eq!(reg.service_id(), "web-1");
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;
    assert_eq!(reg.registrations(), 1);

    let services = client.agent_services().await.unwrap();
    let web1 = services.get("web-1").expect("web-1 is registered");
    assert_eq!(web1.service, "web");
    assert_eq!(web1.address, "127.0.0.1");
    assert_eq!(web1.port, 9001);
    // No check: passing.
    assert_eq!(passing_ids(&client).await, ["web-1"]);
}

#[tokio::test]
async fn leave_deregisters() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    let reg =
        Registration::spawn(client.clone(), service("web-1", "web", 9001), quick_opts()).unwrap();
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;

    timeout(DEADLINE, reg.leave())
        .await
        .expect("leave is bounded")
        .unwrap();
    assert_eq!(*state.borrow(), RegistrationState::Left);
    assert!(client.agent_service("web-1").await.unwrap().is_none());
    // The loop is gone: nothing registers it again.
    sleep(Duration::from_millis(900)).await;
    assert!(client.agent_service("web-1").await.unwrap().is_none());
}

#[tokio::test]
async fn leave_with_maintenance_first_deregisters() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    let opts = RegistrationOptions {
        leave: LeaveMode::MaintenanceThenDeregister,
        ..quick_opts()
    };
    let reg = Registration::spawn(client.clone(), service("web-1", "web", 9001), opts).unwrap();
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;

    timeout(DEADLINE, reg.leave())
        .await
        .expect("leave is bounded")
        .unwrap();
    assert!(client.agent_service("web-1").await.unwrap().is_none());
    assert!(passing_ids(&client).await.is_empty());
}

#[tokio::test]
async fn leave_reports_an_unreachable_agent_within_its_timeout() {
    let mut agent = Agent::start_quick().await;
    let client = agent.client();
    let opts = RegistrationOptions {
        leave_timeout: Duration::from_secs(2),
        ..quick_opts()
    };
    let reg = Registration::spawn(client, service("web-1", "web", 9001), opts).unwrap();
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;
    agent.stop().await;

    let result = timeout(DEADLINE, reg.leave())
        .await
        .expect("leave is bounded");
    assert!(result.is_err(), "{result:?}");
    assert_eq!(*state.borrow(), RegistrationState::Left);
}

#[tokio::test]
async fn registers_again_after_the_agent_restarts_empty() {
    let mut agent = Agent::start_quick().await;
    let addr = agent.addr;
    let client = agent.client();
    let reg =
        Registration::spawn(client.clone(), service("web-1", "web", 9001), quick_opts()).unwrap();
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;
    assert_eq!(reg.registrations(), 1);

    agent.stop().await;
    state_is(&mut state, RegistrationState::Lost).await;
    let _agent = Agent::start_quick_at(addr).await;
    eventually("web-1 to be registered with the new agent", || {
        let client = client.clone();
        async move { matches!(client.agent_service("web-1").await, Ok(Some(_))) }
    })
    .await;
    state_is(&mut state, RegistrationState::Registered).await;
    assert!(reg.registrations() >= 2);
    reg.leave().await.unwrap();
}

#[tokio::test]
async fn registers_once_the_agent_comes_up() {
    let addr = dead_addr().await;
    let client = client_for(addr);
    let reg =
        Registration::spawn(client.clone(), service("web-1", "web", 9001), quick_opts()).unwrap();
    let mut state = reg.state();
    // Let it fail a few times first.
    sleep(Duration::from_millis(500)).await;
    assert_eq!(*state.borrow(), RegistrationState::Pending);
    assert_eq!(reg.registrations(), 0);

    let _agent = Agent::start_quick_at(addr).await;
    state_is(&mut state, RegistrationState::Registered).await;
    assert!(client.agent_service("web-1").await.unwrap().is_some());
    assert_eq!(reg.registrations(), 1);
    reg.leave().await.unwrap();
}

#[tokio::test]
async fn registers_again_when_deregistered_behind_its_back() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    let reg =
        Registration::spawn(client.clone(), service("web-1", "web", 9001), quick_opts()).unwrap();
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;

    // Verification sees the 404 and registers again.
    client.deregister("web-1").await.unwrap();
    eventually("web-1 to be back", || {
        let client = client.clone();
        async move { matches!(client.agent_service("web-1").await, Ok(Some(_))) }
    })
    .await;
    assert!(reg.registrations() >= 2);
    reg.leave().await.unwrap();
}

#[tokio::test]
async fn rejects_unspecified_addresses() {
    let client = client_for(dead_addr().await);
    for bad in ["0.0.0.0", "::", "[::]"] {
        let mut reg = service("web-1", "web", 9001);
        reg.address = Some(bad.into());
        let result = Registration::spawn(client.clone(), reg, RegistrationOptions::default());
        assert!(matches!(result, Err(Error::Config(_))), "{bad}: {result:?}");
    }
}

#[tokio::test]
async fn ttl_heartbeat_keeps_a_ttl_check_passing() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    let ttl = Duration::from_secs(2);
    let opts = RegistrationOptions {
        ttl_heartbeat: Some(("web-1:ttl".into(), Duration::from_millis(300))),
        ..RegistrationOptions::default()
    };
    let reg = Registration::spawn(
        client.clone(),
        with_ttl(service("web-1", "web", 9001), "web-1:ttl", "2s"),
        opts,
    )
    .unwrap();
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;

    // A TTL check starts critical; the first heartbeat follows the registration at once.
    eventually("the TTL check to pass", || {
        let client = client.clone();
        async move { passing_ids(&client).await == ["web-1"] }
    })
    .await;
    // It stays passing for well over one TTL: only the heartbeat can do that.
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        let checks = client.agent_checks().await.unwrap();
        assert_eq!(
            checks["web-1:ttl"].status, "passing",
            "{:?}",
            checks["web-1:ttl"]
        );
        sleep(Duration::from_millis(250)).await;
    }
    reg.leave().await.unwrap();
}

#[tokio::test]
async fn ttl_heartbeat_404_registers_again() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    let opts = RegistrationOptions {
        // Verification is far off: only the heartbeat's 404 can notice the loss in time.
        verify_interval: Duration::from_secs(3600),
        ttl_heartbeat: Some(("web-1:ttl".into(), Duration::from_millis(300))),
        ..quick_opts()
    };
    let reg = Registration::spawn(
        client.clone(),
        with_ttl(service("web-1", "web", 9001), "web-1:ttl", "10s"),
        opts,
    )
    .unwrap();
    let mut state = reg.state();
    state_is(&mut state, RegistrationState::Registered).await;

    client.deregister("web-1").await.unwrap();
    eventually("web-1 to be back and passing", || {
        let client = client.clone();
        async move { passing_ids(&client).await == ["web-1"] }
    })
    .await;
    assert!(reg.registrations() >= 2);
    reg.leave().await.unwrap();
}
