//! The test suites' one seeded generator step (splitmix64): small, fast, the same on every
//! platform, so a seed's schedule never depends on a crate's version. Each suite keeps its own
//! `Rng` wrapper (how it mixes its seed, the helpers it draws with), so its seeds keep their
//! schedules; the step itself lives here once.

/// Advances `state` by one splitmix64 step and returns the next number.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
