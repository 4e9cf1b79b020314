//! Sequential change detection on one per-response score (length, gibberish score, refusal
//! score, …): each new score becomes a conformal p-value against the reference scores, and a
//! CUSUM e-detector over those p-values raises the alarm.
//!
//! The randomised conformal p-value of a score among `n` reference scores is uniform when the
//! score and the reference are exchangeable (no drift), ties included. Each p-value is turned
//! into an e-value `e(p) = mean over κ of κ·p^(κ−1)` (a mixture of power calibrators: its
//! mean is 1 under uniform p, and it grows as p-values pile up near 0), and the CUSUM
//! recursion `M_t = e_t · max(M_{t−1}, 1)` alarms when `M_t ≥ ERT`. For a CUSUM e-detector
//! the average run length before a false alarm is at least the threshold (Shin, Ramdas and
//! Rinaldo, "E-detectors", 2023). Drift in either direction is watched by two detectors, on
//! `p` and on `1 − p`, each with twice the ERT.

use rand::RngExt;
use rand::rngs::StdRng;

/// The exponents of the power calibrators mixed into one e-value.
const KAPPAS: [f64; 4] = [0.1, 0.25, 0.5, 0.75];

/// One step's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CusumStat {
    /// The conformal p-value of the score being unusually high.
    pub p_high: f64,
    /// `ln M_t`, the larger of the two directions.
    pub statistic: f64,
    /// `ln` of the alarm threshold.
    pub threshold: f64,
    /// Which way the scores moved when the statistic is driven by one side: `"up"` or `"down"`.
    pub direction: &'static str,
    /// `statistic ≥ threshold`.
    pub alarm: bool,
}

/// Which way of a score's change a test watches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Watch {
    /// Both ways, each with twice the expected run time.
    #[default]
    Both,
    /// Rising scores only, with the whole expected run time.
    Up,
    /// Falling scores only, with the whole expected run time.
    Down,
}

/// How a conformal p-value becomes an e-value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Calibrator {
    /// The mixture of power calibrators: for shifts of the whole distribution.
    PowerMixture,
    /// `rho` when `p ≤ alpha`, else `(1 − rho·alpha) / (1 − alpha)`: its mean is exactly 1
    /// under uniform p-values, and it grows when unusual scores come `rho` times as often as
    /// they should. For a rare kind of answer that appears in a small share of a stream (a
    /// slant on one subject), where the power calibrators lose more on each ordinary answer
    /// than they gain on each unusual one.
    Exceedance {
        /// The p-value at or under which a score is unusual.
        alpha: f64,
        /// How many times as often unusual scores come under the alternative.
        rho: f64,
    },
}

/// A CUSUM over conformal p-values of one score, two-sided unless told otherwise.
#[derive(Debug, Clone)]
pub struct ConformalCusum {
    reference: Vec<f64>,
    evidence: Evidence,
}

impl ConformalCusum {
    /// A detector against `reference` scores (any order; NaNs dropped) alarming at an
    /// expected run time of `ert` steps.
    pub fn new(reference: Vec<f64>, ert: f64) -> ConformalCusum {
        ConformalCusum::watching(reference, ert, Watch::Both)
    }

    /// A detector watching one way (or both) of a change, at an expected run time of `ert`.
    pub fn watching(reference: Vec<f64>, ert: f64, watch: Watch) -> ConformalCusum {
        ConformalCusum::calibrated(reference, ert, watch, Calibrator::PowerMixture)
    }

    /// A detector with its own calibrator.
    pub fn calibrated(
        mut reference: Vec<f64>,
        ert: f64,
        watch: Watch,
        calibrator: Calibrator,
    ) -> ConformalCusum {
        reference.retain(|v| !v.is_nan());
        reference.sort_by(f64::total_cmp);
        ConformalCusum {
            reference,
            evidence: Evidence::new(ert, watch, calibrator),
        }
    }

    /// Reference size.
    pub fn len(&self) -> usize {
        self.reference.len()
    }

    /// Whether the reference is empty.
    pub fn is_empty(&self) -> bool {
        self.reference.is_empty()
    }

    /// The randomised conformal p-values of `score` being high and being low.
    pub fn p_values(&self, score: f64, rng: &mut StdRng) -> (f64, f64) {
        let (p_high, p_low, _) = rank(&self.reference, score, rng);
        (p_high, p_low)
    }

    /// Adds one score. After an alarm, call [`ConformalCusum::reset`] to start afresh.
    pub fn observe(&mut self, score: f64, rng: &mut StdRng) -> Option<CusumStat> {
        if score.is_nan() || self.reference.is_empty() {
            return None;
        }
        let (p_high, p_low) = self.p_values(score, rng);
        Some(self.evidence.add(p_high, p_low))
    }

    /// Forgets the evidence gathered so far.
    pub fn reset(&mut self) {
        self.evidence.reset();
    }
}

/// The randomised conformal p-values of `score` being high and being low, ranked among the
/// `sorted` scores and itself (ties shared at random), and where it would go in `sorted`.
fn rank(sorted: &[f64], score: f64, rng: &mut StdRng) -> (f64, f64, usize) {
    let n = sorted.len() as f64;
    let below = sorted.partition_point(|&r| r < score);
    let not_above = sorted.partition_point(|&r| r <= score);
    let ties = (not_above - below) as f64;
    let above = n - not_above as f64;
    let u: f64 = rng.random();
    let v: f64 = rng.random();
    let p_high = (above + u * (ties + 1.0)) / (n + 1.0);
    let p_low = (below as f64 + v * (ties + 1.0)) / (n + 1.0);
    (
        p_high.clamp(f64::MIN_POSITIVE, 1.0),
        p_low.clamp(f64::MIN_POSITIVE, 1.0),
        not_above,
    )
}

/// The evidence of one stream of p-values: a CUSUM of log e-values for scores rising and one
/// for scores falling, as `watch` asks, against one threshold.
#[derive(Debug, Clone)]
struct Evidence {
    log_threshold: f64,
    watch: Watch,
    calibrator: Calibrator,
    up: f64,
    down: f64,
}

impl Evidence {
    /// Two-sided, each side gets twice `ert`; one-sided, the side gets all of it.
    fn new(ert: f64, watch: Watch, calibrator: Calibrator) -> Evidence {
        let sides = if watch == Watch::Both { 2.0 } else { 1.0 };
        Evidence {
            log_threshold: (sides * ert.max(1.0)).ln(),
            watch,
            calibrator,
            up: 0.0,
            down: 0.0,
        }
    }

    fn add(&mut self, p_high: f64, p_low: f64) -> CusumStat {
        if self.watch != Watch::Down {
            self.up = self.up.max(0.0) + self.calibrator.log_e_value(p_high);
        }
        if self.watch != Watch::Up {
            self.down = self.down.max(0.0) + self.calibrator.log_e_value(p_low);
        }
        let (statistic, direction) = if self.up >= self.down {
            (self.up, "up")
        } else {
            (self.down, "down")
        };
        CusumStat {
            p_high,
            statistic: statistic.max(0.0),
            threshold: self.log_threshold,
            direction,
            alarm: statistic >= self.log_threshold,
        }
    }

    fn reset(&mut self) {
        self.up = 0.0;
        self.down = 0.0;
    }
}

impl Calibrator {
    /// `ln e(p)`.
    pub fn log_e_value(self, p: f64) -> f64 {
        match self {
            Calibrator::PowerMixture => log_e_value(p),
            Calibrator::Exceedance { alpha, rho } => {
                if p <= alpha {
                    rho.ln()
                } else {
                    ((1.0 - rho * alpha) / (1.0 - alpha))
                        .max(f64::MIN_POSITIVE)
                        .ln()
                }
            }
        }
    }
}

/// A CUSUM over *online* conformal p-values: each score is ranked among every score seen
/// before it and itself (randomised for ties), then joins them. Under exchangeability these
/// p-values are independent and uniform (Vovk, Nouretdinov and Gammerman, "Testing
/// exchangeability on-line", 2003), whatever the number seen, so a small group of scores (one
/// prompt topic's) is tested soundly from its first few; against a fixed reference of a few
/// dozen scores, the p-values would share that reference's luck and a CUSUM over them drifts
/// (measured: 18–42 false alarms per 200,000 clean exchanges). The scores kept stop growing at
/// `cap`, after which the test runs against them as a fixed reference.
#[derive(Debug, Clone)]
pub struct OnlineConformalCusum {
    seen: Vec<f64>,
    min: usize,
    cap: usize,
    evidence: Evidence,
}

impl OnlineConformalCusum {
    /// Starts from `prior` scores (earlier observations of the same stream), testing once `min`
    /// are seen, keeping at most `cap`, alarming at an expected run time of `ert`.
    pub fn new(
        mut prior: Vec<f64>,
        min: usize,
        cap: usize,
        ert: f64,
        watch: Watch,
        calibrator: Calibrator,
    ) -> OnlineConformalCusum {
        prior.retain(|v| !v.is_nan());
        prior.truncate(cap);
        prior.sort_by(f64::total_cmp);
        OnlineConformalCusum {
            seen: prior,
            min,
            cap,
            evidence: Evidence::new(ert, watch, calibrator),
        }
    }

    /// Scores seen (kept).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether none is seen yet.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Adds one score; `None` until `min` scores were seen before it.
    pub fn observe(&mut self, score: f64, rng: &mut StdRng) -> Option<CusumStat> {
        if score.is_nan() {
            return None;
        }
        let testing = self.seen.len() >= self.min;
        let (p_high, p_low, at) = rank(&self.seen, score, rng);
        if self.seen.len() < self.cap {
            self.seen.insert(at, score);
        }
        testing.then(|| self.evidence.add(p_high, p_low))
    }

    /// Forgets the evidence gathered so far (not the scores seen).
    pub fn reset(&mut self) {
        self.evidence.reset();
    }
}

/// `ln e(p)` for the mixture of power calibrators.
fn log_e_value(p: f64) -> f64 {
    let e = KAPPAS.iter().map(|k| k * p.powf(k - 1.0)).sum::<f64>() / KAPPAS.len() as f64;
    e.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_e_value_has_mean_one_under_uniform_p() {
        // ∫₀¹ κ p^(κ−1) dp = 1 for each κ; check the mixture numerically (midpoint rule on a
        // log grid, as the integrand is singular at 0).
        let steps = 200_000;
        let mut integral = 0.0;
        let lo: f64 = 1e-150;
        for i in 0..steps {
            let a = lo.powf(1.0 - i as f64 / steps as f64);
            let b = lo.powf(1.0 - (i + 1) as f64 / steps as f64);
            let mid = (a * b).sqrt();
            integral += log_e_value(mid).exp() * (b - a);
        }
        assert!((integral - 1.0).abs() < 0.01, "{integral}");
    }

    #[test]
    fn p_values_are_uniform_under_exchangeability_even_with_ties() {
        let mut rng = StdRng::seed_from_u64(1);
        // A score that is 0 most of the time: heavy ties.
        let draw = |rng: &mut StdRng| {
            if rng.random::<f64>() < 0.8 {
                0.0
            } else {
                rng.random::<f64>()
            }
        };
        let mut below_tenth = 0;
        let trials = 4_000;
        for _ in 0..trials {
            let reference: Vec<f64> = (0..50).map(|_| draw(&mut rng)).collect();
            let cusum = ConformalCusum::new(reference, 100.0);
            let (p, _) = cusum.p_values(draw(&mut rng), &mut rng);
            if p <= 0.1 {
                below_tenth += 1;
            }
        }
        let share = f64::from(below_tenth) / f64::from(trials);
        assert!((share - 0.1).abs() < 0.02, "P(p ≤ 0.1) = {share}");
    }

    #[test]
    fn no_alarm_without_drift_and_a_quick_alarm_after_a_shift() {
        let mut rng = StdRng::seed_from_u64(2);
        let reference: Vec<f64> = (0..500).map(|_| rng.random::<f64>()).collect();
        let mut cusum = ConformalCusum::new(reference, 1e6);
        for _ in 0..20_000 {
            let stat = cusum.observe(rng.random::<f64>(), &mut rng).unwrap();
            assert!(!stat.alarm, "false alarm {stat:?}");
        }
        // A fifth of the scores now land above every reference score.
        let mut delay = None;
        for t in 1..=1_000 {
            let score = if rng.random::<f64>() < 0.2 {
                2.0
            } else {
                rng.random::<f64>()
            };
            if cusum.observe(score, &mut rng).unwrap().alarm {
                delay = Some(t);
                break;
            }
        }
        let delay = delay.expect("alarm");
        assert!(delay < 300, "delay {delay}");
    }

    #[test]
    fn a_downward_shift_is_alarmed_too() {
        let mut rng = StdRng::seed_from_u64(3);
        let reference: Vec<f64> = (0..500).map(|_| 1.0 + rng.random::<f64>()).collect();
        let mut cusum = ConformalCusum::new(reference, 1e6);
        let alarmed = (0..200).find_map(|t| {
            let stat = cusum.observe(0.5, &mut rng).unwrap();
            stat.alarm.then_some((t, stat.direction))
        });
        let (t, direction) = alarmed.expect("alarm");
        assert_eq!(direction, "down");
        assert!(t < 20, "{t}");
    }

    #[test]
    fn a_one_sided_test_ignores_the_other_way() {
        let reference: Vec<f64> = (0..500).map(f64::from).collect();
        let mut rng = StdRng::seed_from_u64(7);
        let mut up = ConformalCusum::watching(reference.clone(), 1e6, Watch::Up);
        let mut both = ConformalCusum::new(reference, 1e6);
        let (mut up_alarms, mut both_alarms) = (0, 0);
        // Scores fall below the whole reference: only the two-sided test alarms.
        for _ in 0..200 {
            up_alarms += usize::from(up.observe(-1.0, &mut rng).is_some_and(|s| s.alarm));
            both_alarms += usize::from(both.observe(-1.0, &mut rng).is_some_and(|s| s.alarm));
        }
        assert_eq!(up_alarms, 0);
        assert!(both_alarms > 0);
        // Scores rise above it: the one-sided test alarms, and sooner (its whole budget).
        let mut first = None;
        for t in 0..200 {
            if up.observe(1e9, &mut rng).is_some_and(|s| s.alarm) {
                first = Some(t);
                break;
            }
        }
        assert!(first.is_some());
    }

    #[test]
    fn the_exceedance_calibrator_is_fair_and_sees_a_rare_kind_the_mixture_misses() {
        let exceedance = Calibrator::Exceedance {
            alpha: 0.05,
            rho: 4.0,
        };
        // Mean e-value 1 under uniform p-values (midpoint rule over [0, 1]).
        let n = 100_000;
        let mean: f64 = (0..n)
            .map(|i| exceedance.log_e_value((i as f64 + 0.5) / n as f64).exp())
            .sum::<f64>()
            / n as f64;
        assert!((mean - 1.0).abs() < 1e-3, "{mean}");
        // 15% of the answers are of a kind the reference holds 4% of (its top scores, not
        // beyond them), the rest are as before: the exceedance CUSUM alarms, the power mixture
        // loses more on each ordinary answer than it gains on each unusual one.
        let reference: Vec<f64> = (0..300).map(|i| if i < 12 { 1.0 } else { 0.0 }).collect();
        let mut rng = StdRng::seed_from_u64(3);
        let mut rare = ConformalCusum::calibrated(reference.clone(), 1e6, Watch::Up, exceedance);
        let mut mixture = ConformalCusum::watching(reference, 1e6, Watch::Up);
        let (mut rare_alarm, mut mixture_alarm) = (None, None);
        for t in 0..2_000 {
            let score = if rng.random_bool(0.15) { 1.0 } else { 0.0 };
            if rare_alarm.is_none() && rare.observe(score, &mut rng).is_some_and(|s| s.alarm) {
                rare_alarm = Some(t);
            }
            if mixture_alarm.is_none() && mixture.observe(score, &mut rng).is_some_and(|s| s.alarm)
            {
                mixture_alarm = Some(t);
            }
        }
        assert!(rare_alarm.is_some_and(|t| t < 500), "{rare_alarm:?}");
        assert_eq!(mixture_alarm, None);
    }

    #[test]
    fn online_p_values_of_a_small_group_stay_uniform_and_raise_no_alarm() {
        // 400 groups of 30 prior scores, 400 more each: with a fixed reference of 30 the
        // exceedance CUSUM alarms in some groups (their reference's luck); online, in none.
        let calibrator = Calibrator::Exceedance {
            alpha: 0.05,
            rho: 4.0,
        };
        let mut rng = StdRng::seed_from_u64(11);
        let (mut fixed_alarms, mut online_alarms, mut low) = (0, 0, 0usize);
        let mut tested = 0usize;
        for _ in 0..400 {
            let prior: Vec<f64> = (0..30).map(|_| rng.random::<f64>()).collect();
            let mut fixed = ConformalCusum::calibrated(prior.clone(), 1e6, Watch::Up, calibrator);
            let mut online =
                OnlineConformalCusum::new(prior, 20, 2_000, 1e6, Watch::Up, calibrator);
            for _ in 0..400 {
                let score: f64 = rng.random();
                fixed_alarms +=
                    usize::from(fixed.observe(score, &mut rng).is_some_and(|s| s.alarm));
                if let Some(stat) = online.observe(score, &mut rng) {
                    tested += 1;
                    low += usize::from(stat.p_high <= 0.05);
                    if stat.alarm {
                        online_alarms += 1;
                        online.reset();
                    }
                }
            }
        }
        let share = low as f64 / tested as f64;
        assert!((share - 0.05).abs() < 0.005, "{share}");
        assert_eq!(online_alarms, 0);
        assert!(
            fixed_alarms > 0,
            "the fixed reference was expected to drift"
        );
    }
}
