//! Which blocking queries a change wakes: those that can see the changed service (its
//! health, catalog and agent views) and the views across services; every other waiting query
//! keeps waiting.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{spawn_get, Agent, Reply, PROMPTLY};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};

/// Time for a wrongly woken query to come back; nothing here depends on it being long.
const SETTLE: Duration = Duration::from_millis(300);

/// Starts a blocking GET of `path` at the index a plain GET of it shows now.
async fn wait_on(agent: &Agent, path: &str) -> (JoinHandle<Reply>, u64) {
    let index = agent.get(path).await.index();
    let sep = if path.contains('?') { '&' } else { '?' };
    (
        spawn_get(agent, format!("{path}{sep}index={index}&wait=30s")),
        index,
    )
}

async fn woken(pending: JoinHandle<Reply>, index: u64, what: &str) -> Reply {
    let r = timeout(PROMPTLY, pending)
        .await
        .unwrap_or_else(|_| panic!("{what} was not woken"))
        .unwrap();
    assert!(r.index() > index, "{what}: the index moved");
    r
}

fn ttl(id: &str, name: &str) -> serde_json::Value {
    json!({"ID": id, "Name": name, "Port": 80, "Check": {"CheckID": format!("{id}:ttl"), "TTL": "60s"}})
}

#[tokio::test]
async fn a_change_to_one_service_leaves_the_other_services_watchers_waiting() {
    let agent = Agent::start().await;
    agent.register(ttl("a-1", "a")).await;
    agent.register(ttl("b-1", "b")).await;

    let views_of_b = [
        "/v1/health/service/b",
        "/v1/health/service/b?passing",
        "/v1/catalog/service/b",
        "/v1/health/checks/b",
    ];
    let mut b_waiting = Vec::new();
    for path in views_of_b {
        b_waiting.push((path, wait_on(&agent, path).await.0));
    }
    let b_hash = agent.get("/v1/agent/service/b-1").await;
    let hash = b_hash.header("X-Consul-ContentHash").unwrap().to_string();
    b_waiting.push((
        "/v1/agent/service/b-1?hash",
        spawn_get(
            &agent,
            format!("/v1/agent/service/b-1?hash={hash}&wait=30s"),
        ),
    ));
    let (a_health, a_index) = wait_on(&agent, "/v1/health/service/a").await;
    let (a_catalog, a_catalog_index) = wait_on(&agent, "/v1/catalog/service/a").await;
    let (services, services_index) = wait_on(&agent, "/v1/catalog/services").await;
    let (state, state_index) = wait_on(&agent, "/v1/health/state/any").await;
    sleep(SETTLE).await;

    // A second instance of `a`, with a check: a's views, the service list and the check list
    // change; b's do not.
    agent.register(ttl("a-2", "a")).await;
    let r = woken(a_health, a_index, "health/service/a").await;
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    woken(a_catalog, a_catalog_index, "catalog/service/a").await;
    woken(services, services_index, "catalog/services").await;
    woken(state, state_index, "health/state/any").await;
    // A status change of a's check, too.
    let (a_health, a_index) = wait_on(&agent, "/v1/health/service/a?passing").await;
    agent.put_ok("/v1/agent/check/pass/a-1:ttl", "").await;
    woken(a_health, a_index, "health/service/a?passing").await;
    sleep(SETTLE).await;
    for (path, pending) in &b_waiting {
        assert!(!pending.is_finished(), "{path} was woken by changes to a");
    }

    // A change to b wakes b's views.
    agent.put_ok("/v1/agent/check/pass/b-1:ttl", "").await;
    agent
        .register(json!({"ID": "b-1", "Name": "b", "Port": 81, "Check": {"CheckID": "b-1:ttl", "TTL": "60s"}}))
        .await;
    for (path, pending) in b_waiting {
        let r = timeout(PROMPTLY, pending)
            .await
            .unwrap_or_else(|_| panic!("{path} was not woken by a change to b"))
            .unwrap();
        assert_eq!(r.status, 200, "{path}");
    }
}

/// The agent's own counters (`Stats.dev_agent` of `agent/self`).
async fn stat(agent: &Agent, name: &str) -> u64 {
    let me = agent.get("/v1/agent/self").await.json();
    me["Stats"]["dev_agent"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {}", me["Stats"]))
        .parse()
        .unwrap()
}

/// Not even a re-render: a change to one service costs the watchers of the others nothing.
#[tokio::test]
async fn watchers_of_other_services_do_not_even_render_again() {
    let agent = Agent::start().await;
    agent.register(ttl("a-1", "a")).await;
    agent.register(ttl("b-1", "b")).await;
    // 30 watchers of b, each a read of its own (no shared answer).
    let mut pending = Vec::new();
    for i in 0..30 {
        pending.push(
            wait_on(&agent, &format!("/v1/health/service/b?tag=t{i}"))
                .await
                .0,
        );
    }
    common::eventually("30 queries wait", || async {
        stat(&agent, "blocking_queries").await >= 30
    })
    .await;
    let renders = stat(&agent, "view_renders").await;
    for n in 2..12 {
        agent.register(ttl(&format!("a-{n}"), "a")).await;
    }
    agent.put_ok("/v1/agent/check/pass/a-1:ttl", "").await;
    sleep(SETTLE).await;
    assert_eq!(
        stat(&agent, "view_renders").await,
        renders,
        "eleven changes to a made b's watchers render"
    );
    // A change to b renders each of them once.
    agent.put_ok("/v1/agent/check/pass/b-1:ttl", "").await;
    for p in pending {
        assert_eq!(timeout(PROMPTLY, p).await.unwrap().unwrap().status, 200);
    }
    assert_eq!(stat(&agent, "view_renders").await, renders + 30);
}

#[tokio::test]
async fn a_node_level_change_wakes_every_services_watchers() {
    let agent = Agent::start().await;
    agent.register(ttl("a-1", "a")).await;
    agent.register(ttl("b-1", "b")).await;
    let (a, a_index) = wait_on(&agent, "/v1/health/service/a").await;
    let (b, b_index) = wait_on(&agent, "/v1/health/service/b").await;
    let (node, node_index) = wait_on(&agent, "/v1/health/node/dev").await;
    sleep(SETTLE).await;
    // Node maintenance adds a node check, which every entry of the node shows.
    agent.put_ok("/v1/agent/maintenance?enable=true", "").await;
    for (pending, index, what) in [
        (a, a_index, "a"),
        (b, b_index, "b"),
        (node, node_index, "node"),
    ] {
        let r = woken(pending, index, what).await;
        assert!(r.body.contains("_node_maintenance"), "{what}: {}", r.body);
    }
}

#[tokio::test]
async fn watchers_of_one_read_get_the_same_answer_after_a_change() {
    let agent = Agent::start().await;
    agent.register(ttl("a-1", "a")).await;
    let mut pending = Vec::new();
    let mut index = 0;
    for _ in 0..20 {
        let (p, i) = wait_on(&agent, "/v1/health/service/a").await;
        pending.push(p);
        index = i;
    }
    sleep(SETTLE).await;
    agent.register(ttl("a-2", "a")).await;
    let mut answers = Vec::new();
    for p in pending {
        answers.push(woken(p, index, "health/service/a").await);
    }
    let first = &answers[0];
    for r in &answers {
        assert_eq!((r.index(), &r.body), (first.index(), &first.body));
    }
    // A later change is seen too: nothing stale is served from the shared answer.
    agent.put_ok("/v1/agent/check/pass/a-2:ttl", "").await;
    let now = agent.get("/v1/health/service/a").await;
    assert!(now.index() > first.index());
    assert!(now.body.contains("passing") && now.body != first.body);
}
