#!/usr/bin/env bash
# Time and peak memory of the SVD merge methods on a model of realistic shape.
#
#   bash bench/svd_methods.sh [WORKDIR] [--layers N] [--methods "iso_cts tsv_m ..."]
#
# Builds a synthetic Llama-shaped set with amalgam's own writer (hidden 4096, intermediate
# 14336, vocab 32000, 2 layers by default: 0.75 B parameters, bf16; base + 4 fine-tunes =
# 7.5 GB, ~8 GB of disk), then runs `amalgam merge --threads 2` for each method and prints wall
# time and peak RSS (/usr/bin/time). Every 2-D tensor (the embeddings too) gets the SVD
# treatment. `_rand` variants use `randomized_svd: true` for the per-task truncated SVDs.
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-svd-bench
layers=2
methods="iso_c iso_cts iso_cts_rand tsv_m tsv_m_rand"
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --methods) methods=$2; shift ;;
    *) work=$1 ;;
  esac
  shift
done
cargo build --release -q -p amalgam-cli --examples --bins
bin=$PWD/target/release/amalgam
synth=$PWD/target/release/examples/synth_model
set_dir=$work/models-$layers
mkdir -p "$set_dir" "$work/configs"
shape=(--hidden 4096 --intermediate 14336 --vocab 32000 --layers "$layers" --dtype bf16)
[ -f "$set_dir/base/config.json" ] || "$synth" "$set_dir/base" "${shape[@]}" --seed 1
for i in 1 2 3 4; do
  [ -f "$set_dir/ft$i/config.json" ] || "$synth" "$set_dir/ft$i" "${shape[@]}" --seed $((i + 1)) --base "$set_dir/base" --noise 0.002
done

config() { # name, method, global params
  {
    echo "merge_method: $2"
    echo "base_model: $set_dir/base"
    echo "models:"
    for i in 1 2 3 4; do echo "  - model: $set_dir/ft$i"; done
    echo "parameters: {$3}"
  } > "$work/configs/$1.yml"
}
config iso_c iso_c "lambda: 1.0"
config iso_cts iso_cts "lambda: 1.0"
config iso_cts_rand iso_cts "lambda: 1.0, randomized_svd: true"
config tsv_m tsv_m "lambda: 1.0"
config tsv_m_rand tsv_m "lambda: 1.0, randomized_svd: true"

params=$("$bin" inspect "$set_dir/base" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["parameters"])')
echo "model set: $set_dir ($layers layers, $params parameters per model, 4 tasks), $(nproc) cores"
printf '%-14s %10s %12s\n' method wall_s peak_rss_MiB
for m in $methods; do
  out=$work/out-$m
  sync
  /usr/bin/time -f '%e %M' -o "$work/time.txt" "$bin" merge "$work/configs/$m.yml" "$out" --threads 2 --overwrite -q
  read -r wall rss < "$work/time.txt"
  printf '%-14s %10.1f %12.0f\n' "$m" "$wall" "$((rss / 1024))"
  rm -rf "$out"
done
