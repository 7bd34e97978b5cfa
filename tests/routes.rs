//! End to end, routes: small multi-service systems as users build them, every component a real
//! `cluster <component>` process on free loopback ports. Services announce their own routes in
//! Consul tags (Fabio's `urlprefix-` syntax) and the balancer, started with no `--service`,
//! routes them: a gateway for `/usuarios` and `/pagos`, a UI behind `strip=/ui` that serves
//! `/`, two hosts on one port, tags added and removed at run time; and the same routes given
//! as `--service` specs in a file.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::*;

/// A dev agent and the workers of a test, and the client to register through.
struct System {
    agent_addr: SocketAddr,
    consul: discovery::Client,
    procs: Vec<Proc>,
}

impl System {
    async fn start() -> System {
        let agent_addr = free_addr();
        let agent = Proc::spawn(
            "agent",
            &args(&[
                "agent",
                "--dev",
                "--http-addr",
                &agent_addr.to_string(),
                "--node",
                &format!("routes-{}", agent_addr.port()),
            ]),
        );
        let consul =
            discovery::Client::new(discovery::ClientConfig::new(&agent_addr.to_string()).unwrap());
        let c = consul.clone();
        wait_for("the dev agent answers", DEADLINE, || {
            let c = c.clone();
            async move { c.status_leader().await.is_ok() }
        })
        .await;
        System {
            agent_addr,
            consul,
            procs: vec![agent],
        }
    }

    /// A worker of `service` with ID `id` that registers itself with `tags`.
    fn worker(&mut self, service: &str, id: &str, tags: &[&str]) -> SocketAddr {
        let mut extra = args(&[
            "--consul-addr",
            &self.agent_addr.to_string(),
            "--check-interval",
            "1s",
        ]);
        for t in tags {
            extra.push("--tag".into());
            extra.push(t.to_string());
        }
        self.spawn_worker(service, id, extra)
    }

    /// A worker that does not register: the test registers it, as an operator would.
    fn unregistered_worker(&mut self, service: &str, id: &str) -> SocketAddr {
        self.spawn_worker(service, id, args(&["--no-register"]))
    }

    fn spawn_worker(&mut self, service: &str, id: &str, extra: Vec<String>) -> SocketAddr {
        let addr = free_addr();
        let mut a = args(&[
            "worker",
            "--service",
            service,
            "--listen",
            &addr.to_string(),
            "--id",
            id,
        ]);
        a.extend(extra);
        self.procs.push(Proc::spawn(id, &a));
        addr
    }

    /// Registers (or re-registers) instance `id` of `service` at `addr` with `tags`.
    async fn register(&self, service: &str, id: &str, addr: SocketAddr, tags: &[&str]) {
        let reg = discovery::wire::ServiceRegistration {
            id: Some(id.into()),
            name: service.into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            address: Some(addr.ip().to_string()),
            port: Some(addr.port()),
            ..Default::default()
        };
        self.consul.register(&reg).await.unwrap();
    }

    /// A balancer with `extra` arguments (none: routes from tags only).
    fn balancer(&mut self, extra: &[&str]) -> (SocketAddr, SocketAddr) {
        let (listen, admin) = (free_addr(), free_addr());
        let mut a = args(&[
            "balancer",
            "--listen",
            &listen.to_string(),
            "--admin",
            &admin.to_string(),
            "--consul-addr",
            &self.agent_addr.to_string(),
        ]);
        a.extend(extra.iter().map(|s| s.to_string()));
        self.procs.push(Proc::spawn("balancer", &a));
        (listen, admin)
    }
}

/// `GET path` with `Host: host` on a fresh connection.
async fn get_host(addr: SocketAddr, host: &str, path: &str) -> Result<Resp, String> {
    request_to(addr, host, http::Method::GET, path, "").await
}

/// Waits until `GET path` (with `host`) is answered by worker `want`.
async fn wait_worker(lb: SocketAddr, host: &str, path: &str, want: &str) {
    wait_for(
        &format!("{host}{path} answered by {want}"),
        DEADLINE,
        || async {
            get_host(lb, host, path)
                .await
                .is_ok_and(|r| r.status == 200 && r.worker.as_deref() == Some(want))
        },
    )
    .await;
}

/// Waits until `GET path` gets the balancer's own 404 (no route).
async fn wait_unrouted(lb: SocketAddr, path: &str) {
    wait_for(&format!("{path} unrouted"), DEADLINE, || async {
        get_host(lb, "any", path)
            .await
            .is_ok_and(|r| r.status == 404 && r.worker.is_none())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_routes_services_by_their_own_tags() {
    let mut s = System::start().await;
    s.worker(
        "usuarios",
        "usuarios-1",
        &["urlprefix-/usuarios strip=/usuarios"],
    );
    s.worker("pagos", "pagos-1", &["urlprefix-/pagos strip=/pagos"]);
    s.worker("pagos", "pagos-2", &["urlprefix-/pagos strip=/pagos"]);
    s.worker("ui", "ui-1", &["urlprefix-/ui strip=/ui"]);
    // Two hosts on one port, each the catch-all of its host.
    s.worker("tienda", "tienda-1", &["urlprefix-tienda.example/"]);
    s.worker("blog", "blog-1", &["urlprefix-Blog.example/"]);
    // No --service: routes come from the tags.
    let (lb, admin) = s.balancer(&[]);

    wait_worker(lb, "any", "/usuarios", "usuarios-1").await;
    wait_worker(lb, "any", "/ui/", "ui-1").await;
    wait_for("both pagos instances routed", DEADLINE, || async {
        let Ok(r) = get(admin, "/status?service=pagos").await else {
            return false;
        };
        let st: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
        st["services"][0]["healthy_instances"] == 2
    })
    .await;
    // Round robin over the two pagos instances, exactly.
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let r = get_host(lb, "any", "/pagos").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        *seen.entry(r.worker.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        vec![5, 5],
        "{seen:?}"
    );

    // The UI serves `/`: behind strip=/ui it gets `/headers` for `/ui/headers`, and learns
    // its prefix from X-Forwarded-Prefix.
    let r = get_host(lb, "any", "/ui/headers").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let h: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(h["uri"], "/headers", "{h}");
    assert_eq!(h["headers"]["x-forwarded-prefix"][0], "/ui", "{h}");

    // Two hosts on one port; case and port of Host do not matter.
    wait_worker(lb, "tienda.example", "/", "tienda-1").await;
    wait_worker(lb, &format!("BLOG.example:{}", lb.port()), "/", "blog-1").await;
    let r = get_host(lb, "other.example", "/").await.unwrap();
    assert_eq!((r.status, r.worker), (404, None));

    // /status lists the routes per service.
    let st: serde_json::Value =
        serde_json::from_str(&get(admin, "/status").await.unwrap().body).unwrap();
    assert_eq!(st["routes"], 5, "{st}");
    assert_eq!(st["ready"], true, "{st}");

    // Quiet at INFO: one summary line for the first read, then one line per route change
    // naming the route, the service and its instance count; never instance IDs.
    let pagos2 = s.procs.iter_mut().find(|p| p.name == "pagos-2").unwrap();
    pagos2.signal("TERM");
    let log = || {
        let b = s.procs.last().unwrap();
        format!("{}{}", b.stdout(), b.stderr())
    };
    wait_for("a route change logged", DEADLINE, || async {
        log().lines().any(|l| {
            l.contains("route updated") && l.contains("route=/pagos") && l.contains("instances=1")
        })
    })
    .await;
    let log = log();
    assert_eq!(log.matches("routes ready").count(), 1, "{log}");
    assert!(!log.contains("pagos-1"), "instance IDs at INFO: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_added_and_removed_at_run_time() {
    let mut s = System::start().await;
    let addr = s.unregistered_worker("facturas", "facturas-1");
    s.register(
        "facturas",
        "facturas-1",
        addr,
        &["urlprefix-/facturas strip=/facturas"],
    )
    .await;
    let (lb, _admin) = s.balancer(&[]);
    wait_worker(lb, "any", "/facturas", "facturas-1").await;
    wait_unrouted(lb, "/recibos").await;

    // A tag added: routed, without a restart.
    s.register(
        "facturas",
        "facturas-1",
        addr,
        &[
            "urlprefix-/facturas strip=/facturas",
            "urlprefix-/recibos strip=/recibos",
        ],
    )
    .await;
    wait_worker(lb, "any", "/recibos", "facturas-1").await;

    // A tag removed: no longer routed; the other route stays.
    s.register(
        "facturas",
        "facturas-1",
        addr,
        &["urlprefix-/recibos strip=/recibos"],
    )
    .await;
    wait_unrouted(lb, "/facturas").await;
    wait_worker(lb, "any", "/recibos", "facturas-1").await;

    // A tag the balancer cannot read is ignored; the rest keeps routing.
    s.register(
        "facturas",
        "facturas-1",
        addr,
        &["urlprefix-/recibos strip=/recibos", "urlprefix-sin-ruta"],
    )
    .await;
    wait_worker(lb, "any", "/recibos", "facturas-1").await;
    let balancer = s.procs.last().unwrap();
    wait_for("the bad tag logged", DEADLINE, || async {
        balancer.stdout().contains("route tag ignored")
            || balancer.stderr().contains("route tag ignored")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_from_a_file_with_hosts_and_strip() {
    let mut s = System::start().await;
    s.worker("usuarios", "usuarios-1", &[]);
    s.worker("tienda", "tienda-1", &[]);
    let file = std::env::temp_dir().join(format!("routes-{}.txt", std::process::id()));
    std::fs::write(
        &file,
        "# one --service spec per line\nusuarios=/usuarios,strip\n\ntienda=tienda.example/\n",
    )
    .unwrap();
    let (lb, _admin) = s.balancer(&["--services-file", file.to_str().unwrap()]);
    wait_worker(lb, "any", "/usuarios", "usuarios-1").await;
    wait_worker(lb, "tienda.example", "/", "tienda-1").await;
    wait_unrouted(lb, "/").await;
    let _ = std::fs::remove_file(&file);

    // A bad spec is a usage error.
    let (code, _, err) = run_to_end(
        "bad-balancer",
        &args(&["balancer", "--service", "api=x", "--admin", "off"]),
        DEADLINE,
    )
    .await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("api=x"), "{err}");
}
