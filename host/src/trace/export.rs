//! OTLP export of the host's spans, with the OpenTelemetry crates.
//!
//! Nothing is exported unless an endpoint is configured (`[telemetry] otlp_endpoint`) or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set. Then
//! [`layer`] returns a `tracing` layer that turns Mailroom's spans (the per-message span and
//! the spans around it) into OpenTelemetry spans, batched and sent over OTLP/HTTP (protobuf)
//! by the SDK's batch processor. Only the binary installs it (with the subscriber).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::TelemetryConfig;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (a layer from [`layer`] is installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The environment variables that, set, turn export on without a config entry.
const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Whether export is asked for by `config` or the environment.
pub fn requested(config: &TelemetryConfig) -> bool {
    config.otlp_endpoint.is_some()
        || ENDPOINT_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

/// The running exporter. Call [`Exporter::shutdown`] once the host has stopped, while the
/// tokio runtime still runs, so the last spans go out.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Sends what is still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("warning: the last trace spans may not have been exported: {err}");
        }
    }
}

/// The OTLP layer, when [`requested`]; `None` otherwise. `runtime` runs the HTTP requests (the
/// SDK's batch processor exports from a thread of its own).
pub fn layer<S>(
    config: &TelemetryConfig,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<Option<(impl Layer<S>, Exporter)>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    if !requested(config) {
        return Ok(None);
    }
    let client = OnRuntime {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(
            Duration::from_secs(10),
            None,
        ),
        runtime,
    };
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client);
    if let Some(url) = &config.otlp_endpoint {
        exporter = exporter.with_endpoint(url.as_str());
    } else {
        // The SDK reads the variables itself; refuse what this build cannot send to.
        for var in ENDPOINT_VARS {
            if let Some(value) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
                crate::config::traces_url(&value).map_err(|err| anyhow::anyhow!("{var}: {err}"))?;
            }
        }
    }
    let exporter = exporter
        .build()
        .context("setting up the OTLP trace exporter")?;
    let mut resource = Resource::builder();
    match &config.service_name {
        Some(name) => resource = resource.with_service_name(name.clone()),
        None if std::env::var_os("OTEL_SERVICE_NAME").is_none() => {
            resource = resource.with_service_name("mailroom")
        }
        None => {}
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("mailroom");
    // Mailroom's own spans at info and above; dependencies' spans are not exported.
    let filter = Targets::new()
        .with_target("mailroom", LevelFilter::INFO)
        .with_default(LevelFilter::OFF);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some((layer, Exporter { provider })))
}

/// An HTTP client whose requests run on the host's tokio runtime: the batch processor calls
/// it from its own thread, where hyper would find no reactor.
#[derive(Debug)]
struct OnRuntime {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

impl HttpClient for OnRuntime {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        let client = self.client.clone();
        let task = self
            .runtime
            .spawn(async move { client.send_bytes(request).await });
        Box::pin(async move { task.await.map_err(|err| Box::new(err) as HttpError)? })
    }
}
