//! One handler call: a fresh store and instance, limits, and the typed outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::mailroom::handler::types::HandlerError;
use super::contract::Bound;
use super::module::HandlerModule;
use super::stdio::{Capture, Captured};
use super::GuestMessage;
use crate::capabilities::{CallContext, Outbound};
use crate::fence::Fence;

/// Whether each message gets a fresh instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// A fresh instance per message (the default): nothing leaks between messages.
    Fresh,
    /// For trusted, stateless handlers: each worker reuses a warm instance for up to
    /// `max_uses` messages; it is discarded after any trap, timeout or cancelled call.
    Reuse {
        /// Messages per instance.
        max_uses: u32,
    },
}

/// The limits every call of a handler runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory per instance, in bytes.
    pub memory: usize,
    /// Wall-clock time per call (enforced within one epoch tick).
    pub timeout: Duration,
    /// Bytes of stdout and stderr kept per call; the rest is dropped and counted.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: 64 << 20,
            timeout: Duration::from_secs(30),
            output_bytes: 64 << 10,
        }
    }
}

/// How a call ended. The consumer maps this to ack, nak with delay, or dead-letter and term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `handle` returned `ok`.
    Success,
    /// `handle` asked for another attempt.
    Retry {
        /// The handler's reason.
        reason: String,
        /// The delay it asked for, if any.
        delay: Option<Duration>,
    },
    /// `handle` rejected the message for good.
    Reject {
        /// The handler's reason.
        reason: String,
    },
    /// The call did not finish: a trap, a limit, or the instance could not be created.
    /// Retryable, like `Retry` without a delay.
    Failed(Failure),
}

/// Why a call did not finish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// A one-line explanation (for a panic, the panic message the guest printed).
    pub reason: String,
}

/// Kinds of [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The guest trapped (a Rust panic is a trap).
    Trap,
    /// The guest tried to grow its memory past the limit.
    OutOfMemory,
    /// The guest overflowed its stack.
    StackOverflow,
    /// The call ran past its time limit and was stopped.
    Timeout,
    /// No instance could be created (for example, every pool slot was in use).
    Instantiate,
}

impl FailureKind {
    /// A short name for logs and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Trap => "trap",
            FailureKind::OutOfMemory => "out-of-memory",
            FailureKind::StackOverflow => "stack-overflow",
            FailureKind::Timeout => "timeout",
            FailureKind::Instantiate => "instantiate",
        }
    }
}

/// The result of one call.
pub struct Invoked {
    /// How it ended.
    pub outcome: Outcome,
    /// Publishes the call staged: the consumer sends them only if it succeeded.
    pub publishes: Vec<Outbound>,
    /// How long the call took, instantiation included.
    pub elapsed: Duration,
}

impl std::fmt::Debug for Invoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invoked")
            .field("outcome", &self.outcome)
            .field("publishes", &self.publishes.len())
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

/// The data of one call's store.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    pub(crate) call: CallContext,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Refuses memory growth past the handler's limit and remembers that it did, so the failure
/// is reported as out-of-memory rather than as the abort it causes in the guest.
struct MemoryLimiter {
    limit: usize,
    denied: Option<usize>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.denied = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A warm instance kept by one worker between calls under [`Isolation::Reuse`].
pub struct Warm {
    store: Store<HostState>,
    handler: Bound,
    capture: Capture,
    uses: u32,
}

impl HandlerModule {
    /// Runs one message and reports how it ended: in a fresh instance, or under
    /// [`Isolation::Reuse`] in the worker's `warm` instance (created when absent).
    ///
    /// Never panics and never returns an error: every failure of the guest is an
    /// [`Outcome::Failed`]. A warm instance is kept only after a call that returned (ok or a
    /// handler error); after a trap, a timeout, or a call cancelled by dropping this future it
    /// is gone, because an interrupted instance can never be entered again. The guest's output
    /// is logged after the call.
    pub async fn invoke(
        &self,
        warm: &mut Option<Warm>,
        msg: GuestMessage<'_>,
        stream: Arc<str>,
    ) -> Invoked {
        self.invoke_fenced(warm, msg, stream, None).await
    }

    /// [`HandlerModule::invoke`], with the call's KV writes refused once `fence` stops
    /// holding.
    pub async fn invoke_fenced(
        &self,
        warm: &mut Option<Warm>,
        msg: GuestMessage<'_>,
        stream: Arc<str>,
        fence: Option<Arc<Fence>>,
    ) -> Invoked {
        let start = Instant::now();
        let call_state = CallContext::new(self.caps.clone(), stream, msg.sequence).fenced_by(fence);
        // Taken out for the call, so that a call dropped half-way drops the instance with it.
        let (mut store, capture, handler, uses) = match (self.isolation, warm.take()) {
            (Isolation::Reuse { .. }, Some(w)) => {
                let mut store = w.store;
                let data = store.data_mut();
                data.call = call_state;
                data.limiter.denied = None;
                (store, w.capture, Some(w.handler), w.uses)
            }
            _ => {
                let (store, capture) = self.new_store(call_state);
                (store, capture, None, 0)
            }
        };
        store.set_epoch_deadline(1);

        let call = async {
            let handler = match handler {
                Some(handler) => handler,
                None => self
                    .pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|err| (true, err))?,
            };
            let result = handler
                .call_handle(&mut store, msg)
                .await
                .map_err(|err| (false, err))?;
            Ok::<_, (bool, wasmtime::Error)>((handler, result))
        };
        let result = tokio::time::timeout(self.limits.timeout, call).await;
        let captured = capture.take();
        let (outcome, reusable) = match result {
            Ok(Ok((handler, result))) => (
                match result {
                    Ok(()) => Outcome::Success,
                    Err(HandlerError::Retry(info)) => Outcome::Retry {
                        reason: info.reason,
                        delay: info.delay_ms.map(Duration::from_millis),
                    },
                    Err(HandlerError::Reject(reason)) => Outcome::Reject { reason },
                },
                Some(handler),
            ),
            Ok(Err((instantiating, err))) => (
                Outcome::Failed(classify(
                    instantiating,
                    &err,
                    &store.data().limiter,
                    &captured,
                )),
                None,
            ),
            Err(_elapsed) => (
                Outcome::Failed(Failure {
                    kind: FailureKind::Timeout,
                    reason: format!("stopped after the time limit of {:?}", self.limits.timeout),
                }),
                None,
            ),
        };
        // A failure's reason says what happened on one line (a trap's carries the panic
        // message or the last stderr lines), and the worker logs it once: the raw stderr then
        // only at debug. A timeout's reason does not, so its stderr stays a warning.
        let said = matches!(&outcome, Outcome::Failed(f) if f.kind != FailureKind::Timeout);
        self.log_output(&captured, said);
        let publishes = store.data_mut().call.take_staged();
        if let (Isolation::Reuse { max_uses }, Some(handler)) = (self.isolation, reusable) {
            if uses + 1 < max_uses {
                *warm = Some(Warm {
                    store,
                    handler,
                    capture,
                    uses: uses + 1,
                });
            }
        }
        Invoked {
            outcome,
            publishes,
            elapsed: start.elapsed(),
        }
    }

    pub(super) fn new_store(&self, call: CallContext) -> (Store<HostState>, Capture) {
        let capture = Capture::new(self.limits.output_bytes);
        let wasi = WasiCtxBuilder::new()
            .stdout(capture.stdout())
            .stderr(capture.stderr())
            .build();
        let state = HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                limit: self.limits.memory,
                denied: None,
            },
            call,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        // Yield to the async executor at every epoch tick: a guest computing for a long time
        // then shares its thread with other tasks, and the timeout gets a chance to fire.
        store.epoch_deadline_async_yield_and_update(1);
        (store, capture)
    }

    /// Logs what the guest printed; with `said`, its stderr is in the failure's reason already.
    fn log_output(&self, captured: &Captured, said: bool) {
        if !captured.stdout.is_empty() {
            tracing::info!(
                target: "mailroom::guest",
                handler = %self.name,
                stream = "stdout",
                "{}",
                excerpt(&captured.stdout)
            );
        }
        if said && !captured.stderr.is_empty() {
            tracing::debug!(
                target: "mailroom::guest",
                handler = %self.name,
                stream = "stderr",
                "{}",
                excerpt(&captured.stderr)
            );
        } else if !captured.stderr.is_empty() {
            tracing::warn!(
                target: "mailroom::guest",
                handler = %self.name,
                stream = "stderr",
                "{}",
                excerpt(&captured.stderr)
            );
        }
        if captured.dropped > 0 {
            crate::telemetry::HandlerMetrics::incr(&self.caps.metrics.log_dropped);
            tracing::warn!(
                handler = %self.name,
                dropped_bytes = captured.dropped,
                "guest output over the {}-byte limit was dropped",
                self.limits.output_bytes
            );
        }
    }
}

fn classify(
    instantiating: bool,
    err: &wasmtime::Error,
    limiter: &MemoryLimiter,
    captured: &Captured,
) -> Failure {
    if let Some(desired) = limiter.denied {
        return Failure {
            kind: FailureKind::OutOfMemory,
            reason: format!(
                "memory limit of {} bytes exceeded (the guest asked for {desired})",
                limiter.limit
            ),
        };
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => Failure {
            kind: FailureKind::StackOverflow,
            reason: "stack overflow".to_owned(),
        },
        Some(trap) => {
            let said = panic_message(&captured.stderr).or_else(|| last_lines(&captured.stderr));
            Failure {
                kind: FailureKind::Trap,
                reason: match said {
                    Some(said) => format!("{trap}: {said}"),
                    None => trap.to_string(),
                },
            }
        }
        None if instantiating => Failure {
            kind: FailureKind::Instantiate,
            reason: with_stderr(format!("cannot instantiate: {err:#}"), captured),
        },
        None => Failure {
            kind: FailureKind::Trap,
            reason: with_stderr(format!("{err:#}"), captured),
        },
    }
}

fn with_stderr(reason: String, captured: &Captured) -> String {
    match last_lines(&captured.stderr) {
        Some(said) => format!("{reason}: {said}"),
        None => reason,
    }
}

/// The last lines a guest wrote to stderr before failing, on one line: a Python exception or
/// a JavaScript error is printed there by its runtime (the exception's type and message come
/// last), so the failure reason and the dead-letter record carry it. At most 5 lines and 480
/// bytes, cut at the front.
fn last_lines(stderr: &[u8]) -> Option<String> {
    const LINES: usize = 5;
    const MAX: usize = 480;
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let joined = lines[lines.len().saturating_sub(LINES)..].join(" | ");
    if joined.len() <= MAX {
        return Some(joined);
    }
    let mut start = joined.len() - MAX;
    while !joined.is_char_boundary(start) {
        start += 1;
    }
    Some(format!("…{}", &joined[start..]))
}

/// At most 4 KiB of captured output for one log record; the whole is still counted.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 4096;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]);
    let text = text.trim_end();
    if bytes.len() > MAX {
        format!("{text}… ({} more bytes)", bytes.len() - MAX)
    } else {
        text.to_owned()
    }
}

/// The panic message a Rust guest printed to stderr, on one line, without the backtrace hint.
fn panic_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.rfind("panicked at")?;
    let message: Vec<&str> = text[start..]
        .lines()
        .filter(|line| !line.starts_with("note: run with `RUST_BACKTRACE"))
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let message = message.join(" ");
    // What the guest printed before it panicked: a Python traceback or a JavaScript error,
    // printed by its runtime, which then panics with a generic message. It comes first.
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    Some(match last_lines(text[..line_start].as_bytes()) {
        Some(before) => format!("{before} | {message}"),
        None => message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_is_one_line_without_the_hint() {
        let stderr = b"\nthread '<unnamed>' panicked at src/lib.rs:80:20:\nflaky: trap requested\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("panicked at src/lib.rs:80:20: flaky: trap requested")
        );
        assert_eq!(panic_message(b"just output"), None);
        let python = b"Traceback (most recent call last):\n  File \"app.py\", line 9, in handle\nKeyError: 'id'\n\nthread '<unnamed>' panicked at runtime/src/lib.rs:1293:29:\nPython function threw an unexpected exception\n";
        assert_eq!(
            panic_message(python).as_deref(),
            Some("Traceback (most recent call last): | File \"app.py\", line 9, in handle | KeyError: 'id' | panicked at runtime/src/lib.rs:1293:29: Python function threw an unexpected exception")
        );
    }

    #[test]
    fn last_lines_keep_the_end_of_a_traceback() {
        let traceback = b"Traceback (most recent call last):\n  File \"app.py\", line 9, in handle\n    order = json.loads(msg.payload)\n  File \"json/__init__.py\", line 346, in loads\n\n    return _default_decoder.decode(s)\nValueError: boom\n";
        let said = last_lines(traceback).unwrap();
        assert!(said.ends_with("ValueError: boom"), "{said}");
        assert!(!said.contains("Traceback"), "only the last 5 lines: {said}");
        assert_eq!(last_lines(b"\n \n"), None);
        let long = "x".repeat(2000);
        let cut = last_lines(long.as_bytes()).unwrap();
        assert!(cut.starts_with('…') && cut.len() < 500, "{}", cut.len());
    }
}
