//! The registry commands of the `mailroom` binary: `deploy`, `ls`, `history`, `rollback`,
//! `undeploy`. They connect as `mailroom run` does (the `[nats]` section of a host's file).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use mailroom::registry::{commands, view, Registry, SpecRecord};

/// How the registry commands reach NATS.
#[derive(Debug, Args)]
pub struct Connection {
    /// A host configuration file whose [nats] section (URL, credentials, TLS) to connect with;
    /// its handlers are not used. Default: nats://127.0.0.1:4222 without authentication.
    #[arg(long, short, env = "MAILROOM_CONFIG")]
    pub config: Option<PathBuf>,

    /// NATS server URL(s), overriding nats.url.
    #[arg(long, env = "MAILROOM_NATS_URL")]
    pub nats_url: Option<String>,

    /// How long to keep trying to reach NATS (e.g. 5s; 0 = forever). Default 10s.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub connect_timeout: Duration,
}

/// `mailroom deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The handler's name (letters, digits, '-' and '_').
    pub name: String,

    /// The handler component (.wasm).
    pub module: PathBuf,

    /// A TOML file with the handler's [[handler]] table (stream, ordering, partitions,
    /// limits, grants, config); a host file works too, its [[handler]] of this name is taken.
    #[arg(long, value_name = "FILE")]
    pub handler_config: Option<PathBuf>,

    /// Set KEY of the handler table (after --handler-config), e.g. stream=ORDERS,
    /// partitions=4, config.output-subject=out, publish.allow=["out.>"]; repeat for more.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub sets: Vec<(String, String)>,

    /// A label hosts can select on (deploy.labels), KEY=VALUE; repeat for more.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,

    /// Wait this long for every watching host that selects the handler to run the new
    /// revision, and print how long it took; exit code 2 if a host refused it. Default: do
    /// not wait.
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,

    #[command(flatten)]
    pub connection: Connection,
}

/// `mailroom ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub connection: Connection,
}

/// `mailroom history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The handler.
    pub name: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub connection: Connection,
}

/// `mailroom rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The handler.
    pub name: String,

    /// The revision to go back to. Default: the one before the latest.
    #[arg(long, value_name = "REV")]
    pub to: Option<u64>,

    /// Wait this long for every host to run it (see deploy --wait).
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,

    #[command(flatten)]
    pub connection: Connection,
}

/// `mailroom undeploy`.
#[derive(Debug, Args)]
pub struct UndeployArgs {
    /// The handler.
    pub name: String,

    /// Also delete its consumer (or partition work streams) and its registry history, once
    /// every host stopped it.
    #[arg(long)]
    pub purge: bool,

    /// Wait this long for every host to stop it. Default: do not wait (30s with --purge).
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,

    #[command(flatten)]
    pub connection: Connection,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    mailroom::config::parse_duration(text)
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{text:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

async fn connect(c: &Connection) -> anyhow::Result<(async_nats::jetstream::Context, Registry)> {
    let mut nats = match &c.config {
        Some(path) => mailroom::config::load_connection(path)?,
        None => mailroom::config::default_connection(None)?,
    };
    if let Some(url) = &c.nats_url {
        nats.url = url.clone();
    }
    nats.connect_timeout = (!c.connect_timeout.is_zero()).then_some(c.connect_timeout);
    let client = mailroom::connect::connect(&nats).await?;
    let js = async_nats::jetstream::new(client);
    let registry = Registry::open(&js, 1).await?;
    Ok((js, registry))
}

fn say(line: String) {
    println!("{line}");
}

/// Waits for the rollout of the latest revision of `name`, printing where each host got.
/// Exit code 2 when a host refused it.
async fn wait(registry: &Registry, name: &str, within: Duration) -> anyhow::Result<ExitCode> {
    let history = registry.history(name).await?;
    let Some(spec): Option<&SpecRecord> = history.last() else {
        return Ok(ExitCode::SUCCESS);
    };
    let rollout = view::wait_for_rollout(registry, spec, within).await?;
    println!("{rollout}");
    if rollout.refused.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "error: revision {} of {name} was refused by {} (the reason is above; they keep \
         running what they ran)",
        spec.revision,
        rollout.refused.join(", ")
    );
    Ok(ExitCode::from(2))
}

pub async fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let request = commands::DeployRequest {
        name: args.name.clone(),
        module: args.module.clone(),
        handler_config: args.handler_config,
        sets: args.sets,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        cache_dir: mailroom::config::default_cache_dir(),
    };
    let checked = commands::check(&request).await?;
    println!(
        "checked {}: a mailroom handler component, as a host would load it",
        args.module.display()
    );
    for note in &checked.notes {
        println!("note: {note}");
    }
    let (_, registry) = connect(&args.connection).await?;
    let deployed = commands::deploy(&registry, &checked, &mut say).await?;
    match args.wait {
        Some(within) if deployed.change.kind != mailroom::registry::change::Kind::Unchanged => {
            wait(&registry, &deployed.name, within).await
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

pub async fn ls(args: LsArgs) -> anyhow::Result<ExitCode> {
    let (_, registry) = connect(&args.connection).await?;
    let listing = view::list(&registry).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        println!("{listing}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn history(args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let (_, registry) = connect(&args.connection).await?;
    let history = view::history(&registry, &args.name).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&history)?);
    } else {
        println!("{history}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn rollback(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    let (_, registry) = connect(&args.connection).await?;
    let rolled = commands::rollback(&registry, &args.name, args.to, &mut say).await?;
    match args.wait {
        Some(within) => wait(&registry, &rolled.name, within).await,
        None => Ok(ExitCode::SUCCESS),
    }
}

pub async fn undeploy(args: UndeployArgs) -> anyhow::Result<ExitCode> {
    let (js, registry) = connect(&args.connection).await?;
    commands::undeploy(&registry, &args.name, &mut say).await?;
    let within = args.wait.or(args.purge.then_some(Duration::from_secs(30)));
    if let Some(within) = within {
        // An undeploy is never refused, so the exit code says nothing more here.
        let _ = wait(&registry, &args.name, within)
            .await
            .context("not purged: a host still runs the handler")?;
    }
    if args.purge {
        commands::purge(&js, &registry, &args.name, &mut say).await?;
    }
    Ok(ExitCode::SUCCESS)
}
