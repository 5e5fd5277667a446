#!/usr/bin/env bash
# The GPU check on a fresh single-GPU Linux machine that has the project's files only (README.md, "GPU check"):
# build Horovod there with NCCL, for this GPU's architecture, then run `python -m hvd_megdet.bench.gpu`, which
# writes one JSON (the set-up's times and versions included).
#
#   scripts/gpu_check.sh [--out FILE] [--skip-setup] [--dry-run]
#
#   --out FILE     the JSON (default gpu_check.json); the set-up's log, each line stamped with the seconds since
#                  the start, goes beside it as FILE without .json + _setup.log
#   --skip-setup   Horovod is installed already: build nothing
#   --dry-run      no GPU needed: the set-up is plain scripts/install_horovod.sh (what `make install` runs), and
#                  the check runs its code paths on the CPU at tiny sizes (tests/test_gpu_check.py)
#
# Environment: PYTHON (default python3, the interpreter that holds torch); CARRY (default .gpu_carry), where
# scripts/gpu_check_pack.sh puts horovod-0.28.1.tar.gz for a machine without network. Without the file there,
# scripts/install_horovod.sh downloads it.
set -euo pipefail
cd "$(dirname "$0")/.."

out=gpu_check.json setup=1 dry_run=()
while [ $# -gt 0 ]; do
    case $1 in
        --out) [ $# -ge 2 ] || { echo "gpu_check: --out needs a file" >&2; exit 2; }; out=$2; shift ;;
        --skip-setup) setup=0 ;;
        --dry-run) dry_run=(--dry-run) ;;
        *) echo "gpu_check: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done
PYTHON=$(command -v "${PYTHON:-python3}") || { echo "gpu_check: no Python at ${PYTHON:-python3}" >&2; exit 2; }
export PYTHON PYTHONUNBUFFERED=1
CARRY=${CARRY:-.gpu_carry}
mkdir -p "$(dirname "$out")"
log="${out%.json}_setup.log"
notes=$(mktemp)
trap 'rm -f "$notes"' EXIT
note() { printf '%s=%s\n' "$1" "$2" >>"$notes"; }
note started_epoch "$(date +%s.%N)"
note nproc "$(nproc)"

if [ "$setup" = 1 ]; then
    if [ ${#dry_run[@]} = 0 ]; then
        # Horovod for this GPU only: one architecture compiles in a fraction of the default list's time.
        HOROVOD_BUILD_CUDA_CC_LIST=$("$PYTHON" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
        if [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ] && command -v nvcc >/dev/null; then
            CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
            export CUDA_HOME
        fi
        export HOROVOD_BUILD_CUDA_CC_LIST HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_PIP=1
        if [ -f "$CARRY/horovod-0.28.1.tar.gz" ]; then
            export HOROVOD_SDIST="$CARRY/horovod-0.28.1.tar.gz"
        fi
        note cuda_cc_list "$HOROVOD_BUILD_CUDA_CC_LIST"
        note gpu "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1)"
        note nvcc "$("${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1 | tail -n 1)"
        note cmake "$( (PATH="$(dirname "$PYTHON"):$PATH" cmake --version 2>&1 || true) | head -n 1)"
        note build_tool "$(command -v make || command -v ninja || echo none)"
    fi
    echo "gpu_check: setting up Horovod (log: $log)"
    start=$SECONDS
    set +e
    PYTHON="$PYTHON" scripts/install_horovod.sh 2>&1 | while IFS= read -r line; do
        printf '[%4ds] %s\n' "$((SECONDS - start))" "$line"
    done >"$log"
    status=${PIPESTATUS[0]}
    set -e
    tail -n 3 "$log"
    note horovod_setup_seconds "$((SECONDS - start))"
    note horovod_setup_status "$([ "$status" = 0 ] && echo ok || echo "failed (exit $status), see $log")"
fi

# A failed set-up still runs the check: it records what it could not run, and why.
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m hvd_megdet.bench.gpu --out "$out" --setup "$notes" \
    "${dry_run[@]}"
