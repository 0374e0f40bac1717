//! Task instances: the `index`-th task of a group in a job, and its one spelling.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::crdt::{InvalidName, Name};

/// One task instance: the `index`-th task of `group` in `job`, written `job/group/index`.
///
/// Ordered by job, group, then index as a number.
///
/// ```
/// use mantissa::sched::TaskId;
/// let task = TaskId::parse("web/api/2").unwrap();
/// assert_eq!(task.index, 2);
/// assert_eq!(task.to_string(), "web/api/2");
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId {
    /// The job that asks for it.
    pub job: Name,
    /// The task group within the job.
    pub group: Name,
    /// Which instance of the group, counting from 0.
    pub index: u32,
}

impl TaskId {
    /// The `index`-th task of `group` in `job`.
    pub fn new(job: Name, group: Name, index: u32) -> Self {
        TaskId { job, group, index }
    }

    /// Parses `job/group/index`.
    pub fn parse(text: &str) -> Result<Self, InvalidName> {
        let invalid = || InvalidName {
            name: text.to_owned(),
        };
        let mut parts = text.split('/');
        let (Some(job), Some(group), Some(index), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        // A canonical decimal only, so one task has one spelling (and one key).
        let canonical = index == "0" || (!index.starts_with('0') && !index.starts_with('+'));
        let index = index
            .parse()
            .ok()
            .filter(|_| canonical)
            .ok_or_else(invalid)?;
        Ok(TaskId::new(Name::new(job)?, Name::new(group)?, index))
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.job, self.group, self.index)
    }
}

impl Serialize for TaskId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TaskId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        TaskId::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_have_one_spelling() {
        let task = TaskId::parse("web/api/10").expect("valid");
        assert_eq!(task.to_string(), "web/api/10");
        for bad in [
            "web/api",
            "web/api/1/2",
            "web/api/01",
            "web/api/+1",
            "web/api/x",
            "/a/1",
        ] {
            assert!(TaskId::parse(bad).is_err(), "{bad}");
        }
        assert!(TaskId::parse("web/api/0").is_ok());
    }

    #[test]
    fn task_ids_order_by_index_as_a_number() {
        let nine = TaskId::parse("web/api/9").expect("valid");
        let ten = TaskId::parse("web/api/10").expect("valid");
        assert!(nine < ten);
    }

    #[test]
    fn task_ids_travel_as_strings() {
        let task = TaskId::parse("web/api/3").expect("valid");
        let json = serde_json::to_string(&task).expect("serializes");
        assert_eq!(json, "\"web/api/3\"");
        let back: TaskId = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, task);
        assert!(serde_json::from_str::<TaskId>("\"web/API/3\"").is_err());
    }
}
