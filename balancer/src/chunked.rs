//! Finds where a `Transfer-Encoding: chunked` body ends without decoding it.
//!
//! The fast path forwards chunked bodies byte for byte; it only needs to know where the
//! message stops, so that the connection can carry the next one. [`ChunkedEnd`] is fed the
//! bytes as they pass and reports the end (after the last chunk and the trailer section).

/// Longest chunk-size line, extensions included, that we accept.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Hex digits of a chunk size.
    Size,
    /// After the size digits: only whitespace so far, then `;` or the CR.
    SizeWs,
    /// Inside `;extensions`, up to the CR.
    Ext,
    /// The LF ending the size line.
    SizeLf,
    /// Chunk data; the count left.
    Data(u64),
    /// The CR after chunk data.
    DataCr,
    /// The LF after chunk data.
    DataLf,
    /// The start of a trailer line (or of the final empty line).
    TrailerStart,
    /// Inside a trailer field line.
    Trailer,
    /// The LF ending a trailer field line.
    TrailerLf,
    /// The LF of the final empty line.
    EndLf,
    Done,
}

/// The chunked framing is broken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed chunked body: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// Tracks a chunked body's framing across reads.
#[derive(Debug, Clone)]
pub struct ChunkedEnd {
    state: State,
    size: u64,
    digits: u32,
    line: usize,
}

impl Default for ChunkedEnd {
    fn default() -> Self {
        Self {
            state: State::Size,
            size: 0,
            digits: 0,
            line: 0,
        }
    }
}

impl ChunkedEnd {
    /// Feeds the next bytes of the body. `Some(n)`: the body ended after `n` of them (the rest
    /// belongs to whatever follows); `None`: all were body and more is to come.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<usize>, Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            match self.state {
                State::Data(left) => {
                    // Skip data in bulk.
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left {
                        State::DataCr
                    } else {
                        State::Data(left - take)
                    };
                    continue;
                }
                State::Done => return Ok(Some(i)),
                _ => {}
            }
            let b = bytes[i];
            i += 1;
            self.state = match self.state {
                State::Size => match hex(b) {
                    Some(d) => {
                        self.digits += 1;
                        if self.digits > 16 {
                            return Err(Malformed("chunk size too large"));
                        }
                        self.size = (self.size << 4) | u64::from(d);
                        State::Size
                    }
                    None if self.digits == 0 => return Err(Malformed("missing chunk size")),
                    None => self.after_size(State::SizeWs, b)?,
                },
                state @ (State::SizeWs | State::Ext) => self.after_size(state, b)?,
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(Malformed("expected LF after chunk size"));
                    }
                    let size = std::mem::take(&mut self.size);
                    self.digits = 0;
                    self.line = 0;
                    if size == 0 {
                        State::TrailerStart
                    } else {
                        State::Data(size)
                    }
                }
                State::DataCr => match b {
                    b'\r' => State::DataLf,
                    _ => return Err(Malformed("expected CRLF after chunk data")),
                },
                State::DataLf => match b {
                    b'\n' => State::Size,
                    _ => return Err(Malformed("expected CRLF after chunk data")),
                },
                State::TrailerStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => return Err(Malformed("bare LF ending the trailers")),
                    _ => {
                        self.line = 1;
                        State::Trailer
                    }
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => return Err(Malformed("bare LF in a trailer line")),
                    _ => {
                        self.line += 1;
                        if self.line > MAX_LINE {
                            return Err(Malformed("trailer line too long"));
                        }
                        State::Trailer
                    }
                },
                State::TrailerLf => match b {
                    b'\n' => State::TrailerStart,
                    _ => return Err(Malformed("CR without LF in a trailer line")),
                },
                State::EndLf => match b {
                    b'\n' => State::Done,
                    _ => return Err(Malformed("expected LF ending the trailers")),
                },
                // Both are handled before this match (the loop `continue`s or returns).
                State::Data(_) | State::Done => return Err(Malformed("internal state")),
            };
        }
        Ok((self.state == State::Done).then_some(i))
    }

    /// A byte after the size digits, in `state` (RFC 9112 §7.1: `chunk-size [ chunk-ext ]
    /// CRLF`, extensions starting with `;` after optional whitespace). Anything else after
    /// the digits (`0x5`, `5g`) is malformed: a reader that takes it for part of the size
    /// would see another body than the one the balancer framed.
    fn after_size(&mut self, state: State, b: u8) -> Result<State, Malformed> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(Malformed("chunk extension too long"));
        }
        Ok(match (state, b) {
            (_, b'\r') => State::SizeLf,
            (_, b'\n') => return Err(Malformed("bare LF in chunk size line")),
            (State::SizeWs, b' ' | b'\t') => State::SizeWs,
            (State::SizeWs, b';') => State::Ext,
            (State::SizeWs, _) => return Err(Malformed("junk after the chunk size")),
            (_, b) if b != b'\t' && (b < 0x20 || b == 0x7f) => {
                return Err(Malformed("control byte in a chunk extension"))
            }
            _ => State::Ext,
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn end_of(body: &[u8]) -> Result<Option<usize>, Malformed> {
        ChunkedEnd::default().feed(body)
    }

    #[test]
    fn finds_the_end_in_one_piece() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nGET / HTTP/1.1";
        assert_eq!(end_of(body), Ok(Some(body.len() - 14)));
    }

    #[test]
    fn finds_the_end_after_trailers() {
        let body = b"3\r\nabc\r\n0\r\nx-sum: 1\r\nx-more: 2\r\n\r\n";
        assert_eq!(end_of(body), Ok(Some(body.len())));
    }

    #[test]
    fn every_split_gives_the_same_end() {
        let body =
            b"A\r\n0123456789\r\n1F\r\n0123456789012345678901234567890\r\n0\r\nt: v\r\n\r\nrest";
        let end = body.len() - 4;
        for cut in 0..body.len() {
            let mut c = ChunkedEnd::default();
            let first = c.feed(&body[..cut]).unwrap();
            let got = match first {
                Some(n) => n,
                None => cut + c.feed(&body[cut..]).unwrap().unwrap(),
            };
            assert_eq!(got, end, "split at {cut}");
        }
    }

    #[test]
    fn byte_by_byte() {
        let body = b"2\r\nab\r\n0\r\n\r\n";
        let mut c = ChunkedEnd::default();
        for (i, b) in body.iter().enumerate() {
            let r = c.feed(std::slice::from_ref(b)).unwrap();
            assert_eq!(r.is_some(), i == body.len() - 1, "at {i}");
        }
    }

    #[test]
    fn rejects_broken_framing() {
        assert!(end_of(b"x\r\n").is_err());
        assert!(end_of(b"\r\n").is_err());
        assert!(end_of(b"2\r\nabc\r\n").is_err());
        assert!(end_of(b"2\nab\r\n").is_err());
        assert!(end_of(b"11111111111111111\r\n").is_err());
        assert!(end_of(b"0\r\n\rx").is_err());
        // Junk after the size digits is not an extension.
        assert!(end_of(b"0x5\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(end_of(b"5g\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(end_of(b"5;a\x01\r\nhello\r\n0\r\n\r\n").is_err());
        // Trailer lines and the final empty line end in CRLF.
        assert!(end_of(b"0\r\nx: y\n\r\n").is_err());
        assert!(end_of(b"0\r\n\n").is_err());
    }

    #[test]
    fn extensions_after_optional_whitespace() {
        let body = b"5 ;a=1\r\nhello\r\n5\t;b\r\nworld\r\n0;last\r\n\r\n";
        assert_eq!(end_of(body), Ok(Some(body.len())));
    }

    #[test]
    fn incomplete_is_none() {
        assert_eq!(end_of(b"5\r\nhel"), Ok(None));
        assert_eq!(end_of(b"0\r\n"), Ok(None));
        assert_eq!(end_of(b"0\r\nx: y\r\n"), Ok(None));
    }
}
