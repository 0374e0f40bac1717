//! The scheduling commands: `job run|status|stop|ls`, `node ls` and `alloc ls`, each a request
//! to the agent at `--addr` (`job run` then follows its job until every task is admitted).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use mantissa::daemon::client::{Client, ReadOptions, Reply, parse_duration};
use mantissa::sched::JobSpec;
use serde_json::Value as Json;

use crate::commands::output::{field, size, table};
use crate::commands::remote::{ClientArgs, failure};
use crate::commands::{Failure, emit, emit_line, runtime};

/// How often `job run` asks how its job stands.
const POLL: Duration = Duration::from_millis(200);

/// Jobs: what the cluster is asked to run.
#[derive(Subcommand, Debug)]
pub enum JobCommand {
    /// Submits (or replaces) the job in FILE, then waits until every task is admitted.
    ///
    /// FILE is a job spec in JSON or TOML (by extension; `-` reads JSON or TOML from stdin).
    /// See docs/scheduling.md for the fields. Exits 1 if some tasks are still waiting when
    /// --timeout runs out, saying why.
    ///
    /// Example: `mantissa job run web.toml`
    Run {
        /// The job spec file.
        file: PathBuf,
        /// Returns once the job is submitted, without waiting for its tasks.
        #[arg(long)]
        detach: bool,
        /// How long to wait for every task to be admitted.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "30s")]
        timeout: Duration,
    },

    /// Shows where each task of job NAME stands: admitted (on which node), claimed, or pending
    /// (and why the last node refused it).
    ///
    /// Example: `mantissa job status web`
    Status {
        /// The job's name.
        name: String,
    },

    /// Stops job NAME: the nodes release its tasks.
    ///
    /// Example: `mantissa job stop web`
    Stop {
        /// The job's name.
        name: String,
    },

    /// Lists the jobs with how many of their tasks are admitted, claimed and pending.
    ///
    /// Example: `mantissa job ls`
    Ls,
}

/// Nodes: the machines that offer themselves to run tasks.
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// Lists the machines that offer themselves, with capacity, use and liveness.
    ///
    /// Example: `mantissa node ls`
    Ls,
}

/// Allocations: which node runs which task.
#[derive(Subcommand, Debug)]
pub enum AllocCommand {
    /// Lists the admitted tasks and their nodes.
    ///
    /// Example: `mantissa alloc ls --node n1`; `mantissa alloc ls --job web`
    Ls {
        /// Only the tasks on this node.
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
        /// Only the tasks of this job.
        #[arg(long, value_name = "JOB")]
        job: Option<String>,
    },
}

/// A scheduling command.
#[derive(Debug)]
pub enum Scheduling {
    /// `mantissa job …`
    Job(JobCommand),
    /// `mantissa node …`
    Node(NodeCommand),
    /// `mantissa alloc …`
    Alloc(AllocCommand),
}

/// Runs one scheduling command against the agent at `args.addr`.
pub fn run(command: Scheduling, args: &ClientArgs) -> Result<(), Failure> {
    // Read the spec before anything else: a bad file is a usage error, whatever the agent.
    let spec = match &command {
        Scheduling::Job(JobCommand::Run { file, .. }) => Some(read_spec(file)?),
        _ => None,
    };
    let client = Client::new(&args.addr).map_err(failure)?;
    let runtime = runtime(false)?;
    runtime.block_on(async {
        let read = ReadOptions::default();
        match command {
            Scheduling::Job(JobCommand::Run {
                detach, timeout, ..
            }) => {
                let spec = spec.expect("read above");
                run_job(&client, &spec, detach, timeout, args.json).await
            }
            Scheduling::Job(JobCommand::Status { name }) => {
                let reply = client.job_status(&name, &read).await.map_err(failure)?;
                show(&reply, args.json, job_status)
            }
            Scheduling::Job(JobCommand::Stop { name }) => {
                let reply = client.job_stop(&name).await.map_err(failure)?;
                show(&reply, args.json, |body| {
                    format!("stopped job {name} (token {})\n", field(body, "token"))
                })
            }
            Scheduling::Job(JobCommand::Ls) => {
                let reply = client.jobs(&read).await.map_err(failure)?;
                show(&reply, args.json, jobs)
            }
            Scheduling::Node(NodeCommand::Ls) => {
                let reply = client.nodes(&read).await.map_err(failure)?;
                show(&reply, args.json, nodes)
            }
            Scheduling::Alloc(AllocCommand::Ls { node, job }) => {
                let reply = client
                    .allocations(node.as_deref(), job.as_deref(), &read)
                    .await
                    .map_err(failure)?;
                show(&reply, args.json, allocations)
            }
        }
    })
}

/// Reads a job spec from JSON or TOML, checks it, and returns it as JSON for the API.
fn read_spec(file: &Path) -> Result<Json, Failure> {
    let stdin = file == Path::new("-");
    let text = if stdin {
        std::io::read_to_string(std::io::stdin())
            .map_err(|err| Failure::usage(format!("reading the job spec from stdin: {err}")))?
    } else {
        std::fs::read_to_string(file)
            .map_err(|err| Failure::usage(format!("job spec {}: {err}", file.display())))?
    };
    let toml = file
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("toml"));
    let json = file
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("json"));
    let parsed: Result<Json, String> = if toml || (!json && !text.trim_start().starts_with('{')) {
        toml::from_str(&text).map_err(|err| format!("not valid TOML: {}", err.message().trim()))
    } else {
        serde_json::from_str(&text).map_err(|err| format!("not valid JSON: {err}"))
    };
    let name = if stdin {
        "the job spec on stdin".to_owned()
    } else {
        format!("job spec {}", file.display())
    };
    let value = parsed.map_err(|reason| Failure::usage(format!("{name}: {reason}")))?;
    let spec: JobSpec = serde_json::from_value(value.clone())
        .map_err(|err| Failure::usage(format!("{name}: {err}")))?;
    spec.validate()
        .map_err(|err| Failure::usage(format!("{name}: {err}")))?;
    Ok(value)
}

/// Submits the job, then (unless `detach`) follows it until every task is admitted.
async fn run_job(
    client: &Client,
    spec: &Json,
    detach: bool,
    timeout: Duration,
    json: bool,
) -> Result<(), Failure> {
    let reply = client.job_submit(spec).await.map_err(failure)?;
    let submitted = reply.json().map_err(failure)?;
    let name = field(&submitted, "job");
    if detach || json {
        if json {
            emit_line(&reply.text());
        } else {
            emit_line(&format!(
                "submitted job {name}: {} tasks (token {})",
                field(&submitted, "tasks"),
                field(&submitted, "token")
            ));
        }
        return Ok(());
    }
    emit_line(&format!(
        "submitted job {name}: {} tasks",
        field(&submitted, "tasks")
    ));
    let read = ReadOptions {
        after: submitted
            .get("token")
            .and_then(Json::as_str)
            .map(str::to_owned),
        wait: None,
    };
    let started = Instant::now();
    loop {
        let status = client
            .job_status(&name, &read)
            .await
            .map_err(failure)?
            .json()
            .map_err(failure)?;
        let count = |name: &str| status.get(name).and_then(Json::as_u64).unwrap_or(0);
        let total = status
            .get("tasks")
            .and_then(Json::as_array)
            .map_or(0, Vec::len);
        if count("admitted") as usize == total {
            emit_line(&format!(
                "all {total} tasks admitted in {:.1}s; see `mantissa job status {name}`",
                started.elapsed().as_secs_f64()
            ));
            return Ok(());
        }
        if started.elapsed() >= timeout {
            emit(&job_status(&status));
            return Err(Failure::failed(format!(
                "{} of {total} tasks admitted after {}s ({} claimed, {} pending); is an agent \
                 running with --scheduler, and do the nodes have room?",
                count("admitted"),
                timeout.as_secs(),
                count("claimed"),
                count("pending")
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn show(reply: &Reply, json: bool, render: impl Fn(&Json) -> String) -> Result<(), Failure> {
    if json {
        emit_line(reply.text().trim_end());
        return Ok(());
    }
    let body = reply.json().map_err(failure)?;
    emit(&render(&body));
    Ok(())
}

fn job_status(body: &Json) -> String {
    let spec = body.get("spec").unwrap_or(&Json::Null);
    let mut text = format!(
        "job {} (namespace {}, priority {}): {} admitted, {} claimed, {} pending\n",
        field(spec, "name"),
        field(spec, "namespace"),
        field(spec, "priority"),
        field(body, "admitted"),
        field(body, "claimed"),
        field(body, "pending"),
    );
    let rows: Vec<[String; 3]> = array(body, "tasks")
        .map(|task| {
            let state = field(task, "state");
            let detail = match state.as_str() {
                "admitted" => format!("on {}", field(&task["allocation"], "node")),
                "claimed" => format!(
                    "claimed on {} by {}",
                    field(&task["claim"], "node"),
                    field(&task["claim"], "scheduler")
                ),
                _ => match task.get("last_rejection") {
                    Some(rejection) if !rejection.is_null() => format!(
                        "{} refused it: {}",
                        field(task, "rejected_by"),
                        reason(&rejection["reason"])
                    ),
                    _ => match task.get("fits_nowhere").and_then(Json::as_str) {
                        Some(why) => why.to_owned(),
                        None => "waiting for a scheduler to place it".to_owned(),
                    },
                },
            };
            [field(task, "task"), state, detail]
        })
        .collect();
    text.push_str(&table(&["TASK", "STATE", "DETAIL"], &rows));
    text
}

fn jobs(body: &Json) -> String {
    let rows: Vec<[String; 6]> = array(body, "jobs")
        .map(|job| {
            [
                field(job, "name"),
                field(job, "namespace"),
                field(job, "tasks"),
                field(job, "admitted"),
                field(job, "claimed"),
                field(job, "pending"),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "NAMESPACE",
            "TASKS",
            "ADMITTED",
            "CLAIMED",
            "PENDING",
        ],
        &rows,
    )
}

fn nodes(body: &Json) -> String {
    let rows: Vec<[String; 7]> = array(body, "nodes")
        .map(|node| {
            let record = &node["record"];
            let capacity = &record["capacity"];
            let used = &node["used"];
            let live = if node.get("live").and_then(Json::as_bool) == Some(true) {
                "live"
            } else {
                "down"
            };
            let labels = record
                .get("labels")
                .and_then(Json::as_object)
                .map(|labels| {
                    labels
                        .iter()
                        .map(|(key, value)| format!("{key}={}", value.as_str().unwrap_or("?")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            [
                field(record, "name"),
                live.to_owned(),
                format!(
                    "{}/{}",
                    millis(used.get("cpu_millis")),
                    millis(capacity.get("cpu_millis"))
                ),
                format!(
                    "{}/{}",
                    size(used.get("memory_bytes")),
                    size(capacity.get("memory_bytes"))
                ),
                field(node, "allocations"),
                custom(used, capacity),
                labels,
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATUS",
            "CPU",
            "MEMORY",
            "TASKS",
            "RESOURCES",
            "LABELS",
        ],
        &rows,
    )
}

/// The named resources a node offers, each as used/offered: `gpu=1/2,licence=0/5`.
fn custom(used: &Json, capacity: &Json) -> String {
    let Some(offered) = capacity.get("custom").and_then(Json::as_object) else {
        return String::new();
    };
    offered
        .iter()
        .map(|(name, amount)| {
            let taken = used["custom"].get(name).and_then(Json::as_u64).unwrap_or(0);
            format!("{name}={taken}/{}", amount.as_u64().unwrap_or(0))
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn allocations(body: &Json) -> String {
    let rows: Vec<[String; 4]> = array(body, "allocations")
        .map(|allocation| {
            [
                field(allocation, "task"),
                field(allocation, "node"),
                millis(allocation["resources"].get("cpu_millis")),
                size(allocation["resources"].get("memory_bytes")),
            ]
        })
        .collect();
    table(&["TASK", "NODE", "CPU", "MEMORY"], &rows)
}

fn array<'a>(body: &'a Json, name: &str) -> impl Iterator<Item = &'a Json> {
    body.get(name)
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
}

/// CPU millis for people: `1500m` as `1.5`.
fn millis(value: Option<&Json>) -> String {
    match value.and_then(Json::as_u64) {
        Some(millis) if millis % 1000 == 0 => format!("{}", millis / 1000),
        Some(millis) => format!("{:.2}", millis as f64 / 1000.0),
        None => "?".to_owned(),
    }
}

/// A rejection reason: `"out_of_cpu"` or `{"out_of_resource": "gpu"}`.
fn reason(value: &Json) -> String {
    match value {
        Json::String(text) => text.replace('_', " "),
        Json::Object(map) => map
            .iter()
            .map(|(kind, detail)| {
                format!(
                    "{} {}",
                    kind.replace('_', " "),
                    detail.as_str().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}
