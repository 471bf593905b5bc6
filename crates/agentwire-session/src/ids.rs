//! Correlation ids a host hands out.

use std::ops::Range;

use agentwire::relay::{AGENT_RELAY_ID_RANGE_STEP, AGENT_RELAY_MAX_CLIENTS};

/// The ids a host may use: the whole space on a direct connection, or the
/// range a relay gave it. Every operation takes a fresh id (the deployed relay
/// refuses an id used before on the same connection); after the last id the
/// allocator starts over, skipping ids still in use.
///
/// ```
/// use agentwire_session::IdAllocator;
/// let mut ids = IdAllocator::new(10..13);
/// assert_eq!(ids.next(|_| false), Some(10));
/// assert_eq!(ids.next(|id| id == 11), Some(12));
/// assert_eq!(ids.next(|_| false), Some(10)); // wrapped
/// assert_eq!(ids.next(|_| true), None); // all in use
/// ```
#[derive(Clone, Debug)]
pub struct IdAllocator {
    range: Range<u32>,
    next: u32,
}

impl IdAllocator {
    /// Ids in `range`; 0 (the control id) and `0xFFFFFFFF` (the runtime's) are never given.
    pub fn new(range: Range<u32>) -> IdAllocator {
        // An exclusive end of u32::MAX already leaves the runtime's id out.
        let start = range.start.max(1);
        IdAllocator { range: start..range.end.max(start), next: start }
    }

    /// The ids of a direct connection to an agent: those of the first relay
    /// slot, so that frames captured here read like a relay client's.
    pub fn direct() -> IdAllocator {
        IdAllocator::new(1..AGENT_RELAY_ID_RANGE_STEP)
    }

    /// The range handed out.
    pub fn range(&self) -> Range<u32> {
        self.range.clone()
    }

    /// The next id that `in_use` does not claim, or `None` when every id of the range is.
    pub fn next(&mut self, in_use: impl Fn(u32) -> bool) -> Option<u32> {
        let len = self.range.end - self.range.start;
        for _ in 0..len {
            let id = self.next;
            self.next = if id + 1 >= self.range.end { self.range.start } else { id + 1 };
            if !in_use(id) {
                return Some(id);
            }
        }
        None
    }
}

/// Whether `range` is exactly the id range of one relay slot, as the deployed
/// agent requires of `core.relay.client.disconnected`.
pub fn is_relay_slot(range: &Range<u32>) -> bool {
    (0..AGENT_RELAY_MAX_CLIENTS as u32).any(|s| {
        let start = s * AGENT_RELAY_ID_RANGE_STEP;
        // A slot is [s·STEP + 1, (s+1)·STEP); a relay that names it from its
        // multiple of STEP (as agentwire's did before 0.2) is understood too.
        (range.start == start + 1 || range.start == start) && range.end == start + AGENT_RELAY_ID_RANGE_STEP
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_zero_never_the_runtime_id() {
        let mut ids = IdAllocator::new(0..u32::MAX);
        assert_eq!(ids.next(|_| false), Some(1));
        let mut top = IdAllocator::new(u32::MAX - 2..u32::MAX);
        assert_eq!(top.next(|_| false), Some(u32::MAX - 2));
        assert_eq!(top.next(|_| false), Some(u32::MAX - 1));
        assert_eq!(top.next(|_| false), Some(u32::MAX - 2));
    }

    #[test]
    fn empty_range_gives_nothing() {
        assert_eq!(IdAllocator::new(5..5).next(|_| false), None);
        assert_eq!(IdAllocator::new(0..1).next(|_| false), None);
    }

    #[test]
    fn relay_slots() {
        let step = AGENT_RELAY_ID_RANGE_STEP;
        assert!(is_relay_slot(&(0..step)));
        assert!(is_relay_slot(&(1..step)));
        assert!(is_relay_slot(&(step..2 * step)));
        assert!(is_relay_slot(&(step + 1..2 * step)));
        assert!(!is_relay_slot(&(step..2 * step - 1)));
        assert!(!is_relay_slot(&(5..10)));
    }
}
