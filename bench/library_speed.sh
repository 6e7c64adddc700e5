#!/usr/bin/env bash
# Task library speed and memory: `library build` and `library rebuild` for each scheme against
# the I/O floor, same machine, one run.
#
#   bash bench/library_speed.sh [WORKDIR] [--layers N] [--reps N] [--schemes "emr tall ..."] [--keep]
#
# Uses the synthetic Llama-shaped model set of bench/merge_vs_mergekit.sh, the same directory
# ($WORKDIR/models-N, default WORKDIR /tmp/amalgam-bench, so the two scripts share it; built here
# with amalgam's own writer if absent: hidden 2048, intermediate 5632, vocab 32000, 8 layers:
# 0.54 B parameters, bf16; base + 3 fine-tunes = 4.3 GB). For each scheme (default: emr tall
# sign ternary quant tsv_c twin dense; ternary at density 0.1, quant at 4 bits, tsv_c at rank 32
# with the randomized SVD, twin at rank_fraction 0.02 over task arithmetic λ 0.3) it runs
# `amalgam --threads 2 library build` of the 3 fine-tunes and `library rebuild` of ft1, and
# prints wall time and peak RSS (/usr/bin/time), the library's size and bits per parameter per
# task (`library info`), and each figure's ratio to its I/O floor, through the page cache:
#   build:   read the 4 models once, write the library's bytes (`du -sb` of the built library),
#            fsync;
#   rebuild: read the base, the library's shared part and ft1's file once, write one model-sized
#            output (the base's bytes), fsync.
# Needs ~15 GB of disk at 8 layers (the libraries are removed at the end unless --keep).
#
# Every run of a few seconds (builds, rebuilds, floors) is repeated --reps times (default 3) and
# its median is the figure, every run's time printed beside it. The builds of the SVD schemes
# (tsv_c, twin) run once and get no floor ratio: their SVDs, not I/O, are the cost. The table
# is printed as markdown, then once more as one line `RESULT_JSON {...}` for BENCHMARKS.md.
# NO_BUILD=1 skips the cargo build (the binaries must exist).
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-bench
layers=8
reps=3
schemes="emr tall sign ternary quant tsv_c twin dense"
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --reps) reps=$2; shift ;;
    --schemes) schemes=$2; shift ;;
    --keep) keep=1 ;;
    *) work=$1 ;;
  esac
  shift
done
threads=2
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p amalgam-cli --examples --bins
bin=$PWD/target/release/amalgam
synth=$PWD/target/release/examples/synth_model
set_dir=$work/models-$layers
mkdir -p "$set_dir" "$work/configs"
shape=(--hidden 2048 --intermediate 5632 --vocab 32000 --layers "$layers" --dtype bf16)
[ -f "$set_dir/base/config.json" ] || "$synth" "$set_dir/base" "${shape[@]}" --seed 1
for i in 1 2 3; do
  [ -f "$set_dir/ft$i/config.json" ] || "$synth" "$set_dir/ft$i" "${shape[@]}" --seed $((i + 1)) --base "$set_dir/base" --noise 0.002
done

svd_schemes=" tsv_c twin "
params_of() { # the scheme's `parameters:` flow mapping
  case "$1" in
    ternary) echo "density: 0.1" ;;
    quant) echo "bits: 4" ;;
    tsv_c) echo "rank: 32, randomized_svd: true" ;;
    twin) echo "rank_fraction: 0.02" ;;
    *) echo "" ;;
  esac
}
config() { # scheme
  local s=$1
  {
    echo "base_model: $set_dir/base"
    echo "tasks:"
    for i in 1 2 3; do echo "  - {name: ft$i, model: $set_dir/ft$i}"; done
    echo "scheme: $s"
    echo "parameters: {$(params_of "$s")}"
    if [ "$s" = twin ]; then echo "merge: {merge_method: task_arithmetic, parameters: {lambda: 0.3}}"; fi
  } > "$work/configs/library-$s.yml"
}

source "$(dirname "$0")/measure.sh"   # measure, median_of, floor, floor_median

inputs=("$set_dir"/base/*.safetensors "$set_dir"/ft1/*.safetensors "$set_dir"/ft2/*.safetensors "$set_dir"/ft3/*.safetensors)
model_bytes=$(cat "$set_dir"/base/*.safetensors | wc -c)
params=$("$bin" inspect "$set_dir/base" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["parameters"])')
cat "${inputs[@]}" > /dev/null   # warm the page cache for everyone
rows=$work/library-rows.jsonl
: > "$rows"
echo "model set: $set_dir ($layers layers, $params parameters per model, base + 3 tasks, $(du -sh "$set_dir" | cut -f1)), $(nproc) cores, amalgam --threads $threads"
echo "builds and rebuilds: median of $reps runs (tsv_c and twin builds: one run), every run's seconds in parentheses; floors: median of $reps runs"
printf '| %-7s | %-26s | %9s | %13s | %-26s | %11s | %15s | %10s | %15s |\n' scheme "build s (runs)" "build MiB" "× build floor" "rebuild s (runs)" "rebuild MiB" "× rebuild floor" "library MB" "bits/param/task"
printf '|%s|\n' "---------|----------------------------|-----------|---------------|----------------------------|-------------|-----------------|------------|-----------------"
floors=()
for s in $schemes; do
  config "$s"
  lib=$work/lib-$s
  svd=0 n_build=$reps
  if [[ "$svd_schemes" == *" $s "* ]]; then svd=1 n_build=1; fi
  read -r b_s b_m b_runs < <(median_of "$n_build" "$lib" "$bin" --threads "$threads" library build "$work/configs/library-$s.yml" "$lib" --overwrite -q; echo) || true
  if [ -z "$b_s" ]; then
    printf '| %-7s | %-26s | %9s | %13s | %-26s | %11s | %15s | %10s | %15s |\n' "$s" FAILED - - - - - - -
    python3 -c 'import json,sys; print(json.dumps({"scheme": sys.argv[1], "failed": "build"}))' "$s" >> "$rows"
    continue
  fi
  lib_bytes=$(du -sb "$lib" | cut -f1)
  info=$("$bin" --threads "$threads" library info "$lib" --json)
  # The build floor: the 4 inputs read, the library's bytes written.
  read -r bf_s bf_runs < <(floor_median "$lib_bytes" "${inputs[@]}")
  # The rebuild floor: the base, the shared part and ft1's file read, one model written.
  rb_inputs=("$set_dir"/base/*.safetensors)
  for f in "$lib"/shared*.safetensors; do if [ -f "$f" ]; then rb_inputs+=("$f"); fi; done
  rb_inputs+=("$lib/tasks/ft1.safetensors")
  rb_read=$(cat "${rb_inputs[@]}" | wc -c)
  read -r rf_s rf_runs < <(floor_median "$model_bytes" "${rb_inputs[@]}")
  read -r r_s r_m r_runs < <(median_of "$reps" "$work/out-model" "$bin" --threads "$threads" library rebuild "$lib" ft1 "$work/out-model" --overwrite -q; echo) || true
  rm -rf "$work/out-model"
  floors+=("$(printf '| %-7s | %11s | %-22s | %14s | %13s | %-22s | %15s |' "$s" "$bf_s" "$bf_runs" "$lib_bytes" "$rf_s" "$rf_runs" "$rb_read")")
  python3 - "$s" "$svd" "$b_s" "$b_m" "$b_runs" "$bf_s" "$bf_runs" "$lib_bytes" "${r_s:-}" "${r_m:-}" "${r_runs:-}" "$rf_s" "$rf_runs" "$rb_read" "$info" "$rows" <<'PY'
import json, sys
(s, svd, b_s, b_m, b_runs, bf_s, bf_runs, lib_bytes, r_s, r_m, r_runs, rf_s, rf_runs, rb_read, info,
 rows) = sys.argv[1:]
info = json.loads(info)
bits = [t["bits_per_parameter"] for t in info["tasks"]]
runs = lambda r: [float(x) for x in r.split("/")] if r else []
row = {
    "scheme": s,
    "build_s": float(b_s), "build_runs": runs(b_runs), "build_mib": int(b_m),
    "build_floor_s": float(bf_s), "build_floor_runs": runs(bf_runs),
    "build_x_floor": None if svd == "1" else round(float(b_s) / float(bf_s), 2),
    "rebuild_s": float(r_s) if r_s else None, "rebuild_runs": runs(r_runs),
    "rebuild_mib": int(r_m) if r_m else None,
    "rebuild_floor_s": float(rf_s), "rebuild_floor_runs": runs(rf_runs),
    "rebuild_x_floor": round(float(r_s) / float(rf_s), 2) if r_s else None,
    "library_bytes": int(lib_bytes), "shared_bytes": info["shared_bytes"],
    "total_bytes": info["total_bytes"], "task_bytes": [t["bytes"] for t in info["tasks"]],
    "rebuild_read_bytes": int(rb_read),
    "bits_per_parameter": bits,
}
with open(rows, "a") as f:
    f.write(json.dumps(row) + "\n")
x = lambda v: "–" if v is None else f"{v:.2f}"
lo, hi = min(bits), max(bits)
b = f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"
print("| %-7s | %-26s | %9s | %13s | %-26s | %11s | %15s | %10s | %15s |" % (
    s, f"{b_s} ({b_runs})", b_m, x(row["build_x_floor"]),
    f"{r_s} ({r_runs})" if r_s else "FAILED", r_m or "-", x(row["rebuild_x_floor"]),
    f"{int(lib_bytes) / 1e6:.1f}", b))
PY
done
echo
echo "I/O floors (s, median and runs; bytes written by the build floor = the library's, read by the rebuild floor = base + shared + ft1's file, written = $model_bytes):"
printf '| %-7s | %11s | %-22s | %14s | %13s | %-22s | %15s |\n' scheme "build floor" "runs" "library bytes" "rebuild floor" "runs" "rebuild reads"
printf '|%s|\n' "---------|-------------|------------------------|----------------|---------------|------------------------|-----------------"
if [ ${#floors[@]} -gt 0 ]; then printf '%s\n' "${floors[@]}"; fi
python3 - "$rows" "$layers" "$reps" "$threads" "$params" "$model_bytes" "$(nproc)" <<'PY'
import json, sys
rows, layers, reps, threads, params, model_bytes, cores = sys.argv[1:]
out = {
    "bench": "library_speed", "layers": int(layers), "reps": int(reps), "threads": int(threads),
    "cores": int(cores), "parameters": int(params), "model_bytes": int(model_bytes), "tasks": 3,
    "rows": [json.loads(l) for l in open(rows) if l.strip()],
}
print("RESULT_JSON " + json.dumps(out, separators=(",", ":")))
PY
rm -rf "$work/out-model" "$rows"
if [ "$keep" = 0 ]; then
  for s in $schemes; do rm -rf "$work/lib-$s"; done
fi
