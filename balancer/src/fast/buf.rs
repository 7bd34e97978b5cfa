//! Read buffers and queued writes of the fast path's sockets.

use super::*;

/// A read buffer: `data[start..end]` is unread. `data` stays initialised, so reads need no
/// unsafe code; it grows when a read needs room and is compacted before it grows.
pub(super) struct IoBuf {
    pub(super) data: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
}

impl IoBuf {
    pub(super) fn new() -> Self {
        Self {
            data: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn bytes(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.clear();
        }
    }

    pub(super) fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// One read of at least `space` bytes of room. `Ok((n, drained))`: `drained` when the
    /// read did not fill the room, so the kernel had nothing more (a new event comes with
    /// new bytes).
    pub(super) fn read_from(
        &mut self,
        s: &mut TcpStream,
        space: usize,
    ) -> io::Result<(usize, bool)> {
        if self.data.len() - self.end < space {
            if self.start > 0 {
                self.data.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.data.len() - self.end < space {
                self.data.resize(self.end + space, 0);
            }
        }
        let room = self.data.len() - self.end;
        loop {
            match s.read(&mut self.data[self.end..]) {
                Ok(n) => {
                    self.end += n;
                    return Ok((n, n < room));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The client's socket for writing, and what it has not taken yet.
pub(super) struct Output {
    pub(super) queued: Vec<u8>,
    pub(super) pos: usize,
    pub(super) writable: bool,
}

impl Output {
    pub(super) fn pending(&self) -> bool {
        self.pos < self.queued.len()
    }

    /// Writes `bytes` after anything queued; what the socket does not take is queued.
    pub(super) fn send(&mut self, s: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.pending() || !self.writable {
            self.queued.extend_from_slice(bytes);
            return Ok(());
        }
        let n = write_some(s, bytes, &mut self.writable)?;
        if n < bytes.len() {
            self.queued.clear();
            self.pos = 0;
            self.queued.extend_from_slice(&bytes[n..]);
        }
        Ok(())
    }

    /// Writes what is queued. `Ok(true)` when nothing is left.
    pub(super) fn flush(&mut self, s: &mut TcpStream) -> io::Result<bool> {
        if !self.pending() {
            return Ok(true);
        }
        if self.writable {
            self.pos += write_some(s, &self.queued[self.pos..], &mut self.writable)?;
        }
        if self.pending() {
            return Ok(false);
        }
        self.queued.clear();
        self.pos = 0;
        Ok(true)
    }
}

/// Writes as much of `bytes` as the socket takes; clears `writable` when it takes no more.
pub(super) fn write_some(
    s: &mut TcpStream,
    bytes: &[u8],
    writable: &mut bool,
) -> io::Result<usize> {
    let mut n = 0;
    while n < bytes.len() {
        match s.write(&bytes[n..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(w) => n += w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *writable = false;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
