//! The host imports, answered by the [`Harness`](super::Harness) installed on this thread.

use std::cell::RefCell;

use super::{LogRecord, Published, State};
use crate::log::Level;
use crate::wit::mailroom::handler::{kv, log as wit_log, publish, types};

thread_local! {
    static CURRENT: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Puts the harness state back where it came from when the run ends, even by a panic.
pub(super) struct Installed<'a> {
    home: &'a mut State,
}

pub(super) fn install(state: &mut State) -> Installed<'_> {
    CURRENT.with(|current| {
        let mut current = current.borrow_mut();
        assert!(
            current.is_none(),
            "Harness::run called while another run is in progress on this thread"
        );
        *current = Some(std::mem::take(state));
    });
    Installed { home: state }
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        if let Some(state) = CURRENT.with(|current| current.borrow_mut().take()) {
            *self.home = state;
        }
    }
}

fn with<T>(f: impl FnOnce(&mut State) -> T) -> T {
    CURRENT.with(|current| {
        let mut current = current.borrow_mut();
        let state = current.as_mut().unwrap_or_else(|| {
            panic!(
                "a mailroom_sdk host call (publish, kv, log, config) was made outside a handler \
                 run: in native tests, call the handler through \
                 mailroom_sdk::testing::Harness::run"
            )
        });
        f(state)
    })
}

fn valid_subject(subject: &str) -> bool {
    !subject.is_empty()
        && !subject.chars().any(char::is_whitespace)
        && subject
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">")
}

fn matches(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(p), Some(s)) if p == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
}

pub fn publish(
    subject: &str,
    payload: &[u8],
    headers: &[types::Header],
) -> Result<(), publish::PublishError> {
    with(|state| {
        if !valid_subject(subject) {
            return Err(publish::PublishError::InvalidSubject(subject.to_owned()));
        }
        if let Some(allow) = &state.publish_allow {
            if !allow.iter().any(|p| matches(p, subject)) {
                return Err(publish::PublishError::Denied(subject.to_owned()));
            }
        }
        if state.call.publishes >= state.max_publishes {
            return Err(publish::PublishError::LimitReached(state.max_publishes));
        }
        let index = state.call.publishes;
        state.call.publishes += 1;
        if let Some(reason) = &state.publish_failure {
            return Err(publish::PublishError::Unavailable(reason.clone()));
        }
        let mut pairs = Vec::new();
        let mut msg_id = None;
        for header in headers {
            for value in &header.values {
                if header.name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    msg_id = Some(value.clone());
                } else {
                    pairs.push((header.name.clone(), value.clone()));
                }
            }
        }
        let call = &state.call;
        let msg_id = msg_id.unwrap_or_else(|| {
            format!("{}:{}:{}:{index}", call.handler, call.stream, call.sequence)
        });
        state.published.push(Published {
            subject: subject.to_owned(),
            payload: payload.to_vec(),
            headers: pairs,
            msg_id,
        });
        Ok(())
    })
}

fn check_kv(state: &State, bucket: &str, key: &str) -> Result<(), kv::KvError> {
    if let Some(allow) = &state.kv_allow {
        if !allow.iter().any(|b| b == "*" || b == bucket) {
            return Err(kv::KvError::Denied(bucket.to_owned()));
        }
    }
    if !valid_key(key) {
        return Err(kv::KvError::InvalidKey(key.to_owned()));
    }
    if let Some(reason) = &state.kv_failure {
        return Err(kv::KvError::Unavailable(reason.clone()));
    }
    Ok(())
}

pub fn kv_get(bucket: &str, key: &str) -> Result<Option<kv::Entry>, kv::KvError> {
    with(|state| {
        check_kv(state, bucket, key)?;
        Ok(state
            .kv
            .get(&(bucket.to_owned(), key.to_owned()))
            .and_then(|slot| {
                Some(kv::Entry {
                    value: slot.value.clone()?,
                    revision: slot.revision,
                })
            }))
    })
}

pub fn kv_put(bucket: &str, key: &str, value: &[u8]) -> Result<u64, kv::KvError> {
    with(|state| {
        check_kv(state, bucket, key)?;
        Ok(state.write(bucket, key, Some(value.to_vec())))
    })
}

/// A conditional write, with the host's idempotency id and its order of checks: the id
/// first (a re-run of the same message stores nothing), then the expected revision.
fn put_if(bucket: &str, key: &str, value: &[u8], expect: Option<u64>) -> Result<u64, kv::KvError> {
    with(|state| {
        check_kv(state, bucket, key)?;
        let path = format!("{bucket}/{key}");
        let slot = state.call.kv_written.iter().position(|(p, _)| *p == path);
        let n = slot.map_or(0, |i| state.call.kv_written[i].1);
        let call = &state.call;
        let once_id = format!(
            "{}:{}:{}:kv:{path}:{n}",
            call.handler, call.stream, call.sequence
        );
        let once_key = (bucket.to_owned(), once_id);
        let revision = match state.once.get(&once_key) {
            Some(&revision) => revision,
            None => {
                let current = state.kv.get(&(bucket.to_owned(), key.to_owned()));
                let ok = match (expect, current) {
                    (None, None) => true,
                    (None, Some(slot)) => slot.value.is_none(),
                    (Some(r), Some(slot)) => slot.value.is_some() && slot.revision == r,
                    (Some(_), None) => false,
                };
                if !ok {
                    return Err(kv::KvError::Conflict(key.to_owned()));
                }
                let revision = state.write(bucket, key, Some(value.to_vec()));
                state.once.insert(once_key, revision);
                revision
            }
        };
        match slot {
            Some(i) => state.call.kv_written[i].1 += 1,
            None => state.call.kv_written.push((path, 1)),
        }
        Ok(revision)
    })
}

pub fn kv_put_if(bucket: &str, key: &str, value: &[u8], revision: u64) -> Result<u64, kv::KvError> {
    put_if(bucket, key, value, Some(revision))
}

pub fn kv_create(bucket: &str, key: &str, value: &[u8]) -> Result<u64, kv::KvError> {
    put_if(bucket, key, value, None)
}

pub fn kv_delete(bucket: &str, key: &str) -> Result<(), kv::KvError> {
    with(|state| {
        check_kv(state, bucket, key)?;
        let exists = state
            .kv
            .get(&(bucket.to_owned(), key.to_owned()))
            .is_some_and(|slot| slot.value.is_some());
        if exists {
            state.write(bucket, key, None);
        }
        Ok(())
    })
}

pub fn log(level: wit_log::Level, message: &str, fields: &[wit_log::Field]) {
    with(|state| {
        state.logs.push(LogRecord {
            level: Level::from_wit(level),
            message: message.to_owned(),
            fields: fields
                .iter()
                .map(|f| (f.name.clone(), f.value.clone()))
                .collect(),
        });
    });
}

pub fn config_get(key: &str) -> Option<String> {
    with(|state| state.settings.get(key).cloned())
}
