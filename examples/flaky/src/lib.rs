//! `flaky`: misbehaves on purpose, as its payload says, so tests and the demo can show every
//! failure path of the host. The payload is a command, `name` or `name:argument`:
//!
//! | payload            | what the handler does                                               |
//! |--------------------|---------------------------------------------------------------------|
//! | `ok`               | succeeds                                                            |
//! | `retry`            | asks for a retry on every attempt (ends dead-lettered)              |
//! | `retry-until:N`    | asks for a retry until attempt N, then succeeds                     |
//! | `retry-after:MS`   | asks for a retry after MS milliseconds on attempt 1, then succeeds  |
//! | `reject`           | rejects the message (dead-lettered at once)                         |
//! | `trap`             | panics (a trap) on every attempt                                    |
//! | `trap-once`        | panics on attempt 1, then succeeds                                  |
//! | `crash:TEXT`       | prints a traceback ending in TEXT to stderr, then aborts (a trap    |
//! |                    | with no panic message, as an interpreter's uncaught exception)      |
//! | `loop`             | spins forever (stopped by the host's timeout)                       |
//! | `oom`              | allocates until memory runs out (stopped by the memory limit)       |
//! | `recurse`          | recurses until the stack overflows                                  |
//! | `sleep:MS`         | sleeps MS milliseconds (a host call, like waiting on I/O), succeeds |
//! | `stdout:N`         | writes N bytes to stdout, succeeds                                  |
//! | `publish:SUBJECT`  | publishes the payload to SUBJECT; a refusal rejects the message     |
//! | `publish-then-retry:SUBJECT` | publishes the payload to SUBJECT, then asks for a retry on |
//! |                    | attempt 1 (succeeds later): shows that the re-run's publish is deduplicated |
//! | `publish-many:N`   | publishes N messages to the `output-subject` setting, stops at the first refusal |
//! | `publish-huge:N`   | publishes N bytes to the `output-subject` setting                   |
//! | `kv:BUCKET`        | writes key `probe` in BUCKET; a refusal rejects the message         |
//! | `record`           | publishes "SUBJECT SEQUENCE ATTEMPT" to the `output-subject` setting |
//! | `record-fail-once` | like `record`, after asking for a retry on attempt 1                |
//! | `chain:N`          | publishes `chain:N-1` to its own subject (while N > 0), succeeds   |
//! | `wait-kv:B/K`      | polls KV bucket B until key K exists (up to 20s), then succeeds     |
//! | `kv-set:B/K`       | writes key K in bucket B                                            |
//! | `calls`            | publishes how many times this instance was called (1 when every   |
//! |                    | message gets a fresh instance) to the `output-subject` setting      |
//! | `sandbox`          | tries to read files, environment and the network; rejects with a   |
//! |                    | report if anything was reachable, succeeds if nothing was           |
//!
//! | `record-exec:MS`   | sleeps MS ms, then publishes "SUBJECT SEQUENCE ATTEMPT" to the      |
//! |                    | `output-subject` setting (deduplicated across re-runs) and to      |
//! |                    | `execs.<stream>` with the id `exec-SEQUENCE-ATTEMPT` (one per run)   |
//! | `poison`           | writes KV key `SEQUENCE-ATTEMPT` in bucket `execs` (an execution    |
//! |                    | record that a failed attempt keeps), then asks for a retry (every   |
//! |                    | attempt fails)                                                      |
//! | `span:MS`          | sleeps MS ms and writes KV key `HOST-SEQUENCE-START` in bucket      |
//! |                    | `spans` with "SUBJECT SEQUENCE START END ATTEMPT HOST" (nanoseconds |
//! |                    | since the epoch; HOST is the `host` setting), then publishes        |
//! |                    | "SUBJECT SEQUENCE" to the `output-subject` setting: how the         |
//! |                    | partition tests see every execution of every key                    |
//! | `switch:A,B`       | attempt 1 publishes "A" to subject A and asks for a retry; later    |
//! |                    | attempts publish "B" to subject B and succeed                       |
//! | `publish-id:ID`    | publishes to the `output-subject` setting with `Nats-Msg-Id` ID     |
//! | `sleep-kv:MS`      | sleeps MS ms, then writes key `late` in bucket `execs`              |
//! | `require-kv:B/K`   | asks for a retry unless key K exists in bucket B, then succeeds     |
//! | `echo-meta`        | publishes "PAYLOAD-BYTES HEADER-NAMES VALUES-OF-X-Many TOKENS" to   |
//! |                    | the `output-subject` setting                                        |
//! | `version:MS`       | sleeps MS ms, then publishes "SUBJECT SEQUENCE VERSION" (VERSION is |
//! |                    | the `version` setting) to the `output-subject` setting and to       |
//! |                    | `execs.<stream>` with an id unique to this execution: how the       |
//! |                    | deploy tests see which version ran each message, and how often     |
//!
//! A `Flaky-Command` header, when present, is the command instead of the payload, so the
//! payload can be anything (binary, empty, huge).
//!
//! Any other payload is rejected.

use std::time::Duration;

use mailroom_sdk::{config, kv, publish, Error, Message};

fn handle(msg: Message) -> Result<(), Error> {
    let text = match msg.header("Flaky-Command") {
        Some(command) => command.trim().to_owned(),
        None => msg.text()?.trim().to_owned(),
    };
    let (command, arg) = match text.split_once(':') {
        Some((command, arg)) => (command, arg),
        None => (text.as_str(), ""),
    };
    let number = || -> Result<u64, Error> {
        arg.parse()
            .map_err(|_| Error::reject(format!("{command} needs a number, got {arg:?}")))
    };
    let attempt = u64::from(msg.attempt());
    match command {
        "ok" => Ok(()),
        "retry" => Err(Error::retry(format!(
            "flaky: retry requested on attempt {attempt}"
        ))),
        "retry-until" if attempt < number()? => {
            Err(Error::retry(format!("flaky: failing until attempt {arg}")))
        }
        "retry-until" => Ok(()),
        "retry-after" if attempt == 1 => Err(Error::retry_after(
            "flaky: retry-after requested",
            Duration::from_millis(number()?),
        )),
        "retry-after" => Ok(()),
        "reject" => Err(Error::reject("flaky: rejected on purpose")),
        "trap" => panic!("flaky: trap requested"),
        "crash" => {
            // What an interpreter does on an uncaught exception: print it, then trap without
            // a Rust panic message.
            eprintln!("Traceback (most recent call last):\n  File \"app.py\", line 3, in handle");
            eprintln!("flaky: {arg}");
            std::process::abort()
        }
        "trap-once" if attempt == 1 => panic!("flaky: trap requested on attempt 1"),
        "trap-once" => Ok(()),
        "loop" => spin_forever(),
        "oom" => exhaust_memory(),
        "recurse" => {
            let depth = recurse(std::hint::black_box(1));
            Err(Error::reject(format!("flaky: recursion ended at {depth}")))
        }
        "sleep" => {
            std::thread::sleep(Duration::from_millis(number()?));
            Ok(())
        }
        "stdout" => {
            use std::io::Write;
            let line = [b'x'; 1023];
            let mut left = number()? as usize;
            let mut out = std::io::stdout().lock();
            while left > 0 {
                let n = left.min(1023);
                // Output beyond the host's cap is dropped by the host, not refused, so this
                // loop finishes.
                let _ = out.write_all(&line[..n]);
                let _ = out.write_all(b"\n");
                left -= n;
            }
            Ok(())
        }
        "publish" => Ok(publish(arg, msg.payload())?),
        "publish-then-retry" => {
            publish(arg, msg.payload())?;
            if attempt == 1 {
                Err(Error::retry("flaky: published, then failed"))
            } else {
                Ok(())
            }
        }
        "publish-many" => {
            let output = config::require("output-subject")?;
            for i in 0..number()? {
                publish(&output, i.to_string())?;
            }
            Ok(())
        }
        "publish-huge" => {
            let output = config::require("output-subject")?;
            publish(&output, vec![b'h'; number()? as usize])?;
            Ok(())
        }
        "kv" => {
            kv::put(arg, "probe", b"1")?;
            Ok(())
        }
        "record" | "record-fail-once" => {
            if command == "record-fail-once" && attempt == 1 {
                return Err(Error::retry("flaky: record-fail-once fails attempt 1"));
            }
            let output = config::require("output-subject")?;
            let line = format!("{} {} {}", msg.subject(), msg.sequence(), attempt);
            publish(&output, line)?;
            Ok(())
        }
        "record-exec" => {
            std::thread::sleep(Duration::from_millis(number()?));
            let line = format!("{} {} {}", msg.subject(), msg.sequence(), attempt);
            let exec_id = format!("exec-{}-{attempt}", msg.sequence());
            mailroom_sdk::publish_with_headers(
                &format!("execs.{}", msg.stream()),
                &line,
                &[("Nats-Msg-Id", &exec_id)],
            )?;
            publish(&config::require("output-subject")?, line)?;
            Ok(())
        }
        "version" => {
            std::thread::sleep(Duration::from_millis(number()?));
            let version = config::get("version").unwrap_or_else(|| "?".to_owned());
            let line = format!("{} {} {version}", msg.subject(), msg.sequence());
            let exec_id = format!("exec-{}-{}", msg.sequence(), now_nanos());
            mailroom_sdk::publish_with_headers(
                &format!("execs.{}", msg.stream()),
                &line,
                &[("Nats-Msg-Id", &exec_id)],
            )?;
            publish(&config::require("output-subject")?, line)?;
            Ok(())
        }
        "poison" => {
            kv::put("execs", &format!("{}-{attempt}", msg.sequence()), b"poison")?;
            Err(Error::retry(format!("flaky: poison attempt {attempt}")))
        }
        "span" => {
            let start = now_nanos();
            std::thread::sleep(Duration::from_millis(number()?));
            let end = now_nanos();
            let host = config::get("host").unwrap_or_else(|| "?".to_owned());
            let record = format!(
                "{} {} {start} {end} {attempt} {host}",
                msg.subject(),
                msg.sequence()
            );
            kv::put(
                "spans",
                &format!("{host}-{}-{start}", msg.sequence()),
                record.as_bytes(),
            )?;
            let line = format!("{} {}", msg.subject(), msg.sequence());
            publish(&config::require("output-subject")?, line)?;
            Ok(())
        }
        "switch" => {
            let (first, then) = arg
                .split_once(',')
                .ok_or_else(|| Error::reject(format!("switch needs A,B, got {arg:?}")))?;
            if attempt == 1 {
                publish(first, "A")?;
                Err(Error::retry("flaky: switch fails attempt 1"))
            } else {
                publish(then, "B")?;
                Ok(())
            }
        }
        "publish-id" => {
            mailroom_sdk::publish_with_headers(
                &config::require("output-subject")?,
                msg.payload(),
                &[("Nats-Msg-Id", arg)],
            )?;
            Ok(())
        }
        "sleep-kv" => {
            std::thread::sleep(Duration::from_millis(number()?));
            kv::put("execs", "late", b"1")?;
            Ok(())
        }
        "require-kv" => {
            let (bucket, key) = bucket_key(arg)?;
            match kv::get(bucket, key)? {
                Some(_) => Ok(()),
                None => Err(Error::retry(format!("flaky: {arg} is not there yet"))),
            }
        }
        "echo-meta" => {
            let names: std::collections::BTreeSet<&str> = msg.headers().map(|(n, _)| n).collect();
            let line = format!(
                "{} {} {} {}",
                msg.payload().len(),
                names.len(),
                msg.header_values("X-Many").count(),
                msg.subject().split('.').count()
            );
            publish(&config::require("output-subject")?, line)?;
            Ok(())
        }
        "chain" => {
            let n = number()?;
            if n > 0 {
                publish(msg.subject(), format!("chain:{}", n - 1))?;
            }
            Ok(())
        }
        "wait-kv" => {
            let (bucket, key) = bucket_key(arg)?;
            for _ in 0..2000 {
                if kv::get(bucket, key)?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Error::retry(format!("flaky: {arg} never appeared")))
        }
        "kv-set" => {
            let (bucket, key) = bucket_key(arg)?;
            kv::put(bucket, key, b"set")?;
            Ok(())
        }
        "calls" => {
            static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            publish(&config::require("output-subject")?, n.to_string())?;
            Ok(())
        }
        "sandbox" => sandbox_report(),
        other => Err(Error::reject(format!("flaky: unknown command {other:?}"))),
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn bucket_key(arg: &str) -> Result<(&str, &str), Error> {
    arg.split_once('/')
        .ok_or_else(|| Error::reject(format!("expected BUCKET/KEY, got {arg:?}")))
}

fn spin_forever() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

fn exhaust_memory() -> Result<(), Error> {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Touch every page so the memory is really used, not just reserved.
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let buffer = std::hint::black_box([depth; 64]);
    recurse(buffer[3] + 1) + buffer[5]
}

/// Tries every kind of ambient authority a program might expect and reports what worked.
fn sandbox_report() -> Result<(), Error> {
    let mut reachable = Vec::new();
    for path in ["/etc/passwd", "/", ".", "/tmp"] {
        if std::fs::metadata(path).is_ok() {
            reachable.push(format!("file {path}"));
        }
    }
    if std::fs::write("/tmp/mailroom-escape", b"x").is_ok()
        || std::fs::write("escape", b"x").is_ok()
    {
        reachable.push("file write".to_owned());
    }
    let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    if !vars.is_empty() {
        reachable.push(format!("environment {vars:?}"));
    }
    if std::env::args().count() > 0 {
        reachable.push("arguments".to_owned());
    }
    if std::net::TcpStream::connect("127.0.0.1:4222").is_ok() {
        reachable.push("tcp 127.0.0.1:4222".to_owned());
    }
    if std::net::UdpSocket::bind("0.0.0.0:0").is_ok() {
        reachable.push("udp bind".to_owned());
    }
    if std::net::ToSocketAddrs::to_socket_addrs("localhost:80").is_ok() {
        reachable.push("dns lookup".to_owned());
    }
    if reachable.is_empty() {
        Ok(())
    } else {
        Err(Error::reject(format!(
            "sandbox reachable: {}",
            reachable.join(", ")
        )))
    }
}

mailroom_sdk::export!(handle);

#[cfg(test)]
mod tests {
    use mailroom_sdk::testing::Harness;
    use mailroom_sdk::Message;

    #[test]
    fn each_command_takes_its_failure_path() {
        let mut h = Harness::new().setting("output-subject", "records.all");
        assert!(h.run(super::handle, Message::new("jobs.a", "ok")).is_ok());
        let retry = h.run(super::handle, Message::new("jobs.a", "retry"));
        assert!(retry.unwrap_err().is_retry());
        let reject = h.run(super::handle, Message::new("jobs.a", "reject"));
        assert!(reject.unwrap_err().is_reject());
        let later = h
            .run(
                super::handle,
                Message::new("jobs.a", "retry-until:2").with_attempt(2),
            )
            .map_err(|e| e.to_string());
        assert_eq!(later, Ok(()));
        h.run(
            super::handle,
            Message::new("jobs.a", "record").with_sequence("JOBS", 5),
        )
        .unwrap();
        h.assert_published("records.all", "jobs.a 5 1");
    }

    #[test]
    fn the_header_command_wins_over_the_payload() {
        let mut h = Harness::new();
        let msg = Message::new("jobs.a", vec![0xff, 0x00]).with_header("Flaky-Command", "reject");
        assert!(h.run(super::handle, msg).unwrap_err().is_reject());
    }
}
