#!/usr/bin/env bash
# Interleaved A/B timing of amalgam builds on the same merge configs, for changes too small for
# one run of bench/merge_vs_mergekit.sh to show on a noisy machine.
#
#   R=7 T=2 bash bench/ab.sh "label|binary|extra args" ... -- CONFIG.yml ...
#
# For each config, R rounds (default 5), each running every variant once in turn (so drift in
# the machine's speed hits all variants alike) with `--threads T` (default 2), after `sync` and
# with no output directory. Prints, per config and variant, the median wall, user, system and
# total CPU seconds and the largest peak RSS (/usr/bin/time).
set -euo pipefail
variants=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do variants+=("$1"); shift; done
[ $# -gt 1 ] || { echo "usage: bash bench/ab.sh \"label|binary|args\" ... -- CONFIG.yml ..." >&2; exit 2; }
shift
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for cfg in "$@"; do
  for ((r = 0; r < ${R:-5}; r++)); do
    for v in "${variants[@]}"; do
      IFS='|' read -r label bin args <<< "$v"
      rm -rf "$out/merged"
      sync
      # shellcheck disable=SC2086 # the extra arguments are split on purpose
      /usr/bin/time -f "$(basename "$cfg" .yml) $label %e %U %S %M" -a -o "$out/times" \
        "$bin" --threads "${T:-2}" merge "$cfg" "$out/merged" -q $args
    done
  done
done
python3 - "$out/times" <<'PY'
import collections, statistics as st, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) == 6:
        runs[(p[0], p[1])].append([float(x) for x in p[2:]])
for (cfg, label), v in sorted(runs.items()):
    med = lambda i: st.median(x[i] for x in v)
    cpu = st.median(x[1] + x[2] for x in v)
    print(f"{cfg:16s} {label:10s} wall {med(0):.2f} (min {min(x[0] for x in v):.2f})  "
          f"user {med(1):.2f}  sys {med(2):.2f}  cpu {cpu:.2f}  rss {max(x[3] for x in v) / 1024:.0f} MiB")
PY
