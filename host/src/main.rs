//! The `mailroom` binary: installs logging (and, when configured, OTLP trace export), then
//! runs the command line.

mod cli;
mod cli_registry;
mod dlq_cli;

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser;
use mailroom::config::TelemetryConfig;
use mailroom::trace::export::Exporter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // `run` reads its config first: `[telemetry]` decides whether spans are exported.
    let run_config = match &cli.command {
        cli::Command::Run(args) => match cli::run_config(args) {
            Ok(config) => Some(config),
            Err(err) => {
                eprintln!("error: {err:#}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = match &cli.command {
        cli::Command::Run(_) => run_config.as_ref().map(|c| c.telemetry.clone()),
        // The demo exports when the OTEL_EXPORTER_OTLP_* variables ask for it.
        cli::Command::Dev(_) => Some(TelemetryConfig::default()),
        _ => None,
    };
    let exporter = match install_logging(&cli, telemetry.as_ref(), runtime.handle().clone()) {
        Ok(exporter) => exporter,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(cli, run_config));
    // After the host stopped, while the runtime still runs the exporter's requests.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Installs the log output (stderr, or `mailroom dev --log-file`) and, when `telemetry` asks
/// for it, the OTLP layer.
fn install_logging(
    cli: &cli::Cli,
    telemetry: Option<&TelemetryConfig>,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<Option<Exporter>> {
    let (default, writer, ansi) = match &cli.command {
        cli::Command::Dev(args) => match &args.log_file {
            Some(path) => {
                let file = std::fs::File::create(path).map_err(|err| {
                    anyhow::anyhow!("cannot write the log file {}: {err}", path.display())
                })?;
                (
                    "info",
                    BoxMakeWriter::new(std::sync::Mutex::new(file)),
                    false,
                )
            }
            // The demo's own report is the point; the host speaks up only when it must.
            None => ("warn", BoxMakeWriter::new(std::io::stderr), colour()),
        },
        _ => ("info", BoxMakeWriter::new(std::io::stderr), colour()),
    };
    let spec = filter_spec(cli.log.as_deref(), default);
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|err| {
        eprintln!("warning: --log {spec:?} is not a valid filter ({err}); using {default:?}");
        EnvFilter::new(default)
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let fmt = match cli.log_format {
        cli::LogFormat::Text => fmt.boxed(),
        cli::LogFormat::Json => fmt.json().boxed(),
    }
    .with_filter(filter);
    let otel = match telemetry {
        Some(t) => mailroom::trace::export::layer(t, runtime)?,
        None => None,
    };
    let (otel, exporter) = otel.unzip();
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(exporter)
}

/// Colour only for a terminal, and never when `NO_COLOR` is set (to anything but "").
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The tracing filter for `--log`: a bare `debug` or `trace` is meant for Mailroom, so
/// dependencies stay at info; anything else (`warn`, `info,async_nats=debug`, ...) is used
/// as written.
fn filter_spec(log: Option<&str>, default: &str) -> String {
    let spec = log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(default);
    match spec.to_ascii_lowercase().as_str() {
        level @ ("debug" | "trace") => format!("info,mailroom={level}"),
        _ => spec.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::filter_spec;

    #[test]
    fn a_bare_verbose_level_is_for_mailroom_only() {
        assert_eq!(filter_spec(Some("debug"), "info"), "info,mailroom=debug");
        assert_eq!(filter_spec(Some("TRACE"), "info"), "info,mailroom=trace");
        assert_eq!(filter_spec(Some("warn"), "info"), "warn");
        assert_eq!(
            filter_spec(Some("info,async_nats=debug"), "info"),
            "info,async_nats=debug"
        );
        assert_eq!(filter_spec(None, "warn"), "warn");
        assert_eq!(filter_spec(Some(" "), "info"), "info");
    }
}
