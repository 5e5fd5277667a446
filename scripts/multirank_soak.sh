#!/usr/bin/env bash
# The multi-rank tests run again and again beside busy processes: a flaky collective, a rendezvous race or a
# timeout too tight shows up as a failed run. One line per run goes to LOG (appended: rerun to add runs).
#
#   scripts/multirank_soak.sh RUNS LOG [PYTEST ARGS...]     # default args: -m multirank (every multi-rank test)
#
# BUSY (default 2) processes spin beside the tests; each run's pytest output is kept as LOG.<run>.txt. Example
# (the process-set tests only, a few minutes a run on 2 cores):
#   scripts/multirank_soak.sh 30 output/soak.log -m multirank tests/test_dist.py tests/test_harness.py \
#       tests/test_sync_bn.py -k "groups or dist or harness"
set -uo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUNS LOG [PYTEST ARGS...]" >&2
  exit 2
fi
runs=$1 log=$2
shift 2
[ $# -gt 0 ] || set -- -m multirank
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$(dirname "$log")"
busy=()
for _ in $(seq 1 "${BUSY:-2}"); do
  python3 -c "while True: pass" >/dev/null 2>&1 &
  busy+=($!)
done
trap 'kill "${busy[@]}" 2>/dev/null' EXIT
failed=0
for run in $(seq 1 "$runs"); do
  start=$(date +%s)
  (cd "$repo" && .venv/bin/python -m pytest -q -p no:cacheprovider "$@") >"$log.$run.txt" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=$((failed + 1))
  echo "run $run exit $rc $(($(date +%s) - start)) s: $(tail -n 1 "$log.$run.txt")" >>"$log"
done
echo "$failed of $runs runs failed ($log)"
[ $failed -eq 0 ]
