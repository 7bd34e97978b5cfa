//! WebSocket through the balancer, with a real WebSocket client and server
//! (`tokio-tungstenite`): the handshake reaches the instance with its `Upgrade` and
//! `Connection` headers, and after `101 Switching Protocols` the two sockets are spliced both
//! ways: messages both ways, a 50 MB binary message intact, many tunnels at once, the idle
//! limit, shutdown within the grace, and an instance that declines the upgrade. Also the
//! other long-lived answer, a server-sent-events stream that pauses too long: cut, logged and
//! counted. Every wait is bounded by [`DEADLINE`].
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;

use common::raw::*;
use common::*;

/// A WebSocket server that echoes every message and counts handshakes.
async fn echo_server() -> Server {
    Server::start(
        || {},
        |stream| {
            tokio::spawn(async move {
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
                else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_close() {
                        break;
                    }
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            })
        },
    )
    .await
}

/// Room for the 50 MB message in one frame, both ends.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

async fn balancer_for(server: &Server, cfg: balancer::Config) -> Balancer {
    Balancer::with_static(cfg, vec![("web", vec![instance("ws", "web", server.addr)])]).await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(lb: &Balancer) -> Ws {
    let url = format!("ws://{}/chat", lb.addr);
    let (ws, resp) = timeout(
        DEADLINE,
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), false),
    )
    .await
    .expect("handshake within the deadline")
    .expect("handshake through the balancer");
    assert_eq!(resp.status(), 101);
    ws
}

/// Reads until the balancer ends the tunnel (a close frame, the end of the stream, or an
/// error).
async fn until_closed(ws: &mut Ws) {
    loop {
        match ws.next().await {
            None | Some(Err(_)) => return,
            Some(Ok(m)) if m.is_close() => return,
            Some(Ok(_)) => {}
        }
    }
}

async fn next_message(ws: &mut Ws) -> Message {
    timeout(DEADLINE, ws.next())
        .await
        .expect("an answer within the deadline")
        .expect("the tunnel is open")
        .expect("a message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_both_ways_and_a_50_mb_message_intact() {
    let server = echo_server().await;
    let lb = balancer_for(&server, config(&["web"])).await;
    let mut ws = connect(&lb).await;
    for i in 0..20 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(next_message(&mut ws).await, Message::text(text));
    }
    let big = random_bytes(50 * 1024 * 1024);
    let want = digest(&big);
    ws.send(Message::binary(big)).await.unwrap();
    match next_message(&mut ws).await {
        Message::Binary(b) => {
            assert_eq!(b.len(), 50 * 1024 * 1024);
            assert_eq!(digest(&b), want, "the 50 MB message came back intact");
        }
        other => panic!("expected the binary echo, got {other:?}"),
    }
    let status = lb.status().await;
    assert_eq!(status["tunnels"]["open"], 1, "{status}");
    ws.close(None).await.unwrap();
    eventually(DEADLINE, "the tunnel closes", || async {
        (lb.status().await["tunnels"]["open"] == 0).then_some(())
    })
    .await;
    let status = lb.status().await;
    assert_eq!(status["tunnels"]["total"], 1, "{status}");
    assert_eq!(status["connections"], 0, "{status}");
    let metrics = get(lb.admin, "/metrics").await.unwrap().text();
    assert!(metrics.contains("balancer_tunnels_total 1\n"), "{metrics}");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tunnels_at_once() {
    const N: usize = 64;
    let server = echo_server().await;
    let lb = balancer_for(&server, config(&["web"])).await;
    let mut tunnels = Vec::new();
    for _ in 0..N {
        tunnels.push(connect(&lb).await);
    }
    assert_eq!(lb.status().await["tunnels"]["open"], N);
    // Every tunnel carries its own messages, interleaved with the others'.
    for round in 0..3 {
        for (i, ws) in tunnels.iter_mut().enumerate() {
            ws.send(Message::text(format!("{i}/{round}")))
                .await
                .unwrap();
        }
        for (i, ws) in tunnels.iter_mut().enumerate() {
            assert_eq!(
                next_message(ws).await,
                Message::text(format!("{i}/{round}"))
            );
        }
    }
    for mut ws in tunnels {
        ws.close(None).await.unwrap();
    }
    eventually(DEADLINE, "every tunnel closes", || async {
        (lb.status().await["tunnels"]["open"] == 0).then_some(())
    })
    .await;
    assert_eq!(lb.status().await["tunnels"]["total"], N);
    lb.stop().await;
}

/// The handshake as the instance saw it: `Upgrade: websocket` and `Connection: upgrade`
/// arrive (they are hop-by-hop, and asked again of the instance), with the forwarding
/// headers; an instance that declines (here: 426) is answered as any request is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_headers_reach_the_instance_and_a_refusal_comes_back() {
    let up = RawUpstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 4\r\n\r\nnope".to_vec(),
        )]
    })
    .await;
    let lb = up.balancer().await;
    let mut c = RawClient::connect(lb.addr).await;
    c.send(b"GET /chat HTTP/1.1\r\nHost: lb.test\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await;
    let r = c.length_response().await;
    assert_eq!(r.status, 426, "{r:?}");
    assert_eq!(r.text(), "nope");
    let head = up.log()[0].head.to_ascii_lowercase();
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: upgrade\r\n"), "{head}");
    assert!(head.contains("\r\nsec-websocket-key: "), "{head}");
    assert!(
        head.contains("\r\nx-forwarded-for: 127.0.0.1\r\n"),
        "{head}"
    );
    lb.stop().await;
}

/// A tunnel that carries nothing for `--tunnel-idle-timeout` is closed and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tunnel_is_closed() {
    let server = echo_server().await;
    let mut cfg = config(&["web"]);
    cfg.tunnel_idle_timeout = Duration::from_millis(500);
    let lb = balancer_for(&server, cfg).await;
    let mut ws = connect(&lb).await;
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("before"));
    // Then silence: the balancer closes the tunnel (the stream ends or errors).
    let end = timeout(DEADLINE, until_closed(&mut ws)).await;
    assert!(end.is_ok(), "the idle tunnel was not closed");
    let status = lb.status().await;
    assert_eq!(status["tunnels"]["idle_closed"], 1, "{status}");
    assert_eq!(status["tunnels"]["open"], 0, "{status}");
    lb.stop().await;
}

/// Shutdown waits for an open tunnel only as long as the grace, then cuts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_tunnels_within_the_grace() {
    let server = echo_server().await;
    let mut cfg = config(&["web"]);
    cfg.shutdown_grace = Duration::from_secs(1);
    let lb = balancer_for(&server, cfg).await;
    let mut ws = connect(&lb).await;
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("x"));
    let started = std::time::Instant::now();
    // `stop` waits for the balancer to return (within DEADLINE).
    lb.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1) + DEADLINE / 2,
        "shutdown took {took:?}"
    );
    let end = timeout(DEADLINE, until_closed(&mut ws)).await;
    assert!(end.is_ok(), "the tunnel was not closed by shutdown");
}

/// A server-sent-events stream that pauses longer than `--upstream-timeout` is cut off, on
/// both paths; the cut is counted in `/metrics` and `/status` (it used to pass as a plain
/// 2xx).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_event_stream_is_cut_and_counted() {
    let up = RawUpstream::start(|_| {
        vec![
            Step::Write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n"
                    .to_vec(),
            ),
            Step::Sleep(DEADLINE * 4),
        ]
    })
    .await;
    let mut cfg = config(&["web"]);
    cfg.upstream_timeout = Duration::from_millis(400);
    let lb = up.balancer_with(cfg).await;
    for request in [
        get_req("/events"),
        b"GET /events HTTP/1.0\r\nHost: lb.test\r\n\r\n".to_vec(),
    ] {
        let mut c = RawClient::connect(lb.addr).await;
        c.send(&request).await;
        while c.fill().await {}
        assert!(
            String::from_utf8_lossy(&c.buf).contains("data: 1"),
            "{:?}",
            String::from_utf8_lossy(&c.buf)
        );
    }
    let status = lb.service_status("web").await;
    assert_eq!(status["responses_cut"], 2, "{status}");
    let metrics = get(lb.admin, "/metrics").await.unwrap().text();
    assert!(
        metrics.contains("balancer_responses_cut_total{service=\"web\"} 2\n"),
        "{metrics}"
    );
    lb.stop().await;
}
