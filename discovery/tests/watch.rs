//! The blocking-query watcher against the real embedded dev agent, over HTTP.
//!
//! Every wait is a poll for a condition with a generous deadline; nothing asserts tight timing.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{client_for, dead_addr, eventually, passing, service, Agent, DEADLINE};
use discovery::watch::{Snapshot, Watch, WatchOptions};
use discovery::wire::CheckDefinition;
use tokio::sync::watch;
use tokio::time::timeout;

/// "Shows up quickly": far below the 60 s blocking `wait`, so only a wake-up can meet it.
const QUICKLY: Duration = Duration::from_secs(5);

fn ids(snapshot: &Option<Arc<Snapshot>>) -> Vec<String> {
    snapshot
        .as_ref()
        .map(|s| s.instances.iter().map(|i| i.id.clone()).collect())
        .unwrap_or_default()
}

/// Waits until the published snapshot satisfies `pred`.
async fn snapshot_where(
    rx: &mut watch::Receiver<Option<Arc<Snapshot>>>,
    within: Duration,
    what: &str,
    pred: impl FnMut(&Option<Arc<Snapshot>>) -> bool,
) -> Arc<Snapshot> {
    let got = timeout(within, rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the watcher is running");
    got.clone().expect("a snapshot")
}

/// Backoff short enough that failures pile up quickly in tests.
fn quick_opts() -> WatchOptions {
    WatchOptions {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        ..WatchOptions::default()
    }
}

#[tokio::test]
async fn first_snapshot_appears_and_registrations_show_up_quickly() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    client
        .register(&service("web-1", "web", 9001))
        .await
        .unwrap();

    let watch = Watch::spawn(client.clone(), "web", WatchOptions::default());
    let mut rx = watch.snapshots();
    let first = snapshot_where(&mut rx, DEADLINE, "the first snapshot", |s| s.is_some()).await;
    assert_eq!(first.service, "web");
    assert_eq!(ids(&Some(first.clone())), ["web-1"]);
    assert_eq!(first.instances[0].port, 9001);
    assert_eq!(first.instances[0].address, "127.0.0.1");
    assert!(first.index >= 1);
    let status = watch.status();
    assert!(status.is_healthy(), "{status:?}");
    assert_eq!(status.updates, 1);
    assert!(status.index >= 1, "never blocks on index 0");

    // The watcher is now parked in a 60 s blocking query; only a wake-up delivers this in time.
    client
        .register(&service("web-2", "web", 9002))
        .await
        .unwrap();
    let second = snapshot_where(&mut rx, QUICKLY, "web-2 to show up", |s| {
        ids(s) == ["web-1", "web-2"]
    })
    .await;
    assert!(second.index >= first.index);
    assert_eq!(watch.status().updates, 2);

    // And a deregistration, the way a worker leaves.
    client.deregister("web-1").await.unwrap();
    snapshot_where(&mut rx, QUICKLY, "web-1 to go", |s| ids(s) == ["web-2"]).await;

    // Stopping while a long poll is in flight returns promptly.
    timeout(DEADLINE, watch.stop())
        .await
        .expect("stop is prompt during a blocking query");
}

#[tokio::test]
async fn a_missing_service_is_an_empty_set_until_it_registers() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    let watch = Watch::spawn(client.clone(), "later", WatchOptions::default());
    let mut rx = watch.snapshots();
    let first = snapshot_where(&mut rx, DEADLINE, "the first snapshot", |s| s.is_some()).await;
    assert!(first.instances.is_empty());
    assert_eq!(watch.status().updates, 1);

    client
        .register(&service("later-1", "later", 9100))
        .await
        .unwrap();
    snapshot_where(&mut rx, QUICKLY, "later-1 to show up", |s| {
        ids(s) == ["later-1"]
    })
    .await;
    watch.stop().await;
}

#[tokio::test]
async fn keeps_last_known_good_while_the_agent_is_down_and_converges_after_restart() {
    let mut agent = Agent::start_quick().await;
    let addr = agent.addr;
    let client = agent.client();
    client
        .register(&service("web-1", "web", 9001))
        .await
        .unwrap();

    let watch = Watch::spawn(client.clone(), "web", quick_opts());
    let mut rx = watch.snapshots();
    let good = snapshot_where(&mut rx, DEADLINE, "web-1", |s| ids(s) == ["web-1"]).await;
    rx.borrow_and_update();

    agent.stop().await;
    eventually("failures to pile up", || {
        let failures = watch.status().consecutive_failures;
        async move { failures >= 3 }
    })
    .await;
    let status = watch.status();
    assert!(!status.is_healthy());
    assert!(status.last_error.is_some(), "{status:?}");
    assert!(status.last_success.is_some());
    // The last known good set is still published, untouched, and nobody was told of a change.
    let current = watch.current().expect("still a snapshot");
    assert!(Arc::ptr_eq(&current, &good), "the snapshot was replaced");
    assert!(!rx.has_changed().unwrap(), "a failure published something");
    let updates_while_down = status.updates;

    // The agent comes back empty; the worker registers again (on another port, to tell them apart).
    let _agent = Agent::start_quick_at(addr).await;
    client
        .register(&service("web-1", "web", 9011))
        .await
        .unwrap();
    let back = snapshot_where(&mut rx, DEADLINE, "web-1 on its new port", |s| {
        s.as_ref()
            .is_some_and(|s| s.instances.len() == 1 && s.instances[0].port == 9011)
    })
    .await;
    assert_eq!(back.instances[0].id, "web-1");
    eventually("the watcher to report health again", || {
        let status = watch.status();
        async move { status.is_healthy() && status.last_error.is_none() }
    })
    .await;
    assert!(watch.status().updates > updates_while_down);
    watch.stop().await;
}

/// An agent with `web-1` registered, and a watcher of `web` (with `opts`) that has seen it.
async fn watching_web_1(
    opts: WatchOptions,
) -> (Agent, Watch, watch::Receiver<Option<Arc<Snapshot>>>) {
    let agent = Agent::start_quick().await;
    agent
        .client()
        .register(&service("web-1", "web", 9001))
        .await
        .unwrap();
    let watch = Watch::spawn(agent.client(), "web", opts);
    let mut rx = watch.snapshots();
    snapshot_where(&mut rx, DEADLINE, "web-1", |s| ids(s) == ["web-1"]).await;
    (agent, watch, rx)
}

/// After a restarted (empty) agent answered at `recovered`: web-1 is still published, and
/// only after the 2 s grace does the agent's empty answer stand.
async fn held_for_the_grace(
    watch: Watch,
    mut rx: watch::Receiver<Option<Arc<Snapshot>>>,
    recovered: std::time::Instant,
) {
    assert_eq!(ids(&watch.current()), ["web-1"], "emptied at once");
    // After the grace the agent's answer stands: nobody came back, so the set empties.
    snapshot_where(&mut rx, DEADLINE, "the empty set after the grace", |s| {
        s.as_ref().is_some_and(|s| s.instances.is_empty())
    })
    .await;
    assert!(
        recovered.elapsed() >= Duration::from_millis(1500),
        "emptied before the grace ended: {:?}",
        recovered.elapsed()
    );
    watch.stop().await;
}

#[tokio::test]
async fn an_agent_restarted_empty_keeps_instances_for_the_recovery_grace_only() {
    let opts = WatchOptions {
        recovery_grace: Duration::from_secs(2),
        ..quick_opts()
    };
    let (mut agent, watch, rx) = watching_web_1(opts).await;
    let addr = agent.addr;
    agent.stop().await;
    eventually("failures to pile up", || {
        let failures = watch.status().consecutive_failures;
        async move { failures >= 2 }
    })
    .await;
    // Back, but empty: web-1 has not registered again (yet).
    let _agent = Agent::start_quick_at(addr).await;
    eventually("the watcher to hear from the agent again", || {
        let status = watch.status();
        async move { status.is_healthy() }
    })
    .await;
    held_for_the_grace(watch, rx, std::time::Instant::now()).await;
}

#[tokio::test]
async fn an_agent_restarted_between_two_queries_gets_the_recovery_grace_too() {
    // One query per 3 s at most: the restart below falls between two queries, so the watcher
    // never sees a failure.
    let opts = WatchOptions {
        recovery_grace: Duration::from_secs(2),
        rate_burst: 1,
        rate_interval: Duration::from_secs(3),
        ..quick_opts()
    };
    let (mut agent, watch, rx) = watching_web_1(opts).await;
    let addr = agent.addr;
    // Let the watcher learn who answers (its first answer, then agent/self).
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.stop().await;
    let _agent = Agent::start_quick_at(addr).await;
    let restarted = std::time::Instant::now();
    let back = Some(std::time::SystemTime::now());
    eventually("the watcher to ask the new agent", || {
        let answered = watch.status().last_success;
        async move { answered > back }
    })
    .await;
    assert_eq!(
        watch.status().consecutive_failures,
        0,
        "the watcher saw the restart as a failure; this test needs it not to"
    );
    held_for_the_grace(watch, rx, restarted).await;
}

#[tokio::test]
async fn publishes_only_real_changes() {
    let agent = Agent::start_quick().await;
    let client = agent.client();
    client
        .register(&service("web-1", "web", 9001))
        .await
        .unwrap();

    let watch = Watch::spawn(client.clone(), "web", WatchOptions::default());
    let mut rx = watch.snapshots();
    snapshot_where(&mut rx, DEADLINE, "web-1", |s| ids(s) == ["web-1"]).await;
    rx.borrow_and_update();
    let updates = watch.status().updates;

    // Writes that may wake the blocking query without changing the set of healthy instances:
    // an identical re-registration, an unrelated service, and a second `web` instance whose TTL
    // check starts critical (so `?passing` leaves it out).
    client
        .register(&service("web-1", "web", 9001))
        .await
        .unwrap();
    client
        .register(&service("other-1", "other", 9500))
        .await
        .unwrap();
    let mut web2 = service("web-2", "web", 9002);
    web2.check = Some(CheckDefinition {
        check_id: Some("web-2:ttl".into()),
        ttl: Some("30s".into()),
        ..Default::default()
    });
    client.register(&web2).await.unwrap();

    // Barrier: once the watcher has seen an answer at least this new, it has processed every
    // wake-up caused by the writes above.
    let (_, meta) = client.health_service("web", &passing()).await.unwrap();
    eventually("the watcher to catch up", || {
        let index = watch.status().index;
        async move { index >= meta.index }
    })
    .await;
    assert_eq!(
        watch.status().updates,
        updates,
        "published an unchanged set"
    );
    assert!(
        !rx.has_changed().unwrap(),
        "marked an unchanged set as changed"
    );
    assert_eq!(ids(&rx.borrow()), ["web-1"]);

    // Positive control: the watcher is live, and a real change is published once.
    client.check_pass("web-2:ttl", None).await.unwrap();
    snapshot_where(&mut rx, QUICKLY, "web-2 to pass", |s| {
        ids(s) == ["web-1", "web-2"]
    })
    .await;
    assert_eq!(watch.status().updates, updates + 1);
    watch.stop().await;
}

#[tokio::test]
async fn stops_promptly_while_backing_off_and_when_dropped() {
    let addr = dead_addr().await;
    let client = client_for(addr);
    let slow = WatchOptions {
        backoff_min: Duration::from_secs(60),
        backoff_max: Duration::from_secs(120),
        ..WatchOptions::default()
    };

    let watch = Watch::spawn(client.clone(), "web", slow.clone());
    eventually("the first failure", || {
        let failures = watch.status().consecutive_failures;
        async move { failures >= 1 }
    })
    .await;
    assert!(
        watch.current().is_none(),
        "nothing is published before an answer"
    );
    assert!(watch.status().last_success.is_none());
    timeout(DEADLINE, watch.stop())
        .await
        .expect("stop is prompt during a backoff");

    // Dropping the handle ends the task too: the snapshot channel closes.
    let watch = Watch::spawn(client, "web", slow);
    let mut rx = watch.snapshots();
    eventually("the first failure", || {
        let failures = watch.status().consecutive_failures;
        async move { failures >= 1 }
    })
    .await;
    drop(watch);
    timeout(DEADLINE, async { while rx.changed().await.is_ok() {} })
        .await
        .expect("the task ends when the handle is dropped");
}
