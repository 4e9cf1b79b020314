#!/usr/bin/env bash
# GPU benchmark: the fp16 MiniLM export through `tripwire embed --device cuda` (the dynamic
# batcher, as the detectors use it) against raw ONNX Runtime's Python API with the
# CUDAExecutionProvider, on the same GPU, model file and texts. Prints the ONNX Runtime version
# and providers, then a markdown table of embeddings/s and p99 batch latency per batch size.
#
#   benches/infer/gpu.sh [ORT_LIB_DIR] [TEXTS (2048)] [MAX_TOKENS (256)] [ROUNDS (3)]
#
# ORT_LIB_DIR holds libonnxruntime.so* and libonnxruntime_providers_cuda.so and
# libonnxruntime_providers_shared.so (from the onnxruntime-gpu wheel, whose onnxruntime/capi/
# has all three; CUDA 13 builds need onnxruntime-gpu 1.31.1). Default: the capi/ folder of the
# onnxruntime package of $INFER_PYTHON. The CUDA, cuBLAS and cuDNN libraries must be on the
# loader path (LD_LIBRARY_PATH), as ONNX Runtime's CUDA provider needs them.
#
# Needs: make build and make models-gpu (models/all-MiniLM-L6-v2-fp16.onnx), an NVIDIA GPU, and
# $INFER_PYTHON (default python3) with onnxruntime-gpu, tokenizers and numpy. Texts: outputs
# of several models from $DATA (default data/alpaca_eval, committed with the repository), or the
# JSONL file TEXTS_FILE (objects with an "output" field) on a machine without the data.
# BATCHES="1 2 4 8 16 32 64 128 256" (default) picks the batch sizes.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${INFER_PYTHON:-python3}
tripwire=${TRIPWIRE:-target/release/tripwire}
model=${MODEL:-models/all-MiniLM-L6-v2-fp16.onnx}
tokenizer=${TOKENIZER:-models/all-MiniLM-L6-v2-tokenizer.json}
data_dir=${DATA:-data/alpaca_eval}
batches=${BATCHES:-1 2 4 8 16 32 64 128 256}
libdir=${1:-}
texts=${2:-2048}; max_tokens=${3:-256}; rounds=${4:-3}

fail() { echo "error: $*" >&2; exit 2; }
if [[ -z $libdir ]]; then
  libdir=$("$python" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))') \
    || fail "no ORT_LIB_DIR given and $python has no onnxruntime package"
fi
ortlib=$(ls "$libdir"/libonnxruntime.so* 2>/dev/null | sort -V | tail -n 1 || true)
[[ -n $ortlib ]] || fail "no libonnxruntime.so* in $libdir"
for lib in libonnxruntime_providers_cuda.so libonnxruntime_providers_shared.so; do
  [[ -f $libdir/$lib ]] || fail "$libdir/$lib is missing: use the onnxruntime-gpu wheel's onnxruntime/capi/"
done
[[ -x $tripwire ]] || fail "$tripwire not built: run make build"
[[ -f $model ]] || fail "$model not found: run make models-gpu"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

echo "## GPU embedding benchmark"
echo
echo '```'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not found"
"$python" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'
echo "tripwire loads: $ortlib"
echo '```'

mkdir -p target/bench-gpu
data=target/bench-gpu/texts.jsonl
results=target/bench-gpu/results.jsonl
: > "$results"
if [[ -n ${TEXTS_FILE:-} ]]; then
  head -n "$texts" "$TEXTS_FILE" > "$data"
else
python3 - "$data_dir" "$texts" > "$data" <<'PY'
import gzip, json, pathlib, sys
root, n = pathlib.Path(sys.argv[1]), int(sys.argv[2])
files = ["gpt-3.5-turbo-1106", "gpt4_1106_preview", "claude-3-opus-20240229", "Mistral-7B-Instruct-v0.2", "llama-2-70b-chat-hf"]
count = 0
for name in files:
    with gzip.open(root / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if count >= n:
                sys.exit(0)
            if line.strip():
                print(json.dumps({"output": json.loads(line)["output"]}))
                count += 1
if count < n:
    sys.exit(f"error: only {count} texts under {root}")
PY
fi

# Fail fast, with tripwire's own message, when the CUDA provider does not run the model.
"$tripwire" embed --input "$data" --field output --device cuda --onnxruntime "$ortlib" --model "$model" \
  --limit 64 --json >/dev/null

measure() {
  local side=$1 batch=$2 round=$3 out
  if [[ $side == tripwire ]]; then
    out=$("$tripwire" embed --input "$data" --field output --device cuda --onnxruntime "$ortlib" --model "$model" \
      --threads 1 --max-tokens "$max_tokens" --max-batch "$batch" --max-wait 2ms --warmup "$batch" --json 2>/dev/null)
  else
    out=$("$python" benches/infer/ort_python.py "$model" "$tokenizer" "$data" output "$max_tokens" 1 "$batch" --provider cuda)
  fi
  printf '{"side":"%s","batch":%s,"round":%s,"result":%s}\n' "$side" "$batch" "$round" "$out" >> "$results"
}
for round in $(seq 1 "$rounds"); do
  for batch in $batches; do
    if (( round % 2 )); then measure tripwire "$batch" "$round"; measure python "$batch" "$round"
    else measure python "$batch" "$round"; measure tripwire "$batch" "$round"; fi
  done
done

echo
echo "fp16 all-MiniLM-L6-v2, $texts outputs cut to $max_tokens tokens; median of $rounds alternating rounds"
echo
python3 - "$results" <<'PY'
import collections, json, statistics, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[(r["batch"], r["side"])].append(r["result"])
med = lambda key, field: statistics.median(x[field] for x in rows[key])
print("| batch | tripwire embed/s | tripwire batch p99 ms | ORT Python (CUDA) embed/s | ORT Python batch p99 ms | ratio |")
print("|---:|---:|---:|---:|---:|---:|")
for b in sorted({k[0] for k in rows}):
    t, p = med((b, "tripwire"), "items_per_s"), med((b, "python"), "items_per_s")
    print(f"| {b} | {t:.0f} | {med((b, 'tripwire'), 'batch_p99_ms'):.1f} | {p:.0f} | {med((b, 'python'), 'batch_p99_ms'):.1f} | {t / p:.3f} |")
PY
