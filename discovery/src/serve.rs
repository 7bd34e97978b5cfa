//! Pieces shared by the HTTP servers of the project (dev agent, worker, balancer).

use std::time::Duration;

/// Waits, without consuming anything, until the client's first bytes tell HTTP/1 from the
/// HTTP/2 preface (or the client closed); false if that takes longer than `within`.
///
/// hyper-util's auto builder reads those bytes with no deadline, and hyper's
/// `header_read_timeout` only starts once the protocol is known: without this bound a client
/// that connects and sends nothing (or part of a preface) would hold a connection slot, and
/// delay a graceful shutdown, forever.
pub async fn protocol_decided(stream: &tokio::net::TcpStream, within: Duration) -> bool {
    const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut buf = [0u8; 24];
    tokio::time::timeout(within, async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n == 0 || n == buf.len() || buf[..n] != H2_PREFACE[..n] => return,
                // Part of a preface: `peek` returns at once while bytes wait unread, so poll
                // (rare: real HTTP/2 clients send the preface in one write).
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                // hyper meets the same error and reports it.
                Err(_) => return,
            }
        }
    })
    .await
    .is_ok()
}
