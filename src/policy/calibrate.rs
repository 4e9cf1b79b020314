//! Threshold calibration, the library half of `tripwire calibrate`: find the numeric
//! comparisons in a rule's condition (`gibberish.score >= 0.5`), choose the threshold that keeps
//! the rule's flag rate on clean traffic at or under a target while firing on as many flags
//! labelled true positive as it can, and write the change as a unified diff of the policy file
//! for a person to review. Nothing here writes a file: a threshold is a policy change, and a
//! policy change is reviewed, never applied silently.
//!
//! A rule is calibrated through one comparison of a detector field with a number. The rest of
//! the condition is kept: the caller evaluates it with the comparison replaced by `true` and by
//! `false` ([`Comparison::replaced`]), so an exchange fires at threshold `t` exactly when
//! `rest(false) || (rest(true) && compare(score, t))`: exact whenever the comparison is not
//! negated.

use std::fmt::Write as _;
use std::sync::OnceLock;

use regex::Regex;
use serde::Serialize;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    /// `>`
    #[serde(rename = ">")]
    Gt,
    /// `>=`
    #[serde(rename = ">=")]
    Ge,
    /// `<`
    #[serde(rename = "<")]
    Lt,
    /// `<=`
    #[serde(rename = "<=")]
    Le,
}

impl Op {
    fn parse(text: &str) -> Option<Op> {
        match text {
            ">" => Some(Op::Gt),
            ">=" => Some(Op::Ge),
            "<" => Some(Op::Lt),
            "<=" => Some(Op::Le),
            _ => None,
        }
    }

    /// Whether `score` passes the comparison with `threshold`.
    pub fn holds(self, score: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => score > threshold,
            Op::Ge => score >= threshold,
            Op::Lt => score < threshold,
            Op::Le => score <= threshold,
        }
    }
}

/// `DETECTOR.FIELD OP NUMBER` in a rule's condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The detector (the first name of the path).
    pub detector: String,
    /// The field path after it (`score`, `prompt.count`).
    pub field: String,
    /// The operator.
    pub op: Op,
    /// The constant.
    pub threshold: f64,
    /// The constant as written.
    pub literal: String,
    /// The whole comparison as written.
    pub text: String,
    /// Byte range of the comparison in the condition.
    #[serde(skip)]
    pub span: (usize, usize),
}

/// `PATH OP NUMBER`, not inside a longer name or number. `None` only if the literal pattern
/// failed to compile (it does not).
fn pattern() -> Option<&'static Regex> {
    static PATTERN: OnceLock<Option<Regex>> = OnceLock::new();
    PATTERN
        .get_or_init(|| {
            Regex::new(
                r"(?:^|[^A-Za-z0-9_.])(?P<path>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*(?P<op>>=|<=|>|<)\s*(?P<num>-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?:$|[^A-Za-z0-9_.])",
            )
            .ok()
        })
        .as_ref()
}

/// The comparisons of a detector field (of one of `detectors`) with a number in `when`, in
/// order. `exchange.…` fields and detectors the policy does not declare are left out.
pub fn comparisons(when: &str, detectors: &[String]) -> Vec<Comparison> {
    let mut found = Vec::new();
    let Some(pattern) = pattern() else {
        return found;
    };
    let mut from = 0;
    while let Some(caps) = when.get(from..).and_then(|rest| pattern.captures(rest)) {
        let (Some(path), Some(op), Some(num)) =
            (caps.name("path"), caps.name("op"), caps.name("num"))
        else {
            break;
        };
        let (start, end) = (from + path.start(), from + num.end());
        // The next search starts at the number, so a trailing separator can open the next.
        from = end;
        let Some((detector, field)) = path.as_str().split_once('.') else {
            continue;
        };
        let (Some(op), Ok(threshold)) = (Op::parse(op.as_str()), num.as_str().parse::<f64>())
        else {
            continue;
        };
        if !detectors.iter().any(|d| d == detector) {
            continue;
        }
        found.push(Comparison {
            detector: detector.to_owned(),
            field: field.to_owned(),
            op,
            threshold,
            literal: num.as_str().to_owned(),
            text: when.get(start..end).unwrap_or_default().to_owned(),
            span: (start, end),
        });
    }
    found
}

impl Comparison {
    /// Whether the constant is written as an integer (a count): proposals stay integers.
    pub fn integer(&self) -> bool {
        !self.literal.contains(['.', 'e', 'E'])
    }

    /// `when` with this comparison replaced by `with` (`true`, `false`), parenthesised.
    pub fn replaced(&self, when: &str, with: &str) -> String {
        format!(
            "{}({with}){}",
            when.get(..self.span.0).unwrap_or_default(),
            when.get(self.span.1..).unwrap_or_default()
        )
    }

    /// The field's value in a detector's fields, when it is a number.
    pub fn score(&self, fields: &serde_json::Map<String, serde_json::Value>) -> Option<f64> {
        let mut parts = self.field.split('.');
        let first = parts.next()?;
        let mut value = fields.get(first)?;
        for part in parts {
            value = value.get(part)?;
        }
        value.as_f64()
    }

    /// `threshold` written the way this comparison's constant is (an integer, or a decimal
    /// without trailing zeros).
    pub fn format(&self, threshold: f64) -> String {
        if self.integer() {
            return format!("{threshold:.0}");
        }
        let text = format!("{threshold:.6}");
        let text = text.trim_end_matches('0');
        if text.ends_with('.') {
            format!("{text}0")
        } else {
            text.to_owned()
        }
    }

    /// The comparison as it would read with `threshold`.
    pub fn with_threshold(&self, threshold: f64) -> String {
        let number_at = self.text.len() - self.literal.len();
        format!(
            "{}{}",
            self.text.get(..number_at).unwrap_or_default(),
            self.format(threshold)
        )
    }
}

/// What the threshold is chosen from: the comparison's scores on one rule's traffic.
#[derive(Debug, Clone, Default)]
pub struct Scores {
    /// Scores of the clean exchanges the rule fires on only through the comparison.
    pub clean: Vec<f64>,
    /// Clean exchanges the rule fires on whatever the threshold.
    pub clean_always: usize,
    /// All clean exchanges in the rule's scope (the rate's denominator).
    pub clean_total: usize,
    /// Scores of exchanges labelled true positive for the rule, fired only through the
    /// comparison (those that fire regardless are kept by any threshold).
    pub true_positive: Vec<f64>,
}

/// Why no threshold is proposed.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoProposal {
    /// More clean exchanges than the target allows fire whatever the threshold.
    FiresRegardless {
        /// How many.
        exchanges: usize,
    },
}

/// The threshold for `cmp` that keeps the clean flag rate at or under `target` while firing
/// on as many true positives as possible: the most sensitive such threshold, rounded to the
/// fewest decimals that change no exchange's outcome. When every threshold meets the target,
/// the current one stays unless it loses true positives (then the least strict that keeps
/// them all).
pub fn propose(cmp: &Comparison, scores: &Scores, target: f64) -> Result<f64, NoProposal> {
    // Work in "fires when high" space: for < and <=, negate scores and threshold.
    let (flip, op) = match cmp.op {
        Op::Gt | Op::Ge => (1.0, cmp.op),
        Op::Lt => (-1.0, Op::Gt),
        Op::Le => (-1.0, Op::Ge),
    };
    let allowed = (target * scores.clean_total as f64).floor() as usize;
    let Some(k) = allowed.checked_sub(scores.clean_always) else {
        return Err(NoProposal::FiresRegardless {
            exchanges: scores.clean_always,
        });
    };
    let mut clean: Vec<f64> = scores.clean.iter().map(|s| s * flip).collect();
    clean.sort_by(|a, b| b.total_cmp(a));
    let tp: Vec<f64> = scores.true_positive.iter().map(|s| s * flip).collect();
    let current = cmp.threshold * flip;
    let Some(&pivot) = clean.get(k) else {
        // Every threshold meets the target.
        let lowest_tp = tp.iter().copied().reduce(f64::min);
        let keeps_all = tp.iter().all(|&v| op.holds(v, current));
        let proposed = match lowest_tp {
            Some(low) if !keeps_all => round_to_keep(cmp, op, low, &tp, &clean, flip),
            _ => current,
        };
        return Ok(proposed * flip);
    };
    Ok(round_above(cmp, op, pivot, &tp, &clean, flip) * flip)
}

/// The smallest round threshold at which `pivot` (and everything under it) does not fire, with
/// no other value between `pivot` and it.
fn round_above(cmp: &Comparison, op: Op, pivot: f64, tp: &[f64], clean: &[f64], flip: f64) -> f64 {
    let candidates = candidates(cmp, pivot, flip, |value, step| match op {
        // Fires at v >= t: t must be above the pivot.
        Op::Ge => (value / step).floor() * step + step,
        // Fires at v > t: t may equal the pivot.
        _ => (value / step).ceil() * step,
    });
    let exact = match op {
        Op::Ge => next_up(pivot),
        _ => pivot,
    };
    pick(candidates, exact, |t| {
        tp.iter()
            .chain(clean)
            .all(|&v| v <= pivot || op.holds(v, t))
    })
}

/// The largest round threshold at which `low` still fires, with no value between it and `low`.
fn round_to_keep(cmp: &Comparison, op: Op, low: f64, tp: &[f64], clean: &[f64], flip: f64) -> f64 {
    let candidates = candidates(cmp, low, flip, |value, step| match op {
        // Fires at v >= t: t may equal the value.
        Op::Ge => (value / step).floor() * step,
        // Fires at v > t: t must be under it.
        _ => (value / step).ceil() * step - step,
    });
    let exact = match op {
        Op::Ge => low,
        _ => next_down(low),
    };
    pick(candidates, exact, |t| {
        tp.iter().chain(clean).all(|&v| v >= low || !op.holds(v, t))
    })
}

/// Round thresholds near `value`, coarsest first: integers for an integer constant, else 1 to
/// 6 decimals. Each is rounded through its own text so that it reads as written.
fn candidates(
    cmp: &Comparison,
    value: f64,
    flip: f64,
    round: impl Fn(f64, f64) -> f64,
) -> Vec<f64> {
    let decimals: Vec<i32> = if cmp.integer() {
        vec![0]
    } else {
        (1..=6).collect()
    };
    decimals
        .into_iter()
        .filter_map(|d| {
            let step = 10f64.powi(-d);
            let t = round(value, step) * flip;
            format!("{t:.prec$}", prec = usize::try_from(d).unwrap_or(0))
                .parse::<f64>()
                .ok()
                .map(|t| t * flip)
        })
        .collect()
}

/// The first candidate that `fits`, else `exact`.
fn pick(candidates: Vec<f64>, exact: f64, fits: impl Fn(f64) -> bool) -> f64 {
    candidates.into_iter().find(|&t| fits(t)).unwrap_or(exact)
}

fn next_up(v: f64) -> f64 {
    v + v.abs().max(1.0) * 1e-9
}

fn next_down(v: f64) -> f64 {
    v - v.abs().max(1.0) * 1e-9
}

/// One line to change in a policy file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LineChange {
    /// 0-based line index.
    pub line: usize,
    /// The line as it is.
    pub old: String,
    /// The line as proposed.
    pub new: String,
}

/// The line of `text` (a policy file) holding `rule`'s comparison `cmp`, rewritten with
/// `proposed` as its constant: the first line at or after the rule's `name:` that contains the
/// comparison as written. `None` when it cannot be found (a condition split across lines).
pub fn change_line(text: &str, rule: &str, cmp: &Comparison, proposed: &str) -> Option<LineChange> {
    let lines: Vec<&str> = text.lines().collect();
    let is_name = |line: &str| {
        line.split("name:").skip(1).any(|after| {
            let after = after.trim_start().trim_start_matches(['"', '\'']);
            after.strip_prefix(rule).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with(['"', '\'', ',', ' ', '}', '#'])
            })
        })
    };
    let start = lines.iter().position(|l| is_name(l))?;
    // The comparison in the condition, not one quoted in a comment after the rule's name.
    let in_code = |line: &str| {
        line.find(&cmp.text)
            .filter(|&at| !line.get(..at).is_some_and(|before| before.contains('#')))
    };
    let (index, line, at) = lines
        .iter()
        .enumerate()
        .skip(start)
        .find_map(|(i, l)| in_code(l).map(|at| (i, *l, at)))?;
    let number_at = at + cmp.text.len() - cmp.literal.len();
    let new = format!(
        "{}{}{}",
        line.get(..number_at)?,
        proposed,
        line.get(at + cmp.text.len()..)?
    );
    Some(LineChange {
        line: index,
        old: line.to_owned(),
        new,
    })
}

/// A unified diff (3 lines of context) of `text` with `changes` (one line for one line), under
/// the file name `name`. Empty when nothing changes.
pub fn unified_diff(name: &str, text: &str, changes: &[LineChange]) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut changes: Vec<&LineChange> = changes.iter().filter(|c| c.old != c.new).collect();
    changes.sort_by_key(|c| c.line);
    changes.dedup_by_key(|c| c.line);
    if changes.is_empty() {
        return String::new();
    }
    const CONTEXT: usize = 3;
    // Hunks: runs of changes whose context windows touch.
    let mut hunks: Vec<Vec<&LineChange>> = Vec::new();
    for change in changes {
        match hunks.last_mut() {
            Some(hunk)
                if hunk
                    .last()
                    .is_some_and(|last| change.line <= last.line + 2 * CONTEXT + 1) =>
            {
                hunk.push(change);
            }
            _ => hunks.push(vec![change]),
        }
    }
    let mut out = format!("--- {name}\n+++ {name} (proposed)\n");
    for hunk in hunks {
        let (Some(first), Some(last)) = (hunk.first(), hunk.last()) else {
            continue;
        };
        let from = first.line.saturating_sub(CONTEXT);
        let to = (last.line + CONTEXT + 1).min(lines.len());
        let count = to - from;
        let _ok = writeln!(out, "@@ -{},{count} +{},{count} @@", from + 1, from + 1);
        for (index, line) in lines.iter().enumerate().take(to).skip(from) {
            match hunk.iter().find(|c| c.line == index) {
                Some(change) => {
                    let _ok = writeln!(out, "-{}\n+{}", change.old, change.new);
                }
                None => {
                    let _ok = writeln!(out, " {line}");
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detectors() -> Vec<String> {
        ["gibberish", "x", "trigger", "lang"]
            .map(str::to_owned)
            .to_vec()
    }

    /// (detector, field, operator, constant)
    type Found<'a> = (&'a str, &'a str, Op, f64);

    #[test]
    fn comparisons_are_found_in_conditions() {
        let table: &[(&str, &[Found<'_>])] = &[
            (
                "gibberish.score > 0.8",
                &[("gibberish", "score", Op::Gt, 0.8)],
            ),
            ("x.count >= 3", &[("x", "count", Op::Ge, 3.0)]),
            (
                "trigger.prompt.matched && gibberish.score >= 0.5",
                &[("gibberish", "score", Op::Ge, 0.5)],
            ),
            (
                "lang.ratio<0.25||x.count<=2",
                &[("lang", "ratio", Op::Lt, 0.25), ("x", "count", Op::Le, 2.0)],
            ),
            ("x.delta > -1.5e-3", &[("x", "delta", Op::Gt, -0.0015)]),
            // Not a detector of the policy, not a number, not a detector field.
            ("exchange.output_chars > 3", &[]),
            ("nope.score > 0.5", &[]),
            ("x.count > y.count", &[]),
            ("gibberish.score == 0.5", &[]),
            ("my.x.count > 1", &[]),
        ];
        for (when, want) in table {
            let got: Vec<(String, String, Op, f64)> = comparisons(when, &detectors())
                .into_iter()
                .map(|c| (c.detector, c.field, c.op, c.threshold))
                .collect();
            let want: Vec<(String, String, Op, f64)> = want
                .iter()
                .map(|(d, f, o, t)| ((*d).to_owned(), (*f).to_owned(), *o, *t))
                .collect();
            assert_eq!(got, want, "{when}");
        }
        let cmp = &comparisons("a && gibberish.score >= 0.50 && b", &detectors())[0];
        assert_eq!(cmp.text, "gibberish.score >= 0.50");
        assert_eq!(
            cmp.replaced("a && gibberish.score >= 0.50 && b", "true"),
            "a && (true) && b"
        );
        assert_eq!(cmp.with_threshold(0.75), "gibberish.score >= 0.75");
        assert!(!cmp.integer());
        let fields = serde_json::json!({"score": 0.7, "prompt": {"count": 2}});
        let fields = fields.as_object().unwrap();
        assert_eq!(cmp.score(fields), Some(0.7));
        let nested = &comparisons("trigger.prompt.count >= 1", &detectors())[0];
        assert_eq!(nested.score(fields), Some(2.0));
        assert!(nested.integer());
    }

    fn scores(clean: &[f64], tp: &[f64]) -> Scores {
        Scores {
            clean: clean.to_vec(),
            clean_always: 0,
            clean_total: clean.len(),
            true_positive: tp.to_vec(),
        }
    }

    fn cmp(when: &str) -> Comparison {
        comparisons(when, &detectors()).remove(0)
    }

    #[test]
    fn the_threshold_keeps_the_clean_rate_at_the_target() {
        // 1000 clean scores 0.000 … 0.999; 1% may fire: the 10 highest (0.990 … 0.999).
        let clean: Vec<f64> = (0..1000).map(|i| f64::from(i) / 1000.0).collect();
        let ge = cmp("gibberish.score >= 0.5");
        let t = propose(&ge, &scores(&clean, &[]), 0.01).unwrap();
        assert_eq!(ge.format(t), "0.99");
        assert_eq!(clean.iter().filter(|&&s| s >= t).count(), 10);
        let gt = cmp("gibberish.score > 0.5");
        let t = propose(&gt, &scores(&clean, &[]), 0.01).unwrap();
        assert_eq!(clean.iter().filter(|&&s| s > t).count(), 10, "{t}");
        // Below: the 10 lowest may fire.
        let lt = cmp("lang.ratio < 0.5");
        let t = propose(&lt, &scores(&clean, &[]), 0.01).unwrap();
        assert_eq!(clean.iter().filter(|&&s| s < t).count(), 10, "{t}");
        let le = cmp("lang.ratio <= 0.5");
        let t = propose(&le, &scores(&clean, &[]), 0.01).unwrap();
        assert_eq!(clean.iter().filter(|&&s| s <= t).count(), 10, "{t}");
    }

    #[test]
    fn integer_constants_stay_integers() {
        let clean: Vec<f64> = (0..200).map(|i| f64::from(i % 7)).collect();
        let c = cmp("x.count >= 3");
        let t = propose(&c, &scores(&clean, &[6.0]), 0.001).unwrap();
        assert_eq!(c.format(t), "7");
        let c = cmp("x.count > 3");
        let t = propose(&c, &scores(&clean, &[6.0]), 0.001).unwrap();
        assert_eq!(c.format(t), "6");
    }

    #[test]
    fn when_every_threshold_meets_the_target_the_current_one_stays_unless_it_loses_a_true_positive()
    {
        // 2 of 2000 clean exchanges may fire, and only 2 could.
        let few = |tp: &[f64]| Scores {
            clean_total: 2000,
            ..scores(&[0.1, 0.2], tp)
        };
        let c = cmp("gibberish.score >= 0.5");
        let t = propose(&c, &few(&[0.7]), 0.001).unwrap();
        assert_eq!(t, 0.5);
        let t = propose(&c, &few(&[0.43]), 0.001).unwrap();
        assert!(t <= 0.43 && t > 0.2, "{t}");
        assert_eq!(c.format(t), "0.4");
    }

    #[test]
    fn exchanges_that_fire_regardless_can_make_the_target_unreachable() {
        let c = cmp("gibberish.score >= 0.5");
        let mut s = scores(&[0.1; 300], &[]);
        s.clean_always = 1;
        assert_eq!(
            propose(&c, &s, 0.001),
            Err(NoProposal::FiresRegardless { exchanges: 1 })
        );
    }

    /// Found by running `tripwire calibrate` on the built-in policy: its comment above the
    /// condition quotes the comparison, and the comment was changed instead of the condition.
    #[test]
    fn regression_a_comparison_quoted_in_a_comment_is_not_the_one_changed() {
        let policy = "rules:\n  - name: gibberish\n    # gibberish.score >= 0.5 is the 99.9th percentile\n    when: gibberish.score >= 0.5 # gibberish.score >= 0.5\n";
        let change =
            change_line(policy, "gibberish", &cmp("gibberish.score >= 0.5"), "0.7").unwrap();
        assert_eq!(change.line, 3);
        assert_eq!(
            change.new,
            "    when: gibberish.score >= 0.7 # gibberish.score >= 0.5"
        );
    }

    const POLICY: &str = "rules:\n  - name: triggered-gibberish\n    when: trigger.prompt.matched && gibberish.score >= 0.5\n    severity: high\n\n  - name: gibberish\n    description: x\n    when: gibberish.score >= 0.5\n    severity: warning\n  - { name: counts, when: 'x.count >= 3', severity: info }\n";

    #[test]
    fn the_rule_s_own_line_changes_and_the_diff_shows_it() {
        let c = cmp("gibberish.score >= 0.5");
        let change = change_line(POLICY, "gibberish", &c, "0.62").unwrap();
        assert_eq!(change.line, 7);
        assert_eq!(change.new, "    when: gibberish.score >= 0.62");
        let counts = change_line(POLICY, "counts", &cmp("x.count >= 3"), "5").unwrap();
        assert_eq!(
            counts.new,
            "  - { name: counts, when: 'x.count >= 5', severity: info }"
        );
        assert!(change_line(POLICY, "nope", &c, "1").is_none());
        let diff = unified_diff("p.yaml", POLICY, &[change, counts]);
        assert_eq!(
            diff,
            "--- p.yaml\n+++ p.yaml (proposed)\n@@ -5,6 +5,6 @@\n \n   - name: gibberish\n     description: x\n-    when: gibberish.score >= 0.5\n+    when: gibberish.score >= 0.62\n     severity: warning\n-  - { name: counts, when: 'x.count >= 3', severity: info }\n+  - { name: counts, when: 'x.count >= 5', severity: info }\n"
        );
        assert_eq!(unified_diff("p.yaml", POLICY, &[]), "");
    }
}
