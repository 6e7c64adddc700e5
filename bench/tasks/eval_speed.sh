#!/usr/bin/env bash
# `amalgam eval` against the same evaluation with Hugging Face transformers
# (bench/tasks/eval_transformers.py), side by side in one run: one task of 500 examples at max
# length 64, a fine-tuned all-MiniLM-L6-v2 with its head, both at 2 threads, alternating, ROUNDS
# rounds. Prints, per run, the whole process's wall time and the evaluation loop's time
# (tokenization included; amalgam's from its stderr report), then the medians and ratios.
#
#   bash bench/tasks/eval_speed.sh [WORK=/tmp/amalgam-tasks] [TASK=sentiment_rt] [ROUNDS=3]
#
# WORK is finetune.py's --out folder; PYTHON (default /tmp/peers/bin/python) needs torch and
# transformers; AMALGAM defaults to target/release/amalgam.
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-/tmp/amalgam-tasks}
task=${2:-sentiment_rt}
rounds=${3:-3}
python=${PYTHON:-/tmp/peers/bin/python}
amalgam=${AMALGAM:-target/release/amalgam}
data=../shared/benchmark/$task.test.jsonl
model=$work/finetuned/$task
head=$work/heads/$task.safetensors
export HF_HUB_OFFLINE=1
results=$(mktemp)
for r in $(seq "$rounds"); do
  start=$(date +%s.%N)
  line=$("$python" bench/tasks/eval_transformers.py "$model" "$data" "$head" --max-len 64 \
    --threads 2 2>/dev/null | tail -1)
  end=$(date +%s.%N)
  t_proc=$(echo "$end - $start" | bc)
  t_loop=$(echo "$line" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["loop_s"])')
  acc=$(echo "$line" | "$python" -c 'import json,sys; print(json.load(sys.stdin)["accuracy"])')
  echo "transformers $t_proc $t_loop $acc" | tee -a "$results"
  start=$(date +%s.%N)
  err=$("$amalgam" --threads 2 eval "$model" --task "$data" --head "$head" --max-len 64 \
    --json 2>&1 >/tmp/amalgam-eval-speed.json)
  end=$(date +%s.%N)
  t_proc=$(echo "$end - $start" | bc)
  t_loop=$(echo "$err" | sed -n 's/.* in \([0-9.]*\) s$/\1/p' | tail -1)
  acc=$("$python" -c 'import json; print(json.load(open("/tmp/amalgam-eval-speed.json"))["tasks"][0]["accuracy"])')
  echo "amalgam $t_proc $t_loop $acc" | tee -a "$results"
done
"$python" - "$results" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {}
for tool in ("transformers", "amalgam"):
    r = [x for x in rows if x[0] == tool]
    med[tool] = (statistics.median(float(x[1]) for x in r), statistics.median(float(x[2]) for x in r),
                 r[0][3])
    print(f"{tool:13s} median process {med[tool][0]:.2f} s, loop {med[tool][1]:.2f} s, accuracy {med[tool][2]}")
t, a = med["transformers"], med["amalgam"]
print(f"amalgam is {t[0] / a[0]:.2f}x faster per process, {t[1] / a[1]:.2f}x on the evaluation loop")
EOF
