#!/usr/bin/env bash
# Before/after: run one benchmark command on commit REV and on this working tree, alternating, ROUNDS times,
# so that changes in machine load hit both alike.
#
#   scripts/bench_ab.sh REV ROUNDS CMD...
#
# CMD runs in each tree (REV checked out in a temporary git worktree) with this checkout's .venv/bin first
# on PATH and the tree on PYTHONPATH, so `python` and `horovodrun` are the venv's and import that tree's
# hvd_megdet. Example (the README's before/after figures):
#   scripts/bench_ab.sh 680fccc 2 horovodrun -np 2 -H localhost:2 --gloo python -m hvd_megdet.bench.sync_bn
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 REV ROUNDS CMD..." >&2
  exit 2
fi
rev=$1 rounds=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
before=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$before"' EXIT
git -C "$repo" worktree add --detach -q "$before" "$rev"
for round in $(seq "$rounds"); do
  for tree in "$before" "$repo"; do
    if [ "$tree" = "$repo" ]; then label="after (working tree)"; else label="before ($rev)"; fi
    echo "== $label, round $round, load average $(cut -d' ' -f1 /proc/loadavg)"
    (cd "$tree" && PATH="$repo/.venv/bin:$PATH" PYTHONPATH="$tree" "$@")
  done
done
