//! Protocol settings, with presets for a LAN and a WAN.

use std::num::NonZeroU32;
use std::time::Duration;

/// Settings of the gossip protocol. Start from [`Config::lan`] or [`Config::wan`].
///
/// Fields are public for tuning; [`Config::validate`] (which [`Node::new`](crate::gossip::Node::new)
/// calls) refuses combinations that cannot work.
///
/// ```
/// use std::time::Duration;
/// use mantissa::gossip::Config;
/// let mut config = Config::lan();
/// config.anti_entropy_interval = Duration::from_millis(500);
/// config.validate().unwrap();
/// // Membership heals within seconds on a LAN; the WAN preset probes less often.
/// assert!(config.membership_heal_bound() < Config::wan().membership_heal_bound());
///
/// config.eager_peers = 0;
/// let refused = config.validate().unwrap_err();
/// assert_eq!(refused.field, "eager_peers");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The expected number of members; tunes how long suspicion lasts and how often membership
    /// updates are repeated.
    pub cluster_size: NonZeroU32,
    /// Peers a new write is pushed to eagerly (the dissemination tree's fan-out before pruning).
    pub eager_peers: usize,
    /// Peers that are only told "I have this write" and ask for it when their tree branch fails.
    pub lazy_peers: usize,
    /// How long "I have" announcements gather before they are sent, to batch them.
    pub announce_delay: Duration,
    /// How long a node waits for an announced write to arrive through the tree before it asks the
    /// announcer for it (and makes that link part of the tree).
    pub graft_timeout: Duration,
    /// How often a node reconciles with one random peer. Anti-entropy repairs whatever
    /// dissemination lost: a dropped message, a partition, a restart.
    pub anti_entropy_interval: Duration,
    /// How often tombstones that every live member has seen are collected.
    pub gc_interval: Duration,
    /// Recently seen writes kept to answer peers that ask for one, at most.
    pub recent_writes: usize,
    /// Bytes of recently seen writes kept ([`crate::crdt::Delta::size`]), at most; older ones go
    /// first and reach a peer that still lacks them through anti-entropy.
    pub recent_writes_bytes: usize,
    /// The largest message accepted from a peer, in bytes.
    pub max_message_bytes: usize,
    /// Sync deltas larger than this travel in pieces of this size.
    pub sync_chunk_bytes: usize,
    /// The largest sync delta (such as a full state for a new member) accepted in pieces.
    pub max_sync_bytes: usize,
    /// The largest SWIM packet; must fit a QUIC datagram.
    pub max_swim_packet: usize,
    /// SWIM settings are derived from memberlist's LAN defaults (`true`) or WAN defaults.
    pub lan: bool,
}

/// Why a [`Config`] was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid gossip config: {field} {problem}")]
pub struct ConfigError {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl Config {
    /// For members in one data centre: SWIM probes every second, anti-entropy every second.
    pub fn lan() -> Self {
        Config {
            cluster_size: NonZeroU32::new(32).expect("32 is not zero"),
            eager_peers: 3,
            lazy_peers: 6,
            announce_delay: Duration::from_millis(5),
            graft_timeout: Duration::from_millis(20),
            anti_entropy_interval: Duration::from_secs(1),
            gc_interval: Duration::from_secs(10),
            recent_writes: 16_384,
            recent_writes_bytes: 64 * 1024 * 1024,
            max_message_bytes: 64 * 1024 * 1024,
            sync_chunk_bytes: 1024 * 1024,
            max_sync_bytes: 1024 * 1024 * 1024,
            max_swim_packet: 1_100,
            lan: true,
        }
    }

    /// For members spread across regions: slower probes and longer timeouts.
    pub fn wan() -> Self {
        Config {
            announce_delay: Duration::from_millis(100),
            graft_timeout: Duration::from_millis(800),
            anti_entropy_interval: Duration::from_secs(5),
            gc_interval: Duration::from_secs(60),
            lan: false,
            ..Config::lan()
        }
    }

    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |field, problem| Err(ConfigError { field, problem });
        if self.eager_peers == 0 {
            return fail("eager_peers", "must be at least 1");
        }
        if self.anti_entropy_interval.is_zero() {
            return fail("anti_entropy_interval", "must be positive");
        }
        if self.gc_interval.is_zero() {
            return fail("gc_interval", "must be positive");
        }
        if self.graft_timeout.is_zero() {
            return fail("graft_timeout", "must be positive");
        }
        if self.max_swim_packet < 512 {
            return fail("max_swim_packet", "must be at least 512 bytes");
        }
        if self.max_message_bytes < 64 * 1024 {
            return fail("max_message_bytes", "must be at least 64 KiB");
        }
        if self.sync_chunk_bytes < 1024 || self.sync_chunk_bytes > self.max_message_bytes / 2 {
            return fail(
                "sync_chunk_bytes",
                "must be between 1 KiB and half of max_message_bytes",
            );
        }
        if self.max_sync_bytes < self.sync_chunk_bytes {
            return fail("max_sync_bytes", "must be at least sync_chunk_bytes");
        }
        Ok(())
    }

    /// How long after a partition heals every member counts every live member alive again, when
    /// no other fault follows: one probe period (or anti-entropy interval, for a member that
    /// counts everyone down) for the first announcement to a member counted as down to cross
    /// (see [`Config::swim`]), then a suspicion timeout for the new generations of the members
    /// declared down to spread, since SWIM sizes that timeout for an update to reach the whole
    /// cluster. 7.0 s on a LAN and 50 s on a WAN for 32 members; it grows with the logarithm of
    /// `cluster_size`.
    ///
    /// An expectation, not a guarantee: SWIM spreads updates at random over lossy datagrams.
    pub fn membership_heal_bound(&self) -> Duration {
        let swim = self.swim();
        swim.probe_period.max(self.anti_entropy_interval) + swim.suspect_to_down_after
    }

    /// The SWIM settings these derive.
    ///
    /// One change to the presets: members counted as down are sent an announcement every probe
    /// period (1 s LAN, 5 s WAN) instead of every 65 s / 125 s. SWIM never probes a member it
    /// counts as down, so after a partition long enough for each side to declare the other down,
    /// these announcements are the only membership traffic that crosses it: the first one to
    /// arrive tells its sender or its receiver that it was declared down, that member rejoins
    /// under its next generation, and the others follow as its new generation spreads (see
    /// [`Config::membership_heal_bound`]). Each tick goes to 2 random members counted as down,
    /// so the cost stays 2 datagrams per probe period however many there are.
    pub(crate) fn swim(&self) -> foca::Config {
        let mut swim = if self.lan {
            foca::Config::new_lan(self.cluster_size)
        } else {
            foca::Config::new_wan(self.cluster_size)
        };
        swim.max_packet_size = std::num::NonZeroUsize::new(self.max_swim_packet)
            .expect("validated to be at least 512");
        swim.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: swim.probe_period,
            num_members: std::num::NonZeroUsize::new(2).expect("2 is not zero"),
        });
        swim
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::lan()
    }
}
