#!/usr/bin/env bash
# `tripwire embed` (the Rust batcher) against raw ONNX Runtime's Python API: same model file,
# tokenizer, texts and intra-op threads, in one run. For each field (instruction; output cut to
# 128 and to 256 tokens) and batch size, the two sides alternate (which goes first swaps every
# round), each in a fresh process with one untimed warm-up batch and one timed pass over all
# texts. Prints the median over the rounds of items/s and p99 batch latency of each side, the
# ratio at the same batch size, and the ratio to ONNX Runtime Python at its best batch size
# (the acceptance baseline); ratios are taken within a round (the two sides ran back to back,
# so a load change on the shared machine hits both) and their median is reported.
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
with gzip.open("data/alpaca_eval/gpt-3.5-turbo-1106.jsonl.gz", "rt", encoding="utf-8") as f:
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
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
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

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average at the start $load_before, at the end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "model: $model; $texts texts of gpt-3.5-turbo-1106; $threads intra-op threads; median of $rounds alternating rounds; $(( $(date +%s) - started )) s"
echo
python3 - "$results" <<'PY'
import collections, json, statistics, sys
# runs[(field, max_tokens)][round][(side, batch)] = result
runs = collections.defaultdict(lambda: collections.defaultdict(dict))
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs[(r["field"], r["max_tokens"])][r["round"]][(r["side"], r["batch"])] = r["result"]
print("| field | max tokens | batch | tripwire items/s | tripwire batch p99 ms | ORT Python items/s | ORT Python batch p99 ms | ratio, same batch | ratio to ORT Python's best |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
summary = []
for (field, max_tokens), rounds in sorted(runs.items(), key=lambda kv: (kv[0][0] != "instruction", kv[0][1])):
    sizes = sorted({b for rnd in rounds.values() for (_, b) in rnd})
    med = lambda side, b, key: statistics.median(rnd[(side, b)][key] for rnd in rounds.values())
    # Ratios are paired within a round (the two sides ran back to back), then the median is taken.
    same = lambda b: statistics.median(rnd[("tripwire", b)]["items_per_s"] / rnd[("python", b)]["items_per_s"] for rnd in rounds.values())
    best_py = lambda rnd: max(rnd[("python", s)]["items_per_s"] for s in sizes)
    to_best = lambda b: statistics.median(rnd[("tripwire", b)]["items_per_s"] / best_py(rnd) for rnd in rounds.values())
    for b in sizes:
        print(f"| {field} | {max_tokens} | {b} | {med('tripwire', b, 'items_per_s'):.1f} | {med('tripwire', b, 'batch_p99_ms'):.1f} "
              f"| {med('python', b, 'items_per_s'):.1f} | {med('python', b, 'batch_p99_ms'):.1f} | {same(b):.3f} | {to_best(b):.3f} |")
    best_rust = statistics.median(max(rnd[("tripwire", s)]["items_per_s"] for s in sizes) / best_py(rnd) for rnd in rounds.values())
    summary.append(f"- {field} @ {max_tokens} tokens: tripwire at its best batch size / ORT Python at its best, paired per round, median: {best_rust:.3f}")
print()
print("\n".join(summary))
PY
