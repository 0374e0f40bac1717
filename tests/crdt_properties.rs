//! Property tests of the CRDT core (`mantissa::crdt`).
//!
//! Random scenarios run 2–4 replicas through local writes of every value type over a small key
//! space, lossy, duplicating, out-of-order delivery of write deltas, anti-entropy with sync and full
//! deltas, restarts from snapshots and garbage collection. A reference model follows along: it
//! records every write with its dot, timestamp and the writer's version vector just before it, and
//! from that alone computes what each replica must read at any version vector (observed-remove: an
//! item survives unless a write whose causal past contains it removes items like it).
//!
//! Checked after every step: reads equal the model's, causal closure (a replica that covers a
//! write's dot covers the writer's past), hold-back liveness (nothing held back is ready), the
//! change feed (contiguous cursors, the last event of each key is its current value), and the wire
//! round trip of every delta. Checked at the end: convergence of digests, versions and reads under
//! every delivery order, order independence of write deltas, sync-delta exchange, idempotence and
//! associativity of full-delta merges, snapshots, garbage collection and catching up after it.
//! Fixed-shape properties cover observed-remove, add-wins, causal hold-back and counters.

use std::collections::{BTreeMap, BTreeSet};

use mantissa::crdt::{
    Applied, Change, Delta, Dot, Error, Event, Hlc, Key, Kind, NodeId, Register, Replica,
    ReplicaConfig, Sibling, Value, VersionVector,
};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::json;

/// The key space: small, so writes collide. Index 0 and 1 are registers, 2 a counter, 3 a set and
/// 4 a document, but a few writes of every scenario ignore that and mix types on one key.
const KEYS: [&str; 5] = ["reg/a", "reg/b", "counter", "set", "doc"];

/// Node ids of replica 0, 1, 2, 3: not in index order, so node order matters nowhere by accident.
const NODES: [u64; 4] = [10, 2, 33, 4];

fn key(index: usize) -> Key {
    Key::new(KEYS[index]).expect("the test keys are valid")
}

fn element(id: u8) -> Vec<u8> {
    vec![b'a' + id]
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// One local mutation, in a compact form that shrinks well.
#[derive(Clone, Debug, PartialEq)]
enum Op {
    Put(u8),
    Delete,
    CounterAdd(i8),
    SetAdd(Vec<u8>),
    SetRemove(Vec<u8>),
    Patch { field: u8, value: Option<u8> },
}

impl Op {
    /// The type a key must have (or lack) for this op; `None` for a delete.
    fn kind(&self) -> Option<Kind> {
        match self {
            Op::Put(_) => Some(Kind::Register),
            Op::Delete => None,
            Op::CounterAdd(_) => Some(Kind::Counter),
            Op::SetAdd(_) | Op::SetRemove(_) => Some(Kind::Set),
            Op::Patch { .. } => Some(Kind::Document),
        }
    }

    /// Whether a write doing this op removes `item` of an earlier write it has seen on its key.
    fn removes(&self, same_node: bool, item: &Item) -> bool {
        match (self, item) {
            (Op::Put(_) | Op::Delete, _) => true,
            (Op::CounterAdd(_), Item::Counter { .. }) => same_node,
            (Op::SetAdd(ids), Item::Element(id)) => ids.contains(id),
            (Op::SetRemove(ids), Item::Element(id)) => ids.contains(id),
            (Op::SetRemove(_) | Op::Patch { .. }, Item::Tombstone) => true,
            (Op::Patch { .. }, Item::Document) => true,
            _ => false,
        }
    }
}

/// What happens to a write delta picked for delivery.
#[derive(Clone, Copy, Debug)]
enum Fate {
    Deliver,
    /// Delivered, but stays in flight: it will arrive again.
    Duplicate,
    /// Lost; only the final exchange brings it.
    Drop,
}

/// Replica indices are taken modulo the scenario's replica count.
#[derive(Clone, Debug)]
enum Step {
    Write {
        at: usize,
        key: usize,
        op: Op,
        now: u64,
    },
    Deliver {
        to: usize,
        pick: Index,
        fate: Fate,
    },
    Sync {
        from: usize,
        to: usize,
        full: bool,
    },
    Restart {
        at: usize,
    },
    CollectGarbage {
        at: usize,
    },
}

/// How the scenario ends: every replica must receive everything.
#[derive(Clone, Copy, Debug)]
enum Finale {
    /// Every write delta to every replica, shuffled, some twice.
    DeliverAll,
    /// `delta_since` between pairs, shuffled, then one pass over every pair.
    AntiEntropy,
    /// Anti-entropy first, then the (now redundant) write deltas.
    Both,
}

#[derive(Clone, Debug)]
struct Scenario {
    replicas: usize,
    /// The hold-back buffer's limit in deltas, when smaller than the default; a full buffer
    /// refuses deltas, which stay in flight.
    buffer: Option<usize>,
    steps: Vec<Step>,
    finale: Finale,
    /// Seeds the shuffles of the finale.
    seed: u64,
}

fn ids() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0u8..3, 1..=3)
}

/// Set adds of one element, or of up to three when `multi`.
fn set_add(multi: bool) -> BoxedStrategy<Op> {
    if multi {
        ids().prop_map(Op::SetAdd).boxed()
    } else {
        (0u8..3).prop_map(|id| Op::SetAdd(vec![id])).boxed()
    }
}

/// An op of any type.
fn any_op(multi: bool) -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Put),
        Just(Op::Delete),
        (-3i8..=5).prop_map(Op::CounterAdd),
        set_add(multi),
        ids().prop_map(Op::SetRemove),
        (0u8..3, prop::option::of(0u8..4)).prop_map(|(field, value)| Op::Patch { field, value }),
    ]
}

/// An op of the type key `index` is meant to hold, or a delete.
fn typed_op(index: usize, multi: bool) -> BoxedStrategy<Op> {
    match index {
        0 | 1 => prop_oneof![4 => (0u8..4).prop_map(Op::Put), 1 => Just(Op::Delete)].boxed(),
        2 => prop_oneof![4 => (-3i8..=5).prop_map(Op::CounterAdd), 1 => Just(Op::Delete)].boxed(),
        3 => prop_oneof![
            3 => set_add(multi),
            2 => ids().prop_map(Op::SetRemove),
            1 => Just(Op::Delete),
        ]
        .boxed(),
        _ => prop_oneof![
            3 => (0u8..3, prop::option::of(0u8..4))
                .prop_map(|(field, value)| Op::Patch { field, value }),
            1 => Just(Op::Delete),
        ]
        .boxed(),
    }
}

/// A key and an op on it: mostly of the key's type, sometimes of any type.
fn keyed_op(multi: bool) -> impl Strategy<Value = (usize, Op)> {
    prop_oneof![
        8 => (0..KEYS.len())
            .prop_flat_map(move |index| typed_op(index, multi).prop_map(move |op| (index, op))),
        1 => (0..KEYS.len(), any_op(multi)),
    ]
}

/// Caller time: mostly near 1000 ms so it often goes backwards and ties; rarely far in the future.
fn now() -> impl Strategy<Value = u64> {
    prop_oneof![20 => 990u64..1_010, 1 => Just(1 << 50)]
}

fn step(ops: impl Strategy<Value = (usize, Op)> + 'static) -> impl Strategy<Value = Step> {
    let fate = prop_oneof![
        3 => Just(Fate::Deliver),
        1 => Just(Fate::Duplicate),
        1 => Just(Fate::Drop),
    ];
    prop_oneof![
        6 => (0..4usize, ops, now()).prop_map(|(at, (key, op), now)| Step::Write { at, key, op, now }),
        6 => (0..4usize, any::<Index>(), fate).prop_map(|(to, pick, fate)| Step::Deliver { to, pick, fate }),
        1 => (0..4usize, 0..4usize, any::<bool>()).prop_map(|(from, to, full)| Step::Sync { from, to, full }),
        1 => (0..4usize).prop_map(|at| Step::Restart { at }),
        1 => (0..4usize).prop_map(|at| Step::CollectGarbage { at }),
    ]
}

fn scenario_of(
    ops: impl Strategy<Value = (usize, Op)> + 'static,
    max_steps: usize,
) -> impl Strategy<Value = Scenario> {
    let finale = prop_oneof![
        Just(Finale::DeliverAll),
        Just(Finale::AntiEntropy),
        Just(Finale::Both)
    ];
    (
        2..=4usize,
        prop_oneof![3 => Just(None), 1 => (1..3usize).prop_map(Some)],
        prop::collection::vec(step(ops), 1..max_steps),
        finale,
        any::<u64>(),
    )
        .prop_map(|(replicas, buffer, steps, finale, seed)| Scenario {
            replicas,
            buffer,
            steps,
            finale,
            seed,
        })
}

/// A small deterministic generator for the finale's shuffles (SplitMix64).
struct Shuffler(u64);

impl Shuffler {
    fn below(&mut self, bound: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % bound as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// One item a write leaves on its key, as the model sees it.
#[derive(Clone, Debug, PartialEq)]
enum Item {
    Register(Vec<u8>),
    Counter {
        up: u64,
        down: u64,
    },
    Element(u8),
    /// The model does not compute automerge merges; it checks only that the key reads as a document.
    Document,
    Tombstone,
}

/// A write as the model records it.
#[derive(Debug)]
struct Write {
    /// The write's first dot, which names it.
    dot: Dot,
    /// Its last dot: a write uses one dot per item it creates.
    last_seq: u64,
    key: usize,
    op: Op,
    items: Vec<Item>,
    /// The writer's version vector just before the write: its causal past.
    past: VersionVector,
    time: Hlc,
    delta: Delta,
}

impl Write {
    /// Register winner order: timestamp, then dot.
    fn precedence(&self) -> (Hlc, u64) {
        (self.time, self.dot.seq)
    }
}

/// What a key must read as: an exact value, or some document.
#[derive(Debug, PartialEq)]
enum Expected {
    Exact(Value),
    Document,
}

#[derive(Default)]
struct Model {
    writes: Vec<Write>,
}

impl Model {
    /// Whether `item` of `write` is held at a replica whose version is `version`.
    fn alive(&self, write: &Write, item: &Item, version: &VersionVector) -> bool {
        version.contains(write.dot)
            && !self.writes.iter().any(|later| {
                later.key == write.key
                    && version.contains(later.dot)
                    && later.past.contains(write.dot)
                    && later.op.removes(later.dot.node == write.dot.node, item)
            })
    }

    /// The items of `key` held at `version`, tombstones included.
    fn items(&self, key: usize, version: &VersionVector) -> Vec<(&Write, &Item)> {
        self.writes
            .iter()
            .filter(|write| write.key == key)
            .flat_map(|write| write.items.iter().map(move |item| (write, item)))
            .filter(|(write, item)| self.alive(write, item, version))
            .collect()
    }

    fn tombstones(&self, version: &VersionVector) -> usize {
        (0..KEYS.len())
            .flat_map(|key| self.items(key, version))
            .filter(|(_, item)| **item == Item::Tombstone)
            .count()
    }

    fn kind(&self, key: usize, version: &VersionVector) -> Option<Kind> {
        let items = self.items(key, version);
        let (_, top) = items
            .iter()
            .filter(|(_, item)| **item != Item::Tombstone)
            .max_by_key(|(write, _)| write.precedence())?;
        Some(match top {
            Item::Register(_) => Kind::Register,
            Item::Counter { .. } => Kind::Counter,
            Item::Element(_) => Kind::Set,
            _ => Kind::Document,
        })
    }

    /// What `key` reads as at `version`.
    fn read(&self, key: usize, version: &VersionVector) -> Option<Expected> {
        let kind = self.kind(key, version)?;
        let mut items = self.items(key, version);
        items.sort_by_key(|(write, _)| std::cmp::Reverse(write.precedence()));
        let value = match kind {
            Kind::Register => {
                let mut values = items.iter().filter_map(|(write, item)| match item {
                    Item::Register(value) => Some(Sibling {
                        value: value.clone().into(),
                        written_at: write.time,
                    }),
                    _ => None,
                });
                let winner = values.next().expect("a register key has a register item");
                Value::Register(Register {
                    value: winner.value,
                    written_at: winner.written_at,
                    siblings: values.collect(),
                })
            }
            Kind::Counter => Value::Counter(
                items
                    .iter()
                    .map(|(_, item)| match item {
                        Item::Counter { up, down } => *up as i64 - *down as i64,
                        _ => 0,
                    })
                    .sum(),
            ),
            Kind::Set => {
                let elements: BTreeSet<Vec<u8>> = items
                    .iter()
                    .filter_map(|(_, item)| match item {
                        Item::Element(id) => Some(element(*id)),
                        _ => None,
                    })
                    .collect();
                Value::Set(elements.into_iter().collect())
            }
            _ => return Some(Expected::Document),
        };
        Some(Expected::Exact(value))
    }

    /// The items a successful `op` by `node` leaves, given the writer's version before it.
    fn items_of(&self, op: &Op, key: usize, node: NodeId, past: &VersionVector) -> Vec<Item> {
        match op {
            Op::Put(value) => vec![Item::Register(vec![*value])],
            Op::Delete | Op::SetRemove(_) => vec![Item::Tombstone],
            Op::CounterAdd(amount) => {
                let (mut up, mut down) = self
                    .items(key, past)
                    .into_iter()
                    .find_map(|(write, item)| match item {
                        Item::Counter { up, down } if write.dot.node == node => Some((*up, *down)),
                        _ => None,
                    })
                    .unwrap_or((0, 0));
                if *amount >= 0 {
                    up += amount.unsigned_abs() as u64;
                } else {
                    down += amount.unsigned_abs() as u64;
                }
                vec![Item::Counter { up, down }]
            }
            Op::SetAdd(ids) => {
                let ids: BTreeSet<u8> = ids.iter().copied().collect();
                ids.into_iter().map(Item::Element).collect()
            }
            Op::Patch { .. } => vec![Item::Document],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster under test
// ---------------------------------------------------------------------------------------------

fn reads(replica: &Replica) -> Vec<(Key, Value)> {
    replica.range(b"", usize::MAX).expect("every key reads")
}

/// Pages through the keys starting with `prefix`, one key per page: must equal one range read.
fn check_paging(replica: &Replica, prefix: &[u8]) -> Result<(), TestCaseError> {
    let mut paged = Vec::new();
    loop {
        let after = paged.last().map(|(key, _): &(Key, Value)| key.clone());
        let page = replica
            .range_after(prefix, after.as_ref(), 1)
            .expect("every key reads");
        if page.is_empty() {
            break;
        }
        prop_assert!(paged.len() < KEYS.len(), "paging does not end");
        paged.extend(page);
    }
    prop_assert_eq!(
        paged,
        replica.range(prefix, usize::MAX).expect("every key reads")
    );
    Ok(())
}

/// A copy of a replica, through its snapshot (held-back deltas are not copied).
fn copy(replica: &Replica) -> Replica {
    Replica::restore(&replica.snapshot(), ReplicaConfig::default()).expect("own snapshot restores")
}

/// Sends a delta over the wire: it must decode to itself.
fn wire(delta: &Delta) -> Result<Delta, TestCaseError> {
    let decoded = Delta::decode(&delta.encode());
    prop_assert_eq!(decoded.as_ref(), Ok(delta), "wire round trip");
    Ok(decoded.expect("checked just above"))
}

/// Applies `deltas` in order to a fresh replica.
fn merged<'a>(deltas: impl IntoIterator<Item = &'a Delta>) -> Replica {
    let mut replica = Replica::new(NodeId(999));
    for delta in deltas {
        replica.apply(delta.clone()).expect("a valid delta applies");
    }
    replica
}

fn meet_of(replicas: &[Replica]) -> VersionVector {
    let mut versions = replicas.iter().map(Replica::version);
    let first = versions.next().expect("at least one replica").clone();
    versions.fold(first, |meet, version| meet.meet(version))
}

/// Removes from `held` the writes `version` now covers, and returns their dots.
fn unheld(held: &mut BTreeSet<usize>, writes: &[Write], version: &VersionVector) -> Vec<Dot> {
    let applied: Vec<usize> = held
        .iter()
        .copied()
        .filter(|&index| version.contains(writes[index].dot))
        .collect();
    for index in &applied {
        held.remove(index);
    }
    applied.into_iter().map(|index| writes[index].dot).collect()
}

struct Cluster {
    config: ReplicaConfig,
    replicas: Vec<Replica>,
    model: Model,
    /// Per replica: write indices still in flight to it.
    in_flight: Vec<Vec<usize>>,
    /// Per replica: write indices delivered but not yet applied (held back).
    held: Vec<BTreeSet<usize>>,
    /// Per replica: every change event it emitted, across restarts.
    feeds: Vec<Vec<Event>>,
    garbage_collected: bool,
}

impl Cluster {
    fn new(replicas: usize, buffer: Option<usize>) -> Self {
        let mut config = ReplicaConfig::default();
        config.buffer_deltas = buffer.unwrap_or(config.buffer_deltas);
        Cluster {
            replicas: NODES[..replicas]
                .iter()
                .map(|&node| Replica::with_config(NodeId(node), config.clone()))
                .collect(),
            config,
            model: Model::default(),
            in_flight: vec![Vec::new(); replicas],
            held: vec![BTreeSet::new(); replicas],
            feeds: vec![Vec::new(); replicas],
            garbage_collected: false,
        }
    }

    fn run(&mut self, step: &Step) -> Result<(), TestCaseError> {
        let n = self.replicas.len();
        let touched = match *step {
            Step::Write {
                at,
                key,
                ref op,
                now,
            } => {
                self.write(at % n, key, op, now)?;
                at % n
            }
            Step::Deliver { to, pick, fate } => {
                let to = to % n;
                if self.in_flight[to].is_empty() {
                    return Ok(());
                }
                let slot = pick.index(self.in_flight[to].len());
                let index = self.in_flight[to][slot];
                if !matches!(fate, Fate::Duplicate) {
                    self.in_flight[to].remove(slot);
                }
                let refused = !matches!(fate, Fate::Drop) && !self.deliver(to, index)?;
                if refused && !matches!(fate, Fate::Duplicate) {
                    self.in_flight[to].push(index);
                }
                to
            }
            Step::Sync { from, to, full } => {
                self.sync(from % n, to % n, full)?;
                to % n
            }
            Step::Restart { at } => {
                let at = at % n;
                self.restart(at)?;
                at
            }
            Step::CollectGarbage { at } => {
                let at = at % n;
                let stable = meet_of(&self.replicas);
                self.replicas[at].collect_garbage(&stable);
                self.garbage_collected = true;
                at
            }
        };
        self.check_replica(touched)?;
        self.check_causal_closure()
    }

    /// A local write at replica `at`, checked against the model before it is recorded.
    fn write(&mut self, at: usize, key: usize, op: &Op, now: u64) -> Result<(), TestCaseError> {
        let replica = &mut self.replicas[at];
        let node = replica.node();
        let past = replica.version().clone();
        let ids = |ids: &[u8]| ids.iter().map(|&id| element(id)).collect::<Vec<_>>();
        let result = match op {
            Op::Put(value) => replica.put(self::key(key), vec![*value], now).map(Some),
            Op::Delete => replica.delete(self::key(key), now),
            Op::CounterAdd(amount) => replica
                .counter_add(self::key(key), i64::from(*amount), now)
                .map(Some),
            Op::SetAdd(elements) => replica
                .set_add(self::key(key), ids(elements), now)
                .map(Some),
            Op::SetRemove(elements) => replica.set_remove(self::key(key), &ids(elements), now),
            Op::Patch { field, value } => {
                let patch = json!({ format!("f{field}"): value });
                replica
                    .document_patch(self::key(key), &patch, now)
                    .map(Some)
            }
        };
        let kind = self.model.kind(key, &past);
        let delta = match result {
            Ok(Some(delta)) => delta,
            Ok(None) => {
                let removable = match op {
                    Op::SetRemove(elements) => self.model.items(key, &past).iter().any(
                        |(_, item)| matches!(item, Item::Element(id) if elements.contains(id)),
                    ),
                    _ => kind.is_some(),
                };
                prop_assert!(!removable, "{op:?} on {key} wrote nothing");
                return Ok(());
            }
            Err(Error::WrongType {
                expected, found, ..
            }) => {
                prop_assert_eq!(Some(expected), op.kind());
                prop_assert_eq!(Some(found), kind, "{:?} refused on {}", op, key);
                return Ok(());
            }
            Err(error) => return Err(TestCaseError::fail(format!("{op:?} failed: {error}"))),
        };
        if let (Some(wanted), Some(found)) = (op.kind(), kind) {
            prop_assert_eq!(wanted, found, "{:?} accepted on a key of another type", op);
        }
        prop_assert_eq!(delta.dot(), Some(Dot::new(node, past.get(node) + 1)));
        prop_assert!(
            replica
                .version()
                .contains(Dot::new(node, past.get(node) + 1))
        );
        wire(&delta)?;
        let index = self.model.writes.len();
        let last_seq = replica.version().get(node);
        self.model.writes.push(Write {
            dot: Dot::new(node, past.get(node) + 1),
            last_seq,
            key,
            items: self.model.items_of(op, key, node, &past),
            op: op.clone(),
            past,
            time: replica.clock(),
            delta,
        });
        for (peer, in_flight) in self.in_flight.iter_mut().enumerate() {
            if peer != at {
                in_flight.push(index);
            }
        }
        Ok(())
    }

    /// Delivers write `index` to replica `to` and checks what `apply` reports. Returns false when
    /// a full hold-back buffer refused it; the replica must then be unchanged.
    fn deliver(&mut self, to: usize, index: usize) -> Result<bool, TestCaseError> {
        let write = &self.model.writes[index];
        let replica = &mut self.replicas[to];
        let before = replica.version().clone();
        let (digest, held_back) = (replica.digest(), replica.held_back());
        let applied = match replica.apply(wire(&write.delta)?) {
            Ok(applied) => applied,
            Err(Error::BufferFull { deltas, .. }) => {
                prop_assert!(!before.dominates(&write.past), "refused a ready delta");
                prop_assert_eq!(deltas, self.config.buffer_deltas);
                prop_assert_eq!(held_back, self.config.buffer_deltas);
                prop_assert_eq!(replica.held_back(), held_back);
                prop_assert_eq!(replica.digest(), digest, "a refusal changed the replica");
                return Ok(false);
            }
            Err(error) => return Err(TestCaseError::fail(format!("apply failed: {error}"))),
        };
        let released = unheld(&mut self.held[to], &self.model.writes, replica.version()).len();
        if before.contains(write.dot) {
            prop_assert_eq!(applied, Applied::Duplicate);
        } else if before.dominates(&write.past) {
            prop_assert_eq!(applied, Applied::Merged { released });
        } else {
            prop_assert_eq!(applied, Applied::Buffered, "{:?} applied early", write.dot);
            self.held[to].insert(index);
        }
        Ok(true)
    }

    /// Anti-entropy from `from` to `to`: a sync delta (or the full state).
    fn sync(&mut self, from: usize, to: usize, full: bool) -> Result<(), TestCaseError> {
        let source = &self.replicas[from];
        let delta = if full {
            source.full_delta()
        } else {
            source.delta_since(self.replicas[to].version())
        };
        let context = source.version().clone();
        let applied = self.replicas[to]
            .apply(wire(&delta)?)
            .map_err(|error| TestCaseError::fail(format!("sync failed: {error}")))?;
        let version = self.replicas[to].version();
        prop_assert!(version.dominates(&context), "a sync covers its context");
        let released = unheld(&mut self.held[to], &self.model.writes, version)
            .into_iter()
            .filter(|&dot| !context.contains(dot))
            .count();
        prop_assert_eq!(applied, Applied::Merged { released });
        Ok(())
    }

    /// Replaces replica `at` by a restore of its snapshot; what it held back is in flight again.
    fn restart(&mut self, at: usize) -> Result<(), TestCaseError> {
        let replica = &self.replicas[at];
        let snapshot = replica.snapshot();
        let restored = Replica::restore(&snapshot, self.config.clone())
            .map_err(|error| TestCaseError::fail(format!("restore failed: {error}")))?;
        prop_assert_eq!(restored.snapshot(), snapshot, "snapshot round trip");
        prop_assert_eq!(restored.digest(), replica.digest());
        prop_assert_eq!(restored.version(), replica.version());
        prop_assert_eq!(reads(&restored), reads(replica));
        prop_assert_eq!(restored.cursor(), replica.cursor());
        let lost = std::mem::take(&mut self.held[at]);
        self.in_flight[at].extend(lost);
        self.replicas[at] = restored;
        Ok(())
    }

    /// Reads, tombstones, held-back deltas and the change feed of replica `at`.
    fn check_replica(&mut self, at: usize) -> Result<(), TestCaseError> {
        self.harvest(at)?;
        let replica = &self.replicas[at];
        let version = replica.version().clone();
        // Liveness: whatever is still held back must be missing a cause.
        self.held[at].retain(|&held| !version.contains(self.model.writes[held].dot));
        for &held in &self.held[at] {
            let write = &self.model.writes[held];
            prop_assert!(
                !version.dominates(&write.past),
                "{:?} is ready but held back",
                write.dot
            );
        }
        prop_assert_eq!(replica.held_back(), self.held[at].len(), "held back");
        if !self.garbage_collected {
            prop_assert_eq!(replica.tombstones(), self.model.tombstones(&version));
        }
        check_paging(replica, b"")?;
        check_paging(replica, b"reg/")?;
        for (index, name) in KEYS.iter().enumerate() {
            let actual = replica.get(&key(index)).expect("every key reads");
            let expected = self.model.read(index, &version);
            match (&actual, &expected) {
                (Some(Value::Document(_)), Some(Expected::Document)) => {}
                (actual, Some(Expected::Exact(value))) => {
                    prop_assert_eq!(actual.as_ref(), Some(value), "{} at replica {}", name, at)
                }
                _ => prop_assert!(
                    actual.is_none() && expected.is_none(),
                    "{name} at replica {at}: read {actual:?}, model {expected:?}"
                ),
            }
            let last = self.feeds[at]
                .iter()
                .rev()
                .find(|event| event.key == key(index))
                .map(|event| &event.change);
            match (&actual, last) {
                (None, None | Some(Change::Delete)) => {}
                (Some(value), Some(Change::Put(put))) => {
                    prop_assert_eq!(put, value, "{} at replica {}: last event", name, at)
                }
                _ => {
                    return Err(TestCaseError::fail(format!(
                        "{name} at replica {at}: feed ends {last:?}, read {actual:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Collects replica `at`'s new change events; cursors must continue by exactly one.
    fn harvest(&mut self, at: usize) -> Result<(), TestCaseError> {
        let replica = &self.replicas[at];
        let mut last = self.feeds[at].last().map_or(0, |event| event.cursor);
        let events = replica
            .events_since(last)
            .map_err(|error| TestCaseError::fail(format!("feed: {error}")))?;
        for event in events {
            prop_assert_eq!(event.cursor, last + 1, "feed cursors are contiguous");
            last = event.cursor;
            self.feeds[at].push(event.clone());
        }
        prop_assert_eq!(replica.cursor(), last);
        Ok(())
    }

    /// A replica that covers a write's dot covers everything its writer had applied before it.
    fn check_causal_closure(&self) -> Result<(), TestCaseError> {
        for (at, replica) in self.replicas.iter().enumerate() {
            for write in &self.model.writes {
                if replica.version().contains(write.dot) {
                    prop_assert!(
                        replica.version().dominates(&write.past),
                        "replica {} shows {:?} without its causes {:?} (has {:?})",
                        at,
                        write.dot,
                        write.past,
                        replica.version()
                    );
                }
            }
        }
        Ok(())
    }

    fn finale(&mut self, finale: Finale, seed: u64) -> Result<(), TestCaseError> {
        let mut shuffler = Shuffler(seed);
        if matches!(finale, Finale::AntiEntropy | Finale::Both) {
            let n = self.replicas.len();
            let mut pairs: Vec<(usize, usize)> = (0..n)
                .flat_map(|from| (0..n).map(move |to| (from, to)))
                .filter(|(from, to)| from != to)
                .collect();
            shuffler.shuffle(&mut pairs);
            let in_order = (0..n).flat_map(|from| (0..n).map(move |to| (from, to)));
            for (from, to) in pairs.clone().into_iter().chain(in_order) {
                if from != to {
                    self.sync(from, to, false)?;
                    self.check_replica(to)?;
                }
            }
        }
        if matches!(finale, Finale::DeliverAll | Finale::Both) {
            for to in 0..self.replicas.len() {
                let mut order: Vec<usize> = (0..self.model.writes.len())
                    .flat_map(|index| vec![index; 1 + shuffler.below(2)])
                    .collect();
                // Refused deltas come again; each round applies at least the first missing write.
                for _round in 0..=self.model.writes.len() {
                    shuffler.shuffle(&mut order);
                    let mut refused = Vec::new();
                    for index in order {
                        if !self.deliver(to, index)? {
                            refused.push(index);
                        }
                    }
                    order = refused;
                }
                prop_assert!(order.is_empty(), "deliveries still refused: {:?}", order);
                self.check_replica(to)?;
            }
        }
        self.check_causal_closure()
    }

    /// Every replica has applied every write and reads the same.
    fn check_converged(&self) -> Result<(), TestCaseError> {
        let first = &self.replicas[0];
        let everything: VersionVector = self
            .model
            .writes
            .iter()
            .map(|write| (write.dot.node, write.last_seq))
            .collect();
        prop_assert_eq!(first.version(), &everything);
        for replica in &self.replicas {
            prop_assert_eq!(replica.held_back(), 0);
            prop_assert_eq!(replica.version(), first.version());
            prop_assert_eq!(reads(replica), reads(first));
            if !self.garbage_collected {
                prop_assert_eq!(replica.digest(), first.digest());
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Checks on the state before the finale, on copies
// ---------------------------------------------------------------------------------------------

/// Exchanging `delta_since` both ways converges a pair; applying a sync delta again changes nothing.
fn check_sync_exchange(a: &Replica, b: &Replica) -> Result<(), TestCaseError> {
    let (mut a, mut b) = (copy(a), copy(b));
    let to_b = wire(&a.delta_since(b.version()))?;
    let to_a = wire(&b.delta_since(a.version()))?;
    b.apply(to_b.clone()).expect("a sync delta applies");
    a.apply(to_a).expect("a sync delta applies");
    prop_assert_eq!(a.version(), b.version());
    prop_assert_eq!(reads(&a), reads(&b));
    prop_assert_eq!(a.digest(), b.digest(), "digests after a sync exchange");
    let (digest, cursor) = (b.digest(), b.cursor());
    prop_assert_eq!(b.apply(to_b), Ok(Applied::Merged { released: 0 }));
    prop_assert_eq!(b.digest(), digest, "a sync delta applied twice");
    prop_assert_eq!(b.cursor(), cursor, "a repeated sync delta emits no event");
    Ok(())
}

/// Merging the full deltas of `a`, `b` and `c` gives one state, however grouped and ordered.
fn check_full_delta_associativity(
    a: &Replica,
    b: &Replica,
    c: &Replica,
) -> Result<(), TestCaseError> {
    let (a, b, c) = (a.full_delta(), b.full_delta(), c.full_delta());
    let flat = merged([&a, &b, &c]);
    let reversed = merged([&c, &b, &a]);
    let left = merged([&merged([&a, &b]).full_delta(), &c]);
    let right = merged([&a, &merged([&b, &c]).full_delta()]);
    for other in [&reversed, &left, &right] {
        prop_assert_eq!(other.version(), flat.version());
        prop_assert_eq!(reads(other), reads(&flat));
        prop_assert_eq!(other.digest(), flat.digest(), "full-delta merge grouping");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Checks on the converged state
// ---------------------------------------------------------------------------------------------

/// Write deltas applied to fresh replicas in generation order, and shuffled with duplicates, give
/// the converged state.
fn check_write_order_independence(cluster: &Cluster, seed: u64) -> Result<(), TestCaseError> {
    let writes = &cluster.model.writes;
    let mut in_order = Replica::new(NodeId(998));
    for write in writes {
        prop_assert_eq!(
            in_order.apply(write.delta.clone()),
            Ok(Applied::Merged { released: 0 }),
            "generation order is causal"
        );
    }
    let mut order: Vec<usize> = (0..writes.len()).chain(0..writes.len()).collect();
    Shuffler(seed ^ 0x5eed).shuffle(&mut order);
    let shuffled = merged(order.iter().map(|&index| &writes[index].delta));
    let first = &cluster.replicas[0];
    for replica in [&in_order, &shuffled] {
        prop_assert_eq!(replica.held_back(), 0);
        prop_assert_eq!(replica.version(), first.version());
        prop_assert_eq!(reads(replica), reads(first));
    }
    prop_assert_eq!(shuffled.digest(), in_order.digest());
    if !cluster.garbage_collected {
        prop_assert_eq!(in_order.digest(), first.digest());
    }
    Ok(())
}

/// Collecting at the causally stable vector keeps every read, leaves no tombstone, keeps digests
/// equal, and laggards (fresh, or restored from `old` snapshots) catch up with `delta_since`.
fn check_garbage_collection(
    replicas: &mut [Replica],
    old: &[Vec<u8>],
) -> Result<(), TestCaseError> {
    let stable = meet_of(replicas);
    let before = reads(&replicas[0]);
    for replica in replicas.iter_mut() {
        let tombstones = replica.tombstones();
        let collected = replica.collect_garbage(&stable);
        prop_assert_eq!(collected.tombstones, tombstones);
        prop_assert_eq!(replica.tombstones(), 0);
        prop_assert_eq!(&reads(replica), &before, "collection changed a read");
        prop_assert_eq!(replica.collected(), &stable);
    }
    let source = &replicas[0];
    for replica in replicas.iter() {
        prop_assert_eq!(
            replica.digest(),
            source.digest(),
            "digests after collection"
        );
    }
    let fresh = Replica::new(NodeId(997));
    let laggards = old.iter().map(|bytes| {
        Replica::restore(bytes, ReplicaConfig::default()).expect("an earlier snapshot restores")
    });
    for mut laggard in std::iter::once(fresh).chain(laggards) {
        let delta = wire(&source.delta_since(laggard.version()))?;
        let behind = !laggard.version().dominates(source.collected());
        prop_assert_eq!(delta.is_full(), behind);
        laggard.apply(delta).expect("a sync delta applies");
        prop_assert_eq!(laggard.version(), source.version());
        prop_assert_eq!(reads(&laggard), before.clone());
        prop_assert_eq!(laggard.tombstones(), 0);
        prop_assert_eq!(
            laggard.digest(),
            source.digest(),
            "a laggard after collection"
        );
    }
    Ok(())
}

/// Restored replicas keep writing with fresh dots: one concurrent put each, exchanged, converges to
/// one winner with every other value as a sibling.
fn check_writes_after_restore(replicas: &[Replica]) -> Result<(), TestCaseError> {
    let mut restored: Vec<Replica> = replicas.iter().map(copy).collect();
    let fresh = Key::new("after-restore").expect("valid key");
    let deltas: Vec<Delta> = restored
        .iter_mut()
        .enumerate()
        .map(|(index, replica)| {
            replica
                .put(fresh.clone(), vec![index as u8], 2_000)
                .expect("a put on a new key succeeds")
        })
        .collect();
    for (to, replica) in restored.iter_mut().enumerate() {
        for (from, delta) in deltas.iter().enumerate() {
            let expected = if from == to {
                Applied::Duplicate
            } else {
                Applied::Merged { released: 0 }
            };
            prop_assert_eq!(replica.apply(delta.clone()), Ok(expected));
        }
    }
    for replica in &restored {
        prop_assert_eq!(replica.digest(), restored[0].digest());
        let Some(Value::Register(register)) = replica.get(&fresh).expect("reads") else {
            return Err(TestCaseError::fail("the new key holds a register"));
        };
        prop_assert_eq!(register.siblings.len(), replicas.len() - 1);
    }
    Ok(())
}

fn run_scenario(scenario: &Scenario) -> Result<Cluster, TestCaseError> {
    let mut cluster = Cluster::new(scenario.replicas, scenario.buffer);
    for step in &scenario.steps {
        cluster.run(step)?;
    }
    let replicas = &cluster.replicas;
    for (i, a) in replicas.iter().enumerate() {
        for b in &replicas[i + 1..] {
            check_sync_exchange(a, b)?;
        }
    }
    let c = replicas.get(2).unwrap_or(&replicas[0]);
    check_full_delta_associativity(&replicas[0], &replicas[1], c)?;
    let old: Vec<Vec<u8>> = replicas.iter().map(Replica::snapshot).collect();
    cluster.finale(scenario.finale, scenario.seed)?;
    cluster.check_converged()?;
    for index in 0..KEYS.len() {
        // The model must agree with the replicas on the final state as well.
        let version = cluster.replicas[0].version().clone();
        if let Some(Expected::Exact(value)) = cluster.model.read(index, &version) {
            prop_assert_eq!(cluster.replicas[0].get(&key(index)), Ok(Some(value)));
        }
    }
    check_write_order_independence(&cluster, scenario.seed)?;
    check_garbage_collection(&mut cluster.replicas, &old)?;
    check_writes_after_restore(&cluster.replicas)?;
    Ok(cluster)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    /// Properties 1, 2, 4 (generalised), 6, 7, 8 and 9 over random scenarios of every value type.
    #[test]
    fn random_scenarios_converge_and_match_the_model(scenario in scenario_of(keyed_op(false), 40)) {
        run_scenario(&scenario)?;
    }

    /// The same with set adds of several elements at once.
    #[test]
    fn random_scenarios_with_multi_element_set_adds(scenario in scenario_of(keyed_op(true), 40)) {
        run_scenario(&scenario)?;
    }

    /// Property 5: with only increments and decrements, a converged counter is their sum.
    #[test]
    fn converged_counters_equal_the_sum_of_increments(
        scenario in scenario_of((2usize..4, (-3i8..=5).prop_map(Op::CounterAdd)), 40)
    ) {
        let cluster = run_scenario(&scenario)?;
        for index in 2..4 {
            let amounts: Vec<i64> = cluster
                .model
                .writes
                .iter()
                .filter(|write| write.key == index)
                .map(|write| match write.op {
                    Op::CounterAdd(amount) => i64::from(amount),
                    _ => unreachable!("only counter writes are generated"),
                })
                .collect();
            let expected = (!amounts.is_empty()).then(|| Value::Counter(amounts.iter().sum()));
            for replica in &cluster.replicas {
                prop_assert_eq!(replica.get(&key(index)).expect("reads"), expected.clone());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fixed-shape properties
// ---------------------------------------------------------------------------------------------

fn register_value(replica: &Replica, key: &Key) -> Option<(Vec<u8>, usize)> {
    match replica.get(key).expect("reads") {
        Some(Value::Register(register)) => Some((register.value.to_vec(), register.siblings.len())),
        Some(other) => panic!("{key:?} holds {other:?}"),
        None => None,
    }
}

fn set_value(replica: &Replica, key: &Key) -> Option<Vec<Vec<u8>>> {
    match replica.get(key).expect("reads") {
        Some(Value::Set(elements)) => Some(elements),
        Some(other) => panic!("{key:?} holds {other:?}"),
        None => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Property 3: a delete removes only what it saw; the concurrent put survives, alone, whatever
    /// the timestamps (a later-timestamped delete does not win over a concurrent write).
    #[test]
    fn a_put_concurrent_with_a_delete_survives(t1 in 0u64..20, t2 in 0u64..20, t3 in 0u64..20) {
        let k = Key::new("k").expect("valid key");
        let mut r1 = Replica::new(NodeId(1));
        let mut r2 = Replica::new(NodeId(2));
        let first = r1.put(k.clone(), b"v1".to_vec(), t1).expect("put");
        r2.apply(first).expect("apply");
        let deleted = r2.delete(k.clone(), t2).expect("delete").expect("k was present");
        let second = r1.put(k.clone(), b"v2".to_vec(), t3).expect("put");
        r1.apply(deleted).expect("apply");
        r2.apply(second).expect("apply");
        for replica in [&r1, &r2] {
            prop_assert_eq!(register_value(replica, &k), Some((b"v2".to_vec(), 0)));
        }
        prop_assert_eq!(r1.digest(), r2.digest());
    }

    /// Property 3: an add concurrent with a remove of the same element wins; other removed
    /// elements stay removed.
    #[test]
    fn a_set_add_concurrent_with_a_remove_wins(t1 in 0u64..20, t2 in 0u64..20, t3 in 0u64..20) {
        let k = Key::new("s").expect("valid key");
        let (x, y) = (b"x".to_vec(), b"y".to_vec());
        let mut r1 = Replica::new(NodeId(1));
        let mut r2 = Replica::new(NodeId(2));
        r2.apply(r1.set_add(k.clone(), vec![x.clone(), y.clone()], t1).expect("add"))
            .expect("apply");
        let removed = r2
            .set_remove(k.clone(), &[x.clone(), y.clone()], t2)
            .expect("remove")
            .expect("x and y were present");
        prop_assert_eq!(set_value(&r2, &k), None);
        let added = r1.set_add(k.clone(), vec![x.clone()], t3).expect("add");
        r1.apply(removed).expect("apply");
        r2.apply(added).expect("apply");
        for replica in [&r1, &r2] {
            prop_assert_eq!(set_value(replica, &k), Some(vec![x.clone()]));
        }
        prop_assert_eq!(r1.digest(), r2.digest());
    }

    /// Property 3: a delete that saw every write removes the key everywhere, in every type.
    #[test]
    fn a_delete_that_saw_every_write_removes_the_key(kind in 0usize..4, t in 0u64..20) {
        let k = Key::new("k").expect("valid key");
        let mut r1 = Replica::new(NodeId(1));
        let mut r2 = Replica::new(NodeId(2));
        let written = match kind {
            0 => r1.put(k.clone(), b"v".to_vec(), t),
            1 => r1.counter_add(k.clone(), 3, t),
            2 => r1.set_add(k.clone(), vec![b"x".to_vec()], t),
            _ => r1.document_patch(k.clone(), &json!({"f": 1}), t),
        }
        .expect("write");
        r2.apply(written).expect("apply");
        let deleted = r2.delete(k.clone(), 0).expect("delete").expect("k was present");
        r1.apply(deleted).expect("apply");
        for replica in [&r1, &r2] {
            prop_assert_eq!(replica.get(&k), Ok(None));
            prop_assert!(replica.is_empty());
        }
        prop_assert_eq!(r1.digest(), r2.digest());
    }

    /// Property 4: r3 receives B (which r2 wrote after applying A) before A; B stays invisible and
    /// held back until A arrives, then both show.
    #[test]
    fn a_write_stays_invisible_until_its_causes_arrive(t1 in 0u64..20, t2 in 0u64..20) {
        let (ka, kb) = (Key::new("a").expect("valid key"), Key::new("b").expect("valid key"));
        let mut r1 = Replica::new(NodeId(1));
        let mut r2 = Replica::new(NodeId(2));
        let mut r3 = Replica::new(NodeId(3));
        let a = r1.put(ka.clone(), b"A".to_vec(), t1).expect("put");
        r2.apply(a.clone()).expect("apply");
        let b = r2.put(kb.clone(), b"B".to_vec(), t2).expect("put");
        prop_assert_eq!(b.dependencies(), &[a.dot().expect("a write delta")][..]);
        prop_assert_eq!(r3.apply(wire(&b)?), Ok(Applied::Buffered));
        prop_assert_eq!(r3.get(&kb), Ok(None));
        prop_assert_eq!(r3.held_back(), 1);
        prop_assert!(r3.version().is_empty());
        prop_assert_eq!(r3.cursor(), 0, "no event for a held-back write");
        prop_assert_eq!(r3.apply(b.clone()), Ok(Applied::Buffered), "a duplicate stays held");
        prop_assert_eq!(r3.held_back(), 1);
        prop_assert_eq!(r3.apply(a), Ok(Applied::Merged { released: 1 }));
        prop_assert_eq!(r3.held_back(), 0);
        prop_assert_eq!(register_value(&r3, &ka), Some((b"A".to_vec(), 0)));
        prop_assert_eq!(register_value(&r3, &kb), Some((b"B".to_vec(), 0)));
        prop_assert_eq!(r3.apply(b), Ok(Applied::Duplicate));
        prop_assert_eq!(r3.digest(), r2.digest());
    }
}

/// Property 8 with a feed that keeps everything: events since 0 number 1, 2, 3… and end, per key,
/// with the key's final state.
#[test]
fn the_change_feed_ends_with_each_keys_final_state() {
    let k = |name: &str| Key::new(name).expect("valid key");
    let mut a = Replica::with_config(
        NodeId(1),
        ReplicaConfig {
            feed_capacity: 1_000_000,
            ..ReplicaConfig::default()
        },
    );
    let mut b = Replica::new(NodeId(2));
    a.put(k("x"), b"1".to_vec(), 1).expect("put");
    a.delete(k("x"), 2).expect("delete").expect("x present");
    a.counter_add(k("c"), 4, 3).expect("add");
    let from_b = b.set_add(k("s"), vec![b"e".to_vec()], 4).expect("add");
    a.apply(from_b).expect("apply");
    a.put(k("y"), b"2".to_vec(), 5).expect("put");
    let events: Vec<&Event> = a.events_since(0).expect("feed").collect();
    let cursors: Vec<u64> = events.iter().map(|event| event.cursor).collect();
    assert_eq!(cursors, vec![1, 2, 3, 4, 5]);
    let mut last: BTreeMap<&Key, &Change> = BTreeMap::new();
    for event in &events {
        last.insert(&event.key, &event.change);
    }
    assert_eq!(last[&k("x")], &Change::Delete);
    assert_eq!(last[&k("c")], &Change::Put(Value::Counter(4)));
    assert_eq!(last[&k("s")], &Change::Put(Value::Set(vec![b"e".to_vec()])));
    let y = a.get(&k("y")).expect("reads").expect("y present");
    assert_eq!(last[&k("y")], &Change::Put(y));
}
