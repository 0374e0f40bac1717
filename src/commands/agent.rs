//! `mantissa agent`: resolves the configuration, sets up logging and runs the daemon.

use std::io::Write as _;
use std::time::Duration;

use mantissa::daemon::agent;
use mantissa::daemon::config::{AgentConfig, AgentFlags};

use crate::commands::{Failure, runtime};

/// How long the runtime may take to stop its remaining tasks once the agent has stopped.
const RUNTIME_STOP: Duration = Duration::from_secs(2);

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(flags: AgentFlags) -> Result<(), Failure> {
    let config = AgentConfig::load(flags).map_err(Failure::usage)?;
    agent::init_logging(config.log_format);
    let runtime = runtime(true)?;
    let result = runtime.block_on(async {
        let shutdown = agent::shutdown_signal()
            .map_err(|err| Failure::failed(format!("cannot install signal handlers: {err}")))?;
        let failure = |err: agent::AgentError| Failure {
            message: err.to_string(),
            code: err.exit_code(),
        };
        let started = agent::start(config).await.map_err(failure)?;
        if let Some(banner) = started.dev_banner() {
            // Not `println!`: it panics when stdout is a closed pipe.
            let _ = writeln!(std::io::stdout(), "{banner}");
        }
        started.serve(shutdown).await.map_err(failure)
    });
    runtime.shutdown_timeout(RUNTIME_STOP);
    result
}
