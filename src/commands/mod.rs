//! What each `mantissa` subcommand does; `main.rs` holds the command tree.

pub mod agent;
pub mod demo;
pub mod jobs;
pub mod remote;
pub mod tls;

mod output;

use std::fmt;
use std::io::{self, Write};

/// Exit status: the command did what was asked.
pub const EXIT_OK: u8 = 0;
/// Exit status: the command failed (the server refused, the key holds nothing, a file exists, …).
pub const EXIT_FAILED: u8 = 1;
/// Exit status: bad usage or configuration; clap uses it for bad flags too.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: no agent answers at `--addr`.
pub const EXIT_UNREACHABLE: u8 = 3;

/// A command that failed: the message printed as `error: …` and the exit status.
#[derive(Debug)]
pub struct Failure {
    /// One line for a person.
    pub message: String,
    /// The process exit status.
    pub code: u8,
}

impl Failure {
    /// A failure with exit status 1.
    pub fn failed(message: impl fmt::Display) -> Self {
        Failure {
            message: message.to_string(),
            code: EXIT_FAILED,
        }
    }

    /// A usage or configuration error: exit status 2.
    pub fn usage(message: impl fmt::Display) -> Self {
        Failure {
            message: message.to_string(),
            code: EXIT_USAGE,
        }
    }
}

/// Writes `text` to stdout. A closed pipe (`mantissa kv watch | head`) ends the process quietly,
/// as it would for any Unix tool.
pub fn emit(text: &str) {
    let mut stdout = io::stdout().lock();
    if let Err(err) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if err.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(i32::from(EXIT_OK));
        }
        eprintln!("error: writing to stdout: {err}");
        std::process::exit(i32::from(EXIT_FAILED));
    }
}

/// Like [`emit`], with a newline.
pub fn emit_line(text: &str) {
    emit(&format!("{text}\n"));
}

/// Builds the tokio runtime for a command.
fn runtime(multi_thread: bool) -> Result<tokio::runtime::Runtime, Failure> {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .build()
        .map_err(|err| Failure::failed(format!("cannot start the async runtime: {err}")))
}
