//! W3C Trace Context (`traceparent`, `tracestate`): parse, derive a child, format.
//!
//! Pure and allocation-free except for formatting. Follows the W3C recommendation: a
//! `traceparent` that does not parse is ignored (the message starts a new trace), and so is
//! its `tracestate`; ids are lowercase hex and never all zeros; a version above `00` may carry
//! more fields after the four this version knows, version `ff` is invalid.

use std::fmt;

/// The `traceparent` of a message: the trace it belongs to, the span that sent it, the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace id, 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The id of the span that sent the message (this message's parent), not all zero.
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

/// `tracestate` values longer than this are dropped rather than propagated, as the W3C text
/// allows (it asks vendors to propagate at least 512 characters).
pub const MAX_TRACESTATE: usize = 512;

impl TraceParent {
    /// Parses a `traceparent` header value; `None` when it is not a valid one.
    pub fn parse(value: &str) -> Option<TraceParent> {
        let v = value.trim().as_bytes();
        if v.len() < 55 {
            return None;
        }
        let version = hex_byte(&v[0..2])?;
        if version == 0xff || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        // Version 00 has exactly four fields; later versions may append "-more".
        if (version == 0 && v.len() != 55) || (v.len() > 55 && v[55] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&v[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0u8; 8];
        for (i, b) in parent_id.iter_mut().enumerate() {
            *b = hex_byte(&v[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&v[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The context a message sent by span `span_id` of this trace carries: same trace, same
    /// flags, `span_id` as the parent.
    pub fn child(&self, span_id: [u8; 8]) -> TraceParent {
        TraceParent {
            parent_id: span_id,
            ..*self
        }
    }

    /// Whether the sender sampled this trace (flag bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    /// Version `00`, whatever version was parsed: a sender only writes the version it knows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("00-")?;
        for b in self.trace_id {
            write!(f, "{b:02x}")?;
        }
        f.write_str("-")?;
        for b in self.parent_id {
            write!(f, "{b:02x}")?;
        }
        write!(f, "-{:02x}", self.flags)
    }
}

/// A new random span id (never all zero).
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// Combines the values of the `tracestate` headers (several are joined with `,`, in order);
/// `None` when there are none, or when the result is too long or not printable ASCII.
pub fn tracestate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut out = String::new();
    for v in values {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(v);
    }
    let printable = out.bytes().all(|b| (0x20..0x7f).contains(&b));
    (!out.is_empty() && out.len() <= MAX_TRACESTATE && printable).then_some(out)
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(nibble(two[0])? << 4 | nibble(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_w3c_example() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(tp.trace_id[0], 0x4b);
        assert_eq!(
            tp.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(tp.sampled());
        assert_eq!(tp.to_string(), EXAMPLE);
    }

    #[test]
    fn a_child_keeps_trace_and_flags_and_names_its_parent() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        let id = new_span_id();
        let child = tp.child(id);
        assert_eq!((child.trace_id, child.flags), (tp.trace_id, tp.flags));
        assert_eq!(child.parent_id, id);
        assert_ne!(child.parent_id, [0; 8]);
        let text = child.to_string();
        assert!(text.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_eq!(TraceParent::parse(&text), Some(child));
    }

    #[test]
    fn invalid_values_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn later_versions_may_carry_more_fields() {
        let v = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes-next";
        let tp = TraceParent::parse(v).unwrap();
        assert!(!tp.sampled());
        assert!(
            tp.to_string().starts_with("00-"),
            "we write the version we know"
        );
        assert_eq!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00x"),
            None
        );
    }

    #[test]
    fn tracestate_values_are_joined_and_bounded() {
        assert_eq!(tracestate([]), None);
        assert_eq!(
            tracestate(["congo=t61rcWkgMzE"]).as_deref(),
            Some("congo=t61rcWkgMzE")
        );
        assert_eq!(
            tracestate(["rojo=00f067aa0ba902b7", " congo=t61rcWkgMzE "]).as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
        );
        assert_eq!(tracestate([&"a=b,".repeat(200)[..]]), None);
        assert_eq!(tracestate(["a=\u{7}"]), None);
    }
}
