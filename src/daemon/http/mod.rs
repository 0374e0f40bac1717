//! The daemon's HTTP/JSON API, version 1: keys, counters, sets and documents, watches,
//! membership, status, health and Prometheus metrics, as one axum [`Router`] over a node's
//! [`Handle`]. `docs/api.md` is the reference for clients.
//!
//! Every error is JSON (`{"error":{"code","message"}}`), including the router's own 404 and 405:
//! handlers parse paths, queries and bodies themselves rather than through axum's extractors,
//! whose rejections are plain text, and a middleware turns any other error response into JSON.

mod encode;
mod error;
mod jobs;
mod keys;
mod metrics;
mod request;
#[cfg(test)]
mod tests;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, get};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::daemon::http::encode::json_response;
use crate::daemon::http::error::{ApiError, ErrorNote};
use crate::daemon::http::metrics::Metrics;
use crate::daemon::http::request::{Params, await_session};
use crate::runtime::{Handle, Status};

/// How often an idle watch stream gets a heartbeat line.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long `/v1/health` waits for the node before calling it unresponsive.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// The API's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// The largest request body accepted, in bytes; a larger one gets 413. The default,
    /// 1.5 MiB, leaves room for the largest value (1 MiB) and stops a client from making the
    /// daemon buffer much more than that.
    pub max_body_bytes: usize,
    /// The longest a request may wait for its `after=` token (`wait=`); longer waits are cut to
    /// this, so a client cannot hold a connection and a waiter open for ever. Default 60 s.
    pub max_wait: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_body_bytes: 1_572_864,
            max_wait: Duration::from_secs(60),
        }
    }
}

/// What every request handler shares.
struct Shared {
    handle: Handle,
    options: HttpOptions,
    metrics: Metrics,
    /// Turns true when the server starts shutting down, so watch streams and session waits end
    /// instead of holding the graceful shutdown open.
    closing: tokio::sync::watch::Sender<bool>,
    /// How often an idle watch stream gets a heartbeat line (shorter in tests).
    heartbeat: Duration,
}

type AppState = Arc<Shared>;

impl Shared {
    fn new(handle: Handle, options: HttpOptions, heartbeat: Duration) -> Arc<Self> {
        Arc::new(Shared {
            handle,
            options,
            metrics: Metrics::default(),
            closing: tokio::sync::watch::Sender::new(false),
            heartbeat,
        })
    }
}

/// The API's routes over the node behind `handle`.
///
/// Serve it with [`serve`], which also ends watch streams on shutdown; a router served some other
/// way keeps its watch streams open until their clients leave.
pub fn router(handle: Handle, options: HttpOptions) -> Router {
    app(Shared::new(handle, options, HEARTBEAT))
}

/// Serves the API on `listener` until `shutdown` resolves, then shuts down gracefully: watch
/// streams get a last line and end, waits for tokens are cut short (503), and requests in
/// flight finish.
///
/// ```no_run
/// use mantissa::daemon::http::{HttpOptions, serve};
/// use mantissa::runtime::Handle;
///
/// async fn run(node: Handle) -> std::io::Result<()> {
///     let listener = tokio::net::TcpListener::bind("127.0.0.1:7700").await?;
///     let shutdown = async {
///         let _ = tokio::signal::ctrl_c().await;
///     };
///     serve(listener, node, HttpOptions::default(), shutdown).await
/// }
/// ```
pub async fn serve(
    listener: TcpListener,
    handle: Handle,
    options: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_shared(listener, Shared::new(handle, options, HEARTBEAT), shutdown).await
}

async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = app(shared.clone());
    let signal = async move {
        shutdown.await;
        shared.closing.send_replace(true);
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(signal)
        .await
}

fn app(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/kv", get(keys::list))
        .route("/v1/kv/", any(keys::empty_key))
        .route(
            "/v1/kv/{*key}",
            get(keys::get).put(keys::put).delete(keys::delete),
        )
        .route("/v1/counter/", any(keys::empty_key))
        .route(
            "/v1/counter/{*key}",
            get(keys::get_counter).post(keys::add_to_counter),
        )
        .route("/v1/set/", any(keys::empty_key))
        .route("/v1/set/{*key}", get(keys::get_set).post(keys::change_set))
        .route("/v1/doc/", any(keys::empty_key))
        .route(
            "/v1/doc/{*key}",
            get(keys::get_document).patch(keys::patch_document),
        )
        .route("/v1/jobs", get(jobs::list).post(jobs::submit))
        .route("/v1/jobs/{name}", get(jobs::status).delete(jobs::stop))
        .route("/v1/nodes", get(jobs::nodes))
        .route("/v1/allocations", get(jobs::allocations))
        .route("/v1/watch", get(watch::watch))
        .route("/v1/members", get(members))
        .route("/v1/status", get(status))
        .route("/v1/digest", get(digest))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics::metrics))
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(shared.clone(), observe))
        .with_state(shared)
}

/// `GET /v1/members`: this node and its live peers.
async fn members(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let status = session_status(&shared, &uri).await?;
    Ok(json_response(StatusCode::OK, &encode::members(&status)))
}

/// `GET /v1/status`: the node's view of itself and its peers, and its counters.
async fn status(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let status = session_status(&shared, &uri).await?;
    Ok(json_response(StatusCode::OK, &encode::status(&status)))
}

/// `GET /v1/digest`: a hash of the node's whole state and the version it covers; members with
/// equal digests hold the same data.
async fn digest(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let params = Params::parse(&uri, &["after", "wait"])?;
    await_session(&shared, params.session(shared.options.max_wait)?).await?;
    let digest = shared.handle.digest().await?;
    Ok(json_response(StatusCode::OK, &encode::digest(&digest)))
}

/// The node's status, once it covers the request's `after=` token, if any.
async fn session_status(shared: &Shared, uri: &Uri) -> Result<Status, ApiError> {
    let params = Params::parse(uri, &["after", "wait"])?;
    await_session(shared, params.session(shared.options.max_wait)?).await?;
    Ok(shared.handle.status().await?)
}

/// `GET /v1/health`: 200 when the node answers, 503 when it has stopped or does not answer.
async fn health(State(shared): State<AppState>) -> Result<Response, ApiError> {
    match tokio::time::timeout(HEALTH_TIMEOUT, shared.handle.status()).await {
        Ok(Ok(status)) => {
            let body = json!({ "status": "ok", "name": status.me.name.as_str() });
            Ok(json_response(StatusCode::OK, &body))
        }
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unresponsive",
            format!("the node did not answer within {HEALTH_TIMEOUT:?}"),
        )),
    }
}

/// Any path no route matches.
async fn no_route(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no route for {}; see docs/api.md", uri.path()),
    )
}

/// Counts and logs every request, and makes sure every error response is JSON.
async fn observe(State(shared): State<AppState>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let uri = request.uri().clone();
    let response = json_errors(next.run(request).await);
    let status = response.status();
    shared.metrics.request(&route, &method, status);
    let elapsed = started.elapsed();
    match response.extensions().get::<ErrorNote>() {
        Some(note) if status.is_server_error() => warn!(
            %method, %uri, status = status.as_u16(), ?elapsed, code = note.code,
            message = %note.message, "request failed"
        ),
        Some(note) => debug!(
            %method, %uri, status = status.as_u16(), ?elapsed, code = note.code,
            message = %note.message, "request refused"
        ),
        None => debug!(%method, %uri, status = status.as_u16(), ?elapsed, "request"),
    }
    response
}

/// Replaces the body of an error response that is not JSON (one the router made itself, such
/// as a 405) with a JSON error, keeping its status and headers (`Allow`, for instance).
fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_error = status.is_client_error() || status.is_server_error();
    let is_json = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if !is_error || is_json {
        return response;
    }
    let error = ApiError::from_status(status);
    let (mut parts, _) = response.into_parts();
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(CONTENT_LENGTH);
    let mut text = error.body().to_string();
    text.push('\n');
    parts.extensions.insert(ErrorNote {
        code: error.code,
        message: error.message,
    });
    Response::from_parts(parts, Body::from(text))
}
