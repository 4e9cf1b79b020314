#!/usr/bin/env bash
# `tripwire embed` (the Rust batcher) against raw ONNX Runtime's Python API: same model file,
# tokenizer, texts and intra-op threads, in one run. For each field (instruction; output cut to
# 128 and to 256 tokens) and batch size, the two sides alternate (which goes first swaps every
# round), each in a fresh process with one untimed warm-up batch and one timed pass over all
# texts. Prints the median over the rounds of items/s and p99 batch latency of each side, the
# ratio at the same batch size, and the ratio to ONNX Runtime Python at its best batch size
# (the acceptance baseline).
#
#   benches/infer/compare.sh [TEXTS (400)] [THREADS (2)] [ROUNDS (5)] [MODEL (int8)]
#   BATCHES="1 8 32 64" (default) picks the batch sizes.
# Needs: make build, make models, and a Python with onnxruntime, tokenizers, numpy
# ($INFER_PYTHON, default .venv-infer/bin/python; `make bench-infer` makes all three).
set -euo pipefail
cd "$(dirname "$0")/../.."
texts=${1:-400}; threads=${2:-2}; rounds=${3:-5}
model=${4:-models/all-MiniLM-L6-v2-int8.onnx}
batches=${BATCHES:-1 8 32 64}
python=${INFER_PYTHON:-.venv-infer/bin/python}
tripwire=${TRIPWIRE:-target/release/tripwire}
tokenizer=models/all-MiniLM-L6-v2-tokenizer.json
mkdir -p target/bench-infer
data=target/bench-infer/texts.jsonl
results=target/bench-infer/results.jsonl
: > "$results"
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

# side field max_tokens batch round: one timed pass, one JSON line appended to $results.
measure() {
  local side=$1 field=$2 max=$3 batch=$4 round=$5 out
  if [[ $side == tripwire ]]; then
    out=$("$tripwire" embed --input "$data" --field "$field" --model "$model" --threads "$threads" \
      --max-tokens "$max" --max-batch "$batch" --warmup "$batch" --json 2>/dev/null)
  else
    out=$("$python" benches/infer/ort_python.py "$model" "$tokenizer" "$data" "$field" "$max" "$threads" "$batch")
  fi
  printf '{"side":"%s","field":"%s","max_tokens":%s,"batch":%s,"round":%s,"result":%s}\n' \
    "$side" "$field" "$max" "$batch" "$round" "$out" >> "$results"
}

started=$(date +%s)
for spec in "instruction 256" "output 128" "output 256"; do
  set -- $spec
  for round in $(seq 1 "$rounds"); do
    for batch in $batches; do
      if (( round % 2 )); then
        measure tripwire "$1" "$2" "$batch" "$round"; measure python "$1" "$2" "$batch" "$round"
      else
        measure python "$1" "$2" "$batch" "$round"; measure tripwire "$1" "$2" "$batch" "$round"
      fi
    done
  done
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "model: $model; $texts texts of gpt-3.5-turbo-1106; $threads intra-op threads; median of $rounds alternating rounds; $(( $(date +%s) - started )) s"
echo
python3 - "$results" <<'PY'
import collections, json, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["field"], r["max_tokens"], r["batch"], r["side"])].append(r["result"])
def med(key, field):
    return statistics.median(x[field] for x in rows[key])
specs = sorted({k[:2] for k in rows}, key=lambda s: (s[0] != "instruction", s[1]))
print("| field | max tokens | batch | tripwire items/s | tripwire batch p99 ms | ORT Python items/s | ORT Python batch p99 ms | ratio, same batch | ratio to ORT Python's best |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
summary = []
for field, max_tokens in specs:
    sizes = sorted({k[2] for k in rows if k[:2] == (field, max_tokens)})
    py = {b: med((field, max_tokens, b, "python"), "items_per_s") for b in sizes}
    rust = {b: med((field, max_tokens, b, "tripwire"), "items_per_s") for b in sizes}
    best_b = max(py, key=py.get)
    for b in sizes:
        print(f"| {field} | {max_tokens} | {b} | {rust[b]:.1f} | {med((field, max_tokens, b, 'tripwire'), 'batch_p99_ms'):.1f} "
              f"| {py[b]:.1f} | {med((field, max_tokens, b, 'python'), 'batch_p99_ms'):.1f} | {rust[b] / py[b]:.3f} | {rust[b] / py[best_b]:.3f} |")
    rust_b = max(rust, key=rust.get)
    summary.append(f"- {field} @ {max_tokens} tokens: tripwire best {rust[rust_b]:.1f} items/s (batch {rust_b}) vs ORT Python best "
                   f"{py[best_b]:.1f} (batch {best_b}): {rust[rust_b] / py[best_b]:.3f}; at batch 32: {rust.get(32, float('nan')) / py[best_b]:.3f}")
print()
print("\n".join(summary))
PY
