//! Cluster members: who they are (a name their certificate proves) and where to reach them.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::crdt::NodeId;

/// The longest member name, in bytes (a DNS label).
pub const MAX_MEMBER_NAME_LEN: usize = 63;

/// A member's name: what its TLS certificate is issued for, and so what identifies it.
///
/// 1 to 63 bytes of lowercase ASCII letters, digits, `-` and `.`, starting with a letter or digit.
///
/// ```
/// use mantissa::gossip::MemberName;
/// assert!(MemberName::new("node-a").is_ok());
/// assert!(MemberName::new("Node A").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct MemberName(String);

/// Why a member name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid member name {name:?}: use 1-63 lowercase letters, digits, '-' or '.', starting with a letter or digit"
)]
pub struct InvalidMemberName {
    /// The refused name.
    pub name: String,
}

impl MemberName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidMemberName> {
        let name = name.into();
        let valid_char =
            |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        let valid = !name.is_empty()
            && name.len() <= MAX_MEMBER_NAME_LEN
            && name.chars().all(valid_char)
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
        if valid {
            Ok(MemberName(name))
        } else {
            Err(InvalidMemberName { name })
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for MemberName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for MemberName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MemberName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        MemberName::new(name).map_err(serde::de::Error::custom)
    }
}

/// One member of the cluster as the membership protocol knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Its certified name.
    pub name: MemberName,
    /// The id its replica writes under (new for every data directory).
    pub replica: NodeId,
    /// Where it says it can be reached: a hint, checked against its certificate on connect.
    pub addr: SocketAddr,
    /// Bumped each time it rejoins after being declared down, so the new identity wins.
    pub generation: u32,
}

impl Member {
    /// A member in its first generation.
    pub fn new(name: MemberName, replica: NodeId, addr: SocketAddr) -> Self {
        Member {
            name,
            replica,
            addr,
            generation: 0,
        }
    }

    /// A stand-in for a seed address whose member is not known yet: the first message goes
    /// there, and whoever answers (with a valid certificate) is learned from its reply.
    pub(crate) fn seed(addr: SocketAddr) -> Self {
        let name = format!("seed.{}", addr.port());
        Member {
            name: MemberName(name),
            replica: NodeId(0),
            addr,
            generation: 0,
        }
    }

    /// Whether this is a [`Member::seed`] stand-in rather than a real member.
    pub(crate) fn is_seed(&self) -> bool {
        self.replica == NodeId(0) && self.name.0.starts_with("seed.")
    }
}

/// SWIM tells identities of one member apart by address: a joiner knows only a seed's address,
/// and SWIM accepts an announcement addressed to any identity with its own address.
impl foca::Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A newer incarnation (a larger replica id: the runtime makes them grow with time) wins,
    /// whatever generation an older one reached; within one incarnation, the later generation.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.replica, self.generation) > (adversary.replica, adversary.generation)
    }
}
