//! The simulated network the two turmoil suites drive: each link's healthy latency, drawn from
//! the seed, and the link faults over it (partitions, held, slow and jittery links, loss). What a
//! crash does to a node stays with each suite, which keeps its own state.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// The links between the simulated nodes, numbered from 0, and their healthy latencies.
pub struct Network {
    ips: Vec<IpAddr>,
    /// Each link's least latency when healthy, by seed; `jitter` more at most.
    latency: BTreeMap<(usize, usize), Duration>,
    jitter: Duration,
}

impl Network {
    /// The network between `hosts` of `sim`; each link `(a, b)` with `a < b`, in that order, takes
    /// its healthy latency from `latency` (so a seed draws the same latencies), up to `jitter` more.
    pub fn new(
        sim: &turmoil::Sim<'_>,
        hosts: impl IntoIterator<Item = String>,
        jitter: Duration,
        mut latency: impl FnMut() -> Duration,
    ) -> Network {
        let ips: Vec<IpAddr> = hosts.into_iter().map(|host| sim.lookup(host)).collect();
        let mut latencies = BTreeMap::new();
        for a in 0..ips.len() {
            for b in a + 1..ips.len() {
                latencies.insert((a, b), latency());
            }
        }
        Network {
            ips,
            latency: latencies,
            jitter,
        }
    }

    /// How many nodes it links.
    pub fn nodes(&self) -> usize {
        self.ips.len()
    }

    /// Repairs and releases every link, restores healthy latencies and stops dropping messages.
    pub fn heal(&self, sim: &mut turmoil::Sim<'_>) {
        for (&(a, b), &latency) in &self.latency {
            let (a, b) = (self.ips[a], self.ips[b]);
            sim.repair(a, b);
            sim.release(a, b);
            sim.set_link_latency(a, b, latency);
            sim.set_link_max_message_latency(a, b, latency + self.jitter);
        }
        sim.set_fail_rate(0.0);
    }

    /// Cuts the nodes of `side` off from the others.
    pub fn partition(&self, sim: &mut turmoil::Sim<'_>, side: &[usize]) {
        for &a in side {
            for b in (0..self.ips.len()).filter(|b| !side.contains(b)) {
                sim.partition(self.ips[a], self.ips[b]);
            }
        }
    }

    /// Holds every message between `a` and `b` until the next heal.
    pub fn hold(&self, sim: &mut turmoil::Sim<'_>, a: usize, b: usize) {
        sim.hold(self.ips[a], self.ips[b]);
    }

    /// Gives the link between `a` and `b` a constant latency until the next heal.
    pub fn slow(&self, sim: &mut turmoil::Sim<'_>, a: usize, b: usize, latency: Duration) {
        sim.set_link_latency(self.ips[a], self.ips[b], latency);
    }

    /// Lets the link between `a` and `b` add up to `times` its usual jitter, which reorders its
    /// messages a lot, until the next heal.
    #[allow(dead_code)] // only the key-value suite jitters links
    pub fn jitter(&self, sim: &mut turmoil::Sim<'_>, a: usize, b: usize, times: u32) {
        let base = self.latency[&(a.min(b), a.max(b))];
        sim.set_link_max_message_latency(self.ips[a], self.ips[b], base + times * self.jitter);
    }
}
