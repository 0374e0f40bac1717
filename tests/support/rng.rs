//! The test suites' one seeded generator step (splitmix64): small, fast, the same on every
//! platform, so a seed's schedule never depends on a crate's version. Each suite mixes its seed
//! its own way, so its seeds keep their schedules; the two turmoil suites also share [`Rng`]'s
//! helpers, the fault suite and the HTTP fuzzer keep their own.

#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

/// Advances `state` by one splitmix64 step and returns the next number.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A splitmix64 generator with the helpers the turmoil suites draw their schedules with; each
/// suite writes its own `Rng::new`, which mixes the seed.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// One of `items`, which must not be empty.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A duration of `low..=high` milliseconds.
    pub fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low + 1))
    }
}
