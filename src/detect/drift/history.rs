//! A bounded, downsampled record of each drift test's statistic over a scope's life, for the
//! console's drift charts. The drift worker appends (off the request path); the admin side
//! reads a copy. Each test keeps at most [`HISTORY_POINTS`] points: when full, neighbouring
//! points merge pairwise (the larger statistic, any alarm kept) and later results are merged
//! into points twice as wide, so an alarm is never lost and the memory never grows.

use super::reference::Reference;
use super::scope::TestResult;

/// Most points kept per test.
pub const HISTORY_POINTS: usize = 240;

/// One point of a test's history: the largest statistic over its observations.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DriftPoint {
    /// The scope's observation count at the point's last result.
    pub observation: u64,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// The statistic (the largest over the merged results).
    pub statistic: f64,
    /// The alarm threshold at the point's last result.
    pub threshold: f64,
    /// Whether any merged result alarmed.
    pub alarm: bool,
}

/// Where a test's reference came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReferenceInfo {
    /// `learned` or the file it was built from.
    pub source: String,
    /// When it was completed (RFC 3339).
    pub created_at: String,
}

/// The history of one test of one detector.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TestHistory {
    /// The detector's name.
    pub detector: String,
    /// The test (`mmd`, `mmd/topic-2`, a feature).
    pub test: String,
    /// The observation of the first result: observations before it built the reference
    /// (1 when a stored or offline reference was tested against from the start).
    pub first_tested: u64,
    /// The reference tested against.
    pub reference: Option<ReferenceInfo>,
    /// Results so far.
    pub results: u64,
    /// Alarms so far.
    pub alarms: u64,
    /// The points, oldest first.
    pub points: Vec<DriftPoint>,
    /// Results per point now.
    #[serde(skip)]
    stride: u64,
    /// The point being filled.
    #[serde(skip)]
    open: Option<(DriftPoint, u64)>,
}

impl TestHistory {
    fn new(detector: &str, test: &str, first_tested: u64) -> TestHistory {
        TestHistory {
            detector: detector.to_owned(),
            test: test.to_owned(),
            first_tested,
            reference: None,
            results: 0,
            alarms: 0,
            points: Vec::new(),
            stride: 1,
            open: None,
        }
    }

    fn push(&mut self, observation: u64, at_ms: i64, result: &TestResult) {
        self.results += 1;
        self.alarms += u64::from(result.alarm);
        let point = DriftPoint {
            observation,
            at_ms,
            statistic: result.statistic,
            threshold: result.threshold,
            alarm: result.alarm,
        };
        let (merged, count) = match self.open.take() {
            Some((open, count)) => (merge(&open, &point), count + 1),
            None => (point, 1),
        };
        if count < self.stride {
            self.open = Some((merged, count));
            return;
        }
        self.points.push(merged);
        if self.points.len() >= HISTORY_POINTS {
            self.points = self
                .points
                .chunks(2)
                .filter_map(|pair| pair.iter().cloned().reduce(|a, b| merge(&a, &b)))
                .collect();
            self.stride *= 2;
        }
    }

    /// The points, with the one being filled.
    pub fn all_points(&self) -> Vec<DriftPoint> {
        let mut points = self.points.clone();
        if let Some((open, _)) = &self.open {
            points.push(open.clone());
        }
        points
    }
}

/// `a` then `b` as one point.
fn merge(a: &DriftPoint, b: &DriftPoint) -> DriftPoint {
    DriftPoint {
        observation: b.observation,
        at_ms: b.at_ms,
        statistic: a.statistic.max(b.statistic),
        threshold: b.threshold,
        alarm: a.alarm || b.alarm,
    }
}

/// The histories of one scope's tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScopeHistory {
    /// The scope's observations so far.
    pub observed: u64,
    /// One per test that has produced a result.
    pub tests: Vec<TestHistory>,
}

impl ScopeHistory {
    /// Records `result` of `detector` at the scope's `observation`.
    pub fn record(
        &mut self,
        observation: u64,
        detector: &str,
        result: &TestResult,
        reference: Option<&Reference>,
    ) {
        self.observed = observation;
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let index = match self
            .tests
            .iter()
            .position(|t| t.detector == detector && t.test == result.test)
        {
            Some(index) => index,
            None => {
                self.tests
                    .push(TestHistory::new(detector, &result.test, observation));
                self.tests.len() - 1
            }
        };
        if let Some(test) = self.tests.get_mut(index) {
            if let Some(reference) = reference {
                test.reference = Some(ReferenceInfo {
                    source: reference.source.clone(),
                    created_at: reference.created_at.clone(),
                });
            }
            test.push(observation, at_ms, result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(statistic: f64, alarm: bool) -> TestResult {
        TestResult {
            test: "length".to_owned(),
            statistic,
            threshold: 5.0,
            p_value: 0.5,
            direction: None,
            alarm,
            topic: None,
        }
    }

    #[test]
    fn history_stays_bounded_and_keeps_every_alarm() {
        let mut history = ScopeHistory::default();
        for i in 0..10_000u64 {
            let alarm = i == 1234 || i == 9_998;
            history.record(
                i + 41,
                "feature_drift",
                &result(if alarm { 9.0 } else { 1.0 }, alarm),
                None,
            );
        }
        let test = &history.tests[0];
        assert_eq!(test.first_tested, 41);
        assert_eq!(test.results, 10_000);
        assert_eq!(test.alarms, 2);
        let points = test.all_points();
        assert!(points.len() <= HISTORY_POINTS + 1, "{}", points.len());
        assert!(points.len() >= HISTORY_POINTS / 2);
        assert_eq!(points.iter().filter(|p| p.alarm).count(), 2);
        assert!(
            points
                .iter()
                .filter(|p| p.alarm)
                .all(|p| p.statistic == 9.0)
        );
        assert!(
            points
                .windows(2)
                .all(|w| w[0].observation < w[1].observation)
        );
        assert_eq!(points.last().unwrap().observation, 10_040);
    }
}
