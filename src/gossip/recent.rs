//! A bounded memory of recent writes, to forward them and to answer peers that ask.

use std::collections::{HashMap, VecDeque};

use crate::crdt::{Delta, Dot};

/// The most recent writes seen, bounded in count and in bytes ([`Delta::size`]), oldest evicted
/// first. A write evicted before a peer asked for it reaches that peer through anti-entropy
/// instead. The newest write is kept even when it alone is larger than the byte bound.
pub(crate) struct RecentWrites {
    deltas: HashMap<Dot, Delta>,
    order: VecDeque<Dot>,
    capacity: usize,
    max_bytes: usize,
    bytes: usize,
}

impl RecentWrites {
    pub(crate) fn new(capacity: usize, max_bytes: usize) -> Self {
        RecentWrites {
            deltas: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            max_bytes,
            bytes: 0,
        }
    }

    pub(crate) fn insert(&mut self, dot: Dot, delta: Delta) {
        if self.capacity == 0 || self.deltas.contains_key(&dot) {
            return;
        }
        let size = delta.size();
        while !self.order.is_empty()
            && (self.order.len() >= self.capacity || self.bytes + size > self.max_bytes)
        {
            if let Some(oldest) = self.order.pop_front()
                && let Some(evicted) = self.deltas.remove(&oldest)
            {
                self.bytes -= evicted.size();
            }
        }
        self.bytes += size;
        self.deltas.insert(dot, delta);
        self.order.push_back(dot);
    }

    pub(crate) fn get(&self, dot: Dot) -> Option<&Delta> {
        self.deltas.get(&dot)
    }

    /// How many writes are kept, and their bytes.
    pub(crate) fn usage(&self) -> (usize, usize) {
        (self.order.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{Key, NodeId, Replica};

    fn write(replica: &mut Replica, size: usize) -> (Dot, Delta) {
        let key = Key::new("k").expect("valid key");
        let delta = replica.put(key, vec![0; size], 1).expect("a valid write");
        (delta.dot().expect("a write delta"), delta)
    }

    #[test]
    fn holds_writes_up_to_its_byte_budget_then_evicts_the_oldest() {
        let mut replica = Replica::new(NodeId(1));
        let (first, delta) = write(&mut replica, 10_000);
        let size = delta.size();
        let mut recent = RecentWrites::new(100, 3 * size);
        recent.insert(first, delta);
        let mut dots = vec![first];
        for _ in 0..2 {
            let (dot, delta) = write(&mut replica, 10_000);
            recent.insert(dot, delta);
            dots.push(dot);
        }
        assert_eq!(
            recent.usage(),
            (3, 3 * size),
            "filled exactly to its budget"
        );
        assert!(dots.iter().all(|dot| recent.get(*dot).is_some()));

        let (fourth, delta) = write(&mut replica, 10_000);
        recent.insert(fourth, delta);
        assert_eq!(recent.usage(), (3, 3 * size));
        assert!(recent.get(first).is_none(), "the oldest went first");
        assert!(recent.get(fourth).is_some());

        // One write larger than the whole budget replaces everything and is kept.
        let (big, delta) = write(&mut replica, 100_000);
        recent.insert(big, delta);
        assert_eq!(recent.usage().0, 1);
        assert!(recent.get(big).is_some());
    }

    #[test]
    fn holds_writes_up_to_its_count() {
        let mut replica = Replica::new(NodeId(1));
        let mut recent = RecentWrites::new(2, usize::MAX);
        let dots: Vec<Dot> = (0..3)
            .map(|_| {
                let (dot, delta) = write(&mut replica, 10);
                recent.insert(dot, delta);
                dot
            })
            .collect();
        assert_eq!(recent.usage().0, 2);
        assert!(recent.get(dots[0]).is_none());
        assert!(recent.get(dots[2]).is_some());
    }
}
