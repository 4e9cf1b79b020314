//! Online maximum mean discrepancy (MMD) between a reference set of output embeddings and a
//! sliding window of the latest ones, with a threshold calibrated for an expected run time
//! (ERT) between false alarms by simulation on the reference, in the manner of alibi-detect's
//! `MMDDriftOnline`.
//!
//! The statistic is the unbiased MMD² with an RBF kernel whose bandwidth is the median
//! pairwise squared distance of the reference (the median heuristic). Each new point costs one
//! pass over the reference and one over the window.
//!
//! Calibration draws `bootstraps` windows from the reference without replacement, computes the
//! statistic of each against the rest, and sets the threshold so that one window exceeds it
//! with probability `1 / (2·ERT)`: by the union bound the chance of an alarm within the first
//! `T` steps is at most `T / (2·ERT)`, so the expected run time is at least the ERT. (The
//! windows overlap, so the true run time is longer.) An ERT of a million or more is beyond any
//! feasible number of simulated windows, so the far tail is extrapolated from the top 1% of
//! the simulated statistics with an exponential (peaks-over-threshold) fit; the null
//! distribution of MMD² is a weighted sum of χ² variables, whose tail is no heavier than
//! exponential, so the extrapolation errs towards fewer alarms.

use std::collections::VecDeque;
use std::sync::Arc;

use rand::RngExt;
use rand::rngs::StdRng;

use super::linalg::squared_distance;

/// Share of the simulated statistics above the point where the exponential tail begins.
const TAIL_MASS: f64 = 0.01;

/// A fitted reference: points, kernel, and the calibrated threshold.
#[derive(Debug)]
pub struct MmdReference {
    points: Vec<Vec<f32>>,
    /// The RBF kernel is `exp(-d² / bandwidth)`.
    bandwidth: f64,
    /// Mean kernel value over distinct reference pairs.
    reference_term: f64,
    window: usize,
    /// Simulated null statistics, ascending.
    null: Vec<f64>,
    tail_start: f64,
    tail_scale: f64,
    threshold: f64,
}

/// One step's result once the window is full.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MmdStat {
    /// The unbiased MMD² of the window against the reference.
    pub statistic: f64,
    /// The calibrated alarm threshold.
    pub threshold: f64,
    /// The chance that a window from the reference scores at least this high (from the
    /// simulation, extrapolated in the tail): small means drift.
    pub p_value: f64,
    /// `statistic > threshold`.
    pub alarm: bool,
}

impl MmdReference {
    /// Fits the kernel and calibrates the threshold for `ert` steps between false alarms.
    /// Needs at least `window + 10` reference points; returns `None` with fewer.
    pub fn fit(
        points: Vec<Vec<f32>>,
        window: usize,
        ert: f64,
        bootstraps: usize,
        rng: &mut StdRng,
    ) -> Option<MmdReference> {
        MmdReference::fit_scaled(points, window, ert, bootstraps, 1.0, rng)
    }

    /// Like [`MmdReference::fit`], with the median-heuristic bandwidth multiplied by
    /// `bandwidth_scale`.
    pub fn fit_scaled(
        points: Vec<Vec<f32>>,
        window: usize,
        ert: f64,
        bootstraps: usize,
        bandwidth_scale: f64,
        rng: &mut StdRng,
    ) -> Option<MmdReference> {
        let n = points.len();
        if window < 2 || n < window + 10 {
            return None;
        }
        let mut distances = Vec::with_capacity(n * (n - 1) / 2);
        for i in 0..n {
            for j in (i + 1)..n {
                distances.push(f64::from(squared_distance(&points[i], &points[j])));
            }
        }
        let mid = distances.len() / 2;
        let bandwidth = {
            // On a copy: selection reorders, and `distances` is read in pair order below.
            let mut sorted = distances.clone();
            let (_, median, _) = sorted.select_nth_unstable_by(mid, f64::total_cmp);
            (*median * bandwidth_scale).max(1e-12)
        };
        // Kernel matrix and row sums (diagonal excluded).
        let mut kernel = vec![0f64; n * n];
        let mut index = 0;
        for i in 0..n {
            kernel[i * n + i] = 1.0;
            for j in (i + 1)..n {
                let k = (-distances[index] / bandwidth).exp();
                kernel[i * n + j] = k;
                kernel[j * n + i] = k;
                index += 1;
            }
        }
        let row_sums: Vec<f64> = (0..n)
            .map(|i| kernel[i * n..(i + 1) * n].iter().sum::<f64>() - 1.0)
            .collect();
        let total: f64 = row_sums.iter().sum();
        let reference_term = total / (n * (n - 1)) as f64;

        let w = window;
        let m = n - w;
        let mut order: Vec<usize> = (0..n).collect();
        let mut null = Vec::with_capacity(bootstraps.max(100));
        for _ in 0..bootstraps.max(100) {
            // Partial Fisher–Yates: the first `w` entries become a random window.
            for i in 0..w {
                let j = rng.random_range(i..n);
                order.swap(i, j);
            }
            let members = &order[..w];
            let mut within = 0.0;
            for (a, &i) in members.iter().enumerate() {
                let row = &kernel[i * n..(i + 1) * n];
                for &j in &members[a + 1..] {
                    within += row[j];
                }
            }
            within *= 2.0;
            let cross: f64 = members.iter().map(|&i| row_sums[i]).sum::<f64>() - within;
            let rest = total - 2.0 * cross - within;
            let statistic = within / (w * (w - 1)) as f64 + rest / (m * (m - 1)) as f64
                - 2.0 * cross / (w * m) as f64;
            null.push(statistic);
        }
        null.sort_by(f64::total_cmp);
        let (tail_start, tail_scale) = exponential_tail(&null);
        let per_step = 1.0 / (2.0 * ert.max(1.0));
        let threshold = if per_step >= TAIL_MASS {
            quantile(&null, 1.0 - per_step)
        } else {
            tail_start + tail_scale * (TAIL_MASS / per_step).ln()
        };
        Some(MmdReference {
            points,
            bandwidth,
            reference_term,
            window,
            null,
            tail_start,
            tail_scale,
            threshold,
        })
    }

    /// The calibrated threshold.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The window length the threshold was calibrated for.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Number of reference points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the reference is empty (never, once fitted).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    fn kernel(&self, a: &[f32], b: &[f32]) -> f64 {
        (-f64::from(squared_distance(a, b)) / self.bandwidth).exp()
    }

    fn mean_kernel_to_reference(&self, x: &[f32]) -> f64 {
        self.points.iter().map(|r| self.kernel(x, r)).sum::<f64>() / self.points.len() as f64
    }

    /// The chance that a reference window scores at least `statistic`.
    pub fn p_value(&self, statistic: f64) -> f64 {
        if statistic > self.tail_start {
            return TAIL_MASS * (-(statistic - self.tail_start) / self.tail_scale).exp();
        }
        let below = self.null.partition_point(|&s| s < statistic);
        (self.null.len() - below + 1) as f64 / (self.null.len() + 1) as f64
    }
}

/// Start and mean excess of the top [`TAIL_MASS`] of `sorted`.
fn exponential_tail(sorted: &[f64]) -> (f64, f64) {
    let start = quantile(sorted, 1.0 - TAIL_MASS);
    let excess: Vec<f64> = sorted
        .iter()
        .filter(|&&s| s > start)
        .map(|s| s - start)
        .collect();
    let scale = if excess.is_empty() {
        0.0
    } else {
        excess.iter().sum::<f64>() / excess.len() as f64
    };
    // A degenerate simulation (identical points) still gets a usable, tiny scale.
    (start, scale.max(1e-12))
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let position = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[position.min(sorted.len() - 1)]
}

/// One window sliding over a stream, tested against a shared reference.
#[derive(Debug, Clone)]
pub struct OnlineMmd {
    reference: Arc<MmdReference>,
    /// Each point with its mean kernel value to the reference.
    window: VecDeque<(Vec<f32>, f64)>,
    /// Sum of the kernel over distinct unordered pairs in the window.
    within: f64,
}

impl OnlineMmd {
    /// An empty window over `reference`.
    pub fn new(reference: Arc<MmdReference>) -> OnlineMmd {
        OnlineMmd {
            window: VecDeque::with_capacity(reference.window + 1),
            reference,
            within: 0.0,
        }
    }

    /// The reference this window is tested against.
    pub fn reference(&self) -> &Arc<MmdReference> {
        &self.reference
    }

    /// Adds a projected point; once the window is full, returns the test of the latest window.
    pub fn push(&mut self, point: Vec<f32>) -> Option<MmdStat> {
        let reference = Arc::clone(&self.reference);
        if self.window.len() == reference.window
            && let Some((old, _)) = self.window.pop_front()
        {
            self.within -= self
                .window
                .iter()
                .map(|(p, _)| reference.kernel(&old, p))
                .sum::<f64>();
        }
        self.within += self
            .window
            .iter()
            .map(|(p, _)| reference.kernel(&point, p))
            .sum::<f64>();
        let to_reference = reference.mean_kernel_to_reference(&point);
        self.window.push_back((point, to_reference));
        if self.window.len() < reference.window {
            return None;
        }
        let w = self.window.len() as f64;
        let cross = self.window.iter().map(|(_, k)| k).sum::<f64>() / w;
        let statistic =
            2.0 * self.within / (w * (w - 1.0)) + reference.reference_term - 2.0 * cross;
        Some(MmdStat {
            statistic,
            threshold: reference.threshold,
            p_value: reference.p_value(statistic),
            alarm: statistic > reference.threshold,
        })
    }

    /// Empties the window (after an alarm, so the next one needs fresh evidence).
    pub fn reset(&mut self) {
        self.window.clear();
        self.within = 0.0;
    }

    /// Points in the window.
    pub fn len(&self) -> usize {
        self.window.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gaussian(rng: &mut StdRng, dims: usize, shift: f32) -> Vec<f32> {
        (0..dims)
            .map(|d| {
                // Box–Muller.
                let u1: f64 = rng.random::<f64>().max(1e-12);
                let u2: f64 = rng.random();
                let z = ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32;
                z + if d == 0 { shift } else { 0.0 }
            })
            .collect()
    }

    #[test]
    fn the_online_statistic_matches_the_definition() {
        let mut rng = StdRng::seed_from_u64(3);
        let points: Vec<Vec<f32>> = (0..60).map(|_| gaussian(&mut rng, 4, 0.0)).collect();
        let reference =
            Arc::new(MmdReference::fit(points.clone(), 5, 100.0, 200, &mut rng).unwrap());
        let mut online = OnlineMmd::new(Arc::clone(&reference));
        let stream: Vec<Vec<f32>> = (0..12).map(|_| gaussian(&mut rng, 4, 0.5)).collect();
        let mut last = None;
        for p in &stream {
            last = online.push(p.clone());
        }
        let window = &stream[7..];
        let k = |a: &[f32], b: &[f32]| reference.kernel(a, b);
        let mut ww = 0.0;
        for i in 0..5 {
            for j in 0..5 {
                if i != j {
                    ww += k(&window[i], &window[j]);
                }
            }
        }
        let mut rr = 0.0;
        for i in 0..60 {
            for j in 0..60 {
                if i != j {
                    rr += k(&points[i], &points[j]);
                }
            }
        }
        let mut wr = 0.0;
        for x in window {
            for r in &points {
                wr += k(x, r);
            }
        }
        let expected = ww / 20.0 + rr / (60.0 * 59.0) - 2.0 * wr / (5.0 * 60.0);
        let got = last.unwrap().statistic;
        assert!((got - expected).abs() < 1e-9, "{got} vs {expected}");
    }

    #[test]
    fn no_alarm_on_the_reference_distribution_and_an_alarm_after_a_shift() {
        let mut rng = StdRng::seed_from_u64(4);
        let points: Vec<Vec<f32>> = (0..400).map(|_| gaussian(&mut rng, 8, 0.0)).collect();
        let reference = Arc::new(MmdReference::fit(points, 40, 1e6, 5_000, &mut rng).unwrap());
        let mut online = OnlineMmd::new(Arc::clone(&reference));
        // Calibration: windows of fresh reference-distribution points score p ≤ 0.05 about 5%
        // of the time (windows overlap, so count every 40th: disjoint windows).
        let mut small = 0;
        let mut tested = 0;
        for t in 0..12_000 {
            if let Some(stat) = online.push(gaussian(&mut rng, 8, 0.0)) {
                assert!(!stat.alarm, "false alarm: {stat:?}");
                assert!(stat.p_value > 0.0 && stat.p_value <= 1.0);
                if t % 40 == 0 {
                    tested += 1;
                    small += usize::from(stat.p_value <= 0.05);
                }
            }
        }
        let share = small as f64 / f64::from(tested);
        assert!(
            (0.01..0.1).contains(&share),
            "P(p ≤ 0.05) = {share} over {tested} windows"
        );
        let mut delay = None;
        for t in 1..=200 {
            if online
                .push(gaussian(&mut rng, 8, 1.5))
                .is_some_and(|s| s.alarm)
            {
                delay = Some(t);
                break;
            }
        }
        let delay = delay.expect("a 1.5σ shift must be alarmed within 200 points");
        assert!(delay <= 40, "delay {delay}");
    }

    #[test]
    fn a_larger_ert_raises_the_threshold() {
        let mut rng = StdRng::seed_from_u64(5);
        let points: Vec<Vec<f32>> = (0..200).map(|_| gaussian(&mut rng, 4, 0.0)).collect();
        let low = MmdReference::fit(
            points.clone(),
            20,
            100.0,
            2_000,
            &mut StdRng::seed_from_u64(9),
        )
        .unwrap();
        let high =
            MmdReference::fit(points, 20, 1e6, 2_000, &mut StdRng::seed_from_u64(9)).unwrap();
        assert!(high.threshold() > low.threshold());
        assert!(high.p_value(high.threshold()) < low.p_value(low.threshold()));
    }

    #[test]
    fn too_small_a_reference_is_refused() {
        let mut rng = StdRng::seed_from_u64(6);
        let points: Vec<Vec<f32>> = (0..20).map(|_| gaussian(&mut rng, 4, 0.0)).collect();
        assert!(MmdReference::fit(points, 20, 100.0, 100, &mut rng).is_none());
    }
}
