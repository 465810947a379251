//! The `mailroom` command line: clap definitions and the dispatch to each command.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};

use mailroom::config::Config;

/// Runs WebAssembly message handlers for NATS JetStream streams.
#[derive(Debug, Parser)]
#[command(name = "mailroom", version, about, propagate_version = true)]
pub struct Cli {
    /// What to log, as a tracing filter. A bare level applies to Mailroom, with dependencies
    /// at info at most ("debug" = "info,mailroom=debug"); "info,async_nats=debug" and the
    /// like are used as written. Default: info (warn for `dev`).
    #[arg(long, env = "MAILROOM_LOG", global = true)]
    pub log: Option<String>,

    /// Log format: text or json. Default: text.
    #[arg(long, env = "MAILROOM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host: consume the configured streams until SIGINT/SIGTERM, then drain.
    Run(RunArgs),
    /// One-command demo: local nats-server, the example handlers, a producer, a summary.
    Dev(DevArgs),
    /// Run one message through a handler locally (no NATS) and print what it did.
    Invoke(InvokeArgs),
    /// Check a configuration and its modules without connecting to NATS.
    Validate(ValidateArgs),
    /// Show, from NATS alone, the hosts running each handler of a config, which partitions
    /// each owns, the backlog per partition, partitions without an owner and recent moves.
    Status(StatusArgs),
    /// Create a handler project: the handler, a unit test, a host config and a README.
    New(NewArgs),
    /// List, show and redrive dead-letter records.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Print a shell completion script: `mailroom completions bash > /etc/bash_completion.d/mailroom`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Deploy a handler through NATS: check the module as a host would, upload it, and write
    /// its spec as a new revision that watching hosts switch to.
    Deploy(crate::cli_registry::DeployArgs),
    /// List the deployed handlers, their current revision and what each host runs.
    Ls(crate::cli_registry::LsArgs),
    /// Show the revisions of a deployed handler.
    History(crate::cli_registry::HistoryArgs),
    /// Deploy an earlier revision of a handler again (the one before the latest by default).
    Rollback(crate::cli_registry::RollbackArgs),
    /// Stop a deployed handler on every host (its consumer and data stay unless --purge).
    Undeploy(crate::cli_registry::UndeployArgs),
}

/// `mailroom status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The configuration file (TOML): its [nats] section and handlers.
    #[arg(long, short, env = "MAILROOM_CONFIG")]
    pub config: PathBuf,

    /// NATS server URL(s), overriding nats.url in the config.
    #[arg(long, env = "MAILROOM_NATS_URL")]
    pub nats_url: Option<String>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `mailroom new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The handler's name (lowercase letters, digits, '-', '_'); also its directory.
    pub name: String,

    /// The language. Default: rust.
    #[arg(long, value_enum, default_value_t = NewLang::Rust)]
    pub lang: NewLang,

    /// Create it in this directory instead of ./NAME.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Rust: the mailroom-sdk dependency, as Cargo.toml writes it (e.g. '"0.2"' or
    /// '{ path = "../mailroom/sdk" }'). Default: the SDK this binary was built from, if its
    /// sources are still there, else "0.2".
    #[arg(long)]
    pub sdk: Option<String>,
}

/// Languages of `mailroom new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NewLang {
    /// Rust, with mailroom-sdk.
    Rust,
    /// Python, with componentize-py.
    Python,
    /// JavaScript, with jco's QuickJS backend.
    Js,
}

/// Exit codes of `mailroom invoke` (the other commands: 0 success, 1 failure, 2 usage).
pub mod exit {
    /// The handler succeeded.
    pub const OK: u8 = 0;
    /// Mailroom could not run it (the module does not load, a file is missing, …).
    pub const ERROR: u8 = 1;
    // 2: the command line is wrong (clap's own code for usage errors, subject and attempt
    // checks included).
    /// The handler asked for a retry or failed (trap, time-out, memory): the host would try
    /// again.
    pub const RETRY: u8 = 3;
    /// The handler rejected the message: the host would dead-letter it.
    pub const REJECT: u8 = 4;
}

/// `mailroom dlq`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead-letter records: sequence, handler, kind, attempts, original subject, error.
    Ls {
        #[command(flatten)]
        source: DlqSource,
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Show one record: every header and the payload.
    Show {
        #[command(flatten)]
        source: DlqSource,
        /// The record's sequence in the dead-letter stream (the first column of `dlq ls`).
        seq: u64,
        /// The dead-letter stream, when the handlers use several. Default: the only one.
        #[arg(long)]
        stream: Option<String>,
    },
    /// Republish records to their original subjects (original payload and headers, without
    /// the Mailroom-* ones) and delete them. Safe to run again.
    Redrive {
        #[command(flatten)]
        source: DlqSource,
        #[command(flatten)]
        filter: DlqFilter,
        /// Redrive at most this many records. Default: all that match.
        #[arg(long)]
        max: Option<usize>,
        /// Only say what would be redriven.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Where the dead letters are: the host config (its NATS connection and the handlers'
/// dead_letter subjects).
#[derive(Debug, Args)]
pub struct DlqSource {
    /// The configuration file (TOML).
    #[arg(long, short, env = "MAILROOM_CONFIG")]
    pub config: PathBuf,

    /// NATS server URL(s), overriding nats.url in the config. Default: the config's value.
    #[arg(long, env = "MAILROOM_NATS_URL")]
    pub nats_url: Option<String>,
}

/// Which records.
#[derive(Debug, Args)]
pub struct DlqFilter {
    /// Only this handler's records.
    #[arg(long)]
    pub handler: Option<String>,
    /// Only records of this error kind (reject, retry, trap, timeout, out-of-memory,
    /// stack-overflow, instantiate, exhausted, no-key).
    #[arg(long)]
    pub kind: Option<String>,
}

/// `mailroom run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file (TOML).
    #[arg(long, short, env = "MAILROOM_CONFIG")]
    pub config: PathBuf,

    /// NATS server URL(s), overriding nats.url in the config. Default: the config's value.
    #[arg(long, env = "MAILROOM_NATS_URL")]
    pub nats_url: Option<String>,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9090), overriding
    /// host.metrics_addr. Default: no endpoint.
    #[arg(long, env = "MAILROOM_METRICS_ADDR")]
    pub metrics_addr: Option<String>,

    /// How long to keep trying to reach NATS at start (e.g. 30s; 0 = forever), overriding
    /// nats.connect_timeout. Default: the config's value (30s).
    #[arg(long, env = "MAILROOM_CONNECT_TIMEOUT", value_parser = parse_timeout)]
    pub connect_timeout: Option<std::time::Duration>,

    /// Also run the handlers deployed through NATS (as [deploy] watch = true does).
    #[arg(long)]
    pub watch: bool,
}

fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    mailroom::config::parse_duration(text)
}

/// `mailroom dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// The demo configuration. Default: examples/mailroom.toml.
    #[arg(
        long,
        short,
        env = "MAILROOM_CONFIG",
        default_value = "examples/mailroom.toml"
    )]
    pub config: PathBuf,

    /// Use this NATS server instead of starting a local one. Default: start nats-server.
    #[arg(long, env = "MAILROOM_NATS_URL")]
    pub nats_url: Option<String>,

    /// Orders the producer publishes. Default: 1000.
    #[arg(long, default_value_t = 1000)]
    pub messages: u64,

    /// Subjects the orders are spread over. Default: 10.
    #[arg(long, default_value_t = 10)]
    pub subjects: u64,

    /// The producer binary. Default: `producer` next to this executable.
    #[arg(long, env = "MAILROOM_PRODUCER")]
    pub producer: Option<PathBuf>,

    /// Write the host's log (at info, or --log) to this file instead of the terminal, where
    /// only warnings and errors go by default.
    #[arg(long)]
    pub log_file: Option<PathBuf>,

    /// Keep running after the demo, reloading a handler's module whenever its file changes
    /// on disk (rebuild it with cargo), until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
}

/// `mailroom invoke`. Exit code: 0 ok, 1 could not run, 2 usage error, 3 retry or failure,
/// 4 rejected.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The handler component (.wasm). Default with --config/--handler: the handler's module.
    #[arg(required_unless_present = "handler")]
    pub module: Option<PathBuf>,

    /// The message subject: a concrete subject (no wildcards, no empty tokens).
    #[arg(long, short, value_parser = parse_subject)]
    pub subject: String,

    /// The payload: literal text (e.g. JSON), @FILE to read a file, or @- for standard input.
    /// Default: empty.
    #[arg(long, short, default_value = "")]
    pub data: String,

    /// A header, NAME=VALUE; repeat for more (a name may repeat).
    #[arg(long = "header", short = 'H', value_parser = parse_pair)]
    pub headers: Vec<(String, String)>,

    /// A handler setting, KEY=VALUE; repeat for more. Added to --handler's settings.
    #[arg(long = "setting", value_parser = parse_pair)]
    pub settings: Vec<(String, String)>,

    /// Seed a KV value before the call, BUCKET/KEY=VALUE; repeat for more.
    #[arg(long = "kv", value_parser = parse_kv)]
    pub kv: Vec<(String, String, Vec<u8>)>,

    /// The delivery attempt the handler sees, from 1. Default: 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: u32,

    /// Run the message N more times, each in a fresh instance, and print the steady-state time
    /// per message. Default: 0.
    #[arg(long, default_value_t = 0)]
    pub repeat: u32,

    /// Take grants, settings and limits from this config... Default: everything granted.
    #[arg(long, requires = "handler")]
    pub config: Option<PathBuf>,

    /// ...for this handler of --config.
    #[arg(long, requires = "config")]
    pub handler: Option<String>,
}

/// `mailroom validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The configuration file (TOML).
    #[arg(long, short, env = "MAILROOM_CONFIG")]
    pub config: PathBuf,

    /// Also check what only the server can tell (streams exist, filters select messages,
    /// dead letters are stored and do not loop, the version supports partitions), connecting
    /// to this URL with the config's credentials.
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{text:?} has an empty name"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn parse_subject(text: &str) -> Result<String, String> {
    mailroom::invoke::validate_message_subject(text)?;
    Ok(text.to_owned())
}

fn parse_kv(text: &str) -> Result<(String, String, Vec<u8>), String> {
    let (path, value) = parse_pair(text)?;
    let (bucket, key) = path
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not BUCKET/KEY=VALUE"))?;
    Ok((bucket.to_owned(), key.to_owned(), value.into_bytes()))
}

/// The config `mailroom run` runs: the file with the command line's overrides. Loaded before
/// logging is installed, since `[telemetry]` decides where spans go.
pub fn run_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = Config::load_with(&args.config, args.watch)?;
    if let Some(url) = &args.nats_url {
        config.nats.url = url.clone();
    }
    if let Some(addr) = &args.metrics_addr {
        config.host.metrics_addr = Some(addr.clone());
    }
    if let Some(timeout) = args.connect_timeout {
        config.nats.connect_timeout = (!timeout.is_zero()).then_some(timeout);
    }
    Ok(config)
}

/// Runs the parsed command; `run_config` is [`run_config`]'s result for `mailroom run`.
pub async fn run(cli: Cli, run_config: Option<Config>) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let config = match run_config {
                Some(config) => config,
                None => self::run_config(&args)?,
            };
            mailroom::host::run_until_signal(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(args) => {
            let report = mailroom::dev::run(
                mailroom::dev::DevOptions {
                    config: args.config,
                    nats_url: args.nats_url,
                    messages: args.messages,
                    subjects: args.subjects,
                    producer: args.producer,
                    log_file: args.log_file,
                    watch: args.watch,
                },
                &mut |line| println!("{line}"),
            )
            .await?;
            if !args.watch {
                println!("{report}");
            }
            Ok(if report.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Invoke(args) => match invoke(args).await {
            Ok(code) => Ok(code),
            Err(err) => {
                eprintln!("error: {err:#}");
                Ok(ExitCode::from(exit::ERROR))
            }
        },
        Command::New(args) => new(args),
        Command::Deploy(args) => crate::cli_registry::deploy(args).await,
        Command::Ls(args) => crate::cli_registry::ls(args).await,
        Command::History(args) => crate::cli_registry::history(args).await,
        Command::Rollback(args) => crate::cli_registry::rollback(args).await,
        Command::Undeploy(args) => crate::cli_registry::undeploy(args).await,
        Command::Status(args) => {
            let mut config = Config::load(&args.config)?;
            if let Some(url) = args.nats_url {
                config.nats.url = url;
            }
            let client = mailroom::connect::connect(&config.nats).await?;
            let js = async_nats::jetstream::new(client);
            let report = mailroom::fleet::status(&js, &config).await;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for handler in &report {
                    println!("{handler}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate(args) => {
            let mut config = Config::load(&args.config)?;
            let mut summary = mailroom::validate::validate(&config)?;
            if let Some(url) = args.server {
                config.nats.url = url;
                let client = mailroom::connect::connect(&config.nats).await?;
                let js = async_nats::jetstream::new(client);
                summary.extend(mailroom::validate::validate_with_server(&config, &js).await?);
            }
            println!("{} is valid:", args.config.display());
            for line in summary {
                println!("  {line}");
            }
            for warning in &config.warnings {
                println!("  warning: {warning}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(command) => crate::dlq_cli::run(command).await,
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "mailroom",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn new(args: NewArgs) -> anyhow::Result<ExitCode> {
    use mailroom::template::{self, Lang, NewProject};
    let lang = match args.lang {
        NewLang::Rust => Lang::Rust,
        NewLang::Python => Lang::Python,
        NewLang::Js => Lang::Js,
    };
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let files = template::create(&NewProject {
        name: args.name.clone(),
        lang,
        dir: dir.clone(),
        sdk: args.sdk,
    })?;
    println!(
        "created {} ({:?}): {}",
        dir.display(),
        args.lang,
        files.join(", ")
    );
    println!("next: see {}", dir.join("README.md").display());
    Ok(ExitCode::SUCCESS)
}

fn read_data(data: String) -> anyhow::Result<Vec<u8>> {
    match data.as_str() {
        "@-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                .context("reading --data from standard input")?;
            Ok(buf)
        }
        _ => match data.strip_prefix('@') {
            Some(path) => {
                std::fs::read(path).with_context(|| format!("reading --data file {path}"))
            }
            None => Ok(data.into_bytes()),
        },
    }
}

async fn invoke(args: InvokeArgs) -> anyhow::Result<ExitCode> {
    use mailroom::runtime::Outcome;
    let payload = read_data(args.data)?;
    let (handler, cache_dir) = match (&args.config, &args.handler) {
        (Some(path), Some(name)) => {
            let config = Config::load(path)?;
            let Some(h) = config.handlers.iter().find(|h| &h.name == name) else {
                let names: Vec<&str> = config.handlers.iter().map(|h| h.name.as_str()).collect();
                bail!(
                    "{} has no handler named {name:?} (it has: {})",
                    path.display(),
                    names.join(", ")
                );
            };
            (Some(h.clone()), config.host.cache_dir.clone())
        }
        _ => (None, mailroom::config::default_cache_dir()),
    };
    let module = match (args.module, &handler) {
        (Some(module), _) => module,
        (None, Some(h)) => h.module.clone(),
        (None, None) => bail!("give the module to run, or --config and --handler"),
    };
    let report = mailroom::invoke::invoke(mailroom::invoke::InvokeRequest {
        module,
        subject: args.subject,
        payload,
        headers: args.headers,
        attempt: args.attempt,
        handler,
        settings: args.settings.into_iter().collect::<BTreeMap<_, _>>(),
        kv_seed: args.kv,
        cache_dir,
        repeat: args.repeat,
    })
    .await?;
    print!("{report}");
    Ok(ExitCode::from(match report.invoked.outcome {
        Outcome::Success => exit::OK,
        Outcome::Reject { .. } => exit::REJECT,
        Outcome::Retry { .. } | Outcome::Failed(_) => exit::RETRY,
    }))
}
