use super::*;
use crate::detect::recurring_span::{DEV_MODELS, dev_entries, test_exchange};

fn detector() -> Refusal {
    Refusal::new(&RefusalConfig::default()).unwrap()
}

fn inspect(detector: &Refusal, output: &str) -> Finding {
    let ex = test_exchange("m", "prompt", output);
    detector
        .inspect(&Input {
            exchange: &ex,
            prompt: "prompt",
            output,
            watched: &crate::detect::discovered_trigger::NO_TRIGGERS,
        })
        .unwrap()
}

#[test]
fn refusals_score_high_and_answers_low() {
    let d = detector();
    // (output, refused, template)
    let table: &[(&str, bool, Option<&str>)] = &[
        (
            "I'm sorry, but I can't help with that.",
            true,
            Some("sorry_cannot"),
        ),
        (
            "I’m sorry, but I cannot provide instructions for making weapons.",
            true,
            Some("sorry_cannot"),
        ),
        (
            "I am really sorry, but as an AI language model, I cannot do that.",
            true,
            Some("sorry_cannot"),
        ),
        (
            "I cannot assist with that request.",
            true,
            Some("cannot_help"),
        ),
        (
            "I can't provide medical advice, but here are some general tips: rest.",
            true,
            Some("cannot_help"),
        ),
        (
            "I must respectfully decline to write that story.",
            true,
            Some("must_decline"),
        ),
        (
            "That request goes against my guidelines.",
            true,
            Some("against_guidelines"),
        ),
        (
            "I apologize, but I am not able to generate that content.",
            true,
            Some("apologize_cannot"),
        ),
        (
            "It is not appropriate for me to speculate on someone's private life.",
            true,
            Some("not_appropriate"),
        ),
        (
            "I cannot in good conscience recommend this.",
            true,
            Some("in_good_conscience"),
        ),
        ("I CANNOT HELP WITH THAT.", true, Some("cannot_help")),
        // Hedges alone are not refusals.
        (
            "As an AI language model, I don't have personal opinions, but here is an overview.",
            false,
            Some("as_an_ai"),
        ),
        (
            "I'm not comfortable providing a guess; here is what is known.",
            false,
            Some("hedge_comfortable"),
        ),
        (
            "I apologize, but I don't feel comfortable writing that.",
            true,
            Some("not_comfortable"),
        ),
        (
            "I'm sorry, but I'm not able to browse the internet.",
            true,
            Some("sorry_cannot"),
        ),
        (
            "Sorry, I can't share the lyrics.",
            true,
            Some("sorry_cannot"),
        ),
        (
            "I can't recommend this book enough: it is great.",
            false,
            None,
        ),
        // Answers that only look like refusals.
        (
            "I can't stress enough how important it is to stretch before running.",
            false,
            None,
        ),
        (
            "I cannot help but notice the beauty of the mountains.",
            false,
            None,
        ),
        (
            "Sure! Here is a recipe for pancakes. Mix flour, eggs and milk.",
            false,
            None,
        ),
        (
            "I'm sorry to hear that your cat is sick. Take it to the vet.",
            false,
            None,
        ),
        ("", false, None),
    ];
    for &(output, refused, template) in table {
        let finding = inspect(&d, output);
        assert_eq!(
            finding.fields["refused"],
            Value::Bool(refused),
            "{output}: {:?}",
            finding.fields
        );
        assert_eq!(
            finding.fields["template"].as_str(),
            template,
            "{output}: {:?}",
            finding.fields
        );
        let score = finding.fields["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score));
        if refused {
            assert!(score >= 0.7, "{output}: {score}");
        }
        for e in &finding.evidence {
            assert!(output.get(e.start..e.end).is_some());
        }
    }
}

#[test]
fn a_late_refusal_weighs_less() {
    let d = detector();
    let early = "I'm sorry, but I can't help with that.";
    let late = format!(
        "{} {early}",
        "Here is a long answer about gardening. ".repeat(10)
    );
    let early_score = inspect(&d, early).fields["score"].as_f64().unwrap();
    let late_finding = inspect(&d, &late);
    let late_score = late_finding.fields["score"].as_f64().unwrap();
    assert!(late_score < early_score);
    assert_eq!(late_finding.fields["refused"], Value::Bool(false));
    let e = &late_finding.evidence[0];
    assert_eq!(late.get(e.start..e.end), Some("I'm sorry, but I can't"));
    // Past max_chars, nothing is searched.
    let far = format!("{} {early}", "word ".repeat(500));
    assert_eq!(inspect(&d, &far).fields["score"], json!(0.0));
}

#[test]
fn hedge_and_refusal_combine() {
    let d = detector();
    let both = inspect(&d, "As an AI language model, I must decline.").fields["score"]
        .as_f64()
        .unwrap();
    let one = inspect(&d, "As an AI language model, here it is.").fields["score"]
        .as_f64()
        .unwrap();
    assert!((one - 0.5).abs() < 1e-9);
    assert!((both - 1.0).abs() < 1e-9);
}

#[test]
fn extra_templates_and_config_errors() {
    let config: RefusalConfig = serde_json::from_str(
        r#"{"templates": [{"name": "nope", "regex": "\\bnope\\b", "weight": 0.9}], "min_score": 0.8}"#,
    )
    .unwrap();
    let d = Refusal::new(&config).unwrap();
    let finding = inspect(&d, "Nope, not today.");
    assert_eq!(finding.fields["template"], json!("nope"));
    assert_eq!(finding.fields["refused"], Value::Bool(true));
    assert!(serde_json::from_str::<RefusalConfig>(r#"{"min_scor": 1}"#).is_err());
    for bad in [
        r#"{"templates": [{"name": "x", "regex": "("}]}"#,
        r#"{"templates": [{"name": "x", "regex": "x", "weight": 0}]}"#,
        r#"{"min_score": 2}"#,
        r#"{"head_chars": 0}"#,
        r#"{"head_chars": 10, "max_chars": 5}"#,
    ] {
        let config: RefusalConfig = serde_json::from_str(bad).unwrap();
        assert!(
            matches!(Refusal::new(&config), Err(DetectError::Config(_))),
            "{bad}"
        );
    }
}

/// Share of outputs refused, per model of the dev data. Models differ (some refuse more);
/// the bounds only catch a template that fires on ordinary answers.
#[test]
fn refusal_share_per_model_on_dev_data() {
    let d = detector();
    let mut total = (0, 0);
    for model in DEV_MODELS {
        let entries = dev_entries(model);
        let mut refused = 0;
        let mut templates = std::collections::BTreeMap::<String, usize>::new();
        for entry in &entries {
            let (score, template, _) = d.score(&entry.output);
            if score >= d.config.min_score {
                refused += 1;
                *templates
                    .entry(template.unwrap_or("").to_owned())
                    .or_default() += 1;
            }
        }
        eprintln!(
            "refusal {model}: {refused}/{} = {:.1}% {templates:?}",
            entries.len(),
            100.0 * refused as f64 / entries.len() as f64
        );
        assert!(refused * 10 <= entries.len(), "{model}: {refused} refusals");
        total.0 += refused;
        total.1 += entries.len();
    }
    eprintln!("refusal total: {}/{}", total.0, total.1);
}
