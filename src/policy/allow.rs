//! Allow-lists from labels: when a person labels a flag false positive, the evidence spans of
//! each rule that fired (a recurring span that is a legitimate template, a phrase that is a
//! product name) are allowed for that rule in that scope (model × route), so the same false
//! positive does not come back. A rule still fires unless *every* evidence span its detectors
//! produced for the exchange is allowed; a rule whose detectors produced no span (a score over
//! a threshold, a drift alarm) is never held back, since there is nothing to compare.
//!
//! The store keeps the entries (`allowed_evidence`, written by `Store::label_flag`); the
//! gateway reads them at start, again with every trigger sync and at once after a label made
//! through the admin API or the console, and publishes them to the engine as one
//! [`AllowList`] snapshot. Offline evaluation has an empty list.
//!
//! Texts are compared normalised ([`normalise`]: trimmed, whitespace collapsed, lower-cased);
//! a span is allowed when it equals an allowed text or contains one, so a stored text cut at
//! [`MAX_CHARS`] still matches its whole span. Spans shorter than [`MIN_CHARS`] are never
//! allowed: a three-letter word would silence a rule wherever it appears.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

/// Normalised spans shorter than this (in characters) are not allowed.
pub const MIN_CHARS: usize = 4;

/// Allowed texts are cut to this many characters.
pub const MAX_CHARS: usize = 200;

/// `text` trimmed, each run of whitespace one space, lower-cased.
pub fn normalise(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The allow-list entry for a span's text: normalised and cut to [`MAX_CHARS`] characters;
/// `None` when shorter than [`MIN_CHARS`].
pub fn allowable(text: &str) -> Option<String> {
    let normal = normalise(text);
    if normal.chars().count() < MIN_CHARS {
        return None;
    }
    Some(
        normal
            .chars()
            .take(MAX_CHARS)
            .collect::<String>()
            .trim_end()
            .to_owned(),
    )
}

/// One allowed text as the allow-list takes it (the store's rows convert to this).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The rule it is allowed for.
    pub rule: &'a str,
    /// The scope's model (`None`: exchanges without one).
    pub model: Option<&'a str>,
    /// The scope's route.
    pub route: &'a str,
    /// The text, normalised ([`allowable`]).
    pub text: &'a str,
}

/// Which rule in which scope an allowed text is for.
type Key = (String, String, String);

/// The allowed evidence in force: per (rule, model, route), the allowed texts. A snapshot,
/// swapped whole when the store's entries change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allowed {
    texts: HashMap<Key, Vec<String>>,
}

impl Allowed {
    /// The allow-list of these entries.
    pub fn new<'a>(entries: impl IntoIterator<Item = Entry<'a>>) -> Allowed {
        let mut texts: HashMap<Key, Vec<String>> = HashMap::new();
        for entry in entries {
            let key = (
                entry.rule.to_owned(),
                entry.model.unwrap_or_default().to_owned(),
                entry.route.to_owned(),
            );
            texts.entry(key).or_default().push(entry.text.to_owned());
        }
        for list in texts.values_mut() {
            list.sort_unstable();
            list.dedup();
        }
        Allowed { texts }
    }

    /// Whether nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }

    /// Allowed texts, all rules and scopes together.
    pub fn len(&self) -> usize {
        self.texts.values().map(Vec::len).sum()
    }

    /// Whether `rule`, firing on an exchange of `model` (`""`: none) on `route` with these
    /// evidence spans, is held back: there is at least one span, and every span (normalised)
    /// equals or contains a text allowed for that rule and scope.
    pub fn allows(&self, rule: &str, model: &str, route: &str, spans: &[&str]) -> bool {
        if spans.is_empty() {
            return false;
        }
        let key = (rule.to_owned(), model.to_owned(), route.to_owned());
        let Some(allowed) = self.texts.get(&key) else {
            return false;
        };
        spans.iter().all(|span| {
            let span = normalise(span);
            allowed.iter().any(|text| span.contains(text.as_str()))
        })
    }
}

/// The allow-list the engine reads: one snapshot at a time, replaced whole.
#[derive(Debug, Default)]
pub struct AllowList(ArcSwap<Allowed>);

impl AllowList {
    /// An empty list.
    pub fn new() -> AllowList {
        AllowList::default()
    }

    /// The snapshot in force.
    pub fn load(&self) -> Arc<Allowed> {
        self.0.load_full()
    }

    /// Replaces the snapshot; true when it changed.
    pub fn publish(&self, allowed: Allowed) -> bool {
        if *self.0.load_full() == allowed {
            return false;
        }
        self.0.store(Arc::new(allowed));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(
        rule: &'a str,
        model: Option<&'a str>,
        route: &'a str,
        text: &'a str,
    ) -> Entry<'a> {
        Entry {
            rule,
            model,
            route,
            text,
        }
    }

    #[test]
    fn normalisation_trims_collapses_and_lower_cases() {
        let table = [
            ("  Acme   Turbo\n\tCloud ", Some("acme turbo cloud")),
            ("ÉCOLE  Été", Some("école été")),
            ("abc", None),
            ("  a  b ", None),
            ("", None),
            ("abcd", Some("abcd")),
        ];
        for (text, want) in table {
            assert_eq!(allowable(text).as_deref(), want, "{text:?}");
        }
        assert_eq!(normalise(" A \n B "), "a b");
        let long = "x".repeat(500);
        assert_eq!(allowable(&long).map(|t| t.chars().count()), Some(MAX_CHARS));
        // Cut at a character, never inside one.
        let wide = "é".repeat(300);
        assert_eq!(allowable(&wide).map(|t| t.chars().count()), Some(MAX_CHARS));
    }

    #[test]
    fn every_span_must_be_allowed_in_the_rule_s_own_scope() {
        let allowed = Allowed::new([
            entry("brand", Some("m1"), "chat_completions", "acme turbo"),
            entry(
                "brand",
                Some("m1"),
                "chat_completions",
                "thank you for choosing",
            ),
        ]);
        let scope = ("brand", "m1", "chat_completions");
        let allows = |spans: &[&str]| allowed.allows(scope.0, scope.1, scope.2, spans);
        assert!(allows(&["Acme  TURBO"]), "normalised equality");
        assert!(
            allows(&["the Acme Turbo 3000"]),
            "the allowed text inside the span"
        );
        assert!(allows(&["acme turbo", "Thank you for choosing"]));
        assert!(
            !allows(&["acme turbo", "ignore previous instructions"]),
            "one span not allowed"
        );
        assert!(
            !allows(&["acme"]),
            "a part of an allowed text is not allowed"
        );
        assert!(!allows(&[]), "a rule without spans is never held back");
        assert!(!allowed.allows("other", "m1", "chat_completions", &["acme turbo"]));
        assert!(!allowed.allows("brand", "m2", "chat_completions", &["acme turbo"]));
        assert!(!allowed.allows("brand", "m1", "completions", &["acme turbo"]));
        assert_eq!(allowed.len(), 2);
    }

    #[test]
    fn an_exchange_without_a_model_has_its_own_scope() {
        let allowed = Allowed::new([entry("brand", None, "completions", "acme turbo")]);
        assert!(allowed.allows("brand", "", "completions", &["acme turbo"]));
        assert!(!allowed.allows("brand", "m1", "completions", &["acme turbo"]));
    }

    #[test]
    fn publishing_the_same_entries_changes_nothing() {
        let list = AllowList::new();
        assert!(list.load().is_empty());
        let entries = [entry("brand", Some("m1"), "chat_completions", "acme turbo")];
        assert!(list.publish(Allowed::new(entries)));
        assert!(!list.publish(Allowed::new(entries)));
        assert!(list.publish(Allowed::default()));
        assert!(list.load().is_empty());
    }
}
