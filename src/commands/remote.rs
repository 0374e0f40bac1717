//! The client commands: `kv`, `counter`, `set`, `doc`, `members` and `status`, each one request
//! (or one stream) to the agent at `--addr`.

use std::ffi::OsString;
use std::io::{Read, Write as _};
use std::os::unix::ffi::OsStringExt;
use std::time::Duration;

use clap::{Args, Subcommand};
use mantissa::daemon::client::{Client, ClientError, ReadOptions, Reply, parse_duration};

use crate::commands::output::{self, Shown};
use crate::commands::{EXIT_FAILED, EXIT_UNREACHABLE, Failure, emit, emit_line, runtime};

/// Options every client command shares.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The agent's HTTP API.
    #[arg(
        long,
        global = true,
        env = "MANTISSA_ADDR",
        default_value = mantissa::daemon::client::DEFAULT_ADDR,
        value_name = "URL",
        help_heading = "Client options"
    )]
    pub addr: String,

    /// Prints the server's JSON answer as it is, for scripts (a watch prints its NDJSON lines).
    #[arg(long, global = true, help_heading = "Client options")]
    pub json: bool,
}

/// Options of every read.
#[derive(Args, Debug, Clone, Default)]
pub struct ReadArgs {
    /// Answers only once the node has applied every write TOKEN covers (a token printed by an
    /// earlier write or read, at any node): read your own writes, never go back in time.
    #[arg(long, value_name = "TOKEN")]
    pub after: Option<String>,

    /// How long the node may wait for --after before failing [server default: 5s, at most 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "after")]
    pub wait: Option<Duration>,
}

/// The client commands.
#[derive(Debug)]
pub enum Remote {
    /// `mantissa kv …`
    Kv(KvCommand),
    /// `mantissa counter …`
    Counter(CounterCommand),
    /// `mantissa set …`
    Set(SetCommand),
    /// `mantissa doc …`
    Doc(DocCommand),
    /// `mantissa members`
    Members,
    /// `mantissa status`
    Status,
}

/// Registers: a key holding bytes.
#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Writes VALUE to the register at KEY and prints the write's token.
    ///
    /// Example: `mantissa kv put services/web/replicas 3`; `echo hi | mantissa kv put greeting -`
    Put {
        /// The key, e.g. `services/web/replicas`.
        key: String,
        /// The value; `-` reads it from stdin, byte for byte.
        #[arg(allow_hyphen_values = true)]
        value: OsString,
    },

    /// Prints the value at KEY (of any type).
    ///
    /// Example: `mantissa kv get services/web/replicas`; `mantissa kv get --raw blob > blob.bin`
    Get {
        /// The key.
        key: String,
        /// Writes only the register's bytes, exactly, with no newline.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        read: ReadArgs,
    },

    /// Deletes KEY (of any type); fails if it holds nothing.
    ///
    /// Example: `mantissa kv del services/web/replicas`
    #[command(visible_alias = "delete")]
    Del {
        /// The key.
        key: String,
    },

    /// Lists the keys under PREFIX with their values, in key order.
    ///
    /// Example: `mantissa kv ls services/ --limit 20`
    Ls {
        /// Only keys starting with this (all keys when left out).
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many keys [server default: 1000, at most 10000].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Starts after this key, to page through a long listing.
        #[arg(long, value_name = "KEY")]
        start_after: Option<String>,
        #[command(flatten)]
        read: ReadArgs,
    },

    /// Prints every change to keys under PREFIX as it happens, until interrupted.
    ///
    /// Each line starts with the change's cursor; `--from CURSOR` resumes after it (cursors are
    /// local to the agent that printed them). If the agent cuts the watch off for falling
    /// behind (`lagged`), it reconnects from the last cursor printed and says so on stderr.
    ///
    /// Example: `mantissa kv watch jobs/`; `mantissa kv watch '' --from 42`
    Watch {
        /// Only keys starting with this (all keys when left out).
        #[arg(default_value = "")]
        prefix: String,
        /// Replays the changes after this cursor first.
        #[arg(long, value_name = "CURSOR")]
        from: Option<u64>,
    },
}

/// Counters: a key holding a number that concurrent additions all count towards.
#[derive(Subcommand, Debug)]
pub enum CounterCommand {
    /// Adds N (negative to subtract) to the counter at KEY.
    ///
    /// Example: `mantissa counter add nodes/host-a/cpu 4000`; `mantissa counter add c -1`
    Add {
        /// The key.
        key: String,
        /// The amount.
        #[arg(allow_negative_numbers = true)]
        amount: i64,
    },

    /// Prints the counter at KEY.
    ///
    /// Example: `mantissa counter get nodes/host-a/cpu`
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// Sets: a key holding elements that concurrent additions and removals merge into.
#[derive(Subcommand, Debug)]
pub enum SetCommand {
    /// Adds elements to the set at KEY.
    ///
    /// Example: `mantissa set add jobs/web/placements web-1@host-a web-2@host-b`
    Add {
        /// The key.
        key: String,
        /// The elements.
        #[arg(required = true, allow_hyphen_values = true)]
        elements: Vec<String>,
    },

    /// Removes elements from the set at KEY.
    ///
    /// Example: `mantissa set rm jobs/web/placements web-1@host-a`
    #[command(visible_alias = "remove")]
    Rm {
        /// The key.
        key: String,
        /// The elements.
        #[arg(required = true, allow_hyphen_values = true)]
        elements: Vec<String>,
    },

    /// Prints the set at KEY, one element per line.
    ///
    /// Example: `mantissa set get jobs/web/placements`
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// Documents: a key holding a JSON object that concurrent patches merge into.
#[derive(Subcommand, Debug)]
pub enum DocCommand {
    /// Applies a JSON merge patch (RFC 7396: `null` deletes a field) to the document at KEY.
    ///
    /// Example: `mantissa doc patch jobs/web '{"image":"web:2","env":{"DEBUG":null}}'`
    Patch {
        /// The key.
        key: String,
        /// The patch, a JSON object; `-` reads it from stdin.
        #[arg(allow_hyphen_values = true)]
        patch: String,
    },

    /// Prints the document at KEY as JSON.
    ///
    /// Example: `mantissa doc get jobs/web`
    Get {
        /// The key.
        key: String,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// What to do with a successful answer.
enum Show {
    /// A write: one line saying what was done, with the token.
    Written(String),
    /// A value.
    Value,
    /// A listing under a prefix.
    List(String),
    /// The members table.
    Members,
    /// The status summary.
    Status,
    /// The bytes exactly as received.
    Raw,
}

/// Runs one client command against the agent at `args.addr`.
pub fn run(command: Remote, args: &ClientArgs) -> Result<(), Failure> {
    let client = Client::new(&args.addr).map_err(failure)?;
    let runtime = runtime(false)?;
    runtime.block_on(async {
        if let Remote::Kv(KvCommand::Watch { prefix, from }) = &command {
            return watch(&client, prefix, *from, args.json).await;
        }
        let (reply, show) = request(&client, command).await?;
        print(&reply, &show, args.json)
    })
}

async fn request(client: &Client, command: Remote) -> Result<(Reply, Show), Failure> {
    use Show::*;
    let options = |read: ReadArgs| ReadOptions {
        after: read.after,
        wait: read.wait,
    };
    let answer = match command {
        Remote::Kv(command) => match command {
            KvCommand::Put { key, value } => (
                client.put(&key, input(value.into_vec())?).await,
                Written("put".into()),
            ),
            KvCommand::Get {
                key,
                raw: true,
                read,
            } => (client.get_raw(&key, &options(read)).await, Raw),
            KvCommand::Get { key, read, .. } => (client.get(&key, &options(read)).await, Value),
            KvCommand::Del { key } => (client.delete(&key).await, Written("deleted".into())),
            KvCommand::Ls {
                prefix,
                limit,
                start_after,
                read,
            } => {
                let limit = limit.map(|limit| usize::try_from(limit).unwrap_or(usize::MAX));
                let reply = client
                    .list(&prefix, limit, start_after.as_deref(), &options(read))
                    .await;
                (reply, List(prefix))
            }
            KvCommand::Watch { .. } => unreachable!("watches are streamed by `watch`"),
        },
        Remote::Counter(command) => match command {
            CounterCommand::Add { key, amount } => (
                client.counter_add(&key, amount).await,
                Written(if amount < 0 {
                    format!("subtracted {} from", amount.unsigned_abs())
                } else {
                    format!("added {amount} to")
                }),
            ),
            CounterCommand::Get { key, read } => {
                (client.counter_get(&key, &options(read)).await, Value)
            }
        },
        Remote::Set(command) => match command {
            SetCommand::Add { key, elements } => {
                let done = format!("added {} to", count(elements.len(), "element"));
                (client.set_add(&key, &elements).await, Written(done))
            }
            SetCommand::Rm { key, elements } => {
                let done = format!("removed {} from", count(elements.len(), "element"));
                (client.set_remove(&key, &elements).await, Written(done))
            }
            SetCommand::Get { key, read } => (client.set_get(&key, &options(read)).await, Value),
        },
        Remote::Doc(command) => match command {
            DocCommand::Patch { key, patch } => {
                let text = if patch == "-" {
                    String::from_utf8(input(b"-".to_vec())?)
                        .map_err(|_| Failure::usage("the patch on stdin is not UTF-8"))?
                } else {
                    patch
                };
                let patch: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|err| Failure::usage(format!("the patch is not valid JSON: {err}")))?;
                (
                    client.doc_patch(&key, &patch).await,
                    Written("patched".into()),
                )
            }
            DocCommand::Get { key, read } => (client.doc_get(&key, &options(read)).await, Value),
        },
        Remote::Members => (client.members(&ReadOptions::default()).await, Members),
        Remote::Status => (client.status(&ReadOptions::default()).await, Status),
    };
    let (reply, show) = answer;
    Ok((reply.map_err(failure)?, show))
}

fn print(reply: &Reply, show: &Show, json: bool) -> Result<(), Failure> {
    if let Show::Raw = show {
        emit_bytes(&reply.body);
        return Ok(());
    }
    if json {
        let text = reply.text();
        emit(&text);
        if !text.ends_with('\n') {
            emit("\n");
        }
        return Ok(());
    }
    let body = reply.json().map_err(failure)?;
    let shown = match show {
        Show::Written(done) => Shown {
            stdout: format!("{}\n", output::written(done, &body)),
            notes: Vec::new(),
        },
        Show::Value => output::value(&body),
        Show::List(prefix) => output::list(&body, prefix),
        Show::Members => Shown {
            stdout: output::members(&body),
            notes: Vec::new(),
        },
        Show::Status => Shown {
            stdout: output::status(&body),
            notes: Vec::new(),
        },
        Show::Raw => unreachable!("handled above"),
    };
    emit(&shown.stdout);
    for note in shown.notes {
        eprintln!("{note}");
    }
    Ok(())
}

/// Streams a watch to stdout until the server ends it or the process is interrupted.
///
/// When the agent cuts the watch off as `lagged` (this reader fell more than a backlog behind),
/// it reconnects from the last cursor it printed, says so on stderr, and goes on: nothing is
/// lost or repeated, since a cursor names exactly what came before it. It gives up only if a
/// resumed watch lags again without delivering anything.
async fn watch(
    client: &Client,
    prefix: &str,
    from: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let mut last = from;
    let mut resumed_from = None;
    loop {
        match watch_once(client, prefix, &mut last, json).await? {
            WatchEnd::Lagged { message, .. } if last.is_some() && last != resumed_from => {
                let cursor = last.expect("checked above");
                let _ = writeln!(
                    std::io::stderr(),
                    "watch lagged ({message}); resuming from cursor {cursor}"
                );
                resumed_from = last;
            }
            WatchEnd::Lagged { message, line } | WatchEnd::Error { message, line } => {
                if json {
                    emit_line(&line);
                }
                return Err(Failure::failed(format!("watch ended: {message}")));
            }
            WatchEnd::Closed => {
                return Err(Failure::failed("watch ended: the agent closed the stream"));
            }
        }
    }
}

/// How one watch connection ended.
enum WatchEnd {
    /// The agent cut the reader off for falling behind; it may resume from its last cursor.
    Lagged { message: String, line: String },
    /// The agent ended the stream with another error.
    Error { message: String, line: String },
    /// The stream ended without a last line.
    Closed,
}

/// Streams one watch connection from `*last`, keeping `*last` at the last cursor seen (an
/// event's or a heartbeat's).
async fn watch_once(
    client: &Client,
    prefix: &str,
    last: &mut Option<u64>,
    json: bool,
) -> Result<WatchEnd, Failure> {
    let mut stream = client.watch(prefix, *last).await.map_err(failure)?;
    while let Some(line) = stream.next_line().await.map_err(failure)? {
        let parsed: Option<serde_json::Value> = serde_json::from_str(&line).ok();
        let error = parsed
            .as_ref()
            .and_then(|value| value.get("error"))
            .map(|error| {
                let message = error
                    .get("message")
                    .and_then(serde_json::Value::as_str)
                    .map_or_else(|| error.to_string(), str::to_owned);
                let lagged =
                    error.get("code").and_then(serde_json::Value::as_str) == Some("lagged");
                (lagged, message)
            });
        // The last line, an error, is printed only if the watch does not resume after it.
        if let Some((lagged, message)) = error {
            return Ok(if lagged {
                WatchEnd::Lagged { message, line }
            } else {
                WatchEnd::Error { message, line }
            });
        }
        if json {
            emit_line(&line);
        } else if let Some(text) = parsed.as_ref().and_then(output::event) {
            emit_line(&text);
        }
        let cursor = parsed.as_ref().and_then(|value| {
            value
                .get("cursor")
                .or_else(|| value.get("heartbeat"))
                .and_then(serde_json::Value::as_u64)
        });
        if cursor.is_some() {
            *last = cursor;
        }
    }
    Ok(WatchEnd::Closed)
}

/// `1 element`, `2 elements`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// The bytes of a value argument; `-` reads stdin.
fn input(value: Vec<u8>) -> Result<Vec<u8>, Failure> {
    if value != b"-" {
        return Ok(value);
    }
    let mut data = Vec::new();
    std::io::stdin()
        .read_to_end(&mut data)
        .map_err(|err| Failure::failed(format!("reading stdin: {err}")))?;
    Ok(data)
}

fn emit_bytes(data: &[u8]) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(err) = stdout.write_all(data).and_then(|()| stdout.flush())
        && err.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: writing to stdout: {err}");
        std::process::exit(i32::from(EXIT_FAILED));
    }
}

pub(super) fn failure(err: ClientError) -> Failure {
    let code = match &err {
        ClientError::Unreachable { .. } => EXIT_UNREACHABLE,
        ClientError::BadAddress { .. } => crate::commands::EXIT_USAGE,
        _ => EXIT_FAILED,
    };
    Failure {
        message: err.to_string(),
        code,
    }
}
