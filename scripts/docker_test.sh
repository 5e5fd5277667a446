#!/usr/bin/env bash
# Build a variant of docker/Dockerfile (scripts/build_image.sh), then train in it for real, on the CPU: a tiny
# generated dataset, `horovodrun -np 2 -H localhost:2 python -m hvd_megdet.train` for 4 iterations with Gloo and
# again with MPI, and a check of the checkpoint, metrics and evaluation each writes.
#   scripts/docker_test.sh         the CPU variant (`make docker-test`)
#   scripts/docker_test.sh --gpu   the GPU variant (`make gpu-image`): its CPU path; its GPU path needs a GPU
#
# Needs root and podman, runc, debootstrap (set-up: docker/README.md, "Testing the image").
# Environment (all optional): IMAGE, BASE_IMAGE, DEBIAN_MIRROR, as scripts/build_image.sh reads them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VARIANT=cpu
case "${1:-}" in
    "") ;;
    --gpu) VARIANT=gpu ;;
    *) echo "usage: $0 [--gpu]" >&2; exit 2 ;;
esac
export IMAGE=${IMAGE:-localhost/hvd_megdet:$VARIANT-test}
ITERS=4

say() { echo "docker_test: $*" >&2; }
die() { say "error: $*"; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

start=$SECONDS
"$ROOT/scripts/build_image.sh" ${1:+"$1"}
build_s=$((SECONDS - start))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")

# The container's user (uid 1000) writes the outputs into a host folder, as a user would mount one.
out="$TMP/output"
mkdir -p "$out"
chown 1000:1000 "$out"
say "training in the container: horovodrun -np 2 --gloo, then --mpi, $ITERS iterations each"
start=$SECONDS
podman run --rm --volume "$out:/workspace/output" "$IMAGE" bash -c "
    set -euo pipefail
    horovodrun --check-build
    python -m hvd_megdet.data.synthetic --out data/shapes --num-train 16 --num-val 8
    for controller in gloo mpi; do
        horovodrun -np 2 -H localhost:2 --\$controller python -m hvd_megdet.train --config configs/demo_shapes.yaml \
            output_dir=output/docker-test-\$controller solver.max_iter=$ITERS solver.warmup_iters=1 'solver.steps=[3]' \
            checkpoint_period=2 log_period=1
    done"
run_s=$((SECONDS - start))

for controller in gloo mpi; do
    run_dir="$out/docker-test-$controller"
    printf -v last_ckpt '%s/checkpoints/model_%07d.pth' "$run_dir" "$ITERS"
    for f in "$last_ckpt" "$run_dir/metrics.jsonl" "$run_dir/eval/latest.json" "$run_dir/config.yaml"; do
        [ -s "$f" ] || die "the $controller run wrote no ${f#"$out"/}"
    done
    grep -q "\"iteration\": $ITERS, .*\"world_size\": 2" "$run_dir/metrics.jsonl" \
        || die "the $controller run's metrics.jsonl has no record of iteration $ITERS on 2 ranks"
done
say "outputs: $(cd "$out" && find . -type f | sort | tr '\n' ' ')"
say "ok: build ${build_s} s, both runs ${run_s} s, image $IMAGE $((size / 1000000)) MB"
