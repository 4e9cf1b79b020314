//! ONNX Runtime: loading the shared library, building a session for the embedding model, and
//! turning a padded batch into unit-norm sentence embeddings.
//!
//! The library is loaded once per process (`ort` allows one environment), from the path the
//! config names, `ORT_DYLIB_PATH`, or `models/` (see [`super::ModelPaths::resolve`]). A
//! session runs on the calling thread: the [`super::batcher`] calls it from blocking threads.
//!
//! On `cuda` the session registers ONNX Runtime's CUDA provider and proves at start-up that it
//! is really used: one profiled batch must run its matrix multiplications on the GPU (an int8
//! model, say, registers fine and then runs on the CPU). The model's output may be float32 or
//! float16 (the fp16 export); pooling is done in float32 either way.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use half::f16;
use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{TensorElementType, TensorRef};
use serde::Deserialize;

use super::tokenize::PaddedBatch;
use super::{Embedding, InferError};

/// Where the model runs.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// ONNX Runtime's CPU provider.
    #[default]
    Cpu,
    /// The CUDA provider; fails at start-up when it cannot be registered.
    Cuda,
    /// CUDA when it can be registered, else the CPU with one warning.
    Auto,
}

/// The process's one ONNX Runtime environment and the library it came from.
static ENVIRONMENT: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads the ONNX Runtime library at `library` (once per process) and returns its environment.
/// A later call naming another library gets the first one, with a warning.
pub fn environment(library: &Path) -> Result<Environment, InferError> {
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((loaded, env)) = slot.as_ref() {
        if loaded != library {
            tracing::warn!(
                loaded = %loaded.display(),
                requested = %library.display(),
                "ONNX Runtime is already loaded in this process; keeping the first library"
            );
        }
        return Ok(env.clone());
    }
    if !library.is_file() {
        return Err(InferError::MissingFile {
            what: "ONNX Runtime library",
            path: library.to_path_buf(),
        });
    }
    let load_error = |message: String| InferError::LoadRuntime {
        path: library.to_path_buf(),
        message,
    };
    let env = ort::init_from(library)
        .map_err(|err| load_error(err.to_string()))?
        .with_name("tripwire")
        .build()
        .map_err(|err| load_error(err.to_string()))?;
    *slot = Some((library.to_path_buf(), env.clone()));
    Ok(env)
}

/// An embedding model session: a BERT-style encoder with inputs `input_ids`, `attention_mask`,
/// `token_type_ids` and output `last_hidden_state`.
pub struct OnnxModel {
    session: Session,
    device: Device,
    pooling: Pooling,
}

/// How token states become one sentence vector.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean over the real (unmasked) tokens: sentence-transformers' MiniLM, MPNet, E5.
    #[default]
    Mean,
    /// The first token (`[CLS]`): BGE and other CLS-pooled encoders.
    Cls,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl OnnxModel {
    /// Sets how token states are pooled (mean by default).
    pub fn set_pooling(&mut self, pooling: Pooling) {
        self.pooling = pooling;
    }

    /// Loads ONNX Runtime from `library` and builds a session for `model` on `device`, using
    /// `intra_threads` threads inside each operator. `cuda` fails when the CUDA provider cannot
    /// be registered or does not run the model; `auto` then falls back to the CPU, with one
    /// warning.
    pub fn load(
        library: &Path,
        model: &Path,
        device: Device,
        intra_threads: usize,
    ) -> Result<OnnxModel, InferError> {
        let env = environment(library)?;
        if !model.is_file() {
            return Err(InferError::MissingFile {
                what: "embedding model",
                path: model.to_path_buf(),
            });
        }
        let loaded = match device {
            Device::Cpu => OnnxModel::load_cpu(&env, model, intra_threads)?,
            Device::Cuda => OnnxModel::load_cuda(&env, model, intra_threads)?,
            Device::Auto => match OnnxModel::load_cuda(&env, model, intra_threads) {
                Ok(loaded) => loaded,
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        "device auto: CUDA is unavailable, running the embedding model on the CPU"
                    );
                    OnnxModel::load_cpu(&env, model, intra_threads)?
                }
            },
        };
        tracing::info!(model = %model.display(), device = ?loaded.device, intra_threads, "embedding model loaded");
        Ok(loaded)
    }

    /// A session on ONNX Runtime's CPU provider.
    fn load_cpu(
        env: &Environment,
        model: &Path,
        intra_threads: usize,
    ) -> Result<OnnxModel, InferError> {
        let session = builder(env, model, intra_threads)?
            .commit_from_file(model)
            .map_err(|err| session_error(model, err))?;
        Ok(OnnxModel {
            pooling: Pooling::Mean,
            session,
            device: Device::Cpu,
        })
    }

    /// A session on the CUDA provider, checked by one profiled batch.
    fn load_cuda(
        env: &Environment,
        model: &Path,
        intra_threads: usize,
    ) -> Result<OnnxModel, InferError> {
        let unavailable = |message: String| InferError::CudaUnavailable { message };
        let cuda = ep::CUDA::default().build().error_on_failure();
        let profile =
            std::env::temp_dir().join(format!("tripwire-cuda-check-{}", std::process::id()));
        let builder = builder(env, model, intra_threads)?
            .with_execution_providers([cuda])
            .map_err(|err| unavailable(err.to_string()))?
            .with_profiling(&profile)
            .map_err(|err| session_error(model, err))?;
        let mut builder = builder;
        let session = builder.commit_from_file(model).map_err(|err| {
            unavailable(format!(
                "building the session for {}: {err}",
                model.display()
            ))
        })?;
        let mut loaded = OnnxModel {
            pooling: Pooling::Mean,
            session,
            device: Device::Cuda,
        };
        // One small batch, profiled; ending the profile also stops profiling.
        let probe = super::tokenize::pad_batch(
            [&super::tokenize::Encoded {
                ids: vec![101, 7592, 2088, 102],
            }],
            0,
        );
        let ran = loaded.embed(&probe);
        let written = loaded
            .session
            .end_profiling()
            .map_err(|err| unavailable(format!("ending the start-up profile: {err}")));
        ran.map_err(|err| unavailable(format!("running one batch: {err}")))?;
        let written = PathBuf::from(written?);
        let profile = std::fs::read_to_string(&written);
        // The profile was only for this check.
        if let Err(err) = std::fs::remove_file(&written) {
            tracing::debug!(path = %written.display(), error = %err, "removing the start-up profile");
        }
        let profile = profile.map_err(|err| {
            unavailable(format!(
                "reading the start-up profile {}: {err}",
                written.display()
            ))
        })?;
        let placement = NodePlacement::from_profile(&profile)
            .map_err(|err| unavailable(format!("reading the start-up profile: {err}")))?;
        placement.check_cuda().map_err(unavailable)?;
        tracing::info!(
            cuda_nodes = placement.cuda,
            cpu_nodes = placement.cpu,
            "device cuda: the start-up batch ran on the CUDA provider"
        );
        Ok(loaded)
    }

    /// The device the session runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// What one model call costs beyond its tokens, in tokens' worth of work: how much padding
    /// is worth a call saved when a batch is split by length
    /// ([`super::tokenize::length_buckets`]). On a CPU a call is cheap next to a padded token;
    /// on a GPU, a kernel launch per operator makes a call dear and padding nearly free.
    pub fn call_tokens(&self) -> f64 {
        match self.device {
            Device::Cpu | Device::Auto => CPU_CALL_TOKENS,
            Device::Cuda => CUDA_CALL_TOKENS,
        }
    }

    /// Runs a padded batch and returns one mean-pooled, L2-normalised embedding per row.
    pub fn embed(&mut self, batch: &PaddedBatch) -> Result<Vec<Embedding>, InferError> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        let run_error = |err: ort::Error| InferError::Run(err.to_string());
        let shape = [batch.rows, batch.seq];
        let ids =
            TensorRef::from_array_view((shape, batch.input_ids.as_slice())).map_err(run_error)?;
        let mask = TensorRef::from_array_view((shape, batch.attention_mask.as_slice()))
            .map_err(run_error)?;
        let types = TensorRef::from_array_view((shape, batch.token_type_ids.as_slice()))
            .map_err(run_error)?;
        let outputs = self
            .session
            .run(ort::inputs![
                "input_ids" => ids,
                "attention_mask" => mask,
                "token_type_ids" => types,
            ])
            .map_err(run_error)?;
        let hidden = outputs.get("last_hidden_state").ok_or_else(|| {
            InferError::Run("the model has no `last_hidden_state` output".to_owned())
        })?;
        match hidden.data_type() {
            TensorElementType::Float16 => {
                let (shape, values) = hidden.try_extract_tensor::<f16>().map_err(run_error)?;
                pool_checked(shape, values, batch, self.pooling)
            }
            _ => {
                let (shape, values) = hidden.try_extract_tensor::<f32>().map_err(run_error)?;
                pool_checked(shape, values, batch, self.pooling)
            }
        }
    }
}

/// A model call's fixed cost on the CPU provider, in tokens. Tuned on the 2-core machine
/// (docs/benchmarks.md): 8 to 32 are within noise of each other, 96 is ~8% slower on long
/// outputs, and one call per batch (no split) is half as fast.
const CPU_CALL_TOKENS: f64 = 16.0;
/// A model call's fixed cost on the CUDA provider, in tokens: large enough that a batch runs
/// as one call unless its lengths differ wildly.
const CUDA_CALL_TOKENS: f64 = 16_384.0;

/// A session builder with the options every device shares.
fn builder(
    env: &Environment,
    model: &Path,
    intra_threads: usize,
) -> Result<SessionBuilder, InferError> {
    Session::builder(env)
        .map_err(|err| session_error(model, err))?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|err| session_error(model, err))?
        .with_intra_threads(intra_threads.max(1))
        .map_err(|err| session_error(model, err))?
        .with_inter_threads(1)
        .map_err(|err| session_error(model, err))
}

fn session_error(model: &Path, err: impl std::fmt::Display) -> InferError {
    InferError::Session {
        path: model.to_path_buf(),
        message: err.to_string(),
    }
}

/// Checks the output's shape against the batch, then pools it.
fn pool_checked<T>(
    dims: &[i64],
    values: &[T],
    batch: &PaddedBatch,
    pooling: Pooling,
) -> Result<Vec<Embedding>, InferError>
where
    T: Copy,
    f32: From<T>,
{
    let [rows, seq, dim] = dims else {
        return Err(InferError::Run(format!(
            "last_hidden_state has shape {dims:?}, expected [rows, seq, dim]"
        )));
    };
    let (rows, seq, dim) = (*rows as usize, *seq as usize, *dim as usize);
    if rows != batch.rows || seq != batch.seq || values.len() != rows * seq * dim {
        return Err(InferError::Run(format!(
            "last_hidden_state has shape {dims:?} for a batch of [{}, {}]",
            batch.rows, batch.seq
        )));
    }
    Ok(match pooling {
        Pooling::Mean => mean_pool_normalise(values, &batch.attention_mask, rows, seq, dim),
        Pooling::Cls => cls_pool_normalise(values, rows, seq, dim),
    })
}

/// Takes each row's first token state, scaled to unit length.
pub fn cls_pool_normalise<T>(hidden: &[T], rows: usize, seq: usize, dim: usize) -> Vec<Embedding>
where
    T: Copy,
    f32: From<T>,
{
    (0..rows)
        .map(|row| {
            let start = row * seq * dim;
            let mut v: Vec<f32> = hidden[start..start + dim]
                .iter()
                .map(|&x| f32::from(x))
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

/// Which provider ran the nodes of one profiled run.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct NodePlacement {
    /// Nodes run by the CUDA provider.
    pub cuda: usize,
    /// Nodes run by the CPU provider.
    pub cpu: usize,
    /// Operator types of the matrix multiplications that ran on the CPU.
    pub cpu_matmuls: Vec<String>,
}

/// Operators that carry the model's work: on the CPU, the GPU is not really used.
const HEAVY_OPS: &[&str] = &[
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "Attention",
    "MultiHeadAttention",
];

impl NodePlacement {
    /// Reads an ONNX Runtime profile (a JSON array of events; node events have `cat: "Node"`
    /// and `args.provider` and `args.op_name`).
    pub(crate) fn from_profile(profile: &str) -> Result<NodePlacement, String> {
        let events: Vec<serde_json::Value> =
            serde_json::from_str(profile).map_err(|err| err.to_string())?;
        let mut placement = NodePlacement::default();
        for event in &events {
            if event.get("cat").and_then(|c| c.as_str()) != Some("Node") {
                continue;
            }
            let args = event.get("args");
            let field = |name: &str| {
                args.and_then(|a| a.get(name))
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
            };
            match field("provider") {
                "CUDAExecutionProvider" => placement.cuda += 1,
                "CPUExecutionProvider" => {
                    placement.cpu += 1;
                    let op = field("op_name");
                    if HEAVY_OPS.contains(&op) {
                        placement.cpu_matmuls.push(op.to_owned());
                    }
                }
                _ => {}
            }
        }
        Ok(placement)
    }

    /// Ok when the CUDA provider ran nodes and no heavy operator fell back to the CPU.
    pub(crate) fn check_cuda(&self) -> Result<(), String> {
        if self.cuda == 0 {
            return Err(format!(
                "the CUDA provider registered but ran none of the model's nodes ({} ran on the CPU)",
                self.cpu
            ));
        }
        if !self.cpu_matmuls.is_empty() {
            return Err(format!(
                "the CUDA provider registered but {} matrix multiplications ran on the CPU ({}); \
                 use the fp16 or fp32 export (`make models-gpu`): the int8 model's operators have no CUDA kernels",
                self.cpu_matmuls.len(),
                self.cpu_matmuls.join(", ")
            ));
        }
        Ok(())
    }
}

/// Averages each row's hidden states over its real tokens, then scales to unit length.
pub fn mean_pool_normalise<T>(
    hidden: &[T],
    mask: &[i64],
    rows: usize,
    seq: usize,
    dim: usize,
) -> Vec<Embedding>
where
    T: Copy,
    f32: From<T>,
{
    (0..rows)
        .map(|row| {
            let mut sum = vec![0f32; dim];
            let mut count = 0f32;
            for t in 0..seq {
                if mask[row * seq + t] == 0 {
                    continue;
                }
                count += 1.0;
                let start = (row * seq + t) * dim;
                for (acc, &v) in sum.iter_mut().zip(&hidden[start..start + dim]) {
                    *acc += f32::from(v);
                }
            }
            let count = count.max(1e-9);
            sum.iter_mut().for_each(|v| *v /= count);
            let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            sum.iter_mut().for_each(|v| *v /= norm);
            sum
        })
        .collect()
}
