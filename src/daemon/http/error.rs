//! The API's errors: every failure is a JSON body `{"error":{"code","message"}}` with a status
//! that says whose fault it was.

use axum::http::StatusCode;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::crdt::{self, DocumentError};
use crate::runtime::{HandleError, WatchError};
use crate::sched::SchedError;

/// A request that failed: the status, a stable machine-readable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
}

/// The code and message of an error response, left in the response's extensions so the request
/// log can say why a request failed without parsing the body again.
#[derive(Debug, Clone)]
pub(super) struct ErrorNote {
    pub(super) code: &'static str,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// A 400 Bad Request.
    pub(super) fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// The 404 for a key that holds no value.
    pub(super) fn no_value(key: &crdt::Key) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("key {key:?} holds no value"),
        )
    }

    /// The 413 for a request body over the limit.
    pub(super) fn body_too_large(limit: usize) -> Self {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    }

    /// The 503 for a request cut short because the server is shutting down.
    pub(super) fn shutting_down() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
    }

    /// The error standing in for a body-less error response that did not come from a handler
    /// (the router's own 405, for instance), so every error a client sees is JSON.
    pub(super) fn from_status(status: StatusCode) -> Self {
        let (code, message) = match status {
            StatusCode::NOT_FOUND => ("no_route", "no such route"),
            StatusCode::METHOD_NOT_ALLOWED => (
                "method_not_allowed",
                "this route does not support the request's method",
            ),
            StatusCode::PAYLOAD_TOO_LARGE => ("body_too_large", "the request body is too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                ("unsupported_media_type", "unsupported content type")
            }
            status if status.is_client_error() => ("bad_request", "the request was refused"),
            _ => ("internal", "the server failed to answer"),
        };
        ApiError::new(status, code, message)
    }

    /// The JSON body.
    pub(super) fn body(&self) -> serde_json::Value {
        error_body(self.code, &self.message)
    }
}

/// The JSON of an error: in a response body, or as the last line of a watch stream.
pub(super) fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({ "error": { "code": code, "message": message } })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut text = self.body().to_string();
        text.push('\n');
        let mut response = (self.status, text).into_response();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.remove(CONTENT_LENGTH);
        response.extensions_mut().insert(ErrorNote {
            code: self.code,
            message: self.message,
        });
        response
    }
}

impl From<HandleError> for ApiError {
    fn from(error: HandleError) -> Self {
        let message = error.to_string();
        match error {
            HandleError::Crdt(error) => ApiError::from(error),
            HandleError::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopped", message)
            }
            HandleError::Timeout(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
            }
            // The write is in memory and may spread; the disk is the server's problem, and a
            // retry may succeed once it is fixed.
            HandleError::Storage(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage", message)
            }
            HandleError::Reserved { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "reserved_key", message)
            }
            HandleError::Sched(error) => ApiError::from(error),
        }
    }
}

impl From<crdt::Error> for ApiError {
    fn from(error: crdt::Error) -> Self {
        use crdt::Error;
        let message = error.to_string();
        let (status, code) = match &error {
            Error::EmptyKey | Error::KeyTooLong { .. } => (StatusCode::BAD_REQUEST, "invalid_key"),
            Error::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "value_too_large"),
            Error::WrongType { .. } => (StatusCode::CONFLICT, "wrong_type"),
            Error::CounterOverflow { .. } => (StatusCode::CONFLICT, "counter_overflow"),
            Error::NothingToWrite => (StatusCode::BAD_REQUEST, "nothing_to_write"),
            Error::BufferFull { .. } => (StatusCode::SERVICE_UNAVAILABLE, "buffer_full"),
            Error::Compacted { .. } => (StatusCode::GONE, "compacted"),
            Error::Document(document) => match document {
                DocumentError::NotAnObject
                | DocumentError::TooDeep { .. }
                | DocumentError::BadNumber(_) => (StatusCode::BAD_REQUEST, "invalid_document"),
                // Stored bytes that do not load: no request could have caused or fix that.
                DocumentError::Corrupt(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            // Requests carry no encoded deltas or snapshots (tokens are parsed before they reach
            // the node), so these can only come from the node's own state.
            Error::Decode { .. } | Error::Invalid { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        ApiError::new(status, code, message)
    }
}

impl From<SchedError> for ApiError {
    fn from(error: SchedError) -> Self {
        let message = error.to_string();
        match error {
            SchedError::Store(error) => ApiError::from(error),
            SchedError::NotOwner { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "not_owner", message)
            }
            SchedError::QuotaExists(_) => ApiError::new(StatusCode::CONFLICT, "exists", message),
            SchedError::InsufficientRights { .. } => {
                ApiError::new(StatusCode::CONFLICT, "insufficient_rights", message)
            }
            // Invalid names, jobs and quotas; and variants added later, which describe a
            // refused request too.
            _ => ApiError::bad_request("invalid_spec", message),
        }
    }
}

impl From<WatchError> for ApiError {
    fn from(error: WatchError) -> Self {
        let message = error.to_string();
        match error {
            WatchError::Compacted { .. } => ApiError::new(StatusCode::GONE, "compacted", message),
            WatchError::Lagged(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "lagged", message)
            }
        }
    }
}
