//! The change feed: every applied change, numbered by a local cursor, for watchers to resume from.

use std::collections::VecDeque;

use serde::Serialize;

use crate::crdt::{Error, Key, Value};

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

/// The new state of a changed key.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub enum Change {
    /// The key holds this value now.
    Put(Value),
    /// The key no longer holds anything.
    Delete,
}

/// A bounded log of recent events.
#[derive(Clone, Debug)]
pub(crate) struct Feed {
    events: VecDeque<Event>,
    /// The cursor of the most recent event (0 before the first).
    last: u64,
    capacity: usize,
}

impl Feed {
    pub(crate) fn new(capacity: usize, last: u64) -> Self {
        Feed {
            events: VecDeque::new(),
            last,
            capacity,
        }
    }

    pub(crate) fn push(&mut self, key: Key, change: Change) {
        self.last = self.last.saturating_add(1);
        if self.capacity == 0 {
            return;
        }
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            cursor: self.last,
            key,
            change,
        });
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
        let mut feed = Feed::new(10, 0);
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
        let mut feed = Feed::new(2, 0);
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

    #[test]
    fn a_restored_feed_continues_its_numbering_and_rejects_older_cursors() {
        let mut feed = Feed::new(4, 41);
        assert_eq!(feed.since(41).unwrap().count(), 0);
        assert!(feed.since(40).is_err());
        feed.push(key("a"), Change::Delete);
        assert_eq!(feed.since(41).unwrap().next().map(|e| e.cursor), Some(42));
    }
}
