//! The scheduling routes: `/v1/jobs` (submit, list, status, stop), `/v1/nodes` and
//! `/v1/allocations`. Reads are computed from this node's replica, like every read here, and
//! take the same `after=`/`wait=` session parameters.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use serde_json::{Value as Json, json};

use crate::daemon::http::encode::json_response;
use crate::daemon::http::error::ApiError;
use crate::daemon::http::request::{Params, await_session, parse_json, percent_decode, read_body};
use crate::daemon::http::{AppState, Shared};
use crate::gossip::MemberName;
use crate::runtime::SchedulingView;
use crate::sched::{JobSpec, Name};

const JOBS: &str = "/v1/jobs/";

/// `POST /v1/jobs`: the body is a job spec (JSON); submits or replaces the job.
pub(super) async fn submit(
    State(shared): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = Params::parse(&uri, &["after", "wait"])?;
    // Any content type: the body must parse as a job spec whatever it declares, so curl's
    // default (`-d` sends application/x-www-form-urlencoded) works as well as
    // application/json.
    let body = read_body(&headers, body, shared.options.max_body_bytes).await?;
    let spec: JobSpec = parse_json(&body)?;
    await_session(&shared, params.session(shared.options.max_wait)?).await?;
    let token = shared.handle.submit_job(&spec).await?;
    let tasks = spec.tasks().count();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "job": spec.name, "tasks": tasks, "token": token.to_string() }),
    ))
}

/// `GET /v1/jobs`: every job, with how many of its tasks are admitted, claimed and pending.
pub(super) async fn list(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let state = scheduling(&shared, &uri, &[]).await?;
    let jobs: Vec<Json> = state
        .view
        .jobs
        .keys()
        .filter_map(|job| state.job(job))
        .map(|status| {
            json!({
                "name": status.spec.name,
                "namespace": status.spec.namespace,
                "priority": status.spec.priority,
                "tasks": status.tasks.len(),
                "admitted": status.admitted,
                "claimed": status.claimed,
                "pending": status.pending,
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "jobs": jobs, "token": state.token.to_string() }),
    ))
}

/// `GET /v1/jobs/{name}`: the spec and where each task stands.
pub(super) async fn status(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let job = job_name(&uri)?;
    let state = scheduling(&shared, &uri, &[]).await?;
    let status = state.job(&job).ok_or_else(|| no_job(&job))?;
    let mut body = serde_json::to_value(&status).map_err(internal)?;
    body["token"] = Json::String(state.token.to_string());
    Ok(json_response(StatusCode::OK, &body))
}

/// `DELETE /v1/jobs/{name}`: stops the job; its machines release its tasks. 404 when unknown.
pub(super) async fn stop(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let job = job_name(&uri)?;
    let params = Params::parse(&uri, &["after", "wait"])?;
    await_session(&shared, params.session(shared.options.max_wait)?).await?;
    let token = shared
        .handle
        .stop_job(&job)
        .await?
        .ok_or_else(|| no_job(&job))?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "job": job, "stopped": true, "token": token.to_string() }),
    ))
}

/// `GET /v1/nodes`: every machine that offers itself, whether it is live, and what it holds.
pub(super) async fn nodes(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let state = scheduling(&shared, &uri, &[]).await?;
    let nodes = serde_json::to_value(state.nodes()).map_err(internal)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "nodes": nodes, "token": state.token.to_string() }),
    ))
}

/// `GET /v1/allocations[?node=M][&job=J]`: the winning allocation of every task a live machine
/// holds, in task order.
pub(super) async fn allocations(
    State(shared): State<AppState>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let params = Params::parse(&uri, &["node", "job", "after", "wait"])?;
    let node = match params.text("node")? {
        Some(text) => Some(
            MemberName::new(text)
                .map_err(|err| ApiError::bad_request("invalid_argument", format!("node: {err}")))?,
        ),
        None => None,
    };
    let job = match params.text("job")? {
        Some(text) => Some(
            Name::new(text)
                .map_err(|err| ApiError::bad_request("invalid_argument", format!("job: {err}")))?,
        ),
        None => None,
    };
    let state = scheduling(&shared, &uri, &["node", "job"]).await?;
    let allocations: Vec<_> = state
        .allocations()
        .into_iter()
        .filter(|a| node.as_ref().is_none_or(|node| a.node == *node))
        .filter(|a| job.as_ref().is_none_or(|job| a.task.job == *job))
        .collect();
    let allocations = serde_json::to_value(allocations).map_err(internal)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "allocations": allocations, "token": state.token.to_string() }),
    ))
}

/// The scheduling state, once this node covers the request's `after=` token, if any.
async fn scheduling(
    shared: &Shared,
    uri: &Uri,
    other_params: &[&str],
) -> Result<SchedulingView, ApiError> {
    let mut allowed = vec!["after", "wait"];
    allowed.extend_from_slice(other_params);
    let params = Params::parse(uri, &allowed)?;
    await_session(shared, params.session(shared.options.max_wait)?).await?;
    Ok(shared.handle.scheduling().await?)
}

fn job_name(uri: &Uri) -> Result<Name, ApiError> {
    let text = uri.path().strip_prefix(JOBS).unwrap_or_default();
    let text = String::from_utf8(percent_decode(text.as_bytes(), false)?)
        .map_err(|_| ApiError::bad_request("invalid_argument", "the job name is not UTF-8"))?;
    Name::new(text)
        .map_err(|err| ApiError::bad_request("invalid_argument", format!("job name: {err}")))
}

fn no_job(job: &Name) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no job {job}"))
}

fn internal(error: serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("could not encode the answer: {error}"),
    )
}
