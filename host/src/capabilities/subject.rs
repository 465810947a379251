//! NATS subjects and subject patterns, as the capability grants use them.
//!
//! A subject is a dot-separated list of non-empty tokens without whitespace. A pattern may use
//! `*` for exactly one token and a final `>` for one or more tokens, as NATS does.

use std::fmt;

/// Why a subject or pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSubject(String);

impl fmt::Display for InvalidSubject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidSubject {}

/// Checks that `subject` can be published to: non-empty tokens, no whitespace, no wildcards.
pub fn validate_publish_subject(subject: &str) -> Result<(), InvalidSubject> {
    validate(subject, false)
}

fn validate(subject: &str, wildcards: bool) -> Result<(), InvalidSubject> {
    if subject.is_empty() {
        return Err(InvalidSubject("subject is empty".into()));
    }
    if subject.chars().any(char::is_whitespace) {
        return Err(InvalidSubject(format!("{subject:?} contains whitespace")));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(InvalidSubject(format!("{subject:?} has an empty token")));
        }
        let wildcard = *token == "*" || *token == ">";
        if wildcard && !wildcards {
            return Err(InvalidSubject(format!(
                "{subject:?} contains the wildcard {token:?}: publish to a concrete subject"
            )));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(InvalidSubject(format!(
                "{subject:?}: '>' may only be the last token"
            )));
        }
    }
    Ok(())
}

/// A subject pattern such as `orders.*.created` or `audit.>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectPattern {
    pattern: String,
}

impl SubjectPattern {
    /// Parses a pattern; wildcards `*` and a final `>` are allowed.
    pub fn parse(pattern: &str) -> Result<SubjectPattern, InvalidSubject> {
        validate(pattern, true)?;
        Ok(SubjectPattern {
            pattern: pattern.to_owned(),
        })
    }

    /// Whether the concrete `subject` matches this pattern.
    pub fn matches(&self, subject: &str) -> bool {
        let mut pattern = self.pattern.split('.');
        let mut subject = subject.split('.');
        loop {
            match (pattern.next(), subject.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(p), Some(s)) if p == s => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether some concrete subject matches both patterns.
    pub fn overlaps(&self, other: &SubjectPattern) -> bool {
        let mut a = self.pattern.split('.');
        let mut b = other.pattern.split('.');
        loop {
            match (a.next(), b.next()) {
                (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
                (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
                (Some(x), Some(y)) if x == y => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Whether every subject this pattern matches is matched by `other` too.
    pub fn within(&self, other: &SubjectPattern) -> bool {
        let mut a = self.pattern.split('.');
        let mut b = other.pattern.split('.');
        loop {
            match (a.next(), b.next()) {
                (Some(_), Some(">")) => return true,
                (Some(">"), _) => return false,
                (Some(_), Some("*")) => {}
                (Some(x), Some(y)) if x == y => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

impl fmt::Display for SubjectPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

/// Checks a KV key the way JetStream does: letters, digits and `-/_=.`, not starting or ending
/// with `.`.
pub fn is_valid_kv_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_like_nats() {
        let p = SubjectPattern::parse("orders.*.created").unwrap();
        assert!(p.matches("orders.eu.created"));
        assert!(!p.matches("orders.eu.deleted"));
        assert!(!p.matches("orders.eu.created.x"));
        assert!(!p.matches("orders.created"));
        let p = SubjectPattern::parse("audit.>").unwrap();
        assert!(p.matches("audit.a"));
        assert!(p.matches("audit.a.b.c"));
        assert!(!p.matches("audit"));
        let p = SubjectPattern::parse(">").unwrap();
        assert!(p.matches("anything.at.all"));
        let p = SubjectPattern::parse("exact.subject").unwrap();
        assert!(p.matches("exact.subject"));
        assert!(!p.matches("exact.subjects"));
    }

    #[test]
    fn overlap_and_containment() {
        let p = |s: &str| SubjectPattern::parse(s).unwrap();
        assert!(p("orders.>").overlaps(&p("orders.eu")));
        assert!(p("orders.*").overlaps(&p("*.eu")));
        assert!(!p("orders.*").overlaps(&p("orders.eu.x")));
        assert!(!p("orders.>").overlaps(&p("dlq.>")));
        assert!(p(">").overlaps(&p("a.b")));
        assert!(p("orders.eu").within(&p("orders.*")));
        assert!(p("orders.eu.x").within(&p("orders.>")));
        assert!(p("orders.*.x").within(&p("orders.>")));
        assert!(!p("orders.>").within(&p("orders.*")));
        assert!(!p("orders.*").within(&p("orders.eu")));
        assert!(!p("orders").within(&p("orders.>")));
        assert!(p("orders.>").within(&p(">")));
    }

    #[test]
    fn invalid_subjects_are_explained() {
        for (subject, why) in [
            ("", "empty"),
            ("a..b", "empty token"),
            (".a", "empty token"),
            ("a b", "whitespace"),
            ("a.*", "wildcard"),
            ("a.>", "wildcard"),
        ] {
            let err = validate_publish_subject(subject).unwrap_err();
            assert!(err.to_string().contains(why), "{subject:?}: {err}");
        }
        assert!(validate_publish_subject("orders.eu.1").is_ok());
        assert!(SubjectPattern::parse("a.>.b").is_err());
    }

    #[test]
    fn kv_keys() {
        assert!(is_valid_kv_key("orders.eu"));
        assert!(is_valid_kv_key("a-b_c/d=e"));
        assert!(!is_valid_kv_key(""));
        assert!(!is_valid_kv_key(".a"));
        assert!(!is_valid_kv_key("a b"));
        assert!(!is_valid_kv_key("a*"));
    }
}
