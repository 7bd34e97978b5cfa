//! The catalog watcher and single-connection clients against the real embedded dev agent.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{service, Agent};
use discovery::watch::catalog::{CatalogOptions, CatalogView, CatalogWatch};
use discovery::HealthQuery;

#[tokio::test]
async fn a_single_connection_client_makes_calls_one_after_another() {
    let agent = Agent::start_quick().await;
    let c = agent.client().single_connection();
    c.register(&service("web-1", "web", 9001)).await.unwrap();
    for _ in 0..5 {
        let q = HealthQuery {
            passing: true,
            ..HealthQuery::default()
        };
        let (e, _) = tokio::time::timeout(Duration::from_secs(5), c.health_service("web", &q))
            .await
            .expect("answered in time")
            .unwrap();
        assert_eq!(e.len(), 1);
    }
}

#[tokio::test]
async fn an_unchanged_blocking_answer_is_not_decoded() {
    let agent = Agent::start_quick().await;
    let c = agent.client();
    c.register(&service("web-1", "web", 9001)).await.unwrap();
    let (rows, meta) = c
        .health_state_changed::<serde_json::Value>("any", 0, None)
        .await
        .unwrap();
    assert!(rows.is_some(), "a first answer is decoded");
    let wait = Some(Duration::from_millis(100));
    let (rows, again) = c
        .health_state_changed::<serde_json::Value>("any", meta.index, wait)
        .await
        .unwrap();
    assert_eq!((rows, again.index), (None, meta.index));
    let (cat, m) = c.catalog_services_changed(0, None).await.unwrap();
    assert!(cat.unwrap().contains_key("web"));
    let (cat, _) = c.catalog_services_changed(m.index, wait).await.unwrap();
    assert!(cat.is_none());
}

#[tokio::test]
async fn a_streamed_health_answer_folds_to_the_prints_of_the_whole_answer() {
    use discovery::watch::catalog::{fingerprints, CheckRow, FingerprintFold};
    let agent = Agent::start_quick().await;
    let c = agent.client();
    for i in 0..50 {
        let mut r = tagged(&format!("s{i}"), &format!("svc{}", i % 7), "urlprefix-/x");
        r.check = Some(discovery::wire::CheckDefinition {
            ttl: Some("1h".into()),
            status: Some(if i % 3 == 0 { "critical" } else { "passing" }.into()),
            ..Default::default()
        });
        c.register(&r).await.unwrap();
    }
    let whole = agent.get("/v1/health/state/any").await;
    let rows: Vec<CheckRow> = serde_json::from_slice(whole.body.as_bytes()).unwrap();
    let mut fold = FingerprintFold::default();
    let mut chunks = 0;
    let (fed, meta) = c
        .health_state_stream("any", 0, None, |chunk| {
            chunks += 1;
            fold.feed(chunk)
        })
        .await
        .unwrap();
    assert!(fed && chunks > 0);
    assert_eq!(meta.index, whole.index());
    let prints = fold.finish().unwrap();
    assert_eq!(prints.len(), 7);
    assert_eq!(prints, fingerprints(&rows));
    // At the same index after the wait: nothing handed over.
    let (fed, _) = c
        .health_state_stream("any", meta.index, Some(Duration::from_millis(50)), |_| {
            panic!("an unchanged answer reached the sink")
        })
        .await
        .unwrap();
    assert!(!fed);
}

#[tokio::test]
async fn a_single_connection_survives_a_sink_that_gives_up_mid_answer() {
    let agent = Agent::start_quick().await;
    let c = agent.client().single_connection();
    for i in 0..300 {
        let mut r = service(&format!("s{i}"), "web", 9001);
        r.check = Some(discovery::wire::CheckDefinition {
            ttl: Some("1h".into()),
            status: Some("passing".into()),
            ..Default::default()
        });
        c.register(&r).await.unwrap();
    }
    let mut seen = 0;
    let r = c
        .health_state_stream("any", 0, None, |chunk| {
            seen += chunk.len();
            Err(discovery::Error::Transport("the sink gave up".into()))
        })
        .await;
    assert!(r.is_err() && seen > 0);
    // The half-read answer is not mistaken for the next one: the connection is replaced.
    let (entries, _) = tokio::time::timeout(
        Duration::from_secs(5),
        c.health_service("web", &common::passing()),
    )
    .await
    .expect("answered in time")
    .unwrap();
    assert_eq!(entries.len(), 300);
}

/// An agent (or something in its place) that answers every request with `answer`.
async fn canned_agent(answer: &'static [u8]) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
                // Shut without waiting for another request.
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_cut_or_malformed_health_answer_is_an_error_not_fewer_checks() {
    use discovery::watch::catalog::FingerprintFold;
    let row = r#"{"CheckID":"service:a","Status":"passing","ServiceID":"a","ServiceName":"a","ModifyIndex":3}"#;
    let answers: [&'static [u8]; 4] = [
        // The body ends before its length: the connection closes mid-answer.
        b"HTTP/1.1 200 OK\r\nX-Consul-Index: 9\r\nContent-Length: 500\r\n\r\n[{\"CheckID\":\"x\"}",
        // A whole body that is not an array of rows.
        b"HTTP/1.1 200 OK\r\nX-Consul-Index: 9\r\nContent-Length: 2\r\n\r\n{}",
        // An array left open.
        b"HTTP/1.1 200 OK\r\nX-Consul-Index: 9\r\nContent-Length: 1\r\n\r\n[",
        // A row that is not a check.
        b"HTTP/1.1 200 OK\r\nX-Consul-Index: 9\r\nContent-Length: 3\r\n\r\n[1]",
    ];
    for answer in answers {
        let addr = canned_agent(answer).await;
        let c = discovery::Client::new(discovery::ClientConfig::new(&addr.to_string()).unwrap());
        let mut fold = FingerprintFold::default();
        let got = c
            .health_state_stream("any", 0, None, |chunk| fold.feed(chunk))
            .await
            .and_then(|(fed, _)| {
                assert!(fed);
                fold.finish()
            });
        assert!(
            got.is_err(),
            "{:?} gave {got:?}",
            String::from_utf8_lossy(answer)
        );
    }
    // The well-formed answer of the same shape folds.
    let ok: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nX-Consul-Index: 9\r\nContent-Length: {}\r\n\r\n[{row}]",
            row.len() + 2
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let addr = canned_agent(ok).await;
    let c = discovery::Client::new(discovery::ClientConfig::new(&addr.to_string()).unwrap());
    let mut fold = FingerprintFold::default();
    let (fed, meta) = c
        .health_state_stream("any", 0, None, |chunk| fold.feed(chunk))
        .await
        .unwrap();
    assert!(fed && meta.index == 9);
    assert_eq!(fold.finish().unwrap()["a"].1, 3);
}

fn tagged(id: &str, name: &str, tag: &str) -> discovery::wire::ServiceRegistration {
    let mut r = service(id, name, 9001);
    r.tags = vec![tag.into()];
    r
}

/// Waits until the view satisfies `pred`.
async fn view_where(
    rx: &mut tokio::sync::watch::Receiver<std::sync::Arc<CatalogView>>,
    what: &str,
    pred: impl FnMut(&std::sync::Arc<CatalogView>) -> bool,
) {
    tokio::time::timeout(common::DEADLINE, rx.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

fn ids(v: &CatalogView, service: &str) -> Vec<String> {
    v.services
        .get(service)
        .map(|s| s.instances.iter().map(|i| i.id.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn follows_tagged_services_and_only_rereads_what_changed() {
    let agent = Agent::start_quick().await;
    let c = agent.client();
    c.register(&tagged("a-1", "a", "urlprefix-/a"))
        .await
        .unwrap();
    c.register(&tagged("b-1", "b", "urlprefix-/b"))
        .await
        .unwrap();
    c.register(&service("c-1", "c", 9001)).await.unwrap();
    let w = CatalogWatch::spawn(
        agent.client(),
        CatalogOptions {
            tag_prefix: Some("urlprefix-".into()),
            ..CatalogOptions::default()
        },
    );
    let mut rx = w.views();
    view_where(&mut rx, "a and b", |v| v.synced && v.services.len() == 2).await;
    let before = w.current();
    assert!(!before.services.contains_key("c"), "c has no route tag");

    // A second instance of b (with a check, as services register): only b changes.
    let mut b2 = tagged("b-2", "b", "urlprefix-/b");
    b2.check = Some(discovery::wire::CheckDefinition {
        ttl: Some("1h".into()),
        status: Some("passing".into()),
        ..Default::default()
    });
    c.register(&b2).await.unwrap();
    view_where(&mut rx, "b-2", |v| ids(v, "b") == ["b-1", "b-2"]).await;
    let after = w.current();
    assert!(std::sync::Arc::ptr_eq(
        &before.services["a"],
        &after.services["a"]
    ));
    assert_eq!(w.status("b").updates, 2);
    assert_eq!(w.status("a").updates, 1);

    // The tag goes: the service leaves the view.
    c.register(&service("a-1", "a", 9001)).await.unwrap();
    view_where(&mut rx, "a gone", |v| !v.services.contains_key("a")).await;
}

#[tokio::test]
async fn a_restarted_agent_keeps_services_for_the_grace() {
    let mut agent = Agent::start_quick().await;
    let addr = agent.addr;
    agent
        .client()
        .register(&tagged("a-1", "a", "urlprefix-/a"))
        .await
        .unwrap();
    let grace = Duration::from_secs(2);
    let w = CatalogWatch::spawn(
        agent.client(),
        CatalogOptions {
            tag_prefix: Some("urlprefix-".into()),
            timing: discovery::watch::WatchOptions {
                recovery_grace: grace,
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_millis(200),
                ..Default::default()
            },
            ..CatalogOptions::default()
        },
    );
    let mut rx = w.views();
    view_where(&mut rx, "a", |v| ids(v, "a") == ["a-1"]).await;

    // The agent restarts empty: a stays routed through the outage and the grace...
    agent.stop().await;
    common::eventually("the watcher notices", || async { w.stream_failures() > 0 }).await;
    let agent = Agent::start_quick_at(addr).await;
    let back = tokio::time::Instant::now();
    common::eventually("the agent answers again", || async {
        w.stream_failures() == 0
    })
    .await;
    tokio::time::sleep(grace / 2).await;
    assert_eq!(ids(&w.current(), "a"), ["a-1"], "kept during the grace");
    // ...and leaves after it, since it never came back.
    view_where(&mut rx, "a gone after the grace", |v| {
        !v.services.contains_key("a")
    })
    .await;
    assert!(back.elapsed() >= grace / 2);
    drop(agent);
}
