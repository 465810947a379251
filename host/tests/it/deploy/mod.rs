//! Deploying handlers through NATS (`mailroom deploy` and hosts with `[deploy] watch = true`),
//! against real nats-servers: revisions under load on two hosts (hot swap, rollback, drain and
//! rebind), refused revisions, hosts that start late or miss deploys, a nats-server restart, the
//! commands against an auth-enabled server, and `dev --watch`. This file has what they share.

mod cli;
mod fleet;
mod refused;
mod under_load;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use mailroom::registry::{commands, view, Origin, Registry, SpecRecord};

use crate::support::{all_messages, target_dir, wasm, Env, Host};

/// Streams every test uses: inputs, outputs, and one record per execution.
pub const STREAMS: &str = r#"
[[stream]]
name = "JOBS"
subjects = ["jobs.>"]
storage = "memory"

[[stream]]
name = "OUT"
subjects = ["out.>"]
storage = "memory"

[[stream]]
name = "EXECS"
subjects = ["execs.>"]
storage = "memory"
"#;

/// A watching host's config: `id`, and extra `[deploy]` lines.
pub fn host_config(env: &Env, id: &str, deploy: &str) -> mailroom::Config {
    env.config(&format!(
        "[host]\nid = \"{id}\"\ndrain_timeout = \"5s\"\n\n[deploy]\nwatch = true\n\
         publish = {{ allow = [\"out.>\", \"execs.>\"] }}\n{deploy}\n{STREAMS}"
    ))
}

/// `flaky.wasm` with a custom section holding `tag` appended: another module (another
/// hash, compiled again) that behaves the same.
pub fn flaky_variant(dir: &Path, tag: &str) -> PathBuf {
    let mut bytes = std::fs::read(wasm("flaky")).unwrap();
    bytes.extend(custom_section("mailroom-test", tag.as_bytes()));
    let path = dir.join(format!("flaky-{tag}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    path
}

pub fn custom_section(name: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = leb(name.len() as u64);
    body.extend(name.as_bytes());
    body.extend(payload);
    let mut section = vec![0u8];
    section.extend(leb(body.len() as u64));
    section.extend(body);
    section
}

pub fn leb(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A nonce so that a module is new to the compile cache on every run.
pub fn nonce() -> String {
    format!("{:x}", fastrand::u64(..))
}

/// The spec of flaky handler `name` on `jobs.<name>.>`, writing its outputs to
/// `out.<name>` with `version`.
pub fn sets(name: &str, version: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut sets: Vec<(String, String)> = [
        ("stream", "JOBS".to_owned()),
        ("subjects", format!("[\"jobs.{name}.>\"]")),
        ("publish.allow", format!("[\"out.{name}\", \"execs.>\"]")),
        ("config.output-subject", format!("out.{name}")),
        ("config.version", version.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    sets.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    sets
}

/// Checks the module as `mailroom deploy` does (with a compile cache of its own, so that a
/// module new to the hosts' cache is compiled by the hosts) and writes it as the next
/// revision.
pub async fn deploy(
    registry: &Registry,
    name: &str,
    module: &Path,
    sets: Vec<(String, String)>,
    labels: &[(&str, &str)],
) -> commands::Deployed {
    let checked = commands::check(&commands::DeployRequest {
        name: name.to_owned(),
        module: module.to_owned(),
        handler_config: None,
        sets,
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cache_dir: Some(target_dir().join("mailroom-test-cache-deploy")),
    })
    .await
    .expect("the deploy passes the local check");
    let mut said = Vec::new();
    let deployed = commands::deploy(registry, &checked, &mut |line| said.push(line))
        .await
        .expect("deploy");
    println!("{}", said.join("\n"));
    deployed
}

/// The latest spec of `name`.
pub async fn latest(registry: &Registry, name: &str) -> SpecRecord {
    registry
        .history(name)
        .await
        .unwrap()
        .pop()
        .expect("deployed")
}

/// Waits until every host that selects `name` runs (or refused) its latest revision.
pub async fn rollout(registry: &Registry, name: &str) -> view::Rollout {
    let spec = latest(registry, name).await;
    view::wait_for_rollout(registry, &spec, Duration::from_secs(60))
        .await
        .unwrap_or_else(|err| panic!("{err:#}"))
}

/// Publishes `version:MS` jobs to `jobs.<handler>.<key>` for each handler, round-robin over
/// 16 keys, one every `every`, until stopped. The payload is the phase the test was in when
/// the job was sent.
pub struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicU32>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(js: &jetstream::Context, handlers: &[&str], ms: u32, every: Duration) -> Load {
        let (stop, phase, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let handlers: Vec<String> = handlers.iter().map(|h| h.to_string()).collect();
        let task = tokio::spawn({
            let (js, stop, phase, sent) = (js.clone(), stop.clone(), phase.clone(), sent.clone());
            async move {
                let mut tick = tokio::time::interval(every);
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    for h in &handlers {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Flaky-Command", format!("version:{ms}").as_str());
                        let payload = phase.load(Ordering::Relaxed).to_string();
                        js.publish_with_headers(
                            format!("jobs.{h}.k{}", i % 16),
                            headers,
                            payload.into(),
                        )
                        .await
                        .expect("publish")
                        .await
                        .expect("stored");
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
            }
        });
        Load {
            stop,
            phase,
            sent,
            task,
        }
    }

    fn phase(&self, phase: u32) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.sent.load(Ordering::Relaxed)
    }
}

/// One handler's run, read back from the streams: per input sequence its subject and the
/// phase it was sent in; the outputs (subject, sequence, version) in stream order; and how
/// many times each sequence executed.
pub struct Run {
    inputs: BTreeMap<u64, (String, u32)>,
    outputs: Vec<(String, u64, String)>,
    executions: HashMap<u64, u32>,
}

pub async fn read_run(env: &Env, handler: &str) -> Run {
    let prefix = format!("jobs.{handler}.");
    let inputs = all_messages(&env.js, "JOBS")
        .await
        .into_iter()
        .filter(|(s, _, _)| s.starts_with(&prefix))
        .map(|(s, p, seq)| (seq, (s, String::from_utf8_lossy(&p).parse().unwrap())))
        .collect();
    let parse = |payload: &[u8]| {
        let text = String::from_utf8_lossy(payload).into_owned();
        let parts: Vec<&str> = text.split(' ').collect();
        (
            parts[0].to_owned(),
            parts[1].parse::<u64>().unwrap(),
            parts[2].to_owned(),
        )
    };
    let outputs = all_messages(&env.js, "OUT")
        .await
        .into_iter()
        .filter(|(s, _, _)| s == &format!("out.{handler}"))
        .map(|(_, p, _)| parse(&p))
        .collect();
    let mut executions = HashMap::new();
    for (_, p, _) in all_messages(&env.js, "EXECS").await {
        let (subject, seq, _) = parse(&p);
        if subject.starts_with(&prefix) {
            *executions.entry(seq).or_insert(0) += 1;
        }
    }
    Run {
        inputs,
        outputs,
        executions,
    }
}

impl Run {
    /// Every input ran exactly once and has exactly one output; per key, outputs are in
    /// stream order. Returns the version of every input.
    fn check_once_in_order(&self, handler: &str) -> BTreeMap<u64, String> {
        let mut versions = BTreeMap::new();
        for (subject, seq, version) in &self.outputs {
            assert!(
                versions.insert(*seq, version.clone()).is_none(),
                "{handler}: two outputs for input {seq}"
            );
            assert_eq!(
                self.inputs.get(seq).map(|(s, _)| s),
                Some(subject),
                "{handler}: output for an unknown input {seq}"
            );
        }
        let missing: Vec<&u64> = self
            .inputs
            .keys()
            .filter(|s| !versions.contains_key(s))
            .collect();
        assert!(
            missing.is_empty(),
            "{handler}: inputs without output: {missing:?}"
        );
        let twice: Vec<(&u64, &u32)> = self.executions.iter().filter(|(_, n)| **n != 1).collect();
        assert!(
            twice.is_empty(),
            "{handler}: inputs not run exactly once: {twice:?}"
        );
        assert_eq!(self.executions.len(), self.inputs.len(), "{handler}");
        let mut last: HashMap<&str, u64> = HashMap::new();
        for (subject, seq, _) in &self.outputs {
            if let Some(prev) = last.insert(subject, *seq) {
                assert!(prev < *seq, "{handler}: {subject} ran {seq} after {prev}");
            }
        }
        versions
    }
}

/// The handler's module swap count on this host, if it runs it.
pub fn swaps(host: &Host, handler: &str) -> Option<u64> {
    host.running
        .metrics()
        .snapshot()
        .iter()
        .any(|(n, _)| n == handler)
        .then(|| host.running.module_version(handler))
        .flatten()
}

/// Writes `bytes` as module and `sets` as spec of `name`'s next revision directly, past the
/// deploy command's own check (as an older client, or someone writing to the buckets, could).
pub async fn write_unchecked(
    registry: &Registry,
    name: &str,
    bytes: &[u8],
    sets: Vec<(String, String)>,
) -> u64 {
    let (module, _) = registry.upload(bytes).await.unwrap();
    write_spec(registry, name, module, sets).await
}

pub async fn write_spec(
    registry: &Registry,
    name: &str,
    module: mailroom::registry::ModuleRef,
    sets: Vec<(String, String)>,
) -> u64 {
    let (table, _) = mailroom::registry::spec::build_table(name, None, &sets).unwrap();
    let latest = registry.latest(name).await.unwrap();
    let revision = latest
        .as_ref()
        .and_then(|l| l.record.as_ref())
        .map_or(1, |r| r.revision + 1);
    let record = SpecRecord {
        name: name.to_owned(),
        revision,
        handler: mailroom::registry::spec::render(&table).unwrap(),
        module,
        labels: BTreeMap::new(),
        deployed_at: 0,
        deployed_by: "test".into(),
        origin: Origin::Deploy,
    };
    registry
        .write(name, &record, latest.map(|l| l.kv_revision))
        .await
        .unwrap();
    revision
}

/// What host `id` reports for `name`: (running, failed revision and reason).
pub async fn report(
    registry: &Registry,
    id: &str,
    name: &str,
) -> (Option<u64>, Option<(u64, String)>) {
    let hosts = registry.host_records().await.unwrap();
    let (_, host) = hosts
        .iter()
        .find(|(_, h)| h.name == id)
        .expect("the host has a record");
    let r = host.handlers.get(name).cloned().unwrap_or_default();
    (r.running, r.failed)
}

/// Waits until host `a` reports `revision` of `h` refused for a reason saying `says`, while
/// it still runs revision 1.
pub async fn refused(registry: &Registry, revision: u64, what: &str, says: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (running, failed) = report(registry, "a", "h").await;
        if let Some((r, reason)) = &failed {
            if *r == revision {
                assert_eq!(running, Some(1), "{what}: the running revision stays");
                assert!(reason.contains(says), "{what}: {reason}");
                println!("the host refuses {what}: {reason}");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never refused: {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `OUT` holds `n` outputs.
pub async fn wait_for_outputs(env: &Env, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = env.stream_count("OUT").await;
        if count >= n {
            return;
        }
        assert!(Instant::now() < deadline, "outputs: {count} of {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `n` jobs to `jobs.<handler>.k<i>` and returns how many were sent.
pub async fn publish_jobs(env: &Env, handler: &str, n: u64) -> u64 {
    for i in 0..n {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Flaky-Command", "version:0");
        env.js
            .publish_with_headers(format!("jobs.{handler}.k{}", i % 4), headers, "9".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    n
}
