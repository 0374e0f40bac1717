//! The `mantissa` command line: the agent daemon, certificate tooling, and client commands.

mod commands;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mantissa::daemon::config::AgentFlags;

use crate::commands::jobs::{AllocCommand, JobCommand, NodeCommand, Scheduling};
use crate::commands::remote::{
    ClientArgs, CounterCommand, DocCommand, KvCommand, Remote, SetCommand,
};
use crate::commands::{EXIT_OK, Failure};

/// Mantissa: a leaderless, CRDT-based cluster state store for container orchestrators.
///
/// Every node keeps a full replica of the cluster state; writes are local and concurrent updates
/// merge deterministically, with no leader. `mantissa agent` runs a node with an HTTP API; the
/// client commands (`kv`, `counter`, `set`, `doc`, `job`, `node`, `alloc`, `members`, `status`)
/// talk to that API.
///
/// Exit status: 0 success, 1 the command failed, 2 bad usage or configuration, 3 no agent
/// answers at --addr.
#[derive(Parser, Debug)]
#[command(
    name = "mantissa",
    version,
    about,
    long_about,
    after_help = "Try it:\n  mantissa agent --dev          # a throwaway node on 127.0.0.1\n  \
                  mantissa kv put greeting hello\n  mantissa kv get greeting"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a node: joins the cluster over QUIC with mutual TLS and serves the HTTP API.
    ///
    /// Settings come from flags, then `MANTISSA_*` environment variables, then the --config
    /// file, then defaults. Stop it with ctrl-c or SIGTERM: it stops the API, leaves the cluster
    /// and flushes its data, then exits 0 (a second signal exits at once).
    #[command(after_help = "Examples:\n  \
        mantissa agent --dev\n  \
        mantissa agent --tls-ca tls/ca.pem --tls-cert tls/n1.pem --tls-key tls/n1-key.pem \\\n      \
        --data-dir /var/lib/mantissa --bind 0.0.0.0:7701 --advertise 10.0.0.1:7701 \\\n      \
        --join 10.0.0.2:7701 --join 10.0.0.3:7701\n  \
        mantissa agent --config /etc/mantissa/agent.toml")]
    Agent(Box<AgentFlags>),

    /// Creates the cluster CA and node certificates.
    #[command(subcommand)]
    Tls(TlsCommand),

    /// Reads and writes registers (keys holding bytes), lists and watches keys.
    #[command(subcommand)]
    Kv(KvCommand),

    /// Adds to and reads counters.
    #[command(subcommand)]
    Counter(CounterCommand),

    /// Adds to, removes from and reads sets.
    #[command(subcommand)]
    Set(SetCommand),

    /// Patches and reads JSON documents.
    #[command(subcommand)]
    Doc(DocCommand),

    /// Submits, follows and stops jobs: tasks the cluster's schedulers place on nodes.
    #[command(subcommand)]
    Job(JobCommand),

    /// Lists the nodes that offer themselves to run tasks.
    #[command(subcommand)]
    Node(NodeCommand),

    /// Lists which node runs which task.
    #[command(subcommand)]
    Alloc(AllocCommand),

    /// Lists the live members of the cluster, as the agent sees them.
    ///
    /// Example: `mantissa members`
    Members,

    /// Prints the agent's view of itself: replica, peers, traffic, storage.
    ///
    /// Example: `mantissa status`; `mantissa --addr http://10.0.0.2:7700 status --json`
    Status,

    /// Runs two in-process replicas through concurrent writes and shows how they merge.
    ///
    /// Example: `mantissa demo`
    Demo,
}

#[derive(Subcommand, Debug)]
enum TlsCommand {
    /// Creates a cluster CA: DIR/ca.pem (give it to every node) and DIR/ca-key.pem (mode 0600).
    ///
    /// Example: `mantissa tls init --dir tls`
    Init {
        /// Where to write the files; created if missing.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The cluster's name, written into the CA certificate.
        #[arg(long, value_name = "CLUSTER", default_value = "mantissa")]
        name: String,
        /// Replaces existing files (every certificate the old CA issued stops being trusted).
        #[arg(long)]
        force: bool,
    },

    /// Issues a node certificate signed by the CA in DIR: DIR/ID.pem and DIR/ID-key.pem (0600).
    ///
    /// The certificate names the node and serves for both server and client authentication.
    ///
    /// Example: `mantissa tls issue --dir tls --node n1`
    Issue {
        /// The directory holding the CA (from `tls init`); the files are written there too.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The node's name: lowercase letters, digits, '-' and '.'.
        #[arg(long, value_name = "ID")]
        node: String,
        /// How long the certificate is valid.
        #[arg(long, value_name = "N", default_value_t = 365,
              value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Replaces existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Keeps the agent's heap in one glibc malloc arena unless `MALLOC_ARENA_MAX` says otherwise.
///
/// Large values are allocated on one thread and freed on another; with an arena per thread,
/// each arena keeps the pages it freed and resident memory climbs well above what is live.
/// Measured with `cargo test --release --test memory_bounds` (1 MiB values, two agents): peak
/// resident memory 232-340 MiB with an arena per thread, 162-280 MiB with one, and the test ran
/// faster (5 s instead of 7.5 s). Small allocations still come from per-thread caches.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called before the agent starts any thread; mallopt only changes a setting of
        // the allocator, which glibc documents as safe to change at any time.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Agent(flags) => {
            one_malloc_arena();
            commands::agent::run(*flags)
        }
        Command::Tls(TlsCommand::Init { dir, name, force }) => {
            commands::tls::init(&dir, &name, force)
        }
        Command::Tls(TlsCommand::Issue {
            dir,
            node,
            days,
            force,
        }) => commands::tls::issue(&dir, &node, days, force),
        Command::Kv(command) => commands::remote::run(Remote::Kv(command), &cli.client),
        Command::Counter(command) => commands::remote::run(Remote::Counter(command), &cli.client),
        Command::Set(command) => commands::remote::run(Remote::Set(command), &cli.client),
        Command::Doc(command) => commands::remote::run(Remote::Doc(command), &cli.client),
        Command::Job(command) => commands::jobs::run(Scheduling::Job(command), &cli.client),
        Command::Node(command) => commands::jobs::run(Scheduling::Node(command), &cli.client),
        Command::Alloc(command) => commands::jobs::run(Scheduling::Alloc(command), &cli.client),
        Command::Members => commands::remote::run(Remote::Members, &cli.client),
        Command::Status => commands::remote::run(Remote::Status, &cli.client),
        Command::Demo => commands::demo::run().map_err(Failure::failed),
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(failure) => {
            // Not `eprintln!`: it panics (exit 101) when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn reads_take_after_and_wait() {
        let cli = Cli::try_parse_from([
            "mantissa", "kv", "get", "a", "--after", "0102", "--wait", "2s",
        ])
        .unwrap();
        let Command::Kv(KvCommand::Get { read, .. }) = cli.command else {
            panic!("parsed {cli:?}");
        };
        assert_eq!(read.wait, Some(std::time::Duration::from_secs(2)));
        assert!(Cli::try_parse_from(["mantissa", "kv", "get", "a", "--wait", "2s"]).is_err());
    }

    #[test]
    fn negative_amounts_and_dash_values_parse() {
        let cli = Cli::try_parse_from(["mantissa", "counter", "add", "c", "-3"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Counter(CounterCommand::Add { amount: -3, .. })
        ));
        let cli = Cli::try_parse_from(["mantissa", "kv", "put", "k", "-"]).unwrap();
        assert!(matches!(cli.command, Command::Kv(KvCommand::Put { .. })));
    }

    #[test]
    fn global_client_options_go_anywhere() {
        let cli =
            Cli::try_parse_from(["mantissa", "status", "--json", "--addr", "http://x:1"]).unwrap();
        assert!(cli.client.json);
        assert_eq!(cli.client.addr, "http://x:1");
    }

    #[test]
    fn agent_flags_repeat_join() {
        let cli = Cli::try_parse_from([
            "mantissa", "agent", "--join", "a:1", "--join", "b:2,c:3", "--dev",
        ])
        .unwrap();
        let Command::Agent(flags) = cli.command else {
            panic!()
        };
        assert_eq!(flags.join, ["a:1", "b:2", "c:3"]);
        assert!(flags.dev);
    }

    #[test]
    fn every_agent_flag_has_an_environment_variable() {
        let command = Cli::command();
        let agent = command.find_subcommand("agent").expect("an agent command");
        let missing: Vec<String> = agent
            .get_arguments()
            .filter(|arg| !matches!(arg.get_id().as_str(), "help" | "version"))
            .filter(|arg| arg.get_env().is_none())
            .map(|arg| arg.get_id().to_string())
            .collect();
        assert!(missing.is_empty(), "flags without a variable: {missing:?}");
    }

    #[test]
    fn labels_and_resources_come_from_comma_separated_variables() {
        // SAFETY: this test alone reads or writes these variables.
        unsafe {
            std::env::set_var("MANTISSA_LABEL", "zone=eu-1,rack=r7");
            std::env::set_var("MANTISSA_RESOURCE", "gpu=2");
        }
        let cli = Cli::try_parse_from(["mantissa", "agent", "--offer"]).unwrap();
        unsafe {
            std::env::remove_var("MANTISSA_LABEL");
            std::env::remove_var("MANTISSA_RESOURCE");
        }
        let Command::Agent(flags) = cli.command else {
            panic!()
        };
        assert_eq!(flags.scheduling.labels, ["zone=eu-1", "rack=r7"]);
        assert_eq!(flags.scheduling.resources, ["gpu=2"]);
    }
}
