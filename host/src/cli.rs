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
    /// What to log, as a tracing filter (e.g. "info", "mailroom=debug"). Default: info.
    #[arg(long, env = "MAILROOM_LOG", default_value = "info", global = true)]
    pub log: String,

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
}

/// `mailroom invoke`.
#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The handler component (.wasm).
    pub module: PathBuf,

    /// The message subject.
    #[arg(long, short)]
    pub subject: String,

    /// The payload: literal text (e.g. JSON), or @FILE to read a file. Default: empty.
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

    /// The delivery attempt the handler sees. Default: 1.
    #[arg(long, default_value_t = 1)]
    pub attempt: u32,

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

fn parse_kv(text: &str) -> Result<(String, String, Vec<u8>), String> {
    let (path, value) = parse_pair(text)?;
    let (bucket, key) = path
        .split_once('/')
        .ok_or_else(|| format!("{text:?} is not BUCKET/KEY=VALUE"))?;
    Ok((bucket.to_owned(), key.to_owned(), value.into_bytes()))
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => {
            let mut config = Config::load(&args.config)?;
            if let Some(url) = args.nats_url {
                config.nats.url = url;
            }
            if let Some(addr) = args.metrics_addr {
                config.host.metrics_addr = Some(addr);
            }
            mailroom::host::run_until_signal(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(args) => {
            let report = mailroom::dev::run(mailroom::dev::DevOptions {
                config: args.config,
                nats_url: args.nats_url,
                messages: args.messages,
                subjects: args.subjects,
                producer: args.producer,
            })
            .await?;
            println!("{report}");
            Ok(if report.complete() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Invoke(args) => invoke(args).await,
        Command::Validate(args) => {
            let config = Config::load(&args.config)?;
            let summary = mailroom::host::validate(&config)?;
            println!("{} is valid:", args.config.display());
            for line in summary {
                println!("  {line}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn invoke(args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let payload = match args.data.strip_prefix('@') {
        Some(path) => std::fs::read(path).with_context(|| format!("reading --data file {path}"))?,
        None => args.data.into_bytes(),
    };
    let (handler, cache_dir) = match (&args.config, &args.handler) {
        (Some(path), Some(name)) => {
            let config = Config::load(path)?;
            let Some(h) = config.handlers.iter().find(|h| &h.name == name) else {
                bail!("{} has no handler named {name:?}", path.display());
            };
            (Some(h.clone()), config.host.cache_dir.clone())
        }
        _ => (None, mailroom::config::default_cache_dir()),
    };
    let report = mailroom::invoke::invoke(mailroom::invoke::InvokeRequest {
        module: args.module,
        subject: args.subject,
        payload,
        headers: args.headers,
        attempt: args.attempt,
        handler,
        settings: args.settings.into_iter().collect::<BTreeMap<_, _>>(),
        kv_seed: args.kv,
        cache_dir,
    })
    .await?;
    print!("{report}");
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
