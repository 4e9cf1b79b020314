//! Which exchanges of a scope the embedding tests see.
//!
//! Embedding every answer costs more than a busy gateway has, so a scope's exchanges are
//! sampled. The tests stay valid only if the sample is an independent thinning of the stream:
//! whether an exchange is taken must not depend on what it says, nor on what was taken before
//! it. So the decision is a keyed hash of the exchange's request id compared with the rate in
//! force: no coin kept in a token bucket, no budget that a burst of one topic can use up.
//!
//! The rate in force is `sample_rate`, raised so that at least `min_sampled_per_minute` and
//! lowered so that at most `max_sampled_per_minute` of the scope's traffic are sampled. The
//! traffic is an exponentially decayed count of arrivals (time constant one minute), updated
//! at every arrival, so the rate follows the load within a few exchanges and a scope's first
//! burst is bounded: at any arrival rate, the first `n` exchanges of a new scope yield about
//! `max_sampled_per_minute × ln n` samples.
//!
//! Replayed faster or slower, the same traffic is sampled at another rate, but at every rate
//! each exchange is taken with a probability fixed before its content is seen: the sampled
//! exchanges are exchangeable draws from the scope's traffic, which is what the tests assume.
//! `tripwire eval-drift --lomo` replays clean streams at several arrival rates through this
//! sampler and counts the false alarms.

use super::EmbeddingDriftConfig;

/// Time constant of the traffic estimate, in seconds.
const TRAFFIC_TIME_CONSTANT_S: f64 = 60.0;

/// The sampling state of one scope.
#[derive(Debug, Clone, Default)]
pub struct Sampler {
    /// Arrivals, each decayed by `exp(−age / 60 s)`: the traffic of the last minute or so.
    load: f64,
    /// When the last exchange arrived, in seconds on the caller's clock.
    last_s: Option<f64>,
    /// Decisions so far.
    decisions: u64,
}

impl Sampler {
    /// Decides for one exchange arriving at `now_s` (seconds on any monotonic clock) whose
    /// request id hashes to `key`. Returns whether to sample it and the rate in force.
    pub fn decide(&mut self, config: &EmbeddingDriftConfig, now_s: f64, key: u64) -> (bool, f64) {
        let decay = match self.last_s {
            Some(last) => (-(now_s - last).max(0.0) / TRAFFIC_TIME_CONSTANT_S).exp(),
            None => 0.0,
        };
        self.load = self.load * decay + 1.0;
        self.last_s = Some(self.last_s.map_or(now_s, |last| last.max(now_s)));
        self.decisions += 1;
        let rate = rate_for(config, self.per_minute());
        (unit_interval(key) < rate, rate)
    }

    /// The scope's traffic, in exchanges a minute.
    pub fn per_minute(&self) -> f64 {
        self.load * 60.0 / TRAFFIC_TIME_CONSTANT_S
    }

    /// Decisions taken so far.
    pub fn decisions(&self) -> u64 {
        self.decisions
    }
}

/// The sample rate for a scope seeing `per_minute` exchanges a minute.
pub fn rate_for(config: &EmbeddingDriftConfig, per_minute: f64) -> f64 {
    let per_minute = per_minute.max(1.0);
    config
        .sample_rate
        .max(config.min_sampled_per_minute / per_minute)
        .min(config.max_sampled_per_minute / per_minute)
        .clamp(0.0, 1.0)
}

/// Maps a 64-bit key to [0, 1) through a bijective mixer (SplitMix64's finaliser), so keys
/// that differ in one bit land far apart.
pub fn unit_interval(key: u64) -> f64 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EmbeddingDriftConfig {
        EmbeddingDriftConfig {
            sample_rate: 0.05,
            min_sampled_per_minute: 6.0,
            max_sampled_per_minute: 120.0,
            ..EmbeddingDriftConfig::default()
        }
    }

    /// Samples a steady stream at `per_second` for `seconds`; returns (sampled, exchanges).
    fn steady(per_second: f64, seconds: f64) -> (usize, usize) {
        let mut sampler = Sampler::default();
        let config = config();
        let n = (per_second * seconds) as usize;
        let sampled = (0..n)
            .filter(|&i| {
                sampler
                    .decide(&config, i as f64 / per_second, i as u64 * 7919)
                    .0
            })
            .count();
        (sampled, n)
    }

    #[test]
    fn the_rate_follows_the_traffic_within_its_bounds() {
        let config = config();
        // 2 a minute: everything (the floor asks for 6).
        assert_eq!(rate_for(&config, 2.0), 1.0);
        // 60 a minute: the floor, 6 of 60.
        assert!((rate_for(&config, 60.0) - 0.1).abs() < 1e-12);
        // 600 a minute: sample_rate.
        assert!((rate_for(&config, 600.0) - 0.05).abs() < 1e-12);
        // 600,000 a minute (10k/s): the cap, 120 a minute.
        assert!((rate_for(&config, 600_000.0) - 2e-4).abs() < 1e-12);
    }

    #[test]
    fn steady_traffic_is_sampled_at_the_configured_share_and_the_cap_holds() {
        // 10/s for 10 minutes: 600 a minute, sample_rate 5% → ~300 of 6,000.
        let (sampled, n) = steady(10.0, 600.0);
        assert_eq!(n, 6000);
        assert!((250..=360).contains(&sampled), "{sampled}");
        // 1,000/s for 5 minutes: capped at 120 a minute → 600, plus the start-up burst while
        // the traffic estimate rises (~520): ~1,120 of 300,000, not 15,000 (sample_rate).
        let (sampled, _) = steady(1000.0, 300.0);
        assert!((950..=1_300).contains(&sampled), "{sampled}");
    }

    #[test]
    fn a_new_scope_burst_is_bounded_whatever_the_arrival_rate() {
        // 100,000 exchanges in one second: about 120 × ln(100,000) ≈ 1,400 samples at most,
        // not 5,000 (sample_rate) nor 100,000.
        let (sampled, _) = steady(100_000.0, 1.0);
        assert!(sampled < 1_800, "{sampled}");
    }

    #[test]
    fn the_decision_depends_on_the_key_and_the_rate_only() {
        let config = config();
        // Same keys, same rate in force: same decisions, however the rate was reached.
        let mut a = Sampler::default();
        let mut b = Sampler::default();
        for i in 0..1000u64 {
            // Both at 600 a minute, reached at different clock origins.
            let (da, ra) = a.decide(&config, 1e6 + i as f64 * 0.1, i);
            let (db, rb) = b.decide(&config, i as f64 * 0.1, i);
            assert_eq!(da, db);
            assert!((ra - rb).abs() < 1e-9 * ra, "{ra} {rb}");
        }
        // Nested: at a lower rate, the sample is a subset of the sample at a higher one.
        for key in 0..10_000u64 {
            if unit_interval(key) < 0.01 {
                assert!(unit_interval(key) < 0.05);
            }
        }
    }

    #[test]
    fn the_unit_interval_is_uniform() {
        let n = 100_000u64;
        let mut bins = [0u32; 10];
        for key in 0..n {
            let u = unit_interval(key);
            assert!((0.0..1.0).contains(&u));
            bins[(u * 10.0) as usize] += 1;
        }
        for count in bins {
            assert!((9_500..=10_500).contains(&count), "{bins:?}");
        }
    }

    #[test]
    fn a_clock_going_backwards_does_not_break_the_estimate() {
        let config = config();
        let mut sampler = Sampler::default();
        sampler.decide(&config, 100.0, 1);
        let (_, rate) = sampler.decide(&config, 50.0, 2);
        assert!(rate.is_finite() && rate > 0.0);
        assert!((sampler.per_minute() - 2.0).abs() < 1e-9);
    }
}
