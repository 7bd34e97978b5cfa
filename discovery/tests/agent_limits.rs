//! The dev agent's limits, over real sockets: Consul's per-client connection limit, the
//! bounds on registration fields, and what a blocking query may cost.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::{dev_config, Agent, DEADLINE};
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
