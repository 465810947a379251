//! Ordering keys: which messages must run one at a time, in order.
//!
//! Messages with the same key run serially in stream order; different keys run in parallel.
//! A key borrows from the message (the subject, a contiguous run of its tokens, or a header
//! value), so computing it allocates nothing.

use std::fmt;

/// How a handler derives the ordering key of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ordering {
    /// No ordering: every message may run concurrently with any other.
    None,
    /// The whole subject is the key (the default).
    Subject,
    /// Tokens `first..=last` of the subject (1-based; `last` `None` means to the end).
    SubjectTokens {
        /// First token, 1-based.
        first: usize,
        /// Last token, inclusive; `None` for the rest of the subject.
        last: Option<usize>,
    },
    /// The first value of a header.
    Header(String),
}

/// What to do with a message whose key cannot be computed (missing header, too few tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingKey {
    /// Dead-letter it at once with a reason naming the missing key (the default).
    DeadLetter,
    /// Order it by its subject instead.
    Subject,
}

impl Ordering {
    /// Parses `"none"`, `"subject"`, `"subject-tokens:2..3"`, `"subject-tokens:2.."` or
    /// `"header:Order-Key"`.
    pub fn parse(text: &str) -> Result<Ordering, String> {
        let explain = || {
            format!(
                "{text:?} is not an ordering; use \"subject\" (default), \"none\", \
                 \"subject-tokens:A..B\" (1-based, inclusive; \"A..\" to the end) or \
                 \"header:NAME\""
            )
        };
        match text.trim() {
            "none" => return Ok(Ordering::None),
            "subject" => return Ok(Ordering::Subject),
            _ => {}
        }
        if let Some(range) = text.trim().strip_prefix("subject-tokens:") {
            let (a, b) = range.split_once("..").ok_or_else(explain)?;
            let first: usize = a.trim().parse().map_err(|_| explain())?;
            let last = match b.trim() {
                "" => None,
                b => Some(b.parse::<usize>().map_err(|_| explain())?),
            };
            if first == 0 || last.is_some_and(|l| l < first) {
                return Err(format!(
                    "{text:?}: token ranges are 1-based and the end may not come before the start"
                ));
            }
            return Ok(Ordering::SubjectTokens { first, last });
        }
        if let Some(name) = text.trim().strip_prefix("header:") {
            let name = name.trim();
            if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
                return Err(format!(
                    "{text:?}: the header name is empty or not a valid name"
                ));
            }
            return Ok(Ordering::Header(name.to_owned()));
        }
        Err(explain())
    }

    /// Whether messages are ordered at all.
    pub fn is_ordered(&self) -> bool {
        *self != Ordering::None
    }

    /// The key of a message: `Ok(None)` when unordered, `Err` when the key cannot be computed.
    /// `header` looks up the first value of a header by name.
    pub fn key<'a>(
        &self,
        subject: &'a str,
        header: impl FnOnce(&str) -> Option<&'a str>,
    ) -> Result<Option<&'a str>, KeyError> {
        match self {
            Ordering::None => Ok(None),
            Ordering::Subject => Ok(Some(subject)),
            Ordering::SubjectTokens { first, last } => {
                token_range(subject, *first, *last).map(Some).ok_or_else(|| {
                    KeyError(format!(
                        "subject {subject} has fewer than {first} tokens, so ordering {} cannot \
                         take its key",
                        self
                    ))
                })
            }
            Ordering::Header(name) => match header(name) {
                Some(value) if !value.is_empty() => Ok(Some(value)),
                _ => Err(KeyError(format!(
                    "message has no {name} header, which ordering = \"header:{name}\" needs as its key"
                ))),
            },
        }
    }
}

impl fmt::Display for Ordering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ordering::None => f.write_str("none"),
            Ordering::Subject => f.write_str("subject"),
            Ordering::SubjectTokens { first, last: None } => write!(f, "subject-tokens:{first}.."),
            Ordering::SubjectTokens {
                first,
                last: Some(last),
            } => write!(f, "subject-tokens:{first}..{last}"),
            Ordering::Header(name) => write!(f, "header:{name}"),
        }
    }
}

/// Why a key could not be computed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub String);

/// Tokens `first..=last` (1-based) of `subject` as one contiguous slice; the range is cut at
/// the subject's end; `None` if the subject has fewer than `first` tokens.
fn token_range(subject: &str, first: usize, last: Option<usize>) -> Option<&str> {
    let mut start = None;
    let mut token = 1;
    if first == 1 {
        start = Some(0);
    }
    for (i, b) in subject.bytes().enumerate() {
        if b == b'.' {
            if Some(token) == last {
                return start.map(|s| &subject[s..i]);
            }
            token += 1;
            if token == first {
                start = Some(i + 1);
            }
        }
    }
    start.map(|s| &subject[s..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ordering: &str, subject: &str) -> Result<Option<String>, KeyError> {
        Ordering::parse(ordering)
            .unwrap()
            .key(subject, |_| None)
            .map(|k| k.map(str::to_owned))
    }

    #[test]
    fn parses_and_displays_every_form() {
        for text in [
            "none",
            "subject",
            "subject-tokens:2..3",
            "subject-tokens:2..",
            "header:Order-Key",
        ] {
            assert_eq!(Ordering::parse(text).unwrap().to_string(), text);
        }
        assert!(Ordering::parse("random")
            .unwrap_err()
            .contains("is not an ordering"));
        assert!(Ordering::parse("subject-tokens:0..1").is_err());
        assert!(Ordering::parse("subject-tokens:3..2").is_err());
        assert!(Ordering::parse("header:").is_err());
    }

    #[test]
    fn subject_token_ranges() {
        assert_eq!(
            key("subject-tokens:2..3", "orders.eu.fr.42")
                .unwrap()
                .unwrap(),
            "eu.fr"
        );
        assert_eq!(
            key("subject-tokens:1..1", "orders.eu.fr").unwrap().unwrap(),
            "orders"
        );
        assert_eq!(
            key("subject-tokens:2..", "orders.eu.fr.42")
                .unwrap()
                .unwrap(),
            "eu.fr.42"
        );
        assert_eq!(
            key("subject-tokens:3..9", "a.b.c.d").unwrap().unwrap(),
            "c.d"
        );
        assert_eq!(key("subject-tokens:4..4", "a.b.c.d").unwrap().unwrap(), "d");
        let err = key("subject-tokens:5..", "a.b.c").unwrap_err();
        assert!(err.0.contains("fewer than 5 tokens"), "{err:?}");
    }

    #[test]
    fn subject_and_none() {
        assert_eq!(key("subject", "a.b").unwrap().unwrap(), "a.b");
        assert_eq!(key("none", "a.b").unwrap(), None);
    }

    #[test]
    fn header_keys() {
        let o = Ordering::parse("header:Order-Key").unwrap();
        assert_eq!(
            o.key("s", |name| (name == "Order-Key").then_some("o-1"))
                .unwrap(),
            Some("o-1")
        );
        let err = o.key("s", |_| None).unwrap_err();
        assert!(err.0.contains("no Order-Key header"), "{err:?}");
        assert!(
            o.key("s", |_| Some("")).is_err(),
            "an empty value is no key"
        );
    }
}
