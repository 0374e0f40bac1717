//! Where scheduling state lives in the keyspace, and how its values are encoded (JSON, so HTTP
//! clients can read them as they are).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::crdt::{Hlc, HlcClock, Key, Replica};
use crate::sched::{Name, TaskId};

/// The prefix of every scheduling key. Only the scheduling API writes under it: clients' key-value
/// writes there are refused (see [`is_reserved`]), so a user's own `nodes/…` keys never collide
/// with a machine's record.
pub const RESERVED: &str = "_sched/";

/// Whether `key` lies under the scheduling prefix, where only the scheduling API writes.
pub fn is_reserved(key: &[u8]) -> bool {
    key.starts_with(RESERVED.as_bytes())
}

/// `_sched/nodes/<node>`: a [`NodeRecord`](crate::sched::NodeRecord), written by the node.
pub const NODES: &str = "_sched/nodes/";
/// `_sched/schedulers/<member>`: a [`SchedulerRecord`](crate::sched::SchedulerRecord), written by the
/// scheduler.
pub const SCHEDULERS: &str = "_sched/schedulers/";
/// `_sched/jobs/<job>`: a [`JobSpec`](crate::sched::JobSpec), written by any client.
pub const JOBS: &str = "_sched/jobs/";
/// `_sched/claims/<node>/<job>/<group>/<index>`: a [`Claim`](crate::sched::Claim), written by a
/// scheduler, deleted by the node once decided.
pub const CLAIMS: &str = "_sched/claims/";
/// `_sched/alloc/<node>`: the node's [`Ledger`](crate::sched::Ledger), written only by the node.
pub const ALLOC: &str = "_sched/alloc/";
/// `_sched/quotas/<namespace>`: a [`QuotaSpec`](crate::sched::QuotaSpec), written once.
pub const QUOTAS: &str = "_sched/quotas/";
/// `_sched/quota-shares/<namespace>/<member>`: a [`Share`](crate::sched::Share), written only by the
/// member.
pub const QUOTA_SHARES: &str = "_sched/quota-shares/";

/// Builds a key from parts that are validated names: at most a few hundred bytes, far below the
/// key length limit, and never empty.
fn key(parts: &[&str]) -> Key {
    Key::new(parts.concat()).expect("keys built from validated names are short and non-empty")
}

pub(crate) fn node(node: &Name) -> Key {
    key(&[NODES, node.as_str()])
}

pub(crate) fn scheduler(scheduler: &Name) -> Key {
    key(&[SCHEDULERS, scheduler.as_str()])
}

pub(crate) fn job(job: &Name) -> Key {
    key(&[JOBS, job.as_str()])
}

pub(crate) fn claim(node: &Name, task: &TaskId) -> Key {
    key(&[CLAIMS, node.as_str(), "/", &task.to_string()])
}

pub(crate) fn ledger(node: &Name) -> Key {
    key(&[ALLOC, node.as_str()])
}

pub(crate) fn quota(namespace: &Name) -> Key {
    key(&[QUOTAS, namespace.as_str()])
}

pub(crate) fn share(namespace: &Name, member: &Name) -> Key {
    key(&[QUOTA_SHARES, namespace.as_str(), "/", member.as_str()])
}

/// The part of `key` after `prefix`, as text.
pub(crate) fn suffix<'a>(key: &'a Key, prefix: &str) -> Option<&'a str> {
    std::str::from_utf8(key.as_bytes().strip_prefix(prefix.as_bytes())?).ok()
}

/// Encodes a record as JSON.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("scheduling records serialize: every map key is a string")
}

/// Decodes a record; `None` for bytes that are not one.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

/// The timestamp `replica`'s next write at `now_millis` will carry: lets a record name its own
/// write (a claim's `at`, an admission's time) before it is written.
pub(crate) fn next_timestamp(replica: &Replica, now_millis: u64) -> Hlc {
    let mut clock = HlcClock::new(replica.node());
    clock.observe(replica.clock());
    clock.tick(now_millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crdt::{NodeId, Value};

    #[test]
    fn the_predicted_timestamp_is_the_one_the_write_gets() {
        let mut replica = Replica::new(NodeId(7));
        let key = Key::new("k").expect("valid");
        for now in [1_000, 1_000, 500, 2_000] {
            let predicted = next_timestamp(&replica, now);
            replica
                .put(key.clone(), b"v".to_vec(), now)
                .expect("writes");
            let Some(Value::Register(register)) = replica.get(&key).expect("reads") else {
                panic!("a register");
            };
            assert_eq!(register.written_at, predicted);
        }
    }

    #[test]
    fn claim_keys_nest_under_their_node() {
        let node = Name::new("n1").expect("valid");
        let task = TaskId::parse("web/api/3").expect("valid");
        let key = claim(&node, &task);
        assert_eq!(key.as_bytes(), b"_sched/claims/n1/web/api/3");
        assert!(is_reserved(key.as_bytes()) && !is_reserved(b"claims/n1"));
        assert_eq!(suffix(&key, CLAIMS), Some("n1/web/api/3"));
    }
}
