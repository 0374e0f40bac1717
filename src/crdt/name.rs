//! Validated names: of members (machines, schedulers), and of jobs, task groups and namespaces.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// The longest [`Name`], in bytes (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// A validated name: a cluster member's (what its TLS certificate is issued for, and so what
/// identifies it), or a job's, a task group's or a namespace's.
///
/// 1 to 63 bytes of lowercase ASCII letters, digits, `-`, `_` and `.`, starting with a letter or a
/// digit. Never a `/`, so a name is one segment of a key. One type for every kind of name, so a
/// machine's name can be stored under a scheduling key without a second check.
///
/// ```
/// use mantissa::crdt::Name;
/// assert!(Name::new("node-a").is_ok());
/// assert!(Name::new("db_1.prod-eu").is_ok());
/// assert!(Name::new("Node A").is_err());
/// assert!(Name::new("web/frontend").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(String);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid name {name:?}: use 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
)]
pub struct InvalidName {
    /// The refused text.
    pub name: String,
}

impl Name {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        let valid_char = |c: char| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
        };
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name.chars().all(valid_char)
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
        if valid {
            Ok(Name(name))
        } else {
            Err(InvalidName { name })
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Name::new(name).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_key_segment() {
        assert!(Name::new("a").is_ok());
        assert!(Name::new("db_1.prod-eu").is_ok());
        assert!(Name::new("").is_err());
        assert!(Name::new("-a").is_err());
        assert!(Name::new("_a").is_err());
        assert!(Name::new("A").is_err());
        assert!(Name::new("a/b").is_err());
        assert!(Name::new("a b").is_err());
        assert!(Name::new("a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(Name::new("a".repeat(MAX_NAME_LEN + 1)).is_err());
    }

    /// Both former spellings of a name accept what their docs promised: member names
    /// (`node-a`, `seed.7801`) and scheduling names with `_` (operations.md: node names may
    /// hold `_`).
    #[test]
    fn member_and_scheduling_names_are_both_accepted() {
        for name in [
            "node-a",
            "n1",
            "seed.7801",
            "node_b",
            "web-frontend",
            "default",
        ] {
            assert!(Name::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn names_are_checked_when_read() {
        let name: Name = serde_json::from_str("\"node_a\"").expect("valid");
        assert_eq!(
            serde_json::to_string(&name).expect("serializes"),
            "\"node_a\""
        );
        assert!(serde_json::from_str::<Name>("\"Node\"").is_err());
    }
}
