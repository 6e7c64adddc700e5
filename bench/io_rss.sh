#!/usr/bin/env bash
# Peak resident memory of `inspect` and of round-trip writes on a model of a few GB, to show
# that reading and writing never need more than a few tensors in memory.
#
#   bash bench/io_rss.sh [WORKDIR]     (default WORKDIR: /tmp/amalgam-io-rss; needs ~12 GB disk)
#
# The model is synthetic (Llama-shaped: hidden 4096, intermediate 11008, vocab 32000, 6 layers,
# bf16, 2.9 GB, largest tensor 262 MB) and written by amalgam's own writer.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/amalgam-io-rss}
mkdir -p "$work"
cargo build --release -q -p amalgam-cli --examples --bins
bin=target/release/amalgam
synth=target/release/examples/synth_model
[ -f "$work/model/config.json" ] || "$synth" "$work/model" --hidden 4096 --intermediate 11008 \
  --vocab 32000 --layers 6 --dtype bf16
peak() { # peak RSS in MiB of a command
  /usr/bin/time -f '%M' "$@" 2>&1 >/dev/null | tail -1 | awk '{printf "%.0f", $1/1024}'
}
size=$(du -sm "$work/model" | cut -f1)
largest=$("$bin" inspect "$work/model" --json --top 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["largest"][0]["bytes"]//2**20)')
echo "model: ${size} MiB on disk, largest tensor ${largest} MiB"
echo "inspect:                         peak RSS $(peak "$bin" inspect "$work/model") MiB"
echo "convert (reshard 1B, bf16):      peak RSS $(peak "$bin" convert "$work/model" "$work/sharded" --out-shard-size 1B --overwrite -q) MiB"
echo "convert (sharded -> f32):        peak RSS $(peak "$bin" convert "$work/sharded" "$work/f32" --dtype f32 --overwrite -q) MiB"
echo "convert (f32 -> bf16, 1 thread): peak RSS $(peak "$bin" --threads 1 convert "$work/f32" "$work/back" --dtype bf16 --overwrite -q) MiB"
if "$bin" diff "$work/model" "$work/back" >/dev/null; then echo "round trip bf16 -> f32 -> bf16: bit-exact"; else echo "round trip differs"; exit 1; fi
