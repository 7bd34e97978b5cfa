//! The dev agent's limits, over real sockets: Consul's per-client connection limit, the
//! bounds on registration fields, and what a blocking query may cost.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{dev_config, Agent, DEADLINE};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep, timeout, Instant};

const TOO_MANY: &str = "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 81\r\nConnection: close\r\n\r\nYour IP is issuing too many concurrent connections, please rate limit your calls\n";

/// A connection to `agent` from client address `from`.
async fn connect_from(from: IpAddr, agent: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(agent).await.unwrap()
}

/// One keep-alive exchange on `s`; returns the answer's head and body.
async fn exchange(s: &mut TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    timeout(DEADLINE, async {
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the agent closed a connection within the limit");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    return text.into_owned();
                }
            }
        }
    })
    .await
    .expect("an answer")
}

/// Everything the agent sends on `s` until it closes the connection.
async fn read_to_close(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    timeout(DEADLINE, s.read_to_end(&mut got))
        .await
        .expect("the agent closes the connection")
        .unwrap();
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn connections_past_the_per_client_limit_get_consuls_429_and_are_closed() {
    let mut config = dev_config();
    config.max_conns_per_client = 3;
    let agent = Agent::start_with(config).await;
    let me: IpAddr = [127, 0, 0, 1].into();

    // Three connections, each proven accepted by an answer.
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from(me, agent.addr).await;
        assert!(exchange(&mut s, "/v1/status/leader")
            .await
            .starts_with("HTTP/1.1 200"));
        open.push(s);
    }
    // The fourth gets Consul's answer before it sends anything, then the connection ends.
    let mut fourth = connect_from(me, agent.addr).await;
    assert_eq!(read_to_close(&mut fourth).await, TOO_MANY);

    // Another client address has its own count.
    let mut other = connect_from([127, 0, 0, 2].into(), agent.addr).await;
    assert!(exchange(&mut other, "/v1/status/leader")
        .await
        .starts_with("HTTP/1.1 200"));

    // The three still work, and closing one frees its place.
    for s in &mut open {
        assert!(exchange(s, "/v1/agent/self")
            .await
            .starts_with("HTTP/1.1 200"));
    }
    drop(open.pop());
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut s = connect_from(me, agent.addr).await;
        s.write_all(b"GET /v1/status/leader HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut s).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert_eq!(answer, TOO_MANY);
        assert!(
            Instant::now() < deadline,
            "the closed connection's place never came back"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_default_limit_is_consuls_200_and_zero_lifts_it() {
    assert_eq!(dev_config().max_conns_per_client, 200);
    let mut config = dev_config();
    config.max_conns_per_client = 0;
    let agent = Agent::start_with(config).await;
    let mut open = Vec::new();
    for _ in 0..250 {
        open.push(connect_from([127, 0, 0, 1].into(), agent.addr).await);
    }
    for s in open.iter_mut().step_by(25) {
        assert!(exchange(s, "/v1/status/leader")
            .await
            .starts_with("HTTP/1.1 200"));
    }
    let last = open.last_mut().unwrap();
    assert!(exchange(last, "/v1/status/leader")
        .await
        .starts_with("HTTP/1.1 200"));
}

// ---------------------------------------------------------------------------------------------
// Bounds on registrations
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn over_limit_registrations_are_400_in_consuls_style() {
    let agent = Agent::start().await;
    let huge = "n".repeat(3_000_000);
    let cases = [
        (
            json!({"Name": huge}),
            "Invalid service: Name is too long (limit: 512 characters)",
        ),
        (
            json!({"Name": "web", "ID": "i".repeat(513)}),
            "Invalid service: ID is too long (limit: 512 characters)",
        ),
        (
            json!({"Name": "web", "Tags": vec!["t"; 257]}),
            "Invalid service: too many Tags (limit: 256)",
        ),
        (
            json!({"Name": "web", "Tags": ["t".repeat(513)]}),
            "Invalid service: Tag is too long (limit: 512 characters)",
        ),
        (
            json!({"Name": "web", "Address": "a".repeat(513)}),
            "Invalid service: Address is too long (limit: 512 characters)",
        ),
        (
            json!({"Name": "web", "Checks": vec![json!({"TTL": "10s"}); 33]}),
            "Invalid service: too many checks (limit: 32)",
        ),
        (
            json!({"Name": "web", "Check": {"CheckID": "c".repeat(513), "TTL": "10s"}}),
            "Invalid check: CheckID is too long (limit: 512 characters)",
        ),
        (
            json!({"Name": "web", "Check": {"TTL": "10s", "Notes": "x".repeat(4097)}}),
            "Invalid check: Notes is too long (limit: 4096 characters)",
        ),
        // Consul's own bound on meta comes first, with Consul's text.
        (
            json!({"Name": huge, "Meta": {"k": "v".repeat(513)}}),
            &format!(
                "Invalid Service Meta: Couldn't load metadata pair ('k', '{}'): Value is too long (limit: 512 characters)",
                "v".repeat(513)
            ),
        ),
    ];
    for (body, text) in cases {
        agent.expect_register_error(&body, text).await;
    }
    agent
        .expect_error(
            "PUT",
            "/v1/agent/check/register",
            &json!({"Name": "n".repeat(513), "TTL": "10s"}).to_string(),
            400,
            "Invalid check: Name is too long (limit: 512 characters)",
        )
        .await;
    // Nothing of it was stored.
    let services = agent.get("/v1/agent/services").await.json();
    assert_eq!(services, json!({}));
}

#[tokio::test]
async fn an_id_at_the_limit_stays_addressable_even_percent_encoded() {
    let agent = Agent::start().await;
    // 512 bytes that all need percent-encoding: the deregistration URL is three times longer.
    let id = "#".repeat(512);
    agent
        .register(json!({"Name": "web", "ID": id, "Check": {"CheckID": id, "TTL": "10s"}}))
        .await;
    let encoded = "%23".repeat(512);
    agent
        .put_ok(&format!("/v1/agent/check/pass/{encoded}"), "")
        .await;
    let r = agent.get(&format!("/v1/agent/service/{encoded}")).await;
    assert_eq!(r.json()["ID"], json!(id));
    agent
        .put_ok(&format!("/v1/agent/service/deregister/{encoded}"), "")
        .await;
    assert_eq!(agent.get("/v1/agent/services").await.json(), json!({}));
}

#[tokio::test]
async fn output_max_size_only_lowers_consuls_4096() {
    let agent = Agent::start().await;
    agent
        .register(json!({"Name": "web", "Checks": [
            {"CheckID": "big", "TTL": "60s", "OutputMaxSize": 100000},
            {"CheckID": "small", "TTL": "60s", "OutputMaxSize": 10}]}))
        .await;
    let note = "x".repeat(5000);
    for id in ["big", "small"] {
        agent
            .put_ok(&format!("/v1/agent/check/pass/{id}?note={note}"), "")
            .await;
    }
    let checks = agent.get("/v1/agent/checks").await.json();
    assert_eq!(
        checks["big"]["Output"],
        json!(format!(
            "{} ... (captured 4096 of 5000 bytes)",
            "x".repeat(4096)
        ))
    );
    assert_eq!(
        checks["small"]["Output"],
        json!(format!(
            "{} ... (captured 10 of 5000 bytes)",
            "x".repeat(10)
        ))
    );
}

// ---------------------------------------------------------------------------------------------
// The view cache
// ---------------------------------------------------------------------------------------------

async fn cache_stat(agent: &Agent, name: &str) -> usize {
    let me = agent.get("/v1/agent/self").await.json();
    me["Stats"]["dev_agent"][name]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn unknown_parameters_share_one_cached_answer_and_the_cache_stays_within_its_bytes() {
    let mut config = dev_config();
    config.view_cache_bytes = 64 * 1024;
    let agent = Agent::start_with(config).await;
    for i in 0..200 {
        agent
            .register(json!({"Name": format!("svc-{i}"), "Tags": [format!("tag-{i}")]}))
            .await;
    }
    // Two watchers of the catalog: answers of cross-service reads are now shared, so cached.
    let index = agent.get("/v1/catalog/services").await.index();
    let _waiting: Vec<_> = (0..2)
        .map(|_| {
            common::spawn_get(
                &agent,
                format!("/v1/catalog/services?index={index}&wait=30s"),
            )
        })
        .collect();
    common::eventually("two queries wait", || async {
        cache_stat(&agent, "blocking_queries").await >= 2
    })
    .await;
    let before = cache_stat(&agent, "view_cache_entries").await;
    for n in 0..30 {
        let r = agent
            .get(&format!("/v1/catalog/services?x={n}&stale"))
            .await;
        assert_eq!(r.status, 200);
    }
    assert!(
        cache_stat(&agent, "view_cache_entries").await <= before.max(1),
        "?x=N and ?stale made entries of their own"
    );
    // Reads that do differ (a filter each) fill the cache only up to its bound.
    for n in 0..100 {
        let path = format!("/v1/catalog/services?filter=ServiceName%20!%3D%20%22svc-{n}%22");
        assert_eq!(agent.get(&path).await.status, 200);
        let bytes = cache_stat(&agent, "view_cache_bytes").await;
        assert!(bytes <= 64 * 1024, "{bytes} bytes cached after {n} reads");
    }
    assert!(cache_stat(&agent, "view_cache_entries").await > 1);
}
