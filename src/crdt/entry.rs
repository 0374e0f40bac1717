//! One key's entry: the dotted items that make up its value, their merge, and how they read.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::crdt::{Blob, CausalContext, Dot, Hlc, VersionVector};

/// The value types a key can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Kind {
    /// A multi-value register of bytes: concurrent writes are kept as siblings.
    Register,
    /// A PN-counter: the sum of every node's increments minus its decrements.
    Counter,
    /// An add-wins observed-remove set of byte strings.
    Set,
    /// A JSON document whose concurrent field edits merge as automerge merges them.
    Document,
}

impl Kind {
    /// The kind's name as users see it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Register => "register",
            Kind::Counter => "counter",
            Kind::Set => "set",
            Kind::Document => "document",
        }
    }
}

/// A piece of an entry, named by the dot of the write that created it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) dot: Dot,
    /// The writer's [`Hlc`] packed by [`Hlc::packed`]; its node is `dot.node`.
    pub(crate) time: u64,
    pub(crate) body: Body,
}

/// What an item holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Body {
    /// One register value.
    Register(Blob),
    /// One node's running totals for a counter; its next increment replaces this slot.
    Counter { up: u64, down: u64 },
    /// One observed add of a set element.
    SetElement(Blob),
    /// A saved automerge document.
    Document(Blob),
    /// Marks that a delete (or set removal) happened, so anti-entropy can tell the key changed.
    /// Collected once causally stable.
    Tombstone,
}

impl Item {
    /// The writer's timestamp.
    pub(crate) fn hlc(&self) -> Hlc {
        Hlc::unpack(self.time, self.dot.node)
    }

    /// Which value type the item belongs to (`None` for a tombstone).
    pub(crate) fn kind(&self) -> Option<Kind> {
        match self.body {
            Body::Register(_) => Some(Kind::Register),
            Body::Counter { .. } => Some(Kind::Counter),
            Body::SetElement(_) => Some(Kind::Set),
            Body::Document(_) => Some(Kind::Document),
            Body::Tombstone => None,
        }
    }

    pub(crate) fn is_tombstone(&self) -> bool {
        matches!(self.body, Body::Tombstone)
    }

    /// Bytes that tell apart items sharing one dot: one set add may add several elements.
    fn discriminant(&self) -> &[u8] {
        match &self.body {
            Body::SetElement(element) => element,
            _ => &[],
        }
    }

    /// The canonical order of items within an entry: by dot, then element.
    pub(crate) fn identity_cmp(&self, other: &Item) -> Ordering {
        self.dot
            .cmp(&other.dot)
            .then_with(|| self.discriminant().cmp(other.discriminant()))
    }

    /// The order that decides a register's winner and a key's kind: later timestamp first.
    pub(crate) fn precedence(&self) -> (u64, Dot) {
        (self.time, self.dot)
    }

    /// Approximate heap and inline bytes the item occupies, for accounting.
    pub(crate) fn size(&self) -> usize {
        let heap = match &self.body {
            Body::Register(bytes) | Body::SetElement(bytes) | Body::Document(bytes) => bytes.len(),
            Body::Counter { .. } | Body::Tombstone => 0,
        };
        size_of::<Item>() + heap
    }
}

/// The items of one key, kept sorted by [`Item::identity_cmp`] so equal states are equal values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) items: Vec<Item>,
}

impl Entry {
    /// The kind the key reads as: that of its most recent live item.
    pub(crate) fn kind(&self) -> Option<Kind> {
        self.live()
            .max_by_key(|item| item.precedence())
            .and_then(Item::kind)
    }

    /// Items that carry a value (everything but tombstones).
    pub(crate) fn live(&self) -> impl Iterator<Item = &Item> {
        self.items.iter().filter(|item| !item.is_tombstone())
    }

    /// Live items of `kind`, the only ones a read of that kind looks at.
    pub(crate) fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Item> {
        self.items
            .iter()
            .filter(move |item| item.kind() == Some(kind))
    }

    /// Live items of `kind`, in precedence order, highest first.
    pub(crate) fn ranked(&self, kind: Kind) -> Vec<&Item> {
        let mut items: Vec<&Item> = self.of_kind(kind).collect();
        items.sort_by_key(|item| std::cmp::Reverse(item.precedence()));
        items
    }

    /// Whether nothing remains, not even a tombstone.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Approximate bytes held by the entry's items.
    pub(crate) fn size(&self) -> usize {
        self.items.iter().map(Item::size).sum()
    }

    /// Merges `theirs`, which its author wrote knowing `their_context`, into this entry, which
    /// this replica holds knowing `our_context`. Returns whether the entry changed.
    ///
    /// An item survives if both sides hold it, or if the side lacking it never saw its dot; an
    /// item one side saw and dropped was removed there, by a write that observed it. This is the
    /// observed-remove rule, and it is commutative, associative and idempotent.
    pub(crate) fn merge(
        &mut self,
        our_context: &VersionVector,
        theirs: &[Item],
        their_context: &CausalContext,
    ) -> bool {
        let ours = std::mem::take(&mut self.items);
        let mut merged = Vec::with_capacity(ours.len().max(theirs.len()));
        let mut changed = false;
        let mut theirs = theirs.iter().peekable();
        for item in ours {
            while let Some(&next) = theirs.peek() {
                if next.identity_cmp(&item) != Ordering::Less {
                    break;
                }
                theirs.next();
                if !our_context.contains(next.dot) {
                    merged.push(next.clone());
                    changed = true;
                }
            }
            let in_both = theirs
                .peek()
                .is_some_and(|next| next.identity_cmp(&item) == Ordering::Equal);
            if in_both {
                theirs.next();
            }
            if in_both || !their_context.contains(item.dot) {
                merged.push(item);
            } else {
                changed = true;
            }
        }
        for next in theirs {
            if !our_context.contains(next.dot) {
                merged.push(next.clone());
                changed = true;
            }
        }
        self.items = merged;
        changed
    }
}
