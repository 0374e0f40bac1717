//! A one-line progress indicator on stderr (rewritten in place on a terminal; one line per step
//! otherwise, so CI logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::Instant;

pub struct Progress {
    terminal: bool,
    began: Instant,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            began: Instant::now(),
        }
    }

    /// Announces a new step.
    pub fn step(&self, text: &str) {
        if self.terminal {
            self.tick(text);
        } else {
            eprintln!("[{:>5.1} s] {text}", self.began.elapsed().as_secs_f64());
        }
    }

    /// Updates the current step's line (terminal only).
    pub fn tick(&self, text: &str) {
        if self.terminal {
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[2K[{:>5.1} s] {text}",
                self.began.elapsed().as_secs_f64()
            );
            let _ = err.flush();
        }
    }

    /// Clears the line before other output.
    pub fn clear(&self) {
        if self.terminal {
            eprint!("\r\x1b[2K");
        }
    }

    pub fn elapsed_secs(&self) -> f64 {
        self.began.elapsed().as_secs_f64()
    }
}
