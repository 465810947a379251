//! `[telemetry]`: where the host's trace spans go.

use anyhow::bail;

use super::raw;

/// Trace export settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP traces URL (`http://collector:4318/v1/traces`), from `otlp_endpoint`.
    /// `None`: spans are exported only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not at all otherwise.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` resource attribute of exported spans. `None`: `OTEL_SERVICE_NAME`,
    /// else `mailroom`.
    pub service_name: Option<String>,
}

pub(super) fn convert_telemetry(t: raw::RawTelemetry) -> anyhow::Result<TelemetryConfig> {
    let otlp_endpoint = t
        .otlp_endpoint
        .map(|e| traces_url(&e).map_err(|err| anyhow::anyhow!("telemetry: otlp_endpoint: {err}")))
        .transpose()?;
    let service_name = t.service_name;
    if service_name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        bail!("telemetry: service_name is empty; leave it out for \"mailroom\"");
    }
    Ok(TelemetryConfig {
        otlp_endpoint,
        service_name,
    })
}

/// The traces URL for an OTLP/HTTP endpoint given as a base URL, the way
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is written: `/v1/traces` is appended unless already there.
pub fn traces_url(endpoint: &str) -> Result<String, String> {
    let endpoint = endpoint.trim();
    if endpoint.starts_with("https://") {
        return Err(format!(
            "{endpoint:?} uses https, which this build does not export to; send spans to a \
             local OpenTelemetry Collector (or agent) over http://, e.g. \"http://127.0.0.1:4318\""
        ));
    }
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err(format!(
            "{endpoint:?} is not an http:// URL; write e.g. \"http://127.0.0.1:4318\" (OTLP over \
             HTTP with protobuf, port 4318 by default)"
        ));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("{endpoint:?} has no host"));
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_become_traces_urls() {
        assert_eq!(
            traces_url("http://otel:4318").unwrap(),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://otel:4318/").unwrap(),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://otel:4318/v1/traces").unwrap(),
            "http://otel:4318/v1/traces"
        );
        assert!(traces_url("https://otel:4318")
            .unwrap_err()
            .contains("local OpenTelemetry Collector"));
        assert!(traces_url("otel:4317").unwrap_err().contains("http://"));
        assert!(traces_url("http://").is_err());
    }
}
