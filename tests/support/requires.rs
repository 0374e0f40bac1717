//! What a suite needs from the machine beyond the Rust toolchain (root, programs from Debian's
//! packages), and the one rule for when it is missing: the suite prints
//! `SKIPPED <suite>: <why>` and passes, so that `cargo test --release` passes on a fresh machine;
//! unless `MANTISSA_REQUIRE_ALL_SUITES=1` is set (CI sets it in `.ci/run`), when the same message
//! is a failure, so that CI can never skip a suite silently. See docs/testing.md.

#![allow(dead_code)] // the benchmark harness (bench/) uses only `unmet`

use std::io::Write as _;
use std::process::{Command, Stdio};

/// The environment variable that turns a skipped suite into a failed one.
pub const REQUIRE_ALL_SUITES: &str = "MANTISSA_REQUIRE_ALL_SUITES";

/// One thing a suite needs from the machine.
#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Effective uid 0, and what for (network namespaces and nftables need `CAP_NET_ADMIN`).
    Root { why: &'static str },
    /// A program found on `PATH`, and the Debian package that installs it.
    Program {
        name: &'static str,
        package: &'static str,
    },
}

impl Need {
    /// Why this need is not met here, with how to meet it; `None` when it is met.
    pub fn unmet(&self) -> Option<String> {
        match *self {
            Need::Root { why } => (!is_root()).then(|| format!("needs root ({why}); run as root")),
            Need::Program { name, package } => (!on_path(name))
                .then(|| format!("`{name}` is not installed (apt-get install -y {package})")),
        }
    }
}

/// Why `needs` are not all met here (every unmet one, joined), if they are not.
pub fn unmet(needs: &[Need]) -> Option<String> {
    let reasons: Vec<String> = needs.iter().filter_map(Need::unmet).collect();
    (!reasons.is_empty()).then(|| reasons.join("; "))
}

/// Whether `suite` can run here. When something in `needs` is missing, prints
/// `SKIPPED <suite>: <why>` and returns false, so the caller returns and the test passes; with
/// `MANTISSA_REQUIRE_ALL_SUITES=1`, panics with the same line instead.
pub fn suite_can_run(suite: &str, needs: &[Need]) -> bool {
    let Some(why) = unmet(needs) else {
        return true;
    };
    let line = format!("SKIPPED {suite}: {why}");
    if std::env::var(REQUIRE_ALL_SUITES).is_ok_and(|value| value == "1") {
        panic!("{line} ({REQUIRE_ALL_SUITES}=1: a suite that cannot run is a failure)");
    }
    // Straight to stderr, not `println!`: the test harness captures what the print macros
    // write and shows it only for failing tests, and a skip must be seen in a plain run.
    let _ = writeln!(
        std::io::stderr(),
        "{line} (set {REQUIRE_ALL_SUITES}=1 to make this a failure)"
    );
    false
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// Whether `program` can be started: found on `PATH` (as `Command` looks it up) and executable.
fn on_path(program: &str) -> bool {
    // `-V` is the version flag of both `ip` and `nft`; the exit status does not matter, only
    // that the program started.
    Command::new(program)
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}
