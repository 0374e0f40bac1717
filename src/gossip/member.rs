//! Cluster members: who they are (a name their certificate proves) and where to reach them.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::crdt::{Name, NodeId};

/// One member of the cluster as the membership protocol knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// Its certified name.
    pub name: Name,
    /// The id its replica writes under (new for every data directory).
    pub replica: NodeId,
    /// Where it says it can be reached: a hint, checked against its certificate on connect.
    pub addr: SocketAddr,
    /// Bumped each time it rejoins after being declared down, so the new identity wins.
    pub generation: u32,
}

impl Member {
    /// A member in its first generation.
    pub fn new(name: Name, replica: NodeId, addr: SocketAddr) -> Self {
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
        let name = Name::new(format!("seed.{}", addr.port()))
            .expect("`seed.` and a port number make a valid name");
        Member {
            name,
            replica: NodeId(0),
            addr,
            generation: 0,
        }
    }

    /// Whether this is a [`Member::seed`] stand-in rather than a real member.
    pub(crate) fn is_seed(&self) -> bool {
        self.replica == NodeId(0) && self.name.as_str().starts_with("seed.")
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
