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

/// Texts whose beginning and end are about different things, with filler between.
fn head_and_tail_text() -> String {
    format!(
        "Bake the bread at 220 degrees until the crust is golden and the loaf sounds hollow. {} \
         The volcano erupted at dawn and lava flowed down into the valley below.",
        "Then some unrelated filler words follow here. ".repeat(40)
    )
}

#[test]
fn head_tail_truncation_keeps_the_end_of_a_long_text() {
    let load = |truncation| {
        let config = EmbedderConfig {
            max_tokens: 48,
            truncation,
            ..EmbedderConfig::default()
        };
        Embedder::load_from(&test_models(), &config).unwrap()
    };
    let (mut head, mut head_tail) = (load(Truncation::Head), load(Truncation::HeadTail));
    let text = head_and_tail_text();
    let volcano = "The volcano erupted at dawn and lava flowed down into the valley below.";
    // The tokens of the last sentence survive only with head and tail.
    let tail_ids = head.tokenizer().encode(volcano).unwrap().ids;
    let tail_ids = &tail_ids[1..tail_ids.len() - 1];
    let kept = head_tail.tokenizer().encode(&text).unwrap().ids;
    assert_eq!(kept.len(), 48);
    assert_eq!(
        &kept[kept.len() - 1 - tail_ids.len()..kept.len() - 1],
        tail_ids
    );
    let cut = head.tokenizer().encode(&text).unwrap().ids;
    assert!(!cut.windows(tail_ids.len()).any(|w| w == tail_ids));
    // And the embedding moves towards the end's topic.
    let reference = head.embed(volcano).unwrap();
    let from_head = cosine(&head.embed(&text).unwrap(), &reference);
    let from_head_tail = cosine(&head_tail.embed(&text).unwrap(), &reference);
    assert!(
        from_head_tail > from_head + 0.1,
        "head+tail {from_head_tail} vs head {from_head}"
    );
}

#[test]
fn batch_tokenizing_matches_one_text_at_a_time() {
    let config = EmbedderConfig {
        max_tokens: 48,
        chunks: 3,
        ..EmbedderConfig::default()
    };
    let embedder = Embedder::load_from(&test_models(), &config).unwrap();
    let tokenizer = embedder.tokenizer();
    let mut texts = dev_outputs(40);
    texts.push(head_and_tail_text());
    texts.push(String::new());
    let batch = tokenizer.encode_windows_batch(&texts, 3).unwrap();
    assert_eq!(batch.len(), texts.len());
    for (text, windows) in texts.iter().zip(&batch) {
        let alone = tokenizer.encode_windows(text, 3).unwrap();
        let ids = |w: &[tokenize::Encoded]| w.iter().map(|e| e.ids.clone()).collect::<Vec<_>>();
        assert_eq!(ids(windows), ids(&alone), "{text:?}");
    }
}

#[test]
fn chunks_average_the_windows_of_a_long_text() {
    let config = EmbedderConfig {
        max_tokens: 48,
        chunks: 3,
        ..EmbedderConfig::default()
    };
    let mut chunked = Embedder::load_from(&test_models(), &config).unwrap();
    let text = head_and_tail_text();
    let windows = chunked.tokenizer().encode_windows(&text, 3).unwrap();
    assert_eq!(windows.len(), 3);
    assert!(windows.iter().all(|w| w.len() <= 48 && w.len() >= 40));
    // The expected embedding: each window alone, weighted by its tokens, normalised.
    let pad = chunked.tokenizer().pad_id();
    let mut expected = vec![0f32; MINILM_DIM];
    for window in &windows {
        let alone = chunked
            .model
            .embed(&tokenize::pad_batch([window], pad))
            .unwrap();
        for (e, v) in expected.iter_mut().zip(&alone[0]) {
            *e += window.len() as f32 * v;
        }
    }
    normalise(&mut expected);
    let short = "A short sentence fits in one window.";
    let got = chunked.embed_batch(&[short, text.as_str(), short]).unwrap();
    assert!(cosine(&got[1], &expected) > 0.9999);
    let norm = got[1].iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    // Differs from the first window alone; a short text is unchanged by chunking.
    let single = Embedder::load_from(
        &test_models(),
        &EmbedderConfig {
            max_tokens: 48,
            ..EmbedderConfig::default()
        },
    )
    .unwrap()
    .embed_batch(&[short, text.as_str()])
    .unwrap();
    assert!(cosine(&got[1], &single[1]) < 0.99);
    assert!(cosine(&got[0], &single[0]) > 0.9999);
    assert!(cosine(&got[2], &single[0]) > 0.9999);
}

/// The first `n` outputs of the development texts.
fn dev_outputs(n: usize) -> Vec<String> {
    use std::io::BufRead;
    let path = crate::lab::devset::test_data_dir().join("alpaca_eval/gpt-3.5-turbo-1106.jsonl.gz");
    let file = std::fs::File::open(&path).unwrap();
    std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file))
        .lines()
        .take(n)
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            value["output"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn float_exports_match_the_int8_model_on_development_texts() {
    let texts = dev_outputs(50);
    let config = EmbedderConfig {
        max_tokens: 128,
        ..EmbedderConfig::default()
    };
    let reference = Embedder::load_from(&test_models(), &config)
        .unwrap()
        .embed_batch(&texts)
        .unwrap();
    // fp32 has a float32 output; fp16 a float16 one, pooled through the f16 path.
    for file in [FP32_MODEL_FILE, FP16_MODEL_FILE] {
        let paths = ModelPaths {
            model: test_export(file),
            ..test_models()
        };
        let mut embedder = Embedder::load_from(&paths, &config).unwrap();
        let got = embedder.embed_batch(&texts).unwrap();
        let cosines: Vec<f32> = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| cosine(a, b))
            .collect();
        let min = cosines.iter().copied().fold(f32::INFINITY, f32::min);
        assert!(min >= 0.99, "{file}: min cosine {min} against int8");
    }
}

#[test]
fn device_cuda_fails_fast_without_the_cuda_provider() {
    let config = EmbedderConfig {
        device: Device::Cuda,
        ..EmbedderConfig::default()
    };
    let started = tokio::time::Instant::now();
    let err = Embedder::load_from(&test_models(), &config).unwrap_err();
    assert!(matches!(err, InferError::CudaUnavailable { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("device cuda") && message.contains("device: cpu"),
        "{message}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn device_auto_falls_back_to_the_cpu_and_the_int8_model() {
    let models = test_models();
    // No model configured: auto tries the fp16 export on CUDA, then int8 on the CPU.
    let config = EmbedderConfig {
        device: Device::Auto,
        onnxruntime: Some(models.onnxruntime.clone()),
        tokenizer: Some(models.tokenizer.clone()),
        ..EmbedderConfig::default()
    };
    assert!(ModelPaths::resolve(&config).model.ends_with(MODEL_FILE));
    assert!(
        ModelPaths::resolve_for(&config, Device::Cuda)
            .model
            .ends_with(FP16_MODEL_FILE)
    );
    let mut embedder = Embedder::load(&config).unwrap();
    assert_eq!(embedder.device(), Device::Cpu);
    assert_eq!(embedder.embed("still works").unwrap().len(), MINILM_DIM);
    // An explicit model on auto falls back the same way.
    let explicit = EmbedderConfig {
        model: Some(models.model.clone()),
        ..config
    };
    assert_eq!(Embedder::load(&explicit).unwrap().device(), Device::Cpu);
}

#[test]
fn the_device_gauge_names_the_serving_device() {
    let mut registry = prometheus_client::registry::Registry::default();
    let _family = crate::telemetry::register_embed_device(&mut registry, Device::Cpu.as_str());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("tripwire_embed_device{device=\"cpu\"} 1"),
        "{text}"
    );
    assert!(!text.contains("device=\"cuda\""), "{text}");
}

#[test]
fn a_profile_proves_where_the_nodes_ran() {
    let on_gpu = r#"[
        {"cat": "Session", "name": "model_run", "args": {}},
        {"cat": "Node", "name": "MatMul_1_kernel_time", "args": {"op_name": "MatMul", "provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "Shape_kernel_time", "args": {"op_name": "Shape", "provider": "CPUExecutionProvider"}}
    ]"#;
    let placement = onnx::NodePlacement::from_profile(on_gpu).unwrap();
    assert_eq!((placement.cuda, placement.cpu), (1, 1));
    assert!(placement.check_cuda().is_ok());
    let fell_back = r#"[
        {"cat": "Node", "name": "a", "args": {"op_name": "Add", "provider": "CUDAExecutionProvider"}},
        {"cat": "Node", "name": "b", "args": {"op_name": "MatMulInteger", "provider": "CPUExecutionProvider"}}
    ]"#;
    let err = onnx::NodePlacement::from_profile(fell_back)
        .unwrap()
        .check_cuda()
        .unwrap_err();
    assert!(
        err.contains("MatMulInteger") && err.contains("make models-gpu"),
        "{err}"
    );
    let nothing = onnx::NodePlacement::from_profile("[]").unwrap();
    assert!(
        nothing
            .check_cuda()
            .unwrap_err()
            .contains("none of the model's nodes")
    );
    assert!(onnx::NodePlacement::from_profile("not json").is_err());
}

#[test]
fn pooling_reads_float16_like_float32() {
    let hidden: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
    let halves: Vec<half::f16> = hidden.iter().map(|&v| half::f16::from_f32(v)).collect();
    let mask = [1, 1, 0];
    let a = onnx::mean_pool_normalise(&hidden, &mask, 1, 3, 2);
    let b = onnx::mean_pool_normalise(&halves, &mask, 1, 3, 2);
    // Mean of [1,2] and [3,4] is [2,3]; the masked [100,100] is ignored.
    let expected = [2.0 / 13f32.sqrt(), 3.0 / 13f32.sqrt()];
    for got in [&a[0], &b[0]] {
        assert!(
            (got[0] - expected[0]).abs() < 1e-3 && (got[1] - expected[1]).abs() < 1e-3,
            "{got:?}"
        );
    }
}

#[test]
fn cls_pooling_takes_the_first_token_and_normalises() {
    // 2 rows × 2 tokens × 2 dims.
    let hidden = [3.0f32, 4.0, 9.0, 9.0, 0.0, 2.0, 1.0, 1.0];
    let pooled = onnx::cls_pool_normalise(&hidden, 2, 2, 2);
    assert_eq!(pooled, vec![vec![0.6, 0.8], vec![0.0, 1.0]]);
}

#[test]
fn cls_pooling_gives_unit_vectors_unlike_mean_pooling() {
    let paths = test_models();
    let config = EmbedderConfig {
        pooling: Pooling::Cls,
        ..EmbedderConfig::default()
    };
    let mut cls = Embedder::load_from(&paths, &config).unwrap();
    let mut mean = embedder();
    let text = "The cat sat on the mat.";
    let a = cls.embed(text).unwrap();
    let b = mean.embed(text).unwrap();
    let norm = a.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
    assert!(
        cosine(&a, &b) < 0.999,
        "CLS and mean pooling gave the same vector"
    );
}
