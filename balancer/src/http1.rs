//! HTTP/1 heads for the fast path (see [`crate::fast`]): parsing a request or response head,
//! writing the version that goes on (hop-by-hop headers dropped, forwarding headers added),
//! and tracking where a response body ends.

use std::mem::MaybeUninit;

use http::StatusCode;

use crate::chunked::ChunkedEnd;
use crate::proxy::{is_idempotent_method, Peer};
use crate::App;

/// Most header lines in a request or response head.
const MAX_HEADERS: usize = 100;
/// Largest request body the fast path buffers; larger ones go to the hyper path.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;
/// Most names a `Connection` header may list before the request goes to the hyper path.
const MAX_CONNECTION_NAMES: usize = 8;

/// What was learned from a request head (the head for the instance is in `req_out`).
pub(crate) struct Request {
    pub(crate) head_len: usize,
    pub(crate) body_len: usize,
    /// The client asked to close after this request.
    pub(crate) close: bool,
    pub(crate) is_head: bool,
    /// Idempotent and bodiless: may be sent again after it may have reached an instance.
    pub(crate) replayable: bool,
    /// The service of the request's route.
    pub(crate) route: Option<std::sync::Arc<crate::service::ServiceState>>,
}

pub(crate) enum Parsed {
    Request(Request),
    Partial,
    Handoff,
    /// Answer with this status and close.
    Reject(StatusCode),
}

/// Where a response body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the instance closes the connection.
    Close,
}

/// What was learned from a response head (the head for the client is in `resp_out`).
pub(crate) struct Response {
    pub(crate) head_len: usize,
    pub(crate) status: u16,
    pub(crate) framing: Framing,
    /// The instance keeps the connection open after this response.
    pub(crate) keep_alive: bool,
}

pub(crate) enum ParsedResponse {
    Response(Response),
    /// A 1xx answer of this length, to skip.
    Informational(usize),
    Partial,
}

/// A whole answer from the balancer itself into `out`; `send_body` is false for `HEAD`.
pub(crate) fn encode_local(
    out: &mut Vec<u8>,
    status: StatusCode,
    body: &str,
    close: bool,
    send_body: bool,
) {
    out.clear();
    write_status_line(
        out,
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    if !body.is_empty() {
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if send_body {
        out.extend_from_slice(body.as_bytes());
    }
}

/// Where a response body ends, tracked as its bytes pass.
pub(crate) enum BodyEnd {
    Empty,
    /// Bytes left.
    Length(u64),
    Chunked(ChunkedEnd),
    Close,
}

impl BodyEnd {
    pub(crate) fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => BodyEnd::Empty,
            Framing::Length(n) => BodyEnd::Length(n),
            Framing::Chunked => BodyEnd::Chunked(ChunkedEnd::default()),
            Framing::Close => BodyEnd::Close,
        }
    }

    /// Of `bytes`, the next ones from the instance: how many belong to the body, and
    /// whether the body ended with them.
    pub(crate) fn feed(
        &mut self,
        bytes: &[u8],
    ) -> Result<(usize, bool), crate::chunked::Malformed> {
        Ok(match self {
            BodyEnd::Empty => (0, true),
            BodyEnd::Length(left) => {
                let take = (*left).min(bytes.len() as u64);
                *left -= take;
                (take as usize, *left == 0)
            }
            BodyEnd::Chunked(c) => match c.feed(bytes)? {
                Some(end) => (end, true),
                None => (bytes.len(), false),
            },
            BodyEnd::Close => (bytes.len(), false),
        })
    }
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// Comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// Headers never forwarded as received, in either direction: hop-by-hop ones (RFC 9110
/// §7.6.1), and the forwarding headers the balancer writes itself (requests only; the
/// response side passes those through).
fn is_hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => eq(name, "te"),
        7 => eq(name, "trailer") || eq(name, "upgrade"),
        10 => eq(name, "connection") || eq(name, "keep-alive"),
        16 => eq(name, "proxy-connection"),
        17 => eq(name, "transfer-encoding"),
        18 => eq(name, "proxy-authenticate"),
        19 => eq(name, "proxy-authorization"),
        _ => false,
    }
}

/// Headers that say where a message ends or what it is for; a `Connection` header that
/// names them is ignored for them.
fn is_framing(name: &[u8]) -> bool {
    eq(name, "content-length") || eq(name, "transfer-encoding") || eq(name, "host")
}

fn named_in(name: &[u8], names: &[&[u8]]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Where the request head at the start of `buf` ends (just past its empty line), looking
/// only at bytes from `from` on: earlier calls scanned the bytes before it and found no end,
/// so a head that arrives a byte at a time costs linear work, not quadratic. `Err` on a bare
/// LF: lines end in CRLF here (RFC 9112 §2.2), since a proxy that reads LF alone as a line
/// end where the instance does not is one the two can disagree about.
pub(crate) fn find_head_end(buf: &[u8], from: usize) -> Result<Option<usize>, ()> {
    let mut i = from.min(buf.len());
    while let Some(off) = buf[i..].iter().position(|b| *b == b'\n') {
        let at = i + off;
        if at == 0 || buf[at - 1] != b'\r' {
            return Err(());
        }
        if at >= 3 && buf[at - 3..at - 1] == *b"\r\n" {
            return Ok(Some(at + 1));
        }
        i = at + 1;
    }
    Ok(None)
}

/// Parses a request head at the start of `buf`; on success the head to send upstream is in
/// `out`.
pub(crate) fn parse_request(buf: &[u8], app: &App, peer: &Peer, out: &mut Vec<u8>) -> Parsed {
    // Uninitialised slots: httparse fills what it uses, and a request or response pays no
    // 3 KiB clearing of a header array.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Parsed::Reject(StatusCode::BAD_REQUEST),
    };
    if head_len > app.config.max_header_bytes {
        return Parsed::Reject(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Reject(StatusCode::BAD_REQUEST);
    };
    if method == "CONNECT" {
        // A reverse proxy has no tunnel to offer; hyper would pass it on as `CONNECT /`.
        tracing::info!(peer = %peer.addr, "CONNECT refused (501)");
        return Parsed::Reject(StatusCode::NOT_IMPLEMENTED);
    }
    // The framing rules hold for every request, also those handed to hyper below.
    let facts = HeadFacts::scan(req.headers);
    if let Err(status) = facts.check_request(version == 1) {
        return Parsed::Reject(status);
    }
    if version != 1 || !target.starts_with('/') {
        return Parsed::Handoff;
    }
    // Chunked uploads, `Expect` and upgrades: hyper's.
    if facts.too_many_names || facts.codings.present() || facts.expect || facts.upgrade_request() {
        return Parsed::Handoff;
    }
    let length = facts.length;
    let body_len = match length {
        Some(l) if l > MAX_BUFFERED_BODY as u64 => return Parsed::Handoff,
        Some(l) => l as usize,
        None => 0,
    };
    let names = facts.names();
    // A fragment is the client's own business (RFC 9110 §7.1): never sent on.
    let target = target.split_once('#').map_or(target, |(t, _)| t);
    // Routing (host, path prefix, prefix stripping): `RouteTable::resolve`.
    let host_value = req.headers.iter().find(|h| eq(h.name.as_bytes(), "host"));
    let table = app.routes.load();
    let routed = table.resolve(host_value.map(|h| h.value), target);
    let strip = routed.as_ref().and_then(|(e, _)| e.route.strip.as_deref());

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(routed.as_ref().map_or(target, |(_, t)| t).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host: Option<&[u8]> = None;
    let mut prior_xff = false;
    for h in req.headers.iter() {
        let n = h.name.as_bytes();
        // The body's framing is ours to state: one `Content-Length`, written below.
        if is_hop_by_hop(n) || named_in(n, names) || eq(n, "content-length") {
            continue;
        }
        if n.len() > 11 && n[..11].eq_ignore_ascii_case(b"x-forwarded") {
            if eq(n, "x-forwarded-for") {
                prior_xff |= tokens(h.value).next().is_some();
                continue;
            }
            if eq(n, "x-forwarded-proto")
                || eq(n, "x-forwarded-host")
                || (strip.is_some() && eq(n, "x-forwarded-prefix"))
            {
                continue;
            }
        }
        if eq(n, "host") {
            host = Some(h.value);
        }
        write_header(out, n, h.value);
    }
    if let Some(len) = length {
        write_length(out, len);
    }
    // Earlier hops may have sent several X-Forwarded-For lines: one line, all in order.
    out.extend_from_slice(b"x-forwarded-for: ");
    if prior_xff {
        for h in req
            .headers
            .iter()
            .filter(|h| eq(h.name.as_bytes(), "x-forwarded-for"))
        {
            for t in tokens(h.value) {
                out.extend_from_slice(t);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(peer.ip_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    if let Some(host) = host {
        write_header(out, b"x-forwarded-host", host);
    }
    if let Some(prefix) = strip {
        write_header(out, b"x-forwarded-prefix", prefix.as_bytes());
    }
    out.extend_from_slice(b"\r\n");

    Parsed::Request(Request {
        head_len,
        body_len,
        close: facts.close,
        is_head: method == "HEAD",
        replayable: body_len == 0 && is_idempotent_method(method),
        route: routed.map(|(e, _)| std::sync::Arc::clone(&e.service)),
    })
}

/// Parses a response head at the start of `buf`; the head for the client goes to `out`.
pub(crate) fn parse_response(
    buf: &[u8],
    is_head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<ParsedResponse, &'static str> {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(ParsedResponse::Partial),
        Err(_) => return Err("malformed response head"),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err("malformed response head");
    };
    if (100..200).contains(&status) {
        // Never asked for (no `Expect`, no upgrade goes this way): skip, as hyper does.
        if status == 101 {
            return Err("unrequested protocol switch");
        }
        return Ok(ParsedResponse::Informational(head_len));
    }
    let facts = HeadFacts::scan(resp.headers);
    if facts.bad_length {
        return Err("invalid or conflicting content-length");
    }
    if facts.too_many_names {
        return Err("too many connection options");
    }
    let mut keep_alive = if version == 1 {
        !facts.close
    } else {
        facts.keep_alive && !facts.close
    };
    let (transfer_encoding, chunked, length) =
        (facts.codings.present(), facts.codings.chunked, facts.length);
    let framing = if is_head || status == 204 || status == 304 {
        Framing::Empty
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    // A response readers can frame two ways (a length beside a coding, `chunked` twice, a
    // coding in HTTP/1.0: RFC 9112 §6.1, §6.3) is relayed as framed here, but its connection
    // carries nothing more: an instance that meant the other framing is out of step on it.
    let c = &facts.codings;
    if transfer_encoding && (length.is_some() || c.lines > 1 || c.chunked_early || version == 0) {
        keep_alive = false;
    }
    let names = facts.names();

    out.clear();
    write_status_line(out, status, resp.reason.unwrap_or(""));
    for h in resp.headers.iter() {
        let n = h.name.as_bytes();
        // The body passes through unchanged, so its `Transfer-Encoding` does too. Lengths
        // are written once below, normalised; beside a transfer coding there is none (RFC
        // 9112 §6.3).
        let coding = eq(n, "transfer-encoding");
        if (is_hop_by_hop(n) && !coding) || named_in(n, names) || eq(n, "content-length") {
            continue;
        }
        write_header(out, n, h.value);
    }
    if let (false, Some(len)) = (transfer_encoding, length) {
        write_length(out, len);
    }
    if close || framing == Framing::Close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(ParsedResponse::Response(Response {
        head_len,
        status,
        framing,
        keep_alive,
    }))
}

/// The one `Content-Length` line of a head the balancer writes.
fn write_length(out: &mut Vec<u8>, len: u64) {
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, len);
    out.extend_from_slice(b"\r\n");
}

fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What a head's headers say about the connection and the body's framing.
struct HeadFacts<'a> {
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive` (meaningful for HTTP/1.0).
    keep_alive: bool,
    /// `Connection: upgrade`.
    upgrade: bool,
    /// Other `Connection` options: names of headers that are hop-by-hop for this message.
    names: [&'a [u8]; MAX_CONNECTION_NAMES],
    named: usize,
    too_many_names: bool,
    length: Option<u64>,
    /// A `Content-Length` that is not a number, or two that differ.
    bad_length: bool,
    upgrade_header: bool,
    expect: bool,
    /// The `Transfer-Encoding` lines, as a request must have them.
    codings: Codings,
    /// `Host` lines.
    hosts: u32,
}

/// What the `Transfer-Encoding` lines of a request say, to tell whether its body's framing
/// is unambiguous. Shared by both request paths (`proxy` checks what hyper parsed).
#[derive(Default)]
pub(crate) struct Codings {
    lines: u32,
    /// `chunked` is the last coding of the last line.
    chunked: bool,
    /// `chunked` before the last coding, or twice.
    chunked_early: bool,
    /// A coding other than `chunked`.
    other: bool,
}

impl Codings {
    /// Takes one `Transfer-Encoding` line's value.
    pub(crate) fn add(&mut self, value: &[u8]) {
        self.lines += 1;
        let mut codings = tokens(value).peekable();
        self.chunked = false;
        while let Some(t) = codings.next() {
            let last = codings.peek().is_none();
            if eq(t, "chunked") {
                self.chunked_early |= !last || self.chunked;
                self.chunked = last;
            } else {
                self.other = true;
            }
        }
    }

    /// Whether the message has a `Transfer-Encoding` at all.
    pub(crate) fn present(&self) -> bool {
        self.lines > 0
    }

    /// Whether a request with these codings (and a `Content-Length`, if `length`) has one
    /// reading of its body (RFC 9112 §6.1, §6.3): exactly one line, `chunked` once and last,
    /// no length beside it, not in HTTP/1.0 (which has no transfer codings: such framing is
    /// faulty). Other codings before `chunked` are not served (501).
    pub(crate) fn request_verdict(&self, length: bool, http10: bool) -> Result<(), StatusCode> {
        if self.lines == 0 {
            return Ok(());
        }
        if length || http10 || !self.chunked || self.chunked_early || self.lines > 1 {
            return Err(StatusCode::BAD_REQUEST);
        }
        if self.other {
            return Err(StatusCode::NOT_IMPLEMENTED);
        }
        Ok(())
    }
}

impl<'a> HeadFacts<'a> {
    fn scan(headers: &[httparse::Header<'a>]) -> Self {
        let mut f = HeadFacts {
            close: false,
            keep_alive: false,
            upgrade: false,
            names: [b""; MAX_CONNECTION_NAMES],
            named: 0,
            too_many_names: false,
            length: None,
            bad_length: false,
            upgrade_header: false,
            expect: false,
            codings: Codings::default(),
            hosts: 0,
        };
        for h in headers {
            let n = h.name.as_bytes();
            if eq(n, "connection") {
                for t in tokens(h.value) {
                    if eq(t, "close") {
                        f.close = true;
                    } else if eq(t, "keep-alive") {
                        f.keep_alive = true;
                    } else if eq(t, "upgrade") {
                        f.upgrade = true;
                    } else if is_framing(t) {
                        // The message's framing and target are never one hop's business
                        // (RFC 9110 §7.6.1): ignored, so they cannot be stripped away.
                    } else if f.named == MAX_CONNECTION_NAMES {
                        f.too_many_names = true;
                    } else {
                        f.names[f.named] = t;
                        f.named += 1;
                    }
                }
            } else if eq(n, "content-length") {
                match parse_decimal(h.value) {
                    Some(v) if f.length.is_none_or(|l| l == v) => f.length = Some(v),
                    _ => f.bad_length = true,
                }
            } else if eq(n, "transfer-encoding") {
                f.codings.add(h.value);
            } else if eq(n, "host") {
                f.hosts += 1;
            } else if eq(n, "upgrade") {
                f.upgrade_header = true;
            } else if eq(n, "expect") {
                f.expect = true;
            }
        }
        f
    }

    /// Whether a request head's framing and target are unambiguous (RFC 9112 §3.2, §6.1,
    /// §6.3); if not, the answer to give before closing. Nothing of such a request is sent
    /// on: a proxy that guesses here is one that can be made to see two requests where the
    /// instance sees one.
    fn check_request(&self, http11: bool) -> Result<(), StatusCode> {
        // HTTP/1.1 requires exactly one `Host`; HTTP/1.0 may have none, never two.
        let hosts_ok = if http11 {
            self.hosts == 1
        } else {
            self.hosts <= 1
        };
        if !hosts_ok || self.bad_length {
            return Err(StatusCode::BAD_REQUEST);
        }
        self.codings.request_verdict(self.length.is_some(), !http11)
    }

    /// The request asks to switch protocols (`Connection: upgrade` and an `Upgrade`).
    fn upgrade_request(&self) -> bool {
        self.upgrade && self.upgrade_header
    }

    fn names(&self) -> &[&'a [u8]] {
        &self.names[..self.named]
    }
}

fn write_status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_decimal(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A `Content-Length` value: ASCII digits only, no overflow.
fn parse_decimal(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |acc, b| {
        let d = b.checked_sub(b'0').filter(|d| *d <= 9)?;
        acc.checked_mul(10)?.checked_add(u64::from(d))
    })
}
