//! `GET /v1/watch`: change events as a stream of NDJSON lines, resumable by cursor.
//!
//! A task per stream forwards the node's [`Watch`] into the response body, one line per event,
//! with a heartbeat line when idle. Every line that names a cursor names one a client may resume
//! from without losing or repeating an event: the cursor of the last event sent, or, before any,
//! the cursor the stream started after.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::{Value as Json, json};
use tokio::sync::{Semaphore, mpsc};

use crate::crdt::Event;
use crate::daemon::http::error::{ApiError, error_body};
use crate::daemon::http::metrics::ReadKind;
use crate::daemon::http::request::Params;
use crate::daemon::http::{AppState, Shared, encode};
use crate::runtime::{Watch, WatchError};

/// Lines buffered between the forwarding task and the connection, at most.
const LINE_QUEUE: usize = 64;
/// Bytes of lines buffered between the forwarding task and the connection, at most (one line
/// larger than this still goes, alone): a reader that stops reading holds this much here, the
/// rest waits in the node's bounded watcher queue.
const LINE_BYTES: usize = 256 * 1024;

/// What the node's watch had ready the moment it was opened.
type Ready = Option<Option<Result<Event, WatchError>>>;

/// `GET /v1/watch?prefix=&from=`.
pub(super) async fn watch(
    State(shared): State<AppState>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let params = Params::parse(&uri, &["prefix", "from"])?;
    let prefix = params.raw("prefix").unwrap_or_default().to_vec();
    let from = params.number::<u64>("from")?;
    let current = shared.handle.status().await?.cursor;
    if let Some(from) = from
        && from > current
    {
        return Err(ApiError::bad_request(
            "invalid_cursor",
            format!(
                "cursor {from} is ahead of this node's change feed (at {current}); cursors are \
                 local to the node that issued them"
            ),
        ));
    }
    // Without `from`, watching from the current cursor (rather than from "now") gives the stream
    // a known starting point to report and resume from.
    let start = from.unwrap_or(current);
    let mut watch = shared.handle.watch(&prefix, Some(start)).await?;
    let first = match ready(&mut watch).await {
        Some(Some(Err(error @ WatchError::Compacted { .. }))) => {
            if from.is_some() {
                return Err(error.into());
            }
            // More changes than the feed keeps landed between the two calls: watch from now.
            // Resuming from `start` then repeats nothing the client saw and loses nothing.
            watch = shared.handle.watch(&prefix, None).await?;
            None
        }
        other => other,
    };
    shared.metrics.read(ReadKind::Watch);
    let (lines, receiver) = mpsc::channel(LINE_QUEUE);
    let room = Arc::new(Semaphore::new(LINE_BYTES));
    let pump = Pump {
        shared: shared.clone(),
        lines,
        room: room.clone(),
        last: start,
    };
    tokio::spawn(pump.run(watch, first));
    let body = Lines {
        lines: receiver,
        room,
    };
    let mut response = (StatusCode::OK, Body::from_stream(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// The item the watch holds already, without waiting: `None` when it holds nothing yet.
async fn ready(watch: &mut Watch) -> Ready {
    tokio::select! {
        biased;
        item = watch.next() => Some(item),
        () = std::future::ready(()) => None,
    }
}

/// Forwards one watch into one response body.
struct Pump {
    shared: Arc<Shared>,
    lines: mpsc::Sender<Bytes>,
    /// Bytes of lines the connection has not taken yet may add up to [`LINE_BYTES`]: a permit
    /// per byte, given back as the body takes each line.
    room: Arc<Semaphore>,
    /// The cursor a client may resume from after the lines sent so far.
    last: u64,
}

/// What woke the pump.
enum Next {
    Closing,
    Item(Option<Result<Event, WatchError>>),
    Heartbeat,
    Gone,
}

/// Whether the stream goes on after a line.
enum Flow {
    Continue,
    End,
}

impl Pump {
    async fn run(mut self, mut watch: Watch, first: Ready) {
        let shared = self.shared.clone();
        let _open = shared.metrics.watch_opened();
        if let Flow::End = self.send(&self.heartbeat()).await {
            return;
        }
        if let Some(item) = first
            && let Flow::End = self.forward(item).await
        {
            return;
        }
        let mut closing = shared.closing.subscribe();
        let period = shared.heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                biased;
                // Mapped to a value first: the guard `wait_for` returns must not live across an
                // await, or the task would not be `Send`.
                _ = closing.wait_for(|closing| *closing) => Next::Closing,
                item = watch.next() => Next::Item(item),
                _ = heartbeat.tick() => Next::Heartbeat,
                () = self.lines.closed() => Next::Gone,
            };
            let flow = match next {
                Next::Closing => {
                    let message = format!(
                        "the server is shutting down; resume from cursor {} when it is back",
                        self.last
                    );
                    let _ = self.send(&error_body("shutting_down", &message)).await;
                    Flow::End
                }
                Next::Item(item) => self.forward(item).await,
                Next::Heartbeat => self.send(&self.heartbeat()).await,
                Next::Gone => Flow::End,
            };
            if let Flow::End = flow {
                return;
            }
        }
    }

    /// Sends the line for what the watch gave.
    async fn forward(&mut self, item: Option<Result<Event, WatchError>>) -> Flow {
        match item {
            Some(Ok(event)) => {
                let flow = self.send(&encode::event(&event)).await;
                self.last = event.cursor;
                flow
            }
            Some(Err(error)) => {
                let error = ApiError::from(error);
                let _ = self.send(&error.body()).await;
                Flow::End
            }
            None => {
                // The node also ends a watch this way when a backlog overflows the watch's queue
                // before it could say so; a node that still answers did not stop.
                let (code, message) = if self.shared.handle.status().await.is_ok() {
                    let message = format!(
                        "the watch fell too far behind and was cut off; resume from cursor {}",
                        self.last
                    );
                    ("lagged", message)
                } else {
                    let message = format!(
                        "the node has shut down; resume from cursor {} once it is back",
                        self.last
                    );
                    ("stopped", message)
                };
                let _ = self.send(&error_body(code, &message)).await;
                Flow::End
            }
        }
    }

    fn heartbeat(&self) -> Json {
        json!({ "heartbeat": self.last })
    }

    async fn send(&self, line: &Json) -> Flow {
        let mut text = line.to_string();
        text.push('\n');
        let Ok(permits) = self.room.acquire_many(line_permits(text.len())).await else {
            return Flow::End;
        };
        // Given back by the body once the connection takes the line.
        permits.forget();
        match self.lines.send(Bytes::from(text)).await {
            Ok(()) => Flow::Continue,
            // The client went away.
            Err(_) => Flow::End,
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        // The client went away: a pump waiting for room ends instead of waiting forever.
        self.room.close();
    }
}

/// The permits a line of `len` bytes takes: its length, or all of them for a line longer than
/// the whole buffer, which then goes alone.
fn line_permits(len: usize) -> u32 {
    u32::try_from(len.clamp(1, LINE_BYTES)).unwrap_or(u32::MAX)
}

/// The response body: the lines the pump sends, each its own chunk, so each reaches the client
/// as soon as it is written.
struct Lines {
    lines: mpsc::Receiver<Bytes>,
    room: Arc<Semaphore>,
}

impl futures_core::Stream for Lines {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let line = std::task::ready!(self.lines.poll_recv(cx));
        if let Some(line) = &line {
            self.room.add_permits(line_permits(line.len()) as usize);
        }
        Poll::Ready(line.map(Ok))
    }
}
