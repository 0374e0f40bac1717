//! A local write as plain data, so a write can cross layers (client → host → node → replica)
//! without carrying code.

use crate::crdt::{Delta, Error, Key, Replica};

/// One local write to the keyspace: what a client asks of its node.
///
/// ```
/// use mantissa::crdt::{Key, NodeId, Replica, Write};
///
/// let mut replica = Replica::new(NodeId(1));
/// let key = Key::new("services/web/replicas")?;
/// let write = Write::Put { key: key.clone(), value: b"3".to_vec() };
/// let delta = write.apply_to(&mut replica, 1_700_000_000_000)?;
/// assert!(delta.is_some());
/// assert!(replica.get(&key)?.is_some());
/// # Ok::<(), mantissa::crdt::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Write {
    /// Writes a register, replacing every value the replica has seen there.
    Put {
        /// Where.
        key: Key,
        /// The new value.
        value: Vec<u8>,
    },
    /// Removes every value the replica has seen at the key.
    Delete {
        /// Where.
        key: Key,
    },
    /// Adds to (or, negative, subtracts from) a counter.
    CounterAdd {
        /// Where.
        key: Key,
        /// How much.
        amount: i64,
    },
    /// Adds elements to a set.
    SetAdd {
        /// Where.
        key: Key,
        /// The elements.
        elements: Vec<Vec<u8>>,
    },
    /// Removes elements from a set.
    SetRemove {
        /// Where.
        key: Key,
        /// The elements.
        elements: Vec<Vec<u8>>,
    },
    /// Applies an RFC 7396 JSON merge patch to a document.
    DocumentPatch {
        /// Where.
        key: Key,
        /// The patch.
        patch: serde_json::Value,
    },
}

impl Write {
    /// The key the write changes.
    pub fn key(&self) -> &Key {
        match self {
            Write::Put { key, .. }
            | Write::Delete { key }
            | Write::CounterAdd { key, .. }
            | Write::SetAdd { key, .. }
            | Write::SetRemove { key, .. }
            | Write::DocumentPatch { key, .. } => key,
        }
    }

    /// Makes the write on `replica` with the wall-clock time `now_millis`. Returns its delta, or
    /// `None` when there was nothing to change (a delete of an absent key, a removal of absent
    /// elements). On an error the replica is unchanged.
    pub fn apply_to(self, replica: &mut Replica, now_millis: u64) -> Result<Option<Delta>, Error> {
        match self {
            Write::Put { key, value } => replica.put(key, value, now_millis).map(Some),
            Write::Delete { key } => replica.delete(key, now_millis),
            Write::CounterAdd { key, amount } => {
                replica.counter_add(key, amount, now_millis).map(Some)
            }
            Write::SetAdd { key, elements } => replica.set_add(key, elements, now_millis).map(Some),
            Write::SetRemove { key, elements } => replica.set_remove(key, &elements, now_millis),
            Write::DocumentPatch { key, patch } => {
                replica.document_patch(key, &patch, now_millis).map(Some)
            }
        }
    }
}
