//! The event loop's own upstream sockets: dialing, the idle pool, check-out and check-in.

use super::*;

/// An upstream socket.
pub(super) struct Upstream {
    pub(super) stream: TcpStream,
    pub(super) key: usize,
    pub(super) addr: SocketAddr,
    pub(super) gen: u64,
    /// [`Backend::pool_epoch`] when it was pooled.
    pub(super) epoch: u64,
    /// Pooled since (while idle).
    pub(super) since: Instant,
    pub(super) connected: bool,
    pub(super) readable: bool,
    pub(super) writable: bool,
    /// Came from the pool (it may have gone stale while idle).
    pub(super) reused: bool,
    /// The instance closed its side or the socket failed: not to be pooled.
    pub(super) eof: bool,
    /// Bytes of the request written.
    pub(super) written: usize,
    pub(super) timer: TimerState,
    /// The request's place at the instance (`--max-conns-per-instance`), while it has one.
    pub(super) place: Option<InFlight>,
}

impl Engine {
    /// A new socket to `addr`, owned by client `client`.
    pub(super) fn connect(&mut self, addr: SocketAddr, client: usize) -> io::Result<Upstream> {
        let mut stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let gen = self.gen();
        let key = self.slots.insert(Slot::Busy { client });
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.slots.remove(key);
            return Err(e);
        }
        Ok(Upstream {
            stream,
            key,
            addr,
            gen,
            epoch: 0,
            since: self.now,
            connected: false,
            readable: false,
            writable: false,
            reused: false,
            eof: false,
            written: 0,
            timer: TimerState::default(),
            place: None,
        })
    }

    /// The most recently pooled live socket to `addr`, now owned by client `client`.
    pub(super) fn checkout(
        &mut self,
        addr: SocketAddr,
        epoch: u64,
        client: usize,
    ) -> Option<Upstream> {
        let idle_timeout = self.app.config.pool_idle_timeout;
        loop {
            let key = self.pool.get_mut(&addr)?.pop()?;
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            let Slot::Idle(_) = slot else { continue };
            let Slot::Idle(mut up) = std::mem::replace(slot, Slot::Busy { client }) else {
                continue;
            };
            if up.epoch != epoch || self.now.saturating_duration_since(up.since) >= idle_timeout {
                self.close_upstream(up);
                continue;
            }
            up.reused = true;
            up.written = 0;
            // Idle, it had nothing to read (an event would have retired it), and may write.
            up.readable = false;
            up.writable = true;
            return Some(up);
        }
    }

    /// Pools a socket whose last response was read exactly to its end.
    /// `epoch` is the instance's [`Backend::pool_epoch`] now.
    pub(super) fn checkin(&mut self, mut up: Upstream, epoch: u64) {
        self.release(&mut up);
        // The last read filled its buffer, so the kernel may hold more: bytes past the end
        // of the response mean the instance is out of step, and the next request on this
        // socket would get them as its answer. An edge-triggered socket reports nothing for
        // bytes already there, so look now. (A read that did not fill its buffer drained the
        // socket; anything later arrives as an event, which retires the idle socket.)
        if up.readable && !up.eof {
            let mut probe = [0u8; 1];
            up.eof = !matches!(up.stream.read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
            up.readable = false;
        }
        let list = self.pool.entry(up.addr).or_default();
        if up.eof || list.len() >= MAX_IDLE_PER_INSTANCE {
            self.close_upstream(up);
            return;
        }
        list.push(up.key);
        up.epoch = epoch;
        up.since = self.now;
        let (key, gen) = (up.key, up.gen);
        let expires = self.now + self.app.config.pool_idle_timeout;
        // An entry that came due while the socket was busy was dropped unseen.
        if up.timer.armed.is_some_and(|a| a <= self.now) {
            up.timer.armed = None;
        }
        self.timers.arm(&mut up.timer, expires, key, gen);
        self.slots[key] = Slot::Idle(up);
    }

    /// Closes an idle socket and takes it out of the pool.
    pub(super) fn drop_idle(&mut self, key: usize) {
        if let Slot::Idle(up) = self.slots.remove(key) {
            if let Some(list) = self.pool.get_mut(&up.addr) {
                list.retain(|k| *k != key);
            }
            let mut stream = up.stream;
            let _ = self.poll.registry().deregister(&mut stream);
        }
    }

    /// Gives back the request's place at the instance, if it had one: a queued request may
    /// take it.
    fn release(&mut self, up: &mut Upstream) {
        if up.place.take().is_some() {
            self.place_freed = true;
        }
    }

    pub(super) fn close_upstream(&mut self, mut up: Upstream) {
        self.release(&mut up);
        let _ = self.poll.registry().deregister(&mut up.stream);
        if self.slots.contains(up.key) {
            self.slots.remove(up.key);
        }
    }
}
