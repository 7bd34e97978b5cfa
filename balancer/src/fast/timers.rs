//! The deadlines of one event loop's sockets.

use super::*;

/// A socket's place in the timer heap: the earliest entry it has there, if any.
#[derive(Default, Clone, Copy)]
pub(super) struct TimerState {
    pub(super) armed: Option<Instant>,
}

/// Deadlines of every socket in one heap, kept lazily: moving a deadline later (what every
/// request does) changes nothing in the heap; when an entry comes due, its socket's current
/// deadline decides whether it fires or goes back in for the later time.
#[derive(Default)]
pub(super) struct Timers {
    pub(super) heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    /// Makes sure the socket at `key` (generation `gen`) is looked at by `deadline`.
    pub(super) fn arm(&mut self, t: &mut TimerState, deadline: Instant, key: usize, gen: u64) {
        if t.armed.is_none_or(|a| a > deadline) {
            t.armed = Some(deadline);
            self.heap.push(Reverse((deadline, key, gen)));
        }
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// The next entry due by `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize, u64)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }
}
