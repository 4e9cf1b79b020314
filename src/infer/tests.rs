//! Tests against the pinned MiniLM model (`make models`).

use super::*;

fn embedder() -> Embedder {
    Embedder::load_from(&test_models(), &EmbedderConfig::default()).unwrap()
}

#[test]
fn embeddings_are_unit_norm_and_384_wide() {
    let mut embedder = embedder();
    let texts = [
        "The cat sat on the mat.",
        "",
        "Ünïcödé and emoji 🚀 survive tokenization.",
    ];
    let embeddings = embedder.embed_batch(&texts).unwrap();
    assert_eq!(embeddings.len(), 3);
    for embedding in &embeddings {
        assert_eq!(embedding.len(), MINILM_DIM);
        let norm = embedding.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        assert!(embedding.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn paraphrases_are_closer_than_unrelated_sentences() {
    let mut embedder = embedder();
    let e = embedder
        .embed_batch(&[
            "How do I reset my password?",
            "What are the steps to change my login password?",
            "The volcano erupted and covered the village in ash.",
        ])
        .unwrap();
    let paraphrase = cosine(&e[0], &e[1]);
    let unrelated = cosine(&e[0], &e[2]);
    assert!(
        paraphrase > unrelated + 0.3,
        "paraphrase {paraphrase} vs unrelated {unrelated}"
    );
}

#[test]
fn a_text_embeds_the_same_alone_and_beside_much_longer_texts() {
    let mut embedder = embedder();
    let short = "A short sentence about the weather.";
    let long = "This is a much longer text that goes on and on about many different things, \
                including gardens, trains, the history of mathematics, and why padding must be \
                masked out of the mean pool. "
        .repeat(4);
    let alone = embedder.embed(short).unwrap();
    // Also forced into one padded run, bypassing the length buckets.
    let encoded = [
        embedder.tokenizer().encode(short).unwrap(),
        embedder.tokenizer().encode(&long).unwrap(),
    ];
    assert!(encoded[1].len() > 5 * encoded[0].len());
    let padded = tokenize::pad_batch(&encoded, embedder.tokenizer().pad_id());
    let forced = embedder.model.embed(&padded).unwrap();
    let batched = embedder
        .embed_batch(&[long.as_str(), short, long.as_str()])
        .unwrap();
    for (name, other) in [("padded run", &forced[0]), ("embed_batch", &batched[1])] {
        let max_diff = alone
            .iter()
            .zip(other.iter())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "{name}: max difference {max_diff}");
    }
}

#[test]
fn long_texts_are_truncated_to_max_tokens() {
    let config = EmbedderConfig {
        max_tokens: 32,
        truncation: Truncation::HeadTail,
        ..EmbedderConfig::default()
    };
    let mut embedder = Embedder::load_from(&test_models(), &config).unwrap();
    let long = "word ".repeat(1000);
    assert_eq!(embedder.tokenizer().encode(&long).unwrap().len(), 32);
    assert_eq!(embedder.embed(&long).unwrap().len(), MINILM_DIM);
}

#[test]
fn missing_files_name_the_fix() {
    let paths = ModelPaths::default_in(Path::new("/nonexistent"));
    let err = Embedder::load_from(&paths, &EmbedderConfig::default()).unwrap_err();
    assert!(err.to_string().contains("make models"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batcher_answers_every_one_of_100_concurrent_jobs() {
    let tasks = crate::runtime::Tasks::new();
    let config = EmbedderConfig {
        max_batch: 16,
        ..EmbedderConfig::default()
    };
    let handle = batcher::start(
        embedder(),
        &config,
        &tasks,
        crate::telemetry::Metrics::default(),
    );
    let texts: Vec<String> = (0..100)
        .map(|i| format!("sentence number {i} {}", "and more words ".repeat(i % 7)))
        .collect();
    let receivers: Vec<_> = texts
        .iter()
        .map(|text| handle.try_embed(text.clone()).unwrap())
        .collect();
    let mut answers = Vec::new();
    for receiver in receivers {
        answers.push(receiver.await.unwrap().unwrap());
    }
    assert_eq!(answers.len(), 100);
    assert_eq!(handle.shed_total(), 0);
    // Each answer belongs to its own text.
    let mut direct = embedder();
    for i in [0, 37, 99] {
        let expected = direct.embed(&texts[i]).unwrap();
        assert!(cosine(&expected, &answers[i]) > 0.9999, "text {i}");
    }
    // The worker drains and exits once every handle is gone.
    drop(handle);
    tokio::time::timeout(std::time::Duration::from_secs(10), tasks.wait())
        .await
        .unwrap();
}
