//! The CRDT core and the protocol stay pure: no IO, no clock, no global randomness, no async runtime.
//!
//! `cargo check --no-default-features` in CI proves it builds without the IO crates; this test
//! catches a direct use of std's clock, filesystem, network or threads, or of an IO crate, in
//! any file under `src/crdt` or `src/gossip`.

use std::fs;
use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "SystemTime",
    "Instant::now",
    "std::fs",
    "std::net",
    "std::thread",
    "std::env",
    "tokio",
    "quinn",
    "rand::",
    "thread_rng",
    "println!",
];

/// The protocol takes time as `now` and randomness from a seeded generator it is given, and
/// addresses are values to it, so `std::net` types and seeded `rand` are allowed there.
const FORBIDDEN_IN_PROTOCOL: &[&str] = &[
    "SystemTime",
    "Instant::now",
    "std::fs",
    "std::thread",
    "std::env",
    "tokio",
    "quinn",
    "thread_rng",
    "rand::rng(",
    "from_os_rng",
    "println!",
];

#[test]
fn the_crdt_module_uses_no_io_clock_or_randomness() {
    check("src/crdt", FORBIDDEN);
    check("src/sched", FORBIDDEN);
}

#[test]
fn the_protocol_module_uses_no_io_clock_or_global_randomness() {
    check("src/gossip", FORBIDDEN_IN_PROTOCOL);
}

/// Scheduling sits beside the protocol, not above it: it depends on the CRDT core only, so a
/// scheduler can be driven by any replica, gossiped or not.
#[test]
fn the_scheduler_depends_on_the_crdt_core_only() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/sched");
    let mut offences = Vec::new();
    for entry in fs::read_dir(&dir).expect("src/sched exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable source file");
        // Doctests and unit tests too: an example that needs gossip teaches the wrong layering.
        for (number, line) in text.lines().enumerate() {
            for layer in ["gossip::", "runtime::", "daemon::"] {
                if line.contains(layer) {
                    offences.push(format!("{}:{}: {layer}", path.display(), number + 1));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "src/sched reaches above the CRDT core:\n{}",
        offences.join("\n")
    );
}

fn check(module: &str, forbidden: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(module);
    let mut checked = 0;
    let mut offences = Vec::new();
    for entry in fs::read_dir(&dir).expect("src/crdt exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable source file");
        checked += 1;
        // Unit tests at the end of a file may read the clock for a starting instant.
        let code_lines = text
            .lines()
            .take_while(|line| line.trim() != "#[cfg(test)]");
        for (number, line) in code_lines.enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in forbidden {
                if code.contains(word) {
                    offences.push(format!("{}:{}: {word}", path.display(), number + 1));
                }
            }
        }
    }
    assert!(
        checked >= 5,
        "expected the crdt sources, found {checked} files"
    );
    assert!(
        offences.is_empty(),
        "impure code in the CRDT core:\n{}",
        offences.join("\n")
    );
}
