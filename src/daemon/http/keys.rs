//! The keyspace routes: registers under `/v1/kv`, and `/v1/counter`, `/v1/set`, `/v1/doc`.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::{Value as Json, json};

use crate::crdt::{Key, Kind, Token, Value};
use crate::daemon::http::encode::{self, json_response};
use crate::daemon::http::error::ApiError;
use crate::daemon::http::metrics::{ReadKind, WriteKind};
use crate::daemon::http::request::{self, Params, await_session, key_from_path, read_body};
use crate::daemon::http::{AppState, Shared};
use crate::runtime::Handle;

/// Items a list returns when the request does not say.
const DEFAULT_LIST_LIMIT: usize = 1000;
/// The most items one list returns, whatever the request says.
const MAX_LIST_LIMIT: usize = 10_000;
/// The header carrying the read's token on a `raw=true` read, whose body is the value alone.
pub(super) const TOKEN_HEADER: HeaderName = HeaderName::from_static("mantissa-token");

const KV: &str = "/v1/kv/";
const COUNTER: &str = "/v1/counter/";
const SET: &str = "/v1/set/";
const DOCUMENT: &str = "/v1/doc/";

/// `PUT /v1/kv/{key}`: the body is the value.
pub(super) async fn put(
    State(shared): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let write = KeyWrite::new(&shared, &uri, KV)?;
    let value = write.body(&headers, body).await?;
    write
        .commit(WriteKind::Put, async |handle, key| {
            Ok(Some(handle.put(key, value.to_vec()).await?))
        })
        .await
}

/// `GET /v1/kv/{key}`: the value of any type, or with `raw=true` a register's bytes alone.
pub(super) async fn get(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let (key, params) = target(&uri, KV, &["raw", "after", "wait"])?;
    let raw = params.flag("raw")?;
    let (value, token) = read(&shared, &key, &params).await?;
    if !raw {
        return Ok(json_response(
            StatusCode::OK,
            &encode::read(&key, &value, &token),
        ));
    }
    let Value::Register(register) = value else {
        return Err(wrong_type(&key, Kind::Register, value.kind()));
    };
    // The response body holds the stored value itself: no copy of a large value.
    let mut response = axum::body::Bytes::from_owner(register.value).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(token) = HeaderValue::from_str(&token.to_string()) {
        headers.insert(TOKEN_HEADER, token);
    }
    Ok(response)
}

/// `DELETE /v1/kv/{key}`, for a key of any type: 404 when it holds nothing.
pub(super) async fn delete(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let write = KeyWrite::new(&shared, &uri, KV)?;
    write
        .commit(WriteKind::Delete, async |handle, key| {
            let token = handle.delete(key).await?;
            Ok(Some(token.ok_or_else(|| ApiError::no_value(key))?))
        })
        .await
}

/// `GET /v1/kv?prefix=&limit=&start_after=`: keys under a prefix, in key order.
pub(super) async fn list(State(shared): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let params = Params::parse(&uri, &["prefix", "limit", "start_after", "after", "wait"])?;
    let prefix = params.raw("prefix").unwrap_or_default().to_vec();
    let limit = match params.number::<usize>("limit")? {
        None => DEFAULT_LIST_LIMIT,
        Some(0) => {
            return Err(ApiError::bad_request(
                "bad_request",
                "limit must be at least 1",
            ));
        }
        Some(limit) => limit.min(MAX_LIST_LIMIT),
    };
    let start_after = params.raw("start_after").map(Key::new).transpose()?;
    await_session(&shared, params.session(shared.options.max_wait)?).await?;
    // One more than asked tells whether there is more, without a second read.
    let (mut items, token) = shared
        .handle
        .list_after(&prefix, start_after, limit + 1)
        .await?;
    let more = items.len() > limit;
    items.truncate(limit);
    shared.metrics.read(ReadKind::List);
    let items: Vec<Json> = items
        .iter()
        .map(|(key, value)| encode::item(key, value))
        .collect();
    let body = json!({ "items": items, "token": token.to_string(), "more": more });
    Ok(json_response(StatusCode::OK, &body))
}

/// The 400 for `/v1/kv/` and the like: a key must not be empty.
pub(super) async fn empty_key() -> ApiError {
    ApiError::from(crate::crdt::Error::EmptyKey)
}

/// `POST /v1/counter/{key}` with `{"add": N}`.
pub(super) async fn add_to_counter(
    State(shared): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CounterAdd {
        add: i64,
    }
    let write = KeyWrite::new(&shared, &uri, COUNTER)?;
    let CounterAdd { add } = request::parse_json(&write.body(&headers, body).await?)?;
    write
        .commit(WriteKind::CounterAdd, async |handle, key| {
            Ok(Some(handle.counter_add(key, add).await?))
        })
        .await
}

/// `POST /v1/set/{key}` with `{"add": [...]}` or `{"remove": [...]}` (and optionally
/// `"encoding": "base64"`). Removing only absent elements answers `"token": null`.
pub(super) async fn change_set(
    State(shared): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SetChange {
        add: Option<Vec<String>>,
        remove: Option<Vec<String>>,
        encoding: Option<String>,
    }
    let write = KeyWrite::new(&shared, &uri, SET)?;
    let change: SetChange = request::parse_json(&write.body(&headers, body).await?)?;
    let base64 = match change.encoding.as_deref() {
        None | Some("utf-8") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_json",
                format!("encoding must be \"base64\" or absent, not {other:?}"),
            ));
        }
    };
    let decode = |elements: Vec<String>| -> Result<Vec<Vec<u8>>, ApiError> {
        elements
            .into_iter()
            .map(|element| {
                if !base64 {
                    return Ok(element.into_bytes());
                }
                BASE64.decode(&element).map_err(|error| {
                    ApiError::bad_request(
                        "invalid_json",
                        format!("set element {element:?} is not base64: {error}"),
                    )
                })
            })
            .collect()
    };
    match (change.add, change.remove) {
        (Some(add), None) => {
            let elements = decode(add)?;
            write
                .commit(WriteKind::SetAdd, async |handle, key| {
                    Ok(Some(handle.set_add(key, elements).await?))
                })
                .await
        }
        // Removing only absent elements writes nothing: `"token": null`, and no write counted.
        (None, Some(remove)) => {
            let elements = decode(remove)?;
            write
                .commit(WriteKind::SetRemove, async |handle, key| {
                    Ok(handle.set_remove(key, elements).await?)
                })
                .await
        }
        _ => Err(ApiError::bad_request(
            "invalid_json",
            "the body must have exactly one of \"add\" and \"remove\"",
        )),
    }
}

/// `PATCH /v1/doc/{key}` with an RFC 7396 JSON merge patch.
pub(super) async fn patch_document(
    State(shared): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let write = KeyWrite::new(&shared, &uri, DOCUMENT)?;
    request::expect_content_type(
        &headers,
        &["application/merge-patch+json", "application/json"],
    )?;
    let patch: Json = request::parse_json(&write.body(&headers, body).await?)?;
    write
        .commit(WriteKind::DocumentPatch, async |handle, key| {
            Ok(Some(handle.document_patch(key, patch).await?))
        })
        .await
}

/// `GET /v1/counter/{key}`.
pub(super) async fn get_counter(
    State(shared): State<AppState>,
    uri: Uri,
) -> Result<Response, ApiError> {
    typed_get(&shared, &uri, COUNTER, Kind::Counter).await
}

/// `GET /v1/set/{key}`.
pub(super) async fn get_set(
    State(shared): State<AppState>,
    uri: Uri,
) -> Result<Response, ApiError> {
    typed_get(&shared, &uri, SET, Kind::Set).await
}

/// `GET /v1/doc/{key}`.
pub(super) async fn get_document(
    State(shared): State<AppState>,
    uri: Uri,
) -> Result<Response, ApiError> {
    typed_get(&shared, &uri, DOCUMENT, Kind::Document).await
}

/// A read through a typed route: 409 when the key holds another type.
async fn typed_get(
    shared: &Shared,
    uri: &Uri,
    route: &str,
    expected: Kind,
) -> Result<Response, ApiError> {
    let (key, params) = target(uri, route, &["after", "wait"])?;
    let (value, token) = read(shared, &key, &params).await?;
    if value.kind() != expected {
        return Err(wrong_type(&key, expected, value.kind()));
    }
    Ok(json_response(
        StatusCode::OK,
        &encode::read(&key, &value, &token),
    ))
}

/// A write to the key a route names, in the steps every write takes, in this order: the key and
/// the query (`after`, `wait`), then the body, then the wait for the session, the write, the
/// count in the metrics and the answer `{"key", "token"}`. The order decides which error a
/// request with several faults gets, so every write route keeps it.
struct KeyWrite<'a> {
    shared: &'a Shared,
    key: Key,
    params: Params,
}

impl<'a> KeyWrite<'a> {
    /// Reads the key in the path after `route` and the query.
    fn new(shared: &'a Shared, uri: &Uri, route: &str) -> Result<Self, ApiError> {
        let (key, params) = target(uri, route, &["after", "wait"])?;
        Ok(KeyWrite {
            shared,
            key,
            params,
        })
    }

    /// The request body, within the server's limit.
    async fn body(&self, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
        read_body(headers, body, self.shared.options.max_body_bytes).await
    }

    /// Waits for the session, then writes: `write` answers the write's token, or `None` when it
    /// wrote nothing (which is then not counted).
    async fn commit(
        self,
        kind: WriteKind,
        write: impl AsyncFnOnce(&Handle, &Key) -> Result<Option<Token>, ApiError>,
    ) -> Result<Response, ApiError> {
        let session = self.params.session(self.shared.options.max_wait)?;
        await_session(self.shared, session).await?;
        let token = write(&self.shared.handle, &self.key).await?;
        if token.is_some() {
            self.shared.metrics.wrote(kind);
        }
        Ok(json_response(
            StatusCode::OK,
            &encode::written(&self.key, token.as_ref()),
        ))
    }
}

/// The key a request names and its query parameters.
fn target(uri: &Uri, route: &str, allowed: &[&str]) -> Result<(Key, Params), ApiError> {
    let key = key_from_path(uri, route)?;
    let params = Params::parse(uri, allowed)?;
    Ok((key, params))
}

/// Waits for the session, then reads `key`: 404 when it holds nothing.
async fn read(shared: &Shared, key: &Key, params: &Params) -> Result<(Value, Token), ApiError> {
    let session = params.session(shared.options.max_wait)?;
    await_session(shared, session).await?;
    let (value, token) = shared.handle.read_key(key).await?;
    shared.metrics.read(ReadKind::Get);
    let value = value.ok_or_else(|| ApiError::no_value(key))?;
    Ok((value, token))
}

/// The 409 for a key that holds another type than the route reads or writes.
fn wrong_type(key: &Key, expected: Kind, found: Kind) -> ApiError {
    ApiError::from(crate::crdt::Error::WrongType {
        key: key.to_string(),
        expected,
        found,
    })
}
