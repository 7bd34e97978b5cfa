//! The balancer fed by Consul: the embedded dev agent runs in-process, backends register over
//! HTTP with `discovery::Client`, and the balancer follows them with blocking queries.
//!
//! Every wait is a poll for a condition with a generous deadline; nothing asserts tight timing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::*;
use discovery::wire::CheckDefinition;
use http::StatusCode;

/// A balancer routing `web` through the agent's catalog.
async fn consul_balancer(agent: &Agent) -> Balancer {
    Balancer::start(config(&["web"]), Some(agent.client()), |_| {}).await
}

async fn register_all(agent: &Agent, backends: &[Backend]) {
    let c = agent.client();
    for b in backends {
        c.register(&b.registration("web")).await.unwrap();
    }
}

/// Sends `n` sequential GETs on new connections; all must succeed. Returns the answering
/// backends' names.
async fn get_n(lb: &Balancer, n: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(n);
    for _ in 0..n {
        let a = get(lb.addr, "/").await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
        names.push(a.text());
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_200_once_discovery_answered() {
    // Consul is not there yet: the balancer must not claim readiness.
    let addr = dead_addr().await;
    let client = discovery::Client::new(discovery::ClientConfig::new(&addr.to_string()).unwrap());
    let lb = Balancer::start(config(&["web"]), Some(client), |_| {}).await;
    eventually(DEADLINE, "a failed Consul query", || async {
        let s = lb.service_status("web").await;
        (s["discovery"]["consecutive_errors"].as_u64().unwrap() > 0).then_some(())
    })
    .await;
    let a = get(lb.admin, "/health").await.unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    // No answer yet means no instance: 503 naming the service, at once.
    let a = get(lb.addr, "/").await.unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert!(a.text().contains("web"));

    // The agent comes up (with no instance of `web`): an answer, even an empty one, is ready.
    let mut agent = Agent::start_at(addr).await;
    eventually(DEADLINE, "/health 200", || async {
        let a = get(lb.admin, "/health").await.ok()?;
        (a.status == StatusCode::OK).then_some(())
    })
    .await;
    let st = lb.status().await;
    assert_eq!(st["ready"], true, "{st}");

    // And an instance registered now gets traffic.
    let b = Backend::start("b1").await;
    register_all(&agent, std::slice::from_ref(&b)).await;
    lb.wait_for_instances("web", &["b1"]).await;
    assert_eq!(get_n(&lb, 3).await, vec!["b1"; 3]);
    lb.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_over_registered_instances() {
    let mut agent = Agent::start().await;
    let backends = three_backends().await;
    register_all(&agent, &backends[..2]).await;
    let lb = consul_balancer(&agent).await;
    lb.wait_for_instances("web", &["b1", "b2"]).await;
    let names = get_n(&lb, 10).await;
    assert_eq!(
        tally(names.iter().map(String::as_str))
            .into_values()
            .collect::<Vec<_>>(),
        vec![5, 5]
    );

    // A new instance gets traffic as soon as Consul reports it.
    register_all(&agent, &backends[2..]).await;
    lb.wait_for_instances("web", &["b1", "b2", "b3"]).await;
    let before: Vec<u64> = backends.iter().map(Backend::hits).collect();
    get_n(&lb, 30).await;
    let per: Vec<u64> = backends
        .iter()
        .zip(&before)
        .map(|(b, n)| b.hits() - n)
        .collect();
    assert_eq!(per, vec![10, 10, 10]);

    let s = lb.service_status("web").await;
    assert_eq!(s["discovery"]["source"], "consul", "{s}");
    assert_eq!(s["discovery"]["stale"], false, "{s}");
    assert!(s["discovery"]["index"].as_u64().unwrap() > 0, "{s}");
    let m = get(lb.admin, "/metrics").await.unwrap().text();
    assert!(
        m.contains("balancer_discovery_consecutive_errors{service=\"web\"} 0\n"),
        "{m}"
    );
    assert!(
        m.contains("balancer_discovery_updates_total{service=\"web\"}"),
        "{m}"
    );
    lb.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistered_instance_gets_nothing_once_the_balancer_saw_it() {
    let mut agent = Agent::start().await;
    let backends = three_backends().await;
    register_all(&agent, &backends).await;
    let lb = consul_balancer(&agent).await;
    lb.wait_for_instances("web", &["b1", "b2", "b3"]).await;

    let load = Load::start(lb.addr, 2, 1);
    let stats = Arc::clone(&load.stats);
    stats.wait_more(100).await;
    assert!(backends[1].hits() > 0, "b2 had traffic before");

    agent.client().deregister("b2").await.unwrap();
    lb.wait_for_instances("web", &["b1", "b3"]).await;
    // Every request numbered from here on started after the balancer dropped b2.
    let seen_at = stats.next_seq.load(std::sync::atomic::Ordering::SeqCst);
    stats.wait_more(150).await;
    let stats = load.stop().await;

    assert_eq!(
        stats.errors(),
        Vec::<String>::new(),
        "client requests failed"
    );
    let late: Vec<u64> = backends[1]
        .seqs()
        .into_iter()
        .filter(|s| *s >= seen_at)
        .collect();
    assert!(
        late.is_empty(),
        "b2 got requests started after the balancer saw it leave: {late:?}"
    );
    for b in [&backends[0], &backends[2]] {
        assert!(
            b.seqs().iter().any(|s| *s >= seen_at),
            "{} kept getting traffic",
            b.name
        );
    }
    lb.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_check_and_maintenance_take_an_instance_out() {
    let mut agent = Agent::start().await;
    let backends = three_backends().await;
    let c = agent.client();
    for b in &backends {
        let mut reg = b.registration("web");
        reg.check = Some(CheckDefinition {
            check_id: Some(format!("{}-ttl", b.name)),
            name: Some("ttl".into()),
            ttl: Some("5m".into()),
            status: Some("passing".into()),
            ..Default::default()
        });
        c.register(&reg).await.unwrap();
    }
    let lb = consul_balancer(&agent).await;
    lb.wait_for_instances("web", &["b1", "b2", "b3"]).await;

    c.check_fail("b2-ttl", Some("test")).await.unwrap();
    lb.wait_for_instances("web", &["b1", "b3"]).await;
    let before = backends[1].hits();
    get_n(&lb, 12).await;
    assert_eq!(
        backends[1].hits(),
        before,
        "a failing instance gets no traffic"
    );

    c.maintenance("b3", true, Some("test")).await.unwrap();
    lb.wait_for_instances("web", &["b1"]).await;
    assert_eq!(get_n(&lb, 4).await, vec!["b1"; 4]);

    // Back in.
    c.check_pass("b2-ttl", None).await.unwrap();
    c.maintenance("b3", false, None).await.unwrap();
    lb.wait_for_instances("web", &["b1", "b2", "b3"]).await;
    let names = get_n(&lb, 9).await;
    assert_eq!(
        tally(names.iter().map(String::as_str))
            .into_values()
            .collect::<Vec<_>>(),
        vec![3, 3, 3]
    );

    // None passing: 503 at once, naming the service.
    for b in &backends {
        c.check_fail(&format!("{}-ttl", b.name), None)
            .await
            .unwrap();
    }
    lb.wait_for_instances("web", &[]).await;
    let a = get(lb.addr, "/").await.unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert!(a.text().contains("web"), "{}", a.text());
    lb.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_stopped_keeps_routing_on_the_last_known_instances() {
    let mut agent = Agent::start().await;
    let backends = three_backends().await;
    register_all(&agent, &backends).await;
    let lb = consul_balancer(&agent).await;
    lb.wait_for_instances("web", &["b1", "b2", "b3"]).await;

    let load = Load::start(lb.addr, 2, 0);
    let stats = Arc::clone(&load.stats);
    stats.wait_more(50).await;
    agent.stop().await;

    let s = eventually(DEADLINE, "the balancer to report Consul down", || async {
        let s = lb.service_status("web").await;
        let d = &s["discovery"];
        (d["stale"] == true && d["consecutive_errors"].as_u64().unwrap() > 0).then_some(s)
    })
    .await;
    assert!(s["discovery"]["last_error"].is_string(), "{s}");
    assert_eq!(s["healthy_instances"], 3, "the route was not emptied: {s}");
    // Requests keep flowing on the last known instances, for a while and evenly.
    stats.wait_more(100).await;
    let before: Vec<u64> = backends.iter().map(Backend::hits).collect();
    let stats = load.stop().await;
    assert_eq!(
        stats.errors(),
        Vec::<String>::new(),
        "client requests failed"
    );
    let settled: Vec<u64> = backends.iter().map(Backend::hits).collect();
    get_n(&lb, 30).await;
    let per: Vec<u64> = backends
        .iter()
        .zip(&settled)
        .map(|(b, n)| b.hits() - n)
        .collect();
    assert_eq!(per, vec![10, 10, 10], "(before: {before:?})");

    let m = get(lb.admin, "/metrics").await.unwrap().text();
    let errors: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("balancer_discovery_consecutive_errors{service=\"web\"} "))
        .unwrap_or_else(|| panic!("consecutive errors metric in\n{m}"))
        .parse()
        .unwrap();
    assert!(errors > 0.0, "{m}");
    let a = get(lb.admin, "/health").await.unwrap();
    assert_eq!(
        a.status,
        StatusCode::OK,
        "still ready on the last known instances"
    );

    // Consul comes back (empty, like a restarted dev agent) and is followed again.
    let mut agent = Agent::start_at(agent.addr).await;
    agent
        .client()
        .register(&backends[0].registration("web"))
        .await
        .unwrap();
    lb.wait_for_instances("web", &["b1"]).await;
    eventually(DEADLINE, "the balancer to report Consul back", || async {
        let s = lb.service_status("web").await;
        (s["discovery"]["stale"] == false).then_some(())
    })
    .await;
    assert_eq!(get_n(&lb, 3).await, vec!["b1"; 3]);
    lb.stop().await;
    agent.stop().await;
}
