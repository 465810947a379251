//! Human-readable durations ("5s", "250ms", "2m") and sizes ("64MiB", "512KiB", "1000").

use std::time::Duration;

/// Parses a duration such as `"5s"`, `"250ms"`, `"1m 30s"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|err| {
        format!("{text:?} is not a duration ({err}); write e.g. \"500ms\", \"5s\", \"2m\"")
    })
}

/// Parses a size in bytes: a number with an optional unit, `B`, `KB`/`MB`/`GB` (powers of
/// 1000) or `KiB`/`MiB`/`GiB` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let explain =
        || format!("{text:?} is not a size; write e.g. \"64MiB\", \"512KiB\", \"1000000\"");
    let number: u64 = number.parse().map_err(|_| explain())?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(explain()),
    };
    number.checked_mul(factor).ok_or_else(explain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(
            parse_duration(" 250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        let err = parse_duration("five seconds").unwrap_err();
        assert!(err.contains("\"five seconds\" is not a duration"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("2MB").unwrap(), 2_000_000);
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("is not a size"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
