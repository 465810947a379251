//! Guest stdout and stderr: captured per call into a capped buffer, never inherited.
//!
//! Writes past the cap are accepted and dropped (and counted), not refused: a Rust guest panics
//! when a write to stdout fails, so refusing would turn chatty output into a failed message.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Default)]
struct Buffers {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    dropped: usize,
}

/// The captured output of one call, shared by its stdout and stderr streams.
#[derive(Clone)]
pub(crate) struct Capture {
    buffers: Arc<Mutex<Buffers>>,
    cap: usize,
}

/// What a call wrote.
pub(crate) struct Captured {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Bytes dropped over the cap.
    pub dropped: usize,
}

impl Capture {
    /// A capture keeping at most `cap` bytes of stdout and stderr together.
    pub fn new(cap: usize) -> Capture {
        Capture {
            buffers: Arc::default(),
            cap,
        }
    }

    pub fn stdout(&self) -> Pipe {
        Pipe {
            capture: self.clone(),
            stderr: false,
        }
    }

    pub fn stderr(&self) -> Pipe {
        Pipe {
            capture: self.clone(),
            stderr: true,
        }
    }

    /// Takes what was written so far.
    pub fn take(&self) -> Captured {
        let mut b = self.lock();
        Captured {
            stdout: std::mem::take(&mut b.stdout),
            stderr: std::mem::take(&mut b.stderr),
            dropped: std::mem::take(&mut b.dropped),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buffers> {
        // Buffers are plain bytes; a poisoned lock still holds usable data.
        self.buffers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, stderr: bool, bytes: &[u8]) {
        let mut b = self.lock();
        let used = b.stdout.len() + b.stderr.len();
        let room = self.cap.saturating_sub(used);
        let kept = bytes.len().min(room);
        let target = if stderr { &mut b.stderr } else { &mut b.stdout };
        target.extend_from_slice(&bytes[..kept]);
        b.dropped += bytes.len() - kept;
    }
}

/// One of the two output streams of a [`Capture`].
#[derive(Clone)]
pub(crate) struct Pipe {
    capture: Capture,
    stderr: bool,
}

impl IsTerminal for Pipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Pipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Pipe {
    async fn ready(&mut self) {}
}

impl OutputStream for Pipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.capture.write(self.stderr, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.capture.write(self.stderr, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_cap_and_counts_the_rest() {
        let capture = Capture::new(10);
        let mut out = capture.stdout();
        let mut err = capture.stderr();
        OutputStream::write(&mut out, Bytes::from_static(b"123456")).unwrap();
        OutputStream::write(&mut err, Bytes::from_static(b"abcdef")).unwrap();
        let captured = capture.take();
        assert_eq!(captured.stdout, b"123456");
        assert_eq!(captured.stderr, b"abcd");
        assert_eq!(captured.dropped, 2);
    }
}
