//! The typed [`discovery::Client`] against the embedded dev agent: every call the workers and
//! the balancer make, end to end over HTTP, including how Consul's errors come back.
//!
//! Waits poll with generous deadlines; nothing asserts tight timing.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{client_for, dead_addr, passing, Agent, DEADLINE};
use discovery::wire::{CheckDefinition, ServiceRegistration};
use discovery::{Client, ClientConfig, Error, HealthQuery};
use tokio::time::{sleep, timeout, Instant};

/// The typed client, configured with a full base URL (`http://host:port/`).
fn client(agent: &Agent) -> Client {
    Client::new(ClientConfig::new(&format!("http://{}/", agent.addr)).unwrap())
}

fn ttl(id: &str, ttl: &str) -> CheckDefinition {
    CheckDefinition {
        check_id: Some(id.into()),
        ttl: Some(ttl.into()),
        ..Default::default()
    }
}

/// `api-1`: three TTL checks, one in `Check` and two in `Checks`.
fn api_registration() -> ServiceRegistration {
    ServiceRegistration {
        id: Some("api-1".into()),
        name: "api".into(),
        tags: vec!["v1".into(), "blue".into()],
        address: Some("127.0.0.1".into()),
        port: Some(9000),
        meta: BTreeMap::from([("version".to_string(), "1.2.3".to_string())]),
        check: Some(CheckDefinition {
            name: Some("main".into()),
            notes: Some("the main check".into()),
            ..ttl("api-1:ttl", "60s")
        }),
        checks: vec![
            CheckDefinition {
                ttl: Some("60s".into()),
                ..Default::default()
            },
            CheckDefinition {
                ttl: Some("60s".into()),
                status: Some("passing".into()),
                ..Default::default()
            },
        ],
    }
}

/// Asserts `Err(Error::Status { status, body })`.
fn assert_status<T: std::fmt::Debug>(r: Result<T, Error>, status: u16, body: &str) {
    match r {
        Err(Error::Status { status: s, body: b }) => {
            assert_eq!((s, b.as_str()), (status, body));
        }
        other => panic!("expected {status} {body:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn register_read_and_deregister() {
    let agent = Agent::start().await;
    let c = client(&agent);
    c.register(&api_registration()).await.unwrap();
    // Idempotent: the client always sends replace-existing-checks.
    c.register(&api_registration()).await.unwrap();

    let services = c.agent_services().await.unwrap();
    assert_eq!(services.keys().collect::<Vec<_>>(), ["api-1"]);
    let s = &services["api-1"];
    assert_eq!(s.service, "api");
    assert_eq!(s.tags, ["v1", "blue"]);
    assert_eq!(s.port, 9000);
    assert_eq!(s.address, "127.0.0.1");
    assert_eq!(s.meta["version"], "1.2.3");
    assert_eq!((s.weights.passing, s.weights.warning), (1, 1));
    assert_eq!(s.datacenter, "dc1");
    assert_eq!(s.tagged_addresses["lan_ipv4"].port, 9000);

    let one = c.agent_service("api-1").await.unwrap().expect("registered");
    assert_eq!(one.id, "api-1");
    assert!(!one.content_hash.is_empty());
    assert!(
        c.agent_service("nope").await.unwrap().is_none(),
        "404 is None"
    );

    let checks = c.agent_checks().await.unwrap();
    assert_eq!(
        checks.keys().collect::<Vec<_>>(),
        ["api-1:ttl", "service:api-1:2", "service:api-1:3"]
    );
    assert_eq!(checks["api-1:ttl"].name, "main");
    assert_eq!(checks["api-1:ttl"].notes, "the main check");
    assert_eq!(checks["api-1:ttl"].status, "critical");
    assert_eq!(checks["service:api-1:2"].name, "Service 'api' check");
    assert_eq!(checks["service:api-1:3"].status, "passing");
    assert_eq!(checks["api-1:ttl"].kind, "ttl");

    let health_checks = c.health_checks("api").await.unwrap();
    assert_eq!(health_checks.len(), 3);
    assert!(health_checks.iter().all(|h| h.service_id == "api-1"));

    c.deregister("api-1").await.unwrap();
    assert!(c.agent_service("api-1").await.unwrap().is_none());
    assert!(c.agent_checks().await.unwrap().is_empty());
    assert_status(
        c.deregister("api-1").await,
        404,
        "Unknown service ID \"api-1\". Ensure that the service ID is passed, not the service name.",
    );
}

#[tokio::test]
async fn odd_ids_are_percent_encoded() {
    let agent = Agent::start().await;
    let c = client(&agent);
    for id in ["web#1", "web 2", "web/3", "web?x=4&y", "wéb-5"] {
        let reg = ServiceRegistration {
            id: Some(id.into()),
            name: "web".into(),
            check: Some(ttl(&format!("{id}:ttl"), "60s")),
            ..Default::default()
        };
        c.register(&reg).await.unwrap();
        let got = c.agent_service(id).await.unwrap();
        assert_eq!(got.map(|s| s.id).as_deref(), Some(id));
        c.check_pass(&format!("{id}:ttl"), Some("a note & more"))
            .await
            .unwrap();
        assert_eq!(
            c.agent_checks().await.unwrap()[&format!("{id}:ttl")].output,
            "a note & more"
        );
        c.maintenance(id, true, Some("100% / done?")).await.unwrap();
        let maint = &c.agent_checks().await.unwrap()[&format!("_service_maintenance:{id}")];
        assert_eq!(maint.notes, "100% / done?");
        c.deregister(id).await.unwrap();
        assert!(c.agent_service(id).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn ttl_updates_and_their_errors() {
    let agent = Agent::start().await;
    let c = client(&agent);
    c.register(&api_registration()).await.unwrap();
    let status_of = |checks: &BTreeMap<String, discovery::wire::HealthCheck>| {
        (
            checks["api-1:ttl"].status.clone(),
            checks["api-1:ttl"].output.clone(),
        )
    };
    c.check_pass("api-1:ttl", Some("ok")).await.unwrap();
    assert_eq!(
        status_of(&c.agent_checks().await.unwrap()),
        ("passing".into(), "ok".into())
    );
    c.check_warn("api-1:ttl", Some("slow")).await.unwrap();
    assert_eq!(
        status_of(&c.agent_checks().await.unwrap()),
        ("warning".into(), "slow".into())
    );
    c.check_fail("api-1:ttl", None).await.unwrap();
    assert_eq!(
        status_of(&c.agent_checks().await.unwrap()),
        ("critical".into(), "".into())
    );
    c.check_update("api-1:ttl", "passing", "back")
        .await
        .unwrap();
    assert_eq!(
        status_of(&c.agent_checks().await.unwrap()),
        ("passing".into(), "back".into())
    );
    // The same through health/checks.
    let hc = c.health_checks("api").await.unwrap();
    let main = hc.iter().find(|h| h.check_id == "api-1:ttl").unwrap();
    assert_eq!(
        (main.status.as_str(), main.output.as_str()),
        ("passing", "back")
    );

    assert_status(
        c.check_update("api-1:ttl", "bogus", "").await,
        400,
        "Invalid check status: 'bogus'",
    );
    let unknown =
        "Unknown check ID \"nope\". Ensure that the check ID is passed, not the check name.";
    assert_status(c.check_pass("nope", None).await, 404, unknown);
    assert_status(c.check_warn("nope", None).await, 404, unknown);
    assert_status(c.check_fail("nope", None).await, 404, unknown);
    assert_status(c.check_update("nope", "passing", "").await, 404, unknown);

    // The error text is Consul's, in the Go client's words.
    let err = c.check_pass("nope", None).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    assert_eq!(
        err.to_string(),
        format!("Unexpected response code: 404 ({unknown})")
    );
}

#[tokio::test]
async fn registration_errors_come_back_as_status_errors() {
    let agent = Agent::start().await;
    let c = client(&agent);
    assert_status(
        c.register(&ServiceRegistration::default()).await,
        400,
        "Missing service name",
    );
    let mut reg = api_registration();
    reg.address = Some("0.0.0.0".into());
    assert_status(c.register(&reg).await, 400, "Invalid service address");
    let mut reg = api_registration();
    reg.check = Some(CheckDefinition {
        http: Some("http://127.0.0.1/health".into()),
        ..Default::default()
    });
    assert_status(
        c.register(&reg).await,
        400,
        "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
    );
    let mut reg = api_registration();
    reg.meta.insert("consul-version".into(), "x".into());
    assert_status(
        c.register(&reg).await,
        400,
        "Invalid Service Meta: Couldn't load metadata pair ('consul-version', 'x'): Key prefix 'consul-' is reserved for internal use",
    );
    let mut reg = api_registration();
    reg.checks[0].status = Some("ok".into());
    assert_status(
        c.register(&reg).await,
        400,
        "Status for checks must 'passing', 'warning', 'critical'",
    );
    assert!(c.agent_services().await.unwrap().is_empty());
    assert_status(
        c.maintenance("nope", true, None).await,
        404,
        "Unknown service ID \"nope\". Ensure that the service ID is passed, not the service name.",
    );
}

#[tokio::test]
async fn health_service_filters_and_maintenance() {
    let agent = Agent::start().await;
    let c = client(&agent);
    c.register(&api_registration()).await.unwrap();
    let mut green = api_registration();
    green.id = Some("api-2".into());
    green.tags = vec!["v1".into(), "green".into()];
    green.check = Some(ttl("api-2:ttl", "60s"));
    green.checks = vec![];
    c.register(&green).await.unwrap();

    let (all, meta) = c
        .health_service("api", &HealthQuery::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    assert!(meta.index >= 1);
    assert!(meta.known_leader);
    assert_eq!(meta.last_contact_ms, 0);
    assert_eq!(all[0].service.id, "api-1", "sorted by service ID");
    assert_eq!(all[0].address(), "127.0.0.1");
    assert_eq!(all[0].node.node, "dev");
    assert_eq!(all[0].aggregated_status(), "critical");
    assert!(c
        .health_service("api", &passing())
        .await
        .unwrap()
        .0
        .is_empty());

    for id in ["api-1:ttl", "service:api-1:2", "api-2:ttl"] {
        c.check_pass(id, None).await.unwrap();
    }
    let (up, _) = c.health_service("api", &passing()).await.unwrap();
    assert_eq!(up.len(), 2);
    assert_eq!(up[0].aggregated_status(), "passing");
    // A warning is not passing.
    c.check_warn("api-2:ttl", None).await.unwrap();
    let (up, _) = c.health_service("api", &passing()).await.unwrap();
    assert_eq!(
        up.iter().map(|e| e.service.id.as_str()).collect::<Vec<_>>(),
        ["api-1"]
    );
    c.check_pass("api-2:ttl", None).await.unwrap();

    // Tags: all must match, case-insensitively.
    let tagged = |tags: &[&str]| HealthQuery {
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let ids = |entries: Vec<discovery::wire::ServiceEntry>| -> Vec<String> {
        entries.into_iter().map(|e| e.service.id).collect()
    };
    assert_eq!(
        ids(c.health_service("api", &tagged(&["V1"])).await.unwrap().0),
        ["api-1", "api-2"]
    );
    assert_eq!(
        ids(c
            .health_service("api", &tagged(&["v1", "BLUE"]))
            .await
            .unwrap()
            .0),
        ["api-1"]
    );
    assert!(ids(c
        .health_service("api", &tagged(&["blue", "green"]))
        .await
        .unwrap()
        .0)
    .is_empty());
    let instance = discovery::Instance::from_entry(
        &c.health_service("api", &tagged(&["green"]))
            .await
            .unwrap()
            .0[0],
    );
    assert_eq!(instance.authority(), "127.0.0.1:9000");

    // Maintenance takes an instance out of ?passing and back.
    c.maintenance("api-1", true, Some("upgrade")).await.unwrap();
    let checks = c.agent_checks().await.unwrap();
    let maint = &checks["_service_maintenance:api-1"];
    assert_eq!(
        (maint.status.as_str(), maint.notes.as_str()),
        ("critical", "upgrade")
    );
    assert_eq!(
        ids(c.health_service("api", &passing()).await.unwrap().0),
        ["api-2"]
    );
    let (all, _) = c
        .health_service("api", &HealthQuery::default())
        .await
        .unwrap();
    assert_eq!(all[0].aggregated_status(), "maintenance");
    c.maintenance("api-1", false, None).await.unwrap();
    assert_eq!(
        ids(c.health_service("api", &passing()).await.unwrap().0),
        ["api-1", "api-2"]
    );
    assert!(!c
        .agent_checks()
        .await
        .unwrap()
        .contains_key("_service_maintenance:api-1"));
}

#[tokio::test]
async fn health_service_blocks_until_a_change_or_the_wait() {
    let agent = Agent::start().await;
    let c = client(&agent);
    c.register(&api_registration()).await.unwrap();
    let (_, meta) = c
        .health_service("api", &HealthQuery::default())
        .await
        .unwrap();

    // Nothing changes: the wait runs out, same index.
    let q = HealthQuery {
        index: meta.index,
        wait: Some(Duration::from_secs(1)),
        ..Default::default()
    };
    let started = Instant::now();
    let (entries, same) = c.health_service("api", &q).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(same.index, meta.index);
    assert_eq!(entries.len(), 1);

    // A change wakes a 30 s query long before its wait.
    let q = HealthQuery {
        index: meta.index,
        wait: Some(Duration::from_secs(30)),
        passing: false,
        ..Default::default()
    };
    let blocked = {
        let c = c.clone();
        tokio::spawn(async move { c.health_service("api", &q).await })
    };
    sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished());
    c.check_pass("api-1:ttl", Some("up")).await.unwrap();
    let (entries, newer) = timeout(DEADLINE, blocked)
        .await
        .expect("woken by the change")
        .unwrap()
        .unwrap();
    assert!(newer.index > meta.index);
    let main = entries[0]
        .checks
        .iter()
        .find(|h| h.check_id == "api-1:ttl")
        .unwrap();
    assert_eq!(main.status, "passing");
}

#[tokio::test]
async fn catalog_services_blocks_until_a_registration() {
    let agent = Agent::start().await;
    let c = client(&agent);
    let (services, meta) = c.catalog_services(0, None).await.unwrap();
    assert_eq!(services.keys().collect::<Vec<_>>(), ["consul"]);
    assert!(meta.index >= 1);
    assert!(meta.known_leader);

    let blocked = {
        let c = c.clone();
        let index = meta.index;
        tokio::spawn(async move {
            c.catalog_services(index, Some(Duration::from_secs(30)))
                .await
        })
    };
    sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished());
    c.register(&api_registration()).await.unwrap();
    let (services, newer) = timeout(DEADLINE, blocked)
        .await
        .expect("woken by the registration")
        .unwrap()
        .unwrap();
    assert!(newer.index > meta.index);
    assert_eq!(services["api"], ["blue", "v1"]);
    assert_eq!(services["consul"], Vec::<String>::new());

    // Unchanged: the wait runs out with the same index.
    let (_, same) = c
        .catalog_services(newer.index, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    assert_eq!(same.index, newer.index);
}

#[tokio::test]
async fn members_self_and_leader() {
    let agent = Agent::start().await;
    let c = client(&agent);
    let lan = c.members().await.unwrap();
    assert_eq!(lan.len(), 1);
    assert_eq!(lan[0].name, "dev");
    assert_eq!(lan[0].addr, "127.0.0.1");
    assert_eq!(lan[0].status_name(), "alive");
    assert_eq!(lan[0].tags["role"], "consul");
    let wan = c.members_wan().await.unwrap();
    assert_eq!(wan.len(), 1);
    assert_eq!(wan[0].name, "dev.dc1");

    let me = c.agent_self().await.unwrap();
    assert_eq!(me.config.datacenter, "dc1");
    assert_eq!(me.config.node_name, "dev");
    assert!(me.config.server);
    assert!(!me.config.version.is_empty());
    assert_eq!(me.member, lan[0]);

    let leader = c.status_leader().await.unwrap();
    assert_eq!(leader, "127.0.0.1:8300");
}

#[tokio::test]
async fn a_dead_agent_is_a_connect_error() {
    let c = client_for(dead_addr().await);
    let err = c.agent_services().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert_eq!(err.status(), None);
}
