//! Pieces shared by the HTTP servers of the project (dev agent, worker, balancer).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Pause after a failed `accept` (out of file descriptors and the like) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The next connection, with the connection-cap slot it holds; `None` once `shutdown`
/// completes. Waiting for a free slot *before* accepting leaves excess clients in the
/// kernel's listen backlog instead of costing memory here. A failed accept is logged and
/// retried after a short pause: the accept loop never dies of it.
pub async fn accept<F: Future<Output = ()>>(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    shutdown: &mut Pin<&mut F>,
) -> Option<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = tokio::select! {
        _ = shutdown.as_mut() => return None,
        p = Arc::clone(permits).acquire_owned() => p.ok()?,
    };
    loop {
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((permit, stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::select! {
                        _ = shutdown.as_mut() => return None,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
}

/// The first bytes of a prior-knowledge HTTP/2 connection (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client speaks, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// Prior-knowledge HTTP/2 (h2c): the connection starts with the HTTP/2 preface.
    Http2,
}

/// Waits, without consuming anything, until the client's first bytes tell HTTP/1 from the
/// HTTP/2 preface; `None` if that takes longer than `within`. A client that closed or failed
/// counts as HTTP/1: hyper then meets the same end and reports it.
///
/// hyper-util's auto builder reads those bytes with no deadline, and hyper's
/// `header_read_timeout` only starts once the protocol is known: without this bound a client
/// that connects and sends nothing (or part of a preface) would hold a connection slot, and
/// delay a graceful shutdown, forever.
pub async fn detect_protocol(stream: &tokio::net::TcpStream, within: Duration) -> Option<Protocol> {
    let mut buf = [0u8; 24];
    tokio::time::timeout(within, async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(n) if n == buf.len() && buf == *H2_PREFACE => return Protocol::Http2,
                Ok(n) if n == 0 || n == buf.len() || buf[..n] != H2_PREFACE[..n] => {
                    return Protocol::Http1
                }
                // Part of a preface: `peek` returns at once while bytes wait unread, so poll
                // (rare: real HTTP/2 clients send the preface in one write).
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => return Protocol::Http1,
            }
        }
    })
    .await
    .ok()
}

/// Whether the client's first bytes arrived within `within` (see [`detect_protocol`]).
pub async fn protocol_decided(stream: &tokio::net::TcpStream, within: Duration) -> bool {
    detect_protocol(stream, within).await.is_some()
}
