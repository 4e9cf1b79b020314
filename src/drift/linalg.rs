//! The little linear algebra the drift tests need, on plain `Vec<f32>` rows: a PCA projection
//! (the kernel test works in ~32 dimensions, where distances mean more than in 384) and k-means
//! (topics of the reference prompts). Both are deterministic given their random generator.

use rand::RngExt;
use rand::rngs::StdRng;

/// Squared Euclidean distance.
pub fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// A linear projection onto the top principal components of a set of rows.
#[derive(Debug, Clone)]
pub struct Projection {
    mean: Vec<f32>,
    /// `dims` rows of the input width, orthonormal.
    components: Vec<Vec<f32>>,
}

impl Projection {
    /// Fits the top `dims` principal components of `rows` by orthogonal (subspace) iteration on
    /// their covariance. `rows` must be non-empty and of equal width.
    pub fn fit(rows: &[Vec<f32>], dims: usize, rng: &mut StdRng) -> Projection {
        let width = rows.first().map_or(0, Vec::len);
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0f64; width];
        for row in rows {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += f64::from(*v);
            }
        }
        for m in &mut mean {
            *m /= n;
        }
        // Covariance, width × width, row-major.
        let mut cov = vec![0f64; width * width];
        let mut centred = vec![0f64; width];
        for row in rows {
            for ((c, v), m) in centred.iter_mut().zip(row).zip(&mean) {
                *c = f64::from(*v) - m;
            }
            for i in 0..width {
                let ci = centred[i];
                if ci == 0.0 {
                    continue;
                }
                let line = &mut cov[i * width..(i + 1) * width];
                for (slot, cj) in line.iter_mut().zip(&centred) {
                    *slot += ci * cj;
                }
            }
        }
        for c in &mut cov {
            *c /= n;
        }
        let dims = dims.min(width);
        let mut basis: Vec<Vec<f64>> = (0..dims)
            .map(|_| (0..width).map(|_| rng.random::<f64>() - 0.5).collect())
            .collect();
        orthonormalise(&mut basis);
        for _ in 0..60 {
            let mut next: Vec<Vec<f64>> = basis
                .iter()
                .map(|v| {
                    (0..width)
                        .map(|i| {
                            cov[i * width..(i + 1) * width]
                                .iter()
                                .zip(v)
                                .map(|(a, b)| a * b)
                                .sum()
                        })
                        .collect()
                })
                .collect();
            orthonormalise(&mut next);
            basis = next;
        }
        Projection {
            mean: mean.iter().map(|&m| m as f32).collect(),
            components: basis
                .into_iter()
                .map(|v| v.into_iter().map(|x| x as f32).collect())
                .collect(),
        }
    }

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
        Projection {
            mean: vec![0.0; width],
            components,
        }
    }

    /// Projects one row.
    pub fn apply(&self, row: &[f32]) -> Vec<f32> {
        self.components
            .iter()
            .map(|c| {
                c.iter()
                    .zip(row)
                    .zip(&self.mean)
                    .map(|((w, x), m)| w * (x - m))
                    .sum()
            })
            .collect()
    }

    /// Output width.
    pub fn dims(&self) -> usize {
        self.components.len()
    }
}

/// Modified Gram–Schmidt; a vector that collapses is replaced by a unit axis not yet spanned.
fn orthonormalise(vectors: &mut [Vec<f64>]) {
    for i in 0..vectors.len() {
        let (done, rest) = vectors.split_at_mut(i);
        let v = &mut rest[0];
        for u in done.iter() {
            let dot: f64 = u.iter().zip(v.iter()).map(|(a, b)| a * b).sum();
            for (x, y) in v.iter_mut().zip(u) {
                *x -= dot * y;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-12 {
            for x in v.iter_mut() {
                *x /= norm;
            }
        } else {
            let axis = i % v.len().max(1);
            v.iter_mut().enumerate().for_each(|(j, x)| {
                *x = if j == axis { 1.0 } else { 0.0 };
            });
        }
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
    fn pca_finds_the_direction_of_largest_variance() {
        let mut rng = StdRng::seed_from_u64(1);
        // Variance 9 along (1,1,0)/√2, 1 along z, tiny elsewhere.
        let rows: Vec<Vec<f32>> = (0..2000)
            .map(|_| {
                let a = (rng.random::<f32>() - 0.5) * 3.0 * 12f32.sqrt();
                let b = (rng.random::<f32>() - 0.5) * 12f32.sqrt();
                let c = (rng.random::<f32>() - 0.5) * 0.01;
                vec![a / 2f32.sqrt() + c, a / 2f32.sqrt() - c, b]
            })
            .collect();
        let p = Projection::fit(&rows, 2, &mut rng);
        let first = &p.components[0];
        assert!(
            (first[0].abs() - std::f32::consts::FRAC_1_SQRT_2).abs() < 0.02
                && first[2].abs() < 0.05,
            "{first:?}"
        );
        assert!(p.components[1][2].abs() > 0.98, "{:?}", p.components[1]);
        let dot: f32 = p.components[0]
            .iter()
            .zip(&p.components[1])
            .map(|(a, b)| a * b)
            .sum();
        assert!(dot.abs() < 1e-4);
        assert_eq!(p.apply(&rows[0]).len(), 2);
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
