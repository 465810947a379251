//! The imports of `mailroom:handler@0.1.0`, for components built against it: each one is the
//! current version's, with the results mapped back to the old types.

use super::CallContext;
use crate::runtime::bindings::mailroom::handler as current;
use crate::runtime::bindings::v0_1::mailroom::handler::{config, kv, log, publish};

impl publish::Host for CallContext {
    async fn publish(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        headers: Vec<publish::Header>,
    ) -> wasmtime::Result<Result<(), publish::PublishError>> {
        use current::publish::PublishError as E;
        let result = current::publish::Host::publish(self, subject, payload, headers).await?;
        Ok(result.map_err(|err| match err {
            E::Denied(s) => publish::PublishError::Denied(s),
            E::TooLarge(n) => publish::PublishError::TooLarge(n),
            E::LimitReached(n) => publish::PublishError::LimitReached(n),
            E::InvalidSubject(s) => publish::PublishError::InvalidSubject(s),
            E::Unavailable(s) => publish::PublishError::Unavailable(s),
        }))
    }
}

fn kv_error(err: current::kv::KvError) -> kv::KvError {
    use current::kv::KvError as E;
    match err {
        E::Denied(b) => kv::KvError::Denied(b),
        E::NoSuchBucket(b) => kv::KvError::NoSuchBucket(b),
        E::InvalidKey(k) => kv::KvError::InvalidKey(k),
        E::TooLarge(n) => kv::KvError::TooLarge(n),
        E::Unavailable(s) => kv::KvError::Unavailable(s),
        // 0.1.0 has no conditional writes, so nothing it calls can conflict.
        E::Conflict(k) => kv::KvError::Unavailable(format!("conflicting write to {k}")),
    }
}

impl kv::Host for CallContext {
    async fn get(
        &mut self,
        bucket: String,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, kv::KvError>> {
        let found = self.get_entry(&bucket, &key).await;
        Ok(found.map(|e| e.map(|e| e.value)).map_err(kv_error))
    }

    async fn put(
        &mut self,
        bucket: String,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<u64, kv::KvError>> {
        Ok(self.put_plain(&bucket, &key, value).await.map_err(kv_error))
    }

    async fn delete(
        &mut self,
        bucket: String,
        key: String,
    ) -> wasmtime::Result<Result<(), kv::KvError>> {
        Ok(self.delete_key(&bucket, &key).await.map_err(kv_error))
    }
}

impl log::Host for CallContext {
    fn log(&mut self, level: log::Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            log::Level::Trace => current::log::Level::Trace,
            log::Level::Debug => current::log::Level::Debug,
            log::Level::Info => current::log::Level::Info,
            log::Level::Warn => current::log::Level::Warn,
            log::Level::Error => current::log::Level::Error,
        };
        current::log::Host::log(self, level, message, Vec::new())
    }
}

impl config::Host for CallContext {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        current::config::Host::get(self, key)
    }
}
