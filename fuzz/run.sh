#!/usr/bin/env bash
# `make fuzz`: builds the cargo-fuzz targets, seeds their corpora, runs each for FUZZ_SECONDS
# (one after another) and prints, per target, the seconds run, the executions and the crashes.
# Exits non-zero when any target crashed; the input is in fuzz/artifacts/<target>/.
#
# The toolchain is stable Rust, and cargo-fuzz passes nightly-only flags (-Z sanitizer,
# -Z sancov options): RUSTC_BOOTSTRAP=1 lets the stable compiler accept them. Stable ships the
# AddressSanitizer runtime for x86_64 Linux, so the default sanitizer is `address`; set
# FUZZ_SANITIZER=none where it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-sse capture_openai capture_anthropic request policy cel}
sanitizer=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1
# The fuzz crate builds into fuzz/target, not the main crate's target directory.
unset CARGO_TARGET_DIR

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked || exit 2
cargo fuzz build -s "$sanitizer" || exit 2
python3 fuzz/seed.py || exit 2
mkdir -p fuzz/logs

failed=0
printf '%-18s %8s %12s %8s\n' target seconds execs crashes
for target in $targets; do
    log=fuzz/logs/$target.log
    before=$(ls fuzz/artifacts/"$target" 2>/dev/null | wc -l)
    start=$(date +%s)
    cargo fuzz run -s "$sanitizer" "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1
    rc=$?
    elapsed=$(($(date +%s) - start))
    execs=$(grep -o 'number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    after=$(ls fuzz/artifacts/"$target" 2>/dev/null | wc -l)
    crashes=$((after - before))
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes="rc=$rc"
    fi
    printf '%-18s %8s %12s %8s\n' "$target" "$elapsed" "${execs:-?}" "$crashes"
    if [ "$rc" -ne 0 ]; then
        failed=1
        grep -m1 -A3 -E 'panicked|ERROR: (libFuzzer|AddressSanitizer)' "$log" | sed 's/^/    /'
        ls -t fuzz/artifacts/"$target" 2>/dev/null | head -1 | sed "s|^|    input: fuzz/artifacts/$target/|"
    fi
done
exit $failed
