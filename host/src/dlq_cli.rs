//! `mailroom dlq ls | show | redrive`: the dead-letter commands' output (the work is in the
//! library's `dlq` module).

use std::process::ExitCode;

use mailroom::config::Config;
use mailroom::dlq::{self, Filter, Record};

use crate::cli::{DlqCommand, DlqFilter, DlqSource};

/// Runs a `mailroom dlq` command.
pub async fn run(command: DlqCommand) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::Ls { source, filter } => {
            let filter = filter_of(filter);
            let (config, js) = connect(&source, &filter).await?;
            let records = dlq::list(&js, &config, &filter).await?;
            print_table(&records);
        }
        DlqCommand::Show {
            source,
            seq,
            stream,
        } => {
            let (config, js) = connect(&source, &Filter::default()).await?;
            let record = dlq::show(&js, &config, seq, stream.as_deref()).await?;
            print_record(&record);
        }
        DlqCommand::Redrive {
            source,
            filter,
            max,
            dry_run,
        } => {
            let filter = filter_of(filter);
            let (config, js) = connect(&source, &filter).await?;
            let report = dlq::redrive(&js, &config, &filter, max, dry_run).await?;
            let verb = if dry_run { "would redrive" } else { "redrove" };
            for (record, target, duplicate) in &report.records {
                let note = if *duplicate {
                    " (already there: a repeated redrive)"
                } else {
                    ""
                };
                println!(
                    "{verb} {}:{} ({}, {}) to {target}{note}",
                    record.stream,
                    record.sequence,
                    record.handler(),
                    record.kind()
                );
            }
            for (record, reason) in &report.skipped {
                println!("skipped {}:{}: {reason}", record.stream, record.sequence);
            }
            println!(
                "{} record(s) {verb}{}",
                report.records.len(),
                if dry_run { "" } else { " and deleted" }
            );
            if !report.also_consumed_by.is_empty() {
                println!(
                    "note: {} also consume(s) those subjects and will see the redriven messages too",
                    report.also_consumed_by.join(", ")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn filter_of(f: DlqFilter) -> Filter {
    Filter {
        handler: f.handler,
        kind: f.kind,
    }
}

/// Loads the config, checks `filter` against it, and connects.
async fn connect(
    source: &DlqSource,
    filter: &Filter,
) -> anyhow::Result<(Config, async_nats::jetstream::Context)> {
    let mut config = Config::load(&source.config)?;
    filter.check(&config)?;
    if let Some(url) = &source.nats_url {
        config.nats.url = url.clone();
    }
    let client = mailroom::connect::connect(&config.nats).await?;
    Ok((config, async_nats::jetstream::new(client)))
}

fn print_table(records: &[Record]) {
    if records.is_empty() {
        println!("no dead-letter records");
        return;
    }
    println!(
        "{:<14} {:>6}  {:<12} {:<14} {:>8}  {:<20} {:<20}  error",
        "stream", "seq", "handler", "kind", "attempts", "subject", "stored"
    );
    for r in records {
        let error: String = r.error().chars().take(80).collect();
        println!(
            "{:<14} {:>6}  {:<12} {:<14} {:>8}  {:<20} {:<20}  {error}",
            r.stream,
            r.sequence,
            r.handler(),
            r.kind(),
            r.attempts(),
            r.original_subject().unwrap_or("?"),
            humantime::format_rfc3339_seconds(r.stored).to_string(),
        );
    }
    println!("{} record(s)", records.len());
}

fn print_record(r: &Record) {
    let (stream, seq) = r.original();
    println!(
        "record {} of stream {} ({})",
        r.sequence, r.stream, r.subject
    );
    println!("stored:   {}", humantime::format_rfc3339_seconds(r.stored));
    println!("handler:  {}", r.handler());
    println!("kind:     {}", r.kind());
    println!("attempts: {}", r.attempts());
    println!(
        "original: {} (stream {}, sequence {})",
        r.original_subject().unwrap_or("?"),
        stream.unwrap_or("?"),
        seq.unwrap_or("?")
    );
    println!("error:    {}", r.error());
    println!("headers:");
    let mut names: Vec<(&str, Vec<&str>)> = r
        .headers
        .iter()
        .map(|(n, v)| (n.as_ref(), v.iter().map(|v| v.as_str()).collect()))
        .collect();
    names.sort();
    for (name, values) in names {
        for value in values {
            println!("  {name}: {value}");
        }
    }
    match std::str::from_utf8(&r.payload) {
        Ok(text) => println!("payload ({} bytes):\n{text}", r.payload.len()),
        Err(_) => println!(
            "payload ({} bytes, binary; first 64 as hex): {}",
            r.payload.len(),
            r.payload
                .iter()
                .take(64)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
    }
}
