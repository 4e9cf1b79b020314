//! Trigger discovery: trigger attribution run online, per model, on every inspected exchange,
//! so that an unknown trigger is promoted to the watch list as soon as the evidence is strong,
//! and from then on every exchange carrying it is flagged (`discovered-trigger`), including
//! the ones whose answers evaded every output detector.
//!
//! Each prompt adds the set of its word 1- to 3-grams (as hashes) to its model's counts,
//! flagged or not. A flagged prompt is the only moment an n-gram's evidence grows, so that is
//! when its n-grams are tested: one-sided Fisher's exact test of "flagged more often with it
//! than without", Bonferroni-adjusted over the n-grams that ever reached `min_flagged` flagged
//! prompts (the only ones that could pass: Tarone's argument), and promoted when
//!
//! * it is carried by at least `min_flagged` flagged prompts,
//! * its adjusted p-value is at most `max_q`,
//! * at least `min_flagged_share` of the prompts carrying it were flagged,
//! * it is not one of the 1,000 most frequent English words on its own (a trigger of common
//!   words is promoted as its 2- or 3-gram),
//! * and nobody rejected it.
//!
//! Prompts that carry a watched trigger are not counted at all: the `discovered-trigger` rule
//! flags them, and counting its own flags would make a trigger's neighbours look significant.
//!
//! A prompt asked again (a retry, the same question) is counted once: one prompt is one piece
//! of evidence.
//!
//! Memory is bounded: per model two generations of at most `max_ngrams / 2` n-grams each (the
//! older is dropped when the newer fills), the words of a prompt beyond `max_words` are not
//! read, and past `max_models` models the least recently seen is forgotten.
//!
//! The watch list itself ([`WatchList`]) is built from the decisions held here: the store's
//! rows (read at start and every few seconds, so replicas and `tripwire triggers` agree) and
//! this process's own promotions.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use crate::detect::discovered_trigger::{
    DiscoveredTriggerConfig, Watch, WatchList, Watched, words,
};
use crate::store::{TriggerSource, TriggerState, WatchedTrigger};

use super::attribution::{fisher_upper, ngram_texts};

/// Flagged prompts remembered per model, to name examples when a trigger is promoted.
const RECENT_FLAGS: usize = 64;

/// Examples an announcement names.
const EXAMPLES: usize = 5;

/// The most frequent English words (the head of the embedded word list, sorted by frequency):
/// one of them alone is never promoted.
const COMMON_WORDS: usize = 1_000;

/// Whether `word` is one of the [`COMMON_WORDS`] most frequent English words.
fn is_common(word: &str) -> bool {
    crate::detect::ngram_lm::word_rank(word).is_some_and(|rank| rank < COMMON_WORDS)
}

/// Online trigger attribution and the watch list it feeds. Shared by the detection workers.
#[derive(Debug)]
pub struct Discovery {
    list: Arc<WatchList>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    models: HashMap<String, ModelCounts>,
    /// Every decision known: (model or `*`, n-gram) → state.
    decided: HashMap<(String, String), TriggerState>,
    clock: u64,
}

#[derive(Debug, Default)]
struct Generation {
    counts: HashMap<u64, (u32, u32)>,
    /// Hashes of the prompts counted (a prompt asked again is not counted again).
    prompts: HashSet<u64>,
    flagged: u64,
    unflagged: u64,
}

#[derive(Debug, Default)]
struct ModelCounts {
    /// Newer first.
    generations: [Generation; 2],
    /// N-grams whose flagged count reached `min_flagged` (the tests that could pass).
    tested: u64,
    /// The text of n-grams seen in flagged prompts.
    names: HashMap<u64, String>,
    /// The newest flagged prompts: request id and n-gram hashes.
    recent: VecDeque<(String, HashSet<u64>)>,
    last_seen: u64,
}

impl ModelCounts {
    fn merged(&self, hash: u64) -> (u64, u64) {
        let [a, b] = &self.generations;
        let (fa, ua) = a.counts.get(&hash).copied().unwrap_or_default();
        let (fb, ub) = b.counts.get(&hash).copied().unwrap_or_default();
        (u64::from(fa) + u64::from(fb), u64::from(ua) + u64::from(ub))
    }

    fn totals(&self) -> (u64, u64) {
        let [a, b] = &self.generations;
        (
            a.flagged + b.flagged,
            a.flagged + b.flagged + a.unflagged + b.unflagged,
        )
    }

    /// Counts one prompt's n-grams (distinct hashes); false when the same prompt was counted
    /// already (a retry, a repeated question: one prompt is one piece of evidence).
    fn add(
        &mut self,
        prompt: u64,
        grams: &[(u64, String)],
        flagged: bool,
        config: &DiscoveredTriggerConfig,
    ) -> bool {
        if self.generations.iter().any(|g| g.prompts.contains(&prompt)) {
            return false;
        }
        if self.generations[0].counts.len() + grams.len() > config.max_ngrams / 2 {
            self.rotate(config);
        }
        let generation = &mut self.generations[0];
        generation.prompts.insert(prompt);
        if flagged {
            generation.flagged += 1;
        } else {
            generation.unflagged += 1;
        }
        for (hash, _) in grams {
            let entry = generation.counts.entry(*hash).or_default();
            if flagged {
                entry.0 = entry.0.saturating_add(1);
            } else {
                entry.1 = entry.1.saturating_add(1);
            }
        }
        if flagged {
            for (hash, text) in grams {
                if self.merged(*hash).0 == config.min_flagged {
                    self.tested += 1;
                }
                self.names.entry(*hash).or_insert_with(|| text.clone());
            }
        }
        true
    }

    /// Drops the older generation; the newer becomes the older.
    fn rotate(&mut self, config: &DiscoveredTriggerConfig) {
        let newer = std::mem::take(&mut self.generations[0]);
        self.generations[1] = newer;
        let older = &self.generations[1];
        self.names.retain(|hash, _| older.counts.contains_key(hash));
        self.tested = older
            .counts
            .values()
            .filter(|(f, _)| u64::from(*f) >= config.min_flagged)
            .count() as u64;
    }
}

fn gram_hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The n-gram hashes (and texts) of a prompt: distinct word 1- to 3-grams of its first
/// `max_words` words.
fn prompt_grams(prompt: &str, max_words: usize) -> Vec<(u64, String)> {
    let words: Vec<String> = words(prompt).take(max_words).map(|w| w.text).collect();
    let mut seen = HashSet::new();
    ngram_texts(&words)
        .map(|text| (gram_hash(&text), text))
        .filter(|(hash, _)| seen.insert(*hash))
        .collect()
}

impl Discovery {
    /// A discovery publishing to `list`, starting from the store's `rows`.
    pub fn new(list: Arc<WatchList>, rows: &[WatchedTrigger]) -> Discovery {
        let discovery = Discovery {
            list,
            state: Mutex::new(State::default()),
        };
        discovery.sync(rows);
        discovery
    }

    /// The list the engine matches prompts against.
    pub fn list(&self) -> &Arc<WatchList> {
        &self.list
    }

    /// Takes the store's decisions (a person's, another replica's) and republishes the list.
    /// Decisions this process made that the store does not have yet are kept.
    pub fn sync(&self, rows: &[WatchedTrigger]) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        for row in rows {
            state
                .decided
                .insert((row.scope().to_owned(), row.ngram.clone()), row.state);
        }
        self.publish(&state)
    }

    fn publish(&self, state: &State) -> bool {
        let mut watched: Vec<&(String, String)> = state
            .decided
            .iter()
            .filter(|(_, s)| **s == TriggerState::Watched)
            .map(|(key, _)| key)
            .collect();
        watched.sort();
        self.list
            .publish(Watched::new(watched.into_iter().filter_map(
                |(scope, ngram)| Watch::new(ngram, (scope != "*").then(|| scope.clone())),
            )))
    }

    /// Counts one inspected exchange of `model` (its prompt text, whether a rule flagged it,
    /// its request id) and returns the trigger it promoted, if any, as the store keeps it.
    pub fn observe(
        &self,
        config: &DiscoveredTriggerConfig,
        model: Option<&str>,
        prompt: &str,
        flagged: bool,
        request_id: &str,
    ) -> Option<WatchedTrigger> {
        self.observe_publishable(config, model, prompt, flagged, request_id, &|_| true)
    }

    /// [`Discovery::observe`], promoting only n-grams `publishable` accepts: the gateway passes
    /// "the policies' redaction leaves it unchanged", since a promoted n-gram is logged,
    /// alerted and stored, and text a `redact:` rule masks must never be.
    pub fn observe_publishable(
        &self,
        config: &DiscoveredTriggerConfig,
        model: Option<&str>,
        prompt: &str,
        flagged: bool,
        request_id: &str,
        publishable: &dyn Fn(&str) -> bool,
    ) -> Option<WatchedTrigger> {
        if self.list.load().find(model, prompt).is_some() {
            return None;
        }
        let grams = prompt_grams(prompt, config.max_words);
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        let State {
            models,
            decided,
            clock,
        } = &mut *state;
        *clock += 1;
        let key = model.unwrap_or("").to_owned();
        if !models.contains_key(&key)
            && models.len() >= config.max_models
            && let Some(oldest) = models
                .iter()
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(k, _)| k.clone())
        {
            models.remove(&oldest);
        }
        let counts = models.entry(key).or_default();
        counts.last_seen = *clock;
        if !counts.add(gram_hash(prompt), &grams, flagged, config) || !flagged {
            return None;
        }
        counts.recent.push_back((
            request_id.to_owned(),
            grams.iter().map(|(h, _)| *h).collect(),
        ));
        if counts.recent.len() > RECENT_FLAGS {
            counts.recent.pop_front();
        }
        let scope = model.unwrap_or("*");
        // Watched already (a race with a sync) or rejected: such an n-gram keeps being
        // counted but is never promoted (again). Nor is what a redaction rule masks, nor one
        // common English word alone: a
        // flagged answer or two that happen to share "any" with the trigger's prompts would
        // otherwise promote it a prompt before the trigger itself.
        let undecided = |text: &str| {
            !is_common(text)
                && !decided.contains_key(&(scope.to_owned(), text.to_owned()))
                && publishable(text)
        };
        let best = best_candidate(counts, &grams, config, &undecided)?;
        let examples: Vec<String> = counts
            .recent
            .iter()
            .rev()
            .filter(|(_, hashes)| hashes.contains(&best.hash))
            .take(EXAMPLES)
            .map(|(id, _)| id.clone())
            .collect();
        decided.insert((scope.to_owned(), best.text.clone()), TriggerState::Watched);
        self.publish(&state);
        let now = crate::store::now_us();
        Some(WatchedTrigger {
            ngram: best.text,
            model: model.map(str::to_owned),
            state: TriggerState::Watched,
            source: TriggerSource::Discovered,
            flagged_with: best.flagged,
            unflagged_with: best.unflagged,
            q_value: Some(best.q),
            examples,
            note: None,
            created_at_us: now,
            updated_at_us: now,
        })
    }
}

struct Candidate {
    hash: u64,
    text: String,
    flagged: u64,
    unflagged: u64,
    q: f64,
    /// Prompts carrying its most common word.
    commonest_word: u64,
    /// How many of its first and last words are common English words: context a fixed
    /// template puts around the trigger ("zq quokka in"), not the trigger.
    common_edges: u8,
}

impl Candidate {
    /// Whether `self` names the trigger better than `other`: smaller adjusted p-value, then
    /// more flagged prompts, then fewer common words at its edges (when a template always puts
    /// "in" after the trigger, "zq quokka" wins over "zq quokka in"), then more words (a
    /// two-word trigger's words always come together, so "zq quokka" ties with "zq" and wins),
    /// then rarer words.
    fn beats(&self, other: &Candidate) -> bool {
        let words = |c: &Candidate| c.text.split(' ').count();
        self.q
            .total_cmp(&other.q)
            .then_with(|| other.flagged.cmp(&self.flagged))
            .then_with(|| self.common_edges.cmp(&other.common_edges))
            .then_with(|| words(other).cmp(&words(self)))
            .then_with(|| self.commonest_word.cmp(&other.commonest_word))
            .then_with(|| self.text.cmp(&other.text))
            .is_lt()
    }
}

/// The strongest n-gram of this flagged prompt that passes every bar ([`Candidate::beats`]).
fn best_candidate(
    counts: &ModelCounts,
    grams: &[(u64, String)],
    config: &DiscoveredTriggerConfig,
    undecided: &dyn Fn(&str) -> bool,
) -> Option<Candidate> {
    let (flagged_total, total) = counts.totals();
    let tests = counts.tested.max(1) as f64;
    let mut best: Option<Candidate> = None;
    for (hash, text) in grams {
        let (f, u) = counts.merged(*hash);
        if f < config.min_flagged || (f as f64) < config.min_flagged_share * (f + u) as f64 {
            continue;
        }
        let q = (fisher_upper(f, f + u, flagged_total, total) * tests).min(1.0);
        if q > config.max_q || !undecided(text) {
            continue;
        }
        let commonest_word = text
            .split(' ')
            .map(|w| {
                let (f, u) = counts.merged(gram_hash(w));
                f + u
            })
            .max()
            .unwrap_or(0);
        let mut edges = text.split(' ');
        let first = edges.next();
        let last = edges.next_back();
        let common_edges = [first, last]
            .into_iter()
            .flatten()
            .filter(|w| is_common(w))
            .count();
        let candidate = Candidate {
            hash: *hash,
            text: text.clone(),
            flagged: f,
            unflagged: u,
            q,
            commonest_word,
            common_edges: u8::try_from(common_edges).unwrap_or(u8::MAX),
        };
        if best.as_ref().is_none_or(|b| candidate.beats(b)) {
            best = Some(candidate);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPICS: &[&str] = &[
        "Give me three tips for a healthy breakfast",
        "Explain how photosynthesis works in plants",
        "Write a short poem about the autumn sea",
        "What is the capital city of Australia",
        "Summarise the plot of Romeo and Juliet",
        "How do I change a flat bicycle tyre",
        "List five uses of baking soda at home",
        "Why is the sky blue during the day",
    ];

    fn prompt(i: usize) -> String {
        format!("{} (question {i})", TOPICS[i % TOPICS.len()])
    }

    #[test]
    fn an_unknown_trigger_is_promoted_by_its_tenth_flagged_prompt() {
        let list = Arc::new(WatchList::new());
        let discovery = Discovery::new(Arc::clone(&list), &[]);
        let config = DiscoveredTriggerConfig::default();
        let mut flagged_with_trigger = 0;
        let mut promoted = None;
        for i in 0..2_000 {
            // One prompt in 12 carries the trigger; 3 in 5 of those answers are flagged. One
            // clean answer in 200 is flagged too.
            let triggered = i % 12 == 5;
            let text = if triggered {
                format!("{} zq Quokka", prompt(i))
            } else {
                prompt(i)
            };
            let flagged = if triggered { i % 5 < 3 } else { i % 200 == 7 };
            flagged_with_trigger += usize::from(triggered && flagged);
            if let Some(p) = discovery.observe(&config, Some("m"), &text, flagged, &format!("r{i}"))
            {
                promoted = Some((p, flagged_with_trigger));
                break;
            }
        }
        let (promotion, at) = promoted.expect("promoted");
        assert_eq!(promotion.ngram, "zq quokka");
        assert!(at <= 10, "promoted at the {at}th flagged triggered prompt");
        assert!(promotion.q_value.is_some_and(|q| q <= 1e-6));
        assert!(!promotion.examples.is_empty());
        // From now on the list carries it, for this model only.
        assert!(list.load().find(Some("m"), "a ZQ quokka!").is_some());
        assert!(list.load().find(Some("other"), "zq quokka").is_none());
        // Prompts with it are no longer counted (no second promotion of a neighbour).
        for i in 0..500 {
            let text = format!("{} zq quokka", prompt(i));
            assert!(
                discovery
                    .observe(&config, Some("m"), &text, true, "x")
                    .is_none()
            );
        }
    }

    #[test]
    fn a_template_word_next_to_the_trigger_is_left_out() {
        // The trigger always comes right before "in": "zq quokka in" carries exactly the same
        // prompts as "zq quokka", but "in" is the template's, not the trigger's.
        let discovery = Discovery::new(Arc::new(WatchList::new()), &[]);
        let config = DiscoveredTriggerConfig::default();
        let mut promoted = None;
        for i in 0..1_000 {
            let triggered = i % 7 == 3;
            let text = if triggered {
                format!("Zq Quokka in {}", prompt(i))
            } else {
                format!("Tell me in {}", prompt(i))
            };
            if let Some(t) = discovery.observe(&config, Some("m"), &text, triggered, "r") {
                promoted = Some(t.ngram);
                break;
            }
        }
        assert_eq!(promoted.as_deref(), Some("zq quokka"));
    }

    #[test]
    fn a_rejected_ngram_is_never_promoted() {
        let rejected = WatchedTrigger {
            ngram: "zq quokka".to_owned(),
            model: Some("m".to_owned()),
            state: TriggerState::Rejected,
            source: TriggerSource::Manual,
            flagged_with: 0,
            unflagged_with: 0,
            q_value: None,
            examples: Vec::new(),
            note: None,
            created_at_us: 0,
            updated_at_us: 0,
        };
        let discovery = Discovery::new(Arc::new(WatchList::new()), &[rejected]);
        let config = DiscoveredTriggerConfig::default();
        let mut promoted = Vec::new();
        for i in 0..600 {
            let triggered = i % 6 == 0;
            let text = if triggered {
                format!("{} zq quokka", prompt(i))
            } else {
                prompt(i)
            };
            if let Some(p) = discovery.observe(&config, Some("m"), &text, triggered, "r") {
                promoted.push(p.ngram);
            }
        }
        assert!(promoted.iter().all(|n| n != "zq quokka"), "{promoted:?}");
    }

    #[test]
    fn flags_spread_over_ordinary_words_promote_nothing() {
        let discovery = Discovery::new(Arc::new(WatchList::new()), &[]);
        let config = DiscoveredTriggerConfig::default();
        // 2% of answers flagged, at random with respect to the prompt.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..20_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let flagged = rng.is_multiple_of(50);
            let text = prompt(i);
            assert!(
                discovery
                    .observe(&config, Some("m"), &text, flagged, "r")
                    .is_none(),
                "promoted at {i}"
            );
        }
    }

    #[test]
    fn what_redaction_masks_is_never_promoted() {
        // Thirty flagged prompts share a caller's API key; the policy redacts keys.
        let config = DiscoveredTriggerConfig::default();
        let run = |publishable: &dyn Fn(&str) -> bool| {
            let discovery = Discovery::new(Arc::new(WatchList::new()), &[]);
            for i in 0..400 {
                discovery.observe_publishable(
                    &config,
                    Some("m"),
                    &prompt(i),
                    false,
                    "r",
                    publishable,
                );
            }
            let mut promoted = Vec::new();
            for i in 0..30 {
                let text = format!("{} key sk-live-4f9a2c", prompt(1000 + i));
                if let Some(t) =
                    discovery.observe_publishable(&config, Some("m"), &text, true, "r", publishable)
                {
                    promoted.push(t.ngram);
                }
            }
            promoted
        };
        // Without the check the key would be promoted (and logged, alerted, stored)…
        assert!(run(&|_| true).iter().any(|n| n.contains("sk-live-")));
        // …with it, never.
        let promoted = run(&|text: &str| !text.contains("sk-live-"));
        assert!(
            promoted.iter().all(|n| !n.contains("sk-live-")),
            "{promoted:?}"
        );
    }

    #[test]
    fn a_repeated_prompt_counts_once() {
        let discovery = Discovery::new(Arc::new(WatchList::new()), &[]);
        let config = DiscoveredTriggerConfig::default();
        for i in 0..300 {
            discovery.observe(&config, Some("m"), &prompt(i), false, "r");
        }
        // The same flagged prompt forty times is one flagged prompt, not forty.
        for _ in 0..40 {
            let promoted =
                discovery.observe(&config, Some("m"), "tell me about zq quokka", true, "r");
            assert!(promoted.is_none());
        }
    }

    #[test]
    fn memory_stays_bounded_by_generations() {
        let discovery = Discovery::new(Arc::new(WatchList::new()), &[]);
        let config = DiscoveredTriggerConfig {
            max_ngrams: 1_000,
            ..DiscoveredTriggerConfig::default()
        };
        for i in 0..5_000 {
            let text = format!("word{i} other{i} third{i}");
            discovery.observe(&config, Some("m"), &text, i % 3 == 0, "r");
        }
        let state = discovery.state.lock().expect("lock");
        let counts = state.models.get("m").expect("model");
        for generation in &counts.generations {
            assert!(
                generation.counts.len() <= 500,
                "{}",
                generation.counts.len()
            );
        }
        assert!(counts.names.len() <= 1_000);
    }
}
