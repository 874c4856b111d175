//! Topics, subscription patterns and queue group names.
//!
//! A topic is tokens separated by `.`, each token one or more of
//! `A-Z a-z 0-9 _ - :`, at most [`MAX_TOPIC_BYTES`] in all. A pattern may also
//! use `*` for exactly one token and `>` as its last token for one or more.

use std::fmt;
use std::sync::Arc;

use crate::error::ErrorCode;
use crate::limits::{MAX_GROUP_BYTES, MAX_TOPIC_BYTES};

/// Why a topic, pattern or group name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic is empty")]
    Empty,
    #[error("topic is {0} bytes; the limit is {MAX_TOPIC_BYTES}")]
    TooLong(usize),
    #[error("topic has an empty token")]
    EmptyToken,
    #[error("topic has a character outside A-Z a-z 0-9 _ - :")]
    BadCharacter,
    #[error("wildcards (* and >) are for subscriptions; publish to an exact topic")]
    Wildcard,
    #[error("`>` may only be the last token of a pattern")]
    MisplacedTail,
    #[error("group name must be 1 to {MAX_GROUP_BYTES} bytes of A-Z a-z 0-9 _ - : .")]
    BadGroup,
}

impl TopicError {
    /// The error code a client gets for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            TopicError::TooLong(_) => ErrorCode::LimitExceeded,
            _ => ErrorCode::BadRequest,
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':')
}

fn check_length(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong(s.len()));
    }
    Ok(())
}

/// An exact topic: what messages are published to.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

impl Topic {
    pub fn parse(s: &str) -> Result<Topic, TopicError> {
        check_length(s)?;
        for token in s.split('.') {
            if token.is_empty() {
                return Err(TopicError::EmptyToken);
            }
            if token == "*" || token == ">" {
                return Err(TopicError::Wildcard);
            }
            if !token.bytes().all(is_token_byte) {
                return Err(TopicError::BadCharacter);
            }
        }
        Ok(Topic(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subscription pattern: an exact topic, or one with `*` / `>` tokens.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pattern {
    text: Arc<str>,
    wildcard: bool,
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Pattern, TopicError> {
        check_length(s)?;
        let mut wildcard = false;
        let mut tokens = s.split('.').peekable();
        while let Some(token) = tokens.next() {
            match token {
                "" => return Err(TopicError::EmptyToken),
                "*" => wildcard = true,
                ">" if tokens.peek().is_none() => wildcard = true,
                ">" => return Err(TopicError::MisplacedTail),
                _ if token.bytes().all(is_token_byte) => {}
                _ => return Err(TopicError::BadCharacter),
            }
        }
        Ok(Pattern {
            text: Arc::from(s),
            wildcard,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the pattern has a `*` or `>` token.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The exact topic this pattern names, when it has no wildcard.
    pub fn as_topic(&self) -> Option<Topic> {
        (!self.wildcard).then(|| Topic(self.text.clone()))
    }

    /// Does this pattern match `topic`?
    pub fn matches(&self, topic: &Topic) -> bool {
        if !self.wildcard {
            return *self.text == *topic.0;
        }
        let mut topic_tokens = topic.0.split('.');
        for token in self.text.split('.') {
            match token {
                ">" => return topic_tokens.next().is_some(),
                "*" => {
                    if topic_tokens.next().is_none() {
                        return false;
                    }
                }
                literal => {
                    if topic_tokens.next() != Some(literal) {
                        return false;
                    }
                }
            }
        }
        topic_tokens.next().is_none()
    }

    /// Does every topic that `other` matches also match `self`? Used to check
    /// a subscription against the patterns a token allows.
    pub fn covers(&self, other: &Pattern) -> bool {
        let mut other_tokens = other.text.split('.');
        for token in self.text.split('.') {
            match (token, other_tokens.next()) {
                (">", next) => return next.is_some(),
                (_, None) | (_, Some(">")) => return false,
                ("*", Some(_)) => {}
                (literal, Some(theirs)) if literal == theirs => {}
                _ => return false,
            }
        }
        other_tokens.next().is_none()
    }
}

impl From<Topic> for Pattern {
    fn from(topic: Topic) -> Pattern {
        Pattern {
            text: topic.0,
            wildcard: false,
        }
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.text, f)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A queue group name: 1 to 255 bytes of `A-Z a-z 0-9 _ - : .`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName(Arc<str>);

impl GroupName {
    pub fn parse(s: &str) -> Result<GroupName, TopicError> {
        let valid = !s.is_empty()
            && s.len() <= MAX_GROUP_BYTES
            && s.bytes().all(|b| is_token_byte(b) || b == b'.');
        if valid {
            Ok(GroupName(Arc::from(s)))
        } else {
            Err(TopicError::BadGroup)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn pattern(s: &str) -> Pattern {
        Pattern::parse(s).expect("valid pattern")
    }

    pub(crate) fn topic(s: &str) -> Topic {
        Topic::parse(s).expect("valid topic")
    }

    #[test]
    fn topics_are_validated() {
        assert!(Topic::parse("news.eu-west.a_b:c").is_ok());
        assert_eq!(Topic::parse(""), Err(TopicError::Empty));
        assert_eq!(Topic::parse("a..b"), Err(TopicError::EmptyToken));
        assert_eq!(Topic::parse(".a"), Err(TopicError::EmptyToken));
        assert_eq!(Topic::parse("a."), Err(TopicError::EmptyToken));
        assert_eq!(Topic::parse("a.*"), Err(TopicError::Wildcard));
        assert_eq!(Topic::parse("a.>"), Err(TopicError::Wildcard));
        assert_eq!(Topic::parse("a b"), Err(TopicError::BadCharacter));
        assert_eq!(Topic::parse("é"), Err(TopicError::BadCharacter));
        assert!(Topic::parse(&"a".repeat(255)).is_ok());
        assert_eq!(
            Topic::parse(&"a".repeat(256)),
            Err(TopicError::TooLong(256))
        );
        assert_eq!(TopicError::TooLong(256).code(), ErrorCode::LimitExceeded);
    }

    #[test]
    fn patterns_are_validated() {
        assert!(pattern("a.*.c").is_wildcard());
        assert!(pattern("a.>").is_wildcard());
        assert!(!pattern("a.b").is_wildcard());
        assert_eq!(Pattern::parse("a.>.c"), Err(TopicError::MisplacedTail));
        assert_eq!(Pattern::parse("a.b*"), Err(TopicError::BadCharacter));
        assert_eq!(Pattern::parse("a..*"), Err(TopicError::EmptyToken));
    }

    #[test]
    fn wildcards_match_as_documented() {
        assert!(pattern("news.*").matches(&topic("news.eu")));
        assert!(!pattern("news.*").matches(&topic("news")));
        assert!(!pattern("news.*").matches(&topic("news.eu.fr")));
        assert!(pattern("news.>").matches(&topic("news.eu.fr")));
        assert!(!pattern("news.>").matches(&topic("news")));
        assert!(pattern(">").matches(&topic("anything.at.all")));
        assert!(pattern("*.b.>").matches(&topic("a.b.c")));
    }

    #[test]
    fn covers_is_containment() {
        assert!(pattern("news.>").covers(&pattern("news.*")));
        assert!(pattern("news.>").covers(&pattern("news.a.>")));
        assert!(!pattern("news.*").covers(&pattern("news.>")));
        assert!(pattern("news.*").covers(&pattern("news.a")));
        assert!(!pattern("news.a").covers(&pattern("news.*")));
        assert!(pattern(">").covers(&pattern("*")));
    }

    /// The reference matcher: recursion over token lists, as the contract reads.
    fn naive_matches(pattern: &[&str], topic: &[&str]) -> bool {
        match (pattern.first(), topic.first()) {
            (None, None) => true,
            (Some(&">"), Some(_)) => pattern.len() == 1,
            (Some(&"*"), Some(_)) => naive_matches(&pattern[1..], &topic[1..]),
            (Some(p), Some(t)) => p == t && naive_matches(&pattern[1..], &topic[1..]),
            _ => false,
        }
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            "[a-c_:-]{1,3}"
        ]
    }

    pub(crate) fn topic_tokens() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(token(), 1..6)
    }

    pub(crate) fn pattern_tokens() -> impl Strategy<Value = Vec<String>> {
        (
            prop::collection::vec(prop_oneof![3 => token(), 1 => Just("*".to_string())], 1..6),
            any::<bool>(),
        )
            .prop_map(|(mut tokens, tail)| {
                if tail {
                    let last = tokens.len() - 1;
                    tokens[last] = ">".to_string();
                }
                tokens
            })
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_reference(p in pattern_tokens(), t in topic_tokens()) {
            let pattern = pattern(&p.join("."));
            let topic = topic(&t.join("."));
            let p_refs: Vec<&str> = p.iter().map(String::as_str).collect();
            let t_refs: Vec<&str> = t.iter().map(String::as_str).collect();
            prop_assert_eq!(pattern.matches(&topic), naive_matches(&p_refs, &t_refs));
        }

        #[test]
        fn covered_patterns_match_only_covered_topics(
            a in pattern_tokens(), b in pattern_tokens(), t in topic_tokens()
        ) {
            let (a, b, t) = (pattern(&a.join(".")), pattern(&b.join(".")), topic(&t.join(".")));
            if a.covers(&b) && b.matches(&t) {
                prop_assert!(a.matches(&t));
            }
        }

        #[test]
        fn every_pattern_covers_itself(a in pattern_tokens()) {
            let a = pattern(&a.join("."));
            prop_assert!(a.covers(&a));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = Topic::parse(&s);
            let _ = Pattern::parse(&s);
        }
    }
}

/// Topics, patterns and group names cross the wire as strings and are
/// parsed (so validated) again when read.
macro_rules! serde_as_parsed_str {
    ($($ty:ty),*) => {$(
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                <$ty>::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_parsed_str!(Topic, Pattern, GroupName);
