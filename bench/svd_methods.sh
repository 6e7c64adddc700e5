#!/usr/bin/env bash
# The SVD merge methods (iso_c, iso_cts, tsv_m): amalgam against FusionBench 0.2.33, side by side.
#
#   bash bench/svd_methods.sh [WORKDIR] [--shape small|7b] [--layers N] [--methods "..."]
#                             [--no-peer] [--no-exact]
#
# Builds a synthetic Llama-shaped set with amalgam's own writer (bf16; base + 4 fine-tunes whose
# task vectors are Gaussian noise, the hardest case for the Gram route's conditioning bound):
#   small: hidden 2048, intermediate 5632, vocab 32000 (TinyLlama's widths), 2 layers;
#   7b:    hidden 4096, intermediate 14336, vocab 32000 (Llama-2-7B's), 2 layers.
# Every 2-D tensor (the embeddings too) gets the SVD treatment, lambda 1, outputs in f32 (so that
# the updates can be compared; bf16 rounding of base + update would swamp the difference). For
# each method it runs, at 2 threads, and prints wall time and peak RSS (/usr/bin/time):
#   amalgam        `amalgam merge` with the default `solver: auto` (Gram route where its bound
#                  holds, SVD elsewhere);
#   amalgam_svd    the same with `solver: svd` (the exact path: thin SVDs, as the references);
#   fusionbench    bench/svd_fusionbench.py: FusionBench's own merge functions on the CPU
#                  (/tmp/peers; skipped with --no-peer);
# then the norm-relative difference of amalgam's update from the exact path's and from
# FusionBench's (whole model, f64), the ratios, and each output's difference from the truth on
# three matrices (FusionBench's own code run in f64). `--no-exact` skips the exact path. The 7b
# shape with --no-peer --no-exact gives the figure for a 32-layer model (FusionBench would hold
# 15 GB of f32 task vectors; the exact path takes about half an hour per method).
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-svd-bench
layers=2
shape=small
methods="iso_c iso_cts tsv_m"
peer=1
exact=1
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --shape) shape=$2; shift ;;
    --methods) methods=$2; shift ;;
    --no-peer) peer=0 ;;
    --no-exact) exact=0 ;;
    *) work=$1 ;;
  esac
  shift
done
case "$shape" in
  small) dims=(--hidden 2048 --intermediate 5632 --vocab 32000) ;;
  7b) dims=(--hidden 4096 --intermediate 14336 --vocab 32000) ;;
  *) echo "unknown shape $shape (small or 7b)" >&2; exit 2 ;;
esac
python=${PEER_PYTHON:-/tmp/peers/bin/python}
cargo build --release -q -p amalgam-cli --examples --bins
bin=$PWD/target/release/amalgam
synth=$PWD/target/release/examples/synth_model
set_dir=$work/$shape-$layers
mkdir -p "$set_dir" "$work/configs"
args=("${dims[@]}" --layers "$layers" --dtype bf16)
[ -f "$set_dir/base/config.json" ] || "$synth" "$set_dir/base" "${args[@]}" --seed 1
fts=()
for i in 1 2 3 4; do
  [ -f "$set_dir/ft$i/config.json" ] || "$synth" "$set_dir/ft$i" "${args[@]}" --seed $((i + 1)) --base "$set_dir/base" --noise 0.002
  fts+=("$set_dir/ft$i")
done

config() { # name, method, solver
  {
    echo "merge_method: $2"
    echo "base_model: $set_dir/base"
    echo "models:"
    for ft in "${fts[@]}"; do echo "  - model: $ft"; done
    echo "parameters: {lambda: 1.0, solver: $3}"
    echo "out_dtype: float32"
  } > "$work/configs/$1.yml"
}

timed() { # label, command...
  local label=$1; shift
  mkdir -p "$work/$(dirname "$label")"
  sync
  /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" > "$work/$label.log" 2>&1 || {
    echo "$label failed:" >&2; tail -20 "$work/$label.log" >&2; exit 1; }
  read -r wall rss < "$work/time.txt"
  printf '%-24s %10.1f %12.0f\n' "$label" "$wall" "$((rss / 1024))"
  echo "$wall $((rss / 1024))" > "$work/$label.time"
}

params=$("$bin" inspect "$set_dir/base" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["parameters"])')
echo "model set: $set_dir ($shape, $layers layers, $params parameters per model, 4 tasks), $(nproc) cores"
printf '%-24s %10s %12s\n' run wall_s peak_rss_MiB
for m in $methods; do
  config "$m" "$m" auto
  config "$m-svd" "$m" svd
  timed "$m/amalgam" "$bin" merge "$work/configs/$m.yml" "$work/out-$m" --threads 2 --overwrite -q
  if [ "$exact" = 1 ]; then
    timed "$m/amalgam_svd" "$bin" merge "$work/configs/$m-svd.yml" "$work/out-$m-svd" --threads 2 --overwrite -q
    echo "  $m: amalgam vs exact path: $("$python" bench/svd_fusionbench.py --compare "$work/out-$m" "$work/out-$m-svd" "$set_dir/base")"
  fi
  if [ "$peer" = 1 ]; then
    timed "$m/fusionbench" "$python" bench/svd_fusionbench.py "$m" "$set_dir/base" "$work/out-$m-fb" "${fts[@]}" --threads 2
    echo "  $m: amalgam vs FusionBench: $("$python" bench/svd_fusionbench.py --compare "$work/out-$m" "$work/out-$m-fb" "$set_dir/base")"
    read -r fw fr < "$work/$m/fusionbench.time"
    read -r aw ar < "$work/$m/amalgam.time"
    python3 -c "print(f'  $m: FusionBench / amalgam: time {$fw / $aw:.2f}x, peak memory {$fr / $ar:.2f}x')"
  fi
  # Against the truth on three matrices (square, tall, wide): FusionBench's code in f64.
  outs=()
  for o in "$work/out-$m" "$work/out-$m-svd" "$work/out-$m-fb"; do [ -d "$o" ] && outs+=("$o"); done
  keys=model.layers.1.self_attn.v_proj.weight,model.layers.1.mlp.up_proj.weight,model.layers.1.mlp.down_proj.weight
  echo "  $m: difference from f64: $("$python" bench/svd_fusionbench.py --truth "$m" "$set_dir/base" "$keys" "${outs[@]}" --models "${fts[@]}")"
  rm -rf "$work/out-$m" "$work/out-$m-svd" "$work/out-$m-fb"
done
