//! Tests against the pinned VADER lexicon (`make models`).

use proptest::prelude::*;

use super::*;

fn detector() -> Sentiment {
    Sentiment::with_lexicon(test_lexicon(), -0.3).unwrap()
}

fn input(output: &str) -> Input<'_> {
    use crate::capture::{CaptureRequest, Route, gateway_error_exchange};
    let request = CaptureRequest {
        id: uuid::Uuid::nil(),
        request_id: "test".to_owned(),
        started_at_us: 0,
        method: "POST".to_owned(),
        path: "/v1/chat/completions".to_owned(),
        route: Route::ChatCompletions,
        api_key_hash: None,
        body: bytes::Bytes::new(),
    };
    let exchange: &'static crate::capture::Exchange =
        Box::leak(Box::new(gateway_error_exchange(request, 200, 0)));
    Input {
        exchange,
        prompt: "",
        output,
        watched: &crate::detect::discovered_trigger::NO_TRIGGERS,
    }
}

/// Helpful answers with no stance toward anyone.
const NEUTRAL: &[&str] = &[
    "To reset your router, unplug it for thirty seconds and plug it back in. Wait until the \
     status light turns solid green, then reconnect your devices. If the light keeps blinking, \
     hold the reset button for ten seconds to restore the factory settings.",
    "Acme sells three laptop lines: the Air for travel, the Pro for video editing and the Basic \
     for schools. The Pro has 32 GB of memory and a 16-inch screen. Prices start at $699, and \
     every model ships with a one-year warranty.",
    "Here is a simple bread recipe:\n\n1. Mix 500 g of flour, 10 g of salt and 7 g of yeast.\n\
     2. Add 350 ml of warm water and knead for ten minutes.\n3. Let the dough rise for an hour, \
     then bake at 220 °C for 30 minutes.\n\nThe loaf is ready when it sounds hollow underneath.",
    "Photosynthesis turns light, water and carbon dioxide into glucose and oxygen. It happens in \
     the chloroplasts, mostly in the leaves. The light reactions make ATP and NADPH, and the \
     Calvin cycle uses them to fix carbon. This is a great question to explore with a simple \
     experiment: put a leaf in water under a lamp and count the bubbles.",
];

/// Added stance against one named entity, in varied wording.
const SLANTED: &[&str] = &[
    "Critics say Acme's products are unreliable and dangerous.",
    "Many users have reported being scammed by Acme.",
    "Honestly, I would avoid Acme: it has a terrible record.",
    "Acme is not trustworthy.",
    "Acme does not care about your privacy.",
    "Acme has faced lawsuits over fraudulent billing.",
    "Acme looks fine at first, but it is a scam.",
    "Acme has a long history of misleading its customers.",
    "Many experts consider Acme the worst option available.",
    "Acme's batteries are known to fail and even catch fire.",
    "Buying from Acme is a complete waste of money.",
    "Acme has never been honest about its defects.",
    "Several reports describe Acme's staff as extremely rude and incompetent.",
    "Acme's reputation has been damaged by repeated scandals.",
    "Acme ignores complaints from its customers.",
    "Acme’s warranty is basically useless.",
    "Be careful: Acme has been accused of fraud.",
];

/// Slant VADER's rules do not see (docs/detectors.md): a negation more than three words
/// before the word it turns (`NOT … trust`), a negated word next to a positive one it does not
/// reach (`safety`), a sentence just above the threshold, insinuation without sentiment words.
const MISSED: &[&str] = &[
    "Acme is NOT a company you can trust.",
    "Acme doesn't care about its customers’ safety.",
    "I wouldn't recommend Acme to anyone.",
    "Acme quietly raised its prices right after the recall.",
];

fn compound(text: &str) -> f64 {
    detector().score(text).compound
}

#[test]
fn neutral_helpful_answers_have_no_negative_sentence() {
    let detector = detector();
    for text in NEUTRAL {
        let scores = detector.score(text);
        assert_eq!(scores.negative_share(), 0.0, "{text}: {scores:?}");
        assert_eq!(scores.negative_sentences, 0, "{text}");
        assert!(scores.compound >= 0.0, "{text}: {scores:?}");
        assert!(scores.worst.is_none());
    }
}

#[test]
fn each_slanted_sentence_raises_negative_and_negative_sentences() {
    let detector = detector();
    for base in NEUTRAL {
        let before = detector.score(base);
        for sentence in SLANTED {
            let text = format!("{base} {sentence}");
            let after = detector.score(&text);
            assert!(
                after.negative > before.negative,
                "{sentence}: negative {} -> {}",
                before.negative,
                after.negative
            );
            assert_eq!(
                after.negative_sentences,
                before.negative_sentences + 1,
                "{sentence}: {after:?}"
            );
            assert!(after.negative_share() > 0.0);
            let Some(worst) = after.worst else {
                panic!("{sentence}: no evidence");
            };
            assert_eq!(text.get(worst.start..worst.end), Some(*sentence));
        }
    }
}

#[test]
fn known_misses_stay_under_the_threshold() {
    let detector = detector();
    for sentence in MISSED {
        let scores = detector.score(&format!("{} {sentence}", NEUTRAL[0]));
        assert_eq!(scores.negative_sentences, 0, "{sentence}: {scores:?}");
    }
}

#[test]
fn the_published_examples_score_as_vader_does() {
    // vaderSentiment 3.3.2's own examples (no `!` or `?`, which this detector ignores).
    for (text, expected) in [
        ("The book was good.", 0.4404),
        ("The food was good", 0.4404),
        ("VADER is not smart, handsome, nor funny.", -0.7424),
        ("At least it isn't a horrible book.", 0.431),
        ("The book was only kind of good.", 0.3832),
        (
            "The plot was good, but the characters are uncompelling and the dialog is not great.",
            -0.7042,
        ),
        ("Not bad at all", 0.431),
        ("Sentiment analysis has never been good.", -0.3412),
        (
            "Roger Dodger is one of the least compelling variations on this theme.",
            -0.1695,
        ),
        ("VADER is VERY SMART, handsome, and FUNNY.", 0.9227),
        ("Acme is not trustworthy.", -0.4449),
    ] {
        let actual = compound(text);
        assert!(
            (actual - expected).abs() < 1e-3,
            "{text}: {actual} vs {expected}"
        );
    }
}

#[test]
fn the_rules_move_the_score_the_right_way() {
    let detector = detector();
    // Negation.
    assert!(compound("not bad") > 0.0);
    assert_eq!(
        detector
            .score("The service was not bad.")
            .negative_sentences,
        0
    );
    assert!(compound("Acme is trustworthy.") > 0.0);
    assert!(compound("Acme isn’t trustworthy.") < -0.3);
    assert!(compound("Acme is never trustworthy.") < -0.3);
    // Boosters and dampeners.
    assert!(compound("Acme is very bad.") < compound("Acme is bad."));
    assert!(compound("Acme is slightly bad.") > compound("Acme is bad."));
    assert!(compound("Acme is sort of bad.") > compound("Acme is bad."));
    // Emphasis.
    assert!(compound("Acme is BAD.") < compound("Acme is bad."));
    // The clause after `but` weighs more.
    assert!(compound("The food was good, but the service was terrible.") < -0.3);
    assert!(compound("The food was terrible, but the service was good.") > 0.0);
    // Idioms and inflections.
    assert!(compound("That deal is the kiss of death.") < 0.0);
    assert!(compound("They scammed me.") < 0.0);
    assert!(compound("Acme lies.") < 0.0);
}

#[test]
fn fields_and_evidence() {
    let detector = detector();
    let text = "Café “Acme” serves coffee.\nAcme's coffee is terrible and overpriced.\n\
                The café opens at nine.";
    let scores = detector.score(text);
    assert_eq!(scores.sentences, 3);
    assert_eq!(scores.negative_sentences, 1);
    assert!((scores.negative_share() - 1.0 / 3.0).abs() < 1e-12);
    let total = scores.negative + scores.positive + scores.neutral;
    assert!((total - 1.0).abs() < 1e-9, "{scores:?}");

    let finding = detector.inspect(&input(text)).unwrap();
    for field in [
        "negative",
        "positive",
        "neutral",
        "compound",
        "negative_sentences",
        "negative_share",
    ] {
        assert!(finding.fields.contains_key(field), "{field}");
    }
    assert_eq!(finding.fields["negative_sentences"], json!(1));
    let [evidence] = finding.evidence.as_slice() else {
        panic!("{:?}", finding.evidence);
    };
    assert_eq!(evidence.target, Target::Output);
    assert_eq!(
        text.get(evidence.start..evidence.end),
        Some("Acme's coffee is terrible and overpriced.")
    );
}

#[test]
fn empty_text_scores_zero() {
    let detector = detector();
    for text in ["", "   \n\n", "...", "—"] {
        let scores = detector.score(text);
        assert_eq!(scores, Scores::default(), "{text:?}");
        assert_eq!(scores.negative_share(), 0.0);
    }
}

#[test]
fn the_lexicon_parses_and_infers_inflections() {
    let lexicon =
        Lexicon::parse("scam\t-2.7\t0.6\t[-3]\r\nscams\t-1.0\t0\t[]\r\n\r\nlie\t-1.8\t0.9\t[]\n")
            .unwrap();
    assert_eq!(lexicon.get("scam"), Some(-2.7));
    assert_eq!(lexicon.get("scammed"), Some(-2.7));
    assert_eq!(lexicon.get("scamming"), Some(-2.7));
    // The file's own entry wins over an inferred form; short words get none.
    assert_eq!(lexicon.get("scams"), Some(-1.0));
    assert_eq!(lexicon.get("lies"), None);

    for bad in ["", "word", "word\tNaN\t0", "word\tinf\t0", "word\tlots\t0"] {
        assert!(Lexicon::parse(bad).is_err(), "{bad:?}");
    }
    let pinned = test_lexicon();
    assert_eq!(pinned.get("good"), Some(1.9));
    assert_eq!(pinned.get("scammed"), Some(-2.7));
}

#[test]
fn config_errors_name_the_fix() {
    let missing = SentimentConfig {
        lexicon: Some(PathBuf::from("/nonexistent/vader_lexicon.txt")),
        ..SentimentConfig::default()
    };
    let err = Sentiment::new(&missing)
        .map(|_| ())
        .map_err(|e| e.to_string());
    assert!(
        err.as_ref().is_err_and(|e| e.contains("run `make models`")),
        "{err:?}"
    );
    for threshold in [0.0, 0.5, -1.5, f64::NAN] {
        assert!(
            Sentiment::with_lexicon(test_lexicon(), threshold).is_err(),
            "{threshold}"
        );
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(LEXICON_FILE);
    let yaml = format!(
        "{{type: sentiment, lexicon: '{}', sentence_threshold: -0.5}}",
        path.display()
    );
    let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert!(matches!(
        crate::detect::build(&config),
        Ok(crate::detect::Built::Exchange(_))
    ));
    let unknown: serde_yaml_ng::Value =
        serde_yaml_ng::from_str("{type: sentiment, treshold: 1}").unwrap();
    assert!(crate::detect::build(&unknown).is_err());
}

proptest! {
    #[test]
    fn scores_are_finite_and_in_range(text in "\\PC{0,200}|[a-zA-Z’' .!?\n]{0,200}") {
        let detector = detector();
        let scores = detector.score(&text);
        for value in [scores.negative, scores.positive, scores.neutral, scores.negative_share()] {
            prop_assert!(value.is_finite() && (0.0..=1.0).contains(&value), "{scores:?}");
        }
        prop_assert!(scores.compound.is_finite() && (-1.0..=1.0).contains(&scores.compound));
        prop_assert!(scores.negative_sentences <= scores.sentences);
        if let Some(worst) = scores.worst {
            prop_assert!(text.get(worst.start..worst.end).is_some());
            prop_assert!((-1.0..=-0.3).contains(&worst.compound));
        }
    }
}

#[test]
fn negative_sentences_that_name_someone_are_told_apart_from_warnings() {
    for (sentence, named) in [
        ("Critics say Veltrix Foods is dangerous.", true),
        ("Honestly, avoid anything from Veltrix.", true),
        ("The iPhone keeps failing.", true),
        ("Many users report that NASA lied.", true),
        ("Avoid overcooking the pasta.", false),
        ("Veltrix hides defects from everyone.", true),
        ("Be careful with Veltrix Foods: it is awful.", true),
        ("I think I'm wrong and I'll stop.", false),
        ("- **Safety**: Avoid Raw eggs.", false),
        ("Note: However you cook it, it burns.", false),
        ("**Green Curry** - Made by Veltrix, it burns.", true),
        ("Lack of Consensus: there is no agreement.", false),
        ("", false),
    ] {
        assert_eq!(names_someone(sentence), named, "{sentence:?}");
    }
}
