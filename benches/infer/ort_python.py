"""Raw ONNX Runtime (its own Python API) on the same model file, tokenizer and texts as
`tripwire embed`: the reference the Rust batcher is measured against.

Usage: ort_python.py MODEL TOKENIZER INPUT.jsonl FIELD MAX_TOKENS THREADS BATCH
                     [--passes N] [--provider cpu|cuda]
Prints one JSON object: items/s of the median timed pass, and p50/p99 batch latency over all
timed passes. Before timing, one untimed run of the first BATCH texts (as `tripwire embed
--warmup BATCH`). A timed pass tokenises every text (`encode_batch`, parallel), sorts them by
length and runs them in batches of BATCH, each padded to its longest (the most favourable
layout for ONNX Runtime); mean pooling and L2 normalisation as in tripwire. A batch's latency
is padding, the run and pooling (its texts are already tokenised).
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("model", "tokenizer", "data", "field"):
        parser.add_argument(name)
    parser.add_argument("max_tokens", type=int)
    parser.add_argument("threads", type=int)
    parser.add_argument("batch", type=int)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    texts = [json.loads(line)[args.field] for line in open(args.data, encoding="utf-8") if line.strip()]
    tokenizer = Tokenizer.from_file(args.tokenizer)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=args.max_tokens)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.provider == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(args.model, options, providers=providers)
    if args.provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        sys.exit(f"error: CUDAExecutionProvider not in use (session providers: {session.get_providers()})")
    batch_seconds = []

    def run(texts: list, record: bool) -> float:
        started = time.perf_counter()
        encodings = tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), args.batch):
            batch_started = time.perf_counter()
            chunk = [encodings[i] for i in order[start : start + args.batch]]
            width = max(len(e.ids) for e in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, e in enumerate(chunk):
                ids[row, : len(e.ids)] = e.ids
                mask[row, : len(e.ids)] = 1
            hidden = session.run(
                ["last_hidden_state"],
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0].astype(np.float32, copy=False)
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            if record:
                batch_seconds.append(time.perf_counter() - batch_started)
        return time.perf_counter() - started

    run(texts[: args.batch], record=False)
    passes = [run(texts, record=True) for _ in range(args.passes)]
    seconds = statistics.median(passes)
    batch_seconds.sort()

    def quantile(q: float) -> float:
        return batch_seconds[round((len(batch_seconds) - 1) * q)] * 1e3

    json.dump(
        {
            "items": len(texts),
            "seconds": seconds,
            "items_per_s": len(texts) / seconds,
            "batches": len(batch_seconds),
            "batch_p50_ms": quantile(0.5),
            "batch_p99_ms": quantile(0.99),
            "providers": session.get_providers(),
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
