//! HTTP/1 over bare sockets, for what the hyper backend and clients cannot show: a scripted
//! raw upstream ([`RawUpstream`]) that writes exact bytes and records which connection each
//! request came on and who closed it, and a raw client ([`RawClient`]) that writes exactly what
//! the test says and parses what comes back, framing included.
//!
//! Every wait is bounded by [`DEADLINE`]; everything started here is stopped on drop.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use balancer::Config;
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{config, instance, request, Balancer, H1Conn, Server, DEADLINE};

// ---------------------------------------------------------------------------------------------
// A scripted raw upstream that knows its connections
// ---------------------------------------------------------------------------------------------

/// One thing the raw upstream does in answer to a request.
pub enum Step {
    Write(Vec<u8>),
    Sleep(Duration),
    /// Close the connection from this side (no further requests are read on it).
    Close,
}

/// A request as the raw upstream received it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// The connection it came on: 1 for the first accepted, 2 for the next, ...
    pub conn: u64,
    pub method: String,
    pub path: String,
    /// The whole head, request line to the empty line.
    pub head: String,
    pub body: Vec<u8>,
}

type Script = Arc<dyn Fn(&RawRequest) -> Vec<Step> + Send + Sync>;

/// What the raw upstream saw.
#[derive(Default)]
struct RawSeen {
    /// TCP connections accepted.
    connections: AtomicU64,
    /// Connections the peer (the balancer) closed: a read saw the end of the stream or an
    /// error, or a write failed.
    closed_by_peer: Mutex<Vec<u64>>,
    /// Connections this side closed (a [`Step::Close`]).
    closed_here: Mutex<Vec<u64>>,
    /// Every request, in arrival order.
    log: Mutex<Vec<RawRequest>>,
    /// Every byte received, by connection.
    wire: Mutex<std::collections::BTreeMap<u64, Vec<u8>>>,
}

/// A `TcpListener` whose connections read request heads (and `Content-Length` bodies) and
/// answer each with the steps the script returns for it.
pub struct RawUpstream {
    pub addr: SocketAddr,
    seen: Arc<RawSeen>,
    /// The listener and its tasks, stopped when this is dropped.
    server: Server,
}

impl RawUpstream {
    pub async fn start(script: impl Fn(&RawRequest) -> Vec<Step> + Send + Sync + 'static) -> Self {
        let seen = Arc::new(RawSeen::default());
        let script: Script = Arc::new(script);
        let (seen_c, seen_count) = (Arc::clone(&seen), Arc::clone(&seen));
        // The accept loop counts a connection, then hands it to `serve`, in one task: the
        // count as `serve` sees it is that connection's number.
        let server = Server::start(
            move || {
                seen_count.connections.fetch_add(1, Ordering::SeqCst);
            },
            move |stream| {
                let n = seen_c.connections.load(Ordering::SeqCst);
                tokio::spawn(serve_raw(
                    stream,
                    n,
                    Arc::clone(&script),
                    Arc::clone(&seen_c),
                ))
            },
        )
        .await;
        RawUpstream {
            addr: server.addr,
            seen,
            server,
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.seen.connections.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn requests(&self) -> u64 {
        self.seen.log.lock().unwrap().len() as u64
    }

    /// The connections the balancer closed, in the order it closed them.
    pub fn closed_by_peer(&self) -> Vec<u64> {
        self.seen.closed_by_peer.lock().unwrap().clone()
    }

    /// The connections this upstream closed (a [`Step::Close`]).
    pub fn closed_here(&self) -> Vec<u64> {
        self.seen.closed_here.lock().unwrap().clone()
    }

    /// Every request received so far, in arrival order.
    pub fn log(&self) -> Vec<RawRequest> {
        self.seen.log.lock().unwrap().clone()
    }

    /// The requests received after the first `from`, in arrival order (cheaper than
    /// [`RawUpstream::log`] when thousands came before).
    pub fn log_since(&self, from: usize) -> Vec<RawRequest> {
        let log = self.seen.log.lock().unwrap();
        log.get(from..).unwrap_or_default().to_vec()
    }

    /// Every byte received so far, all connections in the order they were accepted.
    pub fn wire(&self) -> Vec<u8> {
        self.seen
            .wire
            .lock()
            .unwrap()
            .values()
            .flatten()
            .copied()
            .collect()
    }

    /// A balancer with the test defaults routing service `web` to this upstream alone.
    pub async fn balancer(&self) -> Balancer {
        self.balancer_with(config(&["web"])).await
    }

    /// A balancer with `cfg` routing service `web` to this upstream alone.
    pub async fn balancer_with(&self, cfg: Config) -> Balancer {
        Balancer::with_static(cfg, vec![("web", vec![instance("raw", "web", self.addr)])]).await
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where a chunked body at the start of `b` ends, and its content; `None` while incomplete.
/// Strict: hex sizes, CRLF line ends, no extensions, trailers skipped.
fn chunked_body(b: &[u8]) -> Option<(usize, Vec<u8>)> {
    let mut pos = 0;
    let mut data = Vec::new();
    loop {
        let line = find(&b[pos..], b"\r\n")?;
        let size = usize::from_str_radix(std::str::from_utf8(&b[pos..pos + line]).ok()?, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {:?}", &b[pos..pos + line]));
        pos += line + 2;
        if size == 0 {
            loop {
                let l = find(&b[pos..], b"\r\n")?;
                pos += l + 2;
                if l == 0 {
                    return Some((pos, data));
                }
            }
        }
        if b.len() < pos + size + 2 {
            return None;
        }
        data.extend_from_slice(&b[pos..pos + size]);
        assert_eq!(
            &b[pos + size..pos + size + 2],
            b"\r\n",
            "chunk data not followed by CRLF"
        );
        pos += size + 2;
    }
}

async fn serve_raw(mut s: TcpStream, conn: u64, script: Script, seen: Arc<RawSeen>) {
    let peer_closed = || seen.closed_by_peer.lock().unwrap().push(conn);
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let record = |bytes: &[u8]| {
        seen.wire
            .lock()
            .unwrap()
            .entry(conn)
            .or_default()
            .extend_from_slice(bytes)
    };
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return peer_closed(),
                Ok(n) => {
                    record(&chunk[..n]);
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut words = head.lines().next().unwrap_or("").split(' ');
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("").to_string();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let chunked = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(k, v)| {
                k.eq_ignore_ascii_case("transfer-encoding")
                    && v.trim().eq_ignore_ascii_case("chunked")
            })
        });
        let (end, body) = loop {
            if chunked {
                if let Some((n, data)) = chunked_body(&buf[head_end..]) {
                    break (head_end + n, data);
                }
            } else if buf.len() >= head_end + len {
                break (head_end + len, buf[head_end..head_end + len].to_vec());
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return peer_closed(),
                Ok(n) => {
                    record(&chunk[..n]);
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
        };
        let req = RawRequest {
            conn,
            method,
            path,
            head,
            body,
        };
        buf.drain(..end);
        seen.log.lock().unwrap().push(req.clone());
        for step in script(&req) {
            match step {
                Step::Write(b) => {
                    if s.write_all(&b).await.is_err() {
                        return peer_closed();
                    }
                }
                Step::Sleep(d) => tokio::time::sleep(d).await,
                Step::Close => {
                    seen.closed_here.lock().unwrap().push(conn);
                    return;
                }
            }
        }
    }
}

/// An instance that reads each request and never answers it, but notices (and counts) when
/// the balancer closes the connection.
pub struct Silent {
    pub addr: std::net::SocketAddr,
    /// Request heads read.
    pub requests: Arc<AtomicUsize>,
    /// Connections the balancer closed.
    pub closed: Arc<AtomicUsize>,
    _server: Server,
}

pub async fn silent_upstream() -> Silent {
    let (requests, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, c) = (Arc::clone(&requests), Arc::clone(&closed));
    let server = Server::start(
        || {},
        move |mut s| {
            let (r, c) = (Arc::clone(&r), Arc::clone(&c));
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                loop {
                    match tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                        Ok(0) | Err(_) => {
                            c.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                                r.fetch_add(1, Ordering::SeqCst);
                                got.clear();
                            }
                        }
                    }
                }
            })
        },
    )
    .await;
    Silent {
        addr: server.addr,
        requests,
        closed,
        _server: server,
    }
}

/// `bytes` as writes cut at `cuts` (offsets), with `pause` between them.
pub fn in_pieces(bytes: &[u8], cuts: &[usize], pause: Duration) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut from = 0;
    for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
        if from > 0 {
            steps.push(Step::Sleep(pause));
        }
        steps.push(Step::Write(bytes[from..c].to_vec()));
        from = c;
    }
    steps
}

/// A complete keep-alive `Content-Length` answer.
pub fn ok_with(body: impl AsRef<[u8]>) -> Vec<u8> {
    ok_with_headers("Content-Type: application/octet-stream\r\n", body)
}

/// A complete keep-alive `Content-Length` answer with the `extra` header lines (each ending
/// in CRLF).
pub fn ok_with_headers(extra: &str, body: impl AsRef<[u8]>) -> Vec<u8> {
    let body = body.as_ref();
    let mut w = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    w.extend_from_slice(body);
    w
}

/// The script of an instance that closes each connection `idle` after answering (a short
/// idle timeout): every request is answered `"<method> <body length>"` by
/// [`ok_with_headers`] with `extra`.
pub fn answer_then_close(
    extra: &'static str,
    idle: Duration,
) -> impl Fn(&RawRequest) -> Vec<Step> + Send + Sync + 'static {
    move |req| {
        let body = format!("{} {}", req.method, req.body.len());
        vec![
            Step::Write(ok_with_headers(extra, body)),
            Step::Sleep(idle),
            Step::Close,
        ]
    }
}

/// The body [`post_answered`] sends.
pub const SMALL_BODY: &[u8] = b"a small body";

/// `GET /` on `conn`, through to an [`answer_then_close`] upstream: answered 200, `GET 0`.
pub async fn get_answered(conn: &mut H1Conn) {
    let a = conn.get("/", &[]).await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(a.text(), "GET 0");
}

/// `POST path` with [`SMALL_BODY`] on `conn` (to the balancer at `addr`), through to an
/// [`answer_then_close`] upstream: answered 200, `POST 12`.
pub async fn post_answered(conn: &mut H1Conn, addr: SocketAddr, path: &str) {
    let req = request(Method::POST, addr, path)
        .body(Full::new(Bytes::from_static(SMALL_BODY)))
        .unwrap();
    let a = conn.send(req).await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "POST: {}", a.text());
    assert_eq!(a.text(), "POST 12");
}

// ---------------------------------------------------------------------------------------------
// A raw client
// ---------------------------------------------------------------------------------------------

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The body as it came on the wire (chunk framing included).
    pub wire_body: Vec<u8>,
    /// The body's content (de-chunked).
    pub body: Vec<u8>,
    /// Trailer lines of a chunked body.
    pub trailers: Vec<String>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn has_connection_close(&self) -> bool {
        self.headers.iter().any(|(k, v)| {
            k == "connection" && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
        })
    }
}

/// How [`RawClient`] finds the end of a response.
#[derive(Clone, Copy)]
enum Framing {
    /// As HTTP/1.1 says: bodiless for 1xx, 204, 304 and (`head`) an answer to `HEAD`, else
    /// chunked, `Content-Length` or close-delimited.
    Any { head: bool },
    /// By `Content-Length` alone, which the response must carry.
    Length,
}

/// An HTTP/1 client on a bare socket: writes exactly what the test says, reads only when the
/// test says, and parses what comes.
pub struct RawClient {
    s: TcpStream,
    /// Bytes read and not yet consumed by a response.
    pub buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        RawClient {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Ends the sending side (a TCP half-close): the balancer reads the end of the stream
    /// after what was sent, while answers can still come back.
    pub async fn shutdown_write(&mut self) {
        self.s.shutdown().await.unwrap();
    }

    /// Reads more bytes; `false` at end of stream. Panics after [`DEADLINE`] without any.
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        match timeout(DEADLINE, self.s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no bytes within {DEADLINE:?}; buffered: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            }) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads more bytes, or panics at the end of the stream or after [`DEADLINE`].
    pub async fn more(&mut self, what: &str) {
        if !self.fill().await {
            panic!(
                "connection closed while reading {what}; buffered: {:?}",
                String::from_utf8_lossy(&self.buf[..self.buf.len().min(400)])
            );
        }
    }

    /// Waits until `n` bytes are buffered.
    async fn need(&mut self, n: usize, what: &str) {
        while self.buf.len() < n {
            self.more(what).await;
        }
    }

    /// The offset of the next `\n` at or after `from`.
    async fn line_end(&mut self, from: usize) -> usize {
        let mut searched = from;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|b| *b == b'\n') {
                return searched + i;
            }
            searched = self.buf.len().max(from);
            self.more("a chunked body line").await;
        }
    }

    /// Reads one response (1xx included, bodiless). `bodiless`: the request was `HEAD`.
    pub async fn response(&mut self, bodiless: bool) -> RawResponse {
        self.read_response(Framing::Any { head: bodiless }).await
    }

    /// Reads one response that must carry a `Content-Length`, and its body of that length.
    pub async fn length_response(&mut self) -> RawResponse {
        self.read_response(Framing::Length).await
    }

    async fn read_response(&mut self, framing: Framing) -> RawResponse {
        let (head_len, status, headers) = loop {
            let mut hs = [httparse::EMPTY_HEADER; 128];
            let mut r = httparse::Response::new(&mut hs);
            let parsed = r.parse(&self.buf).unwrap_or_else(|e| {
                panic!(
                    "malformed response head ({e}): {:?}",
                    String::from_utf8_lossy(&self.buf[..self.buf.len().min(400)])
                )
            });
            if let httparse::Status::Complete(n) = parsed {
                break (n, r.code.unwrap(), header_pairs(r.headers));
            }
            self.more("a response head").await;
        };
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let mut resp = RawResponse {
            status,
            headers: headers.clone(),
            wire_body: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
        };
        let mut decoded = None;
        let end = match framing {
            Framing::Length => {
                let len = get("content-length").expect("a content-length response");
                self.length_body(head_len, &len).await
            }
            Framing::Any { head } => {
                if head || (100..200).contains(&status) || status == 204 || status == 304 {
                    head_len
                } else if let Some(te) = get("transfer-encoding") {
                    let chunked = te
                        .split(',')
                        .map(str::trim)
                        .rfind(|t| !t.is_empty())
                        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
                    if chunked {
                        let (data, trailers, end) = self.read_chunked(head_len).await;
                        decoded = Some(data);
                        resp.trailers = trailers;
                        end
                    } else {
                        self.read_to_end().await
                    }
                } else if let Some(len) = get("content-length") {
                    self.length_body(head_len, &len).await
                } else {
                    self.read_to_end().await
                }
            }
        };
        resp.wire_body = self.buf[head_len..end].to_vec();
        resp.body = decoded.unwrap_or_else(|| resp.wire_body.clone());
        self.buf.drain(..end);
        resp
    }

    /// Waits for a body of `Content-Length: len` after a head of `head_len` bytes; returns the
    /// offset of its end.
    async fn length_body(&mut self, head_len: usize, len: &str) -> usize {
        let len: usize = len.trim().parse().unwrap();
        self.need(head_len + len, "a content-length body").await;
        head_len + len
    }

    /// Reads until the peer closes; returns the buffered length.
    async fn read_to_end(&mut self) -> usize {
        while self.fill().await {}
        self.buf.len()
    }

    /// Decodes the chunked body starting at `start`: (data, trailer lines, end offset).
    async fn read_chunked(&mut self, start: usize) -> (Vec<u8>, Vec<String>, usize) {
        let mut pos = start;
        let mut data = Vec::new();
        loop {
            let nl = self.line_end(pos).await;
            let line = String::from_utf8_lossy(&self.buf[pos..nl]).into_owned();
            let line = line.strip_suffix('\r').expect("CRLF after a chunk size");
            let size_text = line.split(';').next().unwrap().trim();
            let size = usize::from_str_radix(size_text, 16)
                .unwrap_or_else(|e| panic!("chunk size {size_text:?}: {e}"));
            pos = nl + 1;
            if size == 0 {
                break;
            }
            self.need(pos + size + 2, "chunk data").await;
            data.extend_from_slice(&self.buf[pos..pos + size]);
            assert_eq!(
                &self.buf[pos + size..pos + size + 2],
                b"\r\n",
                "CRLF after chunk data"
            );
            pos += size + 2;
        }
        let mut trailers = Vec::new();
        loop {
            let nl = self.line_end(pos).await;
            let line = String::from_utf8_lossy(&self.buf[pos..nl])
                .trim_end_matches('\r')
                .to_string();
            pos = nl + 1;
            if line.is_empty() {
                return (data, trailers, pos);
            }
            trailers.push(line);
        }
    }

    /// Asserts that the peer closes the connection (within [`DEADLINE`]) with nothing more.
    pub async fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let mut chunk = [0u8; 4096];
        let r = timeout(DEADLINE, self.s.read(&mut chunk))
            .await
            .expect("the balancer closes the connection within the deadline");
        match r {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!(
                "bytes instead of a close: {:?}",
                String::from_utf8_lossy(&chunk[..n])
            ),
        }
    }

    /// Asserts that for `d` nothing arrives: no byte, and no end of stream.
    pub async fn expect_silence(&mut self, d: Duration, why: &str) {
        let mut chunk = [0u8; 4096];
        match timeout(d, self.s.read(&mut chunk)).await {
            Err(_) => {}
            Ok(Ok(0)) => panic!("{why}: the connection was closed"),
            Ok(Ok(n)) => panic!(
                "{why}: got {:?}",
                String::from_utf8_lossy(&chunk[..n.min(400)])
            ),
            Ok(Err(e)) => panic!("{why}: read failed: {e}"),
        }
    }
}

/// Parsed header lines as (lowercased name, value) pairs, in order.
pub fn header_pairs(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// `GET path` as HTTP/1.1 with a `Host` and nothing else.
pub fn get_req(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: lb.test\r\n\r\n").into_bytes()
}
