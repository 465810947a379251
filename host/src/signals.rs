//! Shutdown by signal: the first SIGTERM, SIGINT or SIGHUP starts a drain (stop pulling, hand
//! back what has not started, let running messages finish within `host.drain_timeout`); a
//! second one says how long the drain may still take; a third exits at once (what is still
//! running is redelivered after AckWait). The handlers are installed before anything else
//! happens, so a signal during start-up (connecting, compiling) is never lost.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The exit code of an exit forced by a third signal.
pub const FORCED_EXIT: i32 = 130;

/// Watches for signals until the process ends; cancels `shutdown` on the first.
pub async fn watch(shutdown: CancellationToken, drain_timeout: Duration) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (term, int, hup) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (term, int, hup) else {
            tracing::warn!("cannot install signal handlers; stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        };
        let mut first: Option<Instant> = None;
        let mut count = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => "SIGHUP",
            };
            count += 1;
            match count {
                1 => {
                    first = Some(Instant::now());
                    tracing::info!(
                        "{name} received; draining (up to {}); send it again to see how long \
                         is left, a third time to exit at once",
                        humantime::format_duration(drain_timeout)
                    );
                    shutdown.cancel();
                }
                2 => {
                    let left =
                        drain_timeout.saturating_sub(first.map_or(Duration::ZERO, |t| t.elapsed()));
                    tracing::warn!(
                        "{name} received while draining: running messages have up to {} left; \
                         a third signal exits at once (they are then redelivered after AckWait)",
                        humantime::format_duration(Duration::from_secs(left.as_secs()))
                    );
                }
                _ => {
                    tracing::error!(
                        "{name} received a third time: exiting without finishing the drain"
                    );
                    std::process::exit(FORCED_EXIT);
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = drain_timeout;
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C received; draining");
        shutdown.cancel();
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(FORCED_EXIT);
    }
}
