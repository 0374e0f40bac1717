//! Hybrid logical clock values: wall-clock-like timestamps that never go backwards.

use serde::{Deserialize, Serialize};

use crate::crdt::NodeId;

/// The largest physical time an [`Hlc`] can carry: 48 bits of milliseconds (the year 10889).
pub const MAX_HLC_MILLIS: u64 = (1 << 48) - 1;

/// A hybrid logical clock timestamp: physical milliseconds, a logical counter, and the node that
/// made it, ordered in that sequence.
///
/// Mantissa uses it only to pick a deterministic winner among concurrent values; causality is
/// tracked by dots and version vectors, never by time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch, as the writer's clock (or a later one it had seen) said.
    pub millis: u64,
    /// Distinguishes events within the same millisecond.
    pub logical: u16,
    /// Breaks ties between nodes, so no two nodes ever produce equal timestamps.
    pub node: NodeId,
}

impl Hlc {
    /// Packs millis and the logical counter into one `u64` (48 + 16 bits), in timestamp order.
    pub(crate) fn packed(&self) -> u64 {
        (self.millis.min(MAX_HLC_MILLIS) << 16) | u64::from(self.logical)
    }

    /// Rebuilds a timestamp from [`Hlc::packed`] and the node that made it.
    pub(crate) fn unpack(packed: u64, node: NodeId) -> Self {
        Hlc {
            millis: packed >> 16,
            logical: (packed & 0xffff) as u16,
            node,
        }
    }
}

/// The clock state of one node: hands out strictly increasing [`Hlc`] values.
///
/// The caller supplies physical time; when it goes backwards (NTP step, VM migration) or lags a
/// timestamp seen from a peer, the clock keeps counting logically from the largest time seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HlcClock {
    node: NodeId,
    /// The packed (millis, logical) of the last timestamp issued or observed.
    last: u64,
}

impl HlcClock {
    /// A clock for `node` that has not issued anything yet.
    pub fn new(node: NodeId) -> Self {
        HlcClock { node, last: 0 }
    }

    /// The next timestamp, given the caller's physical time in milliseconds.
    pub fn tick(&mut self, now_millis: u64) -> Hlc {
        let physical = now_millis.min(MAX_HLC_MILLIS) << 16;
        // Past the last value, or one logical step after it; a full logical counter rolls into
        // the next millisecond, which keeps the order strict.
        self.last = physical.max(self.last.saturating_add(1));
        Hlc::unpack(self.last, self.node)
    }

    /// Takes a timestamp seen from a peer into account, so later local ticks order after it.
    pub fn observe(&mut self, seen: Hlc) {
        self.last = self.last.max(seen.packed());
    }

    /// The same clock, issuing timestamps for `node` from now on.
    pub(crate) fn rename(&mut self, node: NodeId) {
        self.node = node;
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        Hlc::unpack(self.last, self.node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_increasing_when_the_wall_clock_goes_backwards() {
        let mut clock = HlcClock::new(NodeId(1));
        let a = clock.tick(1_000);
        let b = clock.tick(900);
        let c = clock.tick(900);
        assert!(a < b && b < c, "{a:?} {b:?} {c:?}");
        assert_eq!(b.millis, 1_000);
        assert_eq!(c.logical, 2);
        let d = clock.tick(2_000);
        assert_eq!((d.millis, d.logical), (2_000, 0));
    }

    #[test]
    fn observe_moves_the_clock_past_a_peer_timestamp() {
        let mut clock = HlcClock::new(NodeId(1));
        clock.observe(Hlc {
            millis: 5_000,
            logical: 7,
            node: NodeId(2),
        });
        let next = clock.tick(10);
        assert_eq!((next.millis, next.logical), (5_000, 8));
    }

    #[test]
    fn a_full_logical_counter_rolls_into_the_next_millisecond() {
        let mut clock = HlcClock::new(NodeId(1));
        clock.observe(Hlc {
            millis: 7,
            logical: u16::MAX,
            node: NodeId(2),
        });
        let next = clock.tick(0);
        assert_eq!((next.millis, next.logical), (8, 0));
    }

    #[test]
    fn packing_round_trips() {
        let hlc = Hlc {
            millis: 1_764_000_000_000,
            logical: 513,
            node: NodeId(9),
        };
        assert_eq!(Hlc::unpack(hlc.packed(), hlc.node), hlc);
    }
}
