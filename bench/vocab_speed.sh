#!/usr/bin/env bash
# Vocabulary alignment's cost: a TIES merge with `tokenizer_source: union` against the same
# merge without vocabulary changes, same machine, one run.
#
#   bash bench/vocab_speed.sh [WORKDIR] [--layers N] [--reps N]
#
# Uses bench/merge_vs_mergekit.sh's synthetic set (hidden 2048, intermediate 5632, vocab 32000,
# 8 layers: 0.54 B parameters, bf16; built here if absent) and gives each model a tokenizer.json
# (a WordLevel vocabulary t0..t31999): the base and ft3 as is; ft1 a chat fine-tune whose last
# 100 ids are 100 added special tokens instead (so the union has 32100 rows, the new rows taken
# from ft1 and the tokens it lost from the others); ft2 the same tokens under shuffled ids (another
# tokenizer: every one of its rows is read on its own, the worst case). Runs --reps (default 5)
# interleaved pairs and prints the median times and the median of the pairs' ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
work=/tmp/amalgam-bench
layers=8
reps=5
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers=$2; shift ;;
    --reps) reps=$2; shift ;;
    *) work=$1 ;;
  esac
  shift
done
cargo build --release -q -p amalgam-cli --examples --bins
bin=$PWD/target/release/amalgam
synth=$PWD/target/release/examples/synth_model
set_dir=$work/models-$layers
vocab_dir=$work/vocab-$layers
mkdir -p "$set_dir" "$vocab_dir" "$work/configs"
shape=(--hidden 2048 --intermediate 5632 --vocab 32000 --layers "$layers" --dtype bf16)
[ -f "$set_dir/base/config.json" ] || "$synth" "$set_dir/base" "${shape[@]}" --seed 1
for i in 1 2 3; do
  [ -f "$set_dir/ft$i/config.json" ] || "$synth" "$set_dir/ft$i" "${shape[@]}" --seed $((i + 1)) --base "$set_dir/base" --noise 0.002
done
# The same weights (symlinked), each with its tokenizer.
python3 - "$set_dir" "$vocab_dir" <<'PY'
import json, os, random, sys
src, dst = sys.argv[1], sys.argv[2]
n = 32000
def tokenizer(vocab, added=()):
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for c, i in added],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
base = {f"t{i}": i for i in range(n)}
chat = {f"t{i}": i for i in range(n - 100)}
added = [(f"<|x{j}|>", n - 100 + j) for j in range(100)]
ids = list(range(n)); random.Random(7).shuffle(ids)
shuffled = {f"t{i}": ids[i] for i in range(n)}
for name, tok in [("base", tokenizer(base)), ("ft1", tokenizer(chat, added)),
                  ("ft2", tokenizer(shuffled)), ("ft3", tokenizer(base))]:
    d = os.path.join(dst, name)
    os.makedirs(d, exist_ok=True)
    for f in ("model.safetensors", "config.json"):
        link = os.path.join(d, f)
        if not os.path.lexists(link):
            os.symlink(os.path.join(src, name, f), link)
    with open(os.path.join(d, "tokenizer.json"), "w") as fh:
        json.dump(tok, fh)
PY
ties() { # model dir, extra line
  echo "merge_method: ties"
  echo "base_model: $1/base"
  echo "models:"
  for i in 1 2 3; do echo "  - model: $1/ft$i"; echo "    parameters: {weight: 1.0, density: 0.5}"; done
  echo "$2"
}
ties "$set_dir" "" > "$work/configs/ties-plain.yml"
ties "$vocab_dir" "tokenizer_source: union" > "$work/configs/ties-union.yml"

source "$(dirname "$0")/measure.sh"   # measure, median_of
cat "$set_dir"/*/model.safetensors > /dev/null   # warm the page cache
# Interleaved (plain, union) pairs, so that drift of the shared machine hits both alike; the
# figure is the median of the pairs' ratios.
pairs=()
for ((r = 0; r < reps; r++)); do
  read -r p pm < <(measure "$work/out-v" "$bin" merge "$work/configs/ties-plain.yml" "$work/out-v" -q --threads 2; echo)
  read -r u um < <(measure "$work/out-v" "$bin" merge "$work/configs/ties-union.yml" "$work/out-v" -q --threads 2; echo)
  pairs+=("$p $pm $u $um")
done
rows=$("$bin" inspect "$work/out-v" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(next(t["shape"][0] for t in r["largest"] if t["name"]=="model.embed_tokens.weight"))' 2>/dev/null || echo "?")
echo "model set: $layers layers; union vocabulary: $rows rows; $reps interleaved pairs"
printf '%s\n' "${pairs[@]}" | python3 -c '
import sys, statistics as st
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
p = [r[0] for r in rows]; u = [r[2] for r in rows]
print("| merge                  | median s | peak MiB | runs s")
print("|------------------------|----------|----------|--------------------")
print(f"| ties, same vocabulary  | {st.median(p):8.2f} | {max(r[1] for r in rows):8.0f} | " + "/".join(f"{x:.2f}" for x in p))
print(f"| ties, union vocabulary | {st.median(u):8.2f} | {max(r[3] for r in rows):8.0f} | " + "/".join(f"{x:.2f}" for x in u))
ratios = [b / a for a, b in zip(p, u)]
print(f"union / plain: {st.median(ratios):.2f}x (median of the pairs: " + ", ".join(f"{x:.2f}" for x in ratios) + ")")'
