//! Logging through the host.
//!
//! Records go to the host's `tracing` output tagged with the handler's name, with structured
//! fields as fields of the record (a JSON log shows them as keys). Use the macros:
//! [`info!`](crate::info), [`warn!`](crate::warn), [`error!`](crate::error),
//! [`debug!`](crate::debug), [`trace!`](crate::trace). Fields come first, separated from the
//! message by `;`:
//!
//! ```no_run
//! let order_id = 7;
//! mailroom_sdk::info!("order {order_id} enriched");
//! mailroom_sdk::info!(order_id = order_id, tier = "large"; "order enriched");
//! ```
//!
//! Output beyond the host's per-message log budget is dropped.

use std::fmt::Display;

use crate::host as sys;
use crate::wit::mailroom::handler::log as host;

/// Severity of a log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected that the handler survived.
    Warn,
    /// A failure.
    Error,
}

impl Level {
    fn to_wit(self) -> host::Level {
        match self {
            Level::Trace => host::Level::Trace,
            Level::Debug => host::Level::Debug,
            Level::Info => host::Level::Info,
            Level::Warn => host::Level::Warn,
            Level::Error => host::Level::Error,
        }
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub(crate) fn from_wit(level: host::Level) -> Level {
        match level {
            host::Level::Trace => Level::Trace,
            host::Level::Debug => Level::Debug,
            host::Level::Info => Level::Info,
            host::Level::Warn => Level::Warn,
            host::Level::Error => Level::Error,
        }
    }
}

/// Writes one log record. The macros call this; call it directly when the level is dynamic.
pub fn write(level: Level, message: &str) {
    sys::log(level.to_wit(), message, &[]);
}

/// Writes one log record with structured fields, given as `(name, value)` pairs. The macros'
/// `name = value; "message"` form calls this.
pub fn write_fields(level: Level, message: &str, fields: &[(&str, &dyn Display)]) {
    let fields: Vec<host::Field> = fields
        .iter()
        .map(|(name, value)| host::Field {
            name: (*name).to_owned(),
            value: value.to_string(),
        })
        .collect();
    sys::log(level.to_wit(), message, &fields);
}

/// The shared body of the level macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __log {
    ($level:expr, $($name:ident = $value:expr),+ ; $($arg:tt)+) => {
        $crate::log::write_fields(
            $level,
            &::std::format!($($arg)+),
            &[$((::core::stringify!($name), &$value as &dyn ::core::fmt::Display)),+],
        )
    };
    ($level:expr, $($arg:tt)+) => {
        $crate::log::write($level, &::std::format!($($arg)+))
    };
}

/// Logs at trace level: `trace!("text {x}")` or `trace!(field = value, …; "text {x}")`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::__log!($crate::log::Level::Trace, $($arg)+) };
}

/// Logs at debug level: `debug!("text {x}")` or `debug!(field = value, …; "text {x}")`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::__log!($crate::log::Level::Debug, $($arg)+) };
}

/// Logs at info level: `info!("text {x}")` or `info!(field = value, …; "text {x}")`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)+) => { $crate::__log!($crate::log::Level::Info, $($arg)+) };
}

/// Logs at warn level: `warn!("text {x}")` or `warn!(field = value, …; "text {x}")`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)+) => { $crate::__log!($crate::log::Level::Warn, $($arg)+) };
}

/// Logs at error level: `error!("text {x}")` or `error!(field = value, …; "text {x}")`.
#[macro_export]
macro_rules! error {
    ($($arg:tt)+) => { $crate::__log!($crate::log::Level::Error, $($arg)+) };
}
