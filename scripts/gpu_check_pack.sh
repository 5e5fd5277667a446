#!/usr/bin/env bash
# Fill .gpu_carry/ with what scripts/gpu_check.sh needs on a GPU machine without network (README.md, "GPU
# check"); run it where pip reaches PyPI: Horovod's sdist, with the sha256 that scripts/install_horovod.sh pins.
# git ignores the folder (.git/info/exclude), so copy it to the GPU machine along with the checkout; this script
# checks that the two together stay within 64 MiB, for transfers to the GPU machine that cap a copy's size.
#
# No wheel is packed: the GPU machine must already hold all that the check imports or builds with (torch,
# torchvision, pytest, cloudpickle, psutil, PyYAML, packaging, setuptools, wheel, cmake, make or ninja, torch's
# nvidia-nccl wheel); hvd_megdet.bench.gpu imports neither pycocotools nor albumentations
# (tests/test_gpu_check.py checks that).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=${CARRY:-.gpu_carry}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
LIMIT=$((64 * 1024 * 1024))
version=$(sed -n 's/^HOROVOD_VERSION=//p' scripts/install_horovod.sh)
sha=$(sed -n 's/^HOROVOD_SHA256=//p' scripts/install_horovod.sh)
sdist="$CARRY/horovod-$version.tar.gz"

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" "$CARRY"
grep -qxF "/$CARRY/" "$exclude" 2>/dev/null || echo "/$CARRY/" >>"$exclude"

if ! echo "$sha  $sdist" | sha256sum -c --quiet - >/dev/null 2>&1; then
    rm -f "$sdist"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$version" -d "$CARRY"
    echo "$sha  $sdist" | sha256sum -c --quiet - || { echo "gpu_check_pack: sha256 mismatch for $sdist" >&2; exit 1; }
fi

# What a copy of the checkout holds: tracked files, untracked files git does not ignore, and .gpu_carry/.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}')
carried=$(du -sb "$CARRY" | cut -f1)
echo "gpu_check_pack: $CARRY holds $(ls "$CARRY" | tr '\n' ' ')($carried bytes); working tree $tree bytes;" \
    "together $(((tree + carried) / 1024 / 1024)) MiB of the 64 MiB allowed"
[ $((tree + carried)) -le "$LIMIT" ] || { echo "gpu_check_pack: over the 64 MiB allowed for the copy" >&2; exit 1; }
