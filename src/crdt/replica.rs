//! The replica: one node's full copy of the keyspace, its local writes, and the merge of peers' deltas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crdt::delta::{
    MAX_DOCUMENT_LEN, MAX_VALUE_LEN, MAX_WRITE_SPAN, WriteHeader, validate_items,
};
use crate::crdt::entry::{Body, Entry, Item};
use crate::crdt::feed::Feed;
use crate::crdt::value::{counter_total, document_versions, read};
use crate::crdt::{
    Blob, CausalContext, Change, Delta, Dot, Error, Event, Hlc, HlcClock, Key, Kind, NodeId, Value,
    VersionVector, codec, document,
};

/// The format version of a replica snapshot.
pub const SNAPSHOT_FORMAT: u8 = 1;

/// The largest change-feed cursor a snapshot may carry: far beyond any real count of events, and
/// far enough below `u64::MAX` that cursors never wrap.
const MAX_FEED_CURSOR: u64 = 1 << 62;

/// Limits of a replica; [`ReplicaConfig::default`] suits most nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Events the change feed keeps for watchers to resume from, at most.
    pub feed_capacity: usize,
    /// Bytes of events ([`Event::size`]) the change feed keeps, at most: older events go first,
    /// and a watcher resuming from before them is told the feed was compacted.
    pub feed_bytes: usize,
    /// Write deltas held back while waiting for their causes, at most.
    pub buffer_deltas: usize,
    /// Bytes of held-back write deltas, at most (approximate).
    pub buffer_bytes: usize,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        ReplicaConfig {
            feed_capacity: 10_000,
            feed_bytes: 64 * 1024 * 1024,
            buffer_deltas: 65_536,
            buffer_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What [`Replica::apply`] did with a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// Merged, together with `released` held-back deltas that it made ready.
    Merged {
        /// Held-back deltas this one made ready and that were merged after it.
        released: usize,
    },
    /// Held back until its causes arrive.
    Buffered,
    /// Already covered by this replica; nothing changed.
    Duplicate,
}

/// Counts from one garbage collection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Tombstones dropped.
    pub tombstones: usize,
    /// Keys whose entry disappeared entirely.
    pub keys: usize,
}

/// A node's replica of the keyspace: a causal delta-CRDT map from [`Key`]s to typed values.
///
/// Every mutation applies locally at once and returns the [`Delta`] to send to peers; peers'
/// deltas are merged in causal order. Time comes in as `now_millis` arguments: the replica never
/// reads a clock, does no IO, and uses no randomness, so the same inputs give the same state.
///
/// ```
/// use mantissa::crdt::{Key, NodeId, Replica, Value};
/// let mut a = Replica::new(NodeId(1));
/// let mut b = Replica::new(NodeId(2));
/// let key = Key::new("config/replicas").unwrap();
/// let from_a = a.put(key.clone(), b"3".to_vec(), 1_000).unwrap();
/// let from_b = b.put(key.clone(), b"5".to_vec(), 1_001).unwrap();
/// a.apply(from_b.clone()).unwrap();
/// b.apply(from_a).unwrap();
/// // Both replicas keep both concurrent writes and agree on the winner.
/// let Some(Value::Register(register)) = a.get(&key).unwrap() else { panic!() };
/// assert_eq!(register.value, b"5");
/// assert_eq!(register.siblings.len(), 1);
/// assert_eq!(a.digest(), b.digest());
/// ```
#[derive(Debug)]
pub struct Replica {
    node: NodeId,
    clock: HlcClock,
    /// Every dot applied here; contiguous per node because deltas apply in causal order.
    version: VersionVector,
    entries: BTreeMap<Key, Entry>,
    /// Tombstones up to this vector have been collected.
    collected: VersionVector,
    /// Other nodes' writes applied since this node's last write: its next write's dependencies.
    pending_deps: VersionVector,
    /// Write deltas waiting for their causes, by dot.
    held: BTreeMap<Dot, Delta>,
    held_bytes: usize,
    feed: Feed,
    config: ReplicaConfig,
}

/// A register's winning value, borrowed from the replica that holds it
/// ([`Replica::registers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegisterRef<'a> {
    /// The write that made it: one write gives a key one value, so the same dot means the same
    /// value.
    pub dot: Dot,
    /// The value.
    pub value: &'a [u8],
}

/// The serialized form of a [`Replica`].
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    node: NodeId,
    clock: HlcClock,
    version: VersionVector,
    collected: VersionVector,
    feed_cursor: u64,
    entries: Vec<(Key, Entry)>,
}

impl Replica {
    /// An empty replica for `node`, with default limits.
    pub fn new(node: NodeId) -> Self {
        Self::with_config(node, ReplicaConfig::default())
    }

    /// An empty replica for `node`.
    pub fn with_config(node: NodeId, config: ReplicaConfig) -> Self {
        Replica {
            node,
            clock: HlcClock::new(node),
            version: VersionVector::new(),
            entries: BTreeMap::new(),
            collected: VersionVector::new(),
            pending_deps: VersionVector::new(),
            held: BTreeMap::new(),
            held_bytes: 0,
            feed: Feed::new(config.feed_capacity, config.feed_bytes, 0),
            config,
        }
    }

    /// The node whose writes this replica makes.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Every write applied here. Also the causal token of a read: see [`Replica::covers`].
    pub fn version(&self) -> &VersionVector {
        &self.version
    }

    /// Whether every write `token` names has been applied here.
    pub fn covers(&self, token: &VersionVector) -> bool {
        self.version.dominates(token)
    }

    /// Tombstones up to this vector have been collected.
    pub fn collected(&self) -> &VersionVector {
        &self.collected
    }

    /// The last timestamp this replica issued or saw.
    pub fn clock(&self) -> Hlc {
        self.clock.last()
    }

    // ---- reads ----

    /// The value of `key`, or `None` when it holds nothing.
    pub fn get(&self, key: &Key) -> Result<Option<Value>, Error> {
        self.entries.get(key).map_or(Ok(None), read)
    }

    /// Up to `limit` keys starting with `prefix` that hold a value, in key order.
    pub fn range(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Key, Value)>, Error> {
        self.range_after(prefix, None, limit)
    }

    /// Like [`Replica::range`], starting after `after` (for paging through a large prefix).
    pub fn range_after(
        &self,
        prefix: &[u8],
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Vec<(Key, Value)>, Error> {
        use std::ops::Bound;
        let start = match after {
            Some(key) if key.as_bytes() >= prefix => Bound::Excluded(key.as_bytes()),
            _ => Bound::Included(prefix),
        };
        let mut found = Vec::new();
        for (key, entry) in self.entries.range::<[u8], _>((start, Bound::Unbounded)) {
            if found.len() >= limit || !key.as_bytes().starts_with(prefix) {
                break;
            }
            if let Some(value) = read(entry)? {
                found.push((key.clone(), value));
            }
        }
        Ok(found)
    }

    /// The keys starting with `prefix` that hold a value, in key order, each with its register's
    /// winning value borrowed in place: what [`Replica::get`] reads as `Register::value`, without
    /// copying it. `None` for a key that holds another type.
    ///
    /// The winner's dot names the write that made it, and one write gives a key one value, so a
    /// reader that remembers the dot can tell whether the value changed without reading it.
    pub fn registers<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a Key, Option<RegisterRef<'a>>)> + 'a {
        use std::ops::Bound;
        self.entries
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(key, _)| key.as_bytes().starts_with(prefix))
            .filter_map(|(key, entry)| {
                let kind = entry.kind()?;
                if kind != Kind::Register {
                    return Some((key, None));
                }
                let winner = entry
                    .of_kind(Kind::Register)
                    .max_by_key(|item| item.precedence())?;
                let Body::Register(value) = &winner.body else {
                    return Some((key, None));
                };
                Some((
                    key,
                    Some(RegisterRef {
                        dot: winner.dot,
                        value,
                    }),
                ))
            })
    }

    /// How many keys hold a value.
    pub fn len(&self) -> usize {
        self.entries
            .values()
            .filter(|entry| entry.kind().is_some())
            .count()
    }

    /// Whether no key holds a value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tombstones currently kept (collected once causally stable).
    pub fn tombstones(&self) -> usize {
        self.entries
            .values()
            .flat_map(|entry| &entry.items)
            .filter(|item| item.is_tombstone())
            .count()
    }

    /// Whether the write `dot` has been applied here or is held back waiting for its causes.
    pub fn knows(&self, dot: Dot) -> bool {
        self.version.contains(dot) || self.held.contains_key(&dot)
    }

    /// Write deltas currently held back waiting for their causes.
    pub fn held_back(&self) -> usize {
        self.held.len()
    }

    /// Approximate bytes of keys and items held.
    pub fn size(&self) -> usize {
        self.entries
            .iter()
            .map(|(key, entry)| key.as_bytes().len() + entry.size())
            .sum()
    }

    /// A hash of the replicated state (version vector and every entry). Replicas that applied the
    /// same writes and collected the same tombstones have equal digests, on any platform.
    pub fn digest(&self) -> u64 {
        let hasher = postcard::to_io(&(&self.version, &self.entries), codec::Fnv::new())
            .expect("hashing never fails");
        hasher.finish()
    }

    // ---- the change feed ----

    /// The cursor of the most recent change event (0 before any).
    pub fn cursor(&self) -> u64 {
        self.feed.last()
    }

    /// The limits the replica was made with.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Bytes of write deltas held back waiting for their causes ([`Delta::size`]).
    pub fn held_back_bytes(&self) -> usize {
        self.held_bytes
    }

    /// How many events the change feed holds, and their bytes ([`Event::size`]).
    pub fn feed_usage(&self) -> (usize, usize) {
        self.feed.usage()
    }

    /// Change events after `cursor`, oldest first; [`Error::Compacted`] when the feed no longer
    /// holds all of them.
    pub fn events_since(&self, cursor: u64) -> Result<impl Iterator<Item = &Event>, Error> {
        self.feed.since(cursor)
    }

    // ---- local writes ----

    /// Writes `value` to the register at `key`, replacing every value this replica has seen there.
    pub fn put(&mut self, key: Key, value: Vec<u8>, now_millis: u64) -> Result<Delta, Error> {
        check_len("value", value.len(), MAX_VALUE_LEN)?;
        self.write(key, Some(Kind::Register), now_millis, |entry, _| {
            let observed = entry.items.iter().map(|item| item.dot).collect();
            Ok((vec![Body::Register(Blob::from(value))], observed))
        })
    }

    /// Deletes `key`: removes every value this replica has seen there. A concurrent write that this
    /// replica had not seen survives. Returns `None` when the key held nothing.
    pub fn delete(&mut self, key: Key, now_millis: u64) -> Result<Option<Delta>, Error> {
        if self.entries.get(&key).and_then(Entry::kind).is_none() {
            return Ok(None);
        }
        let delta = self.write(key, None, now_millis, |entry, _| {
            let observed = entry.items.iter().map(|item| item.dot).collect();
            Ok((vec![Body::Tombstone], observed))
        })?;
        Ok(Some(delta))
    }

    /// Adds `amount` (negative to subtract) to the counter at `key`, creating it at zero.
    ///
    /// [`Error::CounterOverflow`] when the counter as this replica sees it would leave the range
    /// of an `i64` (or this replica's own running total of additions would): the write is
    /// refused rather than clamped, so an acknowledged addition is never silently dropped.
    /// Concurrent additions at other replicas can still carry the merged total past the range;
    /// reads then clamp it to `i64::MIN..=i64::MAX`.
    pub fn counter_add(&mut self, key: Key, amount: i64, now_millis: u64) -> Result<Delta, Error> {
        let node = self.node;
        let name = key.to_string();
        self.write(key, Some(Kind::Counter), now_millis, |entry, _| {
            let total = counter_total(entry);
            let overflow = || Error::CounterOverflow {
                key: name.clone(),
                value: total.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
                amount,
            };
            if i64::try_from(total + i128::from(amount)).is_err() {
                return Err(overflow());
            }
            let own = entry
                .of_kind(Kind::Counter)
                .find(|item| item.dot.node == node);
            let (mut up, mut down, observed) = match own {
                Some(Item {
                    dot,
                    body: Body::Counter { up, down },
                    ..
                }) => (*up, *down, vec![*dot]),
                _ => (0, 0, Vec::new()),
            };
            // Each side is a running total that only grows; past i64::MAX it would no longer
            // round-trip through a read, so the addition is refused like an overflowing total.
            let limit = i64::MAX as u64;
            let side = if amount >= 0 { &mut up } else { &mut down };
            *side = side
                .checked_add(amount.unsigned_abs())
                .filter(|sum| *sum <= limit)
                .ok_or_else(overflow)?;
            Ok((vec![Body::Counter { up, down }], observed))
        })
    }

    /// Adds `elements` to the set at `key`, creating it. An add concurrent with a remove wins.
    pub fn set_add(
        &mut self,
        key: Key,
        elements: Vec<Vec<u8>>,
        now_millis: u64,
    ) -> Result<Delta, Error> {
        if elements.is_empty() {
            return Err(Error::NothingToWrite);
        }
        check_len(
            "set add (elements)",
            elements.len(),
            MAX_WRITE_SPAN as usize,
        )?;
        for element in &elements {
            check_len("set element", element.len(), MAX_VALUE_LEN)?;
        }
        self.write(key, Some(Kind::Set), now_millis, |entry, _| {
            let mut elements = elements;
            elements.sort();
            elements.dedup();
            let observed = entry
                .of_kind(Kind::Set)
                .filter(|item| matches!(&item.body, Body::SetElement(e) if elements.binary_search_by(|x| x[..].cmp(e)).is_ok()))
                .map(|item| item.dot)
                .collect();
            let bodies = elements
                .into_iter()
                .map(|element| Body::SetElement(Blob::from(element)))
                .collect();
            Ok((bodies, observed))
        })
    }

    /// Removes `elements` from the set at `key` (the adds this replica has seen). Returns `None`
    /// when none of them is in the set.
    pub fn set_remove(
        &mut self,
        key: Key,
        elements: &[Vec<u8>],
        now_millis: u64,
    ) -> Result<Option<Delta>, Error> {
        let Some(entry) = self.entries.get(&key) else {
            return Ok(None);
        };
        check_kind(&key, entry, Kind::Set)?;
        let present = |item: &Item| matches!(&item.body, Body::SetElement(e) if elements.iter().any(|x| x[..] == e[..]));
        if !entry.of_kind(Kind::Set).any(present) {
            return Ok(None);
        }
        let delta = self.write(key, Some(Kind::Set), now_millis, |entry, _| {
            // Earlier tombstones are observed too: the new one marks the key as changed for them.
            let observed = entry
                .items
                .iter()
                .filter(|item| item.is_tombstone() || present(item))
                .map(|item| item.dot)
                .collect();
            Ok((vec![Body::Tombstone], observed))
        })?;
        Ok(Some(delta))
    }

    /// Applies an RFC 7396 JSON merge patch to the document at `key`, creating it. Concurrent
    /// patches to different fields both take effect; to one field, automerge picks one winner.
    pub fn document_patch(
        &mut self,
        key: Key,
        patch: &serde_json::Value,
        now_millis: u64,
    ) -> Result<Delta, Error> {
        self.write(key, Some(Kind::Document), now_millis, |entry, dot| {
            // Each edit writes as its own automerge actor, so a re-created document can never
            // reuse an (actor, sequence) pair an older copy of it already holds.
            let mut actor = dot.node.0.to_be_bytes().to_vec();
            actor.extend_from_slice(&dot.seq.to_be_bytes());
            let saved = document::apply_merge_patch(&document_versions(entry), &actor, patch)?;
            check_len("document", saved.len(), MAX_DOCUMENT_LEN)?;
            let observed = entry
                .items
                .iter()
                .filter(|item| item.is_tombstone() || item.kind() == Some(Kind::Document))
                .map(|item| item.dot)
                .collect();
            Ok((vec![Body::Document(Blob::from(saved))], observed))
        })
    }

    /// Makes one local write: `build` sees the key's entry and the new dot and returns the new
    /// items' bodies and the dots the write observed (and so removes).
    fn write(
        &mut self,
        key: Key,
        kind: Option<Kind>,
        now_millis: u64,
        build: impl FnOnce(&Entry, Dot) -> Result<(Vec<Body>, Vec<Dot>), Error>,
    ) -> Result<Delta, Error> {
        // One lookup serves the whole write: build, merge and change event.
        let entry = self.entries.entry(key.clone()).or_default();
        let dot = Dot::new(self.node, self.version.get(self.node) + 1);
        let built = match kind {
            Some(kind) => check_kind(&key, entry, kind).and_then(|()| build(entry, dot)),
            None => build(entry, dot),
        };
        let built = match built {
            Ok((bodies, _)) if bodies.is_empty() => Err(Error::NothingToWrite),
            other => other,
        };
        let (bodies, observed) = match built {
            Ok(built) => built,
            Err(err) => {
                if entry.is_empty() {
                    self.entries.remove(&key);
                }
                return Err(err);
            }
        };
        let time = self.clock.tick(now_millis).packed();
        // Every item gets a dot of its own, so each can be removed on its own later.
        let mut items: Vec<Item> = bodies
            .into_iter()
            .zip(dot.seq..)
            .map(|(body, seq)| Item {
                dot: Dot::new(self.node, seq),
                time,
                body,
            })
            .collect();
        items.sort_by(Item::identity_cmp);
        let span = items.len() as u64;
        let mut context = CausalContext::new();
        for item in &items {
            context.insert(item.dot);
        }
        for seen in observed {
            context.insert(seen);
        }
        let was_live = entry.kind().is_some();
        entry.merge(&self.version, &items, &context);
        let change = change_of(entry, was_live);
        if entry.is_empty() {
            self.entries.remove(&key);
        }
        if let Some(change) = change {
            self.feed.push(key.clone(), change);
        }
        self.version.raise(self.node, dot.seq + (span - 1));
        let deps = std::mem::take(&mut self.pending_deps)
            .iter()
            .filter(|&(node, _)| node != self.node)
            .map(|(node, seq)| Dot::new(node, seq))
            .collect();
        Ok(Delta {
            write: Some(WriteHeader { dot, span, deps }),
            context,
            full: false,
            collected: VersionVector::new(),
            entries: vec![(key, items)],
        })
    }

    // ---- remote deltas ----

    /// Merges a peer's delta. A write delta whose causes have not all been applied is held back
    /// and merged as soon as they are; merging is idempotent, so duplicates are harmless.
    ///
    /// Errors leave the replica unchanged: [`Error::Invalid`] for a delta that breaks the format's
    /// invariants, [`Error::BufferFull`] when it would have to be held back and there is no room.
    pub fn apply(&mut self, delta: Delta) -> Result<Applied, Error> {
        delta.validate()?;
        let Some(header) = &delta.write else {
            self.merge_sync(&delta);
            let released = self.release_held();
            return Ok(Applied::Merged { released });
        };
        if self.version.contains(header.dot) {
            return Ok(Applied::Duplicate);
        }
        if !self.is_ready(&delta) {
            if self.held.contains_key(&header.dot) {
                return Ok(Applied::Buffered);
            }
            let bytes = delta.size();
            if self.held.len() >= self.config.buffer_deltas
                || self.held_bytes + bytes > self.config.buffer_bytes
            {
                return Err(Error::BufferFull {
                    deltas: self.held.len(),
                    bytes: self.held_bytes,
                });
            }
            self.held_bytes += bytes;
            self.held.insert(header.dot, delta);
            return Ok(Applied::Buffered);
        }
        self.merge_write(&delta);
        let released = self.release_held();
        Ok(Applied::Merged { released })
    }

    /// Whether every cause of a (not yet applied) write delta has been applied here.
    fn is_ready(&self, delta: &Delta) -> bool {
        let Some(header) = &delta.write else {
            return true;
        };
        let dot = header.dot;
        let last = dot.seq + (header.span - 1);
        let own = |seen: Dot| seen.node == dot.node && (dot.seq..=last).contains(&seen.seq);
        let caused_by = |seen: Dot| own(seen) || self.version.contains(seen);
        self.version.get(dot.node) + 1 == dot.seq
            && header.deps.iter().all(|&dep| self.version.contains(dep))
            && delta.context.cloud().all(caused_by)
            && delta.context.vector().iter().all(|(node, seq)| {
                let limit = if node == dot.node {
                    last
                } else {
                    self.version.get(node)
                };
                seq <= limit
            })
    }

    /// Merges a peer's ready write delta.
    fn merge_write(&mut self, delta: &Delta) {
        let header = delta
            .write
            .as_ref()
            .expect("merge_write is only called with write deltas");
        // The write's last dot: raising the vector to it covers the whole write.
        let dot = Dot::new(header.dot.node, header.dot.seq + (header.span - 1));
        for (key, items) in &delta.entries {
            self.merge_entry(key, items, &delta.context);
            for item in items {
                self.clock.observe(item.hlc());
            }
        }
        self.version.raise(dot.node, dot.seq);
        if dot.node != self.node {
            self.pending_deps.raise(dot.node, dot.seq);
        }
    }

    /// Merges a sync delta: collect what its author collected, merge its entries, and cover its
    /// whole context.
    fn merge_sync(&mut self, delta: &Delta) {
        self.collect_garbage(&delta.collected);
        let mut theirs = delta.entries.iter().peekable();
        if delta.full {
            // Keys absent from a full delta are absent at its author: merge them against nothing.
            let ours: Vec<Key> = self.entries.keys().cloned().collect();
            for key in ours {
                while theirs.next_if(|(next, _)| *next < key).is_some() {}
                if theirs.peek().is_none_or(|(next, _)| *next != key) {
                    self.merge_entry(&key, &[], &delta.context);
                }
            }
        }
        for (key, items) in &delta.entries {
            self.merge_entry(key, items, &delta.context);
            for item in items {
                self.clock.observe(item.hlc());
            }
        }
        for (node, seq) in delta.context.vector().iter() {
            if node != self.node && seq > self.version.get(node) {
                self.pending_deps.raise(node, seq);
            }
        }
        self.version.join(delta.context.vector());
    }

    /// Merges one key's items and records a change event when the key's value changed.
    fn merge_entry(&mut self, key: &Key, items: &[Item], context: &CausalContext) {
        let entry = self.entries.entry(key.clone()).or_default();
        let was_live = entry.kind().is_some();
        if !entry.merge(&self.version, items, context) {
            if entry.is_empty() {
                self.entries.remove(key);
            }
            return;
        }
        let change = change_of(entry, was_live);
        if entry.is_empty() {
            self.entries.remove(key);
        }
        if let Some(change) = change {
            self.feed.push(key.clone(), change);
        }
    }

    /// Merges every held-back delta that has become ready, and drops those made redundant.
    fn release_held(&mut self) -> usize {
        let mut released = 0;
        // Each origin's writes apply in order, so only its next one can be ready: look at that
        // one per origin, and go round again while anything was released.
        loop {
            let mut progress = false;
            for node in self.held_origins() {
                let covered = self.version.get(node);
                let stale: Vec<Dot> = self
                    .held
                    .range(Dot::new(node, 0)..=Dot::new(node, covered))
                    .map(|(dot, _)| *dot)
                    .collect();
                for dot in stale {
                    self.take_held(dot);
                }
                let next = Dot::new(node, covered + 1);
                if self
                    .held
                    .get(&next)
                    .is_some_and(|delta| self.is_ready(delta))
                    && let Some(delta) = self.take_held(next)
                {
                    self.merge_write(&delta);
                    released += 1;
                    progress = true;
                }
            }
            if !progress {
                return released;
            }
        }
    }

    /// The nodes with held-back writes, each once.
    fn held_origins(&self) -> Vec<NodeId> {
        let mut origins = Vec::new();
        let mut from = Dot::new(NodeId(0), 0);
        while let Some((dot, _)) = self.held.range(from..).next() {
            origins.push(dot.node);
            let Some(next) = dot.node.0.checked_add(1) else {
                break;
            };
            from = Dot::new(NodeId(next), 0);
        }
        origins
    }

    fn take_held(&mut self, dot: Dot) -> Option<Delta> {
        let delta = self.held.remove(&dot)?;
        self.held_bytes = self.held_bytes.saturating_sub(delta.size());
        Some(delta)
    }

    // ---- anti-entropy and garbage collection ----

    /// Everything a peer whose version vector is `theirs` lacks, as one sync delta.
    ///
    /// Keys changed since `theirs` are sent whole. When the peer is missing writes whose tombstones
    /// this replica has already collected, the delta is this replica's full state instead.
    pub fn delta_since(&self, theirs: &VersionVector) -> Delta {
        let full = !theirs.dominates(&self.collected);
        let entries = self
            .entries
            .iter()
            .filter(|(_, entry)| full || entry.items.iter().any(|item| !theirs.contains(item.dot)))
            .map(|(key, entry)| (key.clone(), entry.items.clone()))
            .collect();
        Delta {
            write: None,
            context: CausalContext::from(self.version.clone()),
            full,
            collected: self.collected.clone(),
            entries,
        }
    }

    /// The whole state as a sync delta: what a new or far-behind peer bootstraps from.
    pub fn full_delta(&self) -> Delta {
        let mut delta = self.delta_since(&VersionVector::new());
        delta.full = true;
        delta
    }

    /// Drops tombstones that `stable` covers (clamped to what this replica has applied).
    ///
    /// `stable` should be the causally stable vector: the pointwise minimum of every live member's
    /// version vector. Collection never changes what a read returns; it only decides whether a
    /// peer can still be caught up key by key or needs [`Replica::full_delta`].
    pub fn collect_garbage(&mut self, stable: &VersionVector) -> Collected {
        let floor = stable.meet(&self.version);
        if self.collected.dominates(&floor) {
            return Collected::default();
        }
        self.collected.join(&floor);
        let collected = &self.collected;
        let mut counts = Collected::default();
        self.entries.retain(|_, entry| {
            let before = entry.items.len();
            entry
                .items
                .retain(|item| !(item.is_tombstone() && collected.contains(item.dot)));
            counts.tombstones += before - entry.items.len();
            let keep = !entry.is_empty();
            counts.keys += usize::from(!keep);
            keep
        });
        counts
    }

    // ---- snapshots ----

    /// The whole replica as bytes (a format version byte, then postcard), for persistence.
    /// Held-back deltas are not included: anti-entropy delivers them again.
    pub fn snapshot(&self) -> Vec<u8> {
        codec::encode(
            SNAPSHOT_FORMAT,
            &SnapshotBody {
                node: self.node,
                clock: self.clock.clone(),
                version: self.version.clone(),
                collected: self.collected.clone(),
                feed_cursor: self.feed.last(),
                entries: self
                    .entries
                    .iter()
                    .map(|(key, entry)| (key.clone(), entry.clone()))
                    .collect(),
            },
        )
    }

    /// Continues this replica under a new node id, for a process that restarts from saved state.
    ///
    /// The old id's writes stay as they are (they are now another node's writes that the next
    /// local write depends on); new writes are dots of `node`. A process that may have issued
    /// writes it did not save must never write under the old id again, or two different writes
    /// could share a dot. Fails with [`Error::Invalid`] when `node` has already written here.
    pub fn reincarnate(&mut self, node: NodeId) -> Result<(), Error> {
        if self.version.get(node) > 0 {
            return Err(Error::Invalid {
                what: "node id",
                reason: format!("{node} has already written to this replica"),
            });
        }
        self.node = node;
        self.clock.rename(node);
        self.pending_deps = self.version.clone();
        Ok(())
    }

    /// Moves the change feed's cursor `by` positions forward and forgets the events it holds.
    ///
    /// A restarted process calls this after its recovery, so cursors a watcher got from the
    /// previous process — which may have numbered changes it never saved — are reported as
    /// compacted instead of silently skipping new events.
    pub fn skip_cursor(&mut self, by: u64) {
        let last = self.feed.last().saturating_add(by).min(MAX_FEED_CURSOR);
        self.feed = Feed::new(self.config.feed_capacity, self.config.feed_bytes, last);
    }

    /// Rebuilds a replica from [`Replica::snapshot`] bytes, validating everything. Never panics;
    /// allocates in proportion to `bytes.len()`.
    pub fn restore(bytes: &[u8], config: ReplicaConfig) -> Result<Replica, Error> {
        let body: SnapshotBody = codec::decode("snapshot", SNAPSHOT_FORMAT, bytes)?;
        let invalid = |reason: String| Error::Invalid {
            what: "snapshot",
            reason,
        };
        if body.feed_cursor > MAX_FEED_CURSOR {
            return Err(invalid(format!(
                "feed cursor {} out of range",
                body.feed_cursor
            )));
        }
        if !body.version.dominates(&body.collected) {
            return Err(invalid("collected beyond the version vector".into()));
        }
        let context = CausalContext::from(body.version.clone());
        let mut entries = BTreeMap::new();
        for (key, entry) in body.entries {
            validate_items(&entry.items, &context)
                .map_err(|reason| invalid(format!("key {key:?}: {reason}")))?;
            if entry.is_empty() {
                return Err(invalid(format!("key {key:?} has an empty entry")));
            }
            if entries.insert(key.clone(), entry).is_some() {
                return Err(invalid(format!("key {key:?} appears twice")));
            }
        }
        let mut clock = body.clock;
        for item in entries.values().flat_map(|entry| &entry.items) {
            clock.observe(item.hlc());
        }
        // The dependencies accumulated since the last write were not saved: depend on
        // everything, once, which is always safe.
        let pending_deps = body
            .version
            .iter()
            .filter(|&(node, _)| node != body.node)
            .collect();
        Ok(Replica {
            node: body.node,
            clock,
            version: body.version,
            entries,
            collected: body.collected,
            pending_deps,
            held: BTreeMap::new(),
            held_bytes: 0,
            feed: Feed::new(config.feed_capacity, config.feed_bytes, body.feed_cursor),
            config,
        })
    }
}

/// The change event a merge that changed `entry` produces, if its value changed visibly.
fn change_of(entry: &Entry, was_live: bool) -> Option<Change> {
    match read(entry) {
        Ok(Some(value)) => Some(Change::Put(value)),
        Ok(None) => was_live.then_some(Change::Delete),
        // A document whose versions cannot be merged still changed; watchers read it and get
        // the error themselves. Validation on decode makes this unreachable in practice.
        Err(_) => None,
    }
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), Error> {
    if len > max {
        return Err(Error::TooLarge { what, len, max });
    }
    Ok(())
}

fn check_kind(key: &Key, entry: &Entry, expected: Kind) -> Result<(), Error> {
    match entry.kind() {
        Some(found) if found != expected => Err(Error::WrongType {
            key: key.to_string(),
            expected,
            found,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key::new(name).expect("valid key")
    }

    fn register(replica: &Replica, name: &str) -> Option<Vec<u8>> {
        match replica.get(&key(name)).expect("readable") {
            Some(Value::Register(register)) => Some(register.value.to_vec()),
            Some(other) => panic!("{name} holds {other:?}"),
            None => None,
        }
    }

    #[test]
    fn a_counter_addition_past_the_range_is_refused_not_clamped() {
        let mut replica = Replica::new(NodeId(1));
        replica.counter_add(key("c"), i64::MAX, 1).unwrap();
        let err = replica.counter_add(key("c"), 1, 2).unwrap_err();
        assert!(matches!(
            err,
            Error::CounterOverflow {
                value: i64::MAX,
                amount: 1,
                ..
            }
        ));
        assert_eq!(
            replica.version().get(NodeId(1)),
            1,
            "a refused addition uses no dot"
        );
        replica.counter_add(key("c"), -i64::MAX, 3).unwrap();
        assert_eq!(replica.get(&key("c")).unwrap(), Some(Value::Counter(0)));
        // The running total of additions is at its limit even though the value is 0.
        let err = replica.counter_add(key("c"), 1, 4).unwrap_err();
        assert!(matches!(err, Error::CounterOverflow { value: 0, .. }));
        let mut fresh = Replica::new(NodeId(2));
        assert!(fresh.counter_add(key("d"), i64::MIN, 1).is_err());
        assert_eq!(fresh.get(&key("d")).unwrap(), None);
    }

    #[test]
    fn writing_another_type_over_a_key_is_an_error_until_it_is_deleted() {
        let mut replica = Replica::new(NodeId(1));
        replica.counter_add(key("k"), 1, 10).unwrap();
        let err = replica.put(key("k"), b"x".to_vec(), 11).unwrap_err();
        assert!(matches!(
            err,
            Error::WrongType {
                expected: Kind::Register,
                found: Kind::Counter,
                ..
            }
        ));
        assert_eq!(
            replica.version().get(NodeId(1)),
            1,
            "a failed write uses no dot"
        );
        replica
            .delete(key("k"), 12)
            .unwrap()
            .expect("the key held a value");
        replica.put(key("k"), b"x".to_vec(), 13).unwrap();
        assert_eq!(register(&replica, "k"), Some(b"x".to_vec()));
    }

    #[test]
    fn deleting_an_absent_key_writes_nothing() {
        let mut replica = Replica::new(NodeId(1));
        assert!(replica.delete(key("nope"), 1).unwrap().is_none());
        assert!(replica.version().is_empty());
        assert_eq!(replica.cursor(), 0);
    }

    #[test]
    fn concurrent_writes_of_different_types_converge_to_the_most_recent_type() {
        let mut a = Replica::new(NodeId(1));
        let mut b = Replica::new(NodeId(2));
        let from_a = a.counter_add(key("k"), 5, 100).unwrap();
        let from_b = b.put(key("k"), b"text".to_vec(), 200).unwrap();
        a.apply(from_b).unwrap();
        b.apply(from_a).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_eq!(register(&a, "k"), Some(b"text".to_vec()));
        assert_eq!(register(&b, "k"), Some(b"text".to_vec()));
    }

    #[test]
    fn removing_every_element_leaves_the_set_absent() {
        let mut replica = Replica::new(NodeId(1));
        replica
            .set_add(key("s"), vec![b"a".to_vec(), b"b".to_vec()], 1)
            .unwrap();
        replica
            .set_remove(key("s"), &[b"a".to_vec(), b"b".to_vec()], 2)
            .unwrap()
            .expect("elements were present");
        assert_eq!(replica.get(&key("s")).unwrap(), None);
        assert!(
            replica
                .set_remove(key("s"), &[b"a".to_vec()], 3)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_full_hold_back_buffer_refuses_and_changes_nothing() {
        let mut a = Replica::new(NodeId(1));
        let config = ReplicaConfig {
            buffer_deltas: 1,
            ..ReplicaConfig::default()
        };
        let mut b = Replica::with_config(NodeId(2), config);
        let first = a.put(key("x"), b"1".to_vec(), 1).unwrap();
        let second = a.put(key("y"), b"2".to_vec(), 2).unwrap();
        let third = a.put(key("z"), b"3".to_vec(), 3).unwrap();
        assert_eq!(b.apply(second).unwrap(), Applied::Buffered);
        assert!(matches!(
            b.apply(third.clone()),
            Err(Error::BufferFull { .. })
        ));
        assert_eq!(b.held_back(), 1);
        assert_eq!(b.apply(first).unwrap(), Applied::Merged { released: 1 });
        assert_eq!(b.apply(third).unwrap(), Applied::Merged { released: 0 });
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_delta_whose_items_lie_outside_its_context_is_rejected() {
        let mut a = Replica::new(NodeId(1));
        let mut delta = a.put(key("k"), b"v".to_vec(), 1).unwrap();
        delta.entries[0].1[0].dot = Dot::new(NodeId(9), 4);
        let mut b = Replica::new(NodeId(2));
        assert!(matches!(b.apply(delta.clone()), Err(Error::Invalid { .. })));
        assert!(Delta::decode(&delta.encode()).is_err());
        assert_eq!(b.digest(), Replica::new(NodeId(2)).digest());
    }

    #[test]
    fn concurrent_document_patches_to_different_fields_both_apply() {
        let mut a = Replica::new(NodeId(1));
        let mut b = Replica::new(NodeId(2));
        let created = a
            .document_patch(
                key("job"),
                &serde_json::json!({"name": "web", "count": 1}),
                1,
            )
            .unwrap();
        b.apply(created).unwrap();
        let from_a = a
            .document_patch(key("job"), &serde_json::json!({"count": 3}), 2)
            .unwrap();
        let from_b = b
            .document_patch(key("job"), &serde_json::json!({"image": "nginx"}), 2)
            .unwrap();
        a.apply(from_b).unwrap();
        b.apply(from_a).unwrap();
        let expected = serde_json::json!({"name": "web", "count": 3, "image": "nginx"});
        assert_eq!(
            a.get(&key("job")).unwrap(),
            Some(Value::Document(expected.clone()))
        );
        assert_eq!(b.get(&key("job")).unwrap(), Some(Value::Document(expected)));
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_delete_concurrent_with_an_increment_keeps_the_incrementing_node_total() {
        let mut a = Replica::new(NodeId(1));
        let mut b = Replica::new(NodeId(2));
        let first = a.counter_add(key("c"), 5, 1).unwrap();
        b.apply(first).unwrap();
        let deleted = b.delete(key("c"), 2).unwrap().expect("counter present");
        let incremented = a.counter_add(key("c"), 1, 2).unwrap();
        a.apply(deleted).unwrap();
        b.apply(incremented).unwrap();
        // Documented semantics: the increment wins, carrying node 1's running total.
        assert_eq!(a.get(&key("c")).unwrap(), Some(Value::Counter(6)));
        assert_eq!(a.digest(), b.digest());
    }

    #[test]
    fn a_reincarnated_replica_writes_new_dots_that_depend_on_the_old_ones() {
        let mut old = Replica::new(NodeId(1));
        old.put(key("a"), b"1".to_vec(), 1).expect("put");
        let mut restored =
            Replica::restore(&old.snapshot(), ReplicaConfig::default()).expect("restore");
        assert!(
            restored.reincarnate(NodeId(1)).is_err(),
            "an id that wrote here is refused"
        );
        restored.reincarnate(NodeId(2)).expect("fresh id");
        let delta = restored.put(key("a"), b"2".to_vec(), 2).expect("put");
        assert_eq!(delta.dot(), Some(Dot::new(NodeId(2), 1)));
        assert!(delta.dependencies().contains(&Dot::new(NodeId(1), 1)));
        // A peer that holds only the old write applies the new one at once.
        let mut peer = Replica::new(NodeId(3));
        peer.apply(old.full_delta()).expect("sync");
        peer.apply(delta).expect("apply");
        let Some(Value::Register(register)) = peer.get(&key("a")).expect("get") else {
            panic!("missing");
        };
        assert_eq!(register.value, b"2");
        assert!(
            register.siblings.is_empty(),
            "the new write supersedes the old one"
        );
    }

    #[test]
    fn skipping_the_cursor_reports_older_cursors_as_compacted() {
        let mut replica = Replica::new(NodeId(1));
        replica.put(key("a"), b"1".to_vec(), 1).expect("put");
        let seen = replica.cursor();
        replica.skip_cursor(1000);
        assert_eq!(replica.cursor(), seen + 1000);
        assert!(matches!(
            replica.events_since(seen + 10).map(|events| events.count()),
            Err(Error::Compacted { .. })
        ));
        replica.put(key("b"), b"2".to_vec(), 2).expect("put");
        let fresh: Vec<u64> = replica
            .events_since(seen + 1000)
            .expect("current cursor")
            .map(|event| event.cursor)
            .collect();
        assert_eq!(fresh, vec![seen + 1001]);
    }
}
