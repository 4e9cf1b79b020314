//! ONNX Runtime: loading the shared library, building a session for the embedding model, and
//! turning a padded batch into unit-norm sentence embeddings.
//!
//! The library is loaded once per process (`ort` allows one environment), from the path the
//! config names, `ORT_DYLIB_PATH`, or `models/` (see [`super::ModelPaths::resolve`]). A
//! session runs on the calling thread: the [`super::batcher`] calls it from blocking threads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;
use ort::ep;
use ort::session::Session;
use ort::value::TensorRef;
use serde::Deserialize;

use super::tokenize::PaddedBatch;
use super::{Embedding, InferError};

/// Where the model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
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
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl OnnxModel {
    /// Loads ONNX Runtime from `library` and builds a session for `model` on `device`, using
    /// `intra_threads` threads inside each operator.
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
        let session_error = |message: String| InferError::Session {
            path: model.to_path_buf(),
            message,
        };
        let builder = || {
            Session::builder(&env)
                .and_then(|b| {
                    b.with_intra_threads(intra_threads.max(1))
                        .map_err(Into::into)
                })
                .map_err(|err| session_error(err.to_string()))
        };
        let (builder, used) = match device {
            Device::Cpu => (builder()?, Device::Cpu),
            Device::Cuda => {
                let cuda = ep::CUDA::default().build().error_on_failure();
                let builder = builder()?.with_execution_providers([cuda]).map_err(|err| {
                    InferError::CudaUnavailable {
                        message: err.to_string(),
                    }
                })?;
                (builder, Device::Cuda)
            }
            Device::Auto => {
                let cuda = ep::CUDA::default().build().error_on_failure();
                match builder()?.with_execution_providers([cuda]) {
                    Ok(builder) => (builder, Device::Cuda),
                    Err(err) => {
                        tracing::warn!(
                            error = %err,
                            "device auto: CUDA is unavailable, running the embedding model on the CPU"
                        );
                        (builder()?, Device::Cpu)
                    }
                }
            }
        };
        let mut builder = builder;
        let session = builder
            .commit_from_file(model)
            .map_err(|err| session_error(err.to_string()))?;
        tracing::info!(model = %model.display(), device = ?used, intra_threads, "embedding model loaded");
        Ok(OnnxModel {
            session,
            device: used,
        })
    }

    /// The device the session runs on.
    pub fn device(&self) -> Device {
        self.device
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
        let (out_shape, values) = hidden.try_extract_tensor::<f32>().map_err(run_error)?;
        let dims: &[i64] = out_shape;
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
        Ok(mean_pool_normalise(
            values,
            &batch.attention_mask,
            rows,
            seq,
            dim,
        ))
    }
}

/// Averages each row's hidden states over its real tokens, then scales to unit length.
pub fn mean_pool_normalise(
    hidden: &[f32],
    mask: &[i64],
    rows: usize,
    seq: usize,
    dim: usize,
) -> Vec<Embedding> {
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
                for (acc, v) in sum.iter_mut().zip(&hidden[start..start + dim]) {
                    *acc += v;
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
