//! `compat-v0-1`: a handler built against `mailroom:handler@0.1.0` (the frozen WIT in
//! `host/wit/`), to show that hosts keep running guests built before 0.2.0. It uses every
//! 0.1.0 import: `config` (setting `bucket`), `kv` (a read-modify-write of the subject's count),
//! `publish` (the new count to the `output-subject` setting) and `log`.

// The generated export glue passes the message's fields one by one.
#![allow(clippy::too_many_arguments)]

wit_bindgen::generate!({
    path: "../../../wit/handler-0.1.0.wit",
    world: "handler",
});

use mailroom::handler::{config, kv, log, publish};

struct Compat;

impl Guest for Compat {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let fail = |what: String| HandlerError::Reject(what);
        let bucket = config::get("bucket").unwrap_or_else(|| "counts".to_owned());
        let output =
            config::get("output-subject").ok_or_else(|| fail("no output-subject".into()))?;
        let current = kv::get(&bucket, &msg.subject)
            .map_err(|e| fail(format!("kv get: {e:?}")))?
            .map(|v| String::from_utf8_lossy(&v).parse::<u64>().unwrap_or(0))
            .unwrap_or(0);
        let next = current + 1;
        kv::put(&bucket, &msg.subject, next.to_string().as_bytes())
            .map_err(|e| fail(format!("kv put: {e:?}")))?;
        publish::publish(&output, next.to_string().as_bytes(), &[])
            .map_err(|e| fail(format!("publish: {e:?}")))?;
        log::log(log::Level::Info, &format!("{} = {next}", msg.subject));
        Ok(())
    }
}

export!(Compat);
