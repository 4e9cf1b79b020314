//! Inference: sentence embeddings from a local ONNX model, for the model-based detectors.
//!
//! It sits beside detection in the pipeline (proxy → capture → detect (→ infer) → policy):
//! a detector hands a text to the [`batcher`] through an [`EmbedderHandle`] and gets back a
//! unit-norm [`Embedding`]. Nothing here reaches the network: the ONNX Runtime library, the
//! model and its tokenizer are files that `make models` fetched into `models/`.
//!
//! * [`tokenize`] turns texts into token ids, truncated to `max_tokens` (or split into up to
//!   `chunks` windows, whose embeddings are averaged) and padded per sub-batch to its longest
//!   text (never the fixed padding the tokenizer file asks for).
//! * [`onnx`] loads ONNX Runtime, runs the model on a padded batch, mean-pools the last hidden
//!   state with the attention mask and L2-normalises.
//! * [`batcher`] gathers jobs from many callers into batches, sorted and split by length, and
//!   runs them on blocking threads.
//!
//! [`Embedder`] ties the tokenizer and the model together for synchronous use.

pub mod batcher;
pub mod onnx;
pub mod tokenize;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use batcher::{EmbedderHandle, Shed};
pub use onnx::{Device, OnnxModel, Pooling};
pub use tokenize::{TextTokenizer, Truncation};

/// One L2-normalised sentence embedding (384 values for all-MiniLM-L6-v2).
pub type Embedding = Vec<f32>;

/// Width of the all-MiniLM-L6-v2 embeddings.
pub const MINILM_DIM: usize = 384;

/// File name of the pinned ONNX Runtime library inside `models/`.
pub const ONNXRUNTIME_FILE: &str = "libonnxruntime.so.1.32.0";
/// File name of the int8 all-MiniLM-L6-v2 model inside `models/` (the CPU default).
pub const MODEL_FILE: &str = "all-MiniLM-L6-v2-int8.onnx";
/// File name of the fp16 export inside `models/` (the CUDA default; `make models-gpu`).
pub const FP16_MODEL_FILE: &str = "all-MiniLM-L6-v2-fp16.onnx";
/// File name of the fp32 export inside `models/` (`make models-gpu`).
pub const FP32_MODEL_FILE: &str = "all-MiniLM-L6-v2-fp32.onnx";
/// File name of the all-MiniLM-L6-v2 tokenizer inside `models/`.
pub const TOKENIZER_FILE: &str = "all-MiniLM-L6-v2-tokenizer.json";

/// What can go wrong loading or running the embedding model. Cloneable, so one failed batch
/// can answer every job in it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// A file `make models` should have fetched is absent.
    #[error("{what} not found at {path}: run `make models` (or set its path in the config)")]
    MissingFile {
        /// Which artifact.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The ONNX Runtime shared library could not be loaded.
    #[error("loading ONNX Runtime from {path}: {message}")]
    LoadRuntime {
        /// The library path.
        path: PathBuf,
        /// ONNX Runtime's or the loader's message.
        message: String,
    },
    /// The ONNX session could not be built (bad model file, unavailable device).
    #[error("building an ONNX session for {path}: {message}")]
    Session {
        /// The model path.
        path: PathBuf,
        /// ONNX Runtime's message.
        message: String,
    },
    /// `device: cuda` was asked for and the CUDA execution provider could not be registered.
    #[error(
        "device cuda: the CUDA execution provider is unavailable ({message}); point `onnxruntime` (or ORT_DYLIB_PATH) at the onnxruntime-gpu library with libonnxruntime_providers_cuda.so beside it, or set `device: cpu` or `device: auto`"
    )]
    CudaUnavailable {
        /// ONNX Runtime's message.
        message: String,
    },
    /// The tokenizer file could not be loaded or a text could not be tokenized.
    #[error("tokenizer {context}: {message}")]
    Tokenizer {
        /// What was being done (the file path, or `encoding`).
        context: String,
        /// The tokenizer's message.
        message: String,
    },
    /// Running the model failed, or its output had an unexpected shape.
    #[error("running the embedding model: {0}")]
    Run(String),
    /// The batcher's worker has stopped (shutdown, or it failed).
    #[error("the embedding worker has stopped")]
    WorkerStopped,
}

impl InferError {
    /// A low-cardinality label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InferError::MissingFile { .. } => "missing_file",
            InferError::LoadRuntime { .. } => "load_runtime",
            InferError::Session { .. } => "session",
            InferError::CudaUnavailable { .. } => "cuda_unavailable",
            InferError::Tokenizer { .. } => "tokenizer",
            InferError::Run(_) => "run",
            InferError::WorkerStopped => "worker_stopped",
        }
    }
}

/// Where the three files the embedder needs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPaths {
    /// The ONNX Runtime shared library.
    pub onnxruntime: PathBuf,
    /// The ONNX model file.
    pub model: PathBuf,
    /// The tokenizer.json file.
    pub tokenizer: PathBuf,
}

impl ModelPaths {
    /// The pinned files inside `root/models/`, where `make models` puts them.
    pub fn default_in(root: &Path) -> ModelPaths {
        let models = root.join("models");
        ModelPaths {
            onnxruntime: models.join(ONNXRUNTIME_FILE),
            model: models.join(MODEL_FILE),
            tokenizer: models.join(TOKENIZER_FILE),
        }
    }

    /// The paths a config asks for: each one given wins; otherwise the ONNX Runtime library
    /// comes from `ORT_DYLIB_PATH` when set, and everything else from `models/` under the
    /// current directory: the fp16 export on `cuda`, the int8 model on `cpu` and `auto` (where
    /// [`Embedder::load`] tries the fp16 export on CUDA first).
    pub fn resolve(config: &EmbedderConfig) -> ModelPaths {
        ModelPaths::resolve_for(config, config.device)
    }

    /// [`ModelPaths::resolve`] as if the config asked for `device`.
    pub fn resolve_for(config: &EmbedderConfig, device: Device) -> ModelPaths {
        let mut defaults = ModelPaths::default_in(Path::new("."));
        if device == Device::Cuda {
            defaults.model = Path::new("models").join(FP16_MODEL_FILE);
        }
        let onnxruntime = config
            .onnxruntime
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .unwrap_or(defaults.onnxruntime);
        ModelPaths {
            onnxruntime,
            model: config.model.clone().unwrap_or(defaults.model),
            tokenizer: config.tokenizer.clone().unwrap_or(defaults.tokenizer),
        }
    }

    /// Checks that every file exists, naming the first one missing and the fix.
    pub fn check(&self) -> Result<(), InferError> {
        for (what, path) in [
            ("ONNX Runtime library", &self.onnxruntime),
            ("embedding model", &self.model),
            ("tokenizer", &self.tokenizer),
        ] {
            if !path.is_file() {
                return Err(InferError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }
}

/// The embedding model's configuration (`inference:` in the gateway config).
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct EmbedderConfig {
    /// The ONNX Runtime library; default `ORT_DYLIB_PATH`, then `models/libonnxruntime.so.1.32.0`.
    pub onnxruntime: Option<PathBuf>,
    /// The ONNX model; default `models/all-MiniLM-L6-v2-int8.onnx` on the CPU,
    /// `models/all-MiniLM-L6-v2-fp16.onnx` on CUDA.
    pub model: Option<PathBuf>,
    /// The tokenizer.json; default `models/all-MiniLM-L6-v2-tokenizer.json`.
    pub tokenizer: Option<PathBuf>,
    /// Where the model runs: `cpu`, `cuda` or `auto`.
    pub device: Device,
    /// Threads ONNX Runtime uses inside one operator.
    pub intra_threads: usize,
    /// Longest input in tokens, special tokens included; longer texts are truncated.
    pub max_tokens: usize,
    /// Which part of a long text is kept.
    pub truncation: Truncation,
    /// Windows of `max_tokens` a long text is split into; their embeddings are averaged
    /// (weighted by their tokens) and normalised. 1 embeds the first window only.
    pub chunks: usize,
    /// How token states become one vector: `mean` (MiniLM and most sentence-transformers) or
    /// `cls` (BGE and other CLS-pooled encoders), for a model configured by path.
    pub pooling: Pooling,
    /// Most texts in one batch.
    pub max_batch: usize,
    /// Longest a batch waits to fill once its first job has arrived.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Jobs that may wait in the queue; more are shed.
    pub queue_capacity: usize,
}

impl Default for EmbedderConfig {
    fn default() -> EmbedderConfig {
        EmbedderConfig {
            onnxruntime: None,
            model: None,
            tokenizer: None,
            device: Device::Cpu,
            intra_threads: 1,
            max_tokens: 256,
            // Drift tests must see an answer's end too: an injected sentence or a changed
            // sign-off sits there (docs/detection.md measured drift with head+tail).
            truncation: Truncation::HeadTail,
            chunks: 1,
            pooling: Pooling::Mean,
            max_batch: 32,
            max_wait: Duration::from_millis(2),
            queue_capacity: 1024,
        }
    }
}

/// The tokenizer and the model together: texts in, embeddings out, on the calling thread.
pub struct Embedder {
    tokenizer: TextTokenizer,
    model: OnnxModel,
    chunks: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("tokenizer", &self.tokenizer)
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads ONNX Runtime, the model and the tokenizer from the paths `config` resolves to.
    /// With `device: auto` and no model configured, the fp16 export is tried on CUDA first,
    /// then the int8 model on the CPU (with one warning).
    pub fn load(config: &EmbedderConfig) -> Result<Embedder, InferError> {
        if config.device == Device::Auto && config.model.is_none() {
            let on = |device| EmbedderConfig {
                device,
                ..config.clone()
            };
            let cuda = on(Device::Cuda);
            return match Embedder::load_from(&ModelPaths::resolve(&cuda), &cuda) {
                Ok(embedder) => Ok(embedder),
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        "device auto: CUDA is unavailable, running the embedding model on the CPU"
                    );
                    let cpu = on(Device::Cpu);
                    Embedder::load_from(&ModelPaths::resolve(&cpu), &cpu)
                }
            };
        }
        Embedder::load_from(&ModelPaths::resolve(config), config)
    }

    /// Loads from explicit paths; the paths in `config` are ignored.
    pub fn load_from(paths: &ModelPaths, config: &EmbedderConfig) -> Result<Embedder, InferError> {
        paths.check()?;
        let tokenizer =
            TextTokenizer::from_file(&paths.tokenizer, config.max_tokens, config.truncation)?;
        let mut model = OnnxModel::load(
            &paths.onnxruntime,
            &paths.model,
            config.device,
            config.intra_threads,
        )?;
        model.set_pooling(config.pooling);
        Ok(Embedder {
            tokenizer,
            model,
            chunks: config.chunks.max(1),
        })
    }

    /// Embeds `texts`, answering in their order. The texts (or their windows, with `chunks`
    /// above 1) are sorted by token length and run in sub-batches of similar length, each
    /// padded only to its own longest member.
    pub fn embed_batch<S: AsRef<str> + Sync>(
        &mut self,
        texts: &[S],
    ) -> Result<Vec<Embedding>, InferError> {
        // Every window, with the index of its text.
        let mut windows: Vec<(usize, tokenize::Encoded)> = Vec::with_capacity(texts.len());
        for (i, encoded) in self
            .tokenizer
            .encode_windows_batch(texts, self.chunks)?
            .into_iter()
            .enumerate()
        {
            windows.extend(encoded.into_iter().map(|e| (i, e)));
        }
        let mut order: Vec<usize> = (0..windows.len()).collect();
        order.sort_by_key(|&w| windows[w].1.len());
        let lengths: Vec<usize> = order.iter().map(|&w| windows[w].1.len()).collect();
        let mut pooled: Vec<Option<Embedding>> = vec![None; windows.len()];
        let mut start = 0;
        for end in tokenize::length_buckets(&lengths, self.model.call_tokens()) {
            let members = &order[start..end];
            let batch = tokenize::pad_batch(
                members.iter().map(|&w| &windows[w].1),
                self.tokenizer.pad_id(),
            );
            let embeddings = self.model.embed(&batch)?;
            for (&w, embedding) in members.iter().zip(embeddings) {
                pooled[w] = Some(embedding);
            }
            start = end;
        }
        combine_windows(texts.len(), &windows, pooled)
    }

    /// Embeds one text.
    pub fn embed(&mut self, text: &str) -> Result<Embedding, InferError> {
        let mut embeddings = self.embed_batch(&[text])?;
        embeddings
            .pop()
            .ok_or_else(|| InferError::Run("no embedding returned".to_owned()))
    }

    /// The device the model runs on (`auto` resolved).
    pub fn device(&self) -> Device {
        self.model.device()
    }

    /// The tokenizer, for counting tokens.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }
}

/// One embedding per text from the embeddings of its windows: their average, weighted by
/// each window's tokens, normalised again (a text with one window keeps its embedding).
fn combine_windows(
    texts: usize,
    windows: &[(usize, tokenize::Encoded)],
    pooled: Vec<Option<Embedding>>,
) -> Result<Vec<Embedding>, InferError> {
    let mut sums: Vec<Option<Embedding>> = vec![None; texts];
    for ((text, encoded), embedding) in windows.iter().zip(pooled) {
        let embedding =
            embedding.ok_or_else(|| InferError::Run("a window got no embedding".to_owned()))?;
        let slot = sums
            .get_mut(*text)
            .ok_or_else(|| InferError::Run("a window of no text".to_owned()))?;
        let weight = encoded.len() as f32;
        match slot {
            None => *slot = Some(embedding.iter().map(|v| v * weight).collect()),
            Some(sum) => sum
                .iter_mut()
                .zip(&embedding)
                .for_each(|(s, v)| *s += weight * v),
        }
    }
    sums.into_iter()
        .map(|sum| {
            let mut sum =
                sum.ok_or_else(|| InferError::Run("a text got no embedding".to_owned()))?;
            normalise(&mut sum);
            Ok(sum)
        })
        .collect()
}

/// Scales `v` to unit length (a zero vector stays zero).
fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

impl Device {
    /// The metric label value: `cpu`, `cuda` or `auto` (unresolved).
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::Auto => "auto",
        }
    }
}

/// Cosine similarity of two embeddings (their dot product, as both are unit-norm).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The fetched models in this checkout, for tests. Fails with the fix when they are absent:
/// a test that needs them never skips silently.
#[cfg(test)]
pub(crate) fn test_models() -> ModelPaths {
    let paths = ModelPaths::default_in(Path::new(env!("CARGO_MANIFEST_DIR")));
    if let Err(err) = paths.check() {
        panic!("the inference tests need the pinned models: {err}");
    }
    paths
}

/// The float exports of `make models-gpu` in this checkout, for tests; fails with the fix when
/// they are absent.
#[cfg(test)]
pub(crate) fn test_export(file: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        path.is_file(),
        "the inference tests need {}: run `make models-gpu`",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests;
