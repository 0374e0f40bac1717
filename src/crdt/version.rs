//! Version vectors and causal contexts: what a replica has seen.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::crdt::{Dot, NodeId};

/// For each node, the highest sequence number up to which every write of that node has been seen.
///
/// A replica's version vector is also the **causal token** a client carries between nodes: a node
/// whose vector [dominates](VersionVector::dominates) the token has applied every write the client
/// could have observed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector {
    /// Nodes absent from the map count as zero; zero entries are never stored, so equal vectors
    /// compare and hash equal.
    entries: BTreeMap<NodeId, u64>,
}

impl VersionVector {
    /// The vector that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many writes of `node` are covered (0 when none).
    pub fn get(&self, node: NodeId) -> u64 {
        self.entries.get(&node).copied().unwrap_or(0)
    }

    /// Whether `dot` is covered.
    pub fn contains(&self, dot: Dot) -> bool {
        dot.seq != 0 && dot.seq <= self.get(dot.node)
    }

    /// Covers `node`'s writes up to `seq` (never lowers an entry).
    pub fn raise(&mut self, node: NodeId, seq: u64) {
        if seq > 0 {
            let entry = self.entries.entry(node).or_insert(0);
            *entry = (*entry).max(seq);
        }
    }

    /// Pointwise maximum: everything either vector covers.
    pub fn join(&mut self, other: &VersionVector) {
        for (&node, &seq) in &other.entries {
            self.raise(node, seq);
        }
    }

    /// Pointwise minimum: what both vectors cover.
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let entries = self
            .entries
            .iter()
            .filter_map(|(&node, &seq)| {
                let both = seq.min(other.get(node));
                (both > 0).then_some((node, both))
            })
            .collect();
        VersionVector { entries }
    }

    /// Whether this vector covers every write `other` covers.
    pub fn dominates(&self, other: &VersionVector) -> bool {
        other
            .entries
            .iter()
            .all(|(&node, &seq)| self.get(node) >= seq)
    }

    /// The (node, seq) pairs with a non-zero entry, in node order.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, u64)> + '_ {
        self.entries.iter().map(|(&node, &seq)| (node, seq))
    }

    /// How many nodes have a non-zero entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the vector has seen nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries of `self` that exceed `base`, as a list of dots (the highest seen per node).
    pub fn exceeding(&self, base: &VersionVector) -> Vec<Dot> {
        self.iter()
            .filter(|&(node, seq)| seq > base.get(node))
            .map(|(node, seq)| Dot::new(node, seq))
            .collect()
    }
}

impl FromIterator<(NodeId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> Self {
        let mut vector = VersionVector::new();
        for (node, seq) in iter {
            vector.raise(node, seq);
        }
        vector
    }
}

/// A set of dots: a version vector plus the dots seen beyond it, out of order.
///
/// Deltas carry one to say which writes they account for: a dot in the context but absent from the
/// delta's data was removed by the delta's author. A replica's own context stays a plain vector,
/// because deltas are applied in causal order; the cloud exists for the contexts deltas carry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CausalContext {
    vector: VersionVector,
    /// Dots beyond `vector`; never contains a dot `vector` already covers.
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// The empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `dot` is in the context.
    pub fn contains(&self, dot: Dot) -> bool {
        self.vector.contains(dot) || self.cloud.contains(&dot)
    }

    /// Adds one dot, folding the cloud into the vector where it has become contiguous.
    pub fn insert(&mut self, dot: Dot) {
        if dot.seq == 0 || self.vector.contains(dot) {
            return;
        }
        if dot.seq == self.vector.get(dot.node) + 1 {
            self.vector.raise(dot.node, dot.seq);
            self.compact(dot.node);
        } else {
            self.cloud.insert(dot);
        }
    }

    /// Adds every dot of `other`.
    pub fn join(&mut self, other: &CausalContext) {
        self.vector.join(&other.vector);
        let mut nodes: BTreeSet<NodeId> = other.vector.iter().map(|(node, _)| node).collect();
        for &dot in &other.cloud {
            self.insert(dot);
            nodes.insert(dot.node);
        }
        self.cloud.retain(|dot| !self.vector.contains(*dot));
        for node in nodes {
            self.compact(node);
        }
    }

    /// The contiguous part of the context.
    pub fn vector(&self) -> &VersionVector {
        &self.vector
    }

    /// The dots seen beyond the vector.
    pub fn cloud(&self) -> impl Iterator<Item = Dot> + '_ {
        self.cloud.iter().copied()
    }

    /// Whether the context holds no dot at all.
    pub fn is_empty(&self) -> bool {
        self.vector.is_empty() && self.cloud.is_empty()
    }

    fn compact(&mut self, node: NodeId) {
        loop {
            let next = Dot::new(node, self.vector.get(node) + 1);
            if !self.cloud.remove(&next) {
                break;
            }
            self.vector.raise(node, next.seq);
        }
    }
}

impl From<VersionVector> for CausalContext {
    fn from(vector: VersionVector) -> Self {
        CausalContext {
            vector,
            cloud: BTreeSet::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(node: u64, seq: u64) -> Dot {
        Dot::new(NodeId(node), seq)
    }

    #[test]
    fn vectors_join_meet_and_dominate_pointwise() {
        let a: VersionVector = [(NodeId(1), 3), (NodeId(2), 1)].into_iter().collect();
        let b: VersionVector = [(NodeId(2), 4), (NodeId(3), 2)].into_iter().collect();
        let mut both = a.clone();
        both.join(&b);
        assert_eq!(both.get(NodeId(1)), 3);
        assert_eq!(both.get(NodeId(2)), 4);
        assert!(both.dominates(&a) && both.dominates(&b));
        assert!(!a.dominates(&b));
        let common = a.meet(&b);
        assert_eq!(common, [(NodeId(2), 1)].into_iter().collect());
        assert_eq!(b.exceeding(&a), vec![dot(2, 4), dot(3, 2)]);
    }

    #[test]
    fn zero_entries_do_not_change_equality() {
        let mut a = VersionVector::new();
        a.raise(NodeId(5), 0);
        assert_eq!(a, VersionVector::new());
        assert!(!a.contains(dot(5, 0)));
    }

    #[test]
    fn out_of_order_dots_fold_into_the_vector_once_contiguous() {
        let mut context = CausalContext::new();
        context.insert(dot(1, 3));
        context.insert(dot(1, 2));
        assert!(context.contains(dot(1, 3)));
        assert!(!context.contains(dot(1, 1)));
        assert_eq!(context.vector().get(NodeId(1)), 0);
        context.insert(dot(1, 1));
        assert_eq!(context.vector().get(NodeId(1)), 3);
        assert_eq!(context.cloud().count(), 0);
    }

    #[test]
    fn join_compacts_clouds_on_both_sides() {
        let mut a = CausalContext::new();
        a.insert(dot(1, 2));
        let mut b = CausalContext::new();
        b.insert(dot(1, 1));
        b.insert(dot(1, 4));
        a.join(&b);
        assert_eq!(a.vector().get(NodeId(1)), 2);
        assert_eq!(a.cloud().collect::<Vec<_>>(), vec![dot(1, 4)]);
    }
}
