#!/usr/bin/env bash
# Build the CPU variant of docker/Dockerfile (scripts/build_image.sh), then train in it for real: a tiny
# generated dataset, `horovodrun -np 2 -H localhost:2 --gloo python -m hvd_megdet.train` for 4 iterations, and
# a check of the checkpoint, metrics and evaluation it writes. `make docker-test`.
#
# Needs root and podman, runc, debootstrap (set-up: docker/README.md, "Testing the image").
# Environment (all optional): IMAGE, BASE_IMAGE, DEBIAN_MIRROR, as scripts/build_image.sh reads them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export IMAGE=${IMAGE:-localhost/hvd_megdet:cpu-test}
ITERS=4

say() { echo "docker_test: $*" >&2; }
die() { say "error: $*"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

start=$SECONDS
"$ROOT/scripts/build_image.sh"
build_s=$((SECONDS - start))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")

# The container's user (uid 1000) writes the outputs into a host folder, as a user would mount one.
out="$TMP/output"
mkdir -p "$out"
chown 1000:1000 "$out"
say "training in the container: horovodrun -np 2 --gloo, $ITERS iterations"
start=$SECONDS
podman run --rm --volume "$out:/workspace/output" "$IMAGE" bash -c "
    set -euo pipefail
    python -m hvd_megdet.data.synthetic --out data/shapes --num-train 16 --num-val 8
    horovodrun -np 2 -H localhost:2 --gloo python -m hvd_megdet.train --config configs/demo_shapes.yaml \
        output_dir=output/docker-test solver.max_iter=$ITERS solver.warmup_iters=1 'solver.steps=[3]' \
        checkpoint_period=2 log_period=1"
run_s=$((SECONDS - start))

run_dir="$out/docker-test"
printf -v last_ckpt '%s/checkpoints/model_%07d.pth' "$run_dir" "$ITERS"
for f in "$last_ckpt" "$run_dir/metrics.jsonl" "$run_dir/eval/latest.json" "$run_dir/config.yaml"; do
    [ -s "$f" ] || die "the run wrote no ${f#"$out"/}"
done
grep -q "\"iteration\": $ITERS," "$run_dir/metrics.jsonl" || die "metrics.jsonl has no record of iteration $ITERS"
say "outputs: $(cd "$out" && find docker-test -type f | sort | tr '\n' ' ')"
say "ok: build ${build_s} s, run ${run_s} s, image $IMAGE $((size / 1000000)) MB"
