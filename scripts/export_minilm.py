#!/usr/bin/env python3
"""Exports all-MiniLM-L6-v2 as fp32 and fp16 ONNX graphs, for ONNX Runtime's CUDA provider.

Why: the int8 model `make models` fetches is dynamically quantised, and the CUDA provider does
not serve those operators (they fall back to the CPU). So the GPU path needs a float export of
the same weights. The 6-layer BERT is small enough to write out with the `onnx` package's
helpers, straight from `models/all-MiniLM-L6-v2.safetensors` (read here without the
safetensors package: an 8-byte header length, a JSON header, raw little-endian tensors).

Writes `models/all-MiniLM-L6-v2-fp32.onnx` and `models/all-MiniLM-L6-v2-fp16.onnx`: inputs
`input_ids`, `attention_mask`, `token_type_ids` (int64 [batch, seq]), output
`last_hidden_state` ([batch, seq, 384]; float32, or float16 for the fp16 graph).

Then checks each export against the int8 model with ONNX Runtime on the development texts (the
first 200 outputs of gpt-3.5-turbo-1106, read from data/ in the repository):
mean-pooled, L2-normalised embeddings, min and mean cosine. Exits non-zero when a min cosine is
under 0.99; the exports are kept only when both pass.

Cached: `models/all-MiniLM-L6-v2-export.json` records the sha256 of the safetensors source and
of this script; when both match and the exports are there, nothing is done (`make test` runs
this on every call).

Usage: export_minilm.py [--force] [--texts N]
"""

import argparse
import gzip
import hashlib
import json
import math
import pathlib
import struct
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fetch_models import sha256  # scripts/ is on the path when this script runs

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SOURCE = MODELS / "all-MiniLM-L6-v2.safetensors"
INT8 = MODELS / "all-MiniLM-L6-v2-int8.onnx"
TOKENIZER = MODELS / "all-MiniLM-L6-v2-tokenizer.json"
STAMP = MODELS / "all-MiniLM-L6-v2-export.json"
OUTPUTS = {"fp32": MODELS / "all-MiniLM-L6-v2-fp32.onnx", "fp16": MODELS / "all-MiniLM-L6-v2-fp16.onnx"}
DATA = ROOT / "data" / "alpaca_eval" / "gpt-3.5-turbo-1106.jsonl.gz"

LAYERS = 6
HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
EPS = 1e-12
MIN_COSINE = 0.99
# The check runs texts up to this many tokens (the model's largest window in tripwire).
CHECK_MAX_TOKENS = 256


def read_safetensors(path: pathlib.Path) -> dict:
    """All tensors of a safetensors file as numpy arrays."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    body = memoryview(data)[8 + length :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        # Some exports prefix every name with the architecture.
        tensors[name.removeprefix("bert.")] = array
    return tensors


class Graph:
    """A small builder over onnx.helper: named initialisers and nodes with fresh output names."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self.onnx_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.nodes = []
        self.initializers = []
        self.count = 0

    def const(self, name: str, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype or self.dtype)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list, name: str | None = None, **attrs) -> str:
        self.count += 1
        output = name or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"n{self.count}_{op_type}", **attrs))
        return output

    def linear(self, x: str, w: np.ndarray, b: np.ndarray, name: str, scale: float = 1.0) -> str:
        """x @ w.T + b (PyTorch's Linear layout is [out, in])."""
        weight = self.const(f"{name}.weight", (w.astype(np.float32).T * scale).astype(self.dtype))
        bias = self.const(f"{name}.bias", (b.astype(np.float32) * scale).astype(self.dtype))
        return self.op("Add", [self.op("MatMul", [x, weight]), bias])

    def layer_norm(self, x: str, weights: dict, name: str) -> str:
        gamma = self.const(f"{name}.weight", weights[f"{name}.weight"])
        beta = self.const(f"{name}.bias", weights[f"{name}.bias"])
        return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=EPS)


def build(weights: dict, dtype: np.dtype) -> onnx.ModelProto:
    """The BERT encoder of all-MiniLM-L6-v2 in `dtype` (float32 or float16)."""
    g = Graph(dtype)
    i64 = lambda name, value: g.const(name, value, np.int64)  # noqa: E731

    # Embeddings: word + position + token type, then LayerNorm.
    words = g.op("Gather", [g.const("embeddings.word_embeddings.weight", weights["embeddings.word_embeddings.weight"]), "input_ids"])
    # Positions 0..seq are the first `seq` rows of the position table.
    seq = g.op("Shape", ["input_ids"], start=1, end=2)
    position_table = g.const("embeddings.position_embeddings.weight", weights["embeddings.position_embeddings.weight"])
    position_embeddings = g.op("Slice", [position_table, i64("zero", [0]), seq, i64("axis0", [0])])
    types = g.op("Gather", [g.const("embeddings.token_type_embeddings.weight", weights["embeddings.token_type_embeddings.weight"]), "token_type_ids"])
    x = g.op("Add", [g.op("Add", [words, position_embeddings]), types])
    x = g.layer_norm(x, weights, "embeddings.LayerNorm")

    # Additive attention bias, [batch, 1, 1, seq]: 0 for real tokens, -10000 for padding.
    mask = g.op("Cast", ["attention_mask"], to=g.onnx_dtype)
    masked = g.op("Sub", [g.const("one", 1.0), mask])
    bias = g.op("Mul", [masked, g.const("mask_value", -10000.0)])
    bias = g.op("Unsqueeze", [bias, i64("mask_axes", [1, 2])])

    heads_shape = i64("heads_shape", [0, 0, HEADS, HEAD_DIM])
    hidden_shape = i64("hidden_shape", [0, 0, HIDDEN])
    half = g.const("half", 0.5)
    one = "one"
    inv_sqrt2 = g.const("inv_sqrt2", 1.0 / math.sqrt(2.0))
    scale = 1.0 / math.sqrt(HEAD_DIM)

    for layer in range(LAYERS):
        p = f"encoder.layer.{layer}"
        w = lambda suffix: weights[f"{p}.{suffix}"]  # noqa: E731
        # The 1/sqrt(head_dim) score scale is folded into the query projection.
        q = g.linear(x, w("attention.self.query.weight"), w("attention.self.query.bias"), f"{p}.attention.self.query", scale)
        k = g.linear(x, w("attention.self.key.weight"), w("attention.self.key.bias"), f"{p}.attention.self.key")
        v = g.linear(x, w("attention.self.value.weight"), w("attention.self.value.bias"), f"{p}.attention.self.value")
        q = g.op("Transpose", [g.op("Reshape", [q, heads_shape])], perm=[0, 2, 1, 3])  # [b, h, s, d]
        k = g.op("Transpose", [g.op("Reshape", [k, heads_shape])], perm=[0, 2, 3, 1])  # [b, h, d, s]
        v = g.op("Transpose", [g.op("Reshape", [v, heads_shape])], perm=[0, 2, 1, 3])  # [b, h, s, d]
        scores = g.op("Add", [g.op("MatMul", [q, k]), bias])
        probs = g.op("Softmax", [scores], axis=-1)
        context = g.op("Transpose", [g.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = g.op("Reshape", [context, hidden_shape])
        attended = g.linear(context, w("attention.output.dense.weight"), w("attention.output.dense.bias"), f"{p}.attention.output.dense")
        x = g.layer_norm(g.op("Add", [attended, x]), weights, f"{p}.attention.output.LayerNorm")
        # Feed-forward with the exact (erf) GELU, as BERT uses.
        h = g.linear(x, w("intermediate.dense.weight"), w("intermediate.dense.bias"), f"{p}.intermediate.dense")
        erf = g.op("Erf", [g.op("Mul", [h, inv_sqrt2])])
        h = g.op("Mul", [g.op("Mul", [h, half]), g.op("Add", [erf, one])])
        out = g.linear(h, w("output.dense.weight"), w("output.dense.bias"), f"{p}.output.dense")
        x = g.layer_norm(g.op("Add", [out, x]), weights, f"{p}.output.LayerNorm")

    g.op("Identity", [x], name="last_hidden_state")
    batch_seq = ["batch", "seq"]
    graph = helper.make_graph(
        g.nodes,
        "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(name, TensorProto.INT64, batch_seq) for name in ("input_ids", "attention_mask", "token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", g.onnx_dtype, ["batch", "seq", HIDDEN])],
        g.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tripwire export_minilm.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def dev_texts(count: int) -> list:
    if not DATA.exists():
        sys.exit(f"error: development data missing: expected {DATA} (data/alpaca_eval, committed with the repository)")
    texts = []
    with gzip.open(DATA, "rt", encoding="utf-8") as f:
        for line in f:
            if len(texts) >= count:
                break
            if line.strip():
                texts.append(json.loads(line)["output"])
    return texts


def embed(model, texts: list, batch: int = 16) -> np.ndarray:
    """Mean-pooled, L2-normalised embeddings of `texts` from the model at `model` (path or bytes)."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=CHECK_MAX_TOKENS)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    encodings = tokenizer.encode_batch(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
    out = np.zeros((len(texts), HIDDEN), dtype=np.float32)
    for start in range(0, len(order), batch):
        members = order[start : start + batch]
        width = max(len(encodings[i].ids) for i in members)
        ids = np.zeros((len(members), width), dtype=np.int64)
        mask = np.zeros((len(members), width), dtype=np.int64)
        for row, i in enumerate(members):
            ids[row, : len(encodings[i].ids)] = encodings[i].ids
            mask[row, : len(encodings[i].ids)] = 1
        (hidden,) = session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden.astype(np.float32) * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        out[members] = pooled
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="export even when the recorded sha256s match")
    parser.add_argument("--texts", type=int, default=200, help="development texts to check on (default 200)")
    args = parser.parse_args()

    for path in (SOURCE, INT8, TOKENIZER):
        if not path.exists():
            sys.exit(f"error: {path} not found: run `make models`")
    source_sha = sha256(SOURCE)
    script_sha = sha256(pathlib.Path(__file__))
    if not args.force and STAMP.exists() and all(p.exists() for p in OUTPUTS.values()):
        stamp = json.loads(STAMP.read_text())
        if (
            stamp.get("source_sha256") == source_sha
            and stamp.get("script_sha256") == script_sha
            and all(stamp.get(kind, {}).get("sha256") == sha256(path) for kind, path in OUTPUTS.items())
        ):
            print(f"models/{OUTPUTS['fp32'].name} and models/{OUTPUTS['fp16'].name} up to date")
            return

    started = time.perf_counter()
    weights = read_safetensors(SOURCE)
    texts = dev_texts(args.texts)
    reference = embed(str(INT8), texts)
    record = {"source": SOURCE.name, "source_sha256": source_sha, "script_sha256": script_sha,
              "check": f"first {len(texts)} outputs of {DATA.name}, {CHECK_MAX_TOKENS} tokens, against {INT8.name}"}
    failed = []
    for kind, dtype in (("fp32", np.float32), ("fp16", np.float16)):
        model = build(weights, dtype)
        data = model.SerializeToString()
        cosines = (embed(data, texts) * reference).sum(axis=1)
        low, mean = float(cosines.min()), float(cosines.mean())
        print(f"{OUTPUTS[kind].name}: cosine against int8 on {len(texts)} development texts: min {low:.4f}, mean {mean:.4f}")
        if low < MIN_COSINE:
            failed.append(f"{kind} min cosine {low:.4f} < {MIN_COSINE}")
            continue
        partial = OUTPUTS[kind].with_suffix(".onnx.partial")
        partial.write_bytes(data)
        partial.rename(OUTPUTS[kind])
        record[kind] = {"file": OUTPUTS[kind].name, "sha256": hashlib.sha256(data).hexdigest(), "min_cosine": round(low, 5), "mean_cosine": round(mean, 5)}
    if failed:
        STAMP.unlink(missing_ok=True)
        sys.exit("error: export check failed: " + "; ".join(failed))
    STAMP.write_text(json.dumps(record, indent=2) + "\n")
    print(f"exported and checked in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
