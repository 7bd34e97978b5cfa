//! Consul's per-client connection limit (`limits.http_max_conns_per_client`, default 200):
//! past it a new connection from the same client address gets Consul's 429 and is closed.
//! Anything of ours that works against the dev agent must also work against real Consul, so
//! the dev agent refuses the same connections.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// What Consul writes (hashicorp/go-connlimit's answer), byte for byte.
pub(crate) const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\n\
Content-Type: text/plain\r\n\
Content-Length: 81\r\n\
Connection: close\r\n\
\r\n\
Your IP is issuing too many concurrent connections, please rate limit your calls\n";

/// How long the refusal may take to write; Consul gives a slow client 10 ms too.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(10);

/// Open connections by client address.
#[derive(Clone)]
pub(crate) struct ConnLimit {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One admitted connection; dropping it frees its place.
pub(crate) struct ConnSlot {
    limit: ConnLimit,
    ip: IpAddr,
}

impl ConnLimit {
    /// At most `max` concurrent connections per client address; 0 means no limit (Consul).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// Holds only counters, so a poisoned lock is safe to reuse.
    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `ip`, or `None` when it already has `max` open.
    pub(crate) fn admit(&self, ip: IpAddr) -> Option<ConnSlot> {
        let mut open = self.open();
        let n = open.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnSlot {
            limit: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.limit.open();
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over the limit as Consul does, without reading its request, and
/// closes it.
pub(crate) async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        REFUSAL_WRITE_TIMEOUT,
        stream.write_all(TOO_MANY_CONNECTIONS),
    )
    .await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_consuls_and_its_length_is_right() {
        let text = String::from_utf8_lossy(TOO_MANY_CONNECTIONS);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or_default();
        assert_eq!(
            body,
            "Your IP is issuing too many concurrent connections, please rate limit your calls\n"
        );
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }

    #[test]
    fn each_address_has_its_own_count_and_slots_come_back() {
        let limit = ConnLimit::new(2);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let s1 = limit.admit(a);
        let s2 = limit.admit(a);
        assert!(s1.is_some() && s2.is_some());
        assert!(limit.admit(a).is_none(), "a third from the same address");
        assert!(limit.admit(b).is_some(), "another address is counted apart");
        drop(s1);
        assert!(
            limit.admit(a).is_some(),
            "a closed connection frees its place"
        );
        drop(s2);
        assert!(limit.open().get(&a).is_none_or(|n| *n <= 1));
    }

    #[test]
    fn zero_means_no_limit() {
        let limit = ConnLimit::new(0);
        let slots: Vec<_> = (0..1000)
            .filter_map(|_| limit.admit([127, 0, 0, 1].into()))
            .collect();
        assert_eq!(slots.len(), 1000);
    }
}
