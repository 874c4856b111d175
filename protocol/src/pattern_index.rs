//! An index of wildcard patterns by token, so that finding the patterns that
//! match a topic costs the topic's depth, not the number of patterns.
//!
//! A node may hold thousands of wildcard subscriptions (`user.*.events`,
//! one per user); scanning them all for every message made a publish cost
//! grow with every subscriber anywhere. The index is a trie over the
//! pattern's tokens with one child per literal token, one for `*`, and the
//! keys of patterns that end in `>` kept where the `>` stands.

use std::collections::HashMap;

use crate::topic::{Pattern, Topic};

/// Keys (`K`) filed under patterns. One pattern may hold several keys (a
/// pattern with and without a queue group, say); a key is held once per
/// pattern.
#[derive(Debug, Clone)]
pub struct PatternIndex<K> {
    root: Node<K>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<K> {
    literal: HashMap<Box<str>, Node<K>>,
    star: Option<Box<Node<K>>>,
    /// Keys of patterns that end here.
    end: Vec<K>,
    /// Keys of patterns whose next token is `>`: they match one or more
    /// further tokens.
    rest: Vec<K>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            star: None,
            end: Vec::new(),
            rest: Vec::new(),
        }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.end.is_empty()
            && self.rest.is_empty()
    }
}

impl<K> Default for PatternIndex<K> {
    fn default() -> Self {
        PatternIndex {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Clone + PartialEq> PatternIndex<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many (pattern, key) entries are held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Files `key` under `pattern`; false when it was already there.
    pub fn insert(&mut self, pattern: &Pattern, key: K) -> bool {
        let mut node = &mut self.root;
        for token in pattern.as_str().split('.') {
            node = match token {
                ">" => {
                    return push_new(&mut node.rest, key, &mut self.len);
                }
                "*" => node.star.get_or_insert_with(Box::default),
                literal => node.literal.entry(literal.into()).or_default(),
            };
        }
        push_new(&mut node.end, key, &mut self.len)
    }

    /// Removes `key` from `pattern`; false when it was not there. Branches
    /// left empty are freed.
    pub fn remove(&mut self, pattern: &Pattern, key: &K) -> bool {
        let tokens: Vec<&str> = pattern.as_str().split('.').collect();
        let removed = remove_from(&mut self.root, &tokens, key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `found` with every key whose pattern matches `topic`, once per
    /// (pattern, key) entry.
    pub fn for_each_match(&self, topic: &Topic, mut found: impl FnMut(&K)) {
        if self.len == 0 {
            return;
        }
        visit(&self.root, topic.as_str().split('.'), &mut found);
    }

    /// The keys whose pattern matches `topic`.
    pub fn matches(&self, topic: &Topic) -> Vec<K> {
        let mut keys = Vec::new();
        self.for_each_match(topic, |k| keys.push(k.clone()));
        keys
    }
}

fn push_new<K: PartialEq>(keys: &mut Vec<K>, key: K, len: &mut usize) -> bool {
    if keys.contains(&key) {
        return false;
    }
    keys.push(key);
    *len += 1;
    true
}

fn take_key<K: PartialEq>(keys: &mut Vec<K>, key: &K) -> bool {
    match keys.iter().position(|k| k == key) {
        Some(at) => {
            keys.swap_remove(at);
            true
        }
        None => false,
    }
}

fn remove_from<K: PartialEq>(node: &mut Node<K>, tokens: &[&str], key: &K) -> bool {
    let Some((token, rest)) = tokens.split_first() else {
        return take_key(&mut node.end, key);
    };
    match *token {
        ">" => take_key(&mut node.rest, key),
        "*" => {
            let Some(child) = node.star.as_deref_mut() else {
                return false;
            };
            let removed = remove_from(child, rest, key);
            if child.is_empty() {
                node.star = None;
            }
            removed
        }
        literal => {
            let Some(child) = node.literal.get_mut(literal) else {
                return false;
            };
            let removed = remove_from(child, rest, key);
            if child.is_empty() {
                node.literal.remove(literal);
            }
            removed
        }
    }
}

/// Walks the trie along `tokens` (a cheap-to-clone iterator, so a message
/// costs no allocation).
fn visit<'t, K>(
    node: &Node<K>,
    mut tokens: impl Iterator<Item = &'t str> + Clone,
    found: &mut impl FnMut(&K),
) {
    let Some(token) = tokens.next() else {
        node.end.iter().for_each(&mut *found);
        return;
    };
    node.rest.iter().for_each(&mut *found);
    if let Some(child) = node.literal.get(token) {
        visit(child, tokens.clone(), found);
    }
    if let Some(child) = &node.star {
        visit(child, tokens, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::tests::{pattern, pattern_tokens, topic, topic_tokens};
    use proptest::prelude::*;

    fn sorted(mut keys: Vec<u32>) -> Vec<u32> {
        keys.sort_unstable();
        keys
    }

    #[test]
    fn finds_exact_star_and_tail_patterns() {
        let mut index = PatternIndex::new();
        assert!(index.insert(&pattern("news.*"), 1));
        assert!(index.insert(&pattern("news.>"), 2));
        assert!(index.insert(&pattern("news.sport"), 3));
        assert!(index.insert(&pattern("*.sport"), 4));
        assert!(index.insert(&pattern(">"), 5));
        assert!(!index.insert(&pattern("news.*"), 1), "a key is held once");
        assert!(
            index.insert(&pattern("news.*"), 6),
            "several keys per pattern"
        );
        assert_eq!(index.len(), 6);

        assert_eq!(
            sorted(index.matches(&topic("news.sport"))),
            [1, 2, 3, 4, 5, 6]
        );
        assert_eq!(sorted(index.matches(&topic("news.sport.live"))), [2, 5]);
        assert_eq!(sorted(index.matches(&topic("news"))), [5]);
        assert_eq!(sorted(index.matches(&topic("weather.sport"))), [4, 5]);
    }

    #[test]
    fn removing_frees_empty_branches() {
        let mut index = PatternIndex::new();
        index.insert(&pattern("a.*.c.>"), 1);
        index.insert(&pattern("a.b"), 2);
        assert!(!index.remove(&pattern("a.*.c.>"), &9));
        assert!(!index.remove(&pattern("x.y"), &1));
        assert!(index.remove(&pattern("a.*.c.>"), &1));
        assert!(index.remove(&pattern("a.b"), &2));
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "no branch is left behind");
        assert!(index.matches(&topic("a.b.c.d")).is_empty());
    }

    fn pattern_text() -> impl Strategy<Value = String> {
        pattern_tokens().prop_map(|tokens| tokens.join("."))
    }

    fn topic_text() -> impl Strategy<Value = String> {
        topic_tokens().prop_map(|tokens| tokens.join("."))
    }

    proptest! {
        /// Against the plain matcher: the same keys for every topic, after
        /// insertions and removals.
        #[test]
        fn agrees_with_scanning_every_pattern(
            patterns in prop::collection::vec(pattern_text(), 0..24),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            topics in prop::collection::vec(topic_text(), 1..8),
        ) {
            let mut index = PatternIndex::new();
            let mut held: Vec<(Pattern, u32)> = Vec::new();
            for (i, text) in patterns.iter().enumerate() {
                let p = pattern(text);
                // Keys repeat across patterns so one key under two patterns is covered.
                let key = (i % 5) as u32;
                let fresh = !held.contains(&(p.clone(), key));
                prop_assert_eq!(index.insert(&p, key), fresh);
                if fresh {
                    held.push((p, key));
                }
            }
            for at in removed {
                if held.is_empty() {
                    break;
                }
                let (p, key) = held.swap_remove(at.index(held.len()));
                prop_assert!(index.remove(&p, &key));
            }
            prop_assert_eq!(index.len(), held.len());
            for text in &topics {
                let t = topic(text);
                let mut expected: Vec<u32> =
                    held.iter().filter(|(p, _)| p.matches(&t)).map(|(_, k)| *k).collect();
                expected.sort_unstable();
                prop_assert_eq!(sorted(index.matches(&t)), expected, "topic {}", text);
            }
            for (p, key) in held.clone() {
                prop_assert!(index.remove(&p, &key));
            }
            prop_assert!(index.root.is_empty());
        }
    }
}
