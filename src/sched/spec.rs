//! What the cluster is asked to run and where it can run: node records and job specs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::sched::{Name, Resources, SchedError, TaskId};

/// The most instances one task group may ask for.
pub const MAX_GROUP_COUNT: u32 = 10_000;

/// A machine's offer, stored under `nodes/<name>`, written only by the machine itself.
///
/// ```
/// use mantissa::sched::{Name, NodeRecord, Resources};
/// let node = NodeRecord::new(Name::new("node-a").unwrap(), Resources::new(4_000, 8 << 30))
///     .label("zone", "eu-1");
/// assert_eq!(node.labels["zone"], "eu-1");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    /// The member name of the machine; must match the key.
    pub name: Name,
    /// What tasks may use in total.
    pub capacity: Resources,
    /// Attributes constraints select on (zone, rack, instance type).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl NodeRecord {
    /// A node without labels.
    pub fn new(name: Name, capacity: Resources) -> Self {
        NodeRecord {
            name,
            capacity,
            labels: BTreeMap::new(),
        }
    }

    /// The same record with the label `key` set to `value`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }
}

/// How a scheduler picks among the machines a task fits on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Strategy {
    /// The fullest machine the task fits on: keeps whole machines free for large tasks.
    #[default]
    BinPack,
    /// The machine with the fewest tasks of the same group, then the emptiest: spreads the
    /// failure domain.
    Spread,
}

/// Where a task group's tasks may run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// Labels a machine must carry, with these exact values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Spread the group's tasks evenly across the values of this label (a machine without it
    /// counts as the value `""`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
}

impl Constraints {
    /// Whether `node` carries every required label.
    pub fn allows(&self, node: &NodeRecord) -> bool {
        self.labels
            .iter()
            .all(|(key, value)| node.labels.get(key) == Some(value))
    }
}

/// A set of identical tasks within a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskGroup {
    /// Unique within the job.
    pub name: Name,
    /// How many instances to run.
    pub count: u32,
    /// What each instance needs.
    pub resources: Resources,
    /// Where instances may run.
    #[serde(default)]
    pub constraints: Constraints,
}

/// A job, stored under `jobs/<name>` as one register, written by any client at any node.
///
/// A register, not a document: concurrent submissions of one job resolve to one whole spec (the
/// last writer's), never to a field-by-field mix that nobody wrote.
///
/// ```
/// use mantissa::sched::{JobSpec, Name, Resources, TaskGroup};
/// let job = JobSpec::new(Name::new("web").unwrap())
///     .group(TaskGroup::new(Name::new("api").unwrap(), 3, Resources::new(500, 256 << 20)));
/// assert_eq!(job.tasks().count(), 3);
/// job.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's name; must match the key.
    pub name: Name,
    /// The namespace its tasks count against for quotas.
    #[serde(default = "default_namespace")]
    pub namespace: Name,
    /// Higher runs first when machines are contended.
    #[serde(default)]
    pub priority: u32,
    /// How its tasks are placed.
    #[serde(default)]
    pub strategy: Strategy,
    /// The task groups.
    pub groups: Vec<TaskGroup>,
}

/// One task instance a job asks for, with everything placement and admission need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Which instance.
    pub id: TaskId,
    /// The job's namespace.
    pub namespace: Name,
    /// The job's priority.
    pub priority: u32,
    /// The job's strategy.
    pub strategy: Strategy,
    /// What the instance needs.
    pub resources: Resources,
    /// Where it may run.
    pub constraints: Constraints,
}

impl Task {
    /// The `index`-th instance of `group` in `job`.
    pub(crate) fn of(job: &JobSpec, group: &TaskGroup, index: u32) -> Task {
        Task {
            id: TaskId::new(job.name.clone(), group.name.clone(), index),
            namespace: job.namespace.clone(),
            priority: job.priority,
            strategy: job.strategy,
            resources: group.resources.clone(),
            constraints: group.constraints.clone(),
        }
    }
}

fn default_namespace() -> Name {
    Name::new("default").expect("\"default\" is a valid name")
}

impl TaskGroup {
    /// A group of `count` tasks needing `resources` each, without constraints.
    pub fn new(name: Name, count: u32, resources: Resources) -> Self {
        TaskGroup {
            name,
            count,
            resources,
            constraints: Constraints::default(),
        }
    }
}

impl JobSpec {
    /// A job in the `default` namespace at priority 0, bin-packed, without groups.
    pub fn new(name: Name) -> Self {
        JobSpec {
            name,
            namespace: default_namespace(),
            priority: 0,
            strategy: Strategy::default(),
            groups: Vec::new(),
        }
    }

    /// The same job with one more group.
    pub fn group(mut self, group: TaskGroup) -> Self {
        self.groups.push(group);
        self
    }

    /// Checks what the types cannot: at least one group, unique group names, bounded counts.
    pub fn validate(&self) -> Result<(), SchedError> {
        let invalid = |reason: String| Err(SchedError::InvalidJob(reason));
        if self.groups.is_empty() {
            return invalid(format!("job {} has no task group", self.name));
        }
        let mut names = BTreeSet::new();
        for group in &self.groups {
            if !names.insert(&group.name) {
                return invalid(format!("task group {} appears twice", group.name));
            }
            if group.count > MAX_GROUP_COUNT {
                return invalid(format!(
                    "task group {} asks for {} tasks; the limit is {MAX_GROUP_COUNT}",
                    group.name, group.count
                ));
            }
        }
        Ok(())
    }

    /// Every task instance the job asks for, group by group.
    pub fn tasks(&self) -> impl Iterator<Item = Task> + '_ {
        self.groups.iter().flat_map(move |group| {
            (0..group.count.min(MAX_GROUP_COUNT)).map(move |index| Task::of(self, group, index))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::new(text).expect("valid name")
    }

    #[test]
    fn a_job_asks_for_count_tasks_per_group() {
        let job = JobSpec::new(name("web"))
            .group(TaskGroup::new(name("api"), 2, Resources::new(100, 0)))
            .group(TaskGroup::new(name("cache"), 1, Resources::new(50, 0)));
        let ids: Vec<String> = job.tasks().map(|task| task.id.to_string()).collect();
        assert_eq!(ids, ["web/api/0", "web/api/1", "web/cache/0"]);
    }

    #[test]
    fn validation_refuses_what_the_types_allow() {
        assert!(JobSpec::new(name("empty")).validate().is_err());
        let twice = JobSpec::new(name("j"))
            .group(TaskGroup::new(name("g"), 1, Resources::default()))
            .group(TaskGroup::new(name("g"), 1, Resources::default()));
        assert!(twice.validate().is_err());
        let huge = JobSpec::new(name("j")).group(TaskGroup::new(
            name("g"),
            MAX_GROUP_COUNT + 1,
            Resources::default(),
        ));
        assert!(huge.validate().is_err());
    }

    #[test]
    fn json_defaults_fill_optional_fields() {
        let job: JobSpec = serde_json::from_str(
            r#"{"name":"web","groups":[{"name":"api","count":1,"resources":{"cpu_millis":5}}]}"#,
        )
        .expect("parses");
        assert_eq!(job.namespace.as_str(), "default");
        assert_eq!(job.strategy, Strategy::BinPack);
        assert_eq!(job.groups[0].resources, Resources::new(5, 0));
    }

    #[test]
    fn constraints_require_exact_labels() {
        let node = NodeRecord::new(Name::new("n1").expect("valid"), Resources::default())
            .label("zone", "a");
        let mut constraints = Constraints::default();
        assert!(constraints.allows(&node));
        constraints.labels.insert("zone".into(), "a".into());
        assert!(constraints.allows(&node));
        constraints.labels.insert("zone".into(), "b".into());
        assert!(!constraints.allows(&node));
    }
}
