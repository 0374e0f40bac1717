//! The agent's configuration: command-line flags (and their `MANTISSA_*` environment variables),
//! an optional TOML file with the same names, and their resolution into one [`AgentConfig`].
//!
//! Precedence is flag > environment variable > config file > default. clap applies the first two
//! (an environment variable only fills a flag left off the command line); [`AgentConfig::resolve`]
//! applies the last two and validates everything, naming the flag or the file field at fault.
//!
//! ```
//! use mantissa::daemon::config::{AgentConfig, AgentFlags, FileConfig};
//!
//! let file = FileConfig::parse("mantissa.toml".as_ref(), r#"
//!     bind = "10.0.0.5:7701"
//!     tls_ca = "/etc/mantissa/ca.pem"
//!     tls_cert = "/etc/mantissa/n1.pem"
//!     tls_key = "/etc/mantissa/n1-key.pem"
//! "#).unwrap();
//! let flags = AgentFlags { bind: Some("10.0.0.5:9000".into()), ..AgentFlags::default() };
//! let config = AgentConfig::resolve(flags, Some(file)).unwrap();
//! assert_eq!(config.bind.to_string(), "10.0.0.5:9000"); // the flag wins over the file
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::daemon::offer::{self, SchedulingFlags, SchedulingSettings, Size};
use crate::runtime::{DEFAULT_MEMORY_BUDGET, validate_node_name};
use crate::sched::parse_size;

/// Where the gossip endpoint listens unless told otherwise: every interface.
pub const DEFAULT_BIND: &str = "0.0.0.0:7701";
/// Where a `--dev` node's gossip endpoint listens: loopback only.
pub const DEFAULT_DEV_BIND: &str = "127.0.0.1:7701";
/// Where the HTTP API listens unless told otherwise: loopback only, since it has no
/// authentication of its own.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7700";
/// The name a `--dev` node gives itself when `--node-id` is not set.
pub const DEFAULT_DEV_NODE_ID: &str = "dev";
/// How long a shutdown may take in all, unless configured.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// The smallest `--buffer-memory`: below it, the shares are too small to batch anything.
pub const MIN_BUFFER_MEMORY: u64 = 16 * 1024 * 1024;

/// The `mantissa agent` flags, as clap parses them (each also read from a `MANTISSA_*` variable).
///
/// Every setting is optional here so that a value left unset can come from the config file;
/// defaults are applied by [`AgentConfig::resolve`].
#[derive(Clone, Debug, Default, clap::Args)]
pub struct AgentFlags {
    /// Runs a throwaway single node: in memory, with certificates generated at start,
    /// gossip on 127.0.0.1:7701 and the HTTP API on 127.0.0.1:7700.
    #[arg(long, env = "MANTISSA_DEV")]
    pub dev: bool,

    /// Reads settings from this TOML file (same names as the flags, with `_`: `data_dir`, `join =
    /// [..]`, …). Flags and environment variables override it; relative paths in it are relative
    /// to the file's directory.
    #[arg(long, env = "MANTISSA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// This node's name; must match the name in its certificate (default: taken from the
    /// certificate, or "dev" with --dev).
    #[arg(long, env = "MANTISSA_NODE_ID", value_name = "NAME")]
    pub node_id: Option<String>,

    /// Keeps the replica in this directory (created if missing), so it survives restarts.
    /// Without it the node holds its data in memory only.
    #[arg(long, env = "MANTISSA_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// If the data file is corrupted, moves it aside (never deletes it) and starts empty to
    /// re-sync from peers, instead of refusing to start.
    #[arg(long, env = "MANTISSA_DISCARD_CORRUPT_DATA")]
    pub discard_corrupt_data: bool,

    /// The UDP address the QUIC gossip endpoint listens on [default: 0.0.0.0:7701].
    #[arg(long, env = "MANTISSA_BIND", value_name = "IP:PORT")]
    pub bind: Option<String>,

    /// The address peers should dial, when it differs from --bind (e.g. --bind 0.0.0.0:7701);
    /// a host name is resolved at start.
    #[arg(long, env = "MANTISSA_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,

    /// The TCP address the HTTP API listens on [default: 127.0.0.1:7700].
    #[arg(long, env = "MANTISSA_HTTP", value_name = "IP:PORT")]
    pub http: Option<String>,

    /// A member to join the cluster through (repeatable; the variable takes a comma-separated
    /// list). Host names are resolved at start, to every address they have. Without any, the
    /// node starts a new cluster.
    #[arg(
        long,
        env = "MANTISSA_JOIN",
        value_name = "HOST:PORT",
        value_delimiter = ','
    )]
    pub join: Vec<String>,

    /// The cluster CA certificate (PEM), as written by `mantissa tls init`.
    #[arg(long, env = "MANTISSA_TLS_CA", value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// This node's certificate (PEM), as written by `mantissa tls issue`.
    #[arg(long, env = "MANTISSA_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// This node's private key (PEM).
    #[arg(long, env = "MANTISSA_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// How log lines are written to stderr; the level comes from RUST_LOG [default: text].
    #[arg(long, env = "MANTISSA_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// The largest request body the HTTP API accepts, in bytes [default: 1572864, 1.5 MiB:
    /// room for the largest value, 1 MiB].
    #[arg(long, env = "MANTISSA_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,

    /// How long a shutdown (SIGINT, SIGTERM) may take in all, in milliseconds [default: 2000]:
    /// open HTTP requests get half of it to finish, then the node leaves, hands what is queued to
    /// live peers and checkpoints its data in the rest. Peers known to be down are never waited on.
    #[arg(long, env = "MANTISSA_SHUTDOWN_TIMEOUT_MS", value_name = "MILLIS")]
    pub shutdown_timeout_ms: Option<u64>,

    /// The memory the node may spend on what it keeps for others, in bytes or a size such as
    /// 256MiB [default: 256MiB]: the change feed watchers resume from, recent writes kept to
    /// forward, peers' writes held back for their causes, watchers' queues and peers' send
    /// queues. Past their share, the oldest change events and recent writes are dropped (a
    /// watcher resuming from before them is told `compacted`), a watcher that stops reading is
    /// paused, and messages to a slow peer are dropped for anti-entropy to repair. The stored
    /// data itself is not bounded by it.
    #[arg(long, env = "MANTISSA_BUFFER_MEMORY", value_name = "SIZE")]
    pub buffer_memory: Option<String>,

    /// The scheduler's flags (a clap doc comment on a flattened field is not shown as help).
    #[command(flatten, next_help_heading = "Scheduling")]
    pub scheduling: SchedulingFlags,
}

/// The config file: the agent's flags as TOML fields, all optional. Unknown fields are refused.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The file the settings were read from: names it in errors, anchors its relative paths.
    #[serde(skip)]
    pub path: PathBuf,
    /// See [`AgentFlags::node_id`].
    pub node_id: Option<String>,
    /// See [`AgentFlags::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`AgentFlags::discard_corrupt_data`].
    pub discard_corrupt_data: Option<bool>,
    /// See [`AgentFlags::bind`].
    pub bind: Option<String>,
    /// See [`AgentFlags::advertise`].
    pub advertise: Option<String>,
    /// See [`AgentFlags::http`].
    pub http: Option<String>,
    /// See [`AgentFlags::join`].
    pub join: Option<Vec<String>>,
    /// See [`AgentFlags::tls_ca`].
    pub tls_ca: Option<PathBuf>,
    /// See [`AgentFlags::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`AgentFlags::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// See [`AgentFlags::log_format`]: `"text"` or `"json"`.
    pub log_format: Option<String>,
    /// See [`AgentFlags::max_body_bytes`].
    pub max_body_bytes: Option<usize>,
    /// See [`AgentFlags::shutdown_timeout_ms`].
    pub shutdown_timeout_ms: Option<u64>,
    /// See [`AgentFlags::buffer_memory`]: a number of bytes or a size string.
    pub buffer_memory: Option<Size>,
    /// See [`SchedulingFlags::scheduler`].
    pub scheduler: Option<bool>,
    /// See [`SchedulingFlags::offer`]; `false` with `scheduler = true` is `--no-offer`.
    pub offer: Option<bool>,
    /// See [`SchedulingFlags::cpu_millis`].
    pub cpu_millis: Option<u64>,
    /// See [`SchedulingFlags::memory`]: a number of bytes or a size string.
    pub memory: Option<Size>,
    /// See [`SchedulingFlags::labels`], as a table.
    pub labels: Option<BTreeMap<String, String>>,
    /// See [`SchedulingFlags::resources`], as a table.
    pub resources: Option<BTreeMap<String, u64>>,
}

/// The agent's settings once flags, environment, config file and defaults are merged and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// A throwaway single node with generated certificates.
    pub dev: bool,
    /// The expected node name (checked against the certificate), or the dev node's name.
    pub node_id: Option<String>,
    /// Durable storage; `None` keeps the replica in memory.
    pub data_dir: Option<PathBuf>,
    /// Move a corrupted data file aside instead of refusing to start.
    pub discard_corrupt_data: bool,
    /// The gossip endpoint's address.
    pub bind: SocketAddr,
    /// The address peers should dial, resolved at start.
    pub advertise: Option<Setting<HostPort>>,
    /// The HTTP API's address.
    pub http: SocketAddr,
    /// Members to join through, resolved at start.
    pub join: Vec<Setting<HostPort>>,
    /// The certificate files; `None` only with `dev`.
    pub tls: Option<TlsFiles>,
    /// How logs are written.
    pub log_format: LogFormat,
    /// The HTTP body limit; `None` keeps the server's default.
    pub max_body_bytes: Option<usize>,
    /// How long a shutdown may take in all.
    pub shutdown_timeout: Duration,
    /// What the node may keep for others, in bytes.
    pub buffer_memory: usize,
    /// Whether the agent schedules, and what its machine offers.
    pub scheduling: SchedulingSettings,
}

/// The PEM files a node's TLS identity is read from, each with where it was configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: Setting<PathBuf>,
    /// The node certificate.
    pub cert: Setting<PathBuf>,
    /// The node's private key.
    pub key: Setting<PathBuf>,
}

/// A configured value and where it came from, so an error found later can name its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting<T> {
    /// The value.
    pub value: T,
    /// Its flag or config-file field.
    pub origin: Origin,
}

/// Where a setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag or its environment variable, e.g. `--bind`.
    Flag(&'static str),
    /// A config file field, e.g. `bind` in `/etc/mantissa.toml`.
    File(&'static str, PathBuf),
}

/// A `host:port` address whose host may be a DNS name, resolved when the agent starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// An IP address or a DNS name (without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
}

/// How log lines are formatted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Why the configuration was refused: one line naming the flag, field or file at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why, e.g. "no such file".
        reason: String,
    },
    /// The config file is not valid TOML, or has an unknown field or a value of the wrong type.
    #[error("config file {path}{location}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// ` line N (text of the line)`, when known.
        location: String,
        /// The parser's message.
        message: String,
    },
    /// A setting has an invalid value; `setting` names the flag or field and its value.
    #[error("{setting}: {reason}")]
    Invalid {
        /// E.g. `--bind "x"` or `bind = "x" in /etc/mantissa.toml`.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Settings that cannot be used together, or a required one that is missing.
    #[error("{0}")]
    Conflict(String),
}

impl AgentConfig {
    /// Reads the config file named by `flags.config` (if any) and resolves the settings.
    pub fn load(flags: AgentFlags) -> Result<AgentConfig, ConfigError> {
        let file = match &flags.config {
            Some(path) => Some(FileConfig::read(path)?),
            None => None,
        };
        AgentConfig::resolve(flags, file)
    }

    /// Merges flags (which already include environment variables) over the config file over
    /// defaults, and validates the result. Pure: touches neither the file system nor DNS.
    pub fn resolve(
        flags: AgentFlags,
        file: Option<FileConfig>,
    ) -> Result<AgentConfig, ConfigError> {
        let file = file.unwrap_or_default();
        let merge = Merge { file: &file };
        let dev = flags.dev;

        let node_id = merge.pick("node_id", flags.node_id, file.node_id.clone());
        let node_id = match node_id {
            Some(setting) => {
                validate_node_name(&setting.value)
                    .map_err(|err| invalid(&setting, &setting.value, err))?;
                Some(setting.value)
            }
            None if dev => Some(DEFAULT_DEV_NODE_ID.to_owned()),
            None => None,
        };
        let data_dir = merge
            .pick_path("data_dir", flags.data_dir, file.data_dir.clone())
            .map(|setting| setting.value);
        let discard_corrupt_data =
            flags.discard_corrupt_data || file.discard_corrupt_data.unwrap_or(false);
        let default_bind = if dev { DEFAULT_DEV_BIND } else { DEFAULT_BIND };
        let bind = merge.socket_addr("bind", flags.bind, file.bind.clone(), default_bind)?;
        let http = merge.socket_addr("http", flags.http, file.http.clone(), DEFAULT_HTTP)?;
        let advertise = merge
            .pick("advertise", flags.advertise, file.advertise.clone())
            .map(|setting| host_port(&setting))
            .transpose()?;
        let join = merge.join(flags.join, file.join.clone())?;
        let scheduling = SchedulingSettings::resolve(flags.scheduling, &file)?;
        let tls = merge.tls(dev, flags.tls_ca, flags.tls_cert, flags.tls_key)?;
        let log_format = match flags.log_format {
            Some(format) => format,
            None => merge.log_format()?,
        };
        let max_body_bytes =
            merge.pick("max_body_bytes", flags.max_body_bytes, file.max_body_bytes);
        if let Some(setting) = &max_body_bytes
            && setting.value == 0
        {
            return Err(invalid(setting, &setting.value, "must be at least 1"));
        }

        let shutdown_timeout = merge.pick(
            "shutdown_timeout_ms",
            flags.shutdown_timeout_ms,
            file.shutdown_timeout_ms,
        );
        if let Some(setting) = &shutdown_timeout
            && setting.value < 10
        {
            return Err(invalid(setting, &setting.value, "must be at least 10 (ms)"));
        }

        let buffer_memory = match (&flags.buffer_memory, &file.buffer_memory) {
            (Some(text), _) => Some(
                parse_size(text)
                    .map_err(|reason| offer::invalid("--buffer-memory", text, reason))?,
            ),
            (None, Some(Size::Bytes(bytes))) => Some(*bytes),
            (None, Some(Size::Text(text))) => Some(parse_size(text).map_err(|reason| {
                offer::invalid(
                    &format!("buffer_memory (in {})", file.path.display()),
                    text,
                    reason,
                )
            })?),
            (None, None) => None,
        };
        let buffer_memory = match buffer_memory {
            None => DEFAULT_MEMORY_BUDGET,
            Some(bytes) if bytes < MIN_BUFFER_MEMORY => {
                return Err(offer::invalid(
                    "--buffer-memory",
                    &bytes.to_string(),
                    "must be at least 16MiB".to_owned(),
                ));
            }
            Some(bytes) => usize::try_from(bytes).unwrap_or(usize::MAX),
        };

        if dev && !join.is_empty() {
            return Err(ConfigError::Conflict(
                "--join cannot be used with --dev: a dev node has its own throwaway CA, so no \
                 other node can trust it"
                    .to_owned(),
            ));
        }
        Ok(AgentConfig {
            dev,
            node_id,
            data_dir,
            discard_corrupt_data,
            bind,
            advertise,
            http,
            join,
            tls,
            log_format,
            max_body_bytes: max_body_bytes.map(|setting| setting.value),
            shutdown_timeout: shutdown_timeout.map_or(DEFAULT_SHUTDOWN_TIMEOUT, |setting| {
                Duration::from_millis(setting.value)
            }),
            buffer_memory,
            scheduling,
        })
    }
}

impl FileConfig {
    /// Reads and parses the config file at `path`.
    pub fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_owned(),
            reason: io_reason(&err),
        })?;
        FileConfig::parse(path, &text)
    }

    /// Parses config file text; `path` is only used to name the file and anchor relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
        let mut file: FileConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            location: err
                .span()
                .map(|span| locate(text, span.start))
                .unwrap_or_default(),
            message: one_line(err.message()),
        })?;
        file.path = path.to_owned();
        Ok(file)
    }

    /// `path` as written in the file, made relative to the file's directory.
    fn anchor(&self, path: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag(name) => write!(f, "--{}", name.replace('_', "-")),
            Origin::File(name, path) => write!(f, "{name} (in {})", path.display()),
        }
    }
}

impl FromStr for HostPort {
    type Err = String;

    /// Parses `host:port`, `ip:port` or `[ipv6]:port`.
    fn from_str(text: &str) -> Result<HostPort, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(HostPort {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let expected = "expected HOST:PORT, e.g. 10.0.0.7:7701 or node-2.example:7701";
        let (host, port) = text.rsplit_once(':').ok_or(expected)?;
        let port: u16 = port.parse().map_err(|_| format!("bad port; {expected}"))?;
        let host_chars = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
        if host.is_empty() || !host.chars().all(host_chars) {
            return Err(format!("bad host; {expected}"));
        }
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<LogFormat, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected \"text\" or \"json\"".to_owned()),
        }
    }
}

/// Describes an IO error in a few plain words, e.g. "no such file".
pub fn io_reason(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "no such file".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        io::ErrorKind::IsADirectory => "is a directory, not a file".to_owned(),
        io::ErrorKind::AlreadyExists => "already exists".to_owned(),
        io::ErrorKind::AddrInUse => "address already in use".to_owned(),
        io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
        _ => {
            // Drop the "(os error N)" suffix: it adds nothing for a person.
            let text = err.to_string();
            match text.find(" (os error") {
                Some(end) => text[..end].to_owned(),
                None => text,
            }
        }
    }
}

/// Picks each setting from the flags or the file, remembering which.
struct Merge<'a> {
    file: &'a FileConfig,
}

impl Merge<'_> {
    fn pick<T>(&self, name: &'static str, flag: Option<T>, file: Option<T>) -> Option<Setting<T>> {
        match (flag, file) {
            (Some(value), _) => Some(Setting {
                value,
                origin: Origin::Flag(name),
            }),
            (None, Some(value)) => Some(Setting {
                value,
                origin: Origin::File(name, self.file.path.clone()),
            }),
            (None, None) => None,
        }
    }

    /// Like [`Merge::pick`], anchoring a relative path from the file at the file's directory.
    fn pick_path(
        &self,
        name: &'static str,
        flag: Option<PathBuf>,
        file: Option<PathBuf>,
    ) -> Option<Setting<PathBuf>> {
        let file = file.map(|path| self.file.anchor(path));
        self.pick(name, flag, file)
    }

    fn socket_addr(
        &self,
        name: &'static str,
        flag: Option<String>,
        file: Option<String>,
        default: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let Some(setting) = self.pick(name, flag, file) else {
            return Ok(default
                .parse()
                .expect("the defaults are valid socket addresses"));
        };
        setting.value.parse().map_err(|_| {
            invalid(
                &setting,
                &setting.value,
                format!("not an IP:PORT address (e.g. {default})"),
            )
        })
    }

    fn join(
        &self,
        flag: Vec<String>,
        file: Option<Vec<String>>,
    ) -> Result<Vec<Setting<HostPort>>, ConfigError> {
        let flag = if flag.is_empty() { None } else { Some(flag) };
        let Some(setting) = self.pick("join", flag, file) else {
            return Ok(Vec::new());
        };
        let mut join = Vec::with_capacity(setting.value.len());
        for address in &setting.value {
            let one = Setting {
                value: address.trim().to_owned(),
                origin: setting.origin.clone(),
            };
            join.push(host_port(&one)?);
        }
        Ok(join)
    }

    fn tls(
        &self,
        dev: bool,
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, ConfigError> {
        let file = self.file;
        let ca = self.pick_path("tls_ca", ca, file.tls_ca.clone());
        let cert = self.pick_path("tls_cert", cert, file.tls_cert.clone());
        let key = self.pick_path("tls_key", key, file.tls_key.clone());
        let given: Vec<&Origin> = [&ca, &cert, &key]
            .into_iter()
            .flatten()
            .map(|setting| &setting.origin)
            .collect();
        if dev {
            return match given.first() {
                None => Ok(None),
                Some(origin) => Err(ConfigError::Conflict(format!(
                    "{origin} cannot be used with --dev: a dev node generates its own \
                     certificates (drop --dev to use yours)"
                ))),
            };
        }
        match (ca, cert, key) {
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    (ca.is_none(), "--tls-ca"),
                    (cert.is_none(), "--tls-cert"),
                    (key.is_none(), "--tls-key"),
                ]
                .into_iter()
                .filter_map(|(missing, name)| missing.then_some(name))
                .collect();
                Err(ConfigError::Conflict(format!(
                    "missing {}: a node needs the cluster CA, its certificate and its key \
                     (create them with `mantissa tls init` and `mantissa tls issue`), or run \
                     a throwaway node with --dev",
                    missing.join(", ")
                )))
            }
        }
    }

    fn log_format(&self) -> Result<LogFormat, ConfigError> {
        let Some(setting) = self.pick::<String>("log_format", None, self.file.log_format.clone())
        else {
            return Ok(LogFormat::default());
        };
        setting
            .value
            .parse()
            .map_err(|reason| invalid(&setting, &setting.value, reason))
    }
}

fn host_port(setting: &Setting<String>) -> Result<Setting<HostPort>, ConfigError> {
    let value = setting
        .value
        .parse()
        .map_err(|reason| invalid(setting, &setting.value, reason))?;
    Ok(Setting {
        value,
        origin: setting.origin.clone(),
    })
}

/// An [`ConfigError::Invalid`] naming the setting's source and its (quoted) value.
fn invalid<T>(
    setting: &Setting<T>,
    value: &impl fmt::Debug,
    reason: impl fmt::Display,
) -> ConfigError {
    ConfigError::Invalid {
        setting: format!("{} {value:?}", setting.origin),
        reason: reason.to_string(),
    }
}

/// ` line N (the line's text)` for a byte offset into `text`.
fn locate(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line_number = before.matches('\n').count() + 1;
    let line = text.lines().nth(line_number - 1).unwrap_or("").trim();
    if line.is_empty() {
        format!(" line {line_number}")
    } else {
        format!(" line {line_number} ({line})")
    }
}

fn one_line(message: &str) -> String {
    message.trim().replace('\n', "; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_flags() -> AgentFlags {
        AgentFlags {
            tls_ca: Some("ca.pem".into()),
            tls_cert: Some("n1.pem".into()),
            tls_key: Some("n1-key.pem".into()),
            ..AgentFlags::default()
        }
    }

    fn file(text: &str) -> FileConfig {
        FileConfig::parse(Path::new("/etc/mantissa/agent.toml"), text).unwrap()
    }

    #[test]
    fn defaults_without_file() {
        let config = AgentConfig::resolve(tls_flags(), None).unwrap();
        assert_eq!(config.bind, DEFAULT_BIND.parse().unwrap());
        assert_eq!(config.http, DEFAULT_HTTP.parse().unwrap());
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.data_dir, None);
        assert_eq!(config.node_id, None);
        assert!(config.join.is_empty());
        assert!(!config.discard_corrupt_data);
        assert_eq!(config.max_body_bytes, None);
    }

    #[test]
    fn the_shutdown_bound_comes_from_flag_or_file_and_is_checked() {
        let default = AgentConfig::resolve(tls_flags(), None).unwrap();
        assert_eq!(default.shutdown_timeout, DEFAULT_SHUTDOWN_TIMEOUT);
        let from_file =
            AgentConfig::resolve(tls_flags(), Some(file("shutdown_timeout_ms = 800"))).unwrap();
        assert_eq!(from_file.shutdown_timeout, Duration::from_millis(800));
        let flags = AgentFlags {
            shutdown_timeout_ms: Some(300),
            ..tls_flags()
        };
        let from_flag =
            AgentConfig::resolve(flags, Some(file("shutdown_timeout_ms = 800"))).unwrap();
        assert_eq!(from_flag.shutdown_timeout, Duration::from_millis(300));
        let flags = AgentFlags {
            shutdown_timeout_ms: Some(0),
            ..tls_flags()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert!(err.contains("shutdown"), "{err}");
    }

    #[test]
    fn dev_defaults_to_loopback_and_a_dev_name() {
        let flags = AgentFlags {
            dev: true,
            ..AgentFlags::default()
        };
        let config = AgentConfig::resolve(flags, None).unwrap();
        assert_eq!(config.bind, DEFAULT_DEV_BIND.parse().unwrap());
        assert_eq!(config.node_id.as_deref(), Some(DEFAULT_DEV_NODE_ID));
        assert_eq!(config.tls, None);
    }

    #[test]
    fn flag_wins_over_file_and_file_over_default() {
        let file = file(
            r#"
            bind = "10.0.0.1:7000"
            http = "10.0.0.1:8000"
            log_format = "json"
            join = ["seed-1:7701", "10.0.0.2:7701"]
            discard_corrupt_data = true
            max_body_bytes = 1024
            "#,
        );
        let flags = AgentFlags {
            bind: Some("10.0.0.9:9000".into()),
            join: vec!["flagged:1".into()],
            ..tls_flags()
        };
        let config = AgentConfig::resolve(flags, Some(file)).unwrap();
        assert_eq!(config.bind, "10.0.0.9:9000".parse().unwrap());
        assert_eq!(config.http, "10.0.0.1:8000".parse().unwrap());
        assert_eq!(config.log_format, LogFormat::Json);
        assert!(config.discard_corrupt_data);
        assert_eq!(config.max_body_bytes, Some(1024));
        let join: Vec<String> = config.join.iter().map(|j| j.value.to_string()).collect();
        assert_eq!(join, ["flagged:1"]);
        assert_eq!(config.join[0].origin, Origin::Flag("join"));
    }

    #[test]
    fn join_from_file_when_no_flag() {
        let file = file(r#"join = ["seed-1.example:7701", "[::1]:7701", "10.0.0.2:7701"]"#);
        let config = AgentConfig::resolve(tls_flags(), Some(file)).unwrap();
        let join: Vec<String> = config.join.iter().map(|j| j.value.to_string()).collect();
        assert_eq!(join, ["seed-1.example:7701", "[::1]:7701", "10.0.0.2:7701"]);
        assert_eq!(
            config.join[0].origin,
            Origin::File("join", "/etc/mantissa/agent.toml".into())
        );
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let err = FileConfig::parse(
            Path::new("agent.toml"),
            "bind = \"0.0.0.0:7701\"\nbnid = \"x\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("config file agent.toml line 2 (bnid = \"x\"): "),
            "{text}"
        );
        assert!(text.contains("unknown field `bnid`"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn wrong_type_is_located() {
        let err = FileConfig::parse(Path::new("a.toml"), "max_body_bytes = \"big\"").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 1 (max_body_bytes = \"big\")"), "{text}");
    }

    #[test]
    fn bad_address_names_the_flag_or_the_field() {
        let flags = AgentFlags {
            bind: Some("localhost".into()),
            ..tls_flags()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert!(
            err.starts_with("--bind \"localhost\": not an IP:PORT address"),
            "{err}"
        );

        let err = AgentConfig::resolve(tls_flags(), Some(file("http = \"1.2.3.4\"")))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("http (in /etc/mantissa/agent.toml) \"1.2.3.4\": not an IP:PORT"),
            "{err}"
        );

        let flags = AgentFlags {
            join: vec!["seed-1".into()],
            ..tls_flags()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert!(
            err.starts_with("--join \"seed-1\": expected HOST:PORT"),
            "{err}"
        );
    }

    #[test]
    fn missing_tls_files_are_listed() {
        let flags = AgentFlags {
            tls_cert: Some("n1.pem".into()),
            ..AgentFlags::default()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert!(err.starts_with("missing --tls-ca, --tls-key: "), "{err}");
    }

    #[test]
    fn dev_refuses_tls_files_and_join() {
        let flags = AgentFlags {
            dev: true,
            ..tls_flags()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert!(
            err.starts_with("--tls-ca cannot be used with --dev"),
            "{err}"
        );
        let flags = AgentFlags {
            dev: true,
            join: vec!["10.0.0.1:7701".into()],
            ..AgentFlags::default()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert!(err.starts_with("--join cannot be used with --dev"), "{err}");
    }

    #[test]
    fn relative_paths_in_the_file_are_anchored_at_its_directory() {
        let file = file(
            r#"
            data_dir = "data"
            tls_ca = "tls/ca.pem"
            tls_cert = "/abs/n1.pem"
            tls_key = "tls/n1-key.pem"
            "#,
        );
        let config = AgentConfig::resolve(AgentFlags::default(), Some(file)).unwrap();
        assert_eq!(config.data_dir, Some("/etc/mantissa/data".into()));
        let tls = config.tls.unwrap();
        assert_eq!(tls.ca.value, PathBuf::from("/etc/mantissa/tls/ca.pem"));
        assert_eq!(tls.cert.value, PathBuf::from("/abs/n1.pem"));
        assert_eq!(
            tls.key.origin.to_string(),
            "tls_key (in /etc/mantissa/agent.toml)"
        );
    }

    #[test]
    fn bad_node_id_and_log_format_are_named() {
        let flags = AgentFlags {
            node_id: Some("Node_1".into()),
            ..tls_flags()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert!(
            err.starts_with("--node-id \"Node_1\": invalid node name"),
            "{err}"
        );

        let err = AgentConfig::resolve(tls_flags(), Some(file("log_format = \"xml\"")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "log_format (in /etc/mantissa/agent.toml) \"xml\": expected \"text\" or \"json\""
        );
    }

    #[test]
    fn zero_body_limit_is_refused() {
        let flags = AgentFlags {
            max_body_bytes: Some(0),
            ..tls_flags()
        };
        let err = AgentConfig::resolve(flags, None).unwrap_err().to_string();
        assert_eq!(err, "--max-body-bytes 0: must be at least 1");
    }

    #[test]
    fn host_port_parsing() {
        let parsed: HostPort = "[fe80::1]:7701".parse().unwrap();
        assert_eq!((parsed.host.as_str(), parsed.port), ("fe80::1", 7701));
        assert_eq!(parsed.to_string(), "[fe80::1]:7701");
        assert!("node-2:99999".parse::<HostPort>().is_err());
        assert!(":7701".parse::<HostPort>().is_err());
        assert!("a b:1".parse::<HostPort>().is_err());
    }

    #[test]
    fn unreadable_file_is_named() {
        let err = FileConfig::read(Path::new("/nonexistent/mantissa.toml")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file /nonexistent/mantissa.toml: no such file"
        );
    }
}
