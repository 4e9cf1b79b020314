#!/usr/bin/env bash
# `tripwire embed` (Rust batcher) against raw ONNX Runtime's Python API, same model file,
# tokenizer, texts and threads, alternating in one run. Prints items/s of each and the ratio.
#
#   benches/infer/compare.sh [TEXTS (400)] [THREADS (2)] [ROUNDS (3)]
# Needs: make build, make models, and a Python with onnxruntime, tokenizers, numpy
# ($INFER_PYTHON, default .venv-infer/bin/python, made by `make bench-infer`).
set -euo pipefail
cd "$(dirname "$0")/../.."
texts=${1:-400}; threads=${2:-2}; rounds=${3:-3}
python=${INFER_PYTHON:-.venv-infer/bin/python}
data=target/embed-bench.jsonl
python3 - "$texts" > "$data" <<'PY'
import gzip, json, sys
n = int(sys.argv[1])
with gzip.open("../shared/data/alpaca_eval/gpt-3.5-turbo-1106.jsonl.gz", "rt", encoding="utf-8") as f:
    for i, line in enumerate(f):
        if i >= n:
            break
        d = json.loads(line)
        print(json.dumps({"instruction": d["instruction"], "output": d["output"]}))
PY
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $texts texts of gpt-3.5-turbo-1106; $threads intra-op threads; batch 32"
printf '| field | max tokens | round | tripwire embed items/s | ORT Python items/s | ratio |\n|---|---:|---:|---:|---:|---:|\n'
for spec in "instruction 256" "output 128" "output 256"; do
  set -- $spec
  for round in $(seq 1 "$rounds"); do
    rust=$(target/release/tripwire embed --input "$data" --field "$1" --threads "$threads" --max-tokens "$2" --max-batch 32 2>/dev/null \
      | sed -n 's/.*: \([0-9.]*\) items\/s.*/\1/p')
    py=$("$python" benches/infer/ort_python.py models/all-MiniLM-L6-v2-int8.onnx models/all-MiniLM-L6-v2-tokenizer.json "$data" "$1" "$2" "$threads" 32 \
      | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["items_per_s"], 1))')
    ratio=$(python3 -c "print(f'{$rust / $py:.3f}')")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$round" "$rust" "$py" "$ratio"
  done
done
