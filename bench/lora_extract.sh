#!/usr/bin/env bash
# `amalgam lora extract` against mergekit-extract-lora on a model of realistic shape.
#
#   bash bench/lora_extract.sh [WORKDIR] [--layers N] [--rank R]
#
# Builds (or reuses) the synthetic Llama-shaped base and one fine-tune of bench/svd_methods.sh
# (hidden 4096, intermediate 14336, vocab 32000, 2 layers by default, bf16), then extracts a
# rank-R adapter (64 by default) with amalgam (randomized SVD, the default, and --exact) and
# with mergekit-extract-lora (/tmp/peers), printing wall time, peak RSS (/usr/bin/time) and the
# overall relative reconstruction error ‖Δ − B·A‖_F / ‖Δ‖_F of each adapter over the factored
# modules (amalgam reports its own; mergekit's is computed here with torch, in float64: torch's
# float32 CPU matmul is too coarse for it).
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-svd-bench
layers=2
rank=64
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --rank) rank=$2; shift ;;
    *) work=$1 ;;
  esac
  shift
done
py=/tmp/peers/bin/python
cargo build --release -q -p amalgam-cli --examples --bins
bin=$PWD/target/release/amalgam
synth=$PWD/target/release/examples/synth_model
set_dir=$work/models-$layers
mkdir -p "$set_dir"
shape=(--hidden 4096 --intermediate 14336 --vocab 32000 --layers "$layers" --dtype bf16)
[ -f "$set_dir/base/config.json" ] || "$synth" "$set_dir/base" "${shape[@]}" --seed 1
[ -f "$set_dir/ft1/config.json" ] || "$synth" "$set_dir/ft1" "${shape[@]}" --seed 2 --base "$set_dir/base" --noise 0.002

mergekit_error() { # adapter dir: overall relative error of its factored modules
  "$py" - "$1" "$set_dir" <<'PY'
import json, sys, torch
from pathlib import Path
from safetensors import safe_open
adapter, models = Path(sys.argv[1]), Path(sys.argv[2])
def opener(d):
    files = sorted(d.glob("*.safetensors"))
    handles = [safe_open(str(f), "pt") for f in files]
    index = {k: h for h in handles for k in h.keys()}
    return lambda k: index[k].get_tensor(k).double()
base, ft = opener(models / "base"), opener(models / "ft1")
ad = safe_open(str(adapter / "adapter_model.safetensors"), "pt")
cfg = json.loads((adapter / "adapter_config.json").read_text())
num = den = 0.0
for k in ad.keys():
    if not k.endswith(".lora_A.weight"):
        continue
    module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    a, b = ad.get_tensor(k).double(), ad.get_tensor(k.replace("lora_A", "lora_B")).double()
    delta = ft(module + ".weight") - base(module + ".weight")
    num += (delta - b @ a).norm().item() ** 2
    den += delta.norm().item() ** 2
print(f"{(num / den) ** 0.5:.6f}")
PY
}

echo "model: $set_dir ($layers layers), rank $rank, $(nproc) cores"
printf '%-22s %10s %12s %12s\n' tool wall_s peak_rss_MiB rel_error
run() { # label, command...
  local label=$1; shift
  sync
  /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" > "$work/out.txt" 2> "$work/err.txt" || true
  read -r wall rss < "$work/time.txt"
  echo "$label $wall $rss"
}
for variant in randomized exact; do
  out=$work/lora-amalgam-$variant
  flag=(); [ $variant = exact ] && flag=(--exact)
  read -r _ wall rss < <(run x "$bin" lora extract --base "$set_dir/base" --model "$set_dir/ft1" --rank "$rank" "$out" --overwrite --json -q "${flag[@]}")
  err=$(python3 -c 'import json,sys; print("%.6f" % json.load(open(sys.argv[1]))["overall_relative_error"])' "$work/out.txt")
  printf '%-22s %10.1f %12.0f %12s\n' "amalgam ($variant)" "$wall" "$((rss / 1024))" "$err"
done
out=$work/lora-mergekit
rm -rf "$out"
read -r _ wall rss < <(run x env HF_HUB_OFFLINE=1 /tmp/peers/bin/mergekit-extract-lora --model "$set_dir/ft1" --base-model "$set_dir/base" --out-path "$out" --max-rank "$rank")
[ -f "$out/adapter_model.safetensors" ] || { cat "$work/err.txt"; exit 1; }
printf '%-22s %10.1f %12.0f %12s\n' "mergekit-extract-lora" "$wall" "$((rss / 1024))" "$(mergekit_error "$out")"
