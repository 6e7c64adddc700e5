#!/usr/bin/env bash
# Merge speed and memory: amalgam against mergekit on the same configs, same machine, one run.
#
#   bash bench/merge_vs_mergekit.sh [WORKDIR] [--no-mergekit] [--layers N] [--reps N]
#
# Builds a synthetic Llama-shaped model set with amalgam's own writer (hidden 2048, intermediate
# 5632, vocab 32000, 8 layers: 0.54 B parameters, bf16; base + 3 fine-tunes = 4.3 GB), then for
# each method runs mergekit-yaml (from /tmp/peers, `python3 -m venv /tmp/peers &&
# /tmp/peers/bin/pip install mergekit`) and `amalgam merge` at 2 threads, and prints wall time,
# peak RSS (/usr/bin/time) and the ratios, plus the I/O floor: reading every input once and
# writing one output through the page cache. Needs ~15 GB of disk.
#
# The runs of a few seconds (amalgam, the I/O floor) are repeated --reps times (default 3) and
# their median is the figure, every run's time printed beside it: on a shared machine a
# disturbance of a second is half such a run. mergekit runs once (its runs take minutes).
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
mergekit=${MERGEKIT:-/tmp/peers/bin/mergekit-yaml}
cargo build --release -q -p amalgam-cli --examples --bins
bin=$PWD/target/release/amalgam
synth=$PWD/target/release/examples/synth_model
set_dir=$work/models-$layers
mkdir -p "$set_dir" "$work/configs"
shape=(--hidden 2048 --intermediate 5632 --vocab 32000 --layers "$layers" --dtype bf16)
[ -f "$set_dir/base/config.json" ] || "$synth" "$set_dir/base" "${shape[@]}" --seed 1
for i in 1 2 3; do
  [ -f "$set_dir/ft$i/config.json" ] || "$synth" "$set_dir/ft$i" "${shape[@]}" --seed $((i + 1)) --base "$set_dir/base" --noise 0.002
done

config() { # method, extra model params, global params
  local m=$1 p=$2 g=$3
  {
    echo "merge_method: $m"
    echo "base_model: $set_dir/base"
    echo "models:"
    for i in 1 2 3; do echo "  - model: $set_dir/ft$i"; echo "    parameters: {$p}"; done
    if [ -n "$g" ]; then echo "parameters: {$g}"; fi
  } > "$work/configs/$m.yml"
}
config linear "weight: 1.0" "weight: 1.0"   # the base is an input of linear too
config task_arithmetic "weight: 0.5" ""
config ties "weight: 1.0, density: 0.5" ""
config dare_ties "weight: 1.0, density: 0.5" ""
config breadcrumbs "weight: 1.0, density: 0.5, gamma: 0.01" ""
config model_stock "" ""
sed -i '/parameters: {}/d' "$work/configs/model_stock.yml"
cat > "$work/configs/slerp.yml" <<YML
merge_method: slerp
base_model: $set_dir/base
models:
  - model: $set_dir/base
  - model: $set_dir/ft1
parameters: {t: 0.4}
YML

source "$(dirname "$0")/measure.sh"   # measure, median_of, floor, floor_median

cat "$set_dir"/*/model.safetensors > /dev/null   # warm the page cache for everyone
# The I/O floor: every input read once, one output-sized file written.
read -r io io_runs < <(floor_median "$(du -b "$set_dir/base/model.safetensors" | cut -f1)" "$set_dir"/*/model.safetensors)
echo "model set: $layers layers, $(du -sh "$set_dir" | cut -f1); I/O floor ${io}s (median of $io_runs)"
echo "amalgam: median of $reps runs (every run's seconds in the last column); mergekit: one run"
printf '| %-15s | %12s | %12s | %12s | %12s | %8s | %8s | %-18s |\n' method "mergekit s" "mergekit MiB" "amalgam s" "amalgam MiB" speedup "x floor" "amalgam runs s"
printf '|%s|\n' "-----------------|--------------|--------------|--------------|--------------|----------|----------|--------------------"
for m in linear task_arithmetic ties dare_ties breadcrumbs slerp model_stock; do
  if [ "$run_mergekit" = 1 ]; then
    read -r mk_s mk_m < <(measure "$work/out-mk" "$mergekit" "$work/configs/$m.yml" "$work/out-mk" --no-copy-tokenizer --no-write-model-card --quiet; echo)
  else
    mk_s=nan; mk_m=nan
  fi
  read -r am_s am_m am_runs < <(median_of "$reps" "$work/out-am" "$bin" --threads 2 merge "$work/configs/$m.yml" "$work/out-am" -q)
  speed=$(python3 -c "import math; a=float('$mk_s'); b=float('$am_s'); print('n/a' if math.isnan(a) else f'{a/b:.1f}x')")
  vs=$(python3 -c "print(f'{float(\"$am_s\")/float(\"$io\"):.2f}')")
  printf '| %-15s | %12s | %12s | %12s | %12s | %8s | %8s | %-18s |\n' "$m" "$mk_s" "$mk_m" "$am_s" "$am_m" "$speed" "$vs" "$am_runs"
done
read -r t1_s t1_m t1_runs < <(median_of "$reps" "$work/out-am" "$bin" --threads 1 merge "$work/configs/ties.yml" "$work/out-am" -q)
read -r t2_s t2_m t2_runs < <(median_of "$reps" "$work/out-am" "$bin" --threads 2 merge "$work/configs/ties.yml" "$work/out-am" -q)
echo "ties: 1 thread ${t1_s}s ${t1_m} MiB ($t1_runs), 2 threads ${t2_s}s ${t2_m} MiB ($t2_runs): $(python3 -c "print(f'{$t1_s/$t2_s:.2f}')")x"
rm -rf "$work/out-am" "$work/out-mk"
