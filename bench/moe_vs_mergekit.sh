#!/usr/bin/env bash
# MoE building speed and memory: `amalgam moe` against mergekit-moe 0.1.5 on the same configs,
# same machine, one run.
#
#   bash bench/moe_vs_mergekit.sh [WORKDIR] [--no-mergekit] [--layers N] [--reps N]
#
# Uses the synthetic Llama-shaped set of bench/merge_vs_mergekit.sh (hidden 2048, intermediate
# 5632, vocab 32000, 8 layers: 0.54 B parameters, bf16), plus a fourth fine-tune, and the byte-level
# tokenizer of the test fixtures (its 300 ids are valid in the 32000-row embedding). A 4-expert
# Mixtral (2.3 GB of bf16 out) is built with gate_mode cheap_embed (no forward pass) and hidden
# (a forward pass of the base over every expert's prompts), by mergekit-moe (from /tmp/peers) and
# by amalgam at 2 threads; printed: wall time, peak RSS (/usr/bin/time), the ratios. amalgam runs
# --reps times (median), mergekit once. Needs ~12 GB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-bench
layers=8
reps=3
run_mergekit=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-mergekit) run_mergekit=0 ;;
    --layers) layers=$2; shift ;;
    --reps) reps=$2; shift ;;
    *) work=$1 ;;
  esac
  shift
done
mergekit=${MERGEKIT_MOE:-/tmp/peers/bin/mergekit-moe}
cargo build --release -q -p amalgam-cli --examples --bins
bin=$PWD/target/release/amalgam
synth=$PWD/target/release/examples/synth_model
set_dir=$work/models-$layers
mkdir -p "$set_dir" "$work/configs"
shape=(--hidden 2048 --intermediate 5632 --vocab 32000 --layers "$layers" --dtype bf16)
[ -f "$set_dir/base/config.json" ] || "$synth" "$set_dir/base" "${shape[@]}" --seed 1
for i in 1 2 3 4; do
  [ -f "$set_dir/ft$i/config.json" ] || "$synth" "$set_dir/ft$i" "${shape[@]}" --seed $((i + 1)) --base "$set_dir/base" --noise 0.002
done
tok=crates/amalgam-cli/tests/fixtures/moe/llama/base
for d in base ft1 ft2 ft3 ft4; do cp "$tok"/tokenizer.json "$tok"/tokenizer_config.json "$set_dir/$d/"; done
prompts=("the quick brown fox jumps over the lazy dog" "sparse masks keep the largest entries"
         "numbers 12345 and punctuation!?" "language models predict the next token")
for mode in cheap_embed hidden; do
  {
    echo "base_model: $set_dir/base"
    echo "gate_mode: $mode"
    echo "dtype: bfloat16"
    echo "experts_per_token: 2"
    echo "experts:"
    for i in 1 2 3 4; do
      echo "  - source_model: $set_dir/ft$i"
      echo "    positive_prompts: [\"${prompts[$((i - 1))]}\", \"and a second prompt for expert $i\"]"
    done
  } > "$work/configs/moe_$mode.yml"
done

source "$(dirname "$0")/measure.sh"   # measure, median_of

cat "$set_dir"/*/model.safetensors > /dev/null   # warm the page cache for everyone
echo "model set: $layers layers, $(du -sh "$set_dir" | cut -f1); 4-expert Mixtral"
echo "amalgam: median of $reps runs (every run's seconds in the last column); mergekit-moe: one run"
printf '| %-11s | %12s | %12s | %12s | %12s | %8s | %-18s |\n' gate_mode "mergekit s" "mergekit MiB" "amalgam s" "amalgam MiB" speedup "amalgam runs s"
printf '|%s|\n' "-------------|--------------|--------------|--------------|--------------|----------|--------------------"
for mode in cheap_embed hidden; do
  cfg=$work/configs/moe_$mode.yml
  if [ "$run_mergekit" = 1 ]; then
    read -r mk_s mk_m < <(measure "$work/out-mk" "$mergekit" "$cfg" "$work/out-mk" --device cpu --no-copy-tokenizer --quiet; echo)
  else
    mk_s=nan; mk_m=nan
  fi
  read -r am_s am_m am_runs < <(median_of "$reps" "$work/out-am" "$bin" --threads 2 moe "$cfg" "$work/out-am" -q)
  if [ "$run_mergekit" = 1 ] && [ "$mode" = cheap_embed ]; then
    # The same tensors (the check the parity tests make on the tiny fixtures), at this size.
    "$bin" diff "$work/out-mk" "$work/out-am" > "$work/diff.txt" && same=identical || same="differ: see $work/diff.txt"
    echo "cheap_embed outputs: $same" >&2
  fi
  speed=$(python3 -c "import math; a=float('$mk_s'); b=float('$am_s'); print('n/a' if math.isnan(a) else f'{a/b:.1f}x')")
  printf '| %-11s | %12s | %12s | %12s | %12s | %8s | %-18s |\n' "$mode" "$mk_s" "$mk_m" "$am_s" "$am_m" "$speed" "$am_runs"
done
rm -rf "$work/out-am" "$work/out-mk"
