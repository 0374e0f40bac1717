//! What a bench measures of its own process: the calling thread's CPU time and the peak resident
//! set. Linux only, like the rest of the bench setup.

#![allow(dead_code)] // each bench binary uses a different subset

use std::time::Duration;

#[repr(C)]
struct Timespec {
    seconds: i64,
    nanoseconds: i64,
}

unsafe extern "C" {
    /// From the C library std already links.
    fn clock_gettime(clock: i32, time: *mut Timespec) -> i32;
}

/// CPU time consumed by the calling thread: the machine is shared, and wall time would count
/// waiting for a core.
pub fn thread_cpu_time() -> Duration {
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut time = Timespec {
        seconds: 0,
        nanoseconds: 0,
    };
    // SAFETY: `time` is a valid, writable timespec for the duration of the call.
    let status = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut time) };
    assert_eq!(status, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(time.seconds as u64, time.nanoseconds as u32)
}

/// Resets the process's peak resident set (VmHWM), so each run in-process reports its own.
pub fn reset_peak_rss() {
    // Best effort: without it the peak covers the earlier runs too.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident set, in KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
