//! What to remove when the run is interrupted: child processes, scratch directories and network
//! namespaces.
//!
//! Every process the harness starts and every directory it creates is registered here. Normal
//! exits clean up through `Drop` (the guards unregister what they removed); a ctrl-c or SIGTERM
//! runs [`interrupted`] instead, which kills the registered processes, removes the directories
//! and exits with status 130.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs the ctrl-c / SIGTERM handler.
pub fn install() -> Result<(), String> {
    ctrlc::set_handler(interrupted).map_err(|err| format!("cannot install a ctrl-c handler: {err}"))
}

pub fn register_pid(pid: u32) {
    lock(&PIDS).push(pid);
}

pub fn unregister_pid(pid: u32) {
    lock(&PIDS).retain(|&registered| registered != pid);
}

pub fn register_dir(dir: &Path) {
    lock(&DIRS).push(dir.to_path_buf());
}

pub fn unregister_dir(dir: &Path) {
    lock(&DIRS).retain(|registered| registered != dir);
}

pub fn register_namespace(name: &str) {
    lock(&NAMESPACES).push(name.to_owned());
}

pub fn unregister_namespace(name: &str) {
    lock(&NAMESPACES).retain(|registered| registered != name);
}

fn interrupted() {
    eprintln!("\ninterrupted: stopping every process this run started");
    for pid in lock(&PIDS).drain(..) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    for dir in lock(&DIRS).drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
    // After the processes inside them are gone; deleting the hub removes the host's link too.
    for name in lock(&NAMESPACES).drain(..) {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
    }
    std::process::exit(130);
}

/// The lock even when a panicking thread poisoned it: the lists stay valid.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
