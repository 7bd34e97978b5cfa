//! Behaviours third-party clients found different from Consul, each now as Consul does it.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Agent, PROMPTLY};
use serde_json::{json, Value};
use tokio::time::timeout;

#[tokio::test]
async fn a_peer_that_does_not_exist_has_nothing_on_every_endpoint_that_takes_peer() {
    let agent = Agent::start().await;
    agent
        .register(json!({"ID": "web-1", "Name": "web", "Port": 80, "Check": {"TTL": "30s"}}))
        .await;
    for (path, empty) in [
        ("/v1/health/service/web", json!([])),
        ("/v1/health/checks/web", json!([])),
        ("/v1/health/state/any", json!([])),
        ("/v1/health/node/dev", json!([])),
        ("/v1/catalog/service/web", json!([])),
        ("/v1/catalog/services", json!({})),
        ("/v1/catalog/nodes", json!([])),
        ("/v1/catalog/node/dev", Value::Null),
    ] {
        let local = agent.get(path).await;
        assert_eq!(local.status, 200, "{path}");
        assert_ne!(local.json(), empty, "{path} has local data");
        // An empty `peer` is the local cluster.
        assert_eq!(
            agent.get(&format!("{path}?peer=")).await.json(),
            local.json()
        );
        let peered = agent.get(&format!("{path}?peer=nope")).await;
        assert_eq!(peered.status, 200, "{path}?peer=nope: {}", peered.body);
        assert_eq!(peered.json(), empty, "{path}?peer=nope");
        peered.index();
        // Blocking on it waits like any other read, and still answers nothing.
        let index = peered.index();
        let r = timeout(
            PROMPTLY,
            agent.get(&format!("{path}?peer=nope&index={index}&wait=100ms")),
        )
        .await
        .unwrap();
        assert_eq!(r.json(), empty, "{path}?peer=nope blocking");
    }
}

#[tokio::test]
async fn replace_existing_checks_drops_the_maintenance_check_as_consul_does() {
    let agent = Agent::start().await;
    let web =
        json!({"ID": "web-1", "Name": "web", "Check": {"CheckID": "web-1:ttl", "TTL": "30s"}});
    agent.register(web.clone()).await;
    agent
        .put_ok("/v1/agent/service/maintenance/web-1?enable=true", "")
        .await;
    let ids = |v: Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(
        ids(agent.get("/v1/agent/checks").await.json()),
        ["_service_maintenance:web-1", "web-1:ttl"]
    );
    // Without the flag it stays.
    agent.register(web.clone()).await;
    assert_eq!(ids(agent.get("/v1/agent/checks").await.json()).len(), 2);
    agent
        .put_ok(
            "/v1/agent/service/register?replace-existing-checks",
            &web.to_string(),
        )
        .await;
    assert_eq!(
        ids(agent.get("/v1/agent/checks").await.json()),
        ["web-1:ttl"]
    );
}

#[tokio::test]
async fn passing_is_checked_after_the_query_options_and_before_the_wait() {
    let agent = Agent::start().await;
    agent.register(json!({"Name": "web"})).await;
    // The query options come first, as Consul parses them before the endpoint's own.
    agent
        .expect_error(
            "GET",
            "/v1/health/service/web?passing=maybe&wait=soon",
            "",
            400,
            "Invalid wait time",
        )
        .await;
    agent
        .expect_error(
            "GET",
            "/v1/health/service/?passing=maybe&index=x",
            "",
            400,
            "Invalid index",
        )
        .await;
    agent
        .expect_error(
            "GET",
            "/v1/health/service/?passing=maybe",
            "",
            400,
            "Missing service name",
        )
        .await;
    // A bad value fails at once, not after the wait (Consul checks it before its RPC).
    let index = agent.get("/v1/health/service/web").await.index();
    let started = tokio::time::Instant::now();
    agent
        .expect_error(
            "GET",
            &format!("/v1/health/service/web?passing=maybe&index={index}&wait=30s"),
            "",
            400,
            "Invalid value for ?passing",
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // And before the filter, which Consul builds last.
    agent
        .expect_error(
            "GET",
            "/v1/health/service/web?passing=maybe&filter=%3D%3D",
            "",
            400,
            "Invalid value for ?passing",
        )
        .await;
}

#[tokio::test]
async fn a_filter_selector_naming_no_field_is_consuls_500_even_on_an_empty_result() {
    let agent = Agent::start().await;
    agent
        .register(json!({"ID": "web-1", "Name": "web", "Meta": {"v": "1"}}))
        .await;
    let prefix = "Failed to create boolean expression evaluator: ";
    for (path, expr, selector) in [
        (
            "/v1/health/service/web",
            "Service.Nope%20%3D%3D%201",
            "Service.Nope",
        ),
        ("/v1/health/service/nothing", "Nope%20%3D%3D%201", "Nope"),
        (
            "/v1/catalog/service/web",
            "Service.ID%20%3D%3D%20x",
            "Service",
        ),
        (
            "/v1/catalog/services",
            "ServiceMeta.v.x%20%3D%3D%201",
            "ServiceMeta.v.x",
        ),
        (
            "/v1/health/state/any",
            "Checks.Status%20%3D%3D%20x",
            "Checks",
        ),
        (
            "/v1/agent/services",
            "ServiceName%20%3D%3D%20web",
            "ServiceName",
        ),
        ("/v1/agent/members", "Tags.a.b%20%3D%3D%201", "Tags.a.b"),
    ] {
        agent
            .expect_error(
                "GET",
                &format!("{path}?filter={expr}"),
                "",
                500,
                &format!("{prefix}Selector {selector:?} is not valid"),
            )
            .await;
    }
    // A value that does not coerce to its field's type fails before any item is looked at.
    agent
        .expect_error(
            "GET",
            "/v1/health/service/nothing?filter=Service.Port%20%3D%3D%20%22http%22",
            "",
            500,
            &format!(
                r#"{prefix}Failed to coerce value "http" for selector "Service.Port": strconv.ParseInt: parsing "http": invalid syntax"#
            ),
        )
        .await;
    // Fields Consul has and the dev agent never fills are valid, and select nothing.
    let r = agent
        .get("/v1/health/service/web?filter=Service.PeerName%20%3D%3D%20peer1")
        .await;
    assert_eq!((r.status, r.json()), (200, json!([])));
    // Any key of a map.
    let r = agent
        .get("/v1/health/service/web?filter=Service.Meta.other%20is%20empty")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
}
