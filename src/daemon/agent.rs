//! The `mantissa agent` process: loads the node's identity, starts the embedded node, serves the
//! HTTP API, and on a signal stops the API, leaves the cluster and flushes storage.
//!
//! [`run`] takes its shutdown future from the caller, so tests can stop an agent without
//! signals; the binary passes [`shutdown_signal`]. The library prints nothing: it logs through
//! `tracing`, and what the user must see (the `--dev` banner) it hands back
//! ([`Started::dev_banner`]) for the binary to print.

use std::future::Future;
use std::io::{self, IsTerminal};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, RootCertStore};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

use crate::daemon::config::{AgentConfig, HostPort, LogFormat, Origin, Setting, io_reason};
use crate::daemon::http::{self, HttpOptions};
use crate::runtime::{
    self, ClusterCa, Handle, NodeConfig, NodeCredentials, Scheduler, SchedulerConfig, StartError,
    StorageConfig, TlsConfig, TlsError, TransportError,
};
use crate::sched::Resources;

/// How long the certificates generated for a `--dev` node are valid.
const DEV_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// A certificate expiring sooner than this is worth a warning at start.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// Why the agent could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// A configured file or value cannot be used (missing file, bad certificate, name mismatch).
    /// Nothing was started.
    #[error("{0}")]
    Config(String),
    /// The node or the HTTP API could not start (port taken, data file locked, …). Nothing is
    /// left running.
    #[error("{0}")]
    Start(String),
    /// The HTTP server failed while running; the node was shut down.
    #[error("HTTP API failed: {0}")]
    Serve(String),
}

impl AgentError {
    /// The process exit status for this error: 2 for a configuration problem, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => 2,
            AgentError::Start(_) | AgentError::Serve(_) => 1,
        }
    }
}

/// The node's identity and where it listens, ready to start.
struct Prepared {
    node: NodeConfig,
    /// Where the address peers are told comes from, for the start log.
    advertise_note: Option<String>,
}

/// Sets up logging to stderr: `format` lines, level from `RUST_LOG` (default `info`).
pub fn init_logging(format: LogFormat) {
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(filter) => (filter, None),
            Err(err) => (EnvFilter::new("info"), Some(format!("{spec:?}: {err}"))),
        },
        _ => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(io::stderr().is_terminal())
        .with_writer(io::stderr)
        // Its own report of a failed write is an `eprintln!`, which panics when stderr is a
        // closed pipe: a log line that cannot be written is dropped instead.
        .log_internal_errors(false);
    // A subscriber already installed (by a test, say) keeps logging; that is fine.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(reason) = bad_filter {
        warn!("ignoring RUST_LOG {reason}; logging at info");
    }
}

/// Runs the agent until `shutdown` resolves: then stops the HTTP API, leaves the cluster and
/// flushes storage. Needs a tokio runtime. The same as [`start`] then [`Started::serve`], for a
/// caller with nothing to show the user in between.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    start(config).await?.serve(shutdown).await
}

/// An agent that is up (its node runs, its HTTP port is bound, its scheduler started) and not
/// serving HTTP yet: what [`start`] returns, for [`Started::serve`].
pub struct Started {
    listener: TcpListener,
    handle: Handle,
    scheduler: Option<Scheduler>,
    options: HttpOptions,
    /// How long open HTTP requests get to finish at shutdown (half the shutdown bound).
    http_drain: Duration,
    /// Set for a `--dev` agent; the library does not print it, the binary does.
    dev_banner: Option<String>,
}

impl Started {
    /// For a `--dev` agent, the text to show its user: where it listens and how to try it
    /// ([`dev_banner`]); `None` otherwise.
    pub fn dev_banner(&self) -> Option<&str> {
        self.dev_banner.as_deref()
    }

    /// Serves the HTTP API until `shutdown` resolves: then stops the API, leaves the cluster
    /// and flushes storage. Needs a tokio runtime.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AgentError> {
        serve_until(
            self.listener,
            self.handle,
            self.scheduler,
            self.options,
            self.http_drain,
            shutdown,
        )
        .await
    }
}

/// Starts the agent (identity, node, HTTP port, scheduler) without serving yet; see [`run`].
/// Needs a tokio runtime.
pub async fn start(config: AgentConfig) -> Result<Started, AgentError> {
    let prepared = prepare(&config).await?;
    let listener = TcpListener::bind(config.http).await.map_err(|err| {
        let hint = if err.kind() == io::ErrorKind::AddrInUse {
            " (is another agent running? choose another port with --http)"
        } else {
            ""
        };
        AgentError::Start(format!("--http {}: {}{hint}", config.http, io_reason(&err)))
    })?;
    let http_addr = listener.local_addr().unwrap_or(config.http);
    let capacity = match &config.scheduling.offer {
        Some(offer) => Some(offer.capacity().map_err(AgentError::Config)?),
        None => None,
    };
    let seeds = prepared.node.seeds.clone();
    let handle = runtime::start(prepared.node)
        .await
        .map_err(|err| start_error(err, &config))?;
    log_started(&handle, &config, http_addr, &seeds, prepared.advertise_note).await;
    let dev_banner = config.dev.then(|| {
        dev_banner(
            handle.name().as_str(),
            http_addr,
            handle.addr(),
            config.data_dir.as_deref(),
        )
    });
    let scheduler = match start_scheduler(&handle, &config, capacity).await {
        Ok(scheduler) => scheduler,
        Err(err) => {
            let _ = handle.shutdown().await;
            return Err(err);
        }
    };
    Ok(Started {
        listener,
        handle,
        scheduler,
        options: http_options(&config),
        http_drain: config.shutdown_timeout / 2,
        dev_banner,
    })
}

/// Starts the scheduler loop when the agent plans or offers its machine.
async fn start_scheduler(
    handle: &Handle,
    config: &AgentConfig,
    capacity: Option<Resources>,
) -> Result<Option<Scheduler>, AgentError> {
    let settings = &config.scheduling;
    let offer = match (&settings.offer, capacity) {
        (Some(offer), Some(capacity)) => Some(offer.record(handle.name().clone(), capacity)),
        _ => None,
    };
    if !settings.plan && offer.is_none() {
        return Ok(None);
    }
    let scheduler = handle
        .run_scheduler(SchedulerConfig::new(settings.plan, offer))
        .await
        .map_err(|err| AgentError::Start(format!("scheduling: {err}")))?;
    Ok(Some(scheduler))
}

/// Resolves once the process gets SIGINT (ctrl-c) or SIGTERM; after that, a second one of
/// either exits the process at once with status 130.
///
/// The handlers are installed when this is called, not when the future is first polled, so a
/// signal during start-up is not lost. Needs a tokio runtime.
pub fn shutdown_signal() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut signals = Signals::install()?;
    Ok(async move {
        let name = signals.next().await;
        info!(
            signal = name,
            "shutting down (send another signal to exit at once)"
        );
        tokio::spawn(async move {
            let name = signals.next().await;
            warn!(
                signal = name,
                "received again: exiting without a clean shutdown"
            );
            std::process::exit(130);
        });
    })
}

/// The text a `--dev` agent prints once it is up: where it listens and how to try it.
pub fn dev_banner(
    name: &str,
    http: SocketAddr,
    gossip: SocketAddr,
    data_dir: Option<&Path>,
) -> String {
    let kept = match data_dir {
        Some(dir) => format!("data kept in {}", dir.display()),
        None => "in memory".to_owned(),
    };
    let nothing_kept = if data_dir.is_some() {
        ""
    } else {
        " (nothing is kept)"
    };
    let shown = if http.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), http.port())
    } else {
        http
    };
    let url = format!("http://{shown}");
    let addr_flag = if url == crate::daemon::client::DEFAULT_ADDR {
        String::new()
    } else {
        format!(" --addr {url}")
    };
    format!(
        "mantissa agent --dev: node {name:?}, {kept}, with throwaway certificates\
         {nothing_kept}\n\
         \x20 HTTP API  {url}\n\
         \x20 gossip    {gossip} (QUIC, mutual TLS)\n\
         \n\
         Try it from another terminal:\n\
         \x20 curl -X PUT --data-binary hello {url}/v1/kv/greeting\n\
         \x20 curl {url}/v1/kv/greeting\n\
         \x20 mantissa{addr_flag} kv put greeting hello     # or: cargo run --release --{addr_flag} kv put greeting hello\n\
         \x20 mantissa{addr_flag} kv get greeting\n\
         \x20 mantissa{addr_flag} kv watch ''              # prints every change as it happens\n\
         \x20 mantissa{addr_flag} status\n\
         \n\
         Stop with ctrl-c."
    )
}

/// Builds the node configuration: identity, addresses, seeds and storage.
async fn prepare(config: &AgentConfig) -> Result<Prepared, AgentError> {
    let tls = if config.dev {
        dev_identity(config.node_id.as_deref().unwrap_or("dev"))?
    } else {
        file_identity(config)?
    };
    let mut seeds = Vec::new();
    for join in &config.join {
        for addr in resolve(join).await? {
            if !seeds.contains(&addr) {
                seeds.push(addr);
            }
        }
    }
    let mut node = NodeConfig::new(config.bind, tls, seeds);
    // Half of the shutdown bound for open HTTP requests, the other half for the node.
    node.shutdown_timeout = config.shutdown_timeout / 2;
    node.set_memory_budget(config.buffer_memory);
    let mut advertise_note = None;
    node.advertise = match &config.advertise {
        Some(advertise) => resolve(advertise).await?.into_iter().next(),
        None if config.bind.ip().is_unspecified() => {
            let guess = guess_advertise(config.bind, &node.seeds);
            advertise_note = Some(match guess {
                Some(addr) => format!(
                    "advertising {addr}, the interface that routes to the first seed; set \
                     --advertise to choose another"
                ),
                None => format!(
                    "--bind {} listens on every interface but peers cannot dial that address: \
                     set --advertise to the address they should use",
                    config.bind
                ),
            });
            guess
        }
        None => None,
    };
    if let Some(offset) = clock_offset()? {
        tracing::warn!(
            offset_ms = offset,
            "{CLOCK_OFFSET_VAR} is set: this node's wall clock is skewed on purpose (testing only)"
        );
        node.wall_clock = std::sync::Arc::new(move || {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis() as u64);
            now.saturating_add_signed(offset)
        });
    }
    node.storage = config.data_dir.as_ref().map(|dir| StorageConfig {
        discard_corrupt: config.discard_corrupt_data,
        ..StorageConfig::new(dir)
    });
    Ok(Prepared {
        node,
        advertise_note,
    })
}

/// Skews the node's wall clock by this many milliseconds (positive: ahead), so fault tests can
/// check that merges do not depend on synchronised clocks. Never for production use.
const CLOCK_OFFSET_VAR: &str = "MANTISSA_DANGER_CLOCK_OFFSET_MS";

fn clock_offset() -> Result<Option<i64>, AgentError> {
    let Ok(text) = std::env::var(CLOCK_OFFSET_VAR) else {
        return Ok(None);
    };
    text.trim().parse().map(Some).map_err(|_| {
        AgentError::Config(format!(
            "{CLOCK_OFFSET_VAR} {text:?}: not a whole number of milliseconds"
        ))
    })
}

/// A throwaway CA and a certificate for `name`, generated in memory.
fn dev_identity(name: &str) -> Result<TlsConfig, AgentError> {
    let generated = ClusterCa::generate("dev").and_then(|ca| {
        let node = ca.issue(name, DEV_CERT_VALIDITY)?;
        TlsConfig::new(ca.cert_pem(), &node)
    });
    generated.map_err(|err| AgentError::Config(format!("--dev certificates: {err}")))
}

/// Reads the CA, certificate and key files and checks that they fit together.
fn file_identity(config: &AgentConfig) -> Result<TlsConfig, AgentError> {
    let Some(files) = &config.tls else {
        return Err(AgentError::Config(
            "no TLS files configured: set --tls-ca, --tls-cert and --tls-key, or use --dev"
                .to_owned(),
        ));
    };
    let ca_pem = read_pem(&files.ca)?;
    let node = NodeCredentials {
        cert_pem: read_pem(&files.cert)?,
        key_pem: read_pem(&files.key)?,
    };
    let tls = TlsConfig::new(&ca_pem, &node).map_err(|err| {
        let file = match &err {
            TlsError::BadInput { what, .. } if what.contains("CA") => &files.ca,
            TlsError::BadInput { what, .. } if what.contains("key") => &files.key,
            _ => &files.cert,
        };
        let reason = match err {
            TlsError::BadInput { reason, .. } => reason,
            other => other.to_string(),
        };
        AgentError::Config(format!("{}: {reason}", describe(file)))
    })?;
    check_signed_by(&ca_pem, &node.cert_pem)
        .map_err(|reason| AgentError::Config(format!("{}: {reason}", describe(&files.cert))))?;
    if let Some(expected) = &config.node_id
        && expected != tls.node_name()
    {
        return Err(AgentError::Config(format!(
            "--node-id {expected:?} does not match the name in the certificate {}: {:?}",
            files.cert.value.display(),
            tls.node_name()
        )));
    }
    if time_left(&node.cert_pem) == Some(Duration::ZERO) {
        // Peers would refuse every handshake: fail here, where the cause is plain.
        return Err(AgentError::Config(format!(
            "{}: the certificate has expired; issue a new one with `mantissa tls issue`",
            describe(&files.cert)
        )));
    }
    if let Some(left) = time_left(&node.cert_pem)
        && left < EXPIRY_WARNING
    {
        warn!(
            cert = %files.cert.value.display(),
            days = left.as_secs() / 86_400,
            "the node certificate expires soon; issue a new one with `mantissa tls issue`"
        );
    }
    Ok(tls)
}

fn read_pem(file: &Setting<std::path::PathBuf>) -> Result<String, AgentError> {
    std::fs::read_to_string(&file.value)
        .map_err(|err| AgentError::Config(format!("{}: {}", describe(file), io_reason(&err))))
}

/// `--tls-cert /x/n1.pem`, or `tls_cert (in agent.toml) /x/n1.pem`.
fn describe(file: &Setting<std::path::PathBuf>) -> String {
    format!("{} {}", file.origin, file.value.display())
}

/// Checks that `cert_pem` chains to the CA and is valid now, as its peers will check it.
fn check_signed_by(ca_pem: &str, cert_pem: &str) -> Result<(), String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|err| format!("CA certificate: {err:?}"))?;
        roots
            .add(cert)
            .map_err(|err| format!("CA certificate: {err}"))?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("invalid PEM: {err:?}"))?;
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("no PEM certificate found".to_owned());
    };
    let parsed = ParsedCertificate::try_from(leaf).map_err(|err| err.to_string())?;
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        intermediates,
        UnixTime::now(),
        algorithms.all,
    )
    .map_err(|err| match err {
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "not signed by the cluster CA given with --tls-ca".to_owned(),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the certificate has expired; issue a new one with `mantissa tls issue`".to_owned(),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "the certificate is not valid yet (is this host's clock right?)".to_owned(),
        other => format!("not accepted by the cluster CA: {other}"),
    })
}

/// How long the first certificate in `cert_pem` remains valid; `None` if unreadable.
fn time_left(cert_pem: &str) -> Option<Duration> {
    let der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let not_after = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(not_after.saturating_sub(now)))
}

/// Every address `target` names, looking host names up in DNS.
async fn resolve(target: &Setting<HostPort>) -> Result<Vec<SocketAddr>, AgentError> {
    let fail = |reason: String| AgentError::Start(format!("{}: {reason}", describe_addr(target)));
    let host_port = &target.value;
    if let Ok(ip) = host_port.host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, host_port.port)]);
    }
    let found: Vec<SocketAddr> = tokio::net::lookup_host((host_port.host.as_str(), host_port.port))
        .await
        .map_err(|err| fail(format!("cannot resolve {:?}: {err}", host_port.host)))?
        .collect();
    if found.is_empty() {
        return Err(fail(format!("{:?} has no address", host_port.host)));
    }
    Ok(found)
}

fn describe_addr(target: &Setting<HostPort>) -> String {
    match &target.origin {
        Origin::Flag(_) => format!("{} {}", target.origin, target.value),
        Origin::File(..) => format!("{} {:?}", target.origin, target.value.to_string()),
    }
}

/// The local address of the interface that routes to the first seed, with `bind`'s port.
///
/// Connecting a UDP socket sends nothing: it only asks the routing table.
fn guess_advertise(bind: SocketAddr, seeds: &[SocketAddr]) -> Option<SocketAddr> {
    let seed = seeds.first()?;
    let any = match seed {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
    };
    let socket = UdpSocket::bind(any).ok()?;
    socket.connect(seed).ok()?;
    let local = socket.local_addr().ok()?;
    (!local.ip().is_unspecified() && bind.port() != 0)
        .then(|| SocketAddr::new(local.ip(), bind.port()))
}

fn start_error(err: StartError, config: &AgentConfig) -> AgentError {
    match err {
        StartError::Transport(TransportError::Bind { addr, source }) => {
            let hint = if source.kind() == io::ErrorKind::AddrInUse {
                " (is another agent running? choose another port with --bind)"
            } else {
                ""
            };
            AgentError::Start(format!("--bind {addr}: {}{hint}", io_reason(&source)))
        }
        StartError::Storage(err) => {
            let dir = config
                .data_dir
                .as_deref()
                .map_or_else(String::new, |dir| format!("--data-dir {}: ", dir.display()));
            AgentError::Start(format!("{dir}{err}"))
        }
        other => AgentError::Start(format!("cannot start the node: {other}")),
    }
}

async fn log_started(
    handle: &Handle,
    config: &AgentConfig,
    http: SocketAddr,
    seeds: &[SocketAddr],
    advertise_note: Option<String>,
) {
    let replica = match handle.status().await {
        Ok(status) => status.me.replica.to_string(),
        Err(err) => format!("unknown ({err})"),
    };
    let data = match &config.data_dir {
        Some(dir) => dir.display().to_string(),
        None => "in memory".to_owned(),
    };
    info!(
        node = %handle.name(),
        replica = %replica,
        gossip = %handle.addr(),
        bind = %config.bind,
        http = %http,
        data = %data,
        seeds = ?seeds,
        "agent started"
    );
    if let Some(note) = advertise_note {
        warn!("{note}");
    }
    if config.data_dir.is_none() && !config.dev {
        warn!(
            "no --data-dir: this node keeps its data in memory only, and a restart loses \
             everything not yet replicated to peers"
        );
    }
    if seeds.is_empty() && !config.dev {
        info!("no --join: this node starts a new cluster");
    }
}

fn http_options(config: &AgentConfig) -> HttpOptions {
    let mut options = HttpOptions::default();
    if let Some(limit) = config.max_body_bytes {
        options.max_body_bytes = limit;
    }
    options
}

/// Serves the HTTP API until `shutdown`, then drains it and shuts the node down.
async fn serve_until(
    listener: TcpListener,
    handle: Handle,
    scheduler: Option<Scheduler>,
    options: HttpOptions,
    http_drain: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let (stop, stopped) = oneshot::channel::<()>();
    let stop_serving = async move {
        let _ = stopped.await;
    };
    let mut server = tokio::spawn(http::serve(listener, handle.clone(), options, stop_serving));
    let failure = tokio::select! {
        finished = &mut server => Some(match finished {
            Ok(Ok(())) => "the server stopped unexpectedly".to_owned(),
            Ok(Err(err)) => io_reason(&err),
            Err(err) => err.to_string(),
        }),
        () = shutdown => None,
    };
    if failure.is_none() {
        let _ = stop.send(());
        match tokio::time::timeout(http_drain, &mut server).await {
            Ok(Ok(Err(err))) => warn!(error = %err, "HTTP server error while stopping"),
            Ok(_) => {}
            Err(_) => {
                warn!("HTTP requests still open after {http_drain:?} were cut off");
                server.abort();
            }
        }
    }
    if let Some(scheduler) = scheduler {
        scheduler.stop().await;
    }
    info!("leaving the cluster");
    if let Err(err) = handle.shutdown().await {
        warn!(error = %err, "node shutdown");
    }
    match failure {
        Some(reason) => Err(AgentError::Serve(reason)),
        None => {
            info!("agent stopped");
            Ok(())
        }
    }
}

/// The signals that stop the agent.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// Waits for the next signal and names it.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::daemon::config::{AgentFlags, TlsFiles};

    fn setting(flag: &'static str, path: PathBuf) -> Setting<PathBuf> {
        Setting {
            value: path,
            origin: Origin::Flag(flag),
        }
    }

    /// Writes a CA and a node certificate for `name` into a fresh temporary directory.
    fn write_identity(dir: &Path, ca: &ClusterCa, name: &str) -> TlsFiles {
        std::fs::create_dir_all(dir).unwrap();
        let node = ca.issue(name, Duration::from_secs(3600)).unwrap();
        let files = TlsFiles {
            ca: setting("tls_ca", dir.join("ca.pem")),
            cert: setting("tls_cert", dir.join(format!("{name}.pem"))),
            key: setting("tls_key", dir.join(format!("{name}-key.pem"))),
        };
        std::fs::write(&files.ca.value, ca.cert_pem()).unwrap();
        std::fs::write(&files.cert.value, &node.cert_pem).unwrap();
        std::fs::write(&files.key.value, &node.key_pem).unwrap();
        files
    }

    fn temp_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mantissa-agent-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn config_with(files: TlsFiles, node_id: Option<&str>) -> AgentConfig {
        let flags = AgentFlags {
            tls_ca: Some(files.ca.value.clone()),
            tls_cert: Some(files.cert.value.clone()),
            tls_key: Some(files.key.value.clone()),
            node_id: node_id.map(str::to_owned),
            ..AgentFlags::default()
        };
        AgentConfig::resolve(flags, None).unwrap()
    }

    #[test]
    fn matching_files_give_the_certificates_name() {
        let dir = temp_dir("ok");
        let ca = ClusterCa::generate("test").unwrap();
        let files = write_identity(&dir, &ca, "n1");
        let tls = file_identity(&config_with(files.clone(), None)).unwrap();
        assert_eq!(tls.node_name(), "n1");
        assert!(file_identity(&config_with(files, Some("n1"))).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_expired_certificate_is_refused_at_start() {
        let dir = temp_dir("expired");
        let ca = ClusterCa::generate("test").unwrap();
        let files = write_identity(&dir, &ca, "n1");
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let expired = ca.issue_between("n1", now - 3 * day, now - day).unwrap();
        std::fs::write(&files.cert.value, &expired.cert_pem).unwrap();
        std::fs::write(&files.key.value, &expired.key_pem).unwrap();
        let err = file_identity(&config_with(files, None)).unwrap_err();
        assert!(
            err.to_string().contains("the certificate has expired"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn node_id_mismatch_is_refused() {
        let dir = temp_dir("mismatch");
        let ca = ClusterCa::generate("test").unwrap();
        let files = write_identity(&dir, &ca, "n1");
        let err = file_identity(&config_with(files, Some("n2"))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--node-id \"n2\" does not match"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn certificate_from_another_ca_is_refused() {
        let dir = temp_dir("other-ca");
        let ca = ClusterCa::generate("test").unwrap();
        let other = ClusterCa::generate("other").unwrap();
        let files = write_identity(&dir, &other, "n1");
        std::fs::write(&files.ca.value, ca.cert_pem()).unwrap();
        let err = file_identity(&config_with(files.clone(), None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "--tls-cert {}: not signed by the cluster CA given with --tls-ca",
                files.cert.value.display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_file_is_named() {
        let dir = temp_dir("missing");
        let ca = ClusterCa::generate("test").unwrap();
        let files = write_identity(&dir, &ca, "n1");
        std::fs::remove_file(&files.key.value).unwrap();
        let err = file_identity(&config_with(files.clone(), None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--tls-key {}: no such file", files.key.value.display())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn key_of_another_node_is_refused() {
        let dir = temp_dir("wrong-key");
        let ca = ClusterCa::generate("test").unwrap();
        let files = write_identity(&dir, &ca, "n1");
        let other = ca.issue("n2", Duration::from_secs(3600)).unwrap();
        std::fs::write(&files.key.value, other.key_pem).unwrap();
        let err = file_identity(&config_with(files.clone(), None)).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("--tls-key {}: ", files.key.value.display())),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_dev_banner_with_a_data_dir_does_not_say_in_memory() {
        let banner = dev_banner(
            "dev",
            "127.0.0.1:7700".parse().unwrap(),
            "127.0.0.1:7701".parse().unwrap(),
            Some(Path::new("/var/lib/mantissa")),
        );
        let first = banner.lines().next().unwrap();
        assert!(first.contains("data kept in /var/lib/mantissa"), "{first}");
        assert!(!banner.contains("in memory") && !banner.contains("nothing is kept"));
    }

    #[test]
    fn dev_banner_shows_how_to_try_it() {
        let banner = dev_banner(
            "dev",
            "127.0.0.1:7700".parse().unwrap(),
            "127.0.0.1:7701".parse().unwrap(),
            None,
        );
        assert!(banner.contains("curl http://127.0.0.1:7700/v1/kv/greeting"));
        assert!(banner.contains("  mantissa kv put greeting hello"));
        let banner = dev_banner(
            "dev",
            "0.0.0.0:8000".parse().unwrap(),
            "127.0.0.1:7701".parse().unwrap(),
            None,
        );
        assert!(banner.contains("mantissa --addr http://127.0.0.1:8000 kv get greeting"));
    }

    #[tokio::test]
    async fn literal_addresses_are_not_looked_up() {
        let target = Setting {
            value: "10.1.2.3:7701".parse::<HostPort>().unwrap(),
            origin: Origin::Flag("join"),
        };
        assert_eq!(
            resolve(&target).await.unwrap(),
            ["10.1.2.3:7701".parse().unwrap()]
        );
        let target = Setting {
            value: "localhost:7701".parse::<HostPort>().unwrap(),
            origin: Origin::Flag("join"),
        };
        let found = resolve(&target).await.unwrap();
        assert!(
            found
                .iter()
                .all(|addr| addr.ip().is_loopback() && addr.port() == 7701)
        );
    }

    #[test]
    fn advertise_guess_uses_the_route_to_the_seed() {
        let guess = guess_advertise(
            "0.0.0.0:7701".parse().unwrap(),
            &["127.0.0.1:9".parse().unwrap()],
        );
        assert_eq!(guess, Some("127.0.0.1:7701".parse().unwrap()));
        assert_eq!(guess_advertise("0.0.0.0:7701".parse().unwrap(), &[]), None);
    }
}
