"""Raw ONNX Runtime (its own Python API) on the same model file, tokenizer and texts as
`tripwire embed`: the reference the Rust batcher is measured against.

Usage: ort_python.py MODEL TOKENIZER INPUT.jsonl FIELD MAX_TOKENS THREADS BATCH
Prints one JSON object: items/s over all texts, best of three passes.
Texts are sorted by length and batched in order, padded to the longest of each batch (the
most favourable layout for ONNX Runtime); mean pooling and L2 normalisation as in tripwire.
"""

import json
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main() -> None:
    model, tokenizer_path, data, field, max_tokens, threads, batch = sys.argv[1:8]
    max_tokens, threads, batch = int(max_tokens), int(threads), int(batch)
    texts = [json.loads(line)[field] for line in open(data, encoding="utf-8") if line.strip()]
    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run_all() -> float:
        started = time.perf_counter()
        encodings = tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for start in range(0, len(order), batch):
            chunk = [encodings[i] for i in order[start:start + batch]]
            width = max(len(e.ids) for e in chunk)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, e in enumerate(chunk):
                ids[row, : len(e.ids)] = e.ids
                mask[row, : len(e.ids)] = 1
            hidden = session.run(
                ["last_hidden_state"],
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )[0]
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return time.perf_counter() - started

    best = min(run_all() for _ in range(3))
    json.dump({"items": len(texts), "seconds": best, "items_per_s": len(texts) / best}, sys.stdout)


if __name__ == "__main__":
    main()
