//! Drift charts as SVG drawn on the server: one test's statistic over the scope's
//! observations against its alarm threshold, alarms as dots, and the observations that built
//! the reference shaded. No script and no style attribute: the stylesheet colours the classes.

use super::html::Html;
use crate::detect::drift::history::TestHistory;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 30.0;

/// The chart of one test.
pub fn drift_chart(test: &TestHistory) -> Html {
    let points = test.all_points();
    let last = points.last().map_or(test.first_tested, |p| p.observation);
    let x_max = last.max(test.first_tested).max(1) as f64;
    let values = points
        .iter()
        .flat_map(|p| [p.statistic, p.threshold])
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((0.0_f64, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let hi = if hi - lo < 1e-12 {
        lo + 1.0
    } else {
        hi + (hi - lo) * 0.08
    };
    let x = |obs: u64| LEFT + (obs as f64 / x_max) * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| {
        let v = if v.is_finite() { v.clamp(lo, hi) } else { hi };
        TOP + (1.0 - (v - lo) / (hi - lo)) * (HEIGHT - TOP - BOTTOM)
    };
    let mut svg = Html::new();
    svg.raw("<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 720 180\" role=\"img\" aria-label=\"")
        .text(&format!(
            "{} {}: statistic against threshold over {} observations, {} alarms",
            test.detector, test.test, last, test.alarms
        ))
        .raw("\">");
    if test.first_tested > 1 {
        svg.raw("<rect class=\"reference\" x=\"")
            .text(&num(x(0)))
            .raw("\" y=\"")
            .text(&num(TOP))
            .raw("\" width=\"")
            .text(&num(x(test.first_tested - 1) - x(0)))
            .raw("\" height=\"")
            .text(&num(HEIGHT - TOP - BOTTOM))
            .raw("\"><title>")
            .text(&format!(
                "reference period: observations 1–{}",
                test.first_tested - 1
            ))
            .raw("</title></rect>");
    }
    // Axes and three labelled levels.
    svg.raw("<g class=\"axis\">");
    for level in [lo, (lo + hi) / 2.0, hi] {
        svg.raw("<line class=\"grid\" x1=\"")
            .text(&num(LEFT))
            .raw("\" x2=\"")
            .text(&num(WIDTH - RIGHT))
            .raw("\" y1=\"")
            .text(&num(y(level)))
            .raw("\" y2=\"")
            .text(&num(y(level)))
            .raw("\"/><text x=\"")
            .text(&num(LEFT - 6.0))
            .raw("\" y=\"")
            .text(&num(y(level) + 4.0))
            .raw("\" text-anchor=\"end\">")
            .text(&format!("{level:.3}"))
            .raw("</text>");
    }
    svg.raw("<text x=\"")
        .text(&num(LEFT))
        .raw("\" y=\"")
        .text(&num(HEIGHT - 8.0))
        .raw("\">0</text><text x=\"")
        .text(&num(WIDTH - RIGHT))
        .raw("\" y=\"")
        .text(&num(HEIGHT - 8.0))
        .raw("\" text-anchor=\"end\">")
        .text(&format!("observation {last}"))
        .raw("</text></g>");
    if !points.is_empty() {
        let line = |value: &dyn Fn(&crate::detect::drift::history::DriftPoint) -> f64| -> String {
            points
                .iter()
                .map(|p| format!("{},{}", num(x(p.observation)), num(y(value(p)))))
                .collect::<Vec<_>>()
                .join(" ")
        };
        svg.raw("<polyline class=\"threshold\" points=\"")
            .text(&line(&|p| p.threshold))
            .raw("\"/><polyline class=\"statistic\" points=\"")
            .text(&line(&|p| p.statistic))
            .raw("\"/>");
        for p in points.iter().filter(|p| p.alarm) {
            svg.raw("<circle class=\"alarm\" r=\"4\" cx=\"")
                .text(&num(x(p.observation)))
                .raw("\" cy=\"")
                .text(&num(y(p.statistic)))
                .raw("\"><title>")
                .text(&format!(
                    "alarm at observation {}: statistic {:.4} over threshold {:.4}",
                    p.observation, p.statistic, p.threshold
                ))
                .raw("</title></circle>");
        }
    }
    svg.raw("</svg>");
    svg
}

fn num(v: f64) -> String {
    format!("{v:.1}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::drift::history::ScopeHistory;
    use crate::detect::drift::scope::TestResult;

    #[test]
    fn the_chart_shades_the_reference_and_marks_alarms() {
        let mut history = ScopeHistory::default();
        for i in 41..=70u64 {
            let alarm = i == 60;
            history.record(
                i,
                "feature_drift",
                &TestResult {
                    test: "<length>".to_owned(),
                    statistic: if alarm { 7.5 } else { 1.0 },
                    threshold: 6.9,
                    p_value: 0.1,
                    direction: Some("up"),
                    alarm,
                    topic: None,
                },
                None,
            );
        }
        let svg = drift_chart(&history.tests[0]).into_string();
        assert!(svg.starts_with("<svg class=\"chart\""), "{svg}");
        assert_eq!(svg.matches("<rect class=\"reference\"").count(), 1);
        assert!(svg.contains("reference period: observations 1–40"));
        assert_eq!(svg.matches("<circle class=\"alarm\"").count(), 1);
        assert!(svg.contains("statistic 7.5000 over threshold 6.9000"));
        assert!(svg.contains("&lt;length&gt;"));
        assert!(!svg.contains("<length>"));
        assert!(!svg.contains("style="));
    }
}
