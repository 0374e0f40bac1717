//! A bounded memory of recent writes, to forward them and to answer peers that ask.

use std::collections::{HashMap, VecDeque};

use crate::crdt::{Delta, Dot};

/// The last `capacity` writes seen, oldest evicted first. A write evicted before a peer asked
/// for it reaches that peer through anti-entropy instead.
pub(crate) struct RecentWrites {
    deltas: HashMap<Dot, Delta>,
    order: VecDeque<Dot>,
    capacity: usize,
}

impl RecentWrites {
    pub(crate) fn new(capacity: usize) -> Self {
        RecentWrites {
            deltas: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub(crate) fn insert(&mut self, dot: Dot, delta: Delta) {
        if self.capacity == 0 || self.deltas.insert(dot, delta).is_some() {
            return;
        }
        self.order.push_back(dot);
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.deltas.remove(&oldest);
            }
        }
    }

    pub(crate) fn get(&self, dot: Dot) -> Option<&Delta> {
        self.deltas.get(&dot)
    }
}
