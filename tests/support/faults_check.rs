//! The history a fault test records, and the checkers that judge it: pure functions of the
//! operations clients made and of the state every node holds once faults have stopped.
//!
//! Each checker returns the first violation it finds with the smallest piece of history that
//! shows it (the offending operations only). What each one checks, and why it is sound for this
//! store, is in its doc comment and in `docs/testing.md`.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// How an operation ended, as far as the client can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// `200` (or `404` for a read): it happened.
    Ok,
    /// A definite refusal (`4xx`, `504 timeout`): nothing was read or written.
    Fail,
    /// No answer or a `5xx` other than `504`: a write may or may not have been applied.
    Indeterminate,
}

/// What a register read returned: the winner and its concurrent siblings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Register {
    pub value: String,
    pub siblings: Vec<String>,
}

/// One kind of operation, with what it wrote or what it read (reads: meaningful only when the
/// outcome is [`Outcome::Ok`]; `None` is `404`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    RegisterWrite {
        key: String,
        value: String,
    },
    RegisterRead {
        key: String,
        read: Option<Register>,
    },
    /// `+1` to the one counter.
    CounterAdd,
    CounterRead {
        value: Option<i64>,
    },
    /// Adds one element, unique over the whole run, to the one set.
    SetAdd {
        element: String,
    },
    SetRead {
        elements: Option<BTreeSet<String>>,
    },
}

/// One operation of one client. A client makes one operation at a time, so a client's operations
/// appear in the history in the order it made them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: usize,
    /// The node the request went to.
    pub node: usize,
    pub action: Action,
    /// Since the start of the run.
    pub invoked: Duration,
    pub completed: Duration,
    pub outcome: Outcome,
    /// Whether the request carried the client's latest token as `after=`.
    pub after: bool,
}

/// What one node holds once faults have stopped and the cluster has converged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    pub node: usize,
    /// Every register key of the workload; `None` when the key holds nothing.
    pub registers: BTreeMap<String, Option<Register>>,
    pub counter: Option<i64>,
    pub set: BTreeSet<String>,
}

/// A failed check: its name, what is wrong, and the operations that show it.
#[derive(Clone, Debug)]
pub struct Violation {
    pub check: &'static str,
    pub detail: String,
    pub ops: Vec<Op>,
}

/// Runs every checker; an empty list is a pass.
pub fn check_all(history: &[Op], finals: &[NodeState]) -> Vec<Violation> {
    [
        check_convergence(finals),
        check_set_adds_survive(history, finals),
        check_registers(history, finals),
        check_counter(history, finals),
        check_read_your_writes(history),
        check_monotonic_reads(history),
        check_causal_across_keys(history),
    ]
    .into_iter()
    .filter_map(Result::err)
    .collect()
}

/// Convergence: every node holds the same registers (winner and siblings), counter and set.
pub fn check_convergence(finals: &[NodeState]) -> Result<(), Violation> {
    let Some(first) = finals.first() else {
        return Ok(());
    };
    for other in &finals[1..] {
        let same = first.registers == other.registers
            && first.counter == other.counter
            && first.set == other.set;
        if !same {
            return Err(Violation {
                check: "convergence",
                detail: format!(
                    "node {} and node {} differ after the convergence deadline:\n  {first:?}\n  \
                     {other:?}",
                    first.node, other.node
                ),
                ops: Vec::new(),
            });
        }
    }
    Ok(())
}

/// No lost set adds, no phantom elements: every acknowledged add is in every node's final set,
/// and every element there was added by some client (acknowledged or not).
pub fn check_set_adds_survive(history: &[Op], finals: &[NodeState]) -> Result<(), Violation> {
    let attempted: BTreeSet<&str> = history
        .iter()
        .filter_map(|op| match &op.action {
            Action::SetAdd { element } if op.outcome != Outcome::Fail => Some(element.as_str()),
            _ => None,
        })
        .collect();
    for state in finals {
        for op in history.iter().filter(|op| op.outcome == Outcome::Ok) {
            if let Action::SetAdd { element } = &op.action
                && !state.set.contains(element)
            {
                return Err(Violation {
                    check: "no lost set adds",
                    detail: format!(
                        "acknowledged element {element:?} is missing from node {}'s final set",
                        state.node
                    ),
                    ops: vec![op.clone()],
                });
            }
        }
        if let Some(phantom) = state.set.iter().find(|e| !attempted.contains(e.as_str())) {
            return Err(Violation {
                check: "no phantom set elements",
                detail: format!(
                    "node {}'s final set holds {phantom:?}, which no client added",
                    state.node
                ),
                ops: Vec::new(),
            });
        }
    }
    Ok(())
}

/// Registers, without deletes in the workload:
/// - a key some client wrote with an acknowledged write holds a value at the end;
/// - the final winner and siblings are values written to that key (acknowledged or not);
/// - a value is not in the final state (winner or sibling) when the same client later made an
///   acknowledged write to the same key with `after=` its token: that write was applied where
///   the earlier one already was, so it replaced it (a write replaces every value it has seen).
pub fn check_registers(history: &[Op], finals: &[NodeState]) -> Result<(), Violation> {
    for state in finals {
        for (key, read) in &state.registers {
            let writes: Vec<&Op> = history
                .iter()
                .filter(|op| matches!(&op.action, Action::RegisterWrite { key: k, .. } if k == key))
                .collect();
            let Some(read) = read else {
                if let Some(op) = writes.iter().find(|op| op.outcome == Outcome::Ok) {
                    return Err(Violation {
                        check: "no lost register writes",
                        detail: format!("key {key:?} holds nothing at node {}", state.node),
                        ops: vec![(*op).clone()],
                    });
                }
                continue;
            };
            let shown = std::iter::once(&read.value).chain(&read.siblings);
            for value in shown {
                let write = writes.iter().find(|op| written_value(op) == Some(value));
                let Some(write) = write.filter(|op| op.outcome != Outcome::Fail) else {
                    return Err(Violation {
                        check: "register values were written",
                        detail: format!(
                            "node {} holds {value:?} at {key:?}, which no write that may have \
                             happened wrote",
                            state.node
                        ),
                        ops: write.map(|op| (*op).clone()).into_iter().collect(),
                    });
                };
                let newer = writes.iter().find(|op| {
                    op.client == write.client
                        && op.after
                        && op.outcome == Outcome::Ok
                        && op.invoked > write.completed
                });
                if write.outcome == Outcome::Ok
                    && let Some(newer) = newer
                {
                    return Err(Violation {
                        check: "no resurrected register values",
                        detail: format!(
                            "node {} holds {value:?} at {key:?} although the same client \
                             overwrote it later, after its token",
                            state.node
                        ),
                        ops: vec![(*write).clone(), (*newer).clone()],
                    });
                }
            }
        }
    }
    Ok(())
}

/// The counter's final value on every node is at least the number of acknowledged `+1`s and at
/// most that plus the indeterminate ones.
pub fn check_counter(history: &[Op], finals: &[NodeState]) -> Result<(), Violation> {
    let adds = history.iter().filter(|op| op.action == Action::CounterAdd);
    let ok = adds.clone().filter(|op| op.outcome == Outcome::Ok).count() as i64;
    let maybe = adds
        .filter(|op| op.outcome == Outcome::Indeterminate)
        .count() as i64;
    for state in finals {
        let value = state.counter.unwrap_or(0);
        if value < ok || value > ok + maybe {
            return Err(Violation {
                check: "counter bounds",
                detail: format!(
                    "node {} ends at {value}, outside [{ok}, {}] ({ok} acknowledged +1s, \
                     {maybe} indeterminate)",
                    state.node,
                    ok + maybe
                ),
                ops: Vec::new(),
            });
        }
    }
    Ok(())
}

/// Read-your-writes, for reads made with `after=` the client's latest token:
/// - registers: the read holds a value, and neither its winner nor its siblings is one of the
///   client's own values that its later acknowledged write (made before the read) replaced;
/// - sets: the read holds every element the client's acknowledged adds added before it;
/// - counters: the read is at least the number of the client's acknowledged `+1`s before it.
pub fn check_read_your_writes(history: &[Op]) -> Result<(), Violation> {
    let clients: BTreeSet<usize> = history.iter().map(|op| op.client).collect();
    for client in clients {
        let ops: Vec<&Op> = history.iter().filter(|op| op.client == client).collect();
        for (index, read) in ops.iter().enumerate() {
            if read.outcome != Outcome::Ok || !read.after {
                continue;
            }
            let before = || {
                ops[..index]
                    .iter()
                    .filter(|op| op.outcome == Outcome::Ok)
                    .copied()
            };
            if let Some(violation) = stale_read(read, before) {
                return Err(violation);
            }
        }
    }
    Ok(())
}

/// Whether `read` misses one of the client's acknowledged writes in `before`.
fn stale_read<'a, I>(read: &Op, before: impl Fn() -> I) -> Option<Violation>
where
    I: Iterator<Item = &'a Op>,
{
    let violation = |detail: String, mut ops: Vec<Op>| {
        ops.push(read.clone());
        Some(Violation {
            check: "read your writes",
            detail,
            ops,
        })
    };
    match &read.action {
        Action::RegisterRead { key, read: seen } => {
            let mine: Vec<&Op> = before()
                .filter(|op| matches!(&op.action, Action::RegisterWrite { key: k, .. } if k == key))
                .collect();
            let last = *mine.last()?;
            let Some(seen) = seen else {
                return violation(format!("{key:?} read as absent"), vec![last.clone()]);
            };
            let replaced = &mine[..mine.len() - 1];
            let shown = std::iter::once(&seen.value).chain(&seen.siblings);
            for value in shown {
                if let Some(old) = replaced.iter().find(|op| written_value(op) == Some(value)) {
                    let detail = format!("{key:?} read as my older value {value:?}");
                    return violation(detail, vec![(*old).clone(), last.clone()]);
                }
            }
            None
        }
        Action::SetRead { elements } => {
            let empty = BTreeSet::new();
            let elements = elements.as_ref().unwrap_or(&empty);
            let missed = before().find(|op| {
                matches!(&op.action, Action::SetAdd { element } if !elements.contains(element))
            })?;
            violation(
                "the set read misses my add".to_owned(),
                vec![missed.clone()],
            )
        }
        Action::CounterRead { value } => {
            let mine: Vec<&Op> = before()
                .filter(|op| op.action == Action::CounterAdd)
                .collect();
            let value = value.unwrap_or(0);
            if value >= mine.len() as i64 {
                return None;
            }
            let detail = format!("counter read {value} after {} of my +1s", mine.len());
            violation(
                detail,
                mine.last().map(|op| (*op).clone()).into_iter().collect(),
            )
        }
        _ => None,
    }
}

/// Monotonic reads: a client's later acknowledged read of the set is a superset of its earlier
/// one, and of the counter is no smaller (both only grow in this workload). Only reads made with
/// `after=` count: without a token a client may move to a node that is behind.
pub fn check_monotonic_reads(history: &[Op]) -> Result<(), Violation> {
    let clients: BTreeSet<usize> = history.iter().map(|op| op.client).collect();
    for client in clients {
        let reads = history
            .iter()
            .filter(|op| op.client == client && op.outcome == Outcome::Ok && op.after);
        let mut last_set: Option<&Op> = None;
        let mut last_counter: Option<&Op> = None;
        for op in reads {
            match &op.action {
                Action::SetRead { elements } => {
                    if let Some(earlier) = last_set
                        && let Action::SetRead { elements: before } = &earlier.action
                    {
                        let now = elements.clone().unwrap_or_default();
                        let lost: Vec<&String> = before
                            .iter()
                            .flatten()
                            .filter(|e| !now.contains(*e))
                            .collect();
                        if !lost.is_empty() {
                            return Err(Violation {
                                check: "monotonic reads",
                                detail: format!("a later set read lost {lost:?}"),
                                ops: vec![earlier.clone(), op.clone()],
                            });
                        }
                    }
                    last_set = Some(op);
                }
                Action::CounterRead { value } => {
                    if let Some(earlier) = last_counter
                        && let Action::CounterRead { value: before } = &earlier.action
                        && value.unwrap_or(0) < before.unwrap_or(0)
                    {
                        return Err(Violation {
                            check: "monotonic reads",
                            detail: "a later counter read is smaller".to_owned(),
                            ops: vec![earlier.clone(), op.clone()],
                        });
                    }
                    last_counter = Some(op);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Causal order across keys (writes follow reads): a register value written with a token
/// causally follows every set element its writer had seen by then (in its last acknowledged set
/// read before the write) or added (acknowledged); so a client that reads that value and then
/// reads the set with its token must see all of those elements. A violation is "B seen without
/// A": the element's add or read at the writer, the write, the reader's register read and its
/// set read.
///
/// A requirement is dropped once one of the reader's set reads satisfies it: later reads are
/// supersets, which [`check_monotonic_reads`] checks.
pub fn check_causal_across_keys(history: &[Op]) -> Result<(), Violation> {
    causal_across_keys(history).map(drop)
}

/// Set elements a write causally follows, each with the operation that put it in the writer's
/// past (a set read or an add).
type CausalPast<'a> = Vec<(&'a str, &'a Op)>;

/// How many times [`check_causal_across_keys`] found a value's causal past in a later set read
/// (to show that a history exercised it), or its violation.
pub fn causal_across_keys(history: &[Op]) -> Result<usize, Violation> {
    let mut satisfied = 0;
    let clients: BTreeSet<usize> = history.iter().map(|op| op.client).collect();
    // Per register value written with a token: the write, and its causal past in the set (each
    // element with the operation that put it there, at the writer).
    let mut pasts: BTreeMap<&str, (&Op, CausalPast)> = BTreeMap::new();
    for &client in &clients {
        let mut last_read: Option<&Op> = None;
        let mut added: Vec<&Op> = Vec::new();
        let ops = history
            .iter()
            .filter(|op| op.client == client && op.outcome != Outcome::Fail);
        for op in ops {
            match &op.action {
                Action::SetRead { .. } if op.outcome == Outcome::Ok => {
                    last_read = Some(op);
                    added.clear();
                }
                Action::SetAdd { .. } if op.outcome == Outcome::Ok => added.push(op),
                Action::RegisterWrite { value, .. } if op.after => {
                    let mut past = Vec::new();
                    if let Some(read) = last_read
                        && let Action::SetRead {
                            elements: Some(elements),
                        } = &read.action
                    {
                        past.extend(elements.iter().map(|e| (e.as_str(), read)));
                    }
                    for add in &added {
                        if let Action::SetAdd { element } = &add.action {
                            past.push((element.as_str(), add));
                        }
                    }
                    pasts.insert(value.as_str(), (op, past));
                }
                _ => {}
            }
        }
    }
    for &client in &clients {
        // Values this client has read whose causal past it has not yet seen in the set.
        let mut pending: Vec<(&Op, &str)> = Vec::new();
        let ops = history
            .iter()
            .filter(|op| op.client == client && op.outcome == Outcome::Ok);
        for op in ops {
            match &op.action {
                Action::RegisterRead {
                    read: Some(seen), ..
                } => {
                    for value in std::iter::once(&seen.value).chain(&seen.siblings) {
                        if pasts.contains_key(value.as_str()) {
                            pending.push((op, value.as_str()));
                        }
                    }
                }
                Action::SetRead { elements } if op.after => {
                    let empty = BTreeSet::new();
                    let elements = elements.as_ref().unwrap_or(&empty);
                    for (register_read, value) in pending.drain(..) {
                        satisfied += 1;
                        let (write, past) = &pasts[value];
                        if let Some((element, source)) =
                            past.iter().find(|(e, _)| !elements.contains(*e))
                        {
                            return Err(Violation {
                                check: "causal order across keys",
                                detail: format!(
                                    "register value {value:?} was written after its writer saw \
                                     set element {element:?}; a client read the value, then \
                                     read the set with its token without the element"
                                ),
                                ops: vec![
                                    (*source).clone(),
                                    (*write).clone(),
                                    register_read.clone(),
                                    op.clone(),
                                ],
                            });
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(satisfied)
}

fn written_value(op: &Op) -> Option<&String> {
    match &op.action {
        Action::RegisterWrite { value, .. } => Some(value),
        _ => None,
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client {} @node {} [{:>8.3}s..{:>8.3}s] {:?}{} {:?}",
            self.client,
            self.node,
            self.invoked.as_secs_f64(),
            self.completed.as_secs_f64(),
            self.outcome,
            if self.after { " after=token" } else { "" },
            self.action
        )
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "check failed: {}: {}", self.check, self.detail)?;
        for op in &self.ops {
            writeln!(f, "  {op}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, at: u64, outcome: Outcome, action: Action) -> Op {
        Op {
            client,
            node: 0,
            action,
            invoked: Duration::from_millis(at),
            completed: Duration::from_millis(at + 5),
            outcome,
            after: true,
        }
    }

    fn write(client: usize, at: u64, value: &str) -> Op {
        let key = "r/0".to_owned();
        let value = value.to_owned();
        op(
            client,
            at,
            Outcome::Ok,
            Action::RegisterWrite { key, value },
        )
    }

    fn register_read(client: usize, at: u64, value: &str) -> Op {
        let read = Some(Register {
            value: value.to_owned(),
            siblings: Vec::new(),
        });
        let key = "r/0".to_owned();
        op(client, at, Outcome::Ok, Action::RegisterRead { key, read })
    }

    fn set_add(client: usize, at: u64, outcome: Outcome, element: &str) -> Op {
        let element = element.to_owned();
        op(client, at, outcome, Action::SetAdd { element })
    }

    fn set_read(client: usize, at: u64, elements: &[&str]) -> Op {
        let elements = Some(elements.iter().map(|e| (*e).to_owned()).collect());
        op(client, at, Outcome::Ok, Action::SetRead { elements })
    }

    fn state(node: usize, register: Option<&str>, counter: i64, set: &[&str]) -> NodeState {
        let read = register.map(|value| Register {
            value: value.to_owned(),
            siblings: Vec::new(),
        });
        NodeState {
            node,
            registers: BTreeMap::from([("r/0".to_owned(), read)]),
            counter: Some(counter),
            set: set.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    #[test]
    fn a_clean_history_passes_every_check() {
        let history = vec![
            write(0, 0, "a"),
            register_read(0, 10, "a"),
            write(0, 20, "b"),
            set_add(0, 30, Outcome::Ok, "x"),
            set_add(1, 30, Outcome::Indeterminate, "y"),
            set_read(0, 40, &["x"]),
            set_read(0, 50, &["x", "y"]),
            op(1, 60, Outcome::Ok, Action::CounterAdd),
            op(1, 70, Outcome::Indeterminate, Action::CounterAdd),
            op(1, 80, Outcome::Ok, Action::CounterRead { value: Some(1) }),
        ];
        let finals = vec![
            state(0, Some("b"), 1, &["x"]),
            state(1, Some("b"), 1, &["x"]),
        ];
        let violations = check_all(&history, &finals);
        assert!(violations.is_empty(), "{violations:?}");
    }

    #[test]
    fn a_lost_set_add_is_found() {
        let history = vec![
            set_add(0, 0, Outcome::Ok, "x"),
            set_add(0, 9, Outcome::Ok, "y"),
        ];
        let finals = vec![state(0, None, 0, &["x", "y"]), state(1, None, 0, &["y"])];
        let violation = check_set_adds_survive(&history, &finals).unwrap_err();
        assert_eq!(violation.ops, vec![history[0].clone()], "only the lost add");
    }

    #[test]
    fn a_phantom_set_element_is_found() {
        let history = vec![set_add(0, 0, Outcome::Fail, "x")];
        let finals = vec![state(0, None, 0, &["x"])];
        assert!(check_set_adds_survive(&history, &finals).is_err());
    }

    #[test]
    fn a_resurrected_register_value_is_found() {
        let history = vec![write(0, 0, "a"), write(1, 5, "c"), write(0, 20, "b")];
        let finals = vec![state(0, Some("a"), 0, &[])];
        let violation = check_registers(&history, &finals).unwrap_err();
        assert_eq!(violation.ops, vec![history[0].clone(), history[2].clone()]);
        // Another client's value may win over mine: not a violation.
        let finals = vec![state(0, Some("c"), 0, &[])];
        assert!(check_registers(&history, &finals).is_ok());
    }

    #[test]
    fn a_register_value_nobody_wrote_or_a_lost_key_is_found() {
        let history = vec![write(0, 0, "a")];
        assert!(check_registers(&history, &[state(0, Some("zzz"), 0, &[])]).is_err());
        assert!(check_registers(&history, &[state(0, None, 0, &[])]).is_err());
    }

    #[test]
    fn a_counter_out_of_bounds_is_found() {
        let history = vec![
            op(0, 0, Outcome::Ok, Action::CounterAdd),
            op(0, 10, Outcome::Indeterminate, Action::CounterAdd),
            op(0, 20, Outcome::Fail, Action::CounterAdd),
        ];
        assert!(check_counter(&history, &[state(0, None, 0, &[])]).is_err());
        assert!(check_counter(&history, &[state(0, None, 3, &[])]).is_err());
        assert!(check_counter(&history, &[state(0, None, 2, &[])]).is_ok());
    }

    #[test]
    fn diverged_nodes_are_found() {
        let finals = vec![state(0, Some("a"), 1, &[]), state(1, Some("a"), 2, &[])];
        assert!(check_convergence(&finals).is_err());
    }

    #[test]
    fn reading_my_older_register_value_is_found() {
        let history = vec![
            write(0, 0, "a"),
            write(0, 10, "b"),
            register_read(0, 20, "a"),
        ];
        let violation = check_read_your_writes(&history).unwrap_err();
        assert_eq!(violation.ops, history, "old write, new write, the read");
        // Without a token the read promises nothing.
        let mut untokened = history.clone();
        untokened[2].after = false;
        assert!(check_read_your_writes(&untokened).is_ok());
    }

    #[test]
    fn a_set_read_missing_my_add_is_found() {
        let history = vec![
            set_add(0, 0, Outcome::Ok, "x"),
            set_add(1, 0, Outcome::Ok, "y"),
            set_read(0, 10, &["y"]),
        ];
        let violation = check_read_your_writes(&history).unwrap_err();
        assert_eq!(violation.ops, vec![history[0].clone(), history[2].clone()]);
    }

    #[test]
    fn a_counter_read_below_my_adds_is_found() {
        let history = vec![
            op(0, 0, Outcome::Ok, Action::CounterAdd),
            op(0, 10, Outcome::Ok, Action::CounterAdd),
            op(0, 20, Outcome::Ok, Action::CounterRead { value: Some(1) }),
        ];
        assert!(check_read_your_writes(&history).is_err());
    }

    #[test]
    fn a_set_read_going_back_in_time_is_found() {
        let history = vec![set_read(0, 0, &["x", "y"]), set_read(0, 10, &["y"])];
        let violation = check_monotonic_reads(&history).unwrap_err();
        assert_eq!(violation.ops, history);
    }

    #[test]
    fn a_counter_read_going_back_in_time_is_found() {
        let history = vec![
            op(0, 0, Outcome::Ok, Action::CounterRead { value: Some(3) }),
            op(0, 10, Outcome::Ok, Action::CounterRead { value: Some(2) }),
        ];
        assert!(check_monotonic_reads(&history).is_err());
    }

    #[test]
    fn a_value_seen_without_what_its_writer_had_read_is_found() {
        let history = vec![
            set_read(0, 0, &["x"]),
            write(0, 10, "after-x"),
            register_read(1, 20, "after-x"),
            set_read(1, 30, &[]),
        ];
        let violation = check_causal_across_keys(&history).unwrap_err();
        assert_eq!(violation.check, "causal order across keys");
        assert_eq!(violation.ops, history);
    }

    #[test]
    fn a_value_seen_without_its_writers_own_add_is_found() {
        let history = vec![
            set_add(0, 0, Outcome::Ok, "mine"),
            write(0, 10, "after-mine"),
            register_read(1, 20, "after-mine"),
            set_read(1, 30, &["other"]),
        ];
        let violation = check_causal_across_keys(&history).unwrap_err();
        assert_eq!(violation.ops, history);
    }

    #[test]
    fn causal_reads_across_keys_pass() {
        let mut history = vec![
            set_read(0, 0, &["x"]),
            set_add(0, 5, Outcome::Ok, "y"),
            // An add that may not have happened is not part of the write's past.
            set_add(0, 7, Outcome::Indeterminate, "z"),
            write(0, 10, "after-x-y"),
            register_read(1, 20, "after-x-y"),
            set_read(1, 30, &["x", "y"]),
        ];
        assert!(check_causal_across_keys(&history).is_ok());
        // A set read without a token promises nothing.
        history[5] = Op {
            after: false,
            ..set_read(1, 30, &[])
        };
        assert!(check_causal_across_keys(&history).is_ok());
        // Nor does a write made without one.
        let history = vec![
            set_read(0, 0, &["x"]),
            Op {
                after: false,
                ..write(0, 10, "untracked")
            },
            register_read(1, 20, "untracked"),
            set_read(1, 30, &[]),
        ];
        assert!(check_causal_across_keys(&history).is_ok());
    }
}
