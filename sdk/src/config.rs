//! The handler's settings from the host configuration.
//!
//! ```toml
//! [[handler]]
//! name = "enrich"
//! # ...
//! [handler.config]
//! output-subject = "enriched.orders"
//! ```

use crate::host as sys;
use crate::Error;

/// The setting named `key`, if the host configuration has it.
pub fn get(key: &str) -> Option<String> {
    sys::config_get(key)
}

/// The setting named `key`; a missing setting [rejects](Error::reject) the message with a reason
/// naming the key, so the dead-letter record says what to configure.
pub fn require(key: &str) -> Result<String, Error> {
    get(key).ok_or_else(|| {
        Error::reject(format!(
            "setting {key:?} is missing: add it under [handler.config] in the host configuration"
        ))
    })
}
