//! The CRDT core stays pure: no IO, no clock, no global randomness, no async runtime.
//!
//! `cargo check --no-default-features` in CI proves it builds without the IO crates; this test
//! catches a direct use of std's clock, filesystem, network or threads, or of an IO crate, in
//! any file under `src/crdt`.

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

#[test]
fn the_crdt_module_uses_no_io_clock_or_randomness() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/crdt");
    let mut checked = 0;
    let mut offences = Vec::new();
    for entry in fs::read_dir(&dir).expect("src/crdt exists") {
        let path = entry.expect("readable directory entry").path();
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let text = fs::read_to_string(&path).expect("readable source file");
        checked += 1;
        for (number, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for word in FORBIDDEN {
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
