//! Upgraded connections (WebSocket and other `Upgrade` protocols): once an instance answers
//! `101 Switching Protocols`, the client's socket and the instance's are spliced both ways
//! until either side is done, the tunnel is idle for `--tunnel-idle-timeout`, or shutdown's
//! grace runs out.
//!
//! A tunnel keeps its client connection's slot (see [`crate::ClientConn`]), so
//! `--max-connections` counts it, and the balancer's shutdown waits for it within the grace.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::{App, ClientConn};

/// Bytes copied per read, each way.
const BUFFER: usize = 16 * 1024;

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// One side closed (passed on to the other).
    Closed,
    /// Nothing went either way for the idle limit.
    Idle,
    /// The balancer shut down and the grace ran out.
    Shutdown,
    /// A read or write failed.
    Broken,
}

/// Counters of upgraded connections, for `/status` and `/metrics`.
#[derive(Debug, Default)]
pub struct TunnelStats {
    pub open: std::sync::atomic::AtomicU64,
    pub total: std::sync::atomic::AtomicU64,
    /// Closed by the idle limit.
    pub idle_closed: std::sync::atomic::AtomicU64,
    /// Cut by shutdown.
    pub shutdown_closed: std::sync::atomic::AtomicU64,
    /// Bytes from clients to instances, and back.
    pub bytes_up: std::sync::atomic::AtomicU64,
    pub bytes_down: std::sync::atomic::AtomicU64,
}

/// Waits for both sides of an accepted upgrade, then splices them; runs as its own task.
/// `conn` is held until the tunnel ends: its connection slot stays taken.
pub(crate) async fn run(
    app: Arc<App>,
    conn: Arc<ClientConn>,
    client: OnUpgrade,
    upstream: OnUpgrade,
    instance: String,
) {
    let (client, upstream) = match tokio::join!(client, upstream) {
        (Ok(c), Ok(u)) => (TokioIo::new(c), TokioIo::new(u)),
        (c, u) => {
            tracing::debug!(peer = %conn.peer.addr, %instance, client_ok = c.is_ok(), upstream_ok = u.is_ok(), "upgrade did not complete");
            return;
        }
    };
    let stats = &app.tunnels;
    stats.open.fetch_add(1, Ordering::Relaxed);
    stats.total.fetch_add(1, Ordering::Relaxed);
    let stop = app.stop.clone();
    let (end, up, down) = splice(
        client,
        upstream,
        app.config.tunnel_idle_timeout,
        stop,
        app.config.shutdown_grace,
    )
    .await;
    stats.open.fetch_sub(1, Ordering::Relaxed);
    stats.bytes_up.fetch_add(up, Ordering::Relaxed);
    stats.bytes_down.fetch_add(down, Ordering::Relaxed);
    match end {
        TunnelEnd::Idle => {
            stats.idle_closed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %conn.peer.addr, %instance, idle = ?app.config.tunnel_idle_timeout, "upgraded connection closed: idle");
        }
        TunnelEnd::Shutdown => {
            stats.shutdown_closed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %conn.peer.addr, %instance, "upgraded connection closed: shutdown grace expired");
        }
        TunnelEnd::Closed | TunnelEnd::Broken => {
            tracing::debug!(peer = %conn.peer.addr, %instance, ?end, bytes_up = up, bytes_down = down, "upgraded connection ended");
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until either side closes (the other then gets a FIN
/// after everything sent before it), neither sends anything for `idle`, a write stalls for
/// `idle`, or `grace` after `stop` flips. Returns how it ended and the bytes copied from `a`
/// and from `b`.
pub async fn splice<A, B>(
    a: A,
    b: B,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) -> (TunnelEnd, u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (mut abuf, mut bbuf) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
    let (mut from_a, mut from_b) = (0u64, 0u64);
    let mut idle_at = Instant::now() + idle;
    // Set once shutdown begins: the tunnel may finish until then.
    let mut cut_at: Option<Instant> = if *stop.borrow() {
        Some(Instant::now() + grace)
    } else {
        None
    };
    loop {
        let wake = cut_at.map_or(idle_at, |c| c.min(idle_at));
        tokio::select! {
            r = ar.read(&mut abuf) => match r {
                Ok(0) | Err(_) => {
                    // As nginx does: one side's end is the tunnel's end; the other side is
                    // told with a FIN after everything before it.
                    let _ = bw.shutdown().await;
                    return (TunnelEnd::Closed, from_a, from_b);
                }
                Ok(n) => {
                    match tokio::time::timeout(idle, bw.write_all(&abuf[..n])).await {
                        Ok(Ok(())) => {}
                        _ => return (TunnelEnd::Broken, from_a, from_b),
                    }
                    from_a += n as u64;
                    idle_at = Instant::now() + idle;
                }
            },
            r = br.read(&mut bbuf) => match r {
                Ok(0) | Err(_) => {
                    let _ = aw.shutdown().await;
                    return (TunnelEnd::Closed, from_a, from_b);
                }
                Ok(n) => {
                    match tokio::time::timeout(idle, aw.write_all(&bbuf[..n])).await {
                        Ok(Ok(())) => {}
                        _ => return (TunnelEnd::Broken, from_a, from_b),
                    }
                    from_b += n as u64;
                    idle_at = Instant::now() + idle;
                }
            },
            _ = stop.changed(), if cut_at.is_none() => {
                cut_at = Some(Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(wake) => {
                let end = if cut_at.is_some_and(|c| c <= Instant::now()) {
                    TunnelEnd::Shutdown
                } else {
                    TunnelEnd::Idle
                };
                return (end, from_a, from_b);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn copies_both_ways_until_one_side_closes() {
        let (a, mut a_far) = tokio::io::duplex(64);
        let (b, mut b_far) = tokio::io::duplex(64);
        let (_tx, rx) = watch::channel(false);
        let t = tokio::spawn(splice(a, b, Duration::from_secs(60), rx, Duration::ZERO));
        a_far.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        b_far.write_all(b"pong!").await.unwrap();
        let mut got = [0u8; 5];
        a_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong!");
        // The last bytes before a close still arrive, then the close itself.
        a_far.write_all(b"bye").await.unwrap();
        a_far.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b_far.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"bye");
        assert_eq!(t.await.unwrap(), (TunnelEnd::Closed, 7, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_is_closed() {
        let (a, _a_far) = tokio::io::duplex(64);
        let (b, _b_far) = tokio::io::duplex(64);
        let (_tx, rx) = watch::channel(false);
        let (end, _, _) = splice(a, b, Duration::from_secs(5), rx, Duration::ZERO).await;
        assert_eq!(end, TunnelEnd::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_cuts_after_the_grace() {
        let (a, mut a_far) = tokio::io::duplex(64);
        let (b, _b_far) = tokio::io::duplex(64);
        let (tx, rx) = watch::channel(false);
        let t = tokio::spawn(splice(
            a,
            b,
            Duration::from_secs(3600),
            rx,
            Duration::from_secs(2),
        ));
        tokio::time::sleep(Duration::from_secs(1)).await;
        tx.send(true).unwrap();
        // Still carried during the grace.
        a_far.write_all(b"late").await.unwrap();
        let started = Instant::now();
        let (end, up, _) = t.await.unwrap();
        assert_eq!(end, TunnelEnd::Shutdown);
        assert_eq!(up, 4);
        assert!(started.elapsed() <= Duration::from_secs(2));
    }
}
