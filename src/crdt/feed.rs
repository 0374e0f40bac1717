//! The change feed: every applied change, numbered by a local cursor, for watchers to resume from.

use std::collections::VecDeque;

use serde::Serialize;

use crate::crdt::{Error, Key, Value};

/// Bytes counted for an event besides its key and value: its cursor, its place in a queue.
const EVENT_OVERHEAD: usize = 64;

/// One change to a key, as this replica applied it (from a local write or a peer's delta).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// This replica's position in its feed: strictly increasing, starting at 1, never reused
    /// (a restored replica continues from its snapshot's cursor).
    pub cursor: u64,
    /// The key that changed.
    pub key: Key,
    /// What the key holds now.
    pub change: Change,
}

impl Event {
    /// Approximately how many bytes the event keeps alive: its key, its value, a little more.
    /// Budgets of the change feed and of watchers' queues count this.
    pub fn size(&self) -> usize {
        let value = match &self.change {
            Change::Put(value) => value_size(value),
            Change::Delete => 0,
        };
        EVENT_OVERHEAD + self.key.as_bytes().len() + value
    }
}

fn value_size(value: &Value) -> usize {
    match value {
        Value::Register(register) => {
            register.value.len()
                + register
                    .siblings
                    .iter()
                    .map(|sibling| sibling.value.len() + 16)
                    .sum::<usize>()
        }
        Value::Counter(_) => 8,
        Value::Set(elements) => elements.iter().map(|element| element.len() + 24).sum(),
        Value::Document(json) => json_size(json),
    }
}

/// Roughly the memory a JSON value holds: its strings and numbers plus a little per node.
fn json_size(json: &serde_json::Value) -> usize {
    const NODE: usize = 32;
    NODE + match json {
        serde_json::Value::String(text) => text.len(),
        serde_json::Value::Array(items) => items.iter().map(json_size).sum(),
        serde_json::Value::Object(fields) => fields
            .iter()
            .map(|(name, value)| name.len() + json_size(value))
            .sum(),
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => 0,
    }
}

/// The new state of a changed key.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub enum Change {
    /// The key holds this value now.
    Put(Value),
    /// The key no longer holds anything.
    Delete,
}

/// A log of recent events, bounded both in events and in bytes: the oldest go first. Values are
/// shared with the replica (see [`crate::crdt::Blob`]), so an event whose value is still current
/// costs little; the byte bound is what keeps overwritten large values from piling up.
#[derive(Clone, Debug)]
pub(crate) struct Feed {
    events: VecDeque<Event>,
    /// The cursor of the most recent event (0 before the first).
    last: u64,
    capacity: usize,
    /// The most bytes ([`Event::size`]) the events held may add up to; the newest event is
    /// kept even when it alone is larger.
    max_bytes: usize,
    /// What the events held add up to.
    bytes: usize,
}

impl Feed {
    pub(crate) fn new(capacity: usize, max_bytes: usize, last: u64) -> Self {
        Feed {
            events: VecDeque::new(),
            last,
            capacity,
            max_bytes,
            bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, key: Key, change: Change) {
        self.last = self.last.saturating_add(1);
        if self.capacity == 0 {
            return;
        }
        let event = Event {
            cursor: self.last,
            key,
            change,
        };
        let size = event.size();
        while !self.events.is_empty()
            && (self.events.len() >= self.capacity || self.bytes + size > self.max_bytes)
        {
            if let Some(oldest) = self.events.pop_front() {
                self.bytes -= oldest.size();
            }
        }
        self.bytes += size;
        self.events.push_back(event);
    }

    /// How many events the feed holds, and their bytes.
    pub(crate) fn usage(&self) -> (usize, usize) {
        (self.events.len(), self.bytes)
    }

    pub(crate) fn last(&self) -> u64 {
        self.last
    }

    /// Events with a cursor greater than `after`, oldest first; an error when some are gone.
    pub(crate) fn since(&self, after: u64) -> Result<impl Iterator<Item = &Event>, Error> {
        let oldest = self
            .events
            .front()
            .map_or(self.last.saturating_add(1), |event| event.cursor);
        if after.saturating_add(1) < oldest && after < self.last {
            return Err(Error::Compacted {
                requested: after,
                oldest,
            });
        }
        let skip =
            usize::try_from(after.saturating_add(1).saturating_sub(oldest)).unwrap_or(usize::MAX);
        Ok(self.events.iter().skip(skip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key::new(name).expect("valid key")
    }

    #[test]
    fn resuming_from_a_cursor_neither_skips_nor_repeats() {
        let mut feed = Feed::new(10, usize::MAX, 0);
        for name in ["a", "b", "c"] {
            feed.push(key(name), Change::Delete);
        }
        let after_one: Vec<u64> = feed.since(1).unwrap().map(|event| event.cursor).collect();
        assert_eq!(after_one, vec![2, 3]);
        assert_eq!(feed.since(3).unwrap().count(), 0);
        assert_eq!(feed.since(0).unwrap().count(), 3);
    }

    #[test]
    fn a_cursor_older_than_the_retained_window_is_an_error() {
        let mut feed = Feed::new(2, usize::MAX, 0);
        for name in ["a", "b", "c", "d"] {
            feed.push(key(name), Change::Delete);
        }
        assert_eq!(
            feed.since(1).err(),
            Some(Error::Compacted {
                requested: 1,
                oldest: 3
            })
        );
        let kept: Vec<u64> = feed.since(2).unwrap().map(|event| event.cursor).collect();
        assert_eq!(kept, vec![3, 4]);
    }

    fn put(size: usize) -> Change {
        Change::Put(Value::Register(crate::crdt::Register {
            value: vec![1; size].into(),
            written_at: crate::crdt::Hlc {
                millis: 0,
                logical: 0,
                node: crate::crdt::NodeId(1),
            },
            siblings: Vec::new(),
        }))
    }

    #[test]
    fn the_feed_holds_events_up_to_its_byte_budget_then_drops_the_oldest() {
        let event_size = Event {
            cursor: 1,
            key: key("k"),
            change: put(1000),
        }
        .size();
        // Room for exactly three such events.
        let mut feed = Feed::new(100, 3 * event_size, 0);
        for _ in 0..3 {
            feed.push(key("k"), put(1000));
        }
        assert_eq!(
            feed.usage(),
            (3, 3 * event_size),
            "filled exactly to its budget"
        );
        assert_eq!(feed.since(0).unwrap().count(), 3);

        feed.push(key("k"), put(1000));
        assert_eq!(feed.usage(), (3, 3 * event_size));
        assert_eq!(
            feed.since(0).err(),
            Some(Error::Compacted {
                requested: 0,
                oldest: 2
            }),
            "a reader behind the dropped event is told, not skipped"
        );

        // One event larger than the whole budget replaces everything, and is kept.
        feed.push(key("big"), put(10_000));
        assert_eq!(feed.usage().0, 1);
        assert_eq!(
            feed.since(4).unwrap().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![5]
        );
    }

    #[test]
    fn a_restored_feed_continues_its_numbering_and_rejects_older_cursors() {
        let mut feed = Feed::new(4, usize::MAX, 41);
        assert_eq!(feed.since(41).unwrap().count(), 0);
        assert!(feed.since(40).is_err());
        feed.push(key("a"), Change::Delete);
        assert_eq!(feed.since(41).unwrap().next().map(|e| e.cursor), Some(42));
    }
}
