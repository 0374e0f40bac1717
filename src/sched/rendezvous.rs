//! Who places a task, and when it may be tried again: rendezvous hashing over the live
//! schedulers, and exponential backoff after rejections.

use crate::sched::{Name, TaskId};

/// The delay before the first retry of a rejected task.
pub const BACKOFF_BASE_MILLIS: u64 = 250;

/// The longest delay between retries of a task.
pub const BACKOFF_MAX_MILLIS: u64 = 10_000;

/// The weight of `member` for `task` in rendezvous hashing: stable across builds and platforms.
pub fn weight(task: &TaskId, member: &str) -> u64 {
    Weigher::new(task).weight(member)
}

/// The [`weight`]s of one task, for many members: hashes the task once.
pub(crate) struct Weigher {
    /// FNV-1a state after "task\0".
    prefix: u64,
}

impl Weigher {
    pub(crate) fn new(task: &TaskId) -> Self {
        // FNV-1a over "task\0member", then a splitmix64 finaliser so that similar names
        // (node-1, node-2) do not get correlated weights.
        let mut prefix: u64 = 0xcbf2_9ce4_8422_2325;
        let task = task.to_string();
        for &byte in task.as_bytes().iter().chain(b"\0") {
            prefix = fnv(prefix, byte);
        }
        Weigher { prefix }
    }

    pub(crate) fn weight(&self, member: &str) -> u64 {
        let mut hash = member
            .as_bytes()
            .iter()
            .fold(self.prefix, |h, &b| fnv(h, b));
        hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        hash ^ (hash >> 31)
    }
}

fn fnv(hash: u64, byte: u8) -> u64 {
    (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
}

/// The scheduler responsible for placing `task`: the one with the highest [`weight`] (ties: the
/// smaller name). `None` when there is no scheduler.
///
/// A pure function of the member list, so every replica with the same list agrees, and when a
/// scheduler joins or leaves only the tasks it wins or held move.
///
/// ```
/// use mantissa::sched::{responsible, Name, TaskId};
/// let schedulers: Vec<Name> =
///     ["s1", "s2", "s3"].iter().map(|s| Name::new(*s).unwrap()).collect();
/// let task = TaskId::parse("web/api/0").unwrap();
/// let owner = responsible(&task, &schedulers).unwrap();
/// let mut reversed = schedulers.clone();
/// reversed.reverse();
/// assert_eq!(responsible(&task, &reversed), Some(owner));
/// ```
pub fn responsible<'a>(
    task: &TaskId,
    schedulers: impl IntoIterator<Item = &'a Name>,
) -> Option<&'a Name> {
    let weigher = Weigher::new(task);
    schedulers
        .into_iter()
        .map(|member| (weigher.weight(member.as_str()), member))
        .max_by(|(a_weight, a), (b_weight, b)| a_weight.cmp(b_weight).then_with(|| b.cmp(a)))
        .map(|(_, member)| member)
}

/// How long to wait, after the rejection that ended attempt `attempt - 1`, before making claim
/// number `attempt`: 0 for the first claim, then doubling from [`BACKOFF_BASE_MILLIS`] up to
/// [`BACKOFF_MAX_MILLIS`].
pub fn backoff_millis(attempt: u32) -> u64 {
    match attempt {
        0 => 0,
        n => BACKOFF_BASE_MILLIS
            .saturating_mul(1u64 << (n - 1).min(32))
            .min(BACKOFF_MAX_MILLIS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Vec<Name> {
        names
            .iter()
            .map(|name| Name::new(*name).expect("valid"))
            .collect()
    }

    fn task(index: u32) -> TaskId {
        TaskId::parse(&format!("job/group/{index}")).expect("valid")
    }

    #[test]
    fn the_weight_is_stable_across_builds() {
        // Pinned (computed independently): a change here would move tasks between schedulers
        // while a cluster runs mixed versions.
        assert_eq!(weight(&task(0), "s1"), 0x82c7_459e_1a62_442d);
    }

    #[test]
    fn removing_a_scheduler_moves_only_its_tasks() {
        let all = members(&["s1", "s2", "s3", "s4"]);
        let without_s3 = members(&["s1", "s2", "s4"]);
        for index in 0..500 {
            let before = responsible(&task(index), &all).expect("some scheduler");
            let after = responsible(&task(index), &without_s3).expect("some scheduler");
            if before.as_str() != "s3" {
                assert_eq!(before, after, "task {index} moved");
            } else {
                assert_ne!(after.as_str(), "s3");
            }
        }
    }

    #[test]
    fn tasks_spread_over_schedulers() {
        let all = members(&["s1", "s2", "s3", "s4"]);
        let mut counts = [0usize; 4];
        for index in 0..4_000 {
            let owner = responsible(&task(index), &all).expect("some scheduler");
            counts[all.iter().position(|m| m == owner).expect("a member")] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1_200).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn nobody_is_responsible_without_schedulers() {
        assert_eq!(responsible(&task(0), &[]), None);
    }

    #[test]
    fn backoff_doubles_up_to_a_ceiling() {
        assert_eq!(backoff_millis(0), 0);
        assert_eq!(backoff_millis(1), BACKOFF_BASE_MILLIS);
        assert_eq!(backoff_millis(2), 2 * BACKOFF_BASE_MILLIS);
        assert_eq!(backoff_millis(3), 4 * BACKOFF_BASE_MILLIS);
        assert_eq!(backoff_millis(40), BACKOFF_MAX_MILLIS);
        assert_eq!(backoff_millis(u32::MAX), BACKOFF_MAX_MILLIS);
    }
}
