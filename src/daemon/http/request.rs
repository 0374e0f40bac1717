//! Reading requests: query parameters, keys in paths, bodies, durations and session tokens.
//!
//! Everything is parsed here by hand rather than with axum's extractors, whose rejections are
//! plain text: every refusal below is an [`ApiError`] with a JSON body.

use std::str::FromStr;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use crate::crdt::{Key, Token};
use crate::daemon::http::Shared;
use crate::daemon::http::error::ApiError;
use crate::runtime::HandleError;

/// How long a read with `after=` waits when it does not say (`wait=`).
pub(super) const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// A request's query parameters, percent-decoded, each named at most once.
#[derive(Debug, Default)]
pub(super) struct Params {
    pairs: Vec<(String, Vec<u8>)>,
}

impl Params {
    /// Parses the query of `uri`, refusing parameters not in `allowed` (a typo such as `after`
    /// for `start_after` would otherwise be silently ignored).
    pub(super) fn parse(uri: &Uri, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut params = Params::default();
        for pair in uri.query().unwrap_or("").split('&') {
            if pair.is_empty() {
                continue;
            }
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = String::from_utf8(percent_decode(name.as_bytes(), true)?).map_err(|_| {
                ApiError::bad_request("bad_request", "a parameter name is not UTF-8")
            })?;
            if !allowed.contains(&name.as_str()) {
                let expected = if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                };
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!("unknown query parameter {name:?}; this route takes: {expected}"),
                ));
            }
            if params.raw(&name).is_some() {
                return Err(ApiError::bad_request(
                    "bad_request",
                    format!("query parameter {name:?} is given more than once"),
                ));
            }
            let value = percent_decode(value.as_bytes(), true)?;
            params.pairs.push((name, value));
        }
        Ok(params)
    }

    /// The raw bytes of a parameter.
    pub(super) fn raw(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(candidate, _)| candidate == name)
            .map(|(_, value)| value.as_slice())
    }

    /// A parameter as text.
    pub(super) fn text(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.raw(name)
            .map(|value| {
                std::str::from_utf8(value).map_err(|_| {
                    ApiError::bad_request("bad_request", format!("parameter {name:?} is not UTF-8"))
                })
            })
            .transpose()
    }

    /// A parameter parsed as a number (or anything else with `FromStr`).
    pub(super) fn number<T: FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.text(name)?
            .map(|text| {
                text.parse().map_err(|_| {
                    ApiError::bad_request(
                        "bad_request",
                        format!("parameter {name:?} must be a non-negative integer, not {text:?}"),
                    )
                })
            })
            .transpose()
    }

    /// A boolean parameter: `true`/`1`, or present without a value, is true.
    pub(super) fn flag(&self, name: &str) -> Result<bool, ApiError> {
        match self.text(name)? {
            None | Some("false" | "0") => Ok(false),
            Some("" | "true" | "1") => Ok(true),
            Some(other) => Err(ApiError::bad_request(
                "bad_request",
                format!("parameter {name:?} must be true or false, not {other:?}"),
            )),
        }
    }

    /// The session consistency parameters: `after=TOKEN` and `wait=DURATION` (at most
    /// `max_wait`). `None` when there is no `after`; a lone `wait` has nothing to wait for.
    pub(super) fn session(&self, max_wait: Duration) -> Result<Option<Session>, ApiError> {
        let wait = self
            .text("wait")?
            .map(parse_duration)
            .transpose()?
            .unwrap_or(DEFAULT_WAIT)
            .min(max_wait);
        let Some(text) = self.text("after")? else {
            return Ok(None);
        };
        let token = Token::from_str(text).map_err(|error| {
            ApiError::bad_request("invalid_token", format!("parameter \"after\": {error}"))
        })?;
        Ok(Some(Session { token, wait }))
    }
}

/// What a request must have seen before it is served: the writes a token names.
#[derive(Debug, Clone)]
pub(super) struct Session {
    pub(super) token: Token,
    pub(super) wait: Duration,
}

/// Waits until the node covers the session's token: 504 if the wait runs out, 503 if the
/// server starts shutting down first.
pub(super) async fn await_session(
    shared: &Shared,
    session: Option<Session>,
) -> Result<(), ApiError> {
    let Some(Session { token, wait }) = session else {
        return Ok(());
    };
    shared.metrics.session_waited();
    let mut closing = shared.closing.subscribe();
    let result = tokio::select! {
        result = shared.handle.wait_for(&token, wait) => result,
        _ = closing.wait_for(|closing| *closing) => return Err(ApiError::shutting_down()),
    };
    match result {
        Ok(()) => Ok(()),
        Err(HandleError::Timeout(_)) => {
            shared.metrics.session_timed_out();
            Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "this node has not applied every write the token names after waiting {wait:?}; \
                     retry, wait longer (wait=), or read at the node that issued the token"
                ),
            ))
        }
        Err(error) => Err(error.into()),
    }
}

/// The key in the path of `uri` after `route` (such as `/v1/kv/`), percent-decoded to bytes,
/// so keys may hold `/` and any byte.
pub(super) fn key_from_path(uri: &Uri, route: &str) -> Result<Key, ApiError> {
    let encoded = uri.path().strip_prefix(route).unwrap_or("");
    let bytes = percent_decode(encoded.as_bytes(), false)?;
    Ok(Key::new(bytes)?)
}

/// Reads a request body of at most `limit` bytes: 413 beyond it.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::body_too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::body_too_large(limit))
        }
        Err(error) => Err(ApiError::bad_request(
            "bad_request",
            format!("could not read the request body: {error}"),
        )),
    }
}

/// Parses a JSON body into `T`.
pub(super) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid: {error}"),
        )
    })
}

/// Refuses a body whose declared content type is not one of `accepted` (none declared is fine).
pub(super) fn expect_content_type(headers: &HeaderMap, accepted: &[&str]) -> Result<(), ApiError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if accepted.contains(&essence.as_str()) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "content type {:?} is not accepted here; use {}",
            value.to_str().unwrap_or("(not text)"),
            accepted.join(" or ")
        ),
    ))
}

/// Parses a duration such as `500ms`, `5s`, `1.5s`, `1m` or `1h`; a bare number is seconds.
pub(super) fn parse_duration(text: &str) -> Result<Duration, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_duration",
            format!("{text:?} is not a duration; write a number and a unit: 500ms, 5s, 1m, 1h"),
        )
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if !number.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(invalid());
    }
    let number: f64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(invalid()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

/// Decodes `%XX` escapes (and, in a query, `+` as a space); a `%` not followed by two hex
/// digits is refused rather than guessed at.
pub(super) fn percent_decode(input: &[u8], plus_is_space: bool) -> Result<Vec<u8>, ApiError> {
    let mut output = Vec::with_capacity(input.len());
    let mut rest = input;
    while let Some((&byte, tail)) = rest.split_first() {
        match byte {
            b'%' => {
                let digits = tail
                    .get(..2)
                    .and_then(|pair| std::str::from_utf8(pair).ok())
                    .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "bad_request",
                            "malformed percent-encoding: '%' must be followed by two hex digits",
                        )
                    })?;
                output.push(digits);
                rest = &tail[2..];
                continue;
            }
            b'+' if plus_is_space => output.push(b' '),
            other => output.push(other),
        }
        rest = tail;
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str, allowed: &[&str]) -> Result<Params, ApiError> {
        let uri: Uri = format!("/x?{query}").parse().expect("valid uri");
        Params::parse(&uri, allowed)
    }

    #[test]
    fn durations_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_secs(5));
        for bad in ["", "s", "5x", "-1s", ".5s", "1..2s", "5 s", "1e9999999s"] {
            let error = parse_duration(bad).expect_err(bad);
            assert_eq!(error.code, "invalid_duration", "{bad}");
        }
    }

    #[test]
    fn query_values_are_percent_decoded_to_bytes() {
        let params = params("prefix=a%2Fb+c%FF&limit=3", &["prefix", "limit"]).unwrap();
        assert_eq!(params.raw("prefix"), Some(&b"a/b c\xff"[..]));
        assert_eq!(params.number::<usize>("limit").unwrap(), Some(3));
    }

    #[test]
    fn unknown_repeated_or_malformed_parameters_are_refused() {
        assert!(params("after=1", &["start_after"]).is_err());
        assert!(params("limit=1&limit=2", &["limit"]).is_err());
        assert!(params("prefix=%zz", &["prefix"]).is_err());
        assert!(params("prefix=%4", &["prefix"]).is_err());
        let limit = params("limit=-1", &["limit"]).unwrap();
        assert!(limit.number::<usize>("limit").is_err());
    }

    #[test]
    fn flags_accept_true_false_and_bare_names() {
        assert!(params("raw", &["raw"]).unwrap().flag("raw").unwrap());
        assert!(params("raw=1", &["raw"]).unwrap().flag("raw").unwrap());
        assert!(!params("raw=false", &["raw"]).unwrap().flag("raw").unwrap());
        assert!(!params("", &["raw"]).unwrap().flag("raw").unwrap());
        assert!(params("raw=yes", &["raw"]).unwrap().flag("raw").is_err());
    }

    #[test]
    fn session_waits_default_to_five_seconds_and_are_capped() {
        let token = Token::default().to_string();
        let max = Duration::from_secs(60);
        let default = params(&format!("after={token}"), &["after", "wait"]).unwrap();
        assert_eq!(default.session(max).unwrap().unwrap().wait, DEFAULT_WAIT);
        let long = params(&format!("after={token}&wait=1h"), &["after", "wait"]).unwrap();
        assert_eq!(long.session(max).unwrap().unwrap().wait, max);
        let none = params("wait=1s", &["after", "wait"]).unwrap();
        assert!(none.session(max).unwrap().is_none());
        let bad = params("after=zz", &["after", "wait"]).unwrap();
        assert_eq!(bad.session(max).unwrap_err().code, "invalid_token");
    }

    #[test]
    fn keys_in_paths_are_percent_decoded_and_validated() {
        let uri: Uri = "/v1/kv/jobs%2Fweb/1%20a+b".parse().unwrap();
        let key = key_from_path(&uri, "/v1/kv/").unwrap();
        assert_eq!(key.as_bytes(), b"jobs/web/1 a+b");
        let empty: Uri = "/v1/kv/".parse().unwrap();
        assert_eq!(
            key_from_path(&empty, "/v1/kv/").unwrap_err().code,
            "invalid_key"
        );
    }
}
