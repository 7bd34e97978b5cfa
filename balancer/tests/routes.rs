//! Routes: hosts and prefix stripping from `--service` flags (static instances, byte-recording
//! upstreams, both request paths), and routes services announce in their tags (the dev agent
//! in-process): added and removed at run time, conflicts, bad tags, and the fixed number of
//! connections the balancer holds to the agent whatever the number of services.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::raw::{ok_with, RawUpstream, Step};
use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream answering every request with `name`.
async fn named(name: &'static str) -> RawUpstream {
    RawUpstream::start(move |_| vec![Step::Write(ok_with(name))]).await
}

/// `GET path` with `Host: host` on a new HTTP/1.1 connection (the fast path).
async fn get_host(lb: SocketAddr, host: &str, path: &str) -> Answer {
    let mut c = H1Conn::connect(lb).await.unwrap();
    let req = http::Request::get(path)
        .header("host", host)
        .header("x-forwarded-prefix", "/forged")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    c.send(req).await.unwrap()
}

/// `GET path` as HTTP/1.0, which the fast path hands to hyper; the raw answer.
async fn get_http10(lb: SocketAddr, host: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(lb).await.unwrap();
    let head =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nX-Forwarded-Prefix: /forged\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_routes_by_host_and_strip_on_both_paths() {
    let (web, ui, api, shop) = (
        named("web").await,
        named("ui").await,
        named("api").await,
        named("shop").await,
    );
    let cfg = config(&[
        "web",
        "ui=/ui,strip",
        "api=API.example.com/v1",
        "shop=shop.example.com/",
    ]);
    let lb = Balancer::with_static(
        cfg,
        vec![
            ("web", vec![instance("w", "web", web.addr)]),
            ("ui", vec![instance("u", "ui", ui.addr)]),
            ("api", vec![instance("a", "api", api.addr)]),
            ("shop", vec![instance("s", "shop", shop.addr)]),
        ],
    )
    .await;

    // Stripped, on the fast path: the instance sees `/app.js?x=/ui`, and the prefix in
    // X-Forwarded-Prefix (the client's own one replaced).
    let a = get_host(lb.addr, "any", "/ui/app.js?x=/ui").await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "ui"));
    let r = ui.log().pop().unwrap();
    assert_eq!(r.path, "/app.js?x=/ui", "{}", r.head);
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains("x-forwarded-prefix: /ui\r\n"), "{}", r.head);
    assert!(!head.contains("/forged"), "{}", r.head);
    // The bare prefix becomes `/`; a longer segment is not the prefix.
    get_host(lb.addr, "any", "/ui").await;
    assert_eq!(ui.log().pop().unwrap().path, "/");
    let a = get_host(lb.addr, "any", "/uix").await;
    assert_eq!(a.text(), "web");

    // And on the hyper path.
    let raw = get_http10(lb.addr, "any", "/ui/a/b").await;
    assert!(raw.ends_with("ui"), "{raw}");
    let r = ui.log().pop().unwrap();
    assert_eq!(r.path, "/a/b", "{}", r.head);
    let head = r.head.to_ascii_lowercase();
    assert!(head.contains("x-forwarded-prefix: /ui\r\n"), "{}", r.head);
    assert!(!head.contains("/forged"), "{}", r.head);

    // Hosts: case and port ignored; the path goes on whole; a route without strip leaves a
    // client's X-Forwarded-Prefix alone, as before.
    for path in ["/v1", "/v1/users"] {
        let a = get_host(lb.addr, "api.EXAMPLE.com:8080", path).await;
        assert_eq!(a.text(), "api");
        let r = api.log().pop().unwrap();
        assert_eq!(r.path, path);
        assert!(r
            .head
            .to_ascii_lowercase()
            .contains("x-forwarded-prefix: /forged"));
    }
    assert!(get_http10(lb.addr, "api.example.com", "/v1/x")
        .await
        .ends_with("api"));
    // Off the host's prefix: the hostless routes.
    assert_eq!(
        get_host(lb.addr, "api.example.com", "/v2").await.text(),
        "web"
    );
    assert_eq!(
        get_host(lb.addr, "other.example.com", "/v1").await.text(),
        "web"
    );
    // A host's catch-all beats every hostless route, also a longer one.
    assert_eq!(
        get_host(lb.addr, "shop.example.com", "/ui/x").await.text(),
        "shop"
    );
    assert_eq!(shop.log().pop().unwrap().path, "/ui/x");

    let s = lb.service_status("api").await;
    assert_eq!(
        s["routes"],
        serde_json::json!(["api.example.com/v1"]),
        "{s}"
    );
    let s = lb.service_status("ui").await;
    assert_eq!(s["routes"], serde_json::json!(["/ui strip=/ui"]), "{s}");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_for_an_unknown_host_is_404() {
    let api = named("api").await;
    let lb = Balancer::with_static(
        config(&["api=api.example.com/"]),
        vec![("api", vec![instance("a", "api", api.addr)])],
    )
    .await;
    assert_eq!(
        get_host(lb.addr, "api.example.com", "/x").await.status,
        StatusCode::OK
    );
    let a = get_host(lb.addr, "example.com", "/x").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.text());
    lb.stop().await;
}

/// A registration of `backend` as an instance of `service` with `tags`.
fn tagged(b: &Backend, service: &str, tags: &[&str]) -> discovery::wire::ServiceRegistration {
    let mut r = b.registration(service);
    r.tags = tags.iter().map(|t| t.to_string()).collect();
    r
}

async fn tag_balancer(agent: &Agent) -> Balancer {
    let mut cfg = balancer::Config::with_tags(vec![], Some("urlprefix-".into())).unwrap();
    cfg.shutdown_grace = Duration::from_secs(2);
    Balancer::start(cfg, Some(agent.client()), |_| {}).await
}

/// Waits until `GET path` is answered by `want` (a backend name), or with `status` when
/// `want` is empty.
async fn wait_routed(lb: &Balancer, path: &str, want: &str, status: StatusCode) {
    eventually(DEADLINE, &format!("{path} -> {want} {status}"), || async {
        let a = get(lb.addr, path).await.ok()?;
        (a.status == status && (want.is_empty() || a.text() == want)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_from_tags_follow_the_catalog() {
    let mut agent = Agent::start().await;
    let c = agent.client();
    let (u1, p1, p2, other) = (
        Backend::start("u1").await,
        Backend::start("p1").await,
        Backend::start("p2").await,
        Backend::start("o1").await,
    );
    c.register(&tagged(&u1, "usuarios", &["urlprefix-/usuarios", "v1"]))
        .await
        .unwrap();
    c.register(&tagged(&p1, "pagos", &["urlprefix-/pagos"]))
        .await
        .unwrap();
    // Not a route tag, and one that cannot be read: neither takes anything down.
    c.register(&tagged(&other, "otro", &["urlprefix-nopath", "http"]))
        .await
        .unwrap();
    let lb = tag_balancer(&agent).await;
    eventually(DEADLINE, "/health 200", || async {
        (get(lb.admin, "/health").await.ok()?.status == StatusCode::OK).then_some(())
    })
    .await;
    wait_routed(&lb, "/usuarios/7", "u1", StatusCode::OK).await;
    wait_routed(&lb, "/pagos", "p1", StatusCode::OK).await;
    wait_routed(&lb, "/otro", "", StatusCode::NOT_FOUND).await;

    // A second instance: exact round robin over both.
    c.register(&tagged(&p2, "pagos", &["urlprefix-/pagos"]))
        .await
        .unwrap();
    lb.wait_for_instances("pagos", &["p1", "p2"]).await;
    let names: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..10 {
            v.push(get(lb.addr, "/pagos/x").await.unwrap().text());
        }
        v
    };
    assert_eq!(
        tally(names.iter().map(String::as_str))
            .into_values()
            .collect::<Vec<_>>(),
        vec![5, 5]
    );

    // A tag added at run time routes, without a restart.
    c.register(&tagged(
        &u1,
        "usuarios",
        &["urlprefix-/usuarios", "urlprefix-/facturas"],
    ))
    .await
    .unwrap();
    wait_routed(&lb, "/facturas/1", "u1", StatusCode::OK).await;

    // A newer service claiming /pagos does not take it: the older route wins.
    c.register(&tagged(
        &other,
        "otro",
        &["urlprefix-/pagos", "urlprefix-/otro"],
    ))
    .await
    .unwrap();
    wait_routed(&lb, "/otro", "o1", StatusCode::OK).await;
    for _ in 0..4 {
        let a = get(lb.addr, "/pagos").await.unwrap();
        assert!(["p1", "p2"].contains(&a.text().as_str()), "{}", a.text());
    }

    // A tag removed stops routing; the service's other route stays.
    c.register(&tagged(&u1, "usuarios", &["urlprefix-/facturas"]))
        .await
        .unwrap();
    wait_routed(&lb, "/usuarios", "", StatusCode::NOT_FOUND).await;
    wait_routed(&lb, "/facturas", "u1", StatusCode::OK).await;
    // Every tag gone: the service leaves the table.
    c.register(&tagged(&u1, "usuarios", &[])).await.unwrap();
    wait_routed(&lb, "/facturas", "", StatusCode::NOT_FOUND).await;

    // /status?service= lists one service with its instances.
    let a = get(lb.admin, "/status?service=pagos").await.unwrap();
    let st = a.json();
    assert_eq!(st["services"].as_array().unwrap().len(), 1, "{st}");
    assert_eq!(
        st["services"][0]["instances"].as_array().unwrap().len(),
        2,
        "{st}"
    );
    assert_eq!(
        st["services"][0]["routes"],
        serde_json::json!(["/pagos"]),
        "{st}"
    );
    assert_eq!(st["services"][0]["discovery"]["stale"], false, "{st}");
    lb.stop().await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_routes_share_the_table_with_flags_and_flags_win() {
    let mut agent = Agent::start().await;
    let c = agent.client();
    let (w1, t1) = (Backend::start("w1").await, Backend::start("t1").await);
    c.register(&w1.registration("web")).await.unwrap();
    c.register(&tagged(&t1, "tagged", &["urlprefix-/", "urlprefix-/t"]))
        .await
        .unwrap();
    let mut cfg = balancer::Config::with_tags(
        vec![balancer::Route::parse("web=/").unwrap()],
        Some("urlprefix-".into()),
    )
    .unwrap();
    cfg.shutdown_grace = Duration::from_secs(2);
    let lb = Balancer::start(cfg, Some(agent.client()), |_| {}).await;
    wait_routed(&lb, "/t/x", "t1", StatusCode::OK).await;
    // `/` is claimed by the flag and by a tag: the flag is older.
    for _ in 0..4 {
        assert_eq!(get(lb.addr, "/x").await.unwrap().text(), "w1");
    }
    lb.stop().await;
    agent.stop().await;
}

/// Established connections whose local port is `port`, from /proc/net/tcp: the agent's ends
/// of its client connections.
fn connections_to(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).ok() == Some(port) && f[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_agent_stay_fixed_whatever_the_number_of_services() {
    let mut agent = Agent::start().await;
    let b = Backend::start("b").await;
    let services = 120;
    {
        let c = agent.client();
        for i in 0..services {
            let mut r = tagged(&b, &format!("svc{i}"), &[&format!("urlprefix-/svc{i}")]);
            r.id = Some(format!("svc{i}-1"));
            c.register(&r).await.unwrap();
        }
    }
    // The registering client is gone; its connections close.
    eventually(DEADLINE, "no connection to the agent", || async {
        (connections_to(agent.addr.port()) == 0).then_some(())
    })
    .await;
    let lb = tag_balancer(&agent).await;
    eventually(DEADLINE, "every route", || async {
        let st = get(lb.admin, "/status").await.ok()?.json();
        (st["routes"] == services && st["ready"] == true).then_some(())
    })
    .await;
    for i in [0, 57, services - 1] {
        wait_routed(&lb, &format!("/svc{i}/x"), "b", StatusCode::OK).await;
    }
    // Two blocking queries, and at most four reads at a time, each on a connection of its
    // own: never more than six, however the calls interleave.
    let held = connections_to(agent.addr.port());
    assert!(
        (2..=6).contains(&held),
        "{held} connections to the agent for {services} services"
    );
    // /metrics: one healthy-instances line per service.
    let m = get(lb.admin, "/metrics").await.unwrap().text();
    assert_eq!(m.matches("balancer_healthy_instances{").count(), services);
    lb.stop().await;
    agent.stop().await;
}
