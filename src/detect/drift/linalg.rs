//! The little linear algebra the drift tests need, on plain `Vec<f32>` rows: a random
//! projection (the kernel test works in ~32 dimensions, where distances mean more than in 384;
//! a PCA fitted on the reference was tried and biased the test, see docs/detection.md) and
//! k-means (topics of the reference prompts). Both are deterministic given their generator.

use rand::RngExt;
use rand::rngs::StdRng;

/// Squared Euclidean distance.
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// A linear projection of rows onto fewer dimensions.
#[derive(Debug, Clone)]
pub struct Projection {
    /// `dims` rows of the input width.
    components: Vec<Vec<f32>>,
}

impl Projection {
    /// A random Gaussian projection of `width`-wide rows onto `dims` dimensions (entries
    /// N(0, 1/dims)): distances are kept up to a small factor (Johnson–Lindenstrauss), and,
    /// unlike PCA fitted on the reference, it favours no sample over another.
    pub fn random(width: usize, dims: usize, rng: &mut StdRng) -> Projection {
        let scale = 1.0 / (dims.max(1) as f64).sqrt();
        let components = (0..dims)
            .map(|_| {
                (0..width)
                    .map(|_| {
                        let u1: f64 = rng.random::<f64>().max(1e-300);
                        let u2: f64 = rng.random();
                        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                        (z * scale) as f32
                    })
                    .collect()
            })
            .collect();
        Projection { components }
    }

    /// Projects one row.
    pub fn apply(&self, row: &[f32]) -> Vec<f32> {
        self.components
            .iter()
            .map(|c| c.iter().zip(row).map(|(w, x)| w * x).sum())
            .collect()
    }

    /// Output width.
    pub fn dims(&self) -> usize {
        self.components.len()
    }
}

/// Centroids found by k-means++ seeding and Lloyd iterations.
#[derive(Debug, Clone)]
pub struct KMeans {
    /// One row per cluster.
    pub centroids: Vec<Vec<f32>>,
}

impl KMeans {
    /// Clusters `rows` into at most `k` groups (fewer when there are fewer distinct rows).
    pub fn fit(rows: &[Vec<f32>], k: usize, rng: &mut StdRng) -> KMeans {
        let k = k.min(rows.len());
        if k == 0 {
            return KMeans {
                centroids: Vec::new(),
            };
        }
        let mut centroids: Vec<Vec<f32>> = vec![rows[rng.random_range(0..rows.len())].clone()];
        let mut nearest: Vec<f32> = rows
            .iter()
            .map(|r| squared_distance(r, &centroids[0]))
            .collect();
        while centroids.len() < k {
            let total: f64 = nearest.iter().map(|&d| f64::from(d)).sum();
            if total <= 0.0 {
                break;
            }
            let mut target = rng.random::<f64>() * total;
            let mut chosen = rows.len() - 1;
            for (i, &d) in nearest.iter().enumerate() {
                target -= f64::from(d);
                if target <= 0.0 {
                    chosen = i;
                    break;
                }
            }
            let centre = rows[chosen].clone();
            for (slot, row) in nearest.iter_mut().zip(rows) {
                *slot = slot.min(squared_distance(row, &centre));
            }
            centroids.push(centre);
        }
        let width = rows[0].len();
        let mut kmeans = KMeans { centroids };
        for _ in 0..50 {
            let mut sums = vec![vec![0f64; width]; kmeans.centroids.len()];
            let mut counts = vec![0usize; kmeans.centroids.len()];
            for row in rows {
                let c = kmeans.assign(row);
                counts[c] += 1;
                for (s, v) in sums[c].iter_mut().zip(row) {
                    *s += f64::from(*v);
                }
            }
            let mut moved = false;
            for ((centroid, sum), &count) in kmeans.centroids.iter_mut().zip(&sums).zip(&counts) {
                if count == 0 {
                    continue;
                }
                let next: Vec<f32> = sum.iter().map(|s| (s / count as f64) as f32).collect();
                if squared_distance(&next, centroid) > 1e-10 {
                    moved = true;
                }
                *centroid = next;
            }
            if !moved {
                break;
            }
        }
        kmeans
    }

    /// The index of the nearest centroid.
    pub fn assign(&self, row: &[f32]) -> usize {
        let mut best = (0, f32::INFINITY);
        for (i, c) in self.centroids.iter().enumerate() {
            let d = squared_distance(row, c);
            if d < best.1 {
                best = (i, d);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_random_projection_keeps_distances_roughly() {
        let mut rng = StdRng::seed_from_u64(1);
        let p = Projection::random(384, 64, &mut rng);
        assert_eq!(p.dims(), 64);
        let mut ratios = Vec::new();
        for _ in 0..50 {
            let a: Vec<f32> = (0..384).map(|_| rng.random::<f32>() - 0.5).collect();
            let b: Vec<f32> = (0..384).map(|_| rng.random::<f32>() - 0.5).collect();
            let before = squared_distance(&a, &b);
            let after = squared_distance(&p.apply(&a), &p.apply(&b));
            ratios.push(after / before);
        }
        let mean = ratios.iter().sum::<f32>() / ratios.len() as f32;
        assert!((mean - 1.0).abs() < 0.15, "mean ratio {mean}");
        assert!(ratios.iter().all(|r| (0.4..1.8).contains(r)), "{ratios:?}");
    }

    #[test]
    fn kmeans_separates_well_separated_blobs() {
        let mut rng = StdRng::seed_from_u64(2);
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0]];
        let mut rows = Vec::new();
        for c in &centres {
            for _ in 0..100 {
                rows.push(vec![
                    c[0] + rng.random::<f32>() - 0.5,
                    c[1] + rng.random::<f32>() - 0.5,
                ]);
            }
        }
        let km = KMeans::fit(&rows, 3, &mut rng);
        assert_eq!(km.centroids.len(), 3);
        for blob in rows.chunks(100) {
            let first = km.assign(&blob[0]);
            assert!(blob.iter().all(|r| km.assign(r) == first));
        }
        let labels: std::collections::BTreeSet<usize> =
            rows.chunks(100).map(|b| km.assign(&b[0])).collect();
        assert_eq!(labels.len(), 3);
    }
}
