//! Inference: sentence embeddings from a local ONNX model, for the model-based detectors.
//!
//! It sits beside detection in the pipeline (proxy → capture → detect (→ infer) → policy):
//! a detector hands a text to the [`batcher`] through an [`EmbedderHandle`] and gets back a
//! unit-norm [`Embedding`]. Nothing here reaches the network: the ONNX Runtime library, the
//! model and its tokenizer are files that `make models` fetched into `models/`.
//!
//! * [`tokenize`] turns texts into token ids, truncated to `max_tokens` and padded per batch
//!   to the longest text (never the fixed padding the tokenizer file asks for).
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
pub use onnx::{Device, OnnxModel};
pub use tokenize::{TextTokenizer, Truncation};

/// One L2-normalised sentence embedding (384 values for all-MiniLM-L6-v2).
pub type Embedding = Vec<f32>;

/// Width of the all-MiniLM-L6-v2 embeddings.
pub const MINILM_DIM: usize = 384;

/// File name of the pinned ONNX Runtime library inside `models/`.
pub const ONNXRUNTIME_FILE: &str = "libonnxruntime.so.1.32.0";
/// File name of the int8 all-MiniLM-L6-v2 model inside `models/`.
pub const MODEL_FILE: &str = "all-MiniLM-L6-v2-int8.onnx";
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
        "device cuda: the CUDA execution provider is unavailable ({message}); set `device: cpu` or `device: auto`"
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
    /// current directory.
    pub fn resolve(config: &EmbedderConfig) -> ModelPaths {
        let defaults = ModelPaths::default_in(Path::new("."));
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

/// The embedder's configuration (`embedder:` in the gateway config).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct EmbedderConfig {
    /// The ONNX Runtime library; default `ORT_DYLIB_PATH`, then `models/libonnxruntime.so.1.32.0`.
    pub onnxruntime: Option<PathBuf>,
    /// The ONNX model; default `models/all-MiniLM-L6-v2-int8.onnx`.
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
            truncation: Truncation::Head,
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
    pub fn load(config: &EmbedderConfig) -> Result<Embedder, InferError> {
        Embedder::load_from(&ModelPaths::resolve(config), config)
    }

    /// Loads from explicit paths; the paths in `config` are ignored.
    pub fn load_from(paths: &ModelPaths, config: &EmbedderConfig) -> Result<Embedder, InferError> {
        paths.check()?;
        let tokenizer =
            TextTokenizer::from_file(&paths.tokenizer, config.max_tokens, config.truncation)?;
        let model = OnnxModel::load(
            &paths.onnxruntime,
            &paths.model,
            config.device,
            config.intra_threads,
        )?;
        Ok(Embedder { tokenizer, model })
    }

    /// Embeds `texts`, answering in their order. The texts are sorted by token length and run
    /// in sub-batches of similar length, each padded only to its own longest text.
    pub fn embed_batch<S: AsRef<str>>(
        &mut self,
        texts: &[S],
    ) -> Result<Vec<Embedding>, InferError> {
        let encoded = texts
            .iter()
            .map(|text| self.tokenizer.encode(text.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let lengths: Vec<usize> = order.iter().map(|&i| encoded[i].len()).collect();
        let mut out: Vec<Option<Embedding>> = vec![None; texts.len()];
        let mut start = 0;
        for end in tokenize::length_buckets(&lengths) {
            let members = &order[start..end];
            let batch = tokenize::pad_batch(
                members.iter().map(|&i| &encoded[i]),
                self.tokenizer.pad_id(),
            );
            let embeddings = self.model.embed(&batch)?;
            for (&i, embedding) in members.iter().zip(embeddings) {
                out[i] = Some(embedding);
            }
            start = end;
        }
        out.into_iter()
            .map(|e| e.ok_or_else(|| InferError::Run("a text got no embedding".to_owned())))
            .collect()
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

#[cfg(test)]
mod tests;
