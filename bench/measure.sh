# Timing helpers shared by the benchmark scripts (sourced; they set `work` and `reps`).
#
#   measure DIR CMD...        one run of CMD after removing DIR (its output) and syncing, so no
#                             run pays for the last one's writeback; prints "seconds peak_MiB"
#                             (/usr/bin/time), CMD's output in $work/last.log
#   median_of N DIR CMD...    N runs; prints "median_s max_MiB runs" (runs: every wall time
#                             joined with "/"), or nothing if a run failed
#   floor BYTES FILE...       the I/O floor: read every FILE once, write a BYTES-sized file,
#                             fsync, through the page cache; prints the seconds
#   floor_median BYTES FILE...  `floor` $reps times; prints "median_s runs"

measure() {
  local dir=$1
  shift
  rm -rf "$dir"
  sync
  /usr/bin/time -f '%e %M' -o "$work/time.txt" "$@" > "$work/last.log" 2>&1 || {
    echo "FAILED: $*" >&2; cat "$work/last.log" >&2; return 1; }
  awk '{printf "%.2f %.0f", $1, $2/1024}' "$work/time.txt"
}

median_of() {
  local n=$1 i s m all=()
  shift
  for ((i = 0; i < n; i++)); do
    read -r s m < <(measure "$@"; echo) || true   # a failed run: s empty
    [ -n "$s" ] || return 0
    all+=("$s $m")
  done
  printf '%s\n' "${all[@]}" | python3 -c '
import sys, statistics
runs = [l.split() for l in sys.stdin if l.strip()]
t = [float(r[0]) for r in runs]
print(f"{statistics.median(t):.2f} {max(int(r[1]) for r in runs)} " + "/".join(r[0] for r in runs))'
}

floor() {
  local size=$1 out=$work/floor.bin t0 t1
  shift
  t0=$(date +%s.%N)
  cat "$@" > /dev/null
  head -c "$size" /dev/zero > "$out"
  sync "$out"
  t1=$(date +%s.%N)
  rm -f "$out"
  printf "%.2f" "$(echo "$t1 - $t0" | bc)"
}

floor_median() {
  local i all=()
  for ((i = 0; i < reps; i++)); do all+=("$(floor "$@")"); done
  printf '%s\n' "${all[@]}" | python3 -c '
import sys, statistics
t = [l.strip() for l in sys.stdin if l.strip()]
print(f"{statistics.median(float(x) for x in t):.2f} " + "/".join(t))'
}
